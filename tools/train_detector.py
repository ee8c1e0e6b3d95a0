"""Fine-tune and test a Fast R-CNN detector in stock Caffe (ctxpred's Python layers).

Trains the ctxpred variant of a Fast R-CNN net (RoIData data layer, Python
ROIPooling and SmoothL1Loss: prototxt/fast_rcnn/ctxpred/) on the --train-split
of a VOC-format dataset from --init weights, then detects on --test-split and
scores VOC average precision, both the area version (VOC2010+) and the
11-point version (VOC2007). Everything goes into --out: run.json, the
prototxts, snapshots, train.log, final.caffemodel (target normalisation folded
into bbox_pred), detections.json, results.json and precision_recall.png.

Rerunning with the same --out resumes from the newest snapshot. Ctrl-C (or a
file named 'quit' in --out) stops after the current step with a snapshot, and
the test still runs on what was trained.

The dataset needs the VOC devkit layout (Annotations/, JPEGImages/,
ImageSets/Main/<split>.txt), a classes.txt and proposals (--proposals, default
DATASET/proposals.npz; data/make_detection_set.py makes all of it).

Example (the README's experiment: context weights + magic init against
magic-initialised random weights, same schedule):
  python tools/prepare_detection_init.py --weights runs/demo/model_iter_472.caffemodel \\
      --net color_dropping --images 'data/detection/JPEGImages/trainval_*.jpg' \\
      --out runs/det/context_init.caffemodel
  python tools/train_detector.py --init runs/det/context_init.caffemodel --out runs/det/context
"""
import argparse
import sys

from ctxpred.cli import run_tool
from ctxpred.detection.run import DetectorRun, train_and_test
from ctxpred.models.fast_rcnn import MODEL_NAMES


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="data/detection",
                        help="VOC-format dataset folder (default: %(default)s)")
    parser.add_argument("--init", help="caffemodel to start from, loaded by layer name "
                        "(e.g. from tools/prepare_detection_init.py); without it the layers "
                        "keep the prototxt's fillers (zeros for the trunk: not trainable)")
    parser.add_argument("--out", required=True, help="run folder (created; resumed if present)")
    parser.add_argument("--model", choices=MODEL_NAMES, default="CaffeNetGroupless",
                        help="Fast R-CNN net (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=1000,
                        help="SGD iterations (default: %(default)s)")
    parser.add_argument("--scales", type=int, nargs="+", default=[300],
                        help="shorter image side(s) in pixels, one drawn per training batch, "
                             "all at test time (Fast R-CNN: 600; default %(default)s for a CPU)")
    parser.add_argument("--max-size", type=int, default=500,
                        help="cap on the longer image side, pixels (default: %(default)s)")
    parser.add_argument("--ims-per-batch", type=int, default=2,
                        help="images per minibatch (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="RoIs per minibatch (default: %(default)s)")
    parser.add_argument("--base-lr", type=float, default=0.001,
                        help="SGD learning rate (default: %(default)s)")
    parser.add_argument("--stepsize", type=int, default=30000,
                        help="iterations between learning-rate drops by 10x "
                             "(default: %(default)s)")
    parser.add_argument("--train-split", default="trainval",
                        help="split to train on (default: %(default)s)")
    parser.add_argument("--test-split", default="test",
                        help="split to score (default: %(default)s)")
    parser.add_argument("--proposals", help="proposals .npz (default: DATASET/proposals.npz)")
    parser.add_argument("--seed", type=int, default=3,
                        help="seed of the minibatch sampling and Caffe's fillers "
                             "(default: %(default)s, Fast R-CNN's)")
    parser.add_argument("--test-only", action="store_true",
                        help="skip training; score OUT/final.caffemodel")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run = DetectorRun(dataset=args.dataset, model=args.model, init=args.init,
                      iterations=args.iters, train_split=args.train_split,
                      test_split=args.test_split, proposals=args.proposals,
                      base_lr=args.base_lr, stepsize=args.stepsize, seed=args.seed,
                      detection=dict(scales=args.scales, max_size=args.max_size,
                                     ims_per_batch=args.ims_per_batch,
                                     batch_size=args.batch_size))
    return train_and_test(args.out, run, args.test_only)


if __name__ == "__main__":
    sys.exit(run_tool(main))
