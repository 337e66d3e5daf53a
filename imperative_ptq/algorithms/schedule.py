"""When each accuracy algorithm runs in the PTQ pipeline.

``ImperativePTQ`` calls one function per stage; the algorithms of the config run there:

* :func:`prepare` (``quantize``): cross-layer equalization of the copy, data-free; keeps an fp32
  reference of the model for the algorithms that compare with it.
* :func:`before_calibration` (``calibrate``): SmoothQuant on the first batches, before any is
  observed; the batches AdaRound and bias correction will use are kept as they go by.
* :func:`after_convert` (``convert``): AdaRound, then bias correction, on those batches.
"""

from __future__ import annotations

import copy
import itertools
import logging
from typing import Any, Iterable, Iterator

import paddle

from ..config import PTQConfig
from ..session import MAX_CACHED_BATCHES, CalibrationSession
from .adaround import adaround
from .bias_correction import correct_bias, correct_bias_analytically
from .cross_layer_equalization import equalize
from .smooth_quant import apply_smoothing, smooth_quant

logger = logging.getLogger(__name__)

__all__ = ["after_convert", "algorithm_batches", "before_calibration", "check_convertible", "prepare"]


class _Sized:
    """An iterator that keeps its source's length (for the progress bar's total)."""

    def __init__(self, iterator: Iterator[Any], length: int) -> None:
        self._iterator, self._length = iterator, length

    def __iter__(self) -> Iterator[Any]:
        return self._iterator

    def __len__(self) -> int:
        return self._length


def prepare(model: paddle.nn.Layer, session: CalibrationSession, config: PTQConfig) -> None:
    """At ``quantize``, on the copy about to be hooked: equalizes it if the config asks, keeps
    the fp32 reference that AdaRound and bias correction compare with, and records the
    SmoothQuant still to apply."""
    if config.equalization:
        # ``model`` is the copy unless ``inplace``
        _, pairs = equalize(model, inplace=True, relu6=config.relu6_equalization)
        if not pairs:
            logger.warning(
                "PTQConfig(equalization=%r) found no pair of layers to equalize in %s: it "
                "looks for conv/Linear layers in a row inside an nn.Sequential (a BatchNorm and "
                "a ReLU/ReLU6 between them allowed); call imperative_ptq.equalize(model, "
                "chains=[[...]]) with the chains of your model before quantize",
                config.equalization, type(model).__name__,
            )
    if config.needs_data:
        session.reference = copy.deepcopy(model)
    session.smoothing = config.smooth_quant


def before_calibration(
    model: paddle.nn.Layer,
    session: CalibrationSession,
    data: Iterable[Any],
    max_batches: int | None,
) -> Iterable[Any]:
    """At ``calibrate``, before any batch is observed: applies SmoothQuant on ``data`` (to the
    model and its fp32 reference), and returns ``data`` with its batches kept as they go by
    for the algorithms of :func:`after_convert`.

    Raises:
        ValueError: SmoothQuant is configured but batches already ran through the hooks.
    """
    if session.smoothing is not None:
        session.flush()  # batches run by hand may still be on the worker thread
        if any(q.is_calibrated for q in session.quantizers().values()):
            raise ValueError(
                "PTQConfig(smooth_quant=...) must see the data before any batch is observed: "
                "batches already ran through the model's hooks; quantize again and calibrate "
                "with ImperativePTQ.calibrate only"
            )
        data = list(data if max_batches is None else itertools.islice(data, max_batches))
        session.detach()
        _, groups = smooth_quant(model, data, session.smoothing, inplace=True)
        if session.reference is not None:
            apply_smoothing(session.reference, groups)
        session.smoothing = None
    if session.reference is None:
        return data
    if hasattr(data, "__len__"):
        total = len(data) if max_batches is None else min(len(data), max_batches)
        return _Sized(session.keep_batches(data), total)
    return session.keep_batches(data)


def check_convertible(session: CalibrationSession) -> None:
    """Refuses ``convert`` while SmoothQuant still waits for ``calibrate``'s batches.

    Raises:
        ValueError: SmoothQuant is configured and ``calibrate`` was never called.
    """
    if session.smoothing is not None:
        raise ValueError(
            "PTQConfig(smooth_quant=...) smooths the model on the batches of "
            "ImperativePTQ.calibrate, which was not called"
        )


def algorithm_batches(
    session: CalibrationSession, config: PTQConfig, data: Iterable[Any] | None
) -> list[Any]:
    """The batches ``convert``'s algorithms run on: ``data``, else the kept calibration
    batches (empty when the config has no such algorithm).

    Raises:
        ValueError: The config asks for AdaRound or bias correction and there are no batches.
    """
    if not config.needs_data:
        return []
    batches = list(data) if data is not None else list(session.cached_batches)
    if not batches or session.reference is None:
        wanted = " and ".join(
            name for name, on in (("AdaRound", config.adaround is not None),
                                  ("bias correction", config.bias_correction)) if on
        )
        raise ValueError(
            f"{wanted} need calibration batches: calibrate with ImperativePTQ.calibrate "
            f"(it keeps the first {MAX_CACHED_BATCHES}) or pass convert(model, data=...)"
        )
    return batches


def after_convert(
    model: paddle.nn.Layer,
    session: CalibrationSession,
    config: PTQConfig,
    batches: list[Any],
    progress: bool,
) -> None:
    """At ``convert``, once the layers are quantized: AdaRound, then bias correction, on
    ``batches``; then drops the reference and the kept batches."""
    if batches:
        if config.adaround is not None:
            adaround(model, session.reference, batches, config.adaround, progress)
        if config.bias_correction == "analytical":
            correct_bias_analytically(model, session.reference, batches)
        elif config.bias_correction:
            correct_bias(model, session.reference, batches, progress)
    session.reference, session.cached_batches = None, []
