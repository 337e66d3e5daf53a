"""A division whose dividend is smaller than the divisor (T5's and LLaMA's RMSNorm as x2paddle
writes ONNX's ``Div(1, sqrt(...))``) runs in Paddle's CPU kernel: Paddle 3.3.1's oneDNN
``elementwise_div`` broadcasts such a dividend wrongly, fp32 alike."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.export import create_predictor, predict, save_fp32_model
from imperative_ptq.export.predictor import divisions_paddle_misbroadcasts, program_desc


class _RMSNormHead(paddle.nn.Layer):
    """A Linear, an RMSNorm written ``w * (x * (1 / sqrt(mean(x^2) + eps)))`` and a Linear."""

    def __init__(self, reciprocal: bool = True) -> None:
        super().__init__()
        self.reciprocal = reciprocal
        self.fc, self.head = paddle.nn.Linear(32, 32), paddle.nn.Linear(32, 8)
        self.scale = self.create_parameter([32], default_initializer=paddle.nn.initializer.Uniform(0.5, 1.5))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = self.fc(x)
        rms = paddle.sqrt(paddle.mean(y * y, axis=-1, keepdim=True) + paddle.full([1], 1e-6))
        normed = y * paddle.divide(paddle.full([1], 1.0), rms) if self.reciprocal else paddle.divide(y, rms)
        return self.head(self.scale * normed)


def _inputs(seed: int) -> np.ndarray:
    # rows of very different scales, so a misplaced reciprocal shows
    rng = np.random.default_rng(seed)
    return (rng.standard_normal([1, 16, 32]) * np.linspace(0.2, 3.0, 16)[None, :, None]).astype(np.float32)


def _model(reciprocal: bool = True) -> paddle.nn.Layer:
    paddle.seed(0)
    model = _RMSNormHead(reciprocal)
    model.eval()
    return model


def test_the_misbroadcast_division_is_recognized(tmp_path) -> None:
    spec = [paddle.static.InputSpec([1, 16, 32], "float32", "x")]
    for reciprocal, expected in ((True, True), (False, False)):
        prefix = str(tmp_path / f"m{reciprocal}")
        save_fp32_model(_model(reciprocal), prefix, input_spec=spec)
        assert divisions_paddle_misbroadcasts(program_desc(prefix + ".pdmodel")) is expected


@pytest.mark.parametrize("target", ["x86", "x86-vnni"])
def test_fp32_and_int8_programs_compute_the_division(target: str, tmp_path) -> None:
    """Measured before: fp32 Paddle Inference 9.9x this net's largest output off dygraph; a
    T5 encoder converted from ONNX 4-6x off its simulation in fp32 and int8."""
    model = _model()
    spec = [paddle.static.InputSpec([1, 16, 32], "float32", "x")]
    x = _inputs(1)
    save_fp32_model(model, str(tmp_path / "fp32"), input_spec=spec)
    expected = model(paddle.to_tensor(x)).numpy()
    ran = predict(create_predictor(str(tmp_path / "fp32"), int8=False), x)[0]
    assert np.abs(ran - expected).max() <= 1e-5 * np.abs(expected).max()
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=target))
    quantized = ptq.quantize(model)
    ptq.calibrate(quantized, [_inputs(seed) for seed in range(2, 6)], progress=False)
    ptq.convert(quantized)
    ptq.save_quantized_model(quantized, str(tmp_path / "int8"), input_spec=spec)
    simulated = quantized(paddle.to_tensor(x)).numpy()
    ran = predict(create_predictor(str(tmp_path / "int8")), x)[0]
    assert np.abs(ran - simulated).max() <= 1e-5 * np.abs(simulated).max()
