"""The converted model's int8 simulation against the fp32 model on calibration batches.

``convert`` ends by running the simulation on up to four calibration calls (kept by the
session with the fp32 outputs they returned, drawn evenly from all calls) and logs the cosine of
each float output, over those calls, to the fp32 one; below :data:`WARN_BELOW` it warns, naming
the tools that find and fix the loss. Measured on
models with trained weights: a voice-activity detector whose STFT conv and spectrogram conv
quantized badly (cosine 0.866, a third of its decisions changed) and a layout detector on
``x86-vnni`` whose depthwise conv read a hardswish output of threshold 81 (cosine 0.74); both
converted without a word before. Face and object detectors and a layout detector that
quantize well logged 0.987-0.9988.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import paddle

from .analysis import OutputsStats
from .session import returned_tensors

__all__ = ["WARN_BELOW", "compare_with_fp32"]

logger = logging.getLogger(__name__)

#: The cosine of an output to the fp32 one below which ``convert`` warns.
WARN_BELOW = 0.95


def compare_with_fp32(
    model: paddle.nn.Layer, calls: Sequence[tuple[tuple, dict, Sequence[paddle.Tensor]]]
) -> list[float] | None:
    """Runs ``model`` (converted) on each call and logs the cosine of each float output, over
    all calls, to the fp32 outputs (``analyze``'s :class:`~imperative_ptq.analysis.OutputsStats`);
    warns where one is below :data:`WARN_BELOW`.

    Args:
        model: The converted model.
        calls: ``(args, kwargs, fp32 outputs)`` of calibration calls (none: nothing is compared).

    Returns:
        The cosines, or ``None`` where nothing could be compared (no call kept, the outputs
        differ in number or shape, the simulation fails on a call, an output is not finite).
    """
    stats = OutputsStats()
    for args, kwargs, fp32_outputs in calls:
        try:
            with paddle.no_grad():
                simulated = list(returned_tensors(model(*args, **kwargs)))
            if [list(t.shape) for t in simulated] != [list(t.shape) for t in fp32_outputs] or not all(
                bool(paddle.isfinite(t).all()) for t in [*simulated, *fp32_outputs]
            ):
                return None
            stats.add(list(fp32_outputs), simulated)
        except Exception as error:  # noqa: BLE001 - a check, never a reason for convert to fail
            logger.debug("the simulation was not compared with fp32: %s", error)
            return None
    if not stats.outputs:
        return None
    cosines = [output.cosine for output in stats.outputs]
    logger.info(
        "convert: on %d calibration batches the int8 simulation's output has cosine %s to the "
        "fp32 model's", len(calls), ", ".join(f"{cosine:.4f}" for cosine in cosines),
    )
    worst = int(np.argmin(cosines))
    if cosines[worst] < WARN_BELOW:
        logger.warning(
            "convert: on %d calibration batches the int8 simulation's output %d has cosine "
            "%.3f to the fp32 model's (below %.2f): int8 loses accuracy here. "
            "accuracy_control.quantize_with_accuracy_control(model, data, evaluate, max_drop) "
            "tries bias correction and equalization, then keeps the fewest layers fp32 that "
            "meet your metric; "
            "by hand, analysis.analyze(fp32_model, converted, batches) ranks the layers "
            "responsible, analysis.keep_fp32 keeps them fp32 (analysis.search_skip_set "
            "chooses), or try another activation quantizer (HistQuantizer(hist_percent=0.9999), "
            "MSEQuantizer) or ImperativeQAT.", len(calls), worst, cosines[worst], WARN_BELOW,
        )
    return cosines

