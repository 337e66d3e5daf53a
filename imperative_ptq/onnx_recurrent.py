"""ONNX ``LSTM``, ``GRU`` and ``RNN`` nodes as ``paddle.nn.LSTM`` / ``GRU`` / ``SimpleRNN``
layers: the converters x2paddle 1.6.0 lacks (``GRU``, ``RNN``) or writes wrongly (``LSTM``).

x2paddle has no ``GRU`` or ``RNN`` ("Model is not supported yet": every ``nn.GRU`` and
``nn.RNN`` exported from PyTorch failed to load). Its ``LSTM`` named the states wrongly: it
names a node after its first output, and a node reading another output reads ``<that
name>_p<index>``, which its converter never wrote (a model reading an LSTM's last hidden or cell state, a classifier's ``h_n``, failed:
"Couldn't find ..._p1 in previous layers"); and it needs the initial states, whose reshape to
their shape at conversion fixed the batch. :func:`convert_recurrent` writes the three ops: the gates
reordered from ONNX's (LSTM input, output, forget, cell; GRU update, reset, hidden) to Paddle's
(input, forget, cell, output; reset, update, candidate), a zero bias where the node has none,
no initial states where it has none (Paddle's zeros of the input's batch), the ``[sequence,
batch, directions * hidden]`` output as ONNX's ``[sequence, directions, batch, hidden]``, and
each state also under the name its readers use. Paddle's GRU is ONNX's with
``linear_before_reset=1`` (the reset gate applied to the recurrent product plus its bias),
which PyTorch exports; its ``SimpleRNN`` is ONNX's ``RNN`` with ``Tanh`` or ``Relu``.

:func:`recurrents_checked` refuses, by name, what Paddle's layers do not compute:
``linear_before_reset=0``, an LSTM's ``input_forget`` or peepholes, a ``reverse`` direction,
``sequence_lens``, other activations, a ``clip``, the batch-major ``layout=1``.
:func:`recurrent_converters_installed` installs the converter on x2paddle's op mapper while a
file converts.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

from .onnx_opsets import attribute_text, computed_constant, input_folded, unread_nodes_dropped

__all__ = [
    "convert_recurrent", "paddle_recurrent_parameters", "recurrent_converters_installed", "recurrent_inputs_folded",
    "recurrents_checked",
]

#: Paddle's gate order as positions of ONNX's gates (LSTM: i, o, f, c -> i, f, c, o; GRU:
#: z, r, h -> r, z, c).
_PADDLE_GATE_ORDER = {"LSTM": (0, 2, 3, 1), "GRU": (1, 0, 2), "RNN": (0,)}
#: ONNX's default activations of one direction (Paddle's, which takes no others; an RNN's may
#: also be ``relu``, Paddle's ``SimpleRNN(activation="relu")``).
_DEFAULT_ACTIVATIONS = {"LSTM": ("sigmoid", "tanh", "tanh"), "GRU": ("sigmoid", "tanh"), "RNN": ("tanh",)}
#: Paddle's layer of each ONNX op.
_PADDLE_LAYERS = {"LSTM": "paddle.nn.LSTM", "GRU": "paddle.nn.GRU", "RNN": "paddle.nn.SimpleRNN"}
#: Positions of the initial states among the node's inputs, and of ``sequence_lens``.
_STATE_INPUTS = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}
_SEQUENCE_LENGTHS = 4
_LSTM_PEEPHOLES = 7


def recurrents_checked(model, onnx_path: str) -> None:
    """Raises a ``ValueError`` naming each ``LSTM`` / ``GRU`` node of ``model`` that Paddle's
    layers do not compute (see the module's docstring)."""
    from onnx import helper

    refused = []
    for node in model.graph.node:
        if node.op_type not in _PADDLE_GATE_ORDER:
            continue
        attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
        direction = attribute_text(attributes.get("direction", b"forward"))
        activations = [attribute_text(name) for name in attributes.get("activations", [])]
        defaults = _DEFAULT_ACTIVATIONS[node.op_type] * 2
        given = lambda position: len(node.input) > position and bool(node.input[position])  # noqa: E731
        reasons = [
            *(["linear_before_reset=0 (Paddle's GRU is 1)"]
              if node.op_type == "GRU" and not attributes.get("linear_before_reset", 0) else []),
            *(["input_forget=1"] if attributes.get("input_forget", 0) else []),
            *(["peepholes"] if node.op_type == "LSTM" and given(_LSTM_PEEPHOLES) else []),
            *([f"direction {direction!r}"] if direction not in ("forward", "bidirectional") else []),
            *(["sequence_lens"] if given(_SEQUENCE_LENGTHS) else []),
            *([f"activations {activations}"]
              if [name.lower() for name in activations] != list(defaults[:len(activations)])
              and not (node.op_type == "RNN" and {name.lower() for name in activations} == {"relu"}) else []),
            *([f"clip={attributes['clip']:g}"] if "clip" in attributes else []),
            *(["layout=1 (batch first)"] if attributes.get("layout", 0) else []),
        ]
        if reasons:
            refused.append(f"{node.op_type} {node.name or node.output[0]!r} ({', '.join(reasons)})")
    if refused:
        raise ValueError(
            f"{onnx_path} has recurrent nodes that paddle.nn.LSTM/GRU do not compute: {'; '.join(refused[:8])}; "
            "they compute forward and bidirectional LSTMs and GRUs with linear_before_reset=1 (PyTorch's export)"
        )


def recurrent_inputs_folded(model) -> int:
    """Rewrites, in place, the constant inputs of each ``LSTM`` / ``GRU`` node as the converters
    read them: a ``W``, ``R`` or ``B`` computed from constants only (PyTorch's default exporter
    reorders a bidirectional layer's input weights with ``Slice``/``Concat``/``Unsqueeze`` of
    the initializers) becomes an initializer of its value (computed by ONNX's reference
    evaluator), and an initial state of zeros (an ``nn.LSTM``/``GRU`` called without one:
    constant zeros of the example's batch, or zeros of a shape computed from the input's
    batch) is left out, so Paddle's own zeros follow the input's batch. The nodes that
    computed them are dropped where nothing else reads them.

    Returns:
        The number of inputs rewritten.
    """
    constants = {initializer.name: initializer for initializer in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    rewritten = 0
    for node in model.graph.node:
        if node.op_type not in _PADDLE_GATE_ORDER:
            continue
        rewritten += sum(input_folded(model, node, position, constants, producers) for position in (1, 2, 3))
        for position in _STATE_INPUTS[node.op_type]:
            name = node.input[position] if position < len(node.input) else ""
            if not name:
                continue
            if _zeros(model, name, constants, producers):
                node.input[position] = ""
                rewritten += 1
        while node.input and not node.input[-1]:
            del node.input[-1]
    if rewritten:
        unread_nodes_dropped(model)
    return rewritten


def _zeros(model, name: str, constants: dict, producers: dict) -> bool:
    """Whether the tensor ``name`` is all zeros whatever the input: constant zeros, or a
    ``ConstantOfShape`` of zero or an ``Expand`` of zeros to a shape computed from the input
    (PyTorch's TorchScript exporter writes a recurrent layer's missing initial state as zeros
    of the input's batch)."""
    from onnx import numpy_helper

    node = producers.get(name)
    if node is not None and node.op_type == "ConstantOfShape":
        fill = next((attribute.t for attribute in node.attribute if attribute.name == "value"), None)
        return fill is None or not np.any(numpy_helper.to_array(fill))
    if node is not None and node.op_type == "Expand":
        return _zeros(model, node.input[0], constants, producers)
    value = numpy_helper.to_array(constants[name]) if name in constants else computed_constant(model, name, producers)
    return value is not None and not np.any(value)


def paddle_recurrent_parameters(
    op_type: str, weight: np.ndarray, recurrent: np.ndarray, bias: np.ndarray | None
) -> list[dict[str, np.ndarray]]:
    """The parameters (``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``) of each direction
    of ``paddle.nn.LSTM`` / ``GRU`` computing an ONNX ``LSTM`` / ``GRU``.

    Args:
        op_type: ``"LSTM"`` or ``"GRU"``.
        weight: ONNX's ``W``, ``[directions, gates * hidden, input]``.
        recurrent: ONNX's ``R``, ``[directions, gates * hidden, hidden]``.
        bias: ONNX's ``B``, ``[directions, 2 * gates * hidden]`` (``W``'s biases, then ``R``'s);
            ``None`` for zeros.
    """
    order = list(_PADDLE_GATE_ORDER[op_type])
    rows = weight.shape[1]
    if bias is None:
        bias = np.zeros([weight.shape[0], 2 * rows], weight.dtype)

    def reordered(value: np.ndarray) -> np.ndarray:
        gates = value.reshape(len(order), rows // len(order), *value.shape[1:])
        return np.ascontiguousarray(gates[order].reshape(value.shape))

    return [
        {
            "weight_ih": reordered(weight[direction]), "weight_hh": reordered(recurrent[direction]),
            "bias_ih": reordered(bias[direction, :rows]), "bias_hh": reordered(bias[direction, rows:]),
        }
        for direction in range(weight.shape[0])
    ]


def convert_recurrent(opset, node) -> None:
    """x2paddle's conversion of one ONNX ``LSTM`` or ``GRU`` node (a method of its op mapper's
    ``OpSet``, see the module's docstring); :func:`recurrents_checked` has refused what it
    does not compute."""
    from x2paddle.core.util import name_generator, string
    from x2paddle.op_mapper.onnx2paddle.opset_legacy import _const_weight_or_none, _rename_or_remove_weight

    op_type = node.layer_type
    present = [position for position, name in enumerate(node.layer.input) if name]
    inputs = {position: opset.graph.get_input_node(node, idx=index, copy=True) for index, position in enumerate(present)}
    constants = {position: _const_weight_or_none(inputs[position]) for position in (1, 2, 3) if position in inputs}
    if constants.get(1) is None or constants.get(2) is None or (3 in inputs and constants[3] is None):
        raise ValueError(f"{op_type} {node.layer_name!r}: its W, R and B must be constants")
    for position in constants:
        _rename_or_remove_weight(opset.weights, inputs[position].name)
    weight, recurrent = constants[1], constants[2]
    layer_name = name_generator(op_type.lower(), opset.nn_name2id)
    for direction, parameters in enumerate(paddle_recurrent_parameters(op_type, weight, recurrent, constants.get(3))):
        for name, value in parameters.items():
            opset.weights[f"{layer_name}.{name}_l0{'_reverse' if direction else ''}"] = value
    layer_inputs = {"input": inputs[0].name}
    given_states = [inputs[position].name if position in inputs else None for position in _STATE_INPUTS[op_type]]
    if any(given_states):  # (Paddle takes all states or none: a left-out one is zeros)
        states = [state or f"{layer_name}_zero_state{index}" for index, state in enumerate(given_states)]
        for index, state in enumerate(given_states):
            if state is None:
                reference = next(name for name in given_states if name)
                opset.paddle_graph.add_layer("paddle.zeros_like", inputs={"x": reference}, outputs=[states[index]])
        layer_inputs["initial_states"] = tuple(states) if op_type == "LSTM" else states[0]
    hidden = weight.shape[1] // len(_PADDLE_GATE_ORDER[op_type])
    outputs = [node.output(index) for index in range(1 + len(_STATE_INPUTS[op_type]))]
    activations = [attribute_text(name).lower() for name in node.get_attr("activations", [])]
    layer_attributes = {"activation": string("relu")} if op_type == "RNN" and "relu" in activations else {}
    opset.paddle_graph.add_layer(
        _PADDLE_LAYERS[op_type], inputs=layer_inputs, outputs=[layer_name, *outputs], input_size=weight.shape[2],
        hidden_size=hidden, num_layers=1, direction=string(attribute_text(node.get_attr("direction", "forward"))),
        time_major=True, **layer_attributes,
    )
    sequence = outputs[0]
    # Paddle's [sequence, batch, directions * hidden] as ONNX's [sequence, directions, batch, hidden].
    opset.paddle_graph.add_layer("paddle.reshape", inputs={"x": sequence}, outputs=[sequence], shape=[0, 0, -1, hidden])
    opset.paddle_graph.add_layer("paddle.transpose", inputs={"x": sequence}, outputs=[sequence], perm=[0, 2, 1, 3])
    # x2paddle names a node after its first output, and a node reading another output reads
    # "<that name>_p<index>" (a graph output keeps its own name): each state under both.
    for index, state in enumerate(outputs[1:], start=1):
        opset.paddle_graph.add_layer("paddle.assign", inputs={"x": state}, outputs=[f"{node.layer_name}_p{index}"])


@contextlib.contextmanager
def recurrent_converters_installed() -> Iterator[None]:
    """x2paddle's op mapper with :func:`convert_recurrent` as its ``LSTM`` and ``GRU``
    converter, for the block."""
    from x2paddle.op_mapper.onnx2paddle.opset_legacy import OpSet

    originals = {name: vars(OpSet)[name] for name in _PADDLE_GATE_ORDER if name in vars(OpSet)}
    for name in _PADDLE_GATE_ORDER:
        setattr(OpSet, name, convert_recurrent)
    try:
        yield
    finally:
        for name in _PADDLE_GATE_ORDER:
            if name in originals:
                setattr(OpSet, name, originals[name])
            else:
                delattr(OpSet, name)
