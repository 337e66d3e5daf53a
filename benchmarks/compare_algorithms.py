"""Every calibration algorithm on the two MNIST models, next to Paddle's built-in PTQ and PyTorch.

For each activation algorithm x weight scheme, the int8 test accuracy of the trained MLP and
LeNet from ``demos/mnist_ptq.py`` (cached weights; trained through that demo on first use):

* imperative_ptq in dygraph simulation (``ImperativePTQ.convert``), every configuration;
* imperative_ptq in Paddle Inference int8 (``save_quantized_model`` + ``create_predictor``) for
  the configurations in ``--inference``;
* Paddle's built-in ``paddle.quantization.ImperativePTQ`` in fake-quant simulation for the
  algorithms it has (abs_max, hist, KL);
* PyTorch eager-mode static PTQ (``torch.ao.quantization``, x86 backend, default qconfig) on the
  same weights, with its state-dict size and latency measured next to Paddle Inference's,
  interleaved in one process.

A configuration that loses more than ``--tolerance`` points is diagnosed: per quantized layer, its
input threshold against the abs-max threshold and the fraction of non-zero calibration
activations it clips, and the accuracy with the most-clipping layer's threshold raised to its
abs-max.

    python benchmarks/compare_algorithms.py                                # everything, ~3-4 min
    python benchmarks/compare_algorithms.py --models mlp --calibration-size 200 --no-torch
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import logging
import os
import sys
import time
import warnings
from typing import Callable, Iterator, Sequence

import numpy as np
import paddle

#: The MNIST demo's folder: it owns the models, their trained-weights cache and the timing.
DEMOS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demos")
sys.path.insert(0, DEMOS)
import mnist_ptq as demo  # noqa: E402

from imperative_ptq import ImperativePTQ, PTQConfig  # noqa: E402
from imperative_ptq.datasets import MNIST, load_mnist  # noqa: E402
from imperative_ptq.export import save_fp32_model  # noqa: E402
from imperative_ptq.models import Reshape, SpaceToDepth  # noqa: E402

# LeNet is the classic CNN the built-in and torch.ao comparisons were first run on; the
# convnet (demo default) is accepted too but adds a minute and a half of training.
COMPARED_MODELS = ("mlp", "lenet")
ACTIVATIONS = ("abs_max", "hist", "kl", "kl_tensorrt", "mse", "moving_average")
WEIGHTS = ("abs_max", "per_channel")
#: Configurations also run in Paddle Inference int8 (the defaults one would deploy).
INFERENCE_CONFIGS = (("kl", "per_channel"), ("mse", "per_channel"), ("abs_max", "per_channel"))
#: Paddle Inference int8 program used for the latency table (latency does not depend on the
#: thresholds).
LATENCY_CONFIG = ("mse", "per_channel")
#: Activation algorithms Paddle's built-in ImperativePTQ has.
BUILTIN_ACTIVATIONS = ("abs_max", "hist", "kl")
SPEC = [paddle.static.InputSpec([None, 1, 28, 28], "float32", "image")]
CALIBRATION_BATCH = 100

ENGINE_SIM = "imperative_ptq dygraph"
ENGINE_INFERENCE = "imperative_ptq Paddle Inference int8"
ENGINE_BUILTIN = "paddle.quantization dygraph"
ENGINE_TORCH = "torch.ao x86"

logger = logging.getLogger("compare_algorithms")


@dataclasses.dataclass
class AccuracyRow:
    """One model's test accuracy under one engine and configuration."""

    model: str
    engine: str
    activation: str
    weights: str
    accuracy: float
    fp32_accuracy: float

    @property
    def delta(self) -> float:
        return self.accuracy - self.fp32_accuracy


@dataclasses.dataclass
class DeploymentRow:
    """Size and latency of one deployable model."""

    model: str
    engine: str
    accuracy: float
    size_kb: float
    latency_ms: dict[int, float]


@dataclasses.dataclass
class LayerDiagnosis:
    """Why a configuration loses accuracy: one quantized layer's input threshold."""

    model: str
    activation: str
    weights: str
    layer: str
    threshold: float
    abs_max: float
    clipped_percent: float  # of the non-zero calibration inputs of the layer


@dataclasses.dataclass
class Repair:
    """Accuracy of a lossy configuration with the input thresholds of ``layers`` (and only
    those) raised to their abs-max."""

    model: str
    activation: str
    weights: str
    layers: list[str]
    accuracy_before: float
    accuracy_after: float


@dataclasses.dataclass
class Comparison:
    """Everything :func:`compare` measured."""

    fp32: dict[str, float]
    accuracy: list[AccuracyRow]
    deployment: list[DeploymentRow]
    diagnoses: list[LayerDiagnosis]
    repairs: list[Repair]
    torch_fp32_mismatches: dict[str, int]  # test predictions where torch fp32 != Paddle fp32
    settings: dict[str, object]


# ------------------------------------------------------------------------------ imperative_ptq
def calibrate_ours(
    model: paddle.nn.Layer, activation: str, weights: str, images: np.ndarray
) -> tuple[ImperativePTQ, paddle.nn.Layer]:
    """imperative_ptq calibration of ``model`` on ``images``; the model is not converted yet."""
    config = PTQConfig(demo.ACTIVATION_ALGORITHMS[activation](), demo.WEIGHT_ALGORITHMS[weights]())
    ptq = ImperativePTQ(config)
    qmodel = ptq.quantize(model)
    batches = [images[i : i + CALIBRATION_BATCH] for i in range(0, len(images), CALIBRATION_BATCH)]
    ptq.calibrate(qmodel, batches, progress=False)
    return ptq, qmodel


# --------------------------------------------------------------------- Paddle's built-in PTQ
def builtin_config(activation: str, weights: str):
    """A ``paddle.quantization.PTQConfig`` (imported lazily: Paddle's module is legacy)."""
    from paddle.quantization import (
        AbsmaxQuantizer,
        KLQuantizer,
        PerChannelAbsmaxQuantizer,
    )
    from paddle.quantization import PTQConfig as PaddlePTQConfig

    activations = {"abs_max": AbsmaxQuantizer, "hist": _numpy2_hist_quantizer(), "kl": KLQuantizer}
    weight_types = {"abs_max": AbsmaxQuantizer, "per_channel": PerChannelAbsmaxQuantizer}
    return PaddlePTQConfig(activations[activation](), weight_types[weights]())


def _numpy2_hist_quantizer():
    """Paddle's ``HistQuantizer`` with its numpy-2 crash fixed and nothing else changed.

    Paddle 3.3.1 computes ``float((index - 0.5) * width)`` where ``index`` is the 1-element array
    ``np.argwhere(...)[0]``; numpy 2 refuses ``float()`` of an array with ``ndim > 0``. Taking
    ``index[0]`` gives the same number. (Like the original, the threshold is negative if the first
    bin already holds ``hist_percent`` of the mass.)
    """
    from paddle.quantization import HistQuantizer

    class Numpy2HistQuantizer(HistQuantizer):
        def cal_thresholds(self):
            for abs_max, hist in zip(self.abs_max_vals, self.hists):
                if hist is None:
                    self.thresholds.append(abs_max)
                    continue
                cumulative = np.cumsum(hist / np.sum(hist, dtype=np.float64))
                index = int(np.argwhere(cumulative >= self.hist_percent)[0][0])
                self.thresholds.append(float((index - 0.5) * (abs_max / hist.shape[0])))

    return Numpy2HistQuantizer


def run_builtin(
    model: paddle.nn.Layer, activation: str, weights: str, images: np.ndarray
) -> paddle.nn.Layer:
    """Paddle's built-in PTQ: quantize, calibrate, ``_convert``; returns the fake-quant model.

    Its ``save_quantized_model`` does not work in 3.3.1, but ``_convert`` does: it swaps
    Conv2D/Linear for ``QuantizedConv2D``/``QuantizedLinear`` whose input fake-quant holds the
    calibrated threshold. Those layers are created in training mode, where the input fake-quant
    would keep updating its scale as a moving average of the test batches, so the model must be
    put back in ``eval()``. Outputs keep their thresholds only as attributes (as ours do).
    """
    from paddle.quantization import ImperativePTQ as PaddleImperativePTQ

    ptq = PaddleImperativePTQ(builtin_config(activation, weights))
    qmodel = ptq.quantize(model)  # a deep copy; model is already in eval mode
    with paddle.no_grad():
        for i in range(0, len(images), CALIBRATION_BATCH):
            qmodel(paddle.to_tensor(images[i : i + CALIBRATION_BATCH]))
    ptq._convert(qmodel)
    qmodel.eval()
    return qmodel


# --------------------------------------------------------------------------------- PyTorch
def torch_model(name: str, model: paddle.nn.Layer):
    """An fp32 torch module with ``model``'s weights, conv+bn+relu and linear+relu fused, with
    Quant/DeQuant stubs, in eval mode."""
    import torch
    from torch import nn
    from torch.ao.quantization import DeQuantStub, QuantStub, fuse_modules

    class TorchReshape(nn.Module):
        def __init__(self, shape: list[int]) -> None:
            super().__init__()
            self.shape = shape

        def forward(self, x):
            return x.reshape(self.shape)

    class Net(nn.Module):
        def __init__(self, layers: list[tuple[str, nn.Module]]) -> None:
            super().__init__()
            self.quant = QuantStub()
            self.names = [layer_name for layer_name, _ in layers]
            for layer_name, layer in layers:
                setattr(self, layer_name, layer)
            self.dequant = DeQuantStub()

        def forward(self, x):
            x = self.quant(x)
            for layer_name in self.names:
                x = getattr(self, layer_name)(x)
            return self.dequant(x)

    layers: list[tuple[str, nn.Module]] = []
    for layer_name, layer in model.named_children():
        if isinstance(layer, paddle.nn.Linear):
            in_features, out_features = layer.weight.shape
            layers.append((layer_name, nn.Linear(in_features, out_features)))
        elif isinstance(layer, paddle.nn.Conv2D):
            layers.append((layer_name, nn.Conv2d(
                layer._in_channels, layer._out_channels, layer._kernel_size,
                stride=layer._stride, padding=layer._padding, bias=layer.bias is not None,
            )))
        elif isinstance(layer, SpaceToDepth):
            layers.append((layer_name, nn.PixelUnshuffle(layer.block)))  # same channel order
        elif isinstance(layer, Reshape):
            layers.append((layer_name, TorchReshape(layer.shape)))
        elif isinstance(layer, paddle.nn.BatchNorm2D):
            layers.append((layer_name, nn.BatchNorm2d(layer.weight.shape[0], eps=layer._epsilon)))
        elif isinstance(layer, paddle.nn.ReLU):
            layers.append((layer_name, nn.ReLU()))
        elif isinstance(layer, paddle.nn.MaxPool2D):
            layers.append((layer_name, nn.MaxPool2d(layer.ksize)))
        elif isinstance(layer, paddle.nn.Flatten):
            layers.append((layer_name, nn.Flatten()))
        else:
            raise TypeError(f"{name}.{layer_name}: no torch equivalent for {type(layer).__name__}")
    net = Net(layers).eval()

    state = {}
    for key, value in model.state_dict().items():
        layer_name, attr = key.rsplit(".", 1)
        array = value.numpy()
        if isinstance(getattr(model, layer_name), paddle.nn.Linear) and attr == "weight":
            array = array.T  # Paddle Linear weights are [in, out], torch's [out, in]
        attr = {"_mean": "running_mean", "_variance": "running_var"}.get(attr, attr)
        state[f"{layer_name}.{attr}"] = torch.from_numpy(np.ascontiguousarray(array))
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{name}: torch state dict mismatch: {missing} {unexpected}")

    groups, names = [], net.names
    for i, layer_name in enumerate(names):
        layer = getattr(net, layer_name)
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            group = [layer_name]
            for follower in names[i + 1 : i + 3]:
                kind = type(getattr(net, follower))
                if kind is nn.BatchNorm2d and len(group) == 1 and isinstance(layer, nn.Conv2d):
                    group.append(follower)
                elif kind is nn.ReLU:
                    group.append(follower)
                    break
                else:
                    break
            if len(group) > 1:
                groups.append(group)
    return fuse_modules(net, groups)


def torch_quantize(fp32_net, images: np.ndarray):
    """Eager-mode static PTQ with the default x86 qconfig (histogram observer on activations,
    per-channel symmetric weights), calibrated on ``images``."""
    import torch
    from torch.ao.quantization import convert, get_default_qconfig, prepare

    torch.backends.quantized.engine = "x86"
    net = copy.deepcopy(fp32_net)
    net.qconfig = get_default_qconfig("x86")
    with warnings.catch_warnings():
        # torch.ao's eager mode warns that it is being superseded (and about reduce_range).
        warnings.simplefilter("ignore")
        prepared = prepare(net)
        with torch.inference_mode():
            for i in range(0, len(images), CALIBRATION_BATCH):
                prepared(torch.from_numpy(images[i : i + CALIBRATION_BATCH]))
        return convert(prepared)


def torch_predictor(net) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return net(torch.from_numpy(images)).numpy()

    return run


def torch_state_dict_kb(net, path: str) -> float:
    import torch

    torch.save(net.state_dict(), path)
    return os.path.getsize(path) / 1024


# ----------------------------------------------------------------------------- diagnostics
def layer_inputs(model: paddle.nn.Layer, images: np.ndarray) -> dict[str, np.ndarray]:
    """|input| of every Conv2D/Linear of the fp32 ``model`` on ``images``, flattened."""
    found: dict[str, list[np.ndarray]] = {}
    handles = []
    for layer_name, layer in model.named_sublayers():
        if isinstance(layer, (paddle.nn.Conv2D, paddle.nn.Linear)):
            def hook(_, inputs, layer_name=layer_name):
                found.setdefault(layer_name, []).append(np.abs(inputs[0].numpy()).ravel())
            handles.append(layer.register_forward_pre_hook(hook))
    try:
        with paddle.no_grad():
            for i in range(0, len(images), CALIBRATION_BATCH):
                model(paddle.to_tensor(images[i : i + CALIBRATION_BATCH]))
    finally:
        for handle in handles:
            handle.remove()
    return {key: np.concatenate(values) for key, values in found.items()}


def diagnose(
    name: str, activation: str, weights: str, table: dict, abs_max_table: dict,
    inputs: dict[str, np.ndarray],
) -> list[LayerDiagnosis]:
    """Each quantized layer's input threshold, its abs-max, and the share of non-zero
    calibration inputs above the threshold (clipped)."""
    found = []
    for layer_name, values in inputs.items():
        threshold = table[layer_name]["input"][0]
        nonzero = values[values > 0]
        clipped = float((nonzero > threshold).mean() * 100) if nonzero.size else 0.0
        found.append(LayerDiagnosis(
            name, activation, weights, layer_name, threshold,
            abs_max_table[layer_name]["input"][0], clipped,
        ))
    return found


def repair(
    ptq: ImperativePTQ, model: paddle.nn.Layer, table: dict, abs_max: dict[str, float],
    path: str, evaluate: Callable[[Callable], float],
) -> float:
    """Accuracy with the input thresholds of the layers in ``abs_max`` replaced by their
    abs-max, all else unchanged."""
    from imperative_ptq.calibration_table import write_table

    patched = copy.deepcopy(table)
    for layer, value in abs_max.items():
        patched[layer]["input"] = [value]
    write_table(path, patched, ptq.quant_config.to_dict())
    qmodel = ptq.quantize(model)
    ptq.remove_hooks(qmodel)
    ptq.load_calibration_table(qmodel, path)
    ptq.convert(qmodel)
    return evaluate(demo.dygraph_predictor(qmodel))


# ------------------------------------------------------------------------------------ core
@contextlib.contextmanager
def _timed(label: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    logger.info("%s: %.1f s", label, time.perf_counter() - start)


def compare(
    data: MNIST,
    models: Sequence[str] = COMPARED_MODELS,
    activations: Sequence[str] = ACTIVATIONS,
    weights: Sequence[str] = WEIGHTS,
    calibration_size: int = 1000,
    test_size: int | None = None,
    inference_configs: Sequence[tuple[str, str]] = INFERENCE_CONFIGS,
    builtin: bool = True,
    torch_side: bool = True,
    tolerance: float = 0.5,
    rounds: int = 5,
    threads: int = 2,
    output_dir: str = os.path.join("out", "compare_algorithms"),
    cache_dir: str = os.path.join(DEMOS, ".cache"),
) -> Comparison:
    """Runs the comparison; see the module docstring.

    Args:
        data: MNIST.
        models: Names from ``demos/mnist_ptq.MODELS``.
        activations: Activation algorithms (names of ``demos/mnist_ptq.ACTIVATION_ALGORITHMS``).
        weights: Weight schemes (``abs_max``, ``per_channel``).
        calibration_size: Training images to calibrate on (the first ones, for every engine).
        test_size: Test images to score on (default: all 10000).
        inference_configs: ``(activation, weights)`` pairs also run in Paddle Inference int8.
        builtin: Also run Paddle's built-in ImperativePTQ.
        torch_side: Also run PyTorch (skipped with a warning if torch is not installed).
        tolerance: Accuracy loss in points above which a configuration is diagnosed.
        rounds: Timing rounds for the latency table (0: no latency table).
        threads: Threads of each engine (torch and Paddle Inference) in the latency table.
        output_dir: Where exported programs go.
        cache_dir: Trained-weights cache of ``demos/mnist_ptq.py``.
    """

    if torch_side:
        try:
            import torch
        except ImportError:
            logger.warning("torch is not installed: skipping the PyTorch comparison")
            torch_side = False
        else:
            torch.set_num_threads(threads)
            torch.backends.quantized.engine = "x86"
    unknown = [a for a in activations if a not in demo.ACTIVATION_ALGORITHMS]
    unknown += [w for w in weights if w not in demo.WEIGHT_ALGORITHMS]
    unknown += [m for m in models if m not in demo.MODELS]
    if unknown:
        raise ValueError(f"unknown model or algorithm names: {unknown}")
    test_images, test_labels = data.test_images[:test_size], data.test_labels[:test_size]
    calibration = data.train_images[:calibration_size]

    def evaluate(predict_batch: Callable[[np.ndarray], np.ndarray]) -> float:
        return demo.accuracy(predict_batch, test_images, test_labels)

    result = Comparison({}, [], [], [], [], {}, {
        "calibration_size": len(calibration), "test_size": len(test_images),
        "models": list(models), "activations": list(activations), "weights": list(weights),
        "threads": threads,
    })
    for name in models:
        model = demo.trained_model(name, cache_dir)
        fp32 = result.fp32[name] = evaluate(demo.dygraph_predictor(model))
        export_dir = os.path.join(output_dir, name)

        def row(engine: str, activation: str, weight: str, accuracy: float) -> AccuracyRow:
            entry = AccuracyRow(name, engine, activation, weight, accuracy, fp32)
            result.accuracy.append(entry)
            logger.info("%s %-26s %-14s %-11s %.2f", name, engine, activation, weight, accuracy)
            return entry

        tables: dict[tuple[str, str], dict] = {}
        exported: dict[tuple[str, str], str] = {}
        sim_rows: dict[tuple[str, str], AccuracyRow] = {}
        with _timed(f"{name}: imperative_ptq, {len(activations) * len(weights)} configurations"):
            for activation in activations:
                for weight in weights:
                    ptq, qmodel = calibrate_ours(model, activation, weight, calibration)
                    tables[activation, weight] = ptq.calibration_table(qmodel)
                    ptq.convert(qmodel)
                    sim_rows[activation, weight] = row(
                        ENGINE_SIM, activation, weight, evaluate(demo.dygraph_predictor(qmodel))
                    )
                    if (activation, weight) in inference_configs or (
                        rounds and torch_side and (activation, weight) == LATENCY_CONFIG
                    ):
                        prefix = os.path.join(export_dir, f"int8_{activation}_{weight}")
                        ptq.save_quantized_model(qmodel, prefix, SPEC)
                        exported[activation, weight] = prefix
                    if (activation, weight) in inference_configs:
                        row(ENGINE_INFERENCE, activation, weight,
                            evaluate(demo.inference_predictor(prefix, int8=True)))

        if builtin:
            with _timed(f"{name}: paddle.quantization.ImperativePTQ"):
                for activation in (a for a in activations if a in BUILTIN_ACTIVATIONS):
                    for weight in weights:
                        qmodel = run_builtin(model, activation, weight, calibration)
                        row(ENGINE_BUILTIN, activation, weight,
                            evaluate(demo.dygraph_predictor(qmodel)))

        lossy = [key for key, entry in sim_rows.items() if entry.delta < -tolerance]
        if lossy:
            with _timed(f"{name}: diagnosing {len(lossy)} lossy configurations"):
                inputs = layer_inputs(model, calibration)
                for activation, weight in lossy:
                    abs_max_table = tables.get(("abs_max", weight))
                    if abs_max_table is None:
                        abs_max_ptq, abs_max_model = calibrate_ours(
                            model, "abs_max", weight, calibration)
                        abs_max_table = tables["abs_max", weight] = (
                            abs_max_ptq.calibration_table(abs_max_model))
                    found = diagnose(name, activation, weight, tables[activation, weight],
                                     abs_max_table, inputs)
                    result.diagnoses.extend(found)
                    # Raise thresholds to abs-max, most-clipping layer first, until the loss is
                    # within tolerance: which layers' clipping costs the accuracy.
                    ptq = ImperativePTQ(PTQConfig(demo.ACTIVATION_ALGORITHMS[activation](),
                                                  demo.WEIGHT_ALGORITHMS[weight]()))
                    os.makedirs(export_dir, exist_ok=True)
                    raised: dict[str, float] = {}
                    for worst in sorted(found, key=lambda d: -d.clipped_percent):
                        raised[worst.layer] = worst.abs_max
                        after = repair(
                            ptq, model, tables[activation, weight], raised,
                            os.path.join(export_dir, f"repair_{activation}_{weight}.json"),
                            evaluate,
                        )
                        result.repairs.append(Repair(
                            name, activation, weight, list(raised),
                            sim_rows[activation, weight].accuracy, after,
                        ))
                        if after - fp32 >= -tolerance:
                            break

        if torch_side:
            with _timed(f"{name}: torch.ao"):
                net = torch_model(name, model)
                paddle_predictions = _predictions(demo.dygraph_predictor(model), test_images)
                torch_predictions = _predictions(torch_predictor(net), test_images)
                result.torch_fp32_mismatches[name] = int(
                    (paddle_predictions != torch_predictions).sum())
                qnet = torch_quantize(net, calibration)
                torch_int8 = row(ENGINE_TORCH, "histogram", "per_channel",
                                 evaluate(torch_predictor(qnet)))
            if rounds:
                if LATENCY_CONFIG not in exported and not exported:
                    ptq, qmodel = calibrate_ours(model, *LATENCY_CONFIG, calibration)
                    exported[LATENCY_CONFIG] = os.path.join(
                        export_dir, "int8_{}_{}".format(*LATENCY_CONFIG))
                    ptq.save_quantized_model(qmodel, exported[LATENCY_CONFIG], SPEC)
                config = LATENCY_CONFIG if LATENCY_CONFIG in exported else next(iter(exported))
                with _timed(f"{name}: latency"):
                    result.deployment.extend(_deployment(
                        name, model, net, qnet, fp32, torch_int8.accuracy, export_dir,
                        (config, exported[config]), rounds, threads, test_images, evaluate,
                    ))
    return result


def _paddle_inference(prefix: str, int8: bool, threads: int) -> Callable:
    from imperative_ptq.export import create_predictor, predict

    predictor = create_predictor(prefix, int8=int8, num_threads=threads)
    return lambda images: predict(predictor, images)[0]


def _predictions(predict_batch: Callable, images: np.ndarray) -> np.ndarray:
    return np.concatenate([
        predict_batch(images[i : i + 500]).argmax(axis=1) for i in range(0, len(images), 500)
    ])


def _deployment(
    name: str, model: paddle.nn.Layer, net, qnet, fp32: float, torch_int8: float,
    export_dir: str, int8: tuple[tuple[str, str], str], rounds: int, threads: int,
    images: np.ndarray, evaluate: Callable,
) -> list[DeploymentRow]:
    """Paddle Inference fp32/int8 and torch fp32/int8: size and latency, interleaved.

    ``int8`` is ``((activation, weights), prefix)`` of the exported Paddle int8 program."""
    fp32_prefix = os.path.join(export_dir, "fp32")
    (activation, weight), int8_prefix = int8
    save_fp32_model(model, fp32_prefix, SPEC)
    engines = {
        "Paddle Inference fp32": _paddle_inference(fp32_prefix, False, threads),
        f"Paddle Inference int8 ({activation} + {weight})":
            _paddle_inference(int8_prefix, True, threads),
        "torch fp32 (fused)": torch_predictor(net),
        "torch int8 (x86)": torch_predictor(qnet),
    }
    sizes = [
        os.path.getsize(fp32_prefix + ".pdiparams") / 1024,
        os.path.getsize(int8_prefix + ".pdiparams") / 1024,
        torch_state_dict_kb(net, os.path.join(export_dir, "torch_fp32.pt")),
        torch_state_dict_kb(qnet, os.path.join(export_dir, "torch_int8.pt")),
    ]
    accuracies = [evaluate(engines["Paddle Inference fp32"]),
                  evaluate(list(engines.values())[1]), fp32, torch_int8]
    latency = demo.latencies_ms(engines, images, rounds)
    return [
        DeploymentRow(name, engine, accuracy, size,
                      {batch: latency[engine, batch] for batch in demo.LATENCY_BATCHES})
        for engine, size, accuracy in zip(engines, sizes, accuracies)
    ]


# ---------------------------------------------------------------------------------- tables
def accuracy_table(result: Comparison) -> list[str]:
    """Markdown: one row per configuration, one column per (model, engine)."""
    models = result.settings["models"]
    engines = [ENGINE_SIM, ENGINE_INFERENCE, ENGINE_BUILTIN]
    cells = {(r.model, r.engine, r.activation, r.weights): r for r in result.accuracy}
    columns = [(m, e) for m in models for e in engines
               if any(key[:2] == (m, e) for key in cells)]
    short = {ENGINE_SIM: "ours sim", ENGINE_INFERENCE: "ours PI int8",
             ENGINE_BUILTIN: "Paddle built-in sim"}
    lines = [
        "| activations | weights | " + " | ".join(f"{m} {short[e]}" for m, e in columns) + " |",
        "|---|---|" + "---|" * len(columns),
        "| fp32 | | " + " | ".join(f"{result.fp32[m]:.2f}" for m, _ in columns) + " |",
    ]
    for activation in result.settings["activations"]:
        for weight in result.settings["weights"]:
            values = []
            for m, e in columns:
                entry = cells.get((m, e, activation, weight))
                values.append("" if entry is None else f"{entry.accuracy:.2f} ({entry.delta:+.2f})")
            lines.append(f"| {activation} | {weight} | " + " | ".join(values) + " |")
    torch_rows = [r for r in result.accuracy if r.engine == ENGINE_TORCH]
    if torch_rows:
        lines += ["", "| model | fp32 (Paddle) | torch fp32 predictions differing from Paddle "
                  "| torch.ao x86 int8 (histogram + per-channel) |", "|---|---|---|---|"]
        for r in torch_rows:
            lines.append(f"| {r.model} | {r.fp32_accuracy:.2f} | "
                         f"{result.torch_fp32_mismatches[r.model]} / {result.settings['test_size']} "
                         f"| {r.accuracy:.2f} ({r.delta:+.2f}) |")
    return lines


def deployment_table(result: Comparison) -> list[str]:
    if not result.deployment:
        return []
    batches = demo.LATENCY_BATCHES
    lines = ["| model | engine | accuracy % | weights KB | "
             + " | ".join(f"bs{b} ms" for b in batches) + " |",
             "|---|---|---|---|" + "---|" * len(batches)]
    for r in result.deployment:
        lines.append(f"| {r.model} | {r.engine} | {r.accuracy:.2f} | {r.size_kb:.1f} | "
                     + " | ".join(f"{r.latency_ms[b]:.3f}" for b in batches) + " |")
    return lines


def diagnosis_table(result: Comparison) -> list[str]:
    if not result.diagnoses:
        return []
    lines = ["| model | activations | weights | layer | input threshold | abs-max | "
             "threshold / abs-max | non-zero inputs clipped % |", "|---|---|---|---|---|---|---|---|"]
    for d in result.diagnoses:
        lines.append(f"| {d.model} | {d.activation} | {d.weights} | {d.layer} | {d.threshold:.4f} "
                     f"| {d.abs_max:.4f} | {d.threshold / d.abs_max:.3f} | {d.clipped_percent:.2f} |")
    lines += ["", "| model | activations | weights | input thresholds raised to abs-max | "
              "accuracy before | accuracy after |", "|---|---|---|---|---|---|"]
    for r in result.repairs:
        lines.append(f"| {r.model} | {r.activation} | {r.weights} | {', '.join(r.layers)} "
                     f"| {r.accuracy_before:.2f} | {r.accuracy_after:.2f} |")
    return lines


def markdown(result: Comparison, seconds: float) -> str:
    settings = result.settings
    parts = [
        f"Measured {datetime.date.today().isoformat()} on 2 vCPU AVX-512 VNNI, Paddle "
        f"{paddle.__version__}" + (f", torch {_torch_version()}" if _torch_version() else "")
        + f"; `python benchmarks/compare_algorithms.py` ({seconds:.0f} s). Calibration on the first "
        f"{settings['calibration_size']} training images (batches of {CALIBRATION_BATCH}), "
        f"accuracy on {settings['test_size']} test images, in % (difference to fp32 in points).",
        "", "### Accuracy", "", *accuracy_table(result),
    ]
    if result.deployment:
        parts += ["", "### Size and latency (engines interleaved, median of rounds, "
                  f"{settings['threads']} threads each)", "", *deployment_table(result)]
    if result.diagnoses:
        parts += ["", "### Configurations losing more than 0.5 points", "",
                  *diagnosis_table(result)]
    return "\n".join(parts) + "\n"


def _torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(demo.MODELS),
                        default=list(COMPARED_MODELS),
                        help=f"models (default: {' '.join(COMPARED_MODELS)})")
    parser.add_argument("--activations", nargs="+", choices=ACTIVATIONS, default=list(ACTIVATIONS))
    parser.add_argument("--weights", nargs="+", choices=WEIGHTS, default=list(WEIGHTS))
    parser.add_argument("--calibration-size", type=int, default=1000,
                        help="training images to calibrate on (default: 1000)")
    parser.add_argument("--test-size", type=int, default=None,
                        help="test images to score on (default: all 10000)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="latency rounds (default: 5; 0 skips the latency table)")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads per engine in the latency table (default: 2)")
    parser.add_argument("--no-builtin", action="store_true",
                        help="skip Paddle's built-in ImperativePTQ")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    parser.add_argument("--output", default=os.path.join("out", "compare_algorithms", "results.md"),
                        help="markdown file for the tables (default: out/compare_algorithms/results.md)")
    parser.add_argument("--export-dir", default=os.path.join("out", "compare_algorithms"),
                        help="where exported programs go")
    parser.add_argument("--cache-dir", default=os.path.join(DEMOS, ".cache"),
                        help="trained fp32 weights cache (shared with mnist_ptq.py)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("imperative_ptq").setLevel(logging.WARNING)
    logging.getLogger("paddle.quantization.imperative.ptq").setLevel(logging.WARNING)
    start = time.perf_counter()
    result = compare(
        load_mnist(), args.models, args.activations, args.weights, args.calibration_size,
        args.test_size, builtin=not args.no_builtin, torch_side=not args.no_torch,
        rounds=args.rounds, threads=args.threads, output_dir=args.export_dir,
        cache_dir=args.cache_dir,
    )
    text = markdown(result, time.perf_counter() - start)
    print("\n" + text)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as file:
        file.write(text)
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
