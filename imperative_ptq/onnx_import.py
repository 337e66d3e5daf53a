"""ONNX models as dygraph models to quantize: x2paddle's conversion, with its gaps filled.

x2paddle (``pip install x2paddle``) writes the Paddle code and weights of an ONNX file's model;
:func:`load_onnx_model` runs it and loads the result as a ``paddle.nn.Layer`` that
:class:`~imperative_ptq.ImperativePTQ` quantizes like any other (x2paddle's functional
``paddle.matmul`` calls on parameters are calibrated as Linear layers). On the way it handles
what x2paddle 1.6.0 leaves to its user:

* It refuses files of opsets 16 and newer (PyTorch's default dynamo exporter writes 20): they
  are lowered to opset 15 first (:mod:`imperative_ptq.onnx_opsets`), and weights stored beside
  the file (``<name>.onnx.data``) are read from its directory. A ``Gemm`` without its optional
  bias (the dynamo exporter's Linear with a zero bias) gets a zero one.
* ``Einsum`` and ``DFT`` have no converter: they become ``MatMul`` products
  (:mod:`imperative_ptq.onnx_einsum`, :mod:`imperative_ptq.onnx_dft`), a weight operand or a
  transform's matrix a parameter calibrated as a Linear.
* ``HardSwish`` (MobileNetV3, PP-LCNet) has no converter: it is rewritten first as
  ``Mul(x, HardSigmoid(x, alpha=1/6, beta=0.5))``, which computes the same values.
* ``MaxPool``/``AveragePool`` with ``dilations=[1, 1]`` (every Ultralytics YOLOv8 export's SPPF
  pools) stop it ("only dilations = 0 is supported"): the all-ones attribute is dropped. A pool
  without ``strides`` is converted with Paddle's default stride, the kernel size, where ONNX's
  is 1 (a 3x3 max-pool of an 8x8 map gave 3x3): the default is written out first.
* Its shape inference needs fixed input shapes and may write the batch size it was given into
  the generated code (``paddle.reshape(x, shape=[1, 6, -1])``), after which the model computes
  that batch only: the converted model is run at batch 2, and a warning says so when it fails
  there. With ``dynamic_batch`` each reshape written with a leading ``1`` that reads a tensor
  leading with 1 at batch 1 gets ``0`` there (Paddle's "the input's size here"), which changes
  nothing at batch 1, and the model must then compute at batch 2 what it computes for each
  sample alone; a reshape of a tensor without a batch (YOLOv8's anchor grid ``[W]`` to
  ``[1, W]``) keeps its ``1``.
* What TFLite and jax2tf converters write: a ``PRelu`` slope of shape ``[1, C, 1, 1]`` (x2paddle
  fails on it, and loses a ``[C]`` one's values) is stored as PyTorch's ``[C, 1, 1]``; an
  infinite initializer (a ``Max`` with ``-inf``), which x2paddle writes as a string Paddle
  refuses, becomes the largest finite float32; a global pool of a 3-D tensor becomes a
  reduction over its last axis (x2paddle's adaptive 1-D pool fails every export's trace).
* An already quantized file (``QuantizeLinear``, ``DynamicQuantizeLinear``, ``QLinearConv``,
  ``MatMulInteger``, ...) is refused, naming those ops: quantize the fp32 model instead.
* Its parameters are named after the ONNX initializers, which dygraph refuses to create twice
  in a process: conversion and instantiation each run in a fresh ``unique_name`` scope.
* The conversion is written into a staging directory that is moved into place when complete
  (an interrupted conversion leaves no half-written directory), and a directory that already
  holds the conversion of the same file with the same options is loaded without converting.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import sys
from typing import Mapping, Sequence

import numpy as np
import paddle

from .export.spec_check import error_summary
from .onnx_dft import dfts_as_matmuls
from .onnx_einsum import einsums_as_matmuls
from .onnx_recurrent import recurrent_converters_installed, recurrent_inputs_folded, recurrents_checked
from .onnx_opsets import (
    attribute_text, axes_node, constant_tensors, default_opset, inferred_shapes, inferred_values, input_folded,
    lowered_to_opset_15, tensor_shape, unread_nodes_dropped, with_input_shapes,
)

__all__ = ["QUANTIZED_ONNX_OPS", "load_onnx_model"]

logger = logging.getLogger(__name__)

#: ONNX ops of a file that is already quantized (x2paddle converts none of them).
QUANTIZED_ONNX_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "ConvInteger", "MatMulInteger", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool", "QGemm",
})
#: The stamp file recording which ONNX file and options a conversion directory holds, and
#: which conversion (this module's :data:`_LOADER_VERSION`, x2paddle's version) wrote it.
_STAMP = "onnx_import.json"
_LOADER_VERSION = 15
_CODE = "x2paddle_code.py"
_PARAMS = "model.pdparams"
#: A reshape x2paddle wrote with the batch size of its fixed input shape (1).
_BATCH_ONE_RESHAPE = re.compile(r"(paddle\.reshape\(x=\w+, shape=\[)1, ")
#: How x2paddle makes an ONNX name a variable name (after a ``x2paddle_`` prefix).
_X2PADDLE_NAME_CHARACTERS = str.maketrans({character: "_" for character in " .*?\\/-:;"})
#: A reshape x2paddle wrote to a constant shape.
_CONSTANT_RESHAPE = re.compile(r"(paddle\.reshape\(x=\w+, shape=\[)([-\d, ]+)(\])")


def load_onnx_model(
    onnx_path: str | os.PathLike,
    directory: str | os.PathLike,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    dynamic_batch: bool = False,
    fold_shapes: bool = False,
) -> paddle.nn.Layer:
    """The model of an ONNX file as x2paddle's dygraph model, in eval mode.

    Args:
        onnx_path: The ONNX file (fp32).
        directory: Where x2paddle's code and weights are written (created; reused when it holds
            the conversion of the same file with the same options).
        input_shapes: Input name -> fixed shape for x2paddle's shape inference, e.g.
            ``{"x": [1, 3, 48, 320]}``; ``None``: the file's own shapes.
        dynamic_batch: Make the model run any batch size (the batch of ``input_shapes``, else
            of the file's shapes, must be 1): the reshapes x2paddle wrote with the batch read
            it from their input, checked by running two samples as a batch and alone.

        fold_shapes: Fold the graph's shape computations into constants first (ONNX
            Runtime's basic graph optimizations, the inputs fixed at their shapes): a PyTorch
            export's reshapes to computed shapes (``x.view(b, n, heads, -1)`` in attention)
            become constant reshapes, which Paddle's exports can trace; the model then runs
            at those shapes only (with ``dynamic_batch``, where its reshapes keep the batch
            first). Needs onnxruntime.

    Returns:
        The converted model (its class is x2paddle's ``ONNXModel``).

    Raises:
        ImportError: x2paddle or onnx is not installed.
        FileNotFoundError: ``onnx_path`` does not exist.
        TypeError: ``input_shapes`` is not a mapping of names to integer shapes, or
            ``dynamic_batch`` is not a bool.
        ValueError: The file is already quantized, a node of opset 16 or newer has no opset-15
            form (:func:`~imperative_ptq.onnx_opsets.lowered_to_opset_15`), an
            ``input_shapes`` name is not an input of
            the model, ``dynamic_batch`` is given with a batch other than 1 or without fixed
            shapes, or the batch cannot be made dynamic (x2paddle wrote it elsewhere than in
            reshapes: the model does not compute two samples as a batch as it does alone).
        RuntimeError: x2paddle fails on the file (its error is chained).
    """
    try:
        import onnx
        import x2paddle
        from x2paddle.convert import onnx2paddle
    except ImportError as error:
        raise ImportError(
            f"load_onnx_model needs x2paddle and onnx ({error}): pip install x2paddle==1.6.0 onnx==1.18.0"
        ) from error
    onnx_path, directory = os.fspath(onnx_path), os.fspath(directory)
    if not os.path.isfile(onnx_path):
        raise FileNotFoundError(f"{onnx_path} does not exist")
    for name, flag in (("dynamic_batch", dynamic_batch), ("fold_shapes", fold_shapes)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    shapes = _checked_shapes(input_shapes)
    with open(onnx_path, "rb") as file:
        content = file.read()
    model = onnx.load_from_string(content)
    external = any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in model.graph.initializer)
    if external:  # weights in files beside it (PyTorch's dynamo exporter writes <name>.onnx.data)
        onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(onnx_path)))
    _check_inputs(model, onnx_path, shapes, dynamic_batch)
    stamp = {
        "loader": _LOADER_VERSION,
        "x2paddle": getattr(x2paddle, "__version__", ""),
        "onnx_sha256": hashlib.sha256(model.SerializeToString() if external else content).hexdigest(),
        "input_shapes": shapes,
        "dynamic_batch": dynamic_batch,
        "fold_shapes": fold_shapes,
    }
    if _stamp_of(directory) != stamp:
        _convert(model, onnx_path, directory, stamp, onnx2paddle)
    else:
        logger.info("%s already holds the conversion of %s: loading it", directory, onnx_path)
    return _instantiate(directory)


def _checked_shapes(input_shapes: Mapping[str, Sequence[int]] | None) -> dict[str, list[int]] | None:
    if input_shapes is None:
        return None
    if not isinstance(input_shapes, Mapping):
        raise TypeError(
            f"input_shapes must map input names to shapes, got {type(input_shapes).__name__}"
        )
    shapes = {}
    for name, shape in input_shapes.items():
        if not isinstance(name, str) or isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or not all(
            isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in shape
        ):
            raise TypeError(
                f"input_shapes[{name!r}] must be a list of positive ints (x2paddle needs fixed "
                f"shapes), got {shape!r}"
            )
        shapes[name] = [int(size) for size in shape]
    return shapes


def _check_inputs(model, onnx_path: str, shapes: dict[str, list[int]] | None, dynamic_batch: bool) -> None:
    quantized = sorted({node.op_type for node in model.graph.node} & QUANTIZED_ONNX_OPS)
    if quantized:
        raise ValueError(
            f"{onnx_path} is already quantized ({', '.join(quantized)}): convert and quantize "
            f"its fp32 model instead"
        )
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = [value.name for value in model.graph.input if value.name not in initializers]
    unknown = sorted(set(shapes or ()) - set(inputs))
    if unknown:
        raise ValueError(f"input_shapes names {unknown}, which are not inputs of {onnx_path} (its inputs: {inputs})")
    if dynamic_batch:
        fixed = _input_shapes(model, shapes)
        if fixed is None:
            raise ValueError(
                f"dynamic_batch needs fixed input shapes: give input_shapes (the inputs of "
                f"{onnx_path}: {inputs} have open dimensions besides the batch)"
            )
        if any(shape[0] != 1 for shape, _ in fixed.values()):
            raise ValueError(
                f"dynamic_batch needs batch 1 in input_shapes (converted at batch 1 and 2), got "
                f"{ {name: shape for name, (shape, _) in fixed.items()} }"
            )


def _stamp_of(directory: str) -> dict | None:
    path = os.path.join(directory, _STAMP)
    if not all(os.path.isfile(os.path.join(directory, name)) for name in (_STAMP, _CODE, _PARAMS)):
        return None
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def _input_shapes(model, shapes: dict[str, list[int]] | None) -> dict[str, tuple[list[int], np.dtype]] | None:
    """Each graph input's shape (``shapes``' else the file's, an open batch as 1) and dtype;
    ``None`` if a dimension besides the batch is open."""
    from onnx import helper

    initializers = {tensor.name for tensor in model.graph.initializer}
    fixed = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = [dim.dim_value if dim.HasField("dim_value") else 0 for dim in tensor.shape.dim]
        shape = list((shapes or {}).get(value.name) or dims)
        if shape and shape[0] == 0:
            shape[0] = 1
        if any(size <= 0 for size in shape):
            return None
        fixed[value.name] = (shape, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)))
    return fixed


def _convert(model, onnx_path: str, directory: str, stamp: dict, onnx2paddle) -> None:
    """x2paddle's conversion of ``model`` into ``directory`` (replacing what it held)."""
    staging = directory.rstrip(os.sep) + ".converting"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        source = os.path.join(staging, "model.onnx")
        import onnx

        batch_axes = _output_batch_axes(model)
        inputs = _input_shapes(model, stamp["input_shapes"])
        at_batch_two = None
        if stamp["fold_shapes"]:
            if stamp["dynamic_batch"]:
                doubled = {name: ([2, *shape[1:]], dtype) for name, (shape, dtype) in inputs.items()}
                at_batch_two = _reshape_sizes(_shapes_folded(model, doubled, onnx_path, staging))
            model = _shapes_folded(model, inputs, onnx_path, staging)
        onnx.save(_x2paddle_ready(model, onnx_path, stamp["input_shapes"]), source)
        try:
            _run_x2paddle(onnx2paddle, onnx_path, source, staging, stamp["input_shapes"])
        except RuntimeError as error:
            computed = sum(node.op_type == "Shape" for node in model.graph.node)
            if stamp["fold_shapes"] or not computed:
                raise
            # (measured: a class token expanded to the batch read by Shape, as PyTorch's
            # exporters write a ViT's, fails in x2paddle's shape inference: "KeyError: 0")
            raise RuntimeError(
                f"{error}; the file computes shapes from its inputs ({computed} Shape nodes), which "
                f"x2paddle often fails on: load it with fold_shapes=True, which makes them constants first"
            ) from error
        _code_ready(os.path.join(staging, _CODE))
        if stamp["dynamic_batch"]:
            _make_batch_dynamic(onnx_path, staging, inputs, batch_axes, at_batch_two)
        elif inputs is not None and all(shape[0] == 1 for shape, _ in inputs.values()):
            _warn_if_batch_one_only(onnx_path, staging, inputs, stamp["fold_shapes"], batch_axes)
        os.remove(source)
        with open(os.path.join(staging, _STAMP), "w", encoding="utf-8") as file:
            json.dump(stamp, file)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("converted %s with x2paddle into %s", onnx_path, directory)


def _shapes_folded(model, inputs: dict | None, onnx_path: str, staging: str):
    """``model`` with its inputs fixed at ``inputs``' shapes and ONNX Runtime's basic graph
    optimizations (constant folding: shape computations become constants) applied."""
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise ImportError(f"fold_shapes needs onnxruntime ({error}): pip install onnxruntime") from error
    if inputs is None:
        raise ValueError(f"fold_shapes needs fixed input shapes: give input_shapes for {onnx_path}")
    fixed = with_input_shapes(model, {name: shape for name, (shape, _) in inputs.items()})
    fixed_path, folded_path = os.path.join(staging, "fixed.onnx"), os.path.join(staging, "folded.onnx")
    onnx.save(fixed, fixed_path)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = folded_path
    options.log_severity_level = 3
    # Without its transpose optimizer, which pushes a permute -> LayerNorm -> permute (Hugging
    # Face's ConvNeXt) into a LayerNorm over the channel axis with [1, C, 1, 1] parameters,
    # which x2paddle converts to LayerNorm(normalized_shape=[1]); and without its MatMul + Add
    # fusion, which writes a Linear of a 3-D input as a Gemm between reshapes to and from the
    # batch's rows ([batch * sequence, features]: dynamic_batch cannot make those follow the
    # batch).
    onnxruntime.InferenceSession(
        fixed_path, options, providers=["CPUExecutionProvider"],
        disabled_optimizers=["TransposeOptimizer", "MatMulAddFusion"],
    )
    folded = onnx.load(folded_path)
    for path in (fixed_path, folded_path):
        os.remove(path)
    logger.info("folded %s's shapes: %d nodes -> %d", onnx_path, len(model.graph.node), len(folded.graph.node))
    return folded


def _run_x2paddle(onnx2paddle, onnx_path: str, source: str, target: str, shapes: dict | None) -> None:
    captured = io.StringIO()
    # Parameter names come from the ONNX initializers: a fresh scope for each conversion.
    # (x2paddle prints a line per node, kept for the debug log.)
    try:
        with paddle.utils.unique_name.guard(), contextlib.redirect_stdout(captured), \
                contextlib.redirect_stderr(captured), _x2paddle_isolated(), recurrent_converters_installed():
            onnx2paddle(
                source, target, input_shape_dict=None if shapes is None else str(shapes),
                disable_feedback=True,  # its feedback is a network call
            )
    except SystemExit as error:
        # x2paddle calls exit(0) when paddle.jit.save of the static model it writes last fails
        # (after its dygraph code and weights, which are all this module uses): it ended the
        # caller's process, with status 0 and its message swallowed.
        if not all(os.path.isfile(os.path.join(target, name)) for name in (_CODE, _PARAMS)):
            raise RuntimeError(
                f"x2paddle could not convert {onnx_path} (it exited: {captured.getvalue()[-1000:]})"
            ) from error
        logger.warning(
            "x2paddle could not save the static model of %s (%s); its dygraph model, which is "
            "what is quantized and exported here, is used", onnx_path,
            captured.getvalue().strip().splitlines()[-1][:300] if captured.getvalue().strip() else "no message",
        )
    except Exception as error:  # noqa: BLE001 - x2paddle raises bare asserts and anything else
        cause = _root_cause(error)
        raise RuntimeError(
            f"x2paddle could not convert {onnx_path}: {type(error).__name__}: {error}"
            + ("" if cause is error else f", caused by {type(cause).__name__}: {cause}")
            + f" (its output: {captured.getvalue()[-1000:]})"
        ) from error
    logger.debug("x2paddle:\n%s", captured.getvalue())
    if not os.path.isfile(os.path.join(target, _CODE)):
        raise RuntimeError(
            f"x2paddle wrote no model code for {onnx_path} (its output:\n{captured.getvalue()[-2000:]})"
        )


#: A ``keepdim`` x2paddle wrote as the ONNX integer.
_INTEGER_KEEPDIM = re.compile(r"\bkeepdim=([01])\b")
#: A numpy scalar as numpy 2 prints it (``np.int64(8)``, ``np.float32(0.5)``, ``np.True_``).
_NUMPY_SCALAR = re.compile(r"\bnp\.(?:u?int\d+|float\d+|bool_?)\(([^()]*)\)|\bnp\.(True|False)_")
#: ONNX's cubic ``Resize`` mode as x2paddle passes it to ``F.interpolate`` (Paddle's is ``bicubic``).
_CUBIC_MODE = re.compile(r"\bmode='cubic'")


def _code_ready(code_path: str) -> None:
    """Rewrites what Paddle 3.3.1 and numpy 2 cannot run in x2paddle's code: ``keepdim=1`` /
    ``keepdim=0`` (written as the ONNX integer for ``ReduceSum``) as ``True`` / ``False``
    (``paddle.sum(..., keepdim=1)`` aborts the process: ``TypeError: Cannot interpret '1' as a
    data type``, ``SIGABRT``), and numpy scalars written as numpy 2 prints them
    (``size=[np.int64(8), np.int64(10)]`` of a ``Resize`` by sizes; the code imports no
    ``np``) as their values, and ONNX's ``mode='cubic'`` of ``F.interpolate`` as Paddle's
    ``bicubic``."""
    with open(code_path, encoding="utf-8") as file:
        code = file.read()
    fixed, keepdims = _INTEGER_KEEPDIM.subn(lambda match: f"keepdim={bool(int(match.group(1)))}", code)
    fixed, scalars = _NUMPY_SCALAR.subn(lambda match: match.group(1) or match.group(2), fixed)
    fixed, cubic = _CUBIC_MODE.subn("mode='bicubic'", fixed)
    if keepdims or scalars or cubic:
        with open(code_path, "w", encoding="utf-8") as file:
            file.write(fixed)
        logger.info(
            "rewrote %d integer keepdim arguments, %d numpy scalars and %d cubic modes of x2paddle's code",
            keepdims, scalars, cubic,
        )


@contextlib.contextmanager
def _x2paddle_isolated():
    """x2paddle's conversion on its own: without the static model it saves last
    (``paddle.jit.save`` of its own code), which this module never reads (saving it failed for
    PyTorch encoders' computed reshapes, x2paddle then calls ``exit(0)``; it aborted the process
    on Paddle 3.3.1 for any ``ReduceSum`` with ``keepdims=1``, see :func:`_code_ready`;
    and took most of the conversion's time), and with none of the values its shape inference
    computed for an earlier file: they live in a mutable default argument of
    ``SymbolicShapeInference._infer_impl``, shared by every conversion in the process, and a
    tensor named like one of an earlier model's (``shape``) took that one's value (a
    ``GatherElements`` converted for the earlier model's input shape failed its forward)."""
    from x2paddle.core.program import PaddleGraph
    from x2paddle.decoder.onnx_shape_inference import SymbolicShapeInference

    defaults = SymbolicShapeInference._infer_impl.__defaults__ or ()
    for default in defaults:
        if isinstance(default, dict):
            default.clear()
    original = PaddleGraph.dygraph2static
    PaddleGraph.dygraph2static = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        PaddleGraph.dygraph2static = original


def _root_cause(error: BaseException) -> BaseException:
    """The first exception of ``error``'s chain (x2paddle re-raises a node's error as
    "convert failed node: ..." without its message)."""
    seen = {id(error)}
    while (error.__cause__ or error.__context__) is not None and id(error.__cause__ or error.__context__) not in seen:
        error = error.__cause__ or error.__context__
        seen.add(id(error))
    return error


def _x2paddle_ready(model, onnx_path: str, input_shapes: dict | None = None):
    """``model`` with what x2paddle 1.6.0 cannot read written otherwise: opsets 16 and newer
    lowered to 15 (:func:`~imperative_ptq.onnx_opsets.lowered_to_opset_15`), ``Constant`` values
    of list or scalar form as tensors (:func:`_constants_as_tensors`), ``HardSwish`` as
    ``Mul(x, HardSigmoid(x, 1/6, 0.5))``, all-ones ``dilations`` of pools dropped, the
    default ``strides`` of pools written out (x2paddle leaves them to Paddle, whose default is
    the kernel size, not ONNX's 1), ``DFT`` and ``Einsum`` as ``MatMul`` products
    (:func:`~imperative_ptq.onnx_dft.dfts_as_matmuls`,
    :func:`~imperative_ptq.onnx_einsum.einsums_as_matmuls`), and what :func:`_initializers_ready`,
    :func:`_identities_of_initializers_copied`, :func:`_global_pools_as_reductions`,
    :func:`_kernel_shapes_written`, :func:`_gemm_biases_written`,
    :func:`_integer_ops_typed`, :func:`_uneven_splits_sliced`,
    :func:`_reductions_spelled_out`, :func:`_reduce_sums_one_axis_at_a_time`,
    :func:`_gathers_of_index_arrays_flattened`, :func:`_gather_elements_indices_copied`,
    :func:`_interpolating_resizes_ready`, :func:`_zero_pads_folded_into_convs`,
    :func:`_pad_values_shifted`, :func:`_squeezes_given_axes`, :func:`_trilus_as_masks`,
    :func:`_squares_of_multi_axis_means_multiplied` and :func:`_recurrent_outputs_named`
    rewrite; ``LSTM``/``GRU`` nodes Paddle's layers do not compute are refused
    (:func:`~imperative_ptq.onnx_recurrent.recurrents_checked`; the nodes themselves are
    converted by :func:`~imperative_ptq.onnx_recurrent.convert_recurrent`). ``input_shapes``
    (input name -> the shape converted at) serves the lowering's shape inference."""
    from onnx import helper

    _computed_pads_folded(model)
    dfts_as_matmuls(model)
    lowered_to_opset_15(model, onnx_path, input_shapes)
    einsums_as_matmuls(model)
    _constants_as_tensors(model)
    _initializers_ready(model)
    _identities_of_initializers_copied(model)
    _global_pools_as_reductions(model)
    _kernel_shapes_written(model)
    _gemm_biases_written(model)
    _integer_ops_typed(model)
    _uneven_splits_sliced(model)
    _reductions_spelled_out(model)
    _reduce_sums_one_axis_at_a_time(model)
    _gathers_of_index_arrays_flattened(model)
    _gather_elements_indices_copied(model)
    _interpolating_resizes_ready(model, onnx_path)
    _zero_pads_folded_into_convs(model)
    _pad_values_shifted(model)
    _squeezes_given_axes(model)
    _trilus_as_masks(model, onnx_path)
    _squares_of_multi_axis_means_multiplied(model)
    _recurrent_outputs_named(model)
    recurrents_checked(model, onnx_path)
    recurrent_inputs_folded(model)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    rewritten = dropped = strided = 0
    for node in nodes:
        if node.op_type in ("MaxPool", "AveragePool"):
            attributes = {attribute.name: attribute for attribute in node.attribute}
            dilations = attributes.get("dilations")
            if dilations is not None and all(value == 1 for value in dilations.ints):
                node.attribute.remove(dilations)
                dropped += 1
            if "strides" not in attributes and "kernel_shape" in attributes:
                node.attribute.append(helper.make_attribute("strides", [1] * len(attributes["kernel_shape"].ints)))
                strided += 1
        if node.op_type != "HardSwish":
            model.graph.node.append(node)
            continue
        gate = f"{node.output[0]}.hard_sigmoid"
        model.graph.node.extend([
            helper.make_node("HardSigmoid", [node.input[0]], [gate], alpha=1 / 6, beta=0.5),
            helper.make_node("Mul", [node.input[0], gate], list(node.output), name=node.name),
        ])
        rewritten += 1
    if rewritten:
        logger.info("rewrote %d HardSwish nodes as x * HardSigmoid(x) (x2paddle has no HardSwish)", rewritten)
    if dropped:
        logger.info("dropped dilations=1 of %d pools (x2paddle refuses the attribute)", dropped)
    if strided:
        logger.info("wrote ONNX's default strides=1 into %d pools (x2paddle takes the kernel size)", strided)
    return model


def _initializers_ready(model) -> None:
    """Rewrites, in place, the initializers x2paddle 1.6.0 cannot convert: a ``PRelu`` slope
    of shape ``[1, C, 1, 1]`` (as TFLite converters write it; x2paddle failed on the node, and
    loses a 1-D one's values) becomes PyTorch's ``[C, 1, 1]``, and an infinite value
    (jax2tf's ``Max`` with ``-inf`` for a max-pool's padding; x2paddle writes
    ``fill_value='-inf'``, which Paddle refuses) becomes the largest finite float32 of its
    sign, which every comparison, max, min and softmax it feeds treats alike."""
    from onnx import numpy_helper

    initializers = {initializer.name: initializer for initializer in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    slopes = infinite = 0
    for node in model.graph.node:
        slope = initializers.get(node.input[1]) if node.op_type == "PRelu" and len(node.input) > 1 else None
        if slope is None or readers.get(slope.name) != 1:
            continue
        value = numpy_helper.to_array(slope)
        if value.ndim > 3 and value.size > 1 and all(size == 1 for size in value.shape[:value.ndim - 3]):
            slope.CopyFrom(numpy_helper.from_array(value.reshape(value.shape[value.ndim - 3:]), slope.name))
            slopes += 1
    for initializer in model.graph.initializer:
        value = numpy_helper.to_array(initializer)
        if value.dtype.kind == "f" and np.isinf(value).any():
            largest = np.finfo(value.dtype).max
            finite = np.where(np.isinf(value), np.copysign(largest, value), value).astype(value.dtype)
            initializer.CopyFrom(numpy_helper.from_array(finite, initializer.name))
            infinite += 1
    if slopes:
        logger.info(
            "reshaped %d PRelu slopes of shape [1, C, 1, 1] to [C, 1, 1] (x2paddle converts only those)", slopes
        )
    if infinite:
        logger.info("replaced the infinities of %d initializers by the largest finite float (x2paddle "
                    "writes them as a string Paddle refuses)", infinite)


def _identities_of_initializers_copied(model) -> None:
    """Replaces, in place, each ``Identity`` of an initializer by a copy of the initializer
    under the ``Identity``'s output name. PyTorch's exporter writes one for every parameter
    equal to another (the zero biases of a freshly initialized or zero-initialized net: timm's
    EfficientNet, MobileNetV3, ConvNeXt, CSPDarkNet), and x2paddle takes the initializer away
    from the first conv that reads it: the second failed with ``KeyError: '..._bias not a key
    in dict_keys([...])'``."""
    from onnx import numpy_helper

    initializers = {initializer.name: initializer for initializer in model.graph.initializer}
    outputs = {output.name for output in model.graph.output}
    copied = [
        node for node in model.graph.node
        if node.op_type == "Identity" and node.input[0] in initializers and node.output[0] not in outputs
        and node.output[0] not in initializers
    ]
    for node in copied:
        value = numpy_helper.to_array(initializers[node.input[0]])
        model.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        model.graph.node.remove(node)
    if copied:
        logger.info(
            "copied %d initializers that Identity nodes shared (x2paddle converts each parameter "
            "for one reader)", len(copied),
        )


def _gemm_biases_written(model) -> None:
    """Gives, in place, each ``Gemm`` without its optional ``C`` input a zero bias: x2paddle
    reads a third input (``IndexError: list index out of range``); PyTorch's dynamo exporter
    leaves it out of a Linear whose bias is zero."""
    from onnx import numpy_helper

    shapes = {initializer.name: list(initializer.dims) for initializer in model.graph.initializer}
    written = 0
    for node in model.graph.node:
        if node.op_type != "Gemm" or (len(node.input) > 2 and node.input[2]) or shapes.get(node.input[1], []) == []:
            continue
        transposed = any(attribute.name == "transB" and attribute.i for attribute in node.attribute)
        columns = shapes[node.input[1]][0 if transposed else 1]
        bias = f"{node.output[0]}.zero_bias"
        model.graph.initializer.append(numpy_helper.from_array(np.zeros([columns], np.float32), bias))
        del node.input[2:]
        node.input.append(bias)
        written += 1
    if written:
        logger.info("gave %d Gemm nodes without a bias a zero one (x2paddle reads a third input)", written)


#: Reductions x2paddle 1.6.0 converts wrongly or not at all, as ``ReduceSum`` of terms.
_SPELLED_OUT_REDUCTIONS = frozenset({"ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp"})


def _reductions_spelled_out(model) -> None:
    """Rewrites, in place, each ``ReduceL2`` as ``Sqrt(ReduceSum(x * x))``, ``ReduceL1`` as
    ``ReduceSum(Abs(x))``, ``ReduceSumSquare`` as ``ReduceSum(x * x)``, ``ReduceLogSum`` as
    ``Log(ReduceSum(x))`` and ``ReduceLogSumExp`` (``torch.logsumexp``) as ``Log(ReduceSum(Exp(x
    - m))) + m`` with ``m`` the maximum over the same axes (no overflow): x2paddle writes the
    first two as ``paddle.norm(p=2 / 1, axis=axes)``, which over two axes is Paddle's *matrix*
    norm (the largest singular value; ConvNeXt-V2's GRN, ``torch.norm(x, p=2, dim=(1, 2))``,
    computed the wrong values, and its SVD has no export), and has no converter for the other
    three ("Model is not supported yet")."""
    from onnx import helper

    version = default_opset(model)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    rewritten = 0

    def reduction(op_type: str, data: str, output: str, axes, keepdims: int) -> None:
        if axes is None:  # (every axis)
            model.graph.node.append(helper.make_node(op_type, [data], [output], keepdims=keepdims))
        elif op_type == "ReduceSum":
            reduce, axes_tensors = axes_node("ReduceSum", data, axes, output, version, keepdims=keepdims)
            model.graph.node.append(reduce)
            model.graph.initializer.extend(axes_tensors)
        else:  # (ReduceMax takes its axes as an attribute up to opset 17)
            model.graph.node.append(helper.make_node(op_type, [data], [output], axes=list(axes), keepdims=keepdims))

    for node in nodes:
        if node.op_type not in _SPELLED_OUT_REDUCTIONS:
            model.graph.node.append(node)
            continue
        attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
        axes, keepdims = attributes.get("axes"), int(attributes.get("keepdims", 1))
        stem, source, op_type = node.output[0], node.input[0], node.op_type
        terms, total = f"{stem}.terms", f"{stem}.sum"
        if op_type in ("ReduceL2", "ReduceSumSquare"):
            model.graph.node.append(helper.make_node("Mul", [source, source], [terms]))
        elif op_type == "ReduceL1":
            model.graph.node.append(helper.make_node("Abs", [source], [terms]))
        elif op_type == "ReduceLogSum":
            terms = source
        else:
            reduction("ReduceMax", source, f"{stem}.max_kept", axes, 1)
            model.graph.node.append(helper.make_node("Sub", [source, f"{stem}.max_kept"], [f"{stem}.shifted"]))
            model.graph.node.append(helper.make_node("Exp", [f"{stem}.shifted"], [terms]))
        reduction("ReduceSum", terms, stem if op_type in ("ReduceL1", "ReduceSumSquare") else total, axes, keepdims)
        if op_type == "ReduceL2":
            model.graph.node.append(helper.make_node("Sqrt", [total], [stem]))
        elif op_type == "ReduceLogSum":
            model.graph.node.append(helper.make_node("Log", [total], [stem]))
        elif op_type == "ReduceLogSumExp":
            maximum = f"{stem}.max_kept"
            if not keepdims:
                maximum = f"{stem}.max"
                reduction("ReduceMax", source, maximum, axes, 0)
            model.graph.node.append(helper.make_node("Log", [total], [f"{stem}.log"]))
            model.graph.node.append(helper.make_node("Add", [f"{stem}.log", maximum], [stem]))
        rewritten += 1
    if rewritten:
        logger.info(
            "spelled out %d ReduceL1/L2/SumSquare/LogSum/LogSumExp nodes (x2paddle writes Paddle's matrix "
            "norms for the first two and has none of the others)", rewritten,
        )


def _reduce_sums_one_axis_at_a_time(model) -> None:
    """Rewrites, in place, each ``ReduceSum`` whose axes are an input (opset 13 and later) for
    x2paddle 1.6.0's reading of that form: a sum over several axes becomes one sum per axis
    (it failed: "The truth value of an array with more than one element is ambiguous"), in an
    order that keeps the indices of the axes still to sum; and ``keepdims`` is written out (it
    took a missing one as 0, where ONNX's default is 1)."""
    from onnx import helper, numpy_helper

    constants = constant_tensors(model)
    version = default_opset(model)

    @functools.lru_cache(maxsize=None)
    def ranks() -> dict[str, int]:
        return {name: len(shape) for name, shape in inferred_shapes(model, "sums over axes of both signs").items()}

    nodes = list(model.graph.node)
    del model.graph.node[:]
    rewritten = 0
    for node in nodes:
        axes_input = node.input[1] if node.op_type == "ReduceSum" and len(node.input) > 1 else ""
        if axes_input not in constants:
            model.graph.node.append(node)
            continue
        attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
        keepdims = int(attributes.get("keepdims", 1))
        axes = numpy_helper.to_array(constants[axes_input]).reshape(-1).astype(int).tolist()
        if len(axes) <= 1:
            model.graph.node.append(helper.make_node(
                "ReduceSum", list(node.input), list(node.output), name=node.name, keepdims=keepdims,
                noop_with_empty_axes=int(attributes.get("noop_with_empty_axes", 0)),
            ))
            rewritten += "keepdims" not in attributes
            continue
        if not keepdims:  # each sum drops its axis: the others must keep their indices
            if all(axis >= 0 for axis in axes) or all(axis < 0 for axis in axes):
                axes = sorted(axes, reverse=axes[0] >= 0)  # the last first; the most negative first
            else:
                rank = ranks().get(node.input[0])
                if rank is None:  # (x2paddle then fails on the node, naming it)
                    model.graph.node.append(node)
                    continue
                axes = sorted((axis % rank for axis in axes), reverse=True)
        stem, value = node.output[0], node.input[0]
        for index, axis in enumerate(axes):
            out = node.output[0] if index == len(axes) - 1 else f"{stem}.sum{index}"
            reduce, axis_tensor = axes_node("ReduceSum", value, [axis], out, version, f"{out}.axis", keepdims=keepdims)
            model.graph.node.append(reduce)
            model.graph.initializer.extend(axis_tensor)
            value = out
        rewritten += 1
    if rewritten:
        logger.info("rewrote %d ReduceSum nodes for x2paddle (one axis at a time, keepdims written)", rewritten)


def _gathers_of_index_arrays_flattened(model) -> None:
    """Rewrites, in place, each ``Gather`` of a constant index of rank 2 or more as a
    ``Gather`` of the flattened index and a ``Reshape`` to ONNX's output shape
    (``x.shape[:axis] + index.shape + x.shape[axis + 1:]``): x2paddle's ``paddle.gather``
    reads the index as 1-D and dropped its extra axes (``torch.nn.Unfold`` as exported in
    Hugging Face ConvBERT, whose next 6-axis transpose then failed). The trailing sizes come
    from ONNX's shape inference, else from the input's shape at run time."""
    from onnx import helper, numpy_helper

    constants = constant_tensors(model)
    gathers = [
        node for node in model.graph.node
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] in constants
        and len(constants[node.input[1]].dims) >= 2
    ]
    if not gathers:
        return
    shapes = inferred_shapes(model, "gathers of index arrays")
    for node in gathers:
        index = numpy_helper.to_array(constants[node.input[1]])
        stem, out = node.output[0], node.output[0]
        data_shape = shapes.get(node.input[0])
        axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 0)
        rank = len(data_shape) if data_shape is not None else None
        model.graph.initializer.append(numpy_helper.from_array(index.reshape(-1), f"{stem}.flat_index"))
        node.input[1] = f"{stem}.flat_index"
        node.output[0] = f"{stem}.flat"
        position = list(model.graph.node).index(node)
        if rank is not None and axis < 0:
            axis += rank
        if rank is not None and all(data_shape[axis + 1:]) and axis >= 0:  # (no size open or 0)
            shape = [0] * axis + list(index.shape) + data_shape[axis + 1:]
            model.graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), f"{stem}.shape"))
            reshape = [helper.make_node("Reshape", [node.output[0], f"{stem}.shape"], [out])]
        else:
            ints = lambda name, values: numpy_helper.from_array(np.array(values, np.int64), f"{stem}.{name}")  # noqa: E731
            model.graph.initializer.extend([
                # (after the last axis, -1: an empty slice from "past the end")
                ints("zero", [0]), ints("axis", [axis]), ints("after", [2 ** 62 if axis == -1 else axis + 1]),
                ints("end", [2 ** 62]), ints("index_shape", list(index.shape)),
            ])
            reshape = [
                helper.make_node("Shape", [node.input[0]], [f"{stem}.data_shape"]),
                helper.make_node("Slice", [f"{stem}.data_shape", f"{stem}.zero", f"{stem}.axis"], [f"{stem}.leading"]),
                helper.make_node("Slice", [f"{stem}.data_shape", f"{stem}.after", f"{stem}.end"], [f"{stem}.trailing"]),
                helper.make_node(
                    "Concat", [f"{stem}.leading", f"{stem}.index_shape", f"{stem}.trailing"], [f"{stem}.shape"], axis=0
                ),
                helper.make_node("Reshape", [node.output[0], f"{stem}.shape"], [out]),
            ]
        for offset, new in enumerate(reshape, start=1):
            model.graph.node.insert(position + offset, new)
    logger.info("flattened the index arrays of %d gathers (x2paddle reads an index as 1-D)", len(gathers))


def _gather_elements_indices_copied(model) -> None:
    """Gives, in place, each ``GatherElements`` after the first that reads the same computed
    index tensor its own copy, computed again by a copy of the node that wrote it: x2paddle
    1.6.0 transposes the index's recorded shape in place while converting the first reader,
    and the second was converted for the transposed shape (DeBERTa-v2's relative-position
    attention: the converted model's forward failed)."""
    import onnx

    writers = {output: node for node in model.graph.node for output in node.output}
    seen: set[str] = set()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    copied = 0
    for node in nodes:
        index = node.input[1] if node.op_type == "GatherElements" and len(node.input) > 1 else None
        writer = writers.get(index)
        if index in seen and writer is not None and len(writer.output) == 1:
            again = onnx.NodeProto()
            again.CopyFrom(writer)
            again.name = ""
            again.output[0] = f"{node.output[0]}.index"
            model.graph.node.append(again)
            node.input[1] = again.output[0]
            copied += 1
        if index is not None:
            seen.add(index)
        model.graph.node.append(node)
    if copied:
        logger.info("computed the shared index of %d GatherElements again for each (x2paddle reshapes it in place)", copied)


#: ONNX Resize coordinate modes x2paddle 1.6.0 converts to Paddle's for linear and cubic
#: interpolation (``half_pixel`` is written as the first where no output size is 1).
_RESIZE_COORDINATE_MODES = frozenset({"pytorch_half_pixel", "align_corners"})

#: ``cubic_coeff_a`` of Paddle's bicubic interpolation (ONNX's default, PyTorch's).
_PADDLE_CUBIC_COEFFICIENT = -0.75


def _interpolating_resizes_ready(model, onnx_path: str) -> None:
    """Writes, in place, each linear or cubic ``Resize`` in a form x2paddle converts to what
    ONNX computes: ``half_pixel`` coordinates (ONNX's default, and what PyTorch writes for
    ``F.interpolate(mode="bilinear"|"bicubic", align_corners=False)``) as
    ``pytorch_half_pixel``, the same wherever no output size is 1 (x2paddle converts a linear
    ``Resize`` by scales in any mode but ``pytorch_half_pixel`` to Paddle's
    ``align_corners=True``: measured 25% of the largest value off ONNX Runtime), and a cubic
    ``Resize`` by scales with ``align_corners`` coordinates by its output sizes (x2paddle drops
    the mode of one by scales: measured 36% off). Its code's ``mode='cubic'`` becomes Paddle's
    ``bicubic`` (:func:`_code_ready`), which computes ONNX's cubic with ``cubic_coeff_a=-0.75``
    and ``exclude_outside=0`` (PyTorch's) within 6e-7. Other coordinate modes (``asymmetric``,
    ``tf_crop_and_resize``, ...), other cubic coefficients, ``exclude_outside=1`` and a
    ``half_pixel`` resize to a size of 1 raise a ``ValueError`` naming the nodes."""
    from onnx import helper, numpy_helper

    shapes = None
    wrong = []
    rewritten = sized = 0
    for node in model.graph.node:
        if node.op_type != "Resize":
            continue
        for position in range(1, len(node.input) - 1):  # x2paddle reads each input by position: none left out
            if not node.input[position]:
                node.input[position] = f"{node.output[0]}.empty{position}"
                model.graph.initializer.append(numpy_helper.from_array(np.zeros([0], np.float32), node.input[position]))
        attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
        mode = attribute_text(attributes.get("mode", b"nearest"))
        if mode not in ("linear", "cubic"):
            continue
        name = repr(node.name or node.output[0])
        coefficient = float(attributes.get("cubic_coeff_a", _PADDLE_CUBIC_COEFFICIENT))
        if mode == "cubic" and (coefficient != _PADDLE_CUBIC_COEFFICIENT or attributes.get("exclude_outside", 0)):
            wrong.append(f"{name} (cubic_coeff_a={coefficient:g}, exclude_outside={attributes.get('exclude_outside', 0)}; "
                         f"Paddle's bicubic is {_PADDLE_CUBIC_COEFFICIENT:g}, 0)")
            continue
        coordinates = attribute_text(attributes.get("coordinate_transformation_mode", b"half_pixel"))
        if coordinates not in _RESIZE_COORDINATE_MODES and coordinates != "half_pixel":
            wrong.append(f"{name} ({mode}, {coordinates})")
            continue
        if shapes is None:
            shapes = inferred_shapes(model, "interpolating resizes")
        output_shape = shapes.get(node.output[0], [])
        if coordinates == "half_pixel" and 1 in output_shape[2:]:
            wrong.append(f"{name} ({mode}, half_pixel to a size of 1)")
            continue
        if coordinates == "half_pixel":
            for attribute in list(node.attribute):
                if attribute.name == "coordinate_transformation_mode":
                    node.attribute.remove(attribute)
            node.attribute.append(helper.make_attribute("coordinate_transformation_mode", "pytorch_half_pixel"))
            rewritten += 1
        if mode == "cubic" and coordinates == "align_corners" and len(node.input) == 3:
            if not output_shape or None in output_shape or 0 in output_shape:
                wrong.append(f"{name} (cubic, align_corners, by scales to an output shape shape inference leaves open)")
                continue
            sizes = numpy_helper.from_array(np.array(output_shape, np.int64), f"{node.output[0]}.sizes")
            model.graph.initializer.append(sizes)
            node.input[2] = f"{node.output[0]}.empty2"
            model.graph.initializer.append(numpy_helper.from_array(np.zeros([0], np.float32), node.input[2]))
            node.input.append(sizes.name)
            sized += 1
    if wrong:
        raise ValueError(
            f"{onnx_path} has Resize nodes that x2paddle 1.6.0 converts wrongly: {', '.join(wrong[:8])}; "
            f"it converts linear and cubic (cubic_coeff_a=-0.75, exclude_outside=0) resizes with "
            f"half_pixel (to sizes above 1), pytorch_half_pixel and align_corners coordinates"
        )
    if rewritten:
        logger.info("wrote the half_pixel coordinates of %d linear/cubic resizes as pytorch_half_pixel", rewritten)
    if sized:
        logger.info("wrote %d cubic align_corners resizes by scales as resizes by sizes", sized)


def _computed_pads_folded(model) -> None:
    """Replaces, in place, the ``pads`` and value inputs of each ``Pad`` node that are computed
    from constants only by initializers of their values (:func:`input_folded`): PyTorch's
    TorchScript exporter writes the pads of ``F.pad``/``nn.ZeroPad2d`` as a chain of
    ``ConstantOfShape``, ``Concat``, ``Reshape``, ``Slice`` and ``Transpose`` of constants,
    which x2paddle converted into code that failed (``paddle.full`` of shape ``[-1]``)."""
    constants = constant_tensors(model)
    producers = {output: node for node in model.graph.node for output in node.output}
    folded = sum(
        input_folded(model, node, position, constants, producers)
        for node in model.graph.node if node.op_type == "Pad" for position in (1, 2)
    )
    if folded:
        unread_nodes_dropped(model)
        logger.info("folded %d pad amounts computed from constants into constants", folded)


def _constants_as_tensors(model) -> None:
    """Writes, in place, each ``Constant`` node of a list or scalar value (``value_ints``,
    ``value_float``, ...) with its value as a tensor, the one form x2paddle 1.6.0 converts
    (``AttributeError: 'NoneType' object has no attribute 'dtype'``)."""
    from onnx import helper

    constants = constant_tensors(model)
    written = 0
    for index, node in enumerate(model.graph.node):
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name != "value" \
                and node.output[0] in constants:
            model.graph.node[index].CopyFrom(
                helper.make_node("Constant", [], list(node.output), name=node.name, value=constants[node.output[0]])
            )
            written += 1
    if written:
        logger.info("wrote the values of %d Constant nodes as tensors (x2paddle reads no other form)", written)


def _zero_pads_folded_into_convs(model) -> None:
    """Folds, in place, each constant-mode ``Pad`` of zeros over spatial axes only that a single
    ``Conv`` reads (and nothing else) into that conv's ``pads``, which compute the same values:
    PyTorch's ``nn.ZeroPad2d``/``F.pad`` before a conv (TensorFlow's asymmetric "same" padding
    ported), which x2paddle writes as a ``pad`` op that Paddle Inference must keep out of oneDNN
    (:func:`imperative_ptq.export.predictor.create_predictor`; ``benchmarks/onnx_pads.py``, a
    9-conv net at batch 8 on one thread: 1.35x the time of the same net with its pads in the
    convs)."""
    from onnx import helper, numpy_helper

    constants = constant_tensors(model)
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_outputs = {output.name for output in model.graph.output}
    producers = {node.output[0]: node for node in model.graph.node if node.op_type == "Pad"}
    folded = []
    for conv in model.graph.node:
        pad = producers.get(conv.input[0]) if conv.op_type == "Conv" else None
        if pad is None or len(readers.get(pad.output[0], [])) != 1 or pad.output[0] in graph_outputs:
            continue
        pad_attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in pad.attribute}
        conv_attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in conv.attribute}
        if pad_attributes.get("mode", b"constant") not in (b"constant", "constant"):
            continue
        if conv_attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        if "pads" in pad_attributes:  # (opset 10 and older)
            pads, value = np.array(pad_attributes["pads"], np.int64), pad_attributes.get("value", 0.0)
        elif len(pad.input) > 1 and pad.input[1] in constants and (len(pad.input) < 4 or not pad.input[3]):
            pads = numpy_helper.to_array(constants[pad.input[1]]).astype(np.int64)
            value_name = pad.input[2] if len(pad.input) > 2 else ""
            if value_name and value_name not in constants:
                continue
            value = numpy_helper.to_array(constants[value_name]) if value_name else 0.0
        else:
            continue
        rank = len(pads) // 2
        begins, ends = pads[:rank], pads[rank:]
        if np.any(value) or np.any(pads < 0) or np.any(begins[:2]) or np.any(ends[:2]):
            continue
        spatial = rank - 2
        conv_pads = np.array(conv_attributes.get("pads", [0] * (2 * spatial)), np.int64)
        merged = conv_pads + np.concatenate([begins[2:], ends[2:]])
        for attribute in list(conv.attribute):
            if attribute.name in ("pads", "auto_pad"):
                conv.attribute.remove(attribute)
        conv.attribute.append(helper.make_attribute("pads", [int(size) for size in merged]))
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        model.graph.node.remove(pad)
    if folded:
        logger.info("folded %d zero Pad nodes into the convs reading them (x2paddle writes a pad op)", len(folded))


def _pad_values_shifted(model) -> None:
    """Rewrites, in place, each constant-mode ``Pad`` of a non-zero constant value ``v`` (its
    third input, opset 11 and later) as ``Pad(x - v, pads, 0) + v``: x2paddle reads the value
    from the attribute of older opsets only and padded with 0 (``F.pad(x, pads, value=0.5)``
    0.5 off, silently). The shifted form rounds inside values by at most an ulp."""
    from onnx import helper, numpy_helper

    constants = constant_tensors(model)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    rewritten = 0
    for node in nodes:
        value_name = node.input[2] if node.op_type == "Pad" and len(node.input) > 2 else ""
        mode = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "mode"), b"constant")
        value = numpy_helper.to_array(constants[value_name]) if value_name in constants else None
        if value is None or mode != b"constant" or not np.any(value) or value.dtype.kind != "f":
            model.graph.node.append(node)
            continue
        stem = node.output[0]
        zero = numpy_helper.from_array(np.zeros_like(value), f"{stem}.zero")
        model.graph.initializer.append(zero)
        padded = helper.make_node("Pad", [f"{stem}.shifted", node.input[1], zero.name] + list(node.input[3:]), [f"{stem}.padded"], mode="constant")
        model.graph.node.extend([
            helper.make_node("Sub", [node.input[0], value_name], [f"{stem}.shifted"]),
            padded,
            helper.make_node("Add", [f"{stem}.padded", value_name], [stem]),
        ])
        rewritten += 1
    if rewritten:
        logger.info("padded %d Pad nodes of a non-zero value as a shift (x2paddle pads with 0)", rewritten)


def _trilus_as_masks(model, onnx_path: str) -> None:
    """Rewrites, in place, each ``Trilu`` (``torch.triu``/``tril`` of a computed tensor, opset
    14) as a ``Where`` of a constant mask of its last two axes, which shape inference must
    know, as the diagonal offset ``k`` must be a constant: x2paddle has no ``Trilu`` ("Model is
    not supported yet"). ``Where`` keeps an infinity above the diagonal (a causal mask of
    ``-inf``) where a product by a 0/1 mask would write NaN. Others raise a ``ValueError``
    naming them."""
    from onnx import helper, numpy_helper

    if not any(node.op_type == "Trilu" for node in model.graph.node):
        return
    values = {value.name: value.type.tensor_type for value in inferred_values(model, "Trilu nodes", data_prop=True) or []}
    constants = constant_tensors(model)
    wrong, rewritten = [], 0
    nodes = list(model.graph.node)
    del model.graph.node[:]
    for node in nodes:
        if node.op_type != "Trilu":
            model.graph.node.append(node)
            continue
        tensor_type = values.get(node.input[0])
        shape = tensor_shape(tensor_type) or []
        offset = node.input[1] if len(node.input) > 1 else ""
        if len(shape) < 2 or None in shape[-2:] or 0 in shape[-2:]:
            wrong.append(f"{node.name or node.output[0]!r} (input shape {shape or 'unknown'})")
            model.graph.node.append(node)
            continue
        if offset and offset not in constants:
            wrong.append(f"{node.name or node.output[0]!r} (a computed diagonal offset {offset!r})")
            model.graph.node.append(node)
            continue
        k = int(numpy_helper.to_array(constants[offset]).reshape(-1)[0]) if offset else 0
        upper = bool(next((attribute.i for attribute in node.attribute if attribute.name == "upper"), 1))
        rows, columns = shape[-2:]
        above = np.arange(columns)[None, :] - np.arange(rows)[:, None]
        mask = above >= k if upper else above <= k
        stem = node.output[0]
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        model.graph.initializer.extend([
            numpy_helper.from_array(mask, f"{stem}.mask"), numpy_helper.from_array(np.zeros([], dtype), f"{stem}.zero"),
        ])
        model.graph.node.append(
            helper.make_node("Where", [f"{stem}.mask", node.input[0], f"{stem}.zero"], [stem], name=node.name)
        )
        rewritten += 1
    if wrong:
        raise ValueError(
            f"{onnx_path} has Trilu nodes (x2paddle has none) that no constant mask computes: {', '.join(wrong[:8])}; "
            "the last two axes must have sizes shape inference knows (input_shapes) and the offset k must be a constant"
        )
    logger.info("wrote %d Trilu nodes as a Where of a constant mask (x2paddle has no Trilu)", rewritten)


def _squeezes_given_axes(model) -> None:
    """Gives, in place, each ``Squeeze`` without axes (every axis of size 1: PyTorch's default
    exporter writes ``x.mean()`` as ``ReduceMean`` and such a ``Squeeze``) its axes, from
    ONNX's shape inference: x2paddle reads them by position (``IndexError``)."""
    squeezes = [
        node for node in model.graph.node
        if node.op_type == "Squeeze" and len([name for name in node.input if name]) == 1
        and not any(attribute.name == "axes" for attribute in node.attribute)
    ]
    if not squeezes:
        return
    shapes = inferred_shapes(model, "squeezes without axes")
    version = default_opset(model)
    given = 0
    for node in squeezes:
        shape = shapes.get(node.input[0])
        if shape is None or None in shape:
            continue
        # One axis per Squeeze, the last first (x2paddle also fails on several axes given as
        # an input: "The truth value of an array ... is ambiguous").
        axes = [axis for axis, size in enumerate(shape) if size == 1][::-1]
        if not axes:
            continue
        position = list(model.graph.node).index(node)
        source, stem = node.input[0], node.output[0]
        chain = []
        for index, axis in enumerate(axes):
            out = stem if index == len(axes) - 1 else f"{stem}.squeezed{index}"
            squeeze, axis_tensor = axes_node("Squeeze", source, [axis], out, version)
            chain.append(squeeze)
            model.graph.initializer.extend(axis_tensor)
            source = out
        model.graph.node.remove(node)
        for offset, new in enumerate(chain):
            model.graph.node.insert(position + offset, new)
        given += 1
    if given:
        logger.info("wrote the axes of %d squeezes without them (x2paddle reads them by position)", given)


def _squares_of_multi_axis_means_multiplied(model) -> None:
    """Rewrites, in place, each ``Pow(x, 2)`` read by a ``ReduceMean`` over several axes as
    ``Mul(x, x)``: x2paddle fuses PyTorch's LayerNorm pattern (``ReduceMean -> Sub -> Pow ->
    ReduceMean -> ...``) into ``paddle.nn.LayerNorm([the scale's first size])``, whatever its
    axes (``nn.LayerNorm([C, W])`` at opset 15 and older: the converted model's forward
    failed)."""
    from onnx import helper, numpy_helper

    constants = constant_tensors(model)
    multi_axis_means = set()
    for node in model.graph.node:
        if node.op_type != "ReduceMean":
            continue
        axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
        if axes is None and len(node.input) > 1 and node.input[1] in constants:
            axes = numpy_helper.to_array(constants[node.input[1]]).reshape(-1).tolist()
        if axes is not None and len(axes) > 1:
            multi_axis_means.add(node.input[0])
    rewritten = 0
    for index, node in enumerate(model.graph.node):
        if node.op_type == "Pow" and node.output[0] in multi_axis_means and node.input[1] in constants \
                and numpy_helper.to_array(constants[node.input[1]]).size == 1 \
                and float(numpy_helper.to_array(constants[node.input[1]]).reshape(-1)[0]) == 2.0:
            model.graph.node[index].CopyFrom(
                helper.make_node("Mul", [node.input[0], node.input[0]], list(node.output), name=node.name)
            )
            rewritten += 1
    if rewritten:
        logger.info("wrote %d squares before means over several axes as products (x2paddle's LayerNorm fusion)", rewritten)


#: Outputs of ONNX's recurrent ops (``Y``, ``Y_h`` and, for an LSTM, ``Y_c``).
_RECURRENT_OUTPUTS = {"LSTM": 3, "GRU": 2, "RNN": 2}


def _recurrent_outputs_named(model) -> None:
    """Names, in place, the optional outputs a recurrent node leaves out (PyTorch's default
    exporter writes an ``nn.LSTM`` whose states are unused with its ``Y`` only): x2paddle
    reads each by position ("Output numbers of Node ... is 1 <= index:1")."""
    named = 0
    for node in model.graph.node:
        count = _RECURRENT_OUTPUTS.get(node.op_type)
        if count is None or (len(node.output) >= count and all(node.output[:count])):
            continue
        while len(node.output) < count:
            node.output.append("")
        for position in range(count):
            if not node.output[position]:
                node.output[position] = f"{node.name or node.output[0]}.unused_output{position}"
        named += 1
    if named:
        logger.info("named the left-out outputs of %d recurrent nodes (x2paddle reads them by position)", named)


def _kernel_shapes_written(model) -> None:
    """Writes, in place, the optional ``kernel_shape`` of each ``Conv`` that lacks it from its
    weight initializer's shape (x2paddle failed: ``object of type 'NoneType' has no len()``)."""
    from onnx import helper

    shapes = {initializer.name: list(initializer.dims) for initializer in model.graph.initializer}
    written = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose") or len(node.input) < 2 or node.input[1] not in shapes:
            continue
        if any(attribute.name == "kernel_shape" for attribute in node.attribute):
            continue
        node.attribute.append(helper.make_attribute("kernel_shape", shapes[node.input[1]][2:]))
        written += 1
    if written:
        logger.info("wrote the kernel_shape of %d convs from their weights (x2paddle needs it)", written)


#: ONNX's integer element types.
_INTEGER_TYPES = frozenset(range(2, 8)) | {12, 13}  # UINT8..INT64, UINT32, UINT64


def _integer_ops_typed(model) -> None:
    """Rewrites, in place, the integer ops whose x2paddle translation computes another type
    in Paddle 3: a ``Div`` of integers (ONNX truncates to an integer; ``paddle.divide`` gives a
    float32 quotient, and the op of it with an integer next failed the trace: ``torch.chunk``'s
    sizes in EdgeNeXt, ``//`` in Hugging Face's Swin) becomes ``Cast(Div(Cast(a, double),
    Cast(b, double)), type)`` (the cast truncates toward zero, as ONNX does); a ``CumSum`` of
    int32 (``paddle.cumsum`` returns int64; RoBERTa's position ids ``cumsum(mask) * mask``
    failed) gets a ``Cast`` back to its type."""
    from onnx import TensorProto, helper

    if not any(node.op_type in ("Div", "CumSum") for node in model.graph.node):
        return
    values = inferred_values(model, "integer ops")
    if values is None:
        return
    types = {value.name: value.type.tensor_type.elem_type for value in values}
    types.update({name: tensor.data_type for name, tensor in constant_tensors(model).items()})
    nodes = list(model.graph.node)
    del model.graph.node[:]
    divisions = cumsums = 0
    for node in nodes:
        kind = types.get(node.input[0]) if node.input else None
        stem = node.name or node.output[0]
        if node.op_type == "Div" and kind in _INTEGER_TYPES and types.get(node.input[1]) == kind:
            operands = [f"{stem}.dividend", f"{stem}.divisor"]
            model.graph.node.extend([
                *(helper.make_node("Cast", [name], [cast], to=TensorProto.DOUBLE)
                  for name, cast in zip(node.input, operands)),
                helper.make_node("Div", operands, [f"{stem}.quotient"], name=node.name),
                helper.make_node("Cast", [f"{stem}.quotient"], list(node.output), to=kind),
            ])
            divisions += 1
        elif node.op_type == "CumSum" and kind in _INTEGER_TYPES and kind != TensorProto.INT64:
            output = node.output[0]
            node.output[0] = f"{output}.int64"
            model.graph.node.extend([node, helper.make_node("Cast", [node.output[0]], [output], to=kind)])
            cumsums += 1
        else:
            model.graph.node.append(node)
    if divisions or cumsums:
        logger.info(
            "rewrote %d integer divisions as truncated float64 ones and cast %d integer cumsums back "
            "to their type (x2paddle's Paddle ops return float32 / int64)", divisions, cumsums,
        )


def _uneven_splits_sliced(model) -> None:
    """Rewrites, in place, each ``Split`` into parts of constant, unequal sizes (its ``split``
    input, opset 13 and later) as one ``Slice`` per part: x2paddle's shape inference ignores
    that input and splits evenly (LeViT's ``kv.split([16, 64], dim=3)`` became two parts of
    40, and the conversion failed with ``KeyError: 0``)."""
    from onnx import helper, numpy_helper

    constants = constant_tensors(model)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    sliced = 0
    for node in nodes:
        sizes = None
        if node.op_type == "Split" and len(node.input) > 1 and node.input[1] in constants:
            sizes = numpy_helper.to_array(constants[node.input[1]]).reshape(-1).tolist()
        if sizes is None or len(set(sizes)) == 1 or len(sizes) != len(node.output):
            model.graph.node.append(node)
            continue
        axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 0)
        stem = node.name or node.output[0]
        ends = np.cumsum(sizes).tolist()
        for index, (output, end) in enumerate(zip(node.output, ends)):
            bounds = [f"{stem}.start{index}", f"{stem}.end{index}", f"{stem}.axis{index}"]
            for name, value in zip(bounds, (end - sizes[index], end, axis)):
                model.graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), name))
            model.graph.node.append(helper.make_node("Slice", [node.input[0], *bounds], [output]))
        sliced += 1
    if sliced:
        logger.info("rewrote %d splits into unequal parts as slices (x2paddle splits evenly)", sliced)


def _global_pools_as_reductions(model) -> None:
    """Rewrites, in place, each ``GlobalMaxPool``/``GlobalAveragePool`` of a 3-D tensor (a
    Conv1D head) as ``ReduceMax``/``ReduceMean`` over its last axis: x2paddle converts it to
    Paddle's adaptive 1-D pool, which runs in dygraph but fails every export's trace (its
    ``output_size`` given as a list)."""
    from onnx import helper

    ranks = {name: len(shape) for name, shape in inferred_shapes(model, "global pools").items()}
    reductions = {"GlobalMaxPool": "ReduceMax", "GlobalAveragePool": "ReduceMean"}
    rewritten = 0
    for index, node in enumerate(model.graph.node):
        if node.op_type in reductions and ranks.get(node.input[0]) == 3:
            model.graph.node[index].CopyFrom(helper.make_node(
                reductions[node.op_type], list(node.input), list(node.output), name=node.name, axes=[2], keepdims=1,
            ))
            rewritten += 1
    if rewritten:
        logger.info("rewrote %d global pools of 3-D tensors as reductions over their last axis", rewritten)


def _output_batch_axes(model) -> list[int | None]:
    """The axis of each graph output that the file names as the batch (the name of an input's
    leading dimension: PyTorch's exporter writes a recurrent layer's final state ``[directions,
    batch, hidden]`` so); ``None`` where it names none."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    batch_names = {
        value.type.tensor_type.shape.dim[0].dim_param for value in model.graph.input
        if value.name not in initializers and value.type.tensor_type.shape.dim
    } - {""}
    axes = []
    for value in model.graph.output:
        named = [axis for axis, dim in enumerate(value.type.tensor_type.shape.dim) if dim.dim_param in batch_names]
        axes.append(named[0] if len(named) == 1 else None)
    return axes


def _batch_axis(named: int | None, single: np.ndarray, double: np.ndarray) -> int:
    """The batch axis of an output computed for one sample (``single``) and for two
    (``double``): the file's name for it, else the one axis of size 1 that became 2, else 0."""
    if named is not None:
        return named
    if single.ndim == double.ndim:
        changed = [axis for axis, (one, two) in enumerate(zip(single.shape, double.shape)) if one != two]
        if len(changed) == 1 and (single.shape[changed[0]], double.shape[changed[0]]) == (1, 2):
            return changed[0]
    return 0


def _make_batch_dynamic(
    onnx_path: str, staging: str, inputs: dict, batch_axes: list[int | None],
    at_batch_two: dict[str, list[int]] | None = None,
) -> None:
    """Rewrites each reshape of ``staging``'s code that x2paddle wrote with a leading 1 and that
    reads a tensor leading with size 1 at batch 1 (a tensor of the batch) to copy its input's
    leading size (``0``), and each reshape whose written sizes hold the batch inside one of them
    (``at_batch_two``: the sizes of the graph folded at batch 2) to infer that one (``-1``,
    :func:`_reshapes_holding_the_batch`), and checks that the model then computes at batch 2
    what it computes for each sample alone. A reshape of a tensor without a batch (an anchor
    grid ``[W]`` to ``[1, W]``) keeps its 1; at batch 1 the rewrites compute the same as before
    by design."""
    code_path = os.path.join(staging, _CODE)
    model = _instantiate(staging)
    rng = np.random.default_rng(0)
    samples = [_example_inputs(inputs, 1, rng) for _ in range(2)]
    per_sample = [_outputs(model, sample) for sample in samples]
    reshapes = _reshape_inputs(model, code_path, samples[0])
    with open(code_path, encoding="utf-8") as file:
        lines = file.read().split("\n")
    rewritten = [
        number for number, line in enumerate(lines, start=1)
        if _BATCH_ONE_RESHAPE.search(line) and reshapes.get(number, [0])[:1] == [1]
    ]
    for number in rewritten:
        lines[number - 1] = _BATCH_ONE_RESHAPE.sub(r"\g<1>0, ", lines[number - 1])
    inferred = _reshapes_holding_the_batch(lines, rewritten, at_batch_two or {})
    for number, axis in inferred.items():
        lines[number - 1] = _with_size_inferred(lines[number - 1], axis)
    rewritten += list(inferred)
    with open(code_path, "w", encoding="utf-8") as file:
        file.write("\n".join(lines))
    batch = [paddle.concat([first, second]) for first, second in zip(*samples)]
    try:
        ran = _outputs(_instantiate(staging), batch)
        problem = next(filter(None, (
            _batch_problem(index, out, a, b, _batch_axis(named, a, out))
            for index, (out, a, b, named) in enumerate(zip(ran, *per_sample, _padded(batch_axes, len(ran))))
        )), None)
    except Exception as error:  # noqa: BLE001 - any failure at batch 2 is what this reports
        problem = f"it fails: {type(error).__name__}: {error_summary(error)}"
    if problem is not None:
        raise ValueError(
            f"dynamic_batch: {onnx_path}'s model does not compute batch 2 as its samples alone "
            f"after the batch of {len(rewritten)} reshapes was made dynamic ({problem}): "
            f"x2paddle wrote the batch size elsewhere too; convert at a fixed batch"
        )
    logger.info(
        "made the batch of %d reshapes follow the input's (%d inferred where the batch sits "
        "inside a size)", len(rewritten), len(inferred),
    )


def _with_size_inferred(line: str, axis: int) -> str:
    """``line`` (a reshape of x2paddle's code to constant sizes) with its size on ``axis``
    written ``-1``."""
    def inferred(match: re.Match) -> str:
        sizes = [size.strip() for size in match.group(2).split(",")]
        sizes[axis] = "-1"
        return match.group(1) + ", ".join(sizes) + match.group(3)

    return _CONSTANT_RESHAPE.sub(inferred, line)


def _reshape_sizes(model) -> dict[str, list[int]]:
    """x2paddle's variable name of each ``Reshape`` output of ``model`` -> the sizes it
    reshapes to, where those are a constant."""
    from onnx import numpy_helper

    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    return {
        "x2paddle_" + node.output[0].translate(_X2PADDLE_NAME_CHARACTERS): [
            int(size) for size in numpy_helper.to_array(constants[node.input[1]]).reshape(-1)
        ]
        for node in model.graph.node
        if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in constants
    }


def _reshapes_holding_the_batch(lines: list[str], skipped: list[int], at_batch_two: dict[str, list[int]]) -> dict[int, int]:
    """Line -> axis, for each reshape of x2paddle's code to constant sizes (written at batch 1)
    whose sizes at batch 2 (``at_batch_two``, by output variable, from the same graph folded at
    batch 2) differ on one axis only, twofold: the batch inside that size (PyTorch's attention
    reshapes a time-major ``[sequence, batch, features]`` to ``[sequence, batch * heads, head
    size]``, ``[6, 4, 8]`` at batch 1, ``[6, 8, 8]`` at 2). Lines in ``skipped`` are left out."""
    found = {}
    for number, line in enumerate(lines, start=1):
        match = _CONSTANT_RESHAPE.search(line)
        assigned = line.split("=", 1)[0].strip()
        if match is None or number in skipped or assigned not in at_batch_two:
            continue
        one = [int(size) for size in match.group(2).split(",") if size.strip()]
        two = at_batch_two[assigned]
        changed = [axis for axis, (a, b) in enumerate(zip(one, two)) if a != b]
        if len(one) == len(two) and -1 not in one and len(changed) == 1 and two[changed[0]] == 2 * one[changed[0]]:
            found[number] = changed[0]
    return found


def _padded(batch_axes: list[int | None], count: int) -> list[int | None]:
    """``batch_axes`` for ``count`` outputs (x2paddle may return fewer or more than the file's)."""
    return (list(batch_axes) + [None] * count)[:count]


def _batch_problem(index: int, batch: np.ndarray, first: np.ndarray, second: np.ndarray, axis: int) -> str | None:
    """How output ``index`` computed for two samples as a batch differs from the two computed
    alone (concatenated on its batch ``axis``); ``None`` where it agrees, or where the output
    has no batch of 1 on that axis (it does not depend on the batch)."""
    if first.ndim <= axis or first.shape[axis] != 1:
        return None
    expected = np.concatenate([first, second], axis=axis)
    if batch.shape != expected.shape:
        return f"output {index} has shape {list(batch.shape)}, not {list(expected.shape)}"
    scale = max(float(np.abs(first).max(initial=0)), 1.0)
    if not np.allclose(batch, expected, rtol=1e-4, atol=1e-5 * scale):
        return f"output {index} is {float(np.abs(batch - expected).max()):.3g} off the samples' own"
    return None


def _reshape_inputs(model: paddle.nn.Layer, code_path: str, inputs: list[paddle.Tensor]) -> dict[int, list[int]]:
    """Line of x2paddle's code -> the shape of the first tensor its ``paddle.reshape`` reshapes
    in a forward on ``inputs``."""
    seen: dict[int, list[int]] = {}
    original = paddle.reshape
    # (importlib names the code by its absolute path; the caller may give a relative one.)
    target = os.path.realpath(code_path)
    is_target = functools.lru_cache(maxsize=None)(lambda filename: os.path.realpath(filename) == target)

    def recording(x, shape, name=None):
        caller = sys._getframe(1)
        if is_target(caller.f_code.co_filename):
            seen.setdefault(caller.f_lineno, list(x.shape))
        return original(x, shape, name=name)

    paddle.reshape = recording
    try:
        _outputs(model, inputs)
    finally:
        paddle.reshape = original
    return seen


def _warn_if_batch_one_only(
    onnx_path: str, directory: str, inputs: dict, folded: bool, batch_axes: list[int | None]
) -> None:
    """Warns when the model converted at batch 1 does not run at batch 2, or (its inputs all
    float) does not run at all."""
    model = _instantiate(directory)
    rng = np.random.default_rng(0)
    try:
        single = _outputs(model, _example_inputs(inputs, 1, rng))
    except Exception as error:  # noqa: BLE001 - inputs it needs otherwise (ids, masks): no probe
        if all(np.issubdtype(dtype, np.floating) for _, dtype in inputs.values()) and not folded:
            # (PyTorch's ViT exports compute their class token's shape, which x2paddle writes
            # as paddle.full of a shape tensor that Paddle 3.3.1 reads as [-1].)
            logger.warning(
                "%s: the converted model fails on inputs of its shapes (%s: %s); where it fails "
                "on yours too, load it with fold_shapes=True, which makes its shape "
                "computations constants", onnx_path, type(error).__name__, str(error).splitlines()[0][:200],
            )
        logger.debug("%s: not probed at batch 2 (it fails on uniform inputs: %s)", directory, error)
        return
    try:
        double = _outputs(model, _example_inputs(inputs, 2, rng))
        batch_one_only = any(
            a.ndim > axis and a.shape[axis] == 1 and (b.ndim != a.ndim or b.shape[axis] != 2)
            for a, b, named in zip(single, double, _padded(batch_axes, len(single)))
            for axis in [_batch_axis(named, a, b)]
        )
    except Exception:  # noqa: BLE001 - any failure at batch 2 is what this warns of
        batch_one_only = True
    if batch_one_only:
        logger.warning(
            "%s: the converted model does not run at batch 2 (x2paddle wrote the batch size 1 "
            "into its code): it computes batch 1 only; convert with dynamic_batch=True to run "
            "any batch", onnx_path,
        )


def _example_inputs(inputs: dict, batch: int, rng: np.random.Generator) -> list[paddle.Tensor]:
    """Inputs of ``batch``: uniform [0, 1) floats, integer ones."""
    tensors = []
    for shape, dtype in inputs.values():
        shape = [batch, *shape[1:]]
        values = rng.random(shape).astype(dtype) if np.issubdtype(dtype, np.floating) else np.ones(shape, dtype)
        tensors.append(paddle.to_tensor(values))
    return tensors


def _outputs(model: paddle.nn.Layer, inputs: list[paddle.Tensor]) -> list[np.ndarray]:
    with paddle.no_grad():
        outputs = model(*inputs)
    if isinstance(outputs, paddle.Tensor):
        return [outputs.numpy()]
    return [output.numpy() for output in outputs]


def _instantiate(directory: str) -> paddle.nn.Layer:
    code_path = os.path.join(directory, _CODE)
    name = f"x2paddle_code_{hashlib.sha256(code_path.encode()).hexdigest()[:16]}"
    spec = importlib.util.spec_from_file_location(name, code_path)
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    with paddle.utils.unique_name.guard():
        model = code.ONNXModel()
    model.set_dict(paddle.load(os.path.join(directory, _PARAMS)))
    model.eval()
    return model
