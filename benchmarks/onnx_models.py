"""fp32 vs int8 latency of an ONNX model converted with x2paddle, in Paddle Inference and ONNX
Runtime, engines interleaved in one process.

The model (one float input of a fixed shape) is converted to a dygraph model with x2paddle
(``imperative_ptq.onnx_import.load_onnx_model``, which rewrites HardSwish for it),
calibrated on a few batches of random ``[0, 1)`` inputs (KL activations, per-channel weights:
enough for speed, not for accuracy), converted for each ``--targets`` entry and exported to a
Paddle Inference int8 program and an ONNX QDQ file. fp32 Paddle Inference runs the converted
model's ``save_fp32_model`` program, fp32 ONNX Runtime the original file. Medians of
``--rounds`` rounds of ``--iters`` calls, one thread each; the table also gives each int8
engine's largest difference to the dygraph simulation, relative to its largest output, and
below it which convs/matmuls ONNX Runtime runs in integer kernels (``onnx_runtime_report``).

Usage: python benchmarks/onnx_models.py MODEL.onnx --shape 1,3,224,224 [--targets x86,x86-vnni]
                                        [--rounds 5] [--iters 10] [--calibration-batches 4]
(x2paddle comes with ``pip install -e ".[bench]"``.)
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import statistics
import sys
import tempfile
from typing import Any, Callable

import numpy as np
import paddle

from imperative_ptq import ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig, cpu_info
from imperative_ptq.export import create_predictor, export_onnx, onnx_runtime_report, predict, save_fp32_model
from imperative_ptq.onnx_import import load_onnx_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from side_by_side import milliseconds_per_call  # noqa: E402

logger = logging.getLogger("benchmarks.onnx_models")


def converted_model(onnx_path: str, shape: list[int], directory: str) -> paddle.nn.Layer:
    """``onnx_path`` as x2paddle's dygraph model (converted into ``directory``), in eval mode."""
    import onnx

    input_name = onnx.load(onnx_path).graph.input[0].name
    return load_onnx_model(onnx_path, directory, {input_name: shape})


def _ort_session(path: str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _first_output(outputs: Any) -> np.ndarray:
    """The model's (first) output as an array."""
    return (outputs[0] if isinstance(outputs, (list, tuple)) else outputs).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx_path")
    parser.add_argument("--shape", required=True, help="input shape, e.g. 1,3,224,224")
    parser.add_argument("--targets", default="x86,x86-vnni")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--calibration-batches", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    shape = [int(size) for size in args.shape.split(",")]
    rng = np.random.default_rng(0)
    x = rng.random(shape, dtype=np.float32)
    spec = [paddle.static.InputSpec(shape, "float32", "x")]
    with tempfile.TemporaryDirectory() as workdir:
        model = converted_model(args.onnx_path, shape, os.path.join(workdir, "x2paddle"))
        save_fp32_model(model, os.path.join(workdir, "fp32", "model"), spec)
        original = _ort_session(args.onnx_path)
        original_input = original.get_inputs()[0].name
        runs: dict[str, Callable[[], np.ndarray]] = {
            "Paddle Inference fp32": lambda p=create_predictor(os.path.join(workdir, "fp32", "model"), int8=False,
                                                               num_threads=1): predict(p, x)[0],
            "ONNX Runtime fp32": lambda: original.run(None, {original_input: x})[0],
        }
        simulated: dict[str, np.ndarray] = {}
        reports: dict[str, str] = {"original file": onnx_runtime_report(args.onnx_path).summary()}
        for target in args.targets.split(","):
            ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), target=target))
            qmodel = ptq.quantize(model)
            for _ in range(args.calibration_batches):
                qmodel(paddle.to_tensor(rng.random(shape, dtype=np.float32)))
            ptq.convert(qmodel)
            with paddle.no_grad():
                simulation = _first_output(qmodel(paddle.to_tensor(x)))
            prefix = os.path.join(workdir, target, "model")
            ptq.save_quantized_model(qmodel, prefix, spec)
            predictor = create_predictor(prefix, int8=True, num_threads=1)
            onnx_path = export_onnx(qmodel, prefix + ".onnx", spec)
            reports[target] = onnx_runtime_report(onnx_path).summary()
            session = _ort_session(onnx_path)
            name = session.get_inputs()[0].name
            for engine, run in (
                (f"Paddle Inference int8 {target}", lambda p=predictor: predict(p, x)[0]),
                (f"ONNX Runtime int8 {target}", lambda s=session, n=name: s.run(None, {n: x})[0]),
            ):
                runs[engine] = run
                simulated[engine] = simulation
        times: dict[str, list[float]] = {engine: [] for engine in runs}
        for _ in range(args.rounds):
            for engine, run in runs.items():
                times[engine].append(milliseconds_per_call(run, args.iters))
        medians = {engine: statistics.median(values) for engine, values in times.items()}
        print(f"# {datetime.date.today()} {cpu_info().describe()} paddle={paddle.__version__} "
              f"{os.path.basename(args.onnx_path)} {shape}, one thread, medians of {args.rounds} rounds of {args.iters}")
        print("| engine | ms | speed-up vs its runtime's fp32 | largest difference to the simulation |")
        print("|---|---|---|---|")
        for engine, run in runs.items():
            baseline = medians["ONNX Runtime fp32" if engine.startswith("ONNX") else "Paddle Inference fp32"]
            error = ""
            if engine in simulated:
                reference = simulated[engine]
                error = f"{float(np.abs(run() - reference).max() / np.abs(reference).max()):.1e}"
            print(f"| {engine} | {medians[engine]:.2f} | {baseline / medians[engine]:.2f}x | {error} |")
        print()
        for name, report in reports.items():
            print(f"{name}: {report}")


if __name__ == "__main__":
    main()
