"""Edge cases at the package's entry points: the command line, ``predict`` and the
quantized model's inputs, and calibration never running with dropout active."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import textwrap

import numpy as np
import paddle
import pytest

from imperative_ptq.cli import main

CWD_MODULE = textwrap.dedent(
    """
    from paddle import nn

    def build():
        return nn.Sequential(nn.Linear(4, 3))
    """
)


def _linear_data(folder, files: int = 2, shape=(2, 4)) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(files):
        np.save(folder / f"b{i}.npy", rng.standard_normal(shape).astype(np.float32))


# ----------------------------------------------------------------- 1. module from the cwd
def test_cli_imports_module_from_current_directory(tmp_path, monkeypatch, capsys) -> None:
    """The console script has its own folder, not the cwd, on sys.path: ``--model mod:fn``
    must still find ``mod.py`` in the cwd, as ``python -m imperative_ptq`` does."""
    module = "newcomer_cwd_model"
    (tmp_path / f"{module}.py").write_text(CWD_MODULE)
    _linear_data(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    # As the console script starts: neither '' nor the cwd on sys.path (restored afterwards).
    monkeypatch.setattr(
        sys, "path",
        [p for p in sys.path if p and os.path.abspath(p) != str(tmp_path)],
    )
    monkeypatch.delitem(sys.modules, module, raising=False)
    try:
        status = main(["--model", f"{module}:build", "--data", "data", "--output", "out/m",
                       "--no-export", "-q", "--algorithm", "abs_max"])
    finally:
        sys.modules.pop(module, None)
    assert status == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "m.calibration.json").exists()


# ---------------------------------------------------------- 2. single-sample .npy files
CONV_MODULE = textwrap.dedent(
    """
    import paddle
    from paddle import nn

    class Net(nn.Layer):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2D(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            pooled = nn.functional.adaptive_avg_pool2d(self.conv(x), 1)
            return self.fc(paddle.flatten(pooled, 1))

    class Mlp(nn.Layer):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)

    def build():
        return Net()

    def mlp():
        return Mlp()
    """
)


@pytest.fixture()
def models(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(CONV_MODULE)
    return str(path)


def _save_samples(folder, count: int, shape, dtype=np.float32) -> list[np.ndarray]:
    folder.mkdir()
    rng = np.random.default_rng(1)
    samples = [rng.standard_normal(shape).astype(dtype) for _ in range(count)]
    for i, sample in enumerate(samples):
        np.save(folder / f"s{i:02d}.npy", sample)
    return samples


def test_cli_stacks_single_sample_files_for_a_conv_model(tmp_path, models, capsys) -> None:
    """[3, 8, 8] files for a Conv2D model are samples: stacked --batch-size at a time (it was
    Paddle's "input's dimension is 3")."""
    samples = _save_samples(tmp_path / "data", 5, (3, 8, 8))
    status = main(["--model", models + ":build", "--data", str(tmp_path / "data"),
                   "--output", str(tmp_path / "out" / "m"), "--batch-size", "2",
                   "--algorithm", "abs_max", "-q"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "calibrated on 3 batches from 5 npy files" in captured.out
    layers = json.loads((tmp_path / "out" / "m.calibration.json").read_text())["layers"]
    assert layers["conv"]["input"][0] == pytest.approx(np.abs(np.stack(samples)).max(), rel=1e-6)
    assert (tmp_path / "out" / "m.pdmodel").exists()


def test_cli_input_shape_sets_the_batch_rank(tmp_path, models, capsys) -> None:
    """An MLP cannot tell samples from batches: [4] files are batches of 4 numbers unless
    --input-shape None,4 says a batch has rank 2; then they are stacked."""
    _save_samples(tmp_path / "data", 3, (4,))
    argv = ["--model", models + ":mlp", "--data", str(tmp_path / "data"),
            "--output", str(tmp_path / "out" / "m"), "--batch-size", "2", "--no-export", "-q",
            "--algorithm", "abs_max", "--input-shape", "None,4"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "calibrated on 2 batches from 3 npy files" in capsys.readouterr().out


def test_npy_batches_rank_rules(tmp_path) -> None:
    from imperative_ptq.cli import CliError, npy_batches

    np.save(tmp_path / "a0.npy", np.zeros((3, 4), np.float32))  # samples before the batch
    np.save(tmp_path / "a1.npy", np.ones((3, 4), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((5, 3, 4), np.float32))
    files = [str(tmp_path / name) for name in ("a0.npy", "a1.npy", "b.npy")]
    # The highest rank is the batch rank, wherever the batch file sits.
    assert [b.shape for b in npy_batches(files, 8)] == [(5, 3, 4), (2, 3, 4)]
    # Files of one rank: batches unless a batch rank says they are samples.
    assert [b.shape for b in npy_batches(files[:2], 8)] == [(3, 4), (3, 4)]
    assert [b.shape for b in npy_batches(files[:2], 8, batch_rank=3)] == [(2, 3, 4)]
    with pytest.raises(CliError, match=r"b.npy has shape \[5, 3, 4\].*--input-shape"):
        npy_batches(files, 8, batch_rank=2)
    np.save(tmp_path / "c.npy", np.zeros((3, 5), np.float32))
    with pytest.raises(CliError, match=r"share one shape.*\[3, 4\] and \[3, 5\]"):
        npy_batches(files + [str(tmp_path / "c.npy")], 8)
    np.save(tmp_path / "d.npy", np.zeros((1, 1, 3, 4), np.float32))
    with pytest.raises(CliError, match=r"a0.npy has shape \[3, 4\]: with batches of rank 4"):
        npy_batches(files + [str(tmp_path / "d.npy")], 8)


def test_cli_bad_npy_rank_is_one_line(tmp_path, models, capsys) -> None:
    _save_samples(tmp_path / "data", 2, (3, 8))
    status = main(["--model", models + ":build", "--data", str(tmp_path / "data"),
                   "--output", str(tmp_path / "out" / "m"), "-q",
                   "--input-shape", "None,3,8,8"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert "has shape [3, 8]" in err and "--input-shape" in err


# ---------------------------------------------------------------- 3. int64 token data
TOKEN_MODULE = textwrap.dedent(
    """
    from paddle import nn

    class Tok(nn.Layer):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 8)
            self.fc = nn.Linear(8, 3)

        def forward(self, ids):
            return self.fc(self.emb(ids).mean(axis=1))

    def build():
        return Tok()
    """
)


def _feed_dtypes(model_file: str) -> dict[str, str]:
    """The dtypes of a legacy program's feed variables (Paddle's names: FP32, INT64, ...)."""
    from paddle.base.proto import framework_pb2

    program = framework_pb2.ProgramDesc()
    with open(model_file, "rb") as file:
        program.ParseFromString(file.read())
    block = program.blocks[0]
    names = [name for op in block.ops if op.type == "feed" for slot in op.outputs
             for name in slot.arguments]
    types = {var.name: var.type.dense_tensor.tensor.data_type for var in block.vars}
    return {name: framework_pb2.VarType.Type.Name(types[name]) for name in names}


def test_cli_keeps_int64_token_ids_and_exports_an_int64_input(tmp_path, capsys) -> None:
    """int64 ids were cast to float32 (Embedding: NotImplementedError, traceback, exit 1)."""
    from imperative_ptq.export import create_predictor, predict

    (tmp_path / "tok.py").write_text(TOKEN_MODULE)
    (tmp_path / "data").mkdir()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 50, (4, 6)).astype(np.int64) for _ in range(3)]
    for i, batch in enumerate(batches):
        np.save(tmp_path / "data" / f"t{i}.npy", batch)
    prefix = tmp_path / "out" / "tok"
    status = main(["--model", str(tmp_path / "tok.py") + ":build", "--data",
                   str(tmp_path / "data"), "--output", str(prefix), "-q", "--algorithm", "abs_max"])
    assert status == 0, capsys.readouterr().err
    layers = json.loads((tmp_path / "out" / "tok.calibration.json").read_text())["layers"]
    assert layers["fc"]["input"] and layers["fc"]["weight"]
    assert _feed_dtypes(str(prefix) + ".pdmodel") == {"x": "INT64"}
    (logits,) = predict(create_predictor(str(prefix), int8=False), batches[0])
    assert logits.shape == (4, 3)


def test_cli_model_failure_on_the_data_is_one_line(tmp_path, capsys) -> None:
    """Float data for an Embedding: Paddle's NotImplementedError ends as exit 2, one line."""
    (tmp_path / "tok.py").write_text(TOKEN_MODULE)
    _linear_data(tmp_path / "data", shape=(4, 6))
    status = main(["--model", str(tmp_path / "tok.py") + ":build", "--data",
                   str(tmp_path / "data"), "--output", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("imperative-ptq: error: the model failed on the calibration data")
    assert "float32" in err and "NotImplementedError" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_npy_batches_keep_the_kind_of_data(tmp_path) -> None:
    from imperative_ptq.cli import CliError, npy_batches

    cases = {"i32": (np.int32, np.int64), "i64": (np.int64, np.int64),
             "u8": (np.uint8, np.float32), "f64": (np.float64, np.float32),
             "f16": (np.float16, np.float32), "b": (np.bool_, np.float32)}
    for name, (stored, fed) in cases.items():
        np.save(tmp_path / f"{name}.npy", np.ones((2, 3), stored))
        (batch,) = npy_batches([str(tmp_path / f"{name}.npy")], 4)
        assert batch.dtype == fed, name
    with pytest.raises(CliError, match="mix float32 and int64"):
        npy_batches([str(tmp_path / "i64.npy"), str(tmp_path / "f64.npy")], 4)


# ------------------------------------------------- 4. one writer of PREFIX.calibration.json
UNUSED_LAYER_MODULE = textwrap.dedent(
    """
    import paddle
    from paddle import nn

    class Net(nn.Layer):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2D(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 5)
            self.unused = nn.Linear(5, 2)  # hooked, never runs: an empty table entry

        def forward(self, x):
            pooled = nn.functional.adaptive_avg_pool2d(nn.functional.relu(self.conv(x)), 1)
            return self.fc(paddle.flatten(pooled, 1))

    def build():
        return Net()
    """
)


def test_cli_export_writes_the_calibration_table_once(tmp_path, monkeypatch, capsys) -> None:
    """With export, PREFIX.calibration.json has one writer and the content
    save_calibration_table writes (affine keys and empty entries included)."""
    import imperative_ptq.calibration_table as table_module
    import imperative_ptq.export.paddle_export as export_module
    import imperative_ptq.ptq as ptq_module

    (tmp_path / "net.py").write_text(UNUSED_LAYER_MODULE)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        np.save(data / f"b{i}.npy", rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    calls: list[str] = []
    original = table_module.write_table

    def counting(path, *args, **kwargs):
        calls.append(os.path.basename(os.fspath(path)))
        return original(path, *args, **kwargs)

    for module in (table_module, export_module, ptq_module):
        monkeypatch.setattr(module, "write_table", counting)
    common = ["--model", str(tmp_path / "net.py") + ":build", "--data", str(data), "-q",
              "--algorithm", "min_max", "--weights-scheme", "abs_max"]
    paddle.seed(7)  # the factory builds the same random weights for both runs
    assert main([*common, "--output", str(tmp_path / "exp" / "net")]) == 0, capsys.readouterr().err
    assert len(calls) == 1 and calls[0].endswith(".calibration.json")
    paddle.seed(7)
    assert main([*common, "--output", str(tmp_path / "tab" / "net"), "--no-export"]) == 0
    assert len(calls) == 2
    exported = json.loads((tmp_path / "exp" / "net.calibration.json").read_text())
    saved = json.loads((tmp_path / "tab" / "net.calibration.json").read_text())
    assert exported == saved
    assert exported["layers"]["unused"] == {}
    assert "input_zero_point" in exported["layers"]["conv"]


# ------------------------------------------------------------ 5. predict's input dtypes
@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A float32-input conv export (inputs calibrated >= 0, so its input is quantized) and an
    int64-input Embedding export."""
    from imperative_ptq import ImperativePTQ

    from imperative_ptq.cli import load_factory

    folder = tmp_path_factory.mktemp("exports")
    (folder / "conv_models.py").write_text(CONV_MODULE)  # tracing reads the source
    (folder / "tok_models.py").write_text(TOKEN_MODULE)
    namespace = {"build": load_factory(str(folder / "conv_models.py") + ":build"),
                 "tok": load_factory(str(folder / "tok_models.py") + ":build")}
    paddle.seed(5)
    rng = np.random.default_rng(5)
    images = np.abs(rng.standard_normal((4, 3, 8, 8))).astype(np.float32)
    ids = rng.integers(0, 50, (4, 6)).astype(np.int64)
    for name, model, batch, dtype in (("conv", namespace["build"](), images, "float32"),
                                      ("tok", namespace["tok"](), ids, "int64")):
        model.eval()
        ptq = ImperativePTQ()
        qmodel = ptq.quantize(model)
        ptq.calibrate(qmodel, [batch], progress=False)
        spec = paddle.static.InputSpec([None, *batch.shape[1:]], dtype, "x")
        ptq.save_quantized_model(qmodel, str(folder / name), input_spec=[spec])
    return folder, images, ids


def test_predict_converts_float64_and_lists_to_the_program_float32(exports) -> None:
    """float64 data gave Paddle's "Ref tensor type (float64) is not supported by oneDNN" (or
    "no kernels registered in the quantize operator")."""
    from imperative_ptq.export import create_predictor, predict

    folder, images, _ = exports
    predictor = create_predictor(str(folder / "conv"))
    (expected,) = predict(predictor, images)
    for value in (images.astype(np.float64), images.tolist()):
        np.testing.assert_array_equal(predict(predictor, value)[0], expected)
    np.testing.assert_allclose(predict(predictor, images.astype(np.float16))[0], expected,
                               atol=0.05)
    # Whole numbers are exact in float32: converted; 2**24 + 1 is not: refused.
    assert predict(predictor, np.ones((1, 3, 8, 8), np.int64))[0].shape == (1, 5)
    with pytest.raises(TypeError, match=r"input 0 \('x'\) is int64 but the program takes "
                                        r"float32: some values do not fit"):
        predict(predictor, np.full((1, 3, 8, 8), 2**24 + 1, np.int64))
    # A predictor whose program is unknown (a clone): float data still become float32.
    np.testing.assert_array_equal(predict(predictor.clone(), images.astype(np.float64))[0],
                                  expected)


def test_predict_keeps_int64_ids_and_refuses_float_data(exports) -> None:
    from imperative_ptq.export import create_predictor, predict

    folder, _, ids = exports
    predictor = create_predictor(str(folder / "tok"))
    (expected,) = predict(predictor, ids)
    np.testing.assert_array_equal(predict(predictor, ids.astype(np.int32))[0], expected)
    np.testing.assert_array_equal(predict(predictor, ids.tolist())[0], expected)
    with pytest.raises(TypeError, match=r"input 0 \('x'\) is float64 but the program takes "
                                        r"int64.*astype\(np.int64\)"):
        predict(predictor, ids.astype(np.float64))


@pytest.mark.parametrize("value, message", [
    (lambda images: paddle.to_tensor(images), r"must be a numpy array, got paddle.Tensor: "
                                              r"pass tensor.numpy\(\)"),
    (lambda images: "images.npy", "must be a numpy array, got str"),
    (lambda images: np.array(["a", "b"]), "holds <U1 data, not numbers"),
    (lambda images: [[1.0, 2.0], [3.0]], "cannot make an array of the list"),
    # The inputs as one list (numpy stacked it into a 5-d batch the conv refused).
    (lambda images: [images], r"one array per program input as separate arguments: "
                              r"predict\(predictor, \*arrays\), not a list of 1 arrays "
                              r"\(the program takes 1: \['x'\]\)"),
    (lambda images: (paddle.to_tensor(images),), "not a tuple of 1 arrays"),
])
def test_predict_refuses_non_arrays(exports, value, message) -> None:
    from imperative_ptq.export import create_predictor, predict

    folder, images, _ = exports
    with pytest.raises(TypeError, match=message):
        predict(create_predictor(str(folder / "conv")), value(images))


def test_predict_refuses_an_empty_batch(exports) -> None:
    """oneDNN failed on it with "could not create a primitive descriptor for a reorder
    primitive"; a kernel reading zero boxes crashed the process."""
    from imperative_ptq.export import create_predictor, predict

    folder, images, _ = exports
    predictor = create_predictor(str(folder / "conv"))
    with pytest.raises(ValueError, match=r"input 0 \('x'\) is empty \(shape \[0, 3, 8, 8\]\)"):
        predict(predictor, images[:0])
    assert predict(predictor, images[:1])[0].shape[0] == 1  # the predictor still runs


# ------------------------------------------------------- 6. numpy into a quantized model
def _mlp_with_dropout() -> paddle.nn.Layer:
    paddle.seed(11)
    return paddle.nn.Sequential(
        paddle.nn.Linear(8, 16), paddle.nn.ReLU(), paddle.nn.Dropout(0.5), paddle.nn.Linear(16, 4)
    )


def test_numpy_input_to_a_calibrating_or_converted_model_is_a_type_error() -> None:
    """It was Paddle's AttributeError "'numpy.ndarray' object has no attribute 'is_dist'"."""
    from imperative_ptq import ImperativePTQ
    from imperative_ptq.quant_layers import QuantizedLayer

    model = _mlp_with_dropout()
    model.eval()
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(model)
    data = np.abs(np.random.default_rng(0).standard_normal((4, 8))).astype(np.float32)
    with pytest.raises(TypeError, match=r"input 0 expects a paddle.Tensor, got numpy.ndarray: "
                                        r"wrap it with paddle.to_tensor"):
        qmodel(data)
    assert ptq.calibrate(qmodel, [data], progress=False) == 1  # calibrate converts arrays
    ptq.convert(qmodel)
    assert isinstance(qmodel[0], QuantizedLayer)  # inputs >= 0: quantized on x86
    with pytest.raises(TypeError, match=r"Linear \(quantized\) input 0 expects a paddle.Tensor, "
                                        r"got numpy.ndarray"):
        qmodel(data)
    assert qmodel(paddle.to_tensor(data)).shape == [4, 4]


# ----------------------------------------------------------- 7. no dropout in calibration
def test_calibration_never_runs_with_dropout_active() -> None:
    """quantize returns an eval-mode copy of a training model; a Dropout put back in training
    mode (qmodel.train(), no BatchNorm) is refused like a BatchNorm: it was calibrated through
    with dropout on."""
    from imperative_ptq import (
        AbsmaxQuantizer, CalibrationError, ImperativePTQ, PerChannelAbsmaxQuantizer, PTQConfig,
    )

    model = _mlp_with_dropout()
    model.train()
    ptq = ImperativePTQ(PTQConfig(AbsmaxQuantizer(), PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(model)
    assert model.training and not qmodel.training and not qmodel[2].training
    x = paddle.to_tensor(np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32))
    with paddle.no_grad():
        first, second = qmodel(x).numpy(), qmodel(x).numpy()
    np.testing.assert_array_equal(first, second)  # dropout off: deterministic
    table = ptq.calibration_table(qmodel)
    relu_out = paddle.nn.functional.relu(model[0](x))
    assert table["3"]["input"][0] == pytest.approx(float(relu_out.abs().max()), rel=1e-6)

    qmodel.train()
    with pytest.raises(CalibrationError, match=r"^2 \(Dropout\) is in training mode: .*dropped "
                                               r"activations.*model.eval\(\)"):
        qmodel(x)
    qmodel.eval()
    qmodel[2].train()  # the Dropout alone
    with pytest.raises(CalibrationError, match=r"^2 \(Dropout\) is in training mode"):
        qmodel(x)
    qmodel.eval()
    ptq.calibrate(qmodel, [x], progress=False)
    assert ptq.calibration_table(qmodel) == table  # the refused forwards observed nothing


def _paddle_hooked(model: paddle.nn.Layer) -> paddle.nn.Layer:
    import paddle.quantization as paddle_quantization

    return paddle_quantization.ImperativePTQ().quantize(model, inplace=True)


def _paddle_quant_aware(model: paddle.nn.Layer) -> paddle.nn.Layer:
    import paddle.quantization as paddle_quantization

    paddle_quantization.ImperativeQuantAware().quantize(model)  # in place
    return model


def _paddle_converted(model: paddle.nn.Layer) -> paddle.nn.Layer:
    from paddle.quantization import PTQ, QuantConfig
    from paddle.quantization.observers import AbsmaxObserver

    config = QuantConfig(activation=AbsmaxObserver(quant_bits=8), weight=AbsmaxObserver(quant_bits=8))
    observed = PTQ(config).quantize(model, inplace=False)
    observed(paddle.rand([2, 8]))
    return PTQ(config).convert(observed, inplace=False)


def _converted_backbone(model: paddle.nn.Layer) -> paddle.nn.Layer:
    from imperative_ptq import ImperativePTQ

    ptq = ImperativePTQ()
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, [paddle.rand([4, 8])], progress=False)
    ptq.convert(qmodel)
    return paddle.nn.Sequential(qmodel, paddle.nn.ReLU(), paddle.nn.Linear(4, 2))


def _calibrating_backbone(model: paddle.nn.Layer) -> paddle.nn.Layer:
    from imperative_ptq import ImperativePTQ

    return paddle.nn.Sequential(ImperativePTQ().quantize(model), paddle.nn.Linear(4, 2))


def _fine_tuning(model: paddle.nn.Layer) -> paddle.nn.Layer:
    from imperative_ptq import ImperativePTQ, ImperativeQAT

    ptq = ImperativePTQ()
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, [paddle.rand([4, 8])], progress=False)
    return ImperativeQAT(ptq).quantize(qmodel)


def _dynamic(model: paddle.nn.Layer) -> paddle.nn.Layer:
    from imperative_ptq import quantize_dynamic

    return paddle.nn.Sequential(quantize_dynamic(model), paddle.nn.Linear(4, 2))


@pytest.mark.parametrize("prepare, message", [
    (_paddle_hooked, r"sublayer '0' carries the calibration hooks of Paddle's own paddle.quantization.ImperativePTQ"),
    (_paddle_quant_aware, r"sublayer '0' is a paddle.nn.quant.quant_layers.\w+, a layer of Paddle's own quantization"),
    (_paddle_converted, r"sublayer '0' is a paddle.nn.quant.qat.linear.QuantedLinear, a layer of Paddle's own quantization"),
    (_converted_backbone, r"sublayer '0' \(Sequential\) was already quantized by imperative_ptq"),
    (_calibrating_backbone, r"sublayer '0' \(Sequential\) was already quantized by imperative_ptq"),
    (_fine_tuning, r"sublayer '0' \(FakeQuantLayer\) was already quantized by imperative_ptq"),
    (_dynamic, r"sublayer '0.0' \(DynamicQuantizedLinear\) was already quantized by imperative_ptq"),
])
def test_a_model_with_layers_quantized_already_is_refused(prepare, message) -> None:
    """A user switching from Paddle's quantization APIs (whose ImperativePTQ converts the
    model in place before its export fails on Paddle 3.x), or quantizing a model that holds a
    quantized one: those layers were quantized a second time, and the export computed
    something else (0.9 / 0.6 of the largest output off the simulation for Paddle-quantized
    models, 3.9e-2 for a converted backbone under a new head)."""
    from imperative_ptq import ImperativePTQ, quantize_dynamic

    paddle.seed(0)
    model = prepare(_mlp_with_dropout().eval())
    with pytest.raises(ValueError, match=message):
        ImperativePTQ().quantize(model)
    if prepare is _dynamic:
        message = "is already dynamically quantized"
    with pytest.raises(ValueError, match=message):
        quantize_dynamic(model)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_a_single_array_given_as_calibration_data_is_a_type_error(as_tensor) -> None:
    """Its rows ran as 32 rank-1 batches, and an export without input_spec took a rank-1
    input from them."""
    from imperative_ptq import CalibrationError, ImperativePTQ

    data = np.random.default_rng(0).random((32, 8)).astype(np.float32)
    data = paddle.to_tensor(data) if as_tensor else data
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(_mlp_with_dropout())
    kind = "paddle.Tensor" if as_tensor else "numpy.ndarray"
    with pytest.raises(TypeError, match=rf"data is a single {kind} of shape \[32, 8\], not an "
                                        r"iterable of batches: pass \[data\]"):
        ptq.calibrate(qmodel, data, progress=False)
    with pytest.raises(CalibrationError, match="no calibration data"):
        ptq.calibration_table(qmodel)  # nothing observed
    assert ptq.calibrate(qmodel, [data], progress=False) == 1


@pytest.mark.parametrize("fill", [0.0, np.nan, np.inf])
def test_calibration_that_saw_only_zeros_or_non_finite_values_is_named_at_convert(fill, caplog) -> None:
    """A loader returning zeros (or NaN) gave every layer the floor threshold, 1e-31, and a
    converted model mapping every real input to about 0, without a word."""
    import logging

    from imperative_ptq import AbsmaxQuantizer, ImperativePTQ, PerChannelAbsmaxQuantizer, PTQConfig

    paddle.seed(0)
    model = paddle.nn.Sequential(paddle.nn.Linear(8, 16, bias_attr=False), paddle.nn.ReLU(), paddle.nn.Linear(16, 4))
    ptq = ImperativePTQ(PTQConfig(AbsmaxQuantizer(), PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, [np.full((4, 8), fill, np.float32)] * 2, progress=False)
    with caplog.at_level(logging.WARNING, logger="imperative_ptq.ptq"):
        ptq.convert(qmodel)
    assert re.search(r"3 layers saw only zeros \(or only NaN/Inf\) in calibration: .*: 0, 1, 2$", caplog.text, re.M), caplog.text


def test_real_calibration_data_is_not_named_at_convert(caplog) -> None:
    import logging

    from imperative_ptq import ImperativePTQ

    ptq = ImperativePTQ()
    qmodel = ptq.quantize(_mlp_with_dropout())
    ptq.calibrate(qmodel, [np.random.default_rng(0).random((4, 8), dtype=np.float32)], progress=False)
    with caplog.at_level(logging.WARNING, logger="imperative_ptq.ptq"):
        ptq.convert(qmodel)
    assert "saw only zeros" not in caplog.text


def test_a_repeated_batch_holding_a_nan_is_not_taken_for_a_constant(caplog) -> None:
    """The fingerprint of the model's input was NaN, which differs from itself: the input
    looked changing while the last Linear's input stayed the same, and that Linear was kept
    fp32 as reading a constant (numpy warning "invalid value encountered in dot")."""
    import logging
    import warnings

    from imperative_ptq import ImperativePTQ, QuantizedLayer

    x = np.random.default_rng(0).random((4, 8), dtype=np.float32)
    x[0, 0] = np.nan
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(_mlp_with_dropout())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ptq.calibrate(qmodel, [x] * 3, progress=False)
    with caplog.at_level(logging.WARNING):
        ptq.convert(qmodel)
    assert "stayed the same" not in caplog.text
    assert isinstance(qmodel[3], QuantizedLayer) and qmodel[3].constant_inputs == []


class _FunctionalDropoutNet(paddle.nn.Layer):
    """``F.dropout(h, 0.5)``: ``training`` defaults to True, so it drops in eval mode too."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = paddle.nn.Linear(8, 16)
        self.fc2 = paddle.nn.Linear(16, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = paddle.nn.functional.relu(self.fc1(x))
        return self.fc2(paddle.nn.functional.dropout(h, 0.5))


def test_a_functional_dropout_left_in_training_mode_is_named_at_export(tmp_path, caplog) -> None:
    """Nothing refuses it in dygraph (no layer is in training mode), but the runtimes run it
    as the identity while the model it was calibrated as drops at random: both exports say
    so, naming the dropped tensor."""
    import logging

    from imperative_ptq import ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig
    from imperative_ptq.export import export_onnx, save_quantized_model

    paddle.seed(0)
    model = _FunctionalDropoutNet()
    model.eval()
    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, [paddle.rand([8, 8]) for _ in range(2)], progress=False)
    spec = [paddle.static.InputSpec([None, 8], "float32")]
    expected = (
        r"_FunctionalDropoutNet: 1 F.dropout call\(s\) run in training mode although the model "
        r"is in eval mode .*training=self.training.*called at .*test_newcomer_edges.py:\d+ \(forward\)$"
    )
    # (ImperativePTQ.save_quantized_model of a calibrating model checks the spec before it
    # converts, and the export again: named once.)
    for export in (ptq.save_quantized_model, save_quantized_model, export_onnx):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="imperative_ptq.export.spec_check"):
            export(qmodel, str(tmp_path / export.__name__ / "model"), spec)
        warned = [r.getMessage() for r in caplog.records if "F.dropout call" in r.getMessage()]
        assert len(warned) == 1 and re.search(expected, warned[0]), warned


def test_an_eval_mode_dropout_is_not_named_at_export(tmp_path, caplog) -> None:
    import logging

    from imperative_ptq import AbsmaxQuantizer, ImperativePTQ, PerChannelAbsmaxQuantizer, PTQConfig
    from imperative_ptq.export import save_quantized_model

    model = _mlp_with_dropout()
    ptq = ImperativePTQ(PTQConfig(AbsmaxQuantizer(), PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, [paddle.rand([4, 8])], progress=False)
    ptq.convert(qmodel)
    # (Paddle's own, or imperative_ptq.probabilities' pass-through since quantize)
    installed = paddle.nn.functional.dropout
    with caplog.at_level(logging.WARNING, logger="imperative_ptq.export.spec_check"):
        save_quantized_model(qmodel, str(tmp_path / "model"), [paddle.static.InputSpec([None, 8], "float32")])
    assert "F.dropout call" not in caplog.text
    assert paddle.nn.functional.dropout is installed  # put back


# ---------------------------------------------------- 8. a forward decorated with to_static
class _StaticForwardNet(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.Linear(8, 5)

    @paddle.jit.to_static
    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc(paddle.nn.functional.relu(self.conv(x)).mean([2, 3]))


def test_a_to_static_forward_exports_the_input_spec_program(tmp_path) -> None:
    """The export's batch-1 spec check compiled the decorated forward, and paddle.jit.save
    wrote that program: input '_jst.0.x.0', batch 1 (Paddle Inference refused a batch of 4,
    ONNX Runtime could not be fed 'x')."""
    from paddle.jit.dy2static.program_translator import StaticFunction

    from imperative_ptq import ImperativePTQ
    from imperative_ptq.export import create_predictor, export_onnx, predict
    from ties import relative_error

    paddle.seed(2)
    model = _StaticForwardNet()
    model.eval()
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(model)
    assert isinstance(model.forward, StaticFunction)  # the user's model keeps its decorator
    rng = np.random.default_rng(2)
    ptq.calibrate(qmodel, [rng.standard_normal((4, 3, 8, 8)).astype(np.float32) for _ in range(3)],
                  progress=False)
    ptq.convert(qmodel)
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    spec = [paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")]
    prefix = str(tmp_path / "static")
    ptq.save_quantized_model(qmodel, prefix, input_spec=spec)
    predictor = create_predictor(prefix, num_threads=1)
    assert predictor.get_input_names() == ["x"]
    assert relative_error(predict(predictor, x)[0], simulated) < 2e-6
    onnxruntime = pytest.importorskip("onnxruntime")
    export_onnx(qmodel, prefix + ".onnx", spec)
    session = onnxruntime.InferenceSession(prefix + ".onnx", providers=["CPUExecutionProvider"])
    assert relative_error(session.run(None, {"x": x})[0], simulated) < 2e-6


# ------------------------------------------------- 9. a user's forward-pre hook on a layer
def test_a_user_forward_pre_hook_runs_before_the_input_is_quantized(tmp_path) -> None:
    """Calibration saw the input the hook made (halved); after convert the hook ran after
    the quantization of the full input, which the halved threshold clipped: the simulation
    was 0.16 of the largest output off the fp32 model, 0.11 off Paddle Inference."""
    from imperative_ptq import ImperativePTQ, QuantizedLayer
    from imperative_ptq.export import create_predictor, predict
    from ties import relative_error

    paddle.seed(6)
    model = paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.ReLU(), paddle.nn.Conv2D(8, 8, 3, padding=1)
    )
    model[2].register_forward_pre_hook(lambda layer, inputs: (inputs[0] * 0.5,))
    model[2].register_forward_pre_hook(
        lambda layer, inputs, kwargs: ((inputs[0] + 0.25,), kwargs), with_kwargs=True
    )
    model.eval()
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(model)
    rng = np.random.default_rng(6)
    ptq.calibrate(qmodel, [rng.random((4, 3, 8, 8)).astype(np.float32) for _ in range(3)], progress=False)
    ptq.convert(qmodel)
    assert isinstance(qmodel[2], QuantizedLayer)
    x = rng.random((4, 3, 8, 8)).astype(np.float32)
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    assert relative_error(simulated, model(paddle.to_tensor(x)).numpy()) < 0.08  # 0.16 before
    prefix = str(tmp_path / "hooked")
    ptq.save_quantized_model(qmodel, prefix, input_spec=[paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")])
    assert relative_error(predict(create_predictor(prefix, num_threads=1), x)[0], simulated) < 2e-6


# ------------------------------------------ 10. one forward argument that is a dict or a list
class _DictInputs(paddle.nn.Layer):
    """A multi-input model taking one dict, as recommenders and multi-modal models do."""

    def __init__(self) -> None:
        super().__init__()
        self.fa, self.fb = paddle.nn.Linear(8, 8), paddle.nn.Linear(8, 8)

    def forward(self, inputs):
        return self.fa(inputs["a"]) + self.fb(inputs["b"])


class _ListInputs(_DictInputs):
    def forward(self, xs):
        return self.fa(xs[0]) + self.fb(xs[1])


@pytest.mark.parametrize("model_type", [_DictInputs, _ListInputs])
def test_a_structured_input_calibrates_as_called_by_hand(model_type, caplog) -> None:
    """A 1-tuple batch holding the structure crashed in calibrate (a dict: Paddle's
    "incompatible array data type"; a list of differently shaped tensors: numpy's
    "inhomogeneous shape"); a bare list batch for a list argument silently calibrated on its
    first tensor alone (fb's input threshold 1.9 where its input reaches 22.6): it now warns."""
    from imperative_ptq import AbsmaxQuantizer, ImperativePTQ, PerChannelAbsmaxQuantizer, PTQConfig

    paddle.seed(0)
    rng = np.random.default_rng(0)
    xa, xb = rng.standard_normal((4, 8)).astype(np.float32), 10 * rng.standard_normal((4, 8)).astype(np.float32)
    structure = {"a": xa, "b": xb} if model_type is _DictInputs else [xa, xb]
    model = model_type()
    model.eval()
    ptq = ImperativePTQ(PTQConfig(AbsmaxQuantizer(), PerChannelAbsmaxQuantizer()))
    by_hand = ptq.quantize(model)
    if isinstance(structure, dict):
        by_hand({key: paddle.to_tensor(value) for key, value in structure.items()})
    else:
        by_hand([paddle.to_tensor(value) for value in structure])
    calibrated = ptq.quantize(model)
    assert ptq.calibrate(calibrated, [(structure,)], progress=False) == 1
    assert ptq.calibration_table(calibrated) == ptq.calibration_table(by_hand)
    assert ptq.calibration_table(calibrated)["fb"]["input"] == [float(np.abs(xb).max())]
    if model_type is _ListInputs:
        with caplog.at_level("WARNING", logger="imperative_ptq"):
            ptq.calibrate(ptq.quantize(model), [[xa, xb]], progress=False)
        assert "give each batch as a 1-tuple: ([x1, x2],)" in caplog.text


def _small_cnn() -> paddle.nn.Layer:
    nn = paddle.nn
    model = nn.Sequential(nn.Conv2D(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 4))
    model.eval()
    return model


def test_calibrate_reads_float64_tensors_and_nested_lists_as_float32() -> None:
    """A float64 DataLoader batch and a batch written as ``x.tolist()`` calibrate as the same
    float64 array does (before: Paddle's dtype error; ``'list' object has no attribute
    'is_dist'``)."""
    from imperative_ptq import ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig

    x = np.random.default_rng(0).random((4, 3, 8, 8))
    tables = []
    for batch in (x, paddle.to_tensor(x), x.tolist()):
        paddle.seed(0)
        ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer()))
        qmodel = ptq.quantize(_small_cnn())
        assert ptq.calibrate(qmodel, [batch], progress=False) == 1
        tables.append(ptq.calibration_table(qmodel))
    assert tables[1] == tables[0] and tables[2] == tables[0]


def test_an_empty_calibration_batch_is_refused() -> None:
    """A zero-size batch calibrated nothing, yet counted: convert then mapped every input to 0."""
    from imperative_ptq import ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig

    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(_small_cnn())
    with pytest.raises(ValueError, match=r"empty batch \(input shapes \[\[0, 3, 8, 8\]\]\)"):
        qmodel(paddle.rand([0, 3, 8, 8]))
    qmodel(paddle.rand([2, 3, 8, 8]))  # still calibrating
    ptq.convert(qmodel)


def test_an_export_prefix_with_the_files_suffix_is_refused(tmp_path) -> None:
    """``out/m.pdmodel`` silently wrote ``out/m.pdmodel.pdmodel``."""
    from imperative_ptq import ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig

    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(_small_cnn())
    qmodel(paddle.rand([2, 3, 8, 8]))
    spec = [paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")]
    with pytest.raises(ValueError, match=r"pass '.*m'"):
        ptq.save_quantized_model(qmodel, str(tmp_path / "m.pdmodel"), input_spec=spec)
    assert not os.listdir(tmp_path)
    ptq.save_quantized_model(qmodel, str(tmp_path / "m"), input_spec=spec)  # still calibrating before
    assert sorted(os.listdir(tmp_path)) == ["m.calibration.json", "m.pdiparams", "m.pdmodel"]


def test_predict_names_an_input_of_another_shape_than_traced(tmp_path) -> None:
    from imperative_ptq import ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig
    from imperative_ptq.export import create_predictor, predict

    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(_small_cnn())
    qmodel(paddle.rand([2, 3, 8, 8]))
    prefix = str(tmp_path / "m")
    ptq.save_quantized_model(qmodel, prefix, input_spec=[paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")])
    predictor = create_predictor(prefix)
    with pytest.raises(ValueError, match=r"has shape \[2, 3, 16, 16\], the program was traced for \[None, 3, 8, 8\]"):
        predict(predictor, np.zeros((2, 3, 16, 16), np.float32))
    assert predict(predictor, np.zeros((2, 3, 8, 8), np.float32))[0].shape == (2, 4)


class _InPlace(paddle.nn.Layer):
    """``c(relu(b(y) + y))`` with the add, the ReLU or a write done in place (``how``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        nn = paddle.nn
        self.a, self.b, self.c = nn.Conv2D(3, 8, 3, padding=1), nn.Conv2D(8, 8, 3, padding=1), nn.Conv2D(8, 4, 1)
        self.how = how

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        F = paddle.nn.functional
        y = F.relu(self.a(x))
        z = self.b(y)
        if self.how == "add_":
            z.add_(y)
            F.relu_(z)
            return self.c(z)
        if self.how == "assign":
            paddle.assign(F.relu(z + y), output=z)
            return self.c(z)
        if self.how == "setitem":
            z[:, :2] = 0
        return self.c(F.relu(z + y))


@pytest.mark.parametrize("how", ["add_", "assign", "setitem", "out_of_place"])
def test_calibration_warns_of_an_output_changed_in_place(how, caplog) -> None:
    """Calibration sees layers, not the in-place op between them: the exports then computed
    something else than the simulation, silently (Paddle Inference 0.63 / 0.010 / 0.19 of the
    largest output off; the same model out of place: exact). It is named now."""
    from imperative_ptq import ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig

    paddle.seed(0)
    model = _InPlace(how)
    model.eval()
    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(model)
    with caplog.at_level("WARNING", logger="imperative_ptq.session"):
        for _ in range(2):
            qmodel(paddle.rand([2, 3, 8, 8]))
    warnings = [record.message for record in caplog.records if "in-place op" in record.message]
    if how == "out_of_place":
        assert not warnings
    else:
        assert len(warnings) == 1 and "'c' reads the output of 'b'" in warnings[0]


class _UnregisteredWeights(paddle.nn.Layer):
    """Layers whose weights no registered layer type quantizes (``nn.Bilinear``,
    ``DeformConv2D``) beside ones that are fp32 by design (an embedding, a GRU, which their
    own warning names) and an int8 Linear."""

    def __init__(self) -> None:
        super().__init__()
        from paddle.vision.ops import DeformConv2D

        self.embedding = paddle.nn.Embedding(10, 4)
        self.gru = paddle.nn.GRU(4, 4)
        self.offsets = paddle.nn.Conv2D(1, 18, 3, padding=1)
        self.deform = DeformConv2D(1, 2, 3, padding=1)
        self.bilinear = paddle.nn.Bilinear(4, 4, 3)
        self.head = paddle.nn.Linear(3 + 2, 2)

    def forward(self, tokens: paddle.Tensor, image: paddle.Tensor) -> paddle.Tensor:
        sequence = self.gru(self.embedding(tokens))[0].mean(1)
        features = self.deform(image, self.offsets(image)).mean([2, 3])
        return self.head(paddle.concat([self.bilinear(sequence, sequence), features], 1))


def test_layers_holding_weights_no_registered_type_quantizes_are_named_at_convert(caplog) -> None:
    """Before, nn.Bilinear and DeformConv2D stayed fp32 without a word: not calibrated, not in
    the calibration table, not in any warning, while Conv3D or GRU layers were named."""
    import imperative_ptq as ip

    paddle.seed(0)
    model = _UnregisteredWeights()
    ptq = ip.ImperativePTQ()
    qmodel = ptq.quantize(model)
    rng = np.random.default_rng(0)
    for _ in range(2):
        qmodel(paddle.to_tensor(rng.integers(0, 10, [2, 5])), paddle.to_tensor(rng.random([2, 1, 6, 6], np.float32)))
    with caplog.at_level(logging.WARNING, logger="imperative_ptq.convert"):
        ptq.convert(qmodel)
    named = [record.getMessage() for record in caplog.records if "hold a weight" in record.getMessage()]
    assert len(named) == 1 and named[0].startswith("2 layers"), named
    assert "deform (DeformConv2D)" in named[0] and "bilinear (Bilinear)" in named[0]
    assert "embedding" not in named[0] and "gru" not in named[0]
    assert isinstance(qmodel.head, ip.QuantizedLayer)


def test_export_names_weights_of_ops_without_an_int8_kernel(tmp_path, caplog) -> None:
    """The export's read-back of what Paddle Inference runs names them too, by their paths."""
    import imperative_ptq as ip

    paddle.seed(0)
    ptq = ip.ImperativePTQ()
    qmodel = ptq.quantize(_UnregisteredWeights())
    rng = np.random.default_rng(0)
    for _ in range(2):
        qmodel(paddle.to_tensor(rng.integers(0, 10, [2, 5])), paddle.to_tensor(rng.random([2, 1, 6, 6], np.float32)))
    ptq.convert(qmodel)
    spec = [paddle.static.InputSpec([None, 5], "int64", "tokens"), paddle.static.InputSpec([None, 1, 6, 6], "float32", "image")]
    with caplog.at_level(logging.WARNING, logger="imperative_ptq.export"):
        ptq.save_quantized_model(qmodel, str(tmp_path / "m"), spec)
    warned = [record.getMessage() for record in caplog.records if "without an int8 kernel" in record.getMessage()]
    assert len(warned) == 1 and warned[0].endswith(": bilinear.weight, deform.weight"), warned


def test_fuse_list_without_fuse_is_named_as_ignored(caplog) -> None:
    """Paddle's PTQ ignores fuse_list without fuse=True, and so does this drop-in; it says so
    (before: silently, the BatchNorm left unfolded)."""
    import imperative_ptq as ip

    model = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4))
    with caplog.at_level(logging.WARNING, logger="imperative_ptq.ptq"):
        qmodel = ip.ImperativePTQ().quantize(model, fuse_list=[["0", "1"]])
    assert "fuse_list is ignored without fuse=True" in caplog.text
    assert isinstance(qmodel[1], paddle.nn.BatchNorm2D)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imperative_ptq.ptq"):
        ip.ImperativePTQ().quantize(model, fuse=True, fuse_list=[["0", "1"]])
    assert "fuse_list is ignored" not in caplog.text


def test_save_fp32_model_refuses_a_quantized_model(tmp_path) -> None:
    """A converted (or calibrating) model given to save_fp32_model was written, and Paddle
    Inference then failed on it ("could not reshape a memory descriptor")."""
    import imperative_ptq as ip
    from imperative_ptq.export import save_fp32_model

    model = paddle.nn.Sequential(paddle.nn.Conv2D(1, 4, 3), paddle.nn.ReLU(), paddle.nn.Flatten(), paddle.nn.Linear(4 * 36, 3))
    ptq = ip.ImperativePTQ()
    qmodel = ptq.quantize(model)
    qmodel(paddle.rand([2, 1, 8, 8]))
    spec = [paddle.static.InputSpec([None, 1, 8, 8], "float32", "x")]
    with pytest.raises(TypeError, match="save_fp32_model takes the fp32 model.*save_quantized_model"):
        save_fp32_model(qmodel, tmp_path / "calibrating", spec)
    ptq.convert(qmodel)
    with pytest.raises(TypeError, match="save_fp32_model takes the fp32 model"):
        save_fp32_model(qmodel, tmp_path / "converted", spec)
    assert not list(tmp_path.iterdir())
    save_fp32_model(model, tmp_path / "fp32", spec)  # the model given to quantize
