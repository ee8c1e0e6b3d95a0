"""Per-step cost of the training loop, and of a plot refresh, measured in one run.

1. Loop overhead: tools/train.py's loop body (``ctxpred.training.loop.TrainingLoop.step``:
   the solver step, the train.log row from the blobs, the divergence watch,
   the buffered train.log, tools/train.py's progress printer, the stop-file
   and time-budget checks, training.png redrawn every --plot-seconds) against
   bare ``solver.step(1)``, on ONE solver of a small context-prediction net
   (PatchPairData with its loader workers -> RMS normalisation -> a two-layer
   conv tower named conv1/pool1/... -> pairs gathered with BatchReindex ->
   fc7/fc8 -> SoftmaxWithLoss + Accuracy), small enough that a CPU step
   takes tens of milliseconds so that the loop's own cost is visible. Single
   steps alternate in the order bare, loop, loop, bare (repeated), so both
   see the same machine load and data loader and neither always goes first;
   the ratio is total loop time over total bare time, with a 95% bootstrap
   interval over the step pairs (also shown per half of the run, and as a
   ratio of medians, which leaves out the periodic flush and plot). Not
   included: the snapshots themselves (every --snapshot-minutes), which are
   not per-step bookkeeping. Goal: <= 1.02.
2. Plot refresh: one training.png refresh (from the running summary of
   train.log) after 10^3 and after 10^5 logged steps, timed alternately,
   median of --repeats. Goal: ratio <= 1.5. For contrast, the refresh that the
   loop did before (re-read the whole train.log, plot every row) at the same
   sizes.

Run from the checkout: python benchmarks/train_loop.py [--quick] [--json F]
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ctxpred.caffe.env import load_caffe
from ctxpred.data.layer import close_data_layers
from ctxpred.models.context import add_rms_normalisation, data_layer_params
from ctxpred.training.log import LogSummary, TrainLog, plot_summary, read_log
from ctxpred.training.context_run import CONTEXT_RUN
from ctxpred.training.loop import StopRequests, TrainingLoop, progress_printer

REPO = Path(__file__).resolve().parents[1]


def small_net(caffe, source, max_patches, workers, channels):
    """A small train net with the real data layer and the blobs the loop reads."""
    L, P = caffe.layers, caffe.params
    filler = dict(weight_filler=dict(type="xavier"), bias_filler=dict(type="constant", value=0))
    n = caffe.NetSpec()
    params = data_layer_params("color_dropping", source, seed=0, workers=workers,
                               max_patches=max_patches)
    params["prefetch"] = 8
    n.data, n.select1, n.select2, n.label = L.Python(
        ntop=4, python_param=dict(module="ctxpred.data.layer", layer="PatchPairData",
                                  param_str=json.dumps(params)))
    top = add_rms_normalisation(caffe, n, n.data)
    n.conv1 = L.Convolution(top, num_output=channels, kernel_size=11, stride=4, **filler)
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.conv1, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    n.conv2 = L.Convolution(n.pool1, num_output=2 * channels, kernel_size=3, stride=2, **filler)
    n.relu2 = L.ReLU(n.conv2, in_place=True)
    n.fc6 = L.InnerProduct(n.conv2, num_output=64, **filler)
    n.first = L.BatchReindex(n.fc6, n.select1)
    n.second = L.BatchReindex(n.fc6, n.select2)
    n.pairs = L.Concat(n.first, n.second, axis=1)
    n.fc7 = L.InnerProduct(n.pairs, num_output=64, **filler)
    n.relu7 = L.ReLU(n.fc7, in_place=True)
    n.fc8 = L.InnerProduct(n.fc7, num_output=8, **filler)
    n.loss = L.SoftmaxWithLoss(n.fc8, n.label,
                               loss_param=dict(normalization=P.Loss.NONE))
    n.accuracy = L.Accuracy(n.fc8, n.label)
    return n.to_proto()


def loop_overhead(caffe, folder, args):
    net_path = folder / "train.prototxt"
    net_path.write_text(str(small_net(caffe, args.images, args.max_patches, args.workers,
                                      args.channels)))
    solver_path = folder / "solver.prototxt"
    solver_path.write_text(f'net: "{net_path}"\nbase_lr: 1e-5\nlr_policy: "fixed"\n'
                           f'momentum: 0\nweight_decay: 0\ndisplay: 0\nmax_iter: 100000000\n'
                           f'snapshot: 0\nsnapshot_prefix: "{folder}/model"\nrandom_seed: 0\n'
                           "solver_mode: CPU\n")
    solver = caffe.get_solver(str(solver_path))
    times = {"bare": [], "loop": []}
    try:
        with StopRequests(folder) as stop:
            loop = TrainingLoop(solver, folder, CONTEXT_RUN, plot_seconds=args.plot_seconds,
                                flush_seconds=args.flush_seconds, stop=stop,
                                deadline=time.monotonic() + 10 ** 9,
                                progress=progress_printer(10 ** 8, 0, args.print_seconds))
            for _ in range(args.warmup):
                solver.step(1)
            for index in range(2 * args.steps):  # bare, loop, loop, bare, bare, loop, ...
                loop_turn = (index % 4) in (1, 2)
                started = time.perf_counter()
                if not loop_turn:
                    solver.step(1)
                elif loop.step():
                    raise RuntimeError(f"the loop stopped: {loop.stop.reason}")
                times["loop" if loop_turn else "bare"].append(time.perf_counter() - started)
            loop.close()
        log = read_log(folder / "train.log")
        wait = float(log["data_wait_s"].sum())
        patches = float(log["patches"].mean())
    finally:
        close_data_layers(solver.net)
    bare, looped = np.array(times["bare"]), np.array(times["loop"])
    return dict(steps_each=args.steps, bare_step_ms=1000 * bare.mean(),
                loop_step_ms=1000 * looped.mean(), bare_median_ms=1000 * np.median(bare),
                loop_median_ms=1000 * np.median(looped),
                loop_data_wait_share=wait / looped.sum(), mean_patches=patches,
                loop_ratio=looped.sum() / bare.sum(),
                loop_ratio_median=float(np.median(looped) / np.median(bare)),
                loop_ratio_halves=[float(looped[half].sum() / bare[half].sum()) for half in
                                   (slice(0, args.steps // 2), slice(args.steps // 2, None))],
                loop_ratio_ci95=bootstrap_ratio(bare, looped),
                seconds=float(bare.sum() + looped.sum()))


def bootstrap_ratio(bare, looped, samples=2000):
    """95% bootstrap interval of sum(looped) / sum(bare) over the (bare, loop) step pairs."""
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(bare), (samples, len(bare)))
    ratios = looped[picks].sum(axis=1) / bare[picks].sum(axis=1)
    return [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))]


def filled_summary(steps, rng):
    summary = LogSummary()
    loss = 2.08 - 0.3 * np.log1p(np.arange(steps) / 1000) / np.log(1000) \
        + rng.normal(0, 0.05, steps)
    accuracy = np.clip(0.125 + (2.08 - loss) / 2 + rng.normal(0, 0.02, steps), 0, 1)
    for iteration in range(steps):
        summary.add(iteration + 1, loss[iteration], accuracy[iteration])
    return summary, loss, accuracy


def write_log(path, loss, accuracy):
    with TrainLog(path, flush_seconds=10 ** 9) as log:
        for iteration, (value, acc) in enumerate(zip(loss, accuracy), start=1):
            log.append(dict(iter=iteration, loss_per_pair=value, accuracy=acc, pairs=40,
                            patches=36, data_wait_s=0.0, step_s=0.02))


def old_refresh(log_path, png_path):
    """The loop's refresh before: re-read train.log, plot every row (as plot_log did)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    log = read_log(log_path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, column in ((axes[0], "loss_per_pair"), (axes[1], "accuracy")):
        axis.plot(log["iter"], log[column], alpha=0.35, lw=0.8)
        smooth = np.convolve(log[column], np.ones(20) / 20, mode="valid")
        axis.plot(log["iter"][19:], smooth, lw=2)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def plot_refresh(folder, args):
    rng = np.random.default_rng(0)
    sizes = (10 ** 3, 10 ** 5)
    summaries, logs = {}, {}
    for steps in sizes:
        summaries[steps], loss, accuracy = filled_summary(steps, rng)
        logs[steps] = folder / f"train_{steps}.log"
        write_log(logs[steps], loss, accuracy)
    png = folder / "training.png"
    plot_summary(summaries[sizes[0]], png, "warm-up")  # imports matplotlib
    times = {(kind, steps): [] for kind in ("new", "old") for steps in sizes}
    for _ in range(args.repeats):
        for steps in sizes:
            started = time.perf_counter()
            plot_summary(summaries[steps], png, "run")
            times["new", steps].append(time.perf_counter() - started)
    for _ in range(args.old_repeats):
        for steps in sizes:
            started = time.perf_counter()
            old_refresh(logs[steps], png)
            times["old", steps].append(time.perf_counter() - started)
    median = {key: statistics.median(values) for key, values in times.items()}
    return dict(plot_1e3_s=median["new", 10 ** 3], plot_1e5_s=median["new", 10 ** 5],
                plot_ratio=median["new", 10 ** 5] / median["new", 10 ** 3],
                old_plot_1e3_s=median["old", 10 ** 3], old_plot_1e5_s=median["old", 10 ** 5],
                old_plot_ratio=median["old", 10 ** 5] / median["old", 10 ** 3],
                points_drawn_1e5=len(summaries[10 ** 5].series()[0]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(REPO / "data/photos/train"),
                        help="training images (default: the default photo collection)")
    parser.add_argument("--max-patches", type=int, default=40,
                        help="patch buffer per batch (default: %(default)s)")
    parser.add_argument("--channels", type=int, default=8,
                        help="conv1 outputs of the small net (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1,
                        help="loader processes (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=1000,
                        help="timed steps of each kind, alternating (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=20,
                        help="untimed steps first (default: %(default)s)")
    parser.add_argument("--plot-seconds", type=float, default=60,
                        help="the loop's plot interval, tools/train.py's default")
    parser.add_argument("--flush-seconds", type=float, default=10,
                        help="the loop's train.log flush interval, tools/train.py's default")
    parser.add_argument("--print-seconds", type=float, default=10,
                        help="the progress line interval, tools/train.py's default")
    parser.add_argument("--repeats", type=int, default=7,
                        help="plot refreshes per size (default: %(default)s)")
    parser.add_argument("--old-repeats", type=int, default=3,
                        help="refreshes per size of the previous method (default: %(default)s)")
    parser.add_argument("--blas-threads", default="1",
                        help="OPENBLAS_NUM_THREADS for Caffe unless already set (default: "
                             "%(default)s: a 2-core machine also runs the loader)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 10 steps of each kind, 2 refreshes")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats, args.old_repeats = 10, 2, 2, 1
    os.environ.setdefault("OPENBLAS_NUM_THREADS", args.blas_threads)  # before Caffe loads
    caffe = load_caffe()
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "loop").mkdir()
        (Path(folder) / "plot").mkdir()
        numbers = loop_overhead(caffe, Path(folder) / "loop", args)
        print(f"bare solver.step(1): {numbers['bare_step_ms']:.2f} ms per step (median "
              f"{numbers['bare_median_ms']:.2f}); loop: {numbers['loop_step_ms']:.2f} ms (median "
              f"{numbers['loop_median_ms']:.2f}); {numbers['steps_each']} steps each, "
              f"alternating, {numbers['seconds']:.0f} s, {numbers['mean_patches']:.1f} patches "
              f"per batch, data wait {100 * numbers['loop_data_wait_share']:.1f}% of loop time")
        print(f"loop / bare step time: {numbers['loop_ratio']:.4f} (total; 95% bootstrap "
              f"interval {numbers['loop_ratio_ci95'][0]:.4f}-{numbers['loop_ratio_ci95'][1]:.4f}; "
              f"halves "
              f"{numbers['loop_ratio_halves'][0]:.4f}, {numbers['loop_ratio_halves'][1]:.4f}; "
              f"medians {numbers['loop_ratio_median']:.4f}); goal <= 1.02: "
              f"{'met' if numbers['loop_ratio'] <= 1.02 else 'not met'}", flush=True)
        numbers.update(plot_refresh(Path(folder) / "plot", args))
    print(f"plot refresh from the running summary: {numbers['plot_1e3_s'] * 1000:.0f} ms after "
          f"10^3 steps, {numbers['plot_1e5_s'] * 1000:.0f} ms after 10^5 "
          f"({numbers['points_drawn_1e5']} points); ratio {numbers['plot_ratio']:.3f} "
          f"(goal <= 1.5: {'met' if numbers['plot_ratio'] <= 1.5 else 'not met'})")
    print(f"previous refresh (re-read train.log, every row): {numbers['old_plot_1e3_s']:.2f} s "
          f"after 10^3, {numbers['old_plot_1e5_s']:.2f} s after 10^5; ratio "
          f"{numbers['old_plot_ratio']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
