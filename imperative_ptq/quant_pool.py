"""The global average pool in front of a classifier head, as oneDNN's int8 pool computes it.

Paddle Inference runs ``relu -> pool2d (global, avg) -> flatten -> fc`` with the pool in int8
when the ReLU output has a scale: the conv (or residual add) before the ReLU writes u8 codes
``clip(round(x / t * L), 0, 255)`` on the grid of the ReLU's threshold ``t`` (written as
``t * 255 / L``, see :mod:`imperative_ptq.export.unsigned`), the pool averages those codes and
rounds the mean half to even, and the fc quantizes the dequantized mean with its own input
threshold. Measured on conv -> ReLU -> AdaptiveAvgPool2D(1) -> Flatten -> Linear: the fp32 pool
the simulation used to model was 4.1% off Paddle Inference (largest logit error, relative);
this arithmetic agrees to 2.5e-7, and rounding the mean half away from zero or truncating it
does not (1.2% and 7.2%).

Keeping that pool fp32 instead (an fp32 round trip between the last conv and the fc) made
ResNet-18 1.5x slower in Paddle Inference, so ``convert`` simulates the int8 pool where the
export keeps it (:func:`int8_head_pools` decides, the export follows the
:class:`QuantizedGlobalAveragePool` layers it finds).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import paddle

from .quantizers.qparams import symmetric_levels
from .registry import BATCH_NORM_TYPES
from .rounding import grid_codes, round_half_to_even, straight_through

__all__ = ["U8_MAX", "QuantizedGlobalAveragePool", "int8_head_pools", "is_global_average_pool"]

#: Largest code of a u8 tensor: oneDNN keeps the codes above the threshold's ``L`` up to here.
U8_MAX = 255


def is_global_average_pool(layer: paddle.nn.Layer) -> bool:
    """An ``nn.AdaptiveAvgPool2D`` to 1 x 1 on NCHW maps (Paddle traces it as a global pool2d)."""
    if not isinstance(layer, paddle.nn.AdaptiveAvgPool2D):
        return False
    size = layer._output_size
    sizes = list(size) if isinstance(size, (list, tuple)) else [size, size]
    return sizes == [1, 1] and layer._data_format == "NCHW"


class QuantizedGlobalAveragePool(paddle.nn.Layer):
    """A global average pool over u8 codes, as Paddle Inference's oneDNN int8 pool runs it.

    ``forward(x)`` returns ``round_half_even(mean(q)) * t / L`` with
    ``q = clip(round(x / t * L), 0, 255)`` over each channel's map.

    Args:
        layer: The fp32 pool (kept for the export, which traces it).
        input_threshold: ``t``: the threshold of the ReLU whose output the pool reads.
        output_thresholds: The pool's calibrated output thresholds (kept for the table).
        activation_bits: Bit width of activations (``L = 2**(bits-1) - 1``).
        top: The largest code: 255, or 127 when Paddle writes the ReLU output as s8 (after a
            conv fused with an s8 residual, :mod:`imperative_ptq.quant_residual`).
        readers: Names of the int8 Linear layers that read the pool.

    Raises:
        ValueError: ``layer`` is not a global average pool, or the threshold is not positive.
    """

    def __init__(
        self,
        layer: paddle.nn.Layer,
        input_threshold: float,
        output_thresholds: Sequence[float] = (),
        activation_bits: int = 8,
        top: int = U8_MAX,
        readers: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if not is_global_average_pool(layer):
            raise ValueError(
                f"QuantizedGlobalAveragePool wraps an AdaptiveAvgPool2D(1) on NCHW maps, got {layer!r}"
            )
        if not np.isfinite(input_threshold) or input_threshold <= 0:
            raise ValueError(f"input_threshold must be a positive number, got {input_threshold!r}")
        self.layer = layer
        self.input_threshold = float(input_threshold)
        self.output_thresholds = [float(t) for t in output_thresholds]
        self.activation_bits = activation_bits
        self.top = int(top)
        #: The int8 Linear layers reading the pool (the reason it runs int8): with all of them
        #: kept fp32 (``analysis.keep_fp32``) it runs fp32 again.
        self.readers = tuple(readers)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        step = np.float32(self.input_threshold / symmetric_levels(self.activation_bits))
        codes = grid_codes(x, step, 0, self.top)
        # Integer sums are exact in float32 (up to 65793 positions of 255).
        mean = codes.sum(axis=[2, 3], keepdim=True) / float(x.shape[2] * x.shape[3])
        return straight_through(mean, round_half_to_even(mean)) * step

    def extra_repr(self) -> str:
        return (
            f"input_threshold={self.input_threshold:.6g}, codes 0..{self.top}, mean rounded "
            "half to even"
        )


def int8_head_pools(
    layers: Iterable[tuple[str, paddle.nn.Layer, set[str]]],
    output_thresholds: Mapping[str, Sequence[float]],
    int8_layers: Iterable[str],
) -> dict[str, float]:
    """The global average pools that run int8 in front of a classifier head, and the
    threshold of their input.

    The export keeps a global pool int8 exactly where it finds a
    :class:`QuantizedGlobalAveragePool`, so this rule is the only one: a pool whose
    calibration saw

    * its input come straight from a layer that Paddle runs as u8 with its output threshold:
      an ``nn.ReLU``, or an ``nn.ReLU6`` right after an int8 conv (through its BatchNorm),
      into which oneDNN fuses it (:data:`imperative_ptq.export.unsigned.RELU6_U8_PRODUCERS`),
    * its output (flattened, or through a dropout) read by a Linear that runs int8,
    * and no layer but int8 ones reading its input besides it.

    Any other average pool runs fp32 in the export (a functional pool, a pool read by a conv,
    a pool after another op, a model converted from a table without its structure section
    and without calibration batches).

    Args:
        layers: ``(name, layer, names of the calibrated layers whose output it read as its
            first input)`` for every calibrated layer.
        output_thresholds: Layer name -> its output thresholds, where it has them.
        int8_layers: Names of the layers converted to int8 (conv, Linear).

    Returns:
        Pool name -> the threshold its input is quantized with.
    """
    layers = list(layers)
    int8 = set(int8_layers)
    by_name = {name: layer for name, layer, _ in layers}
    sources = {name: inputs for name, _, inputs in layers}
    read_by_linear = {
        source for name, layer, inputs in layers
        if name in int8 and isinstance(layer, paddle.nn.Linear) for source in inputs
    }

    def only_source(name: str) -> str | None:
        found = sources.get(name, set())
        return next(iter(found)) if len(found) == 1 else None

    def runs_u8(name: str) -> bool:
        layer = by_name.get(name)
        if isinstance(layer, paddle.nn.ReLU):
            return True
        if not isinstance(layer, paddle.nn.ReLU6):
            return False
        producer = only_source(name)
        if isinstance(by_name.get(producer), BATCH_NORM_TYPES):
            producer = only_source(producer)
        return producer in int8 and isinstance(by_name.get(producer), paddle.nn.Conv2D)

    readers: dict[str, set[str]] = {}
    for name, _, inputs in layers:
        for source in inputs:
            readers.setdefault(source, set()).add(name)

    chosen: dict[str, float] = {}
    for name, layer, _ in layers:
        source = only_source(name)
        if not is_global_average_pool(layer) or name not in read_by_linear or source is None:
            continue
        if any(reader not in int8 for reader in readers.get(source, set()) - {name}):
            # A layer reading it in float too (an attention-pooling head's multiply): Paddle
            # would write it as the pool's u8 codes for that reader as well (measured: 0.75% of
            # the largest output off on half of them).
            continue
        thresholds = list(output_thresholds.get(source, ()))
        if runs_u8(source) and thresholds and thresholds[0] > 0:
            chosen[name] = float(thresholds[0])
    return chosen
