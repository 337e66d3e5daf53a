"""A factor applied to an int8 conv's output before an int8 Linear (``x * 0.5``,
``paddle.scale``, PaddleClas' ``Dropout(mode="downscale_in_infer")``) is applied in Paddle
Inference: its ``cpu_quantize_squash_pass`` folded the factor into the conv's dequantize op
and then folded that op into the conv, dropping the factor (``graph.multiply_instead_of_scaling``)."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from imperative_ptq.export import int8_report
from models import X86_TARGETS, converted, largest_error_in_paddle_inference

nn = paddle.nn

FACTORS = {
    "multiply": lambda layer, t: t * 0.5,
    "scale": lambda layer, t: paddle.scale(t, 0.5),
    "dropout": lambda layer, t: layer.dropout(t),
}


class ScaledHead(nn.Layer):
    """conv -> ReLU -> a factor of 0.5 -> flatten -> Linear."""

    def __init__(self, factor: str) -> None:
        super().__init__()
        self.conv = nn.Conv2D(16, 64, 1)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(0.5, mode="downscale_in_infer")
        self.fc = nn.Linear(64, 10)
        self.factor = factor

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc(paddle.flatten(FACTORS[self.factor](self, self.act(self.conv(x))), 1))


@pytest.mark.parametrize("target", X86_TARGETS)
@pytest.mark.parametrize("factor", sorted(FACTORS))
def test_a_factor_between_int8_layers_is_applied_in_paddle_inference(factor: str, target: str, tmp_path) -> None:
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.normal(0, 1, (8, 16, 1, 1)).astype("float32")) for _ in range(4)]
    qmodel = converted(ScaledHead(factor), batches, target)
    x = rng.normal(0, 1, (4, 16, 1, 1)).astype("float32")
    # Measured before: 0.97 (x86) and 1.0 (x86-vnni) of the largest output off.
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) <= 1e-5
    assert int8_report(str(tmp_path / "m")).int8 == {"fused_conv2d": 1, "fc": 1}
