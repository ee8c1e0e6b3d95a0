"""Dense feature maps over an H x W image: the features of every 96x96 window whose
top-left corner lies on a grid of step ``stride``, by default the product of
the convolution and pooling strides up to the blob, read from the prototxt
(:func:`net_stride`; 32 for fc6 of all three nets).

- :func:`dense_features` is exact by construction: each window goes through
  the deploy net on its own (in batches), normalised on its own.
- :class:`DenseFeatureNet` is Caffe's "net surgery": the fc layers become
  convolutions (fc6 on a 256x3x3 pool5 becomes a 3x3 convolution with 4096
  outputs, its weights reshaped) and one forward pass of the whole image
  gives the map, sharing all computation between overlapping windows. Its
  map is NOT the patch-wise feature of the windows, for three reasons that
  no rewriting of the net removes:

  1. the deploy net scales every window to RMS 50, and conv1..fc6 are not
     scale-equivariant (biases, LRN), so windows of different contrast share
     no activation beyond conv1's linear response; the dense net scales the
     image as a whole to RMS 50;
  2. every convolution zero-pads its input at the edge of a 96-pixel window
     (AlexNet-style: conv1 by 5 pixels, conv2 by 2 units, conv3-5 by 1; VGG:
     each by 1); in the dense net the same units see the neighbouring pixels;
  3. Caffe pools in ceil mode: pooling windows that overhang the edge of a
     96-pixel window are clipped patch-wise but take in neighbours densely.

  Reasons 2 and 3 hold without any normalisation: the fully-convolutional
  un-normalised tower equals the patch-wise forward of that tower only on a
  96x96 input. What is exact, and tested: on a 96x96 input the dense net is
  the deploy net; and the converted fc6 is the InnerProduct fc6 applied to
  the 3x3 pool5 block under each map position. Exact per-window features
  could share only conv1's linear part; conv1 is about 8% of the AlexNet
  tower's CPU time and 1% of VGG's (benchmarks/features.py prints both
  timings and the dense net's deviation), so :func:`dense_features` runs
  the windows patch-wise.
"""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ctxpred.caffe.netparam import instantiate
from ctxpred.data.preprocess import crop_patches
from ctxpred.features.extractor import FeatureExtractor
from ctxpred.features.forward import CaffeForward
from ctxpred.features.nets import fit_weights
from ctxpred.features.patches import grid_corners


def dense_features(extractor: FeatureExtractor, image, stride=None):
    """Exact features of every p x p window of ``image`` on a grid, patch-wise in batches.

    image: (H, W, 3) uint8 RGB. stride: grid step in pixels (default
    ``extractor.stride``, the blob's own stride). Returns (rows, cols, D)
    float32; [r, c] is the window with top-left pixel (y, x) = (stride * r,
    stride * c), rows = (H - p) // stride + 1, likewise cols.
    """
    stride = stride or extractor.stride
    height, width = image.shape[:2]
    if height < extractor.patch or width < extractor.patch:
        raise ValueError(f"a {width}x{height} image holds no {extractor.patch}-pixel window")
    corners = grid_corners(height, width, stride, extractor.patch)
    rows = len(range(0, height - extractor.patch + 1, stride))
    features = np.empty((len(corners), extractor.dim), dtype=np.float32)
    for start in range(0, len(corners), extractor.batch):
        chunk = corners[start:start + extractor.batch]
        features[start:start + len(chunk)] = extractor.extract(
            crop_patches(image, chunk, extractor.patch))
    return features.reshape(rows, -1, extractor.dim)


def fully_convolutional(param, blob_shapes, height, width):
    """NetParameter of deploy net ``param`` for one H x W input, fc layers as convolutions.

    blob_shapes: {blob: shape} of ``param`` instantiated at its own p x p
    input (an InnerProduct on a C x k x k blob becomes a k x k convolution;
    on a C-vector, a 1 x 1 one). The in-net RMS normalisation (Reduction
    SUMSQ over the whole sample, then Power) is kept with the Power scale
    multiplied by p^2 / (H W): it scales the whole image to RMS 50, as the
    deploy net scales a patch, and is unchanged for H = W = p.

    Raises ValueError for a layer this cannot convert (any other Reduction,
    a transposed or not-axis-1 InnerProduct).
    """
    fcn = type(param)()
    fcn.CopyFrom(param)
    fcn.name = f"{param.name}_fully_convolutional"
    input_layer = next(layer for layer in fcn.layer if layer.type == "Input")
    dims = input_layer.input_param.shape[0].dim
    patch_pixels = dims[2] * dims[3]
    dims[:] = [1, dims[1], height, width]
    reductions = {}
    for layer in fcn.layer:
        if layer.type == "Reduction":
            reduction = layer.reduction_param
            if reduction.operation != reduction.SUMSQ or reduction.axis != 1:
                raise ValueError(f"layer {layer.name}: only a SUMSQ Reduction over the whole "
                                 "sample (the RMS normalisation) can be made fully convolutional")
            reductions[layer.top[0]] = layer.name
        elif layer.type == "Power" and layer.bottom[0] in reductions:
            layer.power_param.scale *= patch_pixels / (height * width)
        elif layer.type == "InnerProduct":
            fc = layer.inner_product_param
            if fc.transpose or fc.axis != 1:
                raise ValueError(f"layer {layer.name}: only InnerProduct with axis 1 and no "
                                 "transpose converts to a convolution")
            shape = blob_shapes[layer.bottom[0]]
            kernel_h, kernel_w = (shape[2], shape[3]) if len(shape) == 4 else (1, 1)
            conv = layer.convolution_param
            conv.num_output = fc.num_output
            conv.bias_term = fc.bias_term
            conv.kernel_h, conv.kernel_w = kernel_h, kernel_w
            conv.weight_filler.CopyFrom(fc.weight_filler)
            conv.bias_filler.CopyFrom(fc.bias_filler)
            layer.type = "Convolution"
            layer.ClearField("inner_product_param")
    return fcn


def convolutional_net(extractor: FeatureExtractor, net_param):
    """pycaffe Net of ``net_param`` carrying the extractor's weights, fc weights made convolutions.

    net_param: :func:`fully_convolutional` of ``extractor.param``, possibly
    with layers without parameters appended.
    """
    net = instantiate(net_param)
    converted = {layer.name for layer in extractor.param.layer if layer.type == "InnerProduct"}
    weights = {name: [blob.data for blob in blobs] for name, blobs in extractor.net.params.items()}
    fit_weights(net, net_param, weights, "the extractor's weights", extractor.layer, converted)
    return net


class DenseFeatureNet:
    """The extractor's net made fully convolutional for H x W images (Caffe "net surgery").

    One forward pass gives the map of every window on the grid of step
    ``stride`` (the blob's stride, :func:`net_stride`); map position [r, c]
    is the window with top-left pixel (stride * r, stride * c). Approximate:
    the image is normalised as a whole and the windows' zero padding is
    replaced by their surroundings (see the module docstring); exact only
    for a p x p image. Weights are the extractor's, fc weights reshaped.
    The input convention is the extractor's (:func:`ctxpred.features.forward.net_input`).
    """

    def __init__(self, extractor: FeatureExtractor, height, width):
        if height < extractor.patch or width < extractor.patch:
            raise ValueError(f"a {height}x{width} image is smaller than a {extractor.patch}-pixel "
                             "window")
        self.patch = extractor.patch
        self.stride = extractor.stride
        self.height, self.width = height, width
        self._blob = extractor.layer
        shapes = {name: blob.data.shape for name, blob in extractor.net.blobs.items()}
        # The blob's spatial extent for one window: the block of the map that is its feature.
        shape = shapes[self._blob]
        self._block = (shape[2], shape[3]) if len(shape) == 4 else (1, 1)
        self.param = fully_convolutional(extractor.param, shapes, height, width)
        self.net = convolutional_net(extractor, self.param)
        self._forward = CaffeForward(self.net, [self._blob])
        self.rows = (height - self.patch) // self.stride + 1
        self.cols = (width - self.patch) // self.stride + 1

    def forward(self, image):
        """(H, W, 3) uint8 RGB image -> (rows, cols, D) float32 map (D as the extractor's)."""
        if image.shape != (self.height, self.width, 3):
            raise ValueError(f"this net takes ({self.height}, {self.width}, 3) images, "
                             f"got {image.shape}")
        feature_map = self._forward(image[np.newaxis])[self._blob][0]  # (C, Hm, Wm)
        block_h, block_w = self._block
        blocks = sliding_window_view(feature_map, (block_h, block_w), axis=(1, 2))
        if blocks.shape[1] < self.rows or blocks.shape[2] < self.cols:
            raise RuntimeError(f"the {self._blob} map {feature_map.shape} is too small for "
                               f"{self.rows} x {self.cols} windows")
        blocks = blocks[:, :self.rows, :self.cols]  # (C, rows, cols, block_h, block_w)
        return np.ascontiguousarray(blocks.transpose(1, 2, 0, 3, 4)).reshape(
            self.rows, self.cols, -1)
