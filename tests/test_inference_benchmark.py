"""benchmarks/inference.py's fp32 ONNX baseline computes the fp32 model.

ONNX Runtime's int8 speed-up is measured against an fp32 graph of the same converted model. It
was made by stripping the int8 graph's Q/DQ pairs, which left out whatever they stood for: since
a ReLU6 quantized on codes within 6 takes them from its input (export/onnx_export.py), the
stripped MobileNetV2 lost its ReLU6 clips (logit cosine 0.67 to the dygraph model) and its
timing meant nothing. The baseline is now the converted model put back in fp32 and exported.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import paddle
import paddle.nn as nn
import pytest

from models import converted

onnxruntime = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _inference_benchmark():
    spec = importlib.util.spec_from_file_location("inference", os.path.join(BENCHMARKS, "inference.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("inference", module)
    spec.loader.exec_module(module)
    return module


class _InvertedResidual(nn.Layer):
    """MobileNetV2's block shape: expand 1x1 + ReLU6, depthwise 3x3 + ReLU6, linear projection,
    residual add; a pooled Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2D(3, 8, 3, padding=1), nn.BatchNorm2D(8), nn.ReLU6())
        self.block = nn.Sequential(
            nn.Conv2D(8, 16, 1), nn.BatchNorm2D(16), nn.ReLU6(),
            nn.Conv2D(16, 16, 3, padding=1, groups=16), nn.BatchNorm2D(16), nn.ReLU6(),
            nn.Conv2D(16, 8, 1), nn.BatchNorm2D(8),
        )
        self.head = nn.Linear(8, 5)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = self.stem(x)
        return self.head((y + self.block(y)).mean([2, 3]))


class _BasicBlocks(nn.Layer):
    """ResNet's basic blocks, whose ReLU after the residual add the simulation holds on codes
    (Q/DQ pairs left in the graph after the layers are put back in fp32)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2D(3, 8, 3, padding=1), nn.BatchNorm2D(8), nn.ReLU())
        self.blocks = nn.LayerList([
            nn.Sequential(nn.Conv2D(8, 8, 3, padding=1), nn.BatchNorm2D(8), nn.ReLU(), nn.Conv2D(8, 8, 3, padding=1), nn.BatchNorm2D(8))
            for _ in range(2)
        ])
        self.head = nn.Linear(8, 5)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = self.stem(x)
        for block in self.blocks:
            y = nn.functional.relu(y + block(y))
        return self.head(y.mean([2, 3]))


@pytest.mark.parametrize("factory", [_InvertedResidual, _BasicBlocks])
def test_fp32_onnx_baseline_computes_the_fp32_model(factory, tmp_path) -> None:
    inference = _inference_benchmark()
    paddle.seed(0)
    model = factory()
    model.eval()
    rng = np.random.default_rng(0)
    # Inputs scaled up so that the ReLU6 outputs reach their clip.
    batches = [paddle.to_tensor(8 * rng.random([4, 3, 10, 10], dtype=np.float32)) for _ in range(3)]
    quantized = converted(model, batches, "x86")
    spec = [paddle.static.InputSpec([None, 3, 10, 10], "float32", "x")]
    path = inference.fp32_onnx(quantized, model, str(tmp_path / "fp32.onnx"), spec)
    kinds = {node.op_type for node in onnx.load(path).graph.node}
    assert not kinds & {"QuantizeLinear", "DequantizeLinear", "QLinearConv"}, kinds
    x = 8 * rng.random([2, 3, 10, 10], dtype=np.float32)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    ran = session.run(None, {session.get_inputs()[0].name: x})[0]
    with paddle.no_grad():
        expected = model(paddle.to_tensor(x)).numpy()
    np.testing.assert_allclose(ran, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    # The converted model is left as it was: still int8.
    assert any(type(layer).__name__ == "QuantizedLayer" for layer in quantized.sublayers())
