"""Strided 1x1 int8 convs that oneDNN's AVX2 kernels compute wrongly on two threads.

oneDNN runs a 1x1 conv with a stride above 1 by first copying the strided input pixels into a
buffer (its "reduce to unit stride" driver). On this project's AVX2 CPU the int8 kernel
(``jit_uni_int8_1x1:avx2``) got that copy wrong for input channel counts of 8 mod 16 when
Paddle Inference ran it on two threads: from call to call, part of the second thread's batch
rows were off (measured on one conv with 8, 24 or 40 input channels: 30% of the calls off the
one-thread result by up to 0.81 of the largest output; with 4, 12, 16, 20, 32, 48, 64 or 96
channels, and at stride 1, none in thousands of calls). A RegNet's downsample shortcuts (24,
56, 152 channels) run into it.

:func:`widen_strided_pointwise_convs` gives such a conv a kernel as large as its stride, the
1x1 weights in its top-left tap and zeros elsewhere, and ``stride - 1`` rows and columns of
padding at the bottom and right: each output reads the same input pixel with the same weights
(the other taps, padding included, add zeros), the output has the same size for every input
size, and oneDNN runs it in its general int8 conv kernel, which is right on any number of
threads (measured: 8, 24, 40, 56 and 152 channels, u8 and s8 inputs, 150 calls each on two
threads, none off). The conv keeps its input, so a projection shortcut still fuses into its
block's other conv. The cost is the zero taps' multiplies: a RegNetX-200MF-shaped stack ran
~5% slower than without the rewrite (``benchmarks/strided_pointwise.py``).
"""

from __future__ import annotations

import logging

import numpy as np

from .graph import get_tensor, is_persistable, new_persistable, producers
from .legacy_program import LegacyProgram

__all__ = ["widen_strided_pointwise_convs"]

logger = logging.getLogger(__name__)

#: Input channel counts (mod 16) whose strided 1x1 int8 conv oneDNN's AVX2 kernel races on.
_RACING_CHANNELS_MOD_16 = 8


def widen_strided_pointwise_convs(loaded: LegacyProgram) -> int:
    """Gives each int8 (its filter from a ``dequantize_linear`` of a persistable weight)
    ungrouped, unpadded, undilated 1x1 ``conv2d`` with a stride above 1 and input channels of
    8 mod 16 a kernel as large as its stride, zero but for the top-left tap, and padding of
    ``stride - 1`` at the bottom and right (module docstring), in place.

    Returns:
        How many convs were widened.
    """
    block = loaded.program.global_block()
    writers = producers(block)
    widened: list[str] = []
    for conv in [op for op in block.ops if op.type == "conv2d"]:
        filter_writer = writers.get(conv.input("Filter")[0])
        if filter_writer is None or filter_writer.type != "dequantize_linear":
            continue
        weight = filter_writer.input("X")[0]
        if not is_persistable(block, weight):
            continue
        shape = list(block.var(weight).shape)
        strides = list(conv.attr("strides"))
        if (
            len(shape) != 4 or shape[2:] != [1, 1] or conv.attr("groups") != 1 or max(strides) <= 1
            or any(conv.attr("paddings")) or any(d != 1 for d in conv.attr("dilations"))
            or conv.attr("data_format") not in ("NCHW", "AnyLayout")
            or shape[1] % 16 != _RACING_CHANNELS_MOD_16
        ):
            continue
        value = get_tensor(loaded, weight)
        wide = np.zeros(shape[:2] + strides, dtype=value.dtype)
        wide[:, :, 0, 0] = value[:, :, 0, 0]
        # (A new weight: another conv may read the 1x1 one.)
        filter_writer._rename_input(weight, new_persistable(loaded, f"{weight}.widened", wide))
        block.var(filter_writer.output("Y")[0]).desc.set_shape(list(wide.shape))
        # [top, bottom, left, right]: ceil(size / stride) outputs, as at 1x1.
        conv._set_attr("paddings", [0, strides[0] - 1, 0, strides[1] - 1])
        conv._set_attr("padding_algorithm", "EXPLICIT")
        widened.append(conv.output("Output")[0])
    if widened:
        logger.info(
            "%d strided 1x1 int8 convs with input channels of 8 mod 16 run with a kernel as "
            "large as their stride, zero but for one tap (oneDNN's AVX2 1x1 kernel for them is "
            "wrong on two threads): %s", len(widened), ", ".join(widened),
        )
    return len(widened)
