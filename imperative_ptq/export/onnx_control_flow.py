"""ONNX translation of Paddle's control flow: ``while`` (a loop on a tensor) as ONNX ``Loop``,
``conditional_block`` and ``select_input`` (an ``if`` on a tensor) as ONNX ``If``.

Paddle's dygraph-to-static translation turns a Python loop whose bound or condition is a
tensor (``for _ in range(x.shape[1])`` on a dynamic size, ``while y.shape[2] > 4``) into a
``while`` op: its ``Condition`` is checked before every pass, its ``sub_block`` runs the body,
and its ``Out`` variables (the condition among them) are those the body assigns, carried from
one pass to the next and read after the loop. That is ONNX's ``Loop`` with no trip count: the
body becomes a subgraph whose inputs are the iteration number, the condition and the carried
values, and whose outputs are the next condition and carried values; the values the body only
reads are taken from the enclosing graph by name.

The body's ops are translated by the converter's own dispatch table, in float: Paddle
Inference's int8 passes do not reach a ``while`` body either (a layer the simulation runs
int8 there is named at export, :mod:`.program`), and a carried value keeps its quantization
(an int8 layer after the loop reading it) for after the loop, as the simulation quantizes the
final value only. Paddle's arrays (``write_to_array``, ``read_from_array``,
``tensor_array_to_tensor``: ``nn.RNN``'s states and stepped outputs) are ONNX sequences.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import paddle

from .onnx_tensor_ops import numpy_dtype

__all__ = ["ControlFlowConverters"]

#: The converter's tables keyed by program variable that say how a tensor is read besides its
#: plain value (its quantization, its float value beside Q/DQ, its codes).
_PER_NAME_TABLES = ("thresholds", "coded", "u8_inputs", "unquantized", "coded_values", "unclipped", "scales")


class ControlFlowConverters:
    """The control-flow converters (a mixin of the ONNX export's converter)."""

    def _while(self, op) -> None:
        """A ``while`` op as ONNX ``Loop`` (see the module docstring)."""
        condition = op.input("Condition")[0]
        carried = [name for name in op.output("Out") if name != condition]
        body_block = self.loaded.program.block(op.attr("sub_block").id)
        # The loop starts from the float values; a carried value's own quantization (for an
        # int8 reader after the loop) applies to the final value only.
        initial = [self._initial_value(op, name) for name in carried]
        start = self._as_scalar(self._tensor(op, condition), condition + ".start")
        # Inside the body a carried name is the body's value: none of the outer graph's
        # quantization of that name (nor its unquantized or coded forms) applies there.
        shadowed = carried + [condition]
        saved = {table: {name: getattr(self, table).pop(name) for name in shadowed
                         if name in getattr(self, table)}
                 for table in _PER_NAME_TABLES if hasattr(self, table)}
        saved_inputs = self.layer_inputs & set(shadowed)
        self.layer_inputs -= saved_inputs
        inputs = [
            self.helper.make_tensor_value_info(self._unique("iteration"), self.onnx.TensorProto.INT64, []),
            self.helper.make_tensor_value_info(self._unique("condition"), self.onnx.TensorProto.BOOL, []),
        ]
        bound = {}
        for name in carried:
            bound[name] = self._unique(name + ".in")
            inputs.append(self._value_info(bound[name], name))
        try:
            body_nodes, outputs = self._subgraph_nodes(body_block, bound, [condition, *carried], "while loop")
        finally:
            for table, entries in saved.items():
                getattr(self, table).update(entries)
            self.layer_inputs |= saved_inputs
        outputs[0] = self._as_scalar(outputs[0], condition + ".next", body_nodes)
        # (Each output its own tensor: two carried names may hold one value, or an input's. An
        # array's is the sequence an If wrote: Identity takes sequences only from opset 14.)
        outputs[1:] = [value if self._is_array(name) else self._node("Identity", [value], name + ".next", into=body_nodes)
                       for value, name in zip(outputs[1:], carried)]
        body = self.helper.make_graph(
            body_nodes, self._unique("while_body"), inputs,
            [self.helper.make_tensor_value_info(outputs[0], self.onnx.TensorProto.BOOL, [])]
            + [self._value_info(out, name) for out, name in zip(outputs[1:], carried)],
        )
        finals = [self._unique(name + ".final") for name in carried]
        self.nodes.append(self.helper.make_node("Loop", ["", start, *initial], finals, body=body))
        for name, final in zip(carried, finals):
            self._bind(name, final)

    def _initial_value(self, op, name: str) -> str:
        """A carried variable's value entering a loop: an array not written yet starts empty;
        a tensor is cast to its variable's type (dygraph-to-static starts a variable the body
        defines, such as a for loop's index, from a placeholder of another type)."""
        if self._is_array(name):
            if name not in self.names:
                return self._node("SequenceEmpty", [], name + ".empty", dtype=self._elem_type(name))
            return self._tensor(op, name)
        return self._node("Cast", [self.unquantized.get(name, self._tensor(op, name))], name + ".initial",
                          to=self._elem_type(name))

    def _value_info(self, onnx_name: str, name: str) -> Any:
        """The ONNX type of program variable ``name`` (a sequence for an array), shape open."""
        if self._is_array(name):
            return self.helper.make_tensor_sequence_value_info(onnx_name, self._elem_type(name), None)
        return self.helper.make_tensor_value_info(onnx_name, self._elem_type(name), None)

    def _is_array(self, name: str) -> bool:
        var = self.block._find_var_recursive(name)
        return var is not None and var.type == paddle.base.core.VarDesc.VarType.LOD_TENSOR_ARRAY

    def _position(self, op, stem: str) -> str:
        """An array op's index ``I`` (Paddle's ``[1]`` int64) as the scalar sequence ops take."""
        index = self._node("Cast", [self._in(op, "I")], stem + ".index", to=self.onnx.TensorProto.INT64)
        return self._as_scalar(index, stem + ".position")

    def _write_to_array(self, op) -> None:
        """write_to_array: the array with ``X`` at position ``I``, appended at its end or in
        place of the element there (an ``If`` on the array's length)."""
        out = self._out(op)
        array = self.names.get(out)
        if array is None:
            array = self._node("SequenceEmpty", [], out + ".empty", dtype=self._elem_type(out))
        value, position = self._in(op), self._position(op, out)
        length = self._node("SequenceLength", [array], out + ".length")
        inside = self._node("Less", [position, length], out + ".inside")
        replace: list = []
        erased = self._node("SequenceErase", [array, position], out + ".erased", into=replace)
        replaced = self._node("SequenceInsert", [erased, value, position], out + ".replaced", into=replace)
        append: list = []
        appended = self._node("SequenceInsert", [array, value], out + ".appended", into=append)
        result = self._unique(out)
        self.nodes.append(self.helper.make_node(
            "If", [inside], [result],
            then_branch=self.helper.make_graph(replace, self._unique("replace"), [], [self._value_info(replaced, out)]),
            else_branch=self.helper.make_graph(append, self._unique("append"), [], [self._value_info(appended, out)]),
        ))
        self._bind(out, result)

    def _read_from_array(self, op) -> None:
        """read_from_array: the element at position ``I``."""
        out = self._out(op)
        self._bind(out, self._node("SequenceAt", [self._in(op), self._position(op, out)], out))

    def _array_length(self, op) -> None:
        """lod_array_length: the array's length, as Paddle's ``[1]`` int64."""
        out = self._out(op)
        length = self._node("SequenceLength", [self._in(op)], out + ".length")
        self._bind(out, self._node("Reshape", [length, self._const("shape", np.array([1], np.int64))], out))

    def _array_to_tensor(self, op) -> None:
        """tensor_array_to_tensor: the elements stacked (``use_stack``) or concatenated
        along ``axis``."""
        out = self._out(op)
        self._bind(out, self._node("ConcatFromSequence", [self._in(op)], out, axis=int(op.attr("axis")),
                                   new_axis=int(bool(op.attr("use_stack")))))

    def _increment(self, op) -> None:
        """increment: ``X + step`` in ``X``'s type (a loop counter)."""
        out = self._out(op)
        step = np.array([op.attr("step")]).astype(numpy_dtype(self.block._find_var_recursive(op.input("X")[0]).dtype))
        self._bind(out, self._node("Add", [self._in(op), self._const("step", step)], out))

    def _conditional_block(self, op) -> None:
        """A ``conditional_block`` (one branch of an ``if`` on a tensor) as ONNX ``If``: its
        sub-block when ``Cond`` holds, else zeros of each output's type, which the
        ``select_input`` after the branches never picks."""
        if not op.attr("is_scalar_condition"):
            raise NotImplementedError("conditional_block on a tensor condition (not a scalar) is not exported")
        outputs = op.output("Out")
        block = self.loaded.program.block(op.attr("sub_block").id)
        nodes, values = self._subgraph_nodes(block, {}, outputs, "conditional block")
        then_outputs = [self._node("Identity", [value], name + ".then", into=nodes) for value, name in zip(values, outputs)]
        else_nodes: list = []
        else_outputs = []
        for name in outputs:
            zero = self.helper.make_tensor("zero", self._elem_type(name), [1], [0])
            shape = self._const("one", np.array([1], np.int64))
            else_outputs.append(self._node("ConstantOfShape", [shape], name + ".else", into=else_nodes, value=zero))

        def branch(branch_nodes: list, branch_outputs: list, kind: str):
            return self.helper.make_graph(branch_nodes, self._unique(kind), [], [
                self.helper.make_tensor_value_info(out, self._elem_type(name), None)
                for out, name in zip(branch_outputs, outputs)
            ])

        condition = self._as_scalar(self._in(op, "Cond"), op.input("Cond")[0] + ".scalar")
        results = [self._unique(name) for name in outputs]
        self.nodes.append(self.helper.make_node(
            "If", [condition], results,
            then_branch=branch(nodes, then_outputs, "then"), else_branch=branch(else_nodes, else_outputs, "else"),
        ))
        for name, result in zip(outputs, results):
            self._bind(name, result)

    def _select_input(self, op) -> None:
        """select_input (the value of the branch an ``if`` took): ``X[Mask]``, as an ``If`` on
        the mask for two inputs."""
        candidates = op.input("X")
        if len(candidates) != 2:
            raise NotImplementedError(f"select_input of {len(candidates)} inputs is not exported")
        out = self._out(op)
        chosen = self._node("Cast", [self._in(op, "Mask")], out + ".mask", to=self.onnx.TensorProto.BOOL)
        condition = self._as_scalar(chosen, out + ".condition")
        branches = {}
        for kind, name in (("then", candidates[1]), ("else", candidates[0])):
            nodes: list = []
            value = self._node("Identity", [self._tensor(op, name)], out + "." + kind, into=nodes)
            branches[kind + "_branch"] = self.helper.make_graph(nodes, self._unique(kind), [], [
                self.helper.make_tensor_value_info(value, self._elem_type(out), None)])
        result = self._unique(out)
        self.nodes.append(self.helper.make_node("If", [condition], [result], **branches))
        self._bind(out, result)

    def _subgraph_nodes(
        self, block, bound: dict[str, str], results: list[str], kind: str
    ) -> tuple[list, list[str]]:
        """The nodes of ``block``'s ops, translated with the names in ``bound`` (program
        variable -> ONNX tensor) for the subgraph's own inputs, and the ONNX tensors of
        ``results`` after them. The converter's names are restored afterwards: the values the
        block computes are its subgraph's alone."""
        outer_nodes, outer_block, outer_names = self.nodes, self.block, dict(self.names)
        self.nodes, self.block = [], block
        self.names.update(bound)
        try:
            for block_op in block.ops:
                convert = self.dispatch.get(block_op.type)
                if convert is None:
                    raise NotImplementedError(f"op {block_op.type!r} in a {kind}'s body has no ONNX converter")
                convert(block_op)
            return self.nodes, [self.names[name] for name in results]
        finally:
            self.nodes, self.block, self.names = outer_nodes, outer_block, outer_names

    def _as_scalar(self, tensor: str, stem: str, into: list | None = None) -> str:
        """A one-element tensor (a ``[1]`` condition, an array position) as the scalar ONNX takes."""
        return self._node("Reshape", [tensor, self._const("scalar", np.zeros([0], np.int64))], stem, into=into)

    def _elem_type(self, name: str) -> Any:
        return self.helper.np_dtype_to_tensor_dtype(numpy_dtype(self.block._find_var_recursive(name).dtype))
