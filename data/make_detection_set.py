#!/usr/bin/env python3
"""Build ctxpred's small VOC-format detection set from real photographs.

No registry package ships labelled detection photos, so this script composes
them (ctxpred.detection.synthetic_scenes): photographed object cut-outs of Debian's
``tuxpaint-stamps-default`` (RGBA PNG files, labelled by folder) are pasted
onto the real photos of the default collection (data/photos, made by
data/make_collection.py) at random places, and the pasted boxes are written
as PASCAL VOC annotations. Classes and the folders they come from are in
CLASS_FOLDERS; clip-art (folders named cartoon/ or toys/) is left out.

Splits never share a cut-out or a background: every third cut-out of each
class (in file-name order) and the held-out photos make ``test``, the rest
``trainval``. Then selective search ("fast" mode, ctxpred.detection.proposals) computes
the proposals of every image into proposals.npz.

Output (OUT, default data/detection/), the layout of the VOC devkit:
  Annotations/<id>.xml  JPEGImages/<id>.jpg  ImageSets/Main/{trainval,test}.txt
  classes.txt (one class a line, background not listed)  proposals.npz
  manifest.json (recipe, counts, package versions)
The build writes into a temporary folder that is renamed into place; a set
that matches its recipe is left as it is.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ctxpred.data.collection import (CollectionError, default_cache_dir,  # noqa: E402
                                     fetch_package, make_collection, read_manifest,
                                     remove_stale_builds, replace_folder)

from ctxpred.detection.proposals import compute_proposals, save_proposals  # noqa: E402
from ctxpred.detection.synthetic_scenes import compose_scene, fit_longer_side, trim_cutout  # noqa: E402
from ctxpred.detection.voc import Annotation, VocObject, write_annotation  # noqa: E402

DATA_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = DATA_DIR / "detection"
STAMPS_PACKAGE = "tuxpaint-stamps-default"
STAMPS_ROOT = "usr/share/tuxpaint/stamps"
CLASS_FOLDERS = {
    "mammal": ("animals/mammals", "animals/marsupials"),
    "bird": ("animals/birds",),
    "fish": ("animals/fish",),
    "insect": ("animals/insects",),
    "fruit": ("food/fruit",),
    "vegetable": ("food/vegetables",),
    "flower": ("plants/flowers",),
}
CLIP_ART_FOLDERS = {"cartoon", "toys"}
SPLITS = {"trainval": "train", "test": "heldout"}   # detection split -> photo split
FORMAT_VERSION = 1
JPEG_QUALITY = 92

log = logging.getLogger("make_detection_set")


def stamp_files(stamps_root: Path) -> dict[str, list[Path]]:
    """Class name -> sorted photographed cut-out PNG files of that class."""
    files = {}
    for label, folders in CLASS_FOLDERS.items():
        found = [path for folder in folders for path in (stamps_root / folder).rglob("*.png")
                 if not CLIP_ART_FOLDERS & set(path.relative_to(stamps_root).parts)]
        if not found:
            raise CollectionError(f"no cut-outs for class {label!r} under {stamps_root} "
                                  f"({', '.join(folders)})")
        files[label] = sorted(found)
    return files


def split_stamps(files: dict[str, list[Path]]) -> dict[str, list[tuple[str, Path]]]:
    """Every third cut-out of each class goes to test, the others to trainval."""
    split = {"trainval": [], "test": []}
    for label, paths in files.items():
        for index, path in enumerate(paths):
            split["test" if index % 3 == 2 else "trainval"].append((label, path))
    return split


def load_cutout(path: Path) -> np.ndarray:
    """A trimmed RGBA cut-out from a PNG file."""
    with Image.open(path) as image:
        return trim_cutout(np.asarray(image.convert("RGBA")), name=str(path))


def compose_split(split, stamps, backgrounds, count, longer_side, rng, out):
    """Compose ``count`` scenes of a split; write their images and annotations; return ids."""
    cutouts = [(label, load_cutout(path)) for label, path in stamps]
    ids = []
    for index in tqdm(range(count), desc=f"composing {split}", unit="image", leave=False):
        path = backgrounds[index % len(backgrounds)]
        with Image.open(path) as photo:
            background = fit_longer_side(np.asarray(photo.convert("RGB")), longer_side)
        chosen = rng.choice(len(cutouts), size=int(rng.integers(1, 4)), replace=False)
        image, placed = compose_scene(background, [cutouts[i] for i in chosen], rng)
        image_id = f"{split}_{index:05d}"
        Image.fromarray(image).save(out / "JPEGImages" / f"{image_id}.jpg", quality=JPEG_QUALITY)
        write_annotation(Annotation(
            filename=f"{image_id}.jpg", width=image.shape[1], height=image.shape[0],
            objects=tuple(VocObject(obj.label, obj.box) for obj in placed)),
            out / "Annotations" / f"{image_id}.xml")
        ids.append(image_id)
    (out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return ids


def recipe_digest(args, stamps_version, photos_recipe) -> str:
    """Hash of everything that determines the set's content."""
    recipe = dict(format=FORMAT_VERSION, stamps=stamps_version, photos=photos_recipe,
                  classes=CLASS_FOLDERS, seed=args.seed, trainval=args.trainval,
                  test=args.test, longer_side=args.longer_side)
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def build(args) -> tuple[dict, bool]:
    """Make the detection set unless it is current; return its manifest and whether it was built."""
    out = args.out.resolve()
    photos_manifest, _ = make_collection(args.photos, cache_dir=args.cache)
    stamps_root, stamps_version = fetch_package(STAMPS_PACKAGE, args.cache)
    recipe = recipe_digest(args, stamps_version, photos_manifest["recipe"])
    manifest = read_manifest(out)
    if not args.force and manifest is not None and manifest.get("recipe") == recipe \
            and (out / "proposals.npz").is_file():
        return manifest, False
    if out.exists() and manifest is None and any(out.iterdir()):
        raise CollectionError(f"{out} exists, is not empty and has no manifest.json: not "
                              "replacing a folder this script did not make")
    stamps = split_stamps(stamp_files(stamps_root / STAMPS_ROOT))
    remove_stale_builds(out)
    staging = out.parent / f".{out.name}.building-{os.getpid()}"
    try:
        for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (staging / folder).mkdir(parents=True)
        (staging / ".gitignore").write_text("# made by data/make_detection_set.py\n*\n")
        (staging / "classes.txt").write_text("".join(f"{label}\n" for label in CLASS_FOLDERS))
        rng = np.random.default_rng(args.seed)
        ids = {}
        for split, photo_split in SPLITS.items():
            backgrounds = sorted((args.photos / photo_split).glob("*.jpg"))
            rng.shuffle(backgrounds)
            ids[split] = compose_split(split, stamps[split], backgrounds,
                                       getattr(args, split), args.longer_side, rng, staging)
        all_ids = ids["trainval"] + ids["test"]
        with tqdm(total=len(all_ids), desc="selective search", unit="image") as bar:
            proposals = compute_proposals(
                {i: (lambda i=i: np.asarray(Image.open(staging / "JPEGImages" / f"{i}.jpg")
                                            .convert("RGB"))) for i in all_ids},
                workers=args.workers, progress=lambda: bar.update(1))
        save_proposals(staging / "proposals.npz", proposals)
        manifest = dict(
            description="ctxpred detection set: tuxpaint-stamps-default cut-outs pasted onto "
                        "the default photo collection; made by data/make_detection_set.py",
            recipe=recipe, packages={STAMPS_PACKAGE: stamps_version},
            classes=list(CLASS_FOLDERS), counts={split: len(v) for split, v in ids.items()},
            cutouts={split: len(v) for split, v in stamps.items()},
            proposals_per_image=round(float(np.mean([len(b) for b in proposals.values()])), 1))
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest, True


def parse_args(argv):
    parser = argparse.ArgumentParser(
        formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output folder (default: %(default)s)")
    parser.add_argument("--photos", type=Path, default=DATA_DIR / "photos",
                        help="the photo collection used as backgrounds; made first if missing "
                             "(default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=default_cache_dir(),
                        help="where the .deb is downloaded and unpacked (default: %(default)s)")
    parser.add_argument("--trainval", type=int, default=160,
                        help="number of trainval images (default: %(default)s)")
    parser.add_argument("--test", type=int, default=80,
                        help="number of test images (default: %(default)s)")
    parser.add_argument("--longer-side", type=int, default=400,
                        help="backgrounds are resized to this longer side, pixels "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of backgrounds, cut-outs, sizes and places (default: 0)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="threads running selective search (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even if current")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.monotonic()
    try:
        manifest, built = build(args)
    except CollectionError as error:
        print(f"make_detection_set: error: {error}", file=sys.stderr)
        return 2
    log.info("%s %s: %s images, %s classes, %.0f proposals per image (%.1f s)",
             "built" if built else "up to date:", args.out.resolve(), manifest["counts"],
             len(manifest["classes"]), manifest["proposals_per_image"],
             time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
