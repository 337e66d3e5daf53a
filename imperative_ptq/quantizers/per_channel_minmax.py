"""Per-channel min/max, for weights: one clip range per output channel.

Shares the reduction path of :mod:`.per_channel_absmax` (the channel axis from the layer's
registry entry, one reduction over every other axis, NaN/Inf ignored), reducing to ``min`` and
``max`` instead of ``max |w|``. With ``symmetric=False`` the parameters are those of
``torch.ao.quantization.PerChannelMinMaxObserver(dtype=torch.quint8)``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import paddle

from .base import validate_bool
from .minmax import finite_range
from .per_channel_absmax import (
    PerChannelWeightQuantizer,
    check_channel_arrays,
    fold_channel_array,
    merge_channel_arrays,
    per_channel_min_max,
)

__all__ = ["PerChannelMinMaxQuantizer"]


class PerChannelMinMaxQuantizer(PerChannelWeightQuantizer):
    """Per-channel running minimum and maximum of weights.

    The thresholds (Paddle's convention) are ``max(|min|, |max|)`` per channel, the
    per-channel abs-max. Merging is exact.

    Args:
        quant_bits: Bit width, 1..16.
        symmetric: Symmetric int8 (``True``) or affine uint8 (``False``) parameters.
    """

    uses_signed_values = True

    def __init__(self, quant_bits: int = 8, symmetric: bool = False) -> None:
        super().__init__(quant_bits)
        self.symmetric = validate_bool("symmetric", symmetric)
        self.min_vals: list[np.ndarray] = []
        self.max_vals: list[np.ndarray] = []

    @property
    def num_tensors(self) -> int:
        return len(self.min_vals)

    def reduce_channels(self, tensor: paddle.Tensor, axis: int) -> tuple[np.ndarray, np.ndarray]:
        return per_channel_min_max(tensor, axis)

    def observe_channel(self, index: int, channel_range: tuple[np.ndarray, np.ndarray]) -> None:
        low, high = channel_range
        if index < len(self.max_vals) and np.size(high) != self.max_vals[index].size:
            raise ValueError(  # before either array changes
                f"tensor {index} has {np.size(high)} channels, earlier statistics have "
                f"{self.max_vals[index].size}"
            )
        fold_channel_array(self.min_vals, index, low, np.minimum)
        fold_channel_array(self.max_vals, index, high, np.maximum)

    def compute_range(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return finite_range(self.min_vals[index], self.max_vals[index])

    def compute_threshold(self, index: int) -> np.ndarray:
        low, high = self.compute_range(index)
        return np.maximum(-low, high)

    def _statistics(self) -> dict[str, np.ndarray]:
        state = {f"min_vals.{i}": values.copy() for i, values in enumerate(self.min_vals)}
        state.update({f"max_vals.{i}": values.copy() for i, values in enumerate(self.max_vals)})
        return state

    def _load_statistics(self, state: dict[str, np.ndarray]) -> None:
        count = sum(1 for key in state if key.startswith("min_vals."))
        self.min_vals = [
            np.asarray(state[f"min_vals.{i}"], dtype=np.float64).reshape(-1).copy()
            for i in range(count)
        ]
        self.max_vals = [
            np.asarray(state[f"max_vals.{i}"], dtype=np.float64).reshape(-1).copy()
            for i in range(count)
        ]
        for low, high in zip(self.min_vals, self.max_vals):
            if low.shape != high.shape:
                raise ValueError(f"min_vals has {low.shape[0]} channels, max_vals {high.shape[0]}")

    def _merge_statistics(self, other: "PerChannelMinMaxQuantizer") -> None:
        self._merge(other.min_vals, other.max_vals)

    def _merge(self, lows: Sequence[np.ndarray], highs: Sequence[np.ndarray]) -> None:
        check_channel_arrays(self.max_vals, highs)  # both lists checked before either changes
        self.min_vals = merge_channel_arrays(self.min_vals, lows, np.minimum)
        self.max_vals = merge_channel_arrays(self.max_vals, highs, np.maximum)

    def _reset_statistics(self) -> None:
        self.min_vals = []
        self.max_vals = []
