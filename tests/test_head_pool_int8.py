"""The global average pool in front of a classifier head: the simulation averages u8 codes and
rounds the mean half to even, as Paddle Inference's oneDNN int8 pool does, so the exported
program (which keeps that pool int8) computes what the simulation does, natively and on AVX2
kernels; every other average pool runs fp32 in both."""

from __future__ import annotations

import fractions

import numpy as np
import paddle
import pytest
from paddle.vision.models.resnet import BasicBlock

from imperative_ptq import ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig
from imperative_ptq.export import create_predictor, int8_report, predict, save_quantized_model
from imperative_ptq.quant_pool import QuantizedGlobalAveragePool
from avx2_kernels import on_avx2, paddle_inference_outputs
from checkout import onednn_executions
from models import (
    X86_TARGETS, ThreeBlockResNet, converted, converted_from_old_table,
    largest_error_in_onnx_runtime, largest_error_in_paddle_inference, randomize_batch_norm_statistics,
)

nn = paddle.nn
SIZE = 12


def _int8_pool_reference(x: np.ndarray, threshold: float) -> np.ndarray:
    """oneDNN's u8 global average pool, one value at a time: codes ``round(x / t * 127)``
    within 0..255, their mean as an exact fraction rounded half to even (Python's ``round``),
    back on the grid ``t / 127``."""
    step = np.float32(threshold / 127)
    batch, channels = x.shape[:2]
    out = np.zeros([batch, channels, 1, 1], np.float32)
    for n in range(batch):
        for c in range(channels):
            codes = [min(max(int(np.floor(v / step + 0.5)), 0), 255) for v in x[n, c].ravel()]
            out[n, c, 0, 0] = round(fractions.Fraction(sum(codes), len(codes))) * step
    return out


def test_simulated_pool_equals_the_reference_ties_included() -> None:
    rng = np.random.default_rng(0)
    threshold = 1.5
    step = np.float32(threshold / 127)
    # Codes off the rounding midpoints; the first sample's maps average to k + 1/2 (ties),
    # the others have codes below 0 and above the u8 range.
    codes = rng.integers(-20, 300, size=[3, 5, 4, 4]).astype(np.float32)
    codes[0] = rng.integers(0, 240, size=[5, 4, 4])
    codes[0, :, 0, 0] += (8 - codes[0].sum(axis=(1, 2)) % 16) % 16
    assert (codes[0].sum(axis=(1, 2)) % 16 == 8).all() and codes[0].max() <= 255
    x = (codes + rng.uniform(-0.3, 0.3, codes.shape).astype(np.float32)) * step
    pool = QuantizedGlobalAveragePool(nn.AdaptiveAvgPool2D(1), threshold)
    expected = _int8_pool_reference(x, threshold)
    np.testing.assert_allclose(pool(paddle.to_tensor(x)).numpy(), expected, rtol=1e-6, atol=0)


class _ConvHead(nn.Layer):
    """conv -> ReLU -> AdaptiveAvgPool2D(1) -> Flatten -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2D(3, 16, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc(self.flatten(self.pool(self.relu(self.conv(x)))))


class _ReLU6Head(nn.Layer):
    """MobileNetV2's head: conv -> BatchNorm -> ReLU6 (fused into the conv, u8) -> pool ->
    ``paddle.flatten`` -> Dropout -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2D(3, 16, 3, padding=1, bias_attr=False)
        self.bn = nn.BatchNorm2D(16)
        self.relu6 = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, 10))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.classifier(paddle.flatten(self.pool(self.relu6(self.bn(self.conv(x)))), 1))


class _ResNetStyle(nn.Layer):
    """paddle.vision's ResNet layout at a small width: stem, a BasicBlock (a shared ReLU, the
    ReLU after the residual add), ``nn.AdaptiveAvgPool2D((1, 1))``, ``paddle.flatten`` and the
    fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2D(3, 16, 3, padding=1, bias_attr=False)
        self.bn1 = nn.BatchNorm2D(16)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(BasicBlock(16, 16))
        self.avgpool = nn.AdaptiveAvgPool2D((1, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(paddle.flatten(self.avgpool(x), 1))


MODELS = {"conv_head": _ConvHead, "relu6_head": _ReLU6Head, "resnet_style": _ResNetStyle}


def _exported(model_name: str, target: str, tmp_path) -> tuple[paddle.nn.Layer, str, np.ndarray]:
    paddle.seed(0)
    model = MODELS[model_name]()
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.random((8, 3, SIZE, SIZE), np.float32)) for _ in range(4)]
    qmodel = converted(model, batches, target)
    prefix = str(tmp_path / "m")
    save_quantized_model(
        qmodel, prefix, [paddle.static.InputSpec([None, 3, SIZE, SIZE], "float32", "x")]
    )
    return qmodel, prefix, rng.random((16, 3, SIZE, SIZE), np.float32)


def _outputs_of(qmodel: paddle.nn.Layer, x: np.ndarray, layers: dict) -> dict[str, np.ndarray]:
    """The outputs (or, for ``"in:"`` names, the inputs) of ``layers`` in one forward."""
    seen: dict[str, np.ndarray] = {}
    handles = []
    for key, layer in layers.items():
        if key.startswith("in:"):
            handles.append(layer.register_forward_pre_hook(
                lambda _, inputs, key=key: seen.update({key: inputs[0].numpy()})))
        else:
            handles.append(layer.register_forward_post_hook(
                lambda _, __, out, key=key: seen.update({key: out.numpy()})))
    qmodel(paddle.to_tensor(x))
    for handle in handles:
        handle.remove()
    return seen


def _fc(qmodel: paddle.nn.Layer, pooled: np.ndarray) -> np.ndarray:
    return qmodel.fc(paddle.to_tensor(pooled.reshape(pooled.shape[0], -1))).numpy()


@pytest.mark.parametrize("model_name", ["conv_head", "relu6_head"])
@pytest.mark.parametrize("target", X86_TARGETS)
@pytest.mark.usefixtures("linear_layers_as_fc")  # counts the head as a fc
def test_head_pool_runs_int8_as_simulated(model_name, target, tmp_path, avx2_runner) -> None:
    """Before the simulation averaged codes: 2.7% (conv_head) off Paddle Inference."""
    qmodel, prefix, x = _exported(model_name, target, tmp_path)
    assert isinstance(qmodel.pool, QuantizedGlobalAveragePool)
    report = int8_report(prefix)
    assert report.int8.get("fc") == 1 and not report.fp32, report
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    # The pool of the simulation is the reference's, on the simulation's own pool input.
    features = _outputs_of(qmodel, x, {"in:pool": qmodel.pool})["in:pool"]
    pooled = _int8_pool_reference(features, qmodel.pool.input_threshold)
    fc = qmodel.fc if model_name == "conv_head" else qmodel.classifier
    expected = fc(paddle.to_tensor(pooled.reshape(pooled.shape[0], -1))).numpy()
    np.testing.assert_allclose(simulated, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    # Measured 2.5e-7 relative to the largest logit, VNNI and AVX2 kernels.
    for ran, in paddle_inference_outputs(prefix, [x], on_avx2(avx2_runner, target)).values():
        assert np.abs(ran - simulated).max() <= 2e-6 * np.abs(simulated).max()


@pytest.mark.parametrize("target", X86_TARGETS)
def test_head_pool_runs_int8_after_a_residual_block(target, tmp_path, avx2_runner) -> None:
    """The ReLU after a residual conv (ResNet's block output, u8 codes up to 255) into the
    int8 pool. The block itself adds a difference the simulation does not model: the fused
    residual conv reads its residual as the u8 codes of the stem ReLU's threshold (a float add
    in the simulation; 0.9% on the logits). So the runtime is checked against the simulation's
    tensors with that residual quantized and this file's int8 pool (measured 2.3e-7; 1.6%
    with the pool averaged in float)."""
    from imperative_ptq.converted import output_thresholds

    qmodel, prefix, x = _exported("resnet_style", target, tmp_path)
    assert isinstance(qmodel.avgpool, QuantizedGlobalAveragePool)
    block = qmodel.layer1[0]
    seen = _outputs_of(qmodel, x, {"stem": qmodel.relu, "branch": block.bn2})
    step = np.float32(output_thresholds(qmodel.relu)[0] / 127)
    residual = np.clip(np.floor(seen["stem"] / step + 0.5), 0, 255) * step
    block_output = np.maximum(seen["branch"] + residual, 0)
    expected = _fc(qmodel, _int8_pool_reference(block_output, qmodel.avgpool.input_threshold))
    for ran, in paddle_inference_outputs(prefix, [x], on_avx2(avx2_runner, target)).values():
        assert np.abs(ran - expected).max() <= 2e-6 * np.abs(expected).max()


class _AuxiliaryHead(ThreeBlockResNet):
    """The last block output read by the pool -> fc head and by an auxiliary 1x1 conv head:
    Paddle writes it once, on the conv's input threshold, and the int8 pool reads those codes."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = paddle.nn.Conv2D(self.fc.weight.shape[0], 10, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.block(self.relu(self.bn1(self.conv1(x))))
        return self.fc(paddle.flatten(self.avgpool(x), 1)) + self.aux(x).mean(axis=[2, 3])


@pytest.mark.parametrize("target", X86_TARGETS)
def test_head_pool_runs_int8_on_a_block_output_other_convs_read(target, tmp_path, avx2_runner) -> None:
    """Before, the pool quantized with the ReLU's own output threshold: 0.41% of the largest
    logit off Paddle Inference (measured 2.1e-7 after, VNNI and AVX2 kernels)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal([4, 3, 16, 16]).astype("float32")) for _ in range(3)]
    qmodel = converted(_AuxiliaryHead(), batches, target)
    assert isinstance(qmodel.avgpool, QuantizedGlobalAveragePool)
    assert qmodel.avgpool.input_threshold == qmodel.aux.input_thresholds[0]
    x = rng.standard_normal([4, 3, 16, 16]).astype("float32")
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=on_avx2(avx2_runner, target)) <= 2e-6


def _conv_norm(channels_in: int, channels_out: int, kernel: int = 3, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2D(channels_in, channels_out, kernel, stride, kernel // 2, bias_attr=False), nn.BatchNorm2D(channels_out)]
    return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))


class _SharedBlockReLU(nn.Layer):
    """An identity block and a projection block sharing one ``nn.ReLU`` (a network written with
    one ``self.relu``), the head (``pool``: an int8 pool -> fc, else a float mean -> fc) reading
    its second call."""

    def __init__(self, pool: bool) -> None:
        super().__init__()
        self.stem, self.a1, self.a2 = _conv_norm(3, 8), _conv_norm(8, 8), _conv_norm(8, 8, relu=False)
        self.b1, self.b2 = _conv_norm(8, 11, stride=2), _conv_norm(11, 11, relu=False)
        self.shortcut = _conv_norm(8, 11, 1, 2, relu=False)
        self.relu, self.fc = nn.ReLU(), nn.Linear(11, 10)
        self.pool = nn.AdaptiveAvgPool2D(1) if pool else None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.stem(x)
        x = self.relu(self.a2(self.a1(x)) + x)
        x = self.relu(self.b2(self.b1(x)) + self.shortcut(x))
        return self.fc(self.pool(x).flatten(1) if self.pool is not None else x.mean([2, 3]))


def _shared_relu_batches() -> list[paddle.Tensor]:
    rng = np.random.default_rng(0)
    return [paddle.to_tensor(rng.standard_normal([4, 3, 32, 32]).astype("float32")) for _ in range(4)]


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
@pytest.mark.parametrize("pool", [True, False], ids=["int8_pool", "float_mean"])
def test_a_relu_shared_by_an_identity_and_a_projection_sum_runs_as_simulated(pool, target, tmp_path) -> None:
    """Each call of the ReLU is on its own sum's codes: the identity's up to 255, the
    projection's (s8 residual) up to 127, each marked by its own fused conv; the int8 pool
    takes the threshold of the call it reads. (Before: the projection's call unmarked, in
    float, 6.3e-3 of the largest logit off Paddle Inference; the pool on the first call's
    threshold, 1.2e-2 .. 2.4e-2 off Paddle Inference and 1.7e-2 off ONNX Runtime.)"""
    paddle.seed(0)
    model = _SharedBlockReLU(pool)
    randomize_batch_norm_statistics(model, seed=0)
    qmodel = converted(model, _shared_relu_batches(), target)
    assert qmodel.relu.call_tops == (255, 127)
    if pool:
        assert isinstance(qmodel.pool, QuantizedGlobalAveragePool)
        assert qmodel.pool.input_threshold == qmodel.relu.call_thresholds[1] != qmodel.relu.call_thresholds[0]
    x = np.random.default_rng(7).standard_normal([4, 3, 32, 32]).astype("float32")
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) <= 2e-6
    assert largest_error_in_onnx_runtime(qmodel, x, tmp_path, int8_residual_branches=False) <= 2e-6
    # Converted from its calibration table alike (the table keeps the s8 sum's call).
    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), target=target))
    calibrated = ptq.quantize(model)
    for batch in _shared_relu_batches():
        calibrated(batch)
    ptq.save_calibration_table(calibrated, tmp_path / "table.json")
    reloaded = ptq.quantize(model)
    ptq.load_calibration_table(reloaded, tmp_path / "table.json")
    ptq.convert(reloaded)
    assert reloaded.relu.call_tops == (255, 127)
    with paddle.no_grad():
        np.testing.assert_array_equal(reloaded(paddle.to_tensor(x)).numpy(), qmodel(paddle.to_tensor(x)).numpy())


def test_the_pool_runs_u8_in_paddle_inference(tmp_path, capfd) -> None:
    """oneDNN's verbose log: the pool reads and writes u8 (the grid the simulation averages)."""
    _, prefix, x = _exported("conv_head", "x86", tmp_path)
    pools = onednn_executions(prefix, x, tmp_path, "pooling")
    assert pools and all("src:u8" in line and "dst:u8" in line for line in pools), pools


class _FunctionalHead(nn.Layer):
    """The same head with the pool and ReLU called functionally (no layer to simulate)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2D(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(nn.functional.relu(self.conv(x)), 1)
        return self.fc(paddle.flatten(pooled, 1))


def test_a_functional_head_pool_runs_fp32_in_both(tmp_path) -> None:
    """No layer to simulate it int8: the export keeps that pool fp32 too."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.random((8, 3, SIZE, SIZE), np.float32)) for _ in range(4)]
    qmodel = converted(_FunctionalHead(), batches, "x86")
    assert not any(isinstance(layer, QuantizedGlobalAveragePool) for layer in qmodel.sublayers())
    x = rng.random((16, 3, SIZE, SIZE), np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) <= 2e-6


def test_a_model_converted_from_a_table_alone_keeps_the_pool_fp32(tmp_path) -> None:
    """A table without its structure section (the format before it was recorded) holds
    thresholds, not which layer reads which: without a calibration batch convert cannot tell a
    head pool, so the export keeps it fp32 and still agrees (tests/test_table_structure.py
    loads a table that has it)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.random((8, 3, SIZE, SIZE), np.float32)) for _ in range(4)]
    loaded = converted_from_old_table(_ConvHead().eval(), batches, tmp_path)
    assert not isinstance(loaded.pool, QuantizedGlobalAveragePool)
    x = rng.random((16, 3, SIZE, SIZE), np.float32)
    assert largest_error_in_paddle_inference(loaded, x, tmp_path) <= 2e-6


class _DownsampledLast(nn.Layer):
    """A residual block with a downsample branch right before the head pool: the ReLU after
    its add is fused into a conv whose residual is the other conv's (s8) output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2D(3, 16, 3, padding=1), nn.ReLU())
        downsample = nn.Sequential(nn.Conv2D(16, 32, 1, stride=2, bias_attr=False), nn.BatchNorm2D(32))
        self.block = BasicBlock(16, 32, 2, downsample)
        self.avgpool = nn.AdaptiveAvgPool2D(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc(paddle.flatten(self.avgpool(self.block(self.stem(x))), 1))


def test_a_pool_after_an_s8_block_output_runs_as_simulated(tmp_path, caplog) -> None:
    """oneDNN has no s8 -> u8 pool: the predictor failed to run this export ("could not
    create a descriptor for a pooling forward propagation primitive") before the export put
    a relu in front of the pool. The runtime then averages codes clipped at the threshold,
    which the simulation models (codes up to 127 after an s8 residual), so the export no
    longer warns that it does not (measured 2.4e-7 of the largest logit off with that warning
    still given)."""
    import logging

    MODELS["downsampled_last"] = _DownsampledLast
    try:
        with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
            qmodel, prefix, x = _exported("downsampled_last", "x86", tmp_path)
    finally:
        del MODELS["downsampled_last"]
    assert isinstance(qmodel.avgpool, QuantizedGlobalAveragePool) and qmodel.avgpool.top == 127
    assert not any("writes as s8" in record.getMessage() for record in caplog.records), caplog.text
    report = int8_report(prefix)
    assert report.int8.get("fc") == 1 and not report.fp32, report
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    assert np.abs(ran - simulated).max() <= 2e-6 * np.abs(simulated).max()


class _MaxThenAveragePool(nn.Layer):
    """A VGG/CRNN head: conv -> BN -> ``nn.ReLU`` -> max pool -> functional adaptive average
    pool -> Linear (the average pool is no layer, so it runs fp32)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2D(3, 16, 3, padding=1)
        self.norm = nn.BatchNorm2D(16)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(16, 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        pooled = paddle.nn.functional.max_pool2d(self.relu(self.norm(self.conv(x))), 2, 2)
        return self.fc(paddle.nn.functional.adaptive_avg_pool2d(pooled, 1).flatten(1))


@pytest.mark.parametrize("seed", [0, 1])
def test_a_max_pool_before_an_fp32_average_pool_runs_fp32_as_simulated(seed, tmp_path) -> None:
    """The ReLU output reaches only the fp32 average pool (through the max pool): it keeps no
    scale, so Paddle runs the max pool fp32 too (with one it averaged u8 codes: 1.4% of the
    largest logit off on every logit)."""
    paddle.seed(seed)
    rng = np.random.default_rng(seed)
    model = _MaxThenAveragePool()
    model.eval()
    from imperative_ptq import ImperativePTQ

    ptq = ImperativePTQ()
    quantized = ptq.quantize(model)
    ptq.calibrate(quantized, [rng.random((4, 3, 16, 16), dtype=np.float32) for _ in range(3)], progress=False)
    ptq.convert(quantized)
    prefix = str(tmp_path / "head")
    save_quantized_model(quantized, prefix, [paddle.static.InputSpec([None, 3, 16, 16], "float32", "x")])
    x = rng.random((4, 3, 16, 16), dtype=np.float32)
    simulated = quantized(paddle.to_tensor(x)).numpy()
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    np.testing.assert_allclose(ran, simulated, atol=1e-5 * np.abs(simulated).max())


class _PooledHead(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2D(3, 16, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


def test_keeping_the_head_linear_fp32_runs_its_pool_fp32_too(tmp_path) -> None:
    """The int8 pool exists for its int8 Linear reader: ``keep_fp32(["fc"])`` puts the pool
    back in fp32 too, as the export runs it (with the pool still simulated int8: 3.6% of the
    largest logit off Paddle Inference on an MNIST residual CNN)."""
    from imperative_ptq import ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig

    paddle.seed(0)
    rng = np.random.default_rng(0)
    model = _PooledHead()
    model.eval()
    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer()))
    quantized = ptq.quantize(model)
    ptq.calibrate(quantized, [rng.random((4, 3, 12, 12), dtype=np.float32) for _ in range(3)], progress=False)
    ptq.convert(quantized)
    assert isinstance(quantized.pool, QuantizedGlobalAveragePool) and quantized.pool.readers == ("fc",)
    kept = ptq.keep_fp32(quantized, ["fc"], model)
    assert isinstance(kept.pool, nn.AdaptiveAvgPool2D)
    prefix = str(tmp_path / "kept")
    save_quantized_model(kept, prefix, [paddle.static.InputSpec([None, 3, 12, 12], "float32", "x")])
    x = rng.random((4, 3, 12, 12), dtype=np.float32)
    simulated = kept(paddle.to_tensor(x)).numpy()
    np.testing.assert_allclose(predict(create_predictor(prefix, num_threads=1), x)[0], simulated, atol=1e-5 * np.abs(simulated).max())


class _AttentionPoolingHead(paddle.nn.Layer):
    """conv + ReLU features, pooled -> Linear -> softmax weights, multiplied onto the features:
    the ReLU output is read by the pool and, in float, by the multiply."""

    def __init__(self) -> None:
        super().__init__()
        nn = paddle.nn
        self.c1, self.r1 = nn.Conv2D(3, 16, 3, 2, 1), nn.ReLU()
        self.c2, self.r2 = nn.Conv2D(16, 32, 3, 1, 1), nn.ReLU()
        self.gap, self.att = nn.AdaptiveAvgPool2D(1), nn.Linear(32, 32)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        features = self.r2(self.c2(self.r1(self.c1(x))))
        weights = paddle.nn.functional.softmax(self.att(paddle.flatten(self.gap(features), 1)), axis=1)
        return features * weights.unsqueeze([2, 3])


@pytest.mark.parametrize("target", X86_TARGETS)
def test_a_head_pool_whose_input_a_float_layer_reads_too_stays_float(target, tmp_path) -> None:
    """An int8 pool made Paddle write the features as its u8 codes, which the multiply then
    read too, where the simulation multiplies floats (measured: 0.75% of the largest output
    off on half of them)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.random((4, 3, 32, 32)).astype("float32")) for _ in range(4)]
    qmodel = converted(_AttentionPoolingHead(), batches, target)
    assert not isinstance(qmodel.gap, QuantizedGlobalAveragePool)
    x = rng.random((2, 3, 32, 32)).astype("float32")
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) <= 1e-5


class _DenseNetHead(nn.Layer):
    """DenseNet's head: a concat of two convs' outputs, BatchNorm -> ReLU (the BatchNorm on no
    conv output, so Paddle fuses the ReLU into it), the global pool, the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2D(3, 4, 3, padding=1), nn.Conv2D(3, 4, 1)
        self.norm, self.relu = nn.BatchNorm2D(8), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2D(1), nn.Linear(8, 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        joined = self.relu(self.norm(paddle.concat([self.a(x), self.b(x)], 1)))
        return self.fc(paddle.flatten(self.pool(joined), 1))


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_a_pool_of_a_relu_fused_into_its_batch_norm_reads_u8_codes(target, tmp_path) -> None:
    """Paddle fuses the ReLU into a BatchNorm on no conv output and writes it s8, which the pool
    read clipped at code 127 on a step 255/127 times the simulation's (measured: 7.1e-2 .. 8.0e-2
    of the largest logit off on this head); the pool now reads a ReLU copy Paddle quantizes u8."""
    from models import randomize_batch_norm_statistics

    paddle.seed(0)
    model = _DenseNetHead()
    randomize_batch_norm_statistics(model, seed=0)
    rng = np.random.default_rng(0)
    qmodel = converted(model, [paddle.to_tensor(rng.standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)) for _ in range(4)], target)
    assert isinstance(qmodel.pool, QuantizedGlobalAveragePool)
    x = rng.standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) < 2e-6
