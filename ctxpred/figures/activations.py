"""Maximal activations (project page figure): the patches that excite each unit most.

- :func:`receptive_fields` reads, from the prototxt's layer geometry, which
  input pixels a unit of a blob sees.
- :func:`unit_activations` turns a blob of a batch into one activation per
  patch and unit: the maximum over positions for a convolutional blob (with
  the position), the value itself for a vector blob (fc).
- :class:`StreamingTopK` keeps, per unit, the k largest activations seen so
  far with the patch id and position, batch by batch, in memory that does
  not grow with the number of patches; its state saves to and loads from
  arrays (an .npz file), so a long run can resume.
- :func:`masked_patch` blacks out a patch outside a unit's receptive field.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctxpred.caffe.geometry import layer_window

# Layers whose top has, unit for unit, the geometry of their first bottom.
_KEEP_GEOMETRY = frozenset({"ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "LRN", "BatchNorm",
                            "Scale", "Bias", "Power", "Dropout", "Eltwise", "Concat", "Slice",
                            "Split", "Normalize", "MVN", "AbsVal", "Exp", "Log"})
# Layers whose top depends on the whole input (one value per sample).
_WHOLE_INPUT = frozenset({"InnerProduct", "Reduction", "Softmax"})


@dataclass(frozen=True)
class ReceptiveField:
    """Input pixels seen by a unit: unit (y, x) sees rows [offset + y*jump, offset + y*jump + size).

    Columns likewise. size, jump, offset: input pixels (offset < 0 where
    the field starts in the zero padding). A blob of whole-input units (fc)
    has jump 0, offset 0 and size = the input's side.
    """

    size: int
    jump: int
    offset: int

    def window(self, y, x, patch):
        """(top, bottom, left, right): the field of unit (y, x) clipped to a ``patch``-pixel input.

        Rows top:bottom and columns left:right, Python slice bounds.
        """
        top, left = self.offset + y * self.jump, self.offset + x * self.jump
        return (max(top, 0), min(top + self.size, patch),
                max(left, 0), min(left + self.size, patch))


def _geometry(layer):
    """(kernel extent, stride, pad) of a Convolution or Pooling layer; ValueError for non-square
    ones."""
    window = layer_window(layer)
    kernel, stride, pad = window.extent, window.stride, window.pad
    if kernel[0] != kernel[1] or stride[0] != stride[1] or pad[0] != pad[1]:
        raise ValueError(f"layer {layer.name}: receptive fields need square kernels, strides "
                         "and pads")
    return kernel[0], stride[0], pad[0]


def receptive_fields(net_param, blob):
    """The :class:`ReceptiveField` of a unit of ``blob`` in the input of NetParameter ``net_param``.

    Walks the layers in order from the (single) Input layer, whose p x p
    input has size 1, jump 1, offset 0. A Convolution or Pooling layer of
    kernel k (dilated), stride s and pad q maps (size, jump, offset) to
    (size + (k - 1) * jump, jump * s, offset - q * jump); element-wise and
    channel layers (ReLU, LRN, BatchNorm, Scale, Eltwise, Concat, ...) keep
    their first bottom's geometry; InnerProduct, Reduction and global
    pooling see the whole input. Raises ValueError for an unknown blob or a
    layer type whose geometry is not known.
    """
    fields = {}
    patch = None
    for layer in net_param.layer:
        if layer.type == "Input":
            patch = int(layer.input_param.shape[0].dim[-1])
            for top in layer.top:
                fields[top] = ReceptiveField(1, 1, 0)
            continue
        if patch is None:
            raise ValueError(f"layer {layer.name} comes before the net's Input layer")
        whole = ReceptiveField(patch, 0, 0)
        below = fields[layer.bottom[0]]
        if layer.type in _WHOLE_INPUT or below.jump == 0 or (
                layer.type == "Pooling" and layer.pooling_param.global_pooling):
            field = whole
        elif layer.type in ("Convolution", "Pooling"):
            kernel, stride, pad = _geometry(layer)
            field = ReceptiveField(below.size + (kernel - 1) * below.jump, below.jump * stride,
                                   below.offset - pad * below.jump)
        elif layer.type in _KEEP_GEOMETRY:
            field = below
        else:
            raise ValueError(f"layer {layer.name}: receptive field of a {layer.type} layer "
                             "is not known")
        for top in layer.top:
            fields[top] = field
    if blob not in fields:
        raise ValueError(f"the net has no blob {blob!r}; its blobs: {', '.join(fields)}")
    return fields[blob]


def unit_activations(data):
    """One activation per patch and unit of a blob, and where it is.

    data: (N, C, H, W) (a convolutional blob: the maximum over the H x W
    positions, first one on ties) or (N, C) (a vector blob: the value,
    position (0, 0)). Returns (values (N, C) float32, ys (N, C) int32,
    xs (N, C) int32), positions in units of the blob.
    """
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        zeros = np.zeros(data.shape, np.int32)
        return data.copy(), zeros, zeros.copy()
    if data.ndim != 4:
        raise ValueError(f"a blob must be (N, C) or (N, C, H, W), got shape {data.shape}")
    n, c, _, width = data.shape
    flat = data.reshape(n, c, -1)
    where = flat.argmax(axis=2)
    values = np.take_along_axis(flat, where[..., None], axis=2)[..., 0]
    return values, (where // width).astype(np.int32), (where % width).astype(np.int32)


class StreamingTopK:
    """Per unit, the k largest activations seen so far, with their patch id and position.

    Arrays (units, k), best first once :meth:`update` has run: ``values``
    float32 (-inf where fewer than k patches were seen), ``patch`` int64
    (patch id, -1 for none), ``y``, ``x`` int32 (position in the blob).
    ``seen``: patches given so far. Memory is O(units * (k + batch)).
    """

    def __init__(self, units, k=9):
        if units < 1 or k < 1:
            raise ValueError(f"units and k must be positive, got {units} and {k}")
        self.units, self.k, self.seen = units, k, 0
        self.values = np.full((units, k), -np.inf, np.float32)
        self.patch = np.full((units, k), -1, np.int64)
        self.y = np.zeros((units, k), np.int32)
        self.x = np.zeros((units, k), np.int32)

    def update(self, values, patch_ids, ys=None, xs=None):
        """Merge a batch: values (n, units), patch_ids (n,), ys / xs (n, units) (default 0)."""
        values = np.asarray(values, np.float32)
        n = len(values)
        if values.shape != (n, self.units) or len(patch_ids) != n:
            raise ValueError(f"expected values ({n}, {self.units}) and {n} patch ids, got "
                             f"{values.shape} and {len(patch_ids)}")
        zeros = np.zeros((n, self.units), np.int32)
        ys = zeros if ys is None else ys
        xs = zeros if xs is None else xs
        ids = np.broadcast_to(np.asarray(patch_ids, np.int64)[:, None], (n, self.units))
        merged = [np.concatenate([mine, theirs.T], axis=1) for mine, theirs in
                  ((self.values, values), (self.patch, ids), (self.y, ys), (self.x, xs))]
        keep = np.argpartition(-merged[0], self.k - 1, axis=1)[:, :self.k]
        order = np.argsort(-np.take_along_axis(merged[0], keep, axis=1), axis=1, kind="stable")
        keep = np.take_along_axis(keep, order, axis=1)
        self.values, self.patch, self.y, self.x = (
            np.take_along_axis(array, keep, axis=1).astype(dtype)
            for array, dtype in zip(merged, (np.float32, np.int64, np.int32, np.int32)))
        self.seen += n

    def state(self, prefix=""):
        """{prefix + name: array} of the whole state (for np.savez)."""
        return {prefix + "values": self.values, prefix + "patch": self.patch,
                prefix + "y": self.y, prefix + "x": self.x,
                prefix + "seen": np.int64(self.seen)}

    @classmethod
    def from_state(cls, arrays, prefix=""):
        """The StreamingTopK whose :meth:`state` (with ``prefix``) is ``arrays`` (an NpzFile)."""
        values = np.asarray(arrays[prefix + "values"], np.float32)
        top = cls(*values.shape)
        top.values = values
        top.patch = np.asarray(arrays[prefix + "patch"], np.int64)
        top.y = np.asarray(arrays[prefix + "y"], np.int32)
        top.x = np.asarray(arrays[prefix + "x"], np.int32)
        top.seen = int(arrays[prefix + "seen"])
        return top


def masked_patch(pixels, field, y, x):
    """Copy of (p, p, 3) uint8 ``pixels`` with everything outside unit (y, x)'s field black."""
    top, bottom, left, right = field.window(y, x, pixels.shape[0])
    masked = np.zeros_like(pixels)
    masked[top:bottom, left:right] = pixels[top:bottom, left:right]
    return masked
