"""The deploy net of a feature extractor: its prototxt read and checked, and weights
fitted onto it layer by layer.

Weights are checked in Python before any is copied (:func:`fit_weights`):
Caffe itself would abort the process on a shape mismatch.
"""
from ctxpred.caffe.netparam import read_net_param, weight_shapes_of


class WeightMismatchError(ValueError):
    """Weights that do not fit a deploy net; the message names every offending layer."""


def read_deploy_param(path):
    """The NetParameter of a deploy prototxt (see ctxpred.caffe.netparam.read_net_param).

    Raises ValueError naming the file when it has no Input layer, or when
    Caffe cannot build it (checked in a child process,
    :func:`ctxpred.caffe.netparam.weight_shapes_of`: building it here would abort).
    """
    param = read_net_param(path)
    if sum(layer.type == "Input" for layer in param.layer) != 1:
        raise ValueError(f"{path} needs exactly one Input layer (or input: header) "
                         "to be a feature net")
    weight_shapes_of(param, path)
    return param


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
