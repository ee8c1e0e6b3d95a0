"""Caffe Python data layer for Fast R-CNN training on a VOC-format dataset.

Stands in for the public Fast R-CNN code's ``roi_data_layer.layer`` (which
gets its roidb from the training script) so that a train net runs in plain
Caffe, ``caffe train`` included::

    layer {
      name: "data" type: "Python"
      top: "data" top: "rois" top: "labels" top: "bbox_targets" top: "bbox_loss_weights"
      python_param {
        module: "ctxpred.detection.roi_data" layer: "RoIData"
        param_str: '{"dataset": "data/detection", "split": "trainval"}'
      }
    }

``param_str`` is JSON: ``dataset`` (a VOC devkit-style folder with
Annotations/, JPEGImages/, ImageSets/Main/ and classes.txt), ``split``,
``proposals`` (default DATASET/proposals.npz), ``classes`` (default: the
dataset's classes.txt), ``seed``, ``cache_mb`` (decoded images kept in
memory, default 1024) and any field of
:class:`ctxpred.detection.roidb.DetectionConfig` (``scales``, ``max_size``,
``ims_per_batch``, ``batch_size``, ``fg_fraction``, ...).

Tops per forward pass, for ``ims_per_batch`` images:

- ``data`` (N, 3, H, W) float32: BGR images minus the pixel means, shorter
  side resized to one of ``scales`` (drawn per batch), zero-padded.
- ``rois`` (R, 5): batch index and box (x1, y1, x2, y2) in ``data``'s pixels.
- ``labels`` (R,): class of each RoI, 0 for background.
- ``bbox_targets``, ``bbox_loss_weights`` (R, 4 * num_classes): normalised
  regression targets in the columns of the RoI's class, weights 1 there.

Images are visited in a random order, reshuffled each epoch (seeded). The
regression targets are normalised by per-class means and standard deviations
(``bbox_means``, ``bbox_stds`` attributes, (num_classes, 4)); fold them into
bbox_pred with :func:`ctxpred.detection.roidb.unnormalised_bbox_weights` before
testing, as Fast R-CNN's snapshots do.
"""
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ctxpred.caffe.env import import_caffe
from ctxpred.caffe.netparam import python_layer_params
from ctxpred.detection.roidb import (DatasetError, DetectionConfig, build_roidb, image_blob,
                                     normalised_targets, read_classes, read_image, sample_rois,
                                     target_statistics, usable_entries)

caffe = import_caffe()

_LAYER_KEYS = ("dataset", "split", "proposals", "classes", "seed", "cache_mb")
TOP_NAMES = ("data", "rois", "labels", "bbox_targets", "bbox_loss_weights")


def parse_param_str(param_str):
    """RoIData's param_str -> (layer options dict, DetectionConfig); errors name the bad value."""
    params = python_layer_params("RoIData", param_str, required="dataset")
    options = {key: params.pop(key) for key in _LAYER_KEYS if key in params}
    options.setdefault("split", "trainval")
    options.setdefault("proposals", str(Path(options["dataset"], "proposals.npz")))
    options.setdefault("seed", 3)
    options.setdefault("cache_mb", 1024)
    return options, DetectionConfig.from_dict(params)


class ImageCache:
    """Decoded BGR images by path, least recently used dropped beyond ``limit_bytes``."""

    def __init__(self, limit_bytes):
        self.limit_bytes = limit_bytes
        self.images = OrderedDict()
        self.size = 0

    def get(self, path, config):
        """(BGR image, full size) of :func:`ctxpred.detection.roidb.read_image`."""
        item = self.images.get(path)
        if item is not None:
            self.images.move_to_end(path)
            return item
        item = self.images[path] = read_image(path, config)
        self.size += item[0].nbytes
        while self.size > self.limit_bytes and len(self.images) > 1:
            _, (dropped, _) = self.images.popitem(last=False)
            self.size -= dropped.nbytes
        return item


class RoIData(caffe.Layer):
    """Python data layer: Fast R-CNN minibatches from a VOC-format dataset."""

    def setup(self, bottom, top):
        if bottom or len(top) != len(TOP_NAMES):
            raise ValueError(f"RoIData takes no bottoms and has {len(TOP_NAMES)} tops: "
                             f"{', '.join(TOP_NAMES)}")
        options, self.config = parse_param_str(self.param_str)
        self.classes = options.get("classes") or read_classes(options["dataset"])
        self.num_classes = len(self.classes) + 1
        roidb = build_roidb(options["dataset"], options["split"], options["proposals"],
                            self.classes, self.config)
        self.roidb, dropped = usable_entries(roidb, self.config)
        if dropped:
            print(f"RoIData: {dropped} of {len(roidb)} roidb entries of {options['dataset']} "
                  f"split {options['split']!r} have no foreground or background RoI and are "
                  "left out", flush=True)
        if not self.roidb:
            raise DatasetError(f"no image of {options['dataset']} split {options['split']!r} "
                               "has a RoI to train on")
        self.bbox_means, self.bbox_stds = target_statistics(self.roidb, self.num_classes)
        normalised_targets(self.roidb, self.bbox_means, self.bbox_stds)
        self.rng = np.random.default_rng(int(options["seed"]))
        self.cache = ImageCache(int(options["cache_mb"]) << 20)
        self.order, self.cursor = self.rng.permutation(len(self.roidb)), 0
        top[0].reshape(self.config.ims_per_batch, 3, max(self.config.scales),
                       self.config.max_size)
        top[1].reshape(1, 5)
        top[2].reshape(1)
        top[3].reshape(1, 4 * self.num_classes)
        top[4].reshape(1, 4 * self.num_classes)

    def next_entries(self):
        """The roidb entries of the next minibatch (a new permutation each epoch)."""
        picked = []
        for _ in range(self.config.ims_per_batch):
            if self.cursor == len(self.order):
                self.order, self.cursor = self.rng.permutation(len(self.roidb)), 0
            picked.append(self.roidb[self.order[self.cursor]])
            self.cursor += 1
        return picked

    def minibatch(self):
        """One minibatch as a dict of the five top arrays."""
        entries = self.next_entries()
        scale = self.config.scales[int(self.rng.integers(len(self.config.scales)))]
        loaded = [self.cache.get(entry.image, self.config) for entry in entries]
        images = [image[:, ::-1] if entry.flipped else image
                  for (image, _), entry in zip(loaded, entries)]
        data, factors = image_blob(images, self.config, scale, [size for _, size in loaded])
        rois_per_image = self.config.batch_size // self.config.ims_per_batch
        parts = [sample_rois(entry, rois_per_image, self.num_classes, self.config, self.rng)
                 for entry in entries]
        rois = np.vstack([np.hstack([np.full((len(boxes), 1), index, np.float32),
                                     boxes * factors[index]])
                          for index, (boxes, *_) in enumerate(parts)])
        return dict(data=data, rois=rois,
                    labels=np.concatenate([part[1] for part in parts]).astype(np.float32),
                    bbox_targets=np.vstack([part[2] for part in parts]),
                    bbox_loss_weights=np.vstack([part[3] for part in parts]))

    def reshape(self, bottom, top):
        """Shapes change per batch; forward sets them."""

    def forward(self, bottom, top):
        batch = self.minibatch()
        for index, name in enumerate(TOP_NAMES):
            top[index].reshape(*batch[name].shape)
            top[index].data[...] = batch[name]

    def backward(self, top, propagate_down, bottom):
        """A data layer has nothing to propagate."""
