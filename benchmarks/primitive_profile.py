"""Where Paddle Inference spends its time, fp32 against int8: oneDNN primitive time by kind.

Exports one model of ``benchmarks/inference.py`` (same calibration) in fp32 and int8, runs
each in a child process with ``ONEDNN_VERBOSE=profile_exec`` (one thread; the child inherits
``ONEDNN_MAX_CPU_ISA``, so ``--isa AVX2`` profiles oneDNN's AVX2 kernels on a newer CPU) and
sums the execution time oneDNN reports per primitive kind (inner products per shape) over
``--runs`` timed forwards after warm-up. It shows how much of an int8 model's time goes to its
GEMMs and how much to the ops around them (quantize reorders, the shift's eltwise ops), and so
the best speed-up the GEMMs alone allow. Paddle ops that oneDNN does not run (embedding lookups,
the executor's own overhead) are not in these sums.

The fp32 and int8 children alternate ``--repeats`` times and the median of each primitive's
time is reported (the machine is shared: only the ratios from one run mean anything).

Usage: python benchmarks/primitive_profile.py [--model bert_encoder] [--batch 8] [--runs 3]
                                              [--repeats 3] [--isa AVX2] [--target x86]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import statistics
import subprocess
import sys
import tempfile

import paddle

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from inference import MODELS, export_model, model_input  # noqa: E402

from imperative_ptq import (  # noqa: E402
    DEFAULT_TARGET, TARGETS, cpu_info,
)
from imperative_ptq.export import create_predictor, predict  # noqa: E402

#: Printed by the child around the profiled forwards, so warm-up lines are left out.
_START, _END = "=====profile start", "=====profile end"


def run_child(prefix: str, int8: bool, name: str, batch: int, runs: int) -> None:
    """Runs ``prefix`` (in the child process) with markers around the profiled forwards."""
    _, shape, _, dtype = MODELS[name]
    predictor = create_predictor(prefix, int8=int8, num_threads=1)
    x = model_input(shape, dtype, batch, seed=batch)
    for _ in range(3):
        predict(predictor, x)
    print(_START, flush=True)
    for _ in range(runs):
        predict(predictor, x)
    print(_END, flush=True)


def profile(prefix: str, int8: bool, args: argparse.Namespace) -> dict[str, tuple[float, int]]:
    """oneDNN execution time (ms per forward) and call count per primitive kind."""
    env = dict(os.environ, ONEDNN_VERBOSE="profile_exec")
    if args.isa:
        env["ONEDNN_MAX_CPU_ISA"] = args.isa
    command = [sys.executable, os.path.abspath(__file__), "--child", prefix, "--model", args.model,
               "--batch", str(args.batch), "--runs", str(args.runs)] + (["--int8"] if int8 else [])
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    inside = output.split(_START, 1)[1].split(_END, 1)[0]
    times: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for line in inside.splitlines():
        fields = line.split(",")
        if not line.startswith("onednn_verbose") or "exec" not in fields[:4]:
            continue
        kind, implementation = fields[5], fields[6].split(":")[0]
        key = f"{kind} {fields[-2]}" if kind == "inner_product" else f"{kind} ({implementation})"
        times[key] += float(fields[-1]) / args.runs
        calls[key] += 1
    return {key: (times[key], calls[key] // args.runs) for key in times}


def _median(runs: list[dict[str, tuple[float, int]]]) -> dict[str, tuple[float, int]]:
    """Per primitive kind, the median time over child runs (and its call count)."""
    keys = set().union(*runs)
    return {
        key: (statistics.median(run.get(key, (0.0, 0))[0] for run in runs),
              max(run.get(key, (0.0, 0))[1] for run in runs))
        for key in keys
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert_encoder", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3, help="profiled forwards per child")
    parser.add_argument("--repeats", type=int, default=3,
                        help="children per engine, alternating; medians reported")
    parser.add_argument("--isa", default="", help="ONEDNN_MAX_CPU_ISA for the profiled runs")
    parser.add_argument("--target", default=DEFAULT_TARGET, choices=sorted(TARGETS))
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--int8", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.int8, args.model, args.batch, args.runs)
        return
    with tempfile.TemporaryDirectory() as workdir:
        *_, fp32_prefix, int8_prefix = export_model(args.model, workdir, args.target)
        samples: dict[bool, list[dict[str, tuple[float, int]]]] = {False: [], True: []}
        for _ in range(args.repeats):  # the two engines alternate: noise hits both alike
            samples[False].append(profile(fp32_prefix, False, args))
            samples[True].append(profile(int8_prefix, True, args))
        fp32, int8 = _median(samples[False]), _median(samples[True])
    isa = f" ONEDNN_MAX_CPU_ISA={args.isa}" if args.isa else ""
    print(f"# {datetime.date.today()} {cpu_info().describe()}{isa} paddle={paddle.__version__} "
          f"model={args.model} batch={args.batch} target={args.target} (1 thread, ms per forward)")
    print("| primitive | fp32 ms | fp32 calls | int8 ms | int8 calls |")
    print("|---|---|---|---|---|")
    for key in sorted(set(fp32) | set(int8), key=lambda k: -max(fp32.get(k, (0, 0))[0], int8.get(k, (0, 0))[0])):
        a, b = fp32.get(key, (0.0, 0)), int8.get(key, (0.0, 0))
        print(f"| {key} | {a[0]:.2f} | {a[1]} | {b[0]:.2f} | {b[1]} |")
    total_fp32 = sum(t for t, _ in fp32.values())
    total_int8 = sum(t for t, _ in int8.values())
    gemm_fp32 = sum(t for k, (t, _) in fp32.items() if k.startswith(("inner_product", "convolution")))
    gemm_int8 = sum(t for k, (t, _) in int8.items() if k.startswith(("inner_product", "convolution")))
    print(f"\noneDNN total: fp32 {total_fp32:.2f} ms, int8 {total_int8:.2f} ms "
          f"({total_fp32 / total_int8:.2f}x)")
    print(f"inner products and convolutions: fp32 {gemm_fp32:.2f} ms, int8 {gemm_int8:.2f} ms "
          f"({gemm_fp32 / max(gemm_int8, 1e-9):.2f}x); int8's other primitives "
          f"{total_int8 - gemm_int8:.2f} ms")
    print(f"bound if every other int8 primitive were free: {total_fp32 / max(gemm_int8, 1e-9):.2f}x")


if __name__ == "__main__":
    main()
