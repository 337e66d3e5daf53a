"""ONNX files of opsets 16 and newer load: what x2paddle (opsets up to 15) cannot read is
lowered to opset-15 ops computing the same values, checked against ONNX Runtime on the
original file; what opset 15 cannot express is refused by name; PyTorch's default (dynamo)
export, opset 20 with its weights in a file beside it, quantizes and runs in both runtimes."""

from __future__ import annotations

import logging

import numpy as np
import paddle
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("x2paddle")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import imperative_ptq as ip  # noqa: E402
from imperative_ptq.onnx_import import load_onnx_model  # noqa: E402
from imperative_ptq.onnx_opsets import lowered_to_opset_15  # noqa: E402
from imperative_ptq.quant_layers import QuantizedLayer  # noqa: E402

from ties import assert_both_runtimes_compute_the_simulation  # noqa: E402

SHAPE = [2, 5, 8]


def _model(nodes: list, initializers: list, outputs: dict[str, list], opset: int = 20):
    graph = helper.make_graph(
        nodes, "newer_opset", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs.items()],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _floats(name: str, value) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _ints(name: str, value) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.int64), name)


def _opset_20_model():
    """Every rewrite: LayerNormalization (last axis; a positive axis with its InvStdDev read),
    Gelu (erf and tanh), Mish, reductions with an axes input (and with none: noop), a Split
    into unequal parts by ``num_outputs``, a Cast with ``saturate``."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["norm"], axis=-1, epsilon=1e-5),
        helper.make_node("LayerNormalization", ["x", "gamma_12"], ["norm12", "", "inv_std"], axis=1),
        helper.make_node("Gelu", ["norm"], ["gelu"]),
        helper.make_node("Gelu", ["norm12"], ["gelu_tanh"], approximate="tanh"),
        helper.make_node("Mish", ["gelu_tanh"], ["mish"]),
        helper.make_node("Add", ["gelu", "mish"], ["sum"]),
        helper.make_node("Mul", ["sum", "inv_std"], ["weighted"]),
        helper.make_node("ReduceMean", ["weighted", "axis_1"], ["mean"], keepdims=1),
        helper.make_node("ReduceMax", ["weighted"], ["kept"], noop_with_empty_axes=1),
        helper.make_node("Sub", ["kept", "mean"], ["centred"]),
        helper.make_node("Split", ["centred"], ["a", "b", "c"], axis=2, num_outputs=3),
        helper.make_node("ReduceL2", ["c", "axis_2"], ["norms"], keepdims=0),
        helper.make_node("Cast", ["a"], ["a_cast"], to=TensorProto.FLOAT, saturate=1),
        helper.make_node("Concat", ["a_cast", "b"], ["y"], axis=2),
    ]
    initializers = [
        _floats("gamma", rng.uniform(0.5, 1.5, 8)), _floats("beta", rng.uniform(-0.5, 0.5, 8)),
        _floats("gamma_12", rng.uniform(0.5, 1.5, (5, 8))), _ints("axis_1", [1]), _ints("axis_2", [-1]),
    ]
    return _model(nodes, initializers, {"y": [2, 5, 6], "norms": [2, 5]})


def _runs_as_onnx_runtime(model, path, tmp_path, atol: float = 2e-5) -> None:
    converted = load_onnx_model(path, tmp_path / "converted", {"x": SHAPE})
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32) * 3
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    with paddle.no_grad():
        outputs = converted(paddle.to_tensor(x))
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    assert len(outputs) == len(expected)
    for output, reference in zip(outputs, expected):
        np.testing.assert_allclose(output.numpy(), reference, rtol=0, atol=atol)


def test_opset_20_ops_compute_what_onnx_runtime_computes(tmp_path) -> None:
    model = _opset_20_model()
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "opset20.onnx"
    onnx.save(model, path)
    _runs_as_onnx_runtime(model, path, tmp_path)


def test_an_opset_17_model_keeps_its_reductions_axes_attributes(tmp_path) -> None:
    """Before opset 18 a reduction's axes are its attribute (PyTorch's TorchScript exporter at
    opset 17: LayerNormalization nodes beside ReduceMean ones)."""
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma"], ["norm"], axis=-1),
        helper.make_node("ReduceMean", ["norm"], ["y"], axes=[1], keepdims=0),
    ]
    model = _model(nodes, [_floats("gamma", np.linspace(0.5, 1.5, 8))], {"y": [2, 8]}, opset=17)
    path = tmp_path / "opset17.onnx"
    onnx.save(model, path)
    _runs_as_onnx_runtime(model, path, tmp_path)


def test_a_layer_norm_over_two_axes_and_axes_from_a_list_constant(tmp_path) -> None:
    """``nn.LayerNorm([C, W])`` (axis 1 of ``[N, C, W]``, a 2-D scale and bias): x2paddle fused
    the lowered ``Pow`` form into ``paddle.nn.LayerNorm([C])``, whose forward failed; a
    reduction's axes from a ``Constant`` of ``value_ints`` were refused as computed, and
    x2paddle fails on such a ``Constant`` itself."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["norm"], axis=1),
        helper.make_node("Constant", [], ["axes"], value_ints=[1]),
        helper.make_node("ReduceMean", ["norm", "axes"], ["y"], keepdims=0),
    ]
    initializers = [_floats("gamma", rng.uniform(0.5, 1.5, (5, 8))), _floats("beta", rng.uniform(-1, 1, (5, 8)))]
    model = _model(nodes, initializers, {"y": [2, 8]})
    path = tmp_path / "two_axes.onnx"
    onnx.save(model, path)
    _runs_as_onnx_runtime(model, path, tmp_path)


def test_the_lowered_model_is_an_opset_15_model() -> None:
    model = _opset_20_model()
    assert lowered_to_opset_15(model) == 9
    assert [opset.version for opset in model.opset_import] == [15]
    onnx.checker.check_model(model, full_check=True)
    ops = {node.op_type for node in model.graph.node}
    assert not ops & {"LayerNormalization", "Gelu", "Mish"}
    split = next(node for node in model.graph.node if node.op_type == "Split")
    sizes = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == split.input[1]))
    assert sizes.tolist() == [3, 3, 2]  # opset 18: parts of ceil(8 / 3), the last one smaller
    assert lowered_to_opset_15(model) == 0  # opset 15 and older: left as it is


def test_weights_in_a_file_beside_the_model_are_read_from_its_directory(tmp_path, monkeypatch) -> None:
    """PyTorch's dynamo exporter writes the weights into ``<name>.onnx.data``: they are read
    from the model's directory, whatever the working directory."""
    model = _opset_20_model()
    (tmp_path / "files").mkdir()
    path = tmp_path / "files" / "external.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="external.onnx.data", size_threshold=100)
    assert (tmp_path / "files" / "external.onnx.data").stat().st_size > 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    _runs_as_onnx_runtime(model, path, tmp_path)


@pytest.mark.parametrize("node, named", [
    (helper.make_node("Resize", ["x", "", "scales"], ["y"], antialias=1, mode="linear"), "antialias=1"),
    (helper.make_node("ReduceMean", ["x", "axes"], ["y"]), "axes computed by the graph"),
    (helper.make_node("Pad", ["x", "pads", "", "pad_axes"], ["y"]), "4 inputs"),
    (helper.make_node("Gelu", ["x"], ["y"], approximate="fast"), "approximate='fast'"),
    (helper.make_node("Pad", ["x", "pads"], ["y"], mode="wrap"), "mode='wrap'"),
    (helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear",
                      coordinate_transformation_mode="half_pixel_symmetric"), "half_pixel_symmetric"),
])
def test_what_opset_15_cannot_express_is_refused_by_name(tmp_path, node, named: str) -> None:
    initializers = [_floats("scales", [1, 1, 2]), _ints("pads", [0, 1, 1, 0, 1, 1]), _ints("pad_axes", [1, 2])]
    nodes = [node]
    if node.op_type == "ReduceMean":
        nodes = [helper.make_node("Shape", ["x"], ["rank_axes"], start=2), helper.make_node("Identity", ["rank_axes"], ["axes"]), node]
    model = _model(nodes, initializers, {"y": None})
    path = tmp_path / "refused.onnx"
    onnx.save(model, path)
    with pytest.raises(ValueError, match="opset 20") as error:
        load_onnx_model(path, tmp_path / "converted", {"x": SHAPE})
    assert named in str(error.value) and node.op_type in str(error.value) and "opset_version=15" in str(error.value)
    assert not (tmp_path / "converted").exists()


def test_an_op_newer_than_opset_15_is_refused_by_name(tmp_path) -> None:
    nodes = [helper.make_node("GridSample", ["x4", "grid"], ["y"], mode="linear")]
    graph = helper.make_graph(
        nodes, "grid", [helper.make_tensor_value_info("x4", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 2])], [_floats("grid", np.zeros((1, 2, 2, 2)))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    with pytest.raises(ValueError, match=r"GridSample 'y' \(an op of opset 20\)"):
        lowered_to_opset_15(model, "grid.onnx")


def test_pytorch_default_export_quantizes_and_runs_in_both_runtimes(tmp_path, caplog) -> None:
    """``torch.onnx.export`` with its defaults (the dynamo exporter: opset 20,
    LayerNormalization and Gelu nodes, weights in ``.onnx.data``) of a small pre-norm
    transformer block: loaded without ``fold_shapes``, it computes what ONNX Runtime computes
    of the file, and its int8 export runs in both runtimes what the simulation computes."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = torch.nn.LayerNorm(16)
            self.attention = torch.nn.MultiheadAttention(16, 2, batch_first=True)
            self.feed_forward = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))

        def forward(self, x):
            h = self.norm(x)
            x = x + self.attention(h, h, h, need_weights=False)[0]
            return x + self.feed_forward(self.norm(x))

    torch.manual_seed(0)
    path = tmp_path / "block.onnx"
    with caplog.at_level(logging.ERROR):
        torch.onnx.export(Block().eval(), (torch.randn(*SHAPE[:2], 16),), str(path), input_names=["x"])
    exported = onnx.load(str(path), load_external_data=False)
    assert exported.opset_import[0].version > 15
    assert {"LayerNormalization", "Gelu"} <= {node.op_type for node in exported.graph.node}
    shape = [*SHAPE[:2], 16]
    model = load_onnx_model(path, tmp_path / "converted", {"x": shape})
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(shape).astype(np.float32) for _ in range(6)]
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": inputs[0]})[0]
    with paddle.no_grad():
        np.testing.assert_allclose(model(paddle.to_tensor(inputs[0])).numpy(), expected, rtol=0, atol=1e-5)
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer()))
    quantized = ptq.quantize(model)
    ptq.calibrate(quantized, inputs[:4], progress=False)
    ptq.convert(quantized)
    assert sum(isinstance(layer, QuantizedLayer) for layer in quantized.sublayers()) >= 4
    spec = [paddle.static.InputSpec(shape, "float32", "x")]
    assert_both_runtimes_compute_the_simulation(ptq, quantized, spec, inputs[4:], tmp_path)


@pytest.mark.parametrize("opset", [12, 13])
def test_axes_node_writes_the_axes_in_its_opsets_form(opset: int) -> None:
    """An attribute before opset 13, an int64 input after; another op type is refused."""
    from imperative_ptq.onnx_opsets import axes_node

    node, initializers = axes_node("ReduceSum", "x", [1, 2], "y", opset, keepdims=0)
    assert node.op_type == "ReduceSum" and list(node.output) == ["y"]
    keepdims = next(attribute.i for attribute in node.attribute if attribute.name == "keepdims")
    assert keepdims == 0
    if opset < 13:
        assert list(node.input) == ["x"] and not initializers
        assert next(list(attribute.ints) for attribute in node.attribute if attribute.name == "axes") == [1, 2]
    else:
        assert list(node.input) == ["x", "y.axes"] and numpy_helper.to_array(initializers[0]).tolist() == [1, 2]
    with pytest.raises(ValueError, match="not 'ReduceMean'"):
        axes_node("ReduceMean", "x", [1], "y", opset)


def test_a_split_into_parts_of_an_open_axis_takes_the_size_from_input_shapes(tmp_path) -> None:
    """Opset 18's ``Split(num_outputs=3)`` of 8 rows is ``[3, 3, 2]``; where the file leaves the
    axis open (``N``) the lowering read no size and let opset 15 split evenly, and the converted
    model failed when run ("must be evenly divisible"): the size now comes from ``input_shapes``."""
    nodes = [helper.make_node("Split", ["x"], ["a", "b", "c"], axis=0, num_outputs=3)]
    graph = helper.make_graph(
        nodes, "split", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, 4]) for name in "abc"],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path = tmp_path / "split.onnx"
    onnx.save(model, path)
    x = np.arange(32, dtype=np.float32).reshape(8, 4)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert [part.shape[0] for part in expected] == [3, 3, 2]
    converted = load_onnx_model(path, tmp_path / "converted", {"x": [8, 4]})
    for ours, theirs in zip(converted(paddle.to_tensor(x)), expected):
        np.testing.assert_array_equal(ours.numpy(), theirs)


def test_a_conversion_failing_on_computed_shapes_names_fold_shapes(tmp_path) -> None:
    """A class token expanded to the batch (``cls.expand(x.shape[0], -1, -1)``, as a ViT's), from
    PyTorch's default exporter with an open batch, computes its shape from ``Shape(x)``; x2paddle
    fails on it ("KeyError: 0" from its shape inference): the error now says to load with
    ``fold_shapes=True``, with which the file loads and computes ONNX Runtime's output."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")

    class ClassToken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.token = torch.nn.Parameter(torch.randn(1, 1, 8))
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.cat([self.token.expand(x.shape[0], -1, -1), self.fc(x)], 1)

    torch.manual_seed(0)
    path = str(tmp_path / "token.onnx")
    torch.onnx.export(
        ClassToken().eval(), (torch.rand(1, 4, 8),), path, input_names=["x"], output_names=["y"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )
    with pytest.raises(RuntimeError, match=r"computes shapes from its inputs \(\d+ Shape nodes\).*fold_shapes=True"):
        load_onnx_model(path, tmp_path / "plain", {"x": [1, 4, 8]})
    x = np.random.default_rng(0).random([1, 4, 8], dtype=np.float32)
    expected = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    model = load_onnx_model(path, tmp_path / "folded", {"x": [1, 4, 8]}, fold_shapes=True)
    np.testing.assert_allclose(model(paddle.to_tensor(x)).numpy(), expected, rtol=0, atol=1e-6)
