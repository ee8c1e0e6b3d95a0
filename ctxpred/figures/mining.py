"""Visual data mining (paper Fig. 7): object clusters found by matching constellations of patches.

The procedure (method.md, "Figures of the project page"), as functions over
arrays so that each step can be tested and reused:

1. Patches: every image is covered by a grid of 96x96 patches with step
   ``stride`` pixels (:func:`ctxpred.features.patches.sampled_patches`, mode
   "grid"); their fc6 features are computed once
   (:func:`ctxpred.features.streaming.stream_features`). A patch is a row:
   its image id and the (y, x) pixel corner of its top-left pixel.
2. Constellations: four patches of one image at corners (y, x), (y, x + s),
   (y + s, x), (y + s, x + s), s = ``spacing`` pixels (a multiple of the
   stride; s = 96 puts four patches side by side, as in the paper's figure).
   :func:`constellation_anchors` lists all of them, :func:`sample_constellations`
   draws some (seeded).
3. Appearance: each constellation patch gets its k nearest patches by
   cosine similarity of fc6 among the patches of OTHER images
   (:class:`ctxpred.features.search.NeighbourIndex`: exact and blocked up to a
   threshold, HNSW above, memory bounded either way). :func:`top_images`
   scores an image by the sum over the four patches of the best similarity
   of that patch to a patch of the image, layout ignored, and keeps the
   best ``top`` images. An image none of whose patches is among a
   constellation patch's k neighbours is not scored for that constellation
   (its best match for that patch is below every retrieved one); for the
   images that are scored, the score is exact, since a patch's best match
   in an image is the first of that image in its ranked neighbour list.
4. Geometric verification (:func:`verify`): an image verifies when its four
   best matches are laid out like the constellation: for every pair (i, j)
   of the four patches, the displacement between the matches, m_i - m_j,
   differs from the constellation's, c_i - c_j, by at most ``tolerance``
   pixels in x and in y (by default half a patch, 48). Translation is free;
   scale is not. Four matches on one patch (a flat region matched four
   times) differ by s from every displacement and fail when s > tolerance.
5. Ranking (:func:`rank_clusters`): constellations by the number of their
   top images that verify (ties: the summed scores of those images, then
   the constellation's number). Near-duplicates are dropped greedily in
   that order: a constellation's image set is its own image plus its
   verified images; it is dropped when more than ``max_shared`` (default
   half) of that set lies in the set of one cluster kept before it.

Evaluation with object annotations (:func:`purity_coverage`), in the spirit
of Doersch et al. 2012 / 2015: a cluster's detections are the union boxes of
the four matched patches in its verified images, best score first. A
detection belongs to class c when its IoU with an object of class c is at
least 0.5 (rule "iou") or, with rule "centre", when its centre lies inside
such an object. Purity of a cluster: the fraction of its first N detections
that belong to its majority class (the class most of them belong to).
Coverage after K clusters: the fraction of annotated object pixels (the
union of all object boxes of the annotated images, difficult ones included)
that lie inside a detection of one of the K clusters belonging to that
cluster's majority class AND inside an object of that class. The curve
plots the mean purity of the first K clusters against their coverage, for
K = 1, 2, ...; :func:`curve_auc` is its area (trapezoids, the curve held
at the first cluster's purity from coverage 0), between 0 and 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctxpred.models.context import PATCH
from ctxpred.detection.boxes import box_iou

CONSTELLATION = 4  # patches: top-left, top-right, bottom-left, bottom-right
MATCH_RULES = ("iou", "centre")
IOU_THRESHOLD = 0.5


# ---------------------------------------------------------------------------
# Patches


def union_boxes(corners, patch=PATCH):
    """(..., 4, 2) (y, x) patch corners -> (..., 4) int64 x0, y0, x1, y1 of the box holding them.

    Pixels, x1 and y1 exclusive.
    """
    corners = np.asarray(corners, dtype=np.int64)
    low = corners.min(axis=-2)
    high = corners.max(axis=-2) + patch
    return np.stack([low[..., 1], low[..., 0], high[..., 1], high[..., 0]], axis=-1)


# ---------------------------------------------------------------------------
# Constellations


def constellation_anchors(image_ids, corners, spacing):
    """(A, 4) int64 rows of every constellation of four patches ``spacing`` pixels apart.

    image_ids: (N,) int image of each patch row; corners: (N, 2) int (y, x)
    top-left pixel of each patch. A constellation is the rows at (y, x),
    (y, x + s), (y + s, x), (y + s, x + s) of one image, in that order;
    constellations are listed by their first row.
    """
    image_ids = np.asarray(image_ids, dtype=np.int64)
    corners = np.asarray(corners, dtype=np.int64).reshape(-1, 2)
    if spacing < 1:
        raise ValueError(f"spacing must be positive, got {spacing}")
    if len(corners) == 0:
        return np.empty((0, CONSTELLATION), np.int64)
    dims = (int(image_ids.max()) + 1, int(corners[:, 0].max()) + spacing + 1,
            int(corners[:, 1].max()) + spacing + 1)
    keys = np.ravel_multi_index((image_ids, corners[:, 0], corners[:, 1]), dims)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    members = [np.arange(len(keys))]
    found = np.ones(len(keys), dtype=bool)
    for dy, dx in ((0, spacing), (spacing, 0), (spacing, spacing)):
        wanted = np.ravel_multi_index((image_ids, corners[:, 0] + dy, corners[:, 1] + dx), dims)
        position = np.minimum(np.searchsorted(sorted_keys, wanted), len(keys) - 1)
        found &= sorted_keys[position] == wanted
        members.append(order[position])
    return np.stack(members, axis=1)[found]


def sample_constellations(anchors, count, rng):
    """``count`` rows of ``anchors`` drawn without replacement (all when fewer), in anchor order."""
    if count >= len(anchors):
        return anchors
    return anchors[np.sort(rng.choice(len(anchors), size=count, replace=False))]


# ---------------------------------------------------------------------------
# Matching and verification


@dataclass(frozen=True)
class Candidates:
    """The best images of each of C constellations by appearance alone, best first.

    images: (C, T) int64 image ids, -1 where fewer than T images were scored.
    rows: (C, T, 4) int64 row of the best match of each constellation patch
    in that image (-1 in padding). similarities: (C, T, 4) float32 cosine
    similarity of each best match (0 in padding). scores: (C, T) float32 the
    sum of the four (-inf in padding).
    """

    images: np.ndarray
    rows: np.ndarray
    similarities: np.ndarray
    scores: np.ndarray

    @staticmethod
    def concatenate(parts):
        """Candidates of consecutive chunks of constellations, as one."""
        return Candidates(*(np.concatenate([getattr(part, name) for part in parts])
                            for name in ("images", "rows", "similarities", "scores")))


def top_images(indices, similarities, image_ids, top):
    """The ``top`` images of each constellation by summed best-match similarity, layout ignored.

    indices: (C, 4, k) int64 neighbour rows of each constellation patch,
    most similar first, -1 for none (as returned by NeighbourIndex.query,
    reshaped); similarities: (C, 4, k) their cosine similarities; image_ids:
    (N,) int image of every row. An image is scored when each of the four
    patches has a neighbour in it (see the module docstring); ties are
    broken by the lower image id. Returns :class:`Candidates` with T = top.
    """
    indices = np.asarray(indices, dtype=np.int64)
    similarities = np.asarray(similarities, dtype=np.float32)
    image_ids = np.asarray(image_ids, dtype=np.int64)
    count, patches, _ = indices.shape
    n_images = int(image_ids.max()) + 1
    # np.nonzero walks in C order: per (constellation, patch), neighbours best first.
    constellation, patch, rank = np.nonzero(indices >= 0)
    rows = indices[constellation, patch, rank]
    keys = (constellation * n_images + image_ids[rows]) * patches + patch
    keys, first = np.unique(keys, return_index=True)  # first = best neighbour in that image
    groups, starts, sizes = np.unique(keys // patches, return_index=True, return_counts=True)
    complete = sizes == patches
    best = first[starts[complete, None] + np.arange(patches)]  # (G, 4), patches in order
    group_constellation = groups[complete] // n_images
    group_image = groups[complete] % n_images
    group_rows = rows[best]
    group_similarities = similarities[constellation[best], patch[best], rank[best]]
    group_scores = group_similarities.sum(axis=1)
    order = np.lexsort((group_image, -group_scores, group_constellation))
    group_constellation = group_constellation[order]
    place = np.arange(len(order)) - np.searchsorted(group_constellation, group_constellation)
    keep = place < top
    selected = order[keep]
    where = (group_constellation[keep], place[keep])
    images = np.full((count, top), -1, np.int64)
    images[where] = group_image[selected]
    matched = np.full((count, top, patches), -1, np.int64)
    matched[where] = group_rows[selected]
    matched_similarities = np.zeros((count, top, patches), np.float32)
    matched_similarities[where] = group_similarities[selected]
    scores = np.full((count, top), -np.inf, np.float32)
    scores[where] = group_scores[selected]
    return Candidates(images, matched, matched_similarities, scores)


def verify(constellation_corners, match_corners, tolerance):
    """Whether matches are laid out like their constellation (see the module docstring).

    constellation_corners: (C, 4, 2) (y, x) pixels; match_corners: (C, T,
    4, 2) (y, x) of the four best matches in each of T images (pixels of
    those images). tolerance: pixels, per pairwise displacement and axis.
    Returns (C, T) bool.
    """
    first, second = np.triu_indices(CONSTELLATION, k=1)
    expected = constellation_corners[:, None, first] - constellation_corners[:, None, second]
    found = match_corners[:, :, first] - match_corners[:, :, second]
    return (np.abs(found - expected) <= tolerance).all(axis=(2, 3))


def verified_matches(candidates: Candidates, corners, constellations, tolerance):
    """(C, T) bool: the candidate images of each constellation that verify.

    corners: (N, 2) (y, x) of every row; constellations: (C, 4) rows.
    Padding never verifies.
    """
    corners = np.asarray(corners)
    rows = np.maximum(candidates.rows, 0)
    return verify(corners[constellations], corners[rows], tolerance) & (candidates.images >= 0)


@dataclass(frozen=True)
class Cluster:
    """A kept constellation and its verified images, best score first.

    constellation: its number (index into the C constellations); rows: (4,)
    its patch rows; source: its image id; images: (V,) verified image ids;
    matches: (V, 4) rows of the matched patches; scores: (V,) summed
    similarities.
    """

    constellation: int
    rows: np.ndarray
    source: int
    images: np.ndarray
    matches: np.ndarray
    scores: np.ndarray


def rank_clusters(verified, candidates: Candidates, constellations, image_ids, max_shared=0.5,
                  min_verified=1):
    """Clusters of the constellations with at least ``min_verified`` verified images, best first.

    verified: (C, T) bool from :func:`verified_matches`; constellations:
    (C, 4) rows; image_ids: (N,) image of every row. Ranking and the
    near-duplicate rule (``max_shared``) are in the module docstring.
    Returns a list of :class:`Cluster`.
    """
    if not 0 <= max_shared <= 1:
        raise ValueError(f"max_shared must lie in [0, 1], got {max_shared}")
    image_ids = np.asarray(image_ids)
    counts = verified.sum(axis=1)
    strength = np.where(verified, candidates.scores, 0).sum(axis=1)
    order = np.lexsort((np.arange(len(counts)), -strength, -counts))
    clusters, kept_sets = [], []
    for number in order:
        if counts[number] < max(min_verified, 1):
            break
        mask = verified[number]
        source = int(image_ids[constellations[number, 0]])
        members = set(candidates.images[number, mask].tolist()) | {source}
        if any(len(members & kept) > max_shared * len(members) for kept in kept_sets):
            continue
        kept_sets.append(members)
        clusters.append(Cluster(int(number), constellations[number], source,
                                candidates.images[number, mask], candidates.rows[number, mask],
                                candidates.scores[number, mask]))
    return clusters


# ---------------------------------------------------------------------------
# Purity and coverage


def detection_classes(detections, object_boxes, object_classes, n_classes, rule="iou"):
    """(D, n_classes) bool: whether each detection belongs to each class.

    detections: (D, 4) and object_boxes: (M, 4) VOC boxes (xmin, ymin, xmax,
    ymax, 1-based inclusive); object_classes: (M,) int class of each object.
    rule: "iou" (IoU >= 0.5 with an object of the class, VOC +1 convention)
    or "centre" (the detection's centre inside such an object).
    """
    if rule not in MATCH_RULES:
        raise ValueError(f"rule must be one of {MATCH_RULES}, got {rule!r}")
    detections = np.asarray(detections, dtype=np.float64).reshape(-1, 4)
    object_boxes = np.asarray(object_boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.zeros((len(detections), n_classes), dtype=bool)
    if len(object_boxes) == 0 or len(detections) == 0:
        return labels
    if rule == "iou":
        hits = box_iou(detections, object_boxes) >= IOU_THRESHOLD
    else:
        centre_x = (detections[:, 0] + detections[:, 2]) / 2
        centre_y = (detections[:, 1] + detections[:, 3]) / 2
        hits = ((object_boxes[None, :, 0] <= centre_x[:, None])
                & (centre_x[:, None] <= object_boxes[None, :, 2])
                & (object_boxes[None, :, 1] <= centre_y[:, None])
                & (centre_y[:, None] <= object_boxes[None, :, 3]))
    for column, label in enumerate(np.asarray(object_classes)):
        labels[:, label] |= hits[:, column]
    return labels


def _paint(mask, boxes):
    """Set the pixels of VOC boxes (1-based inclusive, clipped to ``mask``) in ``mask``."""
    for xmin, ymin, xmax, ymax in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        mask[max(int(np.ceil(ymin)) - 1, 0):max(int(np.floor(ymax)), 0),
             max(int(np.ceil(xmin)) - 1, 0):max(int(np.floor(xmax)), 0)] = True
    return mask


def _covered_pixels(annotation, object_boxes, object_classes, covering):
    """Object pixels of one image inside a covering box and an object of the box's class.

    covering: [(VOC box, class index)].
    """
    shape = (annotation.height, annotation.width)
    covered = np.zeros(shape, bool)
    for box, label in covering:
        inside = _paint(np.zeros(shape, bool), object_boxes[object_classes == label])
        covered |= _paint(np.zeros(shape, bool), box) & inside
    return int(covered.sum())


@dataclass(frozen=True)
class PurityCoverage:
    """The purity-coverage curve of K clusters in ranking order.

    purity: (K,) each cluster's purity; majority: (K,) its majority class
    name ("" when none of its detections belongs to a class); purity_curve:
    (K,) mean purity of the first K clusters; coverage: (K,) coverage of the
    first K clusters (non-decreasing, in [0, 1]); auc: :func:`curve_auc`;
    top_n: detections per cluster counted; rule: the match rule.
    """

    purity: np.ndarray
    majority: tuple
    purity_curve: np.ndarray
    coverage: np.ndarray
    auc: float
    top_n: int
    rule: str


def curve_auc(coverage, purity_curve):
    """Area under purity (y) against coverage (x), from coverage 0 at the first purity.

    coverage: (K,) non-decreasing; purity_curve: (K,). Trapezoids; 0 for K = 0.
    """
    coverage = np.asarray(coverage, dtype=np.float64)
    purity_curve = np.asarray(purity_curve, dtype=np.float64)
    if len(coverage) == 0:
        return 0.0
    if np.any(np.diff(coverage) < 0):
        raise ValueError("coverage must be non-decreasing")
    x = np.concatenate([[0.0], coverage])
    y = np.concatenate([purity_curve[:1], purity_curve])
    return float(np.trapezoid(y, x))


def purity_coverage(cluster_detections, annotations, top_n=10, rule="iou"):
    """Purity and coverage of clusters in ranking order (definitions in the module docstring).

    cluster_detections: one (images, boxes) per cluster, best first; images:
    V image keys, boxes: (V, 4) VOC boxes of its detections in those images,
    best first. annotations: {image key: ctxpred.detection.voc.Annotation}; a
    detection in an image without annotation belongs to no class. Coverage
    is over the object pixels of every image of ``annotations``.
    Returns :class:`PurityCoverage`.
    """
    if top_n < 1:
        raise ValueError(f"top_n must be positive, got {top_n}")
    classes = sorted({item.name for annotation in annotations.values()
                      for item in annotation.objects})
    class_index = {name: number for number, name in enumerate(classes)}
    objects = {key: (np.array([item.box for item in annotation.objects],
                              dtype=np.float64).reshape(-1, 4),
                     np.array([class_index[item.name] for item in annotation.objects], np.int64))
               for key, annotation in annotations.items()}
    total = sum(int(_paint(np.zeros((annotation.height, annotation.width), bool),
                           objects[key][0]).sum()) for key, annotation in annotations.items())
    covering = {}  # image key -> [(detection box, class)]
    covered = {}  # image key -> covered object pixels
    purity, majority, coverage = [], [], []
    for images, boxes in cluster_detections:
        images, boxes = list(images)[:top_n], np.asarray(boxes, np.float64).reshape(-1, 4)[:top_n]
        labels = np.zeros((len(images), len(classes)), dtype=bool)
        for row, (key, box) in enumerate(zip(images, boxes)):
            if key in objects:
                labels[row] = detection_classes(box, *objects[key], len(classes), rule)[0]
        votes = labels.sum(axis=0)
        best = int(np.argmax(votes)) if len(classes) and votes.max() > 0 else -1
        purity.append(votes[best] / len(images) if best >= 0 else 0.0)
        majority.append(classes[best] if best >= 0 else "")
        if best >= 0:
            touched = set()
            for key, box, hit in zip(images, boxes, labels[:, best]):
                if hit:
                    covering.setdefault(key, []).append((box, best))
                    touched.add(key)
            for key in touched:
                covered[key] = _covered_pixels(annotations[key], *objects[key], covering[key])
        coverage.append(sum(covered.values()) / total if total else 0.0)
    purity = np.asarray(purity, dtype=np.float64)
    purity_curve = np.cumsum(purity) / np.arange(1, len(purity) + 1)
    coverage = np.asarray(coverage, dtype=np.float64)
    return PurityCoverage(purity, tuple(majority), purity_curve, coverage,
                          curve_auc(coverage, purity_curve), top_n, rule)


def plot_purity_coverage(curve: PurityCoverage, path, title):
    """Save the purity-coverage curve (format from ``path``'s extension) with its AUC.

    matplotlib's Agg canvas without pyplot: no global figure state.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.5), layout="constrained")
    axes = figure.subplots()
    x = np.concatenate([[0.0], curve.coverage])
    y = np.concatenate([curve.purity_curve[:1], curve.purity_curve])
    axes.plot(x, y, marker=".", label=f"AUC {curve.auc:.3f} ({len(curve.purity)} clusters)")
    axes.set_xlim(0, max(1e-3, float(x.max()) * 1.05))
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("coverage (fraction of annotated object pixels)")
    axes.set_ylabel(f"purity (mean over clusters, top {curve.top_n} detections, {curve.rule})")
    axes.set_title(title)
    axes.legend(loc="lower left")
    axes.grid(alpha=0.3)
    figure.savefig(path)
