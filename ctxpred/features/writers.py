"""Feature files written block by block: HDF5 (features, image, box, scale) or .npy.

Both write ``PATH.part`` and rename it to PATH on success; leaving a writer
by an exception deletes the partial file, so a half-written file never
carries the final name.
"""
import os
from pathlib import Path

import h5py
import numpy as np


class FeatureFile:
    """Shared by the writers: a '.part' file renamed to ``path`` on success, and a row buffer.

    Use as a context manager; leaving it by an exception deletes the partial
    file. Subclasses open ``self._file`` (closed on exit) and write rows in
    ``_write``; ``_finalise`` runs before a successful close.
    """

    def __init__(self, path, dim, flush_rows):
        self.path = Path(path)
        self.dim = dim
        self.rows = 0
        self.flush_rows = flush_rows
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.path.with_name(self.path.name + ".part")
        self._pending = []
        self._pending_rows = 0

    def append(self, features, images, boxes, scales):
        """Add rows: features (n, D) float32, images n names, boxes (n, 4) int, scales (n,)."""
        self._pending.append((features, list(images), boxes, scales))
        self._pending_rows += len(features)
        self.rows += len(features)
        if self._pending_rows >= self.flush_rows:
            self._flush()

    def _flush(self):
        if self._pending:
            features, images, boxes, scales = zip(*self._pending)
            self._pending, self._pending_rows = [], 0
            self._write(np.concatenate(features), [name for chunk in images for name in chunk],
                        np.concatenate(boxes), np.concatenate(scales))

    def _finalise(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if kind is None:
            self._flush()
            self._finalise()
        self._file.close()
        if kind is None:
            os.replace(self._partial, self.path)
        else:
            self._partial.unlink(missing_ok=True)


class HDF5FeatureWriter(FeatureFile):
    """HDF5 output, datasets grown as rows arrive (chunked, unlimited first axis).

    features (rows, D) float32; image (rows,) UTF-8 path of each row's image;
    box (rows, 4) int64 x, y, w, h in pixels of the image the patch was cut
    from; scale (rows,) float32, that image's width over the decoded image's
    width (box / scale is in decoded pixels). ``attrs`` become file attributes.
    """

    def __init__(self, path, dim, attrs=None, flush_rows=256):
        super().__init__(path, dim, flush_rows)
        self._file = h5py.File(self._partial, "w")
        self._datasets = {
            "features": self._file.create_dataset(
                "features", (0, dim), "f4", maxshape=(None, dim),
                chunks=(max(1, min(1024, (1 << 20) // (4 * dim))), dim)),
            "image": self._file.create_dataset("image", (0,), h5py.string_dtype("utf-8"),
                                               maxshape=(None,), chunks=(1024,)),
            "box": self._file.create_dataset("box", (0, 4), "i8", maxshape=(None, 4),
                                             chunks=(1024, 4)),
            "scale": self._file.create_dataset("scale", (0,), "f4", maxshape=(None,),
                                               chunks=(1024,)),
        }
        for key, value in (attrs or {}).items():
            self._file.attrs[key] = value

    def _write(self, features, images, boxes, scales):
        start = self._datasets["features"].shape[0]
        for name, values in (("features", features), ("image", np.asarray(images, object)),
                             ("box", boxes), ("scale", scales)):
            dataset = self._datasets[name]
            dataset.resize(start + len(features), axis=0)
            dataset[start:] = values


class NpyFeatureWriter(FeatureFile):
    """A .npy file of the features only, (rows, D) float32: no image names, boxes or attributes.

    Rows are appended to the file as they come; the header, written first
    for 0 rows, is rewritten with the final count at the end (numpy pads
    .npy headers so that the row count can grow in place).
    """

    def __init__(self, path, dim, flush_rows=256):
        super().__init__(path, dim, flush_rows)
        self._file = open(self._partial, "wb")
        self._header_size = self._write_header(0)

    def _write_header(self, rows):
        np.lib.format.write_array_header_1_0(
            self._file, {"descr": "<f4", "fortran_order": False, "shape": (rows, self.dim)})
        return self._file.tell()

    def _write(self, features, images, boxes, scales):
        self._file.write(np.ascontiguousarray(features, dtype="<f4").tobytes())

    def _finalise(self):
        self._file.seek(0)
        if self._write_header(self.rows) != self._header_size:
            raise RuntimeError("the .npy header changed size; the file is corrupt")


def open_feature_writer(path, dim, attrs=None, flush_rows=256):
    """:class:`NpyFeatureWriter` for a path ending in .npy, else :class:`HDF5FeatureWriter`."""
    if Path(path).suffix == ".npy":
        return NpyFeatureWriter(path, dim, flush_rows)
    return HDF5FeatureWriter(path, dim, attrs, flush_rows)
