"""Layers that simulate int8 in dygraph after :meth:`ImperativePTQ.convert`.

A simulated-quant layer (Conv2D, Linear, ...) is replaced by :class:`QuantizedLayer`, which
fake-quantizes its input with the calibrated threshold and runs the original layer on
fake-quantized weights, so accuracy can be measured before export. Thresholds follow Paddle's
symmetric convention ``q = clip(round(x / t * L), -L, L)`` with ``L = 2**(bits-1) - 1``.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import paddle

from .converted import holds_package_state
from .fingerprint import Fingerprint, fingerprint
from .forward_calls import PerCallTopCodes
from .primitives import fake_quantize
from .quant_residual import quantize_residual_in_place, residual_output_codes
from .quantizers.qparams import affine_levels, symmetric_levels
from .rounding import grid_codes
from .shifted_input import dequantize_codes, shift_response, shifted_codes, shifted_levels

__all__ = [
    "QuantizedLayer",
    "QuantizedMatmul",
    "WrappedParameters",
    "fake_quantize_symmetric",
    "first_input",
    "signed_input_floor",
    "stored_per_tensor",
    "quantize_weight",
    "stored_weight_integers",
    "replace_sublayer", "replace_sublayers",
    "onednn_requantizes_conv",
    "channel_below_edge",
    "linear_runs_as_conv",
    "keeps_forward",
    "runtime_weight",
]


def fake_quantize_symmetric(
    x: paddle.Tensor,
    threshold: paddle.Tensor,
    bits: int,
    axis: int | None = None,
    unsigned: bool = False,
    lowest_code: int | None = None,
    highest_code: int | None = None,
) -> paddle.Tensor:
    """Quantize-dequantize ``x`` with symmetric thresholds (per tensor, or per channel on ``axis``).

    Backward, the straight-through gradient (:func:`~imperative_ptq.rounding.grid_codes`), so
    QAT's fake quantization (:func:`~imperative_ptq.fake_quant.fake_quantize_ste`) is this.

    Args:
        x: Float tensor.
        threshold: Positive threshold(s): shape [1], or [C] with ``C = x.shape[axis]``.
        bits: Bit width.
        axis: Channel axis for per-channel thresholds.
        unsigned: Keep only the non-negative half of the grid (``0..L``), as an x86 runtime
            does with an input it runs as u8: negative values become 0.
        lowest_code: The code a signed value below ``-t`` saturates to, when not ``-L``: an
            s8 tensor in oneDNN or ONNX Runtime reaches -128 (:func:`signed_input_floor`).
        highest_code: The code a value above ``t`` saturates to, when not ``L``: a u8 block
            output Paddle leaves unclipped reaches 255 (:attr:`QuantizedLayer.input_top_code`).
    """
    levels = float(symmetric_levels(bits))
    if axis is not None and threshold.shape[0] > 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        threshold = threshold.reshape(shape)
    scale = threshold / levels
    lowest = 0.0 if unsigned else (-levels if lowest_code is None else float(lowest_code))
    highest = levels if highest_code is None else float(highest_code)
    return grid_codes(x, scale, lowest, highest) * scale


def signed_input_floor(bits: int, onednn: bool) -> int | None:
    """The lowest code of a signed 8-bit activation in the target's runtime, where it is not
    the symmetric grid's ``-127``: oneDNN's s8 quantize (and ONNX Runtime's, whose uint8 zero
    point 128 is the same s8) saturates at -128 (measured on ``x86-vnni``: a Linear reading
    values below ``-t`` was 0.041 off Paddle Inference and ONNX Runtime with -127, 1e-6 with
    -128; attention's score matmul 0.39 and 1e-6). ``None`` elsewhere (Paddle Lite's ARM
    kernels take Paddle's symmetric ``-127..127``; activations below 8 bits)."""
    return -symmetric_levels(bits) - 1 if onednn and bits == 8 else None


def _weight_scales(thresholds: np.ndarray, bits: int, axis: int, ndim: int) -> np.ndarray:
    """Steps ``t / L`` shaped to broadcast over a rank-``ndim`` weight: along ``axis`` for
    per-channel thresholds, over everything for a single one."""
    shape = [1] * ndim
    if np.asarray(thresholds).size > 1:
        shape[axis] = -1
    return (np.asarray(thresholds, dtype=np.float32) / symmetric_levels(bits)).reshape(shape)


def quantize_weight(
    weight: np.ndarray, thresholds: np.ndarray, bits: int, axis: int
) -> np.ndarray:
    """Integer weights ``clip(round(w / t * L), -L, L)`` (int8 for ``bits <= 8``, else int16)."""
    levels = symmetric_levels(bits)
    scales = _weight_scales(thresholds, bits, axis, weight.ndim)
    integers = np.clip(np.round(weight / scales), -levels, levels)
    return integers.astype(np.int8 if bits <= 8 else np.int16)


def onednn_requantizes_conv(
    weight: np.ndarray, thresholds: np.ndarray, bits: int, axis: int, linear_as_conv: bool = False
) -> bool:
    """Whether oneDNN's per-channel requantization of a conv weight (:func:`onednn_conv_weight`)
    changes its symmetric codes: narrower than 8 bits, one threshold for every channel, or a
    non-zero channel whose largest code stays below ``L``. A 2-D weight is a Linear's, which
    runs as a conv only with ``linear_as_conv`` (its output channels on ``axis``, as the 1x1
    filter's)."""
    thresholds = np.asarray(thresholds, np.float32).reshape(-1)
    if weight.ndim <= 2 and not linear_as_conv:
        return False
    if bits < 8 or thresholds.size == 1:
        return True
    return channel_below_edge(weight, thresholds, bits, axis)


def channel_below_edge(weight: np.ndarray, thresholds: np.ndarray, bits: int, axis: int) -> bool:
    """Whether some non-zero output channel (``axis``) of ``weight``'s symmetric codes on the
    grid of ``thresholds`` has no code ``+-L``: oneDNN's per-channel requantization of such a
    channel is no identity, and can hold ties (``k * 127 / m`` for its largest code ``m``)."""
    codes = np.abs(quantize_weight(weight, thresholds, bits, axis)).astype(np.int32)
    largest = codes.max(axis=tuple(a for a in range(codes.ndim) if a != axis))
    return bool(np.any((largest > 0) & (largest < symmetric_levels(bits))))


def onednn_conv_weight(weight: np.ndarray, axis: int, halved: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The int8 weight Paddle Inference's oneDNN conv runs for a dequantized conv weight.

    Like the fc (:func:`paddle_fc_weight`), the conv's weight scales are recomputed from the
    dequantized weight: per output channel (``axis``) abs-max, ``w * 127 / max`` rounded half
    to even. A no-op for 8-bit weights (the abs-max is the threshold); weights on a narrower
    grid (``bits < 8``) run as this 8-bit rounding of their values.

    With ``halved``, the conv reads a signed (s8) input on a CPU without VNNI, where oneDNN's
    AVX2 kernels multiply the weight's scale by 0.5 before rounding (:mod:`imperative_ptq.halved_convs`):
    ``rint(0.5 * (w * 127 / max))`` in float32, codes ``-64..64`` on thresholds ``2 * max``.
    Odd 8-bit codes (and every channel's largest value, ``63.5``) sit on half codes there, which
    the float32 roundings of that product decide; computed here in the same order, measured
    equal to Paddle Inference on a Zen 3 EPYC (dense, depthwise and grouped convs).

    Returns:
        ``(integers, thresholds)`` with ``integers * thresholds / 127`` the weight that runs.
    """
    weight = np.asarray(weight, dtype=np.float32)
    reduce = tuple(a for a in range(weight.ndim) if a != axis)
    thresholds = np.abs(weight).max(axis=reduce)
    shape = [1] * weight.ndim
    shape[axis] = -1
    multipliers = _requantization_multipliers(thresholds).reshape(shape)
    scaled = (weight * multipliers).astype(np.float32)
    if halved:
        integers = np.rint(np.float32(0.5) * scaled).astype(np.int8)
        thresholds = (np.float32(2) * thresholds).astype(np.float32)
    else:
        integers = np.clip(np.rint(scaled), -128, 127).astype(np.int8)
    return integers, np.where(thresholds > 0, thresholds, np.float32(MIN_WEIGHT_THRESHOLD))


def halved_max_codes(thresholds: np.ndarray) -> np.ndarray:
    """The halved code (63 or 64) that oneDNN's AVX2 kernels give each channel's abs-max when a
    conv's stored thresholds are ``thresholds`` (the abs-max's code 127 dequantizes to the
    threshold itself): :func:`onednn_conv_weight` with ``halved`` on that one value."""
    thresholds = np.asarray(thresholds, np.float32).reshape(-1)
    return onednn_conv_weight(thresholds.reshape(-1, 1), 0, halved=True)[0].reshape(-1)


#: float32 steps a halved conv's weight threshold moves at most (:func:`steered_thresholds`).
STEERING_STEPS = 64


def steered_thresholds(
    thresholds: np.ndarray, target: np.ndarray, factor: np.ndarray | float = 1.0
) -> np.ndarray | None:
    """Per-channel ``thresholds`` moved by the fewest float32 steps (at most
    :data:`STEERING_STEPS`, up or down) for which :func:`halved_max_codes` of
    ``thresholds * factor`` (float32) is ``target``; ``None`` if a channel has none.

    A halved conv's abs-max halves to ``rint(63.5 +- noise)`` (:func:`onednn_conv_weight`), the
    noise of float32 arithmetic on its stored threshold: 64 for about 4 thresholds in 5. The
    simulation takes its thresholds where it is 64, and the export, which scales them (the
    relu6 route of :mod:`imperative_ptq.export.unsigned`), keeps it 64 the same way; a few
    float32 steps move the weights by float32 noise only."""
    thresholds = np.asarray(thresholds, np.float32).reshape(-1)
    factor = np.asarray(factor, np.float32)
    target = np.broadcast_to(np.asarray(target), thresholds.shape)
    steered = thresholds.copy()
    pending = np.ones(thresholds.shape, bool)
    up, down = thresholds.copy(), thresholds.copy()
    for step in range(STEERING_STEPS + 1):
        for candidate in ((up,) if step == 0 else (up, down)):
            keeps = pending & (halved_max_codes((candidate * factor).astype(np.float32)) == target)
            steered[keeps] = candidate[keeps]
            pending &= ~keeps
        if not pending.any():
            return steered
        up = np.nextafter(up, np.float32(np.inf)).astype(np.float32)
        down = np.nextafter(down, np.float32(0)).astype(np.float32)
    return None


def halved_grid_integers(
    integers: np.ndarray, weight: np.ndarray, thresholds: np.ndarray, axis: int
) -> np.ndarray:
    """8-bit weight codes whose halving (:func:`onednn_conv_weight` with ``halved``) is the
    nearest 7-bit rounding of ``weight``: even codes ``2 * rint(w / (2 t / 127))`` up to
    ``126``, and ``127`` kept where ``integers`` has it (each channel's abs-max, which makes
    Paddle's recomputed scale the threshold's; its halving, ``63.5``, is a tie either way).
    A channel without a code of 127 (its largest value below its threshold: Paddle rescales
    it) keeps ``integers``. Rounding to 8 bits and then halving moved every odd code a whole
    8-bit step the way float32 noise sends it: 1.3x the 7-bit rounding error on average."""
    levels = symmetric_levels(8)
    scales = _weight_scales(thresholds, 8, axis, weight.ndim)
    even = (2 * np.clip(np.rint(weight / (2 * scales)), -(levels // 2), levels // 2)).astype(np.int16)
    even = np.where(np.abs(integers) == levels, integers.astype(np.int16), even)
    reduce = tuple(a for a in range(integers.ndim) if a != axis)
    full = (np.abs(integers) == levels).any(axis=reduce, keepdims=True)
    return np.where(full, even, integers).astype(integers.dtype)


def stored_weight_integers(
    weight: np.ndarray, thresholds: np.ndarray, bits: int, axis: int, fc: bool
) -> np.ndarray:
    """The symmetric weight codes ``convert`` stores (and QAT's training forward derives):
    nearest rounding, and for a Paddle fc (``fc``) the tied codes moved
    (:func:`untied_fc_integers`). A halved conv's are :func:`halved_integers`."""
    integers = quantize_weight(weight, thresholds, bits, axis)
    return untied_fc_integers(integers, weight, thresholds, bits, axis) if fc else integers


def halved_integers(
    weight: np.ndarray, thresholds: np.ndarray, bits: int, axis: int, norm_factor: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """A halved conv's weight codes and per-channel thresholds (:mod:`imperative_ptq.halved_convs`):
    the thresholds steered so that each channel's abs-max halves to 64
    (:func:`steered_thresholds`, with the folded BatchNorm's ``norm_factor``; unchanged where
    some channel has no such value within reach), and 8-bit codes on them even
    (:func:`halved_grid_integers`). What ``convert`` and QAT's training forward compute with
    (through :func:`runtime_weight` with ``halved``)."""
    channels = weight.shape[axis]
    per_channel = np.broadcast_to(np.asarray(thresholds, np.float32).reshape(-1), [channels]).copy()
    factor = 1.0 if norm_factor is None else np.abs(np.asarray(norm_factor, np.float32))
    steered = steered_thresholds(per_channel, 64, factor)
    thresholds = per_channel if steered is None else steered
    integers = quantize_weight(weight, thresholds, bits, axis)
    if bits == 8:
        integers = halved_grid_integers(integers, weight, thresholds, axis)
    return integers, thresholds


def folded_thresholds(thresholds: np.ndarray, norm_factor: np.ndarray) -> np.ndarray:
    """The per-channel thresholds a halved conv's codes are stored on once a BatchNorm of
    factor ``norm_factor`` is folded into it: ``t * |f|`` in float32, the one computation the
    simulation (:func:`runtime_weight`) and the export (:mod:`imperative_ptq.export.folded_norms`)
    must share bit for bit, since the halving's ties follow those values."""
    factor = np.abs(np.asarray(norm_factor, np.float32).reshape(-1))
    return (np.asarray(thresholds, np.float32).reshape(-1) * factor).astype(np.float32)


def runtime_weight(
    integers: np.ndarray, thresholds: np.ndarray, bits: int, axis: int, fc: bool,
    halved: bool = False, norm_factor: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The weight Paddle Inference's oneDNN kernels run for weight codes stored on the grid of
    ``thresholds`` (a fc's, :func:`paddle_fc_weight`, or a conv's, :func:`onednn_conv_weight`,
    ``halved`` for a signed input on AVX2 kernels).

    ``norm_factor``: a BatchNorm's per-channel factor folded into a halved conv's stored weight
    (the export stores codes ``integers * sign(f)`` on :func:`folded_thresholds`,
    :mod:`imperative_ptq.export.folded_norms`); the weight returned is the folded one that
    runs divided by ``f``, for the BatchNorm after it to multiply back.

    Returns:
        ``(weight, thresholds)``: the float32 weight that runs and its thresholds (its codes
        ``weight / thresholds * 127`` are whole numbers, ``-64..64`` where ``halved``).
    """
    if norm_factor is not None:
        factor = np.asarray(norm_factor, np.float32).reshape(-1)
        shape = [1] * integers.ndim
        shape[axis] = -1
        integers = (integers.astype(np.int16) * np.sign(factor).reshape(shape).astype(np.int16)).astype(integers.dtype)
        thresholds = folded_thresholds(thresholds, factor)
    dequantized = _stored_dequantized(integers, thresholds, bits, axis)
    if fc:
        runtime_integers, thresholds = paddle_fc_weight(dequantized)
        weight = runtime_integers.astype(np.float32) * (thresholds / np.float32(127))
        return weight.astype(np.float32), thresholds
    runtime_integers, thresholds = onednn_conv_weight(dequantized, axis, halved=halved)
    shape = [1] * dequantized.ndim
    shape[axis] = -1
    weight = runtime_integers.astype(np.float32) * (thresholds / np.float32(127)).reshape(shape)
    if norm_factor is not None:
        weight = weight / factor.reshape(shape)
        thresholds = thresholds / np.abs(factor)
    return weight.astype(np.float32), thresholds.astype(np.float32)


def stored_per_tensor(shape: Sequence[int]) -> bool:
    """Whether the Paddle export stores a weight of ``shape`` on one per-tensor threshold, on
    every target: a square 2-D weight. Paddle's quant_dequant_mkldnn_pass guesses the channel
    axis of a 2-D weight from the number of scales and, for a square ``[in, out]`` weight,
    applies them per input row (measured: logit cosine 0.49 on a 100x100 Linear); one
    per-tensor threshold is read the same way on every axis."""
    return len(shape) == 2 and shape[0] == shape[1]


def stored_weight_thresholds(
    thresholds: np.ndarray, shape: tuple[int, ...], axis: int, factor: float = 1.0
) -> np.ndarray:
    """The per-output-channel thresholds the Paddle export stores a weight of ``shape`` with,
    its calibrated ``thresholds`` multiplied by ``factor`` in float32 (the u8 routes of
    :mod:`imperative_ptq.export.unsigned` scale weights; :func:`stored_per_tensor`)."""
    thresholds = np.asarray(thresholds, dtype=np.float32).reshape(-1) * np.float32(factor)
    if stored_per_tensor(shape) and np.ptp(thresholds) > 0:
        thresholds = np.full_like(thresholds, thresholds.max())
    if thresholds.size == 1:
        thresholds = np.full([shape[axis]], thresholds[0], dtype=np.float32)
    return thresholds


def _stored_dequantized(integers: np.ndarray, thresholds: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """The float32 weight Paddle's quant_dequant pass computes from stored weight codes."""
    thresholds = np.asarray(thresholds, np.float32).reshape(-1)
    scales = _weight_scales(thresholds, bits, axis, integers.ndim)
    return _dequantized(integers, _stored_scales(thresholds, bits).reshape(scales.shape))


def _stored_scales(thresholds: np.ndarray, bits: int) -> np.ndarray:
    """The scales the export stores for weight thresholds: ``t * 127 / L`` in float32."""
    levels = symmetric_levels(bits)
    return (np.asarray(thresholds, np.float32).reshape(-1) * np.float32(127 / levels)).astype(np.float32)


def _dequantized(codes: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """Paddle's quant_dequant pass on stored codes: float32(code / 127.0) times the stored
    scale, in float32. Its requantization's rounding ties (a code k = m / 2 of a channel whose
    largest code m is even) go the way those float32 values send them (measured: a 6-bit
    per-tensor square Linear was 0.4-0.8% off with the product taken in float64 instead)."""
    return ((codes.astype(np.float64) / 127.0).astype(np.float32) * stored).astype(np.float32)


def _requantization_multipliers(largest: np.ndarray) -> np.ndarray:
    """oneDNN's requantization multipliers ``127 * (1 / max)`` in float32 (1 / 1 for a zero
    max), the order of operations its reorder takes."""
    return np.float32(127) * (np.float32(1) / np.where(largest > 0, largest, np.float32(1)))


def fc_runtime_integers(integers: np.ndarray, thresholds: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """The int8 codes Paddle Inference's oneDNN fc runs for ``[in, out]`` weight codes stored
    with ``thresholds`` (:func:`paddle_fc_weight` of their dequantized values). Scaling the
    stored thresholds by a factor scales the runtime weight by it only where these codes stay
    the same: the float32 roundings of the recomputation can flip a value lying next to a half
    code."""
    return paddle_fc_weight(_stored_dequantized(integers, thresholds, bits, axis))[0]


#: Values of a fc's weight recomputation farther than this from a half code keep their code
#: under any scaling of the stored thresholds: float32 rounding moves them by at most ~5e-5
#: (six float32 steps relative, on values up to 128).
_TIE_MARGIN = np.float32(1e-3)
#: Values of a run within this relative distance of its abs-max may become its abs-max under
#: such a scaling (rounding moves them by ~4e-7, relative).
_MAX_MARGIN = 1e-5


class FcRecomputation:
    """Whether scaling the stored thresholds of a fc's ``[in, out]`` weight codes keeps the int8
    codes Paddle Inference derives from them (:func:`fc_runtime_integers`), checked where it
    can change: only the values within :data:`_TIE_MARGIN` of a half code, and each run's
    abs-max, differ by more than float32 rounding between two scalings (the recomputation
    ``w * 127 / max`` is invariant to a common factor in exact arithmetic), so only those are
    recomputed for each scaling.

    Args:
        integers: The stored ``[in, out]`` codes.
        thresholds: Their per-output-channel thresholds as stored unscaled.
        bits: The codes' bit width.
        axis: The output-channel axis (1).
    """

    def __init__(self, integers: np.ndarray, thresholds: np.ndarray, bits: int, axis: int) -> None:
        self.integers, self.bits, self.axis = integers, bits, axis
        dequantized = _stored_dequantized(integers, thresholds, bits, axis)
        inputs, outputs = dequantized.shape
        runs = np.abs(dequantized.reshape(outputs, inputs))
        largest = runs.max(axis=1)
        values = dequantized * _requantization_multipliers(largest)[None, :]
        near = np.abs(values - np.floor(values) - np.float32(0.5)) < _TIE_MARGIN
        self.rows, self.columns = np.nonzero(near)
        self.kept = np.clip(np.rint(values[near]), -128, 127)
        run, position = np.nonzero(runs >= largest[:, None] * np.float32(1 - _MAX_MARGIN))
        flat = run * inputs + position
        self.max_rows, self.max_columns, self.max_runs = flat // outputs, flat % outputs, run

    def keeps_codes(self, scaled_thresholds: np.ndarray) -> bool:
        """Whether the codes stored with ``scaled_thresholds`` recompute to the unscaled ones."""
        if self.rows.size == 0:
            return True
        stored = _stored_scales(scaled_thresholds, self.bits)
        largest = np.zeros(self.integers.shape[1], np.float32)
        maxima = _dequantized(self.integers[self.max_rows, self.max_columns], stored[self.max_columns])
        np.maximum.at(largest, self.max_runs, np.abs(maxima))
        values = (
            _dequantized(self.integers[self.rows, self.columns], stored[self.columns])
            * _requantization_multipliers(largest)[self.columns]
        )
        return bool(np.array_equal(np.clip(np.rint(values), -128, 127), self.kept))


def untied_fc_integers(
    integers: np.ndarray, weight: np.ndarray, thresholds: np.ndarray, bits: int, axis: int
) -> np.ndarray:
    """``[in, out]`` fc weight codes stored on one threshold, with every code that Paddle's
    recomputation (:func:`fc_runtime_integers`) puts exactly on a half code moved one code
    towards ``weight``.

    The fc takes output channel ``j``'s scale from the largest code ``m`` of the ``j``-th run
    of ``in`` consecutive elements (:func:`paddle_fc_weight`); on one threshold (square
    weights, per-tensor calibration) a code ``c`` of column ``j`` then recomputes to exactly
    ``127 c / m``: a half code for ``c = m / 2`` of an even ``m``, whose side float32 noise
    picks, and a scaling of the stored threshold (the u8 route of
    :func:`imperative_ptq.export.unsigned.clip_fused_relus`) picks another. ``c +- 1`` lies
    ``127 / m`` codes away from it, where no rounding reaches; a moved code that is its own
    run's largest changes another column's ``m``, so the test repeats until no code is tied.
    Those codes are few (60 of 10,000 of a trained square 100 x 100 layer) and move by one
    step. Per-channel thresholds give no exact half codes: their codes are returned as they
    are.

    Args:
        integers: The codes rounded from ``weight``.
        weight: The fp32 weight.
        thresholds: The thresholds the codes are stored with (one, or one per output channel).
        bits: Weight bit width.
        axis: The output-channel axis (1).

    Returns:
        The codes (the same array where none moves).
    """
    thresholds = np.asarray(thresholds, dtype=np.float32).reshape(-1)
    if np.ptp(thresholds) > 0:
        return integers
    codes = integers.astype(np.int64)
    steps = weight / _weight_scales(thresholds, bits, axis, weight.ndim)
    direction = np.where(steps > codes, 1, -1)  # towards the fp32 value (down on it)
    moved = False
    # A moved code can be its run's largest and so change another column's m: a few rounds.
    for _ in range(_UNTIE_ROUNDS):
        tied = _half_code_ties(codes)
        if not tied.any():
            break
        codes = codes + np.where(tied, direction, 0)
        moved = True
    return codes.astype(integers.dtype) if moved else integers


#: Rounds of :func:`untied_fc_integers` (measured on 80 square weights of 16 to 384 rows with
#: e^N(0,1) column spreads: 2,422 ties, 22 left after one round, none after two).
_UNTIE_ROUNDS = 4


def _half_code_ties(codes: np.ndarray) -> np.ndarray:
    """Which ``[in, out]`` codes on one threshold Paddle's fc recomputes to exactly a half code:
    ``2 * 127 |c| / m`` an odd integer, ``m`` the largest code of the column's run."""
    inputs, outputs = codes.shape
    largest = np.maximum(np.abs(codes.reshape(outputs, inputs)).max(axis=1), 1)[None, :]
    doubled = 2 * 127 * np.abs(codes)
    return (doubled % largest == 0) & ((doubled // largest) % 2 == 1)


def paddle_fc_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The int8 weight Paddle Inference's oneDNN fc really runs for a ``[in, out]`` weight.

    Paddle 3.3.1 dequantizes the exported weight to fp32 and recomputes its scales: its
    ``compute_propagate_scales_onednn_pass`` takes the scale of output channel ``i`` from the
    abs-max of the ``i``-th run of ``in`` consecutive elements of the row-major weight (rows,
    not column ``i``), and oneDNN's reorder rounds ``w * 127 / scale`` half to even and
    saturates it into s8. Measured on single Linear layers of four shapes: relative output
    error 1e-7 against this model, 2e-3 to 5e-3 against the column abs-max it means to take.

    Args:
        weight: The dequantized ``[in, out]`` weight the program holds.

    Returns:
        ``(integers, thresholds)``: int8 ``[in, out]`` and one threshold per output channel,
        with ``integers * thresholds / 127`` the weight that runs.
    """
    weight = np.asarray(weight, dtype=np.float32)
    inputs, outputs = weight.shape
    thresholds = np.abs(weight.reshape(outputs, inputs)).max(axis=1)
    integers = np.clip(np.rint(weight * _requantization_multipliers(thresholds)[None, :]), -128, 127).astype(np.int8)
    return integers, np.where(thresholds > 0, thresholds, np.float32(MIN_WEIGHT_THRESHOLD))


#: A Linear runs as a 1x1 conv in the oneDNN targets once the weight Paddle's fc derives
#: (:func:`paddle_fc_weight`) is further from the fp32 weight than per-channel rounding puts it
#: by more than this fraction of the weight's L2 norm (``float("inf")``: every Linear a fc).
#: Below it, 8-bit activations add more error than the fc's weight: measured on Gaussian
#: weights with ReLU inputs, output error 3-8% either way (``benchmarks/linear_as_conv.py``).
FC_WEIGHT_ERROR_LIMIT = 0.04

#: Largest input rank of a Linear that Paddle Inference runs as an int8 fc (beyond it the fc
#: runs fp32, and the Paddle export runs the Linear as a 1x1 conv instead).
MAX_FC_INPUT_RANK = 3


def linear_runs_as_conv(weight: np.ndarray, thresholds: np.ndarray, bits: int, axis: int) -> bool:
    """Whether a Linear exported for Paddle Inference's oneDNN int8 pipeline runs as a 1x1 conv
    rather than as its fc.

    The fc derives the scales of a ``[in, out]`` weight from runs of consecutive elements
    instead of its columns (:func:`paddle_fc_weight`) and, for a square weight, takes one
    threshold for all channels; a 1x1 conv takes each output channel's own
    (:func:`onednn_conv_weight`). The conv costs its two reshapes (measured on the Zen 3 EPYC,
    one thread, ``benchmarks/linear_as_conv.py``: 1.1-1.5x the fc's time), so it is chosen only
    where the fc's weight adds more than :data:`FC_WEIGHT_ERROR_LIMIT` of the weight's norm to
    the conv's error (relative errors measured, fc / conv: a CTC-like head of 6625 classes with
    uneven columns 0.125 / 6.4e-3; Gaussian weights 2.4e-2 / 7.3e-3 at 384 x 384 and 1.5e-2 /
    8.1e-3 at 1536 x 384, which stay fc; 0.10 / 6.7e-3 at 64 x 10; 4-bit weights of a head with
    uneven columns 0.29 / 0.09).

    Args:
        weight: The fp32 ``[in, out]`` weight.
        thresholds: Its calibrated thresholds (one, or one per output channel).
        bits: Weight bit width.
        axis: The output-channel axis (1).
    """
    weight = np.asarray(weight, dtype=np.float32)
    thresholds = np.asarray(thresholds, dtype=np.float32).reshape(-1)
    if weight.ndim != 2 or not np.any(weight):
        return False
    conv_weight, _ = runtime_weight(quantize_weight(weight, thresholds, bits, axis), thresholds, bits, axis, fc=False)
    if stored_per_tensor(weight.shape):
        thresholds = np.full_like(thresholds, thresholds.max())
    fc_weight, _ = runtime_weight(quantize_weight(weight, thresholds, bits, axis), thresholds, bits, axis, fc=True)
    added = float(np.linalg.norm(fc_weight - weight)) - float(np.linalg.norm(conv_weight - weight))
    return added > FC_WEIGHT_ERROR_LIMIT * float(np.linalg.norm(weight))


#: Threshold of an all-zero channel (any positive value represents its zeros exactly).
MIN_WEIGHT_THRESHOLD = 1e-30


def zero_channel_thresholds(weight: np.ndarray, thresholds: np.ndarray, axis: int) -> np.ndarray:
    """``thresholds`` with each all-zero channel's (a pruned filter's) raised to the largest.

    Any threshold represents a channel of zeros, but a runtime adds the channel's bias on the
    grid of input x weight scale (ONNX Runtime in int32, ``QLinearConv``): on the tiny
    threshold calibration gives such a channel, the bias is billions of steps and saturates
    (measured: a conv with two pruned filters read by a ReLU6 written as ``paddle.clip``,
    ONNX Runtime 0.43 of the largest output off the simulation on every input; MediaPipe's
    hand landmark model has 26 convs with pruned filters)."""
    if thresholds.size <= 1:
        return thresholds
    reduced = tuple(dim for dim in range(weight.ndim) if dim != axis % weight.ndim)
    zero = np.abs(weight).max(axis=reduced) == 0
    if not zero.any() or zero.all():
        return thresholds
    return np.where(zero, thresholds.max(), thresholds).astype(thresholds.dtype)


def conv_bias_added_fast(layer: paddle.nn.Layer, x: paddle.Tensor) -> bool:
    """Whether :func:`biased_conv2d` computes ``layer(x)``: a plain ``nn.Conv2D`` with a
    bias, zero padding and NCHW data, no hooks of its own, in a dygraph forward (a trace
    records the layer's own ops)."""
    return (
        type(layer) is paddle.nn.Conv2D and layer.bias is not None and paddle.in_dynamic_mode()
        and layer._padding_mode == "zeros" and layer._data_format == "NCHW"
        and not layer._forward_pre_hooks and not layer._forward_post_hooks and not x.is_dist()
    )


def biased_conv2d(layer: paddle.nn.Conv2D, x: paddle.Tensor) -> paddle.Tensor:
    """``layer(x)`` (see :func:`conv_bias_added_fast`) with the bias added as ``[C, 1, 1]``:
    Paddle adds it as ``[1, C, 1, 1]``, whose broadcast kernel took 48 ms on an
    ``[8, 96, 112, 112]`` output against 19 ms (the same float additions; a biased conv 1.8x
    its cost without a bias). Every conv of a model converted from ONNX has a bias (its
    BatchNorm folded), and bias correction gives each conv one."""
    output = paddle.nn.functional.conv._conv_nd(
        x, layer.weight, bias=None, stride=layer._stride, padding=layer._updated_padding,
        padding_algorithm=layer._padding_algorithm, dilation=layer._dilation, groups=layer._groups,
        data_format=layer._data_format, channel_dim=layer._channel_dim, op_type=layer._op_type,
        use_cudnn=layer._use_cudnn,
    )
    return output + layer.bias.reshape([-1, 1, 1])


class WrappedParameters:
    """``weight`` and ``bias`` of the wrapped layer (``self.layer``), as Paddle's own quantized
    layers expose them: models read them in their forward (PaddleNLP's BERT and ERNIE cast
    their attention mask to ``self.pooler.dense.weight.dtype``)."""

    layer: paddle.nn.Layer

    @property
    def weight(self) -> paddle.Tensor | None:
        return getattr(self.layer, "weight", None)

    @property
    def bias(self) -> paddle.Tensor | None:
        return getattr(self.layer, "bias", None)


class QuantizedLayer(WrappedParameters, paddle.nn.Layer):
    """A simulated-quant layer with frozen thresholds.

    Args:
        layer: The original layer (owned by the quantized model; its weight is replaced by the
            fake-quantized weight).
        input_thresholds: One threshold per input position.
        weight_thresholds: Per-channel (length = channels on ``weight_axis``) or one value.
        output_thresholds: Output thresholds, kept for export.
        weight_axis: Output-channel axis of the weight.
        activation_bits: Bit width of activations.
        weight_bits: Bit width of weights.
        input_scale: Affine input quantization (``symmetric=False`` calibration): the input
            is fake-quantized on ``[0, 2**activation_bits - 1]`` with this scale and
            ``input_zero_point`` instead of symmetrically with its threshold.
        input_zero_point: Zero point that goes with ``input_scale``.
        weight_scales: Affine weight quantization: scales (one, or one per channel) used with
            ``weight_zero_points`` on ``[0, 2**weight_bits - 1]`` instead of the thresholds.
        weight_zero_points: Zero points that go with ``weight_scales``.
        input_unsigned: The input is non-negative and runs as u8 in the deployment target
            (:mod:`imperative_ptq.targets`): it is quantized on ``0..L`` only.
        input_shifted: The input is signed and runs as u8 after a shift
            (:mod:`imperative_ptq.shifted_input`): ``input_scale`` and ``input_zero_point``
            describe its affine grid on ``0..M`` (``M = 127`` for 8 bits).
        paddle_fc_scales: The layer is a Linear that runs as Paddle Inference's oneDNN fc: it
            computes with the weight that fc derives from the exported one
            (:func:`paddle_fc_weight`); :attr:`program_weight` and
            :attr:`program_weight_thresholds` keep what the Paddle program stores.
        onednn_weights: The layer runs in Paddle Inference's oneDNN int8 pipeline: a conv
            with weights narrower than 8 bits, or with one threshold for all channels, computes
            with their per-channel 8-bit requantization (:func:`onednn_conv_weight`);
            :attr:`program_weight` keeps the stored one.
        may_run_as_conv: With ``paddle_fc_scales``, the model's head (a Linear or functional
            matmul site, the last layer with a weight, whose output no int8 layer reads: its
            weight's error reaches the output unmixed, and a conv inside a chain of Linear
            layers costs more than the fc's error; measured, a 784-100-100-10 MLP as three
            convs 1.6x slower at batch 64, a BERT-shaped encoder with all 37 as convs 1.2x)
            runs as a 1x1 conv where the fc would damage its weight (:attr:`runs_as_conv`).
        must_run_as_conv: With ``paddle_fc_scales``, a Linear that Paddle Inference has no
            int8 fc for (its input has rank > 3: ConvNeXt's channels-last pointwise layers)
            runs as a 1x1 conv whatever the fc would do to its weight.
        halved_weights: With ``onednn_weights``, a conv reading a signed (s8) input on AVX2
            kernels, which halve its weight to 7 bits (:func:`onednn_conv_weight`,
            :mod:`imperative_ptq.halved_convs`).
        norm_factor: With ``halved_weights``, the per-channel factor of the BatchNorm after
            the conv, which the export folds into the conv's stored weight (the halving then
            rounds the folded values: :func:`runtime_weight`).

    Attributes:
        weight_thresholds: Thresholds of the weight the layer computes with.
        program_weight: With ``paddle_fc_scales``, the fp32 weight the Paddle program stores
            (whose fc then computes with this layer's weight); else ``None``.
        program_weight_thresholds: Its thresholds.
        runs_as_conv: With ``paddle_fc_scales`` asked for, ``must_run_as_conv``, or
            ``may_run_as_conv`` and the fc's weight would be far from the layer's own
            (:func:`linear_runs_as_conv`): the layer
            computes with its per-channel weight and the Paddle export runs it as a 1x1 conv
            (:mod:`imperative_ptq.export.linear_as_conv`).
        bias_correction: What bias correction added to the layer's bias, per channel
            (``None``: nothing), so the fp32 layer it came from is still recognized.
        constant_inputs: Fingerprints (:mod:`imperative_ptq.fingerprint`) of the inputs some
            calls read unchanged in every calibration forward (a parameter, for a Linear also
            called on activations): those calls run in float, as the runtimes fold them into
            fp32 constants. Set by ``convert``.
        input_top_code: With ``input_unsigned``, the largest code of the input: ``L``, or 255
            for a ReLU output after a residual conv, which Paddle Inference leaves unclipped
            (:mod:`imperative_ptq.export.unsigned`). Set by ``convert``.
        input_call_tops: ``None``, or that code per call of a layer called more than once in
            a forward whose calls read different inputs (a conv of a residual block called
            again on the block's output: ``L`` for the block's input, 255 for its output;
            :mod:`imperative_ptq.forward_calls`); :attr:`input_top_code` is then the largest.
            Set by ``convert``.
        residual_codes: ``0``, or the largest code of this layer's u8 input as the residual
            of a fused int8 conv after it reads it (an identity shortcut,
            :mod:`imperative_ptq.quant_residual`): :meth:`forward` first replaces that
            tensor's values, in place, by its codes up to this one, which the add reads later.
            Set by ``convert``.
        residual_source: With ``residual_codes``, the name of the layer that wrote that
            tensor (QAT quantizes its output instead); ``""`` for a tensor no hooked layer
            wrote (an ``F.relu`` output). Set by ``convert``.
        residual_output_threshold: ``None``, or the threshold of the s8 codes this conv writes
            its output on because the output is read only as the residual of a fused int8
            conv (a projection shortcut with its BatchNorm folded into the conv, as in models
            converted from ONNX; :func:`~imperative_ptq.quant_residual.residual_output_codes`).
            Set by ``convert``.
        residual_fused_with: With ``residual_output_threshold``, the name of the layer whose
            output is the add's other operand (see
            :class:`~imperative_ptq.quant_residual.QuantizedResidualOutput`).
    """

    def __init__(
        self,
        layer: paddle.nn.Layer,
        input_thresholds: Sequence[float],
        weight_thresholds: Sequence[float],
        output_thresholds: Sequence[float],
        weight_axis: int,
        activation_bits: int = 8,
        weight_bits: int = 8,
        input_scale: float | None = None,
        input_zero_point: int | None = None,
        weight_scales: Sequence[float] | None = None,
        weight_zero_points: Sequence[int] | None = None,
        input_unsigned: bool = False,
        paddle_fc_scales: bool = False,
        onednn_weights: bool = False,
        input_shifted: bool = False,
        may_run_as_conv: bool = False,
        must_run_as_conv: bool = False,
        halved_weights: bool = False,
        norm_factor: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        if input_shifted and (input_scale is None or input_zero_point is None):
            raise ValueError("input_shifted needs input_scale and input_zero_point")
        self.input_unsigned = bool(input_unsigned)
        self.input_shifted = bool(input_shifted)
        #: The lowest code of the (signed) input in the runtime (``None``: ``-L``).
        self.input_floor = signed_input_floor(activation_bits, onednn_weights)
        self.residual_codes = 0
        self.residual_source = ""
        self.residual_output_threshold: float | None = None
        self.residual_fused_with = ""
        #: ReLUs reading the residual sum fused into this conv (ResidualSumOutput): a plain
        #: list, not sublayers, so they stay where the model holds them.
        self.sum_outputs: list = []
        self.input_top_code = symmetric_levels(activation_bits)
        self.input_call_tops: PerCallTopCodes | None = None
        #: Fingerprints (:mod:`imperative_ptq.fingerprint`) of inputs computed from parameters
        #: only, which calibration saw some calls read unchanged: the runtimes fold those calls
        #: into fp32 constants, so this layer computes them unquantized. Set by ``convert``.
        self.constant_inputs: list[Fingerprint] = []
        self.program_weight: np.ndarray | None = None
        #: What bias correction added to the layer's bias (``None``: nothing).
        self.bias_correction: np.ndarray | None = None
        #: With ``norm_factor``, the name of the BatchNorm folded into the conv (``convert``).
        self.folded_norm = ""
        #: What ``convert`` added to the conv's own bias to put it on ONNX Runtime's int32 grid
        #: (:mod:`imperative_ptq.bias_grid`; ``None``: nothing), so the fp32 layer it came
        #: from is still recognized.
        self.bias_on_grid: np.ndarray | None = None
        self.program_weight_thresholds: np.ndarray | None = None
        self.input_scale = input_scale
        self.input_zero_point = input_zero_point
        self.weight_scales = None if weight_scales is None else [float(s) for s in weight_scales]
        self.weight_zero_points = (
            None if weight_zero_points is None else [int(z) for z in weight_zero_points]
        )
        self.layer = layer
        self.weight_axis = weight_axis
        self.activation_bits = activation_bits
        self.weight_bits = weight_bits
        self.input_thresholds = [float(t) for t in input_thresholds]
        self.output_thresholds = [float(t) for t in output_thresholds]
        weight = layer.weight
        weight_thresholds = zero_channel_thresholds(
            weight.numpy(), np.asarray(weight_thresholds, dtype=np.float32).reshape(-1), weight_axis
        )
        paddle_fc_scales = paddle_fc_scales and weight_scales is None and weight.ndim == 2
        self.runs_as_conv = bool(
            paddle_fc_scales and isinstance(layer, paddle.nn.Linear)
            and (
                must_run_as_conv
                or may_run_as_conv
                and linear_runs_as_conv(weight.numpy(), weight_thresholds, weight_bits, weight_axis)
            )
        )
        if self.runs_as_conv:
            paddle_fc_scales = False
        #: The weight runs on one threshold, the largest of its calibrated ones: a square 2-D
        #: weight, which the Paddle export stores per tensor on every target (see
        #: export.weight_ops.int8_weight; on ``arm`` the simulation kept per-channel ones, and
        #: the program's weight was 42% of the output off it on a Linear's small channels).
        self.shared_weight_threshold = bool(
            stored_per_tensor(weight.shape) and weight_thresholds.size > 1
            and weight_scales is None and not self.runs_as_conv
        )
        if self.shared_weight_threshold:
            weight_thresholds = np.full_like(weight_thresholds, weight_thresholds.max())
        self.paddle_fc_scales = paddle_fc_scales
        # Paddle requantizes a conv's weight per output channel from its largest value: an
        # identity for per-channel 8-bit codes reaching +-127, not for narrower grids nor for
        # one threshold shared by all channels (measured: 1.9% relative output error on a
        # small conv net with per-tensor 8-bit weights before it was simulated), nor for a
        # channel whose weights shrank below its threshold (a table applied to other weights,
        # QAT's fine-tuned ones).
        self.onednn_weights = bool(onednn_weights)
        self.halved_weights = bool(halved_weights and self.onednn_weights and weight_scales is None)
        self.norm_factor = (
            None if norm_factor is None or not self.halved_weights
            else np.asarray(norm_factor, np.float32).reshape(-1)
        )
        self.requantized_conv = (
            self.onednn_weights and weight_scales is None
            and (
                self.halved_weights
                or onednn_requantizes_conv(
                    weight.numpy(), weight_thresholds, weight_bits, weight_axis, linear_as_conv=self.runs_as_conv
                )
            )
        )
        self.register_buffer("weight_thresholds", paddle.to_tensor(weight_thresholds))
        with paddle.no_grad():
            original = weight.numpy()
            if self.weight_scales is None and self.halved_weights:
                integers, weight_thresholds = halved_integers(
                    original, weight_thresholds, weight_bits, weight_axis, self.norm_factor
                )
                self.set_weight_integers(integers, weight_thresholds)
            elif self.weight_scales is None:
                integers = stored_weight_integers(
                    original, weight_thresholds, weight_bits, weight_axis, paddle_fc_scales
                )
                self.set_weight_integers(integers, weight_thresholds)
            else:
                # Affine weights (symmetric=False weight calibration).
                per_channel = len(self.weight_scales) > 1
                weight.set_value(
                    fake_quantize(
                        original,
                        self.weight_scales if per_channel else self.weight_scales[0],
                        self.weight_zero_points if per_channel else self.weight_zero_points[0],
                        0,
                        affine_levels(weight_bits),
                        axis=weight_axis if per_channel else None,
                    )
                )
        self.register_buffer(
            "input_threshold",
            paddle.to_tensor(np.asarray(self.input_thresholds[:1], dtype=np.float32)),
        )

    @property
    def grid_thresholds(self) -> np.ndarray:
        """Thresholds of the symmetric weight grid the layer's integers live on (those the
        program stores, before a Paddle fc re-derives its own)."""
        if self.program_weight_thresholds is not None:
            return np.asarray(self.program_weight_thresholds, dtype=np.float32)
        return self.weight_thresholds.numpy().astype(np.float32)

    def set_weight_integers(self, integers: np.ndarray, thresholds: np.ndarray | None = None) -> None:
        """Sets the weight to ``integers * t / L`` on the symmetric grid of ``thresholds``
        (default: :attr:`grid_thresholds`), as a rounding algorithm (AdaRound) chooses them.

        Raises:
            ValueError: The layer has affine weights, or ``integers`` is off the grid.
        """
        if self.weight_scales is not None:
            raise ValueError("set_weight_integers needs symmetric weights; this layer is affine")
        thresholds = self.grid_thresholds if thresholds is None else np.asarray(thresholds)
        thresholds = thresholds.astype(np.float32).reshape(-1)
        levels = symmetric_levels(self.weight_bits)
        weight = self.layer.weight
        if tuple(integers.shape) != tuple(weight.shape) or np.abs(integers).max() > levels:
            raise ValueError(
                f"weight integers must have shape {list(weight.shape)} and lie in "
                f"-{levels}..{levels}"
            )
        scales = _weight_scales(thresholds, self.weight_bits, self.weight_axis, weight.ndim)
        quantized = (integers.astype(np.float32) * scales).astype(np.float32)
        if self.paddle_fc_scales or self.requantized_conv:
            self.program_weight = quantized
            self.program_weight_thresholds = thresholds
            quantized, thresholds = runtime_weight(
                integers, thresholds, self.weight_bits, self.weight_axis, fc=self.paddle_fc_scales,
                halved=self.halved_weights, norm_factor=self.norm_factor,
            )
        with paddle.no_grad():
            weight.set_value(quantized)
        self.register_buffer("weight_thresholds", paddle.to_tensor(thresholds))

    def input_shift_response(self) -> np.ndarray | None:
        """For a shifted input, what the shift ``z * s`` adds to each output channel through
        the weight the layer computes with (the bias the export subtracts); else ``None``."""
        if not self.input_shifted:
            return None
        shift = float(self.input_zero_point) * float(self.input_scale)
        return shift_response(self.layer.weight.numpy(), self.weight_axis, shift)

    def quantize_input(self, x: paddle.Tensor, top_code: int | None = None) -> paddle.Tensor:
        """The fake-quantized first input, as :meth:`forward` feeds it to the layer.

        Args:
            x: The input.
            top_code: The largest code of an unsigned input in this call (``None``:
                :attr:`input_top_code`; see :attr:`input_call_tops`).
        """
        if self.input_shifted:
            codes = shifted_codes(x, self.input_scale, self.input_zero_point, shifted_levels(self.activation_bits))
            return dequantize_codes(codes, self.input_scale, self.input_zero_point)
        if self.input_zero_point is not None:
            levels = affine_levels(self.activation_bits)
            return fake_quantize(x, self.input_scale, self.input_zero_point, 0, levels)
        return fake_quantize_symmetric(
            x, self.input_threshold, self.activation_bits, unsigned=self.input_unsigned,
            lowest_code=self.input_floor,
            highest_code=(self.input_top_code if top_code is None else top_code) if self.input_unsigned else None,
        )

    def forward(self, *inputs: paddle.Tensor, **kwargs) -> paddle.Tensor:
        if self.layer._forward_pre_hooks:
            # The layer's own forward-pre hooks (a user's) change what it reads, which is what
            # calibration saw: they run before the input is quantized, not after (measured: a
            # hook halving a conv's input, 0.11 of the largest output off Paddle Inference before).
            inputs, kwargs = run_forward_pre_hooks(self.layer, inputs, kwargs)
            with forward_pre_hooks_suspended(self.layer):
                return self._quantized_forward(*inputs, **kwargs)
        return self._quantized_forward(*inputs, **kwargs)

    def _quantized_forward(self, *inputs: paddle.Tensor, **kwargs) -> paddle.Tensor:
        if not inputs:  # the first input passed by keyword: layer(input=x)
            name = _first_parameter(type(self.layer))
            if name not in kwargs:
                raise TypeError(f"{type(self.layer).__name__}.forward() missing its input {name!r}")
            inputs = (kwargs.pop(name),)
        for position, value in enumerate(inputs):
            if isinstance(value, np.ndarray):
                raise TypeError(
                    f"{type(self.layer).__name__} (quantized) input {position} expects a "
                    f"paddle.Tensor, got numpy.ndarray: wrap it with paddle.to_tensor(...)"
                )
        if self.constant_inputs and paddle.in_dynamic_mode() and fingerprint(inputs[0]) in self.constant_inputs:
            # A call on a constant: fp32 input, the weight this layer computes with.
            return self.layer(inputs[0], *inputs[1:], **kwargs)
        if self.residual_codes:
            quantize_residual_in_place(
                inputs[0], self.input_thresholds[0], self.activation_bits, self.residual_codes
            )
        for sum_output in self.sum_outputs:
            sum_output.expect_sum()
        top_code = None if self.input_call_tops is None else self.input_call_tops.next_top()
        quantized_input = self.quantize_input(inputs[0], top_code)
        if not inputs[1:] and not kwargs and conv_bias_added_fast(self.layer, quantized_input):
            output = biased_conv2d(self.layer, quantized_input)
        else:
            output = self.layer(quantized_input, *inputs[1:], **kwargs)
        if self.residual_output_threshold is not None:
            output = residual_output_codes(output, self.residual_output_threshold, self.activation_bits)
        return output

    def extra_repr(self) -> str:
        return (
            f"input_threshold={self.input_thresholds[0]:.6g}, "
            f"weight_channels={self.weight_thresholds.shape[0]}, bits={self.activation_bits}/"
            f"{self.weight_bits}{', unsigned input' if self.input_unsigned else ''}"
            f"{f', shifted input (zero point {self.input_zero_point})' if self.input_shifted else ''}"
            f"{', input read as a fused residual' if self.residual_codes else ''}"
            f"{', weights halved to 7 bits (s8 input on AVX2)' if self.halved_weights else ''}"
            f"{', output written as s8 residual codes' if self.residual_output_threshold is not None else ''}"
            f"{f', input codes up to {self.input_top_code}' if self.input_top_code > symmetric_levels(self.activation_bits) else ''}"
            f"{f', per call up to {list(self.input_call_tops.tops)}' if self.input_call_tops is not None else ''}"
        )


class QuantizedMatmul(paddle.nn.Layer):
    """A layer multiplying two activations (attention's ``q @ k``), with both inputs
    fake-quantized on the symmetric grid of their thresholds, as an int8 matmul of two s8
    tensors computes it (Paddle Inference's oneDNN ``fused_matmul``, measured equal to this
    to 4e-7 on VNNI kernels).

    Args:
        layer: The original layer; called with the two fake-quantized inputs.
        input_threshold: Threshold of the first input.
        second_input_threshold: Threshold of the second input.
        output_thresholds: Output thresholds (kept for the table).
        activation_bits: Bit width of both inputs.
        onednn: The matmul runs in Paddle Inference's oneDNN pipeline (or ONNX Runtime), whose
            s8 inputs saturate at -128 (:func:`signed_input_floor`).
    """

    def __init__(
        self,
        layer: paddle.nn.Layer,
        input_threshold: float,
        second_input_threshold: float,
        output_thresholds: Sequence[float] = (),
        activation_bits: int = 8,
        onednn: bool = False,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.activation_bits = activation_bits
        self.input_floor = signed_input_floor(activation_bits, onednn)
        self.input_thresholds = [float(input_threshold), float(second_input_threshold)]
        self.output_thresholds = [float(t) for t in output_thresholds]
        for name, value in zip(("input_threshold", "second_input_threshold"), self.input_thresholds):
            self.register_buffer(name, paddle.to_tensor(np.asarray([value], dtype=np.float32)))

    def forward(self, x: paddle.Tensor, y: paddle.Tensor, *args: Any, **kwargs: Any) -> paddle.Tensor:
        bits = self.activation_bits
        return self.layer(
            fake_quantize_symmetric(x, self.input_threshold, bits, lowest_code=self.input_floor),
            fake_quantize_symmetric(
                y, self.second_input_threshold, bits, lowest_code=self.input_floor
            ),
            *args, **kwargs,
        )

    def extra_repr(self) -> str:
        return (
            f"input_thresholds=({self.input_thresholds[0]:.6g}, {self.input_thresholds[1]:.6g}), "
            f"bits={self.activation_bits}"
        )


@functools.lru_cache(maxsize=None)
def _first_parameter(layer_type: type) -> str | None:
    """Name of the first input of ``layer_type.forward`` (``None``: it takes ``*args``)."""
    try:
        parameters = list(inspect.signature(layer_type.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    if not parameters or parameters[0].kind not in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
    ):
        return None
    return parameters[0].name


def first_input(layer: paddle.nn.Layer, args: tuple, kwargs: dict) -> Any:
    """The first input of a call ``layer(*args, **kwargs)``, positional or by keyword."""
    if args:
        return args[0]
    name = _first_parameter(type(layer))
    return kwargs.get(name) if name is not None else None


def keeps_forward(layer: paddle.nn.Layer, kind: type) -> bool:
    """Whether ``layer`` is a ``kind`` whose class computes ``kind.forward`` (the class itself,
    or a subclass that only names or configures it, such as a functional matmul site)."""
    return isinstance(layer, kind) and type(layer).forward is kind.forward


def run_forward_pre_hooks(layer: paddle.nn.Layer, inputs: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``inputs`` and ``kwargs`` after ``layer``'s forward-pre hooks, applied as Paddle's
    ``Layer.__call__`` applies them."""
    for hook_id, hook in layer._forward_pre_hooks.items():
        if hook_id in layer._forward_pre_hooks_with_kwargs_flag:
            result = hook(layer, inputs, kwargs)
            if result is not None:
                inputs, kwargs = result
        else:
            result = hook(layer, inputs)
            if result is not None:
                inputs = result if isinstance(result, tuple) else (result,)
    return inputs, kwargs


@contextlib.contextmanager
def forward_pre_hooks_suspended(layer: paddle.nn.Layer) -> Iterator[None]:
    """Calls of ``layer`` meanwhile skip its forward-pre hooks (already applied)."""
    hooks = layer._forward_pre_hooks
    layer._forward_pre_hooks = collections.OrderedDict()
    try:
        yield
    finally:
        layer._forward_pre_hooks = hooks


def untie_shared_weights(model: paddle.nn.Layer, layers: Iterable[paddle.nn.Layer]) -> list[paddle.nn.Layer]:
    """Gives each of ``layers`` whose weight parameter another layer of ``model`` holds too
    (``b.weight = a.weight``) a copy of its own, before any of them is quantized.

    A :class:`QuantizedLayer` puts its fake-quantized weight into its layer's parameter, and
    Paddle's fc recomputes weight scales from that: on a shared parameter the second layer
    quantized the first one's result, and the export, which finds a layer's ops by its
    weight's name, gave one layer's record to both (measured: two Linear layers sharing a
    weight, 0.86 of the largest output off the simulation in Paddle Inference).

    Returns:
        The layers given a copy.
    """
    holders = collections.Counter(
        id(parameter) for layer in model.sublayers(include_self=True)
        for parameter in layer._parameters.values() if parameter is not None
    )
    untied = []
    for layer in layers:
        weight = getattr(layer, "weight", None)
        if isinstance(weight, paddle.Tensor) and holders[id(weight)] > 1:
            layer.weight = layer.create_parameter(
                weight.shape, dtype=weight.dtype,
                default_initializer=paddle.nn.initializer.Assign(weight.numpy()),
            )
            layer.weight.stop_gradient = weight.stop_gradient
            untied.append(layer)
    return untied


def replace_sublayer(model: paddle.nn.Layer, old: paddle.nn.Layer, new: paddle.nn.Layer) -> int:
    """Puts ``new`` wherever ``model`` holds ``old``: a layer shared under several names
    (which ``named_sublayers`` lists once) is replaced under all of them, and so is every
    reference to it in a plain list, tuple or dict attribute of a model's layer (not of this
    package's wrappers), through which a forward may call it (PaddleDetection's FPN and heads register each conv with
    ``add_sublayer`` and call it from a Python list: measured, an FPN lateral conv simulated
    in fp32 while the export ran it int8, 0.77% of its largest output off).

    Returns:
        How many places were replaced.
    """
    return replace_sublayers(model, [(old, new)])


def replace_sublayers(model: paddle.nn.Layer, replacements: Iterable[tuple[paddle.nn.Layer, paddle.nn.Layer]]) -> int:
    """:func:`replace_sublayer` of each ``(old, new)`` pair, in one walk of ``model`` (a walk
    per layer made the export of a 121-conv DenseNet spend 7 s in them).

    Returns:
        How many places were replaced.
    """
    by_id = {id(old): new for old, new in replacements}
    if not by_id:
        return 0
    parents = {id(parent): parent for parent in (model, *model.sublayers())}
    count = 0
    for parent in parents.values():
        for attr, child in list(parent._sub_layers.items()):
            if id(child) in by_id:
                parent._sub_layers[attr] = by_id[id(child)]
                count += 1
        if type(parent).__module__.split(".")[0] == __name__.split(".")[0]:
            continue  # this package's wrappers keep their own references (``sum_outputs``)
        for attr, value in list(vars(parent).items()):
            if not isinstance(value, (list, tuple, dict)) or attr in _layer_registries() or holds_package_state(attr):
                continue  # (the package's state: a DenseNet's table, 12k items per layer)
            replaced, found = _replaced_in(value, by_id)
            if found:
                vars(parent)[attr] = replaced  # (a rebuilt tuple; lists and dicts in place)
                count += found
    return count


@functools.lru_cache(maxsize=1)
def _layer_registries() -> frozenset[str]:
    """The attributes every ``paddle.nn.Layer`` has (its sublayers, parameters, buffers, hooks,
    ...): :func:`replace_sublayers` replaces ``_sub_layers`` and none of the others holds a
    model's layer."""
    return frozenset(vars(paddle.nn.Layer()))


def _replaced_in(value: Any, by_id: dict[int, paddle.nn.Layer], seen: set[int] | None = None) -> tuple[Any, int]:
    """``value`` (a list, tuple or dict, nested) with each layer of ``by_id`` (by ``id``)
    replaced by its new one: lists and dicts in place, tuples rebuilt; and how many references
    were replaced."""
    if id(value) in by_id:
        return by_id[id(value)], 1
    seen = set() if seen is None else seen
    if not isinstance(value, (list, tuple, dict)) or id(value) in seen:
        return value, 0
    seen.add(id(value))
    if isinstance(value, (list, dict)):
        found = 0
        for key, item in list(enumerate(value) if isinstance(value, list) else value.items()):
            replaced, hits = _replaced_in(item, by_id, seen)
            if hits:
                value[key] = replaced
                found += hits
        return value, found
    if hasattr(value, "_fields"):  # a namedtuple: left as it is
        return value, 0
    items = [_replaced_in(item, by_id, seen) for item in value]
    found = sum(hits for _, hits in items)
    return (tuple(item for item, _ in items) if found else value), found
