"""A calibration table records the structure calibration observed (each layer's input sources
and rank, residual adds fused into an int8 conv, s8 and wide u8 inputs), so a model that loads
it converts to the calibrated model's simulation and exports the same int8 program; tables
without it load as before."""

from __future__ import annotations

import json
import re

import numpy as np
import paddle
import pytest

from imperative_ptq import ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig
from imperative_ptq.calibration_structure import structure_of
from imperative_ptq.export import create_predictor, int8_report, predict
from imperative_ptq.quant_layers import QuantizedLayer
from imperative_ptq.session import hooked_states
from models import without_structure
from ties import simulation_up_to_ties

nn = paddle.nn
SIZE = 32
WIDTH, LENGTH = 8, 4


def _ptq() -> ImperativePTQ:
    return ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer()))


def _resnet() -> nn.Layer:
    paddle.seed(0)
    model = paddle.vision.models.resnet18(num_classes=10)
    model.eval()
    return model


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """The fp32 ResNet-18, a calibrated and converted copy, its table file and test images."""
    model = _resnet()
    rng = np.random.default_rng(0)
    ptq = _ptq()
    calibrated = ptq.quantize(model)
    for _ in range(2):
        calibrated(paddle.to_tensor(rng.random((2, 3, SIZE, SIZE), np.float32)))
    path = tmp_path_factory.mktemp("table") / "resnet.json"
    ptq.save_calibration_table(calibrated, path)
    ptq.convert(calibrated)
    return model, ptq, calibrated, path, rng.random((4, 3, SIZE, SIZE), np.float32)


def _table_loaded(model: nn.Layer, path) -> tuple[ImperativePTQ, nn.Layer]:
    ptq = _ptq()
    loaded = ptq.quantize(model)
    ptq.load_calibration_table(loaded, path)
    ptq.convert(loaded)
    return ptq, loaded


@pytest.mark.slow
def test_a_table_loaded_resnet_simulates_and_exports_as_the_calibrated_one(resnet, tmp_path) -> None:
    """Measured without the structure (a table of the old format): simulation cosine 0.99504
    (max abs 1.59) to the calibrated model's, and Paddle Inference 0.99694 to its own
    simulation, layer4.1.conv2 run fp32."""
    model, ptq, calibrated, path, x = resnet
    structure = json.loads(path.read_text())["structure"]
    kinds = {key for entry in structure.values() for key in entry}
    adds = [add for entry in structure.values() for add in entry.get("residual_adds", [])]
    tops = {add["residual_top"] for add in adds}
    # ResNet-18 has all of them: u8 (255) and s8-stored (127) identity shortcuts, downsample
    # shortcuts, inputs written s8 or as wide u8 codes, a head pool read by the fc, the fc
    # whose output the model returns; and each block's one ReLU, called on its first
    # BatchNorm's output and then on the sum, with the call that read the sum (and, in the
    # downsample blocks, that the sum's residual was s8).
    assert kinds == {
        "input_sources", "input_rank", "residual_adds", "signed_input", "wide_input", "model_output",
        "calls_per_forward", "sum_calls", "signed_sum_calls",
    }
    per_call = {name: (entry["calls_per_forward"], tuple(entry["sum_calls"])) for name, entry in structure.items()
                if "sum_calls" in entry}
    assert sorted(per_call) == [f"layer{stage}.{block}.relu" for stage in range(1, 5) for block in range(2)]
    assert set(per_call.values()) == {(2, (1,))}
    signed_sums = {name: entry["signed_sum_calls"] for name, entry in structure.items() if "signed_sum_calls" in entry}
    assert signed_sums == {f"layer{stage}.0.relu": [1] for stage in range(2, 5)}
    assert [name for name, entry in structure.items() if entry.get("model_output")] == ["fc"]
    assert tops == {127, 255}

    loading, loaded = _table_loaded(model, path)
    simulated = calibrated(paddle.to_tensor(x)).numpy()
    np.testing.assert_array_equal(loaded(paddle.to_tensor(x)).numpy(), simulated)
    # analyze works from the converted model: the same per-layer report (without the
    # structure, measured on two other batches: 19 of the 21 rows differed).
    data = [x[:2], x[2:]]
    assert loading.analyze(model, loaded, data).rows == ptq.analyze(model, calibrated, data).rows

    spec = [paddle.static.InputSpec([None, 3, SIZE, SIZE], "float32", "x")]
    ran = {}
    for name, exporter, converted in (("calibrated", ptq, calibrated), ("loaded", loading, loaded)):
        prefix = str(tmp_path / name)
        exporter.save_quantized_model(converted, prefix, spec)
        report = int8_report(prefix)
        assert not report.fp32, (name, report)
        ran[name] = predict(create_predictor(prefix, num_threads=1), x)[0]
    np.testing.assert_array_equal(ran["loaded"], ran["calibrated"])
    # Measured cosine 1 - 4e-14, max abs 5.2e-6 of logits up to 13.4, for both (up to rounding
    # ties: two codes of layer1.0.conv2's input on an AVX2 EPYC).
    tied, _ = simulation_up_to_ties(lambda: calibrated(paddle.to_tensor(x)).numpy(), ran["calibrated"], 1e-5)
    assert _cosine(ran["calibrated"], tied) >= 0.9999
    assert np.abs(ran["calibrated"] - tied).max() <= 1e-5 * np.abs(tied).max()

    # The export's table records the same structure, and reproduces the simulation too.
    exported = tmp_path / "calibrated.calibration.json"
    assert json.loads(exported.read_text())["structure"] == structure
    _, reloaded = _table_loaded(model, exported)
    np.testing.assert_array_equal(reloaded(paddle.to_tensor(x)).numpy(), simulated)


class _FunctionalNet(nn.Layer):
    """A Linear and ReLU, then functional matmuls: two of activations and one of a parameter
    (a site found at the first calibration batch), on inputs of any rank."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)
        self.relu = nn.ReLU()
        self.weight = self.create_parameter([WIDTH, 3])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = self.relu(self.fc(x))
        scores = paddle.matmul(h, h, transpose_y=True)
        return paddle.matmul(paddle.matmul(scores, h), self.weight)


def _functional_net() -> nn.Layer:
    paddle.seed(1)
    model = _FunctionalNet()
    model.eval()
    return model


def _batch(rank: int, seed: int) -> paddle.Tensor:
    shape = (2, 2, LENGTH, WIDTH)[-rank:]
    return paddle.to_tensor(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _observed(model: nn.Layer) -> dict:
    return structure_of(hooked_states(model))


def test_a_functional_site_gets_its_calibrated_input_rank_from_the_table(tmp_path) -> None:
    """Calibrated on rank-4 inputs, the Linear and the matmul site run as 1x1 convs (Paddle
    Inference runs no int8 fc on a rank > 3 input); a fresh model whose site-finding batch was
    rank 3 must take the table's rank, not its own."""
    ptq = _ptq()
    calibrated = ptq.quantize(_functional_net())
    ptq.calibrate(calibrated, [_batch(4, seed) for seed in range(3)], progress=False)
    path = tmp_path / "table.json"
    ptq.save_calibration_table(calibrated, path)
    recorded = _observed(calibrated)
    assert recorded["weight_matmul"]["input_rank"] == 4
    assert recorded["relu"]["input_sources"] == ["fc"]
    ptq.convert(calibrated)
    assert calibrated.fc.runs_as_conv

    def fresh_with_a_rank_3_batch() -> tuple[ImperativePTQ, nn.Layer]:
        fresh = _ptq()
        model = fresh.quantize(_functional_net())
        with fresh.calibrating(model):
            model(_batch(3, seed=9))  # finds the sites
        assert _observed(model)["weight_matmul"]["input_rank"] == 3
        return fresh, model

    fresh, model = fresh_with_a_rank_3_batch()
    fresh.load_calibration_table(model, path)
    assert _observed(model) == recorded
    fresh.convert(model)
    x = _batch(4, seed=5)
    np.testing.assert_array_equal(model(x).numpy(), calibrated(x).numpy())

    # A table written before the structure was recorded: the model keeps its own observations
    # (rank 3 here, so its Linear is simulated as a fc, unlike the calibrated model's).
    old = without_structure(path, tmp_path / "old.json")
    fresh, model = fresh_with_a_rank_3_batch()
    observed = _observed(model)
    fresh.load_calibration_table(model, old)
    assert _observed(model) == observed
    assert fresh.calibration_table(model) == _thresholds_after_loading(path, _functional_net())
    fresh.convert(model)
    assert isinstance(model.fc, QuantizedLayer) and not model.fc.runs_as_conv


def _thresholds_after_loading(path, model: nn.Layer) -> dict:
    """The thresholds a model found after one batch holds once ``path`` is loaded."""
    ptq = _ptq()
    quantized = ptq.quantize(model)
    with ptq.calibrating(quantized):
        quantized(_batch(3, seed=9))
    ptq.load_calibration_table(quantized, path)
    return ptq.calibration_table(quantized)


def test_an_old_table_loads_into_a_fresh_model_without_observations(resnet, tmp_path) -> None:
    model, _, _, path, x = resnet
    old = without_structure(path, tmp_path / "old.json")
    document = json.loads(old.read_text())
    ptq = _ptq()
    loaded = ptq.quantize(model)
    ptq.load_calibration_table(loaded, old)
    assert _observed(loaded) == {}
    assert ptq.calibration_table(loaded) == {
        name: entry for name, entry in document["layers"].items() if entry
    }
    ptq.convert(loaded)
    assert np.isfinite(loaded(paddle.to_tensor(x)).numpy()).all()


def _set(document: dict, keys: tuple, value) -> None:
    for key in keys[:-1]:
        document = document[key]
    document[keys[-1]] = value


MALFORMED = {
    "unknown-layer": (("structure", "layer9.relu"), {"input_rank": 4}, "layer9.relu"),
    "not-an-object": (("structure", "layer1.0.conv1"), [4], "layer1.0.conv1"),
    "unknown-key": (("structure", "layer1.0.conv1", "rank"), 4, "layer1.0.conv1"),
    "unknown-source": (("structure", "fc", "input_sources"), ["pool"], "'fc'.*'pool'"),
    "source-not-a-list": (("structure", "fc", "input_sources"), "avgpool", "'fc'"),
    "unknown-earlier-reader": (("structure", "fc", "earlier_readers"), ["pool"], "'fc'.*'pool'"),
    "rank-a-string": (("structure", "fc", "input_rank"), "2", "'fc'"),
    "rank-too-large": (("structure", "fc", "input_rank"), 12, "'fc'"),
    "flag-a-number": (("structure", "avgpool", "wide_input"), 1, "'avgpool'"),
    "model-output-a-string": (("structure", "fc", "model_output"), "yes", "'fc'.*model_output"),
    "add-missing-key": (
        ("structure", "maxpool", "residual_adds"), [{"fused": "layer1.0.bn2"}], "'maxpool'"
    ),
    "add-unknown-fused": (
        ("structure", "maxpool", "residual_adds"),
        [{"fused": "bn9", "residual_readers": [], "residual_top": 255}], "'maxpool'.*'bn9'",
    ),
    "add-top-too-large": (
        ("structure", "maxpool", "residual_adds"),
        [{"fused": "layer1.0.bn2", "residual_readers": [], "residual_top": 256}], "'maxpool'",
    ),
    "fingerprint-not-a-list": (("structure", "fc", "constant_call_inputs"), "x", "'fc'.*constant_call_inputs"),
    "fingerprint-shape-a-number": (("structure", "fc", "constant_call_inputs"), [[6, 1.5]], "'fc'"),
    "fingerprint-value-a-string": (("structure", "fc", "constant_call_inputs"), [[[6, 32], "1"]], "'fc'"),
    "calls-per-forward-one": (("structure", "fc", "calls_per_forward"), 1, "'fc'.*calls_per_forward"),
    "plain-calls-without-count": (("structure", "fc", "plain_input_calls"), [0], "'fc'.*calls_per_forward"),
    "sum-calls-without-count": (("structure", "fc", "sum_calls"), [1], "'fc'.*calls_per_forward"),
    "signed-sum-call-reading-no-sum": (
        ("structure", "layer2.0.relu", "signed_sum_calls"), [0], "'layer2.0.relu'.*signed_sum_calls"
    ),
    "source-calls-unknown-layer": (("structure", "fc", "input_source_calls"), [["pool", 1]], "'fc'.*'pool'"),
    "source-calls-not-pairs": (("structure", "fc", "input_source_calls"), [["avgpool"]], "'fc'.*input_source_calls"),
    "section-a-list": (("structure",), [], "'structure'"),
    "section-null": (("structure",), None, "'structure'"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_structure_is_a_value_error_naming_the_file_and_layer(resnet, tmp_path, case) -> None:
    model, _, _, path, _ = resnet
    keys, value, names = MALFORMED[case]
    document = json.loads(path.read_text())
    _set(document, keys, value)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(document))
    ptq = _ptq()
    loaded = ptq.quantize(model)
    with pytest.raises(ValueError, match=f"{re.escape(str(broken))}.*{names}"):
        ptq.load_calibration_table(loaded, broken)
    assert not any(state.input_quantizer and state.input_quantizer.is_calibrated
                   for state in hooked_states(loaded))


def test_a_failed_load_restores_the_second_input_thresholds_of_an_activation_matmul(tmp_path) -> None:
    """The activation matmuls are loaded before the weight site that fails: their second
    input's thresholds must be rolled back with the rest."""
    ptq = _ptq()
    source = ptq.quantize(_functional_net())
    ptq.calibrate(source, [_batch(3, seed) for seed in range(2)], progress=False)
    path = tmp_path / "table.json"
    ptq.save_calibration_table(source, path)
    document = json.loads(path.read_text())
    document["layers"]["weight_matmul"]["weight"] = [1.0, 1.0]  # 3 channels
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(document))

    fresh = _ptq()
    model = fresh.quantize(_functional_net())
    with fresh.calibrating(model):
        model(_batch(3, seed=7) * 5)
    before = fresh.calibration_table(model)
    loaded = document["layers"]["activation_matmul_0"]["second_input"]
    assert before["activation_matmul_0"]["second_input"] != loaded
    with pytest.raises(ValueError, match="weight_matmul"):
        fresh.load_calibration_table(model, broken)
    assert fresh.calibration_table(model) == before


def test_quantization_aware_fine_tuning_converts_with_the_calibrated_structure(resnet, tmp_path) -> None:
    """QAT's convert quantizes a fresh copy through a table: without the structure its
    simulation of an untrained ResNet was not PTQ's (no residual codes, no int8 head pool)."""
    from imperative_ptq import ImperativeQAT

    model, _, converted, path, x = resnet
    rng = np.random.default_rng(0)  # the fixture's calibration batches
    ptq = _ptq()
    calibrated = ptq.quantize(model)
    for _ in range(2):
        calibrated(paddle.to_tensor(rng.random((2, 3, SIZE, SIZE), np.float32)))
    qat = ImperativeQAT(ptq)
    trainable = qat.quantize(calibrated)
    qat.save_calibration_table(trainable, tmp_path / "qat.json")
    structure = json.loads(path.read_text())["structure"]
    assert json.loads((tmp_path / "qat.json").read_text())["structure"] == structure
    fine_tuned = qat.convert(trainable)  # no training step: PTQ's thresholds
    np.testing.assert_array_equal(
        fine_tuned(paddle.to_tensor(x)).numpy(), converted(paddle.to_tensor(x)).numpy()
    )


def test_a_dla_tree_converts_from_its_table_as_calibrated(tmp_path) -> None:
    """DLA's tree roots concatenate two block outputs into an int8 conv, whose threshold the
    simulation writes the sums on; the layers reading the concat (``site_sources``) are in
    the table, so a model loading it converts to the same simulation (measured without them:
    1.5% of the largest logit off the calibrated model, four trees)."""
    from models import DLANet

    paddle.seed(0)
    model = DLANet(4, 8, False)
    model.eval()
    rng = np.random.default_rng(0)
    ptq = _ptq()
    calibrated = ptq.quantize(model)
    for _ in range(4):
        calibrated(paddle.to_tensor(rng.random((4, 3, 32, 32), np.float32)))
    path = tmp_path / "dla.json"
    ptq.save_calibration_table(calibrated, path)
    assert any("site_sources" in entry for entry in json.loads(path.read_text())["structure"].values())
    ptq.convert(calibrated)
    _, loaded = _table_loaded(model, path)
    x = paddle.to_tensor(rng.random((8, 3, 32, 32), np.float32))
    with paddle.no_grad():
        np.testing.assert_array_equal(loaded(x).numpy(), calibrated(x).numpy())
