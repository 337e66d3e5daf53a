"""Percentile ("hist") calibration: the threshold keeps ``hist_percent`` of all values in range.

Paddle's ``HistQuantizer`` takes the first bin ``k`` whose cumulative share reaches
``hist_percent`` and returns ``(k - 0.5) * bin_width``, the centre of the bin before it. Two
defects are fixed here: when bin 0 already holds the percentile Paddle returns the negative
``-0.5 * bin_width`` (here: the centre of bin 0, ``0.5 * bin_width``), and under numpy 2 its
``float()`` of a 1-element array raises.
"""

from __future__ import annotations

import numpy as np

from .histogram import BaseHistQuantizer

__all__ = ["HistQuantizer", "percentile_threshold"]


def percentile_threshold(counts: np.ndarray, bin_width: float, percent: float) -> float:
    """Paddle's percentile threshold, never below the centre of the first bin."""
    cumulative = np.cumsum(counts / np.sum(counts, dtype=np.float64))
    index = int(np.searchsorted(cumulative, percent, side="left"))
    index = min(index, counts.shape[0] - 1)
    return max(index - 0.5, 0.5) * bin_width


class HistQuantizer(BaseHistQuantizer):
    """Percentile of the histogram of ``|x|`` (Paddle's ``HistQuantizer``).

    Args:
        quant_bits: Bit width, 1..16.
        bins: Number of histogram bins.
        upsample_bins: Sub-bins per bin when the range grows.
        hist_percent: Share of values to keep inside the threshold, in (0, 1).
        exact_binning: Bin like ``np.histogram``, as Paddle does (see :class:`BaseHistQuantizer`).
        symmetric: ``False``: affine, the percentile is taken on each side separately.
    """

    def __init__(
        self,
        quant_bits: int = 8,
        bins: int = 1024,
        upsample_bins: int = 64,
        hist_percent: float = 0.99999,
        exact_binning: bool = True,
        symmetric: bool = True,
    ) -> None:
        super().__init__(quant_bits, bins, upsample_bins, exact_binning, symmetric)
        if isinstance(hist_percent, bool) or not isinstance(hist_percent, (int, float, np.floating)):
            raise TypeError(f"hist_percent must be a float, got {type(hist_percent).__name__}")
        if not 0.0 < float(hist_percent) < 1.0:
            raise ValueError(f"hist_percent must be in (0, 1), got {hist_percent}")
        self.hist_percent = float(hist_percent)

    def threshold_from_histogram(self, counts: np.ndarray, bin_width: float) -> float:
        return percentile_threshold(counts, bin_width, self.hist_percent)
