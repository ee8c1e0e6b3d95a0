"""Fast R-CNN in stock Caffe: the ctxpred nets train, snapshot, resume and test end to end."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from ctxpred.detection.run import DetectorRun, evaluate_detector, train_detector
from ctxpred.detection.roi_data import RoIData
from ctxpred.training.log import read_log

REPO = Path(__file__).resolve().parents[2]


def run_tool(name, *arguments):
    """Run tools/<name>.py in a subprocess; fail with its output if it fails."""
    result = subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *arguments],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result
SMALL = dict(scales=[160], max_size=240, ims_per_batch=1, batch_size=32)


@pytest.fixture(scope="module")
def random_init(caffe, tiny_detection_set, tmp_path_factory):
    """Magic-initialised random weights of the groupless CaffeNet (the paper's random baseline)."""
    out = tmp_path_factory.mktemp("init") / "random.caffemodel"
    run_tool("magic_init", "-cs", "-d", str(tiny_detection_set / "JPEGImages"), "-nit", "1",
             "-bs", "4", "-q", str(REPO / "prototxt/groupless_caffenet.prototxt"), str(out))
    return out


def test_checked_in_ctxpred_train_net_runs_in_caffe(caffe, tiny_detection_set, random_init,
                                                    tmp_path):
    """prototxt/fast_rcnn/ctxpred/CaffeNetGroupless/train.prototxt, pointed at a small set."""
    from caffe.proto import caffe_pb2
    param = caffe_pb2.NetParameter()
    text_format.Merge((REPO / "prototxt/fast_rcnn/ctxpred/CaffeNetGroupless/train.prototxt")
                      .read_text(), param)
    data = param.layer[0]
    params = json.loads(data.python_param.param_str)
    params.update(dataset=str(tiny_detection_set),
                  proposals=str(tiny_detection_set / "proposals.npz"), **SMALL)
    data.python_param.param_str = json.dumps(params)
    for layer in param.layer:
        if layer.name == "cls_score":
            layer.inner_product_param.num_output = 3
        if layer.name == "bbox_pred":
            layer.inner_product_param.num_output = 12
    path = tmp_path / "train.prototxt"
    path.write_text(text_format.MessageToString(param))
    net = caffe.Net(str(path), caffe.TRAIN)
    net.copy_from(str(random_init))
    assert isinstance(net.layers[0], RoIData)
    net.forward()
    assert net.blobs["pool5"].data.shape[1:] == (256, 6, 6)
    assert np.isfinite(net.blobs["loss_cls"].data) and np.isfinite(net.blobs["loss_bbox"].data)
    net.backward()
    assert np.abs(net.blobs["conv5"].diff).sum() > 0     # gradients cross the Python RoI pooling


def test_train_resume_fold_and_test(caffe, tiny_detection_set, random_init, tmp_path):
    # score_thresh 0: after 5 steps few scores pass Fast R-CNN's 0.05.
    run = DetectorRun(dataset=str(tiny_detection_set), init=str(random_init), iterations=3,
                      base_lr=1e-5, detection=dict(SMALL, score_thresh=0.0))
    final, reason = train_detector(caffe, tmp_path, run, log=lambda message: None)
    assert reason == "max_iter" and final.is_file()
    assert (tmp_path / "model_iter_3.caffemodel").is_file()
    log = read_log(tmp_path / "train.log")
    assert log["iter"].tolist() == [1, 2, 3] and np.isfinite(log["loss_cls"]).all()

    messages = []
    longer = DetectorRun(**{**run.__dict__, "iterations": 5})
    train_detector(caffe, tmp_path, longer, log=messages.append)
    assert any("resuming from" in message and "model_iter_3" in message for message in messages)
    assert read_log(tmp_path / "train.log")["iter"].tolist() == [1, 2, 3, 4, 5]
    from caffe.proto import caffe_pb2
    train_param = text_format.Merge((tmp_path / "train.prototxt").read_text(),
                                    caffe_pb2.NetParameter())
    assert json.loads(train_param.layer[0].python_param.param_str)["seed"] == 3 + 3  # resumed at 3

    # final.caffemodel's bbox_pred answers unnormalised deltas: raw * std + mean.
    train = caffe.Net(str(tmp_path / "train.prototxt"), str(tmp_path / "model_iter_5.caffemodel"),
                      caffe.TEST)
    layer = train.layers[0]
    train.forward()
    folded = caffe.Net(str(tmp_path / "test.prototxt"), str(final), caffe.TEST)
    weight, bias = (folded.params["bbox_pred"][i].data for i in (0, 1))
    expected = train.blobs["bbox_pred"].data * layer.bbox_stds.ravel() + layer.bbox_means.ravel()
    assert np.allclose(train.blobs["fc7"].data @ weight.T + bias, expected, atol=1e-3)

    results = evaluate_detector(caffe, tmp_path, longer)
    assert results["images"] == 4 and set(results["classes"]) == {"cat", "rocket"}
    for row in results["classes"].values():
        assert 0 <= row["ap"] <= 1 and 0 <= row["ap_07"] <= 1 and row["positives"] >= 1
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert (tmp_path / "precision_recall.png").stat().st_size > 1000
    detections = json.loads((tmp_path / "detections.json").read_text())
    assert sum(map(len, detections.values())) > 0


def test_quit_file_stops_with_a_snapshot(caffe, tiny_detection_set, random_init, tmp_path):
    (tmp_path / "quit").write_text("")  # left by an earlier session: removed at the start
    run = DetectorRun(dataset=str(tiny_detection_set), init=str(random_init), iterations=50,
                      detection=SMALL)
    messages = []

    def quit_at_one(row):
        if row["iter"] == 1:
            (tmp_path / "quit").write_text("")

    final, reason = train_detector(caffe, tmp_path, run, progress=quit_at_one,
                                   log=messages.append)
    assert reason == "'quit' file" and final.is_file()
    assert any("removed the 'quit' file" in message for message in messages)
    assert (tmp_path / "model_iter_1.solverstate").is_file()
    assert read_log(tmp_path / "train.log")["iter"].tolist() == [1]
    assert (tmp_path / "training.png").stat().st_size > 1000


def test_tool_trains_and_prints_the_ap_table(caffe, tiny_detection_set, random_init, tmp_path):
    out = run_tool("train_detector", "--dataset", str(tiny_detection_set), "--init",
                   str(random_init), "--out", str(tmp_path), "--iters", "2", "--scales", "160",
                   "--max-size", "240", "--ims-per-batch", "1", "--batch-size", "32").stdout
    assert "AP(area)" in out and "AP(11pt)" in out and "rocket" in out and "mean" in out
    assert (tmp_path / "final.caffemodel").is_file()


def test_help_explains_every_flag():
    out = run_tool("train_detector", "--help").stdout
    for flag in ("--dataset", "--init", "--out", "--model", "--iters", "--scales", "--max-size",
                 "--ims-per-batch", "--batch-size", "--base-lr", "--stepsize", "--train-split",
                 "--test-split", "--proposals", "--seed", "--test-only"):
        assert flag in out, flag
    assert "quit" in out and "resumes" in out and "prepare_detection_init.py" in out


def test_map_difference_and_the_compare_tool(tiny_detection_set, tmp_path):
    from ctxpred.detection.roidb import read_classes
    from ctxpred.detection.run import map_difference, map_statistic, read_detections
    from ctxpred.detection.voc import evaluate_detections, read_dataset
    classes = read_classes(tiny_detection_set)
    annotations = dict(read_dataset(tiny_detection_set, "test", classes))
    perfect = {name: [(image_id, 1.0, obj.box) for image_id, annotation in annotations.items()
                      for obj in annotation.objects if obj.name == name] for name in classes}
    shifted = {name: [(image_id, score, (x1 + 40, y1 + 40, x2 + 40, y2 + 40))
                      for image_id, score, (x1, y1, x2, y2) in rows]
               for name, rows in perfect.items()}           # IoU < 0.5: all false positives
    mixed = {name: perfect[name] + [(image_id, 0.5, box) for image_id, _, box in shifted[name]]
             for name in classes}
    everything_once = np.ones((1, len(annotations)))
    assert map_statistic(mixed, annotations, classes)(everything_once)[0] == pytest.approx(
        evaluate_detections(mixed, annotations, classes)["mAP"])
    assert map_difference(perfect, perfect, annotations, classes, resamples=50) == (0, 0, 0)
    difference, low, high = map_difference(shifted, perfect, annotations, classes, resamples=50)
    assert difference == pytest.approx(1) and low == pytest.approx(1) and high == pytest.approx(1)
    for name, found in (("a", shifted), ("b", perfect)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "detections.json").write_text(json.dumps(found))
    assert read_detections(tmp_path / "b") == {k: [(i, s, tuple(b)) for i, s, b in v]
                                              for k, v in perfect.items()}
    out = run_tool("compare_detectors", str(tmp_path / "a"), str(tmp_path / "b"), "--dataset",
                   str(tiny_detection_set), "--resamples", "20").stdout
    assert "mAP difference (b - a): +100.0 points" in out and "[+100.0, +100.0]" in out
