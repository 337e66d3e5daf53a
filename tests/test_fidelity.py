"""Golden comparison with Paddle's own PTQ quantizers and ``ImperativePTQ`` on identical data.

Paddle 3.3.1 still ships the dygraph PTQ path (``paddle.quantization.imperative``); its
statistics are the reference this package reproduces. Abs-max must agree exactly; histogram
algorithms agree exactly with the default ``exact_binning=True`` and within 2% with the faster
``exact_binning=False`` (plain ``paddle.histogram``, which differs from ``np.histogram`` within
an ulp of bin edges).
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import paddle
import pytest
from paddle.quantization.imperative import ptq_quantizer as paddle_q
from paddle.quantization.imperative.ptq import ImperativePTQ as PaddlePTQ
from paddle.quantization.imperative.ptq_config import PTQConfig as PaddlePTQConfig

from imperative_ptq import (
    AbsmaxQuantizer,
    HistQuantizer,
    ImperativePTQ,
    KLQuantizer,
    PerChannelAbsmaxQuantizer,
    PTQConfig,
    TensorRTKLQuantizer,
)
from imperative_ptq.quantizers import MIN_THRESHOLD
from imperative_ptq.quantizers.kl_tensorrt import tensorrt_kl_threshold

logging.getLogger("paddle").setLevel(logging.ERROR)


class PaddleHistQuantizer(paddle_q.HistQuantizer):
    """Paddle's ``HistQuantizer`` with its numpy-2 crash fixed and nothing else changed.

    ``float((index - 0.5) * width)`` of the 1-element array ``index`` raises under numpy 2;
    taking ``index[0]`` is the only edit (the negative result for bin 0 is kept on purpose).
    """

    def cal_thresholds(self):
        def _helper(abs_max, hist, percent):
            assert hist.ndim == 1 and percent < 1.0
            hist = hist / np.sum(hist, dtype=np.float64)
            cumsumed_hist = np.cumsum(hist)
            index = np.argwhere(cumsumed_hist >= percent)[0]
            return float((index[0] - 0.5) * (abs_max / hist.shape[0]))

        for idx in range(len(self.hists)):
            if self.hists[idx] is None:
                self.thresholds.append(self.abs_max_vals[idx])
            else:
                self.thresholds.append(
                    _helper(self.abs_max_vals[idx], self.hists[idx], self.hist_percent)
                )


def _batches(seed: int = 0):
    """Batches whose range grows twice (and shrinks once), so histogram merging is exercised."""
    rng = np.random.default_rng(seed)
    scales = (1.0, 0.3, 2.5, 1.0, 9.0)
    out = []
    for i, scale in enumerate(scales):
        x = rng.standard_normal((8, 4, 16, 16)) * scale
        if i % 2:
            x = np.maximum(x, 0) + 0.05 * rng.laplace(size=x.shape)
        out.append(paddle.to_tensor(x.astype(np.float32)))
    return out


def _run(quantizer, batches, layer=None):
    for batch in batches:
        quantizer.sample_data(layer, (batch,))
    quantizer.cal_thresholds()
    return quantizer.thresholds


# ------------------------------------------------------------------------- single quantizers
def test_abs_max_exact() -> None:
    batches = _batches()
    assert _run(AbsmaxQuantizer(), batches) == _run(paddle_q.AbsmaxQuantizer(), batches)


@pytest.mark.parametrize(
    "make",
    [
        lambda: paddle.nn.Conv2D(4, 6, 3),
        lambda: paddle.nn.Conv2D(4, 4, 3, groups=4),
        lambda: paddle.nn.Linear(5, 7),
        lambda: paddle.nn.Conv2DTranspose(4, 6, 3),
    ],
    ids=["conv2d", "depthwise", "linear", "conv2d_transpose"],
)
def test_per_channel_exact(make) -> None:
    layer = make()
    ours = _run(PerChannelAbsmaxQuantizer(), [layer.weight], layer)
    theirs = _run(paddle_q.PerChannelAbsmaxQuantizer(), [layer.weight], layer)
    assert ours == theirs


@pytest.mark.parametrize("percent", [0.9, 0.999, 0.99999])
def test_hist_matches_paddle(percent: float) -> None:
    batches = _batches(1)
    (theirs,) = _run(PaddleHistQuantizer(hist_percent=percent), batches)
    (exact,) = _run(HistQuantizer(hist_percent=percent, exact_binning=True), batches)
    (default,) = _run(HistQuantizer(hist_percent=percent), batches)
    (fast,) = _run(HistQuantizer(hist_percent=percent, exact_binning=False), batches)
    assert default == theirs
    assert exact == theirs
    assert fast == pytest.approx(theirs, rel=0.02)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_matches_paddle(seed: int) -> None:
    batches = _batches(seed)
    (theirs,) = _run(paddle_q.KLQuantizer(), batches)
    (exact,) = _run(KLQuantizer(exact_binning=True), batches)
    (default,) = _run(KLQuantizer(), batches)
    (fast,) = _run(KLQuantizer(exact_binning=False), batches)
    assert exact == theirs and default == theirs
    assert fast == pytest.approx(theirs, rel=0.02)


def test_kl_matches_paddle_other_bits_and_bins() -> None:
    batches = _batches(3)
    for bits, bins in ((4, 64), (6, 256), (8, 2048)):
        (theirs,) = _run(paddle_q.KLQuantizer(quant_bits=bits, bins=bins, upsample_bins=16), batches)
        (ours,) = _run(KLQuantizer(bits, bins, 16, exact_binning=True), batches)
        assert ours == theirs, (bits, bins)


# ---------------------------------------------------------------- where we differ on purpose
def _pixel_batches(seed: int = 0) -> list[paddle.Tensor]:
    """Batches like MNIST images in [0, 1]: 80% background zeros, 5% saturated ones, the rest
    spread over (0, 1)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(4):
        kind = rng.random((16, 1, 28, 28))
        x = np.where(kind < 0.8, 0.0, np.where(kind < 0.85, 1.0, rng.random(kind.shape)))
        out.append(paddle.to_tensor(x.astype(np.float32)))
    return out


def test_kl_keeps_the_maximum_where_paddle_clips_most_of_the_data() -> None:
    """Paddle's KL clips such pixels at about 0.6; ours keeps the maximum (1.0) once
    the clip would cut more than a quarter of the non-zero values, and with
    ``max_clipped_share=None`` is Paddle's threshold again."""
    batches = _pixel_batches()
    (theirs,) = _run(paddle_q.KLQuantizer(), batches)
    (unbounded,) = _run(KLQuantizer(max_clipped_share=None), batches)
    (ours,) = _run(KLQuantizer(), batches)
    assert unbounded == theirs
    data = np.concatenate([batch.numpy().ravel() for batch in batches])
    # Slow reference: the share of the non-zero values above Paddle's threshold.
    nonzero = data[data > 1.0 / 1024]
    assert (nonzero > theirs).mean() > 0.25 and theirs < 0.65
    assert ours == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("share", [0.01, 0.5])
def test_kl_bound_leaves_long_tailed_activations_to_paddles_threshold(share: float) -> None:
    """The bound only acts on data dense up to its maximum: on the long-tailed batches above
    Paddle's KL clips far less than 1% of the values."""
    batches = _batches(4)
    (theirs,) = _run(paddle_q.KLQuantizer(), batches)
    (ours,) = _run(KLQuantizer(max_clipped_share=share), batches)
    assert ours == theirs


@pytest.mark.parametrize("quantizer", [KLQuantizer, TensorRTKLQuantizer])
@pytest.mark.parametrize("share, error", [(0.0, ValueError), (1.5, ValueError), ("0.2", TypeError), (True, TypeError)])
def test_kl_bound_rejects_bad_shares(quantizer: type, share, error) -> None:
    with pytest.raises(error, match="max_clipped_share"):
        quantizer(max_clipped_share=share)


@pytest.mark.parametrize("quantizer", [KLQuantizer, TensorRTKLQuantizer])
def test_kl_bound_is_listed_in_the_config_only_when_not_the_default(quantizer: type) -> None:
    assert "max_clipped_share" not in quantizer().config()
    assert quantizer(max_clipped_share=None).config()["max_clipped_share"] is None
    assert quantizer(max_clipped_share=0.5).clone().max_clipped_share == 0.5
    assert "max_clipped_share=0.25" in repr(quantizer())


def test_tensorrt_kl_keeps_the_maximum_where_its_search_clips_most_of_the_data() -> None:
    """TensorRT's search clips such pixels at about half their range too; with the bound the
    maximum (1.0) is kept, without it the threshold is TensorRT's on the same histogram."""
    batches = _pixel_batches()
    data = np.concatenate([batch.numpy().ravel() for batch in batches])
    (unbounded,) = _run(TensorRTKLQuantizer(max_clipped_share=None), batches)
    (ours,) = _run(TensorRTKLQuantizer(), batches)
    counts, _ = np.histogram(data, bins=1024, range=(0.0, 1.0))  # the pixels' maximum is 1.0
    assert unbounded == pytest.approx(tensorrt_kl_threshold(counts, 1.0 / 1024, 8), rel=1e-12)
    # Slow reference: the share of the non-zero values above TensorRT's threshold.
    nonzero = data[data > 1.0 / 1024]
    assert (nonzero > unbounded).mean() > 0.25 and unbounded < 0.65
    assert ours == pytest.approx(1.0, abs=1e-6)


def test_hist_first_bin_percentile_paddle_negative_ours_positive() -> None:
    # 70% zeros: bin 0 already holds the 50th percentile.
    x = np.zeros(1000, dtype=np.float32)
    x[:300] = np.linspace(0.01, 1.0, 300)
    batches = [paddle.to_tensor(x)]
    (theirs,) = _run(PaddleHistQuantizer(hist_percent=0.5), batches)
    (ours,) = _run(HistQuantizer(hist_percent=0.5), batches)
    width = 1.0 / 1024
    assert theirs == pytest.approx(-0.5 * width)  # Paddle: a negative threshold
    assert ours == pytest.approx(0.5 * width)  # ours: the centre of bin 0


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (AbsmaxQuantizer, paddle_q.AbsmaxQuantizer),
        (HistQuantizer, PaddleHistQuantizer),
        (KLQuantizer, paddle_q.KLQuantizer),
    ],
)
def test_all_zero_tensor_paddle_zero_ours_floor(ours, theirs) -> None:
    batches = [paddle.zeros([4, 8]), paddle.zeros([4, 8])]
    assert _run(theirs(), batches) == [0.0]  # divides by zero downstream
    assert _run(ours(), batches) == [MIN_THRESHOLD]


# ------------------------------------------------------------------------------ model level
class SmallCNN(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.bn1 = paddle.nn.BatchNorm2D(8)
        self.relu1 = paddle.nn.ReLU()
        self.pool = paddle.nn.MaxPool2D(2)
        self.conv2 = paddle.nn.Conv2D(8, 8, 3, padding=1, groups=8)
        self.relu2 = paddle.nn.ReLU6()
        self.avg = paddle.nn.AdaptiveAvgPool2D(2)
        self.flatten = paddle.nn.Flatten()
        self.fc = paddle.nn.Linear(32, 10)

    def forward(self, x):
        x = self.pool(self.relu1(self.bn1(self.conv1(x))))
        return self.fc(self.flatten(self.avg(self.relu2(self.conv2(x)))))


def _model() -> SmallCNN:
    paddle.seed(3)
    model = SmallCNN()
    with paddle.no_grad():  # non-trivial batch-norm statistics
        model.bn1._mean.set_value(paddle.rand([8]) * 0.2)
        model.bn1._variance.set_value(paddle.rand([8]) + 0.5)
    model.eval()
    return model


def _model_batches():
    rng = np.random.default_rng(5)
    return [
        paddle.to_tensor((rng.standard_normal((4, 3, 12, 12)) * s).astype(np.float32))
        for s in (1.0, 0.5, 3.0, 1.5)
    ]


def _paddle_table(model, act, weight):
    ptq = PaddlePTQ(PaddlePTQConfig(act, weight))
    qmodel = ptq.quantize(copy.deepcopy(model))
    with paddle.no_grad():
        for batch in _model_batches():
            qmodel(batch)
    ptq._cal_thresholds(qmodel)
    table = {}
    for name, layer in qmodel.named_sublayers():
        config = getattr(layer, "_quant_config", None)
        if config is None:
            continue
        entry = {"output": list(config.out_act_quantizer.thresholds)}
        if config.enable_in_act_quantizer:
            entry["input"] = list(config.in_act_quantizer.thresholds)
            weight = config.wt_quantizer.thresholds[0]
            entry["weight"] = list(weight) if isinstance(weight, list) else [weight]
        table[name] = entry
    return table


def _our_table(model, act, weight):
    ptq = ImperativePTQ(PTQConfig(act, weight))
    qmodel = ptq.quantize(model)
    with paddle.no_grad():
        for batch in _model_batches():
            qmodel(batch)
    return ptq.calibration_table(qmodel)


@pytest.mark.parametrize(
    "ours_weight, theirs_weight",
    [
        (PerChannelAbsmaxQuantizer, paddle_q.PerChannelAbsmaxQuantizer),
        (AbsmaxQuantizer, paddle_q.AbsmaxQuantizer),
    ],
    ids=["per_channel", "per_tensor"],
)
def test_model_abs_max_thresholds_equal_paddle(ours_weight, theirs_weight) -> None:
    model = _model()
    theirs = _paddle_table(model, paddle_q.AbsmaxQuantizer(), theirs_weight())
    ours = _our_table(model, AbsmaxQuantizer(), ours_weight())
    assert set(theirs) == set(ours)
    for name, entry in theirs.items():
        assert ours[name] == entry, name


def test_model_kl_thresholds_match_paddle() -> None:
    model = _model()
    theirs = _paddle_table(model, paddle_q.KLQuantizer(), paddle_q.PerChannelAbsmaxQuantizer())
    exact = _our_table(model, KLQuantizer(exact_binning=True), PerChannelAbsmaxQuantizer())
    default = _our_table(model, KLQuantizer(), PerChannelAbsmaxQuantizer())
    fast = _our_table(model, KLQuantizer(exact_binning=False), PerChannelAbsmaxQuantizer())
    for name, entry in theirs.items():
        assert exact[name] == entry and default[name] == entry, name
        assert fast[name].get("weight") == entry.get("weight"), name
        for role in ("input", "output"):
            if role in entry:
                np.testing.assert_allclose(fast[name][role], entry[role], rtol=0.02, err_msg=name)
