"""ctxpred: context prediction (Doersch, Gupta & Efros, ICCV 2015) on real Caffe.

Modules, one idea each:

- ``caffe_env``: the one place that imports pycaffe and selects CPU or GPU.
- ``images``: image sources (folder, glob, list file, LMDB) and decoding.
- ``sampling``: patch positions on a grid or as random pairs, and labels.
- ``preprocess``: per-patch resampling and colour handling.
- ``batching``: batches of patch pairs assembled from a source.
- ``prefetch``: worker processes that fill batches in shared memory.
- ``layers``: Caffe Python layers (``PatchPairData``).
- ``nets``: the context-prediction nets as NetSpec code (prototxt/ is generated).
- ``detection_nets``: the groupless CaffeNet and VGG16 for detection.
- ``training``: the training loop (resume, clean stops, divergence watch, logs).
- ``evaluation``: relative-position accuracy on held-out images.
- ``weights``: caffemodel files as named numpy arrays.
- ``surgery``: weight surgery (fc7 layouts, BatchNorm folding, groupless, no-fc6).
- ``magic_init``: data-dependent initialisation (Kraehenbuehl et al.).
- ``features``: fc6 features of patches, and dense features.
- ``onnx_export``: deploy nets to ONNX.
- ``search``, ``pages``: nearest-neighbour search and static HTML pages.
"""

__version__ = "0.1.0"
