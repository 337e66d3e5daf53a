"""Shared test configuration: quiet Paddle, deterministic seeds."""

import os
import warnings

import numpy as np
import paddle
import pytest
from hypothesis import settings

# CI must be reproducible: every run tries the same examples (a failure found by one
# run is found by all). Explore with `HYPOTHESIS_PROFILE=explore pytest tests`.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

warnings.filterwarnings("ignore", category=UserWarning, module="paddle")


@pytest.fixture(autouse=True)
def _seed() -> None:
    paddle.seed(2024)
    np.random.seed(2024)


@pytest.fixture(scope="session")
def avx2_runner():
    """An :class:`avx2_kernels.Avx2Runner` on a CPU with VNNI, where oneDNN's AVX2 kernels
    compute differently from the native ones; ``None`` where the native kernels are AVX2."""
    import imperative_ptq as ip
    from avx2_kernels import shared_runner

    yield shared_runner() if ip.cpu_info().vnni else None


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers",
        "slow: exports real architectures, re-runs tests on oneDNN's AVX2 kernels in a "
        "subprocess, or runs every accuracy-benchmark configuration (seconds each); deselect "
        "with -m 'not slow'",
    )


@pytest.fixture
def linear_layers_as_fc(monkeypatch) -> None:
    """Every Linear runs as Paddle Inference's fc, none as a 1x1 conv
    (``quant_layers.linear_runs_as_conv``): for tests of the fc path."""
    from imperative_ptq import quant_layers

    monkeypatch.setattr(quant_layers, "FC_WEIGHT_ERROR_LIMIT", float("inf"))
