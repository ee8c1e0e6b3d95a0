"""Compare two detector runs on the same test images: AP per class and the mAP difference.

Reads OUT/detections.json of two runs of tools/train_detector.py (or any
folders holding such a file) and scores both on --split of --dataset with
VOC average precision (area version; 11-point with --use-07-metric). The
mAP difference (second minus first) comes with a 95% bootstrap interval:
test images are resampled with replacement --resamples times (seeded), both
runs on each resample, so the interval says how much the comparison owes to
which images happen to be in the test set.

Example (the README's experiment):
  python tools/compare_detectors.py runs/detection/random runs/detection/context \\
      --labels "random + magic init" "context + magic init"
"""
import argparse
import sys
from pathlib import Path

from ctxpred.detection.roidb import read_classes
from ctxpred.detection.run import map_difference, read_detections
from ctxpred.cli import run_tool
from ctxpred.detection.voc import AnnotationError, evaluate_detections, read_dataset


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs=2, help="two folders holding detections.json")
    parser.add_argument("--labels", nargs=2, default=None,
                        help="names of the two runs (default: the folder names)")
    parser.add_argument("--dataset", default="data/detection",
                        help="VOC-format dataset the runs were tested on (default: %(default)s)")
    parser.add_argument("--split", default="test", help="test split (default: %(default)s)")
    parser.add_argument("--resamples", type=int, default=1000,
                        help="bootstrap resamples of the test images (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the resampling (default: %(default)s)")
    parser.add_argument("--use-07-metric", action="store_true",
                        help="11-point AP (VOC2007) instead of the area version (VOC2010+)")
    args = parser.parse_args(argv)
    if args.resamples < 1:
        parser.error("--resamples must be positive")
    args.labels = args.labels or [Path(run).name for run in args.runs]
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        classes = read_classes(args.dataset)
        annotations = dict(read_dataset(args.dataset, args.split, classes))
        first, second = (read_detections(run) for run in args.runs)
        results = [evaluate_detections(found, annotations, classes,
                                       use_07_metric=args.use_07_metric)
                   for found in (first, second)]
    except (AnnotationError, ValueError) as error:
        print(f"compare_detectors: error: {error}", file=sys.stderr)
        return 2
    width = max(map(len, classes + ["mean"]))
    print(f"{'class':<{width}}  {args.labels[0]:>22}  {args.labels[1]:>22}")
    for name in classes:
        print(f"{name:<{width}}  {results[0][name].ap:22.3f}  {results[1][name].ap:22.3f}")
    print(f"{'mean':<{width}}  {results[0]['mAP']:22.3f}  {results[1]['mAP']:22.3f}")
    difference, low, high = map_difference(first, second, annotations, classes, args.resamples,
                                           args.seed, args.use_07_metric)
    print(f"mAP difference ({args.labels[1]} - {args.labels[0]}): {100 * difference:+.1f} points, "
          f"95% bootstrap interval [{100 * low:+.1f}, {100 * high:+.1f}] over "
          f"{len(annotations)} test images, {args.resamples} resamples")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
