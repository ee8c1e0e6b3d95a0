"""Caffe deploy nets to ONNX, and a parity check of the result against pycaffe.

:func:`caffe_to_onnx` turns a NetParameter (the layers Caffe keeps in the
TEST phase, in order) and weights {layer: [arrays]} (as
:func:`ctxpred.weights.files.read_weights` returns them) into an ONNX model with
the deploy net's static input shapes. Caffe blobs written in place (ReLU,
Dropout, BatchNorm on ``conv1``...) become a chain of ONNX tensors: every
value but a blob's last is renamed ``<blob>/<layer>``, so the graph's tensors
and outputs carry Caffe's blob names. The graph outputs are Caffe's net
outputs: blobs that no later layer reads.

Layers and the ONNX they become (anything else raises
:class:`UnsupportedLayerError` naming the layer and its type):

- Input -> graph input; Convolution -> Conv (groups, stride, pad, dilation,
  bias_term); InnerProduct -> Flatten (from ``axis``) + Gemm; ReLU -> Relu or
  LeakyRelu (``negative_slope``); Dropout -> Identity (Caffe's TEST phase
  copies); Softmax; Concat; Slice -> Split; Eltwise SUM (with ``coeff``),
  PROD, MAX.
- Pooling MAX / AVE with Caffe's rounding (CEIL by default): the output side
  is ceil((H + 2 pad - k) / stride) + 1, less one when the last window would
  start in the padding. The ONNX op gets explicit pads (pad before, and
  after what that last window needs) and floor rounding, so the sizes agree
  whatever a runtime's ceil_mode does. MAX ignores padding in both. Caffe's
  AVE divides by the window clipped to the padded image [-pad, H + pad),
  padding included: the ONNX graph zero-pads, averages over full windows and
  multiplies by k_h k_w / (that clipped size) where the two differ.
- LRN ACROSS_CHANNELS -> LRN: both compute x / (k + alpha / n * sum of x^2
  over n channels centred on c)^beta, so alpha, beta, local_size n and k
  carry over unchanged. WITHIN_CHANNEL (which ignores k) ->
  x * (1 + alpha * mean of x^2 over the n x n zero-padded window)^-beta.
- MVN -> (x - mean) / (sqrt(var) + eps) over C x H x W (across_channels) or
  H x W, var the biased variance, as Caffe (eps added to the deviation).
- Power -> (shift + scale x)^power, with Caffe's constant for scale 0.
- Reduction SUM / MEAN / ASUM / SUMSQ over ``axis`` to the last axis, times
  ``coeff`` -> ReduceSum / ReduceMean / ReduceL1 / ReduceSumSquare.
- Scale with one bottom (learned scale, optional bias) or two (the second
  bottom scales the first from ``axis``) -> Mul (+ Add).
- BatchNorm with stored statistics -> BatchNormalization with mean / s and
  var / s (s the third blob, 0 meaning no statistics, as Caffe), scale 1,
  bias 0 and Caffe's eps. A BatchNorm computing batch statistics in the TEST
  phase (``use_global_stats: false``) is refused. (Folding it into the layer
  before, :func:`ctxpred.weights.surgery.fold_batchnorm`, gives the same numbers.)

:func:`compare_with_caffe` runs a deploy net in pycaffe (TEST phase) and an
ONNX file in onnxruntime on the same inputs; :func:`photo_patches` makes such
inputs from photos.
"""
import math
from pathlib import Path

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ctxpred.caffe.env import load_caffe
from ctxpred.caffe.geometry import layer_window
from ctxpred.caffe.netparam import phase_layers, upgrade_input_header
from ctxpred.weights.surgery import load_weights_file

MIN_OPSET = 13  # Softmax over one axis, Split's sizes as an input, ReduceSum's axes as an input
DEFAULT_OPSET = 17


class UnsupportedLayerError(ValueError):
    """A layer (or a setting of one) that has no ONNX translation here; the message names it."""


def caffe_to_onnx(net_param, weights, opset=DEFAULT_OPSET):
    """The ONNX model (onnx.ModelProto) computing what Caffe computes in the TEST phase.

    Parameters
    ----------
    net_param : caffe_pb2.NetParameter
        A deploy net: Input layers (or the legacy ``input`` / ``input_shape``
        fields) and the layers of the module docstring. Layers excluded from
        the TEST phase by include / exclude rules are left out, as Caffe does.
    weights : dict
        {layer name: [arrays in Caffe's blob order]}; layers without
        parameters need none, extra layers are ignored. Blobs whose value
        count fits are reshaped to the layer's shapes (legacy 4-D blobs).
    opset : int
        ONNX opset of the default domain, at least :data:`MIN_OPSET`.

    Raises :class:`UnsupportedLayerError` naming a layer of another type or
    with an unsupported setting, and ValueError naming a layer whose weights
    are missing or do not fit, or whose bottom no earlier layer writes.
    """
    latest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= latest:
        raise ValueError(f"opset {opset} is not supported: choose {MIN_OPSET}..{latest}")
    if net_param.layers:
        raise UnsupportedLayerError("the net uses the V1 'layers' format; convert it with "
                                    "Caffe's upgrade_net_proto_text first")
    upgraded = type(net_param)()
    upgraded.CopyFrom(net_param)
    layers = phase_layers(upgrade_input_header(upgraded), "test")
    graph = _Graph(opset, {top for layer in layers for top in layer.top})
    # Graph inputs keep their blob's name; so does the last value of every other blob.
    inputs = set().union(*(layer.top for layer in layers if layer.type == "Input"))
    last_writer = {top: index for index, layer in enumerate(layers) for top in layer.top}
    for index, layer in enumerate(layers):
        converter = _CONVERTERS.get(layer.type)
        if converter is None:
            raise UnsupportedLayerError(
                f"layer {layer.name!r} has type {layer.type!r}, which has no ONNX export; "
                f"supported types: {', '.join(sorted(_CONVERTERS))}")
        bottoms = []
        for bottom in layer.bottom:
            if bottom not in graph.current:
                raise ValueError(f"layer {layer.name!r} ({layer.type}) reads blob {bottom!r}, "
                                 "which no earlier layer writes")
            bottoms.append(graph.current[bottom])
        if layer.type == "Input":
            tops = list(layer.top)
        else:
            tops = [top if last_writer[top] == index and top not in inputs
                    else graph.fresh(f"{top}/{layer.name}") for top in layer.top]
        shapes = converter(graph, layer, bottoms, tops, weights)
        for top, name, shape in zip(layer.top, tops, shapes):
            graph.shapes[name] = tuple(int(size) for size in shape)
            graph.current[top] = name
    return graph.model(net_param.name or "caffe_net", _net_outputs(layers))


def _net_outputs(layers):
    """Caffe's net outputs: blobs no later layer reads, in the order they were written."""
    available = {}
    for layer in layers:
        for bottom in layer.bottom:
            available.pop(bottom, None)
        for top in layer.top:
            available.pop(top, None)
            available[top] = None
    return list(available)


class _Graph:
    """ONNX nodes, initializers and static shapes, built layer by layer."""

    def __init__(self, opset, reserved):
        self.opset = opset
        self.nodes, self.initializers, self.inputs = [], [], []
        self.shapes = {}  # ONNX tensor -> shape
        self.current = {}  # Caffe blob -> ONNX tensor holding its current value
        self.taken = set(reserved)

    def fresh(self, name):
        """``name``, or ``name_<n>`` when taken: a tensor name not used yet."""
        unique, count = name, 1
        while unique in self.taken:
            unique, count = f"{name}_{count}", count + 1
        self.taken.add(unique)
        return unique

    def add_input(self, name, shape):
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        self.shapes[name] = tuple(int(size) for size in shape)
        self.current[name] = name

    def constant(self, name, array, dtype=np.float32):
        tensor_name = self.fresh(name)
        self.initializers.append(numpy_helper.from_array(np.asarray(array, dtype), tensor_name))
        return tensor_name

    def node(self, op, inputs, output, **attributes):
        """Add ``op`` writing ``output`` (a name made unique, or a top's exact name)."""
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=output,
                                           **attributes))
        return output

    def temporary(self, layer, what):
        return self.fresh(f"{layer.name}/{what}")

    def reduce(self, op, source, axes, output, keepdims):
        """Reduce* over ``axes``: axes as an attribute before opset 18 (but ReduceSum's)."""
        if self.opset >= 18 or op == "ReduceSum":
            axes_name = self.constant(f"{output}/axes", axes, np.int64)
            return self.node(op, [source, axes_name], output, keepdims=int(keepdims))
        return self.node(op, [source], output, axes=list(axes), keepdims=int(keepdims))

    def model(self, name, outputs):
        graph = helper.make_graph(
            self.nodes, name, self.inputs,
            [helper.make_tensor_value_info(self.current[blob], TensorProto.FLOAT,
                                           list(self.shapes[self.current[blob]]))
             for blob in outputs],
            initializer=self.initializers)
        opsets = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="ctxpred",
                                  ir_version=helper.find_min_ir_version_for(opsets))
        model.doc_string = "Converted from a Caffe deploy net by ctxpred.weights.onnx"
        return model


def _params(layer, weights, shapes, what):
    """The layer's blobs from ``weights``, checked and reshaped to ``shapes``."""
    arrays = weights.get(layer.name, [])
    if len(arrays) != len(shapes):
        have = f"{len(arrays)} blobs" if arrays else "no blobs"
        raise ValueError(f"layer {layer.name!r} ({layer.type}) needs {len(shapes)} blobs "
                         f"({what}), but the weights have {have} for it")
    checked = []
    for index, (array, shape) in enumerate(zip(arrays, shapes)):
        array = np.asarray(array, np.float32)
        if array.size != math.prod(shape):
            raise ValueError(f"layer {layer.name!r} ({layer.type}): blob {index} has shape "
                             f"{array.shape}, the net needs {tuple(shape)}")
        checked.append(array.reshape(shape))
    return checked


def _axis(layer, axis, ndim):
    """Caffe's CanonicalAxisIndex, with an error naming the layer."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"layer {layer.name!r} ({layer.type}): axis {axis} is out of range "
                         f"for a blob of {ndim} axes")
    return axis % ndim


def _input(graph, layer, bottoms, tops, weights):
    shapes = [tuple(shape.dim) for shape in layer.input_param.shape]
    if len(shapes) == 1:
        shapes = shapes * len(tops)
    if len(shapes) != len(tops):
        raise ValueError(f"layer {layer.name!r} (Input) has {len(tops)} tops but "
                         f"{len(shapes)} shapes")
    for top, shape in zip(tops, shapes):
        graph.add_input(top, shape)
    return shapes


def _convolution(graph, layer, bottoms, tops, weights):
    param = layer.convolution_param
    shape = graph.shapes[bottoms[0]]
    if _axis(layer, param.axis, len(shape)) != 1:
        raise UnsupportedLayerError(f"layer {layer.name!r} (Convolution): channel axis "
                                    f"{param.axis} (ONNX Conv needs axis 1)")
    if len(shape) != 4:
        raise UnsupportedLayerError(f"layer {layer.name!r} (Convolution): only 2-D "
                                    f"convolutions are exported (input {shape})")
    window = layer_window(layer)
    kernel, pad, stride, dilation = (list(window.kernel), list(window.pad), list(window.stride),
                                     list(window.dilation))
    group, outputs = param.group, param.num_output
    if shape[1] % group or outputs % group:
        raise ValueError(f"layer {layer.name!r} (Convolution): group {group} does not divide "
                         f"{shape[1]} inputs and {outputs} outputs")
    blob_shapes = [(outputs, shape[1] // group, *kernel)] + [(outputs,)] * param.bias_term
    arrays = _params(layer, weights, blob_shapes, "weights" + ", bias" * param.bias_term)
    names = [graph.constant(f"{layer.name}/{what}", array)
             for what, array in zip(("weight", "bias"), arrays)]
    graph.node("Conv", [bottoms[0], *names], tops[0], kernel_shape=kernel, pads=pad + pad,
               strides=stride, dilations=dilation, group=group)
    sides = [(size + 2 * p - (d * (k - 1) + 1)) // s + 1
             for size, k, p, s, d in zip(shape[2:], kernel, pad, stride, dilation)]
    return [(shape[0], outputs, *sides)]


def _pooling_geometry(layer, shape):
    """kernel, pad, stride, output sides (each (h, w)) of a Caffe Pooling layer."""
    param = layer.pooling_param
    if len(shape) != 4:
        raise ValueError(f"layer {layer.name!r} (Pooling) needs a 4-axis input, got {shape}")
    height, width = shape[2:]
    window = layer_window(layer).for_input(height, width)
    kernel, pad, stride = window.kernel, window.pad, window.stride
    ceil = param.round_mode == type(param).CEIL
    sides = []
    for size, k, p, s in zip((height, width), kernel, pad, stride):
        if not 0 < k <= size + 2 * p or p >= k:
            raise ValueError(f"layer {layer.name!r} (Pooling): kernel {k} with pad {p} does not "
                             f"fit an input side of {size}")
        span = size + 2 * p - k
        side = (-(-span // s) if ceil else span // s) + 1
        if p and (side - 1) * s >= size + p:
            side -= 1  # Caffe: the last window must start inside the image
        if (side - 1) * s >= size + p:
            raise UnsupportedLayerError(
                f"layer {layer.name!r} (Pooling): its last window (stride {s} > kernel {k}) "
                "starts outside the image, where Caffe's result is undefined")
        sides.append(side)
    return kernel, pad, stride, tuple(sides)


def _pooling(graph, layer, bottoms, tops, weights):
    param = layer.pooling_param
    method = type(param).PoolMethod.Name(param.pool)
    if method not in ("MAX", "AVE"):
        raise UnsupportedLayerError(f"layer {layer.name!r} (Pooling): pool {method} has no "
                                    "ONNX export (MAX and AVE do)")
    shape = graph.shapes[bottoms[0]]
    kernel, pad, stride, sides = _pooling_geometry(layer, shape)
    # Pad after the image so that floor rounding yields Caffe's sides; never negative:
    # when the last window ends before the padding, floor rounding stops there already.
    after = [max(0, (side - 1) * s + k - size - p)
             for side, s, k, size, p in zip(sides, stride, kernel, shape[2:], pad)]
    out_shape = (*shape[:2], *sides)
    if method == "MAX":
        graph.node("MaxPool", bottoms, tops[0], kernel_shape=list(kernel),
                   pads=list(pad) + after, strides=list(stride))
        return [out_shape]
    source = bottoms[0]
    if any(pad) or any(after):
        pads = graph.constant(f"{layer.name}/pads", [0, 0, *pad, 0, 0, *after], np.int64)
        source = graph.node("Pad", [source, pads], graph.temporary(layer, "padded"))
    # Caffe's divisor: the window clipped to [-pad, size + pad), per axis.
    divisors = [np.minimum(np.arange(side) * s - p + k, size + p) - (np.arange(side) * s - p)
                for side, s, p, k, size in zip(sides, stride, pad, kernel, shape[2:])]
    correction = kernel[0] * kernel[1] / np.outer(*divisors)
    if np.all(correction == 1):
        graph.node("AveragePool", [source], tops[0], kernel_shape=list(kernel),
                   strides=list(stride))
        return [out_shape]
    mean = graph.node("AveragePool", [source], graph.temporary(layer, "full_windows"),
                      kernel_shape=list(kernel), strides=list(stride))
    factor = graph.constant(f"{layer.name}/caffe_divisor", correction[None, None])
    graph.node("Mul", [mean, factor], tops[0])
    return [out_shape]


def _lrn(graph, layer, bottoms, tops, weights):
    param = layer.lrn_param
    size = param.local_size
    if size % 2 == 0:
        raise ValueError(f"layer {layer.name!r} (LRN): local_size {size} is even; Caffe "
                         "supports odd sizes only")
    shape = graph.shapes[bottoms[0]]
    if param.norm_region == type(param).ACROSS_CHANNELS:
        graph.node("LRN", bottoms, tops[0], size=size, alpha=param.alpha, beta=param.beta,
                   bias=param.k)
        return [shape]
    half = (size - 1) // 2
    squared = graph.node("Mul", [bottoms[0], bottoms[0]], graph.temporary(layer, "squared"))
    pads = graph.constant(f"{layer.name}/pads", [0, 0, half, half, 0, 0, half, half], np.int64)
    padded = graph.node("Pad", [squared, pads], graph.temporary(layer, "padded"))
    mean = graph.node("AveragePool", [padded], graph.temporary(layer, "mean"),
                      kernel_shape=[size, size], strides=[1, 1])
    alpha = graph.constant(f"{layer.name}/alpha", param.alpha)
    one = graph.constant(f"{layer.name}/one", 1.0)
    power = graph.constant(f"{layer.name}/minus_beta", -param.beta)
    scaled = graph.node("Mul", [mean, alpha], graph.temporary(layer, "scaled"))
    shifted = graph.node("Add", [scaled, one], graph.temporary(layer, "shifted"))
    factor = graph.node("Pow", [shifted, power], graph.temporary(layer, "factor"))
    graph.node("Mul", [bottoms[0], factor], tops[0])
    return [shape]


def _mvn(graph, layer, bottoms, tops, weights):
    param = layer.mvn_param
    shape = graph.shapes[bottoms[0]]
    first = 1 if param.across_channels else 2
    if len(shape) <= first:
        raise ValueError(f"layer {layer.name!r} (MVN): input of shape {shape} has no axes to "
                         "normalise over")
    axes = list(range(first, len(shape)))
    mean = graph.reduce("ReduceMean", bottoms[0], axes, graph.temporary(layer, "mean"), True)
    if not param.normalize_variance:
        graph.node("Sub", [bottoms[0], mean], tops[0])
        return [shape]
    centred = graph.node("Sub", [bottoms[0], mean], graph.temporary(layer, "centred"))
    squared = graph.node("Mul", [centred, centred], graph.temporary(layer, "squared"))
    variance = graph.reduce("ReduceMean", squared, axes, graph.temporary(layer, "variance"),
                            True)
    deviation = graph.node("Sqrt", [variance], graph.temporary(layer, "deviation"))
    eps = graph.constant(f"{layer.name}/eps", param.eps)
    divisor = graph.node("Add", [deviation, eps], graph.temporary(layer, "divisor"))
    graph.node("Div", [centred, divisor], tops[0])
    return [shape]


def _power(graph, layer, bottoms, tops, weights):
    param = layer.power_param
    shape = graph.shapes[bottoms[0]]
    if param.scale == 0 or param.power == 0:  # Caffe ignores the input
        value = 1.0 if param.power == 0 else float(np.float32(param.shift) ** param.power)
        constant = graph.constant(f"{layer.name}/value", value)
        target = graph.constant(f"{layer.name}/shape", shape, np.int64)
        graph.node("Expand", [constant, target], tops[0])
        return [shape]
    steps = [("Mul", "scale", param.scale, 1.0), ("Add", "shift", param.shift, 0.0),
             ("Pow", "power", param.power, 1.0)]
    steps = [step for step in steps if step[2] != step[3]]
    source = bottoms[0]
    if not steps:
        graph.node("Identity", [source], tops[0])
    for index, (op, what, value, _) in enumerate(steps):
        operand = graph.constant(f"{layer.name}/{what}", value)
        output = tops[0] if index == len(steps) - 1 else graph.temporary(layer, f"after_{what}")
        source = graph.node(op, [source, operand], output)
    return [shape]


_REDUCTIONS = {"SUM": "ReduceSum", "MEAN": "ReduceMean", "ASUM": "ReduceL1",
               "SUMSQ": "ReduceSumSquare"}


def _reduction(graph, layer, bottoms, tops, weights):
    param = layer.reduction_param
    shape = graph.shapes[bottoms[0]]
    axis = _axis(layer, param.axis, len(shape))
    operation = type(param).ReductionOp.Name(param.operation)
    axes = list(range(axis, len(shape)))
    if param.coeff == 1:
        graph.reduce(_REDUCTIONS[operation], bottoms[0], axes, tops[0], False)
        return [shape[:axis]]
    reduced = graph.reduce(_REDUCTIONS[operation], bottoms[0], axes,
                           graph.temporary(layer, "reduced"), False)
    coeff = graph.constant(f"{layer.name}/coeff", param.coeff)
    graph.node("Mul", [reduced, coeff], tops[0])
    return [shape[:axis]]


def _scale(graph, layer, bottoms, tops, weights):
    param = layer.scale_param
    shape = graph.shapes[bottoms[0]]
    if len(bottoms) == 2:
        scale_shape = graph.shapes[bottoms[1]]
    else:
        axis = _axis(layer, param.axis, len(shape))
        scale_shape = shape[axis:] if param.num_axes == -1 else shape[axis:axis + param.num_axes]
    axis = 0 if not scale_shape else _axis(layer, param.axis, len(shape))
    if tuple(shape[axis:axis + len(scale_shape)]) != tuple(scale_shape):
        raise ValueError(f"layer {layer.name!r} (Scale): a scale of shape {scale_shape} does not "
                         f"fit a bottom of shape {shape} from axis {axis}")
    broadcast = (*scale_shape, *[1] * (len(shape) - axis - len(scale_shape)))
    blob_shapes = [broadcast] * ((len(bottoms) == 1) + param.bias_term)
    what = ", ".join(["scale"] * (len(bottoms) == 1) + ["bias"] * param.bias_term)
    arrays = _params(layer, weights, blob_shapes, what) if blob_shapes else []
    if len(bottoms) == 2:
        scale = bottoms[1]
        if broadcast != tuple(scale_shape):
            target = graph.constant(f"{layer.name}/scale_shape", broadcast, np.int64)
            scale = graph.node("Reshape", [scale, target], graph.temporary(layer, "scale"))
    else:
        scale = graph.constant(f"{layer.name}/scale", arrays.pop(0))
    if not param.bias_term:
        graph.node("Mul", [bottoms[0], scale], tops[0])
        return [shape]
    scaled = graph.node("Mul", [bottoms[0], scale], graph.temporary(layer, "scaled"))
    graph.node("Add", [scaled, graph.constant(f"{layer.name}/bias", arrays[0])], tops[0])
    return [shape]


def _slice(graph, layer, bottoms, tops, weights):
    param = layer.slice_param
    shape = graph.shapes[bottoms[0]]
    axis = (param.slice_dim if param.HasField("slice_dim")
            else _axis(layer, param.axis, len(shape)))
    size = shape[axis]
    if param.slice_point:
        bounds = [0, *param.slice_point, size]
        sizes = [end - start for start, end in zip(bounds, bounds[1:])]
        if len(sizes) != len(tops) or min(sizes) <= 0:
            raise ValueError(f"layer {layer.name!r} (Slice): slice points "
                             f"{list(param.slice_point)} do not cut {size} into {len(tops)}")
    elif size % len(tops):
        raise ValueError(f"layer {layer.name!r} (Slice): {len(tops)} tops do not divide "
                         f"axis {axis} of size {size}")
    else:
        sizes = [size // len(tops)] * len(tops)
    if len(tops) == 1:
        graph.node("Identity", bottoms, tops[0])
        return [shape]
    split = graph.constant(f"{layer.name}/sizes", sizes, np.int64)
    graph.nodes.append(helper.make_node("Split", [bottoms[0], split], tops,
                                        name=graph.fresh(layer.name), axis=axis))
    return [(*shape[:axis], part, *shape[axis + 1:]) for part in sizes]


def _eltwise(graph, layer, bottoms, tops, weights):
    param = layer.eltwise_param
    shape = graph.shapes[bottoms[0]]
    for bottom in bottoms[1:]:
        if graph.shapes[bottom] != shape:
            raise ValueError(f"layer {layer.name!r} (Eltwise): bottoms of shapes {shape} and "
                             f"{graph.shapes[bottom]}")
    operation = type(param).EltwiseOp.Name(param.operation)
    if param.coeff and (operation != "SUM" or len(param.coeff) != len(bottoms)):
        raise ValueError(f"layer {layer.name!r} (Eltwise): coeff needs operation SUM and one "
                         "value per bottom")
    if operation == "MAX":
        graph.node("Max", bottoms, tops[0])
    elif operation == "SUM":
        terms = list(bottoms)
        for index, coeff in enumerate(param.coeff):
            if coeff != 1:
                factor = graph.constant(f"{layer.name}/coeff{index}", coeff)
                terms[index] = graph.node("Mul", [bottoms[index], factor],
                                          graph.temporary(layer, f"term{index}"))
        graph.node("Sum", terms, tops[0])
    else:
        product = bottoms[0]
        for index, bottom in enumerate(bottoms[1:], start=1):
            output = tops[0] if index == len(bottoms) - 1 else graph.temporary(
                layer, f"product{index}")
            product = graph.node("Mul", [product, bottom], output)
    return [shape]


def _inner_product(graph, layer, bottoms, tops, weights):
    param = layer.inner_product_param
    shape = graph.shapes[bottoms[0]]
    axis = _axis(layer, param.axis, len(shape))
    inputs, outputs = math.prod(shape[axis:]), param.num_output
    weight_shape = (inputs, outputs) if param.transpose else (outputs, inputs)
    arrays = _params(layer, weights, [weight_shape] + [(outputs,)] * param.bias_term,
                     "weights" + ", bias" * param.bias_term)
    names = [graph.constant(f"{layer.name}/{what}", array)
             for what, array in zip(("weight", "bias"), arrays)]
    source = bottoms[0]
    if len(shape) != 2 or axis != 1:
        source = graph.node("Flatten", [source], graph.temporary(layer, "flat"), axis=axis)
    out_shape = (*shape[:axis], outputs)
    if axis == 1:
        graph.node("Gemm", [source, *names], tops[0], transB=int(not param.transpose))
        return [out_shape]
    product = graph.node("Gemm", [source, *names], graph.temporary(layer, "product"),
                         transB=int(not param.transpose))
    target = graph.constant(f"{layer.name}/shape", out_shape, np.int64)
    graph.node("Reshape", [product, target], tops[0])
    return [out_shape]


def _relu(graph, layer, bottoms, tops, weights):
    slope = layer.relu_param.negative_slope
    if slope:
        graph.node("LeakyRelu", bottoms, tops[0], alpha=slope)
    else:
        graph.node("Relu", bottoms, tops[0])
    return [graph.shapes[bottoms[0]]]


def _batchnorm(graph, layer, bottoms, tops, weights):
    param = layer.batch_norm_param
    if param.HasField("use_global_stats") and not param.use_global_stats:
        raise UnsupportedLayerError(
            f"layer {layer.name!r} (BatchNorm) has use_global_stats: false, so Caffe "
            "normalises with each batch's statistics; only stored statistics export")
    shape = graph.shapes[bottoms[0]]
    channels = shape[1] if len(shape) > 1 else 1
    mean, variance, factor = _params(layer, weights, [(channels,), (channels,), (1,)],
                                     "mean, variance, scale factor")
    scale = 0.0 if factor[0] == 0 else 1.0 / factor[0]
    names = [graph.constant(f"{layer.name}/{what}", array) for what, array in (
        ("scale", np.ones(channels)), ("bias", np.zeros(channels)),
        ("mean", mean * np.float32(scale)), ("variance", variance * np.float32(scale)))]
    graph.node("BatchNormalization", [bottoms[0], *names], tops[0], epsilon=param.eps)
    return [shape]


def _concat(graph, layer, bottoms, tops, weights):
    param = layer.concat_param
    shape = graph.shapes[bottoms[0]]
    axis = (param.concat_dim if param.HasField("concat_dim")
            else _axis(layer, param.axis, len(shape)))
    for bottom in bottoms[1:]:
        other = graph.shapes[bottom]
        if len(other) != len(shape) or any(a != b for i, (a, b) in enumerate(zip(shape, other))
                                           if i != axis):
            raise ValueError(f"layer {layer.name!r} (Concat): bottoms of shapes {shape} and "
                             f"{other} do not join along axis {axis}")
    graph.node("Concat", bottoms, tops[0], axis=axis)
    total = sum(graph.shapes[bottom][axis] for bottom in bottoms)
    return [(*shape[:axis], total, *shape[axis + 1:])]


def _dropout(graph, layer, bottoms, tops, weights):
    graph.node("Identity", bottoms, tops[0])
    return [graph.shapes[bottoms[0]]]


def _softmax(graph, layer, bottoms, tops, weights):
    shape = graph.shapes[bottoms[0]]
    graph.node("Softmax", bottoms, tops[0],
               axis=_axis(layer, layer.softmax_param.axis, len(shape)))
    return [shape]


_CONVERTERS = {
    "Input": _input, "Convolution": _convolution, "Pooling": _pooling, "LRN": _lrn,
    "MVN": _mvn, "Power": _power, "Reduction": _reduction, "Scale": _scale, "Slice": _slice,
    "Eltwise": _eltwise, "InnerProduct": _inner_product, "ReLU": _relu,
    "BatchNorm": _batchnorm, "Concat": _concat, "Dropout": _dropout, "Softmax": _softmax,
}


def photo_patches(photos, height, width, count, mean=None):
    """``count`` (count, 3, height, width) float32 crops of RGB photos, mean subtracted.

    photos: (H, W, 3) uint8 RGB arrays, used in turn; a photo smaller than
    the crop is first enlarged (bilinear, aspect ratio kept). The k-th crop
    of a photo lies at fraction 1/2, 1/4, 3/4, 0, 1, 1/2, ... of the free
    range along both axes (the centre, then along the diagonal). mean: per
    channel RGB values to subtract (:data:`ctxpred.models.context.MEAN_RGB` if None).
    """
    if mean is None:
        from ctxpred.models.context import MEAN_RGB
        mean = MEAN_RGB
    if not photos:
        raise ValueError("no photos to crop patches from")
    fractions = (0.5, 0.25, 0.75, 0.0, 1.0)
    patches = []
    for index in range(count):
        photo = np.asarray(photos[index % len(photos)])
        grow = max(height / photo.shape[0], width / photo.shape[1])
        if grow > 1:
            size = (math.ceil(photo.shape[1] * grow), math.ceil(photo.shape[0] * grow))
            photo = cv2.resize(photo, size, interpolation=cv2.INTER_LINEAR)
        fraction = fractions[(index // len(photos)) % len(fractions)]
        top = round((photo.shape[0] - height) * fraction)
        left = round((photo.shape[1] - width) * fraction)
        patches.append(photo[top:top + height, left:left + width])
    array = np.stack(patches).astype(np.float32) - np.asarray(mean, np.float32)
    return np.ascontiguousarray(array.transpose(0, 3, 1, 2))


def compare_with_caffe(deploy_path, weights_path, onnx_path, inputs):
    """(max abs, max relative) difference of the ONNX model's outputs from pycaffe's.

    Parameters
    ----------
    deploy_path, weights_path : path
        The Caffe net (run on the CPU in the TEST phase) and its weights.
    onnx_path : path
        The ONNX model, run with onnxruntime's CPU provider.
    inputs : array or dict
        {input name: array} (or one array for a net with one input). Each
        array's first axis is a multiple of the net's batch for that input;
        both run batch by batch.

    Every net output of Caffe is compared with the ONNX output of the same
    name. The relative difference of an output is its max absolute
    difference over the max |Caffe output|; both results are the maxima over
    outputs. Raises FileNotFoundError for a missing file and ValueError for
    inputs or outputs that do not match.
    """
    import onnxruntime

    for path in (deploy_path, weights_path, onnx_path):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} does not exist")
    caffe = load_caffe()
    net = caffe.Net(str(deploy_path), caffe.TEST)
    load_weights_file(net, weights_path)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs, batches = _checked_inputs(net, session, inputs)
    largest = dict.fromkeys(net.outputs, 0.0)
    differences = dict.fromkeys(net.outputs, 0.0)
    onnx_outputs = [output.name for output in session.get_outputs()]
    for batch in range(batches):
        feed = {}
        for name, array in inputs.items():
            size = net.blobs[name].data.shape[0]
            feed[name] = np.ascontiguousarray(array[batch * size:(batch + 1) * size], np.float32)
            net.blobs[name].data[...] = feed[name]
        expected = net.forward()
        got = dict(zip(onnx_outputs, session.run(onnx_outputs, feed)))
        for name in net.outputs:
            reference = np.asarray(expected[name], np.float64)
            largest[name] = max(largest[name], float(np.abs(reference).max(initial=0)))
            differences[name] = max(differences[name], _difference(reference, got[name]))
    max_abs = max(differences.values())
    max_rel = max(differences[name] / largest[name] if largest[name] else differences[name]
                  for name in net.outputs)
    return max_abs, max_rel


def _checked_inputs(net, session, inputs):
    """({input name: array}, number of batches) after checking ``inputs`` against both nets."""
    if not isinstance(inputs, dict):
        if len(net.inputs) != 1:
            raise ValueError(f"the net has inputs {', '.join(net.inputs)}: pass a dict")
        inputs = {net.inputs[0]: inputs}
    if set(inputs) != set(net.inputs):
        raise ValueError(f"inputs {sorted(inputs)} given, the net has {list(net.inputs)}")
    onnx_outputs = [output.name for output in session.get_outputs()]
    if set(onnx_outputs) != set(net.outputs):
        raise ValueError(f"the ONNX model's outputs {onnx_outputs} are not the Caffe net's "
                         f"{list(net.outputs)}")
    batches = set()
    for name, array in inputs.items():
        blob_shape = net.blobs[name].data.shape
        if np.shape(array)[1:] != blob_shape[1:] or np.shape(array)[0] % blob_shape[0]:
            raise ValueError(f"input {name!r} has shape {np.shape(array)}; the net needs "
                             f"{blob_shape} (the first axis may be a multiple)")
        batches.add(np.shape(array)[0] // blob_shape[0])
    if len(batches) != 1:
        raise ValueError("the inputs hold different numbers of batches")
    return inputs, batches.pop()


def _difference(reference, result):
    """Max |result - reference|; NaN on one side only is infinitely different, on both equal."""
    result = np.asarray(result, np.float64)
    difference = np.where(np.isnan(reference) & np.isnan(result), 0,
                          np.nan_to_num(np.abs(result - reference), nan=np.inf))
    return float(difference.max(initial=0))
