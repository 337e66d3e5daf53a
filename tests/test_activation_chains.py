"""Two activations in a row after a conv or Linear (``relu`` then ``sigmoid``): Paddle 3.3.1's
oneDNN passes fuse both into the conv/fc, the second replacing the first, unless the export
separates them (``export.graph.separate_chained_activations``). Checked in Paddle Inference
against dygraph (fp32 export) and against the simulation (int8 export)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.export import create_predictor, predict
from imperative_ptq.export.paddle_export import save_fp32_model
from imperative_ptq.export.legacy_program import legacy_static_mode, load_legacy_program
from models import X86_TARGETS

F = paddle.nn.functional

#: Measured before the separation (fp32, natively): conv relu > sigmoid 50% of the largest
#: output off, fc gelu > tanh 82%, fc abs > sqrt NaN.
CHAINS: dict[str, Callable[[paddle.Tensor], paddle.Tensor]] = {
    "relu>sigmoid": lambda y: F.sigmoid(F.relu(y)),
    "gelu>tanh": lambda y: paddle.tanh(F.gelu(y)),
    "abs>sqrt": lambda y: paddle.sqrt(paddle.abs(y)),
    "leaky_relu>tanh": lambda y: paddle.tanh(F.leaky_relu(y, 0.2)),
    "relu6>sigmoid>tanh": lambda y: paddle.tanh(F.sigmoid(F.relu6(y))),
    # Paddle Inference removes the dropout (measured 50% off on a conv before).
    "relu>dropout>sigmoid": lambda y: F.sigmoid(F.dropout(F.relu(y), 0.1, training=False)),
}


class _Chain(paddle.nn.Layer):
    def __init__(self, chain: Callable, conv: bool) -> None:
        super().__init__()
        self.layer = paddle.nn.Conv2D(4, 8, 1) if conv else paddle.nn.Linear(8, 8)
        self.chain = chain

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.chain(self.layer(x))


@pytest.mark.parametrize("conv", [True, False], ids=["conv", "fc"])
@pytest.mark.parametrize("name", sorted(CHAINS))
def test_the_fp32_export_runs_both_activations(name, conv, tmp_path) -> None:
    paddle.seed(0)
    model = _Chain(CHAINS[name], conv)
    model.eval()
    shape = [None, 4, 4, 8] if conv else [None, 4, 8]
    prefix = str(tmp_path / "m")
    save_fp32_model(model, prefix, [paddle.static.InputSpec(shape, "float32", "x")])
    x = np.random.default_rng(0).standard_normal([2, *shape[1:]]).astype("float32")
    ran = predict(create_predictor(prefix, int8=False, num_threads=1), x)[0]
    np.testing.assert_allclose(ran, model(paddle.to_tensor(x)).numpy(), rtol=1e-5, atol=1e-5)
    with legacy_static_mode():
        types = [op.type for op in load_legacy_program(prefix).program.global_block().ops]
    assert types.count("scale") == name.replace(">dropout", "").count(">"), types


class _Int8Chain(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.conv2 = paddle.nn.Conv2D(8, 4, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.conv2(F.sigmoid(F.relu(self.conv1(x))))


def test_the_int8_export_runs_both_activations(tmp_path, avx2_runner) -> None:
    from avx2_kernels import paddle_inference_outputs

    paddle.seed(0)
    rng = np.random.default_rng(0)
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(_Int8Chain())
    ptq.calibrate(qmodel, [rng.random((2, 3, 8, 8)).astype("float32") for _ in range(3)], progress=False)
    ptq.convert(qmodel)
    prefix = str(tmp_path / "m")
    ptq.save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")])
    x = rng.random((4, 3, 8, 8)).astype("float32")
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    for kernels, (ran,) in paddle_inference_outputs(prefix, [x], avx2_runner).items():
        assert np.abs(ran - simulated).max() <= 1e-5 * np.abs(simulated).max(), kernels


class _PoolThenActivation(paddle.nn.Layer):
    """A conv, an ``nn.MaxPool2D`` layer, ``activation`` and an int8 1x1 conv reading it."""

    def __init__(self, activation: paddle.nn.Layer) -> None:
        super().__init__()
        self.conv = paddle.nn.Conv2D(8, 8, 3, padding=1)
        self.pool = paddle.nn.MaxPool2D(2, 2)
        self.activation = activation
        self.head = paddle.nn.Conv2D(8, 8, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(self.activation(self.pool(self.conv(x))))


@pytest.mark.parametrize("target", X86_TARGETS)
@pytest.mark.parametrize(
    "activation", [paddle.nn.ReLU, paddle.nn.ReLU6, paddle.nn.Sigmoid, paddle.nn.Hardswish, paddle.nn.GELU, paddle.nn.Tanh],
    ids=["relu", "relu6", "sigmoid", "hardswish", "gelu", "tanh"],
)
def test_an_activation_after_a_max_pool_layer_runs_as_simulated(activation, target, tmp_path, avx2_runner) -> None:
    """Paddle Inference ran the pool int8 on its own calibrated scale, so the values were
    rounded on the pool's grid and again on the head's, where the simulation pools in float
    (before: 1.2e-2 of the largest output off with a ReLU, 1.5e-2 with a Sigmoid, on both
    ``x86`` and ``x86-vnni``; the signed activations on ``x86-vnni``)."""
    from models import converted, largest_error_in_paddle_inference

    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal((4, 8, 8, 8)).astype(np.float32)) for _ in range(4)]
    qmodel = converted(_PoolThenActivation(activation()), batches, target)
    assert isinstance(qmodel.head, ip.QuantizedLayer)
    x = rng.standard_normal((4, 8, 8, 8)).astype(np.float32)
    runner = avx2_runner if target == "x86" else None
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=runner) < 2e-6


def test_resnet_stem_max_pool_stays_int8(tmp_path) -> None:
    """Only a pool the traced model's activations read loses its scale, not one the export's
    own ReLU copy of an identity shortcut reads (without it ResNet-18 ran 2.2-2.6x fp32
    instead of 3.1-3.2x on a Zen 5 EPYC, measured side by side)."""
    from imperative_ptq.export import int8_report
    from models import converted, largest_error_in_paddle_inference

    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal((2, 3, 64, 64)).astype(np.float32)) for _ in range(2)]
    qmodel = converted(paddle.vision.models.resnet18(), batches, "x86")
    x = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) < 2e-6
    assert int8_report(tmp_path / "m").int8_other.get("pool2d") == 2  # the stem's and the head's
    with legacy_static_mode():
        program = load_legacy_program(str(tmp_path / "m")).program
    stem_pool = next(op for op in program.global_block().ops if op.type == "pool2d")
    assert stem_pool.has_attr("out_threshold")


class _AbsBetweenInt8Layers(paddle.nn.Layer):
    """An int8 conv or Linear, ``paddle.abs`` and an int8 layer reading it."""

    def __init__(self, conv: bool) -> None:
        super().__init__()
        self.first = paddle.nn.Conv2D(3, 16, 3, padding=1) if conv else paddle.nn.Linear(12, 32)
        self.second = paddle.nn.Conv2D(16, 8, 1) if conv else paddle.nn.Linear(32, 8)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.second(paddle.abs(self.first(x)))


@pytest.mark.parametrize("target", X86_TARGETS)
@pytest.mark.parametrize("conv", [True, False], ids=["conv", "fc"])
def test_abs_before_an_int8_layer_runs_as_simulated(conv, target, tmp_path, avx2_runner) -> None:
    """Paddle's activation passes fuse ``abs`` into the conv/fc first and then the u8 clip in
    front of the next layer's quantize op over it, as a ReLU (before: 54% of the largest output
    off the simulation with a conv, 71% with a Linear, on every x86 target); the clip is an
    ``elementwise_min`` there, which no pass fuses."""
    from models import converted, largest_error_in_paddle_inference

    paddle.seed(0)
    rng = np.random.default_rng(0)
    shape = (2, 3, 16, 16) if conv else (8, 12)
    batches = [paddle.to_tensor(rng.random(shape).astype(np.float32)) for _ in range(3)]
    qmodel = converted(_AbsBetweenInt8Layers(conv), batches, target)
    assert isinstance(qmodel.second, ip.QuantizedLayer)
    x = rng.random(shape).astype(np.float32)
    runner = avx2_runner if target == "x86" else None
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=runner) < 2e-6


class _ConvRReLU(paddle.nn.Layer):
    """A conv, ``nn.RReLU`` (in eval mode a leaky ReLU of slope ``(lower + upper) / 2``) and an
    int8 1x1 conv reading it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.rrelu, self.head = paddle.nn.Conv2D(3, 8, 3), paddle.nn.RReLU(), paddle.nn.Conv2D(8, 4, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(self.rrelu(self.conv(x)))


def test_rrelu_runs_in_paddle_inference(tmp_path) -> None:
    """Paddle saves ``rrelu`` without the ``Noise`` output its kernel writes: both exports
    built a predictor that failed at its first run ("Required tensor shall not be nullptr ...
    [operator < rrelu > error]"). They write the leaky ReLU it computes."""
    from models import converted, largest_error_in_paddle_inference

    paddle.seed(0)
    rng = np.random.default_rng(0)
    model = _ConvRReLU()
    model.eval()
    x = rng.standard_normal((2, 3, 10, 10)).astype(np.float32)
    prefix = str(tmp_path / "fp32")
    save_fp32_model(model, prefix, [paddle.static.InputSpec([None, 3, 10, 10], "float32", "x")])
    ran = predict(create_predictor(prefix, int8=False, num_threads=1), x)[0]
    np.testing.assert_allclose(ran, model(paddle.to_tensor(x)).numpy(), rtol=1e-5, atol=1e-5)
    batches = [paddle.to_tensor(rng.standard_normal((2, 3, 10, 10)).astype(np.float32)) for _ in range(3)]
    qmodel = converted(model, batches, "x86")
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) < 2e-6
