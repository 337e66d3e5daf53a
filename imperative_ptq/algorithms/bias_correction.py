"""Empirical bias correction: after the weights are quantized, each layer's mean output is put
back where the fp32 model has it.

Quantizing ``W`` to ``W_q`` shifts a layer's output by ``(W_q - W) x``, whose mean over the data,
``E[(W_q - W) x]``, is a per-channel constant that the next layers treat as signal (Nagel et
al. 2019, section 4.2; Finkelstein et al. 2019). Measured on the calibration batches, with the
quantized model running all earlier layers quantized (and already corrected):

    b_c  +=  E[y_fp32,c] - E[y_quant,c]        (mean over batch and spatial positions)

Layers are corrected one at a time in execution order, so each correction sees the corrected
predecessors. A layer without a bias gets one.

The **analytical** variant (``bias_correction="analytical"``) needs one pass instead of two per
layer: with ``E[x]`` each layer's per-channel input mean in the fp32 model,

    b  +=  (W - W_q) E[x]          (a conv's kernel summed over its window; padding ignored)

the expected shift of the weights alone, each layer independently (input quantization and the
errors of earlier layers are not seen). Exact on the fp32 inputs for a Linear and a 1x1 conv;
for larger kernels the positions near the border, which fewer windows read, make it an
approximation.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import paddle
from tqdm import tqdm

from ..batches import run_hooked
from ..functional_matmul import with_matmul_sites
from ..quant_layers import QuantizedLayer
from .capture import capture_model_outputs, capture_outputs, quantized_layers_in_order
from .cross_layer_equalization import input_channel_index

__all__ = [
    "add_to_bias", "channel_means", "correct_bias", "correct_bias_analytically",
    "output_channel_axis", "weight_shift",
]

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
        sums, values = _channel_sums(output, axis)
        total = sums if total is None else total + sums
        count += values
    return total / count


def _channel_sums(tensor: paddle.Tensor, axis: int) -> tuple[np.ndarray, int]:
    """Sum of each channel on ``axis`` over every other axis (float64), and how many values
    each sum has."""
    values = tensor.numpy().astype(np.float64)
    moved = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
    return moved.sum(axis=1), moved.shape[1]


def correct_bias(
    quantized_model: paddle.nn.Layer,
    reference: paddle.nn.Layer,
    batches: Sequence[Any],
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Corrects the bias of every :class:`QuantizedLayer` of ``quantized_model`` in place.

    Args:
        quantized_model: A converted model.
        reference: The fp32 model it was quantized from (left unchanged: the layers that
            functional matmuls and convs became are matched on a copy).
        batches: Calibration batches.
        progress: Show a tqdm bar over the layers.

    Returns:
        The correction added to each layer's bias, by layer name.

    Raises:
        ValueError: ``batches`` is empty or a layer has no fp32 counterpart in ``reference``.
    """
    if not batches:
        raise ValueError("bias correction needs calibration batches, got none")
    reference = with_matmul_sites(reference, quantized_model)
    references = dict(reference.named_sublayers())
    corrections: dict[str, np.ndarray] = {}
    ordered = quantized_layers_in_order(quantized_model, batches[0])
    model_outputs = capture_model_outputs(reference, batches)
    error_before = _output_error(quantized_model, batches, model_outputs)
    before = {name: _bias_state(layer) for name, layer in ordered}
    missing = [name for name, _ in ordered if name not in references]
    if missing:
        raise ValueError(
            f"bias correction: layer {missing[0]!r} has no fp32 counterpart in the reference "
            "model: pass the fp32 model the quantized model was made from"
        )
    fp32_means = _fp32_channel_means(reference, {name: references[name] for name, _ in ordered}, batches)
    for name, layer in tqdm(ordered, desc="bias correction", unit="layer", disable=not progress):
        quantized_outputs = capture_outputs(quantized_model, layer, batches)
        axis = output_channel_axis(layer.layer, quantized_outputs[0].ndim)
        shift = fp32_means[name] - channel_means(quantized_outputs, axis)
        corrections[name] = _correct(layer, shift)
    error_after = _output_error(quantized_model, batches, model_outputs)
    if error_after > error_before:
        for name, layer in ordered:
            _restore_bias(layer, *before[name])
        logger.warning(
            "bias correction moved the model's outputs further from the fp32 model's on the "
            "calibration batches (relative squared error %.3g -> %.3g) and was undone: matching "
            "each layer's mean output can turn into larger errors behind nonlinearities "
            "(Hardswish, squeeze-excite gates); bias_correction='analytical' or more "
            "calibration batches may do better", error_before, error_after,
        )
        return {}
    logger.info(
        "bias correction: %d layers corrected (relative squared output error on the "
        "calibration batches %.3g -> %.3g)", len(corrections), error_before, error_after,
    )
    return corrections


def _fp32_channel_means(
    reference: paddle.nn.Layer, layers: dict[str, paddle.nn.Layer], batches: Sequence[Any]
) -> dict[str, np.ndarray]:
    """Each fp32 layer's :func:`channel_means` over the batches, of its first call in each
    forward (as :func:`capture_outputs` takes it), all in one pass: they do not depend on the
    corrections, and a pass per layer cost as much again as the quantized side.

    Raises:
        ValueError: A layer never ran in a forward of ``reference``.
    """
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    seen_in_forward: set[str] = set()

    def hook_for(name: str):
        def hook(layer: paddle.nn.Layer, inputs: tuple, output: paddle.Tensor) -> None:
            if name in seen_in_forward:
                return
            seen_in_forward.add(name)
            channel_sums, values = _channel_sums(output, output_channel_axis(layer, output.ndim))
            sums[name] = sums.get(name, 0.0) + channel_sums
            counts[name] = counts.get(name, 0) + values
        return hook

    handles = [layer.register_forward_post_hook(hook_for(name)) for name, layer in layers.items()]
    handles.append(reference.register_forward_pre_hook(lambda model, inputs: seen_in_forward.clear()))
    run_hooked(reference, batches, handles)
    missing = [name for name in layers if name not in sums]
    if missing:
        raise ValueError(f"bias correction: layers {missing} never ran in a forward of {type(reference).__name__}")
    return {name: sums[name] / counts[name] for name in layers}


def _output_error(
    model: paddle.nn.Layer, batches: Sequence[Any], reference: list[list[paddle.Tensor]]
) -> float:
    """``sum ||y - y_fp32||^2 / sum ||y_fp32||^2`` over the model's float outputs and batches."""
    error = total = 0.0
    for outputs, expected in zip(capture_model_outputs(model, batches), reference):
        for output, target in zip(outputs, expected):
            if not paddle.is_floating_point(target):
                continue
            target = target.numpy().astype(np.float64)
            error += float(np.sum((output.numpy().astype(np.float64) - target) ** 2))
            total += float(np.sum(target ** 2))
    return error / total if total > 0 else error


def _bias_state(layer: QuantizedLayer) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The layer's bias (``None`` if it has none) and its recorded correction, as they are."""
    bias = layer.layer.bias
    return (None if bias is None else bias.numpy().copy()), layer.bias_correction


def _restore_bias(layer: QuantizedLayer, bias: np.ndarray | None, recorded: np.ndarray | None) -> None:
    """Puts back a state :func:`_bias_state` took."""
    with paddle.no_grad():
        if bias is None:
            layer.layer.bias = None
        else:
            layer.layer.bias.set_value(bias)
    layer.bias_correction = recorded


def weight_shift(
    layer: paddle.nn.Layer, difference: np.ndarray, input_mean: np.ndarray
) -> np.ndarray:
    """``(W - W_q) E[x]`` per output channel for a Linear (``[in, out]``) or a conv
    (``[out, in / groups, *kernel]``, the kernel summed over its window, as if every window
    saw the input's mean)."""
    if isinstance(layer, paddle.nn.Linear):
        return input_mean @ difference
    summed = difference.reshape(difference.shape[0], difference.shape[1], -1).sum(axis=2)
    return (summed * input_mean[input_channel_index(layer, input_mean.size)]).sum(axis=1)


def correct_bias_analytically(
    quantized_model: paddle.nn.Layer,
    reference: paddle.nn.Layer,
    batches: Sequence[Any],
) -> dict[str, np.ndarray]:
    """The analytical variant: ``b += (W - W_q) E[x]`` for every Conv2D/Linear
    :class:`QuantizedLayer`, with ``E[x]`` from one pass of the fp32 ``reference`` over
    ``batches``. Other layer types are left alone (with a warning naming them).

    Returns:
        The correction added to each layer's bias, by layer name.

    Raises:
        ValueError: ``batches`` is empty or a layer has no fp32 counterpart in ``reference``.
    """
    if not batches:
        raise ValueError("bias correction needs calibration batches, got none")
    reference = with_matmul_sites(reference, quantized_model)
    references = dict(reference.named_sublayers())
    targets: dict[str, tuple[QuantizedLayer, paddle.nn.Layer]] = {}
    for name, layer in quantized_model.named_sublayers():
        if not isinstance(layer, QuantizedLayer):
            continue
        if not isinstance(layer.layer, (paddle.nn.Conv2D, paddle.nn.Linear)):
            logger.warning(
                "analytical bias correction leaves %r alone: a %s is not a Conv2D or Linear",
                name, type(layer.layer).__name__,
            )
            continue
        if name not in references:
            raise ValueError(
                f"bias correction: layer {name!r} has no fp32 counterpart in the reference "
                "model: pass the fp32 model the quantized model was made from"
            )
        targets[name] = (layer, references[name])
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str, fp32_layer: paddle.nn.Layer):
        def hook(layer: paddle.nn.Layer, inputs: tuple) -> None:
            x = inputs[0]
            channel_sums, values = _channel_sums(x, output_channel_axis(fp32_layer, x.ndim))
            sums[name] = sums.get(name, 0.0) + channel_sums
            counts[name] = counts.get(name, 0) + values
        return hook

    handles = [fp32.register_forward_pre_hook(hook_for(name, fp32))
               for name, (_, fp32) in targets.items()]
    run_hooked(reference, batches, handles)
    corrections: dict[str, np.ndarray] = {}
    for name, (layer, fp32_layer) in targets.items():
        if name not in sums:
            continue  # never ran on the data
        difference = (
            fp32_layer.weight.numpy().astype(np.float64)
            - layer.layer.weight.numpy().astype(np.float64)
        )
        corrections[name] = _correct(
            layer, weight_shift(fp32_layer, difference, sums[name] / counts[name])
        )
    logger.info("analytical bias correction: %d layers corrected", len(corrections))
    return corrections


def _correct(layer: QuantizedLayer, shift: np.ndarray) -> np.ndarray:
    """Adds ``shift`` to the layer's bias and to what bias correction recorded on it."""
    add_to_bias(layer.layer, shift)
    previous = layer.bias_correction
    layer.bias_correction = shift if previous is None else previous + shift
    return shift


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
