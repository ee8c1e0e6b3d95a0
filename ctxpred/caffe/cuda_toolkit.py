"""The pinned CUDA 13.0 toolkit, installed from PyPI's NVIDIA wheels as one toolkit root.

NVIDIA publishes nvcc, the CUDA runtime, cuBLAS, cuRAND and the C++ core
libraries as PyPI wheels that unpack into one tree ``nvidia/cu13/{bin,include,
lib,nvvm}``. :func:`install_toolkit` downloads the versions pinned in
``tools/cuda_wheels.txt``, checks each file's sha256, unpacks them and adds
what CMake's FindCUDA expects of a toolkit root (unversioned library links, a
``lib64`` beside ``lib``, run bits on the executables). The tree is assembled
in a temporary folder and moved into place only when complete, so an
interrupted or failed install leaves nothing behind. No root needed; only the
standard library (tools/build_caffe.sh runs it before Caffe exists).
"""
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PINS = Path(__file__).resolve().parents[2] / "tools" / "cuda_wheels.txt"
# Libraries that CMake's FindCUDA looks up by their unversioned names.
UNVERSIONED = ("libcudart.so", "libcublas.so", "libcublasLt.so", "libcurand.so", "libnvvm.so")


class ToolkitError(RuntimeError):
    """A download, checksum or unpacking step failed; the message says which."""


def read_pins(path=PINS):
    """[(requirement, sha256, filename)] from the pin file (blank lines and # comments skipped)."""
    pins = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 3 or "==" not in fields[0] or len(fields[1]) != 64:
            raise ToolkitError(f"{path}:{number}: expected 'name==version sha256 filename'")
        pins.append(tuple(fields))
    return pins


def toolkit_key(pins):
    """Short hash of the pins: the install folder's name changes with any pin."""
    return hashlib.sha256("\n".join(" ".join(p) for p in pins).encode()).hexdigest()[:12]


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(requirement, sha256, filename, wheel_dir, python):
    """Download one pinned wheel into ``wheel_dir`` (kept there) and verify it."""
    target = Path(wheel_dir) / filename
    if target.exists() and sha256_of(target) == sha256:
        return target
    target.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=wheel_dir) as download_dir:
        # The pinned file's platform tag names what pip must accept.
        platforms = [tag for tag in filename[:-4].split("-")[-1].split(".")]
        command = [python, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                   "--python-version", "3", "--implementation", "py", "-d", download_dir,
                   requirement] + [arg for tag in platforms for arg in ("--platform", tag)]
        done = subprocess.run(command, capture_output=True, text=True)
        got = Path(download_dir) / filename
        if done.returncode != 0 or not got.exists():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ToolkitError(f"could not download {requirement} ({filename}) from PyPI: {last}")
        actual = sha256_of(got)
        if actual != sha256:
            raise ToolkitError(f"checksum mismatch for {filename}: expected {sha256}, got {actual}")
        os.replace(got, target)
    return target


def unpack(wheel, destination):
    """Unzip a wheel, keeping the executables' run bits that zip stores in external_attr."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.infolist():
                path = archive.extract(member, destination)
                mode = member.external_attr >> 16
                if mode & 0o111:
                    executable = stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH
                    os.chmod(path, os.stat(path).st_mode | executable)
    except (zipfile.BadZipFile, OSError) as error:
        raise ToolkitError(f"cannot unpack {wheel}: {error}") from error


def complete_toolkit_root(root):
    """Add what FindCUDA and nvcc need: run bits, lib64, unversioned library links."""
    for folder in (root / "bin", root / "nvvm" / "bin"):
        for path in folder.glob("*") if folder.is_dir() else ():
            if path.is_file():
                path.chmod(path.stat().st_mode | 0o755)
    lib = root / "lib"
    if not (root / "lib64").exists():
        (root / "lib64").symlink_to("lib")
    for name in UNVERSIONED:
        versioned = (sorted(lib.glob(name + ".*"))
                     or sorted((root / "nvvm" / "lib64").glob(name + ".*")))
        link = lib / name
        if versioned and not link.exists():
            link.symlink_to(os.path.relpath(versioned[0], lib))
    missing = [p for p in ("bin/nvcc", "include/cuda_runtime.h", "include/cublas_v2.h",
                           "include/curand.h", "lib/libcudart.so", "lib/libcublas.so",
                           "lib/libcurand.so") if not (root / p).exists()]
    if missing:
        raise ToolkitError(f"the CUDA wheels did not give {', '.join(missing)} under {root}")


def install_toolkit(cache, python=sys.executable, pins_path=PINS, log=print):
    """Install (or find) the pinned toolkit under ``cache``; returns its root folder."""
    pins = read_pins(pins_path)
    version = next(r for r, _, _ in pins if r.startswith("nvidia-cuda-nvcc==")).split("==")[1]
    final = Path(cache) / f"cuda-{version}-{toolkit_key(pins)}"
    root = final / "nvidia" / "cu13"
    if (final / ".complete").exists() and os.access(root / "bin" / "nvcc", os.X_OK):
        return root
    wheel_dir = Path(cache) / "src" / "cuda-wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(final, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="cuda-", dir=cache))
    try:
        for requirement, sha256, filename in pins:
            log(f"[cuda_toolkit] {requirement}")
            unpack(fetch_wheel(requirement, sha256, filename, wheel_dir, python), work)
        complete_toolkit_root(work / "nvidia" / "cu13")
        (work / ".complete").write_text(" ".join(r for r, _, _ in pins) + "\n")
        os.replace(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return root
