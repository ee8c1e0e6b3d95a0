"""Shared fixtures. Caffe is real in every test: a missing build fails loudly."""
import numpy as np
import pytest
import skimage.data
from PIL import Image

from ctxpred.caffe_env import CaffeNotAvailable, load_caffe


@pytest.fixture(scope="session")
def caffe():
    """The real pycaffe module in CPU mode; fails (never skips) without it."""
    try:
        return load_caffe(gpu=None, quiet=True)
    except CaffeNotAvailable as error:
        pytest.fail(str(error), pytrace=False)


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
