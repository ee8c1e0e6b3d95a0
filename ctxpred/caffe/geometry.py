"""Where a Convolution or Pooling layer reads its input: kernel, stride, pad, dilation.

Caffe spells these several ways: ConvolutionParameter has repeated
``kernel_size`` / ``stride`` / ``pad`` / ``dilation`` (one value for all
spatial axes, or one per axis) and the 2-D ``kernel_h`` / ``kernel_w``
(likewise stride and pad); PoolingParameter has single ``kernel_size`` /
``stride`` / ``pad``, the ``_h`` / ``_w`` pairs and ``global_pooling``.
:func:`layer_window` reads all of them into one :class:`Window` of (height,
width) pairs; receptive fields, feature strides, magic init's patches and
the ONNX export all use it.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """A 2-D sliding window, each field (along height, along width), in input pixels.

    ``kernel`` is the window's span before dilation; ``extent`` after it.
    ``global_pooling`` windows take their kernel from the input's size
    (:meth:`for_input`).
    """

    kernel: tuple
    stride: tuple = (1, 1)
    pad: tuple = (0, 0)
    dilation: tuple = (1, 1)
    global_pooling: bool = False

    @property
    def extent(self):
        """(h, w) input pixels one window covers: dilation * (kernel - 1) + 1."""
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation))

    def for_input(self, height, width):
        """This window on an input of ``height`` x ``width`` (global pooling: the whole input)."""
        if not self.global_pooling:
            return self
        return Window((height, width))

    def output_size(self, height, width):
        """(h, w) of the output of a convolution (floor rounding) on ``height`` x ``width``."""
        window = self.for_input(height, width)
        return tuple((size + 2 * p - e) // s + 1 for size, p, e, s in
                     zip((height, width), window.pad, window.extent, window.stride))


def _conv_pair(param, field, default, name):
    """(h, w) of a ConvolutionParameter setting: ``field``_h / _w, else the repeated ``field``."""
    if field != "dilation" and (param.HasField(f"{field}_h") or param.HasField(f"{field}_w")):
        return getattr(param, f"{field}_h"), getattr(param, f"{field}_w")
    values = list(getattr(param, field if field != "kernel" else "kernel_size"))
    if not values:
        if default is None:
            raise ValueError(f"layer {name!r} (Convolution) has no kernel size")
        return default, default
    if len(values) > 2:
        raise ValueError(f"layer {name!r} (Convolution): {len(values)} values of {field}; "
                         "only 2-D convolutions are supported")
    return values[0], values[-1]


def _pool_pair(param, field, default):
    """(h, w) of a PoolingParameter setting: ``field``_h / _w, else the single ``field``."""
    if param.HasField(f"{field}_h") or param.HasField(f"{field}_w"):
        return getattr(param, f"{field}_h"), getattr(param, f"{field}_w")
    value = getattr(param, field if field != "kernel" else "kernel_size")
    return (value, value) if value or default is None else (default, default)


def layer_window(layer):
    """The :class:`Window` of a Convolution or Pooling LayerParameter; None for other types.

    Raises ValueError naming the layer for a convolution without a kernel
    size or with more than two spatial axes.
    """
    if layer.type == "Convolution":
        param = layer.convolution_param
        return Window(_conv_pair(param, "kernel", None, layer.name),
                      _conv_pair(param, "stride", 1, layer.name),
                      _conv_pair(param, "pad", 0, layer.name),
                      _conv_pair(param, "dilation", 1, layer.name))
    if layer.type == "Pooling":
        param = layer.pooling_param
        return Window(_pool_pair(param, "kernel", None), _pool_pair(param, "stride", 1),
                      _pool_pair(param, "pad", 0), global_pooling=param.global_pooling)
    return None


def net_stride(net_param):
    """Input pixels between neighbouring units of the last blob: the product of the strides.

    Raises ValueError when the stride differs along y and x.
    """
    stride_h = stride_w = 1
    for layer in net_param.layer:
        window = layer_window(layer)
        if window is not None:
            stride_h, stride_w = stride_h * window.stride[0], stride_w * window.stride[1]
    if stride_h != stride_w:
        raise ValueError(f"the net's stride differs along y ({stride_h}) and x ({stride_w})")
    return stride_h
