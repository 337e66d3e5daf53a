"""Dynamic quantization: the dygraph layer against a numpy reference, the user's model left
alone, bad input, and both exports against the dygraph model."""

from __future__ import annotations

import json
import os

import numpy as np
import paddle
import pytest

from imperative_ptq import DynamicQuantizedLinear, DynamicQuantizedRNN, quantize_dynamic
from imperative_ptq.export import create_predictor, export_onnx, predict, save_quantized_model
from imperative_ptq.models import MnistSequenceEncoder
from models import mlp


def reference_dynamic_linear(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray, bits: int = 8
) -> np.ndarray:
    """Per-batch uint8 quantize -> integer matmul -> dequantize, one step at a time (ONNX
    ``DynamicQuantizeLinear`` + ``MatMulInteger``, PyTorch's dynamic Linear)."""
    levels = 2 ** (bits - 1) - 1
    w_scale = np.abs(weight).max(axis=0) / np.float32(levels)
    w_int = np.clip(np.rint(weight / w_scale), -levels, levels).astype(np.int64)
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = np.float32((np.float32(high) - np.float32(low)) / np.float32(255)) if high > low else np.float32(1)
    zero_point = int(np.clip(np.rint(np.float32(-low) / scale), 0, 255))
    codes = np.clip(np.rint(x / scale) + zero_point, 0, 255).astype(np.int64)
    accumulated = np.zeros(x.shape[:-1] + (weight.shape[1],), np.int64)
    for k in range(weight.shape[0]):  # slow and obvious: one input feature at a time
        accumulated += (codes[..., k, None] - zero_point) * w_int[k]
    return accumulated.astype(np.float32) * (scale * w_scale.astype(np.float32)) + bias


@pytest.mark.parametrize("shape", [(6, 37), (2, 5, 37)])
@pytest.mark.parametrize("bits", [8, 7])
def test_linear_equals_numpy_reference(shape, bits) -> None:
    paddle.seed(1)
    linear = paddle.nn.Linear(37, 11)
    quantized = quantize_dynamic(paddle.nn.Sequential(linear), weight_bits=bits)[0]
    rng = np.random.default_rng(0)
    weight, bias = linear.weight.numpy(), linear.bias.numpy()
    for x in (
        rng.normal(size=shape).astype(np.float32) * 3,
        rng.uniform(0.5, 2.0, size=shape).astype(np.float32),  # all positive: range from 0
        -rng.uniform(0.5, 2.0, size=shape).astype(np.float32),  # all negative
        np.zeros(shape, np.float32),  # empty range: scale 1
    ):
        got = quantized(paddle.to_tensor(x)).numpy()
        np.testing.assert_allclose(
            got, reference_dynamic_linear(x, weight, bias, bits), rtol=1e-6, atol=1e-6
        )
    levels = 2 ** (bits - 1) - 1
    integers = quantized.weight_integers.numpy()
    assert integers.dtype == np.int8 and np.abs(integers).max() == levels


def test_activation_rounding_is_half_to_even() -> None:
    """Codes on exact ties: 0.5 steps round to even, as DynamicQuantizeLinear does."""
    linear = paddle.nn.Linear(4, 1, bias_attr=False)
    linear.weight.set_value(np.ones([4, 1], np.float32))
    quantized = quantize_dynamic(paddle.nn.Sequential(linear))[0]
    # Range [0, 255]: scale 1, zero point 0; 2.5 -> 2, 3.5 -> 4, 0.5 -> 0 (ties away from
    # zero would give 3, 4, 1); the weight is 127 codes of 1/127.
    x = np.array([[2.5, 3.5, 0.5, 255.0]], np.float32)
    got = quantized(paddle.to_tensor(x)).numpy()
    np.testing.assert_allclose(got, [[2 + 4 + 0 + 255]], rtol=1e-6)


def test_users_model_is_untouched_and_skip_quant_respected() -> None:
    paddle.seed(2)
    model = mlp(8, 16, 4)
    model[2].skip_quant = True
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    quantized = quantize_dynamic(model)
    assert [type(layer).__name__ for layer in model] == ["Linear", "ReLU", "Linear"]
    assert {k: v.numpy().tolist() for k, v in model.state_dict().items()} == {
        k: v.tolist() for k, v in before.items()
    }
    assert isinstance(quantized[0], DynamicQuantizedLinear)
    assert isinstance(quantized[2], paddle.nn.Linear)
    same = quantize_dynamic(model, inplace=True)
    assert same is model and isinstance(model[0], DynamicQuantizedLinear)


def test_bad_input() -> None:
    convs = paddle.nn.Sequential(paddle.nn.Conv2D(1, 2, 3))
    with pytest.raises(ValueError, match="Sequential has no layer of the types"):
        quantize_dynamic(convs)
    with pytest.raises(ValueError, match="cannot quantize paddle.nn.layer.rnn.SimpleRNN"):
        quantize_dynamic(mlp(4, 4), layer_types=(paddle.nn.Linear, paddle.nn.SimpleRNN))
    projected = paddle.nn.Sequential(paddle.nn.Linear(4, 4), paddle.nn.LSTM(4, 8, proj_size=2))
    with pytest.raises(ValueError, match="layer '1'.*proj_size"):
        quantize_dynamic(projected, layer_types=(paddle.nn.Linear, paddle.nn.LSTM), inplace=True)
    assert type(projected[0]) is paddle.nn.Linear  # nothing replaced before the error
    with pytest.raises(ValueError, match="Conv2D"):
        quantize_dynamic(convs, layer_types=(paddle.nn.Conv2D,))
    with pytest.raises(TypeError, match="layer_types must hold"):
        quantize_dynamic(mlp(4, 4), layer_types=("Linear",))
    with pytest.raises(TypeError, match="model must be a paddle.nn.Layer"):
        quantize_dynamic(np.zeros(3))
    with pytest.raises(ValueError, match="weight_bits must be in 2..8"):
        quantize_dynamic(mlp(4, 4), weight_bits=16)
    with pytest.raises(TypeError, match="inplace must be a bool"):
        quantize_dynamic(mlp(4, 4), inplace=1)
    quantized = quantize_dynamic(mlp(4, 4))
    with pytest.raises(ValueError, match="already dynamically quantized"):
        quantize_dynamic(quantized)
    with pytest.raises(TypeError, match="paddle.to_tensor"):
        quantized(np.zeros([1, 4], np.float32))
    with pytest.raises(ValueError, match="quantize_dynamic first"):
        from imperative_ptq.export import save_dynamic_model

        save_dynamic_model(mlp(4, 4), "out/x", [paddle.static.InputSpec([None, 4], "float32")])


def _agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    top1 = float((a.argmax(-1) == b.argmax(-1)).mean())
    cosine = float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))
    return top1, cosine


@pytest.fixture(scope="module")
def transformer():
    paddle.seed(3)
    model = MnistSequenceEncoder(width=32, depth=1, heads=4)
    model.eval()
    return model, quantize_dynamic(model)


SPEC = [paddle.static.InputSpec([None, 1, 28, 28], "float32", "x")]


def test_onnx_runtime_runs_integer_kernels_and_agrees(transformer, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    _, quantized = transformer
    path = export_onnx(quantized, tmp_path / "dynamic.onnx", SPEC)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(4).random([32, 1, 28, 28]).astype(np.float32)
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with open(session.end_profiling()) as file:
        kernels = [
            event["args"]["op_name"] for event in json.load(file)
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
        ]
    integer = [k for k in kernels if k in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger")]
    # 8 Linear layers (embedding, q, k, v, attention output, 2 feed-forward, head), each an
    # integer matmul; the float MatMuls left are the 2 attention products.
    assert len(integer) == 8, kernels
    assert kernels.count("MatMul") + kernels.count("FusedMatMul") == 2, kernels
    expected = quantized(paddle.to_tensor(x)).numpy()
    top1, cosine = _agreement(got, expected)
    assert top1 == 1.0 and cosine > 0.9999


def test_onnx_single_linear_is_exact(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    paddle.seed(5)
    quantized = quantize_dynamic(paddle.nn.Sequential(paddle.nn.Linear(300, 40)))
    path = export_onnx(quantized, tmp_path / "linear", [paddle.static.InputSpec([None, 300], "float32")])
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(6).normal(size=[16, 300]).astype(np.float32)
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_array_equal(got, quantized(paddle.to_tensor(x)).numpy())


def test_paddle_weight_only_export(transformer, tmp_path) -> None:
    model, quantized = transformer
    save_quantized_model(quantized, tmp_path / "dynamic", SPEC)
    assert sorted(os.listdir(tmp_path)) == ["dynamic.pdiparams", "dynamic.pdmodel"]
    x = np.random.default_rng(7).random([32, 1, 28, 28]).astype(np.float32)
    got = predict(create_predictor(tmp_path / "dynamic", int8=False), x)[0]
    # Paddle Inference computes in fp32 with the int8 weights dequantized: the fp32 model
    # holding the dynamic model's weights, exactly.
    weight_only = MnistSequenceEncoder(width=32, depth=1, heads=4)
    weight_only.set_state_dict(model.state_dict())
    weight_only.eval()
    for (_, plain), (_, dynamic) in zip(
        [(n, l) for n, l in weight_only.named_sublayers() if isinstance(l, paddle.nn.Linear)],
        [(n, l) for n, l in quantized.named_sublayers() if isinstance(l, DynamicQuantizedLinear)],
    ):
        plain.weight.set_value(dynamic.dequantized_weight())
    np.testing.assert_allclose(got, weight_only(paddle.to_tensor(x)).numpy(), atol=1e-5)
    top1, cosine = _agreement(got, quantized(paddle.to_tensor(x)).numpy())
    assert top1 >= 0.95 and cosine > 0.999


def test_weight_only_files_are_4x_smaller(tmp_path) -> None:
    from imperative_ptq.export import save_fp32_model

    paddle.seed(8)
    model = mlp(256, 256, 256)
    model.eval()
    spec = [paddle.static.InputSpec([None, 256], "float32")]
    save_fp32_model(model, tmp_path / "fp32", spec)
    save_quantized_model(quantize_dynamic(model), tmp_path / "int8", spec)
    ratio = os.path.getsize(tmp_path / "fp32.pdiparams") / os.path.getsize(tmp_path / "int8.pdiparams")
    # Weights 4x smaller; biases and per-channel scales stay fp32 (2 x 256 + 2 x 256 floats).
    assert 3.8 < ratio < 4.0


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def test_lstm_and_gru_step_equal_numpy_reference() -> None:
    """One time step from given states: each product through the reference dynamic Linear,
    the gates as Paddle's LSTMCell / GRUCell."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=[3, 1, 5]).astype(np.float32)
    h0 = rng.normal(size=[1, 3, 6]).astype(np.float32)
    c0 = rng.normal(size=[1, 3, 6]).astype(np.float32)
    for rnn_type in (paddle.nn.LSTM, paddle.nn.GRU):
        paddle.seed(10)
        rnn = rnn_type(5, 6)
        quantized = quantize_dynamic(paddle.nn.Sequential(rnn), layer_types=(rnn_type,))[0]
        assert isinstance(quantized, DynamicQuantizedRNN)
        p = {name: value.numpy() for name, value in rnn.named_parameters()}
        x_gates = reference_dynamic_linear(x[:, 0], p["weight_ih_l0"].T, p["bias_ih_l0"])
        h_gates = reference_dynamic_linear(h0[0], p["weight_hh_l0"].T, p["bias_hh_l0"])
        if rnn_type is paddle.nn.LSTM:
            i, f, g, o = np.split(x_gates + h_gates, 4, axis=-1)
            c = _sigmoid(f) * c0[0] + _sigmoid(i) * np.tanh(g)
            h = _sigmoid(o) * np.tanh(c)
            out, (h_n, c_n) = quantized(paddle.to_tensor(x), (paddle.to_tensor(h0), paddle.to_tensor(c0)))
            np.testing.assert_allclose(c_n.numpy()[0], c, rtol=1e-5, atol=1e-5)
        else:
            x_r, x_z, x_c = np.split(x_gates, 3, axis=-1)
            h_r, h_z, h_c = np.split(h_gates, 3, axis=-1)
            r, z = _sigmoid(x_r + h_r), _sigmoid(x_z + h_z)
            candidate = np.tanh(x_c + r * h_c)
            h = (h0[0] - candidate) * z + candidate
            out, h_n = quantized(paddle.to_tensor(x), paddle.to_tensor(h0))
        np.testing.assert_allclose(out.numpy()[:, 0], h, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(h_n.numpy()[0], h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rnn_type", [paddle.nn.LSTM, paddle.nn.GRU])
@pytest.mark.parametrize("direction, layers, time_major", [("bidirect", 2, False), ("forward", 2, True)])
def test_rnn_sequences_follow_fp32(rnn_type, direction, layers, time_major) -> None:
    paddle.seed(11)
    rnn = rnn_type(12, 16, num_layers=layers, direction=direction, time_major=time_major)
    rnn.eval()
    quantized = quantize_dynamic(paddle.nn.Sequential(rnn), layer_types=(rnn_type,))[0]
    x = paddle.randn([7, 4, 12] if time_major else [4, 7, 12])
    expected, expected_states = rnn(x)
    got, got_states = quantized(x)
    assert got.shape == expected.shape
    for a, b in zip(paddle.utils.flatten(got_states), paddle.utils.flatten(expected_states)):
        assert a.shape == b.shape
    cosine = float((got * expected).sum() / got.norm() / expected.norm())
    assert cosine > 0.9999  # measured 0.999976-0.999998 over these configurations
    with pytest.raises(ValueError, match="sequence_length"):
        quantized(x, sequence_length=paddle.to_tensor([7, 7, 7, 7]))


def test_rnn_exports_refuse_clearly(tmp_path) -> None:
    model = quantize_dynamic(paddle.nn.Sequential(paddle.nn.GRU(4, 8)), layer_types=(paddle.nn.GRU,))
    spec = [paddle.static.InputSpec([None, 3, 4], "float32")]
    with pytest.raises(NotImplementedError, match="GRU layer '0' cannot be exported"):
        save_quantized_model(model, tmp_path / "gru", spec)
    with pytest.raises(NotImplementedError, match="GRU layer '0' cannot be exported"):
        export_onnx(model, tmp_path / "gru.onnx", spec)
    assert not os.listdir(tmp_path)


def test_onnx_opset_18_layer_norm_and_mean(transformer, tmp_path) -> None:
    """ReduceMean takes its axes as an input from opset 18: both forms give the same result."""
    ort = pytest.importorskip("onnxruntime")
    _, quantized = transformer
    x = np.random.default_rng(12).random([8, 1, 28, 28]).astype(np.float32)
    outputs = []
    for opset in (13, 18):
        path = export_onnx(quantized, tmp_path / f"opset{opset}.onnx", SPEC, opset=opset)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {session.get_inputs()[0].name: x})[0])
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
