"""The single entry point to pycaffe for the whole of ctxpred.

Every module that needs Caffe calls :func:`load_caffe` instead of importing
``caffe`` itself, so that the error for a missing build, glog's verbosity and
the CPU / GPU choice are handled in one place.
"""
import ctypes
import importlib
import os
import sys
from dataclasses import dataclass

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
        status = gpu_status(int(gpu))
        if not status.usable:
            raise CaffeNotAvailable(f"GPU {gpu} was requested, but {status.reason}")
        caffe.set_device(int(gpu))
        caffe.set_mode_gpu()
    return caffe


# The oldest Linux driver each CUDA major version runs on (NVIDIA's release notes).
_MIN_DRIVER = {12: "525", 13: "580"}


@dataclass(frozen=True)
class GpuStatus:
    """Whether the loaded Caffe can run on a GPU here, and if not, why.

    runtime_version, driver_version: CUDA versions as "major.minor" ("" when
    unknown or absent); device_count: visible CUDA devices (0 when unknown).
    """
    usable: bool
    reason: str
    runtime_version: str = ""
    driver_version: str = ""
    device_count: int = 0


def _cuda_version(number):
    return f"{number // 1000}.{number % 1000 // 10}" if number > 0 else ""


def gpu_status(device=0):
    """Check, without letting Caffe abort, that CUDA device ``device`` is usable.

    Asks the CUDA runtime that the loaded Caffe is linked against (found in
    this process's mapped libraries) for its version, the driver's version
    and the device count. Caffe's own checks would end the process with a
    C++ check failure when no driver or GPU is present; this answers with a
    :class:`GpuStatus` whose ``reason`` is one line for the user.
    """
    import_caffe()
    cudart = _mapped_library("libcudart")
    if cudart is None:
        return GpuStatus(False, "this Caffe is a CPU-only build. Rebuild with "
                                "`make setup CUDA=1` (tools/build_caffe.sh --cuda), "
                                "or drop --gpu to run on the CPU.")
    runtime = ctypes.CDLL(cudart)
    runtime_number, driver_number, count = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    runtime.cudaRuntimeGetVersion(ctypes.byref(runtime_number))
    runtime.cudaDriverGetVersion(ctypes.byref(driver_number))
    count_error = None
    if 0 < driver_number.value:
        code = runtime.cudaGetDeviceCount(ctypes.byref(count))
        if code != 0:
            runtime.cudaGetErrorString.restype = ctypes.c_char_p
            words = runtime.cudaGetErrorString(code).decode(errors="replace")
            count_error = f"{words} (error {code})"
    return describe_cuda(runtime_number.value, driver_number.value, count.value, count_error,
                         device)


def describe_cuda(runtime_number, driver_number, device_count, count_error, device):
    """The :class:`GpuStatus` for what the CUDA runtime reported.

    runtime_number, driver_number: as cudaRuntimeGetVersion / cudaDriverGetVersion
    give them (1000 * major + 10 * minor; the driver's is 0 without a driver);
    count_error: cudaGetDeviceCount's error in words, or None.
    """
    runtime_version = _cuda_version(runtime_number)
    driver_version = _cuda_version(driver_number)
    needs = _MIN_DRIVER.get(runtime_number // 1000)
    needs_text = f" (needs an NVIDIA driver >= {needs})" if needs else ""
    if driver_number == 0:
        return GpuStatus(False, f"no NVIDIA driver is present on this machine: this Caffe "
                                f"was built with CUDA {runtime_version}{needs_text}. Drop --gpu "
                                "to run on the CPU.", runtime_version)
    if driver_number < runtime_number:
        return GpuStatus(False, f"the NVIDIA driver supports CUDA up to {driver_version}, "
                                f"older than the CUDA {runtime_version} this Caffe was built "
                                f"with{needs_text}: update the driver, or rebuild Caffe with "
                                f"CUDA {driver_version}.", runtime_version, driver_version)
    if count_error is not None:
        return GpuStatus(False, f"no usable GPU: the CUDA runtime says '{count_error}'.",
                         runtime_version, driver_version)
    if not 0 <= device < device_count:
        return GpuStatus(False, f"only {device_count} GPU(s) are visible (devices "
                                f"0..{device_count - 1}).", runtime_version, driver_version,
                         device_count)
    return GpuStatus(True, f"GPU {device} of {device_count}, CUDA runtime {runtime_version}, "
                           f"driver {driver_version}", runtime_version, driver_version,
                     device_count)


def caffe_has_cuda():
    """True when the imported Caffe library is linked against the CUDA runtime.

    Reads the shared objects mapped into this process, so it answers for the
    Caffe actually loaded, whoever built it. Call after importing caffe.
    """
    return _mapped_library("libcudart") is not None


def _mapped_library(prefix):
    """Path of the first shared object named ``prefix*`` mapped into this process."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if os.path.basename(path).startswith(prefix):
                    return path
    except OSError:
        pass
    return None
