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

from ctxpred.caffe.env import import_caffe


class WeightFileError(ValueError):
    """A weight file that cannot be read; the message names it."""


def is_hdf5(path):
    with open(path, "rb") as handle:
        return handle.read(8) == b"\x89HDF\r\n\x1a\n"


def read_weights(path):
    """{layer: [float32 arrays]} from a binary or HDF5 caffemodel.

    Layers without parameters are left out. Raises FileNotFoundError naming a
    missing file and WeightFileError naming one that is not a Caffe model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist")
    if is_hdf5(path):
        return _read_hdf5(path)
    return _read_binary(path)


def _read_hdf5(path):
    weights = {}
    try:
        with h5py.File(path, "r") as handle:
            if "data" not in handle:
                raise WeightFileError(f"{path} is HDF5 but has no /data group: not a Caffe model")
            for name, group in handle["data"].items():
                if len(group):  # Caffe writes an empty group for layers without blobs
                    weights[name] = [np.asarray(group[str(i)], dtype=np.float32)
                                     for i in range(len(group))]
    except (OSError, KeyError, AttributeError) as error:  # h5py: truncated, damaged, not a group
        raise WeightFileError(f"{path} is a damaged HDF5 Caffe model ({error})") from None
    return weights


def _blob_array(blob):
    if blob.HasField("shape"):
        shape = tuple(blob.shape.dim)
    else:
        # Legacy (num, channels, height, width): Caffe pads lower-rank blobs with leading 1s.
        shape = (blob.num, blob.channels, blob.height, blob.width)
        while len(shape) > 1 and shape[0] == 1:
            shape = shape[1:]
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
    with open(path, "wb") as handle:
        for name, arrays in weights.items():
            # Streamed: each field's length is known before its bytes, so the packed float
            # data goes from the array to the file without a copy (the arrays may be views
            # of a net's blobs; fc6 alone is ~150 MB).
            header = caffe_pb2.LayerParameter(name=name).SerializeToString()
            blobs = []
            for array in arrays:
                array = np.ascontiguousarray(array, dtype="<f4")
                shape = caffe_pb2.BlobProto(shape=dict(dim=array.shape)).SerializeToString()
                data_header = _varint(_BLOB_DATA << 3 | 2) + _varint(array.nbytes)
                blob_header = shape + data_header
                blobs.append((_varint(_BLOBS << 3 | 2)
                              + _varint(len(blob_header) + array.nbytes) + blob_header, array))
            size = len(header) + sum(len(start) + array.nbytes for start, array in blobs)
            handle.write(_varint(_NET_LAYER << 3 | 2) + _varint(size) + header)
            for start, array in blobs:
                handle.write(start)
                handle.write(memoryview(array.reshape(-1)).cast("B"))
    return path


# Field numbers of caffe.proto used by the hand-encoded writer: protobuf's
# Python API takes seconds to copy the ~40M floats of fc7 value by value, so
# the packed float data is written as raw bytes.
_NET_LAYER, _BLOBS, _BLOB_DATA = 100, 7, 5


def _varint(value):
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number, payload):
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload
