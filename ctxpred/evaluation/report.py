"""One report of several nets x layers x frozen-feature protocols: JSON, a Markdown table, a PNG.

Input is ``results[net][layer][protocol]``: the result objects of
:mod:`ctxpred.evaluation.protocols` (anything with ``named_scores()`` ->
((metric name, Score), ...) and ``summary()`` -> a JSON-ready dict). Each
protocol gives one or more metrics ("voc07_svm mAP", "knn k=20 top-1", ...);
the report lays every metric out as net x layer with its 95% interval, and,
given a ``baseline`` net, the paired interval of each other net's difference
from it on the same test rows (:func:`ctxpred.evaluation.protocols.score_difference`),
the number that says whether one net is better than another.

- JSON: every number: each protocol's full summary (per-class AP and cost,
  low-shot draws, CV scores), intervals, differences; NaN written as null.
- Markdown: one table per metric, a row per net and a column per layer,
  cells "value [low, high]" in percent; then the differences.
- PNG (matplotlib Agg, no pyplot state): one panel per metric, x = layer
  (conv1 ... fc7 in network order), y = score in percent, one line per net,
  error bars = the intervals.

The three files are written to temporary names first and renamed into place
only when all three are complete, so a failure leaves none half-written.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from ctxpred.evaluation.protocols import Bootstrap, score_difference

LAYER_ORDER = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")
NAMES = {"json": "report.json", "markdown": "report.md", "figure": "report.png"}


def ordered_layers(results):
    """Every layer of ``results``: those of :data:`LAYER_ORDER` in that order, then the rest as
    first seen."""
    seen = list(dict.fromkeys(layer for layers in results.values() for layer in layers))
    return [layer for layer in LAYER_ORDER if layer in seen] + \
           [layer for layer in seen if layer not in LAYER_ORDER]


def metric_table(results):
    """{metric: {net: {layer: Score}}}, metrics in first-seen order."""
    table = {}
    for net, layers in results.items():
        for layer, protocols in layers.items():
            for result in protocols.values():
                for metric, score in result.named_scores():
                    table.setdefault(metric, {}).setdefault(net, {})[layer] = score
    return table


def difference_table(table, baseline, bootstrap):
    """{metric: {net: {layer: Interval of net - baseline}}} wherever both were scored."""
    differences = {}
    for metric, nets in table.items():
        reference = nets.get(baseline, {})
        for net, layers in nets.items():
            for layer, score in layers.items():
                if net != baseline and layer in reference:
                    differences.setdefault(metric, {}).setdefault(net, {})[layer] = \
                        score_difference(score, reference[layer], bootstrap)
    return differences


def json_ready(value):
    """``value`` with tuples as lists and NaN / inf floats as None (valid JSON)."""
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def report_document(results, differences, title):
    """The JSON document: every protocol summary by net and layer, and the differences."""
    return json_ready(dict(
        title=title,
        results={net: {layer: {protocol: result.summary() for protocol, result in protocols.items()}
                       for layer, protocols in layers.items()} for net, layers in results.items()},
        differences={metric: {net: {layer: dict(value=interval.value, low=interval.low,
                                                high=interval.high,
                                                confidence=interval.confidence)
                                     for layer, interval in layers.items()}
                               for net, layers in nets.items()}
                     for metric, nets in differences.items()}))


def percent_cell(interval):
    """'62.3 [60.1, 64.5]': value and interval in percent, '-' where NaN."""
    if not math.isfinite(interval.value):
        return "-"
    return f"{100 * interval.value:.1f} [{100 * interval.low:.1f}, {100 * interval.high:.1f}]"


def markdown_tables(intervals, differences, layers, title, baseline):
    """The Markdown report: a table per metric, then one per metric of differences.

    intervals, differences: {metric: {net: {layer: Interval}}}.
    """
    lines = [f"# {title}", "", "Scores in percent, [95% bootstrap interval over test images]."]
    sections = [(metric, nets, "") for metric, nets in intervals.items()]
    sections += [(metric, nets, f" minus {baseline} (paired)")
                 for metric, nets in differences.items()]
    for metric, nets, suffix in sections:
        lines += ["", f"## {metric}{suffix}", "", "| net | " + " | ".join(layers) + " |",
                  "| --- |" + " --- |" * len(layers)]
        for net, scores in nets.items():
            cells = [percent_cell(scores[layer]) if layer in scores else "" for layer in layers]
            lines.append(f"| {net} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def draw_figure(intervals, layers, path, title):
    """PNG at ``path``: one panel per metric, score per layer, one line per net, error bars.

    intervals: {metric: {net: {layer: Interval}}}.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(3, len(intervals))
    rows = -(-len(intervals) // columns)
    figure = Figure(figsize=(5 * columns, 3.6 * rows))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, (metric, nets) in zip(axes, intervals.items()):
        for slot, (net, scores) in enumerate(nets.items()):
            shown = [index for index, layer in enumerate(layers) if layer in scores]
            offset = (slot - (len(nets) - 1) / 2) * 0.05  # side by side: bars do not overlap
            values = np.array([[scores[layers[index]].value, scores[layers[index]].low,
                                scores[layers[index]].high] for index in shown]) * 100
            below = np.maximum(values[:, 0] - values[:, 1], 0)  # a BC interval may miss the value
            above = np.maximum(values[:, 2] - values[:, 0], 0)
            axis.errorbar(np.array(shown) + offset, values[:, 0], yerr=[below, above],
                          marker="o", capsize=3, label=net)
        axis.set_xticks(range(len(layers)), layers)
        axis.set_title(metric)
        axis.set_ylabel("score (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    for axis in axes[len(intervals):]:
        axis.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)


def write_report(results, directory, title="Frozen-feature evaluation", baseline=None,
                 bootstrap=Bootstrap()):
    """Write report.json, report.md and report.png into ``directory``; returns their paths.

    results: {net: {layer: {protocol: result}}}. baseline: a net of
    ``results`` to take differences from (None: no differences). Nothing is
    in place until all three files are complete.
    """
    if not results or not any(results.values()):
        raise ValueError("no results to report")
    if baseline is not None and baseline not in results:
        raise ValueError(f"baseline net {baseline!r} is not among the results "
                         f"({', '.join(results)})")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers, table = ordered_layers(results), metric_table(results)
    differences = {} if baseline is None else difference_table(table, baseline, bootstrap)
    intervals = {metric: {net: {layer: score.interval for layer, score in scores.items()}
                          for net, scores in nets.items()} for metric, nets in table.items()}
    paths = {kind: directory / name for kind, name in NAMES.items()}
    partial = {kind: path.with_name(f".{path.name}.part") for kind, path in paths.items()}
    try:
        partial["json"].write_text(json.dumps(report_document(results, differences, title),
                                              indent=2, allow_nan=False) + "\n")
        partial["markdown"].write_text(markdown_tables(intervals, differences, layers, title,
                                                       baseline))
        draw_figure(intervals, layers, partial["figure"], title)
        for kind, path in paths.items():
            os.replace(partial[kind], path)
    finally:
        for path in partial.values():
            path.unlink(missing_ok=True)
    return paths
