"""Nearest-neighbour figure (paper Fig. 4): random query patches and their nearest fc6 patches.

From every image of --images, --patches-per-image random 96x96 patches are
cut (uniform positions, fixed by --seed; the same patches for every net)
and their fc6 features computed with each net of --weights (input
convention of the released nets: RGB minus the mean, nothing else).
--queries of these patches are drawn at random (seeded, no hand filtering);
for each query and each net, the --k patches with the highest cosine
similarity of fc6 (L2 distance of L2-normalised features) are shown, one
group of columns per net, side by side.

Exclusion rule: neighbours cut from the query's own image are never shown
(they would be the query itself and patches overlapping it). The page
states it.

Search: exact (blocked matrix products) up to --exact-threshold patches
per net, approximate (an HNSW graph, hnswlib) above.

Output: OUT/index.html and the patch images in OUT/patches/ (PNG files
named by the hash of their pixels, written once, shared). Links are
relative: open OUT/index.html from disk, or move OUT as a whole. Each
patch links to its source image when that is a file (a relative link too:
it holds while OUT and the images keep their relative places).

Example:
  python tools/nearest_neighbors.py --images data/photos/heldout --queries 20 --k 10 \\
      --weights random.caffemodel imagenet.caffemodel ours.caffemodel \\
      --labels "random init" ImageNet ours --out runs/nn
"""
import sys
from pathlib import Path

from ctxpred.caffe.env import load_caffe
from ctxpred.cli import (add_gpu, add_images, add_max_pixels, add_seed, add_weights,
                         deploy_prototxt, positive_int, run_tool, tool_parser)
from ctxpred.figures.neighbours import NeighbourFigureSettings, nearest_neighbour_figure
from ctxpred.models.context import NET_NAMES


def parse_args(argv):
    defaults = NeighbourFigureSettings
    parser = tool_parser(__doc__)
    add_images(parser)
    parser.add_argument("--queries", type=positive_int, default=defaults.queries,
                        help="number of random query patches (rows of the figure) "
                             "(default: %(default)s)")
    parser.add_argument("--k", type=positive_int, default=defaults.k,
                        help="neighbours shown per query and net (default: %(default)s)")
    add_weights(parser, multiple=True, extra=", one per net, holding at least the layers up "
                "to --layer; one column group each, in this order")
    parser.add_argument("--net", nargs="+", choices=NET_NAMES, default=["color_dropping"],
                        help="architecture of the weights: one name for all, or one per "
                             "--weights; picks prototxt/<net>/deploy.prototxt "
                             "(default: color_dropping)")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="column-group headings, one per --weights (default: the weight "
                             "files' names)")
    parser.add_argument("--layer", default=defaults.layer,
                        help="blob whose features are compared, as named in the deploy prototxt "
                             "(default: %(default)s, before its ReLU)")
    parser.add_argument("--out", required=True,
                        help="output folder: index.html and patches/ are written into it")
    parser.add_argument("--patches-per-image", type=positive_int,
                        default=defaults.patches_per_image,
                        help="random patches cut from each image: the pool that queries and "
                             "neighbours come from (default: %(default)s)")
    add_max_pixels(parser)
    add_seed(parser, "patch positions, of the choice of queries and of the HNSW graph")
    parser.add_argument("--exact-threshold", type=int, default=defaults.exact_threshold,
                        help="exact search up to this many patches, approximate (HNSW) above "
                             "(default: %(default)s)")
    parser.add_argument("--batch", type=positive_int, default=defaults.batch,
                        help="patches per net.forward (default: %(default)s)")
    add_gpu(parser)
    args = parser.parse_args(argv)
    if len(args.net) not in (1, len(args.weights)):
        parser.error(f"--net takes one name or one per --weights ({len(args.weights)})")
    if args.labels is not None and len(args.labels) != len(args.weights):
        parser.error(f"--labels needs one label per --weights ({len(args.weights)})")
    return args


def settings_of(args):
    """The figure's settings: one net name, deploy prototxt and label per --weights."""
    nets = tuple(args.net * len(args.weights) if len(args.net) == 1 else args.net)
    return NeighbourFigureSettings(
        images=args.images, weights=tuple(args.weights), nets=nets,
        deploys=tuple(deploy_prototxt(net) for net in nets),
        labels=tuple(args.labels or (Path(path).stem for path in args.weights)),
        out=args.out, queries=args.queries, k=args.k, layer=args.layer,
        patches_per_image=args.patches_per_image, max_pixels=args.max_pixels,
        seed=args.seed, exact_threshold=args.exact_threshold, batch=args.batch)


def main(argv=None):
    args = parse_args(argv)
    load_caffe(gpu=args.gpu)
    page, queries = nearest_neighbour_figure(settings_of(args))
    print(f"wrote {page} ({queries} queries, {args.k} neighbours, {len(args.weights)} nets)")


if __name__ == "__main__":
    sys.exit(run_tool(main))
