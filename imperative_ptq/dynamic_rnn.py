"""Dynamically quantized LSTM and GRU: int8 weights, inputs and hidden states quantized per
time step at run time.

Each of the recurrence's matrix products (``x_t @ W_ih^T`` and ``h_{t-1} @ W_hh^T``, for every
layer and direction) is a :class:`~imperative_ptq.dynamic_linear.DynamicQuantizedLinear`, so
its operand is quantized with the range of that step's batch (as PyTorch's dynamic LSTM does);
the gates follow Paddle's ``LSTMCell`` / ``GRUCell`` in fp32.

Exported to ONNX, an LSTM runs as ONNX Runtime's ``DynamicQuantizeLSTM``, which quantizes each
layer's input once with the range of the whole sequence (the hidden state per step, as here):
its outputs differ from these by about the quantization error itself.
"""

from __future__ import annotations

import numpy as np
import paddle

from .dynamic_linear import DynamicQuantizedLinear

__all__ = ["RNN_TYPES", "DynamicQuantizedRNN"]

#: The recurrent layer types :class:`DynamicQuantizedRNN` can replace.
RNN_TYPES: tuple[type, ...] = (paddle.nn.LSTM, paddle.nn.GRU)


def _suffixes(num_layers: int, num_directions: int) -> list[tuple[int, int, str]]:
    """``(layer, direction, parameter-name suffix)`` in Paddle's order of states."""
    return [
        (layer, direction, f"_l{layer}" + ("_reverse" if direction else ""))
        for layer in range(num_layers)
        for direction in range(num_directions)
    ]


class DynamicQuantizedRNN(paddle.nn.Layer):
    """An LSTM or GRU whose matrix products run as dynamic int8 (see module docstring).

    Args:
        rnn: The fp32 ``paddle.nn.LSTM`` or ``paddle.nn.GRU`` (only read).
        weight_bits: Weight bit width (2..8).

    Raises:
        ValueError: ``rnn`` uses a projection (``proj_size``), which has no dynamic form here.
    """

    def __init__(self, rnn: paddle.nn.Layer, weight_bits: int = 8) -> None:
        super().__init__()
        if getattr(rnn, "proj_size", 0):
            raise ValueError("quantize_dynamic cannot quantize an LSTM with proj_size > 0")
        self.mode = "LSTM" if isinstance(rnn, paddle.nn.LSTM) else "GRU"
        self.input_size, self.hidden_size = int(rnn.input_size), int(rnn.hidden_size)
        self.num_layers, self.num_directions = int(rnn.num_layers), int(rnn.num_directions)
        self.time_major, self.dropout = bool(rnn.time_major), float(rnn.dropout)
        self.weight_bits = int(weight_bits)
        parameters = dict(rnn.named_parameters())
        self.products = paddle.nn.LayerDict()
        for _, _, suffix in _suffixes(self.num_layers, self.num_directions):
            for kind in ("ih", "hh"):
                weight = parameters[f"weight_{kind}{suffix}"]
                bias = parameters.get(f"bias_{kind}{suffix}")
                linear = paddle.nn.Linear(
                    weight.shape[1], weight.shape[0], bias_attr=None if bias is not None else False
                )
                linear.weight.set_value(weight.numpy().T)  # Paddle RNN weights are [out, in]
                if bias is not None:
                    linear.bias.set_value(bias.numpy())
                self.products[f"{kind}{suffix}"] = DynamicQuantizedLinear(linear, self.weight_bits)

    def dequantized_rnn(self) -> paddle.nn.Layer:
        """A new fp32 ``paddle.nn.LSTM`` / ``GRU`` of the same shape holding the weights the
        int8 codes stand for (what a weight-only export computes with), in eval mode."""
        rnn_type = paddle.nn.LSTM if self.mode == "LSTM" else paddle.nn.GRU
        rnn = rnn_type(
            self.input_size, self.hidden_size, num_layers=self.num_layers,
            direction="bidirect" if self.num_directions == 2 else "forward",
            time_major=self.time_major, dropout=self.dropout,
        )
        parameters = dict(rnn.named_parameters())
        for name, product in self.products.items():
            parameters[f"weight_{name}"].set_value(product.dequantized_weight().T)
            bias = np.zeros([product.out_features], np.float32)
            if product.bias is not None:
                bias = product.bias.numpy()
            parameters[f"bias_{name}"].set_value(bias)
        rnn.eval()
        return rnn

    def rnn_weights(self) -> dict[str, DynamicQuantizedLinear]:
        """The product of each ``paddle.nn`` RNN parameter name (``weight_ih_l0``, ...)."""
        return {f"weight_{name}": product for name, product in self.products.items()}

    def _step(self, suffix: str, x: paddle.Tensor, h: paddle.Tensor, c: paddle.Tensor | None):
        x_gates = self.products[f"ih{suffix}"](x)
        h_gates = self.products[f"hh{suffix}"](h)
        if self.mode == "LSTM":
            i, f, g, o = paddle.split(x_gates + h_gates, 4, axis=-1)
            c = paddle.nn.functional.sigmoid(f) * c + paddle.nn.functional.sigmoid(i) * paddle.tanh(g)
            return paddle.nn.functional.sigmoid(o) * paddle.tanh(c), c
        x_r, x_z, x_c = paddle.split(x_gates, 3, axis=-1)
        h_r, h_z, h_c = paddle.split(h_gates, 3, axis=-1)
        r = paddle.nn.functional.sigmoid(x_r + h_r)
        z = paddle.nn.functional.sigmoid(x_z + h_z)
        candidate = paddle.tanh(x_c + r * h_c)
        return (h - candidate) * z + candidate, None

    def forward(self, inputs: paddle.Tensor, initial_states=None, sequence_length=None):
        if sequence_length is not None:
            raise ValueError(
                f"dynamically quantized {self.mode}: sequence_length is not supported (pad "
                f"and mask instead)"
            )
        if isinstance(inputs, np.ndarray):
            raise TypeError(
                f"dynamically quantized {self.mode} input expects a paddle.Tensor, got "
                f"numpy.ndarray: wrap it with paddle.to_tensor(...)"
            )
        x = inputs if self.time_major else inputs.transpose([1, 0, 2])  # [T, B, F]
        steps, batch = x.shape[0], x.shape[1]
        count = self.num_layers * self.num_directions
        if initial_states is None:
            zeros = paddle.zeros([count, batch, self.hidden_size], x.dtype)
            initial_states = (zeros, zeros) if self.mode == "LSTM" else zeros
        h0, c0 = initial_states if self.mode == "LSTM" else (initial_states, None)
        final_h, final_c = [], []
        for layer in range(self.num_layers):
            outputs = []
            for layer_index, direction, suffix in _suffixes(self.num_layers, self.num_directions):
                if layer_index != layer:
                    continue
                index = layer * self.num_directions + direction
                h, c = h0[index], None if c0 is None else c0[index]
                sequence: list[paddle.Tensor | None] = [None] * steps
                for t in (range(steps) if direction == 0 else reversed(range(steps))):
                    h, c = self._step(suffix, x[t], h, c)
                    sequence[t] = h
                outputs.append(paddle.stack(sequence))
                final_h.append(h)
                final_c.append(c)
            x = paddle.concat(outputs, axis=-1) if len(outputs) > 1 else outputs[0]
            if self.dropout and layer < self.num_layers - 1:
                x = paddle.nn.functional.dropout(x, self.dropout, training=self.training)
        outputs = x if self.time_major else x.transpose([1, 0, 2])
        h_n = paddle.stack(final_h)
        return outputs, ((h_n, paddle.stack(final_c)) if self.mode == "LSTM" else h_n)

    def extra_repr(self) -> str:
        return (
            f"{self.mode}, input_size={self.input_size}, hidden_size={self.hidden_size}, "
            f"num_layers={self.num_layers}, directions={self.num_directions}, "
            f"weight_bits={self.weight_bits}, activations=dynamic uint8 per step"
        )
