"""Accuracy beyond plain PTQ, on real MNIST: AdaRound, bias correction and cross-layer
equalization against plain rounding, in the dygraph simulation and in Paddle Inference int8.

Tables:

* **W4A8**: 4-bit per-channel weights, 8-bit activations (MSE thresholds, the demo's default)
  on the demo's MLP and convnet (``demos/mnist_ptq.py``; cached weights): plain rounding,
  AdaRound, AdaRound + bias correction.
* **Depthwise int8**: a MobileNetV2-style net (:class:`imperative_ptq.models.MnistMobileNet`,
  trained here on first use and cached next to the demo's) with per-channel and per-tensor
  8-bit weights, and 5-bit per-tensor weights (where one range must serve channels of very
  different widths): plain, bias correction, cross-layer equalization (CLE), CLE + bias
  correction (empirical, and the one-pass analytical variant).
* **ReLU6 depthwise**: the same net with MobileNetV2's ReLU6 (``relu6=True``): plain, CLE
  (which skips every pair with a ReLU6 between), CLE through per-channel clips
  (``equalization="clip"``, the fp32 function kept), and that + bias correction.

* **Transformer**: a small encoder reading MNIST rows as a 28-token sequence
  (:class:`imperative_ptq.models.MnistSequenceEncoder`, trained here on first use), with
  outlier channels injected into its LayerNorm outputs without changing its function (the
  way LLM.int8 / SmoothQuant describe them): int8 with and without SmoothQuant, per target,
  in the simulation.
* **Budget**: ``quantize_with_accuracy_control`` on the depthwise net with 5-bit per-tensor
  weights and the MLP with 4-bit weights, choosing on validation images.
* **OCR**: a real PP-OCRv4 text recognizer converted from ONNX with x2paddle
  (``benchmarks/ocr_recognizer.py``; ``pip install -e ".[bench]"``), calibrated on 25
  rendered text lines and read on 200 others: exact match (percent, in the accuracy columns)
  and character error rate, fp32 against default PTQ (KL + per-channel) and against it with
  bias correction, per x86 target, in the simulation and in Paddle Inference int8; and ``quantize_with_accuracy_control`` for
  ``x86-vnni`` within 2 points, choosing on 100 further lines.

BatchNorms are folded into their convs in every configuration (CLE folds the ones it
equalizes; the others are folded through ``quantize(fuse=True)``), as Paddle Inference does.
Prints a markdown table with the CPU it ran on.

    python benchmarks/accuracy.py                      # every table, ~75 min on 2 cores
    python benchmarks/accuracy.py --tables relu6       # ~4 min, plus ~4 to train its net once
    python benchmarks/accuracy.py --tables w4a8 --models mlp --adaround-iterations 200
    python benchmarks/accuracy.py --tables ocr         # ~45 min on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import logging
import os
import sys
import tempfile
from typing import Sequence

import numpy as np
import paddle

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
DEMOS = os.path.join(os.path.dirname(BENCHMARKS), "demos")
sys.path.insert(0, DEMOS)
sys.path.insert(0, BENCHMARKS)
import mnist_ptq as demo  # noqa: E402
import ocr_recognizer as ocr  # noqa: E402

from imperative_ptq import (  # noqa: E402
    AbsmaxQuantizer,
    quantize_with_accuracy_control,
    ImperativePTQ,
    KLQuantizer,
    MSEQuantizer,
    PerChannelAbsmaxQuantizer,
    PTQConfig,
    cpu_info,
)
from imperative_ptq.algorithms import AdaRound  # noqa: E402
from imperative_ptq.datasets import MNIST, load_mnist  # noqa: E402
from imperative_ptq.export import create_predictor, predict  # noqa: E402
from imperative_ptq.algorithms import SmoothQuant  # noqa: E402
from imperative_ptq.models import (  # noqa: E402
    MnistMobileNet,
    MnistSequenceEncoder,
)

TABLES = ("w4a8", "depthwise", "relu6", "transformer", "budget", "ocr")
#: The OCR budget row's largest acceptable exact-match drop, in points.
OCR_MAX_DROP = 2.0
#: Tables measured on MNIST (the others bring their own data).
MNIST_TABLES = ("w4a8", "depthwise", "relu6", "transformer", "budget")
#: The depthwise net's training recipe (about 3 minutes on 2 cores).
MOBILENET = demo.Recipe(lambda: MnistMobileNet(width=8), epochs=3, batch_size=128)
#: The same with ReLU6 activations.
MOBILENET_RELU6 = demo.Recipe(lambda: MnistMobileNet(width=8, relu6=True), epochs=3, batch_size=128)
#: The transformer's training recipe (about 2.5 minutes on 2 cores).
ENCODER = demo.Recipe(MnistSequenceEncoder, epochs=3, batch_size=128)
#: LayerNorm channels made outliers, and by how much (LLM.int8 / SmoothQuant describe a few
#: channels tens of times wider than the rest).
OUTLIER_CHANNELS, OUTLIER_FACTOR = (5, 21, 40), 30.0


@dataclasses.dataclass
class Row:
    """One configuration's accuracy (percent) on the test images."""

    table: str
    model: str
    weights: str
    algorithms: str
    simulated: float
    inference: float | None
    fp32: float

    @property
    def drop(self) -> float:
        return self.fp32 - self.simulated


def trained_mobilenet(cache_dir: str) -> paddle.nn.Layer:
    """The depthwise net, trained with a fixed seed on first use and cached afterwards."""
    return demo.trained(MOBILENET, "mobilenet", cache_dir)


def trained_mobilenet_relu6(cache_dir: str) -> paddle.nn.Layer:
    """The ReLU6 depthwise net, trained with a fixed seed on first use and cached afterwards."""
    return demo.trained(MOBILENET_RELU6, "mobilenet_relu6", cache_dir)


def trained_encoder(cache_dir: str) -> paddle.nn.Layer:
    """The MNIST-rows transformer, trained with a fixed seed on first use and cached."""
    return demo.trained(ENCODER, "encoder", cache_dir)


def inject_outliers(
    model: paddle.nn.Layer, groups: Sequence[Sequence[str]], channels: Sequence[int],
    factor: float,
) -> paddle.nn.Layer:
    """Makes ``channels`` of each group's LayerNorm output ``factor`` times wider and divides
    the rows of the Linears reading them by ``factor``: the fp32 function is unchanged (the
    reverse of SmoothQuant), the activations get the outliers large language models show."""
    layers = dict(model.named_sublayers())
    index = np.asarray(channels)
    with paddle.no_grad():
        for norm_name, *linears in groups:
            norm = layers[norm_name]
            for parameter in (norm.weight, norm.bias):
                value = parameter.numpy()
                value[index] *= factor
                parameter.set_value(value)
            for name in linears:
                weight = layers[name].weight.numpy()
                weight[index, :] /= factor
                layers[name].weight.set_value(weight)
    return model


def norm_pairs(model: paddle.nn.Layer) -> list[list[str]]:
    """``[conv, batch_norm]`` name pairs of consecutive children of a Sequential."""
    children = list(model.named_children()) if isinstance(model, paddle.nn.Sequential) else []
    return [
        [name, next_name]
        for (name, layer), (next_name, following) in zip(children, children[1:])
        if isinstance(layer, paddle.nn.Conv2D) and isinstance(following, paddle.nn.BatchNorm2D)
    ]


def quantized_accuracy(
    model: paddle.nn.Layer,
    config: PTQConfig,
    data: MNIST,
    calibration: Sequence[np.ndarray],
    test_size: int,
    inference: bool,
) -> tuple[float, float | None]:
    """Calibrates, converts (running the config's algorithms) and measures test accuracy in
    the simulation and, with ``inference``, in Paddle Inference int8."""
    ptq = ImperativePTQ(config)
    pairs = [] if config.equalization else norm_pairs(model)
    qmodel = ptq.quantize(model, fuse=bool(pairs), fuse_list=pairs or None)
    ptq.calibrate(qmodel, calibration, progress=False)
    ptq.convert(qmodel, progress=False)
    images, labels = data.test_images[:test_size], data.test_labels[:test_size]
    simulated = demo.accuracy(demo.dygraph_predictor(qmodel), images, labels)
    if not inference:
        return simulated, None
    with tempfile.TemporaryDirectory() as directory:
        prefix = os.path.join(directory, "model")
        ptq.save_quantized_model(
            qmodel, prefix, [paddle.static.InputSpec([None, 1, 28, 28], "float32", "x")]
        )
        predictor = create_predictor(prefix)
        ran = demo.accuracy(lambda x: predict(predictor, x)[0], images, labels)
    return simulated, ran


def w4a8_rows(data: MNIST, models: Sequence[str], args: argparse.Namespace) -> list[Row]:
    calibration = _calibration(data, args.calibration_size)
    adaround = AdaRound(iterations=args.adaround_iterations)
    rows = []
    for name in models:
        model = demo.trained_model(name, args.cache_dir)
        fp32 = demo.accuracy(demo.dygraph_predictor(model), data.test_images[: args.test_size],
                             data.test_labels[: args.test_size])
        for label, algorithms in (
            ("plain rounding", {}),
            ("AdaRound", {"adaround": adaround}),
            ("AdaRound + bias correction", {"adaround": adaround, "bias_correction": True}),
        ):
            config = PTQConfig(MSEQuantizer(), PerChannelAbsmaxQuantizer(4), **algorithms)
            simulated, ran = quantized_accuracy(
                model, config, data, calibration, args.test_size, args.inference
            )
            rows.append(Row("W4A8", name, "4-bit per-channel", label, simulated, ran, fp32))
            logging.info("%s", rows[-1])
    return rows


#: Weight schemes of the depthwise tables.
DEPTHWISE_WEIGHTS = (
    ("8-bit per-channel", PerChannelAbsmaxQuantizer()),
    ("8-bit per-tensor", AbsmaxQuantizer()),
    ("5-bit per-tensor", AbsmaxQuantizer(5)),
)


def depthwise_rows(data: MNIST, args: argparse.Namespace) -> list[Row]:
    return _algorithm_rows(data, args, trained_mobilenet(args.cache_dir), "depthwise", (
        ("plain", {}),
        ("bias correction", {"bias_correction": True}),
        ("CLE", {"equalization": True}),
        ("CLE + bias correction", {"equalization": True, "bias_correction": True}),
        ("CLE + analytical bias correction",
         {"equalization": True, "bias_correction": "analytical"}),
    ))


def relu6_rows(data: MNIST, args: argparse.Namespace) -> list[Row]:
    return _algorithm_rows(data, args, trained_mobilenet_relu6(args.cache_dir), "depthwise ReLU6", (
        ("plain", {}),
        ("CLE (ReLU6 pairs skipped)", {"equalization": True}),
        ("CLE through clips", {"equalization": "clip"}),
        ("CLE through clips + bias correction",
         {"equalization": "clip", "bias_correction": True}),
    ))


def _algorithm_rows(
    data: MNIST, args: argparse.Namespace, model: paddle.nn.Layer, name: str,
    variants: Sequence[tuple[str, dict]],
) -> list[Row]:
    """One row per weight scheme of :data:`DEPTHWISE_WEIGHTS` and algorithm variant (MSE
    activations)."""
    calibration = _calibration(data, args.calibration_size)
    fp32 = demo.accuracy(demo.dygraph_predictor(model), data.test_images[: args.test_size],
                         data.test_labels[: args.test_size])
    rows = []
    for weights, quantizer in DEPTHWISE_WEIGHTS:
        for label, algorithms in variants:
            config = PTQConfig(MSEQuantizer(), quantizer, **algorithms)
            simulated, ran = quantized_accuracy(
                model, config, data, calibration, args.test_size, args.inference
            )
            rows.append(Row("int8", name, weights, label, simulated, ran, fp32))
            logging.info("%s", rows[-1])
    return rows


def transformer_rows(data: MNIST, args: argparse.Namespace) -> list[Row]:
    """int8 with and without SmoothQuant on the encoder with injected outliers, per target
    (simulation only: the x86 targets' Paddle fc arithmetic is simulated, arm's is not run)."""
    calibration = _calibration(data, args.calibration_size)
    model = trained_encoder(args.cache_dir)
    images, labels = data.test_images[: args.test_size], data.test_labels[: args.test_size]
    fp32 = demo.accuracy(demo.dygraph_predictor(model), images, labels)
    groups = model.smoothing_groups()
    inject_outliers(model, groups, OUTLIER_CHANNELS, OUTLIER_FACTOR)
    with_outliers = demo.accuracy(demo.dygraph_predictor(model), images, labels)
    logging.info("encoder fp32 %.2f, with injected outliers %.2f", fp32, with_outliers)
    rows = []
    for target in ("arm", "x86-vnni", "x86"):
        for activation_name, activation in (("abs-max", AbsmaxQuantizer), ("MSE", MSEQuantizer)):
            for label, algorithms in (
                ("plain", {}), ("SmoothQuant", {"smooth_quant": SmoothQuant(groups=groups)})
            ):
                config = PTQConfig(activation(), PerChannelAbsmaxQuantizer(), target=target,
                                   **algorithms)
                ptq = ImperativePTQ(config)
                qmodel = ptq.quantize(model)
                ptq.calibrate(qmodel, calibration, progress=False)
                ptq.convert(qmodel, progress=False)
                simulated = demo.accuracy(demo.dygraph_predictor(qmodel), images, labels)
                rows.append(Row(
                    "transformer", f"encoder ({target})", f"8-bit, {activation_name} activations",
                    label, simulated, None, with_outliers,
                ))
                logging.info("%s", rows[-1])
    return rows


def budget_rows(data: MNIST, args: argparse.Namespace) -> list[Row]:
    """``quantize_with_accuracy_control`` on the configurations plain PTQ handles worst: it
    chooses on 2000 validation images, the row reports the test accuracy of its choice."""
    calibration = _calibration(data, args.calibration_size)
    val_images = paddle.to_tensor(data.val_images[:2000])
    val_labels = data.val_labels[:2000]

    def evaluate(model: paddle.nn.Layer) -> float:
        with paddle.no_grad():
            return float((model(val_images).numpy().argmax(1) == val_labels).mean() * 100)

    rows = []
    for name, model, weights, quantizer, max_drop in (
        ("depthwise", trained_mobilenet(args.cache_dir), "5-bit per-tensor", AbsmaxQuantizer(5),
         0.3),
        ("mlp", demo.trained_model("mlp", args.cache_dir), "4-bit per-channel",
         PerChannelAbsmaxQuantizer(4), 0.1),
    ):
        pairs = norm_pairs(model)
        result = quantize_with_accuracy_control(
            model, calibration, evaluate, max_drop, PTQConfig(MSEQuantizer(), quantizer),
            fuse_list=pairs or None,
        )
        logging.info("%s accuracy control:\n%s", name, result.summary())
        images, labels = data.test_images[: args.test_size], data.test_labels[: args.test_size]
        tried = ", ".join(f"{c.name} {c.metric:.2f}" for c in result.candidates if c.metric is not None)
        rows.append(Row(
            "budget", name, weights,
            f"max_drop {max_drop} on validation: tried {tried}; chose {result.chosen.name}, "
            f"{len(result.skip)} layers fp32",
            demo.accuracy(demo.dygraph_predictor(result.model), images, labels), None,
            demo.accuracy(demo.dygraph_predictor(model), images, labels),
        ))
        logging.info("%s", rows[-1])
    return rows


def ocr_rows(args: argparse.Namespace) -> list[Row]:
    """The PP-OCRv4 recognizer (converted with x2paddle, cached in ``--cache-dir``): exact
    match in percent on rendered lines, fp32 against default PTQ (KL + per-channel weights),
    and the same with bias correction, per x86 target; the character error rates are in the
    algorithms column."""
    onnx_path = args.ocr_model or ocr.recognizer_onnx()
    classes = ocr.characters(onnx_path)
    model = ocr.converted_recognizer(onnx_path, args.cache_dir)
    name = os.path.splitext(os.path.basename(onnx_path))[0]
    calibration, _ = ocr.rendered_lines(args.ocr_calibration_lines, ocr.CALIBRATION_SEED)
    images, labels = ocr.rendered_lines(args.ocr_test_lines, ocr.TEST_SEED)
    fp32 = ocr.score(ocr.recognize(ocr.dygraph_runner(model), images, classes), labels)
    logging.info("%s fp32: %s", name, fp32)
    rows = []
    for target, bias_correction in itertools.product(("x86", "x86-avx2", "x86-vnni"), (False, True)):
        ptq = ImperativePTQ(PTQConfig(
            KLQuantizer(), PerChannelAbsmaxQuantizer(), target=target, bias_correction=bias_correction,
        ))
        qmodel = ptq.quantize(model)
        ptq.calibrate(qmodel, [calibration[i : i + 8] for i in range(0, len(calibration), 8)],
                      progress=False)
        ptq.convert(qmodel, progress=False)
        simulated = ocr.score(ocr.recognize(ocr.dygraph_runner(qmodel), images, classes), labels)
        ran = _ocr_in_paddle_inference(ptq, qmodel, images, labels, classes) if args.inference else None
        cer = f"CER fp32 {fp32.cer:.3f}, simulation {simulated.cer:.3f}"
        if ran is not None:
            cer += f", Paddle Inference {ran.cer:.3f}"
        algorithms = "KL + bias correction" if bias_correction else "KL (default)"
        rows.append(Row(
            "ocr", f"{name} ({target}{', bias correction' if bias_correction else ''})", "8-bit per-channel",
            f"{algorithms}; {cer}",
            100 * simulated.exact_match, None if ran is None else 100 * ran.exact_match,
            100 * fp32.exact_match,
        ))
        logging.info("%s", rows[-1])
    rows.append(_ocr_budget_row(args, model, name, calibration, images, labels, classes, fp32))
    return rows


def _ocr_budget_row(
    args: argparse.Namespace, model: paddle.nn.Layer, name: str, calibration: np.ndarray,
    images: np.ndarray, labels: Sequence[str], classes: Sequence[str], fp32: ocr.Score,
) -> Row:
    """``quantize_with_accuracy_control`` on the recognizer for ``x86-vnni`` (every conv and
    matmul int8): it chooses on separate validation lines, the row reports the test lines."""
    validation, validation_labels = ocr.rendered_lines(args.ocr_test_lines // 2, ocr.VALIDATION_SEED)

    def exact_match(candidate: paddle.nn.Layer) -> float:
        texts = ocr.recognize(ocr.dygraph_runner(candidate), validation, classes)
        return 100 * ocr.score(texts, validation_labels).exact_match

    config = PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), target="x86-vnni")
    result = quantize_with_accuracy_control(
        model, [calibration[i : i + 8] for i in range(0, len(calibration), 8)], exact_match,
        OCR_MAX_DROP, config,
    )
    logging.info("%s accuracy control:\n%s", name, result.summary())
    chosen = ocr.score(ocr.recognize(ocr.dygraph_runner(result.model), images, classes), labels)
    ran = (
        _ocr_in_paddle_inference(ImperativePTQ(config), result.model, images, labels, classes)
        if args.inference else None
    )
    tried = ", ".join(f"{c.name} {c.metric:.1f}" for c in result.candidates if c.metric is not None)
    kept = f" ({', '.join(result.skip)})" if result.skip else ""
    cer = f"CER simulation {chosen.cer:.3f}" + ("" if ran is None else f", Paddle Inference {ran.cer:.3f}")
    return Row(
        "ocr", f"{name} (x86-vnni, budget)", "8-bit per-channel",
        f"max_drop {OCR_MAX_DROP} on validation lines: tried {tried}; chose "
        f"{result.chosen.name}, {len(result.skip)} layers fp32{kept}; {cer}",
        100 * chosen.exact_match, None if ran is None else 100 * ran.exact_match,
        100 * fp32.exact_match,
    )


def _ocr_in_paddle_inference(
    ptq: ImperativePTQ, qmodel: paddle.nn.Layer, images: np.ndarray, labels: Sequence[str],
    classes: Sequence[str],
) -> ocr.Score | None:
    """The converted recognizer exported and read in Paddle Inference int8; ``None`` (and the
    reason logged) where the export or the predictor fails."""
    with tempfile.TemporaryDirectory() as directory:
        prefix = os.path.join(directory, "model")
        try:
            ptq.save_quantized_model(qmodel, prefix, [
                paddle.static.InputSpec([None, 3, ocr.HEIGHT, ocr.WIDTH], "float32", "x")
            ])
            predictor = create_predictor(prefix)
            texts = ocr.recognize(lambda x: predict(predictor, x)[0], images, classes)
        except Exception as error:  # noqa: BLE001 - a benchmark row, not a crash
            logging.warning("the recognizer in Paddle Inference int8 failed: %s: %s",
                            type(error).__name__, error)
            return None
    return ocr.score(texts, labels)


def _calibration(data: MNIST, size: int, batch_size: int = 64) -> list[np.ndarray]:
    images = data.train_images[:size]
    return [images[i : i + batch_size] for i in range(0, len(images), batch_size)]


def markdown(rows: Sequence[Row]) -> str:
    """The rows as one markdown table."""
    lines = [
        "| model | weights | algorithms | fp32 | simulation | drop | Paddle Inference int8 |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        ran = "-" if row.inference is None else f"{row.inference:.2f}"
        lines.append(
            f"| {row.model} | {row.weights} | {row.algorithms} | {row.fp32:.2f} | "
            f"{row.simulated:.2f} | {row.drop:+.2f} | {ran} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", default=",".join(TABLES),
                        help=f"comma-separated, of {', '.join(TABLES)}")
    parser.add_argument("--models", default="mlp,convnet", help="W4A8 models: mlp, convnet")
    parser.add_argument("--calibration-size", type=int, default=512,
                        help="training images to calibrate on (batches of 64)")
    parser.add_argument("--test-size", type=int, default=10000, help="test images")
    parser.add_argument("--adaround-iterations", type=int, default=1000)
    parser.add_argument("--ocr-calibration-lines", type=int, default=25,
                        help="rendered text lines the OCR recognizer calibrates on")
    parser.add_argument("--ocr-test-lines", type=int, default=200,
                        help="rendered text lines the OCR recognizer is scored on")
    parser.add_argument("--ocr-model", default=None,
                        help="ONNX text recognizer with a 'character' dictionary in its metadata "
                        "(default: rapidocr_onnxruntime's ch_PP-OCRv4_rec)")
    parser.add_argument("--no-inference", dest="inference", action="store_false",
                        help="skip the Paddle Inference int8 column")
    parser.add_argument("--cache-dir", default=os.path.join(DEMOS, ".cache"),
                        help="trained fp32 weights (shared with demos/mnist_ptq.py) and the "
                        "converted OCR recognizer")
    args = parser.parse_args(argv)
    tables = [t.strip() for t in args.tables.split(",") if t.strip()]
    if not tables or any(t not in TABLES for t in tables):
        parser.error(f"--tables takes {', '.join(TABLES)}, got {args.tables!r}")
    args.tables = tables
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if any(m not in ("mlp", "convnet") for m in args.models):
        parser.error(f"--models takes mlp, convnet, got {args.models}")
    return args


def run(args: argparse.Namespace) -> list[Row]:
    """Every row the arguments ask for."""
    data = load_mnist() if any(table in MNIST_TABLES for table in args.tables) else None
    rows: list[Row] = []
    if "w4a8" in args.tables:
        rows += w4a8_rows(data, args.models, args)
    if "depthwise" in args.tables:
        rows += depthwise_rows(data, args)
    if "relu6" in args.tables:
        rows += relu6_rows(data, args)
    if "transformer" in args.tables:
        rows += transformer_rows(data, args)
    if "budget" in args.tables:
        rows += budget_rows(data, args)
    if "ocr" in args.tables:
        rows += ocr_rows(args)
    return rows


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    rows = run(args)
    setup = [str(datetime.date.today()), cpu_info().describe()]
    if any(table in MNIST_TABLES for table in args.tables):
        setup.append(f"calibration {args.calibration_size} images, test {args.test_size} images,"
                     f" AdaRound {args.adaround_iterations} steps")
    if "ocr" in args.tables:
        setup.append(f"OCR: calibration {args.ocr_calibration_lines} lines, test "
                     f"{args.ocr_test_lines} lines, exact match in percent")
    sys.stdout.write(f"{' · '.join(setup)}\n\n{markdown(rows)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
