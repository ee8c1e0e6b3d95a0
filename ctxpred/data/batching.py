"""Assembling batches of preprocessed patches and their pair labels.

A batch is a float32 array of patches (CHW, RGB) plus, per pair, the indices
of its first and second patch in the batch (``select1``, ``select2``, fed to
the net's BatchReindex layers) and its label.

Grid mode (the authors' code): each image is decoded once, randomly resized
once, and ``grids_per_image`` grids are drawn from it; grids are added to a
batch whole, and a batch is closed when the next grid would bring it to
``max_patches`` patches, so every batch holds fewer than ``max_patches``.
That grid opens the next batch. Pair mode (the paper's text): each batch
holds exactly ``pairs_per_batch`` independently drawn pairs,
``pairs_per_image`` of them from each decoded image.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass

import numpy as np

from ctxpred.data.images import ImageError, ImageSource, decode_rgb, no_usable_image, random_resize
from ctxpred.data.preprocess import (
    COLOUR_MODES,
    NOISE_DISTRIBUTIONS,
    apply_augmentations,
    crop_patches,
    draw_augmentations,
)
from ctxpred.data.sampling import PatchGeometry, sample_grid_pairs, sample_random_pair

SAMPLING_MODES = ("grid", "pairs")
_SAMPLERS = {"grid": sample_grid_pairs, "pairs": sample_random_pair}


class SkippedImageWarning(UserWarning):
    """An image could not be used (unreadable, undecodable, too small) and was skipped."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class PatchPairConfig:
    """How patches and pairs are sampled, preprocessed and batched.

    mode: 'grid' or 'pairs'. colour: 'color_dropping' or 'projection'.
    noise: 'uniform' or 'gaussian' (colour dropping's dropped channels).
    grids_per_image: grids drawn from each image (grid mode).
    pairs_per_image: pairs drawn from each image (pair mode; the paper does
    not say, so this choice just amortises decoding like the grid mode does).
    max_patches: batch buffer size; grid-mode batches hold fewer patches.
    pairs_per_batch: pairs per batch in pair mode (2 patches each).
    min_pixels, max_pixels: range of the random total pixel count of each
    resized image. resample_probability: chance of step 1 per patch.
    mean_rgb: per-channel mean subtracted in projection mode, 0..255 scale.
    """

    mode: str = "grid"
    colour: str = "color_dropping"
    noise: str = "uniform"
    geometry: PatchGeometry = PatchGeometry()
    grids_per_image: int = 4
    pairs_per_image: int = 4
    max_patches: int = 512
    pairs_per_batch: int = 128
    min_pixels: int = 150_000
    max_pixels: int = 450_000
    resample_probability: float = 0.33
    # The ImageNet mean commonly used with Caffe models (there as BGR 103.94, 116.78, 123.68).
    mean_rgb: tuple[float, float, float] = (123.68, 116.78, 103.94)

    def __post_init__(self):
        choices = {"mode": SAMPLING_MODES, "colour": COLOUR_MODES, "noise": NOISE_DISTRIBUTIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"PatchPairConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if not isinstance(self.geometry, PatchGeometry):
            raise ValueError(
                f"PatchPairConfig.geometry must be a PatchGeometry, got {self.geometry!r}"
            )
        for name in (
            "grids_per_image",
            "pairs_per_image",
            "max_patches",
            "pairs_per_batch",
            "min_pixels",
            "max_pixels",
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"PatchPairConfig.{name} must be a positive int, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"PatchPairConfig.min_pixels {self.min_pixels} exceeds max_pixels {self.max_pixels}"
            )
        if not _is_number(self.resample_probability) or not 0 <= self.resample_probability <= 1:
            raise ValueError(
                "PatchPairConfig.resample_probability must be in [0, 1], "
                f"got {self.resample_probability!r}"
            )
        if not (
            isinstance(self.mean_rgb, tuple)
            and len(self.mean_rgb) == 3
            and all(map(_is_number, self.mean_rgb))
        ):
            raise ValueError(
                f"PatchPairConfig.mean_rgb must be a tuple of 3 numbers, got {self.mean_rgb!r}"
            )
        if self.mode == "pairs" and 2 * self.pairs_per_batch > self.max_patches:
            raise ValueError(
                f"PatchPairConfig: {self.pairs_per_batch} pairs per batch need "
                f"{2 * self.pairs_per_batch} patches, more than max_patches {self.max_patches}"
            )

    @property
    def batch_capacity(self) -> int:
        """Most patches in one batch: max_patches - 1 (grid) or 2 * pairs_per_batch (pairs)."""
        return self.max_patches - 1 if self.mode == "grid" else 2 * self.pairs_per_batch

    @property
    def max_pairs(self) -> int:
        """Most pairs in one batch: 8 per patch (grid: one per neighbour) or pairs_per_batch."""
        return 8 * self.batch_capacity if self.mode == "grid" else self.pairs_per_batch

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PatchPairConfig:
        """Parse a JSON object of (some of) the fields; missing ones keep their defaults.

        Raises ValueError naming an unknown key or a bad value.
        """
        values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError(f"PatchPairConfig JSON must be an object, got {type(values).__name__}")
        _reject_unknown_keys(cls, values)
        if "geometry" in values:
            geometry = values["geometry"]
            if not isinstance(geometry, dict):
                raise ValueError(f"PatchPairConfig.geometry must be an object, got {geometry!r}")
            _reject_unknown_keys(PatchGeometry, geometry)
            values["geometry"] = PatchGeometry(**geometry)
        if isinstance(values.get("mean_rgb"), list):
            values["mean_rgb"] = tuple(values["mean_rgb"])
        return cls(**values)


def _reject_unknown_keys(dataclass_type: type, values: dict) -> None:
    known = [field.name for field in dataclasses.fields(dataclass_type)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown {dataclass_type.__name__} key(s) {unknown}; known keys: {known}")


@dataclass(frozen=True)
class BatchInfo:
    """What :meth:`BatchAssembler.fill` put into the first ``n_patches`` rows.

    select1, select2: (Q,) int64 batch indices of each pair's first and
    second patch. labels: (Q,) int64 position of second relative to first.
    image_indices: (n_patches,) int64 source index of each patch's image.
    corners: (n_patches, 2) int64 top-left (y, x) of each patch in its
    randomly resized image.
    """

    n_patches: int
    select1: np.ndarray
    select2: np.ndarray
    labels: np.ndarray
    image_indices: np.ndarray
    corners: np.ndarray

    @property
    def n_pairs(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class _Sample:
    """One grid (or pair) cut from one image, not yet preprocessed."""

    image_index: int
    corners: np.ndarray  # (P, 2) int64 (y, x)
    pairs: np.ndarray  # (Q, 2) int64 indices into corners
    labels: np.ndarray  # (Q,) int64
    patches: np.ndarray  # (P, patch, patch, 3) uint8


class BatchAssembler:
    """Fills batch buffers with preprocessed patches drawn from ``source``.

    Images are visited in a fresh random permutation per pass. Images that
    cannot be read or decoded, or are too small after the random resize, are
    skipped with one :class:`SkippedImageWarning` per file and recorded in
    ``skipped`` (name -> reason); unreadable ones are not retried in later
    passes, too-small ones are (their random resize differs). A pass that
    yields no pair at all raises ValueError naming the source. Only the
    current (resized) image is held in memory. All randomness comes from
    ``rng``, so a seed fixes every batch.
    """

    def __init__(self, source: ImageSource, config: PatchPairConfig, rng: np.random.Generator):
        if len(source) == 0:
            raise ValueError(f"image source {source.description} is empty")
        self.source = source
        self.config = config
        self.skipped: dict[str, str] = {}
        self._rng = rng
        self._sampler = _SAMPLERS[config.mode]
        self._samples_per_image = (
            config.grids_per_image if config.mode == "grid" else config.pairs_per_image
        )
        self._undecodable: set[int] = set()
        self._pass_order = np.empty(0, dtype=np.int64)
        self._pass_position = 0
        self._pass_had_pairs = False
        self._image: np.ndarray | None = None
        self._image_index = -1
        self._samples_left = 0
        self._carried_over: _Sample | None = None

    def fill(self, out_data: np.ndarray) -> BatchInfo:
        """Write one batch into ``out_data`` (max_patches, 3, p, p) float32.

        Rows [0, n_patches) receive preprocessed patches (see
        ``ctxpred.data.preprocess``); the rest are left untouched.
        """
        config = self.config
        patch = config.geometry.patch
        if out_data.dtype != np.float32 or out_data.shape[1:] != (3, patch, patch):
            raise ValueError(
                f"out_data must be float32 (N, 3, {patch}, {patch}), "
                f"got {out_data.dtype} {out_data.shape}"
            )
        if out_data.shape[0] < config.batch_capacity:
            raise ValueError(
                f"out_data holds {out_data.shape[0]} patches, a batch needs {config.batch_capacity}"
            )

        samples = self._samples_for_batch()
        n_patches = sum(len(sample.corners) for sample in samples)
        first_patch = np.cumsum([0] + [len(sample.corners) for sample in samples[:-1]])
        pairs = np.concatenate(
            [sample.pairs + offset for sample, offset in zip(samples, first_patch)]
        )
        augmentations = draw_augmentations(
            n_patches,
            self._rng,
            patch=patch,
            resample_probability=config.resample_probability,
            mode=config.colour,
            noise=config.noise,
        )
        apply_augmentations(
            np.concatenate([sample.patches for sample in samples]),
            augmentations,
            config.mean_rgb,
            out=out_data[:n_patches],
        )
        return BatchInfo(
            n_patches=n_patches,
            select1=pairs[:, 0],
            select2=pairs[:, 1],
            labels=np.concatenate([sample.labels for sample in samples]),
            image_indices=np.concatenate(
                [np.full(len(sample.corners), sample.image_index) for sample in samples]
            ),
            corners=np.concatenate([sample.corners for sample in samples]),
        )

    def _samples_for_batch(self) -> list[_Sample]:
        """The grids (or pairs) of the next batch: as many as fit, the next one carried over."""
        capacity = self.config.batch_capacity
        samples: list[_Sample] = []
        n_patches = 0
        while n_patches < capacity:
            sample = self._carried_over or self._next_sample()
            self._carried_over = None
            if n_patches + len(sample.corners) > capacity:
                if not samples:
                    raise ValueError(
                        f"a single grid of {len(sample.corners)} patches does not fit in a batch "
                        f"of fewer than {self.config.max_patches} patches"
                    )
                self._carried_over = sample
                break
            samples.append(sample)
            n_patches += len(sample.corners)
        return samples

    def _next_sample(self) -> _Sample:
        """Draw the next grid (or pair) that has at least one pair."""
        while True:
            if self._samples_left == 0:
                self._load_next_image()
            self._samples_left -= 1
            height, width = self._image.shape[:2]
            corners, pairs, labels = self._sampler(height, width, self._rng, self.config.geometry)
            if len(pairs):
                self._pass_had_pairs = True
                patches = crop_patches(self._image, corners, self.config.geometry.patch)
                return _Sample(self._image_index, corners, pairs, labels, patches)

    def _load_next_image(self) -> None:
        """Make the next usable image of the permutation current, starting new passes as needed."""
        self._image = None
        while True:
            if self._pass_position == len(self._pass_order):
                if len(self._pass_order) and not self._pass_had_pairs:
                    raise no_usable_image(self.source, self.skipped)
                self._pass_order = self._rng.permutation(len(self.source))
                self._pass_position = 0
                self._pass_had_pairs = False
            index = int(self._pass_order[self._pass_position])
            self._pass_position += 1
            image = self._load_resized(index)
            if image is not None:
                self._image, self._image_index = image, index
                self._samples_left = self._samples_per_image
                return

    def _load_resized(self, index: int) -> np.ndarray | None:
        """Decode and randomly resize image ``index``; None (after recording why) when unusable."""
        if index in self._undecodable:
            return None
        config = self.config
        name = self.source.name(index)
        try:
            # An image smaller than one patch would only be upscaled to a blur: skipped.
            image = decode_rgb(self.source.read_bytes(index), name, max_pixels=config.max_pixels,
                               min_side=config.geometry.patch)
        except ImageError as error:
            self._undecodable.add(index)
            self._record_skip(name, error.reason)
            return None
        resized = random_resize(image, self._rng, config.min_pixels, config.max_pixels)
        if not config.geometry.fits(*resized.shape[:2]):
            self._record_skip(
                name,
                f"too small after random resize to {resized.shape[0]}x{resized.shape[1]} "
                f"(both sides must exceed {config.geometry.min_side})",
            )
            return None
        return resized

    def _record_skip(self, name: str, reason: str) -> None:
        if name not in self.skipped:
            warnings.warn(f"skipping image {name}: {reason}", SkippedImageWarning, stacklevel=2)
            self.skipped[name] = reason
