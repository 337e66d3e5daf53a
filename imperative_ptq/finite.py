"""Refusing NaN/Inf where they would be frozen into a quantized model or an export.

Calibration ignores non-finite activations (a threshold comes from the finite values), and the
weight quantizers' abs-max skips a NaN, so a model with a NaN weight calibrates and converts
without a sign of trouble; the int8 cast of that NaN is undefined. ``convert`` and the exporters
check the parameters and thresholds with these functions and name the layer instead.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import paddle

__all__ = ["check_finite_parameters", "check_finite_thresholds"]


def check_finite_parameters(model: paddle.nn.Layer, action: str) -> None:
    """Raises ``ValueError`` naming the first parameter of ``model`` holding NaN or Inf.

    Parameters only (weights, biases, batch-norm statistics): buffers such as attention masks
    hold ``-inf`` on purpose.

    Args:
        model: The model.
        action: What is refused, for the message (``"convert"``, ``"export"``).
    """
    for name, parameter in model.named_parameters():
        if not paddle.is_floating_point(parameter) or parameter.size == 0:
            continue
        with paddle.no_grad():
            finite = paddle.isfinite(parameter)
            if bool(paddle.all(finite)):
                continue
            bad = int(parameter.size) - int(paddle.sum(finite.astype("int64")))
        layer, _, attribute = name.rpartition(".")
        raise ValueError(
            f"cannot {action}: layer {layer or type(model).__name__!r} {attribute} holds "
            f"{bad} non-finite value(s) (NaN/Inf) of {int(parameter.size)}; fix or retrain the "
            f"weights first"
        )


def check_finite_thresholds(table: Mapping[str, Mapping[str, Any]], action: str) -> None:
    """Raises ``ValueError`` naming the first layer of ``table`` whose thresholds (or affine
    scales and zero points) are not all finite.

    Args:
        table: ``{layer: {role: [values]}}`` as a calibration table holds it.
        action: What is refused, for the message.
    """
    for name, entry in table.items():
        for role, values in entry.items():
            array = np.asarray(values, dtype=np.float64).reshape(-1)
            if not np.isfinite(array).all():
                raise ValueError(
                    f"cannot {action}: layer {name!r} {role} thresholds are not finite: "
                    f"{array[~np.isfinite(array)][:4].tolist()}"
                )
