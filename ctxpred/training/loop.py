"""The one loop that runs a Caffe solver, for context training, the detector and the classifier.

- A run lives in one folder: the solver and net prototxts its caller wrote,
  ``model_iter_N.{caffemodel,solverstate}`` snapshots, ``events.log`` (resume,
  stop and divergence messages), ``train.log`` (one tab-separated line per
  step in the columns of its :class:`RunKind`, buffered and written every
  few seconds and on every stop) and ``training.png`` (redrawn on a
  wall-clock interval from a running summary; see ctxpred.training.log).
- Resume: the newest intact ``model_iter_N.solverstate`` in the folder is
  restored (ctxpred.training.snapshots verifies it first); train.log rows after
  its iteration are dropped. A fresh run can be initialised by the caller.
- Stop cleanly: SIGINT / SIGTERM, a file named ``pause`` or ``quit`` in the
  folder, or the time budget ends the loop after the current step with a
  snapshot. Snapshots are atomic; the folder is locked for one trainer.
- Per-step work is O(1): nothing re-reads a file or grows with the run.
- Divergence watch (reference): a logged loss that is not finite; every 100
  steps the norm of each non-BatchNorm parameter layer's weights and of their
  change since the last check are recorded; a change that is NaN or over 10x
  the previous one, a NaN or > 1e10 sum of fc8's weights, or a NaN or > 1e8
  max |pool1 diff| stops training without snapshotting the bad state.
"""
import collections
import contextlib
import importlib
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ctxpred.cli import DIVERGED
from ctxpred.data.layer import close_data_layers
from ctxpred.training import snapshots
from ctxpred.training.log import LogFormat, TrainLog, plot_summary
from ctxpred.training.solvers import history_copies, read_solver

STOP_FILES = ("pause", "quit")


class DivergenceError(RuntimeError):
    """Training diverged; the message says what was seen and what was kept."""

    exit_code = DIVERGED


@dataclass(frozen=True)
class RunKind:
    """What one kind of run logs per step.

    log_format: its train.log columns and plot panels.
    stepper: ``stepper(solver)`` returns a function that runs one solver step
        and returns its train.log row (a dict with the format's columns);
        blobs are looked up once there, not per step.
    loss: the row's loss column (a value that is not finite stops training).
    describe: a row as a short text for progress lines.
    note: ``note(net)``, text appended to the stop messages (e.g. skipped images).
    """
    log_format: LogFormat
    stepper: Callable
    loss: str
    describe: Callable
    note: Callable = lambda net: ""


def timed_step(solver):
    """Run one solver step; returns its wall-clock seconds."""
    started = time.perf_counter()
    solver.step(1)
    return time.perf_counter() - started


def move_aside(run_dir):
    """Rename an existing run folder to ``<name>.old-<timestamp>``; returns the new path."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return None
    target = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.rename(target)
    return target


class StopRequests:
    """SIGINT / SIGTERM and pause / quit files, as one "please stop" flag.

    A second Ctrl-C stops at once (KeyboardInterrupt), except inside
    :meth:`critical` (a snapshot being written): there it only says that the
    snapshot is being finished, and a third Ctrl-C abandons it (raising
    KeyboardInterrupt with what is lost in the message).
    """

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.reason = None
        self._previous = {}
        self._critical = None
        self._pressed_in_critical = 0

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum, frame):
        if self.reason is None or signum != signal.SIGINT:
            self.reason = self.reason or signal.Signals(signum).name
            return
        if self._critical is None:
            raise KeyboardInterrupt("a second Ctrl-C: stopped at once")
        self._pressed_in_critical += 1
        if self._pressed_in_critical == 1:
            os.write(2, f"\nfinishing {self._critical}; Ctrl-C again to abandon it\n".encode())
            return
        raise KeyboardInterrupt(f"a third Ctrl-C: abandoned {self._critical}")

    @contextlib.contextmanager
    def critical(self, what):
        """A section a second Ctrl-C lets finish (``what`` names it in messages)."""
        self._critical, self._pressed_in_critical = what, 0
        try:
            yield
        finally:
            self._critical = None

    def requested(self):
        if self.reason is None:
            for name in STOP_FILES:
                if (self.run_dir / name).exists():
                    self.reason = f"'{name}' file"
        return self.reason


class DivergenceWatch:
    """The reference's checks on weights and gradients, every ``every`` steps."""

    def __init__(self, net, every=100, history=1000):
        self.net = net
        self.every = every
        self.layers = [name for name, layer in zip(net._layer_names, net.layers)
                       if name in net.params and layer.type != "BatchNorm"]
        self._pool1 = net.blobs.get("pool1")
        self._last_weights = self._weights()
        self._last_change = None
        self.history = collections.deque(maxlen=history)  # the latest checks

    def _weights(self):
        return {name: self.net.params[name][0].data.copy() for name in self.layers}

    def _check_blobs(self, iteration):
        if self._pool1 is not None:
            diff = self._pool1.diff
            pool1 = float(max(diff.max(), -diff.min()))  # NaN propagates
            if not np.isfinite(pool1) or pool1 > 1e8:
                raise DivergenceError(f"iteration {iteration}: max |pool1 diff| = {pool1}")
        if "fc8" in self.net.params:
            fc8 = float(self.net.params["fc8"][0].data.sum())
            if not np.isfinite(fc8) or abs(fc8) > 1e10:
                raise DivergenceError(f"iteration {iteration}: sum of fc8 weights = {fc8}")

    def check(self, iteration):
        """Raises DivergenceError if the net diverged; records norms every ``every`` steps."""
        if iteration % self.every:
            return
        self._check_blobs(iteration)
        weights = self._weights()
        change = {name: float(np.linalg.norm(weights[name] - self._last_weights[name]))
                  for name in self.layers}
        norms = {name: float(np.linalg.norm(weights[name])) for name in self.layers}
        self.history.append({"iter": iteration, "norm": norms, "change": change})
        for name in self.layers:
            previous = self._last_change[name] if self._last_change else None
            if not np.isfinite(change[name]) or (previous and change[name] > 10 * previous):
                raise DivergenceError(
                    f"iteration {iteration}: update of {name} jumped to {change[name]:.4g} "
                    f"(previous {previous if previous is None else format(previous, '.4g')})")
        self._last_weights, self._last_change = weights, change


def describe_row(row):
    """A train.log row as ``name value`` pairs (the generic progress text)."""
    return " ".join(f"{name} {value:.4g}" for name, value in row.items() if name != "iter")


def progress_printer(total, start, every_seconds=10.0, clock=time.monotonic,
                     describe=describe_row):
    """A progress callback: a tqdm bar on a terminal, else a line every ``every_seconds``.

    The line (``iter N: describe(row)``) is printed for the first step and
    then at most every ``every_seconds`` of wall clock, so a fast (GPU) run
    does not flood a log.
    """
    import sys
    if sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True)

        def show(row):
            # tqdm redraws at most every mininterval; no forced refresh per step
            bar.set_postfix_str(describe(row), refresh=False)
            bar.update(row["iter"] - bar.n)
        return show

    last = [None]

    def show(row):
        now = clock()
        if last[0] is None or now - last[0] >= every_seconds:
            last[0] = now
            print(f"iter {row['iter']}: {describe(row)}", flush=True)
    return show


class TrainingLoop:
    """One training step and its bookkeeping, O(1) per step whatever the run's length.

    Each :meth:`step` runs the kind's step function (one ``solver.step(1)``
    and its train.log row), checks the loss and runs the divergence watch
    (its weight checks every ``watch_every`` steps), buffers the row in
    :class:`ctxpred.training.log.TrainLog` (written every ``flush_seconds``)
    and redraws training.png from the log's running summary when
    ``plot_seconds`` of wall clock have passed (None: only on :meth:`close`).
    ``close`` flushes the log; call it on every stop.
    """

    def __init__(self, solver, run_dir, kind, plot_seconds=60.0, flush_seconds=10.0,
                 progress=None, stop=None, deadline=None, watch_every=100, clock=time.monotonic):
        self.solver = solver
        self.kind = kind
        self.run_dir = Path(run_dir)
        self.png_path = self.run_dir / "training.png"
        self.plot_seconds = plot_seconds
        self.progress = progress
        self.stop, self.deadline = stop, deadline
        self._clock = clock
        self._step = kind.stepper(solver)
        self.watch = DivergenceWatch(solver.net, every=watch_every)
        self.log = TrainLog(self.run_dir / "train.log", keep_through=solver.iter,
                            flush_seconds=flush_seconds, clock=clock,
                            log_format=kind.log_format)
        self._last_plot = clock()

    def step(self):
        """One solver step with its row logged and the stop conditions checked.

        Returns the stop reason (the ``stop`` requests' reason, or "time
        budget" once ``deadline``, a ``clock`` time, has passed), else None;
        ``self.row`` is the step's row. Raises DivergenceError.
        """
        row = self._step()
        loss = row[self.kind.loss]
        if not math.isfinite(loss):
            raise DivergenceError(f"iteration {row['iter']}: {self.kind.loss} = {loss}")
        self.watch.check(row["iter"])
        self.log.append(row)
        if self.progress:
            self.progress(row)
        if self.plot_seconds is not None and self._clock() - self._last_plot >= self.plot_seconds:
            self.plot()
        self.row = row
        if self.stop is not None and self.stop.requested():
            return self.stop.reason
        if self.deadline is not None and self._clock() > self.deadline:
            return "time budget"
        return None

    def plot(self):
        """Redraw training.png from the running summary (cost independent of the run's length)."""
        if self.log.summary.rows:
            plot_summary(self.log.summary, self.png_path, self.run_dir.name,
                         log_format=self.kind.log_format)
        self._last_plot = self._clock()

    def close(self):
        """Flush train.log and close it (idempotent)."""
        self.log.close()


class EventLog:
    """Messages of a run: to ``show`` and, timestamped, to ``events.log`` in the run folder.

    A failure to write events.log is reported once and never stops the run.
    """

    def __init__(self, run_dir, show=print):
        self.path = Path(run_dir) / "events.log"
        self.show = show
        self._failed = False

    def __call__(self, message):
        self.show(message)
        try:
            with open(self.path, "a", encoding="utf-8") as events:
                events.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        except OSError as error:
            if not self._failed:
                self._failed = True
                self.show(f"warning: cannot write events.log: "
                          f"{snapshots.io_error_text(error, self.path.parent)}")


@dataclass(frozen=True)
class RunSettings:
    """When a run stops, logs, plots and snapshots (see :func:`run_solver`)."""
    max_iter: int
    time_budget_s: float = None
    plot_seconds: float = 60.0
    flush_seconds: float = 10.0
    snapshot_every: int = None
    snapshot_minutes: float = 5.0
    keep: int = 5


def run_solver(caffe, solver_path, run_dir, kind, settings, progress=None, log=print,
               lock=None, initialize=None, finish=None):
    """Run the solver of ``solver_path`` in ``run_dir`` until ``settings.max_iter`` (or the
    time budget, or a stop request); returns a dict: final iteration, stop reason, snapshot
    path, seconds.

    kind: a :class:`RunKind` (what a step logs). settings: a :class:`RunSettings`.
    Messages (resume, stop, divergence) go to ``log`` and to events.log.
    train.log is buffered and written every ``flush_seconds`` and on every
    stop (normal, signal, divergence, exception); training.png is redrawn
    every ``plot_seconds`` and at the end. Snapshots (atomic, verified on
    resume) are written every ``snapshot_every`` steps (None: the solver
    file's ``snapshot`` value), every ``snapshot_minutes`` of wall clock
    (None: never) and when training stops; the newest ``keep`` pairs are
    kept. A failed step (data loader, I/O) is followed by a snapshot of the
    last completed step before the error propagates. The folder is locked
    for the run (RunFolderLocked when another live trainer holds it); pass
    ``lock`` (an acquired ``snapshots.RunLock``) when the caller took it.
    ``initialize(net)`` prepares a fresh (not resumed) run's net;
    ``finish(net)`` is called after the final snapshot of a run that stopped
    cleanly (e.g. to save final weights).

    Raises DivergenceError after leaving the last good snapshot in place,
    SnapshotError when a snapshot cannot be written.
    """
    run_dir = Path(run_dir)
    if settings.keep < 1:
        raise ValueError(f"keep must be at least 1, not {settings.keep}")
    if settings.snapshot_every is None:
        settings = RunSettings(**{**settings.__dict__,
                                  "snapshot_every": read_solver(solver_path).snapshot})
    own_lock = lock is None
    if own_lock:
        lock = snapshots.RunLock(run_dir).acquire()
    try:
        events = EventLog(run_dir, log)
        solver, start = _start_solver(caffe, solver_path, run_dir, lock, events, initialize)
        return SolverRun(solver, run_dir, kind, settings, progress, events, start).run(finish)
    finally:
        if own_lock:
            lock.release()


def _start_solver(caffe, solver_path, run_dir, lock, log, initialize):
    """The run's solver, restored from its newest intact snapshot or initialised; returns
    (solver, iteration it starts from). Stop files of a previous session are removed."""
    if lock.previous_pid and lock.previous_pid != str(os.getpid()):
        log(f"took over the lock left by PID {lock.previous_pid} (no longer running)")
    for name in STOP_FILES:
        if (run_dir / name).exists():
            (run_dir / name).unlink()
            log(f"removed the '{name}' file left by the previous session")
    solver = caffe.get_solver(str(snapshots.staging_solver(solver_path, run_dir)))
    caffe_pb2 = importlib.import_module("caffe.proto.caffe_pb2")
    try:
        resume = snapshots.find_resume(caffe_pb2, solver.net, run_dir, log)
        if resume:
            solver.restore(str(resume[1]))
            log(f"resuming from {resume[1]} (iteration {solver.iter})")
        elif initialize is not None:
            initialize(solver.net)
    except BaseException:
        close_data_layers(solver.net)
        raise
    return solver, resume[0] if resume else 0


class SolverRun:
    """One session of a run: the step loop, its snapshots and how it ends (see
    :func:`run_solver`)."""

    def __init__(self, solver, run_dir, kind, settings, progress, log, start_iter):
        self.solver, self.net = solver, solver.net
        self.run_dir, self.kind, self.settings = run_dir, kind, settings
        self.progress, self.log = progress, log
        self.saved_iter, self.saved_at = start_iter, time.monotonic()
        staging = read_solver(run_dir / f"{snapshots.PART}.solver.prototxt")
        self.history_copies = history_copies(staging)

    def save(self, stop):
        """Snapshot the current iteration (once) and prune old pairs."""
        if self.solver.iter == self.saved_iter:
            return
        with stop.critical(f"the snapshot at iteration {self.solver.iter}"):
            snapshots.write_snapshot(self.solver, self.run_dir, self.history_copies)
            snapshots.prune_snapshots(self.run_dir, self.settings.keep)
        self.saved_iter, self.saved_at = self.solver.iter, time.monotonic()

    def _snapshot_due(self):
        every, minutes = self.settings.snapshot_every, self.settings.snapshot_minutes
        return bool(every and self.solver.iter % every == 0) or (
            minutes is not None and time.monotonic() - self.saved_at >= 60 * minutes)

    def _newest(self):
        pairs = snapshots.snapshot_pairs(self.run_dir)
        return pairs[0][1] if pairs else None

    def steps(self, loop, stop):
        """Step until max_iter or a stop; returns the reason. A failed step leaves a
        snapshot of the last completed one."""
        try:
            while self.solver.iter < self.settings.max_iter:
                stopped = loop.step()
                if self._snapshot_due():
                    self.save(stop)
                if stopped:
                    return stopped
            return "max_iter"
        except (DivergenceError, KeyboardInterrupt, snapshots.SnapshotError):
            raise
        except Exception as error:  # a failed loader, an I/O error: keep the last step
            failed = f"failed at iteration {self.solver.iter} ({error})"
            try:
                self.save(stop)
                self.log(f"{failed}; snapshot written{self.kind.note(self.net)}")
            except Exception as snapshot_error:
                self.log(f"{failed}; no snapshot: {snapshot_error}{self.kind.note(self.net)}")
            raise

    def run(self, finish=None):
        """The loop from start to stop; returns the result dict of :func:`run_solver`."""
        started, loop = time.monotonic(), None
        budget = self.settings.time_budget_s
        try:
            with StopRequests(self.run_dir) as stop:
                loop = TrainingLoop(self.solver, self.run_dir, self.kind,
                                    self.settings.plot_seconds, self.settings.flush_seconds,
                                    self.progress, stop, started + budget if budget else None)
                if loop.log.dropped:
                    self.log(f"train.log: dropped {loop.log.dropped} rows after iteration "
                             f"{self.solver.iter} or superseded by a later run")
                reason = self.steps(loop, stop)
                loop.close()
                self.save(stop)
                if finish is not None:
                    finish(self.net)
            snapshot = self._newest()
            self.log(f"stopped at iteration {self.solver.iter} ({reason}); snapshot "
                     f"{snapshot or 'none'}{self.kind.note(self.net)}")
            loop.plot()
        except DivergenceError as error:
            self._diverged(loop, error)
        except KeyboardInterrupt as interrupt:
            self.log(f"interrupted at iteration {self.solver.iter}: {interrupt or 'Ctrl-C'}; "
                     f"newest snapshot {self._newest() or 'none'}{self.kind.note(self.net)}")
            raise
        finally:
            try:
                if loop is not None:
                    loop.close()
            finally:
                close_data_layers(self.net)
        return dict(iter=self.solver.iter, reason=reason, snapshot=snapshot and str(snapshot),
                    seconds=time.monotonic() - started)

    def _diverged(self, loop, error):
        """Log the divergence with the last good snapshot and raise it again."""
        if loop is not None:
            loop.close()
            loop.plot()
        message = f"{error}; training stopped, last good snapshot: {self._newest() or 'none'}"
        self.log(f"diverged: {message}")
        raise DivergenceError(message) from None
