"""Context-prediction training runs: their run folder, their train.log row and devices.

A run folder holds ``train.prototxt`` and ``solver.prototxt`` (absolute
paths; the plain ``caffe train`` binary can use them), ``run.json`` (the
:class:`RunConfig`) and everything :func:`ctxpred.training.loop.run_solver`
writes there. train.log has one row per step: loss per pair, accuracy of the
train batch, pairs and patches in it, the seconds the solver waited for the
data loader and the seconds of the step.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ctxpred.data.layer import PatchPairData, close_data_layers
from ctxpred.models.context import (SOLVER_ORDER, NetOptions, data_layer_params, solver_param,
                                   train_net)
from ctxpred.training.log import CONTEXT_LOG
from ctxpred.training.loop import RunKind, RunSettings, run_solver, timed_step
from ctxpred.training.solvers import read_solver, set_fields, write_solver


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run (written to ``run.json``).

    data: extra PatchPairConfig fields for the data layer (e.g. max_patches).
    solver_overrides: solver fields replacing the reference values, as
        (name, value) pairs (e.g. (("base_lr", 1e-4), ("type", "Adam"))).
    """
    net: str = "color_dropping"
    images: str = "data/photos/train"
    seed: int = 0
    workers: int = 2
    factorized_head: bool = True
    data: tuple = ()
    solver_overrides: tuple = ()


def write_run_files(run_dir, config, solver_template=None):
    """Write train.prototxt, solver.prototxt (absolute paths) and run.json into ``run_dir``.

    ``solver_template``: an existing solver prototxt whose settings are kept,
    except ``net``, ``snapshot_prefix`` and ``solver_mode``, which the run
    owns. Caffe's ``random_seed`` (the filler initialisation of a fresh run)
    is the config's seed. Returns the solver path.
    """
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    images = config.images
    params = data_layer_params(config.net, str(Path(images).resolve())
                               if Path(images).exists() else images,
                               seed=config.seed, workers=config.workers, **dict(config.data))
    net_path = run_dir / "train.prototxt"
    net_path.write_text(str(train_net(config.net, params,
                                      NetOptions(factorized_head=config.factorized_head))))
    solver = solver_param(net_path, run_dir / "model")
    if solver_template:
        solver = set_fields(read_solver(solver_template), train_net=None, net=net_path,
                            snapshot_prefix=run_dir / "model", solver_mode="CPU")
    set_fields(solver, random_seed=config.seed, **dict(config.solver_overrides))
    solver_path = write_solver(solver, run_dir / "solver.prototxt", SOLVER_ORDER)
    (run_dir / "run.json").write_text(json.dumps(config.__dict__, indent=2, default=list) + "\n")
    return solver_path


def _data_layer(net):
    return next((layer for layer in net.layers if isinstance(layer, PatchPairData)), None)


def skipped_images_note(net):
    """``"; N images skipped (unreadable or too small)"`` for a net's data layer, or ""."""
    layer = _data_layer(net)
    count = layer.prefetcher.images_skipped if layer is not None else 0
    return f"; {count} image{'s' * (count != 1)} skipped (unreadable or too small)" if count else ""


def context_stepper(solver):
    """One step of a context net and its train.log row (blobs looked up once)."""
    layer = _data_layer(solver.net)
    loader = layer.prefetcher if layer is not None else None
    blobs = solver.net.blobs
    loss, accuracy, label, data = blobs["loss"], blobs["accuracy"], blobs["label"], blobs["data"]

    def step():
        waited = loader.wait_seconds if loader is not None else 0.0
        step_s = timed_step(solver)
        pairs = label.count
        return dict(iter=solver.iter, loss_per_pair=float(loss.data) / pairs,
                    accuracy=float(accuracy.data), pairs=pairs, patches=data.num,
                    data_wait_s=round((loader.wait_seconds if loader is not None else 0.0)
                                      - waited, 4),
                    step_s=round(step_s, 4))
    return step


def describe_context_row(row):
    """A context row as a progress text: loss per pair, accuracy, step and wait seconds."""
    return (f"loss/pair {row['loss_per_pair']:.4f} acc {row['accuracy']:.3f} "
            f"step {row['step_s']:.2f}s wait {row['data_wait_s']:.2f}s")


CONTEXT_RUN = RunKind(CONTEXT_LOG, context_stepper, "loss_per_pair", describe_context_row,
                      skipped_images_note)


def train(caffe, solver_path, run_dir, max_iter, time_budget_s=None, plot_seconds=60.0,
          flush_seconds=10.0, snapshot_every=None, snapshot_minutes=5.0, keep=5,
          progress=None, log=print, lock=None):
    """Train a context net (:data:`CONTEXT_RUN`) with :func:`ctxpred.training.loop.run_solver`."""
    settings = RunSettings(max_iter, time_budget_s, plot_seconds, flush_seconds, snapshot_every,
                           snapshot_minutes, keep)
    return run_solver(caffe, solver_path, run_dir, CONTEXT_RUN, settings, progress, log, lock)


def recompute_batchnorm_statistics(caffe, train_prototxt, weights, out, batches=10):
    """Write ``weights`` to ``out`` with BatchNorm statistics re-estimated.

    Caffe's TEST-phase BatchNorm uses running averages gathered while the
    weights were changing; after a short training run they lag behind the
    final weights. This zeroes them and averages ``batches`` TRAIN-phase
    forward passes of ``train_prototxt`` (its own data layer) under the
    final weights, without any update.
    """
    from ctxpred.weights.files import read_weights
    from ctxpred.weights.surgery import load_weights

    net = caffe.Net(str(train_prototxt), caffe.TRAIN)
    try:
        load_weights(net, read_weights(weights))
        for name, layer in zip(net._layer_names, net.layers):
            if layer.type == "BatchNorm":
                for blob in net.params[name]:
                    blob.data[...] = 0
        for _ in range(batches):
            net.forward()
        net.save(str(out))
    finally:
        close_data_layers(net)
    return out


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
