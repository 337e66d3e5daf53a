"""ONNX weights are stored so that ONNX Runtime's integer kernels compute them exactly on
every x86 CPU: without VNNI its u8 x s8 kernels sum pairs of products in int16
(``vpmaddubsw``), which saturates once activation codes pass 127 and weight codes pass 64.
Layers whose uint8 input codes can pass 127 (the arm and x86-vnni grids, dynamic
quantization) get uint8 weights about zero point 128 where their codes are that large; the
x86 target's inputs (codes 0..127) keep int8 weights and the faster u8 x s8 kernels.

The exported graphs are checked here on any CPU; the ONNX Runtime runs of the same exports
against the simulation are in test_signed_floor.py, test_low_bit_activations.py,
test_onnx_concat.py and test_dynamic.py (on an AVX2 CPU they fail with int8 weights)."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq import quantize_dynamic
from imperative_ptq.export import export_onnx
from imperative_ptq.export.onnx_export import pair_sums_can_saturate, weight_codes_and_zero
from models import converted, randomize_batch_norm_statistics

onnx = pytest.importorskip("onnx")


def _int16_pair_sums(inputs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``inputs @ weights`` as ``vpmaddubsw`` + ``vpmaddwd`` compute it, slowly: each pair of
    u8 x s8 products summed and saturated to int16, the pairs then summed in int32."""
    rows, depth = inputs.shape
    out = np.zeros([rows, weights.shape[1]], np.int64)
    for row in range(rows):
        for column in range(weights.shape[1]):
            for k in range(0, depth, 2):
                pair = sum(int(inputs[row, j]) * int(weights[j, column]) for j in range(k, min(k + 2, depth)))
                out[row, column] += min(max(pair, -32768), 32767)
    return out


def test_the_saturation_rule_matches_the_kernel_arithmetic() -> None:
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 256, [4, 32]).astype(np.uint8)
    for top in (63, 64, 65, 127):
        weights = rng.integers(-top, top + 1, [32, 6]).astype(np.int8)
        weights[0, 0] = weights[1, 0] = top  # the largest codes in one pair, reached at 255
        inputs[0, :2] = 255
        exact = inputs.astype(np.int64) @ weights.astype(np.int64)
        saturates = bool((_int16_pair_sums(inputs, weights) != exact).any())
        assert saturates == pair_sums_can_saturate(weights) == (top >= 65), top
    codes = np.array([[-128, 127], [5, -64]], np.int8)
    stored, zero = weight_codes_and_zero(codes, [2])
    assert stored.dtype == np.uint8 and zero.dtype == np.uint8
    np.testing.assert_array_equal(stored.astype(np.int16) - zero.astype(np.int16), codes)
    stored, zero = weight_codes_and_zero(np.array([[-63, 63]], np.int8), [2])
    assert stored.dtype == np.int8 and not zero.any()


def _weight_types(path: str) -> list[tuple[int, int]]:
    """(data type, zero-point data type) of each integer weight initializer of rank >= 2."""
    graph = onnx.load(path).graph
    initializers = {t.name: t for t in graph.initializer}
    found = []
    for node in graph.node:
        slots = {"DequantizeLinear": (0, 2), "MatMulInteger": (1, 3)}.get(node.op_type)
        if slots is None or node.input[slots[0]] not in initializers:
            continue
        weight = initializers[node.input[slots[0]]]
        if len(weight.dims) >= 2:
            found.append((weight.data_type, initializers[node.input[slots[1]]].data_type))
    return found


UINT8, INT8 = onnx.TensorProto.UINT8, onnx.TensorProto.INT8


@pytest.mark.parametrize("target, expected", [
    ("x86", INT8),  # inputs on codes 0..127 (the shifted grid for the signed input)
    ("x86-vnni", UINT8),  # signed inputs about zero point 128
    ("arm", UINT8),
])
def test_static_weights_are_unsigned_where_input_codes_pass_127(target: str, expected: int, tmp_path) -> None:
    paddle.seed(0)
    model = paddle.nn.Sequential(paddle.nn.Linear(16, 16), paddle.nn.Linear(16, 8))
    model.eval()
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=target))
    qmodel = ptq.quantize(model)
    qmodel(paddle.randn([32, 16]))
    ptq.convert(qmodel)
    path = export_onnx(qmodel, tmp_path / "m.onnx", [paddle.static.InputSpec([None, 16], "float32", "x")])
    assert _weight_types(path) == [(expected, expected)] * 2


@pytest.mark.parametrize("bits, expected", [(8, UINT8), (7, INT8)])
def test_dynamic_weights_are_unsigned_unless_too_narrow_to_saturate(bits: int, expected: int, tmp_path) -> None:
    paddle.seed(0)
    quantized = quantize_dynamic(paddle.nn.Sequential(paddle.nn.Linear(64, 32)), weight_bits=bits)
    path = export_onnx(quantized, tmp_path / "d.onnx", [paddle.static.InputSpec([None, 64], "float32")])
    assert _weight_types(path) == [(expected, expected)]


class _TinyInputLargeBias(paddle.nn.Layer):
    """An untrained detection head: near-constant features (range ~1e-9) into a 1x1 conv with
    a prior-probability bias of -4.6, then a sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.features = paddle.nn.Conv2D(4, 8, 3, padding=1)
        self.score = paddle.nn.Conv2D(8, 4, 1, bias_attr=paddle.ParamAttr(initializer=paddle.nn.initializer.Constant(-4.595)))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.nn.functional.sigmoid(self.score(paddle.nn.functional.relu(self.features(x)) * 1e-9))


@pytest.mark.parametrize("target", ["x86", "x86-vnni", "arm"])
def test_a_bias_beyond_the_int32_grid_is_added_in_float(target, tmp_path) -> None:
    """The bias on the int32 grid of the conv's input x weight scales (2.5e-15 here) would be
    -1.9e15: stored as int32 it wrapped to -2**31 and ONNX Runtime gave every score 0.5 where
    the simulation gives 0.01 (a PicoDet head, random weights); the conv now runs without it
    and adds it in float."""
    onnxruntime = pytest.importorskip("onnxruntime")
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.random((2, 4, 6, 6), np.float32)) for _ in range(2)]
    quantized = converted(_TinyInputLargeBias(), batches, target)
    assert isinstance(quantized.score, ip.QuantizedLayer)
    x = rng.random((2, 4, 6, 6), np.float32)
    simulated = quantized(paddle.to_tensor(x)).numpy()
    path = export_onnx(quantized, str(tmp_path / "m.onnx"), [paddle.static.InputSpec([None, 4, 6, 6], "float32", "x")])
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], simulated, rtol=1e-5)
    assert abs(float(simulated.mean()) - 0.01) < 1e-3


class _ConvNormActivation(paddle.nn.Layer):
    def __init__(self, activation: str) -> None:
        super().__init__()
        nn = paddle.nn
        self.conv, self.norm = nn.Conv2D(3, 16, 3, padding=1, bias_attr=False), nn.BatchNorm2D(16)
        # "affine": a BatchNorm as x2paddle writes ONNX's, a multiply and an add.
        self.gain = nn.Linear(1, 16).weight if activation == "affine" else None
        self.activation = None if activation == "affine" else getattr(nn.functional, activation)
        self.head = nn.Conv2D(16, 4, 3, padding=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.norm(self.conv(x))
        if self.gain is None:
            return self.head(self.activation(x))
        return self.head(paddle.multiply(self.gain.reshape([16, 1, 1]), x) + 0.1)


@pytest.mark.parametrize("activation", ["swish", "hardswish", "leaky_relu", "affine"])
@pytest.mark.parametrize("target", ["x86-vnni", "arm"])
def test_a_conv_onnx_runtime_runs_in_float_keeps_a_float_bias(activation, target, tmp_path) -> None:
    """Where no QuantizeLinear follows a conv (before a Swish, Hardswish or LeakyReLU, a float
    multiply, as the network's output) ONNX Runtime runs it in float on the dequantized input
    and weight (no QLinearConv), so the bias stays float there: as int32 on the input x weight
    grid its rounding moved near-tie codes (measured: 3.4e-3 of the largest output off the
    simulation on 3% of the outputs with a BatchNorm folded in; 2e-7 now). Measured with the
    multiply (x2paddle's BatchNorm): 2.1e-3 on both targets before, 1.5e-7 now."""
    onnxruntime = pytest.importorskip("onnxruntime")

    paddle.seed(0)
    model = _ConvNormActivation(activation)
    randomize_batch_norm_statistics(model, seed=2)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal((4, 3, 16, 16)).astype("float32")) for _ in range(3)]
    quantized = converted(model, batches, target)
    x = rng.standard_normal((4, 3, 16, 16)).astype("float32")
    path = export_onnx(quantized, str(tmp_path / "m.onnx"), [paddle.static.InputSpec([None, 3, 16, 16], "float32", "x")])
    convs = [node for node in onnx.load(path).graph.node if node.op_type == "Conv"]
    # A float bias before the activation, and on the head, whose output the network returns.
    assert [conv.input[2].startswith("bias.dq") for conv in convs] == [False, False]
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    simulated = quantized(paddle.to_tensor(x)).numpy()
    assert np.abs(session.run(None, {"x": x})[0] - simulated).max() <= 1e-5 * np.abs(simulated).max()


def _signed_input_mlp(tmp_path, vnni_only: bool) -> tuple[paddle.nn.Layer, str]:
    paddle.seed(0)
    model = paddle.nn.Sequential(paddle.nn.Linear(16, 16), paddle.nn.Linear(16, 8))
    model.eval()
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(), target="x86-vnni"))
    qmodel = ptq.quantize(model)
    qmodel(paddle.randn([32, 16]))
    ptq.convert(qmodel)
    spec = [paddle.static.InputSpec([None, 16], "float32", "x")]
    return qmodel, export_onnx(qmodel, tmp_path / f"m{int(vnni_only)}.onnx", spec, vnni_only=vnni_only)


def test_vnni_only_stores_every_weight_int8(tmp_path) -> None:
    """``vnni_only=True``: int8 weights for ONNX Runtime's u8 x s8 kernels, exact with VNNI
    (MobileNetV2 on ``x86-vnni`` 1.06x -> 1.40x its fp32 in ONNX Runtime on a Zen 5 EPYC)."""
    _, portable = _signed_input_mlp(tmp_path, False)
    qmodel, vnni = _signed_input_mlp(tmp_path, True)
    assert _weight_types(portable) == [(UINT8, UINT8)] * 2
    assert _weight_types(vnni) == [(INT8, INT8)] * 2
    if not ip.cpu_info().vnni:
        pytest.skip("u8 x s8 kernels without VNNI saturate: the file runs on VNNI CPUs only")
    onnxruntime = pytest.importorskip("onnxruntime")
    x = np.random.default_rng(0).standard_normal([8, 16]).astype(np.float32)
    ran = [
        onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        for path in (portable, vnni)
    ]
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    bound = 1e-5 * np.abs(simulated).max()
    np.testing.assert_allclose(ran[1], ran[0], rtol=0, atol=bound)
    np.testing.assert_allclose(ran[1], simulated, rtol=0, atol=bound)


def test_vnni_only_must_be_a_bool(tmp_path) -> None:
    qmodel, _ = _signed_input_mlp(tmp_path, False)
    with pytest.raises(TypeError, match="vnni_only"):
        export_onnx(qmodel, tmp_path / "bad.onnx", [paddle.static.InputSpec([None, 16], "float32", "x")], vnni_only=1)
