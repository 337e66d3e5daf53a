"""Cross-layer equalization: the fp32 function is kept, ranges are equalized as the formula
says (checked against a per-channel loop), the user's model is untouched, bad chains fail."""

from __future__ import annotations

import copy
import importlib.util
import logging

import numpy as np
import paddle
import pytest
from paddle import nn

import imperative_ptq as ip
from imperative_ptq import ImperativePTQ, PTQConfig, KLQuantizer, PerChannelAbsmaxQuantizer
from imperative_ptq.algorithms import ChannelClip, equalize, find_chains
from imperative_ptq.fuse import _NORM_ACTIVATIONS
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


def _absorption_model(activation: nn.Layer, seed: int) -> tuple[nn.Sequential, np.ndarray, np.ndarray]:
    """Conv -> BatchNorm -> ``activation`` -> 1x1 conv whose BatchNorm has shift ``beta`` and
    scale ``gamma`` (returned), so bias absorption has channels to absorb."""
    model = nn.Sequential(
        nn.Conv2D(3, 8, 3, padding=1), nn.BatchNorm2D(8), activation, nn.Conv2D(8, 5, 1)
    )
    _randomize_norms(model, np.random.default_rng(seed))
    beta = np.linspace(-2, 12, 8).astype("float32")
    gamma = np.linspace(0.5, 2, 8).astype("float32")
    model[1].bias.set_value(beta)
    model[1].weight.set_value(gamma)
    model[1]._mean.set_value(model[0].bias.numpy())  # a small input gives z ~ beta >= c
    return model, beta, gamma


def test_bias_absorption_follows_the_three_sigma_rule() -> None:
    model, beta, gamma = _absorption_model(nn.ReLU(), seed=3)
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
    replaced, pairs = equalize(model, relu6="relu")
    assert len(pairs) == 1 and isinstance(replaced[1], nn.ReLU)
    assert isinstance(model[1], nn.ReLU6)


def _relu6_net(rng: np.random.Generator) -> nn.Sequential:
    """conv -> depthwise -> pointwise with ReLU6s whose inputs often exceed 6 (BatchNorm
    shifts up to ~8), so where each ReLU6 clips matters."""
    model = nn.Sequential(
        nn.Conv2D(3, 8, 3, padding=1), nn.BatchNorm2D(8), nn.ReLU6(),
        nn.Conv2D(8, 8, 3, padding=1, groups=8), nn.BatchNorm2D(8), nn.ReLU6(),
        nn.Conv2D(8, 12, 1), nn.BatchNorm2D(12), nn.ReLU6(), nn.Conv2D(12, 5, 1),
    )
    _randomize_norms(model, rng)
    for norm in (model[1], model[4], model[7]):
        channels = norm._mean.shape[0]
        norm.bias.set_value(rng.uniform(0, 8, channels).astype("float32"))
    return model


def _reference_clip(model: nn.Sequential, x: paddle.Tensor, bounds: dict[int, np.ndarray]) -> np.ndarray:
    """Slow: the chain run layer by layer, each activation clipped channel by channel."""
    for index, layer in enumerate(model):
        if index in bounds:
            y = x.numpy()
            for channel, bound in enumerate(bounds[index]):
                y[:, channel] = np.minimum(np.maximum(y[:, channel], 0), bound)
            x = paddle.to_tensor(y)
        else:
            x = layer(x)
    return x.numpy()


def test_relu6_clip_keeps_the_function() -> None:
    """relu6='clip': each ReLU6 becomes a per-channel clip at 6 / s, and the fp32 function is
    unchanged although activations exceed 6; relu6='relu' (AIMET's choice) changes it."""
    model = _relu6_net(np.random.default_rng(6))
    x = paddle.rand([4, 3, 10, 10])
    expected = model(x).numpy()
    prefix = nn.Sequential(*list(model.children())[:2])
    assert (prefix(x).numpy() > 6).mean() > 0.1  # the first ReLU6 clips
    equalized, pairs = equalize(model, absorb_bias=False)
    assert pairs == [] and isinstance(equalized[2], nn.ReLU6)  # default: skipped
    equalized, pairs = equalize(model, relu6="clip", absorb_bias=False)
    assert [(p.first, p.second) for p in pairs] == [("0", "3"), ("3", "6"), ("6", "9")]
    assert all(np.ptp(np.log(p.scales)) > 0.1 for p in pairs)
    bounds = {}
    for index, pair in zip((2, 5, 8), pairs):
        assert isinstance(equalized[index], ChannelClip)
        np.testing.assert_allclose(equalized[index].bounds, 6 / pair.scales, rtol=1e-5)
        bounds[index] = 6 / pair.scales
    assert _relative_error(expected, equalized(x).numpy()) < 1e-5
    assert _relative_error(expected, _reference_clip(equalized, x, bounds)) < 1e-5
    assert all(isinstance(model[index], nn.ReLU6) for index in (2, 5, 8))  # user's model
    relu, _ = equalize(model, relu6="relu", absorb_bias=False)
    assert _relative_error(expected, relu(x).numpy()) > 0.05


def test_relu6_clip_absorbs_bias_below_its_bound() -> None:
    """Absorbing ``c`` through a clip lowers its bound too: clip(z - c, 0, u - c) + c =
    clip(z, 0, u) wherever z >= c."""
    model, beta, gamma = _absorption_model(nn.ReLU6(), seed=7)
    without, _ = equalize(model, relu6="clip", absorb_bias=False)
    with_absorption, (pair,) = equalize(model, relu6="clip")
    upper = 6 / pair.scales
    expected = np.minimum(np.maximum(0, (beta - 3 * gamma) / pair.scales), upper)
    np.testing.assert_allclose(pair.absorbed, expected, rtol=1e-5)
    np.testing.assert_allclose(with_absorption[2].bounds, upper - expected, rtol=1e-5, atol=1e-6)
    assert np.any(expected > 0) and np.any(expected == upper)  # some channels always clip
    x = paddle.randn([4, 3, 8, 8]) * 1e-2
    prefix = nn.Sequential(without[0], without[1])
    assert np.all((prefix(x).numpy() >= expected[None, :, None, None]) | (expected[None, :, None, None] == 0))
    assert _relative_error(without(x).numpy(), with_absorption(x).numpy()) < 1e-5
    assert _relative_error(model(x).numpy(), with_absorption(x).numpy()) < 1e-5


def test_relu6_clip_keeps_mobilenet_v2() -> None:
    """paddle.vision's MobileNetV2 (random weights, BatchNorms far from identity): every
    expand -> depthwise pair has a ReLU6; with relu6='clip' they are equalized too (33 pairs
    instead of the 0 the default finds) and the logits stay the same."""
    from paddle.vision.models import mobilenet_v2

    model = _randomize_norms(mobilenet_v2(scale=0.25, num_classes=10), np.random.default_rng(8))
    x = paddle.rand([2, 3, 32, 32])
    expected = model(x).numpy()
    _, skipped = equalize(model, absorb_bias=False)
    equalized, pairs = equalize(model, relu6="clip", absorb_bias=False)
    assert len(skipped) == 0 and len(pairs) == 33
    assert _relative_error(expected, equalized(x).numpy()) < 1e-5


def test_relu6_clip_exports_as_simulated(tmp_path) -> None:
    """A ChannelClip traces as relu + elementwise_min: Paddle Inference and ONNX Runtime run
    the equalized model about as close to the simulation as the ReLU6 original."""
    from imperative_ptq import AbsmaxQuantizer
    from imperative_ptq.export import create_predictor, export_onnx, predict

    rng = np.random.default_rng(9)
    model = _relu6_net(rng)
    equalized, _ = equalize(model, relu6="clip")
    batches = [rng.random((8, 3, 10, 10), dtype=np.float32) for _ in range(3)]
    x = rng.random((8, 3, 10, 10), dtype=np.float32)
    spec = [paddle.static.InputSpec([None, 3, 10, 10], "float32", "x")]
    errors = {}
    for name, candidate in (("relu6", model), ("clip", equalized)):
        ptq = ImperativePTQ(PTQConfig(AbsmaxQuantizer(), PerChannelAbsmaxQuantizer()))
        qmodel = ptq.quantize(candidate)
        ptq.calibrate(qmodel, batches, progress=False)
        ptq.convert(qmodel)
        simulated = qmodel(paddle.to_tensor(x)).numpy()
        prefix = str(tmp_path / name)
        ptq.save_quantized_model(qmodel, prefix, spec)
        ran = predict(create_predictor(prefix, num_threads=1), x)[0]
        outputs = [ran]
        if importlib.util.find_spec("onnxruntime"):
            import onnxruntime as ort

            path = export_onnx(qmodel, prefix + ".onnx", spec)
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            outputs.append(session.run(None, {"x": x})[0])
        errors[name] = [
            float(np.linalg.norm(out - simulated) / np.linalg.norm(simulated)) for out in outputs
        ]
    # Measured relative errors: Paddle Inference 1.1e-7 (ReLU6) and 6.1e-8 (clip); ONNX
    # Runtime 3.6e-4 and 3.7e-4.
    for clip_error, relu6_error in zip(errors["clip"], errors["relu6"]):
        assert clip_error < 2 * relu6_error + 1e-6, errors


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


def test_ptq_config_equalization_clip_equalizes_relu6_pairs() -> None:
    model = _relu6_net(np.random.default_rng(10))
    reference = copy.deepcopy(model)
    config = PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), equalization="clip")
    assert config.to_dict()["equalization"] == "clip" and "equalization='clip'" in repr(config)
    qmodel = ImperativePTQ(config).quantize(model)
    assert all(isinstance(qmodel[index], ChannelClip) for index in (2, 5, 8))
    assert all(isinstance(model[index], nn.ReLU6) for index in (2, 5, 8))
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), reference.state_dict()[key].numpy())
    plain = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), equalization=True))
    assert isinstance(plain.quantize(model)[2], nn.ReLU6)
    equalized, _ = equalize(model, relu6="clip")
    np.testing.assert_array_equal(qmodel[0].weight.numpy(), equalized[0].weight.numpy())
    np.testing.assert_array_equal(qmodel[5].bounds, equalized[5].bounds)
    with pytest.raises(TypeError, match="equalization must be a bool or 'clip'"):
        PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), equalization="relu")
    with pytest.raises(ValueError, match="relu6 must be one of"):
        equalize(model, relu6="keep")


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


def test_ptq_config_equalization_that_finds_no_chain_warns(caplog) -> None:
    """A model whose layers sit outside nn.Sequential (LeNet's attributes) has no chain
    equalize finds: the config's equalization did nothing, said only at INFO level before."""
    import logging

    from imperative_ptq.models import LeNet

    with caplog.at_level(logging.WARNING, logger="imperative_ptq.algorithms"):
        ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), equalization=True)).quantize(LeNet())
    assert "found no pair of layers to equalize in LeNet" in caplog.text and "chains=" in caplog.text
    caplog.clear()
    # (The warning named equalization=True whatever the config said.)
    with caplog.at_level(logging.WARNING, logger="imperative_ptq.algorithms"):
        ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), equalization="clip")).quantize(LeNet())
    assert "PTQConfig(equalization='clip') found no pair" in caplog.text
    caplog.clear()
    model = paddle.nn.Sequential(paddle.nn.Conv2D(3, 8, 3), paddle.nn.ReLU(), paddle.nn.Conv2D(8, 8, 3))
    with caplog.at_level(logging.WARNING, logger="imperative_ptq.algorithms"):
        ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), equalization=True)).quantize(model)
    assert "found no pair" not in caplog.text


def _legacy_norm_net(act: str) -> nn.Sequential:
    """Conv -> legacy ``paddle.nn.BatchNorm(act=act)`` -> 1x1 conv, with trained-looking statistics."""
    paddle.seed(0)
    net = nn.Sequential(nn.Conv2D(3, 8, 3, padding=1), nn.BatchNorm(8, act=act), nn.Conv2D(8, 4, 1))
    norm = net[1]
    norm._mean.set_value(paddle.randn([8]) * 0.3)
    norm._variance.set_value(paddle.rand([8]) + 0.5)
    norm.weight.set_value(paddle.rand([8]) * 2 + 0.1)
    net.eval()
    return net


@pytest.mark.parametrize("act", ["sigmoid", "hard_swish", "tanh"])
def test_legacy_batch_norm_activation_ends_a_chain_and_survives_folding(act) -> None:
    """A legacy BatchNorm(act=...) was folded into the conv before it as a plain norm: its
    activation vanished (fp32 output 1.0-4.1 of its largest value off, silently) and CLE
    scaled channels through a sigmoid or hard_swish."""
    net = _legacy_norm_net(act)
    x = paddle.randn([2, 3, 8, 8])
    expected = net(x).numpy()
    assert find_chains(net) == []
    with pytest.raises(ValueError, match=f"BatchNorm '1' applies act='{act}'"):
        equalize(net, [["0", "1", "2"]])
    fused = ip.fuse_layers(copy.deepcopy(net), [["0", "1"]])
    np.testing.assert_allclose(fused(x).numpy(), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("act, relu6", [("relu", "skip"), ("relu6", "clip")])
def test_legacy_batch_norm_relu_links_a_chain(act, relu6) -> None:
    """With act='relu' (or 'relu6', clipped per channel) the norm links the two convs: they are
    equalized and the function is kept."""
    net = _legacy_norm_net(act)
    x = paddle.randn([2, 3, 8, 8])
    expected = net(x).numpy()
    assert find_chains(net) == [["0", "1", "2"]]
    equalized, pairs = equalize(net, relu6=relu6)
    assert [(pair.first, pair.second) for pair in pairs] == [("0", "2")]
    assert not np.allclose(pairs[0].scales, 1.0)
    expected_type = nn.ReLU if act == "relu" else ChannelClip
    assert isinstance(equalized[1], expected_type)
    np.testing.assert_allclose(equalized(x).numpy(), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_legacy_batch_norm_activation_without_a_layer_is_refused_by_fuse_layers() -> None:
    """``act='hard_sigmoid'`` (slope 0.2) has no paddle.nn layer computing it: folding refuses,
    naming the norm, and leaves the model as it was."""
    net = _legacy_norm_net("hard_sigmoid")
    before = net(paddle.ones([1, 3, 8, 8])).numpy()
    with pytest.raises(ValueError, match="cannot fold BatchNorm '1': it applies act='hard_sigmoid'"):
        ip.fuse_layers(net, [["0", "1"]])
    np.testing.assert_array_equal(net(paddle.ones([1, 3, 8, 8])).numpy(), before)


@pytest.mark.parametrize("size", [8, 10])
def test_relu6_clip_of_channels_last_convs_keeps_the_function(size) -> None:
    """ChannelClip's bound was laid out [C, 1, 1] for every conv: on a channels-last conv's
    [N, H, W, C] output it clipped along H and W (silently wrong where H == C, a broadcast
    error at the first forward elsewhere)."""
    paddle.seed(0)
    net = nn.Sequential(
        nn.Conv2D(3, 8, 3, padding=1, data_format="NHWC"), nn.ReLU6(), nn.Conv2D(8, 4, 1, data_format="NHWC")
    )
    net.eval()
    x = paddle.randn([2, size, size, 3]) * 3
    expected = net(x).numpy()
    equalized, pairs = equalize(net, relu6="clip")
    assert len(pairs) == 1 and not np.allclose(pairs[0].scales, 1.0)
    np.testing.assert_allclose(equalized(x).numpy(), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_batch_norm_of_another_axis_than_the_linear_outputs_is_not_folded() -> None:
    """A BatchNorm1D(C) after a Linear on a [N, C, L] input normalizes C, not the Linear's
    outputs: find_chains took the pair and folding failed with numpy's "operands could not be
    broadcast together"."""
    net = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1D(5), nn.ReLU(), nn.Linear(10, 3))
    net.eval()
    assert find_chains(net) == []
    with pytest.raises(ValueError, match=r"cannot fold BatchNorm1D '1' \(5 channels\) into Linear '0' \(10 output"):
        ip.fuse_layers(net, [["0", "1"]])
    with pytest.raises(ValueError, match="cannot fold BatchNorm1D '1'"):
        equalize(net, [["0", "1", "2", "3"]])


@pytest.mark.parametrize("act", sorted(_NORM_ACTIVATIONS))
def test_every_foldable_norm_activation_computes_paddles_own(act) -> None:
    """Each layer folding puts in place of a legacy BatchNorm(act=...) computes Paddle's
    legacy activation op of that name (with its default attributes)."""
    net = _legacy_norm_net(act)
    x = paddle.randn([2, 3, 8, 8]) * 3
    expected = net(x).numpy()
    fused = ip.fuse_layers(copy.deepcopy(net), [["0", "1"]])
    assert not isinstance(fused[1], nn.BatchNorm)
    np.testing.assert_allclose(fused(x).numpy(), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
