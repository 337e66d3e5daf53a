"""Quantization-aware fine-tuning and dynamic quantization on real MNIST: one table.

* QAT: LeNet trained in fp32, PTQ (KL or MSE activations, per-channel abs-max weights, ``x86``
  target, 1000 calibration images) at W8A8, W4A8 and W4A4, then ``ImperativeQAT`` fine-tuning
  (learnable thresholds, Adam, cosine decay, at most one epoch) from each PTQ result. Accuracy
  of the converted int8 simulations on the 10000 test images.
* Dynamic: ``MnistSequenceEncoder`` (rows as tokens) trained in fp32, ``quantize_dynamic``: top-1
  agreement with fp32 and accuracy in dygraph, in ONNX Runtime (``DynamicQuantizeLinear`` +
  ``MatMulInteger``) and in Paddle Inference (weight-only int8 program), and Linear weight
  bytes; row-by-row LSTM and GRU models (``RowRNN``) quantized dynamically, the same ways. No
  latency: this measures accuracy only.

Usage: ``python benchmarks/qat_dynamic.py [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import paddle

import imperative_ptq as ip
from imperative_ptq.datasets import load_mnist
from imperative_ptq.export import create_predictor, export_onnx, predict, save_quantized_model
from imperative_ptq.models import LeNet, MnistSequenceEncoder, train_classifier

#: (setting, activation algorithm): the package's default algorithms (KL activations,
#: per-channel abs-max weights) at three bit widths, and MSE activations at W4A4.
SETTINGS = (
    ("W8A8", 8, 8, "KL"), ("W4A8", 4, 8, "KL"), ("W4A4", 4, 4, "KL"), ("W4A4", 4, 4, "MSE"),
)
ACTIVATION_ALGORITHMS = {"KL": ip.KLQuantizer, "MSE": ip.MSEQuantizer}
SPEC = [paddle.static.InputSpec([None, 1, 28, 28], "float32", "x")]


def logits(model, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    with paddle.no_grad():
        return np.concatenate([
            model(paddle.to_tensor(images[i : i + batch])).numpy()
            for i in range(0, len(images), batch)
        ])


def accuracy(model, images: np.ndarray, labels: np.ndarray) -> float:
    return float((logits(model, images).argmax(1) == labels).mean())


def fine_tune(model, images, labels, epochs: float, learning_rate: float, seed: int = 0) -> None:
    """The user's training loop: Adam with cosine decay over ``epochs`` of ``images``."""
    batch_size = 128
    steps = int(epochs * len(images) / batch_size)
    schedule = paddle.optimizer.lr.CosineAnnealingDecay(learning_rate, steps)
    optimizer = paddle.optimizer.Adam(schedule, parameters=model.parameters())
    order = np.random.default_rng(seed).permutation(len(images))
    model.train()
    for step in range(steps):
        index = order[(step * batch_size) % len(images) :][:batch_size]
        loss = paddle.nn.functional.cross_entropy(
            model(paddle.to_tensor(images[index])), paddle.to_tensor(labels[index])
        )
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        schedule.step()
    model.eval()


def qat_rows(data, quick: bool) -> list[tuple[str, ...]]:
    paddle.seed(0)
    started = time.perf_counter()
    model = train_classifier(LeNet(), data.train_images, data.train_labels, epochs=1 if quick else 3)
    trained = time.perf_counter() - started
    fp32 = accuracy(model, data.test_images, data.test_labels)
    rows = [("LeNet", "fp32", f"{100 * fp32:.2f}", "", "", f"trained {1 if quick else 3} epochs in {trained:.0f} s")]
    calibration = [data.train_images[i : i + 100] for i in range(0, 1000, 100)]
    epochs = 0.25 if quick else 1.0
    for setting, weight_bits, activation_bits, algorithm in SETTINGS:
        ptq = ip.ImperativePTQ(ip.PTQConfig(
            ACTIVATION_ALGORITHMS[algorithm](quant_bits=activation_bits),
            ip.PerChannelAbsmaxQuantizer(quant_bits=weight_bits),
        ))
        calibrated = ptq.quantize(model)
        ptq.calibrate(calibrated, calibration, progress=False)
        qat = ip.ImperativeQAT(ptq, learnable_scales=True)
        trainable = qat.quantize(calibrated)
        ptq_accuracy = accuracy(ptq.convert(calibrated), data.test_images, data.test_labels)
        started = time.perf_counter()
        fine_tune(trainable, data.train_images, data.train_labels, epochs, 1e-3)
        seconds = time.perf_counter() - started
        qat_accuracy = accuracy(qat.convert(trainable), data.test_images, data.test_labels)
        rows.append(("LeNet", f"{setting} PTQ", f"{100 * ptq_accuracy:.2f}",
                     f"{100 * (ptq_accuracy - fp32):+.2f}", "", f"{algorithm} / per-channel abs-max"))
        rows.append(("LeNet", f"{setting} PTQ + QAT", f"{100 * qat_accuracy:.2f}",
                     f"{100 * (qat_accuracy - fp32):+.2f}", "",
                     f"{epochs:g} epoch, learnable thresholds, {seconds:.0f} s"))
    return rows


def _ort_session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _ort_logits(session, images: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([
        session.run(None, {name: images[i : i + 1000]})[0] for i in range(0, len(images), 1000)
    ])


class RowRNN(paddle.nn.Layer):
    """An LSTM or GRU reading an image's 28 rows as time steps; a Linear on the last hidden
    state."""

    def __init__(self, cell: str = "LSTM", hidden_size: int = 128) -> None:
        super().__init__()
        self.rnn = getattr(paddle.nn, cell)(28, hidden_size)
        self.head = paddle.nn.Linear(hidden_size, 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        outputs, _ = self.rnn(x.reshape([0, 28, 28]))
        return self.head(outputs[:, -1])


def recurrent_rows(data, quick: bool, cell: str) -> list[tuple[str, ...]]:
    """RowLSTM / RowGRU: fp32, dynamic in dygraph, in ONNX Runtime (``DynamicQuantizeLSTM``;
    a GRU as int8 weights computed in fp32) and as a weight-only Paddle Inference program."""
    paddle.seed(0)
    started = time.perf_counter()
    model = train_classifier(
        RowRNN(cell), data.train_images, data.train_labels, epochs=1 if quick else 2
    )
    trained = time.perf_counter() - started
    images, labels = data.test_images, data.test_labels
    reference = logits(model, images)
    dynamic = ip.quantize_dynamic(model, layer_types=(paddle.nn.Linear, getattr(paddle.nn, cell)))
    fp32_bytes = sum(
        int(np.prod(p.shape)) * 4 for name, p in model.named_parameters() if "weight" in name
    )
    int8_bytes = sum(
        int(np.prod(b.shape)) for name, b in dynamic.named_buffers() if name.endswith("weight_integers")
    )
    fp32 = float((reference.argmax(1) == labels).mean())
    name = f"Row{cell}"

    def row(mode: str, values: np.ndarray, note: str) -> tuple[str, ...]:
        correct = float((values.argmax(1) == labels).mean())
        agreement = float((values.argmax(1) == reference.argmax(1)).mean())
        return (name, mode, f"{100 * correct:.2f}", f"{100 * (correct - fp32):+.2f}",
                f"{100 * agreement:.2f}%", note)

    rows = [
        (name, "fp32", f"{100 * fp32:.2f}", "", "",
         f"trained {1 if quick else 2} epochs in {trained:.0f} s; weights {fp32_bytes / 1024:.0f} KiB"),
        row(f"dynamic ({cell} + Linear), dygraph", logits(dynamic, images),
            f"int8 weights {int8_bytes / 1024:.0f} KiB ({fp32_bytes / int8_bytes:.2f}x smaller)"),
    ]
    with tempfile.TemporaryDirectory() as directory:
        onnx_path = export_onnx(dynamic, os.path.join(directory, "dynamic.onnx"), SPEC)
        kernel = "DynamicQuantizeLSTM" if cell == "LSTM" else "int8 weights, fp32 GRU"
        rows.append(row(f"dynamic, ONNX Runtime ({kernel})", _ort_logits(_ort_session(onnx_path), images),
                        f"{os.path.getsize(onnx_path) / 1024:.0f} KiB .onnx"))
        rows.append(row("weight-only int8, Paddle Inference",
                        *_weight_only_logits(dynamic, images, directory)))
    return rows


def _weight_only_logits(
    dynamic: paddle.nn.Layer, images: np.ndarray, directory: str
) -> tuple[np.ndarray, str]:
    """The logits of ``dynamic``'s weight-only int8 Paddle program (saved in ``directory``) on
    ``images``, and the size of its weights file."""
    prefix = os.path.join(directory, "dynamic")
    save_quantized_model(dynamic, prefix, SPEC)
    predictor = create_predictor(prefix, int8=False)
    values = np.concatenate([
        predict(predictor, images[i : i + 1000])[0] for i in range(0, len(images), 1000)
    ])
    return values, f"{os.path.getsize(prefix + '.pdiparams') / 1024:.0f} KiB .pdiparams"


def dynamic_rows(data, quick: bool) -> list[tuple[str, ...]]:
    paddle.seed(0)
    started = time.perf_counter()
    model = train_classifier(
        MnistSequenceEncoder(), data.train_images, data.train_labels, epochs=1 if quick else 3,
        learning_rate=1e-3,
    )
    trained = time.perf_counter() - started
    images, labels = data.test_images, data.test_labels
    reference = logits(model, images)
    dynamic = ip.quantize_dynamic(model)
    fp32_bytes = sum(
        int(np.prod(layer.weight.shape)) * 4 for layer in model.sublayers()
        if isinstance(layer, paddle.nn.Linear)
    )
    int8_bytes = sum(
        int(np.prod(layer.weight_integers.shape)) for layer in dynamic.sublayers()
        if isinstance(layer, ip.DynamicQuantizedLinear)
    )

    fp32 = float((reference.argmax(1) == labels).mean())

    def row(name: str, values: np.ndarray, note: str = "") -> tuple[str, ...]:
        correct = float((values.argmax(1) == labels).mean())
        agreement = float((values.argmax(1) == reference.argmax(1)).mean())
        return ("MnistSequenceEncoder", name, f"{100 * correct:.2f}", f"{100 * (correct - fp32):+.2f}",
                f"{100 * agreement:.2f}%", note)

    rows = [
        ("MnistSequenceEncoder", "fp32", f"{100 * fp32:.2f}", "", "",
         f"trained {1 if quick else 3} epochs in {trained:.0f} s; Linear weights "
         f"{fp32_bytes / 1024:.0f} KiB"),
        row("dynamic, dygraph", logits(dynamic, images),
            f"int8 Linear weights {int8_bytes / 1024:.0f} KiB ({fp32_bytes / int8_bytes:.2f}x smaller)"),
    ]
    with tempfile.TemporaryDirectory() as directory:
        onnx_path = export_onnx(dynamic, os.path.join(directory, "dynamic.onnx"), SPEC)
        session = _ort_session(onnx_path)
        rows.append(row("dynamic, ONNX Runtime", _ort_logits(session, images),
                        f"{os.path.getsize(onnx_path) / 1024:.0f} KiB .onnx"))
        rows.append(row("weight-only int8, Paddle Inference",
                        *_weight_only_logits(dynamic, images, directory)))
    return rows


def print_table(rows: list[tuple[str, ...]]) -> None:
    print("| model | mode | test accuracy (%) | vs fp32 (points) | top-1 agreement with fp32 | notes |")
    print("|---|---|---|---|---|---|")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter training (a smoke run)")
    args = parser.parse_args()
    data = load_mnist()
    print(f"CPU: {ip.cpu_info().describe()}")
    rows = qat_rows(data, args.quick) + dynamic_rows(data, args.quick)
    for cell in ("LSTM", "GRU"):
        rows += recurrent_rows(data, args.quick, cell)
    print_table(rows)


if __name__ == "__main__":
    main()
