"""The training loop around a Caffe SGD solver, with the reference's safeguards.

- A run lives in one folder: ``train.prototxt``, ``solver.prototxt``,
  ``model_iter_N.{caffemodel,solverstate}`` snapshots, ``events.log`` (resume,
  stop and divergence messages), ``train.log`` (one
  tab-separated line per step, buffered and written every few seconds and on
  every stop) and ``training.png`` (redrawn on a wall-clock interval from a
  running summary; see ctxpred.training.log).
- Resume: the newest ``model_iter_N.solverstate`` in the folder is restored;
  train.log rows after its iteration are dropped.
- Stop cleanly: SIGINT / SIGTERM, or a file named ``pause`` or ``quit`` in the
  folder, ends the loop after the current step with a snapshot.
- Per-step work is O(1): nothing re-reads a file or grows with the run.
- Divergence watch (reference): every 100 steps the norm of each non-BatchNorm
  parameter layer's weights and of their change since the last check are
  recorded; a change that is NaN or over 10x the previous one, a NaN or
  > 1e10 sum of fc8's weights, or a NaN or > 1e8 max |pool1 diff| stops
  training without snapshotting the bad state.
"""
import collections
import contextlib
import importlib
import json
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctxpred.cli import DIVERGED
from ctxpred.data.layer import PatchPairData, close_data_layers
from ctxpred.models.context import NetOptions, data_layer_params, solver_text, train_net
from ctxpred.weights.surgery import read_solver_param
from ctxpred.training.log import LOG_COLUMNS, TrainLog, plot_log, plot_summary, read_log  # noqa: F401

STOP_FILES = ("pause", "quit")
_SNAPSHOT = re.compile(r"model_iter_(\d+)\.solverstate$")


class DivergenceError(RuntimeError):
    """Training diverged; the message says what was seen and what was kept."""

    exit_code = DIVERGED


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run (written to ``run.json``).

    data: extra PatchPairConfig fields for the data layer (e.g. max_patches).
    solver_overrides: solver fields replacing the reference values
        (e.g. {"base_lr": 1e-4, "momentum": 0.999}).
    """
    net: str = "color_dropping"
    images: str = "data/photos/train"
    seed: int = 0
    workers: int = 2
    factorized_head: bool = True
    data: tuple = ()
    solver_overrides: tuple = ()


def latest_snapshot(run_dir):
    """(iteration, path) of the newest solverstate in ``run_dir``, or None."""
    found = [(int(m.group(1)), path) for path in Path(run_dir).glob("model_iter_*.solverstate")
             if (m := _SNAPSHOT.search(path.name))]
    return max(found) if found else None


def move_aside(run_dir):
    """Rename an existing run folder to ``<name>.old-<timestamp>``; returns the new path."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return None
    target = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.rename(target)
    return target


def write_run_files(run_dir, config, solver_template=None):
    """Write train.prototxt and solver.prototxt (absolute paths) into ``run_dir``.

    ``solver_template``: an existing solver prototxt whose settings are kept,
    except ``net``, ``snapshot_prefix`` and ``solver_mode``, which the run
    owns. Returns the solver path.
    """
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    params = data_layer_params(config.net, str(Path(config.images).resolve())
                               if Path(config.images).exists() else config.images,
                               seed=config.seed, workers=config.workers, **dict(config.data))
    net_path = run_dir / "train.prototxt"
    net_path.write_text(str(train_net(config.net, params,
                                      NetOptions(factorized_head=config.factorized_head))))
    if solver_template:
        read_solver_param(solver_template)  # Caffe would abort on a syntax error
        text = Path(solver_template).read_text()
        text = re.sub(r'^\s*(net|snapshot_prefix|solver_mode|train_net)\s*:.*\n?', "", text,
                      flags=re.M)
        text = (f'net: "{net_path}"\nsnapshot_prefix: "{run_dir}/model"\n'
                f"solver_mode: CPU\n{text}")
    else:
        text = solver_text(net_path, f"{run_dir}/model")
    # Caffe's own seed fixes the filler initialisation of a fresh run.
    for key, value in (("random_seed", config.seed),) + tuple(config.solver_overrides):
        text, count = re.subn(rf"^{key}:.*$", f"{key}: {value}", text, flags=re.M)
        if not count:
            text += f"{key}: {value}\n"
    solver_path = run_dir / "solver.prototxt"
    solver_path.write_text(text)
    (run_dir / "run.json").write_text(json.dumps(config.__dict__, indent=2, default=list) + "\n")
    return solver_path


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

    def check(self, iteration):
        """Raises DivergenceError if the net diverged; records norms every ``every`` steps."""
        if iteration % self.every:
            return
        if self._pool1 is not None:
            diff = self._pool1.diff
            pool1 = float(max(diff.max(), -diff.min()))  # NaN propagates
            if not np.isfinite(pool1) or pool1 > 1e8:
                raise DivergenceError(f"iteration {iteration}: max |pool1 diff| = {pool1}")
        if "fc8" in self.net.params:
            fc8 = float(self.net.params["fc8"][0].data.sum())
            if not np.isfinite(fc8) or abs(fc8) > 1e10:
                raise DivergenceError(f"iteration {iteration}: sum of fc8 weights = {fc8}")
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


def recompute_batchnorm_statistics(caffe, train_prototxt, weights, out, batches=10):
    """Write ``weights`` to ``out`` with BatchNorm statistics re-estimated.

    Caffe's TEST-phase BatchNorm uses running averages gathered while the
    weights were changing; after a short training run they lag behind the
    final weights. This zeroes them and averages ``batches`` TRAIN-phase
    forward passes of ``train_prototxt`` (its own data layer) under the
    final weights, without any update.
    """
    from ctxpred.weights.surgery import load_params
    from ctxpred.weights.files import read_weights

    net = caffe.Net(str(train_prototxt), caffe.TRAIN)
    try:
        load_params(net, read_weights(weights))
        batchnorms = [name for name, layer in zip(net._layer_names, net.layers)
                      if layer.type == "BatchNorm"]
        for name in batchnorms:
            for blob in net.params[name]:
                blob.data[...] = 0
        for _ in range(batches):
            net.forward()
        net.save(str(out))
    finally:
        close_data_layers(net)
    return out


def _data_layer(net):
    return next((layer for layer in net.layers if isinstance(layer, PatchPairData)), None)


def skipped_images_note(net):
    """``"; N images skipped (unreadable or too small)"`` for a net's data layer, or ""."""
    layer = _data_layer(net)
    count = layer.prefetcher.images_skipped if layer is not None else 0
    return f"; {count} image{'s' * (count != 1)} skipped (unreadable or too small)" if count else ""


def default_workers(gpu, cpu_count=None):
    """Loader processes for a run: 2 on the CPU; with a GPU, every core but one (the solver's)."""
    if gpu is None:
        return 2
    if cpu_count is None:
        try:
            cpu_count = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpu_count = os.cpu_count() or 2
    return max(1, cpu_count - 1)


def choose_device(request, status):
    """Pick the device for a run: ``(gpu id or None, one line saying which and why)``.

    request: "auto" (the GPU when usable, else the CPU), "gpu" or "cpu".
    status: ``ctxpred.caffe.env.gpu_status()`` (``.usable``, ``.reason``).
    Raises ValueError for "gpu" when no GPU is usable, naming the reason.
    """
    if request not in ("auto", "gpu", "cpu"):
        raise ValueError(f"device must be auto, gpu or cpu, not {request!r}")
    if request == "cpu":
        return None, "CPU (asked for)"
    if status.usable:
        reason = status.reason.rstrip(".")
        return 0, reason if reason.startswith("GPU 0") else f"GPU 0 ({reason})"
    if request == "gpu":
        raise ValueError(f"a GPU was asked for, but none is usable: {status.reason}")
    return None, f"CPU (no usable GPU: {status.reason.rstrip('.')})"


def progress_printer(total, start, every_seconds=10.0, clock=time.monotonic):
    """A progress callback: a tqdm bar on a terminal, else a line every ``every_seconds``.

    The line is printed for the first step and then at most every
    ``every_seconds`` of wall clock, so a fast (GPU) run does not flood a log.
    """
    import sys
    if sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True)

        def show(row):
            # tqdm redraws at most every mininterval; no forced refresh per step
            bar.set_postfix(loss=f"{row['loss_per_pair']:.3f}", acc=f"{row['accuracy']:.3f}",
                            wait=f"{row['data_wait_s']:.2f}s", refresh=False)
            bar.update(1)
        return show

    last = [None]

    def show(row):
        now = clock()
        if last[0] is None or now - last[0] >= every_seconds:
            last[0] = now
            print(f"iter {row['iter']}: loss/pair {row['loss_per_pair']:.4f} "
                  f"acc {row['accuracy']:.3f} step {row['step_s']:.2f}s "
                  f"wait {row['data_wait_s']:.2f}s", flush=True)
    return show


class TrainingLoop:
    """One training step and its bookkeeping, O(1) per step whatever the run's length.

    Each :meth:`step` runs ``solver.step(1)``, builds the train.log row from
    blobs looked up once (their shapes, never a copy of their data), runs the
    divergence watch (its checks every ``watch_every`` steps), buffers the row
    in :class:`ctxpred.training.log.TrainLog` (written every ``flush_seconds``)
    and redraws training.png from the log's running summary when
    ``plot_seconds`` of wall clock have passed (None: only on :meth:`close`).
    ``close`` flushes the log; call it on every stop.
    """

    def __init__(self, solver, run_dir, plot_seconds=60.0, flush_seconds=10.0, progress=None,
                 stop=None, deadline=None, watch_every=100, clock=time.monotonic):
        self.solver = solver
        self.net = solver.net
        self.run_dir = Path(run_dir)
        self.png_path = self.run_dir / "training.png"
        self.plot_seconds = plot_seconds
        self.progress = progress
        self.stop, self.deadline = stop, deadline
        self._clock = clock
        layer = _data_layer(self.net)
        self._loader = layer.prefetcher if layer is not None else None
        blobs = self.net.blobs
        self._loss, self._accuracy = blobs["loss"], blobs["accuracy"]
        self._label, self._data = blobs["label"], blobs["data"]
        self.watch = DivergenceWatch(self.net, every=watch_every)
        self.log = TrainLog(self.run_dir / "train.log", keep_through=solver.iter,
                            flush_seconds=flush_seconds, clock=clock)
        self._last_plot = clock()

    def step(self):
        """One solver step with its row logged and the stop conditions checked.

        Returns the stop reason (the ``stop`` requests' reason, or "time
        budget" once ``deadline``, a ``clock`` time, has passed), else None;
        ``self.row`` is the step's row. Raises DivergenceError.
        """
        loader = self._loader
        waited = loader.wait_seconds if loader is not None else 0.0
        started = time.perf_counter()
        self.solver.step(1)
        step_s = time.perf_counter() - started
        pairs = self._label.count
        iteration = self.solver.iter
        row = dict(iter=iteration, loss_per_pair=float(self._loss.data) / pairs,
                   accuracy=float(self._accuracy.data), pairs=pairs, patches=self._data.num,
                   data_wait_s=round((loader.wait_seconds if loader is not None else 0.0)
                                     - waited, 4),
                   step_s=round(step_s, 4))
        self.watch.check(iteration)
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
            plot_summary(self.log.summary, self.png_path, self.run_dir.name)
        self._last_plot = self._clock()

    def close(self):
        """Flush train.log and close it (idempotent)."""
        self.log.close()


def _solver_snapshot_every(solver_path):
    match = re.search(r"^\s*snapshot\s*:\s*(\d+)", Path(solver_path).read_text(), re.M)
    return int(match.group(1)) if match else 0


def train(caffe, solver_path, run_dir, max_iter, time_budget_s=None, plot_seconds=60.0,
          flush_seconds=10.0, snapshot_every=None, snapshot_minutes=5.0, keep=5,
          progress=None, log=print, lock=None):
    """Run the solver until ``max_iter`` (or the time budget, or a stop request).

    Messages (resume, stop, divergence) go to ``log`` and, timestamped, to
    ``events.log`` in the run folder. train.log is buffered and written every
    ``flush_seconds`` and on every stop (normal, signal, divergence,
    exception); training.png is redrawn every ``plot_seconds`` and at the
    end. On resume, train.log rows after the restored iteration are dropped.

    Snapshots (ctxpred.training.snapshots: atomic, verified on resume) are written
    every ``snapshot_every`` steps (None: the solver file's ``snapshot``
    value), every ``snapshot_minutes`` of wall clock (None: never) and when
    training stops; the newest ``keep`` pairs are kept. A failed step (data
    loader, I/O) is followed by a snapshot of the last completed step
    before the error propagates. The run folder is locked for the run
    (RunFolderLocked when another live trainer holds it); pass ``lock`` (an
    acquired ``snapshots.RunLock``) when the caller took it earlier.

    Returns a dict: final iteration, stop reason, snapshot path, seconds.
    Raises DivergenceError after leaving the last good snapshot in place,
    SnapshotError when a snapshot cannot be written.
    """
    from ctxpred.training import snapshots
    run_dir = Path(run_dir)
    caffe_pb2 = importlib.import_module("caffe.proto.caffe_pb2")
    show = log
    events_failed = []

    def log(message):
        show(message)
        try:
            with open(run_dir / "events.log", "a", encoding="utf-8") as events:
                events.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        except OSError as error:  # never let the event log stop a run
            if not events_failed:
                events_failed.append(error)
                show(f"warning: cannot write events.log: "
                     f"{snapshots.io_error_text(error, run_dir)}")

    if snapshot_every is None:
        snapshot_every = _solver_snapshot_every(solver_path)
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    own_lock = lock is None
    if own_lock:
        lock = snapshots.RunLock(run_dir).acquire()
    try:
        if lock.previous_pid and lock.previous_pid != str(os.getpid()):
            log(f"took over the lock left by PID {lock.previous_pid} (no longer running)")
        for name in STOP_FILES:
            if (run_dir / name).exists():
                (run_dir / name).unlink()
                log(f"removed the '{name}' file left by the previous session")
        solver = caffe.get_solver(str(snapshots.staging_solver(solver_path, run_dir)))
        try:
            resume = snapshots.find_resume(caffe_pb2, solver.net, run_dir, log)
        except Exception:
            close_data_layers(solver.net)
            raise
        if resume:
            solver.restore(str(resume[1]))
            log(f"resuming from {resume[1]} (iteration {solver.iter})")
        return _run(solver, run_dir, max_iter, time_budget_s, plot_seconds, flush_seconds,
                    snapshot_every, snapshot_minutes, keep, progress, log, caffe_pb2,
                    resume[0] if resume else 0)
    finally:
        if own_lock:
            lock.release()


def _run(solver, run_dir, max_iter, time_budget_s, plot_seconds, flush_seconds,
         snapshot_every, snapshot_minutes, keep, progress, log, caffe_pb2, start_iter):
    from ctxpred.training import snapshots
    net = solver.net
    loop = None
    started, reason = time.monotonic(), "max_iter"
    saved = {"iter": start_iter, "at": started}
    copies = snapshots.history_copies(run_dir / f"{snapshots.PART}.solver.prototxt")

    def save(stop):
        if solver.iter == saved["iter"]:
            return
        with stop.critical(f"the snapshot at iteration {solver.iter}"):
            snapshots.write_snapshot(solver, run_dir, copies)
            snapshots.prune_snapshots(run_dir, keep)
        saved.update(iter=solver.iter, at=time.monotonic())

    try:
        with StopRequests(run_dir) as stop:
            loop = TrainingLoop(solver, run_dir, plot_seconds=plot_seconds,
                                flush_seconds=flush_seconds, progress=progress, stop=stop,
                                deadline=started + time_budget_s if time_budget_s else None)
            if loop.log.dropped:
                log(f"train.log: dropped {loop.log.dropped} rows after iteration {solver.iter} "
                    "or superseded by a later run")
            try:
                while solver.iter < max_iter:
                    stopped = loop.step()
                    if (snapshot_every and solver.iter % snapshot_every == 0) or (
                            snapshot_minutes is not None
                            and time.monotonic() - saved["at"] >= 60 * snapshot_minutes):
                        save(stop)
                    if stopped:
                        reason = stopped
                        break
            except (DivergenceError, KeyboardInterrupt, snapshots.SnapshotError):
                raise
            except Exception as error:  # a failed loader, an I/O error: keep the last step
                skipped = skipped_images_note(net)
                try:
                    save(stop)
                    log(f"failed at iteration {solver.iter} ({error}); snapshot written{skipped}")
                except Exception as snapshot_error:
                    log(f"failed at iteration {solver.iter} ({error}); no snapshot: "
                        f"{snapshot_error}{skipped}")
                raise
            loop.close()
            save(stop)
        snapshot = snapshots.snapshot_pairs(run_dir)
        log(f"stopped at iteration {solver.iter} ({reason}); snapshot "
            f"{snapshot[0][1] if snapshot else 'none'}{skipped_images_note(net)}")
        loop.plot()
    except DivergenceError as error:
        loop.close()
        loop.plot()
        good = snapshots.snapshot_pairs(run_dir)
        message = (f"{error}; training stopped, last good snapshot: "
                   f"{good[0][1] if good else 'none'}")
        log(f"diverged: {message}")
        raise DivergenceError(message) from None
    except KeyboardInterrupt as interrupt:
        good = snapshots.snapshot_pairs(run_dir)
        log(f"interrupted at iteration {solver.iter}: {interrupt or 'Ctrl-C'}; newest "
            f"snapshot {good[0][1] if good else 'none'}{skipped_images_note(net)}")
        raise
    finally:
        try:
            if loop is not None:
                loop.close()
        finally:
            close_data_layers(net)
    return dict(iter=solver.iter, reason=reason, snapshot=snapshot and str(snapshot[0][1]),
                seconds=time.monotonic() - started)
