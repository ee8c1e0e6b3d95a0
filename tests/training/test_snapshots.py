"""Faults during training: atomic snapshots, damaged pairs, full disk, the run lock, Ctrl-C.

Real Caffe, real processes: kills are SIGKILL, interrupts are SIGINT, the full
disk is a small tmpfs (mounted when the tests run as root).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ctxpred.training import snapshots
from ctxpred.data.layer import close_data_layers
from ctxpred.training.context_run import RunConfig, train, write_run_files
from ctxpred.training.log import read_log
from ctxpred.training.snapshots import latest_snapshot

REPO = Path(__file__).resolve().parents[2]
SMALL = (("max_patches", 40),)


_GLOG = re.compile(r"^([IWEF]\d{8} |WARNING: Logging before InitGoogleLogging)")


def own_lines(stderr):
    """stderr without Caffe's own glog lines (a CUDA build logs at import on a GPU-less host)."""
    return [line for line in stderr.strip().splitlines() if line and not _GLOG.match(line)]


def tool_args(photo_folder, out, *extra):
    return [sys.executable, str(REPO / "tools" / "train.py"), "--images", str(photo_folder),
            "--out", str(out), "--max-patches", "40", "--workers", "1", *extra]


def run_tool(photo_folder, out, *extra):
    return subprocess.run(tool_args(photo_folder, out, *extra), capture_output=True, text=True,
                          cwd=REPO, timeout=600)


def start_tool(photo_folder, out, *extra):
    """Start tools/train.py and return it once its first step is done."""
    process = subprocess.Popen(tool_args(photo_folder, out, "--iters", "100000", *extra),
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    line = ""
    while not line.startswith("iter 1:"):
        line = process.stdout.readline()
        assert line, process.stderr.read()
    return process


def wait_for(predicate, process, seconds=300, poll=0.001):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        if predicate():
            return True
        time.sleep(poll)
    return predicate()


def small_run(tmp_path, photo_folder):
    run_dir = tmp_path / "run"
    return run_dir, write_run_files(run_dir, RunConfig(images=str(photo_folder), workers=1,
                                                       data=SMALL))


def verify_all(caffe, run_dir):
    """verify_snapshot on every visible pair (raises if one is damaged)."""
    from caffe.proto import caffe_pb2
    net = caffe.Net(str(run_dir / "train.prototxt"), caffe.TRAIN)
    try:
        return [snapshots.verify_snapshot(caffe_pb2, net, state)
                for _, state in snapshots.snapshot_pairs(run_dir)]
    finally:
        close_data_layers(net)


@pytest.fixture(scope="module")
def two_pairs(caffe, tmp_path_factory, photo_folder):
    """A run folder with the pairs of iterations 1 and 2 (snapshot every step)."""
    run_dir, solver = small_run(tmp_path_factory.mktemp("pairs"), photo_folder)
    train(caffe, solver, run_dir, max_iter=2, snapshot_every=1, log=lambda *_: None)
    return run_dir


def damaged_copy(source, tmp_path, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    damage(run_dir)
    return run_dir


def truncate(path, fraction):
    with open(path, "r+b") as handle:
        handle.truncate(int(path.stat().st_size * fraction))


def drop_last(kind, field):
    def damage(run_dir):
        from caffe.proto import caffe_pb2
        path = run_dir / f"model_iter_2.{kind}"
        message = getattr(caffe_pb2, "SolverState" if kind == "solverstate" else "NetParameter")()
        message.ParseFromString(path.read_bytes())
        del getattr(message, field)[-1]  # a file cut exactly at a field boundary still parses
        path.write_bytes(message.SerializeToString())
    return damage


DAMAGES = {
    "state cut in half": lambda d: truncate(d / "model_iter_2.solverstate", 0.5),
    "model cut short": lambda d: truncate(d / "model_iter_2.caffemodel", 0.97),
    "model missing": lambda d: (d / "model_iter_2.caffemodel").unlink(),
    "state empty": lambda d: truncate(d / "model_iter_2.solverstate", 0),
    "state lacks a history blob": drop_last("solverstate", "history"),
    "model lacks its last layer": drop_last("caffemodel", "layer"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_resume_moves_a_damaged_pair_aside_and_uses_the_previous(caffe, tmp_path, two_pairs,
                                                                 damage):
    run_dir = damaged_copy(two_pairs, tmp_path, DAMAGES[damage])
    solver = run_dir / "solver.prototxt"
    messages = []
    result = train(caffe, solver, run_dir, max_iter=3, snapshot_every=1, log=messages.append)
    assert any("model_iter_2.solverstate is damaged" in m for m in messages), messages
    assert any("resuming from" in m and "model_iter_1.solverstate" in m for m in messages)
    assert (run_dir / "damaged" / "model_iter_2.solverstate").exists()
    assert result["iter"] == 3 and latest_snapshot(run_dir)[0] == 3
    np.testing.assert_array_equal(read_log(run_dir / "train.log")["iter"], [1, 2, 3])


def test_a_pair_of_another_net_is_refused_not_moved(caffe, tmp_path, two_pairs):
    from caffe.proto import caffe_pb2
    run_dir = damaged_copy(two_pairs, tmp_path, lambda d: None)
    other = tmp_path / "other"
    write_run_files(other, RunConfig(net="projection", images=str(two_pairs), workers=1,
                                     factorized_head=False, data=SMALL))
    net = caffe.Net(str(other / "train.prototxt"), caffe.TRAIN)
    try:
        with pytest.raises(snapshots.IncompatibleSnapshot, match="layers of another net"):
            snapshots.find_resume(caffe_pb2, net, run_dir, log=lambda *_: None)
    finally:
        close_data_layers(net)
    assert latest_snapshot(run_dir)[0] == 2 and not (run_dir / "damaged").exists()


def test_tool_resumes_past_a_damaged_pair_instead_of_aborting(tmp_path, two_pairs):
    run_dir = damaged_copy(two_pairs, tmp_path, DAMAGES["state cut in half"])
    images = json.loads((run_dir / "run.json").read_text())["images"]
    result = run_tool(images, run_dir, "--iters", "2")
    assert result.returncode == 0, result.stderr[-2000:]  # Caffe aborted here (134) before
    assert "is damaged" in result.stdout and "model_iter_1.solverstate" in result.stdout
    assert latest_snapshot(run_dir)[0] == 2


def test_snapshot_every_minutes_and_keep(caffe, tmp_path, photo_folder):
    run_dir, solver = small_run(tmp_path, photo_folder)
    train(caffe, solver, run_dir, max_iter=7, snapshot_every=2, snapshot_minutes=None, keep=2,
          log=lambda *_: None)
    assert [i for i, _ in snapshots.snapshot_pairs(run_dir)] == [7, 6]
    assert sorted(p.name for p in run_dir.glob("model_iter_*")) == [
        "model_iter_6.caffemodel", "model_iter_6.solverstate",
        "model_iter_7.caffemodel", "model_iter_7.solverstate"]
    train(caffe, solver, run_dir, max_iter=10, snapshot_every=0, snapshot_minutes=1e-9, keep=3,
          log=lambda *_: None)  # by wall clock: after every step here
    assert [i for i, _ in snapshots.snapshot_pairs(run_dir)] == [10, 9, 8]
    assert not list(run_dir.glob(".part_iter_*"))


def test_a_failed_step_leaves_a_snapshot_of_the_last_completed_one(caffe, tmp_path,
                                                                   photo_folder):
    run_dir, solver = small_run(tmp_path, photo_folder)

    def fail_at_three(row):
        if row["iter"] == 3:
            raise RuntimeError("a loader worker died")

    with pytest.raises(RuntimeError, match="loader worker died"):
        train(caffe, solver, run_dir, max_iter=50, snapshot_minutes=None, progress=fail_at_three,
              log=lambda *_: None)
    assert latest_snapshot(run_dir)[0] == 3
    assert "failed at iteration 3" in (run_dir / "events.log").read_text()


def test_kill_during_a_snapshot_never_exposes_a_partial_pair(caffe, tmp_path, photo_folder):
    out = tmp_path / "run"
    process = start_tool(photo_folder, out, "--snapshot-every", "1", "--keep", "3")
    try:
        # a later snapshot being written while an earlier pair exists
        writing = wait_for(lambda: latest_snapshot(out) is not None
                           and any(out.glob(".part_iter_*")), process)
    finally:
        process.kill()  # SIGKILL while Caffe writes under the temporary names
        process.communicate(timeout=60)
    assert writing, "no snapshot was seen being written under a temporary name"
    assert verify_all(caffe, out)  # every visible pair is complete
    newest = latest_snapshot(out)[0]
    rerun = run_tool(photo_folder, out, "--iters", str(newest + 1))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"model_iter_{newest}.solverstate (iteration {newest})" in rerun.stdout
    assert not list(out.glob(".part_iter_*"))


def test_second_ctrl_c_during_the_final_snapshot_finishes_it(tmp_path, photo_folder):
    out = tmp_path / "run"
    process = start_tool(photo_folder, out, "--snapshot-minutes", "0")
    process.send_signal(signal.SIGINT)
    writing = wait_for(lambda: any(out.glob(".part_iter_*")), process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert writing, stderr
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr and "finishing the snapshot" in stderr
    steps = len(read_log(out / "train.log")["iter"])
    assert latest_snapshot(out)[0] == steps


def test_one_trainer_per_run_folder_and_a_stale_lock_is_taken_over(tmp_path, photo_folder):
    out = tmp_path / "run"
    first = start_tool(photo_folder, out, "--snapshot-minutes", "0")
    try:
        second = run_tool(photo_folder, out, "--iters", "1")
        assert second.returncode == 2
        assert f"run folder {out} is in use by the trainer with PID {first.pid}" in second.stderr
        assert len(own_lines(second.stderr)) == 1 and "Traceback" not in second.stderr
    finally:
        first.kill()  # SIGKILL: the lock file stays behind with its PID
        first.communicate(timeout=60)
    assert (out / "lock").read_text().strip() == str(first.pid)
    third = run_tool(photo_folder, out, "--iters", "1", "--snapshot-minutes", "0")
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"took over the lock left by PID {first.pid}" in (out / "events.log").read_text()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs of 0.8 GB: room for one snapshot pair of the AlexNet net (0.51 GB), not two."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=800m", "tmpfs",
                                            str(mount)], capture_output=True).returncode:
        pytest.skip("needs root and tmpfs to make a real full file system")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_during_a_snapshot_is_one_line_and_keeps_the_previous_pair(
        caffe, small_tmpfs, photo_folder):
    out = small_tmpfs / "run"
    result = run_tool(photo_folder, out, "--iters", "3", "--snapshot-every", "1")
    assert result.returncode == 1, result.stderr[-2000:]
    error = own_lines(result.stderr)
    assert len(error) == 1 and "Traceback" not in result.stderr, result.stderr
    assert error[0].startswith(f"error: no space left on device in {out.resolve()}")
    assert "kept model_iter_1.solverstate" in error[0]
    assert [i for i, _ in snapshots.snapshot_pairs(out)] == [1]
    verify_all(caffe, out)
    assert not list(out.glob(".part_iter_*"))

    filler = small_tmpfs / "filler"  # now nothing at all is left: train.log cannot grow
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * (1 << 20))
                handle.flush()
        except OSError:
            pass
    full = run_tool(photo_folder, out, "--iters", "3", "--flush-seconds", "0")
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-2000:]
    assert len(own_lines(full.stderr)) == 1, full.stderr
    assert own_lines(full.stderr)[0].startswith("error: no space left on device in ")
    assert [i for i, _ in snapshots.snapshot_pairs(out)] == [1]

    filler.unlink()  # the next run starts from the kept pair (a new one needs room for two)
    again = run_tool(photo_folder, out, "--iters", "1")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "model_iter_1.solverstate (iteration 1)" in again.stdout
    np.testing.assert_array_equal(read_log(out / "train.log")["iter"], [1])


def test_disk_filling_up_while_training_stops_with_one_line(small_tmpfs, photo_folder):
    out = small_tmpfs / "run"
    process = start_tool(photo_folder, out, "--snapshot-minutes", "0", "--flush-seconds", "0")
    filler = small_tmpfs / "filler"
    with open(filler, "wb") as handle:  # fill the file system while the run goes on
        try:
            while True:
                handle.write(b"\0" * (1 << 20))
                handle.flush()
        except OSError:
            pass
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr[-2000:]
    assert "Traceback" not in stderr and len(own_lines(stderr)) == 1, stderr
    assert own_lines(stderr)[0].startswith(f"error: no space left on device in {out}")
    assert "warning: cannot write events.log" in stdout
    rows = read_log(out / "train.log")["iter"]  # what was written is whole
    np.testing.assert_array_equal(rows, np.arange(1, len(rows) + 1))
