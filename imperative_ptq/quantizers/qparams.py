"""Quantization parameters ``(scale, zero_point, dtype)`` from thresholds or clip ranges.

Two schemes, both mapped through :func:`imperative_ptq.primitives.compute_qparams` so that the
float32 arithmetic is PyTorch's:

* **symmetric** (Paddle's convention): ``scale = threshold / L`` with ``L = 2**(bits-1) - 1``,
  zero point 0, codes in ``[-L, L]`` (int8 for ``bits <= 8``, else int32 storage);
* **affine**: a clip range ``[lo, hi]`` (extended to include 0) spread over
  ``[0, 2**bits - 1]`` (uint8 for ``bits <= 8``, as ONNX Runtime's QLinear kernels and
  PyTorch's quint8 activations expect), ``zero_point = round(-lo / scale)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from ..primitives import compute_qparams

__all__ = ["QuantParams", "affine_levels", "affine_qparams", "symmetric_levels", "symmetric_qparams"]


def symmetric_levels(bits: int) -> int:
    """``L = 2**(bits-1) - 1``, the largest code of Paddle's symmetric grid ``-L..L`` (at least
    1, so a 1-bit grid still has a step)."""
    return max(2 ** (bits - 1) - 1, 1)


def affine_levels(bits: int) -> int:
    """``2**bits - 1``, the number of steps of an affine (uint8 for 8 bits) grid ``0..2**bits-1``."""
    return 2**bits - 1


@dataclasses.dataclass(frozen=True)
class QuantParams:
    """How one tensor is quantized: ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``.

    Attributes:
        scale: One float, or one per channel.
        zero_point: One int, or one per channel (0 for symmetric quantization).
        dtype: Storage type of the codes: ``"int8"``, ``"uint8"`` or ``"int32"``.
        quant_min: Lowest code.
        quant_max: Highest code.
    """

    scale: float | list[float]
    zero_point: int | list[int]
    dtype: str
    quant_min: int
    quant_max: int

    @property
    def symmetric(self) -> bool:
        """Whether every zero point is 0 and the code range is symmetric."""
        zero_points = np.atleast_1d(np.asarray(self.zero_point))
        return bool(np.all(zero_points == 0)) and self.quant_min == -self.quant_max


def _listify(scale: Any, zero_point: Any) -> tuple[Any, Any]:
    """Python scalars for per-tensor values, lists for per-channel ones."""
    scale, zero_point = np.asarray(scale), np.asarray(zero_point)
    if scale.ndim == 0:
        return float(scale), int(zero_point)
    return scale.astype(np.float64).tolist(), zero_point.astype(np.int64).tolist()


def symmetric_qparams(threshold: float | Sequence[float], quant_bits: int) -> QuantParams:
    """Paddle's symmetric parameters for a threshold (or per-channel thresholds)."""
    levels = symmetric_levels(quant_bits)
    dtype = "int8" if quant_bits <= 8 else "int32"
    t = np.asarray(threshold, dtype=np.float64)
    scale, zero_point = compute_qparams(
        -t, t, dtype, symmetric=True, quant_min=-levels, quant_max=levels
    )
    return QuantParams(*_listify(scale, zero_point), dtype, -levels, levels)


def affine_qparams(
    low: float | Sequence[float], high: float | Sequence[float], quant_bits: int
) -> QuantParams:
    """Affine parameters for the clip range ``[low, high]`` (or per-channel ranges).

    Raises:
        ValueError: ``low > high`` or a bound is not finite.
    """
    quant_max = affine_levels(quant_bits)
    dtype = "uint8" if quant_bits <= 8 else "int32"
    low_array = np.asarray(low, dtype=np.float64)
    high_array = np.asarray(high, dtype=np.float64)
    scale, zero_point = compute_qparams(
        low_array, high_array, dtype, symmetric=False, quant_min=0, quant_max=quant_max
    )
    return QuantParams(*_listify(scale, zero_point), dtype, 0, quant_max)
