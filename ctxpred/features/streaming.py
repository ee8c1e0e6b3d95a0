"""Patches of many images through a feature extractor into a feature writer, batch by batch.

Memory is flat in the number of images: one decoded image, one input batch
and at most the writer's ``flush_rows`` unwritten feature rows are held at
a time.
"""
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ctxpred.data.images import open_source
from ctxpred.features.extractor import FeatureExtractor
from ctxpred.features.patches import (PATCH_MODES, ImagePatches, listed_patches, read_patch_list,
                                      sampled_patches)
from ctxpred.features.writers import FeatureFile, open_feature_writer


@dataclass
class ExtractionSummary:
    """What :func:`stream_features` did: rows written, images used, skipped images (name -> why)."""

    rows: int = 0
    images: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PatchBatch:
    """Patches of consecutive images, in stream order.

    pixels: (n, p, p, 3) uint8 RGB, a view of a buffer that the next batch
    overwrites. names: the n images' names; boxes: (n, 4) int64 x, y, w, h;
    scales: (n,) float32 (see :class:`ctxpred.features.patches.ImagePatches`);
    first: the stream number of the first patch (patches are numbered from
    0 in stream order, skipped images giving none).
    """

    pixels: np.ndarray
    names: list
    boxes: np.ndarray
    scales: np.ndarray
    first: int


def patch_batches(items: Iterable[ImagePatches], batch, patch, summary=None, skip=0,
                  stop=None) -> Iterator[PatchBatch]:
    """The patches of ``items`` regrouped into :class:`PatchBatch` es of ``batch`` patches.

    Patches numbered below ``skip`` or from ``stop`` on (None: no end) are
    left out; the last batch may be shorter. Each image's patches are copied
    into one preallocated (batch, patch, patch, 3) buffer by slices, so the
    per-patch cost is a memcpy. ``summary`` (an :class:`ExtractionSummary`),
    when given, counts images used and records skipped ones.
    """
    buffer = np.empty((batch, patch, patch, 3), dtype=np.uint8)
    pending = []  # (item, first row, end row) of the patches in ``buffer``, in order
    filled = number = first = 0  # number: patches of the items before this one
    for item in items:
        if item.skipped is not None:
            if summary is not None:
                summary.skipped[item.name] = item.skipped
            continue
        if summary is not None:
            summary.images += 1
        start = max(0, skip - number)
        end_of_item = len(item.patches) if stop is None else min(len(item.patches), stop - number)
        while start < end_of_item:
            if filled == 0:
                first = number + start
            end = min(end_of_item, start + batch - filled)
            buffer[filled:filled + end - start] = item.patches[start:end]
            pending.append((item, start, end))
            filled += end - start
            start = end
            if filled == batch:
                yield _patch_batch(buffer[:filled], pending, first)
                pending, filled = [], 0
        number += len(item.patches)
        if stop is not None and number >= stop:
            break
    if filled:
        yield _patch_batch(buffer[:filled], pending, first)


def _patch_batch(pixels, pending, first):
    """PatchBatch of ``pixels`` cut from the (item, start, end) runs ``pending``."""
    return PatchBatch(
        pixels, [item.name for item, start, end in pending for _ in range(end - start)],
        np.concatenate([item.boxes[start:end] for item, start, end in pending]),
        np.concatenate([np.full(end - start, item.scale, np.float32)
                        for item, start, end in pending]),
        first)


def stream_features(extractor: FeatureExtractor, items: Iterable[ImagePatches],
                    writer: FeatureFile) -> ExtractionSummary:
    """Features of every patch of ``items``, written in order to ``writer`` batch by batch.

    Patches of consecutive images share batches of ``extractor.batch``
    (:func:`patch_batches`); only one batch of patches is held at a time
    (plus the current image). Each batch goes through the extractor's
    :class:`ctxpred.features.forward.CaffeForward` once.
    """
    summary = ExtractionSummary()
    for batch in patch_batches(items, extractor.batch, extractor.patch, summary):
        features = extractor.forward(batch.pixels)[extractor.layer]
        writer.append(features.reshape(len(batch.pixels), -1).copy(), batch.names, batch.boxes,
                      batch.scales)
        summary.rows += len(batch.pixels)
    return summary


def patch_items(patches, images=None, per_image=16, seed=0, max_pixels=None):
    """(ImagePatches iterator, number of images) for a patch spec (tools/extract_features.py).

    patches: "random" (``per_image`` per image, fixed by ``seed``), "grid"
    (the non-overlapping grid) or the path of a patch list (rows ``image x
    y``; ``images``: the folder its relative paths start from). images:
    an image source spec (:func:`ctxpred.data.images.open_source`).
    """
    if patches in PATCH_MODES:
        source = open_source(images)
        return sampled_patches(source, patches, per_image, seed, max_pixels), len(source)
    runs = read_patch_list(patches, images)
    return listed_patches(runs), len(runs)


def write_patch_features(extractor: FeatureExtractor, items, out, attrs=None,
                         progress=None) -> ExtractionSummary:
    """Stream the features of ``items`` into ``out`` (.h5/.hdf5 with attributes, or .npy).

    progress: None or a wrapper of the items (e.g. a tqdm). Raises
    ValueError, leaving no file, when no image gave a patch.
    """
    with open_feature_writer(out, extractor.dim, attrs) as writer:
        summary = stream_features(extractor, items if progress is None else progress(items),
                                  writer)
        if summary.rows == 0:
            raise ValueError(f"no patch could be cut from the images ({len(summary.skipped)} "
                             "skipped)")
    return summary
