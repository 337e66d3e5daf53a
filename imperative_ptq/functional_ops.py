"""Functional ``paddle.concat`` and multiplies of two activations, calibrated as observed sites.

SqueezeNet's fire modules, ShuffleNet, DenseNet and YOLO necks join branches with
``paddle.concat``; squeeze-excite blocks, layer scale and GLU gate with ``x * gate``. No forward
hook sees these calls, yet Paddle Inference's oneDNN pipeline decides from the scales of their
tensors whether they run int8 (a concat needs its output's scale and quantizes every input on
it; an ``elementwise_mul`` needs X, Y and Out scales of one signedness). :func:`install` puts
:func:`route_concat` in place of ``paddle.concat`` and :func:`route_multiply` in place of
``paddle.multiply`` and the ``*`` operator of two tensors; they pass every call through
unchanged, except, in the ``forward`` of a layer whose model is being calibrated (or that has
sites already), a concat of float32 activations or a multiply of two float32 activations: that
call runs through the calling layer's :class:`FunctionalConcat` / :class:`FunctionalMultiply`
of its position among the layer's calls of that kind (added at the first calibration forward,
named ``<caller>.concat_<k>`` / ``<caller>.multiply_<k>``), which computes exactly the same op.

The sites are hooked like any layer (``CalibrationSession.add_discovered_layer``), so the
calibration table holds their thresholds (a concat's output; a multiply's two inputs and its
output: the scales Paddle would need), and ``analyze`` lists them. They are *observed only*
(``LayerInfo.observed_only``): the simulation computes them in float, the exports write none of
their thresholds, and calibration records nothing of the graph around them, so every other
layer converts and exports as it did without them. Paddle Inference runs multiplies fp32; the
export runs a concat int8 only where it copies its reader's codes
(:func:`imperative_ptq.export.unsigned.clip_concat_inputs`), which the simulation's rounding at
the reader computes. The measurements are in ``docs/deployment.md``.

Limits: calls made directly in a layer's ``forward`` (or a function it calls, a few frames deep)
whose layer the hooks do not calibrate themselves; a multiply of a tensor by a scalar or a
parameter, and a concat with a tensor ``axis`` or a non-float32 input, run as they are.
"""

from __future__ import annotations

import inspect
import logging
import re
import sys
import weakref
from typing import Any, Callable, Sequence

import paddle

from .quant_layers import QuantizedLayer, QuantizedMatmul
from .quant_rnn import QuantizedLSTM
from .registry import PTQRegistry
from .session import any_discovering, discovering_session
from .site_scope import calling_layer, inside_site_owner, watch

__all__ = [
    "FunctionalConcat", "FunctionalMultiply", "install", "observed_sites", "restore_sites",
    "route_concat", "route_multiply",
]

logger = logging.getLogger(__name__)

#: Frames above the call searched for the calling layer's ``self``: a helper function may sit
#: in between, and tracing converts its if/else into nested functions (a Llama-shaped
#: attention helper behind a flag is the fifth frame below its layer while traced).
_MAX_FRAMES = 16
#: Modules whose ``concat`` / ``multiply`` attribute :func:`install` replaces.
_CONCAT_MODULES = ("paddle", "paddle.tensor", "paddle.tensor.manipulation")
_MULTIPLY_MODULES = ("paddle", "paddle.tensor")


def _concat_signature(x: Any, axis: Any = 0, name: str | None = None) -> None:
    """``paddle.concat``'s arguments."""


def _multiply_signature(x: Any, y: Any, name: str | None = None) -> None:
    """``paddle.multiply``'s arguments."""


_CONCAT_ARGUMENTS = inspect.signature(_concat_signature)
_MULTIPLY_ARGUMENTS = inspect.signature(_multiply_signature)
_original: dict[str, Callable[..., Any]] = {}
#: ``(owner, attribute, Paddle's function)`` of every binding :func:`install` made.
_BINDINGS: list[tuple[Any, str, Callable[..., Any]]] = []
#: Layers with sites (each resets its call counts when its forward starts).
_CALLERS: "weakref.WeakSet[paddle.nn.Layer]" = weakref.WeakSet()
#: Calls of each kind each such layer made in its current forward.
_CALLS: "weakref.WeakKeyDictionary[paddle.nn.Layer, dict[str, int]]" = weakref.WeakKeyDictionary()


class _ObservedSite(paddle.nn.Layer):
    """The ``ordinal``-th call of one kind in its calling layer's ``forward``, as a layer."""

    kind = ""

    def __init__(self, ordinal: int) -> None:
        super().__init__()
        self.ordinal = int(ordinal)

    def extra_repr(self) -> str:
        return f"ordinal={self.ordinal}, observed, runs fp32"


class FunctionalConcat(_ObservedSite):
    """A functional ``paddle.concat(inputs, axis)`` of activations (calibrated: its output).

    Args:
        ordinal: Position of the call among the calling layer's concats.
    """

    kind = "concat"

    def forward(self, *inputs: paddle.Tensor, axis: int = 0) -> paddle.Tensor:
        return _original["concat"](list(inputs), axis=axis)


class FunctionalMultiply(_ObservedSite):
    """A functional ``x * y`` / ``paddle.multiply(x, y)`` of two activations (calibrated:
    both inputs and the output).

    Args:
        ordinal: Position of the call among the calling layer's multiplies.
    """

    kind = "multiply"

    def forward(self, x: paddle.Tensor, y: paddle.Tensor) -> paddle.Tensor:
        return _original["multiply"](x, y)


_KINDS: dict[str, type[_ObservedSite]] = {"concat": FunctionalConcat, "multiply": FunctionalMultiply}
#: ``<caller>.<kind>_<k>``: a site's name (the caller part may be empty: the model itself).
_SITE_NAME = re.compile(r"^(?:(?P<caller>.+)\.)?(?P<kind>concat|multiply)_(?P<ordinal>\d+)$")

PTQRegistry.register(FunctionalConcat, ("X",), ("Out",), observed_only=True)
PTQRegistry.register(
    FunctionalMultiply, ("X", "Y"), ("Out",), multiplies_inputs=True, observed_only=True
)


def install() -> None:
    """Puts :func:`route_concat` in place of ``paddle.concat`` and :func:`route_multiply` in
    place of ``paddle.multiply`` and ``Tensor.__mul__`` (idempotent). Every call not routed
    goes to Paddle's function, so models without sites run as before."""
    if _original:
        return
    _original["concat"] = paddle.concat
    _original["multiply"] = paddle.multiply
    bindings = [
        *((sys.modules.get(name), "concat", route_concat) for name in _CONCAT_MODULES),
        *((sys.modules.get(name), "multiply", route_multiply) for name in _MULTIPLY_MODULES),
        (paddle.Tensor, "__mul__", _routed_operator(paddle.Tensor.__mul__)),
    ]
    for owner, attribute, router in bindings:
        original = getattr(owner, attribute, None)
        if callable(original):
            _BINDINGS.append((owner, attribute, original))
            setattr(owner, attribute, router)


def _routed_operator(original: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """``x * y`` routed like ``paddle.multiply(x, y)``, else ``original``."""

    @paddle.jit.not_to_static
    def multiply_operator(x: Any, y: Any) -> Any:
        if not (_routable() and _is_activation(x) and _is_activation(y)):
            return original(x, y)
        site = _site(_calling_layer(), "multiply")
        return original(x, y) if site is None else site(x, y)

    return multiply_operator


def _routable() -> bool:
    """Whether a forward of a layer with sites is running or a model is being calibrated (else
    no site can be reached: nothing is routed)."""
    return inside_site_owner() or any_discovering()


@paddle.jit.not_to_static
def route_concat(*args: Any, **kwargs: Any) -> Any:
    """``paddle.concat``, running a concat of activations through its :class:`FunctionalConcat`."""
    original = _original["concat"]
    if not _routable():
        return original(*args, **kwargs)
    try:
        arguments = _CONCAT_ARGUMENTS.bind(*args, **kwargs).arguments
    except TypeError:
        return original(*args, **kwargs)
    inputs, axis = arguments["x"], arguments.get("axis", 0)
    if (
        not isinstance(inputs, (list, tuple)) or not inputs or not isinstance(axis, int)
        or not all(_is_activation(value) for value in inputs)
    ):
        return original(*args, **kwargs)
    site = _site(_calling_layer(), "concat")
    return original(*args, **kwargs) if site is None else site(*inputs, axis=axis)


@paddle.jit.not_to_static
def route_multiply(*args: Any, **kwargs: Any) -> Any:
    """``paddle.multiply``, running a multiply of two activations through its
    :class:`FunctionalMultiply`."""
    original = _original["multiply"]
    if not _routable():
        return original(*args, **kwargs)
    try:
        arguments = _MULTIPLY_ARGUMENTS.bind(*args, **kwargs).arguments
    except TypeError:
        return original(*args, **kwargs)
    x, y = arguments["x"], arguments["y"]
    if not (_is_activation(x) and _is_activation(y)):
        return original(*args, **kwargs)
    site = _site(_calling_layer(), "multiply")
    return original(*args, **kwargs) if site is None else site(x, y)


def _is_activation(value: Any) -> bool:
    """A float32 dygraph tensor that is no parameter."""
    return (
        isinstance(value, paddle.Tensor) and value.dtype == paddle.float32
        and getattr(value, "persistable", False) is not True
    )


def observed_sites(layer: paddle.nn.Layer, kind: str | None = None) -> list[paddle.nn.Layer]:
    """The observed sites of ``layer`` (of one ``kind``: ``"concat"`` or ``"multiply"``), in
    call order."""
    found = [
        child for child in layer._sub_layers.values()
        if isinstance(child, _ObservedSite) and (kind is None or child.kind == kind)
    ]
    return sorted(found, key=lambda child: (child.kind, child.ordinal))


def _site(caller: paddle.nn.Layer | None, kind: str) -> paddle.nn.Layer | None:
    """The caller's site for this call (its position among the caller's calls of ``kind`` in
    the current forward), added if its model is being calibrated; ``None``: run as it is."""
    if caller is None:
        return None
    sites = observed_sites(caller, kind)
    session = None if sites else discovering_session(caller)
    if not sites and session is None:
        return None
    if sites:
        _CALLERS.add(caller)  # a copy of a model with sites (its pre-hook was copied too)
    counts = _CALLS.setdefault(caller, {})
    count = counts.get(kind, 0)
    counts[kind] = count + 1
    if count < len(sites):
        return sites[count]
    session = session or discovering_session(caller)
    if session is None or count != len(sites):
        return None  # more calls than calibration saw: they run as they are
    name = session.sublayer_name(caller)
    return None if name is None else _add_site(caller, name, kind, count, session)


def _add_site(
    caller: paddle.nn.Layer, caller_name: str, kind: str, ordinal: int, session: Any
) -> paddle.nn.Layer:
    attribute = f"{kind}_{ordinal}"
    site = _KINDS[kind](ordinal)
    caller.add_sublayer(attribute, site)
    watch(caller)
    if caller not in _CALLERS:
        caller.register_forward_pre_hook(_enter_caller)
        _CALLERS.add(caller)
    name = f"{caller_name}.{attribute}" if caller_name else attribute
    session.add_discovered_layer(name, site)
    logger.info("a functional %s is calibrated (observed, fp32) as the layer %r", kind, name)
    return site


def _enter_caller(layer: paddle.nn.Layer, inputs: Any) -> None:
    """Forward-pre hook of a layer with sites: its calls are counted from 0."""
    _CALLS[layer] = {}


def restore_sites(model: paddle.nn.Layer, names: Sequence[str]) -> list[str]:
    """Adds to ``model`` (being calibrated) the sites that ``names`` (a table's layers) name and
    it lacks, as calibration would at the first forward, so a table or statistics file loads
    before any batch ran.

    Returns:
        The names of the sites added.
    """
    session = discovering_session(model)
    if session is None:
        return []
    layers = dict(model.named_sublayers(include_self=True))
    added = []
    for name in names:
        match = _SITE_NAME.match(name)
        if match is None or name in layers:
            continue
        caller_name = match.group("caller") or ""
        caller = layers.get(caller_name)
        kind, ordinal = match.group("kind"), int(match.group("ordinal"))
        if caller is None or PTQRegistry.is_supported_layer(caller):
            continue
        if len(observed_sites(caller, kind)) != ordinal:
            continue  # sites are added in call order; a gap means another model
        _add_site(caller, caller_name, kind, ordinal, session)
        layers[name] = getattr(caller, f"{kind}_{ordinal}")
        added.append(name)
    return added


def _calling_layer() -> paddle.nn.Layer | None:
    """The layer whose ``forward`` made the call; ``None`` when there is none or it is a layer
    the hooks calibrate themselves (its calls are its own implementation)."""
    return calling_layer(globals(), _calibrated_itself, _MAX_FRAMES)


def _calibrated_itself(layer: paddle.nn.Layer) -> bool:
    return isinstance(
        layer, (QuantizedLayer, QuantizedMatmul, QuantizedLSTM)
    ) or PTQRegistry.is_supported_layer(layer)
