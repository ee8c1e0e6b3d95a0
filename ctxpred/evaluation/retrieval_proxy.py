"""A number for fc6 nearest-neighbour quality: rank-1 retrieval of a patch's augmented copy.

The paper's nearest-neighbour figure (Fig. 4) is judged by eye. This proxy
asks a question with a right answer: given a query patch, is its nearest
neighbour (cosine similarity of the features) a slightly moved, rescaled
and recoloured copy of the same scene, rather than any patch of another
image? A feature that captures what is in the patch, not its exact pixels,
should find the copy; a feature of raw pixels, or noise, should not.

Protocol (:func:`retrieval_pairs`, :func:`positive_ranks`):

- From each image, ``per_image`` query patches (p x p, p = 96) at seeded
  uniform positions, far enough from the border for the copy to fit.
- Each query gets one *key*: the window of side round(p * s) whose centre is
  the query's centre moved by (dy, dx) pixels, resized to p x p (OpenCV,
  area / bilinear), each RGB channel multiplied by a gain. dy, dx are
  uniform integers in [-max_shift, max_shift]; log s is uniform in
  [-log max_scale, log max_scale]; gains are uniform in
  [1 - colour_gain, 1 + colour_gain] (:class:`Augmentation`).
- A query's candidates are its own key and the keys of every other image
  (``image_ids`` differ). Keys of the query's own image other than its own
  are left out: they may overlap it and be right answers too.
- Its rank is the number of candidates other than its own key that are at
  least as similar as its own key: 0 is a hit. Ties count against the query,
  so features that do not tell patches apart (constant, all zero) score 0.
- Rank-1 accuracy is the share of hits, with a Wilson interval
  (:func:`ctxpred.evaluation.pretext.accuracy_with_interval`: queries taken as
  independent); chance is the mean of 1 / candidates.

Two nets are compared on the same queries and keys (:func:`paired_difference`):
the difference of their rank-1 accuracies with a bootstrap interval that
resamples whole images, since queries of one image are correlated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from ctxpred.evaluation.pretext import accuracy_with_interval
from ctxpred.data.images import DEFAULT_MAX_PIXELS, ImageError, ImageSource, decode_rgb_within
from ctxpred.models.context import PATCH
from ctxpred.features.search import normalised


@dataclass(frozen=True)
class Augmentation:
    """How a key differs from its query.

    max_shift: largest move of the window's centre along y and x, pixels.
    max_scale: the window's side is p * s with s in [1 / max_scale, max_scale]
    (>= 1; 1 keeps the size). colour_gain: each RGB channel is multiplied by a
    factor in [1 - colour_gain, 1 + colour_gain] (0 <= colour_gain < 1).
    Augmentation(0, 1, 0) makes every key equal to its query.
    """

    max_shift: int = 12
    max_scale: float = 1.2
    colour_gain: float = 0.15

    def __post_init__(self):
        if self.max_shift < 0 or self.max_scale < 1 or not 0 <= self.colour_gain < 1:
            raise ValueError(f"need max_shift >= 0, max_scale >= 1 and 0 <= colour_gain < 1, "
                             f"got {self}")

    def margin(self, patch=PATCH):
        """Pixels a query must keep from the image border for any of its keys to fit."""
        largest = round(patch * self.max_scale)
        return self.max_shift + (largest - patch + 1) // 2 + 1


@dataclass(frozen=True)
class RetrievalPairs:
    """Queries and their augmented copies (keys), row by row.

    queries, keys: (N, p, p, 3) uint8 RGB. image_ids: (N,) int64, the index
    of each row's image in the source. names: the source's image names, by
    image index. corners: (N, 2) int64 (y, x) top-left pixel of the query.
    shifts: (N, 2) int64 (dy, dx) move of the key's centre, pixels.
    scales: (N,) float64 key window side over p. gains: (N, 3) float64 RGB
    gains of the key. skipped: {image name: why it gave no query}.
    """

    queries: np.ndarray
    keys: np.ndarray
    image_ids: np.ndarray
    names: tuple
    corners: np.ndarray
    shifts: np.ndarray
    scales: np.ndarray
    gains: np.ndarray
    skipped: dict


def augmented_copy(image, corner, shift, scale, gains, patch=PATCH):
    """The key of the query at ``corner``: (p, p, 3) uint8.

    image: (H, W, 3) uint8 RGB; corner: (y, x) of the query; shift: (dy, dx)
    of the window's centre; scale: window side over p; gains: (3,) RGB gains.
    Raises ValueError when the window leaves the image.
    """
    side = round(patch * scale)
    top = int(corner[0]) + int(shift[0]) + (patch - side) // 2
    left = int(corner[1]) + int(shift[1]) + (patch - side) // 2
    height, width = image.shape[:2]
    if top < 0 or left < 0 or top + side > height or left + side > width:
        raise ValueError(f"a {side}-pixel window at y={top}, x={left} leaves the "
                         f"{width}x{height} image")
    window = image[top:top + side, left:left + side]
    if side != patch:
        shrink = side > patch
        window = cv2.resize(window, (patch, patch),
                            interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if np.all(np.asarray(gains) == 1):
        return np.ascontiguousarray(window)
    return np.clip(np.rint(window * np.asarray(gains, np.float32)), 0, 255).astype(np.uint8)


def retrieval_pairs(source: ImageSource, per_image, augmentation=Augmentation(), seed=0,
                    max_pixels=DEFAULT_MAX_PIXELS, patch=PATCH) -> RetrievalPairs:
    """``per_image`` queries and their keys from every image of ``source`` (see the module doc).

    Image i's positions and augmentations come from
    ``np.random.default_rng([seed, i])``: they depend only on the seed and the
    image's index. Images are decoded upright and within ``max_pixels``
    (:func:`ctxpred.data.images.decode_rgb_within`; None: full size). Images that cannot be read or
    are too small for a query with its margin are skipped (listed in
    ``skipped``). Raises ValueError when fewer than two images give queries
    (a query needs keys of other images).
    """
    if per_image < 1:
        raise ValueError(f"per_image must be positive, got {per_image}")
    margin = augmentation.margin(patch)
    rows = {name: [] for name in ("queries", "keys", "image_ids", "corners", "shifts",
                                  "scales", "gains")}
    names, skipped = [], {}
    for index in range(len(source)):
        name = source.name(index)
        names.append(name)
        try:
            image, _ = decode_rgb_within(source.read_bytes(index), name, max_pixels, patch)
        except ImageError as error:
            skipped[name] = error.reason
            continue
        height, width = image.shape[:2]
        if min(height, width) < patch + 2 * margin:
            skipped[name] = (f"{width}x{height} pixels is smaller than a {patch}-pixel patch "
                             f"with a {margin}-pixel margin")
            continue
        rng = np.random.default_rng([seed, index])
        corners = np.column_stack([
            rng.integers(margin, height - patch - margin, size=per_image, endpoint=True),
            rng.integers(margin, width - patch - margin, size=per_image, endpoint=True)])
        shifts = rng.integers(-augmentation.max_shift, augmentation.max_shift,
                              size=(per_image, 2), endpoint=True)
        log_scale = math.log(augmentation.max_scale)
        scales = np.exp(rng.uniform(-log_scale, log_scale, size=per_image))
        gains = rng.uniform(1 - augmentation.colour_gain, 1 + augmentation.colour_gain,
                            size=(per_image, 3))
        rows["queries"].append(np.stack([image[y:y + patch, x:x + patch] for y, x in corners]))
        rows["keys"].append(np.stack([augmented_copy(image, *row, patch=patch) for row in
                                      zip(corners, shifts, scales, gains)]))
        rows["image_ids"].append(np.full(per_image, index, np.int64))
        for key, value in (("corners", corners), ("shifts", shifts), ("scales", scales),
                           ("gains", gains)):
            rows[key].append(value)
    used = len({int(ids[0]) for ids in rows["image_ids"]})
    if used < 2:
        raise ValueError(f"{source.description}: {used} usable image(s); retrieval needs "
                         f"queries from at least 2 (skipped: {skipped})")
    return RetrievalPairs(names=tuple(names), skipped=skipped,
                          **{key: np.concatenate(value) for key, value in rows.items()})


def positive_ranks(query_features, key_features, image_ids, block_rows=1024):
    """(N,) int64: for each query, the candidates at least as similar as its own key.

    query_features, key_features: (N, D), row i of each from the same query;
    image_ids: (N,) the image of each row. Cosine similarity; the
    candidates are every key of another image. 0 means the own key is the
    nearest neighbour. Memory: ``block_rows`` x N similarities at a time.
    """
    queries, keys = normalised(query_features), normalised(key_features)
    image_ids = np.asarray(image_ids)
    n = len(queries)
    if keys.shape != queries.shape or image_ids.shape != (n,):
        raise ValueError(f"need (N, D) queries and keys and (N,) image ids, got "
                         f"{queries.shape}, {keys.shape} and {image_ids.shape}")
    ranks = np.empty(n, np.int64)
    for start in range(0, n, block_rows):
        rows = np.arange(start, min(start + block_rows, n))
        similarities = queries[rows] @ keys.T
        own = similarities[np.arange(len(rows)), rows]
        similarities[image_ids[rows, None] == image_ids[None, :]] = -np.inf
        ranks[rows] = (similarities >= own[:, None]).sum(axis=1)
    return ranks


def candidate_counts(image_ids):
    """(N,) int64: candidates of each query, its own key and every key of another image."""
    _, inverse, counts = np.unique(image_ids, return_inverse=True, return_counts=True)
    return len(inverse) - counts[inverse] + 1


@dataclass(frozen=True)
class RetrievalScore:
    """Rank-1 retrieval of one feature: hits of ``queries``, accuracy in [0, 1] with its Wilson
    interval [low, high] (``confidence``), chance accuracy and the median rank (0 = hit)."""

    hits: int
    queries: int
    accuracy: float
    low: float
    high: float
    chance: float
    median_rank: float


def retrieval_score(ranks, image_ids, confidence=0.95) -> RetrievalScore:
    """:class:`RetrievalScore` of :func:`positive_ranks` ``ranks`` (queries from ``image_ids``)."""
    ranks = np.asarray(ranks)
    hits = int((ranks == 0).sum())
    accuracy, low, high = accuracy_with_interval(hits, len(ranks), confidence)
    chance = float(np.mean(1 / candidate_counts(image_ids)))
    return RetrievalScore(hits, len(ranks), accuracy, low, high, chance,
                          float(np.median(ranks)))


def paired_difference(hits_a, hits_b, image_ids, rng, resamples=2000, confidence=0.95):
    """(difference, low, high): rank-1 accuracy of A minus B on the same queries, with a bootstrap
    interval.

    hits_a, hits_b: (N,) bool, hit or not per query for features A and B;
    image_ids: (N,) image of each query. Each of ``resamples`` bootstrap
    samples draws the images with replacement (``rng``, a numpy Generator)
    and takes all their queries, so the interval accounts for queries of one
    image succeeding or failing together. [low, high]: the percentile
    interval at ``confidence``.
    """
    hits_a, hits_b = np.asarray(hits_a, bool), np.asarray(hits_b, bool)
    _, image_index = np.unique(image_ids, return_inverse=True)
    groups = image_index.max() + 1
    if hits_a.shape != hits_b.shape or image_index.shape != hits_a.shape:
        raise ValueError(f"need hits and image ids of one shape, got {hits_a.shape}, "
                         f"{hits_b.shape} and {image_index.shape}")
    # Per image: queries and hit difference; a resample is a weighted sum over images.
    queries = np.bincount(image_index, minlength=groups)
    difference = np.bincount(image_index, hits_a.astype(np.int64) - hits_b, minlength=groups)
    weights = rng.multinomial(groups, np.full(groups, 1 / groups), size=resamples)
    samples = (weights @ difference) / (weights @ queries)
    tail = (1 - confidence) / 2
    low, high = np.quantile(samples, [tail, 1 - tail])
    return float(difference.sum() / queries.sum()), float(low), float(high)


def extractor_ranks(extractor, pairs: RetrievalPairs):
    """:func:`positive_ranks` of a :class:`ctxpred.features.extraction.FeatureExtractor`'s features."""
    return positive_ranks(extractor.extract(pairs.queries), extractor.extract(pairs.keys),
                          pairs.image_ids)
