"""An int8 layer's input is quantized for that layer alone: an op computing in float beside it
(an upsample, an activation, a residual add) reads the float value in the simulation, and in
ONNX Runtime."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.export import export_onnx
from models import converted, largest_error_in_onnx_runtime

onnxruntime = pytest.importorskip("onnxruntime")
F = paddle.nn.functional


class _LateralTwoReaders(paddle.nn.Layer):
    """An FPN level: a 1x1 lateral read by a padded 3x3 output conv (int8 on a signed input)
    and by a float op."""

    def __init__(self, reader: str) -> None:
        super().__init__()
        self.lateral = paddle.nn.Conv2D(3, 8, 1)
        self.output = paddle.nn.Conv2D(8, 8, 3, padding=1)
        self.reader = reader

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        lateral = self.lateral(x)
        if self.reader == "upsample":
            beside = F.interpolate(lateral, scale_factor=2, mode="nearest")[:, :, ::2, ::2]
        else:
            beside = F.hardswish(lateral)
        return self.output(lateral) + beside


class _TransposedBlockInput(paddle.nn.Layer):
    """A ConvNeXt-style block input: a channels-last LayerNorm transposed to channels-first,
    read by a padded depthwise conv (int8 on a signed input) and by the residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = paddle.nn.LayerNorm(8)
        self.depthwise = paddle.nn.Conv2D(8, 8, 3, padding=1, groups=8)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        block_input = self.norm(x).transpose([0, 3, 1, 2])
        return block_input + self.depthwise(block_input)


class _PooledBeside(paddle.nn.Layer):
    """A ReLU of an int8 conv read by an int8 1x1 conv and by a float average pool (a
    squeeze-excite squeeze: a pool read by a conv runs fp32)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu = paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.ReLU()
        self.expand = paddle.nn.Conv2D(8, 8, 1)
        self.pool, self.squeeze = paddle.nn.AdaptiveAvgPool2D(1), paddle.nn.Conv2D(8, 8, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = self.relu(self.conv(x))
        return self.expand(y) + self.squeeze(self.pool(y))


class _SpatialSoftmax(paddle.nn.Layer):
    """A ReLU of a conv read by an int8 1x1 conv (attention logits) and, reshaped or scaled, by
    float ops: a spatial-softmax pooling (keypoint heads, attention pooling)."""

    def __init__(self, reader: str) -> None:
        super().__init__()
        self.conv, self.logits = paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.Conv2D(8, 4, 1)
        self.reader = reader

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        features = F.relu(self.conv(x))
        attention = F.softmax(self.logits(features).flatten(2), -1)
        if self.reader == "scale":
            return attention * (2.0 * features).flatten(2).mean(1, keepdim=True)
        return paddle.bmm(attention, features.reshape([-1, 8, 64]).transpose([0, 2, 1]))


_READERS = {
    "reshape for a matmul": lambda: _SpatialSoftmax("reshape"),
    "scale": lambda: _SpatialSoftmax("scale"),
    "upsample": lambda: _LateralTwoReaders("upsample"),
    "hardswish": lambda: _LateralTwoReaders("hardswish"),
    "residual add through a transpose": _TransposedBlockInput,
    "average pool": _PooledBeside,
}


@pytest.mark.parametrize("target", ["arm", "x86", "x86-vnni"])
@pytest.mark.parametrize("reader", sorted(_READERS))
def test_float_op_reads_the_float_value_of_an_int8_layer_input(reader, target, tmp_path) -> None:
    paddle.seed(0)
    model = _READERS[reader]()
    rng = np.random.default_rng(0)
    qmodel = converted(model, [paddle.to_tensor(rng.standard_normal([4, 3, 8, 8]).astype("float32")) for _ in range(4)], target)
    x = rng.standard_normal([3, 3, 8, 8]).astype("float32")
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    spec = [paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")]
    path = export_onnx(qmodel, str(tmp_path / "m.onnx"), spec)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    ran = session.run(None, {"x": x})[0]
    error = float(np.abs(ran - simulated).max() / np.abs(simulated).max())
    # Measured 1.4e-7 / 1.7e-7 / 1.2e-7 (reading the conv's input codes: 0.29% / 0.46% / 0.51% of
    # the largest output; upsample / hardswish / residual add); the average pool 6e-8 (0.092% reading them);
    # the reshape and the scale 1.2e-7 / 1.2e-7 .. 1.8e-7 (1.0-1.1% / 0.55% reading the conv's codes).
    assert error <= 1e-5, error


class _PooledProjection(paddle.nn.Layer):
    """DLA's downsampling tree: a ReLU of an int8 conv read by a strided int8 3x3 conv and by
    a max-pool whose output a 1x1 projection conv reads on a threshold of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu = paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.ReLU()
        self.strided = paddle.nn.Conv2D(8, 8, 3, stride=2, padding=1)
        self.pool, self.project = paddle.nn.MaxPool2D(2, 2), paddle.nn.Conv2D(8, 8, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = self.relu(self.conv(x))
        return paddle.concat([self.strided(y), self.project(self.pool(y))], axis=1)


@pytest.mark.parametrize("target", ["arm", "x86", "x86-vnni"])
def test_max_pool_beside_an_int8_conv_reads_the_float_value(target, tmp_path) -> None:
    """Quantizing commutes with a max only on one grid: the pool read the codes of the strided
    conv's input, clipped at its threshold, where the simulation pools the float value and the
    projection quantizes that on its own threshold (measured before: 15% of the largest output
    off on every target; Paddle Inference pools the float value, as simulated)."""
    from models import largest_error_in_paddle_inference
    from ties import relative_error, simulation_up_to_ties

    paddle.seed(0)
    rng = np.random.default_rng(0)
    qmodel = converted(_PooledProjection(), [paddle.to_tensor(rng.random([4, 3, 16, 16], np.float32)) for _ in range(4)], target)
    strided, project = qmodel.strided.input_thresholds[0], qmodel.project.input_thresholds[0]
    assert project > 1.1 * strided  # the pool's maxima reach past the strided conv's clip
    x = rng.random([4, 3, 16, 16], np.float32)
    spec = [paddle.static.InputSpec([None, 3, 16, 16], "float32", "x")]
    session = onnxruntime.InferenceSession(export_onnx(qmodel, str(tmp_path / "m.onnx"), spec),
                                           providers=["CPUExecutionProvider"])
    ran = session.run(None, {"x": x})[0]
    simulated, _ = simulation_up_to_ties(lambda: qmodel(paddle.to_tensor(x)).numpy(), ran, 1e-5)
    assert relative_error(ran, simulated) <= 1e-5
    if target != "arm":  # (arm: Paddle Lite's kernels)
        assert largest_error_in_paddle_inference(qmodel, x, tmp_path) <= 2e-6


class _TwoReaders(paddle.nn.Layer):
    """A ReLU read by two layers (1x1 and 3x3 convs, or two Linear layers), summed."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind == "conv":
            self.first = paddle.nn.Conv2D(3, 8, 3, padding=1)
            self.a, self.b = paddle.nn.Conv2D(8, 8, 1), paddle.nn.Conv2D(8, 8, 3, padding=1)
        else:
            self.first, self.a, self.b = paddle.nn.Linear(16, 8), paddle.nn.Linear(8, 8), paddle.nn.Linear(8, 8)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = F.relu(self.first(x))
        return self.a(y) + self.b(y)


@pytest.mark.parametrize("target", ["arm", "x86"])
@pytest.mark.parametrize("kept", ["a", "b"])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_a_layer_kept_fp32_reads_the_float_value_beside_an_int8_reader(kind, kept, target, tmp_path) -> None:
    """A layer put back in fp32 by ``keep_fp32`` computes on the float input in the simulation
    (and in Paddle Inference); in ONNX Runtime it read the codes of the int8 layer beside it
    (measured before: 27% / 9% of the largest output off for the 1x1 / 3x3 conv kept, 0.3%
    for a Linear)."""
    from models import converted

    paddle.seed(0)
    model = _TwoReaders(kind)
    rng = np.random.default_rng(0)
    shape = [3, 16, 16] if kind == "conv" else [3, 16]
    qmodel = converted(model, [paddle.to_tensor(rng.standard_normal([2, *shape]).astype("float32")) for _ in range(3)], target)
    ip.keep_fp32(qmodel, [kept], model)
    assert isinstance(getattr(qmodel, "b" if kept == "a" else "a"), ip.QuantizedLayer)
    x = rng.standard_normal([2, *shape]).astype("float32")
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    spec = [paddle.static.InputSpec([None, *shape], "float32", "x")]
    path = export_onnx(qmodel, str(tmp_path / "m.onnx"), spec)
    ran = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    # Measured 7.9e-8 .. 2.5e-7.
    assert np.abs(ran - simulated).max() / np.abs(simulated).max() <= 1e-5


class _FloatResidualBranch(paddle.nn.Layer):
    """An SRResNet block: conv -> BatchNorm -> PReLU -> conv -> BatchNorm added to the block
    input. On ``x86`` every conv reads a signed input through padding and stays fp32."""

    def __init__(self) -> None:
        super().__init__()
        self.head = paddle.nn.Sequential(paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.PReLU())
        self.branch = paddle.nn.Sequential(
            paddle.nn.Conv2D(8, 8, 3, padding=1), paddle.nn.BatchNorm2D(8), paddle.nn.PReLU(),
            paddle.nn.Conv2D(8, 8, 3, padding=1), paddle.nn.BatchNorm2D(8),
        )

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = self.head(x)
        return h + self.branch(h)


def test_a_residual_branch_behind_an_fp32_conv_is_added_in_float(tmp_path) -> None:
    """``int8_residual_branches`` quantizes a branch's BatchNorm output so that ONNX Runtime
    runs the conv in front of it int8; behind a conv the simulation keeps fp32 it only moved
    the sum (measured before: 12% of the largest output off the simulation)."""
    from models import converted, randomize_batch_norm_statistics

    paddle.seed(0)
    model = _FloatResidualBranch()
    randomize_batch_norm_statistics(model, 0)
    rng = np.random.default_rng(0)
    shape = [3, 12, 12]
    qmodel = converted(model, [paddle.to_tensor(rng.standard_normal([4, *shape]).astype("float32")) for _ in range(2)])
    assert not any(isinstance(layer, ip.QuantizedLayer) for layer in qmodel.sublayers())
    x = rng.standard_normal([4, *shape]).astype("float32")
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    spec = [paddle.static.InputSpec([None, *shape], "float32", "x")]
    path = export_onnx(qmodel, str(tmp_path / "m.onnx"), spec)
    ran = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    # Measured 4.2e-7.
    assert np.abs(ran - simulated).max() / np.abs(simulated).max() <= 1e-5


class _ReturnsConvOutput(paddle.nn.Layer):
    """conv -> BatchNorm -> ReLU -> conv, and the first conv's output (before its BatchNorm)
    returned too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.head = paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.BatchNorm2D(8), paddle.nn.Conv2D(8, 4, 1)

    def forward(self, x: paddle.Tensor):
        features = self.conv(x)
        return self.head(F.relu(self.norm(features))), features


@pytest.mark.parametrize("target", ["arm", "x86"])
def test_a_returned_conv_output_is_not_absorbed_into_its_batch_norm(target, tmp_path) -> None:
    """The ONNX converter folded the BatchNorm into the conv as its only reader and never
    wrote the returned tensor: the export failed with a ``KeyError`` on it."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    qmodel = converted(_ReturnsConvOutput(), [paddle.to_tensor(rng.random([4, 3, 8, 8]).astype("float32")) for _ in range(4)], target)
    x = rng.random([3, 3, 8, 8]).astype("float32")
    simulated = [t.numpy() for t in qmodel(paddle.to_tensor(x))]
    path = export_onnx(qmodel, str(tmp_path / "m.onnx"), [paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")])
    ran = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for got, expected in zip(ran, simulated):
        assert float(np.abs(got - expected).max() / np.abs(expected).max()) <= 1e-5


class _SharedLinearOnScaledInput(paddle.nn.Layer):
    """One Linear called on ``a`` and on ``a`` scaled (``scale``: ``2 * a``, ``10 * a`` of the
    signed input, ``a + 1``, ``-a``, or an inference ``Dropout(mode="downscale_in_infer")``)."""

    def __init__(self, scaling: str) -> None:
        super().__init__()
        self.scaling = scaling
        self.fc = paddle.nn.Linear(6, 6)
        self.drop = paddle.nn.Dropout(0.5, mode="downscale_in_infer")

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        a = x if self.scaling == "times 10 signed" else F.relu(x)
        scaled = {
            "times 2": lambda: a * 2, "times 10 signed": lambda: 10 * a, "plus 1": lambda: a + 1,
            "negated": lambda: -a, "dropout": lambda: self.drop(a),
        }[self.scaling]()
        return self.fc(a) + 0.5 * self.fc(scaled)


@pytest.mark.parametrize("scaling, target", [
    ("times 2", "x86"), ("plus 1", "x86"), ("dropout", "x86"), ("negated", "x86"),
    ("times 10 signed", "arm"), ("times 10 signed", "x86-vnni"),
])
def test_a_scale_beside_an_int8_layer_reads_the_float_value(scaling, target, tmp_path) -> None:
    """The scale (or the dropout) read the codes its input was quantized on for the Linear's
    first call, both calls having one threshold: ONNX Runtime computed ``Q(Q(a) * k)`` where
    the simulation computes ``Q(a * k)`` (8e-3 .. 8e-2 of the largest output off). A sign
    flip keeps codes on their grid either way."""
    paddle.seed(0)
    model = _SharedLinearOnScaledInput(scaling)
    model.eval()
    rng = np.random.default_rng(0)
    qmodel = converted(model, [paddle.to_tensor(rng.standard_normal((4, 6)).astype(np.float32)) for _ in range(4)], target)
    assert isinstance(qmodel.fc, ip.QuantizedLayer)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    assert largest_error_in_onnx_runtime(qmodel, x, tmp_path) < 2e-6


class _FuseLayer(paddle.nn.Layer):
    """HRNet's fuse layer in small: a residual block's ReLU output (which Paddle writes, and the
    simulation holds, on u8 codes up to 255 for every reader) read by a strided conv and
    added to the upsampled lower-resolution branch."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = paddle.nn.Conv2D(3, 16, 3, padding=1), paddle.nn.Conv2D(16, 16, 3, padding=1)
        self.down, self.up = paddle.nn.Conv2D(16, 32, 3, stride=2, padding=1), paddle.nn.Conv2D(32, 16, 1)
        self.out = paddle.nn.Conv2D(16, 16, 3, padding=1)
        self.relus = paddle.nn.LayerList([paddle.nn.ReLU() for _ in range(4)])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        a = self.relus[0](self.stem(x))
        block = self.relus[1](self.conv(a) + a)
        low = self.relus[2](self.down(block))
        fused = self.relus[3](block + F.interpolate(self.up(low), scale_factor=2, mode="nearest"))
        return self.out(fused)


@pytest.mark.parametrize("target", ["x86", "x86-vnni"])
def test_a_block_output_on_codes_is_added_on_its_codes(target, tmp_path) -> None:
    """Measured before: ONNX Runtime 0.8-1.2% of the largest output off the simulation on every
    input (the add read the float value); 2.1e-7 .. 2.8e-7 after, ties aside."""
    from ties import relative_error, simulation_up_to_ties

    paddle.seed(0)
    rng = np.random.default_rng(0)
    qmodel = converted(_FuseLayer(), [paddle.to_tensor(rng.standard_normal([1, 3, 32, 32]).astype("float32")) for _ in range(8)], target)
    spec = [paddle.static.InputSpec([1, 3, 32, 32], "float32", "x")]
    session = onnxruntime.InferenceSession(
        export_onnx(qmodel, str(tmp_path / "m.onnx"), spec), providers=["CPUExecutionProvider"]
    )
    for _ in range(4):
        x = rng.standard_normal([1, 3, 32, 32]).astype("float32")
        ran = session.run(None, {"x": x})[0]
        simulated, _ = simulation_up_to_ties(lambda: qmodel(paddle.to_tensor(x)).numpy(), ran, 1e-5)
        assert relative_error(ran, simulated) < 1e-5
