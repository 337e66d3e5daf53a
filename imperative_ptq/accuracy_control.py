"""Quantization under an accuracy budget: one call that calibrates, tries the algorithms,
keeps the fewest layers in fp32 needed to stay within ``max_drop``, reports and exports.

    result = quantize_with_accuracy_control(model, calibration_batches, evaluate, max_drop=0.5)
    print(result.summary())

The candidates are tried from cheapest to dearest (by default: the config as given, then with
MSE and with percentile activation thresholds, then with bias correction, then with
cross-layer equalization and bias correction, then, for weights below 8 bits, with AdaRound
and bias correction); the first
within the budget with every layer quantized wins. If none is, the best one goes to
:func:`imperative_ptq.analysis.search_skip_set`, which ranks its layers by sensitivity
(:func:`~imperative_ptq.analysis.analyze`) and puts the fewest it can back in fp32.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from typing import Any, Callable, Iterable, Sequence

import paddle

from .algorithms import AdaRound, equalize, smooth_quant
from .analysis import SensitivityReport, analyze, search_skip_set
from .batches import eval_mode
from .config import PTQConfig, default_ptq_config
from .fuse import fuse_layers
from .ptq import ImperativePTQ
from .quantizers import HistQuantizer, MSEQuantizer
from .session import calibrating_session

__all__ = ["AccuracyControlResult", "Candidate", "default_candidates", "quantize_with_accuracy_control"]

logger = logging.getLogger(__name__)

#: The percentile candidate's ``hist_percent``: on a 102-conv layout detector whose depthwise
#: convs read a few huge channels, KL cost 0.25 of its class-score cosine and
#: ``HistQuantizer(hist_percent=0.9999)`` with two convs fp32 reached 0.968.
ACTIVATION_PERCENTILE = 0.9999


@dataclasses.dataclass
class Candidate:
    """One configuration tried, and the metric of its fully quantized model."""

    name: str
    config: PTQConfig
    metric: float | None = None


@dataclasses.dataclass
class AccuracyControlResult:
    """What :func:`quantize_with_accuracy_control` chose.

    Attributes:
        chosen: The candidate whose model was kept.
        ptq: Its :class:`ImperativePTQ` (export ``model`` with its ``save_quantized_model``).
        model: The converted model, with ``skip`` in fp32.
        fp32_metric: The fp32 model's metric.
        metric: ``model``'s metric.
        skip: Layers kept in fp32 (empty when a candidate met the budget fully quantized).
        within_budget: Whether ``fp32_metric - metric <= max_drop``.
        candidates: Every candidate tried, in order, with its fully quantized metric.
        report: The sensitivity ranking the fp32 search used (``None`` if none was needed).
    """

    chosen: Candidate
    ptq: ImperativePTQ
    model: paddle.nn.Layer
    fp32_metric: float
    metric: float
    skip: list[str]
    within_budget: bool
    candidates: list[Candidate]
    report: SensitivityReport | None = None

    def summary(self) -> str:
        """A few lines saying what was tried and chosen."""
        lines = [f"fp32 metric {self.fp32_metric:.6g}"]
        lines += [
            f"  {c.name}: {'not tried' if c.metric is None else f'{c.metric:.6g}'}"
            for c in self.candidates
        ]
        state = "within" if self.within_budget else "NOT within"
        lines.append(
            f"chosen: {self.chosen.name}, {len(self.skip)} layers in fp32 "
            f"({', '.join(self.skip) or 'none'}), metric {self.metric:.6g}, {state} budget"
        )
        return "\n".join(lines)


def default_candidates(config: PTQConfig) -> list[Candidate]:
    """``config``; with MSE and with percentile activation thresholds (each unless it is the
    configured algorithm); with bias correction; with cross-layer equalization and bias
    correction; and, for weights below 8 bits, with AdaRound and bias correction (cheapest
    first)."""
    def variant(**changes: Any) -> PTQConfig:
        arguments = dict(
            activation_quantizer=config.activation_quantizer,
            weight_quantizer=config.weight_quantizer,
            target=config.target,
            equalization=config.equalization,
            bias_correction=config.bias_correction,
            adaround=config.adaround,
            smooth_quant=config.smooth_quant,
        )
        arguments.update(changes)
        return PTQConfig(**arguments)

    candidates = [Candidate("as configured", config)]
    activations = config.activation_quantizer
    for name, quantizer in (
        ("MSE activations", MSEQuantizer(quant_bits=activations.quant_bits, symmetric=activations.symmetric)),
        ("percentile activations", HistQuantizer(
            quant_bits=activations.quant_bits, hist_percent=ACTIVATION_PERCENTILE, symmetric=activations.symmetric,
        )),
    ):
        if type(activations) is not type(quantizer):
            candidates.append(Candidate(name, variant(activation_quantizer=quantizer)))
    if not config.bias_correction:
        candidates.append(Candidate("bias correction", variant(bias_correction=True)))
    if not config.equalization:
        candidates.append(Candidate(
            "CLE + bias correction", variant(equalization=True, bias_correction=True)
        ))
    if config.adaround is None and config.weight_quantizer.quant_bits < 8:
        candidates.append(Candidate(
            "AdaRound + bias correction", variant(adaround=AdaRound(), bias_correction=True)
        ))
    return candidates


def quantize_with_accuracy_control(
    model: paddle.nn.Layer,
    data: Iterable[Any],
    evaluate: Callable[[paddle.nn.Layer], float],
    max_drop: float,
    config: PTQConfig = default_ptq_config,
    *,
    candidates: Sequence[Candidate] | None = None,
    fuse_list: Sequence[Sequence[str]] | None = None,
    path: str | os.PathLike | None = None,
    input_spec: Sequence[Any] | None = None,
    progress: bool = False,
) -> AccuracyControlResult:
    """Quantizes ``model`` keeping ``evaluate`` within ``max_drop`` of fp32, if it can.

    Args:
        model: The fp32 model (never modified).
        data: Calibration batches (kept in memory: every candidate calibrates on them, and
            the sensitivity analysis runs on them).
        evaluate: ``evaluate(model) -> float``, higher is better (e.g. accuracy on held-out
            data); called on fp32, quantized and partly fp32 models.
        max_drop: Largest acceptable ``fp32 metric - quantized metric`` (>= 0).
        config: The base configuration (:func:`default_candidates` derives the others).
        candidates: Configurations to try instead, cheapest first.
        fuse_list: Conv/BatchNorm pairs to fold (``ImperativePTQ.quantize(fuse=True)``).
        path: Export the chosen model there (``save_quantized_model``); needs ``input_spec``.
        input_spec: Input specs for the export.
        progress: Show progress bars.

    Returns:
        The :class:`AccuracyControlResult`. If even every layer in fp32 misses the budget, a
        warning names the best metric reached and ``within_budget`` is ``False``.

    Raises:
        TypeError: ``model`` is not a Layer, ``evaluate`` is not callable, ``max_drop`` is not a
            number, or a candidate is not a :class:`Candidate`.
        ValueError: ``max_drop`` is negative, ``data`` is empty, or ``path`` is given without
            ``input_spec``.
    """
    if not isinstance(model, paddle.nn.Layer):
        raise TypeError(f"model must be a paddle.nn.Layer, got {type(model).__name__}")
    if not callable(evaluate):
        raise TypeError(f"evaluate must be a callable model -> float, got {type(evaluate).__name__}")
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)):
        raise TypeError(f"max_drop must be a number, got {type(max_drop).__name__}")
    if not max_drop >= 0:
        raise ValueError(f"max_drop must be >= 0, got {max_drop!r}")
    if path is not None and input_spec is None:
        raise ValueError("path is given but input_spec is not: the export needs input specs")
    batches = list(data)
    if not batches:
        raise ValueError("data yielded no calibration batch")
    tried = list(default_candidates(config) if candidates is None else candidates)
    for candidate in tried:
        if not isinstance(candidate, Candidate):
            raise TypeError(f"candidates must be Candidate objects, got {type(candidate).__name__}")
    with eval_mode(model):
        fp32_metric = float(evaluate(model))
    floor = fp32_metric - max_drop
    best: tuple[Candidate, ImperativePTQ, paddle.nn.Layer] | None = None
    tried_configs: list[dict] = []
    for candidate in tried:
        unequalized = _without_idle_equalization(model, candidate.config, fuse_list)
        if unequalized in tried_configs:
            logger.info(
                "accuracy control: %s not tried: equalization finds no pair of layers in %s, so "
                "it is a candidate already tried", candidate.name, type(model).__name__,
            )
            continue
        tried_configs.append(unequalized)
        ptq = ImperativePTQ(candidate.config)
        quantized = ptq.quantize(model, fuse=fuse_list is not None, fuse_list=fuse_list)
        ptq.calibrate(quantized, batches, progress=progress)
        # (Each candidate is measured by the metric; no warning of the simulation per trial.)
        calibrating_session(quantized).compare_after_convert = False
        ptq.convert(quantized, progress=progress)
        with eval_mode(quantized):
            candidate.metric = float(evaluate(quantized))
        logger.info("accuracy control: %s -> %.6g (fp32 %.6g)", candidate.name, candidate.metric,
                    fp32_metric)
        if best is None or candidate.metric > best[0].metric:
            best = (candidate, ptq, quantized)
        if candidate.metric >= floor:
            break
    chosen, ptq, quantized = best
    skip: list[str] = []
    report = None
    metric = chosen.metric
    if metric < floor:
        reference = _fp32_reference(model, chosen.config, fuse_list, batches)
        report = analyze(reference, quantized, batches)
        search = search_skip_set(reference, quantized, evaluate, max_drop, report)
        quantized, skip, metric = search.model, search.skip, search.metric
    within = metric >= floor
    if not within:
        logger.warning(
            "accuracy control: the best metric %.6g (%s, %d layers in fp32) misses the budget "
            "%.6g - %.6g", metric, chosen.name, len(skip), fp32_metric, max_drop,
        )
    result = AccuracyControlResult(
        chosen, ptq, quantized, fp32_metric, metric, skip, within, tried, report
    )
    logger.info("accuracy control:\n%s", result.summary())
    if path is not None:
        ptq.save_quantized_model(quantized, path, input_spec)
    return result


def _without_idle_equalization(
    model: paddle.nn.Layer, config: PTQConfig, fuse_list: Sequence[Sequence[str]] | None
) -> dict:
    """``config.to_dict()``, with ``equalization`` off where it equalizes no pair of layers of
    ``model`` (fused by ``fuse_list``): the model that candidate quantizes is then the one
    without it (measured: a 102-conv detector converted from ONNX, whose "CLE + bias
    correction" repeated "bias correction" for 8.5 minutes)."""
    settings = config.to_dict()
    if config.equalization:
        fused = copy.deepcopy(model)
        if fuse_list is not None:
            fuse_layers(fused, fuse_list)
        _, pairs = equalize(fused, inplace=True, relu6=config.relu6_equalization)
        if not pairs:
            del settings["equalization"]
    return settings


def _fp32_reference(
    model: paddle.nn.Layer, config: PTQConfig, fuse_list: Sequence[Sequence[str]] | None,
    batches: list[Any],
) -> paddle.nn.Layer:
    """The fp32 model the quantized one was made from: ``model`` fused, equalized and
    smoothed (on the same batches) as ``ImperativePTQ`` does; deterministic, so the weights
    are the same."""
    reference = copy.deepcopy(model)
    reference.eval()
    if fuse_list is not None:
        fuse_layers(reference, fuse_list)
    if config.equalization:
        equalize(reference, inplace=True, relu6=config.relu6_equalization)
    if config.smooth_quant is not None:
        smooth_quant(reference, batches, config.smooth_quant, inplace=True)
    return reference
