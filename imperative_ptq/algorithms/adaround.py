"""AdaRound: learn, per weight, whether to round down or up (Nagel et al. 2020, "Up or Down?
Adaptive Rounding for Post-Training Quantization").

Nearest rounding minimizes each weight's own error, not the layer's output error. AdaRound
keeps the grid (the calibrated per-channel step ``s = t / L``) and learns ``V`` in

    W~ = s * clip(floor(W / s) + h(V), -L, L),   h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)

(the rectified sigmoid, ``zeta = 1.1``, ``gamma = -0.1``) by minimizing on cached calibration
inputs

    || W~ x_q + b - (W x + b) ||^2  +  lambda * sum(1 - |2 h(V) - 1|^beta)

where ``x_q`` is the layer's quantized input in the quantized model (earlier layers already
rounded, so each layer makes up for its predecessors' error) and ``W x + b`` is the fp32
model's output. The regularizer is off for the first ``warmup`` of the iterations, then ``beta``
is annealed from ``beta_start`` to ``beta_end``: it drives every ``h(V)`` to 0 or 1, and the
final rounding is ``floor(W / s) + [h(V) >= 0.5]``.

The grid is the one the layer runs on: a conv whose 8-bit weights oneDNN's AVX2 kernels
halve (target ``x86-avx2``) rounds on the 7-bit grid of step ``2 t / 127``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import numpy as np
import paddle
import paddle.nn.functional as F
from tqdm import tqdm

from ..functional_matmul import with_matmul_sites
from ..quant_layers import QuantizedLayer
from ..quantizers.qparams import symmetric_levels
from .bias_correction import output_channel_axis
from .capture import capture_inputs, capture_outputs, quantized_layers_in_order

__all__ = ["AdaRound", "AdaRoundResult", "adaround"]

logger = logging.getLogger(__name__)

_ZETA, _GAMMA = 1.1, -0.1


@dataclasses.dataclass(frozen=True)
class AdaRound:
    """AdaRound settings (``PTQConfig(..., adaround=AdaRound())``).

    Args:
        iterations: Optimizer steps per layer.
        batch_size: Samples per step, drawn from the cached calibration inputs.
        regularization: ``lambda``, the weight of the rounding regularizer.
        beta_start: ``beta`` when the regularizer starts.
        beta_end: ``beta`` at the last step.
        warmup: Fraction of the steps without the regularizer.
        learning_rate: Adam's learning rate on ``V`` (``V`` must travel about 2.4 from 0 for
            ``h(V)`` to reach 0 or 1; with 1e-2 and 1000 steps 0.3% of a small MLP's
            roundings were still undecided at the end, with 3e-2 none).
        seed: Seed of the sample draws.

    Raises:
        TypeError: A setting has the wrong type.
        ValueError: A setting is out of range.
    """

    iterations: int = 1000
    batch_size: int = 32
    regularization: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    learning_rate: float = 3e-2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"AdaRound.{name} must be an int, got {type(value).__name__}")
        for name in ("regularization", "beta_start", "beta_end", "warmup", "learning_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"AdaRound.{name} must be a number, got {type(value).__name__}")
        if self.iterations < 1 or self.batch_size < 1:
            raise ValueError("AdaRound.iterations and batch_size must be positive")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"AdaRound.warmup must be in [0, 1), got {self.warmup}")
        if self.regularization < 0 or self.learning_rate <= 0:
            raise ValueError("AdaRound.regularization must be >= 0 and learning_rate > 0")
        if not self.beta_start >= self.beta_end > 0:
            raise ValueError(
                f"AdaRound needs beta_start >= beta_end > 0, got {self.beta_start}, {self.beta_end}"
            )


@dataclasses.dataclass
class AdaRoundResult:
    """What AdaRound did to one layer.

    Attributes:
        name: The layer.
        losses: Reconstruction loss ``||W~ x_q - W x||^2`` (summed over channels, mean over
            samples and positions) of the step's samples at every step (soft rounding: it
            starts near 0, from the unrounded weight, and rises as the rounding hardens).
        nearest_loss: Reconstruction loss on all cached inputs of the weight the layer ran
            before (nearest rounding).
        final_loss: The same for the weight it runs with AdaRound's rounding.
        soft_fraction: Fraction of ``h(V)`` strictly between 0 and 1 at the end (0: every
            rounding decided), of the weights AdaRound rounds.
        changed_fraction: Fraction of weights rounded otherwise than to nearest.
    """

    name: str
    losses: np.ndarray
    nearest_loss: float
    final_loss: float
    soft_fraction: float
    changed_fraction: float


def rectified_sigmoid(v: paddle.Tensor) -> paddle.Tensor:
    """``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``."""
    return paddle.clip(F.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


def _initial_v(fraction: np.ndarray) -> np.ndarray:
    """``V`` with ``h(V) = fraction`` (so optimization starts from the unrounded weight)."""
    p = np.clip((fraction - _GAMMA) / (_ZETA - _GAMMA), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p)).astype(np.float32)


def _supported(layer: QuantizedLayer) -> str | None:
    """Why AdaRound cannot handle ``layer`` (``None``: it can)."""
    inner = layer.layer
    if not isinstance(inner, (paddle.nn.Conv2D, paddle.nn.Linear)):
        return f"{type(inner).__name__} is not a Conv2D or Linear"
    if layer.weight_scales is not None:
        return "its weights are affine (AdaRound keeps the symmetric grid)"
    if isinstance(inner, paddle.nn.Conv2D) and getattr(inner, "_padding_mode", "zeros") != "zeros":
        return f"padding_mode {inner._padding_mode!r} is not 'zeros'"
    return None


def _forward(inner: paddle.nn.Layer, x: paddle.Tensor, weight: paddle.Tensor) -> paddle.Tensor:
    """``inner``'s computation with ``weight`` in place of its own."""
    if isinstance(inner, paddle.nn.Linear):
        return F.linear(x, weight, inner.bias)
    return F.conv2d(
        x, weight, inner.bias, stride=inner._stride, padding=inner._padding,
        dilation=inner._dilation, groups=inner._groups, data_format=inner._data_format,
    )


@dataclasses.dataclass(frozen=True)
class _RoundingGrid:
    """The grid AdaRound rounds one layer's weight on, and how its codes are stored.

    Attributes:
        step: Per-channel step, broadcastable to the weight.
        levels: Largest code magnitude a rounding may choose.
        stored_per_code: Stored integer per grid code (2 on a halved conv's 7-bit grid).
        stored_nearest: The layer's stored integers before AdaRound.
        fixed: Weights AdaRound leaves as they are (each channel's abs-max code, which decides
            the scale Paddle Inference derives; a halved channel without one).
    """

    step: np.ndarray
    levels: int
    stored_per_code: int
    stored_nearest: np.ndarray
    fixed: np.ndarray

    def stored(self, codes: np.ndarray) -> np.ndarray:
        """Stored integers for grid ``codes`` (the fixed weights keep theirs)."""
        return np.where(self.fixed, self.stored_nearest, self.stored_per_code * codes).astype(np.int32)


def _rounding_grid(layer: QuantizedLayer, fp32_weight: np.ndarray) -> _RoundingGrid:
    """The grid of the weight that ``layer`` runs.

    A conv that oneDNN's AVX2 kernels run on a signed input with halved weights
    (``halved_weights``, 8-bit) computes with ``code / 2`` on the step ``2 t / 127``: its
    8-bit codes are even (:func:`~imperative_ptq.quant_layers.halved_grid_integers`), so AdaRound
    rounds on that 7-bit grid, where its choices are the ones that run (on the 8-bit grid an
    odd code halves to either neighbour by float32 noise). Elsewhere the grid is
    ``t / L`` with ``L`` the weight's largest code.
    """
    levels = symmetric_levels(layer.weight_bits)
    thresholds = layer.grid_thresholds
    shape = [1] * fp32_weight.ndim
    if thresholds.size > 1:
        shape[layer.weight_axis] = -1
    step = (thresholds / np.float32(levels)).reshape(shape).astype(np.float32)
    if layer.halved_weights and layer.weight_bits == 8:
        stored = np.rint(layer.program_weight / step).astype(np.int32)
        reduce = tuple(a for a in range(stored.ndim) if a != layer.weight_axis)
        full = (np.abs(stored) == levels).any(axis=reduce, keepdims=True)
        fixed = (np.abs(stored) == levels) | ~full
        return _RoundingGrid(2 * step, levels // 2, 2, stored, fixed)
    nearest = np.clip(np.round(fp32_weight.astype(np.float32) / step), -levels, levels)
    return _RoundingGrid(step, levels, 1, nearest.astype(np.int32), np.abs(nearest) == levels)


def _round_layer(
    name: str,
    layer: QuantizedLayer,
    fp32_weight: np.ndarray,
    inputs: list[paddle.Tensor],
    targets: list[paddle.Tensor],
    settings: AdaRound,
    progress: bool,
) -> AdaRoundResult:
    grid = _rounding_grid(layer, fp32_weight)
    levels = grid.levels
    scaled = fp32_weight.astype(np.float32) / grid.step
    floor = np.floor(scaled)
    # The fixed weights compute with what the layer runs for them throughout.
    nearest_weight = layer.layer.weight.numpy()
    v = paddle.create_parameter(
        list(fp32_weight.shape), "float32",
        default_initializer=paddle.nn.initializer.Assign(_initial_v(scaled - floor)),
    )
    optimizer = paddle.optimizer.Adam(settings.learning_rate, parameters=[v])
    floor_t, step_t = paddle.to_tensor(floor), paddle.to_tensor(grid.step)
    fixed_t, fixed_weight_t = paddle.to_tensor(grid.fixed), paddle.to_tensor(nearest_weight)
    axis = output_channel_axis(layer.layer, targets[0].ndim)
    rng = np.random.default_rng(settings.seed)
    warmup = int(settings.warmup * settings.iterations)
    losses = np.empty(settings.iterations)
    bar = tqdm(range(settings.iterations), desc=f"AdaRound {name}", unit="step",
               disable=not progress, leave=False)
    for iteration in bar:
        index = int(rng.integers(len(inputs)))
        rows = inputs[index].shape[0]
        pick = paddle.to_tensor(rng.choice(rows, min(settings.batch_size, rows), replace=False))
        x, target = paddle.gather(inputs[index], pick), paddle.gather(targets[index], pick)
        h = rectified_sigmoid(v)
        weight = paddle.where(fixed_t, fixed_weight_t, paddle.clip(floor_t + h, -levels, levels) * step_t)
        error = _forward(layer.layer, x, weight) - target
        reconstruction = (error * error).sum(axis=axis).mean()
        loss = reconstruction
        if iteration >= warmup and settings.regularization > 0:
            progress_fraction = (iteration - warmup) / max(settings.iterations - warmup - 1, 1)
            beta = settings.beta_start + (settings.beta_end - settings.beta_start) * progress_fraction
            regularizer = (1 - paddle.abs(2 * h - 1) ** beta).sum()
            loss = reconstruction + settings.regularization * regularizer
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        losses[iteration] = float(reconstruction)
    bar.close()
    with paddle.no_grad():
        h = rectified_sigmoid(v).numpy()
    # Codes at the grid's edge keep nearest rounding (``fixed``), so each channel's largest
    # code stays L: Paddle Inference requantizes a conv's weight from its largest value,
    # and L (odd) never makes a rounding tie there.
    integers = grid.stored(np.clip(floor + (h >= 0.5), -levels, levels))
    layer.set_weight_integers(integers, layer.grid_thresholds)
    return AdaRoundResult(
        name=name,
        losses=losses,
        nearest_loss=_loss(layer.layer, inputs, targets, nearest_weight, axis),
        final_loss=_loss(layer.layer, inputs, targets, layer.layer.weight.numpy(), axis),
        soft_fraction=float(np.mean(((h > 0) & (h < 1))[~grid.fixed])),
        changed_fraction=float(np.mean(integers != grid.stored_nearest)),
    )


def _loss(
    inner: paddle.nn.Layer, inputs: list[paddle.Tensor], targets: list[paddle.Tensor],
    weight: np.ndarray, axis: int,
) -> float:
    """Reconstruction loss of ``weight`` over every cached sample."""
    weight_t = paddle.to_tensor(weight.astype(np.float32))
    total, count = 0.0, 0
    with paddle.no_grad():
        for x, target in zip(inputs, targets):
            error = _forward(inner, x, weight_t) - target
            total += float((error * error).sum(axis=axis).sum())
            count += int(error.numel()) // int(error.shape[axis])
    return total / count


def adaround(
    quantized_model: paddle.nn.Layer,
    reference: paddle.nn.Layer,
    batches: Sequence[Any],
    settings: AdaRound = AdaRound(),
    progress: bool = True,
) -> list[AdaRoundResult]:
    """Rounds the weights of every Conv2D/Linear :class:`QuantizedLayer` with AdaRound, in
    execution order, in place.

    Args:
        quantized_model: A converted model.
        reference: The fp32 model it was quantized from (left unchanged: the layers that
            functional matmuls and convs became are matched on a copy).
        batches: Calibration batches (their layer inputs are cached one layer at a time).
        settings: Iterations, regularizer and schedule.
        progress: Show tqdm bars (layers, and steps within a layer).

    Returns:
        One :class:`AdaRoundResult` per rounded layer.

    Raises:
        ValueError: ``batches`` is empty or a layer has no fp32 counterpart in ``reference``.
    """
    if not batches:
        raise ValueError("AdaRound needs calibration batches, got none")
    reference = with_matmul_sites(reference, quantized_model)
    references = dict(reference.named_sublayers())
    results = []
    ordered = quantized_layers_in_order(quantized_model, batches[0])
    for name, layer in tqdm(ordered, desc="AdaRound", unit="layer", disable=not progress):
        reason = _supported(layer)
        if reason is not None:
            logger.warning("AdaRound leaves layer %r on nearest rounding: %s", name, reason)
            continue
        fp32_layer = references.get(name)
        if fp32_layer is None:
            raise ValueError(
                f"AdaRound: layer {name!r} has no fp32 counterpart in the reference "
                "model: pass the fp32 model the quantized model was made from"
            )
        inputs = [layer.quantize_input(x) for x in capture_inputs(quantized_model, layer, batches)]
        targets = capture_outputs(reference, fp32_layer, batches)
        results.append(_round_layer(
            name, layer, fp32_layer.weight.numpy(), inputs, targets, settings, progress
        ))
    logger.info("AdaRound: %d layers rounded", len(results))
    return results
