"""Convolutions whose filter is computed from the network's input, written so that Paddle
Inference's oneDNN int8 pipeline can load them.

Some models convolve with a filter they compute from their input: RTFormer's cross attention
(``F.conv2d(x, cross_k)`` with ``cross_k`` reshaped from a feature map), a tracker's
cross-correlation (``F.conv2d(search, template, groups=C)``). No layer holds such a filter, so
nothing calibrates it and the conv runs fp32. Paddle 3.3.1's int8 pipeline nevertheless reads
the filter of every ``conv2d`` / ``depthwise_conv2d`` from its scope of parameters to compute
weight scales (``compute_propagate_scales_onednn_pass``) and refuses to build the predictor
where it is none ("The input persistable var [reshape2_2.tmp_0] of [fused_conv2d] op is not
found"): one such conv made the whole int8 model unloadable. A filter computed from
parameters alone is folded into a parameter before that pass and loads as traced.

Each conv on an input-dependent filter is written as the same convolution in ``conv3d`` on
a depth of 1 (input and filter unsqueezed at axis 2, the output squeezed back), which that
pass does not read. (The export's warning about convs on computed weights names them.)
"""

from __future__ import annotations

import logging

import paddle

from .graph import insert_op, op_index, producers, remove_op
from .legacy_program import computed_from_parameters

__all__ = ["input_dependent_filter_convs_as_conv3d"]

logger = logging.getLogger(__name__)

_CONV_OPS = ("conv2d", "depthwise_conv2d")


def input_dependent_filter_convs_as_conv3d(block: "paddle.static.Block") -> int:
    """Rewrites each NCHW conv whose filter depends on the network's input as described in
    the module docstring; input and output keep their names.

    Returns:
        How many convs were rewritten.
    """
    writers = producers(block)
    # All decided before any edit: a removed op's Python handle must not be read again.
    convs = [
        op for op in block.ops
        if op.type in _CONV_OPS and op.attr("data_format") in ("NCHW", "AnyLayout")
        and not computed_from_parameters(block, op.input("Filter")[0], writers)
    ]
    rewritten = []
    for op in convs:
        source, weight, out = op.input("Input")[0], op.input("Filter")[0], op.output("Output")[0]
        index = op_index(block, op)
        source_5d = _unsqueeze_depth(block, index, source)
        weight_5d = _unsqueeze_depth(block, index + 1, weight)
        out_var = block.var(out)
        out_shape = list(out_var.shape)
        out_5d = block.create_var(
            name=f"{out}.depth_1", shape=[*out_shape[:2], 1, *out_shape[2:]], dtype=out_var.dtype
        ).name
        paddings = [int(p) for p in op.attr("paddings")]
        insert_op(
            block, index + 2, type="conv3d", inputs={"Input": [source_5d], "Filter": [weight_5d]},
            outputs={"Output": [out_5d]},
            attrs={
                "strides": [1, *op.attr("strides")],
                "paddings": [0, *paddings] if len(paddings) == 2 else [0, 0, *paddings],
                "dilations": [1, *op.attr("dilations")],
                "groups": op.attr("groups"),
                "padding_algorithm": op.attr("padding_algorithm"),
                "data_format": "NCDHW",
            },
        )
        xshape = block.create_var(name=f"{out_5d}.xshape", shape=[0, *block.var(out_5d).shape], dtype=out_var.dtype)
        insert_op(
            block, index + 3, type="squeeze2", inputs={"X": [out_5d]},
            outputs={"Out": [out], "XShape": [xshape.name]}, attrs={"axes": [2]},
        )
        remove_op(block, op_index(block, op))
        rewritten.append(out)
    if rewritten:
        logger.debug("convs on input-dependent filters written as conv3d: %s", ", ".join(rewritten))
    return len(rewritten)


def _unsqueeze_depth(block: "paddle.static.Block", index: int, source: str) -> str:
    """Inserts at ``index`` an ``unsqueeze2`` of the 4-d ``source`` to 5-d (a depth of 1 at
    axis 2); returns the 5-d tensor's name."""
    var = block.var(source)
    shape = list(var.shape)
    out = block.create_var(name=f"{source}.depth_1_{index}", shape=[*shape[:2], 1, *shape[2:]], dtype=var.dtype)
    xshape = block.create_var(name=f"{out.name}.xshape", shape=[0, *shape], dtype=var.dtype)
    insert_op(
        block, index, type="unsqueeze2", inputs={"X": [source]},
        outputs={"Out": [out.name], "XShape": [xshape.name]}, attrs={"axes": [2]},
    )
    return out.name
