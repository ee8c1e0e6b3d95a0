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
  (:func:`ctxpred.evaluation.statistics.accuracy_with_interval`: queries taken as
  independent); chance is the mean of 1 / candidates.

Two nets are compared on the same queries and keys (:func:`paired_difference`):
the difference of their rank-1 accuracies with a bootstrap interval that
resamples whole images, since queries of one image are correlated.
:func:`compare_nets` runs the whole protocol for several weight files (what
tools/neighbour_proxy.py prints and writes); :func:`report_lines` formats it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial

import cv2
import numpy as np

from ctxpred.caffe.netparam import read_net_param
from ctxpred.data.images import (DEFAULT_MAX_PIXELS, ImageError, ImageSource, decode_rgb_within,
                                 open_source)
from ctxpred.evaluation.statistics import accuracy, accuracy_with_interval, difference_interval
from ctxpred.features.extractor import FeatureExtractor
from ctxpred.features.search import normalised
from ctxpred.models.context import PATCH, snapshot_param


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


def paired_difference(hits_a, hits_b, image_ids, seed=0, resamples=2000, confidence=0.95):
    """(difference, low, high): rank-1 accuracy of A minus B on the same queries, with a paired
    bootstrap interval over images.

    hits_a, hits_b: (N,) bool, hit or not per query for features A and B;
    image_ids: (N,) image of each query. Each of ``resamples`` resamples
    (seeded by ``seed``) draws the images with replacement and takes all their
    queries, so the interval accounts for queries of one image succeeding or
    failing together; A and B are scored on the same resamples
    (:func:`ctxpred.evaluation.statistics.difference_interval`, BC percentile
    interval at ``confidence``).
    """
    hits_a, hits_b = np.asarray(hits_a, bool), np.asarray(hits_b, bool)
    image_ids = np.asarray(image_ids)
    if hits_a.shape != hits_b.shape or image_ids.shape != hits_a.shape or hits_a.ndim != 1:
        raise ValueError(f"need hits and image ids of one shape (N,), got {hits_a.shape}, "
                         f"{hits_b.shape} and {image_ids.shape}")
    interval = difference_interval(partial(accuracy, hits_a), partial(accuracy, hits_b),
                                   len(hits_a), resamples, seed, confidence, groups=image_ids)
    return interval.value, interval.low, interval.high


def extractor_ranks(extractor, pairs: RetrievalPairs):
    """:func:`positive_ranks` of the features of a
    :class:`ctxpred.features.extractor.FeatureExtractor`."""
    return positive_ranks(extractor.extract(pairs.queries), extractor.extract(pairs.keys),
                          pairs.image_ids)


@dataclass(frozen=True)
class ProxySettings:
    """One comparison. weights: caffemodels, the first the reference of the differences;
    labels: one name each. deploy: the deploy prototxt of architecture ``net``.
    train_prototxt: the training prototxt whose BatchNorm layers are folded (None: the
    training net of ``net``). max_shift, max_scale, colour_gain: the :class:`Augmentation`.
    max_pixels: None for full-size images. seed: positions, augmentations and the bootstrap."""

    images: str
    weights: tuple
    labels: tuple
    deploy: str
    net: str = "color_dropping"
    train_prototxt: str | None = None
    layer: str = "fc6"
    per_image: int = 16
    max_shift: int = 12
    max_scale: float = 1.2
    colour_gain: float = 0.15
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    seed: int = 0
    resamples: int = 2000
    batch: int = 64


def compare_nets(settings: ProxySettings):
    """Rank-1 retrieval of every net of ``settings`` on the same queries and keys, as a
    JSON-ready dict: queries, images, options (the settings) and per net its label, weights,
    :class:`RetrievalScore` fields and, after the first, ``minus_first`` (difference, low,
    high). Needs pycaffe loaded; ValueError for weights that do not fit or too few images."""
    augmentation = Augmentation(settings.max_shift, settings.max_scale, settings.colour_gain)
    pairs = retrieval_pairs(open_source(settings.images), settings.per_image, augmentation,
                            settings.seed, settings.max_pixels)
    train_param = (read_net_param(settings.train_prototxt) if settings.train_prototxt
                   else snapshot_param(settings.net))
    ranks = []
    for path in settings.weights:
        extractor = FeatureExtractor(settings.deploy, path, settings.layer, settings.batch,
                                     train_param=train_param)
        if extractor.ignored_layers:
            print(f"{path}: layers not in the deploy net, ignored: "
                  f"{', '.join(extractor.ignored_layers)}")
        ranks.append(extractor_ranks(extractor, pairs))
    for name, reason in pairs.skipped.items():
        print(f"skipped {name}: {reason}")
    results = {"queries": len(pairs.image_ids), "images": len(np.unique(pairs.image_ids)),
               "nets": [], "options": dataclasses.asdict(settings)}
    for label, path, net_ranks in zip(settings.labels, settings.weights, ranks):
        score = retrieval_score(net_ranks, pairs.image_ids)
        results["nets"].append({"label": label, "weights": path, **vars(score)})
    for net_ranks, entry in zip(ranks[1:], results["nets"][1:]):
        difference, low, high = paired_difference(net_ranks == 0, ranks[0] == 0,
                                                  pairs.image_ids, settings.seed,
                                                  settings.resamples)
        entry["minus_first"] = {"difference": difference, "low": low, "high": high}
    return results


def report_lines(results):
    """The printed report of :func:`compare_nets`' ``results``: the protocol, a row per net
    (rank-1 with its Wilson interval, chance, median rank), each net minus the first."""
    options = results["options"]
    lines = [f"{results['queries']} queries from {results['images']} images of "
             f"{options['images']}; keys moved <= {options['max_shift']} px, scaled <= "
             f"{options['max_scale']:g}x, colour gain <= {options['colour_gain']:g}; "
             f"{options['layer']}, cosine similarity",
             f"{'net':30s} {'rank-1':>7s} {'95% Wilson':>17s} {'chance':>7s} "
             f"{'median rank':>11s}"]
    for net in results["nets"]:
        lines.append(f"{net['label']:30s} {net['accuracy']:7.1%} [{net['low']:6.1%}, "
                     f"{net['high']:6.1%}] {net['chance']:7.2%} {net['median_rank']:11.1f}")
    first = results["nets"][0]["label"]
    for net in results["nets"][1:]:
        difference = net["minus_first"]
        lines.append(f"{net['label']} minus {first}: {100 * difference['difference']:+.1f} "
                     f"points, 95% bootstrap interval over images "
                     f"[{100 * difference['low']:+.1f}, {100 * difference['high']:+.1f}]")
    return lines
