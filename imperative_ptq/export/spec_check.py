"""Checking an ``input_spec`` against the model before an export is written.

``paddle.jit.save`` traces a legacy program without checking that the shapes fit the weights:
an ``InputSpec([None, 5, 8, 8])`` for a Conv2D that takes 3 channels (or a 1x1 image for a 3x3
convolution without padding) gives a program that cannot run, and would replace a good export.
Running the model once in dygraph on zeros of the spec's shape (ones for integer inputs)
finds the contradiction first.

Dynamic dimensions other than the batch have no size to check with: they are tried at a few
sizes, and when the model runs at none of them the export goes on with a warning (a model may
run at only one size the spec leaves open, which would otherwise be refused wrongly). A
dynamic batch is 1 first, then a few larger batches: a video model that folds its frames into
the batch (TSM's ``reshape([-1, frames, c, h, w])``) runs only on a multiple of its frame count.

The same run names each ``F.dropout`` the eval-mode model calls in training mode (its
``training`` defaults to True): the dygraph model drops values at random, and was calibrated on
activations scaled by ``1 / (1 - p)``, while Paddle Inference and ONNX Runtime run the op as the
identity (measured: a two-Linear MLP 0.67 off the simulation). Paddle's saved program marks
every dropout as an inference one, so only the dygraph run can tell.

Paddle 3.3.1's dygraph conv does not refuse an input smaller than its kernel: a 3x3 conv
without padding on a 1x1 image returns a tensor of shape ``[1, C, -1, -1]``, and the layers
after it then write through negative sizes (measured: an MTCNN-style PNet's PReLU and max-pool
after it corrupted the heap, and the export hung or died with ``free(): invalid next size``).
During the check every layer's output is therefore checked as it is written, and a negative
size fails that shape at once, before any layer reads it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from typing import Any, Iterator, Sequence

import paddle
import paddle.nn.functional as F

__all__ = ["check_input_spec_runs", "DYNAMIC_BATCHES", "DYNAMIC_SIZES", "error_summary"]

logger = logging.getLogger(__name__)

#: Sizes tried for the dynamic dimensions other than the batch (all set to the same size);
#: the spec is accepted if the model runs with any of them. 224 and 28: a Flatten + Linear head
#: trained on ImageNet or MNIST images runs at that size only; 64 and 256: strided models.
DYNAMIC_SIZES = (1, 28, 64, 224, 256)

#: Batch sizes tried for a dynamic batch dimension, in order: 1, then multiples of the frame
#: or clip counts of video and multi-view models (3, 4, 8, 16 segments ...).
DYNAMIC_BATCHES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def check_input_spec_runs(
    model: paddle.nn.Layer, input_spec: Sequence[paddle.static.InputSpec], name_dropouts: bool = True,
    examples: Sequence[Sequence[int]] | None = None,
) -> bool:
    """Runs ``model`` (in eval mode, without gradients) on zeros shaped like ``input_spec``
    (ones for integer inputs), naming the ``F.dropout`` calls in training mode unless
    ``name_dropouts`` is False (a check the export repeats).

    With ``examples`` (the input shapes of a calibration call, which the model ran on) whose
    sizes the spec allows, the dynamic dimensions take those sizes first (the batch 1, then the
    example's). Else, or if the model fails there, a dynamic (``None``/``-1``) batch dimension
    is tried at each of :data:`DYNAMIC_BATCHES` (1 first), other dynamic dimensions at each of
    :data:`DYNAMIC_SIZES`; the first shape the model runs on accepts the spec. The error quoted
    is that of batch 1. (A size of the grid can crash the process in a Paddle kernel: a CRNN's
    LSTM on a zero-width feature map at width 28 did, where its calibration width 320 runs.)

    Returns:
        Whether the model ran on a shape of the spec (False: it failed at every tried shape
        of a spec with dynamic dimensions besides the batch, which is a warning).

    Raises:
        ValueError: The spec fixes every dimension but the batch and the model fails on it
            at every tried batch (Paddle's error is quoted). With other dynamic dimensions a
            failure at every tried shape is a warning.
    """
    dynamic = any(_is_dynamic(dim) for spec in input_spec for dim in list(spec.shape)[1:])
    dynamic_batch = any(_is_dynamic(list(spec.shape)[0]) for spec in input_spec if list(spec.shape))
    sizes = DYNAMIC_SIZES if dynamic else DYNAMIC_SIZES[:1]
    batches = DYNAMIC_BATCHES if dynamic_batch else DYNAMIC_BATCHES[:1]
    error: Exception | None = None
    tried_shapes = _example_shapes(input_spec, examples) + [
        [_concrete_shape(spec.shape, size, batch) for spec in input_spec] for batch in batches for size in sizes
    ]
    for concrete in tried_shapes:
        inputs = [_zeros(spec, shape) for spec, shape in zip(input_spec, concrete)]
        try:
            watching = _training_dropouts_named(model) if name_dropouts else contextlib.nullcontext()
            with paddle.no_grad(), watching, _negative_sizes_refused(model):
                model(*inputs)
            return True
        except Exception as failure:  # noqa: BLE001 - any failure means the spec does not fit
            error = error or failure
    shapes = ", ".join(f"{list(spec.shape)} {spec.dtype}" for spec in input_spec)
    reason = f"{type(error).__name__}: {error_summary(error)}"
    tried = ", ".join(map(str, batches))
    if dynamic:
        logger.warning(
            "could not check input_spec [%s] against the model: it fails on zeros with batch "
            "%s and the dynamic dimensions at %s (%s); exporting anyway. Fix those dimensions "
            "in input_spec to have them checked.", shapes, tried, ", ".join(map(str, sizes)), reason,
        )
        return False
    raise ValueError(
        f"input_spec [{shapes}] does not fit the model: it fails on zeros of that shape "
        f"(batch {tried}): {reason}. Nothing was written."
    ) from error


#: The first line of a Paddle C++ error: ``(InvalidArgument) The input of Op(Conv) should ...``.
_PADDLE_SUMMARY = re.compile(r"^\s*\((?:[A-Z][A-Za-z]+)\) \S")


def error_summary(error: BaseException) -> str:
    """The line of ``error``'s message that says what went wrong: a Paddle C++ error's
    ``(InvalidArgument) ...`` line (its last lines are a generic ``[Hint: Expected ...]`` and
    ``[operator < conv2d > error]``: "kernel_iter == iter->second.end()" for a wrong dtype),
    else the last line; the error's type name for an empty message."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    summary = next((line for line in lines if _PADDLE_SUMMARY.match(line)), None)
    return (summary or (lines[-1] if lines else type(error).__name__)).rstrip(".")


@contextlib.contextmanager
def _training_dropouts_named(model: paddle.nn.Layer) -> Iterator[None]:
    """Warns, naming the calling lines, about the ``F.dropout`` calls in training mode that an
    eval-mode ``model`` makes while the block runs."""
    original = F.dropout
    callers: list[str] = []

    @paddle.jit.not_to_static
    def dropout(x: Any, p: Any = 0.5, axis: Any = None, training: bool = True, *args: Any, **kwargs: Any) -> Any:
        if training and not model.training and not (isinstance(p, (int, float)) and p == 0):
            frame = sys._getframe(1)
            callers.append(f"{frame.f_code.co_filename}:{frame.f_lineno} ({frame.f_code.co_name})")
        return original(x, p, axis, training, *args, **kwargs)

    F.dropout = dropout
    try:
        yield
    finally:
        F.dropout = original
    if callers:
        logger.warning(
            "%s: %d F.dropout call(s) run in training mode although the model is in eval mode "
            "(F.dropout's training defaults to True; pass training=self.training): the dygraph "
            "model drops values at random and was calibrated on them, the exported model does "
            "not drop; called at %s", type(model).__name__, len(callers),
            "; ".join(dict.fromkeys(callers)),
        )


@contextlib.contextmanager
def _negative_sizes_refused(model: paddle.nn.Layer) -> Iterator[None]:
    """Raises ``ValueError`` from a forward-post hook of any layer of ``model``
    (itself included) whose output tensor has a negative dimension, while the block runs."""

    def check(layer: paddle.nn.Layer, inputs: Any, outputs: Any) -> None:
        for tensor in _tensors(outputs):
            if any(size < 0 for size in tensor.shape):
                raise ValueError(
                    f"{type(layer).__name__} writes an output of shape {list(tensor.shape)}: the "
                    f"input is smaller than its kernel"
                )

    handles = [layer.register_forward_post_hook(check) for layer in model.sublayers(include_self=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _tensors(outputs: Any) -> Iterator[paddle.Tensor]:
    if isinstance(outputs, paddle.Tensor):
        yield outputs
    elif isinstance(outputs, (list, tuple)):
        for output in outputs:
            yield from _tensors(output)
    elif isinstance(outputs, dict):
        for output in outputs.values():
            yield from _tensors(output)


def _example_shapes(
    input_spec: Sequence[paddle.static.InputSpec], examples: Sequence[Sequence[int]] | None
) -> list[list[list[int]]]:
    """The input shapes to try first: the spec's with each dynamic dimension at the example's
    size, the batch at 1 and then at the example's; none if the examples do not fit the spec
    (another count or rank, a fixed size they contradict)."""
    if not examples or len(examples) != len(input_spec):
        return []
    for spec, example in zip(input_spec, examples):
        dims = list(spec.shape)
        if len(dims) != len(example) or any(
            not _is_dynamic(dim) and int(dim) != size for dim, size in zip(dims, example)
        ):
            return []
    full = [
        [int(size) if _is_dynamic(dim) else int(dim) for dim, size in zip(spec.shape, example)]
        for spec, example in zip(input_spec, examples)
    ]
    first = [
        [1 if position == 0 and _is_dynamic(dim) else size for position, (dim, size) in enumerate(zip(spec.shape, shape))]
        for spec, shape in zip(input_spec, full)
    ]
    return [first] if first == full else [first, full]


def _zeros(spec: paddle.static.InputSpec, shape: list[int]) -> paddle.Tensor:
    """Zeros of ``shape``; ones for an integer input. Counts and lengths of 0 can contradict
    the other inputs, which some Paddle kernels do not check: ``roi_align`` reading zero boxes
    per image from ``boxes_num`` beside a box tensor with rows crashed the process (a
    segmentation fault); ids and indices of 1 are valid wherever 0 is, given two entries."""
    if paddle.is_integer(paddle.zeros([1], dtype=spec.dtype)):
        return paddle.ones(shape, dtype=spec.dtype)
    return paddle.zeros(shape, dtype=spec.dtype)


def _is_dynamic(dim: int | None) -> bool:
    return dim is None or dim == -1


def _concrete_shape(shape: Sequence[int | None], size: int, batch: int = 1) -> list[int]:
    """``shape`` with a dynamic batch dimension as ``batch`` and other dynamic ones as ``size``."""
    return [
        (batch if position == 0 else size) if _is_dynamic(dim) else int(dim)
        for position, dim in enumerate(shape)
    ]
