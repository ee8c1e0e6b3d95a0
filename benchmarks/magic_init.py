"""Magic init -cs -d on the groupless CaffeNet: ctxpred's tool against the reference procedure.

Runs, interleaved (A B, B A, A B, ...), each in its own child process:

  A: python tools/magic_init.py -q -cs -d IMAGES -nit 10 -bs 16 --seed S \\
         prototxt/groupless_caffenet.prototxt A_S.caffemodel
  B: the reference's procedure on the same command (ctxpred.weights.magic_init_reference:
     one TRAIN-phase net with an ImageData layer, Dropout active, -t elwise, -cs)

with seed S = 0, 1, ... per repeat, every layer initialised from data (227x227
input, no loaded model). Prints each run's wall time and peak resident memory
(ru_maxrss of that child from os.wait4, which covers its own children), the
median of each and the ratios A / B (below 1: ctxpred is faster / smaller),
and then, over the seeds, each layer's weight scale (root mean square) and
mean per-channel pre-activation std on the first -bs images in the TEST phase:
mean and coefficient of variation for A and for B, and A's mean over B's.
The load average is printed before and after (wall-clock timings: other busy
processes slow both arms alike, which the interleaving spreads over both).

Run from the checkout after `make setup`: python benchmarks/magic_init.py
"""
import argparse
import glob
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PARAMETER_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")


def run_child(command, log_path):
    """(wall seconds, peak RSS MiB) of ``command``; its output goes to ``log_path``."""
    with open(log_path, "w") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        sys.exit(f"{' '.join(map(str, command))} failed ({process.returncode}):\n"
                 f"{Path(log_path).read_text()[-3000:]}")
    return wall, usage.ru_maxrss / 1024  # Linux: KiB


def layer_spreads(caffe, prototxt, model, images):
    """{layer: (weight rms, mean per-channel pre-activation std)} in the TEST phase."""
    net = caffe.Net(str(prototxt), caffe.TEST, weights=str(model))
    net.blobs["data"].reshape(*images.shape)
    net.reshape()
    names = list(net._layer_names)
    net.blobs["data"].data[...] = images
    out = {}
    for name in PARAMETER_LAYERS:
        net._forward(0, names.index(name))  # stops before the in-place ReLU
        data = net.blobs[name].data
        values = np.moveaxis(data, 1, 0).reshape(data.shape[1], -1)
        out[name] = (float(np.sqrt(np.mean(np.square(net.params[name][0].data,
                                                     dtype=np.float64)))),
                     float(values.std(axis=1, dtype=np.float64).mean()))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(REPO / "data/photos/train/*.jpg"),
                        help="image glob for -d (default: the default photo collection)")
    parser.add_argument("--prototxt", default=str(REPO / "prototxt/groupless_caffenet.prototxt"),
                        help="net to initialise (default: the groupless CaffeNet)")
    parser.add_argument("-nit", type=int, default=10, help="batches (default: %(default)s)")
    parser.add_argument("-bs", type=int, default=16, help="batch size (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each, seeds 0..N-1, interleaved (default: %(default)s)")
    parser.add_argument("--show-output", action="store_true",
                        help="also print ctxpred's own output (the summary table) of each run")
    parser.add_argument("--reference-child", nargs=2, metavar=("SEED", "OUT"),
                        help=argparse.SUPPRESS)  # internal: run arm B in this process
    args = parser.parse_args(argv)
    images = sorted(glob.glob(args.images))
    if not images:
        sys.exit(f"error: no image matches {args.images}")
    from ctxpred.caffe.env import load_caffe
    if args.reference_child:
        from ctxpred.weights.magic_init_reference import run
        seed, out = args.reference_child
        run(load_caffe(gpu=None, quiet=True), args.prototxt, images, out, args.bs, args.nit,
            int(seed))
        return 0

    print(f"load average before: {' '.join(f'{load:.2f}' for load in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs; {len(images)} images, -nit {args.nit} -bs {args.bs}")
    times = {"ctxpred": [], "reference": []}
    peaks = {"ctxpred": [], "reference": []}
    models = {"ctxpred": [], "reference": []}
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(args.repeats):
            commands = {
                "ctxpred": [sys.executable, str(REPO / "tools/magic_init.py"), "-q", "-cs",
                            "-d", args.images, "-nit", str(args.nit), "-bs", str(args.bs),
                            "--seed", str(seed), args.prototxt,
                            str(Path(folder, f"ctxpred_{seed}.caffemodel"))],
                "reference": [sys.executable, str(Path(__file__).resolve()), "--images",
                              args.images, "--prototxt", args.prototxt, "-nit", str(args.nit),
                              "-bs", str(args.bs), "--reference-child", str(seed),
                              str(Path(folder, f"reference_{seed}.caffemodel"))]}
            order = ["ctxpred", "reference"] if seed % 2 == 0 else ["reference", "ctxpred"]
            for arm in order:
                log = Path(folder, f"{arm}_{seed}.log")
                wall, peak = run_child(commands[arm], log)
                times[arm].append(wall)
                peaks[arm].append(peak)
                models[arm].append(Path(folder, f"{arm}_{seed}.caffemodel"))
                print(f"seed {seed} {arm:<9}: wall {wall:6.1f} s, peak {peak:6.0f} MiB",
                      flush=True)
                if args.show_output and arm == "ctxpred":
                    print(log.read_text())
        ratio_time = statistics.median(times["ctxpred"]) / statistics.median(times["reference"])
        ratio_peak = statistics.median(peaks["ctxpred"]) / statistics.median(peaks["reference"])
        for arm in times:
            print(f"{arm:<9}: median wall {statistics.median(times[arm]):.1f} s, "
                  f"median peak {statistics.median(peaks[arm]):.0f} MiB")
        print(f"ratio ctxpred / reference: wall time {ratio_time:.2f}, peak memory "
              f"{ratio_peak:.2f}")

        from ctxpred.weights.magic_init import image_batches
        caffe = load_caffe(gpu=None, quiet=True)
        batch, = image_batches(args.images, args.bs, 1, (227, 227),
                               rng=np.random.default_rng(0), log=lambda _: None)
        spreads = {arm: [layer_spreads(caffe, args.prototxt, model, batch) for model in paths]
                   for arm, paths in models.items()}
    print(f"\nover seeds 0..{args.repeats - 1}: mean, coefficient of variation across seeds")
    print(f"{'layer':<6} {'W rms ctxpred':>22} {'W rms reference':>22} {'ratio':>6}   "
          f"{'pre std ctxpred':>22} {'pre std reference':>22} {'ratio':>6}")
    for name in PARAMETER_LAYERS:
        cells = []
        for what in (0, 1):
            means = []
            for arm in ("ctxpred", "reference"):
                values = np.array([run[name][what] for run in spreads[arm]])
                means.append(values.mean())
                spread = values.std(ddof=1) / values.mean() if len(values) > 1 else float("nan")
                cells.append(f"{values.mean():12.4g} cv {100 * spread:4.1f}%")
            cells.append(f"{means[0] / means[1]:6.3f}")
        print(f"{name:<6} {cells[0]:>22} {cells[1]:>22} {cells[2]:>6}   {cells[3]:>22} "
              f"{cells[4]:>22} {cells[5]:>6}")
    print(f"load average after: {' '.join(f'{load:.2f}' for load in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
