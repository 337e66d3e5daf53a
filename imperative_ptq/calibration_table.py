"""Calibration tables: per-layer thresholds as a versioned JSON file.

Format (version 1)::

    {"format": "imperative_ptq.calibration_table", "format_version": 1,
     "config": {"activation_quantizer": {...}, "weight_quantizer": {...}},
     "layers": {"conv1": {"input": [t], "output": [t], "weight": [t_c0, t_c1, ...]}, ...}}

Layer names are those of ``model.named_sublayers()``. Files are written atomically (temporary
file, then rename), so a crash never leaves a truncated table.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

from .files import atomic_file

__all__ = ["FORMAT_VERSION", "CalibrationTable", "read_table", "write_table"]

FORMAT_NAME = "imperative_ptq.calibration_table"
FORMAT_VERSION = 1
ROLES = ("input", "output", "weight")

CalibrationTable = dict[str, dict[str, list[float]]]


def write_table(
    path: str | os.PathLike, layers: Mapping[str, Mapping[str, list[float]]], config: Any
) -> None:
    """Writes ``layers`` (and the config that produced them) to ``path`` atomically."""
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": config,
        "layers": {name: dict(roles) for name, roles in layers.items()},
    }
    with atomic_file(path) as file:
        json.dump(document, file, indent=1)


def read_table(path: str | os.PathLike) -> tuple[CalibrationTable, dict[str, Any]]:
    """Reads and validates a calibration table.

    Returns:
        ``(layers, config)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is not a calibration table, has an unknown format version or holds
            a threshold that is not a finite positive number.
    """
    with open(path) as file:
        try:
            document = json.load(file)
        except json.JSONDecodeError as error:
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
        if not isinstance(roles, dict) or not set(roles) <= set(ROLES):
            raise ValueError(f"{path}: layer {name!r} must map {ROLES} to threshold lists")
        for role, values in roles.items():
            if (
                not isinstance(values, list)
                or not values
                or not all(
                    isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values
                )
            ):
                raise ValueError(
                    f"{path}: layer {name!r} {role} thresholds must be a non-empty list of "
                    f"finite positive numbers, got {values!r}"
                )
    return layers, document.get("config") or {}

