"""ONNX DFT nodes (which x2paddle cannot convert, and which opset 15 lacks) written as MatMul
products: the matrix computes numpy's FFTs (real and complex input, padded and truncated
lengths, one-sided, inverse); every form of the node (opsets 17 and 20, axis attribute or
input, negative axes) computes ONNX Runtime's values; a Fourier-mixing block as PyTorch's
exporter writes ``torch.fft.fftn(x).real`` loads, quantizes its transforms as matmuls by
parameters and runs its simulation in both runtimes; what has no MatMul form is refused by
name."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from imperative_ptq.onnx_dft import dft_matrix, dfts_as_matmuls  # noqa: E402

from onnx_blocks import assert_onnx_block_quantizes_and_runs_its_simulation  # noqa: E402


def _reference_dft(x: np.ndarray, length: int, onesided: bool, inverse: bool) -> np.ndarray:
    """The transform of the 1-D complex ``x`` by its definition, one frequency at a time."""
    x = np.concatenate([x, np.zeros(max(length - len(x), 0), x.dtype)])[:length]
    frequencies = length // 2 + 1 if onesided else length
    sign = 1 if inverse else -1
    samples = np.arange(length)
    spectrum = np.array([
        np.sum(x * np.exp(sign * 2j * np.pi * frequency * samples / length)) for frequency in range(frequencies)
    ])
    return spectrum / length if inverse else spectrum


@pytest.mark.parametrize("samples,length", [(8, 8), (6, 9), (9, 5), (1, 1), (7, 7)])
@pytest.mark.parametrize("complex_input", [False, True])
@pytest.mark.parametrize("onesided,inverse", [(False, False), (True, False), (False, True)])
def test_the_matrix_computes_the_transform_by_its_definition(
    samples: int, length: int, complex_input: bool, onesided: bool, inverse: bool
) -> None:
    rng = np.random.default_rng(samples * 10 + length)
    x = rng.standard_normal(samples) + (1j * rng.standard_normal(samples) if complex_input else 0)
    parts = np.stack([x.real, x.imag], axis=-1).reshape(-1) if complex_input else x.real
    product = parts @ dft_matrix(samples, length, complex_input, onesided, inverse, np.float64)
    expected = _reference_dft(x, length, onesided, inverse)
    np.testing.assert_allclose(product[0::2] + 1j * product[1::2], expected, rtol=0, atol=1e-12)
    if not inverse:  # numpy's FFT pads and truncates the same way
        fft = np.fft.rfft(x.real, n=length) if onesided and not complex_input else np.fft.fft(x, n=length)
        np.testing.assert_allclose(product[0::2] + 1j * product[1::2], fft[:len(expected)], rtol=0, atol=1e-12)


def _dft_model(shape: list, opset: int, axis: int | None, length: int | None, **attributes):
    """One DFT of input ``x`` (``axis`` an attribute before opset 20, an input from it; ``None``
    leaves it out, ONNX's default)."""
    inputs, initializers = ["x", ""], []
    if length is not None:
        initializers.append(numpy_helper.from_array(np.array(length, np.int64), "dft_length"))
        inputs[1] = "dft_length"
    if axis is not None and opset >= 20:
        initializers.append(numpy_helper.from_array(np.array(axis, np.int64), "axis"))
        inputs.append("axis")
    elif axis is not None:
        attributes["axis"] = axis
    while not inputs[-1]:
        inputs.pop()
    graph = helper.make_graph(
        [helper.make_node("DFT", inputs, ["y"], name="dft", **attributes)], "dft",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


def _run(model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


#: (opset, input shape, axis): the default axes (1 before opset 20, -2 from it), negative and
#: positive axes, the transform's axis first, last and in the middle, real and complex input.
FORMS = [
    (17, [2, 6, 3, 1], None), (17, [2, 6, 3, 2], 2), (17, [6, 3, 2], 0),
    (20, [2, 6, 3, 1], None), (20, [2, 6, 3, 2], 1), (20, [2, 6, 3, 2], -3), (20, [5, 1], 0),
]


@pytest.mark.parametrize("opset,shape,axis,length,onesided,inverse", [
    (*form, length, onesided, inverse)
    for form, length, (onesided, inverse) in itertools.product(FORMS, [None, 4, 9], [(0, 0), (1, 0), (0, 1)])
    if not (onesided and form[1][-1] == 2)  # (one-sided transforms of real input only: refused below)
])
def test_a_dft_written_as_matmuls_computes_onnx_runtimes_values(
    opset: int, shape: list, axis: int | None, length: int | None, onesided: int, inverse: int
) -> None:
    model = _dft_model(shape, opset, axis, length, onesided=onesided, inverse=inverse)
    x = np.random.default_rng(len(shape) + opset).standard_normal(shape).astype(np.float32)
    expected = _run(model, x)
    assert dfts_as_matmuls(model) == 1
    assert {node.op_type for node in model.graph.node} <= {"Transpose", "Reshape", "MatMul"}
    computed = _run(model, x)
    assert computed.shape == expected.shape
    np.testing.assert_allclose(computed, expected, rtol=0, atol=2e-6 * np.abs(expected).max())


@pytest.mark.parametrize("case,match", [
    ("open length", r"DFT 'dft' \(input shape \[2, None, 1\]: the transform's axis 1 needs a known size"),
    ("computed length", r"DFT 'dft' \(its dft_length is computed \('n'\), not a constant\)"),
    ("one-sided inverse", r"DFT 'dft' \(a one-sided inverse transform of real input"),
    ("one-sided complex", r"DFT 'dft' \(a one-sided transform of complex input"),
    ("last axis", r"DFT 'dft' \(axis 2 of a rank-3 input"),
])
def test_what_has_no_matmul_form_is_refused_by_name(case: str, match: str) -> None:
    if case == "open length":
        model = _dft_model([2, None, 1], 17, 1, None)
    elif case == "computed length":
        model = _dft_model([2, 6, 1], 17, 1, None)
        model.graph.input.append(helper.make_tensor_value_info("n", TensorProto.INT64, []))
        model.graph.node[0].input.append("n")
    elif case == "one-sided inverse":
        model = _dft_model([2, 6, 1], 17, 1, None, onesided=1, inverse=1)
    elif case == "one-sided complex":
        model = _dft_model([2, 6, 2], 20, 1, None, onesided=1)
    else:
        model = _dft_model([2, 6, 2], 20, -1, None)
    before = model.SerializeToString()
    with pytest.raises(ValueError, match=match):
        dfts_as_matmuls(model)
    assert len(model.graph.node) == 1 and model.graph.node[0].op_type == "DFT", before


def _fourier_mixing(path) -> str:
    """FNet's token mixing as PyTorch's default exporter writes it (opset 20): a projection, the
    real input made complex by a concat of zeros, a DFT over the hidden axis and one over the
    sequence, the real part added to the projection, and an output projection."""
    rng = np.random.default_rng(0)
    hidden, sequence = 16, 8
    nodes = [
        helper.make_node("MatMul", ["x", "w_in"], ["projected"]),
        helper.make_node("Unsqueeze", ["projected", "last"], ["real"]),
        helper.make_node("Mul", ["real", "zero"], ["imaginary"]),
        helper.make_node("Concat", ["real", "imaginary"], ["complex"], axis=-1),
        helper.make_node("DFT", ["complex", "", "hidden_axis"], ["over_hidden"]),
        helper.make_node("DFT", ["over_hidden", "", "sequence_axis"], ["over_both"]),
        helper.make_node("Gather", ["over_both", "real_part"], ["mixed"], axis=3),
        helper.make_node("Add", ["projected", "mixed"], ["summed"]),
        helper.make_node("MatMul", ["summed", "w_out"], ["y"]),
    ]
    initializers = [
        numpy_helper.from_array((rng.standard_normal((hidden, hidden)) / 4).astype(np.float32), "w_in"),
        numpy_helper.from_array((rng.standard_normal((hidden, hidden)) / 4).astype(np.float32), "w_out"),
        numpy_helper.from_array(np.array([-1], np.int64), "last"),
        numpy_helper.from_array(np.zeros(1, np.float32), "zero"),
        numpy_helper.from_array(np.array(2, np.int64), "hidden_axis"),
        numpy_helper.from_array(np.array(1, np.int64), "sequence_axis"),
        numpy_helper.from_array(np.array(0, np.int64), "real_part"),
    ]
    graph = helper.make_graph(
        nodes, "fourier_mixing", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, sequence, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, sequence, hidden])], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return str(path)


def test_a_fourier_mixing_block_loads_quantizes_and_runs_its_simulation(tmp_path) -> None:
    """x2paddle converts the rewritten file; the model computes ONNX Runtime's values of the
    original; both transforms are calibrated and converted as matmuls by parameters beside the
    two projections, and Paddle Inference and ONNX Runtime compute the int8 simulation."""
    pytest.importorskip("x2paddle")
    assert_onnx_block_quantizes_and_runs_its_simulation(_fourier_mixing(tmp_path / "mixing.onnx"), [1, 8, 16], 4, tmp_path)

