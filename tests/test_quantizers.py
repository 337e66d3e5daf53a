"""Every calibration algorithm against a slow, obviously-right reference written here.

The package's quantizers are vectorized; the references below are plain loops that follow the
published algorithm (or Paddle's source) line by line. Exact agreement is required wherever both
sides do the same arithmetic; where only the order of floating-point operations differs, the
reference's objective value at our choice must equal its minimum up to rounding.
"""

from __future__ import annotations

import math

import numpy as np
import paddle
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paddle.static.quantization.cal_kl_threshold import cal_kl_threshold

from imperative_ptq import (
    AbsmaxQuantizer,
    HistQuantizer,
    KLQuantizer,
    MovingAverageAbsmaxQuantizer,
    MSEQuantizer,
    PerChannelAbsmaxQuantizer,
    TensorRTKLQuantizer,
)
from imperative_ptq.quant_layers import fake_quantize_symmetric
from imperative_ptq.quantizers import TensorSample
from imperative_ptq.quantizers.hist import percentile_threshold
from imperative_ptq.quantizers.histogram import HistogramState
from imperative_ptq.quantizers.kl import paddle_kl_threshold
from imperative_ptq.quantizers.kl_tensorrt import tensorrt_kl_threshold
from imperative_ptq.quantizers.mse import mse_threshold

HYPOTHESIS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _tensor(array: np.ndarray) -> paddle.Tensor:
    return paddle.to_tensor(np.asarray(array, dtype=np.float32))


def _calibrate(quantizer, batches) -> float:
    for batch in batches:
        quantizer.sample_data(None, (_tensor(batch),))
    quantizer.cal_thresholds()
    (threshold,) = quantizer.thresholds
    return threshold


# ------------------------------------------------------------------------------ references
def ref_abs_max(batches) -> float:
    best = 0.0
    for batch in batches:
        for value in np.asarray(batch, dtype=np.float32).ravel().tolist():
            if math.isfinite(value):
                best = max(best, abs(value))
    return best


def ref_per_channel(weight: np.ndarray, axis: int) -> list[float]:
    return [float(np.max(np.abs(np.take(weight, c, axis=axis)))) for c in range(weight.shape[axis])]


def ref_combine(batches, bins: int, upsample_bins: int):
    """Paddle's ``BaseHistQuantizer.sample_data`` + ``combine_abs_max_and_hist``, re-typed."""
    origin_max, origin_hist = 0.0, None
    for batch in batches:
        data = np.abs(np.asarray(batch, dtype=np.float32))
        new_max = float(np.max(data))
        if new_max == 0.0:
            continue
        if origin_max == 0.0:
            hist, _ = np.histogram(data, range=(0, new_max), bins=bins)
            origin_max, origin_hist = new_max, hist.astype(np.float32)
        elif new_max <= origin_max:
            hist, _ = np.histogram(data, range=(0, origin_max), bins=bins)
            hist = hist.astype(np.float32)
            hist += origin_hist
            origin_hist = hist
        else:
            bin_width = origin_max / (bins * upsample_bins)
            downsample_bins = int(math.ceil(new_max / (bins * bin_width)))
            new_max = bins * bin_width * downsample_bins
            upsampled = np.repeat(origin_hist, upsample_bins)
            expanded = np.zeros(bins * downsample_bins, dtype=np.float32)
            expanded[: bins * upsample_bins] = upsampled
            cumsumed = np.cumsum(expanded, dtype=np.float64)[downsample_bins - 1 :: downsample_bins]
            shifted = np.zeros(bins, dtype=np.float64)
            shifted[1:] = cumsumed[:-1]
            sampled = ((cumsumed - shifted) / upsample_bins).astype(np.float32)
            hist, _ = np.histogram(data, range=(0, new_max), bins=bins)
            hist = hist.astype(np.float32)
            hist += sampled
            origin_max, origin_hist = new_max, hist
    return origin_max, origin_hist


def ref_percentile(counts: np.ndarray, bin_width: float, percent: float) -> float:
    total = np.sum(counts, dtype=np.float64)
    cumulative = 0.0
    for k, count in enumerate(counts.tolist()):
        cumulative += count / total
        if cumulative >= percent:
            return max(k - 0.5, 0.5) * bin_width
    return (len(counts) - 1 - 0.5) * bin_width


def ref_tensorrt_divergences(counts: np.ndarray, quant_bits: int) -> dict[int, float]:
    """TensorRT entropy calibration, literally: KL(P || Q) for each candidate length ``i``."""
    hist = [float(c) for c in counts]
    levels = 2 ** (quant_bits - 1)
    divergences = {}
    for i in range(levels, len(hist) + 1):
        if hist[i - 1] == 0:
            continue
        p = hist[:i]
        p[i - 1] += sum(hist[i:])
        merged = i // levels
        q = [0.0] * i
        for level in range(levels):
            start = level * merged
            end = i if level == levels - 1 else start + merged
            group = hist[start:end]
            nonzero = sum(1 for v in group if v != 0)
            for j in range(start, end):
                q[j] = sum(group) / nonzero if hist[j] != 0 else 0.0
        p_sum, q_sum = sum(p), sum(q)
        kl = 0.0
        for pj, qj in zip(p, q):
            if pj > 0:
                kl += pj / p_sum * math.log((pj / p_sum) / (qj / q_sum))
        divergences[i] = kl
    return divergences


def ref_mse_errors(counts: np.ndarray, bin_width: float, quant_bits: int) -> list[float]:
    """Expected squared error of clipping at each bin edge ``k * bin_width``, k = 1..bins."""
    levels = 2 ** (quant_bits - 1) - 1 if quant_bits > 1 else 1
    errors = []
    for k in range(1, len(counts) + 1):
        clip = k * bin_width
        step = clip / levels
        error = 0.0
        for b, count in enumerate(counts.tolist()):
            centre = (b + 0.5) * bin_width
            if centre <= clip:
                error += count * step**2 / 12.0
            else:
                error += count * (centre - clip) ** 2
        errors.append(error)
    return errors


def ref_moving_average(batches, momentum: float) -> float:
    accum = state = 0.0
    for batch in batches:
        accum = momentum * accum + ref_abs_max([batch])
        state = momentum * state + 1.0
    return accum / state


# --------------------------------------------------------------------------- test inputs
def _batches(seed: int, scales=(1.0, 0.5, 3.0, 10.0), shape=(4, 3, 8, 8)):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) * s).astype(np.float32) for s in scales]


def _histograms():
    """Histograms of many shapes, as ``(name, counts)``."""
    rng = np.random.default_rng(11)
    cases = []
    for bins in (256, 512, 1024):
        for name, data in (
            ("normal", rng.standard_normal(20000)),
            ("laplace", rng.laplace(size=20000)),
            ("cauchy", np.clip(rng.standard_cauchy(20000), -50, 50)),
            ("relu", np.maximum(rng.standard_normal(20000), 0)),
            ("sparse", rng.integers(0, 40, 3000) * 0.37),
            ("exponential", rng.exponential(size=5000)),
        ):
            data = np.abs(data).astype(np.float32)
            hist, _ = np.histogram(data, bins=bins, range=(0.0, float(data.max())))
            cases.append((f"{name}-{bins}", hist.astype(np.float32)))
            cases.append((f"{name}-{bins}/64", (hist / 64.0).astype(np.float32)))
    # Few large counts among many zeros, and every candidate's last bin empty (the fallback).
    spiky = np.zeros(512, dtype=np.float32)
    spiky[rng.integers(0, 512, 30)] = rng.integers(1, 1000, 30)
    cases.append(("spiky", spiky))
    fallback = np.zeros(512, dtype=np.float32)
    fallback[:100] = rng.integers(0, 50, 100)
    fallback[-1] = 3
    cases.append(("fallback", fallback))
    return cases


HISTOGRAMS = _histograms()


# ---------------------------------------------------------------------------- abs-max
def test_abs_max_matches_loop() -> None:
    batches = _batches(1)
    batches[1].ravel()[5] = np.nan
    batches[2].ravel()[7] = -np.inf
    assert _calibrate(AbsmaxQuantizer(), batches) == ref_abs_max(batches)


@pytest.mark.parametrize(
    "layer, axis",
    [
        (lambda: paddle.nn.Conv2D(4, 6, 3), 0),
        (lambda: paddle.nn.Conv2D(4, 8, 3, groups=2), 0),
        (lambda: paddle.nn.Conv2D(4, 4, 3, groups=4), 0),  # depthwise: weight [4, 1, 3, 3]
        (lambda: paddle.nn.Linear(5, 7), 1),
        (lambda: paddle.nn.Conv2DTranspose(4, 6, 3), 1),
        (lambda: paddle.nn.Conv1D(3, 5, 3), 0),
    ],
    ids=["conv2d", "grouped", "depthwise", "linear", "conv2d_transpose", "conv1d"],
)
def test_per_channel_abs_max_matches_loop(layer, axis: int) -> None:
    layer = layer()
    quantizer = PerChannelAbsmaxQuantizer()
    quantizer.sample_data(layer, (layer.weight,))
    quantizer.cal_thresholds()
    expected = ref_per_channel(layer.weight.numpy(), axis)
    assert len(expected) == (layer.weight.shape[axis])
    assert quantizer.thresholds == [expected]


def test_moving_average_abs_max_matches_loop() -> None:
    batches = _batches(2, scales=(1.0, 5.0, 0.2, 2.0, 0.7))
    for momentum in (0.0, 0.5, 0.9):
        got = _calibrate(MovingAverageAbsmaxQuantizer(momentum=momentum), batches)
        assert got == pytest.approx(ref_moving_average(batches, momentum), rel=1e-12)
    # The bias correction makes the first batch's threshold its own abs-max.
    assert _calibrate(MovingAverageAbsmaxQuantizer(), batches[:1]) == ref_abs_max(batches[:1])


# ---------------------------------------------------------------------------- histograms
@pytest.mark.parametrize("bins, upsample_bins", [(1024, 64), (100, 8), (37, 3)])
def test_histogram_merging_matches_paddle_loop_exactly(bins: int, upsample_bins: int) -> None:
    rng = np.random.default_rng(bins)
    batches = _batches(3, scales=(1.0, 0.0, 0.5, 3.0, 3.0, 40.0, 2.0))
    batches.append(np.abs(rng.standard_cauchy((2, 50))).astype(np.float32))
    state = HistogramState()
    for batch in batches:
        state.merge_sample(TensorSample.from_tensor(_tensor(batch)), bins, upsample_bins, True)
    upper, counts = ref_combine(batches, bins, upsample_bins)
    assert state.upper == upper
    np.testing.assert_array_equal(state.counts, counts)


def test_fast_binning_differs_only_near_edges() -> None:
    batches = _batches(4, shape=(16, 3, 16, 16))
    state = HistogramState()
    for batch in batches:
        state.merge_sample(TensorSample.from_tensor(_tensor(batch)), 1024, 64, False)
    upper, counts = ref_combine(batches, 1024, 64)
    assert state.upper == upper
    assert np.sum(np.abs(state.counts - counts)) <= 1e-4 * sum(b.size for b in batches)


def test_hist_percentile_matches_loop() -> None:
    for _, counts in HISTOGRAMS[:12]:
        for percent in (0.5, 0.9, 0.999, 0.99999):
            width = 0.01
            assert percentile_threshold(counts, width, percent) == ref_percentile(
                counts, width, percent
            )
    # The first bin holds the percentile: the centre of bin 0, never Paddle's negative value.
    counts = np.array([90, 5, 5] + [0] * 7, dtype=np.float32)
    assert percentile_threshold(counts, 0.1, 0.8) == pytest.approx(0.05)


def test_hist_quantizer_end_to_end_matches_loop() -> None:
    batches = _batches(5)
    upper, counts = ref_combine(batches, 1024, 64)
    got = _calibrate(HistQuantizer(hist_percent=0.999, exact_binning=True), batches)
    assert got == ref_percentile(counts, upper / 1024, 0.999)


# ------------------------------------------------------------------------------------- KL
@pytest.mark.parametrize("name, counts", HISTOGRAMS, ids=[name for name, _ in HISTOGRAMS])
def test_paddle_kl_bit_for_bit(name: str, counts: np.ndarray) -> None:
    bin_width = 0.0123
    for quant_bits in (8, 7) if counts.shape[0] >= 512 else (8,):
        expected = cal_kl_threshold(counts, bin_width, quant_bits)
        assert paddle_kl_threshold(counts, bin_width, quant_bits) == expected, quant_bits


@pytest.mark.parametrize("quant_bits", [4, 5, 6, 7, 8])
def test_paddle_kl_bit_for_bit_all_bit_widths(quant_bits: int) -> None:
    rng = np.random.default_rng(quant_bits)
    for trial in range(6):
        bins = int(rng.integers(2 ** quant_bits + 1, 700))
        data = np.abs(rng.standard_normal(5000) * rng.uniform(0.1, 10)).astype(np.float32)
        if trial % 2:
            data = np.abs(rng.laplace(size=3000)).astype(np.float32)
        counts, _ = np.histogram(data, bins=bins, range=(0.0, float(data.max())))
        counts = counts.astype(np.float32) / (64.0 if trial % 3 == 0 else 1.0)
        width = float(data.max()) / bins
        assert paddle_kl_threshold(counts, width, quant_bits) == cal_kl_threshold(
            counts, width, quant_bits
        )


def test_paddle_kl_on_merged_histograms() -> None:
    """Histograms produced by the merge path (fractional counts) go through KL unchanged."""
    for seed in range(4):
        batches = _batches(20 + seed, scales=(1.0, 2.0, 7.0))
        upper, counts = ref_combine(batches, 1024, 64)
        got = _calibrate(KLQuantizer(exact_binning=True), batches)
        assert got == cal_kl_threshold(counts, upper / 1024, 8)


@pytest.mark.parametrize("name, counts", HISTOGRAMS[::5], ids=[n for n, _ in HISTOGRAMS[::5]])
def test_tensorrt_kl_matches_loop(name: str, counts: np.ndarray) -> None:
    counts = counts[:300]  # the literal loop is quadratic
    width = 0.5
    divergences = ref_tensorrt_divergences(counts, 8)
    got = tensorrt_kl_threshold(counts, width, 8)
    if not divergences:
        assert got == counts.shape[0] * width
        return
    best = min(divergences.values())
    index = int(round(got / width - 0.5))
    assert index in divergences
    # Same candidate, or one whose divergence ties the minimum up to rounding.
    assert divergences[index] <= best + 1e-9 * max(1.0, abs(best))
    if sorted(divergences.values())[1] - best > 1e-7:
        assert index == min(divergences, key=divergences.get)


def test_tensorrt_kl_starts_at_128_bins() -> None:
    rng = np.random.default_rng(3)
    data = np.abs(rng.laplace(size=20000)).astype(np.float32)
    counts, _ = np.histogram(data, bins=2048, range=(0.0, float(data.max())))
    counts = counts.astype(np.float32)
    width = float(data.max()) / 2048
    trt = tensorrt_kl_threshold(counts, width, 8)
    assert trt >= 128 * width
    assert trt < paddle_kl_threshold(counts, width, 8)  # Paddle never searches below half


# ------------------------------------------------------------------------------------ MSE
@pytest.mark.parametrize("quant_bits", [1, 2, 4, 8])
def test_mse_matches_brute_force(quant_bits: int) -> None:
    for _, counts in HISTOGRAMS[2:40:6]:
        counts = counts[::4]  # 64..256 bins keep the brute force quick
        width = 0.03
        errors = ref_mse_errors(counts, width, quant_bits)
        got = mse_threshold(counts, width, quant_bits)
        k = int(round(got / width))
        assert errors[k - 1] <= min(errors) * (1 + 1e-9) + 1e-12
        assert k - 1 == int(np.argmin(errors)) or errors[k - 1] <= min(errors) * (1 + 1e-9)


# ---------------------------------------------------------------------------- golden values
GOLDEN = {
    "absmax": 16.193050384521484,
    "moving_average": 7.481006659264934,
    "hist": 10.580782676115632,
    "kl": 13.180405685678124,
    "tensorrt_kl": 13.180405685678124,
    "mse": 14.599102389067411,
}


def _golden_quantizers():
    return {
        "absmax": AbsmaxQuantizer(),
        "moving_average": MovingAverageAbsmaxQuantizer(),
        "hist": HistQuantizer(hist_percent=0.999),
        "kl": KLQuantizer(),
        "tensorrt_kl": TensorRTKLQuantizer(),
        "mse": MSEQuantizer(),
    }


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_thresholds(name: str) -> None:
    batches = _batches(2024, scales=(1.0, 0.25, 4.0), shape=(8, 4, 16, 16))
    batches = [np.where(b > -1.0, b, 0.1 * b) for b in batches]  # skewed, heavy left tail
    got = _calibrate(_golden_quantizers()[name], batches)
    assert got == pytest.approx(GOLDEN[name], rel=1e-12, abs=0)


def test_golden_per_channel() -> None:
    paddle.seed(7)
    conv = paddle.nn.Conv2D(2, 3, 3)
    weight = np.arange(54, dtype=np.float32).reshape(3, 2, 3, 3) % 7 - 3.5
    conv.weight.set_value(weight)
    quantizer = PerChannelAbsmaxQuantizer()
    quantizer.sample_data(conv, (conv.weight,))
    quantizer.cal_thresholds()
    assert quantizer.thresholds == [[3.5, 3.5, 3.5]]
    linear = paddle.nn.Linear(3, 2)
    linear.weight.set_value(np.array([[1, -5], [2, 0.5], [-3, 4]], dtype=np.float32))
    quantizer = PerChannelAbsmaxQuantizer()
    quantizer.sample_data(linear, (linear.weight,))
    quantizer.cal_thresholds()
    assert quantizer.thresholds == [[3.0, 5.0]]


# -------------------------------------------------------------------------------- properties
@HYPOTHESIS
@given(
    seed=st.integers(0, 2**32 - 1),
    size=st.integers(1, 200),
    threshold=st.floats(1e-3, 1e3),
    bits=st.integers(2, 16),
)
def test_fake_quantize_error_within_half_step(seed, size, threshold, bits) -> None:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-threshold, threshold, size).astype(np.float32)
    x[0] = threshold if size > 1 else x[0]
    out = fake_quantize_symmetric(_tensor(x), _tensor([threshold]), bits).numpy()
    scale = np.float32(threshold) / (2 ** (bits - 1) - 1)
    error = np.abs(out.astype(np.float64) - x)
    assert np.all(error <= scale / 2 + 1e-6 * threshold)


@HYPOTHESIS
@given(
    seed=st.integers(0, 2**32 - 1),
    scales=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=5),
    bins=st.sampled_from([64, 128, 256]),
)
def test_merged_histogram_close_to_single_pass(seed, scales, bins) -> None:
    rng = np.random.default_rng(seed)
    batches = [(rng.standard_normal(500) * s).astype(np.float32) for s in scales]
    state = HistogramState()
    for batch in batches:
        state.merge_sample(TensorSample.from_tensor(_tensor(batch)), bins, 16, True)
    everything = np.abs(np.concatenate(batches))
    assert state.upper >= everything.max()
    assert float(np.sum(state.counts, dtype=np.float64)) == pytest.approx(everything.size, rel=1e-5)
    single, _ = np.histogram(everything, bins=bins, range=(0.0, state.upper))
    width = state.upper / bins
    # Re-binning spreads an old bin (never wider than a new one) over at most two new
    # ones, so the merged cumulative distribution is off by at most the mass of two
    # adjacent bins. In a sparse tail that small error can move a percentile by many
    # bins, so the bound is on the percent, not on the threshold.
    slack = float(np.max(single[:-1] + single[1:])) / everything.size
    single_f32 = single.astype(np.float32)
    for percent in (0.5, 0.9, 0.99):
        merged_t = percentile_threshold(state.counts, width, percent)
        low = percentile_threshold(single_f32, width, max(percent - slack, 0.0))
        high = percentile_threshold(single_f32, width, min(percent + slack, 1.0))
        assert low - width <= merged_t <= high + width


@HYPOTHESIS
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    axis=st.integers(0, 3),
)
def test_per_channel_max_equals_per_tensor(seed, shape, axis) -> None:
    from imperative_ptq.quantizers.per_channel_absmax import per_channel_abs_max

    axis %= len(shape)
    weight = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    per_channel = per_channel_abs_max(_tensor(weight), axis)
    assert per_channel.shape == (shape[axis],)
    np.testing.assert_array_equal(per_channel, ref_per_channel(weight, axis))
    per_tensor = _calibrate(AbsmaxQuantizer(), [weight])
    assert per_channel.max() == per_tensor


def test_exact_histogram_equals_numpy_on_edge_values() -> None:
    """Values sitting on, and one ulp either side of, every float32 bin edge: the worst case
    for ``paddle.histogram`` vs ``np.histogram``; the corrected counts equal numpy's."""
    from imperative_ptq.quantizers.sample import exact_histogram

    rng = np.random.default_rng(7)
    for bins, upper in ((1024, 3.7), (2048, 0.013), (64, 1234.5)):
        edges = np.linspace(0.0, upper, bins + 1, dtype=np.float32)
        values = np.concatenate([
            edges, np.nextafter(edges, np.float32(0)), np.nextafter(edges, np.float32(1e9)),
            rng.uniform(0, upper, 5000).astype(np.float32), [np.nan, np.inf],
        ]).astype(np.float32)
        expected, _ = np.histogram(values[np.isfinite(values)], range=(0.0, upper), bins=bins)
        counts = exact_histogram(paddle.to_tensor(values), bins, upper)
        np.testing.assert_array_equal(counts, expected)


def test_rebin_histogram_for_a_range_far_larger_than_before_matches_the_sub_bin_sum() -> None:
    """The integrating branch (no sub-bin array) against the obvious one, and a range 1e30
    times the previous one, where the sub-bin edges no longer fit in int64."""
    from imperative_ptq.quantizers.histogram import rebin_histogram

    counts = np.random.default_rng(0).integers(0, 50, 256).astype(np.float32)
    upsample, downsample = 64, 20_000  # 256 * 20000 sub-bins: past the materializing limit
    sub_bins = np.zeros(256 * downsample, dtype=np.float64)
    sub_bins[: 256 * upsample] = np.repeat(counts.astype(np.float64) / upsample, upsample)
    reference = sub_bins.reshape(256, downsample).sum(axis=1)
    np.testing.assert_allclose(rebin_histogram(counts, upsample, downsample), reference, rtol=1e-6)
    huge = rebin_histogram(counts, upsample, 10**32)
    assert huge[0] == pytest.approx(counts.sum()) and not huge[1:].any()
    for algorithm in (KLQuantizer, HistQuantizer):
        quantizer = algorithm()
        quantizer.sample_data(None, (paddle.to_tensor(np.linspace(0, 1, 1000, dtype=np.float32)),))
        quantizer.sample_data(None, (paddle.to_tensor(np.array([1e30], np.float32)),))
        quantizer.cal_thresholds()
        assert math.isfinite(quantizer.thresholds[0]) and quantizer.thresholds[0] > 0
        assert quantizer.state_dict()["counts"].sum() == pytest.approx(1001)


# ------------------------------------------------------------------ the algorithm tables
def _concrete_quantizer_classes() -> set[type]:
    import inspect

    from imperative_ptq.quantizers import BaseQuantizer

    found, pending = set(), [BaseQuantizer]
    while pending:
        for sub in pending.pop().__subclasses__():
            pending.append(sub)
            if not inspect.isabstract(sub) and sub.__module__.startswith("imperative_ptq."):
                found.add(sub)
    return found


def test_algorithm_tables_name_every_quantizer_and_follow_its_flags() -> None:
    from imperative_ptq.quantizers import ACTIVATION_QUANTIZERS, QUANTIZERS, WEIGHT_QUANTIZERS

    named = set(QUANTIZERS.values())
    # Bases that only share code are not algorithms.
    from imperative_ptq.quantizers.per_channel_absmax import PerChannelWeightQuantizer

    assert _concrete_quantizer_classes() - {PerChannelWeightQuantizer} == named
    assert set(ACTIVATION_QUANTIZERS.values()) == {c for c in named if c.for_activations}
    assert set(WEIGHT_QUANTIZERS.values()) == {c for c in named if c.for_weights}
    assert WEIGHT_QUANTIZERS["min_max"].__name__ == "MinMaxQuantizer"


@pytest.mark.parametrize("scheme", ["abs_max", "min_max", "per_channel", "per_channel_min_max"])
def test_every_weight_scheme_of_the_table_calibrates_and_converts(scheme: str) -> None:
    from imperative_ptq import ImperativePTQ, PTQConfig
    from imperative_ptq.quantizers import WEIGHT_QUANTIZERS

    paddle.seed(5)
    model = paddle.nn.Sequential(paddle.nn.Linear(8, 16), paddle.nn.ReLU(), paddle.nn.Linear(16, 4))
    model.eval()
    x = paddle.rand([32, 8])
    ptq = ImperativePTQ(PTQConfig(AbsmaxQuantizer(), WEIGHT_QUANTIZERS[scheme]()))
    qmodel = ptq.quantize(model)
    qmodel(x)
    ptq.convert(qmodel)
    expected, got = model(x).numpy().ravel(), qmodel(x).numpy().ravel()
    cosine = expected @ got / np.linalg.norm(expected) / np.linalg.norm(got)
    assert cosine > 0.99, (scheme, cosine)  # 8-bit per-tensor weights of a random net: ~0.997


# ------------------------------------------------- per-channel quantizers, base contract
@pytest.mark.parametrize("name", ["per_channel", "per_channel_min_max"])
def test_per_channel_quantizers_keep_the_base_contract(name: str) -> None:
    """``observe`` works (on the channel axis), ``BaseQuantizer`` counts the batches, and a
    tensor with other channels is refused before the statistics change."""
    from imperative_ptq.quantizers import QUANTIZERS

    layer = paddle.nn.Conv2D(3, 6, 3)
    weights = [paddle.randn([6, 3, 3, 3]) for _ in range(3)]
    via_layer, via_samples = QUANTIZERS[name](), QUANTIZERS[name]()
    for weight in weights:
        via_layer.sample_data(layer, (weight,))
    via_samples.channel_axis = 0
    for weight in weights:
        via_samples.observe_samples(
            [TensorSample.from_tensor(weight, via_samples.uses_signed_values)]
        )
    assert via_layer.num_batches == via_samples.num_batches == 3
    via_layer.cal_thresholds()
    via_samples.cal_thresholds()
    reference = np.max([np.abs(w.numpy()).reshape(6, -1).max(axis=1) for w in weights], axis=0)
    np.testing.assert_allclose(via_layer.thresholds[0], reference, rtol=1e-6)
    assert via_samples.thresholds == via_layer.thresholds

    before = via_layer.state_dict()
    with pytest.raises(ValueError, match="channels"):
        via_layer.sample_data(paddle.nn.Conv2D(3, 4, 3), (paddle.randn([4, 3, 3, 3]),))
    after = via_layer.state_dict()
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[key], after[key]) for key in before)

    fresh = QUANTIZERS[name]()
    with pytest.raises(ValueError, match="channel axis"):
        fresh.observe_samples([TensorSample.from_tensor(weights[0], True)])


def test_histogram_quantizer_accepts_numpy_bool() -> None:
    assert KLQuantizer(exact_binning=np.bool_(False)).exact_binning is False
    with pytest.raises(TypeError, match="exact_binning"):
        KLQuantizer(exact_binning=1)
