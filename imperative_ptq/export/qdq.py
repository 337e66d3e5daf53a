"""Quantize/dequantize pairs and the clips around them, inserted into a legacy program.

An int8 op's input gets a ``quantize_linear`` / ``dequantize_linear`` pair whose persistable
``Scale`` holds its threshold (:func:`activation_qdq`). oneDNN's pipeline reads 8-bit quantize
ops only, so a signed input on a narrower grid is first clipped to that grid's codes
(:func:`narrowed_once`). An identity ``clip`` gives some readers a tensor of their own, whose
scale then cannot travel to the other readers (:func:`insert_identity_clip`).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ..quantizers.qparams import symmetric_levels
from .graph import insert_op, insert_reader_op, is_persistable, new_persistable, op_index, producers, readers, remove_op
from .legacy_program import LegacyProgram
from .unsigned import gemm_output

__all__ = ["activation_qdq", "drop_identity_clips_before_u8_clips", "insert_identity_clip", "narrowed_once"]


#: The bound of an identity clip: the whole float32 range.
_FLOAT32_LIMIT = float(np.finfo(np.float32).max)


def insert_identity_clip(block, writer, name: str, consumers: list, suffix: str = "isolated") -> str:
    """Makes ``consumers`` read ``clip(name)`` over the whole float range instead of ``name``;
    returns its output ``<name>.<suffix>``."""
    return insert_reader_op(
        block, writer, name, consumers, "clip", suffix, {"min": -_FLOAT32_LIMIT, "max": _FLOAT32_LIMIT}
    )


def _identity_clip(op) -> bool:
    """Whether ``op`` is a clip over the whole float range (:func:`insert_identity_clip`)."""
    return op.type == "clip" and op.attr("min") <= -_FLOAT32_LIMIT and op.attr("max") >= _FLOAT32_LIMIT


def drop_identity_clips_before_u8_clips(block) -> int:
    """Removes the identity clip after a pool whose one reader is a u8 clip
    (:func:`.unsigned.insert_clip_relu`: a ``clip`` or ``elementwise_min``, then a ``relu``) or a
    shift (:func:`.shifted.insert_shift`: a ``fused_elementwise_add`` of a parameter, then a
    ``relu``): those are no ops Paddle carries a scale back through either, and oneDNN fuses
    nothing into a pool, so the identity clip only cost an op (one in each squeeze-excite block
    of a MobileNetV3, whose pool stays fp32). Returns how many were removed."""
    writers, reading = producers(block), readers(block)
    dropped = 0
    for op in list(block.ops):
        if not _identity_clip(op):
            continue
        source, out = op.input("X")[0], op.output("Out")[0]
        after = reading.get(out, [])
        writer = writers.get(source)
        if (
            writer is None or writer.type != "pool2d" or len(reading.get(source, [])) != 1 or len(after) != 1
            or not (
                after[0].type in ("clip", "elementwise_min")
                or after[0].type == "fused_elementwise_add" and is_persistable(block, after[0].input("Y")[0])
            )
        ):
            continue
        u8_readers = reading.get(after[0].output("Out")[0], [])
        if len(u8_readers) != 1 or u8_readers[0].type != "relu":
            continue
        after[0]._rename_input(out, source)
        remove_op(block, op_index(block, op))
        dropped += 1
    return dropped


def narrowed_once(
    narrowed: dict[tuple[str, float], tuple[str, float, int]], loaded: LegacyProgram, index: int,
    name: str, threshold: float, bits: int, writers: Mapping,
) -> tuple[str, float, int]:
    """:func:`_narrow_signed_input` of ``(name, threshold)``, inserted once per ``narrowed``
    cache: the clipped variable, its 8-bit threshold and how many ops were inserted now."""
    found = narrowed.get((name, threshold))
    if found is not None:
        return found[0], found[1], 0
    found = narrowed[(name, threshold)] = _narrow_signed_input(loaded, index, name, threshold, bits, writers)
    return found


def _narrow_signed_input(
    loaded: LegacyProgram, index: int, name: str, threshold: float, bits: int, writers: Mapping
) -> tuple[str, float, int]:
    """A signed input on a grid narrower than 8 bits, for oneDNN's 8-bit quantize op: clipped
    at ``+-threshold`` (so its codes stay within ``-L..L``) and given the 8-bit threshold
    ``t * 127 / L``. Returns the clipped variable, that threshold and how many ops were
    inserted at ``index``. Right after a conv/fc the clip is an ``elementwise_min`` and an
    ``elementwise_max``: Paddle 3.3.1 fuses a ``clip`` op there as a plain ReLU
    (:func:`.unsigned.insert_clip_relu`)."""
    block = loaded.program.global_block()
    var = block.var(name)
    stem = f"{name}.clipped_{len(block.ops)}"
    out = block.create_var(name=stem, shape=var.shape, dtype=var.dtype)
    written = float(threshold) * symmetric_levels(8) / symmetric_levels(bits)
    if not gemm_output(writers, name, through_activations=True):
        insert_op(
            block, index, type="clip", inputs={"X": [name]}, outputs={"Out": [out.name]},
            attrs={"min": -float(threshold), "max": float(threshold)},
        )
        return out.name, written, 1
    bounds = [
        new_persistable(loaded, f"{stem}.{side}", np.array([value], dtype=np.float32))
        for side, value in (("max", threshold), ("min", -threshold))
    ]
    below = block.create_var(name=stem + ".below", shape=var.shape, dtype=var.dtype)
    insert_op(
        block, index, type="elementwise_min", inputs={"X": [name], "Y": [bounds[0]]},
        outputs={"Out": [below.name]}, attrs={"axis": -1},
    )
    insert_op(
        block, index + 1, type="elementwise_max", inputs={"X": [below.name], "Y": [bounds[1]]},
        outputs={"Out": [out.name]}, attrs={"axis": -1},
    )
    return out.name, written, 2


def activation_qdq(
    loaded: LegacyProgram, index: int, name: str, threshold: float, bits: int, serial: int
) -> str:
    """Inserts quantize_linear + dequantize_linear of ``name`` at ``index``."""
    block = loaded.program.global_block()
    var = block.var(name)
    stem = f"{name}.q{serial}"
    scale = new_persistable(loaded, stem + ".scale", np.array([threshold], dtype=np.float32))
    zero = new_persistable(loaded, stem + ".zero_point", np.zeros([1], dtype=np.int32))
    quantized = block.create_var(name=stem + ".quantized", shape=var.shape, dtype=var.dtype)
    dequantized = block.create_var(name=stem + ".dequantized", shape=var.shape, dtype=var.dtype)
    attrs = {"quant_axis": -1, "bit_length": bits}
    insert_op(
        block, index,
        type="quantize_linear",
        inputs={"X": [name], "Scale": [scale], "ZeroPoint": [zero]},
        outputs={"Y": [quantized.name]},
        attrs=attrs,
    )
    insert_op(
        block, index + 1,
        type="dequantize_linear",
        inputs={"X": [quantized.name], "Scale": [scale], "ZeroPoint": [zero]},
        outputs={"Y": [dequantized.name]},
        attrs=attrs,
    )
    return dequantized.name
