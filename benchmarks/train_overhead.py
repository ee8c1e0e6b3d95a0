"""Training overhead and pair-head speed, measured in one run on this machine.

1. Overhead: mean step time of ctxpred's training loop (tools/train.py's
   ``ctxpred.training.context_run.train``: solver step, logging, divergence checks, data
   wait) against ``caffe time`` (forward + backward only) of the same
   train.prototxt and batches. Goal: ratio <= 1.05 (data and Python hidden).
2. Pair head: ``caffe time`` of the reference head (fc7 on concatenated pairs)
   against the factorized head, at the reference batch (< 512 patches).

Both nets draw the same batches (same seed, one worker). Run from the
checkout: python benchmarks/train_overhead.py [--quick]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ctxpred.caffe.env import load_caffe
from ctxpred.training.context_run import RunConfig, train, write_run_files
from ctxpred.training.log import read_log

REPO = Path(__file__).resolve().parents[1]
_AVERAGE = re.compile(r"Average Forward-Backward: ([\d.]+) ms")


def caffe_time(prototxt, iterations):
    """Mean forward+backward milliseconds from Caffe's own `caffe time`."""
    tool = Path(sys.executable).parent / "caffe"
    result = subprocess.run([str(tool), "time", "-model", str(prototxt),
                             "-iterations", str(iterations)],
                            capture_output=True, text=True,
                            env=dict(os.environ, GLOG_minloglevel="0"))
    match = _AVERAGE.search(result.stderr)
    if result.returncode or not match:
        raise RuntimeError(f"caffe time failed:\n{result.stderr[-2000:]}")
    return float(match.group(1)) / 1000


def loop_step_time(caffe, run_dir, iterations, warmup):
    """Mean seconds per step of ctxpred's training loop, after ``warmup`` steps."""
    train(caffe, run_dir / "solver.prototxt", run_dir, max_iter=warmup + iterations,
          plot_seconds=None, log=lambda *_: None)
    log = read_log(run_dir / "train.log")
    return float(np.mean(log["step_s"][warmup:])), float(np.sum(log["data_wait_s"][warmup:]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", default="color_dropping", help="net (default: %(default)s)")
    parser.add_argument("--images", default=str(REPO / "data/photos/train"),
                        help="training images (default: the default photo collection)")
    parser.add_argument("--iters", type=int, default=6,
                        help="timed iterations per measurement (default: %(default)s)")
    parser.add_argument("--max-patches", type=int, default=512,
                        help="batch buffer, the reference's 512 by default")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 128 patches, 2 iterations")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_patches, args.iters = 128, 2
    caffe = load_caffe()
    numbers = {"net": args.net, "max_patches": args.max_patches, "iterations": args.iters}
    with tempfile.TemporaryDirectory() as folder:
        runs = {}
        for head, factorized in (("reference", False), ("factorized", True)):
            run_dir = Path(folder, head)
            config = RunConfig(net=args.net, images=args.images, workers=1,
                               factorized_head=factorized,
                               data=(("max_patches", args.max_patches),))
            write_run_files(run_dir, config)
            runs[head] = run_dir
            numbers[f"caffe_time_{head}_s"] = caffe_time(run_dir / "train.prototxt", args.iters)
            print(f"caffe time, {head} head: {numbers[f'caffe_time_{head}_s']:.3f} s "
                  "forward+backward per iteration", flush=True)
        step, wait = loop_step_time(caffe, runs["factorized"], args.iters, warmup=1)
        numbers.update(loop_step_s=step, loop_data_wait_s=wait)
    overhead = step / numbers["caffe_time_factorized_s"]
    speedup = numbers["caffe_time_reference_s"] / numbers["caffe_time_factorized_s"]
    numbers.update(overhead_ratio=overhead, head_speedup=speedup)
    print(f"training loop (factorized head): {step:.3f} s per step, "
          f"data wait {wait:.3f} s over {args.iters} steps")
    print(f"overhead ratio, loop / caffe time: {overhead:.3f} "
          f"(goal <= 1.05: {'met' if overhead <= 1.05 else 'not met'})")
    print(f"pair head, reference / factorized time: {speedup:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2) + "\n")


if __name__ == "__main__":
    main()
