"""Strided 1x1 int8 convs that oneDNN's AVX2 kernels compute wrongly on two threads.

oneDNN runs a 1x1 conv with a stride above 1 by first copying the strided input pixels into a
buffer (its "reduce to unit stride" driver). On this project's AVX2 CPU the int8 kernel
(``jit_uni_int8_1x1:avx2``) got that copy wrong for input channel counts of 8 mod 16 when
Paddle Inference ran it on two threads: from call to call, part of the second thread's batch
rows were off (measured on one conv with 8, 24 or 40 input channels: 30% of the calls off the
one-thread result by up to 0.81 of the largest output; with 4, 12, 16, 20, 32, 48, 64 or 96
channels, and at stride 1, none in thousands of calls). A RegNet's downsample shortcuts (24,
56, 152 channels) run into it. :func:`subsample_strided_pointwise_convs` gives such a conv its
input already subsampled: a max-pool with a 1x1 window and the conv's stride (the same pixels,
so the same values and codes: Paddle runs it int8, and the conv's quantize pair moves after it,
behind a ReLU where the input is u8) and the conv at stride 1.

A projection shortcut rewritten so no longer fuses into the other conv of its block (the pool's
output is no ancestor of it); :func:`.coded_identity.round_unfused_projections`, which runs
after, gives that add the simulation's codes.
"""

from __future__ import annotations

import logging

import paddle

from .graph import insert_op, is_persistable, op_index, producers, readers, remove_op
from .legacy_program import quantize_pair

__all__ = ["subsample_strided_pointwise_convs"]

logger = logging.getLogger(__name__)

#: Input channel counts (mod 16) whose strided 1x1 int8 conv oneDNN's AVX2 kernel races on.
_RACING_CHANNELS_MOD_16 = 8


def subsample_strided_pointwise_convs(block: "paddle.static.Block") -> int:
    """Rewrites each int8 (its filter from a ``dequantize_linear``) ungrouped, unpadded 1x1
    ``conv2d`` with a stride above 1 and input channels of 8 mod 16 into a 1x1 max-pool with
    that stride and the conv at stride 1 (module docstring).

    Returns:
        How many convs were rewritten.
    """
    writers = producers(block)
    rewritten = []
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
        pair = quantize_pair(conv.input("Input")[0], writers)
        if pair is None:
            continue
        quantize, dequantize = pair
        source = quantize.input("X")[0]
        var = block.var(source)
        subsampled = list(var.shape[:2]) + [
            size if size < 0 else (size + stride - 1) // stride for size, stride in zip(var.shape[2:], strides)
        ]
        stem = f"{source}.strided_{op_index(block, conv)}"
        names = [block.create_var(name=f"{stem}{suffix}", shape=subsampled, dtype=var.dtype).name
                 for suffix in ("", ".rectified", ".quantized", ".dequantized")]
        source_writer = writers.get(source)
        # A u8 input (behind a ReLU, which makes Paddle run it u8) stays behind one.
        unsigned = source_writer is not None and source_writer.type == "relu"
        pooled = names[1] if unsigned else names[0]
        index = op_index(block, conv)
        steps = [("pool2d", {"X": [source]}, {"Out": [names[0]]}, {
            "pooling_type": "max", "ksize": [1, 1], "strides": strides, "paddings": [0, 0],
            "global_pooling": False, "adaptive": False, "ceil_mode": False, "exclusive": True,
            "data_format": "NCHW", "padding_algorithm": "EXPLICIT",
        })]
        if unsigned:
            steps.append(("relu", {"X": [names[0]]}, {"Out": [names[1]]}, {}))
        steps.append(("quantize_linear", {
            "X": [pooled], "Scale": quantize.input("Scale"), "ZeroPoint": quantize.input("ZeroPoint"),
        }, {"Y": [names[2]]}, {name: quantize.attr(name) for name in quantize.attr_names}))
        steps.append(("dequantize_linear", {
            "X": [names[2]], "Scale": dequantize.input("Scale"), "ZeroPoint": dequantize.input("ZeroPoint"),
        }, {"Y": [names[3]]}, {name: dequantize.attr(name) for name in dequantize.attr_names}))
        for offset, (op_type, inputs, outputs, attrs) in enumerate(steps):
            insert_op(block, index + offset, type=op_type, inputs=inputs, outputs=outputs, attrs=attrs)
        conv._rename_input(conv.input("Input")[0], names[3])
        conv._set_attr("strides", [1, 1])
        # The conv's own quantize pair, where nothing else reads it.
        for op in (dequantize, quantize):
            if not readers(block).get(op.output("Y")[0]):
                remove_op(block, op_index(block, op))
        writers = producers(block)
        rewritten.append(conv.output("Output")[0])
    if rewritten:
        logger.info(
            "%d strided 1x1 int8 convs with input channels of 8 mod 16 read their input "
            "subsampled by a 1x1 max-pool (oneDNN's AVX2 kernel for them is wrong on two "
            "threads): %s", len(rewritten), ", ".join(rewritten),
        )
    return len(rewritten)
