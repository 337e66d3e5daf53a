"""BatchNorms without a scale or shift (``weight_attr=False, bias_attr=False``: the normalized
face embedding of AdaFace's IR nets). Paddle 3.3.1's oneDNN ``batch_norm`` kernel crashed the
process at the first run (a segmentation fault, Paddle's own ``paddle.jit.save`` program too)
and the ONNX export failed; the exports now give them ones and zeros as parameters
(``export.graph.complete_batch_norm_parameters``)."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.export import create_predictor, export_onnx, predict, save_quantized_model
from imperative_ptq.export.paddle_export import save_fp32_model
from models import converted, largest_error_in_paddle_inference, randomize_batch_norm_statistics

nn = paddle.nn
SHAPE = [3, 8, 8]


class _Embedding(nn.Layer):
    """A conv, an affine-free BatchNorm2D, a Linear and an affine-free BatchNorm1D."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2D(3, 8, 3, padding=1)
        self.norm2d = nn.BatchNorm2D(8, weight_attr=False, bias_attr=False)
        self.fc = nn.Linear(8 * 8 * 8, 16)
        self.norm1d = nn.BatchNorm1D(16, weight_attr=False, bias_attr=False)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = self.norm2d(nn.functional.relu(self.conv(x)))
        return self.norm1d(self.fc(y.flatten(1)))


def _model() -> _Embedding:
    paddle.seed(0)
    model = _Embedding()
    randomize_batch_norm_statistics(model, 0)
    model.eval()
    return model


def _batches(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal([2, *SHAPE]).astype("float32") for _ in range(count)]


def _spec() -> list[paddle.static.InputSpec]:
    return [paddle.static.InputSpec([None, *SHAPE], "float32", "x")]


def test_the_int8_export_runs_as_simulated_in_both_runtimes(tmp_path) -> None:
    *calibration, x = _batches(4)
    qmodel = converted(_model(), [paddle.to_tensor(batch) for batch in calibration])
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) <= 2e-6
    onnxruntime = pytest.importorskip("onnxruntime")
    path = export_onnx(qmodel, str(tmp_path / "m.onnx"), _spec())
    ran = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    assert np.abs(ran - simulated).max() <= 2e-6 * np.abs(simulated).max()


def test_the_fp32_and_dynamic_exports_run(tmp_path) -> None:
    (x,) = _batches(1)
    model = _model()
    expected = model(paddle.to_tensor(x)).numpy()
    save_fp32_model(model, str(tmp_path / "fp32"), _spec())
    ran = predict(create_predictor(str(tmp_path / "fp32"), int8=False), x)[0]
    assert np.abs(ran - expected).max() <= 1e-5 * np.abs(expected).max()
    dynamic = ip.quantize_dynamic(model)
    save_quantized_model(dynamic, str(tmp_path / "dynamic"), _spec())
    ran = predict(create_predictor(str(tmp_path / "dynamic"), int8=False), x)[0]
    # Paddle Inference computes in fp32 with the int8 weights dequantized.
    model.fc.weight.set_value(dynamic.fc.dequantized_weight())
    weight_only = model(paddle.to_tensor(x)).numpy()
    assert np.abs(ran - weight_only).max() <= 1e-5 * np.abs(weight_only).max()
