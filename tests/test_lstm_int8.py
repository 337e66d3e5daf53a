"""LSTM int8: a one-layer, one-direction ``paddle.nn.LSTM`` runs as Paddle Inference's int8
``fusion_lstm`` on the ``x86-vnni`` target, its simulation computes what that kernel does, the
``rnn`` -> ``fusion_lstm`` rewrite computes the ``rnn`` op in fp32, the ONNX export computes
the simulation in ONNX Runtime, and every recurrent layer left fp32 is named in a warning."""

from __future__ import annotations

import logging

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.export import create_predictor, int8_report, predict, save_quantized_model
from imperative_ptq.export.legacy_program import legacy_static_mode, load_legacy_program, save_legacy_program
from imperative_ptq.export.rnn_fusion import fuse_lstm_ops
from imperative_ptq.export.tracing import trace_to_legacy_program
from imperative_ptq.quant_rnn import QuantizedLSTM
from avx2_kernels import on_avx2, paddle_inference_outputs
from models import X86_TARGETS

nn = paddle.nn
STEPS, FEATURES, HIDDEN = 6, 8, 16


class _Classifier(nn.Layer):
    """LSTM + Linear reading the output sequence, the final hidden state or the final cell
    state (``reads``)."""

    def __init__(self, time_major: bool, reads: str, lstm: nn.Layer | None = None) -> None:
        super().__init__()
        self.lstm = lstm or nn.LSTM(FEATURES, HIDDEN, time_major=time_major)
        self.fc = nn.Linear(HIDDEN, 4)
        self.reads = reads

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        sequence, (hidden, cell) = self.lstm(x)
        read = {"sequence": sequence, "final-hidden": hidden[0], "final-cell": cell[0]}
        return self.fc(read[self.reads])


def _assert_same_up_to_rounding(ran: np.ndarray, simulated: np.ndarray) -> None:
    """No hidden code apart: one code is 1-5% of the largest output (a cosine can hide it)."""
    assert np.abs(ran - simulated).max() <= 1e-5 * np.abs(simulated).max()


def _batch(rng: np.random.Generator, size: int, time_major: bool) -> np.ndarray:
    x = rng.standard_normal([size, STEPS, FEATURES]).astype("float32")
    return np.ascontiguousarray(x.transpose(1, 0, 2)) if time_major else x


def _spec() -> list[paddle.static.InputSpec]:
    """[T, B, F] or [B, T, F], batch and length dynamic."""
    return [paddle.static.InputSpec([None, None, FEATURES], "float32", "x")]


def _converted(model: nn.Layer, time_major: bool, target: str = "x86-vnni") -> nn.Layer:
    model.eval()
    rng = np.random.default_rng(0)
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=target))
    quantized = ptq.quantize(model)
    for _ in range(3):
        quantized(paddle.to_tensor(_batch(rng, 4, time_major)))
    ptq.convert(quantized)
    return quantized


# --------------------------------------------------------------------- slow reference
def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-v))


def _reference_fusion_lstm_int8(
    lstm: nn.LSTM, x: np.ndarray, threshold: float, headroom: float
) -> np.ndarray:
    """oneDNN's int8 LSTM as Paddle 3.3.1 sets it up, step by step from its documented parts:
    fusion_lstm weights in Paddle's gate order c, i, f, o; per-column scales from the abs-max
    of WeightX and WeightH; the kernel reorders the weights to oneDNN's i, f, c, o but passes
    the scales unreordered; data (input and hidden state) as u8 ``round(v * 127 / t) + 128``.
    The export's zero feature has, per gate column, ``headroom`` times the largest weight of
    the gate that borrows the column and of the column itself."""
    hidden = lstm.hidden_size
    w_ih, w_hh = lstm.weight_ih_l0.numpy(), lstm.weight_hh_l0.numpy()
    bias = lstm.bias_ih_l0.numpy() + lstm.bias_hh_l0.numpy()

    def paddle_order(rows: np.ndarray) -> list[np.ndarray]:  # nn i, f, c, o -> c, i, f, o
        i, f, c, o = np.split(rows, 4)
        return [c, i, f, o]

    weight_x = np.concatenate(paddle_order(w_ih)).T  # [in, 4H], columns c, i, f, o
    weight_h = np.concatenate(paddle_order(w_hh)).T
    own = np.maximum(np.abs(weight_x).max(0), np.abs(weight_h).max(0)).reshape(4, hidden)
    borrower = {0: 1, 1: 2, 2: 0, 3: 3}  # column block c is used by oneDNN's gate i, ...
    zero_feature_row = np.concatenate([
        headroom * np.maximum(own[block], own[borrower[block]]) for block in range(4)
    ])
    scales = np.maximum(own.reshape(-1), zero_feature_row)  # per column, what Paddle computes
    # The kernel's weights: oneDNN order i, f, c, o; the scales keep Paddle's column order.
    onednn_x = np.concatenate([np.split(weight_x, 4, axis=1)[k] for k in (1, 2, 0, 3)], axis=1)
    onednn_h = np.concatenate([np.split(weight_h, 4, axis=1)[k] for k in (1, 2, 0, 3)], axis=1)
    onednn_bias = np.concatenate([np.split(np.concatenate(paddle_order(bias)), 4)[k] for k in (1, 2, 0, 3)])

    def quantize_weight(weight: np.ndarray) -> np.ndarray:
        out = np.empty_like(weight)
        for column in range(weight.shape[1]):
            # Paddle's pass stores 1 / max as float32 and scales it by 127 in double, then
            # hands oneDNN a float32 factor; oneDNN multiplies the float32 weights by it.
            inverse = np.float32(1) / np.float32(scales[column])
            factor = np.float32(np.float64(inverse) * 127)
            codes = np.clip(np.rint(weight[:, column].astype(np.float32) * factor), -128, 127)
            out[:, column] = codes / np.float64(factor)
        return out

    def quantize_data(v: np.ndarray) -> np.ndarray:
        codes = np.clip(np.round(v * 127 / threshold) + 128, 0, 255)
        return (codes - 128) * threshold / 127

    wx, wh = quantize_weight(onednn_x), quantize_weight(onednn_h)
    sequence = x if lstm.time_major else x.transpose(1, 0, 2)
    h = np.zeros([sequence.shape[1], hidden])
    c = np.zeros_like(h)
    outputs = []
    for t in range(sequence.shape[0]):
        gates = quantize_data(sequence[t]) @ wx + h @ wh + onednn_bias
        i, f, g, o = np.split(gates, 4, axis=1)
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = quantize_data(_sigmoid(o) * np.tanh(c))
        outputs.append(h)
    out = np.stack(outputs)
    return out if lstm.time_major else out.transpose(1, 0, 2)


@pytest.mark.parametrize("headroom", [1.0, 2.0])
@pytest.mark.parametrize("time_major", [False, True], ids=["batch-first", "time-major"])
def test_simulation_matches_a_step_by_step_reference(time_major, headroom) -> None:
    paddle.seed(1)
    lstm = nn.LSTM(FEATURES, HIDDEN, time_major=time_major)
    lstm.eval()
    simulated = QuantizedLSTM(lstm, [2.5], [0.7], headroom)  # data threshold: the larger, 2.5
    x = _batch(np.random.default_rng(1), 3, time_major)
    out, (final_hidden, _) = simulated(paddle.to_tensor(x))
    expected = _reference_fusion_lstm_int8(lstm, x.astype(np.float64), 2.5, headroom)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)
    last = out.numpy()[-1] if time_major else out.numpy()[:, -1]
    np.testing.assert_array_equal(final_hidden.numpy()[0], last)


# --------------------------------------------------------------------- rewrite, fp32
@pytest.mark.parametrize("time_major", [False, True], ids=["batch-first", "time-major"])
@pytest.mark.parametrize("reads", ["sequence", "final-hidden"])
def test_fusion_lstm_rewrite_computes_the_rnn_op(time_major, reads, tmp_path) -> None:
    paddle.seed(0)
    model = _Classifier(time_major, reads)
    quantized = _converted(model, time_major)
    traced = trace_to_legacy_program(
        quantized, _spec(), str(tmp_path / "traced"), program_weights=False
    )
    with legacy_static_mode():
        loaded = load_legacy_program(str(tmp_path / "traced"))
        weights = {r.weight_name: r for r in traced.records if r.layer_type == "LSTM"}
        done = fuse_lstm_ops(loaded, weights)
        assert len(done.fused) == 1 and not done.refused and not done.simulated_fp32
        assert not any(op.type == "rnn" for op in loaded.program.global_block().ops)
        save_legacy_program(loaded, str(tmp_path / "fused"))
    x = _batch(np.random.default_rng(2), 3, time_major)
    ran = predict(create_predictor(str(tmp_path / "fused"), int8=False, num_threads=1), x)[0]
    # The traced program holds the fp32 LSTM and the Linear's fake-quantized weight.
    fp32_lstm = _Classifier(time_major, reads, lstm=model.lstm)
    fp32_lstm.fc = quantized.fc.layer
    fp32_lstm.eval()
    expected = fp32_lstm(paddle.to_tensor(x)).numpy()
    np.testing.assert_allclose(ran, expected, atol=1e-5)  # measured 1e-7


# --------------------------------------------------------------------- int8 runtime
@pytest.mark.parametrize("target", X86_TARGETS)
@pytest.mark.parametrize("time_major", [False, True], ids=["batch-first", "time-major"])
@pytest.mark.parametrize("reads", ["sequence", "final-hidden", "final-cell"])
def test_int8_lstm_runs_what_the_simulation_computes(
    target, time_major, reads, tmp_path, caplog, avx2_runner
) -> None:
    """Also a read final cell state, which oneDNN's fusion_lstm does not output: the export
    computes it beside the kernel (it used to keep such an LSTM fp32 while the simulation ran
    it int8)."""
    paddle.seed(0)
    model = _Classifier(time_major, reads)
    quantized = _converted(model, time_major, target)
    assert isinstance(quantized.lstm, QuantizedLSTM)
    prefix = str(tmp_path / "m")
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        save_quantized_model(quantized, prefix, _spec())
    assert not any("LSTM" in r.getMessage() or "signed (s8)" in r.getMessage() for r in caplog.records), caplog.text
    report = int8_report(prefix)
    assert report.int8.get("fusion_lstm") == 1 and "rnn" not in report.fp32, report
    assert not any(name.startswith("fusion_lstm") for name in report.signed_inputs), report
    x = _batch(np.random.default_rng(3), 3, time_major)
    # int8 vs fp32 about 0.998 in cosine; the runtime equals the simulation to float rounding.
    for ran, in paddle_inference_outputs(prefix, [x], on_avx2(avx2_runner, target)).values():
        _assert_same_up_to_rounding(ran, quantized(paddle.to_tensor(x)).numpy())


def test_a_wider_int8_lstm_runs_what_the_simulation_computes(tmp_path, avx2_runner) -> None:
    class Sequence(nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(16, 32)

        def forward(self, x: paddle.Tensor) -> paddle.Tensor:
            return self.lstm(x)[0]

    paddle.seed(0)
    rng = np.random.default_rng(0)
    model = Sequence()
    model.eval()
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer(), target="x86"))
    quantized = ptq.quantize(model)
    for _ in range(8):
        quantized(paddle.to_tensor(rng.standard_normal((4, 6, 16)).astype("float32")))
    ptq.convert(quantized)
    prefix = str(tmp_path / "m")
    save_quantized_model(quantized, prefix, [paddle.static.InputSpec([None, 6, 16], "float32", "x")])
    x = rng.standard_normal((8, 6, 16)).astype("float32")
    for ran, in paddle_inference_outputs(prefix, [x], avx2_runner).values():
        _assert_same_up_to_rounding(ran, quantized(paddle.to_tensor(x)).numpy())


class _CalledTwice(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(FEATURES, HIDDEN)
        self.fc = nn.Linear(HIDDEN, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        first, _ = self.lstm(x)
        _, (_, cell) = self.lstm(x * 0.5)
        return self.fc(first[:, -1] + cell[0])


def test_int8_lstm_runs_what_the_simulation_computes_when_called_twice(tmp_path, avx2_runner) -> None:
    """Each call becomes its own fusion_lstm (two calls used to fail the export on a variable
    created twice)."""
    paddle.seed(0)
    quantized = _converted(_CalledTwice(), time_major=False, target="x86")
    prefix = str(tmp_path / "m")
    save_quantized_model(quantized, prefix, _spec())
    report = int8_report(prefix)
    assert report.int8.get("fusion_lstm") == 2 and "rnn" not in report.fp32, report
    x = _batch(np.random.default_rng(3), 3, False)
    for ran, in paddle_inference_outputs(prefix, [x], avx2_runner).values():
        _assert_same_up_to_rounding(ran, quantized(paddle.to_tensor(x)).numpy())


# --------------------------------------------------------------------- layers left fp32
class _Stack(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(FEATURES, HIDDEN)
        self.simple = nn.SimpleRNN(HIDDEN, HIDDEN)
        self.two_layers = nn.LSTM(HIDDEN, HIDDEN, num_layers=2)
        self.bidirectional = nn.LSTM(HIDDEN, HIDDEN, direction="bidirect")
        self.fc = nn.Linear(2 * HIDDEN, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x, _ = self.gru(x)
        x, _ = self.simple(x)
        x, _ = self.two_layers(x)
        x, _ = self.bidirectional(x)
        return self.fc(x)


def test_recurrent_layers_without_an_int8_kernel_are_named(caplog) -> None:
    paddle.seed(0)
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        quantized = _converted(_Stack(), time_major=False)
    warnings = [r.getMessage() for r in caplog.records if "recurrent layers stay fp32" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    for named in ("gru (GRU)", "simple (SimpleRNN)", "two_layers (2 layers", "bidirectional (bidirectional"):
        assert named in warnings[0], warnings[0]
    assert not any(isinstance(layer, QuantizedLSTM) for layer in quantized.sublayers())



def test_a_model_of_recurrent_layers_without_an_int8_kernel_converts_and_exports_fp32(tmp_path, caplog) -> None:
    """Nothing to quantize (a SimpleRNN runs Paddle's fused rnn op in dygraph: no hooked
    layer, no functional matmul): convert refused the calibrated model ("no calibration data:
    run batches through the quantized model"), though batches had run. It now converts with
    the recurrent layer named and exports an fp32 program both runtimes run as dygraph does."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from imperative_ptq.export import export_onnx

    paddle.seed(0)
    model = nn.Sequential(nn.SimpleRNN(FEATURES, HIDDEN))
    model.eval()
    rng = np.random.default_rng(0)
    ptq = ip.ImperativePTQ()
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, [rng.standard_normal((2, 5, FEATURES)).astype("float32") for _ in range(2)], progress=False)
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        ptq.convert(qmodel)
    assert "0 (SimpleRNN)" in caplog.text
    x = rng.standard_normal((2, 5, FEATURES)).astype("float32")
    expected = model(paddle.to_tensor(x))[0].numpy()
    np.testing.assert_array_equal(qmodel(paddle.to_tensor(x))[0].numpy(), expected)
    spec = [paddle.static.InputSpec([None, 5, FEATURES], "float32", "x")]
    ptq.save_quantized_model(qmodel, tmp_path / "m", spec)
    np.testing.assert_allclose(predict(create_predictor(tmp_path / "m"), x)[0], expected, atol=1e-5)
    path = export_onnx(qmodel, tmp_path / "m.onnx", spec)
    ran = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(ran, expected, atol=1e-5)

class _StartsFromStates(nn.Layer):
    """An LSTM called with initial states (``start``: their value; ``None``: called with
    sequence lengths instead), then once more without."""

    def __init__(self, start: float | None) -> None:
        super().__init__()
        self.lstm = nn.LSTM(FEATURES, HIDDEN)
        self.fc = nn.Linear(HIDDEN, 4)
        self.start = start

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.start is None:
            lengths = paddle.full([x.shape[0]], x.shape[1], "int64")
            sequence, _ = self.lstm(x, sequence_length=lengths)
        else:
            state = paddle.full([1, x.shape[0], HIDDEN], self.start)
            sequence, _ = self.lstm(x, (state, state))
        again, _ = self.lstm(x)
        return self.fc(sequence + again)


@pytest.mark.parametrize(
    "start, reason",
    [(0.5, "called with initial states"), (None, "called with sequence lengths")],
    ids=["states", "sequence-lengths"],
)
def test_an_lstm_call_with_states_runs_fp32_in_the_simulation_and_the_export(
    start, reason, caplog, tmp_path
) -> None:
    """The export decides per traced call what the simulation decides per call. Zero states
    used to be exported int8 (the traced states are zeros) while the simulation ran fp32."""
    paddle.seed(0)
    # x86: right on every CPU (an x86-vnni export would add a warning on a CPU without VNNI).
    quantized = _converted(_StartsFromStates(start), time_major=False, target="x86")
    x = _batch(np.random.default_rng(6), 3, False)
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        simulated = quantized(paddle.to_tensor(x)).numpy()
        save_quantized_model(quantized, str(tmp_path / "m"), _spec())
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(messages) == 2, messages  # nothing about layers simulated int8 running fp32
    assert messages[0].startswith(f"LSTM lstm {reason}: it runs fp32, here and in the export"), messages
    assert messages[1].startswith("1 LSTM layers are exported fp32, as their simulation runs them: "
                                  f"lstm ({reason})"), messages
    report = int8_report(str(tmp_path / "m"))
    assert report.fp32.get("rnn") == 1 and report.int8.get("fusion_lstm") == 1, report
    ran = predict(create_predictor(str(tmp_path / "m"), num_threads=1), x)[0]
    np.testing.assert_allclose(ran, simulated, atol=1e-5)


class _FedFromStates(nn.Layer):
    """Linear -> ReLU -> an LSTM called with initial states (fp32) -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.relu = nn.Linear(FEATURES, FEATURES), nn.ReLU()
        self.lstm = nn.LSTM(FEATURES, HIDDEN)
        self.fc1 = nn.Linear(HIDDEN, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        state = paddle.full([1, paddle.shape(x)[0], HIDDEN], 0.5)
        sequence, _ = self.lstm(self.relu(self.fc0(x)), (state, state))
        return self.fc1(sequence)


def test_an_lstm_left_fp32_reads_its_input_in_float(tmp_path) -> None:
    """The int8 fc before an LSTM kept fp32 writes no codes for it (measured before, with the
    zero states x2paddle passes: the fc's ReLU output written int8 for the rnn op, 1.1% of
    the largest output off)."""
    paddle.seed(0)
    quantized = _converted(_FedFromStates(), time_major=False, target="x86")
    x = _batch(np.random.default_rng(7), 3, False)
    save_quantized_model(quantized, str(tmp_path / "m"), _spec())
    report = int8_report(str(tmp_path / "m"))
    assert report.fp32.get("rnn") == 1 and report.int8.get("fc") == 2, report
    ran = predict(create_predictor(str(tmp_path / "m"), num_threads=1), x)[0]
    _assert_same_up_to_rounding(ran, quantized(paddle.to_tensor(x)).numpy())


class _X2PaddleStates(nn.Layer):
    """An LSTM called with zero states built as x2paddle writes them: ``full(shape, 1)`` times
    a zero parameter, reshaped twice; then called again without."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(FEATURES, HIDDEN)
        self.fc = nn.Linear(HIDDEN, 4)
        self.zeros = self.create_parameter([HIDDEN], default_initializer=nn.initializer.Constant(0.0))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        ones = paddle.full(shape=[paddle.shape(x)[0], HIDDEN], fill_value=1.0)
        state = paddle.reshape(paddle.reshape(ones * self.zeros, [1, -1, HIDDEN]), [1, -1, HIDDEN])
        sequence, _ = self.lstm(x, (state, state))
        again, _ = self.lstm(x)
        return self.fc(sequence + again)


@pytest.mark.parametrize("states", ["zeros", "x2paddle"])
@pytest.mark.parametrize("runtime", ["paddle", "onnx"])
def test_an_lstm_called_with_zero_states_runs_int8(states: str, runtime: str, tmp_path, caplog) -> None:
    """Zero initial states (x2paddle passes them for every converted PyTorch LSTM) are where
    fusion_lstm starts anyway: the simulation and both exports run both calls int8 (they
    ran the first one fp32, as for any initial states; x2paddle's form of them: simulated
    int8, exported fp32, 4.9% off)."""
    paddle.seed(0)
    model = _StartsFromStates(0.0) if states == "zeros" else _X2PaddleStates()
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        quantized = _converted(model, time_major=False, target="x86")
        x = _batch(np.random.default_rng(6), 3, False)
        simulated = quantized(paddle.to_tensor(x)).numpy()
        if runtime == "paddle":
            save_quantized_model(quantized, str(tmp_path / "m"), _spec())
            report = int8_report(str(tmp_path / "m"))
            assert report.int8.get("fusion_lstm") == 2 and "rnn" not in report.fp32, report
            ran = predict(create_predictor(str(tmp_path / "m"), num_threads=1), x)[0]
        else:
            ran = _onnx_runtime_output(quantized, x, str(tmp_path / "m.onnx"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    _assert_same_up_to_rounding(ran, simulated)


def _onnx_runtime_output(quantized: nn.Layer, x: np.ndarray, path: str) -> np.ndarray:
    onnxruntime = pytest.importorskip("onnxruntime")
    from imperative_ptq.export import export_onnx

    session = onnxruntime.InferenceSession(export_onnx(quantized, path, _spec()), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("target, time_major, reads", [
    ("x86", False, "sequence"), ("x86", False, "final-hidden"), ("x86", False, "final-cell"),
    ("x86", True, "sequence"), ("x86-vnni", False, "sequence"),
])
def test_onnx_lstm_computes_the_int8_simulation(target, time_major, reads, tmp_path) -> None:
    """The input and every step's hidden state on the data grid, int8 weights per gate unit
    (a Scan over the steps). Measured, largest error of the logits against the simulation: 6.6%
    (the hidden sequence 3.4%) while ONNX ran the LSTM in fp32, 0 now; at another batch size
    and sequence length than the calibration's."""
    onnx = pytest.importorskip("onnx")
    paddle.seed(0)
    quantized = _converted(_Classifier(time_major, reads), time_major, target)
    x = np.ascontiguousarray(_batch(np.random.default_rng(5), 3, time_major)[:, :4] if not time_major
                             else _batch(np.random.default_rng(5), 3, time_major)[:4])
    path = str(tmp_path / "m.onnx")
    ran = _onnx_runtime_output(quantized, x, path)
    _assert_same_up_to_rounding(ran, quantized(paddle.to_tensor(x)).numpy())
    graph = onnx.load(path).graph
    assert "LSTM" not in {node.op_type for node in graph.node}
    int8 = [init for init in graph.initializer if init.data_type == onnx.TensorProto.INT8]
    assert sum(int(np.prod(init.dims)) for init in int8) >= 4 * HIDDEN * (FEATURES + HIDDEN)


def test_onnx_lstm_called_twice_computes_the_simulation(tmp_path) -> None:
    paddle.seed(0)
    quantized = _converted(_CalledTwice(), time_major=False, target="x86")
    x = _batch(np.random.default_rng(3), 3, False)
    ran = _onnx_runtime_output(quantized, x, str(tmp_path / "m.onnx"))
    _assert_same_up_to_rounding(ran, quantized(paddle.to_tensor(x)).numpy())


@pytest.mark.parametrize("start", [0.0, 0.5], ids=["zero-states", "states"])
def test_onnx_lstm_call_with_states_runs_fp32_as_simulated(start, tmp_path) -> None:
    """The call given initial states runs fp32 (the simulation's rule), the other int8."""
    paddle.seed(0)
    # x86: right on every CPU (an x86-vnni export would add a warning on a CPU without VNNI).
    quantized = _converted(_StartsFromStates(start), time_major=False, target="x86")
    x = _batch(np.random.default_rng(6), 3, False)
    ran = _onnx_runtime_output(quantized, x, str(tmp_path / "m.onnx"))
    _assert_same_up_to_rounding(ran, quantized(paddle.to_tensor(x)).numpy())


class _PaddedSequences(nn.Layer):
    """A two-layer ``cell`` (bidirectional or not) over padded sequences of given lengths,
    returning the Linear of its outputs and its final hidden states."""

    def __init__(self, cell: str, direction: str) -> None:
        super().__init__()
        self.rnn = getattr(nn, cell)(FEATURES, HIDDEN, num_layers=2, direction=direction)
        self.fc = nn.Linear(HIDDEN * (2 if direction == "bidirect" else 1), 4)

    def forward(self, x: paddle.Tensor, lengths: paddle.Tensor) -> list[paddle.Tensor]:
        sequence, states = self.rnn(x, sequence_length=lengths)
        return [self.fc(sequence), states[0] if isinstance(states, tuple) else states]


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "SimpleRNN"])
@pytest.mark.parametrize("direction", ["forward", "bidirect"])
def test_onnx_rnn_with_sequence_lengths_runs_as_simulated(cell, direction, tmp_path) -> None:
    """Paddle's lengths become ONNX's ``sequence_lens`` (the export refused them before): zero
    outputs past each length, final states from each row's last step, the reverse direction
    starting there. Measured 1e-7 .. 4e-7 of the largest value, every output."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from imperative_ptq.export import export_onnx

    paddle.seed(0)
    model = _PaddedSequences(cell, direction)
    model.eval()
    rng = np.random.default_rng(0)
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer(), target="x86"))
    quantized = ptq.quantize(model)
    for _ in range(2):
        quantized(paddle.to_tensor(_batch(rng, 4, False)), paddle.to_tensor(rng.integers(1, STEPS + 1, 4)))
    ptq.convert(quantized)
    x, lengths = _batch(rng, 4, False), np.array([STEPS, 1, 3, STEPS - 1], np.int64)
    simulated = [t.numpy() for t in quantized(paddle.to_tensor(x), paddle.to_tensor(lengths))]
    spec = [paddle.static.InputSpec([None, STEPS, FEATURES], "float32", "x"),
            paddle.static.InputSpec([None], "int64", "lengths")]
    path = export_onnx(quantized, str(tmp_path / "m.onnx"), spec)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    ran = session.run(None, {"x": x, "lengths": lengths})
    for got, expected in zip(ran, simulated, strict=True):
        _assert_same_up_to_rounding(got, expected)
    # The lengths matter: the same run over whole sequences differs.
    whole = session.run(None, {"x": x, "lengths": np.full(4, STEPS, np.int64)})
    assert np.abs(whole[1] - simulated[1]).max() > 0.01 * np.abs(simulated[1]).max()


def test_keep_fp32_puts_the_lstm_back(tmp_path) -> None:
    paddle.seed(0)
    model = _Classifier(False, "sequence")
    quantized = _converted(model, time_major=False)
    x = paddle.to_tensor(_batch(np.random.default_rng(4), 2, False))
    ip.ImperativePTQ().keep_fp32(quantized, ["lstm"], model)
    assert isinstance(quantized.lstm, nn.LSTM)
    np.testing.assert_array_equal(quantized.lstm(x)[0].numpy(), model.lstm(x)[0].numpy())
    save_quantized_model(quantized, str(tmp_path / "m"), _spec())
    assert int8_report(str(tmp_path / "m")).fp32.get("rnn") == 1


def test_lstm_thresholds_round_trip_through_the_calibration_table(tmp_path) -> None:
    paddle.seed(0)
    model = _Classifier(False, "sequence")
    model.eval()
    rng = np.random.default_rng(5)
    batches = [paddle.to_tensor(_batch(rng, 4, False)) for _ in range(3)]
    config = ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer(), target="x86")
    ptq = ip.ImperativePTQ(config)
    calibrated = ptq.quantize(model)
    for batch in batches:
        calibrated(batch)
    table = ptq.calibration_table(calibrated)
    assert len(table["lstm"]["weight"]) == 4 * HIDDEN  # one per gate unit of weight_ih_l0
    assert table["lstm"]["output"][0] <= 1.0  # the hidden sequence, |h| < 1
    ptq.save_calibration_table(calibrated, tmp_path / "table.json")
    ptq.convert(calibrated)

    loading = ip.ImperativePTQ(config)
    loaded = loading.quantize(model)
    loading.load_calibration_table(loaded, tmp_path / "table.json")
    loading.convert(loaded)
    assert loaded.lstm.data_threshold == calibrated.lstm.data_threshold
    assert calibrated.lstm.data_threshold == max(table["lstm"]["input"][0], table["lstm"]["output"][0])
    np.testing.assert_array_equal(loaded(batches[0]).numpy(), calibrated(batches[0]).numpy())
