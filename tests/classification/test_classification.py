"""VOC07 classification fine-tuning on stock Caffe: labels, augmentation, loss, AP, the route."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ctxpred.classification.data import (IGNORE_LABEL, MEAN_BGR, BatchStream, ClassificationError,
                                    augment, average_precision, image_labels,
                                    mean_average_precision, read_split)
from ctxpred.models.classification import deploy_net, train_net
from ctxpred.detection.voc import Annotation, VocObject

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "finetune_classification.py"


def test_labels_present_difficult_only_and_absent():
    objects = (VocObject("cat", (1, 1, 10, 10)), VocObject("dog", (1, 1, 10, 10), difficult=True),
               VocObject("bird", (1, 1, 5, 5), difficult=True), VocObject("bird", (2, 2, 9, 9)))
    labels = image_labels(Annotation("a.jpg", 20, 20, objects), ("cat", "dog", "bird", "cow"))
    assert labels.tolist() == [1, IGNORE_LABEL, 1, 0]
    with pytest.raises(ClassificationError, match="'cat' is not in the class list"):
        image_labels(Annotation("a.jpg", 20, 20, objects[:1]), ("dog",))


def write_net(tmp_path, proto, name):
    path = tmp_path / name
    path.write_text(str(proto))
    return str(path)


def test_sigmoid_loss_with_ignored_labels_against_hand_values(caffe, tmp_path):
    """The train net's own loss layer (Caffe's SigmoidCrossEntropyLoss, ignore 255,
    normalised by the batch size) on logits and labels worked out by hand."""
    loss_layer = next(layer for layer in train_net("caffenet", "all").layer
                      if layer.name == "loss")
    n = caffe.NetSpec()
    n.fc8_cls = caffe.layers.Input(shape=dict(dim=[2, 3]))
    n.label = caffe.layers.Input(shape=dict(dim=[2, 3]))
    proto = n.to_proto()
    proto.layer.add().CopyFrom(loss_layer)
    proto.force_backward = True
    net = caffe.Net(write_net(tmp_path, proto, "loss.prototxt"), caffe.TRAIN)
    net.blobs["fc8_cls"].data[...] = [[0, 2, -1], [3, -2, 0.5]]
    net.blobs["label"].data[...] = [[1, 0, 255], [0, 255, 1]]
    loss = float(net.forward()["loss"])
    # valid terms max(f, 0) - f t + log(1 + exp(-|f|)): 0.6931472 + 2.1269280 + 3.0485874
    # + 0.4740770 = 6.3427396, over the batch of 2
    assert loss == pytest.approx(3.1713698, rel=1e-6)
    net.backward()
    # (sigmoid(f) - t) / 2 where valid, 0 where ignored
    np.testing.assert_allclose(net.blobs["fc8_cls"].diff,
                               [[-0.25, 0.4403985, 0], [0.4762871, 0, -0.1887703]], atol=1e-6)


def test_augment_scales_crops_and_mirrors(rng):
    crop = 40
    image = rng.integers(0, 256, (crop, crop, 3), dtype=np.uint8)
    out = augment(image, np.random.default_rng(0), crop, 1.0, 1.0, mirror=False)
    expected = image[:, :, ::-1].astype(np.float32) - np.float32(MEAN_BGR)
    np.testing.assert_allclose(out, expected.transpose(2, 0, 1), atol=1e-4)
    flips = [np.allclose(augment(image, np.random.default_rng(seed), crop, 1.0, 1.0),
                         expected.transpose(2, 0, 1)[:, :, ::-1], atol=1e-4)
             for seed in range(40)]
    assert 8 < sum(flips) < 32  # mirrored about half of the time
    constant = np.full((80, 120, 3), 200, np.uint8)  # shorter side 80
    small = augment(constant, np.random.default_rng(1), crop, 0.5, 0.5, mirror=False)
    filled = np.isclose(small[0], 200 - MEAN_BGR[0])
    assert filled.sum() == 20 * 30 and np.all(small[:, ~filled] == 0)  # 20 x 30 inside zeros
    large = augment(constant, np.random.default_rng(2), crop, 2.0, 2.0, mirror=False)
    assert np.allclose(large[0], 200 - MEAN_BGR[0])  # 80 x 120 covers the crop


def test_average_precision_hand_values_ties_and_ignored():
    labels = np.array([1, 0, 1, 0, IGNORE_LABEL])
    # ranking 0.9 (+), 0.8 (-), 0.7 (+), 0.6 (-); the ignored 0.95 is left out
    assert average_precision(labels, [0.9, 0.8, 0.7, 0.6, 0.95]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # ties count against the positives: the negative ranks first
    assert average_precision([1, 1, 0], [0.5, 0.5, 0.5]) == pytest.approx(2 / 3)
    assert np.isnan(average_precision([0, IGNORE_LABEL], [0.1, 0.2]))
    value, aps = mean_average_precision(np.array([[1, 0], [0, 0]]), np.array([[1.0, 0], [0, 1]]))
    assert value == 1.0 and np.isnan(aps[1])


def test_data_layer_in_caffe_gives_augmented_batches_and_labels(caffe, tiny_detection_set,
                                                                tmp_path):
    proto = train_net("caffenet", "fc8", str(tiny_detection_set), classes=2, batch_size=4,
                      seed=5)
    net = caffe.Net(write_net(tmp_path, proto, "train.prototxt"), caffe.TRAIN)
    images = read_split(tiny_detection_set, "trainval")
    assert images.classes == ("cat", "rocket")
    stream = BatchStream(images, 4, 227, seed=5)
    for _ in range(3):  # two epochs of 8 images and the start of a third
        net.forward()
        data, labels = stream.next()
        np.testing.assert_array_equal(net.blobs["data"].data, data)
        np.testing.assert_array_equal(net.blobs["label"].data, labels)
    assert net.blobs["data"].data.shape == (4, 3, 227, 227)
    rows = {tuple(row) for row in images.labels.astype(np.float32)}
    assert all(tuple(row) in rows for row in net.blobs["label"].data)
    assert float(net.blobs["loss"].data) > 0
    # fc8 mode: only fc8_cls learns
    learning = {layer.name: [param.lr_mult for param in layer.param] for layer in proto.layer
                if layer.param}
    assert learning.pop("fc8_cls") == [1, 2] and all(v == [0, 0] for v in learning.values())
    fc = {layer.name: layer.param[0].lr_mult for layer in train_net("caffenet", "fc").layer
          if layer.param}
    assert [name for name, mult in fc.items() if mult] == ["fc6", "fc7", "fc8_cls"]
    assert [layer.name for layer in deploy_net("vgg16", 2).layer][-3:] == ["relu7", "drop7",
                                                                           "fc8_cls"]


def test_route_end_to_end_resumes_and_scores(tiny_detection_set, tmp_path):
    """Random init (magic init of every layer), 4 steps, a resumed 2 more, 1- and 3-crop mAP."""
    out = tmp_path / "run"
    common = [sys.executable, str(TOOL), "--data", str(tiny_detection_set), "--weights", "none",
              "--mode", "fc", "--batch-size", "4", "--stepsize", "2", "--crops", "1,3",
              "--snapshot", "0", "--out", str(out)]
    first = subprocess.run(common + ["--iters", "4"], capture_output=True, text=True, cwd=REPO,
                           timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "init.caffemodel").exists() and (out / "model_iter_4.caffemodel").exists()
    second = subprocess.run(common + ["--iters", "6"], capture_output=True, text=True, cwd=REPO,
                            timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "(already there)" in second.stdout
    log = (out / "train.log").read_text().splitlines()
    assert log[0].split("\t") == ["iter", "loss", "lr", "step_s"]
    assert [int(row.split("\t")[0]) for row in log[1:]] == [1, 2, 3, 4, 5, 6]
    assert [float(row.split("\t")[2]) for row in log[1:]] == [0.001, 0.001, 0.0005, 0.0005,
                                                              0.00025, 0.00025]
    results = json.loads((out / "results.json").read_text())
    assert results["classes"] == ["cat", "rocket"] and set(results["crops"]) == {"1", "3"}
    for crops in ("1", "3"):
        entry = results["crops"][crops]
        assert 0 <= entry["mAP"] <= 1
        assert entry["interval"][0] <= entry["mAP"] <= entry["interval"][1]
        assert entry["mAP"] == pytest.approx(np.mean(list(entry["AP"].values())))
    scores = np.load(out / "scores.npz")
    assert scores["scores_3"].shape == (4, 2) and (out / "precision_recall.png").stat().st_size
    assert "mAP" in second.stdout and "95% interval" in second.stdout


def test_help_and_bad_input(tmp_path):
    result = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True,
                            text=True)
    assert result.returncode == 0
    for flag in ("--data", "--weights", "--net", "--mode", "--out", "--iters", "--lr",
                 "--stepsize", "--batch-size", "--snapshot", "--train-split", "--test-split",
                 "--init-images", "--crops", "--seed", "--gpu", "--test-only"):
        assert flag in result.stdout, flag
    result = subprocess.run([sys.executable, str(TOOL), "--data", str(tmp_path), "--weights",
                             "none", "--out", str(tmp_path / "run"), "--iters", "1"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "classes.txt" in result.stderr
    assert "Traceback" not in result.stderr


def test_quit_file_stops_after_the_step_with_a_snapshot(caffe, tiny_detection_set, tmp_path):
    from ctxpred.classification.run import ClassificationRun, train_classifier
    run = ClassificationRun(dataset=str(tiny_detection_set), mode="fc8", iterations=50,
                            batch_size=2, snapshot=0)
    (tmp_path / "quit").write_text("")  # left by an earlier session: removed at the start

    def progress(row):
        if row["iter"] == 2:
            (tmp_path / "quit").write_text("")

    final, reason = train_classifier(caffe, tmp_path, run, progress=progress, log=lambda _: None)
    assert reason == "'quit' file" and final.exists()
    assert (tmp_path / "model_iter_2.solverstate").exists()
    assert (tmp_path / "training.png").stat().st_size > 0
    assert len((tmp_path / "train.log").read_text().splitlines()) == 3


def test_map_difference_and_compare_tool(tmp_path, rng):
    from ctxpred.classification.data import map_difference
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [1, IGNORE_LABEL], [0, 1]] * 3)
    perfect = labels.astype(np.float64) % IGNORE_LABEL + rng.uniform(0, 0.1, labels.shape)
    noise = rng.uniform(0, 1, labels.shape)
    difference, (low, high) = map_difference(labels, perfect, perfect)
    assert difference == 0 and low == high == 0
    difference, (low, high) = map_difference(labels, noise, perfect)
    assert difference == pytest.approx(1 - mean_average_precision(labels, noise)[0])
    assert 0 < low <= difference <= high
    for name, scores in (("a", noise), ("b", perfect)):
        (tmp_path / name).mkdir()
        np.savez(tmp_path / name / "scores.npz", labels=labels, scores_1=scores)
    result = subprocess.run([sys.executable, str(REPO / "tools" / "compare_classifiers.py"),
                             str(tmp_path / "a"), str(tmp_path / "b")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert f"second 100.0, difference {100 * difference:+.1f}" in result.stdout
