"""The offline detection set: tuxpaint-stamps cut-outs pasted onto the photo collection.

No registry package ships labelled detection photos, so the set is composed
(:mod:`ctxpred.detection.synthetic_scenes`): photographed object cut-outs of
Debian's ``tuxpaint-stamps-default`` (RGBA PNG files, labelled by folder) are
pasted onto the real photos of the default collection
(:mod:`ctxpred.data.collection`) at random places, and the pasted boxes are
written as PASCAL VOC annotations. Classes and the folders they come from are
in :data:`CLASS_FOLDERS`; clip-art (folders named cartoon/ or toys/) is left
out.

Splits never share a cut-out or a background: every third cut-out of each
class (in file-name order) and the held-out photos make ``test``, the rest
``trainval``. Then selective search ("fast" mode,
:mod:`ctxpred.detection.proposals`) computes the proposals of every image
into proposals.npz.

Output (default data/detection/), the layout of the VOC devkit:
  Annotations/<id>.xml  JPEGImages/<id>.jpg  ImageSets/Main/{trainval,test}.txt
  classes.txt (one class a line, background not listed)  proposals.npz
  manifest.json (recipe, counts, package versions)
The build happens in a staging folder renamed into place
(:func:`ctxpred.data.collection.building_folder`); a set that matches its
recipe is left as it is. data/make_detection_set.py is the command line.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ctxpred.data.collection import (DEFAULT_OUT as PHOTOS, CollectionError, building_folder,
                                     content_digest, default_cache_dir, fetch_package,
                                     make_collection, read_manifest)
from ctxpred.detection.proposals import compute_proposals, save_proposals
from ctxpred.detection.synthetic_scenes import compose_scene, fit_longer_side, trim_cutout
from ctxpred.detection.voc import Annotation, VocObject, write_annotation

DEFAULT_OUT = PHOTOS.parent / "detection"
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

log = logging.getLogger("detection_set")


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


@dataclass(frozen=True)
class DetectionSetRecipe:
    """What a detection set is made of: counts, image size, seed (and where things are).

    trainval / test: images per split; longer_side: backgrounds resized to
    it (pixels); seed: backgrounds, cut-outs, sizes and places; workers:
    threads running selective search.
    """

    out: Path = DEFAULT_OUT
    photos: Path = PHOTOS
    cache: Path | None = None
    trainval: int = 160
    test: int = 80
    longer_side: int = 400
    seed: int = 0
    workers: int = 1


def stamp_scene_inputs(photos, cache=None):
    """(the photo collection's recipe digest, the stamps' folder, the stamps package's version).

    Makes the photo collection at ``photos`` if it is not current and fetches
    tuxpaint-stamps-default into ``cache`` (default: the collection's cache).
    """
    cache = Path(cache) if cache else default_cache_dir()
    photos_manifest, _ = make_collection(photos, cache_dir=cache)
    package_root, version = fetch_package(STAMPS_PACKAGE, cache)
    return photos_manifest["recipe"], package_root / STAMPS_ROOT, version


def recipe_digest(recipe: DetectionSetRecipe, stamps_version, photos_recipe) -> str:
    """Hash of everything that determines the set's content."""
    content = dict(format=FORMAT_VERSION, stamps=stamps_version, photos=photos_recipe,
                   classes=CLASS_FOLDERS, seed=recipe.seed, trainval=recipe.trainval,
                   test=recipe.test, longer_side=recipe.longer_side)
    return content_digest(content, 16)


def _compose_and_propose(recipe, stamps, staging):
    """Compose both splits into ``staging``, compute their proposals; returns (ids, proposals)."""
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (staging / folder).mkdir(parents=True)
    (staging / "classes.txt").write_text("".join(f"{label}\n" for label in CLASS_FOLDERS))
    rng = np.random.default_rng(recipe.seed)
    ids = {}
    for split, photo_split in SPLITS.items():
        backgrounds = sorted((Path(recipe.photos) / photo_split).glob("*.jpg"))
        rng.shuffle(backgrounds)
        ids[split] = compose_split(split, stamps[split], backgrounds, getattr(recipe, split),
                                   recipe.longer_side, rng, staging)
    all_ids = ids["trainval"] + ids["test"]
    with tqdm(total=len(all_ids), desc="selective search", unit="image") as bar:
        proposals = compute_proposals(
            {i: (lambda i=i: np.asarray(Image.open(staging / "JPEGImages" / f"{i}.jpg")
                                        .convert("RGB"))) for i in all_ids},
            workers=recipe.workers, progress=lambda: bar.update(1))
    save_proposals(staging / "proposals.npz", proposals)
    return ids, proposals


def make_detection_set(recipe: DetectionSetRecipe = DetectionSetRecipe(),
                       force=False) -> tuple[dict, bool]:
    """Make the detection set unless it is current; returns its manifest and whether it was built.

    Raises CollectionError (a ValueError) naming what could not be fetched or replaced.
    """
    out = Path(recipe.out).resolve()
    photos_recipe, stamps_root, stamps_version = stamp_scene_inputs(recipe.photos, recipe.cache)
    digest = recipe_digest(recipe, stamps_version, photos_recipe)
    manifest = read_manifest(out)
    if not force and manifest is not None and manifest.get("recipe") == digest \
            and (out / "proposals.npz").is_file():
        return manifest, False
    stamps = split_stamps(stamp_files(stamps_root))
    with building_folder(out, "data/make_detection_set.py") as staging:
        ids, proposals = _compose_and_propose(recipe, stamps, staging)
        manifest = dict(
            description="ctxpred detection set: tuxpaint-stamps-default cut-outs pasted onto "
                        "the default photo collection; made by data/make_detection_set.py",
            recipe=digest, packages={STAMPS_PACKAGE: stamps_version},
            classes=list(CLASS_FOLDERS), counts={split: len(v) for split, v in ids.items()},
            cutouts={split: len(v) for split, v in stamps.items()},
            proposals_per_image=round(float(np.mean([len(b) for b in proposals.values()])), 1))
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest, True
