"""What the float ops that put a tensor on the simulation's codes cost in Paddle Inference
(``imperative_ptq/export/coded_identity.py``).

An HRNet-shaped two-resolution stack (a 112x112 image; branches of 32 channels at 56x56 and 64
at 28x28 exchanging information in four fuse layers) where Paddle does not fuse the low branch's
add ``low + bn(conv_stride2(high))`` (``low`` was read by another conv first): the export
computes each such sum's codes in float, ``scale(clip(round(scale(x, 1 / step)), ...), step)``.
Each high-resolution branch output feeds an int8 conv (through a u8 clip) and a float add.
Exported three times: as shipped (the rounding as two ``scale`` ops shifting by 1.5 * 2**23,
:func:`imperative_ptq.export.graph.rounding_steps`; the u8 clips of tensors other ops read too
as ``clip`` ops, :func:`imperative_ptq.export.unsigned.shared_output_clips`), with Paddle's
``round`` op in place of the shifts, and with those clips left ``elementwise_min`` ops (the
export's earlier forms). Paddle Inference runs them and the fp32 export on one thread,
interleaved round by round; medians of the rounds; each int8 export's largest difference to
the dygraph simulation too.

Usage: python benchmarks/coded_float_ops.py [--rounds 5] [--iters 10] [--batch 8]
"""

from __future__ import annotations

import tempfile

import paddle
import paddle.nn.functional as F

from imperative_ptq.export import coded_identity, create_predictor, program, save_fp32_model, save_quantized_model
from side_by_side import converted_on_images, parsed_arguments, print_side_by_side, replaced

SIZE = 112
nn = paddle.nn


class _Fuse(nn.Layer):
    """One conv per branch, then each branch added to the other resampled."""

    def __init__(self, high: int, low: int) -> None:
        super().__init__()
        self.high = nn.Sequential(nn.Conv2D(high, high, 3, padding=1, bias_attr=False), nn.BatchNorm2D(high), nn.ReLU())
        self.low = nn.Sequential(nn.Conv2D(low, low, 3, padding=1, bias_attr=False), nn.BatchNorm2D(low), nn.ReLU())
        self.up = nn.Sequential(nn.Conv2D(low, high, 1, bias_attr=False), nn.BatchNorm2D(high))
        self.down = nn.Sequential(nn.Conv2D(high, low, 3, stride=2, padding=1, bias_attr=False), nn.BatchNorm2D(low))

    def forward(self, branches: tuple[paddle.Tensor, paddle.Tensor]) -> tuple[paddle.Tensor, paddle.Tensor]:
        high, low = self.high(branches[0]), self.low(branches[1])
        fused_high = F.relu(high + F.interpolate(self.up(low), scale_factor=2))
        return fused_high, F.relu(low + self.down(high))  # `low` was read by `up` first


class HRNetShaped(nn.Layer):
    def __init__(self, high: int = 32, low: int = 64, fuses: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2D(3, high, 3, 2, 1, bias_attr=False), nn.BatchNorm2D(high), nn.ReLU())
        self.split = nn.Sequential(nn.Conv2D(high, low, 3, 2, 1, bias_attr=False), nn.BatchNorm2D(low), nn.ReLU())
        self.fuses = nn.LayerList([_Fuse(high, low) for _ in range(fuses)])
        self.head_high, self.head_low = nn.Conv2D(high, 8, 1), nn.Conv2D(low, 16, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        high = self.stem(x)
        branches = (high, self.split(high))
        for fuse in self.fuses:
            branches = fuse(branches)
        return paddle.concat([self.head_high(branches[0]).flatten(1), self.head_low(branches[1]).flatten(1)], 1)


def _round_op(source: str, rounded: str, shifted: str) -> list[tuple[str, dict, dict, dict]]:
    """The earlier form: one ``round`` op."""
    return [("round", {"X": [source]}, {"Out": [rounded]}, {})]


def main() -> None:
    args = parsed_arguments(__doc__.splitlines()[0])
    paddle.seed(0)
    model = HRNetShaped()
    qmodel, x, simulated, spec = converted_on_images(model, SIZE, args.batch)
    with tempfile.TemporaryDirectory() as workdir:
        save_fp32_model(model, f"{workdir}/fp32", spec)
        save_quantized_model(qmodel, f"{workdir}/shifted", spec)
        with replaced(coded_identity, "rounding_steps", _round_op):
            save_quantized_model(qmodel, f"{workdir}/round_op", spec)
        with replaced(program, "shared_output_clips", lambda loaded: 0):
            save_quantized_model(qmodel, f"{workdir}/min_clips", spec)
        engines = {
            "fp32": create_predictor(f"{workdir}/fp32", int8=False, num_threads=1),
            "int8 as exported": create_predictor(f"{workdir}/shifted", num_threads=1),
            "int8, codes rounded by a round op": create_predictor(f"{workdir}/round_op", num_threads=1),
            "int8, shared u8 clips as elementwise_min": create_predictor(f"{workdir}/min_clips", num_threads=1),
        }
        print_side_by_side(
            engines, x, simulated, args.rounds, args.iters, f"target=x86-avx2 batch={args.batch} one thread"
        )


if __name__ == "__main__":
    main()
