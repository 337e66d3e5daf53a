"""Calibration state: every quantizer's statistics in one versioned file.

Saving the statistics (not the thresholds) lets a long calibration be resumed, shards be
calibrated separately (or on several processes) and merged, and thresholds be recomputed with
other arguments later. The file is an ``.npz`` archive without pickles: one array per
statistic, keyed ``"<layer>/<role>/<statistic>"``, plus a JSON header::

    {"format": "imperative_ptq.calibration_state", "format_version": 1,
     "config": {...},
     "quantizers": {"<layer>/<role>": {"type": "KLQuantizer", "config": {...}}, ...},
     "measured_on": {"<layer>": {...}, ...},
     "structure": {"<layer>": {...}, ...}}

``measured_on`` records what each layer was calibrated on (:mod:`imperative_ptq.layer_signature`);
files written before it was recorded have none and load unchecked. ``structure`` is what the
calibration forwards saw of the graph (:mod:`imperative_ptq.calibration_structure`, the same
section as the calibration table's), so a model that loads the state converts and exports as
the calibrated one; files written before it was recorded leave it as it is.

Written atomically: to a temporary file first, then renamed.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from .calibration_structure import STRUCTURE
from .files import atomic_file
from .functional_matmul import missing_site_hint
from .quantizers import BaseQuantizer

__all__ = ["FORMAT_VERSION", "read_state", "write_state", "check_compatible"]

FORMAT_NAME = "imperative_ptq.calibration_state"
FORMAT_VERSION = 1
_HEADER = "__header__"


def write_state(
    path: str | os.PathLike,
    quantizers: Mapping[str, BaseQuantizer],
    config: Any,
    measured_on: Mapping[str, Any] | None = None,
    structure: Mapping[str, Any] | None = None,
) -> None:
    """Writes the statistics of ``quantizers`` (keyed ``"<layer>/<role>"``) to ``path``, with
    what each layer was measured on and the structure calibration observed
    (:mod:`imperative_ptq.calibration_structure`, the calibration table's section)."""
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": config,
        "quantizers": {
            key: {"type": type(q).__name__, "config": q.config()} for key, q in quantizers.items()
        },
    }
    if measured_on:
        header["measured_on"] = dict(measured_on)
    if structure is not None:
        header[STRUCTURE] = dict(structure)
    arrays = {_HEADER: np.asarray(json.dumps(header))}
    for key, quantizer in quantizers.items():
        for name, value in quantizer.state_dict().items():
            arrays[f"{key}/{name}"] = value
    with atomic_file(path, "wb") as file:
        np.savez(file, **arrays)


def read_state(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Reads a state file.

    Returns:
        ``(header, states)`` with ``states["<layer>/<role>"]`` a quantizer ``state_dict``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: Not a (readable) calibration state file, or an unknown format version
            (the message names ``path``).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"calibration state {path} does not exist")
    try:
        return _read_archive(path)
    except ValueError as error:
        if str(path) in str(error):
            raise
        raise ValueError(f"{path} is not a calibration state file: {error}") from None
    except Exception as error:  # noqa: BLE001 - see below
        # A truncated or corrupted archive fails anywhere in zipfile, zlib or numpy's header
        # parser (BadZipFile, EOFError, zlib.error, SyntaxError, tokenize.TokenError, ...),
        # lazily, per array: whatever it is, the file is not a state file.
        raise ValueError(
            f"{path} is not a readable calibration state file: {type(error).__name__}: {error}"
        ) from None


def _read_archive(
    path: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    with np.load(path, allow_pickle=False) as archive:
        if _HEADER not in archive.files:
            raise ValueError(f"{path} is not an imperative_ptq calibration state file")
        header = json.loads(str(archive[_HEADER]))
        if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
            raise ValueError(f"{path} is not an imperative_ptq calibration state file")
        if header.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} has calibration state format version {header.get('format_version')!r}; "
                f"this imperative_ptq reads version {FORMAT_VERSION}"
            )
        if not isinstance(header.get("quantizers"), dict):
            raise ValueError(f"{path}: the header lists no quantizers")
        states: dict[str, dict[str, np.ndarray]] = {key: {} for key in header["quantizers"]}
        for name in archive.files:
            if name == _HEADER:
                continue
            key, _, statistic = name.rpartition("/")
            if key not in states:
                raise ValueError(f"{path}: array {name!r} belongs to no listed quantizer")
            states[key][statistic] = archive[name]
    return header, states


def check_compatible(
    path: str, header: Mapping[str, Any], quantizers: Mapping[str, BaseQuantizer]
) -> None:
    """Raises ``ValueError`` naming the first difference between a state file and a model.

    Checks the set of ``"<layer>/<role>"`` keys, then each quantizer's algorithm and arguments.
    """
    stored = header["quantizers"]
    for key in quantizers:
        if key not in stored:
            raise ValueError(f"{path}: the model's {key!r} has no statistics in the file")
    for key in stored:
        if key not in quantizers:
            raise ValueError(
                f"{path}: {key!r} in the file is not a quantizer of the model"
                f"{missing_site_hint(key.split('/')[0])}"
            )
    for key, quantizer in quantizers.items():
        entry = stored[key]
        found = entry.get("type") if isinstance(entry, dict) else entry
        if found != type(quantizer).__name__:
            raise ValueError(
                f"{path}: {key!r} was calibrated with {found}, "
                f"the model uses {type(quantizer).__name__}"
            )
        if entry.get("config") != quantizer.config():
            raise ValueError(
                f"{path}: {key!r} was calibrated with arguments {entry.get('config')}, "
                f"the model uses {quantizer.config()}"
            )

