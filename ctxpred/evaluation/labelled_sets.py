"""The offline labelled sets of the frozen-feature protocols (tools/eval_frozen.py).

The same ingredients as the detection set (:mod:`ctxpred.detection.detection_set`):
photographed object cut-outs of Debian's ``tuxpaint-stamps-default`` (7
classes, CLASS_FOLDERS there) pasted onto the real photos of the default
collection (data/photos), by ctxpred.detection.synthetic_scenes. Two sets,
larger than the detection set so that a 95% interval on the difference
between two nets is a few points wide:

  multi/   multi-label, VOC layout (for the VOC07 SVM and low-shot SVM):
           1-3 objects per image, their classes drawn uniformly without
           replacement (so every class is in about 2/7 of the images), each a
           random cut-out of its class; Annotations/<id>.xml (boxes of the
           pasted objects, none "difficult"), JPEGImages/<id>.jpg,
           ImageSets/Main/{trainval,test}.txt, classes.txt
  single/  single-label (for kNN and the linear probe): one larger object per
           image, the classes in equal numbers; images/<id>.jpg and list
           files train.txt and test.txt (``images/<id>.jpg <class>``),
           classes.txt

Train and test never share a cut-out or a background photo: every third
cut-out of each class (in file-name order) and the collection's held-out
photos make the test split; the other cut-outs and the training photos the
train split (trainval). Backgrounds are the photos resized to a longer side
of 300 pixels, used in a seeded random order, cycled.

Deterministic: one seed gives the same images byte for byte. The build
writes into a temporary folder renamed into place (OUT, default
data/labelled/, with manifest.json: recipe, counts, positives per class); a
set that matches its recipe is left as it is. Takes about a minute on 2 cores.
data/make_labelled_sets.py is the command line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ctxpred.data.collection import (DEFAULT_OUT as PHOTOS, CollectionError, building_folder,
                                     content_digest, read_manifest)
from ctxpred.detection.detection_set import (CLASS_FOLDERS, JPEG_QUALITY, SPLITS, STAMPS_PACKAGE,
                                             load_cutout, split_stamps, stamp_files,
                                             stamp_scene_inputs)
from ctxpred.detection.synthetic_scenes import compose_scene, fit_longer_side
from ctxpred.detection.voc import Annotation, VocObject, write_annotation

DEFAULT_OUT = PHOTOS.parent / "labelled"
FORMAT_VERSION = 1
LONGER_SIDE = 300
MULTI_SIZE_RANGE = (0.25, 0.55)   # object's longer side / the image's shorter side
SINGLE_SIZE_RANGE = (0.4, 0.75)
LIST_SPLITS = {"trainval": "train", "test": "test"}   # VOC split -> list file name


@dataclass(frozen=True)
class LabelledSetsRecipe:
    """Images per set and split, the seed, and where things are (see the module doc)."""

    out: Path = DEFAULT_OUT
    photos: Path = PHOTOS
    cache: Path | None = None
    multi_train: int = 700
    multi_test: int = 700
    single_train: int = 700
    single_test: int = 700
    seed: int = 0

    @property
    def counts(self):
        """{set: {split: images}}."""
        return {"multi": {"trainval": self.multi_train, "test": self.multi_test},
                "single": {"trainval": self.single_train, "test": self.single_test}}

    def check(self):
        """Raise ValueError for a split too small to hold every class."""
        if min(self.counts["multi"].values()) < 1 or \
                min(self.counts["single"].values()) < len(CLASS_FOLDERS):
            raise ValueError(f"need at least 1 multi-label and {len(CLASS_FOLDERS)} "
                             "single-label images per split")


def class_pools(stamps):
    """{class: [cut-out RGBA arrays]} of one split's (label, path) pairs, classes in CLASS_FOLDERS
    order."""
    pools = {label: [] for label in CLASS_FOLDERS}
    for label, path in stamps:
        pools[label].append(load_cutout(path))
    return pools


def scene_classes(kind, count, rng):
    """Per image, the class indices it shows: 1-3 distinct uniform ones ("multi"), or exactly one,
    every class ``count / C`` times in a random order ("single")."""
    classes = len(CLASS_FOLDERS)
    if kind == "single":
        return [[int(c)] for c in rng.permutation(np.resize(np.arange(classes), count))]
    return [sorted(rng.choice(classes, int(rng.integers(1, 4)), replace=False).tolist())
            for _ in range(count)]


def compose_images(kind, pools, backgrounds, count, rng):
    """Yield (RGB image, [PlacedObject]) of ``count`` scenes of one set ("multi" or "single")."""
    labels = list(CLASS_FOLDERS)
    size_range = SINGLE_SIZE_RANGE if kind == "single" else MULTI_SIZE_RANGE
    for index, chosen in enumerate(scene_classes(kind, count, rng)):
        with Image.open(backgrounds[index % len(backgrounds)]) as photo:
            background = fit_longer_side(np.asarray(photo.convert("RGB")), LONGER_SIDE)
        cutouts = [(labels[c], pools[labels[c]][int(rng.integers(len(pools[labels[c]])))])
                   for c in chosen]
        image, placed = compose_scene(background, cutouts, rng, size_range=size_range)
        if not placed:  # no room in `tries` draws: cannot happen at these sizes, but say so
            raise CollectionError(f"{kind} image {index}: no object could be placed")
        yield image, placed


def write_multi(out, split, images):
    """Write VOC-layout images and annotations of one split; returns {class: positive images}."""
    ids, positives = [], dict.fromkeys(CLASS_FOLDERS, 0)
    for index, (image, placed) in enumerate(images):
        image_id = f"{split}_{index:05d}"
        Image.fromarray(image).save(out / "JPEGImages" / f"{image_id}.jpg", quality=JPEG_QUALITY)
        write_annotation(Annotation(
            filename=f"{image_id}.jpg", width=image.shape[1], height=image.shape[0],
            objects=tuple(VocObject(obj.label, obj.box) for obj in placed)),
            out / "Annotations" / f"{image_id}.xml")
        ids.append(image_id)
        for label in {obj.label for obj in placed}:
            positives[label] += 1
    (out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return positives


def write_single(out, split, images):
    """Write the images and the ``path label`` list file of one split; returns {class: images}."""
    lines, positives = [], dict.fromkeys(CLASS_FOLDERS, 0)
    for index, (image, placed) in enumerate(images):
        name = f"images/{LIST_SPLITS[split]}_{index:05d}.jpg"
        Image.fromarray(image).save(out / name, quality=JPEG_QUALITY)
        lines.append(f"{name} {placed[0].label}\n")
        positives[placed[0].label] += 1
    (out / f"{LIST_SPLITS[split]}.txt").write_text("".join(lines))
    return positives


def build_sets(staging, stamps, photos, counts, seed):
    """Compose both sets into ``staging``; returns {set: {split: {class: positive images}}}."""
    positives = {}
    for kind_index, kind in enumerate(("multi", "single")):
        out = staging / kind
        for folder in (("Annotations", "JPEGImages", "ImageSets/Main") if kind == "multi"
                       else ("images",)):
            (out / folder).mkdir(parents=True)
        (out / "classes.txt").write_text("".join(f"{label}\n" for label in CLASS_FOLDERS))
        writer = write_multi if kind == "multi" else write_single
        for split_index, (split, photo_split) in enumerate(SPLITS.items()):
            rng = np.random.default_rng([seed, kind_index, split_index])
            backgrounds = sorted((photos / photo_split).glob("*.jpg"))
            backgrounds = [backgrounds[i] for i in rng.permutation(len(backgrounds))]
            images = compose_images(kind, stamps[split], backgrounds, counts[kind][split], rng)
            positives.setdefault(kind, {})[split] = writer(out, split, images)
    return positives


def recipe_digest(recipe: LabelledSetsRecipe, stamps_version, photos_recipe) -> str:
    """Hash of everything that determines the sets' content."""
    return content_digest(dict(
        format=FORMAT_VERSION, stamps=stamps_version, photos=photos_recipe,
        classes=CLASS_FOLDERS, seed=recipe.seed, counts=recipe.counts, longer_side=LONGER_SIDE,
        sizes=[MULTI_SIZE_RANGE, SINGLE_SIZE_RANGE]), 16)


def make_labelled_sets(recipe: LabelledSetsRecipe = LabelledSetsRecipe(),
                       force=False) -> tuple[dict, bool]:
    """Make the sets unless they are current; returns the manifest and whether they were built.

    Raises CollectionError (a ValueError) naming what could not be fetched or replaced.
    """
    recipe.check()
    out = Path(recipe.out).resolve()
    photos_recipe, stamps_root, stamps_version = stamp_scene_inputs(recipe.photos, recipe.cache)
    digest = recipe_digest(recipe, stamps_version, photos_recipe)
    manifest = read_manifest(out)
    if not force and manifest is not None and manifest.get("recipe") == digest:
        return manifest, False
    stamps = split_stamps(stamp_files(stamps_root))
    with building_folder(out, "data/make_labelled_sets.py") as staging:
        pools = {split: class_pools(pairs) for split, pairs in stamps.items()}
        positives = build_sets(staging, pools, Path(recipe.photos), recipe.counts, recipe.seed)
        manifest = dict(
            description="ctxpred labelled sets: tuxpaint-stamps-default cut-outs pasted onto the "
                        "default photo collection; made by data/make_labelled_sets.py",
            recipe=digest, packages={STAMPS_PACKAGE: stamps_version},
            classes=list(CLASS_FOLDERS), counts=recipe.counts, positives=positives,
            cutouts={split: {label: len(pool) for label, pool in split_pools.items()}
                     for split, split_pools in pools.items()})
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest, True


def ensure_offline_set(dataset):
    """Build the offline labelled sets when ``dataset`` (paths) names one of them and is missing."""
    folder = Path(dataset[0]).resolve()
    if len(dataset) == 1 and folder.parent == DEFAULT_OUT.resolve() and not folder.exists():
        make_labelled_sets()
