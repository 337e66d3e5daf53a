"""Whether the forward of a layer that owns functional-op sites is running in this thread.

The routers of ``paddle.matmul``, ``F.linear``, ``paddle.concat`` and multiplies
(:mod:`imperative_ptq.functional_matmul`, :mod:`imperative_ptq.functional_ops`) replace Paddle's
functions for the whole process. Finding a call's layer means walking the Python stack, which
tripled the cost of every ``x * y`` in the process once any model had a site (2.0 -> 6.9 us per
call, measured). So the routers walk the stack only while a model is being calibrated or while
:func:`inside_site_owner`: a layer given a site is :func:`watch` ed (a forward-pre hook counts it
in, a forward-post hook out; copies of the layer copy the hooks), and every other call costs one
check.

A forward that raises never reaches its post hook: its layer stays counted in (the routers take
the slow path, which is slower but computes the same) until the next forward of a watched layer
drops the forwards whose frames are no longer on the stack.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable

import paddle

__all__ = ["calling_layer", "in_own_forward", "inside_site_owner", "outside_forward_reason", "watch"]

#: Attribute marking a layer whose hooks :func:`watch` registered.
_WATCHED = "_imperative_ptq_site_owner"
_running = threading.local()


def _frames() -> dict[int, list[Any]]:
    """This thread's running forwards of watched layers: layer id -> the frames that called
    them, innermost last (frame objects, not ids: a new call reuses a finished frame's id)."""
    frames = getattr(_running, "frames", None)
    if frames is None:
        frames = _running.frames = {}
    return frames


def _enter(layer: paddle.nn.Layer, inputs: Any) -> None:
    frames = _frames()
    caller = sys._getframe(1)
    if frames:
        # A forward that raised never reached its post hook: drop what is no longer running.
        live = set()
        frame = caller
        while frame is not None:
            live.add(id(frame))
            frame = frame.f_back
        for key in list(frames):
            kept = [f for f in frames[key] if id(f) in live]
            if kept:
                frames[key] = kept
            else:
                del frames[key]
    frames.setdefault(id(layer), []).append(caller)


def _leave(layer: paddle.nn.Layer, inputs: Any, outputs: Any) -> None:
    frames = _frames()
    running = frames.get(id(layer))
    if running:
        running.pop()
        if not running:
            del frames[id(layer)]


def watch(layer: paddle.nn.Layer) -> None:
    """Counts ``layer``'s forwards from now on (idempotent)."""
    if getattr(layer, _WATCHED, False):
        return
    layer.register_forward_pre_hook(_enter)
    layer.register_forward_post_hook(_leave)
    setattr(layer, _WATCHED, True)


def inside_site_owner() -> bool:
    """Whether this thread is inside the forward of a :func:`watch` ed layer, or tracing a
    program (an export calls the model's own ``forward`` without its hooks)."""
    return bool(getattr(_running, "frames", None)) or not paddle.in_dynamic_mode()


def calling_layer(
    router_globals: dict[str, Any], calibrated_itself: Callable[[paddle.nn.Layer], bool],
    max_frames: int = 4,
) -> paddle.nn.Layer | None:
    """The layer whose ``forward`` made a routed call: the ``self`` of the nearest of the
    ``max_frames`` frames above the router's module (``router_globals``), or ``None`` when
    there is none or ``calibrated_itself`` says its calls are its own implementation (a layer
    the hooks calibrate, a site, a simulated layer)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals is router_globals:
        frame = frame.f_back
    for _ in range(max_frames):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, paddle.nn.Layer):
            return None if calibrated_itself(candidate) else candidate
        frame = frame.f_back
    return None


def in_own_forward(layer: paddle.nn.Layer) -> bool:
    """Whether ``layer``'s own ``forward`` is running in this thread (on the stack).

    A site is reached only inside its owner's forward (:func:`inside_site_owner`): a call
    made from another method of the owner, invoked from outside its forward (a parent's
    ``forward`` calling ``self.child.apply(x)``), would be calibrated and exported as a site
    while the simulation ran it as it is (measured: a conv in such a method int8 in Paddle
    Inference, fp32 in the simulation, 2.3e-2 of the largest output off)."""
    forward = getattr(type(layer).forward, "__code__", None)
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        # A forward (its class's, whatever its first parameter is named) called on this layer,
        # not on another instance of the class (a parent of the same class).
        if (code is forward or code.co_name == "forward") and code.co_argcount and \
                frame.f_locals.get(code.co_varnames[0]) is layer:
            return True
        frame = frame.f_back
    return False


def outside_forward_reason(layer: paddle.nn.Layer) -> str | None:
    """Why a call of ``layer`` cannot become a site (:func:`in_own_forward`), else ``None``."""
    if in_own_forward(layer):
        return None
    return (
        f"called from a method of {type(layer).__name__} other than its forward, which the "
        f"routing does not reach once converted; call it from forward, or use a layer"
    )
