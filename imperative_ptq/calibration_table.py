"""Calibration tables: per-layer thresholds as a versioned JSON file.

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
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

from .files import atomic_file

__all__ = [
    "FORMAT_VERSION", "CalibrationTable", "TableFile", "read_table", "read_table_file",
    "write_table",
]

FORMAT_NAME = "imperative_ptq.calibration_table"
FORMAT_VERSION = 1
ROLES = ("input", "output", "weight")
#: Optional affine parameters of each role.
AFFINE_KEYS = tuple(f"{role}_{kind}" for role in ROLES for kind in ("scale", "zero_point"))
#: Top-level section: layer name -> smallest input value seen in calibration.
INPUT_MINIMA = "input_minima"
#: Top-level section: layer name -> what it was measured on (see layer_signature).
MEASURED_ON = "measured_on"

CalibrationTable = dict[str, dict[str, list[float]]]


def write_table(
    path: str | os.PathLike,
    layers: Mapping[str, Mapping[str, list[float]]],
    config: Any,
    input_minima: Mapping[str, float] | None = None,
    measured_on: Mapping[str, Any] | None = None,
) -> None:
    """Writes ``layers`` (and the config that produced them, the smallest input value of
    each simulated layer when known, and what each layer was measured on) to ``path``
    atomically."""
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
    with atomic_file(path) as file:
        json.dump(document, file, indent=1)


@dataclasses.dataclass
class TableFile:
    """A calibration table file: its layers, the config that produced them, the smallest
    input value of each simulated layer (empty for tables written before it was recorded) and
    what each layer was measured on (``None`` for tables written before it was recorded)."""

    layers: CalibrationTable
    config: dict[str, Any]
    input_minima: dict[str, float]
    measured_on: dict[str, Any] | None = None


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
            a threshold that is not a finite positive number, or input minima that are not
            finite numbers.
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
    return TableFile(
        layers, document.get("config") or {}, {name: float(v) for name, v in minima.items()},
        document.get(MEASURED_ON),
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

