"""The reference's magic init procedure, step by step: the yardstick for ctxpred.weights.magic_init.

philkr/magic_init (Kraehenbuehl et al., ICLR 2016), as the public facts
describe it, written plainly so that tests and ``benchmarks/magic_init.py``
can check ctxpred's tool against it: its weight and pre-activation
statistics (they must agree within the noise between seeds) and its cost
(wall time and peak memory). It is not the tool users run
(``tools/magic_init.py`` is); it does only what the project page's command
needs: ``-t elwise``, with or without ``-cs``, images given as a list.

The procedure:

- One net, built in Caffe's TRAIN phase with ``force_backward``: an
  ImageData layer (tops ``data``, ``label``) reading the images in list order,
  squashed to the net's input size, mean BGR [104, 117, 123] subtracted,
  times ``scale``, in batches of ``batch_size``; then every layer of the
  given net after its input (Softmax and loss layers stay in the net). So
  Dropout layers are active: each forward draws a new mask (Caffe's RNG).
- Within-layer initialisation, layer by layer in network order. For each
  layer, ``iterations`` batches of its bottoms are set one after another and
  the layer alone is forwarded; copies of its tops are kept, and a blob is
  dropped after the last layer that reads it. An all-zero parameter layer
  (sum |W| <= 1e-10) first gets i.i.d. N(0, 1) weights; its kept bottoms are
  forwarded through it, and with mu, sigma each output channel's mean and std
  over all batches and positions, W <- W / sigma, b <- -mu / sigma + bias.
- ``-cs``: one more batch from the ImageData layer is forwarded layer by
  layer, recording each parameter layer's input scale (mean |bottom|) and the
  output's mean per-channel std s (output: the last layer that is not
  Softmax / loss). Up to 10 rounds: fresh N(0, 1) diffs at the output, a
  backward pass, r_k = sqrt(mean(dW_k^2) / mean(W_k^2)), target = geometric
  mean of r_k times s^(1/K); stop when every |log r_k / log target - 1| <
  0.01; else, forwarding the same batch again layer by layer, each parameter
  layer's biases are multiplied by its input's change of scale, then its
  weights and biases by sqrt(r_k / target), and s is measured again.

Randomness: ``rng`` (numpy Generator) draws weights and diffs; Dropout
masks come from Caffe's own RNG (seed it with ``caffe.set_random_seed``).
"""
import math
import tempfile
from pathlib import Path

import numpy as np

from ctxpred.weights.magic_init import (MEAN_BGR, PARAMETER_TYPES, ZERO_TOLERANCE, MagicInitError,
                                input_size)

STRIPPED = ("Softmax", "SoftmaxWithLoss", "SigmoidCrossEntropyLoss")
ROUNDS = 10
TOLERANCE = 0.01


def reference_net_param(net_param, list_file, batch_size, scale=1.0):
    """The NetParameter the reference builds with -d: ImageData on ``list_file``, then the net.

    ``list_file`` holds ``path label`` lines. The net's Input layers (and
    ``input:`` header fields) are replaced by the ImageData layer, whose
    tops are ``data`` and ``label``; the first Input layer's top must be
    ``data``. Sets ``force_backward``.
    """
    height, width = input_size(net_param)
    out = type(net_param)()
    out.CopyFrom(net_param)
    for field in ("input", "input_shape", "input_dim"):
        out.ClearField(field)
    del out.layer[:]
    out.force_backward = True
    image_data = out.layer.add(name="data", type="ImageData", top=["data", "label"])
    image_data.image_data_param.source = str(list_file)
    image_data.image_data_param.batch_size = batch_size
    image_data.image_data_param.new_height = height
    image_data.image_data_param.new_width = width
    image_data.transform_param.mean_value.extend(MEAN_BGR)
    image_data.transform_param.scale = scale
    inputs = [layer for layer in net_param.layer if layer.type == "Input"]
    if inputs and inputs[0].top[0] != "data":
        raise MagicInitError(f"input layer {inputs[0].name} has top {inputs[0].top[0]}: "
                             "the reference procedure feeds a blob named data")
    out.layer.extend(layer for layer in net_param.layer if layer.type != "Input")
    return out


def write_list_file(paths, list_file):
    """Write ``path 0`` lines (absolute paths) for ImageData; returns ``list_file``."""
    Path(list_file).write_text("".join(f"{Path(path).resolve()} 0\n" for path in paths),
                               encoding="utf-8")
    return list_file


def _layers(net):
    names = list(net._layer_names)
    return [(index, name, net.layers[index], list(net.bottom_names[name]),
             list(net.top_names[name])) for index, name in enumerate(names)]


def _last_reader(net):
    """{blob: index of the last layer reading it}."""
    last = {}
    for index, _, _, bottoms, _ in _layers(net):
        for bottom in bottoms:
            last[bottom] = index
    return last


def _run_layer(net, index, data, tops, count):
    """Forward layer ``index`` ``count`` times on the kept bottoms; copies of its tops per batch."""
    out = {top: [] for top in tops}
    for batch in range(count):
        for name, arrays in data.items():
            net.blobs[name].data[...] = arrays[batch]
        net._forward(index, index)
        for top in tops:
            out[top].append(net.blobs[top].data.copy())
    return out


def _channels_last(arrays):
    """All batches of a blob as (samples, channels): channels on axis 1, samples over batch
    and space."""
    return np.concatenate([array.swapaxes(0, 1).reshape(array.shape[1], -1).T
                           for array in arrays])


def _drop_unused(kept, last, index):
    for name in list(kept):
        if last.get(name, -1) <= index:
            del kept[name]


def initialize(net, iterations=10, bias=0.1, rng=None):
    """Within-layer initialisation of every all-zero parameter layer (elwise); see module doc.

    Returns the names of the layers it initialised.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    last, kept, done = _last_reader(net), {}, []
    for index, name, layer, bottoms, tops in _layers(net):
        if len(layer.blobs) and np.abs(layer.blobs[0].data).sum() <= ZERO_TOLERANCE:
            if layer.type not in PARAMETER_TYPES or len(tops) != 1:
                raise MagicInitError(f"layer {name} ({layer.type}) cannot be initialised")
            for blob in layer.blobs:
                blob.data[...] = 0
            weights = layer.blobs[0].data
            weights[...] = rng.standard_normal(weights.shape)
            outputs = _channels_last(_run_layer(net, index, {b: kept[b] for b in bottoms},
                                                tops, iterations)[tops[0]])
            mean, std = outputs.mean(axis=0), outputs.std(axis=0)
            weights /= std.reshape((-1,) + (1,) * (weights.ndim - 1))
            for blob in list(layer.blobs)[1:]:
                blob.data[...] = -mean / std + bias
            done.append(name)
        kept.update(_run_layer(net, index, {b: kept[b] for b in bottoms}, tops, iterations))
        _drop_unused(kept, last, index)
    return done


def calibrate(net, rng=None, rounds=ROUNDS):
    """The reference's -cs on one new batch of the net's data layer; returns the rounds rescaled."""
    rng = np.random.default_rng(0) if rng is None else rng
    last = _last_reader(net)
    layers = _layers(net)
    output = max(index for index, _, layer, _, _ in layers if layer.type not in STRIPPED)
    output_tops = layers[output][4]
    parameters = [(index, name, layer) for index, name, layer, _, _ in layers[:output + 1]
                  if len(layer.blobs)]
    kept, inputs, input_scale = {}, {}, {}

    def forward_pass(scales=None):
        nonlocal kept
        kept = {}
        for index, name, layer, bottoms, tops in layers[:output + 1]:
            if not bottoms and index in inputs:  # an input layer: the stored batch
                kept.update(inputs[index])
                continue
            if len(layer.blobs):
                current = float(np.mean([np.mean(np.abs(kept[b][0])) for b in bottoms]))
                if scales is not None:
                    for blob in list(layer.blobs)[1:]:
                        blob.data[...] *= current / input_scale[name]
                    for blob in layer.blobs:
                        blob.data[...] *= scales[name]
                input_scale[name] = current
            new = _run_layer(net, index, {b: kept[b] for b in bottoms}, tops, 1)
            if not bottoms:
                inputs[index] = new
            kept.update(new)
            _drop_unused(kept, last, index)
        return float(np.mean(_channels_last(kept[output_tops[0]]).std(axis=0)))

    output_std = forward_pass()
    for round_ in range(rounds):
        for layer in net.layers:
            for blob in layer.blobs:
                blob.diff[...] = 0
        for top in output_tops:
            net.blobs[top].diff[...] = rng.standard_normal(net.blobs[top].shape)
        net._backward(output, 0)
        ratios = {name: math.sqrt(np.mean(np.square(layer.blobs[0].diff, dtype=np.float64))
                                  / np.mean(np.square(layer.blobs[0].data, dtype=np.float64)))
                  for _, name, layer in parameters}
        logs = np.log(np.array(list(ratios.values())))
        target = math.exp(logs.mean()) * output_std ** (1 / len(ratios))
        if np.all(np.abs(logs / math.log(target) - 1) < TOLERANCE):
            return round_
        output_std = forward_pass({name: math.sqrt(ratio / target)
                                   for name, ratio in ratios.items()})
    return rounds


def run(caffe, prototxt, images, output, batch_size=16, iterations=10, seed=0,
        correct_scaling=True, load=None, bias=0.1, scale=1.0):
    """The reference's command ``-d IMAGES [-cs] [-l LOAD] PROTOTXT OUTPUT`` (-t elwise).

    ``images``: a list of image paths, read in that order. Seeds Caffe's RNG
    (the Dropout masks) with ``seed`` and draws weights and diffs from
    ``numpy.random.default_rng(seed)``. Writes the net's weights to
    ``output`` (Caffe's binary format) and returns the initialised layers.
    """
    from ctxpred.caffe.netparam import instantiate, read_net_param

    with tempfile.TemporaryDirectory() as folder:
        list_file = write_list_file(images, Path(folder, "images.txt"))
        net = instantiate(reference_net_param(read_net_param(prototxt), list_file, batch_size,
                                              scale), "train")
    if load is not None:
        net.copy_from(str(load))
    caffe.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    done = initialize(net, iterations, bias, rng)
    if correct_scaling:
        calibrate(net, rng)
    net.save(str(output))
    return done
