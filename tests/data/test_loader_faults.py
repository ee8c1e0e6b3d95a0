"""Faulty image sources: a stalled loader worker, bad images reported once per run,
ignored extensions counted, and a source without a usable image in every tool.

Real files and real processes: a named pipe stands for a hung file system
(opening it blocks until someone writes), corrupt JPEGs are random bytes.
"""
import os
import re
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from ctxpred.data.batching import PatchPairConfig, SkippedImageWarning
from ctxpred.data.images import IgnoredFilesWarning, open_source
from ctxpred.data.prefetch import BatchPrefetcher

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"
SMALL = ["--max-patches", "40", "--workers", "1"]


def corrupt_folder(folder, photo_folder=None, bad=3):
    """``bad`` corrupt .jpg files, a .gif and a .txt, plus the photos when given."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(bad):
        (folder / f"bad{index}.jpg").write_bytes(rng.integers(0, 256, 4000, np.uint8).tobytes())
    (folder / "animation.gif").write_bytes(b"GIF89a")
    (folder / "notes.txt").write_text("not an image\n")
    for photo in Path(photo_folder).glob("*.jpg") if photo_folder else ():
        (folder / photo.name).write_bytes(photo.read_bytes())
    return folder


STALL = textwrap.dedent("""
    import sys, time
    from ctxpred.data.batching import PatchPairConfig
    from ctxpred.data.images import open_source
    from ctxpred.data.prefetch import BatchPrefetcher
    loader = BatchPrefetcher(open_source(sys.argv[1]), PatchPairConfig(max_patches=40),
                             workers=1, stall_seconds=2)
    started = time.monotonic()
    try:
        for _ in range(20):
            loader.next()
    except RuntimeError as error:
        print(f"{time.monotonic() - started:.1f} {error}")
""")


def test_a_stalled_worker_raises_within_the_timeout(tmp_path, photo_folder):
    folder = tmp_path / "images"
    folder.mkdir()
    for photo in Path(photo_folder).glob("*.jpg"):
        (folder / photo.name).write_bytes(photo.read_bytes())
    os.mkfifo(folder / "stuck.jpg")  # open() blocks forever: a hung network file system
    result = subprocess.run([sys.executable, "-c", STALL, str(folder)], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    seconds, message = result.stdout.strip().split(" ", 1)
    assert "data loader worker 0 delivered no batch in 2 s: it stalled" in message
    assert float(seconds) < 30
    # train.py: one line, exit 1 (failed while running), well within its --loader-timeout.
    started = time.monotonic()
    train = subprocess.run([sys.executable, str(TOOLS / "train.py"), "--images", str(folder),
                            "--out", str(tmp_path / "run"), "--iters", "5", "--loader-timeout",
                            "3", *SMALL], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert train.returncode == 1, train.stderr[-2000:]
    assert "delivered no batch in 3 s: it stalled" in train.stderr
    assert "Traceback" not in train.stderr and time.monotonic() - started < 120
    assert "stalled" in (tmp_path / "run" / "events.log").read_text()


def test_each_bad_image_is_reported_once_per_run_with_its_reason(tmp_path, photo_folder):
    folder = corrupt_folder(tmp_path / "images", photo_folder)
    with pytest.warns(IgnoredFilesWarning, match=r"ignored 2 files: \.gif \(1\), \.txt \(1\)"):
        source = open_source(str(folder))
    assert "ignored 2 files" in source.description
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with BatchPrefetcher(source, PatchPairConfig(max_patches=40), workers=3) as loader:
            for _ in range(12):  # every worker passes over every image
                loader.next()
    messages = [str(w.message) for w in caught if issubclass(w.category, SkippedImageWarning)]
    for index in range(3):
        name = str(folder / f"bad{index}.jpg")
        assert sum(name in message for message in messages) == 1, messages
        assert loader.skipped[name] == "not an image in a format Pillow reads"
    assert loader.images_skipped == 3 and len(messages) == 3
    assert not any(re.search(r"0x[0-9a-f]{6,}", message) for message in messages)


def test_the_skipped_count_is_printed_at_the_stop_and_written_to_events_log(tmp_path,
                                                                          photo_folder):
    folder = corrupt_folder(tmp_path / "images", photo_folder, bad=2)
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, str(TOOLS / "train.py"), "--images", str(folder),
                             "--out", str(out), "--iters", "8", *SMALL],  # > one pass
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 images skipped (unreadable or too small)" in result.stdout
    assert "2 images skipped" in (out / "events.log").read_text()
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert sorted(warned) == sorted(
        [f"warning: skipping image {folder / f'bad{index}.jpg'}: not an image in a format "
         "Pillow reads" for index in range(2)]
        + [f"warning: image source '{folder}': ignored 2 files: .gif (1), .txt (1)"])


def test_a_source_without_a_usable_image_gives_one_line_in_every_tool(caffe, tmp_path):
    folder = corrupt_folder(tmp_path / "images")
    net = caffe.Net(str(REPO / "prototxt" / "color_dropping" / "deploy.prototxt"), caffe.TEST)
    weights = tmp_path / "deploy.caffemodel"
    net.save(str(weights))
    commands = [
        ("train.py", "--images", folder, "--out", tmp_path / "run", "--iters", "2", *SMALL),
        ("extract_features.py", "--weights", weights, "--images", folder,
         "--out", tmp_path / "f.h5"),
        ("mine.py", "--weights", weights, "--images", folder, "--out", tmp_path / "mine"),
        ("nearest_neighbors.py", "--weights", weights, "--images", folder,
         "--out", tmp_path / "nn"),
        ("max_activations.py", "--weights", weights, "--images", folder, "--patches", "4",
         "--layers", "fc6", "--out", tmp_path / "max"),
        ("neighbour_proxy.py", "--weights", weights, "--images", folder),
        ("magic_init.py", "-d", f"{folder}/*", REPO / "prototxt" / "groupless_caffenet.prototxt",
         tmp_path / "magic.caffemodel"),
    ]
    processes = [subprocess.Popen([sys.executable, str(TOOLS / name), *map(str, args)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=REPO) for name, *args in commands]
    for (name, *_), process in zip(commands, processes):
        _, stderr = process.communicate(timeout=300)
        lines = re.split(r"[\r\n]", stderr)
        errors = [line for line in lines if "error:" in line]
        assert process.returncode == 2, (name, stderr[-2000:])
        assert len(errors) == 1 and str(folder) in errors[0], (name, errors)
        assert "Traceback" not in stderr, name
        assert ("no usable image" in errors[0] or "could be decoded" in errors[0]
                or "0 usable image" in errors[0]), (name, errors)
