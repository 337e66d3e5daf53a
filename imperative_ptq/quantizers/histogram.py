"""Histogram statistics shared by the histogram-based algorithms (hist, KL, MSE).

Each tensor position keeps a fixed-size histogram of ``|x|`` over ``[0, upper]`` and the running
range ``upper``: memory is ``bins`` floats whatever the number of batches. Batches are merged in
one pass exactly as Paddle's ``combine_abs_max_and_hist`` does, so the statistics (and therefore
the thresholds) agree with Paddle's:

* a batch whose abs-max fits the range is binned over ``[0, upper]`` and added;
* a batch that exceeds it grows the range to ``bins * w * d`` where ``w = upper / (bins *
  upsample_bins)`` and ``d = ceil(batch_max / (bins * w))``: the old histogram is spread evenly
  over ``upsample_bins`` sub-bins each, regrouped ``d`` sub-bins per new bin (one reshape, no
  loop), and the batch is binned over the new range.

The re-binning assumes counts are uniform inside a bin, so a histogram merged over several
batches equals a single pass over all the data up to that assumption.

With ``symmetric=False`` each tensor position keeps two such histograms, one of ``x >= 0`` and
one of ``|x|`` for ``x < 0``, each merged the same way with its own range. The algorithm's
one-sided search runs on each side and gives the clip range ``[-t_neg, t_pos]`` (an empty side
gets 0, so a ReLU output is ``[0, t_pos]``). Levels: the affine grid has ``2**bits - 1`` steps
shared by the two sides in proportion to their clips, so a one-sided tensor searches with all
255 levels (not 127) and a balanced one with ~127 per side. The split depends on the clips it
produces, so it is iterated (first split by the observed ranges; at most
``_LEVEL_SPLIT_ROUNDS`` rounds, stopping when the clips no longer change).
"""

from __future__ import annotations

import abc
import math
from typing import Any

import numpy as np

from .base import BaseQuantizer, validate_bool
from .qparams import affine_levels
from .sample import TensorSample

__all__ = ["BaseHistQuantizer", "HistogramState", "rebin_histogram", "resample_histogram"]

#: Rounds of re-splitting the affine levels between the two sides (see the module docstring).
_LEVEL_SPLIT_ROUNDS = 3


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


_MAX_SUB_BINS = 1 << 22


def rebin_histogram(counts: np.ndarray, upsample_bins: int, downsample_bins: int) -> np.ndarray:
    """Spreads each bin over ``upsample_bins`` sub-bins and regroups ``downsample_bins`` at a time.

    Args:
        counts: Histogram of ``bins`` float32 counts over ``[0, upper]``.
        upsample_bins: Sub-bins per old bin.
        downsample_bins: Sub-bins per new bin (> ``upsample_bins``).

    Returns:
        The histogram over ``[0, upper * downsample_bins / upsample_bins]``, float32.
    """
    bins = counts.shape[0]
    if bins * downsample_bins <= _MAX_SUB_BINS:
        # Materialize the sub-bins and sum them, as Paddle does (bit-identical results).
        sub_bins = np.zeros(bins * downsample_bins, dtype=np.float32)
        sub_bins[: bins * upsample_bins] = np.repeat(counts, upsample_bins)
        merged = sub_bins.reshape(bins, downsample_bins).sum(axis=1, dtype=np.float64)
        return (merged / upsample_bins).astype(np.float32)
    # A batch far larger than the range so far (Paddle would allocate bins * downsample_bins
    # floats, gigabytes): integrate the piecewise-constant sub-bin mass at the new edges.
    prefix = np.concatenate(([0.0], np.cumsum(counts, dtype=np.float64)))
    # New edge k sits at k * downsample_bins sub-bins, clamped to the last old edge; computed
    # so that it cannot overflow int64 however large downsample_bins is (a range 1e30 times
    # the previous one makes it ~1e32).
    limit = bins * upsample_bins
    new_edges = np.arange(bins + 1, dtype=np.int64)
    edges = np.full(bins + 1, limit, dtype=np.int64)
    inside = new_edges <= limit // downsample_bins
    edges[inside] = new_edges[inside] * np.int64(min(downsample_bins, limit))
    whole, part = np.divmod(edges, upsample_bins)
    partial = np.concatenate((counts.astype(np.float64), [0.0]))[whole] * part / upsample_bins
    return np.diff(prefix[whole] + partial).astype(np.float32)


def resample_histogram(counts: np.ndarray, upper: float, new_upper: float) -> np.ndarray:
    """Re-bins a histogram over ``[0, upper]`` into as many bins over ``[0, new_upper]``.

    Counts are taken as uniform inside each bin (the cumulative count is interpolated
    linearly between bin edges), so mass is conserved exactly and placed to within one bin.
    """
    if new_upper == upper:
        return counts.astype(np.float32)
    bins = counts.shape[0]
    cumulative = np.concatenate(([0.0], np.cumsum(counts, dtype=np.float64)))
    old_edges = np.linspace(0.0, upper, bins + 1)
    new_edges = np.linspace(0.0, new_upper, bins + 1)
    return np.diff(np.interp(new_edges, old_edges, cumulative)).astype(np.float32)


class HistogramState:
    """Running histogram of ``|x|`` for one tensor position.

    Attributes:
        upper: Right edge of the range, 0.0 until a non-zero batch arrives.
        counts: ``bins`` float32 counts, ``None`` until a non-zero batch arrives.
    """

    __slots__ = ("upper", "counts")

    def __init__(self) -> None:
        self.upper = 0.0
        self.counts: np.ndarray | None = None

    def merge_sample(
        self, sample: TensorSample, bins: int, upsample_bins: int, exact_binning: bool
    ) -> None:
        """Adds one batch, growing the range when the batch exceeds it."""
        batch_max = sample.abs_max()
        if batch_max == 0.0:
            return
        if self.counts is None:
            self.upper = batch_max
            self.counts = sample.histogram(bins, batch_max, exact_binning).copy()
        elif batch_max <= self.upper:
            self.counts = self.counts + sample.histogram(bins, self.upper, exact_binning)
        else:
            sub_bin_width = self.upper / (bins * upsample_bins)
            downsample_bins = int(math.ceil(batch_max / (bins * sub_bin_width)))
            new_upper = bins * sub_bin_width * downsample_bins
            rebinned = rebin_histogram(self.counts, upsample_bins, downsample_bins)
            self.counts = sample.histogram(bins, new_upper, exact_binning) + rebinned
            self.upper = new_upper

    def merge_histogram(self, upper: float, counts: np.ndarray | None, upsample_bins: int) -> None:
        """Adds another histogram over ``[0, upper]`` (e.g. from another shard).

        The range grows on the same grid as :meth:`merge_sample`; the other histogram is then
        resampled onto this one's bins (:func:`resample_histogram`).
        """
        if counts is None or upper == 0.0:
            return
        if self.counts is None:
            self.upper, self.counts = upper, counts.astype(np.float32).copy()
            return
        bins = self.counts.shape[0]
        if counts.shape[0] != bins:
            raise ValueError(f"cannot merge a histogram of {counts.shape[0]} bins into {bins}")
        if upper > self.upper:
            sub_bin_width = self.upper / (bins * upsample_bins)
            downsample_bins = int(math.ceil(upper / (bins * sub_bin_width)))
            self.counts = rebin_histogram(self.counts, upsample_bins, downsample_bins)
            self.upper = bins * sub_bin_width * downsample_bins
        self.counts = self.counts + resample_histogram(counts, upper, self.upper)


class BaseHistQuantizer(BaseQuantizer, metaclass=abc.ABCMeta):
    """Keeps a merged histogram per tensor position; subclasses choose the threshold.

    Args:
        quant_bits: Bit width, 1..16.
        bins: Number of histogram bins.
        upsample_bins: Sub-bins per bin used when the range grows (see module docstring).
        exact_binning: Bin exactly like ``np.histogram``, as Paddle does (default), so that
            thresholds equal Paddle's bit for bit. ``False`` uses ``paddle.histogram`` alone,
            ~2x cheaper, which puts the few elements per million lying within an ulp of a bin
            edge into the neighbouring bin; KL thresholds can then move by a few percent.
        symmetric: ``False`` keeps signed statistics and gives affine (uint8, zero point)
            parameters from a clip range per tensor (see the module docstring).
    """

    def __init__(
        self,
        quant_bits: int = 8,
        bins: int = 1024,
        upsample_bins: int = 64,
        exact_binning: bool = True,
        symmetric: bool = True,
    ) -> None:
        super().__init__(quant_bits)
        self.bins = _check_positive_int("bins", bins)
        self.upsample_bins = _check_positive_int("upsample_bins", upsample_bins)
        self.exact_binning = validate_bool("exact_binning", exact_binning)
        self.symmetric = validate_bool("symmetric", symmetric)
        #: Histograms of ``|x|`` (symmetric) or of ``x >= 0`` (affine), per tensor position.
        self.states: list[HistogramState] = []
        #: Affine only: histograms of ``|x|`` for ``x < 0``, per tensor position.
        self.negative_states: list[HistogramState] = []
        self._check_bins()

    def _check_bins(self) -> None:
        """Raises ``ValueError`` if ``bins`` cannot serve the algorithm (override to check)."""

    @property
    def uses_signed_values(self) -> bool:  # type: ignore[override]
        return not self.symmetric

    def config(self) -> dict[str, Any]:
        # ``symmetric`` is listed only when False, so symmetric tables and state files stay
        # byte-identical to (and compatible with) those written before the option existed.
        config = super().config()
        if config.get("symmetric") is True:
            del config["symmetric"]
        return config

    @property
    def num_tensors(self) -> int:
        return len(self.states)

    def observe(self, index: int, sample: TensorSample) -> None:
        while len(self.states) <= index:
            self.states.append(HistogramState())
        if self.symmetric:
            self.states[index].merge_sample(
                sample, self.bins, self.upsample_bins, self.exact_binning
            )
            return
        while len(self.negative_states) <= index:
            self.negative_states.append(HistogramState())
        for states, negative in ((self.states, False), (self.negative_states, True)):
            states[index].merge_sample(
                sample.side(negative), self.bins, self.upsample_bins, self.exact_binning
            )

    def compute_threshold(self, index: int) -> float:
        if not self.symmetric:
            low, high = self.compute_range(index)
            return max(-low, high)
        state = self.states[index]
        if state.counts is None or not np.any(state.counts):
            # Only zeros (or NaN/Inf) were seen: any positive threshold represents them.
            return state.upper
        return self.threshold_from_histogram(state.counts, state.upper / self.bins)

    def observed_maximum(self, index: int) -> float | None:
        """The right edge of the last non-empty bin of ``|x|`` (of ``x`` and of ``-x`` for
        affine statistics): the largest value seen, rounded up to the bin width."""
        if index >= self.num_tensors:
            return None
        states = [self.states[index]] + ([] if self.symmetric else [self.negative_states[index]])
        edges = [
            float((np.flatnonzero(state.counts)[-1] + 1) * (state.upper / self.bins))
            for state in states if state.counts is not None and np.any(state.counts)
        ]
        return max(edges, default=0.0)

    def compute_range(self, index: int) -> tuple[float, float]:
        """Affine clip range ``(-t_neg, t_pos)`` from the two one-sided searches."""
        if self.symmetric:
            raise NotImplementedError(f"{type(self).__name__}(symmetric=True) has no ranges")
        sides = (self.negative_states[index], self.states[index])
        total_levels = affine_levels(self.quant_bits)
        clips = [state.upper for state in sides]
        for _ in range(_LEVEL_SPLIT_ROUNDS):
            span = clips[0] + clips[1]
            positive_levels = round(total_levels * clips[1] / span) if span > 0 else total_levels
            positive_levels = min(max(positive_levels, 1), total_levels)
            levels = (max(total_levels - positive_levels, 1), positive_levels)
            new_clips = [self._side_clip(state, n) for state, n in zip(sides, levels)]
            if new_clips == clips:
                break
            clips = new_clips
        return (-clips[0] if clips[0] else 0.0), clips[1]

    def _side_clip(self, state: HistogramState, levels: int) -> float:
        """One side's clip (0.0 for a side that saw no mass)."""
        if state.counts is None or not np.any(state.counts):
            return 0.0
        return float(self.threshold_for_levels(state.counts, state.upper / self.bins, levels))

    def threshold_for_levels(self, counts: np.ndarray, bin_width: float, levels: int) -> float:
        """The clip of one side of an affine tensor quantized with ``levels`` steps.

        Algorithms whose search depends on the number of levels (KL, MSE) override this; the
        default ignores ``levels`` and uses :meth:`threshold_from_histogram`.
        """
        return self.threshold_from_histogram(counts, bin_width)

    @abc.abstractmethod
    def threshold_from_histogram(self, counts: np.ndarray, bin_width: float) -> float:
        """The threshold for a histogram of ``|x|`` with bins of width ``bin_width``."""

    def _statistics(self) -> dict[str, np.ndarray]:
        statistics = self._pack(self.states)
        if not self.symmetric:
            negative = self._pack(self.negative_states)
            statistics["negative_upper"] = negative["upper"]
            statistics["negative_counts"] = negative["counts"]
        return statistics

    def _pack(self, states: list[HistogramState]) -> dict[str, np.ndarray]:
        uppers = np.array([state.upper for state in states], dtype=np.float64)
        counts = np.zeros((len(states), self.bins), dtype=np.float32)
        for index, state in enumerate(states):
            if state.counts is not None:
                counts[index] = state.counts
        return {"upper": uppers, "counts": counts}

    def _load_statistics(self, state: dict[str, np.ndarray]) -> None:
        self.states = self._unpack(state, "upper", "counts")
        if not self.symmetric:
            self.negative_states = self._unpack(state, "negative_upper", "negative_counts")
            if len(self.negative_states) != len(self.states):
                raise ValueError("'negative_upper' and 'upper' differ in length")

    def _unpack(
        self, state: dict[str, np.ndarray], upper_key: str, counts_key: str
    ) -> list[HistogramState]:
        uppers = np.asarray(state[upper_key], dtype=np.float64).reshape(-1)
        counts = np.asarray(state[counts_key], dtype=np.float32)
        if counts.shape != (uppers.shape[0], self.bins):
            raise ValueError(
                f"{counts_key!r} has shape {counts.shape}, expected {(uppers.shape[0], self.bins)}"
            )
        states = []
        for upper, row in zip(uppers, counts):
            histogram = HistogramState()
            if upper > 0.0:
                histogram.upper, histogram.counts = float(upper), row.copy()
            states.append(histogram)
        return states

    def _merge_statistics(self, other: "BaseHistQuantizer") -> None:
        for mine, theirs in zip(
            self.states + self.negative_states, other.states + other.negative_states
        ):
            mine.merge_histogram(theirs.upper, theirs.counts, self.upsample_bins)

    def _reset_statistics(self) -> None:
        self.states = []
        self.negative_states = []
