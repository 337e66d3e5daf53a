"""Clips with tensor bounds (``paddle.clip(x, min=t, max=u)``, as x2paddle converts every ONNX
``Clip``, e.g. a PyTorch ReLU6) run as clips in Paddle Inference: Paddle 3.3.1's oneDNN passes
fused them into the conv before them by their attributes (+-FLT_MAX), so they clipped nothing,
fp32 and int8 alike (``graph.constant_clip_bounds``)."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from imperative_ptq.export import create_predictor, predict, save_fp32_model, save_quantized_model
from models import converted

SPEC = [paddle.static.InputSpec([None, 3, 12, 12], "float32", "x")]


class ClippedConv(paddle.nn.Layer):
    """conv -> clip(0, bound) (returned) -> 1x1 conv; the upper bound a constant or computed."""

    def __init__(self, computed: bool) -> None:
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.head = paddle.nn.Conv2D(8, 4, 1)
        self.computed = computed

    def forward(self, x: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        low = paddle.full(shape=[1], fill_value=0.0, dtype="float32")
        high = x.mean().reshape([1]) if self.computed else paddle.full(shape=[1], fill_value=0.5, dtype="float32")
        clipped = paddle.clip(self.conv(x), min=low, max=high)
        return clipped, self.head(clipped)


@pytest.mark.parametrize("computed", [False, True], ids=["constant", "computed"])
def test_a_clip_with_tensor_bounds_clips_in_paddle_inference(computed: bool, tmp_path) -> None:
    paddle.seed(0)
    model = ClippedConv(computed)
    model.eval()
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 12, 12), dtype=np.float32)
    expected = [t.numpy() for t in model(paddle.to_tensor(x))]
    assert expected[0].max() <= 0.55  # the clip clips
    save_fp32_model(model, str(tmp_path / "fp32"), SPEC)
    ran = predict(create_predictor(str(tmp_path / "fp32"), int8=False, num_threads=1), x)
    # Measured before: clip output in [-1.9, 2.9], the head 4.3 off.
    for got, want in zip(ran, expected):
        np.testing.assert_allclose(got, want, atol=1e-5)
    quantized = converted(model, [paddle.to_tensor(rng.random((2, 3, 12, 12), dtype=np.float32)) for _ in range(3)])
    save_quantized_model(quantized, str(tmp_path / "int8"), SPEC)
    ran = predict(create_predictor(str(tmp_path / "int8"), num_threads=1), x)
    for got, want in zip(ran, (t.numpy() for t in quantized(paddle.to_tensor(x)))):
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
