"""Convert a context-prediction caffemodel between the two fc7 layouts.

The reference pair head has one 'fc7' on concatenated pair features; the
factorized head (tools/train.py's default) has 'fc7_first' and 'fc7_second'
on single patches. They compute the same function; this tool moves weights
between them, so snapshots of either load into the other's prototxt.

Examples:
  python tools/convert_head.py runs/color_dropping/model_iter_2000.caffemodel ref.caffemodel
  python tools/convert_head.py ref.caffemodel fact.caffemodel.h5 --to factorized
"""
import sys

from ctxpred.cli import fail, run_tool, tool_parser
from ctxpred.weights.surgery import FIRST, to_factorized_head, to_reference_head
from ctxpred.weights.files import read_weights, write_weights


def main(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("weights", help="input caffemodel (binary or HDF5)")
    parser.add_argument("out", help="output caffemodel; HDF5 if it ends in .h5")
    parser.add_argument("--to", choices=("reference", "factorized"),
                        help="target layout (default: the one the input is not in)")
    args = parser.parse_args(argv)
    weights = read_weights(args.weights)
    source = "factorized" if FIRST in weights else "reference" if "fc7" in weights else None
    if source is None:
        return fail(f"{args.weights} has neither fc7 nor {FIRST}: not a pair-head model")
    target = args.to or ("reference" if source == "factorized" else "factorized")
    if target != source:
        weights = (to_reference_head if target == "reference" else to_factorized_head)(weights)
    write_weights(weights, args.out)
    print(f"{args.weights} ({source} head) -> {args.out} ({target} head)")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
