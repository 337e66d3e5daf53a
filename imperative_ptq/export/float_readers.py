"""Tensors read in float keep no scale.

Paddle Inference's oneDNN pipeline quantizes whatever has a scale: a conv/fc whose input has
one runs int8, an op writing a scaled tensor writes codes, and its other readers get the
dequantized codes. Where the simulation computes in float, these passes drop the scale or give
the float readers a tensor of their own: the inputs of conv/fc layers kept fp32
(:func:`unscale_fp32_layer_inputs`), tensors only returned or read by ops that compute in
float (:func:`returned_only_outputs`), int8 conv/fc outputs that fp32 ops read too
(:func:`float_outputs_for_float_readers`), and transposed or 3-D conv outputs in front of a
quantize op (:func:`isolate_fp32_weight_op_outputs`); max-pools that only activations read
(:func:`max_pools_read_by_activations`) and the float ops beside a scaled concat, which Paddle's
scale propagation reaches (:func:`keep_concat_scales_off_float_ops`).
"""

from __future__ import annotations

import logging
from typing import Callable, Collection, Mapping, Sequence

import paddle

from .graph import (
    FUSABLE_ACTIVATIONS,
    feeds_quantize,
    insert_op,
    insert_reader_op,
    is_persistable,
    op_index,
    producers,
    readers,
)
from .legacy_program import (
    FP32_WEIGHT_OPS,
    INT8_WEIGHT_OPS,
    SCALE_CARRYING_OPS,
    LegacyProgram,
    ProgramScales,
    int8_gemm_output,
    int8_weight_op_writing,
    is_constant,
    passes_values,
    value_source,
)
from .unsigned import FUSING_OPS, relu_after_residual_conv, runs_unsigned

logger = logging.getLogger(__name__)

__all__ = [
    "float_outputs_for_float_readers", "isolate_fp32_weight_op_outputs", "max_pools_read_by_activations",
    "reads_in_float", "returned_only_outputs", "keep_concat_scales_off_float_ops", "unscale_fp32_layer_inputs",
]


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
    coded: Collection[str] = (),
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
            ``dequantize_linear``, as :func:`.program.quantize_program` writes it).
        isolate_concats: Also put an identity ``clip`` after each concat that reads a conv/fc
            kept fp32, so that a scale on the concat's output (an int8 reader's quantize op)
            cannot reach its inputs (Paddle Inference programs; see
            :func:`_concat_inputs_beside_fp32_layers`).
        fp32_inputs: Further tensors read in fp32 by something else than a conv/fc (the
            input of a shift, :mod:`.shifted`).
        coded: Tensors the simulation holds on int8 codes for every reader (a fused
            residual conv's sum, an identity shortcut): they keep their scale, and a conv/fc
            kept fp32 or a concat beside one reads them through an ``assign`` of its own; a
            concat may read them int8 beside other readers (:func:`_read_beside_concat`).

    Returns:
        How many conv/fc ops are kept fp32.
    """
    writers, reading = producers(block), readers(block)
    pending, kept = list(fp32_inputs), 0
    fp32_ops: list = []
    barriers: set[str] = set()
    for op in list(block.ops):
        if op.type in FP32_WEIGHT_OPS:
            slot = FP32_WEIGHT_OPS[op.type][1]
        else:
            slots = INT8_WEIGHT_OPS.get(op.type)
            if slots is None or not op.input(slots[0]):
                continue
            if is_int8(op) if is_int8 is not None else _reads_int8_weight(op, slots, writers):
                continue
            slot = slots[1]
        kept += 1
        fp32_ops.append(op)
        for name in op.input(slot):
            if name in coded and name in writers:
                # A tensor the simulation holds on codes (a fused residual conv's sum, which
                # that conv writes on codes only with a scale) keeps it; the fp32 layer reads
                # it through an assign of its own, where Paddle's scale propagation stops
                # (measured: a projection block's sum read by an fp32 Conv2DTranspose, added
                # apart from its conv in float without the scale, 10% of the largest output
                # off the simulation).
                barriers.add(insert_reader_op(block, writers[name], name, [op], "assign", "fp32_reader"))
                writers, reading = producers(block), readers(block)
            else:
                pending.append(name)
    mixed = _concat_inputs_beside_fp32_layers(block, fp32_ops, writers, reading, isolate_concats, coded, barriers)
    if isolate_concats and mixed:
        writers, reading = producers(block), readers(block)
    pending.extend(mixed)
    seen: set[str] = set(barriers)
    propagating = _SCALE_PROPAGATING_OPS | _RESHAPING_OPS
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        carrying = [op for op in reading.get(name, []) if op.type in propagating]
        if name in coded and name in writers and carrying and all(op.type == "pool2d" for op in carrying):
            # The simulation holds it on codes for the pools reading it: it keeps its scale,
            # and the pools read an assign of it (measured: a ReLU an int8 conv writes as codes
            # for a max-pool whose output a concat of both signs joins, written in float and
            # pooled in float, 2.6e-3 of the largest output off). (A coded sum a concat reads
            # goes as before: DLA's roots.)
            seen.add(insert_reader_op(block, writers[name], name, carrying, "assign", "unscaled_readers"))
            writers, reading = producers(block), readers(block)
            continue
        outputs.pop(name, None)
        neighbours = [writers.get(name)] + reading.get(name, [])
        for op in neighbours:
            if op is not None and op.type in propagating:
                pending.extend(n for slot in op.input_names for n in op.input(slot))
                pending.extend(n for slot in op.output_names for n in op.output(slot))
    return kept


#: Ops between a conv/fc and a concat that oneDNN fuses into the conv (its bias, BatchNorm,
#: activation).
_FUSED_INTO_CONV_OPS = frozenset({"elementwise_add", "batch_norm", "relu", "relu6", "hard_swish", "swish", "leaky_relu"})


def _concat_inputs_beside_fp32_layers(
    block, fp32_ops: list, writers: Mapping, reading: Mapping, isolate: bool = False,
    coded: Collection[str] = (), barriers: set[str] | None = None,
) -> list[str]:
    """The tensors between the convs/fcs feeding a concat and the concat, for every concat
    that reads a conv/fc kept fp32 (through the bias add and activation oneDNN fuses into it).

    Paddle's int8 pipeline would quantize that fp32 conv's output as s8 (a relu fused into an
    fp32 conv no longer marks it unsigned) next to the u8 outputs of int8 convs, and oneDNN
    then fails to build the concat ("could not create a primitive descriptor for a concat
    primitive", measured on paddle.vision's GoogLeNet). Without scales on its inputs the
    concat stays fp32. With ``isolate`` (Paddle Inference programs) the same holds for a
    concat of int8 layers' outputs of both signs (:func:`_mixed_signs`) and for one whose
    inputs other ops read too (:func:`_read_beside_concat`). With ``isolate``, an ``assign`` after the concat keeps a scale
    on its output (the quantize op of an int8 layer reading it, as in a U-Net's decoder on
    ``x86-vnni``) from spreading back to its inputs: Paddle's scale propagation crosses a
    concat but not an assign. An input in ``coded`` (a fused residual conv's sum, which that
    conv writes on codes only with a scale) keeps its scale and is read through an ``assign``
    of its own where no int8 layer reads the concat (without, its conv and the add ran apart,
    in float: 2.8e-3 of the largest output off the simulation on a block whose sum a returned
    concat joins with another conv's output);
    those copies are added to ``barriers``, which the scales dropped after this stop at.
    """
    fp32_ids = {id(op) for op in fp32_ops}
    names: list[str] = []
    for op in block.ops:
        if op.type != "concat":
            continue
        chains = [_chain_to_producer(name, block, writers) for name in op.input("X")]
        beside_fp32 = any(producer is not None and id(producer) in fp32_ids for producer, _ in chains)
        if beside_fp32 or (
            isolate and (
                _mixed_signs(block, op.input("X"), writers)
                or _read_beside_concat(block, op, writers, reading, coded)
                or _signed_scale_from_behind(block, op, writers, reading)
            )
        ):
            # (A concat of int8 layers' outputs that an int8 layer reads keeps its sums as
            # before: their codes are that layer's, which the export hands back through the
            # concat. Beside an fp32 layer the concat runs fp32 whatever reads it: measured, a
            # projection block's sum joined with an fp32 Conv2DTranspose's output, 3.7e-2 of
            # the largest output off the simulation while its add ran apart, in float.)
            quantized_after = any(
                feeds_quantize(reader, reading) for reader in reading.get(op.output("Out")[0], [])
            )
            for name, (_, chain) in zip(list(op.input("X")), chains):
                if isolate and name in coded and name in writers and (beside_fp32 or not quantized_after):
                    copy = insert_reader_op(block, writers[name], name, [op], "assign", "beside_concat")
                    if barriers is not None:
                        barriers.add(copy)
                else:
                    names.extend(chain)
            # A ReLU after the concat is fused into the convs before it
            # (conv_concat_relu_mkldnn_fuse_pass): its output is the concat's.
            out = op.output("Out")[0]
            after = reading.get(out, [])
            if len(after) == 1 and after[0].type in ("relu", "relu6"):
                names.extend(after[0].output("Out"))
            elif isolate and after:
                # An assign, not an identity clip: Paddle fuses a clip after a concat of conv
                # outputs into those convs, and the concat's scale came back with it. Where no
                # int8 layer reads the concat (a DenseNet's, read by the next BatchNorm), an
                # identity scale op instead, which oneDNN runs: the assign wrote NCHW, and
                # DenseNet-121's BatchNorms behind its first block's concats ran oneDNN's
                # plain-layout kernel (5.9 ms at batch 1 against 1.3 ms for all 62 in fp32;
                # its int8 forward 28.3 -> 21.8 ms, outputs identical). (Paddle carries a
                # scale through a scale op, so an int8 reader's would come back, also from
                # behind layout ops: a channel shuffle's reshapes into a split.)
                if quantized_after or any(_requantizes(reader, reading, op, through_concats=True) for reader in after):
                    insert_reader_op(block, op, out, after, "assign", "isolated")
                else:
                    insert_reader_op(
                        block, op, out, after, "scale", "isolated",
                        {"scale": 1.0, "bias": 0.0, "bias_after_scale": True},
                    )
    return names


#: Ops between a concat's input and the conv/fc writing it that Paddle runs int8 once the concat
#: does (their data input's slot): the layout ops, and what oneDNN fuses into the conv.
_WALKED_TO_CONCAT = {**SCALE_CARRYING_OPS, **{op: "X" for op in _FUSED_INTO_CONV_OPS}}


#: Readers that quantize a concat's input on another grid: a quantize op (or the ``assign`` copy
#: :func:`.shared_outputs.isolate_quantized_shared_outputs` gives one) or another concat. Float
#: readers are left to the simulation's codes (:mod:`.coded_identity`; measured exact: DLA's tree
#: root concatenating a pooled input that a float add and an x86 u8 clip also read).
_REQUANTIZING_READERS = frozenset({"quantize_linear", "assign", "concat"})
#: The clip in front of an x86 u8 quantize op (:func:`.unsigned.insert_clip_relu`).
_U8_CLIPS = frozenset({"clip", "elementwise_min"})


def _requantizes(reader, reading: Mapping, concat, through_concats: bool = False) -> bool:
    """Whether ``reader`` quantizes its input (:data:`_REQUANTIZING_READERS`) or passes it,
    through ops carrying a scale back (a resize, a max-pool, a reshape), to one that does (a
    PAN neck's upsampled copy of a tensor beside its concat). ``through_concats``: whether a
    scale can come back to the input at all along Paddle's scale propagation: through concats
    too (a concat's output scale goes to its inputs), to a quantize op or an assign copy."""
    ends = frozenset({"quantize_linear", "assign"}) if through_concats else _REQUANTIZING_READERS
    pending, seen = [reader], set()
    while pending:
        op = pending.pop()
        if id(op) in seen or op is concat:
            continue
        seen.add(id(op))
        if op.type in ends:
            return True
        if op.type in SCALE_CARRYING_OPS or (through_concats and op.type == "concat"):
            pending.extend(
                after for slot in op.output_names for name in op.output(slot) for after in reading.get(name, [])
            )
    return False


def _read_beside_concat(block, concat, writers: Mapping, reading: Mapping, coded: Collection[str] = ()) -> bool:
    """Whether another op quantizes one of ``concat``'s inputs (:data:`_REQUANTIZING_READERS`),
    or a tensor it is computed from by ops Paddle runs int8 with the concat (a conv's fused
    bias and activation, a split, slice or resize), or another piece of such a split.

    Paddle runs a concat int8 once its output has a scale: the convs writing its inputs then
    write codes on the concat's scale, and their other readers read those codes, quantized
    again on their own threshold, where the simulation quantizes the float values once
    (measured on ``x86-avx2``: a DenseNet-style ``concat([y, conv(y)])`` 1.75e-2 of the
    largest output off, a YOLOv8 C2f block's split halves 2.2e-2 to 4.6e-2; after a ReLU,
    oneDNN refused the concat of the u8 half and the s8 conv output). It stays fp32 instead.
    An input in ``coded`` is read on the same codes by every reader, as simulated (DLA's tree
    root joining fused residual sums that the next tree adds too).
    """
    for name in concat.input("X"):
        consumer = concat
        while name not in coded:
            if any(
                reader is not consumer and reader is not concat and _requantizes(reader, reading, concat)
                for reader in reading.get(name, [])
            ):
                return True
            op = writers.get(name)
            slot = _WALKED_TO_CONCAT.get(op.type) if op is not None else None
            if slot is None or not op.input(slot):
                break
            if op.type == "elementwise_add" and is_constant(block, op.input("X")[0], writers):
                break  # (a bias add reads the conv output as X)
            for other in (n for out_slot in op.output_names for n in op.output(out_slot) if n != name):
                if any(
                    reader is not concat and (reader.type in _U8_CLIPS or _requantizes(reader, reading, concat))
                    for reader in reading.get(other, [])
                ):
                    # Another piece of the split, quantized elsewhere (also through an x86 u8
                    # clip: a ReLU C2f's second half read by its bottleneck conv).
                    return True
            consumer, name = op, op.input(slot)[0]
    return False


def _signed_scale_from_behind(block, concat, writers: Mapping, reading: Mapping) -> bool:
    """Whether ``concat`` joins signed tensors and its output reaches an int8 reader only
    through ops that carry a scale back (a max-pool, resize or slice): Paddle then gives the
    concat a scale its inputs lack, and its int8 concat, seeing no signed input, runs unsigned
    (measured on ``x86-avx2``, two int8 convs on a signed input concatenated then max-pooled,
    upsampled or sliced before a conv: negatives zeroed, 0.11 .. 0.97 of the largest output off)."""
    if any(runs_unsigned(block, value_source(name, writers)[0], writers) for name in concat.input("X")):
        return False
    after = reading.get(concat.output("Out")[0], [])
    return any(reader.type in SCALE_CARRYING_OPS and _requantizes(reader, reading, concat) for reader in after)


def _mixed_signs(block, names: Sequence[str], writers: Mapping) -> bool:
    """Whether Paddle's int8 pipeline would hand a concat of ``names`` both u8 and s8 inputs,
    which oneDNN cannot join ("could not create a primitive descriptor for a concat
    primitive", measured on ``x86-vnni``: a leaky-ReLU or Swish branch, upsampled or not,
    concatenated with a ReLU one, YOLOv3's FPN). A tensor is u8 where a ReLU wrote it
    (:func:`.unsigned.runs_unsigned`), also behind ops that pass values on (a resize, a max
    pool)."""

    signs = {runs_unsigned(block, value_source(name, writers)[0], writers) for name in names}
    return len(signs) == 2


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


def max_pools_read_by_activations(block: "paddle.static.Block", outputs: Mapping[str, float]) -> set[str]:
    """The scaled max-pool outputs (an ``nn.MaxPool2D`` calibrated as a layer) that only
    activations read, which Paddle Inference computes in float after a pool (no conv or fc
    before them to absorb them), in the traced program (before the export adds clips and
    ReLU copies of its own: ResNet's stem pool, read by a conv and an add, keeps its scale and
    runs int8 on the stem conv's codes).

    With a scale of its own Paddle runs such a pool int8: it rounds the pool's input on the
    pool's grid, then the int8 reader after the activation rounds again on its own, where the
    simulation pools and activates in float and rounds once (measured: ``conv ->
    nn.MaxPool2D -> nn.ReLU -> conv``, 1.2e-2 of the largest output off on ``x86`` and
    ``x86-vnni``; with a Sigmoid 1.5e-2; with a Hardswish, GELU, tanh, SiLU or LeakyReLU on
    ``x86-vnni``, whose int8 reader reads the activation's signed output). Without one the pool
    runs fp32. (The caller leaves out those the simulation holds on codes.)
    """
    reading, writers = readers(block), producers(block)
    found = set()
    for name in outputs:
        writer = writers.get(name)
        if writer is None or writer.type != "pool2d" or writer.attr("pooling_type") != "max":
            continue
        ops = reading.get(name, [])
        if ops and all(op.type in FUSABLE_ACTIVATIONS for op in ops):
            found.add(name)
    return found


#: Ops Paddle Inference's scale propagation hands a scale across, output to inputs.
_SCALE_PASSING_READERS = frozenset(SCALE_CARRYING_OPS) | {"concat", "nearest_interp"}


def keep_concat_scales_off_float_ops(loaded: LegacyProgram) -> int:
    """Keeps Paddle Inference's scale propagation from a concat to the float ops around it:
    each input of a scaled concat that float ops read too (a pool, resize or layout op counts
    as one where its own output carries no scale: Paddle would run it int8 on the concat's
    grid) is handed to the concat through an ``assign``, and each product of two scaled activations (an ``elementwise_mul`` whose
    inputs and output all carry a scale, none a parameter) reaches its readers through one.

    The simulation quantizes a concat's output once and computes the ops beside it in float
    (a functional multiply is observed, not quantized). Paddle propagates the concat's scale
    back onto its inputs: the int8 conv or fc writing one then writes codes on the concat's
    grid for every reader, so the float ops reading it too see rounded values, and an
    ``elementwise_mul`` whose inputs and output carry scales runs int8 (s8 x s8 -> s8, each
    operand and the product rounded on that grid). Measured on ``x86-vnni``:
    ``Linear(concat([x, x * x]))`` 2.2e-2 of the largest output off, a head on ``[u, v,
    |u - v|, u * v]`` 1.0e-2, a GLU-style ``concat([a * sigmoid(b), a])`` of a split conv
    output 1.3e-2, a returned max-pool of a concat input 4.4e-3. Propagation does not cross an ``assign``: the concat quantizes its inputs
    itself, once, as simulated.

    Args:
        loaded: The int8 program, after quantization.

    Returns:
        How many copies were inserted.
    """
    block = loaded.program.global_block()
    reading, writers = readers(block), producers(block)
    scaled: dict[str, bool] = {}

    def has_scale(name: str) -> bool:  # (readers lie ahead: the walk ends)
        if name not in scaled:
            writer = writers.get(name)
            scaled[name] = (writer is not None and writer.has_attr("out_threshold")) or any(
                op.type == "quantize_linear" or (
                    op.type in _SCALE_PASSING_READERS
                    and any(has_scale(out) for slot in op.output_names for out in op.output(slot))
                )
                for op in reading.get(name, [])
            )
        return scaled[name]

    def takes_float_values(reader: "paddle.base.framework.Operator") -> bool:
        # (A pool, resize or layout op without a scale of its own runs on the values Paddle
        # hands it: the codes on the concat's grid, once propagation reaches its input.)
        return reader.type != "quantize_linear" and (
            reader.type not in _SCALE_PASSING_READERS
            or not any(has_scale(out) for slot in reader.output_names for out in reader.output(slot))
        )

    copies = 0
    for op in list(block.ops):
        if op.type == "concat" and has_scale(op.output("Out")[0]):
            for index, name in enumerate(op.input("X")):
                others = [reader for reader in reading.get(name, []) if reader is not op]
                if name in writers and any(takes_float_values(reader) for reader in others):
                    insert_reader_op(block, writers[name], name, [op], "assign", f"concatenated_{op_index(block, op)}_{index}")
                    copies += 1
        elif op.type == "elementwise_mul":
            operands = op.input("X") + op.input("Y")
            product = op.output("Out")[0]
            if not any(is_persistable(block, name) for name in operands) and all(map(has_scale, [product, *operands])):
                insert_reader_op(block, op, product, list(reading.get(product, [])), "assign", "product")
                copies += 1
    if copies:
        logger.info("%d concat inputs and products kept out of Paddle's scale propagation, as simulated", copies)
    return copies


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
    (:func:`.pool_scales.int8_pool_outputs`), whose input needs its scale. ``float_adds``: count the
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
                    ends_in_fp32 = True  # keep_average_pools_fp32 runs it fp32
                    continue
                if float_adds and _adds_in_float(block, op, outputs, writers):
                    ends_in_fp32 = True
                    continue
                writer = writers.get(tensor)
                if passes_values(op) or (
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
    return not any(_fusable_residual_operand(block, name, writers) for name in operands)


def _fusable_residual_operand(block: "paddle.static.Block", name: str, writers: Mapping) -> bool:
    """Whether an add reading ``name`` may be fused into the int8 conv/fc writing it: an int8
    conv/fc output (after its bias add or BatchNorm), or an int8 fc's after an activation too.
    Paddle fuses an add into a conv only where it reads the conv's output itself, before the
    activation pass (measured: a conv + ReLU output added to an upsampled max-pool of itself,
    the pool run int8 for that add's sake, 1.3e-2 of the largest output off the simulation)."""
    activation = writers.get(name)
    if activation is None or activation.type not in FUSABLE_ACTIVATIONS:
        return int8_gemm_output(block, name, writers)
    gemm = int8_weight_op_writing(block, activation.input("X")[0], writers)
    return gemm is not None and gemm.type not in ("conv2d", "depthwise_conv2d")


def float_outputs_for_float_readers(
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
        if not int8_gemm_output(block, name, writers):
            continue
        op._remove_attr("out_threshold")
        del written.outputs[name]
        removed.append(name)
    return removed


def _chain_to_producer(name: str, block, writers: Mapping) -> tuple[object | None, list[str]]:
    """Walks back from ``name`` through the ops oneDNN fuses into a conv/fc (bias add,
    activation): the op it reaches and the tensors on the way (``name`` included)."""
    chain = [name]
    op = writers.get(name)
    while op is not None and op.type in _FUSED_INTO_CONV_OPS:
        inputs = [n for slot in op.input_names for n in op.input(slot)
                  if not is_constant(block, n, writers)]
        if len(inputs) != 1:
            return None, chain
        chain.append(inputs[0])
        op = writers.get(inputs[0])
    return op, chain


def isolate_fp32_weight_op_outputs(loaded: LegacyProgram) -> int:
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
                      if not is_constant(block, n, writers)]
            if len(inputs) != 1 or writer.type in INT8_WEIGHT_OPS:
                break
            name, steps = inputs[0], steps + 1
        if name in writers and writers[name].type in FP32_WEIGHT_OPS and name not in conv_outputs:
            conv_outputs.append(name)
    reading = readers(block)
    for number, name in enumerate(conv_outputs):
        # Past the [C] bias add (axis 1) of a Conv1DTranspose's conv2d_transpose: an assign
        # in front of that add left oneDNN unable to build it ("could not create a primitive
        # descriptor for a binary operation primitive", a HiFi-GAN-style upsampler before an
        # int8 Conv1D; Conv2DTranspose's bias is added as [1, C, 1, 1]).
        after = reading.get(name, [])
        if (
            len(after) == 1 and after[0].type == "elementwise_add" and after[0].input("X") == [name]
            and after[0].attr("axis") == 1 and is_constant(block, after[0].input("Y")[0], writers)
            and len(block.var(after[0].input("Y")[0]).shape) == 1
        ):
            name = after[0].output("Out")[0]
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


def _reads_int8_weight(op, slots: tuple[str, str, str], writers: Mapping) -> bool:
    weight = writers.get(op.input(slots[0])[0])
    return weight is not None and weight.type == "dequantize_linear"
