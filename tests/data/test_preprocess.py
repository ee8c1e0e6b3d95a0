"""Tests for ctxpred.data.preprocess: cropping, augmentation draws, colour handling, projection."""

import cv2
import numpy as np
import pytest
import skimage.data

from ctxpred.data.preprocess import (
    PROJECTION_AXIS,
    apply_augmentations,
    crop_patches,
    draw_augmentations,
    projection_matrix,
)

PATCH = 96
MEAN_RGB = (123.68, 116.78, 103.94)


@pytest.fixture(scope="module")
def photo_patches():
    """(200, 96, 96, 3) uint8 patches at random positions of three photos."""
    rng = np.random.default_rng(0)
    patches = []
    for image in (skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()):
        corners = np.stack(
            [
                rng.integers(0, image.shape[0] - PATCH, 67),
                rng.integers(0, image.shape[1] - PATCH, 67),
            ],
            axis=1,
        )
        patches.append(crop_patches(image, corners, PATCH))
    return np.concatenate(patches)[:200]


def resampled_reference(channel_or_rgb, side):
    """Bilinear down to side x side and back up, in float32."""
    small = cv2.resize(
        channel_or_rgb.astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR
    )
    return cv2.resize(small, (PATCH, PATCH), interpolation=cv2.INTER_LINEAR)


def test_crop_patches_matches_slicing():
    image = skimage.data.coffee()
    corners = np.array([[0, 0], [10, 37], [400 - PATCH, 600 - PATCH]])
    patches = crop_patches(image, corners, PATCH)
    assert patches.shape == (3, PATCH, PATCH, 3) and patches.dtype == np.uint8
    for patch, (y, x) in zip(patches, corners):
        assert np.array_equal(patch, image[y : y + PATCH, x : x + PATCH])
    with pytest.raises(ValueError):
        crop_patches(image, np.array([[400 - PATCH + 1, 0]]), PATCH)
    with pytest.raises(ValueError):
        crop_patches(image, np.array([[0, -1]]), PATCH)


def test_projection_matrix_is_an_orthogonal_projection_removing_the_axis():
    projection = projection_matrix(PROJECTION_AXIS)
    axis = np.array(PROJECTION_AXIS, dtype=float)
    assert PROJECTION_AXIS == (-1, 2, -1)
    assert np.allclose(projection @ projection, projection)
    assert np.allclose(projection, projection.T)
    assert np.allclose(projection @ axis, 0)
    for orthogonal in ([1, 0, -1], [1, 1, 1]):
        assert np.allclose(projection @ orthogonal, orthogonal)
    assert np.allclose(projection, np.eye(3) - np.outer(axis, axis) / 6)
    assert np.isclose(np.trace(projection), 2)


def test_draw_statistics():
    rng = np.random.default_rng(1)
    n = 20000
    draws = draw_augmentations(n, rng, patch=8, min_area=4, max_area=49)
    resampled = draws.resample_side > 0
    assert abs(resampled.mean() - 0.33) < 0.015
    large = draw_augmentations(n, np.random.default_rng(2), mode="projection")
    sides = large.resample_side[large.resample_side > 0]
    assert sides.min() == 10 and sides.max() == 94
    # Areas are uniform in [100, 9025): about half the sides lie below sqrt(4562.5).
    assert abs(np.mean(sides < np.sqrt((100 + 9025) / 2)) - 0.5) < 0.03
    assert np.all(np.abs(np.bincount(draws.kept_channel, minlength=3) / n - 1 / 3) < 0.015)
    noise = draws.noise
    assert noise.shape == (n, 2, 8, 8) and noise.dtype == np.float32
    assert noise.min() >= -0.5 and noise.max() < 0.5
    assert abs(noise.mean()) < 0.005 and abs(noise.var() - 1 / 12) < 0.002
    gaussian = draw_augmentations(n, rng, patch=8, min_area=4, max_area=49, noise="gaussian").noise
    assert abs(gaussian.mean()) < 0.01 and abs(gaussian.std() - 1) < 0.01
    projection = draw_augmentations(10, rng, mode="projection")
    assert projection.kept_channel is None and projection.noise is None


def test_draw_rejects_bad_choices():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="mode"):
        draw_augmentations(1, rng, mode="grey")
    with pytest.raises(ValueError, match="noise"):
        draw_augmentations(1, rng, noise="pink")


@pytest.mark.parametrize("noise", ["uniform", "gaussian"])
def test_colour_dropping_keeps_one_centred_channel_and_noise(photo_patches, noise):
    draws = draw_augmentations(len(photo_patches), np.random.default_rng(3), noise=noise)
    out = apply_augmentations(photo_patches, draws, MEAN_RGB)
    assert out.shape == (len(photo_patches), 3, PATCH, PATCH) and out.dtype == np.float32
    assert 0 < np.count_nonzero(draws.resample_side) < len(photo_patches)
    for index, patch in enumerate(photo_patches):
        kept = draws.kept_channel[index]
        side = draws.resample_side[index]
        source = patch[:, :, kept].astype(np.float32)
        expected = resampled_reference(source, side) if side else source
        expected = expected - expected.mean()
        np.testing.assert_allclose(out[index, kept], expected, atol=1e-3)
        dropped = [channel for channel in range(3) if channel != kept]
        scale = expected.std() / 100 if noise == "gaussian" else 1.0
        np.testing.assert_allclose(
            out[index, dropped], draws.noise[index] * scale, rtol=1e-5, atol=1e-6
        )
        # Only the kept channel follows the image content.
        content = patch[:, :, kept].astype(np.float64).ravel()
        assert np.corrcoef(content, out[index, kept].ravel())[0, 1] > 0.8 or content.std() < 2
        for channel in dropped:
            if content.std() > 2:
                assert abs(np.corrcoef(content, out[index, channel].ravel())[0, 1]) < 0.1
    dropped_values = np.concatenate(
        [
            out[i, [c for c in range(3) if c != draws.kept_channel[i]]].ravel()
            for i in range(len(out))
        ]
    )
    if noise == "uniform":
        assert dropped_values.min() >= -0.5 and dropped_values.max() < 0.5
        assert abs(dropped_values.var() - 1 / 12) < 0.002
    else:
        ratios = [
            out[i, [c for c in range(3) if c != draws.kept_channel[i]]].std()
            / out[i, draws.kept_channel[i]].std()
            for i in range(len(out))
        ]
        assert abs(np.median(ratios) - 0.01) < 0.0005


def test_projection_mode_subtracts_the_mean_and_resamples(photo_patches):
    draws = draw_augmentations(len(photo_patches), np.random.default_rng(4), mode="projection")
    out = np.full((len(photo_patches), 3, PATCH, PATCH), np.nan, dtype=np.float32)
    returned = apply_augmentations(photo_patches, draws, MEAN_RGB, out=out)
    assert returned is out
    for index, patch in enumerate(photo_patches):
        side = draws.resample_side[index]
        expected = resampled_reference(patch, side) if side else patch.astype(np.float32)
        expected = (expected - np.array(MEAN_RGB, dtype=np.float32)).transpose(2, 0, 1)
        np.testing.assert_allclose(out[index], expected, atol=1e-3)


def test_resampling_blurs_and_respects_output_slices(photo_patches):
    patches = photo_patches[:4]
    draws = draw_augmentations(
        4, np.random.default_rng(5), resample_probability=1.0, mode="projection"
    )
    unchanged = draw_augmentations(
        4, np.random.default_rng(5), resample_probability=0.0, mode="projection"
    )
    buffer = np.zeros((6, 3, PATCH, PATCH), dtype=np.float32)
    apply_augmentations(patches, draws, MEAN_RGB, out=buffer[1:5])
    sharp = apply_augmentations(patches, unchanged, MEAN_RGB)
    assert np.all(buffer[0] == 0) and np.all(buffer[5] == 0)
    for blurred, original in zip(buffer[1:5], sharp):
        assert np.abs(np.diff(blurred, axis=2)).mean() < np.abs(np.diff(original, axis=2)).mean()
    with pytest.raises(ValueError, match="out must be"):
        apply_augmentations(patches, draws, MEAN_RGB, out=buffer[:3])
