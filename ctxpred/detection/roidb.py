"""Fast R-CNN training data and testing over a VOC-format dataset, in numpy.

The pieces of Fast R-CNN (Girshick, ICCV 2015) that live outside the net:
the "roidb" (per image: ground truth plus proposals, their overlaps and
regression targets), minibatch sampling, image blobs, box regression, and
detection with per-class NMS. :mod:`ctxpred.detection.roi_data` wraps the training
side as a Caffe Python layer; :func:`detect_dataset` runs a test net over a
split and :mod:`ctxpred.detection.voc` scores it.

Conventions (those of Fast R-CNN's code): boxes inside this module are
0-based pixel coordinates (x1, y1, x2, y2), inclusive, of the original
image; VOC files and proposal files hold 1-based boxes and are converted on
reading. Images are BGR float32 minus the pixel means, as Caffe's CaffeNet
and VGG16 were trained. Class 0 is the background.
"""
from dataclasses import dataclass, field, fields
from pathlib import Path

import cv2
import numpy as np

from ctxpred.data.images import ImageError, decode_rgb_sized
from ctxpred.detection.proposals import load_proposals
from ctxpred.detection.voc import image_path, read_dataset
from ctxpred.detection.boxes import apply_box_deltas, box_iou, box_targets, clip_boxes, nms


class DatasetError(ValueError):
    """A detection dataset that cannot be used; the message names the file."""


@dataclass(frozen=True)
class DetectionConfig:
    """Fast R-CNN's training and test settings (cfg.TRAIN / cfg.TEST), in one place.

    scales: shorter image side(s) in pixels (one drawn per training image;
        every scale at test time); max_size caps the longer side.
    ims_per_batch, batch_size: images and RoIs per minibatch.
    fg_fraction: share of RoIs with IoU >= fg_thresh to a ground-truth box;
        the rest are background, IoU in [bg_thresh_lo, bg_thresh_hi).
    bbox_thresh: proposals with IoU >= this get regression targets.
    use_flipped: also train on left-right flipped images.
    pixel_means: BGR means subtracted from images.
    nms_thresh, max_per_image, score_thresh: test-time detection.
    """
    scales: tuple = (600,)
    max_size: int = 1000
    ims_per_batch: int = 2
    batch_size: int = 128
    fg_fraction: float = 0.25
    fg_thresh: float = 0.5
    bg_thresh_hi: float = 0.5
    bg_thresh_lo: float = 0.1
    bbox_thresh: float = 0.5
    use_flipped: bool = True
    pixel_means: tuple = (102.9801, 115.9465, 122.7717)
    nms_thresh: float = 0.3
    max_per_image: int = 100
    score_thresh: float = 0.05

    @classmethod
    def from_dict(cls, values):
        """Build from a dict, naming unknown keys in the error (lists become tuples)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown detection setting(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**{key: tuple(value) if isinstance(value, list) else value
                      for key, value in values.items()})


@dataclass
class RoidbEntry:
    """One (possibly flipped) training image: its boxes and their targets.

    boxes (K, 4) float32: ground truth first, then proposals (0-based).
    gt_classes (K,): class of the ground-truth rows, 0 for proposals.
    max_overlaps (K,), max_classes (K,): best IoU with any ground-truth box
        and that box's class.
    targets (K, 5): class (0 = none) and (dx, dy, dw, dh) to the best box,
        for rows with max_overlaps >= bbox_thresh.
    """
    image: str
    width: int
    height: int
    boxes: np.ndarray
    gt_classes: np.ndarray
    max_overlaps: np.ndarray
    max_classes: np.ndarray
    targets: np.ndarray = field(default=None)
    flipped: bool = False


def read_classes(dataset):
    """The class names of a dataset (``classes.txt``, one a line, background excluded)."""
    path = Path(dataset, "classes.txt")
    try:
        classes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as error:
        raise DatasetError(f"cannot read the class list {path}: {error}") from error
    if not classes:
        raise DatasetError(f"{path} lists no classes")
    return classes


def _entry(image, annotation, proposals, classes, bbox_thresh):
    index = {name: number for number, name in enumerate(classes, start=1)}
    gt = np.array([obj.box for obj in annotation.objects], np.float32).reshape(-1, 4) - 1
    gt_classes = np.array([index[obj.name] for obj in annotation.objects], np.int32)
    boxes = np.vstack([gt, proposals - 1]).astype(np.float32)
    classes_of_rows = np.concatenate([gt_classes, np.zeros(len(proposals), np.int32)])
    if len(gt):
        overlaps = box_iou(boxes + 1, gt + 1)
        best = overlaps.argmax(axis=1)
        max_overlaps = overlaps[np.arange(len(boxes)), best].astype(np.float32)
        max_classes = gt_classes[best]
    else:
        best = np.zeros(len(boxes), np.int64)
        max_overlaps = np.zeros(len(boxes), np.float32)
        max_classes = np.zeros(len(boxes), np.int32)
    max_classes = np.where(max_overlaps > 0, max_classes, 0).astype(np.int32)
    entry = RoidbEntry(image, annotation.width, annotation.height, boxes, classes_of_rows,
                       max_overlaps, max_classes)
    entry.targets = np.zeros((len(boxes), 5), np.float32)
    with_target = max_overlaps >= bbox_thresh
    if len(gt) and with_target.any():
        entry.targets[with_target, 0] = max_classes[with_target]
        entry.targets[with_target, 1:] = box_targets(boxes[with_target], gt[best[with_target]])
    return entry


def flipped(entry):
    """The left-right mirrored copy of a roidb entry (targets recomputed: dx changes sign)."""
    boxes = entry.boxes.copy()
    boxes[:, 0] = entry.width - entry.boxes[:, 2] - 1
    boxes[:, 2] = entry.width - entry.boxes[:, 0] - 1
    targets = entry.targets.copy()
    targets[:, 1] = -targets[:, 1]
    return RoidbEntry(entry.image, entry.width, entry.height, boxes, entry.gt_classes,
                      entry.max_overlaps, entry.max_classes, targets, flipped=True)


def build_roidb(dataset, split, proposals_path, classes, config=DetectionConfig()):
    """The roidb of a VOC-format split: one entry per image (twice with flips).

    Missing or bad annotations and images raise ctxpred.detection.voc.AnnotationError,
    missing proposals ctxpred.detection.proposals.ProposalError, each naming the file.
    """
    items = read_dataset(dataset, split, classes)
    proposals = load_proposals(proposals_path, [image_id for image_id, _ in items])
    roidb = [_entry(image_path(dataset, image_id), annotation, proposals[image_id], classes,
                    config.bbox_thresh)
             for image_id, annotation in items]
    if config.use_flipped:
        roidb += [flipped(entry) for entry in roidb]
    return roidb


def usable_entries(roidb, config=DetectionConfig()):
    """The entries with a RoI to sample, and how many were dropped (Fast R-CNN's filter_roidb).

    An entry has one when some box overlaps an object by fg_thresh or more,
    or lies in the background range [bg_thresh_lo, bg_thresh_hi); an image
    without objects has neither when bg_thresh_lo > 0.
    """
    def usable(entry):
        overlaps = entry.max_overlaps
        return bool(np.any(overlaps >= config.fg_thresh)
                    or np.any((overlaps < config.bg_thresh_hi) & (overlaps >= config.bg_thresh_lo)))
    kept = [entry for entry in roidb if usable(entry)]
    return kept, len(roidb) - len(kept)


def target_statistics(roidb, num_classes):
    """Per-class means and standard deviations (num_classes, 4) of the regression targets."""
    targets = np.vstack([entry.targets for entry in roidb])
    means = np.zeros((num_classes, 4))
    stds = np.ones((num_classes, 4))
    for cls in range(1, num_classes):
        rows = targets[targets[:, 0] == cls, 1:]
        if len(rows):
            means[cls] = rows.mean(axis=0)
            stds[cls] = np.maximum(rows.std(axis=0), 1e-6)
    return means.astype(np.float32), stds.astype(np.float32)


def unnormalised_bbox_weights(weight, bias, means, stds):
    """bbox_pred weights (4C, D), bias (4C,) that output unnormalised deltas.

    Training regresses (target - mean) / std; folding the statistics into the
    layer (as Fast R-CNN does when it snapshots) lets a test net use raw output.
    """
    return weight * stds.reshape(-1, 1), bias * stds.reshape(-1) + means.reshape(-1)


def read_image(path, config):
    """(BGR uint8 image, its full (height, width)) of a dataset image, as detection needs it.

    Decoded upright (EXIF orientation) and, for large JPEGs, at a reduced DCT
    scale that still holds every pixel the largest of ``config.scales`` and
    ``config.max_size`` use, so memory is bounded by the config, not by the
    file (ordinary photos come at full size). Raises DatasetError naming an
    unreadable image.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        rgb, full_size = decode_rgb_sized(data, str(path), max(config.scales) * config.max_size)
    except (OSError, ImageError) as error:
        raise DatasetError(f"cannot read image {path}: {error}") from error
    return np.ascontiguousarray(rgb[:, :, ::-1]), full_size


def image_blob(images, config, scale, full_sizes=None):
    """Images (list of BGR uint8 (H, W, 3)) -> blob (N, 3, H', W') float32 and their scales.

    Each image is mean-subtracted and resized so that its full-size shorter
    side is ``scale`` pixels unless its longer side would exceed
    ``config.max_size``; smaller images are zero-padded at the bottom right.
    ``full_sizes``: each image's full (height, width) when it was decoded
    smaller (:func:`read_image`); the scales returned map full-size pixels to
    the blob's.
    """
    resized, scales = [], []
    for image, size in zip(images, full_sizes or [image.shape[:2] for image in images]):
        factor = min(scale / min(size), config.max_size / max(size))
        pixels = image.astype(np.float32) - np.array(config.pixel_means, np.float32)
        target = (int(round(size[1] * factor)), int(round(size[0] * factor)))
        resized.append(cv2.resize(pixels, target, interpolation=cv2.INTER_LINEAR))
        scales.append(factor)
    height = max(image.shape[0] for image in resized)
    width = max(image.shape[1] for image in resized)
    blob = np.zeros((len(resized), 3, height, width), np.float32)
    for index, image in enumerate(resized):
        blob[index, :, :image.shape[0], :image.shape[1]] = image.transpose(2, 0, 1)
    return blob, np.array(scales)


def sample_rois(entry, rois_per_image, num_classes, config, rng):
    """Fast R-CNN's RoI sampling for one image.

    Returns rois (R, 4) in original-image pixels, labels (R,) int, and
    bbox_targets, bbox_loss_weights (R, 4 * num_classes): the target in the
    four columns of the RoI's class, weight 1 there, zeros elsewhere and for
    background RoIs.
    """
    fg_per_image = int(np.round(config.fg_fraction * rois_per_image))
    foreground = np.flatnonzero(entry.max_overlaps >= config.fg_thresh)
    if len(foreground) > fg_per_image:
        foreground = rng.choice(foreground, fg_per_image, replace=False)
    background = np.flatnonzero((entry.max_overlaps < config.bg_thresh_hi)
                                & (entry.max_overlaps >= config.bg_thresh_lo))
    bg_count = min(rois_per_image - len(foreground), len(background))
    if len(background) > bg_count:
        background = rng.choice(background, bg_count, replace=False)
    keep = np.concatenate([foreground, background]).astype(np.int64)
    labels = entry.max_classes[keep].astype(np.int64)
    labels[len(foreground):] = 0
    targets = entry.targets[keep]
    bbox_targets = np.zeros((len(keep), 4 * num_classes), np.float32)
    weights = np.zeros_like(bbox_targets)
    rows = np.flatnonzero((targets[:, 0] > 0) & (labels > 0))
    columns = 4 * targets[rows, 0:1].astype(np.int64) + np.arange(4)
    bbox_targets[rows[:, None], columns] = targets[rows, 1:]
    weights[rows[:, None], columns] = 1.0
    return entry.boxes[keep], labels, bbox_targets, weights


def normalised_targets(roidb, means, stds):
    """Replace each entry's targets by (target - mean) / std of its class, in place."""
    for entry in roidb:
        rows = entry.targets[:, 0] > 0
        cls = entry.targets[rows, 0].astype(int)
        entry.targets[rows, 1:] = (entry.targets[rows, 1:] - means[cls]) / stds[cls]


def detect(net, image, boxes, config, cls_blob="cls_prob", bbox_blob="bbox_pred",
           full_size=None):
    """Class scores and regressed boxes of proposals on one image (Fast R-CNN's im_detect).

    image: BGR uint8 (H, W, 3), decoded smaller than its ``full_size`` (H, W)
    when given (:func:`read_image`); boxes: (K, 4) full-size proposals
    (0-based). The test
    net takes ``data`` and ``rois``. With several ``config.scales`` each RoI
    is scored at the scale where its area comes closest to 224x224 pixels, as
    in Fast R-CNN's multiscale testing. Returns scores (K, C) and boxes
    (K, 4C), clipped to the image.
    """
    height, width = full_size or image.shape[:2]
    per_scale = [image_blob([image], config, scale, [(height, width)])
                 for scale in config.scales]
    factors = np.array([factor[0] for _, factor in per_scale])
    areas = ((boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1))[:, None]
    level = np.abs(areas * factors[None, :] ** 2 - 224 * 224).argmin(axis=1)
    scores = np.zeros((len(boxes), 0), np.float32)
    deltas = None
    for index, (blob, _) in enumerate(per_scale):
        rows = np.flatnonzero(level == index)
        if rows.size == 0:
            continue
        rois = np.hstack([np.zeros((rows.size, 1)), boxes[rows] * factors[index]])
        net.blobs["data"].reshape(*blob.shape)
        net.blobs["rois"].reshape(*rois.shape)
        out = net.forward(data=blob, rois=rois.astype(np.float32))
        if deltas is None:
            classes = out[cls_blob].shape[1]
            scores = np.zeros((len(boxes), classes), np.float32)
            deltas = np.zeros((len(boxes), 4 * classes), np.float32)
        scores[rows] = out[cls_blob].reshape(rows.size, -1)
        deltas[rows] = out[bbox_blob].reshape(rows.size, -1)
    if deltas is None:
        return scores, np.zeros((0, 0), np.float32)
    return scores, clip_boxes(apply_box_deltas(boxes, deltas), height, width)


def class_detections(scores, boxes, config):
    """Per class (1..C-1): (D, 5) rows of VOC box (1-based) and score after NMS and the cap."""
    per_class = []
    for cls in range(1, scores.shape[1]):
        keep = np.flatnonzero(scores[:, cls] > config.score_thresh)
        found = np.hstack([boxes[keep, 4 * cls:4 * cls + 4] + 1, scores[keep, cls:cls + 1]])
        per_class.append(found[nms(found[:, :4], found[:, 4], config.nms_thresh)]
                         if len(found) else np.zeros((0, 5), np.float32))
    all_scores = np.concatenate([found[:, 4] for found in per_class])
    if len(all_scores) > config.max_per_image:
        threshold = np.sort(all_scores)[-config.max_per_image]
        per_class = [found[found[:, 4] >= threshold] for found in per_class]
    return per_class


def detect_dataset(net, dataset, split, proposals_path, classes, config=DetectionConfig(),
                   progress=None):
    """Detections of a test net over a split: {class name: [(image id, score, VOC box)]}.

    Also returns the annotations {image id: Annotation} for scoring with
    ctxpred.detection.voc.evaluate_detections.
    """
    items = read_dataset(dataset, split, classes)
    proposals = load_proposals(proposals_path, [image_id for image_id, _ in items])
    detections = {name: [] for name in classes}
    for image_id, annotation in items:
        image, full_size = read_image(image_path(dataset, image_id), config)
        scores, boxes = detect(net, image, proposals[image_id] - 1, config, full_size=full_size)
        for name, found in zip(classes, class_detections(scores, boxes, config)):
            detections[name].extend((image_id, float(row[4]), tuple(map(float, row[:4])))
                                    for row in found)
        if progress is not None:
            progress()
    return detections, dict(items)
