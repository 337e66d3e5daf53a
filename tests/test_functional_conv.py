"""Functional ``F.conv2d(x, self.weight, ...)`` and ``F.conv1d`` calls on a layer's own parameters
are calibrated, simulated and exported as conv layers: the same model written with
``nn.Conv2D`` / ``nn.Conv1D`` layers is the reference, and Paddle Inference and ONNX Runtime
compute what the simulation does."""

from __future__ import annotations

import logging

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

import imperative_ptq as ip
from imperative_ptq.export import export_onnx, int8_report
from avx2_kernels import paddle_inference_outputs

CLASSES = 5


class FunctionalConvNet(paddle.nn.Layer):
    """Convs written with ``F.conv2d`` / ``F.conv1d`` on the layer's own parameters, in the forms
    hand-written layers use (a bias, stride with ``"SAME"`` padding, groups, dilation with a
    padding list, a 1-D conv), then an ``nn.Linear`` head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem_weight = self.create_parameter([8, 3, 3, 3])
        self.stem_bias = self.create_parameter([8], is_bias=True)
        self.depthwise = self.create_parameter([8, 1, 3, 3])
        self.dilated = self.create_parameter([8, 8, 3, 3])
        self.sequence = self.create_parameter([6, 8, 3])
        self.head = paddle.nn.Linear(6, CLASSES)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = F.relu(F.conv2d(x, self.stem_weight, self.stem_bias, padding=1))
        h = F.relu(F.conv2d(h, self.depthwise, stride=2, padding="SAME", groups=8))
        h = F.relu(F.conv2d(h, self.dilated, padding=[2, 2], dilation=2))
        s = F.relu(F.conv1d(h.flatten(2), self.sequence, padding=1))
        return self.head(s.mean(axis=2))


class LayerConvNet(paddle.nn.Layer):
    """:class:`FunctionalConvNet` written with conv layers, under the names its sites get."""

    def __init__(self, functional: FunctionalConvNet) -> None:
        super().__init__()
        self.stem_weight_conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.depthwise_conv = paddle.nn.Conv2D(8, 8, 3, stride=2, padding="SAME", groups=8, bias_attr=False)
        self.dilated_conv = paddle.nn.Conv2D(8, 8, 3, padding=[2, 2], dilation=2, bias_attr=False)
        self.sequence_conv = paddle.nn.Conv1D(8, 6, 3, padding=1, bias_attr=False)
        self.head = paddle.nn.Linear(6, CLASSES)
        self.stem_weight_conv.weight.set_value(functional.stem_weight.numpy())
        self.stem_weight_conv.bias.set_value(functional.stem_bias.numpy())
        self.depthwise_conv.weight.set_value(functional.depthwise.numpy())
        self.dilated_conv.weight.set_value(functional.dilated.numpy())
        self.sequence_conv.weight.set_value(functional.sequence.numpy())
        self.head.set_state_dict(functional.head.state_dict())

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = F.relu(self.stem_weight_conv(x))
        h = F.relu(self.depthwise_conv(h))
        h = F.relu(self.dilated_conv(h))
        s = F.relu(self.sequence_conv(h.flatten(2)))
        return self.head(s.mean(axis=2))


SITES = ["depthwise_conv", "dilated_conv", "sequence_conv", "stem_weight_conv"]


def _models() -> tuple[FunctionalConvNet, LayerConvNet]:
    paddle.seed(0)
    functional = FunctionalConvNet()
    functional.eval()
    reference = LayerConvNet(functional)
    reference.eval()
    return functional, reference


def _batches(count: int = 4, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((4, 3, 12, 12), dtype=np.float32) for _ in range(count)]


def _ptq(target: str = "x86") -> ip.ImperativePTQ:
    return ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=target))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_functional_convs_are_calibrated_and_simulated_as_conv_layers(target) -> None:
    """Calibration leaves the function as it is, names one site per call, and the simulation
    computes what it computes for the model written with conv layers."""
    functional, reference = _models()
    x = paddle.to_tensor(_batches(1, seed=5)[0])
    expected = functional(x).numpy()
    tables, outputs = [], []
    for model in (functional, reference):
        ptq = _ptq(target)
        quantized = ptq.quantize(model)
        ptq.calibrate(quantized, _batches(), progress=False)
        ptq.remove_hooks(quantized)  # (the check below must not calibrate)
        if model is functional:
            np.testing.assert_array_equal(quantized(x).numpy(), expected)
        tables.append(ptq.calibration_table(quantized))
        ptq.convert(quantized)
        outputs.append(quantized(x).numpy())
    assert sorted(tables[0]) == sorted(tables[1]) == sorted(SITES + ["head"])
    assert tables[0] == tables[1]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert [name for name, _ in functional.named_sublayers()] == ["head"]  # the user's model untouched


@pytest.mark.parametrize("target, signed", [("x86", False), ("x86-avx2", True)])
def test_paddle_inference_and_onnx_runtime_run_the_convs_int8(target, signed, tmp_path, avx2_runner) -> None:
    """Also on a signed input on ``x86-avx2``, where the stem conv runs on halved weights and
    its bias moves onto ONNX Runtime's int32 grid as a Conv2D's does (the functional one stayed
    fp32 there, and ONNX Runtime was 2.7e-3 off the simulation without the bias move)."""
    functional, reference = _models()
    shift = -0.5 if signed else 0.0
    x = _batches(1, seed=9)[0] + shift
    spec = [paddle.static.InputSpec([None, 3, 12, 12], "float32", "x")]
    results = {}
    for tag, model in (("functional", functional), ("layers", reference)):
        ptq = _ptq(target)
        quantized = ptq.quantize(model)
        ptq.calibrate(quantized, [batch + shift for batch in _batches()], progress=False)
        ptq.convert(quantized)
        prefix = str(tmp_path / tag)
        ptq.save_quantized_model(quantized, prefix, input_spec=spec)
        export_onnx(quantized, prefix + ".onnx", input_spec=spec)
        import onnxruntime

        session = onnxruntime.InferenceSession(prefix + ".onnx", providers=["CPUExecutionProvider"])
        results[tag] = (
            quantized(paddle.to_tensor(x)).numpy(), int8_report(prefix),
            {
                kernels: ran for kernels, (ran,)
                in paddle_inference_outputs(prefix, [x], avx2_runner if target == "x86" else None).items()
            },
            session.run(None, {session.get_inputs()[0].name: x})[0],
        )
    simulated, report, inference, onnx_out = results["functional"]
    np.testing.assert_array_equal(simulated, results["layers"][0])
    assert report.int8 == results["layers"][1].int8 and not report.fp32, report
    assert sum(report.int8.values()) == len(SITES) + 1
    for ran in (*inference.values(), onnx_out):
        np.testing.assert_allclose(ran, simulated, rtol=1e-4, atol=1e-5 * np.abs(simulated).max())
    np.testing.assert_allclose(onnx_out, results["layers"][3], rtol=1e-5, atol=1e-6)


class NotRouted(paddle.nn.Layer):
    """Functional convs that stay as they are: a weight computed in ``forward`` (no parameter),
    channels-last data, a bias computed from the input, and a ``Conv2D`` subclass with its own
    ``forward`` (calibrated as a Conv2D, as it is)."""

    class SamePadded(paddle.nn.Conv2D):
        def forward(self, x: paddle.Tensor) -> paddle.Tensor:
            return F.conv2d(F.pad(x, [0, 1, 0, 1]), self.weight, self.bias, stride=2)

    def __init__(self) -> None:
        super().__init__()
        self.weight = self.create_parameter([4, 3, 3, 3])
        self.mask = paddle.create_parameter([4, 3, 3, 3], "float32", default_initializer=paddle.nn.initializer.Constant(0.5))
        self.mask.stop_gradient = True
        self.last = self.create_parameter([3, 4, 1, 1])
        self.shift = self.create_parameter([4, 4, 1, 1])
        self.padded = NotRouted.SamePadded(4, 4, 3)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = F.relu(F.conv2d(x, self.weight * self.mask, padding=1))
        h = F.conv2d(h.transpose([0, 2, 3, 1]), self.last, data_format="NHWC").transpose([0, 3, 1, 2])
        h = F.conv2d(h, self.last.transpose([1, 0, 2, 3]))
        return self.padded(F.conv2d(h, self.shift, bias=h.mean(axis=[0, 2, 3])))


def test_convs_that_are_not_routed_run_as_they_are(caplog) -> None:
    paddle.seed(0)
    model = NotRouted()
    model.eval()
    x = paddle.to_tensor(_batches(1, seed=2)[0])
    expected = model(x).numpy()
    ptq = _ptq()
    quantized = ptq.quantize(model)
    with caplog.at_level(logging.WARNING, logger="imperative_ptq.functional_conv"):
        ptq.calibrate(quantized, _batches(2), progress=False)
        np.testing.assert_array_equal(quantized(x).numpy(), expected)
    assert list(ptq.calibration_table(quantized)) == ["padded"]
    warnings = [r.getMessage() for r in caplog.records if "stays fp32" in r.getMessage()]
    assert warnings == ["F.conv2d(x, shift) stays fp32: its bias is not a parameter of the same layer"]
    ptq.remove_hooks(quantized)
    np.testing.assert_array_equal(quantized(x).numpy(), expected)


class OnlyFilters(paddle.nn.Layer):
    """A model without any layer PTQ hooks: one filter parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.filters = self.create_parameter([4, 3, 3, 3])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return F.conv2d(x, self.filters, padding=1)




def test_analyze_and_keep_fp32_pair_the_convs_with_the_fp32_model() -> None:
    functional, _ = _models()
    ptq = _ptq()
    quantized = ptq.quantize(functional)
    ptq.calibrate(quantized, _batches(), progress=False)
    ptq.convert(quantized)
    report = ptq.analyze(functional, quantized, _batches(2, seed=4))
    assert sorted(row.name for row in report.rows) == sorted(SITES + ["head"])
    ptq.keep_fp32(quantized, SITES + ["head"], functional)
    assert [name for name, _ in functional.named_sublayers()] == ["head"]  # the fp32 model unchanged
    x = paddle.to_tensor(_batches(1, seed=6)[0])
    np.testing.assert_allclose(quantized(x).numpy(), functional(x).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algorithm", ["adaround", "correct_bias", "correct_bias_analytically"])
def test_algorithms_called_directly_pair_the_convs_with_the_users_fp32_model(algorithm) -> None:
    """The sites exist only in the quantized model; an algorithm given the user's own fp32
    model matches them on a copy (the user's model keeps its layers) and does what it does
    for the same model written with conv layers."""
    from imperative_ptq import algorithms

    functional, reference = _models()
    batches = [paddle.to_tensor(b) for b in _batches(2, seed=3)]
    before = {k: v.numpy().copy() for k, v in functional.state_dict().items()}
    run = getattr(algorithms, algorithm)
    kwargs = {"settings": algorithms.AdaRound(iterations=20), "progress": False} if algorithm == "adaround" else {}
    outputs = []
    for model in (functional, reference):
        ptq = _ptq()
        quantized = ptq.quantize(model)
        ptq.calibrate(quantized, _batches(), progress=False)
        ptq.convert(quantized)
        paddle.seed(1)  # AdaRound's initial rounding variables are random
        run(quantized, model, batches, **kwargs)
        outputs.append(quantized(batches[0]).numpy())
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    assert [name for name, _ in functional.named_sublayers()] == ["head"]
    assert all(np.array_equal(v.numpy(), before[k]) for k, v in functional.state_dict().items())


def test_a_table_with_conv_sites_loads_after_the_first_batch_and_explains_before(tmp_path) -> None:
    functional, _ = _models()
    source = _ptq()
    calibrated = source.quantize(functional)
    source.calibrate(calibrated, _batches(), progress=False)
    path = tmp_path / "table.json"
    source.save_calibration_table(calibrated, path)

    fresh = _ptq()
    model = fresh.quantize(functional)
    with pytest.raises(ValueError, match="'<parameter>_conv' at the first calibration forward"):
        fresh.load_calibration_table(model, path)
    with fresh.calibrating(model):
        model(paddle.to_tensor(_batches(1, seed=3)[0]))
    fresh.load_calibration_table(model, path)
    assert fresh.calibration_table(model) == source.calibration_table(calibrated)


class _Applied(paddle.nn.Layer):
    """Filters and a matrix its parent applies through a method other than ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.filters = self.create_parameter([8, 3, 3, 3])
        self.matrix = self.create_parameter([8, CLASSES])

    def apply(self, x: paddle.Tensor) -> paddle.Tensor:
        pooled = F.relu(F.conv2d(x, self.filters, padding=1)).mean(axis=[2, 3])
        return paddle.matmul(pooled, self.matrix)


class _CallsAMethod(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.child = _Applied()

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.child.apply(x)


def test_calls_from_a_method_other_than_forward_stay_fp32_with_a_warning(caplog) -> None:
    """Such calls were calibrated and exported int8 as sites while the converted model ran them
    as they are (its routing is reached inside the owner's forward only): 2.3e-2 of the largest
    output between Paddle Inference and the simulation. Now fp32 everywhere, named."""
    paddle.seed(0)
    model = _CallsAMethod()
    model.eval()
    ptq = _ptq()
    quantized = ptq.quantize(model)
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        ptq.calibrate(quantized, _batches(2), progress=False)
    assert ptq.calibration_table(quantized) == {}  # no site
    warned = sorted(
        record.getMessage().split(" stays fp32")[0] for record in caplog.records
        if "other than its forward" in record.getMessage()
    )
    assert warned == ["F.conv2d(x, child.filters)", "paddle.matmul(x, child.matrix)"]
    x = _batches(1, seed=3)[0]
    np.testing.assert_array_equal(quantized(paddle.to_tensor(x)).numpy(), model(paddle.to_tensor(x)).numpy())


class _ForwardOfThis(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.filters = self.create_parameter([4, 3, 3, 3])

    def forward(this, x: paddle.Tensor) -> paddle.Tensor:  # noqa: N805 - a user's naming
        return F.conv2d(x, this.filters, padding=1)


@pytest.mark.parametrize("build", [OnlyFilters, _ForwardOfThis], ids=["filters-only", "forward-of-this"])
def test_a_model_of_filter_parameters_only_gets_its_site(build) -> None:
    """A model without any layer PTQ hooks is accepted; a forward whose first parameter is
    not named ``self`` gets its site too (its call was taken for one from another method:
    no site, a wrong warning)."""
    model = build()
    model.eval()
    ptq = _ptq()
    quantized = ptq.quantize(model)
    ptq.calibrate(quantized, _batches(2), progress=False)
    assert list(ptq.calibration_table(quantized)) == ["filters_conv"]


class _Nested(paddle.nn.Layer):
    """A layer of one class holding another of it, whose filters the outer forward applies
    through a method: the outer forward of the same class is no forward of the inner layer."""

    def __init__(self, inner: bool = True) -> None:
        super().__init__()
        self.filters = self.create_parameter([3, 3, 3, 3])
        self.inner = _Nested(inner=False) if inner else None

    def apply(self, x: paddle.Tensor) -> paddle.Tensor:
        return F.conv2d(x, self.filters, padding=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.inner.apply(F.relu(F.conv2d(x, self.filters, padding=1)))


def test_a_method_called_from_a_forward_of_another_instance_of_its_class_stays_fp32(caplog) -> None:
    """The outer forward's frame, of the same code, was taken for the inner layer's own
    forward: the inner call got a site the converted model never reaches."""
    model = _Nested()
    model.eval()
    ptq = _ptq()
    quantized = ptq.quantize(model)
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        ptq.calibrate(quantized, _batches(2), progress=False)
    assert list(ptq.calibration_table(quantized)) == ["filters_conv"]
    assert "F.conv2d(x, inner.filters) stays fp32: called from a method of _Nested other than its forward" in caplog.text
