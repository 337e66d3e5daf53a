"""A concat's scale stays off the float ops beside it: Paddle Inference propagates a scaled
concat's scale back onto its inputs, so the int8 layer writing one wrote codes on the concat's
grid for its float readers too, and a product of two scaled activations ran int8, where the
simulation computes them in float and quantizes the concat once
(``export.float_readers.keep_concat_scales_off_float_ops``)."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from avx2_kernels import paddle_inference_outputs
from imperative_ptq.export import save_quantized_model
from models import X86_TARGETS, converted, largest_error_in_onnx_runtime, largest_error_in_paddle_inference
from ties import relative_error, simulation_up_to_ties

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


class _ReadBesideConcat(nn.Layer):
    """A conv output joined into a concat for an int8 head and also read by ``reader`` (a
    pool, a resize, a layout op), whose output the network returns."""

    def __init__(self, reader) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2D(4, 8, 3, padding=1), nn.Conv2D(4, 8, 3, padding=1)
        self.head = nn.Conv2D(16, 8, 1)
        self.reader = reader

    def forward(self, x: paddle.Tensor) -> list[paddle.Tensor]:
        a = self.a(x)
        return [self.head(paddle.concat([a, self.b(x)], axis=1)), self.reader(a)]


READERS = {
    "max-pool": lambda a: F.max_pool2d(a, 2, 2),
    "avg-pool": lambda a: F.avg_pool2d(a, 2, 2),
    "upsample": lambda a: F.interpolate(a, scale_factor=2, mode="nearest"),
    "slice": lambda a: a[:, :4],
    "transpose": lambda a: a.transpose([0, 2, 3, 1]),
}


@pytest.mark.parametrize("target", X86_TARGETS)
@pytest.mark.parametrize("reader", list(READERS))
def test_a_pool_or_layout_op_beside_a_scaled_concat_runs_in_float(reader, target, tmp_path) -> None:
    """Paddle propagated the concat's scale onto ``a`` and across the op reading it too, ran
    that op int8 and returned its output on the concat's grid (before, on x86-vnni: 4.4e-3 of
    the largest output off, the average pool 1.7e-2; a BiFPN's max-pooled input 1.4e-2)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    shape = (4, 4, 8, 8)
    qmodel = converted(
        _ReadBesideConcat(READERS[reader]), [paddle.to_tensor(rng.standard_normal(shape).astype(np.float32)) for _ in range(4)],
        target,
    )
    x = rng.standard_normal(shape).astype(np.float32)
    prefix = str(tmp_path / "m")
    save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, *shape[1:]], "float32", "x")])
    for index, ran in enumerate(paddle_inference_outputs(prefix, [x], None)["native"]):
        simulated, _ = simulation_up_to_ties(lambda: qmodel(paddle.to_tensor(x))[index].numpy(), ran, 2e-6)
        assert relative_error(ran, simulated) < 2e-6, index


class _NormedBranches(nn.Layer):
    """Two conv -> BatchNorm -> ReLU branches on the (signed) input, fp32 on ``x86``, joined
    into an int8 1x1 conv; the first ReLU's max-pool is returned."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = (
            nn.Sequential(nn.Conv2D(8, 8, 3, padding=1, bias_attr=False), nn.BatchNorm2D(8), nn.ReLU()) for _ in range(2)
        )
        self.head = nn.Conv2D(16, 4, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        o = self.a(x)
        return self.head(paddle.concat([o, self.b(x)], axis=1)) + F.max_pool2d(o, 2, 2).mean()


@pytest.mark.parametrize("target", X86_TARGETS)
def test_a_pooled_relu_of_an_fp32_conv_and_norm_beside_a_concat_runs_in_float(target, tmp_path) -> None:
    """The walk from a concat to the fp32 conv beside it stopped at the BatchNorm: the ReLU
    kept its scale and Paddle pooled its u8 codes (before, on x86: 4.4e-3 of the largest
    output off)."""
    from models import randomize_batch_norm_statistics

    paddle.seed(0)
    model = _NormedBranches()
    randomize_batch_norm_statistics(model, seed=0)
    rng = np.random.default_rng(0)
    shape = (4, 8, 16, 16)
    qmodel = converted(model, [paddle.to_tensor(rng.standard_normal(shape).astype(np.float32)) for _ in range(4)], target)
    x = rng.standard_normal(shape).astype(np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) < 2e-6


class _DenseBlock(nn.Layer):
    """DenseNet's first block: a stem max-pool (u8) and the signed 3x3 conv outputs it is
    concatenated with, each concat read by the next layer's BatchNorm in float."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2D(3, 8, 3, padding=1), nn.BatchNorm2D(8), nn.ReLU(), nn.MaxPool2D(2))
        self.layers = nn.LayerList([
            nn.Sequential(
                nn.BatchNorm2D(8 + 4 * i), nn.ReLU(), nn.Conv2D(8 + 4 * i, 16, 1), nn.BatchNorm2D(16), nn.ReLU(),
                nn.Conv2D(16, 4, 3, padding=1),
            )
            for i in range(layers)
        ])
        self.head = nn.Sequential(nn.BatchNorm2D(8 + 4 * layers), nn.ReLU(), nn.Conv2D(8 + 4 * layers, 8, 1))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        features = self.stem(x)
        for layer in self.layers:
            features = paddle.concat([features, layer(features)], 1)
        return self.head(features)


def test_a_dense_blocks_batch_norms_run_in_onednns_blocked_layout(tmp_path) -> None:
    """The copy that keeps scales off a concat of mixed signs no int8 layer reads is an identity
    scale op, which keeps oneDNN's blocked layout: as an assign (NCHW) the BatchNorms behind it
    ran oneDNN's plain-layout kernel (DenseNet-121: 5.9 ms at batch 1 against 1.3 ms for all 62
    in fp32; int8 1.21x -> 1.60x its fp32 speed). As simulated either way."""
    from checkout import onednn_executions
    from models import converted_with_input

    qmodel, x = converted_with_input(_DenseBlock, [2, 3, 32, 32])
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) < 2e-6
    norms = onednn_executions(tmp_path / "m", x, tmp_path, "batch_normalization")
    assert norms and all("ncsp_bnorm" not in line for line in norms), norms
