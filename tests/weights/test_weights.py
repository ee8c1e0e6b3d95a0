"""The streamed caffemodel writer: what protobuf and Caffe read back."""
import numpy as np

from ctxpred.weights.files import read_weights, write_weights


def test_streamed_binary_caffemodel_parses_as_net_parameter(caffe, tmp_path, rng):
    weights = {"conv1": [rng.standard_normal((4, 3, 2, 2)).astype(np.float32),
                         rng.standard_normal(4)],  # float64: written as float32
               "fc": [rng.standard_normal((6, 5)).astype(np.float32).T,  # not C-contiguous
                      np.zeros(0, np.float32)],
               "empty": []}
    path = write_weights(weights, tmp_path / "w.caffemodel")
    proto = caffe.proto.caffe_pb2.NetParameter()
    proto.ParseFromString(path.read_bytes())
    assert [layer.name for layer in proto.layer] == ["conv1", "fc", "empty"]
    for layer in proto.layer:
        arrays = weights[layer.name]
        assert len(layer.blobs) == len(arrays)
        for blob, array in zip(layer.blobs, arrays):
            assert tuple(blob.shape.dim) == array.shape
            np.testing.assert_array_equal(np.array(blob.data, np.float32),
                                          np.asarray(array, np.float32).ravel())
    back = read_weights(path)
    np.testing.assert_array_equal(back["fc"][0], weights["fc"][0])
