"""Exports of dynamically quantized models (:func:`imperative_ptq.quantize_dynamic`).

Both exports start from one legacy fp32 program traced with every
:class:`~imperative_ptq.dynamic.DynamicQuantizedLinear` put back as a plain Linear holding its
dequantized weight (:func:`trace_dynamic_model`). Dynamically quantized LSTM/GRU layers run in
dygraph only: Paddle 3.3.1 traces no LSTM/GRU into a legacy program.

* Paddle Inference (:func:`save_dynamic_model`): a **weight-only** int8 program. Each dynamic
  weight is stored as int8 and followed by a ``dequantize_linear`` op, so the files are ~4x
  smaller and the predictor computes in fp32 with the dequantized weights. Paddle Inference
  has no CPU kernel that quantizes activations at run time (its int8 pipeline needs
  calibrated activation scales), so fp32 compute is what it can do with such a model.
* ONNX Runtime: :func:`imperative_ptq.export.export_onnx` writes ``DynamicQuantizeLinear`` +
  ``MatMulInteger`` for each dynamic layer, ONNX Runtime's own dynamic-quantization form.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from typing import Any, Sequence

import numpy as np
import paddle

from ..dynamic import DynamicQuantizedLinear, DynamicQuantizedRNN, dynamic_layers
from ..quant_layers import replace_sublayer
from . import program as program_lib
from .atomic import export_directory, staged_export
from .graph import new_persistable, set_tensor
from .tracing import legacy_trace, normalize_input_spec

__all__ = [
    "DynamicWeight", "check_dynamic_model", "is_dynamic_model", "save_dynamic_model",
    "trace_dynamic_model",
]

logger = logging.getLogger(__name__)

#: Files of a weight-only export, in the order they are moved into place (the program last).
DYNAMIC_EXPORT_SUFFIXES = (".pdiparams", ".pdmodel")


@dataclasses.dataclass
class DynamicWeight:
    """The int8 form of one traced dynamic weight.

    Attributes:
        layer_name: Sublayer name in the dynamic model.
        integers: int8 ``[in, out]``.
        scales: float32 ``[out]``: the weight is ``integers * scales``.
        bits: Weight bit width.
    """

    layer_name: str
    integers: np.ndarray
    scales: np.ndarray
    bits: int


def check_dynamic_model(model: Any) -> None:
    """Raises TypeError/ValueError unless ``model`` was made by ``quantize_dynamic``."""
    if not isinstance(model, paddle.nn.Layer):
        raise TypeError(f"model must be a paddle.nn.Layer, got {type(model).__name__}")
    if not dynamic_layers(model):
        raise ValueError(
            f"{type(model).__name__} has no dynamically quantized layer: quantize it with "
            f"imperative_ptq.quantize_dynamic first"
        )


def trace_dynamic_model(
    model: paddle.nn.Layer, input_spec: Sequence[paddle.static.InputSpec], path_prefix: str
) -> dict[str, DynamicWeight]:
    """Saves ``model`` as an fp32 legacy program with its dynamic weights dequantized.

    Returns:
        The int8 form of every dynamic weight, keyed by its program variable name.

    Raises:
        ValueError: Tracing with ``input_spec`` failed.
        NotImplementedError: The model holds a dynamically quantized LSTM/GRU.
    """
    export_model = copy.deepcopy(model)
    export_model.eval()
    weights: dict[str, DynamicWeight] = {}
    for name, layer in dynamic_layers(export_model):
        if isinstance(layer, DynamicQuantizedRNN):
            # Paddle 3.3.1 cannot trace paddle.nn.LSTM/GRU into a legacy program at all
            # (measured: "Unknown place type" even for the fp32 layer).
            raise NotImplementedError(
                f"dynamically quantized {layer.mode} layer {name!r} cannot be exported: Paddle "
                f"{paddle.__version__} traces no LSTM/GRU into a legacy program (fp32 included), "
                f"and the ONNX export has no recurrent form; it runs in dygraph only"
            )
        plain = paddle.nn.Linear(
            layer.in_features, layer.out_features, bias_attr=None if layer.bias is not None else False
        )
        plain.weight.set_value(layer.dequantized_weight())
        if layer.bias is not None:
            plain.bias.set_value(layer.bias.numpy())
        replace_sublayer(export_model, layer, plain)
        weights[plain.weight.name] = DynamicWeight(
            name, layer.weight_integers.numpy(), layer.weight_scales.numpy(), layer.weight_bits
        )
    try:
        with paddle.pir_utils.DygraphOldIrGuard(), legacy_trace():
            paddle.jit.save(export_model, path_prefix, input_spec=list(input_spec))
    except (TypeError, ValueError, RuntimeError, IndexError, AssertionError) as error:
        shapes = ", ".join(f"{list(spec.shape)} {spec.dtype}" for spec in input_spec)
        last = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise ValueError(f"tracing the model with input_spec [{shapes}] failed: {last}") from error
    return weights


def _store_int8_weight(
    loaded: program_lib.LegacyProgram, weight_name: str, weight: DynamicWeight
) -> None:
    """Makes ``weight_name`` an int8 tensor read through a ``dequantize_linear`` op by every
    op that read the fp32 one."""
    block = loaded.program.global_block()
    levels = 2 ** (weight.bits - 1) - 1
    set_tensor(loaded, weight_name, weight.integers)
    block.var(weight_name).desc.set_dtype(paddle.base.core.VarDesc.VarType.INT8)
    # dequantize_linear computes q * scale / levels: its "scale" is the threshold.
    thresholds = (weight.scales * np.float32(levels)).astype(np.float32)
    scale = new_persistable(loaded, weight_name + ".scale", thresholds)
    zero = new_persistable(
        loaded, weight_name + ".zero_point", np.zeros(thresholds.shape, dtype=np.int32)
    )
    out = weight_name + ".dequantized"
    block.create_var(
        name=out, shape=list(weight.integers.shape), dtype="float32", persistable=False
    )
    readers = [index for index, op in enumerate(block.ops) if weight_name in op.input_arg_names]
    for index in readers:
        block.ops[index]._rename_input(weight_name, out)
    block._insert_op(
        readers[0],
        type="dequantize_linear",
        inputs={"X": [weight_name], "Scale": [scale], "ZeroPoint": [zero]},
        outputs={"Y": [out]},
        attrs={"quant_axis": 1, "bit_length": weight.bits},
    )


def save_dynamic_model(
    model: paddle.nn.Layer, path: str | os.PathLike, input_spec: Any = None
) -> None:
    """Writes ``path.pdmodel`` / ``path.pdiparams``: a weight-only int8 Paddle program.

    Every dynamic weight is stored as int8 with one float32 scale per output channel and
    dequantized by a ``dequantize_linear`` op in the program; Paddle Inference computes in
    fp32 with exactly the weights the dynamic model holds (its activations are not
    quantized: Paddle Inference has no run-time activation quantization on CPU).

    Args:
        model: A model returned by ``quantize_dynamic``.
        path: File prefix; missing directories are created.
        input_spec: ``paddle.static.InputSpec`` list; ``None`` dimensions stay dynamic.

    Raises:
        TypeError: Bad ``model`` or ``input_spec``.
        ValueError: ``model`` has no dynamic layer, or tracing failed.
        OSError: The target cannot be written (nothing is left half-written).
    """
    check_dynamic_model(model)
    specs = normalize_input_spec(input_spec)
    directory, _ = export_directory(path)
    path = os.path.join(directory, os.path.basename(os.fspath(path)))
    with staged_export(path, DYNAMIC_EXPORT_SUFFIXES) as staging:
        weights = trace_dynamic_model(model, specs, staging + ".fp32")
        with program_lib.legacy_static_mode():
            loaded = program_lib.load_legacy_program(staging + ".fp32")
            block = loaded.program.global_block()
            for weight_name, weight in weights.items():
                if block._find_var_recursive(weight_name) is None:
                    logger.warning(
                        "dynamic layer %s is not used by the traced program", weight.layer_name
                    )
                    continue
                _store_int8_weight(loaded, weight_name, weight)
            program_lib.save_legacy_program(loaded, staging)
    logger.info(
        "%s: weight-only int8 program, %d int8 weights (fp32 compute in Paddle Inference)",
        path, len(weights),
    )


def is_dynamic_model(model: Any) -> bool:
    """Whether ``model`` holds a dynamically quantized layer."""
    return isinstance(model, paddle.nn.Layer) and any(
        isinstance(layer, (DynamicQuantizedLinear, DynamicQuantizedRNN))
        for layer in model.sublayers()
    )
