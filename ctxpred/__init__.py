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
- ``trainlog``: train.log buffered and de-duplicated on resume, and the
  running summary training.png is drawn from.
- ``snapshots``: atomic snapshot pairs, their verification on resume, the
  run-folder lock.
- ``exits``: the tools' exit codes and the one-line error wrapper.
- ``evaluation``: relative-position accuracy on held-out images.
- ``weights``: caffemodel files as named numpy arrays.
- ``surgery``: weight surgery (fc7 layouts, BatchNorm folding, groupless, no-fc6).
- ``magic_init``: data-dependent initialisation (Kraehenbuehl et al.).
- ``magic_init_reference``: the reference's procedure, as the yardstick of tests
  and benchmarks.
- ``features``: fc6 features of patches, and dense features.
- ``onnx_export``: deploy nets to ONNX.
- ``search``, ``pages``: nearest-neighbour search and static HTML pages.
- ``activations``: receptive fields and streaming top-k for maximal activations.
- ``mining``: visual data mining (constellations, geometric verification,
  purity-coverage).
- ``retrieval_proxy``: a number for nearest-neighbour quality (rank-1
  retrieval of augmented copies).
- ``fast_rcnn``: Fast R-CNN configs as NetSpec code (prototxt/fast_rcnn/ is
  generated).
- ``detection_init``: context model -> Fast R-CNN initial weights (fold
  BatchNorm, conv layers, magic init).
- ``roi_layers``: ROIPooling and SmoothL1Loss as Caffe Python layers.
- ``voc``: VOC-format annotations and VOC average precision.
- ``synthetic_scenes``: object cut-outs pasted onto photos at known boxes.
- ``proposals``: selective-search proposals, stored per image.
- ``detection``: Fast R-CNN's roidb, RoI sampling, box regression, detection.
- ``roi_data``: the RoIData Caffe Python layer (Fast R-CNN minibatches).
- ``detector``: training and testing a Fast R-CNN run in stock Caffe.
- ``classification``, ``classification_nets``, ``classifier``: VOC07
  classification fine-tuning (data layer, nets, the run and its mAP).
"""

__version__ = "0.1.0"
