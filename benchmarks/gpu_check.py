"""GPU check of a CUDA build of Caffe: CPU agreement, speed, the real loop, resume, learning.

Run on a machine with a GPU through benchmarks/gpu_check.sh, which unpacks
the runtime that benchmarks/gpu_bundle.sh packed (Caffe, its libraries, a
Python 3.11 with numpy...). Stages, each recorded in OUT/gpu_check.json as it
finishes (a failing stage is recorded and the next one runs):

1. agreement: for the three context nets (color_dropping, projection, vgg)
   and the Fast R-CNN CaffeNet net, the same weights and the same batch
   (a real PatchPairData batch; synthetic RoIs for Fast R-CNN) through
   forward and backward in CPU mode and in GPU mode; for every net output and
   every parameter gradient the relative error ||gpu - cpu|| / ||cpu||.
   Dropout ratios are set to 0 (its masks come from different generators on
   the two devices); everything else is the training net.
2. caffe_time: `caffe time -gpu 0` of the three training nets at the
   reference batch (the data layer replaced by an Input layer of the shapes
   of a real < 512-patch batch): ms per forward-backward, patches/s.
3. train_loop: tools/train.py --gpu 0 with PatchPairData for a few hundred
   steps per net at the reference batch: patches/s, data-wait share of step
   time, mean step time against caffe time of the same net.
4. resume: a run stopped by a `quit` file, then resumed: the iteration
   continues where the snapshot left it.
5. learning: tools/demo.py --device gpu (the demo's recipe at the full
   batch) for the minutes left, with its held-out accuracy against the same
   net at initialisation (95% intervals).

With --rehearse the same stages run in CPU mode with tiny sizes, to check the
packaging and the script on a machine without a GPU.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctxpred.caffe.env import gpu_status, load_caffe  # noqa: E402
from ctxpred.data.layer import close_data_layers  # noqa: E402
from ctxpred.models.context import NET_NAMES, data_layer_params, train_net  # noqa: E402

FAST_RCNN_MODEL = "CaffeNetGroupless"
# ||gpu - cpu|| / ||cpu|| allowed for net outputs and for parameter gradients
# (float32, different summation orders through up to 16 layers and BatchNorm).
OUTPUT_TOLERANCE = 1e-4
GRADIENT_TOLERANCE = 1e-2


def with_input_layer(proto, shapes, dropout_ratio=None):
    """Copy of ``proto`` whose Python data layer is an Input layer giving ``shapes``.

    shapes: {top name: shape} for the data layer's tops, in its top order.
    dropout_ratio: when given, every Dropout layer gets this ratio.
    """
    from caffe.proto import caffe_pb2
    out = caffe_pb2.NetParameter()
    out.CopyFrom(proto)
    data = next(layer for layer in out.layer if layer.type == "Python" and not layer.bottom)
    tops = list(data.top)
    data.Clear()
    data.name, data.type = "data", "Input"
    data.top.extend(tops)
    for top in tops:
        data.input_param.shape.add().dim.extend(int(d) for d in shapes[top])
    if dropout_ratio is not None:
        for layer in out.layer:
            if layer.type == "Dropout":
                layer.dropout_param.dropout_ratio = dropout_ratio
    return out


def context_batch(caffe, work, net_name, images, max_patches, seed=0):
    """One real PatchPairData batch of a context net: {top: array}."""
    params = data_layer_params(net_name, images, seed=seed, workers=1, max_patches=max_patches)
    proto = train_net(net_name, params)
    path = work / f"{net_name}_data.prototxt"
    path.write_text(str(proto))
    caffe.set_mode_cpu()
    net = caffe.Net(str(path), caffe.TRAIN)
    try:
        net._forward(0, 0)
        batch = {top: net.blobs[top].data.copy() for top in ("data", "select1", "select2", "label")}
    finally:
        close_data_layers(net)
    return proto, batch


def fast_rcnn_batch(rng, rois=128, classes=21, height=300, width=400):
    """A synthetic Fast R-CNN minibatch for the ctxpred-layer CaffeNet net: {top: array}."""
    from ctxpred.models.fast_rcnn import train_net as fast_rcnn_train_net
    proto = fast_rcnn_train_net(FAST_RCNN_MODEL, layers="ctxpred", num_classes=classes,
                                data_params={"dataset": "replaced by an Input layer"})
    x1 = rng.uniform(0, width - 80, rois)
    y1 = rng.uniform(0, height - 80, rois)
    boxes = np.stack([np.zeros(rois), x1, y1, x1 + rng.uniform(40, 80, rois),
                      y1 + rng.uniform(40, 80, rois)], axis=1)
    labels = rng.integers(0, classes, rois)
    weights = np.zeros((rois, 4 * classes))
    for row, label in enumerate(labels):
        if label:
            weights[row, 4 * label:4 * label + 4] = 1
    batch = {"data": rng.normal(0, 50, (1, 3, height, width)), "rois": boxes,
             "labels": labels, "bbox_targets": rng.normal(0, 1, (rois, 4 * classes)) * weights}
    data_layer = next(layer for layer in proto.layer if layer.type == "Python" and not layer.bottom)
    for top in data_layer.top[4:]:
        batch[top] = weights
    return proto, {k: np.asarray(v, np.float32) for k, v in batch.items()}


def run_net(caffe, path, weights, batch, gpu):
    """Forward and backward once; returns {output or param/i: array}."""
    if gpu is None:
        caffe.set_mode_cpu()
    else:
        caffe.set_device(gpu)
        caffe.set_mode_gpu()
    net = caffe.Net(str(path), str(weights), caffe.TRAIN)
    for name, value in batch.items():
        net.blobs[name].reshape(*value.shape)
        net.blobs[name].data[...] = value
    net.forward()
    net.backward()
    result = {name: net.blobs[name].data.copy() for name in net.outputs}
    for layer, params in net.params.items():
        for index, param in enumerate(params):
            if param.diff.any() or index < 2:
                result[f"{layer}/{index} grad"] = param.diff.copy()
    return result


def agreement(caffe, work, name, proto, batch, gpu):
    """Relative errors ||gpu - cpu|| / ||cpu|| of outputs and parameter gradients."""
    checked = with_input_layer(proto, {k: v.shape for k, v in batch.items()}, dropout_ratio=0.0)
    path = work / f"{name}_agreement.prototxt"
    path.write_text(str(checked))
    caffe.set_mode_cpu()
    caffe.set_random_seed(0)
    weights = work / f"{name}_agreement.caffemodel"
    caffe.Net(str(path), caffe.TRAIN).save(str(weights))
    cpu = run_net(caffe, path, weights, batch, None)
    other = run_net(caffe, path, weights, batch, gpu)
    errors, norms = {}, {}
    for key, reference in cpu.items():
        norms[key] = float(np.linalg.norm(reference))
        errors[key] = float(np.linalg.norm(other[key] - reference)) / max(norms[key], 1e-30)
    outputs = {k: v for k, v in errors.items() if not k.endswith(" grad")}
    grads = {k: v for k, v in errors.items() if k.endswith(" grad")}
    # A bias followed by BatchNorm has a gradient that is zero in exact arithmetic
    # (BatchNorm removes the mean): both devices give rounding noise, whose
    # relative difference means nothing. Such gradients, under 1e-6 of the
    # same layer's weight gradient, are reported but not judged.
    judged = {k: v for k, v in grads.items()
              if norms[k] >= 1e-6 * norms.get(k.split("/")[0] + "/0 grad", 0.0)}
    worst = max(judged, key=judged.get)
    passed = (max(outputs.values()) <= OUTPUT_TOLERANCE
              and judged[worst] <= GRADIENT_TOLERANCE)
    return dict(batch={k: list(v.shape) for k, v in batch.items()}, passed=passed,
                outputs=outputs, max_grad_error=judged[worst], worst_grad=worst,
                near_zero_grads={k: dict(error=grads[k], cpu_norm=norms[k])
                                 for k in grads if k not in judged},
                grad_errors=grads, cpu_outputs={k: float(np.ravel(cpu[k])[0]) for k in outputs},
                gpu_outputs={k: float(np.ravel(other[k])[0]) for k in outputs})


def caffe_time(caffe_binary, work, proto, batch, name, gpu, iterations):
    """`caffe time` of a net with an Input layer of the batch's shapes: ms per iteration."""
    path = work / f"{name}_time.prototxt"
    path.write_text(str(with_input_layer(proto, {k: v.shape for k, v in batch.items()})))
    command = [caffe_binary, "time", "-model", str(path), "-iterations", str(iterations)]
    if gpu is not None:
        command += ["-gpu", str(gpu)]
    done = subprocess.run(command, capture_output=True, text=True,
                          env=dict(os.environ, GLOG_minloglevel="0", GLOG_logtostderr="1"))
    found = re.search(r"Average Forward-Backward: ([0-9.]+) ms", done.stderr)
    if not found:
        raise RuntimeError(f"caffe time failed (exit {done.returncode}): "
                           + " | ".join(done.stderr.strip().splitlines()[-3:]))
    ms = float(found.group(1))
    patches = int(batch["data"].shape[0])
    return dict(ms_per_iter=ms, patches=patches, patches_per_s=patches / (ms / 1000),
                iterations=iterations, command=" ".join(command))


def read_train_log(path):
    with open(path) as handle:
        header = handle.readline().split()
        rows = [line.split() for line in handle if line.strip()]
    return {column: np.array([float(row[i]) for row in rows]) for i, column in enumerate(header)}


def train_tool(args, run_dir, extra, timeout):
    command = [sys.executable, str(REPO / "tools" / "train.py"), "--out", str(run_dir),
               "--images", args.images] + extra
    if args.gpu is not None:
        command += ["--gpu", str(args.gpu)]
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    return command, done, time.time() - started


def train_loop(args, net_name, time_ms):
    run_dir = args.work / f"loop_{net_name}"
    command, done, wall = train_tool(
        args, run_dir, ["--net", net_name, "--iters", str(args.loop_steps),
                        "--max-patches", str(args.max_patches), "--fresh"], timeout=240)
    if done.returncode != 0:
        raise RuntimeError(f"train.py exit {done.returncode}: "
                           + " | ".join(done.stderr.strip().splitlines()[-3:]))
    log = read_train_log(run_dir / "train.log")
    skip = min(10, len(log["iter"]) // 4)        # warm-up: first batches and cuBLAS set-up
    steps = {k: v[skip:] for k, v in log.items()}
    step_s = float(steps["step_s"].mean())
    result = dict(steps=int(len(log["iter"])), steps_measured=int(len(steps["iter"])),
                  mean_patches=float(steps["patches"].mean()),
                  patches_per_s=float(steps["patches"].sum() / steps["step_s"].sum()),
                  data_wait_share=float(steps["data_wait_s"].sum() / steps["step_s"].sum()),
                  mean_step_ms=1000 * step_s, wall_s=wall, command=" ".join(command))
    if time_ms:
        result["step_over_caffe_time"] = 1000 * step_s / time_ms
    return result


def resume(args):
    """Stop a run with a quit file, resume it, and read where it went on."""
    run_dir = args.work / "resume"
    base = ["--net", "color_dropping", "--max-patches", str(args.max_patches)]
    command = [sys.executable, str(REPO / "tools" / "train.py"), "--out", str(run_dir),
               "--images", args.images, "--iters", "100000", "--fresh"] + base
    if args.gpu is not None:
        command += ["--gpu", str(args.gpu)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(args.resume_seconds)
    (run_dir / "quit").touch()
    output, _ = first.communicate(timeout=120)
    snapshots = sorted(run_dir.glob("model_iter_*.solverstate"),
                       key=lambda p: int(re.search(r"(\d+)", p.name).group(1)))
    if first.returncode != 0 or not snapshots:
        raise RuntimeError(f"first run exit {first.returncode}, snapshots {snapshots}: "
                           + " | ".join(output.strip().splitlines()[-3:]))
    stopped_at = int(re.search(r"model_iter_(\d+)", snapshots[-1].name).group(1))
    target = stopped_at + 20
    command2, done, _ = train_tool(args, run_dir, base + ["--iters", str(target)], timeout=180)
    if done.returncode != 0:
        raise RuntimeError(f"resumed run exit {done.returncode}: "
                           + " | ".join(done.stderr.strip().splitlines()[-3:]))
    log = read_train_log(run_dir / "train.log")
    iters = log["iter"].astype(int)
    events = (run_dir / "events.log").read_text()
    return dict(stopped_at=stopped_at, resumed_to=int(iters.max()), target=target,
                log_rows=int(len(iters)), log_iterations_unique=bool(len(set(iters)) == len(iters)),
                resumed_message=[line for line in events.splitlines()
                                 if "resuming from" in line][-1:],
                command=" ".join(command))


def learning(args, minutes):
    out = args.work / "demo"
    command = [sys.executable, str(REPO / "tools" / "demo.py"), "--out", str(out),
               "--images", args.images, "--heldout", args.heldout,
               "--minutes", f"{minutes:.2f}",
               "--device", "gpu" if args.gpu is not None else "cpu"]
    if args.rehearse:
        command += ["--eval-images", "4", "--pairs-per-image", "8", "--bn-batches", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60 * minutes + 240)
    if done.returncode != 0:
        raise RuntimeError(f"demo exit {done.returncode}: "
                           + " | ".join(done.stderr.strip().splitlines()[-3:]))
    summary = json.loads((out / "summary.json").read_text())
    for name in ("report.md", "training.png", "train.log"):
        if (out / name).exists() and args.out:
            (Path(args.out) / f"demo_{name}").write_bytes((out / name).read_bytes())
    return dict(summary=summary, command=" ".join(command), stdout_tail=done.stdout[-1500:])


def compact(report):
    """The headline numbers of a report, for a terminal."""
    short = {}
    for net, result in report.get("agreement", {}).items():
        if isinstance(result, dict) and "outputs" in result:
            short[f"agree {net}"] = dict(outputs=result["outputs"], grad=result["max_grad_error"])
    for stage in ("caffe_time", "train_loop"):
        for net, result in report.get(stage, {}).items():
            if isinstance(result, dict):
                short[f"{stage} {net}"] = {k: round(v, 4) for k, v in result.items()
                                           if isinstance(v, float)}
    for stage in ("resume", "learning"):
        result = dict(report.get(stage, {}))
        result.pop("traceback", None)
        result.pop("stdout_tail", None)
        short[stage] = result
    return short


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True,
                        help="folder for gpu_check.json and the demo report")
    parser.add_argument("--work", default="/tmp/gpu_check_work", help="scratch folder for runs")
    parser.add_argument("--images", default=str(REPO / "data/photos/train"), help="training photos")
    parser.add_argument("--heldout", default=str(REPO / "data/photos/heldout"),
                        help="held-out photos for the learning stage")
    parser.add_argument("--caffe", default="caffe", help="Caffe's command-line tool")
    parser.add_argument("--gpu", type=int, default=0, help="CUDA device (default: %(default)s)")
    parser.add_argument("--max-patches", type=int, default=512,
                        help="batch buffer: batches of fewer patches (reference: 512)")
    parser.add_argument("--loop-steps", type=int, default=200, help="steps per net in train_loop")
    parser.add_argument("--time-iterations", type=int, default=50, help="caffe time iterations")
    parser.add_argument("--resume-seconds", type=float, default=25,
                        help="seconds the resume stage trains before its quit file")
    parser.add_argument("--deadline-s", type=float, default=520,
                        help="the whole check ends by then; the learning stage gets what is left")
    parser.add_argument("--stages", default="agreement,caffe_time,train_loop,resume,learning",
                        help="comma-separated stages to run")
    parser.add_argument("--rehearse", action="store_true",
                        help="CPU mode with tiny sizes, for a machine without a GPU")
    args = parser.parse_args(argv)
    started = time.time()
    args.work = Path(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.rehearse:
        args.gpu = None
    report = dict(started=time.strftime("%Y-%m-%d %H:%M:%S"), rehearse=args.rehearse,
                  max_patches=args.max_patches)
    caffe = load_caffe(None)
    status = gpu_status(args.gpu or 0)
    report["gpu_status"] = status.__dict__
    if args.gpu is not None and not status.usable:
        report["error"] = status.reason
    stages = args.stages.split(",")

    def record(stage, function):
        stage_started = time.time()
        try:
            report[stage] = function()
        except Exception as error:  # recorded, and the next stage runs
            report[stage] = dict(error=f"{type(error).__name__}: {error}",
                                 traceback=traceback.format_exc()[-2000:])
        report[stage]["seconds"] = round(time.time() - stage_started, 1)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"[gpu_check] {stage}: {time.time() - started:.0f} s "
              f"{'error' if 'error' in report[stage] else 'done'}", flush=True)

    rng = np.random.default_rng(0)
    batches = {}
    small = 32 if args.rehearse else 128
    if "agreement" in stages:
        def agreement_stage():
            result = {}
            for name in NET_NAMES:
                proto, batch = context_batch(caffe, args.work, name, args.images, small)
                result[name] = agreement(caffe, args.work, name, proto, batch, args.gpu)
            proto, batch = fast_rcnn_batch(rng, rois=32 if args.rehearse else 128)
            result[f"fast_rcnn_{FAST_RCNN_MODEL}"] = agreement(
                caffe, args.work, "fast_rcnn", proto, batch, args.gpu)
            return result
        record("agreement", agreement_stage)
    times = {}
    if "caffe_time" in stages:
        def time_stage():
            result = {}
            for name in NET_NAMES:
                proto, batch = context_batch(caffe, args.work, name, args.images, args.max_patches)
                batches[name] = batch
                result[name] = caffe_time(args.caffe, args.work, proto, batch, name, args.gpu,
                                          2 if args.rehearse else args.time_iterations)
                times[name] = result[name]["ms_per_iter"]
            return result
        record("caffe_time", time_stage)
    if "train_loop" in stages:
        record("train_loop", lambda: {name: train_loop(args, name, times.get(name))
                                      for name in NET_NAMES})
    if "resume" in stages:
        record("resume", lambda: resume(args))
    if "learning" in stages:
        left_min = (args.deadline_s - (time.time() - started)) / 60 - 1.5   # evaluation and exit
        if left_min >= 0.5:
            record("learning", lambda: learning(args, left_min))
        else:
            report["learning"] = dict(skipped=f"{left_min:.1f} minutes left")
    report["total_seconds"] = round(time.time() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    failed = [stage for stage in stages if "error" in report.get(stage, {})]
    failed += [f"agreement {net}" for net, result in report.get("agreement", {}).items()
               if isinstance(result, dict) and result.get("passed") is False]
    print(json.dumps(compact(report)))
    print(f"[gpu_check] done in {report['total_seconds']} s; failed stages: {failed or 'none'}")
    return 1 if failed or "error" in report else 0


if __name__ == "__main__":
    sys.exit(main())
