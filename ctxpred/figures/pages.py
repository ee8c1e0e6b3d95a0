"""Static HTML pages of image patches, to be opened from disk (no server).

- Every link is relative to the page that holds it and percent-encoded, so
  pages open with file://, and a folder of pages with its patch folder can
  be moved or copied whole (links to source images then hold while the
  images keep the same place relative to the pages). Every file name or
  path shown on a page is HTML-escaped, so an image named
  ``<b>x</b>.jpg`` shows as that text.
- :class:`PatchStore` writes each patch image once, as a PNG named by the
  hash of its pixels, into one folder that all pages of a figure share.
- :func:`neighbours_page` writes the nearest-neighbour figure: a row per
  query patch, then one group of columns per net with its k neighbours.
"""
from __future__ import annotations

import hashlib
import html
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

STYLE = """
body { font-family: sans-serif; margin: 1em; }
table { border-collapse: collapse; }
td, th { padding: 2px; text-align: center; vertical-align: top; font-size: 11px; }
th.group, td.first { border-left: 3px solid #444; }
td.query { border-right: 3px solid #444; background: #eef; }
img { display: block; width: 96px; height: 96px; image-rendering: pixelated; }
.name { max-width: 96px; overflow-wrap: anywhere; }
"""


def escape(value):
    """``str(value)`` with & < > " ' written as HTML entities (text or attribute value)."""
    return html.escape(str(value), quote=True)


def link(target, page):
    """URL of file ``target`` relative to the folder of ``page`` (a file), escaped for HTML.

    Each path segment is percent-encoded (so '#', '?', '%', spaces, '<'
    and '&' in names survive), then the whole is HTML-escaped for an
    attribute value.
    """
    relative = os.path.relpath(os.path.abspath(target), os.path.dirname(os.path.abspath(page)))
    return escape(urllib.parse.quote(Path(relative).as_posix(), safe="/"))


class PatchStore:
    """Patch images written once into ``folder``, shared by every page that shows them.

    A patch's file is ``<folder>/<sha256 of its shape and pixels, 24 hex>.png``:
    the same pixels give the same file, whichever page or net asks for them.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def add(self, pixels):
        """Path of the PNG of (H, W, 3) uint8 RGB ``pixels``, written if not there yet."""
        pixels = np.ascontiguousarray(pixels)
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"a patch must be (H, W, 3) uint8, got {pixels.dtype} {pixels.shape}")
        digest = hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()
        path = self.folder / f"{digest[:24]}.png"
        if not path.exists():
            partial = path.with_suffix(".png.part")
            Image.fromarray(pixels).save(partial, format="PNG")
            os.replace(partial, path)
        return path


@dataclass(frozen=True)
class ShownPatch:
    """A patch on a page: its pixels, where it comes from, and its score.

    pixels: (p, p, 3) uint8 RGB. image: the name of its image (a path, or
    ``lmdb:KEY``). box: (x, y, w, h) pixels in that image. similarity:
    cosine similarity to the query, or None for the query itself.
    """

    pixels: np.ndarray
    image: str
    box: tuple
    similarity: float | None = None


def patch_cell(store, page, patch, css_class=""):
    """A ``<td>`` with the patch's image (linked to its source image when that is a file).

    The tooltip names the image and the box; the caption is the similarity
    (neighbours) or the image's file name (queries), escaped.
    """
    source = escape(f"{patch.image} (x={patch.box[0]}, y={patch.box[1]}, "
                    f"{patch.box[2]}x{patch.box[3]})")
    image = f'<img src="{link(store.add(patch.pixels), page)}" alt="{source}" title="{source}">'
    if os.path.isfile(patch.image):
        image = f'<a href="{link(patch.image, page)}">{image}</a>'
    caption = (os.path.basename(patch.image) if patch.similarity is None
               else f"{patch.similarity:.3f}")
    return f'<td class="{css_class}">{image}<div class="name">{escape(caption)}</div></td>'


def write_page(path, title, body):
    """Write a UTF-8 HTML document: escaped ``title``, STYLE, and ``body`` (HTML) as given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n'
                    f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n"
                    f"<body>\n<h1>{escape(title)}</h1>\n{body}\n</body>\n</html>\n",
                    encoding="utf-8")
    return path


def neighbours_page(path, store, title, intro, labels, rows):
    """Write the nearest-neighbour figure to ``path``; returns ``path``.

    intro: HTML placed above the table (escape any names in it). labels:
    one heading per net. rows: one (query, neighbours) per query, query a
    :class:`ShownPatch`, neighbours a list per net (in ``labels`` order) of
    its k ShownPatch, most similar first; a None (fewer allowed rows than
    k) leaves an empty cell.
    """
    if not rows:
        raise ValueError("a neighbours page needs at least one query")
    k = max(len(found) for _, groups in rows for found in groups)
    heading = "".join(f'<th class="group" colspan="{k}">{escape(label)}</th>' for label in labels)
    ranks = "".join(f'<th class="{"group" if rank == 1 else ""}">{rank}</th>'
                    for _ in labels for rank in range(1, k + 1))
    lines = ["<table>", f"<tr><th>query</th>{heading}</tr>", f"<tr><th></th>{ranks}</tr>"]
    for query, groups in rows:
        if len(groups) != len(labels):
            raise ValueError(f"each query needs {len(labels)} neighbour lists, got {len(groups)}")
        cells = [patch_cell(store, path, query, "query")]
        for found in groups:
            found = list(found) + [None] * (k - len(found))
            for rank, patch in enumerate(found):
                css_class = "first" if rank == 0 else ""
                cells.append(f'<td class="{css_class}"></td>' if patch is None
                             else patch_cell(store, path, patch, css_class))
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</table>")
    return write_page(path, title, intro + "\n" + "\n".join(lines))
