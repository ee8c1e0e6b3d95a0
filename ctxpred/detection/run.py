"""Train and test a Fast R-CNN detector in stock Caffe, in one run folder.

A run (:class:`DetectorRun`) is the ctxpred variant of a Fast R-CNN net
(:mod:`ctxpred.models.fast_rcnn`: RoIData, Python ROIPooling and SmoothL1Loss) on a
VOC-format dataset, trained by a Caffe SGD solver from initial weights, then
scored on a test split with VOC average precision. The folder holds:

- ``run.json``, ``train.prototxt``, ``test.prototxt``, ``solver.prototxt``;
- ``model_iter_N.{caffemodel,solverstate}``: Caffe snapshots (targets still
  normalised; training resumes from the newest);
- ``train.log``: iteration, loss_cls, loss_bbox, seconds per step;
  ``training.png``, ``events.log``;
- ``final.caffemodel``: the trained net with the target normalisation folded
  into bbox_pred, ready for ``test.prototxt``;
- ``detections.json``, ``results.json`` (AP per class, 11-point and area
  versions, mAP), ``precision_recall.png``.

Training is :func:`ctxpred.training.loop.run_solver`'s: Ctrl-C, SIGTERM or a
``quit`` file in the folder stop it after the current step with a snapshot;
snapshots are atomic and verified on resume; a diverging loss stops it.
"""
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ctxpred.detection.roidb import (DetectionConfig, detect_dataset, read_classes,
                                    unnormalised_bbox_weights)
from ctxpred.detection.roi_data import RoIData
from ctxpred.detection.voc import evaluate_detections
from ctxpred.evaluation.statistics import difference_interval
from ctxpred.models.fast_rcnn import SOLVER_ORDER, inference_net, solver_param, train_net
from ctxpred.training.log import LogFormat
from ctxpred.training.loop import RunKind, RunSettings, describe_row, run_solver, timed_step
from ctxpred.training.snapshots import RunLock, latest_snapshot
from ctxpred.training.solvers import set_fields, write_solver
from ctxpred.weights.surgery import load_weights_file

DETECTOR_LOG = LogFormat(("iter", "loss_cls", "loss_bbox", "step_s"),
                         (("loss_cls", "classification loss", None),
                          ("loss_bbox", "box regression loss", None)))


@dataclass(frozen=True)
class DetectorRun:
    """Everything that defines a detector run (written to ``run.json``).

    model: a :data:`ctxpred.models.fast_rcnn.MODEL_NAMES` net. init: caffemodel the
    training starts from (loaded by layer name); None keeps the prototxt's
    fillers. detection: :class:`DetectionConfig` fields that differ from
    Fast R-CNN's (e.g. smaller scales for a CPU). base_lr, stepsize, gamma,
    momentum, weight_decay: the SGD solver (Fast R-CNN's values by default).
    """
    dataset: str = "data/detection"
    model: str = "CaffeNetGroupless"
    init: str = None
    iterations: int = 1000
    train_split: str = "trainval"
    test_split: str = "test"
    proposals: str = None
    base_lr: float = 0.001
    stepsize: int = 30000
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0005
    seed: int = 3
    detection: dict = field(default_factory=dict)

    @property
    def proposals_path(self):
        return self.proposals or str(Path(self.dataset, "proposals.npz"))

    @property
    def config(self):
        return DetectionConfig.from_dict(dict(self.detection))


def detector_solver(run, train_path, snapshot_prefix):
    """Fast R-CNN's SGD solver with a run's schedule (snapshots are the training loop's)."""
    return set_fields(solver_param(run.model), train_net=train_path, base_lr=run.base_lr,
                      gamma=run.gamma, stepsize=run.stepsize, momentum=run.momentum,
                      weight_decay=run.weight_decay, display=0, average_loss=None,
                      max_iter=run.iterations, snapshot=0, snapshot_prefix=snapshot_prefix,
                      random_seed=run.seed, solver_mode="CPU")


def write_run_files(run_dir, run, start_iteration=0):
    """Write run.json and the run's prototxts; returns the solver path.

    The data layer's seed is ``run.seed + start_iteration``, so that a
    resumed run draws new minibatches instead of replaying the first ones.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    classes = read_classes(run.dataset)
    data_params = dict(dataset=run.dataset, split=run.train_split,
                       proposals=run.proposals_path, seed=run.seed + start_iteration,
                       **run.detection)
    num_classes = len(classes) + 1
    (run_dir / "train.prototxt").write_text(str(train_net(run.model, "ctxpred", num_classes,
                                                           data_params)))
    (run_dir / "test.prototxt").write_text(str(inference_net(run.model, "ctxpred",
                                                             num_classes)))
    solver = detector_solver(run, (run_dir / "train.prototxt").resolve(),
                             (run_dir / "model").resolve())
    (run_dir / "run.json").write_text(json.dumps(asdict(run), indent=2) + "\n")
    return write_solver(solver, run_dir / "solver.prototxt", SOLVER_ORDER)


def _data_layer(net):
    return next(layer for layer in net.layers if isinstance(layer, RoIData))


def save_unnormalised(net, data_layer, path):
    """Save ``net`` with bbox_pred answering unnormalised deltas; the net is left as it was."""
    weight, bias = net.params["bbox_pred"][0].data, net.params["bbox_pred"][1].data
    kept = weight.copy(), bias.copy()
    weight[...], bias[...] = unnormalised_bbox_weights(kept[0], kept[1], data_layer.bbox_means,
                                                       data_layer.bbox_stds)
    try:
        net.save(str(path))
    finally:
        weight[...], bias[...] = kept


def detector_stepper(solver):
    """One step of a Fast R-CNN net and its train.log row (blobs looked up once)."""
    loss_cls, loss_bbox = solver.net.blobs["loss_cls"], solver.net.blobs["loss_bbox"]

    def step():
        step_s = timed_step(solver)
        return dict(iter=solver.iter, loss_cls=float(loss_cls.data),
                    loss_bbox=float(loss_bbox.data), step_s=round(step_s, 3))
    return step


DETECTOR_RUN = RunKind(DETECTOR_LOG, detector_stepper, "loss_cls", describe_row)


def train_detector(caffe, run_dir, run, progress=None, log=print):
    """Train a run (resuming from its newest snapshot); returns (final weights path, reason).

    progress(row) is called after each step with the train.log row. The
    final weights (:func:`save_unnormalised`) are written when training
    stops cleanly.
    """
    run_dir = Path(run_dir)
    final = run_dir / "final.caffemodel"

    def initialize(net):
        if run.init:
            load_weights_file(net, run.init)
            log(f"initial weights: {run.init}")

    with RunLock(run_dir) as lock:
        resume = latest_snapshot(run_dir)
        solver_path = write_run_files(run_dir, run, resume[0] if resume else 0)
        result = run_solver(caffe, solver_path, run_dir, DETECTOR_RUN,
                            RunSettings(run.iterations), progress, log, lock, initialize,
                            finish=lambda net: save_unnormalised(net, _data_layer(net), final))
    log(f"final weights (bbox_pred answering unnormalised deltas): {final}")
    return final, result["reason"]


def evaluate_detector(caffe, run_dir, run, weights=None, progress=None):
    """Detect on the test split and score it; writes detections.json and results.json.

    Returns the results dict: per class AP (area, VOC2010+) and AP_07
    (11-point, VOC2007), positives, and their means over the classes.
    """
    run_dir = Path(run_dir)
    classes = read_classes(run.dataset)
    net = caffe.Net(str(run_dir / "test.prototxt"), caffe.TEST)
    load_weights_file(net, weights or run_dir / "final.caffemodel")
    detections, annotations = detect_dataset(net, run.dataset, run.test_split,
                                             run.proposals_path, classes, run.config, progress)
    (run_dir / "detections.json").write_text(json.dumps(
        {name: [[image_id, round(score, 5), [round(v, 1) for v in box]]
                for image_id, score, box in found] for name, found in detections.items()}))
    area = evaluate_detections(detections, annotations, classes)
    eleven = evaluate_detections(detections, annotations, classes, use_07_metric=True)
    results = dict(
        split=run.test_split, images=len(annotations),
        classes={name: dict(ap=float(area[name].ap), ap_07=float(eleven[name].ap),
                            positives=int(area[name].n_positives),
                            detections=len(detections[name])) for name in classes},
        mAP=float(area["mAP"]), mAP_07=float(eleven["mAP"]))
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_precision_recall(area, classes, run_dir / "precision_recall.png")
    return results


def plot_precision_recall(evaluation, classes, path):
    """One precision-recall curve per class (area AP in the legend) to a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(6, 4.5))
    curves = [name for name in classes if len(evaluation[name].recall)]
    for name in curves:
        result = evaluation[name]
        axes.plot(result.recall, result.precision, label=f"{name} {result.ap:.3f}")
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
             title=f"VOC AP (area), mAP {evaluation['mAP']:.3f}")
    if curves:
        axes.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def result_lines(results):
    """The results as a table: AP (area and 11-point) and positives per class, then the means."""
    width = max(map(len, results["classes"]))
    lines = [f"{'class':<{width}}  AP(area)  AP(11pt)  positives"]
    for name, row in results["classes"].items():
        lines.append(f"{name:<{width}}  {row['ap']:8.3f}  {row['ap_07']:8.3f}  "
                     f"{row['positives']:9d}")
    lines.append(f"{'mean':<{width}}  {results['mAP']:8.3f}  {results['mAP_07']:8.3f}")
    return lines


def train_and_test(run_dir, run, test_only=False):
    """tools/train_detector.py: train a run (unless ``test_only``), test it, print the table."""
    from tqdm import tqdm

    from ctxpred.caffe.env import load_caffe
    from ctxpred.training.loop import progress_printer
    caffe = load_caffe(gpu=None, quiet=True)
    if not test_only:
        train_detector(caffe, run_dir, run, progress_printer(run.iterations, 0))
    with tqdm(desc="testing", unit="image") as bar:
        results = evaluate_detector(caffe, run_dir, run, progress=lambda: bar.update(1))
    for line in result_lines(results):
        print(line)
    return 0


def read_detections(run_dir):
    """detections.json of a run: {class name: [(image id, score, VOC box)]}."""
    path = Path(run_dir, "detections.json")
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read detections {path} (run tools/train_detector.py "
                         f"--test-only first): {error}") from error
    return {name: [(image_id, score, tuple(box)) for image_id, score, box in rows]
            for name, rows in stored.items()}


def _resampled(detections, annotations, picks):
    """Detections and annotations of the images ``picks`` (ids, repeats renamed id#k)."""
    names = [f"{image_id}#{k}" for k, image_id in enumerate(picks)]
    renamed = {}
    for name, image_id in zip(names, picks):
        renamed.setdefault(image_id, []).append(name)
    sampled = {name: annotations[image_id] for name, image_id in zip(names, picks)}
    return ({cls: [(new, score, box) for image_id, score, box in rows
                   for new in renamed.get(image_id, ())]
             for cls, rows in detections.items()}, sampled)


def map_statistic(detections, annotations, classes, use_07_metric=False):
    """weights (B, images) -> (B,) VOC mAP of ``detections`` on resampled test images.

    Row b draws image i weights[b, i] times (a repeated image counts its
    detections and objects again); a resample without a class's objects
    leaves that class out of its mAP. For
    :func:`ctxpred.evaluation.statistics.bootstrap_interval` and
    :func:`~ctxpred.evaluation.statistics.difference_interval`.
    """
    ids = list(annotations)

    def mean_ap(counts):
        picks = [image_id for image_id, count in zip(ids, counts.astype(int))
                 for _ in range(count)]
        found, sampled = _resampled(detections, annotations, picks)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a class without objects: left out of the mAP
            return evaluate_detections(found, sampled, classes, use_07_metric=use_07_metric)["mAP"]
    return lambda weights: np.array([mean_ap(counts) for counts in weights])


def map_difference(first, second, annotations, classes, resamples=1000, seed=0,
                   use_07_metric=False):
    """mAP(second) - mAP(first) on the same test images, with a 95% paired bootstrap interval.

    first, second: detections of two runs ({class: [(image id, score, box)]});
    annotations: {image id: Annotation} of the test split. Test images are
    resampled with replacement (seeded), both runs on the same resample
    (:func:`ctxpred.evaluation.statistics.difference_interval`), so the
    interval reflects which images happen to be in the test set.
    Returns (difference, low, high).
    """
    interval = difference_interval(map_statistic(second, annotations, classes, use_07_metric),
                                   map_statistic(first, annotations, classes, use_07_metric),
                                   len(annotations), resamples, seed)
    return interval.value, interval.low, interval.high
