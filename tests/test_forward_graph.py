"""Which tensor is an ancestor of which (``imperative_ptq.forward_graph``): Paddle fuses a residual
add into a conv only where the residual is an ancestor of the conv's output, and calibration now
asks Paddle's autograd graph of the first forward. HRNet's cross-resolution fusion adds a branch
that another conv read first to a conv of the other branch: Paddle adds it in float, which the
simulation now computes too (before: fused, 7.6e-3-8.7e-3 of the largest output off)."""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from imperative_ptq import ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig
from imperative_ptq.forward_graph import ForwardGraph, node_of
from models import converted, largest_error_in_onnx_runtime, largest_error_in_paddle_inference

nn = paddle.nn
SIZE = 12


class _CrossResolutionFusion(nn.Layer):
    """HRNet's fuse layer in short: a high- and a low-resolution branch, each added to the other
    resampled (``low + bn(conv_stride2(high))``, ``high + upsample(bn(conv(low)))``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2D(3, 8, 3, padding=1)
        self.high, self.low = nn.Conv2D(8, 8, 3, padding=1), nn.Conv2D(8, 8, 3, stride=2, padding=1)
        self.up, self.up_norm = nn.Conv2D(8, 8, 1), nn.BatchNorm2D(8)
        self.down, self.down_norm = nn.Conv2D(8, 8, 3, stride=2, padding=1), nn.BatchNorm2D(8)
        self.head_high, self.head_low = nn.Conv2D(8, 4, 1), nn.Conv2D(8, 4, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        stem = F.relu(self.stem(x))
        high, low = F.relu(self.high(stem)), F.relu(self.low(stem))
        fused_high = F.relu(high + F.interpolate(self.up_norm(self.up(low)), scale_factor=2))
        fused_low = F.relu(low + self.down_norm(self.down(high)))  # `low` was read by `up` first
        return paddle.concat([self.head_high(fused_high).flatten(1), self.head_low(fused_low).flatten(1)], 1)


class _ReadElsewhereFirst(nn.Layer):
    """``relu(y + conv_b(z))`` with ``y`` read by another conv first: ``y`` and ``z`` are two
    branches of one input."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.z = nn.Conv2D(3, 8, 3, padding=1), nn.Conv2D(3, 8, 3, padding=1)
        self.b, self.c, self.d = nn.Conv2D(8, 8, 3, padding=1), nn.Conv2D(8, 8, 1), nn.Conv2D(8, 8, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y, z = F.relu(self.a(x)), F.relu(self.z(x))
        read_first = self.c(y)
        return paddle.concat([self.d(F.relu(y + self.b(z))), read_first], 1)


def _batches(count: int, seed: int = 0) -> list[paddle.Tensor]:
    rng = np.random.default_rng(seed)
    return [paddle.to_tensor(rng.standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)) for _ in range(count)]


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
@pytest.mark.parametrize("model_class", [_CrossResolutionFusion, _ReadElsewhereFirst])
def test_a_residual_from_another_branch_is_added_in_float_as_paddle_does(model_class, target, tmp_path) -> None:
    paddle.seed(0)
    qmodel = converted(model_class(), _batches(4), target)
    reader = qmodel.up if model_class is _CrossResolutionFusion else qmodel.c
    assert reader.residual_codes == 0  # the identity's first reader does not write it as codes
    x = np.random.default_rng(7).standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) < 2e-6
    # (The residual branch's BatchNorm output in float, as simulated: not ONNX's default.)
    assert largest_error_in_onnx_runtime(qmodel, x, tmp_path, int8_residual_branches=False) < 2e-6


def test_the_first_forward_decides_for_the_later_ones() -> None:
    """Only the first calibration forward is recorded; an add it found unfused stays unfused in
    the later ones (which would otherwise fall back to the reader rule and fuse it)."""
    paddle.seed(0)
    model = _ReadElsewhereFirst()
    model.eval()
    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), target="x86"))
    qmodel = ptq.quantize(model)
    with paddle.no_grad():
        for batch in _batches(3):
            qmodel(batch)
            assert not paddle.is_grad_enabled()  # the recording set grad back
    ptq.convert(qmodel)
    assert qmodel.c.residual_codes == 0


def test_reaches_answers_ancestry_and_unknown() -> None:
    a, b, c = nn.Conv2D(3, 4, 1), nn.Conv2D(3, 4, 1), nn.Conv2D(4, 4, 1)
    x = paddle.randn([1, 3, 4, 4])
    graph = ForwardGraph()
    with paddle.no_grad():
        assert graph.begin(a) is False  # no forward of `a` on the stack: nothing recorded
        y = F.relu(a(x))
        assert node_of(y) is None and graph.reaches(node_of(y), c(y)) is None
        with paddle.set_grad_enabled(True):
            y, z = F.relu(a(x)), b(x)
            read = c(y)
            joined = paddle.concat([read, z], 1)
    assert graph.reaches(node_of(y), read) is True
    assert graph.reaches(node_of(y), z) is False
    assert graph.reaches(node_of(z), joined) is True and graph.reaches(node_of(read), joined) is True
    assert graph.reaches(node_of(x), read) is None  # an input that stops gradients has no node
    assert graph.reaches(node_of(y), y) is True


class _RaisesOnce(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2D(3, 4, 1)
        self.raises = True

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = F.relu(self.conv(x))
        if self.raises:
            raise RuntimeError("bad batch")
        return y


def test_a_forward_that_raises_leaves_training_working() -> None:
    """A calibration forward that raises leaves the saved-tensor hooks in place; the next op
    saving a tensor elsewhere keeps it and removes them, so a backward pass still works."""
    paddle.seed(0)
    model = _RaisesOnce()
    model.eval()
    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(model)
    with pytest.raises(RuntimeError, match="bad batch"):
        qmodel(_batches(1)[0])
    weight = paddle.create_parameter([3], "float32")
    x = paddle.to_tensor([1.0, 2.0, 3.0])
    (paddle.tanh(weight * x) * x).sum().backward()  # tanh saves its output for the backward
    expected = (1 - np.tanh(weight.numpy() * x.numpy()) ** 2) * x.numpy() ** 2
    np.testing.assert_allclose(weight.grad.numpy(), expected, rtol=1e-5)
    qmodel.raises = False
    qmodel(_batches(1)[0])  # calibration goes on, and records this forward
    ptq.convert(qmodel)


def test_a_callers_own_saved_tensor_hooks_stay_in_place() -> None:
    """Paddle takes one pair of saved-tensor hooks at a time: with the caller's in place,
    calibration records nothing (the reader rule decides) and leaves them be."""
    packed = []

    def pack(tensor: paddle.Tensor) -> paddle.Tensor:
        packed.append(tensor.shape)
        return tensor

    paddle.seed(0)
    model = _ReadElsewhereFirst()
    model.eval()
    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), target="x86"))
    qmodel = ptq.quantize(model)
    with paddle.autograd.saved_tensors_hooks(pack, lambda tensor: tensor):
        qmodel(_batches(1)[0])
        weight = paddle.create_parameter([3], "float32")
        paddle.tanh(weight).sum().backward()
    assert packed  # still the caller's hooks
    ptq.convert(qmodel)


def test_the_recorded_forward_returns_what_the_grad_mode_asks_for() -> None:
    """Under ``no_grad`` the recorded forward's outputs stop gradients as ``no_grad`` makes
    them; with grad on (nothing switched) a backward pass through it works as before."""
    paddle.seed(0)
    model = _ReadElsewhereFirst()
    model.eval()
    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(model)
    with paddle.no_grad():
        assert qmodel(_batches(1)[0]).stop_gradient
    model = _ReadElsewhereFirst()
    model.eval()
    qmodel = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer())).quantize(model)
    qmodel(_batches(1)[0]).sum().backward()
    assert qmodel.b.weight.grad is not None
