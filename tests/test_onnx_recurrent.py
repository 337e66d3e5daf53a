"""ONNX GRU nodes (x2paddle 1.6.0 has no converter) and LSTM nodes (its converter lost the
states) load as ``paddle.nn.GRU`` / ``LSTM`` layers that compute ONNX Runtime's values: forward
and bidirectional, with and without bias and initial states, the sequence and the last states
read; the GRU's parameters are ONNX's gates reordered, checked against a GRU step written from
ONNX's formulas; classifiers reading the last state quantize and run their simulation in both
runtimes; what Paddle's layers do not compute is refused by name."""

from __future__ import annotations

import logging

import numpy as np
import paddle
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("x2paddle")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from imperative_ptq.onnx_recurrent import paddle_recurrent_parameters  # noqa: E402
from imperative_ptq.onnx_import import load_onnx_model  # noqa: E402

from onnx_blocks import assert_onnx_block_quantizes_and_runs_its_simulation  # noqa: E402

SEQUENCE, BATCH, INPUT, HIDDEN = 6, 2, 5, 4


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _onnx_gru_direction(x, weight, recurrent, bias, state) -> np.ndarray:
    """ONNX's GRU (``linear_before_reset=1``, gates z, r, h) over ``x`` ``[sequence, batch,
    input]``, one step at a time from the operator's formulas."""
    wz, wr, wh = np.split(weight, 3)
    rz, rr, rh = np.split(recurrent, 3)
    wbz, wbr, wbh, rbz, rbr, rbh = np.split(bias, 6)
    outputs = []
    for step in x:
        z = _sigmoid(step @ wz.T + state @ rz.T + wbz + rbz)
        r = _sigmoid(step @ wr.T + state @ rr.T + wbr + rbr)
        h = np.tanh(step @ wh.T + r * (state @ rh.T + rbh) + wbh)
        state = (1 - z) * h + z * state
        outputs.append(state)
    return np.stack(outputs)


def test_paddle_gru_parameters_compute_onnx_gru_formulas() -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal([1, 3 * HIDDEN, INPUT]).astype(np.float32)
    recurrent = rng.standard_normal([1, 3 * HIDDEN, HIDDEN]).astype(np.float32)
    bias = rng.standard_normal([1, 6 * HIDDEN]).astype(np.float32)
    x = rng.standard_normal([SEQUENCE, BATCH, INPUT]).astype(np.float32)
    state = rng.standard_normal([1, BATCH, HIDDEN]).astype(np.float32)
    gru = paddle.nn.GRU(INPUT, HIDDEN, time_major=True)
    (parameters,) = paddle_recurrent_parameters("GRU", weight, recurrent, bias)
    gru.set_state_dict({f"{name}_l0": paddle.to_tensor(value) for name, value in parameters.items()})
    with paddle.no_grad():
        y, last = gru(paddle.to_tensor(x), paddle.to_tensor(state))
    expected = _onnx_gru_direction(x, weight[0], recurrent[0], bias[0], state[0])
    np.testing.assert_allclose(y.numpy(), expected, rtol=0, atol=2e-6)
    np.testing.assert_allclose(last.numpy()[0], expected[-1], rtol=0, atol=2e-6)


def _saved(graph, path) -> str:
    """``graph`` saved at ``path`` as an opset-14 model."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


#: Gates and state outputs of each recurrent op.
GATES = {"GRU": 3, "LSTM": 4, "RNN": 1}
STATES = {"GRU": ("y_h",), "LSTM": ("y_h", "y_c"), "RNN": ("y_h",)}


def _recurrent_file(
    path, op_type: str = "GRU", direction: str = "forward", bias: bool = True, state: bool = True,
    outputs: tuple[str, ...] | None = None, **attributes,
) -> str:
    """One ONNX LSTM or GRU (PyTorch's ``linear_before_reset=1`` unless given) of a ``[6, 2, 5]``
    input, writing ``outputs`` (all by default; ``""`` leaves one out)."""
    rng = np.random.default_rng(1)
    directions, gates = (2 if direction == "bidirectional" else 1), GATES[op_type]
    outputs = ("y", *STATES[op_type]) if outputs is None else outputs
    initializers = [
        numpy_helper.from_array((rng.standard_normal([directions, gates * HIDDEN, INPUT]) / 2).astype(np.float32), "W"),
        numpy_helper.from_array((rng.standard_normal([directions, gates * HIDDEN, HIDDEN]) / 2).astype(np.float32), "R"),
    ]
    inputs = ["x", "W", "R", "", "", "", "", ""]
    if bias:
        initializers.append(numpy_helper.from_array(rng.standard_normal([directions, 2 * gates * HIDDEN]).astype(np.float32), "B"))
        inputs[3] = "B"
    for position, name in zip((5, 6), STATES[op_type] if state else ()):
        initializers.append(numpy_helper.from_array(rng.standard_normal([directions, BATCH, HIDDEN]).astype(np.float32), f"{name}0"))
        inputs[position] = f"{name}0"
    if attributes.pop("peepholes", False):
        initializers.append(numpy_helper.from_array(rng.standard_normal([directions, 3 * HIDDEN]).astype(np.float32), "P"))
        inputs[7] = "P"
    while not inputs[-1]:
        inputs.pop()
    if op_type == "GRU":
        attributes = {"linear_before_reset": 1} | attributes
    node = helper.make_node(op_type, inputs, list(outputs), name="rnn", hidden_size=HIDDEN, direction=direction, **attributes)
    shapes = {"y": [SEQUENCE, directions, BATCH, HIDDEN]} | {name: [directions, BATCH, HIDDEN] for name in STATES[op_type]}
    graph = helper.make_graph(
        [node], "rnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SEQUENCE, BATCH, INPUT])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shapes[name]) for name in outputs if name], initializers,
    )
    return _saved(graph, path)


@pytest.mark.parametrize("op_type", ["GRU", "LSTM", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
@pytest.mark.parametrize("bias,state", [(True, True), (False, False)], ids=["given", "left-out"])
@pytest.mark.parametrize("written", ["all", "states", "sequence"])
def test_a_recurrent_node_loads_and_computes_onnx_runtimes_values(
    tmp_path, op_type: str, direction: str, bias: bool, state: bool, written: str
) -> None:
    outputs = {"all": None, "states": ("", *STATES[op_type]), "sequence": ("y",)}[written]
    path = _recurrent_file(tmp_path / "rnn.onnx", op_type, direction, bias, state, outputs)
    model = load_onnx_model(path, tmp_path / "converted", {"x": [SEQUENCE, BATCH, INPUT]})
    assert any(type(layer).__name__ == {"RNN": "SimpleRNN"}.get(op_type, op_type) for layer in model.sublayers())
    x = np.random.default_rng(2).standard_normal([SEQUENCE, BATCH, INPUT]).astype(np.float32)
    expected = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    with paddle.no_grad():
        computed = model(paddle.to_tensor(x))
    computed = computed if isinstance(computed, (list, tuple)) else [computed]
    assert len(computed) == len(expected)
    for ours, theirs in zip(computed, expected):
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=2e-6)


@pytest.mark.parametrize("op_type,attributes,reason", [
    ("GRU", {"linear_before_reset": 0}, r"linear_before_reset=0"),
    ("GRU", {"direction": "reverse"}, r"direction 'reverse'"),
    ("GRU", {"clip": 3.0}, r"clip=3"),
    ("GRU", {"layout": 1}, r"layout=1"),
    ("GRU", {"activations": ["Sigmoid", "Relu"]}, r"activations \['Sigmoid', 'Relu'\]"),
    ("LSTM", {"input_forget": 1}, r"input_forget=1"),
    ("LSTM", {"peepholes": True}, r"peepholes"),
    ("LSTM", {"direction": "reverse"}, r"direction 'reverse'"),
    ("RNN", {"activations": ["Relu", "Tanh"], "direction": "bidirectional"}, r"activations \['Relu', 'Tanh'\]"),
    ("RNN", {"activations": ["Sigmoid"]}, r"activations \['Sigmoid'\]"),
])
def test_a_recurrent_node_paddle_does_not_compute_is_refused_by_name(tmp_path, op_type: str, attributes: dict, reason: str) -> None:
    path = _recurrent_file(tmp_path / "rnn.onnx", op_type, **attributes)
    with pytest.raises(ValueError, match=rf"recurrent nodes that paddle.nn.LSTM/GRU do not compute: {op_type} 'rnn' \(.*{reason}"):
        load_onnx_model(path, tmp_path / "converted", {"x": [SEQUENCE, BATCH, INPUT]})
    assert not (tmp_path / "converted").exists()


def _recurrent_classifier(path, op_type: str) -> str:
    """A batch-first recurrent classifier as PyTorch exports one: ``x [batch, 6, 5]`` transposed
    to time-major, a GRU's last state (an LSTM's last hidden plus cell state), a Linear head."""
    rng = np.random.default_rng(3)
    gates = {"GRU": 3, "LSTM": 4}[op_type]
    states = ["state"] if op_type == "GRU" else ["state", "cell"]
    attributes = {"linear_before_reset": 1} if op_type == "GRU" else {}
    nodes = [
        helper.make_node("Transpose", ["x"], ["time_major"], perm=[1, 0, 2]),
        helper.make_node(op_type, ["time_major", "W", "R", "B"], ["", *states], hidden_size=8, **attributes),
        helper.make_node("Add", states, ["summed"]) if op_type == "LSTM" else helper.make_node("Identity", states, ["summed"]),
        helper.make_node("Squeeze", ["summed", "first"], ["features"]),
        helper.make_node("MatMul", ["features", "head"], ["y"]),
    ]
    initializers = [
        numpy_helper.from_array((rng.standard_normal([1, gates * 8, INPUT]) / 2).astype(np.float32), "W"),
        numpy_helper.from_array((rng.standard_normal([1, gates * 8, 8]) / 3).astype(np.float32), "R"),
        numpy_helper.from_array((rng.standard_normal([1, gates * 16]) / 4).astype(np.float32), "B"),
        numpy_helper.from_array(np.array([0], np.int64), "first"),
        numpy_helper.from_array((rng.standard_normal([8, 3]) / 3).astype(np.float32), "head"),
    ]
    graph = helper.make_graph(
        nodes, "recurrent_classifier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQUENCE, INPUT])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], initializers,
    )
    return _saved(graph, path)


@pytest.mark.parametrize("op_type", ["GRU", "LSTM"])
def test_a_classifier_reading_the_states_loads_quantizes_and_runs_its_simulation(tmp_path, op_type: str) -> None:
    """A node reading a recurrent node's state (not its sequence) failed in x2paddle: it reads
    ``<first output>_p1``, which x2paddle's LSTM converter never wrote. The head is calibrated
    and converted, and the LSTM too (Paddle Inference's int8 ``fusion_lstm``; its int8 GRU
    computes another variant, so the GRU stays fp32); both runtimes compute the simulation."""
    path = _recurrent_classifier(tmp_path / "classifier.onnx", op_type)
    quantized = assert_onnx_block_quantizes_and_runs_its_simulation(path, [1, SEQUENCE, INPUT], 1, tmp_path)
    recurrent = {type(layer).__name__ for layer in quantized.sublayers()} & {"QuantizedLSTM", "LSTM", "GRU"}
    assert recurrent == ({"QuantizedLSTM", "LSTM"} if op_type == "LSTM" else {"GRU"}), recurrent


@pytest.mark.parametrize("op_type", ["GRU", "LSTM"])
def test_weights_computed_from_constants_and_zero_states_load_for_any_batch(tmp_path, op_type: str) -> None:
    """PyTorch's default exporter computes a layer's ``W`` from its parameter (``Slice`` and
    ``Concat`` of gate blocks, ``Unsqueeze``) and writes the states of an ``nn.GRU``/``LSTM``
    called without them as zeros of the example's batch: the converter read no constant
    ``W`` ("its W, R and B must be constants"), and zeros of batch 1 fixed the batch."""
    rng = np.random.default_rng(4)
    gates = GATES[op_type]
    raw = (rng.standard_normal([gates * HIDDEN, INPUT]) / 2).astype(np.float32)
    ints = lambda name, values: numpy_helper.from_array(np.array(values, np.int64), name)  # noqa: E731
    states = [f"{name}0" for name in STATES[op_type]]
    nodes = [
        helper.make_node("Transpose", ["x"], ["time_major"], perm=[1, 0, 2]),
        helper.make_node("Slice", ["raw", "start", "middle", "axis"], ["first_gate"]),
        helper.make_node("Slice", ["raw", "middle", "end", "axis"], ["other_gates"]),
        helper.make_node("Concat", ["first_gate", "other_gates"], ["joined"], axis=0),
        helper.make_node("Unsqueeze", ["joined", "axis"], ["W"]),
        helper.make_node(
            op_type, ["time_major", "W", "R", "B", "", *states], ["sequence", "state", *(["cell"] if op_type == "LSTM" else [])],
            hidden_size=HIDDEN, **({"linear_before_reset": 1} if op_type == "GRU" else {}),
        ),
        helper.make_node("Squeeze", ["state", "axis"], ["y"]),
    ]
    initializers = [
        numpy_helper.from_array(raw, "raw"), ints("start", [0]), ints("middle", [HIDDEN]), ints("end", [gates * HIDDEN]),
        ints("axis", [0]),
        numpy_helper.from_array((rng.standard_normal([1, gates * HIDDEN, HIDDEN]) / 2).astype(np.float32), "R"),
        numpy_helper.from_array(rng.standard_normal([1, 2 * gates * HIDDEN]).astype(np.float32), "B"),
        *[numpy_helper.from_array(np.zeros([1, 1, HIDDEN], np.float32), state) for state in states],
    ]
    graph = helper.make_graph(
        nodes, "exported", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQUENCE, INPUT])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, HIDDEN])], initializers,
    )
    path = _saved(graph, tmp_path / "exported.onnx")
    model = load_onnx_model(path, tmp_path / "converted", {"x": [1, SEQUENCE, INPUT]}, dynamic_batch=True)
    x = np.random.default_rng(5).standard_normal([3, SEQUENCE, INPUT]).astype(np.float32)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    expected = np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    with paddle.no_grad():
        np.testing.assert_allclose(model(paddle.to_tensor(x)).numpy(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_a_relu_rnn_loads_as_a_relu_simple_rnn(tmp_path, direction: str) -> None:
    """``nn.RNN(nonlinearity="relu")`` exports an ONNX ``RNN`` with ``Relu`` activations:
    Paddle's ``SimpleRNN(activation="relu")``."""
    activations = ["Relu"] * (2 if direction == "bidirectional" else 1)
    path = _recurrent_file(tmp_path / "rnn.onnx", "RNN", direction, activations=activations)
    model = load_onnx_model(path, tmp_path / "converted", {"x": [SEQUENCE, BATCH, INPUT]})
    x = np.random.default_rng(2).standard_normal([SEQUENCE, BATCH, INPUT]).astype(np.float32)
    expected = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    with paddle.no_grad():
        computed = model(paddle.to_tensor(x))
    for ours, theirs in zip(computed, expected):
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=2e-6)


@pytest.mark.parametrize("op_type", ["RNN", "GRU", "LSTM"])
def test_torchscript_exports_with_an_open_batch_load_for_any_batch(tmp_path, caplog, op_type: str) -> None:
    """PyTorch's TorchScript exporter with an open batch (``dynamic_axes``) writes the final
    state ``[directions, batch, hidden]`` with its batch on axis 1 (the batch check joined
    every output on axis 0 and refused the file: "output 1 is 0.06 off the samples' own"; a
    load without ``dynamic_batch`` warned that the model computes batch 1 only), the
    initial states as zeros of a shape computed from the input's batch, and, with
    ``fold_shapes``, ONNX Runtime's MatMul + Add fusion wrote the head over the sequence as a
    Gemm between reshapes to ``[batch * sequence, features]``, which fixed the batch."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)

    class Tagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.recurrent = getattr(torch.nn, op_type)(INPUT, HIDDEN, batch_first=True)
            self.head = torch.nn.Linear(HIDDEN, 3)

        def forward(self, x):
            sequence, state = self.recurrent(x)
            return self.head(sequence), state[0] if op_type == "LSTM" else state

    path = str(tmp_path / "tagger.onnx")
    torch.onnx.export(
        Tagger().eval(), (torch.randn(1, SEQUENCE, INPUT),), path, input_names=["x"], output_names=["y", "h"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}, "h": {1: "batch"}}, opset_version=14, dynamo=False,
    )
    x = np.random.default_rng(6).standard_normal([3, SEQUENCE, INPUT]).astype(np.float32)
    expected = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for dynamic_batch, fold_shapes in ((False, False), (True, False), (True, True)):
        with caplog.at_level(logging.WARNING, logger="imperative_ptq.onnx_import"):
            model = load_onnx_model(
                path, tmp_path / f"{dynamic_batch}_{fold_shapes}", {"x": [1, SEQUENCE, INPUT]},
                dynamic_batch=dynamic_batch, fold_shapes=fold_shapes,
            )
        assert "batch 1 only" not in caplog.text
        with paddle.no_grad():
            computed = model(paddle.to_tensor(x))
        assert len(computed) == 2
        for ours, theirs in zip(computed, expected):
            np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=2e-6)


@pytest.mark.parametrize("fill, left_out", [(None, True), (0.0, True), (1.0, False)])
def test_zeros_of_a_computed_shape_are_a_left_out_state(fill: float | None, left_out: bool) -> None:
    """An initial state computed as ``ConstantOfShape`` of the input's batch is left out (Paddle's
    zeros of the input's batch) where it is zeros (its value omitted or 0), and kept otherwise."""
    from imperative_ptq.onnx_recurrent import recurrent_inputs_folded

    value = {} if fill is None else {"value": numpy_helper.from_array(np.array([fill], np.float32))}
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], start=1, end=2),
        helper.make_node("Concat", ["one", "shape", "hidden"], ["state_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["state_shape"], ["state"], **value),
        helper.make_node("GRU", ["x", "W", "R", "", "", "state"], ["y"], hidden_size=HIDDEN, linear_before_reset=1),
    ]
    initializers = [
        numpy_helper.from_array(np.array([1], np.int64), "one"), numpy_helper.from_array(np.array([HIDDEN], np.int64), "hidden"),
        numpy_helper.from_array(np.ones([1, 3 * HIDDEN, INPUT], np.float32), "W"),
        numpy_helper.from_array(np.ones([1, 3 * HIDDEN, HIDDEN], np.float32), "R"),
    ]
    graph = helper.make_graph(
        nodes, "zero_state", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SEQUENCE, "batch", INPUT])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    assert recurrent_inputs_folded(model) == int(left_out)
    recurrent = next(node for node in model.graph.node if node.op_type == "GRU")
    assert list(recurrent.input) == (["x", "W", "R"] if left_out else ["x", "W", "R", "", "", "state"])
    assert [node.op_type for node in model.graph.node] == (["GRU"] if left_out else ["Shape", "Concat", "ConstantOfShape", "GRU"])
