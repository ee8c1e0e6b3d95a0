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
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ctxpred.caffe.env import CaffeNotAvailable, load_caffe
from ctxpred.cli import exit_code, fail, run_tool
from ctxpred.data.images import DEFAULT_MAX_PIXELS
from ctxpred.figures.mining import MATCH_RULES
from ctxpred.models.context import NET_NAMES, PATCH, snapshot_param
from ctxpred.features.search import EXACT_THRESHOLD

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True,
                        help="images: folder (recursive), glob, image file, list file or Caffe "
                             "LMDB")
    parser.add_argument("--weights", required=True,
                        help="caffemodel (binary or HDF5 .h5) holding the layers up to --layer")
    parser.add_argument("--out", required=True,
                        help="output folder: features.h5, index.html, patches/, summary.json "
                             "(and purity_coverage.png with --annotations)")
    parser.add_argument("--net", choices=NET_NAMES, default="color_dropping",
                        help="architecture: picks prototxt/<net>/deploy.prototxt "
                             "(default: %(default)s)")
    parser.add_argument("--deploy", default=None,
                        help="deploy prototxt to use instead of the one --net picks")
    parser.add_argument("--layer", default="fc6",
                        help="blob whose features are matched (default: %(default)s)")
    parser.add_argument("--stride", type=int, default=48,
                        help="pixels between neighbouring grid patches (default: %(default)s)")
    parser.add_argument("--spacing", type=int, default=96,
                        help="pixels between the patches of a constellation, a multiple of "
                             "--stride (default: %(default)s: four patches side by side)")
    parser.add_argument("--constellations", type=int, default=1000,
                        help="constellations drawn at random from all 2x2 blocks "
                             "(default: %(default)s)")
    parser.add_argument("--top-images", type=int, default=100,
                        help="best images by appearance kept per constellation, of which the "
                             "verified ones are counted (default: %(default)s)")
    parser.add_argument("--candidates", type=int, default=1000,
                        help="nearest patches retrieved per constellation patch; an image "
                             "with no patch among them is not scored. The page says how many "
                             "images were scored per cluster: raise this when it falls short "
                             "of --top-images (default: %(default)s)")
    parser.add_argument("--tolerance", type=float, default=48,
                        help="pixels a pairwise displacement of the matches may differ from "
                             "the constellation's, in x and in y (default: %(default)s, half "
                             "a patch)")
    parser.add_argument("--max-shared", type=float, default=0.5,
                        help="drop a constellation when more than this fraction of its images "
                             "belong to a cluster ranked above it (default: %(default)s)")
    parser.add_argument("--min-verified", type=int, default=1,
                        help="verified images a constellation needs to be a cluster "
                             "(default: %(default)s)")
    parser.add_argument("--clusters", type=int, default=30,
                        help="clusters shown on the page (default: %(default)s)")
    parser.add_argument("--shown", type=int, default=10,
                        help="verified matches shown per cluster (default: %(default)s)")
    parser.add_argument("--annotations", default=None,
                        help="folder of VOC XML files <image stem>.xml: evaluate purity and "
                             "coverage")
    parser.add_argument("--purity-top", type=int, default=10,
                        help="detections per cluster counted for purity and coverage "
                             "(default: %(default)s)")
    parser.add_argument("--match-rule", choices=MATCH_RULES, default="iou",
                        help="when a detection belongs to an object's class: iou (IoU >= 0.5) "
                             "or centre (its centre inside the object) (default: %(default)s)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="shrink images above this many pixels to it (aspect kept; JPEGs are "
                             "decoded at a reduced scale, so memory stays bounded) before "
                             "cutting patches (default: %(default)s; 0: full size)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the constellations and of the HNSW graph "
                             "(default: %(default)s)")
    parser.add_argument("--exact-threshold", type=int, default=EXACT_THRESHOLD,
                        help="exact search up to this many patches, approximate (HNSW) above "
                             "(default: %(default)s)")
    parser.add_argument("--chunk", type=int, default=256,
                        help="constellations searched together; bounds memory "
                             "(default: %(default)s)")
    parser.add_argument("--batch", type=int, default=64,
                        help="patches per net.forward (default: %(default)s)")
    parser.add_argument("--gpu", type=int, default=None,
                        help="CUDA device to run the net on (default: the CPU)")
    args = parser.parse_args(argv)
    for flag in ("stride", "spacing", "constellations", "top_images", "candidates", "clusters",
                 "shown", "purity_top", "min_verified", "chunk", "batch"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    if args.spacing % args.stride:
        parser.error(f"--spacing ({args.spacing}) must be a multiple of --stride ({args.stride})")
    if args.tolerance < 0:
        parser.error("--tolerance must not be negative")
    if not 0 <= args.max_shared <= 1:
        parser.error("--max-shared must lie in [0, 1]")
    if args.max_pixels and args.max_pixels < PATCH * PATCH:
        parser.error(f"--max-pixels must be at least {PATCH * PATCH} (one patch)")
    if not Path(args.weights).is_file():
        parser.error(f"--weights file {args.weights} does not exist")
    if args.annotations is not None and not Path(args.annotations).is_dir():
        parser.error(f"--annotations folder {args.annotations} does not exist")
    args.deploy = args.deploy or str(REPO / "prototxt" / args.net / "deploy.prototxt")
    args.max_pixels = args.max_pixels or None  # 0: full size
    return args


def feature_settings(args):
    """What features.h5 depends on, as strings: a file with other settings is recomputed."""
    weights = Path(args.weights).resolve()
    return {"images": str(args.images), "weights": str(weights),
            "weights_modified": str(weights.stat().st_mtime_ns), "deploy": str(args.deploy),
            "layer": args.layer, "stride": str(args.stride), "max_pixels": str(args.max_pixels)}


def extract(args, source, path):
    """features.h5 of the grid patches of every image, unless one with the same settings exists."""
    import h5py

    from ctxpred.features.extraction import (FeatureExtractor, open_feature_writer, sampled_patches,
                                  stream_features)

    settings = feature_settings(args)
    if path.is_file():
        with h5py.File(path, "r") as file:
            if {key: file.attrs.get(key) for key in settings} == settings:
                print(f"reusing {path}")
                return
    extractor = FeatureExtractor(args.deploy, args.weights, args.layer, args.batch,
                                 train_param=snapshot_param(args.net))
    items = sampled_patches(source, "grid", max_pixels=args.max_pixels, patch=extractor.patch,
                            step=args.stride)
    with open_feature_writer(path, extractor.dim, settings) as writer:
        summary = stream_features(
            extractor, tqdm(items, total=len(source), desc="features", unit="image"), writer)
    for name, reason in summary.skipped.items():
        print(f"skipped {name}: {reason}")


def match(args, features, image_ids, corners, constellations):
    """(Candidates, verified (C, T) bool) of ``constellations``, searched --chunk at a time."""
    from ctxpred.figures.mining import Candidates, top_images, verified_matches
    from ctxpred.features.search import NeighbourIndex

    index = NeighbourIndex(features, image_ids, exact_threshold=args.exact_threshold,
                           seed=args.seed)
    parts = []
    for start in tqdm(range(0, len(constellations), args.chunk), desc="matching", unit="chunk"):
        chunk = constellations[start:start + args.chunk]
        rows, inverse = np.unique(chunk, return_inverse=True)
        queries = features[rows][inverse.reshape(-1)]  # h5py reads increasing rows only
        indices, similarities = index.query(queries, args.candidates,
                                            exclude=image_ids[chunk.reshape(-1)])
        parts.append(top_images(indices.reshape(len(chunk), 4, -1),
                                similarities.reshape(len(chunk), 4, -1), image_ids,
                                args.top_images))
    candidates = Candidates.concatenate(parts)
    return candidates, verified_matches(candidates, corners, constellations, args.tolerance)


def crops(source, names, wanted, max_pixels):
    """{(image id, x0, y0, x1, y1): pixels} of ``wanted`` boxes, each image decoded once."""
    from ctxpred.data.images import decode_rgb_within

    index_of = {source.name(index): index for index in range(len(source))}
    pixels = {}
    for image in sorted({key[0] for key in wanted}):
        decoded, _ = decode_rgb_within(source.read_bytes(index_of[names[image]]), names[image],
                                       max_pixels)
        for key in wanted:
            if key[0] == image:
                x0, y0, x1, y1 = key[1:]
                pixels[key] = np.ascontiguousarray(decoded[y0:y1, x0:x1])
    return pixels


def write_page(args, source, names, corners, constellations, clusters, counts):
    """OUT/index.html and OUT/patches/ of the first --clusters clusters; returns the page."""
    from ctxpred.figures import pages
    from ctxpred.figures.mining import union_boxes

    out = Path(args.out)
    page = out / "index.html"
    shown = clusters[:args.clusters]
    rows = []  # per cluster: [(image id, box)], the constellation first, then its matches
    for cluster in shown:
        boxes = union_boxes(corners[np.vstack([cluster.rows, cluster.matches[:args.shown]])])
        images = [cluster.source, *cluster.images[:args.shown].tolist()]
        rows.append([(image, tuple(int(v) for v in box)) for image, box in zip(images, boxes)])
    pixels = crops(source, names, {(image, *box) for row in rows for image, box in row},
                   args.max_pixels)
    store = pages.PatchStore(out / "patches")
    lines = ["<table>", "<tr><th>cluster</th><th>constellation</th>"
             f'<th colspan="{args.shown}">verified matches, best first</th></tr>']
    for rank, (cluster, row) in enumerate(zip(shown, rows), start=1):
        cells = [f"<td>#{rank}<br>{len(cluster.images)} of {counts[cluster.constellation]} "
                 "verified</td>"]
        for place, (image, (x0, y0, x1, y1)) in enumerate(row):
            similarity = None if place == 0 else float(cluster.scores[place - 1]) / 4
            patch = pages.ShownPatch(pixels[image, x0, y0, x1, y1], names[image],
                                     (x0, y0, x1 - x0, y1 - y0), similarity)
            cells.append(pages.patch_cell(store, page, patch, "query" if place == 0 else ""))
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</table>")
    intro = (
        f"<p>{len(clusters)} clusters from {len(constellations)} random constellations "
        f"(seed {args.seed}) of four 96x96 patches {args.spacing} pixels apart on a grid of "
        f"step {args.stride} over {len(names)} images of {pages.escape(args.images)}; the first "
        f"{len(shown)} shown. For each constellation, the (up to) {args.top_images} images whose "
        f"patches match its four patches best by cosine similarity of "
        f"{pages.escape(args.layer)} (layout ignored, own image excluded); a match verifies "
        f"when its four patches are laid out like the constellation's within "
        f"{args.tolerance:g} pixels. Clusters are ranked by their number of verified images. "
        f"Each match is the box holding its four patches; the number under it is the mean "
        f"similarity of the four.</p>\n<p>Weights {pages.escape(args.weights)}, deploy net "
        f"{pages.escape(args.deploy)}.</p>")
    return pages.write_page(page, "Visual data mining", intro + "\n" + "\n".join(lines))


def voc_boxes(rows, corners, scales):
    """(..., 4) patch rows -> (..., 4) VOC boxes holding them, in pixels of the image files.

    The grid's pixels are those of the decoded image shrunk by --max-pixels
    (0-based, exclusive ends); VOC boxes are 1-based with inclusive ends.
    """
    from ctxpred.figures.mining import union_boxes

    boxes = union_boxes(corners[rows]).astype(np.float64)
    return boxes / scales[rows[..., 0]][..., None] + [1, 1, 0, 0]


def cluster_summaries(clusters, names, corners, scales, counts):
    """JSON-ready rows of the clusters: their constellation and detections as VOC boxes."""
    return [{"rank": rank, "image": names[cluster.source],
             "constellation_box": voc_boxes(cluster.rows, corners, scales).tolist(),
             "verified": len(cluster.images), "top_images": int(counts[cluster.constellation]),
             "detections": [{"image": names[image], "box": box.tolist(), "score": float(score)}
                            for image, box, score in zip(
                                cluster.images, voc_boxes(cluster.matches, corners, scales),
                                cluster.scores)]}
            for rank, cluster in enumerate(clusters, start=1)]


def evaluate(args, names, found):
    """PurityCoverage of the clusters against the XML files of --annotations; writes the plot."""
    from ctxpred.figures.mining import plot_purity_coverage, purity_coverage
    from ctxpred.detection.voc import read_annotation

    folder = Path(args.annotations)
    annotations = {}
    for image, name in enumerate(names):
        path = folder / f"{Path(name).stem}.xml"
        if path.is_file():
            annotations[image] = read_annotation(path)
    if not annotations:
        raise ValueError(f"{folder} holds no <image stem>.xml file for any image of "
                         f"{args.images}")
    curve = purity_coverage(found, annotations, args.purity_top, args.match_rule)
    plot_purity_coverage(curve, Path(args.out) / "purity_coverage.png",
                         f"Purity-coverage, {len(annotations)} annotated images")
    return curve, len(annotations)


def main(argv=None):
    args = parse_args(argv)
    try:
        load_caffe(gpu=args.gpu)
    except CaffeNotAvailable as error:
        return fail(error)
    # Imported once the arguments are valid: these load pycaffe.
    import h5py

    from ctxpred.data.images import open_source
    from ctxpred.figures.mining import constellation_anchors, rank_clusters, sample_constellations

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        source = open_source(args.images)
        extract(args, source, out / "features.h5")
        with h5py.File(out / "features.h5", "r") as file:
            row_names = [name.decode() for name in file["image"][:]]
            boxes = file["box"][:]
            row_scales = file["scale"][:]
            names, image_ids = np.unique(row_names, return_inverse=True)
            if len(names) < 2:
                raise ValueError(f"patches from at least 2 images are needed (found "
                                 f"{len(names)}): matches in a constellation's own image are "
                                 "excluded")
            corners = boxes[:, [1, 0]]
            anchors = constellation_anchors(image_ids, corners, args.spacing)
            if len(anchors) == 0:
                raise ValueError(f"no image holds a constellation: images need at least "
                                 f"{PATCH + args.spacing} pixels each way")
            constellations = sample_constellations(anchors, args.constellations,
                                                   np.random.default_rng(args.seed))
            candidates, verified = match(args, file["features"], image_ids, corners,
                                         constellations)
        clusters = rank_clusters(verified, candidates, constellations, image_ids,
                                 args.max_shared, args.min_verified)
        counts = (candidates.images >= 0).sum(axis=1)
        page = write_page(args, source, names, corners, constellations, clusters, counts)
        summary = {
            "settings": vars(args), "images": len(names), "patches": len(row_names),
            "anchors": len(anchors), "constellations": len(constellations),
            "clusters_found": len(clusters),
            "clusters": cluster_summaries(clusters, names, corners, row_scales, counts)}
        if args.annotations is not None:
            found = [(cluster.images, voc_boxes(cluster.matches, corners, row_scales))
                     for cluster in clusters]
            curve, annotated = evaluate(args, names, found)
            summary["purity_coverage"] = {
                "auc": curve.auc, "annotated_images": annotated, "top_n": curve.top_n,
                "rule": curve.rule, "purity": curve.purity.tolist(),
                "majority": list(curve.majority), "purity_curve": curve.purity_curve.tolist(),
                "coverage": curve.coverage.tolist()}
    except (OSError, ValueError) as error:
        return fail(error, exit_code(error))
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(f"wrote {page}: {len(clusters)} clusters from {len(constellations)} constellations "
          f"over {len(names)} images ({summary['seconds']} s)")
    if args.annotations is not None:
        print(f"purity-coverage AUC {curve.auc:.3f} (top {curve.top_n} detections per cluster, "
              f"rule {curve.rule}, {len(clusters)} clusters, final coverage "
              f"{curve.coverage[-1] if len(curve.coverage) else 0:.3f}); "
              f"{out / 'purity_coverage.png'}")


if __name__ == "__main__":
    sys.exit(run_tool(main))
