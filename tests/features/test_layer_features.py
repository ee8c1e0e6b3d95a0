"""Per-layer pooled whole-image features (ctxpred.features.layers) and the onnxruntime backend."""
import os
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from ctxpred.data.images import decode_rgb
from ctxpred.features import layers as layer_features
from ctxpred.features.extractor import FeatureExtractor
from ctxpred.features.forward import OnnxForward, check_parity
from ctxpred.features.layers import (LayerFeatureNet, extract_layer_features, pooling_geometry,
                                     read_layer_features)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = str(REPO / "prototxt" / "color_dropping" / "deploy.prototxt")
IMAGES = sorted(str(path) for path in (REPO / "data" / "photos" / "heldout").iterdir())[:3]
CONV_LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5"]


@pytest.fixture(scope="module")
def weights(caffe, tmp_path_factory):
    """Random (filler) weights of the colour-dropping deploy net."""
    path = tmp_path_factory.mktemp("weights") / "random.caffemodel"
    caffe.Net(DEPLOY, caffe.TEST).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def extracted(weights, tmp_path_factory):
    """(out folder, {layer: path}) of conv1..conv5 and fc6 at 227 pixels, batch 2, pycaffe."""
    out = tmp_path_factory.mktemp("layers")
    return out, extract_layer_features(DEPLOY, weights, IMAGES, CONV_LAYERS + ["fc6"], out,
                                       input_size=227, batch=2)


def test_pooling_rule_gives_vissl_alexnet_settings_at_224():
    assert pooling_geometry(96, 55, 55) == ((19, 19), (4, 4), (10, 10))
    assert pooling_geometry(256, 27, 27) == ((12, 12), (3, 3), (6, 6))
    assert pooling_geometry(384, 13, 13) == ((9, 9), (1, 1), (5, 5))
    assert pooling_geometry(256, 13, 13) == ((8, 8), (1, 1), (6, 6))
    assert pooling_geometry(9216, 2, 3) == ((2, 3), (1, 1), (1, 1))  # one cell: global


def test_each_layer_is_pooled_to_about_9k_dims_with_image_ids(extracted):
    _, paths = extracted
    dims = {}
    for layer, path in paths.items():
        ids, features = read_layer_features(path)
        assert list(ids) == IMAGES
        assert features.dtype == np.float32 and np.isfinite(features).all()
        dims[layer] = features.shape[1]
        with h5py.File(path, "r") as file:
            channels, height, _ = file.attrs["map_shape"]
            kernel, stride = file.attrs["pool_kernel"], file.attrs["pool_stride"]
            cells = (height - kernel[0]) // stride[0] + 1
            assert dims[layer] == channels * cells * cells
    assert dims == {"conv1": 9600, "conv2": 9216, "conv3": 9600, "conv4": 9600, "conv5": 9216,
                    "fc6": 4096}


def test_at_the_nets_own_size_fc6_is_the_patch_feature(weights, tmp_path):
    """At 96 px the fc6 map is 1 x 1: the feature is the deploy net's fc6 of the resized image;
    conv5 is the average pooling of the deploy net's conv5 map with the stored geometry."""
    paths = extract_layer_features(DEPLOY, weights, IMAGES, ["conv5", "fc6"], tmp_path,
                                   input_size=96, batch=2)
    resized = np.stack([cv2.resize(decode_rgb(Path(name).read_bytes(), name, 4 * 96 * 96),
                                   (96, 96), interpolation=cv2.INTER_AREA) for name in IMAGES])
    fc6 = FeatureExtractor(DEPLOY, weights, "fc6").extract(resized)
    np.testing.assert_allclose(read_layer_features(paths["fc6"])[1], fc6, rtol=1e-4,
                               atol=1e-4 * np.abs(fc6).max())
    conv5 = FeatureExtractor(DEPLOY, weights, "conv5").extract(resized)
    with h5py.File(paths["conv5"], "r") as file:
        channels, height, width = file.attrs["map_shape"]
        (kernel, _), (stride, _) = file.attrs["pool_kernel"], file.attrs["pool_stride"]
    maps = conv5.reshape(len(IMAGES), channels, height, width)
    cells = (height - kernel) // stride + 1
    pooled = np.stack([[maps[:, :, y * stride:y * stride + kernel,
                             x * stride:x * stride + kernel].mean(axis=(2, 3))
                        for x in range(cells)] for y in range(cells)])  # (y, x, N, C)
    expected = pooled.transpose(2, 3, 0, 1).reshape(len(IMAGES), -1)
    np.testing.assert_allclose(read_layer_features(paths["conv5"])[1], expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())


def test_a_second_call_reads_the_cache(weights, extracted, monkeypatch):
    out, paths = extracted
    before = {layer: os.stat(path).st_mtime_ns for layer, path in paths.items()}

    def no_net(*args, **kwargs):
        raise AssertionError("the net was built again")
    monkeypatch.setattr(layer_features, "LayerFeatureNet", no_net)
    again = extract_layer_features(DEPLOY, weights, IMAGES, ["fc6", "conv3"], out,
                                   input_size=227, batch=3, backend="onnx")
    assert again == {"fc6": paths["fc6"], "conv3": paths["conv3"]}
    assert all(os.stat(paths[layer]).st_mtime_ns == before[layer] for layer in again)


def test_stale_corrupt_and_partial_files_are_not_used(caffe, weights, extracted, tmp_path):
    out, paths = extracted
    _, original = read_layer_features(paths["conv2"])
    other = tmp_path / "other.caffemodel"
    caffe.Net(DEPLOY, caffe.TEST).save(str(other))  # other random weights: another key
    stale = extract_layer_features(DEPLOY, str(other), IMAGES, ["conv2"], out, input_size=227)
    assert stale["conv2"] != paths["conv2"]
    assert not np.allclose(read_layer_features(stale["conv2"])[1], original)
    copy = tmp_path / "copy"
    copy.mkdir()
    target = copy / paths["conv2"].name
    target.write_bytes(paths["conv2"].read_bytes()[:4000])  # cut short
    target.with_name(target.name + ".part").write_bytes(b"left over")
    again = extract_layer_features(DEPLOY, weights, IMAGES, ["conv2"], copy, input_size=227)
    assert again["conv2"] == target
    np.testing.assert_allclose(read_layer_features(target)[1], original, rtol=1e-5, atol=1e-6)
    assert sorted(path.name for path in copy.iterdir()) == [target.name]


def test_a_bad_image_leaves_no_file(weights, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="broken.jpg"):
        extract_layer_features(DEPLOY, weights, IMAGES + [str(broken)], ["conv1"], out,
                               input_size=227, batch=2)
    assert list(out.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="nowhere.jpg"):
        extract_layer_features(DEPLOY, weights, [str(tmp_path / "nowhere.jpg")], ["conv1"], out)


def test_a_layer_the_net_lacks_is_named_with_the_available_ones(weights, tmp_path):
    with pytest.raises(ValueError) as error:
        extract_layer_features(DEPLOY, weights, IMAGES, ["conv1", "fc7"], tmp_path)
    message = str(error.value)
    assert "'fc7'" in message and "conv1, " in message and "fc6" in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_onnx_features_equal_caffes(weights, extracted, tmp_path):
    _, paths = extracted
    onnx_paths = extract_layer_features(DEPLOY, weights, IMAGES, CONV_LAYERS + ["fc6"], tmp_path,
                                        input_size=227, batch=2, backend="onnx")
    for layer, path in paths.items():
        caffe_features = read_layer_features(path)[1]
        onnx_features = read_layer_features(onnx_paths[layer])[1]
        relative = np.abs(onnx_features - caffe_features).max() / np.abs(caffe_features).max()
        assert relative <= 1e-4, layer
        with h5py.File(onnx_paths[layer], "r") as file:
            assert file.attrs["backend"] == "onnx"
            assert file.attrs["onnx_parity_max_relative"] <= 1e-4


def test_the_parity_check_fires_when_onnx_weights_differ(weights):
    net = LayerFeatureNet(DEPLOY, weights, ["conv1", "fc6"], input_size=128, batch=2)
    perturbed = net.weights()
    perturbed["conv2"][0] = perturbed["conv2"][0] * 1.001
    onnx_forward = OnnxForward(net.param, perturbed, list(net.outputs.values()))
    caffe_forward = layer_features.CaffeForward(net.net, list(net.outputs.values()))
    pixels = np.random.default_rng(0).integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="fc6_pooled.*relative"):
        check_parity(caffe_forward, onnx_forward, pixels)
    same = OnnxForward(net.param, net.weights(), list(net.outputs.values()))
    assert check_parity(caffe_forward, same, pixels) <= 1e-4


def test_a_users_caffenet_gives_fc6_and_fc7_at_its_own_size(caffe, tmp_path):
    """The groupless CaffeNet (227 px input, BGR): fc maps are 1 x 1 (the InnerProduct itself),
    conv1 and conv5 pool as VISSL's AlexNet (19/4 and 8/1 on 55 and 13 pixel maps)."""
    deploy = str(REPO / "prototxt" / "groupless_caffenet.prototxt")
    weights = tmp_path / "caffenet.caffemodel"
    caffe.Net(deploy, caffe.TEST).save(str(weights))
    paths = extract_layer_features(deploy, str(weights), IMAGES[:2], ["conv1", "conv5", "fc6",
                                                                      "fc7"],
                                   tmp_path / "out", input_size=227, batch=2, bgr=True)
    geometry = {}
    for layer, path in paths.items():
        with h5py.File(path, "r") as file:
            geometry[layer] = (tuple(file.attrs["map_shape"]), tuple(file.attrs["pool_kernel"]),
                               tuple(file.attrs["pool_stride"]), file["features"].shape[1])
            assert file.attrs["channel_order"] == "BGR"
    assert geometry == {"conv1": ((96, 55, 55), (19, 19), (4, 4), 9600),
                        "conv5": ((256, 13, 13), (8, 8), (1, 1), 9216),
                        "fc6": ((4096, 1, 1), (1, 1), (1, 1), 4096),
                        "fc7": ((4096, 1, 1), (1, 1), (1, 1), 4096)}


def test_an_input_too_small_for_a_kernel_is_bad_input(weights, tmp_path):
    with pytest.raises(ValueError, match="at 40 pixels"):
        LayerFeatureNet(DEPLOY, weights, ["fc6"], input_size=40)
    assert LayerFeatureNet(DEPLOY, weights, ["conv5"], input_size=64).geometry["conv5"]


@pytest.mark.parametrize("beta", [0.75, 0.6])
def test_lrn_rewritten_for_onnxruntime_computes_lrn(beta):
    """The pooled LRN of for_onnxruntime equals onnxruntime's own LRN (Caffe's formula)."""
    from onnx import TensorProto, helper

    from ctxpred.features.forward import for_onnxruntime, onnx_session

    def model():
        node = helper.make_node("LRN", ["x"], ["y"], size=5, alpha=1e-3, beta=beta, bias=2.0)
        graph = helper.make_graph(
            [node], "lrn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 7, 4, 5])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(0).normal(0, 30, (2, 7, 4, 5)).astype(np.float32)
    expected = onnx_session(model()).run(None, {"x": x})[0]
    rewritten = for_onnxruntime(model())
    assert "LRN" not in {node.op_type for node in rewritten.graph.node}
    np.testing.assert_allclose(onnx_session(rewritten).run(None, {"x": x})[0], expected,
                               rtol=1e-5, atol=1e-6)
