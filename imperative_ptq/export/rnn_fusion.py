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
  ``[T, B, H]``; a final hidden state that is read is sliced from it.

Only what ``fusion_lstm`` computes is rewritten: one layer, one direction, zero initial
states, no sequence lengths, and a final cell state nobody reads. The others keep the ``rnn``
op (fp32); the caller warns.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .graph import get_tensor, new_persistable, producers, readers
from .tracing import LayerRecord

__all__ = ["FusedLSTM", "fuse_lstm_ops"]

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


def fuse_lstm_ops(
    loaded, weights: dict[str, LayerRecord]
) -> tuple[list[FusedLSTM], dict[str, str]]:
    """Rewrites every ``rnn`` op of a calibrated LSTM (its input weight in ``weights``) that
    ``fusion_lstm`` computes; leaves the others.

    Args:
        loaded: The :class:`.program.LegacyProgram` (rewritten in place).
        weights: Weight variable -> calibrated layer.

    Returns:
        The rewritten LSTMs, and why each other calibrated LSTM was left as it is (layer name
        -> reason).
    """
    block = loaded.program.global_block()
    fused: list[FusedLSTM] = []
    refused: dict[str, str] = {}
    for op in [op for op in block.ops if op.type == "rnn"]:
        weight_list = op.input("WeightList")
        record = weights.get(weight_list[0]) if weight_list else None
        if record is None:
            continue
        reason = _refusal(block, op)
        if reason is not None:
            refused[record.name] = reason
            continue
        fused.append(_rewrite(loaded, op, record))
    if fused:
        loaded.program._sync_with_cpp()
    return fused, refused


def _refusal(block, op) -> str | None:
    """Why ``fusion_lstm`` cannot compute this ``rnn`` op, or ``None``."""
    if op.attr("mode") != "LSTM":
        return f"rnn mode {op.attr('mode')}"
    if op.attr("num_layers") != 1 or op.attr("is_bidirec"):
        return "more than one layer or direction"
    if op.input("SequenceLength"):
        return "sequence lengths"
    if len(op.input("WeightList")) != 4:
        return "no bias"
    writers, reading = producers(block), readers(block)
    for state in op.input("PreState"):
        writer = writers.get(state)
        if writer is None or writer.type != "fill_constant" or float(writer.attr("value")) != 0.0 or (
            writer.attr("str_value") not in ("", None) and float(writer.attr("str_value")) != 0.0
        ):
            return "initial states that are not zeros"
    states = op.output("State")
    if len(states) > 1 and reading.get(states[1]):
        return "its final cell state is read"
    return None


def _gates_c_i_f_o(value: np.ndarray) -> np.ndarray:
    """Rows of ``paddle.nn.LSTM``'s gate order i, f, c, o in fusion_lstm's c, i, f, o."""
    input_gate, forget, candidate, output = np.split(value, 4, axis=0)
    return np.concatenate([candidate, input_gate, forget, output], axis=0)


def _rewrite(loaded, op, record: LayerRecord) -> FusedLSTM:
    block = loaded.program.global_block()
    weight_ih, weight_hh, bias_ih, bias_hh = (get_tensor(loaded, n) for n in op.input("WeightList"))
    hidden_size, input_size = weight_hh.shape[1], weight_ih.shape[1]
    stem = op.input("WeightList")[0]
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
    index = list(block.ops).index(op)
    block._remove_op(index)
    fusion = None
    for offset, (kind, inputs, outputs, attrs) in enumerate(new_ops):
        inserted = block._insert_op(index + offset, type=kind, inputs=inputs, outputs=outputs, attrs=attrs)
        if kind == "fusion_lstm":
            fusion = inserted
    return FusedLSTM(record, fusion, weight_x)
