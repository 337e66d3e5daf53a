"""Functional ``F.conv2d(x, self.weight, self.bias, ...)`` and ``F.conv1d`` calls on a layer's own
parameters, calibrated and quantized as Conv2D / Conv1D layers.

A layer that holds its filters as parameters and convolves with ``paddle.nn.functional.conv2d``
(hand-written layers, code generated from static graphs) hides its convs from every forward
hook. :func:`install` puts :func:`route_conv2d` / :func:`route_conv1d` in place of
``F.conv2d`` / ``F.conv1d``; they pass every call through unchanged except one whose weight is a
parameter of the calling layer (the ``self`` of the ``forward`` that made the call, unless that
layer is one the hooks calibrate: a ``Conv2D`` subclass with its own ``forward`` is calibrated
as a Conv2D already):

* while the model is being calibrated, the first such call adds a :class:`ConvSite` to the
  calling layer: an ``nn.Conv2D`` (``nn.Conv1D``) holding a copy of the weight, of the bias when
  that is a parameter of the layer too, and the call's stride, padding, dilation and groups,
  named ``<parameter>_conv``, put under calibration like any other layer (and mirrored into
  the fp32 reference the accuracy algorithms compare with);
* from then on every such call runs the site instead, so calibration, the table, ``convert``,
  ``analyze`` and the export all see an ordinary conv layer.

Limits: calls made directly in a layer's ``forward`` (or a function it calls, a few frames
deep) on one of that layer's own float32 parameters, channels-first data, a bias that is a
parameter of the same layer or none; other calls run as they are (a weight computed in
``forward``, such as ``self.weight * self.mask``, is no parameter: fp32, as Paddle Inference
folds it). Sites appear at the first calibration forward, so a table or statistics file is
loaded after one batch.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Callable

import numpy as np
import paddle

from .functional_matmul import (
    ParameterSite, add_parameter_site, inner_site, parameter_path, qualified, refuse, resolve,
)
from .quant_layers import QuantizedLayer
from .registry import PTQRegistry
from .session import any_discovering, discovering_session
from .site_scope import calling_layer, inside_site_owner, outside_forward_reason

__all__ = ["ConvSite", "conv_sites", "install", "route_conv1d", "route_conv2d", "routed_bindings"]

#: Frames above the call searched for the calling layer's ``self`` (as for matmuls).
_MAX_FRAMES = 16
#: Ends the name of a site's sublayer.
SITE_SUFFIX = "_conv"
#: Modules whose ``conv2d`` / ``conv1d`` attribute :func:`install` replaces.
_MODULES = ("paddle", "paddle.nn.functional", "paddle.nn.functional.conv")
#: Spatial rank -> the functional's name and its channels-first layout.
_RANKS = {2: ("conv2d", "NCHW"), 1: ("conv1d", "NCL")}


def _conv_signature(x: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0,
                    dilation: Any = 1, groups: int = 1, data_format: str | None = None,
                    name: str | None = None) -> None:
    """``F.conv2d``'s and ``F.conv1d``'s arguments (``data_format`` defaulting per rank)."""


_CONV_ARGUMENTS = inspect.signature(_conv_signature)
#: Paddle's ``conv2d`` / ``conv1d`` functions, once :func:`install` replaced them.
_original: dict[str, Callable[..., Any]] = {}
#: ``(owner, attribute, Paddle's function, its router)`` of every binding :func:`install` made.
_BINDINGS: list[tuple[Any, str, Callable[..., Any], Callable[..., Any]]] = []


def _attributes(arguments: dict[str, Any]) -> dict[str, Any]:
    """The call's conv attributes, as given (``padding`` may be a string or a list)."""
    return {
        "stride": arguments.get("stride", 1), "padding": arguments.get("padding", 0),
        "dilation": arguments.get("dilation", 1), "groups": int(arguments.get("groups", 1)),
    }


def _canonical(value: Any) -> Any:
    """An attribute in a form that compares by value (tuples for lists)."""
    if isinstance(value, (list, tuple)):
        return tuple(_canonical(item) for item in value)
    return value


class ConvSite(ParameterSite):
    """Builds the Conv1D / Conv2D layer standing for a functional conv call (see the module
    docstring); ``ConvSite.build`` returns an instance of :class:`ConvSite2D` or
    :class:`ConvSite1D`."""

    parameter_path: str
    bias_path: str | None
    call_attributes: dict[str, Any]

    @staticmethod
    def build(
        weight: np.ndarray, parameter_path: str, attributes: dict[str, Any],
        bias: np.ndarray | None = None, bias_path: str | None = None,
    ) -> "ConvSite":
        """A site with a copy of ``weight`` (``[out, in / groups, *kernel]``) and ``bias``."""
        rank = weight.ndim - 2
        site_type = {2: ConvSite2D, 1: ConvSite1D}[rank]
        out_channels, group_width = weight.shape[:2]
        site = site_type(
            group_width * attributes["groups"], out_channels, list(weight.shape[2:]),
            stride=attributes["stride"], padding=attributes["padding"],
            dilation=attributes["dilation"], groups=attributes["groups"],
            bias_attr=None if bias is not None else False,
        )
        site.load(weight, bias)
        site.parameter_path = parameter_path
        site.bias_path = bias_path
        site.call_attributes = dict(attributes)
        return site

    @classmethod
    def from_caller(
        cls, caller: paddle.nn.Layer, path: str, attributes: dict[str, Any], bias_path: str | None = None
    ) -> "ConvSite | None":
        """The site of ``caller``'s ``conv(x, <path>, <bias_path>, **attributes)``, built from
        its parameters; ``None`` if it lacks them."""
        arrays = cls.caller_arrays(caller, path, bias_path)
        return None if arrays is None else cls.build(arrays[0], path, attributes, arrays[1], bias_path)

    def rebuilt_for(self, caller: paddle.nn.Layer) -> paddle.nn.Layer | None:
        return ConvSite.from_caller(caller, self.parameter_path, self.call_attributes, self.bias_path)

    def runs(self, caller: paddle.nn.Layer, weight: Any, bias: Any, attributes: dict[str, Any]) -> bool:
        """Whether this site of ``caller`` computes ``conv(x, weight, bias, **attributes)``."""
        if resolve(caller, self.parameter_path) is not weight:
            return False
        if any(_canonical(self.call_attributes[key]) != _canonical(value) for key, value in attributes.items()):
            return False
        if self.bias_path is None:
            return bias is None
        return resolve(caller, self.bias_path) is bias

    def extra_repr(self) -> str:
        call = f"{self.parameter_path}" + (f", {self.bias_path}" if self.bias_path else "")
        return f"conv(x, {call}), {super().extra_repr()}"


class ConvSite2D(ConvSite, paddle.nn.Conv2D):
    """A functional ``F.conv2d`` call on its caller's parameters, as a Conv2D layer."""

    layer_kind = "Conv2D"


class ConvSite1D(ConvSite, paddle.nn.Conv1D):
    """A functional ``F.conv1d`` call on its caller's parameters, as a Conv1D layer."""

    layer_kind = "Conv1D"


def install() -> None:
    """Puts :func:`route_conv2d` in place of ``F.conv2d`` and :func:`route_conv1d` in place of
    ``F.conv1d`` wherever Paddle binds them (idempotent). Every call not routed goes to the
    original, so models without sites run as before."""
    if _original:
        return
    routers = {"conv2d": route_conv2d, "conv1d": route_conv1d}
    for function_name, router in routers.items():
        original = getattr(paddle.nn.functional, function_name)
        _original[function_name] = original
        for module_name in _MODULES:
            module = sys.modules.get(module_name)
            if getattr(module, function_name, None) is original:
                _BINDINGS.append((module, function_name, original, router))
                setattr(module, function_name, router)


def routed_bindings() -> list[tuple[Any, str, Callable[..., Any], Callable[..., Any]]]:
    """``(owner, attribute, Paddle's function, its router)`` of every binding :func:`install`
    replaced (empty before it ran): what a comparison with Paddle's own functions swaps
    (``benchmarks/matmul_routing.py``; ``nn.Conv1D`` itself calls ``F.conv1d``)."""
    return list(_BINDINGS)


@paddle.jit.not_to_static
def route_conv2d(*args: Any, **kwargs: Any) -> Any:
    """``F.conv2d``, running a call on parameters of the calling layer through its
    :class:`ConvSite` (added while the model is calibrated)."""
    return _route(2, args, kwargs)


@paddle.jit.not_to_static
def route_conv1d(*args: Any, **kwargs: Any) -> Any:
    """``F.conv1d``, running a call on parameters of the calling layer through its
    :class:`ConvSite` (added while the model is calibrated)."""
    return _route(1, args, kwargs)


def _route(rank: int, args: tuple, kwargs: dict) -> Any:
    """A conv of spatial ``rank`` through its site, else Paddle's function."""
    function_name, layout = _RANKS[rank]
    original = _original[function_name]
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    if getattr(weight, "persistable", False) is not True or not (inside_site_owner() or any_discovering()):
        return original(*args, **kwargs)
    caller = calling_layer(globals(), _calibrated_itself, _MAX_FRAMES)
    if caller is None:
        return original(*args, **kwargs)
    try:
        arguments = _CONV_ARGUMENTS.bind(*args, **kwargs).arguments
    except TypeError:
        return original(*args, **kwargs)
    if arguments.get("data_format") not in (None, layout):
        return original(*args, **kwargs)
    bias = arguments.get("bias")
    attributes = _attributes(arguments)
    site = _site(caller, arguments["x"], weight, bias, attributes, function_name)
    return original(*args, **kwargs) if site is None else site(arguments["x"])


def _calibrated_itself(layer: paddle.nn.Layer) -> bool:
    """Layers whose conv calls are their own implementation (a ``Conv2D`` subclass with its
    own ``forward`` is calibrated as a whole), or simulated ones."""
    return (
        isinstance(layer, (ConvSite, QuantizedLayer))
        or PTQRegistry.is_supported_layer(layer) or PTQRegistry.is_simulated_quant_layer(layer)
    )


def conv_sites(layer: paddle.nn.Layer) -> list[tuple[str, paddle.nn.Layer]]:
    """``(attribute, sublayer)`` of each conv site of ``layer`` (the sublayer is the site or
    the layer ``convert`` wrapped it in)."""
    return [
        (attribute, child) for attribute, child in layer._sub_layers.items()
        if isinstance(inner_site(child), ConvSite)
    ]


def _site(
    caller: paddle.nn.Layer, x: Any, weight: Any, bias: Any, attributes: dict[str, Any], function_name: str
) -> paddle.nn.Layer | None:
    """The caller's site for this call, added if its model is being calibrated; ``None``: the
    call runs as it is."""
    for _, child in conv_sites(caller):
        if inner_site(child).runs(caller, weight, bias, attributes):
            return child
    session = discovering_session(caller)
    if session is None:
        return None
    path = parameter_path(caller, weight)
    bias_path = None if bias is None else parameter_path(caller, bias)
    if path is None:
        return None
    caller_name = session.sublayer_name(caller)
    where = f"F.{function_name}(x, {qualified(caller_name, path)})"
    reason = _unsupported(x, weight, bias, bias_path) or outside_forward_reason(caller)
    if reason is not None:
        refuse(session, where, reason)
        return None
    site = ConvSite.from_caller(caller, path, attributes, bias_path)
    return add_parameter_site(caller, caller_name, path + SITE_SUFFIX, site, session, where)


def _unsupported(x: Any, weight: Any, bias: Any, bias_path: str | None) -> str | None:
    if weight.dtype != paddle.float32:
        return f"only float32 weights are quantized (got {weight.dtype})"
    if not isinstance(x, paddle.Tensor) or x.dtype != paddle.float32:
        return "only float32 inputs are quantized"
    if bias is not None and bias_path is None:
        return "its bias is not a parameter of the same layer"
    if bias is not None and (bias.dtype != paddle.float32 or list(bias.shape) != [weight.shape[0]]):
        return f"only a float32 bias of shape [{weight.shape[0]}] is kept (got {list(bias.shape)} {bias.dtype})"
    return None
