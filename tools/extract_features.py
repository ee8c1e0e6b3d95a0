"""Extract fc6 (or any blob) features of 96x96 patches with a context-prediction deploy net.

Patches are fed with the input convention of the released networks: RGB,
the per-channel means ctxpred.models.context.MEAN_RGB subtracted, nothing else (the
net scales each patch to RMS 50 itself, and projects it for the projection
net). Images are used as decoded, at full resolution, unless --max-pixels
is given.

Output, by the suffix of --out:
  .h5 / .hdf5  datasets features (rows x D float32), image (UTF-8 path per row),
               box (rows x 4 int64: x, y, w, h in pixels of the image the patch
               was cut from), scale (per row: that image's width over the
               decoded image's width; 1 unless --max-pixels shrank it), and
               attributes weights, net, deploy, layer, feature_shape,
               patches, patches_per_image, seed, max_pixels, mean_rgb.
  .npy         the features only (rows x D float32): no paths, boxes or attributes.
Rows come in image order, and within an image in patch order. A blob with
spatial extent (pool5: 256 x 3 x 3) is flattened in C, H, W order.
The file is written as OUT.part while running and renamed at the end; memory
stays flat however many images there are (images are decoded one at a time,
features written every few hundred rows).

Weights are checked against the deploy net layer by layer before anything
runs: every layer whose shapes differ is reported with both shapes. A model
without fc6 (the released "no fc6" models) cannot give fc6: ask for an
earlier blob, e.g. --layer pool5. Weight layers the deploy net lacks (the
pair head of a training snapshot) are listed and ignored.

Examples:
  python tools/extract_features.py --weights cd.caffemodel --images data/photos/heldout --out f.h5
  python tools/extract_features.py --weights nofc6.caffemodel --layer pool5 --patches grid \\
      --images 'photos/**/*.jpg' --out pool5.npy
  python tools/extract_features.py --weights cd.caffemodel --patches boxes.csv --out f.h5
"""
import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from ctxpred.caffe.env import CaffeNotAvailable, load_caffe
from ctxpred.cli import exit_code, fail, run_tool
from ctxpred.data.images import DEFAULT_MAX_PIXELS
from ctxpred.models.context import MEAN_RGB, NET_NAMES, snapshot_param

REPO = Path(__file__).resolve().parents[1]
OUTPUT_SUFFIXES = (".h5", ".hdf5", ".npy")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True,
                        help="caffemodel (binary or HDF5 .h5) holding at least the layers up to "
                             "--layer")
    parser.add_argument("--net", choices=NET_NAMES, default="color_dropping",
                        help="which released architecture: picks the default --deploy "
                             "(default: %(default)s)")
    parser.add_argument("--deploy", default=None,
                        help="deploy prototxt (input 1 x 3 x 96 x 96 mean-subtracted RGB; default: "
                             "prototxt/<--net>/deploy.prototxt of this checkout)")
    parser.add_argument("--layer", default="fc6",
                        help="blob to extract, as named in the deploy prototxt; the net is cut "
                             "after it (default: %(default)s, before its ReLU)")
    parser.add_argument("--images", default=None,
                        help="images: folder (recursive), glob, image file, list file or Caffe "
                             "LMDB. Required for random and grid patches; with a patch FILE, the "
                             "folder its relative paths start from (default: FILE's folder)")
    parser.add_argument("--out", required=True,
                        help="output file: .h5/.hdf5 (features, image, box, scale, attributes) or "
                             ".npy (features only)")
    parser.add_argument("--patches", default="random",
                        help="'random': --patches-per-image uniform positions per image, fixed "
                             "by --seed; 'grid': the non-overlapping 96-pixel grid from the "
                             "top-left corner; or a FILE of 'image_path x y' rows (x, y: top-left "
                             "corner in pixels; comma or whitespace separated; '#' comments and "
                             "a CSV header line allowed) (default: %(default)s)")
    parser.add_argument("--patches-per-image", type=int, default=16,
                        help="patches per image for --patches random (default: %(default)s)")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="shrink images above this many pixels to it (aspect kept, area "
                             "interpolation; JPEGs are decoded at a reduced scale, so memory "
                             "stays bounded) before cutting patches; boxes are then in pixels of "
                             "the shrunk image and the 'scale' dataset gives the factor. Not with "
                             f"a patch FILE (default: {DEFAULT_MAX_PIXELS}; 0: full size)")
    parser.add_argument("--batch", type=int, default=64,
                        help="patches per net.forward (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random patch positions (default: %(default)s)")
    parser.add_argument("--gpu", type=int, default=None,
                        help="CUDA device to run on (default: the CPU)")
    args = parser.parse_args(argv)
    args.deploy = args.deploy or str(REPO / "prototxt" / args.net / "deploy.prototxt")
    listed = args.patches not in ("random", "grid")
    if Path(args.out).suffix not in OUTPUT_SUFFIXES:
        parser.error(f"--out must end in one of {', '.join(OUTPUT_SUFFIXES)}")
    for flag, value in (("--weights", args.weights), ("--deploy", args.deploy)):
        if not Path(value).is_file():
            parser.error(f"{flag} file {value} does not exist")
    if listed and not Path(args.patches).is_file():
        parser.error(f"--patches is neither 'random', 'grid' nor an existing file: {args.patches}")
    if listed and args.max_pixels is not None:
        parser.error("--max-pixels cannot be used with a patch FILE: its coordinates refer to "
                     "the images as decoded")
    if not listed and args.images is None:
        parser.error(f"--images is required with --patches {args.patches}")
    if args.patches_per_image < 1 or args.batch < 1:
        parser.error("--patches-per-image and --batch must be positive")
    if args.max_pixels and args.max_pixels < 96 * 96:
        parser.error("--max-pixels must be at least 9216 (one 96x96 patch)")
    if not listed:
        args.max_pixels = DEFAULT_MAX_PIXELS if args.max_pixels is None else args.max_pixels or None
    return args, listed


def main(argv=None):
    args, listed = parse_args(argv)
    try:
        load_caffe(gpu=args.gpu)
    except CaffeNotAvailable as error:
        return fail(error)
    # Imported once the arguments are valid: it loads pycaffe.
    from ctxpred.features.extractor import FeatureExtractor
    from ctxpred.features.patches import listed_patches, read_patch_list, sampled_patches
    from ctxpred.features.streaming import stream_features
    from ctxpred.features.writers import open_feature_writer
    from ctxpred.data.images import open_source

    try:
        extractor = FeatureExtractor(args.deploy, args.weights, args.layer, args.batch,
                                     train_param=snapshot_param(args.net))
        if listed:
            runs = read_patch_list(args.patches, args.images)
            total = len(runs)
            items = listed_patches(runs)
        else:
            source = open_source(args.images)
            total = len(source)
            items = sampled_patches(source, args.patches, args.patches_per_image,
                                    args.seed, args.max_pixels)
    except (OSError, ValueError) as error:
        return fail(error, exit_code(error))
    if extractor.ignored_layers:
        print(f"ignoring weight layers the deploy net does not have: "
              f"{', '.join(extractor.ignored_layers)}")
    attrs = {"weights": str(args.weights), "net": args.net, "deploy": str(args.deploy),
             "layer": args.layer, "feature_shape": extractor.feature_shape,
             "patches": args.patches, "patches_per_image": args.patches_per_image,
             "seed": args.seed, "max_pixels": args.max_pixels or 0, "mean_rgb": MEAN_RGB,
             "input": "RGB minus mean_rgb, no scaling (the net normalises each patch)"}
    try:
        with open_feature_writer(args.out, extractor.dim, attrs) as writer:
            summary = stream_features(
                extractor, tqdm(items, total=total, desc="images", unit="image"), writer)
    except (OSError, ValueError) as error:
        return fail(error, exit_code(error))
    for name, reason in summary.skipped.items():
        print(f"skipped {name}: {reason}")
    if summary.rows == 0:
        Path(args.out).unlink()
        return fail(f"no patch could be cut from the {total} images")
    note = "" if Path(args.out).suffix != ".npy" else " (features only: no image paths or boxes)"
    print(f"wrote {summary.rows} x {extractor.dim} {args.layer} features of {summary.images} "
          f"images to {args.out}{note}")


if __name__ == "__main__":
    sys.exit(run_tool(main))
