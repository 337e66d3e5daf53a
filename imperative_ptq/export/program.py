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

:func:`quantize_program` writes that form in this order: biases, BatchNorms, Conv1D weights and
LSTMs in the forms oneDNN fuses (:mod:`.weight_ops`, :mod:`.folded_norms`, :mod:`.rnn_fusion`);
each conv/fc's int8 weight and input Q/DQ pair (:class:`_WeightOpRewrite`; on x86 after
the u8 clip, :mod:`.unsigned`, or the shift, :mod:`.shifted`, its input's grid needs); the
matmuls of two activations (:mod:`.activation_matmuls`); copies for tensors read on several
grids (:mod:`.shared_outputs`); the scales around pools (:mod:`.pool_scales`); no scale where
the simulation reads in float (:mod:`.float_readers`); the output scales; and the residual adds
oneDNN fuses into int8 convs (:mod:`.residual_adds`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import numpy as np
import paddle

from ..quant_pool import U8_MAX
from ..quant_residual import S8_MAX, S8_MIN
from ..quantizers.qparams import symmetric_levels
from ..shifted_input import shifted_levels
from .activation_matmuls import quantize_activation_matmuls
from .coded_identity import (
    CodedIdentity, round_float_readers, round_relus_written_in_float, round_unfused_projections, round_unfused_sums,
)
from .float_readers import (
    float_outputs_for_float_readers,
    isolate_fp32_weight_op_outputs,
    max_pools_read_by_activations,
    returned_only_outputs,
    unscale_fp32_layer_inputs,
)
from .folded_norms import fold_norms_into_halved_convs
from .graph import Operator, new_persistable, producers, transposed_matmul
from .integer_weights import read_integer_weights_through_copies
from .legacy_program import (
    INT8_WEIGHT_OPS,
    LegacyProgram,
    ProgramScales,
    computed_from_parameters,
    int8_weight_op_output,
    is_constant,
)
from .linear_as_conv import matmuls_as_convs
from .pool_scales import (
    align_pooled_scales,
    align_signed_resampled_scales,
    int8_pool_outputs,
    keep_average_pools_fp32,
    pool_signed_sums_through_copies,
    resample_signed_tensors_in_float,
)
from .qdq import activation_qdq, drop_identity_clips_before_u8_clips, narrowed_once
from .residual_adds import (
    isolate_unscaled_residual_adds,
    scaled_input_copies,
    separate_self_residual_inputs,
)
from .rnn_fusion import LSTMFusion, fuse_lstm_ops
from .shared_outputs import isolate_quantized_shared_outputs, isolate_sliced_pieces
from .shifted import SHIFT_OPS, absorb_shift, insert_shift, shifted_u8_threshold
from .strided_pointwise import widen_strided_pointwise_convs
from .tracing import LayerRecord, model_activation_bits
from .unsigned import (
    FusedReluClips,
    clip_concat_inputs,
    clip_fused_relus,
    insert_clip_relu,
    relu_after_residual_conv,
    runs_unsigned,
    shared_output_clips,
    unsigned_threshold,
)
from .weight_ops import (
    copy_int8_weight,
    fc_fusable_biases,
    fold_conv_bias,
    int8_weight,
    materialize_conv1d_weights,
)

__all__ = ["SKIP_OUTPUT_SCALE_LAYERS", "collect_scales", "quantize_program"]

logger = logging.getLogger(__name__)

#: Layer types whose output thresholds are NOT written to the program. oneDNN folds BatchNorm
#: into the preceding conv, so a scale on the BN output becomes the conv's int8 output scale
#: on a signed pre-activation tensor; measured: logit cosine 0.998 -> 0.979 on
#: ResNet-18 from exactly that.
SKIP_OUTPUT_SCALE_LAYERS = frozenset({"BatchNorm", "BatchNorm1D", "BatchNorm2D", "BatchNorm3D"})


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
        loaded: The fp32 program from :func:`.legacy_program.load_legacy_program`.
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
    # (Read before the clips and copies below add activations of the export's own.)
    pools_before_activations = max_pools_read_by_activations(block, outputs)
    matmuls_as_convs(loaded, weights)
    materialize_conv1d_weights(loaded, weights)
    fc_fusable_biases(loaded, weights)
    lstms = fuse_lstm_ops(loaded, weights)
    written = _quantize_fused_lstms(loaded, weights, lstms)
    clips = clip_fused_relus(loaded, weights, outputs) if unsigned_inputs else FusedReluClips()
    if unsigned_inputs:
        clip_concat_inputs(loaded, weights, outputs, clips)
    # ReLU outputs the simulation puts on a fused int8 conv's codes -> the largest code; those
    # up to 127 (after an s8 residual) need no clip in front of their readers.
    sum_code_tops = {out: top for record in records for out, top in record.sum_codes_tops().items()}
    inserted = _WeightOpRewrite(loaded, weights, written, clips, sum_code_tops, unsigned_inputs).run()

    quantize_activation_matmuls(loaded, records, written, inserted.dequantized, narrow_below_8_bits=unsigned_inputs)
    resample_signed_tensors_in_float(loaded)
    isolate_quantized_shared_outputs(loaded)
    pieces = isolate_sliced_pieces(loaded)
    on_codes = {
        out for record in records if record.residual_output for _, out in record.calls if out
    } | set(sum_code_tops)
    coded_thresholds = {
        out: threshold for record in records for out, threshold in record.sum_codes_thresholds().items()
    }
    # The identity shortcuts the simulation reads on codes (its int8 readers put them there).
    identities = {
        inputs[0]: CodedIdentity(record.input_threshold, record.residual_codes, record.activation_bits)
        for record in records if record.residual_codes for inputs, _ in record.calls if inputs
    }
    align_pooled_scales(block, inserted.rectified, outputs, on_codes, coded_thresholds, set(identities))
    align_signed_resampled_scales(loaded, outputs)
    keep_average_pools_fp32(block, outputs, records, coded_thresholds)
    pool_signed_sums_through_copies(block, sum_code_tops, outputs)
    isolate_fp32_weight_op_outputs(loaded)
    # A shift reads its input in fp32 too: a scale there would make the producer emit s8 on
    # a grid the simulation never uses (measured: 1.2% off after a fc + Hardswish, 1.9% with
    # a Dropout in between). So does an LSTM left fp32 (an ``rnn`` op; measured: a fc + ReLU
    # before it wrote int8 codes it read, 1.1% off).
    fp32_rnn_inputs = [op.input("Input")[0] for op in block.ops if op.type == "rnn"]
    kept = unscale_fp32_layer_inputs(
        block, outputs, isolate_concats=True,
        fp32_inputs=[name for name, _, _ in inserted.shifted] + pieces + fp32_rnn_inputs,
        coded=on_codes | set(identities),
    )
    written.fp32_layers = _fp32_layers(weights, written, block)
    written.weight_layers = {name: record.name for name, record in weights.items()}
    _warn_of_fp32_layers(block, weights, written, lstms)
    for record in records:
        if record.residual_codes:
            # The simulation stores this input as u8 codes of the layer's input threshold
            # (read by a fused residual conv too): that is its scale, whatever its producer's
            # own output threshold.
            for inputs, _ in record.calls:
                if inputs:
                    outputs[inputs[0]] = record.input_threshold
    # A network input the simulation reads on those codes has no op to carry its scale: the
    # adds fused into an int8 conv read a relu copy that does (:func:`.residual_adds.scaled_input_copies`).
    # So does an identity on u8 codes up to 255 that Paddle would run s8, its writer no ReLU
    # (a stacked hourglass level's sum of two ReLU outputs; measured, clipped at 127 by Paddle:
    # 0.11 .. 0.24 of the largest output off the simulation).
    writers = producers(block)
    signed_identities = {
        name for name, codes in identities.items()
        if codes.top > S8_MAX and name in outputs and name in writers and not runs_unsigned(block, name, writers)
    }
    input_copies = scaled_input_copies(block, outputs, set(loaded.feed_names) | signed_identities)
    writers = producers(block)
    activation_bits = model_activation_bits(records)
    returned = returned_only_outputs(block, outputs, writers, int8_pool_outputs(records), float_adds=True)
    returned |= pools_before_activations - on_codes
    if returned:
        logger.info(
            "%d tensors that no int8 op reads (the network returns them, or only fp32 pools and "
            "float ops such as the clips in front of u8 inputs read them) keep no scale, so Paddle "
            "Inference writes them in float as the simulation does: %s", len(returned),
            ", ".join(sorted(returned)),
        )
    _write_output_scales(block, outputs, returned, written, writers, unsigned_inputs, activation_bits)
    simulated_residuals = {out for record in records if record.residual_output for _, out in record.calls if out}
    # Tensors the simulation reads as a fused conv's residual codes: those outputs, and the
    # identity shortcuts (network inputs through the copies the adds read).
    identities.update({copy: identities[name] for name, copy in input_copies.items() if name in identities})
    coded_residuals = simulated_residuals | set(identities)
    isolated = isolate_unscaled_residual_adds(block, written, simulated_residuals, coded_residuals)
    separate_self_residual_inputs(block)
    if isolated:
        _drop_float_only_scales(block, written, records, coded_residuals | on_codes)
    unscaled = float_outputs_for_float_readers(block, written, coded_residuals | set(sum_code_tops))
    if unscaled:
        logger.info("%d int8 conv/fc outputs that fp32 ops read too are written in float: %s",
                    len(unscaled), ", ".join(unscaled))
    _put_float_tensors_on_codes(block, records, identities, sum_code_tops, coded_thresholds, activation_bits)
    widen_strided_pointwise_convs(loaded)
    loaded.program._sync_with_cpp()
    shared_output_clips(loaded)
    drop_identity_clips_before_u8_clips(block)
    if isolated:
        logger.info("%d int8 conv/fc outputs kept out of a residual add without a scale", isolated)
    read_integer_weights_through_copies(loaded)
    logger.info(
        "int8 program: %d int8 weights, %d activation QDQ pairs, %d output scales, %d conv/fc "
        "ops kept fp32",
        len(written.weights), len(inserted.dequantized), len(written.outputs), kept,
    )
    return written


def _drop_float_only_scales(
    block: "paddle.static.Block", written: ProgramScales, records: list[LayerRecord], coded: set[str]
) -> None:
    """Takes the output scale off the tensors only float ops read once adds were kept out of
    their convs, but not off those the simulation holds on codes (``coded``: a fused conv's
    residual, a coded sum)."""
    # An add kept out of its conv computes in float: a scale on its other operand now only
    # makes that operand's writer run int8 (measured: Xception's entry-flow max-pool of an
    # fp32 separable conv's BatchNorm output, added to the strided shortcut conv: the pool
    # ran s8, 0.9% of the next conv's largest output off, 2.3% of Xception41's logits).
    writers = producers(block)
    float_only = returned_only_outputs(
        block, written.outputs, writers, int8_pool_outputs(records), float_adds=True
    ) - coded
    for name in float_only:  # (each written as its writer's out_threshold: _write_output_scales)
        writers[name]._remove_attr("out_threshold")
        written.outputs.pop(name)


def _warn_of_fp32_layers(
    block: "paddle.static.Block", weights: dict[str, LayerRecord], written: ProgramScales, lstms: LSTMFusion
) -> None:
    """Warns of the layers simulated int8 that the program runs fp32: called inside a loop or
    branch on a tensor, or an op with no int8 kernel (conv3d, conv2d_transpose, ...)."""
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


def _write_output_scales(
    block: "paddle.static.Block",
    outputs: Mapping[str, float],
    returned: set[str],
    written: ProgramScales,
    writers: Mapping[str, Any],
    unsigned_inputs: bool,
    activation_bits: int,
) -> None:
    """Writes each scaled tensor's threshold as its writer's ``out_threshold`` (not the tensors
    only float ops read, ``returned``), in the 8-bit form Paddle reads, into ``written.outputs``."""
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


def _put_float_tensors_on_codes(
    block: "paddle.static.Block",
    records: list[LayerRecord],
    identities: Mapping[str, CodedIdentity],
    sum_code_tops: Mapping[str, int],
    coded_thresholds: Mapping[str, float],
    activation_bits: int,
) -> None:
    """Rounds onto the codes the simulation reads them on the tensors Paddle computes in float:
    identity shortcuts read by float ops, residual sums whose add Paddle does not fuse, their
    projections, and ReLUs an int8 conv would write as codes."""
    writers = producers(block)
    # Float layers the simulation reads the codes with, wherever they run (ResidualCodesInput).
    coded_layer_outputs = frozenset(
        out for record in records if record.residual_codes and record.weight_name is None
        for _, out in record.calls if out
    )
    # (The ops these passes insert leave the conv/fc outputs and their writers as they were.)

    def int8_output(name: str) -> bool:
        return int8_weight_op_output(block, name, writers)

    rounded = round_float_readers(block, identities, int8_output, coded_layer_outputs)
    if rounded:
        logger.info("%d float ops read an identity shortcut on its codes, as simulated", rounded)
    # The sums the simulation puts on a fused conv's codes whose add Paddle does not fuse.
    sums = {
        out: CodedIdentity(coded_thresholds[out], top, activation_bits)
        for out, top in sum_code_tops.items() if out in coded_thresholds
    }
    rounded = round_unfused_sums(block, sums, set(identities), int8_output)
    # The projections the simulation writes as s8 residual codes (clipped at -128 and 127).
    projections = {
        out: CodedIdentity(record.output_thresholds[0], S8_MAX, activation_bits, lowest=S8_MIN)
        for record in records if record.residual_output and record.output_thresholds for _, out in record.calls if out
    }
    rounded += round_unfused_projections(block, projections, sums, int8_output)
    rounded += round_relus_written_in_float(block, sums, int8_output)
    if rounded:
        logger.info("%d tensors Paddle computes in float (residual sums, their projections, ReLUs "
                    "an int8 conv would write as codes) are put on the codes the simulation reads "
                    "them on", rounded)


def _quantize_fused_lstms(
    loaded: LegacyProgram, weights: dict[str, LayerRecord], lstms: LSTMFusion
) -> ProgramScales:
    """Gives each ``fusion_lstm`` of :func:`.rnn_fusion.fuse_lstm_ops` a Q/DQ pair on its input
    (its weights stay fp32: Paddle derives their scales from the thresholds recorded here) and
    warns of the LSTM layers exported fp32.

    Returns:
        The scales written so far (``weights`` also maps each fused ``WeightX`` to its layer).
    """
    block = loaded.program.global_block()
    written = ProgramScales(fp32_calls=dict(lstms.simulated_fp32))
    for fused in lstms.fused:
        # fusion_lstm: fp32 weights (Paddle derives their scales), a Q/DQ pair on its input.
        op = next(op for op in block.ops if op.type == "fusion_lstm" and op.input("WeightX") == [fused.weight_x])
        activation = op.input("X")[0]
        threshold = fused.record.input_threshold
        qdq = activation_qdq(
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
    return written


@dataclasses.dataclass
class _InsertedInputs:
    """The tensors :class:`_WeightOpRewrite` put in front of the int8 conv/fc ops, which
    later passes look up.

    Attributes:
        dequantized: (tensor quantized, threshold) -> the output of its Q/DQ pair.
        rectified: (input, threshold) -> its u8 clip (:func:`.unsigned.insert_clip_relu`).
        shifted: (input, scale, zero point) -> its shifted u8 form (:mod:`.shifted`).
    """

    dequantized: dict[tuple[str, float], str] = dataclasses.field(default_factory=dict)
    rectified: dict[tuple[str, float], str] = dataclasses.field(default_factory=dict)
    shifted: dict[tuple[str, float, int], str] = dataclasses.field(default_factory=dict)


class _WeightOpRewrite:
    """Gives every calibrated conv/fc op its int8 weight and its input's Q/DQ pair (on x86,
    after the u8 clip, the shift or the narrowing its input's grid needs), recording both in
    ``written``; a call on a constant reads an fp32 copy of the weight instead. Ops reading the
    same weight, or the same input on the same grid, share what was inserted for the first.

    Args:
        loaded: The program being rewritten.
        weights: Weight variable -> the calibrated layer reading it (:func:`collect_scales`).
        written: The scales written so far.
        clips: The fused ReLUs clipped for u8 inputs (:func:`.unsigned.clip_fused_relus`).
        sum_code_tops: ReLU outputs on a fused int8 conv's codes -> their largest code.
        unsigned_inputs: See :func:`quantize_program`.
    """

    def __init__(
        self,
        loaded: LegacyProgram,
        weights: Mapping[str, LayerRecord],
        written: ProgramScales,
        clips: FusedReluClips,
        sum_code_tops: Mapping[str, int],
        unsigned_inputs: bool,
    ) -> None:
        self.loaded = loaded
        self.block = loaded.program.global_block()
        self.weights = weights
        self.written = written
        self.clips = clips
        self.sum_code_tops = sum_code_tops
        self.unsigned_inputs = unsigned_inputs
        self.inserted = _InsertedInputs()
        self.writers = producers(self.block)
        self.dequantized_weights: dict[str, str] = {}
        # (layer, bias / mean) -> the variable holding it adjusted
        self.shifted_biases: dict[tuple[str, str], str] = {}
        self.narrow_inputs: dict[tuple[str, float], tuple[str, float, int]] = {}
        self.constant_call_weights: dict[str, str] = {}  # weight -> its fp32 copy for calls on constants

    def run(self) -> _InsertedInputs:
        """Rewrites the program; returns the inserted tensors later passes look up."""
        index = 0
        while index < len(self.block.ops):
            index += self.op_at(index) + 1
        return self.inserted

    def op_at(self, index: int) -> int:
        """Rewrites the op at ``index`` if it is a calibrated conv/fc; returns how many ops were
        inserted in front of it."""
        op = self.block.ops[index]
        slots = INT8_WEIGHT_OPS.get(op.type)
        if slots is None or transposed_matmul(op):
            return 0
        weight_slot, input_slot, _ = slots
        weight_name = op.input(weight_slot)[0]
        record = self.weights.get(weight_name)
        if record is None:
            return 0
        activation = op.input(input_slot)[0]
        if record.constant_call_weight is not None and computed_from_parameters(self.block, activation, self.writers):
            # A call on a constant, which convert runs in fp32 (QuantizedLayer.constant_inputs):
            # the op reads that weight in float (one copy for every such call: Paddle Inference
            # folds them, and folding does not rescale it), and Paddle Inference folds the call.
            if weight_name not in self.constant_call_weights:
                self.constant_call_weights[weight_name] = new_persistable(
                    self.loaded, f"{weight_name}.constant_call",
                    np.asarray(record.constant_call_weight, np.float32),
                )
            op._rename_input(weight_name, self.constant_call_weights[weight_name])
            return 0
        self._int8_weight(index, op, weight_name, record)
        added = 1
        # Activation: [relu ->] quantize_linear -> dequantize_linear -> op.
        if is_constant(self.block, activation, self.writers):
            # convert keeps such a layer fp32 once calibration saw its input unchanged while
            # the model's inputs changed (LayerState.constant_input); one batch cannot show it.
            logger.warning(
                "layer %r reads %s, computed from parameters only: Paddle Inference folds it "
                "into a constant computed in fp32, not the int8 layer the simulation computes. "
                "Calibrate with two or more different batches, so that convert keeps it fp32 "
                "too.", record.name, activation,
            )
        quantized, threshold, inserted = self._input_grid(index + added, op, slots, weight_name, record, activation)
        added += inserted
        # oneDNN's pipeline reads 8-bit quantize ops only: every threshold above puts a
        # narrower grid on 8-bit codes.
        bits = 8 if self.unsigned_inputs else record.activation_bits
        key = (quantized, threshold)
        dequantized_inputs = self.inserted.dequantized
        qdq = dequantized_inputs.get(key)
        if qdq is None:
            qdq = activation_qdq(
                self.loaded, index + added, quantized, threshold, bits, len(dequantized_inputs),
            )
            dequantized_inputs[key] = qdq
            self.written.inputs[quantized] = threshold
            added += 2
        op._rename_input(activation, qdq)
        return added

    def _int8_weight(self, index: int, op: Operator, weight_name: str, record: LayerRecord) -> None:
        """Weight: int8 tensor -> dequantize_linear (inserted at ``index``) -> op."""
        dequantized = self.dequantized_weights.get(weight_name)
        if dequantized is None:
            dequantized = int8_weight(
                self.loaded, index, weight_name, record, self.written,
                self.clips.weight_factors.get(weight_name, 1.0),
            )
            self.dequantized_weights[weight_name] = dequantized
        else:
            # A weight read by several ops (a layer called twice) gets a private int8 copy per
            # reader: oneDNN's int8 passes rescale each op's weight tensor in place, so a shared
            # tensor is rescaled twice (measured: all-zero outputs for a Linear called twice).
            dequantized = copy_int8_weight(self.loaded, index, dequantized, serial=index)
        op._rename_input(weight_name, dequantized)

    def _input_grid(
        self, index: int, op: Operator, slots: tuple[str, str, str], weight_name: str, record: LayerRecord,
        activation: str,
    ) -> tuple[str, float, int]:
        """The tensor the op's input Q/DQ pair quantizes and its threshold, after the u8 clip,
        the shift or the narrowing (inserted at ``index``) its grid needs on x86; and how many
        ops were inserted."""
        quantized, threshold, added = activation, record.input_threshold, 0
        clips, writers = self.clips, self.writers
        if self.unsigned_inputs and record.input_unsigned:
            threshold = clips.thresholds.get(activation, threshold)
            if activation not in clips.thresholds and not (
                relu_after_residual_conv(self.block, activation, writers)
                and (
                    record.top_code(activation) > symmetric_levels(record.activation_bits)
                    or (record.residual_codes and self.sum_code_tops.get(activation, U8_MAX) <= symmetric_levels(8))
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
                rectified = self.inserted.rectified
                quantized = rectified.get((activation, threshold))
                if quantized is None:
                    quantized = insert_clip_relu(self.loaded, index, activation, threshold, writers)
                    rectified[(activation, threshold)] = quantized
                    added += 2
            threshold = unsigned_threshold(threshold, record.activation_bits)
        elif self.unsigned_inputs and record.input_shift_response is not None:
            # A signed input on u8 codes 0..127: shifted in front, the bias takes it back.
            threshold = shifted_u8_threshold(record)
            grid = (activation, record.input_scale, record.input_zero_point)
            quantized = self.inserted.shifted.get(grid)
            if quantized is None:
                quantized = insert_shift(
                    self.loaded, index, activation, record, shifted_levels(record.activation_bits),
                )
                self.inserted.shifted[grid] = quantized
                added += SHIFT_OPS
            absorb_shift(
                self.loaded, op, slots[2], record, clips.weight_factors.get(weight_name, 1.0),
                self.shifted_biases,
            )
        elif self.unsigned_inputs and record.activation_bits < 8:
            # A signed input on a narrower grid, clipped to its codes.
            quantized, threshold, added = narrowed_once(
                self.narrow_inputs, self.loaded, index, activation, threshold,
                record.activation_bits, writers,
            )
        return quantized, threshold, added


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
