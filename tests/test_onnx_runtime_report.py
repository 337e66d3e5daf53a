"""onnx_runtime_report: which convs/matmuls ONNX Runtime runs in integer kernels and which in
float, read from the graph it optimized."""

from __future__ import annotations

import logging

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.export import export_onnx, onnx_runtime_report

pytest.importorskip("onnxruntime")


def _converted(model: paddle.nn.Layer) -> paddle.nn.Layer:
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(model.eval())
    rng = np.random.default_rng(0)
    for _ in range(2):
        qmodel(paddle.to_tensor(rng.random((4, 3, 8, 8), dtype=np.float32)))
    ptq.convert(qmodel)
    return qmodel


SPEC = [paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")]


def test_export_warns_where_onnx_runtime_runs_no_integer_kernel(tmp_path, caplog) -> None:
    """Convs each read by a SiLU (a YOLO-style block): ONNX Runtime runs all of them as float
    convs on dequantized weights, which export_onnx said nothing of (a real YOLOX-style
    detector: 0 of 83 convs in integer kernels, 0.76-0.87x its fp32)."""
    paddle.seed(0)
    silu_net = paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.Silu(), paddle.nn.Conv2D(8, 8, 1), paddle.nn.Silu(),
    )
    with caplog.at_level(logging.INFO, logger="imperative_ptq"):
        export_onnx(_converted(silu_net), tmp_path / "silu.onnx", SPEC)
    assert "ONNX Runtime runs 0 convs/matmuls in integer kernels" in caplog.text
    assert "ONNX Runtime runs none of the 2 convs/matmuls of" in caplog.text
    caplog.clear()
    relu_net = paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.ReLU(), paddle.nn.Conv2D(8, 8, 1), paddle.nn.ReLU(),
        paddle.nn.Conv2D(8, 4, 1),
    )
    with caplog.at_level(logging.INFO, logger="imperative_ptq"):
        export_onnx(_converted(relu_net), tmp_path / "relu.onnx", SPEC)
    assert "convs/matmuls in integer kernels (2 QLinearConv)" in caplog.text
    assert "runs none of" not in caplog.text and "runs only" not in caplog.text
    caplog.clear()
    # Fewer than half in integer kernels warns too (a layout detector, 2 of 102: 0.87x fp32).
    mostly_float = paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.ReLU(), paddle.nn.Conv2D(8, 8, 1), paddle.nn.PReLU(8),
        paddle.nn.Conv2D(8, 8, 1), paddle.nn.Silu(), paddle.nn.Conv2D(8, 8, 1), paddle.nn.Hardswish(),
    )
    with caplog.at_level(logging.INFO, logger="imperative_ptq"):
        export_onnx(_converted(mostly_float), tmp_path / "mostly_float.onnx", SPEC)
    assert "ONNX Runtime runs only 1 of the 4 convs of" in caplog.text, caplog.text


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
