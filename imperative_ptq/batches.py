"""Turning the batches of a user's data loader into calls of the model.

A batch is a tensor or array (one input), a tuple/list (positional inputs; items beyond the
number ``forward`` takes are dropped, so ``(images, labels)`` pairs work), or a dict (keyword
inputs; keys ``forward`` does not take are dropped, so ``{"image": ..., "label": ...}`` works).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import numpy as np
import paddle

__all__ = ["ModelCall", "batch_to_call"]

ModelCall = tuple[tuple[Any, ...], dict[str, Any]]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _tensor(value: Any) -> Any:
    return value if isinstance(value, paddle.Tensor) else paddle.to_tensor(np.asarray(value))


def batch_to_call(model: paddle.nn.Layer) -> Callable[[Any], ModelCall]:
    """A function mapping one batch to ``(args, kwargs)`` for ``model(*args, **kwargs)``.

    Positional items and dict values that are arrays become tensors; other dict values (flags,
    strings) are passed as they are.

    Raises (from the returned function):
        TypeError: A dict batch lacks a required input of ``model.forward``.
    """
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a builtin forward: nothing to inspect
        parameters = None
    if parameters is None or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        arity = None
    else:
        arity = sum(p.kind in _POSITIONAL for p in parameters)
    if parameters is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        keywords = None
    else:
        keywords = {p.name for p in parameters if p.kind in _KEYWORD}
    required = [
        p.name for p in parameters or []
        if p.kind in _KEYWORD and p.default is inspect.Parameter.empty
    ]

    def to_call(batch: Any) -> ModelCall:
        if isinstance(batch, dict):
            kwargs = {
                key: _tensor(value) if isinstance(value, (np.ndarray, paddle.Tensor)) else value
                for key, value in batch.items()
                if keywords is None or key in keywords
            }
            missing = [name for name in required if name not in kwargs]
            if missing:
                raise TypeError(
                    f"dict batch lacks input(s) {missing} of {type(model).__name__}.forward "
                    f"(batch keys: {sorted(map(str, batch))})"
                )
            return (), kwargs
        items = list(batch) if isinstance(batch, (list, tuple)) else [batch]
        if arity is not None and len(items) > arity:
            items = items[:arity]  # (inputs, labels) from a classification loader
        return tuple(_tensor(item) for item in items), {}

    return to_call
