"""Weights below 8 bits (``PerChannelAbsmaxQuantizer(quant_bits=2..7)``): codes on the narrow
grid in the simulation, through the calibration table, and in the Paddle Inference export
(stored as int8 on the 8-bit grid, so the int8 kernels run them), which agrees with the
simulation exactly; in the ONNX export as INT4 from opset 21 (checked against an unpacking
written here) or as int8 holding the codes, run by ONNX Runtime."""

from __future__ import annotations

import logging
import os

import numpy as np
import paddle
import pytest
from paddle import nn

import imperative_ptq as ip
from imperative_ptq.export import create_predictor, predict
from imperative_ptq.export.legacy_program import legacy_static_mode, load_legacy_program
from imperative_ptq.quantizers.qparams import symmetric_levels
from ties import simulation_up_to_ties


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
    assert _runtime_error(ptq, qmodel, prefix) < 1e-5
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


def _tied_conv_in_paddle_inference(
    model: nn.Layer, x: np.ndarray, target: str, tmp_path
) -> tuple[np.ndarray, np.ndarray]:
    """``model`` (a 4 -> 16 1x1 conv first) converted with 4-bit per-channel weights whose codes
    are 6, 3, -3, 1 in every channel (codes 3 tie in Paddle's 8-bit requantization, 63.5),
    exported: Paddle Inference's output for ``x`` and the simulation's."""
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(4), target=target))
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
    return ran, simulated


def test_rounding_ties_of_the_runtime_requantization_are_simulated(tmp_path) -> None:
    """A channel whose largest 4-bit code is 6 holds codes 3 that Paddle's 8-bit requantization
    puts exactly half-way (3 * 127 / 6 = 63.5); which way each goes depends on float32
    arithmetic, which the simulation follows."""
    model = nn.Sequential(nn.Conv2D(4, 16, 1)).eval()
    x = np.random.default_rng(0).random((2, 4, 4, 4)).astype("float32")
    ran, simulated = _tied_conv_in_paddle_inference(model, x, "x86", tmp_path)
    assert np.linalg.norm(ran - simulated) / np.linalg.norm(simulated) < 1e-5


@pytest.mark.parametrize("target", ["x86", "x86-vnni"])
def test_requantization_ties_stay_as_simulated_when_paddle_folds_a_batch_norm(target: str, tmp_path) -> None:
    """The same ties with a BatchNorm after the conv: Paddle Inference folds it into the weight
    before requantizing, in float32 arithmetic of its own, which sent some of the codes 3 of a
    channel whose largest code is 6 the other way (a trained MNIST MobileNet with per-tensor
    4-bit weights ran 0.046 of its largest logit off the simulation). The export now stores
    such a layer's requantized weight, which Paddle's requantization leaves as it is."""
    paddle.seed(0)
    model = nn.Sequential(nn.Conv2D(4, 16, 1), nn.BatchNorm2D(16))
    rng = np.random.default_rng(0)
    model[1].weight.set_value(rng.uniform(0.3, 3.0, 16).astype("float32"))
    model[1]._variance.set_value(rng.uniform(0.1, 5.0, 16).astype("float32"))
    model.eval()
    x = rng.random((2, 4, 4, 4)).astype("float32")
    ran, simulated = _tied_conv_in_paddle_inference(model, x, target, tmp_path)
    assert np.abs(ran - simulated).max() / np.abs(simulated).max() < 1e-5


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
    assert _runtime_error(ptq, qmodel, prefix) < 1e-5


# ------------------------------------------------------------------------------------- ONNX
def _runtime_error(ptq: ip.ImperativePTQ, qmodel: nn.Layer, prefix: str) -> float:
    """Exports the converted ``qmodel`` to ``prefix`` and returns the relative error of Paddle
    Inference against the simulation on held-out data, up to rounding ties (:mod:`ties`)."""
    ptq.save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 3, 8, 8], "float32")])
    x = np.concatenate(_data(5, 2))
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    simulated, _ = simulation_up_to_ties(lambda: qmodel(paddle.to_tensor(x)).numpy(), ran, 1e-6)
    return float(np.linalg.norm(ran - simulated) / np.linalg.norm(simulated))


def _bn_model(seed: int) -> nn.Sequential:
    """Conv + BatchNorm (negative scales: the folded codes change sign) + depthwise conv +
    two Linear layers."""
    paddle.seed(seed)
    model = nn.Sequential(
        nn.Conv2D(3, 8, 3, padding=1), nn.BatchNorm2D(8), nn.ReLU(),
        nn.Conv2D(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.MaxPool2D(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 24), nn.ReLU(), nn.Linear(24, 10),
    )
    rng = np.random.default_rng(seed)
    batch_norm = model[1]
    signs = np.array([1, -1, 1, 1, -1, 1, -1, 1], np.float32)
    batch_norm.weight.set_value(signs * rng.uniform(0.5, 1.5, 8).astype("float32"))
    batch_norm._mean.set_value(rng.normal(0, 0.2, 8).astype("float32"))
    batch_norm._variance.set_value(rng.uniform(0.5, 2, 8).astype("float32"))
    return model.eval()


ONNX_SPEC = [paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")]


def _w4a8(target: str, bits: int = 4, seed: int = 0) -> tuple[ip.ImperativePTQ, nn.Layer]:
    ptq = ip.ImperativePTQ(
        ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(bits), target=target)
    )
    qmodel = ptq.quantize(_bn_model(seed))
    ptq.calibrate(qmodel, _data(100 + seed), progress=False)
    ptq.convert(qmodel)
    return ptq, qmodel


def _onnx_run(path: str, x: np.ndarray, optimized: str | None = None) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimized:
        options.optimized_model_filepath = optimized
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _unpack_int4(raw: bytes, count: int) -> np.ndarray:
    """ONNX's INT4 layout, element by element: element 2i in the low nibble of byte i,
    2i + 1 in the high nibble, two's complement."""
    values = []
    for byte in raw:
        for nibble in (byte & 0x0F, byte >> 4):
            values.append(nibble - 16 if nibble >= 8 else nibble)
    return np.array(values[:count], dtype=np.int64)


def _weight_dequantizers(graph) -> list:
    """The DequantizeLinear nodes of the graph whose input is a weight initializer of rank > 1,
    in graph order (the model's layer order)."""
    initializers = {t.name: t for t in graph.initializer}
    return [
        (node, initializers[node.input[0]]) for node in graph.node
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers
        and len(initializers[node.input[0]].dims) > 1
    ]


@pytest.mark.parametrize("target", ["x86", "arm"])
def test_onnx_int4_initializers_hold_the_simulations_codes(target: str, tmp_path) -> None:
    """At opset 21, asked for, every 4-bit weight is an INT4 initializer, two codes a byte,
    holding the codes the converted layer lies on (a BatchNorm folded into the conv flips the
    sign of the channels whose scale is negative), with per-channel scales t / 7."""
    onnx = pytest.importorskip("onnx")
    from imperative_ptq.export import export_onnx

    _, qmodel = _w4a8(target)
    path = export_onnx(qmodel, tmp_path / "m.onnx", ONNX_SPEC, opset=21, int4_weights=True)
    graph = onnx.load(path).graph
    dequantizers = _weight_dequantizers(graph)
    layers = [layer for layer in qmodel.sublayers() if isinstance(layer, ip.QuantizedLayer)]
    assert len(layers) == len(dequantizers) == 4
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    gamma = qmodel[1].weight.numpy()
    for layer, (node, tensor) in zip(layers, dequantizers):
        assert tensor.data_type == onnx.TensorProto.INT4
        count = int(np.prod(tensor.dims))
        assert len(tensor.raw_data) == (count + 1) // 2
        stored = layer.program_weight if layer.program_weight is not None else layer.layer.weight.numpy()
        thresholds = layer.grid_thresholds
        shape = [1] * stored.ndim
        shape[layer.weight_axis] = -1
        codes = np.round(stored / (thresholds / 7).reshape(shape)).astype(np.int64)
        if layer is layers[0]:
            codes = codes * np.sign(gamma).astype(np.int64).reshape(-1, 1, 1, 1)
        assert list(tensor.dims) == list(codes.shape)
        np.testing.assert_array_equal(_unpack_int4(tensor.raw_data, count).reshape(codes.shape), codes)
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["axis"] == layer.weight_axis
        scales = constants[node.input[1]]
        assert scales.shape == (codes.shape[layer.weight_axis],)
        if layer is not layers[0]:
            np.testing.assert_allclose(scales, thresholds / 7, rtol=1e-6)


@pytest.mark.parametrize("target", ["x86", "arm"])
def test_onnx_runtime_runs_int4_weights_as_the_simulation(target: str, tmp_path) -> None:
    """ONNX Runtime 1.32 dequantizes INT4 weights and runs float Conv/Gemm on them (it has no
    int4 conv kernel, and fuses no MatMulNBits behind a quantized input). With the arm target
    (the simulation computes with the 4-bit codes) it equals, bit for bit, the same export with
    the codes stored in int8 (QLinearConv); with x86 the int8 export holds Paddle's 8-bit
    requantization of them, which the simulation follows and the INT4 file does not."""
    onnx = pytest.importorskip("onnx")
    from imperative_ptq.export import export_onnx

    _, qmodel = _w4a8(target)
    x = np.concatenate(_data(7, 2))
    with paddle.no_grad():
        simulated = qmodel(paddle.to_tensor(x)).numpy()
    int4 = _onnx_run(
        export_onnx(qmodel, tmp_path / "int4.onnx", ONNX_SPEC, opset=21, int4_weights=True), x,
        str(tmp_path / "optimized.onnx"),
    )
    int8 = _onnx_run(export_onnx(qmodel, tmp_path / "int8.onnx", ONNX_SPEC, opset=21, int4_weights=False), x)
    kinds = [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "QLinearConv" not in kinds and kinds.count("Conv") == 2, kinds
    cosine = float((int4 * simulated).sum() / np.linalg.norm(int4) / np.linalg.norm(simulated))
    # Measured over 5 seeds: arm 0.99982-0.99991, x86 0.99936-0.99979. The 8-bit-stored export
    # reaches 0.99965-0.99992: the export quantizes conv/Linear outputs with their output
    # thresholds (for ONNX Runtime's fusions), which the simulation leaves in float; on x86
    # the simulation's weights are Paddle's requantization of the codes (1.7-4.4% relative
    # output difference between the two exports).
    assert cosine > (0.9995 if target == "arm" else 0.998), cosine
    if target == "arm":
        # The same codes; the int8 file's final Linear (its output the logits, in float) runs
        # MatMulIntegerToFloat (int32 sums scaled once) where the INT4 file's runs a float
        # MatMul: float32 rounding apart (bit for bit while both ran a float Gemm).
        np.testing.assert_allclose(int4, int8, rtol=0, atol=1e-6 * np.abs(int8).max())


@pytest.mark.parametrize("target", ["x86", "arm"])
def test_onnx_int4_by_default_only_where_it_holds_the_simulations_weight(target: str, tmp_path, caplog) -> None:
    """At opset 21 the default stores INT4 where it holds the weight the simulation computes
    with (arm: the 4-bit codes) and int8 where it cannot (x86: Paddle's 8-bit requantization
    of them; INT4 was the default there too, silently 3.2e-3 of a Linear's largest output off
    the simulation in ONNX Runtime); asked for, INT4 is stored with a warning naming them."""
    onnx = pytest.importorskip("onnx")
    from imperative_ptq.export import export_onnx

    _, qmodel = _w4a8(target)
    x = np.concatenate(_data(7, 2))
    with caplog.at_level(logging.INFO, logger="imperative_ptq"):
        default = export_onnx(qmodel, tmp_path / "default.onnx", ONNX_SPEC, opset=21)
    kinds = {t.data_type for t in onnx.load(default).graph.initializer if len(t.dims) > 1}
    reference = export_onnx(qmodel, tmp_path / "reference.onnx", ONNX_SPEC, opset=21, int4_weights=target == "arm")
    np.testing.assert_array_equal(_onnx_run(default, x), _onnx_run(reference, x))
    if target == "arm":
        assert kinds == {onnx.TensorProto.INT4}
        return
    assert onnx.TensorProto.INT4 not in kinds
    assert "stored as int8" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        export_onnx(qmodel, tmp_path / "int4.onnx", ONNX_SPEC, opset=21, int4_weights=True)
    assert "int4_weights=True: 4 layers stored as INT4" in caplog.text


def test_onnx_int4_file_is_smaller(tmp_path) -> None:
    from imperative_ptq.export import export_onnx

    _, qmodel = _w4a8("x86")
    sizes = {}
    for flag in (True, False):
        path = export_onnx(qmodel, tmp_path / f"{flag}.onnx", ONNX_SPEC, opset=21, int4_weights=flag)
        sizes[flag] = os.path.getsize(path)
    weights = sum(int(np.prod(layer.layer.weight.shape)) for layer in qmodel.sublayers()
                  if isinstance(layer, ip.QuantizedLayer))
    # Each weight element takes a byte in int8, half a byte in INT4, which also drops the
    # int8 zero-point tensors (measured here: 1977 bytes less for 3600 weights).
    assert sizes[False] - sizes[True] >= weights // 2


@pytest.mark.parametrize("bits", [4, 6])
def test_onnx_weights_stored_as_int8_hold_the_narrow_codes(bits: int, tmp_path, caplog) -> None:
    """Below opset 21 (4 bits, with a warning) and for 5..7 bits, the codes ``-L..L`` are
    stored in int8 at scale t / L (the arm target: the simulation computes with them)."""
    onnx = pytest.importorskip("onnx")
    from imperative_ptq.export import export_onnx

    _, qmodel = _w4a8("arm", bits)
    opset = 13 if bits == 4 else 21
    with caplog.at_level("WARNING", logger="imperative_ptq.export.onnx_export"):
        path = export_onnx(qmodel, tmp_path / "m.onnx", ONNX_SPEC, opset=opset)
    warned = [r for r in caplog.records if "no INT4" in r.getMessage()]
    assert len(warned) == (1 if bits == 4 else 0)
    graph = onnx.load(path).graph
    levels = symmetric_levels(bits)
    dequantizers = _weight_dequantizers(graph)
    assert len(dequantizers) == 4
    for _, tensor in dequantizers:
        codes = onnx.numpy_helper.to_array(tensor)
        assert codes.dtype == np.int8 and np.abs(codes).max() == levels
    x = np.concatenate(_data(7, 2))
    with paddle.no_grad():
        simulated = qmodel(paddle.to_tensor(x)).numpy()
    ran = _onnx_run(path, x)
    cosine = float((ran * simulated).sum() / np.linalg.norm(ran) / np.linalg.norm(simulated))
    assert cosine > 0.9995, cosine


def test_onnx_int4_bad_input(tmp_path) -> None:
    pytest.importorskip("onnx")
    from imperative_ptq.export import export_onnx

    _, qmodel = _w4a8("x86")
    with pytest.raises(ValueError, match="opset >= 21"):
        export_onnx(qmodel, tmp_path / "m.onnx", ONNX_SPEC, opset=20, int4_weights=True)
    with pytest.raises(TypeError, match="int4_weights"):
        export_onnx(qmodel, tmp_path / "m.onnx", ONNX_SPEC, opset=21, int4_weights="yes")
    _, eight_bit = _w4a8("x86", 8)
    with pytest.raises(ValueError, match="no layer has weights of 4 bits or fewer"):
        export_onnx(eight_bit, tmp_path / "m.onnx", ONNX_SPEC, opset=21, int4_weights=True)
    dynamic = ip.quantize_dynamic(nn.Sequential(nn.Linear(8, 4)))
    with pytest.raises(ValueError, match="MatMulInteger"):
        export_onnx(dynamic, tmp_path / "m.onnx", [paddle.static.InputSpec([None, 8], "float32", "x")],
                    opset=21, int4_weights=True)
    assert os.listdir(tmp_path) == []


def test_onnx_int4_conv1d_holds_the_layers_codes(tmp_path) -> None:
    """A Conv1D traces as a conv2d of its unsqueezed weight; on x86 (whose simulation runs
    Paddle's requantization) the INT4 initializer, asked for, still holds the layer's own
    4-bit codes."""
    onnx = pytest.importorskip("onnx")
    from imperative_ptq.export import export_onnx

    model = nn.Sequential(nn.Conv1D(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 5))
    rng = np.random.default_rng(0)
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(4)))
    qmodel = ptq.quantize(model.eval())
    ptq.calibrate(qmodel, [rng.random((8, 4, 16), dtype=np.float32) for _ in range(3)], progress=False)
    ptq.convert(qmodel)
    spec = [paddle.static.InputSpec([None, 4, 16], "float32", "x")]
    path = export_onnx(qmodel, tmp_path / "m.onnx", spec, opset=21, int4_weights=True)
    (node, tensor), _ = _weight_dequantizers(onnx.load(path).graph)
    layer = qmodel[0]
    assert layer.program_weight is not None  # the simulation computes the requantized weight
    codes = np.round(layer.program_weight / (layer.grid_thresholds / 7).reshape(-1, 1, 1))
    assert tensor.data_type == onnx.TensorProto.INT4 and list(tensor.dims) == [8, 4, 1, 3]
    np.testing.assert_array_equal(
        _unpack_int4(tensor.raw_data, codes.size), codes.astype(np.int64).reshape(-1)
    )
    x = rng.random((8, 4, 16), dtype=np.float32)
    ran = _onnx_run(path, x)
    with paddle.no_grad():
        simulated = qmodel(paddle.to_tensor(x)).numpy()
    cosine = float((ran * simulated).sum() / np.linalg.norm(ran) / np.linalg.norm(simulated))
    assert cosine > 0.9995, cosine  # measured 0.99994


def test_channels_whose_weights_all_round_to_zero_are_named(caplog) -> None:
    """Per-tensor 4-bit weights round every weight of a channel 20x narrower than the widest
    to 0: the channel outputs its bias alone (a real captcha recognizer read nothing right,
    0% against 45% fp32), and nothing said so. Per-channel weights keep those channels."""
    model = nn.Sequential(nn.Conv2D(3, 8, 3, padding=1), nn.ReLU()).eval()
    weight = np.full((8, 3, 3, 3), 0.01, np.float32)
    weight[0] = 1.0
    model[0].weight.set_value(weight)
    for weights, warned in ((ip.AbsmaxQuantizer(4), True), (ip.PerChannelAbsmaxQuantizer(4), False)):
        ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), weights))
        qmodel = ptq.quantize(model)
        ptq.calibrate(qmodel, _data(0), progress=False)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
            ptq.convert(qmodel)
        assert ("whose every weight rounds to 0" in caplog.text) is warned
        if warned:
            assert caplog.text.rstrip().endswith(": 0 (7 of 8)")


def test_a_linear_channel_paddles_fc_zeroes_is_named_with_its_cause(caplog) -> None:
    """A nearly dead output channel of a Linear (weights 1e-6 of the widest, as in MediaPipe's
    hand landmark head): Paddle's int8 fc takes its scale from other weights and rounds it to
    0; per-channel weights cannot keep it, so the warning says the fc did it."""
    paddle.seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()  # (a head may run as a conv)
    weight = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    weight[:, 3] *= 1e-6
    model[0].weight.set_value(weight)
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, [np.random.default_rng(1).random((4, 16), dtype=np.float32)], progress=False)
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        ptq.convert(qmodel)
    assert "whose every weight rounds to 0" in caplog.text
    assert caplog.text.count("0 (1 of 8; Paddle's int8 fc scales them by other weights)") == 1, caplog.text
