"""Layers whose forward multiplies by a weight it computes, not by its weight parameter.

A subclass of a quantizable layer may transform its weight in ``forward`` before the conv or
matmul (PixelCNN's and MADE's masks, ``self.weight * self.mask``; BiT's weight
standardization). The simulation quantizes the parameter and lets ``forward`` transform the
quantized weight, while int8 runtimes see a kernel reading a tensor computed from parameters,
which Paddle Inference and ONNX Runtime fold into an fp32 constant and run in fp32 (measured:
a masked Conv2D 5.3e-3 of its largest output off the simulation, three of them 0.19, two
weight-standardized ones 0.11). Such a layer is found on its first calibration call by running
its ``forward`` again while recording the weight operands of Paddle's conv and matmul kernels,
and ``convert`` keeps it fp32. (A weight that a forward-pre hook computes, as
``paddle.nn.utils.weight_norm`` does, is :mod:`imperative_ptq.reparametrized`'s.)
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import paddle
from paddle import _C_ops

__all__ = ["computes_its_weight", "may_compute_its_weight"]

#: Paddle's dygraph kernels that multiply by a weight, which they take as their second operand.
_WEIGHT_KERNELS = (
    "conv2d", "depthwise_conv2d", "conv3d", "conv2d_transpose", "depthwise_conv2d_transpose",
    "conv3d_transpose", "linear", "matmul",
)
#: Kernels whose output holds their input's values, as ``F.conv1d`` hands its weight on.
_LAYOUT_KERNELS = ("assign", "unsqueeze")


def may_compute_its_weight(layer: paddle.nn.Layer) -> bool:
    """Whether ``layer`` holds a weight parameter and its class defines ``forward`` outside
    Paddle and this package (a user's subclass), so that it may transform that weight."""
    if not isinstance(getattr(layer, "weight", None), paddle.Tensor):
        return False
    module = getattr(type(layer).forward, "__module__", None) or ""
    return not module.startswith(("paddle.", "imperative_ptq."))


def computes_its_weight(layer: paddle.nn.Layer, inputs: tuple, kwargs: dict) -> bool:
    """Whether ``layer.forward(*inputs, **kwargs)`` runs conv or matmul kernels but none of
    them on ``layer.weight`` itself (it multiplies by a tensor computed from it). A copy or an
    unsqueeze of the weight counts as the weight: ``F.conv1d`` runs a conv2d on one, which
    the export reads back (:mod:`imperative_ptq.export.weight_ops`).

    Runs ``forward`` once more, without gradients; the caller keeps its hooks quiet meanwhile.
    """
    weights = [layer.weight]
    operands: list[Any] = []

    def laid_out(source: Any, result: Any) -> None:
        if any(source is weight for weight in weights):
            weights.append(result)

    with _recording_kernels(operands.append, laid_out), paddle.no_grad():
        layer.forward(*inputs, **kwargs)
    return bool(operands) and not any(operand is weight for operand in operands for weight in weights)


@contextlib.contextmanager
def _recording_kernels(
    weight_operand: Callable[[Any], None], laid_out: Callable[[Any, Any], None]
) -> Iterator[None]:
    """Meanwhile, hands the second operand of every weight kernel call to ``weight_operand``
    and the input and output of every :data:`_LAYOUT_KERNELS` call to ``laid_out``."""
    originals = {name: getattr(_C_ops, name) for name in (*_WEIGHT_KERNELS, *_LAYOUT_KERNELS)}

    def recording(name: str, kernel: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            result = kernel(*args, **kwargs)
            if name in _LAYOUT_KERNELS and args:
                laid_out(args[0], result)
            elif name not in _LAYOUT_KERNELS and len(args) > 1:
                weight_operand(args[1])
            return result

        return call

    for name, kernel in originals.items():
        setattr(_C_ops, name, recording(name, kernel))
    try:
        yield
    finally:
        for name, kernel in originals.items():
            setattr(_C_ops, name, kernel)
