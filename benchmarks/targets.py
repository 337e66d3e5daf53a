"""Paddle Inference int8 for several deployment targets against fp32, side by side, one process.

Each model (``benchmarks/inference.py``'s, random weights) is calibrated once per target (KL
activations, per-channel absmax weights, 8 random batches of 4: ``inference.export_model``)
and exported; the fp32 program
and every target's int8 program are then timed round by round, interleaved, medians reported,
so the ratios come from one run on this shared machine. Per target: how many conv/fc ops
Paddle Inference runs int8 and fp32 (``int8_report``) and the output's cosine to the fp32
model. The default compares ``x86`` (right on every x86 CPU) with ``x86-avx2`` (convs reading
signed inputs int8 on the halved weights of AVX2-only CPUs), on models whose convs read SiLU,
Hardswish or normalized-image inputs.

Usage: python benchmarks/targets.py [--models yolo_csp,mobilenet_v3_small,resnet18]
                                    [--targets x86,x86-avx2] [--rounds 5] [--iters 10]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import statistics
import tempfile
import time

import numpy as np
import paddle

from imperative_ptq import TARGETS, cpu_info
from imperative_ptq.export import create_predictor, int8_report, predict
from inference import MODELS, export_model, model_input


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def bench(name: str, targets: list[str], rounds: int, iters: int, workdir: str) -> list[dict]:
    """Rows (one per batch size and engine) for ``name``: ms per batch, speed-up over fp32,
    int8/fp32 conv-fc op counts and cosine to fp32."""
    _, shape, batches, dtype = MODELS[name]
    engines, counts = {}, {"fp32": ""}
    for target in targets:
        directory = os.path.join(workdir, name, target)
        os.makedirs(directory)
        _, _, _, fp32_prefix, int8_prefix = export_model(name, directory, target)
        engines.setdefault("fp32", create_predictor(fp32_prefix, int8=False))
        engines[target] = create_predictor(int8_prefix)
        report = int8_report(int8_prefix)
        counts[target] = f"{sum(report.int8.values())} int8 / {sum(report.fp32.values())} fp32"
    rows = []
    for batch in batches:
        x = model_input(shape, dtype, batch, seed=7)
        outputs = {engine: predict(predictor, x)[0] for engine, predictor in engines.items()}
        times: dict[str, list[float]] = {engine: [] for engine in engines}
        for _ in range(rounds):
            for engine, predictor in engines.items():
                predict(predictor, x)  # warm
                start = time.perf_counter()
                for _ in range(iters):
                    predict(predictor, x)
                times[engine].append((time.perf_counter() - start) / iters * 1e3)
        fp32_ms = statistics.median(times["fp32"])
        for engine, measured in times.items():
            ms = statistics.median(measured)
            rows.append({
                "model": name, "batch": batch, "engine": engine, "ms": ms, "speed-up": fp32_ms / ms,
                "conv/fc ops": counts[engine], "cosine to fp32": _cosine(outputs[engine], outputs["fp32"]),
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="yolo_csp,mobilenet_v3_small,resnet18")
    parser.add_argument("--targets", default="x86,x86-avx2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    targets = args.targets.split(",")
    unknown = [target for target in targets if target not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}: choose from {sorted(TARGETS)}")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            rows.extend(bench(name, targets, args.rounds, args.iters, workdir))
    print(f"# {datetime.date.today()} {cpu_info().describe()} cpus={len(os.sched_getaffinity(0))} "
          f"paddle={paddle.__version__} rounds={args.rounds} iters={args.iters}")
    header = ["model", "batch", "engine", "ms", "speed-up", "conv/fc ops", "cosine to fp32"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [
            f"{row[key]:.2f}x" if key == "speed-up" else f"{row[key]:.4f}" if key.startswith("cosine")
            else f"{row[key]:.2f}" if isinstance(row[key], float) else str(row[key])
            for key in header
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
