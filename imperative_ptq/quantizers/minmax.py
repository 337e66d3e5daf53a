"""Per-tensor min/max: the clip range is the smallest and largest ``x`` seen over all batches.

The affine counterpart of abs-max (``torch.ao.quantization.MinMaxObserver``): a ReLU output
keeps all 255 uint8 levels for ``[0, max]`` instead of wasting the negative half of int8.
"""

from __future__ import annotations

import numpy as np

from .base import BaseQuantizer, validate_bool
from .sample import TensorSample

__all__ = ["MinMaxQuantizer"]


def finite_range(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Running ``(min, max)`` as a clip range: positions that saw nothing finite give (0, 0)."""
    empty = low > high
    return np.where(empty, 0.0, low), np.where(empty, 0.0, high)


class MinMaxQuantizer(BaseQuantizer):
    """Per-tensor running minimum and maximum.

    Exact: batches, resumed runs and shards all reduce with ``min`` / ``max``. NaN and Inf are
    ignored. The threshold (Paddle's symmetric convention) is ``max(|min|, |max|)``, the
    abs-max; with ``symmetric=False`` :meth:`quant_params` gives uint8 ``(scale, zero_point)``
    for ``[min, max]``, exactly as ``MinMaxObserver(dtype=torch.quint8)`` computes them.

    Args:
        quant_bits: Bit width, 1..16.
        symmetric: Symmetric int8 (``True``) or affine uint8 (``False``) parameters.
    """

    for_weights = True
    uses_signed_values = True

    def __init__(self, quant_bits: int = 8, symmetric: bool = False) -> None:
        super().__init__(quant_bits)
        self.symmetric = validate_bool("symmetric", symmetric)
        # +inf / -inf: the identities of min / max, so merging never needs a "seen" flag.
        self.min_vals = np.zeros(0, dtype=np.float64)
        self.max_vals = np.zeros(0, dtype=np.float64)

    @property
    def num_tensors(self) -> int:
        return int(self.min_vals.shape[0])

    def observe(self, index: int, sample: TensorSample) -> None:
        if index >= self.min_vals.shape[0]:
            grow = index + 1 - self.min_vals.shape[0]
            self.min_vals = np.pad(self.min_vals, (0, grow), constant_values=np.inf)
            self.max_vals = np.pad(self.max_vals, (0, grow), constant_values=-np.inf)
        if sample.numel:
            # A batch with nothing finite reports (0, 0): harmless, ranges always include 0.
            low, high = sample.min_max()
            self.min_vals[index] = min(self.min_vals[index], low)
            self.max_vals[index] = max(self.max_vals[index], high)

    def compute_range(self, index: int) -> tuple[float, float]:
        low, high = finite_range(self.min_vals[index], self.max_vals[index])
        return float(low), float(high)

    def compute_threshold(self, index: int) -> float:
        low, high = self.compute_range(index)
        return max(-low, high)

    def _statistics(self) -> dict[str, np.ndarray]:
        return {"min_vals": self.min_vals.copy(), "max_vals": self.max_vals.copy()}

    def _load_statistics(self, state: dict[str, np.ndarray]) -> None:
        low = np.asarray(state["min_vals"], dtype=np.float64).reshape(-1).copy()
        high = np.asarray(state["max_vals"], dtype=np.float64).reshape(-1).copy()
        if low.shape != high.shape:
            raise ValueError(f"'min_vals' has shape {low.shape}, 'max_vals' {high.shape}")
        self.min_vals, self.max_vals = low, high

    def _merge_statistics(self, other: "MinMaxQuantizer") -> None:
        np.minimum(self.min_vals, other.min_vals, out=self.min_vals)
        np.maximum(self.max_vals, other.max_vals, out=self.max_vals)

    def _reset_statistics(self) -> None:
        self.min_vals = np.zeros(0, dtype=np.float64)
        self.max_vals = np.zeros(0, dtype=np.float64)
