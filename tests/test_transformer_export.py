"""Transformers export to Paddle Inference: ``nn.MultiHeadAttention`` calls PIR-only
``paddle.matmul``, which the legacy trace records through ``export/legacy_ops.py``; the
exported program's Linear layers run int8 and Paddle Inference computes what the simulation
does, on this CPU's kernels and on oneDNN's AVX2 kernels."""

from __future__ import annotations

import dataclasses

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.export import int8_report
from avx2_kernels import paddle_inference_outputs

VOCABULARY, LENGTH, WIDTH = 100, 16, 64


class TextClassifier(paddle.nn.Layer):
    """Embedding + 2-layer TransformerEncoder (+ optionally a 2-layer TransformerDecoder over
    the encoder output) + Linear, the shape of a small text classifier."""

    def __init__(self, decoder: bool) -> None:
        super().__init__()
        self.embedding = paddle.nn.Embedding(VOCABULARY, WIDTH)
        self.encoder = paddle.nn.TransformerEncoder(
            paddle.nn.TransformerEncoderLayer(WIDTH, 4, 2 * WIDTH, dropout=0.0), 2
        )
        self.decoder = (
            paddle.nn.TransformerDecoder(
                paddle.nn.TransformerDecoderLayer(WIDTH, 4, 2 * WIDTH, dropout=0.0), 2
            )
            if decoder
            else None
        )
        self.head = paddle.nn.Linear(WIDTH, 5)

    def forward(self, ids: paddle.Tensor) -> paddle.Tensor:
        hidden = self.encoder(self.embedding(ids))
        if self.decoder is not None:
            hidden = self.decoder(hidden, hidden)
        return self.head(hidden.mean(axis=1))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _export(decoder: bool, target: str, prefix: str) -> tuple[paddle.nn.Layer, int]:
    paddle.seed(0)
    model = TextClassifier(decoder)
    model.eval()
    rng = np.random.default_rng(0)
    ptq = ip.ImperativePTQ(
        ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=target)
    )
    qmodel = ptq.quantize(model)
    for _ in range(3):
        qmodel(paddle.to_tensor(rng.integers(0, VOCABULARY, (4, LENGTH)).astype("int64")))
    ptq.convert(qmodel)
    ptq.save_quantized_model(
        qmodel, prefix, [paddle.static.InputSpec([None, LENGTH], "int64", "ids")]
    )
    linears = sum(isinstance(layer, paddle.nn.Linear) for layer in model.sublayers())
    return qmodel, linears


def _runtime_cosines(qmodel: paddle.nn.Layer, prefix: str, avx2_runner=None) -> dict[str, float]:
    """Paddle Inference's logit cosine to the simulation, per kernels (see avx2_kernels)."""
    ids = np.random.default_rng(1).integers(0, VOCABULARY, (8, LENGTH)).astype("int64")
    simulated = qmodel(paddle.to_tensor(ids)).numpy()
    outputs = paddle_inference_outputs(prefix, [ids], avx2_runner)
    return {kernels: _cosine(ran[0], simulated) for kernels, ran in outputs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("decoder", [False, True], ids=["encoder", "encoder-decoder"])
def test_transformer_x86_export_runs_what_the_simulation_computes(decoder, tmp_path, avx2_runner) -> None:
    """target='x86' (every x86 CPU): every Linear runs int8, those reading a ReLU on u8, those
    reading a LayerNorm or attention output (signed) on a shifted u8 input; natively and on
    AVX2 kernels."""
    prefix = str(tmp_path / "m")
    qmodel, linears = _export(decoder, "x86", prefix)
    reports = {"native": dataclasses.asdict(int8_report(prefix))}
    if avx2_runner is not None:
        reports["AVX2 kernels"] = avx2_runner.report(prefix)
    for kernels, report in reports.items():
        assert report["int8"].get("fc", 0) == linears and not report["fp32"].get("fc"), (kernels, report)
        # Attention's matmuls of two (signed) activations stay fp32 on x86: s8 x s8.
        assert not report["int8"].get("fused_matmul") and not report["signed_inputs"], (kernels, report)
    # Measured 0.99998 (encoder) and 0.99984 (encoder-decoder), natively and on AVX2 kernels:
    # rounding ties of the 7-bit shifted grids flipped by float differences (x86-vnni: 0.99991).
    for kernels, cosine in _runtime_cosines(qmodel, prefix, avx2_runner).items():
        assert cosine >= 0.99, (kernels, cosine)


@pytest.mark.slow
@pytest.mark.skipif(not ip.cpu_info().vnni, reason="target x86-vnni needs a VNNI CPU")
@pytest.mark.parametrize("decoder", [False, True], ids=["encoder", "encoder-decoder"])
def test_transformer_vnni_export_runs_every_linear_and_attention_matmul_int8(decoder, tmp_path) -> None:
    prefix = str(tmp_path / "m")
    qmodel, linears = _export(decoder, "x86-vnni", prefix)
    report = int8_report(prefix)
    assert report.int8.get("fc", 0) == linears and not report.fp32.get("fc"), report
    # q @ k and softmax @ v of every attention: 2 encoder layers; 2 decoder layers with self-
    # and cross-attention.
    attention_matmuls = 2 * 2 + (2 * 2 * 2 if decoder else 0)
    assert report.int8.get("fused_matmul", 0) == attention_matmuls, report
    assert not report.fp32.get("fused_matmul"), report
    # Measured 0.99998 (encoder), 0.99991 (encoder-decoder), attention matmuls int8 too.
    assert _runtime_cosines(qmodel, prefix)["native"] >= 0.99
