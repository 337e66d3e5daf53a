"""Layers sharing one weight parameter (``b.weight = a.weight``): each calibrated layer is
quantized on a copy of its own. On the shared parameter the second layer quantized what the
first had put there, and the export (which finds a layer's ops by its weight's name) applied
one layer's record to both: 0.86 of the largest output off the simulation in Paddle
Inference, 1.2e-2 once the export alone copied the weight."""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

import imperative_ptq as ip
from imperative_ptq.export import create_predictor, predict
from models import converted, largest_error_in_onnx_runtime, largest_error_in_paddle_inference


class _TiedLayers(paddle.nn.Layer):
    """Two Linear layers on one weight (the first reads a signed input, the second a ReLU
    output), and two convs on one weight (a padded one reading the signed network input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = paddle.nn.Conv2D(4, 4, 3, padding=1)
        self.conv_b = paddle.nn.Conv2D(4, 4, 3, padding=1)
        self.conv_b.weight = self.conv_a.weight
        self.a, self.b = paddle.nn.Linear(64, 64), paddle.nn.Linear(64, 64)
        self.b.weight = self.a.weight
        self.head = paddle.nn.Linear(64, 5)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = self.conv_b(F.relu(self.conv_a(x))).flatten(1)
        return self.head(F.relu(self.b(F.relu(self.a(h)))))


def _batches(count: int, seed: int) -> list[paddle.Tensor]:
    rng = np.random.default_rng(seed)
    return [paddle.to_tensor(rng.standard_normal((4, 4, 4, 4)).astype(np.float32)) for _ in range(count)]


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_layers_sharing_a_weight_export_what_the_simulation_computes(target, tmp_path) -> None:
    paddle.seed(4)
    model = _TiedLayers()
    model.eval()
    qmodel = converted(model, _batches(4, 0), target)
    assert model.b.weight is model.a.weight and model.conv_b.weight is model.conv_a.weight  # untouched
    quantized = {name: layer for name, layer in qmodel.named_sublayers() if isinstance(layer, ip.QuantizedLayer)}
    assert {"a", "b"} <= set(quantized)
    assert quantized["a"].layer.weight is not quantized["b"].layer.weight
    x = _batches(1, 7)[0]
    simulated = qmodel(x).numpy()
    reference = model(x).numpy().ravel()
    assert simulated.ravel() @ reference / np.linalg.norm(simulated) / np.linalg.norm(reference) > 0.99
    assert largest_error_in_paddle_inference(qmodel, x.numpy(), tmp_path) < 2e-6
    assert largest_error_in_onnx_runtime(qmodel, x.numpy(), tmp_path) < 2e-6


class _TiedAutoencoder(paddle.nn.Layer):
    """A decoder multiplying by the quantized encoder Linear's weight, transposed."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = paddle.nn.Linear(20, 8)
        self.decoder_bias = self.create_parameter([20], is_bias=True)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        code = F.relu(self.encoder(x))
        return F.linear(code, self.encoder.weight.T, self.decoder_bias)


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_a_weight_read_transposed_beside_its_int8_layer(target, tmp_path) -> None:
    """The transpose read the weight variable the export had made int8, which Paddle
    Inference dequantized in place: 7.8e-2 .. 0.13 of the largest output off the simulation
    (and int8=False predictors refused the program)."""
    paddle.seed(8)
    model = _TiedAutoencoder()
    model.eval()
    rng = np.random.default_rng(8)
    batches = [paddle.to_tensor(rng.standard_normal((4, 20)).astype(np.float32)) for _ in range(4)]
    qmodel = converted(model, batches, target)
    assert isinstance(qmodel.encoder, ip.QuantizedLayer)
    x = rng.standard_normal((4, 20)).astype(np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) < 2e-6
    predict(create_predictor(str(tmp_path / "m"), int8=False), x)  # loads and runs
    assert largest_error_in_onnx_runtime(qmodel, x, tmp_path) < 2e-6
