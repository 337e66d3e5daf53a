"""Where a user's reasonable step went wrong: a float64 model, float64 calibration arrays, a
failed export call, two ``ImperativePTQ`` instances on one model, tables of a converted model,
an export written over another kind, a registered custom layer, and the command line's
normalization of grayscale images."""

from __future__ import annotations

import argparse
import json

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.cli import IMAGENET_MEAN, resolve_normalization
from imperative_ptq.export import create_predictor, predict, save_fp32_model, save_quantized_model
from imperative_ptq.export.legacy_program import legacy_static_mode, load_legacy_program
from models import converted

SPEC = [paddle.static.InputSpec([None, 8], "float32", "x")]


def _net() -> paddle.nn.Layer:
    paddle.seed(0)
    net = paddle.nn.Sequential(paddle.nn.Linear(8, 16), paddle.nn.ReLU(), paddle.nn.Linear(16, 3))
    net.eval()
    return net


def _calibrated(ptq: ip.ImperativePTQ | None = None) -> tuple[ip.ImperativePTQ, paddle.nn.Layer]:
    ptq = ptq or ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer()))
    quantized = ptq.quantize(_net())
    rng = np.random.default_rng(0)
    ptq.calibrate(quantized, [rng.standard_normal((4, 8)).astype("float32") for _ in range(3)], progress=False)
    return ptq, quantized


def test_a_float64_model_is_refused_at_convert_with_the_fix() -> None:
    """Calibration runs; convert names the float64 parameter and how to go on (the int8
    simulation computes in float32); after ``to(dtype='float32')`` it converts."""
    model = _net()
    model.to(dtype="float64")
    ptq = ip.ImperativePTQ()
    quantized = ptq.quantize(model)
    ptq.calibrate(quantized, [np.random.default_rng(0).random((4, 8)) for _ in range(2)], progress=False)
    with pytest.raises(TypeError, match=r"parameter '0\.weight' is float64.*model\.to\(dtype='float32'\)"):
        ptq.convert(quantized)
    assert ptq.calibration_table(quantized)  # still calibrating
    quantized.to(dtype="float32")
    ptq.convert(quantized)
    assert quantized(paddle.rand([2, 8])).dtype == paddle.float32
    assert model.parameters()[0].dtype == paddle.float64  # the user's model is untouched


def test_float64_arrays_calibrate_a_float32_model() -> None:
    """``np.random.rand`` batches (float64) and lists of floats are read in the model's dtype
    (they failed inside Paddle's kernels)."""
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer()))
    quantized = ptq.quantize(_net())
    data = np.random.default_rng(1).random((4, 8))
    assert ptq.calibrate(quantized, [data, data.tolist()], progress=False) == 2
    assert ptq.calibration_table(quantized)["0"]["input"][0] == pytest.approx(float(data.max()), rel=1e-6)


@pytest.mark.parametrize("input_spec, path, error", [
    (None, "m", TypeError),
    ("[None, 8]", "m", TypeError),
    ([paddle.static.InputSpec([None, 7], "float32", "x")], "m", ValueError),
    (SPEC, "/proc/no_such_directory/m", OSError),
], ids=["no-spec", "string-spec", "spec-does-not-fit", "unwritable-path"])
def test_a_failed_export_leaves_the_model_calibrating(input_spec, path, error, tmp_path) -> None:
    ptq, quantized = _calibrated()
    if input_spec is None:
        # A batch passed by keyword: no spec can be inferred.
        ptq.calibrate(quantized, [{"input": paddle.rand([2, 8])}], progress=False)
    before = ptq.calibration_table(quantized)
    target = path if path.startswith("/") else str(tmp_path / path)
    with pytest.raises(error):
        ptq.save_quantized_model(quantized, target, input_spec=input_spec)
    assert isinstance(quantized[0], paddle.nn.Linear)  # not converted
    quantized(paddle.rand([2, 8]))  # and still calibrating, its statistics unchanged by the check
    assert ptq.calibration_table(quantized)["0"]["input"] >= before["0"]["input"]
    ptq.save_quantized_model(quantized, str(tmp_path / "ok"), input_spec=SPEC)


def test_another_ptq_instance_cannot_convert_a_model_calibrated_with_another_config(tmp_path) -> None:
    first = ip.ImperativePTQ(ip.PTQConfig(ip.HistQuantizer(hist_percent=0.9), ip.PerChannelAbsmaxQuantizer()))
    _, quantized = _calibrated(first)
    other = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.AbsmaxQuantizer(), target="arm"))
    with pytest.raises(ValueError, match="quantized by another ImperativePTQ"):
        other.save_quantized_model(quantized, str(tmp_path / "m"), input_spec=SPEC)
    assert ip.ImperativePTQ(first._quant_config).calibration_table(quantized)  # same config: fine
    first.convert(quantized)
    # Converted, the model carries its config: whoever exports it, the table names that one.
    other.save_quantized_model(quantized, str(tmp_path / "m"), input_spec=SPEC)
    written = json.loads((tmp_path / "m.calibration.json").read_text())
    assert written["config"]["activation_quantizer"]["type"] == "HistQuantizer"
    assert written["config"]["target"] == "x86"


def test_tables_of_a_converted_model_are_the_frozen_ones(tmp_path) -> None:
    ptq, quantized = _calibrated()
    before = ptq.calibration_table(quantized)
    ptq.convert(quantized)
    assert ptq.calibration_table(quantized) == before
    ptq.save_calibration_table(quantized, tmp_path / "table.json")
    fresh = ip.ImperativePTQ(ptq._quant_config)
    model = fresh.quantize(_net())
    fresh.load_calibration_table(model, tmp_path / "table.json")
    assert fresh.calibration_table(model) == before


@pytest.mark.parametrize("kind", ["fp32", "dynamic"])
def test_another_export_over_an_int8_one_removes_its_calibration_file(kind, tmp_path) -> None:
    ptq, quantized = _calibrated()
    prefix = str(tmp_path / "m")
    ptq.save_quantized_model(quantized, prefix, input_spec=SPEC)
    assert (tmp_path / "m.calibration.json").exists()
    if kind == "fp32":
        save_fp32_model(_net(), prefix, SPEC)
    else:
        ip.export.save_quantized_model(ip.quantize_dynamic(_net()), prefix, SPEC)
    assert not (tmp_path / "m.calibration.json").exists()
    assert (tmp_path / "m.pdmodel").exists() and (tmp_path / "m.pdiparams").exists()


class MatmulLinear(paddle.nn.Layer):
    """A Linear written by hand, registered as simulated."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.weight = self.create_parameter([inputs, outputs])
        self.bias = self.create_parameter([outputs], is_bias=True)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.matmul(x, self.weight) + self.bias


def test_a_registered_matmul_layer_runs_in_paddle_inference_as_simulated(tmp_path) -> None:
    """Paddle runs it as an fc and recomputes its weight scales like an ``nn.Linear``'s; the
    simulation now models that too (it was 2.3% off the simulation)."""
    ip.PTQRegistry.register(MatmulLinear, input_names=("X",), weight_names=("Y",), output_names=("Out",),
                            weight_channel_axis=1, simulated=True)
    try:
        paddle.seed(0)
        net = paddle.nn.Sequential(MatmulLinear(8, 16), paddle.nn.ReLU(), paddle.nn.Linear(16, 2))
        net.eval()
        ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer()))
        quantized = ptq.quantize(net)
        ptq.calibrate(quantized, [paddle.rand([64, 8]) for _ in range(4)], progress=False)
        ptq.save_quantized_model(quantized, str(tmp_path / "m"), input_spec=SPEC)
    finally:
        ip.PTQRegistry.unregister(MatmulLinear)
    x = np.random.default_rng(0).random((256, 8), dtype=np.float32)
    simulated = quantized(paddle.to_tensor(x)).numpy()
    ran = predict(create_predictor(str(tmp_path / "m"), num_threads=1), x)[0]
    np.testing.assert_allclose(ran, simulated, atol=1e-5 * np.abs(simulated).max())


@pytest.mark.parametrize("grayscale, mean, expected", [
    (True, None, [float(np.mean(IMAGENET_MEAN))]),
    (False, None, list(IMAGENET_MEAN)),
    (True, [0.5], [0.5]),
])
def test_cli_normalization_defaults_fit_the_channels(grayscale, mean, expected) -> None:
    args = argparse.Namespace(grayscale=grayscale, mean=mean, std=None)
    resolve_normalization(args)
    assert args.mean == pytest.approx(expected) and len(args.std) == len(expected)


def test_cli_normalization_of_the_wrong_length_is_refused_before_anything_runs() -> None:
    from imperative_ptq.cli import CliError

    with pytest.raises(CliError, match="--mean needs 1 or 1 values, got 3"):
        resolve_normalization(argparse.Namespace(grayscale=True, mean=list(IMAGENET_MEAN), std=None))


def test_kl_repr_shows_the_clip_bound() -> None:
    assert "max_clipped_share=0.25" in repr(ip.KLQuantizer())


def _converted_for(target: str) -> paddle.nn.Layer:
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=target))
    quantized = ptq.quantize(_net())
    rng = np.random.default_rng(0)
    ptq.calibrate(quantized, [rng.standard_normal((4, 8)).astype("float32") for _ in range(3)], progress=False)
    return ptq.convert(quantized)


def _op_types(prefix: str) -> list[str]:
    with legacy_static_mode():
        return [op.type for op in load_legacy_program(prefix).program.global_block().ops]


def test_a_wrapped_converted_model_exports_for_the_target_it_was_converted_for(tmp_path) -> None:
    """A converted model put in a Sequential with a softmax exports with its own target's
    arithmetic: it was exported for the default ``x86`` (its signed input shifted in front of
    an fc the simulation runs on s8 codes) and refused ``target='x86-vnni'``."""
    inner = _converted_for("x86-vnni")
    wrapper = paddle.nn.Sequential(inner, paddle.nn.Softmax())
    ip.export.save_quantized_model(inner, str(tmp_path / "inner"), SPEC)
    ip.export.save_quantized_model(wrapper, str(tmp_path / "wrapped"), SPEC, target="x86-vnni")
    table = json.loads((tmp_path / "wrapped.calibration.json").read_text())
    assert table["config"]["target"] == "x86-vnni"
    assert _op_types(str(tmp_path / "wrapped")) == [
        *[t for t in _op_types(str(tmp_path / "inner")) if t != "fetch"], "softmax", "fetch"
    ]
    x = np.random.default_rng(2).standard_normal((5, 8)).astype("float32")
    expected = wrapper(paddle.to_tensor(x)).numpy()
    if ip.cpu_info().vnni:  # the runtime check needs the target's kernels
        ran = predict(create_predictor(str(tmp_path / "wrapped")), x)[0]
        np.testing.assert_allclose(ran, expected, atol=1e-5)


def test_a_model_wrapping_two_targets_is_refused(tmp_path) -> None:
    wrapper = paddle.nn.Sequential(_converted_for("x86"), paddle.nn.Linear(3, 8), _converted_for("arm"))
    with pytest.raises(ValueError, match=r"Sequential wraps models converted for different targets \['arm', 'x86'\]"):
        ip.export.save_quantized_model(wrapper, str(tmp_path / "m"), SPEC)
    assert not list(tmp_path.iterdir())


class _UnusedParts(paddle.nn.Layer):
    """A calibrated conv whose output nothing uses (DLA's tree; ``jit.save`` prunes it) and an
    AvgPool2D the model holds for another mode (PaddleClas' ResNet-vd layers), never run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.project = paddle.nn.Conv2D(8, 8, 1)
        self.unused_pool = paddle.nn.AvgPool2D(2, 2)
        self.head = paddle.nn.Conv2D(8, 4, 3, padding=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = paddle.nn.functional.relu(self.conv(x))
        self.project(x)  # computed, never used
        return self.head(x)


def test_layers_outside_the_exported_program_get_no_fp32_warning(tmp_path, caplog) -> None:
    """Before: the pruned conv was "exported fp32 (no int8 kernel, e.g. conv3d)", the pool
    "never ran ... stays in fp32"."""
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer()))
    quantized = ptq.quantize(_UnusedParts())
    rng = np.random.default_rng(0)
    with caplog.at_level("WARNING", logger="imperative_ptq"):
        ptq.calibrate(quantized, [rng.random((2, 3, 8, 8)).astype("float32") for _ in range(2)], progress=False)
        ptq.convert(quantized)
        ptq.save_quantized_model(quantized, str(tmp_path / "m"), [paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")])
    assert not [r for r in caplog.records if r.levelno >= 30], caplog.text


class _ReadsItsWeight(paddle.nn.Layer):
    """Casts its input to its Linear's weight dtype in forward (PaddleNLP's BERT and ERNIE
    cast their attention mask to ``self.pooler.dense.weight.dtype``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = paddle.nn.Linear(8, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc(x.astype(self.fc.weight.dtype)) + self.fc.bias.sum()


def test_a_forward_reading_a_layers_weight_runs_after_convert_and_in_qat(tmp_path) -> None:
    """``weight`` and ``bias`` of a quantized layer are its wrapped layer's, as with Paddle's
    quantized layers (an AttributeError after convert before)."""
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer()))
    quantized = ptq.quantize(_ReadsItsWeight())
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((4, 8)).astype("float32") for _ in range(3)]
    ptq.calibrate(quantized, batches, progress=False)
    trainable = ip.ImperativeQAT(ptq).quantize(quantized)
    trainable.eval()
    assert trainable.fc.weight is trainable.fc.layer.weight
    converted = ptq.convert(quantized)
    assert converted.fc.weight is converted.fc.layer.weight and converted.fc.bias is converted.fc.layer.bias
    x = paddle.to_tensor(batches[0])
    np.testing.assert_allclose(trainable(x).numpy(), converted(x).numpy(), atol=1e-5)
    ptq.save_quantized_model(converted, str(tmp_path / "m"), SPEC)
    ran = predict(create_predictor(str(tmp_path / "m")), batches[0])[0]
    np.testing.assert_allclose(ran, converted(x).numpy(), atol=1e-5)


class _ConvNormNet(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.norm = paddle.nn.BatchNorm2D(8)
        self.head = paddle.nn.Conv2D(8, 4, 3, padding=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(paddle.nn.functional.relu(self.norm(self.conv(x)))).flatten(1)


def _converted_conv_norm_net(seed: int, target: str = "x86") -> paddle.nn.Layer:
    paddle.seed(seed)
    return converted(_ConvNormNet(), [paddle.randn([4, 3, 8, 8]) for _ in range(3)], target)


_CONV_SPEC = [paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")]


def test_a_state_dict_of_another_converted_model_is_refused_at_export(tmp_path) -> None:
    """The loaded thresholds simulate that model, while the export follows what convert
    decided (measured before: 0.20 of the largest output off in Paddle Inference and ONNX
    Runtime, silently)."""
    original, fresh = _converted_conv_norm_net(0), _converted_conv_norm_net(1)
    fresh.set_state_dict(original.state_dict())
    with pytest.raises(ValueError, match="'head'.*input_threshold buffer.*load_calibration_table"):
        save_quantized_model(fresh, str(tmp_path / "m"), _CONV_SPEC)
    assert not (tmp_path / "m.pdmodel").exists()
    # Its own state loaded back exports as before.
    own = _converted_conv_norm_net(0)
    own.set_state_dict(original.state_dict())
    save_quantized_model(own, str(tmp_path / "own"), _CONV_SPEC)


def test_a_batch_norm_folded_into_halved_weights_and_changed_after_convert_is_refused(tmp_path) -> None:
    """x86-avx2 halves the conv's weights with its BatchNorm folded in at convert; a forward in
    training mode moved the statistics (measured before: Paddle Inference 0.47 of the largest
    output off, silently)."""
    qmodel = _converted_conv_norm_net(0, "x86-avx2")
    qmodel.train()
    qmodel(paddle.randn([4, 3, 8, 8]) * 3 + 1)
    qmodel.eval()
    with pytest.raises(ValueError, match="'conv'.*BatchNorm 'norm'.*changed after convert"):
        save_quantized_model(qmodel, str(tmp_path / "m"), _CONV_SPEC)


class _MaskedSoftmax(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.fc = paddle.nn.Linear(12, 4)

    def forward(self, scores: paddle.Tensor) -> paddle.Tensor:
        return self.fc(paddle.nn.functional.softmax(scores, -1))


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_a_nan_row_is_quantized_to_code_zero_as_the_runtimes_do(target, tmp_path) -> None:
    """A fully masked attention row (softmax of all -inf: NaN) before an int8 Linear: both
    runtimes quantize NaN to code 0 and return the bias there; the simulation returned NaN."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from imperative_ptq.export import export_onnx

    paddle.seed(0)
    model = _MaskedSoftmax()
    model.eval()
    rng = np.random.default_rng(0)
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=target))
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, [rng.standard_normal((4, 12)).astype("float32") for _ in range(3)], progress=False)
    ptq.convert(qmodel)
    x = rng.standard_normal((3, 12)).astype("float32")
    x[1] = -np.inf
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    np.testing.assert_allclose(simulated[1], model.fc.bias.numpy(), atol=1e-5)
    prefix = str(tmp_path / "m")
    spec = [paddle.static.InputSpec([None, 12], "float32", "scores")]
    save_quantized_model(qmodel, prefix, spec)
    np.testing.assert_allclose(predict(create_predictor(prefix), x)[0], simulated, atol=1e-6)
    session = onnxruntime.InferenceSession(export_onnx(qmodel, prefix + ".onnx", spec), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"scores": x})[0], simulated, atol=1e-6)
