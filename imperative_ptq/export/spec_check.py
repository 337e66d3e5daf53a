"""Checking an ``input_spec`` against the model before an export is written.

``paddle.jit.save`` traces a legacy program without checking that the shapes fit the weights:
an ``InputSpec([None, 5, 8, 8])`` for a Conv2D that takes 3 channels (or a 1x1 image for a 3x3
convolution without padding) gives a program that cannot run, and would replace a good export.
Running the model once in dygraph on zeros of the spec's shape finds the contradiction first.

Dynamic dimensions other than the batch have no size to check with: they are tried at a few
sizes, and when the model runs at none of them the export goes on with a warning (a model may
run at only one size the spec leaves open, which would otherwise be refused wrongly).
"""

from __future__ import annotations

import logging
from typing import Sequence

import paddle

__all__ = ["check_input_spec_runs", "DYNAMIC_SIZES"]

logger = logging.getLogger(__name__)

#: Sizes tried for the dynamic dimensions other than the batch (all set to the same size);
#: the spec is accepted if the model runs with any of them. 224 and 28: a Flatten + Linear head
#: trained on ImageNet or MNIST images runs at that size only; 64 and 256: strided models.
DYNAMIC_SIZES = (1, 28, 64, 224, 256)


def check_input_spec_runs(
    model: paddle.nn.Layer, input_spec: Sequence[paddle.static.InputSpec]
) -> None:
    """Runs ``model`` (in eval mode, without gradients) on zeros shaped like ``input_spec``.

    A dynamic (``None``/``-1``) batch dimension becomes 1; other dynamic dimensions are tried
    at each of :data:`DYNAMIC_SIZES`.

    Raises:
        ValueError: The spec fixes every dimension but the batch and the model fails on it
            (Paddle's error is quoted). With other dynamic dimensions a failure at every
            tried size is a warning.
    """
    dynamic = any(_is_dynamic(dim) for spec in input_spec for dim in list(spec.shape)[1:])
    sizes = DYNAMIC_SIZES if dynamic else DYNAMIC_SIZES[:1]
    error: Exception | None = None
    for size in sizes:
        inputs = [
            paddle.zeros(_concrete_shape(spec.shape, size), dtype=spec.dtype) for spec in input_spec
        ]
        try:
            with paddle.no_grad():
                model(*inputs)
            return
        except Exception as failure:  # noqa: BLE001 - any failure means the spec does not fit
            error = failure
    shapes = ", ".join(f"{list(spec.shape)} {spec.dtype}" for spec in input_spec)
    message = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {message[-1].strip() if message else ''}"
    if dynamic:
        logger.warning(
            "could not check input_spec [%s] against the model: it fails on zeros with batch 1 "
            "and the dynamic dimensions at %s (%s); exporting anyway. Fix those dimensions in "
            "input_spec to have them checked.", shapes, ", ".join(map(str, sizes)), reason,
        )
        return
    raise ValueError(
        f"input_spec [{shapes}] does not fit the model: it fails on zeros of that shape "
        f"(batch 1): {reason}. Nothing was written."
    ) from error


def _is_dynamic(dim: int | None) -> bool:
    return dim is None or dim == -1


def _concrete_shape(shape: Sequence[int | None], size: int) -> list[int]:
    """``shape`` with a dynamic batch dimension as 1 and other dynamic ones as ``size``."""
    return [
        (1 if position == 0 else size) if _is_dynamic(dim) else int(dim)
        for position, dim in enumerate(shape)
    ]
