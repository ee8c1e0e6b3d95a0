"""Benchmark of the shared extraction path against a bare net.forward loop, and of onnxruntime
against Caffe.

Two ratios, each from runs interleaved round by round (A, B, A, B, ...) so
that other jobs on the machine slow both sides alike; each round's ratio is
printed and the median is the result:

(a) shared path / bare forward, images/s at the same batch: the shared path
    (:class:`ctxpred.features.forward.CaffeForward` over batches of decoded
    uint8 pixels: input conversion into the net's input blob, forward, the
    requested blobs copied out) against ``net.forward()`` on an input blob
    filled once (nothing but Caffe). Measured for whole images (the
    per-layer feature net of ctxpred.features.layers at --input-size,
    conv1..conv5 and fc6 pooled) and for 96x96 patches (the deploy net to
    fc6, as tools/extract_features.py, max_activations and mine run it,
    batches assembled by ``patch_batches``). Goal: >= 0.9.
    The end-to-end rate of :func:`extract_layer_features` (decoding and
    resizing the images, writing HDF5) is printed too, and the rate of
    max_activations' inner loop (the shared path plus its per-unit maxima
    and top 9 of six layers) against the same bare forward.
(b) onnxruntime / Caffe, images/s of the whole-image feature net, both on
    the CPU, same batch (OnnxForward with every core, graph optimisation
    level "all"). Goal: >= 2.

Net: the colour-dropping deploy net with random (filler) weights; images
from data/photos/heldout. The load average is printed at the start and end.

    .venv/bin/python benchmarks/extraction.py                  # about 4 minutes on 2 cores
    .venv/bin/python benchmarks/extraction.py --rounds 2 --images 8    # smoke run
"""
import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "prototxt" / "color_dropping" / "deploy.prototxt"
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6")


def rate(run, items):
    """(items per wall-clock second, items per CPU second of this process) of ``run()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return items / (time.perf_counter() - wall), items / (time.process_time() - cpu)


def bare_loop(net, pixels, batch):
    """``run()`` of bare ``net.forward()`` calls at ``batch``, as many as ``pixels`` (N, H, W, 3)
    fills; the input blob holds the first batch of them, converted once (the same values as the
    shared path sees: activations, hence the arithmetic, depend on them)."""
    from ctxpred.features.forward import net_input

    blob = net.blobs[net.inputs[0]]
    blob.reshape(batch, *blob.data.shape[1:])
    net_input(pixels[:batch], out=blob.data)
    net.forward()
    batches = -(-len(pixels) // batch)

    def run():
        for _ in range(batches):
            net.forward()
    return run


def shared_loop(forward, pixels, batch):
    """``run()`` of the shared path over ``pixels`` (N, H, W, 3) uint8, rows copied out."""
    from ctxpred.features.forward import forward_all

    return lambda: forward_all(forward, pixels, batch)


def max_activations_loop(net, layers, pixels, batch):
    """``run()`` of tools/max_activations.py's inner loop: the shared path, then per layer the
    maximum over positions of every unit and the streaming top 9."""
    from ctxpred.features.forward import CaffeForward
    from ctxpred.figures.activations import StreamingTopK, unit_activations

    forward = CaffeForward(net, layers)

    def run():
        tops = {layer: StreamingTopK(net.blobs[layer].data.shape[1]) for layer in layers}
        for start in range(0, len(pixels), batch):
            blobs = forward(pixels[start:start + batch])
            ids = np.arange(start, start + len(pixels[start:start + batch]))
            for layer, top in tops.items():
                top.update(*unit_activations(blobs[layer])[:1], ids)
    return run


def interleaved(name, runs, items, rounds):
    """Run the two (label, run) pairs alternately; print rates per round and the median ratios
    (wall clock, and CPU time of this process: less sensitive to other jobs)."""
    (label_a, run_a), (label_b, run_b) = runs
    walls, cpus = [], []
    for number in range(rounds):
        (a, a_cpu), (b, b_cpu) = rate(run_a, items), rate(run_b, items)
        walls.append(a / b)
        cpus.append(a_cpu / b_cpu)
        print(f"  round {number + 1}: {label_a} {a:7.1f}/s  {label_b} {b:7.1f}/s  ratio "
              f"{a / b:.3f} (per CPU second {a_cpu / b_cpu:.3f}; load "
              f"{os.getloadavg()[0]:.2f})", flush=True)
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    print(f"{name}: median ratio {wall:.3f} (per CPU second {cpu:.3f}) over {rounds} rounds",
          flush=True)
    return wall


def whole_image_nets(weights, args):
    """(LayerFeatureNet, decoded images (N, S, S, 3) uint8, their paths)."""
    from ctxpred.features.layers import LayerFeatureNet, load_whole_images

    paths = sorted(str(path) for path in Path(args.photos).iterdir())[:args.images]
    net = LayerFeatureNet(str(DEPLOY), weights, list(LAYERS), args.input_size, args.batch)
    pixels = np.empty((len(paths), args.input_size, args.input_size, 3), np.uint8)
    return net, load_whole_images(paths, args.input_size, pixels), paths


def patch_pixels(args):
    """(N, 96, 96, 3) uint8 random patches of the photos, as patch_batches assembles them."""
    from ctxpred.data.images import open_source
    from ctxpred.features.patches import sampled_patches
    from ctxpred.features.streaming import patch_batches

    count = args.images * 16
    items = sampled_patches(open_source(args.photos), "random", 16, seed=0)
    return next(patch_batches(items, count, 96, stop=count)).pixels.copy()


def whole_image_ratios(weights, args, folder):
    """(a) and (b) on whole images, then the end-to-end rates; returns (a, b)."""
    from ctxpred.features.forward import CaffeForward, OnnxForward, check_parity
    from ctxpred.features.layers import extract_layer_features

    net, pixels, paths = whole_image_nets(weights, args)
    pixels = pixels[:len(pixels) // args.batch * args.batch]  # full batches: the same work
    outputs = list(net.outputs.values())
    caffe_forward = CaffeForward(net.net, outputs)
    print(f"\n(a) whole images {args.input_size}x{args.input_size}, batch {args.batch}, "
          f"{len(pixels)} images, outputs {', '.join(outputs)}")
    shared = interleaved("shared path / bare forward (whole images)",
                         [("shared", shared_loop(caffe_forward, pixels, args.batch)),
                          ("bare", bare_loop(net.net, pixels, args.batch))],
                         len(pixels), args.rounds)
    onnx_forward = OnnxForward(net.param, net.weights(), outputs, threads=args.threads)
    parity = check_parity(caffe_forward, onnx_forward, pixels[:args.batch])
    print(f"\n(b) onnxruntime vs Caffe, whole images, batch {args.batch} "
          f"(first-batch parity: max relative difference {parity:.2g})")
    onnx = interleaved("onnxruntime / Caffe",
                       [("onnx", shared_loop(onnx_forward, pixels, args.batch)),
                        ("caffe", shared_loop(caffe_forward, pixels, args.batch))],
                       len(pixels), args.rounds)
    for backend in ("caffe", "onnx"):
        images_per_second, _ = rate(lambda: extract_layer_features(
            str(DEPLOY), weights, paths, list(LAYERS), Path(folder, backend), args.input_size,
            args.batch, backend, threads=args.threads), len(paths))
        print(f"end to end, {backend}: {images_per_second:.1f} images/s (decode, resize, "
              "extract, write HDF5; net set-up and parity check included)")
    return shared, onnx


def patch_ratios(weights, args):
    """(a) on 96x96 patches, and the max_activations loop against the bare forward."""
    from ctxpred.features.extractor import FeatureExtractor

    extractor = FeatureExtractor(str(DEPLOY), weights, "fc6", args.patch_batch)
    patches = patch_pixels(args)
    patches = patches[:len(patches) // args.patch_batch * args.patch_batch]  # full batches
    print(f"\n(a) 96x96 patches to fc6, batch {args.patch_batch}, {len(patches)} patches")
    bare = bare_loop(extractor.net, patches, args.patch_batch)
    shared = interleaved("shared path / bare forward (patches)",
                         [("shared", shared_loop(extractor.forward, patches, args.patch_batch)),
                          ("bare", bare)], len(patches), args.rounds)
    layers = ["norm1", "norm2", "conv3", "conv4", "conv5", "fc6"]
    print(f"\nmax_activations' loop ({', '.join(layers)}: every unit's maximum and top 9)")
    interleaved("max_activations loop / bare forward",
                [("loop", max_activations_loop(extractor.net, layers, patches,
                                               args.patch_batch)),
                 ("bare", bare)], len(patches), args.rounds)
    return shared


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", default=str(REPO / "data" / "photos" / "heldout"))
    parser.add_argument("--images", type=int, default=32,
                        help="whole images per measurement (patches: 16x as many)")
    parser.add_argument("--input-size", type=int, default=227)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--patch-batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="onnxruntime intra-op threads (default: every core)")
    args = parser.parse_args(argv)
    from ctxpred.caffe.env import load_caffe

    caffe = load_caffe(gpu=None)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start")
    with tempfile.TemporaryDirectory() as folder:
        weights = os.path.join(folder, "random.caffemodel")
        caffe.Net(str(DEPLOY), caffe.TEST).save(weights)
        whole, onnx = whole_image_ratios(weights, args, folder)
        patched = patch_ratios(weights, args)
    print(f"\nsummary: shared/bare {whole:.3f} (whole images), {patched:.3f} (patches), "
          f"goal >= 0.9; onnxruntime/Caffe {onnx:.2f}, goal >= 2")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
