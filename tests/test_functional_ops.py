"""Functional concats and multiplies of activations are calibrated as observed sites (table,
load, ``analyze``) and stay fp32 in the simulation and the export; ``F.linear`` of an
activation weight is an activation matmul."""

from __future__ import annotations

import json

import numpy as np
import paddle
import pytest

import imperative_ptq as ip

nn = paddle.nn
F = paddle.nn.functional


class _Fire(nn.Layer):
    """SqueezeNet's fire module: two ReLU branches joined by ``paddle.concat``."""

    def __init__(self) -> None:
        super().__init__()
        self.squeeze, self.relu = nn.Conv2D(3, 4, 1), nn.ReLU()
        self.expand1, self.relu1 = nn.Conv2D(4, 8, 1), nn.ReLU()
        self.expand3, self.relu3 = nn.Conv2D(4, 8, 3, padding=1), nn.ReLU()
        self.head = nn.Conv2D(16, 4, 1)

    def branches(self, x: paddle.Tensor) -> list[paddle.Tensor]:
        s = self.relu(self.squeeze(x))
        return [self.relu1(self.expand1(s)), self.relu3(self.expand3(s))]

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(paddle.concat(self.branches(x), axis=1))


class _SqueezeExcite(nn.Layer):
    """A squeeze-excite gate ``y * sigmoid(...)`` and a GLU ``paddle.multiply(a, sigmoid(b))``;
    scalar and parameter multiplies, which are not sites."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu = nn.Conv2D(3, 8, 3, padding=1), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.fc1, self.fc2 = nn.Conv2D(8, 4, 1), nn.Conv2D(4, 8, 1)
        self.glu = nn.Conv2D(8, 16, 1)
        self.layer_scale = self.create_parameter([1, 8, 1, 1], default_initializer=nn.initializer.Constant(0.5))
        self.head = nn.Conv2D(8, 4, 1)

    def parts(self, x: paddle.Tensor) -> dict[str, paddle.Tensor]:
        y = self.relu(self.conv(x))
        gate = F.sigmoid(self.fc2(F.relu(self.fc1(self.pool(y)))))
        a, b = paddle.split(self.glu(y), 2, axis=1)
        return {"y": y, "gate": gate, "a": a, "b": F.sigmoid(b)}

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        p = self.parts(x)
        excited = p["y"] * p["gate"]
        glu = paddle.multiply(p["a"], p["b"])
        return self.head((excited + glu) * self.layer_scale * 2.0)


def _batches(count: int = 2, seed: int = 0) -> list[paddle.Tensor]:
    rng = np.random.default_rng(seed)
    return [paddle.to_tensor(rng.standard_normal((2, 3, 6, 6)).astype(np.float32)) for _ in range(count)]


def _calibrated(model: nn.Layer, target: str = "x86") -> tuple[ip.ImperativePTQ, nn.Layer]:
    paddle.seed(0)
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=target))
    qmodel = ptq.quantize(model.eval())
    for batch in _batches():
        qmodel(batch)
    return ptq, qmodel


def _abs_max(values: list[paddle.Tensor]) -> float:
    """Slow reference: the largest |value| over every batch."""
    return max(float(np.abs(v.numpy()).max()) for v in values)


def test_concat_and_multiplies_get_abs_max_thresholds_under_stable_names(tmp_path) -> None:
    paddle.seed(0)
    fire, excite = _Fire(), _SqueezeExcite()
    fire_ptq, qfire = _calibrated(fire)
    excite_ptq, qexcite = _calibrated(excite)
    fire_ptq.save_calibration_table(qfire, tmp_path / "fire.json")
    excite_ptq.save_calibration_table(qexcite, tmp_path / "excite.json")
    fire_layers = json.loads((tmp_path / "fire.json").read_text())["layers"]
    excite_layers = json.loads((tmp_path / "excite.json").read_text())["layers"]

    with paddle.no_grad():
        concats = [paddle.concat(fire.branches(b), axis=1) for b in _batches()]
        parts = [excite.parts(b) for b in _batches()]
    np.testing.assert_allclose(fire_layers["concat_0"]["output"], [_abs_max(concats)], rtol=1e-6)
    gate = excite_layers["multiply_0"]
    np.testing.assert_allclose(gate["input"], [_abs_max([p["y"] for p in parts])], rtol=1e-6)
    np.testing.assert_allclose(gate["second_input"], [_abs_max([p["gate"] for p in parts])], rtol=1e-6)
    np.testing.assert_allclose(gate["output"], [_abs_max([p["y"] * p["gate"] for p in parts])], rtol=1e-6)
    glu = excite_layers["multiply_1"]
    np.testing.assert_allclose(glu["second_input"], [_abs_max([p["b"] for p in parts])], rtol=1e-6)
    # Scalar and parameter multiplies are no sites.
    assert sorted(name for name in excite_layers if "multiply" in name) == ["multiply_0", "multiply_1"]


def test_sites_round_trip_through_the_table_and_old_tables_still_load(tmp_path) -> None:
    base = _SqueezeExcite().eval()
    ptq, qmodel = _calibrated(base)
    path = tmp_path / "table.json"
    ptq.save_calibration_table(qmodel, path)
    saved = json.loads(path.read_text())["layers"]

    # Loaded before any batch ran: the sites are rebuilt from their names.
    fresh = ptq.quantize(base)
    ptq.load_calibration_table(fresh, path)
    loaded = tmp_path / "loaded.json"
    ptq.save_calibration_table(fresh, loaded)
    assert json.loads(loaded.read_text())["layers"] == saved

    # A table written before the sites existed loads into a model that has them.
    document = json.loads(path.read_text())
    for section in ("layers", "measured_on", "input_minima", "structure"):
        for name in list(document.get(section) or {}):
            if "multiply" in name:
                del document[section][name]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(document))
    calibrated_first = ptq.quantize(base)
    calibrated_first(_batches(1)[0])
    ptq.load_calibration_table(calibrated_first, old)
    ptq.convert(calibrated_first)
    ptq.convert(fresh)
    x = _batches(1, seed=5)[0]
    np.testing.assert_array_equal(calibrated_first(x).numpy(), fresh(x).numpy())


def test_analyze_lists_sites_as_observed_fp32(tmp_path) -> None:
    model = _Fire()
    ptq, qmodel = _calibrated(model)
    table = ptq.calibration_table(qmodel)
    ptq.convert(qmodel)
    report = ip.analyze(model, qmodel, _batches(1))
    row = report.row("concat_0")
    assert not row.int8 and row.layer_type == "FunctionalConcat" and np.isnan(row.output_sqnr_db)
    assert row.output_threshold == pytest.approx(table["concat_0"]["output"][0])
    assert all(r.int8 for r in report.rows if r.name != "concat_0")
    assert report.rows[-1].name == "concat_0"
    assert "| observed |" in report.to_markdown()
    pytest.importorskip("matplotlib")
    written = report.save(tmp_path, model=model, data=_batches(1))  # plots skip the site
    assert "concat_0" in open(written, encoding="utf-8").read()


@pytest.mark.parametrize("model", [_Fire, _SqueezeExcite], ids=["concat", "multiply"])
def test_sites_agree_with_paddle_inference_and_onnx_runtime(model, tmp_path, avx2_runner) -> None:
    """The sites compute Paddle's op in float; Paddle Inference and ONNX Runtime compute what
    the simulation does. A multiply gets no scale (Paddle runs it fp32); this concat runs int8
    in Paddle Inference (a copy of its reader's codes, see the next test)."""
    from models import largest_error_in_paddle_inference

    from imperative_ptq.export import export_onnx, save_quantized_model
    from imperative_ptq.export.legacy_program import legacy_static_mode, load_legacy_program

    ptq, qmodel = _calibrated(model())
    assert [name for name, _ in qmodel.named_sublayers() if name.startswith(("concat", "multiply"))]
    ptq.convert(qmodel)
    x = _batches(1, seed=3)[0].numpy()
    prefix = str(tmp_path / "m")
    save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 3, 6, 6], "float32", "x")])
    with legacy_static_mode():
        ops = load_legacy_program(prefix).program.global_block().ops
        assert not [op for op in ops if op.type == "elementwise_mul" and op.has_attr("out_threshold")]
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=avx2_runner) <= 1e-5
    onnxruntime = pytest.importorskip("onnxruntime")
    path = export_onnx(qmodel, str(tmp_path / "m.onnx"), [paddle.static.InputSpec([None, 3, 6, 6], "float32", "x")])
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    ran = session.run(None, {session.get_inputs()[0].name: x})[0]
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    assert np.abs(ran - simulated).max() <= 1e-5 * np.abs(simulated).max()


def test_a_fire_module_concat_runs_int8_in_paddle_inference(tmp_path, avx2_runner) -> None:
    """Its inputs are fused conv ReLUs read only by the concat, its reader an int8 u8 conv:
    the export clips the convs at the reader's threshold (relu6 on scaled tensors), so they
    write the reader's codes 0..127 into an int8 concat, which the simulation computes by
    rounding the concat once at the reader."""
    from models import largest_error_in_paddle_inference

    from imperative_ptq.export import int8_report

    ptq, qmodel = _calibrated(_Fire())
    ptq.convert(qmodel)
    x = _batches(1, seed=3)[0].numpy()
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=avx2_runner) <= 1e-5
    assert int8_report(str(tmp_path / "m")).int8_other.get("concat") == 1


class _LinearOnActivation(nn.Layer):
    """``F.linear(x, w, b)`` whose weight ``w`` is computed from the input, and the same
    written with ``paddle.matmul``."""

    def __init__(self, functional_linear: bool) -> None:
        super().__init__()
        self.functional_linear = functional_linear
        self.query, self.key = nn.Linear(8, 8), nn.Linear(8, 48)
        self.bias = self.create_parameter([6], is_bias=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        q, w = self.query(x), self.key(x).mean(axis=0).reshape([8, 6])  # an activation
        if self.functional_linear:
            y = F.linear(q, w, self.bias)
        else:
            y = paddle.matmul(q, w) + self.bias
        return self.head(y)


def test_functional_linear_of_an_activation_weight_is_an_activation_matmul() -> None:
    """Reference: the same model written as ``paddle.matmul(q, w) + bias``, which was already
    routed; on x86-vnni both run it as an int8 QuantizedMatmul with the same result."""
    outputs, tables = [], []
    rng = np.random.default_rng(0)
    data = [paddle.to_tensor(rng.standard_normal((4, 8)).astype(np.float32)) for _ in range(2)]
    for functional_linear in (True, False):
        paddle.seed(0)
        model = _LinearOnActivation(functional_linear).eval()
        ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(), target="x86-vnni"))
        qmodel = ptq.quantize(model)
        for batch in data:
            qmodel(batch)
        tables.append(ptq.calibration_table(qmodel)["activation_matmul_0"])
        ptq.convert(qmodel)
        assert isinstance(qmodel.activation_matmul_0, ip.QuantizedMatmul)
        outputs.append(qmodel(data[0]).numpy())
    assert tables[0] == tables[1] and set(tables[0]) >= {"input", "second_input"}
    np.testing.assert_array_equal(outputs[0], outputs[1])
