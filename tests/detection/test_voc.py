"""VOC annotations (read, write, checks, datasets) and VOC evaluation by hand-computed values."""
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from ctxpred.detection.voc import (Annotation, AnnotationError, VocObject, annotation_path,
                                   evaluate_class, evaluate_detections, image_path, image_set_path,
                                   read_annotation, read_dataset, read_image_set, voc_ap,
                                   write_annotation)
from ctxpred.detection.boxes import box_iou, nms

DOG_AND_CAT = Annotation("000001.jpg", 353, 500, (
    VocObject("dog", (48, 240, 195, 371), truncated=True),
    VocObject("person", (8, 12, 352, 498), difficult=True),
    VocObject("cat", (1, 1, 353, 500)),
))


def voc_xml(size="<size><width>100</width><height>80</height><depth>3</depth></size>",
            objects=("<object><name>dog</name><difficult>0</difficult>"
                     "<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>50</xmax><ymax>60</ymax></bndbox>"
                     "</object>",)):
    return f"<annotation><filename>x.jpg</filename>{size}{''.join(objects)}</annotation>"


def voc_object(name="dog", box=("1", "2", "50", "60"), extra=""):
    coordinates = "".join(f"<{tag}>{value}</{tag}>"
                          for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box))
    return f"<object><name>{name}</name>{extra}<bndbox>{coordinates}</bndbox></object>"


def test_write_then_read_gives_the_same_annotation(tmp_path):
    path = tmp_path / "Annotations" / "000001.xml"
    write_annotation(DOG_AND_CAT, path)
    read = read_annotation(path, classes=("dog", "person", "cat"))
    assert read == DOG_AND_CAT
    assert read.path == str(path) and DOG_AND_CAT.path == ""
    assert read.objects[0].truncated and read.objects[1].difficult and not read.objects[2].difficult
    assert all(type(value) is int for voc in read.objects for value in voc.box)


def test_reads_integral_floats_missing_flags_and_images_without_objects(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(voc_xml(objects=(voc_object(box=("3.0", "4", "10.0", " 20 ")),
                                     voc_object("cat ", extra="<difficult>1</difficult>"))))
    annotation = read_annotation(path)
    assert annotation.width == 100 and annotation.height == 80
    assert annotation.objects == (VocObject("dog", (3, 4, 10, 20)),
                                  VocObject("cat", (1, 2, 50, 60), difficult=True))
    path.write_text(voc_xml(objects=()))
    assert read_annotation(path).objects == ()


BAD_XML = {
    "malformed XML": ("<annotation><filename>x.jpg</filename>", "malformed XML"),
    "wrong root": ("<doc><filename>x.jpg</filename></doc>", "not <annotation>"),
    "no filename": ("<annotation><size><width>5</width><height>5</height></size></annotation>",
                    "<filename>"),
    "no size": (voc_xml(size=""), "missing <size>"),
    "no width": (voc_xml(size="<size><height>80</height></size>"), "<width>"),
    "zero width": (voc_xml(size="<size><width>0</width><height>80</height></size>"),
                   "positive integers"),
    "negative height": (voc_xml(size="<size><width>100</width><height>-3</height></size>"),
                        "positive integers"),
    "fractional size": (voc_xml(size="<size><width>99.5</width><height>80</height></size>"),
                        "not an integer"),
    "xmin < 1": (voc_xml(objects=(voc_object(), voc_object(box=(0, 2, 50, 60)))),
                 "object 1 .*xmin 0 < 1"),
    "ymin < 1": (voc_xml(objects=(voc_object(box=(1, 0, 50, 60)),)), "object 0 .*ymin 0 < 1"),
    "xmax > width": (voc_xml(objects=(voc_object(box=(1, 2, 101, 60)),)), "xmax 101 > width 100"),
    "ymax > height": (voc_xml(objects=(voc_object(box=(1, 2, 50, 81)),)), "ymax 81 > height 80"),
    "xmin > xmax": (voc_xml(objects=(voc_object(box=(40, 2, 30, 60)),)), "xmin 40 > xmax 30"),
    "ymin > ymax": (voc_xml(objects=(voc_object(box=(1, 62, 50, 60)),)), "ymin 62 > ymax 60"),
    "fractional coordinate": (voc_xml(objects=(voc_object(box=(1, 2, "12.5", 60)),)),
                              "object 0 .*<xmax> is '12.5', not an integer"),
    "text coordinate": (voc_xml(objects=(voc_object(box=(1, "top", 50, 60)),)),
                        "<ymin> is 'top'"),
    "missing coordinate": (voc_xml(objects=("<object><name>dog</name><bndbox><xmin>1</xmin>"
                                            "</bndbox></object>",)), "<ymin>"),
    "no name": (voc_xml(objects=("<object><bndbox/></object>",)), "object 0: missing .*<name>"),
    "no bndbox": (voc_xml(objects=("<object><name>dog</name></object>",)), "<bndbox>"),
    "difficult 2": (voc_xml(objects=(voc_object(extra="<difficult>2</difficult>"),)),
                    "<difficult> is '2', not 0 or 1"),
    "unknown class": (voc_xml(objects=(voc_object("unicorn"),)), "unknown class 'unicorn'"),
}


@pytest.mark.parametrize("case", sorted(BAD_XML))
def test_bad_annotation_raises_an_error_naming_the_file(tmp_path, case):
    text, message = BAD_XML[case]
    path = tmp_path / "bad.xml"
    path.write_text(text)
    with pytest.raises(AnnotationError, match=re.escape(str(path))) as error:
        read_annotation(path, classes=("dog", "cat"))
    assert re.search(message, str(error.value)), str(error.value)


def test_missing_annotation_file_and_invalid_in_memory_annotations(tmp_path):
    with pytest.raises(AnnotationError, match=re.escape(str(tmp_path / "none.xml"))):
        read_annotation(tmp_path / "none.xml")
    with pytest.raises(AnnotationError, match="'x.jpg': object 0 .*xmax 11 > width 10"):
        Annotation("x.jpg", 10, 10, (VocObject("dog", (1, 1, 11, 5)),))
    assert VocObject("dog", np.array([1, 2, 3.0, 4])).box == (1, 2, 3, 4)
    with pytest.raises(ValueError, match="not 4 integer"):
        VocObject("dog", (1, 2, 3.5, 4))


def make_dataset(root, ids, annotated=None, imaged=None):
    """A devkit-style folder listing ``ids`` in train.txt; annotations/images for the given ids."""
    for image_id in ids if annotated is None else annotated:
        write_annotation(Annotation(f"{image_id}.jpg", 8, 6, (VocObject("dog", (1, 1, 4, 4)),)),
                         annotation_path(root, image_id))
    for image_id in ids if imaged is None else imaged:
        (root / "JPEGImages").mkdir(exist_ok=True)
        Image.new("RGB", (8, 6)).save(image_path(root, image_id))
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(f"{i}\n" for i in ids))


def test_read_dataset_returns_ids_in_list_order(tmp_path):
    make_dataset(tmp_path, ["000005", "000002", "000009"])
    pairs = read_dataset(tmp_path, "train", classes=("dog",))
    assert [image_id for image_id, _ in pairs] == ["000005", "000002", "000009"]
    assert [annotation.filename for _, annotation in pairs] == [
        "000005.jpg", "000002.jpg", "000009.jpg"]
    assert pairs[1][1].path == annotation_path(tmp_path, "000002")
    with pytest.raises(AnnotationError, match="unknown class 'dog'"):
        read_dataset(tmp_path, "train", classes=("cat",))


def test_dataset_with_missing_files_names_the_image_set_and_counts(tmp_path):
    make_dataset(tmp_path, ["a", "b", "c"], annotated=["a"], imaged=["a", "b"])
    with pytest.raises(AnnotationError) as error:
        read_dataset(tmp_path, "train")
    message = str(error.value)
    assert message.startswith(image_set_path(tmp_path, "train"))
    assert "2 of 3 ids have no annotation file" in message
    assert annotation_path(tmp_path, "b") in message
    assert "1 of 3 ids have no image file" in message and image_path(tmp_path, "c") in message


@pytest.mark.parametrize("text,message", [
    ("\n  \n", "lists no ids"),
    ("000001 1\n", "line 1 has 2 fields"),
    ("a\nb\na\n", "1 ids are listed more than once .*'a'"),
])
def test_bad_image_sets(tmp_path, text, message):
    path = tmp_path / "val.txt"
    path.write_text(text)
    with pytest.raises(AnnotationError, match=re.escape(str(path)) + ".*" + message):
        read_image_set(path)
    with pytest.raises(AnnotationError, match=re.escape(str(tmp_path / "none.txt"))):
        read_image_set(tmp_path / "none.txt")
    path.write_text("000001\n\n000002  \n")
    assert read_image_set(path) == ["000001", "000002"]


def test_box_iou_uses_the_plus_one_pixel_convention():
    a = [[1, 1, 10, 10]]                       # 100 pixels
    b = [[6, 6, 15, 15],                       # 5 x 5 shared: 25 / (100 + 100 - 25)
         [11, 1, 20, 10],                      # touching at x = 10/11: no shared pixel
         [10, 10, 10, 10],                     # the single pixel (10, 10): 1 / 100
         [1, 1, 10, 10],
         [1, 1, 10, 5]]                        # the top half: 50 / 100
    np.testing.assert_allclose(box_iou(a, b), [[25 / 175, 0, 1 / 100, 1, 0.5]])
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 5)
    with pytest.raises(ValueError, match="boxes_b: box 0 .* no area"):
        box_iou(a, [[5, 5, 3, 8]])


def test_nms_keeps_the_best_and_drops_overlaps_above_the_threshold():
    boxes = [[1, 1, 10, 10],    # 0.9
             [2, 2, 11, 11],    # 0.8: IoU with box 0 = 81 / 119
             [6, 1, 15, 10],    # 0.7: IoU with box 0 = 50 / 150 = 1/3, with box 1 = 45 / 155
             [20, 20, 30, 30],  # 0.95: overlaps nothing
             [1, 1, 10, 10]]    # 0.6: a copy of box 0
    scores = [0.9, 0.8, 0.7, 0.95, 0.6]
    np.testing.assert_array_equal(nms(boxes, scores, 0.5), [3, 0, 2])
    # IoU equal to the threshold survives (py_cpu_nms keeps IoU <= threshold).
    np.testing.assert_array_equal(nms(boxes, scores, 50 / 150), [3, 0, 2])
    np.testing.assert_array_equal(nms(boxes, scores, 0.3), [3, 0])
    np.testing.assert_array_equal(nms(boxes, [1, 1, 1, 1, 1], 0.9), [0, 1, 2, 3])
    assert nms(np.zeros((0, 4)), [], 0.3).dtype == np.int64


def test_voc_ap_hand_computed():
    recall = [0.2, 0.4, 0.4, 0.6]
    precision = [1, 1, 0.67, 0.75]
    # Envelope over recall: 1 up to 0.4, then 0.75 up to 0.6, then 0.
    assert voc_ap(recall, precision) == pytest.approx(0.2 * 1 + 0.2 * 1 + 0.2 * 0.75)
    # 11 points: t = 0..0.4 -> 1 (5 points), t = 0.5, 0.6 -> 0.75, t = 0.7..1 -> 0.
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx((5 + 2 * 0.75) / 11)
    # A precision dip is lifted by a later higher precision.
    assert voc_ap([0.5, 0.5, 1.0], [1.0, 0.5, 0.8]) == pytest.approx(0.5 + 0.5 * 0.8)
    assert voc_ap([0.5, 0.5, 1.0], [1.0, 0.5, 0.8], True) == pytest.approx((6 + 5 * 0.8) / 11)
    assert voc_ap([], []) == 0.0 and voc_ap([], [], True) == 0.0
    assert voc_ap([1.0], [1.0]) == 1.0 and voc_ap([1.0], [1.0], True) == pytest.approx(1.0)


# Image "a": a dog, a difficult dog and a cat; "b": a dog; "c": a dog nobody finds; "d": nothing.
SCENE = {
    "a": Annotation("a.jpg", 100, 100, (VocObject("dog", (1, 1, 50, 50)),
                                        VocObject("dog", (60, 60, 100, 100), difficult=True),
                                        VocObject("cat", (1, 1, 50, 50)))),
    "b": Annotation("b.jpg", 100, 100, (VocObject("dog", (10, 10, 40, 40)),)),
    "c": Annotation("c.jpg", 100, 100, (VocObject("dog", (1, 1, 20, 20)),)),
    "d": Annotation("d.jpg", 100, 100, ()),
}
DOG_DETECTIONS = [
    ("b", 0.5, (10, 10, 40, 40)),     # TP
    ("a", 0.8, (2, 2, 50, 50)),       # duplicate of the 0.9 one (IoU 0.96): FP
    ("d", 0.6, (1, 1, 10, 10)),       # no dog in d: FP
    ("a", 0.9, (1, 1, 50, 50)),       # TP
    ("b", 0.4, (70, 70, 90, 90)),     # overlaps nothing: FP
    ("a", 0.7, (60, 60, 100, 100)),   # the difficult dog: neither
]


def test_evaluate_class_duplicate_difficult_and_miss():
    result = evaluate_class(DOG_DETECTIONS, SCENE, "dog")
    # Score order 0.9 TP, 0.8 FP, 0.7 ignored, 0.6 FP, 0.5 TP, 0.4 FP; 3 positives (c is missed).
    assert result.n_positives == 3
    np.testing.assert_allclose(result.recall, [1 / 3, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(result.precision, [1, 1 / 2, 1 / 2, 1 / 3, 2 / 4, 2 / 5])
    # Envelope: 1 up to recall 1/3, 0.5 up to 2/3, 0 after.
    assert result.ap == pytest.approx(1 / 3 * 1 + 1 / 3 * 0.5)
    # 11 points: t = 0..0.3 -> 1, t = 0.4..0.6 -> 0.5, t = 0.7..1 -> 0.
    assert evaluate_class(DOG_DETECTIONS, SCENE, "dog", use_07_metric=True).ap == pytest.approx(
        (4 + 3 * 0.5) / 11)
    # Without the 0.9 detection the 0.8 one takes the dog of "a".
    without_best = [row for row in DOG_DETECTIONS if row[1] != 0.9]
    np.testing.assert_allclose(evaluate_class(without_best, SCENE, "dog").precision,
                               [1, 1, 1 / 2, 2 / 3, 2 / 4])


def test_evaluate_class_threshold_is_inclusive_and_unknown_images_fail():
    half = [("c", 1.0, (1, 1, 20, 10))]   # the top half of c's dog: IoU exactly 0.5
    assert evaluate_class(half, SCENE, "dog").recall.tolist() == [1 / 3]
    assert evaluate_class(half, SCENE, "dog", iou_threshold=0.51).recall.tolist() == [0]
    with pytest.raises(ValueError, match="1 detections are on images without an annotation.*'z'"):
        evaluate_class([("z", 1.0, (1, 1, 5, 5))], SCENE, "dog")


def test_evaluate_detections_map_leaves_out_classes_without_positives():
    detections = {"dog": DOG_DETECTIONS, "cat": [("a", 0.3, (1, 1, 50, 50))]}
    with pytest.warns(UserWarning, match="1 of 3 classes .*: bird"):
        results = evaluate_detections(detections, SCENE, ["dog", "cat", "bird"])
    assert results["cat"].ap == pytest.approx(1.0) and results["cat"].n_positives == 1
    assert np.isnan(results["bird"].ap) and results["bird"].n_positives == 0
    assert results["mAP"] == pytest.approx((0.5 + 1.0) / 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert evaluate_detections({}, SCENE, ["cat"])["mAP"] == 0.0
    with pytest.raises(ValueError, match="not evaluated: cow"):
        evaluate_detections({"cow": []}, SCENE, ["dog"])
