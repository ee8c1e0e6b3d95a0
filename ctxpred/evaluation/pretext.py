"""Relative-position accuracy of a trained net on held-out images (the paper's protocol).

The paper reports the 8-way accuracy of the pretext task on 500 held-out
images with 256 pairs each (38.4% on VOC 2007; chance 12.5%). Here:

- :func:`sample_eval_pairs` draws those pairs: per image, one decode, one
  random resize and ``pairs_per_image`` pairs in the paper's pair mode, cut
  and preprocessed exactly as in training. It drives a
  :class:`ctxpred.data.batching.BatchAssembler` per image, so the input
  distribution (resampling probability, colour handling, noise, geometry) and
  the skipping of unusable images are the training code's own.
- :func:`scoring_net` is ``ctxpred.models.context.train_net``'s definition with its
  Python data layer replaced by an ``Input`` layer (tops data, select1,
  select2, label), so the tower and the pair head are reused, not copied;
  :func:`load_scoring_net` instantiates it in Caffe's TEST phase, where
  BatchNorm uses its stored statistics, and loads weights that must match
  it layer by layer (read with :func:`ctxpred.weights.files.read_weights`).
- :func:`relative_position_scores` runs the batches through it and collects
  the argmax of fc9 per pair.
- the accuracy's Wilson interval (:func:`ctxpred.evaluation.statistics.accuracy_with_interval`),
  :func:`confusion_matrix`, :func:`format_confusion` and
  :func:`plot_confusion` report the result; :func:`evaluate_pretext` runs
  the whole protocol on a weight file and writes its JSON report and plot
  (tools/eval_pretext.py), :func:`report_lines` prints it.

Never-trained statistics: Caffe's BatchNorm in TEST phase divides its stored
mean and variance by the stored scale factor, and takes a factor of 0 (a net
saved before any TRAIN forward pass) as "multiply by 0", so the layer then
normalises with mean 0 and variance 0: x / sqrt(eps), no NaN, just silently
wrong scores. :func:`load_scoring_net` refuses such weights.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from tqdm import tqdm

from ctxpred.data.batching import BatchAssembler, PatchPairConfig
from ctxpred.caffe.env import import_caffe
from ctxpred.caffe.netparam import instantiate
from ctxpred.data.images import ImageSource, SubsetSource, open_source
from ctxpred.evaluation.statistics import accuracy_with_interval
from ctxpred.data.layer import parse_param_str
from ctxpred.models.context import NetOptions, PATCH, data_layer_params, train_net
from ctxpred.data.sampling import NUM_LABELS
from ctxpred.weights.surgery import FIRST, load_weights
from ctxpred.weights.files import read_weights

# Position of the second patch relative to the first, by label (raster order, centre left out).
POSITION_NAMES = ("up-left", "up", "up-right", "left", "right", "down-left", "down", "down-right")
INPUT_TOPS = ("data", "select1", "select2", "label")
SCORES_BLOB = "fc9"
LOSS_BLOB = "loss"


# ---------------------------------------------------------------------------
# Pairs


@dataclass(frozen=True)
class EvalBatch:
    """The pairs of one image, ready for the scoring net.

    image_index: index of the image in the source; image_name: its name.
    patches: (2P, 3, 96, 96) float32 CHW RGB, preprocessed as in training
    (before the in-net RMS normalisation / projection).
    select1, select2: (P,) int64 rows of each pair's first and second patch.
    labels: (P,) int64 position of the second patch relative to the first, 0..7.
    """

    image_index: int
    image_name: str
    patches: np.ndarray
    select1: np.ndarray
    select2: np.ndarray
    labels: np.ndarray


def eval_config(net_name: str) -> PatchPairConfig:
    """The training data configuration of ``net_name`` (its colour handling and defaults)."""
    _, config = parse_param_str(json.dumps(data_layer_params(net_name, source="(evaluation)")))
    return config


class EvalPairs:
    """The evaluation pairs of ``n_images`` images; iterate for one :class:`EvalBatch` per image.

    Made by :func:`sample_eval_pairs`. ``len()`` is the number of images
    selected; unusable ones yield nothing and are recorded in ``skipped``
    (name -> reason) while iterating. Every iteration yields the same batches.
    """

    def __init__(self, source: ImageSource, indices: np.ndarray, pairs_per_image: int,
                 seed: int, config: PatchPairConfig):
        self.source = source
        self.indices = indices
        self.seed = seed
        self.config = dataclasses.replace(
            config, mode="pairs", pairs_per_image=pairs_per_image,
            pairs_per_batch=pairs_per_image, max_patches=2 * pairs_per_image)
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[EvalBatch]:
        patch = self.config.geometry.patch
        for index in self.indices:
            # One generator per image: its pairs do not depend on which other images were usable.
            rng = np.random.default_rng([self.seed, int(index)])
            assembler = BatchAssembler(SubsetSource(self.source, [index]), self.config, rng)
            patches = np.empty((self.config.max_patches, 3, patch, patch), dtype=np.float32)
            try:
                info = assembler.fill(patches)
            except ValueError:
                # A one-image source raises once its only image was skipped (and warned about).
                if not assembler.skipped:
                    raise
                self.skipped.update(assembler.skipped)
                continue
            yield EvalBatch(int(index), self.source.name(int(index)), patches[:info.n_patches],
                            info.select1, info.select2, info.labels)


def sample_eval_pairs(source: ImageSource | str, n_images: int | None, pairs_per_image: int,
                      seed: int, config: PatchPairConfig) -> EvalPairs:
    """Deterministic evaluation pairs, ``pairs_per_image`` from each of up to ``n_images`` images.

    source: an ImageSource, or a spec for :func:`ctxpred.data.images.open_source`.
    n_images: how many images, drawn without replacement in a random order
    fixed by ``seed`` (all images when None or larger than the source).
    config: the net's training data configuration (:func:`eval_config`); its
    sampling mode and batch sizes are replaced by the paper's pair mode with
    one batch of ``pairs_per_image`` pairs (2 patches each) per image. Each
    image is decoded once and randomly resized once (as in training); its
    generator is seeded by (seed, image index).

    Images that cannot be decoded, or are too small after the random resize,
    are skipped with a :class:`ctxpred.data.batching.SkippedImageWarning` each and
    listed in the result's ``skipped``.
    """
    if isinstance(source, str):
        source = open_source(source)
    if not isinstance(pairs_per_image, int) or pairs_per_image < 1:
        raise ValueError(f"pairs_per_image must be a positive int, got {pairs_per_image!r}")
    if n_images is not None and n_images < 1:
        raise ValueError(f"n_images must be positive or None, got {n_images!r}")
    order = np.random.default_rng(seed).permutation(len(source))
    return EvalPairs(source, order[:n_images], pairs_per_image, seed, config)


# ---------------------------------------------------------------------------
# The scoring net


def scoring_net(net_name: str, options: NetOptions = NetOptions()):
    """NetParameter: ``train_net(net_name, ..., options)`` fed by an Input layer.

    The Python data layer (the first layer) becomes an ``Input`` layer with
    tops data (1, 3, 96, 96), select1, select2 and label (1,); every other
    layer (tower, pair head, loss, accuracy) is train_net's. Reshape the
    inputs per batch before a forward pass.
    """
    caffe = import_caffe()
    train = train_net(net_name, data_layer_params(net_name, source="(Input layer)"), options)
    data_layer = train.layer[0]
    if data_layer.type != "Python" or tuple(data_layer.top) != INPUT_TOPS:
        raise ValueError(f"train_net({net_name!r}) does not start with the Python data layer "
                         f"with tops {INPUT_TOPS}")
    proto = caffe.proto.caffe_pb2.NetParameter()
    proto.name = f"context_{net_name}_scoring"
    input_layer = proto.layer.add(name="input", type="Input", top=INPUT_TOPS)
    input_layer.input_param.shape.add(dim=[1, 3, PATCH, PATCH])
    for _ in INPUT_TOPS[1:]:
        input_layer.input_param.shape.add(dim=[1])
    proto.layer.extend(train.layer[1:])
    return proto


def load_scoring_net(net_name: str, weights: str, options: NetOptions | None = None):
    """The TEST-phase :func:`scoring_net` with ``weights`` (a .caffemodel or .h5) loaded.

    ``options`` None takes the pair-head layout from the weights (factorized
    when they hold ``fc7_first``).

    Select the device (ctxpred.caffe.env.load_caffe) first. The weights must
    hold exactly the net's parameter layers with the net's shapes, as a
    snapshot of the matching train net does. Raises FileNotFoundError naming
    a missing weights file, and ValueError when the layers differ (wrong net,
    or a factorized / reference head mismatch) or the BatchNorm statistics
    were never accumulated (a net saved before any TRAIN forward pass).
    """
    params = read_weights(weights)
    if options is None:
        options = NetOptions(factorized_head=FIRST in params)
    net = instantiate(scoring_net(net_name, options))
    try:
        load_weights(net, params, strict=True)
    except ValueError as error:
        head = ("factorized head (fc7_first, fc7_second)" if options.factorized_head
                else "reference head (fc7 on concatenated pairs)")
        raise ValueError(f"{weights} does not fit the {net_name} net with the {head}: {error}. "
                         "Wrong --net, or weights of the other pair-head layout?") from error
    untrained = [name for name, layer in net.layer_dict.items()
                 if layer.type == "BatchNorm" and net.params[name][2].data[0] == 0]
    if untrained:
        raise ValueError(
            f"{weights}: BatchNorm layer(s) {', '.join(untrained)} hold no statistics (scale "
            "factor 0): the net was saved before any TRAIN forward pass, so TEST-phase "
            "BatchNorm would normalise with mean 0 and variance 0")
    return net


@dataclass(frozen=True)
class PositionPredictions:
    """Predictions of the scoring net for every evaluated pair.

    labels, predictions: (M,) int64 true and predicted position, 0..7.
    image_indices: (M,) int64 source index of each pair's image.
    loss: summed softmax cross-entropy over the M pairs (nats).
    """

    labels: np.ndarray
    predictions: np.ndarray
    image_indices: np.ndarray
    loss: float

    @property
    def correct(self) -> int:
        return int(np.sum(self.labels == self.predictions))

    @property
    def total(self) -> int:
        return len(self.labels)


def relative_position_scores(net, batches: Iterable[EvalBatch]) -> PositionPredictions:
    """Forward each batch through a :func:`load_scoring_net` net; fc9's argmax per pair."""
    labels, predictions, image_indices = [], [], []
    loss = 0.0
    for batch in batches:
        inputs = {"data": batch.patches, "select1": batch.select1,
                  "select2": batch.select2, "label": batch.labels}
        for name, values in inputs.items():
            net.blobs[name].reshape(*values.shape)
            net.blobs[name].data[...] = values
        net.forward()
        predictions.append(net.blobs[SCORES_BLOB].data.argmax(axis=1).astype(np.int64))
        labels.append(np.asarray(batch.labels, dtype=np.int64))
        image_indices.append(np.full(len(batch.labels), batch.image_index, dtype=np.int64))
        loss += float(net.blobs[LOSS_BLOB].data)
    empty = np.empty(0, dtype=np.int64)
    return PositionPredictions(
        labels=np.concatenate(labels) if labels else empty,
        predictions=np.concatenate(predictions) if predictions else empty,
        image_indices=np.concatenate(image_indices) if image_indices else empty,
        loss=loss)


# ---------------------------------------------------------------------------
# Reporting


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray,
                     n_classes: int = NUM_LABELS) -> np.ndarray:
    """(n_classes, n_classes) int64 counts: row = true label, column = predicted label."""
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    if labels.shape != predictions.shape or labels.ndim != 1:
        raise ValueError(f"labels and predictions must be equal-length 1-D arrays, "
                         f"got {labels.shape} and {predictions.shape}")
    for values in (labels, predictions):
        if len(values) and (values.min() < 0 or values.max() >= n_classes):
            raise ValueError(f"labels and predictions must lie in 0..{n_classes - 1}")
    counts = np.bincount(labels * n_classes + predictions, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes)


def format_confusion(matrix: np.ndarray, names: tuple[str, ...] = POSITION_NAMES) -> str:
    """The confusion matrix as a text table: rows true, columns predicted, plus row recall."""
    width = max(7, max(len(name) for name in names) + 1)
    lines = ["true \\ pred".ljust(width) + "".join(name.rjust(width) for name in names)
             + "recall".rjust(width)]
    for label, (name, row) in enumerate(zip(names, matrix)):
        recall = f"{row[label] / row.sum():.1%}" if row.sum() else "-"
        lines.append(name.ljust(width) + "".join(f"{count:>{width}d}" for count in row)
                     + recall.rjust(width))
    return "\n".join(lines)


def plot_confusion(matrix: np.ndarray, path: str, title: str,
                   names: tuple[str, ...] = POSITION_NAMES) -> None:
    """Save the confusion matrix as an image (format from ``path``'s extension, e.g. PNG).

    Cells are coloured by the fraction of their row (true label) and show
    the count and that fraction. Uses matplotlib's Agg canvas without pyplot,
    so no global figure state is touched.
    """
    matrix = np.asarray(matrix)
    row_sums = matrix.sum(axis=1, keepdims=True)
    fractions = np.divide(matrix, row_sums, out=np.zeros(matrix.shape), where=row_sums > 0)
    figure = Figure(figsize=(8.5, 7.5), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, label="fraction of the row (true position)")
    for row, column in np.ndindex(matrix.shape):
        colour = "white" if fractions[row, column] > 0.5 else "black"
        axes.text(column, row, f"{matrix[row, column]}\n{fractions[row, column]:.0%}",
                  ha="center", va="center", fontsize=8, color=colour)
    ticks = np.arange(len(names))
    axes.set_xticks(ticks, names, rotation=45, ha="right")
    axes.set_yticks(ticks, names)
    axes.set_xlabel("predicted position of the second patch")
    axes.set_ylabel("true position of the second patch")
    axes.set_title(title)
    figure.savefig(path, dpi=120)


# ---------------------------------------------------------------------------
# The whole evaluation of a weight file

CHANCE = 1 / NUM_LABELS


def pretext_report(net_name, weights, images, pairs: EvalPairs, result: PositionPredictions,
                   factorized):
    """The JSON-ready report of ``result`` (pairs of ``pairs`` drawn from ``images``)."""
    accuracy, low, high = accuracy_with_interval(result.correct, result.total)
    matrix = confusion_matrix(result.labels, result.predictions)
    return {
        "weights": str(weights), "net": net_name, "factorized_head": factorized,
        "images": images, "images_requested": len(pairs),
        "images_evaluated": len(pairs) - len(pairs.skipped), "images_skipped": pairs.skipped,
        "pairs_per_image": pairs.config.pairs_per_image, "seed": pairs.seed,
        "pairs": result.total, "correct": result.correct, "accuracy": accuracy,
        "chance": CHANCE,
        "interval": {"method": "Wilson score", "confidence": 0.95, "low": low, "high": high},
        "loss_per_pair": result.loss / result.total, "position_names": list(POSITION_NAMES),
        "confusion_matrix": {"rows": "true position", "columns": "predicted position",
                             "counts": matrix.tolist()},
    }


def evaluate_pretext(weights, net_name="color_dropping", images="data/photos/heldout",
                     images_count=500, pairs_per_image=256, seed=0, out=None):
    """Relative-position accuracy of ``weights``: (report, JSON path, PNG path).

    Draws ``pairs_per_image`` pairs from each of ``images_count`` images of
    ``images`` (:func:`sample_eval_pairs`), scores them with the scoring net
    (its head layout read off the weights) and writes the :func:`pretext_report`
    to ``out``/<weights stem>_pretext.json and the confusion matrix to
    ``out``/<weights stem>_pretext_confusion.png (``out`` None: the weights'
    folder). Needs pycaffe loaded. ValueError when no image is usable or the
    weights do not fit.
    """
    net = load_scoring_net(net_name, weights)
    pairs = sample_eval_pairs(images, images_count, pairs_per_image, seed,
                              eval_config(net_name))
    result = relative_position_scores(net, tqdm(pairs, desc="images", unit="image"))
    if result.total == 0:
        raise ValueError(f"no usable image in {images}")
    factorized = FIRST in net.params
    report = pretext_report(net_name, weights, images, pairs, result, factorized)
    folder = Path(out) if out else Path(weights).parent
    folder.mkdir(parents=True, exist_ok=True)
    stem = Path(weights).stem
    png_path, json_path = folder / f"{stem}_pretext_confusion.png", folder / f"{stem}_pretext.json"
    interval = report["interval"]
    plot_confusion(np.array(report["confusion_matrix"]["counts"]), str(png_path),
                   f"{net_name}{' (factorized head)' if factorized else ''}: "
                   f"{report['accuracy']:.1%} [{interval['low']:.1%}, {interval['high']:.1%}] "
                   f"on {result.total} pairs")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    return report, json_path, png_path


def report_lines(report):
    """The printed form of a :func:`pretext_report`: skipped images, accuracy with its
    interval, loss and the confusion matrix."""
    lines = []
    if report["images_skipped"]:
        lines.append(f"skipped {len(report['images_skipped'])} of {report['images_requested']} "
                     "images (see the warnings above)")
    interval = report["interval"]
    lines += [f"relative-position accuracy: {report['accuracy']:.2%} ({report['correct']}/"
              f"{report['pairs']} pairs from {report['images_evaluated']} images; chance "
              f"{report['chance']:.1%})",
              f"95% Wilson score interval: [{interval['low']:.2%}, {interval['high']:.2%}]",
              f"softmax loss per pair: {report['loss_per_pair']:.4f}",
              "confusion matrix (rows: true position, columns: predicted):",
              format_confusion(np.array(report["confusion_matrix"]["counts"]))]
    return lines
