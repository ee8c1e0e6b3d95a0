"""Compare two classification runs of tools/finetune_classification.py on the same test images.

Reads each run's scores.npz (labels and the scores of every number of
crops) and prints, per number of crops, both mAPs and the difference
(second minus first) with a 95% paired bootstrap interval over test images
(the same resampled images for both runs). The runs must have scored the
same test split.

Example:
  python tools/compare_classifiers.py runs/cls_random runs/cls_context
"""
import argparse
import sys
from pathlib import Path

import numpy as np

from ctxpred.classification.data import map_difference, mean_average_precision
from ctxpred.cli import run_tool


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", help="run folder (the baseline)")
    parser.add_argument("second", help="run folder compared with the first")
    parser.add_argument("--resamples", type=int, default=1000,
                        help="bootstrap resamples (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the resampling (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    runs = []
    for folder in (args.first, args.second):
        path = Path(folder, "scores.npz")
        if not path.exists():
            print(f"error: {path} does not exist: score the run first", file=sys.stderr)
            return 2
        runs.append(dict(np.load(path)))
    if not np.array_equal(runs[0]["labels"], runs[1]["labels"]):
        print("error: the two runs scored different test images", file=sys.stderr)
        return 2
    labels = runs[0]["labels"]
    keys = sorted((key for key in runs[0] if key.startswith("scores_") and key in runs[1]),
                  key=lambda key: int(key.split("_")[1]))
    print(f"{len(labels)} test images; mAP in %, difference = second - first")
    for key in keys:
        first, second = runs[0][key], runs[1][key]
        difference, (low, high) = map_difference(labels, first, second, args.resamples,
                                                 args.seed)
        maps = [100 * mean_average_precision(labels, scores)[0] for scores in (first, second)]
        print(f"{key.split('_')[1]:>3} crop(s): first {maps[0]:.1f}, second {maps[1]:.1f}, "
              f"difference {100 * difference:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
