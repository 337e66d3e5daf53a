"""Cross-layer equalization: the fp32 function is kept, ranges are equalized as the formula
says (checked against a per-channel loop), the user's model is untouched, bad chains fail."""

from __future__ import annotations

import copy
import logging

import numpy as np
import paddle
import pytest
from paddle import nn

from imperative_ptq import ImperativePTQ, PTQConfig, KLQuantizer, PerChannelAbsmaxQuantizer
from imperative_ptq.algorithms import equalize, find_chains
from imperative_ptq.models import VerySimpleNet


def _randomize_norms(model: nn.Layer, rng: np.random.Generator) -> nn.Layer:
    """BatchNorms with statistics far from identity, so folding and equalizing matter."""
    for layer in model.sublayers():
        if isinstance(layer, nn.BatchNorm2D):
            channels = layer._mean.shape[0]
            layer._mean.set_value(rng.normal(size=channels).astype("float32"))
            layer._variance.set_value((rng.random(channels) + 0.5).astype("float32"))
            layer.weight.set_value((rng.normal(size=channels) * 3).astype("float32"))
            layer.bias.set_value(rng.normal(size=channels).astype("float32"))
    return model.eval()


def _depthwise_net(rng: np.random.Generator) -> nn.Sequential:
    """conv -> depthwise -> pointwise -> grouped conv, each with BatchNorm and ReLU."""
    return _randomize_norms(
        nn.Sequential(
            nn.Conv2D(3, 8, 3, padding=1), nn.BatchNorm2D(8), nn.ReLU(),
            nn.Conv2D(8, 8, 3, padding=1, groups=8), nn.BatchNorm2D(8), nn.ReLU(),
            nn.Conv2D(8, 16, 1), nn.BatchNorm2D(16), nn.ReLU(),
            nn.Conv2D(16, 16, 3, padding=1, groups=4),
        ),
        rng,
    )


def _relative_error(expected: np.ndarray, actual: np.ndarray) -> float:
    return float(np.abs(expected - actual).max() / np.abs(expected).max())


def _reference_input_ranges(weight: np.ndarray, channels: int) -> np.ndarray:
    """Slow: max |w| over every weight entry that reads input channel c of a grouped conv."""
    out, per_group = weight.shape[:2]
    groups = channels // per_group
    ranges = np.zeros(channels)
    for o in range(out):
        group = o // (out // groups)
        for c in range(per_group):
            channel = group * per_group + c
            ranges[channel] = max(ranges[channel], np.abs(weight[o, c]).max())
    return ranges


def test_function_is_kept_and_user_model_untouched() -> None:
    model = _depthwise_net(np.random.default_rng(0))
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    x = paddle.randn([4, 3, 12, 12])
    expected = model(x).numpy()
    equalized, pairs = equalize(model, absorb_bias=False)
    assert [(p.first, p.second) for p in pairs] == [("0", "3"), ("3", "6"), ("6", "9")]
    assert _relative_error(expected, equalized(x).numpy()) < 1e-5
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), before[key])
    assert isinstance(model[1], nn.BatchNorm2D)  # folded in the copy only


def test_single_pair_matches_the_formula() -> None:
    rng = np.random.default_rng(1)
    model = nn.Sequential(nn.Conv2D(3, 6, 3), nn.ReLU(), nn.Conv2D(6, 4, 3, groups=2)).eval()
    w1, b1, w2 = (model[0].weight.numpy(), model[0].bias.numpy(), model[2].weight.numpy())
    model[0].weight.set_value((w1 * rng.uniform(0.01, 5, size=(6, 1, 1, 1))).astype("float32"))
    w1 = model[0].weight.numpy()
    equalized, (pair,) = equalize(model, absorb_bias=False)
    # Reference, one channel at a time.
    expected_w1, expected_b1, expected_w2 = w1.copy(), b1.copy(), w2.copy()
    r2 = _reference_input_ranges(w2, 6)
    for channel in range(6):
        s = np.sqrt(np.abs(w1[channel]).max() / r2[channel])
        expected_w1[channel] /= s
        expected_b1[channel] /= s
        group, position = divmod(channel, 3)
        expected_w2[group * 2 : group * 2 + 2, position] *= s
    np.testing.assert_allclose(equalized[0].weight.numpy(), expected_w1, rtol=1e-5)
    np.testing.assert_allclose(equalized[0].bias.numpy(), expected_b1, rtol=1e-5)
    np.testing.assert_allclose(equalized[2].weight.numpy(), expected_w2, rtol=1e-5)
    # After: output range of channel c of the first equals the input range of c in the second.
    r1_after = np.abs(equalized[0].weight.numpy()).reshape(6, -1).max(axis=1)
    r2_after = _reference_input_ranges(equalized[2].weight.numpy(), 6)
    np.testing.assert_allclose(r1_after, r2_after, rtol=1e-5)


def test_chain_ranges_are_equalized_for_every_pair() -> None:
    model = _depthwise_net(np.random.default_rng(2))
    equalized, pairs = equalize(model, absorb_bias=False, tolerance=1e-9, max_rounds=500)
    layers = dict(equalized.named_sublayers())
    for pair in pairs:
        first, second = layers[pair.first], layers[pair.second]
        channels = first.weight.shape[0]
        r1 = np.abs(first.weight.numpy()).reshape(channels, -1).max(axis=1)
        r2 = _reference_input_ranges(second.weight.numpy(), channels)
        np.testing.assert_allclose(r1, r2, rtol=1e-4)


def test_linear_chain_given_by_name() -> None:
    model = VerySimpleNet().eval()
    with paddle.no_grad():
        model.fc1.weight.set_value(
            (model.fc1.weight.numpy() * np.linspace(0.01, 3, 100)[None, :]).astype("float32")
        )
    x = paddle.rand([8, 1, 28, 28])
    expected = model(x).numpy()
    chain = [["fc1", "relu1", "fc2", "relu2", "fc3"]]
    equalized, pairs = equalize(model, chain)
    assert len(pairs) == 2
    assert _relative_error(expected, equalized(x).numpy()) < 1e-5
    r1 = np.abs(equalized.fc1.weight.numpy()).max(axis=0)
    r2 = np.abs(equalized.fc2.weight.numpy()).max(axis=1)
    assert np.ptp(np.log(r1 / r2)) < np.ptp(np.log(
        np.abs(model.fc1.weight.numpy()).max(axis=0) / np.abs(model.fc2.weight.numpy()).max(axis=1)
    ))


def test_bias_absorption_follows_the_three_sigma_rule() -> None:
    model = nn.Sequential(
        nn.Conv2D(3, 8, 3, padding=1), nn.BatchNorm2D(8), nn.ReLU(), nn.Conv2D(8, 5, 1)
    )
    _randomize_norms(model, np.random.default_rng(3))
    beta = np.linspace(-2, 12, 8).astype("float32")
    gamma = np.linspace(0.5, 2, 8).astype("float32")
    model[1].bias.set_value(beta)
    model[1].weight.set_value(gamma)
    model[1]._mean.set_value(model[0].bias.numpy())  # a small input gives z ~ beta >= c
    without, _ = equalize(model, absorb_bias=False)
    with_absorption, (pair,) = equalize(model)
    expected = np.maximum(0, (beta - 3 * gamma) / pair.scales)
    np.testing.assert_allclose(pair.absorbed, expected, rtol=1e-5)
    np.testing.assert_allclose(
        with_absorption[0].bias.numpy(), without[0].bias.numpy() - expected, rtol=1e-5, atol=1e-5
    )
    w2 = without[3].weight.numpy()[:, :, 0, 0]
    np.testing.assert_allclose(
        with_absorption[3].bias.numpy(), without[3].bias.numpy() + w2 @ expected, rtol=1e-5,
        atol=1e-5,
    )
    # Exact wherever every pre-activation is at least its absorbed part.
    prefix = nn.Sequential(without[0], without[1])
    x = paddle.randn([4, 3, 8, 8]) * 1e-2
    absorbed = expected[None, :, None, None]
    assert np.all((prefix(x).numpy() >= absorbed) | (absorbed == 0))
    assert np.any(expected > 0)
    assert _relative_error(without(x).numpy(), with_absorption(x).numpy()) < 1e-5


def test_relu6_pair_is_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(nn.Conv2D(3, 4, 1), nn.ReLU6(), nn.Conv2D(4, 4, 1)).eval()
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        equalized, pairs = equalize(model)
    assert pairs == []
    assert any("ReLU6 '1'" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(equalized[0].weight.numpy(), model[0].weight.numpy())
    replaced, pairs = equalize(model, relu6_to_relu=True)
    assert len(pairs) == 1 and isinstance(replaced[1], nn.ReLU)
    assert isinstance(model[1], nn.ReLU6)


def test_bad_chains_name_the_layer() -> None:
    model = nn.Sequential(
        nn.Conv2D(3, 4, 1), nn.Hardswish(), nn.Conv2D(4, 4, 1), nn.Conv2D(5, 2, 1)
    ).eval()
    with pytest.raises(ValueError, match="'1' is a Hardswish"):
        equalize(model, [["0", "1", "2"]])
    with pytest.raises(ValueError, match="'2' has 4 output channels"):
        equalize(model, [["2", "3"]])
    with pytest.raises(ValueError, match="'nope', which is not a sublayer"):
        equalize(model, [["0", "nope"]])
    with pytest.raises(TypeError, match="chains must be a list of lists"):
        equalize(model, ["0", "2"])
    assert find_chains(model) == []  # the Hardswish breaks the chain; '2'/'3' do not fit
    mixed = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)).eval()
    assert find_chains(mixed) == [["0", "1", "2"]]


def test_ptq_config_equalizes_the_copy_only() -> None:
    model = _depthwise_net(np.random.default_rng(4))
    reference = copy.deepcopy(model)
    config = PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), equalization=True)
    assert config.to_dict()["equalization"] is True
    ptq = ImperativePTQ(config)
    qmodel = ptq.quantize(model)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), reference.state_dict()[key].numpy())
    first, second = qmodel[0], qmodel[3]
    r1 = np.abs(first.weight.numpy()).reshape(8, -1).max(axis=1)
    r2 = _reference_input_ranges(second.weight.numpy(), 8)
    original_spread = np.ptp(np.log(
        np.abs(reference[0].weight.numpy() * (reference[1].weight.numpy() / np.sqrt(
            reference[1]._variance.numpy() + reference[1]._epsilon))[:, None, None, None]
        ).reshape(8, -1).max(axis=1) / _reference_input_ranges(reference[3].weight.numpy(), 8)
    ))
    assert np.ptp(np.log(r1 / r2)) < original_spread
    ptq.calibrate(qmodel, [paddle.randn([2, 3, 12, 12])], progress=False)
    ptq.convert(qmodel)
    with pytest.raises(TypeError, match="equalization must be a bool"):
        PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), equalization="yes")


def test_batch_norm_after_the_last_layer_of_a_chain_is_folded_too() -> None:
    model = _randomize_norms(
        nn.Sequential(nn.Conv2D(3, 4, 1), nn.BatchNorm2D(4), nn.ReLU(), nn.Conv2D(4, 4, 1),
                      nn.BatchNorm2D(4)),
        np.random.default_rng(5),
    )
    x = paddle.randn([2, 3, 5, 5])
    equalized, _ = equalize(model, absorb_bias=False)
    assert isinstance(equalized[1], nn.Identity) and isinstance(equalized[4], nn.Identity)
    assert _relative_error(model(x).numpy(), equalized(x).numpy()) < 1e-5
