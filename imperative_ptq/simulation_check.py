"""The converted model's int8 simulation against the fp32 model on a calibration batch.

``convert`` ends by running the simulation on the last calibration call (kept by the session
with the fp32 outputs it returned) and logs the cosine of each float output to the fp32 one;
below :data:`WARN_BELOW` it warns, naming the tools that find and fix the loss. Measured on
models with trained weights: a voice-activity detector whose STFT conv and spectrogram conv
quantized badly (cosine 0.866, a third of its decisions changed) and a layout detector on
``x86-vnni`` whose depthwise conv read a hardswish output of threshold 81 (cosine 0.74); both
converted without a word before. Classifiers and detectors that quantize well stay above
0.99.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import paddle

from .session import returned_tensors

__all__ = ["WARN_BELOW", "compare_with_fp32"]

logger = logging.getLogger(__name__)

#: The cosine of an output to the fp32 one below which ``convert`` warns.
WARN_BELOW = 0.95


def compare_with_fp32(
    model: paddle.nn.Layer, call: tuple[tuple, dict] | None, fp32_outputs: Sequence[np.ndarray] | None
) -> list[float] | None:
    """Runs ``model`` (converted) on ``call`` and logs each float output's cosine to
    ``fp32_outputs``; warns where one is below :data:`WARN_BELOW`.

    Args:
        model: The converted model.
        call: ``(args, kwargs)`` of a calibration call, or ``None`` (nothing is compared).
        fp32_outputs: The float outputs the model returned on it before conversion.

    Returns:
        The cosines, or ``None`` where nothing could be compared (no call kept, the outputs
        differ in number or shape, the simulation fails on it, an output is not finite).
    """
    if call is None or not fp32_outputs:
        return None
    args, kwargs = call
    try:
        with paddle.no_grad():
            simulated = [value.numpy() for value in returned_tensors(model(*args, **kwargs))]
    except Exception as error:  # noqa: BLE001 - a check, never a reason for convert to fail
        logger.debug("the simulation was not compared with fp32: %s", error)
        return None
    if len(simulated) != len(fp32_outputs) or any(
        a.shape != b.shape or not (np.isfinite(a).all() and np.isfinite(b).all())
        for a, b in zip(simulated, fp32_outputs)
    ):
        return None
    cosines = [_cosine(a, b) for a, b in zip(simulated, fp32_outputs)]
    logger.info(
        "convert: the int8 simulation's output on the last calibration batch has cosine %s to "
        "the fp32 model's", ", ".join(f"{cosine:.4f}" for cosine in cosines),
    )
    worst = int(np.argmin(cosines))
    if cosines[worst] < WARN_BELOW:
        logger.warning(
            "convert: on the last calibration batch the int8 simulation's output %d has cosine "
            "%.3f to the fp32 model's (below %.2f): int8 loses accuracy here. "
            "analysis.analyze(fp32_model, converted, batches) ranks the layers responsible; "
            "keep them fp32 with analysis.keep_fp32 (or let analysis.search_skip_set choose), "
            "or try a percentile/MSE activation quantizer, PTQConfig(equalization=True) for "
            "depthwise convs, or ImperativeQAT.", worst, cosines[worst], WARN_BELOW,
        )
    return cosines


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    if norms == 0:
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(a @ b / norms)
