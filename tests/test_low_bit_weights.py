"""Weights below 8 bits (``PerChannelAbsmaxQuantizer(quant_bits=2..7)``): codes on the narrow
grid in the simulation, through the calibration table, and in the Paddle Inference export
(stored as int8 on the 8-bit grid, so the int8 kernels run them), which agrees with the
simulation exactly."""

from __future__ import annotations

import numpy as np
import paddle
import pytest
from paddle import nn

import imperative_ptq as ip
from imperative_ptq.export import create_predictor, predict
from imperative_ptq.export.program import legacy_static_mode, load_legacy_program
from imperative_ptq.quantizers.qparams import symmetric_levels


def _model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2D(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2D(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.MaxPool2D(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 24), nn.ReLU(), nn.Linear(24, 10),
    ).eval()


def _data(seed: int, count: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((8, 3, 8, 8)).astype("float32") for _ in range(count)]


def _calibrated(model: nn.Layer, bits: int) -> tuple[ip.ImperativePTQ, nn.Layer]:
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(bits)))
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, _data(0), progress=False)
    return ptq, qmodel


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7])
def test_stored_weights_are_codes_of_the_narrow_grid(bits: int) -> None:
    model = _model()
    ptq, qmodel = _calibrated(model, bits)
    ptq.convert(qmodel)
    levels = symmetric_levels(bits)
    layers = [layer for layer in qmodel.sublayers() if isinstance(layer, ip.QuantizedLayer)]
    assert len(layers) == 4
    for layer in layers:
        stored = layer.program_weight if layer.program_weight is not None else layer.layer.weight.numpy()
        thresholds = layer.grid_thresholds
        shape = [1] * stored.ndim
        shape[layer.weight_axis] = -1
        codes = stored / (thresholds / levels).reshape(shape)
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
        assert np.abs(np.round(codes)).max() == levels  # per-channel abs-max reaches the edge


@pytest.mark.parametrize("bits", [2, 4])
def test_paddle_inference_runs_what_the_simulation_computes(bits: int, tmp_path) -> None:
    model = _model()
    ptq, qmodel = _calibrated(model, bits)
    ptq.convert(qmodel)
    prefix = str(tmp_path / "m")
    ptq.save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 3, 8, 8], "float32")])
    x = np.concatenate(_data(5, 2))
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    with paddle.no_grad():
        simulated = qmodel(paddle.to_tensor(x)).numpy()
    assert np.linalg.norm(ran - simulated) / np.linalg.norm(simulated) < 1e-5
    levels = symmetric_levels(bits)
    with legacy_static_mode():
        loaded = load_legacy_program(prefix)
        block = loaded.program.global_block()
        weights = [op for op in block.ops if op.type == "dequantize_linear" and op.attr("quant_axis") >= 0]
        assert len(weights) == 4
        for op in weights:
            integers = np.array(loaded.scope.find_var(op.input("X")[0]).get_tensor())
            assert integers.dtype == np.int8 and np.abs(integers).max() == levels
            assert op.attr("bit_length") == 8  # the int8 kernels' grid


def test_calibration_table_round_trip_keeps_four_bit_weights(tmp_path) -> None:
    model = _model()
    ptq, qmodel = _calibrated(model, 4)
    ptq.save_calibration_table(qmodel, tmp_path / "table.json")
    ptq.convert(qmodel)
    fresh = ptq.quantize(model)
    ptq.load_calibration_table(fresh, tmp_path / "table.json")
    ptq.convert(fresh)
    x = paddle.to_tensor(np.concatenate(_data(9, 1)))
    with paddle.no_grad():
        np.testing.assert_array_equal(fresh(x).numpy(), qmodel(x).numpy())


def test_rounding_ties_of_the_runtime_requantization_are_simulated(tmp_path) -> None:
    """A channel whose largest 4-bit code is 6 holds codes 3 that Paddle's 8-bit requantization
    puts exactly half-way (3 * 127 / 6 = 63.5); which way each goes depends on float32
    arithmetic, which the simulation follows."""
    model = nn.Sequential(nn.Conv2D(4, 16, 1)).eval()
    x = np.random.default_rng(0).random((2, 4, 4, 4)).astype("float32")
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(4)))
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, [x], progress=False)
    ptq.convert(qmodel)
    codes = np.zeros((16, 4, 1, 1), np.int32)
    codes[:, :, 0, 0] = [6, 3, -3, 1]
    qmodel[0].set_weight_integers(codes)
    prefix = str(tmp_path / "m")
    ptq.save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 4, 4, 4], "float32")])
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    with paddle.no_grad():
        simulated = qmodel(paddle.to_tensor(x)).numpy()
    assert np.linalg.norm(ran - simulated) / np.linalg.norm(simulated) < 1e-5


@pytest.mark.parametrize("seed", [0, 2])
def test_per_tensor_eight_bit_weights_run_as_simulated(seed: int, tmp_path) -> None:
    """One threshold for all channels: Paddle requantizes each conv channel from its largest
    value, which the x86 simulation now follows (1.9% relative error before)."""
    paddle.seed(seed)
    model = _model()
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.AbsmaxQuantizer()))
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, _data(0), progress=False)
    ptq.convert(qmodel)
    prefix = str(tmp_path / "m")
    ptq.save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 3, 8, 8], "float32")])
    x = np.concatenate(_data(5, 2))
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    with paddle.no_grad():
        simulated = qmodel(paddle.to_tensor(x)).numpy()
    assert np.linalg.norm(ran - simulated) / np.linalg.norm(simulated) < 1e-5
