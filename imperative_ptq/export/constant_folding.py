"""Parameter-only subgraphs of an exported program, computed once at export and stored as
parameters.

A model may compute a tensor from its parameters alone on every call: SVTR's positional
embedding is resized from a learned grid (``slice``, ``reshape2``, ``transpose2``, ``cast``,
``bicubic_interp_v2``, ``concat`` with the empty slice of its zero extra tokens, on
``pos_embed``). Paddle 3.3.1's predictor runs such chains in oneDNN kernels at every call, and
on PaddleClas's SVTR_tiny they failed at the first run ("could not reshape a memory
descriptor", from the empty tensor; the program ``paddle.jit.save`` writes fails the same way,
and without oneDNN it runs). Computed here by Paddle's plain CPU executor, the same values enter
the program as parameters, and nothing of the chain is left to run.

Not folded: chains through quantize/dequantize ops (int8 weights stay int8) or through an op
carrying a calibrated output scale, random or stateful ops, ops with sub-blocks, and a chain
whose result is a conv's or matmul's weight: the export decided how those run (a matmul on a
persistable weight becomes an ``fc`` in Paddle Inference, and may run int8 where the
simulation runs it in float). Runs on the program after its int8 rewrites, which see the
program as traced.
"""

from __future__ import annotations

import logging
from typing import Any

import paddle

from .graph import Operator, is_persistable, new_persistable, producers, readers, remove_op

__all__ = ["fold_parameter_subgraphs"]

logger = logging.getLogger(__name__)

#: Ops never folded (with every ``fake_*`` quantize op): what quantizes or dequantizes (the
#: int8 weights), draws random numbers, writes state, or moves data in and out of the program.
_UNFOLDABLE_OPS = frozenset({
    "feed", "fetch", "quantize_linear", "dequantize_linear", "uniform_random", "gaussian_random",
    "truncated_gaussian_random", "randint", "randperm", "bernoulli", "multinomial", "dropout", "seed", "set_value", "set_value_with_tensor",
    "share_data", "print", "assert", "while", "conditional_block", "select_input", "select_output",
})

#: Input slots whose tensor the runtime treats as a weight when it is persistable.
_WEIGHT_SLOTS = {
    "conv2d": "Filter", "depthwise_conv2d": "Filter", "conv3d": "Filter",
    "conv2d_transpose": "Filter", "depthwise_conv2d_transpose": "Filter", "conv3d_transpose": "Filter",
    "matmul_v2": "Y", "matmul": "Y", "mul": "Y", "fc": "W",
}


_BLOCK_ATTR_TYPES = (paddle.base.core.AttrType.BLOCK, paddle.base.core.AttrType.BLOCKS)


def _foldable(op: Operator) -> bool:
    """Whether ``op`` computes a pure function of its inputs with no sub-block, and carries
    no calibrated output scale (an int8 reader in Paddle Inference takes it from the op)."""
    if op.type in _UNFOLDABLE_OPS or op.type.startswith("fake_"):
        return False
    if op.has_attr("out_threshold") and float(op.attr("out_threshold")) > 0.0:
        return False
    return not any(op.desc.attr_type(name) in _BLOCK_ATTR_TYPES for name in op.desc.attr_names())


def _names(op: Operator, inputs: bool) -> list[str]:
    slots = op.input_names if inputs else op.output_names
    return [name for slot in slots for name in (op.input(slot) if inputs else op.output(slot))]


def _parameter_only_ops(block: "paddle.static.Block") -> list[Operator]:
    """The ops of ``block`` with inputs, all of them parameters or outputs of such ops, in
    program order (an op with no input, a ``fill_constant``, and what reads only such literals
    stay as traced)."""
    constant: set[str] = set()
    folded: list[Operator] = []
    for op in block.ops:
        inputs = _names(op, True)
        if (
            inputs and _foldable(op)
            and all(name in constant or is_persistable(block, name) for name in inputs)
            and not any(is_persistable(block, name) for name in _names(op, False))
        ):
            folded.append(op)
            constant.update(_names(op, False))
    return folded


def _results(folded: list[Operator], reading: dict[str, list[Operator]], fetched: set[str]) -> list[str]:
    """The outputs of ``folded`` that an op outside it reads or the program returns."""
    inside = {id(op) for op in folded}
    return [
        name for op in folded for name in _names(op, False)
        if name in fetched or any(id(reader) not in inside for reader in reading.get(name, []))
    ]


def _without_weight_chains(folded: list[Operator], reading: dict[str, list[Operator]],
                           making: dict[str, Operator], fetched: set[str]) -> list[Operator]:
    """``folded`` without the ops of chains that end in a weight slot (:data:`_WEIGHT_SLOTS`)."""
    inside = {id(op) for op in folded}
    kept: set[int] = set()
    pending = [
        name for name in _results(folded, reading, fetched)
        if any(reader.type in _WEIGHT_SLOTS and name in reader.input(_WEIGHT_SLOTS[reader.type])
               for reader in reading.get(name, []))
    ]
    while pending:
        writer = making.get(pending.pop())
        if writer is None or id(writer) not in inside or id(writer) in kept:
            continue
        kept.add(id(writer))
        pending.extend(_names(writer, True))
    return [op for op in folded if id(op) not in kept]


def _evaluate(loaded: Any, folded: list[Operator], results: list[str]) -> list:
    """Runs ``folded`` alone in Paddle's plain CPU executor on ``loaded``'s parameters."""
    source = loaded.program.global_block()
    program = paddle.static.Program()
    block = program.global_block()
    for name in {name for op in folded for name in _names(op, True) + _names(op, False)}:
        var = source._find_var_recursive(name)
        block.create_var(name=name, shape=var.shape, dtype=var.dtype, persistable=bool(var.persistable))
    for op in folded:
        copy = block.desc.append_op()
        copy.copy_from(op.desc)
        for flag in ("use_mkldnn", "use_onednn"):
            if copy.has_attr(flag):
                copy._set_attr(flag, False)
    program._sync_with_cpp()
    with paddle.static.scope_guard(loaded.scope):
        return loaded.executor.run(program, fetch_list=results, return_numpy=True)


def fold_parameter_subgraphs(loaded: Any) -> int:
    """Replaces the parameter-only subgraphs of ``loaded`` (a :class:`.program.LegacyProgram`)
    by parameters holding what they compute.

    Returns:
        How many ops were folded.
    """
    block = loaded.program.global_block()
    # Readers in every block: a loop body may read a tensor of the chain.
    reading: dict[str, list[Operator]] = {}
    for each in loaded.program.blocks:
        for name, ops in readers(each).items():
            reading.setdefault(name, []).extend(ops)
    making = producers(block)
    fetched = {var.name for var in loaded.fetch_vars}
    folded = _without_weight_chains(_parameter_only_ops(block), reading, making, fetched)
    if not folded:
        return 0
    results = list(dict.fromkeys(_results(folded, reading, fetched)))
    values = _evaluate(loaded, folded, results)
    folded_ids = {id(op) for op in folded}
    for index in reversed(range(len(block.ops))):
        if id(block.ops[index]) in folded_ids:
            remove_op(block, index)
    for name, value in zip(results, values):
        block._remove_var(name, sync=False)
        new_persistable(loaded, name, value)
    loaded.program._sync_with_cpp()
    logger.debug("folded %d parameter-only ops into %d parameters: %s", len(folded), len(results), results)
    return len(folded)
