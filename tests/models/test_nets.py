"""The generated nets: checked-in prototxt, input pipeline, geometry, factorized head."""
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from ctxpred.models.context import (MEAN_RGB, NET_NAMES, NetOptions, data_layer_params, deploy_net,
                          generated_files, train_net)
from ctxpred.data.layer import close_data_layers
from ctxpred.data.preprocess import (PROJECTION_AXIS, apply_augmentations, crop_patches,
                                     draw_augmentations)
from ctxpred.weights.surgery import load_weights, net_weights, to_factorized_head, to_reference_head

REPO = Path(__file__).resolve().parents[2]


def test_checked_in_prototxt_equals_generated():
    for relative, text in generated_files().items():
        path = REPO / "prototxt" / relative
        assert path.exists(), f"{path} missing: run python tools/make_prototxt.py"
        assert path.read_text() == text, f"{path} is stale: run python tools/make_prototxt.py"
    checked_in = {p.relative_to(REPO / "prototxt").as_posix()
                  for p in (REPO / "prototxt").rglob("*") if p.is_file()}
    assert checked_in == set(generated_files()), "prototxt/ holds files the code does not generate"


def write(tmp_path, proto, name):
    path = tmp_path / name
    path.write_text(str(proto))
    return str(path)


def reference_conv1_input(patches, aug, colour):
    """The reference pipeline in plain numpy/OpenCV, patch by patch (float32)."""
    a = np.asarray(PROJECTION_AXIS, np.float64)
    projection = np.eye(3) - np.outer(a, a) / a.dot(a)
    outputs = []
    for index, patch in enumerate(patches.astype(np.float32)):
        side = aug.resample_side[index]
        if side:
            small = cv2.resize(patch, (side, side), interpolation=cv2.INTER_LINEAR)
            patch = cv2.resize(small, (96, 96), interpolation=cv2.INTER_LINEAR)
        if colour == "color_dropping":
            kept = aug.kept_channel[index]
            out = np.empty((96, 96, 3), np.float64)
            out[..., kept] = patch[..., kept] - patch[..., kept].mean()
            others = [c for c in range(3) if c != kept]
            out[..., others] = aug.noise[index].transpose(1, 2, 0)
        else:
            out = (patch - np.asarray(MEAN_RGB)) @ projection.T
        out = out / np.sqrt(np.mean(out ** 2)) * 50
        outputs.append(out.transpose(2, 0, 1))
    return np.stack(outputs)


@pytest.mark.parametrize("net_name", ["color_dropping", "projection"])
def test_numbers_reaching_conv1_equal_reference(caffe, tmp_path, net_name):
    colour = "projection" if net_name == "projection" else "color_dropping"
    image = skimage.data.astronaut()
    corners = np.array([[0, 0], [100, 150], [300, 40], [200, 400], [10, 300], [400, 400]])
    patches = crop_patches(image, corners, 96)
    rng = np.random.default_rng(4)
    aug = draw_augmentations(len(patches), rng, resample_probability=0.5, mode=colour)
    assert 0 < np.count_nonzero(aug.resample_side) < len(patches)
    loader_output = apply_augmentations(patches, aug, MEAN_RGB)

    net = caffe.Net(write(tmp_path, deploy_net(net_name), "deploy.prototxt"), caffe.TEST)
    net.blobs["data"].reshape(*loader_output.shape)
    net.blobs["data"].data[...] = loader_output
    net.forward(end="conv1")
    conv1_input = net.blobs["data_normalised"].data
    expected = reference_conv1_input(patches, aug, colour)
    np.testing.assert_allclose(conv1_input, expected, rtol=1e-4, atol=2e-3)
    rms = np.sqrt((conv1_input.reshape(len(patches), -1) ** 2).mean(axis=1))
    np.testing.assert_allclose(rms, 50, rtol=1e-5)
    if net_name == "projection":
        along_a = np.tensordot(np.asarray(PROJECTION_AXIS, np.float32), conv1_input, axes=(0, 1))
        assert np.abs(along_a).max() < 1e-3


@pytest.mark.parametrize("net_name", NET_NAMES)
def test_deploy_net_geometry_and_names(caffe, tmp_path, net_name):
    net = caffe.Net(write(tmp_path, deploy_net(net_name), "deploy.prototxt"), caffe.TEST)
    assert net.blobs["data"].data.shape == (1, 3, 96, 96)
    assert net.blobs["fc6"].data.shape == (1, 4096)
    assert "BatchNorm" not in {layer.type for layer in net.layers}
    pool5_shape = net.blobs["pool5"].data.shape
    assert pool5_shape == ((1, 512, 3, 3) if net_name == "vgg" else (1, 256, 3, 3))
    if net_name != "vgg":
        assert list(net.params) == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6"]
        assert net.blobs["conv1"].data.shape == (1, 96, 24, 24)
        assert net.blobs["norm1"].data.shape == (1, 96, 12, 12)
        assert net.blobs["norm2"].data.shape == (1, 256, 6, 6)
    else:
        assert len([name for name in net.params if name.startswith("conv")]) == 13


def test_train_net_layers_follow_reference_names():
    proto = train_net("color_dropping", data_layer_params("color_dropping", "unused"))
    names = [layer.name for layer in proto.layer]
    for name in ("conv1", "pool1", "norm1", "pool2", "norm2", "conv5", "pool5", "fc6", "fc7",
                 "fc8", "fc9", "bn3", "bn4", "bn5", "bn6", "bn7", "relu1", "relu8"):
        assert name in names
    batchnorms = [layer for layer in proto.layer if layer.type == "BatchNorm"]
    assert all(p.lr_mult == 0 for layer in batchnorms for p in layer.param)
    assert "Scale" not in {layer.type for layer in proto.layer if layer.name != "data_normalised"}
    loss = next(layer for layer in proto.layer if layer.type == "SoftmaxWithLoss")
    assert loss.loss_param.normalization == loss.loss_param.NONE
    no_bn = train_net("color_dropping", data_layer_params("color_dropping", "unused"),
                      NetOptions(batchnorm=False))
    assert [layer.name for layer in no_bn.layer if layer.type == "BatchNorm"] == ["bn7"]


def test_factorized_head_gives_same_loss_and_gradients(caffe, tmp_path, photo_folder):
    params = data_layer_params("color_dropping", str(photo_folder), seed=9, workers=1,
                               max_patches=48)
    reference = caffe.Net(write(tmp_path, train_net("color_dropping", params), "ref.prototxt"),
                          caffe.TRAIN)
    factorized = caffe.Net(write(tmp_path, train_net(
        "color_dropping", params, NetOptions(factorized_head=True)), "fact.prototxt"), caffe.TRAIN)
    weights = net_weights(reference)
    load_weights(factorized, to_factorized_head(weights))
    for net in (reference, factorized):
        net.forward()
        net.backward()
    assert len(reference.blobs["label"].data) > 10
    np.testing.assert_array_equal(reference.blobs["label"].data, factorized.blobs["label"].data)
    loss = float(reference.blobs["loss"].data)
    assert float(factorized.blobs["loss"].data) == pytest.approx(loss, rel=1e-4)
    def relative_error(got, expected):
        # A norm, not elementwise: float rounding can flip a few ReLUs near 0.
        return np.linalg.norm(got - expected) / np.linalg.norm(expected)

    # conv1 sits below four BatchNorm layers whose batch statistics amplify rounding
    # differences of the two heads: measured up to 1.9e-3 under a loaded machine.
    for name, tolerance in (("conv1", 5e-3), ("conv5", 1e-3), ("fc6", 1e-3), ("fc8", 1e-3),
                            ("fc9", 1e-3)):
        assert relative_error(factorized.params[name][0].diff,
                              reference.params[name][0].diff) < tolerance, name
    fc7_diff = {name: [blob.diff for blob in factorized.params[name]]
                for name in ("fc7_first", "fc7_second")}
    joined_weight_diff, _ = to_reference_head(fc7_diff)["fc7"]
    assert relative_error(joined_weight_diff, reference.params["fc7"][0].diff) < 1e-3
    # fc7's bias is cancelled by bn7's mean subtraction: its gradient is
    # rounding noise in both heads, so it is not compared.
    # And back: the converted weights are the original ones, bit for bit.
    round_trip = to_reference_head(net_weights(factorized))
    assert all(a.tobytes() == b.tobytes()
               for a, b in zip(round_trip["fc7"], weights["fc7"]))
    close_data_layers(reference)
    close_data_layers(factorized)


def test_paper_solver_variant_has_momentum():
    files = generated_files()
    assert "momentum: 0\n" in files["color_dropping/solver.prototxt"]
    assert "momentum: 0.999\n" in files["color_dropping/solver_paper.prototxt"]
    for text in (files["vgg/solver.prototxt"], files["projection/solver_paper.prototxt"]):
        assert 'base_lr: 1e-05\nlr_policy: "fixed"' in text and "snapshot: 2000" in text
        assert "weight_decay: 0\n" in text


def test_convert_head_tool_round_trips_snapshots(caffe, tmp_path, photo_folder):
    """A factorized snapshot converted to the reference layout loads into the
    reference net and gives the same loss on the same batch."""
    import subprocess
    import sys
    params = data_layer_params("color_dropping", str(photo_folder), seed=2, workers=1,
                               max_patches=40)
    factorized = caffe.Net(write(tmp_path, train_net(
        "color_dropping", params, NetOptions(factorized_head=True)), "fact.prototxt"), caffe.TRAIN)
    factorized.forward()  # fills BatchNorm statistics, saved with the weights
    factorized.save(str(tmp_path / "fact.caffemodel"))
    tool = [sys.executable, str(REPO / "tools" / "convert_head.py")]
    for source, target in (("fact.caffemodel", "ref.caffemodel.h5"),
                           ("ref.caffemodel.h5", "back.caffemodel")):
        result = subprocess.run([*tool, str(tmp_path / source), str(tmp_path / target)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    reference = caffe.Net(write(tmp_path, train_net("color_dropping", params), "ref.prototxt"),
                          caffe.TRAIN, weights=str(tmp_path / "ref.caffemodel.h5"))
    again = caffe.Net(str(tmp_path / "fact.prototxt"), caffe.TRAIN,
                      weights=str(tmp_path / "back.caffemodel"))
    for name in factorized.params:
        for original, restored in zip(factorized.params[name], again.params[name]):
            assert original.data.tobytes() == restored.data.tobytes()
    losses = []
    for net in (reference, again):
        net.forward()
        losses.append(float(net.blobs["loss"].data))
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    for net in (factorized, reference, again):
        close_data_layers(net)
    bad = subprocess.run([*tool, str(tmp_path / "missing.caffemodel"), str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "missing.caffemodel does not exist" in bad.stderr


def conv_geometry(proto):
    """{conv name: (outputs, kernel, stride)} of a NetParameter's convolutions."""
    return {layer.name: (layer.convolution_param.num_output,
                         tuple(layer.convolution_param.kernel_size),
                         tuple(layer.convolution_param.stride) or (1,))
            for layer in proto.layer if layer.type == "Convolution"}


def test_every_net_has_the_same_backbone_convolutions():
    """The context towers, Fast R-CNN, classification and deploy nets share one body each."""
    from ctxpred.models import backbones, classification, fast_rcnn
    params = data_layer_params("color_dropping", "unused")
    caffenets = [backbones.caffenet_deploy(), train_net("color_dropping", params),
                 fast_rcnn.train_net("CaffeNetGroupless"),
                 classification.train_net("caffenet", "fc")]
    vggs = [backbones.vgg16_deploy(), train_net("vgg", params),
            fast_rcnn.train_net("VGGContext"), classification.train_net("vgg16", "all")]
    for nets, names in ((caffenets, backbones.CAFFENET_CONV_NAMES),
                        (vggs, backbones.VGG16_CONV_NAMES)):
        geometries = [conv_geometry(net) for net in nets]
        assert tuple(geometries[0]) == names
        assert all(geometry == geometries[0] for geometry in geometries[1:])
    assert conv_geometry(caffenets[0])["conv1"] == (96, (11,), (4,))
    assert conv_geometry(vggs[0])["conv5_3"] == (512, (3,), (1,))


def test_backbone_options_in_caffe(caffe, tmp_path):
    """Fast R-CNN's CaffeNet options (conv1 pad 5, pool pad 1, no pool5, conv1 frozen) and a
    bias-free layer: the shapes Caffe gives and the param written per layer."""
    from ctxpred.models.backbones import (FROZEN, LEARNED, Learning, caffenet_convs,
                                          image_input, inner_product)
    learning = Learning(trained=LEARNED, frozen=("conv1",))
    n = caffe.NetSpec()
    conv5 = caffenet_convs(n, image_input(n, 2, 227), learning, conv1_pad=5, pool_pad=1,
                           pool5=False)
    inner_product(n, "scores", conv5, 3, learning, bias_term=False)
    proto = n.to_proto()
    layers = {layer.name: layer for layer in proto.layer}
    assert [dict(lr_mult=p.lr_mult, decay_mult=p.decay_mult) for p in layers["conv1"].param] == [
        FROZEN, FROZEN]
    assert len(layers["conv2"].param) == 2 and layers["conv2"].param[1].lr_mult == 2
    assert len(layers["scores"].param) == 1 and "pool5" not in layers
    net = caffe.Net(write(tmp_path, proto, "body.prototxt"), caffe.TEST)
    assert net.blobs["conv1"].data.shape == (2, 96, 57, 57)  # (227 + 2 * 5 - 11) // 4 + 1
    assert net.blobs["pool1"].data.shape == (2, 96, 29, 29)  # ceil((57 + 2 - 3) / 2) + 1
    assert net.blobs["conv5"].data.shape == (2, 256, 15, 15)
    assert [blob.data.shape for blob in net.params["scores"]] == [(3, 256 * 15 * 15)]
