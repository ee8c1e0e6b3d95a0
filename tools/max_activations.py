"""Maximal activations (project page figure): per unit, the 9 patches that excite it most.

--patches random 96x96 patches are cut from --images: --per-image patches
per image at uniform positions fixed by --seed (features.sampled_patches),
images in order, the first --patches of that stream. One net, cut after the
deepest of --layers, runs once per batch and every requested blob is read
from the same forward pass. A unit's activation on a patch is its value
(fc blobs) or its maximum over positions (convolutional blobs, the position
kept). Per layer and unit the k = 9 highest activations are kept.

Resuming: the state (top 9 per unit, patch ids, patches seen) is saved to
OUT/state.npz every --chunk patches and at the end. Rerunning with the
same flags (and a --patches as large or larger) continues where the last
run stopped; patches already seen are cut again but not run through the net.

Output: OUT/<layer>.html per layer, a 3x3 grid of the 9 top patches per
unit (best first, row by row), everything outside the unit's receptive
field (read from the prototxt) black; OUT/index.html links them; patch
images in OUT/patches/ (PNG, named by the hash of their pixels).

Example:
  python tools/max_activations.py --weights ours.caffemodel --images data/voc2011 \\
      --patches 2500000 --per-image 220 --out runs/maxact
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ctxpred.caffe.env import CaffeNotAvailable, load_caffe
from ctxpred.cli import exit_code, fail, run_tool
from ctxpred.models.context import NET_NAMES, snapshot_param

REPO = Path(__file__).resolve().parents[1]
K = 9


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True,
                        help="caffemodel (binary or HDF5 .h5) with the layers up to the deepest "
                             "of --layers")
    parser.add_argument("--images", required=True,
                        help="images: folder (recursive), glob, image file, list file or Caffe "
                             "LMDB")
    parser.add_argument("--layers", default="norm1,norm2,conv3,conv4,conv5,fc6",
                        help="comma-separated blobs of the deploy net, one page each "
                             "(default: %(default)s)")
    parser.add_argument("--patches", type=int, required=True,
                        help="random patches to run through the net in total (a resumed run "
                             "counts the patches of earlier runs)")
    parser.add_argument("--per-image", type=int, default=16,
                        help="random patches cut from each image; the stream ends after the "
                             "last image (default: %(default)s)")
    parser.add_argument("--out", required=True,
                        help="output folder: state.npz, <layer>.html, index.html, patches/")
    parser.add_argument("--net", choices=NET_NAMES, default="color_dropping",
                        help="architecture: picks prototxt/<net>/deploy.prototxt "
                             "(default: %(default)s)")
    parser.add_argument("--deploy", default=None,
                        help="deploy prototxt to use instead of the one --net picks")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the patch positions (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=64,
                        help="patches per net.forward (default: %(default)s)")
    parser.add_argument("--chunk", type=int, default=10000,
                        help="save OUT/state.npz after about this many patches "
                             "(default: %(default)s)")
    parser.add_argument("--units", type=int, default=None,
                        help="only the first U units (channels) of each layer (default: all)")
    parser.add_argument("--gpu", type=int, default=None,
                        help="CUDA device to run the net on (default: the CPU)")
    args = parser.parse_args(argv)
    args.layers = [layer for layer in args.layers.split(",") if layer]
    if not args.layers:
        parser.error("--layers names no blob")
    for flag in ("patches", "per_image", "batch", "chunk", "units"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    if not Path(args.weights).is_file():
        parser.error(f"--weights file {args.weights} does not exist")
    args.deploy = args.deploy or str(REPO / "prototxt" / args.net / "deploy.prototxt")
    return args


def numbered_patches(items, skip):
    """(patch id, image name, box, pixels) of every patch of ``items``, ids from 0, first ``skip`` left out."""
    number = 0
    for item in items:
        for box, pixels in zip(item.boxes, item.patches):
            if number >= skip:
                yield number, item.name, box, pixels
            number += 1


def run_the_net(args, source, extractor, tops, state_path, settings):
    """Update ``tops`` ({layer: StreamingTopK}) with the patches not seen yet; save the state."""
    from ctxpred.figures.activations import unit_activations
    from ctxpred.features.extraction import net_input, sampled_patches

    seen = next(iter(tops.values())).seen
    net, patch = extractor.net, extractor.patch
    data = net.blobs[net.inputs[0]]
    stream = numbered_patches(sampled_patches(source, "random", args.per_image, args.seed),
                              seen)
    progress = tqdm(total=args.patches, initial=seen, unit="patch")
    last_saved = seen
    while seen < args.patches:
        batch = [item for _, item in zip(range(min(args.batch, args.patches - seen)), stream)]
        if not batch:
            print(f"the images hold only {seen} patches ({args.per_image} per image)")
            break
        ids = np.array([number for number, *_ in batch])
        if data.data.shape[0] != len(batch):
            data.reshape(len(batch), 3, patch, patch)
        net_input(np.stack([pixels for *_, pixels in batch]), out=data.data)
        net.forward()
        for layer, top in tops.items():
            values, ys, xs = unit_activations(net.blobs[layer].data[:, :top.units])
            top.update(values, ids, ys, xs)
        seen += len(batch)
        progress.update(len(batch))
        if seen - last_saved >= args.chunk:
            save_state(state_path, tops, settings)
            last_saved = seen
    progress.close()
    save_state(state_path, tops, settings)


def save_state(path, tops, settings):
    """Write every layer's StreamingTopK and the run's settings to ``path`` atomically."""
    arrays = {f"setting_{key}": np.asarray(value) for key, value in settings.items()}
    for layer, top in tops.items():
        arrays.update(top.state(f"{layer}/"))
    partial = path.with_name(path.name + ".part.npz")
    np.savez(partial, **arrays)
    partial.replace(path)


def load_tops(path, layers, units, settings):
    """{layer: StreamingTopK} from ``path`` if it exists (settings must match), else empty ones."""
    from ctxpred.figures.activations import StreamingTopK

    if not path.is_file():
        return {layer: StreamingTopK(units[layer], K) for layer in layers}
    with np.load(path) as arrays:
        for key, value in settings.items():
            saved = arrays[f"setting_{key}"] if f"setting_{key}" in arrays.files else None
            if saved is None or str(saved) != str(np.asarray(value)):
                raise ValueError(f"{path} was written with another {key} ({saved}, now "
                                 f"{value}); use another --out or the same flags")
        return {layer: StreamingTopK.from_state(arrays, f"{layer}/") for layer in layers}


def write_pages(args, source, tops, fields):
    """OUT/<layer>.html per layer and OUT/index.html; returns the index's path."""
    from ctxpred.figures import pages
    from ctxpred.figures.activations import masked_patch
    from ctxpred.features.extraction import sampled_patches

    out = Path(args.out)
    store = pages.PatchStore(out / "patches")
    wanted = {}  # patch id -> [(layer, unit, rank)]
    for layer, top in tops.items():
        for (unit, rank), number in np.ndenumerate(top.patch):
            if number >= 0:
                wanted.setdefault(int(number), []).append((layer, unit, rank))
    cells = {}  # (layer, unit, rank) -> <td> HTML
    last = max(wanted, default=-1)
    stream = numbered_patches(sampled_patches(source, "random", args.per_image, args.seed), 0)
    for number, name, box, pixels in stream:
        if number > last:
            break
        for layer, unit, rank in wanted.get(number, ()):
            top = tops[layer]
            y, x = int(top.y[unit, rank]), int(top.x[unit, rank])
            path = out / f"{layer}.html"
            image = store.add(masked_patch(pixels, fields[layer], y, x))
            title = pages.escape(f"{name} (x={box[0]}, y={box[1]}), unit position ({y}, {x}), "
                                 f"activation {top.values[unit, rank]:.4g}")
            cells[layer, unit, rank] = (f'<td><img src="{pages.link(image, path)}" '
                                        f'alt="{title}" title="{title}"></td>')
    links = []
    for layer, top in tops.items():
        path = out / f"{layer}.html"
        field = fields[layer]
        units = []
        for unit in range(top.units):
            grid = [cells.get((layer, unit, rank), "<td></td>") for rank in range(K)]
            rows = "".join("<tr>" + "".join(grid[row * 3:row * 3 + 3]) + "</tr>"
                           for row in range(3))
            units.append(f'<td><table class="grid">{rows}</table>unit {unit}</td>')
        table = "".join("<tr>" + "".join(units[start:start + 6]) + "</tr>"
                        for start in range(0, len(units), 6))
        intro = (f"<p>{pages.escape(layer)}: the {K} of {top.seen} random patches that "
                 f"activate each unit most (best first, row by row); outside the unit's "
                 f"receptive field ({field.size} pixels, stride {field.jump}) black.</p>")
        pages.write_page(path, f"Maximal activations of {layer}", f"{intro}<table>{table}</table>")
        links.append(f'<li><a href="{pages.link(path, out / "index.html")}">'
                     f"{pages.escape(layer)}</a> ({top.units} units)</li>")
    intro = (f"<p>Weights {pages.escape(args.weights)}, deploy net {pages.escape(args.deploy)}, "
             f"images {pages.escape(args.images)}, seed {args.seed}.</p>")
    return pages.write_page(out / "index.html", "Maximal activations",
                            intro + "<ul>" + "".join(links) + "</ul>")


def main(argv=None):
    args = parse_args(argv)
    try:
        load_caffe(gpu=args.gpu)
    except CaffeNotAvailable as error:
        return fail(error)
    # Imported once the arguments are valid: these load pycaffe.
    from ctxpred.figures.activations import receptive_fields
    from ctxpred.features.extraction import FeatureExtractor, read_deploy_param
    from ctxpred.data.images import open_source

    try:
        source = open_source(args.images)
        param = read_deploy_param(args.deploy)
        fields = {layer: receptive_fields(param, layer) for layer in args.layers}
        order = {top: index for index, layer in enumerate(param.layer) for top in layer.top}
        deepest = max(args.layers, key=order.get)
        extractor = FeatureExtractor(args.deploy, args.weights, deepest, args.batch,
                                     train_param=snapshot_param(args.net))
        units = {layer: min(args.units or np.inf, extractor.net.blobs[layer].data.shape[1])
                 for layer in args.layers}
        settings = {"images": args.images, "seed": args.seed, "per_image": args.per_image,
                    "weights": str(Path(args.weights).resolve()), "deploy": args.deploy,
                    "layers": ",".join(args.layers), "units": ",".join(
                        str(units[layer]) for layer in args.layers)}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        state_path = out / "state.npz"
        tops = load_tops(state_path, args.layers, units, settings)
        run_the_net(args, source, extractor, tops, state_path, settings)
    except (OSError, ValueError) as error:
        return fail(error, exit_code(error))
    index = write_pages(args, source, tops, fields)
    print(f"wrote {index} ({len(args.layers)} layers, {next(iter(tops.values())).seen} patches)")


if __name__ == "__main__":
    sys.exit(run_tool(main))
