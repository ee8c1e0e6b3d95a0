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

NET_NAMES = ("color_dropping", "projection", "vgg")
PATCH = 96
RMS_TARGET = 50.0
MEAN_RGB = (123.68, 116.78, 103.94)  # per-channel mean of the deploy input convention
NUM_POSITIONS = 8

# (name, kernel, outputs, stride, pad) of the AlexNet-style tower's convolutions.
_ALEXNET_CONVS = (("conv1", 11, 96, 4, 5), ("conv2", 5, 256, 1, 2), ("conv3", 3, 384, 1, 1),
                  ("conv4", 3, 384, 1, 1), ("conv5", 3, 256, 1, 1))
# (stage, number of 3x3 convolutions, outputs) of the VGG16 conv stack.
_VGG_STAGES = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))


@dataclass(frozen=True)
class NetOptions:
    """What varies between the variants of one net.

    batchnorm: BatchNorm layers after conv3-5, fc6 (train) and fc7 (head).
    factorized_head: compute fc7 per patch as two half-products gathered per
        pair (see :func:`pair_head`) instead of on concatenated pairs.
    """
    batchnorm: bool = True
    factorized_head: bool = False


def _learned(lr_mult=1):
    return [dict(lr_mult=lr_mult, decay_mult=1), dict(lr_mult=2 * lr_mult, decay_mult=0)]


def _frozen(count):
    return [dict(lr_mult=0, decay_mult=0)] * count


def _conv(caffe, bottom, outputs, kernel, stride=1, pad=0):
    return caffe.layers.Convolution(
        bottom, num_output=outputs, kernel_size=kernel, stride=stride, pad=pad,
        param=_learned(), weight_filler=dict(type="xavier"),
        bias_filler=dict(type="constant", value=0))


def _fc(caffe, bottom, outputs, bias_term=True):
    return caffe.layers.InnerProduct(
        bottom, num_output=outputs, bias_term=bias_term,
        param=_learned() if bias_term else _learned()[:1],
        weight_filler=dict(type="xavier"), bias_filler=dict(type="constant", value=0))


def _batchnorm(caffe, bottom):
    # Statistics are not learned (lr 0) and no Scale layer follows: a learned
    # scale could silence a layer early in training (reference).
    return caffe.layers.BatchNorm(bottom, param=_frozen(3), in_place=True)


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


def alexnet_tower(caffe, n, bottom, options):
    """conv1..conv5, pool5, fc6 (+ BatchNorm on conv3-5 and fc6); returns fc6's blob."""
    top = bottom
    for index, (name, kernel, outputs, stride, pad) in enumerate(_ALEXNET_CONVS, start=1):
        setattr(n, name, _conv(caffe, top, outputs, kernel, stride, pad))
        top = getattr(n, name)
        if options.batchnorm and index >= 3:
            setattr(n, f"bn{index}", _batchnorm(caffe, top))
        setattr(n, f"relu{index}", caffe.layers.ReLU(top, in_place=True))
        if index in (1, 2):
            setattr(n, f"pool{index}", caffe.layers.Pooling(
                top, pool=caffe.params.Pooling.MAX, kernel_size=3, stride=2))
            setattr(n, f"norm{index}", caffe.layers.LRN(
                getattr(n, f"pool{index}"), local_size=5, alpha=1e-4, beta=0.75))
            top = getattr(n, f"norm{index}")
    n.pool5 = caffe.layers.Pooling(top, pool=caffe.params.Pooling.MAX, kernel_size=3, stride=2)
    return _fc6(caffe, n, n.pool5, options)


def vgg_tower(caffe, n, bottom, options):
    """VGG16's 13 convolutions and 5 poolings on a 96x96 patch (3x3x512), then fc6."""
    top = bottom
    for stage, count, outputs in _VGG_STAGES:
        for index in range(1, count + 1):
            name = f"conv{stage}_{index}"
            setattr(n, name, _conv(caffe, top, outputs, 3, pad=1))
            top = getattr(n, name)
            setattr(n, f"relu{stage}_{index}", caffe.layers.ReLU(top, in_place=True))
        setattr(n, f"pool{stage}", caffe.layers.Pooling(
            top, pool=caffe.params.Pooling.MAX, kernel_size=2, stride=2))
        top = getattr(n, f"pool{stage}")
    return _fc6(caffe, n, top, options)


def _fc6(caffe, n, bottom, options):
    n.fc6 = _fc(caffe, bottom, 4096)
    if options.batchnorm:
        n.bn6 = _batchnorm(caffe, n.fc6)
    return n.fc6


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
        n.fc7_first = _fc(caffe, features, 4096, bias_term=False)
        n.fc7_second = _fc(caffe, features, 4096)
        n.fc7_first_pairs = caffe.layers.BatchReindex(n.fc7_first, select1)
        n.fc7_second_pairs = caffe.layers.BatchReindex(n.fc7_second, select2)
        n.fc7 = caffe.layers.Eltwise(n.fc7_first_pairs, n.fc7_second_pairs,
                                     operation=caffe.params.Eltwise.SUM)
    else:
        n.fc6_first = caffe.layers.BatchReindex(features, select1)
        n.fc6_second = caffe.layers.BatchReindex(features, select2)
        n.fc6_pairs = caffe.layers.Concat(n.fc6_first, n.fc6_second, axis=1)
        n.fc7 = _fc(caffe, n.fc6_pairs, 4096)
    n.bn7 = _batchnorm(caffe, n.fc7)
    n.relu7 = caffe.layers.ReLU(n.fc7, in_place=True)
    n.fc8 = _fc(caffe, n.fc7, 4096)
    n.relu8 = caffe.layers.ReLU(n.fc8, in_place=True)
    n.fc9 = _fc(caffe, n.fc8, NUM_POSITIONS)
    return n.fc9


def data_layer_params(net_name, source, seed=0, workers=2, **config):
    """The PatchPairData param_str (a dict) for a net: its colour handling and source."""
    colour = "projection" if net_name == "projection" else "color_dropping"
    return dict(source=source, colour=colour, seed=seed, workers=workers, **config)


def _normalised_input(caffe, n, net_name, data):
    if net_name == "projection":
        data = add_projection(caffe, n, data)
    return add_rms_normalisation(caffe, n, data)


def _tower(caffe, n, net_name, data, options):
    tower = vgg_tower if net_name == "vgg" else alexnet_tower
    return tower(caffe, n, _normalised_input(caffe, n, net_name, data), options)


def train_net(net_name, data_params, options=NetOptions()):
    """NetParameter of the training net: PatchPairData -> tower -> pair head -> loss."""
    caffe = import_caffe()
    _check_name(net_name)
    n = caffe.NetSpec()
    n.data, n.select1, n.select2, n.label = caffe.layers.Python(
        ntop=4, python_param=dict(module="ctxpred.data.layer", layer="PatchPairData",
                                  param_str=json.dumps(data_params)))
    features = _tower(caffe, n, net_name, n.data, options)
    n.relu6 = caffe.layers.ReLU(features, in_place=True)
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
    n.data = caffe.layers.Input(shape=dict(dim=[1, 3, PATCH, PATCH]))
    _tower(caffe, n, net_name, n.data, options)
    proto = n.to_proto()
    proto.name = f"context_{net_name}_deploy"
    return proto


def solver_text(net_path, snapshot_prefix, momentum=0.0, max_iter=1700000, solver_mode="CPU"):
    """Solver prototxt of the authors' code (fixed lr 1e-5, no momentum, no decay).

    The paper used momentum .999; pass it to get that variant.
    """
    return (f'net: "{net_path}"\n'
            'base_lr: 1e-05\nlr_policy: "fixed"\n'
            f"momentum: {momentum:g}\nweight_decay: 0\n"
            f"display: 1\nmax_iter: {max_iter}\nsnapshot: 2000\n"
            f'snapshot_prefix: "{snapshot_prefix}"\nsolver_mode: {solver_mode}\n')


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
