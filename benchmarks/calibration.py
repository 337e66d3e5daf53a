"""Calibration speed: imperative_ptq vs Paddle's built-in ImperativePTQ, side by side.

One process; engines are interleaved within each round (the order rotates every round) and the
table reports medians over the rounds, the fastest round, and CPU times (the forward thread's
and the whole process's), which are less sensitive to other processes on a shared machine.
``--profile`` instead times the hook on the forward thread vs the worker thread. Every engine sees the same batches (random normal data,
fixed seed) and runs under ``paddle.no_grad()``.

Engines (calibration forward = the forward loop over all batches; for ours it also includes
waiting for the worker thread, ``collector.flush()``, so no work is left hidden in the thread):

* ``fp32``          plain eval forward of the model.
* ``ours``          ``ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer()))``.
* ``ours-sync``     the same with ``asynchronous=False`` (what the worker thread buys).
* ``ours-fast``     ``KLQuantizer(exact_binning=False)`` (what exact binning, the default, costs).
* ``paddle``        ``paddle.quantization.ImperativePTQ`` with its KL + per-channel abs-max.

Threshold computation: ``ptq.calibration_table(qmodel)`` for ours (every round), Paddle's
``ptq._cal_thresholds(qmodel)`` once per model (9-20 s; ``--skip-paddle-thresholds`` skips it).
After that, our thresholds are compared with Paddle's on the same data (max relative difference
per role).

    python benchmarks/calibration.py                       # full: 2 models, 8 x 4, 3 rounds (~4 min)
    python benchmarks/calibration.py --models resnet18 --batches 2 --rounds 1 --skip-paddle-thresholds
    python benchmarks/calibration.py --models bert_encoder --batch-size 8   # a transformer

``bert_encoder`` is ``benchmarks/inference.py``'s BERT-shaped encoder (6 layers, hidden 384, 12
heads) on random token ids of ``--sequence-length``: its attention matmuls are calibrated
through the functional-matmul route (and the constant-operand fingerprint), which the vision
models do not exercise.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import threading
import time
from collections import defaultdict
from typing import Any, Callable

import numpy as np
import paddle

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from inference import BertEncoder  # noqa: E402

from imperative_ptq import ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig, cpu_info  # noqa: E402

ENGINES = ("fp32", "ours", "ours-sync", "ours-fast", "paddle")


# --------------------------------------------------------------------------------- engines
def _ours_factory(asynchronous: bool = True, exact_binning: bool = True) -> Callable[[], Any]:
    def make() -> ImperativePTQ:
        config = PTQConfig(KLQuantizer(exact_binning=exact_binning), PerChannelAbsmaxQuantizer())
        return ImperativePTQ(config, asynchronous=asynchronous)

    return make


def _paddle_ptq() -> Any:
    pq = paddle.quantization
    return pq.ImperativePTQ(pq.PTQConfig(pq.KLQuantizer(), pq.PerChannelAbsmaxQuantizer()))


OUR_ENGINES = {
    "ours": _ours_factory(),
    "ours-sync": _ours_factory(asynchronous=False),
    "ours-fast": _ours_factory(exact_binning=False),
}


def _forward_all(model: paddle.nn.Layer, batches: list[paddle.Tensor]) -> None:
    for x in batches:
        model(x)


def run_fp32(model: paddle.nn.Layer, batches: list[paddle.Tensor]) -> dict[str, float]:
    with paddle.no_grad():
        t0, c0, f0 = time.perf_counter(), time.process_time(), time.thread_time()
        _forward_all(model, batches)
        return {
            "forward": time.perf_counter() - t0,
            "cpu": time.process_time() - c0,
            "thread": time.thread_time() - f0,
        }


def run_ours(
    name: str, model: paddle.nn.Layer, batches: list[paddle.Tensor]
) -> tuple[dict[str, float], dict]:
    ptq = OUR_ENGINES[name]()
    qmodel = ptq.quantize(model)
    session = qmodel._ptq_session
    try:
        with paddle.no_grad():
            t0, c0, f0 = time.perf_counter(), time.process_time(), time.thread_time()
            _forward_all(qmodel, batches)
            _flush(session)  # waiting for the worker is part of the calibration forward
            t1, c1, f1 = time.perf_counter(), time.process_time(), time.thread_time()
            table = ptq.calibration_table(qmodel)
            t2 = time.perf_counter()
    finally:
        _close(session)
    return {"forward": t1 - t0, "cpu": c1 - c0, "thread": f1 - f0, "thresholds": t2 - t1}, table


def _flush(session: Any) -> None:
    """Waits for the worker thread (works across versions of the session API)."""
    if hasattr(session, "flush"):
        session.flush()
    else:
        session.collector.flush()


def _close(session: Any) -> None:
    """Stops the worker thread and removes the hooks."""
    for method in ("detach", "close"):
        if hasattr(session, method):
            getattr(session, method)()
            return


def run_paddle(
    model: paddle.nn.Layer, batches: list[paddle.Tensor]
) -> tuple[dict[str, float], Any, paddle.nn.Layer]:
    ptq = _paddle_ptq()
    qmodel = ptq.quantize(model)
    with paddle.no_grad():
        t0, c0, f0 = time.perf_counter(), time.process_time(), time.thread_time()
        _forward_all(qmodel, batches)
        return (
            {
                "forward": time.perf_counter() - t0,
                "cpu": time.process_time() - c0,
                "thread": time.thread_time() - f0,
            },
            ptq,
            qmodel,
        )


def paddle_thresholds(ptq: Any, qmodel: paddle.nn.Layer) -> tuple[float, dict]:
    """Runs Paddle's ``_cal_thresholds`` and returns (seconds, table shaped like ours)."""
    t0 = time.perf_counter()
    ptq._cal_thresholds(qmodel)
    seconds = time.perf_counter() - t0
    table: dict[str, dict[str, list[float]]] = {}
    for name, layer in qmodel.named_sublayers():
        qc = getattr(layer, "_quant_config", None)
        if qc is None:
            continue
        entry = {}
        if qc.enable_in_act_quantizer:
            entry["input"] = _flatten(qc.in_act_quantizer.thresholds)
            entry["weight"] = _flatten(qc.wt_quantizer.thresholds)
        entry["output"] = _flatten(qc.out_act_quantizer.thresholds)
        table[name] = entry
    return seconds, table


def _flatten(values: Any) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float64).ravel()]


def compare_tables(ours: dict, reference: dict) -> dict[str, dict[str, float]]:
    """Per role: max relative difference, thresholds compared, and how many differ."""
    result: dict[str, dict[str, float]] = {}
    for role in ("input", "output", "weight"):
        worst, count, differ = 0.0, 0, 0
        missing = 0
        for name, ref_entry in reference.items():
            if role not in ref_entry:
                continue
            mine = ours.get(name, {}).get(role)
            if mine is None or len(mine) != len(ref_entry[role]):
                missing += 1
                continue
            a, b = np.asarray(mine, np.float64), np.asarray(ref_entry[role], np.float64)
            rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-30)
            worst = max(worst, float(rel.max(initial=0.0)))
            count += a.size
            differ += int(np.count_nonzero(rel > 1e-6))
        result[role] = {"max_rel": worst, "count": count, "differ": differ, "missing": missing}
    return result


# ------------------------------------------------------------------------- optional profile
class HookProfiler:
    """Monkeypatches the collector (in this process only) to time the forward-thread hook work
    (``sample``: copying ``|x|``; ``submit``: queueing, incl. blocking on a full queue) and the
    worker's busy time (``observe_samples``)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._orig: list[tuple[Any, str, Any]] = []

    def _wrap(self, owner: Any, attr: str, key: str) -> None:
        original = getattr(owner, attr)
        profiler = self

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                with profiler._lock:
                    profiler.times[key] += dt
                    profiler.counts[key] += 1

        self._orig.append((owner, attr, original))
        setattr(owner, attr, wrapper)

    def __enter__(self) -> "HookProfiler":
        from imperative_ptq import collector as collector_module
        from imperative_ptq import session as session_module
        from imperative_ptq.quantizers import sample as sample_module

        coll = collector_module.CalibrationCollector
        self._wrap(session_module.CalibrationSession, "hook", "hook (total, forward thread)")
        self._wrap(coll, "sample", "  sample: |x| copy")
        self._wrap(coll, "submit", "  submit: queue put")
        self._wrap(coll, "_run", "worker busy (observe_samples)")
        self._wrap(sample_module.TensorSample, "abs_max", "  abs_max (incl. cached)")
        self._wrap(sample_module.TensorSample, "histogram", "  histogram (incl. cached)")
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, attr, original in reversed(self._orig):
            setattr(owner, attr, original)


# ------------------------------------------------------------------------------------ main
def make_model(name: str, seed: int, args: argparse.Namespace) -> paddle.nn.Layer:
    paddle.seed(seed)
    if name == "bert_encoder":
        model = BertEncoder(length=args.sequence_length)
    else:
        model = getattr(paddle.vision.models, name)()
    model.eval()
    return model


def make_batches(name: str, args: argparse.Namespace, seed: int) -> list[paddle.Tensor]:
    rng = np.random.default_rng(seed)
    if name == "bert_encoder":
        shape = (args.batch_size, args.sequence_length)
        return [paddle.to_tensor(rng.integers(0, 8192, shape, dtype=np.int64)) for _ in range(args.batches)]
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    return [
        paddle.to_tensor(rng.standard_normal(shape, dtype=np.float32)) for _ in range(args.batches)
    ]


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    model = make_model(name, args.seed, args)
    batches = make_batches(name, args, args.seed)
    engines = [e for e in ENGINES if e in args.engines]
    samples: dict[str, dict[str, list[float]]] = {e: defaultdict(list) for e in engines}
    tables: dict[str, dict] = {}
    paddle_state = None

    # Warm-up (not timed): kernels, allocator, lazy imports.
    with paddle.no_grad():
        _forward_all(model, batches[:2])

    total_rounds = args.warmup + args.rounds
    for r in range(total_rounds):
        order = engines[r % len(engines):] + engines[: r % len(engines)]
        for engine in order:
            warm = r < args.warmup
            data = batches[:2] if warm else batches  # warm-up: 2 batches, not timed
            if engine == "fp32":
                times = run_fp32(model, data)
            elif engine == "paddle":
                times, ptq, qmodel = run_paddle(model, data)
                if not warm:
                    paddle_state = (ptq, qmodel)
            else:
                times, table = run_ours(engine, model, data)
                if not warm:
                    tables[engine] = table
            if not warm:
                for key, value in times.items():
                    samples[engine][key].append(value)
        print(f"  [{name}] round {r + 1}/{total_rounds} done", file=sys.stderr, flush=True)

    medians = {e: {k: statistics.median(v) for k, v in samples[e].items()} for e in engines}
    for e in engines:
        medians[e]["forward_min"] = min(samples[e]["forward"])
    result: dict[str, Any] = {"medians": medians, "paddle_thresholds": None, "agreement": {}}
    if paddle_state is not None and not args.skip_paddle_thresholds:
        print(f"  [{name}] Paddle _cal_thresholds ...", file=sys.stderr, flush=True)
        seconds, ref_table = paddle_thresholds(*paddle_state)
        result["paddle_thresholds"] = seconds
        for engine, table in tables.items():
            result["agreement"][engine] = compare_tables(table, ref_table)
    return result


def _fmt_ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def _fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def print_report(results: dict[str, dict], args: argparse.Namespace) -> str:
    lines = []
    lines.append(
        f"{args.batches} batches of {args.batch_size}x3x{args.image_size}x{args.image_size} "
        f"(bert_encoder: {args.batch_size}x{args.sequence_length} token ids), "
        f"median of {args.rounds} rounds (+{args.warmup} warm-up), engines interleaved; "
        f"{cpu_info().describe()}; Paddle {paddle.__version__}, numpy {np.__version__}, "
        f"Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
        f"load average at start {args.load_start:.2f}, at end {os.getloadavg()[0]:.2f}"
    )
    lines.append("")
    lines.append(
        "| model | engine | calib. forward (s) | vs fp32 | min (s) | min vs fp32 min "
        "| fwd-thread CPU (s) | vs fp32 | process CPU / wall | thresholds (s) |"
    )
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model, res in results.items():
        med = res["medians"]
        ref = med.get("fp32", {})
        fp32 = ref.get("forward")
        for engine, m in med.items():
            thr = m.get("thresholds")
            if engine == "paddle":
                thr = res["paddle_thresholds"]
            lines.append(
                f"| {model} | {engine} | {_fmt_s(m['forward'])} | {_fmt_ratio(m['forward'], fp32)}"
                f" | {_fmt_s(m['forward_min'])} | {_fmt_ratio(m['forward_min'], ref.get('forward_min'))}"
                f" | {_fmt_s(m['thread'])} | {_fmt_ratio(m['thread'], ref.get('thread'))}"
                f" | {m['cpu'] / m['forward']:.2f} | {_fmt_s(thr) if engine != 'fp32' else ''} |"
            )
    lines.append("")
    lines.append(
        "calib. forward: median wall time of the forward loop (+ worker flush for ours); min: "
        "fastest round (noise on a shared machine only adds time); fwd-thread CPU: CPU time of "
        "the forward thread only (excludes the worker, and time lost to other processes); "
        "process CPU / wall > 1 means the worker ran in parallel."
    )
    lines.append("")
    lines.append("Targets: ours <= 2.5x fp32 on MobileNetV2, <= 1.3x on ResNet-18; "
                 "our threshold computation <= 1 s per model.")
    for model, res in results.items():
        med = res["medians"]
        fp32 = med.get("fp32", {}).get("forward")
        ours = med.get("ours", {})
        target = {"mobilenet_v2": 2.5, "resnet18": 1.3}.get(model)
        parts = []
        if ours and fp32:
            ratio = ours["forward"] / fp32
            verdict = "" if target is None else (" MET" if ratio <= target else " MISSED")
            goal = "" if target is None else f" (target {target}x)"
            parts.append(f"ours/fp32 {ratio:.2f}x{goal}{verdict}")
        if "paddle" in med and fp32:
            parts.append(f"paddle/fp32 {med['paddle']['forward'] / fp32:.2f}x")
        if ours and "paddle" in med:
            parts.append(f"forward speed-up vs paddle {med['paddle']['forward'] / ours['forward']:.2f}x")
        if ours:
            thr = ours["thresholds"]
            parts.append(f"our thresholds {thr:.3f} s ({'MET' if thr <= 1.0 else 'MISSED'})")
            if res["paddle_thresholds"]:
                parts.append(f"Paddle's {res['paddle_thresholds']:.1f} s "
                             f"({res['paddle_thresholds'] / thr:.0f}x slower)")
        lines.append(f"- {model}: " + "; ".join(parts))
    if any(res["agreement"] for res in results.values()):
        lines.append("")
        lines.append("Agreement with Paddle's thresholds (same data), max relative difference "
                     "(thresholds differing by > 1e-6 / compared):")
        lines.append("")
        lines.append("| model | engine | input | output | weight |")
        lines.append("|---|---|---|---|---|")
        for model, res in results.items():
            for engine, agreement in res["agreement"].items():
                cells = []
                for role in ("input", "output", "weight"):
                    a = agreement[role]
                    cell = f"{a['max_rel']:.2e} ({a['differ']}/{a['count']})"
                    if a["missing"]:
                        cell += f", {a['missing']} layers missing"
                    cells.append(cell)
                lines.append(f"| {model} | {engine} | " + " | ".join(cells) + " |")
    report = "\n".join(lines)
    print(report)
    return report


def profile(args: argparse.Namespace) -> None:
    """Where the time of our calibration forward goes (first model, ``ours`` engine)."""
    name = args.models[0]
    model = make_model(name, args.seed, args)
    batches = make_batches(name, args, args.seed)
    fp32 = statistics.median(run_fp32(model, batches)["forward"] for _ in range(3))
    run_ours("ours", model, batches)  # warm-up
    for engine in ("ours", "ours-sync"):
        with HookProfiler() as prof:
            times, _ = run_ours(engine, model, batches)
        print(f"\nProfile of {engine} on {name}: calibration forward {times['forward']:.3f} s "
              f"(fp32 {fp32:.3f} s, overhead {times['forward'] - fp32:.3f} s), "
              f"CPU {times['cpu']:.3f} s")
        for key in ("hook (total, forward thread)", "  sample: |x| copy", "  submit: queue put",
                    "worker busy (observe_samples)", "  abs_max (incl. cached)",
                    "  histogram (incl. cached)"):
            if key in prof.times:
                print(f"  {key:34s} {prof.times[key]:7.3f} s  ({prof.counts[key]} calls)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mobilenet_v2,resnet18",
                        type=lambda s: [m for m in s.split(",") if m],
                        help="comma-separated paddle.vision.models constructors, or bert_encoder")
    parser.add_argument("--batches", type=int, default=8, help="calibration batches per round")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--sequence-length", type=int, default=128, help="bert_encoder's tokens per sample")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (medians)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed rounds (of 2 batches each) first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engines", default=",".join(ENGINES),
                        type=lambda s: [e for e in s.split(",") if e],
                        help=f"comma-separated subset of {','.join(ENGINES)}")
    parser.add_argument("--skip-paddle-thresholds", action="store_true",
                        help="skip Paddle's _cal_thresholds (9-20 s per model) and the agreement check")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the table, time the hook vs the worker on the first model")
    args = parser.parse_args(argv)
    unknown = set(args.engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}; choose from {ENGINES}")
    logging.getLogger("imperative_ptq").setLevel(logging.ERROR)
    paddle.set_device("cpu")
    if args.profile:
        profile(args)
        return
    results = {}
    args.load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    for name in args.models:
        results[name] = bench_model(name, args)
    print_report(results, args)
    print(f"\n(total benchmark time {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
