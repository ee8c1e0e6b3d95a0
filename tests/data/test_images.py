"""Tests for ctxpred.data.images: sources, Datum parsing, decoding, random resize."""

import io
import multiprocessing
import os
import pickle
import subprocess
import sys

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image

from ctxpred.data.images import (
    ImageError,
    LmdbSource,
    decode_rgb,
    open_source,
    parse_datum,
    random_resize,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def encode(array_or_image, file_format, **save_options) -> bytes:
    image = (
        array_or_image
        if isinstance(array_or_image, Image.Image)
        else Image.fromarray(array_or_image)
    )
    buffer = io.BytesIO()
    image.save(buffer, file_format, **save_options)
    return buffer.getvalue()


def make_datum_class():
    """A protobuf message class with Caffe's Datum fields, built without caffe."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field = descriptor_pb2.FieldDescriptorProto
    file_proto = descriptor_pb2.FileDescriptorProto(
        name="test_datum.proto", package="testcaffe", syntax="proto2"
    )
    message = file_proto.message_type.add(name="Datum")
    for name, number, field_type, label, packed in [
        ("channels", 1, field.TYPE_INT32, field.LABEL_OPTIONAL, False),
        ("height", 2, field.TYPE_INT32, field.LABEL_OPTIONAL, False),
        ("width", 3, field.TYPE_INT32, field.LABEL_OPTIONAL, False),
        ("data", 4, field.TYPE_BYTES, field.LABEL_OPTIONAL, False),
        ("label", 5, field.TYPE_INT32, field.LABEL_OPTIONAL, False),
        ("float_data", 6, field.TYPE_FLOAT, field.LABEL_REPEATED, False),
        ("encoded", 7, field.TYPE_BOOL, field.LABEL_OPTIONAL, False),
        ("packed_floats", 9, field.TYPE_FLOAT, field.LABEL_REPEATED, True),
        ("extra_fixed64", 10, field.TYPE_FIXED64, field.LABEL_OPTIONAL, False),
    ]:
        added = message.field.add(name=name, number=number, type=field_type, label=label)
        if packed:
            added.options.packed = True
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("testcaffe.Datum"))


@pytest.fixture(scope="module")
def datum_class():
    pytest.importorskip("google.protobuf")
    return make_datum_class()


@pytest.fixture(scope="module")
def photos():
    return {
        "astronaut": skimage.data.astronaut(),
        "chelsea": skimage.data.chelsea(),
        "coffee": skimage.data.coffee(),
    }


# ---------------------------------------------------------------------------
# Sources


def test_folder_source_is_recursive_sorted_and_case_insensitive(tmp_path, photos):
    (tmp_path / "b" / "c").mkdir(parents=True)
    for relative in ["b/z.JPG", "a.png", "b/c/y.Tiff", "b/notes.txt", "b/c/readme"]:
        (tmp_path / relative).write_bytes(b"x")
    source = open_source(str(tmp_path))
    assert [source.name(i) for i in range(len(source))] == [
        str(tmp_path / "a.png"),
        str(tmp_path / "b/c/y.Tiff"),
        str(tmp_path / "b/z.JPG"),
    ]
    assert source.label(0) is None
    assert "folder" in source.description and "3 images" in source.description


def test_glob_source_supports_recursive_pattern(tmp_path):
    (tmp_path / "d" / "e").mkdir(parents=True)
    for relative in ["top.jpg", "d/one.jpg", "d/e/two.jpeg", "d/e/three.png"]:
        (tmp_path / relative).write_bytes(b"x")
    source = open_source(str(tmp_path / "**" / "*.jp*g"))
    assert [source.name(i) for i in range(len(source))] == [
        str(tmp_path / "d/e/two.jpeg"),
        str(tmp_path / "d/one.jpg"),
        str(tmp_path / "top.jpg"),
    ]


def test_list_file_with_labels_comments_and_relative_root(tmp_path):
    (tmp_path / "lists").mkdir()
    list_path = tmp_path / "lists" / "train.txt"
    list_path.write_text(
        "# header comment\n\nimg/a.jpg 3\n  img/b c.png  \nimg/d.jpg -1\n/abs/e.jpg 7\n"
    )
    source = open_source(str(list_path))
    assert [source.name(i) for i in range(len(source))] == [
        str(tmp_path / "lists/img/a.jpg"),
        str(tmp_path / "lists/img/b c.png"),
        str(tmp_path / "lists/img/d.jpg"),
        "/abs/e.jpg",
    ]
    assert [source.label(i) for i in range(len(source))] == [3, None, -1, 7]
    rooted = open_source(str(list_path), root="/data")
    assert rooted.name(0) == "/data/img/a.jpg"


def test_single_image_file_is_a_source_of_one(tmp_path, photos):
    path = tmp_path / "one.png"
    path.write_bytes(encode(photos["chelsea"], "PNG"))
    source = open_source(str(path))
    assert len(source) == 1
    assert np.array_equal(decode_rgb(source.read_bytes(0), source.name(0)), photos["chelsea"])


@pytest.mark.parametrize("kind", ["missing", "empty_folder", "no_glob_match", "empty_list"])
def test_spec_matching_nothing_raises_naming_it(tmp_path, kind):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    spec = {
        "missing": str(tmp_path / "nope"),
        "empty_folder": str(tmp_path / "empty"),
        "no_glob_match": str(tmp_path / "*.jpg"),
        "empty_list": str(tmp_path / "empty.txt"),
    }[kind]
    with pytest.raises(ValueError, match="image source") as raised:
        open_source(spec)
    assert spec in str(raised.value)


def test_read_bytes_names_the_file_for_directory_and_dangling_link(tmp_path):
    (tmp_path / "x.jpg").mkdir()
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    list_path = tmp_path / "list.txt"
    list_path.write_text("x.jpg\ndangling.jpg\n")
    source = open_source(str(list_path))
    for index, file_name in enumerate(["x.jpg", "dangling.jpg"]):
        with pytest.raises(ImageError, match="cannot read") as raised:
            source.read_bytes(index)
        assert raised.value.name == str(tmp_path / file_name)
        assert str(tmp_path / file_name) in str(raised.value)


# ---------------------------------------------------------------------------
# Datum and LMDB


def test_parse_datum_matches_protobuf_serialisation(datum_class):
    message = datum_class(
        channels=3,
        height=20,
        width=30,
        data=b"\x00\x01payload",
        label=-5,
        encoded=True,
        float_data=[1.5, 2.5],
        packed_floats=[3.0, 4.0],
        extra_fixed64=12345678901234,
    )
    datum = parse_datum(message.SerializeToString())
    assert (datum.channels, datum.height, datum.width) == (3, 20, 30)
    assert datum.data == b"\x00\x01payload"
    assert datum.label == -5
    assert datum.encoded is True
    defaults = parse_datum(datum_class(data=b"abc").SerializeToString())
    assert (defaults.label, defaults.encoded, defaults.data) == (0, False, b"abc")


def test_parse_datum_rejects_truncated_message(datum_class):
    serialised = datum_class(data=b"0123456789", label=2).SerializeToString()
    with pytest.raises(ValueError, match="truncated"):
        parse_datum(serialised[:-4])


def write_lmdb(path, records):
    import lmdb

    with (
        lmdb.open(str(path), map_size=1 << 26) as environment,
        environment.begin(write=True) as transaction,
    ):
        for key, value in records:
            transaction.put(key, value)


def read_first_image(source):
    return decode_rgb(source.read_bytes(0), source.name(0)).sum()


def test_lmdb_source_reads_encoded_datums_and_survives_pickle_and_fork(
    tmp_path, datum_class, photos
):
    images = [photos["astronaut"], photos["coffee"]]
    records = [
        (
            f"{index:08d}_{name}".encode(),
            datum_class(data=encode(image, "PNG"), label=index + 10, encoded=True),
        )
        for index, (name, image) in enumerate(zip(["astronaut", "coffee"], images))
    ]
    write_lmdb(tmp_path / "db", [(key, datum.SerializeToString()) for key, datum in records])
    source = open_source(str(tmp_path / "db"))
    assert isinstance(source, LmdbSource)
    assert len(source) == 2
    assert source.name(1) == "lmdb:00000001_coffee"
    assert [source.label(0), source.label(1)] == [10, 11]
    for index, image in enumerate(images):
        assert np.array_equal(decode_rgb(source.read_bytes(index), source.name(index)), image)

    unpickled = pickle.loads(pickle.dumps(source))
    assert np.array_equal(decode_rgb(unpickled.read_bytes(1), unpickled.name(1)), images[1])
    # The parent has an open environment by now; a forked worker must reopen its own.
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(read_first_image, (source,)) == images[0].sum()


def test_lmdb_raw_datum_is_an_image_error_naming_the_key(tmp_path, datum_class):
    raw = datum_class(channels=3, height=2, width=2, data=bytes(12), encoded=False)
    write_lmdb(tmp_path / "db", [(b"raw_key", raw.SerializeToString())])
    source = open_source(str(tmp_path / "db"))
    with pytest.raises(ImageError, match="lmdb:raw_key.*raw pixels"):
        source.read_bytes(0)


# ---------------------------------------------------------------------------
# Decoding


def test_decode_rgb_round_trips_rgb_png(photos):
    assert np.array_equal(
        decode_rgb(encode(photos["coffee"], "PNG"), "coffee.png"), photos["coffee"]
    )


def test_greyscale_is_replicated():
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    decoded = decode_rgb(encode(grey, "PNG"), "grey.png")
    assert decoded.shape == (16, 16, 3) and decoded.dtype == np.uint8
    for channel in range(3):
        assert np.array_equal(decoded[:, :, channel], grey)


def test_alpha_is_dropped_not_composited(photos):
    rgba = np.dstack([photos["chelsea"], np.full(photos["chelsea"].shape[:2], 7, np.uint8)])
    assert np.array_equal(decode_rgb(encode(rgba, "PNG"), "rgba.png"), photos["chelsea"])
    grey_alpha = Image.fromarray(
        np.dstack([np.full((4, 4), 90, np.uint8), np.zeros((4, 4), np.uint8)]), "LA"
    )
    assert np.all(decode_rgb(encode(grey_alpha, "PNG"), "la.png") == 90)


def test_palette_with_transparency_gives_palette_colours():
    palette_image = Image.new("P", (4, 2))
    palette_image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette_image.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    palette_image.info["transparency"] = 1
    decoded = decode_rgb(encode(palette_image, "PNG", transparency=1), "palette.png")
    expected = np.array([[10, 20, 30], [200, 100, 50]], dtype=np.uint8)[
        [0, 1, 0, 1, 1, 1, 0, 0]
    ].reshape(2, 4, 3)
    assert np.array_equal(decoded, expected)


def test_cmyk_jpeg_is_converted_to_rgb():
    cmyk = Image.new("CMYK", (16, 16))
    cmyk.paste((0, 0, 0, 0), (0, 0, 8, 16))  # white
    cmyk.paste((255, 0, 0, 0), (8, 0, 16, 8))  # cyan
    cmyk.paste((0, 0, 0, 128), (8, 8, 16, 16))  # mid grey
    decoded = decode_rgb(encode(cmyk, "TIFF"), "cmyk.tif").astype(int)
    assert np.array_equal(decoded[4, 4], [255, 255, 255])
    assert np.array_equal(decoded[4, 12], [0, 255, 255])
    assert np.array_equal(decoded[12, 12], [127, 127, 127])
    jpeg = decode_rgb(encode(cmyk, "JPEG", quality=100), "cmyk.jpg").astype(int)
    assert np.abs(jpeg[2:6, 2:6] - 255).max() <= 3
    assert np.abs(jpeg[2:6, 10:14] - [0, 255, 255]).max() <= 6


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896], [65535, 1000, 40000]], dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "grey16.png"), values)
    decoded = decode_rgb((tmp_path / "grey16.png").read_bytes(), "grey16.png")
    expected = np.rint(values / 257).astype(np.uint8)
    assert np.array_equal(decoded[:, :, 0], expected)
    assert np.array_equal(decoded[:, :, 2], expected)


def test_16_bit_rgb_keeps_high_byte(tmp_path):
    rgb = np.array([[[0, 256, 65535], [51400, 1000, 30000]]], dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb[:, :, ::-1])
    decoded = decode_rgb((tmp_path / "rgb16.png").read_bytes(), "rgb16.png")
    assert np.array_equal(decoded, (rgb >> 8).astype(np.uint8))


def test_float_and_32_bit_greyscale(tmp_path):
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0, -1.0]], dtype=np.float32), "F")
    assert np.array_equal(
        decode_rgb(encode(floats, "TIFF"), "f.tif")[0, :, 1], [0, 128, 255, 255, 0]
    )
    integers = Image.fromarray(np.array([[0, 257, 65535, 70000]], dtype=np.int32), "I")
    assert np.array_equal(decode_rgb(encode(integers, "TIFF"), "i.tif")[0, :, 0], [0, 1, 255, 255])


def test_bad_data_raises_image_error_naming_the_file(photos):
    jpeg = encode(photos["astronaut"], "JPEG")
    corrupt = jpeg[:600] + bytes(range(256)) * 40 + jpeg[600 + 256 * 40 :]
    cases = {
        "empty.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 3],
        "corrupt.jpg": corrupt[:2000],
        "text.jpg": b"this is not an image at all\n" * 10,
    }
    for name, data in cases.items():
        for max_pixels in (None, 1000):
            with pytest.raises(ImageError) as raised:
                decode_rgb(data, name, max_pixels=max_pixels)
            assert raised.value.name == name and str(raised.value).startswith(name)


HUGE_SIDE = 10_000


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory):
    gradient = Image.linear_gradient("L").resize((HUGE_SIDE, HUGE_SIDE))
    path = tmp_path_factory.mktemp("huge") / "huge.jpg"
    Image.merge("RGB", [gradient, gradient.transpose(Image.Transpose.ROTATE_90), gradient]).save(
        path, quality=50
    )
    return path


@pytest.mark.skipif(
    not os.path.exists("/proc/self/status"), reason="peak memory is read from Linux /proc"
)
def test_huge_jpeg_is_decoded_at_reduced_scale_within_memory(huge_jpeg):
    # In a fresh process, so its peak resident memory (VmHWM, which unlike
    # ru_maxrss restarts at exec) measures the decode alone; the full image
    # would need 300 MB as RGB.
    script = (
        "import re, sys\n"
        "from ctxpred.data.images import decode_rgb\n"
        "image = decode_rgb(open(sys.argv[1], 'rb').read(), sys.argv[1], max_pixels=450_000)\n"
        "peak = re.search(r'VmHWM:\\s*(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
        "print(image.shape[0], image.shape[1], peak)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(huge_jpeg)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": REPO_ROOT},
    )
    height, width, peak_kib = map(int, result.stdout.split())
    assert (height, width) == (HUGE_SIDE // 8, HUGE_SIDE // 8)
    assert height * width >= 450_000
    assert peak_kib < 250 * 1024


def test_draft_keeps_at_least_max_pixels(photos):
    jpeg = encode(photos["coffee"], "JPEG")  # 600 x 400
    assert decode_rgb(jpeg, "c.jpg", max_pixels=60_000).shape == (400 // 2, 600 // 2, 3)
    assert decode_rgb(jpeg, "c.jpg", max_pixels=60_001).shape == (400, 600, 3)
    assert decode_rgb(jpeg, "c.jpg", max_pixels=3_750).shape == (400 // 8, 600 // 8, 3)


# ---------------------------------------------------------------------------
# Random resize


def test_random_resize_pixel_count_aspect_and_interpolation(photos):
    image = photos["coffee"]  # 400 x 600
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(200):
        resized = random_resize(image, rng)
        height, width = resized.shape[:2]
        counts.append(height * width)
        assert abs(width / height - 1.5) < 0.01
    counts = np.array(counts)
    assert counts.min() >= 150_000 * 0.995 and counts.max() <= 450_000 * 1.005
    assert counts.min() < 170_000 and counts.max() > 430_000

    shrunk = random_resize(image, np.random.default_rng(1), 60_000, 60_000)
    assert np.array_equal(shrunk, cv2.resize(image, (300, 200), interpolation=cv2.INTER_AREA))
    enlarged = random_resize(image, np.random.default_rng(1), 960_000, 960_000)
    assert np.array_equal(enlarged, cv2.resize(image, (1200, 800), interpolation=cv2.INTER_LINEAR))


def test_random_resize_is_deterministic_per_seed(photos):
    first = random_resize(photos["astronaut"], np.random.default_rng(5))
    second = random_resize(photos["astronaut"], np.random.default_rng(5))
    assert np.array_equal(first, second)
