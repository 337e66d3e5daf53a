"""A Linear as Paddle Inference's int8 fc or as an int8 1x1 conv: weight error and time.

Paddle 3.3.1's fc re-derives a ``[in, out]`` weight's per-channel scales from runs of
consecutive elements instead of its columns (``quant_layers.paddle_fc_weight``); a 1x1 conv
(``export/linear_as_conv.py``) takes each output channel's own. For each shape, a ReLU ->
Linear with Gaussian weights (columns scaled by ``exp(spread * N(0, 1))``) is converted twice
for ``x86``, once forced to the fc (``FC_WEIGHT_ERROR_LIMIT = inf``) and once to the conv
(``-inf``), exported, and timed in Paddle Inference (one thread, both predictors interleaved,
median of rounds). Printed: the two weights' relative L2 distance to the fp32 weight, the
output's relative L2 distance to fp32 on the timed batch, and the times.

Usage: ``python benchmarks/linear_as_conv.py [--rounds 7]`` (~1 min).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import paddle

import imperative_ptq as ip
from imperative_ptq import quant_layers
from imperative_ptq.export import create_predictor, predict

#: (rows, in, out, column spread): transformer projections, classifier and CTC heads.
SHAPES = (
    (1024, 384, 384, 0.0), (1024, 384, 1536, 0.0), (1024, 1536, 384, 0.0),
    (64, 784, 128, 0.0), (64, 128, 10, 0.0), (8, 2048, 1000, 0.0), (320, 120, 6625, 0.5),
)


class _Head(paddle.nn.Layer):
    def __init__(self, weight: np.ndarray) -> None:
        super().__init__()
        self.linear = paddle.nn.Linear(*weight.shape)
        self.linear.weight.set_value(weight)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.linear(paddle.nn.functional.relu(x))


def _export(model: paddle.nn.Layer, batches: list, limit: float, directory: str) -> tuple:
    """Converts ``model`` with the fc/conv choice forced by ``limit``; returns the predictor,
    the converted layer's weight and the export's op counts."""
    saved = quant_layers.FC_WEIGHT_ERROR_LIMIT
    quant_layers.FC_WEIGHT_ERROR_LIMIT = limit
    try:
        ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer()))
        qmodel = ptq.quantize(model)
        for batch in batches:
            qmodel(batch)
        ptq.convert(qmodel)
    finally:
        quant_layers.FC_WEIGHT_ERROR_LIMIT = saved
    prefix = directory + "/m"
    spec = [paddle.static.InputSpec([None, model.linear.weight.shape[0]], "float32", "x")]
    ptq.save_quantized_model(qmodel, prefix, spec)
    from imperative_ptq.export import int8_report

    return create_predictor(prefix, num_threads=1), qmodel.linear.weight.numpy(), int8_report(prefix).int8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"CPU: {ip.cpu_info().describe()}; Paddle {paddle.__version__}, one thread")
    print(f"{'rows x in x out, spread':>26} | weight error fc / conv | output error fc / conv | fc ms | conv ms | conv/fc")
    rng = np.random.default_rng(0)
    for rows, inputs, outputs, spread in SHAPES:
        columns = np.exp(spread * rng.standard_normal(outputs))
        weight = (0.05 * rng.standard_normal((inputs, outputs)) * columns[None]).astype(np.float32)
        model = _Head(weight)
        model.eval()
        batches = [paddle.to_tensor(rng.standard_normal((64, inputs)).astype(np.float32)) for _ in range(2)]
        x = rng.standard_normal((rows, inputs)).astype(np.float32)
        reference = model(paddle.to_tensor(x)).numpy()
        runs = {}
        for engine, limit in (("fc", float("inf")), ("conv", -float("inf"))):
            with tempfile.TemporaryDirectory() as directory:
                predictor, runs_weight, ops = _export(model, batches, limit, directory)
            output = predict(predictor, x)[0]
            runs[engine] = dict(
                predictor=predictor, ops=ops, times=[],
                weight_error=np.linalg.norm(runs_weight - weight) / np.linalg.norm(weight),
                output_error=np.linalg.norm(output - reference) / np.linalg.norm(reference),
            )
        for _ in range(args.rounds):
            for run in runs.values():
                repeats = max(3, int(2e8 // (rows * inputs * outputs)))
                start = time.perf_counter()
                for _ in range(repeats):
                    predict(run["predictor"], x)
                run["times"].append((time.perf_counter() - start) / repeats * 1e3)
        fc, conv = (np.median(runs[engine]["times"]) for engine in ("fc", "conv"))
        print(
            f"{rows:>6} x {inputs:>4} x {outputs:>4}, {spread:.1f}   | "
            f"{runs['fc']['weight_error']:.2e} / {runs['conv']['weight_error']:.2e}      | "
            f"{runs['fc']['output_error']:.2e} / {runs['conv']['output_error']:.2e}      | "
            f"{fc:5.2f} | {conv:7.2f} | {conv / fc:.2f}   {runs['fc']['ops']} / {runs['conv']['ops']}"
        )


if __name__ == "__main__":
    main()
