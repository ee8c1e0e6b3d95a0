"""Features of 96x96 patches from a deploy net (fc6 or any blob), streamed to disk, and dense maps.

Input convention of the released networks (method.md, "Released networks"):
RGB, the per-channel means :data:`ctxpred.models.context.MEAN_RGB` subtracted, nothing
else. The deploy net scales each patch to root-mean-square 50 itself (and
projects it for the projection net), so features do not depend on the
patch's contrast: x and c * x (c > 0) give the same fc6. :func:`net_input`
applies the convention.

- :class:`FeatureExtractor`: a deploy net cut after the requested blob, with
  weights checked layer by layer in Python before any is copied (Caffe
  itself would abort the process on a shape mismatch);
  ``extract(patches)`` maps (N, 96, 96, 3) uint8 RGB to (N, D) float32.
- :func:`sampled_patches` / :func:`listed_patches` cut patches image by image
  (random, a non-overlapping grid, or the rows of a patch list) and
  :func:`stream_features` pushes them through the extractor in batches into
  a :class:`HDF5FeatureWriter` or :class:`NpyFeatureWriter`. Memory is flat
  in the number of images: one decoded image, one input batch and at most
  ``flush_rows`` unwritten feature rows are held at a time.

Dense maps over an H x W image: the features of every 96x96 window whose
top-left corner lies on a grid of step ``stride``, by default the product of
the convolution and pooling strides up to the blob, read from the prototxt
(:func:`net_stride`; 32 for fc6 of all three nets).

- :func:`dense_features` is exact by construction: each window goes through
  the deploy net on its own (in batches), normalised on its own.
- :class:`DenseFeatureNet` is Caffe's "net surgery": the fc layers become
  convolutions (fc6 on a 256x3x3 pool5 becomes a 3x3 convolution with 4096
  outputs, its weights reshaped) and one forward pass of the whole image
  gives the map, sharing all computation between overlapping windows. Its
  map is NOT the patch-wise feature of the windows, for three reasons that
  no rewriting of the net removes:

  1. the deploy net scales every window to RMS 50, and conv1..fc6 are not
     scale-equivariant (biases, LRN), so windows of different contrast share
     no activation beyond conv1's linear response; the dense net scales the
     image as a whole to RMS 50;
  2. every convolution zero-pads its input at the edge of a 96-pixel window
     (AlexNet-style: conv1 by 5 pixels, conv2 by 2 units, conv3-5 by 1; VGG:
     each by 1); in the dense net the same units see the neighbouring pixels;
  3. Caffe pools in ceil mode: pooling windows that overhang the edge of a
     96-pixel window are clipped patch-wise but take in neighbours densely.

  Reasons 2 and 3 hold without any normalisation: the fully-convolutional
  un-normalised tower equals the patch-wise forward of that tower only on a
  96x96 input. What is exact, and tested: on a 96x96 input the dense net is
  the deploy net; and the converted fc6 is the InnerProduct fc6 applied to
  the 3x3 pool5 block under each map position. Exact per-window features
  could share only conv1's linear part; conv1 is about 8% of the AlexNet
  tower's CPU time and 1% of VGG's (benchmarks/features.py prints both
  timings and the dense net's deviation), so :func:`dense_features` runs
  the windows patch-wise.
"""
from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ctxpred.caffe.env import import_caffe
from ctxpred.data.images import (DEFAULT_MAX_PIXELS, FileSource, ImageError, ImageSource, decode_rgb,
                            decode_rgb_within, no_usable_image)
from ctxpred.models.context import MEAN_RGB, PATCH
from ctxpred.data.preprocess import crop_patches
from ctxpred.weights.surgery import fold_batchnorm, net_param_shapes, read_net_param
from ctxpred.weights.files import read_weights

PATCH_MODES = ("random", "grid")


class WeightMismatchError(ValueError):
    """Weights that do not fit a deploy net; the message names every offending layer."""


# ---------------------------------------------------------------------------
# The deploy net


def read_deploy_param(path):
    """The NetParameter of a deploy prototxt (see ctxpred.weights.surgery.read_net_param).

    Raises ValueError naming the file when it has no Input layer, or when
    Caffe cannot build it (checked in a child process,
    :func:`ctxpred.weights.surgery.net_param_shapes`: building it here would abort).
    """
    param = read_net_param(path)
    if sum(layer.type == "Input" for layer in param.layer) != 1:
        raise ValueError(f"{path} needs exactly one Input layer (or input: header) "
                         "to be a feature net")
    net_param_shapes(param, path)
    return param


def truncated(param, blob):
    """Copy of NetParameter ``param`` keeping the layers up to the last one that writes ``blob``.

    In-place layers on ``blob`` (a ReLU after conv5, say) are kept, so the
    blob holds what it holds after the full net's forward pass. Raises
    ValueError listing the net's blobs when none is called ``blob``.
    """
    writers = [index for index, layer in enumerate(param.layer) if blob in layer.top]
    if not writers:
        blobs = list(dict.fromkeys(top for layer in param.layer for top in layer.top))
        raise ValueError(f"the deploy net has no blob {blob!r}; its blobs: {', '.join(blobs)}")
    cut = type(param)()
    cut.CopyFrom(param)
    del cut.layer[writers[-1] + 1:]
    return cut


def instantiate(param):
    """A TEST-phase pycaffe Net of NetParameter ``param`` (parameters from its fillers)."""
    caffe = import_caffe()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "net.prototxt")
        with open(path, "w", encoding="utf-8") as file:
            file.write(str(param))
        return caffe.Net(path, caffe.TEST)


def _layer_strides(layer):
    """(stride_h, stride_w) of a Convolution or Pooling layer; (1, 1) for other layers."""
    if layer.type == "Convolution":
        conv = layer.convolution_param
        both = conv.stride[0] if len(conv.stride) else 1
        return (conv.stride_h or both, conv.stride_w or both)
    if layer.type == "Pooling":
        pool = layer.pooling_param
        return (pool.stride_h or pool.stride, pool.stride_w or pool.stride)
    return (1, 1)


def net_stride(param):
    """Pixels between neighbouring units of the last blob of ``param``: the product of strides.

    Raises ValueError for different strides along y and x.
    """
    stride_h = stride_w = 1
    for layer in param.layer:
        step_h, step_w = _layer_strides(layer)
        stride_h, stride_w = stride_h * step_h, stride_w * step_w
    if stride_h != stride_w:
        raise ValueError(f"the net's stride differs along y ({stride_h}) and x ({stride_w})")
    return stride_h


def _shapes(arrays):
    return " + ".join(str(tuple(array.shape)) for array in arrays)


def fit_weights(net, param, weights, source, target, reshaped=frozenset()):
    """Copy ``weights`` into ``net`` after checking every parameter layer against them.

    net: pycaffe Net of NetParameter ``param``, computing blob ``target``.
    weights: {layer: [arrays]} (:func:`ctxpred.weights.files.read_weights`);
    source: how to name them in messages. reshaped: layers whose arrays may
    take the net's shape when the sizes agree (fc layers made convolutions).

    Raises :class:`WeightMismatchError` naming every layer the net needs but
    the weights lack, and every layer whose blob shapes differ (both shapes).
    Returns the names of weight layers the net does not use, in file order.
    """
    missing = [name for name in net.params if name not in weights]
    problems = []
    for name, blobs in net.params.items():
        arrays = weights.get(name)
        if arrays is None:
            continue
        fits = len(arrays) == len(blobs) and all(
            array.shape == blob.data.shape
            or (name in reshaped and array.size == blob.data.size)
            for array, blob in zip(arrays, blobs))
        if not fits:
            problems.append(f"  {name}: the deploy net has {_shapes([b.data for b in blobs])}, "
                            f"the weights {_shapes(arrays)}")
    if missing:
        first = next(layer for layer in param.layer if layer.name == missing[0])
        hint = (f"; take a blob computed before {missing[0]}, such as {first.bottom[0]!r}"
                if len(first.bottom) else "")
        problems.insert(0, (
            f"  {source} holds no weights for {', '.join(missing)}, which the deploy net needs "
            f"to compute {target!r}: {target!r} is not available from these weights{hint}"))
    if problems:
        raise WeightMismatchError(f"{source} does not fit the deploy net:\n" + "\n".join(problems))
    for name, blobs in net.params.items():
        for blob, array in zip(blobs, weights[name]):
            blob.data[...] = array.reshape(blob.data.shape)
    return [name for name in weights if name not in net.params]


def net_input(patches, out=None):
    """The released nets' input: (N, p, p, 3) uint8 RGB -> (N, 3, p, p) float32 RGB - MEAN_RGB.

    Written into ``out`` (e.g. a net's input blob) when given.
    """
    mean = np.asarray(MEAN_RGB, dtype=np.float32).reshape(1, 3, 1, 1)
    return np.subtract(patches.transpose(0, 3, 1, 2), mean, out=out, dtype=np.float32)


class FeatureExtractor:
    """A deploy net computing blob ``layer`` of 96x96 patches, with checked weights.

    deploy: path of a deploy prototxt (input ``1 x 3 x p x p``, mean-subtracted
    RGB; normally the project's prototxt/<net>/deploy.prototxt). weights: a
    .caffemodel / .h5 path, or {layer: [arrays]}. layer: any blob of the net
    (fc6 by default; the net is cut after it, so later layers need no
    weights). batch: patches per ``net.forward``. train_param: the
    NetParameter of the training net the weights come from (e.g.
    :func:`ctxpred.models.context.train_net`); its BatchNorm layers held by the weights
    are folded into the layers before them (:func:`ctxpred.weights.surgery.fold_batchnorm`),
    so a training snapshot gives the features of its TEST phase. When a
    BatchNorm layer has no statistics (scale factor 0: a fresh
    initialisation) none is folded and all are ignored, as are all BatchNorm
    layers without ``train_param``.

    Attributes: ``net`` (pycaffe Net, run on the device selected with
    ctxpred.caffe.env.load_caffe), ``param`` (its NetParameter), ``patch``
    (p, pixels), ``feature_shape`` (the blob's shape per patch, e.g. (4096,)
    or (256, 3, 3)), ``dim`` (its size D), ``stride`` (:func:`net_stride`
    of the blob, pixels), ``ignored_layers`` (weight layers the net does not
    use, e.g. the pair head of a training snapshot).

    Raises FileNotFoundError / ValueError for a missing or malformed
    prototxt or weight file, and :class:`WeightMismatchError` when the
    weights do not fit.
    """

    def __init__(self, deploy, weights, layer="fc6", batch=64, train_param=None):
        if batch < 1:
            raise ValueError(f"batch must be positive, got {batch}")
        self.layer = layer
        self.batch = batch
        self.param = truncated(read_deploy_param(deploy), layer)
        source = "the given weights" if isinstance(weights, dict) else str(weights)
        weights = weights if isinstance(weights, dict) else read_weights(weights)
        unfolded = []
        batchnorms = set() if train_param is None else {
            layer.name for layer in train_param.layer if layer.type == "BatchNorm"}
        present = sorted(batchnorms.intersection(weights))
        if any(weights[name][2].size == 1 and weights[name][2].item() == 0 for name in present):
            unfolded = present
            weights = {name: arrays for name, arrays in weights.items() if name not in unfolded}
        elif present:
            weights = fold_batchnorm(weights, train_param)
        self.net = instantiate(self.param)
        self.ignored_layers = unfolded + fit_weights(self.net, self.param, weights, source, layer)
        self._input = self.net.inputs[0]
        _, channels, height, width = self.net.blobs[self._input].data.shape
        if channels != 3 or height != width:
            raise ValueError(f"the deploy net's input is {channels} x {height} x {width}; "
                             "expected 3 x p x p (RGB patches)")
        self.patch = height
        self.feature_shape = tuple(self.net.blobs[layer].data.shape[1:])
        self.dim = int(np.prod(self.feature_shape))
        self.stride = net_stride(self.param)

    def extract(self, patches):
        """(N, p, p, 3) uint8 RGB -> (N, D) float32: the blob of each patch, flattened C, H, W."""
        patches = np.asarray(patches)
        n = len(patches)
        if patches.shape != (n, self.patch, self.patch, 3) or patches.dtype != np.uint8:
            raise ValueError(f"patches must be uint8 (N, {self.patch}, {self.patch}, 3), "
                             f"got {patches.dtype} {patches.shape}")
        features = np.empty((n, self.dim), dtype=np.float32)
        blob = self.net.blobs[self._input]
        for start in range(0, n, self.batch):
            chunk = patches[start:start + self.batch]
            if blob.data.shape[0] != len(chunk):
                blob.reshape(len(chunk), 3, self.patch, self.patch)
            net_input(chunk, out=blob.data)
            self.net.forward()
            features[start:start + len(chunk)] = self.net.blobs[self.layer].data.reshape(
                len(chunk), -1)
        return features


# ---------------------------------------------------------------------------
# Patches, image by image


@dataclass(frozen=True)
class ImagePatches:
    """The patches of one image.

    name: the image's path (or ``lmdb:KEY``). patches: (K, p, p, 3) uint8
    RGB. boxes: (K, 4) int64 x, y, w, h in pixels of the image they were cut
    from. scale: that image's width over the decoded image's width (1.0
    unless ``max_pixels`` shrank it). skipped: why the image gave no patch (it
    could not be read or decoded, or is smaller than a patch), else None.
    """

    name: str
    patches: np.ndarray
    boxes: np.ndarray
    scale: float = 1.0
    skipped: str | None = None


def _skipped(name, reason, patch):
    return ImagePatches(name, np.empty((0, patch, patch, 3), np.uint8),
                        np.empty((0, 4), np.int64), skipped=reason)


def _cut(name, image, corners, scale, patch):
    """ImagePatches of (K, 2) (y, x) top-left ``corners`` in ``image``."""
    corners = np.asarray(corners, dtype=np.int64).reshape(-1, 2)
    boxes = np.column_stack([corners[:, 1], corners[:, 0],
                             np.full(len(corners), patch), np.full(len(corners), patch)])
    return ImagePatches(name, crop_patches(image, corners, patch), boxes.astype(np.int64), scale)


def random_corners(height, width, count, rng, patch=PATCH):
    """(count, 2) int64 (y, x) top-left corners, uniform over all patch positions in the image."""
    return np.column_stack([rng.integers(0, height - patch, size=count, endpoint=True),
                            rng.integers(0, width - patch, size=count, endpoint=True)])


def grid_corners(height, width, step=PATCH, patch=PATCH):
    """(K, 2) int64 (y, x) corners of a grid from (0, 0) with ``step`` pixels, raster order.

    Every patch lies inside the image: floor((H - patch) / step) + 1 rows,
    likewise columns (none when the image is smaller than a patch). With
    step = patch the patches tile the image without overlap.
    """
    rows = np.arange(0, height - patch + 1, step)
    cols = np.arange(0, width - patch + 1, step)
    ys, xs = np.meshgrid(rows, cols, indexing="ij")
    return np.stack([ys.ravel(), xs.ravel()], axis=1).astype(np.int64)


def sampled_patches(source: ImageSource, mode, per_image=16, seed=0,
                    max_pixels=DEFAULT_MAX_PIXELS, patch=PATCH,
                    step=None) -> Iterator[ImagePatches]:
    """One :class:`ImagePatches` per image of ``source``, in order, decoded one at a time.

    mode "random": ``per_image`` patches at uniform positions (with
    repetition), drawn from ``np.random.default_rng([seed, index])``, so an
    image's patches depend only on the seed and its index. mode "grid": the
    grid of :func:`grid_corners` with ``step`` pixels (default: the patch
    side, patches without overlap). Images are decoded upright and within
    ``max_pixels`` (:func:`ctxpred.data.images.decode_rgb_within`; None: full
    size). Unusable images, and images smaller than a patch at their full
    size, yield an ImagePatches without patches whose ``skipped`` says why;
    when no image was usable, ValueError naming the source follows.
    """
    if mode not in PATCH_MODES:
        raise ValueError(f"mode must be one of {PATCH_MODES}, got {mode!r}")
    skipped = {}
    for index in range(len(source)):
        name = source.name(index)
        try:
            image, scale = decode_rgb_within(source.read_bytes(index), name, max_pixels,
                                             min_side=patch)
        except ImageError as error:
            skipped[name] = error.reason
            yield _skipped(name, error.reason, patch)
            continue
        height, width = image.shape[:2]
        if height < patch or width < patch:
            skipped[name] = f"{width}x{height} pixels is smaller than a {patch}-pixel patch"
            yield _skipped(name, skipped[name], patch)
            continue
        if mode == "random":
            corners = random_corners(height, width, per_image,
                                     np.random.default_rng([seed, index]), patch)
        else:
            corners = grid_corners(height, width, step or patch, patch)
        yield _cut(name, image, corners, scale, patch)
    if len(skipped) == len(source):
        raise no_usable_image(source, skipped)


@dataclass(frozen=True)
class PatchRun:
    """Consecutive rows of patch list ``listing`` on one image.

    path: the image; corners: (K, 2) int64 (y, x); lines: the rows' line numbers.
    """

    listing: str
    path: str
    corners: np.ndarray
    lines: tuple[int, ...]


_INTEGER = re.compile(r"[+-]?\d+")


def read_patch_list(path, root=None):
    """The rows of a patch list, ``image_path x y`` each, grouped into :class:`PatchRun` s.

    Fields are separated by commas (CSV) or whitespace; the path is all but
    the last two fields, so it may hold spaces (not commas, in CSV). x, y:
    top-left corner in pixels of the image as decoded. Blank lines and lines
    starting with '#' are skipped; so is a first line whose x and y are not
    integers (a CSV header). Relative paths are taken from ``root``
    (default: the list's folder). Runs keep the file's order; consecutive
    rows on the same image form one run, so the image is decoded once.

    Raises FileNotFoundError, or ValueError naming the line of a bad row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"patch list {path} does not exist")
    root = Path(root) if root is not None else path.parent
    runs, rows, first_row = [], [], True
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "," in line:
                fields = [part.strip() for part in line.rsplit(",", 2)]
            else:
                fields = line.rsplit(None, 2)
            is_row = len(fields) == 3 and all(_INTEGER.fullmatch(f) for f in fields[1:])
            if not is_row and first_row:
                first_row = False
                continue
            first_row = False
            if not is_row:
                raise ValueError(f"{path}, line {number}: expected 'image_path x y' with integer "
                                 f"x and y, got {line!r}")
            rows.append((str(root / fields[0]), int(fields[2]), int(fields[1]), number))
    for row in rows:
        if runs and runs[-1][0] == row[0]:
            runs[-1][1].append(row)
        else:
            runs.append((row[0], [row]))
    return [PatchRun(str(path), image,
                     np.array([[y, x] for _, y, x, _ in group], dtype=np.int64),
                     tuple(number for *_, number in group)) for image, group in runs]


def listed_patches(runs, patch=PATCH) -> Iterator[ImagePatches]:
    """One :class:`ImagePatches` per :class:`PatchRun` of :func:`read_patch_list`; full size.

    Unreadable images yield ``skipped``; a row whose patch leaves its image
    raises ValueError naming the list, the line and the image size.
    """
    source = FileSource([run.path for run in runs], [None] * len(runs), "patch list")
    for index, run in enumerate(runs):
        try:
            image = decode_rgb(source.read_bytes(index), run.path)
        except ImageError as error:
            yield _skipped(run.path, error.reason, patch)
            continue
        height, width = image.shape[:2]
        outside = ((run.corners < 0) | (run.corners > [height - patch, width - patch])).any(axis=1)
        if outside.any():
            bad = int(np.flatnonzero(outside)[0])
            y, x = run.corners[bad]
            raise ValueError(f"{run.listing}, line {run.lines[bad]}: a {patch}-pixel patch at "
                             f"x={x}, y={y} leaves {run.path} ({width}x{height} pixels)")
        yield _cut(run.path, image, run.corners, 1.0, patch)


# ---------------------------------------------------------------------------
# Writers


class _FeatureFile:
    """Shared by the writers: a '.part' file renamed to ``path`` on success, and a row buffer.

    Use as a context manager; leaving it by an exception deletes the partial
    file. Subclasses open ``self._file`` (closed on exit) and write rows in
    ``_write``; ``_finalise`` runs before a successful close.
    """

    def __init__(self, path, dim, flush_rows):
        self.path = Path(path)
        self.dim = dim
        self.rows = 0
        self.flush_rows = flush_rows
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.path.with_name(self.path.name + ".part")
        self._pending = []
        self._pending_rows = 0

    def append(self, features, images, boxes, scales):
        """Add rows: features (n, D) float32, images n names, boxes (n, 4) int, scales (n,)."""
        self._pending.append((features, list(images), boxes, scales))
        self._pending_rows += len(features)
        self.rows += len(features)
        if self._pending_rows >= self.flush_rows:
            self._flush()

    def _flush(self):
        if self._pending:
            features, images, boxes, scales = zip(*self._pending)
            self._pending, self._pending_rows = [], 0
            self._write(np.concatenate(features), [name for chunk in images for name in chunk],
                        np.concatenate(boxes), np.concatenate(scales))

    def _finalise(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if kind is None:
            self._flush()
            self._finalise()
        self._file.close()
        if kind is None:
            os.replace(self._partial, self.path)
        else:
            self._partial.unlink(missing_ok=True)


class HDF5FeatureWriter(_FeatureFile):
    """HDF5 output, datasets grown as rows arrive (chunked, unlimited first axis).

    features (rows, D) float32; image (rows,) UTF-8 path of each row's image;
    box (rows, 4) int64 x, y, w, h in pixels of the image the patch was cut
    from; scale (rows,) float32, that image's width over the decoded image's
    width (box / scale is in decoded pixels). ``attrs`` become file attributes.
    """

    def __init__(self, path, dim, attrs=None, flush_rows=256):
        super().__init__(path, dim, flush_rows)
        self._file = h5py.File(self._partial, "w")
        self._datasets = {
            "features": self._file.create_dataset(
                "features", (0, dim), "f4", maxshape=(None, dim),
                chunks=(max(1, min(1024, (1 << 20) // (4 * dim))), dim)),
            "image": self._file.create_dataset("image", (0,), h5py.string_dtype("utf-8"),
                                               maxshape=(None,), chunks=(1024,)),
            "box": self._file.create_dataset("box", (0, 4), "i8", maxshape=(None, 4),
                                             chunks=(1024, 4)),
            "scale": self._file.create_dataset("scale", (0,), "f4", maxshape=(None,),
                                               chunks=(1024,)),
        }
        for key, value in (attrs or {}).items():
            self._file.attrs[key] = value

    def _write(self, features, images, boxes, scales):
        start = self._datasets["features"].shape[0]
        for name, values in (("features", features), ("image", np.asarray(images, object)),
                             ("box", boxes), ("scale", scales)):
            dataset = self._datasets[name]
            dataset.resize(start + len(features), axis=0)
            dataset[start:] = values


class NpyFeatureWriter(_FeatureFile):
    """A .npy file of the features only, (rows, D) float32: no image names, boxes or attributes.

    Rows are appended to the file as they come; the header, written first
    for 0 rows, is rewritten with the final count at the end (numpy pads
    .npy headers so that the row count can grow in place).
    """

    def __init__(self, path, dim, flush_rows=256):
        super().__init__(path, dim, flush_rows)
        self._file = open(self._partial, "wb")
        self._header_size = self._write_header(0)

    def _write_header(self, rows):
        np.lib.format.write_array_header_1_0(
            self._file, {"descr": "<f4", "fortran_order": False, "shape": (rows, self.dim)})
        return self._file.tell()

    def _write(self, features, images, boxes, scales):
        self._file.write(np.ascontiguousarray(features, dtype="<f4").tobytes())

    def _finalise(self):
        self._file.seek(0)
        if self._write_header(self.rows) != self._header_size:
            raise RuntimeError("the .npy header changed size; the file is corrupt")


def open_feature_writer(path, dim, attrs=None, flush_rows=256):
    """:class:`NpyFeatureWriter` for a path ending in .npy, else :class:`HDF5FeatureWriter`."""
    if Path(path).suffix == ".npy":
        return NpyFeatureWriter(path, dim, flush_rows)
    return HDF5FeatureWriter(path, dim, attrs, flush_rows)


# ---------------------------------------------------------------------------
# Streaming


@dataclass
class ExtractionSummary:
    """What :func:`stream_features` did: rows written, images used, skipped images (name -> why)."""

    rows: int = 0
    images: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


def stream_features(extractor: FeatureExtractor, items: Iterable[ImagePatches],
                    writer: _FeatureFile) -> ExtractionSummary:
    """Features of every patch of ``items``, written in order to ``writer`` batch by batch.

    Patches of consecutive images share batches of ``extractor.batch``;
    only one batch of patches is held at a time (plus the current image).
    """
    summary = ExtractionSummary()
    patch = extractor.patch
    batch = np.empty((extractor.batch, patch, patch, 3), dtype=np.uint8)
    pending = []  # (item, first row, end row) of the patches in ``batch``, in order
    filled = 0

    def flush():
        features = extractor.extract(batch[:filled])
        names = [item.name for item, start, end in pending for _ in range(end - start)]
        boxes = np.concatenate([item.boxes[start:end] for item, start, end in pending])
        scales = np.concatenate([np.full(end - start, item.scale, np.float32)
                                 for item, start, end in pending])
        writer.append(features, names, boxes, scales)
        summary.rows += len(features)

    for item in items:
        if item.skipped is not None:
            summary.skipped[item.name] = item.skipped
            continue
        summary.images += 1
        start = 0
        while start < len(item.patches):
            end = min(len(item.patches), start + len(batch) - filled)
            batch[filled:filled + end - start] = item.patches[start:end]
            pending.append((item, start, end))
            filled += end - start
            start = end
            if filled == len(batch):
                flush()
                pending, filled = [], 0
    if filled:
        flush()
    return summary


# ---------------------------------------------------------------------------
# Dense maps


def dense_features(extractor: FeatureExtractor, image, stride=None):
    """Exact features of every p x p window of ``image`` on a grid, patch-wise in batches.

    image: (H, W, 3) uint8 RGB. stride: grid step in pixels (default
    ``extractor.stride``, the blob's own stride). Returns (rows, cols, D)
    float32; [r, c] is the window with top-left pixel (y, x) = (stride * r,
    stride * c), rows = (H - p) // stride + 1, likewise cols.
    """
    stride = stride or extractor.stride
    height, width = image.shape[:2]
    if height < extractor.patch or width < extractor.patch:
        raise ValueError(f"a {width}x{height} image holds no {extractor.patch}-pixel window")
    corners = grid_corners(height, width, stride, extractor.patch)
    rows = len(range(0, height - extractor.patch + 1, stride))
    features = np.empty((len(corners), extractor.dim), dtype=np.float32)
    for start in range(0, len(corners), extractor.batch):
        chunk = corners[start:start + extractor.batch]
        features[start:start + len(chunk)] = extractor.extract(
            crop_patches(image, chunk, extractor.patch))
    return features.reshape(rows, -1, extractor.dim)


def fully_convolutional(param, blob_shapes, height, width):
    """NetParameter of deploy net ``param`` for one H x W input, fc layers as convolutions.

    blob_shapes: {blob: shape} of ``param`` instantiated at its own p x p
    input (an InnerProduct on a C x k x k blob becomes a k x k convolution;
    on a C-vector, a 1 x 1 one). The in-net RMS normalisation (Reduction
    SUMSQ over the whole sample, then Power) is kept with the Power scale
    multiplied by p^2 / (H W): it scales the whole image to RMS 50, as the
    deploy net scales a patch, and is unchanged for H = W = p.

    Raises ValueError for a layer this cannot convert (any other Reduction,
    a transposed or not-axis-1 InnerProduct).
    """
    fcn = type(param)()
    fcn.CopyFrom(param)
    fcn.name = f"{param.name}_fully_convolutional"
    input_layer = next(layer for layer in fcn.layer if layer.type == "Input")
    dims = input_layer.input_param.shape[0].dim
    patch_pixels = dims[2] * dims[3]
    dims[:] = [1, dims[1], height, width]
    reductions = {}
    for layer in fcn.layer:
        if layer.type == "Reduction":
            reduction = layer.reduction_param
            if reduction.operation != reduction.SUMSQ or reduction.axis != 1:
                raise ValueError(f"layer {layer.name}: only a SUMSQ Reduction over the whole "
                                 "sample (the RMS normalisation) can be made fully convolutional")
            reductions[layer.top[0]] = layer.name
        elif layer.type == "Power" and layer.bottom[0] in reductions:
            layer.power_param.scale *= patch_pixels / (height * width)
        elif layer.type == "InnerProduct":
            fc = layer.inner_product_param
            if fc.transpose or fc.axis != 1:
                raise ValueError(f"layer {layer.name}: only InnerProduct with axis 1 and no "
                                 "transpose converts to a convolution")
            shape = blob_shapes[layer.bottom[0]]
            kernel_h, kernel_w = (shape[2], shape[3]) if len(shape) == 4 else (1, 1)
            conv = layer.convolution_param
            conv.num_output = fc.num_output
            conv.bias_term = fc.bias_term
            conv.kernel_h, conv.kernel_w = kernel_h, kernel_w
            conv.weight_filler.CopyFrom(fc.weight_filler)
            conv.bias_filler.CopyFrom(fc.bias_filler)
            layer.type = "Convolution"
            layer.ClearField("inner_product_param")
    return fcn


class DenseFeatureNet:
    """The extractor's net made fully convolutional for H x W images (Caffe "net surgery").

    One forward pass gives the map of every window on the grid of step
    ``stride`` (the blob's stride, :func:`net_stride`); map position [r, c]
    is the window with top-left pixel (stride * r, stride * c). Approximate:
    the image is normalised as a whole and the windows' zero padding is
    replaced by their surroundings (see the module docstring); exact only
    for a p x p image. Weights are the extractor's, fc weights reshaped.
    The input convention is the extractor's (:func:`net_input`).
    """

    def __init__(self, extractor: FeatureExtractor, height, width):
        if height < extractor.patch or width < extractor.patch:
            raise ValueError(f"a {height}x{width} image is smaller than a {extractor.patch}-pixel "
                             "window")
        self.patch = extractor.patch
        self.stride = extractor.stride
        self.height, self.width = height, width
        self._blob = extractor.layer
        shapes = {name: blob.data.shape for name, blob in extractor.net.blobs.items()}
        # The blob's spatial extent for one window: the block of the map that is its feature.
        shape = shapes[self._blob]
        self._block = (shape[2], shape[3]) if len(shape) == 4 else (1, 1)
        self.param = fully_convolutional(extractor.param, shapes, height, width)
        self.net = instantiate(self.param)
        converted = {layer.name for layer in extractor.param.layer if layer.type == "InnerProduct"}
        weights = {name: [blob.data for blob in blobs]
                   for name, blobs in extractor.net.params.items()}
        fit_weights(self.net, self.param, weights, "the extractor's weights", self._blob, converted)
        self.rows = (height - self.patch) // self.stride + 1
        self.cols = (width - self.patch) // self.stride + 1

    def forward(self, image):
        """(H, W, 3) uint8 RGB image -> (rows, cols, D) float32 map (D as the extractor's)."""
        if image.shape != (self.height, self.width, 3):
            raise ValueError(f"this net takes ({self.height}, {self.width}, 3) images, "
                             f"got {image.shape}")
        net_input(image[np.newaxis], out=self.net.blobs[self.net.inputs[0]].data)
        self.net.forward()
        feature_map = self.net.blobs[self._blob].data[0]  # (C, Hm, Wm)
        block_h, block_w = self._block
        blocks = sliding_window_view(feature_map, (block_h, block_w), axis=(1, 2))
        if blocks.shape[1] < self.rows or blocks.shape[2] < self.cols:
            raise RuntimeError(f"the {self._blob} map {feature_map.shape} is too small for "
                               f"{self.rows} x {self.cols} windows")
        blocks = blocks[:, :self.rows, :self.cols]  # (C, rows, cols, block_h, block_w)
        return np.ascontiguousarray(blocks.transpose(1, 2, 0, 3, 4)).reshape(
            self.rows, self.cols, -1)
