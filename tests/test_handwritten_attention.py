"""A decoder block written by hand the way LLaMA-style code writes one (RMSNorm, bias-free
q/k/v projections, heads split and merged by reshapes to shapes computed with
``paddle.shape``, rotary embeddings, a causal mask from ``paddle.triu``, positions from
``paddle.arange``, a SwiGLU MLP) exports to int8, and Paddle Inference and ONNX Runtime
compute what the simulation does.

Two export faults were found with it:

* the merge of the heads, ``o.reshape([B, L, -1])``, traces to a shape whose last dimension
  is unknown, and Paddle 3.3.1 maps a matmul to the int8 ``fc`` only when that dimension
  matches the weight: the output projection ran fp32 (``graph.complete_matmul_widths``);
* on ``x86-vnni``, Paddle fuses the mask's add into the int8 scores matmul and then runs it
  fp32 on unquantized operands (``export.activation_matmuls._separate_added_output``).
"""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

import imperative_ptq as ip
from imperative_ptq.export import create_predictor, export_onnx, int8_report, predict

VOCABULARY, WIDTH, HEADS, FEED_FORWARD = 64, 32, 4, 48
HEAD_WIDTH = WIDTH // HEADS


class RMSNorm(paddle.nn.Layer):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = self.create_parameter([width], default_initializer=paddle.nn.initializer.Constant(1.0))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x * paddle.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def _rotate_half(x: paddle.Tensor) -> paddle.Tensor:
    first, second = x.chunk(2, axis=-1)
    return paddle.concat([-second, first], axis=-1)


class Decoder(paddle.nn.Layer):
    """One pre-norm decoder block and a vocabulary head."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = paddle.nn.Embedding(VOCABULARY, WIDTH)
        self.attention_norm = RMSNorm(WIDTH)
        self.q, self.k, self.v, self.o = (paddle.nn.Linear(WIDTH, WIDTH, bias_attr=False) for _ in range(4))
        self.mlp_norm = RMSNorm(WIDTH)
        self.gate = paddle.nn.Linear(WIDTH, FEED_FORWARD, bias_attr=False)
        self.up = paddle.nn.Linear(WIDTH, FEED_FORWARD, bias_attr=False)
        self.down = paddle.nn.Linear(FEED_FORWARD, WIDTH, bias_attr=False)
        self.head = paddle.nn.Linear(WIDTH, VOCABULARY, bias_attr=False)
        frequencies = 1.0 / 10000 ** (paddle.arange(0, HEAD_WIDTH, 2, dtype="float32") / HEAD_WIDTH)
        self.register_buffer("frequencies", frequencies)

    def forward(self, ids: paddle.Tensor) -> paddle.Tensor:
        batch, length = paddle.shape(ids)[0], paddle.shape(ids)[1]
        angles = paddle.arange(length, dtype="float32").unsqueeze(1) * self.frequencies.unsqueeze(0)
        angles = paddle.concat([angles, angles], axis=-1)
        cos, sin = angles.cos(), angles.sin()
        mask = paddle.triu(paddle.full([length, length], -1e9), 1)

        def heads(x: paddle.Tensor) -> paddle.Tensor:
            return x.reshape([batch, length, HEADS, HEAD_WIDTH]).transpose([0, 2, 1, 3])

        x = self.embedding(ids)
        normed = self.attention_norm(x)
        q, k, v = heads(self.q(normed)), heads(self.k(normed)), heads(self.v(normed))
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        scores = paddle.matmul(q, k, transpose_y=True) / HEAD_WIDTH ** 0.5 + mask
        attended = paddle.matmul(F.softmax(scores, -1), v).transpose([0, 2, 1, 3])
        x = x + self.o(attended.reshape([batch, length, -1]))
        normed = self.mlp_norm(x)
        x = x + self.down(F.silu(self.gate(normed)) * self.up(normed))
        return self.head(x)


SPEC = [paddle.static.InputSpec([None, None], "int64", "ids")]


def _exported(target: str, prefix: str) -> tuple[paddle.nn.Layer, np.ndarray, np.ndarray]:
    """The decoder calibrated on sequences of 4 lengths, converted for ``target`` and saved at
    ``prefix``; returns it, a test batch (of another length) and its simulated output."""
    paddle.seed(0)
    model = Decoder()
    model.eval()
    rng = np.random.default_rng(0)
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=target))
    quantized = ptq.quantize(model)
    for length in (12, 16, 20, 9):
        quantized(paddle.to_tensor(rng.integers(0, VOCABULARY, (4, length))))
    ptq.convert(quantized)
    ptq.save_quantized_model(quantized, prefix, input_spec=SPEC)
    ids = rng.integers(0, VOCABULARY, (3, 18)).astype("int64")
    return quantized, ids, quantized(paddle.to_tensor(ids)).numpy()


def _tokens_off(ran: np.ndarray, simulated: np.ndarray) -> float:
    """The fraction of tokens whose logits are more than 1e-5 of the largest off."""
    error = np.abs(ran - simulated).max(-1) / np.abs(simulated).max()
    return float((error > 1e-5).mean())


# A float op computed differently by oneDNN (the RMSNorm, the rotation) can move a value that
# sits on a rounding tie by one code; through the causal attention that token's change reaches
# the later ones of its sequence. Measured on this model: no token off natively; the bound
# leaves room for one such tie. Before the fixes: every token off.
TIE_ROOM = 0.15


def test_every_projection_runs_int8_and_paddle_inference_computes_the_simulation(tmp_path, avx2_runner) -> None:
    prefix = str(tmp_path / "decoder")
    _, ids, simulated = _exported("x86", prefix)
    report = int8_report(prefix)
    assert report.int8.get("fc", 0) == 8, report  # q, k, v, o, gate, up, down, head
    assert _tokens_off(predict(create_predictor(prefix, num_threads=1), ids)[0], simulated) <= TIE_ROOM
    if avx2_runner is not None:
        assert _tokens_off(avx2_runner.predict(prefix, ids)[0], simulated) <= TIE_ROOM


@pytest.mark.skipif(not ip.cpu_info().vnni, reason="x86-vnni runs signed int8 inputs, which saturate without VNNI")
def test_masked_scores_run_int8_on_vnni_as_simulated(tmp_path) -> None:
    prefix = str(tmp_path / "decoder")
    _, ids, simulated = _exported("x86-vnni", prefix)
    report = int8_report(prefix)
    assert report.int8.get("fused_matmul", 0) == 2, report  # the scores and the weighted sum
    assert _tokens_off(predict(create_predictor(prefix, num_threads=1), ids)[0], simulated) <= TIE_ROOM


def test_onnx_export_at_the_default_opset_computes_the_simulation(tmp_path) -> None:
    import onnxruntime

    quantized, ids, simulated = _exported("x86", str(tmp_path / "decoder"))
    path = export_onnx(quantized, str(tmp_path / "decoder.onnx"), SPEC)  # triu and arange at opset 13
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert _tokens_off(session.run(None, {"ids": ids})[0], simulated) <= TIE_ROOM
