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


class _ResidualBlock(nn.Layer):
    """ResNet's basic block: its first conv reads the block input on the codes the fused
    residual add reads too, its second is fused with the add, and the ReLU after the add
    writes codes up to 255 on ``x86`` (Paddle leaves them unclipped)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2D(channels, channels, 3, padding=1, bias_attr=False)
        self.bn1 = nn.BatchNorm2D(channels, momentum=0.5)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2D(channels, channels, 3, padding=1, bias_attr=False)
        self.bn2 = nn.BatchNorm2D(channels, momentum=0.5)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


def _stem() -> nn.Layer:
    """Conv-BN-ReLU blocks as detection and segmentation backbones start, BatchNorm
    statistics from warm-up batches (the first conv reads the signed image: fp32 on x86; the
    second writes its ReLU as codes for the max-pool after it on the x86 targets), then a
    linear bottleneck's conv-BN whose signed output a 1x1 conv reads on the shifted grid
    (``imperative_ptq.shifted_input``), a residual block, and a conv with a bias and no
    BatchNorm reading the block's output."""
    def block(cin: int, cout: int, k: int, stride: int, relu: bool = True) -> nn.Sequential:
        return nn.Sequential(nn.Conv2D(cin, cout, k, stride, padding=k // 2, bias_attr=False),
                             nn.BatchNorm2D(cout, momentum=0.5), *([nn.ReLU()] if relu else []))

    paddle.seed(0)
    model = nn.Sequential(block(3, 16, 3, 2), block(16, 32, 3, 2), nn.MaxPool2D(2), block(32, 32, 3, 1, relu=False),
                          block(32, 32, 1, 1), _ResidualBlock(32), nn.Conv2D(32, 8, 3, padding=1))
    rng = np.random.default_rng(0)
    model[6].bias.set_value((0.1 * rng.standard_normal(8)).astype("float32"))  # a bias, no BatchNorm
    for norm in (layer for layer in model.sublayers() if isinstance(layer, nn.BatchNorm2D)):
        # (trained betas: the shifted conv reads a normalized input, whose mean alone would
        # fold to a bias of almost 0)
        norm.bias.set_value((0.3 * rng.standard_normal(norm.bias.shape)).astype("float32"))
    model.train()
    with paddle.no_grad():
        for _ in range(12):
            model(paddle.to_tensor(rng.standard_normal((4, 3, 64, 64)).astype("float32")))
    model.eval()
    return model


#: Every input grid the ONNX export writes a conv's input on. On ``x86`` the conv reading the
#: signed image stays fp32.
_SETTINGS = {
    "x86": "u8 inputs and a shifted one",
    "x86-vnni": "signed inputs int8 too (about zero point 128)",
    "x86-avx2": "signed inputs of convs int8 on halved weights (codes -64..64, thresholds 2 max)",
    "arm": "every input signed, about zero point 128",
}


def _converted(bias_grid: bool, setting: str = "x86", weight_bits: int = 8):
    model = _stem()
    rng = np.random.default_rng(1)
    config = ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer(quant_bits=weight_bits), target=setting)
    ptq = ip.ImperativePTQ(config)
    qmodel = ptq.quantize(model)
    for _ in range(3):
        qmodel(paddle.to_tensor(rng.standard_normal((2, 3, 64, 64)).astype("float32")))
    ptq.convert(qmodel, bias_grid=bias_grid)
    return ptq, qmodel


def _grid_codes_by_loops(qmodel: nn.Layer, weight_levels: int = 127) -> list[tuple[np.ndarray, np.ndarray]]:
    """Slow reference: per int8 conv and output channel, the BatchNorm-folded bias (or the
    conv's own) divided by float32(input step x float32 weight step), and the size of the
    terms it is the sum of on that grid (what the float32 roundings of the stored parameters
    scale with); the input step of a shifted input is its grid's scale, else the
    input threshold over 127; the weight step the threshold of the weight the layer computes
    with over ``weight_levels`` (oneDNN's 8-bit requantization of 4-bit weights on ``x86``:
    127; ``arm`` computes with the 4-bit codes: 7)."""
    named = list(qmodel.named_sublayers())
    layers = [layer for _, layer in named]
    codes = []
    for index, (name, layer) in enumerate(named):
        if not isinstance(layer, QuantizedLayer) or (name.endswith(".conv2") and layer.sum_outputs):
            continue  # (the conv fused with the residual add on x86 keeps its bias)
        conv, following = layer.layer, layers[index + 2] if index + 2 < len(layers) else None
        norm = following if isinstance(following, nn.BatchNorm2D) else None
        thresholds = layer.weight_thresholds.numpy()
        step = float(layer.input_thresholds[0]) / 127 if layer.input_scale is None else float(layer.input_scale)
        row, sizes = [], []
        for channel in range(conv.weight.shape[0]):
            bias = 0.0 if conv.bias is None else float(conv.bias.numpy()[channel])
            factor, size = 1.0, abs(bias)
            if norm is not None:
                factor = float(np.float32(norm.weight.numpy()[channel] / np.sqrt(
                    norm._variance.numpy()[channel] + np.float32(norm._epsilon))))
                beta, mean = float(norm.bias.numpy()[channel]), float(norm._mean.numpy()[channel])
                bias = (bias - mean) * factor + beta
                size = abs(size * factor) + abs(mean * factor) + abs(beta)
            weight_step = np.float32(max(float(thresholds[channel]) * abs(factor), 1e-12) / weight_levels)
            grid_step = float(np.float32(step * float(weight_step)))
            row.append(bias / grid_step)
            sizes.append(size / grid_step)
        codes.append((np.array(row), np.array(sizes)))
    return codes


@pytest.mark.parametrize(
    "setting, weight_bits, int8_convs",
    [("x86", 8, 5), ("x86-vnni", 8, 6), ("x86-avx2", 8, 6), ("arm", 8, 7), ("x86", 4, 5), ("arm", 4, 7)],
)
def test_folded_biases_land_on_the_grid(setting: str, weight_bits: int, int8_convs: int) -> None:
    _, moved = _converted(bias_grid=True, setting=setting, weight_bits=weight_bits)
    _, kept = _converted(bias_grid=False, setting=setting, weight_bits=weight_bits)
    levels = 7 if weight_bits == 4 and setting == "arm" else 127
    moved_codes, kept_codes = _grid_codes_by_loops(moved, levels), _grid_codes_by_loops(kept, levels)
    assert len(moved_codes) == int8_convs
    if setting == "x86":
        assert sum(isinstance(layer, QuantizedLayer) and layer.input_shifted for layer in moved.sublayers()) == 1
    if setting != "arm":  # (the conv writing the max-pool's codes, and the fused one)
        assert sum(bool(layer.sum_outputs) for layer in moved.sublayers() if isinstance(layer, QuantizedLayer)) == 2
    for (on_grid, sizes), (off_grid, _) in zip(moved_codes, kept_codes):
        # (float32 parameters: the folded value is an integer up to the float32 roundings of
        # the terms it sums)
        assert np.all(np.abs(on_grid - np.round(on_grid)) < 1e-4 + 3e-7 * sizes)
        assert np.abs(off_grid - np.round(off_grid)).max() > 0.05  # it was off the grid
        assert np.abs(on_grid - off_grid).max() <= 0.5 + 1e-3  # by at most half a step


@pytest.mark.parametrize(
    "setting, weight_bits", [(setting, 8) for setting in _SETTINGS] + [("x86", 4), ("arm", 4)]
)
@pytest.mark.parametrize("bias_grid", [True, False], ids=["on the grid", "float biases"])
def test_onnx_runtime_adds_the_biases_the_simulation_adds(
    bias_grid: bool, setting: str, weight_bits: int, tmp_path
) -> None:
    """On the grid, ONNX Runtime computes the simulation up to rounding ties, as Paddle
    Inference does either way (checked for ``x86``: ``x86-vnni``'s signed int8 convs need VNNI
    to be exact in Paddle Inference, ``arm`` is for Paddle Lite), 4-bit weights included (on
    ``x86`` the grid of oneDNN's 8-bit requantization, which the export stores); with the
    float biases 0.7-1.7% of the largest output off (measured), each conv's outputs moved by
    a constant per channel."""
    ort = pytest.importorskip("onnxruntime")
    ptq, qmodel = _converted(bias_grid, setting, weight_bits)
    spec = [paddle.static.InputSpec([None, 3, 64, 64], "float32", "x")]
    x = np.random.default_rng(2).standard_normal((2, 3, 64, 64)).astype("float32")
    # (The residual branch as simulated: quantized on its own grid, ONNX Runtime departs.)
    path = export_onnx(qmodel, str(tmp_path / "m.onnx"), spec, int8_residual_branches=False)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x})[0]

    def up_to_ties(runtime_output):
        simulated, _ = simulation_up_to_ties(
            lambda: qmodel(paddle.to_tensor(x)).numpy(), runtime_output, 2e-6, candidates=16, max_flips=3
        )
        return relative_error(runtime_output, simulated)

    if setting == "x86" or setting == "x86-avx2" and ip.cpu_info().isa == "avx2":
        ptq.save_quantized_model(qmodel, str(tmp_path / "m"), spec)
        assert up_to_ties(predict(create_predictor(str(tmp_path / "m"), num_threads=1), x)[0]) < 2e-6
    if bias_grid:
        assert up_to_ties(onnx_out) < 2e-6
    else:
        assert up_to_ties(onnx_out) > 1e-4


@pytest.mark.parametrize("setting", ["x86", "x86-avx2"])
def test_analysis_recognizes_the_layers_whose_bias_moved(setting: str) -> None:
    """``analyze`` and ``keep_fp32`` pair each quantized layer with its fp32 layer by its
    weight and bias; the grid moved the biases (by what each layer records), which they
    refused as "another model" before."""
    ptq, qmodel = _converted(bias_grid=True, setting=setting)
    moved = [name for name, layer in qmodel.named_sublayers() if isinstance(layer, QuantizedLayer) and layer.bias_on_grid is not None]
    assert moved == ["6"]  # the one conv with a bias of its own and no BatchNorm
    model = _stem()
    batches = [np.random.default_rng(3).standard_normal((2, 3, 64, 64)).astype("float32")]
    report = ip.analyze(model, qmodel, batches)
    assert "6" in [row.name for row in report.rows]
    ip.keep_fp32(qmodel, ["6"], model)
    assert not isinstance(qmodel[6], QuantizedLayer)


class _TabularMLP(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(8, 64), nn.Linear(64, 32), nn.Linear(32, 3)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.l3(nn.functional.relu(self.l2(nn.functional.relu(self.l1(x)))))


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_linear_biases_land_on_the_grid_onnx_runtime_adds(target, tmp_path) -> None:
    """ONNX Runtime fuses a rank-2 MatMul and its bias Add into a Gemm whose bias it rounds to
    int32 on the grid of input scale x weight scale (QGemm); only conv biases were moved there
    (measured on this MLP with analytical bias correction: 1.1e-2 of the largest output off
    the simulation). The Linear layers move theirs too; Paddle Inference, which adds them in
    float, still computes the simulation."""
    ort = pytest.importorskip("onnxruntime")
    paddle.seed(0)
    model = _TabularMLP()
    model.eval()
    ptq = ip.ImperativePTQ(ip.PTQConfig(
        ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=target, bias_correction="analytical"
    ))
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, [np.random.default_rng(100 + i).random((4, 8)).astype("float32") for i in range(6)], progress=False)
    ptq.convert(qmodel)
    for name in ("l1", "l2", "l3"):
        layer = getattr(qmodel, name)
        steps = float(layer.input_thresholds[0]) / 127 * np.maximum(layer.weight_thresholds.numpy(), 1e-12) / 127
        codes = layer.layer.bias.numpy().astype(np.float64) / steps.astype(np.float32).astype(np.float64)
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-3, err_msg=name)
    x = np.random.default_rng(7).random((4, 8)).astype("float32")
    spec = [paddle.static.InputSpec([None, 8], "float32", "x")]
    session = ort.InferenceSession(export_onnx(qmodel, str(tmp_path / "m.onnx"), spec), providers=["CPUExecutionProvider"])
    prefix = str(tmp_path / "m")
    ptq.save_quantized_model(qmodel, prefix, spec)
    runs = [session.run(None, {session.get_inputs()[0].name: x})[0], predict(create_predictor(prefix, num_threads=1), x)[0]]
    for ran in runs:
        simulated, _ = simulation_up_to_ties(lambda: qmodel(paddle.to_tensor(x)).numpy(), ran, 2e-6)
        assert relative_error(ran, simulated) < 2e-6
