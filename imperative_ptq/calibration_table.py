"""Calibration tables: per-layer thresholds, built from a calibration session, applied back to
one, and stored as a versioned JSON file.

Format (version 1)::

    {"format": "imperative_ptq.calibration_table", "format_version": 1,
     "config": {"activation_quantizer": {...}, "weight_quantizer": {...}},
     "layers": {"conv1": {"input": [t], "output": [t], "weight": [t_c0, t_c1, ...]}, ...}}

Layer names are those of ``model.named_sublayers()``. Files are written atomically (temporary
file, then rename), so a crash never leaves a truncated table.

A role calibrated by an affine quantizer (``symmetric=False``) also records its uint8
parameters next to its thresholds, one per threshold: ``"output_scale": [s]``,
``"output_zero_point": [z]`` (likewise ``input_*``, and ``weight_*`` per channel). Symmetric
entries hold thresholds only, exactly as before.

An optional top-level ``"input_minima": {"fc1": m, ...}`` holds the smallest input value
calibration saw for each simulated layer: a non-negative input runs as u8 on the x86 targets
(:mod:`imperative_ptq.targets`). A layer missing from it is read as having a signed input.

An optional top-level ``"measured_on": {"conv1": {...}, ...}`` records what each layer was
calibrated on (layer type, weight shape, channel count, quantizers:
:mod:`imperative_ptq.layer_signature`); a table is refused by a model whose layers differ.
Tables written before it was recorded load unchecked.

An optional top-level ``"structure": {"layer1.0.relu": {...}, ...}`` records what calibration
saw of the model's graph beside the thresholds (each layer's input sources and rank, the
residual adds Paddle Inference fuses into an int8 conv, inputs written s8 or as wide u8 codes:
:mod:`imperative_ptq.calibration_structure`), so a model that loads the table converts and
exports exactly as the calibrated one. Tables written before it was recorded load as before:
the model keeps what its own calibration batches (if any) observed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
import paddle

from .calibration_structure import STRUCTURE, apply_structure, check_structure
from .collector import CalibrationError
from .files import atomic_file
from .functional_matmul import missing_site_hint
from .probabilities import probability_thresholds
from .quantizers import BaseQuantizer, QuantParams
from .quantizers.qparams import affine_levels
from .registry import PTQRegistry, layer_weight
from .session import LayerState

__all__ = [
    "FORMAT_VERSION", "CalibrationTable", "TableFile", "apply_table", "build_table", "first_names",
    "input_minima", "read_table", "read_table_file", "table_of_every_layer", "write_table",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "imperative_ptq.calibration_table"
FORMAT_VERSION = 1
ROLES = ("input", "second_input", "output", "weight")
#: Optional affine parameters of each role.
AFFINE_KEYS = tuple(f"{role}_{kind}" for role in ROLES for kind in ("scale", "zero_point"))
#: Top-level section: layer name -> smallest input value seen in calibration.
INPUT_MINIMA = "input_minima"
#: Top-level section: layer name -> what it was measured on (see layer_signature).
MEASURED_ON = "measured_on"

CalibrationTable = dict[str, dict[str, list[float]]]
#: The hooked layers of a model and their calibration state, in ``named_sublayers`` order.
HookedLayers = Sequence[tuple[paddle.nn.Layer, LayerState]]


# ------------------------------------------------------------------------ session -> table
def build_table(hooked: HookedLayers, allow_empty: bool = False) -> CalibrationTable:
    """Thresholds from the statistics gathered so far, keyed by sublayer name.

    Returns:
        ``{name: {"output": [...], "input": [...], "weight": [...]}}``; ``input`` and
        ``weight`` for simulated-quant layers (``input`` only if the first input was a float
        tensor), ``input`` and ``second_input`` for a matmul of two activations, ``weight`` one value per output channel for per-channel quantizers; affine
        quantizers add ``<role>_scale`` and ``<role>_zero_point``. Layers that never ran are
        left out (with a warning).

    Args:
        hooked: The session's layers and their states.
        allow_empty: Return an empty table rather than raise when no layer has statistics
            (batches ran, but nothing in the model computes an op this package quantizes:
            a model of ``paddle.nn.SimpleRNN`` layers, which run Paddle's fused rnn op).

    Raises:
        CalibrationError: No layer saw a calibration batch (and not ``allow_empty``).
    """
    table: CalibrationTable = {}
    missing, unobserved, no_input = [], [], []
    for layer, state in hooked:
        if not state.output_quantizer.is_calibrated and not (
            state.input_quantizer is not None and state.input_quantizer.is_calibrated
        ):
            # A layer with a weight would have been quantized; an observed one (a pool, an
            # activation a model holds for another mode, e.g. PaddleClas' unused AvgPool2D)
            # only loses an output threshold nothing reads.
            (missing if state.weight_quantizer is not None else unobserved).append(state.name)
            continue
        entry: dict[str, list] = {}
        # A layer whose first input was never a float tensor keeps only its output
        # thresholds (``convert`` leaves it fp32 with those).
        if state.input_quantizer is not None and state.input_quantizer.is_calibrated:
            entry["input"] = probability_thresholds(
                state, state.input_quantizer, _activation_thresholds(state.input_quantizer)
            )
            _add_affine_params(entry, "input", state.input_quantizer)
        elif state.input_quantizer is not None:
            no_input.append(state.name)
        second = state.second_input_quantizer
        if second is not None and second.is_calibrated:
            entry["second_input"] = _activation_thresholds(second)
        if state.output_quantizer.is_calibrated:
            entry["output"] = _activation_thresholds(state.output_quantizer)
            _add_affine_params(entry, "output", state.output_quantizer)
        if state.weight_quantizer is not None:
            entry["weight"] = _weight_thresholds(layer, state.weight_quantizer)
            _add_affine_params(entry, "weight", state.weight_quantizer)
        table[state.name] = entry
    if not table and not allow_empty:
        raise CalibrationError(
            "no calibration data: run batches through the quantized model before asking "
            "for thresholds"
        )
    if missing:
        logger.warning(
            "%d hooked layers never ran during calibration and stay in fp32: %s",
            len(missing), first_names(missing),
        )
    if unobserved:
        logger.info(
            "%d observed layers (no weight) never ran during calibration: %s",
            len(unobserved), first_names(unobserved),
        )
    if no_input:
        logger.warning(
            "%d layers never got a floating-point input: only their outputs are calibrated: "
            "%s", len(no_input), first_names(no_input),
        )
    return table


def table_of_every_layer(table: CalibrationTable, hooked: HookedLayers) -> CalibrationTable:
    """``table`` with an empty entry for every hooked layer that saw no data: the layers of a
    table file, which then names every hooked layer and loads back into the model."""
    return {state.name: table.get(state.name, {}) for _, state in hooked}


def input_minima(hooked: HookedLayers) -> dict[str, float]:
    """The smallest input value seen by each simulated layer whose input was observed."""
    minima = {state.name: input_minimum(state) for _, state in hooked}
    return {name: value for name, value in minima.items() if value is not None}


def input_minimum(state: LayerState) -> float | None:
    """The smallest input value calibration saw (``None``: unknown, read as signed)."""
    return None if state.input_quantizer is None else state.input_quantizer.minimum


# ------------------------------------------------------------------------ table -> session
def apply_table(hooked: HookedLayers, table: TableFile, path: str | os.PathLike) -> None:
    """Sets every hooked layer's thresholds (and input minimum, and the structure calibration
    observed when the file records it) from a table file.

    Args:
        hooked: The model's hooked layers.
        table: The file's content (:func:`read_table_file`).
        path: The file, for error messages.

    Raises:
        ValueError: The table does not describe exactly the hooked layers (the first mismatch
            is named), or a layer lacks a role's thresholds.
    """
    layers, minima = table.layers, table.input_minima
    known = {state.name for _, state in hooked}
    extra = [name for name in layers if name not in known]
    if extra:
        raise ValueError(
            f"{path}: layer {extra[0]!r} is not a quantized layer of the model"
            f"{missing_site_hint(extra[0])}"
        )
    for layer, state in hooked:
        entry = layers.get(state.name)
        if entry is None and PTQRegistry.is_observed_only(layer):
            continue  # a functional concat/multiply, which tables written before them lack
        if entry is None:
            raise ValueError(f"{path}: quantized layer {state.name!r} is missing from the table")
        if not entry:  # the layer saw no data when the table was written: it stays fp32
            continue
        if state.second_input_quantizer is not None and "second_input" in entry:
            state.second_input_quantizer.set_thresholds(entry["second_input"])
        roles = {"output": state.output_quantizer, "input": state.input_quantizer}
        for role, quantizer in roles.items():
            if quantizer is None:
                continue
            if role not in entry:
                if ("input" if role == "output" else "output") in entry:
                    continue  # its first input was no float tensor (see build_table)
                raise ValueError(f"{path}: layer {state.name!r} has no {role} thresholds")
            quantizer.set_thresholds(entry[role])
            _load_affine_params(entry, role, quantizer, per_channel=False)
            if role == "input":
                # Unknown in tables written before the sign was recorded: signed then.
                quantizer.minimum = minima.get(state.name)
        if state.weight_quantizer is not None:
            weight = entry.get("weight")
            channels = _weight_channels(layer)
            if weight is None or len(weight) not in (1, channels):
                raise ValueError(
                    f"{path}: layer {state.name!r} needs 1 or {channels} weight thresholds, "
                    f"got {0 if weight is None else len(weight)}"
                )
            state.weight_quantizer.set_thresholds([weight if len(weight) > 1 else weight[0]])
            _load_affine_params(entry, "weight", state.weight_quantizer, per_channel=True)
    if table.structure is not None:  # last: a failed entry above leaves it as it was
        apply_structure((state for _, state in hooked), table.structure)


def _activation_thresholds(quantizer: BaseQuantizer) -> list[float]:
    quantizer.cal_thresholds()
    return [float(t) for t in quantizer.thresholds]


def _weight_thresholds(layer: paddle.nn.Layer, quantizer: BaseQuantizer) -> list[float]:
    """One threshold per output channel (or one per tensor); the weight is sampled here, once,
    unless a table already set the thresholds."""
    if not quantizer.is_calibrated:
        quantizer.sample_data(layer, (layer_weight(layer),))
    quantizer.cal_thresholds()
    (value,) = quantizer.thresholds
    return [float(t) for t in value] if isinstance(value, list) else [float(value)]


def _weight_channels(layer: paddle.nn.Layer) -> int:
    axis = PTQRegistry.layer_info(layer).weight_channel_axis
    return int(layer_weight(layer).shape[axis])


def _add_affine_params(entry: dict[str, list], role: str, quantizer: BaseQuantizer) -> None:
    """Records ``<role>_scale`` / ``<role>_zero_point`` for an affine quantizer (symmetric
    entries stay thresholds only, as Paddle's tables are)."""
    if quantizer.symmetric:
        return
    params = quantizer.quant_params()
    if all(p.symmetric for p in params):
        return  # loaded from a symmetric table: nothing affine to record
    if role == "weight":
        (only,) = params
        entry["weight_scale"] = list(np.atleast_1d(only.scale).astype(float))
        entry["weight_zero_point"] = [int(z) for z in np.atleast_1d(only.zero_point)]
        return
    entry[f"{role}_scale"] = [float(p.scale) for p in params]
    entry[f"{role}_zero_point"] = [int(p.zero_point) for p in params]


def _load_affine_params(
    entry: Mapping[str, list], role: str, quantizer: BaseQuantizer, per_channel: bool
) -> None:
    """Freezes the affine parameters of ``role`` recorded in a table entry, if any."""
    scales, zero_points = entry.get(f"{role}_scale"), entry.get(f"{role}_zero_point")
    if scales is None:
        return
    bits = quantizer.quant_bits
    dtype = "uint8" if bits <= 8 else "int32"
    if per_channel:
        params = [QuantParams(list(scales), list(zero_points), dtype, 0, affine_levels(bits))]
    else:
        params = [
            QuantParams(float(s), int(z), dtype, 0, affine_levels(bits))
            for s, z in zip(scales, zero_points)
        ]
    quantizer.set_quant_params(params)


def first_names(names: Sequence[str], count: int = 10) -> str:
    """The first ``count`` of ``names`` for a log line, ``...`` if there are more."""
    return ", ".join(names[:count]) + (" ..." if len(names) > count else "")


# ------------------------------------------------------------------------------ the file


def write_table(
    path: str | os.PathLike,
    layers: Mapping[str, Mapping[str, list[float]]],
    config: Any,
    input_minima: Mapping[str, float] | None = None,
    measured_on: Mapping[str, Any] | None = None,
    structure: Mapping[str, Any] | None = None,
) -> None:
    """Writes ``layers`` (and the config that produced them, the smallest input value of
    each simulated layer when known, what each layer was measured on, and the structure
    calibration observed: :func:`~imperative_ptq.calibration_structure.structure_of`) to
    ``path`` atomically."""
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": config,
        "layers": {name: dict(roles) for name, roles in layers.items()},
    }
    if input_minima:
        document[INPUT_MINIMA] = {name: float(value) for name, value in input_minima.items()}
    if measured_on:
        document[MEASURED_ON] = dict(measured_on)
    if structure is not None:
        document[STRUCTURE] = dict(structure)
    with atomic_file(path) as file:
        json.dump(document, file, indent=1)


@dataclasses.dataclass
class TableFile:
    """A calibration table file: its layers, the config that produced them, the smallest
    input value of each simulated layer (empty for tables written before it was recorded) and
    what each layer was measured on and the structure calibration observed (each ``None`` for
    tables written before it was recorded)."""

    layers: CalibrationTable
    config: dict[str, Any]
    input_minima: dict[str, float]
    measured_on: dict[str, Any] | None = None
    structure: dict[str, Any] | None = None


def read_table(path: str | os.PathLike) -> tuple[CalibrationTable, dict[str, Any]]:
    """Reads and validates a calibration table.

    Returns:
        ``(layers, config)``: :func:`read_table_file` without the input minima.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: See :func:`read_table_file`.
    """
    table = read_table_file(path)
    return table.layers, table.config


def read_table_file(path: str | os.PathLike) -> TableFile:
    """Reads and validates a calibration table, input minima included.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is not a calibration table, has an unknown format version, holds
            a threshold that is not a finite positive number, input minima that are not
            finite numbers, or a malformed structure section (the layer is named).
    """
    with open(path, encoding="utf-8") as file:
        try:
            document = json.load(file)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not a calibration table (invalid JSON: {error})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not an imperative_ptq calibration table")
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has calibration table format version {version!r}; "
            f"this imperative_ptq reads version {FORMAT_VERSION}"
        )
    layers = document.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"{path}: 'layers' must be an object")
    for name, roles in layers.items():
        if not isinstance(roles, dict) or not set(roles) <= set(ROLES) | set(AFFINE_KEYS):
            raise ValueError(f"{path}: layer {name!r} must map {ROLES} to threshold lists")
        _check_affine(path, name, roles)
        for role, values in roles.items():
            if role not in ROLES:
                continue
            if not isinstance(values, list) or not values or not _all_positive(values):
                raise ValueError(
                    f"{path}: layer {name!r} {role} thresholds must be a non-empty list of "
                    f"finite positive numbers, got {values!r}"
                )
    minima = document.get(INPUT_MINIMA, {})
    if not isinstance(minima, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for v in minima.values()
    ):
        raise ValueError(f"{path}: {INPUT_MINIMA!r} must map layer names to finite numbers")
    structure = document.get(STRUCTURE)
    if STRUCTURE in document:  # null too is malformed: absent means "not recorded"
        check_structure(path, structure, layers)
    return TableFile(
        layers, document.get("config") or {}, {name: float(v) for name, v in minima.items()},
        document.get(MEASURED_ON), structure,
    )


def _all_positive(values: list) -> bool:
    """Whether every value is a finite positive number (JSON booleans are not numbers here)."""
    return all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        for v in values
    )


def _check_affine(path: str | os.PathLike, name: str, roles: Mapping[str, Any]) -> None:
    """Validates the optional ``<role>_scale`` / ``<role>_zero_point`` lists of one layer."""
    for role in ROLES:
        scales, zero_points = roles.get(f"{role}_scale"), roles.get(f"{role}_zero_point")
        if scales is None and zero_points is None:
            continue
        thresholds = roles.get(role)
        count = len(thresholds) if isinstance(thresholds, list) else -1
        if not (isinstance(scales, list) and len(scales) == count and _all_positive(scales)):
            raise ValueError(
                f"{path}: layer {name!r} {role}_scale must be a list of finite positive numbers, "
                f"one per {role} threshold, got {scales!r}"
            )
        if not (
            isinstance(zero_points, list)
            and len(zero_points) == count
            and all(isinstance(z, int) and not isinstance(z, bool) for z in zero_points)
        ):
            raise ValueError(
                f"{path}: layer {name!r} {role}_zero_point must be a list of integers (0 "
                f"allowed), one per {role} threshold, got {zero_points!r}"
            )

