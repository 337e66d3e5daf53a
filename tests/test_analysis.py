"""Per-layer sensitivity analysis, fp32 fallback of layers, skip-set search and the report."""

from __future__ import annotations

import copy
import math
import sys

import numpy as np
import paddle
import pytest
from paddle import nn

from imperative_ptq import (
    HistQuantizer,
    ImperativePTQ,
    PerChannelAbsmaxQuantizer,
    PTQConfig,
    QuantizedLayer,
)
from imperative_ptq.analysis import (
    LayerSensitivity,
    SensitivityReport,
    analyze,
    keep_fp32,
    quantized_layer_names,
    search_skip_set,
)
from imperative_ptq.report import calibration_histograms, collect_histograms
from models import Branch, converted

NAMES = ["conv", "fc1", "fc2"]


class TinyNet(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2D(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(4 * 6 * 6, 16)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.flatten(self.relu(self.conv(x)))
        return self.fc2(self.relu1(self.fc1(x)))


def _data(seed: int = 0, batches: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((4, 1, 6, 6)).astype(np.float32) for _ in range(batches)]


def _build(bits: int = 8):
    paddle.seed(7)
    model = TinyNet()
    model.eval()
    # x86-vnni: the conv reads a signed input, which the default x86 target keeps fp32.
    config = PTQConfig(
        HistQuantizer(bits, bins=128), PerChannelAbsmaxQuantizer(bits), target="x86-vnni"
    )
    ptq = ImperativePTQ(config, asynchronous=False)
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, _data(1), progress=False)
    return model, ptq, qmodel


@pytest.fixture()
def models():
    model, ptq, qmodel = _build()
    return model, ptq.convert(qmodel)


def _run(model: nn.Layer, x: np.ndarray) -> np.ndarray:
    with paddle.no_grad():
        return model(paddle.to_tensor(x)).numpy()


def _reference_sqnr(model, qmodel, name, data):
    """Slow, obviously right: a deep copy with the layer replaced, outputs concatenated."""
    swapped = copy.deepcopy(model)
    setattr(swapped, name, copy.deepcopy(getattr(qmodel, name)))
    captured = {"fp32": [], "q": []}
    hooks = [
        getattr(model, name).register_forward_post_hook(
            lambda layer, i, o: captured["fp32"].append(o.numpy().astype(np.float64))),
        getattr(swapped, name).register_forward_post_hook(
            lambda layer, i, o: captured["q"].append(o.numpy().astype(np.float64))),
    ]
    outputs = [(_run(model, x), _run(swapped, x)) for x in data]
    for hook in hooks:
        hook.remove()

    def sqnr_cos(a, b):
        a, b = np.concatenate([x.ravel() for x in a]), np.concatenate([x.ravel() for x in b])
        return (10 * np.log10(np.sum(a**2) / np.sum((a - b) ** 2)),
                np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))

    layer = sqnr_cos(captured["fp32"], captured["q"])
    model_out = sqnr_cos([o[0].astype(np.float64) for o in outputs],
                         [o[1].astype(np.float64) for o in outputs])
    return layer, model_out


def test_analyze_finite_ranked_and_matches_reference(models) -> None:
    model, qmodel = models
    data = _data(2)
    before = _run(model, data[0])
    report = analyze(model, qmodel, data)
    assert sorted(report.names) == sorted(NAMES) == sorted(quantized_layer_names(qmodel))
    assert report.num_batches == 3
    for row in report.rows:
        assert math.isfinite(row.sqnr_db) and math.isfinite(row.output_sqnr_db)
        assert 0.99 < row.cosine <= 1.0 + 1e-9 and 0.99 < row.output_cosine <= 1.0 + 1e-9
        assert row.metric is None and row.input_threshold > 0
        (sqnr, cos), (out_sqnr, out_cos) = _reference_sqnr(model, qmodel, row.name, data)
        np.testing.assert_allclose(
            [row.sqnr_db, row.cosine, row.output_sqnr_db, row.output_cosine],
            [sqnr, cos, out_sqnr, out_cos], rtol=1e-6,
        )
    output_sqnr = [row.output_sqnr_db for row in report.rows]
    assert output_sqnr == sorted(output_sqnr)
    # The fp32 model is left exactly as it was.
    assert not any(isinstance(layer, QuantizedLayer) for layer in model.sublayers())
    np.testing.assert_array_equal(_run(model, data[0]), before)


def test_analyze_takes_dict_batches(models) -> None:
    model, qmodel = models
    data = _data(2)
    rows = analyze(model, qmodel, data).rows
    keyword_rows = analyze(model, qmodel, [{"x": x, "label": np.zeros(4)} for x in data]).rows
    assert [(r.name, r.sqnr_db) for r in keyword_rows] == [(r.name, r.sqnr_db) for r in rows]


def test_analyze_with_metric_and_helpers(models) -> None:
    model, qmodel = models
    x = _data(3, 1)[0]
    reference = _run(model, x)

    def metric(m: nn.Layer) -> float:  # higher is better; 0 for the fp32 model
        return -float(np.mean((_run(m, x) - reference) ** 2))

    report = ImperativePTQ().analyze(model, qmodel, ((d, np.zeros(4, np.int64)) for d in _data()),
                                     metric=metric)
    assert report.fp32_metric == 0.0 and report.quantized_metric < 0
    drops = [row.metric_drop for row in report.rows]
    assert drops == sorted(drops, reverse=True) and all(d >= 0 for d in drops)
    assert report.most_sensitive(1) == report.rows[:1]
    assert report.below_sqnr(1000.0) == report.rows and report.below_sqnr(-1000.0) == []
    assert report.row("fc1").name == "fc1"
    markdown = report.to_markdown()
    assert markdown.count("\n| ") == 1 + len(NAMES) and "drop" in markdown
    assert str(report) == markdown  # print(report) shows the table, not the dataclass fields


def test_analyze_restores_fp32_model_on_error(models) -> None:
    model, qmodel = models

    def failing(m: nn.Layer) -> float:
        if any(isinstance(layer, QuantizedLayer) for layer in m.sublayers()) and m is model:
            raise RuntimeError("boom")
        return 0.0

    with pytest.raises(RuntimeError, match="boom"):
        analyze(model, qmodel, _data(), metric=failing)
    assert [type(getattr(model, n)) for n in NAMES] == [nn.Conv2D, nn.Linear, nn.Linear]


def test_analyze_rejects_bad_inputs(models) -> None:
    model, qmodel = models
    with pytest.raises(ValueError, match="same object"):
        analyze(qmodel, qmodel, _data())
    with pytest.raises(ValueError, match="no QuantizedLayer"):
        analyze(model, copy.deepcopy(model), _data())
    with pytest.raises(ValueError, match="no batch"):
        analyze(model, qmodel, [])
    other = copy.deepcopy(model)
    with paddle.no_grad():
        other.fc1.bias.set_value(other.fc1.bias + 1.0)
    with pytest.raises(ValueError, match="fuse"):
        analyze(other, qmodel, _data())


def test_keep_fp32_restores_fp32_outputs_exactly(models) -> None:
    model, qmodel = models
    x = paddle.to_tensor(_data(4, 1)[0])
    keep_fp32(qmodel, ["conv"], model)
    assert type(qmodel.conv) is nn.Conv2D and qmodel.conv is not model.conv
    with paddle.no_grad():
        np.testing.assert_array_equal(qmodel.conv(x).numpy(), model.conv(x).numpy())
    assert isinstance(qmodel.fc1, QuantizedLayer)
    ImperativePTQ().keep_fp32(qmodel, ["fc1", "fc2"], model)
    np.testing.assert_array_equal(_run(qmodel, x.numpy()), _run(model, x.numpy()))
    with pytest.raises(ValueError, match="not a QuantizedLayer"):
        keep_fp32(qmodel, ["conv"], model)
    with pytest.raises(ValueError, match="no layer"):
        keep_fp32(qmodel, ["nope"], model)


def test_keep_fp32_names_arguments_given_in_another_order(models) -> None:
    """Before, ``keep_fp32(model, qmodel, ["fc1"])`` failed inside with "'Net' object is not
    iterable"; nothing is changed by a refused call."""
    model, qmodel = models
    for arguments in ((model, qmodel, ["fc1"]), (qmodel, model, ["fc1"])):
        with pytest.raises(TypeError, match="names must be a layer name"):
            keep_fp32(*arguments)
    with pytest.raises(TypeError, match="model must be a paddle.nn.Layer, got NoneType"):
        keep_fp32(qmodel, ["fc1"], None)
    with pytest.raises(TypeError, match="names must be strings"):
        keep_fp32(qmodel, ["fc1", 2], model)
    assert isinstance(qmodel.fc1, QuantizedLayer)


def _penalty_metric(weights: dict[str, float]):
    """Synthetic metric: minus the summed weight of the layers still quantized."""
    def evaluate(m: nn.Layer) -> float:
        return -sum(weights[n] for n, layer in m.named_sublayers()
                    if isinstance(layer, QuantizedLayer))
    return evaluate


def _report(order: list[str]) -> SensitivityReport:
    return SensitivityReport([LayerSensitivity(n, "X", 30.0, 1.0, 30.0, 1.0) for n in order])


def test_search_skip_set_greedy_then_pruned(models) -> None:
    model, qmodel = models
    evaluate = _penalty_metric({"conv": 5.0, "fc1": 1.0, "fc2": 0.1})
    # Greedy in report order fc2, conv, fc1 reaches the budget with {fc2, conv} (penalty 1.0);
    # pruning finds fc2 unnecessary (penalty 1.1 is still within 1.15).
    result = search_skip_set(model, qmodel, evaluate, 1.15, _report(["fc2", "conv", "fc1"]))
    assert result.skip == ["conv"] and result.within_budget
    assert result.metric == pytest.approx(-1.1) and result.fp32_metric == 0.0
    assert evaluate(result.model) == pytest.approx(-1.1)
    assert len(quantized_layer_names(qmodel)) == 3  # the input model is untouched

    greedy = search_skip_set(model, qmodel, evaluate, 1.15, _report(["fc2", "conv", "fc1"]),
                             prune=False)
    assert greedy.skip == ["fc2", "conv"] and greedy.metric == pytest.approx(-1.0)
    assert search_skip_set(model, qmodel, evaluate, 10.0, _report(NAMES)).skip == []

    unreachable = search_skip_set(model, qmodel, lambda m: -1.0 if m is not model else 0.0, 0.5,
                                  _report(NAMES))
    assert not unreachable.within_budget and unreachable.skip == NAMES
    with pytest.raises(ValueError, match="budget"):
        search_skip_set(model, qmodel, evaluate, -1.0, _report(NAMES))
    with pytest.raises(ValueError, match="SensitivityReport or data"):
        search_skip_set(model, qmodel, evaluate, 1.0)


def test_histograms_from_calibration_and_from_data() -> None:
    model, ptq, qmodel = _build()
    data = _data(1)
    histograms = calibration_histograms(qmodel)
    table = ptq.calibration_table(qmodel)
    assert sorted(histograms) == sorted(NAMES)
    for name, hist in histograms.items():
        assert hist.threshold == pytest.approx(table[name]["input"][0])
        assert hist.counts.shape == (128,) and hist.edges.shape == (129,)
    # Every element of the conv input falls in the histogram.
    assert histograms["conv"].counts.sum() == sum(d.size for d in data)

    collected = collect_histograms(model, data[:1], ["conv"], {"conv": 1.0}, bins=64)
    x = np.abs(data[0]).ravel()
    expected, _ = np.histogram(x, bins=64, range=(0.0, float(x.max())))
    # paddle bins by trunc(x * bins / upper): an element on an edge may land one bin over.
    assert collected["conv"].counts.sum() == x.size
    assert np.abs(collected["conv"].counts - expected).sum() <= 2
    assert collected["conv"].upper == pytest.approx(x.max())
    assert collected["conv"].clipped_fraction == pytest.approx(np.mean(x > 1.0), abs=0.05)
    with pytest.raises(ValueError, match="no layer"):
        collect_histograms(model, data, ["nope"])


def test_report_save_writes_markdown_html_and_pngs(tmp_path, models) -> None:
    pytest.importorskip("matplotlib")
    model, qmodel = models
    report = analyze(model, qmodel, _data())
    path = report.save(tmp_path / "md", model=model, data=_data())
    text = open(path, encoding="utf-8").read()
    assert path.endswith("report.md") and "| rank |" in text and "![" in text
    pngs = sorted(p.name for p in (tmp_path / "md").glob("*.png"))
    assert pngs == sorted(["sqnr.png"] + [f"hist_{n}.png" for n in NAMES])
    for png in pngs:
        assert (tmp_path / "md" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png})" in text

    _, _, calibrating = _build()
    html_path = report.save(tmp_path / "html", model=calibrating, fmt="html")
    html = open(html_path, encoding="utf-8").read()
    assert "<table>" in html and html.count("<img") == 1 + len(NAMES)


def test_report_without_matplotlib(tmp_path, models, monkeypatch) -> None:
    model, qmodel = models
    report = analyze(model, qmodel, _data(), max_batches=1)
    assert report.num_batches == 1
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install imperative_ptq\[report\]"):
        report.save(tmp_path / "a")
    path = report.save(tmp_path / "b", plots=False)
    assert "| rank |" in open(path, encoding="utf-8").read()
    assert not list((tmp_path / "b").glob("*.png"))
    with pytest.raises(ValueError, match="fmt"):
        report.save(tmp_path / "c", fmt="pdf", plots=False)


def test_analyze_marks_layers_that_never_ran_as_unmeasured(caplog) -> None:
    paddle.seed(0)
    model = Branch()
    calibration = [paddle.randn([4, 8]) for _ in range(8)]
    qmodel = converted(model, calibration, target="x86-vnni")  # signed inputs quantized too
    ran = [x for x in calibration if float(model.a(x).mean()) > 0]
    skipped = [x for x in calibration if float(model.a(x).mean()) <= 0]
    if not ran or not skipped or "b" not in [n for n, _ in qmodel.named_sublayers()]:
        pytest.skip("the random batches did not take both branches")
    with caplog.at_level("WARNING", logger="imperative_ptq.analysis"):
        report = analyze(model, qmodel, skipped)
    row = report.row("b")
    # Was inf dB and cosine 1.0: an unmeasured layer looked bit-exact.
    assert math.isnan(row.sqnr_db) and math.isnan(row.cosine) and math.isnan(row.output_sqnr_db)
    assert report.names[-1] == "b"
    assert "never ran" in caplog.text and "b" in caplog.text
    assert "nan" in report.to_markdown()


class _TwoHeads(nn.Layer):
    """A body and two Linear heads, returned as a tuple or a dict."""

    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.body, self.head_a, self.head_b = nn.Linear(16, 32), nn.Linear(32, 4), nn.Linear(32, 4)
        self.as_dict = as_dict

    def forward(self, x: paddle.Tensor):
        hidden = nn.functional.relu(self.body(x))
        a, b = self.head_a(hidden), self.head_b(hidden)
        return {"a": a, "b": b} if self.as_dict else (a, b)


def _sqnr_and_cosine(reference: np.ndarray, quantized: np.ndarray) -> tuple[float, float]:
    reference, quantized = reference.astype(np.float64).ravel(), quantized.astype(np.float64).ravel()
    sqnr = 10 * math.log10((reference ** 2).sum() / ((reference - quantized) ** 2).sum())
    return sqnr, float(reference @ quantized / np.linalg.norm(reference) / np.linalg.norm(quantized))


@pytest.mark.parametrize("as_dict", [False, True], ids=["tuple", "dict"])
def test_analyze_measures_every_output_of_the_model(as_dict) -> None:
    """A layer that only the second head reads changes the second output alone: its row has
    that output's figures (before: the first output's, inf dB and cosine 1.0, ranked last)."""
    paddle.seed(0)
    model = _TwoHeads(as_dict)
    data = [np.random.default_rng(i).standard_normal((8, 16)).astype(np.float32) for i in range(3)]
    ptq = ImperativePTQ(PTQConfig(HistQuantizer(), PerChannelAbsmaxQuantizer(4)))
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, data, progress=False)
    ptq.convert(qmodel)
    row = analyze(model, qmodel, data).row("head_b")
    reference, quantized = [], []
    with paddle.no_grad():
        for batch in data:
            x = paddle.to_tensor(batch)
            outputs = model(x)
            reference.append((outputs["b"] if as_dict else outputs[1]).numpy())
            swapped = copy.deepcopy(model)
            swapped.head_b = qmodel.head_b
            outputs = swapped(x)
            quantized.append((outputs["b"] if as_dict else outputs[1]).numpy())
    sqnr, cosine = _sqnr_and_cosine(np.concatenate(reference), np.concatenate(quantized))
    assert math.isfinite(row.output_sqnr_db) and row.output_cosine < 1.0
    np.testing.assert_allclose([row.output_sqnr_db, row.output_cosine], [sqnr, cosine], rtol=1e-6)
