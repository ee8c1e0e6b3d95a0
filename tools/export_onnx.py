"""Convert a Caffe deploy net and its weights to an ONNX model.

The ONNX graph computes what Caffe computes in the TEST phase, with the
deploy net's input shape and Caffe's blob names for its inputs and outputs.
Supported layers: Input, Convolution, Pooling (MAX / AVE, Caffe's rounding),
LRN, MVN, Power, Reduction, Scale, Slice, Eltwise, InnerProduct, ReLU,
BatchNorm (stored statistics), Concat, Dropout, Softmax; any other layer is
an error naming it (see ctxpred/weights/onnx.py).

With --check, pycaffe and onnxruntime run the net on real photo patches
(mean-subtracted RGB, ctxpred.models.context.MEAN_RGB, at the net's input size) and
the maximum absolute and relative difference (relative to the largest
|output|) are printed; the exit status is 1 when the relative difference
exceeds 1e-4.

Exit status: 0 done (and parity holds), 1 parity check failed, 2 error.

Example:
  python tools/export_onnx.py --deploy prototxt/color_dropping/deploy.prototxt \\
      --weights runs/color_dropping/folded.caffemodel --out color_dropping.onnx --check
"""
import math
import sys
from pathlib import Path

import onnx

from ctxpred.cli import FAILED, add_weights, run_tool, tool_parser
from ctxpred.data.images import decode_rgb
from ctxpred.weights.onnx import (DEFAULT_OPSET, MIN_OPSET, caffe_to_onnx, compare_with_caffe,
                                 photo_patches)
from ctxpred.caffe.netparam import read_net_param
from ctxpred.weights.files import read_weights

TOLERANCE = 1e-4
CHECK_PATCHES = 4
DEFAULT_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # skimage.data


def _check_photos(paths):
    if not paths:
        import skimage.data
        return [getattr(skimage.data, name)() for name in DEFAULT_PHOTOS]
    photos = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"image {path} does not exist")
        photos.append(decode_rgb(Path(path).read_bytes(), str(path)))
    return photos


def _check(args, model):
    """Print the parity of the written model with Caffe; True when it holds."""
    if len(model.graph.input) != 1:
        raise ValueError(f"--check feeds one image input; the net has {len(model.graph.input)}")
    shape = [dim.dim_value for dim in model.graph.input[0].type.tensor_type.shape.dim]
    if len(shape) != 4 or shape[1] != 3:
        raise ValueError(f"--check feeds RGB patches (N x 3 x H x W); the net's input "
                         f"{model.graph.input[0].name!r} has shape {shape}")
    photos = _check_photos(args.check)
    batch = shape[0]
    count = batch * math.ceil(max(CHECK_PATCHES, len(photos)) / batch)
    patches = photo_patches(photos, shape[2], shape[3], count)
    max_abs, max_rel = compare_with_caffe(args.deploy, args.weights, args.out, patches)
    source = "your images" if args.check else "skimage.data photos"
    print(f"parity on {count} patches of {source}: max abs difference {max_abs:.3g}, "
          f"max relative difference {max_rel:.3g} (tolerance {TOLERANCE:g})")
    return max_rel <= TOLERANCE


def main(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("--deploy", required=True,
                        help="deploy prototxt of the net (Input layer(s) with fixed shapes)")
    add_weights(parser, extra=" of the net; every layer with parameters needs them")
    parser.add_argument("--out", required=True, help="ONNX file to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset to target (default {DEFAULT_OPSET}, at least "
                             f"{MIN_OPSET})")
    parser.add_argument("--check", nargs="*", metavar="IMAGE",
                        help="after writing, compare onnxruntime with pycaffe (TEST phase) on "
                             f"at least {CHECK_PATCHES} patches cropped from these images "
                             "(default with no IMAGE: photos bundled with scikit-image); "
                             f"exit 1 if the relative difference exceeds {TOLERANCE:g}")
    args = parser.parse_args(argv)
    model = caffe_to_onnx(read_net_param(args.deploy), read_weights(args.weights),
                          opset=args.opset)
    onnx.checker.check_model(model)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, args.out)
    shapes = {value.name: "x".join(str(dim.dim_value) for dim in value.type.tensor_type.shape.dim)
              for value in [*model.graph.input, *model.graph.output]}
    print(f"wrote {args.out} (opset {args.opset}, {len(model.graph.node)} nodes): "
          + ", ".join(f"{name} {shape}" for name, shape in shapes.items()))
    return 0 if args.check is None or _check(args, model) else FAILED


if __name__ == "__main__":
    sys.exit(run_tool(main))
