"""An int8 LSTM in each runtime: latency and agreement with the simulation, one process.

An LSTM classifier (``nn.LSTM`` one layer, one direction, then a Linear on the last step;
random weights, calibrated on random sequences, KL activations, per-channel weights, target
``x86``) runs in:

* Paddle Inference fp32 (the fp32 export) and int8 (``fusion_lstm`` with int8 weights);
* ONNX Runtime int8: the export writes the simulated int8 LSTM as a ``Scan`` over the steps
  with int8 weight initializers (``export/onnx_lstm.py``);
* ONNX Runtime with the LSTM kept fp32 (``keep_fp32``): ONNX's own ``LSTM`` op.

Engines are interleaved round by round and medians reported (ms per batch). Cosine is against
each form's own dygraph simulation. The header names the CPU and any ``ONEDNN_MAX_CPU_ISA`` cap.

Usage: python benchmarks/lstm_runtimes.py [--features 64] [--hidden 128] [--steps 32]
                                          [--batches 1,8] [--rounds 5] [--iters 20]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import os
import statistics
import sys
import tempfile

import numpy as np
import paddle

from imperative_ptq import ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig, cpu_info
from imperative_ptq.export import create_predictor, export_onnx, predict, save_fp32_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from side_by_side import milliseconds_per_call  # noqa: E402


class LSTMClassifier(paddle.nn.Layer):
    """``nn.LSTM`` then a Linear on the last step's hidden state."""

    def __init__(self, features: int, hidden: int, classes: int = 10) -> None:
        super().__init__()
        self.lstm = paddle.nn.LSTM(features, hidden)
        self.head = paddle.nn.Linear(hidden, classes)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        sequence, _ = self.lstm(x)
        return self.head(sequence[:, -1])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import onnxruntime as ort

    paddle.seed(0)
    rng = np.random.default_rng(0)
    model = LSTMClassifier(args.features, args.hidden)
    model.eval()
    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), target="x86"))
    quantized = ptq.quantize(model)
    for _ in range(8):
        quantized(paddle.to_tensor(rng.standard_normal((4, args.steps, args.features)).astype(np.float32)))
    ptq.convert(quantized)
    lstm_fp32 = ptq.keep_fp32(copy.deepcopy(quantized), ["lstm"], model)
    spec = [paddle.static.InputSpec([None, args.steps, args.features], "float32", "x")]
    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        save_fp32_model(model, os.path.join(workdir, "fp32"), spec)
        ptq.save_quantized_model(quantized, os.path.join(workdir, "int8"), spec)
        sessions = {
            form: ort.InferenceSession(
                export_onnx(m, os.path.join(workdir, f"{form}.onnx"), spec), options,
                providers=["CPUExecutionProvider"],
            )
            for form, m in (("ort int8 scan", quantized), ("ort lstm fp32", lstm_fp32))
        }
        predictors = {
            "paddle fp32": create_predictor(os.path.join(workdir, "fp32"), int8=False),
            "paddle int8": create_predictor(os.path.join(workdir, "int8"), int8=True),
        }
        for batch in [int(b) for b in args.batches.split(",")]:
            x = rng.standard_normal((batch, args.steps, args.features)).astype(np.float32)
            with paddle.no_grad():
                references = {
                    "paddle fp32": model(paddle.to_tensor(x)).numpy(),
                    "paddle int8": quantized(paddle.to_tensor(x)).numpy(),
                    "ort int8 scan": quantized(paddle.to_tensor(x)).numpy(),
                    "ort lstm fp32": lstm_fp32(paddle.to_tensor(x)).numpy(),
                }
            runs = {form: (lambda p=p: predict(p, x)[0]) for form, p in predictors.items()}
            runs.update({form: (lambda s=s: s.run(None, {"x": x})[0]) for form, s in sessions.items()})
            cosines = {form: _cosine(run(), references[form]) for form, run in runs.items()}
            times: dict[str, list[float]] = {form: [] for form in runs}
            for _ in range(args.rounds):
                for form, run in runs.items():
                    times[form].append(milliseconds_per_call(run, args.iters))
            rows.append((batch, {form: statistics.median(t) for form, t in times.items()}, cosines))
    print(
        f"{datetime.date.today()} · {cpu_info().describe()} · Paddle {paddle.__version__} · "
        f"LSTM {args.features}->{args.hidden}, {args.steps} steps · {args.rounds} rounds x "
        f"{args.iters} iterations, medians, ms per batch (cosine to the form's own simulation)\n"
    )
    forms = list(rows[0][1])
    print("| batch | " + " | ".join(forms) + " |")
    print("|---:|" + "---:|" * len(forms))
    for batch, medians, cosines in rows:
        cells = [f"{medians[form]:.3f} ({cosines[form]:.5f})" for form in forms]
        print(f"| {batch} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
