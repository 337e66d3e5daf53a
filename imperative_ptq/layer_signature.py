"""What each calibrated layer was measured on, recorded in tables and state files and checked
when they are loaded.

Layer names alone do not identify a layer: a model whose ``conv1`` has 16 output channels
instead of 8, or whose ``fc`` reads 64 features instead of 32, has the same names, and its
thresholds are not interchangeable. A *signature* records, per hooked layer::

    {"layer": "Conv2D", "weight_shape": [8, 3, 3, 3], "channels": 8,
     "quantizers": {"input": {"type": "KLQuantizer", "config": {...}}, "output": {...},
                    "weight": {"type": "PerChannelAbsmaxQuantizer", "config": {...}}}}

(``weight_shape`` and ``channels`` are ``null`` for a layer without a weight). Files written
before signatures were recorded have none and load unchecked.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import paddle

from .quantizers import BaseQuantizer
from .registry import PTQRegistry
from .session import LayerState

__all__ = ["LayerSignatures", "check_signatures", "layer_signatures"]

#: Layer name -> signature (JSON-ready).
LayerSignatures = dict[str, dict[str, Any]]

#: Fields compared, in order, and how an error message names them.
_FIELDS = (("layer", "layer type"), ("channels", "channel count"), ("weight_shape", "weight shape"))


def layer_signatures(states: Sequence[tuple[paddle.nn.Layer, LayerState]]) -> LayerSignatures:
    """The signature of every hooked layer, keyed by its name, in sublayer order."""
    return {state.name: _signature(layer, state) for layer, state in states}


def _signature(layer: paddle.nn.Layer, state: LayerState) -> dict[str, Any]:
    info = PTQRegistry.layer_info(layer)
    weight = getattr(layer, "weight" if info is None else info.weight_attribute, None)
    weight_shape = list(weight.shape) if isinstance(weight, paddle.Tensor) else None
    axis = None if info is None else info.weight_channel_axis
    channels = None if weight_shape is None or axis is None else int(weight_shape[axis])
    roles = {
        "input": state.input_quantizer,
        "output": state.output_quantizer,
        "weight": state.weight_quantizer,
    }
    signature = {
        "layer": type(layer).__name__,
        "weight_shape": weight_shape,
        "channels": channels,
        "quantizers": {
            role: _describe_quantizer(quantizer)
            for role, quantizer in roles.items()
            if quantizer is not None
        },
    }
    # As it reads back from a file (tuples become lists), so comparisons see equal values.
    return json.loads(json.dumps(signature))


def _describe_quantizer(quantizer: BaseQuantizer) -> dict[str, Any]:
    return {"type": type(quantizer).__name__, "config": quantizer.config()}


def check_signatures(
    path: Any, recorded: Any, current: Mapping[str, Mapping[str, Any]]
) -> None:
    """Raises ``ValueError`` naming the first layer of ``current`` whose recorded signature
    differs, and how.

    Args:
        path: The file, for the message.
        recorded: The signatures a file holds; ``None`` for a file written before they were
            recorded (nothing is checked).
        current: :func:`layer_signatures` of the model loading the file. A layer the file
            does not record is left to the loader's own check of the layer names.

    Raises:
        ValueError: ``recorded`` is malformed or differs from ``current``.
    """
    if recorded is None:
        return
    if not isinstance(recorded, dict) or not all(isinstance(v, dict) for v in recorded.values()):
        raise ValueError(f"{path}: the layer signatures must map layer names to objects")
    for name, signature in current.items():
        stored = recorded.get(name)
        if stored is None:
            continue
        for field, label in _FIELDS:
            if stored.get(field) != signature[field]:
                raise ValueError(
                    f"{path}: layer {name!r} was measured on another architecture: {label} "
                    f"{stored.get(field)!r} in the file, {signature[field]!r} in the model"
                )
        _check_quantizers(path, name, stored.get("quantizers"), signature["quantizers"])


def _check_quantizers(
    path: Any, name: str, stored: Any, current: Mapping[str, Mapping[str, Any]]
) -> None:
    if not isinstance(stored, dict):
        raise ValueError(f"{path}: layer {name!r} records no quantizers")
    if set(stored) != set(current):
        raise ValueError(
            f"{path}: layer {name!r} was measured with quantizers for {sorted(stored)}, the "
            f"model quantizes {sorted(current)}"
        )
    for role, description in current.items():
        other = stored[role]
        if not isinstance(other, dict) or other.get("type") != description["type"]:
            found = other.get("type") if isinstance(other, dict) else other
            raise ValueError(
                f"{path}: layer {name!r} {role} was measured with {found!r}, the model uses "
                f"{description['type']!r}"
            )
        if other.get("config") != description["config"]:
            raise ValueError(
                f"{path}: layer {name!r} {role} was measured with {description['type']} "
                f"arguments {other.get('config')!r}, the model uses {description['config']!r}"
            )
