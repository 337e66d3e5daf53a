"""SmoothQuant: move activation outliers into the weights (Xiao et al. 2023, "SmoothQuant").

A Linear's input ``X`` often has a few channels (columns) far wider than the rest, so a
per-tensor activation threshold leaves the others only a few levels; its weight ``W [in, out]``
has no such outliers. Per input channel ``j``,

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha),     X' = X / s,   W'[j, :] = s_j W[j, :]

keeps ``X' W' = X W`` and shares the range between the two (``alpha`` = how much of it moves
into the weight). ``1 / s`` is folded into the layer that produces ``X``: a LayerNorm (its
weight and bias) or a Linear (its output columns and bias), so the exported model has no extra
op. Several Linears reading the same tensor (attention's q, k, v) share one ``s``, from the
largest weight range among them.

``alpha`` is searched on the calibration data: for each candidate the group's Linears are
quantized as the target computes them (per-tensor abs-max input, on x86 a signed one on the
shifted 7-bit grid; per-channel abs-max weight, one threshold for a square weight, which the
Paddle export stores per tensor on every target, and on x86 the weight Paddle Inference's fc
re-derives from it) on the cached inputs, and the
``alpha`` with the smallest output mean squared error wins, if it beats not smoothing at all
(otherwise the group is left alone). That comparison matters on x86: Paddle's fc takes its
weight scales from runs of the row-major weight, not per output channel, so the rows smoothing
enlarges can cost more than the input gains (measured on a LayerNorm -> q, k, v block with two
outlier channels: output MSE 32 -> 13941 when smoothed with alpha 0.6 regardless; on the arm
target the same block's q, k, v output MSE falls 0.17 -> 0.035).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Iterable, Sequence

import numpy as np
import paddle

from ..batches import run_hooked
from ..quant_layers import MAX_FC_INPUT_RANK, paddle_fc_weight, stored_per_tensor
from ..quantizers.qparams import symmetric_levels
from ..shifted_input import shifted_grid, shifted_levels
from ..targets import DEFAULT_TARGET, get_target
from .smooth_groups import SmoothedGroup, apply_smoothing, check_groups, find_smoothable

__all__ = ["SmoothQuant", "SmoothedGroup", "apply_smoothing", "find_smoothable", "smooth_quant"]

logger = logging.getLogger(__name__)

#: Calibration rows per group kept for the alpha search.
_SEARCH_ROWS = 2048


@dataclasses.dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant settings (``PTQConfig(..., smooth_quant=SmoothQuant())``).

    Args:
        alpha: Migration strength in [0, 1], applied as it is; ``None`` searches ``alphas``
            (and keeps a group unsmoothed if none of them lowers its error).
        alphas: Candidates for the search.
        groups: ``[[producer, linear, ...], ...]`` by sublayer name; ``None``:
            :func:`find_smoothable`.
        quant_bits: Bit width the search simulates.
        target: The deployment target whose arithmetic the search simulates
            (``PTQConfig`` passes its own).

    Raises:
        ValueError: An alpha is outside [0, 1].
    """

    alpha: float | None = None
    alphas: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    groups: tuple[tuple[str, ...], ...] | None = None
    quant_bits: int = 8
    target: str = DEFAULT_TARGET

    def __post_init__(self) -> None:
        candidates = self.alphas if self.alpha is None else (self.alpha,)
        if not candidates or any(not 0 <= float(a) <= 1 for a in candidates):
            raise ValueError(f"SmoothQuant alphas must lie in [0, 1], got {candidates}")
        get_target(self.target)  # raises for an unknown target


def _input_statistics(
    model: paddle.nn.Layer, layers: list[paddle.nn.Layer], batches: Sequence[Any]
) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """Per layer: the per-channel abs-max of its input over ``batches``, up to
    ``_SEARCH_ROWS`` of its input rows (channels last) and the input's largest rank."""
    maxima: list[np.ndarray | None] = [None] * len(layers)
    rows: list[list[np.ndarray]] = [[] for _ in layers]
    ranks = [0] * len(layers)

    def hook_for(index: int):
        def hook(layer: paddle.nn.Layer, inputs: tuple) -> None:
            x = inputs[0].numpy().astype(np.float32)
            ranks[index] = max(ranks[index], x.ndim)
            flat = x.reshape(-1, x.shape[-1])
            current = np.abs(flat).max(axis=0)
            maxima[index] = current if maxima[index] is None else np.maximum(maxima[index], current)
            if sum(len(r) for r in rows[index]) < _SEARCH_ROWS:
                rows[index].append(flat[: _SEARCH_ROWS])
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(layers)]
    run_hooked(model, batches, handles)
    for index, value in enumerate(maxima):
        if value is None:
            raise ValueError(f"SmoothQuant: layer {index} of a group never ran on the data")
    return maxima, [np.concatenate(r)[:_SEARCH_ROWS] for r in rows], ranks


def _fake_quantize(x: np.ndarray, thresholds: np.ndarray, bits: int) -> np.ndarray:
    levels = symmetric_levels(bits)
    step = np.maximum(thresholds, 1e-30) / levels
    return np.clip(np.round(x / step), -levels, levels) * step


def _runtime_weight(weight: np.ndarray, bits: int, paddle_fc: bool, runs_as_conv: bool) -> np.ndarray:
    """The ``[in, out]`` weight a Linear computes with: per-output-channel abs-max codes (one
    threshold for a square weight, which the Paddle export stores per tensor unless the Linear
    runs as a 1x1 conv), re-derived as Paddle's fc does."""
    thresholds = np.abs(weight).max(axis=0, keepdims=True)
    if stored_per_tensor(weight.shape) and not runs_as_conv:
        thresholds = np.full_like(thresholds, thresholds.max())
    quantized = _fake_quantize(weight, thresholds, bits).astype(np.float32)
    if not paddle_fc:
        return quantized
    integers, fc_thresholds = paddle_fc_weight(quantized)
    return integers.astype(np.float64) * (fc_thresholds / 127.0)


def _quantized_input(x: np.ndarray, bits: int, shifted: bool) -> np.ndarray:
    """``x`` on the per-tensor abs-max grid the group's Linears read it on: symmetric, or, for
    a signed input on a target that shifts it (``x86``), the shifted affine grid
    (:func:`imperative_ptq.shifted_input.shifted_grid`: codes ``0..127``, zero point ``z``)."""
    threshold = float(np.abs(x).max())
    grid = shifted_grid(threshold, float(x.min()), bits) if shifted and x.min() < 0 else None
    if grid is None:
        return _fake_quantize(x, threshold, bits)
    scale, zero_point = grid
    return (np.clip(np.round(x / scale) + zero_point, 0, shifted_levels(bits)) - zero_point) * scale


def _group_error(
    rows: np.ndarray, weights: list[np.ndarray], scales: np.ndarray, bits: int, paddle_fc: bool,
    runs_as_conv: bool, shifted: bool,
) -> float:
    """Output mean squared error of the group quantized after smoothing with ``scales``
    (``paddle_fc``: weights re-derived as Paddle's fc does; ``runs_as_conv``: the Linears run
    as 1x1 convs on per-channel weights, square ones included)."""
    x = rows / scales
    xq = _quantized_input(x, bits, shifted)
    error = 0.0
    for weight in weights:
        wq = _runtime_weight(weight * scales[:, None], bits, paddle_fc, runs_as_conv)
        error += float(np.mean((xq @ wq - rows @ weight) ** 2))
    return error


def smoothing_scales(
    activation_max: np.ndarray, weight_max: np.ndarray, alpha: float
) -> np.ndarray:
    """``s = max|X|^alpha / max|W|^(1 - alpha)`` per channel (1 where either is 0)."""
    usable = (activation_max > 0) & (weight_max > 0)
    safe_x = np.where(usable, activation_max, 1.0)
    safe_w = np.where(usable, weight_max, 1.0)
    return np.where(usable, safe_x**alpha / safe_w ** (1 - alpha), 1.0)


def smooth_quant(
    model: paddle.nn.Layer,
    data: Iterable[Any],
    settings: SmoothQuant = SmoothQuant(),
    *,
    inplace: bool = False,
) -> tuple[paddle.nn.Layer, list[SmoothedGroup]]:
    """SmoothQuant on ``model``'s groups, alpha searched on ``data`` unless fixed.

    Args:
        model: The fp32 model (eval mode).
        data: Calibration batches.
        settings: Alpha, candidates, groups and bit width.
        inplace: Change ``model`` itself; otherwise a deep copy.

    Returns:
        ``(model, groups)``: the smoothed model and what was done to each group.

    Raises:
        TypeError: A group is not a list of names.
        ValueError: A group names no sublayer, a producer the scales cannot be folded into
            (named, with the reason), a non-Linear, or mismatched widths; ``data`` is empty.
    """
    if not isinstance(model, paddle.nn.Layer):
        raise TypeError(f"model must be a paddle.nn.Layer, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    layers = dict(model.named_sublayers())
    batches = list(data)
    if not batches:
        raise ValueError("SmoothQuant needs calibration batches, got none")
    if settings.groups is None:
        groups = find_smoothable(model, batches)
    else:
        groups = [list(g) for g in settings.groups]
        check_groups(groups, layers)
    if not groups:
        linears = sum(isinstance(layer, paddle.nn.Linear) for layer in layers.values())
        logger.warning(
            "SmoothQuant found no LayerNorm/Linear -> Linear group to smooth (it smooths "
            "nn.Linear layers that read a LayerNorm's or Linear's output tensor itself%s)",
            "; this model has no nn.Linear: a model converted from ONNX (x2paddle) multiplies by its "
            "weights with functional paddle.matmul calls, after reshapes" if not linears else "",
        )
        return model, []
    first_linears = [layers[group[1]] for group in groups]
    maxima, rows, ranks = _input_statistics(model, first_linears, batches)
    alphas = settings.alphas if settings.alpha is None else (settings.alpha,)
    target = get_target(settings.target)
    target_fc, shifted = target.paddle_fc_weights, target.shifted_signed_inputs
    smoothed = []
    for group, activation_max, sample, rank in zip(groups, maxima, rows, ranks):
        producer, *linears = group
        # On a rank-4 input (ConvNeXt's channels-last layers) the x86 export runs the Linear
        # layers as 1x1 convs on their own per-channel weights, not as Paddle's fc.
        runs_as_conv = target_fc and rank > MAX_FC_INPUT_RANK
        paddle_fc = target_fc and not runs_as_conv
        weights = [layers[name].weight.numpy().astype(np.float64) for name in linears]
        weight_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        errors: dict[float | None, float] = {
            float(alpha): _group_error(
                sample, weights, smoothing_scales(activation_max, weight_max, alpha),
                settings.quant_bits, paddle_fc, runs_as_conv, shifted,
            )
            for alpha in alphas
        }
        if settings.alpha is None:  # a searched alpha must beat leaving the group alone
            errors[None] = _group_error(
                sample, weights, np.ones_like(activation_max), settings.quant_bits, paddle_fc, runs_as_conv,
                shifted,
            )
        alpha = min(errors, key=errors.get)
        if alpha is None:
            logger.warning(
                "SmoothQuant leaves %s unsmoothed: no alpha of %s lowers its quantized output "
                "error on target %r", linears, list(alphas), settings.target,
            )
            scales = np.ones_like(activation_max)
        else:
            scales = smoothing_scales(activation_max, weight_max, alpha)
        smoothed.append(SmoothedGroup(producer, linears, alpha, scales, errors))
    apply_smoothing(model, smoothed)
    logger.info("SmoothQuant: %d groups, alphas %s", len(smoothed), [g.alpha for g in smoothed])
    return model, smoothed
