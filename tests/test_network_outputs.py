"""Tensors the network returns that Paddle Inference writes as int8 codes: a backbone's
feature maps (block outputs of fused residual convs, which the next block reads in int8) and
a network ending in a max-pool after a conv. The simulation and the runtimes must return the
same values: the simulation puts a block output on its codes where the fused conv writes it
(``quant_residual.ResidualSumOutput``), and the export keeps a tensor only the caller reads
in fp32."""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import paddle
import pytest
from paddle.vision.models.resnet import BasicBlock

from imperative_ptq.analysis import keep_fp32
from imperative_ptq.cpu import cpu_info
from imperative_ptq.export import create_predictor, predict, save_quantized_model
from imperative_ptq.quant_residual import ResidualSumOutput
from avx2_kernels import pytest_on_avx2_kernels
from models import RESNET_WIDTH as WIDTH, X86_TARGETS, converted

nn = paddle.nn
SIZE = 16


class _Backbone(nn.Layer):
    """A stem and two identity blocks, returning both block outputs (feature maps), the
    first also read by the second block's int8 convs and add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2D(3, WIDTH, 3, padding=1, bias_attr=False), nn.BatchNorm2D(WIDTH), nn.ReLU()
        )
        self.blocks = nn.Sequential(BasicBlock(WIDTH, WIDTH), BasicBlock(WIDTH, WIDTH))
        rng = np.random.default_rng(3)
        for norm in (layer for layer in self.sublayers() if isinstance(layer, nn.BatchNorm2D)):
            channels = norm.weight.shape[0]
            norm._mean.set_value(rng.normal(0, 0.3, channels).astype(np.float32))
            norm._variance.set_value(rng.uniform(0.5, 2.0, channels).astype(np.float32))

    def forward(self, x: paddle.Tensor) -> list[paddle.Tensor]:
        first = self.blocks[0](self.stem(x))
        return [first, self.blocks[1](first)]


class _PoolEnd(nn.Layer):
    """A VGG-style prefix: conv -> ReLU -> max-pool, twice; the last pool is the output."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2D(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2D(2),
            nn.Conv2D(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2D(2),
        )

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.features(x)


class _PoolReadAndReturned(nn.Layer):
    """conv -> ReLU -> max-pool, the pool returned and read by an int8 conv: Paddle runs the
    pool int8, so the conv writes the ReLU output as codes for every reader."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu, self.pool = nn.Conv2D(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2D(2)
        self.head = nn.Conv2D(8, 8, 3, padding=1)

    def forward(self, x: paddle.Tensor) -> list[paddle.Tensor]:
        pooled = self.pool(self.relu(self.conv(x)))
        return [pooled, self.head(pooled)]


def _largest_errors(model: nn.Layer, target: str, tmp_path, kept: Sequence[str] = ()) -> list[float]:
    """Paddle Inference's outputs against the simulation's, each relative to its largest
    (``kept``: layers put back in fp32 with ``keep_fp32`` first)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.random((4, 3, SIZE, SIZE), np.float32)) for _ in range(3)]
    qmodel = converted(copy.deepcopy(model), batches, target)
    if kept:
        keep_fp32(qmodel, kept, model)
        assert all(not isinstance(layer, ResidualSumOutput) for layer in qmodel.sublayers())
    prefix = str(tmp_path / "m")
    save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 3, SIZE, SIZE], "float32", "x")])
    x = rng.random((8, 3, SIZE, SIZE), np.float32)
    simulated = qmodel(paddle.to_tensor(x))
    simulated = [simulated] if isinstance(simulated, paddle.Tensor) else simulated
    ran = predict(create_predictor(prefix, num_threads=1), x)
    assert len(ran) == len(simulated)
    return [float(np.abs(r - s.numpy()).max() / np.abs(s.numpy()).max()) for r, s in zip(ran, simulated)]


@pytest.mark.parametrize("target", X86_TARGETS)
def test_feature_maps_run_as_simulated(target, tmp_path) -> None:
    """Measured before (x86 and x86-vnni): 2.5e-3 of the largest value off Paddle
    Inference (returned as floats, written as u8 codes); 0 now."""
    paddle.seed(0)
    model = _Backbone()
    model.eval()
    errors = _largest_errors(model, target, tmp_path)
    assert max(errors) <= 1e-5, errors


def test_feature_map_readers_are_unchanged() -> None:
    """The block output's codes are those its int8 readers quantize it on: the same grid."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    model = _Backbone()
    model.eval()
    qmodel = converted(model, [paddle.to_tensor(rng.random((4, 3, SIZE, SIZE), np.float32))])
    first, second = qmodel.blocks
    assert isinstance(first.relu, ResidualSumOutput) and isinstance(second.relu, ResidualSumOutput)
    assert first.relu.threshold == second.conv1.input_thresholds[0] and first.relu.top == 255
    assert second.relu.top == 255


@pytest.mark.parametrize("network", [_PoolEnd, _PoolReadAndReturned], ids=["returned", "read-and-returned"])
@pytest.mark.parametrize("target", X86_TARGETS)
def test_max_pool_output_runs_as_simulated(network, target, tmp_path) -> None:
    """Measured before: 2.8e-3 (returned) and 3.5e-3 (read and returned) of the largest value
    off Paddle Inference (the int8 pool's dequantized codes against the simulation's floats).
    Only returned, the export keeps it fp32; also read by an int8 conv, the simulation puts the
    ReLU on its codes."""
    paddle.seed(0)
    errors = _largest_errors(network(), target, tmp_path)
    assert max(errors) <= 1e-5, errors


@pytest.mark.parametrize("target", X86_TARGETS)
def test_max_pool_output_with_its_reader_kept_fp32_runs_as_simulated(target, tmp_path) -> None:
    """With the pool's int8 reader kept fp32 the export drops the scales through the pool and
    the conv writes floats: ``keep_fp32`` takes the ReLU off its codes too (measured 3.5e-3 of
    the pool's and 8.3e-3 of the fp32 conv's largest value off Paddle Inference when it did not)."""
    paddle.seed(0)
    model = _PoolReadAndReturned()
    model.eval()
    errors = _largest_errors(model, target, tmp_path, kept=["head"])
    assert max(errors) <= 1e-5, errors


def test_max_pool_output_in_onnx_runtime_as_simulated(tmp_path) -> None:
    """Measured before: 29% of the largest value off the simulation (the ReLU in front of the
    pool quantized on u8 codes clipped at its threshold); 0 now."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from imperative_ptq.export import export_onnx

    paddle.seed(0)
    rng = np.random.default_rng(0)
    qmodel = converted(
        _PoolEnd(), [paddle.to_tensor(rng.random((4, 3, SIZE, SIZE), np.float32)) for _ in range(3)]
    )
    path = export_onnx(
        qmodel, str(tmp_path / "m.onnx"), [paddle.static.InputSpec([None, 3, SIZE, SIZE], "float32", "x")]
    )
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = rng.random((8, 3, SIZE, SIZE), np.float32)
    ran = session.run(None, {session.get_inputs()[0].name: x})[0]
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    assert np.abs(ran - simulated).max() <= 1e-5 * np.abs(simulated).max()


@pytest.mark.slow
@pytest.mark.skipif(not cpu_info().vnni, reason="this CPU runs AVX2 kernels natively")
def test_network_outputs_on_avx2_kernels() -> None:
    summary = pytest_on_avx2_kernels(__file__, "as_simulated and not vnni and not onnx")
    assert "4 passed" in summary, summary
