"""AdaRound: the reconstruction loss falls below nearest rounding's, every rounding ends binary (each weight rounded
to the grid point just below or just above it), the layer output error beats nearest rounding
at 4 bits, and the rounded weights are what Paddle Inference runs."""

from __future__ import annotations

import copy
import logging

import numpy as np
import paddle
import pytest
from paddle import nn

import imperative_ptq as ip
from imperative_ptq.algorithms import AdaRound, adaround
from imperative_ptq.export import create_predictor, predict
from imperative_ptq.quantizers.qparams import symmetric_levels
from ties import relative_error, simulation_up_to_ties

SETTINGS = AdaRound(iterations=1000, batch_size=16)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


def _convnet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2D(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2D(8, 8, 3, padding=1, groups=8),
        nn.ReLU(), nn.Conv2D(8, 6, 1),
    ).eval()


def _batches(shape: tuple[int, ...], count: int = 4, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((16, *shape)).astype("float32") for _ in range(count)]


def _nearest(model: nn.Layer, batches: list[np.ndarray]) -> nn.Layer:
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(4)))
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, batches, progress=False)
    return ptq.convert(qmodel)


def _first_layer_error(qmodel: nn.Sequential, model: nn.Sequential, batches) -> float:
    """Mean squared error of the first layer's output against fp32, same fp32 input."""
    with paddle.no_grad():
        errors = [
            float(((qmodel[0](paddle.to_tensor(b)) - model[0](paddle.to_tensor(b))) ** 2).mean())
            for b in batches
        ]
    return float(np.mean(errors))


@pytest.mark.parametrize("build, shape", [(_mlp, (24,)), (_convnet, (3, 6, 6))])
def test_loss_falls_rounding_ends_binary_and_beats_nearest(build, shape) -> None:
    model, batches = build(), _batches(shape)
    nearest = _nearest(model, batches)
    rounded = copy.deepcopy(nearest)
    results = adaround(rounded, model, batches, SETTINGS, progress=False)
    assert [r.name for r in results] == [
        name for name, layer in rounded.named_sublayers() if isinstance(layer, ip.QuantizedLayer)
    ]
    levels = symmetric_levels(4)
    for result in results:
        assert result.final_loss < result.nearest_loss, result
        assert result.soft_fraction == 0.0, (result.name, result.soft_fraction)
        assert result.changed_fraction > 0, result.name  # it did choose otherwise than nearest
    for name, layer in rounded.named_sublayers():
        if not isinstance(layer, ip.QuantizedLayer):
            continue
        fp32 = dict(model.named_sublayers())[name].weight.numpy()
        stored = layer.program_weight if layer.program_weight is not None else layer.layer.weight.numpy()
        shape_ = [1] * fp32.ndim
        shape_[layer.weight_axis] = -1
        step = (layer.grid_thresholds / levels).reshape(shape_)
        codes = np.round(stored / step)
        np.testing.assert_allclose(stored / step, codes, atol=1e-3)
        # Slow reference of "up or down": each code is floor(w/s) or floor(w/s) + 1.
        low = np.floor(fp32 / step)
        assert np.all((codes == np.clip(low, -levels, levels))
                      | (codes == np.clip(low + 1, -levels, levels))), name
    assert _first_layer_error(rounded, model, batches) < _first_layer_error(nearest, model, batches)


def test_ptq_config_adaround_exports_what_it_simulates(tmp_path) -> None:
    model, batches = _convnet(), _batches((3, 6, 6))
    config = ip.PTQConfig(
        ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(4), adaround=SETTINGS,
        bias_correction=True,
    )
    assert config.to_dict()["adaround"]["iterations"] == 1000
    ptq = ip.ImperativePTQ(config)
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, batches, progress=False)
    prefix = str(tmp_path / "m")
    ptq.save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 3, 6, 6], "float32")])
    x = np.concatenate(_batches((3, 6, 6), 1, seed=3))
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    with paddle.no_grad():
        simulated = qmodel(paddle.to_tensor(x)).numpy()
    assert np.linalg.norm(ran - simulated) / np.linalg.norm(simulated) < 1e-5


def test_unsupported_layer_keeps_nearest_rounding_with_a_warning(caplog) -> None:
    model = nn.Sequential(nn.Conv1D(3, 4, 3), nn.ReLU(), nn.Conv1D(4, 4, 1)).eval()
    batches = _batches((3, 8))
    nearest = _nearest(model, batches)
    rounded = copy.deepcopy(nearest)
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        assert adaround(rounded, model, batches, SETTINGS, progress=False) == []
    assert "layer '0' on nearest rounding: Conv1D is not a Conv2D or Linear" in caplog.text
    np.testing.assert_array_equal(rounded[0].layer.weight.numpy(), nearest[0].layer.weight.numpy())


def test_settings_are_checked() -> None:
    with pytest.raises(TypeError, match="AdaRound.iterations must be an int"):
        AdaRound(iterations=1.5)
    with pytest.raises(ValueError, match="warmup"):
        AdaRound(warmup=1.0)
    with pytest.raises(ValueError, match="beta_start >= beta_end"):
        AdaRound(beta_start=1.0, beta_end=2.0)
    with pytest.raises(TypeError, match="adaround must be an imperative_ptq.algorithms.AdaRound"):
        ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(), adaround=True)
    with pytest.raises(ValueError, match="AdaRound needs calibration batches"):
        adaround(_mlp(), _mlp(), [])


def _silu_convnet() -> nn.Sequential:
    """Every conv reads a signed input (the image, SiLU outputs): on ``x86-avx2`` all three
    run int8 with halved weights, the first with its BatchNorm folded by the export."""
    return nn.Sequential(
        nn.Conv2D(3, 8, 3, padding=1), nn.BatchNorm2D(8), nn.Silu(),
        nn.Conv2D(8, 8, 3, padding=1), nn.Silu(), nn.Conv2D(8, 6, 1),
    ).eval()


def _signed_batches(count: int = 4, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((16, 3, 6, 6)).astype("float32") for _ in range(count)]


def test_halved_convs_round_on_the_7_bit_grid_they_run(tmp_path, avx2_runner) -> None:
    paddle.seed(0)
    model, batches = _silu_convnet(), _signed_batches()
    config = ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(), target="x86-avx2")
    ptq = ip.ImperativePTQ(config)
    nearest = ptq.quantize(model)
    ptq.calibrate(nearest, batches, progress=False)
    ptq.convert(nearest, progress=False)
    rounded = copy.deepcopy(nearest)
    results = adaround(rounded, model, batches, SETTINGS, progress=False)
    layers = {name: layer for name, layer in rounded.named_sublayers() if isinstance(layer, ip.QuantizedLayer)}
    assert [r.name for r in results] == list(layers) and all(layer.halved_weights for layer in layers.values())
    for result in results:
        assert result.final_loss < result.nearest_loss, result
        assert result.soft_fraction == 0.0 and result.changed_fraction > 0, result
    fp32_layers = dict(model.named_sublayers())
    for name, layer in layers.items():
        fp32 = fp32_layers[name].weight.numpy()
        step = (layer.grid_thresholds / 127).reshape(-1, 1, 1, 1)
        stored = layer.program_weight / step
        codes = np.round(stored)
        np.testing.assert_allclose(stored, codes, atol=1e-3)
        edge = np.abs(codes) == 127
        assert edge.any(axis=(1, 2, 3)).all(), name  # every channel keeps its abs-max code
        # Slow reference: every other code even, its half floor(w / 2s) or floor(w / 2s) + 1,
        # the 7-bit code oneDNN's AVX2 kernels run.
        assert np.all(codes[~edge] % 2 == 0), name
        low = np.floor(fp32 / (2 * step))[~edge]
        half = codes[~edge] / 2
        assert np.all((half == np.clip(low, -63, 63)) | (half == np.clip(low + 1, -63, 63))), name
    assert _first_layer_error(rounded, model, batches) < _first_layer_error(nearest, model, batches)

    # Through PTQConfig, exported: Paddle Inference on AVX2 kernels computes the simulation.
    config = ip.PTQConfig(
        ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(), target="x86-avx2", adaround=SETTINGS,
    )
    ptq = ip.ImperativePTQ(config)
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, batches, progress=False)
    prefix = str(tmp_path / "m")
    ptq.save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 3, 6, 6], "float32")])
    x = np.concatenate(_signed_batches(1, seed=3))
    if ip.cpu_info().isa == "avx2":
        ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    elif avx2_runner is not None:
        ran = avx2_runner.predict(prefix, x)[0]
    else:
        pytest.skip("no AVX2 int8 kernels on this CPU (AVX-512 without VNNI)")

    def simulate() -> np.ndarray:
        return qmodel(paddle.to_tensor(x)).numpy()

    simulated, _ = simulation_up_to_ties(simulate, ran, 2e-6, candidates=16, max_flips=3)
    assert relative_error(ran, simulated) < 2e-6
