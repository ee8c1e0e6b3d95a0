"""Object proposals for Fast R-CNN: selective search, stored per image.

Fast R-CNN scores a few thousand class-agnostic boxes per image; the paper's
detection results use selective search (Uijlings et al., IJCV 2013) in its
"fast" mode. ctxpred runs the same algorithm from OpenCV's contrib modules
(``cv2.ximgproc.segmentation``: colour-space, similarity-strategy and
threshold settings of the "fast" mode of the reference MATLAB code). Images
are shrunk to a longer side of ``max_side`` pixels first (selective search
costs ~1 s per 500-pixel image on one core), boxes are scaled back, and
boxes with a side under ``min_side`` pixels and exact duplicates are dropped.

Proposals are stored in one ``.npz`` file: one array (K, 4) float32 of VOC
boxes (xmin, ymin, xmax, ymax; 1-based, inclusive) per image id.
"""
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np


class ProposalError(ValueError):
    """A proposals file that is missing, unreadable or lacks an image id."""


def selective_search(image, mode="fast", max_side=500, min_side=16):
    """Selective-search boxes of an (H, W, 3) uint8 RGB image.

    Returns (K, 4) float32 VOC boxes in the image's own pixels, in the order
    selective search ranks them, duplicates and boxes narrower or lower than
    ``min_side`` pixels removed.
    """
    if not hasattr(cv2, "ximgproc"):
        raise RuntimeError("selective search needs OpenCV's contrib modules: "
                           "pip install opencv-contrib-python-headless")
    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    small = image if scale == 1 else cv2.resize(
        image, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(np.ascontiguousarray(small[..., ::-1]))
    if mode == "fast":
        search.switchToSelectiveSearchFast()
    elif mode == "quality":
        search.switchToSelectiveSearchQuality()
    else:
        raise ValueError(f"selective search mode must be 'fast' or 'quality', not {mode!r}")
    rects = search.process().astype(np.float64)
    if rects.size == 0:
        return np.zeros((0, 4), np.float32)
    x, y, w, h = (rects / scale).T
    boxes = np.stack([x + 1, y + 1, np.minimum(x + w, width), np.minimum(y + h, height)], axis=1)
    boxes = np.rint(boxes)
    keep = (((boxes[:, 2] - boxes[:, 0] + 1) >= min_side)
            & ((boxes[:, 3] - boxes[:, 1] + 1) >= min_side))
    boxes = boxes[keep]
    _, first = np.unique(boxes, axis=0, return_index=True)
    return boxes[np.sort(first)].astype(np.float32)


def compute_proposals(images, workers=2, progress=None, **options):
    """Selective search over many images.

    images: mapping image id -> callable returning the (H, W, 3) uint8 RGB
    image (so that each is decoded once, inside its worker). ``progress``, if
    given, is called once per finished image. ``options`` go to
    :func:`selective_search`. Returns {image id: (K, 4) float32 boxes}.
    """
    def run(item):
        image_id, load = item
        boxes = selective_search(load(), **options)
        if progress is not None:
            progress()
        return image_id, boxes

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return dict(pool.map(run, images.items()))


def save_proposals(path, proposals):
    """Write {image id: (K, 4) boxes} to ``path`` (.npz), via a temporary file."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez_compressed(partial, **{image_id: np.asarray(boxes, np.float32)
                                    for image_id, boxes in proposals.items()})
    partial.replace(path)


def load_proposals(path, image_ids):
    """{image id: (K, 4) float32 boxes} for ``image_ids`` from a proposals file.

    Raises ProposalError naming the file when it is missing or unreadable, or
    when image ids lack proposals (the first few are named, with the count).
    """
    path = Path(path)
    if not path.is_file():
        raise ProposalError(f"proposals file {path} does not exist; compute it with "
                            "ctxpred.detection.proposals.compute_proposals "
                            "(data/make_detection_set.py does for its set)")
    try:
        with np.load(path) as stored:
            missing = [image_id for image_id in image_ids if image_id not in stored.files]
            if missing:
                raise ProposalError(f"{path} has no proposals for {len(missing)} of "
                                    f"{len(image_ids)} images, e.g. {missing[:3]}")
            proposals = {image_id: stored[image_id].astype(np.float32) for image_id in image_ids}
    except (OSError, ValueError) as error:
        if isinstance(error, ProposalError):
            raise
        raise ProposalError(f"cannot read proposals file {path}: {error}") from error
    for image_id, boxes in proposals.items():
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ProposalError(f"{path}: proposals of {image_id!r} have shape {boxes.shape}, "
                                "expected (K, 4)")
    return proposals
