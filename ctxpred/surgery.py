"""Weight surgery between nets: copy by layer name, and the two fc7 layouts.

The reference pair head has one ``fc7`` on concatenated pair features,
weights W (4096 x 8192) = [A | B] and bias b. The factorized head has
``fc7_first`` (A, no bias) and ``fc7_second`` (B, b), applied per patch.
"""
import numpy as np

FIRST, SECOND = "fc7_first", "fc7_second"


def net_params(net):
    """{layer name: [array, ...]} copies of a pycaffe Net's parameters."""
    return {name: [blob.data.copy() for blob in blobs] for name, blobs in net.params.items()}


def to_factorized_head(params):
    """Split a reference ``fc7`` into ``fc7_first`` and ``fc7_second`` (new dict)."""
    params = dict(params)
    weight, bias = params.pop("fc7")
    half = weight.shape[1] // 2
    params[FIRST] = [weight[:, :half].copy()]
    params[SECOND] = [weight[:, half:].copy(), bias.copy()]
    return params


def to_reference_head(params):
    """Join ``fc7_first`` and ``fc7_second`` into the reference ``fc7`` (new dict)."""
    params = dict(params)
    (first,), (second, bias) = params.pop(FIRST), params.pop(SECOND)
    params["fc7"] = [np.concatenate([first, second], axis=1), bias.copy()]
    return params


def load_params(net, params, strict=True):
    """Copy {layer: [arrays]} into a pycaffe Net by layer name.

    With ``strict``, a layer of either side missing on the other, or a shape
    difference, raises ValueError naming the layers; otherwise only the
    layers both have are copied. Returns the names copied.
    """
    missing = sorted(set(net.params) - set(params))
    unused = sorted(set(params) - set(net.params))
    if strict and (missing or unused):
        raise ValueError(f"parameter layers differ: the net has {missing} without weights, "
                         f"the weights have {unused} without a layer")
    copied = []
    for name in sorted(set(net.params) & set(params)):
        blobs, arrays = net.params[name], params[name]
        shapes = [blob.data.shape for blob in blobs], [array.shape for array in arrays]
        if shapes[0] != shapes[1]:
            raise ValueError(f"layer {name}: the net's blobs have shapes {shapes[0]}, "
                             f"the weights {shapes[1]}")
        for blob, array in zip(blobs, arrays):
            blob.data[...] = array
        copied.append(name)
    return copied
