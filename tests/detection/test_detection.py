"""Fast R-CNN data side: composed scenes, proposals, roidb, RoI sampling, the RoIData layer."""
import json

import numpy as np
import pytest
import skimage.data

from ctxpred.detection.roidb import (DatasetError, DetectionConfig, build_roidb, class_detections,
                                     read_classes, sample_rois, unnormalised_bbox_weights,
                                     usable_entries)
from ctxpred.detection.boxes import apply_box_deltas, box_targets
from ctxpred.detection.proposals import (ProposalError, load_proposals, save_proposals,
                                         selective_search)
from ctxpred.detection.synthetic_scenes import CutoutError, compose_scene, paste, trim_cutout
from ctxpred.detection.voc import AnnotationError
from ctxpred.detection.boxes import box_iou


def test_paste_blends_by_alpha_and_returns_the_opaque_box():
    image = np.zeros((20, 30, 3), np.uint8)
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[1:5, 2:7, 3] = 255
    rgba[0, 0, 3] = 64                       # faint: blended, not part of the box
    box = paste(image, rgba, top=3, left=10)
    assert box == (13, 5, 17, 8)             # VOC: 1-based, inclusive
    assert (image[4:8, 12:17] == 200).all()
    assert image[3, 10, 0] == round(200 * 64 / 255)
    assert image[:3].sum() == 0 and image[:, :10].sum() == 0
    with pytest.raises(ValueError, match="leaves"):
        paste(image, rgba, top=16, left=0)


def test_trim_cutout_and_its_errors():
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[2:5, 3:9, 3] = 255
    assert trim_cutout(rgba).shape == (3, 6, 4)
    with pytest.raises(CutoutError, match="stamp.png: no opaque pixel"):
        trim_cutout(np.zeros((4, 4, 4), np.uint8), name="stamp.png")
    with pytest.raises(CutoutError, match="alpha channel"):
        trim_cutout(np.zeros((4, 4, 3), np.uint8))


def test_compose_scene_boxes_hold_the_pasted_pixels(rng):
    background = np.zeros((200, 300, 3), np.uint8)
    square = np.full((50, 50, 4), 255, np.uint8)
    image, placed = compose_scene(background, [("a", square), ("b", square), ("c", square)],
                                  rng, size_range=(0.2, 0.3), max_overlap=0.0)
    assert [obj.label for obj in placed] == ["a", "b", "c"]
    boxes = np.array([obj.box for obj in placed])
    iou = box_iou(boxes, boxes)
    assert np.allclose(iou[~np.eye(3, dtype=bool)], 0)
    mask = image.sum(axis=2) > 0
    expected = np.zeros_like(mask)
    for x1, y1, x2, y2 in boxes:
        assert 40 <= x2 - x1 + 1 <= 60 and x2 - x1 == y2 - y1
        expected[y1 - 1:y2, x1 - 1:x2] = True
    assert (mask == expected).all()


def test_box_targets_and_deltas_are_inverse(rng):
    rois = np.array([[10, 20, 50, 80], [0, 0, 99, 49]], np.float64)
    gt = np.array([[12, 18, 60, 90], [5, 3, 80, 40]], np.float64)
    deltas = box_targets(rois, gt)
    assert np.allclose(deltas[0], [(36.5 - 30.5) / 41, (54.5 - 50.5) / 61,
                                   np.log(49 / 41), np.log(73 / 61)])
    back = apply_box_deltas(rois, np.tile(deltas, (1, 2)))
    # Fast R-CNN's inverse places x2 at centre + w/2 (no -1): boxes come back 1 px wider.
    assert np.allclose(back[:, :4], gt + [0, 0, 1, 1], atol=1e-4)
    assert np.allclose(back[:, 4:], back[:, :4])


def test_roidb_overlaps_targets_and_flips(tiny_detection_set):
    classes = read_classes(tiny_detection_set)
    roidb = build_roidb(tiny_detection_set, "trainval", tiny_detection_set / "proposals.npz",
                        classes)
    assert len(roidb) == 16 and sum(entry.flipped for entry in roidb) == 8
    entry, mirror = roidb[0], roidb[8]
    gt_rows = np.flatnonzero(entry.gt_classes > 0)
    assert len(gt_rows) >= 1 and (gt_rows == np.arange(len(gt_rows))).all()
    assert np.allclose(entry.max_overlaps[gt_rows], 1)
    assert np.allclose(entry.targets[gt_rows, 1:], 0, atol=1e-6)
    assert (entry.targets[gt_rows, 0] == entry.gt_classes[gt_rows]).all()
    assert np.allclose(mirror.boxes[:, 0], entry.width - 1 - entry.boxes[:, 2])
    assert np.allclose(mirror.targets[:, 1], -entry.targets[:, 1])
    with_target = entry.max_overlaps >= 0.5
    assert (entry.targets[with_target, 0] > 0).all() and (entry.targets[~with_target, 0] == 0).all()


def test_sample_rois_keeps_the_foreground_fraction(tiny_detection_set, rng):
    classes = read_classes(tiny_detection_set)
    roidb = build_roidb(tiny_detection_set, "trainval", tiny_detection_set / "proposals.npz",
                        classes)
    config = DetectionConfig()
    rois, labels, targets, weights = sample_rois(roidb[0], 64, 3, config, rng)
    foreground = labels > 0
    assert 1 <= foreground.sum() <= 16 and len(rois) <= 64
    overlaps = box_iou(rois + 1, roidb[0].boxes[roidb[0].gt_classes > 0] + 1).max(axis=1)
    assert (overlaps[foreground] >= 0.5).all()
    assert ((overlaps[~foreground] >= 0.1) & (overlaps[~foreground] < 0.5)).all()
    assert (weights.reshape(len(rois), 3, 4).sum(axis=2)[np.arange(len(rois)), labels]
            == np.where(foreground, 4, 0)).all()
    assert weights.sum() == 4 * foreground.sum()


def test_target_statistics_fold_into_the_regressor(rng):
    weight, bias = rng.normal(size=(12, 5)), rng.normal(size=12)
    means, stds = rng.normal(size=(3, 4)), rng.uniform(0.1, 1, (3, 4))
    features = rng.normal(size=5)
    folded_weight, folded_bias = unnormalised_bbox_weights(weight, bias, means, stds)
    assert np.allclose(folded_weight @ features + folded_bias,
                       (weight @ features + bias) * stds.ravel() + means.ravel())


def test_class_detections_nms_and_cap():
    scores = np.array([[0.1, 0.9, 0.0], [0.2, 0.8, 0.0], [0.5, 0.1, 0.4]], np.float32)
    boxes = np.tile(np.array([[0, 0, 9, 9], [1, 1, 10, 10], [50, 50, 60, 60]], np.float32), (1, 3))
    per_class = class_detections(scores, boxes, DetectionConfig())
    assert len(per_class) == 2
    assert np.allclose(per_class[0], [[1, 1, 10, 10, 0.9], [51, 51, 61, 61, 0.1]])
    assert np.allclose(per_class[1], [[51, 51, 61, 61, 0.4]])
    capped = class_detections(scores, boxes, DetectionConfig(max_per_image=2))
    assert sorted(np.concatenate([c[:, 4] for c in capped])) == pytest.approx([0.4, 0.9])


def test_selective_search_finds_a_pasted_object(rng):
    background = skimage.data.coffee()[::2, ::2].copy()
    cutout = np.dstack([skimage.data.chelsea()[60:200, 100:300],
                        np.full((140, 200), 255, np.uint8)])
    image, placed = compose_scene(background, [("cat", cutout)], rng, size_range=(0.4, 0.5))
    boxes = selective_search(image)
    assert len(boxes) > 50
    assert (boxes[:, :2] >= 1).all() and (boxes[:, 2] <= image.shape[1]).all() \
        and (boxes[:, 3] <= image.shape[0]).all()
    assert box_iou(np.array([placed[0].box]), boxes).max() >= 0.7


def test_proposal_files_round_trip_and_errors(tmp_path):
    path = tmp_path / "props.npz"
    save_proposals(path, {"a": np.array([[1, 2, 3, 4]]), "b": np.zeros((0, 4))})
    loaded = load_proposals(path, ["b", "a"])
    assert loaded["a"].tolist() == [[1, 2, 3, 4]] and loaded["b"].shape == (0, 4)
    with pytest.raises(ProposalError, match=r"props.npz has no proposals for 1 of 2 images.*'c'"):
        load_proposals(path, ["a", "c"])
    with pytest.raises(ProposalError, match="missing.npz does not exist"):
        load_proposals(tmp_path / "missing.npz", ["a"])


def test_bad_datasets_name_the_file(tiny_detection_set, tmp_path):
    with pytest.raises(AnnotationError, match=r"trainval_0\.xml.*(cat|rocket)"):
        build_roidb(tiny_detection_set, "trainval", tiny_detection_set / "proposals.npz",
                    ["dog"])
    image = tiny_detection_set / "JPEGImages" / "test_3.jpg"
    moved = tmp_path / "test_3.jpg"
    image.rename(moved)
    try:
        with pytest.raises(AnnotationError, match=r"test\.txt: 1 of 4 ids have no image.*test_3"):
            build_roidb(tiny_detection_set, "test", tiny_detection_set / "proposals.npz",
                        read_classes(tiny_detection_set))
    finally:
        moved.rename(image)
    with pytest.raises(DatasetError, match="classes.txt"):
        read_classes(tmp_path)


def _data_net(caffe, tmp_path, params):
    n = caffe.NetSpec()
    tops = caffe.layers.Python(ntop=5, python_param=dict(
        module="ctxpred.detection.roi_data", layer="RoIData", param_str=json.dumps(params)))
    for name, top in zip(("data", "rois", "labels", "bbox_targets", "bbox_loss_weights"), tops):
        setattr(n, name, top)
    path = tmp_path / "data.prototxt"
    path.write_text(str(n.to_proto()))
    return caffe.Net(str(path), caffe.TRAIN)


def test_roi_data_layer_in_caffe(caffe, tiny_detection_set, tmp_path):
    net = _data_net(caffe, tmp_path, dict(dataset=str(tiny_detection_set), scales=[200, 160],
                                          max_size=300, ims_per_batch=2, batch_size=32, seed=1))
    layer = net.layers[0]
    for _ in range(8):
        net.forward()
        data, rois = net.blobs["data"].data, net.blobs["rois"].data
        labels = net.blobs["labels"].data
        assert data.shape[:2] == (2, 3) and min(data.shape[2:]) in (160, 200)
        assert rois.shape == (len(labels), 5) and len(labels) <= 32
        assert set(np.unique(rois[:, 0])) <= {0.0, 1.0}
        assert (rois[:, 1:] >= 0).all() and (rois[:, 3] < data.shape[3]).all()
        assert (rois[:, 4] < data.shape[2]).all()
        assert net.blobs["bbox_targets"].data.shape == (len(labels), 12)
        weights = net.blobs["bbox_loss_weights"].data
        assert (weights.sum(axis=1) == np.where(labels > 0, 4, 0)).all()
        assert abs(float(data.mean())) < 60      # mean-subtracted BGR
    assert layer.cursor == 16                    # 8 batches of 2: one epoch of 16 entries
    first_epoch = layer.order.copy()
    net.forward()
    assert layer.cursor == 2 and sorted(layer.order) == list(range(16))
    assert not np.array_equal(layer.order, first_epoch)
    assert layer.num_classes == 3 and layer.bbox_stds.shape == (3, 4)


def test_roi_data_rejects_unknown_settings(caffe, tiny_detection_set, tmp_path):
    with pytest.raises(Exception):
        _data_net(caffe, tmp_path, dict(dataset=str(tiny_detection_set), batchsize=4))
    from ctxpred.detection.roi_data import parse_param_str
    with pytest.raises(ValueError, match="unknown detection setting.*batchsize"):
        parse_param_str(json.dumps(dict(dataset="x", batchsize=4)))
    with pytest.raises(ValueError, match="needs a \"dataset\""):
        parse_param_str("{}")


def test_images_without_rois_are_dropped_with_a_count(caffe, tiny_detection_set, tmp_path,
                                                      capsys):
    import shutil
    from PIL import Image

    from ctxpred.detection.voc import Annotation, write_annotation
    root = tmp_path / "set"
    shutil.copytree(tiny_detection_set, root)
    Image.fromarray(np.full((120, 160, 3), 90, np.uint8)).save(root / "JPEGImages" / "empty.jpg")
    write_annotation(Annotation("empty.jpg", 160, 120, ()), root / "Annotations" / "empty.xml")
    with (root / "ImageSets" / "Main" / "trainval.txt").open("a") as listing:
        listing.write("empty\n")
    stored = dict(np.load(root / "proposals.npz"))
    save_proposals(root / "proposals.npz", {**stored, "empty": np.array([[1, 1, 50, 50]])})
    roidb = build_roidb(root, "trainval", root / "proposals.npz", read_classes(root))
    assert len(roidb) == 18
    kept, dropped = usable_entries(roidb)
    assert dropped == 2 and all(entry.image.endswith("empty.jpg") is False for entry in kept)
    net = _data_net(caffe, tmp_path, dict(dataset=str(root), scales=[160], max_size=240,
                                          ims_per_batch=1, batch_size=16))
    assert len(net.layers[0].roidb) == 16
    assert "2 of 18 roidb entries" in capsys.readouterr().out
