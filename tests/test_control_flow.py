"""Loops and branches on tensors (dygraph-to-static ``while``, ``conditional_block`` and
``select_input``) export: Paddle Inference runs them, and ONNX Runtime runs them as ``Loop``
and ``If``, computing what the simulation does."""

from __future__ import annotations

import logging

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.export import create_predictor, export_onnx, predict

onnxruntime = pytest.importorskip("onnxruntime")
F = paddle.nn.functional


class _PoolWhileLarge(paddle.nn.Layer):
    """ESPNetV2-style: a feature map pooled while it is larger than 4 pixels (a loop whose
    trip count depends on the input size), then an int8 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.Conv2D(8, 4, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = F.relu(self.conv(x))
        while paddle.shape(y)[2] > 4:
            y = F.avg_pool2d(y, 2)
        return self.head(y)


class _StepPerFeature(paddle.nn.Layer):
    """A Linear applied once per input feature (a loop over a tensor's size), kept fp32."""

    def __init__(self) -> None:
        super().__init__()
        self.step, self.head = paddle.nn.Linear(8, 8), paddle.nn.Linear(8, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = x
        for _ in range(paddle.shape(x)[1]):
            h = F.relu(self.step(h)) * 0.5 + h * 0.5
        return self.head(h)


class _BranchOnMean(paddle.nn.Layer):
    """An ``if`` on a tensor's value: one branch a Linear (kept fp32), the other a scale."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.branch, self.head = (paddle.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = F.relu(self.first(x))
        if paddle.mean(h) > 0.3:
            h = F.relu(self.branch(h))
        else:
            h = h * 0.5
        return self.head(h)


def _converted(model: paddle.nn.Layer, batches: list[np.ndarray], fp32: list[str]) -> tuple:
    model.eval()
    ptq = ip.ImperativePTQ()
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, batches, progress=False)
    ptq.convert(qmodel)
    if fp32:
        ptq.keep_fp32(qmodel, fp32, model)
    return ptq, qmodel


def _assert_runtimes_run_it(ptq, qmodel, spec, inputs, tmp_path) -> None:
    ptq.save_quantized_model(qmodel, tmp_path / "m", spec)
    predictor = create_predictor(tmp_path / "m")
    path = export_onnx(qmodel, tmp_path / "m.onnx", spec)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for x in inputs:
        simulated = qmodel(paddle.to_tensor(x)).numpy()
        ran = {"Paddle Inference": predict(predictor, x)[0], "ONNX Runtime": session.run(None, {"x": x})[0]}
        for runtime, output in ran.items():
            assert output.shape == simulated.shape, runtime
            # Measured 8e-8 .. 4e-7.
            assert np.abs(output - simulated).max() <= 1e-5 * np.abs(simulated).max(), (runtime, x.shape)


def test_a_loop_whose_trip_count_depends_on_the_input_size(tmp_path) -> None:
    """ONNX refused the while op; now a Loop, pooling twice at 16x16 and three times at 32x32."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    ptq, qmodel = _converted(_PoolWhileLarge(), [rng.random((2, 3, 16, 16), np.float32) for _ in range(2)], [])
    spec = [paddle.static.InputSpec([None, 3, None, None], "float32", "x")]
    inputs = [rng.random((2, 3, 16, 16), np.float32), rng.random((1, 3, 32, 32), np.float32)]
    _assert_runtimes_run_it(ptq, qmodel, spec, inputs, tmp_path)


def test_a_loop_over_a_tensor_size_carries_its_values(tmp_path) -> None:
    """The loop carries the running value, the loop index and the condition; the index
    starts from a placeholder of another type, cast to the index's."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    ptq, qmodel = _converted(_StepPerFeature(), [rng.random((2, 8), np.float32) for _ in range(2)], ["step"])
    spec = [paddle.static.InputSpec([None, 8], "float32", "x")]
    _assert_runtimes_run_it(ptq, qmodel, spec, [rng.random((3, 8), np.float32)], tmp_path)


def test_both_branches_of_an_if_on_a_tensor(tmp_path) -> None:
    """ONNX refused conditional_block and select_input; now two Ifs and a pick."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [(rng.random((2, 8)) * scale).astype(np.float32) for scale in (0.1, 10.0)]  # both branches
    ptq, qmodel = _converted(_BranchOnMean(), batches, ["branch"])
    first = qmodel.first
    means = {}
    inputs = []
    for scale in (0.1, 3.0, 10.0):
        x = (rng.random((2, 8)) * scale).astype(np.float32)
        with paddle.no_grad():
            means[scale] = float(F.relu(first(paddle.to_tensor(x))).mean())
        inputs.append(x)
    assert min(means.values()) <= 0.3 < max(means.values()), means  # both branches taken
    spec = [paddle.static.InputSpec([None, 8], "float32", "x")]
    _assert_runtimes_run_it(ptq, qmodel, spec, inputs, tmp_path)


class _SteppedCells(paddle.nn.Layer):
    """Cells stepped through time by ``nn.BiRNN`` (GRU cells) or ``nn.RNN`` (an LSTM cell):
    a while loop over arrays of states and outputs, then an int8 Linear head."""

    def __init__(self, bidirectional: bool) -> None:
        super().__init__()
        if bidirectional:
            self.rnn = paddle.nn.BiRNN(paddle.nn.GRUCell(8, 8), paddle.nn.GRUCell(8, 8))
        else:
            self.rnn = paddle.nn.RNN(paddle.nn.LSTMCell(8, 16))
        self.head = paddle.nn.Linear(16, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        outputs, _ = self.rnn(x)
        return self.head(outputs)


@pytest.mark.parametrize("bidirectional", [True, False], ids=["BiRNN-GRUCell", "RNN-LSTMCell"])
def test_cells_stepped_through_time_export_to_both_runtimes(bidirectional, tmp_path) -> None:
    """ONNX refused write_to_array (Paddle's arrays are ONNX sequences now): Loop over
    SequenceInsert / SequenceAt, ConcatFromSequence after it, at any sequence length."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((2, 6, 8)).astype(np.float32) for _ in range(2)]
    ptq, qmodel = _converted(_SteppedCells(bidirectional), batches, [])
    assert isinstance(qmodel.head, ip.QuantizedLayer)
    spec = [paddle.static.InputSpec([None, None, 8], "float32", "x")]
    inputs = [rng.standard_normal((2, 6, 8)).astype(np.float32), rng.standard_normal((3, 9, 8)).astype(np.float32)]
    _assert_runtimes_run_it(ptq, qmodel, spec, inputs, tmp_path)


def test_a_layer_called_in_a_loop_on_a_tensor_is_named_with_the_fix(tmp_path, caplog) -> None:
    """Paddle Inference runs a while loop's body in fp32 (its int8 passes do not reach it):
    the simulated int8 Linear in it was 31% of the largest output off, under a warning that
    blamed a missing int8 kernel. The warning names the loop and keep_fp32, which makes the
    simulation match the runtime."""
    paddle.seed(0)
    model = _StepPerFeature()
    model.eval()
    rng = np.random.default_rng(0)
    ptq = ip.ImperativePTQ()
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, [rng.random((2, 8)).astype("float32") for _ in range(2)], progress=False)
    ptq.convert(qmodel)
    spec = [paddle.static.InputSpec([None, 8], "float32", "x")]
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        ptq.save_quantized_model(qmodel, tmp_path / "m", spec)
    assert "called inside a loop or branch on a tensor" in caplog.text
    assert "keep_fp32(qmodel, ['step'], model)" in caplog.text
    assert "no int8 kernel" not in caplog.text
    ptq.keep_fp32(qmodel, ["step"], model)
    ptq.save_quantized_model(qmodel, tmp_path / "kept", spec)
    x = rng.random((2, 8)).astype("float32")
    ran = predict(create_predictor(tmp_path / "kept"), x)[0]
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    assert np.abs(ran - simulated).max() <= 1e-5 * np.abs(simulated).max()
