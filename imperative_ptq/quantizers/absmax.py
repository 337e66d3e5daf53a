"""Per-tensor abs-max: the threshold is the largest ``|x|`` seen over all batches."""

from __future__ import annotations

import numpy as np

from .base import BaseQuantizer
from .sample import TensorSample

__all__ = ["AbsmaxQuantizer"]


class AbsmaxQuantizer(BaseQuantizer):
    """Per-tensor abs-max quantizer (Paddle's ``AbsmaxQuantizer``).

    Exact: merging batches, resumed runs and shards all reduce with ``max``. NaN and Inf are
    ignored, so the threshold stays finite.

    Args:
        quant_bits: Bit width, 1..16.
    """

    for_weights = True

    def __init__(self, quant_bits: int = 8) -> None:
        super().__init__(quant_bits)
        self.abs_max_vals = np.zeros(0, dtype=np.float64)

    @property
    def num_tensors(self) -> int:
        return int(self.abs_max_vals.shape[0])

    def observe(self, index: int, sample: TensorSample) -> None:
        if index >= self.abs_max_vals.shape[0]:
            self.abs_max_vals = np.pad(self.abs_max_vals, (0, index + 1 - self.abs_max_vals.shape[0]))
        self.abs_max_vals[index] = max(self.abs_max_vals[index], sample.abs_max())

    def compute_threshold(self, index: int) -> float:
        return float(self.abs_max_vals[index])

    def observed_maximum(self, index: int) -> float | None:
        return float(self.abs_max_vals[index]) if index < self.num_tensors else None

    def _statistics(self) -> dict[str, np.ndarray]:
        return {"abs_max_vals": self.abs_max_vals.copy()}

    def _load_statistics(self, state: dict[str, np.ndarray]) -> None:
        self.abs_max_vals = np.asarray(state["abs_max_vals"], dtype=np.float64).reshape(-1).copy()

    def _merge_statistics(self, other: "AbsmaxQuantizer") -> None:
        np.maximum(self.abs_max_vals, other.abs_max_vals, out=self.abs_max_vals)

    def _reset_statistics(self) -> None:
        self.abs_max_vals = np.zeros(0, dtype=np.float64)
