"""onnx_runtime_report: which convs/matmuls ONNX Runtime runs in integer kernels and which in
float, read from the graph it optimized."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.export import export_onnx, onnx_runtime_report

pytest.importorskip("onnxruntime")


def test_a_conv_before_a_float_activation_runs_in_float(tmp_path) -> None:
    """Two convs read by ReLUs run as QLinearConv; the 1x1 conv whose output a Sigmoid reads
    (the simulation's float output) runs as a float conv on its dequantized weight; the
    logits Linear in integer sums with a float output."""
    paddle.seed(0)
    model = paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.ReLU(),
        paddle.nn.Conv2D(8, 8, 3, padding=1), paddle.nn.ReLU(),
        paddle.nn.Conv2D(8, 8, 1), paddle.nn.Sigmoid(),
        paddle.nn.Flatten(), paddle.nn.Linear(8 * 8 * 8, 10),
    ).eval()
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(model)
    rng = np.random.default_rng(0)
    for _ in range(2):
        qmodel(paddle.to_tensor(rng.random((4, 3, 8, 8), dtype=np.float32)))
    ptq.convert(qmodel)
    path = export_onnx(qmodel, tmp_path / "m.onnx", [paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")])
    report = onnx_runtime_report(path)
    assert report.integer == {"QLinearConv": 2, "MatMulIntegerToFloat": 1}
    assert sum(report.float.values()) == 1 and set(report.float) <= {"Conv", "FusedConv"}
    assert report.summary().startswith("ONNX Runtime runs 3 convs/matmuls in integer kernels")


def test_missing_file_is_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no ONNX file at"):
        onnx_runtime_report(tmp_path / "absent.onnx")
