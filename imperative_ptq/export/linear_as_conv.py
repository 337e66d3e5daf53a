"""Linear layers run as 1x1 convs in the Paddle Inference programs of the oneDNN targets.

Paddle 3.3.1's oneDNN int8 pipeline recomputes a fc's per-channel weight scales from runs of
consecutive elements of its ``[in, out]`` weight instead of its columns
(:func:`imperative_ptq.quant_layers.paddle_fc_weight`), and a conv's from each output
channel's own filter; it has no int8 fc at all for an input of rank 4 or more. ``convert``
marks the heads the fc would hurt most
(:func:`imperative_ptq.quant_layers.linear_runs_as_conv`) and the Linear layers on rank-4
inputs (ConvNeXt's channels-last pointwise layers; ``QuantizedLayer.runs_as_conv``) and
simulates them with their own per-channel weight; :func:`matmuls_as_convs` rewrites each of
their traced ``matmul_v2 [-> bias add]`` (an ``nn.Linear`` or a functional matmul on a
parameter, as x2paddle writes them) into

    reshape2 [-1, in, 1, 1] -> conv2d (filter [out, in, 1, 1]) [-> bias add] -> reshape2 [..., out]

before the int8 rewrite, which then quantizes the conv like any other, so that Paddle runs the
weight the simulation computes with. The ONNX export keeps the matmul (ONNX Runtime takes the
stored per-channel scales as they are).
"""

from __future__ import annotations

from typing import Any, MutableMapping

import numpy as np

from .graph import bias_of, get_tensor, insert_op, new_persistable, readers, remove_op, transposed_matmul

__all__ = ["matmuls_as_convs"]


def matmuls_as_convs(loaded: Any, weights: MutableMapping[str, Any]) -> int:
    """Rewrites every ``matmul_v2`` on the weight of a record marked ``runs_as_conv`` into a
    1x1 conv between two reshapes; the output keeps its name (readers, fetch targets and
    recorded layer outputs are unchanged). ``weights`` (weight name -> record) gets the filter
    in place of the weight, the record's weight name and axis follow.

    Args:
        loaded: The traced program (:class:`.program.LegacyProgram`).
        weights: The calibrated weights by name, from :func:`.program.collect_scales`.

    Returns:
        How many matmuls were rewritten.
    """
    block = loaded.program.global_block()
    filters: dict[str, str] = {}
    rewritten = 0
    index = 0
    while index < len(block.ops):
        op = block.ops[index]
        weight = op.input("Y")[0] if op.type == "matmul_v2" else None
        record = weights.get(weight) if weight is not None else None
        if record is None or not record.runs_as_conv or transposed_matmul(op):
            index += 1
            continue
        if weight not in filters:
            filters[weight] = new_persistable(loaded, f"{weight}.filter", _as_filter(get_tensor(loaded, weight)))
        index = _rewrite(loaded, index, op, filters[weight])
        rewritten += 1
    for weight, filter_name in filters.items():
        record = weights.pop(weight)
        record.weight_name, record.weight_axis, record.layer_type = filter_name, 0, "Conv2D"
        if record.grid_weight is not None:
            record.grid_weight = _as_filter(record.grid_weight)
        weights[filter_name] = record
    if rewritten:
        loaded.program._sync_with_cpp()
    return rewritten


def _as_filter(weight: Any) -> np.ndarray:
    """A Linear's ``[in, out]`` weight as the ``[out, in, 1, 1]`` filter of its 1x1 conv."""
    return np.ascontiguousarray(np.asarray(weight, dtype=np.float32).T)[:, :, None, None]


def _rewrite(loaded: Any, index: int, op: Any, filter_name: str) -> int:
    """Replaces the matmul ``op`` at ``index`` (and the bias add that alone reads it) by the
    reshape -> conv -> [bias add ->] reshape chain; returns the index after it."""
    block = loaded.program.global_block()
    source, out = op.input("X")[0], op.output("Out")[0]
    channels_in, channels_out = (int(size) for size in block.var(filter_name).shape[1::-1])
    leading = [int(size) for size in block.var(out).shape[:-1]]
    reading = readers(block)
    bias = bias_of(block, out, reading)
    # The bias add alone reads the matmul: it moves before the reshape, where Paddle fuses it.
    alone = bias is not None and len(reading[out]) == 1 and list(block.var(bias).shape) == [channels_out]
    bias_add = reading[out][0] if alone else None
    final = bias_add.output("Out")[0] if bias_add is not None else out
    dtype = block.var(out).dtype
    stem = f"{out}.as_conv"

    def variable(suffix: str, shape: list[int]) -> str:
        return block.create_var(name=f"{stem}.{suffix}", shape=shape, dtype=dtype).name

    remove_op(block, index)
    ops: list[dict] = []
    flat = variable("input", [-1, channels_in, 1, 1])
    ops.append(dict(
        type="reshape2", inputs={"X": [source]},
        outputs={"Out": [flat], "XShape": [variable("input_shape", [0, *block.var(source).shape])]},
        attrs={"shape": [-1, channels_in, 1, 1]},
    ))
    convolved = variable("output", [-1, channels_out, 1, 1])
    ops.append(dict(
        type="conv2d", inputs={"Input": [flat], "Filter": [filter_name]}, outputs={"Output": [convolved]},
        attrs={"strides": [1, 1], "paddings": [0, 0], "dilations": [1, 1], "groups": 1,
               "data_format": "NCHW", "padding_algorithm": "EXPLICIT"},
    ))
    if bias_add is not None:
        biased = variable("biased", [-1, channels_out, 1, 1])
        ops.append(dict(
            type="elementwise_add", inputs={"X": [convolved], "Y": bias_add.input("Y")},
            outputs={"Out": [biased]}, attrs={"axis": 1},
        ))
        convolved = biased
    shape_inputs: dict = {}
    if sum(size < 0 for size in leading) > 1:
        # Several dynamic leading dimensions: read them from the input at run time.
        whole = block.create_var(name=f"{stem}.source_shape", shape=[len(leading) + 1], dtype="int32").name
        ops.append(dict(type="shape", inputs={"Input": [source]}, outputs={"Out": [whole]}, attrs={}))
        dims = []
        for axis, size in enumerate([*leading, channels_out]):
            dim = block.create_var(name=f"{stem}.dim{axis}", shape=[1], dtype="int32").name
            if size < 0:
                ops.append(dict(
                    type="slice", inputs={"Input": [whole]}, outputs={"Out": [dim]},
                    attrs={"axes": [0], "starts": [axis], "ends": [axis + 1], "decrease_axis": [], "infer_flags": [1]},
                ))
            else:  # int32 (VarType 2)
                ops.append(dict(
                    type="fill_constant", inputs={}, outputs={"Out": [dim]},
                    attrs={"shape": [1], "dtype": 2, "value": float(size)},
                ))
            dims.append(dim)
        shape_inputs = {"ShapeTensor": dims}
    ops.append(dict(
        type="reshape2", inputs={"X": [convolved], **shape_inputs},
        outputs={"Out": [final], "XShape": [variable("output_shape", [0, -1, channels_out, 1, 1])]},
        attrs={"shape": [] if shape_inputs else [*leading, channels_out]},
    ))
    final_shape = list(block.var(final).shape)
    for offset, spec in enumerate(ops):
        insert_op(block, index + offset, **spec)
    # Shape inference of a reshape to run-time dimensions leaves none; a rewrite of a layer
    # reading this output reads them.
    block.var(final).desc.set_shape(final_shape)
    index += len(ops)
    if bias_add is not None:
        position = next(i for i, candidate in enumerate(block.ops) if candidate is bias_add)
        remove_op(block, position)
    return index
