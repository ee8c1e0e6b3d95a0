"""The one extraction path: a net run over many patches or images, batch by batch.

Every tool that runs a net over many inputs (tools/extract_features.py, the
frozen-feature protocols, max_activations, nearest_neighbors, mine,
neighbour_proxy) goes through :class:`CaffeForward`, or its onnxruntime twin
:class:`OnnxForward`. One call takes a batch of uint8 RGB pixels
(n, H, W, 3) and does:

1. input conversion (:func:`net_input`: transpose to N, C, H, W and subtract
   the mean) written straight into the input buffer: Caffe's own input blob,
   or one float32 array allocated once for onnxruntime; no intermediate array;
2. one forward pass; the Caffe net is reshaped only when n changes (the last
   batch of a run), the ONNX graph's batch is fixed and a short last batch
   is padded;
3. the requested blobs returned as (n, ...) views of the runtime's memory,
   valid until the next call: a caller copies only the rows it keeps.

The conversion costs about 1% of AlexNet's forward pass per input, so a
caller that keeps its per-item Python work out of the loop (whole batches of
pixels, one slice copy per image: :func:`ctxpred.features.streaming.patch_batches`)
runs at the speed of a bare ``net.forward()`` loop (benchmarks/extraction.py,
which alternates the two so that other jobs slow both alike; measured that
way, max_activations' whole loop also runs at about 1.0x: its reported
0.24-0.29x compared a run under load with a baseline measured after it).

onnxruntime gets the graph of :func:`ctxpred.weights.onnx.caffe_to_onnx`
rewritten by :func:`for_onnxruntime` (reductions in float64 for parity,
LRN as pooling for speed).

:func:`check_parity` compares two forwards on one batch; the onnxruntime
backend is checked against pycaffe on the first batch of every run.
"""
import os

import numpy as np

from ctxpred.models.context import MEAN_RGB

PARITY_TOLERANCE = 1e-4


def net_input(pixels, out=None, bgr=False):
    """The nets' input: (N, H, W, 3) uint8 RGB -> (N, 3, H, W) float32, channel means subtracted.

    The released nets take RGB minus :data:`ctxpred.models.context.MEAN_RGB`;
    ``bgr`` gives BGR minus the same means in BGR order (the convention of
    the BVLC CaffeNet and of most user caffemodels). Written into ``out``
    (e.g. a net's input blob) when given.
    """
    mean = np.asarray(MEAN_RGB[::-1] if bgr else MEAN_RGB, dtype=np.float32).reshape(1, 3, 1, 1)
    channels = pixels[..., ::-1] if bgr else pixels
    return np.subtract(channels.transpose(0, 3, 1, 2), mean, out=out, dtype=np.float32)


class CaffeForward:
    """A pycaffe Net run on batches of pixels; returns views of the requested blobs.

    net: pycaffe Net with one input blob (N, 3, H, W). outputs: names of
    the blobs to return. bgr: input channel order (:func:`net_input`).
    Attributes: ``net``, ``outputs``, ``input_shape`` (3, H, W).
    """

    def __init__(self, net, outputs, bgr=False):
        missing = [name for name in outputs if name not in net.blobs]
        if missing:
            raise ValueError(f"the net has no blob {missing[0]!r}; its blobs: "
                             f"{', '.join(net.blobs)}")
        self.net = net
        self.outputs = list(outputs)
        self.bgr = bgr
        self._input = net.blobs[net.inputs[0]]
        self.input_shape = tuple(self._input.data.shape[1:])

    def __call__(self, pixels):
        """(n, H, W, 3) uint8 RGB -> {blob: (n, ...) float32 view}, valid until the next call."""
        count = len(pixels)
        if self._input.data.shape[0] != count:
            self._input.reshape(count, *self.input_shape)
        net_input(pixels, out=self._input.data, bgr=self.bgr)
        self.net.forward()
        return {name: self.net.blobs[name].data for name in self.outputs}


_SUMMING_REDUCTIONS = ("ReduceSum", "ReduceSumSquare", "ReduceMean", "ReduceL1")


def _axes_and_keepdims(node, model):
    """(axes list, keepdims) of a Reduce* node; axes from its attribute or its constant input."""
    from onnx import helper, numpy_helper

    settings = {attribute.name: helper.get_attribute_value(attribute)
                for attribute in node.attribute}
    axes = settings.get("axes")
    if axes is None and len(node.input) > 1:
        constant = next(tensor for tensor in model.graph.initializer
                        if tensor.name == node.input[1])
        axes = numpy_helper.to_array(constant).tolist()
    return list(axes), settings.get("keepdims", 1)


def _double_reduction(node, model):
    """A summing Reduce* node summed in float64.

    onnxruntime's float32 reductions add the values one by one: over a
    227 x 227 x 3 image (our deploy nets' RMS normalisation) the relative
    error of ReduceSumSquare reaches 2e-4, where Caffe's BLAS dot product is
    within 1e-5 of the exact sum. ReduceSumSquare is first reduced over the
    last axis in float32 (a few hundred terms: error about 1e-6), the rest
    in float64, which spares casting the whole input (2% of AlexNet's time);
    other reductions cast their input to double.
    """
    from onnx import TensorProto, helper, numpy_helper

    source, target = node.input[0], node.output[0]
    axes, keepdims = _axes_and_keepdims(node, model)
    nodes = []
    if node.op_type == "ReduceSumSquare":
        rows = f"{target}/rows"
        opset = next(entry.version for entry in model.opset_import
                     if entry.domain in ("", "ai.onnx"))
        if opset >= 18:
            model.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64),
                                                                   f"{rows}/axes"))
            nodes.append(helper.make_node("ReduceSumSquare", [source, f"{rows}/axes"], [rows],
                                          keepdims=1))
        else:
            nodes.append(helper.make_node("ReduceSumSquare", [source], [rows], axes=[-1],
                                          keepdims=1))
        source, op = rows, "ReduceSum"
    else:
        op = node.op_type
    model.graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64),
                                                           f"{target}/double_axes"))
    nodes += [helper.make_node("Cast", [source], [f"{source}/double"], to=TensorProto.DOUBLE),
              helper.make_node(op, [f"{source}/double", f"{target}/double_axes"],
                               [f"{target}/double"], keepdims=keepdims),
              helper.make_node("Cast", [f"{target}/double"], [target], to=TensorProto.FLOAT)]
    return nodes


def _pooled_lrn(node, model):
    """An LRN node as x * (bias + alpha * mean of x^2 over ``size`` channels)^-beta
    (x / (s^(1/2) s^(1/4)) for the usual beta 0.75).

    The mean is a 3-D AveragePool over (channels, 1, 1) with zero padding
    counted, as Caffe divides by ``size`` at the edges too; onnxruntime runs
    this about twice as fast as its LRN kernel (same values within 1e-6).
    """
    from onnx import helper, numpy_helper

    settings = {attribute.name: helper.get_attribute_value(attribute)
                for attribute in node.attribute}
    size, name = settings["size"], node.output[0]
    constants = {"axis": np.array([1], np.int64), "alpha": np.float32(settings.get("alpha", 1e-4)),
                 "bias": np.float32(settings.get("bias", 1.0))}
    if settings.get("beta", 0.75) != 0.75:
        constants["minus_beta"] = np.float32(-settings["beta"])
    for key, value in constants.items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), f"{name}/{key}"))
    x, half = node.input[0], (size - 1) // 2
    steps = [("Mul", [x, x], "squared", {}), ("Unsqueeze", [None, f"{name}/axis"], "stacked", {}),
             ("AveragePool", [None], "mean", dict(kernel_shape=[size, 1, 1], count_include_pad=1,
                                                  pads=[half, 0, 0, half, 0, 0])),
             ("Squeeze", [None, f"{name}/axis"], "unstacked", {}),
             ("Mul", [None, f"{name}/alpha"], "scaled", {}),
             ("Add", [None, f"{name}/bias"], "shifted", {})]
    if settings.get("beta", 0.75) == 0.75:  # s^0.75 = sqrt(s) sqrt(sqrt(s)): 4x faster than Pow
        steps += [("Sqrt", [None], "root", {}), ("Sqrt", [None], "fourth_root", {}),
                  ("Mul", [f"{name}/root", None], "denominator", {})]
        last = "Div"
    else:
        steps += [("Pow", [None, f"{name}/minus_beta"], "factor", {})]
        last = "Mul"
    nodes, previous = [], None
    for op, inputs, label, attributes in steps:
        inputs = [previous if value is None else value for value in inputs]
        previous = f"{name}/{label}"
        nodes.append(helper.make_node(op, inputs, [previous], **attributes))
    return nodes + [helper.make_node(last, [x, previous], [name])]


_REWRITES = {**dict.fromkeys(_SUMMING_REDUCTIONS, _double_reduction), "LRN": _pooled_lrn}


def for_onnxruntime(model):
    """``model`` (ModelProto, changed in place) rewritten for onnxruntime's CPU kernels.

    Summing reductions run in float64 (:func:`_double_reduction`: parity
    with Caffe) and LRN runs as pooling (:func:`_pooled_lrn`: speed).
    """
    nodes = []
    for node in model.graph.node:
        rewrite = _REWRITES.get(node.op_type)
        copy = type(node)()
        copy.CopyFrom(node)
        nodes.extend([copy] if rewrite is None else rewrite(copy, model))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def onnx_session(model, threads=None):
    """An onnxruntime CPU session of ONNX ``model`` (ModelProto), tuned for this machine.

    threads: intra-op threads (None: every core). Graph optimisation at the
    highest level (constant folding, Conv+Relu fusion, NCHWc layouts) and
    sequential execution: on 2-4 cores, running independent nodes in
    parallel only takes threads from the convolutions. Idle threads do not
    spin: on a machine shared with other jobs spinning took CPU from them and
    gave no measurable speed (benchmarks/extraction.py, 2 cores, load 8).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(model.SerializeToString(), options,
                                        providers=["CPUExecutionProvider"])


class OnnxForward:
    """:class:`CaffeForward`'s twin on onnxruntime: same call, same results within 1e-4.

    net_param: a deploy NetParameter whose Input layer has the batch size
    of every call (a shorter last batch is padded); weights: {layer:
    [arrays]}; outputs: blobs to return, each a net output (a blob no later
    layer reads: the graph outputs of :func:`ctxpred.weights.onnx.caffe_to_onnx`).
    threads: see :func:`onnx_session`.
    """

    def __init__(self, net_param, weights, outputs, bgr=False, threads=None):
        from ctxpred.weights.onnx import caffe_to_onnx

        model = for_onnxruntime(caffe_to_onnx(net_param, weights))
        graph_outputs = [output.name for output in model.graph.output]
        missing = [name for name in outputs if name not in graph_outputs]
        if missing:
            raise ValueError(f"blob {missing[0]!r} is not an output of the ONNX graph; its "
                             f"outputs: {', '.join(graph_outputs)}")
        self.session = onnx_session(model, threads)
        self.outputs = list(outputs)
        self.bgr = bgr
        graph_input = self.session.get_inputs()[0]
        self._input_name = graph_input.name
        self._buffer = np.zeros(graph_input.shape, dtype=np.float32)
        self.input_shape = tuple(graph_input.shape[1:])

    def __call__(self, pixels):
        """(n, H, W, 3) uint8 RGB, n <= the graph's batch -> {blob: (n, ...) float32}."""
        count = len(pixels)
        if count > len(self._buffer):
            raise ValueError(f"{count} inputs in one call; the ONNX graph takes at most "
                             f"{len(self._buffer)}")
        net_input(pixels, out=self._buffer[:count], bgr=self.bgr)
        results = self.session.run(self.outputs, {self._input_name: self._buffer})
        return {name: result[:count] for name, result in zip(self.outputs, results)}


def forward_all(forward, pixels, batch):
    """{blob: (N, D) float32} of every row of ``pixels`` (N, H, W, 3), ``batch`` rows per call.

    The output arrays are allocated once; each batch's blobs are copied in,
    flattened in C, H, W order.
    """
    results = None
    for start in range(0, len(pixels), batch):
        chunk = pixels[start:start + batch]
        outputs = forward(chunk)
        if results is None:
            results = {name: np.empty((len(pixels), int(np.prod(value.shape[1:]))), np.float32)
                       for name, value in outputs.items()}
        for name, value in outputs.items():
            results[name][start:start + len(chunk)] = value.reshape(len(chunk), -1)
    return results


def check_parity(reference, candidate, pixels, tolerance=PARITY_TOLERANCE, what="onnxruntime"):
    """Largest relative difference of ``candidate``'s blobs from ``reference``'s on ``pixels``.

    Relative difference of a blob: max |candidate - reference| over max
    |reference|. Raises ValueError (one line naming the blob and both
    numbers) when it exceeds ``tolerance``.
    """
    expected = {name: np.array(value, np.float64) for name, value in reference(pixels).items()}
    got = candidate(pixels)
    worst = 0.0
    for name, value in expected.items():
        scale = float(np.abs(value).max(initial=0)) or 1.0
        relative = float(np.abs(np.asarray(got[name], np.float64) - value).max(initial=0)) / scale
        if not relative <= tolerance:  # NaN fails too
            raise ValueError(f"{what} differs from pycaffe on blob {name!r} of the first batch "
                             f"by {relative:.3g} relative (tolerance {tolerance:g})")
        worst = max(worst, relative)
    return worst
