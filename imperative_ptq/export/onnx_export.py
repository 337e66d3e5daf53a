"""QDQ ONNX export that ONNX Runtime runs with QLinear (int8) kernels.

The model is traced like the Paddle export (:mod:`.tracing`), and the legacy fp32 program is
translated op by op: here the ops that carry or move scales (convs, matmuls, pools, adds,
layout ops), in :mod:`.onnx_float_ops` those that run in float between a dequantize and a
quantize op (activations, math, normalizations, padding, reductions). An op without a
translation raises ``NotImplementedError`` naming it and where it is. The graph has

* BatchNorm folded into the preceding conv; per-channel thresholds scale with the BN factor, so
  the folded int8 weights equal the dygraph ones (up to sign) exactly;
* per-channel int8 weights (``DequantizeLinear`` with ``axis``) and int32 conv biases with
  scale ``s_input * s_weight[c]``; weights of at most 4 bits as INT4 from opset 21 (two codes a
  byte: half the bytes; ONNX Runtime 1.32 dequantizes them and runs a float Conv/Gemm, having
  no int4 conv kernel and fusing ``MatMulNBits`` only behind an unquantized input), else as
  int8 holding the same codes; as uint8 about zero point 128 where the layer's input codes can
  pass 127 and its weight codes pass 64 (ONNX Runtime's u8 x s8 kernels without VNNI sum
  product pairs in int16, which then saturates; u8 x u8 is exact on every x86 CPU);
* uint8 activations, zero point 0 for tensors known to be non-negative (after ReLU) and 128 for
  signed ones (on ``arm`` clipped to codes 1..255: Paddle Lite's symmetric -127..127). ONNX
  Runtime only fuses QDQ into ``QLinearConv`` with uint8 activations; symmetric int8
  activations leave convs in float. On the x86 targets every int8 layer's input
  is non-negative and quantized on codes 0..127 up to its threshold, the simulation's grid,
  where ONNX Runtime's AVX2 u8 x s8 kernels cannot saturate (:mod:`imperative_ptq.targets`);
  only ReLU outputs above the threshold (clipped by the simulation) reach higher codes.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np
import paddle

from . import program as program_lib
from .float_readers import returned_only_outputs, unscale_fp32_layer_inputs
from .legacy_program import (
    INT8_WEIGHT_OPS, LegacyProgram, computed_from_parameters, legacy_static_mode, load_legacy_program,
)
from .pool_scales import int8_pool_outputs
from .weight_ops import fold_conv_bias, materialize_conv1d_weights
from .atomic import export_directory, staged_export
from .graph import channels_last_to_first, complete_batch_norm_parameters, is_persistable
from .dynamic_export import (
    DynamicWeight,
    check_dynamic_model,
    is_dynamic_model,
    trace_dynamic_model,
)
from .onnx_control_flow import ControlFlowConverters
from .onnx_inspect import onnx_runtime_report
from .onnx_float_ops import FloatOpConverters, numpy_dtype
from .onnx_spectral_ops import SpectralOpConverters
from .onnx_lstm import SimulatedLSTMConverter
from .padded_pools import onnx_pads, same_pads
from ..calibration_table import first_names
from ..bias_grid import bias_grid_steps, folded_weight_scales, int32_bias_codes
from ..converted import converted_biases_on_grid, converted_target
from ..fuse import batch_norm_factor_and_bias
from ..quant_layers import QuantizedLayer, signed_input_floor
from ..cpu import cpu_info
from ..quant_pool import U8_MAX
from .unsigned import RELU6_CLIP
from ..quantizers.qparams import symmetric_levels
from ..shifted_input import shift_value, shifted_levels, shifted_multiplier
from .tracing import (
    LayerRecord, main_thread_only, model_activation_bits, normalize_input_spec, trace_to_legacy_program,
)
from .unsigned import relu_after_residual_conv

__all__ = ["INT4_OPSET", "export_onnx"]

logger = logging.getLogger(__name__)

#: Convs ONNX Runtime can run as ``QLinearConv``.
_CONV_OPS = ("conv2d", "depthwise_conv2d")
#: Convs and 3-d pools every export keeps fp32 (no int8 kernel in either runtime): they read
#: their input's float value.
_FLOAT_CONV_OPS = frozenset({
    "conv2d_transpose", "depthwise_conv2d_transpose", "deformable_conv", "deformable_conv_v1",
    "conv3d", "conv3d_transpose", "pool3d", "max_pool3d_with_index",
})

#: How far (in int32 codes) a conv bias may lie off its grid before the export counts it as
#: rounded: a bias convert put on the grid is off it by float32 roundings of its terms only.
_OFF_GRID = 1e-3

#: The first opset whose ``DequantizeLinear`` reads INT4 (packed two per byte).
INT4_OPSET = 21

#: The zero point of uint8 weight codes (``int8 code + 128``). ONNX Runtime's x86 kernels
#: multiply u8 activations by u8 weights exactly on every CPU; by s8 weights they use
#: ``vpmaddubsw`` without VNNI, whose int16 pair sums saturate once activation codes pass 127.
U8_WEIGHT_ZERO_POINT = 128


def _off_int32_grid(bias: np.ndarray, steps: np.ndarray) -> bool:
    """Whether a conv or Linear bias lies more than :data:`_OFF_GRID` of a step off the int32
    grid ONNX Runtime adds it on (``steps``: input x weight scale per output channel)."""
    exact = np.asarray(bias, np.float64).reshape(-1) / np.asarray(steps, np.float64).reshape(-1)
    return bool(np.abs(exact - np.round(exact)).max(initial=0.0) > _OFF_GRID)


def pair_sums_can_saturate(codes: np.ndarray) -> bool:
    """Whether ``vpmaddubsw`` pair sums of u8 codes (up to 255) and these int8 weight codes
    can pass int16: not for weights of at most 7 bits (2 * 255 * 63 < 32767)."""
    return 2 * 255 * int(np.abs(codes.astype(np.int16)).max(initial=0)) > np.iinfo(np.int16).max


def unsigned_weight_codes(codes: np.ndarray) -> np.ndarray:
    """Signed weight codes as uint8 about :data:`U8_WEIGHT_ZERO_POINT` (the same values)."""
    return (codes.astype(np.int16) + U8_WEIGHT_ZERO_POINT).astype(np.uint8)


#: Values per output channel up to which a spatial filter ONNX Runtime runs in float is stored
#: as float32 (see ``_Converter._conv``): depthwise filters up to 8x8, an RGB stem's 3x3, 4x4.
_FLOAT_STORED_FILTER_VALUES = 64


#: Ops ONNX Runtime folds into a Conv with a constant filter when their other inputs are
#: constants (ConvAddFusion, ConvMulFusion, ConvBNFusion), and ops a QuantizeLinear after
#: them reaches the Conv through (Relu/Clip dropped before it, moved up through layout ops
#: and max-pools): see ``_Converter._keep_float_filters_from_requantization``.
_CONV_FUSED_CONSTANT_OPS = frozenset({"Add", "Sub", "Mul", "Div", "BatchNormalization"})
_QUANTIZE_CROSSED_OPS = frozenset({
    "Relu", "Clip", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity",
    "MaxPool", "Slice", "Gather", "Resize", "Split", "Concat",
})


def weight_codes_and_zero(codes: np.ndarray, zero_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Integer weight storage for an integer kernel fed u8 codes up to 255: the int8 codes
    with zero points 0 (``zero_shape``), or the uint8 codes about zero point 128 where
    :func:`pair_sums_can_saturate`."""
    if pair_sums_can_saturate(codes):
        return unsigned_weight_codes(codes), np.full(zero_shape, U8_WEIGHT_ZERO_POINT, np.uint8)
    return codes.astype(np.int8), np.zeros(zero_shape, np.int8)


#: Ops after which a tensor is non-negative, and ops whose output is non-negative where their
#: input ``X`` is (leaky_relu, prelu and the ELUs are not non-negative, but keep ``x >= 0``).
#: Conditional cases (pow, clip, pad, concat, ...) are in ``_Converter._output_unsigned``.
_NON_NEGATIVE_OPS = frozenset({
    "relu", "relu6", "sigmoid", "hard_sigmoid", "abs", "exp", "square", "sqrt", "rsqrt",
    "softplus", "p_norm",
})
_SIGN_PRESERVING_OPS = frozenset({
    "pool2d", "flatten_contiguous_range", "reshape2", "transpose2", "dropout", "pixel_unshuffle",
    "squeeze2", "unsqueeze2", "split", "max_pool2d_with_index", "leaky_relu", "prelu", "elu",
    "selu", "celu", "silu", "mish", "assign", "cast", "tile", "expand_v2", "expand_as_v2",
    "gather", "reduce_max", "reduce_min", "reduce_sum", "reduce_mean", "reduce_amax",
    "reduce_amin", "reduce_prod", "logsumexp", "cumsum", "index_select", "pixel_shuffle",
    "erf", "floor", "ceil", "sign", "reciprocal", "softsign", "hard_shrink", "softshrink",
    "tanh_shrink", "roll", "flip", "round", "top_k_v2", "argsort", "kthvalue", "unpool",
    "pool3d", "max_pool3d_with_index",
})

#: Paddle's binary elementwise ops -> ONNX's (both broadcast numpy-style).
_ELEMENTWISE_OPS = {
    "elementwise_add": "Add", "elementwise_mul": "Mul", "elementwise_sub": "Sub",
    "elementwise_div": "Div", "elementwise_pow": "Pow", "elementwise_min": "Min",
    "elementwise_max": "Max",
}

#: The ONNX ops of Paddle's elementwise ops on bool tensors (ONNX's arithmetic takes no bool:
#: x2paddle writes ONNX's ``Expand`` of a bool mask as ``paddle.full(True) * mask``, which a
#: ``Mul`` made a file ONNX Runtime refuses, ``INVALID_GRAPH``).
_BOOL_ELEMENTWISE_OPS = {"Mul": "And", "Add": "Or"}  # (Paddle has no other on bool)

#: How a failed ONNX export ends its message.
_PADDLE_EXPORT_ELSEWHERE = (
    "the Paddle Inference export (ImperativePTQ.save_quantized_model) does not go through "
    "this translation"
)


def adaptive_bins(length: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The bins of an adaptive pool from ``length`` to ``size`` positions, as Paddle computes
    them: bin ``i`` spans ``floor(i * length / size)`` up to ``ceil((i + 1) * length / size)``
    (exclusive). Returns the ``[size]`` arrays of starts and ends."""
    bins = np.arange(size, dtype=np.int64)
    return bins * length // size, -((-(bins + 1) * length) // size)


def _require_onnx():
    try:
        import onnx
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "export_onnx needs the 'onnx' package: pip install 'imperative_ptq[export]'"
        ) from error
    return onnx


#: Ops whose output holds some of their input's values, in another layout.
_LAYOUT_OPS = frozenset({
    "flatten_contiguous_range", "reshape2", "transpose2", "squeeze2", "unsqueeze2", "pool2d",
    "max_pool2d_with_index",
})


#: Ops that hand their input's values on (moved, selected or scaled): reading an int8 layer's
#: input for readers on another grid, they read its float value, as in the simulation, where
#: only that layer quantizes it (measured: a conv's ReLU output reshaped for a spatial-softmax
#: matmul beside the int8 1x1 conv reading it, 11% of the largest output off while the reshape
#: read the conv's clipped codes).
_VALUE_PASSING_OPS = frozenset({
    "flatten_contiguous_range", "reshape2", "transpose2", "squeeze2", "unsqueeze2", "split",
    "scale", "dropout", "pixel_shuffle", "pixel_unshuffle",
})


def _changes_values(op) -> bool:
    """Whether value-passing ``op`` hands on other values than it reads (a ``scale`` other
    than a sign flip, a shift, an inference dropout that scales down): codes it read would
    leave their grid, so it reads the float value, as in the simulation (measured: a Linear
    called on ``a`` and on ``2 * a``, the scale reading the codes quantized for the first
    call, 8e-3 .. 8e-2 of the largest output off)."""
    if op.type == "scale":
        return bool(op.input("ScaleTensor")) or abs(op.attr("scale")) != 1.0 or op.attr("bias") != 0.0
    if op.type == "dropout":
        return op.attr("dropout_implementation") == "downgrade_in_infer" and op.attr("dropout_prob") != 0.0
    return False


def _parallel_branches(
    block: "paddle.static.Block", norm_inputs: Mapping[str, str], writers: Mapping, readers: Mapping
) -> set[str]:
    """Of the BatchNorm outputs ``norm_inputs`` (output -> the BatchNorm's input) that adds
    read, those summed by one chain of adds with another of them whose branch reads the same
    tensor: a branch is a BatchNorm of a conv (and its bias add) or of the tensor itself."""
    groups: dict[tuple[str, str], list[str]] = {}
    for output, name in norm_inputs.items():
        op = writers.get(name)
        while op is not None and op.type == "elementwise_add" and is_persistable(block, op.input("Y")[0]):
            name = op.input("X")[0]  # a conv's bias add
            op = writers.get(name)
        slots = INT8_WEIGHT_OPS.get(op.type) if op is not None else None
        source = op.input(slots[1])[0] if slots else norm_inputs[output]
        groups.setdefault((source, _last_add_of_sum(output, readers)), []).append(output)
    return {output for group in groups.values() if len(group) > 1 for output in group}


def _last_add_of_sum(name: str, readers: Mapping) -> str:
    """The output of the last op of the chain of adds that sums ``name`` (each add's output
    read by the next alone); ``name`` itself if it is not read by one add alone."""
    while len(readers.get(name, [])) == 1 and readers[name][0].type == "elementwise_add":
        name = readers[name][0].output("Out")[0]
    return name


class _Converter(FloatOpConverters, SpectralOpConverters, SimulatedLSTMConverter, ControlFlowConverters):
    """Translates one legacy program into an ONNX QDQ graph (the ops that run in float come
    from :class:`.onnx_float_ops.FloatOpConverters`, the LSTMs simulated int8 from
    :class:`.onnx_lstm.SimulatedLSTMConverter`)."""

    def __init__(
        self,
        loaded: LegacyProgram,
        records: Sequence[LayerRecord],
        specs,
        unsigned_inputs: bool = True,
        weights: dict[str, LayerRecord] | None = None,
        dynamic_weights: Mapping[str, DynamicWeight] | None = None,
        int4_weights: bool = False,
        symmetric_signed: bool = False,
        int8_residual_branches: bool = True,
        biases_on_grid: bool = False,
        exact_shifts: bool = True,
        vnni_only: bool = False,
    ):
        self.onnx = _require_onnx()
        #: the file is for CPUs with VNNI only: int8 weights everywhere (see export_onnx)
        self.vnni_only = vnni_only
        #: shifts of signed int8-layer inputs in Paddle Inference's float32 arithmetic where
        #: ONNX Runtime may compute the tensor as the simulation does (see export_onnx)
        self.exact_shifts = exact_shifts
        #: convert moved the biases onto ONNX Runtime's int32 grid (bias_grid=True): a conv
        #: bias still off it runs in float rather than rounded
        self.biases_on_grid = biases_on_grid
        #: conv outputs whose off-grid bias is added in float (a float conv in ONNX Runtime)
        self.float_biases: list[str] = []
        #: MatMul outputs of int8 layers (quantized input, integer weight) -> the int32 grid of
        #: their bias (input x weight scales): see _integer_matmul_in_float
        self.integer_matmul_outputs: dict[str, np.ndarray] = {}
        #: DequantizeLinear outputs of weights stored as INT4 (no integer kernel reads them)
        self.int4_stored: set[str] = set()
        #: max-pool masks -> ONNX's MaxPool Indices, which MaxUnpool reads (see _max_pool)
        self.pool_indices: dict[str, str] = {}
        #: float32 filter constant -> the _quantized_weight arguments of its int8 storage
        self.float_stored_filters: dict[str, tuple] = {}
        #: quantize the BatchNorm outputs of residual branches for QLinearConv (see export_onnx)
        self.int8_residual_branches = int8_residual_branches
        #: conv outputs whose bias ONNX Runtime adds rounded to its int32 grid
        self.rounded_biases: list[str] = []
        #: ``L`` of the activation grid, codes ``0..L`` (u8) or ``-L..L`` of ``t / L``.
        self.levels = symmetric_levels(model_activation_bits(records))
        #: signed activations keep the symmetric codes -127..127 (Paddle Lite's kernels, the
        #: ``arm`` simulation) rather than uint8 zero point 128's -128..127 (oneDNN's s8)
        self.symmetric_signed = symmetric_signed
        #: store weights of at most 4 bits as INT4 (opset >= INT4_OPSET)
        self.int4_weights = int4_weights
        #: INT4 asked for explicitly (``export_onnx(int4_weights=True)``), not by default
        self.int4_required = False
        #: Layers of at most 4 bits stored as int8 (or, asked for, INT4 not computing the
        #: simulation's weight): INT4 cannot hold the weight their target computes with.
        self.int4_inexact: list[str] = []
        #: program weight -> its int8 form, for layers quantized dynamically (quantize_dynamic)
        self.dynamic_weights = dict(dynamic_weights or {})
        self.helper = self.onnx.helper
        self.loaded = loaded
        self.block = loaded.program.global_block()
        self.specs = specs
        self.nodes: list = []
        self.initializers: list = []
        self.names: dict[str, str] = {}  # program var -> onnx tensor
        self.scales: dict[str, tuple[float, int]] = {}  # program var -> (scale, zero point)
        self.unsigned: set[str] = set()
        self.counter = 0
        self.ops = [op for op in self.block.ops if op.type not in ("feed", "fetch")]
        self.readers: dict[str, list] = {}
        self.producer: dict[str, Any] = {}
        for op in self.ops:
            for slot in op.input_names:
                for name in op.input(slot):
                    self.readers.setdefault(name, []).append(op)
            for slot in op.output_names:
                for name in op.output(slot):
                    self.producer[name] = op
        #: program weight -> its layer (``weights``: as :func:`.program.materialize_conv1d_weights`
        #: extended it; default: from the records)
        self.weights = weights if weights is not None else {r.weight_name: r for r in records if r.simulated}
        #: program var -> calibrated affine (scale, uint8 zero point) of int8-op inputs
        self.affine: dict[str, tuple[float, int]] = {}
        #: x86 targets: int8-op inputs calibrated non-negative -> threshold; quantized on
        #: codes 0..127 up to it, where no int16 pair sum can saturate.
        self.u8_inputs: dict[str, float] = {}
        #: x86: signed int8-op inputs on a shifted grid (:mod:`imperative_ptq.shifted_input`),
        #: quantized per reader on its own grid: (input, scale, zero point) -> its Q/DQ.
        self.shifted: set[str] = set()
        self._shifted_tensors: dict[tuple[str, float, int], str] = {}
        #: (var, scale, zero point) -> the Q/DQ of an int8 reader on a grid of its own (_own_grid)
        self._own_grids: dict[tuple[str, float, int], str] = {}
        self.unsigned_inputs = unsigned_inputs
        #: Global pools the simulation runs on u8 codes: output variable -> input threshold.
        self.int8_pools = int8_pool_outputs(records)
        #: Their largest input code (127 where Paddle writes the pool's input s8).
        self.int8_pool_tops = {
            output: record.pooled_input_top for record in records
            if record.pooled_input_threshold is not None for _, output in record.calls
        }
        #: ReLU outputs the simulation stores as u8 codes up to 255 for a residual add
        #: (``LayerRecord.residual_codes``), and their unclipped DequantizeLinear once bound.
        self.residuals = {
            inputs[0] for record in records if record.residual_codes == U8_MAX
            for inputs, _ in record.calls if inputs
        }
        #: Every input the simulation stores as codes for a residual add (up to 127 or 255).
        self.coded_residuals = {
            inputs[0] for record in records if record.residual_codes
            for inputs, _ in record.calls if inputs
        }
        self.unclipped: dict[str, str] = {}
        #: Max-pool outputs of codes up to 255 (their int8 readers still clip them).
        self.pooled_unclipped: set[str] = set()
        #: program var -> its ONNX tensor before the Q/DQ ``_bind`` gave it.
        self.unquantized: dict[str, str] = {}
        #: Outputs of the matmuls of two activations the simulation runs int8.
        self.int8_matmul_outputs = {
            output for record in records if record.multiplies_inputs for _, output in record.calls if output
        }
        #: The network's outputs.
        self.fetched = {var.name for var in loaded.fetch_vars}
        #: Tensors the simulation holds as u8 codes for every reader, the caller included ->
        #: (threshold, largest code): an identity shortcut its conv quantizes in place
        #: (``LayerRecord.residual_codes``) and the ReLU call a fused int8 conv writes
        #: (``LayerRecord.sum_codes_tops``).
        self.coded = self._coded_tensors(records)
        #: program var in ``coded`` -> its ONNX tensor on those codes (what the caller gets).
        self.coded_values: dict[str, str] = {}
        #: Outputs the simulation writes as s8 codes (``LayerRecord.residual_output``).
        self.coded_outputs = {
            output for record in records if record.residual_output
            for _, output in record.calls if output
        }
        #: ReLU outputs whose int8 readers read codes up to 255 (``LayerRecord.top_code``).
        self.wide = {
            inputs[0] for record in records
            if record.simulated and record.input_unsigned
            for inputs, _ in record.calls if inputs and record.top_code(inputs[0]) == U8_MAX
        } | {
            # An fp32 layer reading a tensor the simulation puts on u8 codes up to 255
            # (quant_residual.ResidualCodesInput) reads them unclipped too.
            inputs[0] for record in records
            if not record.simulated and record.residual_codes == U8_MAX
            for inputs, _ in record.calls if inputs
        }
        #: Inputs of int8 layers, quantized on the simulation's grid of their threshold.
        self.layer_inputs: set[str] = set()
        #: Op types converted by :class:`.onnx_float_ops.FloatOpConverters`.
        # Ops computing in float that are not in the mixin: the transposed and deformable convs
        # the simulation keeps fp32 read a tensor an int8 layer quantizes as floats too.
        self.float_op_types = frozenset(self.float_dispatch()) | frozenset(self.spectral_dispatch()) | _FLOAT_CONV_OPS
        self.complex_parts: dict[str, tuple[str, str]] = {}
        self.thresholds = self._activation_thresholds(records)
        #: program var -> the calibrated layer that writes it (for errors)
        self.layer_of = {output: r.name for r in records for _, output in r.calls if output}
        self.constants = {}
        self.lstm_calls = {}

    # ------------------------------------------------------------------------------ helpers
    def _coded_up_to_255(self, var: str) -> bool:
        """Whether the simulation holds ``var`` on u8 codes up to 255 for every reader."""
        return self.coded.get(var, (0.0, 0))[1] == U8_MAX

    def _coded_tensors(self, records: Sequence[LayerRecord]) -> dict[str, tuple[float, int]]:
        """The tensors the simulation puts on u8 codes for every reader (see ``coded``).

        A :class:`~imperative_ptq.quant_residual.ResidualSumOutput` ReLU serves other calls
        too (``paddle.vision``'s blocks call one ReLU twice): only a call after a residual
        add, or read by max-pools, is the one its fused conv marks.
        """
        coded = {
            inputs[0]: (float(record.input_threshold), int(record.residual_codes))
            for record in records if record.residual_codes
            for inputs, _ in record.calls if inputs
        }
        for record in records:
            tops = record.sum_codes_tops()
            for output, threshold in record.sum_codes_thresholds().items():
                # (Read by max-pools, and perhaps by int8 convs: convert's pooled codes.)
                pooled = any(
                    op.type == "pool2d" and op.attr("pooling_type") == "max"
                    for op in self.readers.get(output, [])
                )
                if pooled or relu_after_residual_conv(self.block, output, self.producer):
                    coded[output] = (threshold, tops[output])
        return coded

    def _activation_thresholds(self, records: Sequence[LayerRecord]) -> dict[str, float]:
        consumers = {name: [op.type for op in ops] for name, ops in self.readers.items()}
        _, outputs = program_lib.collect_scales(list(records), consumers)
        # Of the output thresholds, only those of the tensors the simulation quantizes: the
        # residual outputs of fused int8 convs and their fused branches (int8 layers' inputs
        # are added below). An activation's output threshold that only float ops read (a
        # pool that is not int8, a squeeze-excite multiply) the simulation never applies
        # (measured: Hardswish -> global pool + gate multiply -> 1x1 conv, largest error
        # 2.5% of the output with it, 0 without).
        fused_branches = {
            record.residual_fused_with for record in records if record.residual_output
        } if self.int8_residual_branches else set()
        residuals = {
            output for record in records
            if record.residual_output or (record.name in fused_branches and not record.simulated)
            for _, output in record.calls if output
        }
        outputs = {name: value for name, value in outputs.items() if name in residuals}
        # A BatchNorm output read only by adds (a residual block's last conv) keeps its output
        # threshold, though the simulation does not quantize it: without a QuantizeLinear
        # after it ONNX Runtime runs that conv and the add in float (measured on ResNet-18: 8
        # of 19 convs, int8 0.84x its fp32 at batch 8 instead of 2.3x). The price is a logit
        # cosine to the simulation of 0.9995 instead of 0.9997. (int8_residual_branches=False
        # leaves them float, and the fused branches above.)
        # (Left float as the simulation leaves it, the downsample blocks' fused convs alone:
        # 0.46% instead of 1.4% off on one block, ResNet-18's cosine the same 0.99994, and
        # ONNX Runtime 1.43x slower.)
        # Only behind an int8 conv: a conv the simulation keeps fp32 (on `x86`, one reading a
        # signed input through padding) runs in float whatever follows it, and quantizing its
        # branch only moved the sum (measured: SRResNet-style blocks, conv -> BatchNorm added
        # to the block input, every conv fp32: 7.8% of the largest output off the simulation).
        int8_outputs = {
            output for record in records if record.simulated for _, output in record.calls if output
        }
        branch_norms = [
            record for record in records if record.layer_type in program_lib.SKIP_OUTPUT_SCALE_LAYERS
        ] if self.int8_residual_branches else []
        branch_outputs = {
            output: (inputs[0], record.output_thresholds[0])
            for record in branch_norms if record.output_thresholds
            for inputs, output in record.calls
            if inputs and consumers.get(output) and set(consumers[output]) == {"elementwise_add"}
        }
        # Except the branches of a reparameterizable block (RepVGG, MobileOne, PP-LCNetV3's
        # LearnableRepLayer: BatchNorms of convs of one input, and of the input itself, summed):
        # each quantized on its own threshold before the sum, measured on PP-OCRv4's
        # recognizer (random weights) the logit cosine to the simulation fell to 0.864; left
        # float as simulated 0.9986 (abs-max thresholds instead of KL: 0.9935).
        norm_inputs = {output: source for output, (source, _) in branch_outputs.items()}
        summed_with_others = _parallel_branches(self.block, norm_inputs, self.producer, self.readers)
        for output, (source, threshold) in branch_outputs.items():
            if output not in summed_with_others and source in int8_outputs:
                outputs.setdefault(output, threshold)
        # A tensor no op reads (a model output) keeps its value, as the simulation returns
        # it: measured, a KL threshold on a classifier's final Softmax clipped its largest
        # probability from 0.222 to 0.196.
        thresholds = {name: value for name, value in outputs.items() if name in self.readers}
        # Nor does one only the network returns through max-pools (quantized for the pool, it
        # was clipped at its threshold: measured 29% of the largest value off the simulation
        # on conv -> ReLU -> max-pool).
        for name in returned_only_outputs(self.block, thresholds, self.producer):
            thresholds.pop(name, None)
        # A shifted input is quantized for its int8 reader alone (:meth:`_layer_input`).
        for op in self.ops:
            slots = INT8_WEIGHT_OPS.get(op.type)
            record = self.weights.get(op.input(slots[0])[0]) if slots else None
            if record is not None and record.input_shift_response is not None:
                self.shifted.add(op.input(slots[1])[0])
        # A layer kept fp32 reads its input unquantized, as in the simulation; so does a shift.
        # (A matmul of two activations reads its operands per op, :meth:`_activation_matmul`:
        # one the simulation runs in float must not take the scale of an operand an int8
        # matmul quantizes; measured: DeBERTa's query times a constant positional key took
        # the query's Q/DQ off the int8 query x key matmul, 1.4e-2 of the largest output off.)
        unscale_fp32_layer_inputs(
            self.block, thresholds,
            lambda op: op.input(INT8_WEIGHT_OPS[op.type][0])[0] in self.weights
            or (op.type == "matmul_v2" and not self._is_param(op.input("Y")[0])),
            fp32_inputs=list(self.shifted),
        )
        # Inputs of int8 ops: the layer's own input threshold wins, as in the dygraph model.
        for op in self.ops:
            slots = INT8_WEIGHT_OPS.get(op.type)
            if slots and op.input(slots[0])[0] in self.weights:
                record = self.weights[op.input(slots[0])[0]]
                if record.input_shift_response is not None:
                    continue
                thresholds[op.input(slots[1])[0]] = float(record.input_threshold)
                self.layer_inputs.add(op.input(slots[1])[0])
                if self.unsigned_inputs and record.input_unsigned:
                    self.u8_inputs[op.input(slots[1])[0]] = float(record.input_threshold)
        # A tensor an fp32 layer reads on its codes (quant_residual.ResidualCodesInput): u8 on
        # the grid of that layer's threshold, as for an int8 reader.
        for record in records:
            if record.simulated or not record.residual_codes:
                continue
            for inputs, _ in record.calls:
                if inputs and inputs[0] not in self.u8_inputs:
                    thresholds[inputs[0]] = float(record.input_threshold)
                    self.u8_inputs[inputs[0]] = float(record.input_threshold)
        self._align_through_layout_ops(thresholds)
        self._align_concat_inputs(thresholds)
        # An int8 pool quantizes its input itself, on the grid of its input threshold; any
        # other average pool averages floats, as simulated: a ReLU's own threshold in front
        # of it rounded twice (measured: adaptive pool of a 14x14 map to 7x7, logit cosine to
        # the simulation 0.99973).
        for op in self.ops:
            if op.type == "pool2d" and op.attr("pooling_type") == "avg":
                source = op.input("X")[0]
                readers = self.readers.get(source, [])
                if op.output("Out")[0] in self.int8_pools:
                    if len(readers) == 1:
                        thresholds.pop(source, None)
                elif source not in self.layer_inputs and all(
                    reader.type == "pool2d" and reader.attr("pooling_type") == "avg"
                    and reader.output("Out")[0] not in self.int8_pools for reader in readers
                ):
                    thresholds.pop(source, None)
                    self.u8_inputs.pop(source, None)
        # Both inputs of a matmul of two activations, signed as in the simulation.
        for record in records:
            if record.multiplies_inputs:
                for inputs, _ in record.calls:
                    pairs = zip(inputs[:2], (record.input_threshold, record.second_input_threshold))
                    for name, threshold in pairs:
                        thresholds[name] = float(threshold)
                        self.u8_inputs.pop(name, None)
        return thresholds

    def _align_through_layout_ops(self, thresholds: dict[str, float]) -> None:
        """Gives the tensors in front of an int8 layer's input, through ops that only move or
        select values (flatten, reshape, transpose, max-pool) and read by nothing else, that
        input's quantization: the simulation quantizes once, with the layer's threshold, where
        the producer's own output threshold would quantize twice (measured: conv -> ReLU ->
        flatten -> Linear 4.3% off with KL thresholds, 0.9% with abs-max)."""
        for name in list(self.u8_inputs) + [n for n in thresholds if n not in self.u8_inputs]:
            if name not in self.u8_inputs and name in self.affine:
                continue
            if name in self.u8_inputs and self._coded_up_to_255(name):
                # The simulation holds it on codes up to 255 (an identity shortcut read from a
                # max-pool of an fp32 conv's ReLU): its int8 reader's clip at 127 stays after
                # the pool (measured: 0.28-2.1% of the largest logit off with it in front).
                continue
            if name in self.fetched:
                # The network returns it unquantized (:meth:`_returned`): quantized in front
                # of the layout op, the returned value would be too (measured: conv -> ReLU ->
                # max-pool, the pool returned and read by an int8 conv, 10.6% of the largest
                # value off the simulation).
                continue
            if name in self.layer_inputs and name not in self.coded_residuals and any(
                reader.type in _ELEMENTWISE_OPS or reader.type in self.float_op_types
                for reader in self.readers.get(name, [])
            ):
                # Another reader computes with its float value (:meth:`_elementwise_operand`,
                # :meth:`_tensor`), which codes in front of the layout op would take from it
                # (measured, target arm: a ConvNeXt block's input transposed from a LayerNorm
                # for its depthwise conv and read by its residual add, 0.98% of the largest
                # output off).
                continue
            if name not in self.coded_residuals and not all(
                self._quantizes_on_its_grid(reader, name) for reader in self.readers.get(name, [])
            ):
                # Another reader takes its values as they are (a max-pool branch beside the
                # conv, both reading a stem's max-pool: Inception's pool projection), which codes
                # in front of the layout op would reach too (measured: clipped at the conv's
                # threshold below the branch's, 4.2% of the largest output off).
                continue
            source = name
            while True:
                op = self.producer.get(source)
                if op is None or op.type not in _LAYOUT_OPS or (
                    op.type == "pool2d" and op.attr("pooling_type") != "max"
                ) or (op.type == "max_pool2d_with_index" and self.readers.get(op.output("Mask")[0])):
                    # A max-pool whose positions are read (by a max-unpool) picks them from the
                    # float values, as the simulation does: on codes, equal maxima of a window
                    # pick another position (ENet: 6 of 2048 positions, 7.7% of the largest
                    # output off).
                    break
                source = op.input("X")[0]
                if (
                    len(self.readers.get(source, [])) != 1 or source in self.shifted
                    or source in self.fetched or source in self.int8_pools
                ):
                    # (An int8 head pool's output keeps its own grid (:meth:`_pool`): the
                    # reader's clip stays after the layout op.)
                    break
                thresholds[source] = thresholds[name]
                self.affine.pop(source, None)
                if name in self.layer_inputs:
                    self.layer_inputs.add(source)
                if name in self.u8_inputs:
                    self.u8_inputs[source] = self.u8_inputs[name]
                else:
                    self.u8_inputs.pop(source, None)

    def _quantizes_on_its_grid(self, reader: Any, name: str) -> bool:
        """Whether ``reader`` is an int8 conv/fc reading ``name`` as its quantized input."""
        slots = INT8_WEIGHT_OPS.get(reader.type)
        return bool(slots) and reader.input(slots[0])[0] in self.weights and reader.input(slots[1]) == [name]

    def _align_concat_inputs(self, thresholds: dict[str, float]) -> None:
        """Quantizes a concat's inputs only as the simulation does: on the grid of the concat's
        own quantization (its int8 reader's input), or not at all. The simulation rounds a
        concat once, where its reader quantizes it; an input's own output threshold (a ReLU
        layer's, read only by the concat) rounded it twice (measured: ShuffleNetV2 x1.0 at
        32x32, ONNX Runtime's logit cosine to the simulation 0.950).

        An input with no threshold of its own (a ReLU conv's output read only by the concat:
        SqueezeNet's fire modules) gets the concat's u8 grid where int8 layers alone read the
        concat (:meth:`_read_only_on_its_grid`): clipping and rounding commute with a concat,
        and with a QuantizeLinear after it ONNX Runtime runs the conv writing it as
        ``QLinearConv`` instead of a float Conv on a weight dequantized every run (measured:
        SqueezeNet 1.1, 17 of its 26 convs float before).
        """
        for op in self.ops:
            if op.type != "concat":
                continue
            out = op.output("Out")[0]
            for source in op.input("X"):
                if (
                    source in self.layer_inputs or len(self.readers.get(source, [])) != 1
                    or source in self.shifted or source in self.fetched
                ):
                    continue
                if source not in thresholds:
                    if (
                        source not in self.coded and source not in self.affine
                        and out in self.u8_inputs and out in thresholds and out not in self.affine
                        and out not in self.fetched and self._read_only_on_its_grid(out, thresholds)
                    ):
                        thresholds[source] = thresholds[out]
                        self.u8_inputs[source] = self.u8_inputs[out]
                    continue
                if out in thresholds and out not in self.affine and out not in self.fetched:
                    thresholds[source] = thresholds[out]
                    if out in self.u8_inputs:
                        self.u8_inputs[source] = self.u8_inputs[out]
                    else:
                        self.u8_inputs.pop(source, None)
                    if out in self.layer_inputs:
                        self.layer_inputs.add(source)
                else:
                    del thresholds[source]
                    self.u8_inputs.pop(source, None)

    def _read_only_on_its_grid(self, name: str, thresholds: Mapping[str, float]) -> bool:
        """Whether every reader of ``name`` quantizes it on its grid: an int8 conv/fc reading
        it as its input, or a max-pool (or layout op) whose output has the same threshold and
        is read only that way."""
        readers = self.readers.get(name, [])
        for reader in readers:
            if self._quantizes_on_its_grid(reader, name):
                continue
            if reader.type not in _LAYOUT_OPS or (
                reader.type == "pool2d" and reader.attr("pooling_type") != "max"
            ) or reader.type == "max_pool2d_with_index":
                return False
            out = reader.output("Out")[0]
            if thresholds.get(out) != thresholds.get(name) or out in self.fetched or not self._read_only_on_its_grid(
                out, thresholds
            ):
                return False
        return bool(readers)

    def _unique(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}__{self.counter}"

    def _const(self, stem: str, value: np.ndarray) -> str:
        name = self._unique(stem)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def _int4_const(self, stem: str, codes: np.ndarray) -> str:
        """An INT4 initializer of ``codes`` (in -8..7), packed two per byte, the first of each
        pair in the low nibble, as ONNX stores INT4 (written as raw bytes, which every onnx
        release with INT4 reads, whatever its numpy helpers support)."""
        name = self._unique(stem)
        nibbles = (codes.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        packed = nibbles[0::2] | (nibbles[1::2] << 4)
        self.initializers.append(self.helper.make_tensor(
            name, self.onnx.TensorProto.INT4, list(codes.shape), packed.tobytes(), raw=True
        ))
        return name

    def _quantized_weight(
        self,
        weight_name: str,
        weight: np.ndarray,
        record: LayerRecord,
        axis: int,
        factor: np.ndarray | None = None,
        unsigned: bool = False,
        dequantized: bool = False,
        restorable: bool = True,
    ) -> tuple[str, np.ndarray]:
        """The ``DequantizeLinear`` of a calibrated layer's weight, and its per-channel scales.

        ``weight`` is the traced one (what the simulation computes with), ``axis`` its channel
        axis (conv 0, matmul ``[in, out]`` 1); ``factor`` multiplies a conv's channels (a folded
        BatchNorm), values and thresholds alike, so the integers stay the layer's up to sign.

        With INT4 storage on (``self.int4_weights``) a layer of at most 4 bits stores its own
        codes ``-L..L`` at scale ``t / L``, packed two per byte. Else int8: the codes of the
        traced weight on its grid (on the x86 targets the 8-bit requantization Paddle computes
        and the simulation follows; otherwise the layer's own codes, ``-L..L`` below 8 bits),
        stored as uint8 about zero point 128 where ``unsigned`` (an input whose codes pass 127:
        :meth:`_input_codes_pass_127`) and they are large enough to saturate.

        ``dequantized``: store the int8 grid's values as a float32 constant instead, the
        product ``DequantizeLinear`` computes (for a layer ONNX Runtime runs in float; noted
        in ``float_stored_filters`` where ``restorable``: the int8 storage comes back where a
        QuantizeLinear follows, see :meth:`_keep_float_filters_from_requantization`). INT4
        storage, where it applies, is kept.
        """
        factor = np.ones([weight.shape[axis]], np.float32) if factor is None else factor
        int4 = self.int4_weights and record.weight_bits <= 4
        shape = [1] * weight.ndim
        shape[axis] = -1
        if int4:
            if record.grid_weight is not None:
                # Conv1D: the traced conv2d weight is the unsqueezed [out, in, 1, k].
                values = np.reshape(record.grid_weight, weight.shape)
                scale, integers = _weight_codes(values, record.grid_thresholds, record.weight_bits, factor, shape)
            else:
                scale, integers = _weight_codes(weight, record.weight_thresholds, record.traced_weight_bits, factor, shape)
            if not np.allclose(
                np.clip(integers, -8, 7) * scale.reshape(shape), weight * factor.reshape(shape),
                rtol=0, atol=1e-6 * max(float(np.abs(weight * factor.reshape(shape)).max()), 1e-30),
            ):
                # The x86 targets compute with the 8-bit requantization Paddle's fc and oneDNN
                # derive (measured: a Linear 3.2e-3 of the largest output off the simulation
                # in INT4, 1.7e-7 stored as int8); the int8 codes hold it exactly.
                self.int4_inexact.append(record.name)
                int4 = self.int4_required
        if int4:
            # No zero point: symmetric codes, and the DequantizeLinear output is float either way.
            stored = self._int4_const(weight_name, np.clip(integers, -8, 7).astype(np.int8))
            inputs = [stored, self._const("w_scale", scale)]
            dequantized = self._node("DequantizeLinear", inputs, weight_name + ".dq", axis=axis)
            self.int4_stored.add(dequantized)
            return dequantized, scale
        scale, integers = _weight_codes(weight, record.weight_thresholds, record.traced_weight_bits, factor, shape)
        # -128 too: a Linear's weight as Paddle's oneDNN fc runs it can hold it.
        codes = np.clip(integers, -128, 127).astype(np.int8)
        if dequantized:
            stored = self._const(weight_name, codes.astype(np.float32) * scale.reshape(shape))
            if restorable:
                self.float_stored_filters[stored] = (weight_name, weight, record, axis, factor, unsigned)
            return stored, scale
        if unsigned:
            codes, zeros = weight_codes_and_zero(codes, scale.shape)
        else:
            zeros = np.zeros(scale.shape, np.int8)
        stored, zero = self._const(weight_name, codes), self._const("w_zero", zeros)
        inputs = [stored, self._const("w_scale", scale), zero]
        return self._node("DequantizeLinear", inputs, weight_name + ".dq", axis=axis), scale

    def _param(self, name: str) -> np.ndarray:
        return np.array(self.loaded.scope.find_var(name).get_tensor())

    def _is_param(self, name: str) -> bool:
        var = self.block._find_var_recursive(name)
        return var is not None and var.persistable

    def _shape(self, name: str) -> list[int]:
        """The traced shape of program variable ``name`` (-1 for dynamic dimensions)."""
        return [int(d) for d in self.block._find_var_recursive(name).shape]

    def _node(self, op_type: str, inputs: list[str], stem: str, into: list | None = None, **attrs) -> str:
        """Appends an ``op_type`` node (to ``into``, a subgraph's nodes, else the graph's);
        returns its output."""
        out = self._unique(stem)
        (self.nodes if into is None else into).append(self.helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def _bind(self, var: str, tensor: str) -> None:
        """Maps a program variable to its ONNX tensor, adding Q/DQ when it has a threshold
        (and first putting a tensor the simulation holds on codes on them)."""
        threshold = self.thresholds.get(var)
        producer = self.producer.get(var)
        codes = self.coded.get(var)
        if codes is not None and not (
            producer is not None and producer.type in ("relu", "relu6")
            and self.u8_inputs.get(var) == codes[0] and threshold
        ):
            # (A ReLU quantized on the codes' grid gets them below, from its own QuantizeLinear.)
            tensor = self._on_codes(tensor, *codes, var)
            self.coded_values[var] = tensor
        if threshold is None or threshold <= 0:
            self.names[var] = tensor
            return
        self.unquantized[var] = tensor
        levels = self.levels
        if var in self.unsigned and var in self.layer_inputs and var not in self.affine:
            # A non-negative int8-layer input on a signed target (arm): the simulation's codes
            # 0..L of ``t / L`` are those of the u8 form below.
            self.u8_inputs.setdefault(var, threshold)
        if var in self.u8_inputs:
            # Codes 0..L up to the threshold, clipped there as the simulation does (codes
            # above 127 could also saturate u8 x s8 pair sums on a CPU without VNNI).
            threshold = self.u8_inputs[var]
            scale, zero = threshold / levels, 0
            if producer is not None and producer.type in ("relu", "relu6"):
                # A Clip between a conv and its Q stops ONNX Runtime from fusing QLinearConv
                # (measured: 1 of 3 convs fused). So the conv's output is quantized on the
                # grid first (codes up to 255, fused into QLinearConv) and its uint8 codes
                # clipped at 127, one pass over bytes (a float DequantizeLinear -> Clip ->
                # QuantizeLinear made ONNX Runtime's MobileNetV2 1.8x slower).
                s = self._const("scale", np.array(scale, dtype=np.float32))
                z = self._const("zero_point", np.array(zero, dtype=np.uint8))
                top = self.coded.get(var, (threshold, 0))[1]
                clipped_at_threshold = not (var in self.residuals or var in self.wide or top == U8_MAX)
                if producer.type == "relu6" and clipped_at_threshold and threshold <= RELU6_CLIP:
                    # Codes clipped at the threshold, which lies within the ReLU6's 6: the
                    # codes of its input are the same, and ONNX Runtime drops a Relu before a
                    # QuantizeLinear itself but not a Clip at 6 whose output the Q range
                    # passes (a threshold above 3: 255 codes of t / 127 reach 2 t), so the
                    # conv before it ran in float (a ReLU6 with no float reader is then dead:
                    # _without_dead_nodes).
                    tensor = self.names.get(producer.input("X")[0], tensor)
                codes = self._node("QuantizeLinear", [tensor, s, z], var + ".q")
                self.scales[var] = (scale, zero)
                if var in self.residuals or var in self.wide or top == U8_MAX:
                    unclipped = self._node("DequantizeLinear", [codes, s, z], var + ".unclipped.dq")
                    self.unclipped[var] = unclipped
                    if top == U8_MAX:
                        self.coded_values[var] = unclipped
                    if var in self.wide:
                        # A ReLU after a residual conv: its readers read codes up to 255, as
                        # in Paddle Inference and the simulation.
                        self.names[var] = unclipped
                        return
                # (Below 8 bits a projection block's sum is held on codes up to 127 of t / L,
                # beyond L, which its readers read: measured, a 7-bit downsample block before
                # a 1x1 conv clipped at L, 0.28 of the largest output off the simulation.)
                highest = top if var in self.coded and levels < top < U8_MAX else levels
                bounds = [self._const(name, np.array(value, np.uint8))
                          for name, value in (("min", 0), ("max", highest))]
                codes = self._node("Clip", [codes, *bounds], var + ".clip")
                self.names[var] = self._node("DequantizeLinear", [codes, s, z], var + ".dq")
                if var in self.coded and top != U8_MAX:
                    self.coded_values[var] = self.names[var]
                return
            elif not (
                producer is not None and producer.type in _LAYOUT_OPS
                and self.u8_inputs.get(producer.input("X")[0]) == threshold
                and var not in self.pooled_unclipped
            ) and not (
                producer is not None and producer.type == "concat"
                and all(self.u8_inputs.get(name) == threshold for name in producer.input("X"))
            ):
                # (A max-pool or reshape of a tensor clipped on the same grid needs no clip,
                # and without one ONNX Runtime runs it on uint8.)
                tensor = self._clip(tensor, 0.0, threshold, var)
        elif var in self.affine:
            scale, zero = self.affine[var]
        elif var in self.unsigned:
            scale, zero = threshold / 255.0, 0
        else:
            scale, zero = threshold / levels, 128
            # (A residual output the simulation writes as s8 codes keeps all of -128..127 on
            # its grid, as Paddle Inference's fused conv writes it, below 8 bits too: clipped
            # at -L..L, a 7-bit block with a projection shortcut was 0.10 of the largest
            # output off the simulation in ONNX Runtime.)
            if self.symmetric_signed or (levels < 127 and var not in self.coded_outputs):
                # Code -128 (uint8 0) is off the symmetric grid the simulation rounds to:
                # clipped on the uint8 codes, which keeps the Q/DQ pair fused into QLinear
                # kernels (measured: a Linear reading values below -t, 0.5% of the largest
                # output off the simulation with -128). So is every code beyond -L..L of a
                # grid below 8 bits, on every target.
                self.names[var] = self._qdq(tensor, scale, zero, var, codes=(zero - levels, zero + levels))
                self.scales[var] = (scale, zero)
                return
        self.names[var] = self._qdq(tensor, scale, zero, var)
        self.scales[var] = (scale, zero)

    def _on_codes(self, tensor: str, threshold: float, top: int, stem: str) -> str:
        """``tensor`` on the u8 codes ``0..top`` of ``threshold`` (scale ``t / L``), as the
        simulation holds it (:func:`imperative_ptq.quant_residual.residual_on_codes`)."""
        return self._qdq(
            tensor, threshold / self.levels, 0, stem + ".codes",
            codes=(0, top) if top < U8_MAX else None,
        )

    def _returned(self, var: str) -> str:
        """The ONNX tensor of network output ``var``: what the simulation returns, its codes
        where it holds them, else its float value (a tensor quantized for an int8 reader is
        returned unquantized: that reader reads the Q/DQ branch alone)."""
        if var in self.coded_values:
            return self.coded_values[var]
        if var in self.coded_outputs:
            return self.names[var]
        return self.unquantized.get(var, self.names[var])

    def _clip(self, tensor: str, low: float, high: float, stem: str) -> str:
        """``Clip(tensor, low, high)``."""
        bounds = [self._const(name, np.array(value, np.float32))
                  for name, value in (("min", low), ("max", high))]
        return self._node("Clip", [tensor, *bounds], stem + ".clip")

    def _identity_clip(self, tensor: str, stem: str) -> str:
        """A ``Clip`` of ``tensor`` to the whole float range: it computes nothing, but no ONNX
        Runtime fusion or QDQ propagation crosses it."""
        largest = float(np.finfo(np.float32).max)
        return self._clip(tensor, -largest, largest, stem)

    def _qdq(
        self, tensor: str, scale: float, zero: int, stem: str,
        codes: tuple[int, int] | None = None,
    ) -> str:
        """``DequantizeLinear(QuantizeLinear(tensor))`` with a uint8 zero point, the uint8
        codes first clipped to ``codes`` (low, high) when given."""
        s = self._const("scale", np.array(scale, dtype=np.float32))
        z = self._const("zero_point", np.array(zero, dtype=np.uint8))
        q = self._node("QuantizeLinear", [tensor, s, z], stem + ".q")
        if codes is not None:
            bounds = [self._const(name, np.array(value, np.uint8)) for name, value in zip(("min", "max"), codes)]
            q = self._node("Clip", [q, *bounds], stem + ".clip")
        return self._node("DequantizeLinear", [q, s, z], stem + ".dq")

    def _out(self, op, slot: str = "Out") -> str:
        return op.output(slot)[0]

    def _in(self, op, slot: str = "X") -> str:
        return self._tensor(op, op.input(slot)[0])

    def _tensor(self, op, name: str, float_reader: bool | None = None) -> str:
        """The ONNX tensor of program variable ``name``, an input of ``op`` (a persistable
        variable, e.g. a registered buffer, becomes an initializer); ``float_reader``: whether
        ``op`` computes in float (by default, whether its type always does)."""
        if name not in self.names and self._is_param(name):
            self.names[name] = self._const(name, self._param(name))
        if name not in self.names:
            raise ValueError(f"{op.type}: input {name!r} is not produced by a converted op")
        if float_reader is None:
            float_reader = op.type in self.float_op_types or (
                op.type in _VALUE_PASSING_OPS and self._passes_on_another_grid(op, name)
            )
        if float_reader and name in self.coded:
            # A tensor the simulation holds on codes for every reader (a block output a fused
            # conv writes): a float op reads them too, up to 255 (measured: a sigmoid of a
            # block output beside its int8 reader read the float sum, 1.3e-2 of the largest
            # output off the simulation).
            return self.coded_values.get(name, self.names[name])
        if float_reader and name in self.layer_inputs and name not in self.coded_residuals:
            # An int8 layer's input is quantized for that layer alone: an op computing in
            # float beside it (an upsample, an activation) reads the float value, as in the
            # simulation (measured, target arm: an FPN's laterals upsampled from the codes
            # of the 3x3 output convs' inputs, 2.6% of the largest output off).
            return self.unquantized.get(name, self.names[name])
        return self.names[name]

    def _input_codes_pass_127(self, var: str, scale: tuple[float, int]) -> bool:
        """Whether the uint8 codes of int8-layer input ``var`` (on ``scale``) can pass 127.

        ONNX Runtime's x86 kernels without VNNI multiply u8 codes by s8 weights with
        ``vpmaddubsw``, whose int16 pair sums can saturate once codes pass 127: such a layer's
        weights are written as uint8 instead where they can (:func:`weight_codes_and_zero`),
        which every x86 kernel multiplies exactly. Inputs clipped to codes 0..127 (the x86 targets' u8 and
        shifted grids) keep int8 weights, fused into the faster u8 x s8 kernels."""
        if var in self.shifted or self.vnni_only:
            return False  # codes 0..127 (shifted_levels); VNNI kernels sum in int32
        return scale[1] != 0 or var not in self.u8_inputs or var in self.wide

    def _layer_input(self, op, slot: str) -> tuple[str, tuple[float, int] | None]:
        """The input tensor of an int8-capable conv/matmul and its (scale, zero point) when it
        is quantized: a shifted input gets its own Clip / Q / DQ here, which the tensor's
        other readers do not see (in the simulation only this layer quantizes it). A layer
        left fp32 (no calibrated weight) reads the float value, whatever an int8 layer beside
        it quantizes (measured: a conv put back in fp32 by ``keep_fp32`` beside an int8 1x1
        conv on one ReLU, 27% of the largest output off on that conv's codes; two Linear
        layers, 0.3%)."""
        var = op.input(slot)[0]
        slots = INT8_WEIGHT_OPS.get(op.type)  # (none for conv3d)
        record = self.weights.get(op.input(slots[0])[0]) if slots else None
        if record is None:
            return self._tensor(op, var, float_reader=True), None
        tensor = self._tensor(op, var)
        if var not in self.shifted or record.input_shift_response is None:
            own = self._own_grid(var, record)
            if own is not None:
                return own
            return tensor, self.scales.get(var)  # e.g. a padded conv kept fp32 beside it
        # The layer's own grid: two layers shifting one tensor can have two (a Linear also
        # called on a constant calibrated its input threshold on both inputs; measured: its
        # activation call on the grid of another reader of that tensor, 6e-2 off).
        scale, zero = float(record.input_scale), int(record.input_zero_point)
        key = (var, scale, zero)
        if key not in self._shifted_tensors:
            levels = shifted_levels(record.activation_bits)
            self._shifted_tensors[key] = (
                self._qdq(tensor, scale, zero, var + ".shifted", codes=(0, levels))
                if not self.exact_shifts or self._written_by_int8_conv(var) or self._sum_with_a_conv_output(var)
                else self._shifted_qdq(tensor, scale, zero, levels, var)
            )
        return self._shifted_tensors[key], (scale, zero)

    def _sum_with_a_conv_output(self, var: str) -> bool:
        """Whether ``var`` is a residual add's sum of which one operand is an int8 conv's
        output (a linear bottleneck's block output read by the next expand conv): as for a
        conv's output, ONNX Runtime's sum is not the simulation's to the last bit, so the
        exact float32 form of :meth:`_shifted_qdq` buys nothing for it, and a plain
        ``QuantizeLinear`` saves its Add and Mul."""
        writer = self.producer.get(var)
        if var not in self.shifted or writer is None or writer.type != "elementwise_add":
            return False
        operands = [writer.input(slot)[0] for slot in ("X", "Y")]
        return not any(self._is_param(name) for name in operands) and any(
            self._written_by_int8_conv(name) for name in operands
        )

    def _written_by_int8_conv(self, var: str) -> bool:
        """Whether ``var`` is an int8 conv's output, behind the bias add and BatchNorm that
        :meth:`_conv` absorbs into it."""
        writer = self.producer.get(var)
        for absorbed in ("batch_norm", "elementwise_add"):  # as _conv absorbs them, backwards
            if writer is not None and writer.type == absorbed:
                source = writer.input("X")[0]
                if absorbed == "elementwise_add" and not self._is_param(writer.input("Y")[0]):
                    return False  # a residual add: the sum is no conv's output
                if len(self.readers.get(source, [])) != 1 or source in self.fetched:
                    return False
                writer = self.producer.get(source)
        return writer is not None and writer.type in _CONV_OPS and writer.input("Filter")[0] in self.weights

    def _conv_to_shifted_conv(self, var: str) -> bool:
        """Whether ``var`` is an int8 conv's output (its bias add and BatchNorm absorbed) read
        by one int8 conv alone, on a shifted grid (a linear bottleneck's projection read by
        the next block's expand conv). That reader quantizes it with a plain
        ``QuantizeLinear(x, s, z)``, clipped to ``0..M`` (:meth:`_layer_input`), so the
        writing conv is written for ONNX Runtime to fuse into a ``QLinearConv`` whose codes
        the reader takes: it ran in float before, followed by the Add and Mul of
        :meth:`_shifted_qdq`, whose float32 arithmetic (Paddle Inference's) buys nothing
        there, as ONNX Runtime's conv output is not the simulation's to the last bit anyway
        (both differ at rounding ties only)."""
        readers = self.readers.get(var, [])
        if var not in self.shifted or var in self.fetched or len(readers) != 1:
            return False
        reader = readers[0]
        record = self.weights.get(reader.input("Filter")[0]) if reader.type in _CONV_OPS else None
        if record is None or record.input_shift_response is None:
            return False
        return self._written_by_int8_conv(var)

    def _own_grid(self, var: str, record: LayerRecord) -> tuple[str, tuple[float, int]] | None:
        """The Q/DQ of ``var`` on ``record``'s input threshold, where the tensor's Q/DQ is on
        another int8 reader's: a layer called on several tensors calibrates one threshold
        on them all (measured: a detection head shared by two pyramid levels, the first also
        read by a strided conv of another threshold; ONNX Runtime ran the head on the conv's
        grid, 3e-2 of the largest output off). ``None`` where the tensor's grid is the
        layer's, or the tensor is held on codes of its own (a residual, an int8 pool's)."""
        threshold = float(record.input_threshold)
        if (
            var not in self.layer_inputs or self.thresholds.get(var) == threshold
            or var in self.coded or var in self.affine or var in self.wide
            or var in self.coded_residuals or var not in self.unquantized
        ):
            return None
        levels = self.levels
        if var in self.u8_inputs or (self.unsigned_inputs and record.input_unsigned):
            scale, zero, codes = threshold / levels, 0, (0, levels)
        else:
            scale, zero = threshold / levels, 128
            codes = (zero - levels, zero + levels) if self.symmetric_signed or levels < 127 else None
        key = (var, scale, zero)
        if key not in self._own_grids:
            self._own_grids[key] = self._qdq(self.unquantized[var], scale, zero, var + ".own", codes=codes)
        return self._own_grids[key], (scale, zero)

    def _shifted_qdq(self, tensor: str, scale: float, zero: int, levels: int, stem: str) -> str:
        """The shifted input's codes as Paddle Inference and the simulation compute them,
        ``clip(rint(float32(x + c) * k), 0, M)`` (:func:`imperative_ptq.shifted_input.shifted_codes`):
        an ``Add`` and a ``Mul`` in float32, a ``QuantizeLinear`` of scale 1 (which rounds
        ``x / 1`` exactly; ``QuantizeLinear(x, s, z)`` rounds ``x / s``, other codes near
        ties), the codes clipped to ``0..M``, and a ``DequantizeLinear`` on the grid. (Not for
        an int8 conv's output or a sum with one: :meth:`_conv_to_shifted_conv`.)"""
        shifted = self._node("Add", [tensor, self._const("shift", np.array(shift_value(scale, zero)))], stem + ".shift")
        scaled = self._node("Mul", [shifted, self._const("multiplier", np.array(shifted_multiplier(scale)))],
                            stem + ".multiplied")
        unit = self._const("unit_scale", np.array(1.0, np.float32))
        codes = self._node("QuantizeLinear", [scaled, unit, self._const("zero_point", np.array(0, np.uint8))], stem + ".q")
        bounds = [self._const(name, np.array(value, np.uint8)) for name, value in (("min", 0), ("max", levels))]
        codes = self._node("Clip", [codes, *bounds], stem + ".clip")
        grid = [self._const("scale", np.array(scale, np.float32)), self._const("zero_point", np.array(zero, np.uint8))]
        return self._node("DequantizeLinear", [codes, *grid], stem + ".dq")

    # --------------------------------------------------------------------------- converters
    def _conv(self, op) -> None:
        weight_name = op.input("Filter")[0]
        if not self._is_param(weight_name):
            # A weight computed in the graph (F.conv2d on a standardized weight, as x2paddle
            # writes a Conv, or on a filter computed from the input): a float Conv on it, as
            # the simulation and Paddle Inference run it, reading the float value of an input
            # an int8 layer beside it quantizes (measured: 0.31 of the largest output off
            # reading that layer's codes).
            attrs = self._conv_attributes(op, self._shape(weight_name)[2:])
            out = self._out(op, "Output")
            inputs = [self._tensor(op, name, float_reader=True) for name in (op.input("Input")[0], weight_name)]
            self._bind(out, self._node("Conv", inputs, out, **attrs))
            return
        weight = self._param(weight_name).astype(np.float32)
        out = self._out(op, "Output")
        bias = np.zeros([weight.shape[0]], dtype=np.float32)
        # Absorb the bias add and a BatchNorm that reads nothing else (the network returning
        # the conv's output reads it too: it was left unconverted, a failed export).
        readers = self.readers.get(out, [])
        absorbed = []
        if len(readers) == 1 and out not in self.fetched and readers[0].type == "elementwise_add" and self._is_param(
            readers[0].input("Y")[0]
        ) and len(self._param(readers[0].input("Y")[0]).shape) == 1:
            add = readers[0]
            bias = bias + self._param(add.input("Y")[0]).reshape(-1)
            absorbed.append(add)
            out = self._out(add)
            readers = self.readers.get(out, [])
        factor = np.ones_like(bias)
        beta_completed = False  # a BatchNorm without beta, given zeros by the export
        if len(readers) == 1 and out not in self.fetched and readers[0].type == "batch_norm":
            bn = readers[0]
            beta_completed = bn.input("Bias")[0] == f"{bn.input('Mean')[0]}.bias"
            gamma, beta = self._param(bn.input("Scale")[0]), self._param(bn.input("Bias")[0])
            mean, var = self._param(bn.input("Mean")[0]), self._param(bn.input("Variance")[0])
            factor, bias = batch_norm_factor_and_bias(bias, mean, var, gamma, beta, bn.attr("epsilon"))
            absorbed.append(bn)
            out = self._out(bn, "Y")
        record = self.weights.get(weight_name)
        x, x_scale = self._layer_input(op, "Input")  # (conv3d: always fp32, no int8 kernel in either runtime)
        attrs = self._conv_attributes(op, list(weight.shape[2:]))
        self.skip.update(id(a) for a in absorbed)
        if x_scale is None:
            w = self._const(weight_name, weight * factor.reshape([-1] + [1] * (weight.ndim - 1)))
            self._bind(out, self._node("Conv", [x, w, self._const("bias", bias.astype(np.float32))], out, **attrs))
            return
        unsigned = self._input_codes_pass_127(op.input("Input")[0], x_scale)
        float_run = not self._quantized_after(out)
        # ONNX Runtime fuses a QLinearConv only where a QuantizeLinear (perhaps behind a Relu)
        # follows the conv; elsewhere (before a Swish or Hardswish, a float multiply, as the
        # network's output) it runs a float Conv on the dequantized input and weight. A
        # spatial filter of few values per output channel (a depthwise conv, a stem conv over
        # an RGB image) is then stored as the float32 values DequantizeLinear computes: a
        # constant weight lets ONNX Runtime prepack it into its blocked float kernels, where a
        # dequantized one took its generic path (measured at batch 8 on MobileNetV3-small,
        # `x86-vnni`: its nine 5x5 depthwise convs before Hardswish 1.2-2.7 ms each; the
        # whole model 1.7x faster with them constant, for 0.16 MB more than the int8 file's
        # 2.56 MB). 1x1 filters (a plain GEMM either way) and larger ones keep int8 storage:
        # dense 3x3 convs before SiLU made a YOLO-style net's file 3.1x larger for 1.2x its
        # int8 speed, still slower than its fp32.
        # (Not in a loop's or branch's body: _keep_float_filters_from_requantization
        # sees the main graph only.)
        float_stored = (
            float_run and weight[0].size <= _FLOAT_STORED_FILTER_VALUES and weight[0, 0].size > 1
            and self.block.idx == 0
        )
        # A dense conv over a single input channel (a grayscale stem: LeNet's, an MNIST net's)
        # runs in float even where a QuantizeLinear follows: ONNX Runtime's QLinearConv there
        # took 2.3-4.7x the time of its float Conv on the same values (one thread, Zen 5:
        # 1 -> 6 channels 5x5 at 28x28, batch 64, 2.79 vs 0.59 ms; 1 -> 32 3x3, 2.18 vs 0.95
        # ms), while an RGB stem was 0.7-1.8x either way. The filter is stored as the values
        # DequantizeLinear computes and the input stays the simulation's codes, so the float
        # Conv computes the simulation's sums; a Clip in front keeps ONNX Runtime from
        # quantizing the filter again (_keep_float_filters_from_requantization).
        single_channel = (
            weight.ndim == 4 and weight.shape[1] == 1 and op.attr("groups") == 1 and self.block.idx == 0
        )
        w, w_scale = self._quantized_weight(
            weight_name, weight, record, 0, factor, unsigned, float_stored or single_channel,
            restorable=not single_channel,
        )
        b_scale = bias_grid_steps(x_scale[0], w_scale)
        codes = int32_bias_codes(bias, b_scale)
        bias_after = codes is None
        if not (bias_after or float_run or single_channel) and _off_int32_grid(bias, b_scale):
            if self.biases_on_grid and beta_completed:
                # A bias convert could not move (a BatchNorm with neither beta nor a conv bias
                # to move instead, bias_attr=False on both): added in float after the conv,
                # as the simulation adds it, rather than rounded (measured: 4.5e-3 of the
                # largest output off the simulation); ONNX Runtime runs this conv in float.
                self.float_biases.append(out)
                bias_after = True
            else:
                self.rounded_biases.append(out)
        if bias_after:
            # Also where the bias on the int32 grid of input x weight scales would overflow:
            # a tiny input range (the near-constant features of an untrained head next to a
            # prior-probability bias of -4.6: wrapped to -2**31, every score 0.5), or a
            # near-dead channel (weights or BatchNorm scale ~1e-8 beside a bias of 0.1). The
            # conv runs without it and the bias is added in float after it; a float Conv too,
            # whose bias ONNX Runtime's optimizer quantizes onto that grid itself where the
            # filter comes from a DequantizeLinear, saturating it (measured: 0.41 of the
            # largest output off the simulation).
            sums = self._node("Conv", [x, w], out + ".unbiased", **attrs)
            added = self._const("bias", bias.astype(np.float32).reshape([1, -1] + [1] * (weight.ndim - 2)))
            self._bind(out, self._node("Add", [sums, added], out))
            return
        if float_run or single_channel:
            # (An int32 bias would only add its rounding: measured, conv + BatchNorm + Swish
            # -> conv, 3.4e-3 of the largest output off the simulation on 3% of the outputs;
            # PP-OCRv4's first depthwise conv as x2paddle writes it, read by a multiply,
            # 2.8e-2; exact with the bias in float.)
            self._bind(out, self._node("Conv", [x, w, self._const("bias", bias.astype(np.float32))], out, **attrs))
            return
        b = self._node(
            "DequantizeLinear",
            [self._const("bias", codes.astype(np.int32)),
             self._const("b_scale", b_scale),
             self._const("b_zero", np.zeros_like(b_scale, dtype=np.int32))],
            "bias.dq", axis=0,
        )
        self._bind(out, self._node("Conv", [x, w, b], out, **attrs))

    def _keep_float_filters_from_requantization(self) -> None:
        """Keeps ONNX Runtime from quantizing a float32 filter again.

        ONNX Runtime's optimizer (its weight-bias quantization) quantizes the float32 filter of
        a Conv, ConvTranspose or Gemm that reads a DequantizeLinear and that a QuantizeLinear
        follows, after its own fusions (a constant add, multiply or BatchNorm folded into the
        conv, a Relu or Clip dropped before the QuantizeLinear, the QuantizeLinear moved up
        through layout ops and max-pools), on one per-tensor scale of its own (measured: an
        NHWC stem conv whose BatchNorm stayed a node of its own, 2.3% of the largest output
        off the simulation; a conv kept fp32 by ``keep_fp32`` on a block input held on codes,
        1.1%). A small filter stored in float for speed (``float_stored_filters``) gets its
        int8 storage back there (ONNX Runtime then fuses the conv into ``QLinearConv``); an
        fp32 layer's filter gets a ``Clip`` to the float range in front of its input, which
        computes nothing and is not a DequantizeLinear.
        """
        float_filters = {
            initializer.name for initializer in self.initializers
            if initializer.data_type == self.onnx.TensorProto.FLOAT
        }
        constants = {initializer.name for initializer in self.initializers}
        readers, producers = _node_links(self.nodes)
        for node in self.nodes:
            if node.input and all(name in constants for name in node.input if name):
                constants.update(node.output)  # (in order: ONNX Runtime folds what only constants feed)

        def reaches_quantize(tensor: str) -> bool:
            pending, seen = [tensor], set()
            while pending:
                name = pending.pop()
                if name in seen:
                    continue
                seen.add(name)
                for node in readers.get(name, []):
                    if node.op_type == "QuantizeLinear":
                        return True
                    others = [operand for operand in node.input if operand and operand != name]
                    if node.op_type in _CONV_FUSED_CONSTANT_OPS and not all(o in constants for o in others):
                        continue
                    if node.op_type in _CONV_FUSED_CONSTANT_OPS or node.op_type in _QUANTIZE_CROSSED_OPS:
                        pending.extend(node.output)
            return False

        exposed = [
            node for node in self.nodes
            if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 1
            and node.input[1] in float_filters
            and getattr(producers.get(node.input[0]), "op_type", None) == "DequantizeLinear"
            and reaches_quantize(node.output[0])
        ]
        for node in exposed:
            count = len(self.nodes)
            filter_name = node.input[1]
            if filter_name in self.float_stored_filters:
                node.input[1], _ = self._quantized_weight(*self.float_stored_filters.pop(filter_name))
                self.initializers = [i for i in self.initializers if i.name != filter_name]
            else:
                node.input[0] = self._identity_clip(node.input[0], node.input[0] + ".float")
            self._move_appended_before(node, count)

    def _keep_max_pools_float(self) -> None:
        """Keeps ONNX Runtime from running a max-pool on uint8 codes in NCHW.

        ONNX Runtime moves a max-pool onto codes two ways: it drops a DequantizeLinear ->
        MaxPool -> QuantizeLinear group on one grid (the export keeps a pool's input grid), and
        its QDQ propagation moves a DequantizeLinear that a MaxPool alone reads behind the pool
        when no QuantizeLinear reads the pool. Behind a QLinearConv or QLinearAdd that pool
        then runs in ONNX Runtime's NHWC kernel (ResNet's stem pool; the demo ConvNet's, 0.015
        ms at batch 64); behind anything else (a float Conv, as a grayscale stem is, a concat,
        a Clip of the codes) in a generic NCHW kernel, far slower than its float one (one
        thread, Zen 5, the same values either way: LeNet's 2x2 pool of [64, 6, 28, 28] 1.40 vs
        0.26 ms; a 3x3 stride-2 pool of [8, 64, 112, 112] 39.4 vs 7.1 ms; SqueezeNet's
        [8, 128, 55, 55] 11.3 vs 0.4 ms). There an identity Clip between the DequantizeLinear
        and the pool, and one between the pool and the QuantizeLinear reading it, keep the pool
        in float on the dequantized codes, which a maximum leaves on their grid.
        """
        readers, producers = _node_links(self.nodes)

        def dequantized(name: str) -> bool:
            return getattr(producers.get(name), "op_type", None) == "DequantizeLinear"

        def integer_kernel_output(name: str) -> bool:
            """Whether ``name`` is what a QLinearConv or QLinearAdd will write (its Relu too)."""
            node = producers.get(name)
            if node is not None and node.op_type in ("Relu", "Clip"):
                node = producers.get(node.input[0])
            if node is None:
                return False
            if node.op_type == "Conv":
                return len(node.input) > 1 and dequantized(node.input[0]) and dequantized(node.input[1])
            return node.op_type == "Add" and all(dequantized(operand) for operand in node.input)

        for pool in [node for node in self.nodes if node.op_type == "MaxPool"]:
            pooled = pool.input[0]
            writer = producers.get(pooled)
            after = readers.get(pool.output[0], [])
            quantized_after = bool(after) and all(node.op_type == "QuantizeLinear" for node in after)
            if writer is None or writer.op_type != "DequantizeLinear" or not after or (
                len(readers[pooled]) != 1 and not quantized_after
            ):
                continue
            quantize = producers.get(writer.input[0])
            codes_clipped = quantize is not None and quantize.op_type == "Clip"
            if codes_clipped:
                quantize = producers.get(quantize.input[0])
            if quantize is None or quantize.op_type != "QuantizeLinear" or (
                integer_kernel_output(quantize.input[0]) and not codes_clipped
            ):
                continue
            count = len(self.nodes)
            pool.input[0] = self._identity_clip(pooled, pooled + ".float")
            self._move_appended_before(pool, count)
            if quantized_after:
                out = pool.output[0]
                pool.output[0] = self._unique(out + ".pooled")
                count = len(self.nodes)
                clipped = self._identity_clip(pool.output[0], out + ".float")
                for node in after:
                    node.input[:] = [clipped if name == out else name for name in node.input]
                self._move_appended_before(pool, count, behind=True)

    def _move_appended_before(self, node: Any, count: int, behind: bool = False) -> None:
        """Moves the nodes appended after the first ``count`` in front of ``node`` (right
        behind it with ``behind``)."""
        inserted = self.nodes[count:]
        del self.nodes[count:]
        position = next(i for i, other in enumerate(self.nodes) if other is node) + int(behind)
        self.nodes[position:position] = inserted

    def _quantized_after(self, var: str) -> bool:
        """Whether a QuantizeLinear reads ``var``, directly or behind a ReLU (or the shifted
        one of :meth:`_conv_to_shifted_conv`): where ONNX Runtime can fuse the conv writing it
        into ``QLinearConv``."""
        def quantized(name: str) -> bool:
            return name in self.thresholds or name in self.coded

        return quantized(var) or self._conv_to_shifted_conv(var) or any(
            reader.type in ("relu", "relu6") and quantized(reader.output("Out")[0])
            for reader in self.readers.get(var, [])
        )

    @staticmethod
    def _conv_attributes(op, kernel: list[int]) -> dict[str, Any]:
        """ONNX ``Conv`` attributes of a conv2d / depthwise_conv2d / conv3d op with
        ``kernel``'s size."""
        if op.has_attr("data_format") and op.attr("data_format") in ("NHWC", "NDHWC"):
            raise NotImplementedError(f"{op.type} in {op.attr('data_format')} is not exported")
        pads = onnx_pads(op.attr("paddings"), len(kernel))
        algorithm = op.attr("padding_algorithm") if op.has_attr("padding_algorithm") else "EXPLICIT"
        attrs: dict[str, Any] = dict(
            strides=list(op.attr("strides")), dilations=list(op.attr("dilations")),
            group=int(op.attr("groups")), kernel_shape=[int(k) for k in kernel],
        )
        if algorithm == "SAME":  # Paddle's "SAME" ignores the dilation
            attrs.update(auto_pad="SAME_UPPER", dilations=[1] * len(kernel))
        elif algorithm == "VALID":
            attrs["pads"] = [0] * len(pads)
        else:
            attrs["pads"] = pads
        return attrs

    def _conv_transpose(self, op) -> None:
        """A transposed conv (2-d or 3-d), in float (no runtime has an int8 kernel for it;
        ``convert`` keeps it fp32). Paddle's weight layout ``[in, out / groups, *kernel]`` is
        ONNX's. An ``output_size`` (ENet's upsampling to its encoder's size) becomes the
        ``output_padding`` that reaches it from the traced input size."""
        if op.has_attr("data_format") and op.attr("data_format") in ("NHWC", "NDHWC"):
            raise NotImplementedError(f"{op.type} in {op.attr('data_format')} is not exported")
        if "Bias" in op.input_names and op.input("Bias"):
            raise NotImplementedError(f"{op.type} with a Bias input is not exported")
        weight = self._param(op.input("Filter")[0]).astype(np.float32)
        pads = onnx_pads(op.attr("paddings"), weight.ndim - 2)
        algorithm = op.attr("padding_algorithm") if op.has_attr("padding_algorithm") else "EXPLICIT"
        attrs = dict(
            strides=list(op.attr("strides")), dilations=list(op.attr("dilations")),
            group=int(op.attr("groups")), kernel_shape=list(weight.shape[2:]),
        )
        if list(op.attr("output_padding")):
            attrs["output_padding"] = list(op.attr("output_padding"))
        if list(op.attr("output_size")):
            if algorithm != "EXPLICIT":
                raise NotImplementedError(f"{op.type} with output_size is exported only with explicit padding")
            attrs["output_padding"] = self._transposed_output_padding(op, list(weight.shape[2:]), pads)
        if algorithm == "SAME":
            # A forward conv's pads over its input (dilation ignored): the output is
            # ``(in - 1) * stride + kernel - pads``, not ONNX's ``SAME_UPPER`` ``in * stride``.
            attrs.update(pads=self._traced_same_pads(op, "Input", attrs["strides"], attrs["kernel_shape"]),
                         dilations=[1] * (len(pads) // 2))
        elif algorithm != "VALID":
            attrs["pads"] = pads
        out = self._out(op, "Output")
        w = self._const(op.input("Filter")[0], weight)
        self._bind(out, self._node("ConvTranspose", [self._in(op, "Input"), w], out, **attrs))

    #: The first opset with ``DeformConv``.
    _DEFORM_CONV_OPSET = 19

    def _deformable_conv(self, op) -> None:
        """``paddle.vision.ops.deform_conv2d`` (with a modulation mask: ``deformable_conv``;
        without: ``deformable_conv_v1``) as ONNX's ``DeformConv``, in float (no int8 kernel in
        either runtime): the offsets' layout, ``(dy, dx)`` per kernel point and offset group,
        and the mask's are ONNX's. Its bias is the add after it."""
        self._require_opset(self._DEFORM_CONV_OPSET, f"{op.type} is ONNX's DeformConv")
        weight = self._param(op.input("Filter")[0]).astype(np.float32)
        paddings = list(op.attr("paddings"))
        inputs = [self._in(op, "Input"), self._const(op.input("Filter")[0], weight), self._in(op, "Offset")]
        if "Mask" in op.input_names and op.input("Mask"):
            inputs += ["", self._in(op, "Mask")]
        out = self._out(op, "Output")
        self._bind(out, self._node(
            "DeformConv", inputs, out, strides=list(op.attr("strides")),
            dilations=list(op.attr("dilations")), pads=paddings + paddings,
            group=int(op.attr("groups")), offset_group=int(op.attr("deformable_groups")),
            kernel_shape=list(weight.shape[2:]),
        ))

    def _traced_same_pads(self, op, slot: str, strides: list[int], kernel: list[int]) -> list[int]:
        """The explicit pads of Paddle's ``"SAME"`` padding (:func:`same_pads`) over the input
        in ``slot``, whose spatial size must be known when traced."""
        spatial = self._shape(op.input(slot)[0])[2:]
        if min(spatial, default=-1) < 0:
            raise NotImplementedError(
                f"{op.type} with padding 'SAME' is exported only for an input size known when traced "
                "(give the input_spec static spatial dimensions)"
            )
        return same_pads(spatial, strides, kernel)

    def _transposed_output_padding(self, op, kernel: list[int], pads: list[int]) -> list[int]:
        """The ``output_padding`` by which a transposed conv's default output size,
        ``(in - 1) * stride - pads + dilation * (kernel - 1) + 1``, reaches ``output_size``."""
        spatial = self._shape(op.input("Input")[0])[2:]
        if min(spatial, default=-1) < 0:
            raise NotImplementedError(
                f"{op.type} with output_size is exported only for an input size known when traced"
            )
        strides, dilations = list(op.attr("strides")), list(op.attr("dilations"))
        wanted = [int(d) for d in op.attr("output_size")][-len(spatial):]
        padding = []
        for axis, (size, stride, dilation, k, target) in enumerate(zip(spatial, strides, dilations, kernel, wanted)):
            default = (size - 1) * stride - pads[axis] - pads[axis + len(spatial)] + dilation * (k - 1) + 1
            if not 0 <= target - default < max(stride, dilation):
                raise NotImplementedError(f"{op.type} to output_size {wanted} from {spatial} is not exported")
            padding.append(target - default)
        return padding

    def _matmul(self, op) -> None:
        if not self._is_param(op.input("Y")[0]):
            self._activation_matmul(op)
            return
        weight_name = op.input("Y")[0]
        if op.attr("trans_x") or op.attr("trans_y"):
            if weight_name in self.weights or weight_name in self.dynamic_weights:
                raise NotImplementedError(
                    "matmul_v2 with a quantized weight is exported only as x @ W ([in, out])"
                )
            # x2paddle writes an ONNX Gemm with transB=1 (every exported torch Linear) as
            # matmul(x, W, transpose_y=True); left unquantized, it is a float MatMul.
            self._activation_matmul(op)
            return
        if weight_name in self.dynamic_weights:
            self._dynamic_matmul(op, self.dynamic_weights[weight_name])
            return
        weight = self._param(weight_name).astype(np.float32)
        record = self.weights.get(weight_name)
        x_name = op.input("X")[0]
        if record is not None and record.constant_call_weight is not None and (
            computed_from_parameters(self.block, x_name, self.producer)
        ):
            # A call on a constant, which the simulation runs in float
            # (QuantizedLayer.constant_inputs): so does ONNX Runtime, with that weight.
            x = self.unquantized.get(x_name, self._tensor(op, x_name))
            w = self._const(weight_name + ".constant_call", np.asarray(record.constant_call_weight, np.float32))
            out = self._out(op)
            self._bind(out, self._node("MatMul", [x, w], out))
            return
        x, x_scale = self._layer_input(op, "X")
        out = self._out(op)
        if record is not None and x_scale is not None:
            unsigned = self._input_codes_pass_127(x_name, x_scale)
            w, w_scale = self._quantized_weight(weight_name, weight, record, 1, unsigned=unsigned)
            if w not in self.int4_stored:
                self.integer_matmul_outputs[out] = bias_grid_steps(x_scale[0], w_scale)
        else:
            w = self._const(weight_name, weight)
        self._bind(out, self._node("MatMul", [x, w], out))

    def _activation_matmul(self, op) -> None:
        """A matmul in float: of two activations (attention scores, attention x values; on
        quantize/dequantize pairs where the simulation quantizes its inputs; ``bmm`` too), or
        of an unquantized weight read transposed."""
        operands = []
        int8 = op.output("Out")[0] in self.int8_matmul_outputs
        for slot, flag in (("X", "trans_x"), ("Y", "trans_y")):
            tensor = self._in(op, slot)
            if not int8:  # in float, as simulated, whatever another reader quantizes
                tensor = self.unquantized.get(op.input(slot)[0], tensor)
            if op.has_attr(flag) and op.attr(flag):
                rank = len(self.block._find_var_recursive(op.input(slot)[0]).shape)
                if rank < 2:
                    raise NotImplementedError("matmul_v2 transposing a vector is not exported")
                perm = list(range(rank - 2)) + [rank - 1, rank - 2]
                tensor = self._node("Transpose", [tensor], op.input(slot)[0] + ".t", perm=perm)
            operands.append(tensor)
        out = self._out(op)
        self._bind(out, self._node("MatMul", operands, out))

    def _dynamic_matmul(self, op, weight: DynamicWeight) -> None:
        """ONNX Runtime's dynamic-quantization form of ``x @ W``: ``DynamicQuantizeLinear``
        (uint8, per-batch scale and zero point) -> ``MatMulInteger`` (int32) -> ``Cast`` ->
        ``Mul`` by ``x_scale * w_scale``; ONNX Runtime fuses it into ``DynamicQuantizeMatMul``."""
        x, out = self._in(op), self._out(op)
        quantized, scale, zero = (self._unique(out + suffix) for suffix in (".q", ".s", ".z"))
        self.nodes.append(
            self.helper.make_node("DynamicQuantizeLinear", [x], [quantized, scale, zero])
        )
        # (DynamicQuantizeLinear's codes reach 255: uint8 weights where u8 x s8 saturates.)
        codes, zeros = weight_codes_and_zero(weight.integers, [])
        integers = self._const(op.input("Y")[0] + ".codes", codes)
        weight_zero = self._const("w_zero", zeros)
        accumulated = self._node("MatMulInteger", [quantized, integers, zero, weight_zero], out + ".int32")
        floats = self._node("Cast", [accumulated], out + ".float", to=self.onnx.TensorProto.FLOAT)
        multiplier = self._node(
            "Mul", [scale, self._const("w_scale", weight.scales.astype(np.float32))], out + ".scale"
        )
        self._bind(out, self._node("Mul", [floats, multiplier], out))

    #: Paddle's rnn mode -> (ONNX op, gate permutation from Paddle's row blocks to ONNX's, attrs).
    #: LSTM rows are i, f, c, o (ONNX: i, o, f, c); GRU rows r, z, c (ONNX: z, r, h, with the
    #: reset gate applied after the recurrent matmul, as Paddle does).
    _RNN_MODES = {
        "LSTM": ("LSTM", (0, 3, 1, 2), {}),
        "GRU": ("GRU", (1, 0, 2), {"linear_before_reset": 1}),
        "RNN_TANH": ("RNN", (0,), {"activations": ["Tanh"]}),
        "RNN_RELU": ("RNN", (0,), {"activations": ["Relu"]}),
    }

    def _rnn(self, op) -> None:
        """An LSTM/GRU/SimpleRNN: one ONNX recurrent node per layer (two directions in one
        node), the layers chained; given initial states are sliced per layer, zero ones left
        out (ONNX's recurrent ops start from zeros).

        The weights of a dynamically quantized LSTM run as ``com.microsoft.DynamicQuantizeLSTM``
        (int8 weights, uint8 inputs and hidden states quantized at run time). ONNX Runtime
        has no integer GRU, so a dynamic GRU's weights are stored as int8 initializers and
        turned into the float weights of an ONNX ``GRU`` by ``Cast`` + ``Mul``, which ONNX
        Runtime folds into float initializers when the session is created (it does not fold
        ``DequantizeLinear``, which then ran on every call): a ~4x smaller file, fp32 compute.
        """
        record = self._simulated_lstm_record(op)
        if record is not None:
            self._simulated_lstm(op, record)
            return
        mode = op.attr("mode")
        label = self._rnn_label(op)
        if mode not in self._RNN_MODES:
            raise NotImplementedError(f"{label}: rnn mode {mode!r} is not exported")
        kind, order, attrs = self._RNN_MODES[mode]
        hidden = int(op.attr("hidden_size"))
        directions = 2 if op.attr("is_bidirec") else 1
        if "activations" in attrs:  # one list per direction
            attrs = {**attrs, "activations": attrs["activations"] * directions}
        layers = int(op.attr("num_layers"))
        names = op.input("WeightList")
        cells = layers * directions
        # WeightList: [W_ih, W_hh] per (layer, direction), then [b_ih, b_hh] in the same order.
        matrices, biases = names[: 2 * cells], names[2 * cells:]
        dynamic = [name in self.dynamic_weights for name in matrices]
        if any(dynamic) and not all(dynamic):
            raise NotImplementedError(f"{label}: rnn with only some weights int8 is not exported")
        integer_lstm = all(dynamic) and kind == "LSTM"

        def gates(value: np.ndarray) -> np.ndarray:
            """Paddle's gate blocks (rows) in ONNX's order."""
            blocks = value.reshape(len(order), hidden, *value.shape[1:])
            return blocks[list(order)].reshape(value.shape)

        x = self._in(op, "Input")
        # Paddle's SequenceLength is ONNX's sequence_lens (int32): steps past a row's length
        # give zero outputs and the final states are those of its last step, in both.
        lengths = ""
        if op.input("SequenceLength"):
            lengths = self._node(
                "Cast", [self._in(op, "SequenceLength")], f"{op.output('Out')[0]}.lengths",
                to=self.onnx.TensorProto.INT32,
            )
        final_states: list[list[str]] = [[] for _ in op.output("State")]
        for layer in range(layers):
            first = layer * directions
            own = range(first, first + directions)
            bias = np.stack([
                np.concatenate([gates(self._param(biases[2 * c + k]).astype(np.float32)) for k in (0, 1)])
                for c in own
            ])
            stem = f"{op.output('Out')[0]}.l{layer}"
            # sequence_lens, then initial_h (and initial_c): this layer's rows of Paddle's
            # [layers * directions, batch, hidden] states.
            states = [lengths, *(self._layer_states(op, name, own, stem) for name in op.input("PreState"))]
            if integer_lstm:
                (w, *w_quantization), (r, *r_quantization) = (
                    self._integer_lstm_weight(matrices, own, k, gates) for k in (0, 1)
                )
                states += [""] * (3 - len(states))
                inputs = [x, w, r, self._const("B", bias), *states, "", *w_quantization, *r_quantization]
                node_type, domain = "DynamicQuantizeLSTM", "com.microsoft"
            else:
                inputs = [x, *(self._rnn_weight(matrices, own, k, gates, stem) for k in (0, 1)),
                          self._const("B", bias), *states]
                while inputs[-1] == "":  # trailing optional inputs left out
                    inputs.pop()
                node_type, domain = kind, ""
            outputs = [self._unique(stem + suffix) for suffix in (".y", ".h", ".c")[: 1 + len(final_states)]]
            self.nodes.append(self.helper.make_node(
                node_type, inputs, outputs, hidden_size=hidden, domain=domain,
                direction="bidirectional" if directions == 2 else "forward", **attrs,
            ))
            for states, name in zip(final_states, outputs[1:]):
                states.append(name)
            # Y is [seq, directions, batch, hidden]; Paddle's Out [seq, batch, directions * hidden].
            if directions == 1:
                x = self._node("Squeeze", [outputs[0], self._const("axes", np.array([1], np.int64))], stem + ".out")
            else:
                moved = self._node("Transpose", [outputs[0]], stem + ".moved", perm=[0, 2, 1, 3])
                x = self._node("Reshape", [moved, self._const("shape", np.array([0, 0, -1], np.int64))], stem + ".out")
        self._bind(op.output("Out")[0], x)
        fetched = {var.name for var in self.loaded.fetch_vars}
        for state, parts in zip(op.output("State"), final_states):
            if state not in self.readers and state not in fetched:
                continue  # unused: no Concat to run
            # Paddle's states are [layers * directions, batch, hidden], layer by layer.
            self._bind(state, parts[0] if len(parts) == 1 else self._node("Concat", parts, state, axis=0))

    def _rnn_weight(self, matrices: list[str], cells: range, k: int, gates, stem: str) -> str:
        """The ``[directions, rows, columns]`` W (``k`` 0) or R (``k`` 1) of one layer in ONNX's
        gate order: float32, or for a dynamic RNN int8 codes times their row scales (the
        weights :meth:`DynamicQuantizedRNN.dequantized_rnn` holds)."""
        if matrices[2 * cells[0] + k] not in self.dynamic_weights:
            value = np.stack([gates(self._param(matrices[2 * c + k]).astype(np.float32)) for c in cells])
            return self._const("W" if k == 0 else "R", value)
        weights = [self.dynamic_weights[matrices[2 * c + k]] for c in cells]
        integers = np.concatenate([gates(w.integers) for w in weights]).astype(np.int8)
        scales = np.concatenate([gates(w.scales) for w in weights]).astype(np.float32)
        # One scale per row of every direction: scale [directions * rows, columns] by rows,
        # then shape it [directions, rows, columns].
        floats = self._node(
            "Cast", [self._const("W_int8" if k == 0 else "R_int8", integers)],
            stem + (".w" if k == 0 else ".r"), to=self.onnx.TensorProto.FLOAT,
        )
        dequantized = self._node(
            "Mul", [floats, self._const("w_scale", scales.reshape(-1, 1))],
            stem + (".w_scaled" if k == 0 else ".r_scaled"),
        )
        shape = np.array([len(cells), -1, integers.shape[1]], np.int64)
        return self._node("Reshape", [dequantized, self._const("shape", shape)], stem + (".W" if k == 0 else ".R"))

    def _layer_states(self, op, name: str, cells: range, stem: str) -> str:
        """One layer's rows ``cells`` of the initial state ``name``, or "" for zero states."""
        if name in self.zero_states:
            return ""
        bounds = [self._const(stem, np.array([value], np.int64)) for value in (cells[0], cells[-1] + 1)]
        return self._node(
            "Slice", [self._tensor(op, name), *bounds, self._const("axes", np.array([0], np.int64))],
            stem + ".state",
        )

    def _integer_lstm_weight(self, matrices: list[str], cells: range, k: int, gates) -> tuple[str, str, str]:
        """``DynamicQuantizeLSTM``'s W (``k`` 0) or R (``k`` 1) of one layer: integer codes
        ``[directions, columns, 4 * hidden]`` (the program's ``[rows, columns]`` transposed),
        and per-row scales and zero points ``[directions, 4 * hidden]``."""
        weights = [self.dynamic_weights[matrices[2 * c + k]] for c in cells]
        integers = np.stack([gates(w.integers).T for w in weights])
        scales = np.stack([gates(w.scales) for w in weights]).astype(np.float32)
        role = "W" if k == 0 else "R"
        # (uint8 where u8 x s8 would saturate on AVX2, as for MatMulInteger)
        codes, zeros = weight_codes_and_zero(np.ascontiguousarray(integers), scales.shape)
        return self._const(role, codes), self._const(f"{role}_scale", scales), self._const(f"{role}_zero", zeros)

    def _rnn_label(self, op) -> str:
        """How errors name an rnn op: by its dynamically quantized layer when it is one."""
        for name in op.input("WeightList"):
            if name in self.dynamic_weights:
                layer = self.dynamic_weights[name].layer_name.rsplit(".", 1)[0]
                return f"dynamically quantized {op.attr('mode')} layer {layer!r}"
        return f"rnn op ({op.attr('mode')})"

    def _zero_states(self) -> tuple[set[str], set[int]]:
        """The rnn initial states that are zeros built from the batch size (``shape`` ->
        ``slice`` -> ``fill_constant``), and the ops building them (skipped: ONNX's recurrent
        ops start from zeros)."""
        states, ops = set(), set()
        for op in self.ops:
            if op.type != "rnn":
                continue
            for name in op.input("PreState"):
                writer = self.producer.get(name)
                if writer is None or writer.type != "fill_constant" or writer.attr("value") != 0.0:
                    continue
                if any(reader.type != "rnn" for reader in self.readers.get(name, [])):
                    continue
                states.add(name)
                pending = [writer]
                while pending:
                    builder = pending.pop()
                    ops.add(id(builder))
                    for slot in builder.input_names:
                        for source in builder.input(slot):
                            feeder = self.producer.get(source)
                            if feeder is not None and feeder.type in ("fill_constant", "slice", "shape"):
                                pending.append(feeder)
        return states, ops

    def _elementwise_operand(self, op, slot: str) -> str:
        """What an elementwise op reads of its input ``slot`` in the simulation. An int8
        layer's input is quantized for that layer alone, so an add or multiply that also reads
        it reads the float value (a residual block whose sum no calibrated layer reads, such as
        an inverted-residual block's, or a squeeze-excite gate; measured: an expand -> depthwise
        -> project block with its identity add, largest error 31% of the output with the
        clipped codes); an identity shortcut the simulation stores as codes
        (:mod:`imperative_ptq.quant_residual`), and a tensor it holds on codes for every
        reader, are read on those codes (up to 255 unclipped)."""
        var = op.input(slot)[0]
        tensor = self._in(op, slot)
        if op.type == "elementwise_add" and var in self.residuals:
            # (A max-pool output on codes up to 255 has them before its reader's clip.)
            return self.unclipped.get(var, self.coded_values.get(var, tensor))
        if var in self.coded:
            # A tensor the simulation holds on codes for every reader (a block output a fused
            # conv writes), also added to another branch (HRNet's fuse layers add it to an
            # upsampled one; measured: the float value there, 1e-2 of the largest output off
            # the simulation, 0.023-0.065 on a random-weight HRNet-W18-small).
            return self.coded_values.get(var, tensor)
        if var in self.layer_inputs and var not in self.coded_residuals:
            return self.unquantized.get(var, tensor)
        return tensor

    def _elementwise(self, op) -> None:
        kind = _ELEMENTWISE_OPS[op.type]
        y_var = op.input("Y")[0]
        x = self._elementwise_operand(op, "X")
        if self._is_param(y_var):
            value = self._param(y_var)
            if np.issubdtype(value.dtype, np.floating):
                value = value.astype(np.float32)  # (an integer buffer keeps its type: index offsets)
            axis = op.attr("axis")
            x_rank = len(self.block._find_var_recursive(op.input("X")[0]).shape)
            if axis not in (-1, x_rank - value.ndim):
                value = value.reshape(list(value.shape) + [1] * (x_rank - axis - value.ndim))
            y = self._const(y_var, value)
        else:
            y = self._elementwise_operand(op, "Y")
        out = self._out(op)
        product = op.input("X")[0]
        if numpy_dtype(self.block._find_var_recursive(product).dtype) == np.bool_:
            if kind not in _BOOL_ELEMENTWISE_OPS:
                raise NotImplementedError(f"{op.type} of bool tensors (writing {out}) is not exported")
            kind = _BOOL_ELEMENTWISE_OPS[kind]
        if kind == "Add" and self._is_param(y_var) and product in self.integer_matmul_outputs:
            if self._integer_matmul_in_float(product, out):
                kind = "Sum"
            else:
                # ONNX Runtime fuses it into a QGemm, which rounds the bias onto its int32 grid.
                if _off_int32_grid(self._param(y_var).reshape(-1), self.integer_matmul_outputs[product]):
                    self.rounded_biases.append(out)
        self._bind(out, self._node(kind, [x, y], out))

    def _integer_matmul_in_float(self, product: str, out: str) -> bool:
        """Whether the constant add writing ``out`` is the bias of an int8 Linear whose output
        ONNX Runtime computes in float (before a GELU, a Hardswish or a residual add, or as
        the network's logits): it is then written as ``Sum``, which ONNX Runtime leaves alone.
        As an ``Add`` its optimizer fuses it with the MatMul into a ``Gemm`` (for a 2-D input
        or a static shape) before it looks at the QDQ pairs, and then runs that Gemm in float
        on a weight dequantized on every run, where a MatMul reading the same pairs becomes
        ``MatMulIntegerToFloat`` (int8 kernels, the float output scaled from the int32 sums).
        Measured, ONNX Runtime 1.32, one thread: a Linear(576, 1024) at batch 1 0.72 ms as a
        Gemm, 0.013 ms as MatMulIntegerToFloat + Sum (0.030 ms with a float32 weight). A
        Linear whose output is quantized keeps its ``Add``: it fuses into ``QGemm``."""
        return product in self.integer_matmul_outputs and (out in self.fetched or not self._quantized_after(out))

    def _pool(self, op) -> None:
        """pool2d / pool3d, and max_pool2d/3d_with_index (``nn.AdaptiveMaxPool2D``,
        ``return_mask``): global, adaptive (windows when the input size divides by the output
        size, else :meth:`_uneven_adaptive_pool`) or windowed. A mask read or returned becomes
        the ``Indices`` of a windowed ``MaxPool`` (:meth:`_max_pool`)."""
        with_index = op.type in ("max_pool2d_with_index", "max_pool3d_with_index")
        kind = "max" if with_index else op.attr("pooling_type")
        if op.has_attr("data_format") and op.attr("data_format") in ("NHWC", "NDHWC"):
            raise NotImplementedError(f"{op.type} in {op.attr('data_format')} is not exported")
        mask_readers = self.readers.get(op.output("Mask")[0], []) if with_index else []
        global_pool = op.attr("global_pooling") or op.attr("adaptive") and all(k == 1 for k in op.attr("ksize"))
        if (mask_readers or with_index and op.output("Mask")[0] in self.fetched) and global_pool:
            raise NotImplementedError(
                f"{op.type} whose Mask is read or returned is exported only windowed (or adaptive "
                "over an evenly divided input)"
            )
        ksize = list(op.attr("ksize"))
        out = self._out(op)
        source = self._in(op)
        name = op.input("X")[0]
        if kind == "avg" and out not in self.int8_pools and self._quantized_for_another_reader(name):
            # A float average pool reads its input in float, as in the simulation, though an
            # int8 reader beside it had it quantized (measured: a ReLU of an int8 conv read by
            # an int8 conv and a squeeze-excite pool, 1.9% of the largest output off).
            source = self.unquantized.get(name, source)
        if op.attr("global_pooling") or (op.attr("adaptive") and all(k == 1 for k in ksize)):
            if kind == "avg" and out in self.int8_pools:
                # The mean of u8 codes on the input threshold's grid (codes up to 255, not
                # clipped), rounded half to even like QuantizeLinear, on the same grid
                # (imperative_ptq.quant_pool); the reader quantizes it with its own threshold.
                scale = self.int8_pools[out] / self.levels
                pooled = self._in(op)
                top = self.int8_pool_tops.get(out, U8_MAX)
                if top < U8_MAX:
                    pooled = self._clip(pooled, 0.0, scale * top, out)
                codes = self._qdq(pooled, scale, 0, out + ".codes")
                mean = self._node("GlobalAveragePool", [codes], out + ".mean")
                self.names[out] = self._qdq(mean, scale, 0, out)
                return
            node = self._node("GlobalMaxPool" if kind == "max" else "GlobalAveragePool", [source], out)
        elif op.attr("adaptive"):
            spatial = self._adaptive_input_size(op, ksize)
            if kind == "max":
                self._keep_input_scale(op, out)
            if any(i % o for i, o in zip(spatial, ksize)):
                node = self._uneven_adaptive_pool(kind, source, spatial, ksize, out)
            else:
                window = [i // o for i, o in zip(spatial, ksize)]
                attrs = dict(kernel_shape=window, strides=window, pads=[0] * (2 * len(window)))
                node = (
                    self._max_pool(op, source, out, attrs) if kind == "max"
                    else self._node("AveragePool", [source], out, **attrs)
                )
        else:
            attrs = dict(kernel_shape=ksize, strides=list(op.attr("strides")))
            algorithm = op.attr("padding_algorithm") if op.has_attr("padding_algorithm") else "EXPLICIT"
            if algorithm == "SAME":  # ceil(in / stride) positions, an odd padding at the end
                attrs["auto_pad"] = "SAME_UPPER"
            elif algorithm == "VALID":
                attrs["pads"] = [0] * (2 * len(ksize))
            else:
                attrs.update(pads=onnx_pads(op.attr("paddings"), len(ksize)), ceil_mode=int(op.attr("ceil_mode")))
            if kind == "max":
                name = op.input("X")[0]
                pools_float = self._pools_float(name, out)
                if not pools_float:
                    self._keep_input_scale(op, out)
                if name in self.unclipped and self._coded_up_to_255(name):
                    # A ReLU the simulation holds on codes up to 255, clipped at 127 for an
                    # int8 conv reading it too: the pool reads the codes (DLA's max-pool
                    # shortcut: 4.1% of the largest logit off while it read the clipped ones),
                    # and its own int8 readers clip its output.
                    pooled = self.unclipped[name]
                    self.pooled_unclipped.add(out)
                elif pools_float:
                    pooled = self.unquantized[name]
                else:
                    pooled = self._in(op)
                node = self._max_pool(op, pooled, out, attrs)
            else:
                node = self._average_pool(op, source, out, attrs)
        self._bind(out, node)

    def _max_pool(self, op, pooled: str, out: str, attrs: dict[str, Any]) -> str:
        """A windowed ``MaxPool`` of ``pooled``; for max_pool2d/3d_with_index whose ``Mask``
        is read or returned, one writing the values and their ``Indices``. Those count
        positions over the whole NCHW tensor, which ``MaxUnpool`` reads (:meth:`_unpool`, ENet's
        and SegNet's decoders); Paddle's mask counts them within each channel's plane (int32),
        which every other reader and the network's output get: the indices modulo the plane's
        size."""
        mask = op.output("Mask")[0] if op.type in ("max_pool2d_with_index", "max_pool3d_with_index") else None
        readers = self.readers.get(mask, []) if mask else []
        if mask is None or not (readers or mask in self.fetched):
            return self._node("MaxPool", [pooled], out, **attrs)
        node, indices = self._unique(out), self._unique(mask)
        self.nodes.append(self.helper.make_node("MaxPool", [pooled], [node, indices], **attrs))
        self.pool_indices[mask] = self.names[mask] = indices
        if mask in self.fetched or any(reader.type != "unpool" for reader in readers):
            shape = self._node("Shape", [pooled], mask + ".shape")
            spatial = self._slice_node(shape, 0, 2, 2 + len(attrs["kernel_shape"]), mask + ".spatial")
            plane = self._node("ReduceProd", [spatial], mask + ".plane", keepdims=1)
            within = self._node("Mod", [indices, plane], mask + ".within")
            self.names[mask] = self._node("Cast", [within], mask + ".int32", to=self.onnx.TensorProto.INT32)
        return node

    def _average_pool(self, op, source: str, out: str, attrs: dict[str, Any]) -> str:
        """A windowed average pool. Paddle's CPU kernel pads each axis by its begin padding on
        both sides (the end padding only sizes the output): an inclusive pool
        (``exclusive=False``) divides by a window's positions up to that, so where the end
        padding is wider (``"SAME"`` with an odd total, ``[0, 1]``), the last window's extra
        padding does not count (measured: 12% of the largest output off while it did). The
        input gets the begin padding on both sides as zeros it counts, and the pool the rest
        as padding it does not."""
        if op.attr("exclusive"):
            return self._node("AveragePool", [source], out, count_include_pad=0, **attrs)
        rank = len(attrs["kernel_shape"])
        if attrs.get("auto_pad") == "SAME_UPPER":
            attrs = {key: value for key, value in attrs.items() if key != "auto_pad"}
            attrs["pads"] = self._traced_same_pads(op, "X", attrs["strides"], attrs["kernel_shape"])
        begins, ends = attrs["pads"][:rank], attrs["pads"][rank:]
        if begins == ends:
            return self._node("AveragePool", [source], out, count_include_pad=1, **attrs)
        if any(end < begin for begin, end in zip(begins, ends)):
            raise NotImplementedError(
                f"{op.type} averaging with exclusive=False and paddings {op.attr('paddings')} "
                "(an end padding narrower than the begin one) is not exported"
            )
        zeros = self._const("pads", np.array([0, 0, *begins, 0, 0, *begins], np.int64))
        padded = self._node("Pad", [source, zeros], out + ".padded", mode="constant")
        attrs = dict(attrs, pads=[0] * rank + [end - begin for begin, end in zip(begins, ends)])
        return self._node("AveragePool", [padded], out, count_include_pad=0, **attrs)

    def _unpool(self, op) -> None:
        """unpool (``F.max_unpool2d``, NCHW): ``MaxUnpool`` of the values at the ``Indices``
        of the max-pool that wrote them, to ``output_size`` where given, else to Paddle's
        (and ONNX's) default ``(in - 1) * stride - 2 * pad + kernel``."""
        if op.attr("unpooling_type") != "max" or op.attr("data_format") != "NCHW":
            raise NotImplementedError("unpool is exported only as a max-unpool of NCHW")
        paddings = [int(p) for p in op.attr("paddings")]
        attrs = dict(kernel_shape=[int(k) for k in op.attr("ksize")], strides=[int(s) for s in op.attr("strides")],
                     pads=paddings + paddings)
        out = self._out(op)
        inputs = [self._in(op), self.pool_indices.get(op.input("Indices")[0]) or self._in(op, "Indices")]
        size = [int(d) for d in op.attr("output_size")] if op.has_attr("output_size") else []
        if size:
            leading = self._slice_node(self._node("Shape", [inputs[0]], out + ".shape"), 0, 0, 2, out + ".leading")
            shape = self._node("Concat", [leading, self._const("size", np.array(size[-2:], np.int64))], out + ".size", axis=0)
            inputs.append(shape)
        self._bind(out, self._node("MaxUnpool", inputs, out, **attrs))

    def _pools_float(self, source: str, out: str) -> bool:
        """Whether a max-pool of ``source`` reads its float value, not the codes an int8
        layer beside it reads.

        The simulation's pool reads the float value unless it holds ``source`` on codes for
        every reader; quantizing commutes with a max only on one grid, so codes on another
        layer's grid are right only when the pool's output is quantized on the same one
        (measured: a DLA tree's max-pool shortcut to a projection conv, its input clipped
        at the threshold of the block's first conv, 33% of the largest pooled value off the
        simulation and 9.9% of the block's output)."""
        return (
            self._quantized_for_another_reader(source) and source in self.unquantized
            and self.thresholds.get(out) != self.thresholds.get(source)
        )

    def _passes_on_another_grid(self, op, name: str) -> bool:
        """Whether value-passing ``op`` hands ``name``'s values to readers that the simulation
        does not quantize on ``name``'s grid (a float op, or an int8 layer of another
        threshold), where ``name`` is held on codes for its int8 reader alone (not an int8
        pool's output, which the simulation writes on codes)."""
        return name not in self.int8_pools and name not in self.coded and (
            _changes_values(op)
            or any(self.thresholds.get(out) != self.thresholds.get(name) for out in op.output("Out"))
        )

    def _quantized_for_another_reader(self, name: str) -> bool:
        """Whether ``name`` is quantized for an int8 layer reading it, on codes the
        simulation does not hold it on for its other readers (a pool beside that layer reads
        the float value)."""
        return name in self.layer_inputs and name not in self.coded_residuals and name not in self.coded

    def _adaptive_input_size(self, op, sizes: list[int]) -> list[int]:
        """The spatial size an adaptive pool reads, known when traced (else not exported)."""
        spatial = self._shape(op.input("X")[0])[2:]
        if len(spatial) != len(sizes) or min(spatial) < 0:
            raise NotImplementedError(
                f"adaptive {op.type} from {spatial} to {list(sizes)} is not exported: its input "
                f"size must be known when traced (give the input_spec static spatial dimensions)"
            )
        return spatial

    def _uneven_adaptive_pool(
        self, kind: str, x: str, spatial: list[int], sizes: list[int], stem: str
    ) -> str:
        """An adaptive pool whose bins differ in length, one spatial axis after the other.

        Paddle's bin ``i`` of an axis spans ``floor(i * in / out) .. ceil((i + 1) * in / out)``
        (:func:`adaptive_bins`). A window's maximum is the maximum of its rows' maxima: per
        axis, a ``Gather`` of each bin's positions (short bins repeat their last one) and a
        ``ReduceMax``. A window's mean is the mean of its rows' means: per axis, a ``MatMul``
        with the ``[out, in]`` matrix of ``1 / length`` over each bin (a 3-d pool's depth
        axis is transposed last for it and back).
        """
        pooled = x
        rank = 2 + len(spatial)
        for offset, (length, size) in enumerate(zip(spatial, sizes)):
            axis = 2 + offset
            starts, ends = adaptive_bins(length, size)
            positions = np.arange(length)
            if kind == "max":
                window = starts[:, None] + np.arange(int((ends - starts).max()))[None, :]
                indices = np.minimum(window, ends[:, None] - 1).astype(np.int64)
                gathered = self._node(
                    "Gather", [pooled, self._const("bins", indices)], f"{stem}.bins{axis}", axis=axis
                )
                pooled = self._reduce_node("ReduceMax", gathered, [axis + 1], False, f"{stem}.max{axis}")
                continue
            inside = (positions[None, :] >= starts[:, None]) & (positions[None, :] < ends[:, None])
            means = (inside / (ends - starts)[:, None]).astype(np.float32)  # [out, in]
            if axis == rank - 1:  # [..., in] @ [in, out]
                pooled = self._node("MatMul", [pooled, self._const("means", means.T)], f"{stem}.mean{axis}")
            elif axis == rank - 2:  # [out, in] @ [..., in, W] (the height)
                pooled = self._node("MatMul", [self._const("means", means), pooled], f"{stem}.mean{axis}")
            else:  # the depth: swapped with the last axis, [..., in] @ [in, out], swapped back
                perm = list(range(rank))
                perm[axis], perm[-1] = perm[-1], perm[axis]
                swapped = self._node("Transpose", [pooled], f"{stem}.swap{axis}", perm=perm)
                pooled = self._node("MatMul", [swapped, self._const("means", means.T)], f"{stem}.mean{axis}")
                pooled = self._node("Transpose", [pooled], f"{stem}.unswap{axis}", perm=perm)
        return pooled

    def _keep_input_scale(self, op, out: str) -> None:
        """A max-pool or a reshape outputs some of its input's values: quantized with the
        input's parameters, the DQ -> op -> Q around it cancel and ONNX Runtime runs the op
        on uint8 (with a threshold of its own, it dequantizes and runs it in float)."""
        source = op.input("X")[0]
        if source in self.scales and self.thresholds.get(out):
            self.affine[out] = self.scales[source]

    def _simple(self, op) -> None:
        out = self._out(op)
        if op.type in ("flatten_contiguous_range", "reshape2", "transpose2", "pixel_unshuffle", "pixel_shuffle"):
            self._keep_input_scale(op, out)
        x = self._in(op)
        if op.type == "relu6":
            node = self._node("Clip", [x, self._const("min", np.array(0, np.float32)),
                                       self._const("max", np.array(6, np.float32))], out)
        elif op.type == "flatten_contiguous_range":
            node = self._flatten(op, x, out)
        elif op.type == "reshape2":
            if op.input("Shape") or op.input("ShapeTensor"):  # e.g. [x.shape[0], n, -1]
                shape = self._shape_tensor(op, "Shape", "ShapeTensor", out)
            else:
                shape = self._const("shape", np.array(op.attr("shape"), np.int64))
            node = self._node("Reshape", [x, shape], out)
        elif op.type == "transpose2":
            node = self._node("Transpose", [x], out, perm=[int(a) for a in op.attr("axis")])
        elif op.type == "pixel_unshuffle":
            node = self._pixel_unshuffle(op, x, out)
        elif op.type == "pixel_shuffle":
            if op.attr("data_format") != "NCHW":
                raise NotImplementedError("pixel_shuffle is exported only for NCHW")
            # Paddle's out[c, h r + i, w r + j] = in[c r r + i r + j, h, w]: ONNX's CRD order.
            node = self._node("DepthToSpace", [x], out, blocksize=int(op.attr("upscale_factor")), mode="CRD")
        elif op.type == "dropout":
            if op.attr("dropout_implementation") == "downgrade_in_infer":
                factor = self._const("keep", np.array(1.0 - op.attr("dropout_prob"), np.float32))
                node = self._node("Mul", [x, factor], out)
            else:
                node = self._node("Identity", [x], out)
        elif op.type == "scale":
            # In the input's dtype: Paddle casts the factors to an integer input's type
            # (``paddle.ones(shape, "int64") * task_id`` in ERNIE 3.0; a float Mul on int64 is
            # no valid ONNX).
            dtype = numpy_dtype(self.block._find_var_recursive(op.input("X")[0]).dtype)
            dtype = dtype if np.issubdtype(dtype, np.integer) else np.float32
            scale = self._const("scale", np.array(op.attr("scale")).astype(dtype))
            bias = self._const("bias", np.array(op.attr("bias")).astype(dtype))
            if op.attr("bias_after_scale"):
                node = self._node("Add", [self._node("Mul", [x, scale], out + ".mul"), bias], out)
            else:
                node = self._node("Mul", [self._node("Add", [x, bias], out + ".add"), scale], out)
        else:  # pragma: no cover - guarded by the dispatch table
            raise NotImplementedError(op.type)
        self._bind(out, node)

    def _flatten(self, op, x: str, out: str) -> str:
        """flatten_contiguous_range as a ``Reshape``: the axes before ``start_axis`` kept
        (``0``), the range merged (``-1``), the axes after ``stop_axis`` at their traced sizes.
        (ONNX's ``Flatten`` always makes a matrix: right only for ``start_axis=1`` up to the
        last axis, wrong for a ViT's ``flatten(2)``.)"""
        shape = self._shape(op.input("X")[0])
        rank = len(shape)
        start, stop = (int(a) % rank if rank else 0 for a in (op.attr("start_axis"), op.attr("stop_axis")))
        after = shape[stop + 1:]
        if any(d < 0 for d in after):
            raise NotImplementedError(
                "flatten is exported only when the axes after stop_axis have traced sizes"
            )
        target = np.array([0] * start + [-1] + after, np.int64)
        return self._node("Reshape", [x, self._const("shape", target)], out)

    def _pixel_unshuffle(self, op, x: str, out: str) -> str:
        """Paddle's channel order is ``c * r * r + i * r + j`` (ONNX ``SpaceToDepth`` puts the
        block offset first), so: reshape to blocks, move the offsets next to the channel,
        reshape back."""
        if op.attr("data_format") != "NCHW":
            raise NotImplementedError("pixel_unshuffle is exported only for NCHW")
        r = int(op.attr("downscale_factor"))
        _, channels, height, width = self.block._find_var_recursive(op.input("X")[0]).shape
        blocks = self._const("shape", np.array([0, channels, height // r, r, width // r, r], np.int64))
        moved = self._node(
            "Transpose", [self._node("Reshape", [x, blocks], out + ".blocks")], out + ".moved",
            perm=[0, 1, 3, 5, 2, 4],
        )
        folded = self._const("shape", np.array([0, channels * r * r, height // r, width // r], np.int64))
        return self._node("Reshape", [moved, folded], out)

    def _concat(self, op) -> None:
        if op.input("AxisTensor"):
            raise NotImplementedError("concat with a tensor axis is not exported")
        out = self._out(op)
        inputs = [self._concat_operand(op, name, out) for name in op.input("X")]
        self._bind(out, self._node("Concat", inputs, out, axis=int(op.attr("axis"))))

    def _concat_operand(self, op, name: str, out: str) -> str:
        """What a concat reads of its input ``name`` in the simulation: the float value where
        the tensor is quantized for another int8 layer reading it (its own threshold, not the
        concat's grid; measured: a ReLU output read by a 1x1 conv and by a concat that a conv
        reads, largest error 14% of the output with the conv's clipped codes); the tensor as
        bound where it is on the concat's own grid (:meth:`_align_concat_inputs`); the codes
        the simulation holds a tensor on for every reader (an identity shortcut, up to 255)
        where it does (measured: DLA's tree root concatenating its first block's output,
        the second block's identity, clipped at code 127 for that block's first conv: 15% of
        the largest concatenated value off the simulation)."""
        tensor = self._tensor(op, name)
        if name in self.coded_values:
            return self.coded_values[name]
        if (
            name in self.layer_inputs and name not in self.coded_residuals
            and self.thresholds.get(name) != self.thresholds.get(out)
        ):
            return self.unquantized.get(name, tensor)
        return tensor

    def _split(self, op) -> None:
        if op.input("AxisTensor") or op.input("SectionsTensorList"):
            raise NotImplementedError("split with tensor sections or axis is not exported")
        source = op.input("X")[0]
        axis = int(op.attr("axis"))
        shape = self.block._find_var_recursive(source).shape
        sections = list(op.attr("sections"))
        outputs = op.output("Out")
        x = self._in(op)
        if not sections and shape[axis] >= 0:
            sections = [shape[axis] // len(outputs)] * len(outputs)
        if sections and all(size >= 0 for size in sections):
            split = self._const("split", np.array(sections, np.int64))
        else:
            # An axis whose size the trace left open (a reshape to [b, t, heads, -1] on a
            # dynamic batch: rotary embeddings' halves), or a -1 section: sizes read from
            # the tensor's shape at run time.
            stem = outputs[0] + ".split"
            size = self._node("Gather", [self._node("Shape", [x], stem + ".shape"),
                                         self._const("axis", np.array([axis], np.int64))], stem + ".size")
            if not sections:
                part = self._node("Div", [size, self._const("parts", np.array([len(outputs)], np.int64))], stem + ".part")
                split = self._node("Concat", [part] * len(outputs), stem + ".sizes", axis=0)
            else:
                known = self._const("known", np.array([sum(v for v in sections if v >= 0)], np.int64))
                rest = self._node("Sub", [size, known], stem + ".rest")
                split = self._node("Concat", [
                    rest if v < 0 else self._const("section", np.array([v], np.int64)) for v in sections
                ], stem + ".sizes", axis=0)
        names = [self._unique(out) for out in outputs]
        self.nodes.append(self.helper.make_node("Split", [x, split], names, axis=axis))
        for out, name in zip(outputs, names):
            if source in self.unsigned:
                self.unsigned.add(out)
            self._bind(out, name)

    def _squeeze(self, op) -> None:
        out = self._out(op)
        self._keep_input_scale(op, out)
        kind = "Squeeze" if op.type == "squeeze2" else "Unsqueeze"
        axes = [int(a) for a in op.attr("axes")]
        tensors = [name for slot in ("AxesTensor", "AxesTensorList") if slot in op.input_names
                   for name in op.input(slot)]
        if kind == "Unsqueeze" and tensors:
            # Axes in a parameter or a constant (x2paddle writes ONNX's Unsqueeze so from
            # opset 13 on, e.g. every BERT's attention mask).
            values = [self._param(name) if self._is_param(name) else self.constants.get(name) for name in tensors]
            if any(value is None for value in values):
                raise NotImplementedError("unsqueeze2 with axes computed in the graph is not exported")
            axes = [int(axis) for value in values for axis in np.ravel(value)]
        inputs = [self._in(op)] + ([self._const("axes", np.array(axes, np.int64))] if axes else [])
        self._bind(out, self._node(kind, inputs, out))

    def _main_output(self, op) -> str:
        """The output variable of ``op`` (``Out``, or ``Y``/``Output`` for ops naming it so)."""
        for slot in ("Out", "Y", "Output"):
            if slot in op.output_names and op.output(slot):
                return op.output(slot)[0]
        return op.output(op.output_names[0])[0]

    def _output_unsigned(self, op) -> bool:
        """Whether ``op``'s output is known non-negative (quantized with zero point 0): after
        a non-negative op, or a sign-preserving one of non-negative inputs."""
        if op.type in _NON_NEGATIVE_OPS:
            return True
        if op.type == "pow":  # an even power; any power of a non-negative input
            factor = float(op.attr("factor"))
            return (factor.is_integer() and factor % 2 == 0) or op.input("X")[0] in self.unsigned
        if op.type in ("clip", "brelu"):
            low, high = (
                (float(op.attr("t_min")), float(op.attr("t_max"))) if op.type == "brelu"
                else (self._clip_bound(op, "Min", "min"), self._clip_bound(op, "Max", "max"))
            )
            return (low is not None and low >= 0) or (
                op.input("X")[0] in self.unsigned and high is not None and high >= 0
            )
        if op.type in ("pad", "pad3d"):  # reflect/replicate copy values; constant adds one
            value = float(op.attr("pad_value" if op.type == "pad" else "value"))
            constant = op.type == "pad" or op.attr("mode") == "constant"
            return op.input("X")[0] in self.unsigned and (value >= 0 or not constant)
        if op.type == "thresholded_relu":
            return op.input("X")[0] in self.unsigned and float(op.attr("value")) >= 0
        if op.type == "fill_any_like":
            return float(op.attr("value")) >= 0
        if op.type in ("concat", "stack", "sum"):
            return all(name in self.unsigned for name in op.input("X"))
        if op.type == "elementwise_min":  # a ReLU output under non-negative bounds
            y = op.input("Y")[0]  # (cross-layer equalization's ReLU6)
            return op.input("X")[0] in self.unsigned and self._is_param(y) and self._param(y).min() >= 0
        return op.type in _SIGN_PRESERVING_OPS and op.input("X")[0] in self.unsigned

    def _location(self, op) -> str:
        """Where ``op`` is, for errors: the calibrated layer writing its output (else that
        output variable) and what it reads."""
        outputs = [name for slot in op.output_names for name in op.output(slot)]
        owner = next((self.layer_of[name] for name in outputs if name in self.layer_of), None)
        where = f"in layer {owner!r}" if owner else f"writing {outputs[0]!r}" if outputs else "no output"
        inputs = [name for slot in op.input_names for name in op.input(slot) if not self._is_param(name)]
        if inputs:
            source = inputs[0]
            where += (
                f", reading the output of layer {self.layer_of[source]!r}" if source in self.layer_of
                else f", reading {source!r}"
            )
        return where

    # ------------------------------------------------------------------------------- driver
    def convert(self, opset: int):
        onnx = self.onnx
        self.opset = opset
        dispatch = {
            "conv2d": self._conv, "depthwise_conv2d": self._conv, "matmul_v2": self._matmul,
            "bmm": self._activation_matmul, "pool2d": self._pool,
            "max_pool2d_with_index": self._pool, "unpool": self._unpool, "concat": self._concat,
            "conv3d": self._conv, "pool3d": self._pool, "max_pool3d_with_index": self._pool,
            "conv2d_transpose": self._conv_transpose, "depthwise_conv2d_transpose": self._conv_transpose,
            "conv3d_transpose": self._conv_transpose,
            "deformable_conv": self._deformable_conv, "deformable_conv_v1": self._deformable_conv,
            "split": self._split,
            "squeeze2": self._squeeze, "unsqueeze2": self._squeeze, "rnn": self._rnn,
            **dict.fromkeys(_ELEMENTWISE_OPS, self._elementwise),
            **dict.fromkeys(("relu6", "flatten_contiguous_range", "reshape2", "transpose2",
                             "dropout", "scale", "pixel_unshuffle", "pixel_shuffle"), self._simple),
        }
        dispatch.update(self.float_dispatch())
        dispatch.update(self.spectral_dispatch())
        dispatch.update({
            "while": self._while, "conditional_block": self._conditional_block,
            "select_input": self._select_input, "write_to_array": self._write_to_array,
            "read_from_array": self._read_from_array, "lod_array_length": self._array_length,
            "tensor_array_to_tensor": self._array_to_tensor, "increment": self._increment,
        })
        self.dispatch = dispatch
        self.zero_states, self.skip = self._zero_states()
        inputs = []
        for name, spec in zip(self.loaded.feed_names, self.specs):
            # The batch is one symbol for every input; each other dynamic dimension a symbol
            # of its own (one name for all told shape inference that height = width = batch).
            shape = [
                int(d) if d is not None and d != -1 else "batch" if i == 0 else f"{name}_dim{i}"
                for i, d in enumerate(spec.shape)
            ]
            dtype = self.helper.np_dtype_to_tensor_dtype(
                np.dtype(paddle.base.data_feeder.convert_dtype(spec.dtype))
            )
            inputs.append(self.helper.make_tensor_value_info(name, dtype, shape))
            self._bind(name, name)
        for op in self.ops:
            if id(op) in self.skip:
                continue
            if self._output_unsigned(op):
                self.unsigned.add(self._main_output(op))
            complex_values = self.handles_complex(op)
            convert = dispatch.get(op.type)
            if convert is None and not complex_values:
                raise NotImplementedError(
                    f"op {op.type!r} has no ONNX converter ({self._location(op)}); "
                    f"{_PADDLE_EXPORT_ELSEWHERE}. Ops translated: {', '.join(sorted(dispatch))}"
                )
            try:
                (self.complex_converter(op) if complex_values else convert)(op)
            except NotImplementedError as error:
                raise NotImplementedError(
                    f"{error} ({self._location(op)}); {_PADDLE_EXPORT_ELSEWHERE}"
                ) from error
        outputs = []
        for var in self.loaded.fetch_vars:
            tensor = self._returned(var.name)
            name = var.name.replace(".", "_") + "_out"
            self.nodes.append(self.helper.make_node("Identity", [tensor], [name]))
            shape = [d if d >= 0 else f"{name}_dim{i}" for i, d in enumerate(var.shape)]
            dtype = self.helper.np_dtype_to_tensor_dtype(numpy_dtype(var.dtype))  # arg_max: int
            outputs.append(self.helper.make_tensor_value_info(name, dtype, shape))
        self._keep_float_filters_from_requantization()
        self._keep_max_pools_float()
        self.nodes = _without_dead_nodes(self.nodes, {output.name for output in outputs})
        graph = self.helper.make_graph(self.nodes, "imperative_ptq", inputs, outputs, self.initializers)
        opsets = [self.helper.make_opsetid("", opset)]
        if any(node.domain == "com.microsoft" for node in self.nodes):  # DynamicQuantizeLSTM
            opsets.append(self.helper.make_opsetid("com.microsoft", 1))
        model = self.helper.make_model(graph, opset_imports=opsets, producer_name="imperative_ptq")
        # IR 10 is the first with INT4 and opset 21; 8 otherwise (older runtimes read it).
        model.ir_version = 10 if opset >= INT4_OPSET else min(model.ir_version, 8)
        onnx.checker.check_model(model)
        return model


def _weight_codes(
    values: np.ndarray, thresholds: Any, bits: int, factor: np.ndarray, shape: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel scales ``t / L`` of ``bits``-bit ``thresholds`` (one for every channel, or
    one each) with ``factor`` folded in, and ``values`` (factor folded in too) rounded to them,
    unclipped; ``shape`` broadcasts a channel vector over ``values``."""
    thresholds = np.asarray(thresholds, np.float32).reshape(-1)
    if thresholds.size == 1:
        thresholds = np.full([factor.size], thresholds[0], np.float32)
    scale = folded_weight_scales(thresholds, factor, bits)
    return scale, np.round(values * factor.reshape(shape) / scale.reshape(shape))


def _int4_storage(
    model: paddle.nn.Layer, opset: int, int4_weights: bool | None, dynamic: bool
) -> bool:
    """Whether weights of at most 4 bits are stored as INT4: ``int4_weights`` checked
    against the opset and the model (see :func:`export_onnx`)."""
    if dynamic:
        if int4_weights:
            raise ValueError(
                "int4_weights=True: a quantize_dynamic model's weights feed MatMulInteger, which "
                "takes 8-bit weights only; export it with int4_weights=None or False"
            )
        return False
    if int4_weights is False:
        return False
    narrow = [
        name for name, layer in model.named_sublayers()
        if isinstance(layer, QuantizedLayer) and layer.weight_bits <= 4
    ]
    if int4_weights and opset < INT4_OPSET:
        raise ValueError(
            f"int4_weights=True needs opset >= {INT4_OPSET} (the first whose DequantizeLinear "
            f"reads INT4), got opset={opset}; pass opset={INT4_OPSET}"
        )
    if int4_weights and not narrow:
        raise ValueError(
            "int4_weights=True, but no layer has weights of 4 bits or fewer: calibrate with "
            "PerChannelAbsmaxQuantizer(quant_bits=4) (or 2, 3)"
        )
    if narrow and opset < INT4_OPSET:
        logger.warning(
            "%d layers with weights of <= 4 bits (%s) stored as int8 holding their values: "
            "opset %d has no INT4; pass opset=%d to store them packed two per byte",
            len(narrow), ", ".join(narrow[:5]) + (", ..." if len(narrow) > 5 else ""),
            opset, INT4_OPSET,
        )
        return False
    return bool(narrow)


@main_thread_only
def export_onnx(
    model: paddle.nn.Layer,
    path: str | os.PathLike,
    input_spec: Any = None,
    opset: int = 13,
    int4_weights: bool | None = None,
    int8_residual_branches: bool | None = None,
    exact_shifts: bool = True,
    vnni_only: bool = False,
) -> str:
    """Writes a QDQ ONNX model of a converted model to ``path`` (atomically).

    A model made by :func:`imperative_ptq.quantize_dynamic` is written in ONNX Runtime's
    dynamic form instead: ``DynamicQuantizeLinear`` + ``MatMulInteger`` per dynamic Linear,
    ``com.microsoft.DynamicQuantizeLSTM`` per dynamic LSTM, int8 weights computed in fp32 by
    an ONNX ``GRU`` per dynamic GRU.

    Weights of at most 4 bits are stored as INT4 (two per byte) when ``int4_weights`` allows
    it and ``opset >= 21`` (the first whose ``DequantizeLinear`` reads INT4); other weights,
    and all of them below opset 21, as int8 holding the same values. ONNX Runtime 1.32 runs
    an INT4 matmul weight as ``MatMulNBits`` and an INT4 conv weight as a float ``Conv`` of
    the dequantized weight; int8 weights run in ``QLinearConv``/``QLinearMatMul``.

    Args:
        model: A model converted by ``ImperativePTQ.convert``, or made by ``quantize_dynamic``.
        path: Target file (``.onnx`` is appended if missing); directories are created.
        input_spec: ``paddle.static.InputSpec`` list; ``None`` dimensions stay dynamic.
        opset: ONNX opset (>= 13 for per-channel QDQ, >= 21 for INT4 weights).
        int4_weights: ``None``: INT4 for weights of at most 4 bits where the opset has it (a
            warning names the layers stored as int8 instead below opset 21); ``True``: INT4
            required (``ValueError`` below opset 21 or without such a layer); ``False``: int8.
        int8_residual_branches: Quantize the output of a residual branch's last conv (its
            BatchNorm's, read only by the add) on its calibrated threshold, so that ONNX
            Runtime runs that conv in ``QLinearConv``. The simulation (Paddle Inference's
            fused int8 conv) adds it in float: ``False`` exports that, exact to the
            simulation up to ONNX Runtime's int32 biases, with those convs in float
            (measured on a Xeon at batch 8: ResNet-18 3.1x and MobileNetV2 1.2x slower in
            ONNX Runtime, logit cosines to the simulation within 1e-4 of each other; block
            outputs a ResNet-18 backbone returns 2.0-7.3% of their largest value off the
            simulation with ``True``, 0.5-3.2% with ``False``). The branches of a
            reparameterizable block (BatchNorms of convs of one input, or of that input,
            summed: RepVGG, PP-LCNetV3's LearnableRepLayer) are added in float either way.
            Elsewhere the cost can be larger: PaddleClas's GhostNet (random weights, KL
            thresholds) 0.935 logit cosine to the simulation with ``True``, exact with
            ``False``; PP-OCRv3's DB detector 0.96 against 0.997; export with ``False`` where
            the runtime must compute the simulation.
            ``None`` (the default): ``True`` for 8-bit activations, ``False`` below 8 bits,
            where rounding a branch on the coarse grid is far off the simulation (measured,
            4-bit activations: a residual CNN trained on MNIST 0.917 logit cosine to the
            simulation, further from fp32 than the simulation is; exact with ``False``).
        exact_shifts: On ``x86``, write the shift that puts a signed input of an int8 layer
            on its shifted u8 grid as Paddle Inference and the simulation compute it,
            ``rint(float32(x + c) * k)`` (an Add, a Mul and a QuantizeLinear of scale 1), so
            that a tensor ONNX Runtime computes bit for bit as the simulation (a LayerNorm's
            output) gets the same codes. ``False`` writes every shift as
            ``QuantizeLinear(x, s, z)``, the same codes up to rounding ties, two float ops
            fewer per shifted input (measured on a Zen 5 EPYC: the BERT-shaped encoder of
            ``benchmarks/inference.py`` 1.78x -> 2.08x its fp32 in ONNX Runtime at batch 8,
            1.48x -> 2.14x at batch 1). The shift of an int8 conv's output, or of a residual
            sum with one, which ONNX Runtime never computes bit for bit as the simulation,
            takes the plain form either way.
        vnni_only: The file is for CPUs with VNNI (AVX-512 VNNI, AVX-VNNI, AMX) only, as a
            ``x86-vnni`` model's Paddle program is: a converted model's every 8-bit weight is
            stored int8 (a ``quantize_dynamic`` model's keep their storage), for ONNX
            Runtime's u8 x s8 kernels. By default a layer whose input codes can pass 127 (on
            ``x86-vnni`` and ``arm`` a signed input about zero point 128) stores large weights
            as uint8 about 128, which every x86 CPU multiplies exactly, where u8 x s8 kernels
            without VNNI saturate int16 pair sums, but slower (measured on a Zen 5 EPYC:
            MobileNetV2 on ``x86-vnni`` 1.06x -> 1.40x its fp32 in ONNX Runtime at batch 8, the
            same outputs). A warning where this CPU has no VNNI.

    Returns:
        The path written.

    Raises:
        ImportError: ``onnx`` is not installed.
        TypeError / ValueError: As for ``save_quantized_model``; ``int4_weights`` not a bool
            or ``None``, or ``True`` where it cannot be honoured; ``int8_residual_branches``,
            ``exact_shifts`` or ``vnni_only`` not a bool.
        NotImplementedError: The program contains an op without a converter, or one in a
            form not exported (an adaptive pool of an input size unknown when traced, an
            LSTM/GRU called with sequence lengths, ...): the message names the op, the tensor
            it writes or its calibrated layer, and what it reads. ``save_quantized_model``
            (Paddle Inference) still exports such a model.
    """
    from .paddle_export import check_exportable

    _require_onnx()
    _check_export_options(opset, int4_weights, int8_residual_branches, exact_shifts, vnni_only)
    dynamic = is_dynamic_model(model)
    if dynamic:
        check_dynamic_model(model)
    else:
        check_exportable(model)
    int4 = _int4_storage(model, opset, int4_weights, dynamic)
    specs = normalize_input_spec(input_spec, model)
    path = os.fspath(path) if isinstance(path, (str, os.PathLike)) else path
    if isinstance(path, str) and not path.endswith(".onnx"):
        path += ".onnx"
    directory, stem = export_directory(path)
    path = os.path.join(directory, stem)
    with staged_export(path[: -len(".onnx")], (".onnx",)) as staging:
        if dynamic:
            dynamic_weights = trace_dynamic_model(model, specs, staging + ".fp32")
            records, unsigned_inputs, symmetric_signed = [], False, False
        else:
            traced = trace_to_legacy_program(model, specs, staging + ".fp32", program_weights=False)
            dynamic_weights, records = {}, traced.records
            target = converted_target(model)
            unsigned_inputs = target.unsigned_inputs
            symmetric_signed = signed_input_floor(8, target.onednn) is None
        if int8_residual_branches is None:
            int8_residual_branches = model_activation_bits(records) >= 8
        with legacy_static_mode():
            loaded = load_legacy_program(staging + ".fp32")
            complete_batch_norm_parameters(loaded)
            fold_conv_bias(loaded)
            channels_last_to_first(loaded.program.global_block())
            weights = {r.weight_name: r for r in records if r.simulated}
            materialize_conv1d_weights(loaded, weights)
            converter = _Converter(
                loaded, records, specs, unsigned_inputs, weights, dynamic_weights, int4,
                symmetric_signed, int8_residual_branches, biases_on_grid=bool(converted_biases_on_grid(model)),
                exact_shifts=exact_shifts, vnni_only=vnni_only,
            )
            converter.int4_required = bool(int4_weights)
            onnx_model = converter.convert(opset)
        _log_inexact_weights_and_biases(converter, model, int4_weights)
        with open(staging + ".onnx", "wb") as file:
            file.write(onnx_model.SerializeToString())
    _log_what_onnx_runtime_runs(path, bool(records) or bool(dynamic_weights))
    return path


def _log_what_onnx_runtime_runs(path: str, quantized: bool) -> None:
    """Logs :func:`.onnx_inspect.onnx_runtime_report` of the file written, and warns where
    ONNX Runtime runs none of a quantized model's convs/matmuls in integer kernels, or fewer
    than half of its convs (measured: a layout detector with 2 of 102 in integer kernels 0.87x
    its fp32). Skipped
    without onnxruntime; a failure to build the report is logged, never raised (the file is
    written)."""
    try:
        import onnxruntime  # noqa: F401 - only to know whether the report can be built
    except ImportError:
        return
    try:
        report = onnx_runtime_report(path)
    except Exception as error:  # noqa: BLE001 - the report is advice; the file is written
        logger.warning("could not read back what ONNX Runtime runs in integer kernels: %s", error)
        return
    logger.info("%s: %s", path, report.summary())
    integer, floating = sum(report.integer.values()), sum(report.float.values())
    # Convs alone for "fewer than half": an int8-simulated LSTM multiplies its codes with float
    # MatMuls by design (exact), inside and outside its Scan.
    integer_convs = sum(report.integer.get(kind, 0) for kind in ("QLinearConv", "ConvInteger"))
    float_convs = sum(
        report.float.get(kind, 0) - report.float_in_bodies.get(kind, 0) for kind in ("Conv", "FusedConv")
    )
    if quantized and floating and not integer:
        counted = f"none of the {floating} convs/matmuls"
    elif quantized and integer_convs < float_convs:
        total = integer_convs + float_convs
        counted = f"only {integer_convs} of the {total} convs" if integer_convs else f"none of the {total} convs"
    else:
        return
    logger.warning(
        "ONNX Runtime runs %s of %s in integer kernels, so this file is likely no faster than "
        "the fp32 model: a conv or matmul runs in float, on weights ONNX Runtime dequantizes, "
        "where a float op reads its output (a SiLU, a Hardswish, a PReLU, an add: the simulation "
        "computes those outputs in float, as Paddle Inference's fused int8 kernels do; Paddle "
        "Inference runs such layers int8, save_quantized_model) or where convert kept it fp32 "
        "(its warnings name those)", counted, path,
    )


def _check_export_options(
    opset: Any, int4_weights: Any, int8_residual_branches: Any, exact_shifts: Any, vnni_only: Any
) -> None:
    """Raises on an option of :func:`export_onnx` of the wrong type or value; warns where
    ``vnni_only`` asks for a file this CPU cannot check."""
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 13:
        raise ValueError(f"opset must be an int >= 13 (per-channel QDQ), got {opset!r}")
    if int4_weights is not None and not isinstance(int4_weights, bool):
        raise TypeError(f"int4_weights must be True, False or None, got {int4_weights!r}")
    if int8_residual_branches is not None and not isinstance(int8_residual_branches, bool):
        raise TypeError(f"int8_residual_branches must be True, False or None, got {int8_residual_branches!r}")
    if not isinstance(exact_shifts, bool):
        raise TypeError(f"exact_shifts must be True or False, got {exact_shifts!r}")
    if not isinstance(vnni_only, bool):
        raise TypeError(f"vnni_only must be True or False, got {vnni_only!r}")
    cpu = cpu_info() if vnni_only else None
    if cpu is not None and not cpu.vnni:
        logger.warning(
            "export_onnx(vnni_only=True) on a CPU without VNNI (%s): ONNX Runtime's u8 x s8 "
            "kernels here saturate int16 pair sums, so the file cannot be checked on this CPU",
            cpu.describe(),
        )


def _log_inexact_weights_and_biases(
    converter: "_Converter", model: paddle.nn.Layer, int4_weights: bool | None
) -> None:
    """Says which layers the file stores or computes otherwise than the simulation: weights of
    <= 4 bits as int8 (or, with ``int4_weights=True``, as INT4 off the simulation), biases off
    ONNX Runtime's int32 grid added in float or rounded onto it."""
    if converter.int4_inexact:
        if int4_weights:
            logger.warning(
                "int4_weights=True: %d layers stored as INT4 hold their own 4-bit codes, not "
                "the 8-bit requantization the simulation computes with on target %r (Paddle's "
                "fc and oneDNN derive it), so ONNX Runtime departs from the simulation on "
                "them; int4_weights=None stores those int8, exactly: %s",
                len(converter.int4_inexact), converted_target(model).name, ", ".join(converter.int4_inexact),
            )
        else:
            logger.info(
                "%d layers with weights of <= 4 bits stored as int8: on this target the "
                "simulation computes with their 8-bit requantization, which INT4 cannot "
                "hold: %s", len(converter.int4_inexact), first_names(converter.int4_inexact, 5),
            )
    if converter.float_biases:
        logger.info(
            "%d int8 convs add a bias off ONNX Runtime's int32 grid in float, as simulated "
            "(ONNX Runtime runs them as float convs): %s", len(converter.float_biases),
            first_names(converter.float_biases, 5),
        )
    if converter.rounded_biases and not converted_biases_on_grid(model):
        logger.warning(
            "%d int8 convs or Linear layers have biases off ONNX Runtime's int32 grid (the model was converted "
            "with bias_grid=False, ImperativeQAT.convert's default): ONNX Runtime rounds each "
            "by up to half a step of input x weight scale, so its outputs depart from the "
            "simulation (Paddle Inference adds them in float); convert with bias_grid=True "
            "to make them agree: %s", len(converter.rounded_biases),
            ", ".join(converter.rounded_biases),
        )


def _names_read(nodes: Sequence[Any]) -> set[str]:
    """Every tensor name ``nodes`` read, those their loop and branch bodies read from outside
    included."""
    read: set[str] = set()
    for node in nodes:
        read.update(node.input)
        for attribute in node.attribute:
            bodies = [attribute.g] if attribute.HasField("g") else list(attribute.graphs)
            for body in bodies:
                read |= _names_read(body.node) | {output.name for output in body.output}
    return read


def _node_links(nodes: Sequence[Any]) -> tuple[dict[str, list], dict[str, Any]]:
    """The readers of each tensor of ``nodes`` (ONNX nodes) and the node writing each."""
    readers: dict[str, list] = {}
    producers: dict[str, Any] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
        producers.update(dict.fromkeys(node.output, node))
    return readers, producers


def _without_dead_nodes(nodes: list[Any], graph_outputs: set[str]) -> list[Any]:
    """``nodes`` without those whose outputs nothing reads (a float ReLU6 whose readers all
    take the codes of its input): ONNX Runtime fuses a conv into ``QLinearConv`` only where
    its QuantizeLinear is its one reader."""
    while True:
        read = _names_read(nodes) | graph_outputs
        alive = [node for node in nodes if any(name in read for name in node.output)]
        if len(alive) == len(nodes):
            return nodes
        nodes = alive
