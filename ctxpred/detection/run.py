"""Train and test a Fast R-CNN detector in stock Caffe, in one run folder.

A run (:class:`DetectorRun`) is the ctxpred variant of a Fast R-CNN net
(:mod:`ctxpred.models.fast_rcnn`: RoIData, Python ROIPooling and SmoothL1Loss) on a
VOC-format dataset, trained by a Caffe SGD solver from initial weights, then
scored on a test split with VOC average precision. The folder holds:

- ``run.json``, ``train.prototxt``, ``test.prototxt``, ``solver.prototxt``;
- ``model_iter_N.{caffemodel,solverstate}``: Caffe snapshots (targets still
  normalised; training resumes from the newest);
- ``train.log``: iteration, loss_cls, loss_bbox, seconds per step;
- ``final.caffemodel``: the trained net with the target normalisation folded
  into bbox_pred, ready for ``test.prototxt``;
- ``detections.json``, ``results.json`` (AP per class, 11-point and area
  versions, mAP), ``precision_recall.png``.

Ctrl-C, SIGTERM or a ``quit`` file in the folder stop training after the
current step with a snapshot (:class:`ctxpred.training.loop.StopRequests`).
"""
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ctxpred.detection.roidb import (DetectionConfig, detect_dataset, read_classes,
                               unnormalised_bbox_weights)
from ctxpred.models.fast_rcnn import inference_net, train_net
from ctxpred.detection.roi_data import RoIData
from ctxpred.weights.surgery import load_weights_file
from ctxpred.training.loop import StopRequests, latest_snapshot
from ctxpred.detection.voc import evaluate_detections

TRAIN_LOG_COLUMNS = ("iter", "loss_cls", "loss_bbox", "step_s")


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


def solver_text(run, train_path, snapshot_prefix):
    """SGD solver prototxt of a run (snapshots are taken by :func:`train_detector`)."""
    return (f'train_net: "{train_path}"\nbase_lr: {run.base_lr:g}\nlr_policy: "step"\n'
            f"gamma: {run.gamma:g}\nstepsize: {run.stepsize}\nmomentum: {run.momentum:g}\n"
            f"weight_decay: {run.weight_decay:g}\ndisplay: 0\nmax_iter: {run.iterations}\n"
            f'snapshot: 0\nsnapshot_prefix: "{snapshot_prefix}"\nrandom_seed: {run.seed}\n'
            "solver_mode: CPU\n")


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
    solver_path = run_dir / "solver.prototxt"
    solver_path.write_text(solver_text(run, run_dir / "train.prototxt", run_dir / "model"))
    (run_dir / "run.json").write_text(json.dumps(asdict(run), indent=2) + "\n")
    return solver_path


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


def train_detector(caffe, run_dir, run, progress=None, log=print):
    """Train a run (resuming from its newest snapshot); returns the final weights' path.

    progress(row) is called after each step with the train.log row.
    """
    run_dir = Path(run_dir)
    resume = latest_snapshot(run_dir)
    solver = caffe.get_solver(str(write_run_files(run_dir, run, resume[0] if resume else 0)))
    if resume:
        solver.restore(str(resume[1]))
        log(f"resuming from {resume[1]} (iteration {solver.iter})")
    elif run.init:
        load_weights_file(solver.net, run.init)
        log(f"initial weights: {run.init}")
    net, data_layer = solver.net, _data_layer(solver.net)
    log_path = run_dir / "train.log"
    if not log_path.exists():
        log_path.write_text("\t".join(TRAIN_LOG_COLUMNS) + "\n")
    reason = "max_iter"
    with StopRequests(run_dir) as stop:
        while solver.iter < run.iterations:
            started = time.perf_counter()
            solver.step(1)
            row = dict(iter=solver.iter, loss_cls=float(net.blobs["loss_cls"].data),
                       loss_bbox=float(net.blobs["loss_bbox"].data),
                       step_s=round(time.perf_counter() - started, 3))
            with open(log_path, "a") as out:
                out.write("\t".join(str(row[key]) for key in TRAIN_LOG_COLUMNS) + "\n")
            if progress:
                progress(row)
            if stop.requested():
                reason = stop.reason
                break
    if solver.iter > (resume[0] if resume else 0):
        solver.snapshot()
    final = run_dir / "final.caffemodel"
    save_unnormalised(net, data_layer, final)
    log(f"stopped at iteration {solver.iter} ({reason}); weights {final}")
    return final, reason


def read_train_log(path):
    """train.log as a dict of column arrays."""
    rows = [line.split("\t") for line in Path(path).read_text().splitlines()[1:] if line]
    return {name: np.array([float(row[index]) for row in rows])
            for index, name in enumerate(TRAIN_LOG_COLUMNS)}


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


def map_difference(first, second, annotations, classes, resamples=1000, seed=0,
                   use_07_metric=False):
    """mAP(second) - mAP(first) on the same test images, with a 95% bootstrap interval.

    first, second: detections of two runs ({class: [(image id, score, box)]});
    annotations: {image id: Annotation} of the test split. Test images are
    resampled with replacement (seeded), both runs on the same resample, so
    the interval reflects which images happen to be in the test set.
    Returns (difference, low, high).
    """
    def mean_ap(detections, sampled):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a resample may lack a class: left out of the mAP
            return evaluate_detections(detections, sampled, classes,
                                       use_07_metric=use_07_metric)["mAP"]

    ids = list(annotations)
    difference = mean_ap(second, annotations) - mean_ap(first, annotations)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(resamples):
        picks = [ids[i] for i in rng.integers(0, len(ids), len(ids))]
        a, sampled = _resampled(first, annotations, picks)
        b, _ = _resampled(second, annotations, picks)
        samples.append(mean_ap(b, sampled) - mean_ap(a, sampled))
    low, high = np.nanpercentile(samples, [2.5, 97.5])
    return float(difference), float(low), float(high)
