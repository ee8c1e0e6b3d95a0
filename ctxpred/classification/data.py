"""VOC07 multi-label classification fine-tuning (Kraehenbuehl et al. 2016) on stock Caffe.

The protocol of philkr/voc-classification, which needs a modified Caffe for
its augmenting HDF5 input; here the augmentation is a Caffe Python layer:

- labels per image and class (:func:`image_labels`): 1 when the image has a
  non-difficult object of the class, :data:`IGNORE_LABEL` (255) when its only
  objects of the class are "difficult", else 0;
- augmentation (:func:`augment`): a random scale s in [0.5, 2.0] (the image
  resized so that its shorter side is s x crop), a random crop x crop
  window (where the scaled image is smaller than the window, the rest is
  the mean, i.e. 0 after mean subtraction), a horizontal mirror with
  probability 1/2, BGR minus the mean [104, 117, 123];
- loss: Caffe's SigmoidCrossEntropyLoss with ``ignore_label: 255`` and
  ``normalization: BATCH_SIZE`` (the sum over the valid labels divided by
  the batch size, as the reference's Python loss);
- test: the deploy net's ``fc8_cls`` scores summed over crops drawn like the
  training crops (the reference evaluates through its training transform
  too), 1 and 10 crops; AP per class as scikit-learn's average precision
  (ignored labels left out, ties broken against the positives as the
  reference does by subtracting 1e-5 x label), mAP its mean.

Units: images are RGB uint8 (H, W, 3) as decoded; net input is float32
(N, 3, crop, crop) BGR minus :data:`MEAN_BGR`; labels float32 (N, classes).
"""
import json
from dataclasses import dataclass

import cv2
import numpy as np

from ctxpred.caffe.netparam import python_layer_params
from ctxpred.data.images import ImageError, decode_rgb
from ctxpred.detection.voc import AnnotationError, image_path, read_dataset
from ctxpred.evaluation import statistics

IGNORE_LABEL = 255
MEAN_BGR = (104.0, 117.0, 123.0)
MIN_SCALE, MAX_SCALE = 0.5, 2.0
TIE_BREAK = 1e-5


class ClassificationError(ValueError):
    """A dataset, parameter or score array the classification route cannot use."""


def read_class_list(root):
    """The class names of a VOC-layout dataset: ``classes.txt``, one a line."""
    from ctxpred.detection.roidb import DatasetError, read_classes
    try:
        return read_classes(root)
    except DatasetError as error:
        raise ClassificationError(str(error)) from None


def image_labels(annotation, classes):
    """uint8 (len(classes),) labels of one image: 1 present, 255 only difficult, 0 absent."""
    labels = np.zeros(len(classes), np.uint8)
    index = {name: position for position, name in enumerate(classes)}
    for voc_object in annotation.objects:
        if voc_object.name not in index:
            raise ClassificationError(f"{annotation.path or annotation.filename}: object class "
                                      f"{voc_object.name!r} is not in the class list")
        position = index[voc_object.name]
        if not voc_object.difficult:
            labels[position] = 1
        elif labels[position] == 0:
            labels[position] = IGNORE_LABEL
    return labels


@dataclass(frozen=True)
class LabelledImages:
    """A split: image ids, their JPEG paths and labels (n, classes) uint8."""

    ids: tuple
    paths: tuple
    labels: np.ndarray
    classes: tuple


def read_split(root, split, classes=None):
    """:class:`LabelledImages` of ``root/ImageSets/Main/<split>.txt`` (VOC layout).

    Raises ClassificationError naming the file for a missing or broken
    image set, annotation or class list.
    """
    classes = tuple(classes or read_class_list(root))
    try:
        dataset = read_dataset(root, split)
    except AnnotationError as error:
        raise ClassificationError(str(error)) from None
    ids = tuple(image_id for image_id, _ in dataset)
    labels = np.stack([image_labels(annotation, classes) for _, annotation in dataset])
    return LabelledImages(ids, tuple(image_path(root, image_id) for image_id in ids), labels,
                          classes)


def load_image(path):
    """RGB uint8 (H, W, 3) of the image file ``path``; ClassificationError naming it."""
    try:
        with open(path, "rb") as handle:
            return decode_rgb(handle.read(), str(path))
    except (OSError, ImageError) as error:
        raise ClassificationError(f"cannot read image {path}: {error}") from None


def augment(rgb, rng, crop, min_scale=MIN_SCALE, max_scale=MAX_SCALE, mirror=True):
    """One random training crop of ``rgb``: float32 (3, crop, crop), BGR minus the mean.

    Scale s ~ U(min_scale, max_scale); the image is resized (bilinear) so
    that its shorter side is round(s * crop); a crop x crop window at a
    uniformly random offset (when the image is smaller on a side, the image
    sits at a random offset inside the window, the rest 0); mirrored with
    probability 1/2 when ``mirror``. Draws from ``rng`` in that order.
    """
    height, width = rgb.shape[:2]
    scale = rng.uniform(min_scale, max_scale)
    factor = max(1.0, round(scale * crop)) / min(height, width)
    new_h, new_w = max(1, round(height * factor)), max(1, round(width * factor))
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    out = np.zeros((crop, crop, 3), np.float32)
    offsets = []
    for size in (new_h, new_w):
        offsets.append(int(rng.integers(0, abs(size - crop) + 1)))
    (dy, dx), flip = offsets, mirror and rng.random() < 0.5
    source_y, target_y = (dy, 0) if new_h >= crop else (0, dy)
    source_x, target_x = (dx, 0) if new_w >= crop else (0, dx)
    rows, cols = min(crop, new_h), min(crop, new_w)
    window = resized[source_y:source_y + rows, source_x:source_x + cols, ::-1]
    out[target_y:target_y + rows, target_x:target_x + cols] = window - np.float32(MEAN_BGR)
    if flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out.transpose(2, 0, 1))


class BatchStream:
    """Endless augmented batches of a split, in epochs of a seeded random order.

    ``seed`` may be a list (e.g. [seed, start iteration] so that a resumed
    run does not replay its first batches). Returns (data (N, 3, crop, crop)
    float32, labels (N, classes) float32) per :meth:`next`.
    """

    def __init__(self, images, batch_size, crop, seed=0, min_scale=MIN_SCALE,
                 max_scale=MAX_SCALE, mirror=True):
        if batch_size < 1 or not 0 < min_scale <= max_scale:
            raise ClassificationError(f"batch size {batch_size}, scales {min_scale}..{max_scale}:"
                                      " need batch size >= 1 and 0 < min_scale <= max_scale")
        self.images, self.batch_size, self.crop = images, batch_size, crop
        self.scales, self.mirror = (min_scale, max_scale), mirror
        self.rng = np.random.default_rng(seed)
        self.order, self.position = self.rng.permutation(len(images.ids)), 0

    def next(self):
        data = np.empty((self.batch_size, 3, self.crop, self.crop), np.float32)
        labels = np.empty((self.batch_size, len(self.images.classes)), np.float32)
        for slot in range(self.batch_size):
            if self.position == len(self.order):
                self.order, self.position = self.rng.permutation(len(self.images.ids)), 0
            index = self.order[self.position]
            self.position += 1
            data[slot] = augment(load_image(self.images.paths[index]), self.rng, self.crop,
                                 *self.scales, self.mirror)
            labels[slot] = self.images.labels[index]
        return data, labels


def data_layer_param(root, split="trainval", batch_size=16, crop=227, seed=0,
                     min_scale=MIN_SCALE, max_scale=MAX_SCALE, mirror=True):
    """The ``param_str`` (JSON) of :class:`VocClassificationData`."""
    return json.dumps(dict(root=str(root), split=split, batch_size=batch_size, crop=crop,
                           seed=seed, min_scale=min_scale, max_scale=max_scale, mirror=mirror))


def _caffe_layer_base():
    from ctxpred.caffe.env import import_caffe
    return import_caffe().Layer


class VocClassificationData(_caffe_layer_base()):
    """Caffe Python layer: tops ``data`` (N, 3, crop, crop) and ``label`` (N, classes).

    param_str: JSON from :func:`data_layer_param` (root, split, batch_size,
    crop, seed, min_scale, max_scale, mirror). Reads the split at setup
    (a broken dataset stops there with a message naming the file).
    """

    def setup(self, bottom, top):
        if bottom or len(top) != 2:
            raise ClassificationError("VocClassificationData has no bottoms and two tops "
                                      "(data, label)")
        params = python_layer_params("VocClassificationData", self.param_str,
                                     required="root")
        unknown = set(params) - {"root", "split", "batch_size", "crop", "seed", "min_scale",
                                 "max_scale", "mirror"}
        if unknown:
            raise ClassificationError(f"VocClassificationData: unknown parameter(s) "
                                      f"{', '.join(sorted(unknown))}")
        images = read_split(params["root"], params.get("split", "trainval"))
        self.stream = BatchStream(images, int(params.get("batch_size", 16)),
                                  int(params.get("crop", 227)), params.get("seed", 0),
                                  float(params.get("min_scale", MIN_SCALE)),
                                  float(params.get("max_scale", MAX_SCALE)),
                                  bool(params.get("mirror", True)))

    def reshape(self, bottom, top):
        stream = self.stream
        top[0].reshape(stream.batch_size, 3, stream.crop, stream.crop)
        top[1].reshape(stream.batch_size, len(stream.images.classes))

    def forward(self, bottom, top):
        top[0].data[...], top[1].data[...] = self.stream.next()

    def backward(self, top, propagate_down, bottom):
        pass


# ---- scoring -----------------------------------------------------------------------------

def average_precision(labels, scores):
    """Average precision of one class as scikit-learn's ``average_precision_score``.

    ``labels``: 0 / 1 / :data:`IGNORE_LABEL` per image; ignored images are
    left out; scores get -1e-5 x label (ties broken against positives, as
    the reference does). AP = sum over distinct score thresholds of
    (R_n - R_{n-1}) P_n (:func:`ctxpred.evaluation.statistics.average_precision`,
    ``"steps"``). NaN when no positive is left.
    """
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ClassificationError(f"labels {labels.shape} and scores {scores.shape} must be "
                                  "two vectors of the same length")
    valid = labels != IGNORE_LABEL
    truth = labels[valid] == 1
    return statistics.average_precision(truth, scores[valid] - TIE_BREAK * truth, "steps")


def mean_average_precision(labels, scores):
    """(mAP over the classes with a positive, [AP per class]) for (n, classes) arrays."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    aps = [average_precision(labels[:, index], scores[:, index])
           for index in range(labels.shape[1])]
    finite = [ap for ap in aps if not np.isnan(ap)]
    return (float(np.mean(finite)) if finite else float("nan")), aps


def map_statistic(labels, scores):
    """weights (B, n) -> (B,) mAP of (n, classes) ``scores`` on resampled images, scored as
    :func:`mean_average_precision` (ignored labels left out, ties against positives)."""
    labels = np.asarray(labels)
    adjusted = np.asarray(scores, np.float64) - TIE_BREAK * (labels == 1)
    kept = np.where(labels == IGNORE_LABEL, -1, labels)
    return lambda weights: statistics.mean_average_precision(kept, adjusted, "steps", weights)


def bootstrap_interval(labels, scores, resamples=1000, seed=0, level=0.95):
    """(low, high): bootstrap interval of the mAP over images resampled with replacement
    (:func:`ctxpred.evaluation.statistics.bootstrap_interval`)."""
    interval = statistics.bootstrap_interval(map_statistic(labels, scores), len(labels),
                                             resamples, seed, level)
    return interval.low, interval.high


def map_difference(labels, first, second, resamples=1000, seed=0, level=0.95):
    """(mAP(second) - mAP(first), (low, high)): a paired bootstrap over the same images."""
    labels, first, second = np.asarray(labels), np.asarray(first), np.asarray(second)
    if first.shape != second.shape or first.shape != labels.shape:
        raise ClassificationError(f"scores {first.shape} and {second.shape} do not match the "
                                  f"labels {labels.shape}")
    interval = statistics.difference_interval(map_statistic(labels, second),
                                              map_statistic(labels, first), len(labels),
                                              resamples, seed, level)
    return interval.value, (interval.low, interval.high)


def crop_scores(net, images, crops, crop, seed=0, batch_size=16, output="fc8_cls",
                progress=None):
    """(n, classes) scores: ``output`` summed over ``crops`` augmented crops per image.

    ``net``: a TEST-phase deploy net with input ``data``; ``images``:
    :class:`LabelledImages`. Crop k of image i is drawn from
    default_rng([seed, i, k]), so the first crop of a 10-crop run is the
    1-crop run's crop.
    """
    total = None
    for start in range(0, len(images.ids), batch_size):
        stop = min(start + batch_size, len(images.ids))
        rgbs = [load_image(images.paths[index]) for index in range(start, stop)]
        summed = None
        for k in range(crops):
            batch = np.stack([augment(rgb, np.random.default_rng([seed, start + offset, k]), crop)
                              for offset, rgb in enumerate(rgbs)])
            net.blobs["data"].reshape(*batch.shape)
            scores = net.forward(data=batch)[output].reshape(len(rgbs), -1).copy()
            summed = scores if summed is None else summed + scores
        total = summed if total is None else np.concatenate([total, summed])
        if progress:
            progress(stop)
    return total
