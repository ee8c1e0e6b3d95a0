"""The single entry point to pycaffe for the whole of ctxpred.

Every module that needs Caffe calls :func:`load_caffe` instead of importing
``caffe`` itself, so that the error for a missing build, glog's verbosity and
the CPU / GPU choice are handled in one place.
"""
import importlib
import os
import sys

SETUP_COMMAND = "make setup"


class CaffeNotAvailable(ImportError):
    """pycaffe cannot be imported, or lacks what was asked of it (e.g. CUDA)."""


def import_caffe(quiet=True):
    """Import pycaffe without touching the device mode (for Python layers).

    Parameters
    ----------
    quiet : bool
        Keep glog to warnings and errors. Only takes effect if Caffe was not
        imported yet in this process (glog reads it once).
    """
    if quiet and "caffe" not in sys.modules:
        os.environ.setdefault("GLOG_minloglevel", "2")
    try:
        return importlib.import_module("caffe")
    except ImportError as error:
        raise CaffeNotAvailable(
            f"pycaffe is not importable ({error}). Build and link it with "
            f"`{SETUP_COMMAND}` from the ctxpred checkout (or "
            "tools/build_caffe.sh --python <your venv's python>).") from error


def load_caffe(gpu=None, quiet=True):
    """Import pycaffe and select the device.

    Parameters
    ----------
    gpu : None or int
        None runs on the CPU; an int selects that CUDA device. Asking for a
        GPU from a CPU-only Caffe build raises :class:`CaffeNotAvailable`
        (Caffe itself would abort the process).
    quiet : bool
        As for :func:`import_caffe`.

    Returns
    -------
    module
        The ``caffe`` module.
    """
    caffe = import_caffe(quiet)
    if gpu is None:
        caffe.set_mode_cpu()
    else:
        if not caffe_has_cuda():
            raise CaffeNotAvailable(
                f"GPU {gpu} was requested, but this Caffe is a CPU-only build. "
                "Rebuild with `tools/build_caffe.sh --cuda` on a machine with "
                "CUDA, or drop --gpu to train on the CPU.")
        caffe.set_device(int(gpu))
        caffe.set_mode_gpu()
    return caffe


def caffe_has_cuda():
    """True when the imported Caffe library is linked against the CUDA runtime.

    Reads the shared objects mapped into this process, so it answers for the
    Caffe actually loaded, whoever built it. Call after importing caffe.
    """
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            return any("libcudart" in line for line in maps)
    except OSError:
        return False
