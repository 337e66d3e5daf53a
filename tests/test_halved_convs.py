"""The ``x86-avx2`` target: convs reading a signed input run int8 on s8, on the halved (7-bit)
weights oneDNN's AVX2 kernels derive, and Paddle Inference (on AVX2 kernels) and ONNX Runtime
compute what the simulation does (imperative_ptq/halved_convs.py). Measured on a Zen 3 EPYC
(AVX2 only): 6e-8 .. 2e-7 of the largest output, where ``x86`` keeps the padded ones fp32."""

from __future__ import annotations

import logging

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
import pytest

import imperative_ptq as ip
from imperative_ptq.cpu import CpuInfo
from imperative_ptq.export import create_predictor, export_onnx, int8_report, predict
from imperative_ptq.halved_convs import halves_signed_input
from imperative_ptq.quant_layers import halved_grid_integers, onednn_conv_weight
from ties import relative_error, simulation_up_to_ties


def _reference_halving(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One element at a time, in float32: each output channel's abs-max ``m``, the multiplier
    ``127 * (1 / m)``, ``rint(0.5 * (w * multiplier))`` (half to even) and thresholds ``2 m``."""
    codes = np.zeros(weight.shape, np.int64)
    thresholds = np.zeros([weight.shape[0]], np.float32)
    for channel in range(weight.shape[0]):
        largest = np.float32(0)
        for value in weight[channel].ravel():
            largest = max(largest, np.float32(abs(value)))
        multiplier = np.float32(127) * (np.float32(1) / largest)
        for index in np.ndindex(weight.shape[1:]):
            scaled = np.float32(weight[(channel, *index)] * multiplier)
            codes[(channel, *index)] = int(np.rint(np.float32(0.5) * scaled))
        thresholds[channel] = np.float32(2) * largest
    return codes, thresholds


def test_halved_weight_matches_an_element_by_element_reference() -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    # Values on odd 8-bit codes of their channel's grid: the halving's ties.
    steps = np.abs(weight).max(axis=(1, 2, 3), keepdims=True) / np.float32(127)
    weight[:, :2] = (rng.integers(-63, 64, (6, 2, 3, 3)) * 2 + 1).astype(np.float32) * steps
    codes, thresholds = onednn_conv_weight(weight, 0, halved=True)
    expected_codes, expected_thresholds = _reference_halving(weight)
    np.testing.assert_array_equal(codes.astype(np.int64), expected_codes)
    np.testing.assert_array_equal(thresholds, expected_thresholds)
    assert np.abs(codes).max() <= 64


def test_even_codes_halve_to_the_nearest_7_bit_code() -> None:
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((8, 16, 3, 3)).astype(np.float32)
    thresholds = np.abs(weight).max(axis=(1, 2, 3))
    integers = np.clip(np.rint(weight / (thresholds / 127)[:, None, None, None]), -127, 127).astype(np.int8)
    even = halved_grid_integers(integers, weight, thresholds, 0)
    stored = (even.astype(np.float32) * (thresholds / np.float32(127))[:, None, None, None]).astype(np.float32)
    halved, _ = onednn_conv_weight(stored, 0, halved=True)
    nearest = np.rint(weight / (2 * thresholds / 127)[:, None, None, None])
    maxima = np.abs(even) == 127  # each channel's abs-max: 63.5, a tie either way
    np.testing.assert_array_equal(halved[~maxima], nearest[~maxima])
    assert np.all(np.abs(halved[maxima]) >= 63)


@pytest.mark.parametrize(
    "layer, halves",
    [
        (nn.Conv2D(3, 16, 7, stride=2, padding=3), True),
        (nn.Conv2D(16, 16, 3, padding=1, groups=16), True),  # depthwise
        (nn.Conv2D(16, 32, 3, padding=1, groups=4), True),  # 4 and 8 channels per group
        (nn.Conv1D(8, 8, 3, padding=1), True),
        (nn.Conv2D(16, 16, 3, padding=1, groups=8), False),  # 2 per group: another kernel
        (nn.Conv2D(16, 32, 3, padding=1, groups=16), False),  # depthwise, multiplier 2
        (nn.Conv2D(8, 8, 3, padding=1, data_format="NHWC"), False),
        (nn.Conv3D(4, 4, 3), False),
        (nn.Linear(8, 8), False),
    ],
)
def test_which_kernels_halve(layer: nn.Layer, halves: bool) -> None:
    assert halves_signed_input(layer) == halves


class _UnhalvedConvs(nn.Layer):
    """Padded convs on a signed input that no halving kernel takes: channels-last, and 2
    channels per group."""

    def __init__(self) -> None:
        super().__init__()
        self.channels_last = nn.Conv2D(4, 8, 3, padding=1, data_format="NHWC")
        self.two_per_group = nn.Conv2D(8, 8, 3, padding=1, groups=4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = self.channels_last(x.transpose([0, 2, 3, 1])).transpose([0, 3, 1, 2])
        return self.two_per_group(h)


def test_convs_left_fp32_on_x86_avx2_are_named_with_the_reason(caplog) -> None:
    """The warning gave the x86 target's reason ("a padded conv cannot") for convs the
    x86-avx2 target documents as int8."""
    import logging

    from imperative_ptq import ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig

    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), target="x86-avx2"))
    qmodel = ptq.quantize(_UnhalvedConvs())
    ptq.calibrate(qmodel, [paddle.randn([2, 4, 6, 6]) for _ in range(2)], progress=False)
    with caplog.at_level(logging.WARNING, logger="imperative_ptq.convert"):
        ptq.convert(qmodel)
    assert (
        "target 'x86-avx2': 2 layers read a signed input and stay fp32 (channels_last: "
        "channels-last (NHWC): only channels-first convs are measured to halve, two_per_group: "
        "groups=4 with 2 input and 2 output channels per group: the halving kernel needs "
        "multiples of 4): this target runs a conv on a signed input on the weights oneDNN's "
        "AVX2 kernels halve"
    ) in caplog.text
    assert type(qmodel.channels_last) is nn.Conv2D and type(qmodel.two_per_group) is nn.Conv2D


class _Block(nn.Layer):
    """conv -> BatchNorm -> activation, the BatchNorm optional."""

    def __init__(self, ci, co, k, stride=1, groups=1, act=F.silu, norm=True, dilation=1):
        super().__init__()
        self.conv = nn.Conv2D(ci, co, k, stride, dilation * (k // 2), dilation=dilation, groups=groups, bias_attr=not norm)
        self.norm = nn.BatchNorm2D(co) if norm else None
        self.act = act

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.conv(x)
        return self.act(self.norm(x) if self.norm is not None else x)


class _CspNet(nn.Layer):
    """A YOLO-style stack: a 3x3 stem on the image, SiLU conv-BN blocks, a strided conv, a
    residual bottleneck, a concat and a 1x1 head without BatchNorm."""

    def __init__(self):
        super().__init__()
        self.stem = _Block(3, 16, 3, stride=2)
        self.a = _Block(16, 16, 1)
        self.b = _Block(16, 16, 3)
        self.side = _Block(16, 16, 1)
        self.down = _Block(32, 32, 3, stride=2, act=lambda t: F.leaky_relu(t, 0.1))
        self.head = nn.Conv2D(32, 6, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.stem(x)
        y = x + self.b(self.a(x))
        return self.head(self.down(paddle.concat([y, self.side(x)], axis=1)))


class _MobileNet(nn.Layer):
    """Depthwise and grouped convs after Hardswish and tanh, one with 2 channels per group
    (not halved: ``x86``'s route), a dilated one, and a Conv1D on the flattened map."""

    def __init__(self):
        super().__init__()
        self.stem = _Block(3, 16, 3, act=F.hardswish)
        self.depthwise = _Block(16, 16, 3, groups=16, act=F.hardswish)
        self.grouped = _Block(16, 32, 3, groups=4, act=paddle.tanh)
        self.pairs = _Block(32, 32, 3, groups=16, act=paddle.tanh, norm=False)
        self.dilated = _Block(32, 16, 3, dilation=2, act=F.silu)
        self.temporal = nn.Conv1D(16, 8, 3, padding=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.dilated(self.pairs(self.grouped(self.depthwise(self.stem(x)))))
        return self.temporal(x.flatten(2))


class _ReluNet(nn.Layer):
    """Halved convs whose ReLU the export writes as a scaled relu6 fused into them (their
    stored thresholds scaled: export/unsigned.py), max-pooled and not, with and without a
    BatchNorm: a stem on the signed image, and a conv after a tanh."""

    def __init__(self):
        super().__init__()
        self.stem = _Block(3, 16, 3, act=F.relu)
        self.mixer = nn.Conv2D(16, 16, 3, padding=1)
        self.after_tanh = _Block(16, 32, 3, act=F.relu, norm=False)
        self.head = nn.Conv2D(32, 6, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = paddle.tanh(self.mixer(F.max_pool2d(self.stem(x), 2)))
        return self.head(self.after_tanh(x))


def _error_on_avx2(ptq, qmodel: nn.Layer, x: np.ndarray, tmp_path, avx2_runner, **tie_search) -> float:
    """Exports ``qmodel`` (``[N, 3, 16, 16]`` input), runs ``x`` on oneDNN's AVX2 kernels and
    returns the largest difference to the simulation up to rounding ties, relative to its
    largest output."""
    prefix = str(tmp_path / "int8")
    ptq.save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 3, 16, 16], "float32", "x")])
    ran = _avx2_outputs(prefix, x, avx2_runner)
    simulated, _ = simulation_up_to_ties(lambda: qmodel(paddle.to_tensor(x)).numpy(), ran, 2e-6, **tie_search)
    return relative_error(ran, simulated)


def _avx2_outputs(prefix: str, x: np.ndarray, avx2_runner) -> np.ndarray:
    """Paddle Inference's output on oneDNN's AVX2 kernels: natively where the CPU's int8
    kernels are AVX2, else in the ``ONEDNN_MAX_CPU_ISA=AVX2`` worker of a VNNI CPU."""
    if ip.cpu_info().isa == "avx2":
        return predict(create_predictor(prefix, num_threads=1), x)[0]
    if avx2_runner is None:
        pytest.skip("no AVX2 int8 kernels on this CPU (AVX-512 without VNNI)")
    return avx2_runner.predict(prefix, x)[0]


def _converted(model: nn.Layer, target: str, rng: np.random.Generator):
    model.train()  # BatchNorm statistics of the data, as a trained model has
    with paddle.no_grad():
        for _ in range(3):
            model(paddle.to_tensor(rng.standard_normal((4, 3, 16, 16)).astype("float32")))
    model.eval()
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=target))
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, [rng.standard_normal((4, 3, 16, 16)).astype("float32") for _ in range(3)], progress=False)
    ptq.convert(qmodel, progress=False)
    return ptq, qmodel


@pytest.mark.parametrize(
    "model_class, halved, folded, x86_int8",
    [(_CspNet, 6, 5, 3), (_MobileNet, 5, 4, 0), (_ReluNet, 2, 1, 2)],
)
def test_convs_on_signed_inputs_run_halved_as_simulated(
    model_class, halved: int, folded: int, x86_int8: int, tmp_path, avx2_runner
) -> None:
    ort = pytest.importorskip("onnxruntime")
    paddle.seed(0)
    rng = np.random.default_rng(0)
    ptq, qmodel = _converted(model_class(), "x86-avx2", rng)
    layers = [layer for layer in qmodel.sublayers() if isinstance(layer, ip.QuantizedLayer)]
    assert sum(layer.halved_weights for layer in layers) == halved
    assert sum(layer.norm_factor is not None for layer in layers) == folded
    # The same model on x86: of its convs reading signed inputs, the unpadded (1x1) ones only.
    paddle.seed(0)
    _, on_x86 = _converted(model_class(), "x86", np.random.default_rng(0))
    assert sum(isinstance(layer, ip.QuantizedLayer) for layer in on_x86.sublayers()) == x86_int8

    spec = [paddle.static.InputSpec([None, 3, 16, 16], "float32", "x")]
    prefix = str(tmp_path / "int8")
    ptq.save_quantized_model(qmodel, prefix, spec)
    report = int8_report(prefix)
    assert len(report.signed_inputs) >= halved - 1  # a Conv1D reads a reshaped copy
    assert sum(report.fp32.values()) == (1 if model_class is _MobileNet else 0), report
    if model_class is _ReluNet:
        # Both ReLUs on the relu6 route, their convs' thresholds steered (export/unsigned.py).
        from imperative_ptq.export.predictor import program_desc

        ops = [op.type for op in program_desc(prefix + ".pdmodel").blocks[0].ops]
        assert ops.count("relu6") == 2 and "relu" not in ops, ops
    x = rng.standard_normal((3, 3, 16, 16)).astype("float32")
    session = ort.InferenceSession(export_onnx(qmodel, prefix, spec), providers=["CPUExecutionProvider"])
    runs = {
        "Paddle Inference": _avx2_outputs(prefix, x, avx2_runner),
        "ONNX Runtime": session.run(None, {session.get_inputs()[0].name: x})[0],
    }

    def simulate() -> np.ndarray:
        return qmodel(paddle.to_tensor(x)).numpy()

    for runtime, ran in runs.items():
        simulated, _ = simulation_up_to_ties(simulate, ran, 2e-6, candidates=16, max_flips=3)
        assert relative_error(ran, simulated) < 2e-6, (runtime, relative_error(ran, simulated))


class _PreActivationReturned(nn.Layer):
    """A halved conv whose ReLU an int8 conv reads while the model also returns the conv's
    output: the relu6 route cannot scale it (export/unsigned.py), so its thresholds must stay
    as simulated (the route's tie steering had moved them anyway: 3e-3 .. 8e-3 off)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2D(3, 64, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Conv2D(64, 8, 1)

    def forward(self, x: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        h = self.conv(x)
        return self.head(self.relu(h)), h


def test_a_halved_conv_the_relu6_route_cannot_scale_keeps_its_thresholds(tmp_path, avx2_runner) -> None:
    paddle.seed(0)
    ptq, qmodel = _converted(_PreActivationReturned(), "x86-avx2", np.random.default_rng(0))
    assert qmodel.conv.halved_weights
    prefix = str(tmp_path / "int8")
    ptq.save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 3, 16, 16], "float32", "x")])
    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype("float32")
    if ip.cpu_info().isa == "avx2":
        outputs = predict(create_predictor(prefix, num_threads=1), x)
    elif avx2_runner is not None:
        outputs = avx2_runner.predict(prefix, x)
    else:
        pytest.skip("no AVX2 int8 kernels on this CPU (AVX-512 without VNNI)")
    for index, ran in enumerate(outputs):
        def simulate(index: int = index) -> np.ndarray:
            return qmodel(paddle.to_tensor(x))[index].numpy()

        simulated, _ = simulation_up_to_ties(simulate, ran, 2e-6, candidates=16, max_flips=3)
        assert relative_error(ran, simulated) < 2e-6, (index, relative_error(ran, simulated))


@pytest.mark.parametrize(
    "flags, warned", [(("avx2",), False), (("avx2", "avx512f", "avx512_vnni"), True), (("avx2", "avx512f"), True)]
)
def test_predictor_warns_where_the_int8_kernels_are_not_avx2(flags, warned, tmp_path, monkeypatch, caplog) -> None:
    paddle.seed(0)
    ptq, qmodel = _converted(_Block(3, 8, 3), "x86-avx2", np.random.default_rng(0))
    prefix = str(tmp_path / "int8")
    ptq.save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 3, 16, 16], "float32", "x")])
    from imperative_ptq import cpu as cpu_module

    monkeypatch.setattr(cpu_module, "cpu_info", lambda: CpuInfo(model="probe", flags=frozenset(flags)))
    monkeypatch.setattr("imperative_ptq.export.predictor.cpu_info", cpu_module.cpu_info)
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        create_predictor(prefix)
    assert ("7-bit weights of oneDNN's AVX2 int8 kernels" in caplog.text) == warned


class _Classifier(nn.Layer):
    """The YOLO-style stack with a pooled class head, for fine-tuning."""

    def __init__(self):
        super().__init__()
        self.trunk = _CspNet()

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.trunk(x).mean(axis=[2, 3])


def test_qat_fine_tunes_on_the_halved_weights(tmp_path, avx2_runner) -> None:
    """QAT's training forward computes with the halved weights (thresholds steered, codes
    even, the BatchNorms' current factors folded): with learning rate 0 its convert is PTQ's
    bit for bit; after training the converted model computes the training forward, and Paddle
    Inference (AVX2 kernels) what it simulates."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [
        (paddle.to_tensor(rng.standard_normal((8, 3, 16, 16)).astype("float32")), paddle.to_tensor(rng.integers(0, 6, [8])))
        for _ in range(3)
    ]
    images = [x for x, _ in batches]
    model = _Classifier()
    model.eval()
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer(), target="x86-avx2"))
    calibrated = ptq.quantize(model)
    ptq.calibrate(calibrated, images, progress=False)
    qat = ip.ImperativeQAT(ptq)
    trainable = qat.quantize(calibrated)
    assert sum(getattr(layer, "halved_weights", False) for layer in trainable.sublayers()) == 6

    def train(learning_rate: float, steps: int) -> None:
        optimizer = paddle.optimizer.Adam(learning_rate, parameters=trainable.parameters())
        for step in range(steps):
            x, y = batches[step % len(batches)]
            F.cross_entropy(trainable(x), y).backward()
            optimizer.step()
            optimizer.clear_grad()

    train(0.0, 2)
    import copy

    reference = ptq.convert(copy.deepcopy(calibrated), bias_grid=False)
    untrained = qat.convert(trainable)
    for x in images:
        np.testing.assert_array_equal(untrained(x).numpy(), reference(x).numpy())
    train(1e-2, 6)
    converted = qat.convert(trainable)
    trainable.eval()
    with paddle.no_grad():
        np.testing.assert_allclose(converted(images[0]).numpy(), trainable(images[0]).numpy(), rtol=1e-4, atol=1e-4)
    x = rng.standard_normal((4, 3, 16, 16)).astype("float32")
    assert _error_on_avx2(ptq, converted, x, tmp_path, avx2_runner, candidates=16, max_flips=3) < 2e-6


class _PreActivation(nn.Layer):
    """A pre-activation block: the stem conv's output is read by the block's BatchNorm and by
    the residual add (``h + conv(relu(bn(h)))``), so no BatchNorm folds into the stem."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.norm = nn.Conv2D(3, 8, 3, padding=1), nn.BatchNorm2D(8)
        self.conv, self.head = nn.Conv2D(8, 8, 3, padding=1), nn.Conv2D(8, 2, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = self.stem(x)
        return self.head(h + self.conv(F.relu(self.norm(h))))


def test_a_conv_whose_output_a_residual_add_reads_too_is_not_folded(tmp_path, avx2_runner) -> None:
    """Calibration sees the add: the stem halves without a folded BatchNorm (before, convert
    folded it and the export refused the model: the traced program reads the conv's output
    with the BatchNorm and the add)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    ptq, qmodel = _converted(_PreActivation(), "x86-avx2", rng)
    assert qmodel.stem.halved_weights and qmodel.stem.norm_factor is None
    x = rng.standard_normal((3, 3, 16, 16)).astype("float32")
    assert _error_on_avx2(ptq, qmodel, x, tmp_path, avx2_runner, candidates=16, max_flips=3) < 2e-6


class _PreNormReadElsewhere(nn.Layer):
    """A conv + BatchNorm + SiLU whose conv output an op calibration cannot see reads too:
    the network returns it, a concat or a reduction reads it."""

    def __init__(self, reader: str) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2D(3, 8, 3, padding=1), nn.BatchNorm2D(8)
        self.head = nn.Conv2D(16 if reader == "concat" else 8, 2, 1)
        self.reader = reader

    def forward(self, x: paddle.Tensor):
        features = self.conv(x)
        y = F.silu(self.norm(features))
        if self.reader == "returned":
            return self.head(y), features
        if self.reader == "concat":
            return self.head(paddle.concat([y, features], 1))
        return self.head(y * features.mean([2, 3], keepdim=True))


@pytest.mark.parametrize("reader", ["returned", "concat", "mean"])
def test_a_folded_conv_output_read_elsewhere_is_unfolded_for_those_readers(reader, tmp_path, avx2_runner) -> None:
    """convert folds the BatchNorm into the halved conv (its only hooked reader); the export
    folds it too and gives the other readers ``(y - beta) / f + mean`` back in float (it
    refused such models before; ONNX Runtime's export failed on every target for the
    returned one, its conv output absorbed with the BatchNorm)."""
    ort = pytest.importorskip("onnxruntime")
    paddle.seed(0)
    rng = np.random.default_rng(0)
    ptq, qmodel = _converted(_PreNormReadElsewhere(reader), "x86-avx2", rng)
    assert qmodel.conv.norm_factor is not None
    spec = [paddle.static.InputSpec([None, 3, 16, 16], "float32", "x")]
    prefix = str(tmp_path / "int8")
    ptq.save_quantized_model(qmodel, prefix, spec)
    x = rng.standard_normal((3, 3, 16, 16)).astype("float32")
    session = ort.InferenceSession(export_onnx(qmodel, prefix, spec), providers=["CPUExecutionProvider"])
    runs = {
        "Paddle Inference": (
            predict(create_predictor(prefix, num_threads=1), x) if ip.cpu_info().isa == "avx2"
            else avx2_runner.predict(prefix, x) if avx2_runner is not None else None
        ),
        "ONNX Runtime": session.run(None, {session.get_inputs()[0].name: x}),
    }
    for runtime, outputs in runs.items():
        if outputs is None:
            continue  # no AVX2 int8 kernels on this CPU
        for index, ran in enumerate(outputs):
            def simulate(index=index) -> np.ndarray:
                out = qmodel(paddle.to_tensor(x))
                return (out[index] if isinstance(out, tuple) else out).numpy()

            simulated, _ = simulation_up_to_ties(simulate, ran, 2e-6, candidates=16, max_flips=3)
            assert relative_error(ran, simulated) < 2e-6, (runtime, index, relative_error(ran, simulated))


class _FunctionalNorm(nn.Layer):
    """A conv whose BatchNorm is functional (``F.batch_norm`` on buffers): no layer for
    calibration to see, a ``batch_norm`` op in the traced program."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2D(3, 8, 3, padding=1), nn.Conv2D(8, 2, 1)
        for name, value in (("mean", 0.1), ("variance", 2.0), ("gamma", 1.5), ("beta", 0.2)):
            self.register_buffer(name, paddle.full([8], value))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = F.batch_norm(self.conv(x), self.mean, self.variance, self.gamma, self.beta, training=False)
        return self.head(F.silu(y))


class _NotANorm(nn.BatchNorm2D):
    """A BatchNorm2D subclass whose forward computes something else (no ``batch_norm`` op)."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x * 2.0


class _FoldedIntoNothing(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2D(3, 8, 3, padding=1), _NotANorm(8), nn.Conv2D(8, 2, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(F.silu(self.norm(self.conv(x))))


class _DroppedNorm(nn.Layer):
    """A BatchNorm2D layer reading an inference dropout of the conv's output: calibration sees
    it read another tensor; the export removes the dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.drop, self.norm = nn.Conv2D(3, 8, 3, padding=1), nn.Dropout(0.2), nn.BatchNorm2D(8)
        self.head = nn.Conv2D(8, 2, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(F.silu(self.norm(self.drop(self.conv(x)))))


@pytest.mark.parametrize("model_class", [_FunctionalNorm, _DroppedNorm])
def test_a_batch_norm_convert_did_not_fold_runs_in_float_after_the_halved_conv(model_class, tmp_path, avx2_runner) -> None:
    """The export refused these ("a batch_norm the calibration did not see"): Paddle would
    fold the BatchNorm into the halved weight, which the simulation halves unfolded. An
    identity scale keeps it apart, run in float as simulated."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    ptq, qmodel = _converted(model_class(), "x86-avx2", rng)
    assert qmodel.conv.halved_weights and qmodel.conv.norm_factor is None
    x = rng.standard_normal((3, 3, 16, 16)).astype("float32")
    assert _error_on_avx2(ptq, qmodel, x, tmp_path, avx2_runner) < 2e-6


def test_export_refuses_a_fold_the_program_contradicts(tmp_path) -> None:
    """Where the traced program has no BatchNorm after a conv convert folded one into, the
    export raises, naming the conv, and writes no file."""
    paddle.seed(0)
    ptq, qmodel = _converted(_FoldedIntoNothing(), "x86-avx2", np.random.default_rng(0))
    assert qmodel.conv.halved_weights
    message = "reads that output with scale;"
    with pytest.raises(ValueError, match=f"cannot export 'conv' for target 'x86-avx2': .*{message}"):
        ptq.save_quantized_model(qmodel, str(tmp_path / "int8"), [paddle.static.InputSpec([None, 3, 16, 16], "float32", "x")])
    assert not list(tmp_path.iterdir())


class _ConvOnItsOwnRelu(nn.Layer):
    """One conv called on the signed input and again on its own output's ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2D(3, 3, 3, padding=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        first = self.conv(x)
        return paddle.concat([first, self.conv(F.relu(first))], 1)


def test_a_halved_conv_called_on_a_relu_output_reads_it_as_s8(tmp_path, avx2_runner) -> None:
    """The layer runs on halved weights in both calls (it calibrated a signed input); Paddle
    ran the call on the ReLU's output as u8 with the full 8-bit weights (7.3e-2 of the largest
    output off the simulation)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    ptq, qmodel = _converted(_ConvOnItsOwnRelu(), "x86-avx2", rng)
    assert qmodel.conv.halved_weights
    x = rng.standard_normal((3, 3, 16, 16)).astype("float32")
    assert _error_on_avx2(ptq, qmodel, x, tmp_path, avx2_runner) < 2e-6
