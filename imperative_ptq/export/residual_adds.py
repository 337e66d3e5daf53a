"""Residual adds beside int8 convs and fcs.

oneDNN fuses ``conv(x) + r`` (after the conv's bias add or BatchNorm) into the conv, and Paddle
runs the fused op int8 only when ``r`` has a scale and is a graph node other than the conv's
input. These passes keep an int8 conv/fc out of an add whose other operand or sum has no scale
(:func:`isolate_unscaled_residual_adds`), give a network input added as an identity shortcut a
``relu`` copy that carries its scale (:func:`scaled_input_copies`), and give a conv adding its
own u8 input a copy of that input to quantize (:func:`separate_self_residual_inputs`).
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Mapping

import paddle

from .graph import ancestors, insert_op, is_persistable, op_index, producers, readers
from .legacy_program import (
    INT8_WEIGHT_OPS,
    ProgramScales,
    int8_weight_op_output,
    int8_weight_op_writing,
)
from .unsigned import runs_unsigned

__all__ = ["isolate_unscaled_residual_adds", "scaled_input_copies", "separate_self_residual_inputs"]

logger = logging.getLogger(__name__)


def isolate_unscaled_residual_adds(
    block: "paddle.static.Block", written: ProgramScales, simulated_residuals: set[str],
    coded_residuals: set[str],
) -> int:
    """Keeps each int8 conv/fc out of a residual add whose other operand, or whose sum (after
    the ReLU oneDNN fuses too), has no scale.

    oneDNN fuses a conv (or fc) and the add of another tensor after it (its bias add or
    BatchNorm in between) into one op, which Paddle runs int8 only when that residual has a
    scale; without one the fused op runs fp32 on its *unquantized* input, while the
    simulation quantizes it (measured: 1% relative error on conv -> BatchNorm -> 1x1 conv ->
    ReLU6 -> conv + residual; MobileNetV2's residual block outputs, which are functional adds,
    and a transformer's residual LayerNorm outputs read through a shift have no scale). An
    identity ``scale`` op between the conv and the add stops the fusion: the conv runs int8
    on its own with an fp32 output and the add in fp32, as simulated. The fused op's output
    needs a scale too: a network's last ``F.relu(x + y)``, read only by a global pool, has none
    (there the simulation's residual codes are what the int8 conv before the add wrote).

    ``simulated_residuals``: the outputs the simulation writes as the residual a fused conv
    reads (:class:`~imperative_ptq.quant_residual.QuantizedResidualOutput`); where one is the
    projection Paddle fuses into the other conv, that conv keeps the add whatever its own
    output's scale. ``coded_residuals``: every tensor the simulation reads as such codes
    (those, and identity shortcuts on u8 codes); a conv whose add's other operand is a signed
    activation (no ReLU or conv output) that is not one is kept out of the add too. Paddle
    would read that operand on its scale's codes where the simulation adds it in float
    (measured on ``x86-vnni``: a Hardswish output as the identity of a 1x1 conv + BatchNorm,
    3-10% off).

    Returns:
        How many conv/fc outputs were isolated.
    """
    writers = producers(block)
    reading = readers(block)
    # What the program quantizes (a signed tensor whose quantize op reads a copy of it, see
    # isolate_quantized_shared_outputs, has no scale itself) and the outputs given one.
    scaled = {op.input("X")[0] for op in block.ops if op.type == "quantize_linear"} | set(written.outputs)
    isolated = 0
    for add, operands in _activation_adds(block):
        total = add.output("Out")[0]
        after = reading.get(total, [])
        # The sum read as s8 by an int8 op (its quantize op reading it directly, no ReLU or
        # u8 clip in between).
        signed_sum = any(reader.type == "quantize_linear" for reader in after)
        if len(after) == 1 and after[0].type in ("relu", "relu6"):
            total = after[0].output("Out")[0]
        int8_output = {name: int8_weight_op_output(block, name, writers) for name in operands}
        projection = _projection_operand(operands, writers, int8_output)
        for position, name in enumerate(operands):
            other = operands[1 - position]
            if not int8_output[name] or (name == projection and name in simulated_residuals):
                continue  # no int8 conv; or Paddle fuses the add into the other conv, reading this one
            # A signed activation as the residual (an identity shortcut that is no ReLU or conv
            # output) is read on codes only where the simulation puts it on them.
            # A u8 residual (a ReLU output) of a signed sum: oneDNN would read its codes as s8
            # (the simulation adds it in float, residual_simulation.FusedResiduals).
            coded = (
                other in coded_residuals or (runs_unsigned(block, other, writers) and not signed_sum)
                or int8_output[other]
            )
            if other in scaled and total in scaled and coded:
                continue
            if len(reading.get(name, [])) != 1:
                continue  # read elsewhere too: oneDNN does not fuse the add
            var = block.var(name)
            plain = block.create_var(name=f"{name}.unfused", shape=var.shape, dtype=var.dtype)
            add._rename_input(name, plain.name)
            index = op_index(block, writers[name])
            insert_op(
                block, index + 1, type="scale", inputs={"X": [name]}, outputs={"Out": [plain.name]},
                attrs={"scale": 1.0, "bias": 0.0, "bias_after_scale": True},
            )
            isolated += 1
    return isolated


def scaled_input_copies(
    block: "paddle.static.Block", outputs: dict[str, float], feeds: set[str]
) -> dict[str, str]:
    """Gives each tensor of ``feeds`` with a threshold in ``outputs`` that an add reads beside
    an int8 conv's output (an identity shortcut on u8 codes, ``x + conv(x)`` on an image) a
    ``relu`` copy for those adds, which carries the threshold: Paddle fuses such an add into
    the conv only when the residual has a scale, and a feed variable has no op to write one
    (measured: the conv ran fp32 with the add fused, 0.9-1.7% of the largest output off the
    simulation), and only where the residual is an ancestor of the conv's output, so the u8
    clips in front of int8 readers read the copy too. ``relu`` keeps the copy u8 and changes
    no value the simulation reads there (its codes clip at 0 too): callers pass the identities
    Paddle would otherwise run s8 as well. Updates ``outputs``; returns tensor -> copy.
    """
    writers, reading = producers(block), readers(block)
    copies: dict[str, str] = {}
    for name in sorted(feeds & set(outputs)):
        adds = [
            op for op in reading.get(name, []) if op.type == "elementwise_add"
            and any(
                other != name and not is_persistable(block, other) and int8_weight_op_output(block, other, writers)
                for other in op.input("X") + op.input("Y")
            )
        ]
        if not adds:
            continue
        var = block.var(name)
        copy = block.create_var(name=f"{name}.scaled", shape=var.shape, dtype=var.dtype)
        insert_op(
            block, min(op_index(block, op) for op in reading[name]), type="relu",
            inputs={"X": [name]}, outputs={"Out": [copy.name]},
        )
        # The u8 clips in front of int8 readers read the copy too: Paddle fuses the add only
        # where the residual is an ancestor of the conv's output.
        clips = [op for op in reading[name] if any(out.startswith(f"{name}.u8_") for out in op.output_arg_names)]
        for op in adds + clips:
            op._rename_input(name, copy.name)
        outputs[copy.name] = outputs[name]
        copies[name] = copy.name
    return copies


def _activation_adds(block: "paddle.static.Block") -> Iterator[tuple[Any, list[str]]]:
    """Each ``elementwise_add`` of two activations (no parameter operand) in ``block``, with
    its two operands (a snapshot of the ops: callers insert ops as they go)."""
    for add in list(block.ops):
        if add.type != "elementwise_add":
            continue
        operands = add.input("X") + add.input("Y")
        if len(operands) == 2 and not any(is_persistable(block, name) for name in operands):
            yield add, operands


def separate_self_residual_inputs(block: "paddle.static.Block") -> int:
    """Gives each int8 conv whose residual add reads the conv's own u8 input (``relu(x +
    conv(x))`` with ``x`` on codes, as a looped or single-conv residual block computes it) a
    ``relu`` copy of that input to quantize, so that Paddle fuses the add into the conv as the
    simulation computes it.

    Paddle's residual fusion matches the conv's input and the residual as two distinct graph
    nodes, so it skips an add whose residual is the conv's input itself and adds in float;
    where the export clips the input (a copy), it fuses. Measured on ``h = relu(h + conv(h))``
    three times: the second and third adds ran in float, 0.75-1.4% of the largest output off
    the simulation, which fuses them. A ``relu`` of a non-negative tensor changes no value and
    keeps the copy u8.

    Returns:
        How many conv inputs were separated.
    """
    writers = producers(block)
    separated = 0
    for add, operands in _activation_adds(block):
        for position, name in enumerate(operands):
            residual = operands[1 - position]
            op = int8_weight_op_writing(block, name, writers)
            if op is None or op.type not in ("conv2d", "depthwise_conv2d"):
                continue  # Paddle fuses residual adds into int8 convs only
            dequantize = writers.get(op.input(INT8_WEIGHT_OPS[op.type][1])[0])
            quantize = None if dequantize is None else writers.get(dequantize.input("X")[0])
            if (
                quantize is None or quantize.type != "quantize_linear"
                or quantize.input("X")[0] != residual
                or not runs_unsigned(block, residual, writers)
            ):
                continue
            var = block.var(residual)
            copy = block.create_var(name=f"{residual}.conv_input", shape=var.shape, dtype=var.dtype)
            insert_op(
                block, op_index(block, quantize), type="relu", inputs={"X": [residual]},
                outputs={"Out": [copy.name]},
            )
            quantize._rename_input(residual, copy.name)
            writers[copy.name] = block.ops[op_index(block, quantize) - 1]
            separated += 1
    if separated:
        logger.info("%d int8 convs read a relu copy of an input their residual add reads too, "
                    "so that Paddle fuses the add", separated)
    return separated


def _projection_operand(operands: list[str], writers: Mapping, int8_output: Mapping[str, bool]) -> str | None:
    """Of a residual add of two int8 conv/fc outputs (``int8_output``: which operands are),
    the one Paddle reads as the residual of the other's fused conv (its projection fusion's
    rule: the conv whose input is an ancestor of the other conv's output is the projection);
    ``None`` if not both are such outputs or neither input is such an ancestor."""
    if not all(int8_output[name] for name in operands):
        return None

    def conv_input(name: str) -> str:
        op = writers.get(name)
        while op is not None and op.type not in INT8_WEIGHT_OPS:
            op = writers.get(op.input("X")[0])
        return op.input(INT8_WEIGHT_OPS[op.type][1])[0]

    first, second = operands
    if conv_input(first) in ancestors(second, writers):
        return first
    if conv_input(second) in ancestors(first, writers):
        return second
    return None
