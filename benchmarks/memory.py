"""Resident memory of a long calibration: does it grow with the number of batches?

Calibrates MobileNetV2 or a BERT-shaped encoder (random weights, KL + per-channel) on N1 and
then N2 batches in fresh processes and prints the peak RSS of each run and the growth between
them. Statistics are bounded (histograms of ``bins`` floats per tensor, pooled abs buffers, a
bounded job queue), so the growth should be within a few percent.

    python benchmarks/memory.py                 # 10 vs 200 batches of 4x3x224x224
    python benchmarks/memory.py --batches 5 50 --batch-size 2
    python benchmarks/memory.py --model bert    # 10 vs 200 batches of 4 x 128 token ids
    python benchmarks/memory.py --model bert --layers 12 --hidden 768   # BERT-base shape
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def bert_encoder(layers: int, hidden: int, vocabulary: int = 30522, positions: int = 512):
    """A BERT-shaped encoder: token + position embeddings, LayerNorm, ``layers`` post-norm
    Transformer layers (``hidden / 64`` heads, GELU feed-forward of 4 x ``hidden``), and a
    tanh pooler over the first token. Takes int64 token ids ``[batch, sequence]``."""
    import paddle
    from paddle import nn

    class Encoder(nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.tokens = nn.Embedding(vocabulary, hidden)
            self.positions = nn.Embedding(positions, hidden)
            self.norm = nn.LayerNorm(hidden)
            layer = nn.TransformerEncoderLayer(
                hidden, hidden // 64, 4 * hidden, dropout=0.0, activation="gelu"
            )
            self.encoder = nn.TransformerEncoder(layer, layers)
            self.pooler = nn.Linear(hidden, hidden)
            self.activation = nn.Tanh()

        def forward(self, ids):
            positions = paddle.arange(ids.shape[1], dtype="int64").unsqueeze(0)
            x = self.norm(self.tokens(ids) + self.positions(positions))
            return self.activation(self.pooler(self.encoder(x)[:, 0]))

    return Encoder()


def calibrate(
    batches: int, batch_size: int, image_size: int, model_name: str = "mobilenet_v2",
    layers: int = 4, hidden: int = 256, sequence: int = 128,
) -> dict[str, float]:
    """Runs one calibration in this process and reports its peak RSS and duration."""
    import numpy as np
    import paddle

    from imperative_ptq import ImperativePTQ

    paddle.seed(0)
    rng = np.random.default_rng(0)
    if model_name == "bert":
        model = bert_encoder(layers, hidden)
        ids = rng.integers(0, 30522, (batch_size, sequence))
        batch, scale = paddle.to_tensor(ids.astype("int64")), False
    else:
        model = paddle.vision.models.mobilenet_v2()
        batch = paddle.to_tensor(
            rng.standard_normal((batch_size, 3, image_size, image_size)).astype("float32")
        )
        scale = True
    model.eval()
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(model)
    # One pre-generated batch reused (token ids: rolled): the data loader's memory is not what
    # is measured.
    start = time.perf_counter()
    rss_after_first = 0.0
    with paddle.no_grad():
        for index in range(batches):
            qmodel(batch * (1.0 + 0.1 * (index % 7)) if scale else paddle.roll(batch, index, 1))
            if index == 0:
                ptq.calibration_table(qmodel)  # flushes the worker
                rss_after_first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ptq.calibration_table(qmodel)
    return {
        "batches": batches,
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_first_batch_mb": rss_after_first,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs=2, default=[10, 200])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--model", choices=["mobilenet_v2", "bert"], default="mobilenet_v2")
    parser.add_argument("--layers", type=int, default=4, help="bert: encoder layers")
    parser.add_argument("--hidden", type=int, default=256, help="bert: hidden size")
    parser.add_argument("--sequence", type=int, default=128, help="bert: tokens per sample")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = ["--model", args.model, "--layers", str(args.layers), "--hidden", str(args.hidden),
             "--sequence", str(args.sequence)]
    if args.child is not None:
        print(json.dumps(calibrate(
            args.child, args.batch_size, args.image_size, args.model, args.layers, args.hidden,
            args.sequence,
        )))
        return
    results = []
    for batches in args.batches:
        # A fresh process per run: peak RSS is per process and never goes down.
        output = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", str(batches),
             "--batch-size", str(args.batch_size), "--image-size", str(args.image_size), *shape],
            check=True, capture_output=True, text=True,
        ).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    if args.model == "bert":
        print(f"BERT-shaped encoder ({args.layers} layers, hidden {args.hidden}), batch "
              f"{args.batch_size}x{args.sequence} token ids, KL + per-channel")
    else:
        print(f"MobileNetV2, batch {args.batch_size}x3x{args.image_size}x{args.image_size}, "
              f"KL + per-channel")
    print(f"{'batches':>8} {'seconds':>8} {'RSS after 1st (MB)':>19} {'peak RSS (MB)':>14}")
    for row in results:
        print(f"{row['batches']:>8} {row['seconds']:>8.1f} {row['rss_after_first_batch_mb']:>19.0f} "
              f"{row['peak_rss_mb']:>14.0f}")
    growth = results[1]["peak_rss_mb"] / results[0]["peak_rss_mb"] - 1
    print(f"peak RSS growth from {results[0]['batches']} to {results[1]['batches']} batches: "
          f"{growth * 100:+.1f}% (target: within 5%)")


if __name__ == "__main__":
    main()
