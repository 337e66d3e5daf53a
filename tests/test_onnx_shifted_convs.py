"""Shifted conv inputs written by int8 convs, in ONNX Runtime's integer kernels.

On ``x86`` a conv reading a signed input (a linear bottleneck's projection, MobileNetV2's) reads
it shifted into u8 codes ``0..M``. The ONNX export wrote every such shift as Paddle Inference
computes it, ``rint(float32(x + c) * k)``: an Add and a Mul in float, which kept ONNX Runtime
from fusing the projection conv into a ``QLinearConv`` (MobileNetV2 at batch 8: 1.23x its fp32
in ONNX Runtime, 1.51x with the plain form). An int8 conv's output and a residual sum with one
are not the simulation's to the last bit in ONNX Runtime anyway, so they get a plain
``QuantizeLinear(x, s, z)`` clipped to ``0..M``: the same codes up to rounding ties.

A ReLU6 before a QuantizeLinear whose codes stop at a threshold within 6 is quantized from its
input (the same codes): ONNX Runtime drops a Relu before a QuantizeLinear but kept the Clip at 6
where the Q range passes it (thresholds above 3), and ran the conv before it in float.
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

SPEC = [paddle.static.InputSpec([None, 3, 12, 12], "float32", "x")]


def _conv_bn(ci: int, co: int, kernel: int = 1, groups: int = 1, relu6: bool = True) -> nn.Layer:
    layers = [nn.Conv2D(ci, co, kernel, padding=kernel // 2, groups=groups), nn.BatchNorm2D(co)]
    return nn.Sequential(*layers, *([nn.ReLU6()] if relu6 else []))


class _LinearBottlenecks(nn.Layer):
    """A stem, a projection read by the next block's expand conv alone, a bottleneck with a
    residual add (its input read by its expand conv and the add), a 1x1 head on the sum, an
    int8 global pool and a Linear: every signed conv input on ``x86`` is shifted."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8, 3)
        self.project1 = _conv_bn(8, 12, relu6=False)
        self.block2 = nn.Sequential(_conv_bn(12, 24), _conv_bn(24, 24, 3, groups=24), _conv_bn(24, 12, relu6=False))
        self.block3 = nn.Sequential(_conv_bn(12, 24), _conv_bn(24, 24, 3, groups=24), _conv_bn(24, 12, relu6=False))
        self.head = nn.Sequential(nn.Conv2D(12, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2D(1), nn.Flatten())
        self.classifier = nn.Linear(16, 5)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = self.block2(self.project1(self.stem(x)))
        return self.classifier(self.head(y + self.block3(y)))


def _export(tmp_path) -> tuple[nn.Layer, str, np.ndarray]:
    paddle.seed(0)
    model = _LinearBottlenecks()
    for layer in model.sublayers():  # BatchNorm statistics other than 0 / 1
        if isinstance(layer, nn.BatchNorm2D):
            layer._mean.set_value(paddle.uniform(layer._mean.shape, min=-0.2, max=0.2))
            layer._variance.set_value(paddle.uniform(layer._variance.shape, min=0.5, max=1.5))
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.random([4, 3, 12, 12], dtype=np.float32)) for _ in range(3)]
    quantized = converted(model, batches, "x86")
    path = export_onnx(quantized, str(tmp_path / "m.onnx"), SPEC)
    return quantized, path, rng.random([4, 3, 12, 12], dtype=np.float32)


def test_shifts_of_conv_outputs_are_plain_quantize_ops(tmp_path) -> None:
    _, path, _ = _export(tmp_path)
    graph = onnx.load(path).graph
    # No Add of a shift, no Mul by a float32 multiplier: the three shifted inputs (block2's and
    # block3's expand convs, the head) read conv outputs or their sum.
    assert not [node for node in graph.node if node.op_type == "Mul"]
    read = {name for node in graph.node for name in node.input}
    assert not [tensor.name for tensor in graph.initializer if tensor.name.startswith("shift") and tensor.name in read]


def test_onnx_runtime_runs_every_conv_in_integer_kernels_as_simulated(tmp_path) -> None:
    quantized, path, x = _export(tmp_path)
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    ran = session.run(None, {session.get_inputs()[0].name: x})[0]
    kinds = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    # Every conv but block2's projection, which the residual add reads in float too. (Before:
    # project1, whose shift's Add and Mul came between it and its QuantizeLinear, and block2's
    # expand conv, whose ReLU6 at 6 ONNX Runtime kept between it and its QuantizeLinear on a
    # threshold above 3, ran in float as well.)
    assert kinds.count("QLinearConv") == 8 and kinds.count("Conv") + kinds.count("FusedConv") == 1, kinds
    # The numbers: with the residual add in float, as the simulation adds it (the default's
    # int8 residual branches are 1.1e-2 off here, before and after).
    exact = export_onnx(quantized, str(tmp_path / "exact.onnx"), SPEC, int8_residual_branches=False)
    session = onnxruntime.InferenceSession(exact, providers=["CPUExecutionProvider"])
    ran = session.run(None, {session.get_inputs()[0].name: x})[0]
    simulated, _ = simulation_up_to_ties(lambda: quantized(paddle.to_tensor(x)).numpy(), ran, 1e-5)
    assert relative_error(ran, simulated) < 1e-5


class _PreNormBlock(nn.Layer):
    """A pre-norm transformer MLP: LayerNorm -> Linear -> GELU -> Linear, plus a residual;
    both Linear layers read signed inputs (a LayerNorm's and a GELU's output), shifted on
    ``x86``."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


@pytest.mark.parametrize("exact_shifts", [True, False])
def test_exact_shifts_chooses_the_form_of_float_op_outputs(exact_shifts, tmp_path) -> None:
    """``exact_shifts=False`` writes the LayerNorm's and the GELU's shifts as plain
    QuantizeLinear ops too (faster in ONNX Runtime), the same codes up to rounding ties."""
    paddle.seed(0)
    model = _PreNormBlock()
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal([4, 6, 16]).astype(np.float32)) for _ in range(3)]
    quantized = converted(model, batches, "x86")
    spec = [paddle.static.InputSpec([None, 6, 16], "float32", "x")]
    path = export_onnx(quantized, str(tmp_path / "m.onnx"), spec, exact_shifts=exact_shifts)
    graph = onnx.load(path).graph
    multipliers = [
        node for node in graph.node
        if node.op_type == "Mul" and any(name.startswith("multiplier") for name in node.input)
    ]
    assert len(multipliers) == (2 if exact_shifts else 0), [node.input for node in multipliers]
    x = rng.standard_normal([4, 6, 16]).astype(np.float32)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    ran = session.run(None, {session.get_inputs()[0].name: x})[0]
    simulated, _ = simulation_up_to_ties(lambda: quantized(paddle.to_tensor(x)).numpy(), ran, 1e-5)
    assert relative_error(ran, simulated) < 1e-5


def test_exact_shifts_must_be_a_bool(tmp_path) -> None:
    quantized, _, _ = _export(tmp_path)
    with pytest.raises(TypeError, match="exact_shifts"):
        export_onnx(quantized, str(tmp_path / "m.onnx"), SPEC, exact_shifts="no")
