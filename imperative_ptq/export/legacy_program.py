"""The legacy program the int8 export rewrites, and what its rewriting passes share.

Paddle Inference's oneDNN int8 pipeline and Paddle Lite's ``opt`` read legacy (ProgramDesc)
programs. :func:`load_legacy_program` loads one into a private scope (inside
:func:`legacy_static_mode`), :func:`save_legacy_program` writes it back, and
:class:`ProgramScales` records what :func:`.program.quantize_program` wrote into it. The rest
are the queries of the op graph that several passes ask: which conv/fc ops take int8 weights
(:data:`INT8_WEIGHT_OPS`) and which tensor such an op writes, what is computed from parameters
only (folded by Paddle Inference), and which ops hand their input's values on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Iterator, Mapping

import paddle

from .graph import FUSABLE_ACTIVATIONS, get_tensor, is_persistable, transposed_matmul
from .unsigned import removed_dropout

__all__ = [
    "FP32_WEIGHT_OPS", "INT8_WEIGHT_OPS", "SCALE_CARRYING_OPS", "LegacyProgram", "ProgramScales",
    "computed_from_parameters", "int8_gemm_output", "int8_weight_op_output",
    "int8_weight_op_writing", "is_constant", "legacy_static_mode", "load_legacy_program",
    "passes_values", "quantize_threshold", "save_legacy_program", "value_source",
]

#: Ops that lay values out anew and that Paddle Inference runs int8 once a tensor after them
#: has a scale, moving that scale onto the tensor they read (op type -> that input's slot):
#: whoever writes it then writes codes, for every reader.
SCALE_CARRYING_OPS = {
    "transpose2": "X", "reshape2": "X", "flatten_contiguous_range": "X", "squeeze2": "X",
    "unsqueeze2": "X", "slice": "Input", "split": "X", "nearest_interp_v2": "X",
    # (measured on x86-avx2: an int8 conv's output max-pooled into one conv and read by
    # another, or split with one half pooled, wrote codes on the pooled reader's threshold for
    # both: 1.1e-2 .. 1.5e-2 of the largest output off)
    "pool2d": "X",
}

#: Op type -> (weight slot, activation slot, output slot) of the ops whose weights go int8. Other
#: ops keep float (fake-quantized) weights: the oneDNN pass only dequantizes weights of these
#: types, so an int8 weight on e.g. conv2d_transpose would be read as raw integers.
INT8_WEIGHT_OPS: dict[str, tuple[str, str, str]] = {
    "conv2d": ("Filter", "Input", "Output"),
    "depthwise_conv2d": ("Filter", "Input", "Output"),
    "matmul_v2": ("Y", "X", "Out"),
    "mul": ("Y", "X", "Out"),
}

#: Ops with a weight that Paddle Inference's oneDNN int8 pipeline has no int8 kernel for: the
#: layers behind them stay fp32 in the program (a warning names them), and their inputs get
#: no scale (measured: an int8 ReLU output feeding conv2d_transpose made the predictor fail
#: with "could not construct a memory descriptor using strides").
FP32_WEIGHT_OPS: dict[str, tuple[str, str]] = {
    "conv2d_transpose": ("Filter", "Input"),
    "depthwise_conv2d_transpose": ("Filter", "Input"),
    "conv3d": ("Filter", "Input"),
    "conv3d_transpose": ("Filter", "Input"),
}


@dataclasses.dataclass
class LegacyProgram:
    """A loaded legacy inference program and the scope holding its parameters."""

    program: "paddle.static.Program"
    feed_names: list[str]
    fetch_vars: list
    scope: "paddle.static.Scope"
    executor: "paddle.static.Executor"


@dataclasses.dataclass
class ProgramScales:
    """What :func:`.program.quantize_program` wrote (for the calibration file and the tests).

    Attributes:
        weights: Int8 weights by program variable: their thresholds.
        inputs: Activation thresholds of the quantize/dequantize pairs, by variable.
        outputs: ``out_threshold`` attributes written, by variable.
        fp32_layers: Calibrated layers the program keeps fp32 (no int8 kernel): name -> type.
        weight_layers: Program weight variable -> calibrated layer name.
        fp32_calls: Layers with a call that the simulation runs fp32 and the program keeps fp32
            (an LSTM called with initial states): name -> why.
    """

    weights: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    inputs: dict[str, float] = dataclasses.field(default_factory=dict)
    outputs: dict[str, float] = dataclasses.field(default_factory=dict)
    fp32_layers: dict[str, str] = dataclasses.field(default_factory=dict)
    weight_layers: dict[str, str] = dataclasses.field(default_factory=dict)
    fp32_calls: dict[str, str] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def legacy_static_mode() -> Iterator[None]:
    """Legacy (ProgramDesc) static mode, restoring dygraph afterwards."""
    was_dynamic = paddle.in_dynamic_mode()
    with paddle.pir_utils.OldIrGuard():
        paddle.enable_static()
        try:
            yield
        finally:
            if was_dynamic:
                paddle.disable_static()


def load_legacy_program(path_prefix: str) -> LegacyProgram:
    """Loads a legacy program into a private scope (call inside :func:`legacy_static_mode`)."""
    scope = paddle.static.Scope()
    executor = paddle.static.Executor(paddle.CPUPlace())
    with paddle.static.scope_guard(scope):
        program, feed_names, fetch_vars = paddle.static.load_inference_model(path_prefix, executor)
    return LegacyProgram(program, list(feed_names), list(fetch_vars), scope, executor)


def save_legacy_program(loaded: LegacyProgram, path_prefix: str) -> None:
    """Writes ``path_prefix.pdmodel`` / ``.pdiparams`` (call inside :func:`legacy_static_mode`);
    a program without parameters (a model of pools and activations) gets an empty
    ``.pdiparams``, which Paddle Inference loads as such (Paddle writes none)."""
    block = loaded.program.global_block()
    feed_vars = [block.var(name) for name in loaded.feed_names]
    with paddle.static.scope_guard(loaded.scope):
        paddle.static.save_inference_model(
            path_prefix, feed_vars, loaded.fetch_vars, loaded.executor, program=loaded.program
        )
    if not os.path.exists(path_prefix + ".pdiparams"):
        open(path_prefix + ".pdiparams", "wb").close()


def value_source(name: str, writers: Mapping, reading: Mapping | None = None) -> tuple[str, list[str]]:
    """Walks back from ``name`` through the ops that pass values on (:func:`passes_values`),
    concats excepted: the tensor reached and the tensors on the way (``name`` first, the one
    reached not included). With ``reading``, stops at a tensor other ops read too."""
    walked = []
    op = writers.get(name)
    while op is not None and op.type != "concat" and passes_values(op):
        walked.append(name)
        name = op.input("X")[0]
        if reading is not None and len(reading.get(name, [])) != 1:
            break
        op = writers.get(name)
    return name, walked


def quantize_threshold(loaded: LegacyProgram, op) -> float:
    """The threshold a ``quantize_linear`` op quantizes on (its ``Scale``)."""
    return float(get_tensor(loaded, op.input("Scale")[0]).reshape(-1)[0])


def int8_gemm_output(block: "paddle.static.Block", name: str, writers: Mapping) -> bool:
    """Whether ``name`` is an int8 conv/fc output after the ops oneDNN fuses into it (its bias
    add, BatchNorm, one activation)."""
    op = writers.get(name)
    if op is not None and op.type in FUSABLE_ACTIVATIONS:
        name = op.input("X")[0]
    return int8_weight_op_output(block, name, writers)


def int8_weight_op_output(block: "paddle.static.Block", name: str, writers: Mapping) -> bool:
    """Whether ``name`` is the output of an int8 conv/fc, after its bias add or BatchNorm."""
    return int8_weight_op_writing(block, name, writers) is not None


def int8_weight_op_writing(block: "paddle.static.Block", name: str, writers: Mapping) -> Any | None:
    """The int8 conv/fc whose output ``name`` is, after its bias add or BatchNorm; else ``None``."""
    op = writers.get(name)
    while op is not None and (
        op.type == "batch_norm"
        or (op.type == "elementwise_add" and is_persistable(block, op.input("Y")[0]))
    ):
        op = writers.get(op.input("X")[0])
    if op is None or op.type not in INT8_WEIGHT_OPS or transposed_matmul(op):
        return None
    writer = writers.get(op.input(INT8_WEIGHT_OPS[op.type][0])[0])
    return op if writer is not None and writer.type == "dequantize_linear" else None


#: Ops whose output holds some of their input's values (quantizing on one grid commutes with
#: them; a concat's inputs, each read by the concat alone, share its output's grid).
_VALUE_PRESERVING_OPS = frozenset({
    "reshape2", "transpose2", "flatten_contiguous_range", "concat", "nearest_interp_v2",
    "index_select",  # a nearest resize, as graph.exact_nearest_resizes writes it
})


def quantize_pair(name: str, writers: Mapping) -> tuple[Any, Any] | None:
    """The ``quantize_linear`` and ``dequantize_linear`` ops whose output ``name`` is (an
    activation's Q/DQ pair in front of its int8 reader), else ``None``."""
    dequantize = writers.get(name)
    if dequantize is None or dequantize.type != "dequantize_linear":
        return None
    quantize = writers.get(dequantize.input("X")[0])
    return (quantize, dequantize) if quantize is not None and quantize.type == "quantize_linear" else None


def passes_values(op) -> bool:
    """Whether ``op`` hands on its input's values: a value-preserving op, a max pool, or an
    inference dropout that Paddle removes (:func:`.unsigned.removed_dropout`)."""
    if op.type in _VALUE_PRESERVING_OPS:
        return True
    if op.type == "pool2d":
        return op.attr("pooling_type") == "max"
    return removed_dropout(op)


def computed_from_parameters(block: "paddle.static.Block", name: str, writers: Mapping) -> bool:
    """Whether ``name`` is a parameter or computed from parameters only, through any number
    of ops (what Paddle Inference's constant folding computes once, in fp32): a network input,
    or an op without inputs, is not."""
    pending, seen = [name], set()
    while pending:
        tensor = pending.pop()
        if tensor in seen or is_persistable(block, tensor):
            continue
        seen.add(tensor)
        writer = writers.get(tensor)
        inputs = [] if writer is None else [n for slot in writer.input_names for n in writer.input(slot)]
        if writer is None or writer.type == "feed" or not inputs:
            return False
        pending.extend(inputs)
    return True


def is_constant(block: "paddle.static.Block", name: str, writers: Mapping) -> bool:
    """A parameter, or computed from parameters only (a conv bias reshaped for its add); not
    a network input (its ``feed`` op reads the persistable feed list)."""
    if is_persistable(block, name):
        return True
    writer = writers.get(name)
    return writer is not None and writer.type != "feed" and all(
        is_persistable(block, n) for slot in writer.input_names for n in writer.input(slot)
    )
