"""A grayscale stem in ONNX Runtime: the conv over one input channel, and the max-pool after it.

ONNX Runtime's ``QLinearConv`` over a single input channel took 2.3-4.7x the time of its float
``Conv`` on the same values, so that conv is exported as a float Conv on the simulation's input
codes with the filter's dequantized values. The max-pool after it then read codes written by a
float op: ONNX Runtime moved the DequantizeLinear in front of it behind it and ran the pool on
uint8 in NCHW, a generic kernel 5-8x slower than its float one; an identity Clip in front of
the pool keeps it float. (LeNet at batch 64 in ONNX Runtime: 0.28x -> 0.64x its fp32 speed.)
"""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn as nn
import pytest

from imperative_ptq.export import export_onnx
from models import converted
from ties import relative_error, simulation_up_to_ties

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
numpy_helper = pytest.importorskip("onnx.numpy_helper")


def _lenet() -> nn.Layer:
    return nn.Sequential(
        nn.Conv2D(1, 6, 5, padding=2), nn.BatchNorm2D(6), nn.ReLU(), nn.MaxPool2D(2, 2),
        nn.Conv2D(6, 16, 5), nn.ReLU(), nn.MaxPool2D(2, 2), nn.Flatten(), nn.Linear(400, 10),
    )


def _optimized(path: str, tmp_path, x: np.ndarray) -> tuple[np.ndarray, onnx.ModelProto]:
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    ran = session.run(None, {session.get_inputs()[0].name: x})[0]
    return ran, onnx.load(options.optimized_model_filepath)


def _pools_on_codes(model: onnx.ModelProto) -> list[bool]:
    """For each MaxPool of an optimized model, in order: whether it reads integer codes (a
    QuantizeLinear's output, or a Clip of codes)."""
    integer_constants = {
        initializer.name for initializer in model.graph.initializer
        if numpy_helper.to_array(initializer).dtype in (np.uint8, np.int8)
    }
    writers = {name: node for node in model.graph.node for name in node.output}

    def on_codes(name: str) -> bool:
        node = writers.get(name)
        if node is None:
            return False
        if node.op_type == "QuantizeLinear":
            return True
        return node.op_type == "Clip" and len(node.input) > 1 and node.input[1] in integer_constants

    return [on_codes(node.input[0]) for node in model.graph.node if node.op_type == "MaxPool"]


def test_single_channel_stem_runs_in_float_and_its_pool_too(tmp_path) -> None:
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.random([8, 1, 28, 28], dtype=np.float32)) for _ in range(3)]
    quantized = converted(_lenet(), batches, "x86")
    spec = [paddle.static.InputSpec([None, 1, 28, 28], "float32", "x")]
    path = export_onnx(quantized, str(tmp_path / "lenet.onnx"), spec)

    written = onnx.load(path)
    float_filters = {
        initializer.name for initializer in written.graph.initializer
        if initializer.data_type == onnx.TensorProto.FLOAT and len(initializer.dims) == 4
    }
    convs = [node for node in written.graph.node if node.op_type == "Conv"]
    assert convs[0].input[1] in float_filters  # the stem: the values DequantizeLinear computes
    assert convs[1].input[1] not in float_filters  # 6 input channels: int8 storage

    x = rng.random([16, 1, 28, 28], dtype=np.float32)
    ran, optimized = _optimized(path, tmp_path, x)
    kinds = [node.op_type for node in optimized.graph.node]
    assert kinds.count("QLinearConv") == 1, kinds  # the second conv only
    assert _pools_on_codes(optimized)[0] is False, kinds  # the pool after the stem: float
    simulated, _ = simulation_up_to_ties(lambda: quantized(paddle.to_tensor(x)).numpy(), ran, 1e-5)
    assert relative_error(ran, simulated) < 1e-5


def test_pool_behind_an_integer_conv_keeps_running_on_codes(tmp_path) -> None:
    """Behind a QLinearConv the pool stays on codes (ONNX Runtime's NHWC kernel, fast): no
    Clip is put in front of it."""
    paddle.seed(1)
    rng = np.random.default_rng(1)
    model = nn.Sequential(
        nn.Conv2D(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2D(8, 16, 3, padding=1), nn.ReLU(),
        nn.MaxPool2D(2, 2), nn.Conv2D(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10),
    )
    batches = [paddle.to_tensor(rng.random([4, 3, 16, 16], dtype=np.float32)) for _ in range(3)]
    quantized = converted(model, batches, "x86")
    spec = [paddle.static.InputSpec([None, 3, 16, 16], "float32", "x")]
    path = export_onnx(quantized, str(tmp_path / "net.onnx"), spec)
    written = onnx.load(path)
    pool = next(node for node in written.graph.node if node.op_type == "MaxPool")
    writers = {name: node for node in written.graph.node for name in node.output}
    assert writers[pool.input[0]].op_type == "DequantizeLinear"
    x = rng.random([4, 3, 16, 16], dtype=np.float32)
    ran, optimized = _optimized(path, tmp_path, x)
    kinds = [node.op_type for node in optimized.graph.node]
    assert kinds.count("QLinearConv") == 3, kinds
    simulated, _ = simulation_up_to_ties(lambda: quantized(paddle.to_tensor(x)).numpy(), ran, 1e-5)
    assert relative_error(ran, simulated) < 1e-5
