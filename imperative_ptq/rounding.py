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

__all__ = ["ROUNDING_SHIFT", "grid_codes", "round_half_to_even", "straight_through"]


#: Per float dtype, the magnitude from which every value is an integer (2 ** mantissa bits):
#: adding it to a smaller magnitude leaves no fraction bits, so the float addition itself
#: rounds to the nearest integer, ties to even (IEEE 754's default rounding).
_INTEGRAL_FROM = {paddle.float32: 2.0**23, paddle.float64: 2.0**52}
#: 1.5 * 2**23: a float32 ``v`` with ``|v| <= 2**22`` plus it lands in [2**23, 2**24], where
#: float32 holds only integers, so the addition rounds ``v`` half to even and subtracting it
#: again is exact (the exported programs round codes computed in float with the same two steps).
ROUNDING_SHIFT = 1.5 * _INTEGRAL_FROM[paddle.float32]


def round_half_to_even(x: paddle.Tensor) -> paddle.Tensor:
    """``x`` rounded to the nearest integer, ties to even (``paddle.round`` takes ties away
    from zero); NaN and infinities stay; no gradient (as a floor's).

    The float addition ``(|x| + 2**23) - 2**23`` (float32) does the rounding: a few elementwise
    passes instead of a floor and a remainder, measured 70x faster on CPU. Half-precision
    inputs round in float32, where each of their values is exact.
    """
    integral_from = _INTEGRAL_FROM.get(x.dtype)
    if integral_from is None:
        return round_half_to_even(x.astype(paddle.float32)).astype(x.dtype)
    magnitude = paddle.abs(x.detach())
    rounded = paddle.where(magnitude < integral_from, (magnitude + integral_from) - integral_from, magnitude)
    # + 0.0 turns the -0.0 of a small negative input into 0.0, as a floor-based rounding gives
    return paddle.where(x.detach() < 0, -rounded, rounded) + 0.0


def _round_bounded_half_to_even(x: paddle.Tensor, bound: float) -> paddle.Tensor:
    """:func:`round_half_to_even` of values within ``[-bound, bound]``: for ``bound`` at most
    half of :data:`_INTEGRAL_FROM` (clipped codes), one addition and one subtraction."""
    integral_from = _INTEGRAL_FROM.get(x.dtype)
    if integral_from is None or bound > integral_from / 2:
        return round_half_to_even(x)
    # x + 1.5 * 2**23 lies in [2**23, 2**24] (float32), where the float step is exactly 1
    offset = 1.5 * integral_from
    return (x.detach() + offset) - offset


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
    codes = paddle.clip(x / step, float(lowest), float(highest))
    codes = paddle.where(paddle.isnan(codes), paddle.zeros_like(codes), codes)
    if half_to_even:
        rounded = _round_bounded_half_to_even(codes, max(abs(lowest), abs(highest)))
    else:
        rounded = paddle.round(codes)
    return straight_through(codes, rounded)
