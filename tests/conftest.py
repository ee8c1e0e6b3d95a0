"""Shared fixtures. Caffe is real in every test: a missing build fails loudly."""
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from ctxpred.caffe.env import CaffeNotAvailable, load_caffe


@pytest.fixture(scope="session")
def caffe():
    """The real pycaffe module in CPU mode; fails (never skips) without it."""
    try:
        return load_caffe(gpu=None, quiet=True)
    except CaffeNotAvailable as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def chromium():
    """Path of headless Chromium for page tests; fails (never skips) without it."""
    path = Path("/usr/bin/chromium")
    if not path.exists():
        pytest.fail("no /usr/bin/chromium to render pages with: `make test` installs it as "
                    "root, or run: sudo apt-get install chromium", pytrace=False)
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory):
    """Four real photos from scikit-image as JPEG files."""
    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "rocket", "chelsea"):
        Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{name}.jpg", quality=95)
    return folder


def _elliptic_cutout(pixels):
    """An RGBA cut-out: an RGB crop (h, w, 3) inside an opaque ellipse."""
    height, width = pixels.shape[:2]
    y, x = np.mgrid[:height, :width]
    inside = ((y - height / 2) / (height / 2)) ** 2 + ((x - width / 2) / (width / 2)) ** 2 <= 1
    return np.dstack([pixels, np.where(inside, 255, 0).astype(np.uint8)])


@pytest.fixture(scope="session")
def tiny_detection_set(tmp_path_factory):
    """A VOC-format set of 8 trainval and 4 test images (240 px), classes cat and rocket.

    Cut-outs (an ellipse around chelsea's face, the rocket) are pasted onto
    real photos with ctxpred.detection.synthetic_scenes; the proposals are the
    ground-truth boxes jittered by up to 20% plus random boxes (selective
    search itself is tested separately: it takes ~1 s per image).
    """
    from ctxpred.detection.proposals import save_proposals
    from ctxpred.detection.synthetic_scenes import compose_scene, fit_longer_side
    from ctxpred.detection.voc import Annotation, VocObject, write_annotation

    root = tmp_path_factory.mktemp("detection")
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True)
    (root / "classes.txt").write_text("cat\nrocket\n")
    cutouts = [("cat", _elliptic_cutout(skimage.data.chelsea()[40:260, 90:330])),
               ("rocket", _elliptic_cutout(skimage.data.rocket()[40:420, 280:380]))]
    backgrounds = [skimage.data.astronaut(), skimage.data.coffee(),
                   skimage.data.stereo_motorcycle()[0], skimage.data.immunohistochemistry()]
    rng = np.random.default_rng(7)
    proposals = {}
    for split, count in (("trainval", 8), ("test", 4)):
        ids = []
        for index in range(count):
            background = fit_longer_side(backgrounds[index % len(backgrounds)], 240)
            image, placed = compose_scene(background, cutouts, rng, size_range=(0.35, 0.5))
            image_id = f"{split}_{index}"
            Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
            write_annotation(Annotation(f"{image_id}.jpg", image.shape[1], image.shape[0],
                                        tuple(VocObject(o.label, o.box) for o in placed)),
                             root / "Annotations" / f"{image_id}.xml")
            gt = np.array([o.box for o in placed], np.float64)
            sizes = np.tile(gt[:, 2:] - gt[:, :2] + 1, (1, 2))
            jittered = np.repeat(gt, 30, axis=0) + rng.uniform(-0.2, 0.2, (30 * len(gt), 4)) \
                * np.repeat(sizes, 30, axis=0)
            corners = rng.uniform(1, [image.shape[1], image.shape[0]], (60, 2))
            random = np.hstack([corners, corners + rng.uniform(20, 120, (60, 2))])
            boxes = np.vstack([jittered, random])
            boxes[:, 0::2] = np.clip(boxes[:, 0::2], 1, image.shape[1])
            boxes[:, 1::2] = np.clip(boxes[:, 1::2], 1, image.shape[0])
            proposals[image_id] = np.rint(boxes)
            ids.append(image_id)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    save_proposals(root / "proposals.npz", proposals)
    return root


@pytest.fixture(scope="session")
def random_deploy_weights(caffe, tmp_path_factory):
    """seed -> path of the colour-dropping deploy net with seeded random weights (He-scaled)
    and non-zero biases, written once per seed for the whole session."""
    deploy = str(Path(__file__).resolve().parents[1] / "prototxt" / "color_dropping"
                 / "deploy.prototxt")
    folder = tmp_path_factory.mktemp("random_deploy_weights")
    paths = {}

    def weights(seed=0):
        if seed not in paths:
            net = caffe.Net(deploy, caffe.TEST)
            rng = np.random.default_rng(seed)
            for weight, bias in net.params.values():
                weight.data[...] = rng.normal(0, np.sqrt(2 / np.prod(weight.data.shape[1:])),
                                              weight.data.shape)
                bias.data[...] = rng.normal(0, 0.1, bias.data.shape)
            paths[seed] = str(folder / f"random{seed}.caffemodel")
            net.save(paths[seed])
        return paths[seed]

    return weights


@pytest.fixture(scope="session")
def colour_dropping_snapshot(caffe, photo_folder, tmp_path_factory):
    """A colour-dropping training snapshot on the photo folder, written once per session:
    {"train": train prototxt, "untrained": weights before any forward pass (BatchNorm
    statistics empty), "trained": weights after one TRAIN forward pass (statistics filled)}."""
    from ctxpred.data.layer import close_data_layers
    from ctxpred.models.context import data_layer_params, train_net

    folder = tmp_path_factory.mktemp("colour_dropping_snapshot")
    params = data_layer_params("color_dropping", str(photo_folder), seed=1, workers=1,
                               max_patches=48)
    paths = {"train": folder / "train.prototxt", "untrained": folder / "untrained.caffemodel",
             "trained": folder / "model_iter_1.caffemodel"}
    paths["train"].write_text(str(train_net("color_dropping", params)))
    net = caffe.Net(str(paths["train"]), caffe.TRAIN)
    try:
        net.save(str(paths["untrained"]))
        net.forward()
        net.save(str(paths["trained"]))
    finally:
        close_data_layers(net)
    return paths


class PageParts(HTMLParser):
    """A page's img src and a href values, and per table row the titles of its images."""

    def __init__(self):
        super().__init__()
        self.sources, self.links, self.rows = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr":
            self.rows.append([])
        elif tag == "img":
            self.sources.append(attrs["src"])
            if self.rows:
                self.rows[-1].append(attrs.get("title"))
        elif tag == "a":
            self.links.append(attrs["href"])


@pytest.fixture(scope="session")
def page_parts():
    """page path -> :class:`PageParts` of that HTML file."""
    def parse(page):
        parser = PageParts()
        parser.feed(Path(page).read_text(encoding="utf-8"))
        return parser

    return parse
