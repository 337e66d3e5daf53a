"""Exports of dynamically quantized models (:func:`imperative_ptq.quantize_dynamic`).

Both exports start from one legacy fp32 program traced with every dynamic layer put back as
the plain layer holding its dequantized weights (:func:`trace_dynamic_model`): a
:class:`~imperative_ptq.dynamic.DynamicQuantizedLinear` as a Linear, a
:class:`~imperative_ptq.dynamic.DynamicQuantizedRNN` as a ``paddle.nn.LSTM`` / ``GRU`` (one
``rnn`` op for all its layers and directions).

* Paddle Inference (:func:`save_dynamic_model`): a **weight-only** int8 program. Each dynamic
  weight is stored as int8 and turned back into float32 by ``cast`` + ``elementwise_mul``,
  which Paddle Inference's constant folding runs once, when the predictor is created: the
  files are ~4x smaller and the predictor computes in fp32 with exactly the dygraph model's
  dequantized weights. Paddle Inference has no CPU kernel that quantizes activations at run
  time (its int8 pipeline needs calibrated activation scales; ``weight_only_linear`` has no
  CPU kernel in 3.3.1), so fp32 compute is what it can do with such a model.
* ONNX Runtime: :func:`imperative_ptq.export.export_onnx` writes ``DynamicQuantizeLinear`` +
  ``MatMulInteger`` for each dynamic Linear and ``com.microsoft.DynamicQuantizeLSTM`` for a
  dynamic LSTM, ONNX Runtime's own dynamic-quantization forms; a dynamic GRU, for which it has
  no integer kernel, as int8 weights dequantized into a float ``GRU``.
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
from .legacy_program import (
    LegacyProgram, legacy_static_mode, load_legacy_program, save_legacy_program,
)
from .atomic import export_directory, staged_export
from .graph import complete_batch_norm_parameters, insert_op, new_persistable, set_tensor
from .tracing import legacy_trace, normalize_input_spec
from .spec_check import error_summary

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
        integers: int8, in the layout of the program's weight: ``[in, out]`` for a Linear,
            ``[out, in]`` for an LSTM/GRU weight.
        scales: float32 ``[out]``: the weight is ``integers * scales`` along ``axis``.
        bits: Weight bit width.
        axis: The output-channel axis of ``integers`` (1 for a Linear, 0 for an RNN weight).
    """

    layer_name: str
    integers: np.ndarray
    scales: np.ndarray
    bits: int
    axis: int = 1


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
    """Saves ``model`` as an fp32 legacy program with its dynamic weights dequantized: a
    :class:`DynamicQuantizedLinear` as a plain Linear, a :class:`DynamicQuantizedRNN` as the
    ``paddle.nn.LSTM`` / ``GRU`` of :meth:`DynamicQuantizedRNN.dequantized_rnn` (one ``rnn``
    op in the program, every layer and direction).

    Returns:
        The int8 form of every dynamic weight, keyed by its program variable name.

    Raises:
        ValueError: Tracing with ``input_spec`` failed.
    """
    export_model = copy.deepcopy(model)
    export_model.eval()
    weights: dict[str, DynamicWeight] = {}
    for name, layer in dynamic_layers(export_model):
        if isinstance(layer, DynamicQuantizedRNN):
            # A copy: a new LSTM/GRU holds an uninitialized ``_dropout_state`` buffer that
            # Paddle cannot trace ("Unknown place type"); a deep copy makes it an empty tensor.
            rnn = copy.deepcopy(layer.dequantized_rnn())
            replace_sublayer(export_model, layer, rnn)
            parameters = dict(rnn.named_parameters())
            for parameter_name, product in layer.rnn_weights().items():
                # Paddle's RNN weights are [out, in]: the transposed Linear codes.
                weights[parameters[parameter_name].name] = DynamicWeight(
                    f"{name}.{parameter_name}", np.ascontiguousarray(product.weight_integers.numpy().T),
                    product.weight_scales.numpy(), product.weight_bits, axis=0,
                )
            continue
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
        raise ValueError(
            f"tracing the model with input_spec [{shapes}] failed: {error_summary(error)}"
        ) from error
    return weights


def _store_int8_weight(
    loaded: LegacyProgram, weight_name: str, weight: DynamicWeight
) -> None:
    """Makes ``weight_name`` an int8 tensor, turned back into the dynamic layer's float32
    weight by ``cast`` + ``elementwise_mul`` (by the per-channel scales) for every op that
    read the fp32 one.

    Not ``dequantize_linear``: Paddle Inference's ``constant_folding_pass`` skips that op, so
    it rebuilt every weight on every call; ``cast`` and ``elementwise_mul`` of persistable
    inputs it folds into one persistable float32 weight when the predictor is created. The
    product is the one :meth:`DynamicQuantizedLinear.dequantized_weight` computes
    (``float32(q) * scale``, one rounding), so the weights are the dygraph ones bit for bit.
    """
    block = loaded.program.global_block()
    set_tensor(loaded, weight_name, weight.integers)
    block.var(weight_name).desc.set_dtype(paddle.base.core.VarDesc.VarType.INT8)
    # Scales shaped to broadcast along the weight's channel axis.
    shape = [1] * weight.integers.ndim
    shape[weight.axis] = weight.scales.size
    scale = new_persistable(
        loaded, weight_name + ".scale", weight.scales.astype(np.float32).reshape(shape)
    )
    floats, out = weight_name + ".float", weight_name + ".dequantized"
    for name in (floats, out):
        block.create_var(
            name=name, shape=list(weight.integers.shape), dtype="float32", persistable=False
        )
    readers = [index for index, op in enumerate(block.ops) if weight_name in op.input_arg_names]
    for index in readers:
        block.ops[index]._rename_input(weight_name, out)
    insert_op(
        block, readers[0], type="elementwise_mul", inputs={"X": [floats], "Y": [scale]},
        outputs={"Out": [out]}, attrs={"axis": -1},
    )
    insert_op(
        block, readers[0], type="cast", inputs={"X": [weight_name]}, outputs={"Out": [floats]},
        attrs={"in_dtype": int(paddle.base.core.VarDesc.VarType.INT8),
               "out_dtype": int(paddle.base.core.VarDesc.VarType.FP32)},
    )


def save_dynamic_model(
    model: paddle.nn.Layer, path: str | os.PathLike, input_spec: Any = None
) -> None:
    """Writes ``path.pdmodel`` / ``path.pdiparams``: a weight-only int8 Paddle program.

    Every dynamic weight (Linear, LSTM, GRU) is stored as int8 with one float32 scale per
    output channel and turned into float32 by ``cast`` + ``elementwise_mul``, folded when the
    predictor is created; Paddle Inference computes in fp32 with exactly the weights the
    dynamic model stands for (its activations are not quantized: Paddle Inference has no
    run-time activation quantization on CPU).

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
    directory, _ = export_directory(path, DYNAMIC_EXPORT_SUFFIXES)
    path = os.path.join(directory, os.path.basename(os.fspath(path)))
    with staged_export(path, DYNAMIC_EXPORT_SUFFIXES, stale=(".calibration.json",)) as staging:
        weights = trace_dynamic_model(model, specs, staging + ".fp32")
        with legacy_static_mode():
            loaded = load_legacy_program(staging + ".fp32")
            complete_batch_norm_parameters(loaded)
            block = loaded.program.global_block()
            for weight_name, weight in weights.items():
                if block._find_var_recursive(weight_name) is None:
                    logger.warning(
                        "dynamic layer %s is not used by the traced program", weight.layer_name
                    )
                    continue
                _store_int8_weight(loaded, weight_name, weight)
            save_legacy_program(loaded, staging)
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
