"""Wall time of the int8 exports, and what re-syncing the program after every edit would cost.

Quantizes `paddle.vision` models (random weights, KL + per-channel, two calibration batches)
and times `save_quantized_model` and `export_onnx` in one process, alternating the export
as it is with the same export using Paddle's syncing `Block._insert_op` / `_remove_op`
(which re-read the whole block from its C++ description on every edit), medians of
`--rounds`. The int8 program written is the same either way (checked: identical op lists).

    python benchmarks/export_time.py                       # resnet18, mobilenet_v2, densenet121
    python benchmarks/export_time.py --models densenet121 --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import tempfile
import time
from typing import Iterator


@contextlib.contextmanager
def syncing_edits() -> Iterator[None]:
    """The export with Paddle's syncing insert/remove (what it did before)."""
    from imperative_ptq.export import graph

    plain_insert, plain_remove = graph.insert_op, graph.remove_op
    modules = _modules_using_graph_edits()

    def insert(block, index, **op):
        return block._insert_op(index, **op)

    def remove(block, index):
        block._remove_op(index)

    try:
        for module in modules:
            for name, replacement in (("insert_op", insert), ("remove_op", remove)):
                if hasattr(module, name):
                    setattr(module, name, replacement)
        yield
    finally:
        for module in modules:
            for name, plain in (("insert_op", plain_insert), ("remove_op", plain_remove)):
                if hasattr(module, name):
                    setattr(module, name, plain)


def _modules_using_graph_edits() -> list:
    from imperative_ptq.export import (
        coded_identity, dynamic_export, graph, program, rnn_fusion, shifted, unsigned,
    )

    return [coded_identity, dynamic_export, graph, program, rnn_fusion, shifted, unsigned]


def _program_ops(prefix: str) -> list[str]:
    from imperative_ptq.export.legacy_program import legacy_static_mode, load_legacy_program

    with legacy_static_mode():
        loaded = load_legacy_program(prefix)
        return [op.type for op in loaded.program.global_block().ops]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2,densenet121")
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import numpy as np
    import paddle

    import imperative_ptq as ip
    from imperative_ptq.export import export_onnx, save_quantized_model

    logging.disable(logging.WARNING)
    print(f"# {ip.cpu_info().describe()}; Paddle {paddle.__version__}; medians of {args.rounds} rounds, s")
    print("| model | ops in the int8 program | save_quantized_model s | same, syncing edits s | speed-up | export_onnx s |")
    print("|---|---:|---:|---:|---:|---:|")
    spec = [paddle.static.InputSpec([None, 3, args.size, args.size], "float32", "x")]
    for name in args.models.split(","):
        paddle.seed(0)
        model = getattr(paddle.vision.models, name)(num_classes=10)
        model.eval()
        rng = np.random.default_rng(0)
        ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer()))
        quantized = ptq.quantize(model)
        for _ in range(2):
            quantized(paddle.to_tensor(rng.standard_normal([2, 3, args.size, args.size]).astype("float32")))
        ptq.convert(quantized)
        times: dict[str, list[float]] = {"plain": [], "syncing": [], "onnx": []}
        with tempfile.TemporaryDirectory() as directory:
            ops = {}
            for _ in range(args.rounds):
                for kind in ("plain", "syncing"):
                    prefix = f"{directory}/{kind}"
                    with syncing_edits() if kind == "syncing" else contextlib.nullcontext():
                        start = time.perf_counter()
                        save_quantized_model(quantized, prefix, spec)
                        times[kind].append(time.perf_counter() - start)
                    ops[kind] = _program_ops(prefix)
                start = time.perf_counter()
                export_onnx(quantized, f"{directory}/m.onnx", spec)
                times["onnx"].append(time.perf_counter() - start)
            if ops["plain"] != ops["syncing"]:
                raise RuntimeError(f"{name}: the two exports wrote different programs")
        plain, syncing, onnx = (statistics.median(times[k]) for k in ("plain", "syncing", "onnx"))
        print(f"| {name} | {len(ops['plain'])} | {plain:.2f} | {syncing:.2f} | {syncing / plain:.2f}x | {onnx:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
