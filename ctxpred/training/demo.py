"""The demo (tools/demo.py): train the colour-dropping net briefly and show that it learned.

:func:`run_demo` trains color_dropping on a time budget (GPU 0 when usable,
else the CPU; Adam by default, which learns within minutes), then scores
held-out relative-position accuracy (the paper's pair protocol) of the
trained net and of the same net at initialisation, both with BatchNorm
statistics re-estimated under their own weights, and writes summary.json,
confusion matrices and report.md into the run folder.
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ctxpred.caffe.env import gpu_status, load_caffe
from ctxpred.cli import fail
from ctxpred.data.layer import close_data_layers
from ctxpred.training.context_run import (RunConfig, choose_device, default_workers,
                                         describe_context_row, recompute_batchnorm_statistics,
                                         train, write_run_files)
from ctxpred.training.loop import move_aside, progress_printer
from ctxpred.training.snapshots import latest_snapshot

CHANCE = 1 / 8


@dataclass(frozen=True)
class DemoOptions:
    """tools/demo.py's flags, under their destination names (see its ``--help``)."""
    out: str = "runs/demo"
    images: str = "data/photos/train"
    heldout: str = "data/photos/heldout"
    minutes: float = 22
    device: str = "auto"
    max_patches: int = None
    solver_type: str = "Adam"
    base_lr: float = 1e-4
    eval_images: int = 40
    pairs_per_image: int = 64
    bn_batches: int = 10
    seed: int = 0


def save_initial_weights(caffe, solver_path, path):
    """The net as the solver initialises it (Caffe's random_seed fixes the fillers)."""
    solver = caffe.get_solver(str(solver_path))
    solver.net.save(str(path))
    close_data_layers(solver.net)


def evaluate(weights, heldout, n_images, pairs_per_image, seed, out_png, title):
    """Relative-position accuracy of ``weights`` on held-out pairs, with its confusion plot."""
    from ctxpred.evaluation import pretext as evaluation
    from ctxpred.evaluation.statistics import accuracy_with_interval
    net = evaluation.load_scoring_net("color_dropping", str(weights))
    pairs = evaluation.sample_eval_pairs(heldout, n_images, pairs_per_image, seed,
                                         evaluation.eval_config("color_dropping"))
    result = evaluation.relative_position_scores(net, pairs)
    accuracy, low, high = accuracy_with_interval(result.correct, result.total)
    matrix = evaluation.confusion_matrix(result.labels, result.predictions)
    evaluation.plot_confusion(matrix, str(out_png),
                              f"{title}: {accuracy:.1%} [{low:.1%}, {high:.1%}]")
    return dict(accuracy=accuracy, low=low, high=high, pairs=result.total,
                correct=result.correct, loss_per_pair=result.loss / result.total,
                confusion=matrix.tolist())


def write_report(out, summary):
    """report.md: the accuracies against chance and initialisation, and the plots."""
    trained, initial = summary["trained"], summary["initial"]
    lines = [
        "# ctxpred demo: context prediction, colour-dropping net",
        "",
        f"Trained {summary['iterations']} iterations in {summary['train_seconds'] / 60:.1f} min "
        f"on `{summary['images']}` (device: {summary['device']}; "
        f"batches of < {summary['max_patches']} patches, "
        f"{summary['solver_type']} with base_lr {summary['base_lr']:g}).",
        "",
        "## Held-out relative-position accuracy",
        "",
        f"{trained['pairs']} pairs ({summary['pairs_per_image']} per image) from "
        f"`{summary['heldout']}`, the paper's pair protocol; 95% Wilson intervals.",
        "",
        "| net | accuracy | 95% interval | loss per pair |",
        "| --- | --- | --- | --- |",
        f"| chance | {CHANCE:.1%} | | {2.0794:.4f} |",
        f"| at initialisation | {initial['accuracy']:.1%} | "
        f"[{initial['low']:.1%}, {initial['high']:.1%}] | {initial['loss_per_pair']:.4f} |",
        f"| trained | {trained['accuracy']:.1%} | [{trained['low']:.1%}, {trained['high']:.1%}] "
        f"| {trained['loss_per_pair']:.4f} |",
        "",
        f"Margin: {100 * (trained['accuracy'] - CHANCE):+.1f} points over chance, "
        f"{100 * (trained['accuracy'] - initial['accuracy']):+.1f} points over initialisation.",
        "",
        "## Training",
        "",
        "![loss and accuracy](training.png)",
        "",
        "## Confusion matrices (rows: true position, columns: predicted)",
        "",
        "![trained](confusion_trained.png) ![initial](confusion_initial.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))


def demo_config(options, gpu, max_patches):
    """The demo's :class:`RunConfig`: Adam (or SGD) at ``base_lr``, batches of < max_patches."""
    solver = (("type", options.solver_type), ("base_lr", options.base_lr))
    if options.solver_type == "Adam":
        solver += (("momentum", 0.9), ("momentum2", 0.999))
    solver += (("solver_mode", "GPU" if gpu is not None else "CPU"),)
    return RunConfig(images=options.images, seed=options.seed, workers=default_workers(gpu),
                     data=(("max_patches", max_patches),), solver_overrides=solver)


def run_demo(options):
    """The whole demo (see the module docstring); returns the exit code."""
    out = Path(options.out)
    caffe = load_caffe()
    try:
        gpu, device = choose_device(options.device, gpu_status(0))
    except ValueError as error:
        return fail(error)
    if gpu is not None:
        caffe = load_caffe(gpu=gpu)
    max_patches = options.max_patches or (64 if gpu is None else 512)
    print(f"device: {device}; batches of < {max_patches} patches")
    if out.exists():
        print(f"moved the previous demo to {move_aside(out)}")
    solver_path = write_run_files(out, demo_config(options, gpu, max_patches))
    save_initial_weights(caffe, solver_path, out / "initial_raw.caffemodel")
    print(f"training color_dropping for {options.minutes:g} minutes")
    # Each demo starts afresh: one snapshot at the end, none on the way (they
    # would take seconds of the budget and gigabytes of disk)
    result = train(caffe, solver_path, out, max_iter=10 ** 9,
                   time_budget_s=options.minutes * 60, plot_seconds=30, snapshot_minutes=None,
                   keep=1, progress=progress_printer(None, 0, 20, describe=describe_context_row))
    print(f"stopped at iteration {result['iter']} ({result['reason']})")
    summary = dict(device=device, iterations=result["iter"], train_seconds=result["seconds"],
                   images=options.images, heldout=options.heldout, max_patches=max_patches,
                   base_lr=options.base_lr, solver_type=options.solver_type,
                   pairs_per_image=options.pairs_per_image)
    final = latest_snapshot(out)[1].with_suffix(".caffemodel")
    for name, weights in (("initial", out / "initial_raw.caffemodel"), ("trained", final)):
        summary[name] = evaluate_weights(caffe, options, out, name, weights)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_report(out, summary)
    print(f"report: {out / 'report.md'}")
    return 0


def evaluate_weights(caffe, options, out, name, weights):
    """Held-out accuracy of ``weights`` after BatchNorm statistics are re-estimated (both
    nets from the same number of batches under their own weights: running averages lag in
    a short run); prints one line."""
    started = time.monotonic()
    weights = recompute_batchnorm_statistics(caffe, out / "train.prototxt", weights,
                                             out / f"{name}_eval.caffemodel",
                                             batches=options.bn_batches)
    result = evaluate(weights, options.heldout, options.eval_images, options.pairs_per_image,
                      options.seed, out / f"confusion_{name}.png", name)
    print(f"{name}: held-out accuracy {result['accuracy']:.1%} "
          f"[{result['low']:.1%}, {result['high']:.1%}] ({time.monotonic() - started:.0f} s)")
    return result
