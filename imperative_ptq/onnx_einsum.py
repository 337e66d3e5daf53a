"""ONNX ``Einsum`` nodes written as the ``Transpose``/``Reshape``/``MatMul`` ops x2paddle converts.

x2paddle 1.6.0 has no ``Einsum`` (PyTorch writes ``torch.einsum`` as one: CvT's and Funnel's
attention, many custom attention blocks). Each node becomes its products, one operand pair at a
time from the left: an index only one operand reads and nothing after it keeps is summed out
(``ReduceSum``); the first operand is transposed to ``[its other free indices, batch, its last
free index, contracted]`` and the second to ``[batch, its other free indices, contracted, its
last free index]``, several contracted indices merged into one axis (a ``Reshape`` with ``0``
for every axis it keeps, so no size has to be known), the second's other free indices given
size-1 axes in the first (``MatMul`` broadcasts the second over the first's leading ones), and
the product transposed to the equation's output order. A constant operand's transposes and
reshapes are computed here, so a weight stays a parameter: ``bic,cd->bid`` becomes a
``MatMul`` by ``cd``, which the calibration takes as a Linear. An ``Einsum`` with an index
repeated in one operand (a trace or diagonal) raises a ``ValueError`` naming the node.
"""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass, field

import numpy as np

from .onnx_opsets import axes_node, constant_tensors, default_opset, inferred_shapes

__all__ = ["einsums_as_matmuls", "parsed_equation"]

logger = logging.getLogger(__name__)


def parsed_equation(equation: str, ranks: list[int | None]) -> tuple[list[str], str]:
    """The index letters of each operand of an einsum ``equation`` and of its output, with
    ``...`` spelled out as letters the equation does not use (one per axis, aligned from the
    right) and an implicit output (no ``->``) written out as numpy orders it.

    Args:
        equation: The ``Einsum`` node's equation, e.g. ``"bhid,bhjd->bhij"``.
        ranks: Each operand's rank (``None`` where unknown: only read for ``...``).

    Raises:
        ValueError: A malformed equation, a count of operands other than ``len(ranks)``, or an
            ellipsis over an operand of unknown rank.
    """
    equation = equation.replace(" ", "")
    inputs_text, arrow, output_text = equation.partition("->")
    operands = inputs_text.split(",")
    if len(operands) != len(ranks):
        raise ValueError(f"equation {equation!r} has {len(operands)} operands, the node {len(ranks)} inputs")
    used = set(equation) - set(".,->")
    if not used <= set(string.ascii_letters):
        raise ValueError(f"equation {equation!r}: indices must be letters")
    spare = [letter for letter in string.ascii_letters if letter not in used]
    widest = 0
    letters: list[str] = []
    for operand, rank in zip(operands, ranks):
        if "..." not in operand:
            if rank is not None and len(operand) != rank:
                raise ValueError(f"equation {equation!r}: operand {operand!r} indexes {len(operand)} axes of a rank-{rank} input")
            letters.append(operand)
            continue
        if rank is None:
            raise ValueError(f"equation {equation!r}: the rank of the operand {operand!r} is unknown")
        explicit = operand.replace("...", "")
        width = rank - len(explicit)
        if width < 0:
            raise ValueError(f"equation {equation!r}: operand {operand!r} indexes more axes than its rank {rank}")
        widest = max(widest, width)
        letters.append(operand.replace("...", "".join(spare[len(spare) - width:])))
    ellipsis = "".join(spare[len(spare) - widest:])
    if arrow:
        output = output_text.replace("...", ellipsis)
    else:
        counts = {letter: "".join(letters).count(letter) for letter in set("".join(letters))}
        output = ellipsis + "".join(sorted(letter for letter, count in counts.items() if count == 1 and letter not in ellipsis))
    return letters, output


def einsums_as_matmuls(model) -> int:
    """Rewrites every ``Einsum`` node of ``model`` (an ``onnx.ModelProto`` of opset 12 to 15)
    in place as the ops computing it (see the module's docstring).

    Returns:
        The number of nodes rewritten.

    Raises:
        ValueError: An equation these ops do not compute (named with its node).
    """
    from onnx import numpy_helper

    einsums = [node for node in model.graph.node if node.op_type == "Einsum"]
    if not einsums:
        return 0
    needs_ranks = any("..." in _equation(node) for node in einsums)
    shapes = inferred_shapes(model, "Einsum nodes with '...'") if needs_ranks else {}
    opset = default_opset(model)
    constants = constant_tensors(model)
    values = {  # (only the Einsums' operands: a model's other weights are not copied)
        name: numpy_helper.to_array(constants[name]) for node in einsums for name in node.input if name in constants
    }
    nodes = list(model.graph.node)
    del model.graph.node[:]
    refused: list[str] = []
    for node in nodes:
        if node.op_type != "Einsum":
            model.graph.node.append(node)
            continue
        ranks = [
            values[name].ndim if name in values else len(shapes[name]) if name in shapes else None
            for name in node.input
        ]
        try:
            letters, output = parsed_equation(_equation(node), ranks)
            writer = _Writer(node.output[0], opset, dict(values))
            written = writer.einsum(list(node.input), letters, output, node.name)
            read = {name for written_node in written for name in written_node.input}
            model.graph.node.extend(written)
            model.graph.initializer.extend(constant for constant in writer.constants if constant.name in read)
        except ValueError as reason:
            refused.append(f"Einsum {node.name or node.output[0]!r} ({reason})")
            model.graph.node.append(node)
    if refused:
        raise ValueError(
            "x2paddle has no Einsum, and these have no form of Transpose, ReduceSum and MatMul here: "
            + "; ".join(refused)
        )
    _drop_unread_initializers(model, {name for node in einsums for name in node.input})
    logger.info("wrote %d Einsum nodes as MatMul products (x2paddle has no Einsum)", len(einsums))
    return len(einsums)


def _drop_unread_initializers(model, names: set[str]) -> None:
    """Removes the initializers of ``names`` that no node or graph output reads any more (an
    Einsum's weight operand, replaced by its transposed copy)."""
    read = {name for node in model.graph.node for name in node.input} | {output.name for output in model.graph.output}
    unread = [initializer for initializer in model.graph.initializer if initializer.name in names - read]
    for initializer in unread:
        model.graph.initializer.remove(initializer)


def _equation(node) -> str:
    """An ``Einsum`` node's equation."""
    return next(attribute.s.decode() for attribute in node.attribute if attribute.name == "equation")


def _reshaped(value: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """ONNX ``Reshape`` of a constant (``0`` copies the axis at the same position)."""
    return value.reshape([value.shape[axis] if size == 0 else int(size) for axis, size in enumerate(shape)])


#: numpy forms of the ops the writer applies to constants, taking a perm, shape or axes.
_FOLDED = {
    "Transpose": lambda value, perm: np.transpose(value, perm),
    "Reshape": _reshaped,
    "Unsqueeze": lambda value, axes: np.expand_dims(value, tuple(int(axis) for axis in axes)),
    "Squeeze": lambda value, axes: np.squeeze(value, tuple(int(axis) for axis in axes)),
    "ReduceSum": lambda value, axes: value.sum(axis=tuple(int(axis) for axis in axes), dtype=value.dtype),
}


@dataclass
class _Writer:
    """The nodes computing one ``Einsum``, named after its output ``stem``."""

    stem: str
    opset: int
    #: Constant values by name: the model's and the writer's own.
    values: dict = field(default_factory=dict)
    count: int = 0
    nodes: list = field(default_factory=list)
    constants: list = field(default_factory=list)

    def einsum(self, names: list[str], letters: list[str], output: str, node_name: str) -> list:
        """The nodes computing the einsum of ``names`` indexed by ``letters`` into ``output``;
        the last one writes ``stem`` (and is named ``node_name``)."""
        for operand in [*letters, output]:
            if len(set(operand)) != len(operand):
                raise ValueError(f"index repeated in {operand!r} (a trace or diagonal)")
        if not set(output) <= set("".join(letters)):
            raise ValueError(f"output indices {output!r} that no operand has")
        name, indices = self._summed(names[0], letters[0], kept=set(output).union(*letters[1:]))
        for position in range(1, len(names)):
            kept = set(output).union(*letters[position + 1:])
            other, other_indices = self._summed(names[position], letters[position], kept | set(indices))
            name, indices = self._product(name, indices, other, other_indices, kept)
        self._transposed(name, indices, output, final=True)
        self.nodes[-1].name = node_name
        return self.nodes

    def _summed(self, name: str, indices: str, kept: set[str]) -> tuple[str, str]:
        """``name`` with the axes of the indices outside ``kept`` summed out."""
        summed = [axis for axis, index in enumerate(indices) if index not in kept]
        if not summed:
            return name, indices
        return (
            self._axes_op("ReduceSum", name, summed, keepdims=0),
            "".join(index for index in indices if index in kept),
        )

    def _product(self, a: str, a_indices: str, b: str, b_indices: str, kept: set[str]) -> tuple[str, str]:
        """The ``MatMul`` of two operands over their shared indices outside ``kept``, and the
        indices of its axes: ``a_outer + batch + b_outer + m + n`` (``m``/``n`` the last free
        index of each operand, or absent; ``a_outer``/``b_outer`` the other free ones)."""
        batch = [index for index in a_indices if index in b_indices and index in kept]
        contracted = [index for index in a_indices if index in b_indices and index not in kept]
        a_free = [index for index in a_indices if index not in b_indices]
        b_free = [index for index in b_indices if index not in a_indices]
        a_outer, m = a_free[:-1], a_free[-1:]
        b_outer, n = b_free[:-1], b_free[-1:]
        # a: [a_outer, batch, 1 * len(b_outer), m or 1, contracted merged or 1]
        lead = len(a_outer) + len(batch)
        a = self._transposed(a, a_indices, "".join(a_outer + batch + m + contracted))
        a = self._merged_last(a, lead + 1, len(contracted), had_row=bool(m))
        if lead:  # (leading size-1 axes are MatMul's broadcast anyway)
            a = self._unsqueezed(a, [lead + axis for axis in range(len(b_outer))])
        # b: [batch, b_outer, contracted merged or 1, n or 1], broadcast over a_outer
        lead = len(batch) + len(b_outer)
        if len(contracted) > 1:
            # Merged as the last axis (Reshape's 0 copies axes by position), then swapped.
            b = self._transposed(b, b_indices, "".join(batch + b_outer + n + contracted))
            b = self._merged_last(b, lead + 1, len(contracted), had_row=bool(n))
            b = self._node("Transpose", [b], perm=[*range(lead), lead + 1, lead])
        else:
            b = self._transposed(b, b_indices, "".join(batch + b_outer + contracted + n))
            b = self._unsqueezed(b, [lead] * (not contracted) + [lead + 1] * (not n))
        product = self._node("MatMul", [a, b])
        squeezed = [axis for axis, present in ((-2, m), (-1, n)) if not present]
        if squeezed:
            rank = len(batch) + len(a_outer) + len(b_outer) + 2
            product = self._axes_op("Squeeze", product, [rank + axis for axis in squeezed])
        return product, "".join(a_outer + batch + b_outer + m + n)

    def _merged_last(self, name: str, lead: int, count: int, had_row: bool) -> str:
        """``name`` (its ``lead`` axes then ``count`` contracted ones) with those merged into
        one axis, a size-1 one if ``count`` is 0; a size-1 row axis before it if not
        ``had_row``."""
        if count > 1:
            shape = np.array([0] * (lead - (not had_row)) + [-1], np.int64)
            name = self._node("Reshape", [name, self._constant("shape", shape)])
        if not had_row:
            name = self._axes_op("Unsqueeze", name, [lead - 1])
        if count == 0:
            name = self._axes_op("Unsqueeze", name, [lead])
        return name

    def _transposed(self, name: str, indices: str, order: str, final: bool = False) -> str:
        """``name`` (axes ``indices``) transposed to ``order``; if ``final``, the last node
        writes ``stem`` (the one writing ``name`` where no transpose is needed, else an
        ``Identity``)."""
        perm = [indices.index(index) for index in order]
        if perm == sorted(perm) and final and self.nodes and self.nodes[-1].output[0] == name:
            self.nodes[-1].output[0] = self.stem
            return self.stem
        if perm == sorted(perm):
            return self._node("Identity", [name], output=self.stem) if final else name
        return self._node("Transpose", [name], output=self.stem if final else None, perm=perm)

    def _unsqueezed(self, name: str, axes: list[int]) -> str:
        """``name`` with size-1 axes at ``axes`` (of the result)."""
        return self._axes_op("Unsqueeze", name, axes) if axes else name

    def _axes_op(self, op_type: str, name: str, axes: list[int], **attributes) -> str:
        """``op_type`` over ``axes`` in the form of the opset (:func:`axes_node`); of a constant,
        a new constant (the writer's sums drop their axes: ``keepdims=0``)."""
        if name in self.values:
            return self._constant(op_type.lower(), np.ascontiguousarray(_FOLDED[op_type](self.values[name], axes)))
        node, axes_tensors = axes_node(op_type, name, axes, self._fresh(op_type.lower()), self.opset, **attributes)
        self.nodes.append(node)
        self.constants.extend(axes_tensors)
        return node.output[0]

    def _fresh(self, what: str) -> str:
        """A new tensor name."""
        self.count += 1
        return f"{self.stem}.einsum.{what}{self.count}"

    def _constant(self, what: str, value: np.ndarray) -> str:
        """A new initializer of ``value``."""
        from onnx import numpy_helper

        name = self._fresh(what)
        self.constants.append(numpy_helper.from_array(value, name))
        self.values[name] = value
        return name

    def _node(self, op_type: str, inputs: list[str], output: str | None = None, **attributes) -> str:
        """Appends a node; returns its output's name. A constant's transpose or reshape is a new
        constant instead (a weight operand stays a parameter of the converted model)."""
        from onnx import helper

        if output is None and inputs[0] in self.values and op_type in ("Transpose", "Reshape"):
            argument = attributes["perm"] if op_type == "Transpose" else self.values[inputs[1]]
            return self._constant(op_type.lower(), np.ascontiguousarray(_FOLDED[op_type](self.values[inputs[0]], argument)))
        output = output or self._fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [output], **attributes))
        return output
