"""Int8 Linear layers whose output ONNX Runtime computes in float, in its integer kernels.

A Linear before a Hardswish or GELU, or writing the network's logits, has a quantized input and
a float output. Written as ``MatMul`` + ``Add`` on QDQ pairs, ONNX Runtime's optimizer fuses the
two into a ``Gemm`` before it looks at the QDQ pairs (for a 2-D input or a static shape), then
runs that Gemm in float on a weight it dequantizes on every run: MobileNetV3-small's two head
Linear layers cost it 1.8 ms per forward at batch 1, more than its whole fp32 forward. The bias
add of such a Linear is written as ``Sum``, which ONNX Runtime does not fuse: the MatMul becomes
``MatMulIntegerToFloat`` (int8 kernels, the float output scaled from the int32 sums).
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


class _Head(nn.Layer):
    """Linear -> ReLU (a quantized output: QGemm) -> Linear -> Hardswish (float) -> Linear
    (the logits, float)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.expand, self.logits = nn.Linear(16, 32), nn.Linear(32, 24), nn.Linear(24, 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.logits(nn.functional.hardswish(self.expand(nn.functional.relu(self.hidden(x)))))


def _optimized(path: str, tmp_path, x: np.ndarray) -> tuple[np.ndarray, list]:
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    ran = session.run(None, {session.get_inputs()[0].name: x})[0]
    return ran, list(onnx.load(options.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("shape", [[None, 16], [4, 16], [None, 5, 16]], ids=["2d", "static", "3d"])
def test_float_output_linears_run_in_integer_kernels(shape, tmp_path) -> None:
    paddle.seed(0)
    model = _Head()
    rng = np.random.default_rng(0)
    concrete = [4 if size is None else size for size in shape]
    batches = [paddle.to_tensor(rng.standard_normal(concrete).astype(np.float32)) for _ in range(3)]
    quantized = converted(model, batches, "x86")
    spec = [paddle.static.InputSpec(shape, "float32", "x")]
    path = export_onnx(quantized, str(tmp_path / "head.onnx"), spec)
    x = rng.standard_normal(concrete).astype(np.float32)
    ran, nodes = _optimized(path, tmp_path, x)
    kinds = [node.op_type for node in nodes]
    computed = {name for node in nodes for name in node.output}
    weights_dequantized_per_run = [
        node.input[0] for node in nodes if node.op_type == "DequantizeLinear" and node.input[0] not in computed
    ]
    # Every weight prepacked into an integer kernel: none dequantized on each run, no float Gemm.
    assert not weights_dequantized_per_run, (weights_dequantized_per_run, kinds)
    assert not {"Gemm", "FusedGemm", "MatMul"} & set(kinds), kinds
    # expand and logits (before: Gemm on a 2-D or static input); hidden, its output quantized
    # for the ReLU, fuses into QGemm where ONNX Runtime makes a Gemm of it.
    assert kinds.count("MatMulIntegerToFloat") + kinds.count("QGemm") == 3, kinds
    assert kinds.count("MatMulIntegerToFloat") >= 2, kinds
    simulated, _ = simulation_up_to_ties(lambda: quantized(paddle.to_tensor(x)).numpy(), ran, 1e-5)
    assert relative_error(ran, simulated) < 1e-5


def test_quantized_output_linear_keeps_its_add_for_qgemm(tmp_path) -> None:
    """The Linear before the ReLU (its output quantized for the next Linear) keeps ``Add``:
    ONNX Runtime fuses MatMul, Add and the QDQ pairs around them into ``QGemm``."""
    paddle.seed(0)
    model = _Head()
    rng = np.random.default_rng(1)
    batches = [paddle.to_tensor(rng.standard_normal([4, 16]).astype(np.float32)) for _ in range(3)]
    quantized = converted(model, batches, "x86")
    path = export_onnx(quantized, str(tmp_path / "head.onnx"), [paddle.static.InputSpec([None, 16], "float32", "x")])
    kinds = [node.op_type for node in onnx.load(path).graph.node]
    assert kinds.count("Sum") == 2, kinds
    _, nodes = _optimized(path, tmp_path, rng.standard_normal([4, 16]).astype(np.float32))
    assert [node.op_type for node in nodes].count("QGemm") == 1
