"""Boxes in the VOC pixel convention: overlap, non-maximum suppression, box regression.

Boxes are ``(xmin, ymin, xmax, ymax)`` rows, pixel-inclusive: a box's width
is ``xmax - xmin + 1`` (the "+1 convention" of the VOC devkit and Fast
R-CNN). :func:`box_iou` and :func:`nms` check their input (finite, positive
area) and name what is wrong; the regression helpers (:func:`box_targets`,
:func:`apply_box_deltas`, :func:`clip_boxes`) are Fast R-CNN's, on arrays
the roidb already checked.
"""
import numpy as np


def checked_boxes(boxes, what) -> np.ndarray:
    """(N, 4) float64 finite VOC boxes with positive +1-convention width and height."""
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return array.reshape(0, 4)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"{what}: expected an (N, 4) array of (xmin, ymin, xmax, ymax) boxes, "
                         f"got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what}: box {int(np.flatnonzero(~np.isfinite(array).all(1))[0])} "
                         "has a non-finite coordinate")
    empty = (array[:, 2] - array[:, 0] + 1 <= 0) | (array[:, 3] - array[:, 1] + 1 <= 0)
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise ValueError(f"{what}: box {row} {array[row].tolist()} has no area "
                         "(xmax - xmin + 1 and ymax - ymin + 1 must be positive)")
    return array


def iou_matrix(a, b) -> np.ndarray:
    """(N, M) IoU of checked (N, 4) and (M, 4) boxes, +1 pixel convention."""
    inter_w = np.maximum(np.minimum(a[:, None, 2], b[None, :, 2])
                         - np.maximum(a[:, None, 0], b[None, :, 0]) + 1, 0)
    inter_h = np.maximum(np.minimum(a[:, None, 3], b[None, :, 3])
                         - np.maximum(a[:, None, 1], b[None, :, 1]) + 1, 0)
    intersection = inter_w * inter_h
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    return intersection / (area_a[:, None] + area_b[None, :] - intersection)


def box_iou(boxes_a, boxes_b) -> np.ndarray:
    """Intersection over union of every pair: (N, 4), (M, 4) VOC boxes -> (N, M) float64.

    Pixel-inclusive ("+1") convention: box (1, 1, 10, 10) covers 100 pixels.
    Boxes may be fractional (detections) but need a positive +1 width/height.
    """
    return iou_matrix(checked_boxes(boxes_a, "boxes_a"), checked_boxes(boxes_b, "boxes_b"))


def checked_scores(scores, count, what) -> np.ndarray:
    array = np.asarray(scores, dtype=np.float64)
    if array.shape != (count,):
        raise ValueError(f"{what}: expected {count} scores, got shape {array.shape}")
    if np.isnan(array).any():
        raise ValueError(f"{what}: score {int(np.flatnonzero(np.isnan(array))[0])} is NaN")
    return array


def nms(boxes, scores, threshold) -> np.ndarray:
    """Greedy non-maximum suppression, Fast R-CNN's ``py_cpu_nms`` semantics.

    boxes: (N, 4) VOC boxes; scores: (N,). Repeatedly keeps the best
    remaining box and drops the remaining boxes whose IoU (+1 convention)
    with it is above ``threshold`` (IoU equal to it survives). Returns the
    kept indices as int64, by descending score; equal scores keep the lower
    index first.
    """
    boxes = checked_boxes(boxes, "nms boxes")
    scores = checked_scores(scores, len(boxes), "nms scores")
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        order = rest[iou_matrix(boxes[best:best + 1], boxes[rest])[0] <= threshold]
    return np.array(keep, dtype=np.int64)


def box_targets(rois, gt_boxes):
    """Fast R-CNN regression targets (dx, dy, dw, dh) from rois to gt boxes, both (K, 4)."""
    widths = rois[:, 2] - rois[:, 0] + 1.0
    heights = rois[:, 3] - rois[:, 1] + 1.0
    gt_widths = gt_boxes[:, 2] - gt_boxes[:, 0] + 1.0
    gt_heights = gt_boxes[:, 3] - gt_boxes[:, 1] + 1.0
    return np.stack([
        (gt_boxes[:, 0] + 0.5 * gt_widths - rois[:, 0] - 0.5 * widths) / widths,
        (gt_boxes[:, 1] + 0.5 * gt_heights - rois[:, 1] - 0.5 * heights) / heights,
        np.log(gt_widths / widths), np.log(gt_heights / heights)], axis=1)


def apply_box_deltas(boxes, deltas):
    """Inverse of :func:`box_targets`: boxes (K, 4), deltas (K, 4C) -> boxes (K, 4C)."""
    widths = boxes[:, 2:3] - boxes[:, 0:1] + 1.0
    heights = boxes[:, 3:4] - boxes[:, 1:2] + 1.0
    centre_x = boxes[:, 0:1] + 0.5 * widths
    centre_y = boxes[:, 1:2] + 0.5 * heights
    x = deltas[:, 0::4] * widths + centre_x
    y = deltas[:, 1::4] * heights + centre_y
    half_w = 0.5 * np.exp(deltas[:, 2::4]) * widths
    half_h = 0.5 * np.exp(deltas[:, 3::4]) * heights
    out = np.empty(deltas.shape, np.float32)
    out[:, 0::4], out[:, 1::4] = x - half_w, y - half_h
    out[:, 2::4], out[:, 3::4] = x + half_w, y + half_h
    return out


def clip_boxes(boxes, height, width):
    """Clip (K, 4C) boxes to the image (0-based pixels)."""
    boxes[:, 0::4] = np.clip(boxes[:, 0::4], 0, width - 1)
    boxes[:, 1::4] = np.clip(boxes[:, 1::4], 0, height - 1)
    boxes[:, 2::4] = np.clip(boxes[:, 2::4], 0, width - 1)
    boxes[:, 3::4] = np.clip(boxes[:, 3::4], 0, height - 1)
    return boxes
