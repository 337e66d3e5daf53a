"""fp32 convs and matmuls whose weights are whole numbers (detection heads' distribution-focal
projections ``0 .. reg_max``, a zero-initialized conv): Paddle Inference's
``quant_dequant_onednn_pass`` took them for int8 weights without a scale and refused the whole
program; the export reads them through a copy (``export/integer_weights.py``)."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.export import int8_report
from avx2_kernels import on_avx2, paddle_inference_outputs
from models import X86_TARGETS

nn = paddle.nn
F = nn.functional


class _ProjectionConv(nn.Layer):
    """PP-YOLOE's head: a conv predicting 4 x 17 bins, a softmax over the bins and a 1x1 conv
    with weights 0..16, marked ``skip_quant`` as PaddleDetection marks it."""

    def __init__(self) -> None:
        super().__init__()
        self.pred = nn.Conv2D(8, 4 * 17, 3, padding=1)
        self.proj = nn.Conv2D(17, 1, 1, bias_attr=False)
        self.proj.weight.set_value(paddle.linspace(0, 16, 17).reshape([1, 17, 1, 1]))
        self.proj.skip_quant = True

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        bins = self.pred(x).reshape([0, 4, 17, -1]).transpose([0, 2, 3, 1])
        return self.proj(F.softmax(bins, axis=1)).squeeze(1)


class _IntegralLinear(nn.Layer):
    """PicoDet's integral: ``F.linear`` of the bin softmax and a buffer 0..7."""

    def __init__(self) -> None:
        super().__init__()
        self.pred = nn.Conv2D(8, 4 * 8, 1)
        self.register_buffer("project", paddle.linspace(0, 7, 8))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        bins = self.pred(x).transpose([0, 2, 3, 1]).reshape([-1, 8])
        return F.linear(F.softmax(bins, axis=1), self.project)


class _ZeroConv(nn.Layer):
    """A zero-initialized conv kept fp32 next to an int8 one (TTFNet's offset conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2D(8, 8, 3, padding=1)
        self.offset = nn.Conv2D(8, 4, 1, weight_attr=nn.initializer.Constant(0.0))
        self.offset.skip_quant = True

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = F.relu(self.conv(x))
        return paddle.concat([y, self.offset(y)], axis=1)


@pytest.mark.parametrize("model", [_ProjectionConv, _IntegralLinear, _ZeroConv], ids=["projection-conv", "integral-linear", "zero-conv"])
@pytest.mark.parametrize("target", X86_TARGETS)
def test_whole_number_fp32_weights_run_in_paddle_inference(model, target, tmp_path, avx2_runner, caplog) -> None:
    """Measured before: ``SystemError: (Fatal) Could not find threshold information`` at
    ``create_predictor``, every model and target; 2e-7 .. 3e-7 of the largest output after.
    The copy is no weight computed in the graph (the export warned so of PP-YOLOE's head)."""
    paddle.seed(0)
    net = model()
    net.eval()
    rng = np.random.default_rng(0)
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=target))
    quantized = ptq.quantize(net)
    ptq.calibrate(quantized, [np.abs(rng.standard_normal((2, 8, 8, 8))).astype("float32") for _ in range(2)], progress=False)
    ptq.convert(quantized)
    x = np.abs(rng.standard_normal((2, 8, 8, 8))).astype("float32")
    simulated = quantized(paddle.to_tensor(x)).numpy()
    prefix = str(tmp_path / "m")
    ptq.save_quantized_model(quantized, prefix, [paddle.static.InputSpec([None, 8, 8, 8], "float32", "x")])
    assert "computed in the graph" not in caplog.text
    assert int8_report(prefix).int8.get("fused_conv2d") == 1
    for ran, in paddle_inference_outputs(prefix, [x], on_avx2(avx2_runner, target)).values():
        assert np.abs(ran - simulated).max() <= 1e-5 * np.abs(simulated).max()
