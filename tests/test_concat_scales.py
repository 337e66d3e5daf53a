"""A concat's scale stays off the float ops beside it: Paddle Inference propagates a scaled
concat's scale back onto its inputs, so the int8 layer writing one wrote codes on the concat's
grid for its float readers too, and a product of two scaled activations ran int8, where the
simulation computes them in float and quantizes the concat once
(``export.float_readers.separate_scaled_products``)."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from models import X86_TARGETS, converted, largest_error_in_onnx_runtime, largest_error_in_paddle_inference

nn = paddle.nn
F = nn.functional


class _SquareFeatures(nn.Layer):
    """``Linear(concat([x, x * x]))``."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(64, 3)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(paddle.concat([x, x * x], axis=1))


class _PairHead(nn.Layer):
    """A sentence-pair head: one encoder on two inputs, a Linear on ``[u, v, |u - v|, u * v]``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(32, 32)
        self.head = nn.Linear(128, 8)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        u, v = self.encoder(x), self.encoder(x * 0.5 + 0.1)
        return self.head(paddle.concat([u, v, (u - v).abs(), u * v], axis=1))


class _GatedConcat(nn.Layer):
    """A GLU-style gate of a split conv output, concatenated with its first half."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2D(4, 8, 3, padding=1)
        self.head = nn.Conv2D(8, 8, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        a, b = paddle.split(self.conv(x), 2, axis=1)
        return self.head(paddle.concat([a * F.sigmoid(b), a], axis=1))


@pytest.mark.parametrize("target", X86_TARGETS)
@pytest.mark.parametrize(
    "build, shape", [(_SquareFeatures, (4, 32)), (_PairHead, (4, 32)), (_GatedConcat, (4, 4, 8, 8))],
    ids=["square-features", "pair-head", "gated-concat"],
)
def test_float_ops_beside_a_scaled_concat_run_as_simulated(build, shape, target, tmp_path) -> None:
    """(Before, on x86-vnni: 2.2e-2, 1.0e-2 and 1.3e-2 of the largest output off in Paddle
    Inference, which ran the product and the split int8; ONNX Runtime was exact.)"""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    qmodel = converted(build(), [paddle.to_tensor(rng.standard_normal(shape).astype(np.float32)) for _ in range(4)], target)
    x = rng.standard_normal(shape).astype(np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) < 2e-6
    assert largest_error_in_onnx_runtime(qmodel, x, tmp_path) < 2e-6
