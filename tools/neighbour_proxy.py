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
demo with ctxpred.training.context_run.recompute_batchnorm_statistics); BatchNorm
layers without statistics are ignored.

Example (the demo's trained net against its initialisation):
  python tools/neighbour_proxy.py --images data/photos/heldout --per-image 16 \\
      --train-prototxt runs/demo/train.prototxt \\
      --weights runs/demo/initial_eval.caffemodel runs/demo/trained_eval.caffemodel \\
      --labels "random init" "trained 472 steps"
"""
import json
import sys
from pathlib import Path

from ctxpred.caffe.env import load_caffe
from ctxpred.cli import (add_gpu, add_images, add_max_pixels, add_net, add_seed, add_weights,
                         deploy_prototxt, existing_file, positive_int, run_tool, tool_parser)
from ctxpred.evaluation.retrieval_proxy import ProxySettings, compare_nets, report_lines


def parse_args(argv):
    defaults = ProxySettings
    parser = tool_parser(__doc__)
    add_images(parser, extra="; at least 2 usable ones")
    add_weights(parser, multiple=True, extra=" to compare; the first is the reference of the "
                "differences")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="one name per --weights (default: the files' names)")
    add_net(parser, deploy=False)
    parser.add_argument("--train-prototxt", default=None, type=existing_file,
                        help="training prototxt of the weights: fold its BatchNorm layers into "
                             "the layers before them (default: the training net of --net as "
                             "ctxpred generates it)")
    parser.add_argument("--layer", default=defaults.layer,
                        help="blob whose features are compared (default: %(default)s, before "
                             "its ReLU)")
    parser.add_argument("--per-image", type=positive_int, default=defaults.per_image,
                        help="queries per image (default: %(default)s)")
    parser.add_argument("--max-shift", type=int, default=defaults.max_shift,
                        help="largest move of a key's centre along y and x, pixels "
                             "(default: %(default)s)")
    parser.add_argument("--max-scale", type=float, default=defaults.max_scale,
                        help="a key's window side is 96 * s, s in [1/MAX, MAX] "
                             "(default: %(default)s)")
    parser.add_argument("--colour-gain", type=float, default=defaults.colour_gain,
                        help="each RGB channel of a key is multiplied by a factor in "
                             "[1 - G, 1 + G] (default: %(default)s)")
    add_max_pixels(parser)
    add_seed(parser, "positions, augmentations and the bootstrap")
    parser.add_argument("--resamples", type=positive_int, default=defaults.resamples,
                        help="bootstrap resamples of the differences (default: %(default)s)")
    parser.add_argument("--batch", type=positive_int, default=defaults.batch,
                        help="patches per net.forward (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write every number to this file")
    add_gpu(parser)
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.weights):
        parser.error(f"--labels needs one label per --weights ({len(args.weights)})")
    return args


def main(argv=None):
    args = parse_args(argv)
    load_caffe(gpu=args.gpu)
    results = compare_nets(ProxySettings(
        images=args.images, weights=tuple(args.weights), deploy=deploy_prototxt(args.net),
        labels=tuple(args.labels or (Path(path).stem for path in args.weights)),
        net=args.net, train_prototxt=args.train_prototxt, layer=args.layer,
        per_image=args.per_image, max_shift=args.max_shift, max_scale=args.max_scale,
        colour_gain=args.colour_gain, max_pixels=args.max_pixels, seed=args.seed,
        resamples=args.resamples, batch=args.batch))
    print("\n".join(report_lines(results)))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(run_tool(main))
