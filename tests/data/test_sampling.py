"""Tests for ctxpred.data.sampling: label table, grid and random-pair geometry."""

import numpy as np
import pytest

from ctxpred.data.preprocess import crop_patches
from ctxpred.data.sampling import (
    NUM_LABELS,
    OFFSETS,
    PatchGeometry,
    label_of_offset,
    opposite_label,
    sample_grid_pairs,
    sample_random_pair,
)

GEOMETRY = PatchGeometry()


def coordinate_image(height, width):
    """uint8 RGB image whose pixel (y, x) encodes y and x (12 bits each)."""
    y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([x & 255, y & 255, (x >> 8) | ((y >> 8) << 4)], axis=-1).astype(np.uint8)


def decode_coordinates(pixels):
    """(..., 3) uint8 pixels of a coordinate_image -> (..., 2) int (y, x)."""
    pixels = pixels.astype(np.int64)
    x = pixels[..., 0] | ((pixels[..., 2] & 15) << 8)
    y = pixels[..., 1] | ((pixels[..., 2] >> 4) << 8)
    return np.stack([y, x], axis=-1)


def true_offsets_of_pairs(image, corners, pairs, geometry):
    """Where each pair's patches really are, decoded from their pixels.

    Returns the patches, their decoded corners, each pair's (dx, dy) in grid
    steps and the residual displacement in pixels.
    """
    patches = crop_patches(image, corners, geometry.patch)
    top_left = decode_coordinates(patches[:, 0, 0])
    displacement = top_left[pairs[:, 1]] - top_left[pairs[:, 0]]  # (Q, 2) (dy, dx) pixels
    steps = np.rint(displacement / geometry.step).astype(np.int64)
    return patches, top_left, steps[:, ::-1], displacement - steps * geometry.step


def test_label_table():
    assert OFFSETS.tolist() == [
        [-1, -1],
        [0, -1],
        [1, -1],
        [-1, 0],
        [1, 0],
        [-1, 1],
        [0, 1],
        [1, 1],
    ]
    assert not OFFSETS.flags.writeable
    assert label_of_offset(OFFSETS[:, 0], OFFSETS[:, 1]).tolist() == list(range(NUM_LABELS))
    assert label_of_offset(1, 0) == 4 and label_of_offset(-1, 1) == 5
    for label in range(NUM_LABELS):
        assert np.array_equal(OFFSETS[opposite_label(label)], -OFFSETS[label])
    with pytest.raises(ValueError):
        label_of_offset(0, 0)
    with pytest.raises(ValueError):
        label_of_offset(2, 0)


def test_geometry_defaults_and_size_rule():
    assert (GEOMETRY.patch, GEOMETRY.gap, GEOMETRY.jitter) == (96, 48, 7)
    assert GEOMETRY.step == 144 and GEOMETRY.min_side == 247
    assert GEOMETRY.fits(248, 248)
    assert not GEOMETRY.fits(247, 1000) and not GEOMETRY.fits(1000, 247)
    with pytest.raises(ValueError):
        PatchGeometry(patch=0)


@pytest.mark.parametrize("height, width", [(300, 400), (437, 581), (560, 800), (248, 1200)])
def test_grid_pairs_have_true_labels_and_respect_gap_and_jitter(height, width):
    image = coordinate_image(height, width)
    rng = np.random.default_rng(height * width)
    residuals = []
    for _ in range(100):
        corners, pairs, labels = sample_grid_pairs(height, width, rng, GEOMETRY)
        assert corners.dtype == pairs.dtype == labels.dtype == np.int64
        patches, top_left, true_offset, residual = true_offsets_of_pairs(
            image, corners, pairs, GEOMETRY
        )
        # Each crop is the image region at its corner, whole and inside the image.
        assert np.array_equal(top_left, corners)
        assert np.array_equal(decode_coordinates(patches[:, -1, -1]), corners + GEOMETRY.patch - 1)
        assert np.array_equal(label_of_offset(true_offset[:, 0], true_offset[:, 1]), labels)
        assert np.abs(residual).max(initial=0) <= 2 * GEOMETRY.jitter
        # Both orders of every pair, with opposite labels.
        forward = {(a, b, label) for (a, b), label in zip(pairs.tolist(), labels.tolist())}
        assert forward == {(b, a, 7 - label) for a, b, label in forward}
        assert len(forward) == len(labels)
        residuals.append(residual)
    residuals = np.concatenate(residuals)
    # Jitter of two patches: the residual spans [-14, 14] (clamping only shrinks it).
    assert residuals.min() == -14 and residuals.max() == 14


@pytest.mark.parametrize("height, width", [(300, 700), (700, 300), (1000, 1000), (250, 250)])
def test_grid_origin_and_shape_follow_the_formula(height, width):
    no_jitter = PatchGeometry(jitter=0)
    rng = np.random.default_rng(7)
    origins = []
    for _ in range(400):
        corners, pairs, labels = sample_grid_pairs(height, width, rng, no_jitter)
        y0, x0 = corners[0]
        origins.append((y0, x0))
        n_rows = (height + 48 - y0) // 144
        n_cols = (width + 48 - x0) // 144
        rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
        expected = np.stack([y0 + 144 * rows, x0 + 144 * cols], axis=-1).reshape(-1, 2)
        assert np.array_equal(corners, expected)
        forward_pairs = (
            n_rows * (n_cols - 1) + (n_rows - 1) * n_cols + 2 * (n_rows - 1) * (n_cols - 1)
        )
        assert len(pairs) == 2 * forward_pairs
    origins = np.array(origins)
    assert origins.min() == 0 and origins.max() == 143
    assert abs(origins.mean() - 71.5) < 6


def test_one_row_grid_and_grids_without_pairs():
    rng = np.random.default_rng(3)
    seen_sizes = set()
    for _ in range(300):
        corners, pairs, labels = sample_grid_pairs(200, 200, rng, GEOMETRY)
        seen_sizes.add(len(corners))
        assert pairs.shape == (0, 2) and labels.shape == (0,)
        assert corners.shape[1] == 2
        corners, pairs, labels = sample_grid_pairs(200, 900, rng, GEOMETRY)
        if len(corners):
            assert set(labels.tolist()) == {3, 4}
            assert len(pairs) == 2 * (len(corners) - 1)
    assert seen_sizes == {0, 1}


def test_grid_label_histogram_is_symmetric_and_near_uniform():
    rng = np.random.default_rng(11)
    counts = np.zeros(NUM_LABELS, dtype=np.int64)
    while counts.sum() < 5000:
        height, width = rng.integers(300, 700, size=2)
        counts += np.bincount(
            sample_grid_pairs(height, width, rng, GEOMETRY)[2], minlength=NUM_LABELS
        )
    assert np.array_equal(counts, counts[::-1])
    fractions = counts / counts.sum()
    assert np.all(fractions > 0.08) and np.all(fractions < 0.17)


def test_random_pair_geometry_and_uniform_labels():
    height, width = 300, 500
    image = coordinate_image(height, width)
    rng = np.random.default_rng(5)
    labels, first_corners = [], []
    for _ in range(4000):
        corners, pairs, label = sample_random_pair(height, width, rng, GEOMETRY)
        assert corners.shape == (2, 2) and pairs.tolist() == [[0, 1]] and label.shape == (1,)
        _, top_left, true_offset, residual = true_offsets_of_pairs(image, corners, pairs, GEOMETRY)
        assert np.array_equal(top_left, corners)
        assert label_of_offset(*true_offset[0]) == label[0]
        assert np.abs(residual).max() <= 2 * GEOMETRY.jitter
        labels.append(label[0])
        first_corners.append(corners[0])
    fractions = np.bincount(labels, minlength=NUM_LABELS) / len(labels)
    assert np.all(np.abs(fractions - 1 / 8) < 0.02)
    first_corners = np.array(first_corners)
    # The first patch reaches every border of the image.
    assert first_corners.min(axis=0).tolist() == [0, 0]
    assert first_corners.max(axis=0).tolist() == [height - 96, width - 96]


def test_random_pair_needs_room_for_two_patches():
    with pytest.raises(ValueError, match="cannot hold two patches"):
        sample_random_pair(239, 1000, np.random.default_rng(0), GEOMETRY)
    corners, _, _ = sample_random_pair(240, 240, np.random.default_rng(0), GEOMETRY)
    assert corners.min() >= 0 and corners.max() <= 240 - 96


def test_sampling_is_deterministic_per_seed():
    first = sample_grid_pairs(500, 600, np.random.default_rng(9), GEOMETRY)
    second = sample_grid_pairs(500, 600, np.random.default_rng(9), GEOMETRY)
    for a, b in zip(first, second):
        assert np.array_equal(a, b)
