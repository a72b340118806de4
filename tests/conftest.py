"""Shared fixtures: real Fashion-MNIST images, as arrays and as image folders on disk."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from edgekd.data import LoadedData, fashion_mnist_root, load_data
from edgekd.errors import EdgekdError
from edgekd.types import DataSpec
from tests.helpers.images import write_images


@pytest.fixture(scope="session", autouse=True)
def teacher_outputs_in_a_scratch_folder(tmp_path_factory) -> None:
    """--cache-teacher writes memory-mapped teacher outputs under ~/.cache by default: not from the tests."""
    from edgekd.distill.state import TEACHER_CACHE_ENV

    os.environ.setdefault(TEACHER_CACHE_ENV, str(tmp_path_factory.mktemp("teacher-outputs")))


@pytest.fixture(scope="session")
def fmnist_root() -> Path:
    try:  # where edgekd itself looks: EDGEKD_FASHION_MNIST, else the Debian package's folder
        return fashion_mnist_root(None)
    except EdgekdError:
        pytest.fail("Fashion-MNIST is missing: `apt-get install dataset-fashion-mnist` (.ci/run installs it), or "
                    "EDGEKD_FASHION_MNIST=DIR")


@pytest.fixture(scope="session")
def small_fmnist(fmnist_root: Path) -> LoadedData:
    """A stratified 600/300 slice of the real Fashion-MNIST."""
    return load_data(DataSpec("fashion-mnist", max_train=600, max_val=300))


@pytest.fixture(scope="session")
def fmnist_arrays(small_fmnist: LoadedData) -> tuple[np.ndarray, np.ndarray]:
    """The first 3 classes of the slice, 12 images each (uint8 28x28 arrays and labels 0..2)."""
    images, labels = small_fmnist.train.images, small_fmnist.train.labels
    keep = np.concatenate([np.flatnonzero(labels == c)[:12] for c in range(3)])
    return images[keep], labels[keep]


@pytest.fixture()
def class_folder(tmp_path: Path, fmnist_arrays) -> Path:
    images, labels = fmnist_arrays
    write_images(tmp_path / "shop", images, labels, ("tshirt", "trouser", "pullover"))
    return tmp_path / "shop"
