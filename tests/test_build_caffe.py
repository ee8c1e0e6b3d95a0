"""tools/build_caffe.sh: the cached build is found, checked and repaired."""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "build_caffe.sh"


def run_script(*args, env=None, user=None):
    command = [str(SCRIPT), *args]
    if user is not None:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)


def test_warm_run_is_fast_and_names_the_imported_caffe(caffe):
    started = time.monotonic()
    result = run_script("--python", sys.executable)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    prefix = Path(result.stdout.strip().splitlines()[-1])
    assert Path(caffe.__file__).resolve().is_relative_to(prefix.resolve())
    assert (prefix / ".complete").exists() and (prefix / "bin" / "caffe").exists()
    assert elapsed < 30


def test_help_explains_the_options():
    result = run_script("--help")
    assert result.returncode == 0
    for option in ("--python", "--cuda", "--cuda-arch", "--jobs", "--cache", "--print-prefix"):
        assert option in result.stdout


def test_cuda_without_toolkit_fails_clearly(tmp_path):
    env = dict(os.environ, PATH="/usr/bin:/bin")
    result = run_script("--cuda", "--python", "/usr/bin/python3", "--cache", str(tmp_path), env=env)
    assert result.returncode != 0
    assert "CUDA" in result.stderr and "nvcc" in result.stderr


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
    """An install missing its Python extension is detected and rebuilt (ccache keeps it short)."""
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
        run_script("--python", sys.executable)  # link this venv back to the default cache
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rebuilding" in result.stderr
    assert (prefix / "python" / "caffe" / "_caffe.so").exists()
    check = subprocess.run([sys.executable, "-c", "import caffe; print(caffe.__file__)"],
                           env=dict(os.environ, PYTHONPATH=str(prefix / "python")),
                           capture_output=True, text=True)
    assert check.returncode == 0 and str(prefix) in check.stdout
    assert not list(cache.glob("build-*")), "temporary build folders must be removed"
