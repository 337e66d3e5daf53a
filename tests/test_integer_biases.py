"""Conv biases on the int32 grid ONNX Runtime stores them on (``integer_biases``): ONNX
Runtime's QLinearConv adds the same bias as the simulation and Paddle Inference."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.export import create_predictor, export_onnx, predict

onnxruntime = pytest.importorskip("onnxruntime")
nn = paddle.nn


class _AudioBlocks(nn.Layer):
    """PANNs-style conv blocks: conv -> BatchNorm -> ReLU twice, average-pooled, then a conv
    without a BatchNorm read by a quantized conv (each conv followed by a quantize: the
    QLinearConv form with an int32 bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2D(1, 8, 3, padding=1), nn.BatchNorm2D(8)
        self.conv2, self.norm2 = nn.Conv2D(8, 8, 3, padding=1), nn.BatchNorm2D(8)
        self.conv3, self.conv4 = nn.Conv2D(8, 8, 3, padding=1), nn.Conv2D(8, 4, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        relu = nn.functional.relu
        y = relu(self.norm1(self.conv1(x)))
        y = nn.functional.avg_pool2d(relu(self.norm2(self.conv2(y))), 2)
        return self.conv4(relu(self.conv3(y)))


def _converted(rng: np.random.Generator) -> tuple[nn.Layer, nn.Layer]:
    from models import converted, randomize_batch_norm_statistics

    paddle.seed(0)
    model = _AudioBlocks()
    randomize_batch_norm_statistics(model, 0)
    for conv in (model.conv1, model.conv2, model.conv3, model.conv4):  # trained-like biases
        conv.bias.set_value(rng.normal(0, 0.3, conv.bias.shape).astype(np.float32))
    reference = _AudioBlocks()
    reference.set_state_dict(model.state_dict())
    reference.eval()
    batches = [paddle.to_tensor(rng.random((4, 1, 16, 16), np.float32)) for _ in range(3)]
    return converted(model, batches), reference


def test_onnx_runtime_adds_the_simulated_biases(tmp_path) -> None:
    """Measured before: 2.7e-3 of the largest output off the simulation on a PANNs-style
    audio CNN (its QLinearConvs' int32 biases rounded, the simulation's float ones not)."""
    rng = np.random.default_rng(0)
    qmodel, _ = _converted(rng)
    x = rng.random((4, 1, 16, 16), np.float32)
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    spec = [paddle.static.InputSpec([None, 1, 16, 16], "float32", "x")]
    path = export_onnx(qmodel, str(tmp_path / "m.onnx"), spec)
    ran = {"ONNX Runtime": onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]}
    ip.ImperativePTQ().save_quantized_model(qmodel, tmp_path / "m", spec)
    ran["Paddle Inference"] = predict(create_predictor(tmp_path / "m"), x)[0]
    for runtime, output in ran.items():
        assert np.abs(output - simulated).max() <= 2e-6 * np.abs(simulated).max(), runtime


def test_each_folded_bias_is_on_its_accumulator_grid_and_barely_moved() -> None:
    """The folded bias (BatchNorm included) of every int8 conv is a whole number of input
    scale x weight scale units, less than half a unit from where calibration left it."""
    from imperative_ptq.quant_layers import QuantizedLayer

    rng = np.random.default_rng(0)
    qmodel, reference = _converted(rng)
    pairs = [("conv1", "norm1"), ("conv2", "norm2"), ("conv3", None), ("conv4", None)]
    for conv_name, norm_name in pairs:
        conv = getattr(qmodel, conv_name)
        assert isinstance(conv, QuantizedLayer)
        bias = conv.layer.bias.numpy().astype(np.float64)
        factor = np.ones_like(bias)
        folded, before = bias, getattr(reference, conv_name).bias.numpy().astype(np.float64)
        if norm_name is not None:
            norm, fp32_norm = getattr(qmodel, norm_name), getattr(reference, norm_name)
            factor = norm.weight.numpy() / np.sqrt(norm._variance.numpy() + norm._epsilon)
            folded = (bias - norm._mean.numpy()) * factor + norm.bias.numpy()
            before = (before - fp32_norm._mean.numpy()) * factor + fp32_norm.bias.numpy()
        step = float(conv.input_thresholds[0]) / 127 * conv.weight_thresholds.numpy() * np.abs(factor) / 127
        units = folded / step
        # (Up to the float32 the parameters are stored in: far from the half units where
        # ONNX Runtime's rounding of them to int32 could go either way.)
        assert np.abs(units - np.round(units)).max() < 0.02, conv_name
        assert np.all(np.abs(folded - before) <= 0.5 * step + 1e-7), conv_name
