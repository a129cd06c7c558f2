"""Shared fixtures. Tests that need the real data sets skip, with the reason, when they are absent."""
import os
from pathlib import Path

import pytest
import torch

import helpers
from ssl_patch_analysis.models import SSLModel

DATA_ENV = "SSL_PATCH_ANALYSIS_DATA"


def shared_data_root() -> Path:
    """The folder holding cifar10_jpeg.npz / imagenette_jpeg.npz (the Makefile sets the variable)."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).resolve()  # absolute: notebook kernels run in another folder
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    return shared_data_root()


def _need(name: str) -> Path:
    path = shared_data_root() / name
    if not path.exists():
        pytest.skip(f"real data file {path} is absent (set {DATA_ENV} to the folder holding {name})")
    return path


@pytest.fixture(scope="session")
def cifar10_npz() -> Path:
    return _need("cifar10_jpeg.npz")


@pytest.fixture(scope="session")
def imagenette_npz() -> Path:
    return _need("imagenette_jpeg.npz")


@pytest.fixture
def no_data_root(tmp_path, monkeypatch) -> Path:
    """What a fresh clone with nothing beside it sees: the Makefile's data folder does not exist."""
    absent = tmp_path / "no-shared" / "data"
    monkeypatch.setenv(DATA_ENV, str(absent))
    return absent


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory) -> None:
    """Keep decoded-data caches of the test run out of the user's cache folder."""
    if "SSL_PATCH_ANALYSIS_CACHE" not in os.environ:
        os.environ["SSL_PATCH_ANALYSIS_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def tiny_model() -> SSLModel:
    """A fresh :func:`helpers.tiny_model` for each test: narrow CIFAR ResNet-18 with projector, seed 0."""
    return helpers.tiny_model()


@pytest.fixture
def random_images() -> torch.Tensor:
    """:func:`helpers.random_images` ``(8)``: 8 x 3 x 32 x 32 uint8 noise, seed 0 (slice what a test needs)."""
    return helpers.random_images(8)
