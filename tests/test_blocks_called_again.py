"""A layer called more than once in a forward, its calls reading different things: a conv of a
residual block called again on the block's output, a whole residual block applied two or three
times (weights and BatchNorms shared). Each call is quantized as Paddle Inference runs it: the
block's input on u8 codes up to ``L``, a fused conv's output up to 255, each sum's output on
the codes of its own readers; and each call's BatchNorm is folded into its conv."""

from __future__ import annotations

import copy
import json

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from imperative_ptq import ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig
from imperative_ptq.forward_calls import CallCounter, PerCallTopCodes, count_forwards
from imperative_ptq.quant_residual import ResidualSumOutput
from models import converted, largest_error_in_onnx_runtime, largest_error_in_paddle_inference

nn = paddle.nn
CHANNELS = 8


class _ConvReusedOnBlockOutput(nn.Layer):
    """``y = relu(conv(a) + a); conv(y)``: the first call reads ``a`` (also the residual), the
    second the fused conv's output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2D(CHANNELS, CHANNELS, 3, padding=1)
        self.conv = nn.Conv2D(CHANNELS, CHANNELS, 3, padding=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        a = F.relu(self.stem(x))
        return self.conv(F.relu(self.conv(a) + a)).flatten(1)


class _Block(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2D(CHANNELS, CHANNELS, 3, padding=1), nn.BatchNorm2D(CHANNELS)
        self.conv2, self.bn2 = nn.Conv2D(CHANNELS, CHANNELS, 3, padding=1), nn.BatchNorm2D(CHANNELS)
        self.relu = nn.ReLU()  # after bn1 and after the sum, as paddle.vision's blocks

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


class _BlockApplied(nn.Layer):
    """One residual block applied ``times`` times; ``head``: a pooled Linear reads the last
    output, else the network returns it."""

    def __init__(self, times: int, head: bool) -> None:
        super().__init__()
        self.stem, self.relu = nn.Conv2D(3, CHANNELS, 3, padding=1), nn.ReLU()
        self.block = _Block()
        self.times = times
        self.head = nn.Linear(CHANNELS, 10) if head else None
        for norm in (self.block.bn1, self.block.bn2):  # statistics of a trained network
            norm._mean.set_value(paddle.uniform([CHANNELS], min=-0.2, max=0.2))
            norm._variance.set_value(paddle.uniform([CHANNELS], min=0.5, max=1.5))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.relu(self.stem(x))
        for _ in range(self.times):
            x = self.block(x)
        return x.flatten(1) if self.head is None else self.head(x.mean([2, 3]))


def _batches(count: int, channels: int, seed: int) -> list[paddle.Tensor]:
    rng = np.random.default_rng(seed)
    return [paddle.to_tensor(rng.standard_normal((4, channels, 8, 8)).astype(np.float32)) for _ in range(count)]


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_a_conv_called_in_its_block_and_on_the_block_output(target, tmp_path) -> None:
    """Measured before (one largest input code for both calls): 2.9e-2 of the largest output
    off Paddle Inference, 2.8e-2 on x86-avx2."""
    paddle.seed(0)
    model = _ConvReusedOnBlockOutput()
    qmodel = converted(model, _batches(4, CHANNELS, 0), target)
    assert qmodel.conv.input_call_tops.tops == (127, 255)
    x = _batches(1, CHANNELS, 7)[0].numpy()
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) < 2e-6
    assert largest_error_in_onnx_runtime(qmodel, x, tmp_path, int8_residual_branches=False) < 2e-6


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
@pytest.mark.parametrize("times, head", [(2, False), (2, True), (3, True)])
def test_a_residual_block_applied_more_than_once(times, head, target, tmp_path) -> None:
    """Measured before, returning the second output: 0.20 of the largest output off Paddle
    Inference (its BatchNorms, read by two calls each, were left unfused: fp32 convs' outputs
    added in float), 9e-3 and 4e-2 with the head (per-call codes missing)."""
    paddle.seed(0)
    model = _BlockApplied(times, head)
    qmodel = converted(model, _batches(4, 3, 0), target)
    sums = qmodel.block.relu
    assert isinstance(sums, ResidualSumOutput)
    thresholds = [sums.call_thresholds[call] for call in range(1, 2 * times, 2)]  # the sums
    # Each sum but the last is read by the next application's conv1, the last by no int8 layer.
    assert thresholds[:-1] == [qmodel.block.conv1.input_thresholds[0]] * (times - 1)
    assert thresholds[-1] != thresholds[0]
    assert qmodel.block.conv1.input_call_tops.tops == (127,) + (255,) * (times - 1)
    x = _batches(1, 3, 7)[0].numpy()
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) < 2e-6
    assert largest_error_in_onnx_runtime(qmodel, x, tmp_path, int8_residual_branches=False) < 2e-6


def test_the_calls_are_recorded_in_the_table_and_convert_alike_from_it(tmp_path) -> None:
    paddle.seed(0)
    model = _BlockApplied(2, True)
    model.eval()
    config = PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer())
    ptq = ImperativePTQ(config)
    calibrated = ptq.quantize(model)
    ptq.calibrate(calibrated, _batches(4, 3, 0), progress=False)
    path = tmp_path / "table.json"
    ptq.save_calibration_table(calibrated, path)
    structure = json.loads(path.read_text())["structure"]
    assert structure["block.relu"]["calls_per_forward"] == 4
    assert structure["block.relu"]["sum_calls"] == [1, 3]
    assert structure["block.conv1"]["plain_input_calls"] == [0]
    assert structure["block.conv1"]["calls_per_forward"] == 2
    assert ["block.relu", 1] in structure["block.conv1"]["input_source_calls"]
    ptq.convert(calibrated)

    loading = ImperativePTQ(config)
    loaded = loading.quantize(model)
    loading.load_calibration_table(loaded, path)
    loading.convert(loaded)
    x = _batches(1, 3, 7)[0]
    np.testing.assert_array_equal(loaded(x).numpy(), calibrated(x).numpy())
    # A deep copy counts its calls per forward too.
    np.testing.assert_array_equal(copy.deepcopy(loaded)(x).numpy(), calibrated(x).numpy())


def test_a_forward_that_raises_midway_does_not_shift_the_next_forwards_calls() -> None:
    paddle.seed(0)
    model = _BlockApplied(2, True)
    qmodel = converted(model, _batches(4, 3, 0), "x86")
    x = _batches(1, 3, 7)[0]
    expected = qmodel(x).numpy()

    def fail(layer, inputs, output):
        raise RuntimeError("stopped after conv1's first call")

    conv1 = qmodel.block.conv1
    tops, quantize_input = [], conv1.quantize_input
    conv1.quantize_input = lambda value, top_code=None: tops.append(top_code) or quantize_input(value, top_code)
    handle = qmodel.block.bn1.register_forward_post_hook(fail)
    with pytest.raises(RuntimeError, match="stopped"):
        qmodel(x)
    handle.remove()
    np.testing.assert_array_equal(qmodel(x).numpy(), expected)
    assert tops == [127, 127, 255]


def test_the_call_counters() -> None:
    layer = nn.Identity()
    count_forwards(layer)
    count_forwards(layer)  # once
    assert len(layer._forward_pre_hooks) == 1
    tops = PerCallTopCodes([127, 255])
    layer(paddle.zeros([1]))
    assert [tops.next_top() for _ in range(3)] == [127, 255, 127]  # wraps outside a new forward
    layer(paddle.zeros([1]))
    assert tops.next_top() == 127  # a new forward starts again
    for bad in ([127], [0, 255], [127, 256]):
        with pytest.raises(ValueError, match="PerCallTopCodes"):
            PerCallTopCodes(bad)
    with pytest.raises(ValueError, match="calls_per_forward"):
        CallCounter(0)
    with pytest.raises(ValueError, match="call thresholds"):
        ResidualSumOutput(nn.ReLU(), 1.0, 255, call_thresholds=[1.0, 0.0])


def _table_with(tmp_path, entries: dict) -> tuple[ImperativePTQ, nn.Layer, object]:
    """A calibrated _BlockApplied(2) table with ``entries`` merged into block.conv1's structure."""
    paddle.seed(0)
    model = _BlockApplied(2, True)
    model.eval()
    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer()))
    calibrated = ptq.quantize(model)
    ptq.calibrate(calibrated, _batches(2, 3, 0), progress=False)
    path = tmp_path / "table.json"
    ptq.save_calibration_table(calibrated, path)
    document = json.loads(path.read_text())
    document["structure"]["block.conv1"].update(entries)
    path.write_text(json.dumps(document))
    loading = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer()))
    return loading, loading.quantize(model), path


@pytest.mark.parametrize("entries, message", [
    ({"plain_input_calls": [2]}, "some but not all calls 0..1"),
    ({"plain_input_calls": [0, 1]}, "some but not all calls 0..1"),
    ({"sum_calls": [5]}, "sum_calls must list calls 0..1"),
    ({"calls_per_forward": "2"}, "calls_per_forward must be an integer"),
    ({"wide_input": False}, "plain_input_calls needs signed_input or wide_input"),
])
def test_a_malformed_call_structure_is_a_value_error_naming_the_layer(entries, message, tmp_path) -> None:
    loading, model, path = _table_with(tmp_path, entries)
    with pytest.raises(ValueError, match=f"'block.conv1'.*{message}"):
        loading.load_calibration_table(model, path)


class _SharedOnTwoRanges(nn.Layer):
    """ALBERT-style sharing: one Linear called on inputs of ranges 20x apart."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(16, 16)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.concat([self.shared(x * 0.05), self.shared(x)], axis=-1)


def test_a_layer_called_on_very_different_ranges_is_named_at_convert(caplog) -> None:
    """One threshold serves both calls: the small call kept about 2 of its 8 bits (measured
    2.8e-1 of its largest output off fp32, 1.8e-2 for a copy of the layer per call), silently."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal((8, 16)).astype(np.float32)) for _ in range(3)]
    with caplog.at_level("WARNING", logger="imperative_ptq"):
        converted(_SharedOnTwoRanges(), batches)
    assert "1 int8 layers are called more than once in a forward on inputs whose ranges differ" in caplog.text
    assert "shared (" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="imperative_ptq"):
        converted(_BlockApplied(2, True), _batches(2, 3, 0))  # similar ranges per call
    assert "called more than once" not in caplog.text
