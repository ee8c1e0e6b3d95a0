"""Frozen per-layer features of whole images, cached per layer in HDF5 (the issue-16 protocols).

What a feature is:

- Image: decoded upright as RGB and squashed to ``input_size`` x
  ``input_size`` (cv2 area interpolation when shrinking, bilinear when
  enlarging): the whole image, so objects at its edges count (VOC is
  multi-label). Default 227, the input of Goyal et al.'s Caffe AlexNet
  benchmark (VISSL uses 224).
- Net: the deploy net made fully convolutional at that size
  (:func:`ctxpred.features.dense.fully_convolutional`): conv layers run as
  they are; our deploy nets' per-sample RMS normalisation scales the whole
  image to RMS 50; InnerProduct layers (fc6, fc7) become convolutions with
  their own weights, so fc6 reads every k x k block of pool5 it was trained
  on (3 x 3 for our 96-pixel nets; at 227 px pool5 is 7 x 7 and fc6 gives a
  5 x 5 map). A blob holds what it holds after the full forward pass (after
  an in-place ReLU).
- Pooling (:func:`pooling_geometry`): a conv map C x H x W is average-pooled
  to about 9216 dims: n = round(sqrt(9216 / C)) cells per side, stride
  s = max(1, floor(H / n) - 1), kernel k = H - (n - 1) s. The rule gives
  VISSL's AlexNet settings at 224 px exactly (conv1 96 x 55 x 55: 19/4, 9600
  dims; conv2 256 x 27 x 27: 12/3, 9216; conv3/4 384 x 13 x 13: 9/1, 9600;
  conv5 256 x 13 x 13: 8/1, 9216). An fc layer's map is averaged over all
  positions (C dims); at the net's own input size its map is 1 x 1 and this
  is exactly the InnerProduct. Kernel, stride and map shape are stored with
  the features.

Storage: one HDF5 file per layer, ``OUT/<layer>-<key>.h5`` with datasets
``features`` (N, D) float32 and ``image`` (N,) UTF-8 (the image paths as
given, their ids), and attributes. The key is a SHA-256 of everything the
features depend on (the deploy file's bytes, the weights file's bytes, the
training net used for BatchNorm folding, the layer, the input size, the
channel order and the image list); the file is written as ``.part`` and
renamed when complete, and read back only when its stored key and shapes
match, so a stale, half-written or corrupt file is extracted again. The
backend is not part of the key: onnxruntime's features equal pycaffe's
within 1e-4 (checked on the first batch of every onnxruntime run).
"""
import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np

from ctxpred.caffe.netparam import instantiate, read_net_param, weight_shapes_of
from ctxpred.data.images import decode_squashed
from ctxpred.features.dense import convolutional_net, fully_convolutional
from ctxpred.features.extractor import FeatureExtractor
from ctxpred.features.forward import CaffeForward, OnnxForward, check_parity
from ctxpred.weights.surgery import net_weights

TARGET_DIMS = 9216
BACKENDS = ("caffe", "onnx")
CACHE_VERSION = 1


def pooling_geometry(channels, height, width, target_dims=TARGET_DIMS):
    """((kernel_h, kernel_w), (stride_h, stride_w), (out_h, out_w)): C x H x W pooled to ~target_dims.

    n = round(sqrt(target_dims / C)) cells per side (at most the side),
    stride max(1, side // n - 1), kernel side - (n - 1) * stride: the windows
    tile the map exactly, so Caffe's ceil rounding adds no cell.
    """
    cells = max(1, round((target_dims / channels) ** 0.5))
    kernel, stride, out = [], [], []
    for side in (height, width):
        count = min(cells, side)
        step = max(1, side // count - 1) if count > 1 else 1
        kernel.append(side - (count - 1) * step)
        stride.append(step)
        out.append(count)
    return tuple(kernel), tuple(stride), tuple(out)


def check_layers(net_param, layers, source):
    """Raise ValueError (one line) naming the first of ``layers`` no layer of the net writes."""
    available = list(dict.fromkeys(top for layer in net_param.layer if layer.type != "Input"
                                   for top in layer.top))
    for name in layers:
        if name not in available:
            raise ValueError(f"{source} has no layer {name!r}; its layers: {', '.join(available)}")


class LayerFeatureNet:
    """A deploy net at ``input_size`` pixels whose outputs are the pooled features of ``layers``.

    deploy, weights, train_param: as :class:`ctxpred.features.extractor.FeatureExtractor`
    (a training snapshot's BatchNorm is folded; weights are checked layer by
    layer). batch: images per forward pass. Attributes: ``net`` (pycaffe),
    ``param`` (its NetParameter: the fully convolutional net with one
    Pooling layer ``<layer>_pooled`` per layer appended), ``outputs``
    ({layer: pooled blob}), ``geometry`` ({layer: {"map_shape", "kernel",
    "stride", "dims"}}), ``ignored_layers``.
    """

    def __init__(self, deploy, weights, layers, input_size=227, batch=32, train_param=None):
        param = read_net_param(deploy)
        check_layers(param, layers, deploy)
        order = {top: index for index, layer in enumerate(param.layer) for top in layer.top}
        extractor = FeatureExtractor(deploy, weights, max(layers, key=order.get), batch=1,
                                     train_param=train_param)
        shapes = {name: blob.data.shape for name, blob in extractor.net.blobs.items()}
        fcn = fully_convolutional(extractor.param, shapes, input_size, input_size)
        if input_size < extractor.patch:  # a kernel may not fit: Caffe would abort, check aside
            weight_shapes_of(fcn, f"{deploy} at {input_size} pixels")
        maps = {name: blob.data.shape[1:] for name, blob in instantiate(fcn).blobs.items()}
        fc_blobs = {top for layer in extractor.param.layer if layer.type == "InnerProduct"
                    for top in layer.top}
        self.geometry, self.outputs = {}, {}
        for name in layers:
            channels, height, width = maps[name]
            kernel, stride, out = ((height, width), (1, 1), (1, 1)) if name in fc_blobs \
                else pooling_geometry(channels, height, width)
            self.geometry[name] = {"map_shape": (channels, height, width), "kernel": kernel,
                                   "stride": stride, "dims": channels * out[0] * out[1]}
            self.outputs[name] = _append_average_pool(fcn, name, kernel, stride)
        next(layer for layer in fcn.layer if layer.type == "Input").input_param.shape[0].dim[0] \
            = batch
        self.param = fcn
        self.net = convolutional_net(extractor, fcn)
        self.ignored_layers = extractor.ignored_layers
        self.input_size, self.batch = input_size, batch

    def weights(self):
        """{layer: [arrays]} of the net as built (fc weights in their convolution shapes)."""
        return net_weights(self.net)


def _append_average_pool(net_param, blob, kernel, stride):
    """Append an AVE Pooling layer reading ``blob`` to ``net_param``; returns its top's name."""
    layer = net_param.layer.add()
    layer.name = f"{blob}_pooled"
    layer.type = "Pooling"
    layer.bottom.append(blob)
    layer.top.append(layer.name)
    pool = layer.pooling_param
    pool.pool = pool.AVE
    pool.kernel_h, pool.kernel_w = kernel
    pool.stride_h, pool.stride_w = stride
    return layer.top[0]


def load_whole_images(paths, size, out):
    """Decode ``paths`` (upright RGB), each squashed to size x size, into ``out`` (n, size, size, 3).

    JPEGs are DCT-reduced while decoding to no fewer than 4 size^2 pixels.
    Raises ctxpred.data.images.ImageError (a ValueError) naming a bad file.
    """
    for row, path in enumerate(paths):
        out[row] = decode_squashed(Path(path).read_bytes(), str(path), size, size)
    return out[:len(paths)]


def _file_digest(path):
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def cache_keys(deploy, weights, image_ids, layers, input_size, bgr=False, train_param=None):
    """{layer: hex SHA-256 of everything that layer's features depend on} (module docstring)."""
    common = {"version": CACHE_VERSION, "deploy": _file_digest(deploy),
              "weights": _file_digest(weights), "input_size": int(input_size), "bgr": bool(bgr),
              "train_param": hashlib.sha256(str(train_param or "").encode()).hexdigest(),
              "images": hashlib.sha256("\n".join(image_ids).encode()).hexdigest()}
    return {layer: hashlib.sha256(json.dumps({**common, "layer": layer}, sort_keys=True)
                                  .encode()).hexdigest() for layer in layers}


def _is_cached(path, key, rows):
    """Whether ``path`` is a complete feature file of this key and ``rows`` images."""
    try:
        with h5py.File(path, "r") as file:
            return (file.attrs.get("cache_key") == key and file["features"].ndim == 2
                    and file["features"].shape[0] == rows and file["image"].shape == (rows,))
    except (OSError, KeyError):
        return False


def read_layer_features(path):
    """(image ids (N,) str array, features (N, D) float32) of one layer's feature file."""
    with h5py.File(path, "r") as file:
        ids = file["image"].asstr()[...]
        return np.asarray(ids, dtype=str), file["features"][...].astype(np.float32, copy=False)


def extract_layer_features(deploy, weights, image_paths, layers, out_dir, input_size=227,
                           batch=32, backend="caffe", progress=None, train_param=None,
                           bgr=False, threads=None):
    """{layer: path of its HDF5 feature file} for ``image_paths``, extracting only what is missing.

    deploy: a deploy prototxt (ours, prototxt/<net>/deploy.prototxt, or a
    user's); weights: its caffemodel / .h5; train_param: the training
    NetParameter of a BatchNorm snapshot (folded first), else None. layers:
    blob names (conv1..conv5, fc6, fc7, ...). backend: "caffe" (pycaffe, on
    the device load_caffe selected) or "onnx" (onnxruntime CPU with
    ``threads`` threads, checked against pycaffe on the first batch).
    progress: None or a callable taking the number of images just done
    (e.g. ``tqdm(...).update``). bgr: feed BGR (user CaffeNets) instead of
    our nets' RGB.

    Raises FileNotFoundError naming a missing image or file, and ValueError
    (one line) for an unknown layer, a bad image or a failed parity check;
    nothing is left under a final name then.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    image_ids = [str(path) for path in image_paths]
    if not image_ids:
        raise ValueError("no images to extract features of")
    missing_file = next((path for path in image_ids if not os.path.isfile(path)), None)
    if missing_file is not None:
        raise FileNotFoundError(f"image {missing_file} does not exist")
    keys = cache_keys(deploy, weights, image_ids, layers, input_size, bgr, train_param)
    out_dir = Path(out_dir)
    paths = {layer: out_dir / f"{layer}-{keys[layer][:16]}.h5" for layer in layers}
    todo = [layer for layer in layers if not _is_cached(paths[layer], keys[layer], len(image_ids))]
    if todo:
        net = LayerFeatureNet(deploy, weights, todo, input_size, batch, train_param)
        attrs = {"deploy": str(deploy), "weights": str(weights), "input_size": input_size,
                 "backend": backend, "channel_order": "BGR" if bgr else "RGB"}
        _write_layer_files(net, *_forwards(net, backend, bgr, threads), image_ids,
                           {layer: (paths[layer], keys[layer]) for layer in todo}, attrs,
                           progress)
    return paths


def _forwards(net, backend, bgr, threads):
    """(forward of ``net`` for ``backend``, the pycaffe forward to check it against, or None)."""
    caffe_forward = CaffeForward(net.net, list(net.outputs.values()), bgr)
    if backend == "caffe":
        return caffe_forward, None
    onnx_forward = OnnxForward(net.param, net.weights(), list(net.outputs.values()), bgr, threads)
    return onnx_forward, caffe_forward


def _write_layer_files(net, forward, reference, image_ids, targets, attrs, progress):
    """Run every image through ``forward`` once; write each layer of ``targets`` ({layer: (path,
    key)}) to ``path.part``, renamed to ``path`` when all are complete. ``reference``: None, or
    the forward that the first batch is checked against (:func:`check_parity`)."""
    out_dir = next(iter(targets.values()))[0].parent
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    try:
        for layer, (path, key) in targets.items():
            files[layer] = _open_layer_file(path, key, layer, net, image_ids, attrs)
        pixels = np.empty((net.batch, net.input_size, net.input_size, 3), np.uint8)
        for start in range(0, len(image_ids), net.batch):
            chunk = load_whole_images(image_ids[start:start + net.batch], net.input_size, pixels)
            if start == 0 and reference is not None:
                parity = check_parity(reference, forward, chunk)
                for file in files.values():
                    file.attrs["onnx_parity_max_relative"] = parity
            outputs = forward(chunk)
            for layer, file in files.items():
                file["features"][start:start + len(chunk)] = \
                    outputs[net.outputs[layer]].reshape(len(chunk), -1)
            if progress is not None:
                progress(len(chunk))
    except BaseException:
        for layer, file in files.items():
            file.close()
            _part(targets[layer][0]).unlink(missing_ok=True)
        raise
    for layer, file in files.items():
        file.close()
        os.replace(_part(targets[layer][0]), targets[layer][0])


def _part(path):
    return path.with_name(path.name + ".part")


def _open_layer_file(path, key, layer, net, image_ids, attrs):
    """The open ``path.part`` HDF5 file of one layer: datasets allocated, attributes written."""
    geometry = net.geometry[layer]
    file = h5py.File(_part(path), "w")
    file.create_dataset("features", (len(image_ids), geometry["dims"]), "f4")
    file.create_dataset("image", data=np.asarray(image_ids, dtype=object),
                        dtype=h5py.string_dtype("utf-8"))
    file.attrs.update({**attrs, "cache_key": key, "layer": layer,
                       "map_shape": geometry["map_shape"], "pool_kernel": geometry["kernel"],
                       "pool_stride": geometry["stride"]})
    return file
