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
from pathlib import Path

from ctxpred.caffe.env import CaffeNotAvailable, load_caffe
from ctxpred.cli import exit_code, run_tool
from ctxpred.models.context import NET_NAMES
from ctxpred.training.snapshots import RunFolderLocked, RunLock, SnapshotError, io_error_text
from ctxpred.training.loop import (DivergenceError, RunConfig, default_workers, latest_snapshot,
                              move_aside, progress_printer, train, write_run_files)


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
    args = parse_args(argv)
    out = Path(args.out or f"runs/{args.net}")
    try:
        caffe = load_caffe(gpu=args.gpu)
    except CaffeNotAvailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for flag, value, least in (("--keep", args.keep, 1),
                               ("--snapshot-every", args.snapshot_every, 0),
                               ("--snapshot-minutes", args.snapshot_minutes, 0)):
        if value is not None and value < least:
            print(f"error: {flag} must be at least {least}, not {value}", file=sys.stderr)
            return 2
    existed = out.exists()
    try:
        lock = RunLock(out).acquire()  # before anything in the folder is touched
    except RunFolderLocked as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        if args.fresh and existed:
            lock.release()
            print(f"moved the previous run to {move_aside(out)}")
            lock = RunLock(out).acquire()
        return run(args, out, caffe, lock)
    except RunFolderLocked as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # writing the run files: a full disk, an I/O error
        print(f"error: {io_error_text(error, out)}", file=sys.stderr)
        return 1
    finally:
        lock.release()


def run(args, out, caffe, lock):
    resume = latest_snapshot(out)
    overrides = {}
    if args.paper:
        overrides["momentum"] = 0.999
    if args.momentum is not None:
        overrides["momentum"] = args.momentum
    if args.base_lr is not None:
        overrides["base_lr"] = args.base_lr
    overrides["solver_mode"] = "GPU" if args.gpu is not None else "CPU"
    if not args.loader_timeout > 0:
        print(f"error: --loader-timeout must be positive, not {args.loader_timeout}",
              file=sys.stderr)
        return 2
    data = {"mode": args.mode, "stall_seconds": args.loader_timeout}
    if args.max_patches:
        data["max_patches"] = args.max_patches
    workers = args.workers if args.workers is not None else default_workers(args.gpu)
    if args.workers is not None and args.workers < 1:
        print(f"error: --workers must be at least 1, not {args.workers}", file=sys.stderr)
        return 2
    config = RunConfig(net=args.net, images=args.images,
                       seed=args.seed + (resume[0] if resume else 0), workers=workers,
                       factorized_head=not args.reference_head, data=tuple(data.items()),
                       solver_overrides=tuple(overrides.items()))
    if args.solver and not Path(args.solver).is_file():
        print(f"error: solver file {args.solver} does not exist", file=sys.stderr)
        return 2
    solver_path = write_run_files(out, config, args.solver)
    print(f"run folder {out}: {args.net}, images {args.images}, {workers} loader workers, "
          f"{'resuming' if resume else 'starting'} at iteration {resume[0] if resume else 0}")
    try:
        result = train(caffe, solver_path, out, args.iters,
                       time_budget_s=args.minutes * 60 if args.minutes else None,
                       plot_seconds=args.plot_seconds, flush_seconds=args.flush_seconds,
                       snapshot_every=args.snapshot_every,
                       snapshot_minutes=args.snapshot_minutes or None, keep=args.keep,
                       lock=lock,
                       progress=progress_printer(args.iters, resume[0] if resume else 0,
                                                 args.print_seconds))
    except DivergenceError as error:
        print(f"\nerror: training diverged: {error}", file=sys.stderr)
        return 3
    except SnapshotError as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # train.log, training.png, events: a full disk, an I/O error
        where = Path(error.filename).parent if error.filename else out
        print(f"\nerror: {io_error_text(error, where)}"
              f"{f' (writing {Path(error.filename).name})' if error.filename else ''}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        newest = latest_snapshot(out)
        print(f"\ninterrupted: {interrupt or 'Ctrl-C'}; newest snapshot "
              f"{newest[1] if newest else 'none'}", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError) as error:  # no usable image (2), a failed loader (1)
        print(f"\nerror: {error}", file=sys.stderr)
        return exit_code(error)
    print(f"\nstopped at iteration {result['iter']} ({result['reason']}) after "
          f"{result['seconds']:.0f} s; snapshot {result['snapshot']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
