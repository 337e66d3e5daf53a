"""Channels-last (``data_format="NHWC"``) models run in Paddle Inference and ONNX Runtime:
Paddle 3.3.1's oneDNN kernels get NHWC convs, batch norms and pools wrong (a plain
``paddle.jit.save`` program of an NHWC conv fails there), and ONNX's ``Conv`` and pools read
NCHW only, so every export runs them on NCHW between transposes
(``graph.channels_last_to_first``)."""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from imperative_ptq.export import create_predictor, export_onnx, int8_report, predict, save_fp32_model, save_quantized_model
from models import X86_TARGETS, converted, largest_error_in_onnx_runtime, largest_error_in_paddle_inference
from ties import relative_error, simulation_up_to_ties

SIZE = 16
SPEC = [paddle.static.InputSpec([None, SIZE, SIZE, 3], "float32", "x")]


class ChannelsLast(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        nn = paddle.nn
        self.stem = nn.Conv2D(3, 8, 3, padding=1, data_format="NHWC")
        self.norm = nn.BatchNorm2D(8, data_format="NHWC")
        self.max_pool = nn.MaxPool2D(2, data_format="NHWC")
        self.pointwise = nn.Conv2D(8, 8, 1, data_format="NHWC")
        self.average_pool = nn.AvgPool2D(2, data_format="NHWC")
        self.depthwise = nn.Conv2D(8, 8, 3, padding=1, groups=8, data_format="NHWC")
        self.uneven_pool = nn.AdaptiveAvgPool2D(3, data_format="NHWC")  # 4 -> 3: bins of 1 and 2
        self.head = nn.Linear(8 * 10, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = self.max_pool(F.relu(self.norm(self.stem(x))))
        y = self.average_pool(F.relu(self.pointwise(y)))
        y = F.relu(self.depthwise(y))
        pooled = [F.adaptive_avg_pool2d(y, 1, data_format="NHWC").flatten(1), self.uneven_pool(y).flatten(1)]
        return self.head(paddle.concat(pooled, axis=1))


def _model_and_batch() -> tuple[paddle.nn.Layer, np.ndarray]:
    paddle.seed(0)
    model = ChannelsLast()
    model.eval()
    return model, np.random.default_rng(0).random([4, SIZE, SIZE, 3], dtype=np.float32)


def test_fp32_export_runs_in_paddle_inference(tmp_path) -> None:
    model, x = _model_and_batch()
    prefix = str(tmp_path / "fp32")
    save_fp32_model(model, prefix, SPEC)
    ran = predict(create_predictor(prefix, int8=False, num_threads=1), x)[0]
    np.testing.assert_allclose(ran, model(paddle.to_tensor(x)).numpy(), atol=1e-5)


def test_int8_export_runs_int8_as_simulated(tmp_path, avx2_runner) -> None:
    model, x = _model_and_batch()
    rng = np.random.default_rng(1)
    quantized = converted(model, [paddle.to_tensor(rng.random([4, SIZE, SIZE, 3], dtype=np.float32)) for _ in range(3)])
    simulated = quantized(paddle.to_tensor(x)).numpy()
    prefix = str(tmp_path / "int8")
    save_quantized_model(quantized, prefix, SPEC)
    assert int8_report(prefix).int8 == {"fc": 1, "fused_conv2d": 3}
    bound = 1e-5 * np.abs(simulated).max()
    np.testing.assert_allclose(predict(create_predictor(prefix, num_threads=1), x)[0], simulated, atol=bound)
    if avx2_runner is not None:
        np.testing.assert_allclose(avx2_runner.predict(prefix, x)[0], simulated, atol=bound)


@pytest.mark.parametrize("target", [*X86_TARGETS, "arm"])
def test_onnx_export_runs_as_simulated(tmp_path, target) -> None:
    """Before the ONNX export ran NHWC ops on NCHW, its graph added an NHWC conv's bias along
    NCHW's channel axis (ONNX Runtime refused to load it: "Incompatible dimensions") and its
    pools read NHWC as NCHW."""
    onnxruntime = pytest.importorskip("onnxruntime")
    model, x = _model_and_batch()
    rng = np.random.default_rng(1)
    batches = [paddle.to_tensor(rng.standard_normal([4, SIZE, SIZE, 3]).astype(np.float32)) for _ in range(3)]
    quantized = converted(model, batches, target)
    path = export_onnx(quantized, str(tmp_path / "m.onnx"), SPEC)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    ran = session.run(None, {session.get_inputs()[0].name: x})[0]
    simulated, _ = simulation_up_to_ties(lambda: quantized(paddle.to_tensor(x)).numpy(), ran, 1e-5)
    assert relative_error(ran, simulated) < 1e-5


class _ChannelsLastResizes(paddle.nn.Layer):
    """An NHWC feature pyramid's resizes: nearest and bilinear upsampling between NHWC convs."""

    def __init__(self) -> None:
        super().__init__()
        nn = paddle.nn
        self.down = nn.Conv2D(3, 8, 3, stride=2, padding=1, data_format="NHWC")
        self.nearest = nn.Upsample(scale_factor=2, mode="nearest", data_format="NHWC")
        self.bilinear = nn.Upsample(scale_factor=2, mode="bilinear", data_format="NHWC")
        self.head = nn.Conv2D(16, 4, 1, data_format="NHWC")

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = F.relu(self.down(x))
        return self.head(paddle.concat([self.nearest(y), self.bilinear(y)], axis=-1))


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_channels_last_resizes_run_in_both_runtimes(target, tmp_path) -> None:
    """Paddle Inference ran the NHWC resize as NCHW and handed the next conv its width as
    channels ("The number of input's channels should be equal to filter's channels *
    groups"), the fp32 export too; ONNX refused it."""
    paddle.seed(0)
    model = _ChannelsLastResizes()
    model.eval()
    x = np.random.default_rng(0).random([2, SIZE, SIZE, 3], dtype=np.float32)
    prefix = str(tmp_path / "fp32")
    save_fp32_model(model, prefix, SPEC)
    ran = predict(create_predictor(prefix, int8=False, num_threads=1), x)[0]
    np.testing.assert_allclose(ran, model(paddle.to_tensor(x)).numpy(), atol=1e-5)
    rng = np.random.default_rng(1)
    quantized = converted(model, [paddle.to_tensor(rng.random([4, SIZE, SIZE, 3], dtype=np.float32)) for _ in range(3)], target)
    assert largest_error_in_paddle_inference(quantized, x, tmp_path) < 2e-6
    assert largest_error_in_onnx_runtime(quantized, x, tmp_path) < 2e-6
