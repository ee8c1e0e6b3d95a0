"""Assemble ctxpred's default collection of real, unlabeled photographs.

The photos come from packages that a machine without general internet access
can still install: the sample photos shipped inside the scikit-image wheel,
and wallpaper photographs from Debian packages that are fetched without root
(``apt-get download``) and unpacked with ``dpkg-deb -x`` into a cache folder.
Which files are used, their copyright and licence, and the fixed held-out
split are listed in ``data/sources.json``; ``data/make_collection.py`` is the
command line (``make data`` runs it).

High-resolution photos are cut into non-overlapping tiles of roughly
400k-1M pixels whose aspect ratio is at most 1.5, so every tile stays larger
than 300x300 pixels after the training resize to 150k-450k pixels.  Small
photos are kept whole (enlarged slightly if they are below 150k pixels).
All output is JPEG quality 92, in ``train/`` and ``heldout/`` subfolders,
with ``manifest.json`` listing every file, its source photo and licence.

The split is by source photo: every tile of a photo (and both views of a
stereo pair) lands on the same side.  The build writes into a temporary
folder and renames it into place, so an interrupted run never leaves a half
collection; a run whose output already matches its manifest does nothing.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageOps

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
DEFAULT_OUT = DATA_DIR / "photos"
DEFAULT_SOURCES = DATA_DIR / "sources.json"
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "heldout")
SKIMAGE_PACKAGE = "scikit-image"
DEB_VERSION_FILE = ".ctxpred-deb-version"

# Bump FORMAT_VERSION whenever the way images are produced changes, so that
# existing collections are rebuilt instead of being reported as current.
FORMAT_VERSION = 1
JPEG_QUALITY = 92
MIN_TILE_PIXELS = 400_000
MAX_TILE_PIXELS = 1_000_000
MAX_ASPECT = 1.5
MAX_GRID = 12
MIN_IMAGE_PIXELS = 150_000
MIN_IMAGE_SIDE = 301

log = logging.getLogger("make_collection")


class CollectionError(Exception):
    """A problem the user has to fix; the message says what to do."""


def default_cache_dir() -> Path:
    """Folder for downloaded and unpacked .deb files (honours XDG_CACHE_HOME)."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "ctxpred" / "debs"


def load_sources(path: Path) -> dict:
    """Read and check the list of source photos and held-out groups."""
    try:
        sources = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CollectionError(f"cannot read the source list {path}: {error}") from error
    ids = [photo["id"] for photo in sources["photos"]]
    duplicates = sorted({photo_id for photo_id in ids if ids.count(photo_id) > 1})
    if duplicates:
        raise CollectionError(f"{path}: duplicate photo ids {duplicates}")
    groups = {photo_group(photo) for photo in sources["photos"]}
    unknown = sorted(set(sources["heldout"]) - groups)
    if unknown:
        raise CollectionError(f"{path}: held-out groups {unknown} name no photo")
    return sources


def photo_group(photo: dict) -> str:
    """The unit of the split: the photo's own id unless it shares a scene."""
    return photo.get("group", photo["id"])


def split_of(photo: dict, heldout_groups: list[str]) -> str:
    """'heldout' for photos of a held-out group, else 'train'."""
    return "heldout" if photo_group(photo) in heldout_groups else "train"


def recipe_digest(sources: dict) -> str:
    """Fingerprint of everything that decides the collection's content."""
    recipe = {
        "format": FORMAT_VERSION,
        "jpeg_quality": JPEG_QUALITY,
        "tile_pixels": [MIN_TILE_PIXELS, MAX_TILE_PIXELS],
        "max_aspect": MAX_ASPECT,
        "max_grid": MAX_GRID,
        "min_image": [MIN_IMAGE_PIXELS, MIN_IMAGE_SIDE],
        "sources": sources,
    }
    return content_digest(recipe)


def content_digest(content: dict, length: int = 64) -> str:
    """SHA-256 hex digest (first ``length`` digits) of a JSON-able recipe, keys sorted.

    A generated set stores it in its manifest and is rebuilt when it changes.
    """
    encoded = json.dumps(content, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()[:length]


def apt_command(package: str) -> str:
    """The shell command that fetches `package` without root."""
    return f"apt-get download {package}"


def run_tool(command: list[str], package: str, cwd: Path) -> str:
    """Run a packaging tool for `package`; raise CollectionError if it fails."""
    if shutil.which(command[0]) is None:
        raise CollectionError(
            f"cannot fetch Debian package '{package}': '{command[0]}' is not installed "
            f"(a Debian or Ubuntu system is needed). Alternatively run "
            f"`{apt_command(package)}` on such a system and put the .deb into {cwd}"
        )
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise CollectionError(
            f"'{' '.join(command)}' failed for Debian package '{package}' "
            f"(exit {result.returncode}): {result.stderr.strip()}\n"
            f"Fetch it by hand with `cd {cwd} && {apt_command(package)}`; if apt "
            f"cannot locate the package, run `apt-get update` (as root) first."
        )
    return result.stdout


def find_deb(package: str, cache_dir: Path) -> Path | None:
    """The newest downloaded .deb of `package` in the cache, if any."""
    debs = [path for path in cache_dir.glob("*.deb") if path.name.split("_")[0] == package]
    return max(debs, key=lambda path: path.stat().st_mtime, default=None)


def fetch_package(package: str, cache_dir: Path) -> tuple[Path, str]:
    """Download and unpack a Debian package into the cache, without root.

    Returns the folder holding the unpacked file tree and the package version.
    Both steps are skipped when their result is already in the cache.
    """
    root = cache_dir / package
    if (root / DEB_VERSION_FILE).is_file():
        return root, (root / DEB_VERSION_FILE).read_text(encoding="utf-8").strip()
    cache_dir.mkdir(parents=True, exist_ok=True)
    deb = find_deb(package, cache_dir)
    if deb is None:
        log.info("downloading Debian package %s into %s", package, cache_dir)
        run_tool(["apt-get", "download", package], package, cache_dir)
        deb = find_deb(package, cache_dir)
        if deb is None:
            raise CollectionError(
                f"`{apt_command(package)}` in {cache_dir} left no {package}_*.deb there"
            )
    version = run_tool(["dpkg-deb", "--field", str(deb), "Version"], package, cache_dir).strip()
    log.info("unpacking %s", deb.name)
    staging = cache_dir / f".{package}.unpacking-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        run_tool(["dpkg-deb", "-x", str(deb), str(staging)], package, cache_dir)
        (staging / DEB_VERSION_FILE).write_text(version + "\n", encoding="utf-8")
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root, version


def skimage_data() -> tuple[Path, str]:
    """The folder of scikit-image's bundled sample images and its version."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise CollectionError(
            "scikit-image is not installed; its sample photos are part of the "
            "collection: pip install scikit-image"
        )
    root = Path(list(spec.submodule_search_locations)[0]) / "data"
    return root, importlib.metadata.version(SKIMAGE_PACKAGE)


def resolve_packages(photos: list[dict], cache_dir: Path) -> dict[str, tuple[Path, str]]:
    """Make every package the photos need available: name -> (root, version)."""
    packages = {}
    for package in sorted({photo["package"] for photo in photos}):
        if package == SKIMAGE_PACKAGE:
            packages[package] = skimage_data()
        else:
            packages[package] = fetch_package(package, cache_dir)
    for photo in photos:
        root, version = packages[photo["package"]]
        if not (root / photo["file"]).is_file():
            raise CollectionError(
                f"{photo['file']} is missing from {photo['package']} {version} "
                f"(looked in {root}); update data/sources.json for this version"
            )
    return packages


def plan_tiles(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """Boxes (left, top, right, bottom) of the tiles to cut from an image.

    Tries every grid up to MAX_GRID x MAX_GRID; each cell is trimmed around
    its centre to an aspect ratio of at most MAX_ASPECT.  The grid with the
    most tiles whose area lies in [MIN_TILE_PIXELS, MAX_TILE_PIXELS] wins
    (ties: the larger tile).  An image too small to split gives one box, the
    whole image trimmed to MAX_ASPECT.
    """
    best_key, best_grid = (0, 0), (1, 1, width, height)
    for columns in range(1, MAX_GRID + 1):
        for rows in range(1, MAX_GRID + 1):
            cell_width, cell_height = width // columns, height // rows
            tile_width = min(cell_width, int(cell_height * MAX_ASPECT))
            tile_height = min(cell_height, int(cell_width * MAX_ASPECT))
            area = tile_width * tile_height
            count = columns * rows
            if count > 1 and not MIN_TILE_PIXELS <= area <= MAX_TILE_PIXELS:
                continue
            if (count, area) > best_key:
                best_key, best_grid = (count, area), (columns, rows, tile_width, tile_height)
    columns, rows, tile_width, tile_height = best_grid
    cell_width, cell_height = width // columns, height // rows
    boxes = []
    for row in range(rows):
        for column in range(columns):
            left = column * cell_width + (cell_width - tile_width) // 2
            top = row * cell_height + (cell_height - tile_height) // 2
            boxes.append((left, top, left + tile_width, top + tile_height))
    return boxes


def enlarge_to_minimum(image: Image.Image) -> Image.Image:
    """Upscale an image below MIN_IMAGE_PIXELS or MIN_IMAGE_SIDE just enough."""
    width, height = image.size
    scale = max(math.sqrt(MIN_IMAGE_PIXELS / (width * height)), MIN_IMAGE_SIDE / min(width, height))
    if scale <= 1:
        return image
    size = (math.ceil(width * scale), math.ceil(height * scale))
    return image.resize(size, Image.Resampling.LANCZOS)


def output_stem(photo_id: str) -> str:
    """File-name stem for a photo id such as 'mate-backgrounds/Aqua'."""
    return photo_id.replace("/", "__")


def cut_photo(photo: dict, split: str, source: tuple[Path, str], out_dir: Path) -> list[dict]:
    """Write the tiles (or the whole image) of one photo; return manifest entries."""
    root, version = source
    with Image.open(root / photo["file"]) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    entries = []
    for index, box in enumerate(plan_tiles(*image.size)):
        cropped = image.crop(box)
        tile = enlarge_to_minimum(cropped)
        relative = f"{split}/{output_stem(photo['id'])}__{index:02d}.jpg"
        tile.save(out_dir / relative, "JPEG", quality=JPEG_QUALITY)
        entries.append({
            "path": relative,
            "bytes": (out_dir / relative).stat().st_size,
            "width": tile.width,
            "height": tile.height,
            "split": split,
            "source_photo": photo["id"],
            "group": photo_group(photo),
            "package": photo["package"],
            "package_version": version,
            "source_file": photo["file"],
            "box": list(box),
            "enlarged_from": list(cropped.size) if tile is not cropped else None,
            "copyright": photo["copyright"],
            "licence": photo["licence"],
        })
    return entries


def read_manifest(out_dir: Path) -> dict | None:
    """The collection's manifest, or None if it is missing or unreadable."""
    try:
        return json.loads((out_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def collection_is_current(out_dir: Path, recipe: str) -> bool:
    """True if out_dir holds exactly the files of a manifest made from `recipe`."""
    manifest = read_manifest(out_dir)
    if manifest is None or manifest.get("recipe") != recipe:
        return False
    expected = {entry["path"]: entry["bytes"] for entry in manifest["files"]}
    found = {}
    for split in SPLITS:
        try:
            with os.scandir(out_dir / split) as listing:
                for item in listing:
                    found[f"{split}/{item.name}"] = item.stat().st_size
        except FileNotFoundError:
            return False
    return found == expected


def remove_stale_builds(out_dir: Path) -> None:
    """Delete temporary folders left by builds whose process no longer runs."""
    for leftover in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_is_running(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def process_is_running(pid: int) -> bool:
    """Whether a process with this id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_folder(new: Path, target: Path) -> None:
    """Put `new` at `target`, swapping out a previous collection by renames."""
    if target.exists():
        retired = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(retired)
        new.rename(target)
        shutil.rmtree(retired)
    else:
        new.rename(target)


@contextlib.contextmanager
def building_folder(out_dir: Path, made_by: str):
    """A staging folder beside ``out_dir`` that replaces it when the block ends without error.

    Generated data sets (the photo collection, the detection and labelled
    sets) are built in it, so an interrupted or failed build never leaves a
    half set and a previous set stays until the new one is complete. A
    non-empty ``out_dir`` without a manifest.json is not ours: CollectionError.
    Staging folders of builds whose process died are removed first. The
    staging folder starts with a ``.gitignore`` of ``*`` (git never lists the
    data, nor a killed build's folder) naming ``made_by``.
    """
    if out_dir.exists() and read_manifest(out_dir) is None and any(out_dir.iterdir()):
        raise CollectionError(
            f"{out_dir} exists, is not empty and has no {MANIFEST_NAME}: not replacing "
            f"a folder ctxpred did not make; pass another --out or remove it")
    remove_stale_builds(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
    try:
        staging.mkdir(parents=True)
        (staging / ".gitignore").write_text(f"# made by {made_by}\n*\n", encoding="utf-8")
        yield staging
        replace_folder(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_collection(out_dir: Path, sources: dict, recipe: str, cache_dir: Path,
                     workers: int) -> dict:
    """Fetch the packages, cut every photo and move the result to out_dir."""
    photos = sources["photos"]
    packages = resolve_packages(photos, cache_dir)
    with building_folder(out_dir, "data/make_collection.py") as staging:
        for split in SPLITS:
            (staging / split).mkdir()
        log.info("cutting %d photos into %s", len(photos), out_dir)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            jobs = [
                pool.submit(cut_photo, photo, split_of(photo, sources["heldout"]),
                            packages[photo["package"]], staging)
                for photo in photos
            ]
            files = sorted((entry for job in jobs for entry in job.result()),
                           key=lambda entry: entry["path"])
        manifest = {
            "description": "ctxpred default unlabeled photo collection; "
                           "made by data/make_collection.py from data/sources.json",
            "format": FORMAT_VERSION,
            "recipe": recipe,
            "jpeg_quality": JPEG_QUALITY,
            "packages": {name: version for name, (_, version) in packages.items()},
            "counts": {split: sum(entry["split"] == split for entry in files) for split in SPLITS},
            "files": files,
        }
        (staging / MANIFEST_NAME).write_text(
            json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def make_collection(out_dir: Path = DEFAULT_OUT, sources_path: Path = DEFAULT_SOURCES,
                    cache_dir: Path | None = None, workers: int | None = None,
                    force: bool = False) -> tuple[dict, bool]:
    """Build the collection unless it is already current.

    Returns the manifest and whether anything was (re)built.
    """
    out_dir = Path(out_dir).resolve()
    sources = load_sources(Path(sources_path))
    recipe = recipe_digest(sources)
    remove_stale_builds(out_dir)
    if not force and collection_is_current(out_dir, recipe):
        return read_manifest(out_dir), False
    manifest = build_collection(out_dir, sources, recipe,
                                Path(cache_dir) if cache_dir else default_cache_dir(),
                                workers or os.cpu_count() or 1)
    return manifest, True
