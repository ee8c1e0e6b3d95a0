"""Relative-position evaluation: statistics, pair sampling, the scoring net and the CLI.

The weights are the real colour-dropping train net at random init, saved once
before and once after one TRAIN forward pass (which fills BatchNorm's
statistics; Caffe's BatchNorm accumulates them in every TRAIN forward).
"""
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from ctxpred.data.batching import SkippedImageWarning
from ctxpred.evaluation.pretext import (INPUT_TOPS, POSITION_NAMES, confusion_matrix, eval_config,
                                        evaluate_pretext, format_confusion, load_scoring_net,
                                        plot_confusion, relative_position_scores, report_lines,
                                        sample_eval_pairs, scoring_net)
from ctxpred.evaluation.statistics import accuracy_with_interval
from ctxpred.weights.files import read_weights
from ctxpred.models.context import NetOptions, data_layer_params, train_net

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "eval_pretext.py"
PHOTOS = ("astronaut", "coffee", "chelsea")
PAIRS = 4


@pytest.fixture(scope="module")
def eval_photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval_photos")
    for name in PHOTOS:
        Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{name}.jpg", quality=95)
    return folder


@pytest.fixture(scope="module")
def weights(colour_dropping_snapshot):
    """{"untrained": path, "trained": path} of the colour-dropping net's caffemodels."""
    return {name: str(colour_dropping_snapshot[name]) for name in ("untrained", "trained")}


@pytest.fixture(scope="module")
def scoring(weights):
    return load_scoring_net("color_dropping", weights["trained"])


def test_wilson_interval_known_values():
    accuracy, low, high = accuracy_with_interval(50, 100)
    assert accuracy == 0.5
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    # Edge cases stay inside [0, 1]: 0/10 -> (0, 0.2775), 10/10 -> (0.7225, 1).
    assert accuracy_with_interval(0, 10)[1:] == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert accuracy_with_interval(10, 10)[1:] == pytest.approx((0.7225, 1.0), abs=1e-4)
    _, low99, high99 = accuracy_with_interval(50, 100, confidence=0.99)
    assert low99 < low and high99 > high
    for bad in ((1, 0), (5, 3), (-1, 3)):
        with pytest.raises(ValueError):
            accuracy_with_interval(*bad)


def test_confusion_matrix_rows_are_true_labels():
    labels = np.array([0, 0, 1, 7, 7, 7])
    predictions = np.array([0, 3, 1, 7, 2, 7])
    matrix = confusion_matrix(labels, predictions)
    assert matrix.shape == (8, 8) and matrix.sum() == len(labels)
    assert np.trace(matrix) == 4
    assert matrix[0, 3] == 1 and matrix[7, 2] == 1 and matrix[7, 7] == 2
    assert np.array_equal(matrix.sum(axis=1), np.bincount(labels, minlength=8))
    assert np.array_equal(matrix.sum(axis=0), np.bincount(predictions, minlength=8))
    with pytest.raises(ValueError):
        confusion_matrix(np.array([8]), np.array([0]))
    table = format_confusion(matrix)
    assert all(name in table for name in POSITION_NAMES)
    assert "66.7%" in table  # row "down-right": 2 of 3 right


def test_plot_confusion_writes_png(tmp_path):
    path = tmp_path / "confusion.png"
    plot_confusion(np.arange(64).reshape(8, 8), str(path), "test")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_scoring_net_is_train_net_with_input_layer(caffe):
    for options in (NetOptions(), NetOptions(factorized_head=True)):
        proto = scoring_net("color_dropping", options)
        train = train_net("color_dropping", data_layer_params("color_dropping", "x"), options)
        first = proto.layer[0]
        assert first.type == "Input" and tuple(first.top) == INPUT_TOPS
        assert [list(shape.dim) for shape in first.input_param.shape] == [
            [1, 3, 96, 96], [1], [1], [1]]
        assert list(proto.layer[1:]) == list(train.layer[1:])


@pytest.mark.filterwarnings("ignore::ctxpred.data.batching.SkippedImageWarning")
def test_eval_pairs_are_deterministic_and_skip_unusable_images(eval_photos, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in eval_photos.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    # Aspect ratio 100: too narrow for two patches at any random size.
    Image.fromarray(np.zeros((20, 2000, 3), np.uint8)).save(folder / "strip.png")
    config = eval_config("color_dropping")

    pairs = sample_eval_pairs(str(folder), None, PAIRS, 7, config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(pairs)
    assert len(pairs) == 5 and len(batches) == 3
    assert sorted(Path(name).name for name in pairs.skipped) == ["broken.jpg", "strip.png"]
    assert sum(issubclass(w.category, SkippedImageWarning) for w in caught) == 2
    for batch in batches:
        assert batch.patches.shape == (2 * PAIRS, 3, 96, 96)
        assert batch.patches.dtype == np.float32
        assert np.array_equal(batch.select1, 2 * np.arange(PAIRS))
        assert np.array_equal(batch.select2, 2 * np.arange(PAIRS) + 1)
        assert set(batch.labels) <= set(range(8))

    again = list(sample_eval_pairs(str(folder), None, PAIRS, 7, config))
    for first, second in zip(batches, again):
        assert first.image_name == second.image_name
        assert np.array_equal(first.patches, second.patches)
        assert np.array_equal(first.labels, second.labels)
    other = list(sample_eval_pairs(str(folder), None, PAIRS, 8, config))
    assert not all(np.array_equal(a.patches, b.patches) for a, b in zip(batches, other))
    assert len(sample_eval_pairs(str(folder), 2, PAIRS, 7, config)) == 2


def test_eval_pairs_use_the_nets_colour_handling(eval_photos):
    dropped = next(iter(sample_eval_pairs(str(eval_photos), 1, PAIRS, 0,
                                          eval_config("color_dropping"))))
    # Two channels of every patch are noise in [-0.5, 0.5).
    assert np.all((np.abs(dropped.patches) < 0.5).all(axis=(2, 3)).sum(axis=1) >= 2)
    projected = next(iter(sample_eval_pairs(str(eval_photos), 1, PAIRS, 0,
                                            eval_config("projection"))))
    assert np.all(np.abs(projected.patches).max(axis=(2, 3)) > 1)


def test_scores_cover_every_pair_and_are_deterministic(scoring, eval_photos):
    config = eval_config("color_dropping")
    results = [relative_position_scores(scoring, sample_eval_pairs(str(eval_photos), None,
                                                                   PAIRS, 3, config))
               for _ in range(2)]
    first, second = results
    assert first.total == len(PHOTOS) * PAIRS
    assert 0 <= first.correct <= first.total
    assert set(first.predictions) <= set(range(8))
    assert np.isfinite(first.loss) and first.loss > 0
    assert np.array_equal(first.predictions, second.predictions)
    assert np.array_equal(first.labels, second.labels)
    assert np.array_equal(np.unique(first.image_indices), np.arange(len(PHOTOS)))


def test_weights_without_batchnorm_statistics_are_rejected(caffe, weights):
    with pytest.raises(ValueError, match=r"bn3.*scale factor 0"):
        load_scoring_net("color_dropping", weights["untrained"])


def test_hdf5_and_binary_weights_read_alike(caffe, weights, tmp_path):
    binary = read_weights(weights["trained"])
    net = load_scoring_net("color_dropping", weights["trained"])
    net.save_hdf5(str(tmp_path / "model.h5"))
    hdf5 = read_weights(str(tmp_path / "model.h5"))
    assert sorted(binary) == sorted(hdf5) == sorted(net.params)
    for name in ("conv1", "bn3", "fc9"):
        assert all(np.array_equal(a, b) for a, b in zip(binary[name], hdf5[name]))
    (tmp_path / "junk.caffemodel").write_bytes(b"\xff" * 100)
    with pytest.raises(ValueError, match="junk.caffemodel"):
        read_weights(str(tmp_path / "junk.caffemodel"))


def test_weights_of_the_other_head_layout_are_rejected(caffe, weights):
    with pytest.raises(ValueError, match=r"fc7_first.*without weights.*pair-head layout"):
        load_scoring_net("color_dropping", weights["trained"], NetOptions(factorized_head=True))


def test_evaluate_pretext_writes_the_report_of_its_scores(weights, eval_photos, tmp_path):
    report, json_path, png_path = evaluate_pretext(weights["trained"], "color_dropping",
                                                   str(eval_photos), 2, PAIRS, 3, tmp_path)
    assert json_path == tmp_path / "model_iter_1_pretext.json"
    assert json.loads(json_path.read_text()) == report
    assert png_path.read_bytes().startswith(b"\x89PNG")
    # The same pairs scored by hand: the report holds their numbers.
    net = load_scoring_net("color_dropping", weights["trained"])
    result = relative_position_scores(net, sample_eval_pairs(
        str(eval_photos), 2, PAIRS, 3, eval_config("color_dropping")))
    assert (report["pairs"], report["correct"]) == (result.total, result.correct) == (
        2 * PAIRS, result.correct)
    assert report["confusion_matrix"]["counts"] == confusion_matrix(
        result.labels, result.predictions).tolist()
    assert report["accuracy"] == accuracy_with_interval(result.correct, result.total)[0]
    assert report["images_evaluated"] == 2 and not report["factorized_head"]
    lines = report_lines(report)
    assert lines[0].startswith(f"relative-position accuracy: {report['accuracy']:.2%}")
    assert lines[-1] == format_confusion(np.array(report["confusion_matrix"]["counts"]))


def run_tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_cli_writes_report_and_plot(weights, eval_photos, tmp_path):
    result = run_tool("--weights", weights["trained"], "--images", str(eval_photos),
                      "--pairs-per-image", str(PAIRS), "--seed", "3", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "Wilson" in result.stdout and "down-right" in result.stdout
    report = json.loads((tmp_path / "model_iter_1_pretext.json").read_text())
    assert report["pairs"] == len(PHOTOS) * PAIRS and report["images_evaluated"] == len(PHOTOS)
    assert 0 <= report["interval"]["low"] <= report["accuracy"] <= report["interval"]["high"] <= 1
    assert np.sum(report["confusion_matrix"]["counts"]) == report["pairs"]
    assert (tmp_path / "model_iter_1_pretext_confusion.png").read_bytes().startswith(b"\x89PNG")


def test_cli_help_explains_every_flag():
    result = run_tool("--help")
    assert result.returncode == 0
    for flag in ("--weights", "--net", "--images", "--images-count",
                 "--pairs-per-image", "--seed", "--gpu", "--out"):
        assert flag in result.stdout


def test_cli_names_a_missing_weights_file(tmp_path):
    missing = tmp_path / "nothing.caffemodel"
    result = run_tool("--weights", str(missing))
    assert result.returncode != 0
    assert str(missing) in result.stderr
