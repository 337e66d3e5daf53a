"""The int8 simulation of an LSTM as Paddle Inference's oneDNN ``fusion_lstm`` computes it.

The export rewrites a traced one-layer, one-direction ``paddle.nn.LSTM`` into ``fusion_lstm``
(:mod:`imperative_ptq.export.rnn_fusion`), which Paddle Inference's oneDNN int8 pipeline runs
as oneDNN's int8 LSTM. Measured on Paddle 3.3.1, that LSTM computes:

* one *data* scale for the input sequence **and** the hidden state: both are quantized as u8
  codes ``round(v / t * 127) + 128`` (Paddle forces the input signed), i.e. symmetric codes
  ``-128..127`` of threshold ``t``; the hidden state fed back at every step and the hidden
  sequence the layer outputs are those dequantized codes. ``t`` is the larger of the input's
  and the output's calibrated thresholds, so neither is clipped by the other's range.
* per gate-unit weight scales that Paddle derives itself from the fp32 weights it stores (the
  abs-max over the input and the recurrent weight of each gate column,
  ``compute_propagate_scales_onednn_pass``) and that the kernel applies in oneDNN's gate order
  (i, f, c, o) although they are computed in Paddle's (c, i, f, o): the input gate borrows the
  candidate gate's scale, the forget gate the input gate's, the candidate gate the forget
  gate's. Left so, a gate whose weights exceed the scale it borrows saturates them.
* the cell state, the gate activations and the bias stay float32.

The export therefore chooses the scales: it appends an input feature that is always zero
(its products vanish) whose weight row holds, in each gate column, the threshold the gate
borrowing that column should use. Each gate's threshold is
``headroom * max(own abs-max, abs-max of the column it borrows)``, at least the largest weight
either way, so no weight saturates. Without VNNI oneDNN sums u8 x s8 byte pairs in int16
(``vpmaddubsw``), and the u8 data codes reach 255; a headroom of 2 keeps the weight codes within
``-64..64`` so no pair sum can saturate (2 * 255 * 64 < 32767): the ``x86`` target uses it (7-bit
weights, exact on every x86 CPU), ``x86-vnni`` uses 1 (8-bit, exact with VNNI). Measured: this
simulation matches Paddle Inference to 5e-8 with AMX and on AVX2 kernels.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import paddle

from .rounding import grid_codes

__all__ = [
    "CALLED_WITH_STATES", "QuantizedLSTM", "fp32_call_reason", "fusion_lstm_weight_thresholds", "gate_row_codes",
    "lstm_int8_refusal", "quantize_gate_rows", "weight_multipliers",
]

logger = logging.getLogger(__name__)

#: Data codes of oneDNN's int8 RNN: u8 with a shift of 128.
_DATA_MIN, _DATA_MAX = -128, 127


def lstm_int8_refusal(layer: paddle.nn.Layer, activation_bits: int, weight_bits: int) -> str | None:
    """Why ``layer`` cannot run as Paddle Inference's int8 ``fusion_lstm``, or ``None``."""
    if not isinstance(layer, paddle.nn.LSTM):
        return f"{type(layer).__name__}: only LSTMs have an int8 kernel"
    if layer.num_layers != 1:
        return f"{layer.num_layers} layers (fusion_lstm runs one)"
    if layer.num_directions != 1:
        return "bidirectional (fusion_lstm runs one direction)"
    if getattr(layer, "proj_size", 0):
        return "proj_size > 0"
    if activation_bits != 8 or weight_bits != 8:
        return f"{activation_bits}/{weight_bits}-bit (oneDNN's int8 LSTM is 8/8-bit)"
    if np.any(_joint_abs_max(*_gate_weights(layer)) == 0):
        return "a gate unit with all-zero weights (Paddle would divide by its zero scale)"
    return None


#: :func:`fp32_call_reason` of a call with initial states that are not known to be zeros.
CALLED_WITH_STATES = "called with initial states"


def fp32_call_reason(initial_states: Any, sequence_length: Any) -> str | None:
    """Why a call of a :class:`QuantizedLSTM` with these arguments runs fp32, or ``None``.

    Paddle Inference's oneDNN ``fusion_lstm`` caches its initial states with its weights (the
    first run's states would serve later runs of the same shape) and reads no sequence
    lengths; the export asks this too, of each traced call, so both run such a call fp32.
    Initial states that are all zeros (what x2paddle passes for every converted PyTorch LSTM)
    are those it starts from anyway: such a call runs int8. A traced call's states are not
    known here (:data:`CALLED_WITH_STATES`); the export runs it int8 where the program builds
    them as zeros (:func:`imperative_ptq.export.rnn_fusion.zero_initial_states`).
    """
    if sequence_length is not None:
        return "called with sequence lengths"
    if initial_states is not None and not _all_zeros(initial_states):
        return CALLED_WITH_STATES
    return None


def _all_zeros(states: Any) -> bool:
    """Whether ``states`` (a tensor, or nested tuples/lists of them) are dygraph tensors of
    zeros (a traced call's static variables are not known)."""
    if isinstance(states, (tuple, list)):
        return all(_all_zeros(state) for state in states)
    return (
        isinstance(states, paddle.Tensor) and paddle.in_dynamic_mode()
        and not bool(paddle.any(states != 0))
    )


def _gate_weights(layer: paddle.nn.LSTM) -> tuple[np.ndarray, np.ndarray]:
    """The input and recurrent weights, ``[4H, in]`` and ``[4H, H]``, gates i, f, c, o."""
    return (
        layer.weight_ih_l0.numpy().astype(np.float32),
        layer.weight_hh_l0.numpy().astype(np.float32),
    )


def _joint_abs_max(weight_ih: np.ndarray, weight_hh: np.ndarray) -> np.ndarray:
    """Per gate unit (``4H``, Paddle's nn order i, f, c, o): the largest ``|w|`` of that row in
    either weight, as Paddle's pass computes it per fusion_lstm column."""
    return np.maximum(np.abs(weight_ih).max(axis=1), np.abs(weight_hh).max(axis=1))


def fusion_lstm_weight_thresholds(layer: paddle.nn.LSTM, headroom: float) -> np.ndarray:
    """The thresholds the export makes oneDNN's int8 LSTM quantize each gate unit's weights with
    (``4H``, gates in ``paddle.nn.LSTM`` order i, f, c, o): ``headroom`` times the larger of the
    gate's own abs-max and that of the gate whose scale it borrows (module docstring)."""
    input_gate, forget, candidate, output = np.split(_joint_abs_max(*_gate_weights(layer)), 4)
    # Borrowed: i <- c, f <- i, c <- f, o <- o.
    thresholds = np.concatenate([
        np.maximum(input_gate, candidate), np.maximum(forget, input_gate),
        np.maximum(candidate, forget), output,
    ])
    return (thresholds * np.float32(headroom)).astype(np.float32)


def weight_multipliers(thresholds: np.ndarray) -> np.ndarray:
    """The per gate-unit factors oneDNN's int8 LSTM quantizes the weights with, as Paddle 3.3.1
    computes them from thresholds ``t``: its pass stores ``1 / t`` in float32 and multiplies it by
    127 in float64 before narrowing to float32. That differs from ``float32(127 / t)`` in the
    last bit for about a quarter of the units, which moves a weight lying on a rounding tie by
    one code (with a headroom of 2, each gate's largest weight lies exactly on 63.5)."""
    inverse = (np.float32(1) / np.asarray(thresholds, np.float32)).astype(np.float32)
    return (inverse.astype(np.float64) * 127.0).astype(np.float32)


def gate_row_codes(weight: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The int8 codes oneDNN's int8 LSTM multiplies with, ``rint(w * m)`` saturated to s8 for
    the :func:`weight_multipliers` ``m`` of the thresholds, and their scales ``1 / m``: one
    threshold per gate unit (a row of ``weight_ih_l0``/``weight_hh_l0``)."""
    multipliers = weight_multipliers(thresholds)
    codes = np.clip(np.rint(weight.astype(np.float32) * multipliers[:, None]), -128, 127)
    return codes.astype(np.int8), (np.float32(1) / multipliers).astype(np.float32)


def quantize_gate_rows(weight: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The weights oneDNN's int8 LSTM multiplies with (:func:`gate_row_codes`), dequantized."""
    codes, scales = gate_row_codes(weight, thresholds)
    return (codes.astype(np.float32) * scales[:, None]).astype(np.float32)


class QuantizedLSTM(paddle.nn.Layer):
    """A one-layer, one-direction LSTM computing what Paddle Inference's int8 fusion_lstm does.

    Args:
        layer: The fp32 ``paddle.nn.LSTM`` (kept unchanged: the export stores its fp32
            weights, which Paddle quantizes itself).
        input_thresholds: The calibrated input threshold (first value used).
        output_thresholds: The calibrated output (hidden sequence) threshold, or empty.
        weight_headroom: 2 for 7-bit weight codes, exact without VNNI; 1 for 8-bit codes
            (module docstring).
        name: The layer's name in the model, for the warning of a call that runs fp32.

    Attributes:
        data_threshold: The threshold of the input and hidden-state codes.
        weight_thresholds: Per gate-unit weight thresholds the kernel uses (``4H``).
    """

    def __init__(
        self,
        layer: paddle.nn.LSTM,
        input_thresholds: Sequence[float],
        output_thresholds: Sequence[float],
        weight_headroom: float = 2.0,
        name: str = "",
    ) -> None:
        super().__init__()
        self.layer = layer
        self.layer_name = name
        self.input_thresholds = [float(t) for t in input_thresholds]
        self.output_thresholds = [float(t) for t in output_thresholds]
        self.data_threshold = max(self.input_thresholds[:1] + self.output_thresholds[:1])
        self.weight_headroom = float(weight_headroom)
        self.weight_thresholds = fusion_lstm_weight_thresholds(layer, self.weight_headroom)
        weight_ih, weight_hh = _gate_weights(layer)
        self.register_buffer(
            "_weight_ih", paddle.to_tensor(quantize_gate_rows(weight_ih, self.weight_thresholds).T)
        )
        self.register_buffer(
            "_weight_hh", paddle.to_tensor(quantize_gate_rows(weight_hh, self.weight_thresholds).T)
        )
        bias = np.zeros([4 * layer.hidden_size], np.float32)
        for name in ("bias_ih_l0", "bias_hh_l0"):
            value = getattr(layer, name, None)
            if value is not None:
                bias = bias + value.numpy().astype(np.float32)
        self.register_buffer("_bias", paddle.to_tensor(bias))
        self._warned_fp32 = False

    def quantize_data(self, value: paddle.Tensor) -> paddle.Tensor:
        """Input or hidden state on the kernel's data grid (codes -128..127 of the threshold)."""
        step = self.data_threshold / 127
        return grid_codes(value, step, _DATA_MIN, _DATA_MAX) * step

    def forward(
        self, inputs: paddle.Tensor, initial_states: Any = None, sequence_length: Any = None
    ) -> tuple[paddle.Tensor, tuple[paddle.Tensor, paddle.Tensor]]:
        reason = fp32_call_reason(initial_states, sequence_length)
        if reason is not None:
            if not self._warned_fp32:
                logger.warning(
                    "LSTM %s %s: it runs fp32, here and in the export (Paddle Inference's int8 "
                    "fusion_lstm runs from zero states over whole sequences)",
                    self.layer_name or "(unnamed)", reason,
                )
                self._warned_fp32 = True
            return self.layer(inputs, initial_states, sequence_length)
        time_major = self.layer.time_major
        # (Codes taken before the transpose: in the caller's layout, batch-major where it is.)
        data = self.quantize_data(inputs)
        sequence = data if time_major else paddle.transpose(data, [1, 0, 2])  # [T, B, in]
        steps, batch = sequence.shape[0], sequence.shape[1]
        hidden_size = self.layer.hidden_size
        # One GEMM for the input part of every step, as oneDNN does.
        gates_x = paddle.matmul(sequence, self._weight_ih) + self._bias
        hidden = paddle.zeros([batch, hidden_size], dtype=inputs.dtype)
        cell = paddle.zeros([batch, hidden_size], dtype=inputs.dtype)
        outputs = []
        for step in range(steps):  # the recurrence is sequential
            gates = gates_x[step] + paddle.matmul(hidden, self._weight_hh)
            input_gate, forget, candidate, output = paddle.split(gates, 4, axis=-1)
            cell = (
                paddle.nn.functional.sigmoid(forget) * cell
                + paddle.nn.functional.sigmoid(input_gate) * paddle.tanh(candidate)
            )
            hidden = self.quantize_data(paddle.nn.functional.sigmoid(output) * paddle.tanh(cell))
            outputs.append(hidden)
        stacked = paddle.stack(outputs, axis=0 if time_major else 1)
        return stacked, (hidden.unsqueeze(0), cell.unsqueeze(0))

    def extra_repr(self) -> str:
        return (
            f"data_threshold={self.data_threshold:.6g}, "
            f"gate_units={self.weight_thresholds.shape[0]}, weight_headroom={self.weight_headroom:g}"
        )
