"""Maximal activations: streaming top-k, receptive fields from the prototxt, the run end to end."""
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from ctxpred.figures.activations import (ReceptiveField, StreamingTopK, masked_patch,
                                         receptive_fields, unit_activations)
from ctxpred.features.nets import read_deploy_param
from ctxpred.figures.max_activations import MaxActivationSettings, max_activations

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "max_activations.py"
DEPLOY = str(REPO / "prototxt" / "color_dropping" / "deploy.prototxt")


def test_streaming_top_k_over_chunks_equals_a_full_sort(rng):
    values = rng.normal(size=(500, 7)).astype(np.float32)  # continuous: no ties
    ys = rng.integers(0, 13, size=values.shape)
    xs = rng.integers(0, 13, size=values.shape)
    top = StreamingTopK(7, k=9)
    for start in range(0, 500, 37):
        stop = min(start + 37, 500)
        top.update(values[start:stop], np.arange(start, stop), ys[start:stop], xs[start:stop])
    expected = np.argsort(-values, axis=0)[:9].T  # (units, k) patch ids, best first
    np.testing.assert_array_equal(top.patch, expected)
    np.testing.assert_array_equal(top.values, np.take_along_axis(values.T, expected, axis=1))
    np.testing.assert_array_equal(top.y, np.take_along_axis(ys.T, expected, axis=1))
    np.testing.assert_array_equal(top.x, np.take_along_axis(xs.T, expected, axis=1))
    assert top.seen == 500
    again = StreamingTopK.from_state(top.state("a/"), "a/")
    for name in ("values", "patch", "y", "x", "seen"):
        np.testing.assert_array_equal(getattr(again, name), getattr(top, name))


def test_fewer_patches_than_k_leave_empty_slots():
    top = StreamingTopK(2, k=4)
    top.update(np.array([[1.0, 3.0], [2.0, 0.0]]), [10, 11])
    assert top.patch.tolist() == [[11, 10, -1, -1], [10, 11, -1, -1]]
    assert np.isneginf(top.values[:, 2:]).all()


def test_unit_activations_take_the_spatial_maximum(rng):
    data = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
    values, ys, xs = unit_activations(data)
    np.testing.assert_array_equal(values, data.max(axis=(2, 3)))
    n, c = np.indices((3, 4))
    np.testing.assert_array_equal(data[n, c, ys, xs], values)
    vector, zero_y, _ = unit_activations(data[:, :, 0, 0])
    np.testing.assert_array_equal(vector, data[:, :, 0, 0])
    assert not zero_y.any()


def independent_fields(layers, patch=96):
    """(size, jump, offset) after each (kernel, stride, pad) layer, by the textbook recursion."""
    size, jump, offset, fields = 1, 1, 0, []
    for kernel, stride, pad in layers:
        offset -= pad * jump
        size += (kernel - 1) * jump
        jump *= stride
        fields.append((size, jump, offset))
    return fields


def test_receptive_fields_of_the_color_dropping_net(caffe):
    param = read_deploy_param(DEPLOY)
    # conv1 11/4/5, pool1 3/2/0, conv2 5/1/2, pool2 3/2/0, conv3..5 3/1/1, pool5 3/2/0.
    chain = ["conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5"]
    expected = independent_fields([(11, 4, 5), (3, 2, 0), (5, 1, 2), (3, 2, 0),
                                   (3, 1, 1), (3, 1, 1), (3, 1, 1), (3, 2, 0)])
    for blob, (size, jump, offset) in zip(chain, expected):
        assert receptive_fields(param, blob) == ReceptiveField(size, jump, offset), blob
    assert receptive_fields(param, "conv1") == ReceptiveField(11, 4, -5)
    assert receptive_fields(param, "norm1") == receptive_fields(param, "pool1")
    assert receptive_fields(param, "norm2") == receptive_fields(param, "pool2")
    assert receptive_fields(param, "fc6") == ReceptiveField(96, 0, 0)
    assert receptive_fields(param, "fc6").window(0, 0, 96) == (0, 96, 0, 96)
    assert ReceptiveField(11, 4, -5).window(0, 2, 96) == (0, 6, 3, 14)
    with pytest.raises(ValueError, match="no blob"):
        receptive_fields(param, "fc7")


def test_masked_patch_is_black_outside_the_field(rng):
    pixels = rng.integers(1, 256, size=(96, 96, 3), dtype=np.uint8)
    masked = masked_patch(pixels, ReceptiveField(11, 4, -5), 3, 23)
    inside = np.zeros((96, 96), bool)
    inside[7:18, 87:96] = True
    np.testing.assert_array_equal(masked[inside], pixels[inside])
    assert not masked[~inside].any()


@pytest.fixture(scope="module")
def weights(random_deploy_weights):
    return random_deploy_weights(0)


def run(weights, photo_folder, out, patches, seed=0):
    return max_activations(MaxActivationSettings(
        weights=weights, images=str(photo_folder), deploy=DEPLOY, out=str(out), patches=patches,
        layers=("conv1", "conv5", "fc6"), units=4, batch=8, chunk=16, seed=seed))


def test_run_writes_pages_and_resumes(weights, photo_folder, tmp_path, page_parts):
    index, seen = run(weights, photo_folder, tmp_path / "once", 64)
    assert index == tmp_path / "once" / "index.html" and seen == 64
    index = tmp_path / "once" / "index.html"
    assert {Path(unquote(url)).name for url in page_parts(index).links} == {
        "conv1.html", "conv5.html", "fc6.html"}
    param = read_deploy_param(DEPLOY)
    with np.load(tmp_path / "once" / "state.npz") as state:
        assert int(state["conv1/seen"]) == 64 and state["fc6/patch"].shape == (4, 9)
        conv1_y, conv1_x = int(state["conv1/y"][0, 0]), int(state["conv1/x"][0, 0])
    for layer in ("conv1", "conv5", "fc6"):
        page = tmp_path / "once" / f"{layer}.html"
        sources = page_parts(page).sources
        assert len(sources) == 4 * 9
        files = [(page.parent / unquote(url)).resolve() for url in sources]
        assert all(path.is_file() for path in files)
        if layer == "conv1":  # unit 0's best patch: black outside its 11-pixel field
            top, bottom, left, right = receptive_fields(param, "conv1").window(
                conv1_y, conv1_x, 96)
            pixels = np.asarray(Image.open(files[0]))
            outside = np.ones((96, 96), bool)
            outside[top:bottom, left:right] = False
            assert not pixels[outside].any() and pixels[~outside].any()
    # Half the patches, then all of them, into one folder: the same top 9 as one run.
    run(weights, photo_folder, tmp_path / "twice", 32)
    with np.load(tmp_path / "twice" / "state.npz") as state:
        assert int(state["fc6/seen"]) == 32
    run(weights, photo_folder, tmp_path / "twice", 64)
    with np.load(tmp_path / "once" / "state.npz") as once, \
            np.load(tmp_path / "twice" / "state.npz") as twice:
        for layer in ("conv1", "conv5", "fc6"):
            for name in ("patch", "y", "x", "seen"):
                np.testing.assert_array_equal(twice[f"{layer}/{name}"], once[f"{layer}/{name}"])
            np.testing.assert_allclose(twice[f"{layer}/values"], once[f"{layer}/values"],
                                       rtol=1e-5)
    # Another seed into the same folder: refused, the state is left alone.
    state = (tmp_path / "twice" / "state.npz").read_bytes()
    with pytest.raises(ValueError, match="another seed"):
        run(weights, photo_folder, tmp_path / "twice", 64, seed=1)
    assert (tmp_path / "twice" / "state.npz").read_bytes() == state


def test_tool_command_line(weights, photo_folder, tmp_path):
    """The tool's flags reach the run; a state of another seed is bad input (exit 2)."""
    flags = [sys.executable, str(TOOL), "--weights", weights, "--images", str(photo_folder),
             "--layers", "conv1,fc6", "--patches", "16", "--units", "2", "--batch", "8",
             "--out", str(tmp_path)]
    done = subprocess.run(flags, capture_output=True, text=True)
    assert done.returncode == 0 and "(2 layers, 16 patches)" in done.stdout, done.stderr
    assert {path.name for path in tmp_path.glob("*.html")} == {"conv1.html", "fc6.html",
                                                                "index.html"}
    refused = subprocess.run(flags + ["--seed", "1"], capture_output=True, text=True)
    assert refused.returncode == 2 and "another seed" in refused.stderr
    assert "--layers" in subprocess.run([sys.executable, str(TOOL), "--help"],
                                        capture_output=True, text=True, check=True).stdout
