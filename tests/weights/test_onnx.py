"""ONNX export: parity of onnxruntime with real pycaffe (TEST phase) on real photos.

Every net gets seeded random weights (He-scaled weights, non-zero biases,
BatchNorm statistics with a scale factor of 3), saved by Caffe itself, and
runs on mean-subtracted patches of scikit-image's photos.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import skimage.data

from ctxpred.models.backbones import caffenet_deploy
from ctxpred.models.context import NetOptions, deploy_net
from ctxpred.weights.onnx import (UnsupportedLayerError, caffe_to_onnx, compare_with_caffe,
                                 photo_patches)
from ctxpred.caffe.netparam import read_net_param
from ctxpred.weights.files import read_weights

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "export_onnx.py"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def photos():
    return [getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea",
                                                        "rocket")]


def random_weights(caffe, prototxt, path, seed=0):
    """Fill a net's parameters with seeded random values and save them with Caffe."""
    net = caffe.Net(str(prototxt), caffe.TEST)
    rng = np.random.default_rng(seed)
    for name, blobs in net.params.items():
        if net.layer_dict[name].type == "BatchNorm":
            shape = blobs[0].data.shape
            blobs[0].data[...] = rng.normal(0, 3, shape)
            blobs[1].data[...] = rng.uniform(1.5, 6, shape)
            blobs[2].data[...] = 3
            continue
        weight = blobs[0].data
        fan_in = np.prod(weight.shape[1:]) if weight.ndim > 1 else 1
        weight[...] = rng.normal(0, np.sqrt(2 / fan_in), weight.shape)
        if net.layer_dict[name].type == "Scale":
            weight[...] += 1
        for blob in blobs[1:]:
            blob.data[...] = rng.normal(0, 0.1, blob.data.shape)
    if str(path).endswith(".h5"):
        net.save_hdf5(str(path))
    else:
        net.save(str(path))
    return net


def export(prototxt, weights, path, opset=17):
    model = caffe_to_onnx(read_net_param(prototxt), read_weights(weights), opset=opset)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return model


def parity(caffe, tmp_path, proto, inputs, opset=17, weights_name="net.caffemodel"):
    """Write ``proto``, random weights and its ONNX export; (max abs, max rel, model)."""
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text(str(proto))
    weights = tmp_path / weights_name
    random_weights(caffe, prototxt, weights)
    model = export(prototxt, weights, tmp_path / "net.onnx", opset)
    return (*compare_with_caffe(prototxt, weights, tmp_path / "net.onnx", inputs), model)


def op_types(model):
    return {node.op_type for node in model.graph.node}


def test_color_dropping_deploy(caffe, tmp_path, photos):
    proto = read_net_param(REPO / "prototxt" / "color_dropping" / "deploy.prototxt")
    max_abs, max_rel, model = parity(caffe, tmp_path, proto, photo_patches(photos, 96, 96, 4))
    assert max_rel <= TOLERANCE, (max_abs, max_rel)
    assert [output.name for output in model.graph.output] == ["fc6"]
    assert {"ReduceSumSquare", "Pow", "LRN", "MaxPool", "Gemm"} <= op_types(model)


def test_projection_deploy(caffe, tmp_path, photos):
    proto = read_net_param(REPO / "prototxt" / "projection" / "deploy.prototxt")
    max_abs, max_rel, model = parity(caffe, tmp_path, proto, photo_patches(photos, 96, 96, 4))
    assert max_rel <= TOLERANCE, (max_abs, max_rel)
    assert {"Split", "Sum", "Concat"} <= op_types(model)


def test_vgg_deploy(caffe, tmp_path, photos):
    proto = read_net_param(REPO / "prototxt" / "vgg" / "deploy.prototxt")
    max_abs, max_rel, _ = parity(caffe, tmp_path, proto, photo_patches(photos, 96, 96, 1))
    assert max_rel <= TOLERANCE, (max_abs, max_rel)


def test_batchnorm_deploy(caffe, tmp_path, photos):
    proto = deploy_net("color_dropping", NetOptions(batchnorm=True))
    max_abs, max_rel, model = parity(caffe, tmp_path, proto, photo_patches(photos, 96, 96, 2))
    assert max_rel <= TOLERANCE, (max_abs, max_rel)
    assert "BatchNormalization" in op_types(model)


def test_grouped_caffenet_with_dropout_and_softmax(caffe, tmp_path, photos):
    prototxt, weights = tmp_path / "caffenet.prototxt", tmp_path / "caffenet.h5"
    prototxt.write_text(str(caffenet_deploy(group=2, batch=2)))
    net = random_weights(caffe, prototxt, weights, seed=1)
    patches = photo_patches(photos, 227, 227, 4)
    # Scale fc8 so that the softmax is not saturated (a one-hot output would hide errors).
    net.blobs["data"].data[...] = patches[:2]
    net.forward()
    for blob in net.params["fc8"]:
        blob.data[...] /= net.blobs["fc8"].data.std() / 2
    net.save_hdf5(str(weights))
    model = export(prototxt, weights, tmp_path / "caffenet.onnx")
    max_abs, max_rel = compare_with_caffe(prototxt, weights, tmp_path / "caffenet.onnx", patches)
    assert max_rel <= TOLERANCE, (max_abs, max_rel)
    net.forward()
    assert net.blobs["prob"].data.max() < 0.9
    groups = [attribute.i for node in model.graph.node if node.op_type == "Conv"
              for attribute in node.attribute if attribute.name == "group"]
    assert groups == [1, 2, 1, 2, 2]
    assert {"Identity", "Softmax", "LRN"} <= op_types(model)


def test_ceil_mode_pooling_matches_caffe(caffe, tmp_path, photos):
    n = caffe.NetSpec()
    n.data = caffe.layers.Input(shape=dict(dim=[2, 3, 12, 12]))
    P = caffe.params.Pooling
    geometries = dict(  # name: (method, kernel, stride, pad)
        ave_overrun=(P.AVE, 3, 2, 0), ave_padded=(P.AVE, 3, 2, 1), ave_dropped=(P.AVE, 3, 3, 2),
        max_padded=(P.MAX, 3, 2, 1), max_dropped=(P.MAX, 3, 3, 2), max_overrun=(P.MAX, 2, 2, 0))
    for name, (method, kernel, stride, pad) in geometries.items():
        setattr(n, name, caffe.layers.Pooling(n.data, pool=method, kernel_size=kernel,
                                              stride=stride, pad=pad))
    n.ave_rectangle = caffe.layers.Pooling(n.data, pool=P.AVE, kernel_h=3, kernel_w=3,
                                           stride_h=2, stride_w=2, pad_h=1, pad_w=0)
    n.ave_global = caffe.layers.Pooling(n.data, pool=P.AVE, global_pooling=True)
    prototxt = tmp_path / "pool.prototxt"
    prototxt.write_text(str(n.to_proto()))
    weights = tmp_path / "pool.caffemodel"
    net = random_weights(caffe, prototxt, weights)
    # Caffe's rounding is not the naive one: ceil (6 windows, not 5, the last one
    # clipped at the edge), and a last window starting in the padding is dropped.
    assert net.blobs["ave_overrun"].data.shape[2:] == (6, 6)
    assert net.blobs["ave_padded"].data.shape[2:] == (7, 7)
    assert net.blobs["ave_dropped"].data.shape[2:] == (5, 5)
    assert net.blobs["ave_rectangle"].data.shape[2:] == (7, 6)
    model = export(prototxt, weights, tmp_path / "pool.onnx")
    max_abs, max_rel = compare_with_caffe(prototxt, weights, tmp_path / "pool.onnx",
                                          photo_patches(photos, 12, 12, 4))
    assert max_rel <= 1e-5, (max_abs, max_rel)  # summation order only
    assert len(model.graph.output) == len(geometries) + 2


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_mvn(caffe, tmp_path, photos, opset):
    n = caffe.NetSpec()
    n.data = caffe.layers.Input(shape=dict(dim=[2, 3, 16, 16]))
    n.across = caffe.layers.MVN(n.data, across_channels=True)
    n.within = caffe.layers.MVN(n.data, eps=1e-3)
    n.mean_only = caffe.layers.MVN(n.data, across_channels=True, normalize_variance=False)
    max_abs, max_rel, model = parity(caffe, tmp_path, n.to_proto(),
                                     photo_patches(photos, 16, 16, 4), opset)
    assert max_rel <= TOLERANCE, (max_abs, max_rel)
    assert len(model.graph.output) == 3


def many_layers(caffe):
    """Input (2, 3, 12, 12) through the remaining supported layers and settings."""
    L, n = caffe.layers, caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 12, 12]))
    n.conv = L.Convolution(n.data, num_output=6, kernel_size=3, stride=2, pad=1, dilation=2,
                           group=3, bias_term=False)
    n.leaky = L.ReLU(n.conv, negative_slope=0.1, in_place=True)
    n.dropped = L.Dropout(n.conv, dropout_ratio=0.3, in_place=True)
    n.bn = L.BatchNorm(n.conv, in_place=True)
    n.scaled = L.Scale(n.conv, bias_term=True)
    n.power = L.Power(n.scaled, power=2, scale=0.5, shift=1)
    n.constant = L.Power(n.scaled, power=3, scale=0, shift=2)
    n.sum = L.Reduction(n.scaled, operation=caffe.params.Reduction.SUM, axis=1)
    n.mean = L.Reduction(n.scaled, operation=caffe.params.Reduction.MEAN, axis=2, coeff=0.5)
    n.asum = L.Reduction(n.scaled, operation=caffe.params.Reduction.ASUM, axis=-1)
    n.sumsq = L.Reduction(n.scaled, operation=caffe.params.Reduction.SUMSQ)  # axis 0: a scalar
    n.sumsq_batch = L.Reduction(n.scaled, operation=caffe.params.Reduction.SUMSQ, axis=1)
    n.by_sample = L.Scale(n.scaled, n.sumsq_batch, axis=0)
    n.first, n.rest = L.Slice(n.scaled, slice_param=dict(axis=1, slice_point=[2]), ntop=2)
    n.joined = L.Concat(n.rest, n.first, axis=1)
    n.product = L.Eltwise(n.joined, n.scaled, n.power, operation=caffe.params.Eltwise.PROD)
    n.maximum = L.Eltwise(n.joined, n.scaled, operation=caffe.params.Eltwise.MAX)
    n.weighted = L.Eltwise(n.joined, n.scaled, operation=caffe.params.Eltwise.SUM,
                           coeff=[0.5, -2])
    n.within = L.LRN(n.scaled, local_size=3, alpha=0.5, beta=0.6,
                     norm_region=caffe.params.LRN.WITHIN_CHANNEL)
    n.across = L.LRN(n.joined, local_size=3, alpha=0.3, beta=0.7, k=2)
    n.rows = L.InnerProduct(n.within, num_output=5, axis=2)
    n.flat = L.InnerProduct(n.across, num_output=7, bias_term=False,
                            inner_product_param=dict(transpose=True))
    n.prob = L.Softmax(n.rows, axis=1)
    n.skipped = L.TanH(n.flat, include=dict(phase=caffe.TRAIN))
    return n.to_proto()


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_remaining_layers(caffe, tmp_path, photos, opset):
    max_abs, max_rel, model = parity(caffe, tmp_path, many_layers(caffe),
                                     photo_patches(photos, 12, 12, 4), opset)
    assert max_rel <= TOLERANCE, (max_abs, max_rel)
    outputs = [output.name for output in model.graph.output]
    assert {"constant", "sum", "mean", "asum", "sumsq", "by_sample", "product", "maximum",
            "weighted", "prob", "flat"} <= set(outputs)
    # In-place layers chain renamed tensors; the blob's last value keeps its name.
    assert "conv/leaky" in {node.output[0] for node in model.graph.node}


def test_different_weights_are_detected(caffe, tmp_path, photos):
    prototxt = REPO / "prototxt" / "color_dropping" / "deploy.prototxt"
    random_weights(caffe, prototxt, tmp_path / "a.caffemodel", seed=1)
    random_weights(caffe, prototxt, tmp_path / "b.caffemodel", seed=2)
    export(prototxt, tmp_path / "a.caffemodel", tmp_path / "a.onnx")
    _, max_rel = compare_with_caffe(prototxt, tmp_path / "b.caffemodel", tmp_path / "a.onnx",
                                    photo_patches(photos, 96, 96, 1))
    assert max_rel > 0.1


def test_unsupported_layer_is_named(caffe):
    n = caffe.NetSpec()
    n.data = caffe.layers.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.squashed = caffe.layers.TanH(n.data)
    with pytest.raises(UnsupportedLayerError, match="'squashed' has type 'TanH'"):
        caffe_to_onnx(n.to_proto(), {})
    n.squashed = caffe.layers.Pooling(n.data, pool=caffe.params.Pooling.STOCHASTIC,
                                      kernel_size=2)
    with pytest.raises(UnsupportedLayerError, match="'squashed'.*STOCHASTIC"):
        caffe_to_onnx(n.to_proto(), {})


def test_missing_layer_weights_are_named(caffe):
    proto = read_net_param(REPO / "prototxt" / "color_dropping" / "deploy.prototxt")
    with pytest.raises(ValueError, match="'conv1' \\(Convolution\\) needs 2 blobs"):
        caffe_to_onnx(proto, {})


def run_tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


def test_cli_help_explains_every_flag():
    result = run_tool("--help")
    assert result.returncode == 0
    for flag in ("--deploy", "--weights", "--out", "--opset", "--check"):
        assert flag in result.stdout


def test_cli_missing_weights_file(tmp_path):
    missing = tmp_path / "nothing.caffemodel"
    result = run_tool("--deploy", REPO / "prototxt" / "color_dropping" / "deploy.prototxt",
                      "--weights", missing, "--out", tmp_path / "out.onnx")
    assert result.returncode == 2
    assert f"--weights: file {missing} does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_cli_exports_and_checks(caffe, tmp_path):
    prototxt = REPO / "prototxt" / "projection" / "deploy.prototxt"
    random_weights(caffe, prototxt, tmp_path / "net.caffemodel")
    result = run_tool("--deploy", prototxt, "--weights", tmp_path / "net.caffemodel",
                      "--out", tmp_path / "net.onnx", "--check")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "max relative difference" in result.stdout
    assert (tmp_path / "net.onnx").is_file()


def test_cli_checks_given_images(caffe, tmp_path, photo_folder):
    n = caffe.NetSpec()
    n.data = caffe.layers.Input(shape=dict(dim=[1, 3, 20, 20]))
    n.pool = caffe.layers.Pooling(n.data, pool=caffe.params.Pooling.AVE, kernel_size=3, stride=2,
                                  pad=1)
    n.prob = caffe.layers.Softmax(n.pool)
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text(str(n.to_proto()))
    random_weights(caffe, prototxt, tmp_path / "net.caffemodel")
    images = sorted(photo_folder.glob("*.jpg"))
    result = run_tool("--deploy", prototxt, "--weights", tmp_path / "net.caffemodel",
                      "--out", tmp_path / "net.onnx", "--opset", 18, "--check", *images)
    assert result.returncode == 0, result.stderr
    assert f"parity on {len(images)} patches of your images" in result.stdout
