"""Convert: calibrated thresholds frozen into the model as the int8 simulation of its target.

Each simulated layer (Conv2D, Linear, ...) with input and weight thresholds becomes a
:class:`~imperative_ptq.quant_layers.QuantizedLayer` computing what the target's int8 kernels
compute; every other calibrated layer keeps its output thresholds for the export. A layer whose
input the target cannot run exactly in int8 stays fp32, with a warning.
"""

from __future__ import annotations

import logging

import paddle

from .calibration_table import (
    CalibrationTable,
    HookedLayers,
    first_names,
    input_minima,
    input_minimum,
    table_of_every_layer,
)
from .calibration_structure import structure_of
from .converted import mark_converted, set_output_thresholds
from .forward_calls import PerCallTopCodes, count_forwards
from .functional_ops import FunctionalConcat
from .halved_convs import halved_convs, halving_refusal
from .quant_layers import (
    MAX_FC_INPUT_RANK, QuantizedLayer, QuantizedMatmul, keeps_forward, replace_sublayer, untie_shared_weights,
)
from .quant_pool import U8_MAX, QuantizedGlobalAveragePool, int8_head_pools
from .quantizers.qparams import symmetric_levels
from .quant_residual import QuantizedResidualOutput, ResidualCodesInput, ResidualSumOutput, relu_or_its_max_pool
from .quant_rnn import QuantizedLSTM, lstm_int8_refusal
from .registry import BATCH_NORM_TYPES, PTQRegistry
from .session import LayerState
from .shifted_input import shiftable, shifted_grid
from .targets import Target

__all__ = ["convert_layers"]

logger = logging.getLogger(__name__)

def convert_layers(
    model: paddle.nn.Layer,
    hooked: HookedLayers,
    table: CalibrationTable,
    target: Target,
    activation_bits: int,
    weight_bits: int,
) -> list[str]:
    """Swaps the calibrated layers of ``model`` for their int8 simulation, in place.

    The hooks must already be detached; the per-layer calibration state stays on the layers
    (the caller removes it with the session).

    Args:
        model: The model being calibrated.
        hooked: Its hooked layers and their states.
        table: Thresholds (:func:`~imperative_ptq.calibration_table.build_table`).
        target: The deployment target whose arithmetic the simulation follows.
        activation_bits: Bit width of activations.
        weight_bits: Bit width of weights.

    Returns:
        The names of the simulated layers left fp32: the target cannot run their input in
        int8, or no runtime has an int8 kernel for them (``LayerInfo.int8_runtime``).
    """
    # The runtime's own code ranges (fused residuals and head pools on u8 codes up to 255):
    # 8-bit activations only, the only ones a runtime runs (wider ones are refused at export).
    runtime_codes = target.onednn and activation_bits <= 8
    kept_fp32: list[str] = []
    fp32_matmuls: list[str] = []  # matmuls of two activations kept fp32 by the target
    no_int8_kernel: list[tuple[str, str]] = []  # (name, layer type)
    rnn_fp32: list[str] = []  # "name (reason)"
    constant_operands: list[str] = []
    constant_inputs: list[str] = []
    computed_weights: list[str] = []
    constant_calls: list[str] = []
    int8_layers: list[str] = []
    affine_layers: list[str] = []
    quantized: dict[str, QuantizedLayer] = {}
    heads = _output_layers(hooked)
    untied = untie_shared_weights(
        model, [layer for layer, state in hooked if state.weight_quantizer is not None and state.name in table]
    )
    if untied:
        logger.info("%d calibrated layers share their weight with other layers: each is quantized "
                    "on a copy of its own", len(untied))
    halvable = halved_convs(model, hooked) if target.halved_signed_convs else {}
    for layer, state in hooked:
        entry = table.get(state.name)
        if entry is None:
            continue
        info = PTQRegistry.layer_info(layer)
        if info.observed_only:
            # A functional concat or multiply: fp32 in Paddle Inference and ONNX Runtime
            # (functional_ops.py), so no output threshold for the export either.
            continue
        if state.weight_quantizer is not None and not info.int8_runtime:
            # Plain fp32 like the runtime runs it; no output scale either (see below).
            no_int8_kernel.append((state.name, type(layer).__name__))
            continue
        if state.computed_weight and state.weight_quantizer is not None:
            # The runtimes fold the weight it computes into an fp32 constant and run it fp32.
            computed_weights.append(state.name)
            continue
        if state.constant_input and state.weight_quantizer is not None:
            # Paddle Inference's constant folding computes it once, in fp32 (measured: a
            # Linear of an embedding table, DeBERTa's relative-position projection, 2.2e-2 of
            # the largest output off the int8 simulation).
            constant_inputs.append(state.name)
            continue
        # Paddle Inference fuses a Linear on a rank-4 input into an fc that runs fp32
        # (measured: an MLP on a rank-4 input ran both fc fp32, cosine 0.9996 to an int8
        # simulation); the Paddle export runs a plain one as an int8 1x1 conv instead.
        beyond_fc = isinstance(layer, paddle.nn.Linear) and state.input_rank > MAX_FC_INPUT_RANK
        if beyond_fc and not (
            target.paddle_fc_weights and _plain_linear(layer) and not state.constant_call_inputs
        ):
            no_int8_kernel.append((state.name, f"{type(layer).__name__} on a rank-{state.input_rank} input"))
            continue
        if info.multiplies_inputs:
            if "input" not in entry or "second_input" not in entry:
                continue
            if state.constant_operand:
                constant_operands.append(state.name)
                continue
            if not target.signed_inputs_int8:
                # Both operands run s8, which saturates without VNNI (measured: max error
                # 0.49 on a 16x16 attention score matmul on AVX2 kernels). Second-input codes
                # within -64..64 would be exact, but BERT ran slower with them (see
                # docs/results.md): the clip and quantize passes cost more than int8 saves.
                fp32_matmuls.append(state.name)
                continue
            wrapped = QuantizedMatmul(
                layer, entry["input"][0], entry["second_input"][0], entry.get("output", []),
                activation_bits, onednn=target.onednn,
            )
            replace_sublayer(model, layer, wrapped)
            continue
        if isinstance(layer, paddle.nn.layer.rnn.RNNBase) and state.weight_quantizer is not None:
            if "input" not in entry:
                continue
            refusal = lstm_int8_refusal(layer, activation_bits, weight_bits)
            if refusal is None and not target.onednn:
                refusal = f"target {target.name!r} has no int8 LSTM (Paddle Inference's oneDNN has)"
            if refusal is not None:
                rnn_fp32.append(f"{state.name} ({refusal})")
                continue
            # Without VNNI, 7-bit weight codes keep oneDNN's int16 pair sums exact (quant_rnn.py).
            headroom = 1.0 if target.signed_inputs_int8 else 2.0
            replace_sublayer(
                model, layer,
                QuantizedLSTM(
                    layer, entry["input"], entry.get("output", []), headroom, name=state.name
                ),
            )
            continue
        if state.weight_quantizer is not None and "input" in entry:
            minimum = input_minimum(state)
            unsigned = target.unsigned_inputs and minimum is not None and minimum >= 0
            # How a signed input runs where the target has no plain s8 route: halved or shifted.
            signed_route = {}
            if not unsigned and not target.signed_inputs_int8 and state.name in halvable:
                # s8 on AVX2 kernels, which halve the weight (halved_convs.py): no shift ops.
                signed_route = dict(halved_weights=True, norm_factor=halvable[state.name].factor)
            elif not unsigned and not target.signed_inputs_int8:
                grid = None
                if target.shifted_signed_inputs and shiftable(layer):
                    grid = shifted_grid(entry["input"][0], minimum, activation_bits)
                if grid is None:
                    # Plain fp32, output included: a scale on a conv/fc output would make the
                    # runtime emit int8 from it (see export.program.collect_scales).
                    reason = halving_refusal(layer) if target.halved_signed_convs else None
                    kept_fp32.append(state.name if reason is None else f"{state.name}: {reason}")
                    continue
                scale, zero_point = grid
                signed_route = dict(input_scale=scale, input_zero_point=zero_point, input_shifted=True)
            wrapped = QuantizedLayer(
                layer,
                entry["input"],
                entry["weight"],
                entry.get("output", []),
                info.weight_channel_axis,
                activation_bits,
                weight_bits,
                **signed_route,
                input_unsigned=unsigned,
                paddle_fc_scales=target.paddle_fc_weights and _runs_as_fc(layer, info.weight_channel_axis),
                onednn_weights=target.onednn,
                # (A route QAT trained on stays: LayerState.runs_as_conv.)
                may_run_as_conv=state.name in heads and _plain_linear(layer) and state.runs_as_conv is not False,
                must_run_as_conv=beyond_fc or bool(state.runs_as_conv),
            )
            if unsigned and (state.wide_input or state.signed_input) and runtime_codes:
                # A ReLU after a residual conv, unclipped in Paddle (export.unsigned): its u8
                # codes reach 255, its s8 ones (after an s8 residual) 127, which is more than
                # the grid's L below 8 bits.
                wrapped.input_top_code = U8_MAX if state.wide_input else symmetric_levels(8)
                plain_calls = state.plain_calls()
                if plain_calls:
                    # A conv of a residual block called again on the block's output: the
                    # block's input is clipped at L (forward_calls).
                    wrapped.input_call_tops = PerCallTopCodes([
                        symmetric_levels(activation_bits) if call in plain_calls else wrapped.input_top_code
                        for call in range(state.calls_per_forward)
                    ])
                    count_forwards(model)
            if state.constant_call_inputs and isinstance(layer, paddle.nn.Linear):
                # Paddle Inference folds those calls into fp32 constants (measured: a Linear
                # called on the tokens and on a parameter table, 2.4e-2 and 10.8% of the
                # largest output off the simulation while it ran them int8).
                wrapped.constant_inputs = list(state.constant_call_inputs)
                constant_calls.append(state.name)
            if wrapped.norm_factor is not None:
                wrapped.folded_norm = halvable[state.name].norm
            replace_sublayer(model, layer, wrapped)
            int8_layers.append(state.name)
            quantized[state.name] = wrapped
            if entry.get("weight_zero_point") or any(entry.get("input_zero_point", ())):
                affine_layers.append(state.name)  # simulated on its thresholds (see below)
        elif "output" in entry:
            set_output_thresholds(layer, entry["output"])
    if runtime_codes:
        _simulate_fused_residuals(model, hooked, table, quantized, activation_bits)
        _simulate_pooled_codes(model, hooked, quantized, activation_bits)
        _simulate_int8_head_pools(model, hooked, table, int8_layers, activation_bits)
    if affine_layers:
        logger.warning(
            "%d layers were calibrated with zero points (symmetric=False), which no int8 "
            "runtime reads: Paddle Inference and Paddle Lite take thresholds and symmetric int8 "
            "weights (zero points ignored), so target %r simulates and exports each on its "
            "thresholds (max(-min, max) for its input, max(|min|, |max|) per weight channel); "
            "the calibration table keeps the affine parameters: %s",
            len(affine_layers), target.name, first_names(affine_layers),
        )
    if no_int8_kernel:
        logger.warning(
            "%d calibrated layers stay fp32: Paddle Inference's int8 program form has no int8 "
            "kernel for their ops (conv3d, conv2d_transpose, a fc on a rank > 3 input, ...), so "
            "the simulation keeps them fp32 as the runtime runs them: %s", len(no_int8_kernel),
            first_names([f"{name} ({kind})" for name, kind in no_int8_kernel]),
        )
    unsupported = _unhooked_weight_layers(model, hooked)
    if unsupported:
        logger.warning(
            "%d layers hold a weight that no registered layer type quantizes and stay fp32 "
            "(not calibrated, not in the calibration table; register their type in PTQRegistry "
            "or multiply their weight with an nn.Linear, nn.Conv2D or paddle.matmul to quantize "
            "it): %s", len(unsupported), first_names(unsupported),
        )
    rnn_fp32.extend(_unhooked_recurrent_layers(model, hooked))
    if rnn_fp32:
        logger.warning(
            "%d recurrent layers stay fp32: Paddle Inference's oneDNN int8 kernels run only "
            "one-layer, one-direction 8-bit LSTMs (its fusion_gru computes the GRU variant "
            "that resets the hidden state before the recurrent matmul, not paddle.nn.GRU's): %s",
            len(rnn_fp32), first_names(rnn_fp32),
        )
    if constant_operands:
        logger.warning(
            "%d matmuls multiply by an operand that stayed the same in every calibration call "
            "(a parameter transformed in forward, such as x @ self.weight.T) and stay fp32: "
            "Paddle Inference folds that operand into a constant and runs the matmul as an "
            "fp32 mul. Multiply by the parameter itself (paddle.matmul(x, self.weight, "
            "transpose_y=True)) to run it as an int8 fc: %s",
            len(constant_operands), first_names(constant_operands),
        )
    if constant_inputs:
        logger.warning(
            "%d layers read an input that stayed the same in every calibration call while the "
            "model's inputs changed (a parameter, or a function of parameters only, such as "
            "a projection of a position-embedding table) and stay fp32: Paddle Inference folds "
            "them into constants computed in fp32: %s",
            len(constant_inputs), first_names(constant_inputs),
        )
    if computed_weights:
        logger.warning(
            "%d layers multiply by a weight their forward computes (such as self.weight * "
            "self.mask, or a standardized weight), not by their weight parameter: Paddle "
            "Inference and ONNX Runtime fold that weight into an fp32 constant and run the "
            "layer fp32, so the simulation keeps them fp32 too: %s",
            len(computed_weights), first_names(computed_weights),
        )
    if constant_calls:
        logger.warning(
            "%d Linear layers are called both on activations and on an input that stayed the "
            "same in every calibration call while the model's inputs changed (a parameter, such "
            "as a relative-position table projected by the same Linear as the tokens): Paddle "
            "Inference folds those calls into constants computed in fp32, and the simulation "
            "runs them fp32 too (its other calls int8): %s",
            len(constant_calls), first_names(constant_calls),
        )
    if kept_fp32:
        alternatives = "PTQConfig(target='x86-vnni') quantizes them for VNNI/AMX CPUs only"
        if not target.halved_signed_convs:
            alternatives += ", target='x86-avx2' the convs for CPUs whose int8 kernels are AVX2 only"
        why = (
            "this target runs a conv on a signed input on the weights oneDNN's AVX2 kernels halve, "
            "which these have no kernel for, and a padded conv cannot take the input's shift "
            "into its bias as fc and unpadded convs do"
            if target.halved_signed_convs else
            "without VNNI, oneDNN shifts a signed int8 input into u8, where a fc's int16 pair "
            "sums saturate and a conv's weights are halved (fc and unpadded convs take the "
            "shift into their bias instead; a padded conv cannot)"
        )
        logger.warning(
            "target %r: %d layers read a signed input and stay fp32 (%s): %s. %s%s.",
            target.name, len(kept_fp32), first_names(kept_fp32), why, alternatives,
            _native_hint(target),
        )
    if fp32_matmuls:
        logger.warning(
            "target %r: %d matmuls of two activations stay fp32 (%s): oneDNN runs both "
            "operands as s8, and without VNNI its int16 pair sums saturate. "
            "PTQConfig(target='x86-vnni') quantizes them for VNNI/AMX CPUs only%s.",
            target.name, len(fp32_matmuls), first_names(fp32_matmuls),
            _native_hint(target, vnni_only=True),
        )
    _warn_of_calls_on_other_ranges([state for _, state in hooked if state.name in quantized])
    mark_converted(
        model, target, table_of_every_layer(table, hooked), input_minima(hooked),
        structure_of(state for _, state in hooked),
    )
    return [
        *(name for name, _ in no_int8_kernel), *kept_fp32, *fp32_matmuls, *constant_operands,
        *constant_inputs, *computed_weights,
    ]


def _simulate_int8_head_pools(
    model: paddle.nn.Layer,
    hooked: HookedLayers,
    table: CalibrationTable,
    int8_layers: list[str],
    activation_bits: int,
) -> None:
    """Swaps each global average pool that Paddle Inference runs int8 in front of a classifier
    head (:func:`~imperative_ptq.quant_pool.int8_head_pools`) for its int8 simulation.

    A pool reading a block output that a fused conv writes as codes (:class:`ResidualSumOutput`,
    decided before this) quantizes on those codes' threshold: Paddle writes the tensor once, on
    its int8 conv readers' threshold when it has some, and the pool reads it (measured on a
    ResNet whose last block output also feeds an auxiliary 1x1 conv head: 0.24-1% of the
    largest logit off Paddle Inference with the ReLU's own output threshold, 2e-7 with the
    readers'). A ReLU called on several sums writes each call on its own readers' threshold
    (:attr:`ResidualSumOutput.call_thresholds`): the pool takes its call's (measured: a ReLU
    shared by an identity and a projection block, 1.9e-2 .. 2.4e-2 of the largest logit off
    Paddle Inference with the first call's)."""
    pools = int8_head_pools(
        [(state.name, layer, state.input_sources) for layer, state in hooked],
        {name: entry["output"] for name, entry in table.items() if entry.get("output")},
        int8_layers,
    )
    layers = dict(model.named_sublayers())
    for layer, state in hooked:
        if state.name in pools:
            source_name = next(iter(state.input_sources)) if len(state.input_sources) == 1 else None
            source = layers.get(source_name) if source_name is not None else None
            threshold = source.threshold if isinstance(source, ResidualSumOutput) else pools[state.name]
            if isinstance(source, ResidualSumOutput) and source.call_thresholds:
                calls = {call for name, call in state.input_source_calls if name == source_name}
                if len(calls) == 1:
                    threshold = source.call_thresholds[calls.pop()]
            readers = [other.name for _, other in hooked if state.name in other.input_sources and other.name in int8_layers]
            replace_sublayer(
                model, layer,
                QuantizedGlobalAveragePool(
                    layer, threshold, table.get(state.name, {}).get("output", []),
                    activation_bits, top=symmetric_levels(8) if state.signed_input else U8_MAX,
                    readers=readers,
                ),
            )
    if pools:
        logger.info(
            "%d global average pools in front of an int8 Linear simulate oneDNN's int8 pool: %s",
            len(pools), first_names(list(pools)),
        )


def _simulate_fused_residuals(
    model: paddle.nn.Layer,
    hooked: HookedLayers,
    table: CalibrationTable,
    quantized: dict[str, QuantizedLayer],
    activation_bits: int,
) -> None:
    """Makes the simulation read each residual that Paddle Inference's fused int8 conv reads
    as codes on those codes (:mod:`~imperative_ptq.quant_residual`), from the adds calibration
    saw: an identity shortcut (a ReLU output its readers' convs quantize as u8 on one
    threshold) through the first of those convs, a downsample shortcut (a BatchNorm output
    read only by the add) through a :class:`QuantizedResidualOutput`, and one with its
    BatchNorm folded into the conv (a conv output read only by the add) through that conv's
    ``residual_output_threshold``. Only where the add's other operand comes from an int8 conv,
    which Paddle fuses the add into."""
    by_name = {state.name: (layer, state) for layer, state in hooked}

    def int8_conv_output(name: str) -> bool:
        """Whether ``name`` is the output of an int8 conv (or of its BatchNorm) that Paddle can
        fuse a residual add into: not one reading a signed input through a shift (``x86``),
        whose output the export writes in float (measured, simulated as s8 residual codes: 1.9%
        of the largest output off Paddle Inference)."""
        layer, state = by_name.get(name, (None, None))
        if isinstance(layer, BATCH_NORM_TYPES):
            sources = state.input_sources
            name = next(iter(sources)) if len(sources) == 1 else ""
        found = quantized.get(name)
        return found is not None and isinstance(found.layer, paddle.nn.Conv2D) and not found.input_shifted

    def conv_of(name: str) -> QuantizedLayer | None:
        layer, state = by_name.get(name, (None, None))
        if isinstance(layer, BATCH_NORM_TYPES) and len(state.input_sources) == 1:
            name = next(iter(state.input_sources))
        return quantized.get(name)

    sums: dict[str, ResidualSumOutput] = {}

    def concat_readers(name: str) -> list[QuantizedLayer]:
        """The int8 u8 readers of the concat that alone reads the sum ``name`` (DLA's tree
        root), all of them: the export gives a concat's inputs its readers' scale, so Paddle
        writes the fused conv's codes on that grid (measured on a DLA-shaped tree: 0.5% of the
        largest logit off Paddle Inference with the sum's own threshold); else nothing."""
        if by_name[name][1].residual_adds:
            return []  # an add reads the sum too, where the export keeps its own scale
        direct = [
            state for _, state in hooked if name in state.input_sources | state.joined_sources
            # An int8 conv reading no sum reads another call of a shared ReLU.
            and not (state.name in quantized and not (state.wide_input or state.signed_input))
        ]
        if len(direct) != 1 or not isinstance(by_name[direct[0].name][0], FunctionalConcat):
            return []
        concat = direct[0].name
        after = [quantized.get(state.name) for _, state in hooked if concat in state.site_sources]
        if not after or any(reader is None or not reader.input_unsigned for reader in after):
            return []
        return after

    def pooled_readers(name: str) -> list[QuantizedLayer]:
        """The int8 u8 readers of the max-pools that alone read the sum's ReLU ``name``, all
        of them: the export gives the ReLU their scale (``export.program``), so Paddle writes
        the fused conv's codes on their grid and pools them (measured: a block output read
        through a max-pool by a 1x1 conv, 1.7% of the largest output off Paddle Inference on
        the ReLU's own threshold); else nothing."""
        readers = [(layer, state) for layer, state in hooked if name in state.input_sources]
        if not readers or any(not isinstance(layer, paddle.nn.MaxPool2D) for layer, _ in readers):
            return []
        pools = {state.name for _, state in readers}
        after = [quantized.get(state.name) for _, state in hooked if state.input_sources & pools]
        if not after or any(reader is None or not reader.input_unsigned for reader in after):
            return []
        return after

    def codes_at_sum(add) -> None:
        """The fused conv writes the sum's ReLU (an ``nn.ReLU``) as codes for every reader."""
        relu, _ = by_name.get(add.sum_reader, (None, None))
        conv = conv_of(add.fused)
        if not isinstance(relu, paddle.nn.ReLU) or conv is None:
            return
        if add.sum_reader in sums:
            # A ReLU shared by several blocks' sums: each block's fused conv marks its call
            # (measured: a projection block's, unmarked, left its sum in float where Paddle
            # writes codes, 6.3e-3 of the largest logit off).
            if sums[add.sum_reader] not in conv.sum_outputs:
                conv.sum_outputs.append(sums[add.sum_reader])
            return
        coded_readers = [
            state for _, state in hooked
            if add.sum_reader in state.input_sources and (state.wide_input or state.signed_input)
            and state.name in quantized and quantized[state.name].input_unsigned
        ]
        readers = [quantized[state.name] for state in coded_readers]
        if not readers:
            readers = concat_readers(add.sum_reader) or pooled_readers(add.sum_reader)
        thresholds = {reader.input_thresholds[0] for reader in readers}
        if len(thresholds) > 1:
            return
        own = table.get(add.sum_reader, {}).get("output")
        threshold = thresholds.pop() if thresholds else (own[0] if own else None)
        if threshold is None:
            return
        top = U8_MAX if add.residual_readers else symmetric_levels(8)
        relu_state = by_name[add.sum_reader][1]
        call_sums = _sum_calls(relu_state)
        call_tops = _sum_call_tops(relu_state)
        if call_sums is not None or call_tops is not None:
            count_forwards(model)
        sums[add.sum_reader] = ResidualSumOutput(
            relu, threshold, top, activation_bits,
            call_thresholds=_sum_call_thresholds(relu_state, coded_readers, quantized, own),
            call_sums=call_sums, call_tops=call_tops,
        )
        replace_sublayer(model, relu, sums[add.sum_reader])
        conv.sum_outputs.append(sums[add.sum_reader])

    def gives_no_scale(name: str) -> bool:
        """The sum's reader is a conv/Linear that gives the sum no scale: kept fp32, or
        reading it shifted (a shifted copy is quantized, not the sum). Paddle's fused conv
        would then have no output scale, so the export keeps the add out of it, in float
        (:func:`imperative_ptq.export.program.quantize_program`); measured: a signed sum read
        by a shifted 1x1 conv, 2.7% of the largest output off Paddle Inference with the
        identity shortcut on codes, 2.7e-7 without."""
        layer, _ = by_name.get(name, (None, None))
        if not isinstance(layer, (paddle.nn.layer.conv._ConvNd, paddle.nn.Linear)):
            return False
        reader = quantized.get(name)
        return reader is None or reader.input_shifted

    def signed_sum(add) -> bool:
        """Whether the add's sum, not rectified, is read by an int8 layer as a signed input."""
        reader = quantized.get(add.sum_reader)
        return not add.after_relu and reader is not None and not reader.input_unsigned

    identity, downsample = [], []
    # Layers reading the sum (or its ReLU) of an add simulated fused, and of one not.
    fused_sums, float_sums = set(), set()
    for layer, state in hooked:
        for add in sorted(state.residual_adds, key=lambda add: add.fused):
            float_sums.add(add.sum_reader)
            if not int8_conv_output(add.fused) or gives_no_scale(add.sum_reader):
                continue
            if add.residual_top == U8_MAX and signed_sum(add):
                # A u8 residual fused into a conv writing a signed sum (no ReLU after the add,
                # read s8 by an int8 layer, as x86-vnni runs one): oneDNN reads the u8 codes as
                # s8 (measured: 53% of the largest logit off Paddle Inference). The export
                # keeps the add out of the conv, in float.
                continue
            # An unhooked residual (an F.relu output) read by u8 convs: a ReLU output too.
            if (add.residual_is_input or relu_or_its_max_pool(state.name, by_name)) and add.residual_readers:
                readers = [quantized.get(name) for name in add.residual_readers]
                if any(reader is None or not reader.input_unsigned for reader in readers) or len(
                    {reader.input_thresholds[0] for reader in readers}
                ) != 1:
                    if state.name in sums and any(
                        add.sum_reader in other.input_sources and other.name in quantized for _, other in hooked
                    ):
                        # The residual is itself a fused conv's sum on the codes that conv
                        # writes, read by a concat too (DLA's root adding its second block's
                        # output): the add reads those codes as they are. Fused only where an
                        # int8 layer reads the new sum, giving it a scale (not the last root's,
                        # read by a global pool before a conv head: measured 0.6% of the
                        # largest logit off, simulated fused); else Paddle adds in float.
                        codes_at_sum(add)
                        fused_sums.add(add.sum_reader)
                    continue
                readers[0].residual_codes = add.residual_top
                # An unhooked residual (an F.relu output) has no layer that wrote it.
                readers[0].residual_source = "" if add.residual_is_input else state.name
                identity.append(add.residual_readers[0])
                codes_at_sum(add)
                fused_sums.add(add.sum_reader)
            elif (
                not add.residual_readers
                and table.get(state.name, {}).get("output")
                and state.name not in downsample
            ):
                calibrated = table[state.name]["output"]
                if isinstance(layer, BATCH_NORM_TYPES) and int8_conv_output(state.name):
                    replace_sublayer(
                        model, layer,
                        QuantizedResidualOutput(layer, calibrated, activation_bits, fused_with=add.fused),
                    )
                elif int8_conv_output(state.name):
                    # A projection shortcut with its BatchNorm folded into the conv (torchvision
                    # ResNets converted from ONNX): the conv writes the s8 codes itself
                    # (measured on such a downsample block before an identity block: 6.2% of
                    # the largest output off Paddle Inference while they were added in float).
                    conv = quantized[state.name]
                    conv.residual_output_threshold = float(calibrated[0])
                    conv.residual_fused_with = add.fused
                else:
                    continue
                downsample.append(state.name)
                codes_at_sum(add)
                fused_sums.add(add.sum_reader)
    # A ReLU output after a fused residual conv is written as codes for every reader, float
    # ones too: an add calibration did not see (its sum read only by a functional op, or
    # returned by the network) reads the codes in Paddle. Where that ReLU is functional
    # (F.relu: the tensor's readers are not all known), its int8 readers put it on them in
    # place, as an identity shortcut's first reader does (readers of one tensor share its
    # threshold, so a second one changes nothing).
    # (Not where the layer reads the ReLU of a sum known to be added in float: a RepVGG
    # block's BatchNorm of its input is no conv output Paddle fuses; measured 12% of the
    # largest output off Paddle Inference with that ReLU read on s8 codes. Tables written
    # before the sum's reader was recorded name none.)
    float_sums -= fused_sums | {""}
    for layer, state in hooked:
        reader = quantized.get(state.name)
        if reader is not None and state.signed_input and (state.name in float_sums or state.input_sources & float_sums):
            # Calibration took the ReLU after an add of an s8 projection for codes, but Paddle
            # adds it in float (a projection reading the signed input shifted, ``x86``): its
            # u8 readers clip the float output at their threshold (export.unsigned), and a
            # fused conv adding it as an identity reads it on its u8 scale, up to code 255
            # (measured: two blocks on an image, 58% of the largest output off Paddle
            # Inference with both on s8 codes).
            reader.input_top_code = symmetric_levels(activation_bits)
            reader.input_call_tops = None
            if reader.residual_codes:
                reader.residual_codes = U8_MAX
    for layer, state in hooked:
        reader = quantized.get(state.name)
        if reader is None or reader.residual_codes or not reader.input_unsigned:
            continue
        if state.name in float_sums:
            continue
        if (state.wide_input or state.signed_input) and not state.input_sources:
            reader.residual_codes = U8_MAX if state.wide_input else symmetric_levels(8)
            reader.residual_source = ""
            # An fp32 layer reading that tensor before this one (a ResNet-vd shortcut's pool
            # run before its branch) reads the codes too, so it puts the tensor on them first
            # (measured: 1.1% of the largest output off Paddle Inference while it pooled the
            # float sum).
            for name in sorted(state.earlier_readers - quantized.keys()):
                earlier, _ = by_name.get(name, (None, None))
                # Only a layer convert left as it was (not one it wrapped already).
                if earlier is not None and _sublayer(model, name) is earlier:
                    replace_sublayer(model, earlier, ResidualCodesInput(
                        earlier, float(reader.input_thresholds[0]), reader.residual_codes, activation_bits
                    ))
    if identity or downsample:
        logger.info(
            "fused int8 residual convs read their residual as codes: %d identity shortcuts "
            "(u8, quantized by %s), %d downsample shortcuts (s8: %s)", len(identity),
            first_names(identity), len(downsample), first_names(downsample),
        )


def _simulate_pooled_codes(
    model: paddle.nn.Layer,
    hooked: HookedLayers,
    quantized: dict[str, QuantizedLayer],
    activation_bits: int,
) -> None:
    """Puts on its codes an ``nn.ReLU`` output that an int8 conv writes for an int8 max-pool.

    Paddle Inference runs a max-pool after a conv + ReLU in int8 when its readers are int8
    convs; the conv then writes the ReLU output as u8 codes (up to 255) on the scale the export
    aligns with the pool's readers (``export.program``), and every reader reads them, the
    caller included when the network returns the pool (measured: 3.5e-3 of the largest value
    off Paddle Inference when the simulation returned floats). The ReLU must be read only by
    max-pools; the conv marks its next call (:class:`ResidualSumOutput`), so a ReLU shared
    with other calls is put on codes only there.
    """
    by_name = {state.name: (layer, state) for layer, state in hooked}
    for layer, state in hooked:
        if type(layer) is not paddle.nn.ReLU or len(state.input_sources) != 1:
            continue
        source = next(iter(state.input_sources))
        source_layer, source_state = by_name.get(source, (None, None))
        if isinstance(source_layer, BATCH_NORM_TYPES):
            sources = source_state.input_sources
            source = next(iter(sources)) if len(sources) == 1 else ""
        conv = quantized.get(source)
        if conv is None or not isinstance(conv.layer, paddle.nn.Conv2D):
            continue
        readers = [(by_name[name][0], by_name[name][1]) for name in by_name
                   if state.name in by_name[name][1].input_sources]
        pools = {
            reader_state.name for reader, reader_state in readers
            if isinstance(reader, paddle.nn.MaxPool2D)
        }
        direct = [quantized.get(reader_state.name) for _, reader_state in readers
                  if reader_state.name not in pools]
        if not pools or any(reader is None or not reader.input_unsigned for reader in direct):
            continue
        pool_readers = [
            quantized.get(other.name) for _, other in hooked if other.input_sources & pools
        ]
        if direct:
            # Int8 convs read the ReLU too (DLA's max-pool shortcut: the pool's reader is an
            # add): the conv writes it on their threshold, and the pool passes those codes on
            # to whatever reads it (with the session's u8 sum, such a block went from 1.1% of
            # the largest logit off Paddle Inference, the float ReLU output pooled, to 1.6e-7).
            pool_readers = [reader for reader in pool_readers if reader is not None] + direct
        elif not pool_readers or any(
            reader is None or not reader.input_unsigned for reader in pool_readers
        ):
            continue
        thresholds = {reader.input_thresholds[0] for reader in pool_readers}
        if len(thresholds) != 1:
            continue
        wrapped = ResidualSumOutput(layer, thresholds.pop(), U8_MAX, activation_bits)
        replace_sublayer(model, layer, wrapped)
        conv.sum_outputs.append(wrapped)
        logger.info("%s: its int8 conv writes it as u8 codes for the max-pool after it", state.name)


#: How many times larger one call's input range may be than another's before convert warns
#: (three of the 8 bits lost on the smaller call).
_CALL_RANGE_RATIO = 8.0


def _warn_of_calls_on_other_ranges(states: list[LayerState]) -> None:
    """Warns of int8 layers called more than once in a forward on inputs of very different
    ranges: one input threshold serves every call, so the call on the smallest loses bits
    (measured on an ALBERT-style encoder sharing one block between its layers: simulation
    0.41 of the largest output off fp32, 0.032 with the same weights in separate layers)."""
    found = []
    for state in states:
        ranges = [state.call_ranges[call] for call in sorted(state.call_ranges) if call < state.calls_per_forward]
        if state.calls_per_forward < 2 or len(ranges) < 2 or min(ranges) <= 0:
            continue
        if max(ranges) / min(ranges) >= _CALL_RANGE_RATIO:
            found.append(f"{state.name} ({', '.join(f'{r:.3g}' for r in ranges)})")
    if found:
        logger.warning(
            "%d int8 layers are called more than once in a forward on inputs whose ranges differ "
            "%gx or more (largest |input| per call in brackets): one input threshold serves all "
            "their calls, so the calls on the smaller ranges keep few of their 8 bits. A copy of "
            "the layer per call (copy.deepcopy: the same weights) gives each call its own "
            "threshold: %s", len(found), _CALL_RANGE_RATIO, ", ".join(found[:5]) + (", ..." if len(found) > 5 else ""),
        )


def _sum_calls(relu: LayerState) -> list[bool] | None:
    """Per call of a residual sum's ReLU called more than once in a forward, whether it read
    a sum (:attr:`LayerState.sum_calls`); ``None`` where every call did, or calibration did
    not record which (a table written before, or a ReLU called once)."""
    if relu.calls_per_forward < 2 or not relu.sum_calls or len(relu.sum_calls) >= relu.calls_per_forward:
        return None
    return [call in relu.sum_calls for call in range(relu.calls_per_forward)]


def _sum_call_tops(relu: LayerState) -> list[int] | None:
    """Per call of a residual sum's ReLU called more than once in a forward, the largest code
    of that call's sum: 127 where its residual was s8 (:attr:`LayerState.signed_sum_calls`),
    else 255; ``None`` where every sum's is the same (or calibration did not record them)."""
    if relu.calls_per_forward < 2 or not relu.signed_sum_calls or relu.signed_sum_calls >= relu.sum_calls:
        return None
    # (The ReLU's other calls read no sum: their top is never used.)
    return [symmetric_levels(8) if call in relu.signed_sum_calls else U8_MAX for call in range(relu.calls_per_forward)]


def _sum_call_thresholds(
    relu: LayerState,
    coded_readers: list[LayerState],
    quantized: dict[str, QuantizedLayer],
    own: list[float] | None,
) -> list[float] | None:
    """Per call of a residual sum's ReLU called more than once in a forward (a residual
    block applied twice), the threshold of the codes the fused conv writes that call's output
    on: its int8 readers' input threshold, else the ReLU's own (the export gives each call's
    output its readers' scale: measured 0.2 of the largest output off Paddle Inference with
    the first call's for both). ``None`` where one threshold serves every call."""
    if relu.calls_per_forward < 2 or len(relu.sum_calls) < 2 or not own:
        return None
    by_call: dict[int, set[float]] = {}
    for reader in coded_readers:
        for source, call in reader.input_source_calls:
            if source == relu.name:
                by_call.setdefault(call, set()).add(quantized[reader.name].input_thresholds[0])
    if any(len(thresholds) > 1 for thresholds in by_call.values()):
        return None
    per_sum = {call: next(iter(by_call[call])) if call in by_call else own[0] for call in relu.sum_calls}
    if len(set(per_sum.values())) < 2:
        return None
    # (The ReLU's other calls read no sum: their threshold is never used.)
    return [per_sum.get(call, own[0]) for call in range(relu.calls_per_forward)]


def _unhooked_weight_layers(model: paddle.nn.Layer, hooked: HookedLayers) -> list[str]:
    """``"name (type)"`` of the leaf layers calibration never hooked that hold a weight (a
    parameter of two or more dimensions: ``nn.Bilinear``, ``DeformConv2D``, a layer of the
    user's own), outside recurrent layers (:func:`_unhooked_recurrent_layers` names those) and
    hooked composites. Not embeddings (a lookup, fp32 by design) nor layers marked
    ``skip_quant``; a layer whose forward multiplies its weight by ``paddle.matmul`` or
    ``F.conv2d`` holds the calibrated call as a sublayer and is no leaf."""
    hooked_layers = {id(layer) for layer, _ in hooked}
    inside: set[int] = set()
    for _, layer in model.named_sublayers():
        if id(layer) in hooked_layers or isinstance(
            layer, (QuantizedLayer, QuantizedLSTM, paddle.nn.layer.rnn.RNNBase, paddle.nn.RNN, paddle.nn.BiRNN)
        ):
            inside.update(id(sublayer) for sublayer in layer.sublayers())
    found = []
    for name, layer in model.named_sublayers():
        if (
            layer.sublayers() or id(layer) in hooked_layers or id(layer) in inside
            or isinstance(layer, paddle.nn.Embedding)
            or getattr(layer, "skip_quant", False) is True
        ):
            continue
        if any(len(parameter.shape) >= 2 for parameter in layer.parameters(include_sublayers=False)):
            found.append(f"{name} ({type(layer).__name__})")
    return found


def _unhooked_recurrent_layers(model: paddle.nn.Layer, hooked: HookedLayers) -> list[str]:
    """``"name (type)"`` of the model's outermost RNN layers that calibration never hooked
    (GRU, SimpleRNN, ... have no int8 kernel, so the registry does not list them)."""
    hooked_layers = {id(layer) for layer, _ in hooked}
    found: list[str] = []
    outer: list[str] = []  # names of the recurrent layers seen (their cells are inside)
    for name, layer in model.named_sublayers():
        if not isinstance(layer, (paddle.nn.layer.rnn.RNNBase, paddle.nn.RNN, paddle.nn.BiRNN)):
            continue
        if any(name.startswith(prefix + ".") for prefix in outer):
            continue
        outer.append(name)
        if id(layer) not in hooked_layers:
            found.append(f"{name} ({type(layer).__name__})")
    return found


def _native_hint(target: Target, vnni_only: bool = False) -> str:
    """Says so when this CPU could run those layers int8 on another target than ``target``
    (deploying on its kind); ``vnni_only``: only VNNI runs them."""
    from .cpu import cpu_info  # reads /proc/cpuinfo: only when there is something to say

    info = cpu_info()
    if info.vnni:
        return f" (this CPU has them: {info.isa}; target='native' picks x86-vnni here)"
    if info.isa == "avx2" and not vnni_only and not target.halved_signed_convs:
        return " (this CPU's int8 kernels are AVX2: target='native' picks x86-avx2 here)"
    return ""


def _sublayer(model: paddle.nn.Layer, name: str) -> paddle.nn.Layer | None:
    """The model's sublayer at the dotted path ``name`` now, or ``None``."""
    return dict(model.named_sublayers()).get(name)


def _output_layers(hooked: HookedLayers) -> set[str]:
    """The model's heads: hooked layers with a weight whose output no hooked layer with a
    weight reads, directly or through hooked layers without one, among those the model
    returned (a detector's class and box Linear layers, each head of a multi-task model) and
    its last hooked layer with a weight (in calibration order: definition order, then
    functional sites in call order; a CTC head before its softmax). Calibration sees who reads
    what only across hooked layers, so Linear layers joined by functional ops (a
    transformer's) would all look unread: of those, only what the model returned and the last
    one count. Empty for a table without its structure section (no input rank recorded)."""
    if not any(state.input_rank for _, state in hooked):
        return set()
    weighted = [state.name for _, state in hooked if state.weight_quantizer is not None]
    if not weighted:
        return set()
    readers: dict[str, list[LayerState]] = {}
    for _, state in hooked:
        for source in state.input_sources:
            readers.setdefault(source, []).append(state)
    returned = [
        state.name for _, state in hooked if state.model_output and state.weight_quantizer is not None
    ]
    return {name for name in dict.fromkeys([*returned, weighted[-1]]) if not _read_by_weighted(name, readers)}


def _read_by_weighted(name: str, readers: dict[str, list[LayerState]]) -> bool:
    """Whether a hooked layer with a weight reads layer ``name``'s output, directly or through
    hooked layers without one."""
    pending, seen = [name], {name}
    while pending:
        for reader in readers.get(pending.pop(), ()):
            if reader.weight_quantizer is not None:
                return True
            if reader.name not in seen:
                seen.add(reader.name)
                pending.append(reader.name)
    return False


def _plain_linear(layer: paddle.nn.Layer) -> bool:
    """An ``nn.Linear`` computing ``x W + b``: the class itself, a subclass keeping its forward
    or a functional matmul site; not a subclass whose forward may compute more."""
    return keeps_forward(layer, paddle.nn.Linear)


def _runs_as_fc(layer: paddle.nn.Layer, weight_channel_axis: int) -> bool:
    """Whether Paddle Inference runs ``layer`` as an ``fc``: an ``nn.Linear``, or a registered
    layer whose 2-D weight has its output channels last (a ``matmul(x, weight)``, which Paddle
    maps to ``fc`` too, and whose weight scales it recomputes the same way; measured: a
    registered ``matmul(x, self.weight) + self.bias`` was 2.3% off the simulation without)."""
    if isinstance(layer, paddle.nn.Linear):
        return True
    weight = getattr(layer, "weight", None)
    return isinstance(weight, paddle.Tensor) and weight.ndim == 2 and weight_channel_axis in (1, -1)
