"""Initial weights for Fast R-CNN fine-tuning from a context-prediction model, in one command.

The project page's route: fold BatchNorm (when the model has it), keep the
conv layers under the names of the groupless CaffeNet (color_dropping,
projection) or VGG16 (vgg), drop fc6 and above, adapt conv1 to Caffe's BGR
input (and fold the projection net's projection into it), then magic init
with -cs on the images: fc6, fc7, fc8 are initialised from data and every
layer is rescaled. Prints magic init's table and which layers came from the
context model and which from data.

The output loads by name into prototxt/fast_rcnn/models/CaffeNetGroupless
(or VGGContext) and the ctxpred variants under prototxt/fast_rcnn/ctxpred/.

Example (VOC 2007 images, on GPU 0):
  python tools/prepare_detection_init.py --weights color_dropping.caffemodel \\
      --net color_dropping --images '/data/VOC2007/JPEGImages/*.jpg' --gpu 0 \\
      --out detection_init.caffemodel
"""
import argparse
import sys
from pathlib import Path

from ctxpred.caffe.env import CaffeNotAvailable, load_caffe
from ctxpred.detection.init_weights import DETECTION_PROTOTXTS, origin_lines, prepare_detection_init
from ctxpred.cli import run_tool
from ctxpred.models.context import NET_NAMES
from ctxpred.weights.files import write_weights

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, metavar="CONTEXT.caffemodel",
                        help="the context-prediction model (binary or HDF5 caffemodel)")
    parser.add_argument("--net", required=True, choices=NET_NAMES,
                        help="which context net the model is")
    parser.add_argument("--images", required=True, metavar="GLOB",
                        help="images for magic init (a quoted glob, or a folder / list file / "
                             "LMDB), e.g. VOC 2007's JPEGImages")
    parser.add_argument("--out", required=True, metavar="INIT.caffemodel",
                        help="caffemodel to write (HDF5 if it ends in .h5)")
    parser.add_argument("--context-def", metavar="PROTOTXT",
                        help="the context net with its BatchNorm layers, which say what folds "
                             "(default: prototxt/NET/train.prototxt)")
    parser.add_argument("--detection-def", metavar="PROTOTXT",
                        help="the detection net magic init runs on (default: "
                             "prototxt/groupless_caffenet.prototxt, for vgg "
                             "prototxt/vgg16.prototxt)")
    parser.add_argument("-bs", "--batch-size", type=int, default=16,
                        help="images per batch (default: %(default)s)")
    parser.add_argument("-nit", "--iterations", type=int, default=10,
                        help="number of batches for the statistics (default: %(default)s)")
    parser.add_argument("-b", "--bias", type=float, default=0.1,
                        help="target mean of each initialised pre-activation "
                             "(default: %(default)s)")
    parser.add_argument("--mem-limit", type=float, default=500, metavar="MB",
                        help="cap in MB on gathered data (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the image order, the weights and -cs's diffs "
                             "(default: %(default)s)")
    parser.add_argument("--gpu", type=int, default=None,
                        help="CUDA device id (default: the CPU)")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.iterations < 1 or args.mem_limit <= 0:
        parser.error("--batch-size, --iterations and --mem-limit must be positive")
    args.context_def = args.context_def or str(REPO / "prototxt" / args.net / "train.prototxt")
    args.detection_def = args.detection_def or str(REPO / "prototxt"
                                                   / DETECTION_PROTOTXTS[args.net])
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        caffe = load_caffe(gpu=args.gpu)
        init = prepare_detection_init(
            caffe, args.weights, args.net, args.images, args.context_def, args.detection_def,
            batch_size=args.batch_size, iterations=args.iterations, seed=args.seed,
            bias=args.bias, mem_limit_mb=args.mem_limit)
    except (CaffeNotAvailable, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for line in (*init.summary, "", *origin_lines(init)):
        print(line)
    write_weights(init.weights, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
