"""Convs reading a signed input, int8 on AVX2 kernels: the ``x86-avx2`` target.

Without VNNI, oneDNN's int8 convs multiply u8 x s8 byte pairs into int16 sums
(``vpmaddubsw``). For a signed (s8) input, shifted by +128 into u8 inside the kernel, a pair
could reach ``2 * 255 * 127 > 32767``, so the kernels round the weight on half its scale:
``rint(0.5 * w * 127 / max)``, codes ``-64..64`` (7 bits). That arithmetic is exact and
deterministic, so a target for AVX2 CPUs can simulate it (:func:`quant_layers.onednn_conv_weight`
with ``halved``) and run every such conv int8 on s8, where ``x86`` (right on every x86 CPU)
shifts the input of an unpadded one into u8 and keeps a padded one fp32: the first conv on a
normalized image, every 3x3 conv after a SiLU, LeakyReLU, Hardswish or tanh.

Which kernels halve was measured on a Zen 3 EPYC (AVX2) against Paddle Inference 3.3.1, one
conv at a time (``benchmarks/int8_arithmetic_probe.py`` has the method): dense convs of any
channel count (1 to 128 input channels, 1x1 to 7x7, strided, dilated), depthwise convs
(``groups == in == out``) and grouped convs with a multiple of 4 input and output channels
per group halve; grouped convs with 2, 3, 5, 6 or 7 input channels per group and depthwise
convs with a channel multiplier run other kernels, exactly on the 8-bit codes.
:func:`halves_signed_input` takes the first kind only; the others keep the ``x86`` route.

Paddle Inference folds a BatchNorm that alone reads a conv into the conv's weight before it
derives the int8 weight, with float32 arithmetic of its own (an approximate square root), and
the halving's ties (every odd code, every channel's largest value at ``63.5``) go the way
those float32 values send them: measured, 1.5% of the largest output off the simulation with
the fold computed in numpy. So the ``x86-avx2`` export folds that BatchNorm itself
(:mod:`imperative_ptq.export.folded_norms`), storing the conv's codes on thresholds times the
BatchNorm's factor, and the simulation computes with what Paddle derives from exactly those
(:func:`quant_layers.runtime_weight` with ``norm_factor``).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import numpy as np
import paddle

from .fuse import batch_norm_factor_and_bias
from .quant_layers import keeps_forward
from .quant_residual import unwrapped_norm
from .registry import BATCH_NORM_TYPES
from .session import LayerState

__all__ = ["HalvedConv", "halved_convs", "halves_signed_input", "halving_refusal", "norm_factor"]

#: Input and output channels per group, a multiple of which a grouped conv needs for the
#: halving kernel (measured: 4 and 8 halve; 2, 3, 5, 6 and 7 do not).
_GROUP_CHANNELS = 4


def halves_signed_input(layer: paddle.nn.Layer) -> bool:
    """Whether oneDNN's AVX2 int8 kernel for ``layer`` (a Conv2D or Conv1D, channels first)
    reading a signed input halves its weight (see the module docstring)."""
    return halving_refusal(layer) is None


def halving_refusal(layer: paddle.nn.Layer) -> str | None:
    """Why ``layer`` reading a signed input has no halving int8 kernel (a user-facing reason),
    or ``None`` when it has one."""
    # (The classes themselves, or a subclass computing their forward: a functional conv site.)
    if not (keeps_forward(layer, paddle.nn.Conv2D) or keeps_forward(layer, paddle.nn.Conv1D)):
        return f"a {type(layer).__name__}, not a Conv2D or Conv1D"
    if layer._data_format not in ("NCHW", "NCL"):
        return f"channels-last ({layer._data_format}): only channels-first convs are measured to halve"
    groups = int(layer._groups)
    inputs, outputs = int(layer._in_channels), int(layer._out_channels)
    if groups == 1 or groups == inputs == outputs:
        return None
    if (inputs // groups) % _GROUP_CHANNELS == 0 and (outputs // groups) % _GROUP_CHANNELS == 0:
        return None
    return (
        f"groups={groups} with {inputs // groups} input and {outputs // groups} output channels "
        f"per group: the halving kernel needs multiples of {_GROUP_CHANNELS}"
    )


def norm_factor(norm: paddle.nn.Layer) -> np.ndarray:
    """The float32 per-channel factor ``gamma / sqrt(variance + eps)`` of a BatchNorm folded
    into the conv before it (also inside the wrapper ``convert`` may have put around it: a
    residual BatchNorm's :class:`~imperative_ptq.quant_residual.QuantizedResidualOutput`)."""
    norm = unwrapped_norm(norm)
    mean = norm._mean.numpy().astype(np.float32)
    gamma = norm.weight.numpy().astype(np.float32) if norm.weight is not None else np.ones_like(mean)
    factor, _ = batch_norm_factor_and_bias(
        np.zeros_like(mean), mean, norm._variance.numpy().astype(np.float32), gamma,
        np.zeros_like(mean), norm._epsilon,
    )
    return np.asarray(factor, np.float32)


@dataclasses.dataclass(frozen=True)
class HalvedConv:
    """A conv that runs on halved weights, and the BatchNorm folded into it (if any).

    Attributes:
        norm: Name of the BatchNorm that alone reads the conv's output, or ``""``.
        factor: That BatchNorm's :func:`norm_factor`, or ``None``.
    """

    norm: str = ""
    factor: np.ndarray | None = None


def halved_convs(
    model: paddle.nn.Layer, hooked: Sequence[tuple[paddle.nn.Layer, LayerState]]
) -> dict[str, HalvedConv]:
    """The hooked convs that may run on halved weights if their input is signed, by name.

    A Conv2D whose output only a BatchNorm reads (and which reads only it; no residual add
    calibration found) gets that BatchNorm folded in, as Paddle Inference would fold it. Left
    out: a conv whose kernel does
    not halve (:func:`halves_signed_input`), a conv or its BatchNorm whose output a residual
    add reads that Paddle fuses into the conv (its sum is simulated on codes of its own, see
    :mod:`imperative_ptq.quant_residual`), and a conv whose BatchNorm has a zero or
    non-finite factor.
    """
    layers = dict(model.named_sublayers())
    readers: dict[str, list[LayerState]] = collections.defaultdict(list)
    fused: set[str] = set()
    for _, state in hooked:
        for source in state.input_sources:
            readers[source].append(state)
        fused.update(add.fused for add in state.residual_adds)
    found: dict[str, HalvedConv] = {}
    for layer, state in hooked:
        if not halves_signed_input(layer) or state.name in fused:
            continue
        following = readers.get(state.name, [])
        # (A residual add reading the conv's output too, as in a pre-activation block
        # ``h + conv(relu(bn(h)))``, is a second reader: Paddle folds nothing then.)
        # (``residual_is_input``: the add reads this conv's input, of which it is the first reader.)
        added = any(not add.residual_is_input for add in state.residual_adds)
        alone = len(following) == 1 and not added
        norm = layers.get(following[0].name) if alone else None
        if not (
            isinstance(norm, BATCH_NORM_TYPES) and following[0].input_sources == {state.name}
            and isinstance(layer, paddle.nn.Conv2D)  # a Conv1D's BatchNorm reads it squeezed
        ):
            found[state.name] = HalvedConv()
            continue
        if following[0].name in fused:
            continue
        factor = norm_factor(norm)
        if not np.all(np.isfinite(factor)) or np.any(factor == 0):
            continue
        found[state.name] = HalvedConv(following[0].name, factor)
    return found
