"""Caffe Python layers of ctxpred.

``PatchPairData`` feeds context prediction: every forward pass delivers one
batch of 96x96 patches and the pairs to classify::

    layer {
      name: "data" type: "Python"
      top: "data" top: "select1" top: "select2" top: "label"
      python_param {
        module: "ctxpred.data.layer" layer: "PatchPairData"
        param_str: '{"source": "data/photos/train", "seed": 0, "workers": 2}'
      }
    }

Tops:

- ``data``: (N, 3, 96, 96) float32, N < 512 varies per batch. Patches after
  random resampling and colour handling (see ctxpred.data.preprocess); the RMS
  normalisation (and, for the projection net, the projection) happen inside
  the net, so that train and deploy nets share them.
- ``select1``, ``select2``: (M,) indices of each pair's first and second
  patch into ``data``, as BatchReindex wants them (float).
- ``label``: (M,) position of the second patch relative to the first, 0..7.

``param_str`` is JSON: ``source`` (folder, glob, list file or LMDB), ``root``
(for list files), ``seed``, ``workers``, ``prefetch`` (batches ready per
worker), and any field of :class:`ctxpred.data.batching.PatchPairConfig` (``mode``,
``colour``, ``noise``, ``max_patches``, ...).

Caffe's PythonLayer and its Python object hold each other, so pycaffe never
frees a Python layer, even after ``del net``. Call :func:`close_data_layers`
when done with a net; otherwise the workers stop at interpreter exit, or by
themselves when the process dies.
"""
import json

from ctxpred.data.batching import PatchPairConfig
from ctxpred.caffe.env import import_caffe
from ctxpred.caffe.netparam import python_layer_params
from ctxpred.data.images import open_source
from ctxpred.data.prefetch import BatchPrefetcher

caffe = import_caffe()

_LOADER_KEYS = {"source": None, "root": None, "seed": 0, "workers": 2, "prefetch": 3,
                "stall_seconds": 300}


def parse_param_str(param_str):
    """Split a PatchPairData param_str into loader options and a PatchPairConfig.

    Raises ValueError naming a missing source or malformed JSON.
    """
    params = python_layer_params("PatchPairData", param_str, required="source")
    loader = {key: params.pop(key, default) for key, default in _LOADER_KEYS.items()}
    return loader, PatchPairConfig.from_json(json.dumps(params))


def close_data_layers(net):
    """Stop the loader workers of every PatchPairData layer in a pycaffe Net."""
    for layer in net.layers:
        if isinstance(layer, PatchPairData):
            layer.prefetcher.close()


class PatchPairData(caffe.Layer):
    """Python data layer: patch pairs for relative-position prediction."""

    def setup(self, bottom, top):
        if bottom or len(top) != 4:
            raise ValueError("PatchPairData takes no bottoms and has 4 tops: "
                             "data, select1, select2, label")
        loader, self.config = parse_param_str(self.param_str)
        source = open_source(loader["source"], root=loader["root"])
        self.prefetcher = BatchPrefetcher(source, self.config, seed=int(loader["seed"]),
                                          workers=int(loader["workers"]),
                                          depth=int(loader["prefetch"]),
                                          stall_seconds=float(loader["stall_seconds"]))
        patch = self.config.geometry.patch
        top[0].reshape(1, 3, patch, patch)
        for index in range(1, 4):
            top[index].reshape(1)

    def reshape(self, bottom, top):
        """Shapes change per batch; forward sets them."""

    def forward(self, bottom, top):
        batch = self.prefetcher.next()
        top[0].reshape(*batch.data.shape)
        top[0].data[...] = batch.data
        for index, values in enumerate((batch.select1, batch.select2, batch.labels), start=1):
            top[index].reshape(len(values))
            top[index].data[...] = values

    def backward(self, top, propagate_down, bottom):
        """A data layer has nothing to propagate."""
