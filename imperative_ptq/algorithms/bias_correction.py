"""Empirical bias correction: after the weights are quantized, each layer's mean output is put
back where the fp32 model has it.

Quantizing ``W`` to ``W_q`` shifts a layer's output by ``(W_q - W) x``, whose mean over the data,
``E[(W_q - W) x]``, is a per-channel constant that the next layers treat as signal (Nagel et
al. 2019, section 4.2; Finkelstein et al. 2019). Measured on the calibration batches, with the
quantized model running all earlier layers quantized (and already corrected):

    b_c  +=  E[y_fp32,c] - E[y_quant,c]        (mean over batch and spatial positions)

Layers are corrected one at a time in execution order, so each correction sees the corrected
predecessors. A layer without a bias gets one.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import paddle
from tqdm import tqdm

from ..quant_layers import QuantizedLayer
from .capture import capture_outputs, execution_order

__all__ = ["add_to_bias", "channel_means", "correct_bias", "output_channel_axis"]

logger = logging.getLogger(__name__)


def output_channel_axis(layer: paddle.nn.Layer, ndim: int) -> int:
    """The channel axis of ``layer``'s output: 1 for a channels-first conv, else the last."""
    data_format = getattr(layer, "_data_format", None)
    if isinstance(data_format, str) and data_format.startswith("NC") and ndim > 2:
        return 1
    return ndim - 1


def channel_means(outputs: Sequence[paddle.Tensor], axis: int) -> np.ndarray:
    """Mean of each channel on ``axis`` over every other axis of every tensor (float64)."""
    total, count = None, 0
    for output in outputs:
        values = output.numpy().astype(np.float64)
        moved = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
        total = moved.sum(axis=1) if total is None else total + moved.sum(axis=1)
        count += moved.shape[1]
    return total / count


def correct_bias(
    quantized_model: paddle.nn.Layer,
    reference: paddle.nn.Layer,
    batches: Sequence[Any],
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Corrects the bias of every :class:`QuantizedLayer` of ``quantized_model`` in place.

    Args:
        quantized_model: A converted model.
        reference: The fp32 model it was quantized from (same sublayer names).
        batches: Calibration batches.
        progress: Show a tqdm bar over the layers.

    Returns:
        The correction added to each layer's bias, by layer name.

    Raises:
        ValueError: ``batches`` is empty or a layer has no fp32 counterpart in ``reference``.
    """
    if not batches:
        raise ValueError("bias correction needs calibration batches, got none")
    names = {id(layer): name for name, layer in quantized_model.named_sublayers()
             if isinstance(layer, QuantizedLayer)}
    references = dict(reference.named_sublayers())
    layers = [layer for layer in quantized_model.sublayers() if id(layer) in names]
    corrections: dict[str, np.ndarray] = {}
    ordered = execution_order(quantized_model, layers, batches[0])
    for layer in tqdm(ordered, desc="bias correction", unit="layer", disable=not progress):
        name = names[id(layer)]
        fp32_layer = references.get(name)
        if fp32_layer is None:
            raise ValueError(f"bias correction: layer {name!r} has no fp32 counterpart")
        fp32_outputs = capture_outputs(reference, fp32_layer, batches)
        quantized_outputs = capture_outputs(quantized_model, layer, batches)
        axis = output_channel_axis(layer.layer, fp32_outputs[0].ndim)
        shift = channel_means(fp32_outputs, axis) - channel_means(quantized_outputs, axis)
        add_to_bias(layer.layer, shift)
        previous = layer.bias_correction
        layer.bias_correction = shift if previous is None else previous + shift
        corrections[name] = shift
    logger.info("bias correction: %d layers corrected", len(corrections))
    return corrections


def add_to_bias(layer: paddle.nn.Layer, shift: np.ndarray) -> None:
    """``layer.bias += shift`` (a zero bias is created first if the layer has none)."""
    with paddle.no_grad():
        if layer.bias is None:
            layer.bias = layer.create_parameter(
                shape=[shift.size], dtype=layer.weight.dtype, is_bias=True
            )
            layer.bias.set_value(np.zeros(shift.size, dtype=np.float32))
        bias = layer.bias.numpy()
        layer.bias.set_value((bias + shift.reshape(bias.shape)).astype(bias.dtype))
