"""load_onnx_model: x2paddle's conversion of an ONNX file with HardSwish and a reshape written
for batch 1, checked against ONNX Runtime on the file; reuse of a conversion, no half-written
directory, refusal of quantized files and bad arguments."""

from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.export import create_predictor, predict

pytest.importorskip("x2paddle", reason="x2paddle not installed (extra 'test')")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from imperative_ptq.onnx_import import load_onnx_model  # noqa: E402


def _hardswish_classifier(path, quantized: bool = False) -> str:
    """Conv -> HardSwish -> global pool -> Reshape to ``[1, -1]`` (exported for batch 1) ->
    Gemm; with ``quantized`` the conv's input goes through QuantizeLinear/DequantizeLinear."""
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array((rng.standard_normal([8, 3, 3, 3]) / 5).astype("float32"), "conv_w"),
        numpy_helper.from_array((rng.standard_normal([8]) / 5).astype("float32"), "conv_b"),
        numpy_helper.from_array((rng.standard_normal([10, 8]) / 3).astype("float32"), "fc_w"),
        numpy_helper.from_array((rng.standard_normal([10]) / 3).astype("float32"), "fc_b"),
        numpy_helper.from_array(np.array([1, -1], np.int64), "flat_shape"),
        numpy_helper.from_array(np.array(1 / 127, np.float32), "scale"),
        numpy_helper.from_array(np.array(0, np.int8), "zero_point"),
    ]
    nodes = [
        helper.make_node("Conv", ["conv_in", "conv_w", "conv_b"], ["conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["conv"], ["act"]),
        helper.make_node("GlobalAveragePool", ["act"], ["pooled"]),
        helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    if quantized:
        nodes[:0] = [
            helper.make_node("QuantizeLinear", ["x", "scale", "zero_point"], ["codes"]),
            helper.make_node("DequantizeLinear", ["codes", "scale", "zero_point"], ["conv_in"]),
        ]
    else:
        nodes[0].input[0] = "x"
    graph = helper.make_graph(
        nodes, "classifier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def _per_sample(path: str, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime on the batch-1 file, one sample at a time."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])


def test_a_batch_one_file_with_hardswish_converts_runs_any_batch_and_exports_int8(tmp_path, caplog, monkeypatch) -> None:
    """x2paddle 1.6.0 has no HardSwish converter (rewritten), and writes ``shape=[1, -1]``:
    without ``dynamic_batch`` the model fails at batch 4 and a warning says why; with it (into
    a relative directory too), the model computes ONNX Runtime's values at any batch and
    quantizes to a Paddle Inference int8 program that computes its simulation."""
    path = _hardswish_classifier(tmp_path / "classifier.onnx")
    x = np.random.default_rng(1).random([4, 3, 8, 8], dtype=np.float32)
    expected = _per_sample(path, x)
    with caplog.at_level(logging.WARNING, logger="imperative_ptq.onnx_import"):
        fixed = load_onnx_model(path, tmp_path / "fixed", {"x": [1, 3, 8, 8]})
    assert "classifier.onnx: the converted model does not run at batch 2" in caplog.text, caplog.text
    np.testing.assert_allclose(fixed(paddle.to_tensor(x[:1])).numpy(), expected[:1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        fixed(paddle.to_tensor(x))

    # A relative directory (its code's reshapes were not recognized by their absolute path).
    monkeypatch.chdir(tmp_path)
    model = load_onnx_model(path, "dynamic", {"x": [1, 3, 8, 8]}, dynamic_batch=True)
    assert not model.training
    np.testing.assert_allclose(model(paddle.to_tensor(x)).numpy(), expected, rtol=0, atol=1e-5)

    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(model)
    rng = np.random.default_rng(2)
    for _ in range(3):
        qmodel(paddle.to_tensor(rng.random([4, 3, 8, 8], dtype=np.float32)))
    ptq.convert(qmodel)
    assert sum(isinstance(layer, ip.QuantizedLayer) for layer in qmodel.sublayers()) == 2
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    prefix = str(tmp_path / "int8" / "m")
    ptq.save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")])
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    np.testing.assert_allclose(ran, simulated, rtol=0, atol=1e-4 * np.abs(simulated).max())


def _save(nodes, initializers, inputs, outputs, path, opset: int = 13) -> str:
    graph = helper.make_graph(nodes, "graph", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def _computes_as_onnx_runtime(model: paddle.nn.Layer, path: str, x: np.ndarray, atol: float) -> None:
    """The converted ``model`` computes what ONNX Runtime computes of the file at ``path``."""
    expected = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(model(paddle.to_tensor(x)).numpy(), expected, rtol=0, atol=atol)


def _anchor_grid(path) -> str:
    """YOLOv8's head in small: a grid ``Range(0, W) + 0.5`` (no batch) reshaped to ``[1, -1]``
    and added to the input, whose own reshape to ``[1, 2, -1]`` is of the batch."""
    ints = lambda name, values: numpy_helper.from_array(np.array(values, np.int64), name)  # noqa: E731
    floats = lambda name, value: numpy_helper.from_array(np.array(value, np.float32), name)  # noqa: E731
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "three"], ["width"], axis=0),
        helper.make_node("Cast", ["width"], ["width_float"], to=TensorProto.FLOAT),
        helper.make_node("Range", ["zero", "width_float", "one"], ["range"]),
        helper.make_node("Add", ["range", "half"], ["grid"]),
        helper.make_node("Reshape", ["grid", "row"], ["grid_row"]),
        helper.make_node("Add", ["x", "grid_row"], ["shifted"]),
        helper.make_node("MaxPool", ["shifted"], ["pooled"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], dilations=[1, 1]),
        helper.make_node("Reshape", ["pooled", "flat"], ["y"]),
    ]
    initializers = [
        ints("three", 3), floats("zero", 0.0), floats("one", 1.0), floats("half", 0.5),
        ints("row", [1, -1]), ints("flat", [1, 2, -1]),
    ]
    return _save(
        nodes, initializers, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 64])], path,
    )


def test_only_reshapes_of_the_batch_become_dynamic_and_pools_convert_as_onnx_defines_them(tmp_path) -> None:
    """Before: every ``shape=[1, ...]`` became ``[0, ...]``, the grid's too, which made it a
    column (a YOLOv8 detector's box centres up to 98.6% of its largest output off, at batch 1
    as well); x2paddle 1.6.0 refused the ``dilations=[1, 1]`` of YOLOv8's SPPF pools, and
    converted a pool without ``strides`` with stride 3 (the kernel size; ONNX's default is 1)."""
    path = _anchor_grid(tmp_path / "grid.onnx")
    x = np.random.default_rng(1).standard_normal([3, 2, 8, 8]).astype(np.float32)
    model = load_onnx_model(path, tmp_path / "converted", {"x": [1, 2, 8, 8]}, dynamic_batch=True)
    code = (tmp_path / "converted" / "x2paddle_code.py").read_text()
    assert "shape=[1, -1]" in code and "shape=[0, 2, -1]" in code, code
    np.testing.assert_allclose(model(paddle.to_tensor(x)).numpy(), _per_sample(path, x), rtol=0, atol=1e-6)


def _class_token(path) -> str:
    """A ViT's class token exported at batch 1: Expand to ``[1, 1, 8]``, concatenated with the
    tokens: x2paddle writes the batch into the expand, no reshape can carry it."""
    token = numpy_helper.from_array(np.ones([1, 1, 8], np.float32), "token")
    shape = numpy_helper.from_array(np.array([1, 1, 8], np.int64), "token_shape")
    nodes = [
        helper.make_node("Expand", ["token", "token_shape"], ["tokens"]),
        helper.make_node("Concat", ["tokens", "x"], ["y"], axis=1),
    ]
    return _save(
        nodes, [token, shape], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 8])], path,
    )


def test_a_batch_written_elsewhere_than_in_reshapes_is_refused_for_dynamic_batch(tmp_path) -> None:
    path = _class_token(tmp_path / "token.onnx")
    with pytest.raises(ValueError, match=r"token\.onnx's model does not compute batch 2 as its samples alone .*it fails: ValueError: \(InvalidArgument\)"):
        load_onnx_model(path, tmp_path / "converted", {"x": [1, 4, 8]}, dynamic_batch=True)
    assert sorted(os.listdir(tmp_path)) == ["token.onnx"]
    model = load_onnx_model(path, tmp_path / "converted", {"x": [1, 4, 8]})  # batch 1 only
    assert model(paddle.ones([1, 4, 8])).shape == [1, 5, 8]


def test_an_error_of_x2paddle_is_a_runtime_error_naming_the_file(tmp_path) -> None:
    path = _save(
        [helper.make_node("Det", ["x"], ["y"])], [],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], tmp_path / "det.onnx",
    )
    with pytest.raises(RuntimeError, match=r"x2paddle could not convert .*det\.onnx"):
        load_onnx_model(path, tmp_path / "converted")
    assert sorted(os.listdir(tmp_path)) == ["det.onnx"]


def _tflite_style_net(path) -> str:
    """What TFLite and jax2tf converters write and x2paddle 1.6.0 could not take: a PRelu slope
    of shape [1, C, 1, 1] (x2paddle failed on the node; it loses a [C] one's values), a ``Max`` with a ``-inf`` constant
    (x2paddle wrote ``fill_value='-inf'``, which Paddle refuses) and a ``GlobalMaxPool`` of a
    Conv1D output (converted to an adaptive pool no export could trace)."""
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array((rng.standard_normal([4, 3, 3, 3]) / 3).astype("float32"), "conv_w"),
        numpy_helper.from_array(np.array([0.1, 0.2, 0.3, 0.4], np.float32).reshape(1, 4, 1, 1), "slope"),
        numpy_helper.from_array(np.array(-np.inf, np.float32), "lowest"),
        numpy_helper.from_array(np.array([1, 4, 64], np.int64), "rows"),
        numpy_helper.from_array((rng.standard_normal([6, 4, 3]) / 3).astype("float32"), "conv1d_w"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("PRelu", ["conv", "slope"], ["act"]),
        helper.make_node("Max", ["act", "lowest"], ["kept"]),
        helper.make_node("Reshape", ["kept", "rows"], ["sequence"]),
        helper.make_node("Conv", ["sequence", "conv1d_w"], ["conv1d"], kernel_shape=[3]),
        helper.make_node("GlobalMaxPool", ["conv1d"], ["y"]),
    ]
    return _save(
        nodes, initializers, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 1])], path,
    )


def test_tflite_style_slopes_infinities_and_1d_global_pools_convert_and_export(tmp_path) -> None:
    path = _tflite_style_net(tmp_path / "tflite_style.onnx")
    model = load_onnx_model(path, tmp_path / "converted", {"x": [1, 3, 8, 8]})
    x = np.random.default_rng(1).standard_normal([1, 3, 8, 8]).astype(np.float32)
    _computes_as_onnx_runtime(model, path, x, 1e-5)
    ptq = ip.ImperativePTQ()
    qmodel = ptq.quantize(model)
    rng = np.random.default_rng(2)
    for _ in range(3):
        qmodel(paddle.to_tensor(rng.standard_normal([1, 3, 8, 8]).astype(np.float32)))
    ptq.convert(qmodel)
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    prefix = str(tmp_path / "int8" / "m")
    ptq.save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([1, 3, 8, 8], "float32", "x")])
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    np.testing.assert_allclose(ran, simulated, rtol=0, atol=1e-5 * np.abs(simulated).max())


def _pytorch_deduplicated_net(path) -> str:
    """What PyTorch's exporter writes for two equal parameters: the second an ``Identity`` of
    the first (here a conv bias; x2paddle 1.6.0 failed with ``KeyError: '..._bias not a key in
    dict_keys([...])'``), and a conv without the optional ``kernel_shape`` (x2paddle failed with
    ``TypeError: object of type 'NoneType' has no len()``)."""
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array((rng.standard_normal([8, 3, 3, 3]) / 3).astype("float32"), "w1"),
        numpy_helper.from_array(np.linspace(-0.3, 0.4, 8).astype("float32"), "b1"),
        numpy_helper.from_array((rng.standard_normal([8, 8, 1, 1]) / 3).astype("float32"), "w2"),
    ]
    nodes = [
        helper.make_node("Identity", ["b1"], ["b2"]),
        helper.make_node("Conv", ["x", "w1", "b1"], ["y1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["y1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"]),
    ]
    return _save(
        nodes, initializers, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], path,
    )


def test_parameters_pytorch_deduplicated_and_a_conv_without_kernel_shape_convert(tmp_path) -> None:
    path = _pytorch_deduplicated_net(tmp_path / "deduplicated.onnx")
    model = load_onnx_model(path, tmp_path / "converted", {"x": [1, 3, 8, 8]})
    x = np.random.default_rng(1).standard_normal([1, 3, 8, 8]).astype(np.float32)
    _computes_as_onnx_runtime(model, path, x, 1e-5)


@pytest.mark.parametrize("transposed", [False, True])
def test_a_gemm_without_its_bias_converts(tmp_path, transposed: bool) -> None:
    """PyTorch's dynamo exporter leaves the optional ``C`` out of a Linear's ``Gemm`` whose
    bias is zero; x2paddle read a third input (``IndexError: list index out of range``)."""
    weight = np.random.default_rng(0).standard_normal((6, 4) if transposed else (4, 6)).astype(np.float32)
    path = _save(
        [helper.make_node("Gemm", ["x", "weight"], ["y"], transB=int(transposed), alpha=1.0)],
        [numpy_helper.from_array(weight, "weight")], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6])], tmp_path / "gemm.onnx",
    )
    model = load_onnx_model(path, tmp_path / "converted", {"x": [3, 4]})
    x = np.random.default_rng(1).standard_normal([3, 4]).astype(np.float32)
    _computes_as_onnx_runtime(model, path, x, 1e-5)


def _reduction_net(path, op: str, opset: int, axes: list[int] | None, keepdims: int | None) -> str:
    """One reduction of a ``[2, 4, 5, 3]`` input, its axes an attribute (before opset 13, and
    for every op but ``ReduceSum`` up to opset 17) or an input."""
    attributes = {} if keepdims is None else {"keepdims": keepdims}
    inputs, initializers = ["x"], []
    if axes is not None and op == "ReduceSum" and opset >= 13:
        inputs.append("axes")
        initializers.append(numpy_helper.from_array(np.array(axes, np.int64), "axes"))
    elif axes is not None:
        attributes["axes"] = axes
    shape = [2, 4, 5, 3]
    kept = keepdims is None or keepdims
    reduced = [size for axis, size in enumerate(shape) if axes is not None and axis not in [a % 4 for a in axes]]
    out_shape = [1 if axes is None or axis in [a % 4 for a in axes] else size for axis, size in enumerate(shape)] if kept else reduced
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y"], **attributes)], "reduction",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return str(path)


@pytest.mark.parametrize("op, opset, axes, keepdims", [
    ("ReduceL2", 13, [1, 2], 1), ("ReduceL2", 11, [1, 2], 0), ("ReduceL1", 13, [-1, 1], 1), ("ReduceL2", 13, None, 0),
    ("ReduceSum", 11, [1], 1), ("ReduceSum", 13, [1], 1), ("ReduceSum", 13, [1], None), ("ReduceSum", 13, [1, -1], 0),
    ("ReduceSum", 13, [2, 1], 1), ("ReduceSum", 13, [-3, -1], 0), ("ReduceSum", 13, [3, -3], 0),
    ("ReduceLogSumExp", 13, [1, 2], 1), ("ReduceLogSumExp", 11, [-1], 0), ("ReduceLogSumExp", 13, None, 0),
    ("ReduceLogSumExp", 13, [2], None), ("ReduceSumSquare", 13, [1, 3], 0), ("ReduceLogSum", 13, [1], 1),
])
def test_norms_and_sums_compute_what_onnx_runtime_computes(tmp_path, op: str, opset: int, axes, keepdims) -> None:
    """x2paddle writes ``ReduceL2``/``ReduceL1`` over two axes as Paddle's matrix norms (the
    largest singular value: ConvNeXt-V2's GRN), a ``ReduceSum`` with ``keepdims=1`` as
    ``paddle.sum(keepdim=1)``, which aborted the process, one without ``keepdims`` as if it
    were 0, and fails on a sum over an axes input of several axes; it has no
    ``ReduceLogSumExp`` (``torch.logsumexp``), ``ReduceSumSquare`` or ``ReduceLogSum``."""
    path = _reduction_net(tmp_path / "reduction.onnx", op, opset, axes, keepdims)
    model = load_onnx_model(path, tmp_path / "converted", {"x": [2, 4, 5, 3]})
    x = np.random.default_rng(1).standard_normal([2, 4, 5, 3]).astype(np.float32)
    if op == "ReduceLogSum":
        x = np.abs(x) + 0.1
    elif op == "ReduceLogSumExp":
        x = x * 30  # (exp of the largest alone would lose digits: the sum is shifted by the maximum)
    _computes_as_onnx_runtime(model, path, x, 1e-5)


@pytest.mark.parametrize("upper", [1, 0])
@pytest.mark.parametrize("offset", [None, -1, 2])
def test_a_trilu_keeps_onnx_runtimes_triangle(tmp_path, upper: int, offset) -> None:
    """``torch.triu``/``tril`` of a computed tensor (opset 14 ``Trilu``): x2paddle has none; a
    ``Where`` of a constant mask of the last two axes computes it."""
    initializers = [] if offset is None else [numpy_helper.from_array(np.array(offset, np.int64), "k")]
    path = _save(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("Trilu", ["r"] + ([] if offset is None else ["k"]), ["y"], upper=upper)],
        initializers, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 6])], tmp_path / "trilu.onnx", opset=14,
    )
    model = load_onnx_model(path, tmp_path / "converted", {"x": [2, 4, 6]})
    _computes_as_onnx_runtime(model, path, np.random.default_rng(1).standard_normal([2, 4, 6]).astype(np.float32), 0.0)


def test_a_causal_mask_of_minus_infinity_keeps_its_infinities(tmp_path) -> None:
    """A causal mask built in the graph (``torch.full_like(scores, -inf).triu(1)``) added to
    attention scores: the mask keeps ``-inf`` above the diagonal and zeros on and below it,
    where a product by a 0/1 mask would write NaN (``-inf * 0``)."""
    path = _save(
        [helper.make_node("Shape", ["x"], ["shape"]),
         helper.make_node("ConstantOfShape", ["shape"], ["infinities"],
                          value=numpy_helper.from_array(np.array([-np.inf], np.float32))),
         helper.make_node("Trilu", ["infinities", "one"], ["mask"], upper=1),
         helper.make_node("Add", ["x", "mask"], ["masked"]),
         helper.make_node("Softmax", ["masked"], ["y"], axis=-1)],
        [numpy_helper.from_array(np.array(1, np.int64), "one")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 5])], tmp_path / "causal.onnx", opset=14,
    )
    model = load_onnx_model(path, tmp_path / "converted", {"x": [2, 5, 5]})
    x = np.random.default_rng(1).standard_normal([2, 5, 5]).astype(np.float32)
    _computes_as_onnx_runtime(model, path, x, 1e-6)
    assert not np.isnan(model(paddle.to_tensor(x)).numpy()).any()


def test_a_trilu_over_axes_of_unknown_size_is_refused_by_name(tmp_path) -> None:
    path = _save(
        [helper.make_node("Trilu", ["x"], ["y"], name="triangle")], [],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, "rows", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, "rows", 6])], tmp_path / "trilu.onnx", opset=14,
    )
    with pytest.raises(ValueError, match=r"Trilu nodes .* 'triangle' \(input shape \[2, None, 6\]\)"):
        load_onnx_model(path, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()


@pytest.mark.parametrize("shape, axis, index", [
    ([1, 4, 3, 5, 6], 4, [[2]]), ([2, 4, 5], -1, [[0, 4], [1, 1], [3, 2]]), ([3, 4, 2], 0, [[2, 0]]),
    (["batch", 4, "width"], 1, [[1, 3], [0, 2]]), ([2, 4, "width"], -2, [[3], [1]]),
], ids=["unfold", "last-axis", "first-axis", "open-trailing-size", "open-last-size"])
def test_a_gather_of_an_index_array_keeps_the_index_axes(tmp_path, shape, axis: int, index) -> None:
    """ONNX's ``Gather`` output is ``x.shape[:axis] + index.shape + x.shape[axis + 1:]``;
    x2paddle's ``paddle.gather`` read an index of rank 2 as 1-D (``torch.nn.Unfold`` in Hugging
    Face ConvBERT; its next transpose failed). Sizes the file leaves open are read at run time."""
    fixed = [2 if isinstance(size, str) else size for size in shape]
    at = axis % len(shape)
    out_shape = shape[:at] + list(np.shape(index)) + shape[at + 1:]
    path = _save(
        [helper.make_node("Gather", ["x", "index"], ["g"], axis=axis), helper.make_node("Relu", ["g"], ["y"])],
        [numpy_helper.from_array(np.array(index, np.int64), "index")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], tmp_path / "gather.onnx",
    )
    model = load_onnx_model(path, tmp_path / "converted", {"x": fixed})
    x = np.random.default_rng(1).standard_normal(fixed).astype(np.float32)
    assert list(model(paddle.to_tensor(x)).shape) == [2 if isinstance(size, str) else size for size in out_shape]
    _computes_as_onnx_runtime(model, path, x, 0.0)


@pytest.mark.parametrize("computed", [True, False], ids=["computed-index", "initializer-index"])
def test_gather_elements_sharing_an_index_convert(tmp_path, computed: bool) -> None:
    """Two ``GatherElements`` reading one index (DeBERTa-v2's relative-position attention):
    x2paddle transposed the index's recorded shape in place for the first, and the converted
    model's forward failed on the second."""
    rng = np.random.default_rng(0)
    index = rng.integers(0, 16, size=[1 if computed else 4, 8, 8]).astype(np.int64)
    initializers = [numpy_helper.from_array(index, "small" if computed else "index")]
    nodes = []
    if computed:
        initializers.append(numpy_helper.from_array(np.array([4, 8, 8], np.int64), "shape"))
        nodes.append(helper.make_node("Expand", ["small", "shape"], ["index"]))
    nodes += [
        helper.make_node("GatherElements", ["x", "index"], ["first"], axis=-1),
        helper.make_node("GatherElements", ["x", "index"], ["second"], axis=-1),
        helper.make_node("Mul", ["first", "second"], ["y"]),
    ]
    path = _save(
        nodes, initializers, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8, 8])], tmp_path / "gather_elements.onnx",
    )
    model = load_onnx_model(path, tmp_path / "converted", {"x": [4, 8, 16]})
    x = rng.standard_normal([4, 8, 16]).astype(np.float32)
    _computes_as_onnx_runtime(model, path, x, 0.0)


def test_a_conversion_reads_no_value_of_an_earlier_one(tmp_path) -> None:
    """x2paddle 1.6.0's shape inference keeps the values it computes in a mutable default
    argument, shared by every conversion of the process: a tensor named ``shape`` here took
    the value of the earlier model's ``shape`` (``Shape(x)``, ``[1, 2, 8, 8]``), and the
    GatherElements reading the index expanded to it was converted for that shape."""
    load_onnx_model(_anchor_grid(tmp_path / "grid.onnx"), tmp_path / "earlier", {"x": [1, 2, 8, 8]})
    rng = np.random.default_rng(0)
    path = _save(
        [helper.make_node("Expand", ["small", "shape"], ["index"]),
         helper.make_node("GatherElements", ["x", "index"], ["y"], axis=-1)],
        [numpy_helper.from_array(rng.integers(0, 16, size=[1, 8, 8]).astype(np.int64), "small"),
         numpy_helper.from_array(np.array([4, 8, 8], np.int64), "shape")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8, 8])], tmp_path / "later.onnx",
    )
    model = load_onnx_model(path, tmp_path / "later", {"x": [4, 8, 16]})
    _computes_as_onnx_runtime(model, path, rng.standard_normal([4, 8, 16]).astype(np.float32), 0.0)


def _interpolating_resize(path, mode: str, coordinates: str | None, by_sizes: bool, **attributes) -> str:
    """``F.interpolate(x, scale_factor=2, mode="bilinear"|"bicubic")`` as ONNX writes it: a
    linear or cubic ``Resize`` of a ``[1, 2, 4, 5]`` input by scales or by sizes, then a
    ``Relu``."""
    attributes = {"mode": mode, **attributes} | ({} if coordinates is None else {"coordinate_transformation_mode": coordinates})
    if by_sizes:
        inputs = ["x", "", "", "sizes"]
        initializers = [numpy_helper.from_array(np.array([1, 2, 8, 10], np.int64), "sizes")]
    else:
        inputs = ["x", "", "scales"]
        initializers = [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    return _save(
        [helper.make_node("Resize", inputs, ["r"], **attributes), helper.make_node("Relu", ["r"], ["y"])],
        initializers, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 10])], path,
    )


@pytest.mark.parametrize("mode", ["linear", "cubic"])
@pytest.mark.parametrize("coordinates", [None, "half_pixel", "pytorch_half_pixel", "align_corners"])
@pytest.mark.parametrize("by_sizes", [False, True], ids=["scales", "sizes"])
def test_interpolating_resizes_compute_what_onnx_runtime_computes(tmp_path, mode: str, coordinates, by_sizes: bool) -> None:
    """PyTorch's bilinear and bicubic ``F.interpolate`` (``align_corners=False``) are a
    ``Resize`` with ``half_pixel`` coordinates (ONNX's default), which x2paddle converted by
    scales to Paddle's ``align_corners=True`` (linear: 25% of the largest value off, silently);
    it passed ONNX's ``cubic`` mode to Paddle, which knows ``bicubic`` (every cubic resize
    failed), and dropped the ``align_corners`` of a cubic resize by scales (36% off)."""
    path = _interpolating_resize(tmp_path / "resize.onnx", mode, coordinates, by_sizes)
    model = load_onnx_model(path, tmp_path / "converted", {"x": [1, 2, 4, 5]})
    x = np.random.default_rng(1).standard_normal([1, 2, 4, 5]).astype(np.float32)
    _computes_as_onnx_runtime(model, path, x, 1e-5)


@pytest.mark.parametrize("mode,coordinates,attributes,reason", [
    ("linear", "asymmetric", {}, r"linear, asymmetric"),
    ("cubic", "tf_half_pixel_for_nn", {}, r"cubic, tf_half_pixel_for_nn"),
    ("cubic", None, {"cubic_coeff_a": -0.5}, r"cubic_coeff_a=-0.5, exclude_outside=0"),
    ("cubic", None, {"exclude_outside": 1}, r"cubic_coeff_a=-0.75, exclude_outside=1"),
])
def test_an_interpolating_resize_x2paddle_converts_wrongly_is_refused_by_name(tmp_path, mode, coordinates, attributes, reason) -> None:
    path = _interpolating_resize(tmp_path / "resize.onnx", mode, coordinates, False, **attributes)
    with pytest.raises(ValueError, match=rf"Resize nodes that x2paddle 1.6.0 converts wrongly: 'r' \({reason}"):
        load_onnx_model(path, tmp_path / "converted", {"x": [1, 2, 4, 5]})
    assert not (tmp_path / "converted").exists()


@pytest.mark.parametrize("shape, pads", [([1, 2, 4, 4], [0, 0, 2, 1, 0, 0, 2, 1]), ([1, 2, 5], [0, 0, 1, 0, 0, 2])])
def test_a_pad_of_a_non_zero_value_pads_with_it(tmp_path, shape, pads) -> None:
    """``F.pad(x, pads, value=0.5)``: ONNX's ``Pad`` reads the value as an input since opset
    11; x2paddle read it from the older attribute only and padded with 0, silently."""
    path = _save(
        [helper.make_node("Pad", ["x", "pads", "value"], ["y"], mode="constant")],
        [numpy_helper.from_array(np.array(pads, np.int64), "pads"), numpy_helper.from_array(np.array(0.5, np.float32), "value")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [a + b + c for a, b, c in zip(shape, pads[:len(shape)], pads[len(shape):])])],
        tmp_path / "pad.onnx",
    )
    model = load_onnx_model(path, tmp_path / "converted", {"x": shape})
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    _computes_as_onnx_runtime(model, path, x, 1e-6)


@pytest.mark.parametrize("opset", [11, 13])
def test_a_squeeze_without_axes_squeezes_every_axis_of_size_one(tmp_path, opset: int) -> None:
    """PyTorch's default exporter writes ``x.mean()`` as a ``ReduceMean`` keeping its axes and
    a ``Squeeze`` without axes; x2paddle read the axes by position (``IndexError``)."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["mean"], keepdims=1), helper.make_node("Squeeze", ["mean"], ["m"]),
         helper.make_node("Add", ["x", "m"], ["y"])], "graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    path = str(tmp_path / "mean.onnx")
    onnx.save(model, path)
    converted = load_onnx_model(path, tmp_path / "converted", {"x": [2, 5]})
    _computes_as_onnx_runtime(converted, path, np.random.default_rng(1).standard_normal([2, 5]).astype(np.float32), 1e-6)


def test_a_layer_norm_over_two_axes_spelled_out_converts(tmp_path) -> None:
    """``nn.LayerNorm([C, W])`` as PyTorch writes it at opset 15 and older (``ReduceMean`` over
    two axes, ``Pow``, ...): x2paddle fused it into ``paddle.nn.LayerNorm([C])``, whose forward
    failed."""
    rng = np.random.default_rng(0)
    floats = lambda name, value: numpy_helper.from_array(np.asarray(value, np.float32), name)  # noqa: E731
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-2, -1], keepdims=1),
        helper.make_node("Sub", ["x", "mean"], ["centred"]),
        helper.make_node("Pow", ["centred", "two"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["variance"], axes=[-2, -1], keepdims=1),
        helper.make_node("Add", ["variance", "epsilon"], ["shifted"]),
        helper.make_node("Sqrt", ["shifted"], ["deviation"]),
        helper.make_node("Div", ["centred", "deviation"], ["normalized"]),
        helper.make_node("Mul", ["normalized", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["y"]),
    ]
    path = _save(
        nodes, [floats("two", 2.0), floats("epsilon", 1e-5), floats("gamma", rng.uniform(0.5, 1.5, (3, 5))),
                floats("beta", rng.uniform(-1, 1, (3, 5)))],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 5])], tmp_path / "norm.onnx",
    )
    model = load_onnx_model(path, tmp_path / "converted", {"x": [2, 3, 5]})
    _computes_as_onnx_runtime(model, path, rng.standard_normal([2, 3, 5]).astype(np.float32), 1e-5)


def test_an_lstm_returning_its_sequence_only_converts(tmp_path) -> None:
    """PyTorch's default exporter writes an ``nn.LSTM`` whose states are unused with its ``Y``
    output only; x2paddle read the others by position ("Output numbers of Node ... is 1")."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
        for name, shape in (("W", [1, 16, 5]), ("R", [1, 16, 4]), ("B", [1, 32]), ("h0", [1, 1, 4]), ("c0", [1, 1, 4]))
    ]
    path = _save(
        [helper.make_node("LSTM", ["x", "W", "R", "B", "", "h0", "c0"], ["y"], hidden_size=4)], weights,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 1, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 1, 1, 4])], tmp_path / "lstm.onnx",
    )
    model = load_onnx_model(path, tmp_path / "converted", {"x": [3, 1, 5]})
    x = rng.standard_normal([3, 1, 5]).astype(np.float32)
    expected = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    output = model(paddle.to_tensor(x))
    output = output[0] if isinstance(output, (list, tuple)) else output
    np.testing.assert_allclose(output.numpy().reshape(expected.shape), expected, rtol=0, atol=1e-6)
    assert list(output.shape) == list(expected.shape)


@pytest.mark.parametrize("inputs,direction", [
    (["x", "W", "R"], "forward"), (["x", "W", "R", "B"], "bidirectional"), (["x", "W", "R", "B", "", "h0"], "forward"),
])
def test_an_lstm_without_its_optional_inputs_converts(tmp_path, inputs, direction: str) -> None:
    """tf2onnx and other exporters leave out an LSTM's bias and initial states (zeros); x2paddle
    read both ("local variable 'init_h' referenced before assignment")."""
    rng = np.random.default_rng(0)
    directions = 2 if direction == "bidirectional" else 1
    shapes = {"W": [directions, 16, 5], "R": [directions, 16, 4], "B": [directions, 32], "h0": [directions, 2, 4]}
    weights = [
        numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
        for name, shape in shapes.items() if name in inputs
    ]
    path = _save(
        [helper.make_node("LSTM", inputs, ["y", "y_h"], direction=direction, hidden_size=4)], weights,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["time", "batch", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["time", directions, "batch", 4])], tmp_path / "lstm.onnx",
    )
    model = load_onnx_model(path, tmp_path / "converted", {"x": [3, 2, 5]})
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = rng.standard_normal([3, 2, 5]).astype(np.float32)
    expected = session.run(["y"], {"x": x})[0]
    output = model(paddle.to_tensor(x))
    output = output[0] if isinstance(output, (list, tuple)) else output
    assert list(output.shape) == list(expected.shape)
    np.testing.assert_allclose(output.numpy(), expected, rtol=0, atol=1e-6)


def _constant(name: str, value, dtype=np.int64):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, dtype), name))


def _integer_division_net(path) -> tuple[str, np.ndarray]:
    """``x[:, :(n + 1) // 2 * 2]`` with ``n`` read from the input's shape, as PyTorch exports
    ``//`` and ``torch.chunk``'s sizes: an ONNX ``Div`` of int64 (x2paddle's ``paddle.divide``
    gave float32, and the trace failed: "Type promotion only support calculations between
    floating-point numbers")."""
    nodes = [
        _constant("index", 1), _constant("one", 1), _constant("two", 2), _constant("zero", [0]), _constant("axis", [1]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "index"], ["n"], axis=0),
        helper.make_node("Add", ["n", "one"], ["n1"]),
        helper.make_node("Div", ["n1", "two"], ["half"]),
        helper.make_node("Mul", ["half", "two"], ["end0"]),
        helper.make_node("Unsqueeze", ["end0", "zero"], ["end"]),
        helper.make_node("Slice", ["x", "zero", "end", "axis"], ["y"]),
    ]
    x = np.random.default_rng(1).random((1, 5)).astype(np.float32)
    return _save(
        nodes, [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "columns"])], path,
    ), x


def _integer_cumsum_net(path) -> tuple[str, np.ndarray]:
    """RoBERTa's position ids, ``cumsum(ids != 1) * (ids != 1) + 1`` in int32 (Paddle's
    ``cumsum`` of int32 returns int64, and the multiply with int32 failed the trace)."""
    nodes = [
        _constant("axis", 1), _constant("padding", 1), _constant("one", 1, np.int32),
        helper.make_node("Cast", ["x"], ["ids"], to=TensorProto.INT64),
        helper.make_node("Equal", ["ids", "padding"], ["padded"]),
        helper.make_node("Not", ["padded"], ["kept"]),
        helper.make_node("Cast", ["kept"], ["mask"], to=TensorProto.INT32),
        helper.make_node("CumSum", ["mask", "axis"], ["counted"]),
        helper.make_node("Mul", ["counted", "mask"], ["masked"]),
        helper.make_node("Add", ["masked", "one"], ["positions"]),
        helper.make_node("Cast", ["positions"], ["y"], to=TensorProto.FLOAT),
    ]
    x = np.array([[0, 5, 1, 3, 1, 7]], np.float32)
    return _save(
        nodes, [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])], path,
    ), x


def _uneven_split_net(path) -> tuple[str, np.ndarray]:
    """LeViT's ``kv.split([key_dim, 4 * key_dim], dim=3)`` in small: a ``Split`` into parts of
    2 and 6 (x2paddle's shape inference split evenly; ``KeyError: 0``)."""
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array(rng.random((6, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.random((2, 3)).astype(np.float32), "v"),
    ]
    nodes = [
        _constant("sizes", [2, 6]),
        helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=2),
        helper.make_node("MatMul", ["b", "w"], ["bw"]),
        helper.make_node("MatMul", ["a", "v"], ["av"]),
        helper.make_node("Add", ["bw", "av"], ["y"]),
    ]
    x = rng.random((1, 6, 8)).astype(np.float32)
    return _save(
        nodes, initializers, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 3])], path,
    ), x


@pytest.mark.parametrize("build", [_integer_division_net, _integer_cumsum_net, _uneven_split_net],
                         ids=["integer-division", "integer-cumsum", "uneven-split"])
def test_integer_ops_and_uneven_splits_convert_as_onnx_defines_them(build, tmp_path) -> None:
    path, x = build(tmp_path / "net.onnx")
    model = load_onnx_model(path, tmp_path / "converted", {"x": list(x.shape)})
    _computes_as_onnx_runtime(model, path, x, 1e-6)


def _channels_last_norm_net(path) -> str:
    """Hugging Face ConvNeXt's ``permute -> LayerNorm -> permute`` as PyTorch exports it at
    opset 14 (the LayerNorm written out): ONNX Runtime's transpose optimizer, under
    ``fold_shapes``, pushed it into a LayerNorm over the channel axis, which x2paddle converted
    to ``LayerNorm(normalized_shape=[1])`` ("expected input with shape [*, 1]")."""
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array((rng.standard_normal([8, 8, 3, 3]) / 3).astype("float32"), "w"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype("float32"), "gamma"),
        numpy_helper.from_array(rng.uniform(-0.5, 0.5, 8).astype("float32"), "beta"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("ReduceMean", ["t"], ["mean"], axes=[-1]),
        helper.make_node("Sub", ["t", "mean"], ["centered"]),
        helper.make_node("Pow", ["centered", "two"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["variance"], axes=[-1]),
        helper.make_node("Add", ["variance", "eps"], ["shifted"]),
        helper.make_node("Sqrt", ["shifted"], ["deviation"]),
        helper.make_node("Div", ["centered", "deviation"], ["normed"]),
        helper.make_node("Mul", ["normed", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["biased"]),
        helper.make_node("Transpose", ["biased"], ["y"], perm=[0, 3, 1, 2]),
    ]
    return _save(
        nodes, initializers, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])], path,
    )


def test_fold_shapes_keeps_a_channels_last_norm_between_its_transposes(tmp_path) -> None:
    path = _channels_last_norm_net(tmp_path / "norm.onnx")
    model = load_onnx_model(path, tmp_path / "converted", {"x": [1, 8, 6, 6]}, fold_shapes=True)
    x = np.random.default_rng(1).standard_normal([1, 8, 6, 6]).astype(np.float32)
    _computes_as_onnx_runtime(model, path, x, 1e-5)


def _class_token_net(path) -> str:
    """ViT's class token, ``cls.expand(1, -1, -1)`` as PyTorch exports it: a ``Where`` over a
    ``ConstantOfShape`` of a 1-element shape, which x2paddle writes as ``paddle.full(shape=
    tensor)``, read by Paddle 3.3.1 as shape ``[-1]``: the converted model fails its forward."""
    nodes = [
        _constant("shape", [1, -1, -1]), _constant("length", [3]), _constant("minus_one", -1),
        helper.make_node("ConstantOfShape", ["length"], ["ones"], value=numpy_helper.from_array(np.array([1], np.int64))),
        helper.make_node("Mul", ["ones", "minus_one"], ["negated"]),
        helper.make_node("Equal", ["shape", "negated"], ["kept"]),
        helper.make_node("Where", ["kept", "ones", "shape"], ["target"]),
        helper.make_node("Expand", ["token", "target"], ["tokens"]),
        helper.make_node("Concat", ["tokens", "x"], ["y"], axis=1),
    ]
    token = numpy_helper.from_array(np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 1, 8), "token")
    return _save(
        nodes, [token], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 8])], path,
    )


def test_a_model_failing_its_forward_is_pointed_to_fold_shapes(tmp_path, caplog) -> None:
    path = _class_token_net(tmp_path / "token.onnx")
    with caplog.at_level(logging.WARNING, logger="imperative_ptq.onnx_import"):
        load_onnx_model(path, tmp_path / "converted", {"x": [1, 4, 8]})
    assert "fails on inputs of its shapes" in caplog.text and "fold_shapes=True" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imperative_ptq.onnx_import"):
        model = load_onnx_model(path, tmp_path / "folded", {"x": [1, 4, 8]}, fold_shapes=True)
    assert "fails on inputs" not in caplog.text
    x = np.random.default_rng(1).random((1, 4, 8)).astype(np.float32)
    _computes_as_onnx_runtime(model, path, x, 1e-6)


def test_an_error_of_x2paddle_names_its_first_cause(tmp_path, monkeypatch) -> None:
    """x2paddle re-raises a node's error as "convert failed node: ..." without its message."""
    import x2paddle.convert

    def failing(*args, **kwargs):
        try:
            raise TypeError("object of type 'NoneType' has no len()")
        except TypeError as error:
            raise Exception("convert failed node:y, op_type is PRelu") from error

    monkeypatch.setattr(x2paddle.convert, "onnx2paddle", failing)
    path = _hardswish_classifier(tmp_path / "classifier.onnx")
    with pytest.raises(RuntimeError, match=r"convert failed node:y, op_type is PRelu, caused by TypeError: "
                                           r"object of type 'NoneType' has no len\(\)"):
        load_onnx_model(path, tmp_path / "converted", {"x": [1, 3, 8, 8]})


def test_a_directory_holding_the_same_conversion_is_loaded_without_converting(tmp_path, monkeypatch) -> None:
    import x2paddle.convert

    path = _hardswish_classifier(tmp_path / "classifier.onnx")
    directory = tmp_path / "converted"
    first = load_onnx_model(path, directory, {"x": [1, 3, 8, 8]}, dynamic_batch=True)
    x = paddle.to_tensor(np.random.default_rng(1).random([2, 3, 8, 8], dtype=np.float32))
    expected = first(x).numpy()
    calls = []
    original = x2paddle.convert.onnx2paddle
    monkeypatch.setattr(x2paddle.convert, "onnx2paddle", lambda *args, **kwargs: calls.append(args) or original(*args, **kwargs))
    again = load_onnx_model(path, directory, {"x": [1, 3, 8, 8]}, dynamic_batch=True)
    assert calls == []
    np.testing.assert_array_equal(again(x).numpy(), expected)
    # Other options, or another file, convert again.
    load_onnx_model(path, directory, {"x": [1, 3, 8, 8]})
    assert len(calls) == 1
    with open(directory / "onnx_import.json", encoding="utf-8") as file:
        assert json.load(file)["dynamic_batch"] is False


def test_a_failed_conversion_leaves_the_previous_directory_and_no_staging(tmp_path, monkeypatch) -> None:
    import x2paddle.convert

    path = _hardswish_classifier(tmp_path / "classifier.onnx")
    directory = tmp_path / "converted"
    load_onnx_model(path, directory, {"x": [1, 3, 8, 8]}, dynamic_batch=True)
    before = sorted(os.listdir(directory))

    def interrupted(source, save_dir, **kwargs):
        with open(os.path.join(save_dir, "x2paddle_code.py"), "w", encoding="utf-8") as file:
            file.write("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(x2paddle.convert, "onnx2paddle", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_onnx_model(path, directory, {"x": [1, 3, 8, 8]})
    assert sorted(os.listdir(tmp_path)) == ["classifier.onnx", "converted"]
    assert sorted(os.listdir(directory)) == before
    with pytest.raises(KeyboardInterrupt):
        load_onnx_model(path, tmp_path / "new", {"x": [1, 3, 8, 8]})
    assert not (tmp_path / "new").exists()


def test_bad_input(tmp_path) -> None:
    path = _hardswish_classifier(tmp_path / "classifier.onnx")
    quantized = _hardswish_classifier(tmp_path / "quantized.onnx", quantized=True)
    with pytest.raises(ValueError, match=r"quantized\.onnx is already quantized \(DequantizeLinear, QuantizeLinear\)"):
        load_onnx_model(quantized, tmp_path / "q")
    with pytest.raises(FileNotFoundError, match="missing.onnx does not exist"):
        load_onnx_model(tmp_path / "missing.onnx", tmp_path / "m")
    with pytest.raises(TypeError, match="input_shapes must map input names to shapes"):
        load_onnx_model(path, tmp_path / "m", [1, 3, 8, 8])
    with pytest.raises(TypeError, match=r"input_shapes\['x'\] must be a list of positive ints"):
        load_onnx_model(path, tmp_path / "m", {"x": [-1, 3, 8, 8]})
    with pytest.raises(ValueError, match=r"input_shapes names \['image'\], which are not inputs"):
        load_onnx_model(path, tmp_path / "m", {"image": [1, 3, 8, 8]})
    with pytest.raises(ValueError, match="dynamic_batch needs batch 1 in input_shapes"):
        load_onnx_model(path, tmp_path / "m", {"x": [2, 3, 8, 8]}, dynamic_batch=True)
    with pytest.raises(TypeError, match="dynamic_batch must be a bool"):
        load_onnx_model(path, tmp_path / "m", dynamic_batch=1)
    assert sorted(os.listdir(tmp_path)) == ["classifier.onnx", "quantized.onnx"]


def test_x2paddle_exiting_after_its_dygraph_files_is_a_warning_not_the_end_of_the_process(
    tmp_path, monkeypatch, caplog
) -> None:
    """x2paddle 1.6.0 calls ``exit(0)`` when saving its static model fails (a PyTorch
    encoder's reshapes to computed shapes), after the dygraph code and weights: that ended the
    caller's process with status 0."""
    import shutil

    import x2paddle.convert

    path = _hardswish_classifier(tmp_path / "classifier.onnx")
    load_onnx_model(path, tmp_path / "good", {"x": [1, 3, 8, 8]})

    def exits_after_the_dygraph_files(source, save_dir, **kwargs):
        for name in ("x2paddle_code.py", "model.pdparams"):
            shutil.copy(tmp_path / "good" / name, os.path.join(save_dir, name))
        print("cannot save the static model")
        raise SystemExit(0)

    monkeypatch.setattr(x2paddle.convert, "onnx2paddle", exits_after_the_dygraph_files)
    with caplog.at_level(logging.WARNING, logger="imperative_ptq.onnx_import"):
        model = load_onnx_model(path, tmp_path / "exited", {"x": [1, 3, 8, 8]})
    assert "x2paddle could not save the static model of" in caplog.text
    assert "cannot save the static model" in caplog.text
    x = np.random.default_rng(1).random([1, 3, 8, 8], dtype=np.float32)
    np.testing.assert_allclose(model(paddle.to_tensor(x)).numpy(), _per_sample(path, x), rtol=0, atol=1e-5)

    monkeypatch.setattr(x2paddle.convert, "onnx2paddle", lambda *args, **kwargs: (_ for _ in ()).throw(SystemExit(0)))
    with pytest.raises(RuntimeError, match="x2paddle could not convert .* \\(it exited"):
        load_onnx_model(path, tmp_path / "nothing", {"x": [1, 3, 8, 8]})
    assert not (tmp_path / "nothing").exists()


def _pytorch_encoder_file(path) -> str:
    """A Linear and one ``nn.TransformerEncoderLayer`` (d_model 32, 4 heads; ``[batch, 6, 16]``
    inputs) as PyTorch's TorchScript exporter writes it at opset 14, the batch open."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(
        torch.nn.Linear(16, 32),
        torch.nn.TransformerEncoder(
            torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 1, enable_nested_tensor=False
        ),
    ).eval()
    torch.onnx.export(
        encoder, torch.rand(1, 6, 16), str(path), input_names=["x"], output_names=["y"], opset_version=14,
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False,
    )
    return str(path)


def test_fold_shapes_lets_a_pytorch_encoders_reshapes_trace(tmp_path) -> None:
    """PyTorch's export of ``nn.TransformerEncoder`` reshapes to shapes computed from the input
    (``Shape -> Gather -> Concat -> Reshape``): x2paddle keeps them computed, and neither its own
    static save (it then called ``exit(0)``) nor this package's export could trace them.
    ``fold_shapes=True`` folds them into constants first; the int8 export then runs in Paddle
    Inference as simulated."""
    path = _pytorch_encoder_file(tmp_path / "encoder.onnx")
    x = np.random.default_rng(1).random([1, 6, 16], dtype=np.float32)
    expected = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    spec = [paddle.static.InputSpec([1, 6, 16], "float32", "x")]
    rng = np.random.default_rng(2)
    batches = [paddle.to_tensor(rng.random([1, 6, 16], dtype=np.float32)) for _ in range(3)]
    for fold_shapes in (False, True):
        model = load_onnx_model(path, tmp_path / f"fold_{fold_shapes}", {"x": [1, 6, 16]}, fold_shapes=fold_shapes)
        np.testing.assert_allclose(model(paddle.to_tensor(x)).numpy(), expected, rtol=0, atol=1e-5)
        ptq = ip.ImperativePTQ()
        qmodel = ptq.quantize(model)
        for batch in batches:
            qmodel(batch)
        ptq.convert(qmodel)
        prefix = str(tmp_path / f"int8_{fold_shapes}" / "m")
        if not fold_shapes:
            with pytest.raises(ValueError, match="tracing the model with input_spec"):
                ptq.save_quantized_model(qmodel, prefix, spec)
            continue
        simulated = qmodel(paddle.to_tensor(x)).numpy()
        ptq.save_quantized_model(qmodel, prefix, spec)
        ran = predict(create_predictor(prefix, num_threads=1), x)[0]
        np.testing.assert_allclose(ran, simulated, rtol=0, atol=1e-4 * np.abs(simulated).max())
    with pytest.raises(TypeError, match="fold_shapes must be a bool"):
        load_onnx_model(path, tmp_path / "m", fold_shapes="yes")


def test_fold_shapes_with_dynamic_batch_loads_a_pytorch_encoder_for_any_batch(tmp_path) -> None:
    """``nn.MultiheadAttention`` runs time-major and reshapes to ``[sequence, batch * heads,
    head size]``: folded at batch 1, x2paddle writes ``[6, 4, 8]``, a batch inside a size that
    the leading-1 rewrite cannot reach ("dynamic_batch: ... does not compute batch 2"). Such a
    size is now inferred (``-1``): the model computes ONNX Runtime's output at batch 3, and its
    int8 export runs the simulation at batch 3 in both runtimes."""
    from ties import assert_both_runtimes_compute_the_simulation

    path = _pytorch_encoder_file(tmp_path / "encoder.onnx")
    model = load_onnx_model(path, tmp_path / "converted", {"x": [1, 6, 16]}, fold_shapes=True, dynamic_batch=True)
    rng = np.random.default_rng(3)
    x = rng.random([3, 6, 16], dtype=np.float32)
    expected = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(model(paddle.to_tensor(x)).numpy(), expected, rtol=0, atol=1e-5)
    ptq = ip.ImperativePTQ()
    quantized = ptq.quantize(model)
    for _ in range(3):
        quantized(paddle.to_tensor(rng.random([2, 6, 16], dtype=np.float32)))
    ptq.convert(quantized)
    spec = [paddle.static.InputSpec([None, 6, 16], "float32", "x")]
    assert_both_runtimes_compute_the_simulation(ptq, quantized, spec, [x], tmp_path)


def _padded_convs(path, pads_as_computation: bool, value: float = 0.0, pool: bool = False) -> str:
    """``nn.ZeroPad2d((0, 1, 0, 1))`` before a stride-2 conv, as PyTorch's TorchScript exporter
    writes it (its pads a ``ConstantOfShape -> Concat -> Reshape -> Slice -> Transpose ->
    Reshape`` chain of constants if ``pads_as_computation``), then a second conv of the same
    padded tensor and a max-pool of it (``pool``), which a conv's own padding cannot stand for."""
    rng = np.random.default_rng(0)
    ints = lambda name, values: numpy_helper.from_array(np.array(values, np.int64), name)  # noqa: E731
    initializers = [
        numpy_helper.from_array((rng.standard_normal([8, 3, 3, 3]) / 3).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal([8, 8, 3, 3]) / 8).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(value, np.float32), "value"),
    ]
    if pads_as_computation:  # ONNX pads [0, 0, 0, 0, 0, 0, 1, 1] from torch's (0, 1, 0, 1), reversed pairwise
        nodes = [
            helper.make_node("ConstantOfShape", ["four"], ["zeros"], value=numpy_helper.from_array(np.zeros(1, np.int64))),
            helper.make_node("Concat", ["torch_pads", "zeros"], ["all_pads"], axis=0),
            helper.make_node("Reshape", ["all_pads", "pairs"], ["paired"]),
            helper.make_node("Slice", ["paired", "minus_one", "very_negative", "zero", "minus_one"], ["reversed"]),
            helper.make_node("Transpose", ["reversed"], ["transposed"], perm=[1, 0]),
            helper.make_node("Reshape", ["transposed", "flat"], ["pads"]),
        ]
        initializers += [ints("four", [4]), ints("torch_pads", [0, 1, 0, 1]), ints("pairs", [-1, 2]), ints("minus_one", [-1]),
                         ints("very_negative", [-(2 ** 62)]), ints("zero", [0]), ints("flat", [-1])]
    else:
        nodes, initializers = [], initializers + [ints("pads", [0, 0, 0, 0, 0, 0, 1, 1])]
    nodes += [
        helper.make_node("Pad", ["x", "pads", "value"], ["padded"], mode="constant"),
        helper.make_node("Conv", ["padded", "w1"], ["c1"], kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Pad", ["r1", "pads", "value"], ["padded2"], mode="constant"),
        helper.make_node("Conv", ["padded2", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    outputs = ["c2"]
    if pool:
        nodes.append(helper.make_node("MaxPool", ["padded2"], ["pooled"], kernel_shape=[2, 2], strides=[2, 2]))
        outputs.append("pooled")
    shapes = {"c2": [1, 8, 9, 9], "pooled": [1, 8, 5, 5]}
    return _save(
        nodes, initializers, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shapes[name]) for name in outputs], path,
    )


@pytest.mark.parametrize("pads_as_computation", [False, True], ids=["constant-pads", "computed-pads"])
@pytest.mark.parametrize("value,pool,pad_ops", [(0.0, False, 0), (0.5, False, 2), (0.0, True, 1)],
                         ids=["zeros", "non-zero", "read-by-a-pool"])
def test_pads_before_convs_load_and_zero_ones_fold_into_the_convs(tmp_path, pads_as_computation: bool, value, pool, pad_ops) -> None:
    """The TorchScript exporter's computed pads made x2paddle's code fail (``paddle.full`` of
    shape ``[-1]``): small constant computations are folded first. A zero pad that only a conv
    reads becomes that conv's padding (x2paddle's pad op runs outside oneDNN); a pad of another
    value, or one a max-pool also reads, stays a pad op."""
    path = _padded_convs(tmp_path / "padded.onnx", pads_as_computation, value, pool)
    model = load_onnx_model(path, tmp_path / "converted", {"x": [1, 3, 16, 16]}, dynamic_batch=True)
    code = (tmp_path / "converted" / "x2paddle_code.py").read_text()
    assert len(re.findall(r"= paddle\.nn\.Pad2D\(|functional\.pad\(", code)) == pad_ops, code
    x = np.random.default_rng(1).standard_normal([1, 3, 16, 16]).astype(np.float32)
    expected = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    computed = model(paddle.to_tensor(x))
    computed = computed if isinstance(computed, (list, tuple)) else [computed]
    for ours, theirs in zip(computed, expected):
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=1e-5)
