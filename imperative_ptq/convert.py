"""Convert: calibrated thresholds frozen into the model as the int8 simulation of its target.

Each simulated layer (Conv2D, Linear, ...) with input and weight thresholds becomes a
:class:`~imperative_ptq.quant_layers.QuantizedLayer` computing what the target's int8 kernels
compute; every other calibrated layer keeps its output thresholds for the export. A layer whose
input the target cannot run exactly in int8 stays fp32, with a warning.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
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
from .halved_convs import HalvedConv, halved_convs, halving_refusal
from .quant_layers import (
    MAX_FC_INPUT_RANK, QuantizedLayer, QuantizedMatmul, keeps_forward, replace_sublayer, replace_sublayers, untie_shared_weights,
)
from .quant_pool import U8_MAX, QuantizedGlobalAveragePool, int8_head_pools
from .quantizers.qparams import symmetric_levels
from .quant_residual import ResidualSumOutput
from .quant_rnn import QuantizedLSTM, lstm_int8_refusal
from .registry import LayerInfo, PTQRegistry
from .residual_simulation import FusedResiduals, simulate_pooled_codes
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
    untied = untie_shared_weights(
        model, [layer for layer, state in hooked if state.weight_quantizer is not None and state.name in table]
    )
    if untied:
        logger.info("%d calibrated layers share their weight with other layers: each is quantized "
                    "on a copy of its own", len(untied))
    swaps = _LayerSwaps(model, hooked, target, activation_bits, weight_bits)
    for layer, state in hooked:
        entry = table.get(state.name)
        if entry is None:
            continue
        info = PTQRegistry.layer_info(layer)
        if info.observed_only:
            # A functional concat or multiply: fp32 in Paddle Inference and ONNX Runtime
            # (functional_ops.py), so no output threshold for the export either.
            continue
        if swaps.runtime_runs_fp32(layer, state, info):
            continue
        if info.multiplies_inputs:
            swaps.matmul(layer, state, entry)
        elif isinstance(layer, paddle.nn.layer.rnn.RNNBase) and state.weight_quantizer is not None:
            swaps.lstm(layer, state, entry)
        elif state.weight_quantizer is not None and "input" in entry:
            swaps.weighted(layer, state, entry, info.weight_channel_axis)
        elif "output" in entry:
            set_output_thresholds(layer, entry["output"])
    swaps.apply()
    if _runtime_codes(target, activation_bits):
        FusedResiduals(model, hooked, table, swaps.quantized, activation_bits).simulate()
        simulate_pooled_codes(model, hooked, swaps.quantized, activation_bits)
        _simulate_int8_head_pools(model, hooked, table, list(swaps.quantized), activation_bits)
    swaps.warn_of_fp32_layers()
    _warn_of_calls_on_other_ranges([state for _, state in hooked if state.name in swaps.quantized])
    mark_converted(
        model, target, table_of_every_layer(table, hooked), input_minima(hooked),
        structure_of(state for _, state in hooked),
    )
    return swaps.fp32_layers()


class _LayerSwaps:
    """The layer swaps of one ``convert`` on one target: each calibrated layer becomes its int8
    simulation where the target runs it int8, and the reasons the others stay fp32 are kept
    for one warning each."""

    def __init__(
        self, model: paddle.nn.Layer, hooked: HookedLayers, target: Target, activation_bits: int, weight_bits: int
    ) -> None:
        self.model = model
        self.hooked = hooked
        self.target = target
        self.activation_bits = activation_bits
        self.weight_bits = weight_bits
        self.heads = _output_layers(hooked)
        self.halvable: dict[str, HalvedConv] = halved_convs(model, hooked) if target.halved_signed_convs else {}
        #: Simulated int8 layers (Conv2D, Linear, ...), by name.
        self.quantized: dict[str, QuantizedLayer] = {}
        #: Each swapped layer and its simulation, put into the model by :meth:`apply`.
        self.swapped: list[tuple[paddle.nn.Layer, paddle.nn.Layer]] = []
        #: Int8 layers calibrated with zero points, simulated on their thresholds.
        self.affine: list[str] = []
        #: Int8 Linear layers also called on constant inputs, those calls fp32.
        self.constant_calls: list[str] = []
        #: ``(name, what)`` of layers whose op has no int8 kernel in the runtime.
        self.no_int8_kernel: list[tuple[str, str]] = []
        #: Layers (``"name"`` or ``"name: reason"``) reading a signed input the target cannot run int8.
        self.signed_inputs: list[str] = []
        #: Matmuls of two activations the target keeps fp32.
        self.fp32_matmuls: list[str] = []
        #: ``"name (reason)"`` of recurrent layers left fp32.
        self.fp32_rnns: list[str] = []
        #: Matmuls by an operand the same in every calibration call.
        self.constant_operands: list[str] = []
        #: Layers whose input was the same in every calibration call.
        self.constant_inputs: list[str] = []
        #: Layers multiplying by a weight their forward computes.
        self.computed_weights: list[str] = []
        #: ``"name (k of C)"`` of int8 layers with output channels whose every weight rounds to 0.
        self.zeroed_channels: list[str] = []

    def fp32_layers(self) -> list[str]:
        """The simulated layers left fp32 (recurrent layers aside), as ``convert_layers`` returns them."""
        return [
            *(name for name, _ in self.no_int8_kernel), *self.signed_inputs, *self.fp32_matmuls,
            *self.constant_operands, *self.constant_inputs, *self.computed_weights,
        ]

    def runtime_runs_fp32(self, layer: paddle.nn.Layer, state: LayerState, info: LayerInfo) -> bool:
        """Whether the runtime runs ``layer`` fp32 whatever its thresholds (no int8
        kernel, a weight or input it folds into an fp32 constant); records why."""
        weighted = state.weight_quantizer is not None
        if weighted and not info.int8_runtime:
            # Plain fp32 like the runtime runs it; no output scale either (see weighted).
            self.no_int8_kernel.append((state.name, type(layer).__name__))
            return True
        if weighted and state.computed_weight:
            # The runtimes fold the weight it computes into an fp32 constant and run it fp32.
            self.computed_weights.append(state.name)
            return True
        if weighted and state.constant_input:
            # Paddle Inference's constant folding computes it once, in fp32 (measured: a
            # Linear of an embedding table, DeBERTa's relative-position projection, 2.2e-2 of
            # the largest output off the int8 simulation).
            self.constant_inputs.append(state.name)
            return True
        if _beyond_fc(layer, state) and not (
            self.target.paddle_fc_weights and _plain_linear(layer) and not state.constant_call_inputs
        ):
            self.no_int8_kernel.append((state.name, f"{type(layer).__name__} on a rank-{state.input_rank} input"))
            return True
        return False

    def matmul(self, layer: paddle.nn.Layer, state: LayerState, entry: dict[str, Any]) -> None:
        """Simulates a matmul of two activations int8 where the target runs it so."""
        if "input" not in entry or "second_input" not in entry:
            return
        if state.constant_operand:
            self.constant_operands.append(state.name)
            return
        if not self.target.signed_inputs_int8:
            # Both operands run s8, which saturates without VNNI (measured: max error
            # 0.49 on a 16x16 attention score matmul on AVX2 kernels). Second-input codes
            # within -64..64 would be exact, but BERT ran slower with them (see
            # docs/results.md): the clip and quantize passes cost more than int8 saves.
            self.fp32_matmuls.append(state.name)
            return
        wrapped = QuantizedMatmul(
            layer, entry["input"][0], entry["second_input"][0], entry.get("output", []),
            self.activation_bits, onednn=self.target.onednn,
        )
        self.swapped.append((layer, wrapped))

    def lstm(self, layer: paddle.nn.Layer, state: LayerState, entry: dict[str, Any]) -> None:
        """Simulates an LSTM on oneDNN's int8 kernel where it has one."""
        if "input" not in entry:
            return
        refusal = lstm_int8_refusal(layer, self.activation_bits, self.weight_bits)
        if refusal is None and not self.target.onednn:
            refusal = f"target {self.target.name!r} has no int8 LSTM (Paddle Inference's oneDNN has)"
        if refusal is not None:
            self.fp32_rnns.append(f"{state.name} ({refusal})")
            return
        # Without VNNI, 7-bit weight codes keep oneDNN's int16 pair sums exact (quant_rnn.py).
        headroom = 1.0 if self.target.signed_inputs_int8 else 2.0
        self.swapped.append(
            (layer, QuantizedLSTM(layer, entry["input"], entry.get("output", []), headroom, name=state.name))
        )

    def weighted(
        self, layer: paddle.nn.Layer, state: LayerState, entry: dict[str, Any], weight_channel_axis: int
    ) -> None:
        """Swaps a layer with a weight (Conv, Linear, functional matmul by a parameter) for its
        int8 simulation, on the route the target runs its input on: u8, s8, s8 on halved weights
        or shifted into u8; fp32 where none is exact."""
        minimum = input_minimum(state)
        unsigned = self.target.unsigned_inputs and minimum is not None and minimum >= 0
        # How a signed input runs where the target has no plain s8 route: halved or shifted.
        signed_route = {}
        if not unsigned and not self.target.signed_inputs_int8 and state.name in self.halvable:
            # s8 on AVX2 kernels, which halve the weight (halved_convs.py): no shift ops.
            signed_route = dict(halved_weights=True, norm_factor=self.halvable[state.name].factor)
        elif not unsigned and not self.target.signed_inputs_int8:
            grid = None
            if self.target.shifted_signed_inputs and shiftable(layer):
                grid = shifted_grid(entry["input"][0], minimum, self.activation_bits)
            if grid is None:
                # Plain fp32, output included: a scale on a conv/fc output would make the
                # runtime emit int8 from it (see export.program.collect_scales).
                reason = halving_refusal(layer) if self.target.halved_signed_convs else None
                self.signed_inputs.append(state.name if reason is None else f"{state.name}: {reason}")
                return
            scale, zero_point = grid
            signed_route = dict(input_scale=scale, input_zero_point=zero_point, input_shifted=True)
        beyond_fc = _beyond_fc(layer, state)
        live_channels = _nonzero_channels(layer.weight.numpy(), weight_channel_axis)
        wrapped = QuantizedLayer(
            layer,
            entry["input"],
            entry["weight"],
            entry.get("output", []),
            weight_channel_axis,
            self.activation_bits,
            self.weight_bits,
            **signed_route,
            input_unsigned=unsigned,
            paddle_fc_scales=self.target.paddle_fc_weights and _runs_as_fc(layer, weight_channel_axis),
            onednn_weights=self.target.onednn,
            # (A route QAT trained on stays: LayerState.runs_as_conv.)
            may_run_as_conv=state.name in self.heads and _plain_linear(layer) and state.runs_as_conv is not False,
            must_run_as_conv=beyond_fc or bool(state.runs_as_conv),
        )
        if unsigned and (state.wide_input or state.signed_input) and _runtime_codes(self.target, self.activation_bits):
            # A ReLU after a residual conv, unclipped in Paddle (export.unsigned): its u8
            # codes reach 255, its s8 ones (after an s8 residual) 127, which is more than
            # the grid's L below 8 bits.
            wrapped.input_top_code = U8_MAX if state.wide_input else symmetric_levels(8)
            plain_calls = state.plain_calls()
            if plain_calls:
                # A conv of a residual block called again on the block's output: the
                # block's input is clipped at L (forward_calls).
                wrapped.input_call_tops = PerCallTopCodes([
                    symmetric_levels(self.activation_bits) if call in plain_calls else wrapped.input_top_code
                    for call in range(state.calls_per_forward)
                ])
                count_forwards(self.model)
        if state.constant_call_inputs and isinstance(layer, paddle.nn.Linear):
            # Paddle Inference folds those calls into fp32 constants (measured: a Linear
            # called on the tokens and on a parameter table, 2.4e-2 and 10.8% of the
            # largest output off the simulation while it ran them int8).
            wrapped.constant_inputs = list(state.constant_call_inputs)
            self.constant_calls.append(state.name)
        if wrapped.norm_factor is not None:
            wrapped.folded_norm = self.halvable[state.name].norm
        self.swapped.append((layer, wrapped))
        self.quantized[state.name] = wrapped
        zeroed = live_channels & ~_nonzero_channels(wrapped.layer.weight.numpy(), weight_channel_axis)
        if zeroed.any():
            # (Paddle's fc takes each channel's scale from other weights: quant_layers.paddle_fc_weight)
            by_fc = "; Paddle's int8 fc scales them by other weights" if wrapped.paddle_fc_scales else ""
            self.zeroed_channels.append(f"{state.name} ({int(zeroed.sum())} of {zeroed.size}{by_fc})")
        if entry.get("weight_zero_point") or any(entry.get("input_zero_point", ())):
            self.affine.append(state.name)  # simulated on its thresholds (see warn_of_fp32_layers)

    def apply(self) -> None:
        """Puts every simulation into the model in place of its layer (in one walk of the
        model: a walk per layer cost a 121-conv DenseNet 1.6 s)."""
        replace_sublayers(self.model, self.swapped)
        self.swapped.clear()

    def warn_of_fp32_layers(self) -> None:
        """One warning per reason a layer with a weight stays fp32, naming every such layer (and
        one for layers simulated on other parameters than calibrated, or with calls fp32)."""
        if self.affine:
            logger.warning(
                "%d layers were calibrated with zero points (symmetric=False), which no int8 "
                "runtime reads: Paddle Inference and Paddle Lite take thresholds and symmetric int8 "
                "weights (zero points ignored), so target %r simulates and exports each on its "
                "thresholds (max(-min, max) for its input, max(|min|, |max|) per weight channel); "
                "the calibration table keeps the affine parameters: %s",
                len(self.affine), self.target.name, first_names(self.affine),
            )
        if self.no_int8_kernel:
            logger.warning(
                "%d calibrated layers stay fp32: Paddle Inference's int8 program form has no int8 "
                "kernel for their ops (conv3d, conv2d_transpose, a fc on a rank > 3 input, ...), so "
                "the simulation keeps them fp32 as the runtime runs them: %s", len(self.no_int8_kernel),
                ", ".join([f"{name} ({kind})" for name, kind in self.no_int8_kernel]),
            )
        unsupported = _unhooked_weight_layers(self.model, self.hooked)
        if unsupported:
            logger.warning(
                "%d layers hold a weight that no registered layer type quantizes and stay fp32 "
                "(not calibrated, not in the calibration table; register their type in PTQRegistry "
                "or multiply their weight with an nn.Linear, nn.Conv2D or paddle.matmul to quantize "
                "it): %s", len(unsupported), ", ".join(unsupported),
            )
        fp32_rnns = [*self.fp32_rnns, *_unhooked_recurrent_layers(self.model, self.hooked)]
        if fp32_rnns:
            logger.warning(
                "%d recurrent layers stay fp32: Paddle Inference's oneDNN int8 kernels run only "
                "one-layer, one-direction 8-bit LSTMs (its fusion_gru computes the GRU variant "
                "that resets the hidden state before the recurrent matmul, not paddle.nn.GRU's): %s",
                len(fp32_rnns), ", ".join(fp32_rnns),
            )
        if self.constant_operands:
            logger.warning(
                "%d matmuls multiply by an operand that stayed the same in every calibration call "
                "(a parameter transformed in forward, such as x @ self.weight.T) and stay fp32: "
                "Paddle Inference folds that operand into a constant and runs the matmul as an "
                "fp32 mul. Multiply by the parameter itself (paddle.matmul(x, self.weight, "
                "transpose_y=True)) to run it as an int8 fc: %s",
                len(self.constant_operands), ", ".join(self.constant_operands),
            )
        if self.constant_inputs:
            logger.warning(
                "%d layers read an input that stayed the same in every calibration call while the "
                "model's inputs changed (a parameter, or a function of parameters only, such as "
                "a projection of a position-embedding table) and stay fp32: Paddle Inference folds "
                "them into constants computed in fp32: %s",
                len(self.constant_inputs), ", ".join(self.constant_inputs),
            )
        if self.computed_weights:
            logger.warning(
                "%d layers multiply by a weight their forward computes (such as self.weight * "
                "self.mask, or a standardized weight), not by their weight parameter: Paddle "
                "Inference and ONNX Runtime fold that weight into an fp32 constant and run the "
                "layer fp32, so the simulation keeps them fp32 too: %s",
                len(self.computed_weights), ", ".join(self.computed_weights),
            )
        if self.zeroed_channels:
            logger.warning(
                "%d int8 layers have output channels whose every weight rounds to 0 on the "
                "weight grid (one threshold for all channels, fewer than 8 bits, or a Linear "
                "running as Paddle Inference's int8 fc, which takes each channel's scale from "
                "other weights, against channels far narrower than the widest): those channels "
                "output their bias alone (zeroed channels of all in brackets). Per-channel "
                "weights (PerChannelAbsmaxQuantizer) or more bits keep them, except in an fc, "
                "whose zeroed channels are nearly dead (keep_fp32 keeps them): %s",
                len(self.zeroed_channels), ", ".join(self.zeroed_channels),
            )
        if self.constant_calls:
            logger.warning(
                "%d Linear layers are called both on activations and on an input that stayed the "
                "same in every calibration call while the model's inputs changed (a parameter, such "
                "as a relative-position table projected by the same Linear as the tokens): Paddle "
                "Inference folds those calls into constants computed in fp32, and the simulation "
                "runs them fp32 too (its other calls int8): %s",
                len(self.constant_calls), first_names(self.constant_calls),
            )
        if self.signed_inputs:
            alternatives = "PTQConfig(target='x86-vnni') quantizes them for VNNI/AMX CPUs only"
            if not self.target.halved_signed_convs:
                alternatives += ", target='x86-avx2' the convs for CPUs whose int8 kernels are AVX2 only"
            why = (
                "this target runs a conv on a signed input on the weights oneDNN's AVX2 kernels halve, "
                "which these have no kernel for, and a padded conv cannot take the input's shift "
                "into its bias as fc and unpadded convs do"
                if self.target.halved_signed_convs else
                "without VNNI, oneDNN shifts a signed int8 input into u8, where a fc's int16 pair "
                "sums saturate and a conv's weights are halved (fc and unpadded convs take the "
                "shift into their bias instead; a padded conv cannot)"
            )
            logger.warning(
                "target %r: %d layers read a signed input and stay fp32 (%s): %s. %s%s.",
                self.target.name, len(self.signed_inputs), ", ".join(self.signed_inputs), why, alternatives,
                _native_hint(self.target),
            )
        if self.fp32_matmuls:
            logger.warning(
                "target %r: %d matmuls of two activations stay fp32 (%s): oneDNN runs both "
                "operands as s8, and without VNNI its int16 pair sums saturate. "
                "PTQConfig(target='x86-vnni') quantizes them for VNNI/AMX CPUs only%s.",
                self.target.name, len(self.fp32_matmuls), ", ".join(self.fp32_matmuls),
                _native_hint(self.target, vnni_only=True),
            )


def _beyond_fc(layer: paddle.nn.Layer, state: LayerState) -> bool:
    """A Linear on an input of a rank Paddle Inference's fc does not run int8: it fuses a Linear
    on a rank-4 input into an fc that runs fp32 (measured: an MLP on a rank-4 input ran both
    fc fp32, cosine 0.9996 to an int8 simulation); the Paddle export runs a plain one as an
    int8 1x1 conv instead."""
    return isinstance(layer, paddle.nn.Linear) and state.input_rank > MAX_FC_INPUT_RANK


def _nonzero_channels(weight: np.ndarray, channel_axis: int) -> np.ndarray:
    """Per output channel (``channel_axis``), whether any of its weights is non-zero."""
    others = tuple(axis for axis in range(weight.ndim) if axis != channel_axis)
    return np.any(weight != 0, axis=others)


def _runtime_codes(target: Target, activation_bits: int) -> bool:
    """Whether the simulation reads the runtime's own code ranges (fused residuals and head
    pools on u8 codes up to 255): oneDNN targets with 8-bit activations, the only ones a
    runtime runs (wider ones are refused at export)."""
    return target.onednn and activation_bits <= 8


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
