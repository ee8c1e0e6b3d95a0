"""The demo: train the colour-dropping net briefly and show that it learned.

1. Trains color_dropping (tools/train.py's loop) on the default photo
   collection for a bounded time, with a progress line every 20 seconds, on
   GPU 0 when this Caffe build has CUDA and a GPU is visible (the
   reference's batches of < 512 patches, one loader process per core but
   one), else on the CPU (batches of < 64 patches, 2 loader processes); it
   says which device it used.
2. Evaluates relative-position accuracy on the held-out photos (the paper's
   pair protocol) for the trained net and for the same net at initialisation,
   both with BatchNorm statistics re-estimated on a few training batches
   under their own weights.
3. Writes runs/demo/: snapshots, train.log, training.png, confusion matrices
   and report.md with the numbers and plots.

A previous runs/demo is moved aside first, so each demo starts fresh.
"""
import argparse
import json
import sys
import time
from pathlib import Path

from ctxpred.caffe.env import gpu_status, load_caffe
from ctxpred.cli import run_tool
from ctxpred.training.loop import (RunConfig, choose_device, default_workers, latest_snapshot,
                              move_aside, recompute_batchnorm_statistics, train,
                              write_run_files)

CHANCE = 1 / 8


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="run folder (default: %(default)s)")
    parser.add_argument("--images", default="data/photos/train",
                        help="training images (default: %(default)s)")
    parser.add_argument("--heldout", default="data/photos/heldout",
                        help="held-out images for evaluation (default: %(default)s)")
    parser.add_argument("--minutes", type=float, default=22,
                        help="training time budget in minutes (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                        help="auto: GPU 0 when this Caffe build has CUDA and a GPU is "
                             "visible, else the CPU (default: %(default)s)")
    parser.add_argument("--max-patches", type=int,
                        help="patch buffer per batch (default: 64 on the CPU, where a smaller "
                             "batch gives more steps in the budget; the reference's 512 on "
                             "a GPU)")
    parser.add_argument("--solver-type", choices=("Adam", "SGD"), default="Adam",
                        help="Adam (default) learns within the demo's minutes; SGD with the "
                             "reference's base_lr 1e-5 and no momentum needs days")
    parser.add_argument("--base-lr", type=float, default=1e-4,
                        help="solver base_lr (default: %(default)s)")
    parser.add_argument("--eval-images", type=int, default=40,
                        help="held-out images to evaluate (default: %(default)s)")
    parser.add_argument("--pairs-per-image", type=int, default=64,
                        help="pairs per held-out image (default: %(default)s)")
    parser.add_argument("--bn-batches", type=int, default=10,
                        help="training batches that re-estimate BatchNorm statistics before "
                             "evaluation (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    return parser.parse_args(argv)


def save_initial_weights(caffe, solver_path, path):
    """The net as the solver initialises it (Caffe's random_seed fixes the fillers)."""
    from ctxpred.data.layer import close_data_layers
    solver = caffe.get_solver(str(solver_path))
    solver.net.save(str(path))
    close_data_layers(solver.net)


def evaluate(weights, heldout, n_images, pairs_per_image, seed, out_png, title):
    from ctxpred.evaluation import pretext as evaluation
    net = evaluation.load_scoring_net("color_dropping", str(weights))
    pairs = evaluation.sample_eval_pairs(heldout, n_images, pairs_per_image, seed,
                                         evaluation.eval_config("color_dropping"))
    result = evaluation.relative_position_scores(net, pairs)
    accuracy, low, high = evaluation.accuracy_with_interval(result.correct, result.total)
    matrix = evaluation.confusion_matrix(result.labels, result.predictions)
    evaluation.plot_confusion(matrix, str(out_png),
                              f"{title}: {accuracy:.1%} [{low:.1%}, {high:.1%}]")
    return dict(accuracy=accuracy, low=low, high=high, pairs=result.total,
                correct=result.correct, loss_per_pair=result.loss / result.total,
                confusion=matrix.tolist())


def write_report(out, summary):
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


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    caffe = load_caffe()
    try:
        gpu, device = choose_device(args.device, gpu_status(0))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if gpu is not None:
        caffe = load_caffe(gpu=gpu)
    if args.max_patches is None:
        args.max_patches = 64 if gpu is None else 512
    print(f"device: {device}; batches of < {args.max_patches} patches")
    if out.exists():
        print(f"moved the previous demo to {move_aside(out)}")
    solver = (("type", f'"{args.solver_type}"'), ("base_lr", args.base_lr))
    if args.solver_type == "Adam":
        solver += (("momentum", 0.9), ("momentum2", 0.999))
    solver += (("solver_mode", "GPU" if gpu is not None else "CPU"),)
    config = RunConfig(images=args.images, seed=args.seed, workers=default_workers(gpu),
                       data=(("max_patches", args.max_patches),), solver_overrides=solver)
    solver_path = write_run_files(out, config)
    save_initial_weights(caffe, solver_path, out / "initial_raw.caffemodel")

    last_shown = [None]

    def show(row):
        now = time.monotonic()
        if last_shown[0] is None or now - last_shown[0] >= 20:
            last_shown[0] = now
            print(f"iter {row['iter']}: loss/pair {row['loss_per_pair']:.4f} "
                  f"acc {row['accuracy']:.3f} ({row['step_s']:.1f} s/step, "
                  f"data wait {row['data_wait_s']:.2f} s)", flush=True)

    print(f"training color_dropping for {args.minutes:g} minutes")
    # Each demo starts afresh: one snapshot at the end, none on the way (they
    # would take seconds of the budget and gigabytes of disk)
    result = train(caffe, solver_path, out, max_iter=10 ** 9, time_budget_s=args.minutes * 60,
                   plot_seconds=30, snapshot_minutes=None, keep=1, progress=show)
    print(f"stopped at iteration {result['iter']} ({result['reason']})")
    summary = dict(device=device, iterations=result["iter"], train_seconds=result["seconds"],
                   images=args.images, heldout=args.heldout, max_patches=args.max_patches,
                   base_lr=args.base_lr, solver_type=args.solver_type,
                   pairs_per_image=args.pairs_per_image)
    final = latest_snapshot(out)[1].with_suffix(".caffemodel")
    for name, weights in (("initial", out / "initial_raw.caffemodel"), ("trained", final)):
        started = time.monotonic()
        # Both nets get BatchNorm statistics from the same number of batches
        # under their own weights (running averages lag in a short run).
        weights = recompute_batchnorm_statistics(caffe, out / "train.prototxt", weights,
                                                 out / f"{name}_eval.caffemodel",
                                                 batches=args.bn_batches)
        summary[name] = evaluate(weights, args.heldout, args.eval_images, args.pairs_per_image,
                                 args.seed, out / f"confusion_{name}.png", name)
        print(f"{name}: held-out accuracy {summary[name]['accuracy']:.1%} "
              f"[{summary[name]['low']:.1%}, {summary[name]['high']:.1%}] "
              f"({time.monotonic() - started:.0f} s)")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_report(out, summary)
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
