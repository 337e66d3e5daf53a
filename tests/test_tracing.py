"""Tracing unusual graphs into the legacy-IR program: shared layers, PIR-only activations,
failures that must leave nothing behind (tiny random models, fast)."""

from __future__ import annotations

import os

import numpy as np
import paddle
import pytest

from imperative_ptq.export import create_predictor, predict, save_quantized_model
from imperative_ptq.export.legacy_program import legacy_static_mode, load_legacy_program
from models import converted


class _SharedLinear(paddle.nn.Layer):
    """One Linear (and one ReLU) called twice, as a recurrent or weight-tied block does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = paddle.nn.Linear(8, 8)
        self.relu = paddle.nn.ReLU()
        self.out = paddle.nn.Linear(8, 3)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.out(self.relu(self.fc(self.relu(self.fc(x)))))


class _Untraceable(paddle.nn.Layer):
    """Calls ``Tensor.unfold``, which Paddle 3.3.1 supports in dynamic graph mode only, so no
    trace can record it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = paddle.nn.Linear(8, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc(x).unfold(1, 2, 2).sum(-1)


def test_layer_called_twice_exports_a_weight_per_call(tmp_path) -> None:
    paddle.seed(0)
    # Non-negative inputs: on the default x86 target a Linear reading a signed input stays fp32.
    qmodel = converted(_SharedLinear(), [paddle.rand([16, 8]) for _ in range(3)])
    x = paddle.rand([64, 8])
    reference = qmodel(x).numpy()
    prefix = str(tmp_path / "shared")
    save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 8], "float32", "x")])
    with legacy_static_mode():
        block = load_legacy_program(prefix).program.global_block()
        weights = [op.input("Y")[0] for op in block.ops if op.type == "matmul_v2"]
        sources = {
            op.output("Y")[0]: op.input("X")[0] for op in block.ops if op.type == "dequantize_linear"
        }
    # oneDNN rescales each op's int8 weight in place: a shared tensor was rescaled twice.
    assert len({sources[name] for name in weights}) == 3
    logits = predict(create_predictor(prefix, num_threads=1), x.numpy())[0]
    cosine = np.sum(logits * reference) / np.linalg.norm(logits) / np.linalg.norm(reference)
    assert cosine > 0.95, cosine  # was ~0: all-zero outputs


def test_tracing_failure_message_does_not_only_blame_the_shape(tmp_path) -> None:
    """The model ran on the spec in dygraph (the export checks that first), so the message
    does not suggest a wrong rank or shape."""
    paddle.seed(0)
    qmodel = converted(_Untraceable(), [paddle.randn([4, 8])])
    with pytest.raises(ValueError, match=r"failed \(the model runs on it in dygraph, so an op without a legacy-IR kernel"):
        save_quantized_model(
            qmodel, str(tmp_path / "m"), [paddle.static.InputSpec([None, 8], "float32", "x")]
        )
    assert os.listdir(tmp_path) == []


class _NotSelf(paddle.nn.Layer):
    """A layer whose ``forward`` names its first parameter ``this``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = paddle.nn.Linear(8, 4)

    def forward(this, x: paddle.Tensor) -> paddle.Tensor:  # noqa: N805
        return this.fc(x)


def test_a_forward_without_self_is_named_in_the_tracing_failure(tmp_path) -> None:
    """Paddle's jit.save takes a forward's first parameter for the layer only when it is named
    ``self`` (else it asks for an input "x" the spec already is); the message said only "wrong
    rank or shape, or an op without a legacy-IR kernel"."""
    paddle.seed(0)
    qmodel = converted(_NotSelf(), [paddle.rand([4, 8]) for _ in range(2)])
    with pytest.raises(ValueError, match="_NotSelf.forward names its first parameter 'this'"):
        save_quantized_model(qmodel, str(tmp_path / "m"), [paddle.static.InputSpec([None, 8], "float32", "x")])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "activation",
    [
        paddle.nn.Sigmoid, paddle.nn.Tanh, paddle.nn.GELU, paddle.nn.Silu, paddle.nn.Hardsigmoid,
        paddle.nn.Softplus, paddle.nn.Hardswish, paddle.nn.Mish,
    ],
    ids=lambda layer: layer.__name__,
)
def test_pir_only_activations_trace_to_legacy_ops(activation, tmp_path) -> None:
    """Paddle 3.3 implements these with PIR-only ``_C_ops`` calls; the export maps them to
    the legacy ops Paddle Inference runs."""

    class Net(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2 = paddle.nn.Linear(16, 32), activation(), paddle.nn.Linear(32, 8)

        def forward(self, x: paddle.Tensor) -> paddle.Tensor:
            return self.fc2(self.act(self.fc1(x)))

    paddle.seed(0)
    model = Net()
    model.eval()
    qmodel = converted(model, [paddle.randn([16, 16]) for _ in range(4)])
    prefix = str(tmp_path / "m")
    save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 16], "float32", "x")])
    x = np.random.default_rng(1).standard_normal((64, 16)).astype("float32")
    reference = model(paddle.to_tensor(x)).numpy().ravel()
    out = predict(create_predictor(prefix, int8=True), x)[0].ravel()
    assert out @ reference / np.linalg.norm(out) / np.linalg.norm(reference) > 0.99


def test_failed_trace_leaves_no_recorded_parameters(tmp_path) -> None:
    """A failed trace must not leave its parameters in Paddle's per-program recorder: a later
    program reusing the ``id`` would inherit them and ``jit.save`` would raise ``KeyError``."""
    from paddle.jit.dy2static.program_translator import ProgramTranslator

    qmodel = converted(_Untraceable(), [paddle.randn([4, 8])])
    with pytest.raises(ValueError):
        save_quantized_model(
            qmodel, str(tmp_path / "m"), [paddle.static.InputSpec([None, 8], "float32", "x")]
        )
    assert ProgramTranslator.get_instance()._params_recorder.params_dict == {}


class _TwoBranches(paddle.nn.Layer):
    """Two Linear branches added with ``+``: traced, a legacy-IR variable add of an open batch."""

    def __init__(self) -> None:
        super().__init__()
        self.left = paddle.nn.Linear(8, 4)
        self.right = paddle.nn.Linear(8, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.left(x) + self.right(x)


def test_traced_adds_look_up_their_call_site_without_reading_source(tmp_path, monkeypatch) -> None:
    """Paddle's traced ``x + y`` of an open batch looks up its call site (``inspect.stack()``)
    for a deprecation warning: the export has it take the frames without their source lines
    (reading them cost ~50 ms per add under pytest), and leaves Paddle's module as it was."""
    import inspect

    from paddle.base.layers import math_op_patch

    qmodel = converted(_TwoBranches(), [paddle.rand([4, 8]) for _ in range(2)])
    source_lines = []
    stack = inspect.stack
    monkeypatch.setattr(inspect, "stack", lambda context=1: source_lines.append(context) or stack(context))
    spec = [paddle.static.InputSpec([None, 8], "float32", "x")]
    save_quantized_model(qmodel, str(tmp_path / "int8" / "model"), spec)
    assert source_lines == [0]
    assert math_op_patch.inspect is inspect
