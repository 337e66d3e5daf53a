"""Symmetric vs affine activation calibration on MNIST: simulated accuracy and ReLU-output SQNR.

Trains the MLP (3 epochs) and LeNet (1 epoch), calibrates on 1000 training images with each
algorithm in both schemes (weights always per-channel symmetric int8, as PyTorch x86 and Paddle
Inference use), converts for the default ``x86`` target and evaluates the dygraph simulation on
the 10000 test images. ``convert`` runs both calibrations as Paddle Inference reads them (on
their thresholds, zero points ignored; a ReLU output on u8 codes ``0..255`` either way), so
the accuracy columns differ only by the thresholds each search found; ``int8`` counts the
layers simulated in int8. SQNR compares each ReLU output quantized with its own calibrated
parameters (symmetric int8 ``[-127, 127]`` vs affine uint8 ``[0, 255]``), on 1000 test images.
Usage: ``python benchmarks/affine_accuracy.py [--quick]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import paddle

import imperative_ptq as ip
from imperative_ptq.datasets import load_mnist
from imperative_ptq.models import LeNet, VerySimpleNet, train_classifier
from imperative_ptq.primitives import fake_quantize

ALGORITHMS = {
    "abs-max / min-max": (lambda: ip.AbsmaxQuantizer(), lambda: ip.MinMaxQuantizer()),
    "hist 99.999%": (lambda: ip.HistQuantizer(), lambda: ip.HistQuantizer(symmetric=False)),
    "KL (Paddle)": (lambda: ip.KLQuantizer(), lambda: ip.KLQuantizer(symmetric=False)),
    "KL (TensorRT)": (
        lambda: ip.TensorRTKLQuantizer(), lambda: ip.TensorRTKLQuantizer(symmetric=False)
    ),
    "MSE": (lambda: ip.MSEQuantizer(), lambda: ip.MSEQuantizer(symmetric=False)),
}


def accuracy(model: paddle.nn.Layer, images: np.ndarray, labels: np.ndarray) -> float:
    correct = 0
    with paddle.no_grad():
        for start in range(0, len(images), 1000):
            logits = model(paddle.to_tensor(images[start : start + 1000]))
            correct += int((logits.argmax(axis=1).numpy() == labels[start : start + 1000]).sum())
    return correct / len(images)


def sqnr(reference: np.ndarray, approximation: np.ndarray) -> float:
    noise = float(np.sum((reference - approximation) ** 2, dtype=np.float64))
    return 10 * np.log10(float(np.sum(reference**2, dtype=np.float64)) / max(noise, 1e-30))


def relu_outputs(model: paddle.nn.Layer, images: np.ndarray) -> dict[str, np.ndarray]:
    outputs: dict[str, np.ndarray] = {}
    hooks = [
        layer.register_forward_post_hook(
            lambda layer, inputs, out, name=name: outputs.__setitem__(name, out.numpy())
        )
        for name, layer in model.named_sublayers()
        if isinstance(layer, paddle.nn.ReLU)
    ]
    with paddle.no_grad():
        model(paddle.to_tensor(images))
    for hook in hooks:
        hook.remove()
    return outputs


def run(name: str, model: paddle.nn.Layer, data, quick: bool) -> None:
    calibration = data.train_images[:1000]
    batches = [calibration[i : i + 100] for i in range(0, 1000, 100)]
    print(f"\n## {name}: fp32 test accuracy {accuracy(model, data.test_images, data.test_labels):.4f}")
    print("| activations | symmetric calibration | affine calibration | ReLU-output SQNR sym / affine (dB) |")
    print("|---|---|---|---|")
    relus = relu_outputs(model, data.test_images[:1000])
    for algorithm, (symmetric, affine) in ALGORITHMS.items():
        if quick and algorithm not in ("abs-max / min-max", "KL (Paddle)"):
            continue
        results, tables = [], []
        for factory in (symmetric, affine):
            ptq = ip.ImperativePTQ(ip.PTQConfig(factory(), ip.PerChannelAbsmaxQuantizer()))
            quantized = ptq.quantize(model)
            ptq.calibrate(quantized, batches, progress=False)
            tables.append(ptq.calibration_table(quantized))
            ptq.convert(quantized)
            int8 = sum(isinstance(layer, ip.QuantizedLayer) for layer in quantized.sublayers())
            results.append(f"{accuracy(quantized, data.test_images, data.test_labels):.4f} (int8 {int8})")
        noise = []
        for layer, values in relus.items():
            threshold = tables[0][layer]["output"][0]
            symmetric_q = fake_quantize(values, threshold / 127, 0, -127, 127).numpy()
            entry = tables[1][layer]
            affine_q = fake_quantize(
                values, entry["output_scale"][0], entry["output_zero_point"][0], 0, 255
            ).numpy()
            noise.append(f"{layer} {sqnr(values, symmetric_q):.1f} / {sqnr(values, affine_q):.1f}")
        print(f"| {algorithm} | {results[0]} | {results[1]} | {'; '.join(noise)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="two algorithms, MLP only")
    args = parser.parse_args()
    data = load_mnist()
    paddle.seed(0)
    started = time.perf_counter()
    mlp = train_classifier(VerySimpleNet(), data.train_images, data.train_labels, epochs=3)
    print(f"MLP trained in {time.perf_counter() - started:.0f} s")
    run("VerySimpleNet (784-100-100-10 MLP)", mlp, data, args.quick)
    if args.quick:
        return
    paddle.seed(0)
    started = time.perf_counter()
    lenet = train_classifier(LeNet(), data.train_images, data.train_labels, epochs=1)
    print(f"LeNet trained in {time.perf_counter() - started:.0f} s")
    run("LeNet", lenet, data, args.quick)


if __name__ == "__main__":
    main()
