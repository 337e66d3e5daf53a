"""Layers sharing one weight parameter (``b.weight = a.weight``): each calibrated layer is
quantized on a copy of its own. On the shared parameter the second layer quantized what the
first had put there, and the export (which finds a layer's ops by its weight's name) applied
one layer's record to both: 0.86 of the largest output off the simulation in Paddle
Inference, 1.2e-2 once the export alone copied the weight."""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

import imperative_ptq as ip
from imperative_ptq.export import create_predictor, predict
from models import converted, largest_error_in_onnx_runtime, largest_error_in_paddle_inference


class _TiedLayers(paddle.nn.Layer):
    """Two Linear layers on one weight (the first reads a signed input, the second a ReLU
    output), and two convs on one weight (a padded one reading the signed network input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = paddle.nn.Conv2D(4, 4, 3, padding=1)
        self.conv_b = paddle.nn.Conv2D(4, 4, 3, padding=1)
        self.conv_b.weight = self.conv_a.weight
        self.a, self.b = paddle.nn.Linear(64, 64), paddle.nn.Linear(64, 64)
        self.b.weight = self.a.weight
        self.head = paddle.nn.Linear(64, 5)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = self.conv_b(F.relu(self.conv_a(x))).flatten(1)
        return self.head(F.relu(self.b(F.relu(self.a(h)))))


def _batches(count: int, seed: int) -> list[paddle.Tensor]:
    rng = np.random.default_rng(seed)
    return [paddle.to_tensor(rng.standard_normal((4, 4, 4, 4)).astype(np.float32)) for _ in range(count)]


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_layers_sharing_a_weight_export_what_the_simulation_computes(target, tmp_path) -> None:
    paddle.seed(4)
    model = _TiedLayers()
    model.eval()
    qmodel = converted(model, _batches(4, 0), target)
    assert model.b.weight is model.a.weight and model.conv_b.weight is model.conv_a.weight  # untouched
    quantized = {name: layer for name, layer in qmodel.named_sublayers() if isinstance(layer, ip.QuantizedLayer)}
    assert {"a", "b"} <= set(quantized)
    assert quantized["a"].layer.weight is not quantized["b"].layer.weight
    x = _batches(1, 7)[0]
    simulated = qmodel(x).numpy()
    reference = model(x).numpy().ravel()
    assert simulated.ravel() @ reference / np.linalg.norm(simulated) / np.linalg.norm(reference) > 0.99
    assert largest_error_in_paddle_inference(qmodel, x.numpy(), tmp_path) < 2e-6
    assert largest_error_in_onnx_runtime(qmodel, x.numpy(), tmp_path) < 2e-6


class _TiedAutoencoder(paddle.nn.Layer):
    """A decoder multiplying by the quantized encoder Linear's weight, transposed."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = paddle.nn.Linear(20, 8)
        self.decoder_bias = self.create_parameter([20], is_bias=True)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        code = F.relu(self.encoder(x))
        return F.linear(code, self.encoder.weight.T, self.decoder_bias)


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_a_weight_read_transposed_beside_its_int8_layer(target, tmp_path) -> None:
    """The transpose read the weight variable the export had made int8, which Paddle
    Inference dequantized in place: 7.8e-2 .. 0.13 of the largest output off the simulation
    (and int8=False predictors refused the program)."""
    paddle.seed(8)
    model = _TiedAutoencoder()
    model.eval()
    rng = np.random.default_rng(8)
    batches = [paddle.to_tensor(rng.standard_normal((4, 20)).astype(np.float32)) for _ in range(4)]
    qmodel = converted(model, batches, target)
    assert isinstance(qmodel.encoder, ip.QuantizedLayer)
    x = rng.standard_normal((4, 20)).astype(np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) < 2e-6
    predict(create_predictor(str(tmp_path / "m"), int8=False), x)  # loads and runs
    assert largest_error_in_onnx_runtime(qmodel, x, tmp_path) < 2e-6


def _norm(channels: int) -> paddle.nn.BatchNorm2D:
    """A BatchNorm with statistics and an affine part far from the identity."""
    norm = paddle.nn.BatchNorm2D(channels)
    norm._mean.set_value(paddle.uniform([channels], min=-0.5, max=0.5))
    norm._variance.set_value(paddle.uniform([channels], min=0.5, max=2.0))
    norm.weight.set_value(paddle.uniform([channels], min=-1.5, max=1.5))
    return norm


class _ConvCalledTwice(paddle.nn.Layer):
    """One padded conv on two halves of a signed input, followed by the same BatchNorm on
    both calls (``"same"``: a siamese encoder), by one BatchNorm per call (``"each"``: a
    detection head shared by the pyramid levels), or by a BatchNorm on the first call only
    (``"first"``)."""

    def __init__(self, norms: str, groups: int = 1) -> None:
        super().__init__()
        self.norms = norms
        self.conv = paddle.nn.Conv2D(4, 4, 3, padding=1, groups=groups)
        self.norm_a = _norm(4)
        self.norm_b = self.norm_a if norms == "same" else _norm(4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        a, b = self.conv(x[:, :4]), self.conv(x[:, 4:])
        a = self.norm_a(a)
        b = b if self.norms == "first" else self.norm_b(b)
        return F.relu(a).mean([2, 3]) - F.relu(b).mean([2, 3])


def _two_halves(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((4, 8, 6, 6)).astype(np.float32) for _ in range(count)]


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
@pytest.mark.parametrize("norms, groups", [("same", 1), ("each", 1), ("each", 4), ("first", 1)])
def test_a_conv_called_twice_before_batch_norms_exports_what_it_simulates(
    norms, groups, target, tmp_path
) -> None:
    """Paddle Inference's conv + BatchNorm fuse passes fold into the filter the conv op reads,
    in place: on a filter shared by two calls (the conv kept fp32 on ``x86``: a padded conv
    on a signed input) the second fold landed on the first (1.4, 0.69 depthwise, 0.99 with
    the BatchNorm on one call only, of the largest output off the simulation); on
    ``x86-avx2`` the export's own fold of the halved conv's BatchNorm ran once per call (2.4
    off). Each call now gets a filter of its own, and the export folds once."""
    paddle.seed(3)
    model = _ConvCalledTwice(norms, groups)
    model.eval()
    qmodel = converted(model, [paddle.to_tensor(b) for b in _two_halves(4, 0)], target)
    x = _two_halves(1, 9)[0]
    if norms == "first" and target == "x86-avx2":
        # The BatchNorm convert folded into the halved weight reads one call only: refused
        # (the x86 export runs it as simulated, the case above).
        with pytest.raises(ValueError, match=r"cannot export 'conv' for target 'x86-avx2'.*target='x86'"):
            largest_error_in_paddle_inference(qmodel, x, tmp_path)
        return
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) < 2e-6
    assert largest_error_in_onnx_runtime(qmodel, x, tmp_path) < 2e-6


def test_the_fp32_export_of_a_conv_with_a_batch_norm_per_call_runs_as_the_model(tmp_path) -> None:
    from imperative_ptq.export import save_fp32_model

    paddle.seed(3)
    model = _ConvCalledTwice("each")
    model.eval()
    x = _two_halves(1, 9)[0]
    save_fp32_model(model, str(tmp_path / "fp32"), [paddle.static.InputSpec([None, 8, 6, 6], "float32")])
    ran = predict(create_predictor(str(tmp_path / "fp32")), x)[0]
    expected = model(paddle.to_tensor(x)).numpy()
    np.testing.assert_allclose(ran, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


class _HeadOnTwoLevels(paddle.nn.Layer):
    """A head conv shared by two pyramid levels, the first also read by a strided conv: the
    head calibrates one threshold on both levels, the strided conv another on the first."""

    def __init__(self) -> None:
        super().__init__()
        self.down = paddle.nn.Conv2D(4, 4, 3, stride=2, padding=1)
        self.head = paddle.nn.Conv2D(4, 2, 3, padding=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        a = F.relu(x)
        b = F.relu(self.down(a))
        return self.head(a).mean([2, 3]) + self.head(b).mean([2, 3])


@pytest.mark.parametrize("target", ["x86", "x86-avx2", "arm"])
def test_two_int8_readers_of_one_tensor_on_two_thresholds(target, tmp_path) -> None:
    """ONNX held the tensor on one Q/DQ, the last reader's grid: the head ran on the strided
    conv's (3e-2 of the largest output off the simulation)."""
    paddle.seed(0)
    model = _HeadOnTwoLevels()
    rng = np.random.default_rng(0)
    qmodel = converted(model, [paddle.to_tensor(rng.standard_normal((4, 4, 8, 8)).astype(np.float32)) for _ in range(4)], target)
    assert qmodel.down.input_thresholds[0] != qmodel.head.input_thresholds[0]
    x = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    if target != "arm":  # (Paddle Lite's kernels are not these)
        assert largest_error_in_paddle_inference(qmodel, x, tmp_path) < 2e-6
    assert largest_error_in_onnx_runtime(qmodel, x, tmp_path) < 2e-6


class _ConvPerLevelNorms(paddle.nn.Layer):
    """A conv shared by two inputs, a BatchNorm per call (EfficientDet's heads), or one
    BatchNorm without affine parameters (``bias_attr=False`` on both) read by an int8 conv."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        plain = dict(weight_attr=False, bias_attr=False) if kind.startswith("affine-free") else {}
        self.conv = paddle.nn.Conv2D(8, 8, 3, padding=1, bias_attr=None if kind == "affine-free, conv bias" else False if kind.startswith("affine-free") else None)
        self.norm_a = paddle.nn.BatchNorm2D(8, **plain)
        self.norm_b = paddle.nn.BatchNorm2D(8, **plain) if kind == "per call" else self.norm_a
        for norm in {id(n): n for n in (self.norm_a, self.norm_b)}.values():
            norm._mean.set_value(paddle.uniform([8], min=-0.5, max=0.5))
            norm._variance.set_value(paddle.uniform([8], min=0.5, max=2.0))
            if norm.weight is not None:
                norm.weight.set_value(paddle.uniform([8], min=0.5, max=1.5))
                norm.bias.set_value(paddle.uniform([8], min=-0.3, max=0.3))
        self.point_a, self.point_b = paddle.nn.Conv2D(8, 2, 1), paddle.nn.Conv2D(8, 2, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        a = F.relu(self.norm_a(self.conv(F.relu(x[:, :8]))))
        b = F.relu(self.norm_b(self.conv(F.relu(x[:, 8:]))))
        return paddle.concat([self.point_a(a).flatten(1), self.point_b(b).flatten(1)], 1)


@pytest.mark.parametrize("target", ["x86", "arm"])
@pytest.mark.parametrize("kind", ["per call", "affine-free", "affine-free, conv bias"])
def test_folded_biases_of_per_call_and_affine_free_norms_are_on_the_grid(kind, target, tmp_path) -> None:
    """ONNX Runtime folds each BatchNorm into its call and adds the folded bias as an int32:
    convert moved only a conv's bias with one BatchNorm reader (two BatchNorms: 9.5e-3 of the
    largest output off the simulation), and none without a beta (4.5e-3). Now each BatchNorm's
    beta moves, or the conv's bias, and a bias nothing can move is added in float."""
    paddle.seed(0)
    model = _ConvPerLevelNorms(kind)
    rng = np.random.default_rng(0)
    qmodel = converted(model, [paddle.to_tensor(rng.standard_normal((4, 16, 16, 16)).astype(np.float32)) for _ in range(4)], target)
    x = rng.standard_normal((4, 16, 16, 16)).astype(np.float32)
    if target != "arm":
        assert largest_error_in_paddle_inference(qmodel, x, tmp_path) < 2e-6
    assert largest_error_in_onnx_runtime(qmodel, x, tmp_path) < 2e-6
