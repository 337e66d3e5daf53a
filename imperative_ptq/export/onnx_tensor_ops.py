"""ONNX translations of further float ops: index arithmetic, vector math and layout shifts.

The ops here compute in float (or on integers) between the quantized layers, like those of
:mod:`.onnx_float_ops`; each is written from ONNX ops that every runtime has since opset 13,
except where a method names the first opset with the form it needs (``ScatterElements`` that
adds or multiplies: 16). :class:`TensorOpConverters` is a mixin of the export's converter and
uses its graph helpers (``_node``, ``_const``, ``_in``, ``_out``, ``_bind``, ``_shape``,
``_tensor``, ``_reduce_node``, ``_require_opset``, ``_reject_tensor_inputs``).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import paddle

__all__ = ["TensorOpConverters", "numpy_dtype"]

#: The first opset whose ``ScatterElements`` adds or multiplies (``reduction``).
SCATTER_REDUCTION_OPSET = 16

#: Paddle's ``cross`` ``dim`` when none is given: the first axis of size 3.
_CROSS_FIRST_AXIS_OF_3 = 9


def numpy_dtype(var_type: Any) -> np.dtype:
    """The numpy dtype of a Paddle ``VarType`` (or its integer value in an op attribute)."""
    if isinstance(var_type, int):
        var_type = paddle.base.core.VarDesc.VarType(var_type)
    return np.dtype(paddle.base.data_feeder.convert_dtype(var_type))


class TensorOpConverters:
    """Converters of index, vector-math and layout ops (a mixin of the ONNX export's converter)."""

    def tensor_dispatch(self) -> dict[str, Callable[[Any], None]]:
        """Op type -> converter, for every op this mixin translates."""
        return {
            "log2": self._log_base, "log10": self._log_base, "stanh": self._stanh,
            "elementwise_heaviside": self._heaviside,
            "elementwise_fmax": self._nan_ignoring_extreme, "elementwise_fmin": self._nan_ignoring_extreme,
            "unstack": self._unstack, "crop_tensor": self._crop, "cross": self._cross,
            "put_along_axis": self._put_along_axis, "index_add": self._index_add,
            "sequence_mask": self._sequence_mask, "frobenius_norm": self._frobenius_norm,
            "dist": self._dist, "mv": self._mv, "addmm": self._addmm,
            "temporal_shift": self._temporal_shift, "isclose": self._isclose,
            "eye": self._eye, "triu_indices": self._triangle_indices, "tril_indices": self._triangle_indices,
            "where_index": self._nonzero, "masked_select": self._masked_select,
            "copysign": self._copysign, "diag_embed": self._diag_embed, "determinant": self._determinant,
            "index_put": self._index_put,
        }

    def _int64(self, values) -> str:
        return self._const("ints", np.asarray(values, np.int64))

    def _float(self, value: float) -> str:
        return self._const("value", np.array(value, np.float32))

    def _log_base(self, op) -> None:
        """log2 / log10: the natural ``Log`` divided by that of the base."""
        out = self._out(op)
        base = 2.0 if op.type == "log2" else 10.0
        natural = self._node("Log", [self._in(op)], out + ".ln")
        self._bind(out, self._node("Div", [natural, self._float(math.log(base))], out))

    def _stanh(self, op) -> None:
        """stanh: ``scale_b * tanh(scale_a * x)``."""
        out = self._out(op)
        inner = self._node("Mul", [self._in(op), self._float(float(op.attr("scale_a")))], out + ".scaled")
        tanh = self._node("Tanh", [inner], out + ".tanh")
        self._bind(out, self._node("Mul", [tanh, self._float(float(op.attr("scale_b")))], out))

    def _heaviside(self, op) -> None:
        """heaviside(x, y): 0 below zero, 1 above, ``y`` at zero (``Where`` broadcasts)."""
        out = self._out(op)
        x, y = self._in(op, "X"), self._in(op, "Y")
        zero = self._float(0.0)
        step = self._node("Cast", [self._node("Greater", [x, zero], out + ".positive")], out + ".step",
                          to=self.onnx.TensorProto.FLOAT)
        self._bind(out, self._node("Where", [self._node("Equal", [x, zero], out + ".zero"), y, step], out))

    def _nan_ignoring_extreme(self, op) -> None:
        """fmax / fmin: ``Max`` / ``Min``, except that a NaN on one side gives the other."""
        out = self._out(op)
        x, y = self._in(op, "X"), self._in(op, "Y")
        extreme = self._node("Max" if op.type == "elementwise_fmax" else "Min", [x, y], out + ".extreme")
        kept = self._node("Where", [self._node("IsNaN", [y], out + ".y_nan"), x, extreme], out + ".kept")
        self._bind(out, self._node("Where", [self._node("IsNaN", [x], out + ".x_nan"), y, kept], out))

    def _unstack(self, op) -> None:
        """unstack along ``axis``: a ``Split`` into slices of one, each squeezed."""
        outputs = op.output("Y")
        axis = int(op.attr("axis"))
        parts = [self._unique(name + ".slice") for name in outputs]
        self.nodes.append(self.helper.make_node(
            "Split", [self._in(op), self._int64(np.ones(len(outputs)))], parts, axis=axis,
        ))
        for name, part in zip(outputs, parts):
            self._bind(name, self._node("Squeeze", [part, self._int64([axis])], name))

    def _crop(self, op) -> None:
        """crop_tensor (``paddle.crop``) with a constant shape and offsets: a ``Slice`` (a shape
        of -1 keeps the rest of that axis)."""
        self._reject_tensor_inputs(op, "Shape", "Offsets", "ShapeTensor", "OffsetsTensor")
        out = self._out(op)
        shape, offsets = list(op.attr("shape")), list(op.attr("offsets"))
        if not offsets:
            offsets = [0] * len(shape)
        ends = [np.iinfo(np.int64).max if size == -1 else offset + size for size, offset in zip(shape, offsets)]
        self._bind(out, self._node("Slice", [
            self._in(op), self._int64(offsets), self._int64(ends), self._int64(range(len(shape))),
        ], out))

    def _cross(self, op) -> None:
        """cross along an axis of size 3: ``x[i+1] y[i+2] - x[i+2] y[i+1]`` (indices mod 3) by
        ``Gather``s of the rotated indices."""
        out = self._out(op)
        shape = self._shape(op.input("X")[0])
        axis = int(op.attr("dim"))
        if axis == _CROSS_FIRST_AXIS_OF_3 or axis >= len(shape) or axis < -len(shape):
            axis = next(i for i, size in enumerate(shape) if size == 3)
        x, y = self._in(op, "X"), self._in(op, "Y")

        def rotated(tensor: str, shift: int) -> str:
            return self._node("Gather", [tensor, self._int64([(i + shift) % 3 for i in range(3)])],
                              out + ".rotated", axis=axis)

        first = self._node("Mul", [rotated(x, 1), rotated(y, 2)], out + ".first")
        second = self._node("Mul", [rotated(x, 2), rotated(y, 1)], out + ".second")
        self._bind(out, self._node("Sub", [first, second], out))

    def _scatter_reduction(self, op, reduce: str) -> dict[str, str]:
        """The ``ScatterElements`` attributes of a Paddle scatter reduction."""
        if reduce == "assign":
            return {}
        kind = {"add": "add", "mul": "mul", "multiply": "mul"}.get(reduce)
        if kind is None:
            raise NotImplementedError(f"{op.type} with reduce={reduce!r} is not exported")
        self._require_opset(SCATTER_REDUCTION_OPSET, f"{op.type} with reduce={reduce!r} is ScatterElements' reduction")
        return {"reduction": kind}

    def _put_along_axis(self, op) -> None:
        """put_along_axis: ``ScatterElements`` (the program expands the values to the index's
        shape); ``reduce`` assign, or add / multiply from opset 16, including the input."""
        out = self._out(op, "Result")
        if op.has_attr("include_self") and not op.attr("include_self"):
            raise NotImplementedError("put_along_axis with include_self=False is not exported")
        attrs = self._scatter_reduction(op, op.attr("Reduce"))
        index = self._node("Cast", [self._in(op, "Index")], out + ".index", to=self.onnx.TensorProto.INT64)
        self._bind(out, self._node(
            "ScatterElements", [self._in(op, "Input"), index, self._in(op, "Value")], out,
            axis=int(op.attr("Axis")), **attrs,
        ))

    def _index_add(self, op) -> None:
        """index_add along ``axis``: the index spread to the values' shape (each value's place
        along the axis) and added by ``ScatterElements`` (opset 16)."""
        self._require_opset(SCATTER_REDUCTION_OPSET, "index_add is ScatterElements' add")
        out = self._out(op)
        rank = len(self._shape(op.input("X")[0]))
        axis = int(op.attr("axis")) % rank
        values = self._in(op, "AddValue")
        shape = [1] * rank
        shape[axis] = -1
        index = self._node("Cast", [self._in(op, "Index")], out + ".index", to=self.onnx.TensorProto.INT64)
        spread = self._node("Expand", [
            self._node("Reshape", [index, self._int64(shape)], out + ".column"),
            self._node("Shape", [values], out + ".shape"),
        ], out + ".spread")
        self._bind(out, self._node("ScatterElements", [self._in(op), spread, values], out,
                                   axis=axis, reduction="add"))

    def _sequence_mask(self, op) -> None:
        """sequence_mask: ``arange(maxlen) < length`` for each length (``maxlen`` -1: the
        largest length), cast to ``out_dtype``."""
        self._reject_tensor_inputs(op, "MaxLenTensor")
        out = self._out(op, "Y")
        lengths = self._node("Cast", [self._in(op)], out + ".lengths", to=self.onnx.TensorProto.INT64)
        maxlen = int(op.attr("maxlen"))
        if maxlen < 0:
            limit = self._reduce_node("ReduceMax", lengths, None, False, out + ".maxlen")
        else:
            limit = self._const("maxlen", np.array(maxlen, np.int64))
        positions = self._node("Range", [self._const("start", np.array(0, np.int64)), limit,
                                         self._const("delta", np.array(1, np.int64))], out + ".positions")
        column = self._node("Unsqueeze", [lengths, self._int64([-1])], out + ".column")
        mask = self._node("Less", [positions, column], out + ".mask")
        dtype = numpy_dtype(self.block._find_var_recursive(out).dtype)
        self._bind(out, self._node("Cast", [mask], out, to=self.helper.np_dtype_to_tensor_dtype(dtype)))

    def _frobenius_norm(self, op) -> None:
        """frobenius_norm over ``dim`` (all axes with ``reduce_all``): the square root of the
        sum of squares."""
        out = self._out(op)
        x = self._in(op)
        axes = None if op.attr("reduce_all") else [int(a) for a in op.attr("dim")]
        squares = self._node("Mul", [x, x], out + ".squares")
        total = self._reduce_node("ReduceSum", squares, axes, bool(op.attr("keep_dim")), out + ".sum")
        self._bind(out, self._node("Sqrt", [total], out))

    def _dist(self, op) -> None:
        """dist: the ``p``-norm of ``x - y`` over all elements (p = 0: the count of nonzero
        differences; inf / -inf: the largest / smallest magnitude)."""
        out = self._out(op)
        p = float(op.attr("p"))
        difference = self._node("Abs", [self._node("Sub", [self._in(op, "X"), self._in(op, "Y")], out + ".sub")], out + ".abs")
        if p == 0:
            nonzero = self._node("Cast", [self._node("Greater", [difference, self._float(0.0)], out + ".nonzero")], out + ".count", to=self.onnx.TensorProto.FLOAT)
            norm = self._reduce_node("ReduceSum", nonzero, None, False, out + ".norm")
        elif math.isinf(p):
            norm = self._reduce_node("ReduceMax" if p > 0 else "ReduceMin", difference, None, False, out + ".norm")
        else:
            powered = self._node("Pow", [difference, self._float(p)], out + ".pow")
            total = self._reduce_node("ReduceSum", powered, None, False, out + ".sum")
            norm = self._node("Pow", [total, self._float(1.0 / p)], out + ".norm")
        shape = self._shape(out)
        self._bind(out, self._node("Reshape", [norm, self._int64([max(d, 1) for d in shape])], out)
                   if shape else self._node("Identity", [norm], out))

    def _mv(self, op) -> None:
        """mv (``paddle.mv``): a matrix times a vector."""
        out = self._out(op)
        self._bind(out, self._node("MatMul", [self._in(op, "X"), self._in(op, "Vec")], out))

    def _addmm(self, op) -> None:
        """addmm: ``Beta * input + Alpha * (x @ y)``."""
        out = self._out(op)
        product = self._node("MatMul", [self._in(op, "X"), self._in(op, "Y")], out + ".product")
        scaled = self._node("Mul", [product, self._float(float(op.attr("Alpha")))], out + ".scaled")
        base = self._node("Mul", [self._in(op, "Input"), self._float(float(op.attr("Beta")))], out + ".base")
        self._bind(out, self._node("Add", [base, scaled], out))

    def _temporal_shift(self, op) -> None:
        """temporal_shift (TSM, NCHW): frames folded into the batch, ``seg_num`` per clip; the
        first ``C * shift_ratio`` channels take the previous frame's values, the next as many
        the next frame's (zeros past the clip's ends), the rest stay."""
        if op.attr("data_format") != "NCHW":
            raise NotImplementedError("temporal_shift in NHWC is not exported")
        out = self._out(op)
        _, channels, height, width = self._shape(op.input("X")[0])
        if min(channels, height, width) <= 0:
            raise NotImplementedError("temporal_shift of a dynamic channel or spatial size is not exported")
        frames = int(op.attr("seg_num"))
        fold = int(channels * float(op.attr("shift_ratio")))
        clips = self._node("Reshape", [self._in(op), self._int64([-1, frames, channels, height, width])], out + ".clips")

        def channel_slice(start: int, end: int) -> str:
            return self._node("Slice", [clips, self._int64([start]), self._int64([end]), self._int64([2])], out + ".part")

        def shifted(part: str, from_next: bool) -> str:
            pads = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
            pads[6 if from_next else 1] = 1  # one frame of zeros after (before) the clip
            padded = self._node("Pad", [part, self._int64(pads)], out + ".padded")
            start = 1 if from_next else 0
            return self._node("Slice", [padded, self._int64([start]), self._int64([start + frames]), self._int64([1])],
                              out + ".shifted")

        parts = [shifted(channel_slice(0, fold), False), shifted(channel_slice(fold, 2 * fold), True),
                 channel_slice(2 * fold, channels)]
        joined = self._node("Concat", parts, out + ".joined", axis=2)
        self._bind(out, self._node("Reshape", [joined, self._int64([-1, channels, height, width])], out))

    def _isclose(self, op) -> None:
        """isclose: ``|x - y| <= atol + rtol * |y|``, NaNs equal with ``equal_nan``."""
        self._reject_tensor_inputs(op, "Rtol", "Atol")
        out = self._out(op)
        x, y = self._in(op, "Input"), self._in(op, "Other")
        rtol, atol = float(op.attr("rtol")), float(op.attr("atol"))
        gap = self._node("Abs", [self._node("Sub", [x, y], out + ".sub")], out + ".gap")
        bound = self._node("Add", [self._float(atol), self._node("Mul", [self._float(rtol), self._node("Abs", [y], out + ".abs_y")], out + ".relative")], out + ".bound")
        close = self._node("Not", [self._node("Greater", [gap, bound], out + ".far")], out + ".close")
        if op.attr("equal_nan"):
            both = self._node("And", [self._node("IsNaN", [x], out + ".x_nan"), self._node("IsNaN", [y], out + ".y_nan")], out + ".both_nan")
            close = self._node("Or", [close, both], out + ".close_or_nan")
        else:
            close = self._node("And", [close, self._node("Not", [self._node("IsNaN", [gap], out + ".nan")], out + ".finite")], out + ".close_finite")
        self._bind(out, self._node("Identity", [close], out))

    def _eye(self, op) -> None:
        """eye (``paddle.eye``): a constant identity matrix of the op's type."""
        rows, columns = int(op.attr("num_rows")), int(op.attr("num_columns"))
        value = np.eye(rows, rows if columns < 0 else columns, dtype=numpy_dtype(op.attr("dtype")))
        out = self._out(op)
        self.constants[out] = value
        self._bind(out, self._const(out, value))

    def _triangle_indices(self, op) -> None:
        """triu_indices / tril_indices: the constant ``[2, N]`` row and column indices."""
        if op.type == "triu_indices":
            rows, columns = int(op.attr("row")), int(op.attr("col"))
            indices = np.triu_indices(rows, int(op.attr("offset")), columns)
        else:
            rows, columns = int(op.attr("rows")), int(op.attr("cols"))
            indices = np.tril_indices(rows, int(op.attr("offset")), columns)
        out = self._out(op, "out")
        value = np.stack(indices).astype(numpy_dtype(op.attr("dtype")))
        self.constants[out] = value
        self._bind(out, self._const(out, value))

    def _nonzero(self, op) -> None:
        """where_index (``paddle.nonzero``, ``paddle.where(cond)``): the ``[N, rank]`` int64
        positions where the condition holds (``NonZero`` gives them ``[rank, N]``)."""
        out = self._out(op)
        positions = self._node("NonZero", [self._in(op, "Condition")], out + ".positions")
        self._bind(out, self._node("Transpose", [positions], out, perm=[1, 0]))

    def _masked_select(self, op) -> None:
        """masked_select (``x[mask]``): the elements where the mask (broadcast to ``x``)
        holds, flattened, by ``Compress``."""
        out = self._out(op, "Y")
        x = self._in(op)
        mask = self._node("Expand", [self._in(op, "Mask"), self._node("Shape", [x], out + ".shape")], out + ".mask")
        flat = self._node("Reshape", [mask, self._int64([-1])], out + ".flat_mask")
        self._bind(out, self._node("Compress", [x, flat], out))

    def _copysign(self, op) -> None:
        """copysign: ``|x|`` with the sign of ``y``, a negative zero's included (``1 / y < 0``)."""
        out = self._out(op, "out")
        x, y = self._in(op, "x"), self._in(op, "y")
        zero = self._float(0.0)
        negative_zero = self._node("And", [
            self._node("Equal", [y, zero], out + ".zero"),
            self._node("Less", [self._node("Div", [self._float(1.0), y], out + ".inverse"), zero], out + ".negative_inverse"),
        ], out + ".negative_zero")
        negative = self._node("Or", [self._node("Less", [y, zero], out + ".negative"), negative_zero], out + ".sign")
        magnitude = self._node("Abs", [x], out + ".abs")
        self._bind(out, self._node("Where", [negative, self._node("Neg", [magnitude], out + ".neg"), magnitude], out))

    def _diag_embed(self, op) -> None:
        """diag_embed onto the last two axes at offset 0: each vector times an identity
        matrix (its length known)."""
        out = self._out(op)
        length = self._shape(op.input("Input")[0])[-1]
        if int(op.attr("offset")) != 0 or (int(op.attr("dim1")), int(op.attr("dim2"))) != (-2, -1) or length <= 0:
            raise NotImplementedError("diag_embed is exported at offset 0 onto the last two axes, of a known length")
        column = self._node("Unsqueeze", [self._in(op, "Input"), self._int64([-1])], out + ".column")
        identity = self._const("identity", np.eye(length, dtype=np.float32))
        self._bind(out, self._node("Mul", [column, identity], out))

    def _determinant(self, op) -> None:
        """determinant (``paddle.linalg.det``): ONNX's ``Det`` over the last two axes."""
        out = self._out(op)
        self._bind(out, self._node("Det", [self._in(op, "Input")], out))

    def _index_put(self, op) -> None:
        """index_put (``x[rows] = value`` with integer index tensors, one per leading axis):
        ``ScatterND`` of the value broadcast to each indexed slice; ``accumulate`` adds (opset
        16). Boolean and multi-dimensional indices are not exported."""
        out = self._out(op, "out")
        names = op.input("indices")
        if any(numpy_dtype(self.block._find_var_recursive(n).dtype) == np.bool_ or len(self._shape(n)) != 1 for n in names):
            raise NotImplementedError("index_put with boolean or multi-dimensional indices is not exported")
        attrs = {}
        if op.attr("accumulate"):
            self._require_opset(SCATTER_REDUCTION_OPSET, "index_put with accumulate=True is ScatterND's add")
            attrs["reduction"] = "add"
        x = self._in(op, "x")
        columns = [
            self._node("Unsqueeze", [self._node("Cast", [self._tensor(op, name)], out + ".index", to=self.onnx.TensorProto.INT64),
                                     self._int64([-1])], out + ".column")
            for name in names
        ]
        indices = self._node("Concat", columns, out + ".indices", axis=-1) if len(columns) > 1 else columns[0]
        count = self._node("Slice", [self._node("Shape", [indices], out + ".count_shape"), self._int64([0]), self._int64([1])], out + ".count")
        rest = self._node("Slice", [self._node("Shape", [x], out + ".shape"), self._int64([len(names)]),
                                    self._int64([np.iinfo(np.int64).max])], out + ".rest")
        target = self._node("Concat", [count, rest], out + ".target", axis=0)
        updates = self._node("Expand", [self._in(op, "value"), target], out + ".updates")
        self._bind(out, self._node("ScatterND", [x, indices, updates], out, **attrs))
