"""Distributed calibration: merge every rank's statistics with ``paddle.distributed``.

Each rank calibrates its own shard; :func:`all_merge` gathers every rank's statistics
(``all_gather_object``: a few hundred KB per model, dominated by histograms of ``bins`` floats)
and every rank merges them in rank order. Merging in the same order on every rank makes the
result bit-identical across ranks, and equal to one process over the union of the shards up to
the histogram re-binning of :meth:`BaseQuantizer.merge` (exact for abs-max). Works with the gloo
backend on CPU-only machines.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import paddle.distributed as dist

from .quantizers import BaseQuantizer

__all__ = ["all_merge"]

logger = logging.getLogger(__name__)


def all_merge(quantizers: Mapping[str, BaseQuantizer], group: Any = None) -> None:
    """Replaces each quantizer's statistics by the merge over all ranks (no-op on one rank).

    Args:
        quantizers: The rank's quantizers, keyed identically on every rank.
        group: Communication group (default: the global group).

    Raises:
        ValueError: Ranks hold different sets of quantizers.
    """
    if not dist.is_initialized() or dist.get_world_size(group) <= 1:
        return
    local = {key: q.state_dict() for key, q in quantizers.items()}
    gathered: list[dict[str, Any]] = []
    dist.all_gather_object(gathered, local, group=group)
    keys = set(quantizers)
    for rank, states in enumerate(gathered):
        if set(states) != keys:
            difference = sorted(keys.symmetric_difference(states))
            raise ValueError(
                f"rank {rank} calibrated other layers than this rank (first difference: "
                f"{difference[0]!r})"
            )
    for key, quantizer in quantizers.items():
        quantizer.reset()
        for states in gathered:
            shard = quantizer.clone()
            shard.load_state_dict(states[key])
            quantizer.merge(shard)
    logger.info("merged calibration statistics of %d ranks", len(gathered))
