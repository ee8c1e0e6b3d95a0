"""Relative-position (pretext task) accuracy of trained weights on held-out images.

The paper's protocol: pairs_per_image pairs (256) from each of N images
(500), sampled as the paper describes (a random first patch and one of its 8
neighbours) and preprocessed exactly like the net's training input. Reports
the 8-way accuracy (chance 12.5%; the paper: 38.4% on VOC 2007) with a 95%
Wilson score confidence interval (binomial, pairs taken as independent) and
the 8x8 confusion matrix (rows: true position, columns: predicted), printed
and written next to the weights as <weights stem>_pretext.json and
<weights stem>_pretext_confusion.png.
"""
import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from ctxpred.caffe.env import load_caffe
from ctxpred.cli import exit_code, fail, run_tool
from ctxpred.models.context import NET_NAMES

CHANCE = 1 / 8


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True,
                        help="trained .caffemodel (or .h5) to evaluate")
    parser.add_argument("--net", choices=NET_NAMES, default="color_dropping",
                        help="net the weights belong to; also picks the colour handling of the "
                             "input (default: %(default)s)")
    parser.add_argument("--images", default="data/photos/heldout",
                        help="held-out images: folder, glob, list file or LMDB "
                             "(default: %(default)s)")
    parser.add_argument("--images-count", type=int, default=500,
                        help="evaluate this many images, a random subset fixed by --seed, or all "
                             "when the source holds fewer; unusable ones are skipped "
                             "(default: %(default)s)")
    parser.add_argument("--pairs-per-image", type=int, default=256,
                        help="pairs drawn from each image (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="fixes the image subset, resizes, pairs and preprocessing "
                             "(default: %(default)s)")
    parser.add_argument("--gpu", type=int, default=None,
                        help="CUDA device to run on (default: the CPU)")
    parser.add_argument("--out", default=None,
                        help="folder for the JSON and PNG (default: the weights' folder)")
    args = parser.parse_args(argv)
    if not Path(args.weights).is_file():
        parser.error(f"weights file {args.weights} does not exist")
    if args.images_count < 1 or args.pairs_per_image < 1:
        parser.error("--images-count and --pairs-per-image must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    load_caffe(gpu=args.gpu)
    # Imported only once the arguments are valid: it loads pycaffe.
    from ctxpred.evaluation import pretext as evaluation

    try:
        # The pair-head layout (reference or factorized) is read off the weights.
        net = evaluation.load_scoring_net(args.net, args.weights)
        pairs = evaluation.sample_eval_pairs(args.images, args.images_count, args.pairs_per_image,
                                             args.seed, evaluation.eval_config(args.net))
    except (OSError, ValueError) as error:
        return fail(error, exit_code(error))
    factorized = "fc7_first" in net.params
    result = evaluation.relative_position_scores(net, tqdm(pairs, desc="images", unit="image"))
    if pairs.skipped:
        print(f"skipped {len(pairs.skipped)} of {len(pairs)} images (see the warnings above)")
    if result.total == 0:
        return fail(f"no usable image in {args.images}")

    accuracy, low, high = evaluation.accuracy_with_interval(result.correct, result.total)
    matrix = evaluation.confusion_matrix(result.labels, result.predictions)
    n_images = len(pairs) - len(pairs.skipped)
    print(f"relative-position accuracy: {accuracy:.2%} ({result.correct}/{result.total} pairs "
          f"from {n_images} images; chance {CHANCE:.1%})")
    print(f"95% Wilson score interval: [{low:.2%}, {high:.2%}]")
    print(f"softmax loss per pair: {result.loss / result.total:.4f}")
    print("confusion matrix (rows: true position, columns: predicted):")
    print(evaluation.format_confusion(matrix))

    out = Path(args.out) if args.out else Path(args.weights).parent
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.weights).stem
    png_path, json_path = out / f"{stem}_pretext_confusion.png", out / f"{stem}_pretext.json"
    evaluation.plot_confusion(
        matrix, str(png_path),
        f"{args.net}{' (factorized head)' if factorized else ''}: "
        f"{accuracy:.1%} [{low:.1%}, {high:.1%}] on {result.total} pairs")
    report = {
        "weights": str(args.weights), "net": args.net, "factorized_head": factorized,
        "images": args.images, "images_requested": len(pairs), "images_evaluated": n_images,
        "images_skipped": pairs.skipped, "pairs_per_image": args.pairs_per_image,
        "seed": args.seed, "pairs": result.total, "correct": result.correct,
        "accuracy": accuracy, "chance": CHANCE,
        "interval": {"method": "Wilson score", "confidence": 0.95, "low": low, "high": high},
        "loss_per_pair": result.loss / result.total,
        "position_names": list(evaluation.POSITION_NAMES),
        "confusion_matrix": {"rows": "true position", "columns": "predicted position",
                             "counts": matrix.tolist()},
    }
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    sys.exit(run_tool(main))
