#!/usr/bin/env python3
"""Build ctxpred's small VOC-format detection set from real photographs.

Photographed object cut-outs of Debian's tuxpaint-stamps-default are pasted
onto the default photo collection (data/photos) at random places; the pasted
boxes are the VOC annotations, and selective search gives the proposals.
Splits share no cut-out and no background photo. See
ctxpred/detection/detection_set.py for the classes and the recipe.

Output (OUT, default data/detection/), the layout of the VOC devkit:
  Annotations/<id>.xml  JPEGImages/<id>.jpg  ImageSets/Main/{trainval,test}.txt
  classes.txt  proposals.npz  manifest.json (recipe, counts, package versions)
A set that matches its recipe is left as it is; a build is renamed into
place only when complete.
"""
import argparse
import logging
import os
import sys
import time

from ctxpred.cli import add_set_builder_flags
from ctxpred.data.collection import CollectionError
from ctxpred.detection.detection_set import DEFAULT_OUT, DetectionSetRecipe, make_detection_set

log = logging.getLogger("make_detection_set")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__)
    add_set_builder_flags(parser, DEFAULT_OUT)
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
    recipe = DetectionSetRecipe(args.out, args.photos, args.cache, args.trainval, args.test,
                                args.longer_side, args.seed, args.workers)
    try:
        manifest, built = make_detection_set(recipe, args.force)
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
