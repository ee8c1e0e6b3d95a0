"""Nets and solvers of VOC07 classification fine-tuning (ctxpred.classification.data), by NetSpec.

The towers are the detection path's deploy nets (ctxpred.models.backbones):
the groupless CaffeNet (227 x 227) for the AlexNet-style context nets and
VGG16 (224 x 224) for the VGG-style one, up to drop7; on top ``fc8_cls``
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
from ctxpred.models.backbones import CAFFENET_SIDE, VGG16_SIDE, caffenet_deploy, vgg16_deploy

ARCHITECTURES = ("caffenet", "vgg16")
SIDES = {"caffenet": CAFFENET_SIDE, "vgg16": VGG16_SIDE}
MODES = ("fc8", "fc", "all")
FIRST_TRAINED = {"fc8": "fc8_cls", "fc": "fc6", "all": None}  # None: the first layer
CLASSIFIER = "fc8_cls"
LAST_TOWER_LAYER = "drop7"
VOC_CLASSES = 20
SOLVER = (("type", '"SGD"'), ("base_lr", "0.001"), ("lr_policy", '"step"'), ("gamma", "0.5"),
          ("stepsize", "10000"), ("momentum", "0.9"), ("weight_decay", "1e-06"),
          ("clip_gradients", "10"))
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


def _tower(arch, batch):
    """The deploy net's layers from the input up to drop7 (fc8 and prob left out)."""
    proto = caffenet_deploy(group=1, batch=batch) if arch == "caffenet" else vgg16_deploy(batch)
    names = [layer.name for layer in proto.layer]
    del proto.layer[names.index(LAST_TOWER_LAYER) + 1:]
    return proto


def _set_learning(proto, mode):
    """lr_mult / decay_mult of every parameter layer for ``mode``."""
    first = FIRST_TRAINED[mode]
    training = first is None
    for layer in proto.layer:
        training = training or layer.name == first
        if layer.type not in ("Convolution", "InnerProduct"):
            continue
        del layer.param[:]
        for lr_mult in (1, 2):
            layer.param.add(lr_mult=lr_mult if training else 0, decay_mult=1 if training else 0)


def _add_classifier(proto, classes):
    layer = proto.layer.add(name=CLASSIFIER, type="InnerProduct", bottom=["fc7"],
                            top=[CLASSIFIER])
    layer.inner_product_param.num_output = classes
    layer.inner_product_param.weight_filler.type = "gaussian"
    layer.inner_product_param.weight_filler.std = 0.01
    layer.inner_product_param.bias_filler.type = "constant"
    layer.inner_product_param.bias_filler.value = 0.1


def deploy_net(arch, classes=VOC_CLASSES, batch=1):
    """NetParameter: input ``data`` (batch, 3, side, side) BGR minus the mean -> ``fc8_cls``."""
    _check(arch, "all")
    proto = _tower(arch, batch)
    _add_classifier(proto, classes)
    proto.name = f"{arch}_voc_classification_deploy"
    return proto


def train_net(arch, mode, root=DEFAULT_ROOT, split="trainval", classes=VOC_CLASSES,
              batch_size=BATCH_SIZE, seed=0):
    """NetParameter of the training net: VocClassificationData -> tower -> fc8_cls -> loss."""
    _check(arch, mode)
    caffe = import_caffe()
    proto = _tower(arch, batch_size)
    data = caffe.layers.Python(ntop=2, python_param=dict(
        module="ctxpred.classification.data", layer="VocClassificationData",
        param_str=data_layer_param(root, split, batch_size, SIDES[arch], seed)))
    n = caffe.NetSpec()
    n.data, n.label = data
    head = n.to_proto()
    head.layer[0].name = "data"
    layers = [head.layer[0]] + [layer for layer in proto.layer if layer.type != "Input"]
    del proto.layer[:]
    proto.layer.extend(layers)
    _add_classifier(proto, classes)
    loss = proto.layer.add(name="loss", type="SigmoidCrossEntropyLoss",
                           bottom=[CLASSIFIER, "label"], top=["loss"])
    loss.loss_param.ignore_label = IGNORE_LABEL
    loss.loss_param.normalization = caffe.proto.caffe_pb2.LossParameter.BATCH_SIZE
    _set_learning(proto, mode)
    proto.name = f"{arch}_voc_classification_{mode}"
    return proto


def solver_text(train_path, snapshot_prefix, iterations=ITERATIONS, base_lr=None,
                stepsize=None, snapshot=10000, random_seed=None):
    """The reference's solver for ``train_path``; base_lr / stepsize override its values."""
    settings = dict(SOLVER)
    if base_lr is not None:
        settings["base_lr"] = repr(float(base_lr))
    if stepsize is not None:
        settings["stepsize"] = str(int(stepsize))
    lines = [f'train_net: "{train_path}"'] + [f"{key}: {value}" for key, value in settings.items()]
    lines += [f"max_iter: {iterations}", "display: 0", f"snapshot: {snapshot}",
              f'snapshot_prefix: "{snapshot_prefix}"']
    if random_seed is not None:
        lines.append(f"random_seed: {random_seed}")
    return "\n".join(lines) + "\n"


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
