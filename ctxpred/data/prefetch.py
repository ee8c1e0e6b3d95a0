"""Worker processes that assemble patch-pair batches into shared memory.

Each worker owns a shared-memory ring of ``depth`` batch slots and a random
generator spawned from the seed. The consumer takes batches round-robin over
the workers (as the reference's loader queues), so the stream of batches is
deterministic for a given seed and worker count. Only slot numbers and sizes
travel through pipes; the patches never get pickled.

Shutdown is explicit (:meth:`BatchPrefetcher.close`), tied to garbage
collection and interpreter exit (``weakref.finalize``), and a worker whose
parent dies (SIGKILL, SIGTERM without handler) notices and exits; shared memory
is unlinked by the owner, or by multiprocessing's resource tracker if the owner
is killed outright.

A worker that stops delivering (a hung file system, a decode that never
ends) is detected: after ``stall_seconds`` without a batch the consumer
raises RuntimeError. Images a worker skips are reported to the consumer,
which warns once per image per run (not once per worker) and counts them.
"""
import multiprocessing
import os
import queue
import signal
import time
import traceback
import warnings
import weakref
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from ctxpred.data.batching import BatchAssembler, SkippedImageWarning

# How often a waiting consumer checks that its workers are alive (seconds).
_LIVENESS_POLL = 0.5


@dataclass
class Batch:
    """One batch, as views into a worker's shared slot (valid until released).

    data : (n_patches, 3, patch, patch) float32
    select1, select2 : (n_pairs,) int32, indices into ``data``
    labels : (n_pairs,) int32 in 0..7
    """
    data: np.ndarray
    select1: np.ndarray
    select2: np.ndarray
    labels: np.ndarray
    worker: int
    slot: int


class _SlotRing:
    """``depth`` batch slots in one shared-memory block, viewed as arrays."""

    def __init__(self, memory, depth, max_patches, max_pairs, patch):
        self.memory = memory
        patch_shape = (depth, max_patches, 3, patch, patch)
        data_bytes = int(np.prod(patch_shape)) * 4
        self.data = np.ndarray(patch_shape, np.float32, memory.buf)
        self.pairs = np.ndarray((depth, 3, max_pairs), np.int32, memory.buf, offset=data_bytes)

    @staticmethod
    def nbytes(depth, max_patches, max_pairs, patch):
        return depth * (max_patches * 3 * patch * patch + 3 * max_pairs) * 4

    def release_views(self):
        self.data = self.pairs = None


def _worker_main(index, source, config, seed_sequence, memory_name, depth, max_pairs,
                 free_slots, ready, parent_pid):
    """Fill free slots with batches until told to stop or the parent dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides on Ctrl-C
    warnings.simplefilter("ignore", SkippedImageWarning)  # the consumer warns, once per image
    memory = shared_memory.SharedMemory(name=memory_name)
    ring = _SlotRing(memory, depth, config.max_patches, max_pairs, config.geometry.patch)
    try:
        assembler = BatchAssembler(source, config, np.random.default_rng(seed_sequence))
        reported = 0  # skipped images already sent to the consumer
        while True:
            try:
                slot = free_slots.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent_pid:
                    return
                continue
            if slot is None:
                return
            info = assembler.fill(ring.data[slot])
            n_pairs = len(info.labels)
            if n_pairs > max_pairs:
                raise RuntimeError(f"batch has {n_pairs} pairs, more than the {max_pairs} slots")
            ring.pairs[slot, 0, :n_pairs] = info.select1
            ring.pairs[slot, 1, :n_pairs] = info.select2
            ring.pairs[slot, 2, :n_pairs] = info.labels
            skipped = list(assembler.skipped.items())[reported:]
            reported += len(skipped)
            ready.put(("batch", slot, info.n_patches, n_pairs, skipped))
    except BaseException as error:  # reported to the consumer, which raises it
        ready.put(("error", isinstance(error, ValueError), _one_line(error)))
    finally:
        ring.release_views()
        memory.close()


def _one_line(error):
    """``Type: message (file:line)`` of an exception, where it was raised, on one line."""
    frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    where = f" ({os.path.basename(frame.filename)}:{frame.lineno})" if frame else ""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}{where}" if not isinstance(error, ValueError) else text


def _shutdown(processes, free_queues, memories):
    for free_slots in free_queues:
        try:
            free_slots.put_nowait(None)
        except (ValueError, OSError):
            pass
    deadline = time.monotonic() + 2.0
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.terminate()
            process.join(1.0)
    for memory in memories:
        try:
            memory.close()
        except BufferError:  # a caller still holds a view; unlinking frees it later
            pass
        try:
            memory.unlink()
        except FileNotFoundError:
            pass


class BatchPrefetcher:
    """Background batch assembly for :class:`ctxpred.data.layer.PatchPairData`.

    Parameters
    ----------
    source : ctxpred.data.images.ImageSource
    config : ctxpred.data.batching.PatchPairConfig
    seed : int
        Seeds every worker (through ``numpy.random.SeedSequence.spawn``).
    workers : int
        Number of worker processes (>= 1).
    depth : int
        Batches each worker may hold ready ahead of the consumer.
    stall_seconds : float
        How long :meth:`next` waits for a live worker's batch before it
        raises RuntimeError (the worker stalled).

    ``skipped`` holds {image name: reason} of the images the workers skipped
    (each also warned once, as a SkippedImageWarning); ``images_skipped`` is
    their number.
    """

    def __init__(self, source, config, seed=0, workers=2, depth=3, stall_seconds=300.0):
        if workers < 1 or depth < 1:
            raise ValueError(f"workers and depth must be >= 1, got {workers} and {depth}")
        if not stall_seconds > 0:
            raise ValueError(f"stall_seconds must be positive, got {stall_seconds}")
        self.stall_seconds = stall_seconds
        self.config = config
        self.max_pairs = config.max_pairs
        self.workers = workers
        self.wait_seconds = 0.0  # total time next() spent waiting for data
        self.skipped = {}
        # fork: works inside the `caffe` binary's embedded interpreter, where
        # sys.executable is not a Python. Workers never touch Caffe or BLAS.
        context = multiprocessing.get_context("fork")
        nbytes = _SlotRing.nbytes(depth, config.max_patches, self.max_pairs, config.geometry.patch)
        self._memories, self._rings, self._free, self._ready, self._processes = [], [], [], [], []
        self._finalizer = weakref.finalize(self, _shutdown, self._processes, self._free,
                                           self._memories)
        seeds = np.random.SeedSequence(seed).spawn(workers)
        for index in range(workers):
            memory = shared_memory.SharedMemory(create=True, size=nbytes)
            self._memories.append(memory)
            self._rings.append(_SlotRing(memory, depth, config.max_patches, self.max_pairs,
                                         config.geometry.patch))
            free_slots, ready = context.Queue(), context.Queue()
            for slot in range(depth):
                free_slots.put(slot)
            process = context.Process(
                target=_worker_main, name=f"ctxpred-loader-{index}", daemon=True,
                args=(index, source, config, seeds[index], memory.name, depth,
                      self.max_pairs, free_slots, ready, os.getpid()))
            process.start()
            self._free.append(free_slots)
            self._ready.append(ready)
            self._processes.append(process)
        self._next_worker = 0
        self._held = None

    def next(self):
        """The next batch in round-robin order; waits for it if needed.

        The previous batch's slot is handed back to its worker, so a batch's
        arrays are valid until the following call. Raises ValueError if a
        worker found no usable input (one line naming the source), RuntimeError
        if a worker failed, died or delivered nothing for ``stall_seconds``.
        """
        if self._held is not None:
            self._free[self._held.worker].put(self._held.slot)
            self._held = None
        worker = self._next_worker
        started = time.perf_counter()
        message = self._receive(worker)
        self.wait_seconds += time.perf_counter() - started
        _, slot, n_patches, n_pairs, skipped = message
        for name, reason in skipped:
            if name not in self.skipped:
                self.skipped[name] = reason
                warnings.warn(f"skipping image {name}: {reason}", SkippedImageWarning,
                              stacklevel=2)
        ring = self._rings[worker]
        pairs = ring.pairs[slot]
        self._held = Batch(data=ring.data[slot, :n_patches], select1=pairs[0, :n_pairs],
                           select2=pairs[1, :n_pairs], labels=pairs[2, :n_pairs],
                           worker=worker, slot=slot)
        self._next_worker = (worker + 1) % self.workers
        return self._held

    @property
    def images_skipped(self):
        return len(self.skipped)

    def _receive(self, worker):
        process = self._processes[worker]
        waiting_since = time.monotonic()
        while True:
            try:
                message = self._ready[worker].get(timeout=_LIVENESS_POLL)
            except queue.Empty:
                if not process.is_alive():
                    self.close()
                    raise RuntimeError(
                        f"data loader worker {worker} died (exit code {process.exitcode}) "
                        "without reporting an error; see the log above") from None
                if time.monotonic() - waiting_since > self.stall_seconds:
                    self.close()
                    raise RuntimeError(
                        f"data loader worker {worker} delivered no batch in "
                        f"{self.stall_seconds:g} s: it stalled (a hung file system, an image "
                        "that does not finish decoding?); the limit is the data layer's "
                        "\"stall_seconds\"") from None
                continue
            if message[0] == "error":
                self.close()
                _, bad_input, text = message
                if bad_input:  # no usable image in the source
                    raise ValueError(text)
                raise RuntimeError(f"data loader worker {worker} failed: {text}")
            return message

    def close(self):
        """Stop the workers and free the shared memory (idempotent)."""
        self._held = None
        for ring in self._rings:
            ring.release_views()
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
