"""Relative-position (pretext task) accuracy of trained weights on held-out images.

The paper's protocol: pairs_per_image pairs (256) from each of N images
(500), sampled as the paper describes (a random first patch and one of its 8
neighbours) and preprocessed exactly like the net's training input. Reports
the 8-way accuracy (chance 12.5%; the paper: 38.4% on VOC 2007) with a 95%
Wilson score confidence interval (binomial, pairs taken as independent) and
the 8x8 confusion matrix (rows: true position, columns: predicted), printed
and written next to the weights as <weights stem>_pretext.json and
<weights stem>_pretext_confusion.png (ctxpred.evaluation.pretext.evaluate_pretext).

Example (the demo's trained net, on 100 held-out images):
  python tools/eval_pretext.py --weights runs/demo/trained_eval.caffemodel \
      --images data/photos/heldout --images-count 100
"""
import sys

from ctxpred.caffe.env import load_caffe
from ctxpred.cli import (add_gpu, add_images, add_seed, add_weights, positive_int, run_tool,
                         tool_parser)
from ctxpred.evaluation.pretext import evaluate_pretext, report_lines
from ctxpred.models.context import NET_NAMES


def parse_args(argv):
    parser = tool_parser(__doc__)
    add_weights(parser, extra=": the trained net to evaluate")
    parser.add_argument("--net", choices=NET_NAMES, default="color_dropping",
                        help="net the weights belong to; also picks the colour handling of the "
                             "input (default: %(default)s)")
    add_images(parser, required=False, default="data/photos/heldout", extra=", held out")
    parser.add_argument("--images-count", type=positive_int, default=500,
                        help="evaluate this many images, a random subset fixed by --seed, or all "
                             "when the source holds fewer; unusable ones are skipped "
                             "(default: %(default)s)")
    parser.add_argument("--pairs-per-image", type=positive_int, default=256,
                        help="pairs drawn from each image (default: %(default)s)")
    add_seed(parser, "image subset, resizes, pairs and preprocessing")
    add_gpu(parser)
    parser.add_argument("--out", default=None,
                        help="folder for the JSON and PNG (default: the weights' folder)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    load_caffe(gpu=args.gpu)
    report, json_path, png_path = evaluate_pretext(
        args.weights, args.net, args.images, args.images_count, args.pairs_per_image, args.seed,
        args.out)
    print("\n".join(report_lines(report)))
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    sys.exit(run_tool(main))
