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
import sys
import time
from pathlib import Path

from ctxpred.caffe.env import load_caffe
from ctxpred.cli import (add_gpu, add_net, add_seed, add_weights, comma_separated, commas,
                         deploy_prototxt, positive_int, run_tool, tool_parser)
from ctxpred.evaluation.frozen import (DEFAULT_LAYERS, PROTOCOLS, NetToEvaluate, ProtocolSettings,
                                       evaluate_dataset)
from ctxpred.evaluation.protocols import (KNN_KS, LOW_SHOT_SHOTS, PROBE_COSTS, SVM_COSTS,
                                          Bootstrap)


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
    parser.add_argument("--protocols", type=comma_separated(str),
                        help=f"comma-separated, of {','.join(PROTOCOLS)} (default: svm,lowshot "
                             "for a multi-label set, knn,linear for a single-label one)")
    parser.add_argument("--layers", type=comma_separated(str), default=commas(DEFAULT_LAYERS),
                        help="comma-separated blobs (default: %(default)s)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the report")
    parser.add_argument("--cache", type=Path, default=Path("runs/feature_cache"),
                        help="folder of the cached layer features (default: %(default)s)")
    parser.add_argument("--backend", choices=("caffe", "onnx"), default="caffe",
                        help="run the nets with pycaffe or onnxruntime (default: %(default)s)")
    parser.add_argument("--input-size", type=positive_int, default=227,
                        help="images squashed to this square size, pixels (default: %(default)s)")
    parser.add_argument("--batch", type=positive_int, default=32, help="images per forward pass")
    parser.add_argument("--svm-costs", type=comma_separated(float), default=commas(SVM_COSTS),
                        help="SVM cost sweep (default: %(default)s; one cost: no CV)")
    parser.add_argument("--shots", type=comma_separated(int), default=commas(LOW_SHOT_SHOTS),
                        help="low-shot positives per class (default: %(default)s)")
    parser.add_argument("--samples", type=positive_int, default=5,
                        help="low-shot draws per k (default: %(default)s)")
    parser.add_argument("--knn-ks", type=comma_separated(int), default=commas(KNN_KS),
                        help="kNN neighbour counts (default: %(default)s)")
    parser.add_argument("--probe-costs", type=comma_separated(float), default=commas(PROBE_COSTS),
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
    load_caffe(gpu=args.gpu)
    from ctxpred.models.context import snapshot_param

    names = args.names or [Path(path).stem for path in args.weights]
    deploy, train_param = deploy_prototxt(args.net, args.deploy), snapshot_param(args.net)
    nets = [NetToEvaluate(name, deploy, weights, train_param, args.bgr)
            for name, weights in zip(names, args.weights)]
    settings = ProtocolSettings(args.svm_costs, args.shots, args.samples, args.knn_ks,
                                args.probe_costs, args.folds, args.seed,
                                Bootstrap(args.resamples, args.seed))
    started = time.monotonic()
    _, paths = evaluate_dataset(
        args.dataset, nets, args.layers, args.protocols, args.out, args.cache, settings,
        args.input_size, args.batch, args.backend,
        progress=lambda text: print(f"[{time.monotonic() - started:6.0f} s] {text}",
                                    file=sys.stderr, flush=True))
    print(paths["markdown"].read_text())
    print(f"wrote {', '.join(str(path) for path in paths.values())}")


if __name__ == "__main__":
    sys.exit(run_tool(main))
