"""Activation histograms and the sensitivity report's files (Markdown/HTML with PNG plots).

Histograms come either from a calibrated, not yet converted model (the histogram quantizers'
own statistics, so the plot shows exactly what the threshold was computed from) or from running
data through the fp32 model, merged batch by batch with the same re-binning as calibration.

Plotting needs matplotlib, an optional extra (``pip install imperative_ptq[report]``); it is
imported only when a plot is drawn, with the non-interactive Agg backend.
"""

from __future__ import annotations

import dataclasses
import html
import logging
import os
import re
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np
import paddle

from .batches import eval_mode, run_batches
from .probabilities import probability_thresholds
from .quantizers import BaseHistQuantizer, BaseQuantizer
from .quantizers.histogram import HistogramState
from .quantizers.sample import TensorSample
from .session import hooked_states

if TYPE_CHECKING:
    from .analysis import SensitivityReport

__all__ = [
    "ActivationHistogram",
    "calibration_histograms",
    "collect_histograms",
    "plot_histogram",
    "plot_sqnr",
    "write_report",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ActivationHistogram:
    """Histogram of ``|x|`` of one activation, with its threshold.

    Attributes:
        name: Layer name.
        role: ``"input"`` or ``"output"``.
        counts: Counts of ``bins`` equal bins over ``[0, upper]``; ``None`` when only the
            abs-max is known (abs-max quantizers keep no histogram).
        upper: Right edge of the range (the largest ``|x|`` seen, up to re-binning).
        threshold: The quantization threshold, if known.
    """

    name: str
    role: str
    counts: np.ndarray | None
    upper: float
    threshold: float | None = None

    @property
    def edges(self) -> np.ndarray:
        """Bin edges, ``bins + 1`` of them."""
        bins = 0 if self.counts is None else self.counts.shape[0]
        return np.linspace(0.0, self.upper, bins + 1)

    @property
    def clipped_fraction(self) -> float | None:
        """Share of values above the threshold (up to one bin), if known."""
        if self.counts is None or self.threshold is None or not self.counts.sum():
            return None
        centres = 0.5 * (self.edges[:-1] + self.edges[1:])
        return float(self.counts[centres > self.threshold].sum() / self.counts.sum())


def calibration_histograms(
    model: paddle.nn.Layer, role: str = "input"
) -> dict[str, ActivationHistogram]:
    """Histograms and thresholds from a calibrated model, before ``convert``.

    Args:
        model: Returned by :meth:`ImperativePTQ.quantize` and run on calibration data.
        role: ``"input"`` (what a :class:`QuantizedLayer` quantizes) or ``"output"``.

    Returns:
        ``{layer name: ActivationHistogram}`` for layers whose ``role`` quantizer saw data.

    Raises:
        ValueError: Unknown ``role``, or the model holds no calibration state (converted?).
    """
    if role not in ("input", "output"):
        raise ValueError(f"role must be 'input' or 'output', got {role!r}")
    found: dict[str, ActivationHistogram] = {}
    states = hooked_states(model)
    if not states:
        raise ValueError(
            "model has no calibration state: pass the model from ImperativePTQ.quantize before "
            "convert, or the fp32 model with data"
        )
    for state in states:
        quantizer: BaseQuantizer | None = getattr(state, f"{role}_quantizer")
        if quantizer is None or not quantizer.num_batches:
            continue
        threshold = _first_threshold(quantizer)
        if role == "input" and threshold is not None:
            (threshold,) = probability_thresholds(state, quantizer, [threshold])
        if isinstance(quantizer, BaseHistQuantizer):
            hist = quantizer.states[0]
            counts = None if hist.counts is None else np.asarray(hist.counts, np.float64)
            found[state.name] = ActivationHistogram(state.name, role, counts, hist.upper, threshold)
        else:
            stats = quantizer.state_dict()
            upper = float(np.max(stats["abs_max_vals"])) if "abs_max_vals" in stats else threshold
            found[state.name] = ActivationHistogram(state.name, role, None, upper or 0.0, threshold)
    return found


def _first_threshold(quantizer: BaseQuantizer) -> float | None:
    try:
        quantizer.cal_thresholds()
    except RuntimeError:
        return None
    value = quantizer.thresholds[0]
    return float(np.max(value))


def collect_histograms(
    model: paddle.nn.Layer,
    data: Iterable[Any],
    names: Iterable[str],
    thresholds: Mapping[str, float | None] | None = None,
    bins: int = 512,
    max_batches: int | None = None,
    role: str = "input",
) -> dict[str, ActivationHistogram]:
    """Histograms of ``|x|`` of layers' inputs (or outputs), by running ``data`` through ``model``.

    Args:
        model: Usually the fp32 model.
        data: Batches, as for :func:`imperative_ptq.analysis.analyze`.
        names: Sublayer names to observe.
        thresholds: ``{name: threshold}`` to mark on the plots.
        bins: Number of bins.
        max_batches: Use at most this many batches.
        role: ``"input"`` (first positional input) or ``"output"``.

    Raises:
        ValueError: Unknown role or layer name.
    """
    if role not in ("input", "output"):
        raise ValueError(f"role must be 'input' or 'output', got {role!r}")
    names = list(names)
    layers = dict(model.named_sublayers())
    missing = [name for name in names if name not in layers]
    if missing:
        raise ValueError(f"model has no layer {missing[0]!r}")
    states = {name: HistogramState() for name in names}

    def hook_for(name: str):
        def hook(layer: paddle.nn.Layer, inputs: Any, outputs: Any) -> None:
            tensor = inputs[0] if role == "input" else outputs
            if isinstance(tensor, paddle.Tensor) and paddle.is_floating_point(tensor):
                # The same merge as calibration: the range grows on a fixed sub-bin grid.
                states[name].merge_sample(TensorSample.from_tensor(tensor), bins, 64, False)
        return hook

    handles = [layers[name].register_forward_post_hook(hook_for(name)) for name in names]
    try:
        with eval_mode(model):
            run_batches(model, data, max_batches)
    finally:
        for handle in handles:
            handle.remove()
    thresholds = thresholds or {}
    return {
        name: ActivationHistogram(
            name, role,
            None if state.counts is None else np.asarray(state.counts, np.float64),
            state.upper, thresholds.get(name),
        )
        for name, state in states.items()
    }


# ----------------------------------------------------------------------------- plotting
def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "plots need matplotlib: pip install imperative_ptq[report] "
            "(or save(..., plots=False) for the table only)"
        ) from None
    matplotlib.use("Agg", force=True)  # no display needed; never opens a window
    import matplotlib.pyplot as plt

    return plt


def plot_sqnr(report: "SensitivityReport", path: str | os.PathLike) -> None:
    """Horizontal bar chart of each layer's SQNR (layer output and model output), in rank
    order, most sensitive at the top."""
    plt = _pyplot()
    rows = report.rows
    names = [row.name for row in rows]
    # inf (bit-exact) would break the axis; draw it at the largest finite value.
    layer = np.array([row.sqnr_db for row in rows], dtype=np.float64)
    output = np.array([row.output_sqnr_db for row in rows], dtype=np.float64)
    finite = np.concatenate([layer, output])
    finite = finite[np.isfinite(finite)]
    cap = float(finite.max()) if finite.size else 1.0
    layer, output = np.minimum(layer, cap), np.minimum(output, cap)
    positions = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.45 * len(rows)))
    try:
        height = 0.4
        ax.barh(positions - height / 2, layer, height, label="layer output", color="#4C72B0")
        ax.barh(positions + height / 2, output, height, label="model output", color="#DD8452")
        ax.set_yticks(positions, names)
        ax.invert_yaxis()
        ax.set_xlabel("SQNR (dB), only this layer quantized — lower is more sensitive")
        ax.set_title("Per-layer quantization sensitivity")
        ax.grid(axis="x", alpha=0.3)
        # Outside the axes, so it never hides a bar.
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def plot_histogram(histogram: ActivationHistogram, path: str | os.PathLike) -> bool:
    """Plots one histogram (log counts) with its threshold; returns ``False`` if there is no
    histogram to plot (abs-max statistics only)."""
    if histogram.counts is None or not histogram.counts.any():
        return False
    plt = _pyplot()
    edges = histogram.edges
    fig, ax = plt.subplots(figsize=(7, 3.2))
    try:
        ax.stairs(histogram.counts, edges, fill=True, color="#4C72B0", alpha=0.8)
        ax.set_yscale("log")
        ax.set_xlabel(f"|{histogram.role}|")
        ax.set_ylabel("count")
        title = f"{histogram.name} ({histogram.role})"
        if histogram.threshold is not None:
            ax.axvline(histogram.threshold, color="#C44E52", linestyle="--",
                       label=f"threshold {histogram.threshold:.4g}")
            clipped = histogram.clipped_fraction
            if clipped is not None:
                title += f" — {clipped:.3%} clipped"
            ax.legend(loc="upper right")
        ax.set_title(title)
        ax.set_xlim(0.0, max(histogram.upper, histogram.threshold or 0.0) * 1.02)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return True


# ------------------------------------------------------------------------------ writing
def _file_name(name: str) -> str:
    return "hist_" + re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".png"


def write_report(
    report: "SensitivityReport",
    directory: str | os.PathLike,
    model: paddle.nn.Layer | None = None,
    data: Iterable[Any] | None = None,
    histograms: Mapping[str, ActivationHistogram] | None = None,
    fmt: str = "md",
    plots: bool = True,
    max_batches: int | None = None,
) -> str:
    """Implements :meth:`SensitivityReport.save`; returns the report's path."""
    if fmt not in ("md", "html"):
        raise ValueError(f"fmt must be 'md' or 'html', got {fmt!r}")
    if plots:
        _pyplot()  # fail before writing anything
    os.makedirs(directory, exist_ok=True)
    if histograms is None and model is not None:
        if hooked_states(model):
            histograms = calibration_histograms(model)
        elif data is not None:
            # Observed rows (functional concats and multiplies) are sites the fp32 model lacks.
            rows = [row for row in report.rows if row.int8]
            thresholds = {row.name: row.input_threshold for row in rows}
            histograms = collect_histograms(
                model, data, [row.name for row in rows], thresholds, max_batches=max_batches
            )
        else:
            raise ValueError("to plot histograms of an fp32 model, pass data too")
    images: list[tuple[str, str]] = []  # (title, file)
    if plots:
        plot_sqnr(report, os.path.join(directory, "sqnr.png"))
        images.append(("Per-layer SQNR", "sqnr.png"))
        for name in report.names:
            histogram = (histograms or {}).get(name)
            if histogram is None:
                continue
            file = _file_name(name)
            if plot_histogram(histogram, os.path.join(directory, file)):
                images.append((f"{name} {histogram.role} histogram", file))
            else:
                logger.info("no histogram for %s (abs-max statistics only)", name)
    path = os.path.join(directory, f"report.{fmt}")
    text = _markdown(report, images) if fmt == "md" else _html(report, images)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    logger.info("wrote %s with %d plots", path, len(images))
    return path


def _markdown(report: "SensitivityReport", images: list[tuple[str, str]]) -> str:
    parts = [
        "# Quantization sensitivity report\n",
        f"Each layer quantized alone; {report.num_batches} batches. Most sensitive first.\n",
        report.to_markdown(),
    ]
    parts += [f"\n## {title}\n\n![{title}]({file})\n" for title, file in images]
    return "\n".join(parts)


def _html(report: "SensitivityReport", images: list[tuple[str, str]]) -> str:
    table = report.to_markdown().strip().splitlines()
    lines = [line for line in table if line.startswith("|")]
    summary = [html.escape(line) for line in table if not line.startswith("|") and line]
    header, body = lines[0], lines[2:]

    def cells(line: str) -> list[str]:
        return [html.escape(cell.strip().strip("`")) for cell in line.strip("|").split("|")]

    rows = "".join(
        "<tr>" + "".join(f"<td>{c}</td>" for c in cells(line)) + "</tr>\n" for line in body
    )
    head = "<tr>" + "".join(f"<th>{c}</th>" for c in cells(header)) + "</tr>\n"
    figures = "".join(
        f'<h2>{html.escape(title)}</h2>\n<img src="{html.escape(file)}" alt="{html.escape(title)}">\n'
        for title, file in images
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Quantization sensitivity"
        "</title>\n<style>table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:2px 6px;text-align:right}</style></head><body>\n"
        "<h1>Quantization sensitivity report</h1>\n"
        f"<p>Each layer quantized alone; {report.num_batches} batches. Most sensitive first.</p>\n"
        + "".join(f"<p>{line}</p>\n" for line in summary)
        + f"<table>\n{head}{rows}</table>\n{figures}</body></html>\n"
    )
