"""Data-dependent initialisation ("magic init") of a pycaffe Net.

Kraehenbuehl, Doersch, Donahue & Darrell, "Data-dependent Initializations of
Convolutional Neural Networks", ICLR 2016: the project page's step between
the "no fc6" context model and Fast R-CNN fine-tuning.

Two parts, on any Net made of the supported layer types (:data:`PARAMETER_TYPES`,
:data:`PASSIVE_TYPES`, :data:`INPUT_TYPES`; Caffe's own Split layers too):

- Within-layer initialisation (:meth:`NetUnderInit.initialize`). In network
  order, every parameter layer whose weights are all zero (sum |W| <= 1e-10)
  gets weights W from a basis (i.i.d. N(0, 1), or PCA / ZCA whitening filters,
  k-means centres or random patches of its whitened input patches), then the
  batches are forwarded and, with mu and sigma the mean and std of each output
  channel's pre-activation over batch and space, W <- W / sigma and
  b <- -mu / sigma + bias: on the data, every pre-activation channel has mean
  ``bias`` and std 1. Layers with weights (loaded or from a filler) are kept.
- Between-layer calibration (:meth:`NetUnderInit.calibrate`): rescale whole
  layers so that under SGD their weights change at the same relative rate,
  r_k = sqrt(mean(dW_k^2) / mean(W_k^2)), for N(0, 1) diffs backpropagated
  from the last layer.

:func:`analysis_net` turns a prototxt's NetParameter into the net these work
on (TRAIN-phase layers; Softmax, loss and Accuracy layers left out; Dropout
active as in Caffe's TRAIN phase, as the reference runs it, or left out;
``force_backward``; optionally the input replaced by an Input layer fed with
images from :func:`image_batches`). Layer names are kept, so the weights load
by name into the original net.

Units: blobs are float32 in the net's own units; with images, the input is
BGR pixel values in [0, 255] minus :data:`MEAN_BGR`, times a scale.
"""
import math
import os
from dataclasses import dataclass

import numpy as np
import scipy.sparse

from ctxpred.caffe.geometry import Window, layer_window
from ctxpred.caffe.netparam import instantiate, phase_layers, weight_shapes_of
from ctxpred.data.images import ImageError, decode_squashed, open_source
from ctxpred.weights.files import read_weights
from ctxpred.weights.surgery import load_weights, net_weights

BASES = ("elwise", "pca", "zca", "kmeans", "rand")
FAST_PREFIX = "fast_"
TYPES = BASES + tuple(FAST_PREFIX + basis for basis in BASES[1:])
PARAMETER_TYPES = ("Convolution", "InnerProduct", "Deconvolution")
PASSIVE_TYPES = ("ReLU", "Sigmoid", "LRN", "Pooling", "Eltwise")
INPUT_TYPES = ("Data", "ImageData", "Input")
CAFFE_INSERTED_TYPES = ("Split",)  # Caffe adds these for blobs read by several layers
STRIPPED_TYPES = ("Softmax", "Accuracy")  # and every type ending in "Loss"
DROPOUT_MODES = ("train", "identity")  # Dropout active as in Caffe's TRAIN phase / left out
MEAN_BGR = (104.0, 117.0, 123.0)
DEFAULT_SIDE = 227
ZERO_TOLERANCE = 1e-10
MAX_ROUNDS = 10
ROUND_TOLERANCE = 0.01
DRIFT_LIMIT = 0.25  # |log| of the output std's change per round that triggers a warning
KMEANS_ITERATIONS = 10
_RANK_TOLERANCE = 1e-6  # eigenvalues below this fraction of the largest are dropped
_WHITENING_EPS = 1e-5  # added to the eigenvalues, as a fraction of the largest
_FLOAT_BYTES = 4
_MB = 1 << 20


def mean_square(array, chunk=1 << 16):
    """mean(array ** 2): float32 dot products of ``chunk`` elements summed in float64.

    No full-size temporary (fc6's weights are 38M floats); relative error about
    1e-6 for float32 input.
    """
    flat = array.reshape(-1)
    total = 0.0
    for begin in range(0, flat.size, chunk):
        part = flat[begin:begin + chunk]
        total += float(np.dot(part, part))
    return total / flat.size if flat.size else 0.0


class MagicInitError(ValueError):
    """A net, layer or input magic init cannot work with; the message says which and why."""


def _is_stripped(layer_type):
    return layer_type in STRIPPED_TYPES or layer_type.endswith("Loss")


def input_size(net_param):
    """(height, width) that images are resized to for ``net_param``'s input.

    From the first TRAIN-phase input layer: an Input layer's shape, a Data
    layer's crop_size, an ImageData layer's crop_size or new_height /
    new_width; else :data:`DEFAULT_SIDE` square. Raises MagicInitError when
    the net has no input layer or its input is not 4-D with 3 channels.
    """
    inputs = [layer for layer in phase_layers(net_param, "train") if layer.type in INPUT_TYPES]
    if not inputs:
        raise MagicInitError(f"the net has no input layer ({', '.join(INPUT_TYPES)})")
    layer = inputs[0]
    if layer.type == "Input":
        dims = list(layer.input_param.shape[0].dim) if layer.input_param.shape else []
        if len(dims) != 4 or dims[1] != 3:
            raise MagicInitError(f"input layer {layer.name} has shape {dims}: images need "
                                 "N x 3 x H x W")
        return dims[2], dims[3]
    if layer.transform_param.crop_size:
        return (layer.transform_param.crop_size,) * 2
    image_param = layer.image_data_param
    if layer.type == "ImageData" and image_param.new_height and image_param.new_width:
        return image_param.new_height, image_param.new_width
    return DEFAULT_SIDE, DEFAULT_SIDE


def analysis_net(net_param, input_shape=None, dropout="train"):
    """The NetParameter magic init works on, and notes on what changed.

    Keeps the TRAIN-phase layers (phase rules only), leaves out Softmax,
    Accuracy and loss layers (they have no weights), sets ``force_backward``.
    ``dropout`` (one of :data:`DROPOUT_MODES`): "train" keeps Dropout layers,
    which Caffe runs as in its TRAIN phase, a new random mask per forward
    pass (what the reference does, since it builds the whole net in the
    TRAIN phase); "identity" leaves them out, so that the analysis sees them
    as at test time. A note says which, per Dropout layer.

    With ``input_shape`` (N, 3, H, W) the first input
    layer becomes an Input layer of that shape with its first top (other tops,
    such as labels, are dropped); without it the net keeps its Data /
    ImageData layers, and an Input layer is an error (nothing would feed it).

    Returns (NetParameter, [note strings]). Raises MagicInitError for an
    unknown ``dropout`` mode, and naming the layer for BatchNorm (fold it
    first with tools/debatchnorm.py) and other unsupported types, input
    layers after computing layers, more than one input with ``input_shape``,
    a blob read but no longer produced, and a net without parameter layers.
    """
    if dropout not in DROPOUT_MODES:
        raise MagicInitError(f"unknown Dropout mode {dropout!r} (one of "
                             f"{', '.join(DROPOUT_MODES)})")
    analysis = type(net_param)()
    analysis.CopyFrom(net_param)
    del analysis.layer[:]
    analysis.force_backward = True
    notes, renamed, produced = [], {}, set()
    for original in phase_layers(net_param, "train"):
        layer = _analysis_layer(original, renamed, dropout, notes)
        if layer is None:
            continue
        if layer.type in INPUT_TYPES:
            layer = _analysis_input(layer, analysis, input_shape)
        missing = [name for name in layer.bottom if name not in produced]
        if missing:
            raise MagicInitError(f"layer {layer.name} reads {', '.join(missing)}, which no "
                                 "layer before it produces in the analysis net")
        produced.update(layer.top)
        analysis.layer.append(layer)
    if not any(layer.type in PARAMETER_TYPES for layer in analysis.layer):
        raise MagicInitError("the net has no parameter layer (Convolution, InnerProduct, "
                             "Deconvolution): nothing to initialise")
    if not any(layer.type in INPUT_TYPES for layer in analysis.layer):
        raise MagicInitError(f"the net has no input layer ({', '.join(INPUT_TYPES)})")
    return analysis, notes


def _analysis_layer(original, renamed, dropout, notes):
    """A copy of ``original`` for the analysis net without phase rules, or None to leave it out.

    Left-out layers (no weights; Dropout in "identity" mode) get a note;
    ``renamed`` maps a dropped Dropout's top to its bottom for later layers.
    """
    layer = type(original)()
    layer.CopyFrom(original)
    layer.ClearField("include")
    layer.ClearField("exclude")
    layer.bottom[:] = [renamed.get(name, name) for name in layer.bottom]
    if _is_stripped(layer.type):
        notes.append(f"left out {layer.type} layer {layer.name} (no weights)")
        return None
    if layer.type == "Dropout":
        if dropout == "identity":
            renamed[layer.top[0]] = layer.bottom[0]
            notes.append(f"note: Dropout layer {layer.name} is the identity for the analysis "
                         "(as at test time), unlike the reference")
            return None
        notes.append(f"note: Dropout layer {layer.name} is active (Caffe's TRAIN phase, as "
                     "in the reference): the result varies with the seed")
    _check_type(layer)
    return layer


def _analysis_input(layer, analysis, input_shape):
    """Input layer ``layer`` as the analysis net takes it (see :func:`analysis_net`)."""
    if any(kept.type not in INPUT_TYPES for kept in analysis.layer):
        raise MagicInitError(f"input layer {layer.name} comes after computing layers; "
                             "magic init needs the input layers first")
    if input_shape is not None:
        if analysis.layer:
            raise MagicInitError(f"the net has several input layers ({layer.name} is "
                                 "another); images (-d) feed only one")
        return _image_input(layer, input_shape)
    if layer.type == "Input":
        raise MagicInitError(f"input layer {layer.name} is an Input layer, which has no "
                             "data of its own: give images (-d)")
    return layer


def _check_type(layer):
    if layer.type == "BatchNorm":
        raise MagicInitError(f"layer {layer.name} is a BatchNorm layer, which magic init does "
                             "not support: fold it into the layer before it first with "
                             "tools/debatchnorm.py")
    if layer.type not in PARAMETER_TYPES + PASSIVE_TYPES + INPUT_TYPES + ("Dropout",):
        raise MagicInitError(
            f"layer {layer.name} has type {layer.type}, which magic init does not support "
            f"(supported: {', '.join(PARAMETER_TYPES + PASSIVE_TYPES + INPUT_TYPES)}, "
            "Dropout; Softmax and loss layers are left out)")


def _image_input(layer, input_shape):
    replacement = type(layer)(name=layer.name, type="Input", top=[layer.top[0]])
    replacement.input_param.shape.add(dim=list(input_shape))
    return replacement


def image_batches(source, batch_size, batches, size, scale=1.0, rng=None, log=print):
    """``batches`` float32 arrays (batch_size, 3, H, W) of images from ``source``.

    ``source`` is an :class:`ctxpred.data.images.ImageSource` or what
    :func:`ctxpred.data.images.open_source` opens (a glob, folder, list file,
    LMDB); ``size`` is (H, W). Images are drawn in a random order (``rng``, a
    numpy Generator; default seed 0), repeated when there are fewer than
    batches * batch_size, each resized to H x W (aspect ratio not kept:
    OpenCV area interpolation to shrink, bilinear to enlarge), in BGR order
    minus :data:`MEAN_BGR`, times ``scale``. An image that cannot be decoded
    is skipped with a warning. Raises ValueError when the source matches no
    image or none decodes.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    source = open_source(source) if isinstance(source, str) else source
    height, width = size
    count = batch_size * batches
    if len(source) < count:
        log(f"note: {len(source)} images for {count} input slots: images repeat")
    order = rng.permutation(len(source))
    out = np.empty((count, 3, height, width), np.float32)
    filled, tried = 0, 0
    while filled < count:
        if tried == len(source) and not filled:
            raise ValueError(f"none of the images of {source.description} could be decoded")
        index = order[tried % len(source)]
        tried += 1
        try:
            rgb = decode_squashed(source.read_bytes(index), source.name(index), height, width)
        except ImageError as error:
            if tried <= len(source):
                log(f"warning: skipped {error}")
            continue
        bgr = rgb[:, :, ::-1].astype(np.float32) - np.float32(MEAN_BGR)
        out[filled] = (bgr * np.float32(scale)).transpose(2, 0, 1)
        filled += 1
    return list(out.reshape(batches, batch_size, 3, height, width))


@dataclass(frozen=True)
class _Graph:
    """The layers of a pycaffe Net, by index in network order."""

    names: tuple
    types: tuple
    bottoms: tuple
    tops: tuple
    start: int  # first layer after the input layers
    end: int  # last layer before the Softmax / loss layers: the output

    @classmethod
    def of(cls, net):
        names = tuple(net._layer_names)
        types = tuple(layer.type for layer in net.layers)
        for name, layer_type in zip(names, types):
            if not (layer_type in PARAMETER_TYPES + PASSIVE_TYPES + INPUT_TYPES
                    + CAFFE_INSERTED_TYPES or layer_type == "Dropout" or _is_stripped(layer_type)):
                raise MagicInitError(f"layer {name} has type {layer_type}, which magic init "
                                     "does not support")
        start = next(index for index, layer_type in enumerate(types)
                     if layer_type not in INPUT_TYPES)
        if any(layer_type in INPUT_TYPES for layer_type in types[start:]):
            raise MagicInitError("magic init needs the input layers before all other layers")
        end = max(index for index, layer_type in enumerate(types) if not _is_stripped(layer_type))
        return cls(names, types, tuple(tuple(net.bottom_names[name]) for name in names),
                   tuple(tuple(net.top_names[name]) for name in names), start, end)

    @property
    def parameter_layers(self):
        """Indices of the parameter layers, in network order."""
        return [index for index in range(self.start, self.end + 1)
                if self.types[index] in PARAMETER_TYPES]

    def live_after(self, index):
        """Blobs written at or before layer ``index`` that layers after it (up to end) read."""
        written = {top for tops in self.tops[:index + 1] for top in tops}
        read = {bottom for bottoms in self.bottoms[index + 1:self.end + 1] for bottom in bottoms}
        return sorted(written & read)


@dataclass(frozen=True)
class _Store:
    """Blobs that later layers read, per batch, as they are after layer ``after``."""

    after: int
    batches: tuple  # ({blob name: array}, ...)


class _Moments:
    """Per-channel mean and std of arrays accumulated one after another (float64)."""

    def __init__(self):
        self.count, self.sum, self.sum_sq = 0, 0.0, 0.0

    def add(self, array, axis):
        values = np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1).astype(np.float64)
        self.count += values.shape[1]
        self.sum = self.sum + values.sum(axis=1)
        self.sum_sq = self.sum_sq + np.einsum("ij,ij->i", values, values)

    @property
    def mean(self):
        return self.sum / self.count

    @property
    def std(self):
        return np.sqrt(np.maximum(self.sum_sq / self.count - self.mean ** 2, 0.0))


@dataclass(frozen=True)
class LayerStatistics:
    """Per-channel pre-activation mean and std (arrays of the layer's output count)."""

    mean: np.ndarray
    std: np.ndarray


@dataclass(frozen=True)
class Calibration:
    """What :meth:`NetUnderInit.calibrate` did.

    before / after: {layer: r} gradient ratios before the first and after the
    last rescaling; target: the last target ratio; rounds: rescalings done;
    converged: every |log r / log target - 1| < :data:`ROUND_TOLERANCE` at the
    end; factors: {layer: product of the factors its weights were multiplied by};
    statistics: {layer: :class:`LayerStatistics`} of the pre-activations on
    the calibration batch with the final weights (the last forward pass).
    """

    before: dict
    after: dict
    target: float
    rounds: int
    converged: bool
    factors: dict
    statistics: dict


class NetUnderInit:
    """A pycaffe Net, the NetParameter it was built from, and the batches that feed it.

    Parameters
    ----------
    net : caffe.Net
        Built from ``net_param`` (e.g. by :func:`ctxpred.caffe.netparam.instantiate` in the
        TRAIN phase, of :func:`analysis_net`), with ``force_backward`` for :meth:`calibrate`.
    net_param : NetParameter
        Its definition; the layer parameters (kernel, stride, pad, dilation,
        group, transpose) are read from here.
    batches : list of {blob name: float32 array}
        The values of the input layers' tops, one dict per batch, e.g.
        ``[{"data": array} for array in image_batches(...)]`` or
        :func:`data_layer_batches`. Their shapes are the net's.
    log : callable
        Unused; kept for callers that pass it.

    A Dropout layer in the net runs as in Caffe's TRAIN phase: every
    forward pass draws a new mask from Caffe's RNG (``caffe.set_random_seed``
    makes a run repeatable). Activations kept between layers keep their
    masks, so a layer's statistics and the data later layers see agree.
    """

    def __init__(self, net, net_param, batches, log=print):
        self.net = net
        self.graph = _Graph.of(net)
        self.layer_params = {layer.name: layer for layer in net_param.layer}
        inputs = set(self.graph.live_after(self.graph.start - 1))
        if not batches or any(set(batch) != inputs for batch in batches):
            raise MagicInitError(f"every batch must give exactly the input blobs "
                                 f"{', '.join(sorted(inputs))}")
        self.inputs = _Store(self.graph.start - 1, tuple(batches))

    def release_batches(self, keep=1):
        """Free the input batches after the first ``keep`` (memory: 10 x 16 CaffeNet inputs
        are 99 MB). :meth:`calibrate` uses batch 0 only; :meth:`statistics` and a later
        :meth:`initialize` then see the kept batches only."""
        if keep < 1:
            raise MagicInitError("at least one input batch must stay")
        self.inputs = _Store(self.inputs.after, self.inputs.batches[:keep])

    # ---- running the net -------------------------------------------------

    def _restore(self, store, batch):
        for name, array in store.batches[batch].items():
            self.net.blobs[name].data[...] = array

    def _sweep(self, store, end, visit, keep_at=None, budget=None, which=None):
        """Forward each batch (``which``: indices, default all) from ``store`` up to layer ``end``.

        Calls visit(batch index) with the net's blobs as after layer ``end``.
        With ``keep_at``, also stores the blobs live after that layer when
        they fit into ``budget`` bytes, and returns that store; else ``store``.
        """
        which = range(len(store.batches)) if which is None else which
        live = self.graph.live_after(keep_at) if keep_at is not None else []
        size = sum(self.net.blobs[name].data.nbytes for name in live) * len(store.batches)
        keep = keep_at is not None and keep_at > store.after and size <= budget
        kept = []
        for batch in which:
            self._restore(store, batch)
            first = store.after + 1
            if keep:
                self.net._forward(first, keep_at)
                kept.append({name: self.net.blobs[name].data.copy() for name in live})
                first = keep_at + 1
            if first <= end:
                self.net._forward(first, end)
            visit(batch)
        return _Store(keep_at, tuple(kept)) if keep else store

    def _layer_by_layer(self, batch, before_layer=None):
        """Forward input batch ``batch`` one layer at a time, calling before_layer(index)."""
        self._restore(self.inputs, batch)
        for index in range(self.graph.start, self.graph.end + 1):
            if before_layer is not None:
                before_layer(index)
            self.net._forward(index, index)

    def _record(self, statistics, index):
        """statistics[layer] = the pre-activation statistics of layer ``index``'s top as it is."""
        moments = _Moments()
        moments.add(self._top(index), self._channel_axis(index))
        statistics[self.graph.names[index]] = LayerStatistics(moments.mean, moments.std)

    def _top(self, index):
        return self.net.blobs[self.graph.tops[index][0]].data

    def _channel_axis(self, index):
        return self._top(index).ndim - 1 if self.graph.types[index] == "InnerProduct" else 1

    def _weights(self, index):
        return self.net.layers[index].blobs[0].data

    # ---- within-layer initialisation ------------------------------------

    def initialize(self, bias=0.1, kind="elwise", mem_limit_mb=500, rng=None, log=print):
        """Initialise every all-zero parameter layer in network order (see the module doc).

        Parameters
        ----------
        bias : float
            Target mean of each initialised pre-activation channel.
        kind : str
            One of :data:`TYPES`. elwise: i.i.d. N(0, 1) weights. pca: the
            whitening filters of the top principal components of the
            layer's input patches (random combinations of them when the layer
            has more outputs than components). zca: rows of the ZCA
            whitening matrix of those components, for random input
            dimensions (among those the components reach). kmeans:
            spherical k-means centres (10 iterations) of the whitened,
            unit-length patches, mapped back to input space.
            rand: random whitened patches, mapped back. Convolution groups
            get a basis each, from their own input channels. fast_*: patches
            from the first batch only instead of all. A layer with fewer
            patches than outputs, or whose patch covariance (float64) would
            not fit into the memory limit, gets elwise (a note says so).
            Deconvolution takes elwise only.
        mem_limit_mb : float
            Cap in MB (2^20 bytes) on the gathered input patches (float32;
            sampled uniformly over batch and positions beyond it), and
            separately on the activations kept between layers (beyond it,
            the batches are forwarded again from an earlier point).
        rng : numpy.random.Generator
            Draws the weights and samples; default seed 0.
        log : callable
            Receives one line per layer.

        Returns {layer name: what happened} for every parameter layer:
        "kept", "initialised (<kind>)" or "initialised (elwise instead of <kind>)".
        """
        if kind not in TYPES:
            raise MagicInitError(f"unknown initialisation type {kind!r} "
                                 f"(one of {', '.join(TYPES)})")
        rng = np.random.default_rng(0) if rng is None else rng
        budget = int(mem_limit_mb * _MB)
        store, done = self.inputs, {}
        for index in self.graph.parameter_layers:
            name = self.graph.names[index]
            if np.abs(self._weights(index)).sum(dtype=np.float64) > ZERO_TOLERANCE:
                done[name] = "kept"
                continue
            used, store = self._init_layer(index, kind, bias, budget, rng, store, log)
            done[name] = f"initialised ({used})"
            log(f"initialised {name} ({used})")
        if all(what == "kept" for what in done.values()):
            log("every parameter layer already holds weights: nothing to initialise")
        return done

    def _init_layer(self, index, kind, bias, budget, rng, store, log):
        """Fill layer ``index``; returns (basis used, the store to go on from)."""
        name, layer = self.graph.names[index], self.net.layers[index]
        for blob in layer.blobs:
            blob.data[...] = 0
        requested = basis = kind.removeprefix(FAST_PREFIX)
        if basis != "elwise" and self.graph.types[index] == "Deconvolution":
            raise MagicInitError(f"layer {name} is a Deconvolution, which only -t elwise "
                                 f"initialises (not {kind})")
        if basis != "elwise":
            patches, store = self._gather(index, kind.startswith(FAST_PREFIX), budget, rng, store)
            basis = self._fill_from_patches(index, patches, basis, budget, rng, log)
        if basis == "elwise":
            weights = self._weights(index)
            weights[...] = rng.standard_normal(weights.shape, dtype=np.float32)
        moments = _Moments()
        axis = self._channel_axis(index)
        store = self._sweep(store, index, lambda _: moments.add(self._top(index), axis),
                            keep_at=index, budget=budget)
        constant = moments.std == 0
        if constant.any():
            log(f"note: {name}: {int(constant.sum())} output channels are constant on the data; "
                "their weights are not scaled")
        sigma = np.where(constant, 1.0, moments.std)
        _scale_outputs(self._weights(index), 1.0 / sigma, self.layer_params[name])
        shift = np.zeros_like(sigma)
        if len(layer.blobs) > 1:
            shift = -moments.mean / sigma + bias
            layer.blobs[1].data[...] = shift
        else:
            log(f"note: {name} has no bias term; its mean stays "
                f"{np.mean(moments.mean / sigma):.3g}")
        if store.after == index:
            # The kept pre-activations, as the rescaled layer computes them: y / sigma + shift
            # (its bias was zero), instead of forwarding the batches through it again.
            self._rescale_kept(store, index, axis, 1.0 / sigma, shift)
        return kind if basis == requested else f"elwise instead of {kind}", store

    def _rescale_kept(self, store, index, axis, factor, shift):
        """Apply y * factor + shift per channel (axis ``axis``) to layer ``index``'s kept tops."""
        shape = [1] * self._top(index).ndim
        shape[axis] = -1
        factor = factor.astype(np.float32).reshape(shape)
        shift = shift.astype(np.float32).reshape(shape)
        for batch in store.batches:
            for top in self.graph.tops[index]:
                if top in batch:
                    batch[top] *= factor
                    batch[top] += shift

    def _gather(self, index, fast, budget, rng, store):
        """(patches (n, d) float32, store): layer ``index``'s input patches, <= ``budget`` bytes."""
        bottom = self.graph.bottoms[index][0]
        layer_param = self.layer_params[self.graph.names[index]]
        which = [0] if fast else range(len(store.batches))
        shape = self.net.blobs[bottom].data.shape
        if self.graph.types[index] == "Convolution":
            geometry = _ConvGeometry.of(layer_param, shape)
            per_batch, dim = geometry.positions, geometry.patch_size
        else:
            axis = layer_param.inner_product_param.axis % len(shape)
            per_batch, dim = int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))
        cap = budget // (_FLOAT_BYTES * dim)
        total = min(cap, per_batch * len(which))
        counts = [total // len(which) + (slot < total % len(which)) for slot in range(len(which))]
        patches = np.empty((total, dim), np.float32)
        offsets = np.cumsum([0] + counts)

        def take(batch):
            slot = list(which).index(batch)
            picked = np.sort(rng.choice(per_batch, counts[slot], replace=False))
            data = self.net.blobs[bottom].data
            rows = (geometry.patches(data, picked) if self.graph.types[index] == "Convolution"
                    else data.reshape(per_batch, dim)[picked])
            patches[offsets[slot]:offsets[slot + 1]] = rows

        keep_at = None if fast else index - 1
        store = self._sweep(store, index - 1, take, keep_at=keep_at, budget=budget, which=which)
        return patches, store

    def _fill_from_patches(self, index, patches, basis, budget, rng, log):
        """Set layer ``index``'s weights from ``patches``; returns the basis used."""
        name = self.graph.names[index]
        layer_param = self.layer_params[name]
        weights = self._weights(index)
        groups = layer_param.convolution_param.group if self.graph.types[index] == "Convolution" \
            else 1
        outputs = weights.shape[1] if layer_param.inner_product_param.transpose \
            else weights.shape[0]
        per_group, dim = outputs // groups, patches.shape[1] // groups
        if len(patches) < per_group:
            log(f"note: {name}: {len(patches)} input patches for {per_group} outputs are too few "
                f"for {basis}; using elwise")
            return "elwise"
        if 8 * dim * dim > budget:
            log(f"note: {name}: the covariance of {dim}-dimensional patches exceeds the memory "
                f"limit; using elwise")
            return "elwise"
        filters = np.concatenate([_basis_filters(patches[:, group * dim:(group + 1) * dim],
                                                 per_group, basis, rng)
                                  for group in range(groups)])
        if layer_param.inner_product_param.transpose:
            weights[...] = filters.T
        else:
            weights[...] = filters.reshape(weights.shape)
        return basis

    # ---- statistics ------------------------------------------------------

    def statistics(self):
        """{layer: LayerStatistics} of every parameter layer's pre-activation over all batches."""
        moments = {index: _Moments() for index in self.graph.parameter_layers}

        def after_previous(index):  # layer index - 1 ran, no in-place layer after it yet
            if index - 1 in moments:
                moments[index - 1].add(self._top(index - 1), self._channel_axis(index - 1))

        for batch in range(len(self.inputs.batches)):
            self._layer_by_layer(batch, after_previous)
            after_previous(self.graph.end + 1)
        return {self.graph.names[index]: LayerStatistics(m.mean, m.std)
                for index, m in moments.items()}

    # ---- between-layer calibration --------------------------------------

    def output_diffs(self, rng):
        """{top: N(0, 1) float32 array} for the last layer's tops, drawn in top order with
        ``rng.standard_normal(shape, dtype=np.float32)``."""
        return {top: rng.standard_normal(self.net.blobs[top].data.shape, dtype=np.float32)
                for top in self.graph.tops[self.graph.end]}

    def gradient_ratios(self, diffs):
        """{layer: sqrt(mean(dW^2) / mean(W^2))} for the diffs {top: array} of the last layer.

        Backpropagates from the blobs as they are (call after a forward pass).
        """
        for index in self.graph.parameter_layers:
            for blob in self.net.layers[index].blobs:
                blob.diff[...] = 0
        for top, diff in diffs.items():
            self.net.blobs[top].diff[...] = diff
        self.net._backward(self.graph.end, self.graph.start)
        ratios = {}
        for index in self.graph.parameter_layers:
            blob = self.net.layers[index].blobs[0]
            weight_ms = mean_square(blob.data)
            ratios[self.graph.names[index]] = math.sqrt(
                mean_square(blob.diff) / weight_ms) if weight_ms else 0.0
        dead = [name for name, ratio in ratios.items() if not ratio > 0]
        if dead:
            raise MagicInitError(f"{', '.join(dead)} get no gradient from the last layer "
                                 f"{self.graph.names[self.graph.end]} (or have zero weights): "
                                 "-cs needs every parameter layer to feed it")
        return ratios

    def _calibration_pass(self, input_scales, statistics, factors=None):
        """Forward input batch 0 layer by layer; returns the output's mean per-channel std.

        Records each parameter layer's input scale, the mean |bottom|, in
        ``input_scales``, and its pre-activation's statistics in
        ``statistics`` {layer: LayerStatistics}. With ``factors`` {layer: f},
        first multiplies its biases by the input's change of scale since they
        were last set, then its weights and biases by f.
        """
        def before_layer(index):
            previous = index - 1
            if self.graph.types[previous] in PARAMETER_TYPES and previous >= self.graph.start:
                self._record(statistics, previous)
            if index > self.graph.end or self.graph.types[index] not in PARAMETER_TYPES:
                return
            name = self.graph.names[index]
            scale = float(np.mean([np.mean(np.abs(self.net.blobs[bottom].data, dtype=np.float64))
                                   for bottom in self.graph.bottoms[index]]))
            if factors is not None:
                blobs = self.net.layers[index].blobs
                for blob in list(blobs)[1:]:
                    blob.data[...] *= scale / input_scales[name]
                for blob in blobs:
                    blob.data[...] *= factors[name]
            input_scales[name] = scale

        self._layer_by_layer(0, before_layer)
        before_layer(self.graph.end + 1)
        output = self._top(self.graph.end)
        return float(np.mean(np.std(np.moveaxis(output, 1, 0).reshape(output.shape[1], -1),
                                    axis=1, dtype=np.float64)))

    def calibrate(self, rng=None, max_rounds=MAX_ROUNDS, log=print):
        """Equalise the layers' gradient ratios (the reference's -cs), on input batch 0.

        Round: with r_k the gradient ratio of parameter layer k (of K) for
        fixed N(0, 1) diffs (:meth:`output_diffs`, drawn once so that the
        rounds converge instead of chasing sampling noise) and s the output's
        mean per-channel std, target = geometric mean of r_k times
        s^(1/K); stop when every |log r_k / log target - 1| <
        :data:`ROUND_TOLERANCE`; else multiply each layer's biases by its
        input's change of scale (mean |bottom|) and then its weights and
        biases by sqrt(r_k / target), in network order. For positively
        homogeneous nets (ReLU, max pooling, no LRN / Sigmoid) this keeps
        the function up to a positive factor. Warns when the output std
        changes by more than a factor exp(:data:`DRIFT_LIMIT`) in a round.

        Returns a :class:`Calibration`.
        """
        rng = np.random.default_rng(0) if rng is None else rng
        diffs = self.output_diffs(rng)
        input_scales, statistics = {}, {}
        output_std = self._calibration_pass(input_scales, statistics)
        if not output_std > 0:
            raise MagicInitError(f"the net's output does not vary over the calibration batch "
                                 f"(mean per-channel std {output_std:g}): -cs needs a batch of "
                                 "several different images (-bs 2 or more)")
        ratios = before = self.gradient_ratios(diffs)
        factors = dict.fromkeys(ratios, 1.0)
        rounds = 0
        while True:
            values = np.array(list(ratios.values()))
            target = float(np.exp(np.mean(np.log(values))) * output_std ** (1 / len(values)))
            converged = bool(np.all(np.abs(np.log(values) / np.log(target) - 1)
                                    < ROUND_TOLERANCE))
            if converged or rounds == max_rounds:
                break
            step = {name: math.sqrt(ratio / target) for name, ratio in ratios.items()}
            new_std = self._calibration_pass(input_scales, statistics, step)
            if abs(math.log(new_std / output_std)) > DRIFT_LIMIT:
                log(f"warning: the output std went from {output_std:.4g} to {new_std:.4g} in one "
                    "round: a layer is not positively homogeneous (LRN, Sigmoid?)")
            output_std = new_std
            factors = {name: factors[name] * step[name] for name in factors}
            ratios = self.gradient_ratios(diffs)
            rounds += 1
            log(f"calibration round {rounds}: gradient ratios "
                f"{min(ratios.values()):.3g}..{max(ratios.values()):.3g}, target {target:.3g}")
        if not converged:
            log(f"warning: the gradient ratios did not converge in {max_rounds} rounds")
        return Calibration(before, ratios, target, rounds, converged, factors, statistics)


def data_layer_batches(net, count):
    """``count`` batches from the net's own data layers: [{top: array}], tops later layers read.

    Runs the input layers (those before the first computing layer) ``count``
    times and copies their tops.
    """
    graph = _Graph.of(net)
    names = graph.live_after(graph.start - 1)
    batches = []
    for _ in range(count):
        net._forward(0, graph.start - 1)
        batches.append({name: net.blobs[name].data.copy() for name in names})
    return batches


def _scale_outputs(weights, factors, layer_param):
    """Multiply each output channel's weights (a pycaffe blob's data, in place) by ``factors``."""
    if layer_param.type == "Deconvolution":  # (inputs, outputs / group, kh, kw)
        groups = layer_param.convolution_param.group
        view = weights.reshape(groups, weights.shape[0] // groups, weights.shape[1], -1)
        view *= factors.reshape(groups, 1, -1, 1).astype(np.float32)
    elif layer_param.type == "InnerProduct" and layer_param.inner_product_param.transpose:
        weights *= factors.astype(np.float32)[None, :]  # (inputs, outputs)
    else:
        view = weights.reshape(len(factors), -1)
        view *= factors.astype(np.float32)[:, None]


@dataclass(frozen=True)
class _ConvGeometry:
    """Where a 2-D Convolution reads its input (N, C, H, W) from."""

    window: Window
    input_shape: tuple

    @classmethod
    def of(cls, layer_param, input_shape):
        if len(input_shape) != 4 or layer_param.convolution_param.axis not in (1, -3):
            raise MagicInitError(f"layer {layer_param.name}: only 2-D convolutions over axis 1 "
                                 "have patches for data-based types; use -t elwise")
        return cls(layer_window(layer_param), tuple(input_shape))

    @property
    def output_size(self):
        return self.window.output_size(*self.input_shape[2:])

    @property
    def positions(self):
        """Output positions per batch: N * H_out * W_out."""
        return self.input_shape[0] * int(np.prod(self.output_size))

    @property
    def patch_size(self):
        return self.input_shape[1] * self.window.kernel[0] * self.window.kernel[1]

    def patches(self, data, picked):
        """(len(picked), C * kh * kw) patches at flat output positions ``picked`` of ``data``."""
        window, (height, width) = self.window, self.output_size
        (pad_h, pad_w), (stride_h, stride_w), (dilation_h, dilation_w) = (
            window.pad, window.stride, window.dilation)
        padded = np.pad(data, ((0, 0), (0, 0), (pad_h, pad_h), (pad_w, pad_w)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, window.extent, axis=(2, 3))
        windows = windows[:, :, ::stride_h, ::stride_w, ::dilation_h,
                          ::dilation_w][:, :, :height, :width]
        image, row, column = np.unravel_index(picked, (self.input_shape[0], height, width))
        return windows[image, :, row, column].reshape(len(picked), -1)


def _basis_filters(patches, count, basis, rng):
    """(count, d) float32 filters of basis pca / zca / kmeans / rand from (n, d) patches.

    Centres ``patches`` (float32) in place.

    Whitening: the top k = min(count, rank) eigenvectors V and eigenvalues s
    of the patch covariance, filters' input-space map V / sqrt(s + eps). The
    scale of each filter does not matter (the caller normalises the outputs).
    """
    patches -= patches.mean(axis=0, dtype=np.float64).astype(np.float32)
    covariance = (patches.T @ patches).astype(np.float64) / len(patches)
    values, vectors = np.linalg.eigh(covariance)
    values, vectors = values[::-1], vectors[:, ::-1]
    rank = int(np.sum(values > _RANK_TOLERANCE * values[0])) if values[0] > 0 else 0
    if rank == 0:
        return rng.standard_normal((count, patches.shape[1])).astype(np.float32)
    kept = min(count, rank)
    eps = _WHITENING_EPS * values[0]
    whiten = vectors[:, :kept] / np.sqrt(values[:kept] + eps)  # (d, k)
    if basis == "pca":
        mix = np.concatenate([np.eye(kept), rng.standard_normal((count - kept, kept))])
        filters = mix @ whiten.T
    elif basis == "zca":
        zca = whiten @ vectors[:, :kept].T  # (d, d), symmetric
        # Row i's output variance on the data: |e_i projected on the kept components|^2
        # (shrunk by eps); rows near zero would give constant outputs.
        response = np.square(vectors[:, :kept]) @ (values[:kept] / (values[:kept] + eps))
        rows = np.flatnonzero(response > 1e-3 * response.max())
        filters = zca[rng.choice(rows, count, replace=count > len(rows))]
    else:
        whitened = patches @ whiten.astype(np.float32)
        whitened /= np.maximum(np.linalg.norm(whitened, axis=1, keepdims=True), 1e-12)
        centres = (_spherical_kmeans(whitened, count, rng) if basis == "kmeans"
                   else whitened[rng.choice(len(whitened), count, replace=False)])
        filters = centres @ whiten.T
    return filters.astype(np.float32)


def _spherical_kmeans(points, count, rng, chunk=65536):
    """(count, k) unit centres of unit-length (n, k) points by cosine k-means.

    Starts from random distinct points; a cluster that empties restarts at a
    random point.
    """
    centres = points[rng.choice(len(points), count, replace=False)].copy()
    for _ in range(KMEANS_ITERATIONS):
        labels = np.concatenate([np.argmax(points[begin:begin + chunk] @ centres.T, axis=1)
                                 for begin in range(0, len(points), chunk)])
        members = scipy.sparse.csr_matrix(
            (np.ones(len(points), np.float32), (labels, np.arange(len(points)))),
            shape=(count, len(points)))
        sums = np.asarray(members @ points)
        norms = np.linalg.norm(sums, axis=1)
        empty = norms == 0
        sums[empty] = points[rng.choice(len(points), int(empty.sum()), replace=False)]
        norms[empty] = 1.0
        centres = (sums / norms[:, None]).astype(np.float32)
    return centres


def summary_lines(net_under_init, done, statistics, calibration=None):
    """The summary table as text lines, one row per parameter layer.

    Columns: layer; what :meth:`NetUnderInit.initialize` did (``done``);
    weight and bias scale (root mean square); the pre-activation's mean and
    std on the data (``statistics``, averaged over channels); with a
    :class:`Calibration`, the factor -cs multiplied the weights by and the
    gradient ratio before and after -cs.
    """
    header = (f"{'layer':<12} {'action':<28} {'W rms':>9} {'b rms':>9} {'pre mean':>9} "
              f"{'pre std':>9} {'cs factor':>9} {'ratio in':>9} {'ratio out':>9}")
    lines = [header, "-" * len(header)]
    net, graph = net_under_init.net, net_under_init.graph
    for index in graph.parameter_layers:
        name = graph.names[index]
        blobs = net.layers[index].blobs
        rms = [math.sqrt(mean_square(blob.data)) for blob in blobs]
        bias_rms = f"{rms[1]:9.3g}" if len(rms) > 1 else f"{'-':>9}"
        if calibration is None:
            gradient = f"{'-':>9} {'-':>9} {'-':>9}"
        else:
            gradient = (f"{calibration.factors[name]:9.3g} {calibration.before[name]:9.3g} "
                        f"{calibration.after[name]:9.3g}")
        stats = statistics[name]
        lines.append(f"{name:<12} {done[name]:<28} {rms[0]:9.3g} {bias_rms} "
                     f"{np.mean(stats.mean):9.3g} {np.mean(stats.std):9.3g} {gradient}")
    if calibration is not None:
        lines.append(f"gradient ratio target {calibration.target:.4g} after "
                     f"{calibration.rounds} round(s), "
                     f"{'converged' if calibration.converged else 'NOT converged'}")
    return lines


@dataclass(frozen=True)
class MagicInitSettings:
    """What one magic init run does (the reference's command-line flags).

    batch_size x iterations images (or data-layer batches) give the
    statistics; ``scale`` multiplies the mean-subtracted BGR images; ``bias``
    is the target pre-activation mean; ``init_type`` one of :data:`TYPES`;
    ``mem_limit_mb`` caps gathered patches and kept activations (MB);
    ``calibrate`` is -cs; ``zero`` is -z (every layer initialised);
    ``dropout`` one of :data:`DROPOUT_MODES`; ``seed`` seeds the image
    order, the weights, -cs's diffs and Caffe's RNG (the Dropout masks).
    """

    batch_size: int = 16
    iterations: int = 10
    scale: float = 1.0
    bias: float = 0.1
    init_type: str = "elwise"
    mem_limit_mb: float = 500
    calibrate: bool = True
    zero: bool = False
    dropout: str = "train"
    seed: int = 0


@dataclass(frozen=True)
class MagicInitResult:
    """The weights {layer: [arrays]} a run made, what it did per layer, and its summary table."""

    weights: dict
    done: dict
    calibration: object
    lines: tuple


def _feed(net_param, images, settings, rng, log):
    """(analysis NetParameter, image batches or None) for ``images`` (None: the data layers)."""
    shape = None
    if images is not None:
        shape = (settings.batch_size, 3, *input_size(net_param))
        images = open_source(images) if isinstance(images, str) else images
    analysis, notes = analysis_net(net_param, shape, settings.dropout)
    for note in notes:
        log(note)
    if images is None:
        return analysis, None
    top = next(layer.top[0] for layer in analysis.layer if layer.type == "Input")
    return analysis, [{top: batch} for batch in image_batches(
        images, settings.batch_size, settings.iterations, shape[2:], settings.scale, rng, log)]


def _start_weights(net, weights, zero, log):
    if isinstance(weights, (str, os.PathLike)):
        weights, origin = read_weights(weights), weights
    else:
        origin = "the given weights"
    if weights:
        copied = load_weights(net, weights, strict=False)
        log(f"loaded {', '.join(copied) or 'no layer'} from {origin}")
        unused = [name for name in weights if name not in net.params]
        if unused:
            log(f"not in the net (ignored): {', '.join(unused)}")
    if zero:
        for blobs in net.params.values():
            for blob in blobs:
                blob.data[...] = 0


def run_magic_init(caffe, net_param, images=None, settings=MagicInitSettings(), weights=None,
                   source=None, log=print):
    """Magic init of NetParameter ``net_param``, end to end; returns a :class:`MagicInitResult`.

    caffe: pycaffe with its device selected. images: what
    :func:`ctxpred.data.images.open_source` opens, or an ImageSource; None
    feeds the net's own Data / ImageData layers (TRAIN phase). weights: a
    caffemodel path or {layer: [arrays]}, loaded first by name (their non-zero layers are kept,
    only rescaled by -cs). source: the prototxt's file name for errors.
    Raises ValueError (MagicInitError included) naming the layer or file that
    does not fit; the net is checked in a child process first (Caffe would
    abort this one).
    """
    seeds = np.random.SeedSequence(settings.seed)
    image_rng, init_rng, calibration_rng = map(np.random.default_rng, seeds.spawn(3))
    caffe.set_random_seed(int(seeds.generate_state(1)[0] & 0x7FFFFFFF))
    analysis, batches = _feed(net_param, images, settings, image_rng, log)
    weight_shapes_of(analysis, source)
    net = instantiate(analysis, "train")
    _start_weights(net, weights, settings.zero, log)
    if batches is None:
        batches = data_layer_batches(net, settings.iterations)
    subject = NetUnderInit(net, analysis, batches, log)
    done = subject.initialize(settings.bias, settings.init_type, settings.mem_limit_mb, init_rng,
                              log)
    calibration = None
    if settings.calibrate:
        subject.release_batches(keep=1)  # -cs and its statistics use the first batch only
        calibration = subject.calibrate(calibration_rng, log=log)
    # With -cs the last calibration pass measured the final weights' pre-activations.
    statistics = calibration.statistics if calibration else subject.statistics()
    lines = summary_lines(subject, done, statistics, calibration)
    lines.append("pre-activation statistics: " + (
        "the calibration batch (the first), final weights" if calibration
        else f"all {settings.iterations} batches"))
    return MagicInitResult(net_weights(net), done, calibration, tuple(lines))
