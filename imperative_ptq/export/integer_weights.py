"""Float weights that hold only whole numbers, read through a copy.

Paddle 3.3.1's ``quant_dequant_onednn_pass`` takes the weight of a conv2d, depthwise_conv2d,
mul, matmul or matmul_v2 whose every value is a whole number for an int8 weight that lost its
scale, and refuses the program ("Could not find threshold information for [...] var") when no
``dequantize_linear`` gives it one. Such weights are real fp32 weights in detection heads: the
distribution-focal-loss projection of PP-YOLOE and PicoDet (``0, 1, ..., reg_max``, a 1x1 conv
or a ``F.linear`` kept fp32), and any all-zero (zero-initialized) conv. The op then reads the
weight through an ``assign`` into a non-persistable variable, which the pass does not inspect;
the values, and so the output, are unchanged.
"""

from __future__ import annotations

import logging

import numpy as np

from .graph import insert_op, is_persistable, op_index

__all__ = ["read_integer_weights_through_copies"]

logger = logging.getLogger(__name__)

#: Op type -> its weight input, as the pass checks them.
_CHECKED_WEIGHTS = {
    "conv2d": "Filter", "depthwise_conv2d": "Filter", "mul": "Y", "matmul": "Y", "matmul_v2": "Y",
}


def _whole_numbers(value: np.ndarray) -> bool:
    return value.dtype.kind == "f" and bool(np.all(np.trunc(value) == value))


def read_integer_weights_through_copies(loaded) -> list[str]:
    """Gives every checked op whose persistable float weight holds only whole numbers a copy of
    it to read (in place on ``loaded``, a :class:`~.program.LegacyProgram`).

    Returns:
        The weights now read through copies.
    """
    block = loaded.program.global_block()
    copied: dict[str, str] = {}
    for op in list(block.ops):
        slot = _CHECKED_WEIGHTS.get(op.type)
        if slot is None or not op.input(slot):
            continue
        name = op.input(slot)[0]
        if not is_persistable(block, name):
            continue
        if name not in copied:
            variable = loaded.scope.find_var(name)
            if variable is None or not _whole_numbers(np.asarray(variable.get_tensor())):
                continue
            source = block.var(name)
            copy = block.create_var(name=f"{name}.float_copy", shape=source.shape, dtype=source.dtype)
            insert_op(block, op_index(block, op), type="assign", inputs={"X": [name]}, outputs={"Out": [copy.name]})
            copied[name] = copy.name
        op._rename_input(name, copied[name])
    if copied:
        logger.info(
            "%d fp32 weights of whole numbers read through a copy (Paddle Inference would take "
            "them for int8 weights without a scale): %s", len(copied), ", ".join(copied),
        )
    return list(copied)
