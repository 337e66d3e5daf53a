"""Turning the batches of a user's data loader into calls of the model, and the one loop that
runs a model over them (calibration, histograms) in eval mode.

A batch is a tensor or array (one input), a tuple/list (positional inputs; items beyond the
number ``forward`` takes are dropped, so ``(images, labels)`` pairs work), or a dict (keyword
inputs; keys ``forward`` does not take are dropped, so ``{"image": ..., "label": ...}`` works).
A positional input may itself be a dict or a list of tensors (``({"a": xa, "b": xb},)``,
``([xa, xb],)``): it is passed as that structure.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import paddle
from tqdm import tqdm

__all__ = ["ModelCall", "batch_to_call", "check_iterable_of_batches", "eval_mode", "run_batches", "run_hooked"]

logger = logging.getLogger(__name__)

ModelCall = tuple[tuple[Any, ...], dict[str, Any]]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _tensor(value: Any, float_dtype: np.dtype) -> Any:
    """``value`` as a tensor; an array (or list) of floats in ``float_dtype``, the model's (a
    float64 ``np.random.rand`` batch for a float32 model failed inside Paddle). A dict, or a
    list/tuple holding tensors, arrays or dicts (one input that is a structure: ``forward(self,
    inputs)`` reading ``inputs["image"]`` or ``inputs[0]``), keeps its structure, each array
    made a tensor (it was stacked into one array, or refused)."""
    if isinstance(value, paddle.Tensor):
        convert_dtype = paddle.base.data_feeder.convert_dtype
        if paddle.is_floating_point(value) and convert_dtype(value.dtype) != convert_dtype(float_dtype):
            return value.astype(str(float_dtype))  # (a float64 DataLoader batch, as for arrays)
        return value
    if isinstance(value, dict):
        return {key: _tensor(item, float_dtype) if _array_like(item) else item for key, item in value.items()}
    if isinstance(value, (list, tuple)) and any(_array_like(item) for item in value):
        return type(value)(_tensor(item, float_dtype) for item in value)
    array = np.asarray(value)
    if array.dtype.kind == "f" and array.dtype != float_dtype:
        array = array.astype(float_dtype)
    return paddle.to_tensor(array)


def _array_like(value: Any) -> bool:
    """A tensor, an array, or a structure of them (a dict or list value to convert)."""
    return isinstance(value, (paddle.Tensor, np.ndarray, dict, list, tuple))


def _float_dtype(model: paddle.nn.Layer) -> np.dtype:
    """The dtype of the model's first floating-point parameter (float32 without one)."""
    for parameter in model.parameters():
        if paddle.is_floating_point(parameter):
            return np.dtype(paddle.base.data_feeder.convert_dtype(parameter.dtype))
    return np.dtype(np.float32)


def batch_to_call(model: paddle.nn.Layer) -> Callable[[Any], ModelCall]:
    """A function mapping one batch to ``(args, kwargs)`` for ``model(*args, **kwargs)``.

    Positional items and dict values that are arrays become tensors (float arrays in the dtype
    of the model's parameters); other dict values (flags, strings) are passed as they are.

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
    float_dtype = _float_dtype(model)
    warned: list[bool] = []

    def to_call(batch: Any) -> ModelCall:
        if isinstance(batch, dict):
            kwargs = {
                key: _tensor(value, float_dtype) if isinstance(value, (np.ndarray, paddle.Tensor)) else value
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
        if isinstance(batch, list) and _nested_numbers(batch):
            batch = np.asarray(batch)  # one input written as a nested list (``x.tolist()``)
        items = list(batch) if isinstance(batch, (list, tuple)) else [batch]
        if arity is not None and len(items) > arity:
            dropped, items = items[arity:], items[:arity]  # (inputs, labels) from a loader
            if not warned and _looks_like_inputs(items, dropped):
                warned.append(True)
                logger.warning(
                    "%s.forward takes %d positional input(s) but batches hold %d items shaped "
                    "like inputs: the extra ones are dropped as labels. If forward takes them "
                    "as one list, give each batch as a 1-tuple: ([x1, x2],)",
                    type(model).__name__, arity, arity + len(dropped),
                )
        return tuple(_tensor(item, float_dtype) for item in items), {}

    return to_call


def _nested_numbers(value: list) -> bool:
    """Whether ``value`` is a nested list of numbers of at least two levels (one array),
    not a list of inputs."""
    if not value or not isinstance(value[0], list):
        return False
    try:
        array = np.asarray(value)
    except ValueError:  # ragged
        return False
    return array.ndim >= 2 and array.dtype.kind in "fiub"


def _looks_like_inputs(kept: list[Any], dropped: list[Any]) -> bool:
    """Whether a dropped batch item is a float tensor or array shaped like a kept one (a list
    of inputs read as positional inputs, not a label)."""
    shapes = {tuple(item.shape) for item in kept if isinstance(item, (paddle.Tensor, np.ndarray))}
    return any(
        isinstance(item, (paddle.Tensor, np.ndarray)) and tuple(item.shape) in shapes
        and (paddle.is_floating_point(item) if isinstance(item, paddle.Tensor) else item.dtype.kind == "f")
        for item in dropped
    )


@contextlib.contextmanager
def eval_mode(*models: paddle.nn.Layer) -> Iterator[None]:
    """Runs the block with ``models`` in eval mode (batch-norm statistics untouched, dropout
    off) and restores each one's mode afterwards."""
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, training in zip(models, modes):
            if training:
                model.train()


def check_iterable_of_batches(data: Any) -> None:
    """Refuses a single array or tensor where an iterable of batches belongs.

    Iterating it would run its rows one by one, each a batch one rank short of the model's
    input (measured: a [32, 8] array gave 32 rank-1 "batches", and the export that takes its
    input_spec from them a rank-1 program).

    Raises:
        TypeError: ``data`` is a numpy array or a paddle Tensor.
    """
    if isinstance(data, (np.ndarray, paddle.Tensor)):
        raise TypeError(
            f"data is a single {type(data).__module__.split('.')[0]}.{type(data).__name__} of "
            f"shape {list(data.shape)}, not an iterable of batches: pass [data] to run it as one "
            f"batch, or a list of batches (np.array_split(data, n), a DataLoader)"
        )


def run_batches(
    model: paddle.nn.Layer,
    data: Iterable[Any],
    max_batches: int | None = None,
    progress: bool = False,
    description: str = "batches",
    time_budget: float | None = None,
) -> int:
    """Calls ``model`` on each batch of ``data`` without gradients; returns how many ran.

    Args:
        model: The model (its mode is the caller's business: see :func:`eval_mode`).
        data: Batches in any form :func:`batch_to_call` takes.
        max_batches: Stop after this many batches.
        progress: Show a tqdm bar.
        description: The bar's label.
        time_budget: Stop once this many seconds have passed (after the running batch).

    Raises:
        TypeError: ``data`` is a single array or tensor.
    """
    check_iterable_of_batches(data)
    total = max_batches
    if total is None and hasattr(data, "__len__"):
        total = len(data)  # type: ignore[arg-type]
    batches = data if max_batches is None else itertools.islice(data, max_batches)
    deadline = None if time_budget is None else time.monotonic() + time_budget
    to_call = batch_to_call(model)
    count = 0
    with paddle.no_grad():
        # (delay: a bar only for loops that last; a few batches finish before it would show.)
        bar = tqdm(
            batches, total=total, desc=description, unit="batch", disable=not progress, delay=1.0
        )
        for batch in bar:
            args, kwargs = to_call(batch)
            model(*args, **kwargs)
            count += 1
            if deadline is not None and time.monotonic() >= deadline:
                logger.info("%s: time budget reached after %d batches", description, count)
                break
        bar.close()
    return count


def run_hooked(model: paddle.nn.Layer, data: Iterable[Any], handles: Iterable[Any]) -> int:
    """Runs ``data`` through ``model`` in eval mode (:func:`run_batches`) with hooks installed,
    then removes their ``handles`` whatever happened; returns how many batches ran."""
    try:
        with eval_mode(model):
            return run_batches(model, data)
    finally:
        for handle in handles:
            handle.remove()
