"""YOLOv3-style decoding (``paddle.vision.ops.yolo_box``): Paddle Inference and ONNX Runtime
compute what the simulation does, boxes and scores, masked cells included."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from imperative_ptq.export import create_predictor, export_onnx, predict, save_quantized_model
from models import converted
from ties import relative_error

ANCHORS = [10, 13, 16, 30, 33, 23]
CLASSES = 4


class _YoloHead(paddle.nn.Layer):
    """Two strided convs, a 1x1 prediction conv (with IoU channels first for ``iou_aware``),
    ``yolo_box`` on an image size computed from the input."""

    def __init__(self, clip_bbox: bool, iou_aware: bool, scale_x_y: float) -> None:
        super().__init__()
        self.clip_bbox, self.iou_aware, self.scale_x_y = clip_bbox, iou_aware, scale_x_y
        channels = len(ANCHORS) // 2 * (5 + CLASSES + int(iou_aware))
        self.backbone = paddle.nn.Sequential(
            paddle.nn.Conv2D(3, 16, 3, 2, 1), paddle.nn.ReLU(), paddle.nn.Conv2D(16, 32, 3, 2, 1), paddle.nn.ReLU(),
        )
        self.predict = paddle.nn.Conv2D(32, channels, 1)

    def forward(self, x: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        image_size = paddle.full([x.shape[0], 2], 60, "int32")
        return paddle.vision.ops.yolo_box(
            self.predict(self.backbone(x)), image_size, ANCHORS, CLASSES, conf_thresh=0.5,
            downsample_ratio=4, clip_bbox=self.clip_bbox, scale_x_y=self.scale_x_y,
            iou_aware=self.iou_aware, iou_aware_factor=0.4,
        )


@pytest.mark.parametrize("clip_bbox, iou_aware, scale_x_y", [(True, False, 1.0), (False, False, 1.05), (True, True, 1.2)])
def test_yolo_box_runs_as_simulated(clip_bbox: bool, iou_aware: bool, scale_x_y: float, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    paddle.seed(0)
    rng = np.random.default_rng(0)
    qmodel = converted(_YoloHead(clip_bbox, iou_aware, scale_x_y), [paddle.to_tensor(rng.random((2, 3, 32, 32)).astype("float32")) for _ in range(3)])
    spec = [paddle.static.InputSpec([None, 3, 32, 32], "float32", "x")]
    x = rng.random((3, 3, 32, 32)).astype("float32")
    simulated = [t.numpy() for t in qmodel(paddle.to_tensor(x))]
    assert 0 < (simulated[1].max(axis=2) == 0).mean() < 1  # some cells under the threshold
    prefix = str(tmp_path / "m")
    save_quantized_model(qmodel, prefix, spec)
    session = ort.InferenceSession(export_onnx(qmodel, prefix, spec), providers=["CPUExecutionProvider"])
    runtimes = {"Paddle Inference": predict(create_predictor(prefix, num_threads=1), x),
                "ONNX Runtime": session.run(None, {"x": x})}
    for runtime, outputs in runtimes.items():
        for name, ran, expected in zip(("boxes", "scores"), outputs, simulated):
            assert ran.shape == expected.shape, (runtime, name)
            assert relative_error(ran, expected) < 2e-6, (runtime, name, relative_error(ran, expected))
