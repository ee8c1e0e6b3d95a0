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
import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ctxpred.caffe.env import CaffeNotAvailable, load_caffe
from ctxpred.cli import exit_code, fail, run_tool
from ctxpred.data.images import DEFAULT_MAX_PIXELS
from ctxpred.models.context import NET_NAMES, snapshot_param
from ctxpred.features.search import EXACT_THRESHOLD

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True,
                        help="images: folder (recursive), glob, image file, list file or Caffe "
                             "LMDB")
    parser.add_argument("--queries", type=int, default=20,
                        help="number of random query patches (rows of the figure) "
                             "(default: %(default)s)")
    parser.add_argument("--k", type=int, default=10,
                        help="neighbours shown per query and net (default: %(default)s)")
    parser.add_argument("--weights", nargs="+", required=True,
                        help="one caffemodel (binary or HDF5 .h5) per net, holding at least the "
                             "layers up to --layer; one column group each, in this order")
    parser.add_argument("--net", nargs="+", choices=NET_NAMES, default=["color_dropping"],
                        help="architecture of the weights: one name for all, or one per "
                             "--weights; picks prototxt/<net>/deploy.prototxt "
                             "(default: color_dropping)")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="column-group headings, one per --weights (default: the weight "
                             "files' names)")
    parser.add_argument("--layer", default="fc6",
                        help="blob whose features are compared, as named in the deploy prototxt "
                             "(default: %(default)s, before its ReLU)")
    parser.add_argument("--out", required=True,
                        help="output folder: index.html and patches/ are written into it")
    parser.add_argument("--patches-per-image", type=int, default=16,
                        help="random patches cut from each image: the pool that queries and "
                             "neighbours come from (default: %(default)s)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="shrink images above this many pixels to it (aspect kept; JPEGs are "
                             "decoded at a reduced scale, so memory stays bounded) before "
                             "cutting patches (default: %(default)s; 0: full size)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the patch positions, of the choice of queries and of the "
                             "HNSW graph (default: %(default)s)")
    parser.add_argument("--exact-threshold", type=int, default=EXACT_THRESHOLD,
                        help="exact search up to this many patches, approximate (HNSW) above "
                             "(default: %(default)s)")
    parser.add_argument("--batch", type=int, default=64,
                        help="patches per net.forward (default: %(default)s)")
    parser.add_argument("--gpu", type=int, default=None,
                        help="CUDA device to run the nets on (default: the CPU)")
    args = parser.parse_args(argv)
    if len(args.net) not in (1, len(args.weights)):
        parser.error(f"--net takes one name or one per --weights ({len(args.weights)})")
    args.net = args.net * len(args.weights) if len(args.net) == 1 else args.net
    if args.labels is None:
        args.labels = [Path(path).stem for path in args.weights]
    elif len(args.labels) != len(args.weights):
        parser.error(f"--labels needs one label per --weights ({len(args.weights)})")
    for path in args.weights:
        if not Path(path).is_file():
            parser.error(f"--weights file {path} does not exist")
    for flag in ("queries", "k", "patches_per_image", "batch"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    if args.max_pixels and args.max_pixels < 96 * 96:
        parser.error("--max-pixels must be at least 9216 (one 96x96 patch)")
    args.max_pixels = args.max_pixels or None  # 0: full size
    return args


def extract(source, args, net, weights, path):
    """Write the features of the sampled patches of ``source`` with one net to HDF5 ``path``."""
    from ctxpred.features import extraction as features

    extractor = features.FeatureExtractor(REPO / "prototxt" / net / "deploy.prototxt", weights,
                                          args.layer, args.batch, train_param=snapshot_param(net))
    items = features.sampled_patches(source, "random", args.patches_per_image, args.seed,
                                     args.max_pixels)
    with features.open_feature_writer(path, extractor.dim) as writer:
        return features.stream_features(
            extractor, tqdm(items, total=len(source), desc=str(weights), unit="image"), writer)


def search(path, image_ids, queries, args):
    """(exact, indices, similarities) of the --k neighbours of rows ``queries`` in HDF5 ``path``."""
    import h5py

    from ctxpred.features.search import NeighbourIndex

    with h5py.File(path, "r") as file:
        index = NeighbourIndex(file["features"], image_ids, exact_threshold=args.exact_threshold,
                               seed=args.seed)
        return (index.exact, *index.query(file["features"][queries], args.k,
                                          exclude=image_ids[queries]))


def cut_rows(source, names, boxes, rows, max_pixels):
    """{row: (96, 96, 3) uint8} for ``rows``, each image decoded once (as sampled_patches does)."""
    from ctxpred.data.images import decode_rgb_within
    from ctxpred.data.preprocess import crop_patches

    index_of = {source.name(index): index for index in range(len(source))}
    patches = {}
    for name in sorted({names[row] for row in rows}):
        index = index_of[name]
        image, _ = decode_rgb_within(source.read_bytes(index), name, max_pixels)
        mine = [row for row in rows if names[row] == name]
        corners = boxes[mine][:, [1, 0]]
        patches.update(zip(mine, crop_patches(image, corners, int(boxes[mine[0], 2]))))
    return patches


def write_figure(args, source, names, boxes, queries, found):
    """OUT/index.html and OUT/patches/ of the queries and each net's (exact, rows, scores)."""
    from ctxpred.figures import pages

    needed = set(queries.tolist()) | {int(row) for _, rows, _ in found for row in rows.ravel()}
    needed.discard(-1)
    pixels = cut_rows(source, names, boxes, needed, args.max_pixels)
    shown = {row: pages.ShownPatch(pixels[row], names[row], tuple(int(v) for v in boxes[row]))
             for row in needed}
    table = []
    for number, query in enumerate(queries):
        groups = [[None if row < 0 else dataclasses.replace(shown[row], similarity=float(score))
                   for row, score in zip(rows[number], scores[number])]
                  for _, rows, scores in found]
        table.append((shown[query], groups))
    nets = "".join(
        f"<li>{pages.escape(label)}: {pages.escape(net)} net, weights "
        f"{pages.escape(weights)}, {'exact' if exact else 'approximate (HNSW)'} search</li>"
        for label, net, weights, (exact, _, _) in zip(args.labels, args.net, args.weights, found))
    intro = (
        f"<p>{len(queries)} query patches drawn at random (seed {args.seed}, no hand filtering) "
        f"from the {len(names)} random 96x96 patches ({args.patches_per_image} per image) of "
        f"{len(set(names))} images of {pages.escape(args.images)}. For each net, the {args.k} "
        f"patches of the same pool with the highest cosine similarity of "
        f"{pages.escape(args.layer)} (L2 distance of L2-normalised features), most similar "
        f"first; the number under each patch is its similarity.</p>\n"
        f"<p><b>Exclusion rule:</b> neighbours from the query's own image are excluded.</p>\n"
        f"<ul>{nets}</ul>")
    out = Path(args.out)
    return pages.neighbours_page(out / "index.html", pages.PatchStore(out / "patches"),
                                 "Nearest neighbours", intro, args.labels, table)


def main(argv=None):
    args = parse_args(argv)
    try:
        load_caffe(gpu=args.gpu)
    except CaffeNotAvailable as error:
        return fail(error)
    # Imported once the arguments are valid: ctxpred.features.extraction loads pycaffe.
    import h5py

    from ctxpred.data.images import open_source

    try:
        source = open_source(args.images)
    except ValueError as error:
        return fail(error, exit_code(error))
    with tempfile.TemporaryDirectory() as folder:
        paths = [Path(folder) / f"net{number}.h5" for number in range(len(args.weights))]
        try:
            for net, weights, path in zip(args.net, args.weights, paths):
                summary = extract(source, args, net, weights, path)
        except (OSError, ValueError) as error:
            return fail(error, exit_code(error))
        for name, reason in summary.skipped.items():
            print(f"skipped {name}: {reason}")
        with h5py.File(paths[0], "r") as file:  # the same patches, in order, for every net
            names = [name.decode() for name in file["image"][:]]
            boxes = file["box"][:]
        if len(set(names)) < 2:
            return fail(f"patches from at least 2 images are needed (found {len(set(names))}):"
                        " neighbours from the query's own image are excluded")
        image_ids = np.unique(names, return_inverse=True)[1]
        rng = np.random.default_rng(args.seed)
        queries = np.sort(rng.choice(len(names), size=min(args.queries, len(names)),
                                     replace=False))
        found = [search(path, image_ids, queries, args) for path in paths]
    page = write_figure(args, source, names, boxes, queries, found)
    print(f"wrote {page} ({len(queries)} queries, {args.k} neighbours, {len(found)} nets)")


if __name__ == "__main__":
    sys.exit(run_tool(main))
