"""What does Paddle Inference's oneDNN int8 compute, one layer at a time, on this CPU?

A single Linear (256 -> 64) and a single Conv2D (16 -> 32, 3x3) are calibrated (abs-max,
per-channel weights), exported and run by ``create_predictor``. Their input is dense uniform
data in [0, 1), passed through a ReLU (``relu``) or not (``dense``), so Paddle's pipeline runs
it as u8 or as s8, and for the conv on the targets that run a signed input on s8, standard
normal data (``signed``). Each output is compared, as a relative
L2 error, with integer references computed here in numpy:

* ``exact``: the integer arithmetic the export describes, accumulated exactly in int64;
* ``pair-saturating``: the same, with each pair of adjacent products summed in int16 with
  saturation (``vpmaddubsw``: what int8 kernels do without VNNI), a s8 input being shifted by
  +128 into u8 first;
* ``halved weights`` (the conv): exact int32 sums with the weight oneDNN's AVX2 kernels use
  for a signed input, rounded on half its scale (``imperative_ptq/halved_convs.py``);

and with the dygraph simulation of the converted layer. ``--target arm`` exports the plain
symmetric form (u8 codes up to 255, s8 inputs); the default ``x86`` target the form that is
exact everywhere. Run it with ``ONEDNN_MAX_CPU_ISA=AVX2`` to see AVX2 kernels on a newer CPU.

Usage: ``python benchmarks/int8_arithmetic_probe.py [--target arm|x86|x86-avx2|x86-vnni]`` (~5 s).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import paddle

import imperative_ptq as ip
from imperative_ptq.export import create_predictor, predict
from imperative_ptq.quant_layers import runtime_weight

LAYERS = ("linear", "conv")
SOURCES = ("relu", "dense", "signed")
#: Targets that run a conv's signed input on s8 (``x86`` shifts it into u8 or keeps it fp32).
_S8_TARGETS = ("arm", "x86-vnni", "x86-avx2")


class _Probe(paddle.nn.Layer):
    def __init__(self, layer: str, relu: bool) -> None:
        super().__init__()
        self.relu = paddle.nn.ReLU() if relu else None
        self.layer = paddle.nn.Linear(256, 64) if layer == "linear" else paddle.nn.Conv2D(16, 32, 3)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.layer(self.relu(x) if self.relu is not None else x)


def _data(layer: str, rng: np.random.Generator, batch: int, signed: bool = False) -> np.ndarray:
    shape = (batch, 256) if layer == "linear" else (batch, 16, 10, 10)
    if signed:
        return rng.standard_normal(shape).astype(np.float32)
    return rng.uniform(0.0, 1.0, shape).astype(np.float32)


def _columns(x: np.ndarray, layer: str) -> np.ndarray:
    """Rows of the GEMM the layer computes (im2col for the conv, input channel fastest)."""
    if layer == "linear":
        return x
    n, c, h, w = x.shape
    patches = np.stack([x[:, :, i:i + h - 2, j:j + w - 2] for i in range(3) for j in range(3)], 1)
    return patches.transpose(0, 3, 4, 1, 2).reshape(-1, 9 * c)


def _pair_saturating_dot(rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``rows @ weights`` with adjacent products summed pairwise in saturating int16."""
    if rows.shape[1] % 2:
        rows = np.pad(rows, ((0, 0), (0, 1)))
        weights = np.pad(weights, ((0, 1), (0, 0)))
    pairs = rows[:, 0::2, None] * weights[None, 0::2, :] + rows[:, 1::2, None] * weights[None, 1::2, :]
    return np.clip(pairs, -32768, 32767).sum(axis=1)


def probe_case(layer: str, source: str, target: str, directory: str) -> dict[str, float]:
    """Exports one case and returns its relative errors against each reference."""
    rng = np.random.default_rng(0)
    paddle.seed(0)
    model = _Probe(layer, relu=source == "relu")
    model.eval()
    config = ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=target)
    ptq = ip.ImperativePTQ(config)
    qmodel = ptq.quantize(model)
    for _ in range(4):
        qmodel(paddle.to_tensor(_data(layer, rng, 32, source == "signed")))
    ptq.convert(qmodel)
    prefix = os.path.join(directory, f"{layer}-{source}-{target}", "model")
    shape = [None, 256] if layer == "linear" else [None, 16, 10, 10]
    ptq.save_quantized_model(qmodel, prefix, [paddle.static.InputSpec(shape, "float32", "x")])
    x = _data(layer, rng, 16, source == "signed")
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    simulated = qmodel(paddle.to_tensor(x)).numpy()

    quantized = qmodel.layer
    threshold = quantized.input_thresholds[0]
    inputs = np.maximum(x, 0) if source == "relu" else x
    # Paddle runs a ReLU output as u8; the x86 targets make every non-negative input u8 on the
    # simulation's codes 0..127, the plain form maps a u8 threshold onto 0..255 and a s8 one
    # onto -127..127.
    unsigned = source == "relu" or quantized.input_unsigned
    levels = 255 if unsigned and not quantized.input_unsigned else 127
    codes = np.clip(np.round(inputs * levels / threshold), 0 if unsigned else -128, levels)
    weight = quantized.layer.weight.numpy().astype(np.float64)
    thresholds = quantized.weight_thresholds.numpy().astype(np.float64)
    if layer == "conv":
        integers = np.round(weight / thresholds[:, None, None, None] * 127)
        weights = integers.transpose(2, 3, 1, 0).reshape(-1, integers.shape[0])
    else:
        weights = np.round(weight / thresholds[None, :] * 127)
    rows = _columns(codes.astype(np.int64), layer)
    weights = weights.astype(np.int64)
    shift = 0 if unsigned else 128
    steps = thresholds / 127
    accumulators = {
        "exact": (rows @ weights, steps),
        "pair-saturating": (_pair_saturating_dot(rows + shift, weights) - shift * weights.sum(0), steps),
    }
    if layer == "conv":
        # oneDNN's AVX2 kernels on a signed input: the weight rounded on half its scale
        # (imperative_ptq/halved_convs.py), from the weight Paddle dequantizes.
        halved, halved_thresholds = runtime_weight(
            integers.astype(np.int8), thresholds.astype(np.float32), 8, 0, fc=False, halved=True
        )
        halved_steps = halved_thresholds.astype(np.float64) / 127
        halved_codes = np.rint(halved / halved_steps[:, None, None, None]).astype(np.int64)
        accumulators["halved weights"] = (
            rows @ halved_codes.transpose(2, 3, 1, 0).reshape(-1, halved_codes.shape[0]), halved_steps
        )
    bias = quantized.layer.bias.numpy().astype(np.float64)
    errors = {"halved weights": float("nan")}
    for name, (accumulator, weight_steps) in accumulators.items():
        out = accumulator * (threshold / levels) * weight_steps[None, :] + bias
        if layer == "conv":
            out = out.reshape(x.shape[0], 8, 8, -1).transpose(0, 3, 1, 2)
        errors[name] = _relative_error(ran, out)
    errors["simulation"] = _relative_error(ran, simulated)
    return errors


def _relative_error(output: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(output - reference) / np.linalg.norm(reference))


def probe(target: str, directory: str) -> dict[tuple[str, str], dict[str, float]]:
    """Every (layer, source) case for ``target``."""
    return {
        (layer, source): probe_case(layer, source, target, directory)
        for layer in LAYERS
        for source in SOURCES
        # A signed input: the conv on s8 (the fc's s8 input is shifted on the x86 targets).
        if source != "signed" or (layer == "conv" and target in _S8_TARGETS)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="x86", choices=sorted(ip.TARGETS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        results = probe(args.target, directory)
    print(f"CPU: {ip.cpu_info().describe()}; Paddle {paddle.__version__}; target {args.target}")
    print("relative L2 error of Paddle Inference int8 against each reference")
    print(f"{'layer':8s} {'input':6s} {'exact':>10s} {'pair-saturating':>16s} {'halved weights':>15s} {'simulation':>11s}")
    for (layer, source), errors in results.items():
        print(
            f"{layer:8s} {source:6s} {errors['exact']:10.2e} {errors['pair-saturating']:16.2e} "
            f"{errors['halved weights']:15.2e} {errors['simulation']:11.2e}"
        )


if __name__ == "__main__":
    main()
