"""Train a context-prediction net with a Caffe solver.

Examples:
  python tools/train.py                                  # color_dropping on data/photos/train
  python tools/train.py --net vgg --images '/data/imagenet/train/**/*.JPEG' --gpu 0
  python tools/train.py --paper                          # momentum .999 as in the paper

A run folder (default runs/<net>/) holds train.prototxt, solver.prototxt,
snapshots model_iter_N.{caffemodel,solverstate}, train.log (tab-separated, one
line per step) and training.png. Running again resumes from the newest
snapshot. train.log is written every --flush-seconds and on every stop;
training.png is redrawn every --plot-seconds. With --gpu, the loader uses one
process per CPU core but one unless --workers is given.
Ctrl-C, SIGTERM, or a file named 'pause' or 'quit' in the run
folder stops after the current step with a snapshot (exit 0); a second
Ctrl-C while that snapshot is written lets it finish, a third abandons it
(exit 130). Divergence (the reference's checks every 100 steps) stops with
exit 3, keeping the last good snapshot.

Snapshots are written every --snapshot-every steps and --snapshot-minutes
minutes under temporary names and renamed when complete; the newest --keep
pairs are kept; a damaged newest pair is moved to <run>/damaged/ on resume
and the previous one used. A full disk or an I/O error stops with one line
naming the folder (exit 1), the previous pair intact. One trainer per run
folder: a second one exits with the PID of the first (exit 2).
"""
import argparse
import sys

from ctxpred.cli import run_tool
from ctxpred.models.context import NET_NAMES
from ctxpred.training.commands import TrainOptions, train_command


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", choices=NET_NAMES, default="color_dropping",
                        help="which net to train (default: %(default)s)")
    parser.add_argument("--images", default="data/photos/train",
                        help="training images: a folder (searched recursively), a glob, a "
                             "Caffe list file or an LMDB of encoded images "
                             "(default: %(default)s, the default photo collection)")
    parser.add_argument("--out", help="run folder (default: runs/<net>)")
    parser.add_argument("--iters", type=int, default=1_700_000,
                        help="train until this iteration (default: %(default)s, the reference)")
    parser.add_argument("--minutes", type=float,
                        help="also stop (with a snapshot) after this many minutes")
    parser.add_argument("--gpu", type=int, help="CUDA device id (needs a CUDA build of Caffe)")
    parser.add_argument("--seed", type=int, default=0,
                        help="data sampling seed; a resumed run adds the iteration so it "
                             "does not replay the same batches (default: %(default)s)")
    parser.add_argument("--solver", help="solver prototxt to take settings from (its net, "
                                         "snapshot_prefix and solver_mode are replaced)")
    parser.add_argument("--paper", action="store_true",
                        help="the paper's solver variant: momentum 0.999 (reference: 0)")
    parser.add_argument("--base-lr", type=float, help="override base_lr (reference: 1e-5)")
    parser.add_argument("--momentum", type=float,
                        help="override momentum (reference: 0; --paper: 0.999)")
    parser.add_argument("--max-patches", type=int,
                        help="batch buffer; grid batches hold fewer patches (reference: 512)")
    parser.add_argument("--mode", choices=("grid", "pairs"), default="grid",
                        help="pair sampling: the code's grids or the paper's random pairs")
    parser.add_argument("--workers", type=int,
                        help="data loader processes (default: 2; with --gpu, one per CPU core "
                             "but one, which is left to the solver)")
    parser.add_argument("--reference-head", action="store_true",
                        help="use the reference fc7 on concatenated pairs instead of the "
                             "equivalent, faster factorized head (snapshots convert with "
                             "tools/convert_head.py)")
    parser.add_argument("--fresh", action="store_true",
                        help="start over: move an existing run folder aside first")
    parser.add_argument("--snapshot-every", type=int,
                        help="snapshot every N steps (default: the solver's snapshot value, "
                             "2000 for the reference; 0: never by step count)")
    parser.add_argument("--snapshot-minutes", type=float, default=5,
                        help="also snapshot every M minutes of wall clock, so that a crash "
                             "loses minutes, not hours (default: %(default)s; 0: never)")
    parser.add_argument("--keep", type=int, default=5,
                        help="keep the newest K snapshot pairs (default: %(default)s)")
    parser.add_argument("--plot-seconds", type=float, default=60,
                        help="redraw training.png every S seconds of wall clock, and at the "
                             "end (default: %(default)s)")
    parser.add_argument("--flush-seconds", type=float, default=10,
                        help="write buffered train.log rows every S seconds, and on every "
                             "stop (default: %(default)s)")
    parser.add_argument("--loader-timeout", type=float, default=300, metavar="SECONDS",
                        help="stop with an error (after a snapshot) when a data loader worker "
                             "delivers no batch for this long: a hung file system, an image "
                             "that never finishes decoding (default: %(default)s)")
    parser.add_argument("--print-seconds", type=float, default=10,
                        help="without a terminal, print a progress line every S seconds "
                             "(default: %(default)s)")
    return parser.parse_args(argv)


def main(argv=None):
    return train_command(TrainOptions(**vars(parse_args(argv))))


if __name__ == "__main__":
    sys.exit(run_tool(main))
