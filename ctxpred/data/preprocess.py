"""Per-patch preprocessing, in the reference order.

The reference pipeline per patch is: (1) with probability 0.33, downsample to
a random side and upsample back; (2) chromatic-aberration countermeasure,
either colour dropping or projection onto the plane orthogonal to the
green-magenta axis; (3) normalise the patch to root-mean-square 50; (4) CHW,
RGB.

Split between loader and network (a design decision): this module does steps
1, 2 (colour dropping, or mean subtraction for projection) and 4, and ships
float32 CHW patches. Step 3, and for the projection net the projection B
itself, are done INSIDE the Caffe net, so that training and deploy nets are
identical and a deploy net takes plain mean-subtracted RGB patches.
:func:`projection_matrix` provides B for the net definition (a fixed 1x1
convolution).

All random draws are made by :func:`draw_augmentations`;
:func:`apply_augmentations` is deterministic given those draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

COLOUR_MODES = ("color_dropping", "projection")
NOISE_DISTRIBUTIONS = ("uniform", "gaussian")

# The green-magenta axis, RGB order.
PROJECTION_AXIS = (-1, 2, -1)

# Gaussian noise of the dropped channels has this fraction of the kept channel's std.
_GAUSSIAN_NOISE_STD_RATIO = 1 / 100


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


# Channels replaced by noise, in increasing order, indexed by the kept channel.
_DROPPED_CHANNELS = _read_only(np.array([[1, 2], [0, 2], [0, 1]], dtype=np.int64))


def projection_matrix(axis: Sequence[float] = PROJECTION_AXIS) -> np.ndarray:
    """(3, 3) float64 B = I - a^T a / (a a^T): removes the component along ``axis``.

    Applied to a pixel as a column vector, B @ rgb.
    """
    axis_row = np.asarray(axis, dtype=np.float64).reshape(1, 3)
    squared_norm = float(np.sum(axis_row**2))
    if squared_norm == 0:
        raise ValueError("projection axis must be non-zero")
    return np.eye(3) - axis_row.T @ axis_row / squared_norm


def crop_patches(image: np.ndarray, corners: np.ndarray, patch: int) -> np.ndarray:
    """Cut square patches out of an (H, W, 3) image.

    corners: (N, 2) int top-left (y, x); every patch must lie inside the image.
    Returns (N, patch, patch, 3), same dtype as ``image``.
    """
    corners = np.asarray(corners, dtype=np.int64).reshape(-1, 2)
    height, width = image.shape[:2]
    if (
        np.any(corners < 0)
        or np.any(corners[:, 0] > height - patch)
        or np.any(corners[:, 1] > width - patch)
    ):
        raise ValueError(f"a {patch}-pixel patch at some corner leaves the {height}x{width} image")
    # windows[y, x] is the (patch, patch, 3) view whose top-left pixel is (y, x).
    windows = sliding_window_view(image, (patch, patch, image.shape[2]))[:, :, 0]
    return windows[corners[:, 0], corners[:, 1]]


@dataclass(frozen=True)
class PatchAugmentations:
    """Random draws for N patches of side p.

    mode: one of COLOUR_MODES. noise_distribution: one of
    NOISE_DISTRIBUTIONS (colour dropping), None for projection.
    resample_side: (N,) int64, 0 = no resampling, else the side s of the
    intermediate s x s image. kept_channel: (N,) int64 in {0, 1, 2}, the
    RGB channel kept by colour dropping (None for projection). noise:
    (N, 2, p, p) float32 for the two dropped channels in increasing channel
    order: uniform in [-0.5, 0.5) pixel units, or standard normal to be scaled
    by the kept channel's std / 100 (None for projection).
    """

    mode: str
    noise_distribution: str | None
    resample_side: np.ndarray
    kept_channel: np.ndarray | None
    noise: np.ndarray | None


def draw_augmentations(
    n: int,
    rng: np.random.Generator,
    patch: int = 96,
    resample_probability: float = 0.33,
    min_area: int = 100,
    max_area: int | None = None,
    mode: str = "color_dropping",
    noise: str = "uniform",
) -> PatchAugmentations:
    """Draw the random choices of preprocessing steps 1-2 for ``n`` patches.

    Resampling happens with ``resample_probability``; its side is
    s = int(sqrt(U * (max_area - min_area) + min_area)), U uniform in [0, 1),
    so the intermediate area lies in [min_area, max_area) pixels;
    ``max_area`` defaults to (patch - 1)^2 (9025 for 96-pixel patches).
    """
    if max_area is None:
        max_area = (patch - 1) ** 2
    if mode not in COLOUR_MODES:
        raise ValueError(f"mode must be one of {COLOUR_MODES}, got {mode!r}")
    if noise not in NOISE_DISTRIBUTIONS:
        raise ValueError(f"noise must be one of {NOISE_DISTRIBUTIONS}, got {noise!r}")
    if not 0 < min_area <= max_area < patch * patch:
        raise ValueError(f"need 0 < min_area <= max_area < patch^2, got {min_area}, {max_area}")
    if not 0 <= resample_probability <= 1:
        raise ValueError(f"resample_probability must be in [0, 1], got {resample_probability}")
    resampled = rng.random(n) < resample_probability
    sides = np.sqrt(rng.random(n) * (max_area - min_area) + min_area).astype(np.int64)
    resample_side = np.where(resampled, sides, 0)
    if mode == "projection":
        return PatchAugmentations(mode, None, resample_side, None, None)
    kept_channel = rng.integers(0, 3, size=n)
    if noise == "uniform":
        channel_noise = rng.random((n, 2, patch, patch), dtype=np.float32) - np.float32(0.5)
    else:
        channel_noise = rng.standard_normal((n, 2, patch, patch), dtype=np.float32)
    return PatchAugmentations(mode, noise, resample_side, kept_channel, channel_noise)


def _down_and_up(image: np.ndarray, side: int) -> np.ndarray:
    """Resize a float32 (p, p[, C]) image to side x side and back, bilinear (cv2.INTER_LINEAR)."""
    patch = image.shape[0]
    small = cv2.resize(image, (side, side), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(small, (patch, patch), interpolation=cv2.INTER_LINEAR)


def apply_augmentations(
    patches: np.ndarray,
    augmentations: PatchAugmentations,
    mean_rgb: Sequence[float],
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Preprocessing steps 1, 2 and 4 for (N, p, p, 3) uint8 RGB patches.

    Step 1: patches with resample_side s > 0 are resized to s x s and back to
    p x p, both with bilinear interpolation (cv2.INTER_LINEAR), in float32.
    Step 2, colour dropping: the kept channel minus its own per-patch mean;
    the two other channels are the drawn noise (gaussian: times the kept
    channel's std / 100). Projection: RGB minus ``mean_rgb`` (the dataset's
    per-channel mean, 3 floats, 0..255 scale); B is applied in-net.

    Returns (N, 3, p, p) float32 CHW RGB, written into ``out`` when given.
    """
    n, patch = patches.shape[0], patches.shape[1]
    if patches.shape != (n, patch, patch, 3):
        raise ValueError(f"patches must be (N, p, p, 3), got {patches.shape}")
    if len(augmentations.resample_side) != n:
        raise ValueError(
            f"augmentations drawn for {len(augmentations.resample_side)} patches, got {n}"
        )
    if out is None:
        out = np.empty((n, 3, patch, patch), dtype=np.float32)
    elif out.shape != (n, 3, patch, patch) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {(n, 3, patch, patch)}, got {out.dtype} {out.shape}")

    resampled = np.flatnonzero(augmentations.resample_side)
    if augmentations.mode == "projection":
        mean = np.asarray(mean_rgb, dtype=np.float32).reshape(1, 3, 1, 1)
        np.subtract(patches.transpose(0, 3, 1, 2), mean, out=out, dtype=np.float32)
        # Resampling after the mean subtraction: bilinear weights sum to 1.
        for index in resampled:
            channels_last = np.ascontiguousarray(out[index].transpose(1, 2, 0))
            out[index] = _down_and_up(channels_last, augmentations.resample_side[index]).transpose(
                2, 0, 1
            )
        return out

    patch_index = np.arange(n)
    kept_channel = augmentations.kept_channel
    kept = patches[patch_index, :, :, kept_channel].astype(np.float32)  # (N, p, p)
    for index in resampled:
        kept[index] = _down_and_up(kept[index], augmentations.resample_side[index])
    kept -= kept.mean(axis=(1, 2), keepdims=True)
    noise = augmentations.noise
    if augmentations.noise_distribution == "gaussian":
        noise_std = kept.std(axis=(1, 2)) * np.float32(_GAUSSIAN_NOISE_STD_RATIO)
        noise = noise * noise_std[:, np.newaxis, np.newaxis, np.newaxis]
    out[patch_index, kept_channel] = kept
    out[patch_index[:, np.newaxis], _DROPPED_CHANNELS[kept_channel]] = noise
    return out
