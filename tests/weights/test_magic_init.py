"""Magic init (data-dependent initialisation) on real Caffe nets and real photos.

Most checks use small nets on 32x32 input; the project page's command runs
once on the full groupless CaffeNet (227x227) with a "no fc6" context model
made by the project's own tools.
"""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from ctxpred.weights import magic_init_reference as reference
from ctxpred.data.layer import close_data_layers
from ctxpred.weights.magic_init import (MEAN_BGR, TYPES, MagicInitError, MagicInitSettings,
                                        NetUnderInit, analysis_net,
                                        image_batches, input_size)
from ctxpred.models.context import data_layer_params, train_net
from ctxpred.caffe.netparam import instantiate, read_net_param
from ctxpred.weights.files import read_weights, write_weights

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "magic_init.py"
SIDE = 32
PHOTOS = ("astronaut", "coffee", "rocket", "chelsea", "immunohistochemistry",
          "hubble_deep_field", "colorwheel", "retina")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Glob of eight real photos from scikit-image, as JPEG files."""
    folder = tmp_path_factory.mktemp("magic_photos")
    for name in PHOTOS:
        Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{name}.jpg", quality=90)
    return str(folder / "*.jpg")


def run_tools(*argument_lists):
    """Run tools/magic_init.py (or another tool, when the first argument is a .py) side by side."""
    processes = []
    for arguments in argument_lists:
        arguments = [str(argument) for argument in arguments]
        script = REPO / "tools" / arguments.pop(0) if arguments[0].endswith(".py") else TOOL
        processes.append(subprocess.Popen([sys.executable, str(script), *arguments], cwd=REPO,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=180)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout,
                                                   stderr))
    return results


def write(path, proto):
    path.write_text(str(proto))
    return path


def chain_net(caffe, batch=4, fc3_outputs=6):
    """ReLU / max-pooling net with a grouped conv: positively homogeneous (Dropout left out)."""
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[batch, 3, SIDE, SIDE]))
    n.conv1 = L.Convolution(n.data, num_output=12, kernel_size=5, stride=2)
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.conv1, pool=caffe.params.Pooling.MAX, kernel_size=2, stride=2)
    n.conv2 = L.Convolution(n.pool1, num_output=16, kernel_size=3, pad=1, group=2)
    n.relu2 = L.ReLU(n.conv2, in_place=True)
    n.fc3 = L.InnerProduct(n.conv2, num_output=fc3_outputs)
    n.relu3 = L.ReLU(n.fc3, in_place=True)
    n.drop3 = L.Dropout(n.fc3, dropout_ratio=0.5, in_place=True)
    n.fc4 = L.InnerProduct(n.fc3, num_output=5)
    n.prob = L.Softmax(n.fc4)
    return n.to_proto()


def mixed_net(caffe, batch=4):
    """Every supported kind of layer: LRN, a blob read twice (Caffe's Split), Eltwise,
    Sigmoid, a grouped Deconvolution, a Dropout that is not in place; no in-place layers
    after parameter layers, so that a full forward keeps every pre-activation."""
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[batch, 3, SIDE, SIDE]))
    n.conv1 = L.Convolution(n.data, num_output=8, kernel_size=5, stride=2)
    n.relu1 = L.ReLU(n.conv1)
    n.pool1 = L.Pooling(n.relu1, pool=caffe.params.Pooling.MAX, kernel_size=2, stride=2)
    n.norm1 = L.LRN(n.pool1, local_size=5, alpha=1e-4, beta=0.75)
    n.conv2a = L.Convolution(n.norm1, num_output=8, kernel_size=3, pad=1)
    n.conv2b = L.Convolution(n.norm1, num_output=8, kernel_size=1)
    n.sum = L.Eltwise(n.conv2a, n.conv2b)
    n.sig = L.Sigmoid(n.sum)
    n.up = L.Deconvolution(n.sig, convolution_param=dict(num_output=4, kernel_size=2, stride=2,
                                                          group=2))
    n.relu_up = L.ReLU(n.up)
    n.fc = L.InnerProduct(n.relu_up, num_output=6)
    n.relu_fc = L.ReLU(n.fc)
    n.drop = L.Dropout(n.relu_fc, dropout_ratio=0.5)
    n.out = L.InnerProduct(n.drop, num_output=3)
    n.prob = L.Softmax(n.out)
    return n.to_proto()


def subject_for(caffe, net_param, photos, batches=2, batch=4, dropout="identity"):
    """(NetUnderInit, batches) of ``net_param`` fed with the photos; Dropout the identity by
    default, so that the checks below are deterministic and exact."""
    analysis, _ = analysis_net(net_param, (batch, 3, SIDE, SIDE), dropout)
    feed = [{"data": array} for array in
            image_batches(photos, batch, batches, (SIDE, SIDE), log=lambda _: None)]
    return NetUnderInit(instantiate(analysis, "train"), analysis, feed, log=lambda _: None), feed


def pre_activations(caffe, prototxt, model, images):
    """{blob: array} after a TEST-phase forward of ``images`` with the weights of ``model``."""
    net = caffe.Net(str(prototxt), caffe.TEST, weights=str(model))
    net.blobs["data"].reshape(*images.shape)
    net.forward(data=images)
    return {name: blob.data.copy() for name, blob in net.blobs.items()}, net


def channel_stats(array):
    values = np.moveaxis(array, 1, 0).reshape(array.shape[1], -1).astype(np.float64)
    return values.mean(axis=1), values.std(axis=1)


def test_initialised_pre_activations_have_bias_mean_and_unit_std(caffe, photos, tmp_path):
    prototxt = write(tmp_path / "mixed.prototxt", mixed_net(caffe))
    model = tmp_path / "mixed.caffemodel"
    result, = run_tools(["-q", "-d", photos, "-bs", 4, "-nit", 4, "-b", 0.25,
                         "--dropout", "identity", prototxt, model])
    assert result.returncode == 0, result.stderr
    assert "left out Softmax layer prob" in result.stdout
    assert "Dropout layer drop is the identity" in result.stdout
    assert "pre-activation statistics: all 4 batches" in result.stdout
    # The tool draws -bs * -nit = 16 images, each of the 8 photos twice: the statistics
    # over those are the statistics over the 8 photos once.
    images, = image_batches(photos, len(PHOTOS), 1, (SIDE, SIDE))
    blobs, net = pre_activations(caffe, prototxt, model, images)
    for name in ("conv1", "conv2a", "conv2b", "up", "fc", "out"):
        mean, std = channel_stats(blobs[name])
        np.testing.assert_allclose(mean, 0.25, atol=1e-3, err_msg=name)
        np.testing.assert_allclose(std, 1.0, rtol=1e-3, err_msg=name)
    assert net.params["up"][0].data.shape == (8, 2, 2, 2)  # grouped Deconvolution's layout
    assert re.search(r"^conv1 +initialised \(elwise\) .* 0\.25 +1 ", result.stdout, re.M)


def test_calibration_equalises_gradient_ratios_and_keeps_the_function(caffe, photos):
    subject, feed = subject_for(caffe, chain_net(caffe), photos)
    net = subject.net
    subject.initialize(rng=np.random.default_rng(1), log=lambda _: None)

    def outputs():
        return [net.forward(data=batch["data"])["fc4"].copy() for batch in feed]

    before = outputs()
    calibration = subject.calibrate(rng=np.random.default_rng(2), log=lambda _: None)
    after = outputs()
    assert calibration.converged and 1 <= calibration.rounds <= 3
    spread = max(calibration.before.values()) / min(calibration.before.values())
    assert spread > 2  # not vacuous: the initialised layers' ratios differ a lot

    # Homogeneity: the calibrated net computes the same function up to a positive factor.
    old, new = np.concatenate(before).ravel(), np.concatenate(after).ravel()
    factor = old @ new / (old @ old)
    assert factor > 0
    np.testing.assert_allclose(new, factor * old, atol=1e-4 * np.abs(new).max())

    # Ratios measured here, on batch 0 with the diffs calibrate draws (documented).
    net.forward(data=feed[0]["data"])
    diff = np.random.default_rng(2).standard_normal(net.blobs["fc4"].data.shape,
                                                     dtype=np.float32)
    net.clear_param_diffs()
    net.backward(fc4=diff)
    ratios = {name: np.sqrt(np.mean(np.square(blobs[0].diff, dtype=np.float64))
                            / np.mean(np.square(blobs[0].data, dtype=np.float64)))
              for name, blobs in net.params.items()}
    assert list(ratios) == ["conv1", "conv2", "fc3", "fc4"]
    target = calibration.target
    for name, ratio in ratios.items():
        assert abs(np.log(ratio) / np.log(target) - 1) < 0.01, (name, ratio, target)
        assert ratio == pytest.approx(calibration.after[name], rel=1e-4)
    assert max(ratios.values()) / min(ratios.values()) < 1.01


def test_every_type_gives_finite_weights_and_normalised_outputs(caffe, photos):
    for kind in TYPES:
        subject, _ = subject_for(caffe, chain_net(caffe), photos)
        notes = []
        done = subject.initialize(bias=0.1, kind=kind, rng=np.random.default_rng(3),
                                  log=notes.append)
        if not kind.startswith("fast_"):  # one batch has too few samples for fc3
            assert done == dict.fromkeys(["conv1", "conv2", "fc3", "fc4"],
                                         f"initialised ({kind})"), (kind, notes)
        for name, blobs in subject.net.params.items():
            assert all(np.isfinite(blob.data).all() for blob in blobs), (kind, name)
            assert np.abs(blobs[0].data).sum() > 0, (kind, name)
        for name, stats in subject.statistics().items():
            np.testing.assert_allclose(stats.mean, 0.1, atol=1e-3, err_msg=f"{kind} {name}")
            np.testing.assert_allclose(stats.std, 1.0, rtol=1e-3, err_msg=f"{kind} {name}")
    subject, _ = subject_for(caffe, mixed_net(caffe), photos)
    with pytest.raises(MagicInitError, match="up is a Deconvolution, which only -t elwise"):
        subject.initialize(kind="pca", log=lambda _: None)


def test_pca_respects_groups(caffe, photos):
    """PCA whitening filters of a grouped conv decorrelate each group's outputs on the data,
    which holds only if each group's basis comes from its own input channels."""
    subject, feed = subject_for(caffe, chain_net(caffe), photos)
    subject.initialize(kind="pca", rng=np.random.default_rng(4), log=lambda _: None)
    net = subject.net
    assert net.params["conv2"][0].data.shape == (16, 6, 3, 3)
    pre = []
    for batch in feed:
        net.blobs["data"].data[...] = batch["data"]
        net._forward(0, list(net._layer_names).index("conv2"))  # stop before relu2 (in place)
        pre.append(net.blobs["conv2"].data.copy())
    values = np.moveaxis(np.concatenate(pre), 1, 0).reshape(16, -1)
    correlation = np.corrcoef(values)
    for group in (slice(0, 8), slice(8, 16)):
        np.testing.assert_allclose(correlation[group, group], np.eye(8), atol=1e-3)
    assert np.abs(correlation[:8, 8:]).max() > 0.05  # across groups: no such constraint


def test_patches_are_what_caffe_convolves_and_respect_the_memory_limit(caffe, photos, rng):
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[4, 3, SIDE, SIDE]))
    n.conv = L.Convolution(n.data, num_output=5, kernel_h=3, kernel_w=5, stride=2, pad_h=1,
                           pad_w=3, dilation=2)
    n.fc = L.InnerProduct(n.conv, num_output=2)
    subject, feed = subject_for(caffe, n.to_proto(), photos)
    weight, bias = (blob.data for blob in subject.net.params["conv"])
    weight[...] = rng.standard_normal(weight.shape)
    bias[...] = rng.standard_normal(bias.shape)
    index = list(subject.net._layer_names).index("conv")
    patches, store = subject._gather(index, False, 1 << 30, rng, subject.inputs)
    convolved = (patches @ weight.reshape(5, -1).T + bias).reshape(2, 4, 15, 15, 5)
    assert store.after == index - 1 and len(store.batches) == 2
    for batch, expected in zip(feed, convolved):
        subject.net.forward(data=batch["data"])
        np.testing.assert_allclose(subject.net.blobs["conv"].data,
                                   expected.transpose(0, 3, 1, 2), rtol=1e-4, atol=1e-3)
    budget = 300 * 4 * 3 * 3 * 5  # 300 patches of 3 x 3 x 5 floats
    patches, _ = subject._gather(index, False, budget, rng, subject.inputs)
    assert patches.shape == (300, 45)


def test_recomputing_instead_of_keeping_activations_changes_nothing(caffe, photos):
    """Below the memory limit, activations are forwarded again instead of kept: the same
    result up to float32 rounding (kept pre-activations are rescaled in numpy, recomputed
    ones by Caffe with the rescaled weights)."""
    results = []
    for mem_limit_mb in (500, 1e-3):
        subject, _ = subject_for(caffe, chain_net(caffe), photos)
        subject.initialize(mem_limit_mb=mem_limit_mb, rng=np.random.default_rng(5),
                           log=lambda _: None)
        results.append({name: [blob.data.copy() for blob in blobs]
                         for name, blobs in subject.net.params.items()})
    for name, arrays in results[0].items():
        for array, other in zip(arrays, results[1][name]):
            np.testing.assert_allclose(array, other, rtol=1e-5, atol=1e-6 * np.abs(other).max())


def test_load_keeps_layers_z_reinitialises_cs_rescales(caffe, photos, tmp_path, rng):
    prototxt = write(tmp_path / "chain.prototxt", chain_net(caffe))
    loaded = {"conv1": [rng.normal(0, 0.05, (12, 3, 5, 5)).astype(np.float32),
                        rng.normal(0, 1, 12).astype(np.float32)],
              "conv2": [rng.normal(0, 0.05, (16, 6, 3, 3)).astype(np.float32),
                        rng.normal(0, 1, 16).astype(np.float32)],
              "bn9": [np.ones(3, np.float32)]}
    write_weights(loaded, tmp_path / "in.caffemodel")
    common = ["-q", "-d", photos, "-bs", 4, "-nit", 2, "-l", tmp_path / "in.caffemodel", prototxt]
    kept, zeroed, rescaled = run_tools(common + [tmp_path / "kept.caffemodel"],
                                       ["-z"] + common + [tmp_path / "zeroed.caffemodel"],
                                       ["-c"] + common + [tmp_path / "rescaled.caffemodel"])
    for result in (kept, zeroed, rescaled):
        assert result.returncode == 0, result.stderr
    assert "loaded conv1, conv2 from" in kept.stdout and "ignored): bn9" in kept.stdout
    assert re.search(r"^conv1 +kept ", kept.stdout, re.M)
    assert "gradient ratio target" in rescaled.stdout  # -c is -cs
    kept, zeroed, rescaled = (read_weights(tmp_path / f"{name}.caffemodel")
                              for name in ("kept", "zeroed", "rescaled"))
    for name in ("conv1", "conv2"):
        for array, original in zip(kept[name], loaded[name]):
            np.testing.assert_array_equal(array, original)
        assert not np.allclose(zeroed[name][0], loaded[name][0], rtol=0.5)
        weight = rescaled[name][0]
        factor = weight.ravel() @ loaded[name][0].ravel() / np.sum(loaded[name][0] ** 2)
        assert factor > 0 and abs(np.log(factor)) > 1e-3
        np.testing.assert_allclose(weight, factor * loaded[name][0], rtol=1e-5,
                                   atol=1e-6 * np.abs(weight).max())
    for weights in (kept, zeroed, rescaled):
        for name in ("fc3", "fc4"):
            assert np.isfinite(weights[name][0]).all() and np.abs(weights[name][0]).sum() > 0


def test_own_data_layer_in_the_train_phase(caffe, photos, tmp_path):
    """Without -d the prototxt's ImageData layer feeds the net (TRAIN phase; the TEST one,
    whose source does not exist, is not built); the loss layer is left out."""
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{path} 0\n" for path in sorted(Path(photos).parent.glob("*"))))
    L = caffe.layers
    n = caffe.NetSpec()
    transform = dict(mean_value=[104, 117, 123])
    n.data, n.label = L.ImageData(ntop=2, include=dict(phase=caffe.TRAIN),
                                  transform_param=transform,
                                  image_data_param=dict(source=str(listing), batch_size=4,
                                                        new_height=SIDE, new_width=SIDE))
    train = n.to_proto()
    n = caffe.NetSpec()
    n.data, n.label = L.ImageData(ntop=2, include=dict(phase=caffe.TEST),
                                  image_data_param=dict(source="/nonexistent", batch_size=1))
    n.conv1 = L.Convolution(n.data, num_output=8, kernel_size=5, stride=3)
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.fc = L.InnerProduct(n.conv1, num_output=12)  # more outputs than the 8 images
    n.loss = L.SoftmaxWithLoss(n.fc, n.label)
    net_param = n.to_proto()
    net_param.layer.insert(0, train.layer[0])
    assert input_size(net_param) == (SIDE, SIDE)
    prototxt = write(tmp_path / "train.prototxt", net_param)
    result, = run_tools(["-q", "-nit", 2, "-t", "kmeans", prototxt, tmp_path / "out.caffemodel"])
    assert result.returncode == 0, result.stderr
    assert "left out SoftmaxWithLoss layer loss" in result.stdout
    assert re.search(r"^conv1 +initialised \(kmeans\) .* 0\.1 +1 ", result.stdout, re.M)
    assert re.search(r"^fc +initialised \(elwise instead of kmeans\) ", result.stdout, re.M)
    weights = read_weights(tmp_path / "out.caffemodel")
    assert list(weights) == ["conv1", "fc"] and np.isfinite(weights["conv1"][0]).all()


def test_unusable_nets_and_inputs_fail_with_clear_messages(caffe, photos, tmp_path):
    L = caffe.layers

    def net_with(*middle):
        n = caffe.NetSpec()
        n.data = L.Input(shape=dict(dim=[1, 3, SIDE, SIDE]))
        top = n.data
        for index, make in enumerate(middle):
            setattr(n, f"layer{index}", make(top))
            top = getattr(n, f"layer{index}")
        return n.to_proto()

    conv = lambda bottom: L.Convolution(bottom, num_output=4, kernel_size=3)  # noqa: E731
    cases = [
        (net_with(conv, L.BatchNorm), "layer1 is a BatchNorm layer, .* with tools/debatchnorm.py"),
        (net_with(L.ReLU), "no parameter layer"),
        (net_with(conv, lambda bottom: L.Flatten(bottom)), "layer1 has type Flatten, which magic"),
    ]
    for net_param, message in cases:
        with pytest.raises(MagicInitError, match=message):
            analysis_net(net_param, (1, 3, SIDE, SIDE))
    with pytest.raises(MagicInitError, match="Input layer, .* give images \\(-d\\)"):
        analysis_net(net_with(conv))

    batchnorm = write(tmp_path / "bn.prototxt", cases[0][0])
    groupless = REPO / "prototxt" / "groupless_caffenet.prototxt"
    results = run_tools(["-q", "-d", photos, batchnorm, tmp_path / "o.caffemodel"],
                        ["-q", "-d", str(tmp_path / "none" / "*.jpg"), groupless,
                         tmp_path / "o.caffemodel"],
                        ["-q", groupless, tmp_path / "o.caffemodel"])
    messages = ["fold it into the layer before it first with tools/debatchnorm.py",
                "matches no image", "give images (-d)"]
    for result, message in zip(results, messages):
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "o.caffemodel").exists()


def test_calibration_on_one_image_fails_clearly(caffe, photos, tmp_path):
    n = caffe.NetSpec()
    n.data = caffe.layers.Input(shape=dict(dim=[1, 3, SIDE, SIDE]))
    n.conv = caffe.layers.Convolution(n.data, num_output=4, kernel_size=3)
    n.fc = caffe.layers.InnerProduct(n.conv, num_output=3)
    prototxt = write(tmp_path / "fc.prototxt", n.to_proto())
    one = photos.replace("*.jpg", "astronaut.jpg")
    result, = run_tools(["-q", "-cs", "-d", one, "-bs", 1, "-nit", 1, prototxt,
                         tmp_path / "o.caffemodel"])
    assert result.returncode == 2 and "does not vary over the calibration batch" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o.caffemodel").exists()


def test_help_and_flags():
    """The reference's flags and defaults: -b 0.1, -t elwise, -s 1, -bs 16, -nit 10."""
    settings = MagicInitSettings()
    assert (settings.bias, settings.init_type, settings.scale, settings.batch_size,
            settings.iterations, settings.dropout) == (0.1, "elwise", 1.0, 16, 10, "train")
    result = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True,
                            text=True)
    assert result.returncode == 0 and "Example" in result.stdout
    for default in ("default: 0.1", "default: elwise", "default: 1.0", "default: 16",
                    "default: 10", "default: 500", "default: train"):
        assert default in " ".join(result.stdout.split()), default
    for flag in ("--load", "--data", "--bias", "--type", "-z", "-cs", "-q", "-s S", "-bs BS",
                 "-nit NIT", "--mem-limit", "--gpu", "--seed", "--dropout {train,identity}"):
        assert flag in result.stdout, flag


def test_project_page_command_on_groupless_caffenet(caffe, photo_folder, tmp_path):
    """No-fc6 context model (train net snapshot -> make_no_fc6 -> debatchnorm), then the
    project page's magic init command on the groupless CaffeNet at 227x227."""
    params = data_layer_params("color_dropping", str(photo_folder), seed=3, workers=1,
                               max_patches=40)
    train = write(tmp_path / "train.prototxt", train_net("color_dropping", params))
    net = caffe.Net(str(train), caffe.TRAIN)
    try:
        net.forward()  # fills BatchNorm's statistics
        net.save(str(tmp_path / "model.caffemodel"))
    finally:
        close_data_layers(net)
    caffenet = REPO / "prototxt" / "groupless_caffenet.prototxt"
    nofc6, folded = tmp_path / "nofc6_bn.caffemodel", tmp_path / "nofc6.caffemodel"
    steps = [["make_no_fc6.py", tmp_path / "model.caffemodel", nofc6],
             ["debatchnorm.py", train, nofc6, caffenet, folded]]
    for step in steps:
        result, = run_tools(step)
        assert result.returncode == 0, result.stderr
    out = tmp_path / "out.caffemodel"
    result, = run_tools(["-cs", "-d", str(photo_folder / "*.jpg"), "--gpu", 0, "--load", folded,
                         caffenet, out, "-bs", 4, "-nit", 2, "-q"])
    assert result.returncode == 0, result.stderr
    cpu_lines = [line for line in result.stdout.splitlines() if "CPU" in line]
    assert len(cpu_lines) == 1 and "instead of GPU 0" in cpu_lines[0]
    print(result.stdout)
    assert "loaded conv1, conv2, conv3, conv4, conv5 from" in result.stdout
    net = caffe.Net(str(caffenet), caffe.TEST, weights=str(out))
    loaded = read_weights(folded)
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5"):
        weight, original = net.params[name][0].data, loaded[name][0]
        factor = weight.ravel() @ original.ravel() / np.sum(original.astype(np.float64) ** 2)
        assert factor > 0, name
        np.testing.assert_allclose(weight, factor * original, rtol=1e-4,
                                   atol=1e-5 * np.abs(weight).max(), err_msg=name)
    for name in ("fc6", "fc7", "fc8"):
        weight = net.params[name][0].data
        assert np.isfinite(weight).all() and np.abs(weight).sum() > 0, name
    assert read_net_param(caffenet).layer[-1].type == "Softmax"  # the deploy net is untouched


# ---- the reference's procedure (Dropout active in the TRAIN phase) ---------------------------

def dropout_net(caffe, batch):
    """Conv / ReLU / max-pooling net with two Dropout layers (in place, after fc3 and fc4)."""
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[batch, 3, SIDE, SIDE]))
    n.conv1 = L.Convolution(n.data, num_output=8, kernel_size=5, stride=2)
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.conv1, pool=caffe.params.Pooling.MAX, kernel_size=2, stride=2)
    n.conv2 = L.Convolution(n.pool1, num_output=16, kernel_size=3, pad=1)
    n.relu2 = L.ReLU(n.conv2, in_place=True)
    n.pool2 = L.Pooling(n.conv2, pool=caffe.params.Pooling.MAX, kernel_size=2, stride=2)
    n.fc3 = L.InnerProduct(n.pool2, num_output=32)
    n.relu3 = L.ReLU(n.fc3, in_place=True)
    n.drop3 = L.Dropout(n.fc3, dropout_ratio=0.5, in_place=True)
    n.fc4 = L.InnerProduct(n.fc3, num_output=32)
    n.relu4 = L.ReLU(n.fc4, in_place=True)
    n.drop4 = L.Dropout(n.fc4, dropout_ratio=0.5, in_place=True)
    n.fc5 = L.InnerProduct(n.fc4, num_output=10)
    n.prob = L.Softmax(n.fc5)
    return n.to_proto()


DROPOUT_LAYERS = ("conv1", "conv2", "fc3", "fc4", "fc5")


def test_dropout_is_active_by_default_and_identity_on_request(caffe):
    net_param = dropout_net(caffe, 4)
    analysis, notes = analysis_net(net_param, (4, 3, SIDE, SIDE))
    assert [layer.name for layer in analysis.layer
            if layer.type == "Dropout"] == ["drop3", "drop4"]
    assert "note: Dropout layer drop3 is active (Caffe's TRAIN phase" in notes[0]
    analysis, notes = analysis_net(net_param, (4, 3, SIDE, SIDE), dropout="identity")
    assert not [layer for layer in analysis.layer if layer.type == "Dropout"]
    assert any("drop4 is the identity" in note for note in notes)
    with pytest.raises(MagicInitError, match="unknown Dropout mode 'test'"):
        analysis_net(net_param, (4, 3, SIDE, SIDE), dropout="test")


def magic_init_weights(caffe, photos, seed, dropout):
    """ctxpred's -cs -d on dropout_net: {layer: [weights, bias]}."""
    batch, batches = 4, 4
    analysis, _ = analysis_net(dropout_net(caffe, batch), (batch, 3, SIDE, SIDE), dropout)
    image_rng, init_rng, calibration_rng = (np.random.default_rng([seed, part])
                                            for part in range(3))
    feed = [{"data": array} for array in image_batches(photos, batch, batches, (SIDE, SIDE),
                                                       rng=image_rng, log=lambda _: None)]
    caffe.set_random_seed(seed)
    subject = NetUnderInit(instantiate(analysis, "train"), analysis, feed)
    subject.initialize(rng=init_rng, log=lambda _: None)
    subject.calibrate(rng=calibration_rng, log=lambda _: None)
    return {name: [blob.data.copy() for blob in blobs]
            for name, blobs in subject.net.params.items()}


def reference_weights(caffe, photos, seed, list_file):
    """The reference procedure (ctxpred.weights.magic_init_reference) on the same net and photos."""
    batch = 4
    net = instantiate(reference.reference_net_param(dropout_net(caffe, batch), list_file, batch),
                      "train")
    caffe.set_random_seed(seed)
    rng = np.random.default_rng([seed, 7])
    assert reference.initialize(net, iterations=4, rng=rng) == list(DROPOUT_LAYERS)
    reference.calibrate(net, rng=rng)
    return {name: [blob.data.copy() for blob in blobs] for name, blobs in net.params.items()}


def weight_and_activation_spread(caffe, weights, images):
    """{layer: (log weight rms, log mean per-channel pre-activation std on ``images``)}; the
    pre-activations in the TEST phase (Dropout the identity), the same for every method."""
    net = instantiate(analysis_net(dropout_net(caffe, len(images)),
                                   (len(images), 3, SIDE, SIDE), "identity")[0], "train")
    for name, arrays in weights.items():
        for blob, array in zip(net.params[name], arrays):
            blob.data[...] = array
    names = list(net._layer_names)
    out = {}
    for name in DROPOUT_LAYERS:
        net.blobs["data"].data[...] = images
        net._forward(0, names.index(name))  # stop before the in-place ReLU
        _, std = channel_stats(net.blobs[name].data)
        out[name] = (np.log(np.sqrt(np.mean(np.square(weights[name][0], dtype=np.float64)))),
                     np.log(std.mean()))
    return out


def test_weights_and_pre_activations_agree_with_the_reference_procedure(caffe, photos, tmp_path):
    """Over several seeds, ctxpred's -cs on a net with Dropout gives weights and TEST-phase
    pre-activation spreads whose means agree with the reference procedure's within the
    seed-to-seed noise; treating Dropout as the identity (the old behaviour) does not."""
    seeds = range(24)
    # Both read the same pixels: the photos squashed to 32 x 32 once, as lossless PNG files
    # (Caffe's ImageData resizes bilinearly, ctxpred with area interpolation: a different
    # question from the procedure's).
    images, = image_batches(photos, len(PHOTOS), 1, (SIDE, SIDE))
    for index, image in enumerate(images):
        bgr = np.rint(image.transpose(1, 2, 0) + np.float32(MEAN_BGR))
        Image.fromarray(np.clip(bgr[:, :, ::-1], 0, 255).astype(np.uint8)).save(
            tmp_path / f"{index}.png")
    small = sorted(tmp_path.glob("*.png"))
    list_file = reference.write_list_file(small, tmp_path / "list.txt")
    photos = str(tmp_path / "*.png")
    images, = image_batches(photos, len(PHOTOS), 1, (SIDE, SIDE))
    runs = {"train": [], "identity": [], "reference": []}
    for seed in seeds:
        for mode in ("train", "identity"):
            runs[mode].append(weight_and_activation_spread(
                caffe, magic_init_weights(caffe, photos, seed, mode), images))
        runs["reference"].append(weight_and_activation_spread(
            caffe, reference_weights(caffe, photos, seed, list_file), images))

    def compare(mode, layer, what):
        """(difference of the means of the log values, its standard error)."""
        ours = np.array([run[layer][what] for run in runs[mode]])
        theirs = np.array([run[layer][what] for run in runs["reference"]])
        error = np.sqrt(ours.var(ddof=1) / len(ours) + theirs.var(ddof=1) / len(theirs))
        return ours.mean() - theirs.mean(), error

    report, disagreements = [], 0
    for layer in DROPOUT_LAYERS:
        for what, label in enumerate(("weight rms", "pre-activation std")):
            difference, error = compare("train", layer, what)
            old, old_error = compare("identity", layer, what)
            report.append(f"{layer} {label}: train {difference:+.3f} +- {error:.3f}, "
                          f"identity {old:+.3f} +- {old_error:.3f}")
            assert abs(difference) < 3 * error + 0.03, report[-1]
            disagreements += abs(old) > 3 * old_error + 0.03
    print("\n".join(report))
    assert disagreements >= 4, report  # the comparison can tell the two behaviours apart
