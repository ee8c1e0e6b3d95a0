"""Average precision and bootstrap intervals, written once for every evaluation in ctxpred.

Average precision (:func:`average_precision`) ranks the images by score and
reads precision and recall at each *distinct* score: images with tied
scores enter together, so the value does not depend on the order in which
ties happen to be stored. Three ways to turn that curve into one number
(:func:`curve_average_precision`):

- ``"envelope"``: the area under the precision envelope (each precision
  raised to the best precision at any higher recall), as the VOC devkit
  from 2010 on and VISSL's VOC07 SVM benchmark compute it;
- ``"steps"``: sum over thresholds of (R_n - R_{n-1}) P_n, scikit-learn's
  ``average_precision_score`` (no interpolation);
- ``"eleven_point"``: VOC2007's mean over recall 0, 0.1, ..., 1 of the best
  precision at or above that recall.

Intervals come from a bootstrap over test rows (images): each resample draws
the rows with replacement, which is a vector of non-negative integer
*weights* (how often each row was drawn). They are bias-corrected percentile
intervals (BC, Efron 1987): AP on a resample, where rows repeat, runs higher
than on the images themselves (by about 1.4 points at 80 test images, 0.5
at 600, 0.1 at 5000), so the plain percentiles would sit beside the value
rather than around it; BC shifts both percentiles by the share of resamples
below the value, and is the plain percentile interval when that share is
one half (no bias, e.g. an accuracy). Every
statistic here takes such weights, (B, N) float64, and returns (B,) values,
so a metric is recomputed on a resample from the stored scores without
refitting anything and without copying rows. :func:`difference_interval`
evaluates two statistics on the same weights: the paired interval of the
difference between two nets scored on the same images. With ``groups``,
whole groups of rows (e.g. patches of one image) are drawn together.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

INTERPOLATIONS = ("envelope", "steps", "eleven_point")
ELEVEN_RECALLS = np.arange(11) / 10  # exactly k / 10, as the devkit compares recall with them
RESAMPLE_BLOCK = 200  # resamples drawn and scored at a time, at most
RESAMPLE_CELLS = 2_000_000  # and at most this many block x rows weights (16 MB) at a time


@dataclass(frozen=True)
class Interval:
    """A score and its bootstrap percentile interval [low, high] at ``confidence`` (e.g. 0.95)."""

    value: float
    low: float
    high: float
    confidence: float

    def contains(self, number) -> bool:
        return self.low <= number <= self.high


def curve_average_precision(recall, precision, interpolation="envelope"):
    """AP of precision/recall curves along the last axis: (..., T) -> (...,) float64.

    recall: non-decreasing along the last axis; precision in [0, 1]. See the
    module doc for the three ``interpolation`` rules. A curve that never
    reaches recall 1 gets no area beyond its last recall.
    """
    recall = np.asarray(recall, np.float64)
    precision = np.asarray(precision, np.float64)
    if recall.shape != precision.shape:
        raise ValueError(f"recall {recall.shape} and precision {precision.shape} differ in shape")
    if interpolation == "eleven_point":
        reached = recall[..., None, :] >= ELEVEN_RECALLS[:, None]
        best = np.where(reached, precision[..., None, :], 0.0).max(axis=-1, initial=0.0)
        return best.mean(axis=-1)
    if interpolation == "envelope":
        precision = np.flip(np.maximum.accumulate(np.flip(precision, -1), axis=-1), -1)
    elif interpolation != "steps":
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    steps = np.diff(recall, axis=-1, prepend=0.0)
    return np.sum(steps * precision, axis=-1)


def average_precision(truth, scores, interpolation="envelope", weights=None):
    """AP of one class: a float, or (B,) float64 when ``weights`` (B, N) are given.

    truth: (N,) bool, positive or not; scores: (N,) finite, higher = more
    confident. weights: how often each row counts (a bootstrap resample);
    None counts every row once. NaN where no positive weight is left.
    """
    truth = np.asarray(truth, bool)
    scores = np.asarray(scores, np.float64)
    if truth.ndim != 1 or truth.shape != scores.shape or len(truth) == 0:
        raise ValueError(f"truth {truth.shape} and scores {scores.shape} must be two non-empty "
                         "vectors of one length")
    if not np.isfinite(scores).all():
        raise ValueError(f"scores must be finite, got {scores[~np.isfinite(scores)][0]}")
    counts = np.ones((1, len(truth))) if weights is None else np.asarray(weights, np.float64)
    order = np.argsort(-scores, kind="stable")
    last = np.r_[np.flatnonzero(np.diff(scores[order])), len(order) - 1]  # end of each tie group
    counts = counts[:, order]
    hits = np.cumsum(counts * truth[order], axis=1)[:, last]
    seen = np.cumsum(counts, axis=1)[:, last]
    positives = hits[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(seen > 0, hits / seen, 0.0)
        recall = hits / positives
    values = np.where(positives[:, 0] > 0,
                      curve_average_precision(np.nan_to_num(recall), precision, interpolation),
                      np.nan)
    return float(values[0]) if weights is None else values


def mean_average_precision(labels, scores, interpolation="envelope", weights=None):
    """(B,) float64 mAP: mean over classes of :func:`average_precision`.

    labels: (N, C) 1 positive, 0 negative, -1 left out of that class (VOC's
    "difficult only"); scores: (N, C). weights: (B, N) resample counts, None
    for one pass with every row once (B = 1). Classes with no positive weight
    are left out of the mean; NaN where none has one.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, np.float64)
    if labels.ndim != 2 or labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be two (N, C) "
                         "arrays of one shape")
    counts = np.ones((1, len(labels))) if weights is None else np.asarray(weights, np.float64)
    per_class = np.empty((len(counts), labels.shape[1]))
    for index in range(labels.shape[1]):
        kept = labels[:, index] != -1
        per_class[:, index] = average_precision(labels[kept, index] == 1, scores[kept, index],
                                                interpolation, counts[:, kept])
    return nan_mean(per_class)


def nan_mean(values):
    """Row means of (B, C) values leaving NaN out: (B,) float64, NaN for an all-NaN row."""
    finite = ~np.isnan(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(finite.any(axis=1),
                        np.where(finite, values, 0).sum(axis=1) / finite.sum(axis=1), np.nan)


def accuracy(correct, weights=None):
    """(B,) float64 share of correct rows; correct: (N,) bool; weights: (B, N) or None (B = 1)."""
    correct = np.asarray(correct, np.float64)
    counts = np.ones((1, len(correct))) if weights is None else np.asarray(weights, np.float64)
    return (counts @ correct) / counts.sum(axis=1)


def resample_weights(rows, resamples, seed, groups=None):
    """Bootstrap resamples of ``rows`` rows in blocks: yields (b, rows) float64 counts.

    Each resample draws as many rows as there are, uniformly with
    replacement, from ``np.random.default_rng(seed)``, and counts how often
    each was drawn. With ``groups`` ((rows,) labels), the groups are drawn
    instead and each row gets the count of its group. The blocks depend only
    on the seed and the counts, so every statistic scored on them sees the
    same resamples.
    """
    if resamples < 1 or rows < 1:
        raise ValueError(f"need at least one row and one resample, got {rows} and {resamples}")
    if groups is None:
        index = np.arange(rows)
    else:
        _, index = np.unique(np.asarray(groups), return_inverse=True)
        if index.shape != (rows,):
            raise ValueError(f"groups {np.shape(groups)} must give one label per row ({rows})")
    count = int(index.max()) + 1
    rng = np.random.default_rng(seed)
    size = max(1, min(RESAMPLE_BLOCK, RESAMPLE_CELLS // rows))
    for start in range(0, resamples, size):
        block = min(size, resamples - start)
        draws = rng.integers(0, count, size=(block, count)) + count * np.arange(block)[:, None]
        counts = np.bincount(draws.ravel(), minlength=block * count).reshape(block, count)
        yield counts[:, index].astype(np.float64)


def bootstrap_interval(statistic, rows, resamples=1000, seed=0, confidence=0.95,
                       groups=None) -> Interval:
    """:class:`Interval` of ``statistic`` over bootstrap resamples of the test rows.

    statistic: weights (B, rows) -> (B,) values (e.g. a partial of
    :func:`mean_average_precision` or :func:`accuracy`); the value is the
    statistic with every row once; [low, high] the BC percentile interval
    (module doc). Resamples where the statistic is NaN (e.g. no positive
    drawn) are left out.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    value = float(statistic(np.ones((1, rows)))[0])
    samples = np.concatenate([statistic(weights) for weights in
                              resample_weights(rows, resamples, seed, groups)])
    samples = samples[~np.isnan(samples)]
    if len(samples) == 0:
        return Interval(value, float("nan"), float("nan"), confidence)
    low, high = np.quantile(samples, corrected_quantiles(samples, value, confidence))
    return Interval(value, float(low), float(high), confidence)


def corrected_quantiles(samples, value, confidence):
    """(lower, upper) quantile levels of the BC interval (module doc) of ``samples`` about
    ``value``: Phi(2 z0 -+ z), z0 = Phi^-1(share of samples below value, ties counting half)."""
    normal = NormalDist()
    share = (np.sum(samples < value) + 0.5 * np.sum(samples == value)) / len(samples)
    share = min(max(share, 0.5 / len(samples)), 1 - 0.5 / len(samples))
    bias = normal.inv_cdf(share)
    z = normal.inv_cdf(0.5 + confidence / 2)
    return normal.cdf(2 * bias - z), normal.cdf(2 * bias + z)


def difference_interval(statistic_a, statistic_b, rows, resamples=1000, seed=0,
                        confidence=0.95, groups=None) -> Interval:
    """Paired :class:`Interval` of statistic_a - statistic_b: both on the same resamples.

    Pairing removes what the two share (which images are easy), so the
    interval is much narrower than one from two independent intervals.
    """
    return bootstrap_interval(lambda weights: statistic_a(weights) - statistic_b(weights),
                              rows, resamples, seed, confidence, groups)


def accuracy_with_interval(correct: int, total: int,
                           confidence: float = 0.95) -> tuple[float, float, float]:
    """(accuracy, low, high): correct / total and its Wilson score interval.

    The Wilson interval inverts the normal approximation of the binomial
    test, so it stays inside [0, 1] and behaves near 0 and 1 (unlike the
    Wald interval p +- z sqrt(p(1-p)/n)). It treats the ``total`` pairs as
    independent trials; pairs from one image are correlated, so the true
    uncertainty is somewhat larger.
    """
    if total <= 0 or not 0 <= correct <= total:
        raise ValueError(f"need 0 <= correct <= total and total > 0, got {correct}/{total}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = correct / total
    z2n = z * z / total
    centre = (p + z2n / 2) / (1 + z2n)
    half_width = z / (1 + z2n) * math.sqrt(p * (1 - p) / total + z2n / (4 * total))
    return p, max(0.0, centre - half_width), min(1.0, centre + half_width)
