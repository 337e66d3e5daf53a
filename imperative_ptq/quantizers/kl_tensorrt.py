"""KL-divergence calibration, TensorRT's variant ("entropy calibration", Migacz 2017).

Differs from Paddle's :mod:`.kl` in where the search starts and how many levels it merges into:
TensorRT tries every clip from ``2**(bits-1)`` bins (128 for int8) upwards and merges into
``2**(bits-1)`` levels, so it may clip much harder than Paddle, which starts at half the range.
Divergences are computed in float64 on normalized distributions::

    KL(P || Q) = sum_j P_j log(P_j / Q_j),   P = p / sum(p),   Q = q / sum(q)

with ``p = hist[:i]`` plus the outliers in its last bin and ``q`` the merged-and-expanded
candidate. Candidates whose last bin is empty are skipped (``Q`` would be 0 where ``P`` is not).
"""

from __future__ import annotations

import numpy as np

from .clip_bound import ClipBoundedHistQuantizer
from .level_groups import GroupedCandidates
from .qparams import affine_levels

__all__ = ["TensorRTKLQuantizer", "tensorrt_kl_threshold"]


def tensorrt_kl_threshold(
    counts: np.ndarray, bin_width: float, quant_bits: int, levels: int | None = None
) -> float:
    """TensorRT-style KL threshold of a histogram of ``|x|``.

    Args:
        counts: Histogram, float32 or float64.
        bin_width: Width of one bin.
        quant_bits: Bit width; merges into ``2**(quant_bits-1)`` levels.
        levels: Merge into this many levels instead (one side of an affine tensor).
    """
    counts = np.asarray(counts, dtype=np.float64)
    bins = counts.shape[0]
    levels = 2 ** (quant_bits - 1) if levels is None else levels
    candidates = np.arange(levels, bins + 1)
    candidates = candidates[counts[candidates - 1] != 0]
    if candidates.size == 0:
        return bins * bin_width

    groups = GroupedCandidates(counts, candidates, levels)
    total = groups.prefix[-1]
    last = candidates - 1
    head_mass = groups.prefix[last]
    q_total = groups.prefix[candidates]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_counts = np.where(counts > 0, np.log(np.where(counts > 0, counts, 1.0)), 0.0)
        plogp_prefix = np.concatenate(([0.0], np.cumsum(counts * log_counts)))
        q_level = groups.expanded_levels()
        log_q = np.where(q_level > 0, np.log(np.where(q_level > 0, q_level, 1.0)), 0.0)
        head_group_mass = groups.group_sums.copy()
        head_group_mass[:, -1] -= counts[last]
        # sum_j p_j log(p_j / q_j) over the bins before the last, unnormalized ...
        head = plogp_prefix[last] - np.sum(head_group_mass * log_q, axis=1)
        # ... plus the last bin, which carries the outliers.
        p_last = total - head_mass
        tail = p_last * (np.log(p_last) - log_q[:, -1])
        # Normalizing P by `total` and Q by `q_total` turns the sum into KL(P || Q).
        divergence = (head + tail) / total - np.log(total) + np.log(q_total)
    divergence = np.where(np.isfinite(divergence), divergence, np.inf)
    best = int(candidates[int(np.argmin(divergence))])
    return (best + 0.5) * bin_width


class TensorRTKLQuantizer(ClipBoundedHistQuantizer):
    """KL-divergence threshold, TensorRT's variant (search from 128 bins, 128 levels for int8).

    Where the threshold would clip more than ``max_clipped_share`` of the non-zero values, the
    histogram's maximum is kept instead (:mod:`.clip_bound`): on MNIST pixels in ``[0, 1]``
    TensorRT's search returns 0.50 too.

    Args:
        quant_bits: Bit width, 2..16; needs ``bins >= 2**(quant_bits-1)``.
        bins: Number of histogram bins.
        upsample_bins: Sub-bins per bin when the range grows.
        exact_binning: Bin like ``np.histogram``, as Paddle does (see :class:`BaseHistQuantizer`).
        symmetric: ``False``: affine, a KL search per side with its share of ``2**bits - 1``
            levels; needs ``bins >= 2**bits - 1``.
        max_clipped_share: The largest share of the non-zero values (those above the first
            bin) the threshold may clip, in (0, 1]; ``None`` returns TensorRT's threshold
            always.

    Raises:
        ValueError: ``bins`` is smaller than the number of levels, or ``max_clipped_share``
            is out of range.
        TypeError: ``max_clipped_share`` is not a float or ``None``.
    """

    def _check_bins(self) -> None:
        levels = 2 ** (self.quant_bits - 1) if self.symmetric else affine_levels(self.quant_bits)
        if self.quant_bits < 2:
            raise ValueError(f"TensorRTKLQuantizer needs quant_bits >= 2, got quant_bits={self.quant_bits}")
        if self.bins < levels:
            raise ValueError(
                f"TensorRTKLQuantizer needs bins >= {levels} for quant_bits={self.quant_bits}, "
                f"got bins={self.bins}"
            )

    def threshold_from_histogram(self, counts: np.ndarray, bin_width: float) -> float:
        return self._bounded(counts, bin_width, tensorrt_kl_threshold(counts, bin_width, self.quant_bits))

    def threshold_for_levels(self, counts: np.ndarray, bin_width: float, levels: int) -> float:
        return self._bounded(counts, bin_width, tensorrt_kl_threshold(counts, bin_width, self.quant_bits, levels))
