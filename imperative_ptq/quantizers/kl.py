"""KL-divergence calibration as Paddle computes it, vectorized.

Paddle's ``cal_kl_threshold`` (after the TensorRT entropy calibrator, Migacz 2017) tries every
candidate clip ``i`` from half the histogram to its end: the reference ``P = hist[:i]`` with all
outliers ``sum(hist[i:])`` added to its last bin, the candidate ``Q`` made by merging ``hist[:i]``
into 127 levels and spreading each level back over its non-empty bins; it returns
``(argmin KL + 0.5) * bin_width``, taking the first minimum.

Paddle loops in Python (9-20 s per model); here every candidate is a row of one matrix (~1 ms
per histogram). Under numpy 2 part of Paddle's arithmetic happens in float32 (``sum`` of float32
scalars, ``P_sum * q``, and everything touching the last bin), and near-ties between candidates
are decided by that rounding, so those steps are reproduced in float32 exactly: with the same
histogram the same threshold comes out.
"""

from __future__ import annotations

import numpy as np

from .clip_bound import DEFAULT_MAX_CLIPPED_SHARE, ClipBoundedHistQuantizer
from .level_groups import GroupedCandidates
from .qparams import affine_levels, symmetric_levels

__all__ = ["DEFAULT_MAX_CLIPPED_SHARE", "KLQuantizer", "paddle_kl_threshold"]

_f32 = np.float32

def _sequential_tail_sums(counts: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """``sum(counts[s:])`` for each ``s``, accumulated left to right in float32 as Python's
    ``sum`` over float32 scalars does (``cumsum`` is sequential; ``np.sum`` would be pairwise)."""
    width = counts.shape[0] - int(starts.min())
    padded = np.concatenate((counts, np.zeros(width, dtype=np.float32)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, width)[starts]
    return np.cumsum(windows, axis=1, dtype=np.float32)[:, -1]


def paddle_kl_threshold(
    counts: np.ndarray, bin_width: float, quant_bits: int, levels: int | None = None
) -> float:
    """Threshold of Paddle's ``cal_kl_threshold(counts, bin_width, quant_bits)``.

    Args:
        counts: Histogram of ``|x|``, float32.
        bin_width: Width of one bin.
        quant_bits: Bit width; Paddle merges into ``2**(quant_bits-1) - 1`` levels.
        levels: Merge into this many levels instead (one side of an affine tensor).
    """
    counts = np.asarray(counts, dtype=np.float32)
    bins = counts.shape[0]
    levels = symmetric_levels(quant_bits) if levels is None else levels
    first = int((bins - 1) * 0.5)
    candidates = np.arange(first, bins)
    # Paddle skips candidates whose last reference bin is empty.
    candidates = candidates[counts[candidates - 1] != 0]
    if candidates.size == 0:
        # Paddle's fallback: the last non-empty bin at or below the start of the search.
        nonzero = np.flatnonzero(counts[: first + 1])
        fallback = int(nonzero[-1]) if nonzero.size else 0
        return (fallback + 0.5) * bin_width

    total32 = np.sum(counts)  # float32, pairwise: as Paddle's ``np.sum``
    groups = GroupedCandidates(counts, candidates, levels)
    last = candidates - 1
    last_count = counts[last].astype(np.float64)
    q_sum = groups.prefix[candidates]

    # Bins before the last one, in float64 like Paddle's Python floats.
    counts64 = counts.astype(np.float64)  # math.log and Python float products in Paddle
    log_counts = np.log(np.where(counts64 > 0, counts64, 1.0))
    plogp_prefix = np.concatenate(([0.0], np.cumsum(counts64 * log_counts)))
    head_mass = groups.prefix[last]
    tmp1_head = np.log(q_sum) * head_mass + plogp_prefix[last]

    q_level = groups.expanded_levels()
    with np.errstate(divide="ignore"):
        log_pq = np.log(
            (total32 * q_level.astype(_f32)).astype(np.float64), where=q_level > 0,
            out=np.zeros_like(q_level),
        )
    head_group_mass = groups.group_sums.copy()
    head_group_mass[:, -1] -= last_count
    tmp2_head = np.sum(log_pq * head_group_mass, axis=1)

    # The last reference bin carries the outliers and is float32 in Paddle.
    p_last = (counts[last] + _sequential_tail_sums(counts, candidates)).astype(_f32)
    log_q_last = np.log((q_sum.astype(_f32) * p_last).astype(np.float64))
    term1 = (p_last * log_q_last.astype(_f32)).astype(_f32)
    log_pq_last = np.log((total32 * q_level[:, -1].astype(_f32)).astype(np.float64))
    term2 = (p_last * log_pq_last.astype(_f32)).astype(_f32)
    tmp1 = (tmp1_head.astype(_f32) + term1).astype(_f32)
    tmp2 = (tmp2_head.astype(_f32) + term2).astype(_f32)
    divergence = ((tmp1 - tmp2) / total32).astype(_f32)
    divergence = np.where(np.isnan(divergence), np.inf, divergence)
    best = int(candidates[int(np.argmin(divergence))])
    return (best + 0.5) * bin_width


class KLQuantizer(ClipBoundedHistQuantizer):
    """KL-divergence threshold, Paddle's variant (Paddle's ``KLQuantizer``).

    Searches clips from half the histogram range upwards and merges into
    ``2**(quant_bits-1) - 1`` levels. See :class:`TensorRTKLQuantizer` for the TensorRT variant.

    KL clips outliers; on data bounded and dense up to its maximum it clips the data itself.
    On MNIST pixels in ``[0, 1]`` Paddle's search returns 0.50, clipping 69% of the non-zero
    pixels (measured, real data: a first-layer input clipped there cost a ResNet-style net 9
    points of accuracy and a MobileNet-style one 44). Where the KL threshold would clip more
    than ``max_clipped_share`` of the non-zero values, the histogram's maximum is kept instead
    (hidden activations of trained and random-weight models clip at most 9%).

    Args:
        quant_bits: Bit width, 1..16.
        bins: Number of histogram bins; needs ``bins >= 2**quant_bits - 1`` (the search
            starts at half the histogram, which must hold ``2**(quant_bits-1) - 1`` levels).
        upsample_bins: Sub-bins per bin when the range grows.
        exact_binning: Bin like ``np.histogram``, as Paddle does (see :class:`BaseHistQuantizer`).
        symmetric: ``False``: affine, a KL search per side with its share of ``2**bits - 1``
            levels; needs ``bins >= 2**(bits+1) - 1``.
        max_clipped_share: The largest share of the non-zero values (those above the first
            bin) a KL threshold may clip, in (0, 1]; ``None`` returns Paddle's threshold
            always.

    Raises:
        ValueError: ``bins`` is too small to merge into the quantization levels, or
            ``max_clipped_share`` is out of range.
        TypeError: ``max_clipped_share`` is not a float or ``None``.
    """

    def _check_bins(self) -> None:
        levels = symmetric_levels(self.quant_bits) if self.symmetric else affine_levels(self.quant_bits)
        if self.quant_bits < 2:
            raise ValueError(f"KLQuantizer needs quant_bits >= 2, got quant_bits={self.quant_bits}")
        if int((self.bins - 1) * 0.5) < levels:
            raise ValueError(
                f"KLQuantizer needs bins >= {2 * levels + 1} for quant_bits={self.quant_bits}, "
                f"got bins={self.bins}"
            )

    def threshold_from_histogram(self, counts: np.ndarray, bin_width: float) -> float:
        return self._bounded(counts, bin_width, paddle_kl_threshold(counts, bin_width, self.quant_bits))

    def threshold_for_levels(self, counts: np.ndarray, bin_width: float, levels: int) -> float:
        return self._bounded(counts, bin_width, paddle_kl_threshold(counts, bin_width, self.quant_bits, levels))
