"""What the ``paddle.matmul`` / ``F.linear`` routers of :mod:`imperative_ptq.functional_matmul`
and the ``F.conv2d`` / ``F.conv1d`` routers of :mod:`imperative_ptq.functional_conv` cost a
model that has no sites: the fp32 forward of an ``nn.TransformerEncoder`` (whose attention
calls ``paddle.tensor.matmul`` and whose ``nn.Linear`` layers call ``F.linear``), of an
x2paddle-style block (``paddle.matmul`` on parameters, which the router inspects before
passing them on), of a stack of ``nn.Conv1D`` layers (whose forward calls ``F.conv1d``) and of
a block of ``F.conv2d`` calls on parameters, with Paddle's own functions and with the routers
installed (every binding ``install`` replaced: ``routed_bindings`` of both modules),
interleaved round by round in one process; medians in ms per forward.

Usage: python benchmarks/matmul_routing.py [--rounds 8] [--iters 50]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from typing import Callable

import paddle

from imperative_ptq import cpu_info
from imperative_ptq import functional_conv, functional_matmul


class ParameterBlock(paddle.nn.Layer):
    """Two matmuls on parameters, as x2paddle writes a converted MLP."""

    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.w1 = self.create_parameter([width, 4 * width])
        self.w2 = self.create_parameter([4 * width, width])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.matmul(paddle.nn.functional.relu(paddle.matmul(x, self.w1)), self.w2)


class FilterBlock(paddle.nn.Layer):
    """Two convs on parameters through ``F.conv2d``, as hand-written layers call them."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.w1 = self.create_parameter([channels, channels, 3, 3])
        self.w2 = self.create_parameter([channels, channels, 3, 3])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        conv2d = paddle.nn.functional.conv2d
        return conv2d(paddle.nn.functional.relu(conv2d(x, self.w1, padding=1)), self.w2, padding=1)


def _timed(forward: Callable[[], object], iters: int) -> float:
    forward()
    started = time.perf_counter()
    with paddle.no_grad():
        for _ in range(iters):
            forward()
    return (time.perf_counter() - started) / iters * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args(argv)
    paddle.seed(0)
    encoder = paddle.nn.TransformerEncoder(
        paddle.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0), 2
    )
    block = ParameterBlock()
    tcn = paddle.nn.Sequential(*(paddle.nn.Conv1D(32, 32, 3, padding=1) for _ in range(4)))
    models = {
        "TransformerEncoder 2x64, batch 8 x 32": (encoder, paddle.randn([8, 32, 64])),
        "parameter matmuls 256-1024-256, batch 64": (block, paddle.randn([64, 256])),
        "4 nn.Conv1D 32 ch, batch 8 x 64": (tcn, paddle.randn([8, 32, 64])),
        "F.conv2d on parameters 2x32 ch, batch 8 x 16x16": (FilterBlock(), paddle.randn([8, 32, 16, 16])),
    }
    for model, _ in models.values():
        model.eval()
    functional_matmul.install()
    functional_conv.install()
    bindings = functional_matmul.routed_bindings() + functional_conv.routed_bindings()
    times: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds):
        order = ("paddle", "routed") if round_ % 2 else ("routed", "paddle")
        for engine in order:
            for owner, attribute, original, router in bindings:
                setattr(owner, attribute, original if engine == "paddle" else router)
            for label, (model, x) in models.items():
                times.setdefault((label, engine), []).append(_timed(lambda: model(x), args.iters))
    for owner, attribute, _, router in bindings:
        setattr(owner, attribute, router)
    print(f"# {datetime.date.today()} {cpu_info().describe()} paddle={paddle.__version__}")
    print("| model | Paddle's functions ms | routed ms | routed / Paddle |")
    print("|---|---:|---:|---:|")
    for label in models:
        plain = statistics.median(times[(label, "paddle")])
        through = statistics.median(times[(label, "routed")])
        print(f"| {label} | {plain:.3f} | {through:.3f} | {through / plain:.3f} |")


if __name__ == "__main__":
    main()
