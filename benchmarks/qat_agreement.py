"""Does a QAT model train on what its export runs? Agreement of the fine-tuning forward, the
converted simulation and Paddle Inference int8, on residual networks.

For random-weight ``paddle.vision`` ResNets (3x32x32 input), calibrates KL activations and
per-channel absmax weights on 4 random batches of 8 for each deployment target, prepares
``ImperativeQAT`` (fixed or LSQ thresholds), optionally trains a few SGD steps on random
labels, converts with ``qat.convert``, exports, and compares on 16 new images: (a) the QAT
model's eval forward, (b) the converted model (the simulation), (c) Paddle Inference int8 of
the export. Each pair: logit cosine and the largest absolute difference relative to the
largest logit of the first. Not a timing benchmark.

Usage: python benchmarks/qat_agreement.py [--models resnet18,resnet34] [--targets x86,x86-vnni]
                                          [--steps 5] [--learning-rate 1e-3] [--learnable]
"""

from __future__ import annotations

import argparse
import logging
import tempfile

import numpy as np
import paddle

from imperative_ptq import ImperativePTQ, ImperativeQAT, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig, cpu_info
from imperative_ptq.export import create_predictor, predict, save_quantized_model

logger = logging.getLogger("benchmarks.qat_agreement")

SIZE = 32
CALIBRATION_BATCHES = 4
BATCH_SIZE = 8
TEST_IMAGES = 16


def _agreement(reference: np.ndarray, other: np.ndarray) -> str:
    a, b = reference.ravel().astype(np.float64), other.ravel().astype(np.float64)
    cosine = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    relative = np.abs(a - b).max() / np.abs(a).max()
    return f"{cosine:.6f} / {relative:.1e}"


def measure(name: str, target: str, steps: int, learning_rate: float, learnable: bool) -> str:
    """One table row: QAT vs simulation, QAT vs Paddle Inference, simulation vs Paddle Inference."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    model = getattr(paddle.vision.models, name)(num_classes=10)
    model.eval()
    batches = [
        paddle.to_tensor(rng.random((BATCH_SIZE, 3, SIZE, SIZE), np.float32))
        for _ in range(CALIBRATION_BATCHES)
    ]
    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), target=target))
    calibrated = ptq.quantize(model)
    ptq.calibrate(calibrated, batches, progress=False)
    qat = ImperativeQAT(ptq, learnable_scales=learnable)
    trainable = qat.quantize(calibrated)
    optimizer = paddle.optimizer.SGD(learning_rate, parameters=trainable.parameters())
    for step in range(steps):
        labels = paddle.to_tensor(rng.integers(0, 10, [BATCH_SIZE]))
        loss = paddle.nn.functional.cross_entropy(trainable(batches[step % len(batches)]), labels)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
    converted = qat.convert(trainable)
    trainable.eval()
    x = rng.random((TEST_IMAGES, 3, SIZE, SIZE), np.float32)
    with paddle.no_grad():
        fine_tuning = trainable(paddle.to_tensor(x)).numpy()
        simulated = converted(paddle.to_tensor(x)).numpy()
    with tempfile.TemporaryDirectory() as directory:
        prefix = f"{directory}/model"
        save_quantized_model(converted, prefix, [paddle.static.InputSpec([None, 3, SIZE, SIZE], "float32", "x")])
        ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    return (
        f"| {name} | {target} | {steps} | {'LSQ' if learnable else 'fixed'} | "
        f"{_agreement(fine_tuning, simulated)} | {_agreement(fine_tuning, ran)} | "
        f"{_agreement(simulated, ran)} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18")
    parser.add_argument("--targets", default="x86,x86-vnni")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--learnable", action="store_true", help="LSQ thresholds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"CPU: {cpu_info().describe()}")
    print("| model | target | steps | thresholds | QAT vs simulation | QAT vs Paddle Inference "
          "| simulation vs Paddle Inference |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for target in args.targets.split(","):
            print(measure(name, target, args.steps, args.learning_rate, args.learnable), flush=True)


if __name__ == "__main__":
    main()
