"""The neighbour-quality proxy: keys as described, ranks, chance level, bootstrap, the run."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctxpred.data.images import open_source
from ctxpred.evaluation.retrieval_proxy import (Augmentation, ProxySettings, candidate_counts,
                                                compare_nets, paired_difference, positive_ranks,
                                                report_lines, retrieval_pairs, retrieval_score)

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "neighbour_proxy.py"
DEPLOY = str(REPO / "prototxt" / "color_dropping" / "deploy.prototxt")


@pytest.fixture
def noise_folder(tmp_path, rng):
    """Three lossless noise images of different sizes, and their pixels by path."""
    folder = tmp_path / "noise"
    folder.mkdir()
    pixels = {}
    for number, (height, width) in enumerate([(200, 260), (180, 180), (240, 210)]):
        image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        path = folder / f"noise{number}.png"
        Image.fromarray(image).save(path)
        pixels[str(path)] = image
    return folder, pixels


def test_keys_are_the_query_windows_moved_by_their_shift(noise_folder):
    folder, pixels = noise_folder
    pairs = retrieval_pairs(open_source(str(folder)), 5, Augmentation(9, 1.0, 0.0), seed=3)
    assert len(pairs.queries) == 15 and not pairs.skipped
    assert np.abs(pairs.shifts).max() <= 9 and np.abs(pairs.shifts).max() > 0
    for row in range(15):
        image = pixels[pairs.names[pairs.image_ids[row]]]
        (y, x), (dy, dx) = pairs.corners[row], pairs.shifts[row]
        np.testing.assert_array_equal(pairs.queries[row], image[y:y + 96, x:x + 96])
        np.testing.assert_array_equal(pairs.keys[row],
                                      image[y + dy:y + dy + 96, x + dx:x + dx + 96])
    again = retrieval_pairs(open_source(str(folder)), 5, Augmentation(9, 1.0, 0.0), seed=3)
    np.testing.assert_array_equal(again.keys, pairs.keys)


def test_colour_gains_and_scales_stay_in_their_ranges(noise_folder):
    folder, _ = noise_folder
    gains_only = retrieval_pairs(open_source(str(folder)), 4, Augmentation(0, 1.0, 0.3))
    expected = np.clip(np.rint(gains_only.queries * gains_only.gains[:, None, None, :]
                               .astype(np.float32)), 0, 255)
    np.testing.assert_array_equal(gains_only.keys, expected)
    assert (np.abs(gains_only.gains - 1) <= 0.3).all() and gains_only.gains.std() > 0.05
    scaled = retrieval_pairs(open_source(str(folder)), 20, Augmentation(20, 1.5, 0.1))
    assert scaled.keys.shape == scaled.queries.shape
    assert (scaled.scales >= 1 / 1.5).all() and (scaled.scales <= 1.5).all()
    assert scaled.scales.min() < 0.8 and scaled.scales.max() > 1.25


def test_images_too_small_for_the_margin_are_skipped(tmp_path, rng):
    for name, side in (("big.png", 200), ("small.png", 100), ("other.png", 150)):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
            tmp_path / name)
    pairs = retrieval_pairs(open_source(str(tmp_path)), 2, Augmentation(10, 1.2, 0))
    assert list(pairs.skipped) == [str(tmp_path / "small.png")]
    assert "margin" in pairs.skipped[str(tmp_path / "small.png")]
    with pytest.raises(ValueError, match="at least 2"):
        retrieval_pairs(open_source(str(tmp_path / "big.png")), 2)


def test_ranks_exclude_other_keys_of_the_query_image_and_ties_count_against():
    # Query 0 (image 0): own key cos 0.8; key 1 (image 0, excluded) is identical to
    # the query; of image 1's keys one is closer than the own key, one farther.
    angle = np.arccos([0.8, 0.9, 0.3])
    queries = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    keys = np.array([[np.cos(angle[0]), np.sin(angle[0])], [1.0, 0.0],
                     [np.cos(angle[1]), np.sin(angle[1])],
                     [np.cos(angle[2]), np.sin(angle[2])]])
    image_ids = np.array([0, 0, 1, 1])
    assert positive_ranks(queries, keys, image_ids)[0] == 1
    assert candidate_counts(image_ids).tolist() == [3, 3, 3, 3]
    constant = np.ones((4, 3))
    assert (positive_ranks(constant, constant, image_ids) == 2).all()  # every tie counts
    np.testing.assert_array_equal(positive_ranks(queries, keys, image_ids, block_rows=1),
                                  positive_ranks(queries, keys, image_ids))


def test_invariant_features_score_one_and_random_features_chance(rng):
    image_ids = np.repeat(np.arange(30), 20)  # 600 queries, 581 candidates each
    content = rng.normal(size=(600, 64))
    invariant = retrieval_score(positive_ranks(content + 0.05 * rng.normal(size=content.shape),
                                               content + 0.05 * rng.normal(size=content.shape),
                                               image_ids), image_ids)
    assert invariant.hits == 600 and invariant.accuracy == 1.0 and invariant.median_rank == 0
    noise = retrieval_score(positive_ranks(rng.normal(size=(600, 64)),
                                           rng.normal(size=(600, 64)), image_ids), image_ids)
    assert noise.chance == pytest.approx(1 / 581)
    # Binomial(600, 1/581): about 1 hit expected; 7 or more has probability < 1e-4.
    assert noise.hits <= 6 and noise.low == 0.0 and noise.high < 0.02
    assert 200 < noise.median_rank < 380  # the own key lands mid-list


def test_paired_difference_and_its_bootstrap_interval(rng):
    image_ids = np.repeat(np.arange(10), 8)
    hits = rng.random(80) < 0.5
    assert paired_difference(hits, hits, image_ids, seed=1) == (0.0, 0.0, 0.0)
    assert paired_difference(np.ones(80), np.zeros(80), image_ids, seed=1) == (1.0, 1.0, 1.0)
    # A wins on images 0-4 only: the difference is 0.5 and varies with which images are drawn.
    better = (image_ids < 5).astype(bool)
    difference, low, high = paired_difference(better, np.zeros(80, bool), image_ids, seed=1)
    assert difference == 0.5 and 0.1 < low < 0.5 < high < 0.9
    # Whole images are drawn: A winning on half the queries of every image is certain.
    halves = np.tile([True, False], 40)
    assert paired_difference(halves, np.zeros(80, bool), image_ids, seed=1) == (0.5, 0.5, 0.5)
    assert paired_difference(better, np.zeros(80, bool), image_ids, seed=1) == (
        difference, low, high)


def test_the_random_net_finds_unaugmented_copies_and_the_run_compares_nets(
        caffe, photo_folder, tmp_path):
    from ctxpred.features.extractor import FeatureExtractor
    from ctxpred.evaluation.retrieval_proxy import extractor_ranks

    net = caffe.Net(DEPLOY, caffe.TEST)  # the fillers' random weights
    weights = str(tmp_path / "random.caffemodel")
    net.save(weights)
    extractor = FeatureExtractor(DEPLOY, weights, batch=16)
    identical = retrieval_pairs(open_source(str(photo_folder)), 6, Augmentation(0, 1.0, 0.0))
    assert (extractor_ranks(extractor, identical) == 0).all()

    result = compare_nets(ProxySettings(images=str(photo_folder), weights=(weights, weights),
                                        labels=("a", "b"), deploy=DEPLOY, per_image=6,
                                        resamples=50))
    first, second = result["nets"]
    assert result["queries"] == 24 and first["queries"] == 24
    assert first["hits"] == second["hits"] and 0 <= first["accuracy"] <= 1
    assert first["chance"] == pytest.approx(1 / 19)
    assert second["minus_first"] == {"difference": 0.0, "low": 0.0, "high": 0.0}
    lines = report_lines(result)
    assert lines[0].startswith(f"24 queries from 4 images of {photo_folder}")
    assert lines[-1] == "b minus a: +0.0 points, 95% bootstrap interval over images [+0.0, +0.0]"

    out = tmp_path / "proxy.json"
    done = subprocess.run([sys.executable, str(TOOL), "--images", str(photo_folder),
                           "--per-image", "6", "--weights", weights, weights, "--labels", "a",
                           "b", "--resamples", "50", "--json", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-len(lines):] == lines
    assert json.loads(out.read_text())["nets"] == json.loads(json.dumps(result["nets"]))


def test_the_tool_rejects_bad_arguments(tmp_path):
    def refused(*flags):
        done = subprocess.run([sys.executable, str(TOOL), "--images", str(tmp_path), *flags],
                              capture_output=True, text=True)
        assert done.returncode == 2
        return done.stderr

    assert "does not exist" in refused("--weights", str(tmp_path / "none.caffemodel"))
    weights = tmp_path / "w.caffemodel"
    weights.write_bytes(b"")
    assert "one label per --weights" in refused("--weights", str(weights), "--labels", "a", "b")
