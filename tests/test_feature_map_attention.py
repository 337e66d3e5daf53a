"""Non-local attention on conv features (PaddleSeg's ANN, a CNN's self-attention block): a conv
output reshaped to ``[N, C, H*W]``, transposed and multiplied. Paddle 3.3.1's
``reshape_transpose_matmul_onednn_fuse_pass`` folds the reshape and transpose into the matmul,
which then reads the conv's blocked oneDNN output wrongly, unless the export separates them
(``export.graph.unfused_feature_map_reshapes``). Checked in Paddle Inference against dygraph
(fp32 export) and against the simulation (int8 export)."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from imperative_ptq.export import create_predictor, predict
from imperative_ptq.export.paddle_export import save_fp32_model
from models import X86_TARGETS, converted, largest_error_in_paddle_inference

F = paddle.nn.functional


class NonLocalBlock(paddle.nn.Layer):
    """Queries and keys from 1x1 convs (reshaped ``[0, C, -1]`` as ANN writes them), a softmax
    over positions, values from a third conv, the context back to a feature map."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.channels = channels
        self.stem = paddle.nn.Conv2D(3, channels, 3, padding=1)
        self.query = paddle.nn.Conv2D(channels, channels, 1)
        self.key = paddle.nn.Conv2D(channels, channels, 1)
        self.value = paddle.nn.Conv2D(channels, channels, 1)
        self.out = paddle.nn.Conv2D(channels, channels, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = F.relu(self.stem(x))
        query = paddle.reshape(self.query(y), [0, self.channels, -1]).transpose([0, 2, 1])
        key = paddle.reshape(self.key(y), [0, self.channels, -1])
        value = paddle.reshape(self.value(y), [0, self.channels, -1]).transpose([0, 2, 1])
        attention = F.softmax(paddle.matmul(query, key) * self.channels ** -0.5, axis=-1)
        context = paddle.matmul(attention, value).transpose([0, 2, 1])
        return self.out(paddle.reshape(context, [0, self.channels, 8, 8])) + y


def test_the_fp32_export_runs_attention_on_conv_features(tmp_path) -> None:
    """Measured before: 111% of the largest output off (a conv -> reshape -> transpose ->
    matmul alone, with any reshape shape: 114%)."""
    paddle.seed(0)
    model = NonLocalBlock()
    model.eval()
    prefix = str(tmp_path / "m")
    save_fp32_model(model, prefix, [paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")])
    x = np.random.default_rng(0).standard_normal([2, 3, 8, 8]).astype("float32")
    ran = predict(create_predictor(prefix, int8=False, num_threads=1), x)[0]
    expected = model(paddle.to_tensor(x)).numpy()
    assert np.abs(ran - expected).max() / np.abs(expected).max() <= 1e-5


@pytest.mark.parametrize("target", X86_TARGETS)
def test_the_int8_export_runs_attention_on_conv_features_as_simulated(target, tmp_path) -> None:
    """Measured before, x86: 52% of the largest output off."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.random([2, 3, 8, 8]).astype("float32")) for _ in range(3)]
    with paddle.no_grad():
        qmodel = converted(NonLocalBlock(), batches, target)
    x = rng.random([2, 3, 8, 8]).astype("float32")
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) <= 2e-6
