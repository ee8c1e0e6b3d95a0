"""tools/prepare_detection_init.py: context model -> Fast R-CNN initial weights, on real Caffe."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ctxpred.detection.init_weights import detection_conv1
from ctxpred.data.preprocess import projection_matrix
from ctxpred.weights.surgery import fold_batchnorm
from ctxpred.caffe.netparam import read_net_param
from ctxpred.weights.files import read_weights

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "prepare_detection_init.py"
CONVS = ("conv1", "conv2", "conv3", "conv4", "conv5")


@pytest.fixture(scope="module")
def context_model(colour_dropping_snapshot):
    """(caffemodel, train prototxt) of a colour-dropping net whose BatchNorm saw one batch."""
    return colour_dropping_snapshot["trained"], colour_dropping_snapshot["train"]


def run_tool(*args):
    """tools/prepare_detection_init.py in a subprocess: (exit code, stderr)."""
    result = subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                            text=True, cwd=REPO)
    return result.returncode, result.stderr


def test_conv1_becomes_the_same_function_of_bgr_input(rng):
    weight = rng.normal(size=(4, 3, 5, 5)).astype(np.float32)
    rgb = rng.normal(size=(3, 5, 5))
    bgr = rgb[::-1]
    projected = np.einsum("cd,dhw->chw", projection_matrix(), rgb)
    for net_name, seen in (("color_dropping", rgb), ("projection", projected)):
        converted, steps = detection_conv1(weight, net_name)
        np.testing.assert_allclose(np.einsum("ochw,chw->o", converted, bgr),
                                   np.einsum("ochw,chw->o", weight, seen), rtol=1e-4, atol=1e-4)
        assert steps[-1] == "input channels RGB -> BGR"
        assert ("projection" in steps[0]) == (net_name == "projection")
    with pytest.raises(ValueError, match="not \\(outputs, 3, kh, kw\\)"):
        detection_conv1(weight[:, :2], "vgg")


def test_command_gives_weights_that_load_into_the_detection_nets(caffe, context_model,
                                                                 photo_folder, tmp_path):
    model, train = context_model
    out = tmp_path / "init.caffemodel"
    result = subprocess.run(
        [sys.executable, str(TOOL), "--weights", str(model), "--net", "color_dropping",
         "--images", str(photo_folder / "*.jpg"), "--out", str(out), "--context-def", str(train),
         "-bs", "2", "-nit", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    for name in CONVS:
        assert "context model" in rows[name], rows[name]
    for name in ("conv3", "conv4", "conv5"):
        assert f"bn{name[-1]} folded in" in rows[name]
    assert "RGB -> BGR" in rows["conv1"]
    for name in ("fc6", "fc7", "fc8"):
        assert " data " in rows[name] and "initialised (elwise)" in rows[name], rows[name]
    assert "5 layer(s) from the context model, 3 initialised from data" in result.stdout
    assert "left out of the context model: fc6, fc7, bn7, fc8, fc9" in result.stdout

    folded = fold_batchnorm(read_weights(model), read_net_param(train))
    caffenet = caffe.Net(str(REPO / "prototxt" / "groupless_caffenet.prototxt"), caffe.TEST,
                         weights=str(out))
    for name in CONVS:
        weight = caffenet.params[name][0].data
        original = folded[name][0][:, ::-1] if name == "conv1" else folded[name][0]
        factor = weight.ravel() @ original.ravel() / np.sum(original.astype(np.float64) ** 2)
        assert factor > 0, name  # -cs rescales each layer by one positive factor
        np.testing.assert_allclose(weight, factor * original, rtol=1e-4,
                                   atol=1e-5 * np.abs(weight).max(), err_msg=name)
    detection = caffe.Net(str(REPO / "prototxt" / "fast_rcnn" / "ctxpred" / "CaffeNetGroupless"
                              / "test.prototxt"), caffe.TEST)
    detection.copy_from(str(out))
    for name in (*CONVS, "fc6", "fc7"):
        np.testing.assert_array_equal(detection.params[name][0].data,
                                      caffenet.params[name][0].data, err_msg=name)
    for name in ("fc6", "fc7"):
        weight = detection.params[name][0].data
        assert np.isfinite(weight).all() and np.abs(weight).min(axis=1).max() > 0, name


def test_bad_input_names_the_file_or_layer(caffe, context_model, photo_folder, tmp_path):
    model, _ = context_model
    images = str(photo_folder / "*.jpg")
    out = tmp_path / "never.caffemodel"
    common = ["--images", images, "--out", out, "-bs", "2", "-nit", "1"]
    code, error = run_tool("--weights", model, "--net", "vgg", *common)
    assert code == 2
    assert str(model) in error and "conv1_1" in error and "not a vgg context model" in error
    code, error = run_tool("--weights", tmp_path / "missing.caffemodel", "--net", "projection",
                           *common)
    assert code == 2 and "missing.caffemodel does not exist" in error
    code, error = run_tool("--weights", model, "--net", "projection", "--images",
                           tmp_path / "none" / "*.jpg", "--out", out)
    assert code == 2 and "none" in error
    code, error = run_tool("--weights", model, "--net", "color_dropping", "--images", images,
                           "--out", out, "-bs", "1", "-nit", "1")
    assert code == 2 and "need at least 2" in error
    assert not out.exists()
    code, error = run_tool("--weights", model, "--net", "alexnet", *common)
    assert code == 2 and "alexnet" in error
