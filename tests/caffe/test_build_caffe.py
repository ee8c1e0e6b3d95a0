"""tools/build_caffe.sh: the cached build is found, checked and repaired."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ctxpred.caffe.cuda_toolkit import ToolkitError, complete_toolkit_root


REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "build_caffe.sh"


def run_script(*args, env=None, user=None):
    command = [str(SCRIPT), *args]
    if user is not None:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)


def linked_flavour(caffe):
    """build_caffe.sh options that select the install this venv imports (CPU or CUDA)."""
    info = json.loads((Path(caffe.__file__).resolve().parents[2] / "build_info.json").read_text())
    return ["--cuda", "--cuda-arch", info["cuda_arch"]] if info["cuda"] else []


def test_warm_run_is_fast_and_names_the_imported_caffe(caffe):
    started = time.monotonic()
    result = run_script("--python", sys.executable, *linked_flavour(caffe))
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    prefix = Path(result.stdout.strip().splitlines()[-1])
    assert Path(caffe.__file__).resolve().is_relative_to(prefix.resolve())
    assert (prefix / ".complete").exists() and (prefix / "bin" / "caffe").exists()
    assert elapsed < 30


def test_help_explains_the_options():
    result = run_script("--help")
    assert result.returncode == 0
    for option in ("--python", "--cuda", "--cuda-toolkit", "--cuda-arch", "--jobs", "--cache",
                   "--print-prefix"):
        assert option in result.stdout


def test_cuda_toolkit_folder_that_is_no_toolkit_fails_clearly(tmp_path):
    result = run_script("--cuda", "--cuda-toolkit", str(tmp_path), "--python", sys.executable,
                        "--cache", str(tmp_path / "cache"))
    assert result.returncode != 0
    assert "not a CUDA toolkit root" in result.stderr and str(tmp_path) in result.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_cuda_with_unreachable_registry_fails_in_one_line_leaving_nothing(tmp_path):
    """No nvcc on PATH: the pinned wheels are fetched; an unreachable index is one error line."""
    env = dict(os.environ, PATH="/usr/bin:/bin", PIP_CONFIG_FILE="/dev/null",
               PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_NO_CACHE_DIR="1", PIP_RETRIES="0",
               PIP_TIMEOUT="2")
    cache = tmp_path / "cache"
    result = run_script("--cuda", "--python", sys.executable, "--cache", str(cache), env=env)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors and "could not download nvidia-cuda-nvcc" in errors[0]
    assert not list(cache.glob("cuda-*")) and not list(cache.glob("build-*"))


def run_toolkit(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "cuda_toolkit.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_cuda_wheel_checksum_mismatch_is_refused_and_not_kept(tmp_path):
    pins = REPO / "tools" / "cuda_wheels.txt"
    crt = next(line for line in pins.read_text().splitlines() if line.startswith("nvidia-cuda-crt"))
    requirement, _, filename = crt.split()
    # The small crt wheel, pinned with a wrong sha256 (the nvcc pin only names the version).
    (tmp_path / "pins.txt").write_text(f"{requirement} {'0' * 64} {filename}\n"
                                       f"nvidia-cuda-nvcc==13.0.88 {'1' * 64} unused.whl\n")
    result = run_toolkit("--cache", str(tmp_path / "cache"), "--pins", str(tmp_path / "pins.txt"))
    assert result.returncode == 1
    assert f"checksum mismatch for {filename}" in result.stderr
    assert len([line for line in result.stderr.splitlines() if "error" in line]) == 1
    cache = tmp_path / "cache"
    assert not list(cache.glob("cuda-*")) and not list(cache.rglob("*.whl"))


def test_corrupt_cuda_wheel_leaves_no_half_install(tmp_path):
    wheel_dir = tmp_path / "cache" / "src" / "cuda-wheels"
    wheel_dir.mkdir(parents=True)
    corrupt = wheel_dir / "nvidia_cuda_nvcc-13.0.88-py3-none-any.whl"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    digest = __import__("hashlib").sha256(corrupt.read_bytes()).hexdigest()
    (tmp_path / "pins.txt").write_text(f"nvidia-cuda-nvcc==13.0.88 {digest} {corrupt.name}\n")
    result = run_toolkit("--cache", str(tmp_path / "cache"), "--pins", str(tmp_path / "pins.txt"))
    assert result.returncode == 1
    assert "cannot unpack" in result.stderr and corrupt.name in result.stderr
    assert not list((tmp_path / "cache").glob("cuda-*"))


def test_toolkit_root_gets_what_cmake_needs(tmp_path):
    """Unversioned links, lib64 and run bits on a tree shaped like the wheels' nvidia/cu13."""
    root = tmp_path / "cu13"
    for name in ("bin/nvcc", "include/cuda_runtime.h", "include/cublas_v2.h", "include/curand.h",
                 "lib/libcudart.so.13", "lib/libcublas.so.13", "lib/libcublasLt.so.13",
                 "lib/libcurand.so.10"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    complete_toolkit_root(root)
    assert os.access(root / "bin" / "nvcc", os.X_OK)
    assert (root / "lib64").resolve() == (root / "lib").resolve()
    for name, target in (("libcudart.so", "libcudart.so.13"), ("libcurand.so", "libcurand.so.10")):
        assert os.readlink(root / "lib" / name) == target
    (root / "lib" / "libcurand.so").unlink()
    (root / "lib" / "libcurand.so.10").unlink()
    try:
        complete_toolkit_root(root)
    except ToolkitError as error:
        assert "lib/libcurand.so" in str(error)
    else:
        raise AssertionError("a tree without cuRAND was accepted")


def test_missing_packages_without_root_print_apt_line():
    # A dpkg-query that reports every package as absent, run by an unprivileged
    # user (pytest's tmp_path is private to root, so use a world-readable folder).
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        scratch.chmod(0o755)
        fake_dpkg_query = scratch / "dpkg-query"
        fake_dpkg_query.write_text("#!/bin/sh\nexit 1\n")
        fake_dpkg_query.chmod(0o755)
        env = dict(os.environ, PATH=f"{scratch}:/usr/bin:/bin", HOME=str(scratch))
        result = run_script("--python", "/usr/bin/python3", "--cache", str(scratch / "cache"),
                            env=env, user=65534)
    assert result.returncode == 2, result.stderr
    assert "sudo apt-get install" in result.stderr and "libboost-python-dev" in result.stderr


def test_corrupt_cached_build_is_rebuilt(caffe, tmp_path):
    """An install missing its Python extension is detected and rebuilt (ccache keeps it short).

    Done on the CPU build whatever this venv links (a CUDA rebuild takes half
    an hour); the venv is linked back to its own build afterwards.
    """
    flavour = linked_flavour(caffe)
    installed = Path(run_script("--python", sys.executable).stdout.strip().splitlines()[-1])
    cache = tmp_path / "cache"
    shutil.copytree(installed.parent / "src", cache / "src")
    prefix = Path(run_script("--python", sys.executable, "--cache", str(cache),
                             "--print-prefix").stdout.strip())
    assert prefix.parent == cache
    shutil.copytree(installed, prefix, symlinks=True)
    (prefix / "python" / "caffe" / "_caffe.so").unlink()

    try:
        result = run_script("--python", sys.executable, "--cache", str(cache))
    finally:
        run_script("--python", sys.executable, *flavour)  # link this venv back
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rebuilding" in result.stderr
    assert (prefix / "python" / "caffe" / "_caffe.so").exists()
    check = subprocess.run([sys.executable, "-c", "import caffe; print(caffe.__file__)"],
                           env=dict(os.environ, PYTHONPATH=str(prefix / "python")),
                           capture_output=True, text=True)
    assert check.returncode == 0 and str(prefix) in check.stdout
    assert not list(cache.glob("build-*")), "temporary build folders must be removed"
