"""Paddle Inference's ``reshape_transpose_matmul_onednn_fuse_pass`` computes a matmul reading a
transpose of a reshape with a size-1 dimension wrongly (a PyTorch-exported encoder's
attention, sequence first at batch 1): ``create_predictor`` leaves the pass out for such a
program, fp32 and int8, and keeps it for the usual attention reshapes."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import paddle
import pytest

from imperative_ptq.export import create_predictor, predict, save_fp32_model, save_quantized_model
from models import converted

PASS = "reshape_transpose_matmul_onednn_fuse_pass"


class _ReshapedTransposedProduct(paddle.nn.Layer):
    """``a @ transpose(reshape(v, shape), axes)``, as x2paddle writes a seq-first attention."""

    def __init__(self, shape: list[int], axes: list[int]) -> None:
        super().__init__()
        self.shape, self.axes = shape, axes

    def forward(self, a: paddle.Tensor, v: paddle.Tensor) -> paddle.Tensor:
        return paddle.matmul(a, paddle.transpose(paddle.reshape(v, self.shape), perm=self.axes))


def _inputs(shape: list[int], axes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    transposed = [shape[axis] for axis in axes]
    a = rng.standard_normal(transposed[:-2] + [6, transposed[-2]]).astype(np.float32)
    v = rng.standard_normal([shape[0], shape[1] * shape[2], shape[3]]).astype(np.float32)
    return a, v


def _spec(a: np.ndarray, v: np.ndarray) -> list[paddle.static.InputSpec]:
    return [paddle.static.InputSpec(list(a.shape), "float32", "a"), paddle.static.InputSpec(list(v.shape), "float32", "v")]


@pytest.mark.parametrize("axes", [list(axes) for axes in itertools.permutations(range(4))])
def test_every_axis_order_of_a_reshape_with_a_size_one_dimension_runs_as_in_dygraph(axes, tmp_path, caplog) -> None:
    """Before: 4 of the 24 orders ([1, 2, 0, 3], [1, 2, 3, 0], [2, 1, 0, 3], [2, 1, 3, 0])
    came out wrong (the values of other elements); all 24 are right without a size-1 dim."""
    shape = [3, 1, 4, 5]
    model = _ReshapedTransposedProduct(shape, axes)
    a, v = _inputs(shape, axes)
    expected = model(paddle.to_tensor(a), paddle.to_tensor(v)).numpy()
    prefix = str(tmp_path / "m")
    save_fp32_model(model, prefix, _spec(a, v))
    with caplog.at_level(logging.INFO, logger="imperative_ptq.export"):
        ran = predict(create_predictor(prefix, int8=False, num_threads=1), a, v)[0]
    np.testing.assert_allclose(ran, expected, rtol=1e-5, atol=1e-5)
    assert (f"{PASS} left out" in caplog.text) == (axes != [0, 1, 2, 3]), caplog.text


def test_the_pass_stays_for_reshapes_without_a_size_one_dimension(tmp_path, caplog) -> None:
    shape, axes = [3, 2, 4, 5], [0, 2, 1, 3]
    model = _ReshapedTransposedProduct(shape, axes)
    a, v = _inputs(shape, axes)
    prefix = str(tmp_path / "m")
    save_fp32_model(model, prefix, _spec(a, v))
    with caplog.at_level(logging.INFO, logger="imperative_ptq.export"):
        ran = predict(create_predictor(prefix, int8=False, num_threads=1), a, v)[0]
    np.testing.assert_allclose(ran, model(paddle.to_tensor(a), paddle.to_tensor(v)).numpy(), rtol=1e-5, atol=1e-5)
    assert PASS not in caplog.text


class _SeqFirstAttention(paddle.nn.Layer):
    """A sequence-first attention at batch 1 as x2paddle writes PyTorch's export of
    ``nn.MultiheadAttention``: Linear q/k/v, reshapes ``[L, 1, heads, d]`` and transposes
    ``[1, 2, 0, 3]``."""

    def __init__(self, length: int = 12, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.length, self.width, self.heads = length, width, heads
        self.q, self.k, self.v = (paddle.nn.Linear(width, width) for _ in range(3))
        self.out = paddle.nn.Linear(width, width)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        shape = [self.length, 1, self.heads, self.width // self.heads]
        q = paddle.transpose(paddle.reshape(self.q(x), shape), perm=[1, 2, 0, 3])
        k = paddle.transpose(paddle.reshape(self.k(x), shape), perm=[1, 2, 3, 0])
        v = paddle.transpose(paddle.reshape(self.v(x), shape), perm=[1, 2, 0, 3])
        weights = paddle.nn.functional.softmax(paddle.matmul(q, k) / 8.0, axis=-1)
        context = paddle.transpose(paddle.matmul(weights, v), perm=[2, 0, 1, 3])
        return self.out(paddle.reshape(context, [self.length, self.width]))


@pytest.mark.parametrize("target", ["x86", "x86-vnni"])
def test_an_int8_seq_first_attention_runs_as_simulated(target, tmp_path) -> None:
    """Before: 0.83 of the largest output off its simulation on ``x86`` for such an encoder
    (its fp32 export 0.87 off dygraph)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal([12, 32]).astype(np.float32)) for _ in range(3)]
    qmodel = converted(_SeqFirstAttention(), batches, target)
    x = rng.standard_normal([12, 32]).astype(np.float32)
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    prefix = str(tmp_path / "m")
    save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([12, 32], "float32", "x")])
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    assert np.abs(ran - simulated).max() <= 1e-3 * np.abs(simulated).max(), np.abs(ran - simulated).max()
