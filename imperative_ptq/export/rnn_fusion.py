"""Rewriting a traced LSTM (Paddle's generic ``rnn`` op) into ``fusion_lstm``, the LSTM op that
Paddle Inference's oneDNN int8 pipeline quantizes.

``paddle.nn.LSTM`` traces into an ``rnn`` op, which has no int8 kernel. ``fusion_lstm`` has one
(``cpu_quantize_pass`` quantizes it given a scale for its input ``X``; the weight scales are
derived from the fp32 weights, see :mod:`imperative_ptq.quant_rnn`). The rewrite, measured to
compute what the ``rnn`` op does in fp32 (largest difference 1e-7, batch-first and time-major):

* ``fusion_lstm`` reads a LoD sequence batch ``[B * T, in]`` (one sequence after the other),
  so the time-major input ``[T, B, in]`` is transposed, flattened and given the LoD
  ``0, T, 2T, ..., B * T`` by ``lod_reset`` (computed from the runtime shape, so batch and
  sequence length stay dynamic);
* its weights are ``WeightX [in, 4H]``, ``WeightH [H, 4H]`` and ``Bias [1, 4H]`` (the sum of the
  two biases) with the gates in the order c, i, f, o (``paddle.nn.LSTM``: i, f, c, o);
* the input gets one more feature, always zero, whose ``WeightX`` row sets the weight scale
  each gate runs with (:mod:`imperative_ptq.quant_rnn`): the column of gate c holds the input
  gate's threshold, i's the forget gate's, f's the candidate gate's, o's its own (the kernel
  hands the scales of Paddle's gate order to oneDNN's i, f, c, o);
* its hidden sequence ``[B * T, H]`` is reshaped and transposed back into the ``rnn`` output
  ``[T, B, H]``; a final hidden state that is read is sliced from it;
* its oneDNN kernel does not compute the ``Cell`` output, so a final cell state that is read
  is computed beside it in fp32 from the int8 kernel's hidden sequence
  (:func:`_final_cell_ops`).

Only what ``fusion_lstm`` computes is rewritten: one layer, one direction, zero initial states,
no sequence lengths. A call that the simulation runs fp32 (``quant_rnn.fp32_call_reason``)
keeps its ``rnn`` op, as do the others; the caller warns.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from ..quant_rnn import CALLED_WITH_STATES, quantize_gate_rows
from .graph import (
    fill_constant_value, get_tensor, insert_op, is_persistable, new_persistable, producers, readers, remove_op,
    rounding_steps,
)
from .tracing import LayerRecord

__all__ = ["FusedLSTM", "LSTMFusion", "fuse_lstm_ops", "zero_initial_states"]

#: Paddle's VarType code of int32 (``fill_constant``'s ``dtype`` attribute).
_INT32 = 2
#: ``slice`` end meaning "to the end of the axis".
_TO_END = 2**31 - 1


@dataclasses.dataclass
class FusedLSTM:
    """One ``rnn`` op rewritten into ``fusion_lstm``.

    Attributes:
        record: The calibrated layer.
        op: The ``fusion_lstm`` op (its ``X`` gets the layer's input scale).
        weight_x: The program variable holding its ``WeightX``.
    """

    record: LayerRecord
    op: object
    weight_x: str


@dataclasses.dataclass
class LSTMFusion:
    """What :func:`fuse_lstm_ops` did with the calibrated LSTMs of a program.

    Attributes:
        fused: The ``rnn`` ops rewritten into ``fusion_lstm``.
        simulated_fp32: Layer name -> why its simulation runs a call fp32 (which the export
            keeps as an fp32 ``rnn`` op too).
        refused: Layer name -> why ``fusion_lstm`` cannot compute a call that the simulation
            runs int8 (exported fp32: the two disagree).
    """

    fused: list[FusedLSTM] = dataclasses.field(default_factory=list)
    simulated_fp32: dict[str, str] = dataclasses.field(default_factory=dict)
    refused: dict[str, str] = dataclasses.field(default_factory=dict)


def fuse_lstm_ops(loaded, weights: dict[str, LayerRecord]) -> LSTMFusion:
    """Rewrites every ``rnn`` op of a calibrated LSTM (its input weight in ``weights``) that
    its simulation runs int8 and ``fusion_lstm`` computes; leaves the others.

    Args:
        loaded: The :class:`.program.LegacyProgram` (rewritten in place).
        weights: Weight variable -> calibrated layer.
    """
    block = loaded.program.global_block()

    def parameter(name: str) -> "np.ndarray | None":
        return get_tensor(loaded, name) if is_persistable(block, name) else None

    done = LSTMFusion()
    calls: dict[str, int] = {}  # layer name -> rnn ops of it seen so far
    for op in [op for op in block.ops if op.type == "rnn"]:
        weight_list = op.input("WeightList")
        record = weights.get(weight_list[0]) if weight_list else None
        if record is None:
            continue
        call = calls.get(record.name, 0)
        calls[record.name] = call + 1
        simulated_fp32 = record.fp32_calls[call] if call < len(record.fp32_calls) else None
        zero_states = zero_initial_states(producers(block), op, parameter)
        if simulated_fp32 == CALLED_WITH_STATES and zero_states:
            simulated_fp32 = None  # zeros: the simulation ran it int8, and so does fusion_lstm
        if simulated_fp32 is not None:
            done.simulated_fp32[record.name] = simulated_fp32
            continue
        reason = _refusal(op, zero_states)
        if reason is not None:
            done.refused[record.name] = reason
            continue
        done.fused.append(_rewrite(loaded, op, record))
    if done.fused:
        loaded.program._sync_with_cpp()
    return done


def _refusal(op, zero_states: bool) -> str | None:
    """Why ``fusion_lstm`` cannot compute this ``rnn`` op, or ``None`` (``zero_states``: its
    initial states, if any, are zeros, :func:`zero_initial_states`)."""
    if op.attr("mode") != "LSTM":
        return f"rnn mode {op.attr('mode')}"
    if op.attr("num_layers") != 1 or op.attr("is_bidirec"):
        return "more than one layer or direction"
    if op.input("SequenceLength"):
        return "sequence lengths"
    if len(op.input("WeightList")) != 4:
        return "no bias"
    if not zero_states:
        return "initial states that are not zeros"
    return None


#: Ops whose output is zero wherever their (first) input is.
_ZERO_PRESERVING_OPS = frozenset({
    "reshape2", "squeeze2", "unsqueeze2", "transpose2", "expand_v2", "expand_as_v2", "cast",
    "assign", "flatten_contiguous_range", "tile",
})


def zero_initial_states(writers: dict, op, parameter: Callable[[str], "np.ndarray | None"]) -> bool:
    """Whether every initial state of the ``rnn`` op ``op`` (if any) is zeros by construction:
    a ``fill_constant`` of 0 (of a fixed shape or one computed from the batch size), a
    parameter of zeros (``parameter`` returns a persistable variable's value, else ``None``),
    a product with either (x2paddle writes ``full(shape, 1) * zeros``), or a reshape, expand
    or cast of one."""
    return all(_constant_zero(state, writers, parameter, 0) for state in op.input("PreState"))


def _constant_zero(name: str, writers: dict, parameter: Callable, depth: int) -> bool:
    value = parameter(name)
    if value is not None:
        return not np.any(value)
    writer = writers.get(name)
    if writer is None or depth > 32:
        return False
    if writer.type == "fill_constant":
        return fill_constant_value(writer) == 0.0
    if writer.type == "scale" and writer.attr("bias") == 0.0 and not writer.input("ScaleTensor"):
        return _constant_zero(writer.input("X")[0], writers, parameter, depth + 1)
    if writer.type in _ZERO_PRESERVING_OPS:
        return _constant_zero(writer.input("X")[0], writers, parameter, depth + 1)
    if writer.type == "elementwise_mul":
        return any(_constant_zero(writer.input(slot)[0], writers, parameter, depth + 1) for slot in ("X", "Y"))
    return False


def _gates_c_i_f_o(value: np.ndarray) -> np.ndarray:
    """Rows of ``paddle.nn.LSTM``'s gate order i, f, c, o in fusion_lstm's c, i, f, o."""
    input_gate, forget, candidate, output = np.split(value, 4, axis=0)
    return np.concatenate([candidate, input_gate, forget, output], axis=0)


def _rewrite(loaded, op, record: LayerRecord) -> FusedLSTM:
    block = loaded.program.global_block()
    weight_ih, weight_hh, bias_ih, bias_hh = (get_tensor(loaded, n) for n in op.input("WeightList"))
    hidden_size, input_size = weight_hh.shape[1], weight_ih.shape[1]
    # One stem per call: a layer called twice has two rnn ops, each with its own variables and
    # its own weight copies.
    stem = f"{op.input('WeightList')[0]}.{op.output('Out')[0]}"
    # Column c of the zero feature's row holds gate i's threshold, and so on: the record's
    # thresholds in paddle.nn.LSTM's order i, f, c, o are that row in fusion order c, i, f, o.
    scale_row = np.asarray(record.weight_thresholds, np.float32).reshape(1, 4 * hidden_size)
    weight_x = new_persistable(
        loaded, f"{stem}.fusion_lstm.weight_x",
        np.ascontiguousarray(
            np.concatenate([_gates_c_i_f_o(weight_ih).T, scale_row]).astype(np.float32)
        ),
    )
    weight_h = new_persistable(
        loaded, f"{stem}.fusion_lstm.weight_h",
        np.ascontiguousarray(_gates_c_i_f_o(weight_hh).T.astype(np.float32)),
    )
    bias = new_persistable(
        loaded, f"{stem}.fusion_lstm.bias",
        _gates_c_i_f_o((bias_ih + bias_hh).astype(np.float32))[None, :].copy(),
    )
    sequence, out = op.input("Input")[0], op.output("Out")[0]
    final_hidden = op.output("State")[0] if op.output("State") else None
    reads_final_hidden = final_hidden is not None and bool(readers(block).get(final_hidden))

    def var(suffix: str, shape: list[int], dtype: str = "float32") -> str:
        return block.create_var(name=f"{stem}.fusion_lstm.{suffix}", shape=shape, dtype=dtype).name

    def scratch(suffix: str) -> str:
        return var(suffix, [0])

    hidden_columns, gate_columns = [-1, hidden_size], [-1, 4 * hidden_size]
    batch_major = var("batch_major", [-1, -1, input_size])
    dims, batch, steps = var("dims", [3], "int32"), var("batch", [1], "int32"), var("steps", [1], "int32")
    batch_steps = var("batch_steps", [2], "int32")
    words, end = var("words", [1], "int32"), var("lod_end", [1], "int32")
    start, size = var("lod_start", [1], "int32"), var("hidden_size", [1], "int32")
    lod, flat = var("lod", [-1], "int32"), var("flat", [-1, input_size])
    first_feature, zeros = var("first_feature", [-1, 1]), var("zero_feature", [-1, 1])
    widened = var("widened", [-1, input_size + 1])
    with_lod, hidden = var("x", [-1, input_size + 1]), var("hidden", hidden_columns)
    out_shape, batch_major_out = var("out_shape", [3], "int32"), var("out_batch_major", [-1, -1, hidden_size])

    def slice_dims(output: str, first: int, last: int) -> tuple:
        return ("slice", {"Input": [dims]}, {"Out": [output]},
                {"axes": [0], "starts": [first], "ends": [last], "decrease_axis": [], "infer_flags": [1]})

    new_ops = [
        ("transpose2", {"X": [sequence]}, {"Out": [batch_major], "XShape": [scratch("xshape0")]},
         {"axis": [1, 0, 2]}),
        ("shape", {"Input": [batch_major]}, {"Out": [dims]}, {}),
        slice_dims(batch, 0, 1),
        slice_dims(steps, 1, 2),
        slice_dims(batch_steps, 0, 2),
        ("reshape2", {"X": [batch_major]}, {"Out": [flat], "XShape": [scratch("xshape1")]},
         {"shape": [-1, input_size]}),
        # LoD 0, T, ..., B * T: range(0, B * T + 1, T).
        ("elementwise_mul", {"X": [batch], "Y": [steps]}, {"Out": [words]}, {"axis": -1}),
        ("scale", {"X": [words]}, {"Out": [end]}, {"scale": 1.0, "bias": 1.0, "bias_after_scale": True}),
        ("fill_constant", {}, {"Out": [start]}, {"shape": [1], "dtype": _INT32, "value": 0.0}),
        ("range", {"Start": [start], "End": [end], "Step": [steps]}, {"Out": [lod]}, {}),
        # The zero feature that carries the weight scales.
        ("slice", {"Input": [flat]}, {"Out": [first_feature]},
         {"axes": [1], "starts": [0], "ends": [1], "decrease_axis": [], "infer_flags": [1]}),
        ("fill_any_like", {"X": [first_feature]}, {"Out": [zeros]}, {"value": 0.0, "dtype": -1}),
        ("concat", {"X": [flat, zeros]}, {"Out": [widened]}, {"axis": 1}),
        ("lod_reset", {"X": [widened], "Y": [lod]}, {"Out": [with_lod]}, {"append": False, "target_lod": []}),
        ("fusion_lstm",
         {"X": [with_lod], "WeightX": [weight_x], "WeightH": [weight_h], "Bias": [bias]},
         {"Hidden": [hidden], "Cell": [var("cell", hidden_columns)], "XX": [var("xx", gate_columns)],
          "BatchedInput": [var("batched_input", gate_columns)],
          "BatchedHidden": [var("batched_hidden", hidden_columns)],
          "BatchedCell": [var("batched_cell", hidden_columns)],
          "ReorderedH0": [var("reordered_h0", hidden_columns)],
          "ReorderedC0": [var("reordered_c0", hidden_columns)],
          "CheckedCell": [var("checked_cell", [2, hidden_size])]},
         {"use_peepholes": False, "is_reverse": False, "use_seq": True,
          "gate_activation": "sigmoid", "cell_activation": "tanh", "candidate_activation": "tanh"}),
        ("fill_constant", {}, {"Out": [size]}, {"shape": [1], "dtype": _INT32, "value": float(hidden_size)}),
        ("concat", {"X": [batch_steps, size]}, {"Out": [out_shape]}, {"axis": 0}),
        ("reshape2", {"X": [hidden], "Shape": [out_shape]},
         # The Shape tensor decides at run time; the attribute only has to infer.
         {"Out": [batch_major_out], "XShape": [scratch("xshape2")]}, {"shape": [-1, 1, hidden_size]}),
        ("transpose2", {"X": [batch_major_out]}, {"Out": [out], "XShape": [scratch("xshape3")]},
         {"axis": [1, 0, 2]}),
    ]
    if reads_final_hidden:
        new_ops.append(
            ("slice", {"Input": [out]}, {"Out": [final_hidden]},
             {"axes": [0], "starts": [-1], "ends": [_TO_END], "decrease_axis": [], "infer_flags": [1]})
        )
    states = op.output("State")
    if len(states) > 1 and readers(block).get(states[1]):
        new_ops.extend(_final_cell_ops(
            loaded, record, (weight_ih, weight_hh, bias_ih + bias_hh), sequence, out, states[1],
            f"{stem}.final_cell", var,
        ))
    index = list(block.ops).index(op)
    remove_op(block, index)
    fusion = None
    for offset, (kind, inputs, outputs, attrs) in enumerate(new_ops):
        inserted = insert_op(block, index + offset, type=kind, inputs=inputs, outputs=outputs, attrs=attrs)
        if kind == "fusion_lstm":
            fusion = inserted
    return FusedLSTM(record, fusion, weight_x)


def _final_cell_ops(
    loaded, record: LayerRecord, weights: tuple[np.ndarray, np.ndarray, np.ndarray],
    sequence: str, hidden: str, final_cell: str, stem: str, var: Callable[..., str],
) -> list[tuple]:
    """Ops computing the LSTM's final cell state ``[1, B, H]`` beside ``fusion_lstm``, whose
    oneDNN kernel does not output it.

    Every step's gates are what the int8 kernel computes: the input on its data grid times the
    s8 weights, plus the previous step's hidden state (the kernel's dequantized output, which
    is what it fed back) times the recurrent s8 weights, so all steps run as two fp32 GEMMs.
    The cell recurrence ``c_t = f_t c_(t-1) + i_t g_t`` from zero is then the sum
    ``c_T = sum_t exp(sum_(s>t) log f_s) i_t g_t`` (a reverse exclusive cumsum of
    ``log sigmoid``), which needs no loop over the dynamic sequence length.
    """
    weight_ih, weight_hh, bias = weights  # paddle.nn.LSTM's gate order i, f, c, o
    hidden_size, input_size = weight_hh.shape[1], weight_ih.shape[1]
    thresholds = np.asarray(record.weight_thresholds, np.float32).reshape(-1)
    weight_x = new_persistable(
        loaded, f"{stem}.weight_x", np.ascontiguousarray(quantize_gate_rows(weight_ih, thresholds).T)
    )
    weight_h = new_persistable(
        loaded, f"{stem}.weight_h", np.ascontiguousarray(quantize_gate_rows(weight_hh, thresholds).T)
    )
    bias = new_persistable(loaded, f"{stem}.bias", bias.astype(np.float32))
    data_threshold = float(record.input_threshold)

    def tensor(suffix: str, width: int) -> str:
        return var(f"final_cell.{suffix}", [-1, -1, width])

    codes, rounded, clipped = tensor("codes", input_size), tensor("rounded", input_size), tensor("clipped", input_size)
    on_grid, first, zeros = tensor("x", input_size), tensor("first", hidden_size), tensor("h0", hidden_size)
    shifted, previous = tensor("shifted", hidden_size), tensor("previous", hidden_size)
    from_x, from_h = tensor("from_x", 4 * hidden_size), tensor("from_h", 4 * hidden_size)
    summed, gates = tensor("summed", 4 * hidden_size), tensor("gates", 4 * hidden_size)
    input_gate, forget, candidate, output = (tensor(g, hidden_size) for g in ("i", "f", "g", "o"))
    log_forget, decay_log, decay = tensor("log_f", hidden_size), tensor("decay_log", hidden_size), tensor("decay", hidden_size)
    opened, proposed, written, contribution = (
        tensor(n, hidden_size) for n in ("sigmoid_i", "tanh_g", "written", "contribution")
    )
    return [
        # The input on the kernel's data grid (quant_rnn.QuantizedLSTM.quantize_data).
        ("scale", {"X": [sequence]}, {"Out": [codes]},
         {"scale": 127.0 / data_threshold, "bias": 0.0, "bias_after_scale": True}),
        *rounding_steps(codes, rounded, tensor("shifted_codes", input_size)),
        ("clip", {"X": [rounded]}, {"Out": [clipped]}, {"min": -128.0, "max": 127.0}),
        ("scale", {"X": [clipped]}, {"Out": [on_grid]},
         {"scale": data_threshold / 127.0, "bias": 0.0, "bias_after_scale": True}),
        ("matmul_v2", {"X": [on_grid], "Y": [weight_x]}, {"Out": [from_x]}, {"trans_x": False, "trans_y": False}),
        # h_(t-1): zeros, then the hidden sequence without its last step.
        ("slice", {"Input": [hidden]}, {"Out": [first]},
         {"axes": [0], "starts": [0], "ends": [1], "decrease_axis": [], "infer_flags": [1]}),
        ("fill_any_like", {"X": [first]}, {"Out": [zeros]}, {"value": 0.0, "dtype": -1}),
        ("concat", {"X": [zeros, hidden]}, {"Out": [shifted]}, {"axis": 0}),
        ("slice", {"Input": [shifted]}, {"Out": [previous]},
         {"axes": [0], "starts": [0], "ends": [-1], "decrease_axis": [], "infer_flags": [1]}),
        ("matmul_v2", {"X": [previous], "Y": [weight_h]}, {"Out": [from_h]}, {"trans_x": False, "trans_y": False}),
        ("elementwise_add", {"X": [from_x], "Y": [from_h]}, {"Out": [summed]}, {"axis": -1}),
        ("elementwise_add", {"X": [summed], "Y": [bias]}, {"Out": [gates]}, {"axis": -1}),
        ("split", {"X": [gates]}, {"Out": [input_gate, forget, candidate, output]},
         {"axis": 2, "num": 4, "sections": []}),
        ("logsigmoid", {"X": [forget]}, {"Out": [log_forget]}, {}),
        ("cumsum", {"X": [log_forget]}, {"Out": [decay_log]},
         {"axis": 0, "flatten": False, "exclusive": True, "reverse": True}),
        ("exp", {"X": [decay_log]}, {"Out": [decay]}, {}),
        ("sigmoid", {"X": [input_gate]}, {"Out": [opened]}, {}),
        ("tanh", {"X": [candidate]}, {"Out": [proposed]}, {}),
        ("elementwise_mul", {"X": [opened], "Y": [proposed]}, {"Out": [written]}, {"axis": -1}),
        ("elementwise_mul", {"X": [decay], "Y": [written]}, {"Out": [contribution]}, {"axis": -1}),
        ("reduce_sum", {"X": [contribution]}, {"Out": [final_cell]},
         {"dim": [0], "keep_dim": True, "reduce_all": False}),
    ]
