"""Does Paddle Inference's oneDNN int8 path honour a non-zero ``ZeroPoint``?

Exports a small calibrated Conv2D/ReLU/Conv2D/ReLU/Linear net with ``save_quantized_model``,
then rewrites the ``quantize_linear``/``dequantize_linear`` pair on the input of the second
conv (a ReLU output, so one-sided) with a non-zero zero point, and runs the program three ways:
Paddle Inference oneDNN int8 (``create_predictor(int8=True)``), oneDNN fp32 (``int8=False``,
the Q/DQ ops run as CPU kernels) and the plain static ``Executor``. Each output is compared
with numpy/dygraph references in which only that tensor is fake-quantized, under each
hypothesis about the zero point:

* ``ignored``: ``q = clip(round(x / s), -127, 127)``, ``x' = q * s`` (zero point dropped);
* ``honoured int8``: ``q = clip(round(x / s) + zp, -128, 127)``, ``x' = (q - zp) * s``;
* ``honoured uint8``: the same on ``[0, 255]``;

with ``s = Scale / 127`` (Paddle's threshold convention). The variants are chosen so that
``ignored`` and ``honoured`` give clearly different outputs (one of them clips the tensor at
about half its range), and in opposite directions, so the verdict does not hinge on which
hypothesis happens to be the accurate one. The nearest hypothesis (relative L2 error of the
logits) is the verdict; the unmodified export's error against its own reference is the noise
floor. Finally ``ONEDNN_VERBOSE=1`` in a subprocess shows whether the int8 convolutions carry
any ``attr-zero-points``.

Usage: ``python benchmarks/zero_point_probe.py`` (~10 s on 2 vCPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import paddle

import imperative_ptq as ip
from imperative_ptq.export import create_predictor, predict
from imperative_ptq.export.legacy_program import (
    legacy_static_mode,
    load_legacy_program,
    save_legacy_program,
)

#: name -> (factor applied to the calibrated threshold written as Scale, zero point).
#: ``127 / 255`` makes s = T / 255: with zp = -128 (int8) or 128 (uint8) an honoured zero point
#: covers [0, T] with 255 levels, an ignored one clips at ~T / 2. With the same scale and
#: zp = 100 it is the other way round: honoured int8 clips at 27 / 127 T, ignored is the plain
#: export (so its output must equal the unmodified export's bit for bit).
VARIANTS: dict[str, tuple[float, int]] = {
    "zp=-128, Scale=T*127/255": (127 / 255, -128),
    "zp=+100, Scale=T": (1.0, 100),
    "zp=+128, Scale=T*127/255": (127 / 255, 128),
}

#: hypothesis -> (applies zero point, qmin, qmax).
HYPOTHESES: dict[str, tuple[bool, int, int]] = {
    "ignored": (False, -127, 127),
    "honoured int8": (True, -128, 127),
    "honoured uint8": (True, 0, 255),
}


class ProbeNet(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.relu1 = paddle.nn.ReLU()
        self.conv2 = paddle.nn.Conv2D(8, 8, 3, padding=1)
        self.relu2 = paddle.nn.ReLU()
        self.fc = paddle.nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(paddle.flatten(x, 1))


def fake_quant(x: np.ndarray, threshold: float, zero_point: int, hypothesis: str) -> np.ndarray:
    honour, qmin, qmax = HYPOTHESES[hypothesis]
    scale = np.float32(threshold) / np.float32(127)
    zp = zero_point if honour else 0
    q = np.clip(np.round(x / scale) + zp, qmin, qmax)
    return ((q - zp) * scale).astype(np.float32)


def reference(model: ProbeNet, x: np.ndarray, threshold: float, zero_point: int, hypothesis: str):
    """fp32 logits with only conv2's input fake-quantized under ``hypothesis``."""

    def hook(layer, inputs):
        return (paddle.to_tensor(fake_quant(inputs[0].numpy(), threshold, zero_point, hypothesis)),)

    handle = model.conv2.register_forward_pre_hook(hook)
    try:
        with paddle.no_grad():
            return model(paddle.to_tensor(x)).numpy()
    finally:
        handle.remove()


def _relative_error(output: np.ndarray, target: np.ndarray) -> float:
    return float(np.linalg.norm(output - target) / np.linalg.norm(target))


def _conv2_qdq(loaded) -> tuple[str, str]:
    """(Scale var, ZeroPoint var) of the activation quantize_linear feeding the second conv."""
    block = loaded.program.global_block()
    producers = {out: op for op in block.ops for slot in op.output_names for out in op.output(slot)}
    conv = [op for op in block.ops if op.type == "conv2d"][1]
    dequant = producers[conv.input("Input")[0]]
    quant = producers[dequant.input("X")[0]]
    assert (dequant.type, quant.type) == ("dequantize_linear", "quantize_linear")
    # The pair shares its Scale/ZeroPoint tensors (see export.qdq.activation_qdq).
    assert dequant.input("Scale") == quant.input("Scale")
    assert dequant.input("ZeroPoint") == quant.input("ZeroPoint")
    return quant.input("Scale")[0], quant.input("ZeroPoint")[0]


def export_probe_model(directory: str) -> tuple[ProbeNet, str, np.ndarray]:
    """Calibrates and exports :class:`ProbeNet`; returns (fp32 model, prefix, test inputs)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    model = ProbeNet()
    model.eval()
    # target="arm": the plain symmetric Q/DQ form, whose Scale is the threshold, is what this
    # probe rewrites (the x86 targets rescale u8 tensors, see imperative_ptq.targets).
    config = ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(), target="arm")
    ptq = ip.ImperativePTQ(config)
    qmodel = ptq.quantize(model)
    batches = [rng.standard_normal([16, 3, 8, 8]).astype(np.float32) for _ in range(4)]
    ptq.calibrate(qmodel, batches, progress=False)
    prefix = os.path.join(directory, "base", "model")
    spec = [paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")]
    ptq.save_quantized_model(qmodel, prefix, input_spec=spec)
    x = rng.standard_normal([32, 3, 8, 8]).astype(np.float32)
    return model, prefix, x


def rewrite_zero_point(prefix: str, target: str, factor: float, zero_point: int) -> float:
    """Copies the export at ``prefix`` to ``target`` with conv2's input pair rewritten;
    returns the threshold written as Scale."""
    with legacy_static_mode():
        loaded = load_legacy_program(prefix)
        scale_name, zero_name = _conv2_qdq(loaded)
        scale = loaded.scope.find_var(scale_name).get_tensor()
        threshold = float(np.array(scale)[0]) * factor
        scale.set(np.array([threshold], dtype=np.float32), paddle.CPUPlace())
        zero = loaded.scope.find_var(zero_name).get_tensor()
        zero.set(np.array([zero_point], dtype=np.array(zero).dtype), paddle.CPUPlace())
        save_legacy_program(loaded, target)
    return threshold


def calibrated_threshold(prefix: str) -> float:
    with legacy_static_mode():
        loaded = load_legacy_program(prefix)
        scale_name, _ = _conv2_qdq(loaded)
        return float(np.array(loaded.scope.find_var(scale_name).get_tensor())[0])


def run_executor(prefix: str, x: np.ndarray) -> np.ndarray:
    """The program on Paddle's plain CPU kernels (static Executor, no inference passes)."""
    with legacy_static_mode():
        loaded = load_legacy_program(prefix)
        with paddle.static.scope_guard(loaded.scope):
            (out,) = loaded.executor.run(
                loaded.program, feed={loaded.feed_names[0]: x}, fetch_list=loaded.fetch_vars
            )
    return np.asarray(out)


def run_predictor(prefix: str, x: np.ndarray, int8: bool) -> np.ndarray | str:
    try:
        return predict(create_predictor(prefix, int8=int8, num_threads=1), x)[0]
    except Exception as error:  # noqa: BLE001 - an error is a finding here
        return f"error: {type(error).__name__}: {str(error).splitlines()[0][:200]}"


def onednn_verbose_convolutions(prefix: str) -> list[str]:
    """The executed oneDNN convolution primitives of the int8 predictor (ONEDNN_VERBOSE=1)."""
    script = textwrap.dedent(
        f"""
        import numpy as np
        from imperative_ptq.export import create_predictor, predict
        predict(create_predictor({prefix!r}, num_threads=1),
                np.random.rand(2, 3, 8, 8).astype('float32'))
        """
    )
    env = dict(os.environ, ONEDNN_VERBOSE="1", GLOG_minloglevel="2")
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        return [f"error: {result.stderr[-500:]}"]
    return [
        line for line in result.stdout.splitlines() if ",exec," in line and ",convolution," in line
    ]


def classify(output: np.ndarray | str, references: dict[str, np.ndarray]) -> tuple[str, dict]:
    if isinstance(output, str):
        return "error", {}
    errors = {name: _relative_error(output, ref) for name, ref in references.items()}
    return min(errors, key=errors.get), errors


def probe(directory: str) -> dict:
    """Runs the whole experiment; returns verdicts, errors and verbose lines."""
    model, prefix, x = export_probe_model(directory)
    threshold = calibrated_threshold(prefix)
    baseline_ref = reference(model, x, threshold, 0, "ignored")
    results: dict = {"threshold": threshold, "noise_floor": {}, "variants": {}}
    runners = {
        "oneDNN int8": lambda p: run_predictor(p, x, True),
        "oneDNN fp32": lambda p: run_predictor(p, x, False),
        "Executor": lambda p: run_executor(p, x),
    }
    unmodified = {}
    for runner, run in runners.items():
        output = unmodified[runner] = run(prefix)
        results["noise_floor"][runner] = (
            output if isinstance(output, str) else _relative_error(output, baseline_ref)
        )
    for index, (variant, (factor, zero_point)) in enumerate(VARIANTS.items()):
        target = os.path.join(directory, f"variant{index}", "model")
        scale = rewrite_zero_point(prefix, target, factor, zero_point)
        references = {h: reference(model, x, scale, zero_point, h) for h in HYPOTHESES}
        verdicts, changes = {}, {}
        for runner, run in runners.items():
            output = run(target)
            verdicts[runner] = classify(output, references)
            if not isinstance(output, str) and not isinstance(unmodified[runner], str):
                # Max |difference| to the unmodified export on the same runtime: 0 when only
                # the zero point changed and it is ignored.
                changes[runner] = float(np.max(np.abs(output - unmodified[runner])))
        results["variants"][variant] = {"prefix": target, "verdicts": verdicts, "changes": changes}
    first = os.path.join(directory, "variant0", "model")
    results["verbose"] = onednn_verbose_convolutions(first)
    return results


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        results = probe(directory)
    print(f"Paddle {paddle.__version__}; conv2 input threshold T = {results['threshold']:.4f}")
    print("noise floor (unmodified export vs its zero-point-free reference):")
    for runner, error in results["noise_floor"].items():
        print(f"  {runner:12s} {error if isinstance(error, str) else f'{error:.4f}'}")
    for variant, entry in results["variants"].items():
        print(f"\n{variant}: relative L2 error of the logits against each hypothesis")
        for runner, (verdict, errors) in entry["verdicts"].items():
            detail = "  ".join(f"{name} {value:.4f}" for name, value in errors.items())
            change = entry["changes"].get(runner, float("nan"))
            print(f"  {runner:12s} -> {verdict:15s} {detail}  | max|out - unmodified| {change:.3g}")
    print("\nONEDNN_VERBOSE int8 convolutions (variant 0):")
    for line in results["verbose"]:
        print("  " + line)
    zero_point_attrs = [line for line in results["verbose"] if "zero" in line]
    int8 = [entry["verdicts"]["oneDNN int8"][0] for entry in results["variants"].values()]
    print(
        "\nFINDING: oneDNN int8 zero point "
        + ("IGNORED" if set(int8) == {"ignored"} else "HONOURED" if "ignored" not in int8 and "error" not in int8 else "MIXED/ERROR")
        + f" (per variant: {int8}); attr-zero-points in verbose: {bool(zero_point_attrs)}"
    )


if __name__ == "__main__":
    main()
