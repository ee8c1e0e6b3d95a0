"""The training loop around a Caffe SGD solver, with the reference's safeguards.

- A run lives in one folder: ``train.prototxt``, ``solver.prototxt``,
  ``model_iter_N.{caffemodel,solverstate}`` snapshots, ``events.log`` (resume,
  stop and divergence messages), ``train.log`` (one
  tab-separated line per step) and ``training.png``.
- Resume: the newest ``model_iter_N.solverstate`` in the folder is restored.
- Stop cleanly: SIGINT / SIGTERM, or a file named ``pause`` or ``quit`` in the
  folder, ends the loop after the current step with a snapshot.
- Divergence watch (reference): every 100 steps the norm of each non-BatchNorm
  parameter layer's weights and of their change since the last check are
  recorded; a change that is NaN or over 10x the previous one, a NaN or
  > 1e10 sum of fc8's weights, or a NaN or > 1e8 max |pool1 diff| stops
  training without snapshotting the bad state.
"""
import json
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctxpred.layers import PatchPairData, close_data_layers
from ctxpred.nets import NetOptions, data_layer_params, solver_text, train_net

LOG_COLUMNS = ("iter", "loss_per_pair", "accuracy", "pairs", "patches", "data_wait_s", "step_s")
STOP_FILES = ("pause", "quit")
_SNAPSHOT = re.compile(r"model_iter_(\d+)\.solverstate$")


class DivergenceError(RuntimeError):
    """Training diverged; the message says what was seen and what was kept."""


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
    """SIGINT / SIGTERM and pause / quit files, as one "please stop" flag."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.reason = None
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum, frame):
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.reason = signal.Signals(signum).name

    def requested(self):
        if self.reason is None:
            for name in STOP_FILES:
                if (self.run_dir / name).exists():
                    self.reason = f"'{name}' file"
        return self.reason


class DivergenceWatch:
    """The reference's checks on weights and gradients, every ``every`` steps."""

    def __init__(self, net, every=100):
        self.net = net
        self.every = every
        self.layers = [name for name, layer in zip(net._layer_names, net.layers)
                       if name in net.params and layer.type != "BatchNorm"]
        self._last_weights = self._weights()
        self._last_change = None
        self.history = []

    def _weights(self):
        return {name: self.net.params[name][0].data.copy() for name in self.layers}

    def check(self, iteration):
        """Raises DivergenceError if the net diverged; records norms every ``every`` steps."""
        if "pool1" in self.net.blobs:
            pool1 = float(np.abs(self.net.blobs["pool1"].diff).max())
            if not np.isfinite(pool1) or pool1 > 1e8:
                raise DivergenceError(f"iteration {iteration}: max |pool1 diff| = {pool1}")
        if iteration % self.every:
            return
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
    from ctxpred.surgery import load_params
    from ctxpred.weights import read_weights

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
    return next(layer for layer in net.layers if isinstance(layer, PatchPairData))


def append_log(log_path, row):
    new = not Path(log_path).exists()
    with open(log_path, "a", encoding="utf-8") as log:
        if new:
            log.write("\t".join(LOG_COLUMNS) + "\n")
        log.write("\t".join(str(row[c]) for c in LOG_COLUMNS) + "\n")


def read_log(log_path):
    """train.log as {column: numpy array}."""
    rows = np.loadtxt(log_path, delimiter="\t", skiprows=1, ndmin=2)
    return {name: rows[:, index] for index, name in enumerate(LOG_COLUMNS)}


def plot_log(log_path, png_path, window=20):
    """Loss per pair and accuracy against iteration (raw and running mean), as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = read_log(log_path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, column, label in ((axes[0], "loss_per_pair", "loss per pair"),
                                (axes[1], "accuracy", "accuracy (train batch)")):
        values = log[column]
        axis.plot(log["iter"], values, alpha=0.35, lw=0.8, label="per step")
        if len(values) >= window:
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            axis.plot(log["iter"][window - 1:], smooth, lw=2, label=f"mean of {window}")
        axis.set_xlabel("iteration")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    axes[0].axhline(np.log(8), color="grey", ls="--", lw=1)
    axes[1].axhline(1 / 8, color="grey", ls="--", lw=1)
    fig.suptitle(f"{Path(log_path).parent.name}: dashed = chance")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def train(caffe, solver_path, run_dir, max_iter, time_budget_s=None, plot_every=50,
          progress=None, log=print):
    """Run the solver until ``max_iter`` (or the time budget, or a stop request).

    Messages (resume, stop, divergence) go to ``log`` and, timestamped, to
    ``events.log`` in the run folder. Returns a dict: final iteration, stop
    reason, snapshot path, seconds. Raises DivergenceError after leaving the
    last good snapshot in place.
    """
    run_dir = Path(run_dir)
    show = log

    def log(message):
        show(message)
        with open(run_dir / "events.log", "a", encoding="utf-8") as events:
            events.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    for name in STOP_FILES:
        if (run_dir / name).exists():
            (run_dir / name).unlink()
            log(f"removed the '{name}' file left by the previous session")
    solver = caffe.get_solver(str(solver_path))
    resume = latest_snapshot(run_dir)
    if resume:
        solver.restore(str(resume[1]))
        log(f"resuming from {resume[1]} (iteration {solver.iter})")
    net = solver.net
    loader = _data_layer(net).prefetcher
    watch = DivergenceWatch(net)
    log_path, png_path = run_dir / "train.log", run_dir / "training.png"
    started, reason, snapshot = time.monotonic(), "max_iter", None
    try:
        with StopRequests(run_dir) as stop:
            while solver.iter < max_iter:
                waited, step_started = loader.wait_seconds, time.perf_counter()
                solver.step(1)
                step_s = time.perf_counter() - step_started
                pairs = len(net.blobs["label"].data)
                row = dict(iter=solver.iter,
                           loss_per_pair=float(net.blobs["loss"].data) / pairs,
                           accuracy=float(net.blobs["accuracy"].data), pairs=pairs,
                           patches=net.blobs["data"].data.shape[0],
                           data_wait_s=round(loader.wait_seconds - waited, 4),
                           step_s=round(step_s, 4))
                watch.check(solver.iter)
                append_log(log_path, row)
                if progress:
                    progress(row)
                if solver.iter % plot_every == 0:
                    plot_log(log_path, png_path)
                if stop.requested():
                    reason = stop.reason
                    break
                if time_budget_s and time.monotonic() - started > time_budget_s:
                    reason = "time budget"
                    break
        if solver.iter > (resume[0] if resume else 0):
            solver.snapshot()
        snapshot = latest_snapshot(run_dir)
        log(f"stopped at iteration {solver.iter} ({reason}); snapshot "
            f"{snapshot[1] if snapshot else 'none'}")
        if log_path.exists():
            plot_log(log_path, png_path)
    except DivergenceError as error:
        good = latest_snapshot(run_dir)
        message = (f"{error}; training stopped, last good snapshot: "
                   f"{good[1] if good else 'none'}")
        log(f"diverged: {message}")
        raise DivergenceError(message) from None
    finally:
        close_data_layers(net)
    return dict(iter=solver.iter, reason=reason, snapshot=snapshot and str(snapshot[1]),
                seconds=time.monotonic() - started)
