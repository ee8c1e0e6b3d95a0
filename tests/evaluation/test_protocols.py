"""Frozen-feature protocols and their report against cases worked out by hand.

Small arrays and one-cost sweeps keep the file fast; the full sweeps are
the library's defaults.
"""
import json

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from ctxpred.evaluation.protocols import (Bootstrap, ProtocolError, knn_top1, knn_votes,
                                          linear_probe, low_shot_svm, score_difference, voc07_svm)
from ctxpred.evaluation.report import write_report
from ctxpred.evaluation.statistics import average_precision, mean_average_precision

FAST = Bootstrap(resamples=200)


def multi_label_set(rng, rows, classes=3, signal=3.0, dims=12):
    """(features, labels): each row positive for random classes, class c lifting dimension c."""
    labels = (rng.random((rows, classes)) < 0.4).astype(np.int8)
    labels[:classes] = np.eye(classes, dtype=np.int8)  # every class has positives
    features = rng.normal(size=(rows, dims))
    features[:, :classes] += signal * (labels == 1)
    return features, labels


def single_label_set(rng, rows, classes=4, signal=3.0, dims=12):
    """(features, labels): class c lifts dimension c by ``signal`` (noise sd 1)."""
    labels = np.arange(rows) % classes
    features = rng.normal(size=(rows, dims))
    features[np.arange(rows), labels] += signal
    return features, labels


def test_average_precision_rules_by_hand():
    truth = np.array([1, 0, 1, 0], bool)
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    # precision at the positives: 1 and 2/3; envelope raises nothing here
    assert average_precision(truth, scores, "steps") == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert average_precision(truth, scores) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # 0.9 (-), 0.8 (+), 0.7 (-), 0.6 (+): precisions 1/2, 1/2; envelope the same
    assert average_precision(truth, [0.8, 0.9, 0.6, 0.7]) == pytest.approx(0.5)
    # a tie of one positive and one negative enters together: precision 1/2 at recall 1/2
    assert average_precision(truth, [0.9, 0.9, 0.5, 0.1], "steps") == pytest.approx(
        0.5 * 0.5 + 0.5 * 2 / 3)
    # weights = a resample: row 0 drawn twice, row 1 never
    twice = average_precision(truth, scores, "steps", weights=np.array([[2.0, 0, 1, 1]]))
    assert twice[0] == pytest.approx(average_precision([1, 1, 1, 0], [0.9, 0.9, 0.7, 0.6], "steps"))
    labels = np.array([[1, 0], [0, -1], [0, 1]])
    assert mean_average_precision(labels, [[0.9, 0.0], [0.5, 5.0], [0.1, 1.0]])[0] == 1.0


def test_separable_features_score_perfectly():
    rng = np.random.default_rng(0)
    train_x, train_y = multi_label_set(rng, 60, signal=20.0)
    test_x, test_y = multi_label_set(rng, 40, signal=20.0)
    # a constant last dimension keeps rows with no positive away from every class's direction
    # once rows are L2-normalised
    train_x[:, -1] += 20
    test_x[:, -1] += 20
    result = voc07_svm(train_x, train_y, test_x, test_y, costs=(1.0,), bootstrap=FAST)
    assert result.average_precisions == (1.0, 1.0, 1.0) and result.score.value == 1.0
    assert result.score.interval.low == result.score.interval.high == 1.0
    train_x, train_y = single_label_set(rng, 80, signal=20.0)
    test_x, test_y = single_label_set(rng, 40, signal=20.0)
    knn = knn_top1(train_x, train_y, test_x, test_y, ks=(1, 10), bootstrap=FAST)
    assert [score.value for score in knn.scores] == [1.0, 1.0]
    probe = linear_probe(train_x, train_y, test_x, test_y, costs=(1.0,), bootstrap=FAST)
    assert probe.score.value == 1.0


def test_shuffled_labels_score_chance():
    """Labels shuffled in train and in test, so features say nothing about them."""
    rng = np.random.default_rng(1)
    train_x, train_y = single_label_set(rng, 400)
    test_x, test_y = single_label_set(rng, 800)
    train_y, test_y = rng.permutation(train_y), rng.permutation(test_y)
    knn = knn_top1(train_x, train_y, test_x, test_y, ks=(20,), bootstrap=FAST)
    probe = linear_probe(train_x, train_y, test_x, test_y, costs=(0.1,), bootstrap=FAST)
    for score in (knn.scores[0], probe.score):  # chance is 1/4
        assert 0.2 < score.value < 0.3 and score.interval.contains(0.25)
    train_x, train_y = multi_label_set(rng, 300)
    test_x, test_y = multi_label_set(rng, 600)
    svm = voc07_svm(train_x, rng.permutation(train_y), test_x, rng.permutation(test_y),
                    costs=(1.0,), bootstrap=FAST)
    # a random ranking's AP is about the prevalence (its envelope adds ~0.02 at 240 positives)
    above = np.array(svm.average_precisions) - (test_y == 1).mean(axis=0)
    assert np.all(np.abs(above) < 0.08) and abs(above.mean()) < 0.05


def test_weighted_knn_vote_by_hand():
    # neighbours of one query: class 0 at similarity 0.9, class 1 at 0.8 and 0.7
    votes = knn_votes(np.array([[0, 1, 1]]), np.array([[0.9, 0.8, 0.7]]), 2, temperature=0.1)
    assert votes[0] == pytest.approx([np.exp(9), np.exp(8) + np.exp(7)])
    assert votes.argmax() == 0  # e^9 = 8103 beats e^8 + e^7 = 4077
    train_x = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    train_y = np.array([0, 1, 1, 2])
    test_x = np.array([[0.95, 0.31225]])  # similarities 0.95, 0.947, 0.819, 0.312
    at_two = knn_top1(train_x, train_y, test_x, [0], ks=(1, 2, 3), temperature=1.0,
                      bootstrap=FAST)
    # k=1: class 0; k=2: e^.95 vs e^.947 -> class 0; k=3: e^.947 + e^.819 wins -> class 1
    assert [score.value for score in at_two.scores] == [1.0, 1.0, 0.0]
    with pytest.raises(ProtocolError, match="k=5 is outside 1..4"):
        knn_top1(train_x, train_y, test_x, [0], ks=(1, 5))


def test_difficult_rows_are_left_out():
    rng = np.random.default_rng(2)
    train_x, train_y = multi_label_set(rng, 80)
    test_x, test_y = multi_label_set(rng, 60)
    train_y[10:20, 0] = -1
    test_y[5:15, 0] = -1
    first = voc07_svm(train_x, train_y, test_x, test_y, costs=(1.0,), bootstrap=FAST)
    # rows difficult for every class change nothing wherever their features go
    train_y[30:35] = -1
    test_y[40:45] = -1
    base = voc07_svm(train_x, train_y, test_x, test_y, costs=(1.0,), bootstrap=FAST)
    moved_train, moved_test = train_x.copy(), test_x.copy()
    moved_train[30:35] = rng.normal(scale=50, size=(5, train_x.shape[1]))
    moved_test[40:45] = rng.normal(scale=50, size=(5, test_x.shape[1]))
    moved = voc07_svm(moved_train, train_y, moved_test, test_y, costs=(1.0,), bootstrap=FAST)
    assert moved.average_precisions == base.average_precisions
    assert first.average_precisions != base.average_precisions  # they were counted before


def test_low_shot_statistics_and_k_too_large():
    rng = np.random.default_rng(3)
    train_x, train_y = multi_label_set(rng, 120)
    test_x, test_y = multi_label_set(rng, 80)
    result = low_shot_svm(train_x, train_y, test_x, test_y, shots=(1, 4), samples=3,
                          costs=(1.0,), bootstrap=FAST)
    for point in result.points:
        maps = np.array(point.sample_maps)
        assert len(maps) == 3 and point.mean == pytest.approx(maps.mean())
        assert (point.min, point.max, point.std) == (maps.min(), maps.max(), maps.std())
        assert point.score.value == pytest.approx(point.mean)
    assert result.points[1].mean > result.points[0].mean  # more positives help
    train_y[:, 1] = 0
    train_y[:3, 1] = 1
    with pytest.raises(ProtocolError, match=r"^low-shot k=4 needs 4 positive training rows of "
                                            r"class 'dog', which has 3$"):
        low_shot_svm(train_x, train_y, test_x, test_y, shots=(1, 4), classes=("cat", "dog", "cow"))


def test_bad_input_names_the_class_or_value():
    rng = np.random.default_rng(4)
    train_x, train_y = multi_label_set(rng, 30)
    test_x, test_y = multi_label_set(rng, 20)
    no_positive = test_y.copy()
    no_positive[:, 2] = 0
    with pytest.raises(ProtocolError, match="class 'cow' has no positive row in test_y"):
        voc07_svm(train_x, train_y, test_x, no_positive, classes=("cat", "dog", "cow"))
    broken = train_x.copy()
    broken[7, 3] = np.nan
    with pytest.raises(ProtocolError, match="train_x row 7 column 3 is nan"):
        voc07_svm(broken, train_y, test_x, test_y)
    with pytest.raises(ProtocolError, match=r"train_y must be \(30, C\)"):
        voc07_svm(train_x, train_y[:-1], test_x, test_y)
    with pytest.raises(ProtocolError, match="class 'zebra' of test_y has no training row"):
        knn_top1(train_x, ["cat"] * 30, test_x, ["cat"] * 19 + ["zebra"])
    with pytest.raises(ProtocolError, match=r"train_y has one class \('cat'\)"):
        linear_probe(train_x, ["cat"] * 30, test_x, ["cat"] * 20)
    everywhere = train_y.copy()
    everywhere[:, 1] = 1
    with pytest.raises(ProtocolError, match="class 1 has no negative row in train_y"):
        low_shot_svm(train_x, everywhere, test_x, test_y, shots=(1,))
    few = train_y.copy()
    few[:, 0] = 0
    few[:2, 0] = 1
    with pytest.raises(ProtocolError, match="class 0 has 2 positive training rows; 3-fold"):
        voc07_svm(train_x, few, test_x, test_y, costs=(0.1, 1.0))


def test_reproducible_bit_for_bit():
    rng = np.random.default_rng(5)
    train_x, train_y = multi_label_set(rng, 90)
    test_x, test_y = multi_label_set(rng, 60)
    runs = [voc07_svm(train_x, train_y, test_x, test_y, costs=(0.1, 1.0), bootstrap=FAST)
            for _ in range(2)]
    assert runs[0].summary() == runs[1].summary()
    assert np.array_equal(runs[0].score.decisions, runs[1].score.decisions)
    shots = [low_shot_svm(train_x, train_y, test_x, test_y, shots=(2,), samples=2,
                          costs=(1.0,), bootstrap=FAST).summary() for _ in range(2)]
    assert shots[0] == shots[1]


def test_paired_difference_interval():
    rng = np.random.default_rng(6)
    train_x, train_y = single_label_set(rng, 200, signal=1.0)
    test_x, test_y = single_label_set(rng, 300, signal=1.0)
    weak = knn_top1(train_x, train_y, test_x, test_y, ks=(10,), bootstrap=FAST).scores[0]
    same = score_difference(weak, weak, FAST)
    assert same.value == same.low == same.high == 0
    strong_train, strong_test = train_x.copy(), test_x.copy()
    strong_train[np.arange(200), train_y] += 3
    strong_test[np.arange(300), test_y] += 3
    strong = knn_top1(strong_train, train_y, strong_test, test_y, ks=(10,),
                      bootstrap=FAST).scores[0]
    better = score_difference(strong, weak, FAST)
    assert better.value == pytest.approx(strong.value - weak.value) and better.low > 0
    assert better.high - better.low < (strong.interval.high - strong.interval.low
                                       + weak.interval.high - weak.interval.low)
    with pytest.raises(ProtocolError, match="not on the same test rows"):
        score_difference(strong, knn_top1(train_x, train_y, test_x[:50], test_y[:50],
                                          ks=(10,), bootstrap=FAST).scores[0])


def test_report_writes_json_markdown_and_png(tmp_path):
    rng = np.random.default_rng(7)
    results = {}
    for net, signal in (("random", 0.3), ("trained", 3.0)):
        results[net] = {}
        for layer, scale in (("conv1", 0.5), ("fc6", 1.0)):
            train_x, train_y = single_label_set(rng, 120, signal=signal * scale)
            test_x, test_y = single_label_set(rng, 80, signal=signal * scale)
            results[net][layer] = dict(
                knn=knn_top1(train_x, train_y, test_x, test_y, ks=(10,), bootstrap=FAST),
                probe=linear_probe(train_x, train_y, test_x, test_y, costs=(1.0,),
                                   bootstrap=FAST))
    # the same test labels for both nets (single_label_set's labels depend only on rows)
    paths = write_report(results, tmp_path / "out", baseline="random", bootstrap=FAST)
    document = json.loads(paths["json"].read_text())
    knn_fc6 = results["trained"]["fc6"]["knn"].scores[0].interval
    assert document["results"]["trained"]["fc6"]["knn"]["top1"]["10"]["value"] == knn_fc6.value
    assert "knn k=10 top-1" in document["differences"]
    markdown = paths["markdown"].read_text()
    assert "| net | conv1 | fc6 |" in markdown
    assert (f"{100 * knn_fc6.value:.1f} [{100 * knn_fc6.low:.1f}, {100 * knn_fc6.high:.1f}]"
            in markdown)
    assert "## knn k=10 top-1 minus random (paired)" in markdown
    assert paths["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "report.json", "report.md", "report.png"]  # no temporary file left
    with pytest.raises(ValueError, match="baseline net 'other'"):
        write_report(results, tmp_path / "bad", baseline="other")


def test_unconverged_fits_warn_once_with_their_count():
    rng = np.random.default_rng(8)
    features, labels = rng.normal(size=(60, 12)), (rng.random((60, 3)) < 0.4).astype(np.int8)
    with pytest.warns(ConvergenceWarning) as caught:  # random labels at a huge cost
        voc07_svm(features, labels, features, labels, costs=(1000.0,), bootstrap=FAST)
    assert [str(warning.message) for warning in caught] == [
        "voc07_svm: 3 fit(s) stopped at the iteration limit before converging"]
