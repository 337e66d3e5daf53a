"""``imperative_ptq.rounding`` against slow references written here: Python's ``round`` (ties to
even) one element at a time, and numpy's ``rint``."""

from __future__ import annotations

import math

import numpy as np
import paddle
import pytest

from imperative_ptq.rounding import grid_codes, round_half_to_even


def _values(dtype: str) -> np.ndarray:
    """Ties, their float neighbours, both sides of the magnitudes where the float step becomes
    0.5, 1 and 2, random magnitudes up to 1e30, signed zeros, infinities and NaN."""
    ties = np.arange(-1000, 1000, dtype=np.float64) + 0.5
    values = [ties, np.nextafter(ties.astype(dtype), np.inf), np.nextafter(ties.astype(dtype), -np.inf)]
    mantissa_bits = {"float32": 23, "float64": 52, "float16": 10}[dtype]
    for exponent in (mantissa_bits - 2, mantissa_bits - 1, mantissa_bits, mantissa_bits + 1):
        edge = np.asarray(2.0**exponent, dtype=dtype)
        around = [edge + k * step for k in range(-4, 5) for step in (0.25, 0.5, 1.0, 2.0)]
        values.append(np.asarray(around, dtype=np.float64))
        values.append(-np.asarray(around, dtype=np.float64))
    rng = np.random.default_rng(0)
    magnitudes = 10.0 ** rng.uniform(-3, 30 if dtype != "float16" else 4.5, 4000)
    values.append(magnitudes * rng.choice([-1.0, 1.0], magnitudes.size))
    values.append(np.array([0.0, -0.0, -0.3, -0.5, 0.5, np.inf, -np.inf, np.nan]))
    with np.errstate(over="ignore"):
        return np.concatenate(values).astype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_round_half_to_even_is_numpy_rint(dtype: str) -> None:
    values = _values(dtype)
    rounded = round_half_to_even(paddle.to_tensor(values)).numpy()
    assert rounded.dtype == values.dtype
    np.testing.assert_array_equal(rounded, np.rint(values))
    # zero never comes out negative (a floor-based rounding's zeros, and the bias grid's)
    assert not np.signbit(rounded[rounded == 0]).any()


def _python_grid_codes(values: np.ndarray, step: float, lowest: int, highest: int) -> list[float]:
    codes = []
    for value in values.tolist():
        if math.isnan(value):
            codes.append(0.0)
            continue
        quotient = float(np.float32(value) / np.float32(step))
        # the bounds as the float32 grid holds them (2**31 - 1 is 2**31 there)
        clipped = min(max(quotient, float(np.float32(lowest))), float(np.float32(highest)))
        codes.append(float(round(clipped)))
    return codes


@pytest.mark.parametrize(
    ("lowest", "highest"), [(-128, 127), (0, 255), (-8, 7), (-(2**31), 2**31 - 1)]
)
def test_grid_codes_half_to_even_is_pythons_round(lowest: int, highest: int) -> None:
    values = _values("float32")
    step = 0.5
    got = grid_codes(paddle.to_tensor(values), step, lowest, highest, half_to_even=True).numpy()
    assert got.tolist() == _python_grid_codes(values, step, lowest, highest)


def test_grid_codes_passes_the_gradient_inside_the_grid_only() -> None:
    x = paddle.to_tensor(np.array([-300.0, -1.25, 0.75, 2.5, 100.0, 300.0], dtype=np.float32), stop_gradient=False)
    codes = grid_codes(x, 2.0, -128, 127, half_to_even=True)
    codes.sum().backward()
    assert codes.numpy().tolist() == [-128.0, -1.0, 0.0, 1.0, 50.0, 127.0]
    assert x.grad.numpy().tolist() == [0.0, 0.5, 0.5, 0.5, 0.5, 0.0]
