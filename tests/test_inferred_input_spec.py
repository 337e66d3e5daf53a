"""An export given no ``input_spec`` takes it from the calibration batches: one spec per
positional tensor input, named after its ``forward`` parameter, with the batch dimension and
every size that changed between batches dynamic."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.export import create_predictor, export_onnx, predict
from imperative_ptq.export.tracing import inferred_input_spec

nn = paddle.nn


class _TokensAndFeatures(nn.Layer):
    """Token ids of any length and a feature vector, classified together."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(50, 16)
        self.tokens_fc, self.features_fc = nn.Linear(16, 16), nn.Linear(8, 16)
        self.head = nn.Linear(32, 3)

    def forward(self, tokens: paddle.Tensor, features: paddle.Tensor) -> paddle.Tensor:
        pooled = nn.functional.relu(self.tokens_fc(self.embedding(tokens))).mean(axis=1)
        return self.head(paddle.concat([pooled, nn.functional.relu(self.features_fc(features))], axis=1))


def _batches(rng: np.random.Generator) -> list[tuple[paddle.Tensor, paddle.Tensor]]:
    return [
        (paddle.to_tensor(rng.integers(0, 50, (batch, length))), paddle.to_tensor(rng.random((batch, 8), np.float32)))
        for batch, length in ((4, 7), (6, 7), (4, 11))
    ]


def _converted() -> tuple[ip.ImperativePTQ, nn.Layer]:
    paddle.seed(0)
    model = _TokensAndFeatures()
    model.eval()
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, _batches(np.random.default_rng(0)), progress=False)
    ptq.convert(qmodel)
    return ptq, qmodel


def test_an_export_without_input_spec_takes_it_from_the_calibration_batches(tmp_path) -> None:
    ptq, qmodel = _converted()
    specs = inferred_input_spec(qmodel)
    assert [(spec.name, list(spec.shape), spec.dtype) for spec in specs] == [
        ("tokens", [-1, -1], paddle.int64), ("features", [-1, 8], paddle.float32),
    ]
    prefix = str(tmp_path / "m")
    ptq.save_quantized_model(qmodel, prefix)
    predictor = create_predictor(prefix, num_threads=1)
    assert predictor.get_input_names() == ["tokens", "features"]
    rng = np.random.default_rng(1)
    tokens, features = rng.integers(0, 50, (5, 13)), rng.random((5, 8), np.float32)  # a new length
    simulated = qmodel(paddle.to_tensor(tokens), paddle.to_tensor(features)).numpy()
    ran = predict(predictor, tokens, features)[0]
    assert np.abs(ran - simulated).max() < 1e-5 * np.abs(simulated).max()  # measured 1.8e-7


def test_onnx_export_infers_it_too(tmp_path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    _, qmodel = _converted()
    path = export_onnx(qmodel, tmp_path / "m.onnx")
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["tokens", "features"]
    rng = np.random.default_rng(2)
    tokens, features = rng.integers(0, 50, (3, 9)), rng.random((3, 8), np.float32)
    ran = session.run(None, {"tokens": tokens, "features": features})[0]
    simulated = qmodel(paddle.to_tensor(tokens), paddle.to_tensor(features)).numpy()
    assert np.abs(ran - simulated).max() < 1e-5 * np.abs(simulated).max()


def test_without_calibration_here_an_input_spec_is_required(tmp_path) -> None:
    """A model that loaded a calibration table saw no batch; one whose input changed its rank
    between batches has no single spec."""
    ptq, calibrated = _converted()
    ptq.save_calibration_table(calibrated, tmp_path / "table.json")
    paddle.seed(0)
    loading = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer()))
    loaded = loading.quantize(_TokensAndFeatures())
    loading.load_calibration_table(loaded, tmp_path / "table.json")
    loading.convert(loaded)
    with pytest.raises(TypeError, match="input_spec is required"):
        loading.save_quantized_model(loaded, str(tmp_path / "loaded"))
    mixed = ip.ImperativePTQ()
    model = mixed.quantize(nn.Sequential(nn.Linear(8, 4)))
    model(paddle.rand([2, 8]))
    model(paddle.rand([2, 1, 8]))
    mixed.convert(model)
    assert inferred_input_spec(model) is None
