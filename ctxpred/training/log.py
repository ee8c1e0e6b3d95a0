"""train.log and training.png with O(1) work per training step.

- :class:`TrainLog` keeps train.log open for the whole run, buffers rows in
  memory and writes them in one ``write`` per flush: on a wall-clock interval
  and when the run stops (:meth:`TrainLog.close`), so a process killed
  between flushes loses only the unflushed rows and never leaves half a row
  behind from a flush. Opening it for a resumed run keeps each iteration once:
  rows after the restored iteration (steps whose snapshot was never written)
  are dropped, a later row for an iteration supersedes an earlier one, and a
  torn last line is removed.
- :class:`LogFormat` names a kind of run's columns (``iter`` first) and the
  columns its plot shows; context training, the detector and the classifier
  each have one, and :func:`read_log` reads any of them by its header line.
- :class:`LogSummary` is the running summary the plot is drawn from: at most
  ``max_bins`` bins of consecutive rows (mean of each plotted column per bin);
  when they fill up, neighbouring bins merge and the bin width doubles. An
  append is amortised O(1), a plot costs the same after 10^3 or 10^6 steps,
  and memory is bounded.
"""
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class LogFormat:
    """The train.log columns of a kind of run (``iter`` first) and what its plot shows.

    panels: one (column, axis label, chance level or None) per plot panel; a
    chance level is drawn as a dashed line.
    """
    columns: tuple
    panels: tuple

    @property
    def header(self):
        return "\t".join(self.columns) + "\n"

    @property
    def plotted(self):
        """Indices of the plotted columns in a row."""
        return tuple(self.columns.index(column) for column, _, _ in self.panels)

    def format_row(self, row):
        """One tab-separated train.log line (with its newline) for a row dict."""
        return "\t".join(str(row[column]) for column in self.columns) + "\n"

    def parse_line(self, line):
        """A train.log line as a tuple of floats, or None if it is not a complete row."""
        if not line.endswith("\n"):
            return None
        fields = line.split("\t")
        if len(fields) != len(self.columns):
            return None
        try:
            return tuple(float(field) for field in fields)
        except ValueError:
            return None


LOG_COLUMNS = ("iter", "loss_per_pair", "accuracy", "pairs", "patches", "data_wait_s", "step_s")
CONTEXT_LOG = LogFormat(LOG_COLUMNS, (("loss_per_pair", "loss per pair", float(np.log(8))),
                                      ("accuracy", "accuracy (train batch)", 1 / 8)))
HEADER = CONTEXT_LOG.header


def read_log(log_path):
    """train.log as {column: numpy array} (only complete rows), the columns named by its
    header line."""
    with open(log_path, encoding="utf-8") as log:
        log_format = LogFormat(tuple(log.readline().rstrip("\n").split("\t")), ())
        rows = [row for row in map(log_format.parse_line, log) if row is not None]
    rows = np.array(rows, dtype=np.float64).reshape(-1, len(log_format.columns))
    return {name: rows[:, index] for index, name in enumerate(log_format.columns)}


class LogSummary:
    """``values`` plotted columns of a run in at most ``max_bins`` bins of equal width (steps)."""

    def __init__(self, max_bins=2048, values=2):
        if max_bins < 2 or max_bins % 2:
            raise ValueError(f"LogSummary: max_bins must be even and >= 2, not {max_bins}")
        self.max_bins = max_bins
        self.width = 1
        self.bins = 0
        self.rows = 0
        self._iter = np.zeros(max_bins)
        self._sums = np.zeros((max_bins, values))
        self._count = np.zeros(max_bins)
        self._open = [0.0, np.zeros(values), 0]  # last iter, sums, rows

    def add(self, iteration, *values):
        """Add one step's plotted values (amortised O(1))."""
        current = self._open
        current[0] = iteration
        current[1] += values
        current[2] += 1
        self.rows += 1
        if current[2] == self.width:
            if self.bins == self.max_bins:
                self._merge()  # the width doubles: the open bin is half full
                return
            index = self.bins
            self._iter[index], self._sums[index], self._count[index] = current
            self.bins += 1
            self._open = [0.0, np.zeros_like(current[1]), 0]

    def _merge(self):
        half = self.max_bins // 2
        self._iter[:half] = self._iter[1::2]
        for array in (self._sums, self._count):
            array[:half] = array[0::2] + array[1::2]
        self.bins, self.width = half, self.width * 2

    def series(self):
        """(iteration, mean of each plotted column..., rows) per bin, the open bin included."""
        n = self.bins
        iters, sums, count = self._iter[:n], self._sums[:n], self._count[:n]
        if self._open[2]:
            iters, count = np.append(iters, self._open[0]), np.append(count, self._open[2])
            sums = np.vstack([sums, self._open[1]])
        means = sums / np.maximum(count, 1)[:, None]
        return (iters, *means.T, count)


def plot_summary(summary, png_path, title, window=20, log_format=CONTEXT_LOG):
    """The plotted columns against iteration from a :class:`LogSummary`, as a PNG.

    Draws at most ``summary.max_bins`` points whatever the length of the run.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iters, *means, _ = summary.series()
    panels = log_format.panels
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    raw = "per step" if summary.width == 1 else f"mean of {summary.width} steps"
    for axis, values, (_, label, chance) in zip(axes[0], means, panels):
        axis.plot(iters, values, alpha=0.35, lw=0.8, label=raw)
        if len(values) >= window:
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            axis.plot(iters[window - 1:], smooth, lw=2,
                      label=f"mean of {window * summary.width} steps")
        if chance is not None:
            axis.axhline(chance, color="grey", ls="--", lw=1)
        axis.set_xlabel("iteration")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        if len(values):
            axis.legend()
    chance = any(chance is not None for _, _, chance in panels)
    fig.suptitle(f"{title}: dashed = chance" if chance else title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def plot_log(log_path, png_path, window=20, log_format=CONTEXT_LOG):
    """Plot a train.log file (offline use; the training loop plots its running summary)."""
    log = read_log(log_path)
    summary = LogSummary(values=len(log_format.panels))
    columns = [log[column] for column, _, _ in log_format.panels]
    for iteration, *values in zip(log["iter"], *columns):
        summary.add(iteration, *values)
    plot_summary(summary, png_path, Path(log_path).parent.name, window, log_format)


class TrainLog:
    """train.log of one run: kept open, rows buffered, one write per flush.

    Parameters
    ----------
    path : path of train.log (created with a header if missing).
    log_format : its :class:`LogFormat` (context training's by default).
    keep_through : iteration the run (re)starts from; existing rows after it
        are dropped (see the module docstring). None keeps every row.
    flush_seconds : write buffered rows when this many seconds have passed
        since the last write (checked on each append); 0 writes every row.
    clock : a monotonic clock in seconds (``time.monotonic``).

    Attributes: ``summary`` (a :class:`LogSummary` of every kept and new
    row), ``dropped`` (rows removed when opening).
    """

    def __init__(self, path, keep_through=None, flush_seconds=10.0, clock=None, max_bins=2048,
                 log_format=CONTEXT_LOG):
        import time
        self.path = Path(path)
        self.format = log_format
        self._plotted = log_format.plotted
        self.flush_seconds = flush_seconds
        self._clock = clock or time.monotonic
        self.summary = LogSummary(max_bins, len(self._plotted))
        self.dropped = 0
        self._pending = []
        self._file = None
        self._prepare(keep_through)
        self._file = open(self.path, "ab", buffering=0)
        self._last_flush = self._clock()

    def _prepare(self, keep_through):
        """Keep each iteration <= keep_through once, in order; rewrite the file only if needed."""
        header = self.format.header
        if not self.path.exists():
            self.path.write_text(header, encoding="utf-8")
            return
        kept, changed = [], False  # kept: (iteration, line, row), strictly increasing
        with open(self.path, encoding="utf-8", errors="replace") as log:
            first = log.readline()
            changed = first != header
            for line in log if first == header else itertools.chain([first], log):
                row = self.format.parse_line(line)
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
                out.write(header)
                out.writelines(line for _, line, _ in kept)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.path)
        for iteration, _, row in kept:
            self.summary.add(iteration, *(row[index] for index in self._plotted))

    def append(self, row):
        """Buffer one row (a dict with the format's columns); writes if the flush interval has
        passed."""
        line = self.format.format_row(row)
        self._pending.append(line)
        self.summary.add(row["iter"], *(row[column] for column, _, _ in self.format.panels))
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
