"""What a converted model carries: the one module that knows the attributes holding it.

``ImperativePTQ.convert`` marks the model converted with the target its simulation models, the
calibration table, input minima and structure a table file of it would hold, and gives each hooked layer
that stayed fp32 its output thresholds; the exporters read them back through these functions.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import paddle

from .targets import DEFAULT_TARGET, Target, get_target

__all__ = [
    "STATE_PREFIX", "converted_biases_on_grid", "converted_config", "converted_fine_tuning", "converted_input_example", "converted_input_signature", "converted_measured_on", "converted_minima", "converted_structure",
    "converted_table",
    "converted_target", "holds_package_state", "is_marked_converted", "mark_converted", "mark_fine_tuned",
    "output_thresholds", "record_biases_on_grid", "record_config", "record_input_signature", "record_measured_on",
    "set_output_thresholds",
]

#: How every attribute this package sets on a user's layers begins (these, and the calibration
#: session's: :mod:`imperative_ptq.session`), so that :func:`holds_package_state` knows them.
STATE_PREFIX = "_ptq_"

_CONVERTED = STATE_PREFIX + "converted"
_TABLE = STATE_PREFIX + "calibration_table"
_MINIMA = STATE_PREFIX + "input_minima"
_STRUCTURE = STATE_PREFIX + "structure"
_TARGET = STATE_PREFIX + "target"
_MEASURED_ON = STATE_PREFIX + "measured_on"
_OUTPUT_THRESHOLDS = STATE_PREFIX + "output_thresholds"
_FINE_TUNING = STATE_PREFIX + "fine_tuning"
_CONFIG = STATE_PREFIX + "config"
_INPUT_SIGNATURE = STATE_PREFIX + "input_signature"
_INPUT_EXAMPLE = STATE_PREFIX + "input_example"
_BIASES_ON_GRID = STATE_PREFIX + "biases_on_grid"


def holds_package_state(attribute: str) -> bool:
    """Whether a layer's ``attribute`` is one this package set (a converted model's table,
    structure, ...; a calibration session's state): it holds no layer of the model."""
    return attribute.startswith(STATE_PREFIX)


def mark_converted(
    model: paddle.nn.Layer,
    target: Target,
    table: Mapping[str, Mapping[str, list[float]]],
    input_minima: Mapping[str, float],
    structure: Mapping[str, Any] | None = None,
) -> None:
    """Records that ``model`` was converted for ``target``, with the table (layers, input
    minima and structure) that ``save_calibration_table`` would have written for it."""
    setattr(model, _CONVERTED, True)
    setattr(model, _TARGET, target.name)
    setattr(model, _TABLE, dict(table))
    setattr(model, _MINIMA, dict(input_minima))
    setattr(model, _STRUCTURE, None if structure is None else dict(structure))


def record_measured_on(model: paddle.nn.Layer, measured_on: Mapping[str, Any]) -> None:
    """Records what each layer of a converted model's table was measured on (the table file's
    ``measured_on``, see :mod:`imperative_ptq.layer_signature`)."""
    setattr(model, _MEASURED_ON, dict(measured_on))


def record_config(model: paddle.nn.Layer, config: Mapping[str, Any]) -> None:
    """Records the ``PTQConfig.to_dict()`` a converted model was calibrated and converted with
    (an export's table file names it, whichever ``ImperativePTQ`` exports the model)."""
    setattr(model, _CONFIG, dict(config))


def record_input_signature(
    model: paddle.nn.Layer, signature: Sequence[tuple[list, str]] | None,
    example: Sequence[Sequence[int]] | None = None,
) -> None:
    """Records the shapes and dtypes calibration saw the model's inputs with
    (:attr:`imperative_ptq.session.CalibrationSession.input_signature`; ``None``: unknown), and
    the concrete shapes of one calibration call (``input_example``)."""
    setattr(model, _INPUT_SIGNATURE, None if signature is None else [(list(s), d) for s, d in signature])
    setattr(model, _INPUT_EXAMPLE, None if example is None else [list(shape) for shape in example])


def converted_input_example(model: paddle.nn.Layer) -> list[list[int]] | None:
    """The concrete input shapes of one calibration call that :func:`record_input_signature`
    recorded, if any."""
    return getattr(model, _INPUT_EXAMPLE, None)


def record_biases_on_grid(model: paddle.nn.Layer, on_grid: bool) -> None:
    """Records whether convert put the int8 convs' biases on ONNX Runtime's int32 grid
    (``convert(..., bias_grid=...)``)."""
    setattr(model, _BIASES_ON_GRID, bool(on_grid))


def converted_biases_on_grid(model: paddle.nn.Layer) -> bool:
    """What :func:`record_biases_on_grid` recorded, on ``model`` or the converted models it
    wraps (``True`` where nothing says otherwise)."""
    return all(getattr(layer, _BIASES_ON_GRID, True) for layer in [model, *model.sublayers()])


def converted_input_signature(model: paddle.nn.Layer) -> list[tuple[list, str]] | None:
    """What :func:`record_input_signature` recorded, if anything."""
    return getattr(model, _INPUT_SIGNATURE, None)


def converted_config(model: paddle.nn.Layer) -> dict[str, Any] | None:
    """What :func:`record_config` recorded (``None`` if nothing)."""
    return getattr(model, _CONFIG, None)


def is_marked_converted(model: paddle.nn.Layer) -> bool:
    """Whether :func:`mark_converted` was called on ``model``."""
    return bool(getattr(model, _CONVERTED, False))


def converted_target(model: paddle.nn.Layer) -> Target:
    """The target ``model`` was converted for: its own, else that of the converted models it
    wraps (a converted model put in a ``Sequential`` with a softmax, say), else the default
    (models converted before targets existed).

    Raises:
        ValueError: ``model`` wraps models converted for different targets.
    """
    own = getattr(model, _TARGET, None)
    if own is not None:
        return get_target(own)
    wrapped = sorted({getattr(layer, _TARGET) for layer in model.sublayers() if hasattr(layer, _TARGET)})
    if len(wrapped) > 1:
        raise ValueError(
            f"{type(model).__name__} wraps models converted for different targets {wrapped}: "
            f"one export runs one target's arithmetic; convert them all for the same target"
        )
    return get_target(wrapped[0] if wrapped else DEFAULT_TARGET)


def converted_table(model: paddle.nn.Layer) -> dict[str, Any] | None:
    """The calibration table's layers of a converted model (``None`` if it has none)."""
    return getattr(model, _TABLE, None)


def converted_minima(model: paddle.nn.Layer) -> dict[str, float] | None:
    """The input minima of a converted model's table (``None`` if it has none)."""
    return getattr(model, _MINIMA, None)


def converted_structure(model: paddle.nn.Layer) -> dict[str, Any] | None:
    """The structure section of a converted model's table (``None`` if it has none), see
    :mod:`imperative_ptq.calibration_structure`."""
    return getattr(model, _STRUCTURE, None)


def converted_measured_on(model: paddle.nn.Layer) -> dict[str, Any] | None:
    """What each layer of a converted model's table was measured on (``None`` if unknown),
    see :mod:`imperative_ptq.layer_signature`."""
    return getattr(model, _MEASURED_ON, None)


def mark_fine_tuned(model: paddle.nn.Layer, fine_tuning: Mapping[str, Any]) -> None:
    """Records that ``model``'s thresholds and weights come from quantization-aware
    fine-tuning (``fine_tuning`` describes it; the exported table's config carries it)."""
    setattr(model, _FINE_TUNING, dict(fine_tuning))


def converted_fine_tuning(model: paddle.nn.Layer) -> dict[str, Any] | None:
    """What :func:`mark_fine_tuned` recorded (``None``: thresholds straight from PTQ)."""
    return getattr(model, _FINE_TUNING, None)


def set_output_thresholds(layer: paddle.nn.Layer, thresholds: Sequence[float]) -> None:
    """Keeps the output thresholds of a calibrated layer that stays fp32 (for the export)."""
    setattr(layer, _OUTPUT_THRESHOLDS, [float(t) for t in thresholds])


def output_thresholds(layer: paddle.nn.Layer) -> list[float]:
    """The output thresholds kept by :func:`set_output_thresholds` (empty if none)."""
    return list(getattr(layer, _OUTPUT_THRESHOLDS, None) or [])
