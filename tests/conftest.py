"""Shared test configuration: quiet Paddle, deterministic seeds."""

import warnings

import numpy as np
import paddle
import pytest

warnings.filterwarnings("ignore", category=UserWarning, module="paddle")


@pytest.fixture(autouse=True)
def _seed() -> None:
    paddle.seed(2024)
    np.random.seed(2024)
