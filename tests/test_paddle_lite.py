"""The ``arm`` target's program, for Paddle Lite's ``opt``.

Paddle 3.3.1 traces ``relu6`` without ``threshold`` and ``swish`` without ``beta``, which Lite
2.13 requires, and ``opt`` crashes on a flatten that a transpose reads (ViT, MLP-Mixer, Swin):
the export writes those attributes and such flattens as reshapes
(:mod:`imperative_ptq.export.paddle_lite`), and its batch norm takes NCHW only: channels-last
ops run on NCHW between transposes. ``brelu`` and ``selu``, which Lite has no ARM kernel for, are
written as the ops that compute them, and pruned outputs Lite requires are put back. The forms are checked in every run; ``opt`` itself
when it is installed (``PADDLE_LITE_OPT=/path/to/paddle_lite_opt`` or ``paddle_lite_opt`` on the
PATH; its wheel exists for Python <= 3.10 only, so it usually lives in an environment of its
own, and CI skips those tests).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess

import numpy as np
import paddle
import pytest
from paddle.base.proto import framework_pb2

import imperative_ptq as ip
from imperative_ptq.export import create_predictor, int8_report, predict
from imperative_ptq.export.paddle_lite import flatten_as_reshape_shape
from imperative_ptq.models import MnistConvNet

nn = paddle.nn


def _paddle_lite_opt() -> str | None:
    return os.environ.get("PADDLE_LITE_OPT") or shutil.which("paddle_lite_opt")


class _Lenet(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2D(1, 6, 5, padding=2), nn.BatchNorm2D(6), nn.ReLU(), nn.MaxPool2D(2, 2),
            nn.Conv2D(6, 16, 5), nn.ReLU(), nn.MaxPool2D(2, 2),
        )
        self.fc1, self.fc2 = nn.Linear(400, 120), nn.Linear(120, 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc2(nn.functional.relu(self.fc1(paddle.flatten(self.features(x), 1))))


class _TokensOfFeatures(nn.Layer):
    """ReLU6 and Swish convs whose feature map becomes tokens (``flatten(2).transpose``, as in
    a ViT or an MLP-Mixer) for a Linear and a SiLU (Paddle's ``silu`` op, which Lite reads),
    and a flatten that writes the output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu6 = nn.Conv2D(3, 8, 3, padding=1), nn.ReLU6()
        self.conv2, self.swish, self.silu = nn.Conv2D(8, 16, 1), nn.Swish(), nn.Silu()
        self.tokens = nn.Linear(16, 8)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        features = self.swish(self.conv2(self.relu6(self.conv1(x))))
        tokens = self.silu(self.tokens(features.flatten(2).transpose([0, 2, 1])))  # [N, HW, 8]
        return tokens.transpose([0, 2, 1]).reshape([-1, 8, 4, 4]).flatten(1)


class _ChannelsLast(nn.Layer):
    """NHWC convs and batch norm (Lite 2.13's batch norm takes NCHW only), a depthwise conv
    before a Hardswish, an NHWC global pool and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2D(3, 8, 3, padding=1, data_format="NHWC")
        self.norm = nn.BatchNorm2D(8, data_format="NHWC")
        self.depthwise = nn.Conv2D(8, 8, 3, padding=1, groups=8, data_format="NHWC")
        self.pool = nn.AdaptiveAvgPool2D(1, data_format="NHWC")
        self.head = nn.Linear(8, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        features = nn.functional.relu(self.norm(self.conv(x)))
        features = nn.functional.hardswish(self.depthwise(features))
        return self.head(self.pool(features).flatten(1))


class _OpsWithoutLiteKernels(nn.Layer):
    """``F.hardtanh`` (Paddle's ``brelu``), an InstanceNorm (whose saved statistics Paddle's
    save prunes) and a SELU between convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2D(3, 8, 3, padding=1), nn.Conv2D(8, 8, 1), nn.Conv2D(8, 4, 1)
        self.norm, self.selu = nn.InstanceNorm2D(8), nn.SELU()

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = self.conv2(nn.functional.hardtanh(self.conv1(x), -0.5, 1.5))
        return self.conv3(self.selu(self.norm(y))).flatten(1)


def _mobilenet_v2() -> nn.Layer:
    return paddle.vision.models.mobilenet_v2(num_classes=10)


#: name -> (factory, input shape, convs, Linear layers): every one int8 in Lite's program.
MODELS = {
    "lenet": (_Lenet, [1, 28, 28], 2, 2),
    "convnet": (lambda: MnistConvNet(channels=(16, 32)), [1, 28, 28], 4, 0),
    "tokens_of_features": (_TokensOfFeatures, [3, 4, 4], 2, 1),
    "mobilenet_v2": (_mobilenet_v2, [3, 32, 32], 52, 1),
    "channels_last": (_ChannelsLast, [8, 8, 3], 2, 1),
    "ops_without_lite_kernels": (_OpsWithoutLiteKernels, [3, 6, 6], 3, 0),
}


def _arm_export(name: str, directory) -> tuple[str, nn.Layer, np.ndarray]:
    factory, shape, _, _ = MODELS[name]
    paddle.seed(0)
    model = factory()
    model.eval()
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer(), target="arm"))
    qmodel = ptq.quantize(model)
    rng = np.random.default_rng(0)
    for _ in range(3):
        qmodel(paddle.to_tensor(rng.standard_normal([4, *shape]).astype("float32")))
    prefix = str(directory / name)
    ptq.save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, *shape], "float32", "x")])
    return prefix, qmodel, rng.standard_normal([2, *shape]).astype("float32")


def _saved_ops(prefix: str) -> list:
    program = framework_pb2.ProgramDesc()
    with open(prefix + ".pdmodel", "rb") as file:
        program.ParseFromString(file.read())
    return [op for block in program.blocks for op in block.ops]


@pytest.mark.parametrize("shape, start, stop", [
    ([-1, 8, 4, 4], 2, 3), ([-1, 8, 4, 4], 1, 3), ([-1, 8, 4, 4], 1, 2), ([-1, 8, 4, 4], 0, 1),
    ([-1, 8, 4, 4], 2, -1), ([2, 3, 4, 5, 6], 1, 3), ([-1, 6], 0, 1), ([-1, 6], 1, 1),
])
def test_reshape_shape_computes_the_flatten(shape, start, stop) -> None:
    """The shape, read as Paddle's reshape reads it (``0`` copies the input's dimension at the
    same position, ``-1`` takes the rest), gives what ``paddle.flatten`` gives."""
    concrete = [3 if size == -1 else size for size in shape]
    x = np.arange(np.prod(concrete), dtype=np.float32).reshape(concrete)
    written = flatten_as_reshape_shape(shape, start, stop)
    target = [concrete[i] if size == 0 else size for i, size in enumerate(written)]
    expected = paddle.flatten(paddle.to_tensor(x), start, stop).numpy()
    np.testing.assert_array_equal(x.reshape(target), expected)


def test_no_reshape_shape_where_a_later_dimension_is_unknown() -> None:
    assert flatten_as_reshape_shape([-1, 8, -1, 4], 0, 1) is None  # the -1 after the merged one
    assert flatten_as_reshape_shape([], 0, 0) is None
    assert flatten_as_reshape_shape([-1, 8, 4, -1], 1, 2) is None


def test_arm_program_has_the_attributes_and_reshapes_lite_reads(tmp_path) -> None:
    prefix, qmodel, x = _arm_export("tokens_of_features", tmp_path)
    ops = _saved_ops(prefix)
    attributes = {(op.type, attr.name): attr.f for op in ops for attr in op.attrs}
    assert attributes[("relu6", "threshold")] == 6.0 and attributes[("swish", "beta")] == 1.0
    assert "flatten_contiguous_range" not in {op.type for op in ops}
    # The same function: Paddle's fp32 executor runs the QDQ program as simulated.
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    ran = predict(create_predictor(prefix, int8=False), x)[0]
    np.testing.assert_allclose(ran, simulated, rtol=0, atol=1e-5 * np.abs(simulated).max())


def test_arm_program_runs_channels_last_ops_on_nchw(tmp_path) -> None:
    prefix, qmodel, x = _arm_export("channels_last", tmp_path)
    layouts = [
        attr.s for op in _saved_ops(prefix) for attr in op.attrs
        if attr.name in ("data_format", "data_layout")
    ]
    assert layouts and set(layouts) <= {"NCHW", "AnyLayout"}, layouts
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    ran = predict(create_predictor(prefix, int8=False), x)[0]
    np.testing.assert_allclose(ran, simulated, rtol=0, atol=1e-5 * np.abs(simulated).max())


def test_arm_program_has_lite_kernels_for_every_op(tmp_path) -> None:
    prefix, qmodel, x = _arm_export("ops_without_lite_kernels", tmp_path)
    ops = _saved_ops(prefix)
    assert not {"brelu", "selu"} & {op.type for op in ops}
    (norm,) = [op for op in ops if op.type == "instance_norm"]
    written = {slot.parameter: list(slot.arguments) for slot in norm.outputs}
    assert written["SavedMean"] and written["SavedVariance"], written
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    ran = predict(create_predictor(prefix, int8=False), x)[0]
    np.testing.assert_allclose(ran, simulated, rtol=0, atol=1e-5 * np.abs(simulated).max())


def test_x86_program_keeps_paddles_forms(tmp_path) -> None:
    """The forms are the ``arm`` target's: an x86 export is what Paddle Inference reads."""
    paddle.seed(0)
    model = _TokensOfFeatures()
    model.eval()
    ptq = ip.ImperativePTQ()
    qmodel = ptq.quantize(model)
    qmodel(paddle.randn([4, 3, 4, 4]))
    prefix = str(tmp_path / "x86")
    ptq.save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 3, 4, 4], "float32", "x")])
    ops = _saved_ops(prefix)
    assert "flatten_contiguous_range" in {op.type for op in ops}
    assert not any(attr.name == "beta" for op in ops if op.type == "swish" for attr in op.attrs)
    report = int8_report(prefix)
    assert report.target == "x86" and "Paddle Lite" not in report.summary(), report.summary()


def test_int8_report_of_an_arm_export_says_it_is_a_paddle_lite_program(tmp_path, caplog) -> None:
    """Before: it reported Paddle Inference's x86 passes on it as if that were what runs."""
    prefix, _, _ = _arm_export("lenet", tmp_path)
    with caplog.at_level(logging.WARNING, logger="imperative_ptq.export"):
        report = int8_report(prefix)
    assert report.target == "arm"
    assert "exported for target 'arm', a program for Paddle Lite" in report.summary(), report.summary()
    assert "exported for target 'arm'" in caplog.text and "Paddle Lite" in caplog.text, caplog.text


@pytest.mark.skipif(_paddle_lite_opt() is None, reason="Paddle Lite opt not installed")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_paddle_lite_opt_converts_to_arm_int8_kernels(name, tmp_path) -> None:
    _, _, num_convs, num_linears = MODELS[name]
    prefix, _, _ = _arm_export(name, tmp_path)
    out = str(tmp_path / f"{name}_arm")
    result = subprocess.run(
        [_paddle_lite_opt(), f"--model_file={prefix}.pdmodel", f"--param_file={prefix}.pdiparams",
         "--valid_targets=arm", f"--optimize_out={out}", "--optimize_out_type=naive_buffer"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    with open(out + ".nb", "rb") as file:
        program = file.read()
    # Lite's kernel names: conv2d/int8_out/..., fc/int8out/... (fp32_out, fp32out: an int8
    # kernel writing floats); never an fp32 ("def") conv or fc.
    kernels = re.findall(rb"\b(conv2d|depthwise_conv2d|fc)/(int8_out|fp32_out|int8out|fp32out|def)/", program)
    assert not [kind for kind, form in kernels if form == b"def"], kernels
    convs = [kind for kind, _ in kernels if kind != b"fc"]
    assert len(convs) == num_convs and kernels.count((b"fc", b"int8out")) + kernels.count((b"fc", b"fp32out")) == num_linears
    assert b"enable_int8" in program
