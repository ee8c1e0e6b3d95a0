"""List the layers, blob shapes and parameter counts of a Caffe weight file.

With --prototxt, also check the weights against that net definition and
report every difference in plain words: layers of the net without weights,
layers of the weights the net does not use, and blob shape differences.
Exit status: 0 when everything matches, 1 when the weights differ from the
net, 2 when a file cannot be read (missing, not a Caffe model, bad prototxt).

Examples:
  python tools/inspect_caffemodel.py runs/color_dropping/model_iter_2000.caffemodel
  python tools/inspect_caffemodel.py no_fc6.caffemodel \\
      --prototxt prototxt/groupless_caffenet.prototxt
"""
import sys

from ctxpred.cli import run_tool, tool_parser
from ctxpred.weights.surgery import compare_shapes
from ctxpred.caffe.netparam import read_net_param, weight_shapes_of
from ctxpred.weights.files import read_weights


def layer_table(weights):
    """The table of layers, blob shapes and parameter counts, with a total line (text)."""
    rows = [(name, ", ".join("x".join(map(str, array.shape)) for array in arrays),
             sum(array.size for array in arrays)) for name, arrays in weights.items()]
    name_width = max([len("layer")] + [len(row[0]) for row in rows])
    shape_width = max([len("blobs")] + [len(row[1]) for row in rows])
    lines = [f"{'layer':<{name_width}}  {'blobs':<{shape_width}}  {'parameters':>12}"]
    lines += [f"{name:<{name_width}}  {shapes:<{shape_width}}  {count:>12,}"
              for name, shapes, count in rows]
    total = sum(row[2] for row in rows)
    lines.append(f"total: {total:,} parameters in {len(rows)} layers "
                 f"({total * 4 / 2 ** 20:.1f} MiB as float32)")
    return "\n".join(lines)


def main(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("weights", help="caffemodel to inspect (binary or HDF5)")
    parser.add_argument("--prototxt", help="net definition to check the weights against; "
                                           "Caffe builds it in the TEST phase")
    args = parser.parse_args(argv)
    net_param = read_net_param(args.prototxt) if args.prototxt else None
    weights = read_weights(args.weights)
    net_shapes = weight_shapes_of(net_param, args.prototxt) if net_param is not None else None
    print(f"{args.weights}:")
    print(layer_table(weights))
    if net_shapes is None:
        return 0
    report = compare_shapes(net_shapes, weights)
    if report.exact:
        print(f"{args.weights} fits {args.prototxt}: same layers, same shapes")
        return 0
    print(f"{args.weights} differs from {args.prototxt}:")
    for line in report.lines():
        print(f"  {line}")
    return 1


if __name__ == "__main__":
    sys.exit(run_tool(main))
