"""Small models and helpers shared by the tests (import as ``from models import ...``)."""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, Iterable

import numpy as np
import paddle
import pytest
from paddle.vision.models.resnet import BasicBlock

from imperative_ptq import ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig
from imperative_ptq.cpu import cpu_info
from imperative_ptq.export import int8_report, save_quantized_model
from avx2_kernels import Avx2Runner, paddle_inference_outputs
from ties import relative_error, simulation_up_to_ties

#: The x86 targets, ``x86-vnni`` skipped on a CPU without VNNI or AMX (its signed int8 inputs
#: saturate there, and its 8-bit LSTM weights are exact only with VNNI). Test ids stay ``x86``
#: and ``x86-vnni``.
X86_TARGETS = [
    "x86",
    pytest.param("x86-vnni", marks=pytest.mark.skipif(
        not cpu_info().vnni, reason="x86-vnni is exact only on CPUs with VNNI or AMX"
    )),
]


def mlp(*features: int) -> paddle.nn.Sequential:
    """Linear layers of the given widths with a ReLU between each pair, e.g. ``mlp(4, 8, 2)``."""
    if len(features) < 2:
        raise ValueError("mlp needs at least an input and an output width")
    layers: list[paddle.nn.Layer] = []
    for index, (width_in, width_out) in enumerate(zip(features, features[1:])):
        if index:
            layers.append(paddle.nn.ReLU())
        layers.append(paddle.nn.Linear(width_in, width_out))
    return paddle.nn.Sequential(*layers)


class Branch(paddle.nn.Layer):
    """``b`` runs only on inputs whose ``a(x)`` mean is positive: a layer some batches skip."""

    def __init__(self) -> None:
        super().__init__()
        self.a = paddle.nn.Linear(8, 8)
        self.b = paddle.nn.Linear(8, 8)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.a(x)
        return self.b(x) if float(x.mean()) > 0 else x


#: Channels of the stem of :class:`OneBlockResNet` and :class:`ThreeBlockResNet`.
RESNET_WIDTH = 16


def randomize_batch_norm_statistics(layer: paddle.nn.Layer, seed: int, mean_spread: float = 0.3) -> None:
    """Gives every ``BatchNorm2D`` in ``layer`` (in sublayer order) running means drawn from
    ``N(0, mean_spread)`` and variances from ``U(0.5, 2)``, so that folding them matters."""
    rng = np.random.default_rng(seed)
    for norm in (sub for sub in layer.sublayers() if isinstance(sub, paddle.nn.BatchNorm2D)):
        channels = norm._mean.shape[0]  # BatchNorms without affine parameters too
        norm._mean.set_value(rng.normal(0, mean_spread, channels).astype(np.float32))
        norm._variance.set_value(rng.uniform(0.5, 2.0, channels).astype(np.float32))


class OneBlockResNet(paddle.nn.Layer):
    """paddle.vision's ResNet layout, one BasicBlock: stem conv -> BN -> ReLU, the block
    (identity shortcut, or a strided one with a downsample conv + BN), global pool, fc."""

    def __init__(self, downsample: bool) -> None:
        super().__init__()
        self.conv1 = paddle.nn.Conv2D(3, RESNET_WIDTH, 3, padding=1, bias_attr=False)
        self.bn1 = paddle.nn.BatchNorm2D(RESNET_WIDTH)
        self.relu = paddle.nn.ReLU()
        out = 2 * RESNET_WIDTH if downsample else RESNET_WIDTH
        shortcut = paddle.nn.Sequential(
            paddle.nn.Conv2D(RESNET_WIDTH, out, 1, stride=2, bias_attr=False),
            paddle.nn.BatchNorm2D(out),
        ) if downsample else None
        self.block = BasicBlock(RESNET_WIDTH, out, stride=2 if downsample else 1, downsample=shortcut)
        self.avgpool = paddle.nn.AdaptiveAvgPool2D((1, 1))
        self.fc = paddle.nn.Linear(out, 10)
        randomize_batch_norm_statistics(self, seed=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.block(self.relu(self.bn1(self.conv1(x))))
        return self.fc(paddle.flatten(self.avgpool(x), 1))


class ThreeBlockResNet(OneBlockResNet):
    """Stem, an identity block, a downsample block, an identity block, pool, fc: the second
    and third blocks read a block output Paddle leaves unclipped (u8 codes up to 255), the
    third's residual is the second's output, written s8 after its s8 residual."""

    def __init__(self) -> None:
        super().__init__(False)
        wide = 2 * RESNET_WIDTH
        shortcut = paddle.nn.Sequential(
            paddle.nn.Conv2D(RESNET_WIDTH, wide, 1, stride=2, bias_attr=False),
            paddle.nn.BatchNorm2D(wide),
        )
        self.block = paddle.nn.Sequential(
            BasicBlock(RESNET_WIDTH, RESNET_WIDTH),
            BasicBlock(RESNET_WIDTH, wide, stride=2, downsample=shortcut),
            BasicBlock(wide, wide),
        )
        self.fc = paddle.nn.Linear(wide, 10)
        randomize_batch_norm_statistics(self.block, seed=2)


class FoldedBlock(paddle.nn.Layer):
    """A BasicBlock with each BatchNorm folded into its conv (conv + bias), as a torchvision
    ResNet exported to ONNX and converted with x2paddle has it: the projection shortcut is a
    plain conv."""

    def __init__(self, channels: int, out: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.act1 = paddle.nn.Conv2D(channels, out, 3, stride, 1), paddle.nn.ReLU()
        self.conv2, self.act2 = paddle.nn.Conv2D(out, out, 3, 1, 1), paddle.nn.ReLU()
        self.shortcut = paddle.nn.Conv2D(channels, out, 1, stride) if stride != 1 or channels != out else None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        branch = self.conv2(self.act1(self.conv1(x)))
        return self.act2(paddle.add(branch, x if self.shortcut is None else self.shortcut(x)))


class FoldedResNet(paddle.nn.Layer):
    """Stem, an identity block, a downsample block, an identity block and the head: a global
    pool and a Linear (``pool``), or a flatten and a Linear; ``size``: the input's height and
    width."""

    def __init__(self, pool: bool, size: int) -> None:
        super().__init__()
        self.stem, self.act = paddle.nn.Conv2D(3, RESNET_WIDTH, 3, padding=1), paddle.nn.ReLU()
        self.blocks = paddle.nn.Sequential(
            FoldedBlock(RESNET_WIDTH, RESNET_WIDTH, 1), FoldedBlock(RESNET_WIDTH, 2 * RESNET_WIDTH, 2),
            FoldedBlock(2 * RESNET_WIDTH, 2 * RESNET_WIDTH, 1),
        )
        self.pool = paddle.nn.AdaptiveAvgPool2D(1) if pool else None
        self.fc = paddle.nn.Linear(2 * RESNET_WIDTH * (1 if pool else (size // 2) ** 2), 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.blocks(self.act(self.stem(x)))
        return self.fc(paddle.flatten(x if self.pool is None else self.pool(x), 1))


class _DLABlock(paddle.nn.Layer):
    """DLA's BasicBlock: one ReLU called after both BatchNorms, the residual passed in (the
    tree's pooled or projected input) or the block's own input."""

    def __init__(self, channels: int, out: int, stride: int) -> None:
        super().__init__()
        nn = paddle.nn
        self.conv1, self.bn1 = nn.Conv2D(channels, out, 3, stride, 1, bias_attr=False), nn.BatchNorm2D(out)
        self.conv2, self.bn2 = nn.Conv2D(out, out, 3, 1, 1, bias_attr=False), nn.BatchNorm2D(out)
        self.relu = nn.ReLU()

    def forward(self, x: paddle.Tensor, residual: paddle.Tensor | None = None) -> paddle.Tensor:
        residual = x if residual is None else residual
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += residual
        return self.relu(out)


class DLATree(paddle.nn.Layer):
    """A level-1 tree of DLA (PaddleClas' DLA34 layout): the input max-pooled (``stride`` 2)
    and, with more output channels, projected by a 1x1 conv + BatchNorm as the first block's
    residual; the second block reads the first's output as its identity; the root (a 1x1 conv
    + BatchNorm + ReLU) concatenates both block outputs and, for ``level_root``, the pooled
    input; with ``residual_root`` (DLA102's, DLA169's) it adds the second block's output
    before its ReLU."""

    def __init__(self, channels: int, out: int, level_root: bool, residual_root: bool = False) -> None:
        super().__init__()
        nn = paddle.nn
        self.tree1, self.tree2 = _DLABlock(channels, out, 2), _DLABlock(out, out, 1)
        self.downsample = nn.MaxPool2D(2, 2)
        self.project = (
            nn.Sequential(nn.Conv2D(channels, out, 1, bias_attr=False), nn.BatchNorm2D(out))
            if channels != out else None
        )
        self.level_root, self.residual_root = level_root, residual_root
        self.root = nn.Conv2D(2 * out + (channels if level_root else 0), out, 1, bias_attr=False)
        self.root_bn, self.root_relu = nn.BatchNorm2D(out), nn.ReLU()

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        bottom = self.downsample(x)
        x1 = self.tree1(x, bottom if self.project is None else self.project(bottom))
        x2 = self.tree2(x1)
        children = [x2, x1] + ([bottom] if self.level_root else [])
        root = self.root_bn(self.root(paddle.concat(children, 1)))
        if self.residual_root:
            root += x2
        return self.root_relu(root)


class DLANet(paddle.nn.Layer):
    """A stem and ``trees`` DLA trees (channels doubling at every second one), a global pool
    and a Linear, or a 1x1 conv (``conv_head``, as PaddleClas' DLA has it)."""

    def __init__(self, trees: int, width: int, residual_root: bool = False, conv_head: bool = False) -> None:
        super().__init__()
        nn = paddle.nn
        self.stem = nn.Sequential(
            nn.Conv2D(3, width, 3, 1, 1, bias_attr=False), nn.BatchNorm2D(width), nn.ReLU()
        )
        layers, channels = [], width
        for index in range(trees):
            out = 2 * channels if index % 2 else channels
            layers.append(DLATree(channels, out, level_root=index > 0, residual_root=residual_root))
            channels = out
        self.trees = nn.Sequential(*layers)
        self.head, self.conv_head = nn.AdaptiveAvgPool2D(1), conv_head
        self.fc = nn.Conv2D(channels, 10, 1) if conv_head else nn.Linear(channels, 10)
        randomize_batch_norm_statistics(self, seed=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        pooled = self.head(self.trees(self.stem(x)))
        return paddle.flatten(self.fc(pooled), 1) if self.conv_head else self.fc(paddle.flatten(pooled, 1))


class KeywordSpotter(paddle.nn.Layer):
    """``paddle.audio``'s log-mel spectrogram (reflect padding, frames, a windowed one-sided
    real transform, magnitudes, mel filters, decibels; its STFT window is a dygraph tensor
    bound into a ``functools.partial``, which the trace does not turn into a variable), a
    conv and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = paddle.audio.features.LogMelSpectrogram(sr=16000, n_fft=256, hop_length=128, n_mels=32)
        self.conv = paddle.nn.Conv2D(1, 8, 3, padding=1)
        self.head = paddle.nn.Linear(8, 4)

    def forward(self, waveform: paddle.Tensor) -> paddle.Tensor:
        h = paddle.nn.functional.relu(self.conv(self.features(waveform).unsqueeze(1)))
        return self.head(h.mean([2, 3]))


def converted(
    model: paddle.nn.Layer, batches: Iterable[paddle.Tensor], target: str = "x86"
) -> paddle.nn.Layer:
    """``model`` (eval mode) quantized with KL + per-channel, calibrated on ``batches`` and
    converted for ``target``."""
    model.eval()
    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), target=target))
    qmodel = ptq.quantize(model)
    for batch in batches:
        qmodel(batch)
    ptq.convert(qmodel)
    return qmodel


def without_structure(path: str | pathlib.Path, to: str | pathlib.Path) -> pathlib.Path:
    """Writes the calibration table ``path`` to ``to`` without its ``structure`` section, as
    tables were written before it was recorded; returns ``to``."""
    document = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    del document["structure"]
    to = pathlib.Path(to)
    to.write_text(json.dumps(document), encoding="utf-8")
    return to


def converted_with_input(
    build: Callable[[], paddle.nn.Layer], shape: list[int], normal: bool = False, target: str = "x86",
    seed: int = 0,
) -> tuple[paddle.nn.Layer, np.ndarray]:
    """``build()`` (made after ``paddle.seed(seed)``) with randomized BatchNorm statistics,
    converted for ``target`` on three random batches of ``shape`` (standard normal with
    ``normal``, else uniform in [0, 1)), and a fourth batch to run it on."""
    paddle.seed(seed)
    rng = np.random.default_rng(seed)
    model = build()
    randomize_batch_norm_statistics(model, seed)

    def batch() -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32) if normal else rng.random(shape, dtype=np.float32)

    quantized = converted(model, [paddle.to_tensor(batch()) for _ in range(3)], target)
    return quantized, batch()


def converted_from_old_table(
    model: paddle.nn.Layer, batches: Iterable[paddle.Tensor], directory: pathlib.Path,
    target: str = "x86",
) -> paddle.nn.Layer:
    """``model`` calibrated on ``batches`` (KL + per-channel, ``target``), its table saved
    without the structure section, loaded into a fresh quantized copy and converted."""
    config = PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), target=target)
    calibrated = ImperativePTQ(config)
    qmodel = calibrated.quantize(model)
    for batch in batches:
        qmodel(batch)
    table = directory / "table.json"
    calibrated.save_calibration_table(qmodel, table)
    loading = ImperativePTQ(config)
    loaded = loading.quantize(model)
    loading.load_calibration_table(loaded, without_structure(table, table))
    loading.convert(loaded)
    return loaded


def largest_error_in_paddle_inference(
    qmodel: paddle.nn.Layer, x: np.ndarray, directory: pathlib.Path, bound: float = 2e-6,
    avx2_runner: Avx2Runner | None = None,
) -> float:
    """Exports ``qmodel`` (input spec from ``x``'s shape, any batch), checks that Paddle
    Inference runs fp32 only the layers kept fp32, runs ``x`` (also on oneDNN's AVX2 kernels
    with ``avx2_runner``) and returns the largest difference to the simulation up to rounding
    ties (:mod:`ties`; ``bound``: the error the caller asserts), relative to the simulation's
    largest output."""
    prefix = str(directory / "m")
    save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, *x.shape[1:]], "float32", "x")])
    report = int8_report(prefix)
    assert sum(report.fp32.values()) == len(report.fp32_weights), report  # only layers kept fp32
    errors = []
    for ran, *_ in paddle_inference_outputs(prefix, [x], avx2_runner).values():
        simulated, _ = simulation_up_to_ties(lambda: qmodel(paddle.to_tensor(x)).numpy(), ran, bound)
        errors.append(relative_error(ran, simulated))
    return max(errors)


def largest_error_in_onnx_runtime(
    qmodel: paddle.nn.Layer, x: np.ndarray, directory: pathlib.Path, bound: float = 2e-6, **options: Any
) -> float:
    """Exports ``qmodel`` to ONNX (input spec from ``x``'s shape, any batch; ``options`` for
    ``export_onnx``), runs ``x`` in ONNX Runtime and returns the largest difference to the
    simulation up to rounding ties, relative to the simulation's largest output (as
    :func:`largest_error_in_paddle_inference`)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from imperative_ptq.export import export_onnx

    spec = [paddle.static.InputSpec([None, *x.shape[1:]], "float32", "x")]
    path = export_onnx(qmodel, str(directory / "m.onnx"), spec, **options)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    ran = session.run(None, {session.get_inputs()[0].name: x})[0]
    simulated, _ = simulation_up_to_ties(lambda: qmodel(paddle.to_tensor(x)).numpy(), ran, bound)
    return relative_error(ran, simulated)
