"""The nearest-neighbour page: escaping, relative links, shared patch files, the run end to end."""
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from ctxpred.figures.neighbours import NeighbourFigureSettings, nearest_neighbour_figure
from ctxpred.figures.pages import PatchStore, ShownPatch, neighbours_page

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "nearest_neighbors.py"
DEPLOY = str(REPO / "prototxt" / "color_dropping" / "deploy.prototxt")
NASTY = "<b>x</b>.jpg"  # a folder '<b>x<' holding 'b>.jpg'
ODD = "a&b \"q\" #1 ?%20.jpg"


def resolve(page, url):
    """The file a relative URL of ``page`` points to (as a browser opening it from disk would)."""
    assert "://" not in url and not url.startswith("/"), url
    return (Path(page).parent / unquote(url)).resolve()


def image_of(title):
    return title.rsplit(" (x=", 1)[0]


def test_page_escapes_names_links_relatively_and_shares_patches(tmp_path, rng, page_parts):
    photos = tmp_path / "photos"
    (photos / "<b>x<").mkdir(parents=True)
    patches = rng.integers(0, 256, size=(3, 96, 96, 3), dtype=np.uint8)
    for name, pixels in ((NASTY, patches[0]), (ODD, patches[1])):
        Image.fromarray(pixels).save(photos / name, format="JPEG")
    nasty, odd = (ShownPatch(patches[n], str(photos / name), (0, 0, 96, 96))
                  for n, name in enumerate((NASTY, ODD)))
    other = ShownPatch(patches[2], "lmdb:key<1>", (5, 7, 96, 96), similarity=0.5)
    store = PatchStore(tmp_path / "out" / "patches")
    rows = [(nasty, [[ShownPatch(odd.pixels, odd.image, odd.box, 0.25), other]]),
            (odd, [[other, None]])]
    first = neighbours_page(tmp_path / "out" / "index.html", store, "NN <test>", "<p>x</p>",
                            ["net <1>"], rows)
    second = neighbours_page(tmp_path / "out" / "more" / "deep" / "page.html", store, "again",
                             "", ["net"], rows)
    text = first.read_text(encoding="utf-8")
    assert "<b>x</b>" not in text and "&lt;b&gt;x&lt;/b&gt;.jpg" in text
    assert "net &lt;1&gt;" in text and "<title>NN &lt;test&gt;</title>" in text
    assert "lmdb:key&lt;1&gt;" in text
    for page in (first, second):
        links = page_parts(page)
        assert len(links.sources) == 5 and len(links.links) == 3  # None: no img; lmdb: no link
        for url in links.sources + links.links:
            assert resolve(page, url).is_file(), url
        assert {resolve(page, url).name for url in links.links} == {"b>.jpg", ODD}
        assert [image_of(title) for title in links.rows[2]] == [
            str(photos / NASTY), str(photos / ODD), "lmdb:key<1>"]
    # Three distinct patches: three files, the same ones for both pages.
    assert len(list(store.folder.iterdir())) == 3
    assert ({resolve(first, url) for url in page_parts(first).sources}
            == {resolve(second, url) for url in page_parts(second).sources})
    assert store.add(patches[0].copy()) == resolve(first, page_parts(first).sources[0])


def figure_of(images, weights, out, labels=None, **options):
    """nearest_neighbour_figure of colour-dropping ``weights`` (paths), labelled by file name."""
    return nearest_neighbour_figure(NeighbourFigureSettings(
        images=str(images), weights=tuple(weights), deploys=(DEPLOY,) * len(weights),
        nets=("color_dropping",) * len(weights),
        labels=tuple(labels or (Path(path).stem for path in weights)), out=str(out), **options))


@pytest.fixture(scope="module")
def weight_files(random_deploy_weights):
    """Two colour-dropping deploy nets with seeded random weights."""
    return [random_deploy_weights(0), random_deploy_weights(1)]


@pytest.fixture(scope="module")
def figure(weight_files, photo_folder, tmp_path_factory):
    """The figure of the four photos plus one named <b>x</b>.jpg: (index.html, photos)."""
    photos = tmp_path_factory.mktemp("nasty")
    for path in photo_folder.iterdir():
        shutil.copy(path, photos / path.name)
    (photos / "<b>x<").mkdir()
    shutil.copy(photo_folder / "coffee.jpg", photos / NASTY)
    out = tmp_path_factory.mktemp("figure") / "nn"
    page, queries = figure_of(photos, weight_files, out, ["random <a>", "random <b>"], queries=4,
                              k=3, patches_per_image=3, seed=2, batch=8)
    assert page == out / "index.html" and queries == 4
    return page, photos


def test_run_writes_the_figure(figure, page_parts):
    page, photos = figure
    text = page.read_text(encoding="utf-8")
    links = page_parts(page)
    for url in links.sources + links.links:
        assert resolve(page, url).is_file(), url
    assert all(url.startswith("patches/") for url in links.sources)
    assert "Exclusion rule:</b> neighbours from the query's own image are excluded" in text
    assert "random &lt;a&gt;" in text and "<b>x</b>" not in text
    rows = [row for row in links.rows if row]
    assert len(rows) == 4 and all(len(row) == 1 + 2 * 3 for row in rows)
    for row in rows:
        assert image_of(row[0]) not in {image_of(title) for title in row[1:]}
    # One file per distinct patch (image and box), however often it is shown; no stray files.
    files = {resolve(page, url) for url in links.sources}
    assert files == set((page.parent / "patches").iterdir())
    assert len(files) == len({title for row in rows for title in row}) < len(links.sources)


def test_run_with_the_approximate_index_and_one_image(figure, weight_files, tmp_path,
                                                     page_parts):
    _, photos = figure
    page, _ = figure_of(photos, weight_files[:1], tmp_path / "hnsw", queries=5, k=4,
                        patches_per_image=4, exact_threshold=10)  # 20 patches > 10: HNSW
    assert "approximate (HNSW) search" in page.read_text(encoding="utf-8")
    rows = [row for row in page_parts(page).rows if row]
    assert len(rows) == 5 and all(len(row) == 5 for row in rows)
    for row in rows:
        assert image_of(row[0]) not in {image_of(title) for title in row[1:]}
    with pytest.raises(ValueError, match="at least 2 images"):
        figure_of(photos / "coffee.jpg", weight_files[:1], tmp_path / "one")


def test_tool_command_line(weight_files, photo_folder, tmp_path):
    """The tool's flags reach the figure; one image is bad input (exit 2)."""
    done = subprocess.run(
        [sys.executable, str(TOOL), "--images", str(photo_folder), "--queries", "2", "--k", "2",
         "--weights", *weight_files, "--net", "color_dropping", "--labels", "a", "b",
         "--patches-per-image", "2", "--out", str(tmp_path / "nn")],
        capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "(2 queries, 2 neighbours, 2 nets)" in done.stdout
    assert (tmp_path / "nn" / "index.html").is_file()
    one = subprocess.run([sys.executable, str(TOOL), "--images", str(photo_folder / "coffee.jpg"),
                          "--weights", weight_files[0], "--out", str(tmp_path / "one")],
                         capture_output=True, text=True)
    assert one.returncode == 2 and "at least 2 images" in one.stderr


def test_page_renders_in_headless_chromium(figure, tmp_path, chromium):
    page, _ = figure
    shot = tmp_path / "shot.png"
    subprocess.run([str(chromium), "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={shot}", "--window-size=1000,700", page.as_uri()],
                   check=True, capture_output=True, timeout=60)
    assert shot.stat().st_size > 0
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.std() > 10  # patches drawn, not a blank page


def test_help_explains_every_flag():
    result = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True,
                            text=True, check=True)
    for flag in ("--images", "--queries", "--k", "--weights", "--net", "--labels", "--layer",
                 "--out", "--patches-per-image", "--max-pixels", "--seed", "--exact-threshold",
                 "--batch", "--gpu"):
        assert flag in result.stdout
