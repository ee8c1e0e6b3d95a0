"""Weight surgery between nets, over weights as {layer name: [arrays]}.

- Copy by layer name, with a report of every layer or shape that differs
  (:func:`compare_shapes`, :func:`load_weights`).
- The two fc7 layouts. The reference pair head has one ``fc7`` on
  concatenated pair features, weights W (4096 x 8192) = [A | B] and bias b.
  The factorized head has ``fc7_first`` (A, no bias) and ``fc7_second``
  (B, b), applied per patch.
- Deployment: fold BatchNorm into the conv / fc layer before it
  (:func:`fold_batchnorm`), turn grouped convolutions into groupless ones
  with block-diagonal weights (:func:`groupless_weights`), drop a layer and
  all after it (:func:`drop_layers_from`, the "no fc6" models).

The layer graph comes from a Caffe NetParameter (:func:`ctxpred.caffe.netparam.read_net_param`),
so the functions work for any layer names.
"""
from dataclasses import dataclass

import numpy as np

from ctxpred.caffe.netparam import weight_shapes
from ctxpred.weights.files import read_weights

FIRST, SECOND = "fc7_first", "fc7_second"


def net_weights(net):
    """{layer name: [array, ...]} copies of a pycaffe Net's parameters."""
    return {name: [blob.data.copy() for blob in blobs] for name, blobs in net.params.items()}


def to_factorized_head(weights):
    """Split a reference ``fc7`` into ``fc7_first`` and ``fc7_second`` (new dict)."""
    weights = dict(weights)
    weight, bias = weights.pop("fc7")
    half = weight.shape[1] // 2
    weights[FIRST] = [weight[:, :half].copy()]
    weights[SECOND] = [weight[:, half:].copy(), bias.copy()]
    return weights


def to_reference_head(weights):
    """Join ``fc7_first`` and ``fc7_second`` into the reference ``fc7`` (new dict)."""
    weights = dict(weights)
    (first,), (second, bias) = weights.pop(FIRST), weights.pop(SECOND)
    weights["fc7"] = [np.concatenate([first, second], axis=1), bias.copy()]
    return weights


def _format_shapes(shapes):
    return ", ".join("x".join(str(size) for size in shape) for shape in shapes) or "no blobs"


@dataclass(frozen=True)
class ShapeReport:
    """How weights {layer: [arrays]} fit a net's parameter shapes.

    missing: layers of the net the weights lack (Caffe leaves them at their
    fillers). unused: layers of the weights the net does not have (Caffe
    ignores them). different: {layer: (net's shapes, weights' shapes)}, which
    Caffe refuses to load (it aborts the process).
    """

    missing: tuple
    unused: tuple
    different: dict

    @property
    def exact(self):
        """True when the weights hold exactly the net's layers with its shapes."""
        return not (self.missing or self.unused or self.different)

    def lines(self):
        """The differences in plain words, one per line."""
        lines = []
        if self.missing:
            lines.append(f"the net has {', '.join(self.missing)} without weights")
        if self.unused:
            lines.append(f"the weights have {', '.join(self.unused)} without a layer in the net")
        for name, (net_shapes, given_shapes) in self.different.items():
            lines.append(f"layer {name}: the net's blobs have shapes {_format_shapes(net_shapes)}, "
                         f"the weights {_format_shapes(given_shapes)}")
        return lines


def compare_shapes(net_shapes, weights):
    """A :class:`ShapeReport` of weights {layer: [arrays]} against {layer: [shapes]}."""
    different = {}
    for name in net_shapes:
        if name in weights:
            shapes = [tuple(shape) for shape in net_shapes[name]]
            given = [array.shape for array in weights[name]]
            if shapes != given:
                different[name] = (shapes, given)
    return ShapeReport(missing=tuple(name for name in net_shapes if name not in weights),
                       unused=tuple(name for name in weights if name not in net_shapes),
                       different=different)


def load_weights(net, weights, strict=True):
    """Copy {layer: [arrays]} into a pycaffe Net by layer name.

    Checks every layer before copying anything. A shape difference raises
    ValueError naming each such layer and both shapes; with ``strict``, so
    does a layer of either side missing on the other; otherwise only the
    layers both have are copied. Returns the names copied.
    """
    report = compare_shapes(weight_shapes(net), weights)
    if report.different or (strict and not report.exact):
        raise ValueError("; ".join(report.lines()))
    copied = [name for name in net.params if name in weights]
    for name in copied:
        for blob, array in zip(net.params[name], weights[name]):
            blob.data[...] = array
    return copied


def load_weights_file(net, path, strict=False):
    """:func:`load_weights` from a binary or HDF5 caffemodel, checked in Python first.

    Where ``Net.copy_from`` aborts the process on a truncated, empty or
    damaged file or a shape difference, this raises ValueError naming the
    file and each offending layer (FileNotFoundError for a missing file).
    Without ``strict``, layers only one side has are left alone, as
    ``copy_from`` does. Returns the names copied.
    """
    try:
        return load_weights(net, read_weights(path), strict)
    except ValueError as error:
        message = str(error)
        raise ValueError(message if str(path) in message
                         else f"{path} does not fit the net: {message}") from None


_FOLDABLE = ("Convolution", "InnerProduct")


def batchnorm_pairs(net_param):
    """(layer, BatchNorm layer) LayerParameter pairs that :func:`fold_batchnorm` folds.

    A BatchNorm folds into the Convolution or InnerProduct whose output it
    normalises when no other layer reads that output, and when the layer is
    not downstream of a BatchReindex: layers that see pairs (fc7 after the
    pair fusion) keep their BatchNorm, as in the authors' code.
    """
    layers = net_param.layer
    writer = {}  # blob name -> index of the layer that wrote its current value
    readers = {}  # (blob name, writer index) -> number of layers reading that value
    pair_blobs = set()  # blobs downstream of a BatchReindex
    candidates = []
    for index, layer in enumerate(layers):
        for bottom in layer.bottom:
            value = (bottom, writer.get(bottom))
            readers[value] = readers.get(value, 0) + 1
        if layer.type == "BatchNorm" and len(layer.bottom) == 1:
            bottom = layer.bottom[0]
            source = writer.get(bottom)
            if (source is not None and layers[source].type in _FOLDABLE
                    and bottom not in pair_blobs):
                candidates.append((source, index, (bottom, source)))
        if layer.type == "BatchReindex" or pair_blobs.intersection(layer.bottom):
            pair_blobs.update(layer.top)
        for top in layer.top:
            writer[top] = index
    return [(layers[source], layers[index]) for source, index, value in candidates
            if readers[value] == 1]


def fold_batchnorm(weights, net_param):
    """Fold BatchNorm layers into the conv / fc layers before them (new dict).

    For each pair of :func:`batchnorm_pairs`, with the BatchNorm blobs mean
    (C,), var (C,) and scale factor s (1,) and eps from its batch_norm_param:
    std = sqrt(var / s + eps); W <- W / std per output channel (W's first
    axis, C); b <- b / std - (mean / s) / std (b = 0 when the layer has no
    bias; the folded layer always has one). The BatchNorm's weights are
    dropped; other layers are kept as they are, and pairs the weights lack
    altogether are skipped (a "no fc6" model has neither fc6 nor bn6). The
    folded layer then computes in every phase what the pair computed in the
    TEST phase.

    Raises ValueError naming the layers when the weights hold only one layer
    of a pair, when a BatchNorm never accumulated statistics (s = 0), or when
    its channel count differs from the layer's outputs.
    """
    folded = dict(weights)
    for layer, batchnorm in batchnorm_pairs(net_param):
        absent = [name for name in (layer.name, batchnorm.name) if name not in weights]
        if len(absent) == 2:
            continue
        if absent:
            raise ValueError(f"the weights have no {absent[0]}, needed to fold "
                             f"{batchnorm.name} into {layer.name}")
        folded[layer.name] = _fold_pair(layer, weights[layer.name], batchnorm,
                                        weights[batchnorm.name])
        del folded[batchnorm.name]
    return folded


def check_batchnorms_fold(weights, net_param, target_param, source="the net definition"):
    """Raise ValueError naming a BatchNorm of ``weights`` that folding would silently lose.

    That is a BatchNorm which :func:`fold_batchnorm` (with ``net_param``,
    read from ``source``) does not fold while ``target_param``, the net the
    folded weights are for, has no layer of its name: either ``net_param``
    has no such layer (weights of three blobs, mean and variance of C values
    and a scale factor, are taken for BatchNorm statistics) or its input is
    not the output of a Convolution or InnerProduct that ``target_param``
    keeps. A BatchNorm whose input layer the target lacks too (bn7 after
    fc7, for a deploy net that ends at fc6) is left out with it.
    """
    folded = {batchnorm.name for _, batchnorm in batchnorm_pairs(net_param)}
    target = {layer.name for layer in target_param.layer}
    layers = {layer.name: layer for layer in net_param.layer}
    writer, producer = {}, {}  # blob -> layer that last wrote it; BatchNorm -> its input's writer
    for layer in net_param.layer:
        if layer.type == "BatchNorm" and layer.bottom:
            producer[layer.name] = writer.get(layer.bottom[0])
        for top in layer.top:
            writer[top] = layer.name
    for name, arrays in weights.items():
        if name in folded or name in target:
            continue
        if name not in layers:
            if (len(arrays) == 3 and arrays[0].ndim == 1 and arrays[0].shape == arrays[1].shape
                    and arrays[2].size == 1):
                raise ValueError(f"the weights' layer {name} holds BatchNorm statistics, but "
                                 f"{source} has no layer {name}: nothing to fold it into")
        elif layers[name].type == "BatchNorm" and producer.get(name) in target:
            into = layers[producer[name]]
            raise ValueError(f"BatchNorm layer {name} of {source} has no Convolution or "
                             f"InnerProduct to fold into: its input comes from {into.name} "
                             f"({into.type}), which other layers also read or which follows "
                             f"the pair fusion, and the target net keeps {into.name} without "
                             f"{name}")


def _fold_pair(layer, arrays, batchnorm, statistics):
    """[W, b] of ``layer`` with ``batchnorm`` folded in (float32)."""
    if len(statistics) != 3:
        raise ValueError(f"BatchNorm layer {batchnorm.name} has {len(statistics)} blobs, "
                         "not 3 (mean, variance, scale factor)")
    mean, variance, factor = (np.asarray(blob, np.float64).ravel() for blob in statistics)
    if factor[0] == 0:
        raise ValueError(f"BatchNorm layer {batchnorm.name} holds no statistics (scale factor "
                         "0): the net was saved before any TRAIN forward pass")
    if layer.type == "InnerProduct" and layer.inner_product_param.transpose:
        raise ValueError(f"layer {layer.name}: transposed InnerProduct weights do not fold")
    weight = np.asarray(arrays[0], np.float64)
    if not weight.shape[0] == mean.size == variance.size:
        raise ValueError(f"BatchNorm layer {batchnorm.name} has statistics of {mean.size} and "
                         f"{variance.size} channels, but layer {layer.name} has "
                         f"{weight.shape[0]} outputs (weights {_format_shapes([weight.shape])})")
    bias = np.asarray(arrays[1], np.float64) if len(arrays) > 1 else np.zeros(mean.size)
    std = np.sqrt(variance / factor[0] + batchnorm.batch_norm_param.eps)
    weight = weight / std.reshape(-1, *[1] * (weight.ndim - 1))
    bias = (bias - mean / factor[0]) / std
    return [weight.astype(np.float32), bias.astype(np.float32)]


def groupless_net(net_param):
    """A copy of a NetParameter with every Convolution's ``group`` removed (group 1)."""
    groupless = type(net_param)()
    groupless.CopyFrom(net_param)
    for layer in groupless.layer:
        if layer.type == "Convolution":
            layer.convolution_param.ClearField("group")
    return groupless


def groupless_weights(weights, net_param):
    """Weights for :func:`groupless_net` computing what grouped weights compute (new dict).

    For a Convolution with G groups and weights (Cout, Cin/G, kh, kw): zeros
    (Cout, Cin, kh, kw) with block g = W[g*Cout/G:(g+1)*Cout/G] at outputs
    g*Cout/G:(g+1)*Cout/G, inputs g*Cin/G:(g+1)*Cin/G. Biases and all other
    layers are kept; grouped layers the weights lack are skipped. Raises
    ValueError naming a layer whose output count G does not divide.
    """
    converted = dict(weights)
    for layer in net_param.layer:
        groups = layer.convolution_param.group
        if layer.type != "Convolution" or groups == 1 or layer.name not in weights:
            continue
        weight, *rest = weights[layer.name]
        if weight.ndim < 3 or weight.shape[0] % groups:
            raise ValueError(f"layer {layer.name}: weights of shape "
                             f"{_format_shapes([weight.shape])} do not split into {groups} groups")
        outputs, inputs = weight.shape[:2]
        step = outputs // groups
        full = np.zeros((outputs, inputs * groups, *weight.shape[2:]), weight.dtype)
        for group in range(groups):
            rows = slice(group * step, (group + 1) * step)
            full[rows, group * inputs:(group + 1) * inputs] = weight[rows]
        converted[layer.name] = [full, *rest]
    return converted


def drop_layers_from(weights, first_layer, net_param=None):
    """The weights without ``first_layer`` and every layer after it (new dict).

    "After" is the order of ``net_param``'s layers, or without it the order
    of ``weights`` (a binary caffemodel keeps the net's order; an HDF5 one
    does not). Raises ValueError when ``first_layer`` is not there, or when
    the weights hold layers the net definition lacks.
    """
    order = [layer.name for layer in net_param.layer] if net_param is not None else list(weights)
    if first_layer not in order:
        where = "the net definition" if net_param is not None else "the weights"
        raise ValueError(f"layer {first_layer} is not in {where}")
    unknown = [name for name in weights if name not in order]
    if unknown:
        raise ValueError(f"the weights have {', '.join(unknown)}, which the net definition lacks")
    dropped = set(order[order.index(first_layer):])
    return {name: arrays for name, arrays in weights.items() if name not in dropped}
