"""Benchmark of feature extraction: the full streaming path against a bare net.forward loop.

For each batch size (default 1, 32, 256), with the AlexNet-style
colour-dropping deploy net and random (filler-initialised) weights:

- ``bare forward``: ``net.forward()`` in a loop on an input blob filled once
  (nothing but Caffe);
- ``extract_features``: everything tools/extract_features.py does after
  loading the net: read and decode the images, draw 16 random patches per
  image, cut them, convert them to the net's input convention, forward them
  in batches and write features, paths and boxes to an HDF5 file;

both over the same number of patches, after one untimed warm-up forward,
alternately ``--repeats`` times; the best rate of each is kept (other
processes on the machine only ever slow a run down). ``ratio`` = streaming
patches/s over bare patches/s (goal: >= 0.9). Wall-clock rates: run it on
an otherwise idle machine (it warns when the load average says otherwise).

Then dense maps of one photo: ``dense_features`` (exact, every window
patch-wise) against ``DenseFeatureNet`` (fc layers as convolutions, one
forward pass; approximate), with their times, the speed-up, the dense
map's deviation from the exact one (largest absolute difference over the
largest exact value, and the mean cosine similarity of the feature vectors)
and the share of the net's forward time spent in conv1 (the only part of
the tower an exact dense computation could share between windows).
Random weights: trained weights deviate by other amounts.

Run from the checkout with the project venv (about 2 minutes on 2 cores):

    .venv/bin/python benchmarks/features.py
    .venv/bin/python benchmarks/features.py --patches 128 --no-vgg   # smoke run
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ctxpred.caffe.env import load_caffe
from ctxpred.features.dense import dense_features, DenseFeatureNet
from ctxpred.features.extractor import FeatureExtractor
from ctxpred.features.patches import sampled_patches
from ctxpred.features.streaming import stream_features
from ctxpred.features.writers import HDF5FeatureWriter
from ctxpred.data.images import decode_rgb, open_source
from ctxpred.evaluation.pretext import SubsetSource

REPO = Path(__file__).resolve().parents[1]
PATCHES_PER_IMAGE = 16
GOAL = 0.9


def random_weights(caffe, net_name, folder):
    """Path of a caffemodel of the deploy net with its fillers' random weights."""
    net = caffe.Net(str(REPO / "prototxt" / net_name / "deploy.prototxt"), caffe.TEST)
    path = os.path.join(folder, f"{net_name}.caffemodel")
    net.save(path)
    return path


def bare_rate(extractor, n_patches, rng):
    net, batch = extractor.net, extractor.batch
    blob = net.blobs[net.inputs[0]]
    blob.reshape(batch, 3, extractor.patch, extractor.patch)
    blob.data[...] = rng.normal(0, 50, blob.data.shape)
    net.forward()
    forwards = -(-n_patches // batch)
    start = time.perf_counter()
    for _ in range(forwards):
        net.forward()
    return forwards * batch / (time.perf_counter() - start)


def streaming_rate(extractor, source, folder):
    items = sampled_patches(source, "random", PATCHES_PER_IMAGE, seed=0)
    start = time.perf_counter()
    with HDF5FeatureWriter(os.path.join(folder, "features.h5"), extractor.dim) as writer:
        summary = stream_features(extractor, items, writer)
    return summary.rows / (time.perf_counter() - start)


def conv1_share(extractor, batch, rng):
    """Share of a forward pass's time spent in the first convolution."""
    net = extractor.net
    blob = net.blobs[net.inputs[0]]
    blob.reshape(batch, 3, extractor.patch, extractor.patch)
    blob.data[...] = rng.normal(0, 50, blob.data.shape)
    net.forward()
    first = next(index for index, layer in enumerate(net.layers) if layer.type == "Convolution")
    times = []
    for index in range(len(net.layers)):
        start = time.perf_counter()
        net._forward(index, index)
        times.append(time.perf_counter() - start)
    return times[first] / sum(times)


def dense_row(caffe, net_name, image, folder, rng):
    extractor = FeatureExtractor(str(REPO / "prototxt" / net_name / "deploy.prototxt"),
                                 random_weights(caffe, net_name, folder), batch=32)
    share = conv1_share(extractor, 8, rng)
    dense_features(extractor, image[:96, :96])  # warm-up
    start = time.perf_counter()
    exact = dense_features(extractor, image)
    exact_seconds = time.perf_counter() - start
    start = time.perf_counter()
    dense_net = DenseFeatureNet(extractor, *image.shape[:2])
    build_seconds = time.perf_counter() - start
    dense_net.forward(image)  # warm-up
    start = time.perf_counter()
    approximate = dense_net.forward(image)
    dense_seconds = time.perf_counter() - start
    deviation = np.abs(approximate - exact).max() / np.abs(exact).max()
    cosine = np.mean(np.sum(approximate * exact, axis=-1)
                     / np.linalg.norm(approximate, axis=-1) / np.linalg.norm(exact, axis=-1))
    windows = exact.shape[0] * exact.shape[1]
    return (f"{net_name:15s} {image.shape[1]:4d}x{image.shape[0]:<4d} {extractor.stride:6d} "
            f"{windows:7d} {exact_seconds:9.2f} {dense_seconds:9.2f} {build_seconds:8.2f} "
            f"{exact_seconds / dense_seconds:7.1f}x {deviation:9.3f} {cosine:7.3f} {share:7.1%}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(REPO / "data" / "photos" / "train"),
                        help="images to cut patches from: folder, glob, list file or LMDB "
                             "(default: the checkout's training photos)")
    parser.add_argument("--patches", type=int, default=384,
                        help="patches per measurement, a multiple of 16 (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="measurements of each kind per batch size; the best counts "
                             "(default: %(default)s)")
    parser.add_argument("--batch-sizes", default="1,32,256",
                        help="comma-separated batch sizes (default: %(default)s)")
    parser.add_argument("--no-vgg", action="store_true",
                        help="leave the VGG net out of the dense comparison (saves ~30 s)")
    args = parser.parse_args(argv)
    batch_sizes = [int(value) for value in args.batch_sizes.split(",")]
    caffe = load_caffe(gpu=None)
    rng = np.random.default_rng(0)
    source = open_source(args.images)
    n_images = -(-args.patches // PATCHES_PER_IMAGE)
    if len(source) < n_images:
        sys.exit(f"error: {args.images} holds {len(source)} images, {n_images} needed")
    subset = SubsetSource(source, range(n_images))
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPUs, load average {load:.2f}; "
          f"{n_images} images x {PATCHES_PER_IMAGE} patches from {args.images}")
    if load > 0.5:
        print("warning: the machine is busy; wall-clock rates will be noisy")

    with tempfile.TemporaryDirectory() as folder:
        deploy = str(REPO / "prototxt" / "color_dropping" / "deploy.prototxt")
        weights = random_weights(caffe, "color_dropping", folder)
        print("\ncolor_dropping deploy net to fc6 on the CPU, patches/s (best of "
              f"{args.repeats})")
        print(f"{'batch':>5s} {'bare forward':>13s} {'extract_features':>17s} {'ratio':>6s}  "
              f"goal (ratio >= {GOAL})")
        for batch in batch_sizes:
            extractor = FeatureExtractor(deploy, weights, batch=batch)
            bare = streamed = 0.0
            for _ in range(args.repeats):
                bare = max(bare, bare_rate(extractor, n_images * PATCHES_PER_IMAGE, rng))
                streamed = max(streamed, streaming_rate(extractor, subset, folder))
            print(f"{batch:5d} {bare:13.1f} {streamed:17.1f} {streamed / bare:6.3f}  "
                  f"{'MET' if streamed / bare >= GOAL else 'NOT MET'}", flush=True)

        photo = decode_rgb(source.read_bytes(0), source.name(0))
        print(f"\ndense maps of {source.name(0)} (crops), exact (patch-wise) vs fully "
              "convolutional; seconds")
        print(f"{'net':15s} {'image':>9s} {'stride':>6s} {'windows':>7s} {'exact':>9s} "
              f"{'dense':>9s} {'build':>8s} {'speed-up':>8s} {'max dev':>9s} {'cosine':>7s} "
              f"{'conv1':>7s}")
        print(dense_row(caffe, "color_dropping", photo[:352, :448], folder, rng), flush=True)
        if not args.no_vgg:
            print(dense_row(caffe, "vgg", photo[:224, :288], folder, rng), flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
