"""Speed of the converted model's int8 simulation and of ``convert``, side by side with fp32 and
with Paddle's built-in ``ImperativePTQ``.

The simulation is what ``analyze``, ``search_skip_set``, ``quantize_with_accuracy_control``,
bias correction and ``convert``'s own check against fp32 run, batch after batch, so its cost
multiplies. One process; per model, the engines' forwards are interleaved within each round (the
order rotates every round) and the table reports medians over the rounds, all under
``paddle.no_grad()`` on the same batch:

* ``fp32``    plain eval forward of the model.
* ``ours``    the model after ``ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer()))``
              calibration and ``convert``.
* ``paddle``  the model after ``paddle.quantization.ImperativePTQ`` (KL + per-channel abs-max)
              calibration and its ``_convert`` (what its ``save_quantized_model`` runs first).

``convert`` is timed once per model, with and without the comparison with fp32 it ends with
(``convert`` runs the simulation on up to four calibration calls), on separate calibrations of
the same batches; with ``--bias-correction`` also with ``PTQConfig(bias_correction=True)``,
which runs the simulation up to each layer in turn.

    python benchmarks/simulation.py                         # resnet18, mobilenet_v2, bert_encoder (~3 min)
    python benchmarks/simulation.py --models resnet18 --rounds 3 --skip-paddle
    python benchmarks/simulation.py --models mobilenet_v2 --bias-correction
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from typing import Callable

import numpy as np
import paddle

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from inference import MODELS, model_input  # noqa: E402

from imperative_ptq import ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig, cpu_info  # noqa: E402
from imperative_ptq.session import calibrating_session  # noqa: E402


def _calibrated_ours(
    model: paddle.nn.Layer, batches: list[paddle.Tensor], check: bool, bias_correction: bool = False
) -> tuple[paddle.nn.Layer, float]:
    """Our converted model and the seconds ``convert`` took (with or without its check)."""
    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), bias_correction=bias_correction))
    quantized = ptq.quantize(model)
    ptq.calibrate(quantized, batches, progress=False)  # (keeps the batches bias correction reads)
    calibrating_session(quantized).compare_after_convert = check
    start = time.perf_counter()
    ptq.convert(quantized)
    return quantized, time.perf_counter() - start


def _calibrated_paddle(model: paddle.nn.Layer, batches: list[paddle.Tensor]) -> tuple[paddle.nn.Layer, float]:
    """Paddle's converted (simulated) model and the seconds its ``_convert`` took."""
    pq = paddle.quantization
    ptq = pq.ImperativePTQ(pq.PTQConfig(pq.KLQuantizer(), pq.PerChannelAbsmaxQuantizer()))
    quantized = ptq.quantize(model, inplace=False)
    with paddle.no_grad():
        for batch in batches:
            quantized(batch)
    start = time.perf_counter()
    ptq._convert(quantized)
    return quantized, time.perf_counter() - start


def _time_into(forward: Callable[[], object], times: list[float]) -> None:
    """Appends the milliseconds one call of ``forward`` took to ``times``."""
    start = time.perf_counter()
    forward()
    times.append((time.perf_counter() - start) * 1000)


def bench_model(
    name: str, batch: int, calibration_batches: int, rounds: int, skip_paddle: bool, bias_correction: bool
) -> dict:
    factory, shape, _, dtype = MODELS[name]
    paddle.seed(0)
    model = factory()
    model.eval()
    batches = [paddle.to_tensor(model_input(shape, dtype, batch, seed)) for seed in range(calibration_batches)]
    print(f"  [{name}] calibrating and converting ...", file=sys.stderr, flush=True)
    ours, convert_checked = _calibrated_ours(model, batches, check=True)
    _, convert_unchecked = _calibrated_ours(model, batches, check=False)
    engines: dict[str, paddle.nn.Layer] = {"fp32": model, "ours": ours}
    result = {"model": name, "batch": batch, "convert": convert_checked, "convert_unchecked": convert_unchecked}
    if bias_correction:
        _, result["convert_bias_correction"] = _calibrated_ours(model, batches, check=True, bias_correction=True)
    if not skip_paddle:
        engines["paddle"], result["paddle_convert"] = _calibrated_paddle(model, batches)
    times: dict[str, list[float]] = {engine: [] for engine in engines}
    order = list(engines)
    with paddle.no_grad():
        for engine in order:  # warm-up
            engines[engine](batches[0])
        for round_index in range(rounds):
            rotation = order[round_index % len(order):] + order[: round_index % len(order)]
            for engine in rotation:
                _time_into(lambda: engines[engine](batches[0]), times[engine])
    result.update({engine: statistics.median(values) for engine, values in times.items()})
    return result


def _table(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"{cpu_info().describe()}; Paddle {paddle.__version__}, numpy {np.__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; {args.rounds} rounds, "
        f"{args.calibration_batches} calibration batches",
        "",
        "| model | batch | fp32 forward ms | ours: simulation ms (/ fp32) | paddle: simulation ms (/ fp32) "
        "| ours: convert s (without its check) | ours: convert with bias correction s | paddle: _convert s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        paddle_sim = f"{r['paddle']:.1f} ({r['paddle'] / r['fp32']:.2f}x)" if "paddle" in r else "-"
        paddle_convert = f"{r['paddle_convert']:.2f}" if "paddle_convert" in r else "-"
        corrected = f"{r['convert_bias_correction']:.1f}" if "convert_bias_correction" in r else "-"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['fp32']:.1f} | {r['ours']:.1f} ({r['ours'] / r['fp32']:.2f}x) "
            f"| {paddle_sim} | {r['convert']:.2f} ({r['convert_unchecked']:.2f}) | {corrected} | {paddle_convert} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2,bert_encoder",
                        type=lambda s: [m for m in s.split(",") if m],
                        help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-paddle", action="store_true", help="leave out Paddle's built-in engine")
    parser.add_argument("--bias-correction", action="store_true",
                        help="also time convert with PTQConfig(bias_correction=True)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.models if name not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    logging.basicConfig(level=logging.WARNING)
    results = [
        bench_model(name, args.batch_size, args.calibration_batches, args.rounds, args.skip_paddle, args.bias_correction)
        for name in args.models
    ]
    print(_table(results, args))


if __name__ == "__main__":
    main()
