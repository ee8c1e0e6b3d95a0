"""Extract fc6 (or any blob) features of 96x96 patches with a context-prediction deploy net.

Input convention of the released networks: RGB minus ctxpred.models.context.MEAN_RGB
(the net scales each patch to RMS 50 itself). Images are decoded at full
size unless --max-pixels shrinks them. Output by the suffix of --out:
  .h5 / .hdf5  features (rows x D float32), image (path per row), box (rows x 4
               int64 x, y, w, h), scale (image width over decoded width) and
               attributes (weights, net, deploy, layer, feature_shape, patches, ...)
  .npy         the features only.
Rows come in image order, then patch order; a blob with spatial extent is
flattened C, H, W. OUT.part is renamed to OUT at the end; memory stays flat.
Weights are checked layer by layer first (a model without fc6 needs e.g.
--layer pool5); weight layers the deploy net lacks are listed and ignored.
Per-layer features of whole images (the frozen-feature protocols):
ctxpred.features.layers, used by tools/eval_frozen.py.

Examples:
  python tools/extract_features.py --weights cd.caffemodel --images data/photos/heldout --out f.h5
  python tools/extract_features.py --weights nofc6.caffemodel --layer pool5 --patches grid \\
      --images 'photos/**/*.jpg' --out pool5.npy
  python tools/extract_features.py --weights cd.caffemodel --patches boxes.csv --out f.h5
"""
import sys
from pathlib import Path

from ctxpred.cli import (add_gpu, add_images, add_net, add_seed, add_weights, deploy_prototxt,
                         positive_int, run_tool, tool_parser)
from ctxpred.data.images import DEFAULT_MAX_PIXELS

OUTPUT_SUFFIXES = (".h5", ".hdf5", ".npy")


def parse_args(argv):
    parser = tool_parser(__doc__)
    add_weights(parser, extra=" holding at least the layers up to --layer")
    add_net(parser)
    parser.add_argument("--layer", default="fc6",
                        help="blob to extract; the net is cut after it (default: %(default)s)")
    add_images(parser, required=False, extra="; with a patch FILE, the folder its relative "
                                              "paths start from (default: FILE's folder)")
    parser.add_argument("--out", required=True, help="output file: .h5/.hdf5 or .npy")
    parser.add_argument("--patches", default="random",
                        help="'random' (--patches-per-image positions per image, --seed), "
                             "'grid' (non-overlapping, from the top-left corner) or a FILE of "
                             "'image_path x y' rows (top-left corners; CSV or whitespace; '#' "
                             "comments and a header allowed) (default: %(default)s)")
    parser.add_argument("--patches-per-image", type=positive_int, default=16)
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="shrink images above this many pixels (boxes then in shrunk "
                             f"pixels; not with a FILE) (default: {DEFAULT_MAX_PIXELS}; 0: full)")
    parser.add_argument("--batch", type=positive_int, default=64,
                        help="patches per net.forward (default: %(default)s)")
    add_seed(parser, "random patch positions")
    add_gpu(parser)
    args = parser.parse_args(argv)
    args.deploy = deploy_prototxt(args.net, args.deploy)
    listed = args.patches not in ("random", "grid")
    if Path(args.out).suffix not in OUTPUT_SUFFIXES:
        parser.error(f"--out must end in one of {', '.join(OUTPUT_SUFFIXES)}")
    if listed and not Path(args.patches).is_file():
        parser.error(f"--patches is neither 'random', 'grid' nor an existing file: {args.patches}")
    if listed and args.max_pixels is not None:
        parser.error("--max-pixels cannot be used with a patch FILE: its coordinates refer to "
                     "the images as decoded")
    if not listed and args.images is None:
        parser.error(f"--images is required with --patches {args.patches}")
    if args.max_pixels and args.max_pixels < 96 * 96:
        parser.error("--max-pixels must be at least 9216 (one 96x96 patch)")
    if not listed:
        args.max_pixels = DEFAULT_MAX_PIXELS if args.max_pixels is None else args.max_pixels or None
    return args


def main(argv=None):
    args = parse_args(argv)
    from ctxpred.caffe.env import load_caffe
    load_caffe(gpu=args.gpu)
    # Imported once Caffe is loaded (on the device asked for).
    from functools import partial

    from tqdm import tqdm

    from ctxpred.features.extractor import FeatureExtractor
    from ctxpred.features.streaming import patch_items, write_patch_features
    from ctxpred.models.context import MEAN_RGB, snapshot_param

    extractor = FeatureExtractor(args.deploy, args.weights, args.layer, args.batch,
                                 train_param=snapshot_param(args.net))
    items, total = patch_items(args.patches, args.images, args.patches_per_image, args.seed,
                               args.max_pixels)
    if extractor.ignored_layers:
        print(f"ignoring weight layers the deploy net does not have: "
              f"{', '.join(extractor.ignored_layers)}")
    attrs = {"weights": str(args.weights), "net": args.net, "deploy": str(args.deploy),
             "layer": args.layer, "feature_shape": extractor.feature_shape,
             "patches": args.patches, "patches_per_image": args.patches_per_image,
             "seed": args.seed, "max_pixels": args.max_pixels or 0, "mean_rgb": MEAN_RGB,
             "input": "RGB minus mean_rgb, no scaling (the net normalises each patch)"}
    summary = write_patch_features(extractor, items, args.out, attrs,
                                   partial(tqdm, total=total, desc="images", unit="image"))
    for name, reason in summary.skipped.items():
        print(f"skipped {name}: {reason}")
    note = "" if Path(args.out).suffix != ".npy" else " (features only: no image paths or boxes)"
    print(f"wrote {summary.rows} x {extractor.dim} {args.layer} features of {summary.images} "
          f"images to {args.out}{note}")


if __name__ == "__main__":
    sys.exit(run_tool(main))
