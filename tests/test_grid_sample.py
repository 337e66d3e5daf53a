"""Resampling by a predicted grid (``F.grid_sample``, ``F.affine_grid``: spatial transformers,
flow warps) exports: Paddle Inference and ONNX Runtime (``GridSample``, opset 16) compute what
the simulation does."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.export import create_predictor, export_onnx, predict

F = paddle.nn.functional
SIZE = 12


class _SpatialTransformer(paddle.nn.Layer):
    """A localisation net predicts an affine map (near the identity), the input is resampled
    by it (``affine`` only), a conv reads the result, a conv-predicted flow warps that."""

    def __init__(self, mode: str, padding_mode: str, align_corners: bool, affine: bool) -> None:
        super().__init__()
        self.mode, self.padding_mode, self.align_corners, self.affine = mode, padding_mode, align_corners, affine
        self.localisation = paddle.nn.Linear(3, 6)
        self.conv, self.flow = paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.Conv2D(8, 2, 3, padding=1)
        self.head = paddle.nn.Conv2D(8, 4, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.affine:
            identity = paddle.to_tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
            theta = self.localisation(x.mean([2, 3])).reshape([-1, 2, 3]) * 0.2 + identity
            grid = F.affine_grid(theta, x.shape, align_corners=self.align_corners)
            x = F.grid_sample(x, grid, align_corners=self.align_corners)
        y = F.relu(self.conv(x))
        flow = paddle.tanh(self.flow(y)).transpose([0, 2, 3, 1]) * 1.2  # past the borders too
        warped = F.grid_sample(y, flow, mode=self.mode, padding_mode=self.padding_mode,
                               align_corners=self.align_corners)
        return self.head(warped)


def _converted(model: paddle.nn.Layer, rng: np.random.Generator) -> tuple[ip.ImperativePTQ, paddle.nn.Layer]:
    paddle.seed(0)
    ptq = ip.ImperativePTQ()
    qmodel = ptq.quantize(model)
    for _ in range(3):
        qmodel(paddle.to_tensor(rng.random((2, 3, SIZE, SIZE)).astype("float32")))
    ptq.convert(qmodel)
    return ptq, qmodel


@pytest.mark.parametrize("affine", [False, True], ids=["flow", "affine"])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("mode, padding_mode", [("bilinear", "zeros"), ("bilinear", "border"),
                                                ("nearest", "reflection")])
def test_grid_sample_runs_as_simulated(mode, padding_mode, align_corners, affine, tmp_path) -> None:
    """The legacy trace refused ``grid_sample`` ("output 'out' of PIR op pd_op.grid_sample has
    no slot in legacy op grid_sampler": a failed Paddle Inference export); ONNX had no
    converter for either op. ``affine_grid`` takes a fixed batch: Paddle's own ``jit.save``
    fails on a dynamic one."""
    pytest.importorskip("onnxruntime")
    import onnxruntime

    rng = np.random.default_rng(0)
    paddle.seed(0)
    ptq, qmodel = _converted(_SpatialTransformer(mode, padding_mode, align_corners, affine), rng)
    x = rng.random((2, 3, SIZE, SIZE)).astype("float32")
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    spec = [paddle.static.InputSpec([2 if affine else None, 3, SIZE, SIZE], "float32", "x")]
    ptq.save_quantized_model(qmodel, tmp_path / "m", spec)
    ran = {"Paddle Inference": predict(create_predictor(tmp_path / "m"), x)[0]}
    path = export_onnx(qmodel, tmp_path / "m.onnx", spec, opset=16)
    ran["ONNX Runtime"] = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    for runtime, output in ran.items():
        # Measured 7.2e-8 .. 3.0e-7 (nearest: a sample exactly between two pixels could pick
        # either; none here).
        assert np.abs(output - simulated).max() <= 1e-5 * np.abs(simulated).max(), runtime


def test_grid_sample_below_opset_16_names_the_opset(tmp_path) -> None:
    pytest.importorskip("onnx")
    _, qmodel = _converted(_SpatialTransformer("bilinear", "zeros", True, False), np.random.default_rng(0))
    with pytest.raises(NotImplementedError, match="GridSample from opset 16 on: pass opset=16"):
        export_onnx(qmodel, tmp_path / "m.onnx", [paddle.static.InputSpec([None, 3, SIZE, SIZE], "float32", "x")])
