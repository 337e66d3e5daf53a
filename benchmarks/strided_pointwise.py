"""What the strided 1x1 conv rewrite costs (``imperative_ptq/export/strided_pointwise.py``).

A RegNetX-200MF-shaped stack (widths 24, 56, 152, 368 at 112x112; grouped 3x3 bottlenecks, each
stage opened by a projection block whose 1x1 stride-2 shortcut reads 8 mod 16 channels) is
quantized once and exported twice: as shipped, its three affected shortcuts widened to a 2x2
kernel with zero taps, and without the rewrite. Paddle Inference runs both, and the fp32
export, on ONE thread (without the rewrite two threads give wrong outputs on AVX2 CPUs),
interleaved round by round; medians of the rounds. Also reports each int8 export's largest
difference to the dygraph simulation.

Usage: python benchmarks/strided_pointwise.py [--rounds 5] [--iters 10] [--batch 8]
"""

from __future__ import annotations

import tempfile

import paddle

from imperative_ptq.export import create_predictor, program, save_fp32_model, save_quantized_model
from side_by_side import converted_on_images, parsed_arguments, print_side_by_side, replaced

SIZE = 112


def _conv_norm(ci: int, co: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True) -> paddle.nn.Sequential:
    layers = [paddle.nn.Conv2D(ci, co, kernel, stride, kernel // 2, groups=groups, bias_attr=False), paddle.nn.BatchNorm2D(co)]
    return paddle.nn.Sequential(*layers, *([paddle.nn.ReLU()] if relu else []))


class _Bottleneck(paddle.nn.Layer):
    def __init__(self, ci: int, co: int, stride: int) -> None:
        super().__init__()
        self.branch = paddle.nn.Sequential(
            _conv_norm(ci, co, 1), _conv_norm(co, co, 3, stride, groups=co // 8), _conv_norm(co, co, 1, relu=False)
        )
        self.shortcut = _conv_norm(ci, co, 1, stride, relu=False) if stride != 1 or ci != co else None
        self.relu = paddle.nn.ReLU()

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.relu(self.branch(x) + (x if self.shortcut is None else self.shortcut(x)))


class RegNetX200(paddle.nn.Sequential):
    """Stem, four stages (1, 1, 4, 7 blocks), no head: the feature map."""

    def __init__(self) -> None:
        widths, depths, blocks, ci = (24, 56, 152, 368), (1, 1, 4, 7), [], 32
        for width, depth in zip(widths, depths):
            for index in range(depth):
                blocks.append(_Bottleneck(ci, width, 2 if index == 0 else 1))
                ci = width
        super().__init__(_conv_norm(3, 32, 3, 2), *blocks)


def main() -> None:
    args = parsed_arguments(__doc__.splitlines()[0])
    paddle.seed(0)
    model = RegNetX200()
    qmodel, x, simulated, spec = converted_on_images(model, SIZE, args.batch)
    with tempfile.TemporaryDirectory() as workdir:
        save_fp32_model(model, f"{workdir}/fp32", spec)
        save_quantized_model(qmodel, f"{workdir}/rewritten", spec)
        with replaced(program, "widen_strided_pointwise_convs", lambda loaded: 0):
            save_quantized_model(qmodel, f"{workdir}/plain", spec)
        engines = {
            "fp32": create_predictor(f"{workdir}/fp32", int8=False, num_threads=1),
            "int8, strided 1x1 rewritten": create_predictor(f"{workdir}/rewritten", num_threads=1),
            "int8, not rewritten": create_predictor(f"{workdir}/plain", num_threads=1),
        }
        print_side_by_side(
            engines, x, simulated, args.rounds, args.iters, f"target=x86-avx2 batch={args.batch} one thread"
        )


if __name__ == "__main__":
    main()
