"""Which call of a layer within one forward of its model is running.

A layer called more than once in a forward may need each call quantized its own way: a conv of
a residual block that is called again on the block's output reads the block's input on u8 codes
up to ``L`` and the block's output, which Paddle Inference's fused residual conv writes
unclipped, on codes up to 255 (measured: 2.9e-2 of the largest output off Paddle Inference with
one largest code for both calls, 3.5e-7 with one per call). Calibration counts the calls of every
layer within each forward of the model (:attr:`~imperative_ptq.session.LayerState.calls_per_forward`);
the converted model counts them the same way: :func:`count_forwards` registers a forward-pre
hook on the model that starts a new forward, and :class:`PerCallTopCodes` counts its layer's
calls since then. A layer called on its own (outside a forward of its model) counts its calls
modulo the calls a forward makes, so a sub-model run on its own keeps the calls' order too.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import paddle

__all__ = ["CallCounter", "PerCallTopCodes", "count_forwards"]

#: Attribute marking a model whose forwards :func:`count_forwards` counts.
_COUNTED = "_imperative_ptq_counts_forwards"
_forwards = threading.local()


def _new_forward(model: paddle.nn.Layer, inputs: Any) -> None:
    """Forward-pre hook: a forward of a counted model begins in this thread."""
    _forwards.serial = getattr(_forwards, "serial", 0) + 1


def count_forwards(model: paddle.nn.Layer) -> None:
    """Makes every forward of ``model`` restart the call counts of its layers' per-call state
    (idempotent; a deep copy of the model keeps the hook)."""
    if not getattr(model, _COUNTED, False):
        model.register_forward_pre_hook(_new_forward)
        setattr(model, _COUNTED, True)


class CallCounter:
    """Counts a layer's calls within each forward of its model.

    Args:
        calls_per_forward: How many calls a forward makes (calls counted outside a forward of
            the model wrap around at it).

    Raises:
        ValueError: ``calls_per_forward`` is below 1.
    """

    def __init__(self, calls_per_forward: int) -> None:
        if int(calls_per_forward) < 1:
            raise ValueError(f"CallCounter needs calls_per_forward >= 1, got {calls_per_forward!r}")
        self.calls_per_forward = int(calls_per_forward)
        self._serial = -1
        self._calls = 0

    def next_call(self) -> int:
        """The index of the call now running within the forward (counts it)."""
        serial = getattr(_forwards, "serial", 0)
        if serial != self._serial:
            self._serial, self._calls = serial, 0
        call = self._calls % self.calls_per_forward
        self._calls += 1
        return call


class PerCallTopCodes(CallCounter):
    """The largest input code of each call of a layer within a forward.

    Args:
        tops: Per call, in the order a forward makes them (at least two calls).

    Raises:
        ValueError: Fewer than two calls, or a code outside 1..255.
    """

    def __init__(self, tops: Sequence[int]) -> None:
        self.tops = tuple(int(top) for top in tops)
        if len(self.tops) < 2 or not all(0 < top <= 255 for top in self.tops):
            raise ValueError(f"PerCallTopCodes needs two or more codes 1..255, got {list(tops)!r}")
        super().__init__(len(self.tops))

    def next_top(self) -> int:
        """The largest code of the call now running (counts it)."""
        return self.tops[self.next_call()]

    def __repr__(self) -> str:
        return f"PerCallTopCodes({list(self.tops)})"
