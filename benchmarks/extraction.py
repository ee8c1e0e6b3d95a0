"""Benchmark of the shared extraction path: against a bare net.forward loop, and onnxruntime against Caffe.

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
    resizing the images, writing HDF5) is printed too.
(b) onnxruntime / Caffe, images/s of the whole-image feature net, both on
    the CPU, same batch (OnnxForward with every core, graph optimisation
    level "all"). Goal: >= 2.

Net: the colour-dropping deploy net with random (filler) weights; images
from data/photos/heldout. The load average is printed at the start and end.

    .venv/bin/python benchmarks/extraction.py                  # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/extraction.py --rounds 2 --images 16   # smoke run
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
    """Items per second of ``run()``, which processes ``items`` items."""
    start = time.perf_counter()
    run()
    return items / (time.perf_counter() - start)


def bare_loop(net, batch, batches):
    """``run()`` of ``batches`` bare ``net.forward()`` calls at ``batch`` (input filled once)."""
    blob = net.blobs[net.inputs[0]]
    blob.reshape(batch, *blob.data.shape[1:])
    blob.data[...] = np.random.default_rng(0).normal(0, 50, blob.data.shape)
    net.forward()

    def run():
        for _ in range(batches):
            net.forward()
    return run


def shared_loop(forward, pixels, batch):
    """``run()`` of the shared path over ``pixels`` (N, H, W, 3) uint8, rows copied out."""
    from ctxpred.features.forward import forward_all

    return lambda: forward_all(forward, pixels, batch)


def interleaved(name, runs, items, rounds):
    """Run the two (label, run) pairs alternately; print rates per round and the median ratio."""
    (label_a, run_a), (label_b, run_b) = runs
    ratios = []
    for number in range(rounds):
        a, b = rate(run_a, items), rate(run_b, items)
        ratios.append(a / b)
        print(f"  round {number + 1}: {label_a} {a:7.1f}/s  {label_b} {b:7.1f}/s  ratio {a / b:.3f}  "
              f"(load {os.getloadavg()[0]:.2f})", flush=True)
    median = statistics.median(ratios)
    print(f"{name}: median ratio {median:.3f} over {rounds} rounds", flush=True)
    return median


def whole_image_nets(weights, args):
    """(LayerFeatureNet, decoded images (N, S, S, 3) uint8) of the benchmark's images."""
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

    count = args.images * 4
    items = sampled_patches(open_source(args.photos), "random", 16, seed=0)
    batches = patch_batches(items, count, 96, stop=count)
    return next(batches).pixels.copy()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", default=str(REPO / "data" / "photos" / "heldout"))
    parser.add_argument("--images", type=int, default=32,
                        help="whole images per measurement (patches: 4x as many)")
    parser.add_argument("--input-size", type=int, default=227)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--patch-batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None,
                        help="onnxruntime intra-op threads (default: every core)")
    args = parser.parse_args(argv)
    from ctxpred.caffe.env import load_caffe

    caffe = load_caffe(gpu=None)
    from ctxpred.features.extractor import FeatureExtractor
    from ctxpred.features.forward import CaffeForward, OnnxForward, check_parity
    from ctxpred.features.layers import extract_layer_features

    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start")
    with tempfile.TemporaryDirectory() as folder:
        weights = os.path.join(folder, "random.caffemodel")
        caffe.Net(str(DEPLOY), caffe.TEST).save(weights)
        net, pixels, paths = whole_image_nets(weights, args)
        outputs = list(net.outputs.values())
        caffe_forward = CaffeForward(net.net, outputs)
        batches = -(-len(pixels) // args.batch)
        print(f"\n(a) whole images {args.input_size}x{args.input_size}, batch {args.batch}, "
              f"{len(pixels)} images, outputs {', '.join(outputs)}")
        whole = interleaved("shared path / bare forward (whole images)",
                            [("shared", shared_loop(caffe_forward, pixels, args.batch)),
                             ("bare", bare_loop(net.net, args.batch, batches))],
                            batches * args.batch, args.rounds)
        extractor = FeatureExtractor(str(DEPLOY), weights, "fc6", args.patch_batch)
        patches = patch_pixels(args)
        patch_batches_count = -(-len(patches) // args.patch_batch)
        print(f"\n(a) 96x96 patches to fc6, batch {args.patch_batch}, {len(patches)} patches")
        patched = interleaved("shared path / bare forward (patches)",
                              [("shared", shared_loop(extractor.forward, patches,
                                                      args.patch_batch)),
                               ("bare", bare_loop(extractor.net, args.patch_batch,
                                                  patch_batches_count))],
                              patch_batches_count * args.patch_batch, args.rounds)
        onnx_forward = OnnxForward(net.param, net.weights(), outputs, threads=args.threads)
        parity = check_parity(caffe_forward, onnx_forward, pixels[:args.batch])
        print(f"\n(b) onnxruntime vs Caffe, whole images, batch {args.batch} "
              f"(first-batch parity: max relative difference {parity:.2g})")
        onnx_ratio = interleaved("onnxruntime / Caffe",
                                 [("onnx", shared_loop(onnx_forward, pixels, args.batch)),
                                  ("caffe", shared_loop(caffe_forward, pixels, args.batch))],
                                 len(pixels), args.rounds)
        end_to_end = {}
        for backend in ("caffe", "onnx"):
            end_to_end[backend] = rate(lambda: extract_layer_features(
                str(DEPLOY), weights, paths, list(LAYERS), Path(folder, backend),
                args.input_size, args.batch, backend, threads=args.threads), len(paths))
    print(f"\nend to end (decode, resize, extract, write HDF5; set-up included): "
          f"caffe {end_to_end['caffe']:.1f} images/s, onnx {end_to_end['onnx']:.1f} images/s")
    print(f"\nsummary: shared/bare {whole:.3f} (whole images), {patched:.3f} (patches), "
          f"goal >= 0.9; onnxruntime/Caffe {onnx_ratio:.2f}, goal >= 2")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
