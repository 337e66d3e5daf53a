"""Convolutions on filters the graph computes: from the network's input (RTFormer's cross
attention, a tracker's cross-correlation) or from a parameter (a standardized weight). No
layer holds such a filter, so the conv runs fp32, beside int8 layers reading the same input,
in Paddle Inference and ONNX Runtime as simulated."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.export import create_predictor, export_onnx, int8_report, predict

F = paddle.nn.functional


class ComputedFilter(paddle.nn.Layer):
    """A ReLU read by an int8 1x1 conv and by a conv whose filter is computed in the graph."""

    def __init__(self, filter_from: str) -> None:
        super().__init__()
        self.filter_from = filter_from
        self.stem = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.beside = paddle.nn.Conv2D(8, 8, 1)
        self.template = paddle.nn.Conv2D(8, 8, 1)
        self.key = paddle.nn.Conv2D(8, 64, 1)
        self.weight = self.create_parameter([8, 8, 3, 3])
        self.head = paddle.nn.Conv2D(8, 8, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = F.relu(self.stem(x))
        if self.filter_from == "input, depthwise 3x3":  # a cross-correlation with the first image's template
            template = F.adaptive_avg_pool2d(self.template(y), 3)[0:1]
            computed = F.conv2d(y, template.reshape([8, 1, 3, 3]), padding=1, stride=2, groups=8)
        elif self.filter_from.startswith("input, 1x1"):  # RTFormer's cross attention: keys as a 1x1 filter
            keys = F.adaptive_avg_pool2d(self.key(y), 1)[0:1]
            computed = F.conv2d(y, keys.reshape([8, 8, 1, 1]), stride=2)
            if self.filter_from == "input, 1x1 twice":  # a second filter from the first one's output
                computed = F.conv2d(computed, F.adaptive_avg_pool2d(computed, 1)[0:1].reshape([8, 1, 1, 1]), groups=8)
        else:  # a parameter (weight standardization)
            centred = self.weight - self.weight.mean(axis=[1, 2, 3], keepdim=True)
            computed = F.conv2d(y, centred, padding=1, stride=2)
        return self.head(F.relu(computed)) + F.max_pool2d(self.beside(y), 2)


def _converted(filter_from: str, target: str) -> tuple[paddle.nn.Layer, np.ndarray, np.ndarray]:
    """The calibrated, converted model, a test batch and its simulated output."""
    from models import converted

    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal([2, 3, 16, 16]).astype("float32")) for _ in range(4)]
    with paddle.no_grad():
        qmodel = converted(ComputedFilter(filter_from), batches, target)
    assert isinstance(qmodel.beside, ip.QuantizedLayer)
    x = rng.standard_normal([3, 3, 16, 16]).astype("float32")
    with paddle.no_grad():
        simulated = qmodel(paddle.to_tensor(x)).numpy()
    return qmodel, x, simulated


_FILTERS = ["input, depthwise 3x3", "input, 1x1", "input, 1x1 twice", "parameter"]
_SPEC = [paddle.static.InputSpec([None, 3, 16, 16], "float32", "x")]


@pytest.mark.parametrize("filter_from", _FILTERS)
def test_paddle_inference_runs_a_conv_on_a_computed_filter(filter_from, tmp_path, caplog) -> None:
    """Paddle 3.3.1's int8 pipeline reads every conv2d's filter from its parameters
    (``compute_propagate_scales_onednn_pass``): one conv on a filter computed from the input
    made the whole model fail to load ("The input persistable var [reshape2_2.tmp_0] of
    [fused_conv2d] op is not found"), a plain ``paddle.jit.save`` program too. Written as a
    conv3d of depth 1, it runs fp32 as simulated."""
    qmodel, x, simulated = _converted(filter_from, "x86")
    prefix = str(tmp_path / "m")
    with caplog.at_level("WARNING"):
        ip.ImperativePTQ().save_quantized_model(qmodel, prefix, _SPEC)
    computed = 2 if filter_from.endswith("twice") else 1
    assert f"{computed} convs on weights computed in the graph run fp32" in caplog.text
    ran = predict(create_predictor(prefix), x)[0]
    # Measured 1.5e-7 .. 2.0e-7.
    assert np.abs(ran - simulated).max() / np.abs(simulated).max() <= 2e-6
    report = int8_report(prefix)
    # int8: beside, head and (for a filter from the input) template or key; fp32: the stem (a
    # padded conv on a signed input, on x86) and the convs on computed filters.
    assert sum(report.int8.values()) == (3 if filter_from.startswith("input") else 2), report
    assert sum(report.fp32.values()) == 1 + computed, report


@pytest.mark.parametrize("target", ["arm", "x86"])
@pytest.mark.parametrize("filter_from", _FILTERS)
def test_onnx_runtime_runs_a_conv_on_a_computed_filter_on_the_float_input(filter_from, target, tmp_path) -> None:
    """The float conv reads the ReLU's float value, not the codes of the int8 1x1 conv beside
    it (measured before: 0.31 of the largest output off, input-dependent 3x3 filter)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    qmodel, x, simulated = _converted(filter_from, target)
    path = export_onnx(qmodel, str(tmp_path / "m.onnx"), _SPEC)
    ran = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    # Measured 5e-8 .. 3.4e-7.
    assert np.abs(ran - simulated).max() / np.abs(simulated).max() <= 2e-6
