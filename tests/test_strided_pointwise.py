"""Strided 1x1 int8 convs with input channels of 8 mod 16, which oneDNN's AVX2 int8 kernel
computed wrongly on two threads from call to call (``export/strided_pointwise.py``): the export
subsamples their input with a 1x1 max-pool, and Paddle Inference on two threads computes what the
simulation does in every call."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

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
    x = rng.standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)
    with paddle.no_grad():
        simulated = qmodel(paddle.to_tensor(x)).numpy()
    prefix = str(tmp_path / "m")
    save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 3, SIZE, SIZE], "float32", "x")])
    predictor = create_predictor(prefix, num_threads=2)
    errors = [relative_error(predict(predictor, x)[0], simulated) for _ in range(60)]
    assert max(errors) < 2e-6
    # The conv reads a 1x1 max-pool of its input, which runs int8, as the conv does.
    with legacy_static_mode():
        program, _, _ = paddle.static.load_inference_model(prefix, paddle.static.Executor(paddle.CPUPlace()))
    pools = [op for op in program.global_block().ops if op.type == "pool2d"]
    assert len(pools) == 1 and list(pools[0].attr("ksize")) == [1, 1] and list(pools[0].attr("strides")) == [2, 2]
    report = int8_report(prefix)
    assert report.int8_other == {"pool2d": 1}
    assert sum(report.fp32.values()) == len(report.fp32_weights)  # (x86: the stem on the signed image)
