"""Frozen-feature evaluation end to end: the labelled sets, tools/eval_frozen.py on real Caffe."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ctxpred.detection.voc import Annotation, VocObject, write_annotation
from ctxpred.evaluation.datasets import DatasetError, read_labelled_set
from ctxpred.evaluation.labelled_sets import LabelledSetsRecipe, make_labelled_sets

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "eval_frozen.py"
LAYERS = "conv1,conv5"


def run_eval(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """The two offline labelled sets, small: 35 multi-label and 21 single-label images per
    split (3 per class), in a temporary folder."""
    out = tmp_path_factory.mktemp("labelled") / "labelled"
    _, built = make_labelled_sets(LabelledSetsRecipe(out, multi_train=35, multi_test=35,
                                                     single_train=21, single_test=21))
    assert built
    return out


@pytest.fixture(scope="module")
def svm_run(sets, random_deploy_weights, tmp_path_factory):
    """(cache folder, report folder, result) of the svm protocol on the multi-label set."""
    folder = tmp_path_factory.mktemp("svm")
    result = run_eval("--dataset", sets / "multi", "--weights", random_deploy_weights(0),
                      "--protocols", "svm", "--layers", LAYERS, "--svm-costs", "0.1,1",
                      "--resamples", "50", "--out", folder / "report", "--cache", folder / "cache")
    return folder / "cache", folder / "report", result


def test_the_sets_share_no_image_and_have_every_class(sets):
    multi, single = read_labelled_set(sets / "multi"), read_labelled_set(sets / "single")
    assert multi.multilabel and not single.multilabel
    assert len(multi.train_paths) == len(multi.test_paths) == 35
    for labels in (multi.train_labels, multi.test_labels):
        assert (labels == 1).any(axis=0).all()
    assert np.bincount(single.train_labels).tolist() == [3] * 7  # classes in equal numbers
    assert not set(single.train_paths) & set(single.test_paths)
    manifest = json.loads((sets / "manifest.json").read_text())
    assert manifest["counts"]["single"] == {"trainval": 21, "test": 21}


def test_difficult_only_is_minus_one_and_list_labels_sort_numerically(tmp_path, photo_folder):
    root = tmp_path / "voc"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True)
    (root / "classes.txt").write_text("cat\nrocket\n")
    objects = {"a": [("cat", False), ("rocket", True)], "b": [("rocket", False)],
               "c": [("cat", False)], "d": [("rocket", False), ("cat", True)]}
    for image_id, items in objects.items():
        shutil.copy(photo_folder / "chelsea.jpg", root / "JPEGImages" / f"{image_id}.jpg")
        write_annotation(Annotation(f"{image_id}.jpg", 450, 300, tuple(
            VocObject(name, (1, 1, 50, 50), difficult) for name, difficult in items)),
            root / "Annotations" / f"{image_id}.xml")
    (root / "ImageSets/Main/trainval.txt").write_text("a\nb\n")
    (root / "ImageSets/Main/test.txt").write_text("c\nd\n")
    labelled = read_labelled_set(root)
    assert labelled.train_labels.tolist() == [[1, -1], [0, 1]]
    assert labelled.test_labels.tolist() == [[1, 0], [-1, 1]]
    for name, labels in (("train.txt", "10 2 10"), ("test.txt", "2 10")):
        (tmp_path / name).write_text("".join(f"{photo_folder / 'coffee.jpg'} {label}\n"
                                             for label in labels.split()))
    single = read_labelled_set((tmp_path / "train.txt", tmp_path / "test.txt"))
    assert single.classes == ("2", "10") and single.train_labels.tolist() == [1, 0, 1]
    assert single.label_matrix("test").tolist() == [[1, 0], [0, 1]]


def test_the_tool_writes_json_markdown_and_png(svm_run):
    _, report, result = svm_run
    assert result.returncode == 0, result.stderr
    document = json.loads((report / "report.json").read_text())
    scores = document["results"]["random0"]
    assert set(scores) == {"conv1", "conv5"}
    for layer in scores.values():
        value = layer["svm"]["mAP"]
        assert 0 < value["low"] <= value["high"] <= 1 and 0 < value["value"] <= 1
        assert set(layer["svm"]["classes"]) == {"mammal", "bird", "fish", "insect", "fruit",
                                                 "vegetable", "flower"}
    assert "| random0 |" in (report / "report.md").read_text()
    assert (report / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "voc07_svm mAP" in result.stdout


def test_a_second_protocol_reads_the_cached_features(svm_run, sets, random_deploy_weights,
                                                     tmp_path):
    cache, _, first = svm_run
    assert first.returncode == 0, first.stderr
    before = {path.name: path.stat().st_mtime_ns for path in cache.iterdir()}
    assert sorted(name.split("-")[0] for name in before) == ["conv1", "conv5"]
    result = run_eval("--dataset", sets / "multi", "--weights", random_deploy_weights(0),
                      "--protocols", "lowshot", "--shots", "1,2", "--samples", "2",
                      "--svm-costs", "1", "--layers", LAYERS, "--resamples", "50",
                      "--out", tmp_path, "--cache", cache)
    assert result.returncode == 0, result.stderr
    assert {path.name: path.stat().st_mtime_ns for path in cache.iterdir()} == before
    points = json.loads((tmp_path / "report.json").read_text())["results"]["random0"]["conv5"]
    assert [point["k"] for point in points["lowshot"]["points"]] == [1, 2]


def test_single_label_protocols_and_two_nets_with_their_difference(sets, random_deploy_weights,
                                                                   tmp_path):
    result = run_eval("--dataset", sets / "single", "--weights", random_deploy_weights(0),
                      random_deploy_weights(1), "--names", "first", "second", "--layers", "conv5",
                      "--knn-ks", "1,5", "--probe-costs", "1", "--resamples", "50",
                      "--out", tmp_path, "--cache", tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    document = json.loads((tmp_path / "report.json").read_text())
    conv5 = document["results"]["second"]["conv5"]
    assert set(conv5["knn"]["top1"]) == {"1", "5"} and 0 <= conv5["linear"]["top1"]["value"] <= 1
    assert set(document["differences"]["linear_probe top-1"]) == {"second"}
    assert "minus first (paired)" in (tmp_path / "report.md").read_text()


def test_the_same_run_is_reproducible_bit_for_bit(svm_run, sets, random_deploy_weights, tmp_path):
    cache, report, _ = svm_run
    result = run_eval("--dataset", sets / "multi", "--weights", random_deploy_weights(0),
                      "--protocols", "svm", "--layers", LAYERS, "--svm-costs", "0.1,1",
                      "--resamples", "50", "--out", tmp_path, "--cache", cache)
    assert result.returncode == 0, result.stderr
    for name in ("report.json", "report.md"):
        assert (tmp_path / name).read_bytes() == (report / name).read_bytes()


def broken_copy(sets, tmp_path):
    """A copy of the multi-label set to break."""
    shutil.copytree(sets / "multi", tmp_path / "multi")
    return tmp_path / "multi"


@pytest.mark.parametrize("problem, expected", [
    ("missing image", "ids have no image file (first: "),
    ("class without positive", "class 'zebra' has no positive image"),
    ("low-shot k above positives", "low-shot k=1000 needs 1000 positive training rows of class"),
    ("unknown layer", "has no layer 'conv9'"),
])
def test_bad_input_is_one_line_naming_it_and_writes_no_report(
        problem, expected, sets, random_deploy_weights, tmp_path):
    dataset, extra = sets / "multi", ["--protocols", "svm", "--layers", LAYERS]
    if problem == "missing image":
        dataset = broken_copy(sets, tmp_path)
        (dataset / "JPEGImages" / "test_00003.jpg").unlink()
        expected += str(dataset / "JPEGImages" / "test_00003.jpg")
    elif problem == "class without positive":
        dataset = broken_copy(sets, tmp_path)
        with open(dataset / "classes.txt", "a") as classes:
            classes.write("zebra\n")
    elif problem == "low-shot k above positives":
        extra = ["--protocols", "lowshot", "--shots", "1,1000", "--layers", LAYERS]
    else:
        extra = ["--protocols", "svm", "--layers", "conv1,conv9"]
    result = run_eval("--dataset", dataset, "--weights", random_deploy_weights(0), *extra,
                      "--out", tmp_path / "report", "--cache", tmp_path / "cache")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert expected in result.stderr
    assert not (tmp_path / "report").exists()
    assert not list(tmp_path.rglob("*.part"))


def test_a_knn_protocol_on_a_multi_label_set_is_refused(sets, random_deploy_weights, tmp_path):
    result = run_eval("--dataset", sets / "multi", "--weights", random_deploy_weights(0),
                      "--protocols", "knn", "--out", tmp_path / "report")
    assert result.returncode == 2
    assert "protocol 'knn' needs a single-label set; multi is multi-label" in result.stderr


def test_a_list_file_naming_a_missing_image_names_its_line(tmp_path, photo_folder):
    (tmp_path / "train.txt").write_text(f"{photo_folder / 'coffee.jpg'} a\nnowhere.jpg b\n")
    (tmp_path / "test.txt").write_text(f"{photo_folder / 'coffee.jpg'} a\n")
    with pytest.raises(DatasetError, match=r"train.txt line 2: image .*nowhere.jpg does not exist"):
        read_labelled_set(tmp_path)


def test_labelled_sets_command_line():
    script = REPO / "data" / "make_labelled_sets.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                            text=True)
    assert result.returncode == 0 and "--single-train" in result.stdout
    result = subprocess.run([sys.executable, str(script), "--single-test", "3"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "single-label images per split" in result.stderr
