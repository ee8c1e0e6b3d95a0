"""Deployment surgery: BatchNorm folding, groupless conversion, "no fc6" models, inspection.

The model is the real colour-dropping train net (96x96 patches, random
init) after three TRAIN forward passes on real photos, which fill
BatchNorm's statistics (scale factor about 3, so mean / s matters).
"""
import re
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import skimage.transform

from ctxpred.models import backbones as detection_nets
from ctxpred.models.backbones import caffenet_deploy
from ctxpred.data.layer import close_data_layers
from ctxpred.models.context import MEAN_RGB, NetOptions, data_layer_params, deploy_net, train_net
from ctxpred.data.preprocess import crop_patches
from ctxpred.weights.surgery import (batchnorm_pairs, compare_shapes, drop_layers_from,
                                     fold_batchnorm, groupless_net, groupless_weights,
                                     load_weights)
from ctxpred.caffe.netparam import read_net_param, weight_shapes
from ctxpred.weights.files import read_weights, write_weights

REPO = Path(__file__).resolve().parents[2]
PROTOTXT = REPO / "prototxt"
CONVS = ("conv1", "conv2", "conv3", "conv4", "conv5")
PAIR_HEAD = ("fc6", "bn6", "fc7", "bn7", "fc8", "fc9")
Snapshot = namedtuple("Snapshot", "prototxt model weights")


def run_tools(*commands):
    """Run tools/<name> args... for each (name, *args) side by side; CompletedProcesses."""
    processes = [subprocess.Popen([sys.executable, str(REPO / "tools" / name), *map(str, args)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=REPO) for name, *args in commands]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout,
                                                   stderr))
    return results


def run_tool(name, *args):
    return run_tools((name, *args))[0]


def write(path, proto):
    path.write_text(str(proto))
    return path


@pytest.fixture(scope="module")
def snapshot(caffe, tmp_path_factory, photo_folder):
    """Train prototxt, caffemodel and its weights (read-only) of the colour-dropping
    net after 3 TRAIN passes."""
    folder = tmp_path_factory.mktemp("snapshot")
    params = data_layer_params("color_dropping", str(photo_folder), seed=3, workers=1,
                               max_patches=40)
    prototxt = write(folder / "train.prototxt", train_net("color_dropping", params))
    net = caffe.Net(str(prototxt), caffe.TRAIN)
    try:
        for _ in range(3):
            net.forward()
        net.save(str(folder / "model.caffemodel"))
    finally:
        close_data_layers(net)
    model = folder / "model.caffemodel"
    return Snapshot(prototxt, model, read_weights(model))


def photo_patches():
    """Six mean-subtracted 96x96 RGB patches of two real photos, (6, 3, 96, 96) float32."""
    corners = np.array([[0, 0], [100, 150], [200, 40]])
    patches = np.concatenate([crop_patches(getattr(skimage.data, name)(), corners, 96)
                              for name in ("astronaut", "chelsea")])
    return (patches.astype(np.float32) - np.float32(MEAN_RGB)).transpose(0, 3, 1, 2)


def fc6_of(caffe, prototxt, weights, patches):
    net = caffe.Net(str(prototxt), caffe.TEST)
    load_weights(net, {name: weights[name] for name in net.params})
    net.blobs["data"].reshape(*patches.shape)
    net.blobs["data"].data[...] = patches
    net.forward()
    return net.blobs["fc6"].data.copy()


def test_folded_deploy_net_reproduces_batchnorm_net(caffe, snapshot, tmp_path):
    prototxt, model, original = snapshot
    result = run_tool("debatchnorm.py", prototxt, model, PROTOTXT / "color_dropping" /
                      "deploy.prototxt", tmp_path / "folded.caffemodel")
    assert result.returncode == 0, result.stderr
    for name in ("bn3", "bn4", "bn5", "bn6"):
        assert f"folded {name} into" in result.stdout
    folded = read_weights(tmp_path / "folded.caffemodel")
    assert list(folded) == [*CONVS, "fc6"]

    patches = photo_patches()
    bn_deploy = write(tmp_path / "bn_deploy.prototxt",
                      deploy_net("color_dropping", NetOptions(batchnorm=True)))
    expected = fc6_of(caffe, bn_deploy, original, patches)  # TEST phase: global statistics
    actual = fc6_of(caffe, PROTOTXT / "color_dropping" / "deploy.prototxt", folded, patches)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * scale)
    # Not vacuous: without folding, the BatchNorm-free net computes something else.
    unfolded = fc6_of(caffe, PROTOTXT / "color_dropping" / "deploy.prototxt", original, patches)
    assert np.abs(unfolded - expected).max() > 0.1 * scale


def test_fold_formula_and_what_stays(snapshot):
    prototxt, _, weights = snapshot
    net_param = read_net_param(prototxt)
    pairs = [(layer.name, batchnorm.name) for layer, batchnorm in batchnorm_pairs(net_param)]
    assert pairs == [("conv3", "bn3"), ("conv4", "bn4"), ("conv5", "bn5"), ("fc6", "bn6")]
    folded = fold_batchnorm(weights, net_param)
    assert list(folded) == [*CONVS, "fc6", "fc7", "bn7", "fc8", "fc9"]  # bn7 stays
    for name in ("conv1", "conv2", "fc7", "bn7", "fc8", "fc9"):
        assert all(a is b for a, b in zip(folded[name], weights[name]))
    (weight, bias), (mean, var, factor) = weights["conv4"], weights["bn4"]
    std = np.sqrt(var / factor[0] + 1e-5)
    np.testing.assert_allclose(folded["conv4"][0], weight / std[:, None, None, None], rtol=1e-5)
    np.testing.assert_allclose(folded["conv4"][1], bias / std - mean / factor[0] / std,
                               rtol=1e-5, atol=1e-6)
    # The factorized head has no fc/BatchNorm pair after the fusion either.
    factorized = train_net("color_dropping", data_layer_params("color_dropping", "unused"),
                           NetOptions(factorized_head=True))
    assert [bn.name for _, bn in batchnorm_pairs(factorized)] == ["bn3", "bn4", "bn5", "bn6"]


def test_fold_errors_name_the_layers(snapshot):
    prototxt, _, weights = snapshot
    net_param = read_net_param(prototxt)
    unfilled = dict(weights, bn5=[weights["bn5"][0], weights["bn5"][1], np.zeros(1, np.float32)])
    with pytest.raises(ValueError, match="bn5 holds no statistics"):
        fold_batchnorm(unfilled, net_param)
    wrong = dict(weights, bn4=[array[:10] for array in weights["bn4"][:2]] + [weights["bn4"][2]])
    with pytest.raises(ValueError, match="bn4 has statistics of 10 .* conv4 has 384 outputs"):
        fold_batchnorm(wrong, net_param)
    with pytest.raises(ValueError, match="no bn6, needed to fold bn6 into fc6"):
        fold_batchnorm({k: v for k, v in weights.items() if k != "bn6"}, net_param)
    # A pair absent altogether (a "no fc6" model) is nothing to fold.
    no_fc6 = fold_batchnorm({k: v for k, v in weights.items() if k not in PAIR_HEAD}, net_param)
    assert list(no_fc6) == list(CONVS)


def small_grouped_net(caffe):
    """A grouped CaffeNet-like net with unusual names, groups 2 and 4, on 67x67 input."""
    n = caffe.NetSpec()
    n.data = caffe.layers.Input(shape=dict(dim=[1, 3, 67, 67]))
    n.stem = caffe.layers.Convolution(n.data, num_output=24, kernel_size=7, stride=2)
    n.stem_relu = caffe.layers.ReLU(n.stem, in_place=True)
    n.pool = caffe.layers.Pooling(n.stem, pool=caffe.params.Pooling.MAX, kernel_size=3, stride=2)
    n.lrn = caffe.layers.LRN(n.pool, local_size=5, alpha=1e-4, beta=0.75)
    n.mix_a = caffe.layers.Convolution(n.lrn, num_output=48, kernel_size=5, pad=2, group=2)
    n.mix_relu = caffe.layers.ReLU(n.mix_a, in_place=True)
    n.b4x = caffe.layers.Convolution(n.mix_a, num_output=36, kernel_size=3, pad=1, group=4)
    n.b4x_relu = caffe.layers.ReLU(n.b4x, in_place=True)
    n.head = caffe.layers.InnerProduct(n.b4x, num_output=10)
    return n.to_proto()


def test_groupless_tool_keeps_outputs(caffe, tmp_path, rng):
    prototxt = write(tmp_path / "grouped.prototxt", small_grouped_net(caffe))
    grouped = caffe.Net(str(prototxt), caffe.TEST)
    weights = {name: [(rng.standard_normal(blob.data.shape) * np.sqrt(2 / blob.data[0].size))
                      .astype(np.float32) for blob in blobs]
               for name, blobs in grouped.params.items()}
    load_weights(grouped, weights)
    assert weights["mix_a"][0].shape == (48, 12, 5, 5) and weights["b4x"][0].shape == (36, 12, 3, 3)
    write_weights(weights, tmp_path / "grouped.caffemodel")
    result = run_tool("groupless.py", "--prototxt", prototxt, "--weights",
                      tmp_path / "grouped.caffemodel", "--out-prototxt",
                      tmp_path / "out.prototxt", "--out-weights", tmp_path / "out.caffemodel")
    assert result.returncode == 0, result.stderr
    assert "mix_a: group 2 -> 1" in result.stdout and "b4x: group 4 -> 1" in result.stdout
    groupless = caffe.Net(str(tmp_path / "out.prototxt"), caffe.TEST,
                          weights=str(tmp_path / "out.caffemodel"))
    converted = groupless.params["b4x"][0].data
    assert converted.shape == (36, 48, 3, 3)
    assert np.array_equal(converted[9:18, 12:24], weights["b4x"][0][9:18])
    assert not converted[9:18, :12].any() and not converted[9:18, 24:].any()

    photo = skimage.transform.resize(skimage.data.coffee(), (67, 67), preserve_range=True)
    image = (photo - MEAN_RGB).transpose(2, 0, 1)[None].astype(np.float32)
    for net in (grouped, groupless):
        net.blobs["data"].data[...] = image
        net.forward()
    for blob in ("mix_a", "b4x", "head"):
        expected = grouped.blobs[blob].data
        assert np.abs(expected).max() > 1e-3
        np.testing.assert_allclose(groupless.blobs[blob].data, expected, rtol=1e-5,
                                   atol=1e-5 * np.abs(expected).max())


def test_groupless_caffenet_is_caffenet_without_groups():
    groupless = caffenet_deploy(group=1)
    assert list(groupless_net(caffenet_deploy(group=2)).layer) == list(groupless.layer)
    grouped = {layer.name for layer in caffenet_deploy(group=2).layer
               if layer.type == "Convolution" and layer.convolution_param.group == 2}
    assert grouped == {"conv2", "conv4", "conv5"}
    with pytest.raises(ValueError, match="layer conv2: weights of shape 255x48x5x5 do not split"):
        groupless_weights({"conv2": [np.zeros((255, 48, 5, 5), np.float32)]},
                          caffenet_deploy(group=2))


def test_checked_in_detection_prototxt_equals_generated():
    for relative, text in detection_nets.generated_files().items():
        path = PROTOTXT / relative
        assert path.exists(), f"{path} missing: regenerate with python tools/make_prototxt.py"
        assert path.read_text() == text, f"{path} is stale: run python tools/make_prototxt.py"


def test_detection_net_shapes(caffe, tmp_path):
    def shapes_of(prototxt):
        return weight_shapes(caffe.Net(str(prototxt), caffe.TEST))

    shapes = shapes_of(PROTOTXT / "groupless_caffenet.prototxt")
    assert shapes["conv1"][0] == (96, 3, 11, 11) and shapes["conv2"][0] == (256, 96, 5, 5)
    assert shapes["conv4"][0] == (384, 384, 3, 3) and shapes["conv5"][0] == (256, 384, 3, 3)
    assert shapes["fc6"][0] == (4096, 9216) and shapes["fc8"][0] == (1000, 4096)
    vgg16 = shapes_of(PROTOTXT / "vgg16.prototxt")
    context_vgg = shapes_of(write(tmp_path / "vgg.prototxt", deploy_net("vgg")))
    assert [name for name in vgg16 if name.startswith("conv")] == list(context_vgg)[:-1]
    report = compare_shapes(vgg16, {name: [np.zeros(shape) for shape in blobs]
                                    for name, blobs in context_vgg.items()})
    assert list(report.different) == ["fc6"] and report.missing == ("fc7", "fc8")
    assert vgg16["fc6"][0] == (4096, 25088) and context_vgg["fc6"][0] == (4096, 4608)


def test_no_fc6_model_loads_into_groupless_caffenet(caffe, snapshot, tmp_path):
    """The detection path: "no fc6" model, then folding into the groupless CaffeNet."""
    prototxt, model, weights = snapshot
    caffenet = PROTOTXT / "groupless_caffenet.prototxt"
    result = run_tool("make_no_fc6.py", model, tmp_path / "no_fc6.caffemodel")
    assert result.returncode == 0, result.stderr
    assert "dropped: fc6, bn6, fc7, bn7, fc8, fc9" in result.stdout
    no_fc6 = read_weights(tmp_path / "no_fc6.caffemodel")
    assert list(no_fc6) == ["conv1", "conv2", "conv3", "bn3", "conv4", "bn4", "conv5", "bn5"]
    by_definition = drop_layers_from(weights, "fc6", read_net_param(prototxt))
    assert list(by_definition) == list(no_fc6) and set(weights) - set(no_fc6) == set(PAIR_HEAD)

    folded = tmp_path / "no_fc6_folded.caffemodel"
    result = run_tool("debatchnorm.py", prototxt, tmp_path / "no_fc6.caffemodel", caffenet, folded)
    assert result.returncode == 0, result.stderr
    assert "no weights for fc6, fc7, fc8" in result.stdout
    net = caffe.Net(str(caffenet), caffe.TEST)
    report = compare_shapes(weight_shapes(net), read_weights(folded))
    assert report.missing == ("fc6", "fc7", "fc8") and not report.unused and not report.different
    net = caffe.Net(str(caffenet), caffe.TEST, weights=str(folded))
    expected = fold_batchnorm(weights, read_net_param(prototxt))
    for name in CONVS:
        for blob, array in zip(net.params[name], expected[name]):
            np.testing.assert_array_equal(blob.data, array)


def test_inspect_lists_layers_and_reports_mismatches(snapshot, tmp_path):
    prototxt, model, weights = snapshot
    result = run_tool("inspect_caffemodel.py", model, "--prototxt",
                      PROTOTXT / "groupless_caffenet.prototxt")
    assert re.search(r"^fc7 +4096x8192, 4096 +33,558,528$", result.stdout, re.M)
    assert re.search(r"^bn3 +384, 384, 1 +769$", result.stdout, re.M)
    total = sum(a.size for arrays in weights.values() for a in arrays)
    assert f"total: {total:,} parameters in 14 layers" in result.stdout
    assert result.returncode == 1, result.stderr
    assert ("the weights have bn3, bn4, bn5, bn6, bn7, fc9 without a layer in the net"
            in result.stdout)
    assert ("layer fc6: the net's blobs have shapes 4096x9216, 4096, the weights 4096x2304, 4096"
            in result.stdout)
    assert "layer fc7:" in result.stdout and "layer conv1" not in result.stdout

    folded = fold_batchnorm(weights, read_net_param(prototxt))
    write_weights({name: folded[name] for name in (*CONVS, "fc6")}, tmp_path / "f.h5")
    deploy = PROTOTXT / "color_dropping" / "deploy.prototxt"
    fits = run_tool("inspect_caffemodel.py", tmp_path / "f.h5", "--prototxt", deploy)
    assert fits.returncode == 0 and "fits" in fits.stdout


@pytest.mark.parametrize("tool", ["inspect_caffemodel.py", "debatchnorm.py", "groupless.py",
                                  "make_no_fc6.py"])
def test_help_explains_every_flag(tool):
    result = run_tool(tool, "--help")
    assert result.returncode == 0
    assert "Example" in result.stdout and "usage:" in result.stdout


def test_bad_input_fails_with_named_file_or_layer(snapshot, tmp_path):
    prototxt, model, _ = snapshot
    junk = tmp_path / "junk.caffemodel"
    junk.write_bytes(b"\xff" * 100)
    deploy = PROTOTXT / "color_dropping" / "deploy.prototxt"
    caffenet = write(tmp_path / "caffenet.prototxt", caffenet_deploy(group=2))
    ungrouped = tmp_path / "ungrouped.caffemodel"  # groupless conv2 for a grouped net
    write_weights({"conv2": [np.zeros((256, 96, 5, 5), np.float32), np.zeros(256, np.float32)],
                   "bn3": [np.zeros(384, np.float32)] * 2 + [np.ones(1, np.float32)]}, ungrouped)
    roi = tmp_path / "fast_rcnn.prototxt"  # a layer type stock Caffe lacks: Caffe would abort
    roi.write_text('layer { name: "data" type: "Input" top: "data" '
                   'input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }\n'
                   'layer { name: "roi_pool5" type: "ROIPooling" bottom: "data" top: "pool" }\n')
    cases = [
        (("inspect_caffemodel.py", tmp_path / "missing.caffemodel"),
         "missing.caffemodel does not exist"),
        (("inspect_caffemodel.py", junk), "junk.caffemodel is not a Caffe model"),
        (("inspect_caffemodel.py", ungrouped, "--prototxt", roi),
         f"{roi}: layer 'roi_pool5' has type 'ROIPooling', which this Caffe build does not have"),
        (("debatchnorm.py", junk, model, deploy, tmp_path / "o.caffemodel"),
         "junk.caffemodel is not a Caffe net definition"),
        # The folded colour-dropping weights against CaffeNet: fc6 has other shapes.
        (("debatchnorm.py", prototxt, model, PROTOTXT / "groupless_caffenet.prototxt",
          tmp_path / "o.caffemodel"), "layer fc6: the net's blobs have shapes 4096x9216"),
        (("groupless.py", "--prototxt", caffenet, "--weights", ungrouped, "--out-prototxt",
          tmp_path / "g.prototxt", "--out-weights", tmp_path / "o.caffemodel"),
         "layer conv2: the net's blobs have shapes 256x48x5x5, 256, the weights 256x96x5x5, 256"),
        (("make_no_fc6.py", ungrouped, tmp_path / "o.caffemodel", "--first", "fc10"),
         "fc10 is not in the weights"),
    ]
    for (args, message), result in zip(cases, run_tools(*(args for args, _ in cases))):
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "stack trace" not in result.stderr  # no Caffe abort in the tool's process
    assert not (tmp_path / "o.caffemodel").exists()
    # The same checks, in the library.
    with pytest.raises(FileNotFoundError, match="nope.prototxt does not exist"):
        read_net_param(tmp_path / "nope.prototxt")
    with pytest.raises(ValueError, match="the weights have bn3, which the net definition lacks"):
        drop_layers_from(read_weights(ungrouped), "conv3", read_net_param(deploy))


def test_load_params_names_every_mismatch(caffe, tmp_path):
    net = caffe.Net(str(PROTOTXT / "color_dropping" / "deploy.prototxt"), caffe.TEST)
    weights = {name: [blob.data.copy() for blob in blobs] for name, blobs in net.params.items()}
    weights["conv1"] = [np.zeros_like(array) for array in weights["conv1"]]
    weights["conv2"] = [np.zeros((256, 48, 5, 5), np.float32), weights["conv2"][1]]
    weights["fc6"] = [np.zeros((4096, 9216), np.float32), weights["fc6"][1]]
    with pytest.raises(ValueError) as error:
        load_weights(net, weights)
    message = str(error.value)
    for line in ("layer conv2: the net's blobs have shapes 256x96x5x5, 256, "
                 "the weights 256x48x5x5, 256",
                 "layer fc6: the net's blobs have shapes 4096x2304, 4096, "
                 "the weights 4096x9216, 4096"):
        assert line in message
    assert net.params["conv1"][0].data.any()  # nothing copied before the check
