"""Nets and solvers of VOC07 classification fine-tuning (ctxpred.classification.data), by NetSpec.

The towers are the detection path's deploy nets, built by the same
ctxpred.models.backbones functions: the groupless CaffeNet (227 x 227) for
the AlexNet-style context nets and VGG16 (224 x 224) for the VGG-style one,
up to drop7; on top ``fc8_cls``
(one output per class, N(0, 0.01) weights and bias 0.1, as the reference
re-initialises it). Modes (which layers train, the reference's
``--train-from``):

- ``fc8``: only fc8_cls; conv1..fc7 frozen;
- ``fc``: fc6, fc7, fc8_cls (everything from pool5 on);
- ``all``: every layer.

Trained layers get lr_mult 1 / 2 (weights / bias) and decay_mult 1, frozen
ones 0. The train net reads the data with the Python layer
``ctxpred.classification.data.VocClassificationData`` and ends in Caffe's
SigmoidCrossEntropyLoss (ignore_label 255, normalization BATCH_SIZE); the
deploy net takes ``data`` (N, 3, side, side) and answers ``fc8_cls``.

Solver (the reference's train_cls.py): SGD, base_lr 0.001, momentum 0.9,
lr x0.5 every 10000 iterations, weight decay 1e-6, gradient clipping 10,
80000 iterations, batch 16.
"""
from ctxpred.caffe.env import import_caffe
from ctxpred.classification.data import IGNORE_LABEL, data_layer_param
from ctxpred.models.backbones import (CAFFENET_CONV_NAMES, CAFFENET_SIDE, FC_NAMES,
                                      VGG16_CONV_NAMES, VGG16_SIDE, Learning, caffenet_convs,
                                      fc6_fc7, image_input, inner_product, vgg16_convs)

ARCHITECTURES = ("caffenet", "vgg16")
SIDES = {"caffenet": CAFFENET_SIDE, "vgg16": VGG16_SIDE}
MODES = ("fc8", "fc", "all")
FIRST_TRAINED = {"fc8": "fc8_cls", "fc": "fc6", "all": None}  # None: the first layer
CLASSIFIER = "fc8_cls"
PARAMETER_LAYERS = {arch: convs + FC_NAMES + (CLASSIFIER,) for arch, convs in
                    (("caffenet", CAFFENET_CONV_NAMES), ("vgg16", VGG16_CONV_NAMES))}
# param of a trained layer: weights / bias at lr_mult 1 / 2, both with weight decay.
TRAINED = (dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=1))
VOC_CLASSES = 20
SOLVER = dict(type="SGD", base_lr=0.001, lr_policy="step", gamma=0.5, stepsize=10000,
              momentum=0.9, weight_decay=1e-6, clip_gradients=10)
ITERATIONS = 80000
BATCH_SIZE = 16
DEFAULT_ROOT = "data/VOC2007"


def architecture_for(net_name):
    """The classification tower of a context net: vgg -> vgg16, else caffenet."""
    return "vgg16" if net_name == "vgg" else "caffenet"


def _check(arch, mode):
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r} (one of {', '.join(ARCHITECTURES)})")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")


def _learning(arch, mode):
    """The parameter layers before ``FIRST_TRAINED[mode]`` frozen, the others TRAINED."""
    layers = PARAMETER_LAYERS[arch]
    first = FIRST_TRAINED[mode]
    return Learning(trained=TRAINED, frozen=layers[:layers.index(first)] if first else ())


def _tower_and_classifier(n, arch, classes, learning=Learning()):
    """On ``n.data``: the deploy net's layers up to drop7 (groupless CaffeNet or VGG16), then
    ``fc8_cls`` with ``classes`` outputs; returns its top."""
    if arch == "caffenet":
        pool5 = caffenet_convs(n, n.data, learning)
    else:
        pool5 = vgg16_convs(n, n.data, learning, explicit_stride=False)
    return inner_product(n, CLASSIFIER, fc6_fc7(n, pool5, learning), classes, learning,
                         weight_filler=dict(type="gaussian", std=0.01),
                         bias_filler=dict(type="constant", value=0.1))


def deploy_net(arch, classes=VOC_CLASSES, batch=1):
    """NetParameter: input ``data`` (batch, 3, side, side) BGR minus the mean -> ``fc8_cls``."""
    _check(arch, "all")
    n = import_caffe().NetSpec()
    image_input(n, batch, SIDES[arch])
    _tower_and_classifier(n, arch, classes)
    proto = n.to_proto()
    proto.name = f"{arch}_voc_classification_deploy"
    return proto


def train_net(arch, mode, root=DEFAULT_ROOT, split="trainval", classes=VOC_CLASSES,
              batch_size=BATCH_SIZE, seed=0):
    """NetParameter of the training net: VocClassificationData -> tower -> fc8_cls -> loss."""
    _check(arch, mode)
    caffe = import_caffe()
    n = caffe.NetSpec()
    n.data, n.label = caffe.layers.Python(ntop=2, python_param=dict(
        module="ctxpred.classification.data", layer="VocClassificationData",
        param_str=data_layer_param(root, split, batch_size, SIDES[arch], seed)))
    scores = _tower_and_classifier(n, arch, classes, _learning(arch, mode))
    n.loss = caffe.layers.SigmoidCrossEntropyLoss(scores, n.label, loss_param=dict(
        ignore_label=IGNORE_LABEL, normalization=caffe.params.Loss.BATCH_SIZE))
    proto = n.to_proto()
    proto.name = f"{arch}_voc_classification_{mode}"
    return proto


SOLVER_ORDER = ("train_net", "type", "base_lr", "lr_policy", "gamma", "stepsize", "momentum",
                "weight_decay", "clip_gradients", "max_iter", "display", "snapshot",
                "snapshot_prefix", "random_seed")


def solver_param(train_path, snapshot_prefix, iterations=ITERATIONS, base_lr=None,
                 stepsize=None, snapshot=10000, random_seed=None):
    """The reference's SolverParameter for ``train_path``; base_lr / stepsize override its
    values."""
    from ctxpred.training.solvers import make_solver, set_fields
    solver = make_solver(train_net=train_path, **SOLVER, max_iter=iterations, display=0,
                         snapshot=snapshot, snapshot_prefix=snapshot_prefix,
                         random_seed=random_seed)
    return set_fields(solver, **{name: value for name, value in
                                 (("base_lr", base_lr), ("stepsize", stepsize))
                                 if value is not None})


def solver_text(train_path, snapshot_prefix, iterations=ITERATIONS, base_lr=None,
                stepsize=None, snapshot=10000, random_seed=None):
    """:func:`solver_param` as prototxt text, in the reference's field order."""
    from ctxpred.training.solvers import solver_text as text
    return text(solver_param(train_path, snapshot_prefix, iterations, base_lr, stepsize,
                             snapshot, random_seed), SOLVER_ORDER)


def generated_files():
    """The checked-in nets and solvers, {path relative to prototxt/: text}."""
    files = {}
    for arch in ARCHITECTURES:
        folder = f"voc_classification/{arch}"
        files[f"{folder}/deploy.prototxt"] = str(deploy_net(arch))
        for mode in MODES:
            files[f"{folder}/train_{mode}.prototxt"] = str(train_net(arch, mode))
            files[f"{folder}/solver_{mode}.prototxt"] = solver_text(
                f"prototxt/{folder}/train_{mode}.prototxt",
                f"runs/voc_classification/{arch}_{mode}/model")
    return files
