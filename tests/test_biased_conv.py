"""The simulation's conv with a bias (:func:`imperative_ptq.quant_layers.biased_conv2d`) computes
Paddle's ``nn.Conv2D`` forward bit for bit, faster; traces and other layouts keep the layer's
own forward."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.quant_layers import biased_conv2d, conv_bias_added_fast


@pytest.mark.parametrize(
    "arguments",
    [
        dict(in_channels=4, out_channels=8, kernel_size=3, padding=1),
        dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8),  # depthwise
        dict(in_channels=8, out_channels=16, kernel_size=3, stride=2, groups=4),
        dict(in_channels=4, out_channels=6, kernel_size=(1, 5), padding="same", dilation=2),
        dict(in_channels=4, out_channels=4, kernel_size=3, padding="valid", stride=(2, 1)),
    ],
)
def test_a_biased_conv_computes_the_layers_forward_bit_for_bit(arguments) -> None:
    paddle.seed(0)
    conv = paddle.nn.Conv2D(**arguments)
    conv.bias.set_value(np.random.default_rng(0).standard_normal(conv.bias.shape).astype("float32"))
    x = paddle.randn([2, arguments["in_channels"], 9, 12])
    assert conv_bias_added_fast(conv, x)
    np.testing.assert_array_equal(biased_conv2d(conv, x).numpy(), conv(x).numpy())


def test_other_convs_keep_their_forward() -> None:
    x = paddle.randn([1, 4, 8, 8])
    assert not conv_bias_added_fast(paddle.nn.Conv2D(4, 4, 3, bias_attr=False), x)
    assert not conv_bias_added_fast(paddle.nn.Conv2D(4, 4, 3, padding=1, padding_mode="reflect"), x)
    assert not conv_bias_added_fast(paddle.nn.Conv2D(4, 4, 3, data_format="NHWC"), x)
    hooked = paddle.nn.Conv2D(4, 4, 3)
    hooked.register_forward_post_hook(lambda layer, inputs, output: output * 2)
    assert not conv_bias_added_fast(hooked, x)


def test_the_simulation_of_biased_convs_is_unchanged_and_exports(tmp_path) -> None:
    paddle.seed(0)
    model = paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.ReLU(), paddle.nn.Conv2D(8, 8, 3, padding=1, groups=8),
        paddle.nn.ReLU(), paddle.nn.Conv2D(8, 4, 1),
    )
    model.eval()
    ptq = ip.ImperativePTQ()
    quantized = ptq.quantize(model)
    rng = np.random.default_rng(0)
    for _ in range(2):
        quantized(paddle.to_tensor(rng.standard_normal([2, 3, 16, 16]).astype("float32")))
    ptq.convert(quantized)
    x = paddle.to_tensor(rng.standard_normal([2, 3, 16, 16]).astype("float32"))
    simulated = quantized(x).numpy()
    # the layers' own forwards, with the fast path switched off by a hook that changes nothing
    handles = [layer.layer.register_forward_post_hook(lambda layer, inputs, output: output)
               for layer in quantized.sublayers() if isinstance(layer, ip.QuantizedLayer)]
    np.testing.assert_array_equal(quantized(x).numpy(), simulated)
    for handle in handles:
        handle.remove()
    ptq.save_quantized_model(quantized, str(tmp_path / "m"), [paddle.static.InputSpec([None, 3, 16, 16], "float32", "x")])
