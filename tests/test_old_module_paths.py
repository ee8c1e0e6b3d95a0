"""Run folders written before the package split still load: their python_param modules
(ctxpred.layers, ctxpred.roi_data, ctxpred.roi_layers, ctxpred.classification) resolve to
the layers of today's packages."""
import importlib

import numpy as np

from ctxpred.data.layer import close_data_layers
from ctxpred.models.context import data_layer_params, train_net

OLD_PATHS = {("ctxpred.layers", "PatchPairData"): "ctxpred.data.layer",
             ("ctxpred.roi_data", "RoIData"): "ctxpred.detection.roi_data",
             ("ctxpred.roi_layers", "ROIPooling"): "ctxpred.detection.roi_layers",
             ("ctxpred.roi_layers", "SmoothL1Loss"): "ctxpred.detection.roi_layers",
             ("ctxpred.classification", "VocClassificationData"): "ctxpred.classification.data"}


def test_old_module_paths_name_todays_layers(caffe):
    for (old, layer), new in OLD_PATHS.items():
        assert getattr(importlib.import_module(old), layer) is \
            getattr(importlib.import_module(new), layer), f"{old}.{layer}"


def test_an_old_run_folders_train_prototxt_still_trains(caffe, photo_folder, tmp_path):
    params = data_layer_params("color_dropping", str(photo_folder), seed=2, workers=1,
                               max_patches=40)
    text = str(train_net("color_dropping", params))
    assert 'module: "ctxpred.data.layer"' in text
    old = tmp_path / "train.prototxt"
    old.write_text(text.replace('module: "ctxpred.data.layer"', 'module: "ctxpred.layers"'))
    net = caffe.Net(str(old), caffe.TRAIN)
    try:
        loss = net.forward()["loss"]
        assert np.isfinite(loss) and net.blobs["data"].data.shape[1:] == (3, 96, 96)
    finally:
        close_data_layers(net)
