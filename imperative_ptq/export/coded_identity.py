"""Float readers of an identity shortcut that the simulation holds on codes.

The conv that reads an identity shortcut a fused int8 conv adds (``QuantizedLayer.residual_codes``,
:mod:`imperative_ptq.quant_residual`) replaces the tensor's values by its codes in place, so
every op that reads the tensor after that conv reads the codes: the fused add, and also ops
Paddle Inference runs in float on the tensor itself (DLA's tree root concatenates the first
block's output, which the second block adds as its identity). Paddle reads codes only where it
quantizes: the int8 readers' quantize ops and the residual of the fused conv; its float readers
read the float tensor (measured on a DLA-shaped net of four trees: 12% of the largest logit
off). :func:`round_float_readers` gives those readers the codes, computed in float:
``scale(1 / step) -> round -> clip(0, top) -> scale(step)``.

Ties (a value exactly half a step from two codes) round away from zero here and to even in the
simulation; a float reader before the conv (in program order) keeps reading the float tensor,
as in the simulation, unless the simulation puts the tensor on codes for it too (a float layer
reading it first, :class:`~imperative_ptq.quant_residual.ResidualCodesInput`: a ResNet-vd
shortcut's pool run before its branch's conv, which Paddle would otherwise run int8 on the
codes, rounding the pooled codes). Not covered: an identity the network also returns (Paddle
returns the float tensor, the simulation its codes).

Paddle fuses the add itself only where the identity is an ancestor of the conv's output; an add
of an identity from another branch (an HRNet fuse layer's ``x1 + conv_bn(x0)``) is a float
reader like the others, and the ReLU output after it, which a fused conv would have written on
codes, is put on them too (:func:`round_unfused_sums`). Likewise an add of two conv outputs
whose projection conv's input is no ancestor of the other conv's output: the projection's s8
residual codes and the sum's codes (:func:`round_unfused_projections`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Collection, Mapping

import paddle

from ..quantizers.qparams import symmetric_levels
from .graph import (
    Operator, ancestors, feeds_quantize, insert_op, is_persistable, op_index, producers, readers, rounding_steps,
)
from .legacy_program import int8_weight_op_writing, quantize_pair

__all__ = [
    "CodedIdentity", "round_float_readers", "round_relus_written_in_float", "round_unfused_projections",
    "round_unfused_sums",
]

logger = logging.getLogger(__name__)

#: Suffix of the variable holding a tensor's codes in float (``<name>.codes.on_grid``).
_ON_GRID = ".codes.on_grid"


@dataclasses.dataclass(frozen=True)
class CodedIdentity:
    """An identity shortcut on codes: ``clip(round(x / step), lowest, top) * step``.

    Attributes:
        threshold: ``t`` of the codes (the input threshold of the conv reading it).
        top: The largest code (255 for u8, 127 for a tensor Paddle writes s8).
        activation_bits: Bit width of activations (``step = t / L``, ``L = 2**(bits-1) - 1``).
    """

    threshold: float
    top: int
    activation_bits: int
    #: The smallest code (-128 for a projection's s8 residual codes).
    lowest: int = 0

    @property
    def step(self) -> float:
        """One code's step in float."""
        return float(self.threshold) / symmetric_levels(self.activation_bits)


def round_float_readers(
    block: "paddle.static.Block", identities: Mapping[str, CodedIdentity],
    int8_output: Callable[[str], bool], coded_layer_outputs: frozenset[str] = frozenset(),
) -> int:
    """Makes the float readers of each identity read its codes, as the simulation does.

    A reader after the identity's first int8 reader (its quantize op, perhaps behind a u8
    clip) reads ``scale -> round -> clip -> scale`` of it instead, except the residual add of
    an int8 conv (Paddle fuses it and reads the codes; a reader in front would stop that
    fusion). The rounded tensor carries no scale of its own (measured: giving it, and the
    ReLUs :func:`round_relus_written_in_float` puts on codes, their writer's ``out_threshold``
    made Paddle Inference 2.2e-2 .. 3.2e-2 off hourglass-shaped stacks it had run exactly).
    Where Paddle pruned its int8 readers (their outputs unused), the residual add the
    simulation fused, which Paddle computes in float, reads the codes.

    Args:
        block: The program's global block (rewritten in place).
        identities: Identity tensor name -> its codes.
        int8_output: Whether a tensor is an int8 conv/fc output (after its bias add or
            BatchNorm), into which Paddle fuses an add reading it.
        coded_layer_outputs: Outputs of float layers that read an identity on its codes
            wherever they run: their first op reads the codes, before the int8 readers too.

    Returns:
        How many readers now read the codes.
    """
    writers = producers(block)
    reading = readers(block)
    rounded = 0
    for name, codes in identities.items():
        consumers = reading.get(name, [])
        int8_readers = [op for op in consumers if feeds_quantize(op, reading)]
        if int8_readers:
            first = min(op_index(block, op) for op in int8_readers)
            floats = [
                op for op in consumers
                if (op_index(block, op) > first or _computes(op, coded_layer_outputs, reading))
                and not feeds_quantize(op, reading)
                and op.type not in ("fetch", "fetch_v2") and not _fused_residual_add(op, name, int8_output, writers)
            ]
        else:
            # Its int8 readers are gone: a layer the model calls but whose output the network
            # drops, which Paddle prunes. The simulation still read the identity on codes in
            # the residual add it fused into a conv; Paddle adds it in float there (measured:
            # an HRNet-shaped stack's dropped last upsample, 9.9e-3 of the largest output off).
            floats = [op for op in consumers if _unfused_conv_add(op, name, int8_output, writers)]
        if floats:
            _insert_codes(block, name, codes, floats)
            rounded += len(floats)
            logger.debug("%s: %d float readers read its codes (%s)", name, len(floats),
                         ", ".join(op.type for op in floats))
    return rounded


def round_unfused_sums(
    block: "paddle.static.Block", sums: Mapping[str, CodedIdentity], identities: Collection[str],
    int8_output: Callable[[str], bool],
) -> int:
    """Puts each ReLU output the simulation holds on a fused conv's codes
    (:class:`~imperative_ptq.quant_residual.ResidualSumOutput`) on those codes, computed in
    float, where Paddle does not fuse its add of an identity shortcut on codes and an int8 conv
    output into that conv: the identity is no ancestor of the conv's output (an HRNet fuse
    layer's ``relu(x1 + conv_bn(x0))``) or the export kept the conv out of the add. A fused
    conv writes the codes itself; an unfused add's ReLU output is float, which the network
    returned where the simulation returns codes (measured: 2.6e-3 of the largest output off).

    Args:
        block: The program's global block (rewritten in place).
        sums: ReLU output -> the codes the simulation puts it on.
        identities: The identity shortcuts the simulation reads on codes.
        int8_output: Whether a tensor is an int8 conv/fc output (after its bias add or
            BatchNorm), into which Paddle fuses an add reading it.

    Returns:
        How many sums were put on codes.
    """
    writers = producers(block)
    rounded = 0
    for name, codes in sums.items():
        relu = writers.get(name)
        if relu is None or relu.type != "relu":
            continue
        add = writers.get(relu.input("X")[0])
        if add is None or add.type != "elementwise_add":
            continue
        operands = add.input("X") + add.input("Y")
        # (An add Paddle does not fuse reads an identity through the codes of
        # :func:`round_float_readers`.)
        shortcut = next(
            (operand for operand in operands if operand.removesuffix(_ON_GRID) in identities), None
        )
        if len(operands) != 2 or shortcut is None or _fused_residual_add(add, shortcut, int8_output, writers):
            continue
        if not _int8_conv_operand(operands[1 - operands.index(shortcut)], int8_output, writers):
            continue  # its conv runs fp32: the simulation adds in float too
        _put_output_on_codes(block, relu, codes)
        rounded += 1
    return rounded


def round_relus_written_in_float(
    block: "paddle.static.Block", sums: Mapping[str, CodedIdentity], int8_output: Callable[[str], bool]
) -> int:
    """Puts each ReLU output the simulation holds on its int8 conv's codes (for a max-pool after
    it, ``convert``'s pooled codes) on those codes, computed in float, where no int8 op reads it
    directly: no quantize op, no int8 max-pool (one with an output scale). Paddle then writes
    the conv's output in float (a fused conv with ``force_fp32_output``), which a u8 clip in
    front of another int8 reader and the float ops read unrounded (measured: a ReLU max-pooled
    into a returned concat beside its clipped conv reader, 2.6e-3 of the largest output off).
    A ReLU after a residual add is left to the fused conv, which writes codes in any case, and
    to :func:`round_unfused_sums`; so is a ReLU a residual add reads that Paddle fuses into an
    int8 conv, which needs the ReLU's scale (measured: ``conv(block(x) + up(max_pool(x)))``,
    ``x`` read by the block's fused residual conv, which ran fp32: 2.2e-2 off).

    Args:
        block: The program's global block (rewritten in place).
        sums: ReLU output -> the codes the simulation puts it on.
        int8_output: Whether a tensor is an int8 conv/fc output (after its bias add or
            BatchNorm).

    Returns:
        How many ReLU outputs were put on codes.
    """
    writers, reading = producers(block), readers(block)
    rounded = 0
    for name, codes in sums.items():
        relu = writers.get(name)
        if relu is None or relu.type != "relu" or relu.input("X")[0].endswith(_ON_GRID):
            continue  # (already put on codes)
        before = writers.get(relu.input("X")[0])
        if before is not None and before.type == "elementwise_add" and not is_persistable(block, before.input("Y")[0]):
            continue
        if any(
            op.type == "quantize_linear" or (op.type == "pool2d" and op.has_attr("out_threshold"))
            for op in reading.get(name, [])
        ):
            continue
        if any(_fused_residual_add(op, name, int8_output, writers) for op in reading.get(name, [])):
            continue  # (its fused conv needs the ReLU's scale, which the float copy drops)
        _put_output_on_codes(block, relu, codes)
        writers, reading = producers(block), readers(block)
        rounded += 1
    return rounded


def _put_output_on_codes(block: "paddle.static.Block", relu: Operator, codes: CodedIdentity) -> None:
    """Makes ``relu`` write a float copy and puts its output on ``codes`` under its name, so
    every reader reads them."""
    name = relu.output("Out")[0]
    var = block.var(name)
    plain = block.create_var(name=f"{name}.float_sum", shape=var.shape, dtype=var.dtype)
    relu._rename_output(name, plain.name)
    if relu.has_attr("out_threshold"):  # (the float copy runs fp32)
        relu._remove_attr("out_threshold")
    # (A ReLU last, on codes >= 0: Paddle reads a ReLU output as unsigned, a scale output as
    # signed, which halved the resolution its int8 readers quantize it with.)
    on_grid = block.create_var(name=f"{name}{_ON_GRID}", shape=var.shape, dtype=var.dtype)
    index = op_index(block, relu) + 1
    after = _insert_codes_ops(block, index, plain.name, on_grid.name, f"{name}.codes", codes)
    insert_op(block, after, type="relu", inputs={"X": [on_grid.name]}, outputs={"Out": [name]})


def round_unfused_projections(
    block: "paddle.static.Block", projections: Mapping[str, CodedIdentity], sums: Mapping[str, CodedIdentity],
    int8_output: Callable[[str], bool],
) -> int:
    """Puts a projection shortcut the simulation adds as s8 residual codes
    (:class:`~imperative_ptq.quant_residual.QuantizedResidualOutput`), and the ReLU output after
    its add, on those codes, computed in float, where Paddle does not fuse the add into the
    other conv.

    Paddle's oneDNN pass fuses two conv outputs' add into the second conv only where the
    projection conv's input (the tensor its quantize op reads) is an ancestor of the second
    conv's output. A projection reading its input through a u8 clip of its own (an attention
    gate ``relu(conv(up(max_pool(a))) + conv(a))``, whose max-pool reads ``a`` on codes up to
    255 while the projection clips it at 127) is added in float, on float operands (measured:
    30% of the largest output off the simulation).

    Args:
        block: The program's global block (rewritten in place).
        projections: Projection outputs the simulation writes as s8 codes -> those codes.
        sums: ReLU output -> the codes the simulation puts it on.
        int8_output: Whether a tensor is an int8 conv/fc output (after its bias add or
            BatchNorm).

    Returns:
        How many projections were put on codes.
    """
    writers = producers(block)
    rounded = 0
    for add in [op for op in block.ops if op.type == "elementwise_add"]:
        operands = add.input("X") + add.input("Y")
        if len(operands) != 2:
            continue
        projection = next((name for name in operands if name in projections), None)
        if projection is None:
            continue
        other = operands[1 - operands.index(projection)]
        if not _int8_conv_operand(other, int8_output, writers) or _fuses_projection(block, projection, other, writers):
            continue
        _insert_codes(block, projection, projections[projection], [add])
        after = readers(block).get(add.output("Out")[0], [])
        if len(after) == 1 and after[0].type == "relu" and after[0].output("Out")[0] in sums:
            _put_output_on_codes(block, after[0], sums[after[0].output("Out")[0]])
        writers = producers(block)
        rounded += 1
    return rounded


def _fuses_projection(
    block: "paddle.static.Block", projection: str, other: str, writers: Mapping[str, Operator]
) -> bool:
    """Whether Paddle fuses the add of the conv output ``other`` and the projection conv's
    output ``projection`` (each perhaps behind a BatchNorm) into ``other``'s conv: the
    projection conv's input, the tensor its quantize op reads, is an ancestor of ``other``."""
    conv = int8_weight_op_writing(block, projection, writers)
    if conv is None or "Input" not in conv.input_names or not conv.input("Input"):
        return False
    source = conv.input("Input")[0]
    pair = quantize_pair(source, writers)
    if pair is not None:
        source = pair[0].input("X")[0]
    return source in ancestors(other, writers)


def _unfused_conv_add(
    op: Operator, name: str, int8_output: Callable[[str], bool], writers: Mapping[str, Operator]
) -> bool:
    """Whether ``op`` adds ``name`` to an int8 conv/fc output in float (Paddle does not fuse
    it: ``name`` is no ancestor of that output)."""
    other = _added_to(op, name)
    return (
        other is not None and _int8_conv_operand(other, int8_output, writers)
        and not _fused_residual_add(op, name, int8_output, writers)
    )


def _added_to(op: Operator, name: str) -> str | None:
    """The other operand of ``op`` if it is an ``elementwise_add`` of ``name`` and one more
    tensor, else ``None``."""
    if op.type != "elementwise_add":
        return None
    operands = op.input("X") + op.input("Y")
    if len(operands) != 2 or name not in operands:
        return None
    return operands[1 - operands.index(name)]


def _int8_conv_operand(name: str, int8_output: Callable[[str], bool], writers: Mapping[str, Operator]) -> bool:
    """Whether ``name`` is an int8 conv/fc output, perhaps behind the identity ``scale`` that
    keeps it out of an add (:func:`.residual_adds.isolate_unscaled_residual_adds`)."""
    writer = writers.get(name)
    if writer is not None and writer.type == "scale" and name.endswith(".unfused"):
        name = writer.input("X")[0]
    return int8_output(name)


def _computes(
    op: Operator, outputs: frozenset[str], reading: Mapping[str, list[Operator]], depth: int = 3
) -> bool:
    """Whether ``op`` begins a chain of at most ``depth`` ops, each the only reader of the one
    before, that writes one of ``outputs`` (a layer's ops: a conv, its bias add, ...)."""
    for _ in range(depth):
        written = [name for slot in op.output_names for name in op.output(slot)]
        if outputs.intersection(written):
            return True
        following = [reader for name in written for reader in reading.get(name, [])]
        if len(following) != 1:
            return False
        op = following[0]
    return False


def _fused_residual_add(
    op: Operator, name: str, int8_output: Callable[[str], bool], writers: Mapping[str, Operator]
) -> bool:
    """Whether ``op`` adds ``name`` to an int8 conv/fc output that ``name`` is an ancestor of:
    an add Paddle fuses into that conv. (From another branch, as in an HRNet fuse layer's
    ``x1 + conv_bn(x0)``, it is added in float: measured 7.6e-3 .. 8.7e-3 of the largest
    output off the simulation, which reads ``x1`` on its codes as for a fused add.)"""
    other = _added_to(op, name)
    return other is not None and int8_output(other) and name in ancestors(other, writers)


def _insert_codes(
    block: "paddle.static.Block", name: str, codes: CodedIdentity, consumers: list[Operator]
) -> None:
    """Inserts the float codes of ``name`` in front of the first of ``consumers`` and makes
    them all read it."""
    var = block.var(name)
    on_grid = block.create_var(name=f"{name}{_ON_GRID}", shape=var.shape, dtype=var.dtype)
    index = min(op_index(block, op) for op in consumers)
    _insert_codes_ops(block, index, name, on_grid.name, f"{name}.codes", codes)
    for consumer in consumers:
        consumer._rename_input(name, on_grid.name)


def _insert_codes_ops(
    block: "paddle.static.Block", index: int, source: str, out: str, stem: str,
    codes: CodedIdentity,
) -> int:
    """Inserts ``out = scale(clip(round(scale(source, 1 / step)), 0, top), step)`` (the round
    as :func:`.graph.rounding_steps`) at ``index`` (its other variables named
    ``<stem>.<step>``); returns the index after them."""
    var = block.var(source)
    names = [f"{stem}.{part}" for part in ("scaled", "shifted", "rounded", "clipped")]
    for new in names:
        block.create_var(name=new, shape=var.shape, dtype=var.dtype)
    steps = [
        ("scale", {"X": [source]}, {"Out": [names[0]]}, {"scale": 1.0 / codes.step, "bias": 0.0, "bias_after_scale": True}),
        *rounding_steps(names[0], names[2], names[1]),
        ("clip", {"X": [names[2]]}, {"Out": [names[3]]}, {"min": float(codes.lowest), "max": float(codes.top)}),
        ("scale", {"X": [names[3]]}, {"Out": [out]}, {"scale": codes.step, "bias": 0.0, "bias_after_scale": True}),
    ]
    for offset, (op_type, inputs, outputs, attrs) in enumerate(steps):
        insert_op(block, index + offset, type=op_type, inputs=inputs, outputs=outputs, attrs=attrs)
    return index + len(steps)
