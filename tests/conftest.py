"""Shared fixtures. Caffe is real in every test: a missing build fails loudly."""
import numpy as np
import pytest

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
