"""Wall time of convert and of the int8 exports, and what their earlier forms would cost.

Quantizes `paddle.vision` models (random weights, KL + per-channel, two calibration batches)
and times `convert`, `save_quantized_model` and `export_onnx` in one process, medians of
`--rounds`, alternating each as it is with the same step done as before:

* a walk of the whole model per swapped layer (`quant_layers.replace_sublayer` once per
  layer), searching the package's own state on the layers too (a converted model's table),
  instead of one walk swapping all of them (`replace_sublayers`), in `convert` and in the
  exports' unwrapping; the converted models compute the same (checked);
* Paddle's syncing `Block._insert_op` / `_remove_op` (which re-read the whole block from its
  C++ description on every edit). The int8 program written is the same either way
  (checked: identical op lists).

    python benchmarks/export_time.py                       # resnet18, mobilenet_v2, densenet121
    python benchmarks/export_time.py --models densenet121 --rounds 5
"""

from __future__ import annotations

import argparse
import collections
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


@contextlib.contextmanager
def walk_per_layer() -> Iterator[None]:
    """Swaps layers as convert and the exports did before: a walk of the model per layer,
    each searching the package's state on the layers (a converted model's table) too."""
    from imperative_ptq import convert, quant_layers
    from imperative_ptq.export import tracing

    one_walk, skipped = quant_layers.replace_sublayers, quant_layers.holds_package_state

    def per_layer(model, replacements) -> int:
        return sum(one_walk(model, [pair]) for pair in replacements)

    try:
        for module in (convert, tracing):
            module.replace_sublayers = per_layer
        quant_layers.holds_package_state = lambda attribute: False
        yield
    finally:
        for module in (convert, tracing):
            module.replace_sublayers = one_walk
        quant_layers.holds_package_state = skipped


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
    print("| model | ops in the int8 program | convert | convert, walks as before | save_quantized_model "
          "| same, walks as before | same, syncing edits | export_onnx | same, walks as before |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    spec = [paddle.static.InputSpec([None, 3, args.size, args.size], "float32", "x")]
    for name in args.models.split(","):
        times: dict[str, list[float]] = collections.defaultdict(list)
        with tempfile.TemporaryDirectory() as directory:
            ops, outputs = {}, {}
            for _ in range(args.rounds):
                for kind in ("plain", "per_layer"):
                    walks = walk_per_layer() if kind == "per_layer" else contextlib.nullcontext()
                    ptq, quantized, x = _calibrated(name, args.size)
                    with walks:
                        start = time.perf_counter()
                        ptq.convert(quantized)
                        times[f"convert {kind}"].append(time.perf_counter() - start)
                    outputs[kind] = quantized(x).numpy()
                for kind in ("plain", "per_layer", "syncing"):
                    prefix = f"{directory}/{kind}"
                    edits = syncing_edits() if kind == "syncing" else contextlib.nullcontext()
                    walks = walk_per_layer() if kind == "per_layer" else contextlib.nullcontext()
                    with edits, walks:
                        start = time.perf_counter()
                        save_quantized_model(quantized, prefix, spec)
                        times[f"save {kind}"].append(time.perf_counter() - start)
                    ops[kind] = _program_ops(prefix)
                for kind in ("plain", "per_layer"):
                    with walk_per_layer() if kind == "per_layer" else contextlib.nullcontext():
                        start = time.perf_counter()
                        export_onnx(quantized, f"{directory}/m.onnx", spec)
                        times[f"onnx {kind}"].append(time.perf_counter() - start)
            if len({tuple(program) for program in ops.values()}) != 1:
                raise RuntimeError(f"{name}: the exports wrote different programs")
            if not np.array_equal(outputs["plain"], outputs["per_layer"]):
                raise RuntimeError(f"{name}: the two converts compute different outputs")
        median = {key: statistics.median(values) for key, values in times.items()}
        print(
            f"| {name} | {len(ops['plain'])} | {median['convert plain']:.2f} | {median['convert per_layer']:.2f} "
            f"| {median['save plain']:.2f} | {median['save per_layer']:.2f} | {median['save syncing']:.2f} "
            f"| {median['onnx plain']:.2f} | {median['onnx per_layer']:.2f} |",
            flush=True,
        )


def _calibrated(name: str, size: int):
    """A ``paddle.vision`` model quantized and calibrated on two random batches, with its
    ImperativePTQ and an input batch."""
    import numpy as np
    import paddle

    import imperative_ptq as ip

    paddle.seed(0)
    model = getattr(paddle.vision.models, name)(num_classes=10)
    model.eval()
    rng = np.random.default_rng(0)
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer()))
    quantized = ptq.quantize(model)
    for _ in range(2):
        quantized(paddle.to_tensor(rng.standard_normal([2, 3, size, size]).astype("float32")))
    return ptq, quantized, paddle.to_tensor(rng.standard_normal([2, 3, size, size]).astype("float32"))


if __name__ == "__main__":
    main()
