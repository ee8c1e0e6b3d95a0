"""Snapshots that survive crashes, full disks and damaged files; one trainer per run folder.

- :func:`write_snapshot`: Caffe writes the caffemodel / solverstate pair under
  temporary names in the run folder (``.part_iter_N.*``, the staging
  solver's ``snapshot_prefix``); the state's ``learned_net`` is pointed at
  the final caffemodel name, both files are fsynced and renamed, the model
  first, so a
  ``model_iter_N.solverstate`` is never visible without its complete model. A
  full disk is refused before Caffe writes (Caffe's writer would abort the
  process); an I/O error raises :class:`SnapshotError` naming the folder and
  cause, and the previous pair stays as it was.
- :func:`find_resume`: the newest pair that parses and fits the net; a
  damaged one is moved to ``<run>/damaged/`` and the previous pair is used.
- :func:`prune_snapshots`: keep the newest K pairs.
- :class:`RunLock`: a POSIX lock on ``<run>/lock`` holding the PID; released
  by the kernel when the process dies, so a lock left by a killed trainer is
  taken over.
"""
import errno
import fcntl
import os
import re
import shutil
from pathlib import Path

PART = ".part"
SUFFIXES = (".caffemodel", ".solverstate")
DAMAGED = "damaged"
_STATE = re.compile(r"model_iter_(\d+)\.solverstate$")


class SnapshotError(RuntimeError):
    """A snapshot could not be written; the message names the folder and the cause."""


class DamagedSnapshot(ValueError):
    """A snapshot pair does not parse or is incomplete."""


class IncompatibleSnapshot(ValueError):
    """A snapshot pair is intact but belongs to a different net."""


class RunFolderLocked(RuntimeError):
    """Another live trainer holds the run folder."""


def io_error_text(error, folder):
    """'no space left on device in runs/x' style text for an OSError."""
    cause = os.strerror(error.errno).lower() if error.errno else str(error)
    return f"{cause} in {folder}"


def snapshot_pairs(run_dir):
    """[(iteration, solverstate path)] in the run folder, newest first."""
    found = [(int(m.group(1)), path) for path in Path(run_dir).glob("model_iter_*.solverstate")
             if (m := _STATE.search(path.name))]
    return sorted(found, reverse=True)


def latest_snapshot(run_dir):
    """(iteration, path) of the newest solverstate in ``run_dir``, or None."""
    pairs = snapshot_pairs(run_dir)
    return pairs[0] if pairs else None


def staging_solver(solver_path, run_dir):
    """A copy of the run's solver that snapshots under temporary names and never by itself.

    Its ``snapshot_prefix`` is ``<run>/.part``: Caffe writes
    ``.part_iter_N.{caffemodel,solverstate}``, names as long as the final
    ``model_iter_N.*``, so the state's reference to its model is renamed in
    place. The run's solver.prototxt stays as written (the plain ``caffe
    train`` binary uses it); the training loop decides when to snapshot.
    """
    from ctxpred.training.solvers import read_solver, set_fields, write_solver
    run_dir = Path(run_dir).resolve()
    solver = set_fields(read_solver(solver_path), snapshot_prefix=run_dir / PART, snapshot=0)
    return write_solver(solver, run_dir / f"{PART}.solver.prototxt",
                        order=("snapshot_prefix", "snapshot"))


def _fsync_dir(path):
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _varint(handle):
    result = shift = 0
    while True:
        byte = handle.read(1)
        if not byte:
            raise OSError(errno.EIO, "truncated solverstate")
        result |= (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            return result


def _rename_learned_net(state_path, old, new):
    """Overwrite SolverState.learned_net (field 2) in place; ``old`` and ``new`` of equal length."""
    old, new = old.encode(), new.encode()
    if len(old) != len(new):
        raise ValueError("learned_net can only be renamed in place to a name of equal length")
    with open(state_path, "r+b") as handle:
        while True:
            tag = _varint(handle)
            field, wire = tag >> 3, tag & 7
            if wire == 0:
                _varint(handle)
            elif wire == 1:
                handle.seek(8, os.SEEK_CUR)
            elif wire == 5:
                handle.seek(4, os.SEEK_CUR)
            elif wire == 2:
                length = _varint(handle)
                if field == 2:
                    offset = handle.tell()
                    if length != len(old) or handle.read(length) != old:
                        raise OSError(errno.EIO, f"{state_path} does not refer to {old!r}")
                    handle.seek(offset)
                    handle.write(new)
                    handle.flush()
                    os.fsync(handle.fileno())
                    return
                handle.seek(length, os.SEEK_CUR)
            else:
                raise OSError(errno.EIO, f"{state_path}: unexpected wire type {wire}")


def _learnable_bytes(net):
    return sum(blob.count * 4 for blobs in net.params.values() for blob in blobs)


def write_snapshot(solver, run_dir, history_copies=1):
    """Write the solver's current state as model_iter_N.{caffemodel,solverstate}, atomically.

    The solver must come from :func:`staging_solver`; ``history_copies`` is
    the number of parameter-sized history blobs its type keeps (2 for Adam
    and AdaDelta), for the free-space check before the first snapshot, which
    Caffe's writer cannot survive running out of. Returns the
    solverstate path. Raises SnapshotError (folder and cause in the message)
    when it cannot be written; the previous pairs are untouched and no
    temporary file is left.
    """
    run_dir = Path(run_dir).resolve()
    iteration = solver.iter
    final = [run_dir / f"model_iter_{iteration}{suffix}" for suffix in SUFFIXES]
    part = [run_dir / f"{PART}_iter_{iteration}{suffix}" for suffix in SUFFIXES]
    try:
        for stale in run_dir.glob(f"{PART}_iter_*"):
            stale.unlink()
        pairs = snapshot_pairs(run_dir)
        if pairs:  # the previous pair's size, else the parameters and their history
            need = sum(path.stat().st_size for path in
                       (pairs[0][1], pairs[0][1].with_suffix(".caffemodel")) if path.exists())
        else:
            need = (1 + history_copies) * _learnable_bytes(solver.net)
        free = shutil.disk_usage(run_dir).free
        if free < need * 1.05 + (1 << 20):
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: a snapshot needs about "
                                        f"{need / 1e6:.0f} MB, {free / 1e6:.0f} MB free")
        solver.snapshot()  # Caffe writes .part_iter_N.*
        if not all(path.exists() for path in part):
            raise OSError(errno.EIO, f"Caffe did not write {part[0].name} and {part[1].name}")
        _rename_learned_net(part[1], str(part[0]), str(final[0]))
        with open(part[0], "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(part[0], final[0])  # the model first: never a state without its model
        _fsync_dir(run_dir)
        os.replace(part[1], final[1])
        _fsync_dir(run_dir)
    except BaseException as error:  # an I/O error, or a forced stop (third Ctrl-C)
        for leftover in part:
            try:
                leftover.unlink()
            except OSError:
                pass
        if not isinstance(error, OSError):
            raise
        message = f"{io_error_text(error, run_dir)}: snapshot at iteration {iteration} not written"
        if error.errno == errno.ENOSPC and error.strerror and "needs about" in error.strerror:
            message += f" ({error.strerror.split(': ', 1)[1]})"
        pairs = snapshot_pairs(run_dir)
        message += f"; kept {pairs[0][1].name}" if pairs else "; no earlier snapshot"
        raise SnapshotError(message) from None
    return final[1]


def prune_snapshots(run_dir, keep):
    """Delete all but the newest ``keep`` pairs (state first: never a state without its model)."""
    removed = []
    for _, state in snapshot_pairs(run_dir)[keep:]:
        for path in (state, state.with_suffix(".caffemodel")):
            try:
                path.unlink()
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


def verify_snapshot(caffe_pb2, net, state_path, history_factors=(1, 2)):
    """Check a pair before Caffe restores it (Caffe would abort on a bad one).

    Raises DamagedSnapshot (unparsable, truncated, missing model, layers or
    history) or IncompatibleSnapshot (intact, but shapes of another net).
    Returns the pair's caffemodel path and the state's ``learned_net``.
    """
    state_path = Path(state_path)
    model_path = state_path.with_suffix(".caffemodel")
    iteration = int(_STATE.search(state_path.name).group(1))
    if not model_path.exists():
        raise DamagedSnapshot(f"{model_path.name} is missing")
    for path in (state_path, model_path):
        if path.stat().st_size == 0:
            raise DamagedSnapshot(f"{path.name} is empty")
    state = caffe_pb2.SolverState()
    try:
        state.ParseFromString(state_path.read_bytes())
    except Exception as error:  # protobuf's DecodeError and friends
        raise DamagedSnapshot(f"{state_path.name} does not parse ({error})") from None
    if state.iter != iteration:
        raise DamagedSnapshot(f"{state_path.name} holds iteration {state.iter}")
    model = caffe_pb2.NetParameter()
    try:
        model.ParseFromString(model_path.read_bytes())
    except Exception as error:
        raise DamagedSnapshot(f"{model_path.name} does not parse ({error})") from None
    names, saved_names = list(net._layer_names), [layer.name for layer in model.layer]
    if saved_names != names:  # Caffe saves every layer of its net, in order
        if saved_names == names[:len(saved_names)]:
            raise DamagedSnapshot(
                f"{model_path.name} ends before layer {names[len(saved_names)]}")
        raise IncompatibleSnapshot(f"{model_path.name} holds the layers of another net "
                                   f"({len(saved_names)} layers, this net {len(names)})")
    saved = {layer.name: [tuple(blob.shape.dim) for blob in layer.blobs] for layer in model.layer}
    expected = []
    for name, blobs in net.params.items():
        shapes = [tuple(blob.data.shape) for blob in blobs]
        expected += shapes
        if name not in saved or len(saved[name]) != len(shapes):
            raise DamagedSnapshot(f"{model_path.name} lacks the weights of layer {name}")
        if saved[name] != shapes:
            raise IncompatibleSnapshot(
                f"{model_path.name}: layer {name} has shapes {saved[name]}, the net {shapes}")
        for layer in model.layer:
            if layer.name == name:
                for blob, shape in zip(layer.blobs, shapes):
                    if len(blob.data) != _count(shape):
                        raise DamagedSnapshot(f"{model_path.name}: layer {name} is truncated")
    history = [tuple(blob.shape.dim) for blob in state.history]
    if not any(history == expected * factor for factor in history_factors):
        raise DamagedSnapshot(f"{state_path.name} has {len(history)} history blobs, the net "
                              f"{len(expected)} parameter blobs")
    for blob in state.history:
        if len(blob.data) != _count(tuple(blob.shape.dim)):
            raise DamagedSnapshot(f"{state_path.name}: a history blob is truncated")
    return model_path, state.learned_net


def _count(shape):
    count = 1
    for dim in shape:
        count *= dim
    return count


def move_damaged(run_dir, state_path):
    """Move a pair to <run>/damaged/ (kept for inspection); returns the folder."""
    target = Path(run_dir) / DAMAGED
    target.mkdir(exist_ok=True)
    for path in (Path(state_path), Path(state_path).with_suffix(".caffemodel")):
        if path.exists():
            os.replace(path, target / path.name)
    return target


def find_resume(caffe_pb2, net, run_dir, log=print):
    """The newest intact pair (iteration, solverstate path), or None.

    Damaged pairs are moved aside with a message. Raises IncompatibleSnapshot
    when the newest intact pair belongs to another net. A state whose
    ``learned_net`` does not name its neighbouring caffemodel (a moved run
    folder) is rewritten to do so.
    """
    for iteration, state_path in snapshot_pairs(run_dir):
        try:
            model_path, learned_net = verify_snapshot(caffe_pb2, net, state_path)
        except IncompatibleSnapshot as error:
            raise IncompatibleSnapshot(
                f"{error}; the run folder {run_dir} belongs to another net: move it aside "
                "(tools/train.py --fresh) or choose another folder") from None
        except DamagedSnapshot as error:
            folder = move_damaged(run_dir, state_path)
            log(f"snapshot {state_path.name} is damaged ({error}); moved it to {folder} and "
                "trying the previous one")
            continue
        if not learned_net or Path(learned_net).resolve() != model_path.resolve():
            log(f"{state_path.name} referred to {learned_net}; now to {model_path.resolve()}")
            state = caffe_pb2.SolverState()
            state.ParseFromString(state_path.read_bytes())
            state.learned_net = str(model_path.resolve())
            temporary = state_path.with_name(state_path.name + ".tmp")
            with open(temporary, "wb") as handle:
                handle.write(state.SerializeToString())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, state_path)
        return iteration, state_path
    return None


class RunLock:
    """One trainer per run folder: an exclusive POSIX lock on ``<run>/lock`` with the PID.

    The kernel drops the lock when the process dies (kill -9 included), so a
    lock file left behind is taken over; forked loader workers do not hold it.
    """

    def __init__(self, run_dir):
        self.path = Path(run_dir) / "lock"
        self._fd = None
        self.previous_pid = None

    def acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if error.errno in (errno.EACCES, errno.EAGAIN):
                raise RunFolderLocked(f"run folder {self.path.parent} is in use by the trainer "
                                      f"with PID {holder} ({self.path})") from None
            raise
        previous = os.pread(fd, 64, 0).decode(errors="replace").strip()
        self.previous_pid = previous or None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:  # a full disk: the lock holds, only its PID note is missing
            pass
        self._fd = fd
        return self

    def release(self):
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            finally:
                os.close(self._fd)  # closing drops the lock
                self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()
