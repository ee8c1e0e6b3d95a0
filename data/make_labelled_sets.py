#!/usr/bin/env python3
"""Build ctxpred's offline labelled sets for the frozen-feature protocols (tools/eval_frozen.py).

Object cut-outs of Debian's tuxpaint-stamps-default (7 classes) pasted onto
the default photo collection, as for the detection set; train and test share
no cut-out and no photo. Two sets in OUT (default data/labelled/):
  multi/   multi-label, VOC layout, 1-3 objects per image (VOC07 SVM, low-shot)
  single/  single-label, one object per image, list files train.txt and
           test.txt of "images/<id>.jpg <class>" lines (kNN, linear probe)
Seeded and byte-for-byte repeatable; a set matching its recipe is left as it
is; a build is renamed into place only when complete. See
ctxpred/evaluation/labelled_sets.py for the recipe.
"""
import argparse
import sys
import time

from ctxpred.cli import add_set_builder_flags
from ctxpred.data.collection import CollectionError
from ctxpred.evaluation.labelled_sets import (DEFAULT_OUT, LabelledSetsRecipe,
                                              make_labelled_sets)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__)
    add_set_builder_flags(parser, DEFAULT_OUT)
    for kind in ("multi", "single"):
        parser.add_argument(f"--{kind}-train", type=int, default=700,
                            help=f"{kind}-label training images (default: %(default)s)")
        parser.add_argument(f"--{kind}-test", type=int, default=700,
                            help=f"{kind}-label test images (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of backgrounds, classes, cut-outs, sizes and places "
                             "(default: 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if current")
    args = parser.parse_args(argv)
    args.recipe = LabelledSetsRecipe(args.out, args.photos, args.cache, args.multi_train,
                                     args.multi_test, args.single_train, args.single_test,
                                     args.seed)
    try:
        args.recipe.check()
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        manifest, built = make_labelled_sets(args.recipe, args.force)
    except CollectionError as error:
        print(f"make_labelled_sets: error: {error}", file=sys.stderr)
        return 2
    print(f"{'built' if built else 'up to date:'} {args.out.resolve()}: {manifest['counts']} "
          f"({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
