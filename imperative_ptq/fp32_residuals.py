"""Fused int8 residual blocks re-decided after layers of a converted model are put back in fp32.

``convert`` decides from what calibration saw (the structure section,
:mod:`imperative_ptq.calibration_structure`) how Paddle Inference's fused int8 convs read each
residual (:mod:`imperative_ptq.quant_residual`). With some layers fp32
(:func:`imperative_ptq.analysis.keep_fp32`) Paddle runs those blocks otherwise, and
:func:`refit_fused_residuals` re-decides them from the same section:

* an add whose fused conv is now fp32 runs in float: a downsample shortcut is no longer written
  as s8 codes, the block's output is the float output of an fp32 conv, which its int8 readers
  quantize themselves as u8 up to code 255 (a downsample residual had made it s8); an identity
  shortcut is read as codes only where an int8 op still reads it directly;
* a tensor an int8 conv writes as codes (an int8 op reads it directly: a fused residual conv, or
  an int8 conv reading a block output) is read as those codes by every reader: a reader now fp32
  becomes a :class:`~imperative_ptq.quant_residual.ResidualCodesInput`, which puts it on them;
* an fp32 layer ``convert`` put on a sum's codes because a reader now fp32 read the sum after
  it (``earlier_readers``) reads the float sum again, unless an int8 reader still puts it on them.

Measured on the test zoo's three-block ResNet (Paddle Inference vs simulation, largest output):
0.9-5.5% before, float noise after, for the fused convs, the convs reading a block output and
the first conv of an identity block. Not re-decided (left to a warning): a downsample conv kept
fp32 (with or without a BatchNorm after it), and blocks whose structure lacks the layer reading
the sum (tables written before it was recorded, functional ``F.relu`` sums).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import paddle

from .converted import converted_structure
from .forward_calls import PerCallTopCodes
from .quant_layers import QuantizedLayer, replace_sublayer
from .quant_pool import U8_MAX, QuantizedGlobalAveragePool
from .quant_residual import QuantizedResidualOutput, ResidualCodesInput, ResidualSumOutput
from .quantizers.qparams import symmetric_levels
from .registry import BATCH_NORM_TYPES

__all__ = ["refit_fused_residuals"]

logger = logging.getLogger(__name__)

_NORMS = (*BATCH_NORM_TYPES, QuantizedResidualOutput)


def refit_fused_residuals(
    model: paddle.nn.Layer, kept: Mapping[str, paddle.nn.Layer]
) -> list[str]:
    """Re-decides the fused residual blocks of a converted model, in place, after the layers
    ``kept`` were put back in fp32 (module docstring).

    Args:
        model: The converted model, the kept layers already fp32.
        kept: Name -> the simulated layer (:class:`QuantizedLayer`) each kept layer replaced.

    Returns:
        The kept layers whose block could not be re-decided (see the module docstring).
    """
    return _Refit(model, kept).run()


class _Refit:
    """The state of one :func:`refit_fused_residuals`: the model's layers by name (kept up to
    date as layers are swapped), its calibrated structure and the kept layers not re-decided."""

    def __init__(self, model: paddle.nn.Layer, kept: Mapping[str, paddle.nn.Layer]) -> None:
        self.model = model
        self.kept = kept
        self.structure: dict[str, Any] = converted_structure(model) or {}
        self.layers = dict(model.named_sublayers())
        self.levels = symmetric_levels(8)
        self.adds = [
            (producer, add) for producer, entry in self.structure.items()
            for add in entry.get("residual_adds", [])
        ]
        self.unresolved: set[str] = set()

    def run(self) -> list[str]:
        """Re-decides every block; returns the kept layers whose block could not be."""
        self._unfuse_adds_of_fp32_convs()
        self._read_float_sums_before_fp32_layers()
        self._code_fp32_readers()
        self._uncode_pooled_relus()
        self._unresolved_downsamples()
        return sorted(self.unresolved)

    def _int8_conv(self, name: str) -> bool:
        """Whether ``name`` is an int8 conv, or a BatchNorm after one."""
        layer = self.layers.get(name)
        if isinstance(layer, _NORMS):
            sources = self.structure.get(name, {}).get("input_sources", [])
            layer = self.layers.get(sources[0]) if len(sources) == 1 else None
        return isinstance(layer, QuantizedLayer) and isinstance(layer.layer, paddle.nn.Conv2D)

    def _written_by_int8_conv(self, source: str) -> bool:
        """Whether an int8 conv writes ``source``'s output (through the ReLU fused into it)."""
        fused = [add["fused"] for _, add in self.adds if add.get("sum_reader") == source]
        if fused:
            return all(self._int8_conv(name) for name in fused)
        sources = self.structure.get(source, {}).get("input_sources", [])
        return (
            isinstance(self.layers.get(source), paddle.nn.ReLU) and len(sources) == 1 and self._int8_conv(sources[0])
        )

    def _replace(self, name: str, new: paddle.nn.Layer) -> None:
        """Swaps the layer ``name`` for ``new`` in the model and in :attr:`layers`."""
        replace_sublayer(self.model, self.layers[name], new)
        self.layers[name] = new

    def _unfuse_adds_of_fp32_convs(self) -> None:
        """Adds whose fused conv is now fp32 run in float: their shortcut writes floats, and the
        int8 readers of the block output read it as u8 codes up to 255."""
        for producer, add in self.adds:
            if self._int8_conv(add["fused"]):
                continue
            fused_inputs = self.structure.get(add["fused"], {}).get("input_sources", [])
            involved = {name for name in self.kept if name in (add["fused"], *fused_inputs)}
            shortcut = self.layers.get(producer)
            folded = isinstance(shortcut, QuantizedLayer) and shortcut.residual_output_threshold is not None
            if isinstance(shortcut, QuantizedResidualOutput) or folded:
                if folded:  # a projection conv with its BatchNorm folded: it writes floats again
                    shortcut.residual_output_threshold, shortcut.residual_fused_with = None, ""
                else:
                    self._replace(producer, shortcut.layer)
                reader = add.get("sum_reader", "")
                if not reader:
                    self.unresolved |= involved
                    continue
                # The block output: the fp32 conv's float output, quantized by each int8 reader
                # as u8 up to 255 (the s8 residual had made it s8).
                for name, entry in self.structure.items():
                    if not entry.get("signed_input") or reader not in entry.get("input_sources", []):
                        continue
                    layer = self.layers.get(name)
                    if isinstance(layer, QuantizedLayer) and layer.input_unsigned:
                        layer.input_top_code = U8_MAX
                        if layer.input_call_tops is not None:
                            plain = set(entry.get("plain_input_calls", ()))
                            layer.input_call_tops = PerCallTopCodes([
                                top if call in plain else U8_MAX
                                for call, top in enumerate(layer.input_call_tops.tops)
                            ])
                        if layer.residual_codes:
                            layer.residual_codes = U8_MAX
                    elif isinstance(layer, QuantizedGlobalAveragePool):
                        layer.top = U8_MAX
                    elif isinstance(layer, ResidualCodesInput):
                        layer.top = U8_MAX
            elif add["residual_readers"]:
                readers = [self.layers.get(name) for name in add["residual_readers"]]
                direct = any(
                    isinstance(layer, QuantizedLayer)
                    and (layer.input_top_code > self.levels or self.structure.get(name, {}).get("signed_input"))
                    for name, layer in zip(add["residual_readers"], readers)
                )
                if direct:
                    continue  # still written as codes: an int8 conv reads it directly
                for name, layer in zip(add["residual_readers"], readers):
                    if isinstance(layer, QuantizedLayer):
                        layer.residual_codes, layer.residual_source = 0, ""
                    elif isinstance(layer, ResidualCodesInput):
                        self._replace(name, layer.layer)

    def _read_float_sums_before_fp32_layers(self) -> None:
        """Layers put on a sum's codes for a layer now fp32 that read the sum after them read the
        float sum again."""
        # Layers convert put on a sum's codes because a layer now fp32 read the sum after them
        # (a ResNet-vd shortcut's pool run before its branch's conv): unless another int8 reader
        # of the sum still does, they read the float sum again, as the same block written branch
        # first does (measured: 0.95% of the largest output off Paddle Inference while kept).
        still_coded = {
            earlier for other, entry in self.structure.items()
            if isinstance(self.layers.get(other), QuantizedLayer) and self.layers[other].residual_codes
            for earlier in entry.get("earlier_readers", [])
        }
        for name in self.kept:
            for earlier in self.structure.get(name, {}).get("earlier_readers", []):
                if isinstance(self.layers.get(earlier), ResidualCodesInput) and earlier not in still_coded:
                    self._replace(earlier, self.layers[earlier].layer)

    def _code_fp32_readers(self) -> None:
        """Readers now fp32 of a tensor an int8 conv still writes as codes read those codes."""
        # Readers now fp32 of a tensor an int8 conv still writes as codes.
        for name, old in self.kept.items():
            if not isinstance(old, QuantizedLayer) or not old.input_unsigned:
                continue
            entry = self.structure.get(name, {})
            top = old.residual_codes or (old.input_top_code if old.input_top_code > self.levels else 0)
            if not top and entry.get("signed_input"):
                top = self.levels
            if not top:
                continue
            sources = entry.get("input_sources", [])
            if len(sources) != 1:
                self.unresolved.add(name)  # an F.relu output: its writer is not known
                continue
            read_as_residual = any(
                name in add["residual_readers"] and self._int8_conv(add["fused"]) for _, add in self.adds
            )
            read_by_int8 = any(
                isinstance(self.layers.get(other), QuantizedLayer) and other != name
                and other_entry.get("input_sources") == sources
                and (other_entry.get("wide_input") or other_entry.get("signed_input"))
                for other, other_entry in self.structure.items()
            )
            if (read_as_residual or read_by_int8) and self._written_by_int8_conv(sources[0]):
                self._replace(name, ResidualCodesInput(
                    self.layers[name], float(old.input_thresholds[0]), top, old.activation_bits
                ))

    def _uncode_pooled_relus(self) -> None:
        """ReLUs put on codes for an int8 max-pool whose pool an fp32 conv now reads write floats
        again."""
        # A ReLU put on codes for an int8 max-pool (convert's pooled codes) whose pool is now read
        # by an fp32 conv: the export drops the scales through the pool, and the conv writes floats.
        sum_readers = {add.get("sum_reader", "") for _, add in self.adds}
        for name, layer in list(self.layers.items()):
            if not isinstance(layer, ResidualSumOutput) or name in sum_readers:
                continue
            pools = {other for other, entry in self.structure.items() if name in entry.get("input_sources", [])}
            if all(
                isinstance(self.layers.get(other), QuantizedLayer)
                for other, entry in self.structure.items() if pools & set(entry.get("input_sources", []))
            ):
                continue
            self._replace(name, layer.layer)
            for conv in self.layers.values():
                if isinstance(conv, QuantizedLayer) and layer in conv.sum_outputs:
                    conv.sum_outputs.remove(layer)

    def _unresolved_downsamples(self) -> None:
        """Kept layers whose downsample shortcut Paddle quantizes from a float output: not
        re-decided."""
        # A downsample conv kept fp32: its shortcut is quantized by Paddle from the conv's float
        # output (measured 0.5% of the largest output off the simulation, cause not found).
        for producer, add in self.adds:
            if isinstance(self.layers.get(producer), QuantizedResidualOutput):
                self.unresolved.update(
                    source for source in self.structure.get(producer, {}).get("input_sources", [])
                    if source in self.kept
                )
            simulated = self.kept.get(producer)
            if isinstance(simulated, QuantizedLayer) and simulated.residual_output_threshold is not None:
                self.unresolved.add(producer)  # the same, with its BatchNorm folded into it
