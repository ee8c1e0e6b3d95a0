"""Turn a net with grouped convolutions into the same net without groups.

Every Convolution with group G > 1 (CaffeNet's conv2, conv4, conv5 have
group 2) gets group 1 and block-diagonal weights: zeros of shape
(Cout, Cin, k, k) with block g = the grouped weights of outputs
g*Cout/G..(g+1)*Cout/G at inputs g*Cin/G..(g+1)*Cin/G. Biases and other
layers are copied. The converted net computes the same outputs, to float
precision. Works for any group count and any layer names.

The weights are checked against --prototxt first (Caffe builds it in the
TEST phase); a blob shape difference is an error naming the layer.

Example (BVLC CaffeNet -> groupless CaffeNet):
  python tools/groupless.py --prototxt caffenet_deploy.prototxt \\
      --weights bvlc_reference_caffenet.caffemodel \\
      --out-prototxt groupless.prototxt --out-weights groupless.caffemodel
"""
import sys
from pathlib import Path

from ctxpred.cli import add_weights, run_tool, tool_parser
from ctxpred.weights.surgery import compare_shapes, groupless_net, groupless_weights
from ctxpred.caffe.netparam import read_net_param, weight_shapes_of
from ctxpred.weights.files import read_weights, write_weights


def main(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("--prototxt", required=True, help="net definition with grouped "
                                                          "convolutions")
    add_weights(parser, extra=" of that net")
    parser.add_argument("--out-prototxt", required=True,
                        help="where to write the definition without groups")
    parser.add_argument("--out-weights", required=True,
                        help="where to write the converted caffemodel; HDF5 if it ends in .h5")
    args = parser.parse_args(argv)
    net_param = read_net_param(args.prototxt)
    weights = read_weights(args.weights)
    report = compare_shapes(weight_shapes_of(net_param, args.prototxt), weights)
    if report.different:
        raise ValueError(f"{args.weights} does not fit {args.prototxt}: "
                         + "; ".join(report.lines()))
    converted = groupless_weights(weights, net_param)
    out_prototxt = Path(args.out_prototxt)
    out_prototxt.parent.mkdir(parents=True, exist_ok=True)
    out_prototxt.write_text(str(groupless_net(net_param)), encoding="utf-8")
    write_weights(converted, args.out_weights)
    for layer in net_param.layer:
        if layer.type == "Convolution" and layer.convolution_param.group > 1:
            done = "converted" if layer.name in weights else "no weights, only the definition"
            print(f"{layer.name}: group {layer.convolution_param.group} -> 1 ({done})")
    for line in report.lines():
        print(f"note: {line}")
    print(f"wrote {args.out_prototxt} and {args.out_weights}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
