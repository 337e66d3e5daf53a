"""A signed 8-bit activation below ``-t`` saturates at code -128 in oneDNN and ONNX Runtime,
not at Paddle's symmetric -127: the x86 simulation follows the runtimes. The ``arm`` target
(Paddle Lite) keeps -127, and its ONNX export clips there too."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.export import create_predictor, export_onnx, predict
from imperative_ptq.quant_layers import fake_quantize_symmetric, signed_input_floor


def test_signed_floor_is_minus_128_on_onednn_targets_only() -> None:
    assert signed_input_floor(8, onednn=True) == -128
    assert signed_input_floor(8, onednn=False) is None  # Paddle Lite: -127..127
    assert signed_input_floor(4, onednn=True) is None
    x = paddle.to_tensor(np.array([-5.0, -1.004, -1.0, 0.3, 2.0], np.float32))
    got = fake_quantize_symmetric(x, paddle.to_tensor([1.0]), 8, lowest_code=-128).numpy()
    codes = np.clip(np.round(x.numpy().astype(np.float64) * 127), -128, 127)
    np.testing.assert_allclose(got, codes / 127, rtol=1e-6)


class _Attention(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = paddle.nn.Linear(16, 16), paddle.nn.Linear(16, 16)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.matmul(self.q(x), self.k(x), transpose_y=True)


def _run(
    model: paddle.nn.Layer, shape: list[int], tmp_path, runtime: str, target: str = "x86-vnni"
) -> float:
    """Largest |runtime - simulation| on inputs three times wider than calibration's, relative
    to the largest output."""
    paddle.seed(0)
    model.eval()
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=target))
    qmodel = ptq.quantize(model)
    qmodel(paddle.randn(shape))
    ptq.convert(qmodel)
    x = paddle.randn(shape) * 3  # far below -t: the saturating codes
    simulated = qmodel(x).numpy()
    spec = [paddle.static.InputSpec([None, *shape[1:]], "float32", "x")]
    if runtime == "paddle":
        prefix = str(tmp_path / "m")
        ptq.save_quantized_model(qmodel, prefix, spec)
        ran = predict(create_predictor(prefix, num_threads=1), x.numpy())[0]
    else:
        onnxruntime = pytest.importorskip("onnxruntime")
        path = export_onnx(qmodel, str(tmp_path / "m.onnx"), spec)
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        ran = session.run(None, {"x": x.numpy()})[0]
    return float(np.abs(ran - simulated).max() / np.abs(simulated).max())


@pytest.mark.parametrize("runtime", [
    pytest.param("paddle", marks=pytest.mark.skipif(not ip.cpu_info().vnni, reason="x86-vnni needs VNNI")),
    "onnxruntime",
])
@pytest.mark.parametrize("kind", ["linear", "attention"])
def test_x86_vnni_runtimes_saturate_signed_inputs_as_simulated(kind, runtime, tmp_path) -> None:
    if kind == "linear":
        error = _run(paddle.nn.Sequential(paddle.nn.Linear(16, 8)), [32, 16], tmp_path, runtime)
    else:
        error = _run(_Attention(), [8, 4, 16], tmp_path, runtime)
    # Measured <= 1e-7 (with -127: 0.3-0.4% on the Linear, 1.3% on the attention scores).
    assert error <= 1e-5, error


@pytest.mark.parametrize("kind", ["linear", "attention"])
def test_arm_onnx_export_keeps_signed_inputs_on_the_symmetric_grid(kind, tmp_path) -> None:
    if kind == "linear":
        error = _run(paddle.nn.Sequential(paddle.nn.Linear(16, 8)), [32, 16], tmp_path, "onnxruntime", "arm")
    else:
        error = _run(_Attention(), [8, 4, 16], tmp_path, "onnxruntime", "arm")
    # Measured 0 / 1.6e-7 (with uint8 zero point 128's code -128: 0.44% of the largest
    # output on the Linear, 1.3% on the attention scores).
    assert error <= 1e-5, error
