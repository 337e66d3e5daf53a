"""u8 inputs for x86: every non-negative int8 input within codes 0..127.

Paddle Inference's oneDNN pipeline runs a tensor as u8 only when it is a ReLU output (a ``relu``
op, or a ``relu``/``relu6`` fused into the conv/fc before it) and maps its threshold ``S`` onto
0..255. The x86 targets (:mod:`imperative_ptq.targets`) need codes 0..127, exactly the
simulation's ``clip(round(x / t * 127), 0, 127)``: :func:`.program.unsigned_threshold` writes
``S = t * 255 / 127``, and the values above ``t`` must be clipped before they are quantized.

* A ReLU (or ReLU6) fused into its conv and read only by int8 layers quantizing it at one
  threshold ``t`` becomes a ``relu6`` (clip at 6, fused for free) on a tensor scaled by ``k = 6 / t``:
  the conv's output (its weights and bias, or the BatchNorm after it) is multiplied by
  ``k``, the readers' weights divided by it and their threshold becomes 6. Integer weights are
  unchanged; only float scales move. (Paddle 3.3.1's ``relu6`` has no threshold attribute:
  oneDNN's fused clip is always at 6.)
* Any other non-negative input (a network input, a pooling or reshape output, a ReLU after a
  fc, whose fused relu6 Paddle runs as s8, or a ReLU also read by a residual add) gets ``clip(x, 0, t)`` and a ``relu`` in front of its quantize op; the
  ``relu`` is what makes Paddle run the result as u8.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from .tracing import LayerRecord

__all__ = [
    "RELU6_CLIP", "RELU6_U8_PRODUCERS", "FusedReluClips", "clip_fused_relus", "fusable_relu_source",
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


#: Producers whose fused ``relu6`` output Paddle runs as u8. A fc's is s8 (measured: Paddle
#: 3.3.1 fuses the fc activation after deciding signedness, and only a ``relu`` op counts then).
RELU6_U8_PRODUCERS = frozenset({"conv2d", "depthwise_conv2d"})


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


def fusable_relu_source(block, op) -> tuple[object, list] | None:
    """For an activation ``op``, the conv/fc oneDNN fuses it into and the ops between.

    Returns:
        ``(producer, chain)`` with ``chain`` the batch_norm / bias-add ops in between (nearest
        first), or ``None`` when the activation would run on its own.
    """
    producers = _producers(block)
    chain = []
    source = producers.get(op.input("X")[0])
    while source is not None and source.type in _FUSED_INTO_PRODUCER:
        if source.type == "elementwise_add" and not _persistable(block, source.input("Y")[0]):
            return None  # a residual add: fused too, but its other operand is not ours to scale
        chain.append(source)
        source = producers.get(source.input("X")[0])
    if source is None or source.type not in FUSING_OPS:
        return None
    if source.type == "matmul_v2" and (source.attr("trans_x") or source.attr("trans_y")):
        return None
    if not _persistable(block, source.input(FUSING_OPS[source.type][0])[0]):
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
    producers = _producers(block)
    readers: dict[str, list] = {}
    for op in block.ops:
        for slot in op.input_names:
            for name in op.input(slot):
                readers.setdefault(name, []).append(op)
    result = FusedReluClips()
    for name, relu in list(producers.items()):
        if relu.type not in ("relu", "relu6"):
            continue
        thresholds = set()
        weight_names = []
        for reader in readers.get(name, []):
            slots = FUSING_OPS.get(reader.type)
            record = None if slots is None else weights.get(reader.input(slots[0])[0])
            if record is None or not record.input_unsigned or reader.input(slots[1]) != [name]:
                break
            if reader.type == "matmul_v2" and (reader.attr("trans_x") or reader.attr("trans_y")):
                break
            weight_name = reader.input(slots[0])[0]
            if len(readers.get(weight_name, [])) != 1 or weight_name in result.weight_factors:
                break
            thresholds.add(record.input_threshold)
            weight_names.append(weight_name)
        else:
            if len(thresholds) != 1:
                continue
            found = fusable_relu_source(block, relu)
            if found is None or found[0].type not in RELU6_U8_PRODUCERS:
                continue
            threshold = next(iter(thresholds))
            if relu.type == "relu6" and threshold > RELU6_CLIP:
                continue  # a relu6 already clips below the threshold; scaling would lift it
            factor = RELU6_CLIP / threshold
            if not _scale_producer(loaded, readers, found, factor, weights, result):
                continue
            for weight_name in weight_names:
                _scale_tensor(loaded, weight_name, 1.0 / factor)
                result.weight_factors[weight_name] = 1.0 / factor
            relu.desc.set_type("relu6")
            result.thresholds[name] = RELU6_CLIP
            if name in outputs:
                outputs[name] = outputs[name] * factor
    if result.thresholds:
        loaded.program._sync_with_cpp()
    return result


def _scale_producer(loaded, readers, found, factor, weights, result: FusedReluClips) -> bool:
    """Multiplies the fused producer's output by ``factor``: through the BatchNorm's scale and
    bias when there is one, else through the conv/fc weight and bias. False (nothing changed)
    when a tensor to scale is shared with another op."""
    producer, chain = found
    if any(op.type == "batch_norm" for op in chain[1:]):
        return False  # a bias add after the BatchNorm would need scaling too: keep it simple
    norms = chain[:1] if chain and chain[0].type == "batch_norm" else []
    if norms:
        # The op right before the ReLU: scaling its affine part scales the output.
        tensors = [norms[0].input("Scale")[0], norms[0].input("Bias")[0]]
    else:
        weight = producer.input(FUSING_OPS[producer.type][0])[0]
        if weight in result.weight_factors:
            return False
        tensors = [weight] + [op.input("Y")[0] for op in chain if op.type == "elementwise_add"]
    if any(len(readers.get(name, [])) != 1 for name in tensors):
        return False
    for name in tensors:
        _scale_tensor(loaded, name, factor)
    if not norms:
        result.weight_factors[tensors[0]] = factor
    return True


def _scale_tensor(loaded, name: str, factor: float) -> None:
    tensor = loaded.scope.find_var(name).get_tensor()
    value = np.array(tensor)
    tensor.set((value * factor).astype(value.dtype), _cpu_place())


def _cpu_place():
    import paddle

    return paddle.CPUPlace()


def _persistable(block, name: str) -> bool:
    var = block._find_var_recursive(name)
    return var is not None and bool(var.persistable)


def _producers(block) -> dict:
    return {name: op for op in block.ops for slot in op.output_names for name in op.output(slot)}
