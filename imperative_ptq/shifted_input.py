"""Shifted inputs: a signed input run as u8 codes 0..127, exact on every x86 CPU.

Without VNNI, oneDNN multiplies u8 x s8 byte pairs into int16 sums that saturate unless the
u8 codes stay within 0..127 (2 * 127 * 127 < 32767); a signed (s8) input is shifted by +128
into u8 and saturates a fc (see :mod:`imperative_ptq.targets`). A layer that is linear in its
input can take the shift itself: with ``c = z * s``,

    W x + b = W (x + c) + (b - W c),

so the input ``x + c`` is non-negative, runs as u8 on codes ``0..M`` (``M = 127`` for 8 bits)
and the bias absorbs the shift. The simulation quantizes ``x`` on the affine grid
``clip(rint(x / s) + z, 0, M) - z`` (scaled by ``s``), which is exactly what the int8 layer
then reads. Only layers whose every output sees ``W c`` qualify: a fc, and a conv that reads
no padding (a 1x1 or a VALID conv); a padded conv's border would see zeros where the shift
expects ``c``. The export side is :mod:`imperative_ptq.export.shifted`.

The codes are computed as Paddle Inference computes them, rounding included
(:func:`shifted_codes`): ``c`` is added in float32 and the sum multiplied by the u8 quantize
op's float32 multiplier ``k ~ 1 / s``. ``rint(x / s) + z`` or ``rint(x * (1 / s)) + z`` give
other codes near ties (3 of 1.8 million on a transformer's LayerNorm outputs, each moving an
output by a step of a grid made coarse by outlier channels: 7% of the largest output).
"""

from __future__ import annotations

import math

import numpy as np
import paddle

from .quantizers.qparams import affine_levels
from .rounding import round_half_to_even

__all__ = [
    "MAX_EXACT_U8_CODE", "dequantize_codes", "shift_value", "shiftable", "shift_response", "shifted_codes", "shifted_grid",
    "shifted_levels", "shifted_multiplier",
]

#: The largest u8 code whose byte pairs cannot saturate ``vpmaddubsw`` (2 * 127 * 127 < 32767).
MAX_EXACT_U8_CODE = 127


def shifted_levels(bits: int) -> int:
    """Highest code of the shifted grid of a ``bits``-bit input: ``2**bits - 1``, at most 127."""
    return min(affine_levels(bits), MAX_EXACT_U8_CODE)


def shifted_grid(threshold: float, minimum: float | None, bits: int) -> tuple[float, int] | None:
    """Scale and zero point of the shifted grid of a signed input.

    The grid ``(q - z) * s`` for ``q`` in ``0..M`` reaches ``threshold`` at the top and at
    least ``max(minimum, -threshold)`` at the bottom (``minimum`` unknown: ``-threshold``):
    a LayerNorm output gets ``z = 64`` (7 bits on each side), a GELU output whose smallest
    value is -0.17 at threshold 5 gets ``z = 5`` (almost the whole grid for its positive side).

    Args:
        threshold: The input's calibrated (symmetric) threshold.
        minimum: The smallest input value calibration saw.
        bits: Activation bit width.

    Returns:
        ``(scale, zero_point)``, or ``None`` when the threshold is not a positive finite number.
    """
    if not (math.isfinite(threshold) and threshold > 0):
        return None
    levels = shifted_levels(bits)
    lowest = -threshold if minimum is None or not math.isfinite(minimum) else max(minimum, -threshold)
    lowest = min(lowest, 0.0)
    needed = -lowest / ((threshold - lowest) / levels)  # zero point reaching ``lowest``
    zero_point = min(max(math.ceil(needed * (1 - 1e-9)), 0), levels - 1)  # float noise
    return threshold / (levels - zero_point), zero_point


def shiftable(layer: paddle.nn.Layer) -> bool:
    """Whether ``layer`` computes ``W x + b`` with every output reading only ``x``, so that a
    shift of ``x`` is a bias, and runs right on every x86 CPU: a Linear, or a 1-D or 2-D conv
    that pads nothing (a pointwise conv, a VALID conv, a dilated one after an explicit causal
    pad). Not a patch embedding (kernel = stride > 1): oneDNN's
    AMX int8 kernels compute some of those wrongly (``export.predictor``), so the default
    target keeps them fp32. A padded conv's border would read zeros where the shift expects
    ``c``; padding the input explicitly before the shift makes it exact, but Paddle Inference
    runs that pad as native ops with layout conversions, which cost what the int8 conv gains
    (measured on the Zen 3 EPYC at batch 8: ResNet-18's stem int8 this way, 1.99x fp32 either
    way; MobileNetV3-small's padded depthwise convs, 0.77x -> 0.23x)."""
    if isinstance(layer, paddle.nn.Linear):
        return True
    if isinstance(layer, paddle.nn.Conv1D):  # a conv2d on the unsqueezed input in the program
        kernel, stride = int(np.ravel(layer._kernel_size)[0]), int(np.ravel(layer._stride)[0])
        padding = layer._padding
        unpadded = (
            padding == "VALID" if isinstance(padding, str)
            else all(int(p) == 0 for p in np.ravel(padding))
        )
        return unpadded and not (kernel > 1 and kernel == stride)
    if isinstance(layer, paddle.nn.Conv2D):
        kernel = [int(size) for size in layer._kernel_size]
        stride = [int(step) for step in np.ravel(layer._stride)]
        patch = kernel != [1, 1] and kernel == (stride * 2 if len(stride) == 1 else stride)
        return (
            all(int(p) == 0 for p in np.ravel(layer._updated_padding))
            and layer._padding_algorithm != "SAME"
            and not patch
        )
    return False


def shift_response(weight: np.ndarray, weight_axis: int, shift: float) -> np.ndarray:
    """``W c`` per output channel for a shift ``c`` of every input: ``c`` times the sum of each
    output channel's weights (summed in float64, as the float32 result is then subtracted).

    Args:
        weight: The weight the layer computes with (Linear ``[in, out]``, conv ``[out, in, 1, 1]``).
        weight_axis: Its output-channel axis.
        shift: ``c = z * s``.
    """
    weight = np.asarray(weight, dtype=np.float64)
    reduced = tuple(axis for axis in range(weight.ndim) if axis != weight_axis)
    return (weight.sum(axis=reduced) * float(shift)).astype(np.float32)


def shift_value(scale: float, zero_point: int) -> np.float32:
    """The shift ``c = z * s`` as the program holds it (a float32 attribute)."""
    return np.float32(float(zero_point) * float(scale))


def shifted_multiplier(scale: float) -> np.float32:
    """The multiplier of Paddle Inference's u8 quantize op for a shifted input of step ``s``.

    The program writes the threshold ``S = 255 * s`` in float32; Paddle's oneDNN passes take
    ``float32(1 / S)`` and multiply it by 255 in float32, and the quantize op multiplies its
    input by that.
    """
    threshold = np.float32(255.0 * float(scale))
    return np.float32(np.float32(1.0 / float(threshold)) * np.float32(255.0))


def shifted_codes(x: paddle.Tensor, scale: float, zero_point: int, levels: int) -> paddle.Tensor:
    """The u8 codes ``clip(rint(float32(x + c) * k), 0, levels)`` of a shifted input, as Paddle
    Inference computes them (:func:`shift_value`, :func:`shifted_multiplier`; ties to even).

    Args:
        x: The float32 input.
        scale: The grid's step ``s``.
        zero_point: Its zero point ``z``.
        levels: The highest code ``M``.
    """
    shift = paddle.full([], shift_value(scale, zero_point), x.dtype)
    multiplier = paddle.full([], shifted_multiplier(scale), x.dtype)
    codes = round_half_to_even((x + shift) * multiplier)
    return paddle.clip(codes, 0.0, float(levels))


def dequantize_codes(codes: paddle.Tensor, scale: float, zero_point: int) -> paddle.Tensor:
    """``(codes - z) * s`` in float64 with ``s`` in float32, returned as float32 (as
    :func:`imperative_ptq.primitives.fake_quantize` dequantizes)."""
    step = float(np.float32(scale))
    return ((codes.astype("float64") - float(zero_point)) * step).astype("float32")
