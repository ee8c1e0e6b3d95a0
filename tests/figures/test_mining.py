"""Visual data mining: constellations, matching, verification, ranking, purity-coverage, the run."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from ctxpred.figures.mining import (Candidates, constellation_anchors, curve_auc, purity_coverage,
                            rank_clusters, top_images, union_boxes, verify)
from ctxpred.figures.mining_run import MiningSettings, mine
from ctxpred.detection.voc import Annotation, VocObject, write_annotation

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "mine.py"
DEPLOY = str(REPO / "prototxt" / "color_dropping" / "deploy.prototxt")
HELDOUT = REPO / "data" / "photos" / "heldout"
SIDE = 336  # planted images are SIDE x SIDE
OBJECT = 240  # the planted object is OBJECT x OBJECT: it holds a 192-pixel constellation


def test_constellation_anchors_list_every_2x2_block_of_one_image():
    # Image 0: a 3 x 3 grid of step 48; image 1: a 1 x 3 grid (no block of spacing 48).
    ys, xs = np.meshgrid([0, 48, 96], [0, 48, 96], indexing="ij")
    corners = np.concatenate([np.stack([ys.ravel(), xs.ravel()], 1), [[0, 0], [0, 48], [0, 96]]])
    image_ids = np.array([0] * 9 + [1] * 3)
    anchors = constellation_anchors(image_ids, corners, 48)
    assert anchors.tolist() == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    assert constellation_anchors(image_ids, corners, 96).tolist() == [[0, 2, 6, 8]]
    assert union_boxes(corners[anchors[-1]]).tolist() == [48, 48, 192, 192]


def test_top_images_sum_the_best_match_of_each_patch_and_need_all_four():
    image_ids = np.array([1, 1, 2, 2, 3])  # rows 0..4
    # One constellation; per patch, neighbours best first. Image 3 lacks a match for patch 3.
    indices = np.array([[[0, 2, 4, 1], [1, 3, 0, -1], [3, 2, 4, 0], [2, 0, 1, -1]]])
    similarities = np.array([[[.9, .8, .7, .1], [.6, .5, .4, -np.inf], [.9, .8, .3, .2],
                              [.7, .6, .5, -np.inf]]], np.float32)
    found = top_images(indices, similarities, image_ids, top=3)
    assert found.images.tolist() == [[2, 1, -1]]
    assert found.rows[0, :2].tolist() == [[2, 3, 3, 2], [0, 1, 0, 0]]
    np.testing.assert_allclose(found.scores[0, :2], [.8 + .5 + .9 + .7, .9 + .6 + .2 + .6],
                               rtol=1e-6)
    assert np.isneginf(found.scores[0, 2]) and found.rows[0, 2].tolist() == [-1] * 4
    assert top_images(indices, similarities, image_ids, top=1).images.tolist() == [[2]]


def test_verification_accepts_a_shifted_layout_and_rejects_others():
    square = np.array([[0, 0], [0, 96], [96, 0], [96, 96]])
    layouts = np.stack([
        square + [200, 50],  # same layout elsewhere: verifies
        square + [200, 50] + [[0, 0], [24, -24], [0, 0], [-24, 24]],  # within 48 pixels
        square + [[0, 0], [0, 60], [0, 0], [0, 0]],  # one match 60 pixels off
        square[[1, 0, 2, 3]],  # two matches swapped
        np.zeros((4, 2), int),  # all four matched to one patch
        square * 2,  # twice the scale
    ])[None]
    assert verify(square[None], layouts, tolerance=48).tolist() == [
        [True, True, False, False, False, False]]
    assert verify(square[None], layouts[:, 2:3], tolerance=60).tolist() == [[True]]


def candidates_of(images, scores):
    images, scores = np.asarray(images), np.asarray(scores, np.float32)
    rows = np.zeros(images.shape + (4,), np.int64)
    return Candidates(images, rows, np.zeros(rows.shape, np.float32), scores)


def test_ranking_counts_verified_images_and_drops_near_duplicates():
    image_ids = np.arange(8)  # row r lies in image r
    constellations = np.array([[0] * 4, [1] * 4, [2] * 4, [3] * 4])
    candidates = candidates_of([[4, 5, 6], [4, 5, 7], [0, 1, 6], [5, 6, 7]],
                               [[3, 2, 1], [3, 2, 1], [3, 2, 1], [1, 1, 1]])
    verified = np.array([[1, 1, 0], [1, 1, 1], [0, 0, 1], [1, 1, 0]], bool)
    clusters = rank_clusters(verified, candidates, constellations, image_ids, max_shared=0.5)
    # 1 verifies 3 images; 0 and 3 verify 2, 0 with the higher scores; 0 ({0,4,5}) shares
    # 2 of 3 images with 1 ({1,4,5,7}): dropped; 3 ({3,5,6}) shares 1 of 3: kept; 2 ({2,6}).
    assert [cluster.constellation for cluster in clusters] == [1, 3, 2]
    assert clusters[0].images.tolist() == [4, 5, 7] and clusters[0].source == 1
    assert [cluster.constellation for cluster in rank_clusters(
        verified, candidates, constellations, image_ids, max_shared=1.0)] == [1, 0, 3, 2]
    assert len(rank_clusters(verified, candidates, constellations, image_ids,
                             min_verified=3)) == 1


def test_auc_of_a_hand_curve():
    # Held at 1 from 0 to 0.2, then 1 -> 0.5 linearly up to 0.6: 0.2 + 0.4 * 0.75 = 0.5.
    assert curve_auc([0.2, 0.6], [1.0, 0.5]) == pytest.approx(0.5)
    assert curve_auc([], []) == 0
    with pytest.raises(ValueError, match="non-decreasing"):
        curve_auc([0.5, 0.2], [1, 1])


def test_purity_coverage_of_hand_clusters():
    annotations = {
        "a": Annotation("a.jpg", 100, 100, (VocObject("cat", (1, 1, 50, 50)),
                                            VocObject("dog", (51, 51, 100, 100)))),
        "b": Annotation("b.jpg", 100, 100, (VocObject("cat", (1, 1, 100, 50)),)),
    }
    clusters = [
        (["a", "b", "c"], [[1, 1, 50, 50], [1, 1, 50, 50], [1, 1, 9, 9]]),  # 2 cats, 1 unlabelled
        (["a"], [[51, 51, 100, 100]]),  # the dog
    ]
    curve = purity_coverage(clusters, annotations, top_n=10, rule="iou")
    np.testing.assert_allclose(curve.purity, [2 / 3, 1])
    assert curve.majority == ("cat", "dog")
    # Object pixels: 2500 + 2500 in a, 5000 in b. Cats covered: 2500 in a and (IoU 0.5) 2500 in b.
    np.testing.assert_allclose(curve.coverage, [0.5, 0.75])
    np.testing.assert_allclose(curve.purity_curve, [2 / 3, 5 / 6])
    assert curve.auc == pytest.approx(0.5 * 2 / 3 + 0.25 * (2 / 3 + 5 / 6) / 2)
    centre = purity_coverage([(["b"], [[40, 1, 100, 100]])], annotations, rule="centre")
    assert centre.purity.tolist() == [0.0]  # centre (70, 50.5) lies below the cat of b
    assert purity_coverage(clusters, annotations, top_n=2).purity[0] == 1.0


# ---------------------------------------------------------------------------
# The run on a planted object


def mine_planted(images, weights, out, **options):
    """mine() of the colour-dropping net, 5 clusters of 6 matches shown."""
    return mine(MiningSettings(images=str(images), weights=str(weights), deploy=DEPLOY,
                               out=str(out), clusters=5, shown=6, **options))


@pytest.fixture(scope="module")
def random_weights(caffe, tmp_path_factory):
    """The colour-dropping deploy net as Caffe initialises it from the prototxt's fillers
    (xavier weights, zero biases): no training, so mining rests on exact repeats alone."""
    caffe.set_random_seed(0)
    net = caffe.Net(DEPLOY, caffe.TEST)
    path = tmp_path_factory.mktemp("weights") / "random.caffemodel"
    net.save(str(path))
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(images folder, annotations folder): one object pasted into ~23 different photos.

    Backgrounds are disjoint SIDE x SIDE tiles of one photo per held-out source
    and of skimage photos (no two share pixels); the object, a crop of
    skimage's astronaut, lands at a random position, not aligned to the grid.
    Each image has a VOC XML file with the planted box, class "planted".
    """
    if not HELDOUT.is_dir():
        pytest.fail(f"{HELDOUT} is missing: run `make setup`", pytrace=False)
    photos = [np.asarray(Image.open(path).convert("RGB"))
              for path in sorted(HELDOUT.glob("*__00.jpg"))]
    photos += [getattr(skimage.data, name)() for name in
               ("coffee", "rocket", "hubble_deep_field", "immunohistochemistry")]
    tiles = [photo[y:y + SIDE, x:x + SIDE] for photo in photos
             for y in range(0, photo.shape[0] - SIDE + 1, SIDE)
             for x in range(0, photo.shape[1] - SIDE + 1, SIDE)]
    planted_object = skimage.data.astronaut()[20:20 + OBJECT, 140:140 + OBJECT]
    rng = np.random.default_rng(0)
    images = tmp_path_factory.mktemp("planted")
    annotations = tmp_path_factory.mktemp("annotations")
    for number, tile in enumerate(tiles[:24]):
        y, x = rng.integers(0, SIDE - OBJECT, size=2, endpoint=True)
        image = tile.copy()
        image[y:y + OBJECT, x:x + OBJECT] = planted_object
        Image.fromarray(image).save(images / f"photo{number:02d}.png")
        box = (int(x) + 1, int(y) + 1, int(x) + OBJECT, int(y) + OBJECT)
        write_annotation(Annotation(f"photo{number:02d}.png", SIDE, SIDE,
                                    (VocObject("planted", box),)),
                         annotations / f"photo{number:02d}.xml")
    return images, annotations


@pytest.fixture(scope="module")
def mined(random_weights, planted, tmp_path_factory):
    """The output folder of a run on the planted images, with the annotations."""
    images, annotations = planted
    out = tmp_path_factory.mktemp("mined") / "out"
    page, summary = mine_planted(images, random_weights, out, annotations=str(annotations))
    assert page == out / "index.html"
    assert summary == json.loads((out / "summary.json").read_text(encoding="utf-8"))
    return out


def test_the_planted_object_is_the_first_cluster(mined, planted):
    _, annotations = planted
    summary = json.loads((mined / "summary.json").read_text(encoding="utf-8"))
    first = summary["clusters"][0]
    assert first["verified"] >= 12 and first["verified"] > summary["clusters"][1]["verified"]
    for item in [{"image": first["image"], "box": first["constellation_box"]},
                 *first["detections"]]:
        xml = (annotations / Path(item["image"]).with_suffix(".xml").name).read_text()
        xmin, ymin, xmax, ymax = (int(xml.split(f"<{tag}>")[1].split("<")[0])
                                  for tag in ("xmin", "ymin", "xmax", "ymax"))
        left, top, right, bottom = item["box"]
        overlap = ((min(right, xmax) - max(left, xmin) + 1)
                   * (min(bottom, ymax) - max(top, ymin) + 1))
        inside = overlap / ((right - left + 1) * (bottom - top + 1))
        assert inside > 0.75, item  # the four matched patches lie on the planted object
    evaluation = summary["purity_coverage"]
    # Random features: one of the first ten detections may fall beside the object.
    assert evaluation["purity"][0] >= 0.9 and evaluation["majority"][0] == "planted"
    assert 0 < evaluation["coverage"][0] <= 1 and 0 < evaluation["auc"] <= 1
    assert (mined / "purity_coverage.png").stat().st_size > 0


def test_a_rerun_reuses_the_features(mined, planted, random_weights, capsys):
    images, _ = planted
    before = json.loads((mined / "summary.json").read_text(encoding="utf-8"))
    mine_planted(images, random_weights, mined)
    assert f"reusing {mined / 'features.h5'}" in capsys.readouterr().out
    after = json.loads((mined / "summary.json").read_text(encoding="utf-8"))
    assert after["clusters"] == before["clusters"] and "purity_coverage" not in after


def test_page_renders_every_image_in_headless_chromium(mined, tmp_path, chromium):
    page = mined / "index.html"
    text = page.read_text(encoding="utf-8")
    expected = text.count("<img ")
    assert expected >= 7  # the first cluster: its constellation and 6 matches
    # A page beside the folder loads the figure in a frame and writes how many images decoded.
    probe = mined.parent / "probe.html"
    probe.write_text(
        f'<iframe id="f" src="{mined.name}/index.html" width="1200" height="900"></iframe>'
        '<script>document.getElementById("f").onload ='
        ' function () { var images = Array.from(this.contentDocument.images);'
        ' document.title = "loaded " + images.filter(function (i) {'
        ' return i.complete && i.naturalWidth > 0; }).length + " of " + images.length; };'
        "</script>", encoding="utf-8")
    result = subprocess.run(
        [str(chromium), "--headless", "--no-sandbox", "--disable-gpu",
         "--allow-file-access-from-files", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
         "--dump-dom", probe.as_uri()],
        check=True, capture_output=True, text=True, timeout=60)
    assert f"<title>loaded {expected} of {expected}</title>" in result.stdout


def test_help_explains_every_flag():
    result = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True,
                            text=True, check=True)
    for flag in ("--images", "--weights", "--out", "--net", "--deploy", "--layer", "--stride",
                 "--spacing", "--constellations", "--top-images", "--candidates", "--tolerance",
                 "--max-shared", "--min-verified", "--clusters", "--shown", "--annotations",
                 "--purity-top", "--match-rule", "--max-pixels", "--seed", "--exact-threshold",
                 "--chunk", "--batch", "--gpu", "Example:"):
        assert flag in result.stdout


def test_bad_flags_are_refused(random_weights, tmp_path):
    common = [sys.executable, str(TOOL), "--images", str(tmp_path), "--weights",
              str(random_weights), "--out", str(tmp_path)]
    for flags, message in ((["--stride", "48", "--spacing", "100"], "multiple of --stride"),
                           (["--max-shared", "2"], "--max-shared must lie in"),
                           (["--annotations", str(tmp_path / "none")], "does not exist")):
        refused = subprocess.run(common + flags, capture_output=True, text=True)
        assert refused.returncode == 2 and message in refused.stderr


def test_tool_command_line(random_weights, planted, mined, tmp_path):
    """The tool's flags reach the run (reusing the run's features) and its lines are printed."""
    images, annotations = planted
    shutil.copy(mined / "features.h5", tmp_path / "features.h5")
    done = subprocess.run(
        [sys.executable, str(TOOL), "--images", str(images), "--weights", str(random_weights),
         "--out", str(tmp_path), "--annotations", str(annotations), "--constellations", "50",
         "--clusters", "2", "--shown", "3", "--seed", "1"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"reusing {tmp_path / 'features.h5'}" in done.stdout
    assert f"wrote {tmp_path / 'index.html'}" in done.stdout
    assert "purity-coverage AUC" in done.stdout
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert summary["settings"]["seed"] == 1 and summary["constellations"] == 50
    assert summary["settings"]["deploy"] == DEPLOY
