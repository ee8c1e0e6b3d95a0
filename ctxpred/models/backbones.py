"""Deploy nets of the detection path, as Caffe NetSpec code.

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
from ctxpred.caffe.env import import_caffe

CAFFENET_SIDE = 227
VGG16_SIDE = 224
IMAGENET_CLASSES = 1000

# (name, kernel, outputs, stride, pad, grouped in BVLC CaffeNet) of CaffeNet's convolutions.
CAFFENET_CONVS = (("conv1", 11, 96, 4, 0, False), ("conv2", 5, 256, 1, 2, True),
                  ("conv3", 3, 384, 1, 1, False), ("conv4", 3, 384, 1, 1, True),
                  ("conv5", 3, 256, 1, 1, True))
# (stage, number of 3x3 convolutions, outputs) of VGG16.
VGG16_STAGES = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))


def _classifier(caffe, n, bottom):
    """fc6, fc7 (4096, ReLU, dropout 0.5), fc8 (1000) and the softmax ``prob``."""
    top = bottom
    for index in (6, 7):
        setattr(n, f"fc{index}", caffe.layers.InnerProduct(top, num_output=4096))
        top = getattr(n, f"fc{index}")
        setattr(n, f"relu{index}", caffe.layers.ReLU(top, in_place=True))
        setattr(n, f"drop{index}", caffe.layers.Dropout(top, dropout_ratio=0.5, in_place=True))
    n.fc8 = caffe.layers.InnerProduct(top, num_output=IMAGENET_CLASSES)
    n.prob = caffe.layers.Softmax(n.fc8)


def caffenet_deploy(group=1, batch=1):
    """NetParameter of CaffeNet's deploy net, (batch, 3, 227, 227) -> prob (batch, 1000).

    ``group`` applies to conv2, conv4 and conv5: 1 gives the groupless
    CaffeNet, 2 BVLC's original.
    """
    caffe = import_caffe()
    n = caffe.NetSpec()
    n.data = caffe.layers.Input(shape=dict(dim=[batch, 3, CAFFENET_SIDE, CAFFENET_SIDE]))
    top = n.data
    for index, (name, kernel, outputs, stride, pad, grouped) in enumerate(CAFFENET_CONVS, 1):
        options = dict(group=group) if grouped and group != 1 else {}
        setattr(n, name, caffe.layers.Convolution(top, num_output=outputs, kernel_size=kernel,
                                                  stride=stride, pad=pad, **options))
        top = getattr(n, name)
        setattr(n, f"relu{index}", caffe.layers.ReLU(top, in_place=True))
        if index in (1, 2, 5):
            setattr(n, f"pool{index}", caffe.layers.Pooling(
                top, pool=caffe.params.Pooling.MAX, kernel_size=3, stride=2))
            top = getattr(n, f"pool{index}")
        if index in (1, 2):
            setattr(n, f"norm{index}", caffe.layers.LRN(top, local_size=5, alpha=1e-4,
                                                        beta=0.75))
            top = getattr(n, f"norm{index}")
    _classifier(caffe, n, top)
    proto = n.to_proto()
    proto.name = "CaffeNet" if group != 1 else "GrouplessCaffeNet"
    return proto


def vgg16_deploy(batch=1):
    """NetParameter of VGG16's deploy net, (batch, 3, 224, 224) -> prob (batch, 1000)."""
    caffe = import_caffe()
    n = caffe.NetSpec()
    n.data = caffe.layers.Input(shape=dict(dim=[batch, 3, VGG16_SIDE, VGG16_SIDE]))
    top = n.data
    for stage, count, outputs in VGG16_STAGES:
        for index in range(1, count + 1):
            name = f"conv{stage}_{index}"
            setattr(n, name, caffe.layers.Convolution(top, num_output=outputs, kernel_size=3,
                                                      pad=1))
            top = getattr(n, name)
            setattr(n, f"relu{stage}_{index}", caffe.layers.ReLU(top, in_place=True))
        setattr(n, f"pool{stage}", caffe.layers.Pooling(
            top, pool=caffe.params.Pooling.MAX, kernel_size=2, stride=2))
        top = getattr(n, f"pool{stage}")
    _classifier(caffe, n, top)
    proto = n.to_proto()
    proto.name = "VGG16"
    return proto


def generated_files():
    """The checked-in detection prototxts, as {path relative to prototxt/: text}."""
    return {"groupless_caffenet.prototxt": str(caffenet_deploy(group=1)),
            "vgg16.prototxt": str(vgg16_deploy())}
