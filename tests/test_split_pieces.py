"""Pieces cut from one tensor (``paddle.split``, slicing) and read by int8 layers with
different thresholds are quantized once each, as simulated: Paddle Inference moved their scales
onto the tensor they were cut from, had its producer write it on one scale and requantized
each piece (two roundings; a piece above that scale clipped)."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from imperative_ptq.export import int8_report
from models import X86_TARGETS, converted, largest_error_in_paddle_inference

nn = paddle.nn
F = nn.functional


class ChannelSplit(nn.Layer):
    """Res2Net-style: conv -> ReLU -> four channel groups (of different ranges), a conv each."""

    def __init__(self, cut: str) -> None:
        super().__init__()
        self.cut = cut
        self.conv0, self.act = nn.Conv2D(3, 32, 3, padding=1), nn.ReLU()
        self.convs = nn.LayerList([nn.Conv2D(8, 8, 3, padding=1) for _ in range(4)])
        with paddle.no_grad():
            ranges = np.repeat([0.25, 0.5, 1.0, 2.0], 8).reshape(32, 1, 1, 1).astype("float32")
            self.conv0.weight.set_value(self.conv0.weight.numpy() * ranges)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = self.act(self.conv0(x))
        pieces = paddle.split(y, 4, 1) if self.cut == "split" else [y[:, 8 * i:8 * i + 8] for i in range(4)]
        return paddle.concat([conv(piece) for conv, piece in zip(self.convs, pieces)], 1)


@pytest.mark.parametrize("target", X86_TARGETS)
@pytest.mark.parametrize("cut", ["split", "slice"])
def test_channel_groups_of_a_relu_output_are_quantized_once(cut: str, target: str, tmp_path) -> None:
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.random((4, 3, 16, 16)).astype("float32")) for _ in range(4)]
    qmodel = converted(ChannelSplit(cut), batches, target)
    thresholds = {round(float(np.ravel(conv.input_threshold)[0]), 4) for conv in qmodel.convs}
    assert len(thresholds) == 4, thresholds
    x = rng.random((2, 3, 16, 16)).astype("float32")
    # Measured before: 1.0% of the largest output off, 72% of the outputs.
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) <= 1e-5
    assert int8_report(str(tmp_path / "m")).int8 == {"fused_conv2d": 5}


class SplitAttention(nn.Layer):
    """q, k, v split from one projection by ``paddle.split`` (LeViT's layout), k's range twice
    q's, attention matmuls int8 on x86-vnni."""

    def __init__(self, dim: int = 32, heads: int = 2, head_dim: int = 8) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)
        with paddle.no_grad():
            weight = self.qkv.weight.numpy()
            weight[:, heads * head_dim:2 * heads * head_dim] *= 2.0
            self.qkv.weight.set_value(weight)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape([batch, tokens, self.heads, 3 * self.head_dim])
        q, k, v = (t.transpose([0, 2, 1, 3]) for t in paddle.split(qkv, 3, axis=3))
        scores = F.softmax(paddle.matmul(q, k, transpose_y=True) * self.head_dim ** -0.5, -1)
        mixed = paddle.matmul(scores, v).transpose([0, 2, 1, 3]).reshape([batch, tokens, -1])
        return self.proj(mixed)


@pytest.mark.parametrize("target", [t for t in X86_TARGETS if "vnni" in str(t)])
def test_q_and_k_split_from_one_projection_are_quantized_each_on_its_own(target, tmp_path) -> None:
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.normal(0, 1, (4, 16, 32)).astype("float32")) for _ in range(4)]
    qmodel = converted(SplitAttention(), batches, target)
    x = rng.normal(0, 1, (2, 16, 32)).astype("float32")
    # Measured before: 3.0% (KL) of the largest output off, k clipped at q's threshold.
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) <= 1e-5
    assert int8_report(str(tmp_path / "m")).int8.get("fused_matmul") == 2
