"""NaN/Inf weights and thresholds are refused at convert and at export, naming the layer;
activations of float32 denormals calibrate as zeros."""

from __future__ import annotations

import hashlib
import math
import pathlib

import paddle
import pytest

from imperative_ptq import AbsmaxQuantizer, ImperativePTQ, PerChannelAbsmaxQuantizer, PTQConfig
from imperative_ptq.session import hooked_states


class _Net(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 4, 3)
        self.relu = paddle.nn.ReLU()
        self.flatten = paddle.nn.Flatten()
        self.fc = paddle.nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.flatten(self.relu(self.conv(x))))


_SPEC = [paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")]


def _ptq() -> ImperativePTQ:
    return ImperativePTQ(PTQConfig(AbsmaxQuantizer(), PerChannelAbsmaxQuantizer()), asynchronous=False)


def _calibrated(ptq: ImperativePTQ, model: paddle.nn.Layer | None = None) -> paddle.nn.Layer:
    paddle.seed(0)
    qmodel = ptq.quantize(model or _Net())
    qmodel(paddle.rand([2, 3, 8, 8]))
    return qmodel


def _set(parameter: paddle.Tensor, index: tuple, value: float) -> None:
    array = parameter.numpy()
    array[index] = value
    parameter.set_value(array)


def _digests(prefix: pathlib.Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(prefix.parent.iterdir())
    }


@pytest.mark.parametrize(
    "layer, attribute, index, value",
    [("fc", "weight", (0, 1), math.nan), ("conv", "bias", (2,), math.inf), ("conv", "weight", (0, 0, 0, 0), -math.inf)],
)
def test_convert_refuses_non_finite_parameters(layer, attribute, index, value) -> None:
    """Calibration skips the NaN (the weight threshold comes from the finite values), so
    nothing failed before: convert froze an undefined int8 cast of it."""
    model = _Net()
    model.eval()
    _set(getattr(getattr(model, layer), attribute), index, value)
    ptq = _ptq()
    qmodel = _calibrated(ptq, model)
    table = ptq.calibration_table(qmodel)
    assert all(math.isfinite(t) for entry in table.values() for ts in entry.values() for t in ts)
    with pytest.raises(ValueError, match=rf"cannot convert: layer '{layer}' {attribute} holds 1 non-finite"):
        ptq.convert(qmodel)
    # Refused before anything changed: the model still calibrates; fixed, it converts.
    assert len(hooked_states(qmodel)) == 3
    _set(getattr(getattr(qmodel, layer), attribute), index, 0.0)
    ptq.convert(qmodel)
    assert type(qmodel.fc).__name__ == "QuantizedLayer"


class _OverflowingAbsmax(AbsmaxQuantizer):
    """A user's algorithm whose threshold overflows (``set_thresholds`` refuses Inf, a
    computed threshold is not checked there)."""

    def compute_threshold(self, index: int) -> float:
        return math.inf


def test_convert_refuses_non_finite_thresholds() -> None:
    ptq = ImperativePTQ(PTQConfig(_OverflowingAbsmax(), PerChannelAbsmaxQuantizer()))
    qmodel = _calibrated(ptq)
    with pytest.raises(ValueError, match=r"cannot convert: layer 'conv' input thresholds are not finite"):
        ptq.convert(qmodel)
    assert len(hooked_states(qmodel)) == 3


def test_export_refuses_non_finite_weights_and_thresholds(tmp_path) -> None:
    ptq = _ptq()
    qmodel = _calibrated(ptq)
    ptq.convert(qmodel)
    prefix = tmp_path / "model"
    ptq.save_quantized_model(qmodel, prefix, _SPEC)
    before = _digests(prefix)

    broken = ptq.quantize(_Net())
    broken(paddle.rand([2, 3, 8, 8]))
    ptq.convert(broken)
    _set(broken.conv.layer.bias, (1,), math.nan)  # conv is a QuantizedLayer wrapping the Conv2D
    with pytest.raises(ValueError, match=r"cannot export: layer 'conv' bias holds 1 non-finite"):
        ptq.save_quantized_model(broken, prefix, _SPEC)
    assert _digests(prefix) == before  # the previous export is untouched, nothing left behind

    other = ptq.quantize(_Net())
    other(paddle.rand([2, 3, 8, 8]))
    ptq.convert(other)
    other.fc.output_thresholds = [math.nan]
    with pytest.raises(ValueError, match=r"cannot export: layer 'fc' output thresholds are not finite"):
        ptq.save_quantized_model(other, prefix, _SPEC)
    assert _digests(prefix) == before


@pytest.mark.parametrize("quantizer", [
    "KLQuantizer", "HistQuantizer", "MSEQuantizer", "TensorRTKLQuantizer", "AbsmaxQuantizer",
    "MovingAverageAbsmaxQuantizer", "MinMaxQuantizer",
])
def test_an_input_of_float32_denormals_calibrates_as_zero(quantizer: str, tmp_path) -> None:
    """Activations that vanish below float32's smallest normal number (a random-weight
    MobileViT's, ~1e-43) stopped the histogram quantizers ("Too many bins for data range");
    no int8 scale of them is finite. They calibrate as zeros: threshold 0, finite outputs."""
    import numpy as np

    import imperative_ptq as ip

    paddle.seed(0)
    model = paddle.nn.Sequential(paddle.nn.Linear(8, 8), paddle.nn.ReLU(), paddle.nn.Linear(8, 4))
    model.eval()
    rng = np.random.default_rng(0)
    thresholds = {}
    for scale in (0.0, 1e-43):
        ptq = ImperativePTQ(PTQConfig(getattr(ip, quantizer)(), PerChannelAbsmaxQuantizer()))
        qmodel = ptq.quantize(model)
        ptq.calibrate(qmodel, [(rng.random([2, 8]) * scale).astype("float32") for _ in range(3)], progress=False)
        thresholds[scale] = ptq.calibration_table(qmodel)["0"]["input"]
    assert thresholds[1e-43] == thresholds[0.0]  # (the floor an all-zero input gets)
    ptq.convert(qmodel)
    x = paddle.to_tensor((rng.random([2, 8]) * 1e-43).astype("float32"))
    assert np.isfinite(qmodel(x).numpy()).all()
