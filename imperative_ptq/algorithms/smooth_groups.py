"""The layer groups SmoothQuant smooths, and how its scales fold into them.

A group is a producer (a LayerNorm with a weight, or a Linear) and the Linear layers that read
its output tensor as it is (attention's q, k and v reading one LayerNorm). Folding ``1 / s``
into the producer and ``s`` into the Linears' weight rows leaves the model unchanged only if
nothing else reads that output: a post-norm transformer also adds a LayerNorm's output to its
residual, which the fold would scale.

:func:`find_smoothable` finds the groups from one calibration batch: forward hooks see which
Linear reads which producer's output tensor, but not functional readers (``x + y``), so every
candidate group is then folded with power-of-two scales, which float32 computes exactly, and
kept only if the model's outputs stay what they were. Without data it falls back to
LayerNorm/Linear -> Linear neighbours in ``nn.Sequential`` containers (their only reader).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import numpy as np
import paddle

from ..batches import run_hooked

__all__ = ["SmoothedGroup", "apply_smoothing", "check_groups", "find_smoothable", "sequential_groups"]

logger = logging.getLogger(__name__)

#: The largest output change (relative to the output's largest value) the fold check accepts:
#: the fold is exact in float32, so only a GEMM blocking its sums otherwise moves anything.
_FOLD_TOLERANCE = 1e-5


@dataclasses.dataclass
class SmoothedGroup:
    """One producer and the Linears reading its output, smoothed together.

    Attributes:
        producer: The LayerNorm or Linear the ``1 / scales`` were folded into.
        linears: The Linears whose weight rows were multiplied by ``scales``.
        alpha: The migration strength used (``None``: no alpha beat leaving the group alone,
            and ``scales`` are ones).
        scales: ``s`` per input channel.
        errors: Output mean squared error of the quantized group per alpha tried (key
            ``None``: unsmoothed).
    """

    producer: str
    linears: list[str]
    alpha: float | None
    scales: np.ndarray
    errors: dict[float | None, float]


def apply_smoothing(model: paddle.nn.Layer, groups: Sequence[SmoothedGroup]) -> None:
    """Folds each group's ``1 / s`` into its producer and ``s`` into its Linears, in place."""
    layers = dict(model.named_sublayers())
    with paddle.no_grad():
        for group in groups:
            producer = layers[group.producer]
            inverse = (1.0 / group.scales).astype(np.float32)
            weight = producer.weight.numpy()
            # Output channels on the last axis: a Linear's columns, a LayerNorm's 1-D weight.
            producer.weight.set_value((weight * inverse).astype(weight.dtype))
            if producer.bias is not None:
                bias = producer.bias.numpy()
                producer.bias.set_value((bias * inverse).astype(bias.dtype))
            for name in group.linears:
                linear = layers[name]
                weight = linear.weight.numpy()
                linear.weight.set_value(
                    (weight * group.scales.astype(np.float32)[:, None]).astype(weight.dtype)
                )


def foldable(layer: paddle.nn.Layer) -> str | None:
    """Why ``1 / s`` cannot be folded into ``layer`` (``None``: it can)."""
    if isinstance(layer, paddle.nn.LayerNorm):
        if layer.weight is None:
            return "a LayerNorm without a weight (weight_attr=False)"
        return None
    if isinstance(layer, paddle.nn.Linear):
        return None
    return f"a {type(layer).__name__}, not a LayerNorm or Linear"


def output_width(layer: paddle.nn.Layer) -> int:
    """Channels of a producer's output: the last axis of its weight (a Linear's ``[in, out]``,
    a LayerNorm's ``[C]``)."""
    return int(layer.weight.shape[-1])


def check_groups(groups: Sequence[Sequence[str]], layers: dict[str, paddle.nn.Layer]) -> None:
    """Refuses groups SmoothQuant cannot smooth.

    Raises:
        TypeError: A group is not a list of at least two names.
        ValueError: A name that is no sublayer, a producer the scales cannot be folded into,
            a non-Linear reader, or mismatched widths.
    """
    for group in groups:
        if isinstance(group, str) or not isinstance(group, (list, tuple)) or len(group) < 2:
            raise TypeError(f"SmoothQuant groups are [producer, linear, ...] name lists, got {group!r}")
        for name in group:
            if name not in layers:
                raise ValueError(f"SmoothQuant group names {name!r}, which is not a sublayer")
        producer, *linears = group
        reason = foldable(layers[producer])
        if reason is not None:
            raise ValueError(
                f"SmoothQuant cannot smooth {linears}: their input comes from {producer!r}, "
                f"{reason}, into which the scales cannot be folded"
            )
        for name in linears:
            linear = layers[name]
            if not isinstance(linear, paddle.nn.Linear):
                raise ValueError(f"SmoothQuant smooths Linear layers; {name!r} is a {type(linear).__name__}")
            if linear.weight.shape[0] != output_width(layers[producer]):
                raise ValueError(
                    f"SmoothQuant: {name!r} reads {linear.weight.shape[0]} channels, "
                    f"{producer!r} produces {output_width(layers[producer])}"
                )


def sequential_groups(model: paddle.nn.Layer) -> list[list[str]]:
    """``[producer, linear]`` pairs of consecutive children of ``nn.Sequential`` containers:
    a LayerNorm (with a weight) or a Linear followed directly by a Linear."""
    groups = []
    for prefix, layer in model.named_sublayers(include_self=True):
        if not isinstance(layer, paddle.nn.Sequential):
            continue
        children = list(layer.named_children())
        for (name, first), (next_name, second) in zip(children, children[1:]):
            if isinstance(second, paddle.nn.Linear) and foldable(first) is None:
                join = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
                groups.append([join(name), join(next_name)])
    return groups


def find_smoothable(model: paddle.nn.Layer, data: Sequence[Any] | None = None) -> list[list[str]]:
    """The ``[producer, linear, ...]`` groups of ``model`` that SmoothQuant can smooth.

    Args:
        model: The fp32 model.
        data: Batches (the first is run): the groups are the Linears reading a foldable
            producer's output tensor, each kept only if folding leaves the model's outputs
            unchanged (see the module docstring). ``None``: :func:`sequential_groups`.

    Returns:
        Groups by sublayer name, in the order the producers ran.
    """
    if data is None:
        return sequential_groups(model)
    batch = list(data)[:1]
    if not batch:
        return []
    candidates = _readers_of_producers(model, batch)
    if not candidates:
        return []
    reference = _outputs(model, batch)
    if _unchanged_by_folding(model, candidates, batch, reference):
        return candidates
    kept = [g for g in candidates if _unchanged_by_folding(model, [g], batch, reference)]
    dropped = [g for g in candidates if g not in kept]
    logger.info(
        "SmoothQuant leaves %d groups alone: their producer's output is also read by something "
        "a fold would change (a residual add, another op): %s", len(dropped), [g[0] for g in dropped],
    )
    return kept


def _readers_of_producers(model: paddle.nn.Layer, batch: list[Any]) -> list[list[str]]:
    """Groups of the Linear layers whose input is a foldable producer's output tensor itself,
    as one batch runs (a producer called more than once, or a Linear reading several
    producers' outputs in its calls, is left out)."""
    outputs: list[tuple[paddle.Tensor, str]] = []  # kept alive so that ids stay unique
    calls: dict[str, int] = {}
    read: dict[str, set[str | None]] = {}

    def record_output(name: str):
        def hook(layer: paddle.nn.Layer, inputs: tuple, output: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, paddle.Tensor):
                outputs.append((output, name))
        return hook

    def record_input(name: str):
        def hook(layer: paddle.nn.Layer, inputs: tuple) -> None:
            source = next((p for t, p in outputs if inputs and t is inputs[0]), None)
            read.setdefault(name, set()).add(source)
        return hook

    handles = []
    for name, layer in model.named_sublayers():
        if foldable(layer) is None:
            handles.append(layer.register_forward_post_hook(record_output(name)))
        if isinstance(layer, paddle.nn.Linear):
            handles.append(layer.register_forward_pre_hook(record_input(name)))
    run_hooked(model, batch, handles)
    groups: dict[str, list[str]] = {}
    for linear, sources in read.items():
        (source,) = sources if len(sources) == 1 else (None,)
        if source is not None and calls.get(source) == 1 and source != linear:
            groups.setdefault(source, []).append(linear)
    order = {name: index for index, (_, name) in enumerate(outputs)}
    return [[producer, *linears] for producer, linears in sorted(groups.items(), key=lambda g: order[g[0]])]


def _outputs(model: paddle.nn.Layer, batch: list[Any]) -> list[np.ndarray]:
    """The model's output tensors for ``batch``, flattened in order."""
    results: list[Any] = []
    keep = model.register_forward_post_hook(lambda layer, inputs, output: results.append(output))
    run_hooked(model, batch, [keep])
    return [t.numpy() for t in paddle.utils.flatten(results) if isinstance(t, paddle.Tensor)]


def _unchanged_by_folding(
    model: paddle.nn.Layer, groups: list[list[str]], batch: list[Any], reference: list[np.ndarray]
) -> bool:
    """Whether folding power-of-two scales (2 and 1/2 on alternate channels) into ``groups``
    leaves ``model``'s outputs as in ``reference``. The fold is undone afterwards: with powers
    of two, folding and unfolding are exact in float32, so the model ends bit for bit as it
    was."""
    layers = dict(model.named_sublayers())
    probe = []
    for producer, *linears in groups:
        width = output_width(layers[producer])
        scales = np.where(np.arange(width) % 2 == 0, 2.0, 0.5).astype(np.float32)
        probe.append(SmoothedGroup(producer, linears, None, scales, {}))
    apply_smoothing(model, probe)
    try:
        outputs = _outputs(model, batch)
    finally:
        for group in probe:
            group.scales = (1.0 / group.scales).astype(np.float32)
        apply_smoothing(model, probe)
    if len(outputs) != len(reference):
        return False
    for ran, expected in zip(outputs, reference):
        if ran.shape != expected.shape:
            return False
        if np.issubdtype(expected.dtype, np.floating):
            scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
            if not np.all(np.abs(ran - expected) <= _FOLD_TOLERANCE * scale):
                return False
        elif not np.array_equal(ran, expected):
            return False
    return True
