"""Scenes with known object boxes: photographed cut-outs pasted onto real photos.

No package that a machine without internet can install ships a labelled
detection set of photos, but Debian's tuxpaint-stamps-default ships several
hundred photographed object cut-outs (RGBA PNG, labelled by folder). Pasting
them onto real background photos at random places gives images whose object
boxes are known exactly: a small VOC-format detection set for checking that a
detector trains and tests (data/make_detection_set.py), and planted repeated
objects for visual data mining.

Everything works on arrays: images are (H, W, 3) uint8 RGB, cut-outs
(h, w, 4) uint8 RGBA, boxes VOC-style (xmin, ymin, xmax, ymax), 1-based and
inclusive, in pixels of the composed image.
"""
from dataclasses import dataclass

import cv2
import numpy as np

ALPHA_OPAQUE = 128
"""Alpha (0-255) from which a cut-out pixel counts as part of the object's box."""


class CutoutError(ValueError):
    """A cut-out image that cannot be used (no alpha channel, or fully transparent)."""


@dataclass(frozen=True)
class PlacedObject:
    """One pasted object: its label and its VOC box in the composed image."""

    label: str
    box: tuple


def trim_cutout(rgba, name="cut-out"):
    """Crop an RGBA cut-out (h, w, 4) uint8 to the box of its opaque pixels.

    ``name`` appears in the error raised for a cut-out without any pixel of
    alpha >= ALPHA_OPAQUE.
    """
    if rgba.ndim != 3 or rgba.shape[2] != 4:
        raise CutoutError(f"{name}: needs an alpha channel (h, w, 4), got shape {rgba.shape}")
    rows = np.flatnonzero((rgba[..., 3] >= ALPHA_OPAQUE).any(axis=1))
    columns = np.flatnonzero((rgba[..., 3] >= ALPHA_OPAQUE).any(axis=0))
    if rows.size == 0:
        raise CutoutError(f"{name}: no opaque pixel (alpha >= {ALPHA_OPAQUE})")
    return rgba[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]


def paste(image, rgba, top, left):
    """Alpha-blend ``rgba`` into ``image`` (in place) with its corner at (top, left).

    The cut-out must lie inside the image. Returns the VOC box of its opaque
    pixels (alpha >= ALPHA_OPAQUE) in image coordinates.
    """
    height, width = rgba.shape[:2]
    if top < 0 or left < 0 or top + height > image.shape[0] or left + width > image.shape[1]:
        raise ValueError(f"cut-out of {height}x{width} at ({top}, {left}) leaves the "
                         f"{image.shape[0]}x{image.shape[1]} image")
    alpha = rgba[..., 3:].astype(np.float32) / 255.0
    region = image[top:top + height, left:left + width]
    blended = region * (1.0 - alpha) + rgba[..., :3] * alpha
    region[...] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    opaque = rgba[..., 3] >= ALPHA_OPAQUE
    rows, columns = np.flatnonzero(opaque.any(axis=1)), np.flatnonzero(opaque.any(axis=0))
    return (left + int(columns[0]) + 1, top + int(rows[0]) + 1,
            left + int(columns[-1]) + 1, top + int(rows[-1]) + 1)


def _overlap_fraction(box, others):
    """Largest fraction of ``box``'s area covered by any box of ``others`` (VOC boxes)."""
    if not others:
        return 0.0
    others = np.asarray(others, dtype=np.float64)
    width = np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]) + 1
    height = np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]) + 1
    inter = np.clip(width, 0, None) * np.clip(height, 0, None)
    area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
    areas = (others[:, 2] - others[:, 0] + 1) * (others[:, 3] - others[:, 1] + 1)
    return float(np.max(inter / np.minimum(area, areas)))


def compose_scene(background, cutouts, rng, size_range=(0.25, 0.55), max_overlap=0.2,
                  tries=50):
    """Paste labelled cut-outs at random places onto a copy of a photo.

    background: (H, W, 3) uint8. cutouts: sequence of (label, rgba) with
    trimmed RGBA cut-outs. Each is flipped left-right with probability 1/2,
    scaled so that its longer side is a uniform fraction ``size_range`` of
    min(H, W), and placed at a uniform position where it covers at most
    ``max_overlap`` of an already placed object (and vice versa); a cut-out
    that finds no such place in ``tries`` draws is left out.

    Returns the composed (H, W, 3) uint8 image and the list of PlacedObject.
    """
    image = background.copy()
    height, width = image.shape[:2]
    placed = []
    for label, rgba in cutouts:
        if rng.random() < 0.5:
            rgba = rgba[:, ::-1]
        side = max(8, round(rng.uniform(*size_range) * min(height, width)))
        rgba = fit_longer_side(rgba, side)
        rows, columns = rgba.shape[:2]
        for _ in range(tries):
            top = int(rng.integers(0, height - rows + 1))
            left = int(rng.integers(0, width - columns + 1))
            box = (left + 1, top + 1, left + columns, top + rows)
            if _overlap_fraction(box, [obj.box for obj in placed]) <= max_overlap:
                placed.append(PlacedObject(label, paste(image, rgba, top, left)))
                break
    return image, placed


def fit_longer_side(image, longer_side):
    """Resize an (H, W, C) image so that its longer side is ``longer_side`` pixels (aspect kept)."""
    height, width = image.shape[:2]
    scale = longer_side / max(height, width)
    if scale == 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
