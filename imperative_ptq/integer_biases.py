"""Conv biases on the int32 grid integer runtimes store them on.

ONNX Runtime's ``QLinearConv`` adds an int32 bias to the int32 sum of code products: the
bias (with the BatchNorm after the conv folded in) rounded to the grid of the input scale
times each channel's weight scale. A float bias between two grid points is a fraction of
an accumulator unit off, which moves the few outputs that sit near a half code to the other
code, where the simulation and Paddle Inference (whose oneDNN convs add a float bias) do not
(measured: a PANNs-style audio CNN, 2.7e-3 of the largest output off the simulation; an
HRNet-style fusion, 6.9e-3).

:func:`round_conv_biases` puts every int8 conv's folded bias on that grid at ``convert``: the
BatchNorm reading the conv alone takes the difference in its shift (``beta``), a conv without
one in its own bias. Less than half an accumulator unit per channel, so accuracy does not
move; the simulation, Paddle Inference (which folds the BatchNorm it exports) and ONNX
Runtime's int32 bias then add the same value.
"""

from __future__ import annotations

import logging

import numpy as np
import paddle

from .quant_layers import QuantizedLayer
from .registry import BATCH_NORM_TYPES
from .quantizers.qparams import symmetric_levels
from .calibration_table import HookedLayers

__all__ = ["round_conv_biases"]

logger = logging.getLogger(__name__)


def round_conv_biases(model: paddle.nn.Layer, hooked: HookedLayers, activation_bits: int) -> int:
    """Puts the folded bias of each int8 conv of ``model`` on its int32 accumulator grid.

    Args:
        model: A model ``convert`` has just converted.
        hooked: Its calibration layers and states (a BatchNorm's ``input_sources`` name the
            conv it reads).
        activation_bits: Bit width of the activations (the input grid's levels).

    Returns:
        How many convs' biases moved.
    """
    convs = {
        name: layer for name, layer in model.named_sublayers()
        if isinstance(layer, QuantizedLayer) and isinstance(layer.layer, (paddle.nn.Conv1D, paddle.nn.Conv2D))
        and layer.weight_scales is None and layer.weight_bits <= 8
    }
    norms: dict[str, paddle.nn.Layer] = {}
    for layer, state in hooked:
        sources = state.input_sources
        if isinstance(layer, BATCH_NORM_TYPES) and len(sources) == 1 and next(iter(sources)) in convs:
            norms.setdefault(next(iter(sources)), layer)
    moved = 0
    levels = symmetric_levels(activation_bits)
    for name, conv in convs.items():
        norm = norms.get(name)
        inner_bias = conv.layer.bias
        bias = np.zeros(conv.layer.weight.shape[0], np.float64) if inner_bias is None else inner_bias.numpy().astype(np.float64)
        if norm is None and inner_bias is None:
            continue  # no bias at all: zero is on every grid
        factor = np.ones_like(bias)
        folded = bias
        if norm is not None:
            mean, variance = norm._mean.numpy().astype(np.float64), norm._variance.numpy().astype(np.float64)
            gamma = np.ones_like(bias) if norm.weight is None else norm.weight.numpy().astype(np.float64)
            beta = np.zeros_like(bias) if norm.bias is None else norm.bias.numpy().astype(np.float64)
            if norm.bias is None:
                continue  # no shift to move
            factor = gamma / np.sqrt(variance + float(norm._epsilon))
            folded = (bias - mean) * factor + beta
        input_scale = conv.input_scale if conv.input_scale is not None else float(conv.input_thresholds[0]) / levels
        thresholds = np.asarray(conv.weight_thresholds.numpy(), np.float32).reshape(-1)
        weight_scales = (np.maximum(thresholds * np.abs(factor).astype(np.float32), 1e-12) / np.float32(levels)).astype(np.float32)
        grid = (np.float32(input_scale) * weight_scales).astype(np.float64)
        delta = np.round(folded / grid) * grid - folded
        if not np.any(delta):
            continue
        with paddle.no_grad():
            if norm is not None:
                norm.bias.set_value((beta + delta).astype(np.float32))
            else:
                inner_bias.set_value((bias + delta).astype(np.float32))
        moved += 1
    if moved:
        logger.debug("put the folded biases of %d int8 convs on their int32 accumulator grids", moved)
    return moved
