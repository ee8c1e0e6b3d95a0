"""From a context-prediction model to the initial weights of Fast R-CNN fine-tuning.

The project page's route in one call (:func:`prepare_detection_init`):

1. fold BatchNorm into the layers before it (:func:`ctxpred.weights.surgery.fold_batchnorm`),
   when the model has BatchNorm layers;
2. keep, by name, the layers the detection net (prototxt/groupless_caffenet.prototxt
   for the AlexNet-style nets, prototxt/vgg16.prototxt for the VGG-style one)
   has before fc6; fc6 and everything above are dropped, their shapes differ;
3. adapt the first convolution to the detection input (:func:`detection_conv1`):
   the projection net's in-net projection is folded into it, and its input
   channels go from the context nets' RGB to Caffe's BGR;
4. magic init with -cs on images (:mod:`ctxpred.weights.magic_init`): the all-zero
   fc6, fc7, fc8 are initialised from data, every layer is rescaled.

The context nets' in-net RMS normalisation is not carried over: magic init
rescales the layers to the detection input instead.
"""
from dataclasses import dataclass

import numpy as np

from ctxpred.caffe.netparam import read_net_param, weight_shapes_of
from ctxpred.data.preprocess import PROJECTION_AXIS, projection_matrix
from ctxpred.models.context import NET_NAMES
from ctxpred.weights.files import read_weights
from ctxpred.weights.magic_init import MagicInitSettings, ZERO_TOLERANCE, run_magic_init
from ctxpred.weights.surgery import batchnorm_pairs, compare_shapes, fold_batchnorm

DETECTION_PROTOTXTS = {"color_dropping": "groupless_caffenet.prototxt",
                       "projection": "groupless_caffenet.prototxt",
                       "vgg": "vgg16.prototxt"}  # under prototxt/
FIRST_DROPPED = "fc6"
FROM_CONTEXT, FROM_DATA = "context model", "data"


@dataclass(frozen=True)
class LayerOrigin:
    """Where one parameter layer of the detection net got its weights.

    source: :data:`FROM_CONTEXT` or :data:`FROM_DATA`. steps: what was done to
    them, in words, in order.
    """

    layer: str
    shape: tuple
    source: str
    steps: tuple


@dataclass(frozen=True)
class DetectionInit:
    """Result of :func:`prepare_detection_init`.

    weights: {layer: [arrays]} of every parameter layer of the detection net.
    origins: a :class:`LayerOrigin` per layer, in network order. dropped:
    layers of the context model left out. summary: magic init's table lines.
    """

    weights: dict
    origins: tuple
    dropped: tuple
    summary: tuple


def detection_conv1(weight, net_name):
    """First-layer weights (C_out, 3, kh, kw) of a context net, for BGR detection input.

    The projection net sees B x (B = I - a a^T / a^T a, a = (-1, 2, -1)),
    so its weights become W B, the same function of the unprojected input.
    Then the input channels are reversed: the context nets take RGB, Caffe's
    detection nets (magic init, Fast R-CNN) BGR. Returns (weight, steps).
    """
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise ValueError(f"the first convolution has weights of shape {weight.shape}, "
                         "not (outputs, 3, kh, kw)")
    steps = []
    if net_name == "projection":
        weight = np.einsum("ochw,cd->odhw", weight.astype(np.float64), projection_matrix())
        steps.append(f"projection along {PROJECTION_AXIS} folded in")
    steps.append("input channels RGB -> BGR")
    return np.ascontiguousarray(weight[:, ::-1], dtype=np.float32), steps


def context_conv_weights(weights, context_param, net_name, detection_shapes, source="the model"):
    """The context model's weights for the detection net's layers before fc6.

    weights: {layer: [arrays]} of the context model. context_param: the
    context net's NetParameter (its BatchNorm layers say what folds).
    detection_shapes: {layer: [blob shapes]} of the detection net, in network
    order. source: the weights' file, for messages.

    Returns ({layer: [W, b]}, {layer: [steps]}, [dropped layer names]).
    Raises ValueError naming ``source`` and the layers when the model lacks
    one of those layers (a wrong net name), a shape differs or a layer holds
    only zeros.
    """
    if net_name not in NET_NAMES:
        raise ValueError(f"unknown net {net_name!r}; choose one of {', '.join(NET_NAMES)}")
    folded = [(layer, batchnorm) for layer, batchnorm in batchnorm_pairs(context_param)
              if batchnorm.name in weights]
    steps = {layer.name: [f"{batchnorm.name} folded in"] for layer, batchnorm in folded}
    if folded:
        weights = fold_batchnorm(weights, context_param)
    order = list(detection_shapes)
    if FIRST_DROPPED not in order:
        raise ValueError(f"the detection net has no {FIRST_DROPPED}")
    kept_shapes = {name: detection_shapes[name] for name in order[:order.index(FIRST_DROPPED)]}
    missing = [name for name in kept_shapes if name not in weights]
    if missing:
        raise ValueError(f"{source} has no {', '.join(missing)}: it is not a {net_name} context "
                         f"model (check the net name; it has {', '.join(weights) or 'no layers'})")
    kept = {name: weights[name] for name in kept_shapes}
    report = compare_shapes(kept_shapes, kept)
    if report.different:
        raise ValueError(f"{source} does not fit the {net_name} detection net: "
                         + "; ".join(report.lines()))
    zero = [name for name, arrays in kept.items() if np.abs(arrays[0]).sum() <= ZERO_TOLERANCE]
    if zero:
        raise ValueError(f"{source}: {', '.join(zero)} hold only zeros (magic init would "
                         "replace them, not keep them)")
    first = order[0]
    kept[first] = list(kept[first])
    kept[first][0], first_steps = detection_conv1(kept[first][0], net_name)
    steps.setdefault(first, []).extend(first_steps)
    dropped = [name for name in weights if name not in kept]
    return kept, {name: steps.get(name, []) for name in kept}, dropped


def prepare_detection_init(caffe, weights_path, net_name, images, context_def, detection_def,
                           batch_size=16, iterations=10, seed=0, bias=0.1, mem_limit_mb=500,
                           log=print):
    """Initial weights of the detection net ``detection_def`` from a context model.

    caffe: pycaffe (device already selected). weights_path: the context
    model (binary or HDF5 caffemodel). net_name: one of
    :data:`ctxpred.models.context.NET_NAMES`. images: what
    :func:`ctxpred.data.images.open_source` opens (a glob, folder, list file,
    LMDB). context_def: the context net's prototxt with its BatchNorm layers
    (prototxt/<net>/train.prototxt). detection_def: the detection deploy
    prototxt (:data:`DETECTION_PROTOTXTS`). batch_size x iterations images
    (resized to the detection input, BGR minus the mean) feed magic init;
    seed seeds the image order, the weights, -cs's diffs and Caffe's RNG (the
    Dropout masks: Dropout is active, as in the reference); bias is the
    target mean of the initialised pre-activations; mem_limit_mb caps the
    gathered data (MB). log receives progress lines.

    Returns a :class:`DetectionInit`. Raises FileNotFoundError naming a
    missing file, ValueError (MagicInitError included) naming the file or
    layer that does not fit, or for fewer than 2 images in all.
    """
    if batch_size * iterations < 2:
        raise ValueError(f"{batch_size} x {iterations} image(s): the fc layers' statistics over "
                         "images need at least 2")
    context_param = read_net_param(context_def)
    weights = read_weights(weights_path)
    detection_param = read_net_param(detection_def)
    detection_shapes = weight_shapes_of(detection_param, detection_def)
    kept, steps, dropped = context_conv_weights(weights, context_param, net_name,
                                                detection_shapes, weights_path)
    settings = MagicInitSettings(batch_size, iterations, bias=bias, mem_limit_mb=mem_limit_mb,
                                 seed=seed)
    result = run_magic_init(caffe, detection_param, images, settings, kept, detection_def, log)
    origins = []
    for name, shapes in detection_shapes.items():
        from_context = name in kept
        layer_steps = list(steps[name]) if from_context else [result.done[name]]
        layer_steps.append(f"-cs x{result.calibration.factors[name]:.3g}")
        origins.append(LayerOrigin(name, tuple(shapes[0]),
                                   FROM_CONTEXT if from_context else FROM_DATA,
                                   tuple(layer_steps)))
    return DetectionInit(result.weights, tuple(origins), tuple(dropped), result.lines)


def origin_lines(init):
    """The provenance table of a :class:`DetectionInit` as text lines, one row per layer."""
    width = max(len(origin.layer) for origin in init.origins) + 2
    shapes = ["x".join(map(str, origin.shape)) for origin in init.origins]
    shape_width = max(map(len, shapes)) + 2
    header = f"{'layer':<{width}}{'weights':<{shape_width}}{'from':<15}steps"
    lines = [header, "-" * max(len(header), 60)]
    for origin, shape in zip(init.origins, shapes):
        lines.append(f"{origin.layer:<{width}}{shape:<{shape_width}}{origin.source:<15}"
                     + "; ".join(origin.steps))
    counts = {source: sum(origin.source == source for origin in init.origins)
              for source in (FROM_CONTEXT, FROM_DATA)}
    lines.append(f"{counts[FROM_CONTEXT]} layer(s) from the context model, "
                 f"{counts[FROM_DATA]} initialised from data")
    if init.dropped:
        lines.append(f"left out of the context model: {', '.join(init.dropped)}")
    return lines
