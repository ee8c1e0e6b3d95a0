"""Data-dependent initialisation ("magic init", Kraehenbuehl et al., ICLR 2016) of a Caffe net.

Every parameter layer whose weights are all zero is initialised from data, in
network order: weights from a basis (-t), then each output channel scaled and
shifted so that its pre-activation has mean BIAS (-b) and std 1 on the data.
Layers that hold weights (from -l, or from a filler) are kept; -z zeroes
everything first. -cs then rescales whole layers so that their weights change
at the same relative rate under SGD (measured on the first batch, up to 10
rounds). Softmax, Accuracy and loss layers are left out of the analysis (the
weights still load by name into PROTOTXT); BatchNorm must be folded first
(tools/debatchnorm.py). Dropout layers are active as in Caffe's TRAIN phase,
as the reference runs them (a new random mask per pass), so the result
varies with --seed; --dropout identity treats them as at test time instead.
The end is a table per layer: weight and bias scale, pre-activation mean and
std (on all -nit batches; with -cs, on the calibration batch with the final
weights), and the gradient ratio before and after -cs.

With -d, images are resized to the net's input size (Input layer shape, or a
data layer's crop_size / new_height x new_width, else 227), the BGR mean
104, 117, 123 subtracted, times -s, in batches of -bs. Without -d the
prototxt's own Data / ImageData layer feeds the net (TRAIN phase).

Example (the project page's command, for a "no fc6" context model made with
tools/make_no_fc6.py and tools/debatchnorm.py):
  python tools/magic_init.py -cs -d '/data/VOC2007/JPEGImages/*.jpg' --gpu 0 \\
      --load no_fc6.caffemodel prototxt/groupless_caffenet.prototxt out.caffemodel
"""
import sys

from ctxpred.caffe.env import CaffeNotAvailable, load_caffe
from ctxpred.caffe.netparam import read_net_param
from ctxpred.cli import add_gpu, add_seed, run_tool, tool_parser
from ctxpred.weights.files import write_weights
from ctxpred.weights.magic_init import DROPOUT_MODES, TYPES, MagicInitSettings, run_magic_init


def parse_args(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("prototxt", help="net definition (deploy or train prototxt)")
    parser.add_argument("output_caffemodel", help="caffemodel to write (HDF5 if it ends in .h5)")
    parser.add_argument("-l", "--load", metavar="CAFFEMODEL",
                        help="load these weights first (by layer name); their non-zero layers "
                             "are kept, only rescaled by -cs")
    parser.add_argument("-d", "--data", metavar="GLOB",
                        help="images to use (a quoted glob, or a folder / list file / LMDB); "
                             "default: the prototxt's own data layer, TRAIN phase")
    parser.add_argument("-b", "--bias", type=float, default=0.1,
                        help="target mean of each initialised pre-activation "
                             "(default: %(default)s)")
    parser.add_argument("-t", "--type", default="elwise", choices=TYPES, metavar="TYPE",
                        help="initial weights: elwise (i.i.d. Gaussian), pca, zca (whitening "
                             "filters of the layer's input patches), kmeans (k-means centres "
                             "of whitened patches), rand (random whitened patches); fast_ "
                             "prefix: patches from the first batch only; Deconvolution layers "
                             "take elwise only (default: %(default)s)")
    parser.add_argument("-z", action="store_true",
                        help="zero all weights first, so that every layer is initialised")
    parser.add_argument("-cs", action="store_true",
                        help="correct for scaling: rescale layers to equal gradient ratios "
                             "(-c works too)")
    parser.add_argument("-q", action="store_true",
                        help="quiet: Caffe's own log (glog) at errors only")
    parser.add_argument("-s", type=float, default=1.0,
                        help="input scale, with -d only (default: %(default)s)")
    parser.add_argument("-bs", type=int, default=16,
                        help="batch size, with -d only (default: %(default)s)")
    parser.add_argument("-nit", type=int, default=10,
                        help="number of batches for the statistics (default: %(default)s)")
    parser.add_argument("--mem-limit", type=float, default=500, metavar="MB",
                        help="cap in MB on the gathered input patches, and on the activations "
                             "kept between layers (default: %(default)s)")
    add_gpu(parser)
    parser.add_argument("--dropout", default="train", choices=DROPOUT_MODES,
                        help="train: Dropout layers active as in Caffe's TRAIN phase, a new "
                             "random mask per forward pass (what the reference does); "
                             "identity: Dropout left out, as at test time "
                             "(default: %(default)s)")
    add_seed(parser, "image order, the weights, -cs's diffs and Caffe's RNG (the Dropout "
                     "masks)")
    args = parser.parse_args(argv)
    if args.bs < 1 or args.nit < 1 or args.mem_limit <= 0:
        parser.error("-bs, -nit and --mem-limit must be positive")
    return args


def caffe_for(gpu, quiet):
    """pycaffe on GPU ``gpu``, or on the CPU (saying so) when this Caffe has no CUDA."""
    if gpu is not None:
        try:
            return load_caffe(gpu=gpu, quiet=quiet)
        except CaffeNotAvailable:
            print(f"note: this Caffe is a CPU-only build: running on the CPU instead of GPU {gpu}")
    return load_caffe(gpu=None, quiet=quiet)


def main(argv=None):
    args = parse_args(argv)
    try:
        caffe = caffe_for(args.gpu, args.q)
    except CaffeNotAvailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    settings = MagicInitSettings(args.bs, args.nit, args.s, args.bias, args.type, args.mem_limit,
                                 args.cs, args.z, args.dropout, args.seed)
    result = run_magic_init(caffe, read_net_param(args.prototxt), args.data, settings, args.load,
                            args.prototxt)
    for line in result.lines:
        print(line)
    write_weights(result.weights, args.output_caffemodel)
    print(f"wrote {args.output_caffemodel}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
