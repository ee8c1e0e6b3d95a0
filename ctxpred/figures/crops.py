"""Pixels of boxes of an image source, to be shown on a figure's page.

The figures compute features once, then show a few of the patches again: the
pixels are cut a second time from the images, decoded exactly as the
features' patches were (:func:`ctxpred.data.images.decode_rgb_within`, the
same ``max_pixels``), so boxes recorded in the decoded image's pixels cut the
same pixels.
"""
import numpy as np

from ctxpred.data.images import decode_rgb_within


def crop_boxes(source, boxes, max_pixels):
    """{(name, x0, y0, x1, y1): (y1 - y0, x1 - x0, 3) uint8 RGB} of ``boxes``.

    source: a :class:`ctxpred.data.images.ImageSource`; boxes: iterable of
    (image name, x0, y0, x1, y1), pixels of the image decoded within
    ``max_pixels`` (None: full size), exclusive ends. Each image is decoded
    once, whatever the number of its boxes.
    """
    by_image = {}
    for box in set(boxes):
        by_image.setdefault(box[0], []).append(box)
    index_of = {source.name(index): index for index in range(len(source))}
    pixels = {}
    for name in sorted(by_image):
        image, _ = decode_rgb_within(source.read_bytes(index_of[name]), name, max_pixels)
        for box in by_image[name]:
            x0, y0, x1, y1 = box[1:]
            pixels[box] = np.ascontiguousarray(image[y0:y1, x0:x1])
    return pixels
