"""Adaptive pools that keep one axis open (``nn.AdaptiveAvgPool2D((1, None))``, a CRNN's
height pooling) run in Paddle Inference at any width: Paddle 3.3.1 fails on the traced
``pool2d(ksize=[1, -1], adaptive=True)`` when that axis is dynamic, so both exports write the
same mean (or maximum) as a reduce over the pooled axis (``graph.reduce_open_adaptive_pools``)."""

from __future__ import annotations

import logging

import numpy as np
import paddle
import pytest

from imperative_ptq.export import create_predictor, predict, save_fp32_model, save_quantized_model
from models import converted

HEIGHT = 8
SPEC = [paddle.static.InputSpec([None, 3, HEIGHT, None], "float32", "x")]


class Recognizer(paddle.nn.Layer):
    """conv -> ReLU -> pool the height to 1 -> a Linear per column (CRNN-style)."""

    def __init__(self, pool: paddle.nn.Layer) -> None:
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 16, 3, padding=1)
        self.pool = pool
        self.classify = paddle.nn.Linear(16, 5)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        columns = self.pool(paddle.nn.functional.relu(self.conv(x))).squeeze(2).transpose([0, 2, 1])
        return self.classify(columns)


POOLS = {
    "avg": lambda: paddle.nn.AdaptiveAvgPool2D((1, None)),
    "max": lambda: paddle.nn.AdaptiveMaxPool2D((1, None)),
}


@pytest.mark.parametrize("kind", POOLS)
def test_fp32_and_int8_exports_run_at_any_width(kind, tmp_path) -> None:
    paddle.seed(0)
    model = Recognizer(POOLS[kind]())
    model.eval()
    rng = np.random.default_rng(0)
    save_fp32_model(model, str(tmp_path / "fp32"), SPEC)
    quantized = converted(model, [paddle.to_tensor(rng.random((2, 3, HEIGHT, width), dtype=np.float32)) for width in (24, 32, 40)])
    save_quantized_model(quantized, str(tmp_path / "int8"), SPEC)
    fp32 = create_predictor(str(tmp_path / "fp32"), int8=False, num_threads=1)
    int8 = create_predictor(str(tmp_path / "int8"), num_threads=1)
    for width in (20, 44):
        x = rng.random((2, 3, HEIGHT, width), dtype=np.float32)
        np.testing.assert_allclose(predict(fp32, x)[0], model(paddle.to_tensor(x)).numpy(), atol=1e-5)
        simulated = quantized(paddle.to_tensor(x)).numpy()
        np.testing.assert_allclose(predict(int8, x)[0], simulated, atol=1e-5 * np.abs(simulated).max())


def test_an_open_pool_to_more_than_one_row_is_named_in_a_warning(tmp_path, caplog) -> None:
    paddle.seed(0)
    model = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3, padding=1), paddle.nn.AdaptiveAvgPool2D((2, None)))
    model.eval()
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        save_fp32_model(model, str(tmp_path / "fp32"), SPEC)
    assert any("keeps an axis open" in record.message for record in caplog.records), caplog.text
