"""Matmuls of two activations (attention's query x key and scores x value) in int8.

oneDNN runs such a matmul as an int8 ``fused_matmul`` when both inputs come from
quantize/dequantize pairs of the same signedness: :func:`quantize_activation_matmuls` gives
both inputs the pair the simulation quantizes them with, moves a ``scale`` op in front of X
behind the matmul, and separates an added mask from the matmul's output.
"""

from __future__ import annotations

import logging
from typing import Sequence

import paddle

from .graph import insert_op, insert_reader_op, op_index, producers, readers, remove_op
from .legacy_program import LegacyProgram, ProgramScales, is_constant
from .qdq import activation_qdq, narrowed_once
from .tracing import LayerRecord

__all__ = ["quantize_activation_matmuls"]

logger = logging.getLogger(__name__)


def quantize_activation_matmuls(
    loaded: LegacyProgram,
    records: Sequence[LayerRecord],
    written: ProgramScales,
    dequantized_inputs: dict[tuple[str, float], str],
    narrow_below_8_bits: bool = False,
) -> int:
    """Quantizes both inputs of each matmul of two activations a record describes (s8, as the
    simulation computes it; oneDNN runs a ``fused_matmul`` int8 when both inputs come from
    quantize/dequantize pairs of the same signedness).

    ``narrow_below_8_bits`` (oneDNN targets, whose pipeline reads 8-bit quantize ops only): an
    input grid narrower than 8 bits is written as 8-bit codes of that grid, clipped to it
    (:func:`.qdq.narrowed_once`); a 7-bit quantize op made Paddle Inference refuse the whole
    program ("Unsupported number quantization bits: 7").

    Returns:
        How many matmuls got quantized inputs.
    """
    block = loaded.program.global_block()
    writers = producers(block)  # of the traced operands, which the inserted ops leave alone
    narrowed_inputs: dict[tuple[str, float], tuple[str, float, int]] = {}
    count = 0
    for record in records:
        if not record.multiplies_inputs:
            continue
        thresholds = (record.input_threshold, record.second_input_threshold)
        for inputs, output in record.calls:
            index, op = next(
                ((i, op) for i, op in enumerate(block.ops)
                 if op.type == "matmul_v2" and output in op.output("Out")),
                (None, None),
            )
            if op is None or [op.input("X")[0], op.input("Y")[0]] != inputs[:2]:
                logger.warning(
                    "layer %r: no matmul_v2 reads %s in the traced program; it stays fp32",
                    record.name, inputs[:2],
                )
                continue
            constant = [op.input(slot)[0] for slot in ("X", "Y") if is_constant(block, op.input(slot)[0], writers)]
            if constant:
                # convert keeps such a matmul fp32 once calibration saw the operand unchanged
                # over several calls (LayerState.constant_operand); one call cannot show it.
                logger.warning(
                    "layer %r multiplies by %s, computed from parameters only: Paddle Inference "
                    "folds it into a constant and runs this matmul as an fp32 mul, not the int8 "
                    "matmul the simulation computes. Calibrate with two or more different "
                    "batches, so that convert keeps it fp32 too.", record.name, constant[0],
                )
            index, call_thresholds = _scale_after_matmul(block, index, op, thresholds)
            for slot, threshold in zip(("X", "Y"), call_thresholds):
                name = op.input(slot)[0]
                source, threshold, bits = name, float(threshold), record.activation_bits
                if narrow_below_8_bits and bits < 8:
                    source, threshold, added = narrowed_once(
                        narrowed_inputs, loaded, index, name, threshold, bits, writers
                    )
                    index, bits = index + added, 8
                key = (source, threshold)
                qdq = dequantized_inputs.get(key)
                if qdq is None:
                    qdq = activation_qdq(loaded, index, source, threshold, bits, len(dequantized_inputs))
                    dequantized_inputs[key] = qdq
                    written.inputs[source] = threshold
                    index += 2
                op._rename_input(name, qdq)
            _separate_added_output(block, op)
            count += 1
    return count


def _separate_added_output(block: "paddle.static.Block", op) -> None:
    """Puts an ``assign`` between an int8 matmul of two activations (or the ``scale`` after
    it) and the ``elementwise_add`` reading its output (attention scores plus a mask).

    Paddle 3.3.1 fuses such an add into the matmul as its residual input, and then runs the
    matmul int8 only if the added tensor has a scale too: with a float mask it ran fp32 on the
    unquantized operands (measured, ``x86-vnni``: a causal-mask attention with rotary
    embeddings, 86 of 90 tokens off the simulation, 4.5% of the largest output). With the
    ``assign`` between them the matmul runs int8 and the add in float, as simulated.
    """
    reading = readers(block)
    writer, out = op, op.output("Out")[0]
    followers = reading.get(out, [])
    if len(followers) == 1 and followers[0].type == "scale":  # the moved q * d**-0.5
        writer = followers[0]
        out = writer.output("Out")[0]
        followers = reading.get(out, [])
    adds = [reader for reader in followers if reader.type == "elementwise_add"]
    if adds:
        insert_reader_op(block, writer, out, adds, "assign", "unfused")


def _scale_after_matmul(
    block: "paddle.static.Block", index: int, op, thresholds: tuple[float, float]
) -> tuple[int, tuple[float, float]]:
    """Moves a ``scale`` op feeding only the matmul's X (attention's ``q * d**-0.5``) after
    the matmul, X's threshold divided by the factor (``fq(a*q, t) = a*fq(q, t/|a|)``).

    Paddle Inference ran the matmul as an int8 ``fused_matmul`` that disagreed with the
    simulation with the scale between the quantize op and the matmul (measured: logit cosine
    0.993 on a 2-layer ``nn.TransformerEncoder``).

    Returns:
        The matmul's index and the thresholds of its inputs.
    """
    x = op.input("X")[0]
    writers, reading = producers(block), readers(block)
    scale = writers.get(x)
    if (
        scale is None or scale.type != "scale" or scale.attr("bias") != 0.0
        or scale.attr("scale") == 0.0 or scale.input("ScaleTensor") or len(reading.get(x, [])) != 1
    ):
        return index, thresholds
    factor = float(scale.attr("scale"))
    source, out = scale.input("X")[0], op.output("Out")[0]
    var = block.var(out)
    unscaled = block.create_var(name=f"{out}.unscaled", shape=var.shape, dtype=var.dtype)
    op._rename_input(x, source)
    op._rename_output(out, unscaled.name)
    scale_index = op_index(block, scale)
    remove_op(block, scale_index)
    index -= 1
    insert_op(
        block, index + 1, type="scale", inputs={"X": [unscaled.name]}, outputs={"Out": [out]},
        attrs={"scale": factor, "bias": 0.0, "bias_after_scale": True},
    )
    return index, (thresholds[0] / abs(factor), thresholds[1])
