"""Small spatial filters of convs that ONNX Runtime runs in float are stored as float32.

ONNX Runtime fuses a conv into ``QLinearConv`` only where a QuantizeLinear follows it; a conv
before a Hardswish, a Swish or a float multiply runs in float on its dequantized input and
filter. A spatial filter (not 1x1) of few values per output channel (a depthwise conv, a stem
conv over RGB) is stored as the float32 values DequantizeLinear would compute, so that ONNX
Runtime can prepack it (its generic path for a dequantized filter took 1.2-2.7 ms for each of
MobileNetV3-small's 5x5 depthwise convs at batch 8). A float32 filter that ONNX Runtime can
bring next to a QuantizeLinear (a constant add or BatchNorm folded in, a Relu dropped) keeps
its int8 storage: ONNX Runtime would quantize it again on one per-tensor scale of its own. An
fp32 layer's filter in that position (its input a DequantizeLinear) gets a Clip to the float
range in front of its input instead.
"""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn as nn
import pytest

from imperative_ptq.export import export_onnx
from models import X86_TARGETS, converted
from ties import relative_error, simulation_up_to_ties

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

SPEC = [paddle.static.InputSpec([None, 8, 12, 12], "float32", "x")]


class _HardswishDepthwise(nn.Layer):
    """A 1x1 expand conv (u8 input), a 5x5 depthwise conv and a dense 3x3 conv, each before
    a Hardswish (float in ONNX Runtime), then a 1x1 conv whose ReLU the network pools and
    returns (no QuantizeLinear after it either)."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2D(8, 16, 1)
        self.depthwise = nn.Conv2D(16, 16, 5, padding=2, groups=16)
        self.dense = nn.Conv2D(16, 16, 3, padding=1)
        self.project = nn.Conv2D(16, 8, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = nn.functional.hardswish(self.expand(nn.functional.relu(x)))
        y = nn.functional.hardswish(self.depthwise(y))
        y = nn.functional.hardswish(self.dense(y))
        return nn.functional.adaptive_avg_pool2d(nn.functional.relu(self.project(y)), 1).flatten(1)


def _export(tmp_path, target: str) -> tuple[paddle.nn.Layer, str]:
    paddle.seed(0)
    model = _HardswishDepthwise()
    model.eval()
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal([4, 8, 12, 12]).astype(np.float32)) for _ in range(3)]
    quantized = converted(model, batches, target)
    return quantized, export_onnx(quantized, str(tmp_path / "m.onnx"), SPEC)


def _conv_filters(path: str) -> list[tuple[str, np.ndarray | None]]:
    """Each Conv's filter in graph order: ("float", its values) for a float32 initializer,
    ("int8", None) for a DequantizeLinear of integer codes."""
    graph = onnx.load(path).graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    filters = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        name = node.input[1]
        if name in initializers:
            filters.append(("float", numpy_helper.to_array(initializers[name])))
        else:
            assert producers[name].op_type == "DequantizeLinear"
            filters.append(("int8", None))
    return filters


@pytest.mark.parametrize("target", ["x86-vnni", "arm"])
def test_a_depthwise_filter_before_hardswish_is_stored_as_its_grid_values(tmp_path, target) -> None:
    quantized, path = _export(tmp_path, target)
    kinds = [kind for kind, _ in _conv_filters(path)]
    # expand (1x1: a plain GEMM either way), depthwise (5x5, 25 values per channel), dense 3x3
    # (144 values: int8 storage), project (1x1).
    assert kinds == ["int8", "float", "int8", "int8"], kinds
    values = _conv_filters(path)[1][1]
    layer = quantized.depthwise
    steps = (np.asarray(layer.weight_thresholds, np.float32) / 127).reshape(-1, 1, 1, 1)
    codes = values / steps
    # The simulation's weight grid: whole-number codes within -127..127, no bias folded in.
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    assert np.abs(np.round(codes)).max() <= 127


@pytest.mark.parametrize("target", [*X86_TARGETS, "arm"])
def test_float_stored_filters_run_as_simulated(tmp_path, target) -> None:
    quantized, path = _export(tmp_path, target)
    x = np.random.default_rng(1).standard_normal([4, 8, 12, 12]).astype(np.float32)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    ran = session.run(None, {session.get_inputs()[0].name: x})[0]
    simulated, _ = simulation_up_to_ties(lambda: quantized(paddle.to_tensor(x)).numpy(), ran, 1e-5)
    assert relative_error(ran, simulated) < 1e-5


class _StemBeforeBatchNormNode(nn.Layer):
    """An RGB stem conv (27 values per output channel) whose bias add and BatchNorm stay ONNX
    nodes of their own (channels-last), then a ReLU an int8 conv's QuantizeLinear reads; that
    conv's ReLU the network averages and returns."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2D(3, 8, 3, padding=1, data_format="NHWC")
        self.norm = nn.BatchNorm2D(8, data_format="NHWC")
        self.pointwise = nn.Conv2D(8, 8, 1, data_format="NHWC")

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = nn.functional.relu(self.norm(self.stem(x)))
        return nn.functional.relu(self.pointwise(y)).mean([1, 2])


def test_a_float_filter_onnx_runtime_would_fuse_before_a_quantize_keeps_int8_storage(tmp_path) -> None:
    """With the stem's filter float32, ONNX Runtime folded the add and the BatchNorm into the
    Conv, dropped the ReLU before the QuantizeLinear and quantized the filter again on one
    per-tensor scale (measured: 2.3% of the largest output off the simulation)."""
    paddle.seed(0)
    model = _StemBeforeBatchNormNode()
    model.eval()
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal([4, 10, 10, 3]).astype(np.float32)) for _ in range(3)]
    quantized = converted(model, batches, "arm")
    spec = [paddle.static.InputSpec([None, 10, 10, 3], "float32", "x")]
    path = export_onnx(quantized, str(tmp_path / "m.onnx"), spec)
    assert [kind for kind, _ in _conv_filters(path)] == ["int8", "int8"]
    x = rng.standard_normal([4, 10, 10, 3]).astype(np.float32)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    ran = session.run(None, {session.get_inputs()[0].name: x})[0]
    simulated, _ = simulation_up_to_ties(lambda: quantized(paddle.to_tensor(x)).numpy(), ran, 1e-5)
    assert relative_error(ran, simulated) < 1e-5


@pytest.mark.parametrize("name", ["block.0.conv1", "block.2.conv1"])
def test_an_fp32_conv_on_codes_keeps_its_float_filter_in_onnx_runtime(tmp_path, name) -> None:
    """A conv ``keep_fp32`` put back in float inside a residual block reads the block input
    the simulation holds on codes (a DequantizeLinear), and an int8 conv's QuantizeLinear
    follows its ReLU: ONNX Runtime quantized its float filter on one per-tensor scale (1.1%
    of the largest logit off the simulation with the exact residual form). A Clip to the
    float range in front of its input keeps ONNX Runtime from doing so."""
    import copy

    from imperative_ptq.analysis import keep_fp32
    from models import ThreeBlockResNet

    paddle.seed(0)
    rng = np.random.default_rng(0)
    model = ThreeBlockResNet()
    model.eval()
    batches = [paddle.to_tensor(rng.random((4, 3, 16, 16), np.float32)) for _ in range(3)]
    quantized = converted(copy.deepcopy(model), batches)
    keep_fp32(quantized, [name], model)
    spec = [paddle.static.InputSpec([None, 3, 16, 16], "float32", "x")]
    path = export_onnx(quantized, str(tmp_path / "m.onnx"), spec, int8_residual_branches=False)
    x = rng.random((8, 3, 16, 16), np.float32)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    ran = session.run(None, {session.get_inputs()[0].name: x})[0]
    simulated, _ = simulation_up_to_ties(lambda: quantized(paddle.to_tensor(x)).numpy(), ran, 1e-5)
    assert relative_error(ran, simulated) < 1e-5
