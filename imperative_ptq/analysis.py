"""Per-layer quantization sensitivity, and leaving the most sensitive layers in fp32.

:func:`analyze` measures what quantizing *one* layer does: the fp32 model is run with a single
layer swapped for its :class:`~imperative_ptq.quant_layers.QuantizedLayer` (swapped in place and
restored in a ``finally``), so every number isolates that layer's error from the rest of the
network. Ranking by the end-to-end effect rather than the layer's own SQNR matters: a layer with
a poor local SQNR is harmless if the network downstream tolerates its noise.

:func:`keep_fp32` undoes the quantization of chosen layers of a converted model, and
:func:`search_skip_set` picks those layers greedily against an accuracy budget::

    report = analyze(model, qmodel, loader, metric=accuracy)
    print(report.to_markdown())
    result = search_skip_set(model, qmodel, accuracy, budget=0.5, report=report)
    keep_fp32(qmodel, result.skip, model)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import logging
import math
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import paddle

from .batches import batch_to_call, eval_mode
from .converted import converted_structure, converted_table, is_marked_converted
from .fp32_residuals import refit_fused_residuals
from .functional_matmul import with_matmul_sites
from .quant_layers import QuantizedLayer, QuantizedMatmul, replace_sublayer
from .quant_pool import QuantizedGlobalAveragePool
from .quant_residual import QuantizedResidualOutput
from .quant_rnn import QuantizedLSTM
from .registry import PTQRegistry

__all__ = [
    "ErrorStats",
    "LayerSensitivity",
    "OutputsStats",
    "SensitivityReport",
    "SkipSearchResult",
    "analyze",
    "keep_fp32",
    "quantized_layer_names",
    "search_skip_set",
]

logger = logging.getLogger(__name__)

Metric = Callable[[paddle.nn.Layer], float]


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    """The effect of quantizing one layer alone.

    Attributes:
        name: Sublayer name in the model.
        layer_type: Class name of the fp32 layer.
        sqnr_db: SQNR of the layer's output, quantized vs fp32, in dB (``inf`` if identical,
            NaN if the layer never ran on ``data``).
        cosine: Cosine similarity of the layer's output, quantized vs fp32.
        output_sqnr_db: SQNR of the model's output with only this layer quantized (of a model
            returning several float tensors, the lowest of theirs).
        output_cosine: Cosine similarity of the model's output with only this layer quantized
            (the lowest of several outputs').
        metric: ``metric(model)`` with only this layer quantized, if a metric was given.
        metric_drop: fp32 metric minus :attr:`metric` (positive: worse), if a metric was given.
        input_threshold: The layer's calibrated input threshold.
        int8: Whether the layer is a quantized layer of the converted model; ``False`` for a
            functional concat or multiply, observed in calibration and computed in float by
            the simulation (:mod:`imperative_ptq.functional_ops`; an int8 concat in Paddle
            Inference only copies its readers' codes): its row holds its thresholds, NaN
            figures.
        output_threshold: The layer's calibrated output threshold (rows of observed layers).
    """

    name: str
    layer_type: str
    sqnr_db: float
    cosine: float
    output_sqnr_db: float
    output_cosine: float
    metric: float | None = None
    metric_drop: float | None = None
    input_threshold: float | None = None
    int8: bool = True
    output_threshold: float | None = None


@dataclasses.dataclass
class SensitivityReport:
    """Per-layer sensitivities, most sensitive first.

    Rows are ranked by metric drop (largest first) when a metric was given, otherwise, and to
    break ties, by model-output SQNR (lowest first).

    Attributes:
        rows: One :class:`LayerSensitivity` per quantized layer.
        fp32_metric: ``metric`` of the fp32 model, if a metric was given.
        quantized_metric: ``metric`` of the fully quantized model, if a metric was given.
        num_batches: Batches the SQNR/cosine figures were measured on.
    """

    rows: list[LayerSensitivity]
    fp32_metric: float | None = None
    quantized_metric: float | None = None
    num_batches: int = 0

    @property
    def names(self) -> list[str]:
        """Layer names, most sensitive first."""
        return [row.name for row in self.rows]

    def most_sensitive(self, k: int = 5) -> list[LayerSensitivity]:
        """The ``k`` most sensitive layers."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        return self.rows[:k]

    def below_sqnr(self, db: float, output: bool = False) -> list[LayerSensitivity]:
        """Layers whose SQNR is below ``db`` (layer output; model output if ``output``)."""
        key = "output_sqnr_db" if output else "sqnr_db"
        return [row for row in self.rows if getattr(row, key) < db]

    def row(self, name: str) -> LayerSensitivity:
        """The row of layer ``name``.

        Raises:
            KeyError: No such layer.
        """
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def to_markdown(self) -> str:
        """A Markdown table of the rows, with the metric summary when there is one."""
        has_metric = any(row.metric is not None for row in self.rows)
        lines = []
        if self.fp32_metric is not None:
            lines.append(
                f"fp32 metric: {self.fp32_metric:.4f}; fully quantized: "
                f"{_fmt(self.quantized_metric, '.4f')}\n"
            )
        observed = any(not row.int8 for row in self.rows)
        header = ["rank", "layer", "type", "SQNR (dB)", "cosine", "output SQNR (dB)",
                  "output cosine", "input threshold"]
        if observed:
            header += ["output threshold", "runs"]
        if has_metric:
            header += ["metric", "drop"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" if i in (1, 2) else "---:" for i in range(len(header))) + "|")
        for rank, row in enumerate(self.rows, 1):
            cells = [
                str(rank), f"`{row.name}`", row.layer_type, _fmt(row.sqnr_db, ".2f"),
                _fmt(row.cosine, ".6f"), _fmt(row.output_sqnr_db, ".2f"),
                _fmt(row.output_cosine, ".6f"), _fmt(row.input_threshold, ".4g"),
            ]
            if observed:
                cells += [_fmt(row.output_threshold, ".4g"), "int8" if row.int8 else "observed"]
            if has_metric:
                cells += [_fmt(row.metric, ".4f"), _fmt(row.metric_drop, "+.4f")]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        """The Markdown table (:meth:`to_markdown`), so ``print(report)`` reads as one."""
        return self.to_markdown()

    def save(
        self,
        directory: str | os.PathLike,
        model: paddle.nn.Layer | None = None,
        data: Iterable[Any] | None = None,
        *,
        histograms: dict[str, Any] | None = None,
        fmt: str = "md",
        plots: bool = True,
        max_batches: int | None = None,
    ) -> str:
        """Writes ``report.md`` (or ``report.html``) and PNG plots into ``directory``.

        Plots: a per-layer SQNR bar chart and one activation histogram per layer with its
        threshold marked. Histograms come from ``histograms`` if given, else from ``model``:
        a calibrated but not yet converted model (its calibration statistics), or the fp32
        model together with ``data`` (collected by running it, thresholds from this report).

        Args:
            directory: Output directory (created).
            model: Calibrating model, or fp32 model with ``data``; optional.
            data: Batches for collecting histograms from an fp32 ``model``.
            histograms: Precomputed ``{name: ActivationHistogram}``.
            fmt: ``"md"`` or ``"html"``.
            plots: Draw PNGs (needs matplotlib); ``False`` writes the table only.
            max_batches: Limit on ``data`` batches.

        Returns:
            The path of the report file.

        Raises:
            ImportError: ``plots`` and matplotlib is not installed.
            ValueError: Unknown ``fmt``.
        """
        from .report import write_report

        return write_report(
            self, directory, model=model, data=data, histograms=histograms, fmt=fmt,
            plots=plots, max_batches=max_batches,
        )


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, spec)


# ------------------------------------------------------------------------------ swapping
def quantized_layer_names(quantized_model: paddle.nn.Layer) -> list[str]:
    """Names of the :class:`QuantizedLayer` sublayers of a converted model, in model order."""
    return [
        name for name, layer in quantized_model.named_sublayers()
        if isinstance(layer, QuantizedLayer)
    ]


def _get(model: paddle.nn.Layer, name: str) -> paddle.nn.Layer:
    layer = model
    for part in name.split("."):
        layer = getattr(layer, part)
    return layer


def _replace(model: paddle.nn.Layer, name: str, layer: paddle.nn.Layer) -> paddle.nn.Layer:
    """Puts ``layer`` wherever ``model`` holds the layer at ``name`` (under every name of a
    shared layer, as ``convert`` does); returns that layer."""
    old = _get(model, name)
    replace_sublayer(model, old, layer)
    return old


@contextlib.contextmanager
def _swapped(model: paddle.nn.Layer, name: str, layer: paddle.nn.Layer) -> Iterator[None]:
    # A fused residual conv marks the ReLU reading its sum in the converted model
    # (QuantizedLayer.sum_outputs); run inside the fp32 model, it must not mark that one.
    sum_outputs = layer.sum_outputs if isinstance(layer, QuantizedLayer) else []
    if sum_outputs:
        layer.sum_outputs = []
    old = _replace(model, name, layer)
    try:
        yield
    finally:
        _replace(model, name, old)
        if sum_outputs:
            layer.sum_outputs = sum_outputs


def _check_pair(name: str, fp32: paddle.nn.Layer, quantized: QuantizedLayer) -> None:
    """Refuses an fp32 layer that is not the one ``quantized`` was made from.

    Quantization only changes the weight (and the bias by what bias correction and the bias
    grid recorded adding), so a differing bias means the quantized model was fused
    (``quantize(fuse=True)``) and the fp32 layer lacks the folded batch norm.
    """
    inner = quantized.layer
    if type(fp32) is not type(inner):
        raise ValueError(
            f"layer {name!r} is a {type(fp32).__name__} in the fp32 model but the quantized "
            f"model wraps a {type(inner).__name__}"
        )
    if list(fp32.weight.shape) != list(inner.weight.shape):
        raise ValueError(f"layer {name!r}: weight shapes differ between fp32 and quantized model")
    fp32_bias, q_bias = getattr(fp32, "bias", None), getattr(inner, "bias", None)
    # Bias correction (to a zero bias it created, if none) and the int32 grid of bias_grid.py
    # moved the bias by these.
    added = [moved for moved in (quantized.bias_correction, quantized.bias_on_grid) if moved is not None]
    if added and q_bias is not None:
        expected = sum(added) if fp32_bias is None else fp32_bias.numpy() + sum(added)
        same = np.allclose(q_bias.numpy(), expected, rtol=1e-5, atol=1e-6)
    else:
        same = (fp32_bias is None) == (q_bias is None) and (
            fp32_bias is None or np.array_equal(fp32_bias.numpy(), q_bias.numpy())
        )
    if not same:
        raise ValueError(
            f"layer {name!r}: the bias differs between the fp32 and quantized model (was it "
            f"quantized with fuse=True or PTQConfig(equalization=True)? then pass the fp32 "
            f"model fused or equalized the same way)"
        )


def _pairs(
    model: paddle.nn.Layer, quantized_model: paddle.nn.Layer
) -> list[tuple[str, paddle.nn.Layer, QuantizedLayer]]:
    if model is quantized_model:
        raise ValueError(
            "model and quantized_model are the same object (quantize(inplace=True)?): the fp32 "
            "model is needed separately"
        )
    names = quantized_layer_names(quantized_model)
    if not names and is_marked_converted(quantized_model):
        raise ValueError(
            "quantized_model is converted but has no QuantizedLayer: convert kept every "
            "calibrated layer fp32 (its warnings say why), so there is nothing to analyze"
        )
    if not names:
        raise ValueError("quantized_model has no QuantizedLayer: call ImperativePTQ.convert first")
    pairs = []
    for name in names:
        try:
            fp32 = _get(model, name)
        except AttributeError:
            raise ValueError(f"the fp32 model has no layer {name!r}") from None
        quantized = _get(quantized_model, name)
        _check_pair(name, fp32, quantized)
        pairs.append((name, fp32, quantized))
    return pairs


# ------------------------------------------------------------------------------ analysis
class ErrorStats:
    """Running sums for SQNR and cosine similarity over all batches (flattened); both are NaN
    until a batch was added (a layer off every batch's path is unmeasured, not bit-exact)."""

    __slots__ = ("signal", "noise", "dot", "quantized", "batches")

    def __init__(self) -> None:
        self.signal = self.noise = self.dot = self.quantized = 0.0
        self.batches = 0

    def add(self, reference: paddle.Tensor, quantized: paddle.Tensor) -> None:
        ref = reference.astype("float64").reshape([-1])
        out = quantized.astype("float64").reshape([-1])
        # One device-to-host copy for the four sums.
        sums = paddle.stack([
            paddle.sum(ref * ref), paddle.sum((ref - out) ** 2), paddle.sum(ref * out),
            paddle.sum(out * out),
        ]).numpy()
        self.signal += float(sums[0])
        self.noise += float(sums[1])
        self.dot += float(sums[2])
        self.quantized += float(sums[3])
        self.batches += 1

    @property
    def sqnr_db(self) -> float:
        if not self.batches:
            return math.nan
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)

    @property
    def cosine(self) -> float:
        if not self.batches:
            return math.nan
        norm = math.sqrt(self.signal * self.quantized)
        # Two all-zero outputs agree perfectly.
        return self.dot / norm if norm > 0 else float(self.signal == self.quantized)


def _float_tensors(value: Any) -> list[paddle.Tensor]:
    """The float tensors of a layer's or model's output (nested tuples, lists and dicts, in
    order; a lone tensor whatever its type)."""
    if isinstance(value, paddle.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    found = []
    if isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, paddle.Tensor):
                if paddle.is_floating_point(item):
                    found.append(item)
            else:
                found.extend(_float_tensors(item))
    return found


def _first_float_tensor(value: Any) -> paddle.Tensor:
    found = _float_tensors(value)
    if not found:
        raise TypeError(f"model output has no float tensor: {type(value).__name__}")
    return found[0]


class OutputsStats:
    """:class:`ErrorStats` of each float tensor a model returns; the figures are the worst
    output's (a layer that only one of several heads reads is as sensitive as that head)."""

    __slots__ = ("outputs",)

    def __init__(self) -> None:
        self.outputs: list[ErrorStats] = []

    def add(self, reference: list[paddle.Tensor], quantized: list[paddle.Tensor]) -> None:
        if len(reference) != len(quantized):
            raise ValueError(
                f"the model returned {len(reference)} float tensors in fp32 and {len(quantized)} with "
                "one layer quantized"
            )
        while len(self.outputs) < len(reference):
            self.outputs.append(ErrorStats())
        for stats, ref, out in zip(self.outputs, reference, quantized):
            stats.add(ref, out)

    @property
    def sqnr_db(self) -> float:
        return min((stats.sqnr_db for stats in self.outputs), default=math.nan)

    @property
    def cosine(self) -> float:
        return min((stats.cosine for stats in self.outputs), default=math.nan)


class _Capture:
    """Forward-post hook keeping the last output of a layer."""

    def __init__(self) -> None:
        self.value: paddle.Tensor | None = None

    def __call__(self, layer: paddle.nn.Layer, inputs: Any, outputs: Any) -> None:
        self.value = _first_float_tensor(outputs)


def analyze(
    model: paddle.nn.Layer,
    quantized_model: paddle.nn.Layer,
    data: Iterable[Any],
    metric: Metric | None = None,
    max_batches: int | None = None,
) -> SensitivityReport:
    """Measures, layer by layer, the error of quantizing only that layer.

    For each :class:`QuantizedLayer` of ``quantized_model``, the fp32 ``model`` is run with that
    one layer swapped in (and restored afterwards, also on error), and compared to the plain
    fp32 run: the layer's own output (SQNR, cosine) and the model's output (SQNR, cosine; of a
    model returning several float tensors, the worst of them), all accumulated over every
    element of every batch; plus ``metric`` of that model if given.
    Observed-only layers (functional concats and multiplies, float in every runtime) get rows
    with their output thresholds and no measurement.

    Args:
        model: The fp32 model ``quantized_model`` was made from (not fused separately).
        quantized_model: The converted model (:meth:`ImperativePTQ.convert`); not modified.
        data: Batches: tensors/arrays, tuples of them, or ``(inputs, labels)`` pairs. Iterated
            once, so a generator works.
        metric: ``metric(model) -> float``, higher is better (e.g. accuracy). Called once per
            layer, on the fp32 model and on ``quantized_model``.
        max_batches: Use at most this many batches.

    Returns:
        The :class:`SensitivityReport`, most sensitive layer first.

    Raises:
        ValueError: ``quantized_model`` is not converted, does not match ``model``, or
            ``data`` is empty.
    """
    model = with_matmul_sites(model, quantized_model)
    pairs = _pairs(model, quantized_model)
    layer_stats = {name: ErrorStats() for name, _, _ in pairs}
    output_stats = {name: OutputsStats() for name, _, _ in pairs}
    batches = data if max_batches is None else itertools.islice(data, max_batches)
    num_batches = 0
    to_call = batch_to_call(model)
    with eval_mode(model, quantized_model), paddle.no_grad():
        for batch in batches:
            args, kwargs = to_call(batch)
            captures = {name: _Capture() for name, _, _ in pairs}
            handles = [fp32.register_forward_post_hook(captures[name]) for name, fp32, _ in pairs]
            try:
                returned = model(*args, **kwargs)
            finally:
                for handle in handles:
                    handle.remove()
            reference = _float_tensors(returned)
            if not reference:
                raise TypeError(f"model output has no float tensor: {type(returned).__name__}")
            for name, _, quantized in pairs:
                capture = _Capture()
                handle = quantized.register_forward_post_hook(capture)
                try:
                    with _swapped(model, name, quantized):
                        output = _float_tensors(model(*args, **kwargs))
                finally:
                    handle.remove()
                if captures[name].value is None or capture.value is None:
                    continue  # the layer is not on this batch's path
                layer_stats[name].add(captures[name].value, capture.value)
                output_stats[name].add(reference, output)
            num_batches += 1
    if not num_batches:
        raise ValueError("data yielded no batch")

    fp32_metric = quantized_metric = None
    metrics: dict[str, float] = {}
    if metric is not None:
        with eval_mode(model, quantized_model):
            fp32_metric = float(metric(model))
            quantized_metric = float(metric(quantized_model))
            for name, _, quantized in pairs:
                with _swapped(model, name, quantized):
                    metrics[name] = float(metric(model))

    unmeasured = [name for name, stats in layer_stats.items() if not stats.batches]
    if unmeasured:
        logger.warning("layers never ran on the data (SQNR/cosine NaN): %s", ", ".join(unmeasured))
    rows = []
    for name, fp32, quantized in pairs:
        value = metrics.get(name)
        rows.append(LayerSensitivity(
            name=name,
            layer_type=type(fp32).__name__,
            sqnr_db=layer_stats[name].sqnr_db,
            cosine=layer_stats[name].cosine,
            output_sqnr_db=output_stats[name].sqnr_db,
            output_cosine=output_stats[name].cosine,
            metric=value,
            metric_drop=None if value is None else fp32_metric - value,
            input_threshold=quantized.input_thresholds[0] if quantized.input_thresholds else None,
        ))
    rows.extend(_observed_rows(quantized_model))
    # NaN (unmeasured) compares false both ways and would scramble the order: rank it last.
    rows.sort(key=lambda r: (
        -(r.metric_drop or 0.0), math.isnan(r.output_sqnr_db), r.output_sqnr_db, r.sqnr_db
    ))
    logger.info("analyzed %d quantized layers on %d batches", len(rows), num_batches)
    return SensitivityReport(rows, fp32_metric, quantized_metric, num_batches)


def _observed_rows(quantized_model: paddle.nn.Layer) -> list[LayerSensitivity]:
    """Rows of the observed-only layers (functional concats and multiplies): their
    thresholds from the converted model's table; they run fp32, so nothing is measured."""
    table = converted_table(quantized_model) or {}
    rows = []
    for name, layer in quantized_model.named_sublayers():
        if not PTQRegistry.is_observed_only(layer):
            continue
        entry = table.get(name, {})
        first = {role: (entry.get(role) or [None])[0] for role in ("input", "output")}
        nan = float("nan")
        rows.append(LayerSensitivity(
            name=name, layer_type=type(layer).__name__, sqnr_db=nan, cosine=nan,
            output_sqnr_db=nan, output_cosine=nan, input_threshold=first["input"], int8=False,
            output_threshold=first["output"],
        ))
    return rows


# ---------------------------------------------------------------------------- fp32 layers
def keep_fp32(
    quantized_model: paddle.nn.Layer, names: Iterable[str], model: paddle.nn.Layer
) -> paddle.nn.Layer:
    """Puts layers of a converted model back in fp32, in place.

    A :class:`QuantizedLayer` only holds fake-quantized weights, so each named layer is
    replaced by a deep copy of the layer of the same name in the fp32 ``model``, and the fused
    int8 residual blocks are re-decided with those layers fp32
    (:func:`~imperative_ptq.fp32_residuals.refit_fused_residuals`). A layer a fused int8
    residual block depends on (:func:`residual_layers`) whose block could not be re-decided (a
    downsample conv, a block written with functional ops) is kept with a warning: the
    simulation keeps modelling that block's residual arithmetic, which Paddle Inference may no
    longer run.

    Args:
        quantized_model: The converted model.
        names: Names of its :class:`QuantizedLayer` (or
            :class:`~imperative_ptq.quant_rnn.QuantizedLSTM`, or
            :class:`~imperative_ptq.quant_layers.QuantizedMatmul`) sublayers.
        model: The fp32 model it was made from.

    Returns:
        ``quantized_model``.

    Raises:
        TypeError: An argument of the wrong kind (the arguments in another order: ``names``
            a layer, ``model`` not one; a name that is not a string).
        ValueError: A name is not a quantized layer, or the fp32 layer does not match.
    """
    if isinstance(names, paddle.nn.Layer) or not isinstance(names, Iterable):
        raise TypeError(
            f"keep_fp32(quantized_model, names, model): names must be a layer name or an "
            f"iterable of them, got {type(names).__name__}"
        )
    for argument, value in (("quantized_model", quantized_model), ("model", model)):
        if not isinstance(value, paddle.nn.Layer):
            raise TypeError(
                f"keep_fp32(quantized_model, names, model): {argument} must be a paddle.nn.Layer, "
                f"got {type(value).__name__}"
            )
    if model is quantized_model:
        raise ValueError("model and quantized_model are the same object")
    model = with_matmul_sites(model, quantized_model)
    names = [names] if isinstance(names, str) else list(names)
    strays = [name for name in names if not isinstance(name, str)]
    if strays:
        raise TypeError(f"keep_fp32: names must be strings (layer names), got {strays[0]!r}")
    replacements = []
    for name in names:  # check everything before changing anything
        try:
            quantized = _get(quantized_model, name)
            fp32 = _get(model, name)
        except AttributeError:
            raise ValueError(f"no layer {name!r} in both models") from None
        if isinstance(quantized, (QuantizedLSTM, QuantizedMatmul)):  # hold their fp32 layer
            if type(fp32) is not type(quantized.layer):
                raise ValueError(
                    f"layer {name!r} is a {type(fp32).__name__} in the fp32 model, not a "
                    f"{type(quantized.layer).__name__}"
                )
            replacements.append((name, quantized.layer))
            continue
        if not isinstance(quantized, QuantizedLayer):
            raise ValueError(
                f"layer {name!r} is a {type(quantized).__name__}, not a QuantizedLayer"
            )
        _check_pair(name, fp32, quantized)
        replacements.append((name, fp32))
    residual = residual_layers(quantized_model)
    simulated = {}
    for name, fp32 in replacements:
        simulated[name] = _get(quantized_model, name)
        restored = copy.deepcopy(fp32)
        restored.eval()
        _replace(quantized_model, name, restored)
    if replacements:
        logger.info("kept %d layers in fp32: %s", len(replacements), ", ".join(names))
    kept = set(names)
    for pool_name, pool in list(quantized_model.named_sublayers()):
        if isinstance(pool, QuantizedGlobalAveragePool) and pool.readers and kept.issuperset(pool.readers):
            # Its int8 Linear readers are fp32 now: Paddle runs the pool fp32 too (the export
            # drops the scales around a fp32 Linear's input; measured: 3.6% of the largest
            # logit off Paddle Inference with the pool still simulated int8).
            _replace(quantized_model, pool_name, pool.layer)
            logger.info("the int8 head pool %s runs fp32 again, before %s", pool_name, ", ".join(pool.readers))
    unresolved = set(refit_fused_residuals(quantized_model, simulated))
    touched = [name for name in names if name in residual and name in unresolved]
    if touched:
        logger.warning(
            "kept in fp32 inside a fused int8 residual block: %s. The simulation keeps "
            "modelling the block's int8 residual arithmetic around them, which Paddle Inference "
            "may no longer run with an fp32 conv there: it can differ from the simulation by the "
            "residual's rounding (measured up to 1%% of the largest output on a small ResNet).",
            ", ".join(touched),
        )
    return quantized_model


def residual_layers(quantized_model: paddle.nn.Layer) -> set[str]:
    """Names of the quantized layers whose int8 form a fused residual block depends on
    (:mod:`imperative_ptq.quant_residual`): the conv whose output the add is fused into, the
    convs reading a block output as codes up to 255, the downsample conv. (A conv reading an
    identity shortcut is not one: kept fp32, the shortcut loses its scale and the add runs in
    float in both.)"""
    found: set[str] = set()
    structure = converted_structure(quantized_model) or {}
    for name, layer in quantized_model.named_sublayers():
        if isinstance(layer, QuantizedLayer) and layer.input_unsigned and layer.input_top_code > 127:
            found.add(name)
        elif isinstance(layer, QuantizedResidualOutput):
            found.update(structure.get(name, {}).get("input_sources", []))
            found.update(_producing_conv(structure, layer.fused_with))
    for entry in structure.values():
        for add in entry.get("residual_adds", []):
            found.update(_producing_conv(structure, add["fused"]))
    return found


def _producing_conv(structure: dict[str, Any], name: str) -> list[str]:
    """``name`` itself, or, for a BatchNorm, the conv it read (from the structure section)."""
    sources = structure.get(name, {}).get("input_sources", [])
    return list(sources) if sources else [name]


@dataclasses.dataclass
class SkipSearchResult:
    """Outcome of :func:`search_skip_set`.

    Attributes:
        skip: Layers to keep in fp32, in sensitivity order.
        metric: Metric of the quantized model with ``skip`` in fp32.
        fp32_metric: Metric of the fp32 model.
        within_budget: Whether ``fp32_metric - metric <= budget``.
        model: A copy of the quantized model with ``skip`` in fp32.
        history: ``(skip set, metric)`` of every evaluation, in order.
    """

    skip: list[str]
    metric: float
    fp32_metric: float
    within_budget: bool
    model: paddle.nn.Layer
    history: list[tuple[tuple[str, ...], float]]


def search_skip_set(
    model: paddle.nn.Layer,
    quantized_model: paddle.nn.Layer,
    evaluate: Metric,
    budget: float,
    report: SensitivityReport | None = None,
    *,
    data: Iterable[Any] | None = None,
    prune: bool = True,
) -> SkipSearchResult:
    """Finds a small set of layers to keep in fp32 so the metric drop stays within ``budget``.

    Greedy, not optimal: layers are put back in fp32 one at a time in sensitivity order (most
    sensitive first) until ``evaluate(fp32) - evaluate(quantized) <= budget``. With ``prune``
    each chosen layer is then tried quantized again (least sensitive first) and left quantized
    if the budget still holds, so a layer that only helped early is not kept. Costs at most
    ``2 * layers + 2`` evaluations. ``quantized_model`` itself is not modified.

    Args:
        model: The fp32 model.
        quantized_model: The converted model.
        evaluate: ``evaluate(model) -> float``, higher is better.
        budget: Largest acceptable drop of the metric vs fp32 (>= 0).
        report: Sensitivity order; computed with :func:`analyze` on ``data`` if omitted.
        data: Batches for :func:`analyze` when ``report`` is omitted.
        prune: Run the backward pruning pass.

    Returns:
        The :class:`SkipSearchResult`; if even all layers in fp32 miss the budget, all of them
        with ``within_budget=False``.

    Raises:
        ValueError: Negative budget, or neither ``report`` nor ``data``.
    """
    if not budget >= 0:
        raise ValueError(f"budget must be >= 0, got {budget!r}")
    model = with_matmul_sites(model, quantized_model)
    if report is None:
        if data is None:
            raise ValueError("give a SensitivityReport or data to compute one")
        report = analyze(model, quantized_model, data)
    pairs = {name: (fp32, quantized) for name, fp32, quantized in _pairs(model, quantized_model)}
    order = [name for name in report.names if name in pairs]
    history: list[tuple[tuple[str, ...], float]] = []

    def with_fp32(skip: Sequence[str]) -> paddle.nn.Layer:
        """A copy of ``quantized_model`` with ``skip`` in fp32 through :func:`keep_fp32`, so
        fused residual blocks are re-decided as the user's own ``keep_fp32`` call will."""
        built = copy.deepcopy(quantized_model)
        if skip:
            keep_fp32(built, skip, model)
        return built

    def score(skip: Sequence[str]) -> tuple[float, paddle.nn.Layer]:
        built = with_fp32(skip)
        with eval_mode(built):
            value = float(evaluate(built))
        history.append((tuple(skip), value))
        logger.info("fp32 layers %s: metric %.6g", list(skip) or "none", value)
        return value, built

    with eval_mode(model):
        fp32_metric = float(evaluate(model))
    floor = fp32_metric - budget
    skip: list[str] = []
    current, work = score(skip)
    for name in order:
        if current >= floor:
            break
        skip.append(name)
        current, work = score(skip)
    if prune and current >= floor:
        for name in reversed(list(skip[:-1])):
            # The last one added was needed: without it the budget was missed.
            trial = [n for n in skip if n != name]
            value, built = score(trial)
            if value >= floor:
                skip, current, work = trial, value, built
    within = current >= floor
    if not within:
        logger.warning(
            "metric %.6g is below the budget floor %.6g even with %d layers in fp32",
            current, floor, len(skip),
        )
    return SkipSearchResult(skip, current, fp32_metric, within, work, history)
