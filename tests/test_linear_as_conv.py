"""Linear layers whose weight Paddle Inference's fc would damage run as 1x1 convs.

Paddle 3.3.1's oneDNN pipeline takes a fc's per-channel weight scales from runs of
consecutive elements of its ``[in, out]`` weight, not from its columns
(``quant_layers.paddle_fc_weight``); the simulation follows it, so a classifier head whose
columns differ in size lost accuracy in both. Such a Linear is now simulated with its own
per-channel weight and exported as ``reshape -> conv2d 1x1 -> reshape``, whose scales Paddle
takes per output channel: the model's heads (its last layer with a weight, an ``nn.Linear`` or
a functional matmul on a parameter, and every such layer whose output the model returns, when
no int8 layer reads their output)."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.export import create_predictor, export_onnx, int8_report, predict
from imperative_ptq.quant_layers import linear_runs_as_conv, paddle_fc_weight, quantize_weight


def _weight(inputs: int, outputs: int, column_spread: float, seed: int = 0) -> np.ndarray:
    """Gaussian ``[inputs, outputs]`` weight whose columns are scaled by ``exp(spread * N(0, 1))``."""
    rng = np.random.default_rng(seed)
    columns = np.exp(column_spread * rng.standard_normal(outputs))
    return (0.1 * rng.standard_normal((inputs, outputs)) * columns[None]).astype(np.float32)


def _fc_weight_by_loops(weight: np.ndarray) -> np.ndarray:
    """Slow reference of the weight Paddle's fc runs: channel ``i``'s scale is the abs-max of the
    ``i``-th run of ``in`` consecutive elements of the row-major weight."""
    inputs, outputs = weight.shape
    flat = weight.reshape(-1)
    result = np.empty_like(weight)
    for channel in range(outputs):
        largest = max(abs(float(value)) for value in flat[channel * inputs:(channel + 1) * inputs])
        for row in range(inputs):
            code = min(127.0, max(-128.0, float(np.rint(weight[row, channel] * np.float32(127) / np.float32(largest)))))
            result[row, channel] = code * largest / 127
    return result


def _per_channel_by_loops(weight: np.ndarray) -> np.ndarray:
    """Slow reference of per-output-channel 8-bit rounding (what a 1x1 conv runs)."""
    result = np.empty_like(weight)
    for channel in range(weight.shape[1]):
        largest = max(abs(float(value)) for value in weight[:, channel])
        for row in range(weight.shape[0]):
            result[row, channel] = np.rint(weight[row, channel] / largest * 127) * largest / 127
    return result


@pytest.mark.parametrize(
    "shape, spread, expected",
    [((120, 600), 1.0, True), ((64, 64), 0.5, True), ((1536, 384), 0.0, False), ((384, 384), 0.0, False),
     ((64, 10), 0.0, True)],
)
def test_the_choice_follows_the_two_weight_errors(shape, spread, expected) -> None:
    weight = _weight(*shape, spread)
    thresholds = np.abs(weight).max(axis=0)
    if shape[0] == shape[1]:  # the fc takes one threshold for a square weight
        fc_reference = _fc_weight_by_loops(
            quantize_weight(weight, np.full_like(thresholds, thresholds.max()), 8, 1).astype(np.float32)
            * thresholds.max() / 127
        )
    else:
        fc_reference = _fc_weight_by_loops(_per_channel_by_loops(weight))
    integers, fc_thresholds = paddle_fc_weight(_per_channel_by_loops(weight))
    if shape[0] != shape[1]:
        np.testing.assert_allclose(integers * fc_thresholds / 127, fc_reference, rtol=0, atol=1e-6)
    fc_error = np.linalg.norm(fc_reference - weight) / np.linalg.norm(weight)
    conv_error = np.linalg.norm(_per_channel_by_loops(weight) - weight) / np.linalg.norm(weight)
    assert (fc_error - conv_error > 0.04) == expected
    assert linear_runs_as_conv(weight, thresholds, 8, 1) == expected


def test_an_all_zero_weight_stays_a_fc() -> None:
    assert not linear_runs_as_conv(np.zeros((8, 4), np.float32), np.full(4, 1e-30, np.float32), 8, 1)


class _Head(paddle.nn.Layer):
    """ReLU or identity, then a Linear with the given weight (a classifier or CTC head)."""

    def __init__(self, weight: np.ndarray, signed: bool, bias: bool = True) -> None:
        super().__init__()
        self.signed = signed
        self.head = paddle.nn.Linear(*weight.shape, bias_attr=None if bias else False)
        self.head.weight.set_value(weight)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(x if self.signed else paddle.nn.functional.relu(x))


def _converted_head(
    weight: np.ndarray, signed: bool, shape: tuple[int, ...], target: str = "x86", bias: bool = True
) -> tuple[paddle.nn.Layer, paddle.nn.Layer, np.ndarray]:
    from models import converted

    paddle.seed(0)
    rng = np.random.default_rng(1)
    model = _Head(weight, signed, bias)
    model.eval()
    batches = [paddle.to_tensor(rng.standard_normal(shape).astype("float32")) for _ in range(4)]
    qmodel = converted(model, batches, target)
    return model, qmodel, rng.standard_normal(shape).astype("float32")


@pytest.mark.parametrize("signed", [False, True], ids=["u8 input", "shifted signed input"])
@pytest.mark.parametrize("target", ["x86", "x86-vnni"])
def test_a_head_with_uneven_columns_runs_its_own_per_channel_weight(signed, target, tmp_path) -> None:
    """Before, the simulation and Paddle Inference agreed on a weight 0.32 (relative) away from
    the fp32 one (columns spread by e^N(0,1)), the output 0.32 (u8 input) and 0.29 (shifted
    input) off fp32 (relative L2); the per-channel weight is 6.5e-3 away."""
    weight = _weight(120, 600, 1.0)
    model, qmodel, x = _converted_head(weight, signed, (16, 120), target)
    assert qmodel.head.runs_as_conv
    reference = model(paddle.to_tensor(x)).numpy()
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    # Measured 6.3e-2 (u8: KL clips the ReLU's tail on the 7-bit grid) and 1.9e-2 (shifted).
    assert np.linalg.norm(simulated - reference) / np.linalg.norm(reference) < 0.1
    prefix = str(tmp_path / "m")
    ip.ImperativePTQ().save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 120], "float32", "x")])
    report = int8_report(prefix)
    assert report.int8 == {"fused_conv2d": 1} and not report.fp32, report
    if target == "x86-vnni" and signed:
        from imperative_ptq.cpu import cpu_info

        if not cpu_info().vnni:
            return  # s8 inputs are exact on VNNI kernels only
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    # Measured 1.9e-7 .. 6e-7.
    assert np.abs(ran - simulated).max() / np.abs(simulated).max() < 2e-6


class _NamedLinear(paddle.nn.Linear):
    """A Linear subclass that keeps ``nn.Linear.forward`` (a name for the layer, nothing more)."""


def test_a_linear_subclass_keeping_its_forward_runs_as_a_conv(tmp_path) -> None:
    """Before, only an exact ``nn.Linear`` could: a subclass head stayed a fc on the damaged
    weight (0.32 off fp32, the weight of the test above)."""
    from models import converted

    weight = _weight(120, 600, 1.0)
    model = _Head(weight, False)
    model.head = _NamedLinear(*weight.shape)
    model.head.weight.set_value(weight)
    rng = np.random.default_rng(1)
    qmodel = converted(model, [paddle.to_tensor(rng.standard_normal((16, 120)).astype("float32")) for _ in range(4)])
    assert qmodel.head.runs_as_conv
    prefix = str(tmp_path / "m")
    ip.ImperativePTQ().save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 120], "float32", "x")])
    assert int8_report(prefix).int8 == {"fused_conv2d": 1}
    x = rng.standard_normal((16, 120)).astype("float32")
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    # Measured 9.8e-8.
    assert np.abs(ran - simulated).max() / np.abs(simulated).max() < 2e-6


def test_a_sequence_head_keeps_its_leading_dimensions(tmp_path) -> None:
    """A CTC-style head on ``[batch, steps, features]`` with both leading dimensions dynamic,
    without a bias: Paddle Inference and ONNX Runtime compute the simulation's output."""
    weight = _weight(48, 300, 1.0, seed=3)
    _, qmodel, x = _converted_head(weight, False, (4, 7, 48), bias=False)
    assert qmodel.head.runs_as_conv
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    spec = [paddle.static.InputSpec([None, None, 48], "float32", "x")]
    prefix = str(tmp_path / "m")
    ip.ImperativePTQ().save_quantized_model(qmodel, prefix, spec)
    predictor = create_predictor(prefix, num_threads=1)
    for steps in (7, 3):
        ran = predict(predictor, x[:, :steps])[0]
        expected = qmodel(paddle.to_tensor(x[:, :steps])).numpy()
        assert ran.shape == expected.shape == (4, steps, 300)
        assert np.abs(ran - expected).max() / np.abs(expected).max() < 2e-6
    onnxruntime = pytest.importorskip("onnxruntime")
    path = export_onnx(qmodel, str(tmp_path / "m.onnx"), spec)
    ran = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(ran - simulated).max() / np.abs(simulated).max() < 2e-6


def test_a_layer_the_fc_runs_well_stays_a_fc(tmp_path) -> None:
    """Gaussian 1536 x 384 (the fc's weight 1.5e-2 from fp32, per-channel rounding 8.1e-3):
    the fc is faster."""
    _, qmodel, x = _converted_head(_weight(1536, 384, 0.0), False, (16, 1536))
    assert not qmodel.head.runs_as_conv
    prefix = str(tmp_path / "m")
    ip.ImperativePTQ().save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 1536], "float32", "x")])
    assert int8_report(prefix).int8 == {"fc": 1}


class _TwiceAndTied(paddle.nn.Layer):
    """A head called on two signed tensors, whose weight the forward also reads."""

    def __init__(self, weight: np.ndarray) -> None:
        super().__init__()
        self.head = paddle.nn.Linear(*weight.shape)
        self.head.weight.set_value(weight)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        first, second = self.head(x), self.head(x * 0.5 - 0.25)
        return paddle.concat([first + second, first * self.head.weight.mean(axis=0)], axis=-1)


def test_a_head_called_twice_and_read_by_the_forward_runs_as_simulated(tmp_path) -> None:
    from models import converted

    rng = np.random.default_rng(2)
    model = _TwiceAndTied(_weight(32, 200, 1.0, seed=4))
    batches = [paddle.to_tensor(rng.standard_normal((8, 32)).astype("float32")) for _ in range(4)]
    qmodel = converted(model, batches)
    assert qmodel.head.runs_as_conv and qmodel.head.input_shifted
    x = rng.standard_normal((5, 32)).astype("float32")
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    prefix = str(tmp_path / "m")
    ip.ImperativePTQ().save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 32], "float32", "x")])
    assert int8_report(prefix).int8 == {"fused_conv2d": 2}
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    assert np.abs(ran - simulated).max() / np.abs(simulated).max() < 2e-6


class _Chain(paddle.nn.Layer):
    """Two Linear layers with uneven columns, a ReLU layer between them."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.relu = paddle.nn.Linear(48, 300), paddle.nn.ReLU()
        self.second = paddle.nn.Linear(300, 300)
        self.first.weight.set_value(_weight(48, 300, 1.0, seed=5))
        self.second.weight.set_value(_weight(300, 300, 1.0, seed=6))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.second(self.relu(self.first(x)))


def test_only_the_head_runs_as_conv(tmp_path) -> None:
    """In a chain the fc stays (a conv between small Linear layers costs more than it saves:
    a 784-100-100-10 MLP as three convs ran 1.6x slower at batch 64); a table loaded without
    its structure section, which does not say who reads what, keeps every Linear a fc."""
    from models import converted, converted_from_old_table

    rng = np.random.default_rng(3)
    batches = [paddle.to_tensor(rng.standard_normal((8, 48)).astype("float32")) for _ in range(4)]
    for weight in (_Chain().first.weight.numpy(), _Chain().second.weight.numpy()):
        assert linear_runs_as_conv(weight, np.abs(weight).max(axis=0), 8, 1)
    qmodel = converted(_Chain(), batches)
    assert not qmodel.first.runs_as_conv and qmodel.second.runs_as_conv
    x = rng.standard_normal((5, 48)).astype("float32")
    prefix = str(tmp_path / "m")
    ip.ImperativePTQ().save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 48], "float32", "x")])
    assert int8_report(prefix).int8 == {"fc": 1, "fused_conv2d": 1}
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    assert np.abs(ran - simulated).max() / np.abs(simulated).max() < 2e-6
    loaded = converted_from_old_table(_Chain(), batches, tmp_path)
    assert not loaded.first.runs_as_conv and not loaded.second.runs_as_conv


class _TwoHeads(paddle.nn.Layer):
    """A trunk Linear, then a class and a box head with uneven columns, returned as a tuple,
    a dict, or with the trunk's features (which the heads read) first."""

    def __init__(self, returns: str) -> None:
        super().__init__()
        self.returns = returns
        self.trunk = paddle.nn.Linear(32, 64)
        self.cls, self.box = paddle.nn.Linear(64, 10), paddle.nn.Linear(64, 4)
        self.cls.weight.set_value(_weight(64, 10, 1.0, seed=1))
        self.box.weight.set_value(_weight(64, 4, 1.0, seed=0))

    def forward(self, x: paddle.Tensor):
        features = self.trunk(x)
        hidden = paddle.nn.functional.relu(features)
        classes, boxes = self.cls(hidden), self.box(hidden)
        if self.returns == "dict":
            return {"classes": classes, "boxes": boxes}
        return (features, classes, boxes) if self.returns == "features" else (classes, boxes)


@pytest.mark.parametrize("returns", ["tuple", "dict", "features"])
def test_every_head_the_model_returns_runs_as_a_conv(returns, tmp_path) -> None:
    """Before, only the last layer with a weight was a head: a detector's or a multi-task
    model's other heads stayed fc on the damaged weight (measured on this model: the class
    head 0.147 off fp32, relative L2, against 0.069 as a conv). A returned layer that another
    layer with a weight reads (the trunk's features) stays a fc."""
    from models import converted

    rng = np.random.default_rng(4)
    batches = [paddle.to_tensor(rng.standard_normal((64, 32)).astype("float32")) for _ in range(4)]
    paddle.seed(0)
    model = _TwoHeads(returns)
    model.eval()
    qmodel = converted(model, batches)
    assert qmodel.cls.runs_as_conv and qmodel.box.runs_as_conv and not qmodel.trunk.runs_as_conv
    x = rng.standard_normal((256, 32)).astype("float32")
    reference, simulated = (paddle.utils.flatten(m(paddle.to_tensor(x))) for m in (model, qmodel))
    classes = -2  # the class head's output in each layout
    error = np.linalg.norm(simulated[classes].numpy() - reference[classes].numpy())
    assert error / np.linalg.norm(reference[classes].numpy()) < 0.1  # measured 0.069 (a fc: 0.147)
    prefix = str(tmp_path / "m")
    ip.ImperativePTQ().save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 32], "float32", "x")])
    assert int8_report(prefix).int8 == {"fc": 1, "fused_conv2d": 2}
    for ran, expected in zip(predict(create_predictor(prefix, num_threads=1), x), simulated):
        expected = expected.numpy()
        # Measured 1.4e-7 .. 2.3e-7.
        assert np.abs(ran - expected).max() / np.abs(expected).max() < 2e-6


def test_the_returned_heads_survive_a_calibration_table(tmp_path) -> None:
    """A model that loads the table converts the same heads; a table without its structure
    section says nothing of what the model returned, so every Linear stays a fc."""
    from models import converted_from_old_table

    rng = np.random.default_rng(4)
    batches = [paddle.to_tensor(rng.standard_normal((64, 32)).astype("float32")) for _ in range(2)]
    paddle.seed(0)
    model = _TwoHeads("tuple")
    model.eval()
    config = ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer())
    calibrated = ip.ImperativePTQ(config)
    qmodel = calibrated.quantize(model)
    for batch in batches:
        qmodel(batch)
    calibrated.save_calibration_table(qmodel, tmp_path / "table.json")
    loading = ip.ImperativePTQ(config)
    loaded = loading.quantize(model)
    loading.load_calibration_table(loaded, tmp_path / "table.json")
    loading.convert(loaded)
    assert loaded.cls.runs_as_conv and loaded.box.runs_as_conv
    old = converted_from_old_table(model, batches, tmp_path)
    assert not old.cls.runs_as_conv and not old.box.runs_as_conv


class _FunctionalHead(paddle.nn.Layer):
    """A head written as x2paddle writes it: ``paddle.matmul`` on a parameter, then a bias."""

    def __init__(self, weight: np.ndarray) -> None:
        super().__init__()
        self.weight = self.create_parameter(list(weight.shape))
        self.weight.set_value(weight)
        self.bias = self.create_parameter([weight.shape[1]], is_bias=True)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.matmul(paddle.nn.functional.relu(x), self.weight) + self.bias


def test_a_functional_matmul_head_runs_as_a_conv(tmp_path) -> None:
    """The PP-OCRv4 recognizer converted by x2paddle computes its CTC head this way."""
    from models import converted

    rng = np.random.default_rng(4)
    model = _FunctionalHead(_weight(40, 500, 1.0, seed=7))
    batches = [paddle.to_tensor(rng.standard_normal((6, 9, 40)).astype("float32")) for _ in range(4)]
    qmodel = converted(model, batches)
    sites = [layer for layer in qmodel.sublayers() if isinstance(layer, ip.QuantizedLayer)]
    assert len(sites) == 1 and sites[0].runs_as_conv
    x = rng.standard_normal((3, 9, 40)).astype("float32")
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    reference = model(paddle.to_tensor(x)).numpy()
    # Measured 0.36 with the fc's weight, 7.3e-2 with the conv's (u8 input, KL clipping).
    assert np.linalg.norm(simulated - reference) / np.linalg.norm(reference) < 0.1
    prefix = str(tmp_path / "m")
    ip.ImperativePTQ().save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 9, 40], "float32", "x")])
    assert int8_report(prefix).int8 == {"fused_conv2d": 1}
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    assert np.abs(ran - simulated).max() / np.abs(simulated).max() < 2e-6


@pytest.mark.parametrize("bits", [4, 6])
def test_a_narrow_head_runs_as_a_conv_on_its_8_bit_requantization(bits, tmp_path) -> None:
    """Paddle requantizes a conv's narrower weight per channel to 8 bits
    (``quant_layers.onednn_conv_weight``); the simulation of the conv route computes with that.
    4 bits: the fc's weight 0.35 from fp32, the conv's 0.12; output 0.34 -> 0.12 off fp32."""
    paddle.seed(0)
    rng = np.random.default_rng(1)
    model = _Head(_weight(120, 600, 1.0), False)
    model.eval()
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer(quant_bits=bits)))
    qmodel = ptq.quantize(model)
    for _ in range(4):
        qmodel(paddle.to_tensor(rng.standard_normal((16, 120)).astype("float32")))
    ptq.convert(qmodel)
    assert qmodel.head.runs_as_conv and qmodel.head.requantized_conv
    x = rng.standard_normal((16, 120)).astype("float32")
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    prefix = str(tmp_path / "m")
    ptq.save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 120], "float32", "x")])
    assert int8_report(prefix).int8 == {"fused_conv2d": 1}
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    # Measured 1.9e-7 (4 bits), 3.0e-7 (6 bits).
    assert np.abs(ran - simulated).max() / np.abs(simulated).max() < 2e-6


@pytest.mark.parametrize("model_name", ["conv_head", "relu6_head", "resnet_style"])
def test_a_head_after_an_int8_global_pool_runs_as_a_conv_as_simulated(model_name, tmp_path, monkeypatch) -> None:
    """The head pool's u8 codes reach the conv through a flatten and the conv's reshape."""
    from imperative_ptq import quant_layers
    from test_head_pool_int8 import _exported

    monkeypatch.setattr(quant_layers, "FC_WEIGHT_ERROR_LIMIT", -float("inf"))  # every head a conv
    qmodel, prefix, x = _exported(model_name, "x86", tmp_path)
    assert [name for name, layer in qmodel.named_sublayers() if getattr(layer, "runs_as_conv", False)]
    report = int8_report(prefix)
    assert "fc" not in report.int8 and report.int8_other.get("pool2d") == 1 and not report.fp32, report
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    # Measured 2.3e-7 .. 2.4e-7.
    assert np.abs(ran - simulated).max() / np.abs(simulated).max() < 2e-6


class _FunctionalChain(paddle.nn.Layer):
    """Two damaged Linear layers joined by a functional op, as a transformer's are: calibration
    does not see the second read the first, so the first looks unread too."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = paddle.nn.Linear(48, 300), paddle.nn.Linear(300, 300)
        self.first.weight.set_value(_weight(48, 300, 1.0, seed=8))
        self.second.weight.set_value(_weight(300, 300, 1.0, seed=9))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.second(paddle.nn.functional.gelu(self.first(x)))


def test_a_linear_read_through_a_functional_op_stays_a_fc() -> None:
    """Only the last layer with a weight is a head (a BERT-shaped encoder with all 37 Linear
    layers as convs ran 1.2x slower)."""
    from models import converted

    rng = np.random.default_rng(5)
    batches = [paddle.to_tensor(rng.standard_normal((8, 48)).astype("float32")) for _ in range(4)]
    qmodel = converted(_FunctionalChain(), batches)
    assert not qmodel.first.runs_as_conv and qmodel.second.runs_as_conv


class _ChannelsLastBlock(paddle.nn.Layer):
    """A ConvNeXt block: 7x7 depthwise conv, channels-last LayerNorm, Linear -> GELU -> Linear
    on the rank-4 ``[N, H, W, C]`` tensor, layer scale, residual; then a classifier head."""

    def __init__(self, dim: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = paddle.nn.Conv2D(3, dim, 2, stride=2)
        self.dwconv = paddle.nn.Conv2D(dim, dim, 7, padding=3, groups=dim)
        self.norm = paddle.nn.LayerNorm(dim, epsilon=1e-6)
        self.pwconv1, self.act, self.pwconv2 = paddle.nn.Linear(dim, 4 * dim), paddle.nn.GELU(), paddle.nn.Linear(4 * dim, dim)
        self.gamma = self.create_parameter([dim], default_initializer=paddle.nn.initializer.Constant(0.5))
        self.pool, self.head = paddle.nn.AdaptiveAvgPool2D(1), paddle.nn.Linear(dim, classes)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.stem(x)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x).transpose([0, 2, 3, 1])))))
        x = x + (self.gamma * y).transpose([0, 3, 1, 2])
        return self.head(self.pool(x).flatten(1))


@pytest.mark.parametrize("target", ["x86", "x86-vnni"])
def test_channels_last_linear_layers_run_int8_as_convs(target, tmp_path) -> None:
    """Paddle Inference has no int8 fc for a rank-4 input: ConvNeXt's pointwise Linear layers
    (most of its work) ran fp32 and convert kept them fp32. They run as int8 1x1 convs now, in
    Paddle Inference and ONNX Runtime as simulated (ConvNeXt-T at 224, batch 8: 1.02x -> 2.01x
    fp32 in Paddle Inference, benchmarks/inference.py)."""
    import onnxruntime as ort

    from models import converted

    paddle.seed(0)
    rng = np.random.default_rng(6)
    model = _ChannelsLastBlock()
    batches = [paddle.to_tensor(rng.standard_normal((4, 3, 16, 16)).astype("float32")) for _ in range(4)]
    qmodel = converted(model, batches, target)
    assert qmodel.pwconv1.runs_as_conv and qmodel.pwconv2.runs_as_conv
    x = rng.standard_normal((3, 3, 16, 16)).astype("float32")
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    reference = model(paddle.to_tensor(x)).numpy()
    # Measured 3.5e-2 (x86) and 3.3e-2 (x86-vnni): random weights, KL clipping.
    assert np.linalg.norm(simulated - reference) / np.linalg.norm(reference) < 0.05
    spec = [paddle.static.InputSpec([None, 3, None, None], "float32", "x")]
    prefix = str(tmp_path / "m")
    ip.ImperativePTQ().save_quantized_model(qmodel, prefix, spec)
    report = int8_report(prefix)
    # On x86 the stem and the depthwise conv stay fp32 (signed inputs); the head stays a fc.
    assert report.int8 == {"fused_conv2d": 2 if target == "x86" else 4, "fc": 1}, report
    onnx_path = export_onnx(qmodel, str(tmp_path / "m.onnx"), spec)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    by_onnx = session.run(None, {session.get_inputs()[0].name: x})[0]
    scale = np.abs(simulated).max()
    # Measured 6.9e-8 (x86) and 1.4e-7 (x86-vnni).
    assert np.abs(by_onnx - simulated).max() / scale < 2e-6
    if target == "x86-vnni":
        from imperative_ptq.cpu import cpu_info

        if not cpu_info().vnni:
            return  # s8 inputs are exact on VNNI kernels only
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    # Measured 1.4e-7 (x86; x86-vnni, on this AVX2 CPU, is 0.26 off: its s8 inputs saturate).
    assert np.abs(ran - simulated).max() / scale < 2e-6


def test_linear_layers_chained_on_a_rank_4_input_export(tmp_path) -> None:
    """Two Linear layers in a row on a rank-4 input with two dynamic dimensions: the second's
    rewrite reads the shape of the first's output, which the first's reshape to run-time
    dimensions had left empty (the export failed: "The 'shape' attribute in ReshapeOp is
    invalid")."""
    from models import converted

    paddle.seed(0)
    model = paddle.nn.Sequential(paddle.nn.Linear(16, 24), paddle.nn.Linear(24, 8))
    rng = np.random.default_rng(7)
    qmodel = converted(model, [paddle.to_tensor(rng.standard_normal((2, 3, 5, 16)).astype("float32")) for _ in range(3)])
    assert qmodel[0].runs_as_conv and qmodel[1].runs_as_conv
    prefix = str(tmp_path / "m")
    ip.ImperativePTQ().save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 3, None, 16], "float32", "x")])
    assert int8_report(prefix).int8 == {"fused_conv2d": 2}
    x = rng.standard_normal((2, 3, 7, 16)).astype("float32")
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    # Measured 1.6e-7.
    assert np.abs(ran - simulated).max() / np.abs(simulated).max() < 2e-6


def test_affine_weights_on_a_rank_4_input_run_as_int8_convs_on_their_thresholds(tmp_path, caplog) -> None:
    """Zero-point weights (``PerChannelMinMaxQuantizer()``'s default) are simulated on their
    thresholds ``max(|min|, |max|)``, as the runtimes read them, so a Linear on a rank-4 input
    takes the 1x1 conv route and runs what the simulation computes. (Simulated on their zero
    points they were 2.1% of the largest output off the runtime, and these Linears stayed
    fp32.)"""
    paddle.seed(0)
    model = paddle.nn.Sequential(paddle.nn.Linear(16, 24), paddle.nn.ReLU(), paddle.nn.Linear(24, 8))
    model.eval()
    rng = np.random.default_rng(8)
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelMinMaxQuantizer()))
    qmodel = ptq.quantize(model)
    for _ in range(3):
        qmodel(paddle.to_tensor(rng.standard_normal((2, 3, 5, 16)).astype("float32")))
    table = ptq.calibration_table(qmodel)
    assert len(table["0"]["weight_zero_point"]) == 24  # the table keeps the affine parameters
    with caplog.at_level("WARNING", logger="imperative_ptq.convert"):
        ptq.convert(qmodel)
    assert "2 layers were calibrated with zero points" in caplog.text
    for name in ("0", "2"):
        layer = getattr(qmodel, name)
        assert isinstance(layer, ip.QuantizedLayer) and layer.runs_as_conv
        weight = getattr(model, name).weight.numpy()
        np.testing.assert_array_equal(layer.weight_thresholds.numpy(), np.abs(weight).max(axis=0))
    prefix = str(tmp_path / "m")
    ptq.save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 3, None, 16], "float32", "x")])
    assert int8_report(prefix).int8 == {"fused_conv2d": 2}
    x = rng.standard_normal((2, 3, 7, 16)).astype("float32")
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    assert np.abs(ran - simulated).max() / np.abs(simulated).max() < 2e-6


class _FunctionalChannelsLast(paddle.nn.Layer):
    """x2paddle's form of ConvNeXt's pointwise layers: ``paddle.matmul`` on parameters of a
    channels-last tensor, a bias add, a GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 16, 1)
        self.w1, self.b1 = self.create_parameter([16, 32]), self.create_parameter([32], is_bias=True)
        self.w2 = self.create_parameter([32, 8])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = paddle.nn.functional.relu(self.conv(x)).transpose([0, 2, 3, 1])
        y = paddle.nn.functional.gelu(paddle.matmul(y, self.w1) + self.b1)
        return paddle.matmul(y, self.w2)


def test_functional_matmuls_on_a_channels_last_input_run_as_convs(tmp_path) -> None:
    import onnxruntime as ort

    from models import converted

    paddle.seed(0)
    rng = np.random.default_rng(9)
    qmodel = converted(_FunctionalChannelsLast(), [paddle.to_tensor(rng.random((2, 3, 6, 5)).astype("float32")) for _ in range(3)])
    sites = {name: layer.runs_as_conv for name, layer in qmodel.named_sublayers() if isinstance(layer, ip.QuantizedLayer)}
    assert sites == {"conv": False, "w1_matmul": True, "w2_matmul": True}, sites
    spec = [paddle.static.InputSpec([None, 3, None, None], "float32", "x")]
    prefix = str(tmp_path / "m")
    ip.ImperativePTQ().save_quantized_model(qmodel, prefix, spec)
    assert int8_report(prefix).int8 == {"fused_conv2d": 3}
    x = rng.random((2, 3, 7, 4)).astype("float32")
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    scale = np.abs(simulated).max()
    # Measured 2.1e-7 (Paddle Inference) and 1.6e-7 (ONNX Runtime).
    assert np.abs(predict(create_predictor(prefix, num_threads=1), x)[0] - simulated).max() / scale < 2e-6
    session = ort.InferenceSession(str(export_onnx(qmodel, str(tmp_path / "m.onnx"), spec)), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {session.get_inputs()[0].name: x})[0] - simulated).max() / scale < 2e-6


def test_fine_tuning_computes_a_conv_route_layer_as_converted(tmp_path) -> None:
    """QAT with learned thresholds: Paddle requantizes a conv's weight per channel when the
    fine-tuned codes no longer reach +-127, and the converted layer of a Linear run as a conv
    follows it; the training forward did not (0.0045 of the output off the converted model)."""
    paddle.seed(0)
    rng = np.random.default_rng(10)
    model = _ChannelsLastBlock()
    model.eval()
    batches = [paddle.to_tensor(rng.standard_normal((4, 3, 16, 16)).astype("float32")) for _ in range(3)]
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer()))
    calibrated = ptq.quantize(model)
    for batch in batches:
        calibrated(batch)
    qat = ip.ImperativeQAT(ptq, learnable_scales=True)
    trainable = qat.quantize(calibrated)
    assert trainable.pwconv1.runs_as_conv and trainable.pwconv2.runs_as_conv
    optimizer = paddle.optimizer.Adam(1e-3, parameters=trainable.parameters())
    labels = paddle.to_tensor(rng.integers(0, 10, (4,)))
    for batch in batches * 2:
        paddle.nn.functional.cross_entropy(trainable(batch), labels).backward()
        optimizer.step()
        optimizer.clear_grad()
    trainable.eval()
    fine_tuned = qat.convert(trainable)
    assert fine_tuned.pwconv1.runs_as_conv and fine_tuned.pwconv2.runs_as_conv
    x = paddle.to_tensor(rng.standard_normal((2, 3, 16, 16)).astype("float32"))
    simulated = fine_tuned(x).numpy()
    np.testing.assert_array_equal(trainable(x).numpy(), simulated)
    prefix = str(tmp_path / "m")
    ptq.save_quantized_model(fine_tuned, prefix, [paddle.static.InputSpec([None, 3, 16, 16], "float32", "x")])
    ran = predict(create_predictor(prefix, num_threads=1), x.numpy())[0]
    # Measured 5.0e-7.
    assert np.abs(ran - simulated).max() / np.abs(simulated).max() < 2e-6
