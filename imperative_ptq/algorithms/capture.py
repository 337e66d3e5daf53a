"""What one layer of a model reads and writes on a list of batches (for the algorithms that
need data: bias correction, AdaRound).

Each capture runs the model only up to the layer: a hook records the tensor and stops the
forward, so capturing layer ``k`` costs the layers before it.
"""

from __future__ import annotations

from typing import Any, Sequence

import paddle

from ..batches import batch_to_call, eval_mode, run_batches
from ..quant_layers import QuantizedLayer, first_input

__all__ = ["capture_inputs", "capture_model_outputs", "capture_outputs", "execution_order", "quantized_layers_in_order"]


class _Captured(Exception):
    """Raised by a capture hook to stop the forward once the layer ran."""


def _run(model: paddle.nn.Layer, batches: Sequence[Any], hook_layer: paddle.nn.Layer,
         pre: bool, pick: Any) -> list[paddle.Tensor]:
    found: list[paddle.Tensor] = []

    def pre_hook(layer: paddle.nn.Layer, args: tuple, kwargs: dict) -> None:
        found.append(pick(first_input(layer, args, kwargs)))
        raise _Captured

    def post_hook(layer: paddle.nn.Layer, args: tuple, kwargs: dict, output: Any) -> None:
        found.append(pick(output))
        raise _Captured

    if pre:
        handle = hook_layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        handle = hook_layer.register_forward_post_hook(post_hook, with_kwargs=True)
    to_call = batch_to_call(model)
    try:
        with eval_mode(model), paddle.no_grad():
            for batch in batches:
                args, kwargs = to_call(batch)
                try:
                    model(*args, **kwargs)
                except _Captured:
                    continue
                raise ValueError(
                    f"{type(hook_layer).__name__} layer never ran in a forward of "
                    f"{type(model).__name__}: it cannot be captured"
                )
    finally:
        handle.remove()
    return found


def _detached(value: Any) -> paddle.Tensor:
    if not isinstance(value, paddle.Tensor):
        raise TypeError(f"expected a tensor, got {type(value).__name__}")
    return value.detach().clone()


def capture_inputs(
    model: paddle.nn.Layer, layer: paddle.nn.Layer, batches: Sequence[Any]
) -> list[paddle.Tensor]:
    """The first input of ``layer`` in ``model``'s forward of each batch (one tensor per
    batch)."""
    return _run(model, batches, layer, True, _detached)


def capture_outputs(
    model: paddle.nn.Layer, layer: paddle.nn.Layer, batches: Sequence[Any]
) -> list[paddle.Tensor]:
    """The output of ``layer`` in ``model``'s forward of each batch."""
    return _run(model, batches, layer, False, _detached)


def capture_model_outputs(model: paddle.nn.Layer, batches: Sequence[Any]) -> list[list[paddle.Tensor]]:
    """Every tensor ``model`` returns for each batch (nested tuples, lists and dicts flattened,
    dict values in key order)."""
    return _run(model, batches, model, False, _flat_tensors)


def _flat_tensors(value: Any) -> list[paddle.Tensor]:
    if isinstance(value, paddle.Tensor):
        return [value.detach().clone()]
    if isinstance(value, dict):
        return [tensor for key in sorted(value, key=str) for tensor in _flat_tensors(value[key])]
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in _flat_tensors(item)]
    return []


def execution_order(
    model: paddle.nn.Layer, layers: Sequence[paddle.nn.Layer], batch: Any
) -> list[paddle.nn.Layer]:
    """``layers`` in the order a forward of ``batch`` first calls them (layers it never
    calls are left out)."""
    order: list[paddle.nn.Layer] = []
    seen: set[int] = set()

    def record(layer: paddle.nn.Layer, args: tuple) -> None:
        if id(layer) not in seen:
            seen.add(id(layer))
            order.append(layer)

    handles = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        with eval_mode(model):
            run_batches(model, [batch])
    finally:
        for handle in handles:
            handle.remove()
    return order


def quantized_layers_in_order(
    quantized_model: paddle.nn.Layer, batch: Any
) -> list[tuple[str, QuantizedLayer]]:
    """The :class:`QuantizedLayer` s of ``quantized_model``, named, in the order a forward of
    ``batch`` first calls them (the order in which a layer sees its predecessors' corrected
    outputs)."""
    names = {id(layer): name for name, layer in quantized_model.named_sublayers()
             if isinstance(layer, QuantizedLayer)}
    layers = [layer for layer in quantized_model.sublayers() if id(layer) in names]
    return [(names[id(layer)], layer) for layer in execution_order(quantized_model, layers, batch)]
