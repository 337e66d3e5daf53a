"""A grayscale stem in ONNX Runtime: the conv over one input channel, and the max-pool after it.

ONNX Runtime's ``QLinearConv`` over a single input channel took 2.3-4.7x the time of its float
``Conv`` on the same values, so that conv is exported as a float Conv on the simulation's input
codes with the filter's dequantized values. The max-pool after it then read codes written by a
float op: ONNX Runtime moved the DequantizeLinear in front of it behind it and ran the pool on
uint8 in NCHW, a generic kernel 5-8x slower than its float one; an identity Clip in front of
the pool keeps it float (and one behind it where a QuantizeLinear on the same grid reads it,
which ONNX Runtime otherwise dropped with the DequantizeLinear in front: SqueezeNet's and
GoogLeNet's pools after concats). LeNet at batch 64 in ONNX Runtime: 0.28x -> 0.85x its fp32.
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


def _exported(build, shape: list[int], seed: int, tmp_path) -> tuple[nn.Layer, str, np.random.Generator]:
    """``build()`` converted for ``x86`` on three random batches of ``shape`` and exported to
    ONNX; the converted model, the file and the random generator, for the test's input."""
    paddle.seed(seed)
    rng = np.random.default_rng(seed)
    batches = [paddle.to_tensor(rng.random(shape, dtype=np.float32)) for _ in range(3)]
    quantized = converted(build(), batches, "x86")
    spec = [paddle.static.InputSpec([None, *shape[1:]], "float32", "x")]
    return quantized, export_onnx(quantized, str(tmp_path / "model.onnx"), spec), rng


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
    quantized, path, rng = _exported(_lenet, [8, 1, 28, 28], 0, tmp_path)

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


class _FireModules(nn.Layer):
    """SqueezeNet's pattern: the concat of two ReLU convs, max-pooled into an int8 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2D(3, 8, 1), nn.ReLU())
        self.left, self.right = nn.Conv2D(8, 8, 1), nn.Conv2D(8, 8, 3, padding=1)
        self.pool = nn.MaxPool2D(3, 2)
        self.next = nn.Sequential(nn.Conv2D(16, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2D(1), nn.Flatten())

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        squeezed = self.squeeze(x)
        joined = paddle.concat([nn.functional.relu(self.left(squeezed)), nn.functional.relu(self.right(squeezed))], 1)
        return self.next(self.pool(joined))


def test_a_pool_of_float_written_codes_read_by_a_quantize_stays_float(tmp_path) -> None:
    """A pool between a QuantizeLinear of a float op's output (a concat) and the next layer's
    QuantizeLinear on the same grid: ONNX Runtime dropped the pair around it and ran it on
    uint8 in NCHW (SqueezeNet 1.1 in ONNX Runtime, batch 1: 0.53x -> 0.69x its fp32, GoogLeNet
    0.64x -> 0.86x with Clips on both sides of the pool)."""
    quantized, path, rng = _exported(_FireModules, [4, 3, 24, 24], 2, tmp_path)
    x = rng.random([8, 3, 24, 24], dtype=np.float32)
    ran, optimized = _optimized(path, tmp_path, x)
    assert _pools_on_codes(optimized) == [False], [node.op_type for node in optimized.graph.node]
    simulated, _ = simulation_up_to_ties(lambda: quantized(paddle.to_tensor(x)).numpy(), ran, 1e-5)
    assert relative_error(ran, simulated) < 1e-5
