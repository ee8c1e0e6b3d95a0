"""The generated Fast R-CNN configs: parse with caffe_pb2, match the public recipe, run in
our Caffe."""
import ast
import json
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from ctxpred.models import fast_rcnn
from ctxpred.caffe.env import import_caffe

REPO = Path(__file__).resolve().parents[2]
FAST_RCNN = REPO / "prototxt" / "fast_rcnn"
# Reference values (Fast R-CNN's defaults, the project page's scales and iterations).
TRAIN_DEFAULTS = {"IMS_PER_BATCH": 2, "BATCH_SIZE": 128, "FG_FRACTION": 0.25, "FG_THRESH": 0.5,
                  "BG_THRESH_HI": 0.5, "BG_THRESH_LO": 0.1, "USE_FLIPPED": True, "BBOX_REG": True}
EXPECTED_CONFIGS = {
    "caffenet_groupless_multiscale.yml": ((480, 576, 688, 864, 1200), 2000),
    "vgg_context_singlescale.yml": ((600,), 1000),
}
EXPECTED = {  # model: (frozen convs, last conv, RoI grid, max_iter)
    "CaffeNetGroupless": ({"conv1"}, "conv5", 6, 150000),
    "VGGContext": ({"conv1_1", "conv1_2", "conv2_1", "conv2_2"}, "conv5_3", 7, 500000),
}


def caffe_pb2():
    return import_caffe().proto.caffe_pb2


def parse(path, message):
    proto = message()
    text_format.Merge(path.read_text(), proto)
    return proto


def parse_config(text):
    """The two-level `KEY: value` structure of a Fast R-CNN yml (ints, floats, bools, tuples)."""
    config, section = {}, None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, value = line.strip().partition(":")
        value = value.strip()
        if not value:
            section = config[key] = {}
            continue
        if value.startswith("!!python/tuple "):
            parsed = tuple(ast.literal_eval(value.split(" ", 1)[1]))
        else:
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                parsed = value
        (section if line.startswith(" ") else config)[key] = parsed
    return config


def layers_by_name(net):
    return {layer.name: layer for layer in net.layer}


def test_checked_in_files_equal_generated_and_parse():
    generated = fast_rcnn.generated_files()
    on_disk = {p.relative_to(REPO / "prototxt").as_posix() for p in FAST_RCNN.rglob("*")
               if p.is_file()}
    assert on_disk == set(generated), "run python tools/make_prototxt.py"
    for relative, text in generated.items():
        path = REPO / "prototxt" / relative
        assert path.read_text() == text, f"{path} is stale: run python tools/make_prototxt.py"
        if path.name == "solver.prototxt":
            parse(path, caffe_pb2().SolverParameter)
        elif path.suffix == ".prototxt":
            assert parse(path, caffe_pb2().NetParameter).layer, path
    assert len([name for name in generated if name.endswith(".prototxt")]) == 10


@pytest.mark.parametrize("model", fast_rcnn.MODEL_NAMES)
def test_stock_train_net_is_fast_rcnn_recipe(model):
    frozen, last_conv, grid, _ = EXPECTED[model]
    net = parse(FAST_RCNN / "models" / model / "train.prototxt", caffe_pb2().NetParameter)
    layers = layers_by_name(net)
    data = net.layer[0]
    assert data.type == "Python" and list(data.top) == ["data", "rois", "labels", "bbox_targets",
                                                        "bbox_loss_weights"]
    assert (data.python_param.module, data.python_param.layer) == ("roi_data_layer.layer",
                                                                   "RoIDataLayer")
    assert data.python_param.param_str == "'num_classes': 21"
    roi = layers["roi_pool5"]
    assert roi.type == "ROIPooling" and list(roi.bottom) == [last_conv, "rois"]
    assert list(roi.top) == ["pool5"] and layers["fc6"].bottom[0] == "pool5"
    param = roi.roi_pooling_param
    assert (param.pooled_h, param.pooled_w, param.spatial_scale) == (grid, grid, 0.0625)
    convs = [layer for layer in net.layer if layer.type == "Convolution"]
    assert all(layer.convolution_param.group == 1 for layer in convs)  # groupless
    assert {layer.name for layer in convs if layer.param[0].lr_mult == 0} == frozen
    assert all(layer.param[0].lr_mult == 0 and layer.param[1].lr_mult == 0
               for layer in convs if layer.name in frozen)
    if model == "CaffeNetGroupless":
        assert layers["conv1"].convolution_param.pad == [5]
        assert [layers[f"pool{i}"].pooling_param.pad for i in (1, 2)] == [1, 1]
        assert [layers[f"conv{i}"].convolution_param.num_output for i in range(1, 6)] == [
            96, 256, 384, 384, 256]
    for name, outputs, std in (("cls_score", 21, 0.01), ("bbox_pred", 84, 0.001)):
        inner = layers[name].inner_product_param
        assert inner.num_output == outputs and inner.weight_filler.type == "gaussian"
        assert inner.weight_filler.std == pytest.approx(std)
    assert [layers[f"drop{i}"].dropout_param.dropout_ratio for i in (6, 7)] == [0.5, 0.5]
    assert layers["loss_cls"].type == "SoftmaxWithLoss"
    assert list(layers["loss_cls"].bottom) == ["cls_score", "labels"]
    assert layers["loss_bbox"].type == "SmoothL1Loss"
    assert list(layers["loss_bbox"].bottom) == ["bbox_pred", "bbox_targets", "bbox_loss_weights"]
    assert list(layers["loss_bbox"].loss_weight) == [1]


@pytest.mark.parametrize("model", fast_rcnn.MODEL_NAMES)
def test_stock_test_net_and_solver(model):
    _, _, grid, iterations = EXPECTED[model]
    net = parse(FAST_RCNN / "models" / model / "test.prototxt", caffe_pb2().NetParameter)
    side = 227 if model == "CaffeNetGroupless" else 224
    assert list(net.input) == ["data", "rois"]
    assert [list(shape.dim) for shape in net.input_shape] == [[1, 3, side, side], [1, 5]]
    layers = layers_by_name(net)
    assert layers["roi_pool5"].roi_pooling_param.pooled_w == grid
    assert layers["cls_prob"].type == "Softmax" and list(layers["cls_prob"].bottom) == [
        "cls_score"]
    assert not [layer for layer in net.layer if layer.type.endswith("Loss")]
    solver = parse(FAST_RCNN / "models" / model / "solver.prototxt",
                   caffe_pb2().SolverParameter)
    assert solver.train_net == f"models/{model}/train.prototxt"
    assert (solver.base_lr, solver.lr_policy, solver.gamma, solver.stepsize) == (
        pytest.approx(0.001), "step", pytest.approx(0.1), 30000)
    assert (solver.momentum, solver.weight_decay) == (pytest.approx(0.9), pytest.approx(0.0005))
    assert (solver.max_iter, solver.snapshot) == (iterations, 0)


def test_configs_hold_reference_values():
    folder = FAST_RCNN / "experiments" / "cfgs"
    assert {path.name for path in folder.iterdir()} == set(EXPECTED_CONFIGS)
    for name, (scales, max_size) in EXPECTED_CONFIGS.items():
        config = parse_config((folder / name).read_text())
        assert config["RNG_SEED"] == 3 and config["EXP_DIR"] == name[:-4]
        assert config["TRAIN"] == {"SCALES": scales, "MAX_SIZE": max_size, **TRAIN_DEFAULTS}
        assert config["TEST"] == {"SCALES": scales, "MAX_SIZE": max_size, "NMS": 0.3,
                                  "BBOX_REG": True}


def test_ctxpred_variant_uses_our_python_layers():
    net = parse(FAST_RCNN / "ctxpred" / "CaffeNetGroupless" / "train.prototxt",
                caffe_pb2().NetParameter)
    layers = layers_by_name(net)
    data = net.layer[0].python_param
    assert (data.module, data.layer) == ("ctxpred.detection.roi_data", "RoIData")
    assert json.loads(data.param_str) == {"dataset": "data/detection", "split": "trainval",
                                          "proposals": "data/detection/proposals.npz"}
    assert len(net.layer[0].top) == 5
    roi = layers["roi_pool5"]
    assert roi.type == "Python" and (roi.python_param.module, roi.python_param.layer) == (
        "ctxpred.detection.roi_layers", "ROIPooling")
    assert json.loads(roi.python_param.param_str) == {"pooled_h": 6, "pooled_w": 6,
                                                      "spatial_scale": 0.0625}
    loss = layers["loss_bbox"]
    assert (loss.type, loss.python_param.layer, list(loss.loss_weight)) == (
        "Python", "SmoothL1Loss", [1])
    assert list(loss.bottom) == ["bbox_pred", "bbox_targets", "bbox_loss_weights"]
    assert layers["cls_score"].inner_product_param.num_output == 8
    assert layers["bbox_pred"].inner_product_param.num_output == 32
    vgg = fast_rcnn.train_net("VGGContext", "ctxpred", num_classes=5,
                              data_params={"dataset": "elsewhere"})
    vgg_layers = layers_by_name(vgg)
    assert json.loads(vgg_layers["roi_pool5"].python_param.param_str)["pooled_h"] == 7
    assert vgg_layers["bbox_pred"].inner_product_param.num_output == 20
    assert json.loads(vgg.layer[0].python_param.param_str) == {"dataset": "elsewhere"}
    with pytest.raises(ValueError, match="data_params"):
        fast_rcnn.train_net("VGGContext", "ctxpred")
    with pytest.raises(ValueError, match="CaffeNetGroupless, VGGContext"):
        fast_rcnn.train_net("AlexNet")
    with pytest.raises(ValueError, match="background"):
        fast_rcnn.inference_net("VGGContext", num_classes=1)


@pytest.mark.parametrize("model", fast_rcnn.MODEL_NAMES)
def test_ctxpred_test_nets_run_in_our_caffe(caffe, model):
    net = caffe.Net(str(FAST_RCNN / "ctxpred" / model / "test.prototxt"), caffe.TEST)
    assert net.params["cls_score"][0].data.shape == (8, 4096)
    assert net.params["bbox_pred"][0].data.shape == (32, 4096)
    if model == "CaffeNetGroupless":  # a forward pass with two RoIs
        rng = np.random.default_rng(0)
        net.blobs["data"].data[...] = rng.normal(0, 50, net.blobs["data"].data.shape)
        rois = np.array([[0, 0, 0, 100, 120], [0, 50, 30, 226, 226]], np.float32)
        net.blobs["rois"].reshape(*rois.shape)
        net.blobs["rois"].data[...] = rois
        out = net.forward()
        assert out["cls_prob"].shape == (2, 8)
        np.testing.assert_allclose(out["cls_prob"].sum(axis=1), 1, rtol=1e-5)
