"""Shifted inputs in the program: a signed input of a fc or unpadded conv run as u8 codes 0..127.

The simulation quantizes such an input on the affine grid ``(q - z) * s``, ``q`` in ``0..M``
(:mod:`imperative_ptq.shifted_input`). Paddle Inference's oneDNN pipeline has no zero points
(a ``quantize_linear`` zero point is ignored), so the program computes the same thing in two
steps, both exact up to float rounding:

* in front of the layer, ``relu(clip(x + z * s, 0, M * s))``: non-negative, clipped where the
  simulation's grid ends, and a ``relu`` output, which Paddle runs as u8 with the threshold
  ``255 * s`` (codes ``round((x + z s) / s)`` = the simulation's ``q``, at most 127: no int16
  pair of ``vpmaddubsw`` can saturate);
* behind it, the bias minus the layer's response to the shift, ``W z s`` per output channel,
  computed from the weight the runtime multiplies with (a BatchNorm right after a conv takes
  it into its mean instead).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .graph import bias_of, get_tensor, insert_op, insert_zero_bias, new_persistable, readers, set_tensor
from .tracing import LayerRecord

__all__ = ["absorb_shift", "insert_shift", "shift_threshold", "shifted_u8_threshold"]

Operator = Any  # paddle.base.framework.Operator


def shift_threshold(record: LayerRecord, levels: int) -> float:
    """The top of the shifted tensor's range, ``M * s``: its u8 threshold in the simulation's
    terms (the program writes it as :func:`.unsigned.unsigned_threshold` of it)."""
    return float(record.input_scale) * levels


def shifted_u8_threshold(record: LayerRecord) -> float:
    """The threshold ``S`` to write for the shifted tensor: Paddle quantizes a u8 tensor as
    ``round(x * 255 / S)`` (see :func:`.unsigned.unsigned_threshold`), so ``S = 255 * s``
    gives the simulation's codes ``round(x / s)`` whatever the activation bit width."""
    return 255.0 * float(record.input_scale)


#: Ops :func:`insert_shift` inserts.
SHIFT_OPS = 2


def insert_shift(loaded: Any, index: int, name: str, record: LayerRecord, levels: int) -> str:
    """Inserts ``relu(clip(name + z * s, 0, M * s))`` at ``index`` (:data:`SHIFT_OPS` ops: a
    ``fused_elementwise_add`` of the shift with the clip fused into it, which oneDNN runs as
    one binary primitive with an eltwise post-op, and the ``relu`` that makes Paddle run the
    result as u8); returns the output variable. ``record`` holds the grid (``input_scale``,
    ``input_zero_point``)."""
    block = loaded.program.global_block()
    var = block.var(name)
    stem = f"{name}.shifted_{len(block.ops)}"
    outputs = [
        block.create_var(name=f"{stem}.{part}", shape=var.shape, dtype=var.dtype).name
        for part in ("clipped", "rectified")
    ]
    shift = float(record.input_zero_point) * float(record.input_scale)
    value = new_persistable(loaded, f"{stem}.shift", np.array([shift], np.float32))
    insert_op(
        block, index, type="fused_elementwise_add", inputs={"X": [name], "Y": [value]},
        outputs={"Out": [outputs[0]]},
        attrs={
            "axis": -1, "fuse_activation": "clip", "fuse_alpha": 0.0,
            "fuse_beta": shift_threshold(record, levels), "scale_x": 1.0, "scale_y": 1.0,
            "scale_out": 1.0, "fused_output_scale": 1.0, "fused_unsqueeze2_axes": [],
        },
    )
    insert_op(
        block, index + 1, type="relu", inputs={"X": [outputs[0]]}, outputs={"Out": [outputs[1]]}
    )
    return outputs[1]


def absorb_shift(
    loaded: Any, op: Operator, output_slot: str, record: LayerRecord, factor: float,
    absorbed: dict[tuple[str, str], str],
) -> None:
    """Takes the shift's response out of what follows ``op``, the layer's conv/matmul.

    Subtracts ``factor * record.input_shift_response`` from the persistable bias added right
    after ``op``, or adds the response to the mean of a BatchNorm right after it; with
    neither, a bias holding minus the response is added. ``factor`` is what the layer's
    weight was multiplied by in the program (:class:`.unsigned.FusedReluClips`); a bias add
    was multiplied by it too, a BatchNorm's mean was not.

    Args:
        loaded: The program (a :class:`.program.LegacyProgram`).
        op: The layer's conv2d / matmul_v2 / mul op.
        output_slot: Its output slot.
        record: The layer's record (``input_shift_response`` set).
        factor: The layer's weight factor.
        absorbed: ``(layer, bias / mean variable)`` -> the variable holding it adjusted
            (itself, or a copy where other ops read it too); updated. A layer called twice
            shares its bias: the second call's add reads the same adjusted variable (measured:
            a Linear called twice on a shifted input, 14-57% of the largest output off Paddle
            Inference while its second add read the unadjusted parameter). Two layers reading
            one bias parameter (x2paddle writes one for equal initializers, such as the zero
            biases of a freshly initialized transformer's projections) each get their own
            (measured: two matmuls sharing one, 3.97x the largest output off while the second
            read the first's adjusted copy).

    Raises:
        ValueError: The op's output is read by something else than one bias add or BatchNorm
            and the op has no place for the bias (should not happen for traced layers).
    """
    block = loaded.program.global_block()
    response = np.asarray(record.input_shift_response, dtype=np.float64)
    out = op.output(output_slot)[0]
    reading = readers(block)
    following = reading.get(out, [])
    if len(following) == 1 and following[0].type == "batch_norm":
        target, delta = following[0].input("Mean")[0], response
    else:
        target, delta = bias_of(block, out, reading), -factor * response
        if target is None:
            axis = 1 if op.type in ("conv2d", "depthwise_conv2d") else -1
            target = insert_zero_bias(
                loaded, list(block.ops).index(op), op, output_slot, f"{out}.shift_bias",
                response.size, axis,
            )
    adding = next((op for op in following if target in op.input_arg_names), None)
    key = (record.name, target)
    if key in absorbed:
        if adding is not None and absorbed[key] != target:
            adding._rename_input(target, absorbed[key])
        return
    value = get_tensor(loaded, target)
    users = reading.get(target, [])
    if len(users) > 1:
        # The bias is read elsewhere too (the model uses the parameter in its forward, or the
        # layer is called again): this add, and the layer's other calls, get an adjusted
        # copy; the other readers keep the parameter.
        copy = new_persistable(loaded, f"{target}.shift_absorbed_{len(absorbed) + 1}", value)
        (adding or users[0])._rename_input(target, copy)
        absorbed[key] = copy
        target = copy
    else:
        absorbed[key] = target
    if value.size != delta.size:
        raise ValueError(
            f"{record.name}: the bias {target!r} after {op.type} has {value.size} values for "
            f"{delta.size} output channels"
        )
    adjusted = value.astype(np.float64) + delta.reshape(value.shape)
    set_tensor(loaded, target, adjusted.astype(value.dtype))

