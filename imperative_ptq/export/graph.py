"""Small helpers to read and edit a loaded legacy program: who writes and reads a variable,
and the parameter tensors in its scope. ``loaded`` is a :class:`.program.LegacyProgram`."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np
import paddle

from ..rounding import ROUNDING_SHIFT

logger = logging.getLogger(__name__)

__all__ = [
    "FUSABLE_ACTIVATIONS", "ancestors", "bias_add", "bias_of", "channels_last_to_first",
    "complete_batch_norm_parameters", "complete_matmul_widths", "constant_clip_bounds",
    "exact_nearest_resizes", "feeds_quantize", "filters_of_their_own", "fill_constant_value", "get_tensor", "insert_op", "insert_reader_op",
    "insert_zero_bias", "is_persistable", "multiply_instead_of_scaling", "nearest_sources", "new_persistable", "op_index",
    "plain_fp32_blocked_conv_outputs", "producers", "readers", "reduce_open_adaptive_pools",
    "remove_inference_dropouts", "remove_op", "replace_op", "rounding_steps", "rrelus_as_leaky_relus",
    "separate_chained_activations", "set_tensor", "transposed_matmul", "unfused_feature_map_reshapes",
]

Operator = Any  # paddle.base.framework.Operator

def rounding_steps(source: str, rounded: str, shifted: str) -> list[tuple[str, dict, dict, dict]]:
    """``(type, inputs, outputs, attrs)`` of the ops that write ``rounded = round_half_even(source)``
    in a legacy program, through the variable ``shifted``: two ``scale`` ops adding and
    subtracting :data:`ROUNDING_SHIFT`.

    Paddle Inference runs a ``round`` op in a scalar CPU kernel: measured on an AVX2 EPYC,
    370 ms for 1.4M values (a batch of 8 56x56x56 feature maps), where these two scales take
    under 8 ms and give the same values, exact halves included. Magnitudes from ``2**22`` up
    are not rounded exactly: every caller clips the result to codes far below that.
    (Not one ``scale`` with both the multiplier and the shift: oneDNN computes it as one
    fused multiply-add, rounding the exact product, not its float32 form, which moved 5 of
    1.4M codes in the same measurement.)
    """
    return [
        ("scale", {"X": [source]}, {"Out": [shifted]},
         {"scale": 1.0, "bias": ROUNDING_SHIFT, "bias_after_scale": True}),
        ("scale", {"X": [shifted]}, {"Out": [rounded]},
         {"scale": 1.0, "bias": -ROUNDING_SHIFT, "bias_after_scale": True}),
    ]


def producers(block: "paddle.static.Block") -> dict[str, Operator]:
    """Variable name -> the op writing it."""
    return {name: op for op in block.ops for slot in op.output_names for name in op.output(slot)}


def readers(block: "paddle.static.Block") -> dict[str, list[Operator]]:
    """Variable name -> the ops reading it, in program order."""
    found: dict[str, list[Operator]] = {}
    for op in block.ops:
        for slot in op.input_names:
            for name in op.input(slot):
                found.setdefault(name, []).append(op)
    return found


def ancestors(name: str, writers: Mapping[str, Operator]) -> set[str]:
    """Every variable ``name`` is computed from (through any op, parameters included).
    Paddle's oneDNN passes fuse a residual add into a conv only where the residual is one of
    the conv output's ancestors."""
    seen: set[str] = set()
    pending = [name]
    while pending:
        op = writers.get(pending.pop())
        if op is None:
            continue
        for slot in op.input_names:
            for source in op.input(slot):
                if source not in seen:
                    seen.add(source)
                    pending.append(source)
    return seen


def insert_op(block: "paddle.static.Block", index: int, **op: Any) -> Operator:
    """``block._insert_op`` without Paddle's re-reading of the whole block from its C++
    description on every call (linear in the op count each time: exporting DenseNet-121,
    about 500 insertions, spent 8.8 of its 18.6 s there). Every edit of the export goes
    through Python's ``Block`` API (this, :func:`remove_op`, ``create_var``), which keeps
    both sides in step; code that edits the description directly re-syncs itself."""
    return block._insert_op_without_sync(index, **op)


def remove_op(block: "paddle.static.Block", index: int) -> None:
    """``block._remove_op`` without the re-sync (see :func:`insert_op`)."""
    block._remove_op(index, sync=False)


def replace_op(block: "paddle.static.Block", op: Operator, **new: Any) -> Operator:
    """Puts the op described by ``new`` (:func:`insert_op`'s keywords) where ``op`` was."""
    index = op_index(block, op)
    remove_op(block, index)
    return insert_op(block, index, **new)


def op_index(block: "paddle.static.Block", op: Operator) -> int:
    """The position of ``op`` in ``block.ops`` (by identity)."""
    return next(i for i, candidate in enumerate(block.ops) if candidate is op)


def is_persistable(block: "paddle.static.Block", name: str) -> bool:
    """Whether ``name`` is a parameter (or another persistable variable) of the program."""
    var = block._find_var_recursive(name)
    return var is not None and bool(var.persistable)


def transposed_matmul(op: Operator) -> bool:
    """A matmul_v2 with a transposed operand, which the export leaves in fp32."""
    return op.type == "matmul_v2" and bool(op.attr("trans_x") or op.attr("trans_y"))


def get_tensor(loaded: Any, name: str) -> np.ndarray:
    """A copy of the scope tensor ``name``."""
    return np.array(loaded.scope.find_var(name).get_tensor())


def set_tensor(loaded: Any, name: str, value: np.ndarray) -> None:
    """Sets (or creates) the scope tensor ``name``."""
    loaded.scope.var(name).get_tensor().set(value, paddle.CPUPlace())


def new_persistable(loaded: Any, name: str, value: np.ndarray) -> str:
    """Adds a persistable variable ``name`` holding ``value``; returns its name."""
    block = loaded.program.global_block()
    block.create_var(name=name, shape=list(value.shape), dtype=str(value.dtype), persistable=True)
    set_tensor(loaded, name, value)
    return name


def bias_of(block: "paddle.static.Block", name: str, reading: dict[str, list[Operator]]) -> str | None:
    """The persistable bias added to ``name`` right after its producer (an ``elementwise_add``
    reading ``name`` as X and a parameter as Y), or ``None``; ``reading``: :func:`readers`."""
    add = bias_add(block, name, reading)
    return None if add is None else add.input("Y")[0]


def bias_add(block: "paddle.static.Block", name: str, reading: dict[str, list[Operator]]) -> Operator | None:
    """The op :func:`bias_of` finds, or ``None``."""
    for add in reading.get(name, []):
        if add.type == "elementwise_add" and add.input("X") == [name] and is_persistable(
            block, add.input("Y")[0]
        ):
            return add
    return None


def insert_zero_bias(
    loaded: Any, index: int, op: Operator, output_slot: str, bias_name: str, channels: int,
    axis: int,
) -> str:
    """Puts a zero bias add right after ``op`` (at ``index`` in the block): ``op`` now writes
    ``<output>.unbiased`` and the add writes ``op``'s old output, so its readers, fetch
    targets and recorded layer outputs keep their names. Returns the bias variable."""
    block = loaded.program.global_block()
    out = op.output(output_slot)[0]
    bias = new_persistable(loaded, bias_name, np.zeros([channels], np.float32))
    var = block.var(out)
    unbiased = block.create_var(name=f"{out}.unbiased", shape=var.shape, dtype=var.dtype)
    op._rename_output(out, unbiased.name)
    insert_op(
        block, index + 1, type="elementwise_add", inputs={"X": [unbiased.name], "Y": [bias]},
        outputs={"Out": [out]}, attrs={"axis": axis},
    )
    return bias


def insert_reader_op(
    block: "paddle.static.Block", writer: Operator, name: str, consumers: list[Operator],
    op_type: str, suffix: str, attrs: dict[str, Any] | None = None,
) -> str:
    """Makes ``consumers`` read ``op_type(name)``, a one-input op inserted right after
    ``writer``; returns its output variable ``<name>.<suffix>``."""
    var = block.var(name)
    output = block.create_var(name=f"{name}.{suffix}", shape=var.shape, dtype=var.dtype)
    for consumer in consumers:
        consumer._rename_input(name, output.name)
    index = op_index(block, writer)
    insert_op(
        block, index + 1, type=op_type, inputs={"X": [name]}, outputs={"Out": [output.name]},
        attrs=attrs or {},
    )
    return output.name


#: Ops between a tensor and the quantize op of its int8 reader (the u8 clip in front of it).
_CLIP_OPS = frozenset({"elementwise_min", "clip", "relu"})


def feeds_quantize(op: Operator, reading: dict[str, list[Operator]]) -> bool:
    """Whether ``op`` is a ``quantize_linear``, or a u8 clip (``elementwise_min``/``clip`` ->
    ``relu``) whose output only such an op reads: the way an int8 reader reads a tensor."""
    while op.type in _CLIP_OPS:
        after = reading.get(op.output("Out")[0], [])
        if len(after) != 1:
            return False
        op = after[0]
    return op.type == "quantize_linear"


#: Activations Paddle Inference's oneDNN passes fuse into the conv/fc (or elementwise op) before
#: them.
FUSABLE_ACTIVATIONS = frozenset({
    "relu", "relu6", "leaky_relu", "sigmoid", "tanh", "swish", "silu", "hard_swish",
    "hard_sigmoid", "gelu", "mish", "abs", "sqrt", "clip", "elu", "exp", "square", "softplus",
})


_FILTER_CONVS = (
    "conv2d", "depthwise_conv2d", "conv3d", "conv2d_transpose", "depthwise_conv2d_transpose",
    "conv3d_transpose",
)


def filters_of_their_own(loaded: Any) -> int:
    """Gives each conv op that shares its filter with an earlier one, where a ``batch_norm``
    reads one of them, a copy of that filter (and of its bias) of its own.

    A conv layer called more than once writes one conv op per call, all reading its filter
    (a siamese encoder, a detection head shared by the pyramid levels with a BatchNorm per
    level). Paddle Inference's conv + BatchNorm fuse passes fold each BatchNorm into the
    filter and bias the conv op reads, in place: a shared filter is folded once per call and
    calls without that BatchNorm read the folded filter too (measured: one conv, a BatchNorm
    per call, 1.4 of the largest output off the simulation; 2e-7 with a copy per call).

    Returns:
        How many filters were copied.
    """
    block = loaded.program.global_block()
    reading = readers(block)
    sharing: dict[str, list[Operator]] = {}
    for op in block.ops:
        if op.type in _FILTER_CONVS and is_persistable(block, op.input("Filter")[0]):
            sharing.setdefault(op.input("Filter")[0], []).append(op)
    copied = 0
    for name, convs in sharing.items():
        if len(convs) < 2 or not any(_normalized_output(block, conv, reading) for conv in convs):
            continue
        value = get_tensor(loaded, name)
        for call, conv in enumerate(convs[1:], start=2):
            conv._rename_input(name, new_persistable(loaded, f"{name}.call_{call}", value))
            add = bias_add(block, conv.output("Output")[0], reading)
            if add is not None:
                bias = add.input("Y")[0]
                add._rename_input(bias, new_persistable(loaded, f"{bias}.call_{call}", get_tensor(loaded, bias)))
            copied += 1
    copied += _norms_of_their_own(loaded, block)
    if copied:
        loaded.program._sync_with_cpp()
    return copied


#: A ``batch_norm`` op's parameter slots, and the outputs that alias its statistics.
_NORM_PARAMETERS = ("Scale", "Bias", "Mean", "Variance")
_NORM_STATISTICS_OUTPUTS = {"MeanOut": "Mean", "VarianceOut": "Variance"}


def _norms_of_their_own(loaded: Any, block: "paddle.static.Block") -> int:
    """Gives each ``batch_norm`` op that shares its parameters with an earlier one (a BatchNorm
    layer called more than once: a residual block applied twice) copies of its own.

    Paddle Inference's conv + BatchNorm fuse passes leave a BatchNorm whose parameters another
    op reads unfused (measured: a residual block applied twice ran each conv int8 with an fp32
    output, its BatchNorm and residual add in float, 0.2 of the largest output off the
    simulation of fused int8 convs).
    """
    sharing: dict[str, list[Operator]] = {}
    for op in block.ops:
        if op.type == "batch_norm" and is_persistable(block, op.input("Scale")[0]):
            sharing.setdefault(op.input("Scale")[0], []).append(op)
    copied = 0
    for norms in sharing.values():
        for call, norm in enumerate(norms[1:], start=2):
            for slot in _NORM_PARAMETERS:
                name = norm.input(slot)[0]
                copy = new_persistable(loaded, f"{name}.call_{call}", get_tensor(loaded, name))
                norm._rename_input(name, copy)
                for output, source in _NORM_STATISTICS_OUTPUTS.items():
                    if source == slot and norm.output(output) == [name]:
                        norm._rename_output(name, copy)
            copied += 1
    return copied


def _normalized_output(block: "paddle.static.Block", conv: Operator, reading: dict[str, list[Operator]]) -> bool:
    """Whether a ``batch_norm`` reads ``conv``'s output, or that output plus its bias."""
    output = conv.output("Output")[0]
    add = bias_add(block, output, reading)
    if add is not None:
        output = add.output("Out")[0]
    return any(op.type == "batch_norm" for op in reading.get(output, []))


def rrelus_as_leaky_relus(block: "paddle.static.Block") -> int:
    """Writes each eval-mode ``rrelu`` (``nn.RReLU`` in inference) as the ``leaky_relu`` it
    computes, of slope ``(lower + upper) / 2``.

    Paddle 3.3.1 saves the op without its ``Noise`` output, which its kernel writes even in
    eval mode: Paddle Inference built the predictor and failed at the first run ("Required
    tensor shall not be nullptr ... [operator < rrelu > error]"), for the fp32 export too.

    Returns:
        How many ops were rewritten.
    """
    rewritten = 0
    for op in list(block.ops):
        if op.type != "rrelu" or not op.attr("is_test"):
            continue
        slope = float(np.float32((op.attr("lower") + op.attr("upper")) / 2.0))
        replace_op(
            block, op, type="leaky_relu", inputs={"X": op.input("X")}, outputs={"Out": op.output("Out")},
            attrs={"alpha": slope},
        )
        rewritten += 1
    return rewritten


def remove_inference_dropouts(loaded: Any, records: Sequence[Any]) -> int:
    """Removes each inference ``dropout`` (``upscale_in_train``: the identity at inference), its
    readers reading its input instead, and renames its output to its input in the ``records``'
    calls.

    Paddle Inference's passes delete these ops and then fuse what was on either side of one (a
    conv and BatchNorm before it with the residual add after it); the passes of this export
    that decide where int8 ops meet float ones must see that graph (measured: an EfficientNet
    block's projection conv -> BatchNorm -> dropout -> residual add, simulated int8, ran fp32
    in Paddle Inference: 5.5e-3 of the largest output off). A dropout whose output the program
    returns stays.

    Returns:
        How many dropouts were removed.
    """
    block = loaded.program.global_block()
    fetched = {var.name for var in loaded.fetch_vars}
    reading = readers(block)
    aliases: dict[str, str] = {}
    for index in reversed(range(len(block.ops))):
        op = block.ops[index]
        inference_identity = op.type == "dropout" and op.attr("dropout_implementation") == "upscale_in_train"
        if not inference_identity or op.output("Out")[0] in fetched:
            continue
        source, out = op.input("X")[0], op.output("Out")[0]
        moved = reading.pop(out, [])
        for reader in moved:
            reader._rename_input(out, source)
        # (Last to first: a dropout of a dropout finds the readers it now has.)
        reading[source] = [reader for reader in reading.get(source, []) if reader is not op] + moved
        remove_op(block, index)
        aliases[out] = source
    if not aliases:
        return 0

    def original(name: str) -> str:
        while name in aliases:
            name = aliases[name]
        return name

    for record in records:
        record.calls = [
            ([original(name) for name in inputs], None if output is None else original(output))
            for inputs, output in record.calls
        ]
    return len(aliases)


def separate_chained_activations(block: "paddle.static.Block") -> int:
    """Puts an identity ``scale`` between two activations in a row (``relu`` then ``sigmoid``).

    Paddle 3.3.1's oneDNN passes fuse the first into the conv/fc before it and then the second
    into the same op, replacing the first (measured, fp32: conv -> ReLU -> sigmoid computed as
    conv -> sigmoid, 50% of the largest output off; fc -> GELU -> tanh 82%; fc -> abs -> sqrt
    NaN). With the ``scale`` between them the second runs on its own. An inference ``dropout``
    between them (which Paddle removes) does not separate them.

    Returns:
        How many separators were inserted.
    """
    reading = readers(block)

    def activation_follows(reader: Operator) -> bool:
        if reader.type in FUSABLE_ACTIVATIONS:
            return True
        # An inference dropout: Paddle removes it, joining what is on either side.
        return reader.type == "dropout" and any(
            activation_follows(after) for after in reading.get(reader.output("Out")[0], [])
        )

    inserted = 0
    for op in list(block.ops):
        if op.type not in FUSABLE_ACTIVATIONS:
            continue
        out = op.output("Out")[0]
        followers = [reader for reader in reading.get(out, []) if activation_follows(reader)]
        if not followers:
            continue
        insert_reader_op(block, op, out, followers, "scale", "unfused", {"scale": 1.0, "bias": 0.0})
        inserted += 1
    return inserted


#: Matmul ops Paddle's ``reshape_transpose_matmul_onednn_fuse_pass`` fuses a reshape and a
#: transpose into.
_MATMUL_OPS = frozenset({"matmul", "matmul_v2"})


def unfused_feature_map_reshapes(block: "paddle.static.Block") -> int:
    """Puts an ``assign`` between a reshape of a feature map (an input of rank 4 or more) and
    the transpose a matmul reads.

    Paddle 3.3.1's ``reshape_transpose_matmul_onednn_fuse_pass`` folds reshape -> transpose
    into the matmul, which then reads a conv's output (oneDNN's blocked layout) wrongly:
    measured in fp32, conv -> reshape ``[0, C, -1]`` -> transpose -> matmul, 114% of the
    largest output off (any reshape shape; from the network input, a pool or an add, or the
    matmul's other operand, right); PaddleSeg's ANN (non-local attention on conv features)
    0.83 cosine to dygraph (exact without oneDNN). With the ``assign``
    between them the reshape and transpose run on their own. A transformer's head split
    reshapes a Linear's 3-d output and keeps the fusion.

    Returns:
        How many separators were inserted.
    """
    reading = readers(block)
    inserted = 0
    for op in list(block.ops):
        if op.type != "reshape2" or len(block.var(op.input("X")[0]).shape) < 4:
            continue
        out = op.output("Out")[0]
        transposes = [
            reader for reader in reading.get(out, [])
            if reader.type == "transpose2"
            and any(after.type in _MATMUL_OPS for after in reading.get(reader.output("Out")[0], []))
        ]
        if transposes:
            insert_reader_op(block, op, out, transposes, "assign", "unfused")
            inserted += 1
    return inserted


def plain_fp32_blocked_conv_outputs(block: "paddle.static.Block", int8_weights: set[str]) -> int:
    """Puts an ``assign`` after each fp32 conv whose oneDNN kernel writes a blocked layout (with
    its bias add and BatchNorm), in front of whatever reads it.

    Paddle 3.3.1's int8 pipeline cannot quantize a blocked layout for an int8 reader: the
    predictor fails at run with "could not construct a memory descriptor using strides". Two
    fp32 convs write one: a dilated depthwise conv, which oneDNN runs with its ``jit_dw``
    kernel (``aBcd8b`` on AVX2; undilated ones run ``brdgmm_dw``, channels-last; the dilated
    exit flow of Xception's DeepLab variant), and a grouped conv that is not depthwise
    (``aBcd4b`` on AVX-512 CPUs, with 4 or more channels per group; a ResNeXt block's grouped
    3x3 conv on a signed input, which the ``x86`` target keeps fp32). The ``assign`` runs as a
    plain CPU op and hands its readers a plain layout; it sits before the activation, so a ReLU
    still runs as its own ``relu`` op (u8 to Paddle). Int8 convs are not affected.

    Args:
        block: The traced program's block, before quantization.
        int8_weights: Weight variables of the layers quantized in the program.

    Returns:
        How many separators were inserted.
    """
    reading = readers(block)
    inserted = 0
    for op in list(block.ops):
        if not _writes_blocked_layout(op) or op.input("Filter")[0] in int8_weights:
            continue
        writer, name = op, op.output("Output")[0]
        while len(reading.get(name, [])) == 1:
            after = reading[name][0]
            if after.type == "batch_norm" and after.input("X") == [name]:
                writer, name = after, after.output("Y")[0]
            elif after.type == "elementwise_add" and after.input("X") == [name] and is_persistable(
                block, after.input("Y")[0]
            ):
                writer, name = after, after.output("Out")[0]
            else:
                break
        consumers = reading.get(name, [])
        if consumers:
            insert_reader_op(block, writer, name, consumers, "assign", "plain")
            inserted += 1
    return inserted


def _writes_blocked_layout(op: Operator) -> bool:
    """Whether oneDNN's fp32 kernel for ``op`` writes a blocked layout (see
    :func:`plain_fp32_blocked_conv_outputs`)."""
    if op.type == "depthwise_conv2d":
        return any(step != 1 for step in op.attr("dilations"))
    return op.type == "conv2d" and op.attr("groups") > 1


def complete_batch_norm_parameters(loaded: Any) -> int:
    """Gives each ``batch_norm`` without a scale or shift (``nn.BatchNorm1D(C,
    weight_attr=False, bias_attr=False)``, the normalized face embedding of AdaFace's IR nets)
    ones and zeros as parameters, which compute the same.

    Paddle 3.3.1's oneDNN ``batch_norm`` kernel crashes the process without them (a
    segmentation fault at the first run, a plain ``paddle.jit.save`` program too), and ONNX's
    ``BatchNormalization`` requires both.

    Returns:
        How many batch norms were completed.
    """
    block = loaded.program.global_block()
    completed = 0
    for op in block.ops:
        if op.type != "batch_norm":
            continue
        mean = op.input("Mean")[0]
        channels = get_tensor(loaded, mean).shape
        missing = [(slot, value) for slot, value in (("Scale", 1.0), ("Bias", 0.0)) if not op.input(slot)]
        for slot, value in missing:
            name = new_persistable(loaded, f"{mean}.{slot.lower()}", np.full(channels, value, np.float32))
            op.desc.set_input(slot, [name])
        completed += bool(missing)
    if completed:
        loaded.program._sync_with_cpp()
    return completed


def complete_matmul_widths(block: "paddle.static.Block") -> int:
    """Writes the known last dimension into the shapes of matmuls on a weight where the trace
    left it unknown (-1).

    A reshape to a shape computed in the graph (``x.reshape([B, L, -1])`` with ``B, L`` from
    ``paddle.shape``, as attention written by hand merges its heads) traces to an output of
    shape ``[-1, -1, -1]``. Paddle 3.3.1 maps a ``matmul_v2`` to the ``mul``/``fc`` that runs
    int8 only when its input's last dimension equals the weight's first, so the Linear after
    such a reshape stayed an fp32 ``fused_matmul`` in Paddle Inference (measured: a Linear
    the simulation ran int8, 2-8% of the largest output off). The input's last dimension is
    the weight's first (else the matmul would not run), and the output's is the weight's
    second.

    Returns:
        How many matmuls had a dimension written.
    """
    completed = 0
    for op in block.ops:
        if op.type != "matmul_v2" or transposed_matmul(op):
            continue
        weight = block._find_var_recursive(op.input("Y")[0])
        if weight is None or not weight.persistable or len(weight.shape) != 2 or min(weight.shape) < 1:
            continue
        changed = False
        for name, width in ((op.input("X")[0], weight.shape[0]), (op.output("Out")[0], weight.shape[1])):
            var = block._find_var_recursive(name)
            shape = list(var.shape)
            if len(shape) >= 2 and shape[-1] == -1:
                var.desc.set_shape(shape[:-1] + [int(width)])
                changed = True
        completed += changed
    return completed


#: Channels-last ops Paddle 3.3.1's oneDNN kernels get wrong -> (input slot, output slot,
#: layout attribute).
_CHANNELS_LAST_OPS = {
    "conv2d": ("Input", "Output", "data_format"),
    "depthwise_conv2d": ("Input", "Output", "data_format"),
    "conv2d_transpose": ("Input", "Output", "data_format"),
    "batch_norm": ("X", "Y", "data_layout"),
    "pool2d": ("X", "Out", "data_format"),
    "nearest_interp_v2": ("X", "Out", "data_layout"),
    "bilinear_interp_v2": ("X", "Out", "data_layout"),
    "bicubic_interp_v2": ("X", "Out", "data_layout"),
}


def channels_last_to_first(block: "paddle.static.Block") -> int:
    """Runs each channels-last (``NHWC``) convolution, batch norm, pool and 2-d resize on
    ``NCHW``, between two ``transpose2``.

    Paddle 3.3.1's oneDNN passes compute an NHWC conv's output in NCHW and then add its bias
    along the wrong axis: a plain ``paddle.jit.save`` program of ``Conv2D(data_format="NHWC")``
    fails in Paddle Inference with oneDNN ("Broadcast dimension mismatch ... X = [4, 8, 16,
    16] and Y = [1, 1, 1, 8]"), and so did this package's fp32 and int8 exports; an NHWC
    batch norm reads its height as channels ("the shape of scale must equal to [16] ... is
    [8]"), an NHWC pool pools the wrong axes, and an NHWC resize, which oneDNN runs as NCHW,
    handed the next conv its width as channels ("The number of input's channels should be
    equal to filter's channels * groups"). The rewritten op's input and output keep
    their names and layouts, so everything around it is unchanged.

    Returns:
        How many ops were rewritten.
    """
    rewritten = 0
    for op in list(block.ops):
        slots = _CHANNELS_LAST_OPS.get(op.type)
        if slots is None or op.attr(slots[2]) != "NHWC":
            continue
        source, result = op.input(slots[0])[0], op.output(slots[1])[0]
        first = _transposed_var(block, source, (0, 3, 1, 2), f"{source}.nchw_{rewritten}")
        last = _transposed_var(block, result, (0, 3, 1, 2), f"{result}.nchw")
        index = op_index(block, op)
        _insert_transpose(block, index + 1, last, result, (0, 2, 3, 1))
        _insert_transpose(block, index, source, first, (0, 3, 1, 2))
        op._rename_input(source, first)
        op._rename_output(result, last)
        op._set_attr(slots[2], "NCHW")
        rewritten += 1
    return rewritten


def _transposed_var(block: "paddle.static.Block", name: str, order: tuple[int, ...], new_name: str) -> str:
    var = block.var(name)
    shape = list(var.shape)
    block.create_var(name=new_name, shape=[shape[axis] for axis in order], dtype=var.dtype)
    return new_name


def _insert_transpose(block: "paddle.static.Block", index: int, source: str, out: str, order: tuple[int, ...]) -> None:
    shape = list(block.var(source).shape)
    xshape = block.create_var(name=f"{out}.xshape", shape=[0, *shape], dtype=block.var(source).dtype)
    insert_op(
        block, index, type="transpose2", inputs={"X": [source]},
        outputs={"Out": [out], "XShape": [xshape.name]}, attrs={"axis": list(order)},
    )


def fill_constant_value(op: Operator) -> float:
    """The value a ``fill_constant`` op fills with: its ``str_value`` where set (the value as
    written, exact for int64 beyond float precision), else its ``value``."""
    text = op.attr("str_value") if op.has_attr("str_value") else ""
    return float(text) if text else float(op.attr("value"))


def _constant_scalar(loaded: Any, making: dict[str, Operator], name: str) -> float | None:
    """The value of ``name`` when it is one constant number: a one-element ``fill_constant``
    or ``assign_value``, or a one-element persistable variable; else ``None``."""
    block = loaded.program.global_block()
    if is_persistable(block, name):
        value = get_tensor(loaded, name)
        return float(value.reshape(-1)[0]) if value.size == 1 else None
    producer = making.get(name)
    if producer is None or int(np.prod([max(int(d), 0) for d in block.var(name).shape] or [1])) != 1:
        return None
    if producer.type == "fill_constant":
        return fill_constant_value(producer)
    if producer.type == "assign_value":
        for attr in ("fp32_values", "values"):
            if producer.has_attr(attr) and len(producer.attr(attr)) == 1:
                return float(producer.attr(attr)[0])
    return None


def constant_clip_bounds(loaded: Any) -> int:
    """Writes a clip's constant tensor bounds into its ``min`` / ``max`` attributes.

    ``paddle.clip(x, min=t, max=u)`` with tensors (x2paddle writes every ONNX ``Clip``, e.g. a
    ReLU6, so) traces to a clip whose attributes are +-FLT_MAX beside its ``Min`` / ``Max``
    inputs; Paddle 3.3.1's oneDNN passes fuse it into the conv or fc before it by its
    attributes, and the clip vanishes (measured, fp32 and int8 alike: a ReLU6 after a conv
    gave values in [-1.9, 2.9]). A bound computed in the graph keeps its input, and the clip
    is separated from what it reads by an identity ``scale`` so that it runs on its own (the
    oneDNN clip kernel reads the tensors).

    Returns:
        How many clips were rewritten.
    """
    block = loaded.program.global_block()
    making = producers(block)
    rewritten = 0
    for op in list(block.ops):
        if op.type != "clip":
            continue
        computed = False
        for slot, attr in (("Min", "min"), ("Max", "max")):
            names = op.input(slot) if slot in op.input_names else []
            if not names:
                continue
            value = _constant_scalar(loaded, making, names[0])
            if value is None:
                computed = True
                continue
            op._set_attr(attr, value)
            op.desc.set_input(slot, [])
            rewritten += 1
        source = op.input("X")[0]
        if computed and source in making:
            insert_reader_op(block, making[source], source, [op], "scale", f"unfused_clip{op_index(block, op)}",
                             {"scale": 1.0, "bias": 0.0})
    return rewritten


#: Ops oneDNN fuses into the conv/fc that writes their input (its bias, BatchNorm,
#: activation), and the quantize/dequantize pair around an activation.
_FUSED_BEHIND_WEIGHT_OPS = FUSABLE_ACTIVATIONS | {"elementwise_add", "batch_norm", "quantize_linear", "dequantize_linear"}


def _written_by_weight_op(block: "paddle.static.Block", name: str, making: dict[str, Operator]) -> bool:
    """Whether ``name`` is the output of a conv or of a fc (a matmul of a weight), or of ops
    fused into one."""
    op = making.get(name)
    while op is not None and op.type in _FUSED_BEHIND_WEIGHT_OPS:
        op = making.get(op.input("X")[0])
    if op is None:
        return False
    if op.type in ("conv2d", "depthwise_conv2d", "conv2d_transpose"):
        return True
    if op.type not in ("matmul_v2", "matmul", "mul"):
        return False
    weight = op.input("Y")[0]
    writer = making.get(weight)
    return is_persistable(block, weight) or (
        writer is not None and writer.type == "dequantize_linear" and is_persistable(block, writer.input("X")[0])
    )


def multiply_instead_of_scaling(loaded: Any) -> int:
    """Writes a factor applied to a conv's or fc's output (``x * 0.5``, ``paddle.scale``, a
    ``Dropout(mode="downscale_in_infer")`` as in PaddleClas heads) as an ``elementwise_mul``
    by a constant.

    Paddle 3.3.1's ``cpu_quantize_squash_pass`` folds a ``scale`` into the ``dequantize`` op
    of an int8 conv/fc output and then folds that dequantize into the conv/fc as an fp32
    output, dropping the factor (measured: conv -> ReLU -> Dropout(0.5) -> Linear, the Linear's
    output 97% of its largest value off; a PP-LCNet head 22%). A multiply is left alone.

    Returns:
        How many ops were rewritten.
    """
    block = loaded.program.global_block()
    making = producers(block)
    rewritten = 0
    for op in list(block.ops):
        if op.type == "scale":
            factor = float(op.attr("scale"))
            if op.attr("bias") != 0.0 or (op.has_attr("ScaleTensor") and op.input("ScaleTensor")):
                continue
        elif op.type == "dropout" and op.attr("dropout_implementation") == "downgrade_in_infer":
            factor = 1.0 - float(op.attr("dropout_prob"))
        else:
            continue
        source, out = op.input("X")[0], op.output("Out")[0]
        if factor in (0.0, 1.0) or not _written_by_weight_op(block, source, making):
            continue
        constant = new_persistable(loaded, f"{out}.factor", np.array([factor], np.float32))
        replace_op(
            block, op, type="elementwise_mul", inputs={"X": [source], "Y": [constant]},
            outputs={"Out": [out]}, attrs={"axis": -1},
        )
        rewritten += 1
    return rewritten


def nearest_sources(size: int, resized: int, scale: float, align_corners: bool) -> np.ndarray:
    """The source index of each output position of Paddle's CPU nearest resize along one axis
    (its float32 arithmetic: ``int(ratio * k)``, ``ratio`` being ``1 / scale`` when a scale
    is given, else ``size / resized``; ``int(ratio * k + 0.5)`` with ``align_corners``)."""
    ratio = np.float32(0.0)
    if resized > 1:
        step = np.float32(1.0 / scale) if scale > 0 else np.float32(size) / np.float32(resized)
        ratio = np.float32(size - 1) / np.float32(resized - 1) if align_corners else step
    positions = ratio * np.arange(resized, dtype=np.float32)
    if align_corners:
        positions = positions + np.float32(0.5)
    return np.minimum(positions.astype(np.int64), size - 1)


def exact_nearest_resizes(loaded: Any) -> int:
    """Replaces each nearest resize that is not a whole-number upscale by two ``index_select``
    of the source rows and columns Paddle's CPU kernel reads.

    oneDNN's nearest resize picks the source around each output pixel's centre; Paddle's CPU
    kernel (what dygraph and the simulation compute) rounds the scaled index down. They agree
    on whole-number upscales only: an 8x8 map resized to 20x20 (or by 1.5) was 0.70 (0.55)
    cosine off in Paddle Inference with oneDNN, in the fp32 export as in the int8 one. A
    resize whose input or output size is not fixed by the input spec is left as is, with a
    warning.

    Returns:
        How many resizes were replaced.
    """
    block = loaded.program.global_block()
    replaced = 0
    writers = producers(block)
    for op in list(block.ops):
        if op.type != "nearest_interp_v2":
            continue
        axes = (2, 3) if op.attr("data_layout") == "NCHW" else (1, 2)
        source, out = op.input("X")[0], op.output("Out")[0]
        sizes = [int(block.var(source).shape[axis]) for axis in axes]
        resized = [int(block.var(out).shape[axis]) for axis in axes]
        scales = [float(value) for value in op.attr("scale")] if op.attr("scale") else []
        if len(scales) != 2 or min(scales) <= 0:
            scales = [-1.0, -1.0]
        sized_by_tensor = any(
            op.input(slot) for slot in ("OutSize", "SizeTensor", "Scale") if slot in op.input_names
        )
        if sized_by_tensor and min(resized) < 1:
            # Sized by another tensor's shape (paddle.shape(other)[2:], a segmentation head's
            # upsample to the skip's size): known where the spec fixes that tensor's size.
            known = _size_from_a_shape(block, op, writers)
            if known is not None:
                resized, sized_by_tensor = known, False
        dynamic = sized_by_tensor or min(sizes + resized) < 1
        if dynamic:
            whole_upscale = not sized_by_tensor and all(scale >= 1 and scale.is_integer() for scale in scales)
        else:
            whole_upscale = all(
                new % old == 0 and (scale <= 0 or scale == new // old)
                for old, new, scale in zip(sizes, resized, scales)
            )
        if (sizes == resized and not dynamic) or (whole_upscale and not op.attr("align_corners")):
            continue
        if dynamic:
            logger.warning(
                "nearest resize %s -> %s: its size is not fixed by the input spec, and Paddle "
                "Inference's oneDNN kernel rounds differently from Paddle's CPU kernel unless it "
                "upscales by a whole number; give the input spec fixed height and width to have "
                "it exported exactly", source, out,
            )
            continue
        current = source
        for step, (axis, old, new, scale) in enumerate(zip(axes, sizes, resized, scales)):
            index = new_persistable(loaded, f"{out}.nearest_sources_{step}",
                                    nearest_sources(old, new, scale, bool(op.attr("align_corners"))))
            if step == len(axes) - 1:
                gathered = out
            else:
                shape = list(block.var(source).shape)
                shape[axis] = new
                gathered = block.create_var(name=f"{out}.nearest_rows", shape=shape, dtype=block.var(source).dtype).name
            position = op_index(block, op)
            insert_op(block, position, type="index_select", inputs={"X": [current], "Index": [index]},
                      outputs={"Out": [gathered]}, attrs={"dim": axis})
            current = gathered
        remove_op(block, op_index(block, op))
        replaced += 1
    return replaced


def _size_from_a_shape(block: "paddle.static.Block", resize: Operator, writers: Mapping[str, Operator]) -> list[int] | None:
    """The output size of a resize whose ``OutSize`` is a slice of a ``shape`` op (through a
    cast), where the sliced dimensions of that tensor are fixed in the traced program; else
    ``None``."""
    if "OutSize" not in resize.input_names or len(resize.input("OutSize")) != 1:
        return None
    op = writers.get(resize.input("OutSize")[0])
    while op is not None and op.type == "cast":
        op = writers.get(op.input("X")[0])
    if op is None or op.type != "slice" or list(op.attr("axes")) != [0] or op.input("StartsTensor") or op.input("EndsTensor"):
        return None
    shape = writers.get(op.input("Input")[0])
    if shape is None or shape.type != "shape":
        return None
    dims = list(block.var(shape.input("Input")[0]).shape)
    start, end = int(op.attr("starts")[0]), int(op.attr("ends")[0])
    size = dims[start:end]
    return [int(d) for d in size] if len(size) == 2 and min(size) >= 1 else None


def reduce_open_adaptive_pools(block: "paddle.static.Block") -> int:
    """Replaces each adaptive pool to one row or one column that keeps the other axis open
    (``nn.AdaptiveAvgPool2D((1, None))``, a CRNN's height pooling) by a ``reduce_mean`` /
    ``reduce_max`` over the pooled axis.

    Paddle traces it as ``pool2d(ksize=[1, -1], adaptive=True)``; where the open axis is
    dynamic in the input spec, Paddle Inference 3.3.1 fails on it at run time ("could not
    construct a memory descriptor using a format tag"; a plain ``paddle.jit.save`` program
    too). The mean or maximum over the pooled axis is the same value. ``AdaptiveMaxPool2D``'s
    index output must be unread.

    Returns:
        How many pools were replaced.
    """
    reading = readers(block)
    replaced = 0
    for op in list(block.ops):
        if op.type not in ("pool2d", "max_pool2d_with_index") or not op.attr("adaptive"):
            continue
        if op.type == "pool2d" and op.attr("data_format") not in ("NCHW", "AnyLayout"):
            continue
        if op.type == "max_pool2d_with_index" and reading.get(op.output("Mask")[0]):
            continue
        ksize = [int(size) for size in op.attr("ksize")]
        if sorted(ksize) != [-1, 1]:
            if -1 in ksize:
                logger.warning(
                    "adaptive pool %s to %s keeps an axis open: Paddle Inference 3.3.1 fails on "
                    "it where that axis is dynamic in the input spec (pooling to 1 there, or a "
                    "mean over the axis, exports)", op.output("Out")[0], ksize,
                )
            continue
        pooled_axis = 2 + ksize.index(1)
        maximum = op.type == "max_pool2d_with_index" or op.attr("pooling_type") == "max"
        source, out = op.input("X")[0], op.output("Out")[0]
        replace_op(
            block, op, type="reduce_max" if maximum else "reduce_mean", inputs={"X": [source]},
            outputs={"Out": [out]}, attrs={"dim": [pooled_axis], "keep_dim": True, "reduce_all": False},
        )
        replaced += 1
    return replaced
