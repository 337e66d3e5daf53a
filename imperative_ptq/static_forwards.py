"""Forwards decorated with ``paddle.jit.to_static`` run undecorated in the quantized model.

Paddle compiles a decorated forward into a program on its first call for an input
signature and reuses it. The export first runs the model eagerly on a batch of one (to
check the input_spec), which compiled such a program, and ``paddle.jit.save`` then wrote it
in place of the input_spec's: a batch-1 program whose input was named ``_jst.0.x.0``
(measured: Paddle Inference refused a batch of 4, ONNX Runtime could not be fed ``x``). The
quantized model runs the undecorated function instead, which the export traces with the
input_spec like any forward; the user's model keeps its decorator.
"""

from __future__ import annotations

import inspect
import types

import paddle
from paddle.jit.dy2static.program_translator import StaticFunction

__all__ = ["undecorate_static_forwards"]


def undecorate_static_forwards(model: paddle.nn.Layer) -> list[str]:
    """Makes every layer of ``model`` whose ``forward`` is decorated with
    ``paddle.jit.to_static`` run the undecorated function (an instance attribute, which
    copies of the layer keep). Returns those layers' names (the model's: its class name)."""
    undecorated = []
    for name, layer in model.named_sublayers(include_self=True):
        forward = layer.forward
        if not isinstance(forward, StaticFunction):
            continue
        function = forward.dygraph_function
        if inspect.ismethod(function):  # bound to the layer the decorator saw
            function = function.__func__
        layer.forward = types.MethodType(function, layer)
        undecorated.append(name or type(layer).__name__)
    return undecorated
