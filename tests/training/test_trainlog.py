"""train.log buffering, resume de-duplication and the plot's running summary (no Caffe needed)."""
import types

import numpy as np
import pytest

from ctxpred.training.log import HEADER, LogSummary, TrainLog, plot_summary, read_log
from ctxpred.training.context_run import choose_device, default_workers, describe_context_row
from ctxpred.training.loop import progress_printer


class Clock:
    """A settable monotonic clock."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def row(iteration, loss=2.0, accuracy=0.125):
    return dict(iter=iteration, loss_per_pair=loss, accuracy=accuracy, pairs=20, patches=18,
                data_wait_s=0.0, step_s=0.01)


def data_lines(path):
    return path.read_text().splitlines()[1:]


def test_rows_are_buffered_until_the_interval_then_written_whole(tmp_path):
    path, clock = tmp_path / "train.log", Clock()
    log = TrainLog(path, flush_seconds=10, clock=clock)
    for iteration in (1, 2, 3):
        log.append(row(iteration))
        clock.now += 3
    assert path.read_text() == HEADER  # 9 s: nothing written yet
    clock.now += 1
    log.append(row(4))  # 13 s since the last write: one write of four rows
    assert [int(line.split("\t")[0]) for line in data_lines(path)] == [1, 2, 3, 4]
    log.append(row(5))
    assert len(data_lines(path)) == 4
    log.close()  # a stop writes the rest
    np.testing.assert_array_equal(read_log(path)["iter"], [1, 2, 3, 4, 5])


def test_open_keeps_each_iteration_once_up_to_the_restored_one(tmp_path):
    path = tmp_path / "train.log"
    lines = [HEADER] + [f"{i}\t{i}.0\t0.1\t20\t18\t0.0\t0.01\n" for i in (1, 2, 3, 4, 5)]
    # a resume from iteration 2 wrote 3 and 4 again (without dedup), then a kill tore a row
    lines += [f"{i}\t{10 * i}.0\t0.2\t20\t18\t0.0\t0.01\n" for i in (3, 4)] + ["5\t2.07"]
    path.write_text("".join(lines))
    log = TrainLog(path, keep_through=4)
    assert log.dropped == 3  # the first 3 and 4 (superseded) and 5 (after iteration 4)
    log.append(row(5, loss=7.0))
    log.close()
    kept = read_log(path)
    np.testing.assert_array_equal(kept["iter"], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(kept["loss_per_pair"], [1, 2, 30, 40, 7])
    assert log.summary.rows == 5
    assert path.read_text().startswith(HEADER) and path.read_text().endswith("\n")


def test_open_from_scratch_drops_every_row_and_keeps_an_intact_log_untouched(tmp_path):
    path = tmp_path / "train.log"
    path.write_text(HEADER + "1\t2.0\t0.1\t20\t18\t0.0\t0.01\n")
    before = path.stat().st_mtime_ns, path.stat().st_ino
    TrainLog(path, keep_through=1).close()
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before  # nothing to rewrite
    assert TrainLog(path, keep_through=0).dropped == 1
    assert path.read_text() == HEADER


def test_summary_is_bounded_and_keeps_exact_means():
    summary = LogSummary(max_bins=64)
    values = np.random.default_rng(0).uniform(1, 3, 100_003)
    for iteration, value in enumerate(values, start=1):
        summary.add(iteration, value, value / 10)
    iters, loss, accuracy, count = summary.series()
    assert summary.bins <= 64 and len(iters) <= 65 and summary.width == 2048
    assert count.sum() == 100_003 and iters[-1] == 100_003
    assert np.all(np.diff(iters) > 0)
    np.testing.assert_allclose((loss * count).sum() / count.sum(), values.mean(), rtol=1e-9)
    np.testing.assert_allclose(loss[0], values[:2048].mean(), rtol=1e-9)
    np.testing.assert_allclose(accuracy, loss / 10, rtol=1e-9)


def test_plot_from_summary_names_the_bin_width(tmp_path):
    summary = LogSummary(max_bins=16)
    for iteration in range(1, 101):
        summary.add(iteration, 2.0 - iteration / 100, 0.1 + iteration / 1000)
    plot_summary(summary, tmp_path / "training.png", "run")
    assert (tmp_path / "training.png").stat().st_size > 1000
    assert summary.width == 8


def test_default_workers_leave_a_core_for_the_solver_on_a_gpu():
    assert default_workers(None) == 2
    assert default_workers(0, cpu_count=16) == 15
    assert default_workers(0, cpu_count=1) == 1
    assert default_workers(0) >= 1


def test_choose_device_prefers_a_usable_gpu_and_says_why():
    usable = types.SimpleNamespace(usable=True, reason="GPU 0 of 1, CUDA runtime 13.0")
    unusable = types.SimpleNamespace(usable=False, reason="CPU-only Caffe build.")
    assert choose_device("auto", usable) == (0, "GPU 0 of 1, CUDA runtime 13.0")
    assert choose_device("auto", unusable) == (None, "CPU (no usable GPU: CPU-only Caffe build)")
    assert choose_device("cpu", usable)[0] is None
    with pytest.raises(ValueError, match="CPU-only Caffe build"):
        choose_device("gpu", unusable)


def test_progress_lines_are_paced_by_wall_clock(capsys):
    clock = Clock()
    show = progress_printer(1000, 0, every_seconds=10, clock=clock,
                            describe=describe_context_row)
    for iteration in range(1, 301):  # 300 steps of 0.125 s
        show(row(iteration))
        clock.now += 0.125
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["iter 1", "iter 81", "iter 161", "iter 241"]
    assert lines[0] == "iter 1: loss/pair 2.0000 acc 0.125 step 0.01s wait 0.00s"


def test_progress_lines_of_any_run_kind_name_their_columns(capsys):
    show = progress_printer(10, 0)
    show(dict(iter=1, loss_cls=0.6931, loss_bbox=0.25, step_s=1.5))
    assert capsys.readouterr().out == "iter 1: loss_cls 0.6931 loss_bbox 0.25 step_s 1.5\n"
