"""ONNX Runtime on the x86 target: u8 inputs on codes 0..127 clipped at their threshold as the
simulation clips them (a ReLU's values above a KL threshold once reached codes up to 255), and
a head's global pool averaging u8 codes like the simulation's int8 pool."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.export import export_onnx
from models import converted

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
nn = paddle.nn


def _net() -> nn.Layer:
    return nn.Sequential(
        nn.Conv2D(3, 8, 3, padding=1), nn.BatchNorm2D(8), nn.ReLU(),
        nn.Conv2D(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2D(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2D(1), nn.Flatten(), nn.Linear(16, 10),
    )


def test_onnx_runtime_clips_relu_codes_and_pools_codes_as_simulated(tmp_path) -> None:
    paddle.seed(0)
    model = _net()
    model.eval()
    rng = np.random.default_rng(0)
    # KL thresholds clip the ReLU outputs' tails: the values above them are where ONNX Runtime
    # and the simulation parted (codes 128..255 against 127).
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(model)
    for _ in range(3):
        qmodel(paddle.to_tensor(rng.random((4, 3, 16, 16)).astype("float32")))
    ptq.convert(qmodel)
    assert any(isinstance(layer, ip.quant_pool.QuantizedGlobalAveragePool) for layer in qmodel.sublayers())
    x = rng.random((4, 3, 16, 16)).astype("float32")
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    path = export_onnx(qmodel, str(tmp_path / "m.onnx"), [paddle.static.InputSpec([None, 3, 16, 16], "float32", "x")])
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    ran = session.run(None, {"x": x})[0]
    # Measured 0.0 (2.3% before: the ReLU codes unclipped, the pool averaging floats, and the
    # ReLU output quantized on its own grid before the pool re-quantized it).
    assert np.abs(ran - simulated).max() <= 1e-5 * np.abs(simulated).max()
    # The clip goes after the conv's own quantize op: the convs still fuse into QLinearConv.
    kinds = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    assert kinds.count("QLinearConv") == 3, kinds


class _ReadAlsoByElementwiseOps(nn.Layer):
    """A ReLU output that a 1x1 conv reads and that an add and a multiply read too, as an
    inverted-residual block's identity add or a gate does (no calibrated layer reads the sum)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2D(3, 8, 3, padding=1)
        self.project = nn.Conv2D(8, 8, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = nn.functional.relu(self.conv(x))
        return (h + self.project(h)) * h


def test_elementwise_ops_read_the_float_value_of_an_int8_layer_input(tmp_path) -> None:
    paddle.seed(0)
    rng = np.random.default_rng(0)
    # KL clips the ReLU output's tail, which the conv reads clipped and the add and multiply
    # read whole in the simulation.
    qmodel = converted(
        _ReadAlsoByElementwiseOps(),
        [paddle.to_tensor(rng.random((4, 3, 16, 16)).astype("float32")) for _ in range(3)],
    )
    x = rng.random((4, 3, 16, 16)).astype("float32")
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    path = export_onnx(qmodel, str(tmp_path / "m.onnx"), [paddle.static.InputSpec([None, 3, 16, 16], "float32", "x")])
    ran = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    error = np.abs(ran - simulated).max() / np.abs(simulated).max()
    assert error <= 1e-5, error
