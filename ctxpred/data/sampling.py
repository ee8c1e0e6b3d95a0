"""Patch positions and relative-position labels.

Coordinates are pixels; a patch is identified by its top-left corner (y, x).
The label of an ordered pair (first, second) is the position of the SECOND
patch relative to the FIRST in raster order of the 3x3 grid minus centre::

    0 1 2
    3 . 4
    5 6 7

Two samplers: :func:`sample_grid_pairs` (the authors' code, default) lays a
jittered grid over the image and pairs every patch with its up-left, up,
up-right and left neighbours in both orders; :func:`sample_random_pair` (the
paper's text) draws one pair at a uniformly random position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


# (dx, dy) of the second patch relative to the first, indexed by label; dx
# grows rightwards, dy downwards, in units of the grid step.
OFFSETS = _read_only(
    np.array([[-1, -1], [0, -1], [1, -1], [-1, 0], [1, 0], [-1, 1], [0, 1], [1, 1]], dtype=np.int64)
)
NUM_LABELS = len(OFFSETS)

# Grid neighbours paired with each cell (second patch = neighbour): up-left,
# up, up-right, left. The other four directions come from the reversed pairs.
_GRID_NEIGHBOUR_LABELS = (0, 1, 2, 3)


def label_of_offset(dx, dy):
    """Label of a second patch at offset (dx, dy) in {-1, 0, 1}^2 \\ (0, 0) steps.

    Works elementwise on integer arrays as well as on scalars.
    """
    dx = np.asarray(dx)
    dy = np.asarray(dy)
    if np.any((np.abs(dx) > 1) | (np.abs(dy) > 1) | ((dx == 0) & (dy == 0))):
        raise ValueError("offsets must be in {-1, 0, 1} and not both 0")
    raster_index = (dy + 1) * 3 + (dx + 1)
    return raster_index - (raster_index > 4)


def opposite_label(label):
    """Label of the reversed pair: second and first swapped (elementwise)."""
    return NUM_LABELS - 1 - np.asarray(label)


@dataclass(frozen=True)
class PatchGeometry:
    """Patch layout in pixels.

    patch: side of a square patch; gap: pixels between neighbouring patches;
    jitter: each patch moves by an integer uniform in [-jitter, jitter] in x
    and in y independently.
    """

    patch: int = 96
    gap: int = 48
    jitter: int = 7

    def __post_init__(self):
        for field_name in ("patch", "gap", "jitter"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"PatchGeometry.{field_name} must be an int, got {value!r}")
        if self.patch < 1 or self.gap < 0 or self.jitter < 0:
            raise ValueError(f"need patch >= 1, gap >= 0, jitter >= 0, got {self}")

    @property
    def step(self) -> int:
        """Distance between the corners of neighbouring patches (patch + gap)."""
        return self.patch + self.gap

    @property
    def min_side(self) -> int:
        """Images need height and width strictly larger than this (2*patch + gap + jitter)."""
        return 2 * self.patch + self.gap + self.jitter

    def fits(self, height: int, width: int) -> bool:
        """Whether an image of this size is large enough to sample from."""
        return height > self.min_side and width > self.min_side


def _jitter_and_clamp(
    corners: np.ndarray, height: int, width: int, rng: np.random.Generator, geometry: PatchGeometry
) -> np.ndarray:
    """Jitter (P, 2) (y, x) corners independently per coordinate, then clamp into the image."""
    jittered = corners + rng.integers(
        -geometry.jitter, geometry.jitter, size=corners.shape, endpoint=True
    )
    upper = np.array([height - geometry.patch, width - geometry.patch])
    return np.clip(jittered, 0, upper)


def sample_grid_pairs(
    height: int, width: int, rng: np.random.Generator, geometry: PatchGeometry = PatchGeometry()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample one jittered grid of patches and all its neighbouring pairs.

    The grid step is ``geometry.step``; its origin (x0, y0) is uniform in
    [0, step - 1]^2; it has floor((W + gap - x0) / step) columns and
    floor((H + gap - y0) / step) rows, so every unjittered patch lies inside
    the image.

    Returns:
        corners: (P, 2) int64 top-left (y, x) of each patch, raster order.
        pairs: (Q, 2) int64 indices into ``corners``: (first, second).
        labels: (Q,) int64 position of second relative to first.
    Q = 2 * (number of neighbouring cell pairs); every pair appears in both
    orders. A one-cell grid gives Q = 0 (empty arrays).
    """
    if height < geometry.patch or width < geometry.patch:
        raise ValueError(f"image {height}x{width} is smaller than a {geometry.patch}-pixel patch")
    step = geometry.step
    x0, y0 = rng.integers(0, step, size=2)
    n_cols = int((width + geometry.gap - x0) // step)
    n_rows = int((height + geometry.gap - y0) // step)
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    grid_corners = np.stack([y0 + rows * step, x0 + cols * step], axis=-1).reshape(-1, 2)
    corners = _jitter_and_clamp(grid_corners, height, width, rng, geometry)

    cell_index = np.arange(n_rows * n_cols).reshape(n_rows, n_cols)
    firsts, seconds, forward_labels = [], [], []
    for label in _GRID_NEIGHBOUR_LABELS:
        dx, dy = OFFSETS[label]
        # Cells whose neighbour at (dx, dy) exists, and those neighbours.
        first_rows = slice(max(0, -dy), n_rows - max(0, dy))
        first_cols = slice(max(0, -dx), n_cols - max(0, dx))
        second_rows = slice(first_rows.start + dy, first_rows.stop + dy)
        second_cols = slice(first_cols.start + dx, first_cols.stop + dx)
        first = cell_index[first_rows, first_cols].ravel()
        firsts.append(first)
        seconds.append(cell_index[second_rows, second_cols].ravel())
        forward_labels.append(np.full(first.size, label, dtype=np.int64))
    first = np.concatenate(firsts)
    second = np.concatenate(seconds)
    forward = np.concatenate(forward_labels)
    pairs = np.concatenate([np.stack([first, second], axis=1), np.stack([second, first], axis=1)])
    labels = np.concatenate([forward, opposite_label(forward)])
    return corners, pairs.astype(np.int64), labels.astype(np.int64)


def sample_random_pair(
    height: int, width: int, rng: np.random.Generator, geometry: PatchGeometry = PatchGeometry()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample one pair as in the paper: a random first patch and one of its 8 neighbours.

    The label is uniform over the 8 positions; the first patch's corner is
    then uniform over all positions where it and that neighbour (one step
    away, before jitter) lie inside the image. Both are jittered and clamped.

    Returns corners (2, 2) int64 (y, x), pairs [[0, 1]], labels [label].
    """
    step = geometry.step
    if height < geometry.patch + step or width < geometry.patch + step:
        raise ValueError(
            f"image {height}x{width} cannot hold two patches {step} pixels apart "
            f"(needs both sides >= {geometry.patch + step})"
        )
    label = int(rng.integers(NUM_LABELS))
    dx, dy = OFFSETS[label]
    y = rng.integers(max(0, -dy) * step, height - geometry.patch - max(0, dy) * step, endpoint=True)
    x = rng.integers(max(0, -dx) * step, width - geometry.patch - max(0, dx) * step, endpoint=True)
    unjittered = np.array([[y, x], [y + dy * step, x + dx * step]], dtype=np.int64)
    corners = _jitter_and_clamp(unjittered, height, width, rng, geometry)
    return corners, np.array([[0, 1]], dtype=np.int64), np.array([label], dtype=np.int64)
