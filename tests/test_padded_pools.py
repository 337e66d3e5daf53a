"""Windowed pools with unequal begin and end paddings or ``ceil_mode``: Paddle's CPU kernel
(dygraph, the simulation) pads by the begin padding on both sides, and an inclusive average
divides by the window's positions up to it; Paddle Inference's oneDNN kernel honours both
paddings and counts the whole kernel, and failed outright on some sizes. The exports
(:mod:`imperative_ptq.export.padded_pools`, the ONNX ``AveragePool``) compute Paddle's."""

from __future__ import annotations

import logging

import numpy as np
import paddle
import pytest

from imperative_ptq.export import create_predictor, export_onnx, predict, save_fp32_model
from models import X86_TARGETS, converted, largest_error_in_paddle_inference

nn = paddle.nn

POOLS = {
    "avg-inclusive-ceil": lambda: nn.AvgPool2D(3, 2, padding=1, exclusive=False, ceil_mode=True),
    "avg-inclusive-unequal": lambda: nn.AvgPool2D(3, 2, padding=[0, 1, 0, 1], exclusive=False),
    "avg-inclusive-unequal-ceil": lambda: nn.AvgPool2D(3, 2, padding=[0, 1, 0, 1], exclusive=False, ceil_mode=True),
    "avg-unequal-ceil": lambda: nn.AvgPool2D(3, 2, padding=[0, 1, 0, 1], ceil_mode=True),
    "max-unequal-ceil": lambda: nn.MaxPool2D(3, 2, padding=[0, 1, 0, 1], ceil_mode=True),
    "avg-inclusive-same": lambda: nn.AvgPool2D(2, 1, padding="SAME", exclusive=False),
}


@pytest.mark.parametrize("size", [9, 10])
@pytest.mark.parametrize("pool", POOLS.values(), ids=POOLS.keys())
def test_fp32_export_pools_as_paddle_does(pool, size, tmp_path) -> None:
    """Measured before, in Paddle Inference: inclusive averages 14-43% of the largest output
    off on one of the sizes; unequal paddings with ceil_mode on 9x9 failed ("could not create
    a descriptor for a pooling forward propagation primitive"); a model without parameters
    failed to export ("export did not produce .pdiparams"). Exact now."""
    layer = pool()
    x = np.random.default_rng(0).random([2, 4, size, size], np.float32)
    prefix = str(tmp_path / "m")
    save_fp32_model(layer, prefix, [paddle.static.InputSpec([None, 4, size, size], "float32", "x")])
    expected = layer(paddle.to_tensor(x)).numpy()
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    assert ran.shape == expected.shape
    assert np.abs(ran - expected).max() <= 1e-6 * np.abs(expected).max()


def test_3d_inclusive_average_with_unequal_paddings(tmp_path) -> None:
    layer = nn.AvgPool3D(3, 2, padding=[0, 1, 1, 1, 0, 1], exclusive=False, ceil_mode=True)
    x = np.random.default_rng(0).random([2, 4, 5, 10, 10], np.float32)
    prefix = str(tmp_path / "m")
    save_fp32_model(layer, prefix, [paddle.static.InputSpec([None, 4, 5, 10, 10], "float32", "x")])
    expected = layer(paddle.to_tensor(x)).numpy()
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    assert np.abs(ran - expected).max() <= 1e-6 * np.abs(expected).max()


class _Pooled(nn.Layer):
    """Two int8 convs, each ReLU pooled by ``pool``, averaged (``mean``) into an int8 Linear."""

    def __init__(self, pool) -> None:
        super().__init__()
        self.first, self.first_pool = nn.Conv2D(3, 8, 3, padding=1), pool()
        self.second, self.second_pool = nn.Conv2D(8, 8, 3, padding=1), pool()
        self.head = nn.Linear(8, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.first_pool(nn.functional.relu(self.first(x)))
        x = self.second_pool(nn.functional.relu(self.second(x)))
        return self.head(x.mean(axis=[2, 3]))


@pytest.mark.parametrize("pool", [POOLS["avg-inclusive-unequal-ceil"], POOLS["max-unequal-ceil"]],
                         ids=["avg-inclusive", "max"])
@pytest.mark.parametrize("target", X86_TARGETS)
def test_int8_network_pools_as_simulated(pool, target, tmp_path) -> None:
    """Both runtimes against the simulation on int8 convs around the pools (ONNX Runtime's
    inclusive AveragePool counted the extra end padding too)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.random([2, 3, 18, 18], np.float32)) for _ in range(2)]
    qmodel = converted(_Pooled(pool), batches, target)
    x = rng.random([4, 3, 18, 18], np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, 1e-5) <= 1e-5
    path = export_onnx(qmodel, str(tmp_path / "m.onnx"), [paddle.static.InputSpec([None, 3, 18, 18], "float32", "x")])
    ran = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    assert np.abs(ran - simulated).max() <= 1e-5 * np.abs(simulated).max()


def test_pool_on_an_open_size_is_left_with_a_warning(tmp_path, caplog) -> None:
    """Only where the kernels can disagree: an inclusive average, not a "SAME" maximum."""
    spec = [paddle.static.InputSpec([None, 4, None, None], "float32", "x")]
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        save_fp32_model(nn.MaxPool2D(3, 2, padding="SAME"), str(tmp_path / "max"), spec)
    assert "not fixed by the input spec" not in caplog.text
    layer = POOLS["avg-inclusive-ceil"]()
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        save_fp32_model(layer, str(tmp_path / "m"), spec)
    assert "pool2d" in caplog.text and "not fixed by the input spec" in caplog.text
    x = np.random.default_rng(0).random([2, 4, 8, 8], np.float32)  # even: the kernels agree
    ran = predict(create_predictor(str(tmp_path / "m"), num_threads=1), x)[0]
    assert ran.shape == layer(paddle.to_tensor(x)).shape


class _ReturnsMask(nn.Layer):
    """An int8 conv, a ReLU and a max-pool that returns its positions (``return_mask``)."""

    def __init__(self, pool: nn.Layer) -> None:
        super().__init__()
        self.conv, self.pool = nn.Conv2D(3, 8, 3, padding=1), pool

    def forward(self, x: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        return self.pool(nn.functional.relu(self.conv(x)))


@pytest.mark.parametrize(
    "pool", [lambda: nn.MaxPool2D(3, 2, padding=1, return_mask=True), lambda: nn.AdaptiveMaxPool2D(4, return_mask=True)],
    ids=["windowed", "adaptive"],
)
def test_onnx_export_returns_the_max_pool_mask_as_paddle_counts_it(pool, tmp_path) -> None:
    """A returned mask has Paddle's positions within each channel's plane, int32 (before: a
    bare ``KeyError`` naming the mask; only a mask that max-unpools read was exported)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(0)
    paddle.seed(0)
    qmodel = converted(_ReturnsMask(pool()), [paddle.to_tensor(rng.random([2, 3, 16, 16], np.float32))])
    path = export_onnx(qmodel, str(tmp_path / "m.onnx"), [paddle.static.InputSpec([None, 3, 16, 16], "float32", "x")])
    x = rng.random([2, 3, 16, 16], np.float32)
    values, mask = ort_outputs = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    simulated_values, simulated_mask = (tensor.numpy() for tensor in qmodel(paddle.to_tensor(x)))
    assert mask.dtype == np.int32 and len(ort_outputs) == 2
    np.testing.assert_array_equal(mask, simulated_mask)
    np.testing.assert_allclose(values, simulated_values, rtol=0, atol=1e-6 * np.abs(simulated_values).max())
