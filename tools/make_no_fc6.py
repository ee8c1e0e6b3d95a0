"""Write the "no fc6" variant of a context-prediction caffemodel.

Drops fc6 and every layer after it (for the context nets: fc6, bn6, fc7 or
fc7_first/fc7_second, bn7, fc8, fc9) and keeps the conv layers (and their
BatchNorm layers, if not folded yet). This is the starting point for magic
init and detection fine-tuning: fold BatchNorm too (tools/debatchnorm.py,
before or after) so that the model loads into
prototxt/groupless_caffenet.prototxt (or prototxt/vgg16.prototxt for the
VGG-style net), whose fc6 has other shapes.

"After" is the layer order of --prototxt, or without it the order of the
weight file, which binary caffemodels keep and HDF5 ones do not (HDF5 input
needs --prototxt).

Examples:
  python tools/make_no_fc6.py folded.caffemodel folded_no_fc6.caffemodel
  python tools/make_no_fc6.py model.caffemodel.h5 no_fc6.caffemodel \\
      --prototxt prototxt/color_dropping/train.prototxt
"""
import sys

from ctxpred.cli import run_tool, tool_parser
from ctxpred.weights.surgery import drop_layers_from
from ctxpred.caffe.netparam import read_net_param
from ctxpred.weights.files import is_hdf5, read_weights, write_weights


def main(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("weights", help="input caffemodel (binary, or HDF5 with --prototxt)")
    parser.add_argument("out", help="output caffemodel; HDF5 if it ends in .h5")
    parser.add_argument("--first", default="fc6",
                        help="first layer to drop (default: fc6)")
    parser.add_argument("--prototxt", help="net definition whose layer order says which layers "
                                           "come after --first (default: the file's order)")
    args = parser.parse_args(argv)
    net_param = read_net_param(args.prototxt) if args.prototxt else None
    weights = read_weights(args.weights)
    if net_param is None and is_hdf5(args.weights):
        raise ValueError(f"{args.weights} is HDF5, which does not keep the layer order: "
                         "pass the net definition with --prototxt")
    kept = drop_layers_from(weights, args.first, net_param)
    write_weights(kept, args.out)
    print(f"dropped: {', '.join(name for name in weights if name not in kept)}")
    print(f"kept: {', '.join(kept)}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
