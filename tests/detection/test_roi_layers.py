"""ROIPooling and SmoothL1Loss Python layers: the Fast R-CNN fork's semantics on real Caffe."""
import json

import numpy as np
import pytest

from ctxpred.detection import roi_layers
from ctxpred.detection.roi_layers import (parse_roi_pooling_params, parse_smooth_l1_params,
                                roi_pool_backward, roi_pool_forward, smooth_l1_loss)

# Batch item 0, channel 0 holds its own flat index (5h + w), so that a
# maximum's value is its argmax; channel 1 is the negation (maxima top-left).
# Batch item 1 is the same plus 100.
HEIGHT, WIDTH = 4, 5
_RAMP = np.arange(HEIGHT * WIDTH, dtype=np.float32).reshape(HEIGHT, WIDTH)
FEATURES = np.stack([np.stack([_RAMP, -_RAMP]), np.stack([_RAMP + 100, -_RAMP - 100])])


def python_net(caffe, tmp_path, inputs, layer, param_str="", loss_weight=None):
    """A TRAIN net of Input blobs feeding one ctxpred.detection.roi_layers Python layer (top "out").

    force_backward makes Caffe run the layer's backward into the Input blobs.
    """
    n = caffe.NetSpec()
    blobs = caffe.layers.Input(shape=[dict(dim=list(shape)) for shape in inputs.values()],
                               ntop=len(inputs))
    blobs = blobs if len(inputs) > 1 else (blobs,)
    for name, blob in zip(inputs, blobs):
        setattr(n, name, blob)
    extra = {} if loss_weight is None else {"loss_weight": loss_weight}
    n.out = caffe.layers.Python(*blobs, python_param=dict(
        module="ctxpred.detection.roi_layers", layer=layer, param_str=param_str), **extra)
    proto = n.to_proto()
    proto.force_backward = True
    path = tmp_path / f"{layer}.prototxt"
    path.write_text(str(proto))
    return caffe.Net(str(path), caffe.TRAIN)


def roi_net(caffe, tmp_path, features, rois, pooled=(2, 2), spatial_scale=1.0):
    params = {"pooled_h": pooled[0], "pooled_w": pooled[1], "spatial_scale": spatial_scale}
    net = python_net(caffe, tmp_path, {"features": features.shape, "rois": rois.shape},
                     "ROIPooling", json.dumps(params))
    net.blobs["features"].data[...] = features
    net.blobs["rois"].data[...] = rois
    return net


def test_roi_pooling_hand_computed(caffe, tmp_path):
    rois = np.array([
        # Whole map at 1/16: x 0..63 -> cells 0..4 (3.9375 rounds to 4), y 0..47 -> 0..3.
        # Columns split [0, 3) and [2, 5) (bin width 2.5), rows [0, 2) and [2, 4).
        [0, 0, 0, 63, 47],
        # Batch item 1; C's round takes halves away from zero: 8/16 -> 1, 40/16 -> 3,
        # 24/16 -> 2 (numpy's round would give 0, 2, 2). Cells x 1..3, y 1..2.
        [1, 8, 8, 40, 24],
        # Partly above and left of the map: -40/16 = -2.5 -> -3, 8/16 -> 1, so 5 x 5
        # cells from -3; bins [-3, 0) are empty, [-1, 2) clip to [0, 2).
        [0, -40, -40, 8, 8],
        # Partly below and right: cells x 3..6 (100/16 = 6.25 -> 6), y 2..6; only the
        # bin at rows [2, 4), columns [3, 5) meets the map.
        [0, 48, 32, 100, 100],
    ], dtype=np.float32)
    net = roi_net(caffe, tmp_path, FEATURES, rois, spatial_scale=1 / 16)
    net.forward()
    pooled = net.blobs["out"].data
    pooled_numpy, argmax = roi_pool_forward(FEATURES, rois, 2, 2, 1 / 16)
    np.testing.assert_array_equal(pooled, pooled_numpy)

    expected_argmax = np.array([
        [[[7, 9], [17, 19]], [[0, 2], [10, 12]]],
        [[[7, 8], [12, 13]], [[6, 7], [11, 12]]],
        [[[-1, -1], [-1, 6]], [[-1, -1], [-1, 0]]],
        [[[19, -1], [-1, -1]], [[13, -1], [-1, -1]]],
    ])
    np.testing.assert_array_equal(argmax, expected_argmax)
    offset = np.array([0, 100, 0, 0])[:, None, None, None]
    channel_sign = np.array([1, -1])[None, :, None, None]
    expected_pooled = np.where(expected_argmax < 0, 0,
                               channel_sign * (expected_argmax + offset))
    np.testing.assert_array_equal(pooled, expected_pooled)


def test_roi_pooling_backward_accumulates_overlapping_rois(caffe, tmp_path):
    # The same RoI twice, and a third whose bin (1, 1) also peaks at cell 19.
    rois = np.array([[0, 0, 0, 4, 3], [0, 0, 0, 4, 3], [0, 3, 2, 4, 3]], dtype=np.float32)
    net = roi_net(caffe, tmp_path, FEATURES, rois)
    net.forward()
    top_diff = np.arange(1, 1 + rois.shape[0] * 2 * 2 * 2, dtype=np.float32).reshape(3, 2, 2, 2)
    net.blobs["out"].diff[...] = top_diff
    net.backward()
    gradient = net.blobs["features"].diff

    # Channel 0 of RoIs 0 and 1 peaks at cells 7, 9, 17, 19; RoI 2 (cells x 3..4,
    # y 2..3, one cell per bin) at 13, 14, 18, 19.
    expected = np.zeros_like(FEATURES)
    for roi, cells in ((0, [7, 9, 17, 19]), (1, [7, 9, 17, 19]), (2, [13, 14, 18, 19])):
        expected[0, 0].flat[cells] += top_diff[roi, 0].ravel()
    # Channel 1 peaks top-left of each bin: 0, 2, 10, 12 and 13, 14, 18, 19.
    for roi, cells in ((0, [0, 2, 10, 12]), (1, [0, 2, 10, 12]), (2, [13, 14, 18, 19])):
        expected[0, 1].flat[cells] += top_diff[roi, 1].ravel()
    np.testing.assert_array_equal(gradient, expected)
    # Cell 19 = (3, 4) is the maximum of bin (1, 1) of all three RoIs: 4 + 12 + 20.
    assert gradient[0, 0, 3, 4] == 36
    np.testing.assert_array_equal(
        gradient, roi_pool_backward(top_diff, roi_pool_forward(FEATURES, rois, 2, 2, 1.0)[1],
                                    rois, FEATURES.shape, 1.0))


def test_roi_pooling_gradient_matches_finite_differences(caffe, tmp_path):
    rng = np.random.default_rng(7)
    shape = (2, 3, 6, 7)
    # Distinct values 0.1 apart: a 0.01 step never changes which cell is a maximum.
    features = (rng.permutation(np.prod(shape)) * 0.1).reshape(shape).astype(np.float32)
    rois = np.array([[0, 0, 0, 111, 95],      # the whole map at 1/16
                     [1, 20, 10, 70, 60],     # overlaps the next one
                     [1, 8, 24, 90, 150],     # partly outside
                     [0, -30, -20, 40, 30]], dtype=np.float32)
    net = roi_net(caffe, tmp_path, features, rois, pooled=(3, 2), spatial_scale=1 / 16)
    net.forward()
    weights = rng.normal(size=net.blobs["out"].data.shape)
    net.blobs["out"].diff[...] = weights
    net.backward()
    analytic = net.blobs["features"].diff.copy()

    step = 0.01
    numeric = np.zeros(shape)
    for index in np.ndindex(*shape):
        objective = []
        for sign in (1, -1):
            perturbed = features.copy()
            perturbed[index] += sign * step
            net.blobs["features"].data[...] = perturbed
            net.forward()
            objective.append(np.sum(net.blobs["out"].data.astype(np.float64) * weights))
        numeric[index] = (objective[0] - objective[1]) / (2 * step)
    assert np.count_nonzero(analytic) > 20
    np.testing.assert_allclose(analytic, numeric, rtol=1e-3, atol=1e-3)


def fork_roi_pool(features, rois, pooled_h, pooled_w, spatial_scale):
    """A loop-by-loop transcription of the fork's ROIPoolingLayer::Forward_cpu."""
    _, channels, height, width = features.shape
    f32 = np.float32
    pooled = np.zeros((len(rois), channels, pooled_h, pooled_w), np.float32)
    argmax = np.full(pooled.shape, -1)
    for r, (batch, *corners) in enumerate(rois):
        x1, y1, x2, y2 = (int(np.sign(v) * np.floor(abs(float(v)) + 0.5))
                          for v in np.float32(corners) * f32(spatial_scale))
        bin_h = f32(max(y2 - y1 + 1, 1)) / f32(pooled_h)
        bin_w = f32(max(x2 - x1 + 1, 1)) / f32(pooled_w)
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                h0 = min(max(int(np.floor(f32(ph) * bin_h)) + y1, 0), height)
                h1 = min(max(int(np.ceil(f32(ph + 1) * bin_h)) + y1, 0), height)
                w0 = min(max(int(np.floor(f32(pw) * bin_w)) + x1, 0), width)
                w1 = min(max(int(np.ceil(f32(pw + 1) * bin_w)) + x1, 0), width)
                for c in range(channels):
                    best = -np.inf
                    for h in range(h0, h1):
                        for w in range(w0, w1):
                            if features[int(batch), c, h, w] > best:
                                best = features[int(batch), c, h, w]
                                argmax[r, c, ph, pw] = h * width + w
                    pooled[r, c, ph, pw] = best if h1 > h0 and w1 > w0 else 0
    return pooled, argmax


def test_roi_pooling_matches_the_forks_loops_with_ties(monkeypatch):
    rng = np.random.default_rng(3)
    # Small integers: many exactly tied maxima, as after a ReLU.
    features = rng.integers(0, 4, size=(2, 3, 9, 11)).astype(np.float32)
    corners = rng.uniform(-40, 200, size=(40, 4))
    rois = np.column_stack([rng.integers(0, 2, 40), corners]).astype(np.float32)
    for pooled_h, pooled_w in ((7, 7), (6, 4), (2, 3)):
        expected = fork_roi_pool(features, rois, pooled_h, pooled_w, 1 / 16)
        pooled, argmax = roi_pool_forward(features, rois, pooled_h, pooled_w, 1 / 16)
        np.testing.assert_array_equal(pooled, expected[0])
        np.testing.assert_array_equal(argmax, expected[1])
    # One RoI per gathered group gives the same result.
    monkeypatch.setattr(roi_layers, "GATHER_BUDGET", 1)
    np.testing.assert_array_equal(roi_pool_forward(features, rois, 2, 3, 1 / 16)[1], argmax)


def test_roi_pooling_keeps_the_forks_edge_cases():
    # 7 bins over 57 rows: float32 makes the last bin end at ceil(7 * (57/7)) = 58,
    # one row past the RoI's last row 56. The fork pools that row but passes it
    # no gradient; we put the column's maximum there.
    features = np.zeros((1, 1, 60, 1), dtype=np.float32)
    features[0, 0, 57, 0] = 5
    features[0, 0, 50, 0] = 3
    # The second RoI has x2 < x1: it pools the cell at (y1, x1) without gradient.
    rois = np.array([[0, 0, 0, 0, 56], [0, 0, 50, -2, 50]], dtype=np.float32)
    pooled, argmax = roi_pool_forward(features, rois, 7, 1, 1.0)
    assert pooled[0, 0, 6, 0] == 5 and argmax[0, 0, 6, 0] == 57
    np.testing.assert_array_equal(pooled[1, 0, :, 0], 3)
    gradient = roi_pool_backward(np.ones_like(pooled), argmax, rois, features.shape, 1.0)
    assert gradient[0, 0, 57, 0] == 0 and gradient[0, 0, 50, 0] == 0
    assert gradient.sum() == 6  # bins 0..5 of the first RoI, at their first rows (all 0)


@pytest.mark.parametrize("loss_weight", [1, 2])
def test_smooth_l1_hand_computed(caffe, tmp_path, loss_weight):
    pred = np.array([[0.5, -2.0, 3.0, 0.25], [1.5, 0.0, -0.5, 4.0]], dtype=np.float32)
    targets = np.array([[0.0, 0.0, 1.0, 0.0], [0.0, 0.5, 0.0, 0.0]], dtype=np.float32)
    weights = np.array([[1, 1, 0, 1], [1, 1, 1, 0]], dtype=np.float32)
    # Differences 0.5, -2, (masked), 0.25 | 1.5, -0.5, -0.5, (masked):
    # 0.125 + 1.5 + 0 + 0.03125 + 1.0 + 0.125 + 0.125 + 0, over N = 2.
    expected_loss = (0.125 + 1.5 + 0.03125 + 1.0 + 0.125 + 0.125) / 2
    expected_gradient = np.array([[0.5, -1, 0, 0.25], [1, -0.5, -0.5, 0]]) / 2
    loss, gradient = smooth_l1_loss(pred, targets, weights)
    assert loss == pytest.approx(expected_loss)
    np.testing.assert_allclose(gradient, expected_gradient)

    net = python_net(caffe, tmp_path, {"pred": pred.shape, "targets": pred.shape,
                                       "weights": pred.shape}, "SmoothL1Loss",
                     loss_weight=loss_weight)
    for name, values in (("pred", pred), ("targets", targets), ("weights", weights)):
        net.blobs[name].data[...] = values
    assert net.forward()["out"] == pytest.approx(expected_loss)
    net.backward()
    np.testing.assert_allclose(net.blobs["pred"].diff, loss_weight * expected_gradient)
    np.testing.assert_allclose(net.blobs["targets"].diff, -loss_weight * expected_gradient)


@pytest.mark.parametrize("loss_weight", [1, 2])
def test_smooth_l1_gradient_matches_finite_differences(caffe, tmp_path, loss_weight):
    rng = np.random.default_rng(11)
    shape = (4, 8)
    # |pred - target| in [0.1, 0.8] or [1.3, 3]: a 0.01 step never crosses |x| = 1.
    magnitude = np.where(rng.random(shape) < 0.5, rng.uniform(0.1, 0.8, shape),
                         rng.uniform(1.3, 3.0, shape))
    targets = rng.normal(size=shape).astype(np.float32)
    pred = (targets + rng.choice([-1, 1], shape) * magnitude).astype(np.float32)
    weights = (rng.random(shape) < 0.7).astype(np.float32)
    net = python_net(caffe, tmp_path, {"pred": shape, "targets": shape, "weights": shape},
                     "SmoothL1Loss", loss_weight=loss_weight)
    net.blobs["targets"].data[...] = targets
    net.blobs["weights"].data[...] = weights
    net.blobs["pred"].data[...] = pred
    net.forward()
    net.backward()
    analytic = net.blobs["pred"].diff.copy()

    step = 0.01
    numeric = np.zeros(shape)
    for index in np.ndindex(*shape):
        objective = []
        for sign in (1, -1):
            perturbed = pred.copy()
            perturbed[index] += sign * step
            net.blobs["pred"].data[...] = perturbed
            objective.append(loss_weight * float(net.forward()["out"]))
        numeric[index] = (objective[0] - objective[1]) / (2 * step)
    assert np.count_nonzero(analytic) == np.count_nonzero(weights)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-3, atol=1e-4)


def test_smooth_l1_sigma_and_outside_weights(caffe, tmp_path):
    # py-faster-rcnn's 4-bottom form: sigma 3 puts the kink at |x| = 1/9.
    pred = np.array([[0.1, 0.5]], dtype=np.float32)
    targets = np.zeros_like(pred)
    inside = np.ones_like(pred)
    outside = np.array([[2.0, 0.5]], dtype=np.float32)
    expected_loss = 2 * 0.5 * 9 * 0.01 + 0.5 * (0.5 - 0.5 / 9)
    expected_gradient = np.array([[2 * 9 * 0.1, 0.5 * 1]])
    net = python_net(caffe, tmp_path, {"pred": pred.shape, "targets": pred.shape,
                                       "inside": pred.shape, "outside": pred.shape},
                     "SmoothL1Loss", json.dumps({"sigma": 3}), loss_weight=1)
    for name, values in (("pred", pred), ("targets", targets), ("inside", inside),
                         ("outside", outside)):
        net.blobs[name].data[...] = values
    assert net.forward()["out"] == pytest.approx(expected_loss, rel=1e-6)
    net.backward()
    np.testing.assert_allclose(net.blobs["pred"].diff, expected_gradient, rtol=1e-6)


@pytest.mark.parametrize("param_str, message", [
    ('{"pooled_h": 6, "pooled_w": 6}', r"lacks \['spatial_scale'\]"),
    ('{"pooled_h": 6, "pooled_w": 6, "spatial_scale": 0.0625, "scale": 1}',
     r"unknown key\(s\) \['scale'\]"),
    ('{"pooled_h": 0, "pooled_w": 6, "spatial_scale": 0.0625}', "pooled_h must be a positive"),
    ('{"pooled_h": 6, "pooled_w": 2.5, "spatial_scale": 0.0625}', "pooled_w must be a positive"),
    ('{"pooled_h": true, "pooled_w": 6, "spatial_scale": 0.0625}', "pooled_h must be a positive"),
    ('{"pooled_h": 6, "pooled_w": 6, "spatial_scale": "1/16"}', "spatial_scale must be"),
    ('{"pooled_h": 6, "pooled_w": 6, "spatial_scale": -1}', "spatial_scale must be"),
    ("pooled_h: 6", "not valid JSON"),
])
def test_bad_roi_pooling_param_str(param_str, message):
    with pytest.raises(ValueError, match=message):
        parse_roi_pooling_params(param_str)


def test_param_str_accepts_the_documented_forms():
    assert parse_roi_pooling_params(
        '{"pooled_h": 6, "pooled_w": 7, "spatial_scale": 0.0625}') == (6, 7, 0.0625)
    assert parse_smooth_l1_params("") == 1.0
    with pytest.raises(ValueError, match="sigma must be a positive"):
        parse_smooth_l1_params('{"sigma": 0}')
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lambda'\]"):
        parse_smooth_l1_params('{"lambda": 1}')


def test_layers_raise_clear_errors_in_caffe(caffe, tmp_path):
    with pytest.raises(ValueError, match=r"lacks \['pooled_w'\]"):
        python_net(caffe, tmp_path, {"features": (1, 2, 4, 5), "rois": (3, 5)}, "ROIPooling",
                   '{"pooled_h": 6, "spatial_scale": 1}')
    with pytest.raises(ValueError, match=r"rois must be \(R, 5\).*\(3, 4\)"):
        python_net(caffe, tmp_path, {"features": (1, 2, 4, 5), "rois": (3, 4)}, "ROIPooling",
                   '{"pooled_h": 6, "pooled_w": 6, "spatial_scale": 1}')
    with pytest.raises(ValueError,
                       match=r"bbox_targets has shape \(3, 8\), bbox_pred has \(3, 4\)"):
        python_net(caffe, tmp_path, {"pred": (3, 4), "targets": (3, 8), "weights": (3, 4)},
                   "SmoothL1Loss", loss_weight=1)
    with pytest.raises(ValueError, match=r"bbox_loss_weights has shape \(2, 4\)"):
        python_net(caffe, tmp_path, {"pred": (3, 4), "targets": (3, 4), "weights": (2, 4)},
                   "SmoothL1Loss", loss_weight=1)
    net = roi_net(caffe, tmp_path, FEATURES, np.array([[2, 0, 0, 3, 3]], dtype=np.float32))
    with pytest.raises(ValueError, match="RoI 0 has batch index 2, outside the 2 feature maps"):
        net.forward()
