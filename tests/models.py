"""Small models and helpers shared by the tests (import as ``from models import ...``)."""

from __future__ import annotations

from typing import Iterable

import paddle

from imperative_ptq import ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig


def mlp(*features: int) -> paddle.nn.Sequential:
    """Linear layers of the given widths with a ReLU between each pair, e.g. ``mlp(4, 8, 2)``."""
    if len(features) < 2:
        raise ValueError("mlp needs at least an input and an output width")
    layers: list[paddle.nn.Layer] = []
    for index, (width_in, width_out) in enumerate(zip(features, features[1:])):
        if index:
            layers.append(paddle.nn.ReLU())
        layers.append(paddle.nn.Linear(width_in, width_out))
    return paddle.nn.Sequential(*layers)


class Branch(paddle.nn.Layer):
    """``b`` runs only on inputs whose ``a(x)`` mean is positive: a layer some batches skip."""

    def __init__(self) -> None:
        super().__init__()
        self.a = paddle.nn.Linear(8, 8)
        self.b = paddle.nn.Linear(8, 8)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.a(x)
        return self.b(x) if float(x.mean()) > 0 else x


def converted(
    model: paddle.nn.Layer, batches: Iterable[paddle.Tensor], target: str = "x86"
) -> paddle.nn.Layer:
    """``model`` (eval mode) quantized with KL + per-channel, calibrated on ``batches`` and
    converted for ``target``."""
    model.eval()
    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), target=target))
    qmodel = ptq.quantize(model)
    for batch in batches:
        qmodel(batch)
    ptq.convert(qmodel)
    return qmodel
