"""Residual adds fused into Paddle Inference's int8 conv: the simulation reads the residual as
the int8 codes Paddle reads (u8 up to 255 for an identity shortcut, s8 for a downsample
BatchNorm output), and the Paddle Inference and ONNX Runtime exports compute what it does."""

from __future__ import annotations

import copy
import fractions

import numpy as np
import paddle
import pytest
from paddle.vision.models.resnet import BasicBlock

from imperative_ptq.export import int8_report, save_quantized_model
from imperative_ptq.converted import output_thresholds
from imperative_ptq.quant_layers import QuantizedLayer
from imperative_ptq import ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig, cpu_info
from imperative_ptq.quant_residual import QuantizedResidualOutput, ResidualCodesInput
from avx2_kernels import on_avx2, paddle_inference_outputs
from models import RESNET_WIDTH as WIDTH, X86_TARGETS, DLANet, FoldedBlock, FoldedResNet, OneBlockResNet, ThreeBlockResNet, converted
from models import converted_from_old_table, largest_error_in_paddle_inference, randomize_batch_norm_statistics

nn = paddle.nn
F = paddle.nn.functional
SIZE = 12


def test_find_residual_add_picks_the_operand_paddle_reads_as_codes() -> None:
    from imperative_ptq.quant_residual import find_residual_add

    rng = np.random.default_rng(0)
    shortcut, other, branch = (paddle.to_tensor(rng.normal(size=[2, 4, 3, 3]).astype(np.float32))
                               for _ in range(3))
    outputs = [(shortcut, "relu"), (other, "bn1"), (branch, "bn2")]  # computed in this order
    # The identity shortcut: the operand a conv read before the add, whatever the order.
    found = find_residual_add(branch + shortcut, outputs, {id(shortcut): ("conv1",)})
    assert (found.fused, found.residual, found.residual_readers, found.residual_top) == (
        "bn2", "relu", ("conv1",), 255)
    # Two outputs read only by the add: the one computed last (the downsample branch).
    found = find_residual_add(shortcut + branch, outputs, {}, frozenset({id(branch)}))
    assert (found.fused, found.residual, found.residual_top) == ("relu", "bn2", 127)
    # The same two, the downsample computed first: its conv read the older input (the block's
    # input, first seen at 0; the branch's last conv read one first seen at 5), so it is still
    # the residual, as in Paddle's projection fusion.
    outputs = [(shortcut, "relu"), (branch, "downsample.1"), (other, "bn2")]
    found = find_residual_add(branch + other, outputs, {}, frozenset(), {id(branch): 0, id(other): 5})
    assert (found.fused, found.residual) == ("bn2", "downsample.1")
    # A shortcut no hooked layer wrote (an F.relu output that conv1 read), the sum read after
    # an F.relu: the residual is conv1's input.
    unhooked = paddle.nn.functional.relu(shortcut)
    outputs = [(other, "bn1"), (branch, "bn2")]
    found = find_residual_add(
        paddle.nn.functional.relu(branch + unhooked), outputs, {id(unhooked): ("conv1",)},
        inputs=[unhooked],
    )
    assert (found.fused, found.residual, found.residual_readers, found.residual_is_input) == (
        "bn2", "conv1", ("conv1",), True)
    assert found.after_relu
    # Not a sum of two of them, or both read elsewhere (no conv output to fuse into).
    assert find_residual_add(branch + shortcut + 1e-3, outputs, {}) is None
    assert find_residual_add(
        branch + shortcut, outputs, {id(shortcut): ("a",), id(branch): ("b",)}
    ) is None


def _exported(downsample: bool, target: str, tmp_path) -> tuple[nn.Layer, str, np.ndarray]:
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.random((8, 3, SIZE, SIZE), np.float32)) for _ in range(4)]
    qmodel = converted(OneBlockResNet(downsample), batches, target)
    prefix = str(tmp_path / "m")
    save_quantized_model(
        qmodel, prefix, [paddle.static.InputSpec([None, 3, SIZE, SIZE], "float32", "x")]
    )
    return qmodel, prefix, rng.random((16, 3, SIZE, SIZE), np.float32)


def _codes(x: np.ndarray, step: np.float32, low: int, high: int) -> np.ndarray:
    """``clip(round_half_even(x / step), low, high)``, one value at a time."""
    return np.array(
        [min(max(round(fractions.Fraction(float(v)) / fractions.Fraction(float(step))), low), high)
         for v in x.ravel()], np.float32,
    ).reshape(x.shape)


def _batch_norm(norm: nn.Layer, y: np.ndarray) -> np.ndarray:
    shape = [1, -1, 1, 1]
    scale = norm.weight.numpy() / np.sqrt(norm._variance.numpy() + norm._epsilon)
    return ((y - norm._mean.numpy().reshape(shape)) * scale.reshape(shape)
            + norm.bias.numpy().reshape(shape)).astype(np.float32)


def _reference(qmodel: nn.Layer, x: np.ndarray, downsample: bool) -> np.ndarray:
    """The logits with the block's residual read as Paddle's fused int8 conv reads it, built
    from the simulation's own conv outputs: ``relu(branch + codes(residual) * step)``, then
    the int8 head pool (codes of the block output, mean rounded half to even) and the fc."""
    block = qmodel.block
    seen: dict[str, np.ndarray] = {}

    def keep(key):
        def hook(layer, inputs, output) -> None:
            seen.setdefault(key, output.numpy())
        return hook

    layers = {"stem": qmodel.relu, "branch": block.conv2}
    if downsample:
        layers["shortcut"] = block.downsample[0]
    handles = [layer.register_forward_post_hook(keep(key)) for key, layer in layers.items()]
    qmodel(paddle.to_tensor(x))
    for handle in handles:
        handle.remove()
    branch = _batch_norm(block.bn2, seen["branch"])
    if downsample:
        norm = block.downsample[1].layer
        residual_float = _batch_norm(norm, seen["shortcut"])
        step = np.float32(output_thresholds(norm)[0] / 127)
        residual = _codes(residual_float, step, -128, 127) * step
    else:
        step = np.float32(block.conv1.input_thresholds[0] / 127)
        residual = _codes(seen["stem"], step, 0, 255) * step
    features = np.maximum(branch + residual, 0)
    pool_step = np.float32(qmodel.avgpool.input_threshold / 127)
    # After an s8 residual oneDNN writes the sum s8 too: the block output saturates at 127.
    codes = _codes(features, pool_step, 0, 127 if downsample else 255)
    means = np.array([
        [round(fractions.Fraction(int(c.sum()), c.size)) for c in sample] for sample in codes
    ], np.float32) * pool_step
    return qmodel.fc(paddle.to_tensor(means)).numpy()


@pytest.mark.parametrize("downsample", [False, True], ids=["identity", "downsample"])
@pytest.mark.parametrize("target", X86_TARGETS)
def test_fused_residual_runs_as_simulated(downsample, target, tmp_path, avx2_runner) -> None:
    """Before the simulation read the residual as codes it added it in float: 0.98%
    (identity) and 1.1% (downsample) of the largest logit off Paddle Inference."""
    qmodel, prefix, x = _exported(downsample, target, tmp_path)
    block = qmodel.block
    if downsample:
        assert isinstance(block.downsample[1], QuantizedResidualOutput)
        assert not isinstance(block.bn2, QuantizedResidualOutput)  # fused into conv2
    else:
        assert isinstance(block.conv1, QuantizedLayer) and block.conv1.residual_codes == 255
    report = int8_report(prefix)
    assert not report.fp32, report
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    expected = _reference(qmodel, x, downsample)
    np.testing.assert_allclose(simulated, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    for ran, in paddle_inference_outputs(prefix, [x], on_avx2(avx2_runner, target)).values():
        assert np.abs(ran - simulated).max() <= 2e-6 * np.abs(simulated).max()


@pytest.mark.parametrize("downsample", [False, True], ids=["identity", "downsample"])
def test_onnx_runtime_reads_the_residual_as_simulated(downsample, tmp_path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from imperative_ptq.export import export_onnx

    qmodel, _, x = _exported(downsample, "x86", tmp_path)
    path = export_onnx(
        qmodel, str(tmp_path / "m.onnx"),
        [paddle.static.InputSpec([None, 3, SIZE, SIZE], "float32", "x")],
    )
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    ran = session.run(None, {session.get_inputs()[0].name: x})[0]
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    quantized_error = np.abs(ran - simulated).max() / np.abs(simulated).max()
    # The conv operand of the add is quantized on its BatchNorm's output threshold, which the
    # simulation does not do: left float, ONNX Runtime runs that conv and the add in float (ResNet-18 1.43x slower, its cosine to the simulation the same
    # 0.99994). Measured 0.60% (identity) and 1.38% (downsample) of the largest logit; 1.45%
    # and 1.83% with the residual added in float; 0.46% for downsample with its conv float.
    kinds = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    assert "Conv" not in kinds and "FusedConv" not in kinds, kinds  # every conv QLinearConv
    assert np.abs(ran - simulated).max() <= (1.5e-2 if downsample else 8e-3) * np.abs(simulated).max()
    # Exported as simulated, those convs run in float.
    path = export_onnx(
        qmodel, str(tmp_path / "exact.onnx"),
        [paddle.static.InputSpec([None, 3, SIZE, SIZE], "float32", "x")], int8_residual_branches=False,
    )
    options.optimized_model_filepath = str(tmp_path / "exact_optimized.onnx")
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    ran = session.run(None, {session.get_inputs()[0].name: x})[0]
    kinds = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    assert kinds.count("Conv") + kinds.count("FusedConv") == 1, kinds  # the branch's last conv
    assert kinds.count("QLinearConv") == (3 if downsample else 2), kinds
    # Measured 0.56% / 0.46%: what is left is ONNX Runtime's int32 conv biases (the BatchNorm
    # statistics are randomized), test_onnx_runtime_runs_dla_trees_as_simulated has none.
    assert np.abs(ran - simulated).max() / np.abs(simulated).max() <= quantized_error


def _with_legacy_batch_norms(model: nn.Layer) -> nn.Layer:
    """``model`` with each ``nn.BatchNorm2D`` replaced by the legacy ``nn.BatchNorm`` holding
    the same parameters and statistics (how x2paddle writes ONNX's BatchNormalization)."""
    for parent in [model, *model.sublayers()]:
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2D):
                legacy = nn.BatchNorm(child.weight.shape[0], epsilon=child._epsilon)
                for attribute in ("weight", "bias", "_mean", "_variance"):
                    getattr(legacy, attribute).set_value(getattr(child, attribute))
                legacy.training = child.training
                setattr(parent, name, legacy)
    return model


def test_residual_blocks_of_legacy_batch_norms_run_as_simulated(tmp_path, avx2_runner) -> None:
    """x2paddle's ``nn.BatchNorm`` (not a ``BatchNorm2D``): the blocks are found as with
    ``BatchNorm2D`` (measured before: 1.9% of the largest logit, the sum simulated in float
    while Paddle fuses it into the conv)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    model = _with_legacy_batch_norms(ThreeBlockResNet())
    model.eval()
    batches = [paddle.to_tensor(rng.random((8, 3, 16, 16), np.float32)) for _ in range(4)]
    # The data of test_three_residual_blocks_run_as_simulated: on AVX2 kernels a block
    # output's codes above 127 may saturate (the documented exception of the x86 target).
    x = rng.random((16, 3, 16, 16), np.float32)
    expected = model(paddle.to_tensor(x)).numpy()
    qmodel = converted(model, batches)
    first, second, third = qmodel.block
    assert first.conv1.residual_codes == 255 and isinstance(second.downsample[1], QuantizedResidualOutput)
    simulated = qmodel(paddle.to_tensor(x)).numpy().ravel()
    assert simulated @ expected.ravel() / np.linalg.norm(simulated) / np.linalg.norm(expected) > 0.99
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=avx2_runner) <= 1e-5


class _SignedStemPoolBlocks(nn.Layer):
    """A stem conv kept fp32 (it reads a signed input on ``x86``), its ReLU, a max-pool, two
    identity blocks with their BatchNorms folded, flatten and a Linear: the first block's
    shortcut is the pool's output, on codes up to 255 of its first conv's threshold."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.act, self.pool = nn.Conv2D(3, WIDTH, 3, padding=1), nn.ReLU(), nn.MaxPool2D(2, 2)
        self.blocks = nn.Sequential(FoldedBlock(WIDTH, WIDTH, 1), FoldedBlock(WIDTH, WIDTH, 1))
        self.fc = nn.Linear(WIDTH * (SIZE // 2) ** 2, 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc(paddle.flatten(self.blocks(self.pool(self.act(self.stem(x)))), 1))


def test_onnx_runtime_reads_a_pooled_identity_shortcut_on_its_codes(tmp_path) -> None:
    """The pool's output is the identity shortcut, read on u8 codes up to 255: ONNX Runtime
    clipped it at 127 with its first conv's input (the clip moved in front of the pool, and
    the add read the clipped tensor): measured 2.1% of the largest logit off before (0.28% on
    a deeper net)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from imperative_ptq.export import export_onnx

    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal((8, 3, SIZE, SIZE)).astype(np.float32)) for _ in range(4)]
    qmodel = converted(_SignedStemPoolBlocks(), batches)
    assert not isinstance(qmodel.stem, QuantizedLayer)  # kept fp32: a signed input, padded
    assert qmodel.blocks[0].conv1.residual_codes == 255
    x = rng.standard_normal((16, 3, SIZE, SIZE)).astype(np.float32)
    spec = [paddle.static.InputSpec([None, 3, SIZE, SIZE], "float32", "x")]
    session = onnxruntime.InferenceSession(
        export_onnx(qmodel, str(tmp_path / "m.onnx"), spec), providers=["CPUExecutionProvider"]
    )
    ran = session.run(None, {session.get_inputs()[0].name: x})[0]
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    assert np.abs(ran - simulated).max() <= 1e-5 * np.abs(simulated).max()
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) <= 2e-6


def _folded(pool: bool, target: str) -> tuple[nn.Layer, np.ndarray]:
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.random((8, 3, SIZE, SIZE), np.float32)) for _ in range(4)]
    return converted(FoldedResNet(pool, SIZE), batches, target), rng.random((16, 3, SIZE, SIZE), np.float32)


@pytest.mark.parametrize("target", X86_TARGETS)
@pytest.mark.parametrize("pool", [True, False], ids=["pool", "flatten"])
def test_a_projection_conv_with_its_batch_norm_folded_is_a_fused_residual(pool, target, tmp_path) -> None:
    """The projection conv writes s8 codes for the conv Paddle fuses the add into, as a
    projection BatchNorm does (measured before, when both were added in float: 3.7% (pool)
    and 8.6% (flatten) of the largest logit off Paddle Inference, whose next block read the
    sum on u8 codes up to 255 where the simulation had s8 ones)."""
    qmodel, x = _folded(pool, target)
    downsample = qmodel.blocks[1]
    assert downsample.shortcut.residual_output_threshold is not None
    assert downsample.shortcut.residual_fused_with == "blocks.1.conv2"
    assert qmodel.blocks[2].conv1.residual_codes == 127  # the sum, written s8
    step = np.float32(downsample.shortcut.residual_output_threshold / 127)
    seen = []
    handle = downsample.shortcut.register_forward_post_hook(
        lambda layer, inputs, output: seen.append(output.numpy())
    )
    qmodel(paddle.to_tensor(x))
    handle.remove()
    codes = seen[0] / step  # the conv's output is on s8 codes, saturating at -128 and 127
    np.testing.assert_allclose(codes, np.clip(np.round(codes), -128, 127), rtol=0, atol=1e-4)
    assert len(np.unique(np.round(codes))) > 50
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) <= 2e-6
    report = int8_report(str(tmp_path / "m"))
    assert not report.fp32, report  # every conv int8, the adds fused


@pytest.mark.parametrize("pool", [True, False], ids=["pool", "flatten"])
def test_onnx_runtime_reads_a_folded_projection_as_simulated(pool, tmp_path) -> None:
    """The projection's s8 codes, and the other conv's output left float as the simulation
    leaves it (measured before: 0.23% of the largest logit off with the flatten head)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from imperative_ptq.export import export_onnx
    from ties import relative_error, simulation_up_to_ties

    qmodel, x = _folded(pool, "x86")
    path = export_onnx(
        qmodel, str(tmp_path / "m.onnx"), [paddle.static.InputSpec([None, 3, SIZE, SIZE], "float32", "x")]
    )
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    ran = session.run(None, {session.get_inputs()[0].name: x})[0]
    simulated, _ = simulation_up_to_ties(lambda: qmodel(paddle.to_tensor(x)).numpy(), ran, 2e-6)
    assert relative_error(ran, simulated) <= 2e-6


class _PooledShortcutBlock(nn.Layer):
    """A downsample block whose shortcut is a 1x1 conv + BN of a pooled copy of the block input
    (ResNet-vd, DLA), or of the input itself at stride 2 (ResNet), then a conv on the sum."""

    def __init__(self, shortcut: str) -> None:
        super().__init__()
        self.stem, self.act0 = _ConvBN(3, WIDTH, 3, act=False), nn.ReLU()
        self.pool = {"avg_pool": nn.AvgPool2D(2, 2, ceil_mode=True), "max_pool": nn.MaxPool2D(2, 2)}.get(shortcut)
        self.short = _ConvBN(WIDTH, 2 * WIDTH, 1, 1 if self.pool is not None else 2, act=False)
        self.conv0, self.conv1 = _ConvBN(WIDTH, 2 * WIDTH, 3, 2), _ConvBN(2 * WIDTH, 2 * WIDTH, 3, act=False)
        self.act1, self.head = nn.ReLU(), nn.Conv2D(2 * WIDTH, 4, 3, padding=1)
        randomize_batch_norm_statistics(self, seed=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.act0(self.stem(x))
        branch = self.conv1(self.conv0(x))
        short = self.short(x if self.pool is None else self.pool(x))
        return self.head(self.act1(paddle.add(short, branch)))


@pytest.mark.parametrize("target", X86_TARGETS)
@pytest.mark.parametrize("shortcut", ["strided", "avg_pool", "max_pool"])
def test_a_pooled_projection_shortcut_is_added_in_float_as_paddle_does(shortcut, target, tmp_path, avx2_runner) -> None:
    """Paddle fuses the add into a conv only when the projection's input is an ancestor of
    that conv's output; a pooled copy of the block input is not (measured before: 1.2-1.6% of
    the largest output off, 98% of the outputs, simulated as a fused residual)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.normal(0, 1, (4, 3, 16, 16)).astype(np.float32)) for _ in range(3)]
    qmodel = converted(_PooledShortcutBlock(shortcut), batches, target)
    fused = any(isinstance(layer, QuantizedResidualOutput) for layer in qmodel.short.sublayers())
    assert fused == (shortcut == "strided")
    x = rng.normal(0, 1, (2, 3, 16, 16)).astype(np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=on_avx2(avx2_runner, target)) <= 1e-5


class _PooledBlockOutput(nn.Layer):
    """An identity block (its sum's ReLU on the codes the fused conv writes) whose output a
    pool reads: a ResNet-vd downsample block (its 3x3 conv, and a 1x1 conv on an average pool
    of it), or a 1x1 conv through an average or a max pool alone. ``functional``: the sum's
    ReLU is ``F.relu`` (PaddleDetection's ResNet blocks), no layer; ``pool_first``: the vd
    block's pooled shortcut runs before its branch."""

    def __init__(self, reader: str, functional: bool = False, pool_first: bool = False) -> None:
        super().__init__()
        self.stem, self.act0 = _ConvBN(3, WIDTH, 3, act=False), nn.ReLU()
        self.conv0, self.conv1 = _ConvBN(WIDTH, WIDTH, 3), _ConvBN(WIDTH, WIDTH, 3, act=False)
        self.act1 = F.relu if functional else nn.ReLU()
        self.functional, self.pool_first = functional, pool_first
        self.reader = reader
        self.pool = nn.MaxPool2D(2, 2) if reader == "max_pool" else nn.AvgPool2D(2, 2, ceil_mode=True)
        self.short = _ConvBN(WIDTH, 2 * WIDTH, 1, act=False)
        if reader == "vd":
            self.conv2, self.conv3 = _ConvBN(WIDTH, 2 * WIDTH, 3, 2), _ConvBN(2 * WIDTH, 2 * WIDTH, 3, act=False)
            self.act2 = nn.ReLU()
        randomize_batch_norm_statistics(self, seed=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.act0(self.stem(x))
        x = self.act1(paddle.add(x, self.conv1(self.conv0(x))))
        if self.reader != "vd":
            return self.short(self.pool(x))
        if self.functional and not self.pool_first:  # PaddleDetection's order: the branch, then the shortcut
            branch = self.conv3(self.conv2(x))
            return self.act2(paddle.add(self.short(self.pool(x)), branch))
        short = self.short(self.pool(x))
        return self.act2(paddle.add(short, self.conv3(self.conv2(x))))


@pytest.mark.parametrize("target", X86_TARGETS)
@pytest.mark.parametrize(
    "reader", ["vd", "avg_pool", "max_pool", "vd, F.relu", "avg_pool, F.relu", "vd pool first, F.relu"]
)
def test_a_pooled_block_output_runs_as_simulated(reader, target, tmp_path, avx2_runner) -> None:
    """The simulation holds the block output on the fused conv's codes; the export dropped its
    scale for the fp32 average pool (the fused conv then wrote floats) and put it on the max
    pool reader's grid where the simulation used its own (measured: random-weight PaddleClas
    ResNet18_vd 1.2% of the largest logit off Paddle Inference, 4e-7 now; these blocks
    0.9-1.7%). An ``F.relu`` sum (PaddleDetection's blocks) is put on codes by its first
    int8 reader, in place; where the vd block's pool runs before its branch, the pool puts it
    on them first (it averaged the float sum while Paddle ran it int8 on the codes, rounding
    the average to a code: 1.1% off), and the export rounds the pool's input to the codes.
    ONNX Runtime is not checked here: its QLinearConv's int32 biases of these randomized BatchNorms move codes near a half
    (0.56% off at the block output already, docs/deployment.md)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.normal(0, 1, (4, 3, 16, 16)).astype(np.float32)) for _ in range(3)]
    block = _PooledBlockOutput(reader.split(" ")[0].rstrip(","), reader.endswith("F.relu"), "pool first" in reader)
    qmodel = converted(block, batches, target)
    x = rng.normal(0, 1, (2, 3, 16, 16)).astype(np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=on_avx2(avx2_runner, target)) <= 1e-5


class _SharedPoolBlock(_PooledBlockOutput):
    """The pool-first vd block whose pool instance also pools the block's output."""

    def __init__(self) -> None:
        super().__init__("vd", functional=True, pool_first=True)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.pool(super().forward(x))


def test_a_pool_called_on_other_tensors_too_is_not_put_on_the_sum_codes() -> None:
    """Putting every input of a shared pool on the sum's codes would quantize its other inputs
    on that grid too: a layer called more than once in a forward is no earlier reader."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.normal(0, 1, (4, 3, 16, 16)).astype(np.float32)) for _ in range(3)]
    qmodel = converted(_SharedPoolBlock(), batches)
    assert not isinstance(qmodel.pool, ResidualCodesInput)
    assert isinstance(converted(_PooledBlockOutput("vd", True, True), batches).pool, ResidualCodesInput)


def test_keep_fp32_of_the_branch_conv_reads_the_float_sum_in_the_pool_again(tmp_path, avx2_runner) -> None:
    """With the conv that put the sum on codes fp32 again, nothing writes the sum as codes:
    the pool in front of it reads the float sum, as the branch-first block does (measured:
    0.95% of the largest output off Paddle Inference while the pool kept the codes)."""
    from imperative_ptq.analysis import keep_fp32

    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.normal(0, 1, (4, 3, 16, 16)).astype(np.float32)) for _ in range(3)]
    model = _PooledBlockOutput("vd", functional=True, pool_first=True)
    qmodel = keep_fp32(converted(model, batches), ["conv2.conv"], model)
    assert isinstance(qmodel.pool, nn.AvgPool2D)
    x = rng.normal(0, 1, (2, 3, 16, 16)).astype(np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=avx2_runner) <= 1e-5


class _PooledIdentity(nn.Layer):
    """Two identity blocks on ``F.relu`` sums; between them a side branch (a stride-1 average
    pool and a 1x1 conv) reads the first sum before the second block's conv does, and is
    added to the output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.act0 = _ConvBN(3, WIDTH, 3, act=False), nn.ReLU()
        self.conv0, self.conv1 = _ConvBN(WIDTH, WIDTH, 3), _ConvBN(WIDTH, WIDTH, 3, act=False)
        self.pool, self.side = nn.AvgPool2D(3, 1, 1), _ConvBN(WIDTH, WIDTH, 1, act=False)
        self.conv2, self.conv3 = _ConvBN(WIDTH, WIDTH, 3), _ConvBN(WIDTH, WIDTH, 3, act=False)
        randomize_batch_norm_statistics(self, seed=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.act0(self.stem(x))
        x = F.relu(paddle.add(x, self.conv1(self.conv0(x))))
        side = self.side(self.pool(x))
        return F.relu(paddle.add(x, self.conv3(self.conv2(x)))) + side


def test_a_pool_reading_a_functional_identity_first_reads_its_codes(tmp_path, avx2_runner) -> None:
    """Paddle's fused conv writes the first sum as codes for every reader; the simulation put
    it on them at the second block's conv, after the pool had read the float sum (measured:
    0.6% of the largest output off Paddle Inference)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.normal(0, 1, (4, 3, 16, 16)).astype(np.float32)) for _ in range(3)]
    qmodel = converted(_PooledIdentity(), batches)
    assert isinstance(qmodel.pool, ResidualCodesInput)
    x = rng.normal(0, 1, (2, 3, 16, 16)).astype(np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=avx2_runner) <= 1e-5


def test_a_pool_reading_a_functional_sum_first_converts_alike_from_its_table(tmp_path) -> None:
    """The pool that reads the sum before the branch's conv is recorded in the table's
    structure (``earlier_readers``): a model loading the table simulates it on the codes too."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    model = _PooledBlockOutput("vd", functional=True, pool_first=True)
    model.eval()
    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer()))
    calibrated = ptq.quantize(model)
    for _ in range(3):
        calibrated(paddle.to_tensor(rng.normal(0, 1, (4, 3, 16, 16)).astype(np.float32)))
    ptq.save_calibration_table(calibrated, tmp_path / "table.json")
    ptq.convert(calibrated)
    assert isinstance(calibrated.pool, ResidualCodesInput)
    fresh = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer()))
    loaded = fresh.quantize(model)
    fresh.load_calibration_table(loaded, tmp_path / "table.json")
    fresh.convert(loaded)
    assert isinstance(loaded.pool, ResidualCodesInput)
    x = paddle.to_tensor(rng.normal(0, 1, (2, 3, 16, 16)).astype(np.float32))
    np.testing.assert_array_equal(loaded(x).numpy(), calibrated(x).numpy())


class _BiasedMainBranch(nn.Layer):
    """A downsample block whose main branch ends in a conv with a bias and no BatchNorm (a
    BatchNorm folded into it) and whose shortcut is a conv + BatchNorm, then a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.act0 = nn.Conv2D(3, 8, 3, 1, 1), nn.ReLU()
        self.conv1, self.act1, self.conv2 = nn.Conv2D(8, 16, 3, 2, 1), nn.ReLU(), nn.Conv2D(16, 16, 3, 1, 1)
        self.short, self.norm = nn.Conv2D(8, 16, 1, 2), nn.BatchNorm2D(16)
        self.act2, self.head = nn.ReLU(), nn.Conv2D(16, 4, 3, 1, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.act0(self.stem(x))
        branch = self.conv2(self.act1(self.conv1(x)))
        return self.head(self.act2(paddle.add(branch, self.norm(self.short(x)))))


@pytest.mark.parametrize("target", X86_TARGETS)
def test_a_main_branch_without_batch_norm_is_fused_as_simulated(target, tmp_path, avx2_runner) -> None:
    """The export kept the projection out of the add because the main branch's conv output
    has no scale of its own, though Paddle fuses the add into that conv, reading the
    projection (measured before: the add in float, the simulation fused, 1.7% of the largest
    output off on 98% of the outputs)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.random((8, 3, 16, 16), np.float32)) for _ in range(4)]
    qmodel = converted(_BiasedMainBranch(), batches, target)
    assert isinstance(qmodel.norm, QuantizedResidualOutput)
    x = rng.random((8, 3, 16, 16), np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=on_avx2(avx2_runner, target)) <= 1e-5


class _SignedIdentity(nn.Layer):
    """MobileNetV3's residual: a conv + BatchNorm + Hardswish output (signed) as the identity
    of a 1x1 conv + BatchNorm, the sum read by a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2D(3, 16, 3, 2, 1, bias_attr=False), nn.BatchNorm2D(16), nn.Hardswish())
        self.linear = nn.Sequential(nn.Conv2D(16, 16, 1, bias_attr=False), nn.BatchNorm2D(16))
        self.reader = nn.Sequential(nn.Conv2D(16, 32, 1, bias_attr=False), nn.BatchNorm2D(32), nn.ReLU())
        randomize_batch_norm_statistics(self, seed=1, mean_spread=0.1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = self.stem(x)
        return self.reader(paddle.add(h, self.linear(h)))


@pytest.mark.parametrize("target", X86_TARGETS)
def test_a_signed_identity_the_simulation_adds_in_float_is_added_in_float(target, tmp_path, avx2_runner) -> None:
    """Paddle fused the 1x1 conv with the Hardswish output as its residual and read that on
    its scale's codes, where the simulation adds it in float (measured before on x86-vnni: 3-10%
    of the largest output off; x86 kept it out already, the Hardswish output being read
    through a shift)."""
    paddle.seed(2)
    rng = np.random.default_rng(2)
    batches = [paddle.to_tensor(rng.normal(0, 1, (2, 3, 32, 32)).astype(np.float32)) for _ in range(4)]
    qmodel = converted(_SignedIdentity(), batches, target)
    x = rng.normal(0, 1, (4, 3, 32, 32)).astype(np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=on_avx2(avx2_runner, target)) <= 1e-5


class _LinearBottleneck(nn.Layer):
    """MobileNetV2's inverted residual as torch.onnx.export + x2paddle write it (BatchNorm
    folded, ReLU6 as a clip): the block input, a signed 1x1 projection output read by the
    expanding conv and the add, plus the block's signed projection; a 1x1 conv reads the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.proj0 = nn.Conv2D(3, 16, 3, 2, 1), nn.Conv2D(16, 8, 1)
        self.expand, self.depthwise = nn.Conv2D(8, 48, 1), nn.Conv2D(48, 48, 3, 1, 1, groups=48)
        self.proj, self.last = nn.Conv2D(48, 8, 1), nn.Conv2D(8, 16, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        block_input = self.proj0(paddle.clip(self.conv0(x), 0.0, 6.0))
        expanded = paddle.clip(self.depthwise(paddle.clip(self.expand(block_input), 0.0, 6.0)), 0.0, 6.0)
        return paddle.clip(self.last(paddle.add(block_input, self.proj(expanded))), 0.0, 6.0)


@pytest.mark.parametrize("target", X86_TARGETS)
def test_a_linear_bottleneck_runs_as_simulated(target, tmp_path, avx2_runner) -> None:
    """On x86-vnni the signed block input's quantize op reads a copy of it, so it has no
    scale itself: the projection conv is kept out of the add, as on x86 (measured before:
    Paddle fused it and ran it fp32, 1.3% of the largest output off on 9% of the outputs)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.random((8, 3, 32, 32), np.float32)) for _ in range(4)]
    qmodel = converted(_LinearBottleneck(), batches, target)
    x = rng.random((8, 3, 32, 32), np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=on_avx2(avx2_runner, target)) <= 1e-5


@pytest.mark.parametrize("target", X86_TARGETS)
def test_three_residual_blocks_run_as_simulated(target, tmp_path, avx2_runner) -> None:
    """Measured 2.9e-7 of the largest logit (3.5% before: residuals added in float, the
    readers of the block outputs clipped at code 127)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.random((8, 3, 16, 16), np.float32)) for _ in range(4)]
    qmodel = converted(ThreeBlockResNet(), batches, target)
    first, second, third = qmodel.block
    assert first.conv1.residual_codes == 255 and third.conv1.residual_codes == 127
    assert second.conv1.input_top_code == 255 and second.downsample[0].input_top_code == 255
    assert third.conv1.input_top_code == 127  # the s8 output of the second block
    assert isinstance(second.downsample[1], QuantizedResidualOutput)
    prefix = str(tmp_path / "m")
    spec = [paddle.static.InputSpec([None, 3, 16, 16], "float32", "x")]
    save_quantized_model(qmodel, prefix, spec)
    assert not int8_report(prefix).fp32
    x = rng.random((16, 3, 16, 16), np.float32)
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    for ran, in paddle_inference_outputs(prefix, [x], on_avx2(avx2_runner, target)).values():
        assert np.abs(ran - simulated).max() <= 2e-6 * np.abs(simulated).max()
    onnxruntime = pytest.importorskip("onnxruntime")
    from imperative_ptq.export import export_onnx

    session = onnxruntime.InferenceSession(
        export_onnx(qmodel, str(tmp_path / "m.onnx"), spec), providers=["CPUExecutionProvider"]
    )
    ran = session.run(None, {session.get_inputs()[0].name: x})[0]
    # Measured 1.43% (3.9% before); ONNX's int32 biases (rounded to the input x weight
    # scale) move a few codes across a rounding tie, which the following blocks amplify.
    assert np.abs(ran - simulated).max() <= 2e-2 * np.abs(simulated).max()


def test_a_residual_read_by_nothing_else_is_left_in_float_without_calibration_batches(tmp_path) -> None:
    """Nothing seen, nothing simulated: a table without its structure section (the format
    before it was recorded) cannot tell a residual add (tests/test_table_structure.py loads
    one that has it)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.random((8, 3, SIZE, SIZE), np.float32)) for _ in range(2)]
    other = converted_from_old_table(OneBlockResNet(True).eval(), batches, tmp_path)
    assert not any(isinstance(layer, QuantizedResidualOutput) for layer in other.sublayers())
    assert other.block.conv1.residual_codes == 0
    x = rng.random((16, 3, SIZE, SIZE), np.float32)
    assert largest_error_in_paddle_inference(other, x, tmp_path) <= 2e-6


class _DownsampleFirst(nn.Layer):
    """A downsample block written unlike ``paddle.vision``'s: the shortcut computed before the
    branch, and the add in either operand order."""

    def __init__(self, shortcut_left: bool) -> None:
        super().__init__()
        self.shortcut_left = shortcut_left
        self.stem = nn.Sequential(nn.Conv2D(3, WIDTH, 3, padding=1), nn.BatchNorm2D(WIDTH), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2D(WIDTH, 2 * WIDTH, 3, 2, 1), nn.BatchNorm2D(2 * WIDTH)
        self.conv2, self.bn2 = nn.Conv2D(2 * WIDTH, 2 * WIDTH, 3, 1, 1), nn.BatchNorm2D(2 * WIDTH)
        self.downsample = nn.Sequential(nn.Conv2D(WIDTH, 2 * WIDTH, 1, 2), nn.BatchNorm2D(2 * WIDTH))
        self.relu = nn.ReLU()
        self.head = nn.Conv2D(2 * WIDTH, 8, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.stem(x)
        shortcut = self.downsample(x)
        out = self.bn2(self.conv2(nn.functional.relu(self.bn1(self.conv1(x)))))
        return self.head(self.relu(shortcut + out if self.shortcut_left else out + shortcut))


@pytest.mark.parametrize("shortcut_left", [True, False], ids=["shortcut+out", "out+shortcut"])
def test_downsample_computed_before_the_branch_runs_as_simulated(shortcut_left, tmp_path, avx2_runner) -> None:
    """Paddle fuses the add into the branch's conv whatever the order: the simulation quantized
    the branch as the residual when the shortcut came first (measured: 1.5% of the largest
    output off Paddle Inference; 2e-7 now)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal((4, 3, 32, 32)).astype(np.float32)) for _ in range(3)]
    qmodel = converted(_DownsampleFirst(shortcut_left), batches)
    assert isinstance(qmodel.downsample[1], QuantizedResidualOutput)
    assert not isinstance(qmodel.bn2, QuantizedResidualOutput)
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=avx2_runner) <= 2e-6


class _ConvBN(nn.Layer):
    """A conv, its BatchNorm and an optional ``F.relu``: the layout of PaddleClas-style blocks."""

    def __init__(self, inputs: int, outputs: int, kernel: int, stride: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2D(inputs, outputs, kernel, stride, (kernel - 1) // 2, bias_attr=False)
        self.bn = nn.BatchNorm2D(outputs)
        self.act = act

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = self.bn(self.conv(x))
        return nn.functional.relu(y) if self.act else y


class _MaxPoolShortcut(nn.Layer):
    """DLA's first tree block: a strided block whose shortcut is a max-pool of its input (a
    ReLU output an int8 conv also reads), one ReLU called after both BatchNorms, then an
    identity block reading the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.act = nn.Sequential(nn.Conv2D(3, WIDTH, 3, padding=1, bias_attr=False), nn.BatchNorm2D(WIDTH)), nn.ReLU()
        self.pool = nn.MaxPool2D(2, 2)
        self.conv1, self.norm1 = nn.Conv2D(WIDTH, WIDTH, 3, 2, 1, bias_attr=False), nn.BatchNorm2D(WIDTH)
        self.conv2, self.norm2 = nn.Conv2D(WIDTH, WIDTH, 3, 1, 1, bias_attr=False), nn.BatchNorm2D(WIDTH)
        self.relu = nn.ReLU()
        self.identity = BasicBlock(WIDTH, WIDTH)
        self.head, self.fc = nn.AdaptiveAvgPool2D(1), nn.Linear(WIDTH, 10)
        randomize_batch_norm_statistics(self, seed=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.act(self.stem(x))
        out = self.norm2(self.conv2(self.relu(self.norm1(self.conv1(x)))))
        out += self.pool(x)
        return self.fc(paddle.flatten(self.head(self.identity(self.relu(out))), 1))


def test_a_max_pool_shortcut_runs_as_simulated(tmp_path, avx2_runner) -> None:
    """The max-pool reads the u8 codes the stem conv writes (up to 255, on the threshold of the
    block's first conv, which clips them at 127), and Paddle adds its output in float: the sum's
    ReLU is then u8 up to 255 for the identity block. Measured before: 1.1% of the largest logit
    off Paddle Inference (the pool read the float ReLU output and the identity block read the
    sum as s8 codes), 4.1% off ONNX Runtime (its pool read the codes clipped at 127)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from imperative_ptq.export import export_onnx
    from imperative_ptq.quant_residual import ResidualSumOutput

    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.random((4, 3, 16, 16), np.float32)) for _ in range(4)]
    qmodel = converted(_MaxPoolShortcut(), batches)
    assert isinstance(qmodel.act, ResidualSumOutput) and qmodel.act.top == 255
    assert qmodel.identity.conv1.input_top_code == 255 and qmodel.identity.conv1.residual_codes == 255
    x = rng.random((8, 3, 16, 16), np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=avx2_runner) <= 2e-6
    spec = [paddle.static.InputSpec([None, 3, 16, 16], "float32", "x")]
    session = onnxruntime.InferenceSession(
        export_onnx(qmodel, str(tmp_path / "m.onnx"), spec), providers=["CPUExecutionProvider"]
    )
    ran = session.run(None, {session.get_inputs()[0].name: x})[0]
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    # Measured 0.97%: the conv operand of each add is quantized on its BatchNorm's output
    # threshold for ONNX Runtime's speed (see test_onnx_runtime_reads_the_residual_as_simulated).
    assert np.abs(ran - simulated).max() <= 1.5e-2 * np.abs(simulated).max()


class _FunctionalBlock(nn.Layer):
    """``F.relu(paddle.add(x=short, y=branch))``: the shortcut an ``F.relu`` output (identity)
    or a conv + BatchNorm (downsample), the sum's ReLU functional too."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv0, self.conv1 = _ConvBN(inputs, outputs, 3, stride), _ConvBN(outputs, outputs, 3, act=False)
        self.short = None if stride == 1 else _ConvBN(inputs, outputs, 1, stride, act=False)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        branch = self.conv1(self.conv0(x))
        short = x if self.short is None else self.short(x)
        return nn.functional.relu(paddle.add(x=short, y=branch))


class _FunctionalResNet(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _ConvBN(3, WIDTH, 3)
        self.blocks = nn.Sequential(
            _FunctionalBlock(WIDTH, WIDTH, 1), _FunctionalBlock(WIDTH, 2 * WIDTH, 2),
            _FunctionalBlock(2 * WIDTH, 2 * WIDTH, 1),
        )
        self.pool, self.fc = nn.AdaptiveAvgPool2D(1), nn.Linear(2 * WIDTH, 10)
        randomize_batch_norm_statistics(self, seed=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc(paddle.flatten(self.pool(self.blocks(self.stem(x))), 1))


@pytest.mark.parametrize("target", X86_TARGETS)
def test_functional_residual_blocks_run_as_simulated(target, tmp_path, avx2_runner) -> None:
    """Blocks written with ``F.relu`` and ``paddle.add`` (no hooked ReLU reads the sum): the
    adds are found from the ReLU of the sum a conv or the pool reads, the identity shortcut
    being an unhooked tensor. Before, the simulation added in float what Paddle adds on codes
    (measured: 4.6% of the largest logit off Paddle Inference on these blocks, both targets).
    The last sum, read only by the pool, has no scale: that add runs in float, its conv alone
    in int8, the downsample shortcut before it unquantized."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.random((4, 3, 32, 32), np.float32)) for _ in range(3)]
    qmodel = converted(_FunctionalResNet(), batches, target)
    assert isinstance(qmodel.blocks[1].short.bn, QuantizedResidualOutput)
    assert qmodel.blocks[0].conv0.conv.residual_codes == 255
    x = rng.random((8, 3, 32, 32), np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=on_avx2(avx2_runner, target)) <= 2e-6


class _MeanHead(nn.Layer):
    """A downsample block, then an identity block whose ``F.relu`` sum only a functional mean
    reads: calibration cannot see that add, which Paddle still fuses (the mean gives the sum
    no scale, so it runs float) and which reads its shortcut as the codes the block before wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _ConvBN(3, WIDTH, 3)
        self.down = _FunctionalBlock(WIDTH, 2 * WIDTH, 2)
        self.conv, self.bn = nn.Conv2D(2 * WIDTH, 2 * WIDTH, 3, padding=1), nn.BatchNorm2D(2 * WIDTH)
        self.head = nn.Linear(2 * WIDTH, 8)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.down(self.stem(x))
        x = nn.functional.relu(self.bn(self.conv(x)) + x)
        return self.head(x.mean([2, 3]))


@pytest.mark.parametrize("target", X86_TARGETS)
def test_shortcut_of_an_unseen_add_is_read_as_codes(target, tmp_path) -> None:
    """The downsample block's ReLU output is written as s8 codes for every reader, the unseen
    add too: its first conv puts it on them in place (measured: 1.5% / 2.0% of the largest
    output off Paddle Inference on x86 / x86-vnni before, <= 2e-6 now)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal((4, 3, 32, 32)).astype(np.float32)) for _ in range(3)]
    qmodel = converted(_MeanHead(), batches, target)
    assert qmodel.conv.residual_codes == 127 and qmodel.conv.residual_source == ""
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) <= 2e-6


def _three_blocks(
    target: str = "x86",
) -> tuple[nn.Layer, nn.Layer, np.random.Generator, list[paddle.Tensor]]:
    """ThreeBlockResNet (fp32), its copy converted for ``target`` on three batches in [0, 1),
    the generator the batches came from (it draws the test input next) and the batches."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    model = ThreeBlockResNet()
    model.eval()
    batches = [paddle.to_tensor(rng.random((4, 3, 16, 16), np.float32)) for _ in range(3)]
    return model, converted(copy.deepcopy(model), batches, target), rng, batches


@pytest.mark.parametrize(
    "name, warned",
    [("block.0.conv1", False), ("block.0.conv2", False), ("block.1.conv1", False),
     ("block.1.downsample.0", True)],
)
def test_keep_fp32_inside_a_fused_residual_block_warns(name, warned, caplog) -> None:
    """Only where the block cannot be re-decided with the layer fp32 (a downsample conv:
    measured 0.5% of the largest output off Paddle Inference; the others re-decided, see
    test_keep_fp32_in_a_residual_block_runs_as_simulated)."""
    from imperative_ptq.analysis import keep_fp32

    model, qmodel, _, _ = _three_blocks()
    with caplog.at_level("WARNING", logger="imperative_ptq.analysis"):
        keep_fp32(qmodel, [name], model)
    assert ("inside a fused int8 residual block: " + name in caplog.text) == warned, caplog.text


@pytest.mark.parametrize(
    "names",
    [["block.0.conv1"], ["block.0.conv2"], ["block.1.conv1"], ["block.1.conv2"], ["block.2.conv1"],
     ["block.0.conv2", "block.1.conv1"]],
    ids=["identity-reader", "fused", "block-output-reader", "downsample-fused", "s8-identity-reader",
         "fused-and-reader"],
)
@pytest.mark.parametrize("target", X86_TARGETS)
def test_keep_fp32_in_a_residual_block_runs_as_simulated(names, target, tmp_path, avx2_runner, caplog) -> None:
    """``keep_fp32`` re-decides the block: an add whose fused conv is fp32 runs in float, and a
    tensor an int8 conv writes as codes is read as codes by its fp32 readers too. Measured
    before (largest output, x86): 1.1% (fused), 0.91% (block-output reader), 5.5% (downsample
    block's fused conv), 1.07% (s8 identity reader); <= 3.3e-7 after."""
    from imperative_ptq.analysis import keep_fp32

    model, qmodel, rng, _ = _three_blocks(target)
    with caplog.at_level("WARNING", logger="imperative_ptq.analysis"):
        keep_fp32(qmodel, names, model)
    assert "inside a fused int8 residual block" not in caplog.text
    x = rng.random((8, 3, 16, 16), np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=on_avx2(avx2_runner, target)) <= 2e-6


@pytest.mark.parametrize("name, warned", [("blocks.1.conv2", False), ("blocks.1.shortcut", True)])
def test_keep_fp32_in_a_folded_downsample_block(name, warned, tmp_path, caplog) -> None:
    """With the conv the add is fused into kept fp32 the add runs in float and the projection
    conv writes floats again; the projection conv kept fp32 is left to the warning, as with a
    BatchNorm after it."""
    from imperative_ptq.analysis import keep_fp32

    paddle.seed(0)
    rng = np.random.default_rng(0)
    model = FoldedResNet(True, SIZE)
    model.eval()
    batches = [paddle.to_tensor(rng.random((8, 3, SIZE, SIZE), np.float32)) for _ in range(4)]
    qmodel = converted(copy.deepcopy(model), batches)
    with caplog.at_level("WARNING", logger="imperative_ptq.analysis"):
        keep_fp32(qmodel, [name], model)
    assert ("inside a fused int8 residual block: " + name in caplog.text) == warned, caplog.text
    if not warned:
        assert qmodel.blocks[1].shortcut.residual_output_threshold is None
        x = rng.random((16, 3, SIZE, SIZE), np.float32)
        assert largest_error_in_paddle_inference(qmodel, x, tmp_path) <= 2e-6


@pytest.mark.parametrize(
    "name", ["block.0.conv1", "block.0.conv2", "block.1.conv1", "block.1.conv2", "block.2.conv1"]
)
def test_keep_fp32_in_a_residual_block_in_onnx_runtime(name, tmp_path) -> None:
    """ONNX Runtime against the simulation, as loose as the fully int8 model's test above
    (int32 biases): measured 0.9-1.7% of the largest logit (1.06% with no layer fp32);
    4.8% for block.2.conv1 when its input's codes were not quantized for ONNX Runtime."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from imperative_ptq.analysis import keep_fp32
    from imperative_ptq.export import export_onnx

    model, qmodel, rng, _ = _three_blocks()
    keep_fp32(qmodel, [name], model)
    spec = [paddle.static.InputSpec([None, 3, 16, 16], "float32", "x")]
    session = onnxruntime.InferenceSession(
        export_onnx(qmodel, str(tmp_path / "m.onnx"), spec), providers=["CPUExecutionProvider"]
    )
    x = rng.random((8, 3, 16, 16), np.float32)
    ran = session.run(None, {session.get_inputs()[0].name: x})[0]
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    assert np.abs(ran - simulated).max() <= 2e-2 * np.abs(simulated).max()


def test_search_skip_set_result_runs_as_simulated(tmp_path, avx2_runner) -> None:
    """The search evaluates, and returns, its candidates through ``keep_fp32``: a skip set
    holding a downsample block's fused conv runs in Paddle Inference as simulated (measured
    5.5% of the largest output off before, when the search swapped the layer alone)."""
    from imperative_ptq.analysis import search_skip_set
    from imperative_ptq.quant_layers import QuantizedLayer as Simulated

    model, qmodel, rng, batches = _three_blocks()

    def fused_conv_in_fp32(candidate: nn.Layer) -> float:
        return 0.0 if isinstance(candidate.block[1].conv2, Simulated) else 1.0

    result = search_skip_set(model, qmodel, fused_conv_in_fp32, budget=0.5, data=batches[:1])
    assert result.skip == ["block.1.conv2"] and result.within_budget
    x = rng.random((8, 3, 16, 16), np.float32)
    assert largest_error_in_paddle_inference(result.model, x, tmp_path, avx2_runner=avx2_runner) <= 2e-6


class _SignedSumBlock(nn.Layer):
    """An identity shortcut (a ReLU output) plus conv + BatchNorm, the sum passed on without a
    ReLU (an inverted-residual block's) to a 1x1 conv: on ``x86`` that conv reads the signed
    sum shifted, so the sum gets no scale and Paddle adds in float, outside the int8 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2D(3, 8, 1)
        self.project = nn.Conv2D(8, 8, 1)
        self.norm = nn.BatchNorm2D(8)
        self.head = nn.Conv2D(8, 4, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = nn.functional.relu(self.stem(x))
        return self.head(h + self.norm(self.project(h)))


def test_a_sum_read_through_a_shift_is_added_in_float(tmp_path, avx2_runner) -> None:
    paddle.seed(0)
    rng = np.random.default_rng(0)
    size = 16  # (at 12x12 one shifted code of the head's input lands on a rounding tie: 0.4%)
    batches = [paddle.to_tensor(rng.standard_normal((4, 3, size, size)).astype(np.float32)) for _ in range(4)]
    qmodel = converted(_SignedSumBlock(), batches)
    assert qmodel.head.input_shifted and not qmodel.project.residual_codes
    x = rng.standard_normal((3, 3, size, size)).astype(np.float32)
    # Measured 2.4e-7 (1.1% with the shortcut read as codes, which Paddle does not).
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=avx2_runner) <= 1e-5


class _RepVGGBlock(nn.Layer):
    """A RepVGG training-time block after a conv stem: ReLU(BN(3x3 conv(x)) + BN(1x1 conv(x))
    [+ BN(x)]) read by a 1x1 conv. Both branch convs read the same input, so Paddle fuses the
    adds into neither; its ReLU output is then read as Paddle quantizes it, clipped at the
    reader's threshold like any other input."""

    def __init__(self, identity: bool) -> None:
        super().__init__()
        self.stem, self.relu = nn.Conv2D(3, 8, 3, padding=1), nn.ReLU()
        self.conv3, self.norm3 = nn.Conv2D(8, 8, 3, padding=1), nn.BatchNorm2D(8)
        self.conv1, self.norm1 = nn.Conv2D(8, 8, 1), nn.BatchNorm2D(8)
        self.identity = nn.BatchNorm2D(8) if identity else None
        self.head = nn.Conv2D(8, 4, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.relu(self.stem(x))
        y = self.norm3(self.conv3(x)) + self.norm1(self.conv1(x))
        if self.identity is not None:
            y = y + self.identity(x)
        return self.head(nn.functional.relu(y))


class _NormOfIdentity(_RepVGGBlock):
    """The 3x3 branch plus a BatchNorm of the block input (no conv of its own to fuse into)."""

    def __init__(self) -> None:
        super().__init__(identity=True)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.relu(self.stem(x))
        return self.head(nn.functional.relu(self.norm3(self.conv3(x)) + self.identity(x)))


@pytest.mark.parametrize(
    "block", [lambda: _RepVGGBlock(False), lambda: _RepVGGBlock(True), _NormOfIdentity],
    ids=["two_branches", "three_branches", "norm_of_identity"],
)
def test_multi_branch_blocks_paddle_does_not_fuse_run_as_simulated(block, tmp_path, avx2_runner) -> None:
    """Measured 19-30% of the largest output off Paddle Inference before: calibration took
    the adds for fused residual convs (the ReLU read on s8 codes, the 1x1 branch as s8 codes)
    and the export left the ReLU unclipped, though Paddle adds in float."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.random((4, 3, SIZE, SIZE), np.float32)) for _ in range(4)]
    qmodel = converted(block(), batches)
    assert not any(isinstance(layer, QuantizedResidualOutput) for layer in qmodel.sublayers())
    x = rng.random((3, 3, SIZE, SIZE), np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=avx2_runner) <= 1e-5


@pytest.mark.parametrize(
    "block", [lambda: _RepVGGBlock(False), lambda: _RepVGGBlock(True), _NormOfIdentity],
    ids=["two_branches", "three_branches", "norm_of_identity"],
)
def test_onnx_runtime_adds_parallel_branches_in_float_as_simulated(block, tmp_path) -> None:
    """The BatchNorm outputs of a reparameterizable block's branches (convs of one input, and
    a BatchNorm of the input itself, summed) are added in float, as simulated, even with the
    default ``int8_residual_branches=True``: the same graph as with ``False``. Each quantized
    on its own threshold before the sum, measured 1.4% / 13% / 12% of the largest output
    off the simulation (PP-OCRv4's recognizer, random weights: logit cosine 0.864, 0.9986
    now). No conv biases, so ONNX Runtime's int32 biases round nothing."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from imperative_ptq.export import export_onnx

    paddle.seed(0)
    rng = np.random.default_rng(0)
    model = block()
    for conv in (layer for layer in model.sublayers() if isinstance(layer, nn.Conv2D)):
        conv.bias.set_value(paddle.zeros_like(conv.bias))
    qmodel = converted(model, [paddle.to_tensor(rng.random((4, 3, SIZE, SIZE), np.float32)) for _ in range(4)])
    x = rng.random((3, 3, SIZE, SIZE), np.float32)
    spec = [paddle.static.InputSpec([None, 3, SIZE, SIZE], "float32", "x")]
    ran = {}
    for int8_branches in (True, False):
        path = export_onnx(qmodel, str(tmp_path / f"{int8_branches}.onnx"), spec, int8_residual_branches=int8_branches)
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        ran[int8_branches] = session.run(None, {"x": x})[0]
    np.testing.assert_array_equal(ran[True], ran[False])
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    assert np.abs(ran[True] - simulated).max() <= 1e-6 * np.abs(simulated).max()


@pytest.mark.parametrize("kind", ["ResidualCodesInput", "ResidualSumOutput"])
@pytest.mark.parametrize("threshold, top", [(0.0, 255), (float("nan"), 255), (1.0, 0), (1.0, 256)])
def test_codes_wrappers_refuse_a_bad_grid(kind, threshold, top) -> None:
    from imperative_ptq import quant_residual

    with pytest.raises(ValueError, match=kind):
        getattr(quant_residual, kind)(nn.ReLU(), threshold, top)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(call_sums=[False, False]), "a call reading a sum"),
        (dict(call_thresholds=[1.0, 2.0], call_sums=[False, True, False]), "2 call thresholds, 3 call sums"),
        (dict(call_tops=[255, 127, 127], call_sums=[False, True]), "2 call sums and 3 call tops"),
        (dict(call_tops=[255, 256]), "call tops of 1..255"),
        (dict(call_tops=[255, True]), "call tops of 1..255"),
    ],
)
def test_a_sum_output_refuses_per_call_settings_that_disagree(options, message) -> None:
    from imperative_ptq.quant_residual import ResidualSumOutput

    with pytest.raises(ValueError, match=message):
        ResidualSumOutput(nn.ReLU(), 1.0, 255, **options)


@pytest.mark.parametrize(
    "trees, width, residual_root, conv_head",
    [(4, 8, False, False), (2, 16, False, False), (4, 8, True, False), (2, 8, True, True)],
)
def test_dla_trees_run_as_simulated(trees, width, residual_root, conv_head, tmp_path, avx2_runner) -> None:
    """DLA's trees: a max-pooled (and projected) shortcut added in float, the first block's
    output read as the second block's identity and, beside it, concatenated in float by the
    root; the pooled input concatenated too. Measured before, relative to the largest logit
    up to ties: 0.51% (one tree), 1.2% (two), 3.5% (four), 2.7% (two of width 16) off Paddle
    Inference (docs/results.md): the root's concat read the
    identity in float where the simulation had put it on codes, the fused conv wrote the
    second block's output on the root conv's grid (which the export passes back through the
    concat) where the simulation used the sum's own threshold, the pooled projection's sum
    was read unclipped where the simulation clipped it at 127, and the max-pool of a root's
    ReLU output was run int8 on codes the simulation does not round. With the root adding its
    second block's output (``residual_root``): 1.5% off on one tree, the add unseen by
    calibration (the concat read that output first), then 0.6% with a conv head, whose last
    root Paddle adds in float (its sum, read by a float global pool, has no scale)."""
    from imperative_ptq.quant_residual import ResidualSumOutput

    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.random((4, 3, 32, 32), np.float32)) for _ in range(4)]
    qmodel = converted(DLANet(trees, width, residual_root, conv_head), batches)
    # The second block's sum is written on the threshold of the root conv reading the concat
    # (with the root's add reading it too, on its own: Paddle keeps that scale).
    first = qmodel.trees[0]
    assert isinstance(first.tree2.relu, ResidualSumOutput)
    assert (first.tree2.relu.threshold == first.root.input_thresholds[0]) == (not residual_root)
    if residual_root:  # the first root's sum is fused (read by the next tree's int8 convs)
        assert isinstance(first.root_relu, ResidualSumOutput)
    x = rng.random((8, 3, 32, 32), np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=avx2_runner) <= 2e-6


class _UnrectifiedSum(nn.Layer):
    """An identity shortcut (a ReLU output) added to a block's last BatchNorm with no ReLU
    after the add, the sum read by a padded conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.act = nn.Sequential(nn.Conv2D(3, WIDTH, 3, 1, 1, bias_attr=False), nn.BatchNorm2D(WIDTH)), nn.ReLU()
        self.conv1, self.norm1 = nn.Conv2D(WIDTH, WIDTH, 3, 1, 1, bias_attr=False), nn.BatchNorm2D(WIDTH)
        self.conv2, self.norm2 = nn.Conv2D(WIDTH, WIDTH, 3, 1, 1, bias_attr=False), nn.BatchNorm2D(WIDTH)
        self.relu = nn.ReLU()
        self.conv3, self.norm3 = nn.Conv2D(WIDTH, WIDTH, 3, 1, 1, bias_attr=False), nn.BatchNorm2D(WIDTH)
        self.head, self.fc = nn.AdaptiveAvgPool2D(1), nn.Linear(WIDTH, 10)
        randomize_batch_norm_statistics(self, seed=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.act(self.stem(x))
        out = self.norm2(self.conv2(self.relu(self.norm1(self.conv1(x))))) + x
        out = self.relu(self.norm3(self.conv3(out)))
        return self.fc(paddle.flatten(self.head(out), 1))


@pytest.mark.parametrize("target", X86_TARGETS)
def test_a_u8_identity_of_an_unrectified_sum_is_added_in_float(target, tmp_path, avx2_runner) -> None:
    """On ``x86-vnni`` the signed sum's reader runs int8, so Paddle would fuse the add into the
    conv before it and write the sum s8, reading the u8 identity's codes as s8 (measured: 53%
    of the largest logit off); the simulation and the export keep that add in float. (On
    ``x86`` the padded conv reading the signed sum stays fp32, so the add was in float already.)"""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.random((4, 3, SIZE, SIZE), np.float32)) for _ in range(4)]
    qmodel = converted(_UnrectifiedSum(), batches, target)
    assert qmodel.conv1.residual_codes == 0  # the identity is read in float
    x = rng.random((8, 3, SIZE, SIZE), np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=on_avx2(avx2_runner, target)) <= 2e-6


@pytest.mark.parametrize("trees, width, residual_root", [(4, 8, False), (3, 16, False), (2, 8, True)])
def test_onnx_runtime_runs_dla_trees_as_simulated(trees, width, residual_root, tmp_path) -> None:
    """DLA's trees in ONNX Runtime, exported with the residual branches the simulation adds in
    float left float (``int8_residual_branches=False``) and BatchNorm statistics that leave the
    convs without bias (ONNX Runtime rounds conv biases to int32): exact up to rounding ties.
    Measured before, relative to the largest logit up to ties: 7.6% / 4.7% / 2.1%. The
    max-pool shortcut read the block's first conv's input, clipped at its threshold, where the
    simulation pools the float value and the projection quantizes that on its own threshold
    (4.7% / 4.3% / exact alone); the root's concat read the first block's output, the second
    block's identity, clipped at code 127 for that block's first conv where the simulation
    holds it on codes up to 255 (4.3% / 1.6% / 2.1% alone)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from imperative_ptq.export import export_onnx
    from ties import relative_error, simulation_up_to_ties

    paddle.seed(0)
    model = DLANet(trees, width, residual_root)
    for layer in model.sublayers():
        if isinstance(layer, nn.BatchNorm2D):
            layer._mean.set_value(paddle.zeros_like(layer._mean))
            layer._variance.set_value(paddle.ones_like(layer._variance))
    rng = np.random.default_rng(0)
    qmodel = converted(model, [paddle.to_tensor(rng.random((4, 3, 32, 32), np.float32)) for _ in range(4)])
    x = rng.random((8, 3, 32, 32), np.float32)
    spec = [paddle.static.InputSpec([None, 3, 32, 32], "float32", "x")]
    path = export_onnx(qmodel, str(tmp_path / "m.onnx"), spec, int8_residual_branches=False)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    ran = session.run(None, {"x": x})[0]
    simulated, _ = simulation_up_to_ties(lambda: qmodel(paddle.to_tensor(x)).numpy(), ran, 2e-6)
    assert relative_error(ran, simulated) <= 2e-6


class _SelfResiduals(nn.Layer):
    """``h = F.relu(h + conv(h))`` three times: each conv's residual is its own input, the
    ReLU of the previous fused sum (codes up to 255); ``shared`` calls one conv each time
    (a looped recurrent block), else three convs."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2D(3, 8, 3, padding=1)
        convs = [nn.Conv2D(8, 8, 3, padding=1)] * 3 if shared else [nn.Conv2D(8, 8, 3, padding=1) for _ in range(3)]
        self.convs = nn.LayerList(convs[:1] if shared else convs)
        self.calls = [0, 0, 0] if shared else [0, 1, 2]
        self.head = nn.Conv2D(8, 2, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = F.relu(self.stem(x))
        for index in self.calls:
            h = F.relu(h + self.convs[index](h))
        return self.head(h)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_a_conv_adding_its_own_input_is_fused_as_simulated(shared, target, tmp_path, avx2_runner) -> None:
    """Paddle fuses a residual add into a conv only when the residual is another tensor than the
    conv's input; the export gives the conv a ``relu`` copy to read (the first conv reads a
    clipped copy already), so that every add is fused as the simulation computes it (measured
    before: the second and third adds ran in float, 0.93% / 0.75% of the largest output off
    Paddle Inference on x86 / x86-avx2 with three convs, 1.4% / 1.1% with one conv called three
    times)."""
    if target == "x86-avx2" and cpu_info().isa != "avx2":
        pytest.skip("x86-avx2 computes what oneDNN's AVX2 int8 kernels do, natively here only")
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)) for _ in range(4)]
    qmodel = converted(_SelfResiduals(shared), batches, target)
    x = rng.standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    runner = on_avx2(avx2_runner, target)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=runner) <= 2e-6
    report = int8_report(str(tmp_path / "m"))
    assert report.int8["fused_conv2d"] >= 4, report


class _InputShortcut(nn.Layer):
    """An identity shortcut that is the network's (non-negative) input: ``relu(x + conv(x))``,
    or a two-conv block on ``x``."""

    def __init__(self, two_convs: bool) -> None:
        super().__init__()
        self.first = nn.Conv2D(3, 3, 3, padding=1) if two_convs else None
        self.conv, self.head = nn.Conv2D(3, 3, 3, padding=1), nn.Conv2D(3, 2, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        branch = self.conv(F.relu(self.first(x)) if self.first is not None else x)
        return self.head(F.relu(x + branch))


class _FunctionalPoolShortcut(nn.Layer):
    """An fp32 stem (padded, on a signed input), ``F.relu`` and ``F.max_pool2d``: the pool's
    output is the identity shortcut of one conv (``p + conv(p)``) or of a two-conv block.
    With ``pool_layer`` the pool is an ``nn.MaxPool2D`` (a hooked pool of an unhooked ReLU),
    whose output the simulation adds in float."""

    def __init__(self, two_convs: bool, pool_layer: bool = False) -> None:
        super().__init__()
        self.stem, self.conv, self.head = nn.Conv2D(3, 8, 3, padding=1), nn.Conv2D(8, 8, 3, padding=1), nn.Conv2D(8, 2, 1)
        self.first = nn.Conv2D(8, 8, 3, padding=1) if two_convs else None
        self.pool = nn.MaxPool2D(2, 2) if pool_layer else None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        activation = F.relu(self.stem(x))
        pooled = self.pool(activation) if self.pool is not None else F.max_pool2d(activation, 2)
        branch = self.conv(F.relu(self.first(pooled)) if self.first is not None else pooled)
        return self.head(F.relu(pooled + branch))


@pytest.mark.parametrize("two_convs", [False, True])
@pytest.mark.parametrize("model_class, signed", [(_InputShortcut, False), (_FunctionalPoolShortcut, True)])
def test_unhooked_identity_shortcuts_run_as_simulated(model_class, signed, two_convs, tmp_path, avx2_runner) -> None:
    """Two shortcuts the export gave no u8 scale: a network input (no op to carry one, so
    Paddle ran the conv fp32 with the add fused: 1.7% / 0.9% of the largest output off with one
    / two convs), and the ``F.relu`` output under a max-pool after an fp32 conv (Paddle
    quantized it s8 from the pool's scale, so the shortcut saturated at code 127: 0.8% / 14%)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)

    def batch(size: int) -> np.ndarray:
        shape = (size, 3, SIZE, SIZE)
        return (rng.standard_normal(shape) if signed else rng.random(shape)).astype(np.float32)

    qmodel = converted(model_class(two_convs), [paddle.to_tensor(batch(4)) for _ in range(4)], "x86")
    assert (qmodel.first if two_convs else qmodel.conv).residual_codes == 255  # its first reader's
    assert largest_error_in_paddle_inference(qmodel, batch(3), tmp_path, avx2_runner=avx2_runner) <= 2e-6
    report = int8_report(str(tmp_path / "m"))
    assert report.int8["fused_conv2d"] == (3 if two_convs else 2), report


def test_a_hooked_pool_of_an_unhooked_relu_is_added_in_float_as_simulated(tmp_path, avx2_runner) -> None:
    """The simulation adds the ``nn.MaxPool2D`` output in float: the add reads an fp32 pool of
    its own (before, the int8 pool's codes: 0.98% of the largest output off)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)) for _ in range(4)]
    qmodel = converted(_FunctionalPoolShortcut(False, pool_layer=True), batches, "x86")
    x = rng.standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=avx2_runner) <= 2e-6


class _SumBesideAConvInAConcat(nn.Layer):
    """``concat([ReLU(y + b(y)), c(y)])`` returned: the block's sum joined with another conv's
    signed output, which keeps the concat fp32."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (nn.Conv2D(3 if i == 0 else 8, 8, 3, padding=1) for i in range(3))
        self.relu = nn.ReLU()

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = F.relu(self.a(x))
        return paddle.concat([self.relu(y + self.b(y)), self.c(y)], 1)


@pytest.mark.parametrize("target", [*X86_TARGETS, "x86-avx2"])
def test_a_sum_joined_with_a_signed_output_keeps_its_fused_conv(target, tmp_path, avx2_runner) -> None:
    """The concat stays fp32 without dropping the sum's scale, which the fused conv needs to
    write the sum on codes as simulated (before: the conv and add ran apart, in float, 2.8e-3 of
    the largest output off)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)) for _ in range(4)]
    qmodel = converted(_SumBesideAConvInAConcat(), batches, target)
    x = rng.standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=avx2_runner) <= 2e-6
    report = int8_report(str(tmp_path / "m"))
    assert "fused_elementwise_add" not in report.fp32, report  # the add runs inside the conv


class _SignedProjection(nn.Layer):
    """A block on the network's signed input, its projection shortcut (1x1 conv + BatchNorm, or
    a 1x1 conv alone) reading that input too: on ``x86-avx2`` both convs run on halved weights,
    on ``x86`` the unpadded shortcut on its input shifted into u8."""

    def __init__(self, norm: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2D(3, 8, 3, padding=1, bias_attr=False), nn.BatchNorm2D(8), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2D(8, 8, 3, padding=1, bias_attr=False), nn.BatchNorm2D(8))
        self.shortcut = nn.Sequential(nn.Conv2D(3, 8, 1, bias_attr=not norm), *([nn.BatchNorm2D(8)] if norm else []))
        self.head = nn.Conv2D(8, 4, 1)
        randomize_batch_norm_statistics(self, seed=3)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(F.relu(self.conv2(self.conv1(x)) + self.shortcut(x)))


def test_a_halved_projection_exports_as_simulated(tmp_path, avx2_runner) -> None:
    """``x86-avx2``: the export's check of a halved conv's folded BatchNorm failed on the
    projection's (``AttributeError: 'QuantizedResidualOutput' object has no attribute '_mean'``)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)) for _ in range(4)]
    qmodel = converted(_SignedProjection(), batches, "x86-avx2")
    assert isinstance(qmodel.shortcut[1], QuantizedResidualOutput)
    x = rng.standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=avx2_runner) <= 2e-6


@pytest.mark.parametrize("norm", [True, False])
def test_a_shifted_projection_is_added_in_float_as_exported(norm, tmp_path, avx2_runner) -> None:
    """``x86``: a projection shortcut reading the signed input through a shift writes its output
    in float in the export, which adds it in float; the simulation wrote it as s8 residual codes
    (1.9% of the largest output off Paddle Inference)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)) for _ in range(4)]
    qmodel = converted(_SignedProjection(norm), batches, "x86")
    assert qmodel.shortcut[0].input_shifted
    x = rng.standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=avx2_runner) <= 2e-6


class _BlockOutputReadInFloatToo(nn.Layer):
    """A block output (``nn.ReLU`` after the add) read by an int8 conv and by a sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2D(3, 8, 3, padding=1, bias_attr=False), nn.BatchNorm2D(8), nn.ReLU())
        self.conv1 = nn.Sequential(nn.Conv2D(8, 8, 3, padding=1, bias_attr=False), nn.BatchNorm2D(8), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2D(8, 8, 3, padding=1, bias_attr=False), nn.BatchNorm2D(8))
        self.relu, self.up, self.head = nn.ReLU(), nn.Conv2D(8, 8, 1), nn.Conv2D(16, 4, 1)
        randomize_batch_norm_statistics(self, seed=7)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.stem(x)
        total = self.relu(self.conv2(self.conv1(x)) + x)
        return self.head(paddle.concat([self.up(total), F.sigmoid(total)], 1))


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_onnx_runtime_gives_a_float_reader_of_a_block_output_its_codes(target, tmp_path) -> None:
    """The sigmoid reads the codes the fused conv writes, as in the simulation and Paddle
    Inference (the ONNX graph fed it the float sum: 1.3e-2 of the largest output off)."""
    from models import largest_error_in_onnx_runtime

    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)) for _ in range(4)]
    qmodel = converted(_BlockOutputReadInFloatToo(), batches, target)
    x = rng.standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) <= 2e-6
    assert largest_error_in_onnx_runtime(qmodel, x, tmp_path, int8_residual_branches=False) <= 2e-6


class _ProjectionBlock(nn.Layer):
    """A stem and a block whose projection shortcut is a 1x1 conv + BatchNorm of the stem's
    ReLU output, the sum read by an int8 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2D(3, 8, 3, padding=1, bias_attr=False), nn.BatchNorm2D(8), nn.ReLU())
        self.conv1 = nn.Sequential(nn.Conv2D(8, 16, 3, padding=1, bias_attr=False), nn.BatchNorm2D(16), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2D(16, 16, 3, padding=1, bias_attr=False), nn.BatchNorm2D(16))
        self.shortcut = nn.Sequential(nn.Conv2D(8, 16, 1, bias_attr=False), nn.BatchNorm2D(16))
        self.head = nn.Conv2D(16, 4, 1)
        randomize_batch_norm_statistics(self, seed=11)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.stem(x)
        return self.head(F.relu(self.conv2(self.conv1(x)) + self.shortcut(x)))


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_onnx_runtime_adds_a_projection_bias_as_simulated(target, tmp_path) -> None:
    """The projection's BatchNorm (s8 residual codes) moves its folded bias onto the int32
    grid ONNX Runtime's QLinearConv adds it on, as every other conv's does (before: about 100
    shortcut codes flipped, 6.9e-3 .. 1.2e-2 of the largest output off)."""
    from models import largest_error_in_onnx_runtime

    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)) for _ in range(4)]
    qmodel = converted(_ProjectionBlock(), batches, target)
    assert isinstance(qmodel.shortcut[1], QuantizedResidualOutput)
    x = rng.standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) <= 2e-6
    assert largest_error_in_onnx_runtime(qmodel, x, tmp_path, int8_residual_branches=False) <= 2e-6


class _TwoBlocksConcatenated(nn.Layer):
    """Two identity blocks (an ``nn.ReLU`` after each add) of different output ranges, their
    outputs concatenated into one int8 conv."""

    def __init__(self) -> None:
        super().__init__()

        def conv_norm(channels_in: int, relu: bool = False) -> nn.Sequential:
            layers = [nn.Conv2D(channels_in, 8, 3, padding=1, bias_attr=False), nn.BatchNorm2D(8)]
            return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))

        self.stem, self.middle = conv_norm(3, relu=True), conv_norm(8, relu=True)
        self.first = nn.LayerList([conv_norm(8, relu=True), conv_norm(8), nn.ReLU()])
        self.second = nn.LayerList([conv_norm(8, relu=True), conv_norm(8), nn.ReLU()])
        self.head = nn.Conv2D(16, 4, 1)
        randomize_batch_norm_statistics(self, seed=5)
        for norm in (self.middle[1], self.second[1][1]):  # the second block's range smaller
            norm.weight.set_value(norm.weight * 0.3)
            norm.bias.set_value(norm.bias * 0.3)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        def block(layers: nn.LayerList, y: paddle.Tensor) -> paddle.Tensor:
            return layers[2](layers[1](layers[0](y)) + y)

        x = self.stem(x)
        return self.head(paddle.concat([block(self.first, x), block(self.second, self.middle(x))], 1))


@pytest.mark.parametrize("target", [*X86_TARGETS, "x86-avx2"])
def test_block_outputs_concatenated_are_written_on_the_readers_codes(target, tmp_path, avx2_runner) -> None:
    """Each sum is written on the codes of the conv reading the concat, as Paddle's fused convs
    write them; calibration recorded the concat's first input alone, so the second sum kept its
    own threshold (1.1e-2 of the largest output off Paddle Inference)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)) for _ in range(4)]
    qmodel = converted(_TwoBlocksConcatenated(), batches, target)
    assert qmodel.second[2].threshold == qmodel.head.input_thresholds[0] == qmodel.first[2].threshold
    x = rng.standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path, avx2_runner=avx2_runner) <= 2e-6
