"""Features of 96x96 patches from a deploy net: :class:`FeatureExtractor`.

Input convention of the released networks (method.md, "Released networks"):
RGB, the per-channel means :data:`ctxpred.models.context.MEAN_RGB` subtracted, nothing
else. The deploy net scales each patch to root-mean-square 50 itself (and
projects it for the projection net), so features do not depend on the
patch's contrast: x and c * x (c > 0) give the same fc6.
:func:`ctxpred.features.forward.net_input` applies the convention, and
``extract`` runs the shared extraction path (:mod:`ctxpred.features.forward`).
"""
import numpy as np

from ctxpred.caffe.geometry import net_stride
from ctxpred.caffe.netparam import instantiate, truncated
from ctxpred.features.forward import CaffeForward, forward_all
from ctxpred.features.nets import fit_weights, read_deploy_param
from ctxpred.weights.files import read_weights
from ctxpred.weights.surgery import fold_batchnorm


class FeatureExtractor:
    """A deploy net computing blob ``layer`` of 96x96 patches, with checked weights.

    deploy: path of a deploy prototxt (input ``1 x 3 x p x p``, mean-subtracted
    RGB; normally the project's prototxt/<net>/deploy.prototxt). weights: a
    .caffemodel / .h5 path, or {layer: [arrays]}. layer: any blob of the net
    (fc6 by default; the net is cut after it, so later layers need no
    weights). batch: patches per ``net.forward``. train_param: the
    NetParameter of the training net the weights come from (e.g.
    :func:`ctxpred.models.context.train_net`); its BatchNorm layers held by the weights
    are folded into the layers before them (:func:`ctxpred.weights.surgery.fold_batchnorm`),
    so a training snapshot gives the features of its TEST phase. When a
    BatchNorm layer has no statistics (scale factor 0: a fresh
    initialisation) none is folded and all are ignored, as are all BatchNorm
    layers without ``train_param``.

    Attributes: ``net`` (pycaffe Net, run on the device selected with
    ctxpred.caffe.env.load_caffe), ``param`` (its NetParameter), ``patch``
    (p, pixels), ``feature_shape`` (the blob's shape per patch, e.g. (4096,)
    or (256, 3, 3)), ``dim`` (its size D), ``stride`` (:func:`net_stride`
    of the blob, pixels), ``forward`` (the :class:`ctxpred.features.forward.CaffeForward`
    of the blob), ``ignored_layers`` (weight layers the net does not
    use, e.g. the pair head of a training snapshot).

    Raises FileNotFoundError / ValueError for a missing or malformed
    prototxt or weight file, and :class:`WeightMismatchError` when the
    weights do not fit.
    """

    def __init__(self, deploy, weights, layer="fc6", batch=64, train_param=None):
        if batch < 1:
            raise ValueError(f"batch must be positive, got {batch}")
        self.layer = layer
        self.batch = batch
        self.param = truncated(read_deploy_param(deploy), layer)
        source = "the given weights" if isinstance(weights, dict) else str(weights)
        weights = weights if isinstance(weights, dict) else read_weights(weights)
        unfolded = []
        batchnorms = set() if train_param is None else {
            layer.name for layer in train_param.layer if layer.type == "BatchNorm"}
        present = sorted(batchnorms.intersection(weights))
        if any(weights[name][2].size == 1 and weights[name][2].item() == 0 for name in present):
            unfolded = present
            weights = {name: arrays for name, arrays in weights.items() if name not in unfolded}
        elif present:
            weights = fold_batchnorm(weights, train_param)
        self.net = instantiate(self.param)
        self.ignored_layers = unfolded + fit_weights(self.net, self.param, weights, source, layer)
        _, channels, height, width = self.net.blobs[self.net.inputs[0]].data.shape
        if channels != 3 or height != width:
            raise ValueError(f"the deploy net's input is {channels} x {height} x {width}; "
                             "expected 3 x p x p (RGB patches)")
        self.patch = height
        self.feature_shape = tuple(self.net.blobs[layer].data.shape[1:])
        self.dim = int(np.prod(self.feature_shape))
        self.stride = net_stride(self.param)
        self.forward = CaffeForward(self.net, [layer])

    def extract(self, patches):
        """(N, p, p, 3) uint8 RGB -> (N, D) float32: the blob of each patch, flattened C, H, W."""
        patches = np.asarray(patches)
        n = len(patches)
        if patches.shape != (n, self.patch, self.patch, 3) or patches.dtype != np.uint8:
            raise ValueError(f"patches must be uint8 (N, {self.patch}, {self.patch}, 3), "
                             f"got {patches.dtype} {patches.shape}")
        if n == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        return forward_all(self.forward, patches, self.batch)[self.layer]
