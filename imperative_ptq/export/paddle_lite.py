"""The ``arm`` target's program in the op forms Paddle Lite's ``opt`` reads.

Paddle 3.3.1 traces some ops without attributes that Paddle Lite 2.13 (the ``paddlelite``
wheel's ``opt``) still requires, and ``opt`` stops on them (measured, fp32 programs as well):

* ``relu6`` lost its ``threshold`` (the clip is always at 6): "No attributes called threshold
  found for relu6" (MobileNetV2), and ``swish`` its ``beta`` (always 1: SiLU): "No
  attributes called beta found for swish" (ShuffleNetV2-swish). Both get the value Paddle
  3.3.1 computes with.
* ``opt`` crashes (segmentation fault) on a ``flatten_contiguous_range`` that a ``transpose2``
  reads (a ViT's, an MLP-Mixer's or a Swin's ``conv(x).flatten(2).transpose([0, 2, 1])``) and
  on a program whose output a flatten writes. A flatten whose merged dimension can be written
  as the one ``-1`` of a ``reshape2`` (``0`` copies a leading dimension, the dimensions after
  it are known) becomes that ``reshape2``, which computes the same tensor.

The export also runs the program's channels-last convs, batch norms and pools on NCHW between
two transposes (:func:`.graph.channels_last_to_first`, as for Paddle Inference): Lite 2.13's
batch norm stops on NHWC ("Only support NCHW"). The x86 targets' programs are left alone:
Paddle Inference reads both forms.
"""

from __future__ import annotations

import logging

from .graph import replace_op

__all__ = ["LITE_DEFAULT_ATTRIBUTES", "flatten_as_reshape_shape", "lite_op_forms", "write_lite_attributes"]

logger = logging.getLogger(__name__)

#: op type -> the attributes Paddle Lite 2.13 requires that Paddle 3.3.1 traces without, at
#: the value Paddle 3.3.1 computes with.
LITE_DEFAULT_ATTRIBUTES: dict[str, dict[str, float]] = {
    "relu6": {"threshold": 6.0},
    "swish": {"beta": 1.0},
}


def flatten_as_reshape_shape(shape: list[int], start: int, stop: int) -> list[int] | None:
    """The ``reshape2`` shape that computes ``flatten_contiguous_range(start, stop)`` of a
    tensor of ``shape`` (``-1`` for unknown dimensions), or ``None`` when none does: the
    dimensions before ``start`` are copied (``0``), the merged one is the ``-1``, and those
    after ``stop`` must be known (a ``0`` there would copy the dimension at its own position,
    not the one it moved from)."""
    rank = len(shape)
    if rank == 0:
        return None
    start, stop = start % rank, stop % rank
    if start > stop:
        return None
    after = shape[stop + 1:]
    if not all(int(size) > 0 for size in after):
        return None
    return [0] * start + [-1] + [int(size) for size in after]


def lite_op_forms(program) -> int:
    """Replaces the flattens of ``program`` (every block) that Paddle Lite's ``opt`` crashes
    on by the ``reshape2`` that computes the same (see the module docstring).

    Returns:
        How many ops were replaced.
    """
    replaced = sum(
        _flatten_as_reshape(block, op)
        for block in program.blocks for op in list(block.ops)
        if op.type == "flatten_contiguous_range"
    )
    if replaced:
        logger.info("%d flattens written as reshape2 for Paddle Lite's opt", replaced)
    return replaced


def write_lite_attributes(model_path: str) -> int:
    """Adds to the saved program ``model_path`` (a ``.pdmodel``) the attributes of
    :data:`LITE_DEFAULT_ATTRIBUTES` its ops lack. (In the file: Paddle's save drops them as
    attributes its own ops no longer define.)

    Returns:
        How many ops got attributes.
    """
    from paddle.base.proto import framework_pb2

    program = framework_pb2.ProgramDesc()
    with open(model_path, "rb") as file:
        program.ParseFromString(file.read())
    completed = 0
    for block in program.blocks:
        for op in block.ops:
            defaults = LITE_DEFAULT_ATTRIBUTES.get(op.type, {})
            present = {attribute.name for attribute in op.attrs}
            missing = [name for name in defaults if name not in present]
            for name in missing:
                op.attrs.add(name=name, type=framework_pb2.FLOAT, f=defaults[name])
            completed += bool(missing)
    if completed:
        with open(model_path, "wb") as file:
            file.write(program.SerializeToString())
    return completed


def _flatten_as_reshape(block, op) -> bool:
    """Replaces the flatten ``op`` by the ``reshape2`` that computes its output, if one does."""
    source = block._var_recursive(op.input("X")[0])
    shape = flatten_as_reshape_shape(list(source.shape), op.attr("start_axis"), op.attr("stop_axis"))
    if shape is None:
        return False
    out = op.output("Out")[0]
    xshape = block.create_var(name=f"{out}.xshape", shape=[0, *source.shape], dtype=source.dtype)
    replace_op(
        block, op, type="reshape2", inputs={"X": [source.name]},
        outputs={"Out": [out], "XShape": [xshape.name]}, attrs={"shape": shape},
    )
    return True
