"""Conv and Linear biases on the int32 grid ONNX Runtime adds them on, so that every runtime
adds the same.

ONNX Runtime's ``QLinearConv`` adds a conv's bias (a BatchNorm folded into it included) as an
int32 on the grid ``g = input scale x weight scale`` (a float bias it quantizes itself where it
fuses the conv), while Paddle Inference and the simulation add it in float. The rounding, at
most ``g / 2`` per output channel, moves the conv's outputs by a constant per channel, which
flips the few output codes near a half code and so every value downstream of them (measured:
a PP-LiteSeg-style net 12% of the largest output off the simulation in ONNX Runtime, 2.4e-7
with the biases on the grid). :func:`put_conv_biases_on_grid` moves each int8 conv's folded
bias onto that grid at ``convert`` (its BatchNorm's beta, each BatchNorm's of a conv called
once per BatchNorm, the conv's own bias under a BatchNorm without beta, or its own bias
without one): the simulation computes with the moved bias, Paddle Inference reads it from the
program and ONNX Runtime's int32 holds it exactly. A bias nothing can move (a BatchNorm without
beta after a conv without bias) the ONNX export adds in float after the conv.

The grid is the one :mod:`imperative_ptq.export.onnx_export` writes: the input's scale (``t /
L`` of symmetric codes: ``0..L`` of a u8 input, ``-L..L`` about zero point 128 of a signed one
on a target that runs it int8; ``s`` of a signed input on its shifted grid,
:mod:`imperative_ptq.shifted_input`) times the float32 weight scale ``max(t_w |f|,
1e-12) / L_w`` (``f`` the BatchNorm's factor; ``L_w = 127`` for 8-bit weights and for
narrower ones that oneDNN requantizes to 8 bits on the ``x86`` targets, whose ``t_w`` are the
requantized thresholds, else ``2**(bits-1) - 1``, the export's int8 storage of them).
Measured on PP-OCR-style DB detectors with MobileNetV3 backbones, whose expand convs read
shifted inputs: ONNX Runtime 8-10% of the
largest output off the simulation with only the u8 inputs' biases moved, 2.7e-7 after rounding
ties with these too. The convs fused with a residual add keep their bias.

A Linear's bias likewise: ONNX Runtime fuses a rank-2 ``MatMul`` and its bias ``Add`` into a
``Gemm`` whose bias it converts to int32 on the same grid (its ``QGemm``); on rank-3 inputs it
adds the bias in float, on which the moved bias changes nothing (measured: an 8-64-32-3 MLP
with KL thresholds and analytical bias correction, ONNX Runtime 1.1e-2 of the largest output off
the simulation, 1.5e-7 after; a QAT-converted one 2.2e-3). A Linear whose output a BatchNorm
alone reads keeps its bias.
"""

from __future__ import annotations

import collections
import logging
from typing import Sequence

import numpy as np
import paddle

from .fuse import batch_norm_factor_and_bias
from .quant_layers import QuantizedLayer, keeps_forward
from .quant_residual import unwrapped_norm
from .quantizers.qparams import symmetric_levels
from .registry import BATCH_NORM_TYPES
from .session import LayerState
from .targets import Target

__all__ = ["bias_grid_steps", "folded_weight_scales", "int32_bias_codes", "put_conv_biases_on_grid"]

logger = logging.getLogger(__name__)

def folded_weight_scales(thresholds: np.ndarray, factor: np.ndarray, bits: int) -> np.ndarray:
    """The float32 per-channel weight scales the ONNX export stores a conv with: its weight
    ``thresholds`` times the ``|factor|`` of a BatchNorm folded into it, over ``L``."""
    scale = np.maximum(thresholds * np.abs(factor), 1e-12) / np.float32(symmetric_levels(bits))
    return scale.astype(np.float32)


def bias_grid_steps(input_scale: float, weight_scales: np.ndarray) -> np.ndarray:
    """The step of ONNX Runtime's int32 conv bias per output channel: input scale x weight
    scale, in float32."""
    return (input_scale * weight_scales).astype(np.float32)


def int32_bias_codes(bias: np.ndarray, steps: np.ndarray) -> np.ndarray | None:
    """``bias`` in whole ``steps`` (float64 arithmetic), the int32 ONNX Runtime adds; ``None``
    where a code is not finite or beyond int32 (the export then adds that bias in float)."""
    codes = np.round(np.asarray(bias, np.float64) / np.asarray(steps, np.float64))
    if not np.all(np.isfinite(codes)) or np.abs(codes).max(initial=0) > np.iinfo(np.int32).max:
        return None
    return codes


def put_conv_biases_on_grid(
    model: paddle.nn.Layer, hooked: Sequence[tuple[paddle.nn.Layer, LayerState]], target: Target,
    activation_bits: int,
) -> int:
    """Moves each int8 conv's folded bias, and each int8 Linear's bias, onto its int32 grid,
    in place (see the module docstring). Returns how many layers moved."""
    layers = dict(model.named_sublayers())
    names = {id(layer): name for name, layer in layers.items()}
    states = {state.name: state for _, state in hooked}
    readers: dict[str, list[LayerState]] = collections.defaultdict(list)
    for _, state in hooked:
        for source in state.input_sources:
            readers[source].append(state)
    moved = 0
    for _, state in hooked:
        layer = layers.get(state.name)
        input_scale = _coded_input_scale(layer, target, activation_bits)
        if input_scale is None:
            continue
        following = readers.get(state.name, [])
        # (A projection shortcut's BatchNorm, which convert wrapped to write its s8 residual
        # codes: ONNX Runtime folds it into the QLinearConv too, measured 6.9e-3 .. 1.2e-2 of
        # the largest output off the simulation with the bias off the grid.)
        norms = [unwrapped_norm(layers.get(reader.name)) for reader in following]
        if len(following) > 1 and isinstance(layer.layer, paddle.nn.Conv2D) and all(
            isinstance(norm, BATCH_NORM_TYPES) and reader.input_sources == {state.name}
            for norm, reader in zip(norms, following)
        ) and not layer.sum_outputs:
            # A conv called once per BatchNorm (a detection head shared by the pyramid
            # levels, a BatchNorm per level): the export folds each into its call, so each
            # BatchNorm's beta moves its call's folded bias (measured: EfficientDet-style
            # shared convs, ONNX Runtime 1e-2 .. 4e-2 off the simulation).
            moved += min(_move_bias(layer, norm, input_scale) for norm in norms)
            continue
        norm = norms[0] if len(following) == 1 else None
        if not (isinstance(norm, BATCH_NORM_TYPES) and following[0].input_sources == {state.name}):
            norm = None
        if norm is not None and isinstance(layer.layer, paddle.nn.Linear):
            continue  # (the export does not fold a BatchNorm1D into a Linear)
        writers = {state.name, following[0].name} if norm is not None else {state.name}
        sum_readers = [states.get(names.get(id(output), "")) for output in layer.sum_outputs]
        if any(reader is None or not reader.input_sources <= writers for reader in sum_readers):
            # Fused with a residual add: runs in float in ONNX Runtime unless the export's
            # ``int8_residual_branches`` quantizes its branch, on a grid of the branch's own
            # that the simulation does not take. (Its ReLU written as codes for a max-pool
            # reads the conv alone.)
            continue
        moved += _move_bias(layer, norm, input_scale)
    if moved:
        logger.info("%d conv/Linear biases moved onto their int32 grid of input x weight scale", moved)
    return moved


def _coded_input_scale(layer: object, target: Target, activation_bits: int) -> float | None:
    """The scale of the codes ONNX Runtime reads as an int8 Conv2D's (or Linear's) input, as
    :mod:`imperative_ptq.export.onnx_export` writes them: ``s`` of a shifted input (the
    export's ``DequantizeLinear`` carries the zero point, and the bias is the layer's own: a
    shift's ``W c`` is Paddle Inference's alone), ``t / L`` of a symmetric
    one (u8 codes ``0..L``, up to 255 after a residual ReLU Paddle leaves unclipped, or
    ``-L..L`` about zero point 128 where the target runs signed inputs int8, or runs this
    conv's signed input on halved weights). ``None`` for any
    other conv (a signed input the target keeps fp32, a hand-built layer with zero points,
    which ``convert`` never builds)."""
    if not (
        isinstance(layer, QuantizedLayer) and layer.weight_scales is None
        and (keeps_forward(layer.layer, paddle.nn.Conv2D) or keeps_forward(layer.layer, paddle.nn.Linear))
    ):
        return None
    levels = symmetric_levels(activation_bits)
    if layer.input_scale is not None:
        return float(layer.input_scale) if layer.input_shifted else None
    if layer.input_unsigned or target.signed_inputs_int8 or layer.halved_weights:
        return float(layer.input_thresholds[0]) / levels
    return None


def _move_bias(layer: QuantizedLayer, norm: paddle.nn.Layer | None, input_scale: float) -> int:
    """Moves one conv's folded bias onto its grid of ``input_scale`` x weight scale; 1 if it
    moved, else 0."""
    conv = layer.layer  # (or a Linear: its [in, out] weight's channels are its last axis)
    channels = int(conv.weight.shape[layer.weight_axis])
    bias = np.zeros([channels], np.float32) if conv.bias is None else conv.bias.numpy()
    if norm is None:
        if conv.bias is None:
            return 0  # no bias in either runtime
        factor, folded = np.ones([channels], np.float32), bias
    else:
        gamma = norm.weight.numpy() if norm.weight is not None else np.ones([channels], np.float32)
        beta = norm.bias.numpy() if norm.bias is not None else np.zeros([channels], np.float32)
        factor, folded = batch_norm_factor_and_bias(
            bias, norm._mean.numpy(), norm._variance.numpy(), gamma, beta, norm._epsilon
        )
        if norm.bias is None and (conv.bias is None or np.any(factor == 0)):
            return 0  # (no beta, and no conv bias to move instead)
    # The grid of the weight it computes with: oneDNN's 8-bit requantization of a narrower
    # weight where the target runs one (``program_weight`` keeps the layer's own), else its
    # own; a per-tensor threshold broadcasts against the per-channel factor.
    bits = 8 if layer.program_weight is not None else layer.weight_bits
    thresholds = np.asarray(layer.weight_thresholds.numpy(), np.float32).reshape(-1)
    grid = bias_grid_steps(input_scale, folded_weight_scales(thresholds, factor, bits)).astype(np.float64)
    codes = int32_bias_codes(folded, grid)
    if codes is None:
        return 0
    delta = codes * grid - folded.astype(np.float64)
    with paddle.no_grad():
        if norm is None:
            conv.bias.set_value((bias + delta).astype(bias.dtype))
            moved = delta.astype(np.float32)
            layer.bias_on_grid = moved if layer.bias_on_grid is None else layer.bias_on_grid + moved
        elif norm.bias is not None:
            norm.bias.set_value((beta + delta).astype(beta.dtype))
        else:
            # A BatchNorm without beta (bias_attr=False): the conv's bias moves, by the
            # step over the factor it is multiplied by (measured: ONNX Runtime 4.5e-3 off).
            shifted = bias.astype(np.float64) + delta / factor.astype(np.float64)
            conv.bias.set_value(shifted.astype(bias.dtype))
            moved = (shifted - bias).astype(np.float32)
            layer.bias_on_grid = moved if layer.bias_on_grid is None else layer.bias_on_grid + moved
    return 1
