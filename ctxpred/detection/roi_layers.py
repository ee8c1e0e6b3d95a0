"""RoI max pooling and the smooth L1 loss of Fast R-CNN as Caffe Python layers.

Fast R-CNN (Girshick, ICCV 2015) trains with two C++ layers of its Caffe fork
(rbgirshick/caffe-fast-rcnn), ``ROIPooling`` and ``SmoothL1Loss``; stock BVLC
Caffe has neither. The layers here stand in for them, with the fork's
arithmetic (forward and backward), so that a Fast R-CNN net runs on stock
Caffe with only its two layer definitions changed::

    layer {
      name: "roi_pool5" type: "Python"
      bottom: "conv5" bottom: "rois" top: "pool5"
      python_param {
        module: "ctxpred.detection.roi_layers" layer: "ROIPooling"
        param_str: '{"pooled_h": 6, "pooled_w": 6, "spatial_scale": 0.0625}'
      }
    }
    layer {
      name: "loss_bbox" type: "Python"
      bottom: "bbox_pred" bottom: "bbox_targets" bottom: "bbox_loss_weights"
      top: "loss_bbox"
      python_param { module: "ctxpred.detection.roi_layers" layer: "SmoothL1Loss" }
      loss_weight: 1
    }

``loss_weight`` must be written out: Caffe treats a Python layer as a loss
only when its top has one, and hands it to the layer as the top's diff.

ROIPooling
    Bottoms: features (N, C, H, W); rois (R, 5), rows
    ``[batch_index, x1, y1, x2, y2]`` in input-image pixels (inclusive
    corners). Top: (R, C, pooled_h, pooled_w). ``param_str`` JSON needs
    ``pooled_h``, ``pooled_w`` (positive ints) and ``spatial_scale`` (feature
    cells per image pixel, 1/16 for CaffeNet and VGG16 conv5).

    Rounding, as in the fork: each corner is multiplied by ``spatial_scale``
    and rounded half away from zero (C ``round``); the RoI is
    ``max(x2 - x1 + 1, 1)`` cells wide and ``max(y2 - y1 + 1, 1)`` high; bin
    ``ph`` spans rows ``floor(ph * bin_h)`` to ``ceil((ph + 1) * bin_h)``
    (end excluded) after the RoI's first row, with ``bin_h = height /
    pooled_h`` in float32, and the same for columns; bins are clipped to the
    feature map. A bin left empty by the clipping outputs 0 and has argmax -1.
    Ties go to the first cell in row-major order.

    Backward: each output's gradient goes to its argmax cell, summed over
    RoIs and bins. Like the fork, a cell outside the RoI's rounded box gets
    nothing, even when a bin reached it: float32 rounding lets the last bin
    run one cell past the box (e.g. 7 bins over 57 rows), and a RoI with
    ``x2 < x1`` after rounding pools the cell at its first corner but passes
    no gradient. The rois get no gradient.

SmoothL1Loss
    Bottoms, all (N, 4K): bbox_pred, bbox_targets and, optionally,
    bbox_loss_weights (Fast R-CNN, 3 bottoms) or inside and outside weights
    (py-faster-rcnn, 4 bottoms). Top: the scalar loss
    ``sum(w_out * f(w_in * (pred - target))) / N`` with
    ``f(x) = 0.5 * sigma^2 * x^2`` if ``|x| < 1 / sigma^2``, else
    ``|x| - 0.5 / sigma^2``. ``param_str`` is optional JSON ``{"sigma": s}``
    (default 1, the original Fast R-CNN loss).

    Backward, as in the fork: ``top_diff / N * w_out * f'(w_in * (pred -
    target))`` into bbox_pred and its negative into bbox_targets (when Caffe
    asks for it). Like the fork, it leaves out the chain-rule factor
    ``w_in``: exact for 0/1 weights, which is all Fast R-CNN uses.
"""
import math
from typing import NamedTuple

import numpy as np

from ctxpred.caffe.env import import_caffe
from ctxpred.caffe.netparam import python_layer_params

caffe = import_caffe()

ROI_POOLING_KEYS = ("pooled_h", "pooled_w", "spatial_scale")

#: Feature values gathered into one temporary array by roi_pool_forward
#: (float32 elements, 64 MiB); bounds memory for large RoIs.
GATHER_BUDGET = 1 << 24


class RoiBoxes(NamedTuple):
    """RoIs in feature-map cells, rounded as the fork does; each field (R,) int64.

    ``start_*`` and ``end_*`` are inclusive and may lie outside the map.
    """
    batch_index: np.ndarray
    start_w: np.ndarray
    start_h: np.ndarray
    end_w: np.ndarray
    end_h: np.ndarray


def _round_half_away_from_zero(values):
    """C's ``round`` of float32 values, as int64 (numpy rounds half to even)."""
    wide = values.astype(np.float64)
    return (np.sign(wide) * np.floor(np.abs(wide) + 0.5)).astype(np.int64)


def roi_boxes(rois, spatial_scale, batch_size):
    """Scale and round image-pixel RoIs to feature-map cells.

    Parameters
    ----------
    rois : array (R, 5)
        Rows ``[batch_index, x1, y1, x2, y2]`` in input-image pixels.
    spatial_scale : float
        Feature cells per image pixel.
    batch_size : int
        N of the feature blob; every batch index must lie in [0, N).

    Returns
    -------
    RoiBoxes
    """
    rois = np.asarray(rois, dtype=np.float32)
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must have shape (R, 5) [batch_index, x1, y1, x2, y2], "
                         f"got {rois.shape}")
    batch_index = rois[:, 0].astype(np.int64)
    bad = (batch_index < 0) | (batch_index >= batch_size)
    if bad.any():
        raise ValueError(f"RoI {int(np.flatnonzero(bad)[0])} has batch index "
                         f"{rois[bad][0, 0]:g}, outside the {batch_size} feature maps")
    scaled = _round_half_away_from_zero(rois[:, 1:] * np.float32(spatial_scale))
    return RoiBoxes(batch_index, *scaled.T)


def _bin_bounds(roi_start, roi_end, pooled, limit):
    """First and past-the-end cell of every bin along one axis, clipped to [0, limit].

    roi_start, roi_end: (R,) inclusive RoI bounds in cells. Returns two (R, pooled)
    int64 arrays. Bin sizes are float32, as in the fork.
    """
    size = np.maximum(roi_end - roi_start + 1, 1).astype(np.float32)
    bin_size = size / np.float32(pooled)
    steps = np.arange(pooled + 1, dtype=np.float32)
    edges = steps[None, :] * bin_size[:, None]
    low = np.floor(edges[:, :-1]).astype(np.int64) + roi_start[:, None]
    high = np.ceil(edges[:, 1:]).astype(np.int64) + roi_start[:, None]
    return np.clip(low, 0, limit), np.clip(high, 0, limit)


def _pool_windows(padded, batch_index, rows, cols, window):
    """Max of each bin's window for RoIs whose largest bins are ``window`` cells.

    Parameters
    ----------
    padded : float32 array (N, H + 1, W + 1, C)
        Channels-last features with a last row and column of -inf.
    batch_index : (g,) int
    rows, cols : pairs (low, high) of (g, pooled_h) and (g, pooled_w) int
        Clipped bin bounds along each axis.
    window : (int, int)
        Largest bin height and width in the group (at least 1 each).

    Returns
    -------
    values : float32 (g, pooled_h, pooled_w, C)
    flat_index : int64 (g, pooled_h, pooled_w, C), ``h * W + w`` of the maxima.
    """
    height, width = padded.shape[1] - 1, padded.shape[2] - 1
    row_cells = rows[0][:, :, None] + np.arange(window[0])
    row_cells = np.where(row_cells < rows[1][:, :, None], row_cells, height)
    col_cells = cols[0][:, :, None] + np.arange(window[1])
    col_cells = np.where(col_cells < cols[1][:, :, None], col_cells, width)
    windows = padded[batch_index[:, None, None, None, None],
                     row_cells[:, :, None, :, None], col_cells[:, None, :, None, :]]
    # windows: (g, pooled_h, pooled_w, window_h, window_w, C). The fork keeps
    # the first maximum in row-major order; argmax over a boolean "is the
    # maximum" array finds it several times faster than argmax over floats.
    values = windows.max(axis=(3, 4))
    is_max = windows == values[:, :, :, None, None]
    slot = is_max.reshape(*is_max.shape[:3], window[0] * window[1], -1).argmax(axis=3)
    row = rows[0][:, :, None, None] + slot // window[1]
    col = cols[0][:, None, :, None] + slot % window[1]
    return values, row * width + col


def roi_pool_forward(features, rois, pooled_h, pooled_w, spatial_scale):
    """Max-pool every RoI into a pooled_h x pooled_w grid of bins (the fork's ROIPooling).

    Parameters
    ----------
    features : array (N, C, H, W)
    rois : array (R, 5)
        Rows ``[batch_index, x1, y1, x2, y2]`` in input-image pixels.
    pooled_h, pooled_w : int
        Bins per RoI, vertically and horizontally.
    spatial_scale : float
        Feature cells per image pixel (1/16 for conv5 of CaffeNet and VGG16).

    Returns
    -------
    pooled : float32 array (R, C, pooled_h, pooled_w)
        Bin maxima; 0 for empty bins.
    argmax : int32 array (R, C, pooled_h, pooled_w)
        Flat index ``h * W + w`` of each maximum within its (H, W) map; -1 for
        empty bins.
    """
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 4:
        raise ValueError(f"features must have shape (N, C, H, W), got {features.shape}")
    batch, channels, height, width = features.shape
    boxes = roi_boxes(rois, spatial_scale, batch)
    row_low, row_high = _bin_bounds(boxes.start_h, boxes.end_h, pooled_h, height)
    col_low, col_high = _bin_bounds(boxes.start_w, boxes.end_w, pooled_w, width)
    # Channels last, so that each gathered cell is one contiguous run of C
    # values, plus a row and a column of -inf for padded window slots.
    padded = np.full((batch, height + 1, width + 1, channels), -np.inf, dtype=np.float32)
    padded[:, :height, :width] = features.transpose(0, 2, 3, 1)

    count = len(boxes.batch_index)
    pooled = np.empty((count, pooled_h, pooled_w, channels), dtype=np.float32)
    argmax = np.empty((count, pooled_h, pooled_w, channels), dtype=np.int32)
    # RoIs whose largest bins have the same size are pooled together, so that
    # no RoI's windows are padded beyond its own largest bin.
    window_h = np.maximum((row_high - row_low).max(axis=1, initial=0), 1)
    window_w = np.maximum((col_high - col_low).max(axis=1, initial=0), 1)
    for window in np.unique(np.stack([window_h, window_w], axis=1), axis=0):
        members = np.flatnonzero((window_h == window[0]) & (window_w == window[1]))
        per_roi = pooled_h * pooled_w * int(window[0]) * int(window[1]) * channels
        pieces = min(len(members), math.ceil(len(members) * per_roi / GATHER_BUDGET))
        for group in np.array_split(members, pieces):
            pooled[group], argmax[group] = _pool_windows(
                padded, boxes.batch_index[group], (row_low[group], row_high[group]),
                (col_low[group], col_high[group]), (int(window[0]), int(window[1])))

    empty = (row_high <= row_low)[:, :, None] | (col_high <= col_low)[:, None, :]
    pooled[empty] = 0
    argmax[empty] = -1
    return (np.ascontiguousarray(pooled.transpose(0, 3, 1, 2)),
            np.ascontiguousarray(argmax.transpose(0, 3, 1, 2)))


def roi_pool_backward(top_diff, argmax, rois, bottom_shape, spatial_scale):
    """Gradient of roi_pool_forward with respect to the features, as the fork computes it.

    Parameters
    ----------
    top_diff : array (R, C, pooled_h, pooled_w)
    argmax : int array (R, C, pooled_h, pooled_w)
        From roi_pool_forward.
    rois : array (R, 5)
        The RoIs given to roi_pool_forward.
    bottom_shape : (N, C, H, W)
    spatial_scale : float
        As given to roi_pool_forward; locates each RoI's rounded box, outside
        which the fork passes no gradient (see the module docstring).

    Returns
    -------
    float32 array (N, C, H, W)
        Every output's gradient added to its argmax cell; overlapping RoIs
        and bins accumulate.
    """
    batch, channels, height, width = bottom_shape
    top_diff = np.asarray(top_diff)
    argmax = np.asarray(argmax)
    if top_diff.shape != argmax.shape or top_diff.ndim != 4 or top_diff.shape[1] != channels:
        raise ValueError(f"top_diff {top_diff.shape} and argmax {argmax.shape} must both be "
                         f"(R, {channels}, pooled_h, pooled_w)")
    boxes = roi_boxes(rois, spatial_scale, batch)
    if len(boxes.batch_index) != len(argmax):
        raise ValueError(f"{len(boxes.batch_index)} RoIs but argmax is for {len(argmax)}")

    # Bins never start before their RoI's box, so only its far edges need a
    # check; a RoI with x2 < x1 or y2 < y1 after rounding fails it everywhere.
    past_last_row = ((boxes.end_h + 1) * width)[:, None, None, None]
    last_col = boxes.end_w[:, None, None, None]
    passes = (argmax >= 0) & (argmax < past_last_row) & (argmax % width <= last_col)
    plane = boxes.batch_index[:, None, None, None] * channels + np.arange(channels)[:, None, None]
    flat = np.broadcast_to(plane, argmax.shape)[passes] * (height * width) + argmax[passes]
    gradient = np.bincount(flat, weights=top_diff[passes],
                           minlength=batch * channels * height * width)
    return gradient.reshape(bottom_shape).astype(np.float32)


def smooth_l1_loss(pred, targets, inside_weights=None, outside_weights=None, sigma=1.0):
    """The fork's SmoothL1Loss: loss and its gradient with respect to ``pred``.

    Parameters
    ----------
    pred, targets : arrays (N, ...) of one shape
        Box regression outputs and targets (Fast R-CNN: (N, 4K)).
    inside_weights : array like pred, or None
        Multiplies ``pred - targets`` before the smooth L1 (Fast R-CNN's
        bbox_loss_weights; None means ones).
    outside_weights : array like pred, or None
        Multiplies each term after it (py-faster-rcnn; None means ones).
    sigma : float
        The quadratic zone is ``|x| < 1 / sigma^2``; 1 gives Fast R-CNN's loss.

    Returns
    -------
    loss : float
        ``sum(w_out * f(w_in * (pred - targets))) / N``.
    gradient : float64 array like pred
        ``w_out * f'(w_in * (pred - targets)) / N``, the fork's gradient for a
        loss weight of 1: without the factor ``w_in`` (exact for 0/1 weights).
        The gradient for ``targets`` is its negative.
    """
    pred = np.asarray(pred, dtype=np.float64)
    difference = pred - np.asarray(targets, dtype=np.float64)
    if inside_weights is not None:
        difference *= inside_weights
    sigma2 = float(sigma) ** 2
    quadratic = np.abs(difference) < 1.0 / sigma2
    errors = np.where(quadratic, 0.5 * sigma2 * difference ** 2,
                      np.abs(difference) - 0.5 / sigma2)
    slopes = np.where(quadratic, sigma2 * difference, np.sign(difference))
    if outside_weights is not None:
        errors *= outside_weights
        slopes *= outside_weights
    batch = pred.shape[0]
    return float(errors.sum()) / batch, slopes / batch


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_roi_pooling_params(param_str):
    """``(pooled_h, pooled_w, spatial_scale)`` from a ROIPooling param_str.

    All three keys are required: positive integers and a positive finite
    scale. Raises ValueError naming the missing, unknown or bad key.
    """
    params = python_layer_params("ROIPooling", param_str)
    unknown = sorted(set(params) - set(ROI_POOLING_KEYS))
    if unknown:
        raise ValueError(f"ROIPooling param_str has unknown key(s) {unknown}; "
                         f"expected {list(ROI_POOLING_KEYS)}")
    missing = [key for key in ROI_POOLING_KEYS if key not in params]
    if missing:
        raise ValueError(f"ROIPooling param_str lacks {missing}: {param_str!r}")
    for key in ("pooled_h", "pooled_w"):
        value = params[key]
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ValueError(f"ROIPooling {key} must be a positive integer, got {value!r}")
    scale = params["spatial_scale"]
    if not (_is_number(scale) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"ROIPooling spatial_scale must be a positive number, got {scale!r}")
    return params["pooled_h"], params["pooled_w"], float(scale)


def parse_smooth_l1_params(param_str):
    """``sigma`` from a SmoothL1Loss param_str (optional JSON ``{"sigma": s}``, default 1)."""
    params = python_layer_params("SmoothL1Loss", param_str)
    unknown = sorted(set(params) - {"sigma"})
    if unknown:
        raise ValueError(f"SmoothL1Loss param_str has unknown key(s) {unknown}; "
                         "the only key is \"sigma\"")
    sigma = params.get("sigma", 1.0)
    if not (_is_number(sigma) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"SmoothL1Loss sigma must be a positive number, got {sigma!r}")
    return float(sigma)


class ROIPooling(caffe.Layer):
    """Python stand-in for the fork's ROIPooling layer (see the module docstring)."""

    def setup(self, bottom, top):
        if len(bottom) != 2 or len(top) != 1:
            raise ValueError("ROIPooling takes 2 bottoms (features, rois) and 1 top, "
                             f"got {len(bottom)} and {len(top)}")
        self.pooled_h, self.pooled_w, self.spatial_scale = parse_roi_pooling_params(
            self.param_str)

    def reshape(self, bottom, top):
        if len(bottom[0].shape) != 4:
            raise ValueError(f"ROIPooling features must be (N, C, H, W), "
                             f"got shape {tuple(bottom[0].shape)}")
        roi_shape = tuple(bottom[1].shape)
        if not roi_shape or bottom[1].count != roi_shape[0] * 5:
            raise ValueError(f"ROIPooling rois must be (R, 5) [batch_index, x1, y1, x2, y2], "
                             f"got shape {roi_shape}")
        top[0].reshape(roi_shape[0], bottom[0].shape[1], self.pooled_h, self.pooled_w)

    def _rois(self, bottom):
        return bottom[1].data.reshape(-1, 5)

    def forward(self, bottom, top):
        top[0].data[...], self.argmax = roi_pool_forward(
            bottom[0].data, self._rois(bottom), self.pooled_h, self.pooled_w,
            self.spatial_scale)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = roi_pool_backward(
                top[0].diff, self.argmax, self._rois(bottom), bottom[0].data.shape,
                self.spatial_scale)


class SmoothL1Loss(caffe.Layer):
    """Python stand-in for the fork's SmoothL1Loss layer (see the module docstring)."""

    #: Names of the bottoms in error messages; py-faster-rcnn calls the third
    #: one bbox_inside_weights.
    BOTTOMS = ("bbox_pred", "bbox_targets", "bbox_loss_weights", "bbox_outside_weights")

    def setup(self, bottom, top):
        if not 2 <= len(bottom) <= 4 or len(top) != 1:
            raise ValueError("SmoothL1Loss takes 2 to 4 bottoms (bbox_pred, bbox_targets, "
                             "[bbox_loss_weights | inside and outside weights]) and 1 top, "
                             f"got {len(bottom)} and {len(top)}")
        self.sigma = parse_smooth_l1_params(self.param_str)

    def reshape(self, bottom, top):
        expected = tuple(bottom[0].shape)
        for index in range(1, len(bottom)):
            shape = tuple(bottom[index].shape)
            if shape != expected:
                raise ValueError(f"SmoothL1Loss {self.BOTTOMS[index]} has shape {shape}, "
                                 f"bbox_pred has {expected}: they must match")
        top[0].reshape()

    def forward(self, bottom, top):
        # pycaffe's blob vectors cannot be sliced.
        weights = [bottom[index].data if index < len(bottom) else None for index in (2, 3)]
        loss, self.gradient = smooth_l1_loss(bottom[0].data, bottom[1].data, *weights,
                                             sigma=self.sigma)
        top[0].data[...] = loss

    def backward(self, top, propagate_down, bottom):
        scale = float(top[0].diff.flat[0])
        for index, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[index]:
                bottom[index].diff[...] = sign * scale * self.gradient
