"""The bad-input battery: what users get wrong, fed to every public entry point.

Each case asserts a clear exception naming the problem, or correct behaviour; never a silent
wrong threshold or a changed user model. The cases are listed in docs/bad_input.md (a test
below keeps the two in sync).
"""

from __future__ import annotations

import copy
import pathlib
import re
from typing import Callable

import numpy as np
import paddle
import pytest

from imperative_ptq import (
    AbsmaxQuantizer,
    CalibrationError,
    HistQuantizer,
    ImperativePTQ,
    KLQuantizer,
    MSEQuantizer,
    PerChannelAbsmaxQuantizer,
    PTQConfig,
    QuantizedLayer,
    TensorRTKLQuantizer,
)
from imperative_ptq.export import create_predictor, save_quantized_model
from imperative_ptq.quantizers import MIN_THRESHOLD

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "bad_input.md"


def _model() -> paddle.nn.Layer:
    paddle.seed(3)
    model = paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4), paddle.nn.ReLU(),
        paddle.nn.Flatten(), paddle.nn.Linear(4 * 6 * 6, 3),
    )
    model.eval()
    return model


def _batch(scale: float = 1.0) -> paddle.Tensor:
    return paddle.to_tensor(
        np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype("float32") * scale
    )


def _calibrated(ptq: ImperativePTQ | None = None) -> tuple[ImperativePTQ, paddle.nn.Layer]:
    ptq = ptq or ImperativePTQ()
    qmodel = ptq.quantize(_model())
    qmodel(_batch())
    return ptq, qmodel


def _finite_positive(table: dict) -> bool:
    values = [v for roles in table.values() for vs in roles.values() for v in vs]
    return bool(values) and all(np.isfinite(v) and v > 0 for v in values)


# ----------------------------------------------------------------- errors: (call, exception, match)
def _quantize_string() -> None:
    ImperativePTQ().quantize("resnet18")


def _config_class() -> None:
    PTQConfig(KLQuantizer, PerChannelAbsmaxQuantizer())


def _config_swapped() -> None:
    PTQConfig(PerChannelAbsmaxQuantizer(), KLQuantizer())


def _bits_zero() -> None:
    KLQuantizer(quant_bits=0)


def _bits_float() -> None:
    AbsmaxQuantizer(quant_bits=8.0)


def _bins_negative() -> None:
    HistQuantizer(bins=-4)


def _kl_one_bit() -> None:
    KLQuantizer(quant_bits=1)


def _percent_one() -> None:
    HistQuantizer(hist_percent=1.0)


def _quantize_twice() -> None:
    ptq = ImperativePTQ()
    ptq.quantize(ptq.quantize(_model()))


def _quantize_data_parallel() -> None:
    ImperativePTQ().quantize(paddle.DataParallel(_model()))


def _quantize_translated_layer(tmp_path: pathlib.Path) -> None:
    paddle.jit.save(_model(), str(tmp_path / "saved"), input_spec=[paddle.static.InputSpec([None, 3, 8, 8], "float32")])
    loaded = paddle.jit.load(str(tmp_path / "saved"))
    ImperativePTQ().quantize(paddle.nn.Sequential(paddle.nn.Conv2D(3, 3, 1), loaded), inplace=True)


def _table_before_data() -> None:
    ptq = ImperativePTQ()
    ptq.calibration_table(ptq.quantize(_model()))


def _convert_without_data() -> None:
    ptq = ImperativePTQ()
    ptq.convert(ptq.quantize(_model()))


def _table_of_fp32_model() -> None:
    ImperativePTQ().calibration_table(_model())


def _empty_calibration() -> None:
    ptq = ImperativePTQ()
    ptq.calibrate(ptq.quantize(_model()), [], progress=False)


def _calibrate_dict_batch_missing_input() -> None:
    ptq = ImperativePTQ()  # Sequential.forward takes ``input``, not ``x``
    ptq.calibrate(ptq.quantize(_model()), [{"x": _batch()}], progress=False)


def _training_mode_forward() -> None:
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(_model())
    qmodel.train()
    qmodel(_batch())


def _batch_statistics_in_eval_mode() -> None:
    model = paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4, use_global_stats=False), paddle.nn.ReLU()
    )
    model.eval()
    ptq = ImperativePTQ()
    ptq.quantize(model)(paddle.randn([2, 3, 8, 8]))


def _wrong_input_shape() -> None:
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(_model())
    qmodel(paddle.randn([2, 5, 8, 8]))  # Paddle's own shape error surfaces unchanged


def _table_missing_file(tmp_path: pathlib.Path) -> None:
    ptq = ImperativePTQ()
    ptq.load_calibration_table(ptq.quantize(_model()), tmp_path / "missing.json")


def _table_not_json(tmp_path: pathlib.Path) -> None:
    (tmp_path / "table.json").write_text("{not json")
    ptq = ImperativePTQ()
    ptq.load_calibration_table(ptq.quantize(_model()), tmp_path / "table.json")


def _table_negative_threshold(tmp_path: pathlib.Path) -> None:
    ptq, qmodel = _calibrated()
    ptq.save_calibration_table(qmodel, tmp_path / "table.json")
    text = (tmp_path / "table.json").read_text()
    (tmp_path / "table.json").write_text(re.sub(r'"output": \[\s*[0-9.e+-]+', '"output": [-1.0', text, 1))
    ptq.load_calibration_table(ptq.quantize(_model()), tmp_path / "table.json")


def _table_wrong_channels(tmp_path: pathlib.Path) -> None:
    ptq, qmodel = _calibrated()
    ptq.save_calibration_table(qmodel, tmp_path / "table.json")
    other = paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 5, 3), paddle.nn.BatchNorm2D(5), paddle.nn.ReLU(),
        paddle.nn.Flatten(), paddle.nn.Linear(5 * 6 * 6, 3),
    )
    ptq.load_calibration_table(ptq.quantize(other), tmp_path / "table.json")


def _state_other_algorithm(tmp_path: pathlib.Path) -> None:
    ptq, qmodel = _calibrated()
    ptq.save_state(qmodel, tmp_path / "state.npz")
    other = ImperativePTQ(PTQConfig(AbsmaxQuantizer(), PerChannelAbsmaxQuantizer()))
    other.load_state(other.quantize(_model()), tmp_path / "state.npz")


def _export_uncalibrated(tmp_path: pathlib.Path) -> None:
    ptq = ImperativePTQ()
    ptq.save_quantized_model(ptq.quantize(_model()), tmp_path / "model",
                             [paddle.static.InputSpec([None, 3, 8, 8], "float32")])


def _export_fp32_model(tmp_path: pathlib.Path) -> None:
    save_quantized_model(_model(), tmp_path / "model",
                         [paddle.static.InputSpec([None, 3, 8, 8], "float32")])


def _export_wrong_spec_type(tmp_path: pathlib.Path) -> None:
    ptq, qmodel = _calibrated()
    ptq.save_quantized_model(qmodel, tmp_path / "model", input_spec="[None, 3, 8, 8]")


def _predictor_missing(tmp_path: pathlib.Path) -> None:
    create_predictor(tmp_path / "nothing")


ERRORS: dict[str, tuple[Callable, type, str]] = {
    "quantize-non-layer": (_quantize_string, TypeError, "model must be a paddle.nn.Layer"),
    "config-quantizer-class": (_config_class, TypeError, "activation_quantizer"),
    "config-roles-swapped": (_config_swapped, TypeError, "activation_quantizer"),
    "quant-bits-zero": (_bits_zero, ValueError, "quant_bits"),
    "quant-bits-float": (_bits_float, TypeError, "quant_bits"),
    "bins-negative": (_bins_negative, ValueError, "bins"),
    # (It said "needs quant_bits >= 2 and bins >= 3 for quant_bits=1, got bins=1024".)
    "kl-one-bit": (_kl_one_bit, ValueError, r"^KLQuantizer needs quant_bits >= 2, got quant_bits=1$"),
    "hist-percent-one": (_percent_one, ValueError, "hist_percent"),
    "quantize-twice": (_quantize_twice, ValueError, "already quantized"),
    "quantize-data-parallel": (_quantize_data_parallel, TypeError, r"^model is a paddle.DataParallel: quantize the model it wraps \(its _layers\)"),
    "table-before-data": (_table_before_data, CalibrationError, "no calibration data"),
    "convert-without-data": (_convert_without_data, CalibrationError, "no calibration data"),
    "table-of-fp32-model": (_table_of_fp32_model, ValueError, "not prepared"),
    "calibrate-empty-data": (_empty_calibration, ValueError, "no calibration batch"),
    "calibrate-dict-batch-missing-input": (
        _calibrate_dict_batch_missing_input, TypeError, r"lacks input\(s\) \['input'\]"
    ),
    "forward-in-training-mode": (_training_mode_forward, CalibrationError, "training mode"),
    "batch-statistics-in-eval-mode": (
        _batch_statistics_in_eval_mode, CalibrationError,
        r"^1 normalizes each batch with its own statistics in eval mode too \(use_global_stats=False\)",
    ),
    "wrong-input-shape": (_wrong_input_shape, ValueError, "channel"),
}
class _FoldsPatches(paddle.nn.Layer):
    """Patches folded back with F.fold, which traces only with known sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 4, 3, padding=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.nn.functional.fold(paddle.nn.functional.unfold(self.conv(x), 2, 2), [8, 8], 2, 2)


def _export_fold_with_dynamic_batch(tmp_path: pathlib.Path) -> None:
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(_FoldsPatches())
    qmodel(paddle.rand([2, 3, 8, 8]))
    ptq.convert(qmodel)
    ptq.save_quantized_model(
        qmodel, str(tmp_path / "fold"), input_spec=[paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")]
    )


FILE_ERRORS: dict[str, tuple[Callable, type, str]] = {
    "quantize-translated-layer": (
        _quantize_translated_layer, TypeError, "^sublayer '1' is a TranslatedLayer from paddle.jit.load: .* Build it from its Python class"
    ),
    "table-missing-file": (_table_missing_file, FileNotFoundError, "missing.json"),
    "table-not-json": (_table_not_json, ValueError, "not a calibration table"),
    "table-negative-threshold": (_table_negative_threshold, ValueError, "finite positive"),
    "table-wrong-channel-count": (
        _table_wrong_channels, ValueError, r"layer '0' .*channel count 4 in the file, 5 in the model"
    ),
    "state-other-algorithm": (_state_other_algorithm, ValueError, "KLQuantizer"),
    "export-uncalibrated": (_export_uncalibrated, CalibrationError, "no calibration data"),
    "export-fp32-model": (_export_fp32_model, (TypeError, ValueError), "quantiz|convert"),
    "export-input-spec-string": (_export_wrong_spec_type, TypeError, "input_spec"),
    "predictor-missing-path": (_predictor_missing, FileNotFoundError, "nothing.pdmodel"),
    "export-fold-dynamic-batch": (
        _export_fold_with_dynamic_batch, ValueError, r"such as F.fold, trace only with known sizes: "
                                                     r"try fixed sizes \(a fixed batch\) in the input_spec",
    ),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_input_raises_clear_error(case: str) -> None:
    call, error, match = ERRORS[case]
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("case", sorted(FILE_ERRORS))
def test_bad_file_input_raises_clear_error(case: str, tmp_path) -> None:
    call, error, match = FILE_ERRORS[case]
    with pytest.raises(error, match=match):
        call(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing half-written


# ------------------------------------------------------------------------ correct behaviour
ALGORITHMS = [AbsmaxQuantizer, HistQuantizer, KLQuantizer, TensorRTKLQuantizer, MSEQuantizer]


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a.__name__)
@pytest.mark.parametrize(
    "case, values",
    [
        ("nan-and-inf", [np.nan, np.inf, -np.inf, 0.5, -2.0]),
        ("all-zeros", [0.0, 0.0, -0.0]),
        ("huge-values", [3e38, -1e30, 1.0, 0.0]),
        ("tiny-values", [1e-30, -1e-35, 0.0]),
        ("single-element", [7.0]),
    ],
)
def test_extreme_values_give_finite_positive_thresholds(algorithm, case: str, values) -> None:
    quantizer = algorithm()
    quantizer.sample_data(None, (paddle.to_tensor(np.asarray(values, dtype=np.float32)),))
    quantizer.cal_thresholds()
    (threshold,) = quantizer.thresholds
    assert np.isfinite(threshold) and threshold > 0
    finite = np.abs(np.asarray(values, dtype=np.float32))
    finite = finite[np.isfinite(finite)]
    assert threshold <= max(float(finite.max()) * 1.01, MIN_THRESHOLD)  # never a made-up range


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_low_and_high_precision_tensors_are_reduced_in_float32(dtype: str) -> None:
    values = paddle.to_tensor([0.5, -3.0, 1.25]).astype(dtype)
    quantizer = AbsmaxQuantizer()
    quantizer.sample_data(None, (values,))
    quantizer.cal_thresholds()
    assert quantizer.thresholds == [3.0]


def test_float64_model_calibrates() -> None:
    model = _model()
    model.to(dtype="float64")
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(model)
    qmodel(_batch().astype("float64"))
    assert _finite_positive(ptq.calibration_table(qmodel))


def test_integer_model_input_is_skipped_not_sampled() -> None:
    model = paddle.nn.Sequential(paddle.nn.Embedding(10, 4), paddle.nn.Linear(4, 2))
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(model)
    qmodel(paddle.to_tensor([[1, 2, 3]]))
    table = ptq.calibration_table(qmodel)
    assert set(table) == {"1"} and _finite_positive(table)


@pytest.mark.parametrize("value", [None, 1, "no"])
def test_convert_bias_grid_must_be_a_bool(value) -> None:
    ptq, qmodel = _calibrated()
    with pytest.raises(TypeError, match="bias_grid must be True or False"):
        ptq.convert(qmodel, bias_grid=value)
    ptq.convert(qmodel)  # still calibrating: converts as usual
    assert any(isinstance(layer, QuantizedLayer) for layer in qmodel.sublayers())


def test_convert_twice_is_a_no_op() -> None:
    ptq, qmodel = _calibrated()
    ptq.convert(qmodel)
    before = [p.numpy().copy() for p in qmodel.parameters()]
    ptq.convert(qmodel)
    for old, new in zip(before, qmodel.parameters()):
        np.testing.assert_array_equal(old, new.numpy())


def test_failed_calls_never_change_the_user_model() -> None:
    model = _model()
    snapshot = copy.deepcopy(model.state_dict())
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(model)
    with pytest.raises(CalibrationError):
        ptq.convert(qmodel)
    qmodel.train()
    with pytest.raises(CalibrationError):
        qmodel(_batch())
    assert model.training is False
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), snapshot[name].numpy())
    assert all(not layer._forward_post_hooks for layer in model.sublayers(include_self=True))


def test_every_case_is_documented() -> None:
    documented = DOC.read_text()
    for case in [*ERRORS, *FILE_ERRORS]:
        assert f"`{case}`" in documented, case


class _ReturnsNone(paddle.nn.ReLU):
    """A supported layer type (a ReLU subclass) whose forward returns None."""

    def forward(self, x):  # noqa: D102
        return None


def test_layer_returning_none_is_skipped_with_one_warning(caplog) -> None:
    class Net(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.fc = paddle.nn.Linear(4, 4)
            self.odd = _ReturnsNone()

        def forward(self, x):
            y = self.fc(x)
            self.odd(y)
            return y

    ptq = ImperativePTQ()
    qmodel = ptq.quantize(Net())
    with caplog.at_level("WARNING", logger="imperative_ptq"):
        for _ in range(3):
            qmodel(paddle.randn([2, 4]))
        table = ptq.calibration_table(qmodel)
    warnings = [r.getMessage() for r in caplog.records if "not calibrated" in r.getMessage()]
    assert len(warnings) == 1 and "'odd'" in warnings[0] and "NoneType" in warnings[0]
    assert set(table) == {"fc"}


class _PooledResidual(paddle.nn.Layer):
    """stem -> a residual block (conv + BN + add + ReLU) -> global pool -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        nn = paddle.nn
        self.stem, self.bn0, self.relu0 = nn.Conv2D(3, 8, 3, padding=1, bias_attr=False), nn.BatchNorm2D(8), nn.ReLU()
        self.conv, self.bn1, self.relu1 = nn.Conv2D(8, 8, 3, padding=1, bias_attr=False), nn.BatchNorm2D(8), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2D(1), nn.Linear(8, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = self.relu0(self.bn0(self.stem(x)))
        return self.fc(self.pool(self.relu1(self.bn1(self.conv(h)) + h)).flatten(1))


def _wide(bits: int) -> tuple[paddle.nn.Layer, paddle.nn.Layer, paddle.Tensor]:
    paddle.seed(0)
    model = _PooledResidual()
    model.eval()
    x = paddle.rand([16, 3, 8, 8])
    ptq = ImperativePTQ(PTQConfig(AbsmaxQuantizer(quant_bits=bits), PerChannelAbsmaxQuantizer()))
    quantized = ptq.quantize(model)
    ptq.calibrate(quantized, [x], progress=False)
    return model, ptq.convert(quantized), x


def test_activations_wider_than_8_bits_are_simulated_but_not_exported(tmp_path) -> None:
    """The simulation's runtime paths (fused residuals, head pools on u8 codes up to 255)
    clipped a 16-bit grid at code 255 (cosine to fp32 0.71 / 0.83 measured); the exports
    wrote 8-bit programs (Paddle Inference 99% off) or failed (ONNX OverflowError)."""
    from imperative_ptq.export import export_onnx

    model, eight, x = _wide(8)
    _, sixteen, _ = _wide(16)
    reference = model(x).numpy().ravel()

    def cosine(quantized: paddle.nn.Layer) -> float:
        out = quantized(x).numpy().ravel()
        return float(out @ reference / np.linalg.norm(out) / np.linalg.norm(reference))

    assert cosine(sixteen) >= cosine(eight) > 0.99
    spec = [paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")]
    for export in (lambda: save_quantized_model(sixteen, str(tmp_path / "m"), spec),
                   lambda: export_onnx(sixteen, str(tmp_path / "m.onnx"), spec)):
        with pytest.raises(ValueError, match=r"quantized wider than 8 bits.*stem \(16/8 bits\)"):
            export()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("value", [1, "no", 0.5])
def test_onnx_int8_residual_branches_must_be_a_bool(value, tmp_path) -> None:
    pytest.importorskip("onnx")
    from imperative_ptq.export import export_onnx

    _, eight, _ = _wide(8)
    spec = [paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")]
    with pytest.raises(TypeError, match="int8_residual_branches must be True, False or None"):
        export_onnx(eight, str(tmp_path / "m.onnx"), spec, int8_residual_branches=value)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("layer", [paddle.nn.Conv2D(3, 4, 3), paddle.nn.Linear(8, 4)], ids=["Conv2D", "Linear"])
def test_a_bare_supported_layer_is_refused_with_the_fix(layer) -> None:
    """It was refused as having "no leaf layer supported by PTQRegistry", though it is one."""
    with pytest.raises(ValueError, match=rf"bare {type(layer).__name__}.*paddle\.nn\.Sequential\(model\)"):
        ImperativePTQ().quantize(layer)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_activations_are_fingerprinted_as_their_float32_values(dtype: str) -> None:
    """Paddle 3.3.1 has no float16 gather on the CPU: a half-precision model failed inside
    calibration's fingerprint ("kernel `gather` is not registered") before its own layers
    could report what they lack."""
    from imperative_ptq.fingerprint import fingerprint

    values = paddle.linspace(-4.0, 4.0, 1000).reshape([10, 100])
    assert fingerprint(values.astype(dtype)) == fingerprint(values.astype(dtype).astype("float32"))
