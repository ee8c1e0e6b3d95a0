"""Nearest neighbours of feature rows (fc6 of 96x96 patches) by cosine similarity.

Cosine similarity of a and b is a . b / (|a| |b|). On rows scaled to unit
L2 norm it is the dot product, and the squared L2 distance is
|a - b|^2 = 2 - 2 cos(a, b): ranking by cosine similarity is ranking by L2
distance between L2-normalised rows. Every search here normalises rows and
queries that way (an all-zero row stays zero: its similarity to anything
is 0).

:class:`NeighbourIndex` searches exactly up to ``exact_threshold`` rows
(blocked matrix products: memory is bounded by ``block_rows`` rows of the
database and of the queries at a time, whatever the number of rows) and
with an approximate HNSW graph (hnswlib) above it; both give the same
(indices, similarities) result.

Exclusion rule: rows carry an image id each (``image_ids``); a query given
an id in ``exclude`` never gets a row of that image as a neighbour, so a
patch is not matched with itself or with overlapping patches of its own
image.
"""
from __future__ import annotations

import os

import numpy as np

EXACT_THRESHOLD = 200_000


def normalised(rows):
    """(N, D) array-like -> (N, D) float32 rows scaled to unit L2 norm (zero rows stay zero)."""
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1)


def _top_k(similarities, indices, k):
    """The k best columns of each row, best first: highest similarity, then lowest index.

    similarities: (Q, C) float32, -inf where a candidate is excluded;
    indices: (Q, C) int64 row numbers. Returns (Q, k) indices (-1 where
    fewer than k candidates are allowed) and (Q, k) similarities (-inf there).
    """
    if similarities.shape[1] > k:
        keep = np.argpartition(-similarities, k - 1, axis=1)[:, :k]
        similarities = np.take_along_axis(similarities, keep, axis=1)
        indices = np.take_along_axis(indices, keep, axis=1)
    indices = np.where(np.isneginf(similarities), -1, indices)
    order = np.lexsort((indices, -similarities), axis=1)
    similarities = np.take_along_axis(similarities, order, axis=1)
    indices = np.take_along_axis(indices, order, axis=1)
    missing = k - similarities.shape[1]
    if missing > 0:
        similarities = np.pad(similarities, ((0, 0), (0, missing)), constant_values=-np.inf)
        indices = np.pad(indices, ((0, 0), (0, missing)), constant_values=-1)
    return indices, similarities


class NeighbourIndex:
    """k nearest rows of ``features`` by cosine similarity, exact or approximate by size.

    features: (N, D) rows; anything sliced by rows into numpy arrays (an
    array, a ``np.load(..., mmap_mode="r")`` memmap or an h5py dataset): it
    is read ``block_rows`` rows at a time and never copied whole.
    image_ids: (N,) id of the image of each row (ints or strings), for the
    exclusion rule of :meth:`query`; None: no row is ever excluded.
    exact_threshold: up to this many rows the search is exact; above it an
    hnswlib HNSW graph is built (``M`` links per node, ``ef_construction``
    candidates while building, at least ``ef`` while searching, graph
    levels drawn with ``seed``). threads: threads building the graph (None:
    all cores). With more than one thread the insertion order, hence the
    graph and its rare misses, may vary from run to run; threads=1 makes
    it reproducible.

    Attributes: ``exact`` (bool), ``rows`` (N), ``dim`` (D).
    """

    def __init__(self, features, image_ids=None, exact_threshold=EXACT_THRESHOLD,
                 block_rows=4096, M=16, ef_construction=200, ef=100, seed=0, threads=None):
        if len(features.shape) != 2 or features.shape[0] == 0:
            raise ValueError(f"features must be a non-empty (N, D) array, got {features.shape}")
        if block_rows < 1:
            raise ValueError(f"block_rows must be positive, got {block_rows}")
        self.features = features
        self.rows, self.dim = (int(size) for size in features.shape)
        self.image_ids = None if image_ids is None else np.asarray(image_ids)
        if self.image_ids is not None and self.image_ids.shape != (self.rows,):
            raise ValueError(f"image_ids must have one id per row ({self.rows}), "
                             f"got shape {self.image_ids.shape}")
        self.block_rows = block_rows
        self.exact = self.rows <= exact_threshold
        self.ef = ef
        if self.image_ids is not None:
            names, counts = np.unique(self.image_ids, return_counts=True)
            self._group_rows = dict(zip(names.tolist(), counts.tolist()))
        if not self.exact:
            self._graph = self._build_graph(M, ef_construction, seed, threads)

    def _build_graph(self, M, ef_construction, seed, threads):
        # Imported here: only the approximate search needs hnswlib.
        import hnswlib

        graph = hnswlib.Index(space="ip", dim=self.dim)  # distance 1 - a.b
        graph.init_index(max_elements=self.rows, ef_construction=ef_construction, M=M,
                         random_seed=seed)
        graph.set_num_threads(threads or os.cpu_count() or 1)
        for start in range(0, self.rows, self.block_rows):
            block = normalised(self.features[start:start + self.block_rows])
            graph.add_items(block, np.arange(start, start + len(block)))
        return graph

    def query(self, queries, k, exclude=None):
        """The k most similar rows to each query, most similar first.

        queries: (Q, D) features (normalised here). exclude: (Q,) image ids,
        one per query (e.g. the ids of the queries' own images), or None;
        rows of the index whose image id equals a query's are not returned
        for that query. Needs ``image_ids`` at construction.

        Returns (indices, similarities): (Q, k) int64 row numbers and (Q, k)
        float32 cosine similarities in [-1, 1]. Where fewer than k rows are
        allowed, the row is padded with index -1 and similarity -inf.
        """
        queries = normalised(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        if exclude is not None:
            if self.image_ids is None:
                raise ValueError("exclude needs the index to be built with image_ids")
            exclude = np.asarray(exclude)
            if exclude.shape != (len(queries),):
                raise ValueError(f"exclude must hold one image id per query ({len(queries)}), "
                                 f"got shape {exclude.shape}")
        if self.exact:
            return self._exact(queries, k, exclude)
        return self._approximate(queries, k, exclude)

    def _exact(self, queries, k, exclude):
        """Blocked products: block_rows database rows x block_rows queries at a time."""
        best_indices = np.full((len(queries), 0), -1, np.int64)
        best = np.full((len(queries), 0), -np.inf, np.float32)
        for start in range(0, self.rows, self.block_rows):
            block = normalised(self.features[start:start + self.block_rows])
            rows = np.arange(start, start + len(block))
            merged_indices, merged = [], []
            for first in range(0, len(queries), self.block_rows):
                part = slice(first, first + self.block_rows)
                similarities = queries[part] @ block.T
                if exclude is not None:
                    similarities[exclude[part, None] == self.image_ids[None, rows]] = -np.inf
                indices, similarities = _top_k(
                    np.concatenate([best[part], similarities], axis=1),
                    np.concatenate([best_indices[part],
                                    np.broadcast_to(rows, similarities.shape)], axis=1),
                    k)
                merged_indices.append(indices)
                merged.append(similarities)
            best_indices, best = np.concatenate(merged_indices), np.concatenate(merged)
        return _top_k(best, best_indices, k)

    def _approximate(self, queries, k, exclude):
        """HNSW search for k plus the largest own-image group, then the exclusion rule."""
        extra = 0 if exclude is None else max(self._group_rows.get(key, 0)
                                              for key in exclude.tolist())
        fetch = min(self.rows, k + extra)
        self._graph.set_ef(max(self.ef, fetch))
        labels, distances = self._graph.knn_query(queries, k=fetch)
        indices = labels.astype(np.int64)
        similarities = (1 - distances).astype(np.float32)
        if exclude is not None:
            similarities[exclude[:, None] == self.image_ids[indices]] = -np.inf
        return _top_k(similarities, indices, k)
