"""PatchPairData in real Caffe nets, its prefetching workers and their shutdown."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ctxpred.data.batching import BatchAssembler, PatchPairConfig
from ctxpred.data.images import open_source
from ctxpred.data.layer import close_data_layers, parse_param_str
from ctxpred.data.prefetch import BatchPrefetcher
from ctxpred.data.sampling import OFFSETS

REPO = Path(__file__).resolve().parents[2]


def data_layer_net(caffe, tmp_path, params):
    n = caffe.NetSpec()
    n.data, n.select1, n.select2, n.label = caffe.layers.Python(
        ntop=4, python_param=dict(module="ctxpred.data.layer", layer="PatchPairData",
                                  param_str=json.dumps(params)))
    path = tmp_path / "data.prototxt"
    path.write_text(str(n.to_proto()))
    return caffe.Net(str(path), caffe.TRAIN)


def worker_pids(prefetcher):
    return [process.pid for process in prefetcher._processes]


def shm_names(prefetcher):
    return [memory.name for memory in prefetcher._memories]


def process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its exit status is left to collect.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_layer_tops_are_consistent_pairs(caffe, tmp_path, photo_folder):
    net = data_layer_net(caffe, tmp_path, {"source": str(photo_folder), "seed": 3, "workers": 2})
    for _ in range(3):
        net.forward()
        data = net.blobs["data"].data
        select1, select2 = net.blobs["select1"].data, net.blobs["select2"].data
        labels = net.blobs["label"].data
        assert data.shape[1:] == (3, 96, 96) and 0 < data.shape[0] < 512
        assert select1.shape == select2.shape == labels.shape and len(labels) > 0
        assert select1.max() < data.shape[0] and select2.max() < data.shape[0]
        assert set(np.unique(labels)) <= set(range(8))
        assert np.all(select1 != select2)


def test_layer_stream_equals_assembler_round_robin(caffe, tmp_path, photo_folder):
    """The prefetched stream is worker 0, worker 1, worker 0, ... of seeded assemblers."""
    params = {"source": str(photo_folder), "seed": 11, "workers": 2, "prefetch": 2}
    net = data_layer_net(caffe, tmp_path, params)
    _, config = parse_param_str(json.dumps(params))
    source = open_source(str(photo_folder))
    seeds = np.random.SeedSequence(11).spawn(2)
    assemblers = [BatchAssembler(source, config, np.random.default_rng(s)) for s in seeds]
    buffer = np.empty((config.max_patches, 3, 96, 96), np.float32)
    for step in range(4):
        net.forward()
        info = assemblers[step % 2].fill(buffer)
        np.testing.assert_array_equal(net.blobs["data"].data, buffer[:info.n_patches])
        np.testing.assert_array_equal(net.blobs["label"].data, info.labels)
        np.testing.assert_array_equal(net.blobs["select1"].data, info.select1)


def test_labels_match_patch_geometry(photo_folder):
    """Each pair's label is the relative grid position of its two patches."""
    config = PatchPairConfig()
    with BatchPrefetcher(open_source(str(photo_folder)), config, seed=5, workers=1) as loader:
        batch = loader.next()
        assert len(batch.labels) > 0
    assembler = BatchAssembler(open_source(str(photo_folder)), config,
                               np.random.default_rng(np.random.SeedSequence(5).spawn(1)[0]))
    info = assembler.fill(np.empty((config.max_patches, 3, 96, 96), np.float32))
    delta = info.corners[info.select2] - info.corners[info.select1]  # (y, x)
    step = config.geometry.step
    offsets = np.stack([np.round(delta[:, 1] / step), np.round(delta[:, 0] / step)], axis=1)
    np.testing.assert_array_equal(offsets, OFFSETS[info.labels])


def test_close_data_layers_stops_workers_and_frees_memory(caffe, tmp_path, photo_folder):
    net = data_layer_net(caffe, tmp_path, {"source": str(photo_folder), "workers": 2})
    net.forward()
    prefetcher = net.layers[0].prefetcher
    pids, names = worker_pids(prefetcher), shm_names(prefetcher)
    assert all(process_exists(pid) for pid in pids)
    close_data_layers(net)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(process_exists(pid) for pid in pids):
        time.sleep(0.1)
    assert not any(process_exists(pid) for pid in pids)
    assert not any(Path("/dev/shm", name).exists() for name in names)


def test_dead_worker_raises_within_seconds(photo_folder):
    loader = BatchPrefetcher(open_source(str(photo_folder)), PatchPairConfig(), workers=2, depth=1)
    loader.next()
    loader.next()
    os.kill(worker_pids(loader)[0], signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="worker 0 died"):
        for _ in range(10):
            loader.next()
    assert time.monotonic() - started < 5


def test_worker_error_is_reported(tmp_path):
    (tmp_path / "only.jpg").write_bytes(b"not an image at all")
    loader = BatchPrefetcher(open_source(str(tmp_path)), PatchPairConfig(), workers=1)
    # Bad input, raised as such (exit 2 in train.py), on one line naming the source and why.
    with pytest.raises(ValueError, match=r"^no usable image in folder .*only\.jpg: not an image"):
        loader.next()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, None])
def test_exit_or_signal_leaves_no_orphans_or_shared_memory(photo_folder, signum):
    """Killed by a signal, or exiting normally with the loader still open."""
    script = textwrap.dedent(f"""
        import sys, time
        from ctxpred.data.batching import PatchPairConfig
        from ctxpred.data.images import open_source
        from ctxpred.data.prefetch import BatchPrefetcher
        loader = BatchPrefetcher(open_source({str(photo_folder)!r}), PatchPairConfig(), workers=2)
        loader.next()
        print(" ".join(str(p.pid) for p in loader._processes))
        print(" ".join(m.name for m in loader._memories), flush=True)
        sys.stdin.readline()
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = [int(p) for p in child.stdout.readline().split()]
    names = child.stdout.readline().split()
    assert len(pids) == 2 and len(names) == 2
    if signum is None:
        child.stdin.write("exit\n")
        child.stdin.flush()
    else:
        child.send_signal(signum)
    child.wait(timeout=10)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and (
            any(process_exists(pid) for pid in pids)
            or any(Path("/dev/shm", name).exists() for name in names)):
        time.sleep(0.1)
    assert not any(process_exists(pid) for pid in pids)
    assert not any(Path("/dev/shm", name).exists() for name in names)


def test_plain_caffe_binary_trains_with_the_layer(caffe, tmp_path, photo_folder):
    params = {"source": str(photo_folder), "workers": 1, "max_patches": 64}
    n = caffe.NetSpec()
    n.data, n.select1, n.select2, n.label = caffe.layers.Python(
        ntop=4, python_param=dict(module="ctxpred.data.layer", layer="PatchPairData",
                                  param_str=json.dumps(params)))
    n.pool = caffe.layers.Pooling(n.data, pool=caffe.params.Pooling.AVE, kernel_size=16, stride=16)
    n.feature = caffe.layers.InnerProduct(n.pool, num_output=8, weight_filler=dict(type="xavier"))
    n.first = caffe.layers.BatchReindex(n.feature, n.select1)
    n.second = caffe.layers.BatchReindex(n.feature, n.select2)
    n.pair = caffe.layers.Concat(n.first, n.second)
    n.score = caffe.layers.InnerProduct(n.pair, num_output=8, weight_filler=dict(type="xavier"))
    n.loss = caffe.layers.SoftmaxWithLoss(n.score, n.label)
    (tmp_path / "train.prototxt").write_text(str(n.to_proto()))
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path}/train.prototxt"\nbase_lr: 1e-4\nlr_policy: "fixed"\nmax_iter: 3\n'
        f'display: 1\nsnapshot_prefix: "{tmp_path}/model"\nsolver_mode: CPU\n')
    caffe_tool = Path(sys.executable).parent / "caffe"
    solver = str(tmp_path / "solver.prototxt")
    result = subprocess.run([str(caffe_tool), "train", "-solver", solver],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, GLOG_minloglevel="0"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Optimization Done" in result.stderr
    assert (tmp_path / "model_iter_3.caffemodel").exists()
