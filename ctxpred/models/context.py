"""The context-prediction nets as Caffe NetSpec code; prototxt/ is generated from here.

Three nets, each a patch tower shared by all patches of a batch and a pair
head that classifies the relative position of two patches:

- ``projection``: AlexNet-style tower; the input is projected off the
  green-magenta axis a = (-1, 2, -1) inside the net.
- ``color_dropping``: the same tower; the data layer drops two colour channels.
- ``vgg``: the 16-layer VGG conv stack on 96x96 patches (colour dropping).

Input normalisation lives in the net (train and deploy alike): each patch is
scaled to root-mean-square 50, x * 50 / sqrt(mean(x^2)), with a Reduction
(SUMSQ), a Power and a Scale layer. That is the reference's normalisation
exactly; an MVN layer would also subtract the patch mean, which the reference
does not do. The projection B = I - a^T a / (a a^T) is written with
parameter-free Slice / Eltwise / Concat layers rather than a 1x1 convolution,
so it is fixed by the prototxt alone and cannot be lost or trained by a
solver that starts from the filler.

Layer names follow the authors' code (conv1..conv5, pool1, norm1, pool2,
norm2, pool5, fc6..fc9, bn3..bn7, relu1..relu8; VGG16's conv1_1..conv5_3), so
that weights move between nets by name.
"""
import json
from dataclasses import dataclass
from pathlib import Path

from ctxpred.caffe.env import import_caffe
from ctxpred.data.preprocess import PROJECTION_AXIS
from ctxpred.models.backbones import (FC_OUTPUTS, LEARNED, Learning, caffenet_convs,
                                      frozen_batchnorm, image_input, inner_product, relu,
                                      vgg16_convs)

NET_NAMES = ("color_dropping", "projection", "vgg")
PATCH = 96
RMS_TARGET = 50.0
MEAN_RGB = (123.68, 116.78, 103.94)  # per-channel mean of the deploy input convention
NUM_POSITIONS = 8
CONV1_PAD = 5  # the AlexNet-style tower pads conv1 (96x96 patch: conv1 24x24, pool5 3x3)
# Every layer of the context nets learns, from Xavier weights and zero biases.
LEARNING = Learning(trained=LEARNED, fillers=dict(weight_filler=dict(type="xavier"),
                                                  bias_filler=dict(type="constant", value=0)))


@dataclass(frozen=True)
class NetOptions:
    """What varies between the variants of one net.

    batchnorm: BatchNorm layers after conv3-5, fc6 (train) and fc7 (head).
    factorized_head: compute fc7 per patch as two half-products gathered per
        pair (see :func:`pair_head`) instead of on concatenated pairs.
    """
    batchnorm: bool = True
    factorized_head: bool = False


def _fc(n, name, bottom, outputs, bias_term=True):
    """InnerProduct ``name`` of a context net; bias_term is written out, as the reference does."""
    return inner_product(n, name, bottom, outputs, LEARNING, bias_term=bias_term)


def add_projection(caffe, n, bottom):
    """Remove the component along a = (-1, 2, -1) from every pixel: B x."""
    a = PROJECTION_AXIS
    norm2 = float(sum(v * v for v in a))
    n.data_r, n.data_g, n.data_b = caffe.layers.Slice(bottom, slice_param=dict(axis=1), ntop=3)
    channels = (n.data_r, n.data_g, n.data_b)
    # c = (a . x) / (a . a); then channel k becomes x_k - a_k c.
    n.data_along_a = caffe.layers.Eltwise(*channels, operation=caffe.params.Eltwise.SUM,
                                          coeff=[v / norm2 for v in a])
    projected = []
    for name, channel, a_k in zip("rgb", channels, a):
        setattr(n, f"data_proj_{name}", caffe.layers.Eltwise(
            channel, n.data_along_a, operation=caffe.params.Eltwise.SUM, coeff=[1, -a_k]))
        projected.append(getattr(n, f"data_proj_{name}"))
    n.data_projected = caffe.layers.Concat(*projected, axis=1)
    return n.data_projected


def add_rms_normalisation(caffe, n, bottom, patch=PATCH):
    """Scale each patch to root-mean-square RMS_TARGET over its C x H x W values."""
    n.data_sumsq = caffe.layers.Reduction(bottom, operation=caffe.params.Reduction.SUMSQ, axis=1)
    # (sumsq / (3 p^2 50^2))^-1/2 = 50 / rms; the tiny shift keeps a blank patch finite.
    n.data_rms_factor = caffe.layers.Power(n.data_sumsq, power=-0.5,
                                           scale=1.0 / (3 * patch * patch * RMS_TARGET ** 2),
                                           shift=1e-12)
    n.data_normalised = caffe.layers.Scale(bottom, n.data_rms_factor, axis=0)
    return n.data_normalised


def patch_tower(n, net_name, data, options):
    """The tower on mean-subtracted (N, 3, 96, 96) patches ``data``; returns fc6's top (N, 4096).

    The input is projected (projection net) and RMS-normalised in the net,
    then goes through the conv body and pool5: for the AlexNet-style nets
    CaffeNet's convolutions with conv1 padded and, with ``options.batchnorm``,
    BatchNorm on conv3-5 (pool5 256x3x3); for vgg VGG16's (pool5 512x3x3).
    fc6 follows, with BatchNorm bn6 when ``options.batchnorm``, before any ReLU.
    """
    normalised = _normalised_input(import_caffe(), n, net_name, data)
    if net_name == "vgg":
        pool5 = vgg16_convs(n, normalised, LEARNING)
    else:
        pool5 = caffenet_convs(n, normalised, LEARNING, conv1_pad=CONV1_PAD,
                               batchnorm=options.batchnorm)
    fc6 = _fc(n, "fc6", pool5, FC_OUTPUTS)
    if options.batchnorm:
        frozen_batchnorm(n, "bn6", fc6)
    return fc6


def pair_head(caffe, n, features, select1, select2, options):
    """fc7 on each pair (first, second), BatchNorm, fc8, fc9: 8 scores per pair.

    The reference concatenates the two patches' fc6 features (8192) and runs
    fc7 on every pair. fc7 is linear before its BatchNorm, so
    fc7([f1, f2]) = A f1 + B f2 + b with A, B the halves of its weights; the
    factorized head computes A f and B f once per PATCH (``fc7_first``,
    ``fc7_second``) and gathers them per pair, the same numbers for about a
    fifth of the work at 4.5 pairs per patch.
    """
    if options.factorized_head:
        _fc(n, "fc7_first", features, FC_OUTPUTS, bias_term=False)
        _fc(n, "fc7_second", features, FC_OUTPUTS)
        n.fc7_first_pairs = caffe.layers.BatchReindex(n.fc7_first, select1)
        n.fc7_second_pairs = caffe.layers.BatchReindex(n.fc7_second, select2)
        n.fc7 = caffe.layers.Eltwise(n.fc7_first_pairs, n.fc7_second_pairs,
                                     operation=caffe.params.Eltwise.SUM)
    else:
        n.fc6_first = caffe.layers.BatchReindex(features, select1)
        n.fc6_second = caffe.layers.BatchReindex(features, select2)
        n.fc6_pairs = caffe.layers.Concat(n.fc6_first, n.fc6_second, axis=1)
        _fc(n, "fc7", n.fc6_pairs, FC_OUTPUTS)
    frozen_batchnorm(n, "bn7", n.fc7)
    relu(n, "relu7", n.fc7)
    _fc(n, "fc8", n.fc7, FC_OUTPUTS)
    relu(n, "relu8", n.fc8)
    return _fc(n, "fc9", n.fc8, NUM_POSITIONS)


def data_layer_params(net_name, source, seed=0, workers=2, **config):
    """The PatchPairData param_str (a dict) for a net: its colour handling and source."""
    colour = "projection" if net_name == "projection" else "color_dropping"
    return dict(source=source, colour=colour, seed=seed, workers=workers, **config)


def _normalised_input(caffe, n, net_name, data):
    if net_name == "projection":
        data = add_projection(caffe, n, data)
    return add_rms_normalisation(caffe, n, data)


def train_net(net_name, data_params, options=NetOptions()):
    """NetParameter of the training net: PatchPairData -> tower -> pair head -> loss."""
    caffe = import_caffe()
    _check_name(net_name)
    n = caffe.NetSpec()
    n.data, n.select1, n.select2, n.label = caffe.layers.Python(
        ntop=4, python_param=dict(module="ctxpred.data.layer", layer="PatchPairData",
                                  param_str=json.dumps(data_params)))
    features = patch_tower(n, net_name, n.data, options)
    relu(n, "relu6", features)
    scores = pair_head(caffe, n, features, n.select1, n.select2, options)
    # Summed over pairs, as the reference; the log divides by the pair count.
    n.loss = caffe.layers.SoftmaxWithLoss(scores, n.label,
                                          loss_param=dict(normalization=caffe.params.Loss.NONE))
    n.accuracy = caffe.layers.Accuracy(scores, n.label)
    proto = n.to_proto()
    proto.name = f"context_{net_name}_train"
    return proto


def snapshot_param(net_name):
    """NetParameter of the training net whose snapshots hold a net's BatchNorm layers.

    Its data source is a placeholder: it serves to fold BatchNorm
    (:func:`ctxpred.weights.surgery.fold_batchnorm`), not to train.
    """
    return train_net(net_name, data_layer_params(net_name, "unused"))


def deploy_net(net_name, options=NetOptions(batchnorm=False)):
    """NetParameter of the feature net: mean-subtracted RGB 1x3x96x96 -> fc6 (before ReLU)."""
    caffe = import_caffe()
    _check_name(net_name)
    n = caffe.NetSpec()
    patch_tower(n, net_name, image_input(n, 1, PATCH), options)
    proto = n.to_proto()
    proto.name = f"context_{net_name}_deploy"
    return proto


SOLVER_ORDER = ("net", "base_lr", "lr_policy", "momentum", "weight_decay", "display",
                "max_iter", "snapshot", "snapshot_prefix", "solver_mode")


def solver_param(net_path, snapshot_prefix, momentum=0.0, max_iter=1700000, solver_mode="CPU"):
    """SolverParameter of the authors' code (fixed lr 1e-5, no momentum, no decay).

    The paper used momentum .999; pass it to get that variant.
    """
    from ctxpred.training.solvers import make_solver
    return make_solver(net=net_path, base_lr=1e-5, lr_policy="fixed", momentum=momentum,
                       weight_decay=0, display=1, max_iter=max_iter, snapshot=2000,
                       snapshot_prefix=snapshot_prefix, solver_mode=solver_mode)


def solver_text(net_path, snapshot_prefix, momentum=0.0, max_iter=1700000, solver_mode="CPU"):
    """:func:`solver_param` as prototxt text, in the reference's field order."""
    from ctxpred.training.solvers import solver_text as text
    return text(solver_param(net_path, snapshot_prefix, momentum, max_iter, solver_mode),
                SOLVER_ORDER)


def _check_name(net_name):
    if net_name not in NET_NAMES:
        raise ValueError(f"unknown net {net_name!r}; choose one of {', '.join(NET_NAMES)}")


def generated_files(default_source="data/photos/train"):
    """Every checked-in prototxt under prototxt/, as {relative path: text}."""
    from ctxpred.models import classification as classification_nets
    from ctxpred.models import backbones as detection_nets
    from ctxpred.models import fast_rcnn
    files = detection_nets.generated_files()
    files.update(fast_rcnn.generated_files())
    files.update(classification_nets.generated_files())
    for name in NET_NAMES:
        params = data_layer_params(name, default_source)
        files[f"{name}/train.prototxt"] = str(train_net(name, params))
        files[f"{name}/train_factorized.prototxt"] = str(
            train_net(name, params, NetOptions(factorized_head=True)))
        files[f"{name}/train_no_bn.prototxt"] = str(
            train_net(name, params, NetOptions(batchnorm=False)))
        files[f"{name}/deploy.prototxt"] = str(deploy_net(name))
        files[f"{name}/solver.prototxt"] = solver_text(f"prototxt/{name}/train.prototxt",
                                                       f"runs/{name}/model")
        files[f"{name}/solver_paper.prototxt"] = solver_text(
            f"prototxt/{name}/train.prototxt", f"runs/{name}/model", momentum=0.999)
    return files


def write_prototxts(folder):
    """(Re)generate prototxt/ under ``folder``; returns the paths written."""
    written = []
    for relative, text in generated_files().items():
        path = Path(folder, relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
