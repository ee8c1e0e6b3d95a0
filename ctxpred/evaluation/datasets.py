"""Labelled image sets for the frozen-feature protocols: a VOC-layout folder or two list files.

Two layouts, one :class:`LabelledSet`:

- **VOC layout** (PASCAL VOC2007 and the offline sets of
  data/make_labelled_sets.py): ``root/Annotations/<id>.xml``,
  ``root/JPEGImages/<id>.jpg``, ``root/ImageSets/Main/{trainval,test}.txt``
  and the class list ``root/classes.txt`` (one class a line; without it, the
  20 PASCAL VOC classes). Multi-label: labels are (N, C) int8, 1 when the
  image has a non-difficult object of the class, -1 when its only objects of
  the class are "difficult" (left out of that class's training and scoring,
  as the VOC07 SVM benchmark does), else 0. The annotations are read by
  :func:`ctxpred.classification.data.read_split` (the fine-tuning route's
  labels, 255 for difficult-only, here -1).
- **List files** (ImageNet, Places, data/make_labelled_sets.py's
  single-label set): a train and a test file of lines ``path label``
  (path relative to the list file's folder unless absolute; label a class
  name or number, no spaces). Single label: labels are (N,) int64 indices
  into ``classes``, the training labels sorted (numbers numerically).

Bad input raises :class:`DatasetError` (a ValueError), one line naming the
file, line or class: a missing image or annotation, an empty split, a class
with no positive image in the training or the test split, a test label
that no training image has.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctxpred.classification.data import IGNORE_LABEL, ClassificationError, read_split

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")
DIFFICULT_ONLY = -1


class DatasetError(ValueError):
    """A labelled set that cannot be used; the message names the file, line or class."""


@dataclass(frozen=True, eq=False)
class LabelledSet:
    """Train and test images with labels.

    name: what to call the set in reports. classes: C class names.
    train_paths, test_paths: image file paths (str). train_labels,
    test_labels: (N, C) int8 in {1, 0, -1} when ``multilabel``, else (N,)
    int64 class indices.
    """

    name: str
    classes: tuple
    train_paths: tuple
    train_labels: np.ndarray
    test_paths: tuple
    test_labels: np.ndarray
    multilabel: bool

    def label_matrix(self, split):
        """(N, C) int8 1/0/-1 labels of ``split`` ("train" or "test"); a single-label set one-hot,
        so the SVM protocols score it as C one-against-the-rest classes."""
        labels = self.train_labels if split == "train" else self.test_labels
        if self.multilabel:
            return labels
        return (labels[:, None] == np.arange(len(self.classes))).astype(np.int8)


def read_voc_set(root, train_split="trainval", test_split="test", classes=None):
    """The multi-label :class:`LabelledSet` of a VOC-layout folder (module doc)."""
    root = Path(root)
    if classes is None:
        classes = VOC_CLASSES if not (root / "classes.txt").is_file() else None
    try:
        splits = [read_split(root, split, classes) for split in (train_split, test_split)]
    except ClassificationError as error:
        raise DatasetError(str(error)) from None
    matrices = []
    for images in splits:
        labels = images.labels.astype(np.int8)
        labels[images.labels == IGNORE_LABEL] = DIFFICULT_ONLY
        matrices.append(labels)
    for split, labels in zip((train_split, test_split), matrices):
        check_positives(labels, splits[0].classes, root / "ImageSets" / "Main" / f"{split}.txt")
    return LabelledSet(root.name, splits[0].classes, splits[0].paths, matrices[0],
                       splits[1].paths, matrices[1], multilabel=True)


def check_positives(labels, classes, source):
    """DatasetError naming the first class of (N, C) ``labels`` without a positive image."""
    if len(labels) == 0:
        raise DatasetError(f"{source}: no images")
    for index, count in enumerate((labels == 1).sum(axis=0)):
        if count == 0:
            raise DatasetError(f"{source}: class {classes[index]!r} has no positive image")


def read_list_file(path):
    """([image paths], [labels as written]) of a ``path label`` list file (module doc)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise DatasetError(f"cannot read the list file {path}: {error.strerror}") from None
    paths, labels = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2:
            raise DatasetError(f"{path} line {number}: expected 'path label', got {line!r}")
        image = Path(fields[0].strip())
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise DatasetError(f"{path} line {number}: image {image} does not exist")
        paths.append(str(image))
        labels.append(fields[1])
    if not paths:
        raise DatasetError(f"{path}: no images")
    return paths, labels


def sorted_classes(labels):
    """The distinct labels sorted: numerically when all are integers, else as text."""
    distinct = set(labels)
    if all(label.lstrip("-").isdigit() for label in distinct):
        return tuple(sorted(distinct, key=int))
    return tuple(sorted(distinct))


def read_list_set(train_list, test_list, name=None):
    """The single-label :class:`LabelledSet` of two ``path label`` list files (module doc)."""
    train_paths, train_names = read_list_file(train_list)
    test_paths, test_names = read_list_file(test_list)
    classes = sorted_classes(train_names)
    index = {label: position for position, label in enumerate(classes)}
    unseen = next((label for label in test_names if label not in index), None)
    if unseen is not None:
        raise DatasetError(f"{test_list}: class {unseen!r} has no image in {train_list}")
    missing = next((label for label in classes if label not in set(test_names)), None)
    if missing is not None:
        raise DatasetError(f"{test_list}: class {missing!r} has no positive image")
    return LabelledSet(name or Path(train_list).parent.name, classes, tuple(train_paths),
                       np.array([index[label] for label in train_names], np.int64),
                       tuple(test_paths), np.array([index[label] for label in test_names],
                                                   np.int64), multilabel=False)


def read_labelled_set(source):
    """A :class:`LabelledSet` from ``source``: a VOC-layout folder (it has ``Annotations/``), a
    folder holding ``train.txt`` and ``test.txt`` list files, or a pair (train list, test list)."""
    if isinstance(source, (tuple, list)):
        if len(source) != 2:
            raise DatasetError(f"give a folder or two list files (train, test), got {source}")
        return read_list_set(*source)
    root = Path(source)
    if not root.is_dir():
        raise DatasetError(f"dataset {root} is not a folder (give a VOC-layout folder, a folder "
                           "with train.txt and test.txt, or two list files)")
    if (root / "Annotations").is_dir():
        return read_voc_set(root)
    if (root / "train.txt").is_file() and (root / "test.txt").is_file():
        return read_list_set(root / "train.txt", root / "test.txt", root.name)
    raise DatasetError(f"dataset {root} has neither Annotations/ (VOC layout) nor train.txt and "
                       "test.txt (list files)")
