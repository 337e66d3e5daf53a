"""Thresholds of probabilities: a layer whose first input is a softmax's output keeps the largest
value calibration saw there.

A layer reading probabilities computes a weighted sum decided by the few large ones: the 1x1
conv of YOLOv8's and PP-YOLOE's distribution focal loss head takes the expectation
``sum_i i * p_i`` of a softmax over the bins of each box side, an attention matmul sums the
values by their weights. Their histogram is the opposite of what a KL search expects: nearly
every value lies near 0 and the few near 1 look like outliers. On a YOLOv8n detector (nudenet,
320 x 320) KL put the DFL conv's input threshold at 0.52, clipping every confident probability
there (the clipped values are fewer than ``max_clipped_share`` of the non-zero ones), and the
int8 boxes were 18 px of 320 off the fp32 ones at the best anchor, 4 px with that conv kept fp32.
ONNX Runtime's quantization tool fixes a softmax output's range to ``[0, 1]`` for the same
reason; this package keeps the calibrated maximum (at most 1, and finer steps where
calibration saw no probability near 1).

:func:`install` puts :func:`route_softmax` in place of ``paddle.nn.functional.softmax`` (which
``nn.Softmax`` calls) and of the PyTorch-style ``Tensor.softmax(dim)``, and
:func:`route_dropout` in place of ``paddle.nn.functional.dropout``
(attention applies it to its weights, the same values outside training); each notes its output
in the calibrating sessions (:func:`imperative_ptq.session.note_probabilities`), and the hook of
a layer reading it sets :attr:`LayerState.probability_input`. :func:`probability_thresholds`
then raises that layer's input thresholds to the maximum when the calibration table is built.

Limits: probabilities reshaped, transposed or sliced before the layer reads them are not
recognized (their layer keeps its algorithm's threshold); affine quantizers keep theirs.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import paddle

from .quantizers import BaseQuantizer
from .session import LayerState, note_probabilities, noted_as_probabilities

__all__ = ["install", "probability_thresholds", "route_dropout", "route_softmax"]

#: Modules whose ``softmax`` / ``dropout`` attribute :func:`install` replaces.
_MODULES = ("paddle.nn.functional", "paddle.nn.functional.activation", "paddle.nn.functional.common")
_original: dict[str, Callable[..., Any]] = {}


def install() -> None:
    """Puts :func:`route_softmax` and :func:`route_dropout` in place of Paddle's functions
    (idempotent); both return exactly what Paddle's return."""
    if _original:
        return
    _original["softmax"] = paddle.nn.functional.softmax
    _original["dropout"] = paddle.nn.functional.dropout
    routers = {"softmax": route_softmax, "dropout": route_dropout}
    for module_name in _MODULES:
        module = sys.modules.get(module_name)
        for name, router in routers.items():
            if module is not None and getattr(module, name, None) is _original[name]:
                setattr(module, name, router)
    # The dygraph tensor's PyTorch-style method (YOLOv8's ``x.softmax(1)``); the legacy trace's
    # Variable keeps its own (export.legacy_ops shims that one).
    method = getattr(paddle.Tensor, "softmax", None)
    if callable(method):
        _original["tensor_softmax"] = method
        paddle.Tensor.softmax = _noting("tensor_softmax")


def _noting(original: str) -> Callable[..., Any]:
    """``_original[original]``, its dygraph output noted as probabilities."""

    @paddle.jit.not_to_static
    def call(*args: Any, **kwargs: Any) -> Any:
        output = _original[original](*args, **kwargs)
        if paddle.in_dynamic_mode():
            note_probabilities(output)
        return output

    return call


#: ``paddle.nn.functional.softmax``, its output noted as probabilities.
route_softmax = _noting("softmax")


@paddle.jit.not_to_static
def route_dropout(*args: Any, **kwargs: Any) -> Any:
    """``paddle.nn.functional.dropout``; outside training its output of probabilities is
    noted as probabilities too."""
    output = _original["dropout"](*args, **kwargs)
    x = args[0] if args else kwargs.get("x", kwargs.get("input"))
    # (training: its fourth argument, after x, p and axis)
    training = kwargs.get("training", args[3] if len(args) > 3 else True)
    if paddle.in_dynamic_mode() and not training and noted_as_probabilities(x):
        note_probabilities(output)
    return output


def probability_thresholds(state: LayerState, quantizer: BaseQuantizer, thresholds: list[float]) -> list[float]:
    """``thresholds`` of ``state``'s first input, each raised to the largest value calibration
    saw where that input was probabilities in every call (see the module docstring)."""
    if not state.probability_input or not quantizer.symmetric:
        return thresholds
    maxima = [quantizer.observed_maximum(index) for index in range(len(thresholds))]
    return [t if m is None else max(t, m) for t, m in zip(thresholds, maxima)]
