"""Residual adds fused into Paddle Inference's int8 conv, and how the simulation computes them.

Paddle Inference's oneDNN pipeline fuses ``conv (+ BatchNorm) + elementwise_add(residual)
(+ ReLU)`` into one int8 conv when the residual tensor has a scale, and that conv then reads
the residual as **int8 codes**, where a plain dygraph model adds it in float (measured on one
``paddle.vision`` BasicBlock: 0.98% of the largest output off Paddle Inference; 4.4e-7 with
the residual on the codes below). The residual is one of two tensors in ``paddle.vision``'s
ResNet blocks (``out += identity``):

* **an identity shortcut**: the block input, a ReLU output that the block's first conv also
  reads as its u8 input. Paddle stores it as u8 codes ``clip(round(x / t * L), 0, 255)`` on the
  grid of that conv's input threshold ``t`` (written ``t * 255 / L``, see
  :mod:`imperative_ptq.export.unsigned`); the conv itself clips its own codes at ``L``, so the
  conv reading those codes is unchanged, and the add reads them up to 255. The simulation does
  this in the conv that reads the tensor first (:attr:`QuantizedLayer.residual_input
  <imperative_ptq.quant_layers.QuantizedLayer>`): it replaces the tensor's values, in place,
  by their u8 codes, so the add that runs after it reads them too (the tensor object is shared,
  and the conv runs before the add, whose other operand it computes).
* **a downsample shortcut**: a BatchNorm output read only by the add. It is written as s8 codes
  ``clip(round_half_even(x / t * L), -128, 127)`` of its output threshold ``t`` by the
  downsample conv it is fused into: :class:`QuantizedResidualOutput` computes that. The fused
  conv then writes the block's ReLU output s8 too, on the step of the u8 scale the export gives
  it, so its codes stop at 127 (``ResidualAdd.residual_top``; a head pool reading it too).

The ReLU after a residual conv is left unclipped by the export (a clip costs half of ResNet's
int8 speed-up, :mod:`imperative_ptq.export.unsigned`): its readers run on u8 codes up to 255, and
``convert`` gives the convs reading it ``input_top_code = 255`` (measured on random-weight
ResNet-18: logit cosine to Paddle Inference 0.99899 with the residuals alone, 0.99985 with it).

Calibration sees the add without hooking it (:func:`find_residual_add`): a hooked layer (the
block's ReLU) reading a tensor that no hooked layer wrote, equal to the sum of two tensors of the
same forward, or (blocks written ``F.relu(paddle.add(x=short, y=y))``, the next conv reading it)
to the ReLU of that sum; the identity shortcut may be a tensor no hooked layer wrote (an
``F.relu`` output), found among the tensors hooked layers read. Which operand is the residual follows Paddle's fusion: the one some hooked layer
read before the add (the identity shortcut; the other one, a conv/BatchNorm output read only by
the add, is fused into its conv), else, both being conv/BatchNorm outputs read only by the add,
the projection: Paddle fuses the add into the conv whose input depends on the other conv's
input, and reads the other one (the downsample conv, reading the block's input) as codes, in
whichever order the two branches run or the add names them. A projection whose input the other
branch does not read (ResNet-vd's and DLA's pooled copy of the block input) is no ancestor of
the other conv's output: Paddle fuses nothing, and the add is simulated in float. An identity
shortcut that is no ancestor of the conv's output (an HRNet fuse layer's ``x1 + conv_bn(x0)``,
``x1`` read by another conv first) is not fused either; it is simulated as one, and the export
computes those codes, and the sum's, in float (:mod:`imperative_ptq.export.coded_identity`).
Calibration tells them apart by
when each branch's conv input was first seen in the forward (``branch_inputs``): the earlier
one is the block input. ``convert`` decides from these observations
(:func:`residual_reads`) and the export follows the layers it finds
(:mod:`imperative_ptq.export.program`). The ``nn.ReLU`` reading a sum fused into an int8 conv
returns that call's output on the codes the conv writes (:class:`ResidualSumOutput`), for every
reader: the next block, and the caller of a backbone returning feature maps, on the grid of its
int8 conv readers, or of the int8 readers of the max-pools that alone read it, else its own;
an average pool reading it (ResNet-vd's pooled shortcut, fp32 in Paddle) averages those codes,
the export keeping the sum's scale and giving the pool a copy without one. Limits: the sum,
or its ReLU, must be read by a hooked layer (a sum only a functional op reads, or that the
network returns, is simulated in float;
its shortcut is still read as the codes Paddle wrote where that is an ``F.relu`` output after
another fused conv, which ``convert`` puts on them in its int8 readers); a sum read only by a
layer that gives it no scale (a
network's last ``F.relu`` sum, read by a global pool) runs in float in Paddle, which the export
enforces (:func:`imperative_ptq.export.program.quantize_program`) and the simulation follows
for a downsample shortcut; so does a sum read by a conv/Linear kept fp32 or reading it shifted
(a signed sum on ``x86``), for either shortcut (``ResidualAdd.sum_reader``), and a u8 identity
added to a sum no ReLU reads that an int8 layer reads signed (``x86-vnni``: Paddle's fused
conv would write the sum s8 and read the u8 identity's codes as s8). A sum read only by a
concat (DLA's tree root) is written on the codes of the int8 conv reading the concat, whose
scale the export gives the concat's inputs; float readers of an identity on codes (that
concat) read the codes too (:mod:`imperative_ptq.export.coded_identity`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
import paddle

from .forward_calls import CallCounter
from .quant_pool import U8_MAX
from .quantizers.qparams import symmetric_levels
from .rounding import grid_codes

__all__ = [
    "S8_MIN", "QuantizedResidualOutput", "ResidualAdd", "ResidualCodesInput", "ResidualSumOutput",
    "find_residual_add", "quantize_residual_in_place", "relu_or_its_max_pool", "residual_on_codes",
    "residual_output_codes", "unwrapped_norm",
]

#: Smallest code of an s8 tensor a oneDNN conv writes (it saturates there, not at ``-L``).
S8_MIN = -128
#: The largest code of an s8 tensor (above the symmetric grid's L below 8 bits).
S8_MAX = 127
#: Elements compared before a whole sum is (most candidate pairs differ at once).
_PREFIX = 64


@dataclasses.dataclass(frozen=True)
class ResidualAdd:
    """One add seen in a calibration forward.

    Attributes:
        fused: The hooked layer whose output Paddle fuses into its conv (a conv or BatchNorm).
        residual: The hooked layer whose output the fused conv reads as int8 codes.
        residual_readers: Hooked layers that read the residual tensor before the add.
        residual_top: The residual's largest code: 255 for a u8 tensor, 127 for the output
            of a ReLU after a fused conv whose own residual was s8 (oneDNN keeps the sum s8,
            on the u8 tensor's step, so it saturates there).
        residual_is_input: The residual is no hooked layer's output but the first input of
            ``residual`` (its first reader): a tensor such as an ``F.relu`` output.
        after_relu: The tensor the add was found from is the sum's ReLU (``F.relu(a + b)``
            read by a conv), not the sum itself; what the forward saw, not compared or stored.
        sum_reader: The hooked layer that read the sum (an ``nn.ReLU``, whose output is the
            block's output) or its ReLU; ``""`` when unknown (a table written before it was
            recorded). Not compared: one add, whichever layer saw it.
    """

    fused: str
    residual: str
    residual_readers: tuple[str, ...]
    residual_top: int = U8_MAX
    residual_is_input: bool = False
    after_relu: bool = dataclasses.field(default=False, compare=False)
    sum_reader: str = dataclasses.field(default="", compare=False)


def find_residual_add(
    value: paddle.Tensor,
    outputs: Sequence[tuple[paddle.Tensor, str]],
    readers: dict[int, tuple[str, ...]],
    signed: frozenset[int] = frozenset(),
    branch_inputs: Mapping[int, int] | None = None,
    inputs: Sequence[paddle.Tensor] = (),
    branch_sources: Mapping[int, int] | None = None,
) -> ResidualAdd | None:
    """The add of two tensors of this forward that ``value`` is (or the ReLU of), if any.

    Args:
        value: A tensor a hooked layer read that no hooked layer wrote.
        outputs: ``(tensor, layer name)`` of this forward's hooked outputs, in the order they
            were computed.
        readers: ``id`` of a tensor -> the hooked layers that read it so far in this forward.
        signed: ``id`` of the outputs of this forward that Paddle writes as s8 (a ReLU after
            a fused conv whose residual is s8).
        branch_inputs: ``id`` of an output -> when (in the order tensors were first seen in
            this forward) the conv producing it (directly or through a BatchNorm) read its
            input; tells the projection from the branch when neither operand is read.
        inputs: Tensors hooked layers read that no hooked layer wrote (an ``F.relu`` output
            read by a block's first conv): candidate identity shortcuts.
        branch_sources: ``id`` of an output -> ``id`` of the input of the conv producing it
            (directly or through a BatchNorm).

    Returns:
        The add, with the residual chosen as Paddle's fusion chooses it (module docstring),
        or ``None`` when ``value`` is no such sum.
    """
    def fits(t: paddle.Tensor) -> bool:
        return list(t.shape) == list(value.shape) and t.dtype == value.dtype

    same = [(t, name) for t, name in outputs if fits(t)]
    if not same:
        return None
    # One operand is the latest output of its shape (the branch ends right before the add):
    # a linear scan over the other, not a search over all pairs.
    later = same[-1]
    hooked = {id(t) for t, _ in same}
    candidates = list(reversed(same[:-1])) + [
        (t, "") for t in inputs if fits(t) and id(t) not in hooked and t is not value
    ]
    for earlier in candidates:
        after_relu = _sum_of(value, later[0], earlier[0])
        if after_relu is None:
            continue
        read_later = readers.get(id(later[0]), ())
        read_earlier = readers.get(id(earlier[0]), ())
        if read_later and read_earlier:
            return None  # neither is a conv output Paddle could fuse the add into
        if read_earlier or read_later:
            residual, fused = (earlier, later) if read_earlier else (later, earlier)
        else:
            born = [(branch_inputs or {}).get(id(t)) for t in (later[0], earlier[0])]
            if born[0] is not None and born[0] == born[1]:
                # Two convs of one input (a RepVGG block's 3x3 and 1x1 branches): Paddle
                # fuses the add into neither (measured: no sum post-op in oneDNN's verbose
                # log), so it adds in float; simulated as fused, 21% of the largest output off.
                return None
            residual, fused = _projection_first(later, earlier, branch_inputs or {})
            source = (branch_sources or {}).get(id(residual[0]))
            if source is not None and len(readers.get(source, ())) < 2:
                # Paddle fuses the add into the other conv only if the projection's input is
                # an ancestor of that conv's output, i.e. the other branch reads it too; a
                # projection of a pooled copy of the block input (ResNet-vd, DLA) is added in
                # float (measured, simulated as fused: 1.6% of the largest output off).
                return None
        top = symmetric_levels(8) if id(residual[0]) in signed else U8_MAX
        residual_readers = tuple(readers.get(id(residual[0]), ()))
        if residual[1]:
            return ResidualAdd(fused[1], residual[1], residual_readers, top, after_relu=after_relu)
        return ResidualAdd(fused[1], residual_readers[0], residual_readers, top, True, after_relu)
    return None


def _sum_of(value: paddle.Tensor, a: paddle.Tensor, b: paddle.Tensor) -> bool | None:
    """``False`` if ``value`` is ``a + b``, ``True`` if it is ``relu(a + b)`` (and not the sum
    itself), else ``None``; a prefix is compared first, as most pairs differ at once."""
    flat = value.flatten()[:_PREFIX]
    head = a.flatten()[:_PREFIX] + b.flatten()[:_PREFIX]
    for after_relu in (False, True):
        candidate = paddle.nn.functional.relu(head) if after_relu else head
        if bool(paddle.equal_all(candidate, flat)):
            total = a + b
            if after_relu:
                total = paddle.nn.functional.relu(total)
            if bool(paddle.equal_all(total, value)):
                return after_relu
    return None


def _projection_first(
    later: tuple[paddle.Tensor, str],
    earlier: tuple[paddle.Tensor, str],
    branch_inputs: Mapping[int, int],
) -> tuple[tuple[paddle.Tensor, str], tuple[paddle.Tensor, str]]:
    """Two conv/BatchNorm outputs read only by the add, as ``(residual, fused)``: the residual
    is the projection, whose conv read the older input (the block's input, from which the other
    branch is computed); with unknown inputs, the one computed last."""
    born_later, born_earlier = branch_inputs.get(id(later[0])), branch_inputs.get(id(earlier[0]))
    if born_later is not None and born_earlier is not None and born_earlier < born_later:
        return earlier, later
    return later, earlier


def residual_on_codes(
    x: paddle.Tensor, threshold: paddle.Tensor | float, bits: int, top: int
) -> paddle.Tensor:
    """``x`` on its codes ``clip(round_half_even(x / t * L), 0, top)`` (times the step): the
    identity-shortcut residual as Paddle Inference stores it (module docstring). Backward,
    the straight-through gradient (:func:`~imperative_ptq.rounding.grid_codes`).

    Args:
        x: The residual tensor (a ReLU or max-pool output).
        threshold: ``t``, the input threshold of the conv reading ``x`` (a float, or a
            one-element tensor that QAT learns).
        bits: Bit width of activations (``L = 2**(bits-1) - 1``).
        top: The largest code (255, or 127 for a tensor Paddle writes s8).
    """
    levels = symmetric_levels(bits)
    step = threshold / levels if isinstance(threshold, paddle.Tensor) else np.float32(threshold / levels)
    return grid_codes(x, step, 0, top, half_to_even=True) * step


def quantize_residual_in_place(x: paddle.Tensor, threshold: float, bits: int, top: int) -> None:
    """Replaces ``x``'s values by :func:`residual_on_codes`: the converted model's conv reading
    the residual first does this, so the add that runs after it reads the codes too."""
    with paddle.no_grad():
        paddle.assign(residual_on_codes(x, threshold, bits, top), output=x)


def relu_or_its_max_pool(name: str, by_name: Mapping[str, tuple[paddle.nn.Layer, Any]]) -> bool:
    """Whether calibrated layer ``name`` is an ``nn.ReLU``, or a max pool of one (through
    further max pools), whose output Paddle therefore holds as u8 codes (it pools the codes).

    Args:
        name: The layer's name.
        by_name: Every calibrated layer's name -> ``(layer, state)``, ``state.input_sources``
            naming the layers whose output it read.
    """
    layer, state = by_name.get(name, (None, None))
    while isinstance(layer, paddle.nn.MaxPool2D) and len(state.input_sources) == 1:
        layer, state = by_name.get(next(iter(state.input_sources)), (None, None))
    return isinstance(layer, paddle.nn.ReLU)


def residual_output_codes(y: paddle.Tensor, threshold: float, activation_bits: int) -> paddle.Tensor:
    """``y`` on the s8 codes an int8 conv writes for the fused conv that reads it as its
    residual: ``clip(round_half_even(y / t * L), -128, 127) * t / L``, straight-through
    backward. oneDNN saturates the s8 output at -128 and 127, beyond the grid's ``-L..L``
    (below ``-L`` at 8 bits; on both sides below 8 bits)."""
    step = np.float32(threshold / symmetric_levels(activation_bits))
    return grid_codes(y, step, S8_MIN, S8_MAX, half_to_even=True) * step


def unwrapped_norm(layer: paddle.nn.Layer | None) -> paddle.nn.Layer | None:
    """The BatchNorm (or conv) a :class:`QuantizedResidualOutput` wraps, else ``layer``: what
    folding reads the parameters of, where ``convert`` made a projection's BatchNorm write s8
    residual codes."""
    return layer.layer if isinstance(layer, QuantizedResidualOutput) else layer


class QuantizedResidualOutput(paddle.nn.Layer):
    """A BatchNorm (or conv) whose output is read only as the residual of a fused int8 conv:
    its output on the s8 codes the conv it is fused into writes. (An int8 conv with no
    BatchNorm after it, e.g. a projection shortcut with BatchNorm folded into it, writes those
    codes itself: :attr:`~imperative_ptq.quant_layers.QuantizedLayer.residual_output_threshold`.)

    ``forward(x)`` returns ``clip(round_half_even(y / t * L), -128, 127) * t / L`` with
    ``y = layer(x)``; backward, the straight-through gradient (QAT wraps the BatchNorm of its
    fp32 model in this layer too).

    Args:
        layer: The fp32 layer (the export traces it).
        output_thresholds: Its calibrated output thresholds; the first is ``t``.
        activation_bits: Bit width of activations (``L = 2**(bits-1) - 1``).
        fused_with: Name of the layer whose output is the add's other operand (the one Paddle
            fuses into its conv). The export gives both operands a scale: with only the
            residual's, Paddle Inference computed something else (measured: 9.7% off on one
            downsample block; 4.6e-7 with both).

    Raises:
        ValueError: The threshold is missing or not a positive number.
    """

    def __init__(
        self,
        layer: paddle.nn.Layer,
        output_thresholds: Sequence[float],
        activation_bits: int = 8,
        fused_with: str = "",
    ) -> None:
        super().__init__()
        thresholds = [float(t) for t in output_thresholds]
        if not thresholds or not np.isfinite(thresholds[0]) or thresholds[0] <= 0:
            raise ValueError(
                f"QuantizedResidualOutput needs a positive output threshold, got {output_thresholds!r}"
            )
        self.layer = layer
        self.output_thresholds = thresholds
        self.activation_bits = activation_bits
        self.fused_with = fused_with

    def forward(self, *inputs: paddle.Tensor, **kwargs) -> paddle.Tensor:
        return residual_output_codes(
            self.layer(*inputs, **kwargs), self.output_thresholds[0], self.activation_bits
        )

    def extra_repr(self) -> str:
        return f"output_threshold={self.output_thresholds[0]:.6g}, s8 codes (fused residual)"


class _OnCodes(paddle.nn.Layer):
    """A wrapped layer and the int8 codes ``0..top`` of threshold ``t`` that one of its
    tensors is put on (:class:`ResidualCodesInput`, :class:`ResidualSumOutput`).

    Raises:
        ValueError: The threshold is not a positive number or ``top`` is not 1..255.
    """

    def __init__(
        self, layer: paddle.nn.Layer, threshold: float, top: int, activation_bits: int = 8
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not np.isfinite(threshold) or threshold <= 0:
            raise ValueError(f"{name} needs a positive threshold, got {threshold!r}")
        if not 0 < int(top) <= U8_MAX:
            raise ValueError(f"{name}: top must be 1..{U8_MAX}, got {top!r}")
        self.layer = layer
        self.threshold = float(threshold)
        self.top = int(top)
        self.activation_bits = activation_bits


class ResidualCodesInput(_OnCodes):
    """A layer kept fp32 that reads a tensor Paddle Inference writes as int8 codes: its first
    input on those codes, then the layer.

    An int8 conv whose output an int8 op reads directly (a fused residual conv reading it as
    its residual, or an int8 conv reading a block output Paddle leaves unclipped) writes it as
    codes, and every reader, fp32 ones included, reads their dequantized values. ``forward``
    replaces its first input's values by :func:`residual_on_codes`, in place, so that readers
    running after it read the codes too (as :attr:`QuantizedLayer.residual_codes
    <imperative_ptq.quant_layers.QuantizedLayer>` does for an int8 reader); the export gives that
    tensor the threshold's scale.

    Args:
        layer: The fp32 layer (the export traces it).
        threshold: The tensor's threshold ``t`` (its int8 readers' input threshold).
        top: The largest code (255 for a u8 tensor, 127 for one Paddle writes s8).
        activation_bits: Bit width of activations (``L = 2**(bits-1) - 1``).

    Raises:
        ValueError: The threshold is not a positive number or ``top`` is not 1..255.
    """

    def forward(self, *inputs: paddle.Tensor, **kwargs) -> paddle.Tensor:
        quantize_residual_in_place(inputs[0], self.threshold, self.activation_bits, self.top)
        return self.layer(*inputs, **kwargs)

    def extra_repr(self) -> str:
        return f"input on int8 codes 0..{self.top} of threshold {self.threshold:.6g} (fp32 layer)"


class ResidualSumOutput(_OnCodes):
    """The ``nn.ReLU`` reading a residual sum that Paddle Inference fuses into an int8 conv (or
    after an int8 conv whose output an int8 max-pool reads, ``convert``'s
    ``residual_simulation.simulate_pooled_codes``): that call's output on the codes the conv writes.

    A fused int8 residual conv always writes its output as codes (oneDNN cannot give it an
    fp32 output), so every reader of the block's output reads them: the next block's convs
    and add, and the caller when the network returns it (a backbone's feature maps; measured
    3e-3 of the largest value off Paddle Inference when the simulation returned floats). The
    ReLU may also serve calls that are no such sum (``paddle.vision``'s blocks call one ReLU
    twice), so the fused conv's :class:`~imperative_ptq.quant_layers.QuantizedLayer` marks the
    next call (:meth:`expect_sum`); with that conv fp32 (``keep_fp32``) the add runs in float
    and nothing is marked.

    Args:
        layer: The ReLU (the export traces it).
        threshold: ``t`` of the codes: the threshold the block output's int8 readers quantize
            it with, else the ReLU's output threshold (what the export writes).
        top: The largest code: 255, or 127 after a downsample (s8) residual.
        activation_bits: Bit width of activations (``L = 2**(bits-1) - 1``).
        call_thresholds: ``None``, or ``t`` per call of the ReLU within a forward (its calls on
            other tensors included) where the sums' readers differ: a residual block applied
            twice writes its first output on the codes of the convs reading it, its last on
            the ReLU's own threshold (:mod:`imperative_ptq.forward_calls`).
        call_sums: ``None``, or per call of the ReLU within a forward whether it reads such a
            sum: a ReLU shared with an add Paddle computes in float (an HRNet fuse layer's)
            may run that one between the fused conv and its sum, which the mark alone would
            put on codes instead (measured: 3.2e-3 of the largest output off Paddle
            Inference, the float sum returned).
        call_tops: ``None``, or the largest code per call where the sums' residuals differ: a
            ReLU shared by an identity block's sum (u8 residual, codes up to 255) and a
            projection block's (s8, up to 127).

    Raises:
        ValueError: A threshold is not a positive number, ``top`` (or a call's) is not
            1..255, or ``call_thresholds``, ``call_sums`` and ``call_tops`` count the calls
            differently.
    """

    def __init__(
        self,
        layer: paddle.nn.Layer,
        threshold: float,
        top: int,
        activation_bits: int = 8,
        call_thresholds: Sequence[float] | None = None,
        call_sums: Sequence[bool] | None = None,
        call_tops: Sequence[int] | None = None,
    ) -> None:
        super().__init__(layer, threshold, top, activation_bits)
        self.sum_pending = False
        self.call_thresholds: tuple[float, ...] = ()
        self.call_sums: tuple[bool, ...] = ()
        self.call_tops: tuple[int, ...] = ()
        self._calls: CallCounter | None = None
        if call_thresholds is not None:
            self.call_thresholds = tuple(float(t) for t in call_thresholds)
            if not self.call_thresholds or not all(np.isfinite(t) and t > 0 for t in self.call_thresholds):
                raise ValueError(
                    f"ResidualSumOutput needs positive call thresholds, got {list(call_thresholds)!r}"
                )
        if call_sums is not None:
            self.call_sums = tuple(bool(reads) for reads in call_sums)
            if not any(self.call_sums):
                raise ValueError(f"ResidualSumOutput needs a call reading a sum, got {list(call_sums)!r}")
        if call_tops is not None:
            if not call_tops or not all(
                isinstance(top, (int, np.integer)) and not isinstance(top, bool) and 0 < top <= U8_MAX
                for top in call_tops
            ):
                raise ValueError(f"ResidualSumOutput needs call tops of 1..{U8_MAX}, got {list(call_tops)!r}")
            self.call_tops = tuple(int(top) for top in call_tops)
        counts = {
            len(per_call) for per_call in (self.call_thresholds, self.call_sums, self.call_tops) if per_call
        }
        if len(counts) > 1:
            raise ValueError(
                f"ResidualSumOutput: {len(self.call_thresholds)} call thresholds, "
                f"{len(self.call_sums)} call sums and {len(self.call_tops)} call tops count the "
                f"calls differently"
            )
        if counts:
            self._calls = CallCounter(counts.pop())

    def expect_sum(self) -> None:
        """The fused conv ran: the next call reads the sum."""
        self.sum_pending = True

    def forward(self, *inputs: paddle.Tensor, **kwargs) -> paddle.Tensor:
        output = self.layer(*inputs, **kwargs)
        call = None if self._calls is None else self._calls.next_call()
        if not self.sum_pending or (self.call_sums and not self.call_sums[call]):
            return output
        self.sum_pending = False
        threshold = self.call_thresholds[call] if self.call_thresholds else self.threshold
        top = self.call_tops[call] if self.call_tops else self.top
        return residual_on_codes(output, threshold, self.activation_bits, top)

    def extra_repr(self) -> str:
        per_call = f", per call {[f'{t:.6g}' for t in self.call_thresholds]}" if self.call_thresholds else ""
        if self.call_sums:
            per_call += f", calls {[call for call, reads in enumerate(self.call_sums) if reads]} of {len(self.call_sums)}"
        if self.call_tops:
            per_call += f", tops per call {list(self.call_tops)}"
        return f"residual sum's output on codes 0..{self.top} of threshold {self.threshold:.6g}{per_call}"
