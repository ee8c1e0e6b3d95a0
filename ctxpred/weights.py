"""Caffe weight files as named numpy arrays, without building a net.

Two formats, as Caffe writes them:

- binary ``.caffemodel``: a serialized NetParameter whose layers carry their
  blobs (``Net.save``);
- HDF5 ``.caffemodel.h5`` / ``.h5``: datasets ``/data/<layer>/<index>``
  (``Net.save_hdf5``).

Weights are {layer name: [blob arrays in Caffe's order]}, the order of the
file's layers preserved. Caffe loads either format by layer name and checks
shapes, so a file written here loads into any net with those layer names.
"""
from pathlib import Path

import h5py
import numpy as np

from ctxpred.caffe_env import import_caffe


class WeightFileError(ValueError):
    """A weight file that cannot be read; the message names it."""


def is_hdf5(path):
    with open(path, "rb") as handle:
        return handle.read(8) == b"\x89HDF\r\n\x1a\n"


def read_weights(path):
    """{layer: [float32 arrays]} from a binary or HDF5 caffemodel."""
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"weight file {path} does not exist")
    if is_hdf5(path):
        return _read_hdf5(path)
    return _read_binary(path)


def _read_hdf5(path):
    weights = {}
    with h5py.File(path, "r") as handle:
        if "data" not in handle:
            raise WeightFileError(f"{path} is HDF5 but has no /data group: not a Caffe model")
        for name, group in handle["data"].items():
            weights[name] = [np.asarray(group[str(i)], dtype=np.float32)
                             for i in range(len(group))]
    return weights


def _blob_array(blob):
    shape = tuple(blob.shape.dim) if blob.HasField("shape") else tuple(
        d for d in (blob.num, blob.channels, blob.height, blob.width))
    values = blob.data if len(blob.data) else blob.double_data
    array = np.asarray(values, dtype=np.float32)
    if array.size != int(np.prod(shape)):
        raise WeightFileError(f"blob of shape {shape} holds {array.size} values")
    return array.reshape(shape)


def _read_binary(path):
    caffe_pb2 = import_caffe().proto.caffe_pb2
    net = caffe_pb2.NetParameter()
    try:
        net.ParseFromString(path.read_bytes())
    except Exception as error:  # protobuf's DecodeError, by implementation
        raise WeightFileError(f"{path} is not a Caffe model (protobuf: {error})") from None
    layers = list(net.layer) or list(net.layers)  # current or V1 layer format
    if not layers:
        raise WeightFileError(f"{path} holds no layers: not a Caffe model")
    try:
        return {layer.name: [_blob_array(blob) for blob in layer.blobs]
                for layer in layers if len(layer.blobs)}
    except WeightFileError as error:
        raise WeightFileError(f"{path}: {error}") from None


def write_weights(weights, path):
    """Write {layer: [arrays]} as HDF5 if ``path`` ends in .h5, else binary proto."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".h5":
        with h5py.File(path, "w") as handle:
            data = handle.create_group("data")
            for name, arrays in weights.items():
                group = data.create_group(name)
                for index, array in enumerate(arrays):
                    group.create_dataset(str(index), data=np.asarray(array, np.float32))
        return path
    caffe_pb2 = import_caffe().proto.caffe_pb2
    net = caffe_pb2.NetParameter()
    for name, arrays in weights.items():
        layer = net.layer.add()
        layer.name = name
        for array in arrays:
            blob = layer.blobs.add()
            blob.shape.dim.extend(np.shape(array))
            blob.data.extend(np.asarray(array, np.float32).ravel())
    path.write_bytes(net.SerializeToString())
    return path
