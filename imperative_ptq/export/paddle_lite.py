"""The ``arm`` target's program in the op forms Paddle Lite's ``opt`` reads.

Paddle 3.3.1 writes some ops in forms that Paddle Lite 2.13 (the ``paddlelite`` wheel's
``opt``) stops or crashes on, fp32 programs as well (measured):

* ``relu6`` without its ``threshold`` (the clip is always at 6): "No attributes called
  threshold found for relu6" (MobileNetV2), ``swish`` without its ``beta`` (always 1: SiLU),
  and ``instance_norm`` without the ``SavedMean`` / ``SavedVariance`` outputs its save prunes
  ("Check failed: is_dispensable || is_have_output"). The saved program gets the attributes at
  the values Paddle 3.3.1 computes with, and the outputs (:func:`complete_saved_program`).
* A ``flatten_contiguous_range`` that a ``transpose2`` reads (a ViT's, an MLP-Mixer's or a
  Swin's ``conv(x).flatten(2).transpose([0, 2, 1])``), or that writes the program's output:
  a segmentation fault. A flatten whose merged dimension can be the one ``-1`` of a
  ``reshape2`` (``0`` copies a leading dimension, the dimensions after it are known) becomes
  that ``reshape2``, which computes the same tensor.
* ``brelu`` (``F.hardtanh``) and ``selu``, for which Lite 2.13 has no ARM kernel: they become
  the ``clip``, and the ``elu`` then ``scale``, that compute them.

The export also runs the program's channels-last convs, batch norms and pools on NCHW between
two transposes (:func:`.graph.channels_last_to_first`, as for Paddle Inference): Lite 2.13's
batch norm stops on NHWC ("Only support NCHW"). The x86 targets' programs are left alone:
Paddle Inference reads both forms.
"""

from __future__ import annotations

import logging

from .graph import insert_op, op_index, replace_op

__all__ = [
    "LITE_DEFAULT_ATTRIBUTES", "LITE_REQUIRED_OUTPUTS", "complete_saved_program", "flatten_as_reshape_shape",
    "lite_op_forms",
]

logger = logging.getLogger(__name__)

#: op type -> the attributes Paddle Lite 2.13 requires that Paddle 3.3.1 traces without, at
#: the value Paddle 3.3.1 computes with.
LITE_DEFAULT_ATTRIBUTES: dict[str, dict[str, float]] = {
    "relu6": {"threshold": 6.0},
    "swish": {"beta": 1.0},
}
#: op type -> outputs Paddle Lite 2.13 requires that Paddle's save prunes when nothing reads them.
LITE_REQUIRED_OUTPUTS: dict[str, tuple[str, ...]] = {"instance_norm": ("SavedMean", "SavedVariance")}


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
    """Replaces the ops of ``program`` (every block) that Paddle Lite's ``opt`` crashes on or
    has no ARM kernel for by ops that compute the same (see the module docstring): flattens
    that a reshape can write, ``brelu`` and ``selu``.

    Returns:
        How many ops were replaced.
    """
    rewrites = {"flatten_contiguous_range": _flatten_as_reshape, "brelu": _brelu_as_clip, "selu": _selu_as_elu}
    replaced = sum(
        rewrites[op.type](block, op)
        for block in program.blocks for op in list(block.ops) if op.type in rewrites
    )
    if replaced:
        logger.info("%d ops written in forms Paddle Lite's opt reads", replaced)
    return replaced


def _brelu_as_clip(block, op) -> bool:
    """``brelu(t_min, t_max)`` as the ``clip`` it is."""
    replace_op(
        block, op, type="clip", inputs={"X": op.input("X")}, outputs={"Out": op.output("Out")},
        attrs={"min": float(op.attr("t_min")), "max": float(op.attr("t_max"))},
    )
    return True


def _selu_as_elu(block, op) -> bool:
    """``selu(alpha, scale)`` as ``scale * elu(x, alpha)`` (one rounding more than Paddle's
    kernel: float32 ulps)."""
    out = op.output("Out")[0]
    source = block._var_recursive(op.input("X")[0])
    elu = block.create_var(name=f"{out}.elu", shape=source.shape, dtype=source.dtype)
    scale, alpha = float(op.attr("scale")), float(op.attr("alpha"))
    index = op_index(block, op)
    replace_op(
        block, op, type="scale", inputs={"X": [elu.name]}, outputs={"Out": [out]},
        attrs={"scale": scale, "bias": 0.0, "bias_after_scale": True},
    )
    insert_op(
        block, index, type="elu", inputs={"X": [source.name]}, outputs={"Out": [elu.name]},
        attrs={"alpha": alpha},
    )
    return True


def complete_saved_program(model_path: str) -> int:
    """Adds to the saved program ``model_path`` (a ``.pdmodel``) the attributes of
    :data:`LITE_DEFAULT_ATTRIBUTES` and the outputs of :data:`LITE_REQUIRED_OUTPUTS` its ops
    lack. (In the file: Paddle's save drops attributes its own ops no longer define and
    prunes outputs nothing reads.)

    Returns:
        How many ops were completed.
    """
    from paddle.base.proto import framework_pb2

    program = framework_pb2.ProgramDesc()
    with open(model_path, "rb") as file:
        program.ParseFromString(file.read())
    completed = 0
    for block in program.blocks:
        variables = {variable.name: variable for variable in block.vars}
        for op in block.ops:
            defaults = LITE_DEFAULT_ATTRIBUTES.get(op.type, {})
            present = {attribute.name for attribute in op.attrs}
            missing = [name for name in defaults if name not in present]
            for name in missing:
                op.attrs.add(name=name, type=framework_pb2.FLOAT, f=defaults[name])
            written = {slot.parameter for slot in op.outputs if slot.arguments}
            outputs = [name for name in LITE_REQUIRED_OUTPUTS.get(op.type, ()) if name not in written]
            if outputs:
                _add_outputs(block, op, outputs, variables)
            completed += bool(missing or outputs)
    if completed:
        with open(model_path, "wb") as file:
            file.write(program.SerializeToString())
    return completed


def _add_outputs(block, op, slots: list[str], variables: dict) -> None:
    """Gives ``op`` (a serialized ``OpDesc`` of ``block``) float32 variables for ``slots``,
    named after its first output, typed as that output is, of unknown shape."""
    first = next(slot.arguments[0] for slot in op.outputs if slot.arguments)
    for slot in slots:
        name = f"{first}.{slot.lower()}"
        variable = block.vars.add()
        variable.CopyFrom(variables[first])
        variable.name = name
        del variable.type.dense_tensor.tensor.dims[:]
        variable.type.dense_tensor.tensor.dims.append(-1)
        variables[name] = variable
        entry = next((entry for entry in op.outputs if entry.parameter == slot), None)
        (entry or op.outputs.add(parameter=slot)).arguments.append(name)


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
