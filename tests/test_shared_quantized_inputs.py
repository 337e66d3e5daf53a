"""A signed tensor read both by an int8 layer and by fp32 ops, or sliced with siblings from
one tensor: Paddle Inference moves its scale to whatever writes it (a transpose then runs
int8, a fc writes int8 codes), so the fp32 readers got dequantized codes and the siblings one
shared scale, where the simulation gives the fp32 readers float values and each sibling its
own threshold. The export gives the quantize op a copy of its own
(``export.shared_outputs.isolate_quantized_shared_outputs``). On ``x86`` the shift in front of a signed
int8 input is such a copy already."""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

import imperative_ptq as ip
from models import converted, largest_error_in_paddle_inference

STEPS, FEATURES = 12, 16


class TransposedPooling(paddle.nn.Layer):
    """Attention pooling over ``h = x.transpose(...)``: a Linear scores it, the weighted sum
    reads it in float."""

    def __init__(self) -> None:
        super().__init__()
        self.score = paddle.nn.Linear(FEATURES, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = x.transpose([0, 2, 1])
        return (F.softmax(self.score(h), axis=1) * h).sum(1)


class TanhPooling(paddle.nn.Layer):
    """The same over ``h = tanh(fc(x))``, whose fc Paddle fuses the tanh into."""

    def __init__(self) -> None:
        super().__init__()
        self.project = paddle.nn.Linear(STEPS, STEPS)
        self.score = paddle.nn.Linear(STEPS, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = paddle.tanh(self.project(x))
        return (F.softmax(self.score(h), axis=1) * h).sum(1)


class SlicedAttention(paddle.nn.Layer):
    """Attention over the steps with ``q, k, v`` sliced from one projection (as Swin and ViT
    write it): on ``x86-vnni`` the three matmul inputs come through layout ops from one
    tensor, each with its own threshold."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = paddle.nn.Linear(FEATURES, 3 * FEATURES)
        self.out = paddle.nn.Linear(FEATURES, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = x.transpose([0, 2, 1])
        qkv = self.qkv(h).reshape([-1, STEPS, 3, 2, FEATURES // 2]).transpose([2, 0, 3, 1, 4])
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = F.softmax((q * (FEATURES // 2) ** -0.5) @ k.transpose([0, 1, 3, 2]), axis=-1)
        return self.out((scores @ v).transpose([0, 2, 1, 3]).reshape([-1, STEPS, FEATURES]).mean(1))


@pytest.mark.parametrize("target", ["x86", "x86-vnni"])
@pytest.mark.parametrize("model_type", [TransposedPooling, TanhPooling, SlicedAttention], ids=["transpose", "tanh", "sliced"])
def test_fp32_readers_get_float_values(model_type, target, tmp_path) -> None:
    if target == "x86-vnni" and not ip.cpu_info().vnni:
        pytest.skip("x86-vnni runs signed int8 inputs, which saturate without VNNI")
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal([4, FEATURES, STEPS]).astype("float32")) for _ in range(4)]
    quantized = converted(model_type(), batches, target)
    x = rng.standard_normal([4, FEATURES, STEPS]).astype("float32")
    # Measured on x86-vnni before the copies: 0.46% of the largest output off, on every output
    # (pooling); 2.2% on a Swin window attention (one scale for q, k and v).
    assert largest_error_in_paddle_inference(quantized, x, tmp_path) <= 1e-5
