"""Small helpers to read and edit a loaded legacy program: who writes and reads a variable,
and the parameter tensors in its scope. ``loaded`` is a :class:`.program.LegacyProgram`."""

from __future__ import annotations

from typing import Any

import numpy as np
import paddle

__all__ = [
    "FUSABLE_ACTIVATIONS", "bias_of", "get_tensor", "insert_reader_op", "insert_zero_bias",
    "is_persistable", "new_persistable", "producers", "readers", "separate_chained_activations",
    "set_tensor", "transposed_matmul",
]

Operator = Any  # paddle.base.framework.Operator


def producers(block: "paddle.static.Block") -> dict[str, Operator]:
    """Variable name -> the op writing it."""
    return {name: op for op in block.ops for slot in op.output_names for name in op.output(slot)}


def readers(block: "paddle.static.Block") -> dict[str, list[Operator]]:
    """Variable name -> the ops reading it, in program order."""
    found: dict[str, list[Operator]] = {}
    for op in block.ops:
        for slot in op.input_names:
            for name in op.input(slot):
                found.setdefault(name, []).append(op)
    return found


def is_persistable(block: "paddle.static.Block", name: str) -> bool:
    """Whether ``name`` is a parameter (or another persistable variable) of the program."""
    var = block._find_var_recursive(name)
    return var is not None and bool(var.persistable)


def transposed_matmul(op: Operator) -> bool:
    """A matmul_v2 with a transposed operand, which the export leaves in fp32."""
    return op.type == "matmul_v2" and bool(op.attr("trans_x") or op.attr("trans_y"))


def get_tensor(loaded: Any, name: str) -> np.ndarray:
    """A copy of the scope tensor ``name``."""
    return np.array(loaded.scope.find_var(name).get_tensor())


def set_tensor(loaded: Any, name: str, value: np.ndarray) -> None:
    """Sets (or creates) the scope tensor ``name``."""
    loaded.scope.var(name).get_tensor().set(value, paddle.CPUPlace())


def new_persistable(loaded: Any, name: str, value: np.ndarray) -> str:
    """Adds a persistable variable ``name`` holding ``value``; returns its name."""
    block = loaded.program.global_block()
    block.create_var(name=name, shape=list(value.shape), dtype=str(value.dtype), persistable=True)
    set_tensor(loaded, name, value)
    return name


def bias_of(block: "paddle.static.Block", name: str, reading: dict[str, list[Operator]]) -> str | None:
    """The persistable bias added to ``name`` right after its producer (an ``elementwise_add``
    reading ``name`` as X and a parameter as Y), or ``None``; ``reading``: :func:`readers`."""
    for add in reading.get(name, []):
        if add.type == "elementwise_add" and add.input("X") == [name] and is_persistable(
            block, add.input("Y")[0]
        ):
            return add.input("Y")[0]
    return None


def insert_zero_bias(
    loaded: Any, index: int, op: Operator, output_slot: str, bias_name: str, channels: int,
    axis: int,
) -> str:
    """Puts a zero bias add right after ``op`` (at ``index`` in the block): ``op`` now writes
    ``<output>.unbiased`` and the add writes ``op``'s old output, so its readers, fetch
    targets and recorded layer outputs keep their names. Returns the bias variable."""
    block = loaded.program.global_block()
    out = op.output(output_slot)[0]
    bias = new_persistable(loaded, bias_name, np.zeros([channels], np.float32))
    var = block.var(out)
    unbiased = block.create_var(name=f"{out}.unbiased", shape=var.shape, dtype=var.dtype)
    op._rename_output(out, unbiased.name)
    block._insert_op(
        index + 1, type="elementwise_add", inputs={"X": [unbiased.name], "Y": [bias]},
        outputs={"Out": [out]}, attrs={"axis": axis},
    )
    return bias


def insert_reader_op(
    block: "paddle.static.Block", writer: Operator, name: str, consumers: list[Operator],
    op_type: str, suffix: str, attrs: dict[str, Any] | None = None,
) -> str:
    """Makes ``consumers`` read ``op_type(name)``, a one-input op inserted right after
    ``writer``; returns its output variable ``<name>.<suffix>``."""
    var = block.var(name)
    output = block.create_var(name=f"{name}.{suffix}", shape=var.shape, dtype=var.dtype)
    for consumer in consumers:
        consumer._rename_input(name, output.name)
    index = next(i for i, op in enumerate(block.ops) if op is writer)
    block._insert_op(
        index + 1, type=op_type, inputs={"X": [name]}, outputs={"Out": [output.name]},
        attrs=attrs or {},
    )
    return output.name


#: Activations Paddle Inference's oneDNN passes fuse into the conv/fc (or elementwise op) before
#: them.
FUSABLE_ACTIVATIONS = frozenset({
    "relu", "relu6", "leaky_relu", "sigmoid", "tanh", "swish", "silu", "hard_swish",
    "hard_sigmoid", "gelu", "mish", "abs", "sqrt", "clip", "elu", "exp", "square", "softplus",
})


def separate_chained_activations(block: "paddle.static.Block") -> int:
    """Puts an identity ``scale`` between two activations in a row (``relu`` then ``sigmoid``).

    Paddle 3.3.1's oneDNN passes fuse the first into the conv/fc before it and then the second
    into the same op, replacing the first (measured, fp32: conv -> ReLU -> sigmoid computed as
    conv -> sigmoid, 50% of the largest output off; fc -> GELU -> tanh 82%; fc -> abs -> sqrt
    NaN). With the ``scale`` between them the second runs on its own. An inference ``dropout``
    between them (which Paddle removes) does not separate them.

    Returns:
        How many separators were inserted.
    """
    reading = readers(block)

    def activation_follows(reader: Operator) -> bool:
        if reader.type in FUSABLE_ACTIVATIONS:
            return True
        # An inference dropout: Paddle removes it, joining what is on either side.
        return reader.type == "dropout" and any(
            activation_follows(after) for after in reading.get(reader.output("Out")[0], [])
        )

    inserted = 0
    for op in list(block.ops):
        if op.type not in FUSABLE_ACTIVATIONS:
            continue
        out = op.output("Out")[0]
        followers = [reader for reader in reading.get(out, []) if activation_follows(reader)]
        if not followers:
            continue
        insert_reader_op(block, op, out, followers, "scale", "unfused", {"scale": 1.0, "bias": 0.0})
        inserted += 1
    return inserted
