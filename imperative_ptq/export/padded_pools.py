"""Windowed pools written so that Paddle Inference's oneDNN kernels compute what Paddle's CPU
kernel (dygraph, the simulation) does.

Paddle's CPU pool kernel pads each axis by its begin padding on both sides; the end padding
(wider under ``"SAME"`` with an odd total, ``padding=[0, 1]``, ``ceil_mode``) only sizes the
output, and an inclusive average (``exclusive=False``) divides by a window's positions up to
the begin padding past the input. oneDNN honours both paddings and counts the whole kernel.
Measured in the fp32 export of a lone pool (3x3, stride 2): inclusive averages 14-43% of the
largest output off; with ``ceil_mode`` and unequal paddings on a 9x9 input, max and average
pools alike failed ("could not create a descriptor for a pooling forward propagation
primitive").

Each such pool gets explicit paddings, the begin one and the end one its last window reaches,
without ``ceil_mode`` (the same windows and output size for a maximum and an exclusive
average); an inclusive average whose last window reaches past the begin padding reads its
input padded on both sides by a ``pad3d`` with zeros it counts, and excludes the rest.
"""

from __future__ import annotations

import logging
from typing import Sequence

import paddle

from .graph import insert_op, op_index

__all__ = ["exact_padded_pools", "onnx_pads", "same_pads"]

logger = logging.getLogger(__name__)


def same_pads(spatial: Sequence[int], strides: Sequence[int], kernel: Sequence[int]) -> list[int]:
    """The paddings of Paddle's ``"SAME"`` over ``spatial``, all begins then all ends (ONNX's
    ``pads``): per axis a total of ``(ceil(in / stride) - 1) * stride + kernel - in`` (at least
    0), the odd one at the end."""
    totals = [max((-(-size // stride) - 1) * stride + k - size, 0) for size, stride, k in zip(spatial, strides, kernel)]
    return [total // 2 for total in totals] + [total - total // 2 for total in totals]


def onnx_pads(paddings: Sequence[int], spatial_rank: int) -> list[int]:
    """ONNX ``pads`` (all begins, then all ends) of a conv's or pool's Paddle ``paddings``:
    one per spatial axis (both sides) or a ``(begin, end)`` pair per axis."""
    paddings = [int(p) for p in paddings]
    if len(paddings) == spatial_rank:
        return paddings + paddings
    if len(paddings) != 2 * spatial_rank:
        raise NotImplementedError(f"paddings {paddings} of a {spatial_rank}-d op are not exported")
    return paddings[0::2] + paddings[1::2]


def _paddings(op, spatial: list[int]) -> tuple[list[int], list[int]] | None:
    """The (begins, ends) paddings of a windowed pool over ``spatial`` (None: a ``"SAME"``
    padding over a size unknown when traced)."""
    ksize, strides = list(op.attr("ksize")), list(op.attr("strides"))
    algorithm = op.attr("padding_algorithm") if op.has_attr("padding_algorithm") else "EXPLICIT"
    if algorithm == "VALID":
        return [0] * len(ksize), [0] * len(ksize)
    if algorithm == "SAME":
        if min(spatial) < 1:
            return None
        pads = same_pads(spatial, strides, ksize)
    else:
        pads = onnx_pads(op.attr("paddings"), len(ksize))
    return pads[:len(ksize)], pads[len(ksize):]


def _zero_padded(block: "paddle.static.Block", pool, source: str, begins: list[int]) -> str:
    """``source`` padded with ``begins[i]`` zeros on both sides of spatial axis ``i``, by a
    ``pad3d`` in front of ``pool`` (a 4-d tensor unsqueezed to 5-d around it, as Paddle traces
    ``F.pad``: its ``pad`` op crashed Paddle Inference). Returns the padded tensor's name."""
    var = block.var(source)
    shape = list(var.shape)
    stem = f"{source}.padded_{len(block.ops)}"
    padded = [*shape[:2], *(size + 2 * begin for size, begin in zip(shape[2:], begins))]
    to_5d = len(shape) == 4
    begins = [0] * to_5d + begins  # depth, height, width
    paddings = [p for begin in reversed(begins) for p in (begin, begin)]  # width first

    def new_var(suffix: str, var_shape: list[int]) -> str:
        return block.create_var(name=f"{stem}.{suffix}", shape=var_shape, dtype=var.dtype).name

    index = op_index(block, pool)
    if to_5d:
        unsqueezed = new_var("5d", [shape[0], shape[1], 1, *shape[2:]])
        insert_op(block, index, type="unsqueeze2", inputs={"X": [source]},
                  outputs={"Out": [unsqueezed], "XShape": [new_var("xshape0", [0, *shape])]}, attrs={"axes": [2]})
        index += 1
    else:
        unsqueezed = source
    out = new_var("out", [padded[0], padded[1], 1, *padded[2:]] if to_5d else padded)
    insert_op(block, index, type="pad3d", inputs={"X": [unsqueezed]}, outputs={"Out": [out]},
              attrs={"paddings": paddings, "mode": "constant", "value": 0.0, "data_format": "NCDHW"})
    if not to_5d:
        return out
    squeezed = new_var("4d", padded)
    insert_op(block, index + 1, type="squeeze2", inputs={"X": [out]},
              outputs={"Out": [squeezed], "XShape": [new_var("xshape1", [0, *block.var(out).shape])]},
              attrs={"axes": [2]})
    return squeezed


def exact_padded_pools(block: "paddle.static.Block") -> int:
    """Rewrites each windowed ``pool2d`` / ``pool3d`` with unequal begin and end paddings or
    ``ceil_mode`` as the module describes. A pool whose input size is not fixed by the input
    spec is left as is, with a warning.

    Returns:
        How many pools were rewritten.
    """
    rewritten = 0
    for op in list(block.ops):
        if op.type not in ("pool2d", "pool3d") or op.attr("global_pooling") or op.attr("adaptive"):
            continue
        if op.attr("data_format") not in ("NCHW", "NCDHW", "AnyLayout"):
            continue
        source = op.input("X")[0]
        spatial = [int(size) for size in block.var(source).shape[2:]]
        ksize, strides = [int(k) for k in op.attr("ksize")], [int(s) for s in op.attr("strides")]
        paddings = _paddings(op, spatial)
        ceil_mode = bool(op.attr("ceil_mode"))
        unequal = paddings is None or paddings[0] != paddings[1]
        if not unequal and not ceil_mode:
            continue  # both kernels agree
        inclusive = op.attr("pooling_type") == "avg" and not op.attr("exclusive")
        if paddings is None or min(spatial) < 1:
            if inclusive or (ceil_mode and unequal):  # a maximum or exclusive average agrees otherwise
                logger.warning(
                    "%s %s -> %s has unequal paddings or ceil_mode on an input size not fixed by "
                    "the input spec: left as is, though Paddle Inference's oneDNN kernel may count "
                    "padding in an average (or fail) where Paddle's CPU kernel does not",
                    op.type, source, op.output("Out")[0],
                )
            continue
        begins, ends = paddings
        outputs = [
            (size + begin + end - k + (stride - 1 if ceil_mode else 0)) // stride + 1
            for size, begin, end, k, stride in zip(spatial, begins, ends, ksize, strides)
        ]
        reached = [
            max((out - 1) * stride + k - size - begin, 0)
            for out, stride, k, size, begin in zip(outputs, strides, ksize, spatial, begins)
        ]
        if inclusive and any(end > begin for begin, end in zip(begins, reached)):
            op._rename_input(source, _zero_padded(block, op, source, begins))
            op._set_attr("exclusive", True)
            begins, reached = [0] * len(begins), [max(end - begin, 0) for begin, end in zip(begins, reached)]
        op._set_attr("paddings", [p for begin, end in zip(begins, reached) for p in (begin, end)])
        op._set_attr("padding_algorithm", "EXPLICIT")
        op._set_attr("ceil_mode", False)
        rewritten += 1
    return rewritten
