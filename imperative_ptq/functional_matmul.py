"""Functional ``paddle.matmul(x, weight)`` and ``F.linear(x, weight, bias)`` calls, calibrated
and quantized as Linear layers.

Models converted with x2paddle (and many hand-written ones) multiply by a parameter with
``paddle.matmul(x, self.weight)``, ``x.matmul(self.weight)``, ``x @ self.weight`` or
``F.linear(x, self.weight, self.bias)`` instead of calling an ``nn.Linear``, so no forward hook
sees the model's largest GEMMs. :func:`install` puts :func:`route_matmul` in place of
``paddle.matmul`` (and of the ``Tensor.matmul`` method and the ``@`` operator) and
:func:`route_linear` in place of ``F.linear``; they pass every call through unchanged except
one whose weight is a parameter of the calling layer (the ``self`` of the ``forward`` that made
the call, unless that layer is one the hooks calibrate, such as the ``nn.Linear`` whose
``forward`` calls ``F.linear``):

* while the model is being calibrated, the first such call adds a :class:`MatmulSite` to the
  calling layer: an ``nn.Linear`` holding a copy of the weight (transposed for
  ``transpose_y=True``) and of ``F.linear``'s bias when that is a parameter of the layer too
  (else the bias is added after the site), named ``<parameter>_matmul``, put under calibration
  like any other layer (and mirrored into the fp32 reference the accuracy algorithms compare
  with);
* from then on every such call runs the site instead, so calibration, the table, ``convert``
  (which wraps the site like any Linear), ``analyze`` and the export's trace all see an
  ordinary Linear layer (an fc in Paddle Inference's int8 pipeline).

Limits: only calls made directly in a layer's ``forward`` (or a function it calls, a few frames
deep) on one of that layer's own parameters are seen; a 2-D float32 weight; ``transpose_x``
and other matmuls stay fp32 (with a warning when a parameter is involved). ``F.linear(x, w,
b)`` with an activation ``w`` (no parameter) is routed like ``paddle.matmul(x, w)`` of two
activations (an :class:`ActivationMatmul`), its bias added after the site. Sites appear at the
first calibration forward, so a table or statistics file is loaded after one batch. A cell
that ``paddle.nn.RNN``/``BiRNN`` steps through time gets no site: the export makes that loop a
``while`` op, whose body Paddle Inference's int8 passes do not reach.
"""

from __future__ import annotations

import copy
import inspect
import logging
import re
import sys
import weakref
from typing import Any, Callable

import numpy as np
import paddle

from .fake_quant import FakeQuantLayer
from .quant_layers import QuantizedLayer, QuantizedMatmul
from .quant_rnn import QuantizedLSTM
from .registry import PTQRegistry
from .session import any_discovering, discovering_session
from .site_scope import calling_layer, inside_site_owner, outside_forward_reason, watch

__all__ = [
    "ActivationMatmul", "MatmulSite", "ParameterSite", "activation_sites", "add_parameter_site",
    "free_attribute", "has_own_parameters", "inner_site", "install", "matmul_sites", "mirror_site",
    "mirror_sites", "missing_site_hint", "parameter_path", "parameter_sites", "qualified", "refuse",
    "resolve", "route_linear", "route_matmul", "routed_bindings", "with_matmul_sites",
]

logger = logging.getLogger(__name__)

#: Frames above the call searched for the calling layer's ``self``: a helper function may sit
#: in between, and tracing converts its if/else into nested functions (a Llama-shaped
#: attention helper behind a flag is the fifth frame below its layer while traced).
_MAX_FRAMES = 16
#: Ends the name of a site's sublayer.
_SITE_SUFFIX = "_matmul"
#: Modules whose ``matmul`` attribute :func:`install` replaces.
_MODULES = ("paddle", "paddle.tensor", "paddle.tensor.linalg")
#: Modules whose ``linear`` attribute :func:`install` replaces (``nn.Linear`` calls it as
#: ``F.linear``).
_LINEAR_MODULES = ("paddle.nn.functional", "paddle.nn.functional.common")


def _matmul_signature(x: Any, y: Any, transpose_x: bool = False, transpose_y: bool = False,
                      name: str | None = None) -> None:
    """``paddle.matmul``'s arguments."""


def _linear_signature(x: Any, weight: Any, bias: Any = None, name: str | None = None) -> None:
    """``F.linear``'s arguments."""


_MATMUL_ARGUMENTS = inspect.signature(_matmul_signature)
_LINEAR_ARGUMENTS = inspect.signature(_linear_signature)
_original_matmul: Callable[..., Any] | None = None
_original_linear: Callable[..., Any] | None = None
#: ``(owner, attribute, Paddle's function, its router)`` of every binding :func:`install` made.
_BINDINGS: list[tuple[Any, str, Callable[..., Any], Callable[..., Any]]] = []
#: Layers with :class:`ActivationMatmul` sites (each adds itself when its forward starts).
_ACTIVATION_CALLERS: "weakref.WeakSet[paddle.nn.Layer]" = weakref.WeakSet()
#: Matmuls of two activations each such layer made in its current forward.
_ACTIVATION_CALLS: "weakref.WeakKeyDictionary[paddle.nn.Layer, int]" = weakref.WeakKeyDictionary()


class ParameterSite:
    """Mixin of a layer standing for a functional call on its calling layer's parameters
    (:class:`MatmulSite`; :class:`~imperative_ptq.functional_conv.ConvSite`)."""

    #: The layer class it stands in for, for messages.
    layer_kind = ""

    def rebuilt_for(self, caller: paddle.nn.Layer) -> paddle.nn.Layer | None:
        """This site built afresh (fp32) from ``caller``'s own parameters, where ``caller`` is
        the layer of the same name in another copy of the model; ``None`` if it lacks them."""
        raise NotImplementedError

    def load(self, weight: np.ndarray, bias: np.ndarray | None) -> None:
        """Sets the site's weight (and bias, where it has one) to copies of the arrays."""
        with paddle.no_grad():
            self.weight.set_value(weight)
            if bias is not None:
                self.bias.set_value(bias)

    @staticmethod
    def caller_arrays(
        caller: paddle.nn.Layer, path: str, bias_path: str | None
    ) -> tuple[np.ndarray, np.ndarray | None] | None:
        """The values of ``caller``'s parameters at ``path`` and ``bias_path`` (``None`` for
        no bias); ``None`` if it lacks them."""
        weight = resolve(caller, path)
        bias = None if bias_path is None else resolve(caller, bias_path)
        if not isinstance(weight, paddle.Tensor) or (bias_path is not None and not isinstance(bias, paddle.Tensor)):
            return None
        return weight.numpy(), None if bias is None else bias.numpy()


class MatmulSite(ParameterSite, paddle.nn.Linear):
    """A functional ``paddle.matmul(x, parameter)`` or ``F.linear(x, parameter, bias)`` call
    as a Linear layer.

    Args:
        weight: The ``[in, out]`` weight (the parameter, transposed for ``transpose_y``).
        parameter_path: The parameter's name relative to the calling layer.
        transpose_y: Whether the call passed ``transpose_y=True``.
        bias: ``F.linear``'s bias when it is a parameter of the calling layer, else ``None``
            (a bias-free Linear).
        bias_path: That bias parameter's name relative to the calling layer.
    """

    layer_kind = "Linear"

    def __init__(
        self, weight: np.ndarray, parameter_path: str, transpose_y: bool,
        bias: np.ndarray | None = None, bias_path: str | None = None,
    ) -> None:
        super().__init__(weight.shape[0], weight.shape[1], bias_attr=None if bias is not None else False)
        self.load(weight, bias)
        self.parameter_path = parameter_path
        self.transpose_y = transpose_y
        self.bias_path = bias_path

    @classmethod
    def from_caller(
        cls, caller: paddle.nn.Layer, path: str, transpose_y: bool, bias_path: str | None = None
    ) -> "MatmulSite | None":
        """The site of ``caller``'s ``matmul(x, <path>, transpose_y=...)`` (``F.linear(x,
        <path>, <bias_path>)``), built from its parameters; ``None`` if it lacks them."""
        arrays = cls.caller_arrays(caller, path, bias_path)
        if arrays is None:
            return None
        weight, bias = arrays
        return cls(np.ascontiguousarray(weight.T) if transpose_y else weight, path, transpose_y, bias, bias_path)

    def rebuilt_for(self, caller: paddle.nn.Layer) -> "MatmulSite | None":
        return MatmulSite.from_caller(caller, self.parameter_path, self.transpose_y, self.bias_path)

    def runs(self, caller: paddle.nn.Layer, y: Any, transpose_y: bool, bias: Any) -> bool:
        """Whether this site of ``caller`` computes ``matmul(x, y, transpose_y=...)``, or
        ``F.linear(x, y, bias)`` with ``bias`` a parameter (else ``None``)."""
        if self.transpose_y != transpose_y or resolve(caller, self.parameter_path) is not y:
            return False
        if self.bias_path is None:
            return bias is None
        return resolve(caller, self.bias_path) is bias

    def extra_repr(self) -> str:
        flags = ", transpose_y=True" if self.transpose_y else ""
        call = (
            f"matmul(x, {self.parameter_path}{flags})" if self.bias_path is None
            else f"linear(x, {self.parameter_path}, {self.bias_path})"
        )
        return f"{call}, {super().extra_repr()}"


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
    """Puts :func:`route_matmul` in place of ``paddle.matmul``, the ``Tensor.matmul`` method and
    the ``@`` operator, and :func:`route_linear` in place of ``F.linear`` (idempotent).

    ``paddle.matmul``, ``paddle.tensor.matmul`` (which ``nn.MultiHeadAttention`` calls) and
    ``Tensor.matmul`` are one function; ``Tensor.__matmul__`` (and the legacy static
    ``Variable``'s, which the export traces) keep their own implementation, and the legacy
    ``Variable.matmul`` becomes ``paddle.matmul`` (Paddle 3.3.1 binds it to a PIR-only
    function). Every call not routed goes to the original, so models without sites run as
    before.
    """
    global _original_matmul, _original_linear
    if _original_matmul is not None:
        return
    _original_matmul = paddle.matmul
    _original_linear = paddle.nn.functional.linear
    bindings = [
        *((sys.modules.get(name), "matmul", route_matmul) for name in _MODULES),
        *((sys.modules.get(name), "linear", route_linear) for name in _LINEAR_MODULES),
    ]
    for tensor_type in (paddle.Tensor, paddle.static.Variable):
        bindings.append((tensor_type, "matmul", route_matmul))
        bindings.append((tensor_type, "__matmul__", _routed_operator(tensor_type.__matmul__)))
    for owner, attribute, router in bindings:
        original = getattr(owner, attribute, None)
        if callable(original):
            _BINDINGS.append((owner, attribute, original, router))
            setattr(owner, attribute, router)


def routed_bindings() -> list[tuple[Any, str, Callable[..., Any], Callable[..., Any]]]:
    """``(owner, attribute, Paddle's function, its router)`` of every binding :func:`install`
    replaced (empty before it ran): what a comparison with Paddle's own functions swaps."""
    return list(_BINDINGS)


def _routed_operator(original: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """``x @ y`` routed like ``paddle.matmul(x, y)``, else ``original``."""

    @paddle.jit.not_to_static
    def matmul_operator(x: Any, y: Any) -> Any:
        return _route(original, (x, y), {})

    return matmul_operator


@paddle.jit.not_to_static
def route_matmul(*args: Any, **kwargs: Any) -> Any:
    """``paddle.matmul`` (and ``x.matmul(y)``), running a call on a parameter of the calling
    layer through its :class:`MatmulSite` and a matmul of two activations through its
    :class:`ActivationMatmul` (both added while the model is calibrated)."""
    return _route(_original_matmul, args, kwargs)


@paddle.jit.not_to_static
def route_linear(*args: Any, **kwargs: Any) -> Any:
    """``F.linear``, running a call on a parameter of the calling layer through its
    :class:`MatmulSite` and a call on an activation weight through its :class:`ActivationMatmul`
    (both added while the model is calibrated)."""
    return _route(_original_linear, args, kwargs, _LINEAR_ARGUMENTS)


def _route(
    original: Callable[..., Any], args: tuple, kwargs: dict,
    signature: inspect.Signature = _MATMUL_ARGUMENTS,
) -> Any:
    """A matmul (or ``F.linear``: ``signature``) through its site, else
    ``original(*args, **kwargs)``."""
    linear = signature is _LINEAR_ARGUMENTS
    y = args[1] if len(args) > 1 else kwargs.get("weight" if linear else "y")
    on_parameter = getattr(y, "persistable", False) is True
    if not (inside_site_owner() or any_discovering()):
        return original(*args, **kwargs)  # no site can be reached from here
    caller = _calling_layer()
    if caller is None:
        return original(*args, **kwargs)
    try:
        arguments = signature.bind(*args, **kwargs).arguments
    except TypeError:
        return original(*args, **kwargs)
    x = arguments["x"]
    transpose_x = bool(arguments.get("transpose_x", False))
    transpose_y = bool(arguments.get("transpose_y", False))
    if on_parameter and _run_by_rnn_wrapper(caller):
        return original(*args, **kwargs)
    if on_parameter:
        bias = arguments.get("bias")
        own_bias = bias if getattr(bias, "persistable", False) is True else None
        site = None if transpose_x else _parameter_site(caller, x, y, transpose_y, own_bias)
        if site is None:
            return original(*args, **kwargs)
        return site(x) if bias is None or own_bias is not None else site(x) + bias
    site = _activation_site(caller, x, y, transpose_x, transpose_y)
    if site is None:
        return original(*args, **kwargs)
    bias = arguments.get("bias") if linear else None
    # F.linear(x, w, b) of an activation w: the matmul of two activations, then the bias.
    return site(x, y) if bias is None else site(x, y) + bias


#: Cells found run by ``paddle.nn.RNN`` / ``BiRNN`` (their matmuls stay fp32), and cells found
#: called otherwise (each cell's call stack is searched once).
_WRAPPED_CELLS: "weakref.WeakSet[paddle.nn.Layer]" = weakref.WeakSet()
_FREE_CELLS: "weakref.WeakSet[paddle.nn.Layer]" = weakref.WeakSet()


def _run_by_rnn_wrapper(caller: paddle.nn.Layer) -> bool:
    """Whether ``caller`` is a cell that ``paddle.nn.RNN`` or ``BiRNN`` steps through time.

    Those wrappers trace to a ``while`` loop over arrays, and Paddle Inference's int8 passes
    do not reach into its body: the cell's matmuls run fp32 there, so they stay fp32 in the
    simulation too (measured: a ``BiRNN`` of ``GRUCell``s simulated int8, 6.7e-2 of the
    largest output off Paddle Inference). A cell called in the model's own Python loop over a
    fixed length traces unrolled and is quantized.
    """
    if caller in _WRAPPED_CELLS:
        return True
    if caller in _FREE_CELLS or not isinstance(caller, paddle.nn.RNNCellBase):
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if isinstance(frame.f_locals.get("self"), (paddle.nn.RNN, paddle.nn.BiRNN)):
            _WRAPPED_CELLS.add(caller)
            (logger.warning if any_discovering() else logger.debug)(
                "a %s run by paddle.nn.RNN/BiRNN keeps its matmuls fp32: the export makes "
                "that loop a while op, whose body Paddle Inference's int8 passes do not reach "
                "(paddle.nn.LSTM/GRU run int8 where Paddle has a kernel)", type(caller).__name__,
            )
            return True
        frame = frame.f_back
    _FREE_CELLS.add(caller)
    return False


def _parameter_site(
    caller: paddle.nn.Layer, x: Any, y: Any, transpose_y: bool, bias: Any
) -> paddle.nn.Layer | None:
    """The caller's :class:`MatmulSite` for ``matmul(x, y)`` (``F.linear(x, y, bias)``, the
    bias a parameter or ``None``), added if its model is being calibrated; ``None``: the call
    runs as it is."""
    for _, child in matmul_sites(caller):
        if inner_site(child).runs(caller, y, transpose_y, bias):
            return child
    return _discover(caller, x, y, transpose_y, bias)


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
    if not sites and (reason := outside_forward_reason(caller)) is not None:
        owner = session.sublayer_name(caller) or type(caller).__name__
        refuse(session, f"a matmul of two activations in {owner}", reason)
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
    inner = inner_site(site)
    if (inner.transpose_x, inner.transpose_y) != (transpose_x, transpose_y):
        return None  # another call order than calibration saw
    return site


def activation_sites(layer: paddle.nn.Layer) -> list[paddle.nn.Layer]:
    """The :class:`ActivationMatmul` sites of ``layer`` (or the layers ``convert`` wrapped
    them in), in call order."""
    found = [
        child for child in layer._sub_layers.values() if isinstance(inner_site(child), ActivationMatmul)
    ]
    return sorted(found, key=lambda child: inner_site(child).ordinal)


def _enter_caller(layer: paddle.nn.Layer, inputs: Any) -> None:
    """Forward-pre hook of a layer with activation sites: its calls are counted from 0."""
    _ACTIVATION_CALLERS.add(layer)
    _ACTIVATION_CALLS[layer] = 0


def _discover_activation(
    caller: paddle.nn.Layer, session: Any, ordinal: int, transpose_x: bool, transpose_y: bool
) -> paddle.nn.Layer:
    attribute = free_attribute(caller, f"activation_matmul_{ordinal}")
    site = ActivationMatmul(ordinal, transpose_x, transpose_y)
    caller.add_sublayer(attribute, site)
    watch(caller)
    if ordinal == 0:
        caller.register_forward_pre_hook(_enter_caller)
        _ACTIVATION_CALLERS.add(caller)
    name = qualified(session.sublayer_name(caller), attribute)
    session.add_discovered_layer(name, site)
    logger.info("a matmul of two activations is calibrated as the layer %r", name)
    return site


def _is_float32(value: Any) -> bool:
    """A float32 tensor, or a float32 variable of the program the export traces."""
    return isinstance(value, (paddle.Tensor, paddle.static.Variable)) and value.dtype == paddle.float32


def missing_site_hint(layer_name: str) -> str:
    """What to do when a file names ``layer_name`` and the model lacks it: ``""`` unless it
    looks like a site (found only at the first calibration forward)."""
    if re.search(r"(^|\.)activation_matmul_\d+$", layer_name):
        return (
            " (a functional paddle.matmul of two activations becomes a layer named "
            "'activation_matmul_<k>' at the first calibration forward: run one batch through "
            "the model, e.g. ptq.calibrate(model, data, max_batches=1), then load)"
        )
    if layer_name.endswith("_conv"):
        return (
            " (if it is a functional F.conv2d/F.conv1d on a parameter, it becomes a layer named "
            "'<parameter>_conv' at the first calibration forward: run one batch through the "
            "model, then load)"
        )
    if not layer_name.endswith(_SITE_SUFFIX):
        return ""
    return (
        f" (a functional paddle.matmul or F.linear becomes a layer named "
        f"'<parameter>{_SITE_SUFFIX}' at the first calibration forward: run one batch through "
        f"the model, then load)"
    )


def has_own_parameters(model: paddle.nn.Layer, ranks: tuple[int, ...]) -> bool:
    """Whether a layer of ``model`` that PTQ does not hook owns a float32 parameter of one of
    the ``ranks`` (2: a matrix a functional ``paddle.matmul`` may use; 3 and 4: a filter for
    ``F.conv1d`` / ``F.conv2d``)."""
    return any(
        parameter is not None and parameter.dtype == paddle.float32 and len(parameter.shape) in ranks
        for layer in model.sublayers(include_self=True)
        if not PTQRegistry.is_supported_layer(layer)
        for parameter in layer._parameters.values()
    )


def matmul_sites(layer: paddle.nn.Layer) -> list[tuple[str, paddle.nn.Layer]]:
    """``(attribute, sublayer)`` of each site of ``layer`` (the sublayer is the site or the
    :class:`QuantizedLayer` ``convert`` wrapped it in)."""
    return [
        (attribute, child) for attribute, child in layer._sub_layers.items()
        if isinstance(inner_site(child), MatmulSite)
    ]


def inner_site(layer: paddle.nn.Layer) -> paddle.nn.Layer:
    """The site a sublayer is or wraps (``convert``'s and ``ImperativeQAT``'s wrappers)."""
    return layer.layer if isinstance(layer, (QuantizedLayer, QuantizedMatmul, FakeQuantLayer)) else layer


def _calling_layer() -> paddle.nn.Layer | None:
    """The layer whose ``forward`` made the call; ``None`` when there is none or it is a layer
    the hooks calibrate themselves (an ``nn.Linear`` calling ``F.linear``, a site, a simulated
    layer): their calls are their own implementation."""
    return calling_layer(globals(), _calibrated_itself, _MAX_FRAMES)


def _calibrated_itself(layer: paddle.nn.Layer) -> bool:
    return isinstance(
        layer, (ActivationMatmul, QuantizedMatmul, QuantizedLayer, QuantizedLSTM)
    ) or PTQRegistry.is_simulated_quant_layer(layer)


def resolve(layer: paddle.nn.Layer, path: str) -> Any:
    """``layer``'s attribute at the dotted ``path`` (``None`` if missing)."""
    value: Any = layer
    for part in path.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def parameter_path(caller: paddle.nn.Layer, y: Any) -> str | None:
    """The dotted name of ``y`` among ``caller``'s parameters, ``None`` if it is none."""
    for path, parameter in caller.named_parameters():
        if parameter is y:
            return path
    return None


def _discover(
    caller: paddle.nn.Layer, x: Any, y: Any, transpose_y: bool, bias: Any
) -> paddle.nn.Layer | None:
    """Adds a site for ``matmul(x, y)`` (``F.linear(x, y, bias)``, the bias a parameter or
    ``None``) to ``caller`` if its model is being calibrated."""
    session = discovering_session(caller)
    if session is None:
        return None
    path = parameter_path(caller, y)
    bias_path = None if bias is None else parameter_path(caller, bias)
    if path is None or (bias is not None and bias_path is None):
        return None
    caller_name = session.sublayer_name(caller)
    where = (
        f"paddle.matmul(x, {qualified(caller_name, path)})" if bias is None
        else f"F.linear(x, {qualified(caller_name, path)}, {qualified(caller_name, bias_path)})"
    )
    reason = _unsupported(x, y, bias) or outside_forward_reason(caller)
    if reason is not None:
        refuse(session, where, reason)
        return None
    site = MatmulSite.from_caller(caller, path, transpose_y, bias_path)
    return add_parameter_site(caller, caller_name, path + _SITE_SUFFIX, site, session, where)


def refuse(session: Any, where: str, reason: str) -> None:
    """Warns, once per calibration session, that the call ``where`` stays fp32 and why."""
    if session.note_refused(where):
        logger.warning("%s stays fp32: %s", where, reason)


def add_parameter_site(
    caller: paddle.nn.Layer, caller_name: str, attribute: str, site: ParameterSite, session: Any,
    where: str,
) -> ParameterSite:
    """Adds ``site`` to ``caller`` (under ``attribute``, dots replaced, or a free variant of
    it), and a copy built from the fp32 reference's own parameters to its layer of the same
    name, and puts it under calibration; ``where`` describes the call for the log."""
    attribute = free_attribute(caller, attribute.replace(".", "_"))
    caller.add_sublayer(attribute, site)
    watch(caller)
    if session.reference is not None:
        reference_caller = dict(session.reference.named_sublayers(include_self=True)).get(caller_name)
        if reference_caller is not None:
            mirror_site(reference_caller, attribute, site)
    name = qualified(caller_name, attribute)
    session.add_discovered_layer(name, site)
    logger.info("%s is calibrated as the %s layer %r", where, site.layer_kind, name)
    return site


def _unsupported(x: Any, y: Any, bias: Any = None) -> str | None:
    if y.dtype != paddle.float32 or len(y.shape) != 2:
        return f"only 2-D float32 weights are quantized (got {list(y.shape)} {y.dtype})"
    if not isinstance(x, paddle.Tensor) or x.dtype != paddle.float32 or len(x.shape) < 2:
        return "only float32 inputs of rank >= 2 are quantized"
    if bias is not None and (bias.dtype != paddle.float32 or list(bias.shape) != [y.shape[1]]):
        return f"only a float32 bias of shape [{y.shape[1]}] is kept (got {list(bias.shape)} {bias.dtype})"
    return None


def qualified(caller_name: str, attribute: str) -> str:
    """The model-level name of ``caller``'s sublayer ``attribute``."""
    return f"{caller_name}.{attribute}" if caller_name else attribute


def free_attribute(layer: paddle.nn.Layer, attribute: str) -> str:
    """``attribute``, or ``attribute_2``, ``_3``, ...: the first name ``layer`` lacks."""
    candidate, count = attribute, 1
    while hasattr(layer, candidate):
        count += 1
        candidate = f"{attribute}_{count}"
    return candidate


def parameter_sites(layer: paddle.nn.Layer) -> list[tuple[str, paddle.nn.Layer]]:
    """``(attribute, sublayer)`` of each :class:`ParameterSite` of ``layer``, matmul or conv
    (the sublayer is the site or the layer ``convert`` wrapped it in)."""
    return [
        (attribute, child) for attribute, child in layer._sub_layers.items()
        if isinstance(inner_site(child), ParameterSite)
    ]


def mirror_sites(source: paddle.nn.Layer, target: paddle.nn.Layer) -> int:
    """Gives ``target`` (an fp32 model ``source`` was made from) the parameter sites ``source``
    has, as fp32 sites built from ``target``'s own parameters, so layer names match.

    Returns:
        How many sites were added.
    """
    callers = dict(target.named_sublayers(include_self=True))
    added = 0
    for name, layer in source.named_sublayers(include_self=True):
        caller = callers.get(name)
        if caller is None:
            continue
        for attribute, child in parameter_sites(layer):
            added += mirror_site(caller, attribute, inner_site(child))
    return added


def mirror_site(caller: paddle.nn.Layer, attribute: str, site: ParameterSite) -> bool:
    """Adds to ``caller`` (of an fp32 model) an fp32 copy of ``site`` built from its own
    parameters, unless it has one; whether it was added."""
    if attribute in caller._sub_layers:
        return False
    mirrored = site.rebuilt_for(caller)
    if mirrored is None:
        return False
    caller.add_sublayer(attribute, mirrored)
    watch(caller)
    return True


def with_matmul_sites(model: paddle.nn.Layer, quantized_model: paddle.nn.Layer) -> paddle.nn.Layer:
    """``model``, or a copy of it with the sites ``quantized_model`` has (``model`` itself is
    never changed), so the two have the same layer names."""
    sites = {
        qualified(name, attribute)
        for name, layer in quantized_model.named_sublayers(include_self=True)
        for attribute, _ in parameter_sites(layer)
    }
    if sites <= {name for name, _ in model.named_sublayers()}:
        return model
    copied = copy.deepcopy(model)
    mirror_sites(quantized_model, copied)
    return copied
