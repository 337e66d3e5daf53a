"""One observed tensor of one batch, with its reductions cached.

A hooked activation is often seen by two quantizers: it is the output of one layer and the
input of the next. Both quantizers receive the same :class:`TensorSample`, so the absolute
value is copied once and each reduction (abs-max, a histogram over a given range) is computed
once, whoever asks first. Samples are created on the forward thread and reduced on the
collector's worker thread; a sample is only ever reduced by one thread at a time.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import paddle

__all__ = ["TensorSample"]


class TensorSample:
    """The absolute values of one tensor, with cached reductions.

    Args:
        abs_values: ``|x|`` as a float32 tensor that nothing else writes to while the sample
            is alive (callers copy, so a later in-place op cannot change the statistics).
        release: Called once with ``abs_values`` when :meth:`release` is called, e.g. to
            return the buffer to a pool.
    """

    __slots__ = ("abs_values", "_abs_max", "_histograms", "_release", "_numpy")

    def __init__(
        self,
        abs_values: paddle.Tensor,
        release: Callable[[paddle.Tensor], None] | None = None,
    ) -> None:
        self.abs_values = abs_values
        self._abs_max: float | None = None
        self._histograms: dict[tuple[int, float, bool], np.ndarray] = {}
        self._release = release
        self._numpy: np.ndarray | None = None

    @classmethod
    def from_tensor(cls, tensor: paddle.Tensor) -> "TensorSample":
        """Builds a sample from any floating tensor (copies ``|tensor|`` as float32)."""
        with paddle.no_grad():
            abs_values = paddle.abs(tensor.detach())
            if abs_values.dtype != paddle.float32:
                abs_values = abs_values.astype("float32")
        return cls(abs_values)

    @property
    def numel(self) -> int:
        """Number of elements."""
        return int(self.abs_values.size)

    def abs_max(self) -> float:
        """Largest finite ``|x|``; NaN and Inf are ignored (0.0 when nothing is finite)."""
        if self._abs_max is None:
            with paddle.no_grad():
                value = float(paddle.max(self.abs_values)) if self.numel else 0.0
                if not math.isfinite(value):
                    # Slow path, only for tensors holding NaN or Inf.
                    finite = paddle.where(
                        paddle.isfinite(self.abs_values),
                        self.abs_values,
                        paddle.zeros_like(self.abs_values),
                    )
                    value = float(paddle.max(finite))
            self._abs_max = value
        return self._abs_max

    def histogram(self, bins: int, upper: float, exact_binning: bool = False) -> np.ndarray:
        """Counts of ``|x|`` in ``bins`` equal bins over ``[0, upper]``, as float32.

        Values above ``upper``, NaN and Inf are not counted.

        Args:
            bins: Number of bins.
            upper: Right edge of the last bin (inclusive).
            exact_binning: Bin exactly as ``np.histogram`` does (float32 ``linspace`` edges).
                ``paddle.histogram`` computes ``trunc(x * bins / upper)`` instead, which puts a
                few elements per million that lie within an ulp of an interior edge into the
                neighbouring bin. The exact path copies the tensor to numpy and is ~4x slower.
        """
        key = (bins, upper, exact_binning)
        cached = self._histograms.get(key)
        if cached is None:
            if exact_binning:
                if self._numpy is None:
                    self._numpy = self.abs_values.numpy()
                counts, _ = np.histogram(self._numpy, range=(0.0, upper), bins=bins)
            else:
                with paddle.no_grad():
                    counts = paddle.histogram(
                        self.abs_values, bins=bins, min=0.0, max=upper
                    ).numpy()
            cached = counts.astype(np.float32)
            self._histograms[key] = cached
        return cached

    def release(self) -> None:
        """Drops the tensor (and returns its buffer to its owner, if any)."""
        if self._release is not None and self.abs_values is not None:
            self._release(self.abs_values)
        self.abs_values = None  # type: ignore[assignment]
        self._numpy = None
