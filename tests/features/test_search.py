"""Nearest-neighbour search: blocked exact search against numpy, HNSW recall against exact."""
import h5py
import numpy as np
import pytest

from ctxpred.features.search import NeighbourIndex, normalised


def clustered(rng, rows, dim=48, clusters=40):
    """(rows, dim) float32: Gaussian clusters of spread 0.3 around unit-scale centres."""
    centres = rng.normal(size=(clusters, dim))
    members = rng.integers(0, clusters, size=rows)
    return (centres[members] + 0.3 * rng.normal(size=(rows, dim))).astype(np.float32)


def brute_force(features, queries, k, image_ids=None, exclude=None):
    """(indices, similarities) by a full similarity matrix and a stable numpy sort."""
    similarities = normalised(queries).astype(np.float64) @ normalised(features).T.astype(
        np.float64)
    if exclude is not None:
        similarities[exclude[:, None] == image_ids[None, :]] = -np.inf
    order = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(similarities, order, axis=1)


def test_exact_search_equals_a_brute_force_sort(rng):
    features = rng.normal(size=(1000, 32)).astype(np.float32) * rng.uniform(0.1, 10, (1000, 1))
    image_ids = rng.integers(0, 60, size=1000)
    queries = np.concatenate([features[:50], rng.normal(size=(30, 32)).astype(np.float32)])
    exclude = np.concatenate([image_ids[:50], rng.integers(0, 80, size=30)])
    # Blocks of 128 rows and queries: the running top-k is merged across 8 database blocks.
    index = NeighbourIndex(features, image_ids, block_rows=128)
    assert index.exact
    for ids, excluded in ((None, None), (image_ids, exclude)):
        indices, similarities = index.query(queries, 7, exclude=excluded)
        expected, expected_similarities = brute_force(features, queries, 7, ids, excluded)
        np.testing.assert_array_equal(indices, expected)
        np.testing.assert_allclose(similarities, expected_similarities, atol=1e-5)
        assert indices.dtype == np.int64 and similarities.dtype == np.float32
    indices, _ = index.query(queries, 7, exclude=exclude)
    assert not (image_ids[indices] == exclude[:, None]).any()
    plain, _ = index.query(features[:50], 1)
    np.testing.assert_array_equal(plain[:, 0], np.arange(50))  # without exclusion: itself


def test_fewer_allowed_rows_than_k_are_padded():
    features = np.eye(4, dtype=np.float32)
    index = NeighbourIndex(features, image_ids=["a", "a", "b", "c"], block_rows=3)
    indices, similarities = index.query(features[:1], 4, exclude=["a"])
    np.testing.assert_array_equal(indices, [[2, 3, -1, -1]])  # ties broken by row number
    np.testing.assert_array_equal(similarities, [[0, 0, -np.inf, -np.inf]])
    with pytest.raises(ValueError, match="one image id per query"):
        index.query(features, 1, exclude=["a"])


def test_approximate_index_recall_against_exact(rng):
    features = clustered(rng, 3000)
    image_ids = np.repeat(np.arange(300), 10)  # 10 rows per image, as patches of one photo
    queries = clustered(np.random.default_rng(7), 200)
    exclude = rng.integers(0, 300, size=200)
    exact = NeighbourIndex(features, image_ids)
    approximate = NeighbourIndex(features, image_ids, exact_threshold=1000, block_rows=512,
                                 threads=1)
    assert exact.exact and not approximate.exact
    k = 10
    for excluded in (None, exclude):
        truth, _ = exact.query(queries, k, exclude=excluded)
        found, similarities = approximate.query(queries, k, exclude=excluded)
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, found)])
        assert recall >= 0.9, recall
        assert (np.diff(similarities, axis=1) <= 1e-6).all()  # most similar first
        np.testing.assert_allclose(
            similarities, np.einsum("qd,qkd->qk", normalised(queries),
                                    normalised(features)[found]), atol=1e-5)
    assert not (image_ids[found] == exclude[:, None]).any()


def test_rows_are_read_block_by_block_from_hdf5(rng, tmp_path):
    features = clustered(rng, 600, dim=16)
    image_ids = np.repeat(np.arange(100), 6)
    with h5py.File(tmp_path / "f.h5", "w") as file:
        file["features"] = features
    with h5py.File(tmp_path / "f.h5", "r") as file:
        for threshold in (1000, 100):  # exact, then HNSW
            on_disk = NeighbourIndex(file["features"], image_ids, exact_threshold=threshold,
                                     block_rows=64, threads=1)
            in_memory = NeighbourIndex(features, image_ids, exact_threshold=threshold,
                                       block_rows=64, threads=1)
            for result, expected in zip(on_disk.query(features[:20], 5, exclude=image_ids[:20]),
                                        in_memory.query(features[:20], 5,
                                                        exclude=image_ids[:20])):
                np.testing.assert_array_equal(result, expected)
