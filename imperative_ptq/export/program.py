"""Rewriting an fp32 legacy program into Paddle's QDQ int8 form.

The form is the one Paddle's own static quantization writes (``QuantWeightPass`` +
``AddQuantDequantPassV2``), which Paddle Inference's oneDNN int8 pipeline
(``quant_dequant_mkldnn_pass`` -> ``cpu_quantize_pass``) and Paddle Lite's ``opt`` read:

* weights of conv2d / depthwise_conv2d / matmul_v2 / mul are stored as **int8** tensors and
  followed by ``dequantize_linear`` with per-channel thresholds (``w = q * t / 127``);
* activations feeding those ops pass through a ``quantize_linear`` / ``dequantize_linear`` pair
  whose persistable ``Scale`` [1] holds the threshold (``q = round(x / t * 127)``);
* output thresholds of other calibrated tensors ride on the producing op as the
  ``out_threshold`` attribute, which the oneDNN pass turns into tensor scales. Without them an
  int8 conv must dequantize its output to fp32 and the next conv re-quantize it, which costs
  about half of the int8 speed-up (measured: ResNet-18 2.2x instead of 3.7x on an AVX-512 VNNI CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import paddle

from ..quant_pool import U8_MAX
from ..quantizers.qparams import symmetric_levels
from .coded_identity import CodedIdentity, round_float_readers
from .folded_norms import fold_norms_into_halved_convs
from .graph import (
    FUSABLE_ACTIVATIONS, bias_of, feeds_quantize, get_tensor, insert_op, insert_reader_op, insert_zero_bias, is_persistable,
    new_persistable, op_index, producers, readers, remove_op, set_tensor, transposed_matmul,
)
from ..shifted_input import shifted_levels
from .integer_weights import read_integer_weights_through_copies
from .linear_as_conv import matmuls_as_convs
from .rnn_fusion import fuse_lstm_ops
from .shifted import SHIFT_OPS, absorb_shift, insert_shift, shifted_u8_threshold
from .tracing import LayerRecord, model_activation_bits
from .unsigned import (
    FUSING_OPS,
    RELU6_U8_PRODUCERS,
    FusedReluClips,
    gemm_output,
    clip_concat_inputs,
    clip_fused_relus,
    insert_clip_relu,
    relu_after_residual_conv,
    removed_dropout,
    runs_unsigned,
    unsigned_threshold,
)

__all__ = [
    "INT8_WEIGHT_OPS", "ProgramScales", "LegacyProgram", "int8_pool_outputs", "load_legacy_program",
    "quantize_program", "returned_only_outputs",
]

logger = logging.getLogger(__name__)

#: Op type -> (weight slot, activation slot, output slot) of the ops whose weights go int8. Other
#: ops keep float (fake-quantized) weights: the oneDNN pass only dequantizes weights of these
#: types, so an int8 weight on e.g. conv2d_transpose would be read as raw integers.
INT8_WEIGHT_OPS: dict[str, tuple[str, str, str]] = {
    "conv2d": ("Filter", "Input", "Output"),
    "depthwise_conv2d": ("Filter", "Input", "Output"),
    "matmul_v2": ("Y", "X", "Out"),
    "mul": ("Y", "X", "Out"),
}

#: Ops with a weight that Paddle Inference's oneDNN int8 pipeline has no int8 kernel for: the
#: layers behind them stay fp32 in the program (a warning names them), and their inputs get
#: no scale (measured: an int8 ReLU output feeding conv2d_transpose made the predictor fail
#: with "could not construct a memory descriptor using strides").
FP32_WEIGHT_OPS: dict[str, tuple[str, str]] = {
    "conv2d_transpose": ("Filter", "Input"),
    "depthwise_conv2d_transpose": ("Filter", "Input"),
    "conv3d": ("Filter", "Input"),
    "conv3d_transpose": ("Filter", "Input"),
}

#: Layer types whose output thresholds are NOT written to the program. oneDNN folds BatchNorm
#: into the preceding conv, so a scale on the BN output becomes the conv's int8 output scale
#: on a signed pre-activation tensor; measured: logit cosine 0.998 -> 0.979 on
#: ResNet-18 from exactly that.
SKIP_OUTPUT_SCALE_LAYERS = frozenset({"BatchNorm", "BatchNorm1D", "BatchNorm2D", "BatchNorm3D"})


@dataclasses.dataclass
class LegacyProgram:
    """A loaded legacy inference program and the scope holding its parameters."""

    program: "paddle.static.Program"
    feed_names: list[str]
    fetch_vars: list
    scope: "paddle.static.Scope"
    executor: "paddle.static.Executor"


@dataclasses.dataclass
class ProgramScales:
    """What :func:`quantize_program` wrote (for the calibration file and the tests).

    Attributes:
        weights: Int8 weights by program variable: their thresholds.
        inputs: Activation thresholds of the quantize/dequantize pairs, by variable.
        outputs: ``out_threshold`` attributes written, by variable.
        fp32_layers: Calibrated layers the program keeps fp32 (no int8 kernel): name -> type.
        weight_layers: Program weight variable -> calibrated layer name.
        fp32_calls: Layers with a call that the simulation runs fp32 and the program keeps fp32
            (an LSTM called with initial states): name -> why.
    """

    weights: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    inputs: dict[str, float] = dataclasses.field(default_factory=dict)
    outputs: dict[str, float] = dataclasses.field(default_factory=dict)
    fp32_layers: dict[str, str] = dataclasses.field(default_factory=dict)
    weight_layers: dict[str, str] = dataclasses.field(default_factory=dict)
    fp32_calls: dict[str, str] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def legacy_static_mode() -> Iterator[None]:
    """Legacy (ProgramDesc) static mode, restoring dygraph afterwards."""
    was_dynamic = paddle.in_dynamic_mode()
    with paddle.pir_utils.OldIrGuard():
        paddle.enable_static()
        try:
            yield
        finally:
            if was_dynamic:
                paddle.disable_static()


def load_legacy_program(path_prefix: str) -> LegacyProgram:
    """Loads a legacy program into a private scope (call inside :func:`legacy_static_mode`)."""
    scope = paddle.static.Scope()
    executor = paddle.static.Executor(paddle.CPUPlace())
    with paddle.static.scope_guard(scope):
        program, feed_names, fetch_vars = paddle.static.load_inference_model(path_prefix, executor)
    return LegacyProgram(program, list(feed_names), list(fetch_vars), scope, executor)


def save_legacy_program(loaded: LegacyProgram, path_prefix: str) -> None:
    """Writes ``path_prefix.pdmodel`` / ``.pdiparams`` (call inside :func:`legacy_static_mode`);
    a program without parameters (a model of pools and activations) gets an empty
    ``.pdiparams``, which Paddle Inference loads as such (Paddle writes none)."""
    block = loaded.program.global_block()
    feed_vars = [block.var(name) for name in loaded.feed_names]
    with paddle.static.scope_guard(loaded.scope):
        paddle.static.save_inference_model(
            path_prefix, feed_vars, loaded.fetch_vars, loaded.executor, program=loaded.program
        )
    if not os.path.exists(path_prefix + ".pdiparams"):
        open(path_prefix + ".pdiparams", "wb").close()


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


def add_zero_biases(loaded: LegacyProgram, weights: Mapping[str, LayerRecord]) -> int:
    """Adds a zero bias after each calibrated matmul that has none.

    Paddle Inference's CPU passes turn ``matmul_v2`` with a weight into ``mul`` and fuse it
    into an ``fc`` only together with a bias ``elementwise_add``; a bias-free Linear (or a
    functional ``paddle.matmul`` on a parameter) stayed an fp32 ``mul`` while the simulation
    computed it in int8 (measured on a 32->10 Linear: "1 mul fp32"; with the zero bias, an
    int8 fc agreeing with the simulation).

    Returns:
        How many biases were added.
    """
    block = loaded.program.global_block()
    reading = readers(block)
    added = 0
    for index, op in reversed(list(enumerate(block.ops))):
        if op.type not in ("matmul_v2", "mul") or transposed_matmul(op):
            continue
        weight_slot, _, output_slot = INT8_WEIGHT_OPS[op.type]
        weight = op.input(weight_slot)[0]
        if weight not in weights or len(block.var(weight).shape) != 2:
            continue
        if bias_of(block, op.output(output_slot)[0], reading) is not None:
            continue
        columns = int(block.var(weight).shape[1])
        insert_zero_bias(loaded, index, op, output_slot, f"{weight}.zero_bias", columns, -1)
        added += 1
    if added:
        loaded.program._sync_with_cpp()
    return added


def collect_scales(
    records: list[LayerRecord],
    consumers: Mapping[str, list[str]],
    extra_outputs: Mapping[str, float] | None = None,
    quantize_residuals: bool = True,
) -> tuple[dict[str, LayerRecord], dict[str, float]]:
    """Maps weight names to records and output variables to thresholds.

    Args:
        records: Calibrated layers.
        consumers: Variable name -> types of the ops reading it.
        extra_outputs: Further thresholds by variable name (never override the layers').
        quantize_residuals: Give a scale to the BatchNorm outputs that the simulation
            quantizes as the residual of a fused int8 conv (``LayerRecord.residual_output``).
    """
    weights = {record.weight_name: record for record in records if record.simulated}
    outputs: dict[str, float] = {}
    unscaled_residuals = [
        record.name for record in records if record.residual_output and not quantize_residuals
    ]
    if unscaled_residuals:
        logger.warning(
            "quantize_residuals=False: %d residual BatchNorm outputs that the simulation reads "
            "as s8 codes get no scale, so Paddle Inference runs their residual convs fp32 and "
            "adds them in float, not as simulated: %s", len(unscaled_residuals),
            ", ".join(unscaled_residuals),
        )
    # The other operand of those adds, fused into its conv, needs a scale too (see
    # quant_residual.QuantizedResidualOutput's ``fused_with``).
    fused_branches = {record.residual_fused_with for record in records if record.residual_output}
    for record in records:
        # Conv/Linear outputs get no scale of their own: a scale there makes oneDNN emit int8
        # from the op itself, e.g. quantizing a network's logits with one per-tensor scale
        # (measured: logit cosine 0.47 on a single Linear). Their consumers' input scales and
        # the fused activation's output scale cover what int8 chaining needs.
        residual_role = quantize_residuals and (record.residual_output or record.name in fused_branches)
        if (
            not record.output_thresholds or record.multiplies_inputs
            or (record.simulated and not residual_role)
        ):
            continue  # (an int8 conv with no BatchNorm after it can be either operand)
        for _, output in record.calls:
            if output is None:
                continue
            # A BN output the simulation quantizes as a residual (ResNet's downsample branch)
            # is the residual input of a fused conv, which oneDNN only runs in int8 when the
            # residual has a scale; elsewhere the BN output scale hurts.
            if record.layer_type in SKIP_OUTPUT_SCALE_LAYERS and not residual_role:
                continue
            # A layer reached twice (a shared ReLU) has one threshold for both calls.
            outputs[output] = max(outputs.get(output, 0.0), record.output_thresholds[0])
    for name, value in (extra_outputs or {}).items():
        outputs.setdefault(name, value)
    return weights, outputs


def quantize_program(
    loaded: LegacyProgram,
    records: list[LayerRecord],
    extra_outputs: Mapping[str, float] | None = None,
    quantize_residuals: bool = True,
    unsigned_inputs: bool = True,
) -> ProgramScales:
    """Rewrites ``loaded`` in place into the QDQ int8 form (see module docstring).

    Args:
        loaded: The fp32 program from :func:`load_legacy_program`.
        records: Calibrated layers from tracing.
        extra_outputs: Thresholds of further tensors (e.g. functional ops) by variable name.
        quantize_residuals: See :func:`collect_scales`.
        unsigned_inputs: x86 targets: run every input calibrated non-negative as u8 on codes
            0..127, clipped at its threshold (:mod:`.unsigned`).

    Returns:
        The scales written.
    """
    fold_conv_bias(loaded)
    fold_norms_into_halved_convs(loaded, records)  # (x86-avx2 only: its halved convs)
    block = loaded.program.global_block()
    consumers: dict[str, list[str]] = {}
    for op in block.ops:
        for slot in op.input_names:
            for name in op.input(slot):
                consumers.setdefault(name, []).append(op.type)
    weights, outputs = collect_scales(records, consumers, extra_outputs, quantize_residuals)
    matmuls_as_convs(loaded, weights)
    materialize_conv1d_weights(loaded, weights)
    add_zero_biases(loaded, weights)
    lstms = fuse_lstm_ops(loaded, weights)
    written = ProgramScales(fp32_calls=dict(lstms.simulated_fp32))
    for fused in lstms.fused:
        # fusion_lstm: fp32 weights (Paddle derives their scales), a Q/DQ pair on its input.
        op = next(op for op in block.ops if op.type == "fusion_lstm" and op.input("WeightX") == [fused.weight_x])
        activation = op.input("X")[0]
        threshold = fused.record.input_threshold
        qdq = _activation_qdq(
            loaded, list(block.ops).index(op), activation, threshold, 8, len(written.inputs)
        )
        op._rename_input(activation, qdq)
        written.inputs[activation] = threshold
        written.weights[fused.record.weight_name] = [
            float(t) for t in np.asarray(fused.record.weight_thresholds).reshape(-1)
        ]
        weights[fused.weight_x] = fused.record
    if lstms.simulated_fp32:
        logger.warning(
            "%d LSTM layers are exported fp32, as their simulation runs them: %s",
            len(lstms.simulated_fp32),
            ", ".join(f"{name} ({reason})" for name, reason in lstms.simulated_fp32.items()),
        )
    if lstms.refused:
        logger.warning(
            "%d LSTM layers simulated in int8 are exported fp32 (Paddle Inference's int8 "
            "fusion_lstm does not compute them): %s", len(lstms.refused),
            ", ".join(f"{name} ({reason})" for name, reason in lstms.refused.items()),
        )
    dequantized_weights: dict[str, str] = {}
    dequantized_inputs: dict[tuple[str, float], str] = {}
    clips = clip_fused_relus(loaded, weights, outputs) if unsigned_inputs else FusedReluClips()
    if unsigned_inputs:
        clip_concat_inputs(loaded, weights, outputs, clips)
    rectified: dict[tuple[str, float], str] = {}
    # ReLU outputs the simulation puts on a fused int8 conv's codes -> the largest code; those
    # up to 127 (after an s8 residual) need no clip in front of their readers.
    sum_code_tops = {
        out: record.sum_codes_top for record in records if record.sum_codes_threshold is not None
        for _, out in record.calls if out
    }
    shifted_inputs: dict[tuple[str, float, int], str] = {}  # (input, scale, zero point) -> u8
    shifted_biases: dict[str, str] = {}  # bias / mean -> the variable holding it adjusted
    narrow_inputs: dict[tuple[str, float], tuple[str, float, int]] = {}
    constant_call_weights: dict[str, str] = {}  # weight -> its fp32 copy for calls on constants
    writers = producers(block)

    index = 0
    while index < len(block.ops):
        op = block.ops[index]
        slots = INT8_WEIGHT_OPS.get(op.type)
        if slots is None or transposed_matmul(op):
            index += 1
            continue
        weight_slot, input_slot, _ = slots
        weight_name = op.input(weight_slot)[0]
        record = weights.get(weight_name)
        if record is None:
            index += 1
            continue
        activation = op.input(input_slot)[0]
        if record.constant_call_weight is not None and computed_from_parameters(block, activation, writers):
            # A call on a constant, which convert runs in fp32 (QuantizedLayer.constant_inputs):
            # the op reads that weight in float (one copy for every such call: Paddle Inference
            # folds them, and folding does not rescale it), and Paddle Inference folds the call.
            if weight_name not in constant_call_weights:
                constant_call_weights[weight_name] = new_persistable(
                    loaded, f"{weight_name}.constant_call", np.asarray(record.constant_call_weight, np.float32),
                )
            op._rename_input(weight_name, constant_call_weights[weight_name])
            index += 1
            continue
        inserted = 0
        # Weight: int8 tensor -> dequantize_linear -> op.
        dequantized = dequantized_weights.get(weight_name)
        if dequantized is None:
            dequantized = _int8_weight(
                loaded, index, weight_name, record, written,
                clips.weight_factors.get(weight_name, 1.0),
            )
            dequantized_weights[weight_name] = dequantized
        else:
            # A weight read by several ops (a layer called twice) gets a private int8 copy per
            # reader: oneDNN's int8 passes rescale each op's weight tensor in place, so a shared
            # tensor is rescaled twice (measured: all-zero outputs for a Linear called twice).
            dequantized = _copy_int8_weight(loaded, index, dequantized, serial=index)
        inserted += 1
        op._rename_input(weight_name, dequantized)
        # Activation: [relu ->] quantize_linear -> dequantize_linear -> op.
        if _is_constant(block, activation, writers):
            # convert keeps such a layer fp32 once calibration saw its input unchanged while
            # the model's inputs changed (LayerState.constant_input); one batch cannot show it.
            logger.warning(
                "layer %r reads %s, computed from parameters only: Paddle Inference folds it "
                "into a constant computed in fp32, not the int8 layer the simulation computes. "
                "Calibrate with two or more different batches, so that convert keeps it fp32 "
                "too.", record.name, activation,
            )
        quantized, threshold = activation, record.input_threshold
        if unsigned_inputs and record.input_unsigned:
            threshold = clips.thresholds.get(activation, threshold)
            if activation not in clips.thresholds and not (
                relu_after_residual_conv(block, activation, writers)
                and (
                    record.input_top_code > symmetric_levels(record.activation_bits)
                    or (record.residual_codes and sum_code_tops.get(activation, U8_MAX) <= symmetric_levels(8))
                )
            ):
                # Clip at the threshold and rectify, so Paddle runs it as u8 (a ``clip`` output
                # alone would be s8, which a fc shifts by +128 into u8 before the saturating
                # pair sums) within 0..127. A ReLU after a residual conv is left as it is where
                # the simulation reads what the fused conv writes (codes up to 255, or its s8
                # codes): a clip there would halve ResNet's int8 speed-up (see unsigned.py).
                # Where it clips at 127 (an add calibration did not find fused, such as a
                # pooled projection's, whose ReLU output the next block reads as its identity:
                # measured 1.5% of the largest logit off on DLA-shaped trees), so does this.
                quantized = rectified.get((activation, threshold))
                if quantized is None:
                    quantized = insert_clip_relu(
                        loaded, index + inserted, activation, threshold, writers
                    )
                    rectified[(activation, threshold)] = quantized
                    inserted += 2
            threshold = unsigned_threshold(threshold, record.activation_bits)
        elif unsigned_inputs and record.input_shift_response is not None:
            # A signed input on u8 codes 0..127: shifted in front, the bias takes it back.
            threshold = shifted_u8_threshold(record)
            grid = (activation, record.input_scale, record.input_zero_point)
            quantized = shifted_inputs.get(grid)
            if quantized is None:
                quantized = insert_shift(
                    loaded, index + inserted, activation, record,
                    shifted_levels(record.activation_bits),
                )
                shifted_inputs[grid] = quantized
                inserted += SHIFT_OPS
            absorb_shift(
                loaded, op, slots[2], record, clips.weight_factors.get(weight_name, 1.0),
                shifted_biases,
            )
        elif unsigned_inputs and record.activation_bits < 8:
            # A signed input on a narrower grid, clipped to its codes.
            quantized, threshold, added = _narrowed_once(
                narrow_inputs, loaded, index + inserted, activation, threshold,
                record.activation_bits, writers,
            )
            inserted += added
        # oneDNN's pipeline reads 8-bit quantize ops only: every threshold above puts a
        # narrower grid on 8-bit codes.
        bits = 8 if unsigned_inputs else record.activation_bits
        key = (quantized, threshold)
        qdq = dequantized_inputs.get(key)
        if qdq is None:
            qdq = _activation_qdq(
                loaded, index + inserted, quantized, threshold, bits, len(dequantized_inputs),
            )
            dequantized_inputs[key] = qdq
            written.inputs[quantized] = threshold
            inserted += 2
        op._rename_input(activation, qdq)
        index += inserted + 1

    _quantize_activation_matmuls(loaded, records, written, dequantized_inputs, narrow_below_8_bits=unsigned_inputs)
    _resample_signed_tensors_in_float(loaded)
    _isolate_quantized_shared_outputs(block)
    pieces = _isolate_sliced_pieces(loaded)
    on_codes = {
        out for record in records if record.residual_output or record.sum_codes_threshold is not None
        for _, out in record.calls if out
    }
    coded_thresholds = {
        out: record.sum_codes_threshold for record in records if record.sum_codes_threshold is not None
        for _, out in record.calls if out
    }
    # The identity shortcuts the simulation reads on codes (its int8 readers put them there).
    identities = {
        inputs[0]: CodedIdentity(record.input_threshold, record.residual_codes, record.activation_bits)
        for record in records if record.residual_codes for inputs, _ in record.calls if inputs
    }
    _align_pooled_scales(block, rectified, outputs, on_codes, coded_thresholds, set(identities))
    _align_signed_resampled_scales(loaded, outputs)
    _keep_average_pools_fp32(block, outputs, records, coded_thresholds)
    _isolate_fp32_weight_op_outputs(loaded)
    # A shift reads its input in fp32 too: a scale there would make the producer emit s8 on
    # a grid the simulation never uses (measured: 1.2% off after a fc + Hardswish, 1.9% with
    # a Dropout in between). So does an LSTM left fp32 (an ``rnn`` op; measured: a fc + ReLU
    # before it wrote int8 codes it read, 1.1% off).
    fp32_rnn_inputs = [op.input("Input")[0] for op in block.ops if op.type == "rnn"]
    kept = unscale_fp32_layer_inputs(
        block, outputs, isolate_concats=True,
        fp32_inputs=[name for name, _, _ in shifted_inputs] + pieces + fp32_rnn_inputs,
    )
    written.fp32_layers = _fp32_layers(weights, written, block)
    written.weight_layers = {name: record.name for name, record in weights.items()}
    no_kernel = {
        name: kind for name, kind in written.fp32_layers.items()
        if name not in lstms.refused and name not in lstms.simulated_fp32
    }
    # A layer called inside a loop or branch on a tensor (``for _ in range(x.shape[1])`` on a
    # dynamic size, ``if x.mean() > 0``) is read by the while / conditional_block op alone:
    # its ops sit in a sub-block, which Paddle Inference's int8 passes do not reach (measured:
    # a Linear applied 16 times in such a loop, 31% of the largest output off the simulation).
    in_blocks = {
        name for op in block.ops if op.type in _CONTROL_FLOW_OPS for name in op.input_arg_names
    } - {name for op in block.ops if op.type not in _CONTROL_FLOW_OPS for name in op.input_arg_names}
    looped = {record.name for name, record in weights.items() if name in in_blocks}
    if looped:
        logger.warning(
            "%d layers calibrated and simulated in int8 are called inside a loop or branch on "
            "a tensor (a while / conditional_block op), whose body Paddle Inference's int8 "
            "passes do not reach: the runtime computes them in fp32, unlike the simulation. "
            "Run the loop over a Python int, or put them back in fp32 with "
            "imperative_ptq.keep_fp32(qmodel, %s, model) so that the simulation does too",
            len(looped), sorted(looped),
        )
    no_kernel = {name: kind for name, kind in no_kernel.items() if name not in looped}
    if no_kernel:
        logger.warning(
            "%d layers calibrated and simulated in int8 are exported fp32 (Paddle's int8 "
            "program form has no int8 kernel for their ops, e.g. conv3d, conv2d_transpose): "
            "%s", len(no_kernel), ", ".join(f"{name} ({kind})" for name, kind in no_kernel.items()),
        )
    for record in records:
        if record.residual_codes:
            # The simulation stores this input as u8 codes of the layer's input threshold
            # (read by a fused residual conv too): that is its scale, whatever its producer's
            # own output threshold.
            for inputs, _ in record.calls:
                if inputs:
                    outputs[inputs[0]] = record.input_threshold
    # A network input the simulation reads on those codes has no op to carry its scale: the
    # adds fused into an int8 conv read a relu copy that does (:func:`_scaled_input_copies`).
    input_copies = _scaled_input_copies(block, outputs, set(loaded.feed_names))
    writers = producers(block)
    activation_bits = model_activation_bits(records)
    returned = returned_only_outputs(block, outputs, writers, int8_pool_outputs(records), float_adds=True)
    if returned:
        logger.info(
            "%d tensors that no int8 op reads (the network returns them, or only fp32 pools and "
            "float ops such as the clips in front of u8 inputs read them) keep no scale, so Paddle "
            "Inference writes them in float as the simulation does: %s", len(returned),
            ", ".join(sorted(returned)),
        )
    for name, threshold in outputs.items():
        if name in returned:
            continue
        op = writers.get(name)
        if op is None or op.type in ("quantize_linear", "dequantize_linear"):
            continue
        if name in written.inputs:
            # One scale per tensor: the one its int8 readers quantize it with (Paddle takes
            # whichever it collects first), which the u8 clip above also assumes.
            threshold = written.inputs[name]
        elif unsigned_inputs and runs_unsigned(block, name, writers):
            # u8 codes of the simulation's grid (t / L), in the 8-bit form Paddle reads.
            threshold = unsigned_threshold(threshold, activation_bits)
        elif unsigned_inputs:
            # s8 codes of that grid (a downsample residual), in 8-bit form too.
            threshold = threshold * symmetric_levels(8) / symmetric_levels(activation_bits)
        op._set_attr("out_threshold", float(threshold))
        written.outputs[name] = float(threshold)
    simulated_residuals = {out for record in records if record.residual_output for _, out in record.calls if out}
    # Tensors the simulation reads as a fused conv's residual codes: those outputs, and the
    # identity shortcuts (network inputs through the copies the adds read).
    identities.update({copy: identities[name] for name, copy in input_copies.items() if name in identities})
    coded_residuals = simulated_residuals | set(identities)
    isolated = _isolate_unscaled_residual_adds(block, written, simulated_residuals, coded_residuals)
    _separate_self_residual_inputs(block)
    if isolated:
        # An add kept out of its conv computes in float: a scale on its other operand now only
        # makes that operand's writer run int8 (measured: Xception's entry-flow max-pool of an
        # fp32 separable conv's BatchNorm output, added to the strided shortcut conv: the pool
        # ran s8, 0.9% of the next conv's largest output off, 2.3% of Xception41's logits).
        writers = producers(block)
        # (Not a tensor the simulation holds on codes: a fused conv's residual, a coded sum.)
        float_only = returned_only_outputs(
            block, written.outputs, writers, int8_pool_outputs(records), float_adds=True
        ) - coded_residuals - on_codes
        for name in float_only:  # (each written on its writer's out_threshold above)
            writers[name]._remove_attr("out_threshold")
            written.outputs.pop(name)
    unscaled = _float_outputs_for_float_readers(block, written, coded_residuals | set(sum_code_tops))
    if unscaled:
        logger.info("%d int8 conv/fc outputs that fp32 ops read too are written in float: %s",
                    len(unscaled), ", ".join(unscaled))
    writers = producers(block)
    # Float layers the simulation reads the codes with, wherever they run (ResidualCodesInput).
    coded_layer_outputs = frozenset(
        out for record in records if record.residual_codes and record.weight_name is None
        for _, out in record.calls if out
    )
    rounded = round_float_readers(
        block, identities, lambda name: _int8_weight_op_output(block, name, writers), coded_layer_outputs
    )
    if rounded:
        logger.info("%d float ops read an identity shortcut on its codes, as simulated", rounded)
    loaded.program._sync_with_cpp()
    if isolated:
        logger.info("%d int8 conv/fc outputs kept out of a residual add without a scale", isolated)
    read_integer_weights_through_copies(loaded)
    logger.info(
        "int8 program: %d int8 weights, %d activation QDQ pairs, %d output scales, %d conv/fc "
        "ops kept fp32",
        len(written.weights), len(dequantized_inputs), len(written.outputs), kept,
    )
    return written


#: Ops that only lay values out anew: a tensor read in fp32 through them (a Flatten in front
#: of a fp32 Linear) must not keep a scale on their input either (measured: a calibrated
#: global pool -> flatten -> fp32 Linear ran the pool in int8, 3% off the simulation).
_RESHAPING_OPS = frozenset({"flatten_contiguous_range", "flatten2", "squeeze2", "unsqueeze2"})

#: Ops across which Paddle's ``compute_propagate_scales_onednn_pass`` copies a tensor scale, in
#: either direction, and ops its inference passes remove (``dropout``, ``assign``), which join
#: their input and output into one tensor (measured: a Linear kept fp32 behind a Hardswish and
#: a Dropout ran ``gemm_s8s8s32``).
_SCALE_PROPAGATING_OPS = frozenset({
    "transpose2", "fused_transpose", "reshape2", "pool2d", "slice", "shape", "nearest_interp",
    "nearest_interp_v2", "split", "concat", "scale", "dropout", "assign",
})


def unscale_fp32_layer_inputs(
    block: "paddle.static.Block",
    outputs: dict[str, float],
    is_int8: "Callable[[paddle.base.framework.Operator], bool] | None" = None,
    isolate_concats: bool = False,
    fp32_inputs: Sequence[str] = (),
) -> int:
    """Drops the output thresholds that would reach the input of a conv/fc kept fp32.

    Paddle's oneDNN pipeline quantizes every conv/fc whose input has a scale, with weight
    scales it computes itself: a layer kept fp32 (a signed input on x86, ``keep_fp32``) would
    otherwise run int8 anyway (measured: a Linear after a calibrated Tanh ran
    ``gemm_s8s8s32``; a ``skip_quant`` attribute is lost when matmul_v2 becomes fc). Scales
    spread across reshape/transpose/pool ops both ways, so the whole connected group goes.

    Args:
        block: The program block.
        outputs: Thresholds by variable; updated.
        is_int8: Whether a conv/fc op is an int8 layer (default: its weight comes from a
            ``dequantize_linear``, as :func:`quantize_program` writes it).
        isolate_concats: Also put an identity ``clip`` after each concat that reads a conv/fc
            kept fp32, so that a scale on the concat's output (an int8 reader's quantize op)
            cannot reach its inputs (Paddle Inference programs; see
            :func:`_concat_inputs_beside_fp32_layers`).
        fp32_inputs: Further tensors read in fp32 by something else than a conv/fc (the
            input of a shift, :mod:`.shifted`).

    Returns:
        How many conv/fc ops are kept fp32.
    """
    writers, reading = producers(block), readers(block)
    pending, kept = list(fp32_inputs), 0
    fp32_ops: list = []
    for op in block.ops:
        if op.type in FP32_WEIGHT_OPS:
            kept += 1
            pending.extend(op.input(FP32_WEIGHT_OPS[op.type][1]))
            fp32_ops.append(op)
            continue
        slots = INT8_WEIGHT_OPS.get(op.type)
        if slots is None or not op.input(slots[0]):
            continue
        if is_int8(op) if is_int8 is not None else _reads_int8_weight(op, slots, writers):
            continue
        kept += 1
        pending.extend(op.input(slots[1]))
        fp32_ops.append(op)
    mixed = _concat_inputs_beside_fp32_layers(block, fp32_ops, writers, reading, isolate_concats)
    if isolate_concats and mixed:
        writers, reading = producers(block), readers(block)
    pending.extend(mixed)
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        outputs.pop(name, None)
        neighbours = [writers.get(name)] + reading.get(name, [])
        for op in neighbours:
            if op is not None and op.type in _SCALE_PROPAGATING_OPS | _RESHAPING_OPS:
                pending.extend(n for slot in op.input_names for n in op.input(slot))
                pending.extend(n for slot in op.output_names for n in op.output(slot))
    return kept


#: Ops between a conv/fc and a concat that oneDNN fuses into the conv (its bias, activation).
_FUSED_INTO_CONV_OPS = frozenset({"elementwise_add", "relu", "relu6", "hard_swish", "swish", "leaky_relu"})


def _concat_inputs_beside_fp32_layers(
    block, fp32_ops: list, writers: Mapping, reading: Mapping, isolate: bool = False
) -> list[str]:
    """The tensors between the convs/fcs feeding a concat and the concat, for every concat
    that reads a conv/fc kept fp32 (through the bias add and activation oneDNN fuses into it).

    Paddle's int8 pipeline would quantize that fp32 conv's output as s8 (a relu fused into an
    fp32 conv no longer marks it unsigned) next to the u8 outputs of int8 convs, and oneDNN
    then fails to build the concat ("could not create a primitive descriptor for a concat
    primitive", measured on paddle.vision's GoogLeNet). Without scales on its inputs the
    concat stays fp32. With ``isolate`` (Paddle Inference programs) the same holds for a
    concat of int8 layers' outputs of both signs (:func:`_mixed_signs`). With ``isolate``, an identity ``clip`` after the concat keeps a scale
    on its output (the quantize op of an int8 layer reading it, as in a U-Net's decoder on
    ``x86-vnni``) from spreading back to its inputs: Paddle's scale propagation crosses a
    concat but not a clip.
    """
    fp32_ids = {id(op) for op in fp32_ops}
    names: list[str] = []
    for op in block.ops:
        if op.type != "concat":
            continue
        chains = [_chain_to_producer(name, block, writers) for name in op.input("X")]
        beside_fp32 = any(producer is not None and id(producer) in fp32_ids for producer, _ in chains)
        if beside_fp32 or (isolate and _mixed_signs(block, op.input("X"), writers)):
            names.extend(name for _, chain in chains for name in chain)
            # A ReLU after the concat is fused into the convs before it
            # (conv_concat_relu_mkldnn_fuse_pass): its output is the concat's.
            out = op.output("Out")[0]
            after = reading.get(out, [])
            if len(after) == 1 and after[0].type in ("relu", "relu6"):
                names.extend(after[0].output("Out"))
            elif isolate and after:
                _insert_identity_clip(block, op, out, after)
    return names


def _mixed_signs(block, names: Sequence[str], writers: Mapping) -> bool:
    """Whether Paddle's int8 pipeline would hand a concat of ``names`` both u8 and s8 inputs,
    which oneDNN cannot join ("could not create a primitive descriptor for a concat
    primitive", measured on ``x86-vnni``: a leaky-ReLU or Swish branch, upsampled or not,
    concatenated with a ReLU one, YOLOv3's FPN). A tensor is u8 where a ReLU wrote it
    (:func:`.unsigned.runs_unsigned`), also behind ops that pass values on (a resize, a max
    pool)."""

    signs = {runs_unsigned(block, _value_source(name, writers)[0], writers) for name in names}
    return len(signs) == 2


def _value_source(name: str, writers: Mapping, reading: Mapping | None = None) -> tuple[str, list[str]]:
    """Walks back from ``name`` through the ops that pass values on (:func:`_passes_values`),
    concats excepted: the tensor reached and the tensors on the way (``name`` first, the one
    reached not included). With ``reading``, stops at a tensor other ops read too."""
    walked = []
    op = writers.get(name)
    while op is not None and op.type != "concat" and _passes_values(op):
        walked.append(name)
        name = op.input("X")[0]
        if reading is not None and len(reading.get(name, [])) != 1:
            break
        op = writers.get(name)
    return name, walked


def _quantize_threshold(loaded: LegacyProgram, op) -> float:
    """The threshold a ``quantize_linear`` op quantizes on (its ``Scale``)."""
    return float(get_tensor(loaded, op.input("Scale")[0]).reshape(-1)[0])


def _insert_identity_clip(block, writer, name: str, consumers: list, suffix: str = "isolated") -> None:
    """Makes ``consumers`` read ``clip(name)`` over the whole float range instead of ``name``
    (its output ``<name>.<suffix>``)."""
    limit = float(np.finfo(np.float32).max)
    insert_reader_op(block, writer, name, consumers, "clip", suffix, {"min": -limit, "max": limit})


#: Op types that Paddle 3.3.1's ``cpu_quantize_pass`` can run int8 on a scaled input (in the
#: legacy form, before the oneDNN fuses rename them), and the quantize ops our export writes.
_ONEDNN_INT8_READERS = frozenset({
    "conv2d", "depthwise_conv2d", "pool2d", "concat", "prior_box", "fc", "mul", "matmul",
    "matmul_v2", "reshape2", "transpose2", "slice", "nearest_interp", "nearest_interp_v2",
    "split", "elementwise_add", "elementwise_mul", "elementwise_sub", "fusion_gru", "multi_gru",
    "fusion_lstm", "quantize_linear", "dequantize_linear",
})


#: Ops a following activation can fuse into in Paddle's oneDNN passes (a conv or fc, its
#: bias or residual add, its BatchNorm).
_ACTIVATION_FUSING_WRITERS = frozenset(FUSING_OPS) | {"conv2d_transpose", "fc", "elementwise_add", "batch_norm"}


def reads_in_float(op) -> bool:
    """Whether Paddle Inference runs ``op`` in float on its input's dequantized value, with no
    int8 kernel to hand a scale on to (a ``reduce_mean``, a ``softmax``; not an activation,
    which a conv or fc before it may absorb, nor an op scales pass across)."""
    return op.type not in _ONEDNN_INT8_READERS and op.type not in FUSABLE_ACTIVATIONS and (
        op.type not in _SCALE_PROPAGATING_OPS and op.type not in ("fetch", "feed")
    )


def returned_only_outputs(
    block: "paddle.static.Block", outputs: Mapping[str, float], writers: Mapping,
    int8_pools: Mapping[str, float] | None = None, float_adds: bool = False,
) -> set[str]:
    """The scaled tensors that only reach the network's outputs, average pools that run fp32
    or ops that compute in float (:func:`reads_in_float`): a ReLU after a conv and the
    max-pools after it, whose only other reader is a ``fetch`` (a VGG prefix ending in a
    pool), an average pool (a VGG or CRNN head: max pool, then an adaptive average pool, then
    a Linear) or a ``reduce_mean`` (the same head written as ``x.mean([2, 3])``: 0.5-1% of the
    largest logit off while the pool ran int8; 0.4-0.6% through a sigmoid).

    With a scale the conv writes them as int8 codes for the int8 pool, and Paddle Inference
    returns (or averages) the dequantized codes where the simulation has floats (measured:
    2.6e-3 of the largest value on a conv -> ReLU -> max-pool network; 1.4% of the largest
    logit through a max pool and an average pool). Without one they run fp32, which costs no
    int8 reader anything. A block output after a fused residual conv keeps its scale (the
    fused conv needs it; the simulation writes it as codes, quant_residual.py).

    ``int8_pools``: the outputs of the global average pools the simulation runs int8
    (:func:`int8_pool_outputs`), whose input needs its scale. ``float_adds``: count the
    elementwise ops Paddle Inference computes in float (:func:`_adds_in_float`) as float
    readers (the program's int8 convs are known by their dequantized weights).
    """
    int8_pools = int8_pools or {}
    reading = readers(block)
    returned: set[str] = set()
    for name in outputs:
        if name in returned or relu_after_residual_conv(block, name, writers):
            continue
        group, pending, only_returned, ends_in_fp32 = set(), [name], True, False
        while pending and only_returned:
            tensor = pending.pop()
            if tensor in group:
                continue
            group.add(tensor)
            for op in reading.get(tensor, []):
                if op.type == "fetch":
                    continue
                if op.type == "pool2d" and op.attr("pooling_type") == "avg" and op.output("Out")[0] not in int8_pools:
                    ends_in_fp32 = True  # _keep_average_pools_fp32 runs it fp32
                    continue
                if float_adds and _adds_in_float(block, op, outputs, writers):
                    ends_in_fp32 = True
                    continue
                writer = writers.get(tensor)
                if _passes_values(op) or (
                    op.type in FUSABLE_ACTIVATIONS and writer is not None
                    and writer.type not in _ACTIVATION_FUSING_WRITERS
                ):
                    # An activation no conv or fc absorbs (a sigmoid of a max-pool) computes
                    # in float: what matters is what reads its output.
                    pending.extend(op.output("Out"))
                elif reads_in_float(op):
                    ends_in_fp32 = True
                else:
                    only_returned = False
        if only_returned and (ends_in_fp32 or any(
            op.type == "fetch" for tensor in group for op in reading.get(tensor, [])
        )):
            returned |= group & set(outputs)
    return returned


#: Elementwise ops Paddle's oneDNN pipeline runs int8 when both operands and the output have
#: scales, or fuses into an int8 conv as its residual.
_ELEMENTWISE_INT8_READERS = frozenset({"elementwise_add", "elementwise_sub", "elementwise_mul"})


def _adds_in_float(block: "paddle.static.Block", op, outputs: Mapping[str, float], writers: Mapping) -> bool:
    """Whether elementwise ``op`` computes in float in Paddle Inference: its operands and output
    do not all have scales (so it is not quantized itself) and no operand is an int8 conv/fc
    output (so it is no fused int8 conv's residual add). A scale on an operand then only makes
    the op writing that operand run int8 (an identity shortcut's max-pool of a PReLU output,
    AdaFace's IR blocks, beside an fp32 conv: 9% of the largest output off), where the
    simulation computes in float."""
    if op.type not in _ELEMENTWISE_INT8_READERS:
        return False
    operands = op.input("X") + op.input("Y")
    if all(name in outputs for name in operands + op.output("Out")):
        return False
    return not any(_int8_gemm_output(block, name, writers) for name in operands)


def _isolate_unscaled_residual_adds(
    block: "paddle.static.Block", written: ProgramScales, simulated_residuals: set[str],
    coded_residuals: set[str],
) -> int:
    """Keeps each int8 conv/fc out of a residual add whose other operand, or whose sum (after
    the ReLU oneDNN fuses too), has no scale.

    oneDNN fuses a conv (or fc) and the add of another tensor after it (its bias add or
    BatchNorm in between) into one op, which Paddle runs int8 only when that residual has a
    scale; without one the fused op runs fp32 on its *unquantized* input, while the
    simulation quantizes it (measured: 1% relative error on conv -> BatchNorm -> 1x1 conv ->
    ReLU6 -> conv + residual; MobileNetV2's residual block outputs, which are functional adds,
    and a transformer's residual LayerNorm outputs read through a shift have no scale). An
    identity ``scale`` op between the conv and the add stops the fusion: the conv runs int8
    on its own with an fp32 output and the add in fp32, as simulated. The fused op's output
    needs a scale too: a network's last ``F.relu(x + y)``, read only by a global pool, has none
    (there the simulation's residual codes are what the int8 conv before the add wrote).

    ``simulated_residuals``: the outputs the simulation writes as the residual a fused conv
    reads (:class:`~imperative_ptq.quant_residual.QuantizedResidualOutput`); where one is the
    projection Paddle fuses into the other conv, that conv keeps the add whatever its own
    output's scale. ``coded_residuals``: every tensor the simulation reads as such codes
    (those, and identity shortcuts on u8 codes); a conv whose add's other operand is a signed
    activation (no ReLU or conv output) that is not one is kept out of the add too. Paddle
    would read that operand on its scale's codes where the simulation adds it in float
    (measured on ``x86-vnni``: a Hardswish output as the identity of a 1x1 conv + BatchNorm,
    3-10% off).

    Returns:
        How many conv/fc outputs were isolated.
    """
    writers = producers(block)
    reading = readers(block)
    # What the program quantizes (a signed tensor whose quantize op reads a copy of it, see
    # _isolate_quantized_shared_outputs, has no scale itself) and the outputs given one.
    scaled = {op.input("X")[0] for op in block.ops if op.type == "quantize_linear"} | set(written.outputs)
    isolated = 0
    for add, operands in _activation_adds(block):
        total = add.output("Out")[0]
        after = reading.get(total, [])
        # The sum read as s8 by an int8 op (its quantize op reading it directly, no ReLU or
        # u8 clip in between).
        signed_sum = any(reader.type == "quantize_linear" for reader in after)
        if len(after) == 1 and after[0].type in ("relu", "relu6"):
            total = after[0].output("Out")[0]
        int8_output = {name: _int8_weight_op_output(block, name, writers) for name in operands}
        projection = _projection_operand(operands, writers, int8_output)
        for position, name in enumerate(operands):
            other = operands[1 - position]
            if not int8_output[name] or (name == projection and name in simulated_residuals):
                continue  # no int8 conv; or Paddle fuses the add into the other conv, reading this one
            # A signed activation as the residual (an identity shortcut that is no ReLU or conv
            # output) is read on codes only where the simulation puts it on them.
            # A u8 residual (a ReLU output) of a signed sum: oneDNN would read its codes as s8
            # (the simulation adds it in float, convert._simulate_fused_residuals).
            coded = (
                other in coded_residuals or (runs_unsigned(block, other, writers) and not signed_sum)
                or int8_output[other]
            )
            if other in scaled and total in scaled and coded:
                continue
            if len(reading.get(name, [])) != 1:
                continue  # read elsewhere too: oneDNN does not fuse the add
            var = block.var(name)
            plain = block.create_var(name=f"{name}.unfused", shape=var.shape, dtype=var.dtype)
            add._rename_input(name, plain.name)
            index = op_index(block, writers[name])
            insert_op(
                block, index + 1, type="scale", inputs={"X": [name]}, outputs={"Out": [plain.name]},
                attrs={"scale": 1.0, "bias": 0.0, "bias_after_scale": True},
            )
            isolated += 1
    return isolated


def _scaled_input_copies(
    block: "paddle.static.Block", outputs: dict[str, float], feeds: set[str]
) -> dict[str, str]:
    """Gives each network input with a threshold in ``outputs`` that an add reads beside an
    int8 conv's output (an identity shortcut on u8 codes, ``x + conv(x)`` on an image) a
    ``relu`` copy for those adds, which carries the threshold: Paddle fuses such an add into
    the conv only when the residual has a scale, and a feed variable has no op to write one
    (measured: the conv ran fp32 with the add fused, 0.9-1.7% of the largest output off the
    simulation), and only where the residual is an ancestor of the conv's output, so the u8
    clips in front of int8 readers read the copy too. ``relu`` keeps the copy u8 and changes
    no value the simulation reads there (its codes clip at 0 too). Updates ``outputs``;
    returns input -> copy.
    """
    writers, reading = producers(block), readers(block)
    copies: dict[str, str] = {}
    for name in sorted(feeds & set(outputs)):
        adds = [
            op for op in reading.get(name, []) if op.type == "elementwise_add"
            and any(
                other != name and not is_persistable(block, other) and _int8_weight_op_output(block, other, writers)
                for other in op.input("X") + op.input("Y")
            )
        ]
        if not adds:
            continue
        var = block.var(name)
        copy = block.create_var(name=f"{name}.scaled", shape=var.shape, dtype=var.dtype)
        insert_op(
            block, min(op_index(block, op) for op in reading[name]), type="relu",
            inputs={"X": [name]}, outputs={"Out": [copy.name]},
        )
        # The u8 clips in front of int8 readers read the copy too: Paddle fuses the add only
        # where the residual is an ancestor of the conv's output.
        clips = [op for op in reading[name] if any(out.startswith(f"{name}.u8_") for out in op.output_arg_names)]
        for op in adds + clips:
            op._rename_input(name, copy.name)
        outputs[copy.name] = outputs[name]
        copies[name] = copy.name
    return copies


def _activation_adds(block: "paddle.static.Block") -> Iterator[tuple[Any, list[str]]]:
    """Each ``elementwise_add`` of two activations (no parameter operand) in ``block``, with
    its two operands (a snapshot of the ops: callers insert ops as they go)."""
    for add in list(block.ops):
        if add.type != "elementwise_add":
            continue
        operands = add.input("X") + add.input("Y")
        if len(operands) == 2 and not any(is_persistable(block, name) for name in operands):
            yield add, operands


def _separate_self_residual_inputs(block: "paddle.static.Block") -> int:
    """Gives each int8 conv whose residual add reads the conv's own u8 input (``relu(x +
    conv(x))`` with ``x`` on codes, as a looped or single-conv residual block computes it) a
    ``relu`` copy of that input to quantize, so that Paddle fuses the add into the conv as the
    simulation computes it.

    Paddle's residual fusion matches the conv's input and the residual as two distinct graph
    nodes, so it skips an add whose residual is the conv's input itself and adds in float;
    where the export clips the input (a copy), it fuses. Measured on ``h = relu(h + conv(h))``
    three times: the second and third adds ran in float, 0.75-1.4% of the largest output off
    the simulation, which fuses them. A ``relu`` of a non-negative tensor changes no value and
    keeps the copy u8.

    Returns:
        How many conv inputs were separated.
    """
    writers = producers(block)
    separated = 0
    for add, operands in _activation_adds(block):
        for position, name in enumerate(operands):
            residual = operands[1 - position]
            op = _int8_weight_op_writing(block, name, writers)
            if op is None or op.type not in ("conv2d", "depthwise_conv2d"):
                continue  # Paddle fuses residual adds into int8 convs only
            dequantize = writers.get(op.input(INT8_WEIGHT_OPS[op.type][1])[0])
            quantize = None if dequantize is None else writers.get(dequantize.input("X")[0])
            if (
                quantize is None or quantize.type != "quantize_linear"
                or quantize.input("X")[0] != residual
                or not runs_unsigned(block, residual, writers)
            ):
                continue
            var = block.var(residual)
            copy = block.create_var(name=f"{residual}.conv_input", shape=var.shape, dtype=var.dtype)
            insert_op(
                block, op_index(block, quantize), type="relu", inputs={"X": [residual]},
                outputs={"Out": [copy.name]},
            )
            quantize._rename_input(residual, copy.name)
            writers[copy.name] = block.ops[op_index(block, quantize) - 1]
            separated += 1
    if separated:
        logger.info("%d int8 convs read a relu copy of an input their residual add reads too, "
                    "so that Paddle fuses the add", separated)
    return separated


def _float_outputs_for_float_readers(
    block: "paddle.static.Block", written: ProgramScales, coded: set[str]
) -> list[str]:
    """Removes the output scale of each int8 conv/fc output (after its fused bias, BatchNorm
    and activation) that an op other than an int8 reader reads, where the simulation keeps the
    tensor in float.

    With an output scale, Paddle's int8 conv writes its output as codes on that scale and
    dequantizes them for every fp32 reader, and an int8 reader on another grid re-quantizes
    the codes; the simulation gives those readers the float tensor (measured on DLA-shaped
    trees: the tree root's ReLU output max-pooled on the projection's grid and concatenated
    by the next root, 0.8% of the largest logit off; 2.5e-7 without the scale). Without a
    scale the conv writes float and each int8 reader quantizes it with its own threshold.
    Kept: tensors the simulation holds on codes (``coded``), and those read only by int8
    readers (a quantize op, perhaps behind its u8 clip), int8 concats and pools.

    Returns:
        The tensors whose scale was removed.
    """
    writers, reading = producers(block), readers(block)
    removed = []
    for name in list(written.outputs):
        op = writers.get(name)
        if name in coded or op is None or not op.has_attr("out_threshold"):
            continue
        consumers = reading.get(name, [])
        if not consumers or all(
            feeds_quantize(reader, reading)
            or (reader.type in ("concat", "pool2d") and reader.has_attr("out_threshold"))
            for reader in consumers
        ):
            continue
        if not _int8_gemm_output(block, name, writers):
            continue
        op._remove_attr("out_threshold")
        del written.outputs[name]
        removed.append(name)
    return removed


def _int8_gemm_output(block: "paddle.static.Block", name: str, writers: Mapping) -> bool:
    """Whether ``name`` is an int8 conv/fc output after the ops oneDNN fuses into it (its bias
    add, BatchNorm, one activation)."""
    op = writers.get(name)
    if op is not None and op.type in FUSABLE_ACTIVATIONS:
        name = op.input("X")[0]
    return _int8_weight_op_output(block, name, writers)


def _projection_operand(operands: list[str], writers: Mapping, int8_output: Mapping[str, bool]) -> str | None:
    """Of a residual add of two int8 conv/fc outputs (``int8_output``: which operands are),
    the one Paddle reads as the residual of the other's fused conv (its projection fusion's
    rule: the conv whose input is an ancestor of the other conv's output is the projection);
    ``None`` if not both are such outputs or neither input is such an ancestor."""
    if not all(int8_output[name] for name in operands):
        return None

    def conv_input(name: str) -> str:
        op = writers.get(name)
        while op is not None and op.type not in INT8_WEIGHT_OPS:
            op = writers.get(op.input("X")[0])
        return op.input(INT8_WEIGHT_OPS[op.type][1])[0]

    def ancestors(name: str) -> set[str]:
        seen, pending = set(), [name]
        while pending:
            current = pending.pop()
            op = writers.get(current)
            if op is None:
                continue
            for slot in op.input_names:
                for source in op.input(slot):
                    if source not in seen:
                        seen.add(source)
                        pending.append(source)
        return seen

    first, second = operands
    if conv_input(first) in ancestors(second):
        return first
    if conv_input(second) in ancestors(first):
        return second
    return None


def _int8_weight_op_output(block: "paddle.static.Block", name: str, writers: Mapping) -> bool:
    """Whether ``name`` is the output of an int8 conv/fc, after its bias add or BatchNorm."""
    return _int8_weight_op_writing(block, name, writers) is not None


def _int8_weight_op_writing(block: "paddle.static.Block", name: str, writers: Mapping) -> Any | None:
    """The int8 conv/fc whose output ``name`` is, after its bias add or BatchNorm; else ``None``."""
    op = writers.get(name)
    while op is not None and (
        op.type == "batch_norm"
        or (op.type == "elementwise_add" and is_persistable(block, op.input("Y")[0]))
    ):
        op = writers.get(op.input("X")[0])
    if op is None or op.type not in INT8_WEIGHT_OPS or transposed_matmul(op):
        return None
    writer = writers.get(op.input(INT8_WEIGHT_OPS[op.type][0])[0])
    return op if writer is not None and writer.type == "dequantize_linear" else None


def _chain_to_producer(name: str, block, writers: Mapping) -> tuple[object | None, list[str]]:
    """Walks back from ``name`` through the ops oneDNN fuses into a conv/fc (bias add,
    activation): the op it reaches and the tensors on the way (``name`` included)."""
    chain = [name]
    op = writers.get(name)
    while op is not None and op.type in _FUSED_INTO_CONV_OPS:
        inputs = [n for slot in op.input_names for n in op.input(slot)
                  if not _is_constant(block, n, writers)]
        if len(inputs) != 1:
            return None, chain
        chain.append(inputs[0])
        op = writers.get(inputs[0])
    return op, chain


#: Ops whose output holds some of their input's values (quantizing on one grid commutes with
#: them; a concat's inputs, each read by the concat alone, share its output's grid).
_VALUE_PRESERVING_OPS = frozenset({
    "reshape2", "transpose2", "flatten_contiguous_range", "concat", "nearest_interp_v2",
    "index_select",  # a nearest resize, as graph.exact_nearest_resizes writes it
})


def _passes_values(op) -> bool:
    """Whether ``op`` hands on its input's values: a value-preserving op, a max pool, or an
    inference dropout that Paddle removes (:func:`.unsigned.removed_dropout`)."""
    if op.type in _VALUE_PRESERVING_OPS:
        return True
    if op.type == "pool2d":
        return op.attr("pooling_type") == "max"
    return removed_dropout(op)


def _align_pooled_scales(
    block: "paddle.static.Block", rectified: Mapping[tuple[str, float], str], outputs: dict[str, float],
    on_codes: set[str], coded_thresholds: Mapping[str, float], identity_inputs: set[str] = frozenset(),
) -> None:
    """Gives the tensors between a max-pool's (or a nearest upsample's, or a concat's) input
    and a clipped u8 input the clip's threshold.

    Paddle runs a max-pool between two calibrated tensors in int8, quantizing its input and
    output with their own scales; the simulation pools in float and quantizes once, with the
    reader's threshold ``t``. Quantizing commutes with a max-pool (and a reshape) on one grid,
    so with ``t`` on both sides the int8 pool computes what the simulation does (measured on
    conv -> ReLU -> max-pool -> conv with KL thresholds: 0.9% relative error before, 1e-7
    after). Likewise a ReLU output reaching the clip through a nearest upsample and a concat
    (a YOLO-style merge), which Paddle otherwise rounded and clipped on the ReLU's own
    threshold before the concat (0.9% off on one merge, 4e-7 after). ``on_codes``: the
    tensors the simulation holds on codes (a ReLU an int8 conv writes for a max-pool);
    ``coded_thresholds``: the thresholds of those ReLUs' codes; ``identity_inputs``: the
    identity shortcuts it holds on codes. A pool on the way whose output float ops read too,
    where the simulation does not hold it on codes, gives them an fp32 pool of its own
    (:func:`_pool_in_float_for_float_readers`; measured: an ``nn.MaxPool2D`` of an ``F.relu``
    after an fp32 conv, its output added in float beside the int8 conv reading it, 1.3% of the
    largest output off while the add read the int8 pool's codes).
    """
    writers, reading = producers(block), readers(block)
    for (start, threshold) in rectified:
        pending, walked = [start], set()
        while pending:
            name = pending.pop()
            walked.add(name)
            op = writers.get(name)
            if op is None or not _passes_values(op):
                # (Under an identity shortcut the simulation holds on codes, an ``F.relu`` output
                # no calibrated layer wrote gets the threshold too, so that Paddle quantizes it
                # u8: from the pool's scale alone it took it s8 and the shortcut, read up to code
                # 255, saturated at 127; measured after an fp32 stem conv, 0.8-14% of the largest
                # output off. Elsewhere s8 is right: its reader clips at the threshold.)
                if len(reading.get(name, [])) == 1 and (
                    name in outputs or (start in identity_inputs and op is not None and op.type == "relu")
                ):
                    outputs[name] = threshold
                continue
            if name in outputs:
                outputs[name] = threshold
            for source in op.input("X"):
                pooled = op.type == "pool2d" and source in writers
                if len(reading.get(source, [])) == 1:
                    if not (
                        pooled and name not in identity_inputs and source not in on_codes
                        and _float_pool_readers(op, reading, walked)
                    ):
                        pending.append(source)
                        continue
                    # Float ops read the pool's output too, where the simulation pools in
                    # float: the int8 pool reads a copy with the scale, as below (a scale on
                    # the source itself would make their fp32 pool int8 too).
                    outputs.pop(source, None)
                elif pooled:
                    if source in coded_thresholds:
                        # The simulation holds the source on those codes for every reader,
                        # the caller too where the network returns it: its conv writes them
                        # (measured: a returned ReLU written on its own grid, 3e-3 of its
                        # largest value off, where an int8 conv read its max-pool), and on the
                        # reader's grid the pool reads them as they are.
                        outputs[source] = coded_thresholds[source]
                        if np.float32(coded_thresholds[source]) == np.float32(threshold):
                            continue
                else:
                    continue
                # Other ops read the pool's input too (a U-Net's skip connection): the pool
                # gets a copy of its own, on the reader's grid. Paddle quantized the shared
                # input with its own scale, pooled the codes and quantized them again
                # (measured: 1.9% of the largest output off, 99% of the outputs; 3e-7 after).
                copy = insert_reader_op(block, writers[source], source, [op], "assign", f"pooled_{len(block.ops)}")
                outputs[copy] = threshold
                # A source on codes is pooled on them wherever it is read (the simulation's
                # codes); a float one is pooled in float only where read in float.
                _pool_in_float_for_float_readers(block, op, source, set() if source in on_codes else walked)


def _align_signed_resampled_scales(loaded: LegacyProgram, outputs: dict[str, float]) -> int:
    """Gives the signed tensors between an int8 layer's quantize op and the activation it
    reads through max-pools or nearest upsamples (each read by the next op alone) the quantize
    op's threshold, as :func:`_align_pooled_scales` does for u8 inputs.

    Paddle runs the pool int8 between two scaled tensors: with the activation's own output
    threshold below the reader's (a max-pool's maximum reaches further than its input's
    typical values), the conv wrote the activation's s8 codes clipped at that threshold before
    the pool (measured on ``x86-vnni``, a CRNN's conv -> Hardswish -> max-pool -> conv: 11% of
    the largest output off on 47% of the outputs). On one grid quantizing commutes with the
    pool, which the simulation runs in float before quantizing once.

    Returns:
        How many output thresholds were aligned.
    """
    block = loaded.program.global_block()
    writers, reading = producers(block), readers(block)
    aligned = 0
    for op in block.ops:
        if op.type != "quantize_linear":
            continue
        source, walked = _value_source(op.input("X")[0], writers, reading)
        if not walked or runs_unsigned(block, source, writers):
            continue  # not behind a pool or resize; or a u8 path: _align_pooled_scales
        if len(reading.get(source, [])) == 1:
            walked.append(source)  # the activation, read by the pool alone
        threshold = _quantize_threshold(loaded, op)
        for tensor in walked:
            if tensor in outputs and outputs[tensor] != threshold:
                outputs[tensor] = threshold
                aligned += 1
    return aligned


def _pool_in_float_for_float_readers(
    block: "paddle.static.Block", pool, source: str, walked: set[str]
) -> None:
    """Gives the readers of ``pool``'s output that read it in float (not through an int8
    reader's quantize op: DLA's tree root concatenating the pooled block input beside the
    projection conv reading it) an fp32 pool of ``source``: the int8 pool writes codes on its
    int8 reader's grid, where the simulation pools in float (measured on DLA-shaped trees:
    0.8% of the largest logit off).

    A reader on the way to the int8 reader (``walked``: the tensors from the clipped u8 input
    back to the pool, such as a concat of two max-pools in front of a conv; empty for a
    source the simulation holds on codes) reads the int8 pool's codes, which equal the
    simulation's there; treated as a float reader, its fp32 pool of a ReLU with a threshold
    of its own ran int8 on that threshold (measured on BiSeNetV2's stem: 0.7% of the largest
    output off on 60% of the outputs; 3e-7 after)."""
    reading = readers(block)
    out = pool.output("Out")[0]
    floats = _float_pool_readers(pool, reading, walked)
    if not floats:
        return
    attrs = {name: pool.attr(name) for name in pool.attr_names if name != "out_threshold"}
    var = block.var(out)
    twin = block.create_var(name=f"{out}.fp32", shape=var.shape, dtype=var.dtype).name
    insert_op(block, op_index(block, pool) + 1, type="pool2d", inputs={"X": [source]},
              outputs={"Out": [twin]}, attrs=attrs)
    for reader in floats:
        reader._rename_input(out, twin)


def _float_pool_readers(pool, reading: Mapping, walked: set[str]) -> list:
    """The readers of ``pool``'s output that read it in float: not through an int8 reader's
    quantize op, and not on the way to it (``walked``, see :func:`_pool_in_float_for_float_readers`)."""
    return [
        op for op in reading.get(pool.output("Out")[0], [])
        if not feeds_quantize(op, reading) and not walked.intersection(op.output_arg_names)
    ]


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


def _keep_average_pools_fp32(
    block: "paddle.static.Block", outputs: dict[str, float], records: Sequence[LayerRecord],
    coded: Mapping[str, float],
) -> int:
    """Runs average pools in fp32: drops the scales around each and puts an identity ``clip``
    between it and its readers. The global pools the simulation runs in int8 (a record with
    ``pooled_input_threshold``, see :mod:`imperative_ptq.quant_pool`) stay int8 instead.

    An average pool computes ``mean(x)`` and the int8 op after it quantizes that, as the
    simulation does; but Paddle Inference moves such a quantize op in front of a pool (its
    scale propagates through pool2d) and averages int8 codes, rounding once more (measured: a
    PP-OCRv4 recognizer's ``AvgPool2D([3, 2])`` in front of a conv, probability cosine 0.9989
    to the simulation for that conv alone, 0.952 for the whole model on ``x86-vnni``; with the
    clip 1.0). A padded pool that counts its padding (``exclusive=False``) was worse still
    (Inception's ``AvgPool2D(3, 1, 1, exclusive=False)``: logit cosine 0.886 at 75x75).
    ``coded``: the ReLUs the simulation holds on a fused residual conv's codes (and their
    thresholds), whose scale stays.

    Returns:
        How many pools are kept fp32.
    """
    int8_pools = int8_pool_outputs(records)
    # The largest code each such pool averages in the simulation (127 where it models the
    # s8 tensor Paddle writes after an s8 residual).
    pooled_tops = {
        output: record.pooled_input_top for record in records
        if record.pooled_input_threshold is not None for _, output in record.calls if output
    }
    reading, writers = readers(block), producers(block)
    kept = 0
    for op in list(block.ops):
        if op.type != "pool2d" or op.attr("pooling_type") != "avg":
            continue
        out = op.output("Out")[0]
        threshold = int8_pools.get(out)
        if threshold is not None and _global_pool(op):
            # Keeping it fp32 made ResNet-18 1.5x slower (18.0 vs 12.0 ms at batch 8, measured
            # in one run): the pool averages the u8 codes of the ReLU before it, with the
            # threshold the simulation used; its output keeps the same grid.
            source = op.input("X")[0]
            written = _u8_pool_input_threshold(block, source, writers, threshold)
            if written is None:
                # oneDNN has no s8 -> u8 pool (the predictor failed to build it). The s8
                # tensor clips at the threshold: codes 0..127, which the simulation models
                # where its residual is a fused downsample shortcut; elsewhere it keeps 0..255
                # (measured 3.8% relative error on the logits of a downsample block before the
                # pool). Without a scale the residual conv runs fp32 (2.0% on another such net).
                if pooled_tops.get(out, U8_MAX) > symmetric_levels(8):
                    logger.warning(
                        "pool %s reads a ReLU output that Paddle Inference writes as s8 (a "
                        "residual add of two conv outputs before it): it averages codes clipped "
                        "at the threshold, where the simulation keeps codes up to 255", out,
                    )
                source, written = _rectify_input(block, op, source), threshold
            outputs[source] = written
            outputs[out] = threshold
            continue
        source = op.input("X")[0]
        if source in coded:
            # The fused residual conv writes it as codes for its int8 readers (and the
            # simulation holds it on them, ResidualSumOutput): it keeps its scale, and the pool
            # reads it through an identity clip that carries none (measured: ResNet-vd's
            # pooled shortcut on a block output, 1.2% of the largest output off Paddle
            # Inference while the pool's input lost its scale and the fused conv wrote floats).
            _insert_identity_clip(block, writers[source], source, [op], "pooled")
        else:
            outputs.pop(source, None)
        outputs.pop(out, None)
        if reading.get(out):
            # Whatever reads it: a concat or reshape passes a reader's scale back as well.
            _insert_identity_clip(block, op, out, reading[out])
        kept += 1
    return kept


def _u8_pool_input_threshold(
    block: "paddle.static.Block", name: str, writers: Mapping, threshold: float
) -> float | None:
    """The output threshold to give ``name`` (a ReLU/ReLU6 output) so that Paddle Inference
    writes it as u8 codes ``round(x / threshold * 127)`` up to 255 (the final scale pass
    turns a ``relu`` output's ``threshold`` into ``threshold * 255 / 127`` itself); ``None``
    when Paddle writes it s8.

    A ReLU after a residual add is fused into one of the convs before the add, which then
    writes its output in the type of the other operand: s8 unless that is a ReLU output
    (measured: ``src:s8`` into the pool after a block with a downsample branch, where both
    operands are conv outputs). A ReLU6 is fused into the conv before it (through a BatchNorm
    or bias add), which writes u8.
    """
    op = writers.get(name)
    if op is not None and op.type == "relu6":
        source = writers.get(op.input("X")[0])
        while source is not None and source.type in ("batch_norm", "elementwise_add"):
            if source.type == "elementwise_add" and not is_persistable(block, source.input("Y")[0]):
                return None
            source = writers.get(source.input("X")[0])
        if source is None or source.type not in RELU6_U8_PRODUCERS:
            return None
        return unsigned_threshold(threshold, 8)
    if op is None or op.type != "relu":
        return None
    if not relu_after_residual_conv(block, name, writers):
        return threshold
    add = writers[op.input("X")[0]]
    operands = [add.input(slot)[0] for slot in ("X", "Y")]
    convs = [operand for operand in operands if gemm_output(writers, operand)]
    unsigned = all(runs_unsigned(block, operand, writers) for operand in operands if operand not in convs)
    return threshold if len(convs) == 1 and unsigned else None


def _rectify_input(block: "paddle.static.Block", pool, name: str) -> str:
    """Puts a ``relu`` (an identity on a ReLU output) between ``name`` and ``pool``, whose
    output Paddle Inference runs as u8; returns that output."""
    var = block.var(name)
    rectified = block.create_var(name=f"{name}.u8_pool", shape=var.shape, dtype=var.dtype)
    pool._rename_input(name, rectified.name)
    index = op_index(block, pool)
    insert_op(block, index, type="relu", inputs={"X": [name]}, outputs={"Out": [rectified.name]})
    return rectified.name


def int8_pool_outputs(records: Sequence[LayerRecord]) -> dict[str, float]:
    """Output variable -> input threshold of every pool call the simulation runs int8."""
    return {
        output: record.pooled_input_threshold
        for record in records if record.pooled_input_threshold is not None
        for _, output in record.calls if output is not None
    }


def _global_pool(op) -> bool:
    """A pool over the whole map (``global_pooling``, or adaptive to 1 x 1)."""
    return bool(op.attr("global_pooling")) or (
        bool(op.attr("adaptive")) and list(op.attr("ksize")) == [1, 1]
    )


#: Ops that lay values out anew (their data input's slot): Paddle runs them int8 once a tensor
#: after them has a scale, moving the quantize op in front of them.
_LAYOUT_OPS = {
    "transpose2": "X", "reshape2": "X", "flatten_contiguous_range": "X", "squeeze2": "X",
    "unsqueeze2": "X", "slice": "Input", "split": "X", "nearest_interp_v2": "X",
}


def _behind_layout_ops(name: str, writers: Mapping) -> tuple[str, list]:
    """The tensor ``name`` is laid out from through :data:`_LAYOUT_OPS` (itself if none), and
    those ops, nearest first."""
    walked = []
    while name in writers and writers[name].type in _LAYOUT_OPS:
        op = writers[name]
        walked.append(op)
        name = op.input(_LAYOUT_OPS[op.type])[0]
    return name, walked


#: Ops that resample a tensor's values, which Paddle runs int8 between two scaled tensors.
_RESAMPLING_OPS = frozenset({"pool2d", "nearest_interp_v2"})


def _resample_signed_tensors_in_float(loaded: LegacyProgram) -> int:
    """Gives each reader of a max-pool's or nearest upsample's signed output (s8 in Paddle: a
    Swish, LeakyReLU or BatchNorm output, not a ReLU's) its own identity ``clip`` of it, where
    the readers quantize it, directly or through concats and other resamplings, on different
    thresholds.

    Paddle's scale propagation crosses the resampling op and reaches its input, so the op ran
    int8 on the scale of one reader's path and every other reader got those codes: a max-pool
    of a Swish read by a concat (an int8 conv's input, threshold 4.8) and by a conv of its own
    (threshold 6.3) clipped the second reader's values at 4.8 (measured on ``x86-vnni``: 18%
    of that conv's largest output off, a PP-YOLOE-style SPP route). The simulation resamples in
    float and each reader quantizes with its threshold; with a clip per reader (a clip stops
    the propagation) the resampling runs in float and each clip's output carries its reader's
    scale. Readers that agree on one threshold, or do not quantize (YOLOv5's SPPF chain of
    pools on ``x86``, read by a shifted conv in float), are left as they are: a clip there
    stopped the float reader's unscaling from reaching the pools (measured: 5.9e-3 off). A u8
    source is left to :func:`_align_pooled_scales`.

    Returns:
        How many clips were inserted.
    """
    block = loaded.program.global_block()
    writers, reading = producers(block), readers(block)

    def thresholds(name: str, depth: int = 0) -> set[float]:
        """The thresholds of the quantize ops reading ``name`` through value-passing ops."""
        found: set[float] = set()
        for reader in reading.get(name, []):
            if reader.type == "quantize_linear":
                found.add(_quantize_threshold(loaded, reader))
            elif depth < 8 and (_passes_values(reader) or reader.type == "assign"):
                found |= thresholds(reader.output("Out")[0], depth + 1)
        return found

    inserted = 0
    for op in list(block.ops):
        if op.type not in _RESAMPLING_OPS or not _passes_values(op):
            continue
        out = op.output("Out")[0]
        consumers = reading.get(out, [])
        if len(consumers) < 2 or runs_unsigned(block, op.input("X")[0], writers) or len(thresholds(out)) < 2:
            continue
        for number, consumer in enumerate(consumers):
            _insert_identity_clip(block, op, out, [consumer], f"resampled_{number}")
            inserted += 1
    return inserted


def _isolate_quantized_shared_outputs(block: "paddle.static.Block") -> int:
    """Gives a quantize op its own copy (an ``assign``) of a signed tensor whose scale Paddle
    Inference would otherwise move onto a tensor that other readers share.

    Paddle moves a tensor's scale to whatever writes it: a transpose, reshape or slice then
    runs int8 on its quantized input, a conv/fc writes int8 codes. Two cases went wrong:

    * fp32 ops read the tensor too: they got the dequantized codes instead of the float values
      the simulation gives them (measured on ``x86-vnni``: attention pooling reading ``h =
      x.transpose(...)`` or ``h = tanh(fc(x))`` both through a Linear and in float, 0.46% of
      the largest output off on every output; 2e-7 after);
    * the tensor comes through layout ops from one that other readers share (Swin's ``q, k,
      v`` sliced from one ``qkv`` projection, or split from it by one ``split`` op): Paddle
      gave all of them one scale, where the simulation quantizes each with its own threshold
      (2.2% off on one window attention; split, 3-6% on a LeViT-style one).

    A u8 tensor (a ReLU output, also through layout ops) is left alone: Paddle runs a
    quantized tensor as u8 only when a ``relu`` writes it.

    Returns:
        How many copies were inserted.
    """
    writers, reading = producers(block), readers(block)
    inserted = 0
    for op in list(block.ops):
        if op.type != "quantize_linear":
            continue
        name = op.input("X")[0]
        if name not in writers:
            continue
        shared = any(reader.type != "quantize_linear" for reader in reading.get(name, []))
        source, walked = _behind_layout_ops(name, writers)
        branched = any(
            (op.type == "split" and len(op.output("Out")) > 1)
            or len(reading.get(op.input(_LAYOUT_OPS[op.type])[0], [])) > 1
            for op in walked
        )
        if not (shared or branched) or runs_unsigned(block, name, writers) or runs_unsigned(block, source, writers):
            continue
        var = block.var(name)
        copy = block.create_var(name=f"{name}.quantized_copy_{inserted}", shape=var.shape, dtype=var.dtype)
        index = op_index(block, op)
        insert_op(block, index, type="assign", inputs={"X": [name]}, outputs={"Out": [copy.name]})
        op._rename_input(name, copy.name)
        inserted += 1
    return inserted


def _isolate_sliced_pieces(loaded: LegacyProgram) -> list[str]:
    """Quantizes each piece of a split or sliced non-negative tensor on its own, where the
    pieces' readers quantize them with different thresholds (Res2Net's, CSP blocks' and
    GhostNet's channel splits of a ReLU output).

    Paddle moves a piece's scale onto the tensor it was cut from, has its producer write that
    tensor int8 on one scale, runs the split int8 and requantizes each piece: two roundings,
    where the simulation rounds each piece once with its reader's threshold (measured: 72% of
    a Res2Net-style block's outputs off, 1.0% of the largest). A ``relu`` in front of each
    such quantize op (the identity there; it keeps the piece u8; on ``x86`` the clip and relu
    of :func:`.unsigned.insert_clip_relu` are there already) stops the scale at the piece; the
    returned pieces are to be read in fp32, so that no output scale reaches them either.

    Returns:
        The pieces.
    """
    block = loaded.program.global_block()
    writers, reading = producers(block), readers(block)
    groups: dict[str, list] = {}
    for op in block.ops:
        if op.type != "quantize_linear":
            continue
        name = op.input("X")[0]
        piece = name  # x86: behind the clip and relu in front of the quantize op
        while piece in writers and writers[piece].type in ("relu", "clip", "elementwise_min"):
            piece = writers[piece].input("X")[0]
        source, walked = _behind_layout_ops(piece, writers)
        if any(op.type in ("slice", "split") for op in walked) and runs_unsigned(block, source, writers):
            groups.setdefault(source, []).append((op, piece))
    pieces: list[str] = []
    for quantized in groups.values():
        thresholds = {_quantize_threshold(loaded, op) for op, _ in quantized}
        if len(thresholds) < 2:
            continue
        for op, piece in quantized:
            if piece in pieces:
                continue
            pieces.append(piece)
            if op.input("X")[0] == piece:
                readers_of = [reader for reader in reading.get(piece, []) if reader.type == "quantize_linear"]
                insert_reader_op(block, writers[piece], piece, readers_of, "relu", "piece")
    return pieces


def _isolate_fp32_weight_op_outputs(loaded: LegacyProgram) -> int:
    """Puts an ``assign`` right after a transposed/3-D conv whose output reaches a quantize op.

    Paddle Inference fails on conv2d_transpose (+ bias, ReLU) -> quantize -> int8 conv2d for a
    batch > 1 ("could not construct a memory descriptor using strides", measured at batch 4;
    batch 1 runs): the quantize op reads the fp32 oneDNN conv-transpose output in a layout it
    cannot describe. An ``assign`` on the conv's output hands the ops after it a plain tensor
    (measured: runs, the conv2d int8, cosine 0.9985 to the same program with that conv fp32).
    It goes right after the conv, not in front of the quantize op: a quantize op must read a
    ``relu`` output directly for Paddle to run its tensor as u8 (an ``assign`` in between made
    a fc read s8, which saturates without VNNI).

    Returns:
        How many ``assign`` ops were inserted.
    """
    block = loaded.program.global_block()
    writers = producers(block)
    conv_outputs: list[str] = []
    for op in block.ops:
        if op.type != "quantize_linear":
            continue
        name, steps = op.input("X")[0], 0
        while name in writers and writers[name].type not in FP32_WEIGHT_OPS and steps < 8:
            writer = writers[name]
            inputs = [n for slot in writer.input_names for n in writer.input(slot)
                      if not _is_constant(block, n, writers)]
            if len(inputs) != 1 or writer.type in INT8_WEIGHT_OPS:
                break
            name, steps = inputs[0], steps + 1
        if name in writers and writers[name].type in FP32_WEIGHT_OPS and name not in conv_outputs:
            conv_outputs.append(name)
    for number, name in enumerate(conv_outputs):
        writer_index = op_index(block, writers[name])
        var = block.var(name)
        plain = block.create_var(name=f"{name}.plain{number}", shape=var.shape, dtype=var.dtype)
        for op in block.ops[writer_index + 1:]:
            if name in op.input_arg_names:
                op._rename_input(name, plain.name)
        insert_op(
            block, writer_index + 1, type="assign", inputs={"X": [name]}, outputs={"Out": [plain.name]}
        )
    return len(conv_outputs)


def computed_from_parameters(block: "paddle.static.Block", name: str, writers: Mapping) -> bool:
    """Whether ``name`` is a parameter or computed from parameters only, through any number
    of ops (what Paddle Inference's constant folding computes once, in fp32): a network input,
    or an op without inputs, is not."""
    pending, seen = [name], set()
    while pending:
        tensor = pending.pop()
        if tensor in seen or is_persistable(block, tensor):
            continue
        seen.add(tensor)
        writer = writers.get(tensor)
        inputs = [] if writer is None else [n for slot in writer.input_names for n in writer.input(slot)]
        if writer is None or writer.type == "feed" or not inputs:
            return False
        pending.extend(inputs)
    return True


def _is_constant(block: "paddle.static.Block", name: str, writers: Mapping) -> bool:
    """A parameter, or computed from parameters only (a conv bias reshaped for its add); not
    a network input (its ``feed`` op reads the persistable feed list)."""
    if is_persistable(block, name):
        return True
    writer = writers.get(name)
    return writer is not None and writer.type != "feed" and all(
        is_persistable(block, n) for slot in writer.input_names for n in writer.input(slot)
    )


#: Ops whose sub-block holds the ops of a loop or branch on a tensor.
_CONTROL_FLOW_OPS = frozenset({"while", "conditional_block"})


def _fp32_layers(
    weights: Mapping[str, LayerRecord], written: ProgramScales, block: "paddle.static.Block"
) -> dict[str, str]:
    """Calibrated layers whose weight the program reads but does not store as int8: name ->
    type (a layer whose output nothing uses is not in the program at all: ``jit.save`` prunes
    it)."""
    int8_layers = {weights[name].name for name in written.weights if name in weights}
    read = {name for op in block.ops for name in op.input_arg_names}
    return {
        record.name: record.layer_type for name, record in weights.items()
        if record.name not in int8_layers and name in read
    }


def _reads_int8_weight(op, slots: tuple[str, str, str], writers: Mapping) -> bool:
    weight = writers.get(op.input(slots[0])[0])
    return weight is not None and weight.type == "dequantize_linear"


def _int8_weight(
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
    from ..quant_layers import quantize_weight, stored_weight_thresholds

    block = loaded.program.global_block()
    weight = get_tensor(loaded, weight_name).astype(np.float32)
    axis = int(record.weight_axis)
    if weight.ndim == 2 and weight.shape[0] == weight.shape[1] and np.ptp(record.weight_thresholds) > 0:
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


def _copy_int8_weight(loaded: LegacyProgram, index: int, dequantized: str, serial: int) -> str:
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


def _quantize_activation_matmuls(
    loaded: LegacyProgram,
    records: Sequence[LayerRecord],
    written: ProgramScales,
    dequantized_inputs: dict[tuple[str, float], str],
    narrow_below_8_bits: bool = False,
) -> int:
    """Quantizes both inputs of each matmul of two activations a record describes (s8, as the
    simulation computes it; oneDNN runs a ``fused_matmul`` int8 when both inputs come from
    quantize/dequantize pairs of the same signedness).

    ``narrow_below_8_bits`` (oneDNN targets, whose pipeline reads 8-bit quantize ops only): an
    input grid narrower than 8 bits is written as 8-bit codes of that grid, clipped to it
    (:func:`_narrow_signed_input`); a 7-bit quantize op made Paddle Inference refuse the whole
    program ("Unsupported number quantization bits: 7").

    Returns:
        How many matmuls got quantized inputs.
    """
    block = loaded.program.global_block()
    writers = producers(block)  # of the traced operands, which the inserted ops leave alone
    narrowed_inputs: dict[tuple[str, float], tuple[str, float, int]] = {}
    count = 0
    for record in records:
        if not record.multiplies_inputs:
            continue
        thresholds = (record.input_threshold, record.second_input_threshold)
        for inputs, output in record.calls:
            index, op = next(
                ((i, op) for i, op in enumerate(block.ops)
                 if op.type == "matmul_v2" and output in op.output("Out")),
                (None, None),
            )
            if op is None or [op.input("X")[0], op.input("Y")[0]] != inputs[:2]:
                logger.warning(
                    "layer %r: no matmul_v2 reads %s in the traced program; it stays fp32",
                    record.name, inputs[:2],
                )
                continue
            constant = [op.input(slot)[0] for slot in ("X", "Y") if _is_constant(block, op.input(slot)[0], writers)]
            if constant:
                # convert keeps such a matmul fp32 once calibration saw the operand unchanged
                # over several calls (LayerState.constant_operand); one call cannot show it.
                logger.warning(
                    "layer %r multiplies by %s, computed from parameters only: Paddle Inference "
                    "folds it into a constant and runs this matmul as an fp32 mul, not the int8 "
                    "matmul the simulation computes. Calibrate with two or more different "
                    "batches, so that convert keeps it fp32 too.", record.name, constant[0],
                )
            index, call_thresholds = _scale_after_matmul(block, index, op, thresholds)
            for slot, threshold in zip(("X", "Y"), call_thresholds):
                name = op.input(slot)[0]
                source, threshold, bits = name, float(threshold), record.activation_bits
                if narrow_below_8_bits and bits < 8:
                    source, threshold, added = _narrowed_once(
                        narrowed_inputs, loaded, index, name, threshold, bits, writers
                    )
                    index, bits = index + added, 8
                key = (source, threshold)
                qdq = dequantized_inputs.get(key)
                if qdq is None:
                    qdq = _activation_qdq(loaded, index, source, threshold, bits, len(dequantized_inputs))
                    dequantized_inputs[key] = qdq
                    written.inputs[source] = threshold
                    index += 2
                op._rename_input(name, qdq)
            _separate_added_output(block, op)
            count += 1
    return count


def _separate_added_output(block: "paddle.static.Block", op) -> None:
    """Puts an ``assign`` between an int8 matmul of two activations (or the ``scale`` after
    it) and the ``elementwise_add`` reading its output (attention scores plus a mask).

    Paddle 3.3.1 fuses such an add into the matmul as its residual input, and then runs the
    matmul int8 only if the added tensor has a scale too: with a float mask it ran fp32 on the
    unquantized operands (measured, ``x86-vnni``: a causal-mask attention with rotary
    embeddings, 86 of 90 tokens off the simulation, 4.5% of the largest output). With the
    ``assign`` between them the matmul runs int8 and the add in float, as simulated.
    """
    reading = readers(block)
    writer, out = op, op.output("Out")[0]
    followers = reading.get(out, [])
    if len(followers) == 1 and followers[0].type == "scale":  # the moved q * d**-0.5
        writer = followers[0]
        out = writer.output("Out")[0]
        followers = reading.get(out, [])
    adds = [reader for reader in followers if reader.type == "elementwise_add"]
    if adds:
        insert_reader_op(block, writer, out, adds, "assign", "unfused")


def _scale_after_matmul(
    block: "paddle.static.Block", index: int, op, thresholds: tuple[float, float]
) -> tuple[int, tuple[float, float]]:
    """Moves a ``scale`` op feeding only the matmul's X (attention's ``q * d**-0.5``) after
    the matmul, X's threshold divided by the factor (``fq(a*q, t) = a*fq(q, t/|a|)``).

    Paddle Inference ran the matmul as an int8 ``fused_matmul`` that disagreed with the
    simulation with the scale between the quantize op and the matmul (measured: logit cosine
    0.993 on a 2-layer ``nn.TransformerEncoder``).

    Returns:
        The matmul's index and the thresholds of its inputs.
    """
    x = op.input("X")[0]
    writers, reading = producers(block), readers(block)
    scale = writers.get(x)
    if (
        scale is None or scale.type != "scale" or scale.attr("bias") != 0.0
        or scale.attr("scale") == 0.0 or scale.input("ScaleTensor") or len(reading.get(x, [])) != 1
    ):
        return index, thresholds
    factor = float(scale.attr("scale"))
    source, out = scale.input("X")[0], op.output("Out")[0]
    var = block.var(out)
    unscaled = block.create_var(name=f"{out}.unscaled", shape=var.shape, dtype=var.dtype)
    op._rename_input(x, source)
    op._rename_output(out, unscaled.name)
    scale_index = op_index(block, scale)
    remove_op(block, scale_index)
    index -= 1
    insert_op(
        block, index + 1, type="scale", inputs={"X": [unscaled.name]}, outputs={"Out": [out]},
        attrs={"scale": factor, "bias": 0.0, "bias_after_scale": True},
    )
    return index, (thresholds[0] / abs(factor), thresholds[1])


def _narrowed_once(
    narrowed: dict[tuple[str, float], tuple[str, float, int]], loaded: LegacyProgram, index: int,
    name: str, threshold: float, bits: int, writers: Mapping,
) -> tuple[str, float, int]:
    """:func:`_narrow_signed_input` of ``(name, threshold)``, inserted once per ``narrowed``
    cache: the clipped variable, its 8-bit threshold and how many ops were inserted now."""
    found = narrowed.get((name, threshold))
    if found is not None:
        return found[0], found[1], 0
    found = narrowed[(name, threshold)] = _narrow_signed_input(loaded, index, name, threshold, bits, writers)
    return found


def _narrow_signed_input(
    loaded: LegacyProgram, index: int, name: str, threshold: float, bits: int, writers: Mapping
) -> tuple[str, float, int]:
    """A signed input on a grid narrower than 8 bits, for oneDNN's 8-bit quantize op: clipped
    at ``+-threshold`` (so its codes stay within ``-L..L``) and given the 8-bit threshold
    ``t * 127 / L``. Returns the clipped variable, that threshold and how many ops were
    inserted at ``index``. Right after a conv/fc the clip is an ``elementwise_min`` and an
    ``elementwise_max``: Paddle 3.3.1 fuses a ``clip`` op there as a plain ReLU
    (:func:`.unsigned.insert_clip_relu`)."""
    block = loaded.program.global_block()
    var = block.var(name)
    stem = f"{name}.clipped_{len(block.ops)}"
    out = block.create_var(name=stem, shape=var.shape, dtype=var.dtype)
    written = float(threshold) * symmetric_levels(8) / symmetric_levels(bits)
    if not gemm_output(writers, name, through_activations=True):
        insert_op(
            block, index, type="clip", inputs={"X": [name]}, outputs={"Out": [out.name]},
            attrs={"min": -float(threshold), "max": float(threshold)},
        )
        return out.name, written, 1
    bounds = [
        new_persistable(loaded, f"{stem}.{side}", np.array([value], dtype=np.float32))
        for side, value in (("max", threshold), ("min", -threshold))
    ]
    below = block.create_var(name=stem + ".below", shape=var.shape, dtype=var.dtype)
    insert_op(
        block, index, type="elementwise_min", inputs={"X": [name], "Y": [bounds[0]]},
        outputs={"Out": [below.name]}, attrs={"axis": -1},
    )
    insert_op(
        block, index + 1, type="elementwise_max", inputs={"X": [below.name], "Y": [bounds[1]]},
        outputs={"Out": [out.name]}, attrs={"axis": -1},
    )
    return out.name, written, 2


def _activation_qdq(
    loaded: LegacyProgram, index: int, name: str, threshold: float, bits: int, serial: int
) -> str:
    """Inserts quantize_linear + dequantize_linear of ``name`` at ``index``."""
    block = loaded.program.global_block()
    var = block.var(name)
    stem = f"{name}.q{serial}"
    scale = new_persistable(loaded, stem + ".scale", np.array([threshold], dtype=np.float32))
    zero = new_persistable(loaded, stem + ".zero_point", np.zeros([1], dtype=np.int32))
    quantized = block.create_var(name=stem + ".quantized", shape=var.shape, dtype=var.dtype)
    dequantized = block.create_var(name=stem + ".dequantized", shape=var.shape, dtype=var.dtype)
    attrs = {"quant_axis": -1, "bit_length": bits}
    insert_op(
        block, index,
        type="quantize_linear",
        inputs={"X": [name], "Scale": [scale], "ZeroPoint": [zero]},
        outputs={"Y": [quantized.name]},
        attrs=attrs,
    )
    insert_op(
        block, index + 1,
        type="dequantize_linear",
        inputs={"X": [quantized.name], "Scale": [scale], "ZeroPoint": [zero]},
        outputs={"Y": [dequantized.name]},
        attrs=attrs,
    )
    return dequantized.name
