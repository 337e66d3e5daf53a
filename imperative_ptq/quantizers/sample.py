"""One observed tensor of one batch, with its reductions cached.

A hooked activation is often seen by two quantizers: it is the output of one layer and the
input of the next. Both quantizers receive the same :class:`TensorSample`, so the absolute
value is copied once and each reduction (abs-max, a histogram over a given range) is computed
once, whoever asks first. Samples are created on the forward thread and reduced on the
collector's worker thread; a sample is only ever reduced by one thread at a time.
"""

from __future__ import annotations

import math
import threading
from typing import Callable

import numpy as np
import paddle

__all__ = ["SampleSide", "TensorSample", "exact_histogram"]

#: float32's smallest normal number: a tensor no larger counts as zero (:meth:`TensorSample.abs_max`).
_SMALLEST_NORMAL = float(np.finfo(np.float32).tiny)

#: Half-width, in bins, of the band around each bin edge inside which ``paddle.histogram`` and
#: ``np.histogram`` may disagree. Both place a value within a few float32 ulps of its true
#: position (at most ~6e-5 bins for 1024 bins), so 1e-3 bins is a wide safety margin.
_EDGE_BAND = np.float32(1e-3)
_scratch = threading.local()


def _near_edge_values(values: np.ndarray, bins: int, upper: float) -> np.ndarray:
    """The elements of ``values`` lying within ``_EDGE_BAND`` bins of a bin edge."""
    size = values.size
    arrays = getattr(_scratch, "arrays", None)
    if arrays is None or arrays[0].size < size:
        # Reused across calls: fresh multi-MB arrays cost page faults every batch.
        arrays = (np.empty(size, np.float32), np.empty(size, np.float32), np.empty(size, bool))
        _scratch.arrays = arrays
    position, nearest, near = (array[:size] for array in arrays)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and Inf are never near an edge
        np.multiply(values, np.float32(bins / upper), out=position)
        np.rint(position, out=nearest)
        # Only interior edges 1..bins-1 can disagree: both methods put 0 in the first bin and
        # ``upper`` in the last. Clipping the nearest edge to half a bin inside keeps zeros
        # (often half of a ReLU output) out of the band.
        np.clip(nearest, np.float32(0.5), np.float32(bins - 0.5), out=nearest)
        np.subtract(position, nearest, out=position)
        np.abs(position, out=position)
        np.less(position, _EDGE_BAND, out=near)
    return values[near]


def exact_histogram(values: paddle.Tensor, bins: int, upper: float) -> np.ndarray:
    """``np.histogram(values, bins, range=(0, upper))`` counts, at ~2x the cost of
    ``paddle.histogram`` instead of ~7x.

    ``paddle.histogram`` bins by ``trunc(x * bins / upper)``; numpy compares with float32
    ``linspace`` edges. They disagree only on values within an ulp of an interior edge, so the
    Paddle counts are corrected by re-binning, both ways, just the few values near an edge
    (found on a zero-copy numpy view of the tensor).
    """
    with paddle.no_grad():
        counts = paddle.histogram(values, bins=bins, min=0.0, max=upper).numpy()
    flat = np.from_dlpack(values.contiguous()).reshape(-1)
    if not np.isfinite(np.float32(bins / upper)):  # a range so small bins/upper overflows
        return np.histogram(flat, range=(0.0, upper), bins=bins)[0]
    near = _near_edge_values(flat, bins, upper)
    if near.size:
        with paddle.no_grad():
            paddle_near = paddle.histogram(paddle.to_tensor(near), bins=bins, min=0.0, max=upper)
        counts = counts - paddle_near.numpy() + np.histogram(near, range=(0.0, upper), bins=bins)[0]
    return counts


class TensorSample:
    """The absolute values of one tensor, with cached reductions.

    Args:
        abs_values: ``|x|`` as a float32 tensor that nothing else writes to while the sample
            is alive (callers copy, so a later in-place op cannot change the statistics).
        release: Called once with ``abs_values`` when :meth:`release` is called, e.g. to
            return the buffer to a pool.
    """

    __slots__ = (
        "abs_values", "_abs_max", "_histograms", "_release",
        "signed_values", "_min_max", "_sides",
    )

    def __init__(
        self,
        abs_values: paddle.Tensor,
        release: Callable[[paddle.Tensor], None] | None = None,
    ) -> None:
        self.abs_values = abs_values
        self._abs_max: float | None = None
        self._histograms: dict[tuple[int, float, bool], np.ndarray] = {}
        self._release = release
        # Only affine quantizers need the sign; the symmetric path never sets these.
        self.signed_values: paddle.Tensor | None = None
        self._min_max: tuple[float, float] | None = None
        self._sides: dict[bool, "SampleSide"] = {}

    @classmethod
    def from_tensor(cls, tensor: paddle.Tensor, signed: bool = False) -> "TensorSample":
        """Builds a sample from any floating tensor (copies ``|tensor|`` as float32, and
        ``tensor`` itself too when ``signed``)."""
        with paddle.no_grad():
            values = tensor.detach()
            if values.dtype != paddle.float32:
                # float16/bfloat16 have no CPU abs kernel; statistics are float32 anyway.
                values = values.astype("float32")
            abs_values = paddle.abs(values)
            sample = cls(abs_values)
            if signed:
                sample.signed_values = paddle.assign(tensor.detach().astype("float32"))
        return sample

    @property
    def numel(self) -> int:
        """Number of elements."""
        return int(self.abs_values.size)

    def abs_max(self) -> float:
        """Largest finite ``|x|``; NaN and Inf are ignored (0.0 when nothing is finite), and so
        is a largest value below float32's smallest normal number: no int8 scale of it is
        finite (``127 / 1e-43`` overflows), and 1024 histogram bins over it have no distinct
        float32 edges (a random-weight MobileViT's vanishing activations stopped KL
        calibration: "Too many bins for data range")."""
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
            self._abs_max = value if value >= _SMALLEST_NORMAL else 0.0
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
                neighbouring bin. The exact path (:func:`exact_histogram`) costs ~2x.
        """
        key = (bins, upper, exact_binning)
        cached = self._histograms.get(key)
        if cached is None:
            if exact_binning:
                counts = exact_histogram(self.abs_values, bins, upper)
            else:
                with paddle.no_grad():
                    counts = paddle.histogram(
                        self.abs_values, bins=bins, min=0.0, max=upper
                    ).numpy()
            cached = counts.astype(np.float32)
            self._histograms[key] = cached
        return cached

    def min_max(self) -> tuple[float, float]:
        """Smallest and largest finite ``x`` of the signed tensor; NaN and Inf are ignored
        ((0.0, 0.0) when nothing is finite).

        Raises:
            RuntimeError: The sample was built without its signed values.
        """
        if self._min_max is None:
            values = self._signed()
            if not self.numel:
                self._min_max = (0.0, 0.0)
                return self._min_max
            with paddle.no_grad():
                low, high = float(paddle.min(values)), float(paddle.max(values))
                if not (math.isfinite(low) and math.isfinite(high)):
                    # Slow path, only for tensors holding NaN or Inf.
                    finite = paddle.isfinite(values)
                    if not bool(paddle.any(finite)):
                        self._min_max = (0.0, 0.0)
                        return self._min_max
                    inf = paddle.full_like(values, math.inf)
                    low = float(paddle.min(paddle.where(finite, values, inf)))
                    high = float(paddle.max(paddle.where(finite, values, -inf)))
            self._min_max = (low, high)
        return self._min_max

    def side(self, negative: bool) -> "SampleSide":
        """The positive (``x >= 0``) or negative (``x < 0``, as ``|x|``) part of the tensor,
        with the interface :class:`HistogramState` expects of a sample (shared and cached)."""
        side = self._sides.get(negative)
        if side is None:
            side = self._sides[negative] = SampleSide(self, negative)
        return side

    def _signed(self) -> paddle.Tensor:
        if self.signed_values is None:
            raise RuntimeError(
                "this sample holds only |x|: build it with signed=True for affine quantizers"
            )
        return self.signed_values

    def _nonnegative_histogram(self, bins: int, upper: float, exact_binning: bool) -> np.ndarray:
        """Counts of ``x >= 0`` (zeros included) in ``bins`` bins over ``[0, upper]``."""
        key = (-bins, upper, exact_binning)  # negative bins: never a key of |x| histograms
        cached = self._histograms.get(key)
        if cached is None:
            values = self._signed()
            if exact_binning:
                counts = exact_histogram(values, bins, upper)
            else:
                with paddle.no_grad():
                    counts = paddle.histogram(values, bins=bins, min=0.0, max=upper).numpy()
            cached = counts.astype(np.float32)
            self._histograms[key] = cached
        return cached

    def release(self) -> None:
        """Drops the tensor (and returns its buffer to its owner, if any)."""
        if self._release is not None and self.abs_values is not None:
            self._release(self.abs_values)
        if self._release is not None and self.signed_values is not None:
            self._release(self.signed_values)
        self.abs_values = None  # type: ignore[assignment]
        self.signed_values = None


class SampleSide:
    """One side of a signed sample, seen as a one-sided sample of magnitudes.

    The positive side counts ``x >= 0`` (zeros go here, as they do in the symmetric ``|x|``
    histogram); the negative side counts ``|x|`` for ``x < 0``. Its histogram is the ``|x|``
    histogram minus the positive one over the same bins: the bin of a value depends only on
    its magnitude, so the subtraction is exact and needs no negated copy of the tensor.
    """

    __slots__ = ("sample", "negative")

    def __init__(self, sample: TensorSample, negative: bool) -> None:
        self.sample = sample
        self.negative = negative

    def abs_max(self) -> float:
        """Largest finite magnitude on this side (0.0 when the side is empty)."""
        low, high = self.sample.min_max()
        return max(-low, 0.0) if self.negative else max(high, 0.0)

    def histogram(self, bins: int, upper: float, exact_binning: bool = False) -> np.ndarray:
        """Counts of this side's magnitudes in ``bins`` bins over ``[0, upper]``, float32."""
        positive = self.sample._nonnegative_histogram(bins, upper, exact_binning)
        if not self.negative:
            return positive
        return np.maximum(self.sample.histogram(bins, upper, exact_binning) - positive, 0.0)
