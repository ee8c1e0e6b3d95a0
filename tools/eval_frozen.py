"""Score frozen features of one or more nets, per layer, with the field's protocols.

Every image of the labelled set (train and test) is squashed to --input-size
pixels and run once through each net; conv1..conv5 are average-pooled to
about 9k dimensions (VISSL's AlexNet settings), fc6/fc7 averaged over
positions; each layer is cached as HDF5 in --cache, so a second protocol or
a second run does not run the net again. Then, per layer:

  svm      VOC07 linear SVM per class (cost by 3-fold CV over --svm-costs),
           test mAP (multi-label sets; a single-label set is scored one-hot)
  lowshot  low-shot SVMs, k positives per class (--shots), --samples draws
  knn      weighted kNN top-1, k in --knn-ks (single-label sets)
  linear   logistic-regression probe top-1 (single-label sets)

with 95% bootstrap intervals over test images, and with several --weights
the paired interval of each net's difference from the first. Writes
OUT/report.json (every number), OUT/report.md (tables) and OUT/report.png
(score per layer, one line per net); prints the Markdown. SVMs at high
costs often stop at the reference's 2000 iterations unconverged, as in
VISSL; those warnings are not printed.

The set (--dataset): a VOC-layout folder (Annotations/, JPEGImages/,
ImageSets/Main/{trainval,test}.txt, classes.txt or the 20 VOC classes:
multi-label, "difficult"-only images left out per class), a folder with
train.txt and test.txt, or two list files of lines "path label"
(single-label). The offline sets data/labelled/multi and data/labelled/single
are built on first use (data/make_labelled_sets.py, about 20 s of CPU).

Examples:
  python tools/eval_frozen.py --dataset data/labelled/multi --weights cd.caffemodel --out runs/svm
  python tools/eval_frozen.py --dataset data/labelled/single --protocols knn,linear \\
      --weights random.caffemodel cd.caffemodel --names random context --out runs/knn
  python tools/eval_frozen.py --dataset /data/VOCdevkit/VOC2007 --deploy caffenet_deploy.prototxt \\
      --weights bvlc_reference_caffenet.caffemodel --bgr --layers conv1,conv5,fc7 --out runs/ref
"""
import subprocess
import sys
import time
import warnings
from pathlib import Path

from ctxpred.caffe.env import CaffeNotAvailable, load_caffe
from ctxpred.cli import (REPO, add_gpu, add_net, add_seed, add_weights, deploy_prototxt, fail,
                         positive_int, run_tool, tool_parser)
from ctxpred.evaluation.frozen import (DEFAULT_LAYERS, PROTOCOLS, SINGLE_LABEL_ONLY,
                                       NetToEvaluate, ProtocolSettings, evaluate_nets)
from ctxpred.evaluation.protocols import (KNN_KS, LOW_SHOT_SHOTS, PROBE_COSTS, SVM_COSTS,
                                          Bootstrap)


def listed(kind):
    """argparse type: a comma-separated list of ``kind`` values."""
    return lambda text: tuple(kind(item) for item in text.split(",") if item)


def comma(values):
    """'a,b,c': a default as the user would type it (argparse parses it with the flag's type)."""
    return ",".join(map(str, values))


OFFLINE_SETS = REPO / "data" / "labelled"


def build_offline_sets(dataset):
    """Run data/make_labelled_sets.py when ``dataset`` is one of its sets and is missing."""
    folder = Path(dataset[0]).resolve()
    if len(dataset) == 1 and folder.parent == OFFLINE_SETS and not folder.exists():
        print(f"building the offline labelled sets into {OFFLINE_SETS}", file=sys.stderr)
        if subprocess.run([sys.executable, str(REPO / "data" / "make_labelled_sets.py")],
                          stdout=sys.stderr).returncode != 0:
            raise RuntimeError("data/make_labelled_sets.py failed (see above)")


def parse_args(argv):
    parser = tool_parser(__doc__)
    parser.add_argument("--dataset", required=True, nargs="+", metavar="SET",
                        help="VOC-layout folder, folder with train.txt/test.txt, or two list "
                             "files TRAIN TEST")
    add_weights(parser, multiple=True, extra="; several: one line per net, differences from "
                                              "the first")
    parser.add_argument("--names", nargs="+", help="net names in the report (default: the "
                                                   "weight files' names)")
    add_net(parser)
    parser.add_argument("--bgr", action="store_true",
                        help="feed BGR (a Caffe-zoo CaffeNet) instead of our nets' RGB")
    parser.add_argument("--protocols", type=listed(str),
                        help=f"comma-separated, of {','.join(PROTOCOLS)} (default: svm,lowshot "
                             "for a multi-label set, knn,linear for a single-label one)")
    parser.add_argument("--layers", type=listed(str), default=comma(DEFAULT_LAYERS),
                        help="comma-separated blobs (default: %(default)s)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the report")
    parser.add_argument("--cache", type=Path, default=Path("runs/feature_cache"),
                        help="folder of the cached layer features (default: %(default)s)")
    parser.add_argument("--backend", choices=("caffe", "onnx"), default="caffe",
                        help="run the nets with pycaffe or onnxruntime (default: %(default)s)")
    parser.add_argument("--input-size", type=positive_int, default=227,
                        help="images squashed to this square size, pixels (default: %(default)s)")
    parser.add_argument("--batch", type=positive_int, default=32, help="images per forward pass")
    parser.add_argument("--svm-costs", type=listed(float), default=comma(SVM_COSTS),
                        help="SVM cost sweep (default: %(default)s; one cost: no CV)")
    parser.add_argument("--shots", type=listed(int), default=comma(LOW_SHOT_SHOTS),
                        help="low-shot positives per class (default: %(default)s)")
    parser.add_argument("--samples", type=positive_int, default=5,
                        help="low-shot draws per k (default: %(default)s)")
    parser.add_argument("--knn-ks", type=listed(int), default=comma(KNN_KS),
                        help="kNN neighbour counts (default: %(default)s)")
    parser.add_argument("--probe-costs", type=listed(float), default=comma(PROBE_COSTS),
                        help="linear probe cost sweep (default: %(default)s)")
    parser.add_argument("--folds", type=positive_int, default=3, help="cross-validation folds")
    parser.add_argument("--resamples", type=positive_int, default=1000,
                        help="bootstrap resamples of the test images (default: %(default)s)")
    add_seed(parser, "cross-validation folds, low-shot draws and bootstrap")
    add_gpu(parser)
    args = parser.parse_args(argv)
    if len(args.dataset) > 2:
        parser.error("--dataset takes a folder or two list files")
    if args.names is not None and len(args.names) != len(args.weights):
        parser.error(f"--names gives {len(args.names)} names for {len(args.weights)} --weights")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        load_caffe(gpu=args.gpu)
    except CaffeNotAvailable as error:
        return fail(error)
    from ctxpred.evaluation.datasets import read_labelled_set
    from ctxpred.models.context import snapshot_param

    build_offline_sets(args.dataset)
    labelled = read_labelled_set(args.dataset[0] if len(args.dataset) == 1 else args.dataset)
    protocols = args.protocols or (("svm", "lowshot") if labelled.multilabel
                                   else SINGLE_LABEL_ONLY)
    names = args.names or [Path(path).stem for path in args.weights]
    deploy, train_param = deploy_prototxt(args.net, args.deploy), snapshot_param(args.net)
    nets = [NetToEvaluate(name, deploy, weights, train_param, args.bgr)
            for name, weights in zip(names, args.weights)]
    settings = ProtocolSettings(args.svm_costs, args.shots, args.samples, args.knn_ks,
                                args.probe_costs, args.folds, args.seed,
                                Bootstrap(args.resamples, args.seed))
    started = time.monotonic()
    from sklearn.exceptions import ConvergenceWarning
    warnings.simplefilter("ignore", ConvergenceWarning)  # high costs stop at max_iter, as VISSL's
    _, paths = evaluate_nets(
        nets, labelled, args.layers, protocols, args.out, args.cache, settings, args.input_size,
        args.batch, args.backend,
        progress=lambda text: print(f"[{time.monotonic() - started:6.0f} s] {text}",
                                    file=sys.stderr, flush=True))
    print(paths["markdown"].read_text())
    print(f"wrote {', '.join(str(path) for path in paths.values())}")


if __name__ == "__main__":
    sys.exit(run_tool(main))
