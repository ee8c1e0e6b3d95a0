"""Faulty models and definitions: every tool that takes a prototxt or a caffemodel
answers one line naming the file (and layer), exit 2, no traceback, no Caffe
abort; debatchnorm refuses BatchNorms it cannot fold; one exit-code convention.

Real Caffe, real files: weights of a small deploy net saved by Caffe, then
truncated, emptied, or paired with a definition that has an unknown layer
type, a syntax error, a layer reading a blob nobody writes, or other shapes.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import skimage.data
from PIL import Image

from ctxpred.cli import BAD_INPUT, DIVERGED, DONE, FAILED, exit_code
from ctxpred.weights.surgery import check_batchnorms_fold
from ctxpred.caffe.netparam import read_net_param
from ctxpred.training.loop import DivergenceError
from ctxpred.weights.files import read_weights

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"

SMALL_DEPLOY = """name: "small"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 96 dim: 96 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 11 stride: 4
                            weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fc6" type: "InnerProduct" bottom: "pool1" top: "fc6"
        inner_product_param { num_output: 16 weight_filler { type: "gaussian" std: 0.01 } } }
"""


def glog_free(stderr):
    """stderr without Caffe's informational glog lines (a CUDA build logs at import) and
    progress bars."""
    return [line for line in re.split(r"[\r\n]", stderr)
            if line.strip() and not re.match(r"[IWE]\d{4} |WARNING: Logging before", line)
            and "%|" not in line]


def run_tools(commands, parallel=4):
    """Run tools/<name> args... for each (name, *args), ``parallel`` at a time."""
    results = []
    for start in range(0, len(commands), parallel):
        processes = [subprocess.Popen([sys.executable, str(TOOLS / name), *map(str, args)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=REPO) for name, *args in commands[start:start + parallel]]
        for process in processes:
            stdout, stderr = process.communicate(timeout=300)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout,
                                                       stderr))
    return results


@pytest.fixture(scope="module")
def faults(caffe, tmp_path_factory):
    """A good small model and definition, and their damaged variants (paths)."""
    folder = tmp_path_factory.mktemp("faults")
    deploy = folder / "small.prototxt"
    deploy.write_text(SMALL_DEPLOY)
    net = caffe.Net(str(deploy), caffe.TEST)
    good, good_h5 = folder / "good.caffemodel", folder / "good.caffemodel.h5"
    net.save(str(good))
    net.save_hdf5(str(good_h5))
    data, data_h5 = good.read_bytes(), good_h5.read_bytes()
    paths = {"deploy": deploy, "good": good, "images": folder / "images"}
    for name, content in (("truncated.caffemodel", data[:len(data) // 2]),
                          ("empty.caffemodel", b""),
                          ("truncated.caffemodel.h5", data_h5[:len(data_h5) // 2])):
        (folder / name).write_bytes(content)
        paths[name] = folder / name
    for name, text in (("unknown_type.prototxt", SMALL_DEPLOY.replace('"ReLU"', '"Relu"')),
                       ("syntax.prototxt", SMALL_DEPLOY.replace("pool: MAX", "pool: MAX }")),
                       ("missing_bottom.prototxt", SMALL_DEPLOY.replace('bottom: "pool1"',
                                                                        'bottom: "pool2"')),
                       ("shapes.prototxt", SMALL_DEPLOY.replace("num_output: 16",
                                                                "num_output: 10"))):
        (folder / name).write_text(text)
        paths[name] = folder / name
    paths["images"].mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(skimage.data, name)()).save(paths["images"] / f"{name}.jpg")
    return paths


def weight_commands(weights, paths, out):
    """Every tool that reads a caffemodel, given ``weights``."""
    deploy, images = paths["deploy"], paths["images"]
    return [
        ("extract_features.py", "--weights", weights, "--deploy", deploy, "--images", images,
         "--out", out / "f.h5"),
        ("mine.py", "--weights", weights, "--deploy", deploy, "--images", images,
         "--out", out / "mine"),
        ("nearest_neighbors.py", "--weights", weights, "--images", images, "--out", out / "nn"),
        ("max_activations.py", "--weights", weights, "--deploy", deploy, "--images", images,
         "--patches", 2, "--layers", "fc6", "--out", out / "max"),
        ("neighbour_proxy.py", "--weights", weights, "--images", images),
        ("eval_pretext.py", "--weights", weights, "--images", images, "--out", out / "eval"),
        ("debatchnorm.py", deploy, weights, deploy, out / "folded.caffemodel"),
        ("magic_init.py", "-l", weights, "-d", f"{images}/*.jpg", deploy, out / "m.caffemodel"),
        ("groupless.py", "--prototxt", deploy, "--weights", weights,
         "--out-prototxt", out / "g.prototxt", "--out-weights", out / "g.caffemodel"),
        ("inspect_caffemodel.py", weights, "--prototxt", deploy),
        ("export_onnx.py", "--deploy", deploy, "--weights", weights, "--out", out / "m.onnx"),
        ("prepare_detection_init.py", "--weights", weights, "--net", "color_dropping",
         "--context-def", deploy, "--images", images, "--out", out / "init.caffemodel"),
        ("convert_head.py", weights, out / "converted.caffemodel"),
        ("make_no_fc6.py", weights, out / "nofc6.caffemodel"),
    ]


def definition_commands(definition, paths, out):
    """Every tool that reads a net definition, given ``definition`` and good weights."""
    good, images = paths["good"], paths["images"]
    return [
        ("extract_features.py", "--weights", good, "--deploy", definition, "--images", images,
         "--out", out / "f.h5"),
        ("mine.py", "--weights", good, "--deploy", definition, "--images", images,
         "--out", out / "mine"),
        ("max_activations.py", "--weights", good, "--deploy", definition, "--images", images,
         "--patches", 2, "--layers", "fc6", "--out", out / "max"),
        ("debatchnorm.py", definition, good, definition, out / "folded.caffemodel"),
        ("magic_init.py", "-l", good, "-d", f"{images}/*.jpg", definition, out / "m.caffemodel"),
        ("groupless.py", "--prototxt", definition, "--weights", good,
         "--out-prototxt", out / "g.prototxt", "--out-weights", out / "g.caffemodel"),
        ("inspect_caffemodel.py", good, "--prototxt", definition),
        ("export_onnx.py", "--deploy", definition, "--weights", good, "--out", out / "m.onnx"),
    ]


def one_line_failure(result, name):
    """None when ``result`` failed with exit 2 and one line naming ``name``, else what it did."""
    lines = glog_free(result.stderr)
    if not (result.returncode == BAD_INPUT and len(lines) == 1 and lines[0].startswith("error: ")
            and str(name) in lines[0] and "stack trace" not in result.stderr):
        return (Path(result.args[1]).name, str(name), result.returncode, result.stderr[-600:])
    return None


def test_damaged_weights_give_one_line_in_every_tool(faults, tmp_path):
    cases = [(name, command) for name in ("truncated.caffemodel", "empty.caffemodel",
                                          "truncated.caffemodel.h5")
             for command in weight_commands(faults[name], faults, tmp_path)]
    results = run_tools([command for _, command in cases])
    failures = [one_line_failure(result, faults[name]) for (name, _), result in zip(cases, results)]
    assert not list(filter(None, failures))
    assert not list(tmp_path.rglob("*.caffemodel")) and not list(tmp_path.rglob("*.h5"))


def test_damaged_definitions_give_one_line_in_every_tool(faults, tmp_path):
    cases = [(name, command)
             for name in ("unknown_type.prototxt", "syntax.prototxt", "missing_bottom.prototxt")
             for command in definition_commands(faults[name], faults, tmp_path)]
    shapes = [command for command in definition_commands(faults["shapes.prototxt"], faults,
                                                         tmp_path)
              if command[0] not in ("debatchnorm.py", "groupless.py")]  # their own check: below
    results = run_tools([command for _, command in cases] + shapes)
    failures = [one_line_failure(result, faults[name]) for (name, _), result in zip(cases, results)]
    assert not list(filter(None, failures))
    for result in results[len(cases):]:
        if result.args[1].endswith("inspect_caffemodel.py"):  # its finding: exit 1, on stdout
            assert result.returncode == FAILED and "layer fc6: the net's blobs" in result.stdout
            continue
        lines = glog_free(result.stderr)
        # The mismatch names the layer; tools that list every difference add lines for them.
        assert result.returncode == BAD_INPUT, (result.args, result.stderr[-2000:])
        assert "fc6" in result.stderr and "Traceback" not in result.stderr, result.args
        assert lines[0].startswith("error: ") and "stack trace" not in result.stderr
    unknown = glog_free(results[0].stderr)[0]
    assert "layer 'relu1' has type 'Relu'" in unknown


def test_library_readers_name_the_damaged_file(caffe, faults):
    for name in ("truncated.caffemodel", "empty.caffemodel", "truncated.caffemodel.h5"):
        with pytest.raises(ValueError, match=re.escape(str(faults[name]))):
            read_weights(faults[name])
    with pytest.raises(ValueError, match="layer 'relu1' has type 'Relu'"):
        read_net_param(faults["unknown_type.prototxt"])


BATCHNORM_NET = """name: "bn"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 } }
%s
layer { name: "fc6" type: "InnerProduct" bottom: "%s" top: "fc6"
        inner_product_param { num_output: 5 } }
"""
FOLDABLE = BATCHNORM_NET % (
    'layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }', "conv1")
AFTER_POOLING = BATCHNORM_NET % (
    'layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"\n'
    '        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n'
    'layer { name: "bn1" type: "BatchNorm" bottom: "pool1" top: "pool1" }', "pool1")
TARGET = BATCHNORM_NET % ("", "conv1")
TARGET_POOLING = BATCHNORM_NET % (
    'layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"\n'
    '        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }', "pool1")


def test_debatchnorm_refuses_a_batchnorm_with_nothing_to_fold_into(caffe, tmp_path):
    files = {}
    for name, text in (("foldable", FOLDABLE), ("after_pooling", AFTER_POOLING),
                       ("target", TARGET), ("target_pooling", TARGET_POOLING)):
        files[name] = tmp_path / f"{name}.prototxt"
        files[name].write_text(text)
    models = {}
    for name in ("foldable", "after_pooling"):
        net = caffe.Net(str(files[name]), caffe.TEST)
        for blob, value in zip(net.params["bn1"], (0.5, 2.0, 1.0)):
            blob.data[...] = value
        models[name] = tmp_path / f"{name}.caffemodel"
        net.save(str(models[name]))
    out = tmp_path / "out.caffemodel"
    results = run_tools([
        # The weights hold bn1, the definition has no bn1 at all.
        ("debatchnorm.py", files["target"], models["foldable"], files["target"], out),
        # bn1 normalises a Pooling output: nothing to fold into, and the target keeps pool1.
        ("debatchnorm.py", files["after_pooling"], models["after_pooling"],
         files["target_pooling"], out),
        ("debatchnorm.py", files["foldable"], models["foldable"], files["target"], out),
    ])
    for result, words in zip(results, ("the weights' layer bn1 holds BatchNorm statistics",
                                       "BatchNorm layer bn1 of")):
        assert result.returncode == BAD_INPUT, result.stderr
        assert words in result.stderr and len(glog_free(result.stderr)) == 1, result.stderr
    assert results[2].returncode == DONE, results[2].stderr
    assert "folded bn1 into conv1" in results[2].stdout
    folded = read_weights(out)
    assert set(folded) == {"conv1", "fc6"}
    with pytest.raises(ValueError, match="pool1"):
        check_batchnorms_fold(read_weights(models["after_pooling"]),
                              read_net_param(files["after_pooling"]),
                              read_net_param(files["target_pooling"]))


def test_one_exit_code_convention(faults, tmp_path):
    assert (DONE, FAILED, BAD_INPUT, DIVERGED) == (0, 1, 2, 3)
    assert [exit_code(error) for error in (DivergenceError("nan loss"), ValueError("bad"),
                                           FileNotFoundError("gone"), OSError(28, "full"),
                                           RuntimeError("worker died"))] == [3, 2, 2, 1, 1]
    readme = (REPO / "README.md").read_text()
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 3 |", "| 130 |"):
        assert code in readme
    # Every tool maps what it raises through ctxpred.cli.
    for tool in sorted(TOOLS.glob("*.py")):
        if tool.name in ("cuda_toolkit.py", "make_prototxt.py"):
            continue
        assert "sys.exit(run_tool(main))" in tool.read_text(), tool.name
    # A full device while writing is a failure while running (1), bad input is 2.
    full, missing = run_tools([
        ("debatchnorm.py", faults["deploy"], faults["good"], faults["deploy"], "/dev/full"),
        ("debatchnorm.py", faults["deploy"], tmp_path / "missing.caffemodel", faults["deploy"],
         tmp_path / "o.caffemodel")])
    assert full.returncode == FAILED and "No space left on device" in full.stderr, full.stderr
    assert len(glog_free(full.stderr)) == 1 and "Traceback" not in full.stderr
    assert missing.returncode == BAD_INPUT and "missing.caffemodel" in missing.stderr


def test_training_tools_check_their_solver_and_initial_weights(faults, tiny_detection_set,
                                                               tmp_path):
    solver = tmp_path / "solver.prototxt"
    solver.write_text('base_lr: 0.01\nlr_policy: "fixed\n')  # an unterminated string
    results = run_tools([
        ("train.py", "--solver", solver, "--out", tmp_path / "run", "--iters", "1"),
        ("train_detector.py", "--dataset", tiny_detection_set, "--init",
         faults["truncated.caffemodel"], "--out", tmp_path / "detector", "--iters", "1"),
    ])
    failures = [one_line_failure(result, name) for result, name in
                zip(results, (solver, faults["truncated.caffemodel"]))]
    assert not list(filter(None, failures))
