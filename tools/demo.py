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
import sys

from ctxpred.cli import run_tool
from ctxpred.training.demo import DemoOptions, run_demo


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


def main(argv=None):
    return run_demo(DemoOptions(**vars(parse_args(argv))))


if __name__ == "__main__":
    sys.exit(run_tool(main))
