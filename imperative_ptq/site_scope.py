"""Whether the forward of a layer that owns functional-op sites is running in this thread.

The routers of ``paddle.matmul``, ``F.linear``, ``paddle.concat`` and multiplies
(:mod:`imperative_ptq.functional_matmul`, :mod:`imperative_ptq.functional_ops`) replace Paddle's
functions for the whole process. Finding a call's layer means walking the Python stack, which
tripled the cost of every ``x * y`` in the process once any model had a site (2.0 -> 6.9 us per
call, measured). So the routers walk the stack only while a model is being calibrated or while
:func:`inside_site_owner`: a layer given a site is :func:`watch` ed (a forward-pre hook counts it
in, a forward-post hook out; copies of the layer copy the hooks), and every other call costs one
check.

A forward that raises leaves its layer counted in: the routers then keep taking the slow path in
that thread, which is slower but computes the same.
"""

from __future__ import annotations

import threading
from typing import Any

import paddle

__all__ = ["inside_site_owner", "watch"]

#: Attribute marking a layer whose hooks :func:`watch` registered.
_WATCHED = "_imperative_ptq_site_owner"
_running = threading.local()


def _counts() -> dict[int, int]:
    counts = getattr(_running, "counts", None)
    if counts is None:
        counts = _running.counts = {}
    return counts


def _enter(layer: paddle.nn.Layer, inputs: Any) -> None:
    counts = _counts()
    counts[id(layer)] = counts.get(id(layer), 0) + 1


def _leave(layer: paddle.nn.Layer, inputs: Any, outputs: Any) -> None:
    counts = _counts()
    remaining = counts.get(id(layer), 0) - 1
    if remaining > 0:
        counts[id(layer)] = remaining
    else:
        counts.pop(id(layer), None)


def watch(layer: paddle.nn.Layer) -> None:
    """Counts ``layer``'s forwards from now on (idempotent)."""
    if getattr(layer, _WATCHED, False):
        return
    layer.register_forward_pre_hook(_enter)
    layer.register_forward_post_hook(_leave)
    setattr(layer, _WATCHED, True)


def inside_site_owner() -> bool:
    """Whether this thread is inside the forward of a :func:`watch` ed layer."""
    return bool(getattr(_running, "counts", None))
