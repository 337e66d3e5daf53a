"""Strided 1x1 int8 convs with input channels of 8 mod 16, which oneDNN's AVX2 int8 kernel
computed wrongly on two threads from call to call (``export/strided_pointwise.py``): the export
gives them a kernel as large as their stride, zero but for one tap, and Paddle Inference on two
threads computes what the simulation does in every call, at any input size, a projection
shortcut still fused into its block's other conv."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from avx2_kernels import exact_natively, shared_runner
from imperative_ptq.export import create_predictor, int8_report, predict, save_quantized_model
from imperative_ptq.export.legacy_program import legacy_static_mode
from models import converted, randomize_batch_norm_statistics
from ties import relative_error

nn = paddle.nn
SIZE = 32


def _conv_norm(channels_in: int, channels_out: int, kernel: int, stride: int, relu: bool) -> nn.Sequential:
    layers = [nn.Conv2D(channels_in, channels_out, kernel, stride, kernel // 2, bias_attr=False), nn.BatchNorm2D(channels_out)]
    return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))


class _Downsample(nn.Layer):
    """A stem, then a 1x1 stride-2 conv of its 24 channels; ``block``: as a RegNet's projection
    shortcut, added to a 3x3 stride-2 conv's output."""

    def __init__(self, block: bool) -> None:
        super().__init__()
        self.stem = _conv_norm(3, 24, 3, 2, True)
        self.shortcut = _conv_norm(24, 56, 1, 2, False)
        self.branch = _conv_norm(24, 56, 3, 2, False) if block else None
        self.relu = nn.ReLU()

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = self.stem(x)
        if self.branch is None:
            return self.shortcut(y)
        return self.relu(self.branch(y) + self.shortcut(y))


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
@pytest.mark.parametrize("block", [False, True], ids=["conv", "projection"])
def test_a_strided_pointwise_conv_runs_as_simulated_on_two_threads(block, target, tmp_path) -> None:
    """(Before: 5-90% of the calls off the simulation, by up to 0.29 of the largest output.)"""
    paddle.seed(0)
    model = _Downsample(block)
    randomize_batch_norm_statistics(model, seed=0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)) for _ in range(4)]
    qmodel = converted(model, batches, target)
    prefix = str(tmp_path / "m")
    save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 3, None, None], "float32", "x")])
    # The race is in oneDNN's AVX2 kernels: run them under the cap where this CPU has others.
    avx2 = shared_runner()
    predictor = create_predictor(prefix, num_threads=2) if exact_natively(target) else None
    # (Sizes whose strided map is odd: the conv's bottom and right padding keeps its size.)
    for size in (SIZE, SIZE + 2):
        x = rng.standard_normal((4, 3, size, size)).astype(np.float32)
        with paddle.no_grad():
            simulated = qmodel(paddle.to_tensor(x)).numpy()
        calls = 60 if size == SIZE else 20
        runs = [] if predictor is None else [predict(predictor, x)[0] for _ in range(calls)]
        if avx2 is not None:
            runs += [outputs[0] for outputs in avx2.predict_calls(prefix, [x], calls, num_threads=2)]
        assert len(runs) >= calls
        assert max(relative_error(ran, simulated) for ran in runs) < 2e-6, size
    with legacy_static_mode():
        program, _, _ = paddle.static.load_inference_model(prefix, paddle.static.Executor(paddle.CPUPlace()))
    block = program.global_block()
    ops = block.ops
    widened = [op for op in ops if op.type == "conv2d" and tuple(block.var(op.input("Filter")[0]).shape[2:]) == (2, 2)]
    assert len(widened) == 1
    shortcut = widened[0]
    assert list(shortcut.attr("paddings")) == [0, 1, 0, 1]
    # No pool in front of it, and a projection's add is left to Paddle's fusion (no float ops
    # putting it on codes).
    assert not [op for op in ops if op.type == "pool2d" or (op.type == "scale" and op.attr("bias"))]
    report = int8_report(prefix)
    assert report.int8_other == {}
    assert sum(report.fp32.values()) == len(report.fp32_weights)  # (x86: the stem on the signed image)
