"""Layers reading a softmax's output keep the largest value calibration saw as their input
threshold (``imperative_ptq.probabilities``): a distribution focal loss head's 1x1 conv (YOLOv8,
PP-YOLOE), an attention matmul of the weights and the values. A KL search clipped the
confident probabilities there."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.session import hooked_states
from ties import assert_both_runtimes_compute_the_simulation

nn = paddle.nn
F = nn.functional

BINS = 16


class _DistributionHead(nn.Layer):
    """YOLOv8's box head: a conv predicting ``4 x BINS`` logits per position, a softmax over the
    bins and a 1x1 conv with weights ``0 .. BINS - 1`` (the expected bin of each box side).
    ``softmax``: ``"layer"`` (``nn.Softmax``, as x2paddle writes it), ``"functional"`` or
    ``"method"`` (PyTorch-style ``x.softmax(1)``, as YOLOv8's code reads ported)."""

    def __init__(self, softmax: str) -> None:
        super().__init__()
        self.pred = nn.Conv2D(8, 4 * BINS, 3, padding=1)
        # Trained heads are confident: most positions put most of the mass on one bin or two.
        self.pred.weight.set_value(self.pred.weight * 6.0)
        self.softmax = nn.Softmax(axis=1) if softmax == "layer" else None
        self.method = softmax == "method"
        self.project = nn.Conv2D(BINS, 1, 1, bias_attr=False)
        self.project.weight.set_value(paddle.arange(BINS, dtype="float32").reshape([1, BINS, 1, 1]))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        logits = self.pred(x).reshape([0, 4, BINS, -1]).transpose([0, 2, 1, 3])
        if self.softmax is not None:
            probabilities = self.softmax(logits)
        elif self.method:
            probabilities = logits.softmax(1)
        else:
            probabilities = F.softmax(logits, axis=1)
        return self.project(probabilities).squeeze(1)


def _inputs(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((2, 8, 8, 8)).astype("float32") for _ in range(count)]


def _calibrated(model: nn.Layer, target: str = "x86") -> tuple[ip.ImperativePTQ, nn.Layer]:
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=target))
    quantized = ptq.quantize(model)
    ptq.calibrate(quantized, _inputs(4, 0), progress=False)
    return ptq, quantized


def _input_quantizer(quantized: nn.Layer, name: str) -> ip.BaseQuantizer:
    """The input quantizer of the hooked layer ``name``: its algorithm's own threshold."""
    (state,) = [state for state in hooked_states(quantized) if state.name == name]
    return state.input_quantizer


def _largest_probability(model: _DistributionHead, batches: list[np.ndarray]) -> float:
    """The reference: the largest softmax output over the batches, computed here."""
    largest = 0.0
    for x in batches:
        logits = model.pred(paddle.to_tensor(x)).numpy().reshape(2, 4, BINS, -1)
        exp = np.exp(logits - logits.max(axis=2, keepdims=True))
        largest = max(largest, float((exp / exp.sum(axis=2, keepdims=True)).max()))
    return largest


@pytest.mark.parametrize("softmax", ["layer", "functional", "method"])
def test_a_conv_reading_probabilities_keeps_their_maximum(softmax: str) -> None:
    paddle.seed(0)
    model = _DistributionHead(softmax)
    model.eval()
    largest = _largest_probability(model, _inputs(4, 0))
    ptq, quantized = _calibrated(model)
    (threshold,) = ptq.calibration_table(quantized)["project"]["input"]
    # the histogram's last non-empty bin ends at most one bin (1/1024 of the range) above
    assert largest <= threshold <= largest * (1 + 1 / 1024) + 1e-12
    # (KL's own threshold clipped the confident probabilities: 0.52 on a YOLOv8n detector)
    kl = _input_quantizer(quantized, "project")
    kl.cal_thresholds()
    assert kl.thresholds[0] < 0.8 * largest
    ptq.convert(quantized)
    assert quantized.project.input_thresholds == [threshold]


def test_the_expected_bins_stay_close_to_fp32() -> None:
    """The point of it: the expectation each box side is decoded from."""
    paddle.seed(0)
    model = _DistributionHead("layer")
    model.eval()
    test = _inputs(4, 1)
    expected = [model(paddle.to_tensor(x)).numpy() for x in test]
    ptq, quantized = _calibrated(model)
    ptq.convert(quantized)
    errors = np.concatenate([
        np.abs(quantized(paddle.to_tensor(x)).numpy() - e).ravel() for x, e in zip(test, expected)
    ])
    # measured: mean 0.040 bins, largest 0.19 (u8 steps of 1/255 on 16 bins); on KL's
    # threshold (0.63) mean 1.74 bins, largest 5.6
    assert errors.mean() < 0.1 and errors.max() < 0.3


def test_a_layer_reading_other_inputs_too_keeps_its_algorithm_threshold() -> None:
    """Probabilities in one call, logits in another: not a probability input."""

    class _Shared(nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.pred = nn.Conv2D(8, BINS, 1)
            self.pred.weight.set_value(self.pred.weight * 6.0)
            self.project = nn.Conv2D(BINS, 1, 1)

        def forward(self, x: paddle.Tensor) -> paddle.Tensor:
            logits = self.pred(x)
            return self.project(F.softmax(logits, axis=1)) + self.project(logits)

    paddle.seed(0)
    model = _Shared()
    model.eval()
    ptq, quantized = _calibrated(model)
    quantizer = _input_quantizer(quantized, "project")
    quantizer.cal_thresholds()
    assert ptq.calibration_table(quantized)["project"]["input"] == quantizer.thresholds


def test_attention_weights_keep_their_maximum_through_dropout() -> None:
    """``nn.MultiHeadAttention`` (dropout 0.1, in eval) multiplies its weights by the values
    as a functional matmul: that matmul's first input is the weights."""
    paddle.seed(0)
    attention = nn.MultiHeadAttention(32, 4, dropout=0.1)
    model = nn.Sequential(attention)
    model.eval()
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((2, 64, 32)).astype("float32") * 1.5 for _ in range(3)]
    largest = 0.0
    for x in batches:
        q = attention.q_proj(paddle.to_tensor(x)).numpy().reshape(2, 64, 4, 8).transpose(0, 2, 1, 3)
        k = attention.k_proj(paddle.to_tensor(x)).numpy().reshape(2, 64, 4, 8).transpose(0, 2, 1, 3)
        scores = q @ k.transpose(0, 1, 3, 2) * 8 ** -0.5
        exp = np.exp(scores - scores.max(axis=-1, keepdims=True))
        largest = max(largest, float((exp / exp.sum(axis=-1, keepdims=True)).max()))
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer(), target="x86-vnni"))
    quantized = ptq.quantize(model)
    ptq.calibrate(quantized, [[paddle.to_tensor(x)] * 3 for x in batches], progress=False)
    table = ptq.calibration_table(quantized)
    (weighted,) = [name for name in table if name.endswith("activation_matmul_1")]
    (threshold,) = table[weighted]["input"]
    assert largest <= threshold <= largest * (1 + 1 / 1024) + 1e-12
    kl = _input_quantizer(quantized, weighted)
    kl.cal_thresholds()
    assert kl.thresholds[0] < 0.8 * largest  # measured: 0.62 of 1.0


@pytest.mark.parametrize("target", ["x86", "x86-vnni"])
def test_both_runtimes_compute_the_simulation(target: str, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    paddle.seed(0)
    model = _DistributionHead("layer")
    model.eval()
    ptq, quantized = _calibrated(model, target)
    ptq.convert(quantized)
    spec = [paddle.static.InputSpec([2, 8, 8, 8], "float32", "x")]
    assert_both_runtimes_compute_the_simulation(ptq, quantized, spec, _inputs(3, 2), tmp_path)


@pytest.mark.parametrize(
    "quantizer",
    [ip.KLQuantizer(), ip.HistQuantizer(), ip.MSEQuantizer(), ip.AbsmaxQuantizer(), ip.KLQuantizer(symmetric=False)],
    ids=["kl", "hist", "mse", "absmax", "kl-affine"],
)
def test_observed_maximum_is_the_largest_magnitude_seen(quantizer) -> None:
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((4, 100)).astype("float32") * scale for scale in (1.0, 3.0, 0.5)]
    for x in batches:
        quantizer.sample_data(None, (paddle.to_tensor(x),))
    largest = max(float(np.abs(x).max()) for x in batches)
    found = quantizer.observed_maximum(0)
    # a histogram's last non-empty bin ends at most one bin width above the largest value
    bin_width = largest / getattr(quantizer, "bins", np.inf)
    assert largest - 1e-6 * largest <= found <= largest + bin_width * (1 + 1e-6)
    assert quantizer.observed_maximum(1) is None  # no second tensor seen
