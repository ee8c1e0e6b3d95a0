"""The CaffeNet/AlexNet and VGG16 bodies, each written once, and the deploy nets built on them.

Every ctxpred net with one of these bodies builds it here: the context nets'
patch towers (``context``), Fast R-CNN (``fast_rcnn``), VOC07 classification
(``classification``) and the two deploy nets below. In the style of pycaffe's
net_spec, each function adds layers to a NetSpec ``n`` on a bottom Top and
returns the top of its last layer; layer names are the standard ones
(conv1..conv5, relu1..relu5, pool1, norm1, pool2, norm2, pool5; conv1_1..
conv5_3, relu1_1..relu5_3, pool1..pool5; fc6, relu6, drop6, fc7, relu7,
drop7), so that weights move between nets by name. ReLU, BatchNorm and
Dropout work in place. What differs between callers is an explicit option:
:class:`Learning` (lr multipliers, frozen layers, fillers), conv1 and pooling
padding, groups, BatchNorm, whether pool5 is included.

The context nets' conv layers are the starting point for detection
fine-tuning (fold BatchNorm -> "no fc6" model -> magic init -> Fast R-CNN).
Their weights load by layer name into:

- ``groupless_caffenet.prototxt``: BVLC's CaffeNet deploy net (227x227 input)
  with ``group: 2`` removed from conv2, conv4 and conv5. The AlexNet-style
  context nets train those layers with group 1, so their shapes (conv2
  256x96x5x5, conv4 384x384x3x3, conv5 256x384x3x3) fit only this variant.
- ``vgg16.prototxt``: the standard VGG16 deploy net (224x224 input), the
  counterpart for the VGG-style context net (VGG has no groups).

Both take mean-subtracted input as the original nets do (no in-net RMS
normalisation: magic init rescales the layers to the data). Layers without
loaded weights (fc6, fc7, fc8 of a "no fc6" model) keep Caffe's default
filler, zeros, which is what magic init looks for. fc6 differs from the
context nets' fc6 (9216 = 6x6x256, resp. 25088 = 7x7x512 inputs against
2304 resp. 4608): that is why the "no fc6" models exist.
"""
from dataclasses import dataclass, field

from ctxpred.caffe.env import import_caffe

CAFFENET_SIDE = 227
VGG16_SIDE = 224
IMAGENET_CLASSES = 1000
FC_OUTPUTS = 4096  # outputs of fc6 and fc7
DROPOUT_RATIO = 0.5

# (name, kernel, outputs, stride, pad, grouped in BVLC CaffeNet) of CaffeNet's convolutions.
CAFFENET_CONVS = (("conv1", 11, 96, 4, 0, False), ("conv2", 5, 256, 1, 2, True),
                  ("conv3", 3, 384, 1, 1, False), ("conv4", 3, 384, 1, 1, True),
                  ("conv5", 3, 256, 1, 1, True))
# (stage, number of 3x3 convolutions, outputs) of VGG16.
VGG16_STAGES = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))
CAFFENET_CONV_NAMES = tuple(conv[0] for conv in CAFFENET_CONVS)
VGG16_CONV_NAMES = tuple(f"conv{stage}_{index}" for stage, count, _ in VGG16_STAGES
                         for index in range(1, count + 1))
FC_NAMES = ("fc6", "fc7")

# param (weights, bias) of a layer that learns, Caffe's usual split: the bias
# at twice the learning rate and without weight decay.
LEARNED = (dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0))
FROZEN = dict(lr_mult=0, decay_mult=0)  # one blob that keeps its values


@dataclass(frozen=True)
class Learning:
    """How the Convolution and InnerProduct layers of a body learn and start.

    trained: ``param`` of the layers that learn, (weights, bias) ParamSpec
        dicts; empty writes none (Caffe's default: every blob at lr_mult 1).
    frozen: names of the layers whose blobs keep their values (lr_mult and
        decay_mult 0).
    fillers: settings written into every layer (weight_filler, bias_filler);
        empty keeps Caffe's default, zeros, for nets that load their weights.
    """
    trained: tuple = ()
    frozen: tuple = ()
    fillers: dict = field(default_factory=dict)

    def settings(self, name, bias_term=True):
        """Keyword settings of layer ``name``: fillers and param (one entry less without bias)."""
        param = [FROZEN, FROZEN] if name in self.frozen else list(self.trained)
        param = param[:2 if bias_term else 1]
        return {**self.fillers, **({"param": param} if param else {})}


def image_input(n, batch, side):
    """Input ``data`` of shape (batch, 3, side, side); returns its top."""
    n.data = import_caffe().layers.Input(shape=dict(dim=[batch, 3, side, side]))
    return n.data


def convolution(n, name, bottom, outputs, kernel, learning, **geometry):
    """Convolution ``name``, ``outputs`` kernel x kernel filters; ``geometry`` (stride, pad,
    group) is written as given. Returns its top."""
    setattr(n, name, import_caffe().layers.Convolution(
        bottom, num_output=outputs, kernel_size=kernel, **geometry, **learning.settings(name)))
    return getattr(n, name)


def inner_product(n, name, bottom, outputs, learning, **settings):
    """InnerProduct ``name`` with ``outputs`` outputs. ``settings`` (bias_term, fillers) are
    written as given and take precedence over ``learning``'s fillers. Returns its top."""
    learned = learning.settings(name, settings.get("bias_term", True))
    setattr(n, name, import_caffe().layers.InnerProduct(bottom, num_output=outputs,
                                                        **{**learned, **settings}))
    return getattr(n, name)


def relu(n, name, top):
    """In-place ReLU ``name`` on ``top``."""
    setattr(n, name, import_caffe().layers.ReLU(top, in_place=True))


def frozen_batchnorm(n, name, top):
    """In-place BatchNorm ``name`` on ``top``, its statistics not learned (lr_mult 0).

    No Scale layer follows: a learned scale could silence a layer early in
    training (the reference's choice).
    """
    setattr(n, name, import_caffe().layers.BatchNorm(top, param=[FROZEN] * 3, in_place=True))


def max_pooling(n, name, bottom, kernel, stride, **padding):
    """Max pooling ``name`` (kernel x kernel, ``stride``; ``padding``: pad as given)."""
    caffe = import_caffe()
    setattr(n, name, caffe.layers.Pooling(bottom, pool=caffe.params.Pooling.MAX,
                                          kernel_size=kernel, stride=stride, **padding))
    return getattr(n, name)


def caffenet_convs(n, bottom, learning=Learning(), conv1_pad=0, pool_pad=None, group=1,
                   batchnorm=False, pool5=True):
    """CaffeNet's conv1..relu5 and pool5 on ``bottom`` (N, 3, H, W); returns the last top.

    conv1_pad: 0 in BVLC's CaffeNet, 5 in Fast R-CNN's and the context nets.
    pool_pad: pad of pool1 and pool2 (Fast R-CNN: 1); None writes none.
    group: groups of conv2, conv4 and conv5 (BVLC: 2); 1 writes none.
    batchnorm: BatchNorm bn3..bn5 after conv3..conv5, before their ReLU.
    pool5: end with pool5 (3x3, stride 2; 227x227 input: 256x6x6) rather
        than with conv5 after its ReLU (for RoI pooling).
    """
    top = bottom
    padding = {} if pool_pad is None else dict(pad=pool_pad)
    for index, (name, kernel, outputs, stride, pad, grouped) in enumerate(CAFFENET_CONVS, 1):
        geometry = dict(stride=stride, pad=conv1_pad if index == 1 else pad)
        if grouped and group != 1:
            geometry["group"] = group
        top = convolution(n, name, top, outputs, kernel, learning, **geometry)
        if batchnorm and index >= 3:
            frozen_batchnorm(n, f"bn{index}", top)
        relu(n, f"relu{index}", top)
        if index in (1, 2):
            pooled = max_pooling(n, f"pool{index}", top, 3, 2, **padding)
            setattr(n, f"norm{index}", import_caffe().layers.LRN(
                pooled, local_size=5, alpha=1e-4, beta=0.75))
            top = getattr(n, f"norm{index}")
    return max_pooling(n, "pool5", top, 3, 2) if pool5 else top


def vgg16_convs(n, bottom, learning=Learning(), pool5=True, explicit_stride=True):
    """VGG16's 13 3x3 convolutions (pad 1, in-place ReLU) and pool1..pool5 (2x2, stride 2)
    on ``bottom``; returns the last top (224x224 input: pool5 512x7x7).

    pool5: end with pool5 rather than with conv5_3 after its ReLU (for RoI pooling).
    explicit_stride: write the default ``stride: 1`` into every convolution, as
        the context and Fast R-CNN nets do; BVLC's VGG16 deploy file leaves it out.
    """
    top = bottom
    geometry = dict(pad=1, stride=1) if explicit_stride else dict(pad=1)
    for stage, count, outputs in VGG16_STAGES:
        for index in range(1, count + 1):
            top = convolution(n, f"conv{stage}_{index}", top, outputs, 3, learning, **geometry)
            relu(n, f"relu{stage}_{index}", top)
        if pool5 or stage < len(VGG16_STAGES):
            top = max_pooling(n, f"pool{stage}", top, 2, 2)
    return top


def fc6_fc7(n, bottom, learning=Learning()):
    """fc6 and fc7 (4096 outputs each, in-place ReLU and dropout 0.5), the classifier block
    of CaffeNet, VGG16 and Fast R-CNN, on pool5 or RoI-pooled features; returns fc7's top."""
    top = bottom
    for index in (6, 7):
        top = inner_product(n, f"fc{index}", top, FC_OUTPUTS, learning)
        relu(n, f"relu{index}", top)
        setattr(n, f"drop{index}", import_caffe().layers.Dropout(
            top, dropout_ratio=DROPOUT_RATIO, in_place=True))
    return top


def _imagenet_deploy(n, features, name):
    """fc8 (1000 ImageNet classes) and the softmax ``prob`` on ``features``; the NetParameter."""
    inner_product(n, "fc8", features, IMAGENET_CLASSES, Learning())
    n.prob = import_caffe().layers.Softmax(n.fc8)
    proto = n.to_proto()
    proto.name = name
    return proto


def caffenet_deploy(group=1, batch=1):
    """NetParameter of CaffeNet's deploy net, (batch, 3, 227, 227) -> prob (batch, 1000).

    ``group`` applies to conv2, conv4 and conv5: 1 gives the groupless
    CaffeNet, 2 BVLC's original.
    """
    n = import_caffe().NetSpec()
    pool5 = caffenet_convs(n, image_input(n, batch, CAFFENET_SIDE), group=group)
    return _imagenet_deploy(n, fc6_fc7(n, pool5),
                            "CaffeNet" if group != 1 else "GrouplessCaffeNet")


def vgg16_deploy(batch=1):
    """NetParameter of VGG16's deploy net, (batch, 3, 224, 224) -> prob (batch, 1000)."""
    n = import_caffe().NetSpec()
    pool5 = vgg16_convs(n, image_input(n, batch, VGG16_SIDE), explicit_stride=False)
    return _imagenet_deploy(n, fc6_fc7(n, pool5), "VGG16")


def generated_files():
    """The checked-in detection prototxts, as {path relative to prototxt/: text}."""
    return {"groupless_caffenet.prototxt": str(caffenet_deploy(group=1)),
            "vgg16.prototxt": str(vgg16_deploy())}
