"""Functional ``paddle.matmul(x, self.weight)`` calls (the form x2paddle writes), and the same
products written ``x.matmul(self.weight)`` or ``F.linear(x, self.weight, self.bias)``, are
calibrated, simulated and exported as Linear layers: the same model written with ``nn.Linear``
is the reference, and Paddle Inference and ONNX Runtime compute what the simulation does."""

from __future__ import annotations

import copy
import logging

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.algorithms import AdaRound
from imperative_ptq.export import create_predictor, export_onnx, int8_report, predict
from avx2_kernels import on_avx2, paddle_inference_outputs
from models import converted, largest_error_in_paddle_inference

WIDTH, HIDDEN, CLASSES, LENGTH = 16, 32, 5, 6


class FunctionalBlock(paddle.nn.Layer):
    """A residual MLP block written the way x2paddle writes one: parameters and
    ``paddle.matmul`` (the second weight stored ``[out, in]`` and used with ``transpose_y``)."""

    def __init__(self) -> None:
        super().__init__()
        self.w_in = self.create_parameter([WIDTH, HIDDEN])
        self.b_in = self.create_parameter([HIDDEN], is_bias=True)
        self.w_out = self.create_parameter([WIDTH, HIDDEN])

    #: Whether the first product's site holds ``b_in`` (``F.linear``'s bias).
    bias_inside = False

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        hidden = paddle.nn.functional.relu(paddle.matmul(x, self.w_in) + self.b_in)
        return x + paddle.matmul(hidden, self.w_out, transpose_y=True)

    @staticmethod
    def product(x: paddle.Tensor, weight: paddle.Tensor) -> paddle.Tensor:
        """``x`` times a parameter, written the way this block writes it."""
        return paddle.matmul(x, weight)


class MethodBlock(FunctionalBlock):
    """:class:`FunctionalBlock` written with the ``Tensor.matmul`` method."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        hidden = paddle.nn.functional.relu(x.matmul(self.w_in) + self.b_in)
        return x + hidden.matmul(self.w_out, transpose_y=True)

    @staticmethod
    def product(x: paddle.Tensor, weight: paddle.Tensor) -> paddle.Tensor:
        return x.matmul(weight)


class LinearFunctionBlock(FunctionalBlock):
    """:class:`FunctionalBlock` with ``F.linear`` where it can be: its first product with the
    bias (which the site then holds), the head without one."""

    bias_inside = True

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        hidden = paddle.nn.functional.relu(paddle.nn.functional.linear(x, self.w_in, self.b_in))
        return x + paddle.matmul(hidden, self.w_out, transpose_y=True)

    @staticmethod
    def product(x: paddle.Tensor, weight: paddle.Tensor) -> paddle.Tensor:
        return paddle.nn.functional.linear(x, weight)


#: How a block multiplies by its parameters -> the block.
STYLES = {"paddle.matmul": FunctionalBlock, "Tensor.matmul": MethodBlock, "F.linear": LinearFunctionBlock}


class LinearBlock(paddle.nn.Layer):
    """:class:`FunctionalBlock` (or a subclass) written with ``nn.Linear`` layers (the
    reference)."""

    def __init__(self, functional: FunctionalBlock) -> None:
        super().__init__()
        self.bias_inside = functional.bias_inside
        self.w_in_matmul = paddle.nn.Linear(WIDTH, HIDDEN, bias_attr=None if self.bias_inside else False)
        self.w_in_matmul.weight.set_value(functional.w_in.numpy())
        if self.bias_inside:
            self.w_in_matmul.bias.set_value(functional.b_in.numpy())
        else:
            self.b_in = self.create_parameter([HIDDEN], is_bias=True)
            self.b_in.set_value(functional.b_in.numpy())
        self.w_out_matmul = paddle.nn.Linear(HIDDEN, WIDTH, bias_attr=False)
        self.w_out_matmul.weight.set_value(functional.w_out.numpy().T)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        product = self.w_in_matmul(x)
        hidden = paddle.nn.functional.relu(product if self.bias_inside else product + self.b_in)
        return x + self.w_out_matmul(hidden)


class Net(paddle.nn.Layer):
    """Two blocks and a functional head on a parameter of the model itself."""

    def __init__(self, blocks: list[paddle.nn.Layer] | None = None) -> None:
        super().__init__()
        self.blocks = paddle.nn.LayerList(blocks or [FunctionalBlock(), FunctionalBlock()])
        self.head = self.create_parameter([WIDTH, CLASSES])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.blocks[0].product(x.mean(axis=1), self.head)


def _functional_net(style: str = "paddle.matmul") -> Net:
    paddle.seed(0)
    model = Net([STYLES[style](), STYLES[style]()])
    model.eval()
    return model


class LinearNet(paddle.nn.Layer):
    """``Net`` with ``nn.Linear`` layers under the names the sites get."""

    def __init__(self, functional: Net) -> None:
        super().__init__()
        self.blocks = paddle.nn.LayerList([LinearBlock(block) for block in functional.blocks])
        self.head_matmul = paddle.nn.Linear(WIDTH, CLASSES, bias_attr=False)
        self.head_matmul.weight.set_value(functional.head.numpy())

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head_matmul(x.mean(axis=1))


def _batches(count: int = 4, seed: int = 0, shift: float | None = None) -> list[np.ndarray]:
    """Standard normal batches, or uniform ones on ``[shift, shift + 1)``."""
    rng = np.random.default_rng(seed)
    shape = (4, LENGTH, WIDTH)
    return [
        (rng.standard_normal(shape) if shift is None else rng.random(shape) + shift).astype(np.float32)
        for _ in range(count)
    ]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _skip_where_it_saturates(target: str) -> None:
    """Skips the test for ``x86-vnni`` on a CPU without VNNI, where its signed int8 inputs
    saturate by design."""
    if target == "x86-vnni" and not ip.cpu_info().vnni:
        pytest.skip("x86-vnni runs signed int8 inputs, which saturate without VNNI")


def _ptq(target: str = "x86", **options) -> ip.ImperativePTQ:
    return ip.ImperativePTQ(
        ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=target, **options)
    )


def _converted(model: paddle.nn.Layer, target: str = "x86", shift: float | None = None, **options):
    ptq = _ptq(target, **options)
    quantized = ptq.quantize(model)
    ptq.calibrate(quantized, _batches(shift=shift), progress=False)
    table = ptq.calibration_table(quantized)
    ptq.convert(quantized)
    return ptq, quantized, table


@pytest.mark.parametrize("style", STYLES)
def test_functional_matmuls_are_calibrated_as_layers_without_changing_the_function(style) -> None:
    model = _functional_net(style)
    before = [name for name, _ in model.named_sublayers()]
    x = paddle.to_tensor(_batches(1, seed=5)[0])
    expected = model(x).numpy()
    ptq = _ptq()
    quantized = ptq.quantize(model)
    ptq.calibrate(quantized, _batches(), progress=False)
    assert sorted(ptq.calibration_table(quantized)) == [
        "blocks.0.w_in_matmul", "blocks.0.w_out_matmul", "blocks.1.w_in_matmul",
        "blocks.1.w_out_matmul", "head_matmul",
    ]
    ptq.remove_hooks(quantized)
    np.testing.assert_allclose(quantized(x).numpy(), expected, rtol=1e-5, atol=1e-6)
    # The user's model is untouched, and paddle.matmul still works outside quantized models.
    assert [name for name, _ in model.named_sublayers()] == before
    np.testing.assert_array_equal(model(x).numpy(), expected)
    a, b = np.ones((2, 3), np.float32), np.ones((3, 4), np.float32)
    np.testing.assert_array_equal(paddle.matmul(paddle.to_tensor(a), paddle.to_tensor(b)).numpy(), a @ b)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("target", ["x86", "x86-vnni"])
@pytest.mark.usefixtures("linear_layers_as_fc")  # the fc path
def test_simulation_equals_the_same_model_written_with_linear_layers(target, style) -> None:
    functional = _functional_net(style)
    reference = LinearNet(functional)
    reference.eval()
    _, quantized, table = _converted(functional, target, shift=1.0)
    _, reference_quantized, reference_table = _converted(reference, target, shift=1.0)
    assert table == reference_table
    x = paddle.to_tensor(_batches(1, seed=7, shift=1.0)[0])
    np.testing.assert_allclose(
        quantized(x).numpy(), reference_quantized(x).numpy(), rtol=1e-5, atol=1e-6
    )


def _run_exports(model: paddle.nn.Layer, target: str, shift: float | None, tmp_path, tag: str, avx2_runner):
    """Calibrates, converts and exports ``model``; returns the simulation's output on one
    batch, Paddle Inference's (natively and, with ``avx2_runner``, on AVX2 kernels, by
    kernels), ONNX Runtime's, the int8 report and the simulated int8 layers."""
    ptq, quantized, _ = _converted(model, target, shift=shift)
    x = _batches(1, seed=9, shift=shift)[0]
    simulated = quantized(paddle.to_tensor(x)).numpy()
    spec = [paddle.static.InputSpec([None, LENGTH, WIDTH], "float32", "x")]
    prefix = str(tmp_path / tag)
    ptq.save_quantized_model(quantized, prefix, input_spec=spec)
    export_onnx(quantized, prefix + ".onnx", input_spec=spec)
    import onnxruntime

    session = onnxruntime.InferenceSession(prefix + ".onnx", providers=["CPUExecutionProvider"])
    return (
        simulated,
        {kernels: ran for kernels, (ran,) in paddle_inference_outputs(prefix, [x], avx2_runner).items()},
        session.run(None, {session.get_inputs()[0].name: x})[0],
        int8_report(prefix),
        sum(isinstance(layer, ip.QuantizedLayer) for layer in quantized.sublayers()),
    )


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("target, shift", [("x86", 0.0), ("x86-vnni", None)], ids=["x86", "vnni"])
def test_paddle_inference_and_onnx_runtime_run_the_matmuls_int8(target, shift, style, tmp_path, avx2_runner) -> None:
    _skip_where_it_saturates(target)
    functional = _functional_net(style)
    reference = LinearNet(functional)
    reference.eval()
    avx2_runner = on_avx2(avx2_runner, target)
    simulated, inference, onnx_out, report, int8_layers = _run_exports(
        functional, target, shift, tmp_path, "functional", avx2_runner
    )
    # Every matmul the simulation runs int8 runs int8 (x86 keeps those reading signed values
    # fp32: the ones behind a residual add).
    assert int8_layers >= (5 if target == "x86-vnni" else 2)
    assert report.int8.get("fc", 0) == int8_layers, report
    assert all(_cosine(ran, simulated) > 0.999 for ran in inference.values())
    assert _cosine(onnx_out, simulated) > 0.99
    # Both runtimes compute what they compute for the same model written with nn.Linear.
    *linear_outputs, linear_report, _ = _run_exports(reference, target, shift, tmp_path, "linear", avx2_runner)
    assert linear_report.int8 == report.int8
    linear_simulated, linear_inference, linear_onnx = linear_outputs
    pairs = [(simulated, linear_simulated), (onnx_out, linear_onnx)]
    pairs += [(inference[kernels], linear_inference[kernels]) for kernels in inference]
    for ours, theirs in pairs:
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


class Unsupported(paddle.nn.Layer):
    """Matmuls on parameters that stay fp32 (a parameter as ``x``, a 3-D weight), then a
    Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.w = self.create_parameter([WIDTH, WIDTH])
        self.w3 = self.create_parameter([2, WIDTH, WIDTH])
        self.linear = paddle.nn.Linear(WIDTH, CLASSES)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = paddle.matmul(self.w, x, transpose_x=True, transpose_y=True)  # w.T @ x.T
        return self.linear(paddle.matmul(x, self.w3).sum(axis=0) + y.T)


def test_matmuls_that_are_not_quantized_stay_fp32_with_a_warning(caplog) -> None:
    paddle.seed(0)
    model = Unsupported()
    model.eval()
    x = paddle.randn([3, WIDTH])
    expected = model(x).numpy()
    ptq = _ptq()
    quantized = ptq.quantize(model)
    with caplog.at_level(logging.WARNING, logger="imperative_ptq.functional_matmul"):
        ptq.calibrate(quantized, [x.numpy(), x.numpy()], progress=False)
    assert list(ptq.calibration_table(quantized)) == ["linear"]
    warnings = [r.getMessage() for r in caplog.records if "stays fp32" in r.getMessage()]
    assert len(warnings) == 1 and "paddle.matmul(x, w3)" in warnings[0], warnings
    ptq.remove_hooks(quantized)
    np.testing.assert_array_equal(quantized(x).numpy(), expected)


def test_a_model_of_parameters_only_is_accepted() -> None:
    paddle.seed(0)
    block = FunctionalBlock()
    block.eval()
    ptq = _ptq()
    quantized = ptq.quantize(block)
    ptq.calibrate(quantized, _batches(2, shift=0.0), progress=False)
    assert sorted(ptq.calibration_table(quantized)) == ["w_in_matmul", "w_out_matmul"]


def test_a_model_without_any_matrix_is_still_refused() -> None:
    with pytest.raises(ValueError, match="no leaf layer supported by PTQRegistry"):
        _ptq().quantize(paddle.nn.Sequential(paddle.nn.Flatten()))


def test_table_loads_after_the_first_batch_and_explains_before(tmp_path) -> None:
    ptq, _, table = _converted(_functional_net(), shift=1.0)
    path = tmp_path / "table.json"
    source = _ptq()
    calibrated = source.quantize(_functional_net())
    source.calibrate(calibrated, _batches(shift=1.0), progress=False)
    source.save_calibration_table(calibrated, path)

    fresh = _ptq()
    model = fresh.quantize(_functional_net())
    with pytest.raises(ValueError, match="run one batch"):
        fresh.load_calibration_table(model, path)
    with fresh.calibrating(model):
        model(paddle.to_tensor(_batches(1, seed=3)[0]))
    fresh.load_calibration_table(model, path)
    assert fresh.calibration_table(model) == table


def test_bias_correction_and_adaround_see_the_matmuls() -> None:
    x = paddle.to_tensor(_batches(1, seed=11, shift=1.0)[0])
    fp32 = _functional_net()(x).numpy()
    _, plain, _ = _converted(_functional_net(), shift=1.0)
    _, corrected, _ = _converted(
        _functional_net(), shift=1.0, bias_correction=True,
        adaround=AdaRound(iterations=20),
    )
    assert [name for name, _ in corrected.named_sublayers() if name.endswith("_matmul")] == [
        name for name, _ in plain.named_sublayers() if name.endswith("_matmul")
    ]
    assert _cosine(corrected(x).numpy(), fp32) > 0.99


def test_a_bias_free_linear_runs_int8_in_paddle_inference(tmp_path, avx2_runner) -> None:
    paddle.seed(0)
    model = paddle.nn.Sequential(
        paddle.nn.Linear(WIDTH, HIDDEN), paddle.nn.ReLU(),
        paddle.nn.Linear(HIDDEN, CLASSES, bias_attr=False),
    )
    model.eval()
    ptq = _ptq()
    quantized = ptq.quantize(model)
    rng = np.random.default_rng(0)
    ptq.calibrate(quantized, [rng.random((8, WIDTH), np.float32) for _ in range(4)], progress=False)
    ptq.convert(quantized)
    x = rng.random((8, WIDTH), np.float32)
    prefix = str(tmp_path / "model")
    ptq.save_quantized_model(
        quantized, prefix, input_spec=[paddle.static.InputSpec([None, WIDTH], "float32", "x")]
    )
    assert int8_report(prefix).int8.get("fc", 0) == 2
    simulated = quantized(paddle.to_tensor(x)).numpy()
    for ran, in paddle_inference_outputs(prefix, [x], avx2_runner).values():
        assert _cosine(ran, simulated) > 0.9999


class _BroadcastBiasMatmul(paddle.nn.Layer):
    """``paddle.matmul(x, w) + b`` on a [batch, length, width] input with a bias of shape
    [1, 1, hidden], as x2paddle converts an ONNX ``MatMul`` and ``Add`` (Google's magika)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = self.create_parameter([WIDTH, HIDDEN])
        self.bias = self.create_parameter(
            [1, 1, HIDDEN], default_initializer=paddle.nn.initializer.Normal(0.0, 0.1)
        )
        self.head = paddle.nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(paddle.tanh(paddle.add(paddle.matmul(x, self.weight), self.bias)))


def test_a_matmul_with_a_broadcast_bias_runs_int8_in_both_runtimes(tmp_path, avx2_runner) -> None:
    paddle.seed(0)
    model = _BroadcastBiasMatmul()
    model.eval()
    ptq = _ptq()
    quantized = ptq.quantize(model)
    rng = np.random.default_rng(0)
    ptq.calibrate(quantized, [rng.random((2, LENGTH, WIDTH), np.float32) for _ in range(4)], progress=False)
    ptq.convert(quantized)
    x = rng.random((2, LENGTH, WIDTH), np.float32)
    prefix = str(tmp_path / "model")
    spec = [paddle.static.InputSpec([None, LENGTH, WIDTH], "float32", "x")]
    ptq.save_quantized_model(quantized, prefix, input_spec=spec)
    # (the [1, 1, hidden] bias kept Paddle's fc fuse pass away: an fp32 mul, 6e-2 off)
    assert int8_report(prefix).int8.get("fc", 0) == 2
    simulated = quantized(paddle.to_tensor(x)).numpy()
    for ran, in paddle_inference_outputs(prefix, [x], avx2_runner).values():
        assert np.abs(ran - simulated).max() < 1e-5 * np.abs(simulated).max()
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(export_onnx(quantized, prefix + ".onnx", input_spec=spec),
                                   providers=["CPUExecutionProvider"])
    ran = session.run(None, {"x": x})[0]
    assert np.abs(ran - simulated).max() < 1e-5 * np.abs(simulated).max()


def test_analyze_and_keep_fp32_pair_the_matmuls_with_the_fp32_model() -> None:
    ptq, quantized, _ = _converted(_functional_net(), shift=0.0)
    model = _functional_net()
    before = [name for name, _ in model.named_sublayers()]
    report = ptq.analyze(model, quantized, _batches(2, seed=4, shift=0.0))
    simulated = sorted(
        name for name, layer in quantized.named_sublayers() if isinstance(layer, ip.QuantizedLayer)
    )
    assert sorted(row.name for row in report.rows) == simulated
    ptq.keep_fp32(quantized, simulated, model)
    assert [name for name, _ in model.named_sublayers()] == before  # the fp32 model unchanged
    x = paddle.to_tensor(_batches(1, seed=6, shift=0.0)[0])
    np.testing.assert_allclose(quantized(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)


def test_statistics_file_loads_after_the_first_batch_and_explains_before(tmp_path) -> None:
    source = _ptq()
    calibrated = source.quantize(_functional_net())
    source.calibrate(calibrated, _batches(), progress=False)
    source.save_state(calibrated, tmp_path / "state.npz")
    fresh = _ptq()
    model = fresh.quantize(_functional_net())
    with pytest.raises(ValueError, match="run one batch"):
        fresh.load_state(model, tmp_path / "state.npz")
    with fresh.calibrating(model):
        model(paddle.to_tensor(_batches(1, seed=3)[0]))
    fresh.load_state(model, tmp_path / "state.npz")
    assert fresh.calibration_table(model) == source.calibration_table(calibrated)


HEADS, SEQUENCE, HEAD_WIDTH = 2, 8, 8


class Attention(paddle.nn.Layer):
    """Scaled dot-product attention of given q, k, v (functional matmuls of two activations,
    the first on ``q * d**-0.5`` as ``nn.MultiHeadAttention`` writes it), heads merged, then a
    Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = paddle.nn.Linear(HEADS * HEAD_WIDTH, WIDTH)

    def forward(self, q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor) -> paddle.Tensor:
        scores = paddle.matmul(q * HEAD_WIDTH**-0.5, k, transpose_y=True)
        attended = paddle.matmul(paddle.nn.functional.softmax(scores), v)
        return self.proj(_merge_heads(attended))


def _merge_heads(x: paddle.Tensor) -> paddle.Tensor:
    return x.transpose([0, 2, 1, 3]).reshape([0, 0, HEADS * HEAD_WIDTH])


def _attention_batches(count: int, seed: int) -> list[tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(seed)
    shape = (2, HEADS, SEQUENCE, HEAD_WIDTH)
    return [
        tuple(rng.standard_normal(shape).astype(np.float32) for _ in range(3)) for _ in range(count)
    ]


def _fake_quantize(x: np.ndarray, threshold: float) -> np.ndarray:
    """s8 as oneDNN quantizes it on x86-vnni: codes saturate at -128 (tests/test_signed_floor.py)."""
    step = np.float32(threshold) / np.float32(127)
    return np.clip(np.round(x / step), -128, 127) * step


def _attention(target: str):
    paddle.seed(0)
    model = Attention()
    model.eval()
    ptq = _ptq(target)
    quantized = ptq.quantize(model)
    ptq.calibrate(quantized, _attention_batches(4, seed=0), progress=False)
    table = ptq.calibration_table(quantized)
    ptq.convert(quantized)
    return ptq, model, quantized, table


class _ScaledDotProductAttention(paddle.nn.Layer):
    """q, k and v projections into ``F.scaled_dot_product_attention`` ([batch, sequence,
    heads, width]; Paddle's CPU path is two ``paddle.matmul`` of activations), then a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (paddle.nn.Linear(WIDTH, HEADS * HEAD_WIDTH) for _ in range(3))
        self.proj = paddle.nn.Linear(HEADS * HEAD_WIDTH, CLASSES)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        q, k, v = (layer(x).reshape([0, 0, HEADS, HEAD_WIDTH]) for layer in (self.q, self.k, self.v))
        attended = paddle.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(attended.reshape([0, 0, HEADS * HEAD_WIDTH]))


@pytest.mark.parametrize("target", ["x86", "x86-vnni"])
@pytest.mark.usefixtures("linear_layers_as_fc")  # counts the head as a fc
def test_scaled_dot_product_attention_exports_and_runs_as_simulated(target, tmp_path, avx2_runner) -> None:
    """Its trace used to fail (Paddle's legacy-IR branch calls ``shape.numel()``); its two
    matmuls are calibrated like any other and run int8 where the target allows. Measured
    2e-7 .. 4e-7 of the largest output, both runtimes, both targets."""
    onnxruntime = pytest.importorskip("onnxruntime")
    _skip_where_it_saturates(target)
    paddle.seed(0)
    model = _ScaledDotProductAttention()
    model.eval()
    quantized, prefix, spec, x, simulated = _attention_runs_as_simulated(model, target, tmp_path, avx2_runner)
    session = onnxruntime.InferenceSession(export_onnx(quantized, prefix + ".onnx", spec),
                                           providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"x": x})[0] - simulated).max() <= 1e-5 * np.abs(simulated).max()


def _attention_runs_as_simulated(model: paddle.nn.Layer, target: str, tmp_path, avx2_runner):
    """``model`` (four Linear layers and two attention matmuls) converted for ``target``: its
    matmuls int8 where the target allows, the export running 4 int8 fc and as many int8
    ``fused_matmul`` in Paddle Inference, which computes the simulation (also on AVX2 kernels
    for ``x86``). Returns ``(converted model, prefix, input spec, input, simulated output)``."""
    ptq, quantized, _ = _converted(model, target)
    int8_matmuls = sum(isinstance(layer, ip.QuantizedMatmul) for layer in quantized.sublayers())
    assert int8_matmuls == (2 if target == "x86-vnni" else 0)
    x = _batches(1, seed=9)[0]
    simulated = quantized(paddle.to_tensor(x)).numpy()
    spec = [paddle.static.InputSpec([None, LENGTH, WIDTH], "float32", "x")]
    prefix = str(tmp_path / "m")
    ptq.save_quantized_model(quantized, prefix, input_spec=spec)
    report = int8_report(prefix)
    assert report.int8.get("fc") == 4 and report.int8.get("fused_matmul", 0) == int8_matmuls, report
    for ran, in paddle_inference_outputs(prefix, [x], on_avx2(avx2_runner, target)).values():
        assert np.abs(ran - simulated).max() <= 1e-5 * np.abs(simulated).max()
    return quantized, prefix, spec, x, simulated


def test_matmuls_of_two_activations_are_simulated_as_int8_on_both_inputs() -> None:
    _, model, quantized, table = _attention("x86-vnni")
    assert sorted(name for name in table if "activation" in name) == [
        "activation_matmul_0", "activation_matmul_1",
    ]
    scores, weighted = table["activation_matmul_0"], table["activation_matmul_1"]
    q, k, v = _attention_batches(1, seed=5)[0]
    # Slow reference: numpy fake quantization of each matmul's inputs, in float64.
    logits = _fake_quantize(q * HEAD_WIDTH**-0.5, scores["input"][0]).astype(np.float64) @ np.swapaxes(
        _fake_quantize(k, scores["second_input"][0]), -1, -2
    )
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    attended = _fake_quantize(probabilities, weighted["input"][0]) @ _fake_quantize(
        v, weighted["second_input"][0]
    )
    expected = quantized.proj(_merge_heads(paddle.to_tensor(attended.astype(np.float32)))).numpy()
    ran = quantized(*map(paddle.to_tensor, (q, k, v))).numpy()
    np.testing.assert_allclose(ran, expected, rtol=1e-4, atol=1e-5)
    fp32 = model(*map(paddle.to_tensor, (q, k, v))).numpy()
    assert not np.allclose(ran, fp32, atol=1e-5) and _cosine(ran, fp32) > 0.99


@pytest.mark.parametrize("target", ["x86", "x86-vnni"])
def test_matmuls_of_two_activations_run_int8_where_the_target_allows(target, tmp_path, avx2_runner) -> None:
    _skip_where_it_saturates(target)
    ptq, _, quantized, _ = _attention(target)
    simulated_int8 = sum(isinstance(layer, ip.QuantizedMatmul) for layer in quantized.sublayers())
    # x86 keeps them fp32: both inputs are signed (measured on AVX2 kernels: max error 0.49).
    assert simulated_int8 == (2 if target == "x86-vnni" else 0)
    q, k, v = _attention_batches(1, seed=9)[0]
    simulated = quantized(*map(paddle.to_tensor, (q, k, v))).numpy()
    spec = [paddle.static.InputSpec([None, HEADS, SEQUENCE, HEAD_WIDTH], "float32", n) for n in "qkv"]
    prefix = str(tmp_path / "attention")
    ptq.save_quantized_model(quantized, prefix, input_spec=spec)
    report = int8_report(prefix)
    assert report.int8.get("fused_matmul", 0) == simulated_int8, report
    for ran, in paddle_inference_outputs(prefix, [q, k, v], on_avx2(avx2_runner, target)).values():
        assert _cosine(ran, simulated) > 0.9999
    export_onnx(quantized, prefix + ".onnx", input_spec=spec)
    import onnxruntime

    session = onnxruntime.InferenceSession(prefix + ".onnx", providers=["CPUExecutionProvider"])
    feeds = {i.name: value for i, value in zip(session.get_inputs(), (q, k, v))}
    assert _cosine(session.run(None, feeds)[0], simulated) > 0.999


class OperatorBlock(FunctionalBlock):
    """:class:`FunctionalBlock` written with the ``@`` operator."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        hidden = paddle.nn.functional.relu(x @ self.w_in + self.b_in)
        return x + hidden @ self.w_out.T


@pytest.mark.parametrize("target", ["x86", "x86-vnni"])
def test_the_matmul_operator_is_routed_like_paddle_matmul(target, tmp_path, caplog) -> None:
    _skip_where_it_saturates(target)
    paddle.seed(0)
    functional = FunctionalBlock()
    functional.eval()
    operator = OperatorBlock()
    operator.set_state_dict(functional.state_dict())
    operator.eval()
    ptq_f, quantized_f, table_f = _converted(functional, target, shift=0.0)
    with caplog.at_level(logging.WARNING, logger="imperative_ptq.convert"):
        ptq_o, quantized_o, table_o = _converted(operator, target, shift=0.0)
    # ``w_out.T`` is no parameter: that product is a matmul of two activations, one of which
    # stayed the same in every calibration call. Paddle Inference folds it into a constant and
    # runs an fp32 mul, so the simulation keeps it fp32 too (measured int8: 0.3-0.5% off).
    assert table_o["w_in_matmul"] == table_f["w_in_matmul"]
    assert "activation_matmul_0" in table_o
    assert not isinstance(quantized_o.activation_matmul_0, ip.QuantizedMatmul)
    assert "stayed the same in every calibration call" in caplog.text and "activation_matmul_0" in caplog.text
    x = _batches(1, seed=2, shift=0.0)[0]
    simulated = quantized_o(paddle.to_tensor(x)).numpy()
    spec = [paddle.static.InputSpec([None, LENGTH, WIDTH], "float32", "x")]
    prefix = str(tmp_path / "operator")
    ptq_o.save_quantized_model(quantized_o, prefix, input_spec=spec)
    assert int8_report(prefix).int8.get("fc", 0) == 1
    np.testing.assert_allclose(predict(create_predictor(prefix), x)[0], simulated, rtol=1e-4, atol=1e-5)


def test_a_constant_operand_is_found_only_when_the_other_operand_changes(tmp_path) -> None:
    """The rule behind ``LayerState.constant_operand``: one batch repeated shows nothing (both
    operands unchanged); a table carries the finding to a model that saw one batch."""
    paddle.seed(0)
    ptq = _ptq("arm")
    same = ptq.quantize(OperatorBlock())
    batch = _batches(1, shift=0.0)
    ptq.calibrate(same, batch * 3, progress=False)
    ptq.convert(same)
    assert isinstance(same.activation_matmul_0, ip.QuantizedMatmul)

    calibrated = ptq.quantize(OperatorBlock())
    ptq.calibrate(calibrated, _batches(3, shift=0.0), progress=False)
    path = tmp_path / "table.json"
    ptq.save_calibration_table(calibrated, path)
    fresh = _ptq("arm")
    model = fresh.quantize(OperatorBlock())
    with fresh.calibrating(model):
        model(paddle.to_tensor(batch[0]))  # finds the site: one call shows no constant
    fresh.load_calibration_table(model, path)
    fresh.convert(model)
    assert not isinstance(model.activation_matmul_0, ip.QuantizedMatmul)


class FunctionalConv(paddle.nn.Layer):
    """A conv written ``F.conv2d(x, self.weight)`` on channels-last data, which neither a layer
    hook nor the conv routing (channels-first only) calibrates, before an ``F.linear`` on a
    parameter, which the matmul routing calibrates."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_weight = self.create_parameter([8, 3, 3, 3])
        self.linear_weight = self.create_parameter([8 * 16, 10])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        channels_last = paddle.nn.functional.conv2d(
            x.transpose([0, 2, 3, 1]), self.conv_weight, stride=2, padding=1, data_format="NHWC"
        )
        hidden = paddle.nn.functional.relu(channels_last.transpose([0, 3, 1, 2]))
        return paddle.nn.functional.linear(paddle.nn.functional.max_pool2d(hidden, 2).flatten(1), self.linear_weight)


def test_a_functional_conv_running_fp32_is_named_in_a_warning(tmp_path, caplog) -> None:
    """The conv stays fp32 (nothing calibrates it) and the export says so, naming its weight;
    a layer kept fp32 on purpose (``keep_fp32``) is not warned about."""
    from imperative_ptq.analysis import keep_fp32

    paddle.seed(0)
    rng = np.random.default_rng(0)
    ptq = _ptq("x86")
    model = FunctionalConv()
    model.eval()
    quantized = ptq.quantize(model)
    ptq.calibrate(quantized, [rng.random([4, 3, 16, 16], dtype=np.float32) for _ in range(3)], progress=False)
    ptq.convert(quantized)
    spec = [paddle.static.InputSpec([None, 3, 16, 16], "float32", "x")]
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        ptq.save_quantized_model(quantized, str(tmp_path / "functional"), input_spec=spec)
    warned = [record.message for record in caplog.records if "were not calibrated" in record.message]
    assert len(warned) == 1 and warned[0].startswith("1 conv/matmul ops on parameters were not calibrated")
    assert warned[0].endswith("parameters conv_weight"), warned[0]  # its path in the model

    caplog.clear()
    lenet = paddle.vision.models.LeNet()
    lenet.eval()
    ptq = _ptq("x86")
    quantized = ptq.quantize(lenet)
    ptq.calibrate(quantized, [rng.random([4, 1, 28, 28], dtype=np.float32) for _ in range(3)], progress=False)
    ptq.convert(quantized)
    kept = keep_fp32(quantized, ["features.0", "fc.2"], lenet)
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        ptq.save_quantized_model(kept, str(tmp_path / "lenet"), input_spec=[paddle.static.InputSpec([None, 1, 28, 28], "float32", "x")])
    assert not [record for record in caplog.records if "were not calibrated" in record.message]

    # Attention's matmuls of two activations stay fp32 on x86 on purpose: their second
    # operands are no parameters.
    caplog.clear()
    attention = paddle.nn.MultiHeadAttention(WIDTH, 2)
    attention.eval()
    ptq = _ptq("x86")
    quantized = ptq.quantize(attention)
    ptq.calibrate(quantized, [rng.standard_normal([2, LENGTH, WIDTH]).astype("float32") for _ in range(3)], progress=False)
    ptq.convert(quantized)
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        ptq.save_quantized_model(quantized, str(tmp_path / "attention"), input_spec=[paddle.static.InputSpec([None, LENGTH, WIDTH], "float32", "x")])
    assert not [record for record in caplog.records if "were not calibrated" in record.message]


def test_an_operand_with_a_shared_first_token_is_not_taken_for_a_constant() -> None:
    """Sequences whose first token is the same in every batch (a blank first row of an image
    read as tokens): a fingerprint sampled with the stride ``size / 256`` fell on that token
    only (here 128 x 2 heads of 8 tokens of width 8: a stride of one sequence) and kept the
    weighted sum's ``v`` fp32 as a constant."""
    rng = np.random.default_rng(3)
    batches = []
    for _ in range(3):
        q, k, v = (rng.standard_normal((128, HEADS, SEQUENCE, HEAD_WIDTH)).astype(np.float32) for _ in range(3))
        for tensor in (q, k, v):
            tensor[:, :, 0, :] = 0.5
        batches.append((q, k, v))
    paddle.seed(0)
    ptq = _ptq("arm")
    quantized = ptq.quantize(Attention())
    ptq.calibrate(quantized, batches, progress=False)
    ptq.convert(quantized)
    assert isinstance(quantized.activation_matmul_0, ip.QuantizedMatmul)
    assert isinstance(quantized.activation_matmul_1, ip.QuantizedMatmul)


@pytest.mark.parametrize("constant", ["operand", "input"])
def test_the_export_warns_of_a_constant_convert_could_not_see(constant, tmp_path, caplog) -> None:
    """One calibration batch (or the same one twice) cannot show that a matmul's operand, or a
    Linear's input, is computed from parameters only: simulated int8, the layer is named in
    the export's warning, as Paddle Inference folds it into an fp32 constant."""
    paddle.seed(0)
    if constant == "operand":
        ptq, model, batches = _ptq("arm"), OperatorBlock(), _batches(1, shift=0.0)
        name, kind = "activation_matmul_0", ip.QuantizedMatmul
    else:
        ptq, model, batches = _ptq("x86"), _PositionProjection(), _batches(1) * 2
        name, kind = "project", ip.QuantizedLayer
    quantized = ptq.quantize(model)
    ptq.calibrate(quantized, batches, progress=False)
    ptq.convert(quantized)
    assert isinstance(getattr(quantized, name), kind)
    spec = [paddle.static.InputSpec([None, LENGTH, WIDTH], "float32", "x")]
    with caplog.at_level(logging.WARNING, logger="imperative_ptq.export.program"):
        ptq.save_quantized_model(quantized, str(tmp_path / "m"), input_spec=spec)
    assert f"'{name}'" in caplog.text and "computed from parameters only" in caplog.text


def test_an_attention_called_twice_runs_what_the_simulation_computes(tmp_path) -> None:
    """Each call of a shared attention layer gets quantize ops on the moved ``q * d**-0.5``
    with the same threshold (the second call's was divided by the factor twice)."""
    if not ip.cpu_info().vnni:
        pytest.skip("x86-vnni runs signed int8 inputs, which saturate without VNNI")

    class Twice(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.attention = paddle.nn.MultiHeadAttention(WIDTH, 2)
            self.head = paddle.nn.Linear(WIDTH, CLASSES)

        def forward(self, x: paddle.Tensor) -> paddle.Tensor:
            return self.head(self.attention(self.attention(x)).mean(axis=1))

    paddle.seed(0)
    ptq, quantized, _ = _converted(Twice(), "x86-vnni")
    x = _batches(1, seed=9)[0]
    simulated = quantized(paddle.to_tensor(x)).numpy()
    prefix = str(tmp_path / "twice")
    ptq.save_quantized_model(
        quantized, prefix, input_spec=[paddle.static.InputSpec([None, LENGTH, WIDTH], "float32", "x")]
    )
    assert int8_report(prefix).int8.get("fused_matmul", 0) == 4
    assert _cosine(predict(create_predictor(prefix), x)[0], simulated) > 0.9999
    # Both calls' q @ k read q on the same grid.
    from imperative_ptq.export.graph import get_tensor, producers
    from imperative_ptq.export.legacy_program import legacy_static_mode, load_legacy_program

    with legacy_static_mode():
        loaded = load_legacy_program(prefix)
        block = loaded.program.global_block()
        writers = producers(block)
        scores = [op for op in block.ops if op.type == "matmul_v2" and op.attr("trans_y")]
        q_scales = [
            float(get_tensor(loaded, writers[op.input("X")[0]].input("Scale")[0])[0]) for op in scores
        ]
    assert len(q_scales) == 2 and q_scales[0] == q_scales[1], q_scales


class ComputedBias(paddle.nn.Layer):
    """``F.linear`` whose bias is computed, not a parameter: the site is bias-free and the bias
    is added after it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = self.create_parameter([WIDTH, CLASSES])
        self.b = self.create_parameter([CLASSES], is_bias=True)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.nn.functional.linear(x, self.w, self.b * 2.0)


class ComputedBiasReference(paddle.nn.Layer):
    def __init__(self, functional: ComputedBias) -> None:
        super().__init__()
        self.w_matmul = paddle.nn.Linear(WIDTH, CLASSES, bias_attr=False)
        self.w_matmul.weight.set_value(functional.w.numpy())
        self.b = self.create_parameter([CLASSES], is_bias=True)
        self.b.set_value(functional.b.numpy())

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.w_matmul(x) + self.b * 2.0


@pytest.mark.usefixtures("linear_layers_as_fc")  # the fc path
def test_f_linear_with_a_computed_bias_adds_it_after_the_site() -> None:
    paddle.seed(0)
    functional = ComputedBias()
    functional.b.set_value(np.linspace(-1, 1, CLASSES).astype(np.float32))
    functional.eval()
    reference = ComputedBiasReference(functional)
    reference.eval()
    x = paddle.to_tensor(_batches(1, seed=3, shift=0.0)[0])
    expected = functional(x).numpy()
    _, quantized, table = _converted(functional, shift=0.0)
    _, reference_quantized, reference_table = _converted(reference, shift=0.0)
    assert list(table) == ["w_matmul"] and table == reference_table
    np.testing.assert_allclose(quantized(x).numpy(), reference_quantized(x).numpy(), rtol=1e-5, atol=1e-6)
    assert _cosine(quantized(x).numpy(), expected) > 0.99


class EveryForm(paddle.nn.Layer):
    """Every form the routers see, in a model that is not being calibrated: an ``nn.Linear``
    (which calls ``F.linear``), ``F.linear`` with and without a bias, ``paddle.matmul``,
    ``Tensor.matmul``, ``@``, and matmuls of two activations."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = paddle.nn.Linear(WIDTH, HIDDEN)
        self.w = self.create_parameter([HIDDEN, HIDDEN])
        self.b = self.create_parameter([HIDDEN], is_bias=True)
        self.w_out = self.create_parameter([HIDDEN, WIDTH])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = self.linear(x)
        h = (
            paddle.nn.functional.linear(h, self.w, self.b) + paddle.matmul(h, self.w)
            + h.matmul(self.w, transpose_y=True) + h @ self.w
        )
        scores = paddle.matmul(h, h, transpose_y=True)
        return paddle.nn.functional.linear(scores.matmul(h), self.w_out)


@pytest.mark.parametrize("mode", ["dygraph", "to_static"])
def test_calls_that_are_not_routed_are_bit_exact(mode) -> None:
    """With sites made in the process (so the routers look at every call on a parameter), a
    model without sites computes exactly what it computes with Paddle's own functions."""
    from imperative_ptq.functional_matmul import routed_bindings, route_linear, route_matmul

    _converted(_functional_net("F.linear"), shift=0.0)
    assert paddle.matmul is route_matmul and paddle.nn.functional.linear is route_linear
    assert paddle.Tensor.matmul is route_matmul
    paddle.seed(1)
    model = EveryForm()
    model.eval()
    x = paddle.to_tensor(_batches(1, seed=4)[0])

    def run() -> np.ndarray:
        copied = copy.deepcopy(model)
        return (paddle.jit.to_static(copied) if mode == "to_static" else copied)(x).numpy()

    routed = run()
    bindings = routed_bindings()
    for owner, attribute, original, _ in bindings:
        setattr(owner, attribute, original)
    try:
        plain = run()
    finally:
        for owner, attribute, _, router in bindings:
            setattr(owner, attribute, router)
    np.testing.assert_array_equal(routed, plain)
    assert not any(name.endswith("_matmul") for name, _ in model.named_sublayers())


def _attend(q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, fused: bool = False) -> paddle.Tensor:
    """Attention in a module-level helper behind a Python flag, as PaddleNLP's Llama writes it
    (``if config.use_flash_attention: ... else: paddle.matmul(...)``)."""
    if fused:
        return paddle.nn.functional.scaled_dot_product_attention(q, k, v)
    else:
        scores = paddle.matmul(q, k, transpose_y=True) * HEAD_WIDTH**-0.5
        return paddle.matmul(paddle.nn.functional.softmax(scores, -1), v)


def _project(x: paddle.Tensor, weight: paddle.Tensor, parallel: bool = False) -> paddle.Tensor:
    """A head's matmul by a parameter behind a flag (Llama's ``parallel_matmul``)."""
    if parallel:
        return paddle.matmul(x, weight.T, transpose_y=True)
    else:
        return paddle.matmul(x, weight)


class _HelperAttention(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (paddle.nn.Linear(WIDTH, HEAD_WIDTH) for _ in range(3))
        self.head = self.create_parameter([HEAD_WIDTH, CLASSES])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return _project(_attend(self.q(x), self.k(x), self.v(x)), self.head)


@pytest.mark.parametrize("target", ["x86", "x86-vnni"])
@pytest.mark.usefixtures("linear_layers_as_fc")  # counts the head as a fc
def test_matmuls_in_helpers_behind_a_flag_are_exported_as_calibrated(target, tmp_path, avx2_runner) -> None:
    """Tracing converts the helpers' if/else, which puts frames between the matmul and the
    layer calling the helper: the export found no site for them and wrote them fp32 while the
    simulation ran them int8 (a Llama-shaped net: PI and ORT 2.1e-2 and 5e-2 of the largest
    output off on x86-vnni, with no warning)."""
    _skip_where_it_saturates(target)
    paddle.seed(0)
    model = _HelperAttention()
    model.eval()
    _attention_runs_as_simulated(model, target, tmp_path, avx2_runner)


def _converted_after_saving_its_table(model: paddle.nn.Layer, target: str, tmp_path, caplog):
    """``model`` (eval mode) calibrated on three batches, its table saved to
    ``tmp_path/table.json``, then converted with ``caplog`` recording convert's warnings.

    Returns:
        ``(ptq, converted model, table path)``.
    """
    model.eval()
    ptq = _ptq(target)
    quantized = ptq.quantize(model)
    ptq.calibrate(quantized, _batches(3), progress=False)
    table_path = str(tmp_path / "table.json")
    ptq.save_calibration_table(quantized, table_path)
    with caplog.at_level(logging.WARNING, logger="imperative_ptq.convert"):
        ptq.convert(quantized)
    return ptq, quantized, table_path


class _PositionProjection(paddle.nn.Layer):
    """A Linear of an embedding table (DeBERTa's relative-position projection), added to a
    Linear of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.positions = paddle.nn.Embedding(LENGTH, WIDTH)
        self.project = paddle.nn.Linear(WIDTH, HIDDEN)
        self.fc = paddle.nn.Linear(WIDTH, HIDDEN)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc(x) + self.project(self.positions.weight.unsqueeze(0))


def test_a_layer_of_a_constant_input_stays_fp32_as_paddle_folds_it(tmp_path, caplog, avx2_runner) -> None:
    """Paddle Inference folds a Linear of parameters into a constant computed in fp32: the
    simulation ran it int8 (2.2e-2 of the largest output off, no warning); calibration now
    sees its input unchanged while the model's inputs change and keeps it fp32, with a
    warning, through a saved table too."""
    paddle.seed(0)
    model = _PositionProjection()
    ptq, quantized, table_path = _converted_after_saving_its_table(model, "x86", tmp_path, caplog)
    assert "project" in caplog.text and "stayed the same in every calibration call" in caplog.text
    assert type(quantized.project) is paddle.nn.Linear and isinstance(quantized.fc, ip.QuantizedLayer)
    x = _batches(1, seed=9)[0]
    simulated = quantized(paddle.to_tensor(x)).numpy()
    spec = [paddle.static.InputSpec([None, LENGTH, WIDTH], "float32", "x")]
    prefix = str(tmp_path / "m")
    ptq.save_quantized_model(quantized, prefix, input_spec=spec)
    for ran, in paddle_inference_outputs(prefix, [x], avx2_runner).values():
        assert np.abs(ran - simulated).max() <= 1e-5 * np.abs(simulated).max()
    reloaded = ptq.quantize(copy.deepcopy(model))
    ptq.load_calibration_table(reloaded, table_path)
    ptq.convert(reloaded)
    assert type(reloaded.project) is paddle.nn.Linear


class _SharedProjection(paddle.nn.Layer):
    """One Linear called on the tokens and on a parameter table (DeBERTa-v2's key and query
    projections, shared by the content and the relative positions), the two combined by an
    fp32 matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = paddle.nn.Linear(WIDTH, HIDDEN)
        self.project = paddle.nn.Linear(HIDDEN, HIDDEN)
        self.table = self.create_parameter([LENGTH, HIDDEN], default_initializer=paddle.nn.initializer.Normal())
        self.out = paddle.nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        hidden = self.fc(x)
        keys, positions = self.project(hidden), self.project(self.table)
        scores = paddle.matmul(keys, positions, transpose_y=True).sum(-1, keepdim=True)
        return self.out(hidden) + scores


@pytest.mark.parametrize("target", ["x86", "x86-vnni"])
def test_a_linear_called_on_activations_and_on_a_parameter_runs_that_call_fp32(target, tmp_path, caplog, avx2_runner) -> None:
    """Paddle Inference folds the call on the parameter into a constant, in fp32, and ran it
    with the int8 program's quantize ops of its input folded in their native (not oneDNN) form:
    10.8% of the largest output off the simulation on x86 (ONNX Runtime, which ran it int8 as
    simulated, 2.7%: the layer's activation call was shifted on the grid of the other Linear
    reading that tensor, whose input threshold had not seen the table). Calibration now
    follows each call of a layer on its own and finds the second one's input unchanged while
    the model's inputs change; the simulation runs that call in float with the layer's
    weight, both exports give it that weight in float, and ONNX Runtime shifts each layer's
    input on its own grid; through a saved table too."""
    onnxruntime = pytest.importorskip("onnxruntime")
    _skip_where_it_saturates(target)
    paddle.seed(0)
    model = _SharedProjection()
    ptq, quantized, table_path = _converted_after_saving_its_table(model, target, tmp_path, caplog)
    assert "called both on activations and on an input that stayed the same" in caplog.text
    project = quantized.project
    assert isinstance(project, ip.QuantizedLayer) and len(project.constant_inputs) == 1
    assert not quantized.fc.constant_inputs and not quantized.out.constant_inputs
    with paddle.no_grad():
        # The constant call in float with the layer's weight, the other on quantized inputs.
        folded = paddle.nn.functional.linear(model.table, project.layer.weight, project.layer.bias)
        assert np.array_equal(project(model.table).numpy(), folded.numpy())
        hidden = quantized.fc(paddle.to_tensor(_batches(1, seed=9)[0]))
        unquantized = paddle.nn.functional.linear(hidden, project.layer.weight, project.layer.bias)
        assert not np.allclose(project(hidden).numpy(), unquantized.numpy(), rtol=0, atol=1e-6)
    x = _batches(1, seed=9)[0]
    simulated = quantized(paddle.to_tensor(x)).numpy()
    largest = np.abs(simulated).max()
    spec = [paddle.static.InputSpec([None, LENGTH, WIDTH], "float32", "x")]
    prefix = str(tmp_path / "m")
    ptq.save_quantized_model(quantized, prefix, input_spec=spec)
    for ran, in paddle_inference_outputs(prefix, [x], on_avx2(avx2_runner, target)).values():
        assert np.abs(ran - simulated).max() <= 1e-5 * largest
    session = onnxruntime.InferenceSession(export_onnx(quantized, prefix + ".onnx", spec),
                                           providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"x": x})[0] - simulated).max() <= 1e-5 * largest
    fresh = _ptq(target)
    reloaded = fresh.quantize(copy.deepcopy(model))
    with fresh.calibrating(reloaded):
        reloaded(paddle.to_tensor(x))  # finds the functional matmul; one call shows no constant
    fresh.load_calibration_table(reloaded, table_path)
    fresh.convert(reloaded)
    assert reloaded.project.constant_inputs == project.constant_inputs
    assert np.array_equal(reloaded(paddle.to_tensor(x)).numpy(), simulated)


class _DisentangledScores(paddle.nn.Layer):
    """Attention scores plus the query times a constant positional key (DeBERTa's
    content-to-position term): one int8 matmul of two activations, one fp32 (its constant
    operand), both reading the query."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = paddle.nn.Linear(WIDTH, HEAD_WIDTH), paddle.nn.Linear(WIDTH, HEAD_WIDTH)
        self.positions, self.key = paddle.nn.Embedding(LENGTH, WIDTH), paddle.nn.Linear(WIDTH, HEAD_WIDTH)
        self.out = paddle.nn.Linear(LENGTH, CLASSES)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        q, k = self.q(x), self.k(x)
        positional = self.key(self.positions.weight)
        scores = paddle.matmul(q, k, transpose_y=True) + paddle.matmul(q, positional, transpose_y=True)
        return self.out(paddle.nn.functional.softmax(scores, -1))


def test_a_float_matmul_beside_an_int8_one_reads_their_shared_operand_in_float(tmp_path, avx2_runner) -> None:
    """ONNX: the fp32 matmul took the query's scale off the int8 one (1.4e-2 of the largest
    output off ONNX Runtime on x86-vnni, Paddle Inference exact); each now reads the query as
    simulated."""
    onnxruntime = pytest.importorskip("onnxruntime")
    if not ip.cpu_info().vnni:
        pytest.skip("x86-vnni runs signed int8 inputs, which saturate without VNNI")
    paddle.seed(0)
    model = _DisentangledScores()
    model.eval()
    ptq, quantized, _ = _converted(model, "x86-vnni")
    kinds = [type(layer).__name__ for layer in quantized.sublayers()]
    assert kinds.count("QuantizedMatmul") == 1 and type(quantized.key) is paddle.nn.Linear
    x = _batches(1, seed=9)[0]
    simulated = quantized(paddle.to_tensor(x)).numpy()
    spec = [paddle.static.InputSpec([None, LENGTH, WIDTH], "float32", "x")]
    prefix = str(tmp_path / "m")
    ptq.save_quantized_model(quantized, prefix, input_spec=spec)
    largest = np.abs(simulated).max()
    for ran, in paddle_inference_outputs(prefix, [x], None).values():
        assert np.abs(ran - simulated).max() <= 1e-5 * largest
    session = onnxruntime.InferenceSession(export_onnx(quantized, prefix + ".onnx", spec),
                                           providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"x": x})[0] - simulated).max() <= 1e-5 * largest


class _BidirectionalCells(paddle.nn.Layer):
    """A ``BiRNN`` of two ``GRUCell``s (their weights multiplied with ``paddle.matmul``), then a
    Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = paddle.nn.BiRNN(paddle.nn.GRUCell(8, 8), paddle.nn.GRUCell(8, 8))
        self.head = paddle.nn.Linear(16, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        outputs, _ = self.rnn(x)
        return self.head(outputs)


def test_cells_run_by_rnn_wrappers_keep_their_matmuls_fp32(tmp_path, caplog) -> None:
    """``nn.RNN``/``nn.BiRNN`` trace to a while loop whose body Paddle Inference's int8
    passes do not reach; the cells' matmuls were simulated int8 (6.7e-2 of the largest output
    off Paddle Inference). Now they stay fp32, with a warning; the head is int8."""
    from imperative_ptq.functional_matmul import matmul_sites

    paddle.seed(0)
    rng = np.random.default_rng(0)
    ptq = ip.ImperativePTQ()
    qmodel = ptq.quantize(_BidirectionalCells())
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        ptq.calibrate(qmodel, [rng.standard_normal((2, 6, 8)).astype("float32") for _ in range(3)], progress=False)
    assert caplog.text.count("a GRUCell run by paddle.nn.RNN/BiRNN keeps its matmuls fp32") == 2
    ptq.convert(qmodel)
    assert isinstance(qmodel.head, ip.QuantizedLayer) and not list(matmul_sites(qmodel.rnn.cell_fw))
    x = rng.standard_normal((2, 6, 8)).astype("float32")
    ptq.save_quantized_model(qmodel, tmp_path / "m", [paddle.static.InputSpec([None, 6, 8], "float32", "x")])
    ran = predict(create_predictor(tmp_path / "m"), x)[0]
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    assert np.abs(ran - simulated).max() <= 1e-5 * np.abs(simulated).max()


def test_a_table_with_activation_matmuls_loads_after_the_first_batch_and_explains_before(tmp_path) -> None:
    """Matmuls of two activations become layers at the first calibration forward too: loading
    a table into a model that has not run says so (it named the layer only), and loads after
    one batch, thresholds and all."""
    ptq, model, _, table = _attention("x86-vnni")
    path = tmp_path / "table.json"
    source = _ptq("x86-vnni")
    calibrated = source.quantize(model)
    source.calibrate(calibrated, _attention_batches(4, seed=0), progress=False)
    source.save_calibration_table(calibrated, path)

    fresh = _ptq("x86-vnni")
    quantized = fresh.quantize(model)
    with pytest.raises(ValueError, match="'activation_matmul_0'.*run one batch"):
        fresh.load_calibration_table(quantized, path)
    fresh.calibrate(quantized, _attention_batches(1, seed=5), max_batches=1, progress=False)
    fresh.load_calibration_table(quantized, path)
    assert fresh.calibration_table(quantized) == table


class _FloatProduct(paddle.nn.Layer):
    """A layer's own weight multiplied by einsum, addmm or bmm (an MoE's experts, an x2paddle
    Einsum), which Paddle runs in float only, before an int8 Linear."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.w = self.create_parameter([8, 12])
        self.out = paddle.nn.Linear(12, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.how == "einsum":
            y = paddle.einsum("bld,de->ble", x, self.w)
        elif self.how == "addmm":
            y = paddle.addmm(paddle.zeros([1, 12]), x.reshape([-1, 8]), self.w).reshape([-1, 3, 12])
        else:
            y = paddle.bmm(x, self.w.unsqueeze(0).expand([x.shape[0], -1, -1]))
        return self.out(paddle.nn.functional.relu(y))


@pytest.mark.parametrize("how", ["einsum", "addmm", "bmm"])
def test_a_weight_multiplied_by_a_product_without_int8_kernel_is_named(how, tmp_path, caplog) -> None:
    """Paddle has no int8 einsum, addmm or bmm: the weight runs fp32, as simulated; the export
    said nothing (int8_report listed no fp32 op)."""
    paddle.seed(0)
    model = _FloatProduct(how)
    model.eval()
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal((4, 3, 8)).astype(np.float32)) for _ in range(3)]
    qmodel = converted(model, batches)
    x = rng.standard_normal((4, 3, 8)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        assert largest_error_in_paddle_inference(qmodel, x, tmp_path) < 2e-6
    assert "multiplied by ops without an int8 kernel (einsum, bmm, addmm" in caplog.text
    assert ("unsqueeze" if how == "bmm" else ": w") in caplog.text.split("without an int8 kernel")[1]


class PerHeadProjection(paddle.nn.Layer):
    """A matmul by a ``[heads, in, out]`` weight (Funnel's per-head projection as x2paddle
    converts its ``Einsum``), which Paddle has no int8 kernel for, after a calibrated Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = paddle.nn.Linear(WIDTH, 16)
        self.heads = self.create_parameter([2, 8, 4])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        hidden = self.linear(x).reshape([0, 0, 2, 8]).transpose([0, 2, 1, 3])
        return paddle.matmul(hidden, self.heads)


def test_a_matmul_by_a_batched_weight_is_named_with_its_reason(tmp_path, caplog) -> None:
    paddle.seed(0)
    model = PerHeadProjection()
    model.eval()
    ptq, quantized, _ = _converted(model)
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        ptq.save_quantized_model(quantized, str(tmp_path / "heads"), input_spec=[paddle.static.InputSpec([None, LENGTH, WIDTH], "float32", "x")])
    warned = [record.message for record in caplog.records if "were not calibrated" in record.message]
    assert len(warned) == 1 and "a weight of more than two dimensions" in warned[0], caplog.text
    assert warned[0].endswith("parameters heads"), warned[0]
