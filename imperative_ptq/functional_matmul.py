"""Functional ``paddle.matmul(x, weight)`` calls, calibrated and quantized as Linear layers.

Models converted with x2paddle (and many hand-written ones) multiply by a parameter with
``paddle.matmul(x, self.weight)`` instead of calling an ``nn.Linear``, so no forward hook sees
the model's largest GEMMs. :func:`install` puts :func:`route_matmul` in place of
``paddle.matmul``; it passes every call through unchanged except one whose ``y`` is a
parameter of the calling layer (the ``self`` of the ``forward`` that made the call):

* while the model is being calibrated, the first such call adds a :class:`MatmulSite` to the
  calling layer: a bias-free ``nn.Linear`` holding a copy of the weight (transposed for
  ``transpose_y=True``), named ``<parameter>_matmul``, put under calibration like any other
  layer (and mirrored into the fp32 reference the accuracy algorithms compare with);
* from then on every call with that parameter runs the site instead, so calibration, the
  table, ``convert`` (which wraps the site like any Linear), ``analyze`` and the export's
  trace all see an ordinary Linear layer (an fc in Paddle Inference's int8 pipeline).

Limits: only calls made directly in a layer's ``forward`` (or a function it calls, a few frames
deep) on one of that layer's own parameters are seen; a 2-D float32 weight; ``transpose_x``
and other matmuls stay fp32 (with a warning when a parameter is involved). Sites appear at
the first calibration forward, so a table or statistics file is loaded after one batch.
"""

from __future__ import annotations

import copy
import inspect
import logging
import sys
import weakref
from typing import Any, Callable

import numpy as np
import paddle

from .quant_layers import QuantizedLayer, QuantizedMatmul
from .registry import PTQRegistry
from .session import any_discovering, discovering_session

__all__ = [
    "ActivationMatmul", "MatmulSite", "activation_sites", "has_own_matrices", "install",
    "matmul_sites", "mirror_sites",
    "missing_site_hint", "route_matmul", "with_matmul_sites",
]

logger = logging.getLogger(__name__)

#: Frames above the matmul call searched for the calling layer's ``self``.
_MAX_FRAMES = 4
#: Ends the name of a site's sublayer.
_SITE_SUFFIX = "_matmul"
#: Modules whose ``matmul`` attribute :func:`install` replaces.
_MODULES = ("paddle", "paddle.tensor", "paddle.tensor.linalg")


def _signature(x: Any, y: Any, transpose_x: bool = False, transpose_y: bool = False,
               name: str | None = None) -> None:
    """``paddle.matmul``'s arguments."""


_ARGUMENTS = inspect.signature(_signature)
_original_matmul: Callable[..., Any] | None = None
#: Layers with :class:`ActivationMatmul` sites (each adds itself when its forward starts).
_ACTIVATION_CALLERS: "weakref.WeakSet[paddle.nn.Layer]" = weakref.WeakSet()
#: Whether a :class:`MatmulSite` was made in this process (its copies need one made first).
_SITES_MADE = False
#: Matmuls of two activations each such layer made in its current forward.
_ACTIVATION_CALLS: "weakref.WeakKeyDictionary[paddle.nn.Layer, int]" = weakref.WeakKeyDictionary()


class MatmulSite(paddle.nn.Linear):
    """A functional ``paddle.matmul(x, parameter)`` call as a bias-free Linear layer.

    Args:
        weight: The ``[in, out]`` weight (the parameter, transposed for ``transpose_y``).
        parameter_path: The parameter's name relative to the calling layer.
        transpose_y: Whether the call passed ``transpose_y=True``.
    """

    def __init__(self, weight: np.ndarray, parameter_path: str, transpose_y: bool) -> None:
        global _SITES_MADE
        _SITES_MADE = True
        super().__init__(weight.shape[0], weight.shape[1], bias_attr=False)
        with paddle.no_grad():
            self.weight.set_value(weight)
        self.parameter_path = parameter_path
        self.transpose_y = transpose_y

    @classmethod
    def from_parameter(cls, parameter: paddle.Tensor, path: str, transpose_y: bool) -> "MatmulSite":
        """The site of ``matmul(x, parameter, transpose_y=transpose_y)``."""
        weight = parameter.numpy()
        return cls(np.ascontiguousarray(weight.T) if transpose_y else weight, path, transpose_y)

    def extra_repr(self) -> str:
        flags = ", transpose_y=True" if self.transpose_y else ""
        return f"matmul(x, {self.parameter_path}{flags}), {super().extra_repr()}"


class ActivationMatmul(paddle.nn.Layer):
    """A functional ``paddle.matmul(x, y)`` of two activations (attention's ``q @ k``) as a
    layer: the ``ordinal``-th such call in its calling layer's ``forward``.

    Args:
        ordinal: Position of the call among the calling layer's matmuls of two activations.
        transpose_x: Whether the call passed ``transpose_x=True``.
        transpose_y: Whether the call passed ``transpose_y=True``.
    """

    def __init__(self, ordinal: int, transpose_x: bool, transpose_y: bool) -> None:
        super().__init__()
        self.ordinal = ordinal
        self.transpose_x = transpose_x
        self.transpose_y = transpose_y

    def forward(self, x: paddle.Tensor, y: paddle.Tensor) -> paddle.Tensor:
        return _original_matmul(x, y, transpose_x=self.transpose_x, transpose_y=self.transpose_y)

    def extra_repr(self) -> str:
        return f"ordinal={self.ordinal}, transpose_x={self.transpose_x}, transpose_y={self.transpose_y}"


PTQRegistry.register(ActivationMatmul, ("X", "Y"), ("Out",), multiplies_inputs=True)


def install() -> None:
    """Puts :func:`route_matmul` in place of ``paddle.matmul`` and of the ``@`` operator
    (idempotent).

    ``paddle.matmul`` and ``paddle.tensor.matmul`` (which ``nn.MultiHeadAttention`` calls)
    both run ``_C_ops.matmul``; ``Tensor.__matmul__`` (and the legacy static ``Variable``'s, which
    the export traces) keep their own implementation. Every call not routed goes to the
    original, so models without sites run as before.
    """
    global _original_matmul
    if _original_matmul is not None:
        return
    _original_matmul = paddle.matmul
    for module_name in _MODULES:
        module = sys.modules.get(module_name)
        if module is not None and callable(getattr(module, "matmul", None)):
            module.matmul = route_matmul
    for tensor_type in (paddle.Tensor, paddle.static.Variable):
        tensor_type.__matmul__ = _routed_operator(tensor_type.__matmul__)


def _routed_operator(original: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """``x @ y`` routed like ``paddle.matmul(x, y)``, else ``original``."""

    @paddle.jit.not_to_static
    def matmul_operator(x: Any, y: Any) -> Any:
        return _route(original, (x, y), {})

    return matmul_operator


@paddle.jit.not_to_static
def route_matmul(*args: Any, **kwargs: Any) -> Any:
    """``paddle.matmul``, running a call on a parameter of the calling layer through its
    :class:`MatmulSite` and a matmul of two activations through its
    :class:`ActivationMatmul` (both added while the model is calibrated)."""
    return _route(_original_matmul, args, kwargs)


def _route(original: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """A matmul through its site, else ``original(*args, **kwargs)``."""
    y = args[1] if len(args) > 1 else kwargs.get("y")
    on_parameter = getattr(y, "persistable", False) is True
    if not (_SITES_MADE if on_parameter else _ACTIVATION_CALLERS) and not any_discovering():
        return original(*args, **kwargs)  # no site can exist for it
    try:
        bound = _ARGUMENTS.bind(*args, **kwargs)
    except TypeError:
        return original(*args, **kwargs)
    x = bound.arguments["x"]
    transpose_x = bool(bound.arguments.get("transpose_x", False))
    transpose_y = bool(bound.arguments.get("transpose_y", False))
    caller = _calling_layer()
    if caller is None:
        return original(*args, **kwargs)
    if on_parameter:
        site = None if transpose_x else _parameter_site(caller, x, y, transpose_y)
        return original(*args, **kwargs) if site is None else site(x)
    site = _activation_site(caller, x, y, transpose_x, transpose_y)
    return original(*args, **kwargs) if site is None else site(x, y)


def _parameter_site(
    caller: paddle.nn.Layer, x: Any, y: Any, transpose_y: bool
) -> paddle.nn.Layer | None:
    """The caller's :class:`MatmulSite` for ``matmul(x, y)``, added if its model is being
    calibrated; ``None``: the call runs as it is."""
    for _, child in matmul_sites(caller):
        site = _inner(child)
        if site.transpose_y == transpose_y and _resolve(caller, site.parameter_path) is y:
            return child
    return _discover(caller, x, y, transpose_y)


def _activation_site(
    caller: paddle.nn.Layer, x: Any, y: Any, transpose_x: bool, transpose_y: bool
) -> paddle.nn.Layer | None:
    """The caller's :class:`ActivationMatmul` of this call's position among its matmuls of two
    activations, added if its model is being calibrated; ``None``: the call runs as it is."""
    if not (_is_float32(x) and _is_float32(y)) or getattr(x, "persistable", False) is True:
        return None
    sites = activation_sites(caller)
    session = None if sites else discovering_session(caller)
    if not sites and session is None:
        return None
    count = _ACTIVATION_CALLS.get(caller, 0) if sites else 0
    _ACTIVATION_CALLS[caller] = count + 1
    if count < len(sites):
        site = sites[count]
    else:
        session = session or discovering_session(caller)
        if session is not None and count == len(sites):
            site = _discover_activation(caller, session, count, transpose_x, transpose_y)
        else:
            site = sites[count % len(sites)]
    inner = _inner(site)
    if (inner.transpose_x, inner.transpose_y) != (transpose_x, transpose_y):
        return None  # another call order than calibration saw
    return site


def activation_sites(layer: paddle.nn.Layer) -> list[paddle.nn.Layer]:
    """The :class:`ActivationMatmul` sites of ``layer`` (or the layers ``convert`` wrapped
    them in), in call order."""
    found = [
        child for child in layer._sub_layers.values() if isinstance(_inner(child), ActivationMatmul)
    ]
    return sorted(found, key=lambda child: _inner(child).ordinal)


def _enter_caller(layer: paddle.nn.Layer, inputs: Any) -> None:
    """Forward-pre hook of a layer with activation sites: its calls are counted from 0."""
    _ACTIVATION_CALLERS.add(layer)
    _ACTIVATION_CALLS[layer] = 0


def _discover_activation(
    caller: paddle.nn.Layer, session: Any, ordinal: int, transpose_x: bool, transpose_y: bool
) -> paddle.nn.Layer:
    attribute = _free_attribute(caller, f"activation_matmul_{ordinal}")
    site = ActivationMatmul(ordinal, transpose_x, transpose_y)
    caller.add_sublayer(attribute, site)
    if ordinal == 0:
        caller.register_forward_pre_hook(_enter_caller)
        _ACTIVATION_CALLERS.add(caller)
    name = _qualified(session.sublayer_name(caller), attribute)
    session.add_discovered_layer(name, site)
    logger.info("a matmul of two activations is calibrated as the layer %r", name)
    return site


def _is_float32(value: Any) -> bool:
    """A float32 tensor, or a float32 variable of the program the export traces."""
    return isinstance(value, (paddle.Tensor, paddle.static.Variable)) and value.dtype == paddle.float32


def missing_site_hint(layer_name: str) -> str:
    """What to do when a file names ``layer_name`` and the model lacks it: ``""`` unless it
    looks like a site (found only at the first calibration forward)."""
    if not layer_name.endswith(_SITE_SUFFIX):
        return ""
    return (
        f" (a functional paddle.matmul becomes a layer named '<parameter>{_SITE_SUFFIX}' at "
        f"the first calibration forward: run one batch through the model, then load)"
    )


def has_own_matrices(model: paddle.nn.Layer) -> bool:
    """Whether a layer of ``model`` that PTQ does not hook owns a 2-D float32 parameter (which
    a functional ``paddle.matmul`` in its ``forward`` may use)."""
    return any(
        parameter is not None and parameter.dtype == paddle.float32 and len(parameter.shape) == 2
        for layer in model.sublayers(include_self=True)
        if not PTQRegistry.is_supported_layer(layer)
        for parameter in layer._parameters.values()
    )


def matmul_sites(layer: paddle.nn.Layer) -> list[tuple[str, paddle.nn.Layer]]:
    """``(attribute, sublayer)`` of each site of ``layer`` (the sublayer is the site or the
    :class:`QuantizedLayer` ``convert`` wrapped it in)."""
    return [
        (attribute, child) for attribute, child in layer._sub_layers.items()
        if isinstance(_inner(child), MatmulSite)
    ]


def _inner(layer: paddle.nn.Layer) -> paddle.nn.Layer:
    return layer.layer if isinstance(layer, (QuantizedLayer, QuantizedMatmul)) else layer


def _calling_layer() -> paddle.nn.Layer | None:
    """The ``self`` of the nearest ``forward``-like frame above this module's functions."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals is globals():
        frame = frame.f_back
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, paddle.nn.Layer) and not isinstance(
            candidate, (MatmulSite, ActivationMatmul, QuantizedMatmul, QuantizedLayer)
        ):
            return candidate
        frame = frame.f_back
    return None


def _resolve(layer: paddle.nn.Layer, path: str) -> Any:
    value: Any = layer
    for part in path.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def _parameter_path(caller: paddle.nn.Layer, y: Any) -> str | None:
    for path, parameter in caller.named_parameters():
        if parameter is y:
            return path
    return None


def _discover(
    caller: paddle.nn.Layer, x: Any, y: Any, transpose_y: bool
) -> paddle.nn.Layer | None:
    """Adds a site for ``matmul(x, y)`` to ``caller`` if its model is being calibrated."""
    session = discovering_session(caller)
    if session is None:
        return None
    path = _parameter_path(caller, y)
    if path is None:
        return None
    caller_name = session.sublayer_name(caller)
    where = f"paddle.matmul(x, {_qualified(caller_name, path)})"
    reason = _unsupported(x, y)
    if reason is not None:
        if session.note_refused(where):
            logger.warning("%s stays fp32: %s", where, reason)
        return None
    attribute = _free_attribute(caller, path.replace(".", "_") + _SITE_SUFFIX)
    site = MatmulSite.from_parameter(y, path, transpose_y)
    caller.add_sublayer(attribute, site)
    if session.reference is not None:
        reference_caller = dict(session.reference.named_sublayers(include_self=True)).get(caller_name)
        if reference_caller is not None:
            _mirror_site(reference_caller, attribute, site)
    name = _qualified(caller_name, attribute)
    session.add_discovered_layer(name, site)
    logger.info("%s is calibrated as the Linear layer %r", where, name)
    return site


def _unsupported(x: Any, y: Any) -> str | None:
    if y.dtype != paddle.float32 or len(y.shape) != 2:
        return f"only 2-D float32 weights are quantized (got {list(y.shape)} {y.dtype})"
    if not isinstance(x, paddle.Tensor) or x.dtype != paddle.float32 or len(x.shape) < 2:
        return "only float32 inputs of rank >= 2 are quantized"
    return None


def _qualified(caller_name: str, attribute: str) -> str:
    """The model-level name of ``caller``'s sublayer ``attribute``."""
    return f"{caller_name}.{attribute}" if caller_name else attribute


def _free_attribute(layer: paddle.nn.Layer, attribute: str) -> str:
    candidate, count = attribute, 1
    while hasattr(layer, candidate):
        count += 1
        candidate = f"{attribute}_{count}"
    return candidate


def mirror_sites(source: paddle.nn.Layer, target: paddle.nn.Layer) -> int:
    """Gives ``target`` (an fp32 model ``source`` was made from) the sites ``source`` has, as
    fp32 :class:`MatmulSite` s built from ``target``'s own parameters, so layer names match.

    Returns:
        How many sites were added.
    """
    callers = dict(target.named_sublayers(include_self=True))
    added = 0
    for name, layer in source.named_sublayers(include_self=True):
        caller = callers.get(name)
        if caller is None:
            continue
        for attribute, child in matmul_sites(layer):
            added += _mirror_site(caller, attribute, _inner(child))
    return added


def _mirror_site(caller: paddle.nn.Layer, attribute: str, site: MatmulSite) -> bool:
    """Adds to ``caller`` (of an fp32 model) an fp32 copy of ``site`` built from its own
    parameter, unless it has one; whether it was added."""
    parameter = _resolve(caller, site.parameter_path)
    if attribute in caller._sub_layers or not isinstance(parameter, paddle.Tensor):
        return False
    caller.add_sublayer(
        attribute, MatmulSite.from_parameter(parameter, site.parameter_path, site.transpose_y)
    )
    return True


def with_matmul_sites(model: paddle.nn.Layer, quantized_model: paddle.nn.Layer) -> paddle.nn.Layer:
    """``model``, or a copy of it with the sites ``quantized_model`` has (``model`` itself is
    never changed), so the two have the same layer names."""
    if not any(matmul_sites(layer) for layer in quantized_model.sublayers(include_self=True)):
        return model
    copied = copy.deepcopy(model)
    mirror_sites(quantized_model, copied)
    return copied
