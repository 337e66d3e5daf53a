"""Conv biases on ONNX Runtime's int32 grid (``imperative_ptq.bias_grid``).

ONNX Runtime's fused ``QLinearConv`` adds a conv's bias (its BatchNorm folded in) rounded to
the grid of input scale x weight scale, where Paddle Inference and the simulation add it in
float; ``convert`` moves each int8 conv's folded bias onto that grid so that all three add the
same value. Checked against a slow per-channel reference and in both runtimes."""

from __future__ import annotations

import numpy as np
import paddle
import pytest
from paddle import nn

import imperative_ptq as ip
from imperative_ptq.export import create_predictor, export_onnx, predict
from imperative_ptq.quant_layers import QuantizedLayer
from ties import relative_error, simulation_up_to_ties


def _stem() -> nn.Layer:
    """Conv-BN-ReLU blocks as detection and segmentation backbones start, BatchNorm
    statistics from warm-up batches (the first conv reads the signed image: fp32 on x86)."""
    def block(cin: int, cout: int, k: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2D(cin, cout, k, stride, padding=k // 2, bias_attr=False),
                             nn.BatchNorm2D(cout, momentum=0.5), nn.ReLU())

    paddle.seed(0)
    model = nn.Sequential(block(3, 16, 3, 2), block(16, 32, 3, 2), block(32, 32, 1, 1),
                          nn.Conv2D(32, 8, 3, padding=1))
    rng = np.random.default_rng(0)
    model[3].bias.set_value((0.1 * rng.standard_normal(8)).astype("float32"))  # a bias, no BatchNorm
    model.train()
    with paddle.no_grad():
        for _ in range(12):
            model(paddle.to_tensor(rng.standard_normal((4, 3, 64, 64)).astype("float32")))
    model.eval()
    return model


def _converted(bias_grid: bool):
    model = _stem()
    rng = np.random.default_rng(1)
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(model)
    for _ in range(3):
        qmodel(paddle.to_tensor(rng.standard_normal((2, 3, 64, 64)).astype("float32")))
    ptq.convert(qmodel, bias_grid=bias_grid)
    return ptq, qmodel


def _grid_codes_by_loops(qmodel: nn.Layer) -> list[np.ndarray]:
    """Slow reference: per int8 conv (u8 input) and output channel, the BatchNorm-folded bias
    (or the conv's own) divided by float32(input step x float32 weight step)."""
    layers = list(qmodel.sublayers())
    codes = []
    for index, layer in enumerate(layers):
        if not isinstance(layer, QuantizedLayer) or not layer.input_unsigned:
            continue
        conv, following = layer.layer, layers[index + 2] if index + 2 < len(layers) else None
        norm = following if isinstance(following, nn.BatchNorm2D) else None
        thresholds = layer.weight_thresholds.numpy()
        step = float(layer.input_thresholds[0]) / 127
        row = []
        for channel in range(conv.weight.shape[0]):
            bias = 0.0 if conv.bias is None else float(conv.bias.numpy()[channel])
            factor = 1.0
            if norm is not None:
                factor = float(np.float32(norm.weight.numpy()[channel] / np.sqrt(
                    norm._variance.numpy()[channel] + np.float32(norm._epsilon))))
                bias = (bias - float(norm._mean.numpy()[channel])) * factor + float(norm.bias.numpy()[channel])
            weight_step = np.float32(max(float(thresholds[channel]) * abs(factor), 1e-12) / 127)
            row.append(bias / float(np.float32(step * float(weight_step))))
        codes.append(np.array(row))
    return codes


def test_folded_biases_land_on_the_grid() -> None:
    _, moved = _converted(bias_grid=True)
    _, kept = _converted(bias_grid=False)
    moved_codes, kept_codes = _grid_codes_by_loops(moved), _grid_codes_by_loops(kept)
    assert len(moved_codes) == 3  # the three int8 convs on u8 inputs
    for on_grid, off_grid in zip(moved_codes, kept_codes):
        # (float32 parameters: the folded value is an integer up to its float32 rounding)
        assert np.all(np.abs(on_grid - np.round(on_grid)) < 1e-4 + 3e-7 * np.abs(on_grid))
        assert np.abs(off_grid - np.round(off_grid)).max() > 0.05  # it was off the grid
        assert np.abs(on_grid - off_grid).max() <= 0.5 + 1e-3  # by at most half a step


@pytest.mark.parametrize("bias_grid", [True, False], ids=["on the grid", "float biases"])
def test_onnx_runtime_adds_the_biases_the_simulation_adds(bias_grid: bool, tmp_path) -> None:
    """On the grid, ONNX Runtime computes the simulation up to rounding ties, as Paddle
    Inference does either way; with the float biases it was 0.4% of the largest output off
    (measured), each conv's outputs moved by a constant per channel."""
    ort = pytest.importorskip("onnxruntime")
    ptq, qmodel = _converted(bias_grid)
    spec = [paddle.static.InputSpec([None, 3, 64, 64], "float32", "x")]
    x = np.random.default_rng(2).standard_normal((2, 3, 64, 64)).astype("float32")
    ptq.save_quantized_model(qmodel, str(tmp_path / "m"), spec)
    ran = predict(create_predictor(str(tmp_path / "m"), num_threads=1), x)[0]
    path = export_onnx(qmodel, str(tmp_path / "m.onnx"), spec)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x})[0]

    def up_to_ties(runtime_output):
        simulated, _ = simulation_up_to_ties(
            lambda: qmodel(paddle.to_tensor(x)).numpy(), runtime_output, 2e-6, candidates=16, max_flips=3
        )
        return relative_error(runtime_output, simulated)

    assert up_to_ties(ran) < 2e-6
    if bias_grid:
        assert up_to_ties(onnx_out) < 2e-6
    else:
        assert up_to_ties(onnx_out) > 1e-4
