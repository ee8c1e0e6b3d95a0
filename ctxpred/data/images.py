"""Image sources (folder, glob, list file, Caffe LMDB) and robust RGB decoding.

An :class:`ImageSource` is an indexable, picklable collection of encoded
images. It hands out raw bytes; :func:`decode_rgb` turns bytes into an
HxWx3 uint8 RGB array, and :func:`random_resize` applies the per-image random
rescale of the sampling procedure (total pixel count uniform in
[150000, 450000], aspect ratio kept).

Every failure to read or decode one image raises :class:`ImageError` naming
the image, so a loader can skip it and go on.
"""

from __future__ import annotations

import abc
import collections
import glob
import io
import math
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)

_GLOB_CHARACTERS = frozenset("*?[")
_INTEGER = re.compile(r"[+-]?\d+")
_JPEG_MAGIC = b"\xff\xd8\xff"
_OBJECT_ADDRESS = re.compile(r" ?<[^<>]* at 0x[0-9a-f]+>")
_MAX_UINT16 = 65535
# What Pillow raises on broken, truncated or unsupported data: it has no
# common base class for decode errors.
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    TypeError,
    KeyError,
    Image.DecompressionBombError,
)


class ImageError(ValueError):
    """One image cannot be read or decoded; ``name`` says which, ``reason`` why."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


class IgnoredFilesWarning(UserWarning):
    """A folder or glob source holds files whose extensions are not read as images."""


def no_usable_image(source: "ImageSource", skipped: dict[str, str]) -> ValueError:
    """The error for a source none of whose images could be used: names it and says why."""
    examples = "; ".join(f"{name}: {reason}" for name, reason in list(skipped.items())[:3])
    more = "; ..." if len(skipped) > 3 else ""
    return ValueError(f"no usable image in {source.description}"
                      + (f": {len(skipped)} skipped ({examples}{more})" if skipped else ""))


def has_image_extension(path: str) -> bool:
    """True when ``path`` ends in one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


# ---------------------------------------------------------------------------
# Caffe Datum (protobuf wire format, only what an image loader needs)


@dataclass(frozen=True)
class Datum:
    """The fields of a Caffe ``Datum`` message that describe one image.

    ``data`` holds the encoded file when ``encoded`` is true, otherwise raw
    uint8 pixels in CHW, BGR order of shape (channels, height, width).
    """

    channels: int = 0
    height: int = 0
    width: int = 0
    data: bytes = b""
    label: int = 0
    encoded: bool = False


_DATUM_VARINT_FIELDS = {1: "channels", 2: "height", 3: "width", 5: "label", 7: "encoded"}
_DATUM_DATA_FIELD = 4
_WIRE_VARINT, _WIRE_FIXED64, _WIRE_BYTES, _WIRE_FIXED32 = 0, 1, 2, 5


def _read_varint(buffer: bytes, position: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``position``; returns (value, next position)."""
    value = 0
    shift = 0
    while True:
        if position >= len(buffer):
            raise ValueError("truncated varint")
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
        if shift >= 64:
            raise ValueError("varint longer than 10 bytes")


def parse_datum(message: bytes) -> Datum:
    """Parse a serialised Caffe ``Datum``; unknown fields (float_data...) are skipped.

    Raises ValueError on malformed wire data.
    """
    fields: dict[str, object] = {}
    position = 0
    while position < len(message):
        tag, position = _read_varint(message, position)
        field_number, wire_type = tag >> 3, tag & 7
        if wire_type == _WIRE_VARINT:
            value, position = _read_varint(message, position)
            if field_number in _DATUM_VARINT_FIELDS:
                # int32 fields carry negative values as 64-bit two's complement.
                fields[_DATUM_VARINT_FIELDS[field_number]] = (
                    value - (1 << 64) if value >= 1 << 63 else value
                )
        elif wire_type == _WIRE_BYTES:
            length, position = _read_varint(message, position)
            end = position + length
            if end > len(message):
                raise ValueError("truncated length-delimited field")
            if field_number == _DATUM_DATA_FIELD:
                fields["data"] = bytes(message[position:end])
            position = end
        elif wire_type == _WIRE_FIXED64:
            position += 8
        elif wire_type == _WIRE_FIXED32:
            position += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        if position > len(message):
            raise ValueError("truncated fixed-width field")
    if "encoded" in fields:
        fields["encoded"] = bool(fields["encoded"])
    return Datum(**fields)


# ---------------------------------------------------------------------------
# Sources


class ImageSource(abc.ABC):
    """An indexable, picklable collection of encoded images."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def name(self, index: int) -> str:
        """Human-readable name of image ``index``: a path or ``lmdb:KEY``."""

    @abc.abstractmethod
    def read_bytes(self, index: int) -> bytes:
        """The encoded image file; raises :class:`ImageError` naming it on failure."""

    @abc.abstractmethod
    def label(self, index: int) -> int | None:
        """The label stored with image ``index``, or None when the source has none."""

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """What the source is, for messages (kind, location, image count)."""


class SubsetSource(ImageSource):
    """The images ``indices`` of another source, in that order (a view, nothing copied)."""

    def __init__(self, source: ImageSource, indices: Iterable[int]):
        self._source = source
        self._indices = tuple(int(index) for index in indices)

    def __len__(self) -> int:
        return len(self._indices)

    def name(self, index: int) -> str:
        return self._source.name(self._indices[index])

    def read_bytes(self, index: int) -> bytes:
        return self._source.read_bytes(self._indices[index])

    def label(self, index: int) -> int | None:
        return self._source.label(self._indices[index])

    @property
    def description(self) -> str:
        return f"{len(self)} images of {self._source.description}"


class FileSource(ImageSource):
    """Images stored as files: a folder scan, a glob, a list file or one file."""

    def __init__(self, paths: list[str], labels: list[int | None], description: str):
        if len(paths) != len(labels):
            raise ValueError("paths and labels differ in length")
        self._paths = tuple(paths)
        self._labels = tuple(labels)
        self._description = description

    def __len__(self) -> int:
        return len(self._paths)

    def name(self, index: int) -> str:
        return self._paths[index]

    def read_bytes(self, index: int) -> bytes:
        path = self._paths[index]
        try:
            with open(path, "rb") as file:
                return file.read()
        except OSError as error:
            raise ImageError(path, f"cannot read: {error.strerror or error}") from error

    def label(self, index: int) -> int | None:
        return self._labels[index]

    @property
    def description(self) -> str:
        return self._description


class LmdbSource(ImageSource):
    """A Caffe LMDB of encoded ``Datum`` records (``convert_imageset --encoded``).

    The key list is read once at construction. Each read opens the
    environment, fetches one record and closes it again (about 0.1 ms, small
    next to decoding): an LMDB environment must not cross ``fork`` and may be
    open only once per process, so holding none keeps instances picklable,
    fork-safe and free to coexist.
    """

    def __init__(self, path: str):
        self._path = path
        with self._open_environment() as environment, environment.begin() as transaction:
            self._keys = tuple(transaction.cursor().iternext(keys=True, values=False))
        if not self._keys:
            raise ValueError(f"LMDB {path!r} holds no records")

    def _open_environment(self):
        # Imported here: lmdb is only needed by LMDB sources.
        import lmdb

        return lmdb.open(self._path, readonly=True, lock=False, readahead=False, subdir=True)

    def __len__(self) -> int:
        return len(self._keys)

    def name(self, index: int) -> str:
        return "lmdb:" + self._keys[index].decode("utf-8", "backslashreplace")

    def _datum(self, index: int) -> Datum:
        with self._open_environment() as environment, environment.begin() as transaction:
            message = transaction.get(self._keys[index])
        if message is None:
            raise ImageError(self.name(index), "record vanished from the LMDB")
        try:
            return parse_datum(message)
        except ValueError as error:
            raise ImageError(self.name(index), f"malformed Datum: {error}") from error

    def read_bytes(self, index: int) -> bytes:
        datum = self._datum(index)
        if not datum.encoded:
            raise ImageError(
                self.name(index),
                "Datum holds raw pixels; only encoded Datums "
                "(convert_imageset --encoded) are supported",
            )
        return datum.data

    def label(self, index: int) -> int | None:
        return self._datum(index).label

    @property
    def description(self) -> str:
        return f"LMDB {self._path} ({len(self)} images)"


def _scan_folder(folder: str) -> list[str]:
    """Every file under ``folder``, sorted."""
    return sorted(
        os.path.join(directory, file_name)
        for directory, _, file_names in os.walk(folder)
        for file_name in file_names
    )


def _keep_images(paths: list[str]) -> tuple[list[str], str]:
    """(the paths with image extensions, "ignored N files: .gif (2), .txt (1)" or "")."""
    images = [path for path in paths if has_image_extension(path)]
    others = collections.Counter(
        os.path.splitext(path)[1].lower() or "(no extension)"
        for path in paths if not has_image_extension(path) and os.path.isfile(path))
    if not others:
        return images, ""
    count = sum(others.values())
    kinds = ", ".join(f"{extension} ({number})" for extension, number in others.most_common())
    return images, f"ignored {count} file{'s' * (count != 1)}: {kinds}"


def _parse_list_file(list_path: str, root: str) -> tuple[list[str], list[int | None]]:
    """Read a Caffe-style list: ``path [label]`` per line; ``#`` starts a comment line.

    The last word is the label when it is an integer; the rest of the line,
    spaces included, is the path.
    """
    paths: list[str] = []
    labels: list[int | None] = []
    with open(list_path, encoding="utf-8") as file:
        for line in file:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            words = line.rsplit(None, 1)
            if len(words) == 2 and _INTEGER.fullmatch(words[1]):
                paths.append(os.path.join(root, words[0]))
                labels.append(int(words[1]))
            else:
                paths.append(os.path.join(root, line))
                labels.append(None)
    return paths, labels


def open_source(spec: str, root: str | None = None) -> ImageSource:
    """Open the images described by ``spec``.

    - a directory holding ``data.mdb``: LMDB of encoded Caffe Datums;
    - another directory: its image files, recursively, sorted by path;
    - a string with glob characters (``**`` recursive): matching image files, sorted;
    - an image file: that one image;
    - any other file: a Caffe-style list, one ``path [label]`` per line, paths
      relative to ``root`` (default: the list file's folder); blank lines and
      ``#`` comments are ignored.

    Files of a folder or glob without an image extension are counted:
    an :class:`IgnoredFilesWarning` (and the description) says "ignored N
    files: .gif (2), ...". Raises ValueError naming ``spec`` when it does not
    exist or matches no image.
    """
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "data.mdb")):
            return LmdbSource(spec)
        paths, ignored = _keep_images(_scan_folder(spec))
        labels: list[int | None] = [None] * len(paths)
        kind = "folder"
    elif os.path.isfile(spec) and has_image_extension(spec):
        paths, labels, kind, ignored = [spec], [None], "image file", ""
    elif os.path.isfile(spec):
        list_root = root if root is not None else os.path.dirname(os.path.abspath(spec))
        try:
            paths, labels = _parse_list_file(spec, list_root)
        except UnicodeDecodeError as error:
            raise ValueError(
                f"image source {spec!r} is neither an image nor a text list file"
            ) from error
        kind, ignored = f"list file (root {list_root})", ""
    elif _GLOB_CHARACTERS & set(spec):
        paths, ignored = _keep_images(sorted(glob.glob(spec, recursive=True)))
        labels = [None] * len(paths)
        kind = "glob"
    else:
        raise ValueError(f"image source {spec!r} does not exist")
    if not paths:
        raise ValueError(f"image source {spec!r} ({kind}) matches no image"
                         + (f" ({ignored})" if ignored else ""))
    if ignored:
        warnings.warn(f"image source {spec!r}: {ignored}", IgnoredFilesWarning, stacklevel=2)
    return FileSource(paths, labels, f"{kind} {spec} ({len(paths)} images"
                      + (f"; {ignored})" if ignored else ")"))


# ---------------------------------------------------------------------------
# Decoding and resizing


def _reduce_jpeg(image: JpegImagePlugin.JpegImageFile, min_pixels: int) -> Image.Image:
    """Set up a JPEG's decode to be DCT-downscaled to >= ``min_pixels`` pixels.

    The image is opened through the JPEG plugin directly rather than
    ``Image.open``: the latter applies Pillow's decompression-bomb check to the
    full-resolution size, before ``draft`` can shrink the decode by up to 8x
    per side. The bound is applied to the reduced size instead.
    """
    width, height = image.size
    if width * height > min_pixels:
        shrink = math.sqrt(min_pixels / (width * height))
        image.draft(None, (math.ceil(width * shrink), math.ceil(height * shrink)))
    # Pillow's own error threshold is twice its (user-adjustable) warning threshold.
    warning_pixels = Image.MAX_IMAGE_PIXELS
    if warning_pixels is not None and image.width * image.height > 2 * warning_pixels:
        raise Image.DecompressionBombError(
            f"image of {image.width}x{image.height} pixels after reduced-scale decoding "
            f"exceeds {2 * warning_pixels} pixels"
        )
    return image


def _grey_to_uint8(image: Image.Image) -> np.ndarray | None:
    """16-bit / 32-bit integer and float greyscale as uint8 HxW, else None.

    Integer modes are taken as 16-bit intensities and scaled 0..65535 -> 0..255
    with rounding; float ('F') images as intensities in [0, 1]. Both are
    clipped to those ranges first.
    """
    if image.mode.startswith("I"):
        values = np.clip(np.asarray(image).astype(np.int64), 0, _MAX_UINT16)
        return ((values * 255 + _MAX_UINT16 // 2) // _MAX_UINT16).astype(np.uint8)
    if image.mode == "F":
        values = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
        return np.rint(values * 255.0).astype(np.uint8)
    return None


# EXIF orientation (tag 0x0112) -> the transposition that makes the image upright.
_ORIENTATION_TAG = 0x0112
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
_SIDEWAYS = frozenset({5, 6, 7, 8})

# What the feature tools decode at most by default: a 10000 x 10000 JPEG is
# DCT-reduced to 2500 x 2500 while decoding, then shrunk to this.
DEFAULT_MAX_PIXELS = 4_000_000


def decode_rgb_sized(data: bytes, name: str, max_pixels: int | None = None,
                     min_side: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """(:func:`decode_rgb`'s array, the upright image's full (height, width))."""
    if not data:
        raise ImageError(name, "empty file (0 bytes)")
    try:
        if max_pixels is not None and data.startswith(_JPEG_MAGIC):
            image = JpegImagePlugin.JpegImageFile(io.BytesIO(data))
            width, height = image.size
            _check_size(name, width, height, min_side)
            image = _reduce_jpeg(image, max_pixels)
        else:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            _check_size(name, width, height, min_side)
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)
        image.load()
        grey = _grey_to_uint8(image)
        if grey is not None:
            image = Image.fromarray(grey)
        if image.mode in ("P", "PA"):
            # Via RGBA: Pillow warns when a palette with transparency goes straight to RGB.
            image = image.convert("RGBA")
        if orientation in _UPRIGHT:
            image = image.transpose(_UPRIGHT[orientation])
        full_size = (width, height) if orientation in _SIDEWAYS else (height, width)
        if image.mode != "RGB":  # convert() would copy even an RGB image
            image = image.convert("RGB")
        return np.array(image, dtype=np.uint8), full_size
    except ImageError:
        raise
    except UnidentifiedImageError as error:  # its message quotes a BytesIO object's address
        raise ImageError(name, "not an image in a format Pillow reads") from error
    except _DECODE_ERRORS as error:
        raise ImageError(name, f"cannot decode image: {_OBJECT_ADDRESS.sub('', str(error))}") \
            from error


def _check_size(name, width, height, min_side):
    if min_side is not None and min(width, height) < min_side:
        raise ImageError(name, f"{width}x{height} pixels is smaller than one "
                               f"{min_side}x{min_side} patch")


def decode_rgb(data: bytes, name: str, max_pixels: int | None = None,
               min_side: int | None = None) -> np.ndarray:
    """Decode an encoded image into a writable (H, W, 3) uint8 RGB array, upright.

    The EXIF orientation tag is honoured, as ``cv2.imread`` and Pillow's
    ``ImageOps.exif_transpose`` do: a photo stored sideways comes out upright.
    Greyscale is replicated to three channels, alpha dropped (not composited),
    palette and CMYK converted by Pillow, 16-bit data scaled to 8 bits (Pillow
    keeps the high byte of 16-bit RGB; 16-bit greyscale is scaled with
    rounding), float greyscale read as [0, 1].

    ``max_pixels``: when given and the data is a JPEG, decode at the smallest
    DCT scale (1, 1/2, 1/4 or 1/8 per side) that still yields at least
    ``max_pixels`` pixels, so huge JPEGs never occupy full-resolution memory.
    Other formats are always decoded at full size; images above Pillow's
    decompression-bomb limit (2 * ``PIL.Image.MAX_IMAGE_PIXELS``, about 179
    million pixels, after any reduced-scale decode) are rejected.

    ``min_side``: reject an image whose full-size width or height is below it
    (smaller than one patch), before decoding it.

    Raises :class:`ImageError` naming ``name`` for empty, truncated, corrupt,
    non-image, unsupported or too small data.
    """
    return decode_rgb_sized(data, name, max_pixels, min_side)[0]


def decode_rgb_within(data: bytes, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                      min_side: int | None = None) -> tuple[np.ndarray, float]:
    """(upright RGB image of at most ``max_pixels`` pixels, scale), as the feature tools see it.

    A JPEG is DCT-reduced while decoding (:func:`decode_rgb`), then any image
    is shrunk with :func:`limit_pixels`, so memory is bounded by
    ``max_pixels``, not by the file. scale: the result's width over the full
    upright image's width (1.0 when nothing was shrunk). None: full size.
    """
    image, (_, full_width) = decode_rgb_sized(data, name, max_pixels, min_side)
    image, _ = limit_pixels(image, max_pixels)
    return image, image.shape[1] / full_width


def decode_squashed(data: bytes, name: str, height: int, width: int) -> np.ndarray:
    """An encoded image as (height, width, 3) uint8 RGB, upright, squashed to that size.

    The aspect ratio is not kept (Caffe's ImageData ``new_height`` /
    ``new_width`` and the frozen-feature protocols do the same). JPEGs are
    DCT-reduced while decoding to no fewer than 4 x height x width pixels;
    OpenCV area interpolation shrinks, bilinear enlarges. Raises
    :class:`ImageError` naming ``name`` for data that does not decode.
    """
    image = decode_rgb(data, name, max_pixels=4 * height * width)
    shrinking = image.shape[0] * image.shape[1] > height * width
    return cv2.resize(image, (width, height),
                      interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def limit_pixels(image, max_pixels=None):
    """(image shrunk to at most ``max_pixels`` pixels, aspect kept, cv2.INTER_AREA; scale).

    scale: new width over old width. None, or an image already small enough,
    comes back unchanged with scale 1.0.
    """
    height, width = image.shape[:2]
    if max_pixels is None or height * width <= max_pixels:
        return image, 1.0
    scale = (max_pixels / (height * width)) ** 0.5
    size = (max(1, int(width * scale)), max(1, int(height * scale)))  # floor: stays <= max_pixels
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), size[0] / width


def random_resize(
    image: np.ndarray,
    rng: np.random.Generator,
    min_pixels: int = 150_000,
    max_pixels: int = 450_000,
) -> np.ndarray:
    """Resize (H, W, C) ``image`` to a random total pixel count, keeping aspect ratio.

    The target count is a uniform integer in [min_pixels, max_pixels]; the
    output sides are the input sides times sqrt(target / (H * W)), rounded
    (at least 1). Uses cv2.INTER_AREA to shrink and cv2.INTER_LINEAR to enlarge.
    """
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
    height, width = image.shape[:2]
    target_pixels = int(rng.integers(min_pixels, max_pixels, endpoint=True))
    scale = math.sqrt(target_pixels / (height * width))
    new_width = max(1, int(round(width * scale)))
    new_height = max(1, int(round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (new_width, new_height), interpolation=interpolation)
