"""Fold BatchNorm into the conv / fc layers before it, for deployment.

For each Convolution or InnerProduct followed by a BatchNorm in INDEFINITION
(blobs mean, var, scale factor s; eps from batch_norm_param, default 1e-5):
std = sqrt(var/s + eps), W <- W / std per output channel, b <- b/std -
(mean/s)/std. Layers after the pair fusion (fc7 and on) keep their BatchNorm,
as in the authors' code. OUTMODEL holds the weights of OUTDEFINITION's
layers, e.g. prototxt/color_dropping/deploy.prototxt (conv1..fc6) or
train_no_bn.prototxt (which keeps bn7).

The folded net computes in every phase what the BatchNorm net computes in
the TEST phase. The authors recommend data-dependent rescaling (magic init)
afterwards, since folding leaves badly scaled weights.

Example:
  python tools/debatchnorm.py prototxt/color_dropping/train.prototxt \\
      runs/color_dropping/model_iter_2000.caffemodel \\
      prototxt/color_dropping/deploy.prototxt folded.caffemodel
"""
import sys

from ctxpred.cli import BAD_INPUT, run_tool, tool_parser
from ctxpred.weights.surgery import (batchnorm_pairs, check_batchnorms_fold, compare_shapes,
                                     fold_batchnorm)
from ctxpred.caffe.netparam import read_net_param, weight_shapes_of
from ctxpred.weights.files import read_weights, write_weights


def main(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("indefinition", help="prototxt of the net with BatchNorm (its layer "
                                             "graph says which layers fold)")
    parser.add_argument("inmodel", help="caffemodel of that net (binary or HDF5), saved after "
                                        "TRAIN forward passes filled BatchNorm's statistics")
    parser.add_argument("outdefinition", help="prototxt of the BatchNorm-free net; Caffe builds "
                                              "it (TEST phase) to check the output's shapes")
    parser.add_argument("outmodel", help="caffemodel to write for OUTDEFINITION's layers; "
                                         "HDF5 if it ends in .h5")
    args = parser.parse_args(argv)
    in_param, out_param = read_net_param(args.indefinition), read_net_param(args.outdefinition)
    weights = read_weights(args.inmodel)
    folded = fold_batchnorm(weights, in_param)
    out_shapes = weight_shapes_of(out_param, args.outdefinition)
    report = compare_shapes(out_shapes, folded)
    if report.different:
        print(f"error: the folded weights do not fit {args.outdefinition}:", file=sys.stderr)
        for line in report.lines():
            print(f"  {line}", file=sys.stderr)
        return BAD_INPUT
    check_batchnorms_fold(weights, in_param, out_param, args.indefinition)  # ValueError: exit 2
    write_weights({name: folded[name] for name in out_shapes if name in folded}, args.outmodel)
    for layer, batchnorm in batchnorm_pairs(in_param):
        print(f"folded {batchnorm.name} into {layer.name}")
    if report.unused:
        print(f"left out (not in {args.outdefinition}): {', '.join(report.unused)}")
    if report.missing:
        print(f"warning: {args.inmodel} has no weights for {', '.join(report.missing)}; "
              "Caffe will leave them at their fillers")
    print(f"wrote {args.outmodel}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
