"""ONNX Einsum nodes (which x2paddle cannot convert) written as MatMul products: every kind of
index (batch, contracted, free on one side, summed on one side, ``...``, implicit output,
three operands, a weight operand) computes numpy's einsum in ONNX Runtime; an attention block
of Einsums loads, computes ONNX Runtime's values, quantizes its weight products as matmuls by
parameters and runs its simulation in both runtimes; traces and diagonals are refused by name."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from imperative_ptq.onnx_einsum import einsums_as_matmuls, parsed_equation  # noqa: E402

from onnx_blocks import assert_onnx_block_quantizes_and_runs_its_simulation  # noqa: E402

#: Equations and operand shapes: attention scores and values, Funnel's relative attention
#: (a batch index and a contracted one on a weight), two contracted indices, outer products,
#: sums over an index of one operand, "...", implicit outputs, three operands, a scalar.
EQUATIONS = [
    ("bhid,bhjd->bhij", [(2, 3, 4, 5), (2, 3, 6, 5)]),
    ("bhij,bhjd->bhid", [(2, 3, 4, 6), (2, 3, 6, 5)]),
    ("bind,bjnd->bnij", [(2, 4, 3, 5), (2, 6, 3, 5)]),
    ("binh,dnh->bind", [(2, 4, 3, 5), (7, 3, 5)]),
    ("abcd,cdef->abef", [(2, 3, 4, 5), (4, 5, 6, 7)]),
    ("abc,cb->a", [(2, 3, 4), (4, 3)]),
    ("i,j->ij", [(3,), (4,)]),
    ("ab,cd->abcd", [(2, 3), (4, 5)]),
    ("bij->bj", [(2, 3, 4)]),
    ("ij->ji", [(3, 4)]),
    ("ij,kj->", [(3, 4), (5, 4)]),
    ("...ij,...jk->...ik", [(2, 3, 4, 5), (3, 5, 6)]),
    ("ij,jk", [(3, 4), (4, 5)]),
    ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)]),
    ("bij,bkj->bki", [(2, 3, 4), (2, 5, 4)]),
    ("nctw,cd->ndtw", [(2, 3, 4, 5), (3, 6)]),
    ("xay,yaz->axz", [(2, 3, 4), (4, 3, 5)]),
]


def _einsum_model(equation: str, shapes: list[tuple[int, ...]], opset: int, weight: np.ndarray | None):
    """One Einsum of inputs ``x0, x1, ...`` (``x1`` an initializer of ``weight`` if given)."""
    names = [f"x{position}" for position in range(len(shapes))]
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))
        for name, shape in zip(names, shapes) if weight is None or name != "x1"
    ]
    initializers = [] if weight is None else [numpy_helper.from_array(weight, "x1")]
    out_shape = list(np.einsum(equation, *[np.zeros(shape) for shape in shapes]).shape)
    graph = helper.make_graph(
        [helper.make_node("Einsum", names, ["y"], equation=equation, name="einsum")], "einsum", inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("opset", [12, 15])
@pytest.mark.parametrize("equation,shapes", EQUATIONS, ids=[equation for equation, _ in EQUATIONS])
def test_an_einsum_written_as_matmuls_computes_numpys_einsum(equation: str, shapes, opset: int) -> None:
    """The rewritten model, with the second operand an input and then a weight, computes
    ``np.einsum`` in ONNX Runtime with no Einsum left (opset 12: axes as attributes)."""
    rng = np.random.default_rng(0)
    operands = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    expected = np.einsum(equation, *operands)
    for weight in ([None, operands[1]] if len(shapes) > 1 else [None]):
        model = _einsum_model(equation, shapes, opset, weight)
        assert einsums_as_matmuls(model) == 1
        onnx.checker.check_model(model, full_check=True)
        assert "Einsum" not in {node.op_type for node in model.graph.node}
        if weight is not None:  # the weight's transposes are folded into a new parameter
            assert {node.op_type for node in model.graph.node} <= {"MatMul", "Transpose", "Reshape", "Unsqueeze", "Squeeze", "ReduceSum"}
            assert not any(node.input[0] == "x1" and node.op_type != "MatMul" for node in model.graph.node)
        feeds = {f"x{position}": operand for position, operand in enumerate(operands) if weight is None or position != 1}
        ran = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        assert ran.shape == expected.shape
        np.testing.assert_allclose(ran, expected, rtol=1e-5, atol=1e-5)


def test_equations_are_parsed_as_numpy_reads_them() -> None:
    """``...`` becomes unused letters aligned from the right; an implicit output is the
    ellipsis then the letters used once, sorted."""
    letters, output = parsed_equation("...ij,jk", [4, 2])
    assert letters[1] == "jk" and letters[0].endswith("ij") and len(letters[0]) == 4
    assert output == letters[0][:2] + "ik"
    assert parsed_equation("ba,ca", [2, 2]) == (["ba", "ca"], "bc")
    with pytest.raises(ValueError, match="rank of the operand '...ij' is unknown"):
        parsed_equation("...ij->ij", [None])
    with pytest.raises(ValueError, match="2 operands, the node 1 inputs"):
        parsed_equation("ij,jk->ik", [2])
    with pytest.raises(ValueError, match="indexes 2 axes of a rank-3 input"):
        parsed_equation("ij->ji", [3])


@pytest.mark.parametrize("equation", ["ii->i", "ii->", "ij,jj->i"])
def test_a_trace_or_diagonal_is_refused_by_name(equation: str) -> None:
    shapes = [(3, 3)] * equation.split("->")[0].count(",") + [(3, 3)]
    model = _einsum_model(equation, shapes, 13, None)
    with pytest.raises(ValueError, match=r"Einsum 'einsum' \(index repeated in '(ii|jj)'"):
        einsums_as_matmuls(model)


def _einsum_attention(path) -> str:
    """An attention block written with Einsums, as PyTorch exports ``torch.einsum``: projections
    by ``[in, out]`` weights (``bic,cd->bid``; the queries' scaled by ``1 / sqrt(d)``), scores
    and values, and an output projection contracting two indices (``binh,nhd->bid``)."""
    rng = np.random.default_rng(0)
    def weight(name: str, shape: tuple[int, ...], scale: float = 1.0) -> TensorProto:
        fan_in = np.prod(shape) / shape[-1]
        return numpy_helper.from_array((rng.standard_normal(shape) * scale / np.sqrt(fan_in)).astype(np.float32), name)

    nodes = [
        helper.make_node("Einsum", ["x", "wq"], ["q"], equation="bic,cd->bid"),
        helper.make_node("Einsum", ["x", "wk"], ["k"], equation="bic,cd->bid"),
        helper.make_node("Einsum", ["x", "wv"], ["v"], equation="bic,cd->bid"),
        helper.make_node("Einsum", ["q", "k"], ["scores"], equation="bid,bjd->bij"),
        helper.make_node("Softmax", ["scores"], ["probabilities"], axis=-1),
        helper.make_node("Einsum", ["probabilities", "v"], ["mixed"], equation="bij,bjd->bid"),
        helper.make_node("Reshape", ["mixed", "heads_shape"], ["heads"]),
        helper.make_node("Einsum", ["heads", "wo"], ["y"], equation="binh,nhd->bid"),
    ]
    initializers = [
        weight("wq", (64, 96), 1 / np.sqrt(96)), weight("wk", (64, 96)), weight("wv", (64, 96)), weight("wo", (2, 48, 16)),
        numpy_helper.from_array(np.array([0, 0, 2, 48], np.int64), "heads_shape"),
    ]
    graph = helper.make_graph(
        nodes, "einsum_attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 16])], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def test_an_attention_block_of_einsums_loads_quantizes_and_runs_its_simulation(tmp_path) -> None:
    """x2paddle converts the rewritten file; the model computes ONNX Runtime's values of the
    original; its four weight products are calibrated and converted as matmuls by parameters,
    and Paddle Inference and ONNX Runtime compute the int8 simulation."""
    pytest.importorskip("x2paddle")
    assert_onnx_block_quantizes_and_runs_its_simulation(_einsum_attention(tmp_path / "attention.onnx"), [1, 5, 64], 4, tmp_path)
