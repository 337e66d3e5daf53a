"""Box features of two-stage detectors (``paddle.vision.ops.roi_align``): Paddle Inference and
ONNX Runtime (``RoiAlign``, opset 16 for ``aligned``) compute what the simulation does."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.export import create_predictor, export_onnx, predict, save_quantized_model
from models import converted
from ties import relative_error

F = paddle.nn.functional
ANCHORS = np.array([[2, 2, 20, 20], [10, 4, 40, 30], [0, 16, 24, 60]], np.float32)


class _BoxHead(paddle.nn.Layer):
    """A backbone conv, boxes refined from the pooled features around fixed anchors (as an
    RPN proposes them), ``roi_align`` of each image's boxes, a Linear head on them."""

    def __init__(self, aligned: bool, sampling_ratio: int) -> None:
        super().__init__()
        self.aligned, self.sampling_ratio = aligned, sampling_ratio
        self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.refine = paddle.nn.Linear(8, 4 * len(ANCHORS))
        self.head = paddle.nn.Linear(8 * 4 * 4, 3)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        features = F.relu(self.conv(x))
        shifts = 4.0 * paddle.tanh(self.refine(features.mean([2, 3]))).reshape([-1, len(ANCHORS), 4])
        boxes = (paddle.to_tensor(ANCHORS) + shifts).reshape([-1, 4])
        counts = paddle.full([x.shape[0]], len(ANCHORS), "int32")
        pooled = paddle.vision.ops.roi_align(
            features, boxes, counts, 4, spatial_scale=0.5, sampling_ratio=self.sampling_ratio,
            aligned=self.aligned,
        )
        return self.head(pooled.flatten(1))


@pytest.mark.parametrize("aligned, sampling_ratio", [(True, -1), (False, -1), (True, 2), (False, 2)])
def test_roi_align_runs_as_simulated(aligned: bool, sampling_ratio: int, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    paddle.seed(0)
    rng = np.random.default_rng(0)
    qmodel = converted(_BoxHead(aligned, sampling_ratio), [paddle.to_tensor(rng.random((2, 3, 32, 32)).astype("float32")) for _ in range(3)])
    spec = [paddle.static.InputSpec([None, 3, 32, 32], "float32", "x")]
    x = rng.random((3, 3, 32, 32)).astype("float32")
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    prefix = str(tmp_path / "m")
    save_quantized_model(qmodel, prefix, spec)
    assert relative_error(predict(create_predictor(prefix, num_threads=1), x)[0], simulated) < 2e-6
    session = ort.InferenceSession(export_onnx(qmodel, prefix, spec, opset=16), providers=["CPUExecutionProvider"])
    assert relative_error(session.run(None, {"x": x})[0], simulated) < 2e-6
    if aligned:
        with pytest.raises(NotImplementedError, match="pass opset=16"):
            export_onnx(qmodel, str(tmp_path / "old"), spec)
    else:  # opset 10's RoiAlign is Paddle's aligned=False
        session = ort.InferenceSession(export_onnx(qmodel, str(tmp_path / "old"), spec), providers=["CPUExecutionProvider"])
        assert relative_error(session.run(None, {"x": x})[0], simulated) < 2e-6


class _ExternalBoxes(paddle.nn.Layer):
    """Boxes and per-image box counts given as inputs (a second stage exported on its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.head = paddle.nn.Linear(8 * 4 * 4, 3)

    def forward(self, x: paddle.Tensor, boxes: paddle.Tensor, counts: paddle.Tensor) -> paddle.Tensor:
        pooled = paddle.vision.ops.roi_align(F.relu(self.conv(x)), boxes, counts, 4, spatial_scale=0.5)
        return self.head(pooled.flatten(1))


def test_box_counts_given_as_inputs_export(tmp_path) -> None:
    """The spec check runs the model on ones for integer inputs: on zeros, ``roi_align`` read
    zero boxes per image beside a box tensor with rows, which Paddle's kernel does not check
    (a segmentation fault, at random)."""
    from imperative_ptq.export.spec_check import _concrete_shape, _zeros

    spec = [paddle.static.InputSpec([None, 3, 32, 32], "float32", "x"),
            paddle.static.InputSpec([None, 4], "float32", "boxes"),
            paddle.static.InputSpec([None], "int32", "counts")]
    counts, image = (_zeros(spec[i], _concrete_shape(spec[i].shape, 1, 2)) for i in (2, 0))
    assert float(counts.sum()) == 2 and float(image.abs().sum()) == 0
    paddle.seed(0)
    rng = np.random.default_rng(1)
    model = _ExternalBoxes()
    model.eval()

    def inputs(images: int) -> list[np.ndarray]:
        counts = rng.integers(1, 4, images).astype("int32")
        corners = rng.uniform(0, 30, (int(counts.sum()), 2))
        boxes = np.concatenate([corners, corners + rng.uniform(2, 30, corners.shape)], 1).astype("float32")
        return [rng.random((images, 3, 32, 32)).astype("float32"), boxes, counts]

    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, [inputs(2) for _ in range(3)], progress=False)
    ptq.convert(qmodel, progress=False)
    prefix = str(tmp_path / "m")
    ptq.save_quantized_model(qmodel, prefix, spec)
    batch = inputs(3)
    simulated = qmodel(*[paddle.to_tensor(value) for value in batch]).numpy()
    assert relative_error(predict(create_predictor(prefix, num_threads=1), *batch)[0], simulated) < 2e-6
