"""u8 inputs for x86: every non-negative int8 input within codes 0..127.

Paddle Inference's oneDNN pipeline runs a tensor as u8 only when it is a ReLU output (a ``relu``
op, or a ``relu``/``relu6`` fused into the conv/fc before it) and maps its threshold ``S`` onto
0..255. The x86 targets (:mod:`imperative_ptq.targets`) need codes 0..127, exactly the
simulation's ``clip(round(x / t * 127), 0, 127)``: :func:`unsigned_threshold` writes
``S = t * 255 / 127``, and the values above ``t`` must be clipped before they are quantized.

* A ReLU (or ReLU6) fused into its conv and read only by int8 layers quantizing it at one
  threshold ``t`` becomes a ``relu6`` (clip at 6, fused for free) on a tensor scaled by ``k = 6 / t``:
  the conv's output (its weights and bias, or the BatchNorm after it) is multiplied by
  ``k``, the readers' weights divided by it and their threshold becomes 6. Integer weights are
  unchanged; only float scales move. (Paddle 3.3.1's ``relu6`` has no threshold attribute:
  oneDNN's fused clip is always at 6.) Max-pools between the ReLU and those layers are looked
  through: Paddle pools the u8 codes in int8, and a maximum commutes with the scaling and the
  clip, so the readers read the pool's codes with no fp32 round trip in between.
* A fc's ReLU (or ReLU6, whose threshold is at most 6) read only by such layers, fused into
  the fc (a bias add at most in between), becomes or stays a ``relu`` (Paddle runs a fc's
  fused relu6 as s8, a fused relu as u8) and gets a ``relu6`` after it, on the fc's output
  scaled the same way; Paddle fuses both into the fc, which writes codes 0..127 straight
  into its readers.
  Paddle's fc recomputes its int8 weight from the stored one, in float32, so the factor is
  one near ``6 / t`` with which the scaled fcs keep the weight codes the simulation computes
  with (:func:`_codes_keeping_factor`), and the readers' threshold is ``t`` times it; where
  none does, the ReLU is clipped as below.
* Any other non-negative input (a network input, a pooling, reshape or sigmoid output, a ReLU
  after a BatchNorm, a fc's ReLU without such a factor) gets ``relu(clip(x, 0, t))``
  in front of its quantize op (:func:`insert_clip_relu`); the ``relu`` is what makes Paddle
  run the result as u8. After a fc this is an fp32 round trip between two int8 fcs: exactness
  first (a fc -> ReLU -> fc with KL thresholds is 8% off the simulation without it).
* The one exception: a ReLU after a conv's residual add (:func:`relu_after_residual_conv`,
  ResNet's block outputs) keeps its ReLU: values up to ``t`` land on codes 0..127, values
  above ``t`` on codes 128..255 (up to ``2 t``), which the simulation's readers read too where
  calibration saw the residual add (:mod:`imperative_ptq.quant_residual`; elsewhere it clips
  at 127). A clip there halves the int8 speed-up (measured: ResNet-18 int8 at batch 8 2.5x fp32
  instead of 5.0x on this project's AMX CPU); without VNNI two such values in one pair can
  saturate (measured logit cosine to the simulation on random-weight ResNet-18: 0.9992, AVX2
  kernels and VNNI alike).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Mapping

import numpy as np

from ..quantizers.qparams import symmetric_levels
from .graph import get_tensor, insert_op, is_persistable, new_persistable, producers, readers, set_tensor
from .graph import insert_reader_op, op_index, replace_op, transposed_matmul
from .tracing import LayerRecord

logger = logging.getLogger(__name__)

__all__ = [
    "RELU6_CLIP", "RELU6_U8_PRODUCERS", "FusedReluClips", "clip_concat_inputs", "clip_fused_relus",
    "fusable_relu_source", "gemm_output", "insert_clip_relu", "relu_after_residual_conv", "shared_output_clips",
    "removed_dropout", "runs_unsigned",
    "unsigned_threshold",
]

#: Where oneDNN's fused ``relu6`` clips (Paddle 3.3.1 ignores any threshold attribute).
RELU6_CLIP = 6.0

#: Ops oneDNN fuses into the conv/fc before them, keeping the fused op's output.
_FUSED_INTO_PRODUCER = ("batch_norm", "elementwise_add")
#: Ops into which a following ``relu``/``relu6`` is fused as the activation.
FUSING_OPS: dict[str, tuple[str, str]] = {  # op type -> (weight slot, input slot)
    "conv2d": ("Filter", "Input"),
    "depthwise_conv2d": ("Filter", "Input"),
    "matmul_v2": ("Y", "X"),
    "mul": ("Y", "X"),
}


#: Ops that Paddle Inference runs as its oneDNN ``fc``.
FC_OPS = ("matmul_v2", "mul")

#: How many factors the fc route tries for one that keeps the weight codes Paddle's fc
#: recomputes (:func:`clip_fused_relus`): ``6 / t`` first, then others spread over
#: :data:`FACTOR_WINDOW` either side.
FACTOR_CANDIDATES = 128
#: Largest relative distance of such a factor from ``6 / t``: the fused clip at 6 then lands
#: within a quarter code of ``t`` (half a code keeps the codes 0..127 and their saturation).
FACTOR_WINDOW = 0.25 / 127

#: Producers whose fused ``relu6`` output Paddle runs as u8. A fc's is s8 (measured: Paddle
#: 3.3.1 fuses the fc activation after deciding signedness, and only a ``relu`` op counts then).
RELU6_U8_PRODUCERS = frozenset({"conv2d", "depthwise_conv2d"})


def unsigned_threshold(threshold: float, bits: int) -> float:
    """The threshold to write for a tensor Paddle Inference runs as u8, so that its grid is the
    simulation's ``round(x / t * L)`` on ``0..L``.

    Paddle's ``cpu_quantize_pass`` maps a u8 tensor's threshold ``S`` onto 0..255
    (``q = round(x * 255 / S)``); written as ``S = t * 255 / L`` the codes stay within 0..127,
    where no int16 pair of ``vpmaddubsw`` can saturate (2 * 127 * 127 < 32767).
    """
    return float(threshold) * 255.0 / symmetric_levels(bits)


#: Activations after which Paddle 3.3.1 fuses a ``clip`` op into the conv/fc too, replacing
#: them: a ReLU fused into a fc before its activation pass runs, and ``abs``, which its passes
#: fuse first (they walk their activation list in order, ``abs`` before ``clip``; measured: conv
#: -> abs -> the u8 clip of an int8 conv's input ran as conv + ReLU, 54% of the largest output
#: off the simulation; Linear -> abs -> Linear 71%).
_FUSED_BEFORE_A_CLIP = ("relu", "relu6", "abs")


def gemm_output(writers: Mapping, name: str, through_activations: bool = False) -> bool:
    """Whether ``name`` is a conv/fc output (after its bias add or BatchNorm, if any, and with
    ``through_activations`` after an activation of :data:`_FUSED_BEFORE_A_CLIP` fused into it);
    ``writers``: variable -> op."""
    passed = _FUSED_INTO_PRODUCER + (_FUSED_BEFORE_A_CLIP if through_activations else ())
    source = writers.get(name)
    while source is not None and (source.type in passed or removed_dropout(source)):
        source = writers.get(source.input("X")[0])
    return source is not None and source.type in FUSING_OPS


def removed_dropout(op) -> bool:
    """An inference dropout, which Paddle Inference removes (``upscale_in_train``: the identity
    at inference): what follows it is fused into what precedes it (measured: fc -> ReLU ->
    Dropout -> clip ran as fc + plain ReLU, the clip's bound dropped, 16% of the largest
    output off)."""
    return op.type == "dropout" and op.attr("dropout_implementation") == "upscale_in_train"


def relu_after_residual_conv(block, name: str, writers: Mapping) -> bool:
    """Whether ``name`` is the output of a ReLU after a residual add of a conv output, which
    oneDNN fuses into one int8 conv: clipping it would cost an fp32 round trip between int8
    convs (ResNet's block outputs)."""
    relu = writers.get(name)
    if relu is None or relu.type != "relu":
        return False
    add = writers.get(relu.input("X")[0])
    if add is None or add.type != "elementwise_add" or is_persistable(block, add.input("Y")[0]):
        return False
    return any(
        gemm_output(writers, operand) for slot in ("X", "Y") for operand in add.input(slot)
    )


def runs_unsigned(block, name: str, writers: Mapping, int8_weights: bool = False) -> bool:
    """Whether Paddle's oneDNN int8 pipeline runs variable ``name`` as u8.

    Its ``compute_propagate_scales_onednn_pass`` marks unsigned only the outputs of ``relu``
    ops and of convs with a fused ``relu6`` (:data:`RELU6_U8_PRODUCERS`); every other tensor
    with its own scale is s8, whatever its values. ``int8_weights``: see
    :func:`fusable_relu_source` (once the program's weights are quantized).
    """
    op = writers.get(name)
    if op is None or op.type not in ("relu", "relu6"):
        return False
    if op.type == "relu":
        return True
    before = writers.get(op.input("X")[0])
    if before is not None and before.type == "relu":
        return True
    found = fusable_relu_source(block, op, writers, int8_weights)
    return found is not None and found[0].type in RELU6_U8_PRODUCERS


def signed_inputs_of_halved_convs(loaded, records: list[LayerRecord]) -> int:
    """Puts an identity ``scale`` between a ReLU and each conv op of a halved layer reading it.

    A conv layer whose calibration saw a signed input runs on halved weights in every call
    (:mod:`imperative_ptq.halved_convs`), but oneDNN halves only where it reads s8: a call on
    a ReLU's output, which Paddle runs as u8 (:func:`runs_unsigned`), got the full 8-bit
    weights (measured: ``conv(relu(conv(x)))`` with one conv, the second call 7.3e-2 of the
    largest output off the simulation). Behind the scale the input is s8, on the codes
    ``0..127`` of the layer's threshold either way.

    Returns:
        How many calls were given the scale.
    """
    block = loaded.program.global_block()
    halved = {record.weight_name: record for record in records if record.halved}
    if not halved:
        return 0
    writers = producers(block)
    reading = readers(block)
    steered = 0
    for name in list(reading):
        convs = [
            op for op in reading[name]
            if op.type in ("conv2d", "depthwise_conv2d") and op.input("Filter")[0] in halved
            and op.input("Input") == [name]
        ]
        if not convs or not runs_unsigned(block, name, writers):
            continue
        signed = insert_reader_op(block, writers[name], name, convs, "scale", "s8", {"scale": 1.0, "bias": 0.0})
        for record in {id(halved[op.input("Filter")[0]]): halved[op.input("Filter")[0]] for op in convs}.values():
            record.calls = [
                ([signed if item == name else item for item in inputs], output)
                for inputs, output in record.calls
            ]
        steered += len(convs)
    if steered:
        loaded.program._sync_with_cpp()
        logger.info("%d calls of halved convs on ReLU outputs read them through an s8 scale", steered)
    return steered


def insert_clip_relu(loaded, index: int, name: str, threshold: float, writers: Mapping) -> str:
    """Inserts ``relu(clip(name, 0, threshold))`` at ``index``; returns its output variable.

    The clip makes values above the threshold saturate where the simulation's do (at code 127,
    not 255); the relu makes Paddle's int8 pipeline run the result as u8. Right after a conv
    or fc (which a ReLU output never is here, but a non-negative linear output may be) the clip
    is an ``elementwise_min``: Paddle 3.3.1 fuses a ``clip`` op after a fc into the fc as a
    plain ReLU (oneDNN verbose ``eltwise_relu:0:<max>``), dropping the upper bound; elsewhere
    it is a ``clip`` op, which oneDNN runs about as fast as the ReLU. (So after a conv/fc and
    the ReLU fused into it too: measured, a ``clip`` after a fc's ReLU was dropped, 8% off.)
    """
    block = loaded.program.global_block()
    var = block.var(name)
    stem = f"{name}.u8_{len(block.ops)}"
    clipped = block.create_var(name=stem + ".clipped", shape=var.shape, dtype=var.dtype)
    out = block.create_var(name=stem + ".rectified", shape=var.shape, dtype=var.dtype)
    if gemm_output(writers, name, through_activations=True):
        bound = new_persistable(loaded, stem + ".max", np.array([threshold], dtype=np.float32))
        insert_op(
            block, index, type="elementwise_min", inputs={"X": [name], "Y": [bound]},
            outputs={"Out": [clipped.name]}, attrs={"axis": -1},
        )
    else:
        insert_op(
            block, index, type="clip", inputs={"X": [name]}, outputs={"Out": [clipped.name]},
            attrs={"min": 0.0, "max": float(threshold)},
        )
    insert_op(
        block, index + 1, type="relu", inputs={"X": [clipped.name]}, outputs={"Out": [out.name]}
    )
    return out.name


def shared_output_clips(loaded) -> int:
    """Rewrites each u8 clip :func:`insert_clip_relu` wrote as an ``elementwise_min`` whose
    input other ops read too as a ``clip`` op (in place on ``loaded``).

    The ``elementwise_min`` keeps Paddle from fusing the bound into the conv/fc writing the
    input as a plain ReLU; it cannot fuse where the input has other readers (its writer's
    output is no intermediate then), and Paddle Inference runs ``elementwise_min`` by a
    constant in a broadcasting CPU kernel, where oneDNN runs ``clip``: measured on an AVX2
    EPYC, 2.8 ms against 0.6 ms a call on 8 x 32 x 56 x 56 values, 17% of an HRNet-shaped
    stack's int8 time (``benchmarks/coded_float_ops.py``, whose high-resolution branches each
    feed a conv and a float add).

    Returns:
        How many clips were rewritten.
    """
    block = loaded.program.global_block()
    reading = readers(block)
    rewritten = 0
    for op in list(block.ops):
        if op.type != "elementwise_min" or not _u8_clip(block, op, reading):
            continue
        source, out = op.input("X")[0], op.output("Out")[0]
        if len(reading.get(source, [])) < 2:
            continue
        bound = float(get_tensor(loaded, op.input("Y")[0]).reshape(-1)[0])
        replace_op(
            block, op, type="clip", inputs={"X": [source]}, outputs={"Out": [out]},
            attrs={"min": 0.0, "max": bound},
        )
        rewritten += 1
    if rewritten:
        loaded.program._sync_with_cpp()
        logger.info("%d u8 clips of tensors other ops read too run as clip ops", rewritten)
    return rewritten


def _u8_clip(block, op, reading: Mapping) -> bool:
    """Whether ``op`` (an ``elementwise_min``) is a u8 clip of :func:`insert_clip_relu`: a
    minimum with a one-value parameter, read by one ReLU (so a lower bound of 0 changes
    nothing)."""
    bound = op.input("Y")[0]
    after = reading.get(op.output("Out")[0], [])
    return (
        is_persistable(block, bound) and int(np.prod(block.var(bound).shape)) == 1
        and len(after) == 1 and after[0].type == "relu"
    )


@dataclasses.dataclass
class FusedReluClips:
    """What :func:`clip_fused_relus` changed.

    Attributes:
        thresholds: ReLU (now relu6) output variable -> the threshold its readers now
            quantize it with (:data:`RELU6_CLIP`).
        weight_factors: Weight variable -> factor its thresholds were multiplied by (the
            weight tensor itself was multiplied by it too).
    """

    thresholds: dict[str, float] = dataclasses.field(default_factory=dict)
    weight_factors: dict[str, float] = dataclasses.field(default_factory=dict)


def fusable_relu_source(block, op, writers: Mapping, int8_weights: bool = False) -> tuple[object, list] | None:
    """For an activation ``op``, the conv/fc oneDNN fuses it into and the ops between
    (``writers``: variable -> the op writing it, :func:`.graph.producers`). ``int8_weights``:
    a weight the program already stores int8 (read through its ``dequantize_linear``) counts
    as the parameter it is.

    Returns:
        ``(producer, chain)`` with ``chain`` the batch_norm / bias-add ops in between (nearest
        first), or ``None`` when the activation would run on its own.
    """
    chain = []
    source = writers.get(op.input("X")[0])
    while source is not None and source.type in _FUSED_INTO_PRODUCER:
        if source.type == "elementwise_add" and not is_persistable(block, source.input("Y")[0]):
            return None  # a residual add: fused too, but its other operand is not ours to scale
        chain.append(source)
        source = writers.get(source.input("X")[0])
    if source is None or source.type not in FUSING_OPS or transposed_matmul(source):
        return None
    weight = source.input(FUSING_OPS[source.type][0])[0]
    dequantize = writers.get(weight) if int8_weights else None
    if dequantize is not None and dequantize.type == "dequantize_linear":
        weight = dequantize.input("X")[0]
    if not is_persistable(block, weight):
        return None
    return source, chain


def clip_fused_relus(
    loaded, weights: Mapping[str, LayerRecord], outputs: dict[str, float]
) -> FusedReluClips:
    """Turns each fused ReLU read only by u8 int8 layers of one threshold into a scaled relu6
    (see the module docstring). Rewrites ``loaded`` in place and the ReLU output thresholds
    in ``outputs``.

    Args:
        loaded: The fp32 program (a :class:`.program.LegacyProgram`), biases already folded.
        weights: Weight variable -> record of the calibrated layer reading it.
        outputs: Output thresholds by variable (updated for the rescaled tensors).
    """
    block = loaded.program.global_block()
    reading = readers(block)
    writers = producers(block)
    result = FusedReluClips()
    for name, relu in list(writers.items()):
        if relu.type not in ("relu", "relu6"):
            continue
        pooled: list[str] = []
        readers_found = _u8_readers(name, reading, weights, result, pooled=pooled)
        if readers_found is None:
            continue
        threshold, weight_names = readers_found
        found = fusable_relu_source(block, relu, writers)
        # (A BatchNorm between stays an op of its own: Paddle fuses neither it nor the relu6
        # into the fc then, and runs the relu6 output s8, measured 42% off.)
        after_fc = (
            found is not None and found[0].type in FC_OPS
            and all(op.type == "elementwise_add" for op in found[1])
        )
        if found is None or (found[0].type not in RELU6_U8_PRODUCERS and not after_fc):
            continue
        if relu.type == "relu6" and threshold > RELU6_CLIP:
            continue  # a relu6 already clips below the threshold; scaling would lift it
        factor = RELU6_CLIP / threshold
        if after_fc:
            if pooled:
                continue
            factor = _codes_keeping_factor(loaded, reading, weights, found, weight_names, result, factor)
            if factor is None:
                continue
        steering = _halved_steering(loaded, weights, found, factor)
        if steering is None:
            continue
        # A fc that reads one such ReLU and writes the next is scaled as both (factors multiplied).
        if not _scale_producer(loaded, reading, found, factor, result, compose=after_fc):
            continue
        _steer(weights, steering)
        for weight_name in weight_names:
            _scale_tensor(loaded, weight_name, 1.0 / factor)
            result.weight_factors[weight_name] = 1.0 / factor
        if after_fc:
            _relu6_after(block, relu)
            # The readers' grid is the simulation's (t, scaled by the factor): the clip at 6
            # lands within half a code of t (FACTOR_WINDOW), where the codes saturate at 127.
            result.thresholds[name] = threshold * factor
        else:
            relu.desc.set_type("relu6")
            result.thresholds[name] = RELU6_CLIP
        if pooled:
            # The pools hand the relu6's codes on: one grid, that of the readers (scaled).
            for tensor in (name, *pooled):
                outputs[tensor] = RELU6_CLIP
                result.thresholds[tensor] = RELU6_CLIP
        elif name in outputs:
            outputs[name] = outputs[name] * factor
    if result.thresholds:
        loaded.program._sync_with_cpp()
    return result


def _halved_steering(
    loaded, weights: Mapping[str, LayerRecord], found, factor: float
) -> dict[str, np.ndarray] | None:
    """The thresholds with which the relu6 route may scale a halved conv's stored thresholds
    by ``factor`` (:mod:`imperative_ptq.halved_convs`), by weight variable: none for another
    producer, ``None`` where it cannot (the ReLU keeps the clip route). Nothing is changed
    here: :func:`_steer` sets them once the producer is scaled.

    Paddle halves each channel's abs-max (code 127) to ``rint(63.5 +- noise)``, the noise of
    the float32 arithmetic on the stored threshold ``T`` (its every other code is even, whose
    halving no noise moves: :func:`imperative_ptq.quant_layers.halved_grid_integers`).
    Scaled to ``T * factor`` it can go the other way (measured: an EDSR-style net 1.2e-2 of
    the largest output off the simulation). So each channel's threshold moves by a few float32
    steps to one whose scaled value halves its abs-max as the simulation's does from ``T``
    (:func:`imperative_ptq.quant_layers.steered_thresholds`; the weights it stores move by as
    much: float32 noise). A channel without a code of 127, or with an odd code besides it, has
    ties everywhere: refused.
    """
    from ..quant_layers import halved_max_codes, steered_thresholds

    weight_name = found[0].input(FUSING_OPS[found[0].type][0])[0]
    record = weights.get(weight_name)
    if record is None or not record.halved:
        return {}
    thresholds = np.asarray(record.weight_thresholds, np.float32).reshape(-1)
    weight = get_tensor(loaded, weight_name).astype(np.float32)
    levels = symmetric_levels(8)
    if record.traced_weight_bits != 8 or thresholds.size != weight.shape[0]:
        return None
    codes = np.abs(np.rint(weight.reshape(weight.shape[0], -1) / (thresholds / np.float32(levels))[:, None]))
    largest = codes == levels
    if not np.all(largest.any(axis=1)) or np.any((codes % 2 == 1) & ~largest):
        return None
    steered = steered_thresholds(thresholds, halved_max_codes(thresholds), factor)
    return None if steered is None else {weight_name: steered}


def _steer(weights: Mapping[str, LayerRecord], steering: Mapping[str, np.ndarray]) -> None:
    """Sets the thresholds :func:`_halved_steering` found, for the scaled producer."""
    for weight_name, thresholds in steering.items():
        weights[weight_name].weight_thresholds = thresholds


def _codes_keeping_factor(
    loaded, reading, weights: Mapping[str, LayerRecord], found, reader_weights: list[str],
    result: FusedReluClips, factor: float,
) -> float | None:
    """A factor near ``factor`` (``6 / t``) with which the fc writing a ReLU and its fc readers
    keep the int8 weight codes Paddle Inference derives from their stored weights
    (:class:`imperative_ptq.quant_layers.FcRecomputation`): the writer's thresholds are
    multiplied by it, the readers' divided. ``None`` if none of :data:`FACTOR_CANDIDATES`
    does, or the producer's tensors cannot be scaled.

    The simulation computes with those codes as they are unscaled; with ``6 / t`` itself the
    float32 roundings of Paddle's recomputation flip the few weight values lying within a few
    float32 steps of a half code (measured on a trained 784 x 128 Linear: 10 of 100,352, and
    45 of 2,000 images one code off after it). The factor only has to put the fused clip at 6
    within half a code of ``t``; the readers' threshold is ``t`` times it.
    """
    from ..quant_layers import FcRecomputation, quantize_weight, stored_weight_thresholds

    tensors = _producer_tensors(reading, found, result, compose=True)
    producer = found[0]
    if tensors is None or producer.input(FUSING_OPS[producer.type][0])[0] not in weights:
        return None  # (an fp32 fc: Paddle ran its fused relu + relu6 off the simulation, measured)
    scaled = [
        (name, exponent)
        for name, exponent in [(tensors[0], 1), *((name, -1) for name in reader_weights)]
        if name in weights and _read_as_fc_weight(reading, name)
    ]
    checks = []
    for name, exponent in scaled:
        record, before = weights[name], result.weight_factors.get(name, 1.0)
        weight = get_tensor(loaded, name).astype(np.float32)  # scaled by ``before`` already
        axis, bits = int(record.weight_axis), record.traced_weight_bits
        integers = quantize_weight(
            weight, stored_weight_thresholds(record.weight_thresholds, weight.shape, axis, before), bits, axis
        )
        unscaled = stored_weight_thresholds(record.weight_thresholds, weight.shape, axis)
        checks.append((exponent, before, record.weight_thresholds, weight.shape,
                       FcRecomputation(integers, unscaled, bits, axis)))
    for step in range(FACTOR_CANDIDATES):
        offset = (step + 1) // 2 * (1 if step % 2 else -1)
        candidate = factor * (1.0 + offset * FACTOR_WINDOW / FACTOR_CANDIDATES)
        if all(
            check.keeps_codes(stored_weight_thresholds(
                thresholds, shape, check.axis, before * (candidate if exponent > 0 else 1.0 / candidate)
            ))
            for exponent, before, thresholds, shape, check in checks
        ):
            return candidate
    logger.debug("fc writing %s: no factor keeps its weight codes; it stays on the clip", producer.output("Out"))
    return None


def _read_as_fc_weight(reading, name: str) -> bool:
    """Whether a fc op (``matmul_v2``/``mul``) reads ``name`` as its weight."""
    return any(
        op.type in FC_OPS and op.input(FUSING_OPS[op.type][0]) == [name] for op in reading.get(name, [])
    )


def _relu6_after(block, relu) -> None:
    """Puts a ``relu6`` after a fc's ``relu`` (which keeps the fc's output u8 in Paddle's
    pipeline; oneDNN fuses both into the fc)."""
    if relu.type == "relu6":  # (its clip at 6 lies above the threshold: the relu6 after clips)
        relu.desc.set_type("relu")
    name = relu.output("Out")[0]
    var = block.var(name)
    unclipped = block.create_var(name=f"{name}.unclipped", shape=var.shape, dtype=var.dtype)
    relu._rename_output(name, unclipped.name)
    insert_op(
        block, op_index(block, relu) + 1, type="relu6", inputs={"X": [unclipped.name]},
        outputs={"Out": [name]}, attrs={"threshold": RELU6_CLIP},
    )


def clip_concat_inputs(
    loaded, weights: Mapping[str, LayerRecord], outputs: dict[str, float], result: FusedReluClips
) -> int:
    """Runs int8 each concat of fused conv ReLUs read only by u8 int8 layers of one threshold
    ``t`` (SqueezeNet's fire modules, ShuffleNet's and Inception's branch joins).

    Paddle's ``cpu_quantize_pass`` runs a concat int8 when its output has a scale, quantizing
    every input on that scale; the convs writing them then write int8 directly. Each input's
    ReLU becomes a ``relu6`` on a tensor scaled by ``k = 6 / t``, as :func:`clip_fused_relus`
    does for one reader, so the convs write codes ``0..127`` of ``t``, exactly the simulation's
    reader input ``clip(round(x / t * 127), 0, 127)`` (it rounds the concat there, once). A
    ``relu`` after the concat makes the readers read it as u8 (Paddle marks no concat output
    unsigned); it is the identity on those codes. Rewrites ``loaded``, ``outputs`` and
    ``result`` in place.

    Returns:
        How many concats were rewritten.
    """
    block = loaded.program.global_block()
    count = 0
    reading, writers = readers(block), producers(block)
    for concat in [op for op in block.ops if op.type == "concat"]:
        out = concat.output("Out")[0]
        inputs = concat.input("X")
        consumers = reading.get(out, [])
        readers_found = _u8_readers(out, reading, weights, result, eight_bit_only=True)
        if readers_found is None or len(set(inputs)) != len(inputs) or not inputs:
            continue
        threshold, reader_weights = readers_found
        sources = []
        for name in inputs:
            relu = writers.get(name)
            found = None
            if relu is not None and relu.type in ("relu", "relu6") and len(reading.get(name, [])) == 1:
                found = fusable_relu_source(block, relu, writers)
            if (
                found is None or found[0].type not in RELU6_U8_PRODUCERS
                or found[0].input(FUSING_OPS[found[0].type][0])[0] not in weights
                or (relu.type == "relu6" and threshold > RELU6_CLIP)
                or _producer_tensors(reading, found, result, compose=True) is None
            ):
                break
            steering = _halved_steering(loaded, weights, found, RELU6_CLIP / threshold)
            if steering is None:
                break
            sources.append((name, relu, found, steering))
        else:
            factor = RELU6_CLIP / threshold
            # Written as they are: u8 (an int8 concat of u8 inputs is u8) on codes 0..127.
            scale = unsigned_threshold(RELU6_CLIP, 8)
            for name, relu, found, steering in sources:
                _scale_producer(loaded, reading, found, factor, result, compose=True)
                _steer(weights, steering)
                relu.desc.set_type("relu6")
                result.thresholds[name] = RELU6_CLIP
                outputs[name] = scale
            for weight_name in reader_weights:
                _scale_tensor(loaded, weight_name, 1.0 / factor)
                result.weight_factors[weight_name] = 1.0 / factor
            rectified = _relu_after(block, concat, out, consumers)
            result.thresholds[rectified] = RELU6_CLIP
            outputs[out] = scale
            count += 1
            reading, writers = readers(block), producers(block)  # the relu just inserted
    if count:
        loaded.program._sync_with_cpp()
    return count


def _u8_readers(
    name: str, reading, weights: Mapping[str, LayerRecord], result: FusedReluClips,
    eight_bit_only: bool = False, pooled: list[str] | None = None,
) -> tuple[float, list[str]] | None:
    """``(t, weight names)`` when every reader of ``name`` is an int8 conv/fc reading it alone
    as u8 input of one threshold ``t`` (8-bit only, if asked), with a weight no other op reads
    and no clip has scaled yet; else ``None`` (also when nothing reads it). With ``pooled`` (a
    list), a max-pool reading ``name`` counts by its own readers (8-bit only), and its output
    is appended to ``pooled``."""
    thresholds, weight_names, bits = set(), [], set()
    pending = [name]
    while pending:
        tensor = pending.pop()
        consumers = reading.get(tensor, [])
        if not consumers:
            return None
        for reader in consumers:
            if pooled is not None and _is_max_pool(reader):
                pooled.append(reader.output("Out")[0])
                pending.append(pooled[-1])
                continue
            slots = FUSING_OPS.get(reader.type)
            record = None if slots is None else weights.get(reader.input(slots[0])[0])
            if (
                record is None or not record.input_unsigned or reader.input(slots[1]) != [tensor]
                or transposed_matmul(reader) or (eight_bit_only and record.activation_bits != 8)
            ):
                return None
            weight_name = reader.input(slots[0])[0]
            if len(reading.get(weight_name, [])) != 1 or weight_name in result.weight_factors:
                return None
            thresholds.add(record.input_threshold)
            weight_names.append(weight_name)
            bits.add(record.activation_bits)
    if pooled and bits != {8}:
        return None  # (narrower grids keep the clip after the pool, their tested form)
    return (next(iter(thresholds)), weight_names) if len(thresholds) == 1 else None


def _is_max_pool(op) -> bool:
    """A max-pool (its one input's values, int8 in Paddle on one grid)."""
    return op.type == "pool2d" and op.attr("pooling_type") == "max"


def _relu_after(block, writer, name: str, consumers: list) -> str:
    """Makes ``consumers`` read ``relu(name)``, inserted right after ``writer``."""
    return insert_reader_op(block, writer, name, consumers, "relu", "u8")


def _producer_tensors(
    reading, found, result: FusedReluClips, compose: bool = False
) -> list[str] | None:
    """The tensors whose scaling scales the fused producer's output (the BatchNorm's scale and
    bias when there is one, else the conv/fc weight and bias); ``None`` when one is shared
    with another op, or (unless ``compose``) the weight was scaled already."""
    producer, chain = found
    if any(op.type == "batch_norm" for op in chain[1:]):
        return None  # a bias add after the BatchNorm would need scaling too: keep it simple
    # Every tensor from the producer to the activation read by the next op alone: another
    # reader (the pre-activation returned, or read by a sigmoid) would read the scaled values,
    # and oneDNN would not fuse the activation, whose codes rely on the fusion (measured: 2.2x
    # the returned pre-activation, 1.5e-2 off on the int8 reader).
    for op in (producer, *chain):
        written = [name for slot in ("Out", "Output", "Y") if slot in op.output_names for name in op.output(slot)]
        if any(len(reading.get(name, [])) != 1 for name in written):
            return None
    norms = chain[:1] if chain and chain[0].type == "batch_norm" else []
    if norms:
        # The op right before the ReLU: scaling its affine part scales the output.
        tensors = [norms[0].input("Scale")[0], norms[0].input("Bias")[0]]
    else:
        weight = producer.input(FUSING_OPS[producer.type][0])[0]
        if weight in result.weight_factors and not compose:
            return None
        tensors = [weight] + [op.input("Y")[0] for op in chain if op.type == "elementwise_add"]
    if any(len(reading.get(name, [])) != 1 for name in tensors):
        return None
    return tensors


def _scale_producer(
    loaded, reading, found, factor: float, result: FusedReluClips, compose: bool = False
) -> bool:
    """Multiplies the fused producer's output by ``factor`` (:func:`_producer_tensors`). False
    (nothing changed) when a tensor to scale is shared with another op. With ``compose``, a
    weight scaled already as a reader (:func:`clip_fused_relus`) is scaled again, the factors
    multiplied."""
    tensors = _producer_tensors(reading, found, result, compose)
    if tensors is None:
        return False
    norms = found[1][:1] if found[1] and found[1][0].type == "batch_norm" else []
    for name in tensors:
        _scale_tensor(loaded, name, factor)
    if not norms:
        result.weight_factors[tensors[0]] = result.weight_factors.get(tensors[0], 1.0) * factor
    return True


def _scale_tensor(loaded, name: str, factor: float) -> None:
    value = get_tensor(loaded, name)
    set_tensor(loaded, name, (value * factor).astype(value.dtype))
