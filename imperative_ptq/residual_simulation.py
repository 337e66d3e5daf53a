"""Residual adds and pooled ReLU outputs simulated on the codes Paddle Inference's fused int8
convs write and read.

Paddle Inference fuses a residual add into the int8 conv that computes one of its operands,
reads the other operand as int8 codes (u8 for an identity shortcut's ReLU output, s8 for a
downsample shortcut's BatchNorm output) and writes the sum's ReLU as codes for its readers;
it likewise writes a conv + ReLU output as codes for an int8 max-pool. ``convert`` (after the
layer swaps, :mod:`imperative_ptq.convert`) makes the simulation read and write those tensors
on the same codes.
"""

from __future__ import annotations

import logging

import paddle

from .calibration_table import CalibrationTable, HookedLayers, first_names
from .forward_calls import count_forwards
from .functional_ops import FunctionalConcat
from .quant_layers import QuantizedLayer, replace_sublayer
from .quant_pool import U8_MAX
from .quant_residual import QuantizedResidualOutput, ResidualCodesInput, ResidualSumOutput, relu_or_its_max_pool
from .quantizers.qparams import symmetric_levels
from .registry import BATCH_NORM_TYPES
from .session import LayerState

__all__ = ["FusedResiduals", "simulate_pooled_codes"]

logger = logging.getLogger(__name__)


class FusedResiduals:
    """Makes the simulation read each residual that Paddle Inference's fused int8 conv reads
    as codes on those codes (:mod:`~imperative_ptq.quant_residual`), from the adds calibration
    saw: an identity shortcut (a ReLU output its readers' convs quantize as u8 on one
    threshold) through the first of those convs, a downsample shortcut (a BatchNorm output
    read only by the add) through a :class:`QuantizedResidualOutput`, and one with its
    BatchNorm folded into the conv (a conv output read only by the add) through that conv's
    ``residual_output_threshold``. Only where the add's other operand comes from an int8 conv,
    which Paddle fuses the add into.

    :meth:`simulate` does it in three steps.
    """

    def __init__(
        self,
        model: paddle.nn.Layer,
        hooked: HookedLayers,
        table: CalibrationTable,
        quantized: dict[str, QuantizedLayer],
        activation_bits: int,
    ) -> None:
        self.model = model
        self.hooked = hooked
        self.table = table
        self.quantized = quantized
        self.activation_bits = activation_bits
        self.by_name = {state.name: (layer, state) for layer, state in hooked}
        #: The ReLU of each fused sum, on the codes the fused conv writes, by the ReLU's name.
        self.sums: dict[str, ResidualSumOutput] = {}
        #: Readers of identity shortcuts on codes, and downsample shortcuts written as codes.
        self.identity: list[str] = []
        self.downsample: list[str] = []

    def simulate(self) -> None:
        """Fuses the adds Paddle fuses, then puts the readers of the sums it adds in float
        back on their own grids and reads the residuals no layer recorded as codes."""
        float_sums = self._fuse_adds()
        # A ReLU output after a fused residual conv is written as codes for every reader, float
        # ones too: an add calibration did not see (its sum read only by a functional op, or
        # returned by the network) reads the codes in Paddle. Where that ReLU is functional
        # (F.relu: the tensor's readers are not all known), its int8 readers put it on them in
        # place, as an identity shortcut's first reader does (readers of one tensor share its
        # threshold, so a second one changes nothing).
        # (Not where the layer reads the ReLU of a sum known to be added in float: a RepVGG
        # block's BatchNorm of its input is no conv output Paddle fuses; measured 12% of the
        # largest output off Paddle Inference with that ReLU read on s8 codes. Tables written
        # before the sum's reader was recorded name none.)
        self._clip_signed_readers_of(float_sums)
        self._code_unwritten_residuals(float_sums)
        if self.identity or self.downsample:
            logger.info(
                "fused int8 residual convs read their residual as codes: %d identity shortcuts "
                "(u8, quantized by %s), %d downsample shortcuts (s8: %s)", len(self.identity),
                first_names(self.identity), len(self.downsample), first_names(self.downsample),
            )

    def _int8_conv_output(self, name: str) -> bool:
        """Whether ``name`` is the output of an int8 conv (or of its BatchNorm) that Paddle can
        fuse a residual add into: not one reading a signed input through a shift (``x86``),
        whose output the export writes in float (measured, simulated as s8 residual codes: 1.9%
        of the largest output off Paddle Inference)."""
        layer, state = self.by_name.get(name, (None, None))
        if isinstance(layer, BATCH_NORM_TYPES):
            sources = state.input_sources
            name = next(iter(sources)) if len(sources) == 1 else ""
        found = self.quantized.get(name)
        return found is not None and isinstance(found.layer, paddle.nn.Conv2D) and not found.input_shifted

    def _conv_of(self, name: str) -> QuantizedLayer | None:
        """The int8 conv writing ``name``: the layer itself, or the conv before a BatchNorm."""
        layer, state = self.by_name.get(name, (None, None))
        if isinstance(layer, BATCH_NORM_TYPES) and len(state.input_sources) == 1:
            name = next(iter(state.input_sources))
        return self.quantized.get(name)

    def _concat_readers(self, name: str) -> list[QuantizedLayer]:
        """The int8 u8 readers of the concat that alone reads the sum ``name`` (DLA's tree
        root), all of them: the export gives a concat's inputs its readers' scale, so Paddle
        writes the fused conv's codes on that grid (measured on a DLA-shaped tree: 0.5% of the
        largest logit off Paddle Inference with the sum's own threshold); else nothing."""
        if self.by_name[name][1].residual_adds:
            return []  # an add reads the sum too, where the export keeps its own scale
        direct = [
            state for _, state in self.hooked if name in state.input_sources | state.joined_sources
            # An int8 conv reading no sum reads another call of a shared ReLU.
            and not (state.name in self.quantized and not (state.wide_input or state.signed_input))
        ]
        if len(direct) != 1 or not isinstance(self.by_name[direct[0].name][0], FunctionalConcat):
            return []
        concat = direct[0].name
        after = [self.quantized.get(state.name) for _, state in self.hooked if concat in state.site_sources]
        if not after or any(reader is None or not reader.input_unsigned for reader in after):
            return []
        return after

    def _pooled_readers(self, name: str) -> list[QuantizedLayer]:
        """The int8 u8 readers of the max-pools that alone read the sum's ReLU ``name``, all
        of them: the export gives the ReLU their scale (``export.program``), so Paddle writes
        the fused conv's codes on their grid and pools them (measured: a block output read
        through a max-pool by a 1x1 conv, 1.7% of the largest output off Paddle Inference on
        the ReLU's own threshold); else nothing."""
        readers = [(layer, state) for layer, state in self.hooked if name in state.input_sources]
        if not readers or any(not isinstance(layer, paddle.nn.MaxPool2D) for layer, _ in readers):
            return []
        pools = {state.name for _, state in readers}
        after = [self.quantized.get(state.name) for _, state in self.hooked if state.input_sources & pools]
        if not after or any(reader is None or not reader.input_unsigned for reader in after):
            return []
        return after

    def _codes_at_sum(self, add) -> None:
        """The fused conv writes the sum's ReLU (an ``nn.ReLU``) as codes for every reader."""
        relu, _ = self.by_name.get(add.sum_reader, (None, None))
        conv = self._conv_of(add.fused)
        if not isinstance(relu, paddle.nn.ReLU) or conv is None:
            return
        if add.sum_reader in self.sums:
            # A ReLU shared by several blocks' sums: each block's fused conv marks its call
            # (measured: a projection block's, unmarked, left its sum in float where Paddle
            # writes codes, 6.3e-3 of the largest logit off).
            if self.sums[add.sum_reader] not in conv.sum_outputs:
                conv.sum_outputs.append(self.sums[add.sum_reader])
            return
        coded_readers = [
            state for _, state in self.hooked
            if add.sum_reader in state.input_sources and (state.wide_input or state.signed_input)
            and state.name in self.quantized and self.quantized[state.name].input_unsigned
        ]
        readers = [self.quantized[state.name] for state in coded_readers]
        if not readers:
            readers = self._concat_readers(add.sum_reader) or self._pooled_readers(add.sum_reader)
        thresholds = {reader.input_thresholds[0] for reader in readers}
        if len(thresholds) > 1:
            return
        own = self.table.get(add.sum_reader, {}).get("output")
        threshold = thresholds.pop() if thresholds else (own[0] if own else None)
        if threshold is None:
            return
        top = U8_MAX if add.residual_readers else symmetric_levels(8)
        relu_state = self.by_name[add.sum_reader][1]
        call_sums = _sum_calls(relu_state)
        call_tops = _sum_call_tops(relu_state)
        if call_sums is not None or call_tops is not None:
            count_forwards(self.model)
        self.sums[add.sum_reader] = ResidualSumOutput(
            relu, threshold, top, self.activation_bits,
            call_thresholds=_sum_call_thresholds(relu_state, coded_readers, self.quantized, own),
            call_sums=call_sums, call_tops=call_tops,
        )
        replace_sublayer(self.model, relu, self.sums[add.sum_reader])
        conv.sum_outputs.append(self.sums[add.sum_reader])

    def _gives_no_scale(self, name: str) -> bool:
        """The sum's reader is a conv/Linear that gives the sum no scale: kept fp32, or
        reading it shifted (a shifted copy is quantized, not the sum). Paddle's fused conv
        would then have no output scale, so the export keeps the add out of it, in float
        (:func:`imperative_ptq.export.program.quantize_program`); measured: a signed sum read
        by a shifted 1x1 conv, 2.7% of the largest output off Paddle Inference with the
        identity shortcut on codes, 2.7e-7 without."""
        layer, _ = self.by_name.get(name, (None, None))
        if not isinstance(layer, (paddle.nn.layer.conv._ConvNd, paddle.nn.Linear)):
            return False
        reader = self.quantized.get(name)
        return reader is None or reader.input_shifted

    def _signed_sum(self, add) -> bool:
        """Whether the add's sum, not rectified, is read by an int8 layer as a signed input."""
        reader = self.quantized.get(add.sum_reader)
        return not add.after_relu and reader is not None and not reader.input_unsigned

    def _fuse_adds(self) -> set[str]:
        """Simulates each add Paddle fuses into an int8 conv; returns the layers reading the
        sum (or its ReLU) of an add it does not fuse."""
        # Layers reading the sum (or its ReLU) of an add simulated fused, and of one not.
        fused_sums, float_sums = set(), set()
        for layer, state in self.hooked:
            for add in sorted(state.residual_adds, key=lambda add: add.fused):
                float_sums.add(add.sum_reader)
                if not self._int8_conv_output(add.fused) or self._gives_no_scale(add.sum_reader):
                    continue
                if add.residual_top == U8_MAX and self._signed_sum(add):
                    # A u8 residual fused into a conv writing a signed sum (no ReLU after the add,
                    # read s8 by an int8 layer, as x86-vnni runs one): oneDNN reads the u8 codes as
                    # s8 (measured: 53% of the largest logit off Paddle Inference). The export
                    # keeps the add out of the conv, in float.
                    continue
                # An unhooked residual (an F.relu output) read by u8 convs: a ReLU output too.
                if (add.residual_is_input or relu_or_its_max_pool(state.name, self.by_name)) and add.residual_readers:
                    readers = [self.quantized.get(name) for name in add.residual_readers]
                    if any(reader is None or not reader.input_unsigned for reader in readers) or len(
                        {reader.input_thresholds[0] for reader in readers}
                    ) != 1:
                        if state.name in self.sums and any(
                            add.sum_reader in other.input_sources and other.name in self.quantized
                            for _, other in self.hooked
                        ):
                            # The residual is itself a fused conv's sum on the codes that conv
                            # writes, read by a concat too (DLA's root adding its second block's
                            # output): the add reads those codes as they are. Fused only where an
                            # int8 layer reads the new sum, giving it a scale (not the last root's,
                            # read by a global pool before a conv head: measured 0.6% of the
                            # largest logit off, simulated fused); else Paddle adds in float.
                            self._codes_at_sum(add)
                            fused_sums.add(add.sum_reader)
                        continue
                    readers[0].residual_codes = add.residual_top
                    # An unhooked residual (an F.relu output) has no layer that wrote it.
                    readers[0].residual_source = "" if add.residual_is_input else state.name
                    self.identity.append(add.residual_readers[0])
                    self._codes_at_sum(add)
                    fused_sums.add(add.sum_reader)
                elif (
                    not add.residual_readers
                    and self.table.get(state.name, {}).get("output")
                    and state.name not in self.downsample
                ):
                    calibrated = self.table[state.name]["output"]
                    if isinstance(layer, BATCH_NORM_TYPES) and self._int8_conv_output(state.name):
                        replace_sublayer(
                            self.model, layer,
                            QuantizedResidualOutput(layer, calibrated, self.activation_bits, fused_with=add.fused),
                        )
                    elif self._int8_conv_output(state.name):
                        # A projection shortcut with its BatchNorm folded into the conv (torchvision
                        # ResNets converted from ONNX): the conv writes the s8 codes itself
                        # (measured on such a downsample block before an identity block: 6.2% of
                        # the largest output off Paddle Inference while they were added in float).
                        conv = self.quantized[state.name]
                        conv.residual_output_threshold = float(calibrated[0])
                        conv.residual_fused_with = add.fused
                    else:
                        continue
                    self.downsample.append(state.name)
                    self._codes_at_sum(add)
                    fused_sums.add(add.sum_reader)
        return float_sums - (fused_sums | {""})

    def _clip_signed_readers_of(self, float_sums: set[str]) -> None:
        """Puts the int8 readers of a sum Paddle adds in float, which calibration took for s8
        codes, back on their own grid."""
        for layer, state in self.hooked:
            reader = self.quantized.get(state.name)
            reads_float_sum = state.name in float_sums or state.input_sources & float_sums
            if reader is not None and state.signed_input and reads_float_sum:
                # Calibration took the ReLU after an add of an s8 projection for codes, but Paddle
                # adds it in float (a projection reading the signed input shifted, ``x86``): its
                # u8 readers clip the float output at their threshold (export.unsigned), and a
                # fused conv adding it as an identity reads it on its u8 scale, up to code 255
                # (measured: two blocks on an image, 58% of the largest output off Paddle
                # Inference with both on s8 codes).
                reader.input_top_code = symmetric_levels(self.activation_bits)
                reader.input_call_tops = None
                if reader.residual_codes:
                    reader.residual_codes = U8_MAX

    def _code_unwritten_residuals(self, float_sums: set[str]) -> None:
        """Reads as codes an identity shortcut whose writer calibration did not record (an
        ``F.relu`` output, or the model's input), for the fused conv and earlier fp32 readers."""
        for layer, state in self.hooked:
            reader = self.quantized.get(state.name)
            if reader is None or reader.residual_codes or not reader.input_unsigned:
                continue
            if state.name in float_sums:
                continue
            if (state.wide_input or state.signed_input) and not state.input_sources:
                reader.residual_codes = U8_MAX if state.wide_input else symmetric_levels(8)
                reader.residual_source = ""
                # An fp32 layer reading that tensor before this one (a ResNet-vd shortcut's pool
                # run before its branch) reads the codes too, so it puts the tensor on them first
                # (measured: 1.1% of the largest output off Paddle Inference while it pooled the
                # float sum).
                for name in sorted(state.earlier_readers - self.quantized.keys()):
                    earlier, _ = self.by_name.get(name, (None, None))
                    # Only a layer convert left as it was (not one it wrapped already).
                    if earlier is not None and _sublayer(self.model, name) is earlier:
                        replace_sublayer(self.model, earlier, ResidualCodesInput(
                            earlier, float(reader.input_thresholds[0]), reader.residual_codes, self.activation_bits
                        ))


def simulate_pooled_codes(
    model: paddle.nn.Layer,
    hooked: HookedLayers,
    quantized: dict[str, QuantizedLayer],
    activation_bits: int,
) -> None:
    """Puts on its codes an ``nn.ReLU`` output that an int8 conv writes for an int8 max-pool.

    Paddle Inference runs a max-pool after a conv + ReLU in int8 when its readers are int8
    convs; the conv then writes the ReLU output as u8 codes (up to 255) on the scale the export
    aligns with the pool's readers (``export.program``), and every reader reads them, the
    caller included when the network returns the pool (measured: 3.5e-3 of the largest value
    off Paddle Inference when the simulation returned floats). The ReLU must be read only by
    max-pools; the conv marks its next call (:class:`ResidualSumOutput`), so a ReLU shared
    with other calls is put on codes only there.
    """
    by_name = {state.name: (layer, state) for layer, state in hooked}
    for layer, state in hooked:
        if type(layer) is not paddle.nn.ReLU or len(state.input_sources) != 1:
            continue
        source = next(iter(state.input_sources))
        source_layer, source_state = by_name.get(source, (None, None))
        if isinstance(source_layer, BATCH_NORM_TYPES):
            sources = source_state.input_sources
            source = next(iter(sources)) if len(sources) == 1 else ""
        conv = quantized.get(source)
        if conv is None or not isinstance(conv.layer, paddle.nn.Conv2D):
            continue
        readers = [(by_name[name][0], by_name[name][1]) for name in by_name
                   if state.name in by_name[name][1].input_sources]
        pools = {
            reader_state.name for reader, reader_state in readers
            if isinstance(reader, paddle.nn.MaxPool2D)
        }
        direct = [quantized.get(reader_state.name) for _, reader_state in readers
                  if reader_state.name not in pools]
        if not pools or any(reader is None or not reader.input_unsigned for reader in direct):
            continue
        pool_readers = [
            quantized.get(other.name) for _, other in hooked if other.input_sources & pools
        ]
        if direct:
            # Int8 convs read the ReLU too (DLA's max-pool shortcut: the pool's reader is an
            # add): the conv writes it on their threshold, and the pool passes those codes on
            # to whatever reads it (with the session's u8 sum, such a block went from 1.1% of
            # the largest logit off Paddle Inference, the float ReLU output pooled, to 1.6e-7).
            pool_readers = [reader for reader in pool_readers if reader is not None] + direct
        elif not pool_readers or any(
            reader is None or not reader.input_unsigned for reader in pool_readers
        ):
            continue
        thresholds = {reader.input_thresholds[0] for reader in pool_readers}
        if len(thresholds) != 1:
            continue
        wrapped = ResidualSumOutput(layer, thresholds.pop(), U8_MAX, activation_bits)
        replace_sublayer(model, layer, wrapped)
        conv.sum_outputs.append(wrapped)
        logger.info("%s: its int8 conv writes it as u8 codes for the max-pool after it", state.name)


def _sum_calls(relu: LayerState) -> list[bool] | None:
    """Per call of a residual sum's ReLU called more than once in a forward, whether it read
    a sum (:attr:`LayerState.sum_calls`); ``None`` where every call did, or calibration did
    not record which (a table written before, or a ReLU called once)."""
    if relu.calls_per_forward < 2 or not relu.sum_calls or len(relu.sum_calls) >= relu.calls_per_forward:
        return None
    return [call in relu.sum_calls for call in range(relu.calls_per_forward)]


def _sum_call_tops(relu: LayerState) -> list[int] | None:
    """Per call of a residual sum's ReLU called more than once in a forward, the largest code
    of that call's sum: 127 where its residual was s8 (:attr:`LayerState.signed_sum_calls`),
    else 255; ``None`` where every sum's is the same (or calibration did not record them)."""
    if relu.calls_per_forward < 2 or not relu.signed_sum_calls or relu.signed_sum_calls >= relu.sum_calls:
        return None
    # (The ReLU's other calls read no sum: their top is never used.)
    return [symmetric_levels(8) if call in relu.signed_sum_calls else U8_MAX for call in range(relu.calls_per_forward)]


def _sum_call_thresholds(
    relu: LayerState,
    coded_readers: list[LayerState],
    quantized: dict[str, QuantizedLayer],
    own: list[float] | None,
) -> list[float] | None:
    """Per call of a residual sum's ReLU called more than once in a forward (a residual
    block applied twice), the threshold of the codes the fused conv writes that call's output
    on: its int8 readers' input threshold, else the ReLU's own (the export gives each call's
    output its readers' scale: measured 0.2 of the largest output off Paddle Inference with
    the first call's for both). ``None`` where one threshold serves every call."""
    if relu.calls_per_forward < 2 or len(relu.sum_calls) < 2 or not own:
        return None
    by_call: dict[int, set[float]] = {}
    for reader in coded_readers:
        for source, call in reader.input_source_calls:
            if source == relu.name:
                by_call.setdefault(call, set()).add(quantized[reader.name].input_thresholds[0])
    if any(len(thresholds) > 1 for thresholds in by_call.values()):
        return None
    per_sum = {call: next(iter(by_call[call])) if call in by_call else own[0] for call in relu.sum_calls}
    if len(set(per_sum.values())) < 2:
        return None
    # (The ReLU's other calls read no sum: their threshold is never used.)
    return [per_sum.get(call, own[0]) for call in range(relu.calls_per_forward)]


def _sublayer(model: paddle.nn.Layer, name: str) -> paddle.nn.Layer | None:
    """The model's sublayer at the dotted path ``name`` now, or ``None``."""
    return dict(model.named_sublayers()).get(name)
