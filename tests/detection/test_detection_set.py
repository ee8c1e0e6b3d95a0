"""data/make_detection_set.py end to end, on a few images.

Uses the real sources: the photo collection in data/photos (made by `make
setup`) and Debian's tuxpaint-stamps-default, downloaded once into the
default cache (~/.cache/ctxpred/debs, shared with normal runs).
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ctxpred.detection.proposals import load_proposals
from ctxpred.detection.voc import read_dataset
from ctxpred.detection.boxes import box_iou

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "data" / "make_detection_set.py"
SMALL = ["--trainval", "4", "--test", "2"]


def build(out, *extra):
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *SMALL, *extra],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def detection_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("set") / "detection"
    build(out)
    return out


def test_the_set_is_voc_format_with_covering_proposals(detection_set):
    classes = (detection_set / "classes.txt").read_text().split()
    assert classes == ["mammal", "bird", "fish", "insect", "fruit", "vegetable", "flower"]
    manifest = json.loads((detection_set / "manifest.json").read_text())
    assert manifest["counts"] == {"trainval": 4, "test": 2}
    splits = {split: read_dataset(detection_set, split, classes) for split in ("trainval", "test")}
    ids = [image_id for items in splits.values() for image_id, _ in items]
    proposals = load_proposals(detection_set / "proposals.npz", ids)
    for items in splits.values():
        for image_id, annotation in items:
            assert 1 <= len(annotation.objects) <= 3
            assert max(annotation.width, annotation.height) == 400
            gt = np.array([obj.box for obj in annotation.objects])
            assert len(proposals[image_id]) > 50
            assert box_iou(gt, proposals[image_id]).max(axis=1).min() >= 0.5


def test_a_current_set_is_left_alone_and_a_changed_recipe_rebuilds(detection_set):
    stamp = (detection_set / "proposals.npz").stat().st_mtime_ns
    started = time.monotonic()
    result = build(detection_set)
    assert "up to date" in result.stderr and time.monotonic() - started < 30
    assert (detection_set / "proposals.npz").stat().st_mtime_ns == stamp
    build(detection_set, "--seed", "1")
    assert (detection_set / "proposals.npz").stat().st_mtime_ns != stamp
    assert not list(detection_set.parent.glob(".detection.*")), "staging folders must be removed"


def test_a_foreign_folder_is_not_replaced(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), *SMALL],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "not empty and has no manifest.json" in result.stderr
    assert (tmp_path / "mine.txt").read_text() == "keep me"
