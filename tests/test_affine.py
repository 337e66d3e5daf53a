"""Affine (asymmetric) calibration: min/max observers, signed histograms, (scale, zero_point)."""

from __future__ import annotations

import json

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.calibration_table import read_table
from imperative_ptq.primitives import compute_qparams, fake_quantize, quantize_per_tensor
from imperative_ptq.quantizers import (
    HistQuantizer,
    KLQuantizer,
    MinMaxQuantizer,
    MSEQuantizer,
    PerChannelMinMaxQuantizer,
    QuantParams,
    TensorRTKLQuantizer,
    TensorSample,
)

HIST_CLASSES = [HistQuantizer, KLQuantizer, TensorRTKLQuantizer, MSEQuantizer]


def _t(array: np.ndarray) -> paddle.Tensor:
    return paddle.to_tensor(np.asarray(array, dtype=np.float32))


def _batches(seed: int, shift: float = 0.0, n: int = 4, shape=(4, 3, 8, 8)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=shape) * scale + shift).astype(np.float32)
        for scale in (1.0, 0.5, 3.0, 2.0)[:n]
    ]


def ref_min_max(batches) -> tuple[float, float]:
    """Loop reference: running min / max of the finite values."""
    low, high = np.inf, -np.inf
    for batch in batches:
        for value in np.asarray(batch).ravel():
            if np.isfinite(value):
                low, high = min(low, float(value)), max(high, float(value))
    return low, high


# ----------------------------------------------------------------------------- min / max
def test_min_max_matches_loop_and_ignores_nan_inf() -> None:
    batches = _batches(0, shift=0.7)
    batches[1].ravel()[:3] = [np.nan, np.inf, -np.inf]
    quantizer = MinMaxQuantizer()
    for batch in batches:
        quantizer.sample_data(None, (_t(batch),))
    quantizer.cal_thresholds()
    low, high = ref_min_max(batches)
    assert quantizer.ranges == [(pytest.approx(low, abs=0), pytest.approx(high, abs=0))]
    assert quantizer.thresholds == [max(-low, high)]
    (params,) = quantizer.quant_params()
    scale, zero_point = compute_qparams(low, high, "uint8", symmetric=False)
    assert (params.scale, params.zero_point, params.dtype) == (scale, zero_point, "uint8")
    assert (params.quant_min, params.quant_max) == (0, 255)


@pytest.mark.parametrize("shift", [0.0, 1.5, -2.0])
def test_min_max_matches_torch_observers(shift: float) -> None:
    torch = pytest.importorskip("torch")
    from torch.ao.quantization import MinMaxObserver

    batches = _batches(1, shift=shift)
    affine = MinMaxQuantizer(symmetric=False)
    symmetric = MinMaxQuantizer(symmetric=True)
    torch_affine = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    torch_symmetric = MinMaxObserver(
        dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-127, quant_max=127
    )
    for batch in batches:
        for quantizer in (affine, symmetric):
            quantizer.sample_data(None, (_t(batch),))
        torch_affine(torch.from_numpy(batch))
        torch_symmetric(torch.from_numpy(batch))
    for ours, theirs, dtype in (
        (affine, torch_affine, "uint8"),
        (symmetric, torch_symmetric, "int8"),
    ):
        (params,) = ours.quant_params()
        scale, zero_point = theirs.calculate_qparams()
        assert params.scale == float(scale[0]) if scale.ndim else float(scale)
        assert params.zero_point == int(zero_point.reshape(-1)[0])
        assert params.dtype == dtype


@pytest.mark.parametrize(
    "layer, axis", [(paddle.nn.Conv2D(3, 6, 3), 0), (paddle.nn.Linear(5, 7), 1)]
)
def test_per_channel_min_max_matches_loop_and_torch(layer, axis: int) -> None:
    torch = pytest.importorskip("torch")
    from torch.ao.quantization import PerChannelMinMaxObserver

    weight = layer.weight.numpy() + np.float32(0.05)
    layer.weight.set_value(weight)
    quantizer = PerChannelMinMaxQuantizer(symmetric=False)
    quantizer.sample_data(layer, (layer.weight,))
    quantizer.cal_thresholds()
    moved = np.moveaxis(weight, axis, 0)
    ref_low = [min(float(v) for v in channel.ravel()) for channel in moved]
    ref_high = [max(float(v) for v in channel.ravel()) for channel in moved]
    low, high = quantizer.ranges[0]
    np.testing.assert_array_equal(low, ref_low)
    np.testing.assert_array_equal(high, ref_high)
    np.testing.assert_array_equal(
        quantizer.thresholds[0], np.maximum(-np.asarray(ref_low), ref_high)
    )
    observer = PerChannelMinMaxObserver(
        ch_axis=axis, dtype=torch.quint8, qscheme=torch.per_channel_affine
    )
    observer(torch.from_numpy(weight))
    scale, zero_point = observer.calculate_qparams()
    (params,) = quantizer.quant_params()
    np.testing.assert_array_equal(np.float32(params.scale), scale.numpy())
    np.testing.assert_array_equal(params.zero_point, zero_point.numpy())


def test_per_channel_min_max_needs_registered_layer() -> None:
    with pytest.raises(TypeError, match="PerChannelMinMaxQuantizer needs a layer"):
        PerChannelMinMaxQuantizer().sample_data(paddle.nn.ReLU(), (_t(np.ones((2, 2))),))


# ------------------------------------------------------------------- signed histograms
def test_side_histograms_partition_the_abs_histogram() -> None:
    rng = np.random.default_rng(2)
    data = rng.normal(size=10_000).astype(np.float32)
    data[:50] = 0.0
    sample = TensorSample.from_tensor(_t(data), signed=True)
    upper = float(np.abs(data).max())
    for exact in (False, True):
        positive = sample.side(False).histogram(64, upper, exact)
        negative = sample.side(True).histogram(64, upper, exact)
        np.testing.assert_array_equal(positive + negative, sample.histogram(64, upper, exact))
        ref_positive, _ = np.histogram(data[data >= 0], bins=64, range=(0.0, upper))
        ref_negative, _ = np.histogram(-data[data < 0], bins=64, range=(0.0, upper))
        if exact:
            np.testing.assert_array_equal(positive, ref_positive)
            np.testing.assert_array_equal(negative, ref_negative)
        else:  # paddle's binning: only elements within an ulp of an edge may move
            assert np.abs(positive - ref_positive).sum() <= 4
    assert sample.side(False).abs_max() == float(data.max())
    assert sample.side(True).abs_max() == float(-data.min())


def test_symmetric_samples_hold_no_signed_copy() -> None:
    sample = TensorSample.from_tensor(_t(np.ones(4)))
    assert sample.signed_values is None
    with pytest.raises(RuntimeError, match="signed=True"):
        sample.min_max()
    for cls in HIST_CLASSES:
        assert not cls().uses_signed_values and cls(symmetric=False).uses_signed_values


def _codes(data: np.ndarray, params: QuantParams) -> np.ndarray:
    return quantize_per_tensor(
        _t(data), params.scale, params.zero_point, params.dtype
    ).numpy().astype(np.int64)


@pytest.mark.parametrize("cls", HIST_CLASSES)
def test_relu_output_gets_zero_point_0_and_full_uint8_range(cls) -> None:
    rng = np.random.default_rng(3)
    data = np.maximum(rng.normal(size=200_000), 0.0).astype(np.float32)
    quantizer = cls(symmetric=False)
    quantizer.sample_data(None, (_t(data),))
    (params,) = quantizer.quant_params()
    low, high = quantizer.ranges[0]
    assert low == 0.0 and 0.0 < high <= data.max()
    assert params.zero_point == 0 and params.dtype == "uint8"
    codes = _codes(data, params)
    assert codes.min() == 0 and codes.max() == 255
    # A symmetric int8 quantizer spends half its codes on negatives: its step is ~2x coarser
    # for the same clip.
    assert params.scale == pytest.approx(high / 255, rel=1e-6)


@pytest.mark.parametrize("cls", HIST_CLASSES)
def test_skewed_tensor_gets_a_sensible_zero_point(cls) -> None:
    rng = np.random.default_rng(4)
    data = (rng.gamma(2.0, size=200_000) - 1.0).astype(np.float32)  # in [-1, ~15]
    quantizer = cls(symmetric=False)
    quantizer.sample_data(None, (_t(data),))
    (params,) = quantizer.quant_params()
    low, high = quantizer.ranges[0]
    assert -1.0 <= low < -0.8 and 5.0 < high <= data.max()
    assert 5 <= params.zero_point <= 60
    # The zero point is where 0 lands: round(-low / scale).
    assert params.zero_point == round(-low / params.scale)
    assert quantizer.thresholds == [pytest.approx(max(-low, high))]


def test_one_sided_search_uses_all_levels() -> None:
    """MSE on one side with 255 levels clips later than with 127: rounding is finer."""
    rng = np.random.default_rng(5)
    data = np.abs(rng.standard_t(3, size=200_000)).astype(np.float32)
    affine, symmetric = MSEQuantizer(symmetric=False), MSEQuantizer()
    for quantizer in (affine, symmetric):
        quantizer.sample_data(None, (_t(data),))
        quantizer.cal_thresholds()
    assert affine.ranges[0][1] > symmetric.thresholds[0]


@pytest.mark.parametrize("cls", HIST_CLASSES + [MinMaxQuantizer])
def test_affine_merge_and_state_round_trip(cls) -> None:
    batches = _batches(6, shift=0.8)
    whole, first, second = cls(symmetric=False), cls(symmetric=False), cls(symmetric=False)
    for batch in batches:
        whole.sample_data(None, (_t(batch),))
    for batch in batches[:2]:
        first.sample_data(None, (_t(batch),))
    for batch in batches[2:]:
        second.sample_data(None, (_t(batch),))
    first.merge(second)
    assert first.num_batches == whole.num_batches
    merged, single = first.quant_params()[0], whole.quant_params()[0]
    if cls is MinMaxQuantizer:
        assert merged == single  # exact
    else:  # histograms are re-binned: mass conserved per side, clips close
        for key in ("counts", "negative_counts"):
            assert first.state_dict()[key].sum() == pytest.approx(whole.state_dict()[key].sum())
        assert merged.scale == pytest.approx(single.scale, rel=0.1)
        assert abs(merged.zero_point - single.zero_point) <= 0.1 * single.zero_point + 2
    restored = cls(symmetric=False)
    restored.load_state_dict({k: v.copy() for k, v in whole.state_dict().items()})
    assert restored.quant_params() == whole.quant_params()
    if cls is not MinMaxQuantizer:
        assert "negative_counts" in whole.state_dict()
        with pytest.raises(ValueError, match="state does not fit"):
            cls(symmetric=False).load_state_dict(cls().state_dict() | {"num_batches": 1})


def test_symmetric_histogram_config_and_state_unchanged() -> None:
    quantizer = KLQuantizer()
    assert "symmetric" not in quantizer.config()
    assert KLQuantizer(symmetric=False).config()["symmetric"] is False
    quantizer.sample_data(None, (_t(_batches(7)[0]),))
    assert set(quantizer.state_dict()) == {"upper", "counts", "num_batches"}
    quantizer.cal_thresholds()
    (params,) = quantizer.quant_params()
    threshold = quantizer.thresholds[0]
    assert params == QuantParams(float(np.float32(threshold) / np.float32(127)), 0, "int8", -127, 127)


@pytest.mark.parametrize(
    "factory",
    [
        lambda value: MinMaxQuantizer(symmetric=value),
        lambda value: PerChannelMinMaxQuantizer(symmetric=value),
        lambda value: KLQuantizer(symmetric=value),
        lambda value: HistQuantizer(symmetric=value),
        lambda value: TensorRTKLQuantizer(symmetric=value),
        lambda value: MSEQuantizer(symmetric=value),
    ],
)
def test_symmetric_must_be_bool(factory) -> None:
    with pytest.raises(TypeError, match="symmetric must be a bool"):
        factory("no")
    with pytest.raises(TypeError, match="symmetric"):
        factory(1)


def test_affine_kl_needs_bins_for_all_levels() -> None:
    with pytest.raises(ValueError, match="bins"):
        KLQuantizer(bins=300, symmetric=False)
    with pytest.raises(ValueError, match="bins"):
        TensorRTKLQuantizer(bins=200, symmetric=False)
    with pytest.raises(ValueError, match="quant_bits"):
        MinMaxQuantizer(quant_bits=0)


# ------------------------------------------------------------------ tables and simulation
def _calibrated(activation, weight, target: str = "x86"):
    from imperative_ptq.models import VerySimpleNet

    paddle.seed(0)

    model = VerySimpleNet()
    ptq = ip.ImperativePTQ(ip.PTQConfig(activation, weight, target=target), asynchronous=True)
    quantized = ptq.quantize(model)
    rng = np.random.default_rng(8)
    data = [_t(rng.random((8, 1, 28, 28)) * 2 - 0.3) for _ in range(3)]
    ptq.calibrate(quantized, data, progress=False)
    return ptq, model, quantized, data


def test_table_records_affine_params_and_round_trips(tmp_path) -> None:
    ptq, model, quantized, data = _calibrated(
        KLQuantizer(symmetric=False), PerChannelMinMaxQuantizer(symmetric=False)
    )
    table = ptq.calibration_table(quantized)
    relu = table["relu1"]
    assert relu["output_zero_point"] == [0] and relu["output_scale"][0] > 0
    fc1 = table["fc1"]
    assert len(fc1["weight_scale"]) == len(fc1["weight_zero_point"]) == 100
    assert fc1["input_zero_point"][0] > 0  # inputs reach -0.3
    # relu1's output is fc2's input: one shared signed sample feeds both quantizers.
    assert table["fc2"]["input_scale"] == relu["output_scale"]
    path = tmp_path / "table.json"
    ptq.save_calibration_table(quantized, path)
    layers, _ = read_table(path)
    assert layers == json.loads(json.dumps(table))
    reloaded = ptq.quantize(model)
    ptq.load_calibration_table(reloaded, path)
    assert ptq.calibration_table(reloaded) == table
    ptq.convert(quantized)
    ptq.convert(reloaded)
    np.testing.assert_array_equal(quantized(data[0]).numpy(), reloaded(data[0]).numpy())


def test_symmetric_table_has_no_affine_keys() -> None:
    ptq, _, quantized, _ = _calibrated(KLQuantizer(), ip.PerChannelAbsmaxQuantizer())
    for entry in ptq.calibration_table(quantized).values():
        assert set(entry) <= {"input", "output", "weight"}


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"output": [1.0], "output_scale": [0.1], "output_zero_point": [1.5]}, "zero_point"),
        ({"output": [1.0], "output_scale": [0.1], "output_zero_point": [True]}, "zero_point"),
        ({"output": [1.0], "output_scale": [0.1]}, "zero_point"),
        ({"output": [1.0], "output_scale": [0.0], "output_zero_point": [0]}, "output_scale"),
        ({"output": [1.0], "output_scale": [0.1, 0.2], "output_zero_point": [0, 0]}, "scale"),
        ({"output": [1.0], "bias_scale": [0.1]}, "threshold lists"),
    ],
)
def test_read_table_validates_affine_keys(tmp_path, bad, match) -> None:
    path = tmp_path / "bad.json"
    document = {
        "format": "imperative_ptq.calibration_table",
        "format_version": 1,
        "config": {},
        "layers": {"relu": bad},
    }
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=match):
        read_table(path)
    document["layers"]["relu"] = {"output": [1.0], "output_scale": [0.1], "output_zero_point": [0]}
    path.write_text(json.dumps(document))
    assert read_table(path)[0]["relu"]["output_zero_point"] == [0]


@pytest.mark.parametrize("target", ["x86", "x86-vnni", "arm"])
def test_convert_simulates_affine_calibrations_on_their_thresholds(target, caplog) -> None:
    """Affine parameters stay in the table; convert quantizes on the thresholds the runtimes
    read: the model computes bit for bit what the symmetric calibration with the same
    thresholds computes, and (``arm``, whose weights are not re-derived by a fc) each weight
    per channel on ``max(|min|, |max|)``, by a loop written here."""
    ptq, model, quantized, data = _calibrated(MinMaxQuantizer(), PerChannelMinMaxQuantizer(), target)
    table = ptq.calibration_table(quantized)
    assert table["fc1"]["input_zero_point"][0] > 0  # inputs reach -0.3
    with caplog.at_level("WARNING", logger="imperative_ptq.convert"):
        ptq.convert(quantized)
    assert "layers were calibrated with zero points" in caplog.text
    ptq_symmetric, _, symmetric, _ = _calibrated(
        MinMaxQuantizer(symmetric=True), PerChannelMinMaxQuantizer(symmetric=True), target
    )
    ptq_symmetric.convert(symmetric)
    simulated = [layer for layer in quantized.sublayers() if isinstance(layer, ip.QuantizedLayer)]
    assert len(simulated) == sum(isinstance(layer, ip.QuantizedLayer) for layer in symmetric.sublayers()) > 0
    assert all(layer.input_zero_point is None or layer.input_shifted for layer in simulated)
    for batch in data:
        np.testing.assert_array_equal(quantized(batch).numpy(), symmetric(batch).numpy())
    if target == "arm":
        weight = model.fc1.weight.numpy()  # [in, out]: one channel per column
        expected = np.empty_like(weight)
        for channel in range(weight.shape[1]):
            column = weight[:, channel]
            step = max(abs(float(column.min())), abs(float(column.max()))) / 127
            expected[:, channel] = np.clip(np.round(column / step), -127, 127) * step
        np.testing.assert_allclose(quantized.fc1.layer.weight.numpy(), expected, rtol=1e-6, atol=1e-9)


def test_hand_built_zero_points_are_simulated_and_refused_by_the_exports(tmp_path) -> None:
    """``QuantizedLayer`` still takes zero points by hand (convert never builds them): it
    fake-quantizes its input on the affine grid; neither export writes such a layer (Paddle
    Inference and Paddle Lite would ignore the zero point, no runtime runs affine weights),
    and neither leaves a file behind."""
    from imperative_ptq.export import export_onnx

    ptq, model, quantized, data = _calibrated(KLQuantizer(), ip.PerChannelAbsmaxQuantizer())
    ptq.convert(quantized)
    layer = quantized.fc2  # reads the ReLU output
    layer.input_scale, layer.input_zero_point, layer.input_unsigned = 0.01, 3, False
    x = paddle.nn.functional.relu(quantized.fc1(data[1].reshape([8, -1])))
    np.testing.assert_array_equal(
        layer(x).numpy(), layer.layer(fake_quantize(x, 0.01, 3, 0, 255)).numpy()
    )
    spec = [paddle.static.InputSpec([None, 1, 28, 28], "float32", "x")]
    for export in (ptq.save_quantized_model, export_onnx):
        with pytest.raises(ValueError, match="layer 'fc2' quantizes its input on an affine grid"):
            export(quantized, str(tmp_path / "m"), spec)
    layer.input_scale = layer.input_zero_point = None
    layer.weight_scales, layer.weight_zero_points = [0.01] * 100, [128] * 100
    for export in (ptq.save_quantized_model, export_onnx):
        with pytest.raises(ValueError, match="layer 'fc2' holds affine"):
            export(quantized, str(tmp_path / "w"), spec)
    assert not list(tmp_path.iterdir())
