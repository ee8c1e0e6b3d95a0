"""train.log and training.png with O(1) work per training step.

- :class:`TrainLog` keeps train.log open for the whole run, buffers rows in
  memory and writes them in one ``write`` per flush: on a wall-clock interval
  and when the run stops (:meth:`TrainLog.close`), so a process killed
  between flushes loses only the unflushed rows and never leaves half a row
  behind from a flush. Opening it for a resumed run keeps each iteration once:
  rows after the restored iteration (steps whose snapshot was never written)
  are dropped, a later row for an iteration supersedes an earlier one, and a
  torn last line is removed.
- :class:`LogSummary` is the running summary the plot is drawn from: at most
  ``max_bins`` bins of consecutive rows (mean loss and accuracy per bin);
  when they fill up, neighbouring bins merge and the bin width doubles. An
  append is amortised O(1), a plot costs the same after 10^3 or 10^6 steps,
  and memory is bounded.
"""
import itertools
import os
from pathlib import Path

import numpy as np

LOG_COLUMNS = ("iter", "loss_per_pair", "accuracy", "pairs", "patches", "data_wait_s", "step_s")
HEADER = "\t".join(LOG_COLUMNS) + "\n"


def format_row(row):
    """One tab-separated train.log line (with its newline) for a row dict."""
    return "\t".join(str(row[column]) for column in LOG_COLUMNS) + "\n"


def parse_line(line):
    """A train.log line as a tuple of floats, or None if it is not a complete row."""
    if not line.endswith("\n"):
        return None
    fields = line.split("\t")
    if len(fields) != len(LOG_COLUMNS):
        return None
    try:
        return tuple(float(field) for field in fields)
    except ValueError:
        return None


def read_log(log_path):
    """train.log as {column: numpy array} (only complete rows)."""
    with open(log_path, encoding="utf-8") as log:
        rows = [row for row in map(parse_line, log) if row is not None]
    rows = np.array(rows, dtype=np.float64).reshape(-1, len(LOG_COLUMNS))
    return {name: rows[:, index] for index, name in enumerate(LOG_COLUMNS)}


class LogSummary:
    """Loss and accuracy of a run in at most ``max_bins`` bins of equal width (steps)."""

    def __init__(self, max_bins=2048):
        if max_bins < 2 or max_bins % 2:
            raise ValueError(f"LogSummary: max_bins must be even and >= 2, not {max_bins}")
        self.max_bins = max_bins
        self.width = 1
        self.bins = 0
        self.rows = 0
        self._iter = np.zeros(max_bins)
        self._loss = np.zeros(max_bins)
        self._accuracy = np.zeros(max_bins)
        self._count = np.zeros(max_bins)
        self._open = [0.0, 0.0, 0.0, 0]  # last iter, loss sum, accuracy sum, rows

    def add(self, iteration, loss, accuracy):
        """Add one step (amortised O(1))."""
        current = self._open
        current[0] = iteration
        current[1] += loss
        current[2] += accuracy
        current[3] += 1
        self.rows += 1
        if current[3] == self.width:
            if self.bins == self.max_bins:
                self._merge()  # the width doubles: the open bin is half full
                return
            index = self.bins
            self._iter[index], self._loss[index], self._accuracy[index], self._count[index] = \
                current
            self.bins += 1
            self._open = [0.0, 0.0, 0.0, 0]

    def _merge(self):
        half = self.max_bins // 2
        self._iter[:half] = self._iter[1::2]
        for array in (self._loss, self._accuracy, self._count):
            array[:half] = array[0::2] + array[1::2]
        self.bins, self.width = half, self.width * 2

    def series(self):
        """(iteration, mean loss, mean accuracy, rows) per bin, the open bin included."""
        n = self.bins
        arrays = [self._iter[:n], self._loss[:n], self._accuracy[:n], self._count[:n]]
        if self._open[3]:
            arrays = [np.append(array, value) for array, value in zip(arrays, self._open)]
        iters, loss, accuracy, count = arrays
        return iters, loss / np.maximum(count, 1), accuracy / np.maximum(count, 1), count


def plot_summary(summary, png_path, title, window=20):
    """Loss per pair and accuracy against iteration from a :class:`LogSummary`, as a PNG.

    Draws at most ``summary.max_bins`` points whatever the length of the run.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iters, loss, accuracy, _ = summary.series()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    raw = "per step" if summary.width == 1 else f"mean of {summary.width} steps"
    for axis, values, label in ((axes[0], loss, "loss per pair"),
                                (axes[1], accuracy, "accuracy (train batch)")):
        axis.plot(iters, values, alpha=0.35, lw=0.8, label=raw)
        if len(values) >= window:
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            axis.plot(iters[window - 1:], smooth, lw=2,
                      label=f"mean of {window * summary.width} steps")
        axis.set_xlabel("iteration")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        if len(values):
            axis.legend()
    axes[0].axhline(np.log(8), color="grey", ls="--", lw=1)
    axes[1].axhline(1 / 8, color="grey", ls="--", lw=1)
    fig.suptitle(f"{title}: dashed = chance")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def plot_log(log_path, png_path, window=20):
    """Plot a train.log file (offline use; the training loop plots its running summary)."""
    log = read_log(log_path)
    summary = LogSummary()
    for iteration, loss, accuracy in zip(log["iter"], log["loss_per_pair"], log["accuracy"]):
        summary.add(iteration, loss, accuracy)
    plot_summary(summary, png_path, Path(log_path).parent.name, window)


class TrainLog:
    """train.log of one run: kept open, rows buffered, one write per flush.

    Parameters
    ----------
    path : path of train.log (created with a header if missing).
    keep_through : iteration the run (re)starts from; existing rows after it
        are dropped (see the module docstring). None keeps every row.
    flush_seconds : write buffered rows when this many seconds have passed
        since the last write (checked on each append); 0 writes every row.
    clock : a monotonic clock in seconds (``time.monotonic``).

    Attributes: ``summary`` (a :class:`LogSummary` of every kept and new
    row), ``dropped`` (rows removed when opening).
    """

    def __init__(self, path, keep_through=None, flush_seconds=10.0, clock=None, max_bins=2048):
        import time
        self.path = Path(path)
        self.flush_seconds = flush_seconds
        self._clock = clock or time.monotonic
        self.summary = LogSummary(max_bins)
        self.dropped = 0
        self._pending = []
        self._file = None
        self._prepare(keep_through)
        self._file = open(self.path, "ab", buffering=0)
        self._last_flush = self._clock()

    def _prepare(self, keep_through):
        """Keep each iteration <= keep_through once, in order; rewrite the file only if needed."""
        if not self.path.exists():
            self.path.write_text(HEADER, encoding="utf-8")
            return
        kept, changed = [], False  # kept: (iteration, line, row), strictly increasing
        with open(self.path, encoding="utf-8", errors="replace") as log:
            first = log.readline()
            changed = first != HEADER
            for line in log if first == HEADER else itertools.chain([first], log):
                row = parse_line(line)
                if row is None or (keep_through is not None and row[0] > keep_through):
                    changed = True
                    self.dropped += row is not None
                    continue
                while kept and kept[-1][0] >= row[0]:  # a later run superseded these
                    kept.pop()
                    self.dropped += 1
                    changed = True
                kept.append((row[0], line, row))
        if changed:
            temporary = self.path.with_name(self.path.name + ".tmp")
            with open(temporary, "w", encoding="utf-8") as out:
                out.write(HEADER)
                out.writelines(line for _, line, _ in kept)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.path)
        for iteration, _, row in kept:
            self.summary.add(iteration, row[1], row[2])

    def append(self, row):
        """Buffer one row (a dict with LOG_COLUMNS); writes if the flush interval has passed."""
        self._pending.append(format_row(row))
        self.summary.add(row["iter"], row["loss_per_pair"], row["accuracy"])
        if self._clock() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self):
        """Write every buffered row in one write call."""
        if self._pending and self._file is not None:
            data = "".join(self._pending).encode("utf-8")
            view = memoryview(data)
            while view:
                view = view[self._file.write(view):]
            self._pending.clear()
        self._last_flush = self._clock()

    def close(self):
        """Flush and close (idempotent)."""
        if self._file is not None:
            try:
                self.flush()
            finally:
                self._file.close()
                self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
