"""Nearest resizes run in Paddle Inference as Paddle's CPU kernel computes them: oneDNN's
kernel picks other source pixels unless it upscales by a whole number, so both exports read
the source rows and columns with ``index_select`` (``graph.exact_nearest_resizes``)."""

from __future__ import annotations

import logging

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from imperative_ptq.export import create_predictor, predict, save_fp32_model, save_quantized_model
from imperative_ptq.export.graph import nearest_sources
from models import converted

SIZE = 8


class Resized(paddle.nn.Layer):
    """conv -> ReLU -> nearest resize -> conv."""

    def __init__(self, **resize) -> None:
        super().__init__()
        self.resize = resize
        self.first = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.second = paddle.nn.Conv2D(8, 2, 3, padding=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.second(F.interpolate(F.relu(self.first(x)), mode="nearest", **self.resize))


RESIZES = {
    "size_20": {"size": [20, 20]},
    "scale_1.5": {"scale_factor": 1.5},
    "size_5": {"size": [5, 5]},
    "scale_0.5": {"scale_factor": 0.5},
    "height_kept": {"size": [SIZE, 13]},
    "scale_2_3": {"scale_factor": [2, 3]},  # whole-number upscales: oneDNN's kernel agrees
}


def _reference_sources(size: int, resized: int, scale: float | None) -> np.ndarray:
    """The rows Paddle's own nearest resize reads, found by resizing a ramp of row numbers
    (the width changes too, so that a kept height is not copied through)."""
    rows = paddle.arange(size, dtype="float32").reshape([1, 1, size, 1]).tile([1, 1, 1, 2])
    if scale is None:
        out = F.interpolate(rows, size=[resized, 3], mode="nearest")
    else:
        out = F.interpolate(rows, scale_factor=[scale, 1.5], mode="nearest")
    return out.numpy()[0, 0, :, 0].astype(np.int64)


def test_sources_are_the_rows_paddle_reads() -> None:
    for size in range(1, 17):
        for resized in range(1, 33):
            np.testing.assert_array_equal(nearest_sources(size, resized, -1.0, False), _reference_sources(size, resized, None))
        for scale in (0.3, 0.5, 0.75, 1.1, 1.25, 1.5, 2.0, 2.5, 3.0):
            expected = _reference_sources(size, int(size * scale), scale) if int(size * scale) > 0 else None
            if expected is not None:
                np.testing.assert_array_equal(nearest_sources(size, len(expected), scale, False), expected)


@pytest.mark.parametrize("name", RESIZES)
def test_fp32_and_int8_exports_resize_as_paddle_does(name, tmp_path, avx2_runner) -> None:
    paddle.seed(0)
    model = Resized(**RESIZES[name])
    model.eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal([2, 3, SIZE, SIZE]).astype("float32")
    spec = [paddle.static.InputSpec([None, 3, SIZE, SIZE], "float32", "x")]
    save_fp32_model(model, str(tmp_path / "fp32"), spec)
    ran = predict(create_predictor(str(tmp_path / "fp32"), int8=False, num_threads=1), x)[0]
    np.testing.assert_allclose(ran, model(paddle.to_tensor(x)).numpy(), atol=1e-5)

    batches = [paddle.to_tensor(rng.standard_normal([2, 3, SIZE, SIZE]).astype("float32")) for _ in range(3)]
    quantized = converted(model, batches)
    simulated = quantized(paddle.to_tensor(x)).numpy()
    prefix = str(tmp_path / "int8")
    save_quantized_model(quantized, prefix, spec)
    bound = 1e-5 * np.abs(simulated).max()
    np.testing.assert_allclose(predict(create_predictor(prefix, num_threads=1), x)[0], simulated, atol=bound)
    if avx2_runner is not None:
        np.testing.assert_allclose(avx2_runner.predict(prefix, x)[0], simulated, atol=bound)


@pytest.mark.parametrize("resize, warned", [({"size": [20, 20]}, True), ({"scale_factor": 2}, False)])
def test_a_resize_of_unknown_size_is_named_in_a_warning(resize, warned, tmp_path, caplog) -> None:
    """An input of any size: a resize to a fixed size cannot be written exactly (a warning);
    a whole-number upscale needs no rewrite, and runs right at any size."""
    paddle.seed(0)
    model = Resized(**resize)
    model.eval()
    spec = [paddle.static.InputSpec([None, 3, None, None], "float32", "x")]
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        save_fp32_model(model, str(tmp_path / "fp32"), spec)
    messages = [record.message for record in caplog.records if "nearest resize" in record.message]
    assert bool(messages) == warned and all("not fixed by the input spec" in message for message in messages)
    x = np.random.default_rng(0).standard_normal([2, 3, 11, 7]).astype("float32")
    ran = predict(create_predictor(str(tmp_path / "fp32"), int8=False, num_threads=1), x)[0]
    if not warned:
        np.testing.assert_allclose(ran, model(paddle.to_tensor(x)).numpy(), atol=1e-5)


class _ResizedToAnother(paddle.nn.Layer):
    """A segmentation head's upsample of a coarse map to the size of a finer one, given as
    ``paddle.shape(finer)[2:]`` (PaddleSeg's STDCSeg, PP-LiteSeg): 6x6 -> 16x16, no
    whole-number scale."""

    def __init__(self) -> None:
        super().__init__()
        self.fine = paddle.nn.Conv2D(3, 8, 3, 3)
        self.coarse = paddle.nn.Conv2D(8, 8, 3, 3, 1)
        self.head = paddle.nn.Conv2D(8, 4, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        fine = paddle.nn.functional.relu(self.fine(x))
        coarse = paddle.nn.functional.relu(self.coarse(fine))
        up = paddle.nn.functional.interpolate(coarse, paddle.shape(fine)[2:], mode="nearest")
        return self.head(up + fine)


def test_a_resize_to_another_tensors_fixed_size_is_exported_exactly(tmp_path, caplog) -> None:
    """Sized by ``paddle.shape`` of a tensor the spec fixes: the export reads the size from
    the traced shapes and writes the rows and columns Paddle's CPU kernel reads (before: a
    warning to fix a spec that was fixed, and oneDNN's rounding in Paddle Inference)."""
    paddle.seed(0)
    model = _ResizedToAnother()
    model.eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal([2, 3, 48, 48]).astype("float32")
    spec = [paddle.static.InputSpec([None, 3, 48, 48], "float32", "x")]
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        save_fp32_model(model, str(tmp_path / "fp32"), spec)
        ran = predict(create_predictor(str(tmp_path / "fp32"), int8=False, num_threads=1), x)[0]
        np.testing.assert_allclose(ran, model(paddle.to_tensor(x)).numpy(), atol=1e-5)
        batches = [paddle.to_tensor(rng.standard_normal([2, 3, 48, 48]).astype("float32")) for _ in range(3)]
        quantized = converted(model, batches)
        simulated = quantized(paddle.to_tensor(x)).numpy()
        save_quantized_model(quantized, str(tmp_path / "int8"), spec)
    assert "nearest resize" not in caplog.text
    np.testing.assert_allclose(
        predict(create_predictor(str(tmp_path / "int8"), num_threads=1), x)[0], simulated,
        atol=1e-5 * np.abs(simulated).max(),
    )
