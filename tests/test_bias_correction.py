"""Empirical bias correction: each corrected layer's mean output equals the fp32 model's on the
calibration data (checked layer by layer against a plain forward), the correction is what the
Paddle Inference export runs, and missing data is refused before anything changes."""

from __future__ import annotations

import copy

import numpy as np
import paddle
import pytest
from paddle import nn

import imperative_ptq as ip
from imperative_ptq.export import create_predictor, predict


def _convnet() -> nn.Sequential:
    model = nn.Sequential(
        nn.Conv2D(3, 8, 3, padding=1, bias_attr=False), nn.BatchNorm2D(8), nn.ReLU(),
        nn.Conv2D(8, 16, 3), nn.ReLU(), nn.MaxPool2D(2),
        nn.Flatten(), nn.Linear(16 * 3 * 3, 10),
    )
    norm = model[1]
    rng = np.random.default_rng(0)
    norm._mean.set_value(rng.normal(size=8).astype("float32") * 0.1)
    norm._variance.set_value((rng.random(8) + 0.5).astype("float32"))
    return model.eval()


def _batches(count: int = 6, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.abs(rng.standard_normal((8, 3, 8, 8))).astype("float32") for _ in range(count)]


def _config(**algorithms) -> ip.PTQConfig:
    return ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(quant_bits=4), **algorithms)


def _converted(model: nn.Layer, batches: list[np.ndarray], **algorithms) -> nn.Layer:
    """Converted without the bias grid, whose later move of each corrected conv bias by up
    to half its int32 step for ONNX Runtime (tests/test_bias_grid.py) is not the correction's
    arithmetic these tests check."""
    ptq = ip.ImperativePTQ(_config(**algorithms))
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, batches, progress=False)
    return ptq.convert(qmodel, progress=False, bias_grid=False)


def _layer_outputs(model: nn.Sequential, batches: list[np.ndarray], index: int) -> list[np.ndarray]:
    """Slow reference: child ``index``'s output, running the children one by one."""
    outputs = []
    with paddle.no_grad():
        for batch in batches:
            x = paddle.to_tensor(batch)
            for child in list(model.children())[: index + 1]:
                x = child(x)
            outputs.append(x.numpy())
    return outputs


def _means(outputs: list[np.ndarray]) -> np.ndarray:
    channels_first = [np.moveaxis(o, 1, 0).reshape(o.shape[1], -1) for o in outputs]
    return np.concatenate(channels_first, axis=1).mean(axis=1)


def test_corrected_layers_keep_the_fp32_mean_output() -> None:
    model, batches = _convnet(), _batches()
    before = copy.deepcopy(model.state_dict())
    plain = _converted(model, batches)
    corrected = _converted(model, batches, bias_correction=True)
    for key, value in model.state_dict().items():  # the user's model is untouched
        np.testing.assert_array_equal(value.numpy(), before[key].numpy())
    for index in (0, 3, 7):
        assert isinstance(corrected[index], ip.QuantizedLayer)
        fp32 = _means(_layer_outputs(model, batches, index))
        shifted = np.abs(_means(_layer_outputs(plain, batches, index)) - fp32).max()
        error = np.abs(_means(_layer_outputs(corrected, batches, index)) - fp32).max()
        assert error < 1e-5 * max(1.0, np.abs(fp32).max()), (index, error)
        assert shifted > 100 * error, (index, shifted)  # there was a shift to correct
    assert corrected[0].layer.bias is not None  # created for the conv without a bias


def test_corrected_bias_is_what_paddle_inference_runs(tmp_path) -> None:
    model, batches = _convnet(), _batches()
    plain = _converted(model, batches)
    ptq = ip.ImperativePTQ(_config(bias_correction=True))
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, batches, progress=False)
    ptq.convert(qmodel, progress=False)
    prefix = str(tmp_path / "m")
    ptq.save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 3, 8, 8], "float32")])
    x = np.concatenate(_batches(2, seed=7))
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    with paddle.no_grad():
        simulated = qmodel(paddle.to_tensor(x)).numpy()
        uncorrected = plain(paddle.to_tensor(x)).numpy()
    cosine = float(np.sum(ran * simulated) / np.linalg.norm(ran) / np.linalg.norm(simulated))
    assert cosine >= 0.99, cosine
    assert np.abs(ran - simulated).mean() < np.abs(ran - uncorrected).mean()


def test_convert_with_data_argument_and_without_data() -> None:
    model, batches = _convnet(), _batches()
    ptq = ip.ImperativePTQ(_config(bias_correction=True))
    qmodel = ptq.quantize(model)
    with ptq.calibrating(qmodel):  # batches run by hand are not kept
        for batch in batches:
            qmodel(paddle.to_tensor(batch))
    with pytest.raises(ValueError, match="bias correction need calibration batches"):
        ptq.convert(qmodel)
    assert not isinstance(qmodel[0], ip.QuantizedLayer)  # nothing changed
    ptq.convert(qmodel, data=batches, progress=False, bias_grid=False)
    fp32 = _means(_layer_outputs(model, batches, 7))
    assert np.abs(_means(_layer_outputs(qmodel, batches, 7)) - fp32).max() < 1e-5


def test_bias_correction_flag_must_be_bool() -> None:
    with pytest.raises(TypeError, match="bias_correction must be a bool"):
        _config(bias_correction=1)
    assert _config(bias_correction=True).to_dict()["bias_correction"] is True


def test_analysis_recognizes_the_fp32_layers_of_a_corrected_model() -> None:
    model, batches = _convnet(), _batches()
    corrected = _converted(model, batches, bias_correction=True)
    assert corrected[0].bias_correction is not None
    report = ip.analyze(model, corrected, batches[:2])
    assert sorted(report.names) == ["0", "3", "7"]
    restored = ip.keep_fp32(corrected, ["7"], model)
    assert isinstance(restored[7], nn.Linear)  # the fp32 layer, with its own bias
    np.testing.assert_array_equal(restored[7].bias.numpy(), model[7].bias.numpy())


def test_analytical_correction_keeps_each_layer_mean_on_fp32_inputs() -> None:
    """``b += (W - W_q) E[x]``: with fp32 inputs, each corrected layer's mean output equals the
    fp32 layer's (exact for a Linear and a 1x1 conv: every output reads every input position)."""
    model = nn.Sequential(
        nn.Conv2D(3, 8, 1), nn.ReLU(), nn.Conv2D(8, 8, 1, groups=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
    ).eval()
    batches = _batches()
    corrected = _converted(model, batches, bias_correction="analytical")
    plain = _converted(model, batches)
    for index in (0, 2, 5):
        inputs = [paddle.to_tensor(b) for b in batches]
        if index:
            inputs = [paddle.to_tensor(o) for o in _layer_outputs(model, batches, index - 1)]
        with paddle.no_grad():
            fp32 = _means([model[index](x).numpy() for x in inputs])
            fixed = _means([corrected[index].layer(x).numpy() for x in inputs])
            shifted = _means([plain[index].layer(x).numpy() for x in inputs])
        assert np.abs(fixed - fp32).max() < 1e-5 * max(1.0, np.abs(fp32).max()), index
        assert np.abs(shifted - fp32).max() > 100 * np.abs(fixed - fp32).max(), index
    assert _config(bias_correction="analytical").to_dict()["bias_correction"] == "analytical"
    with pytest.raises(TypeError, match="'empirical' or 'analytical'"):
        _config(bias_correction="fast")


def test_a_correction_that_moves_the_outputs_away_from_fp32_is_undone(monkeypatch, caplog) -> None:
    """Matching each layer's mean output moved a real PP-LCNet-style classifier's outputs 26x
    further from its fp32 ones on its own calibration batches (relative squared error 1.7e-5 ->
    4.4e-4, Hardswish and squeeze-excite gates after the corrected convs), silently. Where the
    model's outputs move away, every bias is put back as it was (the conv without a bias has
    none again), with a warning; here the error measure is made to say so."""
    from imperative_ptq.algorithms import bias_correction

    errors = iter([0.01, 0.02])
    monkeypatch.setattr(bias_correction, "_output_error", lambda *args: next(errors))
    batches, model = _batches(), _convnet()
    plain = _converted(copy.deepcopy(model), batches)
    with caplog.at_level("WARNING", logger="imperative_ptq"):
        corrected = _converted(model, batches, bias_correction=True)
    assert "bias correction moved the model's outputs further from the fp32 model's" in caplog.text
    assert "(relative squared error 0.01 -> 0.02) and was undone" in caplog.text
    assert corrected[0].layer.bias is None
    for index in (0, 3, 7):
        assert corrected[index].bias_correction is None
    x = paddle.to_tensor(np.concatenate(batches[:2]))
    with paddle.no_grad():
        np.testing.assert_array_equal(corrected(x).numpy(), plain(x).numpy())


def test_the_correction_is_kept_where_it_brings_the_outputs_closer(caplog) -> None:
    """On the test convnet the correction lowers the output error, and stays (logged)."""
    with caplog.at_level("INFO", logger="imperative_ptq"):
        corrected = _converted(_convnet(), _batches(), bias_correction=True)
    assert corrected[0].bias_correction is not None
    assert "relative squared output error on the calibration batches" in caplog.text
