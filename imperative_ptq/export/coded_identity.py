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
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Mapping

import paddle

from ..quantizers.qparams import symmetric_levels
from .graph import Operator, feeds_quantize, insert_op, op_index, producers, readers

__all__ = ["CodedIdentity", "round_float_readers"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CodedIdentity:
    """An identity shortcut on codes: ``clip(round(x / step), 0, top) * step``.

    Attributes:
        threshold: ``t`` of the codes (the input threshold of the conv reading it).
        top: The largest code (255 for u8, 127 for a tensor Paddle writes s8).
        activation_bits: Bit width of activations (``step = t / L``, ``L = 2**(bits-1) - 1``).
    """

    threshold: float
    top: int
    activation_bits: int

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
    fusion). The rounded tensor gets the identity's ``out_threshold``, so an int8 op reading
    it (a concat) keeps its scale.

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
        if not int8_readers:
            continue
        first = min(op_index(block, op) for op in int8_readers)
        floats = [
            op for op in consumers
            if (op_index(block, op) > first or _computes(op, coded_layer_outputs, reading))
            and not feeds_quantize(op, reading)
            and op.type not in ("fetch", "fetch_v2") and not _fused_residual_add(op, name, int8_output)
        ]
        if floats:
            _insert_codes(block, name, codes, floats, writers.get(name))
            rounded += len(floats)
            logger.debug("%s: %d float readers read its codes (%s)", name, len(floats),
                         ", ".join(op.type for op in floats))
    return rounded


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


def _fused_residual_add(op: Operator, name: str, int8_output: Callable[[str], bool]) -> bool:
    """Whether ``op`` adds ``name`` to an int8 conv/fc output, an add Paddle fuses into that
    conv."""
    if op.type != "elementwise_add":
        return False
    operands = op.input("X") + op.input("Y")
    return len(operands) == 2 and name in operands and int8_output(operands[1 - operands.index(name)])


def _insert_codes(
    block: "paddle.static.Block", name: str, codes: CodedIdentity, consumers: list[Operator],
    writer: Operator | None,
) -> None:
    """Inserts the float codes of ``name`` in front of the first of ``consumers`` and makes
    them all read it."""
    var = block.var(name)
    stem = f"{name}.codes"
    names = [f"{stem}.{part}" for part in ("scaled", "rounded", "clipped", "on_grid")]
    for new in names:
        block.create_var(name=new, shape=var.shape, dtype=var.dtype)
    threshold = {}
    if writer is not None and writer.has_attr("out_threshold"):
        threshold = {"out_threshold": float(writer.attr("out_threshold"))}
    steps = [
        ("scale", name, names[0], {"scale": 1.0 / codes.step, "bias": 0.0, "bias_after_scale": True}),
        ("round", names[0], names[1], {}),
        ("clip", names[1], names[2], {"min": 0.0, "max": float(codes.top)}),
        ("scale", names[2], names[3],
         {"scale": codes.step, "bias": 0.0, "bias_after_scale": True, **threshold}),
    ]
    index = min(op_index(block, op) for op in consumers)
    for offset, (op_type, source, out, attrs) in enumerate(steps):
        insert_op(block, index + offset, type=op_type, inputs={"X": [source]}, outputs={"Out": [out]}, attrs=attrs)
    for consumer in consumers:
        consumer._rename_input(name, names[3])
