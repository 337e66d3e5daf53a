"""Scales around max-pools, average pools and nearest upsamples.

Paddle Inference runs a pool between two scaled tensors in int8, quantizing its input and
output each on its own scale, where the simulation pools in float and quantizes once, on the
reader's grid. These passes put the reader's threshold on the tensors in between
(:func:`align_pooled_scales`, :func:`align_signed_resampled_scales`), give float readers of an
int8 pool an fp32 pool of their own, run average pools fp32 except the global pools the
simulation runs int8 (:func:`keep_average_pools_fp32`), and give each reader of a signed
resampled tensor its own copy where the readers' thresholds differ
(:func:`resample_signed_tensors_in_float`).
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np
import paddle

from ..quant_pool import U8_MAX
from ..quantizers.qparams import symmetric_levels
from .graph import (
    feeds_quantize,
    insert_op,
    insert_reader_op,
    is_persistable,
    op_index,
    producers,
    readers,
)
from .legacy_program import LegacyProgram, passes_values, quantize_threshold, value_source
from .qdq import insert_identity_clip
from .tracing import LayerRecord
from .unsigned import (
    RELU6_U8_PRODUCERS,
    gemm_output,
    relu_after_residual_conv,
    runs_unsigned,
    unsigned_threshold,
)

__all__ = [
    "align_pooled_scales", "align_signed_resampled_scales", "int8_pool_outputs",
    "keep_average_pools_fp32", "pool_signed_sums_through_copies", "resample_signed_tensors_in_float",
]

logger = logging.getLogger(__name__)


def align_pooled_scales(
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
            if op is None or not passes_values(op):
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
                # (A source the simulation holds on codes goes the way below also where the
                # pool alone reads it: behind an F.max_pool2d, which calibration does not see,
                # the codes are on the source's own threshold; measured: a projection block's
                # sum put on the reader's, 1.3e-2 of the largest output off.)
                if len(reading.get(source, [])) == 1 and not (pooled and source in coded_thresholds):
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
                # A source on codes is pooled on them wherever it is read (the simulation's
                # codes); a float one is pooled in float only where read in float. (That fp32
                # pool first: it reads the source too, which makes the int8 pool's copy an
                # identity clip rather than an assign; measured on Inception-v3, whose stem
                # pool feeds int8 convs and a float average pool: the assign wrote NCHW and
                # oneDNN ran its reference s8 pool, 12.5 of 46 ms of the int8 forward.)
                _pool_in_float_for_float_readers(block, op, source, set() if source in on_codes else walked)
                copy = _pool_copy(block, writers[source], source, op, len(readers(block).get(source, [])))
                outputs[copy] = threshold
                # The next walks see those ops: a pool added for other readers that another
                # clip reaches gets a copy of its own too (measured: an Inception pool branch
                # beside a conv, both reading a stem max-pool, read the int8 stem conv's
                # output on the branch's grid, 1.2e-2 of the largest output off).
                writers, reading = producers(block), readers(block)


def align_signed_resampled_scales(loaded: LegacyProgram, outputs: dict[str, float]) -> int:
    """Gives the signed tensors between an int8 layer's quantize op and the activation it
    reads through max-pools or nearest upsamples (each read by the next op alone) the quantize
    op's threshold, as :func:`align_pooled_scales` does for u8 inputs.

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
        source, walked = value_source(op.input("X")[0], writers, reading)
        if not walked or runs_unsigned(block, source, writers):
            continue  # not behind a pool or resize; or a u8 path: align_pooled_scales
        if len(reading.get(source, [])) == 1:
            walked.append(source)  # the activation, read by the pool alone
        threshold = quantize_threshold(loaded, op)
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


def keep_average_pools_fp32(
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
            if written is None and _relu_of_a_norm(source, writers):
                # Paddle fuses the ReLU into a BatchNorm on no conv/fc output (DenseNet's head
                # after its last concat) and writes that s8, clipped at code 127 (measured:
                # 8.4e-2 of the largest logit off the simulation's u8 codes up to 255). Without
                # a scale it writes floats, which a ReLU copy quantizes u8 for the pool.
                outputs.pop(source, None)
                source, written = _rectify_input(block, op, source), threshold
            elif written is None:
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
            insert_identity_clip(block, writers[source], source, [op], "pooled")
        else:
            outputs.pop(source, None)
        outputs.pop(out, None)
        if reading.get(out):
            # Whatever reads it: a concat or reshape passes a reader's scale back as well.
            insert_identity_clip(block, op, out, reading[out])
        kept += 1
    return kept


def _pool_copy(block: "paddle.static.Block", writer, source: str, pool, readers_of_source: int) -> str:
    """A copy of ``source`` for ``pool`` alone. Where other ops read ``source`` it is an
    identity ``clip`` (over the whole float range): oneDNN runs it and keeps the tensor's
    channels-last layout, which the quantize op after it keeps and the int8 pool after that
    needs; and no oneDNN pass fuses it into the writer of a tensor with other readers. An
    ``assign`` copy (a plain CPU kernel) wrote it NCHW, on which oneDNN has no fast int8 pool:
    PP-HGNetV2's stem pool ran its reference kernel, 7.8 ms against 0.2 ms, and the whole
    network 0.3-0.5x its fp32 speed. Read by the pool alone, it stays an ``assign``, which no
    pass fuses into the writer either."""
    suffix = f"pooled_{len(block.ops)}"
    if readers_of_source < 2:
        return insert_reader_op(block, writer, source, [pool], "assign", suffix)
    return insert_identity_clip(block, writer, source, [pool], suffix)


def _relu_of_a_norm(name: str, writers: Mapping) -> bool:
    """Whether ``name`` is a ``relu`` output of a ``batch_norm`` on no conv/fc output, which
    Paddle Inference fuses into the BatchNorm (its output no longer a ReLU's: s8)."""
    op = writers.get(name)
    norm = writers.get(op.input("X")[0]) if op is not None and op.type == "relu" else None
    return norm is not None and norm.type == "batch_norm" and not gemm_output(writers, norm.input("X")[0])


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
    or bias add), which writes u8. A ReLU of a BatchNorm on no conv/fc output is fused into
    that BatchNorm, which writes s8 (:func:`_relu_of_a_norm`).
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
    if op is None or op.type != "relu" or _relu_of_a_norm(name, writers):
        return None
    if not relu_after_residual_conv(block, name, writers):
        return threshold
    add = writers[op.input("X")[0]]
    operands = [add.input(slot)[0] for slot in ("X", "Y")]
    convs = [operand for operand in operands if gemm_output(writers, operand)]
    unsigned = all(runs_unsigned(block, operand, writers) for operand in operands if operand not in convs)
    return threshold if len(convs) == 1 and unsigned else None


def pool_signed_sums_through_copies(
    block: "paddle.static.Block", sum_code_tops: Mapping[str, int], outputs: Mapping[str, float]
) -> int:
    """Gives the max-pools reading a ReLU that a fused int8 conv writes as s8 codes (after an
    s8 residual: a projection shortcut) an ``assign`` copy of it.

    oneDNN writes such a conv's output in the residual's data type, s8, while Paddle's int8
    passes take every ``relu`` output for u8 and create the pool from s8 to u8, which oneDNN
    refuses (``could not create a descriptor for a pooling forward propagation primitive``;
    measured on a projection block's ``nn.ReLU`` output read by a max-pool, on every x86
    target). Paddle dequantizes the codes for the copy, which it runs in float, and the pool
    reads them in float: the simulation's values (its sum codes, pooled). ``outputs``: the
    scales written so far (a ReLU without one is not written as codes).

    Returns:
        How many copies were inserted.
    """
    writers, reading = producers(block), readers(block)
    copied = 0
    for name, top in sum_code_tops.items():
        pools = [
            op for op in reading.get(name, [])
            if op.type == "pool2d" and op.attr("pooling_type") == "max"
        ]
        if top != symmetric_levels(8) or not pools or name not in outputs or name not in writers:
            continue
        insert_reader_op(block, writers[name], name, pools, "assign", "s8_pooled")
        copied += 1
    return copied


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


#: Ops that resample a tensor's values, which Paddle runs int8 between two scaled tensors.
_RESAMPLING_OPS = frozenset({"pool2d", "nearest_interp_v2"})


def resample_signed_tensors_in_float(loaded: LegacyProgram) -> int:
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
    source is left to :func:`align_pooled_scales`.

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
                found.add(quantize_threshold(loaded, reader))
            elif depth < 8 and (passes_values(reader) or reader.type == "assign"):
                found |= thresholds(reader.output("Out")[0], depth + 1)
        return found

    inserted = 0
    for op in list(block.ops):
        if op.type not in _RESAMPLING_OPS or not passes_values(op):
            continue
        out = op.output("Out")[0]
        consumers = reading.get(out, [])
        if len(consumers) < 2 or runs_unsigned(block, op.input("X")[0], writers) or len(thresholds(out)) < 2:
            continue
        for number, consumer in enumerate(consumers):
            insert_identity_clip(block, op, out, [consumer], f"resampled_{number}")
            inserted += 1
    return inserted
