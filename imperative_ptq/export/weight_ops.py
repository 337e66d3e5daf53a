"""Conv/fc weights and biases in the int8 program.

Biases are put in the form the oneDNN passes fuse (:func:`fold_conv_bias`; a matmul's zero or 1-D
bias, :func:`fc_fusable_biases`), Conv1D weights become the 4-D weights of the conv2d
Paddle traces them into (:func:`materialize_conv1d_weights`), and each calibrated weight is
stored as an int8 tensor behind a ``dequantize_linear`` with its per-channel thresholds
(:func:`int8_weight`), a private copy for every further reader (:func:`copy_int8_weight`).
"""

from __future__ import annotations

import logging
from typing import Mapping

import numpy as np
import paddle

from ..quantizers.qparams import symmetric_levels
from .graph import (
    bias_add,
    get_tensor,
    insert_op,
    insert_zero_bias,
    is_persistable,
    new_persistable,
    producers,
    readers,
    remove_op,
    set_tensor,
    transposed_matmul,
)
from .legacy_program import INT8_WEIGHT_OPS, LegacyProgram, ProgramScales
from .tracing import LayerRecord

__all__ = [
    "copy_int8_weight", "fc_fusable_biases", "fold_conv_bias", "int8_weight",
    "materialize_conv1d_weights",
]

logger = logging.getLogger(__name__)


def fold_conv_bias(loaded: LegacyProgram) -> int:
    """Rewrites ``reshape2(bias) -> elementwise_add`` after convs into the classic bias add.

    Paddle 3.x traces ``F.conv2d``'s bias as a reshape to [1, C, 1, 1] followed by an add; the
    oneDNN passes only fuse a persistable bias added on ``axis=1``, so without this every conv
    with a bias keeps a separate fp32 add and blocks conv+BN/activation fusion (measured on
    LeNet: batch-norm, add and ReLU ran as separate fp32 primitives).

    Returns:
        The number of biases folded.
    """
    block = loaded.program.global_block()
    writers = producers(block)
    reading = readers(block)
    folded = []
    for op in block.ops:
        if op.type != "reshape2" or op.input("Shape") or op.input("ShapeTensor"):
            continue
        bias = op.input("X")[0]
        var = block._find_var_recursive(bias)
        if var is None or not var.persistable or len(var.shape) != 1:
            continue
        out = op.output("Out")[0]
        adds = reading.get(out, [])
        if not adds or any(
            add.type != "elementwise_add"
            or add.input("Y") != [out]
            or writers.get(add.input("X")[0]) is None
            or writers[add.input("X")[0]].type not in ("conv2d", "depthwise_conv2d")
            or writers[add.input("X")[0]].attr("data_format") not in ("NCHW", "AnyLayout")
            for add in adds
        ):
            continue
        for add in adds:
            add._rename_input(out, bias)
            add._set_attr("axis", 1)
        folded.append(op)
    for op in folded:
        remove_op(block, list(block.ops).index(op))
    if folded:
        loaded.program._sync_with_cpp()
    _broadcast_unfused_conv_biases(loaded, writers)
    return len(folded)


#: Convs whose bias add oneDNN fuses into nothing (traced as an ``elementwise_add`` of a [C]
#: parameter on ``axis=1``).
_UNFUSED_BIAS_CONVS = frozenset({"deformable_conv", "deformable_conv_v1", "conv3d_transpose"})


def _broadcast_unfused_conv_biases(loaded: LegacyProgram, writers: Mapping) -> int:
    """Stores the bias of each conv in :data:`_UNFUSED_BIAS_CONVS` (``DeformConv2D``,
    ``Conv3DTranspose``) as [1, C, 1, ...] on the conv output's rank, added on the default
    axis.

    Paddle Inference's oneDNN add broadcasts a [C] operand over the last axis whatever
    ``axis`` says, and nothing fuses these biases into their convs, so every program with
    one failed at run time ("Broadcast dimension mismatch ... X = [2, 16, 8, 8] and the shape
    of Y = [16]"; X = [2, 4, 8, 12, 12] after a Conv3DTranspose), the fp32 export too.

    Returns:
        How many biases were rewritten.
    """
    block = loaded.program.global_block()
    rewritten = 0
    for add in block.ops:
        if add.type != "elementwise_add" or add.attr("axis") != 1:
            continue
        writer = writers.get(add.input("X")[0])
        bias = add.input("Y")[0]
        if writer is None or writer.type not in _UNFUSED_BIAS_CONVS or not is_persistable(block, bias):
            continue
        value = get_tensor(loaded, bias)
        if value.ndim != 1:
            continue
        rank = len(block.var(add.input("X")[0]).shape)
        add._rename_input(bias, new_persistable(loaded, f"{bias}.nchw", value.reshape([1, -1] + [1] * (rank - 2))))
        add._set_attr("axis", -1)
        rewritten += 1
    return rewritten


def fc_fusable_biases(loaded: LegacyProgram, weights: Mapping[str, LayerRecord]) -> int:
    """Gives each calibrated matmul the bias Paddle Inference's fc fuse pass takes: a zero
    one where it has none, ``[D]`` where it has one of shape ``[1, ..., 1, D]``.

    Paddle Inference's CPU passes turn ``matmul_v2`` with a weight into ``mul`` and fuse it
    into an ``fc`` only together with a bias ``elementwise_add`` of a 1-D bias; otherwise it
    stayed an fp32 ``mul`` while the simulation computed it in int8: a bias-free Linear (or a
    functional ``paddle.matmul`` on a parameter; measured on a 32->10 Linear: "1 mul fp32";
    with the zero bias, an int8 fc agreeing with the simulation), and a functional
    ``paddle.matmul(x, w) + b`` with ``b`` of shape ``[1, 1, D]`` (as x2paddle converts an ONNX
    ``MatMul`` followed by an ``Add``; Google's magika file-type model: 7.2e-2 of the largest
    output off the simulation on every input, its scores up to 0.17). A bias is reshaped only
    where it has no more dimensions than the product, so the sum's shape is unchanged, and
    the add reads a copy, so other readers of the parameter keep its shape.

    Returns:
        How many biases were added or reshaped.
    """
    block = loaded.program.global_block()
    reading = readers(block)
    changed = 0
    for index, op in reversed(list(enumerate(block.ops))):
        if op.type not in ("matmul_v2", "mul") or transposed_matmul(op):
            continue
        weight_slot, _, output_slot = INT8_WEIGHT_OPS[op.type]
        weight, output = op.input(weight_slot)[0], op.output(output_slot)[0]
        if weight not in weights:
            continue
        add = bias_add(block, output, reading)
        if add is None and len(block.var(weight).shape) == 2:
            columns = int(block.var(weight).shape[1])
            insert_zero_bias(loaded, index, op, output_slot, f"{weight}.zero_bias", columns, -1)
            changed += 1
            continue
        bias = None if add is None else add.input("Y")[0]
        if bias is None or not 2 <= len(block.var(bias).shape) <= len(block.var(output).shape) or any(
            size != 1 for size in block.var(bias).shape[:-1]
        ):
            continue
        add._rename_input(bias, new_persistable(loaded, f"{bias}.flat", get_tensor(loaded, bias).reshape(-1)))
        add._set_attr("axis", -1)
        changed += 1
    if changed:
        loaded.program._sync_with_cpp()
    return changed


#: Ops between a parameter and the conv2d that Paddle traces ``F.conv1d`` into.
_CONV1D_WEIGHT_PATH = frozenset({"assign", "unsqueeze2"})


#: The 2-D convs a 1-D one traces to (``Conv1DTranspose``: conv2d_transpose, whose ONNX
#: export read its unsqueezed weight as a parameter and failed).
_CONV1D_AS_2D_OPS = frozenset({"conv2d", "depthwise_conv2d", "conv2d_transpose", "depthwise_conv2d_transpose"})


def materialize_conv1d_weights(loaded: LegacyProgram, weights: dict[str, LayerRecord]) -> int:
    """Gives each conv2d (or transposed conv2d) that a Conv1D (``Conv1DTranspose``) traced
    into its own 4-D weight, so it runs int8 (the transposed ones are exported in float).

    Paddle traces ``F.conv1d`` as ``assign -> unsqueeze2`` of the 3-D weight feeding a conv2d
    (and the same on the input): the conv2d's filter is no parameter, so no record matched it
    and the layer stayed fp32. The unsqueezed weight ``[out, in, 1, k]`` is stored as a new
    parameter read by the conv2d directly (for every Conv1D, calibrated or not, so exporters
    see a plain conv2d), mapped in ``weights`` to the layer's record if it has one (the
    channel axis stays 0); the weight path ops are removed.

    Returns:
        How many conv2d ops were given a weight.
    """
    block = loaded.program.global_block()
    writers, reading = producers(block), readers(block)
    dead: list = []
    done = 0
    for op in list(block.ops):
        if op.type not in _CONV1D_AS_2D_OPS:
            continue
        filter_name = op.input("Filter")[0]
        path, name = [], filter_name
        while name in writers and writers[name].type in _CONV1D_WEIGHT_PATH:
            path.append(writers[name])
            name = writers[name].input("X")[0]
        record = weights.get(name)
        if not path or not is_persistable(block, name) or any(
            len(reading.get(out, [])) != 1 for step in path for out in step.output("Out")
        ):
            continue
        value = get_tensor(loaded, name)
        for step in reversed(path):
            if step.type == "unsqueeze2":
                for axis in step.attr("axes"):
                    value = np.expand_dims(value, axis)
        new_name = new_persistable(loaded, f"{name}.conv2d", np.ascontiguousarray(value))
        op._rename_input(filter_name, new_name)
        if record is not None:
            weights[new_name] = record
        dead.extend(path)
        done += 1
    for op in dead:
        remove_op(block, list(block.ops).index(op))
    if dead:
        loaded.program._sync_with_cpp()
    return done


def int8_weight(
    loaded: LegacyProgram,
    index: int,
    weight_name: str,
    record: LayerRecord,
    written: ProgramScales,
    factor: float = 1.0,
) -> str:
    """Stores ``weight_name`` as int8 and inserts its dequantize_linear at ``index``.

    ``factor``: the weight tensor was multiplied by it (:mod:`.unsigned`), so are the
    thresholds here; the integers stay those of the converted layer.
    """
    from ..quant_layers import quantize_weight, stored_per_tensor, stored_weight_thresholds

    block = loaded.program.global_block()
    weight = get_tensor(loaded, weight_name).astype(np.float32)
    axis = int(record.weight_axis)
    if stored_per_tensor(weight.shape) and np.ptp(record.weight_thresholds) > 0:
        logger.warning(
            "square weight %s %s: exported with one per-tensor threshold instead of %d "
            "per-channel ones (Paddle Inference misreads per-channel scales of square weights)",
            weight_name, list(weight.shape), np.size(record.weight_thresholds),
        )
    thresholds = stored_weight_thresholds(record.weight_thresholds, weight.shape, axis, factor)
    # The layer's weight already is integers * t / L, so this round trip is exact.
    integers = quantize_weight(weight, thresholds, record.traced_weight_bits, axis)
    bit_length = record.traced_weight_bits
    if bit_length < 8:
        # Codes -L..L of a narrower grid, stored as int8 on the 8-bit grid of threshold
        # t * 127 / L, which dequantizes to the same integers * t / L (Paddle Inference's
        # oneDNN pass turns a dequantize_linear with bit_length 4 into NaN, measured).
        thresholds = thresholds * np.float32(127 / symmetric_levels(bit_length))
        bit_length = 8
    _float_copy_for_other_readers(loaded, weight_name, record)
    set_tensor(loaded, weight_name, integers)
    block.var(weight_name).desc.set_dtype(paddle.base.core.VarDesc.VarType.INT8)
    scale = new_persistable(loaded, weight_name + ".scale", thresholds)
    zero = new_persistable(
        loaded, weight_name + ".zero_point", np.zeros(thresholds.shape, dtype=np.int32)
    )
    out = weight_name + ".dequantized"
    block.create_var(name=out, shape=list(weight.shape), dtype="float32", persistable=False)
    insert_op(
        block, index,
        type="dequantize_linear",
        inputs={"X": [weight_name], "Scale": [scale], "ZeroPoint": [zero]},
        outputs={"Y": [out]},
        attrs={"quant_axis": axis, "bit_length": bit_length},
    )
    written.weights[weight_name] = [float(t) for t in thresholds]
    return out


def _float_copy_for_other_readers(loaded: LegacyProgram, weight_name: str, record: LayerRecord) -> None:
    """Gives the ops that read ``weight_name`` other than as a conv/fc weight (a decoder
    multiplying by it transposed, ``F.linear(h, encoder.weight.T)``) a float copy holding the
    weight the simulation computes with, before the variable becomes int8: Paddle Inference
    read the int8 codes dequantized in place (measured: a tied autoencoder's decoder, 7.8e-2
    of the largest output off the simulation; ``int8=False`` predictors refused the program)."""
    block = loaded.program.global_block()
    # (One pass over the ops: a readers() map of the whole block per weight measured 3x slower.)
    others = [
        op for op in block.ops
        if weight_name in op.input_arg_names and not (
            op.type in INT8_WEIGHT_OPS and not transposed_matmul(op)
            and op.input(INT8_WEIGHT_OPS[op.type][0]) == [weight_name]
        )
    ]
    if not others:
        return
    values = record.simulated_weight if record.simulated_weight is not None else get_tensor(loaded, weight_name)
    copy = new_persistable(loaded, weight_name + ".float", np.asarray(values, np.float32))
    for op in others:
        op._rename_input(weight_name, copy)


def copy_int8_weight(loaded: LegacyProgram, index: int, dequantized: str, serial: int) -> str:
    """Inserts at ``index`` a dequantize_linear of a copy of the int8 weight behind ``dequantized``."""
    block = loaded.program.global_block()
    source = next(
        op for op in block.ops if op.type == "dequantize_linear" and op.output("Y") == [dequantized]
    )
    weight_name = source.input("X")[0]
    copy = new_persistable(loaded, f"{weight_name}.copy{serial}", get_tensor(loaded, weight_name))
    out = copy + ".dequantized"
    block.create_var(
        name=out, shape=list(block.var(dequantized).shape), dtype="float32", persistable=False
    )
    insert_op(
        block, index,
        type="dequantize_linear",
        inputs={"X": [copy], "Scale": source.input("Scale"), "ZeroPoint": source.input("ZeroPoint")},
        outputs={"Y": [out]},
        attrs={"quant_axis": source.attr("quant_axis"), "bit_length": source.attr("bit_length")},
    )
    return out
