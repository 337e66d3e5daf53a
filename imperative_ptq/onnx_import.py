"""ONNX models as dygraph models to quantize: x2paddle's conversion, with its gaps filled.

x2paddle (``pip install x2paddle``) writes the Paddle code and weights of an ONNX file's model;
:func:`load_onnx_model` runs it and loads the result as a ``paddle.nn.Layer`` that
:class:`~imperative_ptq.ImperativePTQ` quantizes like any other (x2paddle's functional
``paddle.matmul`` calls on parameters are calibrated as Linear layers). On the way it handles
what x2paddle 1.6.0 leaves to its user:

* ``HardSwish`` (MobileNetV3, PP-LCNet) has no converter: it is rewritten first as
  ``Mul(x, HardSigmoid(x, alpha=1/6, beta=0.5))``, which computes the same values.
* Its shape inference needs fixed input shapes and may write the batch size it was given
  into the generated reshapes (``shape=[1, 6, -1]``), after which the model computes batch 1
  only, silently wrong at other batches: with ``dynamic_batch`` such a leading ``1`` becomes
  ``0`` (Paddle's "the input's size there"), so the model runs any batch (convert with batch
  1); without it, a warning counts those reshapes.
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
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import shutil
from typing import Mapping, Sequence

import paddle

__all__ = ["QUANTIZED_ONNX_OPS", "load_onnx_model"]

logger = logging.getLogger(__name__)

#: ONNX ops of a file that is already quantized (x2paddle converts none of them).
QUANTIZED_ONNX_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "ConvInteger", "MatMulInteger", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool", "QGemm",
})
#: The stamp file recording which ONNX file and options a conversion directory holds.
_STAMP = "onnx_import.json"
_CODE = "x2paddle_code.py"
_PARAMS = "model.pdparams"
#: A reshape x2paddle wrote with the batch size of its fixed input shape (1).
_BATCH_ONE_RESHAPE = re.compile(r"(paddle\.reshape\(x=\w+, shape=\[)1, ")


def load_onnx_model(
    onnx_path: str | os.PathLike,
    directory: str | os.PathLike,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    dynamic_batch: bool = False,
) -> paddle.nn.Layer:
    """The model of an ONNX file as x2paddle's dygraph model, in eval mode.

    Args:
        onnx_path: The ONNX file (fp32).
        directory: Where x2paddle's code and weights are written (created; reused when it holds
            the conversion of the same file with the same options).
        input_shapes: Input name -> fixed shape for x2paddle's shape inference, e.g.
            ``{"x": [1, 3, 48, 320]}``; ``None``: the file's own shapes.
        dynamic_batch: Make a batch size of 1 that x2paddle wrote into the generated reshapes
            the input's batch size (give batch 1 in ``input_shapes``): the model then runs any
            batch size. The reshapes must keep the batch as their first dimension, as a
            network's reshapes of activations do.

    Returns:
        The converted model (its class is x2paddle's ``ONNXModel``).

    Raises:
        ImportError: x2paddle or onnx is not installed.
        FileNotFoundError: ``onnx_path`` does not exist.
        TypeError: ``input_shapes`` is not a mapping of names to integer shapes, or
            ``dynamic_batch`` is not a bool.
        ValueError: The file is already quantized, an ``input_shapes`` name is not an input of
            the model, or ``dynamic_batch`` is given with a batch other than 1.
    """
    try:
        import onnx
        from x2paddle.convert import onnx2paddle
    except ImportError as error:
        raise ImportError(
            f"load_onnx_model needs x2paddle and onnx ({error}): pip install x2paddle==1.6.0 onnx==1.18.0"
        ) from error
    onnx_path, directory = os.fspath(onnx_path), os.fspath(directory)
    if not os.path.isfile(onnx_path):
        raise FileNotFoundError(f"{onnx_path} does not exist")
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"dynamic_batch must be a bool, got {type(dynamic_batch).__name__}")
    shapes = _checked_shapes(input_shapes)
    with open(onnx_path, "rb") as file:
        content = file.read()
    model = onnx.load_from_string(content)
    _check_inputs(model, onnx_path, shapes, dynamic_batch)
    stamp = {
        "onnx_sha256": hashlib.sha256(content).hexdigest(),
        "input_shapes": shapes,
        "dynamic_batch": dynamic_batch,
    }
    if _stamp_of(directory) != stamp:
        _convert(model, directory, stamp, onnx2paddle)
    else:
        logger.info("%s already holds the conversion of %s: loading it", directory, onnx_path)
    return _instantiate(directory, stamp["onnx_sha256"])


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
    if dynamic_batch and any(shape[:1] != [1] for shape in (shapes or {}).values()):
        raise ValueError(f"dynamic_batch needs batch 1 in input_shapes (x2paddle writes it into reshapes), got {shapes}")


def _stamp_of(directory: str) -> dict | None:
    path = os.path.join(directory, _STAMP)
    if not all(os.path.isfile(os.path.join(directory, name)) for name in (_STAMP, _CODE, _PARAMS)):
        return None
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def _convert(model, directory: str, stamp: dict, onnx2paddle) -> None:
    """x2paddle's conversion of ``model`` into ``directory`` (replacing what it held)."""
    staging = directory.rstrip(os.sep) + ".converting"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        source = os.path.join(staging, "model.onnx")
        import onnx

        onnx.save(_without_hardswish(model), source)
        captured = io.StringIO()
        # Parameter names come from the ONNX initializers: a fresh scope for each conversion.
        # (x2paddle prints a line per node, kept for the debug log.)
        with paddle.utils.unique_name.guard(), contextlib.redirect_stdout(captured), \
                contextlib.redirect_stderr(captured):
            onnx2paddle(
                source, staging,
                input_shape_dict=None if stamp["input_shapes"] is None else str(stamp["input_shapes"]),
                disable_feedback=True,  # its feedback is a network call
            )
        logger.debug("x2paddle:\n%s", captured.getvalue())
        code_path = os.path.join(staging, _CODE)
        if not os.path.isfile(code_path):
            raise RuntimeError(f"x2paddle wrote no model code (its output:\n{captured.getvalue()[-2000:]})")
        _batch_one_reshapes(code_path, stamp["dynamic_batch"])
        os.remove(source)
        with open(os.path.join(staging, _STAMP), "w", encoding="utf-8") as file:
            json.dump(stamp, file)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("converted the ONNX model with x2paddle into %s", directory)


def _without_hardswish(model):
    """``model`` with every ``HardSwish`` written as ``Mul(x, HardSigmoid(x, 1/6, 0.5))``."""
    from onnx import helper

    nodes = list(model.graph.node)
    if not any(node.op_type == "HardSwish" for node in nodes):
        return model
    del model.graph.node[:]
    for node in nodes:
        if node.op_type != "HardSwish":
            model.graph.node.append(node)
            continue
        gate = f"{node.output[0]}.hard_sigmoid"
        model.graph.node.extend([
            helper.make_node("HardSigmoid", [node.input[0]], [gate], alpha=1 / 6, beta=0.5),
            helper.make_node("Mul", [node.input[0], gate], list(node.output), name=node.name),
        ])
    logger.info("rewrote %d HardSwish nodes as x * HardSigmoid(x) (x2paddle has no HardSwish)",
                sum(node.op_type == "HardSwish" for node in nodes))
    return model


def _batch_one_reshapes(code_path: str, dynamic_batch: bool) -> None:
    """Makes the reshapes x2paddle wrote with batch 1 read the input's batch, or warns."""
    with open(code_path, encoding="utf-8") as file:
        code = file.read()
    if not dynamic_batch:
        count = len(_BATCH_ONE_RESHAPE.findall(code))
        if count:
            logger.warning(
                "x2paddle wrote batch size 1 into %d reshapes: the model computes batch 1 only "
                "(other batches give wrong shapes or values); convert with dynamic_batch=True "
                "and batch 1 in input_shapes to run any batch", count,
            )
        return
    code, count = _BATCH_ONE_RESHAPE.subn(r"\g<1>0, ", code)
    with open(code_path, "w", encoding="utf-8") as file:
        file.write(code)
    logger.info("made the batch dimension of %d reshapes the input's", count)


def _instantiate(directory: str, digest: str) -> paddle.nn.Layer:
    spec = importlib.util.spec_from_file_location(f"x2paddle_code_{digest[:16]}", os.path.join(directory, _CODE))
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    with paddle.utils.unique_name.guard():
        model = code.ONNXModel()
    model.set_dict(paddle.load(os.path.join(directory, _PARAMS)))
    model.eval()
    return model
