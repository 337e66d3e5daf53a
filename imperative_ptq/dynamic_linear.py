"""The dynamically quantized Linear: int8 weights, its input quantized per call at run time.

:class:`DynamicQuantizedLinear` holds int8 per-channel symmetric weights, and each call
quantizes its input with the range of that very batch, the way ONNX Runtime's
``DynamicQuantizeLinear`` does (asymmetric uint8, the range stretched to include 0)::

    scale = (max(x, 0) - min(x, 0)) / 255        (1 if x is all zeros)
    zero_point = round(-min(x, 0) / scale)
    q = clip(round(x / scale) + zero_point, 0, 255)          round: half to even
    y = float32(sum_k (q - zero_point)[k] * w_int8[k, c]) * (scale * w_scale[c]) + bias[c]

The integer products are summed exactly (in float64, exact for any layer width a model has:
``|sum| < 2**53``), so the dygraph model computes what ``MatMulInteger`` (int32 accumulation)
computes. Good for models whose activation ranges change from input to input (LSTMs,
transformers); :func:`imperative_ptq.export.export_onnx` writes the integer form ONNX Runtime
runs, :func:`imperative_ptq.export.save_quantized_model` a weight-only int8 Paddle program.
"""

from __future__ import annotations

import numpy as np
import paddle

from .quant_layers import MIN_WEIGHT_THRESHOLD, quantize_weight
from .quantizers.qparams import symmetric_levels
from .rounding import round_half_to_even

__all__ = ["DynamicQuantizedLinear", "dynamic_quantize_activation"]

def dynamic_quantize_activation(
    x: paddle.Tensor,
) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """ONNX ``DynamicQuantizeLinear`` of ``x`` (one scale for the whole tensor).

    Args:
        x: Float32 tensor.

    Returns:
        ``(codes, scale, zero_point)``: codes ``0..255`` as float32 (same shape as ``x``), the
        float32 scale and the zero point (float32, integer-valued), both 0-D tensors.
    """
    low = paddle.minimum(paddle.min(x), paddle.zeros([], x.dtype))
    high = paddle.maximum(paddle.max(x), paddle.zeros([], x.dtype))
    spread = high - low
    scale = paddle.where(spread > 0, spread / 255.0, paddle.ones([], x.dtype))
    zero_point = paddle.clip(round_half_to_even(-low / scale), 0.0, 255.0)
    codes = paddle.clip(round_half_to_even(x / scale) + zero_point, 0.0, 255.0)
    return codes, scale, zero_point


class DynamicQuantizedLinear(paddle.nn.Layer):
    """A Linear with int8 per-output-channel weights and per-batch uint8 input quantization.

    Args:
        linear: The fp32 Linear (only read).
        weight_bits: Weight bit width (2..8): codes ``-L..L`` with ``L = 2**(bits-1) - 1``.
            7 keeps every u8 x s8 pair sum within int16, which CPUs without VNNI need
            (ONNX Runtime's ``reduce_range``).

    Attributes:
        weight_integers: int8 ``[in, out]`` buffer.
        weight_scales: float32 ``[out]`` buffer: the weight is ``weight_integers * weight_scales``.
        bias: The Linear's bias (fp32), or ``None``.
    """

    def __init__(self, linear: paddle.nn.Linear, weight_bits: int = 8) -> None:
        super().__init__()
        self.weight_bits = int(weight_bits)
        weight = linear.weight.numpy().astype(np.float32)
        thresholds = np.abs(weight).max(axis=0)
        thresholds = np.where(thresholds > 0, thresholds, np.float32(MIN_WEIGHT_THRESHOLD))
        integers = quantize_weight(weight, thresholds, self.weight_bits, axis=1)
        self.in_features, self.out_features = weight.shape
        self.register_buffer("weight_integers", paddle.to_tensor(integers))
        self.register_buffer(
            "weight_scales",
            paddle.to_tensor((thresholds / symmetric_levels(self.weight_bits)).astype(np.float32)),
        )
        self.bias = None
        if linear.bias is not None:
            self.bias = self.create_parameter(
                [self.out_features], dtype="float32",
                default_initializer=paddle.nn.initializer.Assign(linear.bias.numpy()),
            )
            self.bias.stop_gradient = True

    @property
    def weight(self) -> paddle.Tensor:
        """The ``[in, out]`` weight the integers stand for, as a tensor: for a model whose
        forward reads the Linear's weight too (a decoder tied to it, ``F.linear(h,
        self.encoder.weight.T)``)."""
        return self.weight_integers.astype("float32") * self.weight_scales.unsqueeze(0)

    def dequantized_weight(self) -> np.ndarray:
        """The ``[in, out]`` float32 weight the integers stand for."""
        return (
            self.weight_integers.numpy().astype(np.float32) * self.weight_scales.numpy()[None, :]
        ).astype(np.float32)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if isinstance(x, np.ndarray):
            raise TypeError(
                "DynamicQuantizedLinear input expects a paddle.Tensor, got numpy.ndarray: wrap "
                "it with paddle.to_tensor(...)"
            )
        if x.dtype != paddle.float32:
            raise TypeError(f"DynamicQuantizedLinear input must be float32, got {x.dtype}")
        with paddle.no_grad():
            codes, scale, zero_point = dynamic_quantize_activation(x)
            centered = (codes - zero_point).astype("float64")
            accumulated = paddle.matmul(centered, self.weight_integers.astype("float64"))
            y = accumulated.astype("float32") * (scale * self.weight_scales)
            if self.bias is not None:
                y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weight_bits={self.weight_bits}, activations=dynamic uint8"
        )
