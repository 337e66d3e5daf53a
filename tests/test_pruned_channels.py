"""Convs with pruned (all-zero) filters, as pruned and distilled models ship them.

Any weight threshold represents a channel of zeros, but ONNX Runtime adds the channel's bias
on the int32 grid of input x weight scale: on the tiny threshold calibration gives such a
channel the bias saturated. ``QuantizedLayer`` gives pruned channels the layer's largest
threshold instead. A near-dead channel (weights or BatchNorm scale ~1e-8 beside its bias) keeps
its tiny grid: the ONNX export adds its conv's bias in float after the conv."""

from __future__ import annotations

import numpy as np
import paddle
import pytest
from paddle import nn

import imperative_ptq as ip
from imperative_ptq.quant_layers import QuantizedLayer, zero_channel_thresholds
from ties import assert_both_runtimes_compute_the_simulation

PRUNED = [2, 5]


class _PrunedNet(nn.Layer):
    """A conv with two pruned filters and a bias, read by a ReLU6 written as x2paddle writes an
    ONNX ``Clip`` (``paddle.clip`` with tensor bounds, a float op in both runtimes), then a
    1x1 conv."""

    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2D(3, 8, 3, padding=1, bias_attr=not norm)
        self.norm = nn.BatchNorm2D(8) if norm else None
        self.head = nn.Conv2D(8, 4, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        features = self.conv(x) if self.norm is None else self.norm(self.conv(x))
        clipped = paddle.clip(features, min=paddle.full([1], 0.0), max=paddle.full([1], 6.0))
        return self.head(clipped)


BIAS = np.array([0.3, 0.1, 0.5, -0.2, 0.25, 0.7, 0.05, 0.4], np.float32)


def _pruned_net(kind: str = "pruned") -> nn.Layer:
    """``kind``: ``"pruned"`` (filters ``PRUNED`` all zero), ``"near-dead weights"`` (those
    filters times 1e-8) or ``"near-dead norm"`` (a BatchNorm with scale 1e-9 on them)."""
    paddle.seed(0)
    model = _PrunedNet(norm=kind == "near-dead norm")
    if kind == "near-dead norm":
        gamma = np.ones([8], np.float32)
        gamma[PRUNED] = 1e-9
        model.norm.weight.set_value(gamma)
        model.norm.bias.set_value(BIAS)
    else:
        weight = model.conv.weight.numpy()
        weight[PRUNED] = 0.0 if kind == "pruned" else weight[PRUNED] * 1e-8
        model.conv.weight.set_value(weight)
        model.conv.bias.set_value(BIAS)
    model.eval()
    return model


def _runtimes_agree_with_simulation(model: nn.Layer, target: str, tmp_path) -> nn.Layer:
    """Quantizes, exports and runs ``model`` in Paddle Inference and ONNX Runtime, each
    checked against the simulation on four inputs; returns the converted model."""
    pytest.importorskip("onnxruntime")
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=target))
    quantized = ptq.quantize(model)
    rng = np.random.default_rng(0)
    for _ in range(4):
        quantized(paddle.to_tensor(rng.random((1, 3, 16, 16), dtype=np.float32)))
    ptq.convert(quantized)
    spec = [paddle.static.InputSpec([1, 3, 16, 16], "float32", "x")]
    inputs = [rng.random((1, 3, 16, 16), dtype=np.float32) for _ in range(4)]
    assert_both_runtimes_compute_the_simulation(ptq, quantized, spec, inputs, tmp_path)
    return quantized


def test_pruned_channels_take_the_largest_threshold() -> None:
    weight = np.arange(24, dtype=np.float32).reshape(4, 6) - 10.0
    weight[1] = 0.0
    thresholds = np.array([10.0, 1e-30, 3.0, 13.0], np.float32)
    assert zero_channel_thresholds(weight, thresholds, 0).tolist() == [10.0, 13.0, 3.0, 13.0]
    # a Linear's [in, out] weight: its channels are the columns
    assert zero_channel_thresholds(weight.T.copy(), thresholds, 1).tolist() == [10.0, 13.0, 3.0, 13.0]
    # nothing pruned, everything pruned, one threshold: unchanged
    for kept_weight, kept in ((weight + 100.0, thresholds), (np.zeros_like(weight), thresholds),
                              (weight, np.array([13.0], np.float32))):
        assert zero_channel_thresholds(kept_weight, kept, 0).tolist() == kept.tolist()


@pytest.mark.parametrize("target", ["x86", "x86-vnni"])
def test_pruned_filters_run_as_simulated_in_both_runtimes(target: str, tmp_path) -> None:
    quantized = _runtimes_agree_with_simulation(_pruned_net(), target, tmp_path)
    conv = quantized.conv
    assert isinstance(conv, QuantizedLayer)
    thresholds = conv.weight_thresholds.numpy()
    assert np.all(thresholds[PRUNED] == thresholds.max())
    assert conv.bias_on_grid is not None  # the whole layer's bias fits ONNX Runtime's int32 grid


@pytest.mark.parametrize("kind", ["near-dead weights", "near-dead norm"])
def test_near_dead_filters_run_as_simulated_in_both_runtimes(kind: str, tmp_path) -> None:
    # Their biases are ~1e10 steps of the int32 grid: ONNX Runtime saturated them (0.41 of
    # the largest output off) where its optimizer quantizes a float conv's bias itself.
    _runtimes_agree_with_simulation(_pruned_net(kind), "x86", tmp_path)
