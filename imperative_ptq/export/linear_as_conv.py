"""A Linear traced as a 1x1 conv, for the Paddle Inference programs of the oneDNN targets.

Paddle 3.3.1's oneDNN int8 pipeline recomputes a fc's per-channel weight scales from runs of
consecutive elements of its ``[in, out]`` weight instead of its columns
(:func:`imperative_ptq.quant_layers.paddle_fc_weight`), and a conv's from each output
channel's own filter. ``convert`` marks the Linear layers the fc would hurt most
(:func:`imperative_ptq.quant_layers.linear_runs_as_conv`, ``QuantizedLayer.runs_as_conv``) and
simulates them with their own per-channel weight; the export traces each as

    reshape2 [-1, in, 1, 1] -> conv2d (filter [out, in, 1, 1]) + bias -> reshape2 [..., out]

so that Paddle runs the weight the simulation computes with. The ONNX export keeps the
Linear (ONNX Runtime takes the stored per-channel scales as they are).
"""

from __future__ import annotations

import numpy as np
import paddle

__all__ = ["LinearAsConv"]


class LinearAsConv(paddle.nn.Layer):
    """Computes ``linear``'s ``x W + b`` with a 1x1 conv on ``x`` reshaped to
    ``[-1, in, 1, 1]``; the leading dimensions come back unchanged.

    Args:
        linear: The Linear, whose weight (already on its int8 grid) and bias are copied.
    """

    def __init__(self, linear: paddle.nn.Linear) -> None:
        super().__init__()
        #: The Linear, for a forward that reads its ``weight`` or ``bias`` (never called).
        self.linear = linear
        in_features, out_features = (int(size) for size in linear.weight.shape)
        self.in_features, self.out_features = in_features, out_features
        self.conv = paddle.nn.Conv2D(
            in_features, out_features, 1, bias_attr=None if linear.bias is not None else False
        )
        with paddle.no_grad():
            filter_values = np.ascontiguousarray(linear.weight.numpy().T)[:, :, None, None]
            self.conv.weight.set_value(filter_values.astype(np.float32))
            if linear.bias is not None:
                self.conv.bias.set_value(linear.bias.numpy().astype(np.float32))

    @property
    def weight(self) -> paddle.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> paddle.Tensor | None:
        return self.linear.bias

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        output = self.conv(paddle.reshape(x, [-1, self.in_features, 1, 1]))
        leading = list(x.shape[:-1])
        if sum(1 for size in leading if size < 0) > 1:
            # Several dynamic dimensions: read them from the input at run time.
            shape = paddle.shape(x)
            leading = [size if size >= 0 else shape[axis] for axis, size in enumerate(leading)]
        return paddle.reshape(output, leading + [self.out_features])
