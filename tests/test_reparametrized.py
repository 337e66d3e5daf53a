"""Layers under ``paddle.nn.utils.weight_norm`` / ``spectral_norm`` (a forward-pre-hook
recomputes ``weight`` on every call): ``quantize`` folds the eval-mode weight back into a
parameter of its copy, which is calibrated, simulated and exported like any other weight."""

from __future__ import annotations

import copy
import logging

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.export import export_onnx, int8_report
from imperative_ptq.reparametrized import fold_weight_reparametrizations
from avx2_kernels import paddle_inference_outputs

nn = paddle.nn
F = nn.functional


class _Reparametrized(nn.Layer):
    """Weight-normed Conv1D and Conv2D, a spectral-normed Linear, a plain Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.utils.weight_norm(nn.Conv1D(4, 8, 3, padding=1))
        self.conv2d = nn.utils.weight_norm(nn.Conv2D(8, 8, 3, padding=1), dim=1)
        self.linear = nn.utils.spectral_norm(nn.Linear(8, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = F.relu(self.conv1d(x))  # [batch, 8, length]
        y = F.relu(self.conv2d(y.unsqueeze(-1))).squeeze(-1).mean(-1)
        return self.head(F.relu(self.linear(y)))


def _batches(count: int, seed: int) -> list[paddle.Tensor]:
    rng = np.random.default_rng(seed)
    return [paddle.to_tensor(rng.standard_normal((4, 4, 10)).astype("float32")) for _ in range(count)]


def _model() -> _Reparametrized:
    paddle.seed(0)
    model = _Reparametrized()
    model.train()
    model(_batches(1, 7)[0])  # a training call: spectral norm's power iteration moves u, v
    model.eval()
    return model


def test_folded_weights_are_the_eval_weights_and_the_model_is_untouched() -> None:
    model = _model()
    before = {name: value.numpy().copy() for name, value in model.state_dict().items()}
    x = _batches(1, 3)[0]
    expected = model(x).numpy()
    folded = copy.deepcopy(model)
    assert fold_weight_reparametrizations(folded) == ["conv1d", "conv2d", "linear"]
    for name in ("conv1d", "conv2d", "linear"):
        layer = getattr(folded, name)
        assert isinstance(layer.weight, paddle.base.framework.EagerParamBase)
        assert not layer._forward_pre_hooks
        assert [key for key in layer.state_dict() if key != "bias"] == ["weight"]
        # Reference: the weight the hook computes in eval mode, read off the model itself.
        np.testing.assert_array_equal(layer.weight.numpy(), getattr(model, name).weight.numpy())
    np.testing.assert_allclose(folded(x).numpy(), expected, rtol=0, atol=1e-6)
    # Paddle's own removal gives the weight-normed layers the same weights.
    removed = copy.deepcopy(model)
    nn.utils.remove_weight_norm(removed.conv1d)
    np.testing.assert_array_equal(removed.conv1d.weight.numpy(), folded.conv1d.weight.numpy())
    assert {name: value.numpy() for name, value in model.state_dict().items()}.keys() == before.keys()
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), before[name])


@pytest.mark.parametrize("target", ["x86", "x86-vnni"])
@pytest.mark.usefixtures("linear_layers_as_fc")  # counts the head as a fc
def test_reparametrized_layers_run_int8_as_simulated(target, tmp_path, avx2_runner) -> None:
    """Measured before (a weight-normed Conv1D, x86): Paddle Inference 3.7e-2 of the largest
    output off the simulation, which quantized the conv's input but ran the weight the hook
    recomputed in float, while the export ran that conv fp32; 1.6e-7 after."""
    onnxruntime = pytest.importorskip("onnxruntime")
    if target == "x86-vnni" and not ip.cpu_info().vnni:
        pytest.skip("x86-vnni runs signed int8 inputs, which saturate without VNNI")
    model = _model()
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=target))
    quantized = ptq.quantize(model)
    ptq.calibrate(quantized, _batches(3, 0), progress=False)
    ptq.convert(quantized)
    assert all(isinstance(getattr(quantized, name), ip.QuantizedLayer) for name in ("conv2d", "linear", "head"))
    assert model.conv1d._forward_pre_hooks and "weight_g" in model.conv1d._parameters  # untouched
    x = _batches(1, 5)[0].numpy()
    simulated = quantized(paddle.to_tensor(x)).numpy()
    spec = [paddle.static.InputSpec([None, 4, 10], "float32", "x")]
    prefix = str(tmp_path / "m")
    ptq.save_quantized_model(quantized, prefix, spec)
    report = int8_report(prefix)
    # x86 keeps the first conv (signed input, padded) fp32; the others run int8.
    assert report.int8 == ({"fused_conv2d": 1, "fc": 2} if target == "x86" else {"fused_conv2d": 2, "fc": 2}), report
    largest = np.abs(simulated).max()
    for ran, in paddle_inference_outputs(prefix, [x], avx2_runner if target == "x86" else None).values():
        assert np.abs(ran - simulated).max() <= 1e-5 * largest
    session = onnxruntime.InferenceSession(export_onnx(quantized, prefix + ".onnx", spec),
                                           providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"x": x})[0] - simulated).max() <= 1e-5 * largest


class _ScaledWeight:
    """A reparametrization this package does not know: ``weight = raw * scale``."""

    def __call__(self, layer: nn.Layer, inputs) -> None:
        layer.weight = layer.raw * 0.5


class _Custom(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.fc.raw = self.fc.weight
        del self.fc._parameters["weight"]
        self.fc.add_parameter("raw", self.fc.raw)
        self.fc.register_forward_pre_hook(_ScaledWeight())
        self.fc.weight = self.fc.raw * 0.5
        self.head = nn.Linear(6, 2)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(F.relu(self.fc(x)))


@pytest.mark.usefixtures("linear_layers_as_fc")  # counts the head as a fc
def test_a_weight_computed_by_another_hook_stays_fp32_with_a_warning(tmp_path, caplog) -> None:
    paddle.seed(0)
    model = _Custom()
    model.eval()
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer()))
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        quantized = ptq.quantize(model)
    assert any(r.getMessage().startswith("fc (Linear) stays fp32: its weight is a tensor") for r in caplog.records)
    rng = np.random.default_rng(0)
    ptq.calibrate(quantized, [paddle.to_tensor(rng.standard_normal((4, 6)).astype("float32")) for _ in range(2)], progress=False)
    ptq.convert(quantized)
    assert not isinstance(quantized.fc, ip.QuantizedLayer) and isinstance(quantized.head, ip.QuantizedLayer)
    x = rng.standard_normal((4, 6)).astype("float32")
    simulated = quantized(paddle.to_tensor(x)).numpy()
    prefix = str(tmp_path / "m")
    ptq.save_quantized_model(quantized, prefix, [paddle.static.InputSpec([None, 6], "float32", "x")])
    assert int8_report(prefix).int8 == {"fc": 1}
    for ran, in paddle_inference_outputs(prefix, [x], None).values():
        assert np.abs(ran - simulated).max() <= 1e-5 * np.abs(simulated).max()
