"""Nearest-neighbour quality as a number: rank-1 retrieval of augmented copies.

The protocol is ctxpred.evaluation.retrieval_proxy's.

From each image of --images, --per-image query patches (96x96, seeded
positions) are cut, and for each an augmented copy (its key): the window
moved by up to --max-shift pixels, rescaled by up to --max-scale and each
RGB channel multiplied by a gain within 1 +- --colour-gain. For each net of
--weights, a query is a hit when, by cosine similarity of --layer, its own
key is more similar to it than every key of the other images (keys of the
query's own image are left out). Every net sees the same queries and keys.

Printed per net: rank-1 accuracy with its 95% Wilson interval, chance
level, median rank of the own key (0 = hit); then, for every net after the
first, its accuracy minus the first net's with a 95% bootstrap interval
that resamples whole images (--resamples, seeded).

BatchNorm: the deploy prototxt has no BatchNorm layers. A snapshot of a
BatchNorm training net holds bn3..bn6; they are folded into conv3..fc6
first (ctxpred.weights.surgery.fold_batchnorm, using --train-prototxt or the
training net of --net). That needs statistics gathered under the
snapshot's own weights (e.g. runs/demo/*_eval.caffemodel, written by the
demo with ctxpred.training.loop.recompute_batchnorm_statistics); BatchNorm
layers without statistics are ignored.

Example (the demo's trained net against its initialisation):
  python tools/neighbour_proxy.py --images data/photos/heldout --per-image 16 \\
      --train-prototxt runs/demo/train.prototxt \\
      --weights runs/demo/initial_eval.caffemodel runs/demo/trained_eval.caffemodel \\
      --labels "random init" "trained 472 steps"
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ctxpred.caffe.env import CaffeNotAvailable, load_caffe
from ctxpred.cli import exit_code, fail, run_tool
from ctxpred.data.images import DEFAULT_MAX_PIXELS
from ctxpred.models.context import NET_NAMES, snapshot_param

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True,
                        help="images: folder (recursive), glob, image file, list file or Caffe "
                             "LMDB; at least 2 usable ones")
    parser.add_argument("--weights", nargs="+", required=True,
                        help="caffemodels (binary or HDF5 .h5) to compare; the first is the "
                             "reference of the differences")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="one name per --weights (default: the files' names)")
    parser.add_argument("--net", choices=NET_NAMES, default="color_dropping",
                        help="architecture: picks prototxt/<net>/deploy.prototxt "
                             "(default: %(default)s)")
    parser.add_argument("--train-prototxt", default=None,
                        help="training prototxt of the weights: fold its BatchNorm layers into "
                             "the layers before them (default: the training net of --net as "
                             "ctxpred generates it)")
    parser.add_argument("--layer", default="fc6",
                        help="blob whose features are compared (default: %(default)s, before "
                             "its ReLU)")
    parser.add_argument("--per-image", type=int, default=16,
                        help="queries per image (default: %(default)s)")
    parser.add_argument("--max-shift", type=int, default=12,
                        help="largest move of a key's centre along y and x, pixels "
                             "(default: %(default)s)")
    parser.add_argument("--max-scale", type=float, default=1.2,
                        help="a key's window side is 96 * s, s in [1/MAX, MAX] "
                             "(default: %(default)s)")
    parser.add_argument("--colour-gain", type=float, default=0.15,
                        help="each RGB channel of a key is multiplied by a factor in "
                             "[1 - G, 1 + G] (default: %(default)s)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="shrink images above this many pixels to it (aspect kept; JPEGs are "
                             "decoded at a reduced scale, so memory stays bounded) before "
                             "cutting patches (default: %(default)s; 0: full size)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of positions, augmentations and the bootstrap "
                             "(default: %(default)s)")
    parser.add_argument("--resamples", type=int, default=2000,
                        help="bootstrap resamples of the differences (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=64,
                        help="patches per net.forward (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write every number to this file")
    parser.add_argument("--gpu", type=int, default=None,
                        help="CUDA device to run the nets on (default: the CPU)")
    args = parser.parse_args(argv)
    if args.labels is None:
        args.labels = [Path(path).stem for path in args.weights]
    elif len(args.labels) != len(args.weights):
        parser.error(f"--labels needs one label per --weights ({len(args.weights)})")
    for path in args.weights + ([args.train_prototxt] if args.train_prototxt else []):
        if not Path(path).is_file():
            parser.error(f"{path} does not exist")
    for flag in ("per_image", "resamples", "batch"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    args.max_pixels = args.max_pixels or None  # 0: full size
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        load_caffe(gpu=args.gpu)
    except CaffeNotAvailable as error:
        return fail(error)
    # Imported once the arguments are valid: these load pycaffe.
    from ctxpred.features.extractor import FeatureExtractor
    from ctxpred.data.images import open_source
    from ctxpred.evaluation.retrieval_proxy import (Augmentation, extractor_ranks, paired_difference,
                                         retrieval_pairs, retrieval_score)
    from ctxpred.caffe.netparam import read_net_param

    deploy = REPO / "prototxt" / args.net / "deploy.prototxt"
    try:
        augmentation = Augmentation(args.max_shift, args.max_scale, args.colour_gain)
        pairs = retrieval_pairs(open_source(args.images), args.per_image, augmentation,
                                args.seed, args.max_pixels)
        train_param = (read_net_param(args.train_prototxt) if args.train_prototxt
                       else snapshot_param(args.net))
        ranks = []
        for path in args.weights:
            extractor = FeatureExtractor(deploy, path, args.layer, args.batch,
                                         train_param=train_param)
            if extractor.ignored_layers:
                print(f"{path}: layers not in the deploy net, ignored: "
                      f"{', '.join(extractor.ignored_layers)}")
            ranks.append(extractor_ranks(extractor, pairs))
    except (OSError, ValueError) as error:
        return fail(error, exit_code(error))
    for name, reason in pairs.skipped.items():
        print(f"skipped {name}: {reason}")
    images = len(np.unique(pairs.image_ids))
    print(f"{len(pairs.image_ids)} queries from {images} images of {args.images}; keys moved "
          f"<= {args.max_shift} px, scaled <= {args.max_scale:g}x, colour gain <= "
          f"{args.colour_gain:g}; {args.layer}, cosine similarity")
    results = {"queries": len(pairs.image_ids), "images": images, "nets": [],
               "options": {key: value for key, value in vars(args).items() if key != "json"}}
    print(f"{'net':30s} {'rank-1':>7s} {'95% Wilson':>17s} {'chance':>7s} {'median rank':>11s}")
    for label, path, net_ranks in zip(args.labels, args.weights, ranks):
        score = retrieval_score(net_ranks, pairs.image_ids)
        print(f"{label:30s} {score.accuracy:7.1%} [{score.low:6.1%}, {score.high:6.1%}] "
              f"{score.chance:7.2%} {score.median_rank:11.1f}")
        results["nets"].append({"label": label, "weights": path, **vars(score)})
    rng = np.random.default_rng(args.seed)
    for label, net_ranks, entry in zip(args.labels[1:], ranks[1:], results["nets"][1:]):
        difference, low, high = paired_difference(net_ranks == 0, ranks[0] == 0,
                                                  pairs.image_ids, rng, args.resamples)
        print(f"{label} minus {args.labels[0]}: {100 * difference:+.1f} points, 95% bootstrap "
              f"interval over images [{100 * low:+.1f}, {100 * high:+.1f}]")
        entry["minus_first"] = {"difference": difference, "low": low, "high": high}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
