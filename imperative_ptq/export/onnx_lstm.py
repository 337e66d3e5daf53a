"""ONNX of an LSTM the simulation runs as Paddle Inference's int8 ``fusion_lstm``.

:class:`~imperative_ptq.quant_rnn.QuantizedLSTM` quantizes the input sequence **and** the
hidden state fed back at every step on one data grid (codes -128..127 of its threshold), and
multiplies them with weights on per-gate-unit int8 grids. ONNX's ``LSTM`` op feeds its hidden
state back in float, and ONNX Runtime has no int8 LSTM that reads given scales, so the graph
spells the recurrence out:

* the input sequence on the data grid (``QuantizeLinear``/``DequantizeLinear`` to int8), times
  the input weight's codes (int8 initializers, one scale per gate unit, ``DequantizeLinear``),
  plus the two biases, for every step in one ``MatMul``, as the simulation does;
* a ``Scan`` over the steps carrying the hidden and cell states from zeros: the recurrent
  ``MatMul`` with the recurrent weight's codes, the gates in ``paddle.nn.LSTM``'s order
  (i, f, c, o), the float32 cell update, and the new hidden state put on the data grid.

Measured (one-layer LSTM 8 -> 16, KL thresholds, 10 steps, target x86): ONNX Runtime vs the
simulation, largest error 3.4% of the hidden sequence's largest value with the fp32 ``LSTM``
op, 3.1% with that op reading the quantized input and weights (the hidden state's rounding is
what matters), 0 with the ``Scan``.
"""

from __future__ import annotations

import numpy as np

from ..quant_rnn import CALLED_WITH_STATES, gate_row_codes
from ..quantizers.qparams import symmetric_levels
from .rnn_fusion import zero_initial_states
from .tracing import LayerRecord

__all__ = ["SimulatedLSTMConverter"]


class SimulatedLSTMConverter:
    """Translates the ``rnn`` calls of a :class:`~imperative_ptq.quant_rnn.QuantizedLSTM`
    that its simulation runs int8 (a mixin of the ONNX export's converter, using its graph
    helpers ``_node``, ``_const``, ``_unique``, ``_in``, ``_bind``)."""

    #: weight variable -> calibrated layer (the converter's)
    weights: dict[str, LayerRecord]
    #: calibrated LSTM name -> its rnn calls translated so far (program order)
    lstm_calls: dict[str, int]
    #: program variable -> the op writing it
    producer: dict

    def _simulated_lstm_record(self, op) -> LayerRecord | None:
        """The calibrated LSTM whose int8 simulation computes this ``rnn`` call, or ``None``
        (not a calibrated LSTM, or a call its simulation runs fp32: initial states given)."""
        names = op.input("WeightList")
        record = self.weights.get(names[0]) if names else None
        if record is None or op.attr("mode") != "LSTM":
            return None
        call = self.lstm_calls.get(record.name, 0)
        self.lstm_calls[record.name] = call + 1
        reason = record.fp32_calls[call] if call < len(record.fp32_calls) else None
        if reason == CALLED_WITH_STATES and zero_initial_states(
            self.producer, op, lambda name: self._param(name) if self._is_param(name) else None
        ):
            reason = None  # zeros: the simulation runs the call int8
        return None if reason is not None else record

    def _gate_weight(self, name: str, thresholds: np.ndarray, stem: str) -> str:
        """``DequantizeLinear`` of a gate weight's int8 codes, transposed to ``[columns, 4H]``
        for ``x @ W`` (one scale per gate unit: axis 1)."""
        codes, scales = gate_row_codes(self._param(name).astype(np.float32), thresholds)
        inputs = [
            self._const(name, np.ascontiguousarray(codes.T)), self._const("w_scale", scales),
            self._const("w_zero", np.zeros(scales.shape, np.int8)),
        ]
        return self._node("DequantizeLinear", inputs, stem, axis=1)

    def _on_data_grid(self, tensor: str, scale: str, zero: str, stem: str, nodes: list) -> str:
        """``tensor`` on the int8 data grid (``QuantizeLinear`` saturates to -128..127, the
        simulation's clip), the nodes appended to ``nodes``."""
        codes, value = self._unique(stem + ".q"), self._unique(stem + ".dq")
        nodes.append(self.helper.make_node("QuantizeLinear", [tensor, scale, zero], [codes]))
        nodes.append(self.helper.make_node("DequantizeLinear", [codes, scale, zero], [value]))
        return value

    def _simulated_lstm(self, op, record: LayerRecord) -> None:
        """One LSTM call as its int8 simulation computes it (module docstring): ``Out`` the
        hidden sequence ``[T, B, H]`` (time-major, as the ``rnn`` op), ``State`` the final
        hidden (on the data grid) and cell states ``[1, B, H]``."""
        hidden = int(op.attr("hidden_size"))
        names = op.input("WeightList")
        out = op.output("Out")[0]
        thresholds = np.asarray(record.weight_thresholds, np.float32).reshape(-1)
        scale = self._const("data_scale", np.array(record.input_threshold / symmetric_levels(8), np.float32))
        zero = self._const("data_zero", np.array(0, np.int8))
        x = self._on_data_grid(self._in(op, "Input"), scale, zero, out + ".x", self.nodes)
        bias = np.zeros([4 * hidden], np.float32)
        for name in names[2:]:  # b_ih, b_hh (none without bias)
            bias = bias + self._param(name).astype(np.float32).reshape(-1)
        gates_x = self._node("Add", [
            self._node("MatMul", [x, self._gate_weight(names[0], thresholds, out + ".w_ih")], out + ".x_w"),
            self._const("bias", bias),
        ], out + ".gates_x")
        recurrent = self._gate_weight(names[1], thresholds, out + ".w_hh")

        batch = self._node("Slice", [
            self._node("Shape", [x], out + ".shape"), *(self._const(stem, np.array([v], np.int64))
                                                       for stem, v in (("start", 1), ("end", 2))),
        ], out + ".batch")
        state_shape = self._node("Concat", [batch, self._const("hidden", np.array([hidden], np.int64))], out + ".state_shape", axis=0)
        zeros = self.helper.make_tensor("value", self.onnx.TensorProto.FLOAT, [1], [0.0])
        initial = self._node("ConstantOfShape", [state_shape], out + ".zeros", value=zeros)

        body, (h_in, c_in, gates_in) = [], (self._unique(out + suffix) for suffix in (".h", ".c", ".gx"))
        step = [self._unique(out + suffix) for suffix in (".gates", ".i", ".f", ".g", ".o")]
        body.append(self.helper.make_node("MatMul", [h_in, recurrent], [step[0] + ".rec"]))
        body.append(self.helper.make_node("Add", [gates_in, step[0] + ".rec"], [step[0]]))
        split = self._const("split", np.full([4], hidden, np.int64))
        body.append(self.helper.make_node("Split", [step[0], split], step[1:], axis=1))
        sigmoid = {gate: step[k] + ".sigmoid" for k, gate in ((1, "i"), (2, "f"), (4, "o"))}
        for gate, k in (("i", 1), ("f", 2), ("o", 4)):
            body.append(self.helper.make_node("Sigmoid", [step[k]], [sigmoid[gate]]))
        body += [
            self.helper.make_node("Tanh", [step[3]], [step[3] + ".tanh"]),
            self.helper.make_node("Mul", [sigmoid["f"], c_in], [out + ".kept"]),
            self.helper.make_node("Mul", [sigmoid["i"], step[3] + ".tanh"], [out + ".new"]),
            self.helper.make_node("Add", [out + ".kept", out + ".new"], [out + ".c_out"]),
            self.helper.make_node("Tanh", [out + ".c_out"], [out + ".c_tanh"]),
            self.helper.make_node("Mul", [sigmoid["o"], out + ".c_tanh"], [out + ".h_float"]),
        ]
        h_out = self._on_data_grid(out + ".h_float", scale, zero, out + ".h_out", body)
        body.append(self.helper.make_node("Identity", [h_out], [out + ".y"]))
        info = self.helper.make_tensor_value_info
        float_type = self.onnx.TensorProto.FLOAT
        graph = self.helper.make_graph(
            body, out + ".step",
            [info(h_in, float_type, None), info(c_in, float_type, None), info(gates_in, float_type, None)],
            [info(h_out, float_type, None), info(out + ".c_out", float_type, None), info(out + ".y", float_type, None)],
        )
        final_h, final_c, sequence = (self._unique(out + suffix) for suffix in (".h_final", ".c_final", ".seq"))
        self.nodes.append(self.helper.make_node(
            "Scan", [initial, initial, gates_x], [final_h, final_c, sequence], body=graph, num_scan_inputs=1,
        ))
        self._bind(out, sequence)
        for state, final in zip(op.output("State"), (final_h, final_c)):
            if state in self.readers or state in self.fetched:  # Paddle's [1, B, H]
                self._bind(state, self._node("Unsqueeze", [final, self._const("axes", np.array([0], np.int64))], state))
