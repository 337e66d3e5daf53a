"""benchmarks/onnx_models.py: a model with HardSwish (which x2paddle 1.6.0 converts only after
``load_onnx_model``'s rewrite, checked in test_onnx_import.py) runs through the benchmark's
engines."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
SCRIPT = os.path.join(BENCHMARKS, "onnx_models.py")


def _hardswish_net(path: str) -> None:
    """Conv -> HardSwish -> Conv -> HardSwish, opset 14 (the first with HardSwish); the convs
    name their kernel shapes, which x2paddle reads."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    first = numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "w1")
    second = numpy_helper.from_array(rng.normal(0, 0.5, (4, 8, 1, 1)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["c1"], ["h1"]),
        helper.make_node("Conv", ["h1", "w2"], ["c2"], kernel_shape=[1, 1]),
        helper.make_node("HardSwish", ["c2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "hardswish_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [first, second],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), path)


def test_benchmark_runs_on_a_model_with_hardswish(tmp_path) -> None:
    pytest.importorskip("x2paddle", reason="x2paddle not installed (extra 'test')")
    path = str(tmp_path / "net.onnx")
    _hardswish_net(path)
    result = subprocess.run(
        [sys.executable, SCRIPT, path, "--shape", "1,3,8,8", "--targets", "x86", "--rounds", "1", "--iters", "1",
         "--calibration-batches", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [row.split(" | ")[0] for row in rows] == [
        "| Paddle Inference fp32", "| ONNX Runtime fp32", "| Paddle Inference int8 x86", "| ONNX Runtime int8 x86",
    ]
