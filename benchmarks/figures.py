"""Benchmark of the maximal-activation figure: patches/s and peak memory against patch count.

Each measurement runs in its own fresh child process (multiprocessing,
spawn), so its peak resident memory (VmHWM, the RSS high-water mark of the
child's address space) is its own:

- ``bare forward`` (the baseline): the colour-dropping deploy net cut
  after fc6 (the deepest of the tool's default layers), batch --batch,
  ``net.forward()`` in a loop on an input blob filled once, --baseline-patches
  patches: nothing but Caffe. Run before and after the max_activations
  runs; the faster of the two counts (other processes only slow a run down).
- ``max_activations N``: tools/max_activations.py's own main() with
  ``--patches N`` and its default layers (norm1, norm2, conv3, conv4, conv5,
  fc6, every unit): decoding the images, cutting random patches, the net
  forward, streaming top-9 per unit, saving the resumable state every
  10000 patches. Timed separately: set-up (loading Caffe and the net), the
  patch loop (``update_tops``: the patches/s figure) and, with --pages, the
  HTML pages (``write_pages``, which cuts the winning patches again and
  writes one PNG per cell: about 49,000 for all units). Without --pages
  (the default) the pages are not written.

Printed: patches/s of each run and its ratio to the faster bare forward,
peak memory of each run, and the ratio of the peak memory of the largest run to
the smallest (goal: flat, i.e. close to 1 while the patches grow 10x).

The paper's figure uses 2.5 million patches and this figure's claim is
about 10k versus 100k; on 2 CPU cores the net forward alone runs at about
150-200 patches/s, so 100k patches take 10 minutes or more. The default
--patches 1000,10000 keeps the same 10x ratio at a tenth of the size
(about 2 minutes in all); ``--patches 10000,100000`` measures the real
sizes. The output says which sizes were measured.

Every image gives ceil(largest N / images) patches (--per-image is the
same in every run, so the per-patch decoding cost is the same). Wall-clock
rates: run it on an otherwise idle machine; the load average is printed at
the start and the end.

    .venv/bin/python benchmarks/figures.py                            # about 2-3 minutes
    .venv/bin/python benchmarks/figures.py --quick                    # smoke run, under a minute
    .venv/bin/python benchmarks/figures.py --patches 10000,100000     # the real sizes, ~15 min
"""
import argparse
import importlib.util
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "max_activations.py"
DEPLOY = REPO / "prototxt" / "color_dropping" / "deploy.prototxt"
QUICK_PATCHES = (200, 2000)
QUICK_BASELINE = 500


def load_module(path, name):
    """The Python file ``path`` imported as module ``name`` (tools/ and benchmarks/ are scripts)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peak_rss_mib():
    """This process's resident-memory high-water mark, MiB: VmHWM of /proc/self/status (Linux).

    Not ru_maxrss: Linux carries it over exec from the process that forked the
    child, so a spawned child would report at least its parent's peak.
    """
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("/proc/self/status has no VmHWM line (not Linux?)")


def bare_forward_child(weights, batch, patches, log_path, result_path):
    """Child process: the baseline, patches/s of net.forward alone; writes JSON to result_path."""
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    import numpy as np

    from ctxpred.caffe.env import load_caffe

    load_caffe(gpu=None)
    from ctxpred.features.extractor import FeatureExtractor

    features_benchmark = load_module(REPO / "benchmarks" / "features.py", "features_benchmark")
    extractor = FeatureExtractor(str(DEPLOY), weights, "fc6", batch)
    rate = features_benchmark.bare_rate(extractor, patches, np.random.default_rng(0))
    Path(result_path).write_text(json.dumps({"rate": rate, "peak_mib": peak_rss_mib()}))


def max_activations_child(argv, pages, log_path, result_path):
    """Child process: tools/max_activations.py's main(argv), its stages timed; JSON to result_path.

    The run's ``update_tops`` and ``write_pages`` (ctxpred.figures.max_activations) are
    wrapped with timers (max_activations() looks them up in its module when it calls
    them); without ``pages``, ``write_pages`` is replaced by a function that writes nothing.
    """
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    tool = load_module(TOOL, "max_activations_tool")
    from ctxpred.figures import max_activations as run
    seconds = {}

    def timed(stage, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[stage] = time.perf_counter() - start
        return wrapper

    run.update_tops = timed("patch loop", run.update_tops)
    if pages:
        run.write_pages = timed("pages", run.write_pages)
    else:
        run.write_pages = lambda settings, *_: Path(settings.out) / "index.html (not written)"
    start = time.perf_counter()
    tool.main(argv)
    seconds["total"] = time.perf_counter() - start
    Path(result_path).write_text(json.dumps({"seconds": seconds, "peak_mib": peak_rss_mib()}))


def in_child(target, args, folder, name):
    """Run ``target(*args, log, result)`` in a fresh spawned process; its JSON result."""
    log, result = Path(folder) / f"{name}.log", Path(folder) / f"{name}.json"
    process = multiprocessing.get_context("spawn").Process(
        target=target, args=(*args, str(log), str(result)))
    process.start()
    process.join()
    if process.exitcode or not result.is_file():
        tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
        sys.exit(f"error: the {name} run failed (exit code {process.exitcode}):\n{tail}")
    return json.loads(result.read_text())


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(REPO / "data" / "photos" / "train"),
                        help="images to cut patches from: folder, glob, list file or LMDB "
                             "(default: the checkout's training photos)")
    parser.add_argument("--patches", default="1000,10000",
                        help="comma-separated patch counts, one max_activations run each; the "
                             "memory ratio is largest over smallest (default: %(default)s, a "
                             "tenth of the 10k / 100k of the claim)")
    parser.add_argument("--baseline-patches", type=int, default=2000,
                        help="patches of the bare-forward baseline (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=64,
                        help="patches per net.forward, in both (default: %(default)s, the "
                             "tool's default)")
    parser.add_argument("--weights", default=None,
                        help="caffemodel of the colour-dropping deploy net (default: its "
                             "fillers' random weights; speed and memory do not depend on them)")
    parser.add_argument("--pages", action="store_true",
                        help="also write the HTML pages in each run and time them (about "
                             "49,000 PNG patches per run with all units)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: --patches {','.join(map(str, QUICK_PATCHES))} and "
                             f"--baseline-patches {QUICK_BASELINE}")
    parser.add_argument("--json", default=None, help="also write every number to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.patches, args.baseline_patches = QUICK_PATCHES, QUICK_BASELINE
    else:
        try:
            args.patches = sorted({int(value) for value in args.patches.split(",") if value})
        except ValueError:
            parser.error(f"--patches must be comma-separated integers, got {args.patches!r}")
    if not args.patches or min(args.patches) < 1 or args.baseline_patches < 1 or args.batch < 1:
        parser.error("--patches, --baseline-patches and --batch must be positive")
    if args.weights and not Path(args.weights).is_file():
        parser.error(f"--weights file {args.weights} does not exist")
    return args


def main(argv=None):
    args = parse_args(argv)
    from ctxpred.caffe.env import load_caffe
    from ctxpred.data.images import open_source

    images = len(open_source(args.images))
    per_image = -(-max(args.patches) // images)
    load = os.getloadavg()
    print(f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"{images} images of {args.images}, {per_image} random patches each")
    if load[0] > 0.5:
        print("warning: the machine is busy; wall-clock rates will be low and noisy")
    if max(args.patches) < 100_000:
        print(f"note: measured at {', '.join(map(str, args.patches))} patches, not the 10k / "
              "100k of the claim (--patches 10000,100000 measures those)")
    results = {"images": args.images, "per_image": per_image, "load_start": load,
               "batch": args.batch, "pages": args.pages, "runs": {}}
    with tempfile.TemporaryDirectory() as folder:
        weights = args.weights
        if weights is None:
            features_benchmark = load_module(REPO / "benchmarks" / "features.py",
                                             "features_benchmark")
            weights = features_benchmark.random_weights(load_caffe(gpu=None), "color_dropping",
                                                        folder)
        baseline = (weights, args.batch, args.baseline_patches)
        bare = in_child(bare_forward_child, baseline, folder, "bare forward")
        print(f"\n{'run':24s} {'patches':>8s} {'set-up s':>9s} {'loop s':>8s} "
              f"{'patches/s':>10s} {'pages s':>8s} {'peak MiB':>9s}")
        print(f"{'bare forward (fc6)':24s} {args.baseline_patches:8d} {'':>9s} {'':>8s} "
              f"{bare['rate']:10.1f} {'':>8s} {bare['peak_mib']:9.0f}", flush=True)
        for patches in args.patches:
            out = Path(folder) / f"max_activations_{patches}"
            argv = ["--weights", weights, "--images", args.images, "--patches", str(patches),
                    "--per-image", str(per_image), "--batch", str(args.batch), "--out", str(out)]
            run = in_child(max_activations_child, (argv, args.pages), folder,
                           f"max_activations {patches}")
            seconds = run["seconds"]
            rate = patches / seconds["patch loop"]
            setup = seconds["total"] - seconds["patch loop"] - seconds.get("pages", 0)
            pages = f"{seconds['pages']:8.1f}" if "pages" in seconds else f"{'-':>8s}"
            print(f"{'max_activations':24s} {patches:8d} {setup:9.1f} {seconds['patch loop']:8.1f} "
                  f"{rate:10.1f} {pages} {run['peak_mib']:9.0f}", flush=True)
            results["runs"][patches] = {"rate": rate, **run}
        again = in_child(bare_forward_child, baseline, folder, "bare forward again")
        print(f"{'bare forward (fc6) again':24s} {args.baseline_patches:8d} {'':>9s} {'':>8s} "
              f"{again['rate']:10.1f} {'':>8s} {again['peak_mib']:9.0f}", flush=True)
    best_bare = max(bare["rate"], again["rate"])
    results["bare_forward"] = {"patches": args.baseline_patches, "before": bare, "after": again,
                               "rate": best_bare}
    print(f"\npatches/s over the faster bare forward ({best_bare:.1f} patches/s):")
    for patches, run in results["runs"].items():
        run["ratio_to_bare"] = run["rate"] / best_bare
        print(f"  max_activations {patches:8d} patches: {run['ratio_to_bare']:.2f}x")
    if max(run["ratio_to_bare"] for run in results["runs"].values()) > 1:
        print("  a ratio above 1 means the baselines ran while the machine was busier: the "
              "ratios are not reliable; rerun on an idle machine")
    smallest, largest = results["runs"][min(args.patches)], results["runs"][max(args.patches)]
    memory_ratio = largest["peak_mib"] / smallest["peak_mib"]
    results["peak_ratio"] = memory_ratio
    print(f"peak memory, {max(args.patches)} over {min(args.patches)} patches "
          f"({max(args.patches) / min(args.patches):g}x the patches): {memory_ratio:.3f}")
    results["load_end"] = os.getloadavg()
    print(f"load average at the end {results['load_end'][0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
