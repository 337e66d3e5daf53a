"""Moving-average abs-max: an exponential moving average of per-batch abs-max values.

This is the range tracker of QAT (Jacob et al. 2018, "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference") in Paddle's bias-corrected form, the
one its ``moving_average_abs_max_scale`` op computes::

    accum <- momentum * accum + max|x_t|        state <- momentum * state + 1
    threshold = accum / state

Dividing by ``state`` removes the bias towards zero of an average that starts at zero, so the
first batch gives exactly its own abs-max. Outlier batches are damped instead of setting the
range for good, which is what separates it from :class:`AbsmaxQuantizer`.
"""

from __future__ import annotations

import numpy as np

from .base import BaseQuantizer
from .sample import TensorSample

__all__ = ["MovingAverageAbsmaxQuantizer"]


class MovingAverageAbsmaxQuantizer(BaseQuantizer):
    """Exponential moving average of per-batch abs-max values.

    Args:
        momentum: Weight of the past, in [0, 1). 0 keeps only the last batch.
        quant_bits: Bit width, 1..16.

    Raises:
        ValueError: ``momentum`` is outside [0, 1).
    """

    def __init__(self, momentum: float = 0.9, quant_bits: int = 8) -> None:
        super().__init__(quant_bits)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating)):
            raise TypeError(f"momentum must be a float, got {type(momentum).__name__}")
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.accum = np.zeros(0, dtype=np.float64)
        self.state = np.zeros(0, dtype=np.float64)

    @property
    def num_tensors(self) -> int:
        return int(self.accum.shape[0])

    def observe(self, index: int, sample: TensorSample) -> None:
        if index >= self.accum.shape[0]:
            grow = index + 1 - self.accum.shape[0]
            self.accum = np.pad(self.accum, (0, grow))
            self.state = np.pad(self.state, (0, grow))
        self.accum[index] = self.momentum * self.accum[index] + sample.abs_max()
        self.state[index] = self.momentum * self.state[index] + 1.0

    def compute_threshold(self, index: int) -> float:
        return float(self.accum[index] / self.state[index])

    def _statistics(self) -> dict[str, np.ndarray]:
        return {"accum": self.accum.copy(), "state": self.state.copy()}

    def _load_statistics(self, state: dict[str, np.ndarray]) -> None:
        accum = np.asarray(state["accum"], dtype=np.float64).reshape(-1)
        weight = np.asarray(state["state"], dtype=np.float64).reshape(-1)
        if accum.shape != weight.shape:
            raise ValueError("'accum' and 'state' differ in length")
        self.accum, self.state = accum.copy(), weight.copy()

    def _merge_statistics(self, other: "MovingAverageAbsmaxQuantizer") -> None:
        # An EMA depends on batch order, so shards cannot be merged exactly; adding the
        # bias-corrected sums gives the average of the shards' EMAs weighted by their weights.
        self.accum += other.accum
        self.state += other.state

    def _reset_statistics(self) -> None:
        self.accum = np.zeros(0, dtype=np.float64)
        self.state = np.zeros(0, dtype=np.float64)
