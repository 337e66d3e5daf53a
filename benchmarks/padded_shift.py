"""Padded convs reading a signed input on the ``x86`` target: int8 after a shift vs fp32.

On the ``x86`` target a conv reading a signed input (a normalized image, Hardswish outputs) runs
int8 on u8 codes 0..127 after a shift (``imperative_ptq.shifted_input``); a padded one gets
its input padded in front of the shift (three more ops). This script times, in one process with
the engines interleaved round by round (medians), Paddle Inference on the fp32 export, the int8
export, and the same int8 export with those padded convs kept fp32 (``keep_fp32``, the form
before padded convs were shifted), and reports each int8 form's cosine to fp32 and to its own
dygraph simulation. Inputs are standard-normal images (signed, like normalized ones); random
weights, KL activations, per-channel absmax weights. Run it once natively and once with
``ONEDNN_MAX_CPU_ISA=AVX2`` for a CPU without VNNI; the header names the CPU and any cap.

Usage: python benchmarks/padded_shift.py [--models resnet18,mobilenet_v3_small] [--rounds 5]
                                         [--iters 10] [--batches 1,8]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import os
import statistics
import tempfile
import time

import numpy as np
import paddle

from imperative_ptq import ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig, cpu_info
from imperative_ptq.export import create_predictor, int8_report, predict, save_fp32_model
from imperative_ptq.quant_layers import QuantizedLayer

logger = logging.getLogger("benchmarks.padded_shift")

SIZE = 224


def padded_shifted_layers(qmodel: paddle.nn.Layer) -> list[str]:
    """Names of the converted convs that read a shifted signed input through padding."""
    return [
        name for name, layer in qmodel.named_sublayers()
        if isinstance(layer, QuantizedLayer) and layer.input_shifted
        and isinstance(layer.layer, paddle.nn.Conv2D)
        and any(int(p) for p in np.ravel(layer.layer._updated_padding))
    ]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _time(run, iters: int) -> float:
    run()
    start = time.perf_counter()
    for _ in range(iters):
        run()
    return (time.perf_counter() - start) / iters * 1000


def bench(name: str, batches: list[int], rounds: int, iters: int, workdir: str) -> list[dict]:
    """Exports ``name`` three ways and times them; one row per batch size."""
    paddle.seed(0)
    model = getattr(paddle.vision.models, name)(num_classes=1000)
    model.eval()
    rng = np.random.default_rng(0)
    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), target="x86"))
    qmodel = ptq.quantize(model)
    for _ in range(8):
        qmodel(paddle.to_tensor(rng.standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)))
    ptq.convert(qmodel)
    padded = padded_shifted_layers(qmodel)
    kept = ptq.keep_fp32(copy.deepcopy(qmodel), padded, model)
    spec = [paddle.static.InputSpec([None, 3, SIZE, SIZE], "float32", "x")]
    prefixes = {form: os.path.join(workdir, name, form) for form in ("fp32", "int8", "int8 padded fp32")}
    save_fp32_model(model, prefixes["fp32"], spec)
    ptq.save_quantized_model(qmodel, prefixes["int8"], spec)
    ptq.save_quantized_model(kept, prefixes["int8 padded fp32"], spec)
    counts = {
        form: sum(int8_report(prefixes[form]).int8.values()) for form in ("int8", "int8 padded fp32")
    }
    engines = {
        form: create_predictor(prefix, int8=form != "fp32") for form, prefix in prefixes.items()
    }
    simulations = {"int8": qmodel, "int8 padded fp32": kept}
    rows = []
    for batch in batches:
        x = rng.standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)
        with paddle.no_grad():
            reference = model(paddle.to_tensor(x)).numpy()
            simulated = {form: m(paddle.to_tensor(x)).numpy() for form, m in simulations.items()}
        runs = {form: (lambda e=engine: predict(e, x)[0]) for form, engine in engines.items()}
        outputs = {form: run() for form, run in runs.items()}
        times: dict[str, list[float]] = {form: [] for form in runs}
        for _ in range(rounds):
            for form, run in runs.items():
                times[form].append(_time(run, iters))
        medians = {form: statistics.median(values) for form, values in times.items()}
        row = {"model": name, "batch": batch, "padded convs": len(padded)}
        row.update({f"{form} ms": value for form, value in medians.items()})
        for form in simulations:
            row[f"{form} speed-up"] = medians["fp32"] / medians[form]
            row[f"{form} cos fp32"] = _cosine(outputs[form], reference)
            row[f"{form} cos sim"] = _cosine(outputs[form], simulated[form])
            row[f"{form} int8 ops"] = counts[form]
        rows.append(row)
        logger.info("%s", row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v3_small")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            rows.extend(bench(name, batches, args.rounds, args.iters, workdir))
    header = (
        f"{datetime.date.today()} · {cpu_info().describe()} · Paddle {paddle.__version__} · "
        f"target x86 · {args.rounds} rounds x {args.iters} iterations, medians, ms per batch"
    )
    lines = [
        header, "",
        "| model | batch | padded convs | fp32 ms | int8 ms (padded shifted) | speed-up | cos fp32 "
        "| cos sim | int8 ms (padded fp32) | speed-up | cos fp32 | cos sim | int8 conv/fc ops |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['padded convs']} | {r['fp32 ms']:.2f} "
            f"| {r['int8 ms']:.2f} | {r['int8 speed-up']:.2f}x | {r['int8 cos fp32']:.4f} "
            f"| {r['int8 cos sim']:.5f} | {r['int8 padded fp32 ms']:.2f} "
            f"| {r['int8 padded fp32 speed-up']:.2f}x | {r['int8 padded fp32 cos fp32']:.4f} "
            f"| {r['int8 padded fp32 cos sim']:.5f} "
            f"| {r['int8 int8 ops']} vs {r['int8 padded fp32 int8 ops']} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
