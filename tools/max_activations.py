"""Maximal activations (project page figure): per unit, the 9 patches that excite it most.

--patches random 96x96 patches are cut from --images: --per-image patches
per image at uniform positions fixed by --seed (ctxpred.features.patches),
images in order, the first --patches of that stream. One net, cut after the
deepest of --layers, runs once per batch and every requested blob is read
from the same forward pass. A unit's activation on a patch is its value
(fc blobs) or its maximum over positions (convolutional blobs, the position
kept). Per layer and unit the k = 9 highest activations are kept.

Resuming: the state (top 9 per unit, patch ids, patches seen) is saved to
OUT/state.npz every --chunk patches and at the end. Rerunning with the
same flags (and a --patches as large or larger) continues where the last
run stopped; patches already seen are cut again but not run through the net.

Output: OUT/<layer>.html per layer, a 3x3 grid of the 9 top patches per
unit (best first, row by row), everything outside the unit's receptive
field (read from the prototxt) black; OUT/index.html links them; patch
images in OUT/patches/ (PNG, named by the hash of their pixels).

Example:
  python tools/max_activations.py --weights ours.caffemodel --images data/voc2011 \\
      --patches 2500000 --per-image 220 --out runs/maxact
"""
import sys

from ctxpred.caffe.env import load_caffe
from ctxpred.cli import (add_gpu, add_images, add_net, add_seed, add_weights, deploy_prototxt,
                         positive_int, run_tool, tool_parser)
from ctxpred.figures.max_activations import MaxActivationSettings, max_activations


def parse_args(argv):
    defaults = MaxActivationSettings
    parser = tool_parser(__doc__)
    add_weights(parser, extra=" with the layers up to the deepest of --layers")
    add_images(parser)
    parser.add_argument("--layers", default=",".join(defaults.layers),
                        help="comma-separated blobs of the deploy net, one page each "
                             "(default: %(default)s)")
    parser.add_argument("--patches", type=positive_int, required=True,
                        help="random patches to run through the net in total (a resumed run "
                             "counts the patches of earlier runs)")
    parser.add_argument("--per-image", type=positive_int, default=defaults.per_image,
                        help="random patches cut from each image; the stream ends after the "
                             "last image (default: %(default)s)")
    parser.add_argument("--out", required=True,
                        help="output folder: state.npz, <layer>.html, index.html, patches/")
    add_net(parser)
    add_seed(parser, "patch positions")
    parser.add_argument("--batch", type=positive_int, default=defaults.batch,
                        help="patches per net.forward (default: %(default)s)")
    parser.add_argument("--chunk", type=positive_int, default=defaults.chunk,
                        help="save OUT/state.npz after about this many patches "
                             "(default: %(default)s)")
    parser.add_argument("--units", type=positive_int, default=None,
                        help="only the first U units (channels) of each layer (default: all)")
    add_gpu(parser)
    args = parser.parse_args(argv)
    args.layers = tuple(layer for layer in args.layers.split(",") if layer)
    if not args.layers:
        parser.error("--layers names no blob")
    args.deploy = deploy_prototxt(args.net, args.deploy)
    return args


def main(argv=None):
    args = parse_args(argv)
    load_caffe(gpu=args.gpu)
    settings = MaxActivationSettings(**{key: value for key, value in vars(args).items()
                                        if key != "gpu"})
    index, seen = max_activations(settings)
    print(f"wrote {index} ({len(settings.layers)} layers, {seen} patches)")


if __name__ == "__main__":
    sys.exit(run_tool(main))
