"""The functional-op routers walk the stack for a call's layer only inside the forward of a
layer that owns sites (or while a model is calibrated): every other ``x * y`` / ``paddle.matmul``
in the process runs as Paddle's own, and the models with sites still reach them (copies too)."""

from __future__ import annotations

import copy

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq import functional_matmul, functional_ops
from imperative_ptq.site_scope import inside_site_owner

F = paddle.nn.functional


class _Gated(paddle.nn.Layer):
    """A functional matmul on its own parameter and a multiply of two activations."""

    def __init__(self) -> None:
        super().__init__()
        self.w = self.create_parameter([8, 8])
        self.head = paddle.nn.Linear(8, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if x.shape[-1] != 8:
            raise ValueError("width 8 expected")
        hidden = paddle.matmul(x, self.w)
        return self.head(hidden * F.sigmoid(hidden))


@pytest.fixture
def stack_walks(monkeypatch) -> dict[str, int]:
    """Counts the routers' stack walks (each still returns the calling layer)."""
    walks = {"matmul": 0, "ops": 0}
    for key, module in (("matmul", functional_matmul), ("ops", functional_ops)):
        original = module._calling_layer

        def counted(*args, _original=original, _key=key, **kwargs):
            walks[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "_calling_layer", counted)
    return walks


def _converted() -> tuple[paddle.nn.Layer, paddle.nn.Layer]:
    paddle.seed(0)
    model = _Gated()
    model.eval()
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer()))
    quantized = ptq.quantize(model)
    for _ in range(2):
        quantized(paddle.randn([4, 8]))
    ptq.convert(quantized)
    names = [name for name, _ in quantized.named_sublayers()]
    assert "w_matmul" in names and "multiply_0" in names, names
    return model, quantized


def test_calls_outside_a_site_owner_are_not_routed(stack_walks, monkeypatch) -> None:
    _, quantized = _converted()  # its forwards drop what earlier tests' raised forwards left
    # A model still being calibrated anywhere in the process routes every call (its sites are
    # found by walking the stack): earlier tests may leave one until the garbage collector
    # runs, so this test takes calibration out of the picture.
    for module in (functional_matmul, functional_ops):
        monkeypatch.setattr(module, "any_discovering", lambda: False)
    a, b = paddle.randn([4, 8]), paddle.randn([8, 8])
    walks_before = dict(stack_walks)
    expected = (a.numpy() @ b.numpy()) * a.numpy()[:, :8]
    got = paddle.matmul(a, b) * a
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert stack_walks == walks_before and not inside_site_owner()
    quantized(a)
    assert stack_walks["matmul"] > walks_before["matmul"] and stack_walks["ops"] > walks_before["ops"]
    assert not inside_site_owner()


def test_the_converted_model_and_its_copy_reach_their_sites() -> None:
    model, quantized = _converted()
    x = paddle.randn([4, 8])
    simulated = quantized(x).numpy()
    with paddle.no_grad():
        fp32 = model(x).numpy()
    assert not np.allclose(simulated, fp32, rtol=0, atol=1e-7)  # the int8 site ran
    np.testing.assert_array_equal(copy.deepcopy(quantized)(x).numpy(), simulated)


def test_a_forward_that_raises_leaves_later_calls_correct() -> None:
    _, quantized = _converted()
    x = paddle.randn([4, 8])
    simulated = quantized(x).numpy()
    with pytest.raises(ValueError, match="width 8"):
        quantized(paddle.randn([4, 6]))
    np.testing.assert_array_equal(quantized(x).numpy(), simulated)
    a = paddle.randn([3, 3])
    np.testing.assert_allclose((a * a).numpy(), a.numpy() ** 2, rtol=1e-6)


def test_a_raised_forward_stops_routing_once_a_site_owner_runs_again(stack_walks) -> None:
    _, quantized = _converted()
    with pytest.raises(ValueError, match="width 8"):
        quantized(paddle.randn([4, 6]))
    assert inside_site_owner()  # its post hook never ran
    quantized(paddle.randn([4, 8]))
    assert not inside_site_owner()
