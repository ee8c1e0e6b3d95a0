#!/usr/bin/env python3
"""Build ctxpred's offline labelled sets for the frozen-feature protocols (tools/eval_frozen.py).

The same ingredients as the detection set (data/make_detection_set.py):
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
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ctxpred.data.collection import (CollectionError, default_cache_dir, fetch_package,
                                     make_collection, read_manifest, remove_stale_builds,
                                     replace_folder)
from ctxpred.detection.detection_set import (CLASS_FOLDERS, JPEG_QUALITY, SPLITS, STAMPS_PACKAGE,
                                             STAMPS_ROOT, load_cutout, split_stamps, stamp_files)
from ctxpred.detection.synthetic_scenes import compose_scene, fit_longer_side
from ctxpred.detection.voc import Annotation, VocObject, write_annotation

DATA_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = DATA_DIR / "labelled"
FORMAT_VERSION = 1
LONGER_SIDE = 300
MULTI_SIZE_RANGE = (0.25, 0.55)   # object's longer side / the image's shorter side
SINGLE_SIZE_RANGE = (0.4, 0.75)
LIST_SPLITS = {"trainval": "train", "test": "test"}   # VOC split -> list file name


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


def recipe_digest(args, stamps_version, photos_recipe) -> str:
    """Hash of everything that determines the sets' content."""
    recipe = dict(format=FORMAT_VERSION, stamps=stamps_version, photos=photos_recipe,
                  classes=CLASS_FOLDERS, seed=args.seed, counts=counts_of(args),
                  longer_side=LONGER_SIDE, sizes=[MULTI_SIZE_RANGE, SINGLE_SIZE_RANGE])
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def counts_of(args):
    return {"multi": {"trainval": args.multi_train, "test": args.multi_test},
            "single": {"trainval": args.single_train, "test": args.single_test}}


def build(args) -> tuple[dict, bool]:
    """Make the sets unless they are current; return the manifest and whether they were built."""
    out = args.out.resolve()
    photos_manifest, _ = make_collection(args.photos, cache_dir=args.cache)
    stamps_root, stamps_version = fetch_package(STAMPS_PACKAGE, args.cache)
    recipe = recipe_digest(args, stamps_version, photos_manifest["recipe"])
    manifest = read_manifest(out)
    if not args.force and manifest is not None and manifest.get("recipe") == recipe:
        return manifest, False
    if out.exists() and manifest is None and any(out.iterdir()):
        raise CollectionError(f"{out} exists, is not empty and has no manifest.json: not "
                              "replacing a folder this script did not make")
    stamps = split_stamps(stamp_files(stamps_root / STAMPS_ROOT))
    remove_stale_builds(out)
    staging = out.parent / f".{out.name}.building-{os.getpid()}"
    try:
        staging.mkdir(parents=True)
        (staging / ".gitignore").write_text("# made by data/make_labelled_sets.py\n*\n")
        pools = {split: class_pools(pairs) for split, pairs in stamps.items()}
        positives = build_sets(staging, pools, args.photos, counts_of(args), args.seed)
        manifest = dict(
            description="ctxpred labelled sets: tuxpaint-stamps-default cut-outs pasted onto the "
                        "default photo collection; made by data/make_labelled_sets.py",
            recipe=recipe, packages={STAMPS_PACKAGE: stamps_version},
            classes=list(CLASS_FOLDERS), counts=counts_of(args), positives=positives,
            cutouts={split: {label: len(pool) for label, pool in split_pools.items()}
                     for split, split_pools in pools.items()})
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
    for kind, train, test in (("multi", 700, 700), ("single", 700, 700)):
        parser.add_argument(f"--{kind}-train", type=int, default=train,
                            help=f"{kind}-label training images (default: %(default)s)")
        parser.add_argument(f"--{kind}-test", type=int, default=test,
                            help=f"{kind}-label test images (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of backgrounds, classes, cut-outs, sizes and places "
                             "(default: 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if current")
    args = parser.parse_args(argv)
    if min(counts_of(args)["multi"].values()) < 1 or \
            min(counts_of(args)["single"].values()) < len(CLASS_FOLDERS):
        parser.error(f"need at least 1 multi-label and {len(CLASS_FOLDERS)} single-label images "
                     "per split")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        manifest, built = build(args)
    except CollectionError as error:
        print(f"make_labelled_sets: error: {error}", file=sys.stderr)
        return 2
    print(f"{'built' if built else 'up to date:'} {args.out.resolve()}: {manifest['counts']} "
          f"({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
