"""tools/train.py's work: check the flags, lock and prepare the run folder, train, map
each way a run can end to one line and an exit code (:mod:`ctxpred.cli`)."""
import sys
from dataclasses import dataclass
from pathlib import Path

from ctxpred.caffe.env import CaffeNotAvailable, load_caffe
from ctxpred.cli import DIVERGED, DONE, FAILED, INTERRUPTED, exit_code, fail
from ctxpred.training.context_run import (RunConfig, default_workers, describe_context_row, train,
                                         write_run_files)
from ctxpred.training.loop import DivergenceError, move_aside, progress_printer
from ctxpred.training.snapshots import (RunFolderLocked, RunLock, SnapshotError, io_error_text,
                                        latest_snapshot)


@dataclass(frozen=True)
class TrainOptions:
    """tools/train.py's flags, under their destination names (see its ``--help``)."""
    net: str = "color_dropping"
    images: str = "data/photos/train"
    out: str = None
    iters: int = 1_700_000
    minutes: float = None
    gpu: int = None
    seed: int = 0
    solver: str = None
    paper: bool = False
    base_lr: float = None
    momentum: float = None
    max_patches: int = None
    mode: str = "grid"
    workers: int = None
    reference_head: bool = False
    fresh: bool = False
    snapshot_every: int = None
    snapshot_minutes: float = 5
    keep: int = 5
    plot_seconds: float = 60
    flush_seconds: float = 10
    loader_timeout: float = 300
    print_seconds: float = 10


def option_problem(options):
    """What is wrong with the flags (one line), or None."""
    for flag, value, least in (("--keep", options.keep, 1),
                               ("--snapshot-every", options.snapshot_every, 0),
                               ("--snapshot-minutes", options.snapshot_minutes, 0),
                               ("--workers", options.workers, 1)):
        if value is not None and value < least:
            return f"{flag} must be at least {least}, not {value}"
    if not options.loader_timeout > 0:
        return f"--loader-timeout must be positive, not {options.loader_timeout}"
    if options.solver and not Path(options.solver).is_file():
        return f"solver file {options.solver} does not exist"
    return None


def run_config(options, start_iteration):
    """The :class:`RunConfig` of the flags; the data seed moves on with a resumed run."""
    overrides = {"momentum": 0.999} if options.paper else {}
    if options.momentum is not None:
        overrides["momentum"] = options.momentum
    if options.base_lr is not None:
        overrides["base_lr"] = options.base_lr
    overrides["solver_mode"] = "GPU" if options.gpu is not None else "CPU"
    data = {"mode": options.mode, "stall_seconds": options.loader_timeout}
    if options.max_patches:
        data["max_patches"] = options.max_patches
    workers = options.workers if options.workers is not None else default_workers(options.gpu)
    return RunConfig(net=options.net, images=options.images,
                     seed=options.seed + start_iteration, workers=workers,
                     factorized_head=not options.reference_head, data=tuple(data.items()),
                     solver_overrides=tuple(overrides.items()))


def train_command(options):
    """Train as tools/train.py does; returns the exit code (errors: one line on stderr)."""
    out = Path(options.out or f"runs/{options.net}")
    try:
        caffe = load_caffe(gpu=options.gpu)
    except CaffeNotAvailable as error:
        return fail(error)
    problem = option_problem(options)
    if problem:
        return fail(problem)
    existed = out.exists()
    try:
        lock = RunLock(out).acquire()  # before anything in the folder is touched
    except RunFolderLocked as error:
        return fail(error)
    try:
        if options.fresh and existed:
            lock.release()
            print(f"moved the previous run to {move_aside(out)}")
            lock = RunLock(out).acquire()
        return _train_locked(options, out, caffe, lock)
    except RunFolderLocked as error:
        return fail(error)
    except OSError as error:  # writing the run files: a full disk, an I/O error
        return fail(io_error_text(error, out), FAILED)
    finally:
        lock.release()


def _train_locked(options, out, caffe, lock):
    resume = latest_snapshot(out)
    start = resume[0] if resume else 0
    config = run_config(options, start)
    solver_path = write_run_files(out, config, options.solver)
    print(f"run folder {out}: {options.net}, images {options.images}, {config.workers} loader "
          f"workers, {'resuming' if resume else 'starting'} at iteration {start}")
    try:
        result = train(caffe, solver_path, out, options.iters,
                       time_budget_s=options.minutes * 60 if options.minutes else None,
                       plot_seconds=options.plot_seconds, flush_seconds=options.flush_seconds,
                       snapshot_every=options.snapshot_every,
                       snapshot_minutes=options.snapshot_minutes or None, keep=options.keep,
                       lock=lock, progress=progress_printer(options.iters, start,
                                                            options.print_seconds,
                                                            describe=describe_context_row))
    except (KeyboardInterrupt, OSError, ValueError, RuntimeError) as error:
        print(file=sys.stderr)  # below a progress bar
        return training_error(error, out)
    print(f"\nstopped at iteration {result['iter']} ({result['reason']}) after "
          f"{result['seconds']:.0f} s; snapshot {result['snapshot']}")
    return DONE


def training_error(error, out):
    """One line on stderr for how a run ended badly; returns its exit code."""
    if isinstance(error, DivergenceError):
        return fail(f"training diverged: {error}", DIVERGED)
    if isinstance(error, SnapshotError):
        return fail(error, FAILED)
    if isinstance(error, KeyboardInterrupt):
        newest = latest_snapshot(out)
        return fail(f"interrupted: {error or 'Ctrl-C'}; newest snapshot "
                    f"{newest[1] if newest else 'none'}", INTERRUPTED)
    if isinstance(error, OSError):
        # train.log, training.png, events: a full disk, an I/O error
        where = Path(error.filename).parent if error.filename else out
        writing = f" (writing {Path(error.filename).name})" if error.filename else ""
        return fail(f"{io_error_text(error, where)}{writing}", FAILED)
    return fail(error, exit_code(error))  # no usable image (2), a failed loader (1)
