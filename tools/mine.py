"""Visual data mining (paper Fig. 7): clusters of geometrically verified constellations of patches.

1. Features: every image of --images is covered by a grid of 96x96 patches
   with step --stride pixels; their --layer (fc6) features go through the
   net in batches of --batch, each image decoded once, into OUT/features.h5.
   A rerun with the same images, weights, net and grid reuses that file.
2. Constellations: --constellations 2x2 blocks of grid patches, --spacing
   pixels apart (96: four patches side by side), drawn at random (--seed)
   from all such blocks of all images.
3. For each constellation patch, its --candidates most similar patches by
   cosine similarity among the patches of OTHER images (exact and blocked
   up to --exact-threshold patches, HNSW above; memory bounded either
   way). Each image is scored by the sum over the four patches of their
   best match in it, layout ignored; the --top-images best are kept.
4. Geometric verification: an image verifies when, for every pair of the
   four patches, the displacement between their best matches equals the
   constellation's within --tolerance pixels in x and y.
5. Constellations are ranked by how many of their top images verify; one
   whose images (its own plus its verified ones) lie for more than
   --max-shared in those of a cluster ranked above it is dropped.

Output: OUT/index.html shows the first --clusters clusters, a row each: the
constellation, then its verified matches best first (--shown at most),
each cut from its image as the box holding its four patches; the number
under a match is the mean cosine similarity of its four patches. Patch
images in OUT/patches/ (PNG, named by the hash of their pixels). OUT/summary.json
holds the settings, every cluster's detections (VOC boxes in pixels of
the image files) and, with --annotations, the purity-coverage numbers.

--annotations DIR: VOC XML files named <image stem>.xml. Each cluster's
first --purity-top detections are matched to objects (--match-rule iou:
IoU >= 0.5; centre: the box's centre inside the object); purity is the
fraction of them in the cluster's majority class; coverage the fraction of
annotated object pixels covered by such correct detections of the
clusters so far (ctxpred/figures/mining.py defines both). Writes
OUT/purity_coverage.png and prints the area under the curve.

Example:
  python tools/mine.py --images data/voc2011/JPEGImages --weights ours.caffemodel \\
      --annotations data/voc2011/Annotations --constellations 5000 --out runs/mining
"""
import sys
from pathlib import Path

from ctxpred.caffe.env import load_caffe
from ctxpred.cli import (add_gpu, add_images, add_max_pixels, add_net, add_seed, add_weights,
                         deploy_prototxt, positive_int, run_tool, tool_parser)
from ctxpred.figures.mining import MATCH_RULES
from ctxpred.figures.mining_run import MiningSettings, mine, summary_lines

# (flag, type, help) of the numeric settings; defaults are MiningSettings'.
NUMBERS = (
    ("--stride", positive_int, "pixels between neighbouring grid patches"),
    ("--spacing", positive_int, "pixels between a constellation's patches, a multiple of --stride"),
    ("--constellations", positive_int, "constellations drawn at random from all 2x2 blocks"),
    ("--top-images", positive_int, "best images kept per constellation, verified or not"),
    ("--candidates", positive_int, "nearest patches retrieved per constellation patch; raise "
                                   "it when the page's scored images fall short of --top-images"),
    ("--tolerance", float, "pixels a displacement of the matches may differ, in x and in y"),
    ("--max-shared", float, "drop a constellation sharing more than this fraction of its "
                            "images with a cluster ranked above it"),
    ("--min-verified", positive_int, "verified images a constellation needs to be a cluster"),
    ("--clusters", positive_int, "clusters shown on the page"),
    ("--shown", positive_int, "verified matches shown per cluster"),
    ("--purity-top", positive_int, "detections per cluster counted for purity and coverage"),
    ("--exact-threshold", int, "exact search up to this many patches, approximate (HNSW) above"),
    ("--chunk", positive_int, "constellations searched together; bounds memory"),
    ("--batch", positive_int, "patches per net.forward"),
)


def parse_args(argv):
    parser = tool_parser(__doc__)
    add_images(parser)
    add_weights(parser, extra=" holding the layers up to --layer")
    parser.add_argument("--out", required=True,
                        help="output folder: features.h5, index.html, patches/, summary.json "
                             "(and purity_coverage.png with --annotations)")
    add_net(parser)
    parser.add_argument("--layer", default=MiningSettings.layer,
                        help="blob whose features are matched (default: %(default)s)")
    for flag, kind, text in NUMBERS:
        parser.add_argument(flag, type=kind, help=text + " (default: %(default)s)",
                            default=getattr(MiningSettings, flag[2:].replace("-", "_")))
    parser.add_argument("--annotations", default=None,
                        help="folder of VOC XML files <image stem>.xml: evaluate purity and "
                             "coverage")
    parser.add_argument("--match-rule", choices=MATCH_RULES, default=MiningSettings.match_rule,
                        help="when a detection belongs to an object's class: iou (IoU >= 0.5) "
                             "or centre (its centre inside the object) (default: %(default)s)")
    add_max_pixels(parser)
    add_seed(parser, "constellations and of the HNSW graph")
    add_gpu(parser)
    args = parser.parse_args(argv)
    if args.spacing % args.stride:
        parser.error(f"--spacing ({args.spacing}) must be a multiple of --stride ({args.stride})")
    if args.tolerance < 0:
        parser.error("--tolerance must not be negative")
    if not 0 <= args.max_shared <= 1:
        parser.error("--max-shared must lie in [0, 1]")
    if args.annotations is not None and not Path(args.annotations).is_dir():
        parser.error(f"--annotations folder {args.annotations} does not exist")
    args.deploy = deploy_prototxt(args.net, args.deploy)
    return args


def main(argv=None):
    args = parse_args(argv)
    load_caffe(gpu=args.gpu)
    page, summary = mine(MiningSettings(**{key: value for key, value in vars(args).items()
                                           if key != "gpu"}))
    print("\n".join(summary_lines(page, summary)))


if __name__ == "__main__":
    sys.exit(run_tool(main))
