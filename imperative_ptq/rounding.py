"""Rounding onto an integer grid: the one arithmetic every simulated quantizer runs, with the
straight-through gradient where the input needs one.

The converted model's simulation (:mod:`imperative_ptq.quant_layers`, its fused residuals in
:mod:`imperative_ptq.quant_residual`, its int8 head pool in :mod:`imperative_ptq.quant_pool`)
and quantization-aware fine-tuning (:mod:`imperative_ptq.fake_quant`, :mod:`imperative_ptq.qat`)
call the same functions, so a fine-tuned model trains on the arithmetic it is converted to.
Backward, rounding passes the gradient unchanged and the clip stops it outside the grid
(Krishnamoorthi, arXiv 1806.08342); a step that requires gradients gets LSQ's
(Esser et al., arXiv 1902.08153) from the same expression.
"""

from __future__ import annotations

import paddle

__all__ = ["grid_codes", "round_half_to_even", "straight_through"]


def round_half_to_even(x: paddle.Tensor) -> paddle.Tensor:
    """``x`` rounded to the nearest integer, ties to even (``paddle.round`` takes ties away
    from zero)."""
    floor = paddle.floor(x)
    fraction = x - floor
    odd = paddle.remainder(floor, paddle.full([], 2.0, x.dtype)) == 1
    up = (fraction > 0.5) | ((fraction == 0.5) & odd)
    return floor + up.astype(x.dtype)


def straight_through(value: paddle.Tensor, rounded: paddle.Tensor) -> paddle.Tensor:
    """``rounded`` forward, bit for bit (plus ``value - value``, an exact zero); ``value``'s
    gradient backward."""
    if value.stop_gradient:
        return rounded
    return rounded.detach() + (value - value.detach())


def grid_codes(
    x: paddle.Tensor,
    step: paddle.Tensor | float,
    lowest: float,
    highest: float,
    half_to_even: bool = False,
) -> paddle.Tensor:
    """The codes ``clip(round(x / step), lowest, highest)`` (NaN: 0), straight-through backward.

    Args:
        x: Float tensor.
        step: The grid's step (a scalar, or a tensor broadcasting against ``x``).
        lowest: The smallest code (an integer).
        highest: The largest code (an integer).
        half_to_even: Round ties to even, as oneDNN's int8 kernels do, instead of away from
            zero, as Paddle's quantize ops do.
    """
    # round(clip(v)) == clip(round(v)) for integer bounds; clipping first stops the gradient
    # outside the grid. NaN becomes code 0, as oneDNN's and ONNX Runtime's quantize make it
    # (measured: a fully masked attention row, NaN after its softmax, gave the next Linear's
    # bias in both runtimes and NaN in the simulation).
    codes = paddle.nan_to_num(paddle.clip(x / step, float(lowest), float(highest)), nan=0.0)
    rounded = round_half_to_even(codes) if half_to_even else paddle.round(codes)
    return straight_through(codes, rounded)
