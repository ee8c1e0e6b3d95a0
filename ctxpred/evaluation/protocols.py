"""The field's frozen-feature protocols on numpy arrays: VOC07 SVM, low-shot SVM, kNN, linear probe.

A representation is judged the way Goyal et al. (2019, VISSL), Wu et al.
(2018) and Zhang et al. (2017) judge theirs, on features already extracted
(one layer at a time; no Caffe here), so numbers sit beside the published
ones (``shared/reference/evaluation.md``).

- :func:`voc07_svm` (multi-label): rows L2-normalised; per class one
  scikit-learn ``LinearSVC`` (squared hinge, L2, dual, class weight
  {positive: 2, negative: 1}, max_iter 2000, random_state = seed); the cost
  per class by ``folds``-fold cross-validation (stratified, shuffled with
  the seed) over ``costs``, scored by scikit-learn-style AP as VISSL's
  ``cross_val_score(scoring="average_precision")`` (the first, i.e.
  smallest, best cost wins ties); refitted on all training rows. Rows
  labelled -1 ("difficult only") are left out of that class's training,
  cross-validation and scoring. Test AP is VOC's area under the precision
  envelope (VOC2010+ devkit and VISSL's ``get_precision_recall``), ties of
  scores grouped (:mod:`ctxpred.evaluation.statistics`). A single cost skips
  the cross-validation.
- :func:`low_shot_svm`: as VISSL's low-shot sampler, for each of
  ``samples`` independent draws and each k, every class gets k positive and
  (C - 1) x k negative training rows (fewer negatives where fewer exist),
  the class's other rows ignored; an SVM as above per class and cost, test
  mAP per cost. As in VISSL, the reported cost is the one with the best test
  mAP averaged over the draws (chosen on the test set, as the reference
  does; pass one cost to fix it); mean/min/max/std (population std) of the
  draws' test mAP at that cost.
- :func:`knn_top1` (single label): cosine similarity of L2-normalised rows
  (exact search, :class:`ctxpred.features.search.NeighbourIndex`: memory
  bounded by blocks; float32 similarities), the k most similar training
  rows vote with weight exp(similarity / T); top-1 per k. Neighbours are
  ordered by similarity, then lower training index (which of several rows
  tied at the k-th place is kept is fixed for given inputs, not chosen by
  index); a tie of votes goes to the class that sorts first. A k above the
  number of training rows is an error (clamping would report a different
  protocol under the same name).
- SVM fits run one after another: scikit-learn's liblinear seeds one
  process-wide random generator, so fits in threads would not be
  reproducible.
- :func:`linear_probe` (single label): features standardised with training
  statistics, multinomial ``LogisticRegression`` (lbfgs); C by
  ``folds``-fold stratified cross-validation accuracy on the training rows
  (standardisation refitted inside each fold), a single cost fixes it.

Every score comes with a percentile interval from a seeded bootstrap over
the test rows (:class:`Bootstrap`): the stored test scores of the fitted
models are re-scored on each resample, nothing is refitted.
:func:`score_difference` gives the paired interval of the difference between
two nets scored on the same test rows (the same resamples for both).

Bad input (NaN features, mismatched rows, a class without a positive, a
low-shot k above a class's positives, a k above the training rows) raises
:class:`ProtocolError`, one line naming the class or value, before any fit.
Fits that stop at their iteration limit (LinearSVC's 2000 at high costs, as
in the reference) are kept; each protocol call warns once with their count.
Results are reproducible bit for bit on one machine for a fixed seed.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from ctxpred.evaluation.statistics import (Interval, accuracy, average_precision,
                                           bootstrap_interval, difference_interval,
                                           mean_average_precision)
from ctxpred.features.search import NeighbourIndex, normalised

SVM_COSTS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)  # VISSL's AlexNet sweep, 0.01 ... 1000
SVM_CLASS_WEIGHT = {1: 2, 0: 1}
SVM_MAX_ITER = 2000
LOW_SHOT_SHOTS = (1, 2, 4, 8, 16, 32, 64, 96)
KNN_KS = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07
PROBE_COSTS = (0.001, 0.01, 0.1, 1.0)
PROBE_MAX_ITER = 1000


class ProtocolError(ValueError):
    """Input a protocol cannot score: one line naming the class, row or value."""


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are drawn: ``resamples`` resamples of the test rows from ``seed``."""

    resamples: int = 1000
    seed: int = 0
    confidence: float = 0.95


@dataclass(frozen=True, eq=False)
class Score:
    """One test score, its bootstrap interval, and what recomputes it on resampled test rows.

    Accuracy: ``correct`` (N,) bool per test row. mAP: ``labels`` (N, C)
    int8 (1 / 0 / -1 left out) and ``decisions`` (S, N, C) float64 test
    scores of S independent fits, the score being their mean mAP (S = 1
    but for low-shot).
    """

    interval: Interval
    correct: np.ndarray | None = None
    labels: np.ndarray | None = None
    decisions: np.ndarray | None = None

    @property
    def value(self) -> float:
        return self.interval.value

    @property
    def rows(self) -> int:
        return len(self.correct) if self.correct is not None else len(self.labels)

    def statistic(self, weights):
        """(B,) the score on resamples given as (B, N) row counts."""
        if self.correct is not None:
            return accuracy(self.correct, weights)
        return np.mean([mean_average_precision(self.labels, fit, "envelope", weights)
                        for fit in self.decisions], axis=0)

    def summary(self) -> dict:
        interval = self.interval
        return dict(value=interval.value, low=interval.low, high=interval.high,
                    confidence=interval.confidence)


def accuracy_score(correct, bootstrap: Bootstrap) -> Score:
    """:class:`Score` of (N,) bool ``correct`` with its interval."""
    correct = np.asarray(correct, bool)
    interval = bootstrap_interval(lambda weights: accuracy(correct, weights), len(correct),
                                  bootstrap.resamples, bootstrap.seed, bootstrap.confidence)
    return Score(interval, correct=correct)


def map_score(labels, decisions, bootstrap: Bootstrap) -> Score:
    """:class:`Score` of the mean mAP of (S, N, C) ``decisions`` against (N, C) ``labels``."""
    pending = Score(Interval(np.nan, np.nan, np.nan, bootstrap.confidence), labels=labels,
                    decisions=np.asarray(decisions, np.float64))
    interval = bootstrap_interval(pending.statistic, len(labels), bootstrap.resamples,
                                  bootstrap.seed, bootstrap.confidence)
    return Score(interval, labels=labels, decisions=pending.decisions)


def score_difference(first: Score, second: Score, bootstrap=Bootstrap()) -> Interval:
    """Paired :class:`Interval` of first - second, two nets scored on the same test rows.

    Both are re-scored on the same resamples, so what they share (which
    images are hard) cancels. Raises ProtocolError when the two were not
    scored on the same rows (different counts, labels or kinds of score).
    """
    same = (first.rows == second.rows and (first.correct is None) == (second.correct is None)
            and (first.labels is None or np.array_equal(first.labels, second.labels)))
    if not same:
        raise ProtocolError(f"the two scores are not on the same test rows ({first.rows} and "
                            f"{second.rows} rows, or different labels or kinds of score)")
    return difference_interval(first.statistic, second.statistic, first.rows,
                               bootstrap.resamples, bootstrap.seed, bootstrap.confidence)


@contextmanager
def convergence_summary(protocol):
    """Gather the fits' ConvergenceWarnings (one per SVM or probe fit that stopped at its
    iteration limit, as the reference's do at high costs) into one warning for ``protocol``;
    other warnings pass through."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        yield
    unconverged = 0
    for warning in caught:
        if issubclass(warning.category, ConvergenceWarning):
            unconverged += 1
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                   warning.lineno)
    if unconverged:
        warnings.warn(f"{protocol}: {unconverged} fit(s) stopped at the iteration limit before "
                      "converging", ConvergenceWarning, stacklevel=3)


# ---- input checks ------------------------------------------------------------------------

def checked_features(train_x, test_x):
    """(train, test) float64 (N, D) arrays; ProtocolError naming the first non-finite value."""
    arrays = []
    for name, rows in (("train_x", train_x), ("test_x", test_x)):
        rows = np.asarray(rows, np.float64)
        if rows.ndim != 2 or len(rows) == 0:
            raise ProtocolError(f"{name} must be a non-empty (N, D) array, got {rows.shape}")
        bad = np.argwhere(~np.isfinite(rows))
        if len(bad):
            row, column = bad[0]
            raise ProtocolError(f"{name} row {row} column {column} is {rows[row, column]}")
        arrays.append(rows)
    if arrays[0].shape[1] != arrays[1].shape[1]:
        raise ProtocolError(f"train_x has {arrays[0].shape[1]} columns, test_x "
                            f"{arrays[1].shape[1]}")
    return arrays


def checked_multi_labels(labels, rows, name, classes):
    """(N, C) int8 labels in {1, 0, -1}, every class with a positive; names: ``classes``."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or len(labels) != rows:
        raise ProtocolError(f"{name} must be ({rows}, C) like its features, got {labels.shape}")
    odd = labels[~np.isin(labels, (-1, 0, 1))]
    if len(odd):
        raise ProtocolError(f"{name} holds {odd[0]}; labels are 1, 0 or -1 (left out)")
    for index, count in enumerate((labels == 1).sum(axis=0)):
        if count == 0:
            raise ProtocolError(f"class {class_name(classes, index)} has no positive row in "
                                f"{name}")
    return labels.astype(np.int8)


def checked_single_labels(train_y, test_y, train_rows, test_rows):
    """(train, test) int64 class indices into the sorted training classes, and those classes."""
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    for name, labels, rows in (("train_y", train_y, train_rows), ("test_y", test_y, test_rows)):
        if labels.shape != (rows,):
            raise ProtocolError(f"{name} must be ({rows},) like its features, got {labels.shape}")
    classes = np.unique(train_y)
    unseen = np.setdiff1d(test_y, classes)
    if len(unseen):
        raise ProtocolError(f"class {unseen[0].item()!r} of test_y has no training row")
    return np.searchsorted(classes, train_y), np.searchsorted(classes, test_y), classes


def class_name(classes, index):
    """'name' of class ``index`` for messages, or its number when no names are given."""
    return repr(str(classes[index])) if classes is not None else str(index)


# ---- SVMs ----------------------------------------------------------------------------------

def linear_svm(cost, seed):
    """The reference's per-class SVM (see the module doc) at cost ``cost``."""
    return LinearSVC(C=cost, loss="squared_hinge", penalty="l2", dual=True,
                     class_weight=SVM_CLASS_WEIGHT, max_iter=SVM_MAX_ITER, random_state=seed)


def cross_validated_ap(features, truth, cost, folds, seed):
    """Mean held-out AP (scikit-learn style) of :func:`linear_svm` over stratified folds."""
    splits = StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, truth)
    aps = [average_precision(truth[test], linear_svm(cost, seed).fit(
        features[train], truth[train]).decision_function(features[test]), "steps")
        for train, test in splits]
    return float(np.mean(aps))


def fit_class_svm(features, labels, costs, folds, seed):
    """(fitted LinearSVC, chosen cost, mean CV AP per cost) for one class's (N,) 1/0/-1 labels."""
    kept = labels != -1
    features, truth = features[kept], (labels[kept] == 1).astype(np.int64)
    if len(costs) == 1:
        return linear_svm(costs[0], seed).fit(features, truth), costs[0], (float("nan"),)
    scores = tuple(cross_validated_ap(features, truth, cost, folds, seed) for cost in costs)
    best = costs[int(np.argmax(scores))]
    return linear_svm(best, seed).fit(features, truth), best, scores


@dataclass(frozen=True, eq=False)
class SvmResult:
    """VOC07 SVM on one layer: test AP (envelope) and chosen cost per class, CV AP per class
    and swept cost (NaN when one cost was given), and the mAP :class:`Score`."""

    classes: tuple
    average_precisions: tuple
    costs: tuple
    swept_costs: tuple
    cross_validation: tuple
    score: Score

    def named_scores(self):
        return (("voc07_svm mAP", self.score),)

    def summary(self) -> dict:
        return dict(mAP=self.score.summary(), swept_costs=list(self.swept_costs),
                    classes={str(name): dict(ap=ap, cost=cost, cv_ap=list(cv)) for name, ap, cost,
                             cv in zip(self.classes, self.average_precisions, self.costs,
                                       self.cross_validation)})


def voc07_svm(train_x, train_y, test_x, test_y, costs=SVM_COSTS, folds=3, seed=0, classes=None,
              bootstrap=Bootstrap()) -> SvmResult:
    """The VOC07 linear SVM protocol (module doc) on (N, D) features and (N, C) 1/0/-1 labels.

    classes: C names for the result and messages (None: numbers).
    """
    train_x, test_x = checked_features(train_x, test_x)
    train_y = checked_multi_labels(train_y, len(train_x), "train_y", classes)
    test_y = checked_multi_labels(test_y, len(test_x), "test_y", classes)
    if train_y.shape[1] != test_y.shape[1]:
        raise ProtocolError(f"train_y has {train_y.shape[1]} classes, test_y {test_y.shape[1]}")
    costs = tuple(sorted(float(cost) for cost in costs))
    names = tuple(classes) if classes is not None else tuple(range(train_y.shape[1]))
    check_svm_training(train_y, classes, folds if len(costs) > 1 else 1)
    train_x, test_x = normalised(train_x), normalised(test_x)
    with convergence_summary("voc07_svm"):
        fits = [fit_class_svm(train_x, train_y[:, index], costs, folds, seed)
                for index in range(train_y.shape[1])]
    decisions = np.column_stack([svm.decision_function(test_x) for svm, _, _ in fits])
    aps = tuple(average_precision(test_y[test_y[:, index] != -1, index] == 1,
                                  decisions[test_y[:, index] != -1, index])
                for index in range(len(names)))
    return SvmResult(names, aps, tuple(cost for _, cost, _ in fits), costs,
                     tuple(cv for _, _, cv in fits), map_score(test_y, decisions[None], bootstrap))


def check_svm_training(train_y, classes, folds):
    """ProtocolError for a class with no negative training row, or fewer positive ones than
    the cross-validation ``folds`` (1: no cross-validation)."""
    for index, (positives, negatives) in enumerate(zip((train_y == 1).sum(axis=0),
                                                       (train_y == 0).sum(axis=0))):
        if negatives == 0:
            raise ProtocolError(f"class {class_name(classes, index)} has no negative row in "
                                "train_y")
        if positives < folds:
            raise ProtocolError(f"class {class_name(classes, index)} has {positives} positive "
                                f"training rows; {folds}-fold cross-validation needs {folds}")


def low_shot_rows(labels, k, rng):
    """(N, C) int8 labels of one low-shot draw: per class k positives and (C - 1) k negatives
    drawn from ``labels`` (fewer negatives where fewer exist), every other row -1."""
    sampled = np.full(labels.shape, -1, np.int8)
    for index in range(labels.shape[1]):
        for value, count in ((1, k), (0, (labels.shape[1] - 1) * k)):
            candidates = np.flatnonzero(labels[:, index] == value)
            chosen = rng.choice(candidates, min(count, len(candidates)), replace=False)
            sampled[chosen, index] = value
    return sampled


@dataclass(frozen=True, eq=False)
class LowShotPoint:
    """Low-shot SVM at k positives per class: the cost (best mean test mAP over draws), each
    draw's test mAP at it, their mean/min/max/std, and the mean's :class:`Score`."""

    k: int
    cost: float
    sample_maps: tuple
    mean: float
    min: float
    max: float
    std: float
    score: Score

    def summary(self) -> dict:
        return dict(k=self.k, cost=self.cost, sample_maps=list(self.sample_maps), mean=self.mean,
                    min=self.min, max=self.max, std=self.std, interval=self.score.summary())


@dataclass(frozen=True, eq=False)
class LowShotResult:
    """Low-shot SVM on one layer: one :class:`LowShotPoint` per k, in the order asked."""

    points: tuple

    def named_scores(self):
        return tuple((f"low_shot k={point.k} mAP", point.score) for point in self.points)

    def summary(self) -> dict:
        return dict(points=[point.summary() for point in self.points])


def check_low_shot(train_y, shots, classes):
    """ProtocolError when the largest k exceeds some class's positive training rows."""
    positives = (train_y == 1).sum(axis=0)
    index = int(np.argmin(positives))
    if max(shots) > positives[index]:
        raise ProtocolError(f"low-shot k={max(shots)} needs {max(shots)} positive training rows "
                            f"of class {class_name(classes, index)}, which has "
                            f"{positives[index]}")


def low_shot_decisions(train_x, test_x, labels, costs, seed):
    """(costs, N_test, C) decision values of per-class SVMs trained on one draw's labels."""
    decisions = np.empty((len(costs), len(test_x), labels.shape[1]))
    for index in range(labels.shape[1]):
        kept = labels[:, index] != -1
        truth = (labels[kept, index] == 1).astype(np.int64)
        for slot, cost in enumerate(costs):
            svm = linear_svm(cost, seed).fit(train_x[kept], truth)
            decisions[slot, :, index] = svm.decision_function(test_x)
    return decisions


def low_shot_svm(train_x, train_y, test_x, test_y, shots=LOW_SHOT_SHOTS, samples=5,
                 costs=SVM_COSTS, seed=0, classes=None, bootstrap=Bootstrap()) -> LowShotResult:
    """The low-shot SVM protocol (module doc): ``samples`` draws per k in ``shots``.

    Draw s of k uses ``np.random.default_rng([seed, s, k])``.
    """
    train_x, test_x = checked_features(train_x, test_x)
    train_y = checked_multi_labels(train_y, len(train_x), "train_y", classes)
    test_y = checked_multi_labels(test_y, len(test_x), "test_y", classes)
    check_low_shot(train_y, shots, classes)
    check_svm_training(train_y, classes, 1)
    if samples < 1:
        raise ProtocolError(f"samples must be at least 1, got {samples}")
    costs = tuple(sorted(float(cost) for cost in costs))
    train_x, test_x = normalised(train_x), normalised(test_x)
    points = []
    for k in shots:
        with convergence_summary(f"low_shot_svm k={k}"):
            draws = np.stack([low_shot_decisions(
                train_x, test_x, low_shot_rows(train_y, k, np.random.default_rng([seed, draw, k])),
                costs, seed) for draw in range(samples)])  # (samples, costs, N, C)
        maps = np.array([[mean_average_precision(test_y, draws[draw, slot])[0]
                          for slot in range(len(costs))] for draw in range(samples)])
        best = int(np.argmax(maps.mean(axis=0)))
        chosen = maps[:, best]
        points.append(LowShotPoint(k, costs[best], tuple(chosen.tolist()), float(chosen.mean()),
                                   float(chosen.min()), float(chosen.max()), float(chosen.std()),
                                   map_score(test_y, draws[:, best], bootstrap)))
    return LowShotResult(tuple(points))


# ---- single-label protocols ----------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class KnnResult:
    """Weighted kNN on one layer: top-1 :class:`Score` per k (aligned with ``ks``)."""

    ks: tuple
    temperature: float
    scores: tuple

    def named_scores(self):
        return tuple((f"knn k={k} top-1", score) for k, score in zip(self.ks, self.scores))

    def summary(self) -> dict:
        return dict(temperature=self.temperature,
                    top1={str(k): score.summary() for k, score in zip(self.ks, self.scores)})


def knn_votes(neighbour_labels, similarities, classes, temperature):
    """(Q, classes) float64 votes: each neighbour adds exp(similarity / T) to its class.

    neighbour_labels: (Q, k) int64 class indices; similarities: (Q, k).
    """
    queries = len(neighbour_labels)
    weights = np.exp(np.asarray(similarities, np.float64) / temperature)
    slots = np.arange(queries)[:, None] * classes + neighbour_labels
    return np.bincount(slots.ravel(), weights.ravel(), queries * classes).reshape(queries, classes)


def knn_top1(train_x, train_y, test_x, test_y, ks=KNN_KS, temperature=KNN_TEMPERATURE,
             block_rows=1024, bootstrap=Bootstrap()) -> KnnResult:
    """Weighted kNN top-1 (module doc) on (N, D) features and (N,) labels (ints or names).

    Memory: ``block_rows`` training rows x ``block_rows`` test rows of
    similarities at a time, plus (N_test, max k) neighbours.
    """
    train_x, test_x = checked_features(train_x, test_x)
    train_y, test_y, classes = checked_single_labels(train_y, test_y, len(train_x), len(test_x))
    ks = tuple(int(k) for k in ks)
    if min(ks) < 1 or max(ks) > len(train_x):
        raise ProtocolError(f"kNN k={max(ks) if max(ks) > len(train_x) else min(ks)} is "
                            f"outside 1..{len(train_x)} (the training rows)")
    index = NeighbourIndex(train_x, exact_threshold=len(train_x), block_rows=block_rows)
    neighbours, similarities = index.query(test_x, max(ks))
    scores = []
    for k in ks:
        votes = knn_votes(train_y[neighbours[:, :k]], similarities[:, :k], len(classes),
                          temperature)
        scores.append(accuracy_score(votes.argmax(axis=1) == test_y, bootstrap))
    return KnnResult(ks, float(temperature), tuple(scores))


@dataclass(frozen=True, eq=False)
class ProbeResult:
    """Linear probe on one layer: chosen cost, mean CV accuracy per swept cost (NaN when one
    cost was given) and the top-1 :class:`Score`."""

    cost: float
    swept_costs: tuple
    cross_validation: tuple
    score: Score

    def named_scores(self):
        return (("linear_probe top-1", self.score),)

    def summary(self) -> dict:
        return dict(top1=self.score.summary(), cost=self.cost, swept_costs=list(self.swept_costs),
                    cv_accuracy=list(self.cross_validation))


def probe_model(cost, max_iter):
    """Standardisation (training statistics) then multinomial logistic regression (lbfgs)."""
    return make_pipeline(StandardScaler(),
                         LogisticRegression(C=cost, solver="lbfgs", max_iter=max_iter))


def linear_probe(train_x, train_y, test_x, test_y, costs=PROBE_COSTS, folds=3, seed=0,
                 max_iter=PROBE_MAX_ITER, bootstrap=Bootstrap()) -> ProbeResult:
    """Linear (logistic) probe top-1 (module doc) on (N, D) features and (N,) labels."""
    train_x, test_x = checked_features(train_x, test_x)
    train_y, test_y, classes = checked_single_labels(train_y, test_y, len(train_x),
                                                     len(test_x))
    if len(classes) < 2:
        raise ProtocolError(f"train_y has one class ({classes[0].item()!r}); a probe needs "
                            "two or more")
    costs = tuple(sorted(float(cost) for cost in costs))
    cross_validation = (float("nan"),)
    with convergence_summary("linear_probe"):
        if len(costs) > 1:
            splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed)
                          .split(train_x, train_y))
            cross_validation = tuple(float(np.mean([
                np.mean(probe_model(cost, max_iter).fit(train_x[fit], train_y[fit])
                        .predict(train_x[held]) == train_y[held]) for fit, held in splits]))
                for cost in costs)
        cost = costs[int(np.argmax(cross_validation))] if len(costs) > 1 else costs[0]
        model = probe_model(cost, max_iter).fit(train_x, train_y)
    return ProbeResult(cost, costs, cross_validation,
                       accuracy_score(model.predict(test_x) == test_y, bootstrap))
