"""Tests of data/make_collection.py, the default photo collection builder.

One collection is built into a temporary folder for the whole module; the
downloaded .deb files are shared with normal runs through the default cache
(~/.cache/ctxpred/debs), so only the first run on a machine downloads them.
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from ctxpred.data import collection as mc

SCRIPT = Path(__file__).resolve().parents[2] / "data" / "make_collection.py"
TRAINING_MIN_PIXELS = 150_000
MIN_SIDE = 300


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """A freshly built collection: (output folder, manifest)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("the Debian photo packages need apt-get and dpkg-deb")
    out = tmp_path_factory.mktemp("collection") / "photos"
    manifest, rebuilt = mc.make_collection(out)
    assert rebuilt
    return out, manifest


def test_split_is_by_source_photo(collection):
    _, manifest = collection
    sides = {split: [e for e in manifest["files"] if e["split"] == split] for split in mc.SPLITS}
    assert len(sides["train"]) > 0 and len(sides["heldout"]) > 0
    assert manifest["counts"] == {split: len(entries) for split, entries in sides.items()}
    for key in ("source_photo", "group"):
        train = {e[key] for e in sides["train"]}
        heldout = {e[key] for e in sides["heldout"]}
        assert not train & heldout, f"{key} on both sides: {train & heldout}"
    heldout_photos = {e["source_photo"] for e in sides["heldout"]}
    assert len(heldout_photos) >= 3
    assert len({e["package"] for e in sides["heldout"]}) > 1
    for entry in manifest["files"]:
        assert entry["path"].startswith(entry["split"] + "/")
        assert entry["licence"] and entry["copyright"] and entry["package_version"]


def test_images_are_large_rgb_photos(collection):
    out, manifest = collection
    for entry in manifest["files"]:
        with Image.open(out / entry["path"]) as image:
            assert image.format == "JPEG"
            image.load()
            assert image.mode == "RGB"
            width, height = image.size
        assert (width, height) == (entry["width"], entry["height"])
        assert min(width, height) > MIN_SIDE
        assert width * height >= TRAINING_MIN_PIXELS
        # still larger than 300x300 after the training resize to 150k pixels
        shrink = (TRAINING_MIN_PIXELS / (width * height)) ** 0.5
        assert min(width, height) * min(shrink, 1) > MIN_SIDE


def test_manifest_lists_exactly_the_files(collection):
    out, manifest = collection
    on_disk = {str(p.relative_to(out)): p.stat().st_size
               for split in mc.SPLITS for p in (out / split).iterdir()}
    assert on_disk == {e["path"]: e["bytes"] for e in manifest["files"]}
    assert json.loads((out / mc.MANIFEST_NAME).read_text()) == manifest


def test_second_run_is_a_fast_no_op(collection):
    out, manifest = collection
    stamp = (out / mc.MANIFEST_NAME).stat().st_mtime_ns
    started = time.monotonic()
    again, rebuilt = mc.make_collection(out)
    elapsed = time.monotonic() - started
    assert not rebuilt
    assert again == manifest
    assert (out / mc.MANIFEST_NAME).stat().st_mtime_ns == stamp
    assert elapsed < 0.5


def test_failed_build_leaves_collection_untouched(collection, tmp_path):
    out, manifest = collection
    bad_sources = tmp_path / "sources.json"
    bad_sources.write_text(json.dumps({"heldout": [], "photos": [{
        "id": "nowhere/photo", "package": "no-such-package-ctxpred",
        "file": "photo.jpg", "copyright": "-", "licence": "-"}]}))
    with pytest.raises(mc.CollectionError):
        mc.make_collection(out, bad_sources, cache_dir=tmp_path / "debs")
    assert mc.read_manifest(out) == manifest
    assert not list(out.parent.glob(f".{out.name}.*"))


def test_unknown_package_names_package_and_command(tmp_path):
    with pytest.raises(mc.CollectionError) as raised:
        mc.fetch_package("no-such-package-ctxpred", tmp_path)
    message = str(raised.value)
    assert "no-such-package-ctxpred" in message
    assert "apt-get download no-such-package-ctxpred" in message


@pytest.mark.parametrize("size", [(2560, 1600), (1280, 1024), (6028, 3391), (2056, 3088)])
def test_tiles_do_not_overlap_and_keep_their_shape(size):
    width, height = size
    boxes = mc.plan_tiles(width, height)
    assert len(boxes) > 1
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        tile_width, tile_height = right - left, bottom - top
        assert mc.MIN_TILE_PIXELS <= tile_width * tile_height <= mc.MAX_TILE_PIXELS
        assert max(tile_width, tile_height) <= mc.MAX_ASPECT * min(tile_width, tile_height)
    for index, (left, top, right, bottom) in enumerate(boxes):
        for other_left, other_top, other_right, other_bottom in boxes[index + 1:]:
            overlap_x = min(right, other_right) > max(left, other_left)
            overlap_y = min(bottom, other_bottom) > max(top, other_top)
            assert not (overlap_x and overlap_y)


def test_small_photo_is_kept_whole():
    assert mc.plan_tiles(600, 400) == [(0, 0, 600, 400)]


def test_command_line_help():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"],
                            capture_output=True, text=True, check=True)
    assert "--out" in result.stdout and "apt-get download" in result.stdout
