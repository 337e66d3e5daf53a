"""Shared by the export benchmarks that time Paddle Inference programs side by side in one
process (``strided_pointwise.py``, ``coded_float_ops.py``): engines interleaved round by round,
medians of the rounds, each int8 engine's largest difference to the dygraph simulation; and
the timing of one round (:func:`milliseconds_per_call`) for every benchmark that interleaves
engines (``inference.py``, ``lstm_runtimes.py``, ``dynamic_latency.py`` too)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import time
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import paddle

from imperative_ptq import ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig, cpu_info
from imperative_ptq.export import predict


def parsed_arguments(description: str) -> argparse.Namespace:
    """``--rounds``, ``--iters`` and ``--batch`` from the command line."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    return parser.parse_args()


def converted_on_images(
    model: paddle.nn.Layer, size: int, batch: int
) -> tuple[paddle.nn.Layer, np.ndarray, np.ndarray, list[paddle.static.InputSpec]]:
    """``model`` calibrated on four batches of random ``[0, 1)`` images of ``size`` (KL,
    per-channel weights, target ``x86-avx2``) and converted; a batch of ``batch`` images,
    the simulation's output for it, and the input spec to export with."""
    model.eval()
    rng = np.random.default_rng(0)
    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), target="x86-avx2"))
    qmodel = ptq.quantize(model)
    for _ in range(4):
        qmodel(paddle.to_tensor(rng.random((4, 3, size, size), np.float32)))
    ptq.convert(qmodel)
    x = rng.random((batch, 3, size, size), np.float32)
    with paddle.no_grad():
        simulated = qmodel(paddle.to_tensor(x)).numpy()
    return qmodel, x, simulated, [paddle.static.InputSpec([None, 3, size, size], "float32", "x")]


@contextlib.contextmanager
def replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name`` is ``value`` inside the block (an export pass switched off or swapped)."""
    shipped = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, shipped)


#: Pause before each timed round. Paddle's OpenMP runtime (``libiomp5``) keeps its threads
#: spinning for 200 ms (``KMP_BLOCKTIME``) after each parallel region, on the cores the engine
#: timed next runs on: ONNX Runtime timed right after Paddle Inference measured MobileNetV2's
#: int8 at 24.5 ms per batch of 8 (``benchmarks/inference.py``), 13.8 ms on quiet cores.
SETTLE_SECONDS = 0.3


def milliseconds_per_call(run: Callable[[], Any], iters: int) -> float:
    """Mean wall time of ``run`` over ``iters`` calls after a pause of :data:`SETTLE_SECONDS`
    and one warm-up call, in ms."""
    time.sleep(SETTLE_SECONDS)
    run()
    start = time.perf_counter()
    for _ in range(iters):
        run()
    return (time.perf_counter() - start) / iters * 1000


def print_side_by_side(
    engines: Mapping[str, Any], x: np.ndarray, simulated: np.ndarray, rounds: int, iters: int, setting: str
) -> None:
    """Times ``engines`` (name -> predictor; the first is the fp32 baseline) on ``x``, rounds
    interleaved, and prints a markdown table of medians, speed-ups and each other engine's
    largest difference to ``simulated`` relative to its largest value."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, predictor in engines.items():
            times[name].append(milliseconds_per_call(lambda: predict(predictor, x), iters))
    baseline = next(iter(engines))
    errors = {
        name: float(np.abs(predict(predictor, x)[0] - simulated).max() / np.abs(simulated).max())
        for name, predictor in engines.items() if name != baseline
    }
    reference = statistics.median(times[baseline])
    print(f"# {datetime.date.today()} {cpu_info().describe()} paddle={paddle.__version__} {setting}, "
          f"medians of {rounds} rounds of {iters}")
    print(f"| engine | ms | speed-up vs {baseline} | largest difference to the simulation |")
    print("|---|---|---|---|")
    for name in engines:
        median = statistics.median(times[name])
        error = f"{errors[name]:.1e}" if name in errors else ""
        print(f"| {name} | {median:.2f} | {reference / median:.2f}x | {error} |")
