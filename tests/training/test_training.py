"""The training loop and tools/train.py on the real AlexNet-style net (small batches)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ctxpred.caffe.env import gpu_status
from ctxpred.training.context_run import RunConfig, train, write_run_files
from ctxpred.training.log import LogFormat, read_log
from ctxpred.training.loop import (DivergenceError, DivergenceWatch, RunKind, RunSettings,
                                   describe_row, run_solver, timed_step)
from ctxpred.training.snapshots import latest_snapshot, snapshot_pairs
from ctxpred.training.solvers import (history_copies, make_solver, read_solver, set_fields,
                                      solver_text, write_solver)

REPO = Path(__file__).resolve().parents[2]
SMALL = (("max_patches", 40),)


def small_run(tmp_path, photo_folder, **overrides):
    config = RunConfig(images=str(photo_folder), workers=1, data=SMALL, **overrides)
    run_dir = tmp_path / "run"
    return run_dir, write_run_files(run_dir, config)


def test_run_files_use_reference_solver_and_overrides(tmp_path, photo_folder):
    run_dir, solver = small_run(tmp_path, photo_folder,
                                solver_overrides=(("momentum", 0.999), ("base_lr", 2e-5)))
    text = solver.read_text()
    assert "momentum: 0.999\n" in text and "base_lr: 2e-05\n" in text
    assert "weight_decay: 0\n" in text and 'lr_policy: "fixed"' in text
    assert f'snapshot_prefix: "{run_dir.resolve()}/model"' in text
    train_text = (run_dir / "train.prototxt").read_text()
    assert str(photo_folder) in train_text and '\\"max_patches\\": 40' in train_text


def test_train_snapshot_log_plot_then_resume(caffe, tmp_path, photo_folder):
    run_dir, solver = small_run(tmp_path, photo_folder)
    first = train(caffe, solver, run_dir, max_iter=3, log=lambda *_: None)
    assert first["iter"] == 3 and first["reason"] == "max_iter"
    assert latest_snapshot(run_dir)[0] == 3
    assert (run_dir / "model_iter_3.caffemodel").exists()
    assert (run_dir / "training.png").stat().st_size > 1000
    log = read_log(run_dir / "train.log")
    np.testing.assert_array_equal(log["iter"], [1, 2, 3])
    assert np.all(log["loss_per_pair"] > 0) and np.all(log["pairs"] > log["patches"])

    messages = []
    second = train(caffe, solver, run_dir, max_iter=5, log=messages.append)
    assert any("resuming from" in m and "model_iter_3.solverstate" in m for m in messages)
    assert "resuming from" in (run_dir / "events.log").read_text()
    assert second["iter"] == 5
    np.testing.assert_array_equal(read_log(run_dir / "train.log")["iter"], [1, 2, 3, 4, 5])


def test_resume_drops_log_rows_after_the_restored_snapshot(caffe, tmp_path, photo_folder):
    run_dir, solver = small_run(tmp_path, photo_folder)
    train(caffe, solver, run_dir, max_iter=2, log=lambda *_: None)
    train(caffe, solver, run_dir, max_iter=4, log=lambda *_: None)
    for path in run_dir.glob("model_iter_4.*"):  # as if killed before the snapshot at 4
        path.unlink()
    messages = []
    train(caffe, solver, run_dir, max_iter=5, log=messages.append)
    assert any("dropped 2 rows after iteration 2" in m for m in messages)
    np.testing.assert_array_equal(read_log(run_dir / "train.log")["iter"], [1, 2, 3, 4, 5])


def test_plot_refresh_does_not_reread_train_log(caffe, tmp_path, photo_folder):
    run_dir, solver = small_run(tmp_path, photo_folder)
    log_path = str((run_dir / "train.log").resolve())
    opened = []
    watching = [True]

    def audit(event, args):
        if watching[0] and event == "open" and args and isinstance(args[0], (str, bytes)) \
                and str(Path(os.fsdecode(args[0])).resolve()) == log_path:
            opened.append(args[1])

    sys.addaudithook(audit)  # hooks cannot be removed; this one turns itself off below
    try:
        pngs = []
        result = train(caffe, solver, run_dir, max_iter=5, plot_seconds=0, flush_seconds=0,
                       log=lambda *_: None,
                       progress=lambda row: pngs.append((run_dir / "training.png").exists()))
    finally:
        watching[0] = False
    assert result["iter"] == 5 and pngs[1:] == [True] * 4  # redrawn after every step
    assert len(opened) <= 2, f"train.log opened {len(opened)} times in 5 steps: {opened}"
    np.testing.assert_array_equal(read_log(run_dir / "train.log")["iter"], [1, 2, 3, 4, 5])


def test_log_is_flushed_when_a_step_raises(caffe, tmp_path, photo_folder):
    run_dir, solver = small_run(tmp_path, photo_folder)

    def fail_at_three(row):
        if row["iter"] == 3:
            raise RuntimeError("loader failed")

    with pytest.raises(RuntimeError, match="loader failed"):
        train(caffe, solver, run_dir, max_iter=50, flush_seconds=3600, progress=fail_at_three,
              log=lambda *_: None)
    np.testing.assert_array_equal(read_log(run_dir / "train.log")["iter"], [1, 2, 3])


def test_pause_file_stops_after_current_step(caffe, tmp_path, photo_folder):
    run_dir, solver = small_run(tmp_path, photo_folder)

    def pause_at_two(row):
        if row["iter"] == 2:
            (run_dir / "pause").touch()

    result = train(caffe, solver, run_dir, max_iter=50, progress=pause_at_two,
                   log=lambda *_: None)
    assert result["iter"] == 2 and result["reason"] == "'pause' file"
    assert latest_snapshot(run_dir)[0] == 2


def test_divergence_watch_detects_jump_and_nan(caffe, tmp_path):
    n = caffe.NetSpec()
    n.data = caffe.layers.Input(shape=dict(dim=[2, 3, 8, 8]))
    n.conv1 = caffe.layers.Convolution(n.data, num_output=2, kernel_size=3)
    n.pool1 = caffe.layers.Pooling(n.conv1, kernel_size=2, stride=2)
    n.fc8 = caffe.layers.InnerProduct(n.pool1, num_output=4)
    (tmp_path / "net.prototxt").write_text(str(n.to_proto()))
    net = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TRAIN)
    watch = DivergenceWatch(net, every=1)
    for step, delta in enumerate((1.0, 1.5), start=1):
        net.params["fc8"][0].data[...] += delta
        watch.check(step)
    net.params["fc8"][0].data[...] += 40.0  # 27x the previous change
    with pytest.raises(DivergenceError, match="update of fc8 jumped"):
        watch.check(3)
    net.params["fc8"][0].data[0, 0] = np.nan
    with pytest.raises(DivergenceError, match="sum of fc8 weights"):
        watch.check(4)
    net.blobs["pool1"].diff[0, 0, 0, 0] = 1e9
    with pytest.raises(DivergenceError, match="pool1 diff"):
        watch.check(5)


def run_tool(*args, **kwargs):
    return subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=600, **kwargs)


def test_tool_help_and_gpu_on_cpu_build(tmp_path):
    help_text = run_tool("--help").stdout
    for flag in ("--net", "--images", "--out", "--iters", "--gpu", "--seed", "--solver",
                 "--paper", "--fresh", "--reference-head", "--minutes"):
        assert flag in help_text
    status = gpu_status(0)
    if status.usable:  # a GPU machine: nothing to refuse
        return
    result = run_tool("--gpu", "0", "--out", str(tmp_path / "gpu"))
    # one line with the reason: a CPU-only build, or a CUDA build without driver or GPU
    assert result.returncode == 2 and status.reason.split(":")[0] in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "gpu").exists()


def test_tool_sigterm_snapshots_and_exits_zero(tmp_path, photo_folder):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "tools" / "train.py"), "--images", str(photo_folder),
         "--out", str(out), "--max-patches", "40", "--workers", "1", "--iters", "1000",
         "--flush-seconds", "3600"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = ""
    while not first.startswith("iter 1:"):  # the progress line of the first step
        first = process.stdout.readline()
        assert first, process.stderr.read()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "SIGTERM" in stdout
    steps = len(read_log(out / "train.log")["iter"])  # the buffered rows were written at the stop
    assert steps >= 1 and latest_snapshot(out)[0] == steps

    fresh = run_tool("--images", str(photo_folder), "--out", str(out), "--max-patches", "40",
                     "--workers", "1", "--iters", str(steps + 1), "--fresh")
    assert fresh.returncode == 0, fresh.stderr
    assert "moved the previous run" in fresh.stdout
    assert latest_snapshot(out)[0] == steps + 1 and len(list(tmp_path.glob("run.old-*"))) == 1


def test_plain_caffe_binary_trains_the_run_prototxt(tmp_path, photo_folder):
    run_dir, solver = small_run(tmp_path, photo_folder, solver_overrides=(("max_iter", 2),))
    caffe_tool = Path(sys.executable).parent / "caffe"
    result = subprocess.run([str(caffe_tool), "train", "-solver", str(solver)],
                            capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, GLOG_minloglevel="0"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Optimization Done" in result.stderr
    assert (run_dir / "model_iter_2.caffemodel").exists()


def test_tool_killed_keeps_flushed_rows_and_a_rerun_does_not_repeat_them(tmp_path, photo_folder):
    out = tmp_path / "run"
    args = ["--images", str(photo_folder), "--out", str(out), "--max-patches", "40",
            "--workers", "1", "--flush-seconds", "0"]
    process = subprocess.Popen([sys.executable, str(REPO / "tools" / "train.py"), *args,
                                "--iters", "1000"], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    seen = 0
    while time.monotonic() < deadline and seen < 3 and process.poll() is None:
        time.sleep(0.1)
        seen = len(read_log(out / "train.log")["iter"]) if (out / "train.log").exists() else 0
    process.kill()  # SIGKILL: no handler, no snapshot, no final write
    process.wait(timeout=60)
    assert seen >= 3, process.stderr.read()
    lines = (out / "train.log").read_text().splitlines(keepends=True)
    assert all(line.endswith("\n") and line.count("\t") == 6 for line in lines)
    flushed = read_log(out / "train.log")["iter"]
    assert len(flushed) >= seen
    np.testing.assert_array_equal(flushed, np.arange(1, len(flushed) + 1))
    assert latest_snapshot(out) is None  # killed before the first snapshot (2000)

    rerun = run_tool(*args, "--iters", "2")  # starts again at iteration 0
    assert rerun.returncode == 0, rerun.stderr
    np.testing.assert_array_equal(read_log(out / "train.log")["iter"], [1, 2])
    assert f"dropped {len(flushed)} rows" in (out / "events.log").read_text()


def test_solver_files_are_messages_written_in_the_callers_order(tmp_path):
    solver = make_solver(net="a.prototxt", base_lr=1e-5, momentum=0, type="Adam",
                         solver_mode="GPU", test_iter=[2, 3], clip_gradients=10)
    text = solver_text(solver, order=("type", "net"))
    assert text.splitlines()[:2] == ['type: "Adam"', 'net: "a.prototxt"']
    for line in ("base_lr: 1e-05", "momentum: 0", "clip_gradients: 10", "solver_mode: GPU",
                 "test_iter: 2\ntest_iter: 3"):
        assert f"\n{line}\n" in text, line
    assert history_copies(solver) == 2
    path = write_solver(set_fields(solver, type=None, max_iter=5), tmp_path / "solver.prototxt")
    again = read_solver(path)
    assert again == solver and again.max_iter == 5 and history_copies(again) == 1
    with pytest.raises(ValueError, match="no field 'bogus'"):
        make_solver(bogus=1)


def regression_stepper(solver):
    loss = solver.net.blobs["loss"]

    def step():
        timed_step(solver)
        return dict(iter=solver.iter, loss=float(loss.data))
    return step


def test_any_run_kind_trains_and_a_loss_that_is_not_finite_stops_it(caffe, tmp_path):
    """run_solver on a net that is neither context, detector nor classifier."""
    n = caffe.NetSpec()
    n.data, n.target = caffe.layers.DummyData(
        shape=[dict(dim=[4, 3]), dict(dim=[4, 2])], ntop=2,
        data_filler=[dict(type="gaussian", std=1)] * 2)
    n.fc = caffe.layers.InnerProduct(n.data, num_output=2,
                                     weight_filler=dict(type="gaussian", std=1))
    n.loss = caffe.layers.EuclideanLoss(n.fc, n.target)
    (tmp_path / "net.prototxt").write_text(str(n.to_proto()))
    kind = RunKind(LogFormat(("iter", "loss"), (("loss", "Euclidean loss", None),)),
                   regression_stepper, "loss", describe_row)
    run_dir, messages = tmp_path / "run", []
    solver = make_solver(net=tmp_path / "net.prototxt", base_lr=0.01, lr_policy="fixed",
                         max_iter=100, snapshot=2, random_seed=0)
    path = write_solver(solver, tmp_path / "solver.prototxt")
    result = run_solver(caffe, path, run_dir, kind, RunSettings(5), log=messages.append)
    assert result["iter"] == 5 and result["reason"] == "max_iter"
    assert read_log(run_dir / "train.log")["iter"].tolist() == [1, 2, 3, 4, 5]
    assert [i for i, _ in snapshot_pairs(run_dir)] == [5, 4, 2]  # every 2 (the file), the end
    assert (run_dir / "training.png").stat().st_size > 1000

    write_solver(set_fields(solver, base_lr=1e30), path)
    with pytest.raises(DivergenceError, match="iteration 7: loss = (inf|nan)"):
        run_solver(caffe, path, run_dir, kind, RunSettings(50), log=messages.append)
    assert any("resuming from" in m and "model_iter_5" in m for m in messages)
    assert latest_snapshot(run_dir)[0] == 6  # iteration 7 (loss inf) is not snapshotted
    assert "last good snapshot" in (run_dir / "events.log").read_text()
