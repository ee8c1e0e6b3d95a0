"""Real Caffe is built, importable and has every piece ctxpred relies on."""
import os

import numpy as np
import pytest

from ctxpred.caffe.env import (CaffeNotAvailable, caffe_has_cuda, describe_cuda, gpu_status,
                               load_caffe)
from ctxpred.weights.files import read_weights


def write_net(tmp_path, net_spec, name="net.prototxt"):
    path = tmp_path / name
    path.write_text(str(net_spec.to_proto()))
    return str(path)


def test_load_caffe_refuses_an_unusable_gpu_in_one_line(caffe, tmp_path):
    """CPU build, or CUDA build on a machine without driver/GPU: an error, never an abort."""
    assert caffe.__version__.startswith("1.0")
    status = gpu_status(0)
    if status.usable:
        pytest.fail("these tests expect a machine without a usable GPU (CI has none)")
    if caffe_has_cuda():
        assert status.runtime_version.split(".")[0] in ("12", "13")
        expected = ("no NVIDIA driver|driver supports CUDA up to|no usable GPU"
                    "|GPU\\(s\\) are visible")
    else:
        expected = "CPU-only build"
    with pytest.raises(CaffeNotAvailable, match=expected) as raised:
        load_caffe(gpu=0)
    assert "\n" not in str(raised.value)
    # CPU mode still works after the refusal.
    n = caffe.NetSpec()
    n.data = caffe.layers.Input(shape=dict(dim=[2, 3]))
    n.out = caffe.layers.Power(n.data, scale=2.0)
    load_caffe(gpu=None)
    spec = caffe.Net(write_net(tmp_path, n), caffe.TEST)
    spec.blobs["data"].data[...] = 1.5
    assert np.all(spec.forward()["out"] == 3.0)



def test_cuda_status_names_versions_and_devices():
    """What the user reads for each thing the CUDA runtime can report."""
    old_driver = describe_cuda(13000, 12040, 0, None, 0)
    assert not old_driver.usable
    assert "up to 12.4" in old_driver.reason and "CUDA 13.0" in old_driver.reason
    assert ">= 580" in old_driver.reason
    no_driver = describe_cuda(12080, 0, 0, None, 0)
    assert "no NVIDIA driver" in no_driver.reason and "12.8" in no_driver.reason
    assert ">= 525" in no_driver.reason
    busy = describe_cuda(13000, 13000, 0, "all CUDA-capable devices are busy (error 46)", 0)
    assert "busy" in busy.reason and not busy.usable
    missing = describe_cuda(13000, 13000, 2, None, 2)
    assert not missing.usable and "only 2 GPU(s)" in missing.reason and "0..1" in missing.reason
    fine = describe_cuda(13000, 13020, 1, None, 0)
    assert fine.usable and fine.driver_version == "13.2" and fine.device_count == 1
    assert all("\n" not in s.reason for s in (old_driver, no_driver, busy, missing, fine))


def test_net_from_prototxt_inner_product(caffe, tmp_path, rng):
    n = caffe.NetSpec()
    n.data = caffe.layers.Input(shape=dict(dim=[4, 5]))
    n.ip = caffe.layers.InnerProduct(n.data, num_output=3)
    net = caffe.Net(write_net(tmp_path, n), caffe.TEST)
    weight, bias = rng.normal(size=(3, 5)), rng.normal(size=3)
    net.params["ip"][0].data[...] = weight
    net.params["ip"][1].data[...] = bias
    x = rng.normal(size=(4, 5)).astype(np.float32)
    net.blobs["data"].data[...] = x
    out = net.forward()["ip"]
    np.testing.assert_allclose(out, x @ weight.T + bias, rtol=1e-5, atol=1e-5)


def test_batch_reindex_forward_and_backward(caffe, tmp_path, rng):
    n = caffe.NetSpec()
    n.data, n.index = caffe.layers.Input(
        shape=[dict(dim=[4, 2, 3]), dict(dim=[6])], ntop=2)
    # A learnable identity (Scale, filler 1) makes the patches need a
    # gradient, as conv features do in the real net; the index never does.
    # loss_weight makes Caffe run the backward pass through it.
    n.features = caffe.layers.Scale(n.data, scale_param=dict(filler=dict(value=1.0)))
    n.picked = caffe.layers.BatchReindex(n.features, n.index, loss_weight=1)
    net = caffe.Net(write_net(tmp_path, n), caffe.TRAIN)
    x = rng.normal(size=(4, 2, 3)).astype(np.float32)
    index = np.array([3, 0, 0, 2, 3, 3], dtype=np.float32)
    net.blobs["data"].data[...] = x
    net.blobs["index"].data[...] = index
    net.forward()
    np.testing.assert_array_equal(net.blobs["picked"].data, x[index.astype(int)])
    top_diff = rng.normal(size=(6, 2, 3)).astype(np.float32)
    net.blobs["picked"].diff[...] = top_diff
    net.backward(start="picked")
    expected = np.zeros_like(x)
    np.add.at(expected, index.astype(int), top_diff)
    np.testing.assert_allclose(net.blobs["features"].diff, expected, atol=1e-6)


def test_batchnorm_train_statistics_and_blobs(caffe, tmp_path, rng):
    n = caffe.NetSpec()
    n.data = caffe.layers.Input(shape=dict(dim=[8, 3, 4, 4]))
    n.bn = caffe.layers.BatchNorm(n.data, use_global_stats=False,
                                  moving_average_fraction=0.9)
    net = caffe.Net(write_net(tmp_path, n), caffe.TRAIN)
    x = (rng.normal(size=(8, 3, 4, 4)) * [[[[2.0]], [[5.0]], [[0.5]]]] + 7).astype(np.float32)
    net.blobs["data"].data[...] = x
    out = net.forward()["bn"]
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(out.var(axis=(0, 2, 3)), 1, atol=1e-3)
    mean_blob, var_blob, factor_blob = (b.data for b in net.params["bn"])
    assert factor_blob[0] == pytest.approx(1.0)
    np.testing.assert_allclose(mean_blob, x.mean(axis=(0, 2, 3)), rtol=1e-5)
    m = x.shape[0] * x.shape[2] * x.shape[3]
    np.testing.assert_allclose(var_blob, x.var(axis=(0, 2, 3)) * m / (m - 1), rtol=1e-4)


def test_lrn_across_channels_matches_formula(caffe, tmp_path, rng):
    n = caffe.NetSpec()
    n.data = caffe.layers.Input(shape=dict(dim=[2, 7, 3, 3]))
    n.norm = caffe.layers.LRN(n.data, local_size=5, alpha=1e-4, beta=0.75)
    net = caffe.Net(write_net(tmp_path, n), caffe.TEST)
    x = (rng.normal(size=(2, 7, 3, 3)) * 30).astype(np.float32)
    net.blobs["data"].data[...] = x
    out = net.forward()["norm"]
    padded = np.pad(x ** 2, ((0, 0), (2, 2), (0, 0), (0, 0)))
    window_sum = sum(padded[:, k:k + 7] for k in range(5))
    expected = x / (1 + 1e-4 / 5 * window_sum) ** 0.75
    np.testing.assert_allclose(out, expected, rtol=1e-5)


def test_grouped_convolution_is_block_diagonal(caffe, tmp_path, rng):
    n = caffe.NetSpec()
    n.data = caffe.layers.Input(shape=dict(dim=[2, 4, 5, 5]))
    n.conv = caffe.layers.Convolution(n.data, num_output=6, kernel_size=3, group=2,
                                      bias_term=False)
    n.half = caffe.layers.Input(shape=dict(dim=[2, 2, 5, 5]))
    n.conv_half = caffe.layers.Convolution(n.half, num_output=3, kernel_size=3,
                                           bias_term=False)
    net = caffe.Net(write_net(tmp_path, n), caffe.TEST)
    weight = net.params["conv"][0].data
    assert weight.shape == (6, 2, 3, 3)
    weight[...] = rng.normal(size=weight.shape)
    x = rng.normal(size=(2, 4, 5, 5)).astype(np.float32)
    net.blobs["data"].data[...] = x
    net.forward()
    grouped = net.blobs["conv"].data.copy()
    for g in range(2):
        net.params["conv_half"][0].data[...] = weight[3 * g:3 * g + 3]
        net.blobs["half"].data[...] = x[:, 2 * g:2 * g + 2]
        net.forward()
        np.testing.assert_allclose(grouped[:, 3 * g:3 * g + 3],
                                   net.blobs["conv_half"].data, rtol=1e-5, atol=1e-5)


def test_mvn_across_channels(caffe, tmp_path, rng):
    n = caffe.NetSpec()
    n.data = caffe.layers.Input(shape=dict(dim=[3, 3, 6, 6]))
    n.mvn = caffe.layers.MVN(n.data, across_channels=True)
    net = caffe.Net(write_net(tmp_path, n), caffe.TEST)
    x = (rng.normal(size=(3, 3, 6, 6)) * 40 + 100).astype(np.float32)
    net.blobs["data"].data[...] = x
    out = net.forward()["mvn"].reshape(3, -1)
    np.testing.assert_allclose(out.mean(axis=1), 0, atol=1e-4)
    np.testing.assert_allclose(out.std(axis=1), 1, atol=1e-3)


def regression_solver(caffe, tmp_path, momentum=0.9):
    """A linear regression net and its SGD solver, snapshotting into tmp_path."""
    n = caffe.NetSpec()
    n.data, n.target = caffe.layers.DummyData(
        shape=[dict(dim=[16, 4]), dict(dim=[16, 1])],
        data_filler=[dict(type="constant", value=0.5), dict(type="constant", value=1.0)],
        ntop=2)
    n.pred = caffe.layers.InnerProduct(n.data, num_output=1,
                                       weight_filler=dict(type="xavier"))
    n.loss = caffe.layers.EuclideanLoss(n.pred, n.target)
    net_path = write_net(tmp_path, n, "regression.prototxt")
    solver_path = tmp_path / "solver.prototxt"
    solver_path.write_text(
        f'net: "{net_path}"\nbase_lr: 0.05\nlr_policy: "fixed"\nmomentum: {momentum}\n'
        f'random_seed: 7\nsnapshot_prefix: "{tmp_path}/model"\nsolver_mode: CPU\n')
    return caffe.SGDSolver(str(solver_path))


def test_sgd_solver_steps_reduce_loss(caffe, tmp_path):
    solver = regression_solver(caffe, tmp_path)
    solver.step(1)
    first = float(solver.net.blobs["loss"].data)
    solver.step(60)
    assert solver.iter == 61
    assert float(solver.net.blobs["loss"].data) < 0.2 * first


def test_snapshot_restore_continues_identically(caffe, tmp_path):
    solver = regression_solver(caffe, tmp_path)
    solver.step(5)
    solver.snapshot()
    state = tmp_path / "model_iter_5.solverstate"
    assert state.exists() and (tmp_path / "model_iter_5.caffemodel").exists()
    solver.step(3)
    uninterrupted = solver.net.params["pred"][0].data.copy()

    resumed = regression_solver(caffe, tmp_path)
    resumed.restore(str(state))
    assert resumed.iter == 5
    resumed.step(3)
    assert resumed.iter == 8
    # Bit-exact only if the momentum history came back with the weights.
    assert resumed.net.params["pred"][0].data.tobytes() == uninterrupted.tobytes()


def conv_net(caffe, tmp_path):
    n = caffe.NetSpec()
    n.data = caffe.layers.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.conv = caffe.layers.Convolution(n.data, num_output=4, kernel_size=3,
                                      weight_filler=dict(type="xavier"),
                                      bias_filler=dict(type="constant", value=0.3))
    n.ip = caffe.layers.InnerProduct(n.conv, num_output=5,
                                     weight_filler=dict(type="gaussian", std=0.1))
    return write_net(tmp_path, n, "conv.prototxt")


@pytest.mark.parametrize("save", ["save", "save_hdf5"])
def test_save_and_reload_weights_bit_exact(caffe, tmp_path, save):
    definition = conv_net(caffe, tmp_path)
    net = caffe.Net(definition, caffe.TEST)
    weights = str(tmp_path / ("w.caffemodel.h5" if save == "save_hdf5" else "w.caffemodel"))
    getattr(net, save)(weights)
    reloaded = caffe.Net(definition, caffe.TEST, weights=weights)
    for name in ("conv", "ip"):
        for original, copy in zip(net.params[name], reloaded.params[name]):
            assert original.data.tobytes() == copy.data.tobytes()
    x = np.linspace(-1, 1, 192, dtype=np.float32).reshape(1, 3, 8, 8)
    net.blobs["data"].data[...] = x
    reloaded.blobs["data"].data[...] = x
    assert net.forward()["ip"].tobytes() == reloaded.forward()["ip"].tobytes()


def test_models_over_512_mib_load(caffe, tmp_path):
    """The patched reader accepts models beyond protobuf's old 512 MiB cap."""
    n = caffe.NetSpec()
    n.data = caffe.layers.Input(shape=dict(dim=[1, 1]))
    n.big = caffe.layers.InnerProduct(n.data, num_output=135_000_000, bias_term=False,
                                      weight_filler=dict(type="constant", value=0.0))
    definition = write_net(tmp_path, n, "big.prototxt")
    net = caffe.Net(definition, caffe.TEST)
    net.params["big"][0].data[-1] = 3.5
    weights = tmp_path / "big.caffemodel"
    net.save(str(weights))
    del net
    assert os.path.getsize(weights) > 512 * 2 ** 20
    reloaded = caffe.Net(definition, caffe.TEST, weights=str(weights))
    assert reloaded.params["big"][0].data[-1, 0] == 3.5
    del reloaded
    # ctxpred's own reader (no net built) takes it too.
    assert read_weights(weights)["big"][0][-1, 0] == 3.5
