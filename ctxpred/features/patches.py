"""Patches cut image by image: random, a non-overlapping grid, or the rows of a patch list.

:func:`sampled_patches` (random or grid) and :func:`listed_patches` (a list
read by :func:`read_patch_list`) yield one :class:`ImagePatches` per image,
decoding one image at a time, so memory is flat in the number of images.
"""
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctxpred.data.images import (DEFAULT_MAX_PIXELS, FileSource, ImageError, ImageSource,
                                 decode_rgb, decode_rgb_within, no_usable_image)
from ctxpred.data.preprocess import crop_patches
from ctxpred.models.context import PATCH

PATCH_MODES = ("random", "grid")


@dataclass(frozen=True)
class ImagePatches:
    """The patches of one image.

    name: the image's path (or ``lmdb:KEY``). patches: (K, p, p, 3) uint8
    RGB. boxes: (K, 4) int64 x, y, w, h in pixels of the image they were cut
    from. scale: that image's width over the decoded image's width (1.0
    unless ``max_pixels`` shrank it). skipped: why the image gave no patch (it
    could not be read or decoded, or is smaller than a patch), else None.
    """

    name: str
    patches: np.ndarray
    boxes: np.ndarray
    scale: float = 1.0
    skipped: str | None = None


def _skipped(name, reason, patch):
    return ImagePatches(name, np.empty((0, patch, patch, 3), np.uint8),
                        np.empty((0, 4), np.int64), skipped=reason)


def _cut(name, image, corners, scale, patch):
    """ImagePatches of (K, 2) (y, x) top-left ``corners`` in ``image``."""
    corners = np.asarray(corners, dtype=np.int64).reshape(-1, 2)
    boxes = np.column_stack([corners[:, 1], corners[:, 0],
                             np.full(len(corners), patch), np.full(len(corners), patch)])
    return ImagePatches(name, crop_patches(image, corners, patch), boxes.astype(np.int64), scale)


def random_corners(height, width, count, rng, patch=PATCH):
    """(count, 2) int64 (y, x) top-left corners, uniform over all patch positions in the image."""
    return np.column_stack([rng.integers(0, height - patch, size=count, endpoint=True),
                            rng.integers(0, width - patch, size=count, endpoint=True)])


def grid_corners(height, width, step=PATCH, patch=PATCH):
    """(K, 2) int64 (y, x) corners of a grid from (0, 0) with ``step`` pixels, raster order.

    Every patch lies inside the image: floor((H - patch) / step) + 1 rows,
    likewise columns (none when the image is smaller than a patch). With
    step = patch the patches tile the image without overlap.
    """
    rows = np.arange(0, height - patch + 1, step)
    cols = np.arange(0, width - patch + 1, step)
    ys, xs = np.meshgrid(rows, cols, indexing="ij")
    return np.stack([ys.ravel(), xs.ravel()], axis=1).astype(np.int64)


def sampled_patches(source: ImageSource, mode, per_image=16, seed=0,
                    max_pixels=DEFAULT_MAX_PIXELS, patch=PATCH,
                    step=None) -> Iterator[ImagePatches]:
    """One :class:`ImagePatches` per image of ``source``, in order, decoded one at a time.

    mode "random": ``per_image`` patches at uniform positions (with
    repetition), drawn from ``np.random.default_rng([seed, index])``, so an
    image's patches depend only on the seed and its index. mode "grid": the
    grid of :func:`grid_corners` with ``step`` pixels (default: the patch
    side, patches without overlap). Images are decoded upright and within
    ``max_pixels`` (:func:`ctxpred.data.images.decode_rgb_within`; None: full
    size). Unusable images, and images smaller than a patch at their full
    size, yield an ImagePatches without patches whose ``skipped`` says why;
    when no image was usable, ValueError naming the source follows.
    """
    if mode not in PATCH_MODES:
        raise ValueError(f"mode must be one of {PATCH_MODES}, got {mode!r}")
    skipped = {}
    for index in range(len(source)):
        name = source.name(index)
        try:
            image, scale = decode_rgb_within(source.read_bytes(index), name, max_pixels,
                                             min_side=patch)
        except ImageError as error:
            skipped[name] = error.reason
            yield _skipped(name, error.reason, patch)
            continue
        height, width = image.shape[:2]
        if height < patch or width < patch:
            skipped[name] = f"{width}x{height} pixels is smaller than a {patch}-pixel patch"
            yield _skipped(name, skipped[name], patch)
            continue
        if mode == "random":
            corners = random_corners(height, width, per_image,
                                     np.random.default_rng([seed, index]), patch)
        else:
            corners = grid_corners(height, width, step or patch, patch)
        yield _cut(name, image, corners, scale, patch)
    if len(skipped) == len(source):
        raise no_usable_image(source, skipped)


@dataclass(frozen=True)
class PatchRun:
    """Consecutive rows of patch list ``listing`` on one image.

    path: the image; corners: (K, 2) int64 (y, x); lines: the rows' line numbers.
    """

    listing: str
    path: str
    corners: np.ndarray
    lines: tuple[int, ...]


_INTEGER = re.compile(r"[+-]?\d+")


def read_patch_list(path, root=None):
    """The rows of a patch list, ``image_path x y`` each, grouped into :class:`PatchRun` s.

    Fields are separated by commas (CSV) or whitespace; the path is all but
    the last two fields, so it may hold spaces (not commas, in CSV). x, y:
    top-left corner in pixels of the image as decoded. Blank lines and lines
    starting with '#' are skipped; so is a first line whose x and y are not
    integers (a CSV header). Relative paths are taken from ``root``
    (default: the list's folder). Runs keep the file's order; consecutive
    rows on the same image form one run, so the image is decoded once.

    Raises FileNotFoundError, or ValueError naming the line of a bad row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"patch list {path} does not exist")
    root = Path(root) if root is not None else path.parent
    runs, rows, first_row = [], [], True
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "," in line:
                fields = [part.strip() for part in line.rsplit(",", 2)]
            else:
                fields = line.rsplit(None, 2)
            is_row = len(fields) == 3 and all(_INTEGER.fullmatch(f) for f in fields[1:])
            if not is_row and first_row:
                first_row = False
                continue
            first_row = False
            if not is_row:
                raise ValueError(f"{path}, line {number}: expected 'image_path x y' with integer "
                                 f"x and y, got {line!r}")
            rows.append((str(root / fields[0]), int(fields[2]), int(fields[1]), number))
    for row in rows:
        if runs and runs[-1][0] == row[0]:
            runs[-1][1].append(row)
        else:
            runs.append((row[0], [row]))
    return [PatchRun(str(path), image,
                     np.array([[y, x] for _, y, x, _ in group], dtype=np.int64),
                     tuple(number for *_, number in group)) for image, group in runs]


def listed_patches(runs, patch=PATCH) -> Iterator[ImagePatches]:
    """One :class:`ImagePatches` per :class:`PatchRun` of :func:`read_patch_list`; full size.

    Unreadable images yield ``skipped``; a row whose patch leaves its image
    raises ValueError naming the list, the line and the image size.
    """
    source = FileSource([run.path for run in runs], [None] * len(runs), "patch list")
    for index, run in enumerate(runs):
        try:
            image = decode_rgb(source.read_bytes(index), run.path)
        except ImageError as error:
            yield _skipped(run.path, error.reason, patch)
            continue
        height, width = image.shape[:2]
        outside = ((run.corners < 0) | (run.corners > [height - patch, width - patch])).any(axis=1)
        if outside.any():
            bad = int(np.flatnonzero(outside)[0])
            y, x = run.corners[bad]
            raise ValueError(f"{run.listing}, line {run.lines[bad]}: a {patch}-pixel patch at "
                             f"x={x}, y={y} leaves {run.path} ({width}x{height} pixels)")
        yield _cut(run.path, image, run.corners, 1.0, patch)
