"""Layers a model calls through a plain Python list, tuple or dict. PaddleDetection's FPN and
heads register each conv with ``add_sublayer`` and call it from a list
(``self.lateral_convs[i](x)``): ``convert`` replaced the registered layer only, so the
simulation kept calling the fp32 conv while the export ran it int8 (measured: an FCOS FPN's
lateral conv 0.77% of its largest output off Paddle Inference, its GroupNorm head up to 9%;
after, every FCOS output within 1e-6). ``replace_sublayer`` now replaces such references
too."""

from __future__ import annotations

import collections

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.converted import STATE_PREFIX
from imperative_ptq.quant_layers import QuantizedLayer, replace_sublayer, replace_sublayers
from models import converted, largest_error_in_paddle_inference

nn = paddle.nn
F = paddle.nn.functional


class _ListedConvs(nn.Layer):
    """An FPN-style neck: lateral convs in a list, output convs in a dict, a head in a tuple,
    each registered with ``add_sublayer`` and called through its container."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2D(3, 8, 3, padding=1)
        self.laterals = [self.add_sublayer(f"lateral{i}", nn.Conv2D(8, 8, 1)) for i in range(2)]
        self.outputs = {"p3": self.add_sublayer("output_p3", nn.Conv2D(8, 8, 3, padding=1))}
        self.head = (self.add_sublayer("head_conv", nn.Conv2D(8, 4, 1)),)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = F.relu(self.stem(x))
        top = F.relu(self.laterals[1](F.max_pool2d(x, 2)))
        fused = F.relu(self.laterals[0](x) + F.interpolate(top, scale_factor=2.0, mode="nearest"))
        return self.head[0](F.relu(self.outputs["p3"](fused)))


def _batches(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [np.abs(rng.standard_normal((2, 3, 8, 8))).astype("float32") for _ in range(count)]


def test_layers_called_through_containers_are_simulated_and_exported_int8(tmp_path) -> None:
    paddle.seed(0)
    model = _ListedConvs()
    *calibration, x = _batches(4)
    qmodel = converted(model, [paddle.to_tensor(batch) for batch in calibration])
    assert all(isinstance(layer, QuantizedLayer) for layer in (*qmodel.laterals, qmodel.outputs["p3"], *qmodel.head))
    assert qmodel.laterals[0] is qmodel.lateral0 and qmodel.head[0] is qmodel.head_conv
    # The user's model keeps its own layers in its own containers.
    assert all(type(layer) is nn.Conv2D for layer in (*model.laterals, model.outputs["p3"], *model.head))
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) <= 2e-6


def test_keep_fp32_puts_the_fp32_layer_back_in_the_containers() -> None:
    paddle.seed(0)
    model = _ListedConvs()
    qmodel = converted(model, [paddle.to_tensor(batch) for batch in _batches(2)])
    ip.keep_fp32(qmodel, ["lateral1"], model)
    assert not isinstance(qmodel.laterals[1], QuantizedLayer) and qmodel.laterals[1] is qmodel.lateral1
    assert isinstance(qmodel.laterals[0], QuantizedLayer)


_Pair = collections.namedtuple("_Pair", ["first", "second"])


def test_replace_sublayer_reaches_nested_containers_and_counts_each_reference() -> None:
    holder = nn.Layer()
    old, new, other = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    holder.add_sublayer("old", old)
    holder.nested = [[old, other], {"a": old, "b": (old, other)}]
    holder.named = _Pair(old, other)  # a namedtuple is left as it is
    holder.cycle = []
    holder.cycle.append(holder.cycle)
    assert replace_sublayer(holder, old, new) == 4  # the registry and three container entries
    assert holder.old is new and holder.nested[0] == [new, other]
    assert holder.nested[1]["a"] is new and holder.nested[1]["b"] == (new, other)
    assert holder.named.first is old


@pytest.mark.parametrize("container", ["list", "dict", "tuple"])
def test_a_layer_only_in_a_container_is_replaced_in_it(container: str) -> None:
    holder = nn.Layer()
    old, new = nn.Linear(2, 2), nn.Linear(2, 2)
    holder.add_sublayer("registered", old)
    holder.kept = {"list": [old], "dict": {"k": old}, "tuple": (old,)}[container]
    replace_sublayer(holder, old, new)
    entry = holder.kept["k"] if container == "dict" else holder.kept[0]
    assert entry is new


def test_replace_sublayers_swaps_many_layers_in_one_walk_as_one_call_each_would() -> None:
    """Shared under two names, in a child layer, in containers: each reference replaced once;
    the package's state on a layer (a converted model's table, which holds no layer) is not
    searched."""
    holder, inner = nn.Layer(), nn.Layer()
    first, second, third = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    new_first, new_second, new_third = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    holder.add_sublayer("first", first)
    holder.add_sublayer("alias", first)
    holder.add_sublayer("inner", inner)
    inner.add_sublayer("second", second)
    inner.add_sublayer("third", third)
    holder.listed = [first, (second, third)]
    setattr(holder, STATE_PREFIX + "table", {"kept": [third]})
    assert replace_sublayers(holder, [(first, new_first), (second, new_second), (third, new_third)]) == 7
    assert holder.first is new_first and holder.alias is new_first
    assert inner.second is new_second and inner.third is new_third
    assert holder.listed == [new_first, (new_second, new_third)]
    assert getattr(holder, STATE_PREFIX + "table")["kept"][0] is third
    assert replace_sublayers(holder, []) == 0
