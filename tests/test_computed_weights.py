"""Layers whose forward multiplies by a weight it computes (PixelCNN's and MADE's masked
layers, BiT's standardized convs): the runtimes fold that weight into an fp32 constant and run
the layer fp32, so convert keeps it fp32 too (it was simulated int8: a masked Conv2D 5.3e-3 of
the largest output off Paddle Inference, a MADE of two masked Linears 4.2e-2, two
standardized convs 0.11). Subclasses that multiply by the weight itself stay int8."""

from __future__ import annotations

import logging

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

import imperative_ptq as ip
from imperative_ptq.computed_weights import computes_its_weight, may_compute_its_weight
from models import converted, largest_error_in_onnx_runtime, largest_error_in_paddle_inference


class MaskedLinear(paddle.nn.Linear):
    """MADE's autoregressive Linear."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__(inputs, outputs)
        self.register_buffer("mask", paddle.tril(paddle.ones([inputs, outputs])))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MaskedConv2D(paddle.nn.Conv2D):
    """PixelCNN's type-A masked conv: no weight at or after the centre."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__(inputs, outputs, 3, padding=1)
        mask = np.ones([outputs, inputs, 3, 3], np.float32)
        mask[:, :, 1, 1:] = 0
        mask[:, :, 2:] = 0
        self.register_buffer("mask", paddle.to_tensor(mask))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=1)


class StandardizedConv2D(paddle.nn.Conv2D):
    """BiT's weight-standardized conv."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        weight = self.weight
        mean = weight.mean([1, 2, 3], keepdim=True)
        variance = weight.var([1, 2, 3], keepdim=True)
        return F.conv2d(x, (weight - mean) / paddle.sqrt(variance + 1e-5), self.bias, padding=1)


class ScaledLinear(paddle.nn.Linear):
    """A subclass that post-processes its output: int8 like a Linear."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return super().forward(x) * 2.0


class MatmulLinear(paddle.nn.Linear):
    """A subclass that multiplies by its weight through paddle.matmul: int8 like a Linear."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.matmul(x, self.weight) + self.bias


class ScaledConv1D(paddle.nn.Conv1D):
    """F.conv1d copies and unsqueezes the weight: still the weight itself."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return super().forward(x) * 0.5


class TransposedLinear(paddle.nn.Linear):
    """A weight transposed twice is a computed tensor: Paddle folds it into a constant."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return F.linear(x, self.weight.T.T, self.bias)


@pytest.mark.parametrize("layer, shape, computes", [
    (MaskedLinear(4, 3), [2, 4], True),
    (MaskedConv2D(2, 3), [1, 2, 5, 5], True),
    (StandardizedConv2D(2, 3, 3, padding=1), [1, 2, 5, 5], True),
    (TransposedLinear(4, 3), [2, 4], True),
    (ScaledLinear(4, 3), [2, 4], False),
    (MatmulLinear(4, 3), [2, 4], False),
    (ScaledConv1D(2, 3, 3), [1, 2, 6], False),
])
def test_computes_its_weight(layer, shape, computes) -> None:
    assert may_compute_its_weight(layer)
    assert computes_its_weight(layer, (paddle.randn(shape),), {}) is computes


def test_paddle_and_package_layers_are_not_checked() -> None:
    assert not may_compute_its_weight(paddle.nn.Conv2D(2, 3, 3))
    assert not may_compute_its_weight(paddle.nn.Linear(2, 3))
    assert not may_compute_its_weight(paddle.nn.ReLU())


class _Made(paddle.nn.Layer):
    """Masked layers beside plain ones and subclasses that multiply by their own weight."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = MaskedConv2D(2, 4)
        self.plain = paddle.nn.Conv2D(4, 4, 3, padding=1)
        self.masked = MaskedLinear(64, 16)
        self.matmul = MatmulLinear(16, 16)
        self.scaled = ScaledLinear(16, 5)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = F.relu(self.plain(F.relu(self.conv(x))))
        h = F.relu(self.matmul(F.relu(self.masked(h.flatten(1)))))
        return self.scaled(h)


def _batches(count: int, seed: int) -> list[paddle.Tensor]:
    rng = np.random.default_rng(seed)
    return [paddle.to_tensor(rng.random((4, 2, 4, 4)).astype(np.float32)) for _ in range(count)]


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_masked_layers_stay_fp32_and_the_runtimes_compute_the_simulation(
    target, tmp_path, caplog
) -> None:
    paddle.seed(3)
    model = _Made()
    model.eval()
    with caplog.at_level(logging.INFO, logger="imperative_ptq"):
        qmodel = converted(model, _batches(4, 0), target)
    assert "activation_matmul" not in caplog.text  # the check's forward made no site
    assert "2 layers multiply by a weight their forward computes" in caplog.text
    assert "keeps them fp32 too: conv, masked" in caplog.text
    quantized = {name for name, layer in qmodel.named_sublayers() if isinstance(layer, ip.QuantizedLayer)}
    assert quantized == {"plain", "matmul", "scaled"}
    x = _batches(1, 9)[0]
    simulated = qmodel(x).numpy()
    reference = model(x).numpy().ravel()
    assert simulated.ravel() @ reference / np.linalg.norm(simulated) / np.linalg.norm(reference) > 0.98
    assert largest_error_in_paddle_inference(qmodel, x.numpy(), tmp_path) < 2e-6
    assert largest_error_in_onnx_runtime(qmodel, x.numpy(), tmp_path) < 2e-6


def test_calibration_table_keeps_the_computed_weights(tmp_path) -> None:
    paddle.seed(3)
    model = _Made()
    model.eval()
    config = ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer())
    calibrating = ip.ImperativePTQ(config)
    qmodel = calibrating.quantize(model)
    for batch in _batches(2, 0):
        qmodel(batch)
    table = tmp_path / "table.json"
    calibrating.save_calibration_table(qmodel, table)
    loading = ip.ImperativePTQ(config)
    loaded = loading.quantize(model)
    loading.load_calibration_table(loaded, table)
    loading.convert(loaded)
    assert not isinstance(loaded.conv, ip.QuantizedLayer) and not isinstance(loaded.masked, ip.QuantizedLayer)
    assert isinstance(loaded.plain, ip.QuantizedLayer)


def test_analyze_of_a_model_convert_left_fp32_says_so() -> None:
    """It said to call convert first, which had been called."""
    paddle.seed(5)
    model = paddle.nn.Sequential(MaskedLinear(8, 8), paddle.nn.ReLU(), MaskedLinear(8, 4))
    model.eval()
    batches = [paddle.randn([4, 8]) for _ in range(2)]
    qmodel = converted(model, batches)
    with pytest.raises(ValueError, match="converted but has no QuantizedLayer: convert kept every calibrated layer fp32"):
        ip.analyze(model, qmodel, batches)


class _CalledOnce(paddle.nn.Linear):
    """A subclass whose forward refuses a second call on the same input."""

    def __init__(self) -> None:
        super().__init__(8, 4)
        self.seen: set[int] = set()

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if id(x) in self.seen:
            raise RuntimeError("called twice")
        self.seen.add(id(x))
        return super().forward(x)


def test_a_forward_that_cannot_run_twice_is_calibrated_as_its_own_weight(caplog) -> None:
    paddle.seed(6)
    model = paddle.nn.Sequential(_CalledOnce())
    model.eval()
    with caplog.at_level(logging.INFO, logger="imperative_ptq"):
        qmodel = converted(model, [paddle.randn([4, 8]) for _ in range(2)])
    assert "could not check which weight its forward multiplies by (RuntimeError: called twice)" in caplog.text
    assert isinstance(qmodel[0], ip.QuantizedLayer)
