"""PASCAL VOC datasets (XML annotations, ImageSets lists) and VOC detection evaluation.

A VOC devkit-style folder ``root`` holds ``root/Annotations/<id>.xml``,
``root/JPEGImages/<id>.jpg`` and ``root/ImageSets/Main/<split>.txt`` (one id
per line). Boxes are VOC pixel boxes ``(xmin, ymin, xmax, ymax)``: 1-based,
inclusive integers, so a box's width is ``xmax - xmin + 1`` (the "+1
convention" of the devkit and of Fast R-CNN). Fast R-CNN's own arrays are
0-based: add 1 to its boxes before evaluating them here, as its results
writer does.

Reading rules (every problem raises :class:`AnnotationError`, whose message
names the file and, for an object, its 0-based index among the
``<object>`` elements; nothing is silently dropped):

- Coordinates and sizes are integers. Integral floats such as ``"123.0"``
  (written by some labelling tools) are accepted; any other value, such as
  ``"12.5"``, is rejected rather than rounded, because a fractional box
  means a different coordinate convention that rounding would hide.
- A box must lie in the image: ``1 <= xmin <= xmax <= width`` and
  ``1 <= ymin <= ymax <= height``. Sizes must be positive.
- ``<difficult>`` and ``<truncated>`` are ``0`` or ``1``; missing means 0
  (some VOC2012 files lack ``<difficult>``).
- Class names are stripped of surrounding white space and compared exactly;
  given ``classes``, an object of any other class is an error.
- An annotation with no objects is valid (VOC has such images): it is
  returned with ``objects == ()``; callers decide whether to use it.
- The image file of an id must exist (:func:`read_dataset`); its size is
  not compared with ``<size>`` (that would open every image).

Evaluation follows the VOC devkit (``VOCevaldet.m``, which Fast R-CNN's
original code runs through MATLAB). Detections are taken in descending
score order; ties keep their input order, as the devkit's stable MATLAB
sort does (ties are common: Fast R-CNN writes scores rounded to 3
decimals). Each detection is matched to the ground truth box of its class
in its image with the highest IoU (the first one on ties), whether or not
that box is already taken. It is a true positive if that IoU is at least
``iou_threshold`` and the box is neither difficult nor taken (it then takes
it), a false positive if the IoU is below the threshold or the box is
taken (a duplicate), and neither if the box is difficult. Difficult
objects are not counted as positives. Two details differ from some ports
and are deliberate: the match test is ``IoU >= threshold`` as in the
devkit (py-faster-rcnn's Python port ``voc_eval.py`` uses ``>``), and the
11-point recall thresholds are exactly ``k / 10`` (``np.arange(0, 1.1,
0.1)`` puts the 0.3, 0.6 and 0.7 thresholds one ulp above, so a recall of
exactly 3/10 would miss the 0.3 point there).
"""
from __future__ import annotations

import math
import os
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import numpy as np

from ctxpred.detection.boxes import checked_boxes, checked_scores, iou_matrix
from ctxpred.evaluation.statistics import curve_average_precision


class AnnotationError(ValueError):
    """A VOC annotation, image set or dataset folder is unusable; the message names the file."""


def _as_int(value) -> int | None:
    """int of an integral number or numeric string (``7``, ``"7"``, ``"7.0"``); None otherwise."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or not number.is_integer():
        return None
    return int(number)


def _box_problem(box, width, height) -> str | None:
    """What is wrong with a VOC box (4 ints) in a width x height image, or None."""
    xmin, ymin, xmax, ymax = box
    checks = ((xmin < 1, f"xmin {xmin} < 1"), (ymin < 1, f"ymin {ymin} < 1"),
              (xmax > width, f"xmax {xmax} > width {width}"),
              (ymax > height, f"ymax {ymax} > height {height}"),
              (xmin > xmax, f"xmin {xmin} > xmax {xmax}"),
              (ymin > ymax, f"ymin {ymin} > ymax {ymax}"))
    problems = [text for failed, text in checks if failed]
    return ", ".join(problems) if problems else None


@dataclass(frozen=True)
class VocObject:
    """One annotated object: class name and VOC box (1-based inclusive ints).

    ``box`` is normalised to a tuple of 4 Python ints; integral floats are
    accepted, anything else raises ValueError.
    """
    name: str
    box: tuple
    difficult: bool = False
    truncated: bool = False

    def __post_init__(self):
        values = tuple(self.box)
        coordinates = tuple(_as_int(value) for value in values)
        if len(values) != 4 or None in coordinates:
            raise ValueError(f"object {self.name!r}: box {values!r} is not 4 integer pixel "
                             "coordinates (xmin, ymin, xmax, ymax)")
        object.__setattr__(self, "box", coordinates)
        object.__setattr__(self, "difficult", bool(self.difficult))
        object.__setattr__(self, "truncated", bool(self.truncated))


@dataclass(frozen=True)
class Annotation:
    """One image's VOC annotation.

    Construction validates it (positive integer size, every box inside the
    image) and raises :class:`AnnotationError` naming ``path`` (or the
    filename for an in-memory annotation) and the object index, so an
    Annotation is always writable and readable back. ``path`` records where
    it was read from and takes no part in equality: an annotation written
    and read back equals the original.
    """
    filename: str
    width: int
    height: int
    objects: tuple
    path: str = field(default="", compare=False)

    def __post_init__(self):
        where = self.path or f"annotation of {self.filename!r}"
        width, height = _as_int(self.width), _as_int(self.height)
        if width is None or height is None or width <= 0 or height <= 0:
            raise AnnotationError(f"{where}: image size {self.width!r} x {self.height!r} is not "
                                  "two positive integers")
        object.__setattr__(self, "width", width)
        object.__setattr__(self, "height", height)
        objects = tuple(self.objects)
        for index, voc_object in enumerate(objects):
            if not isinstance(voc_object, VocObject):
                raise AnnotationError(f"{where}: object {index} is a "
                                      f"{type(voc_object).__name__}, not a VocObject")
            problem = _box_problem(voc_object.box, width, height)
            if problem:
                raise AnnotationError(f"{where}: object {index} ({voc_object.name!r}): box "
                                      f"{voc_object.box} is outside the {width}x{height} "
                                      f"image: {problem}")
        object.__setattr__(self, "objects", objects)


def _child_text(element, tag, where) -> str:
    """Stripped text of ``element``'s required child ``tag``; AnnotationError if missing/empty."""
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise AnnotationError(f"{where}: missing or empty <{tag}>")
    return child.text.strip()


def _child_int(element, tag, where) -> int:
    text = _child_text(element, tag, where)
    value = _as_int(text)
    if value is None:
        raise AnnotationError(f"{where}: <{tag}> is {text!r}, not an integer "
                              "(integral floats like '12.0' are accepted, '12.5' is not)")
    return value


def _child_flag(element, tag, where) -> bool:
    """Optional 0/1 child (``<difficult>``, ``<truncated>``): missing or empty means False."""
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        return False
    value = _as_int(child.text)
    if value not in (0, 1):
        raise AnnotationError(f"{where}: <{tag}> is {child.text.strip()!r}, not 0 or 1")
    return bool(value)


def read_annotation(path, classes=None) -> Annotation:
    """Read one VOC XML annotation file (the module docstring lists the rules).

    classes: optional iterable of class names; an object of any other class
    raises AnnotationError. Returns an :class:`Annotation` with ``path`` set.
    """
    path = os.fspath(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise AnnotationError(f"{path}: malformed XML: {error}") from error
    except OSError as error:
        raise AnnotationError(f"{path}: cannot read the annotation: {error}") from error
    if root.tag != "annotation":
        raise AnnotationError(f"{path}: root element is <{root.tag}>, not <annotation>")
    known = None if classes is None else frozenset(classes)
    filename = _child_text(root, "filename", path)
    size = root.find("size")
    if size is None:
        raise AnnotationError(f"{path}: missing <size>")
    width = _child_int(size, "width", f"{path}: <size>")
    height = _child_int(size, "height", f"{path}: <size>")
    objects = []
    for index, element in enumerate(root.findall("object")):
        where = f"{path}: object {index}"
        name = _child_text(element, "name", where)
        if known is not None and name not in known:
            raise AnnotationError(f"{where}: unknown class {name!r} (known: "
                                  f"{', '.join(sorted(known))})")
        bndbox = element.find("bndbox")
        if bndbox is None:
            raise AnnotationError(f"{where} ({name!r}): missing <bndbox>")
        box = tuple(_child_int(bndbox, tag, f"{where} ({name!r}): <bndbox>")
                    for tag in ("xmin", "ymin", "xmax", "ymax"))
        objects.append(VocObject(name, box, difficult=_child_flag(element, "difficult", where),
                                 truncated=_child_flag(element, "truncated", where)))
    return Annotation(filename, width, height, tuple(objects), path=path)


def write_annotation(annotation, path) -> None:
    """Write ``annotation`` as VOC-style XML at ``path`` (parent folders are created).

    The file has the devkit's elements (filename, size with depth 3,
    segmented 0, and per object name, pose "Unspecified", truncated,
    difficult, bndbox) and :func:`read_annotation` reads it back equal.
    """
    path = os.fspath(path)
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = annotation.filename
    size = ET.SubElement(root, "size")
    for tag, value in (("width", annotation.width), ("height", annotation.height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for voc_object in annotation.objects:
        element = ET.SubElement(root, "object")
        ET.SubElement(element, "name").text = voc_object.name
        ET.SubElement(element, "pose").text = "Unspecified"
        ET.SubElement(element, "truncated").text = str(int(voc_object.truncated))
        ET.SubElement(element, "difficult").text = str(int(voc_object.difficult))
        bndbox = ET.SubElement(element, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), voc_object.box):
            ET.SubElement(bndbox, tag).text = str(value)
    tree = ET.ElementTree(root)
    ET.indent(tree)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    tree.write(path, encoding="utf-8")


def read_image_set(path) -> list[str]:
    """Ids of an ``ImageSets/Main/<split>.txt`` file, in file order.

    One id per line; blank lines are skipped. A missing file, a line with
    more than one field (the ``<class>_<split>.txt`` lists with labels are
    a different format), a repeated id or no ids at all raise
    AnnotationError naming the file.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as error:
        raise AnnotationError(f"{path}: cannot read the image set: {error}") from error
    ids = []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if len(fields) > 1:
            raise AnnotationError(f"{path}: line {number} has {len(fields)} fields "
                                  f"({line.strip()!r}); an image set lists one id per line")
        ids.extend(fields)
    if not ids:
        raise AnnotationError(f"{path}: the image set lists no ids")
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise AnnotationError(f"{path}: {int(np.count_nonzero(counts > 1))} ids are listed more "
                              f"than once (first: {str(unique[counts > 1][0])!r})")
    return ids


def annotation_path(root, image_id) -> str:
    """``root/Annotations/<image_id>.xml``."""
    return os.path.join(os.fspath(root), "Annotations", f"{image_id}.xml")


def image_path(root, image_id) -> str:
    """``root/JPEGImages/<image_id>.jpg``."""
    return os.path.join(os.fspath(root), "JPEGImages", f"{image_id}.jpg")


def image_set_path(root, split) -> str:
    """``root/ImageSets/Main/<split>.txt``."""
    return os.path.join(os.fspath(root), "ImageSets", "Main", f"{split}.txt")


def read_dataset(root, split, classes=None) -> list[tuple[str, Annotation]]:
    """(image_id, Annotation) pairs of the ids of ``root/ImageSets/Main/<split>.txt``, in order.

    Every id must have its annotation and its JPEG image; otherwise one
    AnnotationError names the image set, how many ids lack each file and
    the first few missing paths. ``classes`` is passed to
    :func:`read_annotation`.
    """
    set_path = image_set_path(root, split)
    ids = read_image_set(set_path)
    problems = []
    for what, path_of in (("annotation", annotation_path), ("image", image_path)):
        missing = [path_of(root, image_id) for image_id in ids
                   if not os.path.isfile(path_of(root, image_id))]
        if missing:
            problems.append(f"{len(missing)} of {len(ids)} ids have no {what} file (first: "
                            f"{', '.join(missing[:3])})")
    if problems:
        raise AnnotationError(f"{set_path}: {'; '.join(problems)}")
    return [(image_id, read_annotation(annotation_path(root, image_id), classes))
            for image_id in ids]


def voc_ap(recall, precision, use_07_metric=False) -> float:
    """Average precision from a precision/recall curve, as the VOC devkit computes it.

    recall, precision: (D,) values after each detection in score order.
    use_07_metric: VOC2007's 11-point AP, the mean over t = 0, 0.1, ..., 1
    of the best precision at recall >= t (0 where recall never reaches t).
    Otherwise (VOC2010 and later) the area under the precision envelope:
    precision made monotone (each value raised to the best precision at any
    higher recall), integrated over recall from 0 to 1 as a step function.
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if recall.ndim != 1 or recall.shape != precision.shape:
        raise ValueError(f"recall {recall.shape} and precision {precision.shape} must be two "
                         "1-D arrays of the same length")
    if np.isnan(recall).any() or np.isnan(precision).any():
        raise ValueError("recall and precision must not contain NaN (a class with no "
                         "positives has no AP)")
    return float(curve_average_precision(recall, precision,
                                         "eleven_point" if use_07_metric else "envelope"))


@dataclass(frozen=True)
class ClassResult:
    """VOC evaluation of one class.

    recall, precision: (D,) float64 after each of the D detections in
    descending score order (a detection matched to a difficult object
    repeats the previous values); ap: voc_ap of them; n_positives: the
    non-difficult objects of the class. With no positives, recall is NaN
    and ap is NaN.
    """
    recall: np.ndarray
    precision: np.ndarray
    ap: float
    n_positives: int


def _class_ground_truth(annotations, class_name):
    """Image ids, per-image start offsets (len+1), boxes (G, 4) and difficult flags (G,)."""
    image_ids = list(annotations)
    objects = [[voc_object for voc_object in annotations[image_id].objects
                if voc_object.name == class_name] for image_id in image_ids]
    starts = np.concatenate(([0], np.cumsum([len(found) for found in objects]))).astype(np.int64)
    flat = [voc_object for found in objects for voc_object in found]
    boxes = np.array([voc_object.box for voc_object in flat], dtype=np.float64).reshape(-1, 4)
    difficult = np.array([voc_object.difficult for voc_object in flat], dtype=bool)
    return image_ids, starts, boxes, difficult


def _detection_arrays(detections, image_index, class_name):
    """(D,) image indices, (D,) scores and (D, 4) boxes of (image_id, score, box) rows."""
    rows = [tuple(row) for row in detections]
    for number, row in enumerate(rows):
        if len(row) != 3:
            raise ValueError(f"class {class_name!r}: detection {number} has {len(row)} fields, "
                             "expected (image_id, score, box)")
    unknown = [row[0] for row in rows if row[0] not in image_index]
    if unknown:
        raise ValueError(f"class {class_name!r}: {len(unknown)} detections are on images "
                         f"without an annotation (first: {unknown[0]!r})")
    try:
        boxes = np.array([row[2] for row in rows], dtype=np.float64).reshape(-1, 4)
    except ValueError as error:
        raise ValueError(f"class {class_name!r}: detection boxes are not 4 numbers each: "
                         f"{error}") from error
    boxes = checked_boxes(boxes, f"class {class_name!r} detections")
    scores = checked_scores([row[1] for row in rows], len(rows), f"class {class_name!r} detections")
    images = np.array([image_index[row[0]] for row in rows], dtype=np.int64)
    return images, scores, boxes


def evaluate_class(detections, annotations, class_name, iou_threshold=0.5,
                   use_07_metric=False) -> ClassResult:
    """VOC detection evaluation of one class (the module docstring states the rules).

    detections: iterable of (image_id, score, box) with box a VOC box
    (xmin, ymin, xmax, ymax); annotations: mapping image_id -> Annotation,
    the whole test set (images without detections still count their
    positives). A detection on an image missing from ``annotations`` is a
    ValueError. iou_threshold: in (0, 1]; a match needs IoU >= it.
    """
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold!r}")
    image_ids, starts, gt_boxes, gt_difficult = _class_ground_truth(annotations, class_name)
    images, scores, boxes = _detection_arrays(
        detections, {image_id: index for index, image_id in enumerate(image_ids)}, class_name)
    order = np.argsort(-scores, kind="stable")
    images, boxes = images[order], boxes[order]

    # The best-IoU ground truth of each detection does not depend on earlier
    # matches (taken boxes still compete), so it is computed image by image.
    best_overlap = np.full(len(images), -np.inf)
    best_box = np.zeros(len(images), dtype=np.int64)
    by_image = np.argsort(images, kind="stable")
    for group in np.split(by_image, np.flatnonzero(np.diff(images[by_image])) + 1):
        if group.size == 0:
            continue
        start, stop = starts[images[group[0]]], starts[images[group[0]] + 1]
        if stop > start:
            overlaps = iou_matrix(boxes[group], gt_boxes[start:stop])
            best = overlaps.argmax(axis=1)
            best_box[group] = start + best
            best_overlap[group] = overlaps[np.arange(group.size), best]

    matched = best_overlap >= iou_threshold
    candidate = matched & ~gt_difficult[best_box] if gt_boxes.size else matched
    # In score order, the first candidate of each box takes it; later ones are duplicates.
    true_positive = np.zeros(len(images), dtype=bool)
    _, first = np.unique(best_box[candidate], return_index=True)
    true_positive[np.flatnonzero(candidate)[first]] = True
    false_positive = ~matched | (candidate & ~true_positive)

    n_positives = int(np.count_nonzero(~gt_difficult))
    tp = np.cumsum(true_positive, dtype=np.float64)
    fp = np.cumsum(false_positive, dtype=np.float64)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if n_positives == 0:
        return ClassResult(np.full(len(tp), np.nan), precision, float("nan"), 0)
    recall = tp / n_positives
    return ClassResult(recall, precision, voc_ap(recall, precision, use_07_metric), n_positives)


def evaluate_detections(detections_by_class, annotations, classes, iou_threshold=0.5,
                        use_07_metric=False) -> dict:
    """VOC evaluation of every class: {class_name: ClassResult, ..., "mAP": float}.

    detections_by_class: mapping class name -> iterable of (image_id, score,
    box); a class without an entry has no detections (AP 0). A key that is
    not in ``classes`` is a ValueError (likely a misspelt class).
    mAP is the mean AP over the classes with positives; classes without any
    are left out of it with a warning naming them (mAP is NaN if none has).
    """
    classes = list(classes)
    if "mAP" in classes:
        raise ValueError("a class may not be called 'mAP' (the key of the mean)")
    unknown = sorted(set(detections_by_class) - set(classes))
    if unknown:
        raise ValueError(f"detections for classes not evaluated: {', '.join(unknown)}")
    results = {name: evaluate_class(detections_by_class.get(name, ()), annotations, name,
                                    iou_threshold, use_07_metric) for name in classes}
    without = [name for name in classes if results[name].n_positives == 0]
    if without:
        warnings.warn(f"{len(without)} of {len(classes)} classes have no non-difficult objects "
                      f"and are left out of the mAP: {', '.join(without)}", stacklevel=2)
    aps = [results[name].ap for name in classes if results[name].n_positives > 0]
    results["mAP"] = float(np.mean(aps)) if aps else float("nan")
    return results
