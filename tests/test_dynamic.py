"""Dynamic quantization: the dygraph layer against a numpy reference, the user's model left
alone, bad input, and both exports against the dygraph model."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import paddle
import pytest

from imperative_ptq import DynamicQuantizedLinear, DynamicQuantizedRNN, quantize_dynamic
from imperative_ptq.dynamic import dynamic_layers
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
    with pytest.raises(ValueError, match="MultiHeadAttention.*projections included, are quantized by listing"):
        quantize_dynamic(mlp(4, 4), layer_types=(paddle.nn.MultiHeadAttention,))
    with pytest.raises(ValueError, match="Conv2D.*convolutions are better served by ImperativePTQ"):
        quantize_dynamic(mlp(4, 4), layer_types=(paddle.nn.Conv2D,))
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


class _RecurrentClassifier(paddle.nn.Layer):
    """An LSTM/GRU over a sequence and a Linear head on its last step."""

    def __init__(self, cell: str, layers: int = 1, direction: str = "forward",
                 time_major: bool = False, hidden: int = 32) -> None:
        super().__init__()
        self.time_major = time_major
        self.rnn = getattr(paddle.nn, cell)(
            12, hidden, num_layers=layers, direction=direction, time_major=time_major
        )
        self.head = paddle.nn.Linear(hidden * (2 if direction == "bidirect" else 1), 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[-1] if self.time_major else out[:, -1])


RNN_CONFIGS = [(1, "forward", False), (2, "bidirect", True)]


def _recurrent(
    cell: str, layers: int, direction: str, time_major: bool, head: bool = True, seed: int = 13
):
    """(fp32 model, dynamic model (the RNN, and the head if ``head``), the fp32 model
    holding the dynamic model's weights, input_spec, an input batch)."""
    paddle.seed(seed)
    model = _RecurrentClassifier(cell, layers, direction, time_major)
    model.eval()
    rnn_type = getattr(paddle.nn, cell)
    dynamic = quantize_dynamic(
        model, layer_types=(rnn_type, paddle.nn.Linear) if head else (rnn_type,)
    )
    weight_only = copy.deepcopy(model)
    weight_only.rnn = dynamic.rnn.dequantized_rnn()
    if head:
        weight_only.head.weight.set_value(dynamic.head.dequantized_weight())
    shape = [9, None, 12] if time_major else [None, 9, 12]
    x = np.random.default_rng(seed).standard_normal([9, 16, 12] if time_major else [16, 9, 12])
    return model, dynamic, weight_only, [paddle.static.InputSpec(shape, "float32", "x")], x.astype(np.float32)


def _profiled_run(path: str, x: np.ndarray, directory) -> tuple[np.ndarray, list[str]]:
    """ONNX Runtime's output and the kernels it ran (from its profile)."""
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(directory / "profile")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with open(session.end_profiling()) as file:
        kernels = [
            event["args"]["op_name"] for event in json.load(file)
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
        ]
    return got, kernels


@pytest.mark.parametrize("layers, direction, time_major", RNN_CONFIGS)
def test_onnx_dynamic_lstm_runs_dynamic_quantize_lstm(layers, direction, time_major, tmp_path) -> None:
    model, dynamic, _, spec, x = _recurrent("LSTM", layers, direction, time_major)
    path = export_onnx(dynamic, tmp_path / "lstm.onnx", spec)
    got, kernels = _profiled_run(path, x, tmp_path)
    # One integer LSTM per layer (both directions in one), no float LSTM; the head's integer
    # matmul.
    assert kernels.count("DynamicQuantizeLSTM") == layers and "LSTM" not in kernels, kernels
    assert kernels.count("DynamicQuantizeMatMul") == 1, kernels
    expected = dynamic(paddle.to_tensor(x)).numpy()
    fp32 = model(paddle.to_tensor(x)).numpy()
    top1, cosine = _agreement(got, expected)
    # ONNX Runtime quantizes each layer's input once for the whole sequence, the dygraph
    # model step by step (see the reference test below), so they differ by about the
    # quantization error itself. Measured over 3 seeds x both configurations: cosine
    # 0.99986-0.99998, top-1 100% (97% with a 64-wide LSTM), and ONNX Runtime's distance to
    # fp32 (1 - cosine) 1.1-1.5x the dygraph model's.
    assert cosine > 0.9998 and top1 >= 0.9
    assert 1 - _agreement(got, fp32)[1] < 2 * (1 - _agreement(expected, fp32)[1])


def test_onnx_dynamic_lstm_equals_reference_with_sequence_wide_input_range(tmp_path) -> None:
    """ONNX Runtime's DynamicQuantizeLSTM quantizes the input with one range over the whole
    sequence, the hidden state per step: a numpy reference of that."""
    ort = pytest.importorskip("onnxruntime")

    class Encoder(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = paddle.nn.LSTM(12, 32)

        def forward(self, x: paddle.Tensor) -> paddle.Tensor:
            return self.rnn(x)[0]

    paddle.seed(14)
    model = Encoder()
    model.eval()
    dynamic = quantize_dynamic(model, layer_types=(paddle.nn.LSTM,))
    path = export_onnx(dynamic, tmp_path / "lstm.onnx", [paddle.static.InputSpec([None, 9, 12], "float32")])
    x = np.random.default_rng(14).standard_normal([5, 9, 12]).astype(np.float32)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    p = {name: value.numpy() for name, value in model.rnn.named_parameters()}
    steps = x.transpose(1, 0, 2)  # [T, B, F]
    x_gates = reference_dynamic_linear(
        steps.reshape(-1, 12), p["weight_ih_l0"].T, p["bias_ih_l0"]
    ).reshape(9, 5, -1)
    h = c = np.zeros([5, 32], np.float32)
    outputs = []
    for t in range(9):
        gates = x_gates[t] + reference_dynamic_linear(h, p["weight_hh_l0"].T, p["bias_hh_l0"])
        i, f, g, o = np.split(gates, 4, axis=-1)
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        outputs.append(h)
    # Measured 4.1e-4..6.2e-4 over 4 seeds (a hidden-state code flipped by float rounding
    # now and then); the dygraph model, quantizing every step's input apart, is 3.3e-3..4.2e-3
    # away.
    np.testing.assert_allclose(got, np.stack(outputs, axis=1), atol=2e-3)


@pytest.mark.parametrize("layers, direction, time_major", RNN_CONFIGS)
def test_onnx_dynamic_gru_stores_int8_and_computes_fp32(layers, direction, time_major, tmp_path) -> None:
    """ONNX Runtime has no integer GRU: int8 weights in the file, float weights (folded when
    the session is created) in an ONNX GRU."""
    onnx = pytest.importorskip("onnx")
    model, dynamic, weight_only, spec, x = _recurrent("GRU", layers, direction, time_major, head=False)
    path = export_onnx(dynamic, tmp_path / "gru.onnx", spec)
    got, kernels = _profiled_run(path, x, tmp_path)
    assert kernels.count("GRU") == layers, kernels
    assert "Cast" not in kernels and "Mul" not in kernels, kernels  # weights built once
    # Every recurrent weight is stored as int8, nothing else.
    stored = [t for t in onnx.load(path).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert sum(int(np.prod(t.dims)) for t in stored) == sum(
        product.weight_integers.size for product in dynamic.rnn.rnn_weights().values()
    )
    # fp32 compute with the weights the int8 codes stand for (measured max difference
    # 0.9e-7..1.8e-7 over 3 seeds x both configurations).
    np.testing.assert_allclose(got, weight_only(paddle.to_tensor(x)).numpy(), atol=1e-5)
    top1, cosine = _agreement(got, dynamic(paddle.to_tensor(x)).numpy())
    assert cosine > 0.9998 and top1 >= 0.9  # measured cosine 0.99997-0.99999, top-1 100%


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_rnn_with_initial_states_exports_both_ways(cell, tmp_path) -> None:
    """Initial states computed from the input, for a 2-layer bidirectional RNN: ONNX gets
    each layer's rows of them, the Paddle program takes them as they are."""

    class Seeded(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.start = paddle.nn.Linear(12, 4 * 16)
            self.rnn = getattr(paddle.nn, cell)(12, 16, num_layers=2, direction="bidirect")

        def forward(self, x: paddle.Tensor) -> paddle.Tensor:
            # [layers * directions, batch, hidden]
            h = paddle.tanh(self.start(x[:, 0])).reshape([-1, 4, 16]).transpose([1, 0, 2])
            return self.rnn(x, (h, 0.5 * h) if cell == "LSTM" else h)[0]

    paddle.seed(17)
    model = Seeded()
    model.eval()
    dynamic = quantize_dynamic(model, layer_types=(getattr(paddle.nn, cell),))
    weight_only = copy.deepcopy(model)
    weight_only.rnn = dynamic.rnn.dequantized_rnn()
    spec = [paddle.static.InputSpec([None, 9, 12], "float32")]
    x = np.random.default_rng(17).standard_normal([4, 9, 12]).astype(np.float32)
    expected, fp32 = dynamic(paddle.to_tensor(x)).numpy(), weight_only(paddle.to_tensor(x)).numpy()
    # The states matter: from zeros the outputs differ by up to 0.28 (LSTM) and 0.59 (GRU).
    from_zeros = weight_only.rnn(paddle.to_tensor(x))[0].numpy()
    assert np.abs(from_zeros - fp32).max() > 0.1
    save_quantized_model(dynamic, tmp_path / "seeded", spec)
    got = predict(create_predictor(tmp_path / "seeded", int8=False), x)[0]
    np.testing.assert_allclose(got, fp32, atol=1e-5)
    got, kernels = _profiled_run(export_onnx(dynamic, tmp_path / "seeded.onnx", spec), x, tmp_path)
    if cell == "GRU":  # fp32 compute
        np.testing.assert_allclose(got, fp32, atol=1e-5)
    else:
        assert kernels.count("DynamicQuantizeLSTM") == 2, kernels
        assert _agreement(got, expected)[1] > 0.9998


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
@pytest.mark.parametrize("layers, direction, time_major", RNN_CONFIGS)
def test_paddle_weight_only_rnn(cell, layers, direction, time_major, tmp_path) -> None:
    _, dynamic, weight_only, spec, x = _recurrent(cell, layers, direction, time_major)
    save_quantized_model(dynamic, tmp_path / "dynamic", spec)
    got = predict(create_predictor(tmp_path / "dynamic", int8=False), x)[0]
    # fp32 compute with exactly the dynamic model's weights (measured max difference 0.0).
    np.testing.assert_allclose(got, weight_only(paddle.to_tensor(x)).numpy(), atol=1e-5)
    # measured cosine 0.99995-0.99999 over 2 seeds x both configurations
    assert _agreement(got, dynamic(paddle.to_tensor(x)).numpy())[1] > 0.9998


def test_weight_only_rnn_files_are_4x_smaller(tmp_path) -> None:
    from imperative_ptq.export import save_fp32_model

    paddle.seed(15)
    model = _RecurrentClassifier("LSTM", hidden=256)
    model.eval()
    spec = [paddle.static.InputSpec([None, 9, 12], "float32")]
    save_fp32_model(model, tmp_path / "fp32", spec)
    dynamic = quantize_dynamic(model, layer_types=(paddle.nn.LSTM, paddle.nn.Linear))
    save_quantized_model(dynamic, tmp_path / "int8", spec)
    ratio = os.path.getsize(tmp_path / "fp32.pdiparams") / os.path.getsize(tmp_path / "int8.pdiparams")
    # 276,992 weights (LSTM 4 x 256 x (12 + 256), head 256 x 10) at 1 byte instead of 4;
    # the 2,058 biases stay fp32 and as many per-row scales are added:
    # 1,116,200 / 293,456 bytes = 3.80 (measured 3.80 with the files' headers).
    assert 3.7 < ratio < 4.0


def _dequantized_weights(model: paddle.nn.Layer) -> list[bytes]:
    """The float32 weights of every dynamic layer, in the layout a Paddle program holds."""
    found = []
    for _, layer in dynamic_layers(model):
        if isinstance(layer, DynamicQuantizedRNN):
            found += [p.dequantized_weight().T.tobytes() for p in layer.rnn_weights().values()]
        else:
            found.append(layer.dequantized_weight().tobytes())
    return found


def _optimized_program(prefix, directory) -> tuple[list[str], dict[str, np.ndarray]]:
    """The op types of the program create_predictor(prefix, int8=False) runs, and its
    float32 weights built by the weight-only export (``*.dequantized``)."""
    from paddle.inference import create_predictor as paddle_predictor

    from imperative_ptq.export.graph import get_tensor
    from imperative_ptq.export.predictor import predictor_config
    from imperative_ptq.export.legacy_program import legacy_static_mode, load_legacy_program

    config = predictor_config(prefix, int8=False)
    config.set_optim_cache_dir(str(directory))
    config.enable_save_optim_model(True)
    paddle_predictor(config)
    with legacy_static_mode():
        loaded = load_legacy_program(str(directory / "_optimized"))
        block = loaded.program.global_block()
        folded = {
            var.name: get_tensor(loaded, var.name) for var in block.vars.values()
            if var.persistable and var.name.endswith(".dequantized")
        }
        return [op.type for op in block.ops], folded


@pytest.mark.parametrize("name", ["mlp", "bidirectional lstm"])
def test_weight_only_weights_are_dequantized_once_when_loaded(name, tmp_path) -> None:
    """Paddle Inference's constant folding turns the int8 weights into float32 ones when the
    predictor is created, before the fusion passes: no op left rebuilding them per call, the
    same fused ops as the fp32 program, and weights equal to the dygraph model's dequantized
    ones bit for bit."""
    from imperative_ptq.export import save_fp32_model

    if name == "mlp":
        paddle.seed(16)
        model = mlp(24, 32, 8)
        model.eval()
        dynamic = quantize_dynamic(model)
        spec = [paddle.static.InputSpec([None, 24], "float32")]
    else:
        model, dynamic, _, spec, _ = _recurrent("LSTM", 2, "bidirect", True)
    save_quantized_model(dynamic, tmp_path / "dynamic", spec)
    save_fp32_model(model, tmp_path / "fp32", spec)
    types, folded = _optimized_program(tmp_path / "dynamic", tmp_path / "optimized")
    fp32_types, _ = _optimized_program(tmp_path / "fp32", tmp_path / "optimized_fp32")
    assert not {"cast", "elementwise_mul", "dequantize_linear"} & set(types), types
    assert types == fp32_types
    expected = _dequantized_weights(dynamic)
    assert len(folded) == len(expected)
    assert all(weight.dtype == np.float32 and weight.tobytes() in expected for weight in folded.values())


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


class _MaskedLinear(paddle.nn.Linear):
    """MADE's masked Linear: a forward of its own."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__(inputs, outputs)
        self.register_buffer("mask", paddle.tril(paddle.ones([inputs, outputs])))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.nn.functional.linear(x, self.weight * self.mask, self.bias)


class _ScaledLinear(paddle.nn.Linear):
    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return super().forward(x) * 2.0


def test_subclasses_with_a_forward_of_their_own_stay_fp32(caplog) -> None:
    """They were replaced by a plain int8 Linear, their forward dropped: a masked Linear 1.37
    of the largest output off the fp32 model, a scaled one 0.5."""
    paddle.seed(1)
    model = paddle.nn.Sequential(_MaskedLinear(8, 16), paddle.nn.ReLU(), paddle.nn.Linear(16, 16),
                                 paddle.nn.ReLU(), _ScaledLinear(16, 4))
    model.eval()
    with caplog.at_level("WARNING", logger="imperative_ptq"):
        quantized = quantize_dynamic(model)
    assert "2 layers stay fp32: their class overrides the forward" in caplog.text
    assert "0 (_MaskedLinear), 4 (_ScaledLinear)" in caplog.text
    assert [name for name, _ in dynamic_layers(quantized)] == ["2"]
    assert type(quantized[0]) is _MaskedLinear and type(quantized[4]) is _ScaledLinear
    x = paddle.randn([8, 8])
    expected = model(x).numpy()
    assert np.abs(quantized(x).numpy() - expected).max() < 0.02 * np.abs(expected).max()
    with pytest.raises(ValueError, match=r"no layer of the types to quantize \(Linear\) whose forward "
                                         r"it can replace \(overridden: 0\)"):
        quantize_dynamic(paddle.nn.Sequential(_MaskedLinear(4, 4)))


class _TiedAutoencoder(paddle.nn.Layer):
    """A decoder multiplying by the encoder Linear's weight transposed."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = paddle.nn.Linear(16, 8)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        code = paddle.nn.functional.relu(self.encoder(x))
        return paddle.nn.functional.linear(code, self.encoder.weight.T)


def test_a_forward_reading_the_weight_of_a_dynamic_linear(tmp_path) -> None:
    """It raised AttributeError: 'DynamicQuantizedLinear' object has no attribute 'weight'."""
    paddle.seed(2)
    model = _TiedAutoencoder()
    model.eval()
    quantized = quantize_dynamic(model)
    np.testing.assert_array_equal(quantized.encoder.weight.numpy(), quantized.encoder.dequantized_weight())
    x = paddle.randn([4, 16])
    expected = model(x).numpy()
    assert np.abs(quantized(x).numpy() - expected).max() < 0.03 * np.abs(expected).max()
    save_quantized_model(quantized, tmp_path / "tied", [paddle.static.InputSpec([None, 16], "float32", "x")])
    ran = predict(create_predictor(tmp_path / "tied", int8=False), x.numpy())[0]
    # Weight-only: fp32 arithmetic on the dequantized weights, the decoder's transpose included.
    weight = quantized.encoder.dequantized_weight()
    code = np.maximum(x.numpy() @ weight + quantized.encoder.bias.numpy(), 0)
    np.testing.assert_allclose(ran, code @ weight.T, rtol=1e-5, atol=1e-5)
