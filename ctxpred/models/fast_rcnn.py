"""Fast R-CNN fine-tuning configurations for the context nets, as NetSpec code.

prototxt/fast_rcnn/ is generated from here (tools/make_prototxt.py) and laid
out like a checkout of rbgirshick/fast-rcnn, so that its files drop into one:

- ``models/CaffeNetGroupless/{train,test,solver}.prototxt``: Fast R-CNN's
  CaffeNet (conv1 pad 5 and frozen, pool1 / pool2 pad 1, RoI pooling 6x6 at
  1/16) without ``group: 2`` on conv2, conv4, conv5, for the AlexNet-style
  context nets (color_dropping, projection);
- ``models/VGGContext/...``: Fast R-CNN's VGG16 (conv1_x and conv2_x frozen,
  RoI pooling 7x7) with the layer names onto which the VGG-style context
  net's weights map;
- ``experiments/cfgs/``: the multiscale config (CaffeNet, the paper's
  setting) and the single-scale one (VGG: multiscale runs out of GPU memory);
- ``ctxpred/<model>/{train,test}.prototxt``: the same nets for stock Caffe,
  with ctxpred's Python layers (``ctxpred.detection.roi_data.RoIData``,
  ``ctxpred.detection.roi_layers.ROIPooling`` and ``SmoothL1Loss``) in place of the
  Fast R-CNN fork's.

The stock variant (``layers="fast_rcnn"``) uses the fork's ``ROIPooling``
and ``SmoothL1Loss`` layers and its Python data layer; writing or parsing it
with our Caffe needs the fork's ``roi_pooling_param``, which
tools/caffe_patches/07-roi-pooling-param.patch adds to caffe.proto. Its test
net declares the inputs ``data`` and ``rois`` in the net header, as the
public files do: the fork predates Caffe's Input layer.
"""
import json
from dataclasses import dataclass

from ctxpred.caffe.env import import_caffe
from ctxpred.models.backbones import (CAFFENET_SIDE, LEARNED, VGG16_SIDE, Learning,
                                      caffenet_convs, fc6_fc7, image_input, inner_product,
                                      vgg16_convs)

LAYER_SETS = ("fast_rcnn", "ctxpred")
VOC_CLASSES = 21  # 20 classes + background
SPATIAL_SCALE = 0.0625  # 1/16: conv5's stride in input pixels
CLS_SCORE_STD = 0.01
BBOX_PRED_STD = 0.001
CAFFENET_CONV1_PAD = 5  # Fast R-CNN's CaffeNet pads conv1 (BVLC's does not) ...
CAFFENET_POOL_PAD = 1  # ... and pool1, pool2
# The checked-in ctxpred variant: the small detection set (7 classes + background).
DETECTION_SET_CLASSES = 8
DETECTION_SET_PARAMS = {"dataset": "data/detection", "split": "trainval",
                        "proposals": "data/detection/proposals.npz"}

# Fast R-CNN's training defaults (lib/fast_rcnn/config.py), written into every config.
PIXEL_MEANS_BGR = (102.9801, 115.9465, 122.7717)
RNG_SEED = 3
TRAIN_SETTINGS = {"IMS_PER_BATCH": 2, "BATCH_SIZE": 128, "FG_FRACTION": 0.25,
                  "FG_THRESH": 0.5, "BG_THRESH_HI": 0.5, "BG_THRESH_LO": 0.1,
                  "USE_FLIPPED": True, "BBOX_REG": True}
TEST_SETTINGS = {"NMS": 0.3, "BBOX_REG": True}
MULTISCALE = (480, 576, 688, 864, 1200)
MULTISCALE_MAX_SIZE = 2000
SINGLE_SCALE = (600,)
SINGLE_SCALE_MAX_SIZE = 1000
# Solver: Fast R-CNN's, with the project page's iteration counts.
SOLVER_SETTINGS = dict(base_lr=0.001, lr_policy="step", gamma=0.1, stepsize=30000, display=20,
                       average_loss=100, momentum=0.9, weight_decay=0.0005)


@dataclass(frozen=True)
class FastRcnnModel:
    """One Fast R-CNN net and its configuration.

    name: folder under models/ (and the NetParameter's name). side: input
    side of the test net's declared data shape (Fast R-CNN reshapes it per
    image). pooled: RoI pooling grid side. frozen: conv layers with lr_mult 0.
    iterations: solver max_iter. scales, max_size: TRAIN and TEST image scales
    (shorter side) and cap on the longer side, in pixels. config: yml file name.
    """

    name: str
    side: int
    pooled: int
    frozen: tuple
    iterations: int
    scales: tuple
    max_size: int
    config: str
    snapshot_prefix: str


MODELS = (
    FastRcnnModel("CaffeNetGroupless", CAFFENET_SIDE, 6, ("conv1",), 150000, MULTISCALE,
                  MULTISCALE_MAX_SIZE, "caffenet_groupless_multiscale.yml",
                  "caffenet_groupless_fast_rcnn"),
    FastRcnnModel("VGGContext", VGG16_SIDE, 7, ("conv1_1", "conv1_2", "conv2_1", "conv2_2"),
                  500000, SINGLE_SCALE, SINGLE_SCALE_MAX_SIZE, "vgg_context_singlescale.yml",
                  "vgg_context_fast_rcnn"),
)
MODEL_NAMES = tuple(model.name for model in MODELS)


def model_named(name):
    """The :class:`FastRcnnModel` called ``name``; ValueError naming the choices otherwise."""
    for model in MODELS:
        if model.name == name:
            return model
    raise ValueError(f"unknown Fast R-CNN model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def _trunk(n, model, learning):
    """The conv body on ``n.data`` without pool5; returns the last conv's top (stride 16).

    CaffeNetGroupless: Fast R-CNN's CaffeNet (conv1 pad 5, pool1 / pool2 pad
    1), every convolution groupless; VGGContext: VGG16's convolutions.
    """
    if model.name == "CaffeNetGroupless":
        return caffenet_convs(n, n.data, learning, conv1_pad=CAFFENET_CONV1_PAD,
                              pool_pad=CAFFENET_POOL_PAD, pool5=False)
    return vgg16_convs(n, n.data, learning, pool5=False)


def _roi_pooling(caffe, model, features, rois, layers):
    """Layer ``roi_pool5``: each RoI max-pooled to pooled x pooled cells of ``features``."""
    params = dict(pooled_h=model.pooled, pooled_w=model.pooled, spatial_scale=SPATIAL_SCALE)
    if layers == "fast_rcnn":
        return caffe.layers.ROIPooling(features, rois, name="roi_pool5", roi_pooling_param=params)
    return caffe.layers.Python(features, rois, name="roi_pool5", python_param=dict(
        module="ctxpred.detection.roi_layers", layer="ROIPooling", param_str=json.dumps(params)))


def _detection_head(n, pooled, num_classes, learning):
    """fc6, fc7 (4096, ReLU, dropout 0.5), cls_score (K) and bbox_pred (4K), K = num_classes."""
    fc7 = fc6_fc7(n, pooled, learning)
    for name, outputs, std in (("cls_score", num_classes, CLS_SCORE_STD),
                               ("bbox_pred", 4 * num_classes, BBOX_PRED_STD)):
        inner_product(n, name, fc7, outputs, learning,
                      weight_filler=dict(type="gaussian", std=std),
                      bias_filler=dict(type="constant", value=0))


def _body(caffe, n, model, layers, num_classes):
    """Trunk, RoI pooling ``pool5`` and head on ``n.data`` and ``n.rois``; ``model.frozen``
    layers keep their weights, the others learn."""
    learning = Learning(trained=LEARNED, frozen=model.frozen)
    n.pool5 = _roi_pooling(caffe, model, _trunk(n, model, learning), n.rois, layers)
    _detection_head(n, n.pool5, num_classes, learning)


def _check_layers(layers, num_classes):
    if layers not in LAYER_SETS:
        raise ValueError(f"unknown layer set {layers!r}; choose one of {', '.join(LAYER_SETS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must count the background too (>= 2), not {num_classes}")


def train_net(model_name, layers="fast_rcnn", num_classes=VOC_CLASSES, data_params=None):
    """NetParameter of the training net: RoI data -> trunk -> RoI pooling -> fc6, fc7 -> losses.

    Tops of the data layer: data (images, BGR minus the pixel means), rois
    (R, 5: image index, x1, y1, x2, y2), labels (R), bbox_targets and
    bbox_loss_weights (R, 4 * num_classes). Losses: loss_cls (softmax over
    cls_score) and loss_bbox (smooth L1 over bbox_pred), weight 1 each.

    layers: "fast_rcnn" (the fork's RoIDataLayer, ROIPooling, SmoothL1Loss;
    ``data_params`` unused) or "ctxpred" (ctxpred's Python layers; the
    RoIData param_str is ``json.dumps(data_params)``, which is required).
    num_classes: classes including the background.
    """
    caffe = import_caffe()
    model = model_named(model_name)
    _check_layers(layers, num_classes)
    if layers == "fast_rcnn":
        data = dict(module="roi_data_layer.layer", layer="RoIDataLayer",
                    param_str=f"'num_classes': {num_classes}")
    elif data_params is None:
        raise ValueError("the ctxpred variant needs data_params (the RoIData param_str as a dict)")
    else:
        data = dict(module="ctxpred.detection.roi_data", layer="RoIData",
                    param_str=json.dumps(data_params))
    n = caffe.NetSpec()
    n.data, n.rois, n.labels, n.bbox_targets, n.bbox_loss_weights = caffe.layers.Python(
        ntop=5, python_param=data)
    _body(caffe, n, model, layers, num_classes)
    n.loss_cls = caffe.layers.SoftmaxWithLoss(n.cls_score, n.labels, loss_weight=1)
    smooth_l1_inputs = (n.bbox_pred, n.bbox_targets, n.bbox_loss_weights)
    if layers == "fast_rcnn":
        n.loss_bbox = caffe.layers.SmoothL1Loss(*smooth_l1_inputs, loss_weight=1)
    else:
        n.loss_bbox = caffe.layers.Python(*smooth_l1_inputs, loss_weight=1, python_param=dict(
            module="ctxpred.detection.roi_layers", layer="SmoothL1Loss"))
    proto = n.to_proto()
    proto.name = model.name
    return proto


def inference_net(model_name, layers="fast_rcnn", num_classes=VOC_CLASSES):
    """NetParameter of test.prototxt: data (1, 3, side, side) and rois (1, 5) -> cls_prob.

    Outputs cls_prob (R, num_classes, softmax of cls_score) and bbox_pred
    (R, 4 * num_classes). The stock variant declares its inputs in the net
    header (``input`` / ``input_shape``), the ctxpred variant as Input layers.
    """
    caffe = import_caffe()
    model = model_named(model_name)
    _check_layers(layers, num_classes)
    n = caffe.NetSpec()
    image_input(n, 1, model.side)
    n.rois = caffe.layers.Input(shape=dict(dim=[1, 5]))
    _body(caffe, n, model, layers, num_classes)
    n.cls_prob = caffe.layers.Softmax(n.cls_score)
    proto = n.to_proto()
    proto.name = model.name
    if layers == "fast_rcnn":
        _inputs_to_header(proto)
    return proto


def _inputs_to_header(proto):
    """Move the Input layers of a NetParameter into its input / input_shape header, in place."""
    inputs = [layer for layer in proto.layer if layer.type == "Input"]
    for layer in inputs:
        proto.input.append(layer.top[0])
        proto.input_shape.add().CopyFrom(layer.input_param.shape[0])
    layers = [layer for layer in proto.layer if layer.type != "Input"]
    del proto.layer[:]
    proto.layer.extend(layers)


SOLVER_ORDER = ("train_net", "base_lr", "lr_policy", "gamma", "stepsize", "display",
                "average_loss", "momentum", "weight_decay", "max_iter", "snapshot",
                "snapshot_prefix")


def solver_param(model_name):
    """SolverParameter for Fast R-CNN's tools/train_net.py (paths relative to its checkout).

    Fast R-CNN's solver (lr 0.001, step 0.1 every 30000, momentum 0.9, decay
    0.0005) with max_iter 150000 (CaffeNet) / 500000 (VGG), the project
    page's iteration counts; snapshot 0 because the training script
    snapshots itself (TRAIN.SNAPSHOT_ITERS) under snapshot_prefix.
    """
    from ctxpred.training.solvers import make_solver
    model = model_named(model_name)
    return make_solver(train_net=f"models/{model.name}/train.prototxt", **SOLVER_SETTINGS,
                       max_iter=model.iterations, snapshot=0,
                       snapshot_prefix=model.snapshot_prefix)


def solver_text(model_name):
    """:func:`solver_param` as prototxt text, in Fast R-CNN's field order."""
    from ctxpred.training.solvers import solver_text as text
    return text(solver_param(model_name), SOLVER_ORDER, comments={
        "snapshot": "Fast R-CNN's training script snapshots; Caffe's own snapshots stay off."})


def _yaml_value(value):
    if isinstance(value, tuple):  # Fast R-CNN's loader wants tuples where its defaults are
        return f"!!python/tuple [{', '.join(str(item) for item in value)}]"
    return str(value)


def config_text(model_name):
    """Fast R-CNN config (yml) of a model: scales, max size and the training defaults.

    SCALES are shorter-side lengths in pixels (TRAIN picks one per image,
    TEST uses all), MAX_SIZE caps the longer side. PIXEL_MEANS stays at
    Fast R-CNN's default, the same as :data:`PIXEL_MEANS_BGR`: its loader
    accepts no list for that array.
    """
    model = model_named(model_name)
    experiment = model.config.rsplit(".", 1)[0]
    scales = {"SCALES": model.scales, "MAX_SIZE": model.max_size}
    sections = (("TRAIN", {**scales, **TRAIN_SETTINGS}), ("TEST", {**scales, **TEST_SETTINGS}))
    lines = [f"# Fast R-CNN settings for models/{model.name} "
             "(generated by ctxpred/models/fast_rcnn.py).",
             f"# PIXEL_MEANS stays at Fast R-CNN's default, BGR {list(PIXEL_MEANS_BGR)}.",
             f"EXP_DIR: {experiment}", f"RNG_SEED: {RNG_SEED}"]
    for section, settings in sections:
        lines.append(f"{section}:")
        lines.extend(f"  {key}: {_yaml_value(value)}" for key, value in settings.items())
    return "\n".join(lines) + "\n"


def generated_files():
    """The checked-in Fast R-CNN files, as {path relative to prototxt/: text}."""
    files = {}
    for model in MODELS:
        stock = f"fast_rcnn/models/{model.name}"
        files[f"{stock}/train.prototxt"] = str(train_net(model.name))
        files[f"{stock}/test.prototxt"] = str(inference_net(model.name))
        files[f"{stock}/solver.prototxt"] = solver_text(model.name)
        files[f"fast_rcnn/experiments/cfgs/{model.config}"] = config_text(model.name)
        ours = f"fast_rcnn/ctxpred/{model.name}"
        files[f"{ours}/train.prototxt"] = str(train_net(
            model.name, "ctxpred", DETECTION_SET_CLASSES, DETECTION_SET_PARAMS))
        files[f"{ours}/test.prototxt"] = str(inference_net(model.name, "ctxpred",
                                                           DETECTION_SET_CLASSES))
    return files
