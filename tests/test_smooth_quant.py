"""SmoothQuant: the fp32 function is kept, the scales follow the formula (a per-channel loop),
the alpha search picks the candidate with the smallest quantized-output error (a plain
search), activation outliers shrink, and producers it cannot fold into are refused by name."""

from __future__ import annotations

import numpy as np
import paddle
import pytest
from paddle import nn

import imperative_ptq as ip
from imperative_ptq.algorithms import SmoothQuant, smooth_quant
from imperative_ptq.algorithms.smooth_quant import _quantized_input, find_smoothable
from imperative_ptq.models import MnistSequenceEncoder
from imperative_ptq.shifted_input import dequantize_codes, shifted_codes, shifted_grid


class Block(nn.Layer):
    """A transformer-shaped block: LayerNorm read by three Linears, then an output Linear."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = self.norm(x)
        return self.out(paddle.nn.functional.relu(self.q(h) + self.k(h) * self.v(h)))


def _outlier_block() -> Block:
    """LayerNorm weights with two outlier channels, as LLM.int8 / SmoothQuant describe."""
    block = Block().eval()
    gamma = np.ones(16, np.float32)
    gamma[[3, 11]] = 40.0
    block.norm.weight.set_value(gamma)
    return block


def _batches(count: int = 4, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((8, 5, 16)).astype("float32") for _ in range(count)]


GROUPS = (("norm", "q", "k", "v"),)


def test_function_kept_and_scales_follow_the_formula() -> None:
    model, batches = _outlier_block(), _batches()
    x = paddle.to_tensor(batches[0])
    expected = model(x).numpy()
    smoothed, (group,) = smooth_quant(model, batches, SmoothQuant(alpha=0.5, groups=GROUPS))
    np.testing.assert_allclose(smoothed(x).numpy(), expected, rtol=1e-4, atol=1e-5)
    # Slow reference: per channel, max |LayerNorm output| and max |w| over q, k, v rows.
    with paddle.no_grad():
        normed = np.concatenate([model.norm(paddle.to_tensor(b)).numpy().reshape(-1, 16) for b in batches])
    for j in range(16):
        x_max = np.abs(normed[:, j]).max()
        w_max = max(np.abs(getattr(model, n).weight.numpy()[j]).max() for n in ("q", "k", "v"))
        assert group.scales[j] == pytest.approx(np.sqrt(x_max) / np.sqrt(w_max), rel=1e-5)
    np.testing.assert_allclose(
        smoothed.norm.weight.numpy(), model.norm.weight.numpy() / group.scales, rtol=1e-5
    )
    np.testing.assert_allclose(
        smoothed.q.weight.numpy(), model.q.weight.numpy() * group.scales[:, None], rtol=1e-5
    )
    assert model.norm.weight.numpy()[3] == 40.0  # the user's model is untouched
    # The outlier channels' share of the input range shrank.
    with paddle.no_grad():
        after = np.abs(smoothed.norm(x).numpy().reshape(-1, 16)).max(axis=0)
    before = np.abs(model.norm(x).numpy().reshape(-1, 16)).max(axis=0)
    assert after.max() / np.median(after) < before.max() / np.median(before)


def test_alpha_search_takes_the_smallest_error() -> None:
    model, batches = _outlier_block(), _batches()
    settings = SmoothQuant(
        groups=GROUPS, alphas=(0.0, 0.25, 0.5, 0.75, 1.0), quant_bits=4, target="arm"
    )
    _, (group,) = smooth_quant(model, batches, settings)
    assert set(group.errors) == {0.0, 0.25, 0.5, 0.75, 1.0, None}  # None: unsmoothed
    assert group.alpha == min(group.errors, key=group.errors.get)
    assert group.errors[group.alpha] < group.errors[None]  # smoothing helps with outliers


def _output_error(model: nn.Layer, config: ip.PTQConfig) -> float:
    ptq = ip.ImperativePTQ(config)
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, _batches(), progress=False)
    ptq.convert(qmodel)
    x = paddle.to_tensor(_batches(1, seed=9)[0])
    with paddle.no_grad():
        return float(np.mean((qmodel(x).numpy() - model(x).numpy()) ** 2))


def _group_output_error(model: nn.Layer, config: ip.PTQConfig) -> float:
    """Summed mean squared error of the converted model's q, k and v outputs against the fp32
    model's (smoothing keeps those outputs, so they compare directly)."""
    ptq = ip.ImperativePTQ(config)
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, _batches(), progress=False)
    ptq.convert(qmodel)
    outputs: dict[tuple[str, str], np.ndarray] = {}

    def keep(kind: str, name: str):
        def hook(layer: nn.Layer, inputs: tuple, output: paddle.Tensor) -> None:
            outputs[kind, name] = output.numpy()
        return hook

    for kind, net in (("fp32", model), ("int8", qmodel)):
        for name in ("q", "k", "v"):
            getattr(net, name).register_forward_post_hook(keep(kind, name))
    x = paddle.to_tensor(_batches(1, seed=9)[0])
    with paddle.no_grad():
        model(x), qmodel(x)
    return sum(
        float(np.mean((outputs["int8", name] - outputs["fp32", name]) ** 2)) for name in ("q", "k", "v")
    )


@pytest.mark.parametrize("target", ["arm", "x86-vnni"])
def test_ptq_config_smooths_before_calibration_where_it_helps(target: str) -> None:
    """On arm smoothing lowers the quantized error of the q, k, v outputs (on one weight
    threshold each, as the export stores a square weight); on x86, where Paddle's fc also
    re-derives the weight's scales from runs of its rows, the search finds no alpha that
    helps and leaves the group alone (smoothing anyway made another draw of this block ~400x
    worse)."""
    model = _outlier_block()
    plain = ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=target)
    config = ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=target,
                          smooth_quant=SmoothQuant(groups=GROUPS))
    assert config.smooth_quant.target == target
    assert [list(g) for g in config.to_dict()["smooth_quant"]["groups"]] == [["norm", "q", "k", "v"]]
    if target == "arm":
        plain_error, smoothed_error = _group_output_error(model, plain), _group_output_error(model, config)
        assert smoothed_error < plain_error / 2, (plain_error, smoothed_error)
    else:
        assert _output_error(model, config) == pytest.approx(_output_error(model, plain), rel=1e-6)


@pytest.mark.parametrize("width", [16, 24])
def test_the_search_scores_weights_on_the_thresholds_the_export_stores(width: int) -> None:
    """The search's unsmoothed score on arm, against a plain reference: the LayerNorm output
    on one symmetric abs-max threshold, each weight per output channel, or on one threshold
    when it is square (the Paddle export stores a square weight per tensor on every target,
    and the simulation computes with that)."""
    model = _outlier_block()
    for name in ("q", "k", "v"):
        setattr(model, name, nn.Linear(16, width))
    model.out = nn.Linear(width, 4)
    batches = _batches()
    _, (group,) = smooth_quant(model, batches, SmoothQuant(groups=GROUPS, target="arm"))
    with paddle.no_grad():
        rows = np.concatenate([model.norm(paddle.to_tensor(b)).numpy().reshape(-1, 16) for b in batches])
    rows = rows.astype(np.float64)
    step = np.abs(rows).max() / 127
    rows_q = np.clip(np.round(rows / step), -127, 127) * step
    expected = 0.0
    for name in ("q", "k", "v"):
        weight = getattr(model, name).weight.numpy().astype(np.float64)
        weight_q = np.empty_like(weight)
        for column in range(width):
            limit = np.abs(weight).max() if width == 16 else np.abs(weight[:, column]).max()
            weight_q[:, column] = np.round(weight[:, column] / (limit / 127)) * (limit / 127)
        expected += np.mean((rows_q @ weight_q - rows @ weight) ** 2)
    assert group.errors[None] == pytest.approx(expected, rel=1e-5)


def test_linear_layers_on_rank_4_inputs_are_smoothed_for_their_per_channel_convs() -> None:
    """On a rank-4 input the Paddle export runs the Linear layers as 1x1 convs on their own
    per-channel weights (ConvNeXt's channels-last layers), so the x86 search scores each alpha
    as for true per-channel weights (arm's); on a rank-3 input it models Paddle's fc."""
    model = _outlier_block()
    rank_3 = _batches()
    rank_4 = [batch.reshape(8, 1, 5, 16) for batch in rank_3]
    errors = {}
    for name, batches in (("rank 3", rank_3), ("rank 4", rank_4)):
        for target in ("arm", "x86"):
            _, (group,) = smooth_quant(model, batches, SmoothQuant(groups=GROUPS, target=target))
            errors[name, target] = group.errors
    assert errors["rank 4", "arm"] == errors["rank 3", "arm"]
    # x86 reads the signed LayerNorm output on its shifted grid at either rank (below); the
    # weights it scores differ: Paddle's fc at rank 3, the convs' per-channel ones at rank 4.
    assert errors["rank 4", "x86"] != errors["rank 3", "x86"]


def test_the_search_reads_a_signed_input_on_the_grid_its_target_runs() -> None:
    """On x86 a signed input (a LayerNorm's) is read on the shifted 7-bit grid the simulation
    and the export use (``shifted_input``: codes 0..127 about a zero point), a non-negative one
    on codes 0..127; elsewhere on the symmetric grid. The unsmoothed score of an outlier block
    then differs between x86 and x86-vnni, whose fc weights are the same."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((512, 16)) * np.where(np.arange(16) % 5 == 0, 8.0, 1.0)).astype(np.float64)
    threshold = float(np.abs(x).max())
    scale, zero_point = shifted_grid(threshold, float(x.min()), 8)
    codes = shifted_codes(paddle.to_tensor(x.astype(np.float32)), scale, zero_point, 127)
    simulated = dequantize_codes(codes, scale, zero_point).numpy()
    searched = _quantized_input(x, 8, shifted=True)
    np.testing.assert_allclose(searched, simulated, rtol=0, atol=1e-5 * scale)
    positive = np.abs(x)
    np.testing.assert_array_equal(
        _quantized_input(positive, 8, shifted=True),
        _quantized_input(positive, 8, shifted=False),
    )
    step = threshold / 127
    np.testing.assert_allclose(
        _quantized_input(x, 8, shifted=False), np.clip(np.round(x / step), -127, 127) * step
    )
    model, batches = _outlier_block(), _batches()
    scores = {
        target: smooth_quant(model, batches, SmoothQuant(groups=GROUPS, target=target))[1][0].errors[None]
        for target in ("x86", "x86-vnni")
    }
    assert scores["x86"] != scores["x86-vnni"], scores


def test_smoothing_must_see_the_data_first() -> None:
    model, batches = _outlier_block(), _batches()
    config = ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(),
                          smooth_quant=SmoothQuant(groups=GROUPS))
    ptq = ip.ImperativePTQ(config)
    qmodel = ptq.quantize(model)
    qmodel(paddle.to_tensor(batches[0]))  # observed through the hooks, before smoothing
    with pytest.raises(ValueError, match="must see the data before any batch is observed"):
        ptq.calibrate(qmodel, batches, progress=False)
    with pytest.raises(ValueError, match="ImperativePTQ.calibrate, which was not called"):
        ptq.convert(qmodel)


def test_unfoldable_producer_and_bad_groups_are_refused() -> None:
    model = Block().eval()
    no_weight = nn.Sequential(nn.LayerNorm(16, weight_attr=False, bias_attr=False), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="'0', a LayerNorm without a weight"):
        smooth_quant(no_weight, _batches(), SmoothQuant(groups=(("0", "1"),)))
    relu = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="'1', a ReLU, not a LayerNorm or Linear"):
        smooth_quant(relu, _batches(), SmoothQuant(groups=(("1", "2"),)))
    with pytest.raises(ValueError, match="'nope', which is not a sublayer"):
        smooth_quant(model, _batches(), SmoothQuant(groups=(("norm", "nope"),)))
    with pytest.raises(ValueError, match="'1' reads 16 channels, '0' produces 8"):
        smooth_quant(nn.Sequential(nn.LayerNorm(8), nn.Linear(16, 4)), _batches(),
                     SmoothQuant(groups=(("0", "1"),)))
    with pytest.raises(ValueError, match="needs calibration batches"):
        smooth_quant(model, [], SmoothQuant(groups=GROUPS))
    with pytest.raises(ValueError, match="alphas must lie in"):
        SmoothQuant(alpha=1.5)
    with pytest.raises(TypeError, match="smooth_quant must be"):
        ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(), smooth_quant=0.5)
    sequential = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.Linear(16, 4), nn.ReLU())
    assert find_smoothable(sequential) == [["0", "1"], ["1", "2"]]


def _encoder(normalize_before: bool) -> nn.Layer:
    paddle.seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, normalize_before=normalize_before)
    return nn.TransformerEncoder(layer, 2).eval()


def test_groups_found_from_the_data_flow_and_kept_only_where_folding_is_exact(caplog) -> None:
    """With data, the groups are the Linears reading a LayerNorm's (or a Linear's) output
    itself, across module boundaries (``nn.MultiHeadAttention``'s q, k, v): here as written by
    hand. A post-norm block also adds each LayerNorm's output to a residual, which a fold would
    scale: those candidates are dropped, named in the log. The model is left bit for bit as
    it was."""
    batches = _batches(2)
    assert find_smoothable(Block().eval(), batches) == [["norm", "q", "k", "v"]]
    pre_norm = _encoder(normalize_before=True)
    before = {key: value.numpy().copy() for key, value in pre_norm.state_dict().items()}
    expected = [
        group for i in range(2) for group in (
            [f"layers.{i}.norm1", *(f"layers.{i}.self_attn.{p}_proj" for p in "qkv")],
            [f"layers.{i}.norm2", f"layers.{i}.linear1"],
        )
    ]
    assert find_smoothable(pre_norm, batches) == expected
    for key, value in pre_norm.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), before[key])
    model = MnistSequenceEncoder().eval()
    images = [np.random.default_rng(3).random((4, 1, 28, 28)).astype("float32")]
    assert find_smoothable(model, images) == model.smoothing_groups()
    with caplog.at_level("INFO", logger="imperative_ptq.algorithms.smooth_groups"):
        assert find_smoothable(_encoder(normalize_before=False), batches) == []
    assert "leaves 3 groups alone" in caplog.text
    assert "['layers.0.norm1', 'layers.0.norm2', 'layers.1.norm1']" in caplog.text
    assert find_smoothable(Block().eval()) == []  # without data: nn.Sequential neighbours only


def test_ptq_config_smooths_the_groups_it_finds() -> None:
    """``SmoothQuant()`` without groups smooths a pre-norm transformer's LayerNorm -> Linear
    groups; the smoothed fp32 model computes what the original does."""
    model = _encoder(normalize_before=True)
    x = paddle.to_tensor(_batches(1, seed=5)[0])
    expected = model(x).numpy()
    smoothed, groups = smooth_quant(model, _batches(), SmoothQuant(alpha=0.5))
    assert [group.producer for group in groups] == [
        "layers.0.norm1", "layers.0.norm2", "layers.1.norm1", "layers.1.norm2"
    ]
    assert all(not np.allclose(group.scales, 1.0) for group in groups)
    np.testing.assert_allclose(smoothed(x).numpy(), expected, rtol=1e-4, atol=1e-5)


class _FunctionalBlock(nn.Layer):
    """A LayerNorm and a functional ``paddle.matmul`` on a parameter, as x2paddle converts a
    transformer block (no ``nn.Linear``)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.weight = self.create_parameter([16, 16])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.matmul(self.norm(x).reshape([0, -1, 16]), self.weight)


def test_a_model_without_linear_layers_is_told_why_nothing_is_smoothed(caplog) -> None:
    import logging

    paddle.seed(0)
    model = _FunctionalBlock()
    model.eval()
    with caplog.at_level(logging.WARNING, logger="imperative_ptq.algorithms.smooth_quant"):
        _, groups = smooth_quant(model, [paddle.randn([2, 4, 16])])
    assert groups == []
    assert "no nn.Linear" in caplog.text and "functional paddle.matmul" in caplog.text
