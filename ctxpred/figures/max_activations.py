"""Maximal activations, the run: random patches through a net, each unit's top 9, pages per layer.

:func:`max_activations` does what tools/max_activations.py describes, with the
pieces of :mod:`ctxpred.figures.activations`:

- Patches: ``per_image`` random 96x96 patches per image at positions fixed by
  the seed (:func:`ctxpred.features.patches.sampled_patches`), images in
  order, numbered from 0; the first ``patches`` of that stream are used.
- One net, cut after the deepest of ``layers``, runs once per batch; every
  requested blob is read from the same forward pass into a
  :class:`~ctxpred.figures.activations.StreamingTopK` per layer.
- Resuming: the state (top 9 per unit, patch ids, patches seen, the settings
  it depends on) goes to ``out``/state.npz every ``chunk`` patches and at the
  end; a rerun with the same settings continues after the patches seen
  (they are cut again, not run through the net); other settings are refused.
- Pages: ``out``/<layer>.html (a 3x3 grid of the 9 top patches per unit, best
  first, black outside the unit's receptive field), ``out``/index.html
  linking them, patch images in ``out``/patches/.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ctxpred.data.images import open_source
from ctxpred.features.extractor import FeatureExtractor
from ctxpred.features.forward import CaffeForward
from ctxpred.features.nets import read_deploy_param
from ctxpred.features.patches import sampled_patches
from ctxpred.features.streaming import patch_batches
from ctxpred.figures import pages
from ctxpred.figures.activations import (StreamingTopK, masked_patch, receptive_fields,
                                         unit_activations)
from ctxpred.models.context import snapshot_param

K = 9  # top patches kept per unit: a 3 x 3 grid
UNITS_PER_ROW = 6  # unit grids per row of a layer's page


@dataclass(frozen=True)
class MaxActivationSettings:
    """One run. weights: caffemodel with the layers up to the deepest of ``layers`` (blob
    names of ``deploy``, the deploy prototxt of architecture ``net``). patches: patches run
    in total (a resumed run counts earlier ones). per_image: random patches cut per image.
    chunk: patches between state saves. units: only the first U channels of each layer
    (None: all). batch: patches per net.forward. out: the output folder."""

    weights: str
    images: str
    deploy: str
    out: str
    patches: int
    layers: tuple = ("norm1", "norm2", "conv3", "conv4", "conv5", "fc6")
    per_image: int = 16
    net: str = "color_dropping"
    seed: int = 0
    batch: int = 64
    chunk: int = 10000
    units: int | None = None


def numbered_patches(items, skip):
    """(patch id, image name, box, pixels) of every patch of ``items`` (ImagePatches), ids from
    0, the first ``skip`` left out."""
    number = 0
    for item in items:
        for box, pixels in zip(item.boxes, item.patches):
            if number >= skip:
                yield number, item.name, box, pixels
            number += 1


def patch_stream(settings, source, skip=0):
    """:func:`numbered_patches` of the run's random patches of ``source``."""
    return numbered_patches(sampled_patches(source, "random", settings.per_image, settings.seed),
                            skip)


def update_tops(settings, source, extractor, tops, state_path, state_settings):
    """Run the patches not seen yet through ``extractor.net`` into ``tops`` ({layer:
    StreamingTopK}), saving the state every ``settings.chunk`` patches and at the end."""
    seen = next(iter(tops.values())).seen
    forward = CaffeForward(extractor.net, list(tops))
    items = sampled_patches(source, "random", settings.per_image, settings.seed)
    progress = tqdm(total=settings.patches, initial=seen, unit="patch")
    last_saved = seen
    for batch in patch_batches(items, settings.batch, extractor.patch, skip=seen,
                               stop=settings.patches):
        ids = np.arange(batch.first, batch.first + len(batch.pixels))
        blobs = forward(batch.pixels)
        for layer, top in tops.items():
            values, ys, xs = unit_activations(blobs[layer][:, :top.units])
            top.update(values, ids, ys, xs)
        seen += len(batch.pixels)
        progress.update(len(batch.pixels))
        if seen - last_saved >= settings.chunk:
            save_state(state_path, tops, state_settings)
            last_saved = seen
    progress.close()
    if seen < settings.patches:
        print(f"the images hold only {seen} patches ({settings.per_image} per image)")
    save_state(state_path, tops, state_settings)


def save_state(path, tops, state_settings):
    """Write every layer's StreamingTopK and the settings it depends on to ``path`` atomically."""
    arrays = {f"setting_{key}": np.asarray(value) for key, value in state_settings.items()}
    for layer, top in tops.items():
        arrays.update(top.state(f"{layer}/"))
    partial = path.with_name(path.name + ".part.npz")
    np.savez(partial, **arrays)
    partial.replace(path)


def load_tops(path, units, state_settings):
    """{layer: StreamingTopK} from ``path`` when it exists (its settings must equal
    ``state_settings``, else ValueError), else empty ones; units: {layer: channels kept}."""
    if not path.is_file():
        return {layer: StreamingTopK(count, K) for layer, count in units.items()}
    with np.load(path) as arrays:
        for key, value in state_settings.items():
            saved = arrays[f"setting_{key}"] if f"setting_{key}" in arrays.files else None
            if saved is None or str(saved) != str(np.asarray(value)):
                raise ValueError(f"{path} was written with another {key} ({saved}, now "
                                 f"{value}); use another --out or the same flags")
        return {layer: StreamingTopK.from_state(arrays, f"{layer}/") for layer in units}


def top_patch_cells(settings, source, tops, fields, store):
    """{(layer, unit, rank): <td> HTML} of every kept patch, masked to the unit's field.

    The patches are cut again from the stream, up to the last one kept.
    """
    wanted = {}  # patch id -> [(layer, unit, rank)]
    for layer, top in tops.items():
        for (unit, rank), number in np.ndenumerate(top.patch):
            if number >= 0:
                wanted.setdefault(int(number), []).append((layer, unit, rank))
    cells = {}
    last = max(wanted, default=-1)
    for number, name, box, pixels in patch_stream(settings, source):
        if number > last:
            break
        for layer, unit, rank in wanted.get(number, ()):
            top = tops[layer]
            y, x = int(top.y[unit, rank]), int(top.x[unit, rank])
            image = store.add(masked_patch(pixels, fields[layer], y, x))
            title = pages.escape(f"{name} (x={box[0]}, y={box[1]}), unit position ({y}, {x}), "
                                 f"activation {top.values[unit, rank]:.4g}")
            link = pages.link(image, Path(settings.out) / f"{layer}.html")
            cells[layer, unit, rank] = f'<td><img src="{link}" alt="{title}" title="{title}"></td>'
    return cells


def write_layer_page(path, layer, top, field, cells):
    """``path``: per unit of ``layer`` a 3x3 grid of its top patches (``cells``)."""
    units = []
    for unit in range(top.units):
        grid = [cells.get((layer, unit, rank), "<td></td>") for rank in range(K)]
        rows = "".join("<tr>" + "".join(grid[row * 3:row * 3 + 3]) + "</tr>" for row in range(3))
        units.append(f'<td><table class="grid">{rows}</table>unit {unit}</td>')
    table = "".join("<tr>" + "".join(units[start:start + UNITS_PER_ROW]) + "</tr>"
                    for start in range(0, len(units), UNITS_PER_ROW))
    intro = (f"<p>{pages.escape(layer)}: the {K} of {top.seen} random patches that activate "
             f"each unit most (best first, row by row); outside the unit's receptive field "
             f"({field.size} pixels, stride {field.jump}) black.</p>")
    return pages.write_page(path, f"Maximal activations of {layer}",
                            f"{intro}<table>{table}</table>")


def write_pages(settings, source, tops, fields):
    """``out``/<layer>.html per layer and ``out``/index.html; returns the index's path."""
    out = Path(settings.out)
    cells = top_patch_cells(settings, source, tops, fields, pages.PatchStore(out / "patches"))
    links = []
    for layer, top in tops.items():
        path = write_layer_page(out / f"{layer}.html", layer, top, fields[layer], cells)
        links.append(f'<li><a href="{pages.link(path, out / "index.html")}">'
                     f"{pages.escape(layer)}</a> ({top.units} units)</li>")
    intro = (f"<p>Weights {pages.escape(settings.weights)}, deploy net "
             f"{pages.escape(settings.deploy)}, images {pages.escape(settings.images)}, seed "
             f"{settings.seed}.</p>")
    return pages.write_page(out / "index.html", "Maximal activations",
                            intro + "<ul>" + "".join(links) + "</ul>")


def max_activations(settings: MaxActivationSettings):
    """Run (or resume) ``settings`` and write its pages: (index.html path, patches seen).

    Needs pycaffe loaded (:func:`ctxpred.caffe.env.load_caffe`). Raises
    ValueError for an unknown blob, weights that do not fit, or a state file
    of other settings; FileNotFoundError for missing files.
    """
    source = open_source(settings.images)
    param = read_deploy_param(settings.deploy)
    fields = {layer: receptive_fields(param, layer) for layer in settings.layers}
    order = {top: index for index, layer in enumerate(param.layer) for top in layer.top}
    deepest = max(settings.layers, key=order.get)
    extractor = FeatureExtractor(settings.deploy, settings.weights, deepest, settings.batch,
                                 train_param=snapshot_param(settings.net))
    units = {layer: min(settings.units or np.inf, extractor.net.blobs[layer].data.shape[1])
             for layer in settings.layers}
    state_settings = {
        "images": settings.images, "seed": settings.seed, "per_image": settings.per_image,
        "weights": str(Path(settings.weights).resolve()), "deploy": settings.deploy,
        "layers": ",".join(settings.layers),
        "units": ",".join(str(units[layer]) for layer in settings.layers)}
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    tops = load_tops(out / "state.npz", units, state_settings)
    update_tops(settings, source, extractor, tops, out / "state.npz", state_settings)
    return write_pages(settings, source, tops, fields), next(iter(tops.values())).seen
