"""One tensor read on several grids.

Paddle Inference moves a tensor's scale onto the op that writes it: a transpose, reshape or
slice then runs int8, a conv/fc writes codes, and every other reader of the tensor reads those
codes. These passes give a quantize op its own copy of a signed tensor that other readers share
(:func:`isolate_quantized_shared_outputs`) and quantize each piece of a split or sliced
non-negative tensor on its own (:func:`isolate_sliced_pieces`).
"""

from __future__ import annotations

from typing import Mapping

import paddle

from .graph import insert_op, insert_reader_op, op_index, producers, readers
from .legacy_program import SCALE_CARRYING_OPS, LegacyProgram, quantize_threshold
from .unsigned import runs_unsigned

__all__ = ["isolate_quantized_shared_outputs", "isolate_sliced_pieces"]


def _behind_layout_ops(name: str, writers: Mapping) -> tuple[str, list]:
    """The tensor ``name`` is laid out from through
    :data:`~.legacy_program.SCALE_CARRYING_OPS` (itself if none), and those ops, nearest first."""
    walked = []
    while name in writers and writers[name].type in SCALE_CARRYING_OPS:
        op = writers[name]
        walked.append(op)
        name = op.input(SCALE_CARRYING_OPS[op.type])[0]
    return name, walked


def _pooled_unsigned(block: "paddle.static.Block", name: str, writers: Mapping) -> bool:
    """Whether Paddle runs ``name`` as u8: a u8 tensor (:func:`.unsigned.runs_unsigned`, its
    weights int8 by now) or a max-pool of one, which Paddle's int8 pool writes in its input's
    type (a copy of it for a quantize op made Paddle read it s8, which saturates without VNNI:
    an Inception pool branch beside a 1x1 conv reading one stem max-pool, 1.5e-2 of the
    largest output off)."""
    while not runs_unsigned(block, name, writers, int8_weights=True):
        op = writers.get(name)
        if op is None or op.type != "pool2d" or op.attr("pooling_type") != "max":
            return False
        name = op.input("X")[0]
    return True


def isolate_quantized_shared_outputs(loaded: LegacyProgram) -> int:
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
      (2.2% off on one window attention; split, 3-6% on a LeViT-style one);
    * quantize ops of different thresholds read it (an int8 conv's output read by another
      conv and by a head shared by pyramid levels, whose threshold covers every level): its
      int8 writer wrote codes on one scale for both (measured on ``x86-avx2``, a YOLO-style
      head: 7.5e-2 of one output's largest value off).

    A u8 tensor (a ReLU output or a max-pool of one, also through layout ops) is left alone:
    Paddle runs a quantized tensor as u8 only when a ``relu`` writes it (or an int8 max-pool of
    its output).

    Returns:
        How many copies were inserted.
    """
    block = loaded.program.global_block()
    writers, reading = producers(block), readers(block)
    inserted = 0
    for op in list(block.ops):
        if op.type != "quantize_linear":
            continue
        name = op.input("X")[0]
        if name not in writers:
            continue
        quantizing = [reader for reader in reading.get(name, []) if reader.type == "quantize_linear"]
        shared = len(quantizing) < len(reading.get(name, [])) or len(
            {quantize_threshold(loaded, reader) for reader in quantizing}
        ) > 1
        source, walked = _behind_layout_ops(name, writers)
        branched = any(
            (op.type == "split" and len(op.output("Out")) > 1)
            or len(reading.get(op.input(SCALE_CARRYING_OPS[op.type])[0], [])) > 1
            for op in walked
        )
        if not (shared or branched) or _pooled_unsigned(block, name, writers) or _pooled_unsigned(block, source, writers):
            continue
        var = block.var(name)
        copy = block.create_var(name=f"{name}.quantized_copy_{inserted}", shape=var.shape, dtype=var.dtype)
        index = op_index(block, op)
        insert_op(block, index, type="assign", inputs={"X": [name]}, outputs={"Out": [copy.name]})
        op._rename_input(name, copy.name)
        inserted += 1
    return inserted


def isolate_sliced_pieces(loaded: LegacyProgram) -> list[str]:
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
        thresholds = {quantize_threshold(loaded, op) for op, _ in quantized}
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
