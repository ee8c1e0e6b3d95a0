"""VOC07 classification fine-tuning (Kraehenbuehl et al.'s protocol) in stock Caffe, one command.

From a context-prediction model (or from nothing: "random", magic init of
every layer) to test mAP:

1. init.caffemodel: BatchNorm folded when the model has it, conv layers
   kept by name (conv1 turned to BGR), fc6 and above from data, magic init
   -cs (Dropout active, as the reference) on 160 training images;
2. fine-tuning with the reference's solver (SGD lr 0.001, momentum 0.9,
   x0.5 every 10000, weight decay 1e-6, clipping 10, batch 16, 80000
   iterations), random scale 0.5-2.0 crops and mirrors, sigmoid
   cross-entropy with "difficult"-only labels ignored; resumes from the
   newest snapshot in OUT; Ctrl-C, SIGTERM or a file named quit in OUT stop
   after the current step with a snapshot;
3. test: fc8_cls scores summed over 1 and 10 augmented crops per image, AP
   per class (scikit-learn's definition), mAP with a 95% bootstrap interval
   over test images; results.json, scores.npz, precision_recall.png and a
   table on stdout.

Examples:
  # real VOC2007 (VOCdevkit layout plus a classes.txt), the reference schedule
  python tools/finetune_classification.py --data /data/VOC2007 \\
      --weights context.caffemodel --net color_dropping --mode all --out runs/voc07_all
  # the offline tuxpaint set, a short schedule
  python tools/finetune_classification.py --data data/detection --weights none \\
      --iters 300 --stepsize 100 --out runs/cls_random
"""
import argparse
import sys

from ctxpred.classification.run import ClassificationRun, finetune_command
from ctxpred.cli import run_tool
from ctxpred.models.classification import MODES
from ctxpred.models.context import NET_NAMES


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True,
                        help="VOC-layout dataset root: classes.txt, Annotations/, JPEGImages/, "
                             "ImageSets/Main/<split>.txt")
    parser.add_argument("--weights", required=True,
                        help="context-prediction caffemodel to start from, or 'none' for magic "
                             "init of every layer (the random-init baseline)")
    parser.add_argument("--net", default="color_dropping", choices=NET_NAMES,
                        help="the context net the weights come from; vgg fine-tunes VGG16, the "
                             "others the groupless CaffeNet (default: %(default)s)")
    parser.add_argument("--mode", default="all", choices=MODES,
                        help="layers trained: fc8 (only the classifier), fc (fc6 and up), all "
                             "(default: %(default)s)")
    parser.add_argument("--out", required=True,
                        help="run folder; an existing one is resumed from its newest snapshot")
    parser.add_argument("--iters", type=int, default=80000,
                        help="training iterations (default: %(default)s, the reference's)")
    parser.add_argument("--lr", type=float, default=0.001,
                        help="base learning rate (default: %(default)s)")
    parser.add_argument("--stepsize", type=int, default=10000,
                        help="iterations between halvings of the learning rate "
                             "(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="images per step (default: %(default)s)")
    parser.add_argument("--snapshot", type=int, default=10000,
                        help="snapshot every N iterations; 0: only when stopping "
                             "(default: %(default)s)")
    parser.add_argument("--train-split", default="trainval",
                        help="image set to train on (default: %(default)s)")
    parser.add_argument("--test-split", default="test",
                        help="image set to test on (default: %(default)s)")
    parser.add_argument("--init-images", default=None,
                        help="images for magic init (glob, folder, list file, LMDB; default: "
                             "the training split's images)")
    parser.add_argument("--crops", default="1,10",
                        help="numbers of test crops to score, comma-separated "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of magic init, the data order and augmentation, the "
                             "classifier's filler and the test crops (default: %(default)s)")
    parser.add_argument("--gpu", type=int, default=None,
                        help="CUDA device id (default: CPU)")
    parser.add_argument("--test-only", action="store_true",
                        help="skip training: score OUT/final.caffemodel")
    args = parser.parse_args(argv)
    try:
        args.crops = tuple(int(value) for value in args.crops.split(","))
    except ValueError:
        parser.error(f"--crops {args.crops!r} is not a comma-separated list of integers")
    if min(args.crops) < 1 or args.iters < 0 or args.batch_size < 1 or args.stepsize < 1:
        parser.error("--crops, --batch-size and --stepsize must be positive, --iters >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    run = ClassificationRun(dataset=args.data, net=args.net, mode=args.mode,
                            train_split=args.train_split, test_split=args.test_split,
                            iterations=args.iters, base_lr=args.lr, stepsize=args.stepsize,
                            batch_size=args.batch_size, snapshot=args.snapshot, seed=args.seed)
    return finetune_command(run, args.out, args.weights, args.init_images, args.crops,
                            args.gpu, args.test_only)


if __name__ == "__main__":
    sys.exit(run_tool(main))
