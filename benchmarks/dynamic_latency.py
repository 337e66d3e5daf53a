"""Latency of dynamic quantization: fp32 vs dynamic int8, one process.

The ``MnistSequenceEncoder`` of ``imperative_ptq.models`` (random weights: latency does not depend on
them) is quantized with ``quantize_dynamic`` and run in

* ONNX Runtime: the dynamic export (``DynamicQuantizeLinear`` + ``MatMulInteger``) against the
  same graph with each of those chains replaced by a float ``MatMul`` on the dequantized
  weights (``export_onnx`` writes quantized models only), so the two differ only in the
  activation quantization and the integer kernels;
* Paddle Inference: the fp32 program (``save_fp32_model``) against the weight-only int8
  program of ``save_quantized_model`` (Paddle runs it in float after dequantizing the weights).

Engines are interleaved round by round (the order rotates every round) and the table reports
medians over the rounds, in ms per batch, and the cosine of each engine's logits to the dygraph
fp32 model. ONNX Runtime runs with ``intra_op_num_threads`` = the usable cores and no spinning,
as in ``benchmarks/inference.py``.

Usage: python benchmarks/dynamic_latency.py [--rounds 7] [--iters 20] [--batches 1,8]
                                           [--dim 64] [--depth 2] [--heads 4]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import statistics
import sys
import tempfile
from typing import Callable

import numpy as np
import paddle

import imperative_ptq as ip
from imperative_ptq.export import (
    create_predictor, export_onnx, predict, save_fp32_model, save_quantized_model,
)
from imperative_ptq.models import MnistSequenceEncoder

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from side_by_side import milliseconds_per_call  # noqa: E402

SPEC = [paddle.static.InputSpec([None, 1, 28, 28], "float32", "x")]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _ort_session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def float_onnx(dynamic_path: str, path: str) -> str:
    """Writes the dynamic ONNX model at ``dynamic_path`` with every ``DynamicQuantizeLinear``
    -> ``MatMulInteger`` -> ``Cast`` -> ``Mul`` chain replaced by a float ``MatMul`` on the
    dequantized weight (integers x per-column scale)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(dynamic_path)
    graph = model.graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    removed: set[int] = set()
    replacements: dict[int, object] = {}
    new_initializers = []
    for node in graph.node:
        if node.op_type != "MatMulInteger":
            continue
        quantize = producers[node.input[0]]
        (cast,) = consumers[node.output[0]]
        (final,) = consumers[cast.output[0]]
        multiplier = producers[next(i for i in final.input if i != cast.output[0])]
        w_scale = next(initializers[i] for i in multiplier.input if i in initializers)
        weight = initializers[node.input[1]].astype(np.float32) * w_scale.astype(np.float32)
        weight_name = node.input[1] + ".float"
        new_initializers.append(numpy_helper.from_array(weight.astype(np.float32), weight_name))
        replacements[id(final)] = helper.make_node(
            "MatMul", [quantize.input[0], weight_name], [final.output[0]]
        )
        removed.update(id(n) for n in (quantize, node, cast, multiplier))
    nodes = [replacements.get(id(n), n) for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for n in nodes for name in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_initializers)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def build_engines(model: paddle.nn.Layer, workdir: str) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Engine name -> function from an input batch to logits."""
    dynamic = ip.quantize_dynamic(model)
    dynamic_path = export_onnx(dynamic, os.path.join(workdir, "dynamic.onnx"), SPEC)
    ort_int8 = _ort_session(dynamic_path)
    ort_fp32 = _ort_session(float_onnx(dynamic_path, os.path.join(workdir, "fp32.onnx")))
    fp32_prefix = os.path.join(workdir, "fp32")
    save_fp32_model(model, fp32_prefix, SPEC)
    int8_prefix = os.path.join(workdir, "dynamic")
    save_quantized_model(dynamic, int8_prefix, SPEC)
    paddle_fp32 = create_predictor(fp32_prefix, int8=False)
    paddle_int8 = create_predictor(int8_prefix, int8=False)
    return {
        "ort fp32": lambda x: ort_fp32.run(None, {"x": x})[0],
        "ort dynamic int8": lambda x: ort_int8.run(None, {"x": x})[0],
        "paddle fp32": lambda x: predict(paddle_fp32, x)[0],
        "paddle weight-only int8": lambda x: predict(paddle_int8, x)[0],
    }


def measure(
    model: paddle.nn.Layer, batches: list[int], rounds: int, iters: int, workdir: str
) -> list[dict]:
    """One row per batch size: median ms per engine, int8 speed-ups and cosines to fp32."""
    engines = build_engines(model, workdir)
    names = list(engines)
    rows = []
    for batch in batches:
        x = np.random.default_rng(batch).random([batch, 1, 28, 28], dtype=np.float32)
        with paddle.no_grad():
            reference = model(paddle.to_tensor(x)).numpy()
        cosines = {name: _cosine(run(x), reference) for name, run in engines.items()}
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(rounds):
            order = names[round_index % len(names):] + names[: round_index % len(names)]
            for name in order:
                times[name].append(milliseconds_per_call(lambda run=engines[name]: run(x), iters))
        medians = {name: statistics.median(values) for name, values in times.items()}
        rows.append({
            "batch": batch, "medians": medians, "cosines": cosines,
            "ort speed-up": medians["ort fp32"] / medians["ort dynamic int8"],
            "paddle speed-up": medians["paddle fp32"] / medians["paddle weight-only int8"],
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (medians)")
    parser.add_argument("--iters", type=int, default=20, help="calls per engine and round")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--dim", type=int, default=64, help="MnistSequenceEncoder token width")
    parser.add_argument("--depth", type=int, default=2, help="MnistSequenceEncoder encoder blocks")
    parser.add_argument("--heads", type=int, default=4, help="MnistSequenceEncoder attention heads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    paddle.seed(0)
    model = MnistSequenceEncoder(width=args.dim, depth=args.depth, heads=args.heads)
    model.eval()
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as workdir:
        rows = measure(model, batches, args.rounds, args.iters, workdir)
    print(f"# {datetime.date.today()} {ip.cpu_info().describe()} "
          f"cpus={len(os.sched_getaffinity(0))} paddle={paddle.__version__} "
          f"MnistSequenceEncoder dim={args.dim} depth={args.depth} heads={args.heads} "
          f"rounds={args.rounds} iters={args.iters}")
    print("| batch | ORT fp32 ms | ORT dynamic int8 ms | ORT speed-up | Paddle fp32 ms "
          "| Paddle weight-only int8 ms | Paddle speed-up | cos ORT int8 | cos Paddle int8 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        m, c = row["medians"], row["cosines"]
        print(f"| {row['batch']} | {m['ort fp32']:.3f} | {m['ort dynamic int8']:.3f} "
              f"| {row['ort speed-up']:.2f}x | {m['paddle fp32']:.3f} "
              f"| {m['paddle weight-only int8']:.3f} | {row['paddle speed-up']:.2f}x "
              f"| {c['ort dynamic int8']:.4f} | {c['paddle weight-only int8']:.4f} |")


if __name__ == "__main__":
    main()
