"""Feature extraction: input convention, streaming to HDF5 / .npy, weight checks, dense maps."""
import subprocess
import sys
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import skimage.data
import skimage.io

from ctxpred.caffe.geometry import net_stride
from ctxpred.features.dense import dense_features, DenseFeatureNet
from ctxpred.features.extractor import FeatureExtractor
from ctxpred.features.nets import read_deploy_param, WeightMismatchError
from ctxpred.features.patches import listed_patches, read_patch_list, sampled_patches
from ctxpred.features.streaming import ExtractionSummary, patch_batches, stream_features
from ctxpred.features.writers import open_feature_writer
from ctxpred.data.images import open_source
from ctxpred.models.context import MEAN_RGB, NET_NAMES
from ctxpred.data.preprocess import apply_augmentations, crop_patches, draw_augmentations
from ctxpred.weights.files import read_weights, write_weights

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "extract_features.py"
DEPLOY = str(REPO / "prototxt" / "color_dropping" / "deploy.prototxt")


@pytest.fixture(scope="module")
def weights(caffe, tmp_path_factory):
    """Random weights of the colour-dropping deploy net, biases non-zero (as trained ones are)."""
    net = caffe.Net(DEPLOY, caffe.TEST)
    rng = np.random.default_rng(0)
    for blobs in net.params.values():
        blobs[1].data[...] = rng.normal(0, 0.1, blobs[1].data.shape)
    path = tmp_path_factory.mktemp("weights") / "color_dropping.caffemodel"
    net.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def extractor(weights):
    return FeatureExtractor(DEPLOY, weights, batch=4)


def run_tool(*argv):
    """tools/extract_features.py run as a command: the CompletedProcess."""
    return subprocess.run([sys.executable, str(TOOL), *map(str, argv)], capture_output=True,
                          text=True, cwd=REPO)


def assert_close(actual, expected):
    """Equal up to float32 summation order (Caffe's GEMMs change it with the batch size)."""
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def astronaut_patches(count=6):
    corners = np.array([[0, 0], [100, 150], [300, 40], [200, 400], [10, 300], [416, 416]])
    return crop_patches(skimage.data.astronaut(), corners[:count], 96)


def direct_fc6(caffe, weights, chw):
    """fc6 of (N, 3, 96, 96) float input blobs by a plain pycaffe forward of the deploy net."""
    net = caffe.Net(DEPLOY, caffe.TEST, weights=weights)
    net.blobs["data"].reshape(*chw.shape)
    net.blobs["data"].data[...] = chw
    return net.forward()["fc6"].copy()


def test_features_equal_a_direct_pycaffe_forward(caffe, weights, extractor):
    patches = astronaut_patches()  # 6 patches in batches of 4: one full, one partial
    mean_subtracted = (patches.astype(np.float64) - MEAN_RGB).transpose(0, 3, 1, 2)
    features = extractor.extract(patches)
    assert features.shape == (6, 4096) and features.dtype == np.float32
    assert_close(features, direct_fc6(caffe, weights, mean_subtracted))
    assert extractor.ignored_layers == [] and extractor.stride == 32


def test_released_convention_equals_training_input_and_is_scale_invariant(caffe, weights,
                                                                          extractor):
    patches = astronaut_patches(4)
    features = extractor.extract(patches)
    # The training pipeline's input for the projection colour mode without resampling is
    # RGB - mean; the reference then scales each patch to RMS 50 (here done outside the net).
    augmentations = draw_augmentations(4, np.random.default_rng(1), resample_probability=0,
                                       mode="projection")
    training = apply_augmentations(patches, augmentations, MEAN_RGB).astype(np.float64)
    normalised = training * 50 / np.sqrt((training ** 2).mean(axis=(1, 2, 3), keepdims=True))
    for scaled in (normalised, 3 * training, training):
        assert_close(direct_fc6(caffe, weights, scaled), features)


def test_hdf5_rows_paths_and_boxes(caffe, weights, extractor, photo_folder, tmp_path):
    out = tmp_path / "f.h5"
    result = run_tool("--weights", weights, "--images", photo_folder, "--out", out,
                      "--patches-per-image", "3", "--batch", "4", "--seed", "5")
    assert result.returncode == 0, result.stderr
    source = open_source(str(photo_folder))
    with h5py.File(out, "r") as file:
        features, boxes = file["features"][:], file["box"][:]
        images = [name.decode() for name in file["image"][:]]
        assert file["features"].maxshape == (None, 4096)  # grown as rows arrive
        assert file.attrs["layer"] == "fc6" and file.attrs["weights"] == weights
        assert file.attrs["net"] == "color_dropping"
        assert tuple(file.attrs["feature_shape"]) == (4096,)
        np.testing.assert_array_equal(file["scale"][:], 1)
    assert features.shape == (12, 4096)
    assert images == [source.name(i) for i in range(4) for _ in range(3)]
    np.testing.assert_array_equal(boxes[:, 2:], 96)
    for row in (0, 5, 11):
        image = skimage.io.imread(images[row])
        x, y = boxes[row, :2]
        assert 0 <= x <= image.shape[1] - 96 and 0 <= y <= image.shape[0] - 96
        expected = extractor.extract(image[np.newaxis, y:y + 96, x:x + 96])[0]
        assert_close(features[row], expected)


def test_grid_patch_file_and_npy(extractor, photo_folder, tmp_path):
    source = open_source(str(photo_folder))
    items = list(sampled_patches(source, "grid"))
    for item in items:
        image = skimage.io.imread(item.name)
        assert len(item.boxes) == (image.shape[0] // 96) * (image.shape[1] // 96)
        assert not (item.boxes[:, :2] % 96).any()
    listing = tmp_path / "boxes.csv"
    listing.write_text(f"image_path,x,y\n# a comment\n{source.name(1)},10,20\n"
                       f"{source.name(1)}, 0, 0\n{source.name(0)},5,7\n")
    runs = read_patch_list(listing)
    assert [(run.path, run.lines) for run in runs] == [(source.name(1), (3, 4)),
                                                      (source.name(0), (5,))]
    with open_feature_writer(tmp_path / "f.npy", extractor.dim) as writer:
        summary = stream_features(extractor, listed_patches(runs), writer)
    assert summary.rows == 3 and not (tmp_path / "f.npy.part").exists()
    features = np.load(tmp_path / "f.npy")
    image = skimage.io.imread(source.name(1))
    assert_close(features[0], extractor.extract(image[None, 20:116, 10:106])[0])
    listing.write_text(f"{source.name(0)} 500 0\n")
    with pytest.raises(ValueError, match=r"line 1: a 96-pixel patch at x=500, y=0 leaves"):
        list(listed_patches(read_patch_list(listing)))


def test_streaming_memory_is_flat_in_the_number_of_images(caffe, photo_folder, tmp_path):
    # A cheap net with 4096-float rows (16 KiB): accumulating them would show at once.
    deploy = tmp_path / "tiny.prototxt"
    deploy.write_text(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 '
        'dim: 96 dim: 96 } } }\nlayer { name: "pool" type: "Pooling" bottom: "data" top: "pool" '
        'pooling_param { pool: AVE kernel_size: 24 stride: 24 } }\nlayer { name: "fc6" '
        'type: "InnerProduct" bottom: "pool" top: "fc6" inner_product_param { num_output: 4096 '
        'weight_filler { type: "xavier" } } }\n')
    net = caffe.Net(str(deploy), caffe.TEST)
    net.save(str(tmp_path / "tiny.caffemodel"))
    tiny = FeatureExtractor(str(deploy), str(tmp_path / "tiny.caffemodel"), batch=32)
    names = sorted(str(path) for path in photo_folder.iterdir())

    def peak_bytes(repeats):
        listing = tmp_path / f"list{repeats}.txt"
        listing.write_text("\n".join(names * repeats) + "\n")
        tracemalloc.start()
        with open_feature_writer(tmp_path / f"f{repeats}.h5", tiny.dim, flush_rows=64) as writer:
            summary = stream_features(tiny, sampled_patches(open_source(str(listing)), "random",
                                                            per_image=40), writer)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert summary.rows == 4 * repeats * 40
        return peak

    small, large = peak_bytes(2), peak_bytes(10)  # 320 vs 1600 rows: 5 vs 25 MiB of features
    assert large < small + 2 * 2 ** 20, (small, large)
    with h5py.File(tmp_path / "f10.h5", "r") as file:
        assert file["features"].shape == (1600, 4096) and file["features"].chunks[0] < 1600


def test_mismatched_weights_are_reported_layer_by_layer(weights, tmp_path, photo_folder):
    params = read_weights(weights)
    params["conv1"][0] = params["conv1"][0][:, :1]
    params["fc6"][0] = np.zeros((4096, 9216), np.float32)
    bad = write_weights(params, tmp_path / "bad.caffemodel")
    with pytest.raises(WeightMismatchError) as error:
        FeatureExtractor(DEPLOY, str(bad))
    message = str(error.value)
    assert ("conv1: the deploy net has (96, 3, 11, 11) + (96,), the weights (96, 1, 11, 11)"
            in message)
    assert "fc6: the deploy net has (4096, 2304) + (4096,), the weights (4096, 9216)" in message
    # In a process of its own: Caffe must never get to abort on the shapes.
    result = run_tool("--weights", bad, "--images", photo_folder, "--out", tmp_path / "f.h5")
    assert result.returncode == 2, result.stderr
    assert "conv1: the deploy net has" in result.stderr and "fc6:" in result.stderr
    assert not (tmp_path / "f.h5").exists()


def test_weights_without_fc6_give_pool5_only(weights, tmp_path):
    params = read_weights(weights)
    del params["fc6"]
    params["fc7"] = [np.zeros((2, 3), np.float32)]
    no_fc6 = str(write_weights(params, tmp_path / "no_fc6.caffemodel"))
    with pytest.raises(WeightMismatchError, match=r"no weights for fc6.*such as 'pool5'"):
        FeatureExtractor(DEPLOY, no_fc6)
    pool5 = FeatureExtractor(DEPLOY, no_fc6, layer="pool5")
    assert pool5.feature_shape == (256, 3, 3) and pool5.dim == 2304
    assert pool5.ignored_layers == ["fc7"]
    assert pool5.extract(astronaut_patches(1)).shape == (1, 2304)


def test_missing_files_and_help(weights, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.caffemodel"):
        FeatureExtractor(DEPLOY, str(tmp_path / "missing.caffemodel"))
    with pytest.raises(FileNotFoundError, match="nowhere.prototxt"):
        FeatureExtractor(str(tmp_path / "nowhere.prototxt"), weights)
    cases = [(["--weights", str(tmp_path / "w.caffemodel"), "--images", ".", "--out", "f.h5"],
              "w.caffemodel does not exist"),
             (["--weights", weights, "--patches", "rows.csv", "--out", "f.h5"],
              "--patches is neither"),
             (["--weights", weights, "--out", "f.h5"], "--images is required"),
             (["--weights", weights, "--images", ".", "--out", "f.txt"], "--out must end")]
    for argv, message in cases:
        result = run_tool(*argv)
        assert result.returncode == 2 and message in result.stderr
    result = run_tool("--weights", weights, "--images", tmp_path / "none", "--out",
                      tmp_path / "f.h5")
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert not (tmp_path / "f.h5").exists()
    result = run_tool("--help")
    assert result.returncode == 0
    for flag in ("--weights", "--net", "--deploy", "--layer", "--images", "--out", "--patches",
                 "--patches-per-image", "--max-pixels", "--batch", "--seed", "--gpu"):
        assert flag in result.stdout


def test_stride_is_read_from_the_prototxt_and_legacy_input_headers(tmp_path):
    for name in NET_NAMES:
        assert net_stride(read_deploy_param(REPO / "prototxt" / name / "deploy.prototxt")) == 32
    text = Path(DEPLOY).read_text()
    body = text[text.index("layer {\n  name: \"data_sumsq\""):]
    legacy = tmp_path / "legacy.prototxt"
    legacy.write_text('input: "data"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 96\ninput_dim: 96\n'
                      + body)
    param = read_deploy_param(legacy)
    assert param.layer[0].type == "Input" and list(param.layer[0].input_param.shape[0].dim) == [
        1, 3, 96, 96]
    assert [layer.name for layer in param.layer[1:]] == [
        layer.name for layer in read_deploy_param(DEPLOY).layer[1:]]


def test_dense_features_are_the_windows_features(caffe, weights, extractor):
    image = skimage.data.astronaut()[:96 + 2 * 32 + 7, :96 + 3 * 32 + 31]
    dense = dense_features(extractor, image)
    assert dense.shape == (3, 4, 4096)
    for row, col in ((0, 0), (2, 3), (1, 2)):
        window = image[32 * row:32 * row + 96, 32 * col:32 * col + 96]
        chw = (window.astype(np.float64) - MEAN_RGB).transpose(2, 0, 1)[np.newaxis]
        assert_close(dense[row, col], direct_fc6(caffe, weights, chw)[0])


def test_dense_net_surgery(extractor):
    """Exact: the converted fc6 on pool5 blocks, and the whole net on a 96x96 image."""
    image = skimage.data.astronaut()[:96 + 2 * 32 + 7, :96 + 3 * 32 + 31]
    dense_net = DenseFeatureNet(extractor, *image.shape[:2])
    assert dense_net.stride == 32 and (dense_net.rows, dense_net.cols) == (3, 4)
    assert [layer.type for layer in dense_net.param.layer if layer.name == "fc6"] == ["Convolution"]
    feature_map = dense_net.forward(image)
    weight, bias = (blob.data for blob in extractor.net.params["fc6"])
    pool5 = dense_net.net.blobs["pool5"].data[0]
    for row in range(3):
        for col in range(4):
            block = pool5[:, row:row + 3, col:col + 3].ravel()
            assert_close(feature_map[row, col], weight @ block + bias)
    window = image[:96, :96]
    assert_close(DenseFeatureNet(extractor, 96, 96).forward(window)[0, 0],
                               extractor.extract(window[np.newaxis])[0])


def test_dense_net_is_not_patchwise_even_without_normalisation(caffe, weights, extractor):
    """Zero padding at each window's edge (not the normalisation alone) breaks exactness.

    Both nets are run from conv1 on the same un-normalised pixels: the dense
    map still differs from the window's own tower output.
    """
    image = skimage.data.astronaut()[:96 + 64, :96 + 64]
    dense_net = DenseFeatureNet(extractor, *image.shape[:2])
    pixels = (image.astype(np.float32) - MEAN_RGB).transpose(2, 0, 1)[np.newaxis] / 3
    dense_net.net.blobs["data_normalised"].data[...] = pixels
    dense_net.net.forward(start="conv1")
    patchwise = caffe.Net(DEPLOY, caffe.TEST, weights=weights)
    patchwise.blobs["data_normalised"].data[...] = pixels[..., 32:128, 32:128]
    expected = patchwise.forward(start="conv1")["fc6"][0]
    centre = dense_net.net.blobs["fc6"].data[0, :, 1, 1]
    assert np.abs(centre - expected).max() > 0.05 * np.abs(expected).max()


def test_snapshot_batchnorm_is_folded_into_the_deploy_net(caffe, tmp_path, rng):
    """fc6 of a BatchNorm snapshot equals the TEST phase of the net with its BatchNorm layers."""
    from ctxpred.models.context import NetOptions, deploy_net, snapshot_param
    with_bn = tmp_path / "deploy_bn.prototxt"
    with_bn.write_text(str(deploy_net("color_dropping", NetOptions(batchnorm=True))))
    caffe.set_random_seed(3)
    net = caffe.Net(str(with_bn), caffe.TEST)
    for name, layer in net.params.items():
        if name.startswith("bn"):
            channels = layer[0].data.shape[0]
            layer[0].data[...] = rng.normal(0, 0.5, channels)
            layer[1].data[...] = rng.uniform(0.5, 2, channels)
            layer[2].data[...] = 1.0
    snapshot = tmp_path / "snapshot.caffemodel"
    net.save(str(snapshot))
    patches = rng.integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    reference = FeatureExtractor(with_bn, snapshot).extract(patches)
    deploy = REPO / "prototxt" / "color_dropping" / "deploy.prototxt"
    folded = FeatureExtractor(deploy, snapshot, train_param=snapshot_param("color_dropping"))
    assert folded.ignored_layers == []
    assert np.allclose(folded.extract(patches), reference, rtol=1e-4,
                       atol=1e-4 * np.abs(reference).max())
    ignored = FeatureExtractor(deploy, snapshot)
    assert {"bn3", "bn6"} <= set(ignored.ignored_layers)
    assert not np.allclose(ignored.extract(patches), reference, atol=1e-2)


def test_patch_batches_regroup_the_stream_with_skip_and_stop(photo_folder):
    """Batches hold the stream's patches in order, numbered from 0 over the whole stream."""
    source = open_source(str(photo_folder))
    items = list(sampled_patches(source, "random", per_image=5, seed=3))
    flat = np.concatenate([item.patches for item in items])
    names = [item.name for item in items for _ in item.patches]
    summary = ExtractionSummary()
    batches = list(patch_batches(iter(items), 4, 96, summary, skip=3, stop=17))
    assert [batch.first for batch in batches] == [3, 7, 11, 15]
    assert [len(batch.pixels) for batch in batches] == [4, 4, 4, 2]
    got = np.concatenate([batch.pixels.copy() for batch in patch_batches(items, 4, 96, skip=3,
                                                                         stop=17)])
    np.testing.assert_array_equal(got, flat[3:17])
    assert [name for batch in batches for name in batch.names] == names[3:17]
    assert summary.images == 4  # the 4th image holds patches 15..19: reached, then stopped
