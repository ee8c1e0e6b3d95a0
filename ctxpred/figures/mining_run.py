"""Visual data mining (paper Fig. 7), the run: grid features, constellations, clusters, page.

:func:`mine` does what tools/mine.py describes, with the steps of
:mod:`ctxpred.figures.mining`:

1. ``out``/features.h5: the ``layer`` features of a grid of 96x96 patches
   (step ``stride``) over every image; reused by a rerun with the same
   images, weights, net, layer, grid and ``max_pixels`` (:func:`feature_settings`).
2. ``constellations`` random 2x2 blocks of grid patches ``spacing`` pixels
   apart; for each patch its ``candidates`` nearest patches of other images
   (``chunk`` constellations at a time, exact or HNSW search); the
   ``top_images`` best images per constellation; geometric verification
   within ``tolerance`` pixels; clusters ranked by verified images.
3. ``out``/index.html (the first ``clusters``, ``shown`` matches each),
   ``out``/patches/, ``out``/summary.json (settings, clusters with VOC
   boxes, and with ``annotations`` the purity-coverage numbers and
   ``out``/purity_coverage.png).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from ctxpred.data.images import DEFAULT_MAX_PIXELS, open_source
from ctxpred.detection.voc import read_annotation
from ctxpred.features.extractor import FeatureExtractor
from ctxpred.features.patches import sampled_patches
from ctxpred.features.streaming import stream_features
from ctxpred.features.writers import open_feature_writer
from ctxpred.features.search import EXACT_THRESHOLD, NeighbourIndex
from ctxpred.figures import pages
from ctxpred.figures.crops import crop_boxes
from ctxpred.figures.mining import (Candidates, constellation_anchors, plot_purity_coverage,
                                    purity_coverage, rank_clusters, sample_constellations,
                                    top_images, union_boxes, verified_matches)
from ctxpred.models.context import PATCH, snapshot_param


@dataclass(frozen=True)
class MiningSettings:
    """One mining run; tools/mine.py's flags, one field each (see its --help for meanings).

    deploy: the deploy prototxt of architecture ``net``. max_pixels: None
    for full-size images. annotations: a folder of VOC XML files, or None.
    """

    images: str
    weights: str
    deploy: str
    out: str
    net: str = "color_dropping"
    layer: str = "fc6"
    stride: int = 48
    spacing: int = 96
    constellations: int = 1000
    top_images: int = 100
    candidates: int = 1000
    tolerance: float = 48
    max_shared: float = 0.5
    min_verified: int = 1
    clusters: int = 30
    shown: int = 10
    annotations: str | None = None
    purity_top: int = 10
    match_rule: str = "iou"
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    seed: int = 0
    exact_threshold: int = EXACT_THRESHOLD
    chunk: int = 256
    batch: int = 64


def feature_settings(settings):
    """What features.h5 depends on, as strings: a file with other settings is recomputed."""
    weights = Path(settings.weights).resolve()
    return {"images": str(settings.images), "weights": str(weights),
            "weights_modified": str(weights.stat().st_mtime_ns), "deploy": str(settings.deploy),
            "layer": settings.layer, "stride": str(settings.stride),
            "max_pixels": str(settings.max_pixels)}


def extract(settings, source, path):
    """features.h5 of the grid patches of every image, unless one with the same settings exists."""
    attrs = feature_settings(settings)
    if path.is_file():
        with h5py.File(path, "r") as file:
            if {key: file.attrs.get(key) for key in attrs} == attrs:
                print(f"reusing {path}")
                return
    extractor = FeatureExtractor(settings.deploy, settings.weights, settings.layer,
                                 settings.batch, train_param=snapshot_param(settings.net))
    items = sampled_patches(source, "grid", max_pixels=settings.max_pixels,
                            patch=extractor.patch, step=settings.stride)
    with open_feature_writer(path, extractor.dim, attrs) as writer:
        summary = stream_features(
            extractor, tqdm(items, total=len(source), desc="features", unit="image"), writer)
    for name, reason in summary.skipped.items():
        print(f"skipped {name}: {reason}")


def match(settings, features, image_ids, corners, constellations):
    """(Candidates, verified (C, T) bool) of ``constellations``, searched ``chunk`` at a time."""
    index = NeighbourIndex(features, image_ids, exact_threshold=settings.exact_threshold,
                           seed=settings.seed)
    parts = []
    for start in tqdm(range(0, len(constellations), settings.chunk), desc="matching",
                      unit="chunk"):
        chunk = constellations[start:start + settings.chunk]
        rows, inverse = np.unique(chunk, return_inverse=True)
        queries = features[rows][inverse.reshape(-1)]  # h5py reads increasing rows only
        indices, similarities = index.query(queries, settings.candidates,
                                            exclude=image_ids[chunk.reshape(-1)])
        parts.append(top_images(indices.reshape(len(chunk), 4, -1),
                                similarities.reshape(len(chunk), 4, -1), image_ids,
                                settings.top_images))
    candidates = Candidates.concatenate(parts)
    return candidates, verified_matches(candidates, corners, constellations, settings.tolerance)


def cluster_table(settings, source, names, corners, shown, counts, page):
    """The page's table: a row per cluster of ``shown``, its constellation then its matches."""
    rows = []  # per cluster: [(image id, box)], the constellation first, then its matches
    for cluster in shown:
        boxes = union_boxes(corners[np.vstack([cluster.rows, cluster.matches[:settings.shown]])])
        images = [cluster.source, *cluster.images[:settings.shown].tolist()]
        rows.append([(image, tuple(int(v) for v in box)) for image, box in zip(images, boxes)])
    pixels = crop_boxes(source, {(names[image], *box) for row in rows for image, box in row},
                        settings.max_pixels)
    store = pages.PatchStore(page.parent / "patches")
    lines = ["<table>", "<tr><th>cluster</th><th>constellation</th>"
             f'<th colspan="{settings.shown}">verified matches, best first</th></tr>']
    for rank, (cluster, row) in enumerate(zip(shown, rows), start=1):
        cells = [f"<td>#{rank}<br>{len(cluster.images)} of {counts[cluster.constellation]} "
                 "verified</td>"]
        for place, (image, (x0, y0, x1, y1)) in enumerate(row):
            similarity = None if place == 0 else float(cluster.scores[place - 1]) / 4
            patch = pages.ShownPatch(pixels[names[image], x0, y0, x1, y1], names[image],
                                     (x0, y0, x1 - x0, y1 - y0), similarity)
            cells.append(pages.patch_cell(store, page, patch, "query" if place == 0 else ""))
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def write_page(settings, source, names, corners, constellations, clusters, counts):
    """``out``/index.html and ``out``/patches/ of the first ``clusters``; returns the page."""
    page = Path(settings.out) / "index.html"
    shown = clusters[:settings.clusters]
    table = cluster_table(settings, source, names, corners, shown, counts, page)
    intro = (
        f"<p>{len(clusters)} clusters from {len(constellations)} random constellations "
        f"(seed {settings.seed}) of four 96x96 patches {settings.spacing} pixels apart on a "
        f"grid of step {settings.stride} over {len(names)} images of "
        f"{pages.escape(settings.images)}; the first {len(shown)} shown. For each "
        f"constellation, the (up to) {settings.top_images} images whose patches match its four "
        f"patches best by cosine similarity of {pages.escape(settings.layer)} (layout ignored, "
        f"own image excluded); a match verifies when its four patches are laid out like the "
        f"constellation's within {settings.tolerance:g} pixels. Clusters are ranked by their "
        f"number of verified images. Each match is the box holding its four patches; the "
        f"number under it is the mean similarity of the four.</p>\n<p>Weights "
        f"{pages.escape(settings.weights)}, deploy net {pages.escape(settings.deploy)}.</p>")
    return pages.write_page(page, "Visual data mining", intro + "\n" + table)


def voc_boxes(rows, corners, scales):
    """(..., 4) patch rows -> (..., 4) VOC boxes holding them, in pixels of the image files.

    The grid's pixels are those of the decoded image shrunk by ``max_pixels``
    (0-based, exclusive ends); VOC boxes are 1-based with inclusive ends.
    """
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


def evaluate(settings, names, found):
    """summary.json's purity_coverage entry of the clusters' detections ``found`` against the
    XML files of ``annotations``; writes ``out``/purity_coverage.png."""
    folder = Path(settings.annotations)
    annotations = {}
    for image, name in enumerate(names):
        path = folder / f"{Path(name).stem}.xml"
        if path.is_file():
            annotations[image] = read_annotation(path)
    if not annotations:
        raise ValueError(f"{folder} holds no <image stem>.xml file for any image of "
                         f"{settings.images}")
    curve = purity_coverage(found, annotations, settings.purity_top, settings.match_rule)
    plot_purity_coverage(curve, Path(settings.out) / "purity_coverage.png",
                         f"Purity-coverage, {len(annotations)} annotated images")
    return {"auc": curve.auc, "annotated_images": len(annotations), "top_n": curve.top_n,
            "rule": curve.rule, "purity": curve.purity.tolist(),
            "majority": list(curve.majority), "purity_curve": curve.purity_curve.tolist(),
            "coverage": curve.coverage.tolist()}


def read_grid(path):
    """(patch image names, corners (N, 2) y, x, scales (N,)) of the rows of features.h5 ``path``."""
    with h5py.File(path, "r") as file:
        return ([name.decode() for name in file["image"][:]], file["box"][:][:, [1, 0]],
                file["scale"][:])


def mine(settings: MiningSettings):
    """Mine clusters as ``settings`` say: (index.html path, the summary written to summary.json).

    Needs pycaffe loaded (:func:`ctxpred.caffe.env.load_caffe`). Raises
    ValueError when fewer than 2 images give patches, no image holds a
    constellation, the weights do not fit or no annotation matches an image.
    """
    started = time.perf_counter()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    source = open_source(settings.images)
    extract(settings, source, out / "features.h5")
    row_names, corners, scales = read_grid(out / "features.h5")
    names, image_ids = np.unique(row_names, return_inverse=True)
    if len(names) < 2:
        raise ValueError(f"patches from at least 2 images are needed (found {len(names)}): "
                         "matches in a constellation's own image are excluded")
    anchors = constellation_anchors(image_ids, corners, settings.spacing)
    if len(anchors) == 0:
        raise ValueError(f"no image holds a constellation: images need at least "
                         f"{PATCH + settings.spacing} pixels each way")
    constellations = sample_constellations(anchors, settings.constellations,
                                           np.random.default_rng(settings.seed))
    with h5py.File(out / "features.h5", "r") as file:
        candidates, verified = match(settings, file["features"], image_ids, corners,
                                     constellations)
    clusters = rank_clusters(verified, candidates, constellations, image_ids,
                             settings.max_shared, settings.min_verified)
    counts = (candidates.images >= 0).sum(axis=1)
    page = write_page(settings, source, names, corners, constellations, clusters, counts)
    summary = {"settings": dataclasses.asdict(settings), "images": len(names),
               "patches": len(row_names), "anchors": len(anchors),
               "constellations": len(constellations), "clusters_found": len(clusters),
               "clusters": cluster_summaries(clusters, names, corners, scales, counts)}
    if settings.annotations is not None:
        summary["purity_coverage"] = evaluate(settings, names, [
            (cluster.images, voc_boxes(cluster.matches, corners, scales)) for cluster in clusters])
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return page, summary


def summary_lines(page, summary):
    """What a run prints: the page, clusters and time; with annotations, the purity-coverage AUC."""
    lines = [f"wrote {page}: {summary['clusters_found']} clusters from "
             f"{summary['constellations']} constellations over {summary['images']} images "
             f"({summary['seconds']} s)"]
    if "purity_coverage" in summary:
        curve = summary["purity_coverage"]
        lines.append(f"purity-coverage AUC {curve['auc']:.3f} (top {curve['top_n']} detections "
                     f"per cluster, rule {curve['rule']}, {summary['clusters_found']} clusters, "
                     f"final coverage {curve['coverage'][-1] if curve['coverage'] else 0:.3f}); "
                     f"{Path(page).parent / 'purity_coverage.png'}")
    return lines
