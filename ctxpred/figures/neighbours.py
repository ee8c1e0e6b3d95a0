"""The nearest-neighbour figure (paper Fig. 4), the run: random query patches and, per net,
their nearest patches by cosine similarity of one blob.

:func:`nearest_neighbour_figure` does what tools/nearest_neighbors.py
describes: the same random patches (``patches_per_image`` per image, seeded)
go through every net into a temporary HDF5 file each
(:func:`ctxpred.features.streaming.stream_features`); ``queries`` of them are
drawn at random (seeded); each net's :class:`ctxpred.features.search.NeighbourIndex`
(exact, or HNSW above ``exact_threshold`` rows) finds the ``k`` most similar
patches of OTHER images; :func:`ctxpred.figures.pages.neighbours_page` lays
them out, one group of columns per net.
"""
from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from ctxpred.data.images import DEFAULT_MAX_PIXELS, open_source
from ctxpred.features.extractor import FeatureExtractor
from ctxpred.features.patches import sampled_patches
from ctxpred.features.search import EXACT_THRESHOLD, NeighbourIndex
from ctxpred.features.streaming import stream_features
from ctxpred.features.writers import open_feature_writer
from ctxpred.figures import pages
from ctxpred.figures.crops import crop_boxes
from ctxpred.models.context import snapshot_param


@dataclass(frozen=True)
class NeighbourFigureSettings:
    """One figure. Per net, in column order: ``weights`` (caffemodel), ``deploys`` (its deploy
    prototxt), ``nets`` (its architecture name: the training net whose BatchNorm layers are
    folded, and the name on the page) and ``labels`` (its heading). layer: the compared
    blob. max_pixels: images are shrunk to at most this many pixels first (None: full
    size). seed: patch positions, queries and the HNSW graph. out: the output folder."""

    images: str
    weights: tuple
    deploys: tuple
    nets: tuple
    labels: tuple
    out: str
    queries: int = 20
    k: int = 10
    layer: str = "fc6"
    patches_per_image: int = 16
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    seed: int = 0
    exact_threshold: int = EXACT_THRESHOLD
    batch: int = 64


def extract(settings, source, deploy, weights, net, path):
    """Write the features of the sampled patches of ``source`` with one net to HDF5 ``path``;
    returns the :class:`ctxpred.features.streaming.ExtractionSummary`."""
    extractor = FeatureExtractor(deploy, weights, settings.layer, settings.batch,
                                 train_param=snapshot_param(net))
    items = sampled_patches(source, "random", settings.patches_per_image,
                            settings.seed, settings.max_pixels)
    with open_feature_writer(path, extractor.dim) as writer:
        return stream_features(
            extractor, tqdm(items, total=len(source), desc=str(weights), unit="image"), writer)


def search(settings, path, image_ids, queries):
    """(exact, indices (Q, k), similarities (Q, k)) of the ``k`` neighbours of rows ``queries``
    among the features in HDF5 ``path``, rows of the query's own image excluded."""
    with h5py.File(path, "r") as file:
        index = NeighbourIndex(file["features"], image_ids,
                               exact_threshold=settings.exact_threshold, seed=settings.seed)
        return (index.exact, *index.query(file["features"][queries], settings.k,
                                          exclude=image_ids[queries]))


def shown_patches(source, names, boxes, rows, max_pixels):
    """{row: ShownPatch} of patch ``rows`` (boxes (N, 4) x, y, w, h), cut again from the images."""
    keys = {row: (names[row], int(boxes[row, 0]), int(boxes[row, 1]),
                  int(boxes[row, 0] + boxes[row, 2]), int(boxes[row, 1] + boxes[row, 3]))
            for row in rows}
    pixels = crop_boxes(source, keys.values(), max_pixels)
    return {row: pages.ShownPatch(pixels[key], names[row], tuple(int(v) for v in boxes[row]))
            for row, key in keys.items()}


def write_figure(settings, source, names, boxes, queries, found):
    """``out``/index.html and ``out``/patches/ of the queries and each net's (exact, rows,
    similarities); returns the page's path."""
    needed = set(queries.tolist()) | {int(row) for _, rows, _ in found for row in rows.ravel()}
    needed.discard(-1)
    shown = shown_patches(source, names, boxes, needed, settings.max_pixels)
    table = []
    for number, query in enumerate(queries):
        groups = [[None if row < 0 else dataclasses.replace(shown[row], similarity=float(score))
                   for row, score in zip(rows[number], scores[number])]
                  for _, rows, scores in found]
        table.append((shown[query], groups))
    nets = "".join(
        f"<li>{pages.escape(label)}: {pages.escape(net)} net, weights "
        f"{pages.escape(weights)}, {'exact' if exact else 'approximate (HNSW)'} search</li>"
        for label, net, weights, (exact, _, _) in zip(settings.labels, settings.nets,
                                                      settings.weights, found))
    intro = (
        f"<p>{len(queries)} query patches drawn at random (seed {settings.seed}, no hand "
        f"filtering) from the {len(names)} random 96x96 patches ({settings.patches_per_image} "
        f"per image) of {len(set(names))} images of {pages.escape(settings.images)}. For each "
        f"net, the {settings.k} patches of the same pool with the highest cosine similarity of "
        f"{pages.escape(settings.layer)} (L2 distance of L2-normalised features), most similar "
        f"first; the number under each patch is its similarity.</p>\n"
        f"<p><b>Exclusion rule:</b> neighbours from the query's own image are excluded.</p>\n"
        f"<ul>{nets}</ul>")
    out = Path(settings.out)
    return pages.neighbours_page(out / "index.html", pages.PatchStore(out / "patches"),
                                 "Nearest neighbours", intro, settings.labels, table)


def nearest_neighbour_figure(settings: NeighbourFigureSettings):
    """Extract, search and write the figure of ``settings``: (page path, number of queries).

    Needs pycaffe loaded (:func:`ctxpred.caffe.env.load_caffe`). Raises
    ValueError when the patches come from fewer than 2 images (neighbours of
    the query's own image are excluded), for weights that do not fit or no
    usable image.
    """
    source = open_source(settings.images)
    with tempfile.TemporaryDirectory() as folder:
        paths = [Path(folder) / f"net{number}.h5" for number in range(len(settings.weights))]
        for deploy, weights, net, path in zip(settings.deploys, settings.weights, settings.nets,
                                              paths):
            summary = extract(settings, source, deploy, weights, net, path)
        for name, reason in summary.skipped.items():
            print(f"skipped {name}: {reason}")
        with h5py.File(paths[0], "r") as file:  # the same patches, in order, for every net
            names = [name.decode() for name in file["image"][:]]
            boxes = file["box"][:]
        if len(set(names)) < 2:
            raise ValueError(f"patches from at least 2 images are needed (found "
                             f"{len(set(names))}): neighbours from the query's own image are "
                             "excluded")
        image_ids = np.unique(names, return_inverse=True)[1]
        rng = np.random.default_rng(settings.seed)
        queries = np.sort(rng.choice(len(names), size=min(settings.queries, len(names)),
                                     replace=False))
        found = [search(settings, path, image_ids, queries) for path in paths]
    return write_figure(settings, source, names, boxes, queries, found), len(queries)
