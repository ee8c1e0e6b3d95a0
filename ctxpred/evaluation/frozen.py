"""Frozen-feature evaluation of one or more nets: cached layer features -> protocols -> report.

For each net, every image of a :class:`ctxpred.evaluation.datasets.LabelledSet`
(train and test) goes once through the net
(:func:`ctxpred.features.layers.extract_layer_features`: whole images
squashed to ``input_size``, each layer average-pooled to about 9k
dimensions, one HDF5 file per layer in ``cache_dir`` keyed by net, weights,
layer, size and image list, so a second protocol or a second run reads the
file instead of running the net). Then each protocol of
:mod:`ctxpred.evaluation.protocols` runs per layer:

====================  =============================  ==========================
protocol              labels                         score
====================  =============================  ==========================
``svm``               multi-label (single-label      VOC07 SVM test mAP
                      sets one-hot)
``lowshot``           as ``svm``                     low-shot SVM mAP per k
``knn``               single-label                   weighted kNN top-1 per k
``linear``            single-label                   linear probe top-1
====================  =============================  ==========================

and :func:`ctxpred.evaluation.report.write_report` writes report.json,
report.md and report.png (the first net is the baseline of the paired
differences). Everything that can be checked without running a net (the
protocols fit the set, low-shot k against the positives, kNN k against the
training images) is checked first, so a bad request fails in a second.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from sklearn.exceptions import ConvergenceWarning

from ctxpred.evaluation.datasets import read_labelled_set
from ctxpred.evaluation.labelled_sets import ensure_offline_set
from ctxpred.evaluation.protocols import (KNN_KS, LOW_SHOT_SHOTS, PROBE_COSTS, SVM_COSTS,
                                          Bootstrap, ProtocolError, check_low_shot, knn_top1,
                                          linear_probe, low_shot_svm, voc07_svm)
from ctxpred.evaluation.report import write_report

PROTOCOLS = ("svm", "lowshot", "knn", "linear")
SINGLE_LABEL_ONLY = ("knn", "linear")
DEFAULT_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6")


@dataclass(frozen=True)
class NetToEvaluate:
    """One net: its name in reports, deploy prototxt, weights file, and the training
    NetParameter whose BatchNorm layers are folded (None: none); ``bgr`` feeds BGR (a user's
    CaffeNet) instead of our nets' RGB."""

    name: str
    deploy: str
    weights: str
    train_param: object = None
    bgr: bool = False


@dataclass(frozen=True)
class ProtocolSettings:
    """The protocols' settings (defaults: the reference's, shared/reference/evaluation.md)."""

    svm_costs: tuple = SVM_COSTS
    shots: tuple = LOW_SHOT_SHOTS
    samples: int = 5
    knn_ks: tuple = KNN_KS
    probe_costs: tuple = PROBE_COSTS
    folds: int = 3
    seed: int = 0
    bootstrap: Bootstrap = field(default_factory=Bootstrap)


def check_request(labelled, protocols, settings):
    """ProtocolError (one line) for a protocol the set cannot be scored with, before any work."""
    for protocol in protocols:
        if protocol not in PROTOCOLS:
            raise ProtocolError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
        if protocol in SINGLE_LABEL_ONLY and labelled.multilabel:
            raise ProtocolError(f"protocol {protocol!r} needs a single-label set; {labelled.name} "
                                "is multi-label (use svm, lowshot)")
    if "lowshot" in protocols:
        check_low_shot(labelled.label_matrix("train"), settings.shots, labelled.classes)
    if "knn" in protocols and max(settings.knn_ks) > len(labelled.train_paths):
        raise ProtocolError(f"kNN k={max(settings.knn_ks)} is above the "
                            f"{len(labelled.train_paths)} training images of {labelled.name}")


def check_nets(nets, layers):
    """ValueError (one line) for two nets of one name or a layer a net's deploy lacks."""
    from ctxpred.caffe.netparam import read_net_param
    from ctxpred.features.layers import check_layers
    names = [net.name for net in nets]
    if len(set(names)) != len(names):
        raise ValueError(f"two nets are called the same: {', '.join(names)}")
    for deploy in dict.fromkeys(net.deploy for net in nets):
        check_layers(read_net_param(deploy), layers, deploy)


def layer_features(net, labelled, layers, cache_dir, input_size=227, batch=32, backend="caffe",
                   progress=None):
    """{layer: (train (N_train, D), test (N_test, D) float32)} of ``net`` on ``labelled``.

    Extracted once into ``cache_dir`` (module doc) and read back; rows in the
    set's order (checked against the file's image ids).
    """
    from ctxpred.features.layers import extract_layer_features, read_layer_features
    paths = list(labelled.train_paths) + list(labelled.test_paths)
    files = extract_layer_features(net.deploy, net.weights, paths, list(layers), cache_dir,
                                   input_size=input_size, batch=batch, backend=backend,
                                   progress=progress, train_param=net.train_param, bgr=net.bgr)
    split = len(labelled.train_paths)
    features = {}
    for layer in layers:
        ids, rows = read_layer_features(files[layer])
        if list(ids) != paths:
            raise ValueError(f"{files[layer]}: its image ids are not the set's images")
        features[layer] = (rows[:split], rows[split:])
    return features


def run_protocol(protocol, train_x, test_x, labelled, settings):
    """The result object of one protocol on one layer's (train, test) features."""
    common = dict(bootstrap=settings.bootstrap)
    if protocol == "svm":
        return voc07_svm(train_x, labelled.label_matrix("train"), test_x,
                         labelled.label_matrix("test"), settings.svm_costs, settings.folds,
                         settings.seed, labelled.classes, **common)
    if protocol == "lowshot":
        return low_shot_svm(train_x, labelled.label_matrix("train"), test_x,
                            labelled.label_matrix("test"), settings.shots, settings.samples,
                            settings.svm_costs, settings.seed, labelled.classes, **common)
    if protocol == "knn":
        return knn_top1(train_x, labelled.train_labels, test_x, labelled.test_labels,
                        settings.knn_ks, **common)
    return linear_probe(train_x, labelled.train_labels, test_x, labelled.test_labels,
                        settings.probe_costs, settings.folds, settings.seed, **common)


def evaluate_nets(nets, labelled, layers, protocols, out_dir, cache_dir,
                  settings=ProtocolSettings(), input_size=227, batch=32, backend="caffe",
                  progress=None):
    """Score every net of ``nets`` on ``labelled``; write the report into ``out_dir``.

    Returns (results {net: {layer: {protocol: result}}}, {kind: report path}).
    progress: None or a callable(message) told what runs now.
    """
    check_nets(nets, layers)
    check_request(labelled, protocols, settings)
    tell = progress or (lambda message: None)
    results = {}
    for net in nets:
        tell(f"{net.name}: features of {len(labelled.train_paths) + len(labelled.test_paths)} "
             f"images, layers {', '.join(layers)}")
        features = layer_features(net, labelled, layers, cache_dir, input_size, batch, backend)
        results[net.name] = {}
        for layer in layers:
            results[net.name][layer] = {}
            for protocol in protocols:
                tell(f"{net.name}: {protocol} on {layer}")
                results[net.name][layer][protocol] = run_protocol(
                    protocol, *features[layer], labelled, settings)
    title = f"Frozen features on {labelled.name}"
    paths = write_report(results, out_dir, title, baseline=nets[0].name if len(nets) > 1 else None,
                         bootstrap=settings.bootstrap)
    return results, paths


def evaluate_dataset(dataset, nets, layers, protocols=None, out_dir="runs/frozen",
                     cache_dir="runs/feature_cache", settings=ProtocolSettings(), input_size=227,
                     batch=32, backend="caffe", progress=None):
    """:func:`evaluate_nets` on the labelled set at ``dataset`` (tools/eval_frozen.py's work).

    dataset: [folder] or [train list, test list] (see
    :func:`ctxpred.evaluation.datasets.read_labelled_set`); the offline sets
    under data/labelled/ are built on first use. protocols: None picks svm
    and lowshot for a multi-label set, knn and linear for a single-label one.
    SVMs at high costs stop at the reference's 2000 iterations unconverged,
    as in VISSL; those warnings are not shown.
    """
    ensure_offline_set(dataset)
    labelled = read_labelled_set(dataset[0] if len(dataset) == 1 else list(dataset))
    if not protocols:
        protocols = ("svm", "lowshot") if labelled.multilabel else SINGLE_LABEL_ONLY
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return evaluate_nets(nets, labelled, layers, protocols, out_dir, cache_dir, settings,
                             input_size, batch, backend, progress)
