"""Faulty and awkward images: EXIF orientation, huge JPEGs, images smaller than a patch.

Every decode in ctxpred goes through ctxpred.data.images.decode_rgb (or
decode_rgb_within, its bounded form): the data layer, the feature tools,
pretext evaluation, magic init, classification and the ONNX check. The
tests write real files with Pillow and run the real code paths.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageOps

from ctxpred.data.batching import BatchAssembler, PatchPairConfig
from ctxpred.features.patches import sampled_patches
from ctxpred.data.images import ImageError, decode_rgb, decode_rgb_within, open_source

REPO = Path(__file__).resolve().parents[2]


def sideways(upright, path, orientation=6):
    """Store ``upright`` rotated, with the EXIF tag that turns it upright again (6: 90 deg CW)."""
    stored = Image.fromarray(upright).transpose(
        {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270,
         3: Image.Transpose.ROTATE_180}[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, exif=exif, **({"quality": 95} if path.suffix == ".jpg" else {}))
    return path


@pytest.fixture(scope="module")
def oriented(tmp_path_factory):
    """The astronaut upright (PNG) and stored sideways with orientation tags (PNG, JPEG)."""
    folder = tmp_path_factory.mktemp("oriented")
    upright = skimage.data.astronaut()[:, 60:]  # 512 x 452: not square, so a turn shows
    Image.fromarray(upright).save(folder / "upright.png")
    files = {"upright": folder / "upright.png"}
    for orientation in (6, 8, 3):
        files[orientation] = sideways(upright, folder / f"tag{orientation}.png", orientation)
    files["jpeg"] = sideways(upright, folder / "tag6.jpg")
    return upright, files


def test_exif_orientation_is_honoured_like_opencv_and_pillow(oriented):
    upright, files = oriented
    for orientation in (6, 8, 3):
        decoded = decode_rgb(files[orientation].read_bytes(), str(files[orientation]))
        np.testing.assert_array_equal(decoded, upright)
    jpeg = files["jpeg"]
    with Image.open(jpeg) as image:
        pillow = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    opencv = cv2.cvtColor(cv2.imread(str(jpeg), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    for max_pixels in (None, 100_000):  # the reduced-scale JPEG path too
        decoded = decode_rgb(jpeg.read_bytes(), str(jpeg), max_pixels=max_pixels)
        assert decoded.shape[0] > decoded.shape[1]  # upright: taller than wide
        if max_pixels is None:
            np.testing.assert_array_equal(decoded, pillow)
            assert decoded.shape == opencv.shape
            assert np.abs(decoded.astype(int) - opencv).mean() < 2
    bounded, scale = decode_rgb_within(jpeg.read_bytes(), str(jpeg), 100_000)
    assert bounded.shape[0] > bounded.shape[1] and bounded.size <= 3 * 100_000
    assert scale == pytest.approx(bounded.shape[1] / upright.shape[1])


def test_sideways_photos_give_the_upright_patches_in_the_data_layer_and_features(oriented):
    _, files = oriented
    upright_source = open_source(str(files["upright"]))
    for orientation in (6, 8, 3):
        source = open_source(str(files[orientation]))
        for mode in ("grid", "random"):
            (got,), (want,) = (list(sampled_patches(s, mode, seed=1))
                               for s in (source, upright_source))
            np.testing.assert_array_equal(got.patches, want.patches)
            np.testing.assert_array_equal(got.boxes, want.boxes)
        config = PatchPairConfig(max_patches=64)
        batches = []
        for s in (source, upright_source):
            out = np.zeros((64, 3, 96, 96), np.float32)
            BatchAssembler(s, config, np.random.default_rng(3)).fill(out)
            batches.append(out)
        np.testing.assert_array_equal(*batches)


def test_images_smaller_than_a_patch_are_skipped_at_their_full_size(photo_folder, tmp_path):
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(tmp_path / "dot.png")
    Image.fromarray(skimage.data.astronaut()[:90, :400]).save(tmp_path / "strip.jpg")
    for name in ("dot.png", "strip.jpg"):
        with pytest.raises(ImageError, match="smaller than one 96x96 patch"):
            decode_rgb((tmp_path / name).read_bytes(), name, min_side=96)
    for photo in Path(photo_folder).glob("*.jpg"):
        (tmp_path / photo.name).write_bytes(photo.read_bytes())
    source = open_source(str(tmp_path))
    # The data layer: a 1 x 1 image used to be upscaled to a flat 550 x 550 grey.
    assembler = BatchAssembler(source, PatchPairConfig(max_patches=64), np.random.default_rng(0))
    out = np.zeros((64, 3, 96, 96), np.float32)
    for _ in range(12):  # more than one pass over the six images
        info = assembler.fill(out)
        assert {source.name(int(i)) for i in info.image_indices}.isdisjoint(
            {str(tmp_path / "dot.png"), str(tmp_path / "strip.jpg")})
    assert "1x1 pixels is smaller than one 96x96 patch" in assembler.skipped[
        str(tmp_path / "dot.png")]
    assert "400x90 pixels" in assembler.skipped[str(tmp_path / "strip.jpg")]
    # The feature tools: skipped with the reason, even when a bound would shrink it anyway.
    skipped = {item.name: item.skipped for item in sampled_patches(source, "grid")}
    assert "smaller than one 96x96 patch" in skipped[str(tmp_path / "dot.png")]
    assert all(skipped[str(tmp_path / photo.name)] is None
               for photo in Path(photo_folder).glob("*.jpg"))


PEAK = textwrap.dedent("""
    import sys
    from ctxpred.detection.roidb import DetectionConfig, read_image
    from ctxpred.features.patches import sampled_patches
    from ctxpred.data.images import open_source

    def status(field):  # kB
        with open("/proc/self/status") as file:
            return next(int(line.split()[1]) for line in file if line.startswith(field))

    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # resets the peak resident memory (VmHWM) to the current one
    before = status("VmRSS:")
    if sys.argv[2] == "features":
        items = list(sampled_patches(open_source(sys.argv[1]), "grid"))
        assert items[0].skipped is None and len(items[0].patches) > 0, items[0].skipped
    else:  # the detection set's loader, at its largest multiscale setting
        image, _ = read_image(sys.argv[1], DetectionConfig(scales=(1200,), max_size=2000))
    print((status("VmHWM:") - before) / 1024)
""")


def peak_megabytes(path, reader):
    """Growth of a fresh process's peak resident memory while ``reader`` decodes ``path``."""
    result = subprocess.run([sys.executable, "-c", PEAK, str(path), reader], capture_output=True,
                            text=True, cwd=REPO, check=True)
    return float(result.stdout.split()[-1])


def test_a_10000_pixel_jpeg_costs_the_feature_tools_and_detection_no_more_than_a_photo(
        tmp_path):
    tile = skimage.data.astronaut()[:500, :500]
    huge = Image.fromarray(np.tile(tile, (20, 20, 1)))  # 10000 x 10000, 300 MB decoded
    huge.save(tmp_path / "huge.jpg", quality=90)
    del huge
    Image.fromarray(np.tile(tile, (3, 4, 1))).save(tmp_path / "photo.jpg", quality=90)  # 2000x1500
    print(f"file sizes: {os.path.getsize(tmp_path / 'photo.jpg') / 2 ** 20:.1f} and "
          f"{os.path.getsize(tmp_path / 'huge.jpg') / 2 ** 20:.1f} MB")
    for reader in ("features", "detection"):
        photo = peak_megabytes(tmp_path / "photo.jpg", reader)
        big = peak_megabytes(tmp_path / "huge.jpg", reader)
        print(f"{reader}: peak growth: 2000x1500 photo {photo:.0f} MB, "
              f"10000x10000 JPEG {big:.0f} MB")
        assert big < photo + 80, (reader, photo, big)  # at full size: over 300 MB more


def test_detection_sees_a_reduced_image_at_the_same_scale_and_boxes(tmp_path):
    from ctxpred.detection.roidb import DetectionConfig, image_blob, read_image

    upright = np.tile(skimage.data.astronaut(), (4, 5, 1))  # 2048 x 2560
    Image.fromarray(upright).save(tmp_path / "big.jpg", quality=95)
    sideways(upright, tmp_path / "turned.jpg")
    config = DetectionConfig(scales=(300,), max_size=500)
    image, full_size = read_image(tmp_path / "big.jpg", config)
    # DCT scale 1/4: at least 300 x 500 pixels, more than the blob uses.
    assert full_size == (2048, 2560) and image.shape == (512, 640, 3)
    full = cv2.imread(str(tmp_path / "big.jpg"), cv2.IMREAD_COLOR)
    (blob, (scale,)), (full_blob, (full_scale,)) = (
        image_blob([image], config, 300, [full_size]), image_blob([full], config, 300))
    assert scale == full_scale == 300 / 2048 and blob.shape == full_blob.shape
    # The same picture (the full-size path aliases more: linear interpolation at 1/7).
    assert np.corrcoef(blob.ravel(), full_blob.ravel())[0, 1] > 0.95
    turned, turned_size = read_image(tmp_path / "turned.jpg", config)
    assert turned.shape == image.shape and turned_size == full_size  # upright, as cv2.imread
