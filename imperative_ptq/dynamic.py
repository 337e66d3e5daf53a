"""Dynamic quantization (PyTorch's ``quantize_dynamic``): int8 weights, activations quantized
per batch at run time, no calibration.

Linear layers become :class:`~imperative_ptq.dynamic_linear.DynamicQuantizedLinear` (the
arithmetic is described there), LSTM and GRU layers
:class:`~imperative_ptq.dynamic_rnn.DynamicQuantizedRNN`. Good for models whose activation
ranges change from input to input (LSTMs, transformers);
:func:`imperative_ptq.export.export_onnx` writes the integer form ONNX Runtime runs (Linear
and LSTM layers; a GRU as int8 weights computed in fp32),
:func:`imperative_ptq.export.save_quantized_model` a weight-only int8 Paddle program.
"""

from __future__ import annotations

import copy
import logging
from typing import Sequence

import numpy as np
import paddle

from .dynamic_linear import DynamicQuantizedLinear, dynamic_quantize_activation
from .dynamic_rnn import RNN_TYPES, DynamicQuantizedRNN
from .quant_layers import keeps_forward, replace_sublayer
from .quantizable import check_quantizable

__all__ = [
    "DYNAMIC_LAYER_TYPES",
    "DynamicQuantizedLinear",
    "DynamicQuantizedRNN",
    "dynamic_layers",
    "dynamic_quantize_activation",
    "quantize_dynamic",
]

logger = logging.getLogger(__name__)

#: Layer types ``quantize_dynamic`` can replace.
DYNAMIC_LAYER_TYPES: tuple[type, ...] = (paddle.nn.Linear, *RNN_TYPES)


def _check_layer_types(layer_types: object) -> tuple[type, ...]:
    if isinstance(layer_types, type):
        layer_types = (layer_types,)
    if not isinstance(layer_types, (tuple, list, set, frozenset)) or not layer_types:
        raise TypeError(
            f"layer_types must be a non-empty tuple of layer classes, e.g. (paddle.nn.Linear,); "
            f"got {layer_types!r}"
        )
    checked = []
    for layer_type in layer_types:
        if not (isinstance(layer_type, type) and issubclass(layer_type, paddle.nn.Layer)):
            raise TypeError(
                f"layer_types must hold paddle.nn.Layer subclasses, got {layer_type!r}"
            )
        if not issubclass(layer_type, DYNAMIC_LAYER_TYPES):
            supported = ", ".join(f"paddle.nn.{t.__name__}" for t in DYNAMIC_LAYER_TYPES)
            if issubclass(layer_type, paddle.nn.layer.conv._ConvNd):
                hint = "convolutions are better served by ImperativePTQ's static thresholds"
            else:
                hint = (
                    "the supported layers inside any other layer, MultiHeadAttention's "
                    "projections included, are quantized by listing their types"
                )
            raise ValueError(
                f"quantize_dynamic cannot quantize {layer_type.__module__}.{layer_type.__name__}: "
                f"supported layer types are {supported} ({hint})"
            )
        checked.append(layer_type)
    return tuple(checked)


def quantize_dynamic(
    model: paddle.nn.Layer,
    layer_types: Sequence[type] = (paddle.nn.Linear,),
    weight_bits: int = 8,
    inplace: bool = False,
) -> paddle.nn.Layer:
    """Dynamic int8 quantization (PyTorch's ``torch.ao.quantization.quantize_dynamic``).

    Every layer of ``model`` of one of ``layer_types`` (and not marked ``skip_quant``)
    becomes a :class:`DynamicQuantizedLinear` (Linear) or :class:`DynamicQuantizedRNN` (LSTM,
    GRU). No calibration data is needed.

    Args:
        model: The fp32 model. Untouched unless ``inplace``.
        layer_types: Layer classes to quantize (subclasses of :data:`DYNAMIC_LAYER_TYPES`).
        weight_bits: Weight bit width, 2..8 (7 for CPUs without VNNI, see
            :class:`DynamicQuantizedLinear`).
        inplace: Replace the layers of ``model`` itself instead of a deep copy's.

    Returns:
        The dynamically quantized model (in the training/eval mode ``model`` was in).

    Raises:
        TypeError: ``model`` is not a Layer, ``layer_types`` does not hold layer classes, or
            ``weight_bits``/``inplace`` has the wrong type.
        ValueError: A layer type is not supported (named), ``weight_bits`` is out of range,
            ``model`` is already dynamically quantized or has no layer to quantize.
    """
    if not isinstance(model, paddle.nn.Layer):
        raise TypeError(f"model must be a paddle.nn.Layer, got {type(model).__name__}")
    layer_types = _check_layer_types(layer_types)
    if isinstance(weight_bits, bool) or not isinstance(weight_bits, (int, np.integer)):
        raise TypeError(f"weight_bits must be an int, got {type(weight_bits).__name__}")
    if not 2 <= int(weight_bits) <= 8:
        raise ValueError(f"weight_bits must be in 2..8 (int8 storage), got {weight_bits}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if dynamic_layers(model):
        raise ValueError(
            f"{type(model).__name__} is already dynamically quantized; pass the fp32 model"
        )
    check_quantizable(model)
    targets = [
        (name, layer) for name, layer in model.named_sublayers()
        if isinstance(layer, layer_types) and getattr(layer, "skip_quant", False) is not True
    ]
    # A subclass with a forward of its own (a masked weight, a post-processed output) would
    # lose it to the int8 layer that replaces it (measured: a masked Linear 1.37 of the
    # largest output off the fp32 model).
    own_forward = [(name, layer) for name, layer in targets if not _keeps_base_forward(layer)]
    if own_forward:
        logger.warning(
            "%d layers stay fp32: their class overrides the forward of the layer type "
            "quantize_dynamic replaces: %s", len(own_forward),
            ", ".join(f"{name} ({type(layer).__name__})" for name, layer in own_forward),
        )
        targets = [(name, layer) for name, layer in targets if _keeps_base_forward(layer)]
    if not targets:
        names = ", ".join(t.__name__ for t in layer_types)
        overridden = (
            f" whose forward it can replace (overridden: {', '.join(name for name, _ in own_forward)})"
            if own_forward else ""
        )
        raise ValueError(f"{type(model).__name__} has no layer of the types to quantize ({names}){overridden}")
    for name, layer in targets:  # before anything is replaced (inplace)
        if getattr(layer, "proj_size", 0):
            raise ValueError(
                f"layer {name!r}: quantize_dynamic cannot quantize an LSTM with proj_size > 0"
            )
    if not inplace:
        # Copy first, then find the same layers in the copy by name.
        model = copy.deepcopy(model)
        copied = dict(model.named_sublayers())
        targets = [(name, copied[name]) for name, _ in targets]
    for name, layer in targets:
        wrapper = DynamicQuantizedRNN if isinstance(layer, RNN_TYPES) else DynamicQuantizedLinear
        replace_sublayer(model, layer, wrapper(layer, int(weight_bits)))
    logger.info(
        "dynamically quantized %d layers of %s (int%d weights)",
        len(targets), type(model).__name__, int(weight_bits),
    )
    return model


def _keeps_base_forward(layer: paddle.nn.Layer) -> bool:
    """Whether ``layer`` computes the forward of the supported type it is an instance of."""
    return any(keeps_forward(layer, kind) for kind in DYNAMIC_LAYER_TYPES)


def dynamic_layers(
    model: paddle.nn.Layer,
) -> list[tuple[str, DynamicQuantizedLinear | DynamicQuantizedRNN]]:
    """The dynamically quantized layers of ``model`` by sublayer name (an RNN's own products
    are part of it, not listed)."""
    layers = list(model.named_sublayers())
    recurrent = tuple(f"{name}." for name, layer in layers if isinstance(layer, DynamicQuantizedRNN))
    return [
        (name, layer) for name, layer in layers
        if isinstance(layer, DynamicQuantizedRNN)
        or (isinstance(layer, DynamicQuantizedLinear) and not name.startswith(recurrent))
    ]
