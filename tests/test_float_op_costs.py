"""The float ops the export adds around int8 layers, in forms Paddle Inference runs in oneDNN
kernels: codes rounded by two shifting ``scale`` ops (Paddle's ``round`` op runs in a scalar
CPU kernel: 370 ms for 1.4M values on this project's AVX2 EPYC), and a u8 clip of a tensor
that other ops read too as a ``clip`` op (an ``elementwise_min`` by a constant broadcasts in
Paddle's CPU kernel, 4-5x slower). Each gives what the op it replaces gave: half-to-even
rounding, exact halves included, and a clip whose bound no conv/fc fusion drops."""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from imperative_ptq.export import create_predictor, predict
from imperative_ptq.export.graph import rounding_steps
from imperative_ptq.export.legacy_program import legacy_static_mode
from models import converted, largest_error_in_paddle_inference
from test_unfused_identity import _CrossResolutionFusion, _batches, SIZE

nn = paddle.nn
STEP = 0.03125  # (a power of two: the halves below are exact halves once scaled)


def _saved_rounding(prefix: str) -> None:
    """``x -> scale(1 / STEP) -> rounding_steps -> scale(STEP)`` saved as a legacy program."""
    with legacy_static_mode():
        main, startup = paddle.static.Program(), paddle.static.Program()
        with paddle.static.program_guard(main, startup):
            x = paddle.static.data("x", [-1, 64], "float32")
            block = main.global_block()
            names = ["scaled", "shifted", "rounded", "out"]
            for name in names:
                block.create_var(name=name, shape=x.shape, dtype="float32")
            steps = [
                ("scale", {"X": ["x"]}, {"Out": ["scaled"]}, {"scale": 1.0 / STEP, "bias": 0.0, "bias_after_scale": True}),
                *rounding_steps("scaled", "rounded", "shifted"),
                ("scale", {"X": ["rounded"]}, {"Out": ["out"]}, {"scale": STEP, "bias": 0.0, "bias_after_scale": True}),
            ]
            for op_type, inputs, outputs, attrs in steps:
                block.append_op(type=op_type, inputs=inputs, outputs=outputs, attrs=attrs)
            executor = paddle.static.Executor(paddle.CPUPlace())
            executor.run(startup)
            paddle.static.save_inference_model(prefix, [x], [block.var("out")], executor, program=main)
    open(prefix + ".pdiparams", "ab").close()  # (no parameters: Paddle writes none)


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_rounding_steps_round_half_to_even_in_paddle_inference(int8, tmp_path) -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((256, 64)) * 200 * STEP).astype(np.float32)
    # Exact halves of both signs and the largest magnitudes rounded exactly, +-(2**22 - 0.5).
    x[0] = (np.arange(-32, 32) + 0.5).astype(np.float32) * np.float32(STEP)
    x[1, :2] = np.float32(2**22 - 0.5) * np.float32(STEP), np.float32(-(2**22) + 0.5) * np.float32(STEP)
    scaled = x * np.float32(1.0 / STEP)
    expected = np.round(scaled) * np.float32(STEP)  # numpy rounds half to even
    prefix = str(tmp_path / "rounding")
    _saved_rounding(prefix)
    ran = predict(create_predictor(prefix, int8=int8, num_threads=1), x)[0]
    assert np.count_nonzero(scaled - np.floor(scaled) == 0.5) >= 66
    np.testing.assert_array_equal(ran, expected)


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_codes_computed_in_float_run_without_a_round_op(target, tmp_path) -> None:
    paddle.seed(0)
    qmodel = converted(_CrossResolutionFusion(), _batches(4), target)
    x = np.random.default_rng(7).standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) < 2e-6
    ops = _op_types(str(tmp_path / "m"))
    assert "round" not in ops
    assert [op for op in ops if op == "scale"], ops  # (the codes are there)


class _SharedAndSoleReluOutputs(nn.Layer):
    """``shared``: a conv + ReLU output read by an int8 conv (through a u8 clip) and a float add;
    ``sole``: a conv output with no ReLU, non-negative (its weights and bias are), read by an
    int8 conv alone, so its u8 clip is the conv's only reader."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2D(3, 8, 3, padding=1), nn.Conv2D(8, 8, 3, padding=1)
        self.c, self.d = nn.Conv2D(3, 8, 3, padding=1), nn.Conv2D(8, 8, 3, padding=1)
        with paddle.no_grad():
            self.c.weight.set_value(paddle.abs(self.c.weight))
            self.c.bias.set_value(paddle.abs(self.c.bias))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        shared = F.relu(self.a(x))
        sole = self.c(x)
        return paddle.concat([self.b(shared) + shared, self.d(sole)], 1)


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_a_u8_clip_is_a_clip_op_where_its_input_has_other_readers(target, tmp_path) -> None:
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.random((4, 3, SIZE, SIZE)).astype(np.float32)) for _ in range(3)]
    qmodel = converted(_SharedAndSoleReluOutputs(), batches, target)
    # Inputs beyond calibration's range, so that both clips' bounds are reached.
    x = (rng.random((3, 3, SIZE, SIZE)) * 1.5).astype(np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) < 2e-6
    ops = _op_types(str(tmp_path / "m"))
    # The shared output's clip is a clip op; the sole reader stays an elementwise_min (a clip
    # right after the conv would be fused into it and its bound dropped by the ReLU after it).
    assert ops.count("clip") >= 1 and ops.count("elementwise_min") == 1, ops


def _op_types(prefix: str) -> list[str]:
    with legacy_static_mode():
        program, _, _ = paddle.static.load_inference_model(prefix, paddle.static.Executor(paddle.CPUPlace()))
    return [op.type for op in program.global_block().ops]
