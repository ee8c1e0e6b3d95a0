"""ctxpred: context prediction (Doersch, Gupta & Efros, ICCV 2015) on real Caffe.

Modules, one idea each:

- ``caffe_env``: the one place that imports pycaffe and selects CPU or GPU.
- ``images``: image sources (folder, glob, list file, LMDB) and decoding.
- ``sampling``: patch positions on a grid or as random pairs, and labels.
- ``preprocess``: per-patch resampling and colour handling.
- ``batching``: batches of patch pairs assembled from a source.
- ``prefetch``: worker processes that fill batches in shared memory.
- ``layers``: Caffe Python layers (``PatchPairData``).
"""

__version__ = "0.1.0"
