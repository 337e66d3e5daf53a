"""An int8 conv's output read on more than one grid (``x86-avx2``, where convs on signed inputs
run int8): by a concat and another conv (DenseNet-style reuse), by two concats (a YOLO/RT-DETR
neck), through a split whose halves go to a concat and a conv (YOLOv8's C2f), or by a conv and
a head shared by pyramid levels. Paddle Inference runs a concat int8 once its output has a
scale, and gives a conv one output scale for all of its int8 readers: the other readers then
read codes on another grid. Each of these now runs as simulated."""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from models import converted, largest_error_in_onnx_runtime, largest_error_in_paddle_inference

nn = paddle.nn


class _Reused(nn.Layer):
    """``c(concat([y, b(y)]))``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2D(3, 8, 1), nn.Conv2D(8, 8, 1), nn.Conv2D(16, 4, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = self.a(x)
        return self.c(paddle.concat([y, self.b(y)], 1))


class _TwoConcats(nn.Layer):
    """One conv output joined with two other branches."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.e = nn.Conv2D(3, 8, 1), nn.Conv2D(3, 8, 1), nn.Conv2D(3, 8, 1)
        self.c1, self.c2 = nn.Conv2D(16, 4, 1), nn.Conv2D(16, 4, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        p = self.a(x)
        first = self.c1(paddle.concat([p, F.relu(self.b(x))], 1))
        second = self.c2(paddle.concat([p, F.silu(self.e(x))], 1))
        return paddle.concat([first.flatten(1), second.flatten(1)], 1)


class _SplitHalves(nn.Layer):
    """YOLOv8's C2f in short: one half of a split straight to the concat, the other through a conv."""

    def __init__(self, activation) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2D(3, 16, 1), nn.Conv2D(8, 8, 3, padding=1), nn.Conv2D(16, 4, 1)
        self.activation = activation

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        kept, through = paddle.split(self.activation(self.a(x)), [8, 8], 1)
        return self.c(paddle.concat([kept, self.b(through)], 1))


class _SharedHead(nn.Layer):
    """A head conv called on two levels, the first level also read by another conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2D(3, 8, 1), nn.Conv2D(8, 8, 1), nn.Conv2D(8, 4, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        level = self.a(x)
        return paddle.concat([self.head(level).flatten(1), self.head(self.b(level)).flatten(1)], 1)


class _UpsampledBeside(nn.Layer):
    """A PAN neck: one conv output concatenated at its level and, upsampled, at the next."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2D(3, 8, 3, stride=2, padding=1), nn.Conv2D(3, 8, 3, stride=2, padding=1)
        self.e, self.c1, self.c2 = nn.Conv2D(3, 8, 1), nn.Conv2D(16, 4, 1), nn.Conv2D(16, 4, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        level = self.a(x)
        here = self.c1(paddle.concat([level, F.silu(self.b(x))], 1))
        up = F.interpolate(level, scale_factor=2, mode="nearest")
        above = self.c2(paddle.concat([up, F.silu(self.e(x))], 1))
        return paddle.concat([here.flatten(1), above.flatten(1)], 1)


class _SignedConcatBehind(nn.Layer):
    """Two convs on the signed input concatenated, then max-pooled, upsampled or sliced before
    a conv: the concat's scale reaches it from behind."""

    def __init__(self, after) -> None:
        super().__init__()
        self.p, self.q, self.head = nn.Conv2D(3, 8, 3, padding=1), nn.Conv2D(3, 8, 3, padding=1), nn.Conv2D(16, 8, 1)
        self.after = after

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(self.after(paddle.concat([self.p(x), self.q(x)], 1)))


class _PooledBeside(nn.Layer):
    """A conv output max-pooled into one conv and read by another (``split``: one half each)."""

    def __init__(self, split: bool) -> None:
        super().__init__()
        self.split = split
        self.a = nn.Conv2D(3, 16 if split else 8, 3, padding=1)
        self.b, self.c = nn.Conv2D(8, 8, 1), nn.Conv2D(8, 8, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = self.a(x)
        pooled, other = paddle.split(y, 2, 1) if self.split else (y, y)
        return paddle.concat([self.b(F.max_pool2d(pooled, 2)).flatten(1), self.c(other).flatten(1)], 1)


MODELS = {
    # Measured before, Paddle Inference vs the simulation on x86-avx2 (largest output):
    "reused": _Reused,  # 1.75e-2
    "two concats": _TwoConcats,  # 9.1e-3
    "split halves, linear": lambda: _SplitHalves(lambda x: x),  # 2.2e-2
    "split halves, silu": lambda: _SplitHalves(F.silu),  # 4.6e-2
    "split halves, relu": lambda: _SplitHalves(F.relu),  # refused: "could not create a primitive descriptor for a concat primitive"
    "shared head": _SharedHead,  # 7.5e-2
    "upsampled beside": _UpsampledBeside,  # (an RT-DETR-style neck: 2.3e-2)
    # Paddle ran the concat unsigned, its scale copied back from the conv's quantize op:
    "signed concat pooled": lambda: _SignedConcatBehind(lambda y: F.max_pool2d(y, 2, 2)),  # 0.11
    "signed concat upsampled": lambda: _SignedConcatBehind(lambda y: F.interpolate(y, scale_factor=2)),  # 0.97
    "signed concat sliced": lambda: _SignedConcatBehind(lambda y: y[:, :, 1:7, 1:7]),  # 0.86
    # The pooled reader's scale carried back to the conv, which wrote codes on it for both:
    "pooled beside": lambda: _PooledBeside(False),  # 1.5e-2
    "pooled half": lambda: _PooledBeside(True),  # 1.1e-2
}


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
@pytest.mark.parametrize("name", MODELS)
def test_a_conv_output_read_on_several_grids_runs_as_simulated(name, target, tmp_path) -> None:
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal((4, 3, 8, 8)).astype(np.float32)) for _ in range(4)]
    qmodel = converted(MODELS[name](), batches, target)
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) < 2e-6
    assert largest_error_in_onnx_runtime(qmodel, x, tmp_path) < 2e-6
