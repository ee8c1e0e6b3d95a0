"""ctxpred: context prediction (Doersch, Gupta & Efros, ICCV 2015) on real Caffe.

One package per role in the pipeline; each package's ``__init__`` lists its modules.

- ``caffe``: the one pycaffe import, net definitions read and built, layer geometry.
- ``data``: photos and image sources, patch pairs, preprocessing, the data layer.
- ``models``: the nets as NetSpec code; prototxt/ is generated from them.
- ``training``: one solver loop with logs, clean stops and resumable snapshots.
- ``weights``: caffemodel files, surgery, magic init, ONNX export.
- ``features``: one extraction path (pycaffe or onnxruntime) and feature files.
- ``figures``: the project page's figures (neighbours, activations, mining).
- ``evaluation``: pretext accuracy, frozen-feature protocols, statistics.
- ``detection``: Fast R-CNN fine-tuning on stock Caffe.
- ``classification``: VOC07 classification fine-tuning.
- ``cli``: the tools' shared flags and exit codes.
"""

__version__ = "0.1.0"
