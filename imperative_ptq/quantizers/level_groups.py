"""Vectorized bookkeeping for the KL searches: which histogram bins merge into which level.

Both KL variants try every candidate length ``i`` of the reference histogram ``hist[:i]`` and
squeeze it into ``levels`` quantization levels: groups of ``n = i // levels`` consecutive bins,
the last group extended to ``i``. Worked example, ``i = 10``, ``levels = 3``: ``n = 3`` and the
groups are ``[0, 3)``, ``[3, 6)``, ``[6, 10)``. Every candidate is handled at once as a row of a
``[candidates, levels]`` matrix; sums over groups come from prefix sums, never from a loop.
"""

from __future__ import annotations

import numpy as np

__all__ = ["GroupedCandidates"]


class GroupedCandidates:
    """Per-candidate, per-level group sums of a histogram.

    Args:
        counts: The histogram, float32.
        candidates: Candidate lengths ``i`` (each ``>= levels``), int array.
        levels: Number of quantization levels.

    Attributes:
        group_sums: ``[C, levels]`` float64, sum of the counts in each group.
        group_nonzero: ``[C, levels]`` int, number of non-empty bins in each group.
        prefix: ``[bins + 1]`` float64 prefix sums of ``counts`` (``prefix[i] = sum(counts[:i])``).
    """

    def __init__(self, counts: np.ndarray, candidates: np.ndarray, levels: int) -> None:
        merged = candidates // levels
        starts = np.arange(levels)[None, :] * merged[:, None]
        ends = starts + merged[:, None]
        ends[:, -1] = candidates
        self.prefix = np.concatenate(([0.0], np.cumsum(counts, dtype=np.float64)))
        nonzero_prefix = np.concatenate(([0], np.cumsum(counts != 0)))
        self.group_sums = self.prefix[ends] - self.prefix[starts]
        self.group_nonzero = nonzero_prefix[ends] - nonzero_prefix[starts]

    def expanded_levels(self) -> np.ndarray:
        """Value each non-empty bin of a group gets when its level is expanded back: the
        group's sum spread evenly over its non-empty bins (0 for groups with none)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(
                self.group_nonzero > 0, self.group_sums / np.maximum(self.group_nonzero, 1), 0.0
            )
