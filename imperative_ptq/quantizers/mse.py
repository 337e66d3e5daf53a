"""MSE calibration: the threshold that minimizes the expected squared quantization error.

For a clip ``t`` and ``L = 2**(bits-1) - 1`` levels the step is ``s = t / L``. A value inside
``[0, t]`` is rounded, with error uniform in ``[-s/2, s/2]`` (variance ``s**2 / 12``); a value
``v > t`` is clipped to ``t`` (error ``v - t``). Over the histogram, with bin centres ``c_b``::

    E(t) = s**2 / 12 * N(c <= t) + sum_{c_b > t} h_b (c_b - t)**2

The clipping sum expands to ``S2 - 2 t S1 + t**2 S0`` over suffix sums of ``h``, ``h c`` and
``h c**2``, so all ``bins`` candidates (``t`` at each bin's right edge) are scored in O(bins).
Small ``t`` clips too much, large ``t`` rounds too coarsely; the minimum balances the two, as in
Banner et al. 2019 (ACIQ) without assuming a distribution.
"""

from __future__ import annotations

import numpy as np

from .histogram import BaseHistQuantizer
from .qparams import symmetric_levels

__all__ = ["MSEQuantizer", "mse_threshold"]


def mse_threshold(
    counts: np.ndarray, bin_width: float, quant_bits: int, levels: int | None = None
) -> float:
    """Clip at a bin edge minimizing the expected squared error of ``quant_bits`` quantization
    (or of ``levels`` steps between 0 and the clip, for one side of an affine tensor)."""
    counts = np.asarray(counts, dtype=np.float64)
    bins = counts.shape[0]
    if levels is None:
        levels = symmetric_levels(quant_bits)
    centres = (np.arange(bins) + 0.5) * bin_width
    clips = np.arange(1, bins + 1) * bin_width  # clip k keeps bins [0, k)

    def beyond(values: np.ndarray) -> np.ndarray:
        # beyond(v)[k-1] = sum(v[k:]): the mass clipped by clip k, for k = 1..bins
        return np.append(np.cumsum(values[::-1])[::-1][1:], 0.0)

    s0 = beyond(counts)
    s1 = beyond(counts * centres)
    s2 = beyond(counts * centres**2)
    inside = np.cumsum(counts)
    rounding = (clips / levels) ** 2 / 12.0 * inside
    clipping = s2 - 2.0 * clips * s1 + clips**2 * s0
    error = rounding + np.maximum(clipping, 0.0)
    return float(clips[int(np.argmin(error))])


class MSEQuantizer(BaseHistQuantizer):
    """Threshold minimizing the expected squared quantization error over the histogram.

    Args:
        quant_bits: Bit width, 1..16.
        bins: Number of histogram bins.
        upsample_bins: Sub-bins per bin when the range grows.
        exact_binning: Bin like ``np.histogram``, as Paddle does (see :class:`BaseHistQuantizer`).
        symmetric: ``False``: affine, each side minimizes its error with its share of
            ``2**bits - 1`` levels.
    """

    def threshold_from_histogram(self, counts: np.ndarray, bin_width: float) -> float:
        return mse_threshold(counts, bin_width, self.quant_bits)

    def threshold_for_levels(self, counts: np.ndarray, bin_width: float, levels: int) -> float:
        return mse_threshold(counts, bin_width, self.quant_bits, levels)
