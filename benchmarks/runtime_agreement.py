"""Does the exported int8 model compute what the dygraph simulation promised, per target?

For random-weight ``paddle.vision`` models (3x224x224 input), calibrates KL activations and
per-channel absmax weights on 4 random-normal batches of 4 for each deployment target,
converts, exports, and runs the export on 8 new random-normal images in Paddle Inference
(oneDNN int8) and in ONNX Runtime (QDQ export). One row per (model, target): int8 layers
(``QuantizedLayer`` sublayers) out of all conv/linear layers, and the logit cosine of Paddle
Inference against the dygraph simulation (the converted model) and against the fp32 model,
and of ONNX Runtime against the simulation ("n/a (...)" when an op has no ONNX converter), as
exported by default and with the residual branches the simulation adds in float left float
(``int8_residual_branches=False``).

A cosine of 1.0000 against the simulation means the runtime's int8 kernels compute what
``convert`` simulated. The answer depends on the CPU (VNNI or not), so the header names it
(``imperative_ptq.cpu_info().describe()``); ``ONEDNN_MAX_CPU_ISA=AVX2`` makes Paddle Inference
use the AVX2 kernels of a CPU without VNNI (it does not affect ONNX Runtime).

Usage: python benchmarks/runtime_agreement.py [--models mobilenet_v2,resnet18,...]
                                              [--targets x86,x86-vnni]
       ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/runtime_agreement.py
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import re
import tempfile
import time

import numpy as np
import paddle

import imperative_ptq
from imperative_ptq import (
    TARGETS, ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig, QuantizedLayer,
    cpu_info,
)
from imperative_ptq.export import create_predictor, export_onnx, predict

logger = logging.getLogger("benchmarks.runtime_agreement")

DEFAULT_MODELS = (
    "mobilenet_v2", "shufflenet_v2_x0_25", "densenet121", "squeezenet1_0", "resnet18",
    "mobilenet_v3_small",
)
DEFAULT_TARGETS = ("x86", "x86-vnni")
SHAPE = [3, 224, 224]
CALIBRATION_BATCHES = 4
CALIBRATION_BATCH_SIZE = 4
TEST_IMAGES = 8


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _ort_cosine(qmodel: paddle.nn.Layer, path: str, spec: list, x: np.ndarray,
                simulated: np.ndarray, int8_residual_branches: bool = True) -> str:
    """ONNX Runtime's logit cosine against the simulation, or why there is none
    (``int8_residual_branches``: as :func:`imperative_ptq.export.export_onnx` takes it)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "n/a (no onnxruntime)"
    try:
        onnx_path = export_onnx(qmodel, path, spec, int8_residual_branches=int8_residual_branches)
    except NotImplementedError as error:
        # "op 'concat' has no ONNX converter; supported: [...]" -> "n/a (op 'concat')"
        op = re.match(r"op '[^']+'", str(error))
        return f"n/a ({op.group(0) if op else str(error).split(';')[0]})"
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    return f"{_cosine(session.run(None, {'x': x})[0], simulated):.5f}"


def agreement(name: str, target: str, workdir: str) -> dict[str, object]:
    """Calibrate, convert and export ``name`` for ``target``; cosines of every runtime."""
    paddle.seed(0)  # same weights for every target
    model = getattr(paddle.vision.models, name)()
    model.eval()
    rng = np.random.default_rng(0)  # same calibration and test images for every target
    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), target=target))
    qmodel = ptq.quantize(model)
    with paddle.no_grad():
        for _ in range(CALIBRATION_BATCHES):
            batch = rng.standard_normal((CALIBRATION_BATCH_SIZE, *SHAPE)).astype("float32")
            qmodel(paddle.to_tensor(batch))
    ptq.convert(qmodel)
    int8_layers = sum(isinstance(layer, QuantizedLayer) for layer in qmodel.sublayers())
    conv_linear = sum(isinstance(layer, (paddle.nn.Conv2D, paddle.nn.Linear))
                      for layer in model.sublayers())
    spec = [paddle.static.InputSpec([None, *SHAPE], "float32", "x")]
    prefix = os.path.join(workdir, f"{name}_{target}", "int8")
    ptq.save_quantized_model(qmodel, prefix, spec)
    x = rng.standard_normal((TEST_IMAGES, *SHAPE)).astype("float32")
    with paddle.no_grad():
        simulated = qmodel(paddle.to_tensor(x)).numpy()
        reference = model(paddle.to_tensor(x)).numpy()
    paddle_int8 = predict(create_predictor(prefix), x)[0]
    row = {
        "model": name,
        "target": target,
        "int8 layers": f"{int8_layers}/{conv_linear}",
        "PI vs sim": f"{_cosine(paddle_int8, simulated):.5f}",
        "PI vs fp32": f"{_cosine(paddle_int8, reference):.5f}",
        "sim vs fp32": f"{_cosine(simulated, reference):.5f}",
        "ORT vs sim": _ort_cosine(qmodel, prefix + ".onnx", spec, x, simulated),
        "ORT float branches vs sim": _ort_cosine(
            qmodel, prefix + ".exact.onnx", spec, x, simulated, int8_residual_branches=False
        ),
    }
    logger.info("%s", row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated paddle.vision.models names")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                        help=f"comma-separated deployment targets, of {', '.join(TARGETS)}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    targets = args.targets.split(",")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; choose from {', '.join(TARGETS)}")
    header = ["model", "target", "int8 layers", "PI vs sim", "PI vs fp32", "sim vs fp32",
              "ORT vs sim", "ORT float branches vs sim"]
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            for target in targets:
                try:
                    rows.append(agreement(name, target, workdir))
                except Exception as error:  # one broken model must not hide the others
                    logger.exception("%s / %s failed", name, target)
                    rows.append({"model": name, "target": target,
                                 "int8 layers": f"error: {type(error).__name__}: {error}"})
    print(f"# {datetime.date.today()} {cpu_info().describe()} cpus={len(os.sched_getaffinity(0))} "
          f"paddle={paddle.__version__} imperative_ptq={getattr(imperative_ptq, '__version__', '?')} "
          f"({time.perf_counter() - start:.0f} s)")
    print("# logit cosine on 8 random-normal 3x224x224 images; PI = Paddle Inference int8 "
          "(oneDNN), sim = dygraph simulation after convert, ORT = ONNX Runtime QDQ (float "
          "branches: export_onnx(..., int8_residual_branches=False))")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row.get(key, "")) for key in header) + " |")


if __name__ == "__main__":
    main()
