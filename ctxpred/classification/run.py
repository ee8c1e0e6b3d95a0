"""One VOC07 classification fine-tuning run in stock Caffe, in one run folder.

The route (:mod:`ctxpred.classification.data`, :mod:`ctxpred.models.classification`):

1. initial weights (:func:`prepare_init`): from a context-prediction model,
   the detection path's preparation (fold BatchNorm, conv layers by name,
   conv1 to BGR, magic init -cs with fc6 and above from data:
   :func:`ctxpred.detection.init_weights.prepare_detection_init`); without one
   ("random"), magic init -cs of every layer from data. Either on the
   groupless CaffeNet (AlexNet-style nets) or VGG16;
2. fine-tuning (:func:`train_classifier`) with the reference's solver in
   :func:`ctxpred.training.loop.run_solver`, resuming from the newest intact
   snapshot; Ctrl-C, SIGTERM or a ``quit`` file stop after the current step
   with a snapshot; a loss that is not finite stops it (lower the lr);
3. test (:func:`evaluate_classifier`): 1- and 10-crop scores on the test
   split, AP per class and mAP with a bootstrap interval over images.

The folder holds run.json, init.caffemodel, train.prototxt, deploy.prototxt,
solver.prototxt, model_iter_N.{caffemodel,solverstate}, train.log (iter,
loss, lr, step seconds), training.png, events.log, final.caffemodel, results.json,
scores.npz and precision_recall.png.
"""
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ctxpred.classification.data import (IGNORE_LABEL, ClassificationError, average_precision,
                                         bootstrap_interval, crop_scores, mean_average_precision,
                                         read_split)
from ctxpred.models.classification import (BATCH_SIZE, ITERATIONS, SIDES, SOLVER,
                                           SOLVER_ORDER, architecture_for, deploy_net,
                                           solver_param, train_net)
from ctxpred.training.log import LogFormat
from ctxpred.training.loop import RunKind, RunSettings, describe_row, run_solver, timed_step
from ctxpred.training.snapshots import RunLock, latest_snapshot
from ctxpred.training.solvers import write_solver

CLASSIFIER_LOG = LogFormat(("iter", "loss", "lr", "step_s"),
                           (("loss", "sigmoid cross-entropy / image", None),))
DETECTION_DEPLOY = {"caffenet": "groupless_caffenet.prototxt", "vgg16": "vgg16.prototxt"}


@dataclass(frozen=True)
class ClassificationRun:
    """Everything that defines a run (written to run.json).

    dataset: VOC-layout root (classes.txt, Annotations, JPEGImages,
    ImageSets/Main/<split>.txt). net: the context net's name (color_dropping,
    projection or vgg), which picks the tower. mode: fc8 / fc / all.
    iterations, base_lr, stepsize, batch_size: the solver (the reference:
    80000, 0.001, 10000, 16). snapshot: every N iterations (0: only at stops).
    """

    dataset: str
    net: str = "color_dropping"
    mode: str = "all"
    train_split: str = "trainval"
    test_split: str = "test"
    iterations: int = ITERATIONS
    base_lr: float = 0.001
    stepsize: int = 10000
    batch_size: int = BATCH_SIZE
    snapshot: int = 10000
    seed: int = 0

    @property
    def arch(self):
        return architecture_for(self.net)


def write_run_files(run_dir, run, classes, start_iteration=0):
    """train / deploy / solver prototxts and run.json; returns the solver path.

    The data layer's seed is [seed, start_iteration], so a resumed run draws
    new batches instead of replaying the first ones.
    """
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    train = train_net(run.arch, run.mode, str(Path(run.dataset).resolve()), run.train_split,
                      len(classes), run.batch_size, [run.seed, start_iteration])
    (run_dir / "train.prototxt").write_text(str(train))
    (run_dir / "deploy.prototxt").write_text(str(deploy_net(run.arch, len(classes))))
    solver = solver_param(run_dir / "train.prototxt", run_dir / "model", run.iterations,
                          run.base_lr, run.stepsize, run.snapshot, random_seed=run.seed)
    (run_dir / "run.json").write_text(json.dumps(asdict(run), indent=2) + "\n")
    return write_solver(solver, run_dir / "solver.prototxt", SOLVER_ORDER)


def prepare_init(caffe, run_dir, run, weights=None, images=None, log=print):
    """Write ``init.caffemodel`` (once; kept when present) and return its path.

    ``weights``: a context-prediction caffemodel (its BatchNorm folded with
    prototxt/<net>/train.prototxt), or None for magic init of every layer.
    ``images``: what magic init reads (default: the train split's images);
    16 x 10 of them, seed ``run.seed``.
    """
    from ctxpred.detection.init_weights import origin_lines, prepare_detection_init
    from ctxpred.weights.magic_init import MagicInitSettings, run_magic_init
    from ctxpred.caffe.netparam import read_net_param
    from ctxpred.weights.files import write_weights

    run_dir = Path(run_dir)
    out = run_dir / "init.caffemodel"
    if out.exists():
        log(f"initial weights: {out} (already there)")
        return out
    run_dir.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[2]
    deploy = repo / "prototxt" / DETECTION_DEPLOY[run.arch]
    if images is None:
        images = "\n".join(str(Path(path).resolve())
                           for path in read_split(run.dataset, run.train_split).paths)
        list_file = run_dir / "init_images.txt"
        list_file.write_text(images + "\n")
        images = str(list_file)
    if weights is not None:
        init = prepare_detection_init(caffe, weights, run.net, images,
                                      repo / "prototxt" / run.net / "train.prototxt", deploy,
                                      seed=run.seed, log=log)
        for line in origin_lines(init):
            log(line)
        write_weights(init.weights, out)
        return out
    result = run_magic_init(caffe, read_net_param(deploy), images,
                            MagicInitSettings(seed=run.seed), source=deploy, log=log)
    for line in result.lines:
        log(line)
    write_weights(result.weights, out)
    return out


def classifier_kind(run):
    """The :class:`RunKind` of a run: loss and learning rate per step."""
    def stepper(solver):
        loss = solver.net.blobs["loss"]

        def step():
            step_s = timed_step(solver)
            lr = run.base_lr * SOLVER["gamma"] ** ((solver.iter - 1) // run.stepsize)
            return dict(iter=solver.iter, loss=float(loss.data), lr=lr, step_s=round(step_s, 3))
        return step
    return RunKind(CLASSIFIER_LOG, stepper, "loss", describe_row)


def train_classifier(caffe, run_dir, run, init=None, progress=None, log=print):
    """Train (resuming from the newest snapshot); returns (final weights path, stop reason).

    ``init``: the caffemodel a fresh run starts from. The final weights are
    written when training stops cleanly.
    """
    run_dir = Path(run_dir)
    classes = read_split(run.dataset, run.test_split).classes
    final = run_dir / "final.caffemodel"

    def initialize(net):
        if init is not None:
            net.copy_from(str(init))
            log(f"initial weights: {init}")

    with RunLock(run_dir) as lock:
        resume = latest_snapshot(run_dir)
        solver_path = write_run_files(run_dir, run, classes, resume[0] if resume else 0)
        result = run_solver(caffe, solver_path, run_dir, classifier_kind(run),
                            RunSettings(run.iterations), progress, log, lock, initialize,
                            finish=lambda net: net.save(str(final)))
    log(f"final weights: {final}")
    return final, result["reason"]


def precision_recall(labels, scores):
    """(recall, precision) arrays of one class at each distinct score (ignored labels out)."""
    valid = labels != IGNORE_LABEL
    truth = labels[valid].astype(np.float64)
    order = np.argsort(-scores[valid], kind="mergesort")
    hits = np.cumsum(truth[order])
    return hits / max(truth.sum(), 1), hits / np.arange(1, len(hits) + 1)


def evaluate_classifier(caffe, run_dir, run, weights=None, crops=(1, 10), resamples=1000,
                        progress=None):
    """Score the test split with each number of ``crops``; writes results.json, scores.npz.

    Returns {"classes": [...], "crops": {k: {"mAP", "interval", "AP": {class: ap}}},
    "images": n}.
    """
    run_dir = Path(run_dir)
    images = read_split(run.dataset, run.test_split)
    net = caffe.Net(str(run_dir / "deploy.prototxt"), str(weights or run_dir / "final.caffemodel"),
                    caffe.TEST)
    results = dict(classes=list(images.classes), images=len(images.ids), crops={},
                   positives={name: int(np.sum(images.labels[:, index] == 1))
                              for index, name in enumerate(images.classes)})
    arrays = {"labels": images.labels}
    for count in crops:
        scores = crop_scores(net, images, count, SIDES[run.arch], seed=run.seed,
                             progress=progress)
        value, aps = mean_average_precision(images.labels, scores)
        low, high = bootstrap_interval(images.labels, scores, resamples, run.seed)
        results["crops"][str(count)] = dict(
            mAP=value, interval=[low, high],
            AP={name: (None if np.isnan(ap) else ap) for name, ap in zip(images.classes, aps)})
        arrays[f"scores_{count}"] = scores
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    np.savez(run_dir / "scores.npz", **arrays)
    plot_precision_recall(images.labels, arrays[f"scores_{max(crops)}"], images.classes,
                          run_dir / "precision_recall.png", f"{max(crops)} crops")
    return results


def plot_precision_recall(labels, scores, classes, path, title):
    """One precision-recall curve per class (AP in the legend) to a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(6, 4.5))
    for index, name in enumerate(classes):
        if not np.any(labels[:, index] == 1):
            continue
        recall, precision = precision_recall(labels[:, index], scores[:, index])
        ap = average_precision(labels[:, index], scores[:, index])
        axes.plot(recall, precision, label=f"{name} {ap:.3f}")
    mean, _ = mean_average_precision(labels, scores)
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
             title=f"VOC07 classification, {title}: mAP {mean:.3f}")
    axes.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def result_lines(results):
    """The results as a table: one row per class, a column per number of crops."""
    counts = list(results["crops"])
    header = f"{'class':<14}{'positives':>10}" + "".join(f"{f'AP {c} crop(s)':>16}"
                                                         for c in counts)
    lines = [header, "-" * len(header)]
    for name in results["classes"]:
        cells = []
        for count in counts:
            ap = results["crops"][count]["AP"][name]
            cells.append(f"{'-' if ap is None else f'{100 * ap:.1f}':>16}")
        lines.append(f"{name:<14}{results['positives'][name]:>10}" + "".join(cells))
    lines.append(f"{'mAP':<14}{'':>10}" + "".join(
        f"{100 * results['crops'][c]['mAP']:>16.1f}" for c in counts))
    lines.append(f"{'95% interval':<14}{'':>10}" + "".join(
        f"{'[{:.1f}, {:.1f}]'.format(*(100 * v for v in results['crops'][c]['interval'])):>16}"
        for c in counts))
    return lines


def finetune_command(run, out, weights, init_images=None, crops=(1, 10), gpu=None,
                     test_only=False):
    """tools/finetune_classification.py: initial weights, fine-tuning, test; returns the exit
    code. Bad input raises ValueError (ClassificationError) or FileNotFoundError.

    weights: a context-prediction caffemodel or "none" (magic init of every
    layer). test_only: score OUT/final.caffemodel without training.
    """
    from ctxpred.caffe.env import CaffeNotAvailable, load_caffe
    from ctxpred.cli import fail
    from ctxpred.training.loop import progress_printer
    try:
        caffe = load_caffe(gpu=gpu, quiet=True)
    except CaffeNotAvailable as error:
        return fail(error)
    out = Path(out)
    if not test_only:
        init = prepare_init(caffe, out, run, None if weights.lower() == "none" else weights,
                            init_images)
        train_classifier(caffe, out, run, init, progress_printer(run.iterations, 0))
    elif not (out / "final.caffemodel").exists():
        raise ClassificationError(f"{out / 'final.caffemodel'} does not exist: train first")
    results = evaluate_classifier(caffe, out, run, crops=crops)
    for line in result_lines(results):
        print(line)
    print(f"wrote {out / 'results.json'}, {out / 'precision_recall.png'}")
    return 0
