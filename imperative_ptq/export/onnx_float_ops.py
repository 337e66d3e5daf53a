"""ONNX translations of the Paddle ops a quantized model runs in float.

Activations, elementwise math, normalizations, padding, broadcasting, gathering, reductions and
constants touch no scale: where the simulation quantizes their input or output, the QDQ
export (:mod:`.onnx_export`) puts a ``DequantizeLinear`` before them and a ``QuantizeLinear``
after them, and they compute in float in between, as in the simulation.

:class:`FloatOpConverters` is a mixin of the export's converter: each method translates one
legacy op with the converter's graph helpers (``_node``, ``_const``, ``_in``, ``_out``,
``_bind``, ``_shape``, ``_param``, ``_is_param``), and :meth:`FloatOpConverters.float_dispatch`
names them by op type. Ops that are one ONNX op of one input are a row of :data:`UNARY_OPS`.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .graph import fill_constant_value
from .onnx_tensor_ops import TensorOpConverters, numpy_dtype

__all__ = ["FloatOpConverters", "UNARY_OPS", "numpy_dtype"]

#: Paddle op -> (ONNX op, {ONNX attribute: Paddle attribute}) for ops that are one ONNX op of
#: their input ``X`` (same formula and attribute meaning; Paddle's ``softmax``/``log_softmax``
#: take one axis, like ONNX's from opset 13).
UNARY_OPS: dict[str, tuple[str, dict[str, str]]] = {
    "relu": ("Relu", {}),
    "isnan_v2": ("IsNaN", {}),
    "sigmoid": ("Sigmoid", {}),
    "tanh": ("Tanh", {}),
    "exp": ("Exp", {}),
    "log": ("Log", {}),
    "sqrt": ("Sqrt", {}),
    "abs": ("Abs", {}),
    "assign": ("Identity", {}),
    "softmax": ("Softmax", {"axis": "axis"}),
    "log_softmax": ("LogSoftmax", {"axis": "axis"}),
    "leaky_relu": ("LeakyRelu", {"alpha": "alpha"}),
    "elu": ("Elu", {"alpha": "alpha"}),
    "celu": ("Celu", {"alpha": "alpha"}),
    "selu": ("Selu", {"alpha": "alpha", "gamma": "scale"}),
    "erf": ("Erf", {}),
    "floor": ("Floor", {}),
    "ceil": ("Ceil", {}),
    "sign": ("Sign", {}),
    "sin": ("Sin", {}),
    "cos": ("Cos", {}),
    "tan": ("Tan", {}),
    "asin": ("Asin", {}),
    "acos": ("Acos", {}),
    "atan": ("Atan", {}),
    "sinh": ("Sinh", {}),
    "cosh": ("Cosh", {}),
    "asinh": ("Asinh", {}),
    "acosh": ("Acosh", {}),
    "atanh": ("Atanh", {}),
    "isinf_v2": ("IsInf", {}),
    "reciprocal": ("Reciprocal", {}),
    "softsign": ("Softsign", {}),
    "logical_not": ("Not", {}),
    # ONNX Shrink: x - bias above lambd, x + bias below -lambd, else 0.
    "hard_shrink": ("Shrink", {"lambd": "threshold"}),
    "softshrink": ("Shrink", {"lambd": "lambda", "bias": "lambda"}),
}

#: Paddle's comparison and logical ops of two inputs -> ONNX's (numpy broadcasting; Paddle's
#: ``axis`` is -1 for every Python operator). ``not_equal`` is ``Not(Equal)``.
_LOGIC_OPS = {
    "greater_than": "Greater", "greater_equal": "GreaterOrEqual", "less_than": "Less",
    "less_equal": "LessOrEqual", "equal": "Equal", "not_equal": "Equal",
    "logical_and": "And", "logical_or": "Or", "logical_xor": "Xor",
}

#: Paddle's reduce ops -> ONNX's.
_REDUCE_OPS = {
    "reduce_mean": "ReduceMean", "reduce_sum": "ReduceSum", "reduce_max": "ReduceMax",
    "reduce_min": "ReduceMin", "reduce_prod": "ReduceProd", "reduce_amax": "ReduceMax",
    "reduce_amin": "ReduceMin", "logsumexp": "ReduceLogSumExp",
}

#: pad3d modes -> ONNX Pad modes (``circular``, ONNX's ``wrap`` from opset 19 on, is built
#: from slices: :meth:`FloatOpConverters._circular_pad`).
_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}


class FloatOpConverters(TensorOpConverters):
    """Converters of the ops that run in float (a mixin of the ONNX export's converter)."""

    #: op output -> its value, for the constants (``fill_constant``, ``assign_value``) that
    #: later ops read as attributes (clip bounds, a gather axis).
    constants: dict[str, np.ndarray]

    def float_dispatch(self) -> dict[str, Callable[[Any], None]]:
        """Op type -> converter, for every op this mixin translates."""
        dispatch: dict[str, Callable[[Any], None]] = {kind: self._unary for kind in UNARY_OPS}
        dispatch.update(self.tensor_dispatch())
        dispatch.update({kind: self._reduce for kind in _REDUCE_OPS})
        dispatch.update({kind: self._logic for kind in _LOGIC_OPS})
        dispatch.update({f"bitwise_{kind}": self._bitwise for kind in ("and", "or", "xor", "not")})
        for kinds, converter in (
            (("hard_swish", "hard_sigmoid", "swish", "silu", "mish"), self._gated_activation),
            (("clip", "brelu"), self._clamp),
            (("pow", "square", "rsqrt"), self._power),
            (("fill_constant", "assign_value"), self._constant),
            (("pad", "pad3d"), self._pad),
            (("expand_v2", "expand_as_v2"), self._expand),
            (("tanh_shrink", "logsigmoid", "thresholded_relu"), self._shifted_activation),
        ):
            dispatch.update(dict.fromkeys(kinds, converter))
        dispatch.update({
            "prelu": self._prelu, "softplus": self._softplus, "gelu": self._gelu,
            "cast": self._cast, "batch_norm": self._batch_norm, "layer_norm": self._layer_norm,
            "instance_norm": self._instance_norm, "group_norm": self._group_norm,
            "lookup_table_v2": self._embedding, "tile": self._tile, "stack": self._stack, "sum": self._sum,
            "gather": self._gather, "gather_nd": self._gather_nd, "arg_max": self._arg_max, "p_norm": self._p_norm,
            "slice": self._slice, "nearest_interp_v2": self._interpolate,
            "bilinear_interp_v2": self._interpolate, "linear_interp_v2": self._interpolate,
            "trilinear_interp_v2": self._interpolate,
            "where": self._where,
            "fill_any_like": self._fill_like, "index_select": self._gather,
            "fill_constant_batch_size_like": self._fill_batch_size_like,
            "cumsum": self._cumsum, "shape": self._shape_of, "size": self._shape_of,
            "roll": self._roll, "flip": self._flip, "round": self._round, "top_k_v2": self._top_k,
            "kthvalue": self._kthvalue, "arg_min": self._arg_max,
            "reduce_any": self._reduce_logical, "reduce_all": self._reduce_logical,
            "elementwise_floordiv": self._floor_divide, "elementwise_mod": self._floor_divide,
            "tril_triu": self._tril_triu, "diag_v2": self._diag, "one_hot_v2": self._one_hot,
            "masked_fill": self._masked_fill, "lerp": self._lerp, "einsum": self._einsum,
            "bilinear_tensor_product": self._bilinear,
            "expm1": self._expm1_log1p, "log1p": self._expm1_log1p, "isfinite_v2": self._isfinite,
            "log10": self._log_base, "log2": self._log_base,
            "rrelu": self._rrelu, "channel_shuffle": self._channel_shuffle, "maxout": self._maxout,
            "meshgrid": self._meshgrid, "label_smooth": self._label_smooth,
            "take_along_axis": self._take_along_axis, "lp_pool2d": self._lp_pool, "scatter": self._scatter,
            "scatter_nd_add": self._scatter_nd_add,
            "bicubic_interp_v2": self._interpolate,
            "unbind": self._unbind, "repeat_interleave": self._repeat_interleave,
            "median": self._median, "logcumsumexp": self._logcumsumexp, "unfold": self._unfold,
            "diagonal": self._diagonal, "cumprod": self._cumprod,
            "strided_slice": self._slice, "argsort": self._argsort,
            "mode": self._mode, "kron": self._kron, "trunc": self._trunc, "logit": self._logit,
            "atan2": self._atan2, "range": self._range, "linspace": self._linspace,
            "set_value": self._set_value, "renorm": self._renorm, "searchsorted": self._searchsorted,
            "trace": self._trace, "cummax": self._cumulative_extreme, "cummin": self._cumulative_extreme,
            "fold": self._fold, "broadcast_tensors": self._broadcast_tensors,
            "uniform_random": self._random, "gaussian_random": self._random,
            "index_sample": self._index_sample, "grid_sampler": self._grid_sample,
            "affine_grid": self._affine_grid, "roi_align": self._roi_align, "yolo_box": self._yolo_box,
        })
        return dispatch

    # ------------------------------------------------------------------------------ helpers
    def _scalar(self, stem: str, value: float) -> str:
        return self._const(stem, np.array(value, np.float32))

    def _require_opset(self, first: int, form: str) -> None:
        """Raises ``NotImplementedError`` below opset ``first``, the first with the ONNX form
        ``form`` names (e.g. "fold is ONNX's Col2Im"), telling which opset to pass."""
        if self.opset < first:
            raise NotImplementedError(f"{form} from opset {first} on: pass opset={first} or higher to export_onnx")

    def _reject_tensor_inputs(self, op, *slots: str) -> None:
        """Raises ``NotImplementedError`` when ``op`` reads one of ``slots`` (a shape, size or
        factor given as a tensor, which the export does not evaluate)."""
        for slot in slots:
            if slot in op.input_names and op.input(slot):
                raise NotImplementedError(f"{op.type} with a tensor {slot} is not exported")

    def _reduce_node(self, kind: str, x: str, axes: list[int] | None, keepdims: bool, stem: str) -> str:
        """An ONNX reduce over ``axes`` (all axes if ``None``) in the form of the opset: the
        axes are an input of ``ReduceSum`` from opset 13 and of the others from opset 18, an
        attribute before."""
        if axes is None:
            return self._node(kind, [x], stem, keepdims=int(keepdims))
        if self.opset >= (13 if kind == "ReduceSum" else 18):
            return self._node(kind, [x, self._const("axes", np.array(axes, np.int64))], stem, keepdims=int(keepdims))
        return self._node(kind, [x], stem, axes=axes, keepdims=int(keepdims))

    def _cast_to_output(self, op, tensor: str, output: str, stem: str) -> str:
        """``tensor`` cast to the dtype of program variable ``output`` when the op changes it
        (a ``reduce_sum`` of a bool mask is int64)."""
        wanted = numpy_dtype(self.block._find_var_recursive(output).dtype)
        given = numpy_dtype(self.block._find_var_recursive(op.input("X")[0]).dtype)
        if wanted == given:
            return tensor
        return self._node("Cast", [tensor], stem + ".cast", to=self.helper.np_dtype_to_tensor_dtype(wanted))

    def _clip_bound(self, op, slot: str, attribute: str) -> float | None:
        """A clip bound: the constant tensor in ``slot`` if the op reads one (``None`` when it
        is not a constant), else the attribute."""
        if slot in op.input_names and op.input(slot):
            value = self.constants.get(op.input(slot)[0])
            return None if value is None else float(np.reshape(value, -1)[0])
        return float(op.attr(attribute))

    # ------------------------------------------------------------------------------ activations
    def _unary(self, op) -> None:
        onnx_type, attributes = UNARY_OPS[op.type]
        out = self._out(op)
        attrs = {name: op.attr(paddle_name) for name, paddle_name in attributes.items()}
        self._bind(out, self._node(onnx_type, [self._in(op)], out, **attrs))

    def _gated_activation(self, op) -> None:
        """hard_sigmoid, and the activations that multiply their input by a gate: hard_swish
        (``x * min(max(x + offset, 0), threshold) / scale``), swish (``x * sigmoid(beta x)``),
        silu (swish with beta 1), mish (``x * tanh(softplus(x))``; Paddle's softplus returns
        ``x`` above ``threshold``, 20, where ``tanh`` of either is 1 in float32)."""
        out = self._out(op)
        x = self._in(op)
        if op.type == "hard_sigmoid":
            node = self._node(
                "HardSigmoid", [x], out, alpha=float(op.attr("slope")), beta=float(op.attr("offset"))
            )
        elif op.type == "hard_swish":
            threshold, scale, offset = (float(op.attr(a)) for a in ("threshold", "scale", "offset"))
            if not np.isclose(threshold, scale):
                raise NotImplementedError("hard_swish is exported only with threshold == scale")
            gate = self._node("HardSigmoid", [x], out + ".gate", alpha=1.0 / scale, beta=offset / scale)
            node = self._node("Mul", [x, gate], out)
        elif op.type == "mish":
            gate = self._node("Tanh", [self._node("Softplus", [x], out + ".softplus")], out + ".gate")
            node = self._node("Mul", [x, gate], out)
        else:  # swish, silu
            beta = float(op.attr("beta")) if op.has_attr("beta") else 1.0
            scaled = self._node("Mul", [x, self._scalar("beta", beta)], out + ".scaled") if beta != 1.0 else x
            node = self._node("Mul", [x, self._node("Sigmoid", [scaled], out + ".gate")], out)
        self._bind(out, node)

    def _prelu(self, op) -> None:
        """``x`` where positive, else ``alpha * x``: one alpha (mode ``all``), one per channel
        (``channel``, the channel axis from ``data_format``) or one per element of a sample
        (``element``), shaped to broadcast against ``x`` as ONNX ``PRelu`` does."""
        x_var = op.input("X")[0]
        rank = len(self._shape(x_var))
        alpha_var = op.input("Alpha")[0]
        alpha = self._param(alpha_var).astype(np.float32) if self._is_param(alpha_var) else None
        mode = op.attr("mode")
        channels_last = op.attr("data_format") in ("NHWC", "NLC", "NDHWC")
        if mode == "all":
            shape = [1]
        elif mode == "channel":
            shape = [-1] if channels_last or rank < 3 else [-1] + [1] * (rank - 2)
        elif mode == "element":  # alpha holds one value per element of a sample, in memory order
            shape = self._shape(x_var)[1:]
            if min(shape) < 0:
                raise NotImplementedError("prelu in mode 'element' of a dynamic shape is not exported")
        else:
            raise NotImplementedError(f"prelu mode {mode!r} is not exported")
        out = self._out(op)
        if alpha is not None:
            slope = self._const(alpha_var, alpha.reshape(shape))
        else:
            slope = self._node("Reshape", [self._in(op, "Alpha"), self._const("shape", np.array(shape, np.int64))], out + ".alpha")
        self._bind(out, self._node("PRelu", [self._in(op), slope], out))

    def _softplus(self, op) -> None:
        """``log(1 + exp(beta x)) / beta``, and ``x`` where ``beta x > threshold`` (Paddle's)."""
        beta, threshold = float(op.attr("beta")), float(op.attr("threshold"))
        out = self._out(op)
        x = self._in(op)
        scaled = self._node("Mul", [x, self._scalar("beta", beta)], out + ".scaled") if beta != 1.0 else x
        soft = self._node("Softplus", [scaled], out + ".soft")
        if beta != 1.0:
            soft = self._node("Div", [soft, self._scalar("beta", beta)], out + ".unscaled")
        linear = self._node("Greater", [scaled, self._scalar("threshold", threshold)], out + ".linear")
        self._bind(out, self._node("Where", [linear, x, soft], out))

    def _shifted_activation(self, op) -> None:
        """tanh_shrink (``x - tanh(x)``), logsigmoid (``-softplus(-x)``), thresholded_relu
        (``x`` above ``threshold``, else ``value``)."""
        out = self._out(op)
        x = self._in(op)
        if op.type == "tanh_shrink":
            node = self._node("Sub", [x, self._node("Tanh", [x], out + ".tanh")], out)
        elif op.type == "logsigmoid":
            negated = self._node("Neg", [x], out + ".neg")
            node = self._node("Neg", [self._node("Softplus", [negated], out + ".softplus")], out)
        else:
            above = self._node("Greater", [x, self._scalar("threshold", float(op.attr("threshold")))], out + ".above")
            value = float(op.attr("value")) if op.has_attr("value") else 0.0
            node = self._node("Where", [above, x, self._scalar("value", value)], out)
        self._bind(out, node)

    def _gelu(self, op) -> None:
        out = self._out(op)
        x = self._in(op)
        half = self._scalar("half", 0.5)
        one = self._scalar("one", 1.0)
        if op.attr("approximate"):
            # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
            cube = self._node("Mul", [x, self._node("Mul", [x, x], out + ".sq")], out + ".cube")
            inner = self._node("Add", [x, self._node(
                "Mul", [cube, self._scalar("c", 0.044715)], out + ".c3")], out + ".in")
            scaled = self._node("Mul", [inner, self._scalar("k", np.sqrt(2 / np.pi))], out + ".k")
            gate = self._node("Tanh", [scaled], out + ".tanh")
        else:  # 0.5 x (1 + erf(x / sqrt(2)))
            scaled = self._node("Div", [x, self._scalar("sqrt2", np.sqrt(2.0))], out + ".s")
            gate = self._node("Erf", [scaled], out + ".erf")
        y = self._node("Mul", [self._node("Mul", [x, half], out + ".half"),
                               self._node("Add", [gate, one], out + ".one")], out)
        self._bind(out, y)

    def _clamp(self, op) -> None:
        """clip (bounds as attributes or as tensors ``Min``/``Max``) and brelu (``F.hardtanh``),
        the bounds in the input's dtype (an int64 clip of relative positions, DeBERTa's: ONNX
        Runtime refuses a Clip whose bounds' type differs from its input's)."""
        out = self._out(op)
        dtype = numpy_dtype(self.block._find_var_recursive(op.input("X")[0]).dtype)
        if op.type == "brelu":
            values = [float(op.attr("t_min")), float(op.attr("t_max"))]
        else:
            values = [None if op.input(slot) else float(op.attr(slot.lower())) for slot in ("Min", "Max")]
        bounds = []
        for slot, value in zip(("Min", "Max"), values):
            stem = out + "." + slot.lower()
            if value is not None:
                bounds.append(self._const(stem, np.array(value).astype(dtype)))
                continue
            # Paddle takes a [1] or [] tensor; ONNX a scalar of the input's type.
            empty = self._const("shape", np.zeros([0], np.int64))
            bound = self._node("Reshape", [self._in(op, slot), empty], stem)
            given = numpy_dtype(self.block._find_var_recursive(op.input(slot)[0]).dtype)
            if given != dtype:
                bound = self._node("Cast", [bound], stem + ".cast", to=self.helper.np_dtype_to_tensor_dtype(dtype))
            bounds.append(bound)
        self._bind(out, self._node("Clip", [self._in(op), *bounds], out))

    # ------------------------------------------------------------------------------ math
    def _power(self, op) -> None:
        """pow (a constant exponent ``factor``), square, rsqrt."""
        x, out = self._in(op), self._out(op)
        if op.type == "square":
            node = self._node("Mul", [x, x], out)
        elif op.type == "rsqrt":
            node = self._node("Reciprocal", [self._node("Sqrt", [x], out + ".sqrt")], out)
        else:
            self._reject_tensor_inputs(op, "FactorTensor")
            node = self._node("Pow", [x, self._scalar("factor", float(op.attr("factor")))], out)
        self._bind(out, node)

    def _cast(self, op) -> None:
        out = self._out(op)
        to = self.helper.np_dtype_to_tensor_dtype(numpy_dtype(op.attr("out_dtype")))
        self._bind(out, self._node("Cast", [self._in(op)], out, to=to))

    def _logic(self, op) -> None:
        """Comparisons and logical ops of ``X`` and ``Y``, broadcasting as numpy does."""
        if op.has_attr("axis") and int(op.attr("axis")) != -1:
            raise NotImplementedError(f"{op.type} with axis {op.attr('axis')} is not exported")
        out = self._out(op)
        node = self._node(_LOGIC_OPS[op.type], [self._in(op), self._in(op, "Y")], out + ".logic")
        if op.type == "not_equal":
            node = self._node("Not", [node], out)
        self._bind(out, node)

    def _bitwise(self, op) -> None:
        """bitwise_and / or / xor / not (``&``, ``|``, ``^``, ``~`` on tensors; a causal mask
        joined with a padding mask in PaddleNLP's decoders): ONNX's logical ops on bool
        tensors, its ``Bitwise*`` ops (opset 18) on integers."""
        out = self._out(op)
        kind = op.type[len("bitwise_"):].capitalize()
        inputs = [self._in(op)] + ([] if kind == "Not" else [self._in(op, "Y")])
        if numpy_dtype(self.block._find_var_recursive(op.input("X")[0]).dtype) == np.bool_:
            node = self._node(kind, inputs, out)
        elif self.opset >= 18:
            node = self._node("Bitwise" + kind, inputs, out)
        else:
            raise NotImplementedError(
                f"{op.type} of integers needs ONNX opset 18 (Bitwise{kind}): export with opset=18"
            )
        self._bind(out, node)

    def _where(self, op) -> None:
        out = self._out(op)
        inputs = [self._in(op, "Condition"), self._in(op), self._in(op, "Y")]
        self._bind(out, self._node("Where", inputs, out))

    def _fill_like(self, op) -> None:
        """fill_any_like (``zeros_like``, ``full_like``): ``value`` in the shape of ``X``, of
        ``dtype`` (-1: ``X``'s)."""
        out = self._out(op)
        dtype = numpy_dtype(self.block._find_var_recursive(out).dtype)
        value = self.helper.make_tensor("value", self.helper.np_dtype_to_tensor_dtype(dtype), [1], [dtype.type(op.attr("value")).item()])
        shape = self._node("Shape", [self._in(op)], out + ".shape")
        self._bind(out, self._node("ConstantOfShape", [shape], out, value=value))

    def _fill_batch_size_like(self, op) -> None:
        """fill_constant_batch_size_like (what a scalar divided by a tensor, ``1.0 / x``,
        traces to): ``value`` in the shape ``shape`` whose axis ``output_dim_idx`` is ``Input``'s
        axis ``input_dim_idx`` (the batch size), as ``ConstantOfShape``."""
        out = self._out(op)
        dtype = numpy_dtype(op.attr("dtype"))
        number = dtype.type(fill_constant_value(op)).item()
        value = self.helper.make_tensor("value", self.helper.np_dtype_to_tensor_dtype(dtype), [1], [number])
        shape = [int(d) for d in op.attr("shape")]
        at = int(op.attr("output_dim_idx"))
        batch = self._node(
            "Gather", [self._node("Shape", [self._in(op, "Input")], out + ".input_shape"),
                       self._const("axis", np.array([int(op.attr("input_dim_idx"))], np.int64))],
            out + ".batch", axis=0,
        )
        pieces = [batch]
        if shape[:at]:
            pieces.insert(0, self._const("shape", np.array(shape[:at], np.int64)))
        if shape[at + 1:]:
            pieces.append(self._const("shape", np.array(shape[at + 1:], np.int64)))
        sizes = self._node("Concat", pieces, out + ".sizes", axis=0)
        self._bind(out, self._node("ConstantOfShape", [sizes], out, value=value))

    def _cumsum(self, op) -> None:
        """cumsum along ``axis`` (of the flattened input with ``flatten``)."""
        out = self._out(op)
        x, axis = self._in(op), int(op.attr("axis"))
        if op.attr("flatten"):
            x, axis = self._node("Reshape", [x, self._const("shape", np.array([-1], np.int64))], out + ".flat"), 0
        attrs = dict(exclusive=int(op.attr("exclusive")), reverse=int(op.attr("reverse")))
        self._bind(out, self._node("CumSum", [x, self._const("axis", np.array(axis, np.int64))], out, **attrs))

    def _cumulative_extreme(self, op) -> None:
        """cummax / cummin along an axis of known length ``L``: per position ``i`` the
        extreme of ``x[..j..]`` over ``j <= i`` (an ``[..., L, L]`` comparison of the axis
        moved last, masked below its diagonal) and its index, the last ``j`` holding that
        value (as Paddle picks it among equal ones)."""
        source = op.input("x")[0]
        shape = self._shape(source)
        rank = len(shape)
        axis = int(op.attr("axis")) % rank
        length = shape[axis]
        out, indices_out = op.output("out")[0], op.output("indices")[0]
        if length < 0:
            raise NotImplementedError(f"{op.type} along an axis of dynamic length is not exported")
        perm = [a for a in range(rank) if a != axis] + [axis]
        moved = self._tensor(op, source)
        if axis != rank - 1:
            moved = self._node("Transpose", [moved], out + ".moved", perm=perm)
        row = self._node("Unsqueeze", [moved, self._const("axes", np.array([-2], np.int64))], out + ".row")  # [..., 1, L]
        reached = self._const("reached", np.tril(np.ones([length, length], dtype=bool)))  # j <= i
        largest = op.type == "cummax"
        dtype = numpy_dtype(self.block._find_var_recursive(source).dtype)
        bound = np.array(-np.inf if largest else np.inf, dtype) if dtype.kind == "f" else np.array(
            np.iinfo(dtype).min if largest else np.iinfo(dtype).max, dtype)
        masked = self._node("Where", [reached, row, self._const("bound", bound)], out + ".masked")
        extremes = self._reduce_node("ReduceMax" if largest else "ReduceMin", masked, [-1], False, out + ".values")
        column = self._node("Unsqueeze", [extremes, self._const("axes", np.array([-1], np.int64))], out + ".column")
        holding = self._node("And", [self._node("Equal", [row, column], out + ".equal"), reached], out + ".holding")
        positions = self._node("Where", [holding, self._const("positions", np.arange(length, dtype=np.int64)),
                                         self._const("none", np.array(-1, np.int64))], out + ".positions")
        indices = self._reduce_node("ReduceMax", positions, [-1], False, indices_out + ".last")
        wanted = numpy_dtype(self.block._find_var_recursive(indices_out).dtype)
        if wanted != np.int64:
            indices = self._node("Cast", [indices], indices_out + ".cast", to=self.helper.np_dtype_to_tensor_dtype(wanted))
        if axis != rank - 1:
            back = [perm.index(a) for a in range(rank)]
            extremes = self._node("Transpose", [extremes], out, perm=back)
            indices = self._node("Transpose", [indices], indices_out, perm=back)
        self._bind(out, extremes)
        self._bind(indices_out, indices)

    def _constant(self, op) -> None:
        """fill_constant / assign_value of a constant shape: an initializer; fill_constant of
        a shape computed in the graph (``paddle.full([x.shape[0], ...], v)``, an LSTM's
        initial states): ``ConstantOfShape``."""
        dtype = numpy_dtype(op.attr("dtype"))
        out = self._out(op)
        dynamic = op.type == "fill_constant" and any(
            slot in op.input_names and op.input(slot) for slot in ("ShapeTensor", "ShapeTensorList")
        )
        self._reject_tensor_inputs(op, *(
            slot for slot in op.input_names if not (dynamic and slot in ("ShapeTensor", "ShapeTensorList"))
        ))
        shape = [] if dynamic else [int(d) for d in op.attr("shape")]
        if op.type == "fill_constant":
            value = np.full(shape, fill_constant_value(op)).astype(dtype)
        else:
            value = np.array([item.value() for item in op.attr("values")]).astype(dtype).reshape(shape)
        if dynamic:
            filler = self.helper.make_tensor(
                "value", self.helper.np_dtype_to_tensor_dtype(dtype), [1], [value.item()]
            )
            shape_tensor = self._shape_tensor(op, "ShapeTensor", "ShapeTensorList", out)
            self._bind(out, self._node("ConstantOfShape", [shape_tensor], out, value=filler))
            return
        self.constants[out] = value
        self._bind(out, self._const(out, value))

    def _scalar_of(self, op, slot: str, stem: str) -> str:
        """``op``'s one-element input ``slot`` as the 0-d tensor ONNX's ``Range`` reads."""
        return self._node("Reshape", [self._in(op, slot), self._const("scalar", np.zeros(0, np.int64))], stem)

    def _range(self, op) -> None:
        """range (``paddle.arange``, e.g. a transformer's position ids from the input's
        length): ONNX's ``Range`` of the same start, end and step."""
        out = self._out(op)
        bounds = [self._scalar_of(op, slot, out + "." + slot.lower()) for slot in ("Start", "End", "Step")]
        self._bind(out, self._node("Range", bounds, out))

    def _linspace(self, op) -> None:
        """linspace: ``start + i * (stop - start) / (num - 1)`` for ``i`` in ``Range(num)``
        (only ``start`` when ``num`` is 1), computed in the output's dtype."""
        out = self._out(op)
        to = self.helper.np_dtype_to_tensor_dtype(dtype := numpy_dtype(op.attr("dtype")))
        start, stop = (
            self._node("Cast", [self._scalar_of(op, slot, f"{out}.{slot.lower()}")], f"{out}.{slot.lower()}_cast", to=to)
            for slot in ("Start", "Stop")
        )
        count = self._scalar_of(op, "Num", out + ".num")
        count_dtype = numpy_dtype(self.block._find_var_recursive(op.input("Num")[0]).dtype)
        index = self._node("Range", [self._const("zero", np.array(0, count_dtype)), count,
                                     self._const("one", np.array(1, count_dtype))], out + ".index")
        one = self._const("one", np.array(1, dtype))
        gaps = self._node("Sub", [self._node("Cast", [count], out + ".count", to=to), one], out + ".gaps")
        span = self._node("Sub", [stop, start], out + ".span")
        stride = self._node("Div", [span, self._node("Max", [gaps, one], out + ".intervals")], out + ".stride")
        offsets = self._node("Mul", [self._node("Cast", [index], out + ".steps", to=to), stride], out + ".offsets")
        self._bind(out, self._node("Add", [start, offsets], out))

    def _reduce(self, op) -> None:
        """reduce_mean/sum/max/min/prod/amax/amin and logsumexp over ``dim`` (logsumexp:
        ``axis``); all axes with ``reduce_all`` or none given."""
        out = self._out(op)
        dim, keep = ("dim", "keep_dim") if op.has_attr("dim") else ("axis", "keepdim")
        axes = None if op.attr("reduce_all") or not list(op.attr(dim)) else [int(a) for a in op.attr(dim)]
        x = self._cast_to_output(op, self._in(op), out, out)
        self._bind(out, self._reduce_node(_REDUCE_OPS[op.type], x, axes, bool(op.attr(keep)), out))

    def _reduce_logical(self, op) -> None:
        """reduce_any / reduce_all of a bool tensor: the largest / smallest of it as int32."""
        out = self._out(op)
        axes = None if op.attr("reduce_all") or not list(op.attr("dim")) else [int(a) for a in op.attr("dim")]
        as_int = self._node("Cast", [self._in(op)], out + ".int", to=self.onnx.TensorProto.INT32)
        kind = "ReduceMax" if op.type == "reduce_any" else "ReduceMin"
        reduced = self._reduce_node(kind, as_int, axes, bool(op.attr("keep_dim")), out + ".reduced")
        self._bind(out, self._node("Cast", [reduced], out, to=self.onnx.TensorProto.BOOL))

    def _floor_divide(self, op) -> None:
        """elementwise_floordiv / elementwise_mod: of floats ``floor(x / y)`` and Paddle's
        remainder with the divisor's sign, ``x - floor(x / y) * y``; of integers (whose ``Div``
        truncates in ONNX; a sequence length over a stride) ONNX's ``Mod``, which takes the
        divisor's sign too, and ``(x - x mod y) / y``, a division without remainder."""
        if op.has_attr("axis") and int(op.attr("axis")) != -1:
            raise NotImplementedError(f"{op.type} with axis {op.attr('axis')} is not exported")
        out = self._out(op)
        x, y = self._in(op), self._in(op, "Y")
        if not np.issubdtype(numpy_dtype(self.block._find_var_recursive(out).dtype), np.floating):
            remainder = self._node("Mod", [x, y], out + ".mod" if op.type == "elementwise_floordiv" else out, fmod=0)
            if op.type == "elementwise_mod":
                self._bind(out, remainder)
                return
            self._bind(out, self._node("Div", [self._node("Sub", [x, remainder], out + ".whole"), y], out))
            return
        quotient = self._node("Floor", [self._node("Div", [x, y], out + ".div")], out + ".floor")
        if op.type == "elementwise_floordiv":
            self._bind(out, quotient)
            return
        self._bind(out, self._node("Sub", [x, self._node("Mul", [quotient, y], out + ".mul")], out))

    def _tril_triu(self, op) -> None:
        """tril / triu (e.g. a causal attention mask): ONNX's ``Trilu`` from opset 14 on;
        before, a ``Where`` keeping the entries whose column minus row is at most (tril) or
        at least (triu) the diagonal offset, the rest 0 (an ``And`` of a boolean mask)."""
        out = self._out(op)
        x, diagonal, lower = self._in(op), int(op.attr("diagonal")), bool(op.attr("lower"))
        if self.opset >= 14:
            k = self._const("k", np.array(diagonal, np.int64))
            self._bind(out, self._node("Trilu", [x, k], out, upper=int(not lower)))
            return
        shape = self._node("Shape", [x], out + ".shape")

        def positions(axis: int, stem: str) -> str:
            length = self._node("Gather", [shape, self._const("axis", np.array(axis, np.int64))], out + stem + "_length")
            return self._node("Range", [self._const("zero", np.array(0, np.int64)), length,
                                        self._const("one", np.array(1, np.int64))], out + stem)

        rows = self._node("Unsqueeze", [positions(-2, ".rows"), self._const("axes", np.array([1], np.int64))], out + ".column_of_rows")
        offsets = self._node("Sub", [positions(-1, ".columns"), rows], out + ".offsets")
        outside = self._node("Greater" if lower else "Less", [offsets, self._const("k", np.array(diagonal, np.int64))], out + ".outside")
        dtype = numpy_dtype(self.block._find_var_recursive(out).dtype)
        if dtype == np.bool_:  # (ONNX Runtime has no boolean Where: a causal mask's tril)
            self._bind(out, self._node("And", [x, self._node("Not", [outside], out + ".inside")], out))
            return
        self._bind(out, self._node("Where", [outside, self._const("zero", np.zeros((), dtype)), x], out))

    def _diag(self, op) -> None:
        """diag_v2 (CCNet's diagonal of -inf). A vector's square matrix, of any size: the
        vector gathered at each diagonal position's index, ``padding_value`` elsewhere, by a
        ``Where`` on the mask of column minus row equal to the offset (a multiply by an
        identity would turn the -inf into NaN off the diagonal); a matrix of known size's
        diagonal: its positions gathered from the flattened matrix."""
        source, out = op.input("X")[0], self._out(op)
        shape, offset = self._shape(source), int(op.attr("offset"))
        x = self._in(op)
        if len(shape) == 2 and min(shape) >= 0:
            rows, columns = shape
            diagonal_rows = np.arange(max(0, -offset), min(rows, columns - offset), dtype=np.int64)
            flat = self._node("Reshape", [x, self._const("flat", np.array([-1], np.int64))], out + ".flat")
            positions = self._const("positions", diagonal_rows * columns + diagonal_rows + offset)
            self._bind(out, self._node("Gather", [flat, positions], out))
            return
        if len(shape) != 1:
            raise NotImplementedError(f"diag_v2 of a {len(shape)}-d input of dynamic size is not exported")
        length = self._node("Shape", [x], out + ".length")
        size = self._node("Add", [length, self._const("offset", np.array([abs(offset)], np.int64))], out + ".size")
        positions = self._node("Range", [self._const("zero", np.array(0, np.int64)),
                                         self._node("Squeeze", [size, self._const("axes", np.array([0], np.int64))], out + ".n"),
                                         self._const("one", np.array(1, np.int64))], out + ".positions")
        rows = self._node("Unsqueeze", [positions, self._const("axes", np.array([1], np.int64))], out + ".rows")
        on_diagonal = self._node("Equal", [self._node("Sub", [positions, rows], out + ".offsets"),
                                           self._const("k", np.array(offset, np.int64))], out + ".on_diagonal")
        # The vector's index of each position (its row, or column for a negative offset); 0
        # off the diagonal, where the mask takes padding_value instead.
        index = self._node("Where", [on_diagonal, self._node("Min", [rows, positions], out + ".nearer"),
                                     self._const("zero", np.array(0, np.int64))], out + ".index")
        gathered = self._node("Gather", [x, index], out + ".gathered")
        dtype = numpy_dtype(self.block._find_var_recursive(out).dtype)
        padding = self._const("padding", np.array(op.attr("padding_value"), dtype))
        self._bind(out, self._node("Where", [on_diagonal, gathered, padding], out))

    def _one_hot(self, op) -> None:
        """one_hot_v2 (a constant ``depth``): ONNX's ``OneHot`` of the indices, float32 0/1."""
        self._reject_tensor_inputs(op, "depth_tensor")
        out = self._out(op)
        dtype = numpy_dtype(self.block._find_var_recursive(out).dtype)
        depth = self._const("depth", np.array(int(op.attr("depth")), np.int64))
        values = self._const("values", np.array([0, 1], dtype))
        self._bind(out, self._node("OneHot", [self._in(op), depth, values], out, axis=-1))

    def _masked_fill(self, op) -> None:
        """masked_fill: ``Where(mask, value, x)``."""
        out = op.output("out")[0]
        inputs = [self._in(op, "mask"), self._in(op, "value"), self._in(op, "x")]
        self._bind(out, self._node("Where", inputs, out))

    def _lerp(self, op) -> None:
        """lerp: ``x + weight * (y - x)``."""
        out = self._out(op)
        x = self._in(op)
        step = self._node("Sub", [self._in(op, "Y"), x], out + ".step")
        self._bind(out, self._node("Add", [x, self._node("Mul", [self._in(op, "Weight"), step], out + ".scaled")], out))

    def _einsum(self, op) -> None:
        """einsum: ONNX's ``Einsum`` (opset 12 on) of the same equation."""
        out = self._out(op)
        operands = [self._tensor(op, name) for name in op.input("Operands")]
        self._bind(out, self._node("Einsum", operands, out, equation=str(op.attr("equation"))))

    def _expm1_log1p(self, op) -> None:
        """expm1 as ``exp(x) - 1``, log1p as ``log(1 + x)`` (ONNX has neither; within float32
        rounding of Paddle's away from zero, a few ulps of 1 near it)."""
        out = self._out(op)
        one = self._scalar("one", 1.0)
        if op.type == "expm1":
            node = self._node("Sub", [self._node("Exp", [self._in(op)], out + ".exp"), one], out)
        else:
            node = self._node("Log", [self._node("Add", [self._in(op), one], out + ".shifted")], out)
        self._bind(out, node)

    def _log_base(self, op) -> None:
        """log10 / log2: ``Log(x) / ln(base)`` (a spectrogram in decibels: ``10 log10``)."""
        out = self._out(op)
        base = 10.0 if op.type == "log10" else 2.0
        natural = self._node("Log", [self._in(op)], out + ".ln")
        self._bind(out, self._node("Mul", [natural, self._scalar("inverse_ln_base", 1.0 / np.log(base))], out))

    def _isfinite(self, op) -> None:
        """isfinite_v2: neither NaN nor infinite."""
        out = self._out(op)
        x = self._in(op)
        special = self._node(
            "Or", [self._node("IsNaN", [x], out + ".nan"), self._node("IsInf", [x], out + ".inf")], out + ".special"
        )
        self._bind(out, self._node("Not", [special], out))

    def _rrelu(self, op) -> None:
        """rrelu in eval mode (``is_test``): a leaky ReLU of slope ``(lower + upper) / 2``."""
        if not op.attr("is_test"):
            raise NotImplementedError("rrelu is exported only in eval mode (its slope is random in training)")
        slope = (float(op.attr("lower")) + float(op.attr("upper"))) / 2.0
        out = self._out(op)
        self._bind(out, self._node("LeakyRelu", [self._in(op)], out, alpha=slope))

    def _static_dims(self, op, name: str, first: int) -> list[int]:
        """The traced sizes of ``name``'s axes from ``first`` on (only the batch may be open)."""
        dims = self._shape(name)[first:]
        if min(dims, default=0) < 0:
            raise NotImplementedError(f"{op.type} is exported only when the axes after the batch have traced sizes")
        return dims

    def _channel_shuffle(self, op) -> None:
        """channel_shuffle (NCHW): ``[N, g, C/g, H, W]`` transposed to ``[N, C/g, g, H, W]``."""
        if op.attr("data_format") != "NCHW":
            raise NotImplementedError("channel_shuffle is exported only for NCHW")
        channels, height, width = self._static_dims(op, op.input("X")[0], 1)
        groups = int(op.attr("groups"))
        out = self._out(op)
        split = self._const("shape", np.array([0, groups, channels // groups, height * width], np.int64))
        grouped = self._node("Reshape", [self._in(op), split], out + ".groups")
        swapped = self._node("Transpose", [grouped], out + ".swapped", perm=[0, 2, 1, 3])
        back = self._const("shape", np.array([0, channels, height, width], np.int64))
        self._bind(out, self._node("Reshape", [swapped, back], out))

    def _maxout(self, op) -> None:
        """maxout over the channel axis of NCHW: each output channel the largest of ``groups``
        consecutive input channels."""
        x_var = op.input("X")[0]
        if int(op.attr("axis")) != 1:
            raise NotImplementedError("maxout is exported only over axis 1 (NCHW)")
        channels, *spatial = self._static_dims(op, x_var, 1)
        groups = int(op.attr("groups"))
        out = self._out(op)
        split = self._const("shape", np.array([0, channels // groups, groups, -1], np.int64))
        grouped = self._node("Reshape", [self._in(op), split], out + ".groups")
        largest = self._reduce_node("ReduceMax", grouped, [2], False, out + ".max")
        back = self._const("shape", np.array([0, channels // groups, *spatial], np.int64))
        self._bind(out, self._node("Reshape", [largest, back], out))

    def _meshgrid(self, op) -> None:
        """meshgrid ("ij" indexing): input ``i`` reshaped to lie along axis ``i`` and expanded
        to the sizes of all inputs."""
        names = op.input("X")
        stem = op.output("Out")[0]
        sizes = self._node("Concat", [self._node("Shape", [self._tensor(op, n)], f"{stem}.size{i}") for i, n in enumerate(names)],
                           stem + ".sizes", axis=0)
        for i, (name, out) in enumerate(zip(names, op.output("Out"))):
            shape = np.ones(len(names), np.int64)
            shape[i] = -1
            along = self._node("Reshape", [self._tensor(op, name), self._const("shape", shape)], out + ".along")
            self._bind(out, self._node("Expand", [along, sizes], out))

    def _label_smooth(self, op) -> None:
        """label_smooth: ``(1 - epsilon) x + epsilon / K`` over the last axis of ``K`` classes
        (or ``epsilon * prior`` with a ``PriorDist``)."""
        epsilon = float(op.attr("epsilon"))
        out = self._out(op)
        kept = self._node("Mul", [self._in(op), self._scalar("keep", 1.0 - epsilon)], out + ".kept")
        if op.input("PriorDist"):
            spread = self._node("Mul", [self._in(op, "PriorDist"), self._scalar("epsilon", epsilon)], out + ".prior")
        else:
            (classes,) = self._static_dims(op, op.input("X")[0], -1)
            spread = self._scalar("spread", epsilon / classes)
        self._bind(out, self._node("Add", [kept, spread], out))

    def _take_along_axis(self, op) -> None:
        """take_along_axis: ``GatherElements`` (the program expands the index beforehand)."""
        out = self._out(op, "Result")
        inputs = [self._in(op, "Input"), self._in(op, "Index")]
        self._bind(out, self._node("GatherElements", inputs, out, axis=int(op.attr("Axis"))))

    #: The first opset with ``GridSample`` (4-D; its modes renamed linear/cubic from 20 on).
    _GRID_SAMPLE_OPSET = 16

    def _grid_sample(self, op) -> None:
        """grid_sampler (``F.grid_sample`` of a 4-D input: spatial transformers, flow warps):
        ONNX's ``GridSample``, the same modes, padding modes and corner convention."""
        self._require_opset(self._GRID_SAMPLE_OPSET, "grid_sample is ONNX's GridSample")
        if len(self._shape(op.input("X")[0])) != 4:
            raise NotImplementedError("grid_sample of a 5-D input is not exported")
        mode = op.attr("mode")
        if self.opset >= 20:
            mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
        out = self._out(op, "Output")
        self._bind(out, self._node(
            "GridSample", [self._in(op, "X"), self._in(op, "Grid")], out, mode=mode,
            padding_mode=op.attr("padding_mode"), align_corners=int(op.attr("align_corners")),
        ))

    #: The first opset whose ``RoiAlign`` has ``coordinate_transformation_mode``.
    _ROI_ALIGN_OPSET = 16

    def _roi_align(self, op) -> None:
        """roi_align (``paddle.vision.ops.roi_align``: two-stage detectors' box features):
        ONNX's ``RoiAlign`` in ``avg`` mode, Paddle's ``aligned`` as ``half_pixel``
        coordinates (opset 16; without it, ``output_half_pixel``), its adaptive sampling
        (``sampling_ratio`` -1) as ONNX's 0. Each box's image index comes from ``RoisNum``
        (``boxes_num``): the number of running box counts at or below the box's position."""
        if not op.input("RoisNum"):
            raise NotImplementedError("roi_align without boxes_num (a LoD box tensor) is not exported")
        aligned = bool(op.attr("aligned"))
        if aligned:
            self._require_opset(self._ROI_ALIGN_OPSET, "roi_align with aligned=True is ONNX's half_pixel RoiAlign")
        out = self._out(op)
        int64 = self.helper.np_dtype_to_tensor_dtype(np.dtype(np.int64))
        boxes = self._in(op, "ROIs")
        counts = self._node("Cast", [self._in(op, "RoisNum")], out + ".counts", to=int64)
        ends = self._node("CumSum", [counts, self._const("axis", np.array(0, np.int64))], out + ".ends")
        total = self._node(
            "Gather", [self._node("Shape", [boxes], out + ".boxes_shape"), self._const("first", np.array(0, np.int64))],
            out + ".total", axis=0,
        )
        positions = self._node(
            "Range", [self._const("zero", np.array(0, np.int64)), total, self._const("one", np.array(1, np.int64))],
            out + ".positions",
        )
        passed = self._node(
            "GreaterOrEqual",
            [self._node("Unsqueeze", [positions, self._const("axes", np.array([1], np.int64))], out + ".column"),
             self._node("Unsqueeze", [ends, self._const("axes", np.array([0], np.int64))], out + ".row")],
            out + ".passed",
        )
        images = self._node(
            "ReduceSum", [self._node("Cast", [passed], out + ".passed_int", to=int64),
                          self._const("axes", np.array([1], np.int64))],
            out + ".images", keepdims=0,
        )
        attrs = dict(
            mode="avg", output_height=int(op.attr("pooled_height")), output_width=int(op.attr("pooled_width")),
            sampling_ratio=max(int(op.attr("sampling_ratio")), 0), spatial_scale=float(op.attr("spatial_scale")),
        )
        if self.opset >= self._ROI_ALIGN_OPSET:
            attrs["coordinate_transformation_mode"] = "half_pixel" if aligned else "output_half_pixel"
        self._bind(out, self._node("RoiAlign", [self._in(op), boxes, images], out, **attrs))

    def _yolo_box(self, op) -> None:
        """yolo_box (``paddle.vision.ops.yolo_box``: YOLOv3-style heads' decoding) as Paddle's
        kernel computes it: per anchor and cell, the centre ``(col + sigmoid(t) * scale + bias)
        * image size / grid size``, the size ``exp(t) * anchor * image size / input size``, the
        corners (clipped to the image with ``clip_bbox``), scores ``conf * sigmoid(class)``
        (``conf`` with ``iou_aware`` the weighted geometric mean with the IoU channel), zeros
        where ``conf < conf_thresh``; outputs ``[N, anchors * H * W, 4]`` and ``[N, ..., C]``.
        The grid size must be fixed by the input spec."""
        height, width = self._shape(op.input("X")[0])[2:]
        if height <= 0 or width <= 0:
            raise NotImplementedError("yolo_box of a grid whose size the input spec leaves open is not exported")
        anchors = np.asarray(op.attr("anchors"), np.float32).reshape(-1, 2)
        count, classes = len(anchors), int(op.attr("class_num"))
        scale = float(op.attr("scale_x_y"))
        bias, ratio = -0.5 * (scale - 1.0), int(op.attr("downsample_ratio"))
        out = self._out(op, "Boxes")
        x = self._in(op)

        def piece(tensor: str, start: int, end: int, axis: int, stem: str) -> str:
            return self._node("Slice", [tensor, self._const("starts", np.array([start], np.int64)),
                                        self._const("ends", np.array([end], np.int64)),
                                        self._const("axes", np.array([axis], np.int64))], out + stem)

        grid_shape = np.array([0, count, -1, height, width], np.int64)
        iou = None
        if op.attr("iou_aware"):
            iou = self._node("Reshape", [piece(x, 0, count, 1, ".iou"), self._const("shape", grid_shape)], out + ".iou5")
            x = piece(x, count, count * (6 + classes), 1, ".entries")
        entries = self._node("Reshape", [x, self._const("shape", grid_shape)], out + ".grid")
        tx, ty, tw, th = (piece(entries, k, k + 1, 2, f".t{k}") for k in range(4))
        conf = self._node("Sigmoid", [piece(entries, 4, 5, 2, ".objectness")], out + ".conf")
        if iou is not None:
            factor = float(op.attr("iou_aware_factor"))
            conf = self._node("Mul", [
                self._node("Pow", [conf, self._scalar("keep", 1.0 - factor)], out + ".conf_part"),
                self._node("Pow", [self._node("Sigmoid", [iou], out + ".iou_sigmoid"), self._scalar("factor", factor)], out + ".iou_part"),
            ], out + ".conf_iou")
        size = self._node("Cast", [self._in(op, "ImgSize")], out + ".size", to=self.helper.np_dtype_to_tensor_dtype(np.dtype(np.float32)))
        size = self._node("Reshape", [size, self._const("shape", np.array([-1, 2, 1, 1, 1], np.int64))], out + ".size5")
        image_h, image_w = piece(size, 0, 1, 1, ".image_h"), piece(size, 1, 2, 1, ".image_w")
        rows, cols = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")

        def centre(t: str, cells: np.ndarray, image: str, grid: int, stem: str) -> str:
            offset = self._node("Add", [self._const("cells", cells.reshape(1, 1, 1, height, width)),
                                        self._node("Mul", [self._node("Sigmoid", [t], out + stem + ".sigmoid"), self._scalar("scale", scale)], out + stem + ".scaled")],
                                out + stem + ".cell")
            offset = self._node("Add", [offset, self._scalar("bias", bias)], out + stem + ".biased")
            return self._node("Div", [self._node("Mul", [offset, image], out + stem + ".image"), self._scalar("grid", float(grid))], out + stem)

        def extent(t: str, anchor: np.ndarray, image: str, grid: int, stem: str) -> str:
            anchored = self._node("Mul", [self._node("Exp", [t], out + stem + ".exp"), self._const("anchor", anchor.reshape(1, count, 1, 1, 1))], out + stem + ".anchored")
            return self._node("Div", [self._node("Mul", [anchored, image], out + stem + ".image"), self._scalar("input", float(ratio * grid))], out + stem)

        cx, cy = centre(tx, cols, image_w, width, ".cx"), centre(ty, rows, image_h, height, ".cy")
        half_w = self._node("Div", [extent(tw, anchors[:, 0], image_w, width, ".w"), self._scalar("two", 2.0)], out + ".half_w")
        half_h = self._node("Div", [extent(th, anchors[:, 1], image_h, height, ".h"), self._scalar("two", 2.0)], out + ".half_h")
        corners = [self._node("Sub", [cx, half_w], out + ".x1"), self._node("Sub", [cy, half_h], out + ".y1"),
                   self._node("Add", [cx, half_w], out + ".x2"), self._node("Add", [cy, half_h], out + ".y2")]
        if op.attr("clip_bbox"):
            zero = self._scalar("zero", 0.0)
            corners[0] = self._node("Max", [corners[0], zero], out + ".x1_clipped")
            corners[1] = self._node("Max", [corners[1], zero], out + ".y1_clipped")
            one = self._scalar("one", 1.0)
            corners[2] = self._node("Min", [corners[2], self._node("Sub", [image_w, one], out + ".last_x")], out + ".x2_clipped")
            corners[3] = self._node("Min", [corners[3], self._node("Sub", [image_h, one], out + ".last_y")], out + ".y2_clipped")
        kept = self._node("Not", [self._node("Less", [conf, self._scalar("threshold", float(op.attr("conf_thresh")))], out + ".below")], out + ".kept")
        zero = self._scalar("zero", 0.0)

        def flattened(values: str, stem: str, width_last: int) -> str:
            masked = self._node("Where", [kept, values, zero], stem + ".masked")
            moved = self._node("Transpose", [masked], stem + ".last", perm=[0, 1, 3, 4, 2])
            return self._node("Reshape", [moved, self._const("shape", np.array([0, -1, width_last], np.int64))], stem)

        boxes = self._node("Concat", corners, out + ".corners", axis=2)
        self._bind(out, flattened(boxes, out, 4))
        scores_out = self._out(op, "Scores")
        scores = self._node("Mul", [conf, self._node("Sigmoid", [piece(entries, 5, 5 + classes, 2, ".classes")], out + ".class_sigmoid")], scores_out + ".raw")
        self._bind(scores_out, flattened(scores, scores_out, classes))

    def _affine_grid(self, op) -> None:
        """affine_grid to a constant output size: the pixel grid ``(x, y, 1)`` (``x`` along
        the width; -1..1 through the corner pixels' centres with ``align_corners``, else
        their edges) as a constant ``[H * W, 3]``, times each ``theta`` transposed."""
        self._reject_tensor_inputs(op, "OutputShape")
        shape = [int(d) for d in op.attr("output_shape")]
        if len(shape) != 4 or min(shape[2:]) <= 0:
            raise NotImplementedError(f"affine_grid to output_shape {shape} is not exported (a 4-D constant size)")
        height, width = shape[2:]

        def axis(size: int) -> np.ndarray:
            points = np.linspace(-1.0, 1.0, size, dtype=np.float64)
            return points if op.attr("align_corners") else points * (size - 1) / size

        ys, xs = np.meshgrid(axis(height), axis(width), indexing="ij")
        base = np.stack([xs, ys, np.ones_like(xs)], -1).reshape(1, height * width, 3).astype(np.float32)
        out = self._out(op, "Output")
        theta = self._node("Transpose", [self._in(op, "Theta")], out + ".theta", perm=[0, 2, 1])
        points = self._node("MatMul", [self._const("base_grid", base), theta], out + ".points")
        self._bind(out, self._node(
            "Reshape", [points, self._const("shape", np.array([-1, height, width, 2], np.int64))], out,
        ))

    def _index_sample(self, op) -> None:
        """index_sample (``paddle.index_sample``: ``out[i, j] = x[i, index[i, j]]``, the
        per-row picking of PaddleDetection's post-processing): ``GatherElements`` on axis 1,
        its index as int64."""
        out = self._out(op)
        index = self._node("Cast", [self._in(op, "Index")], out + ".index",
                           to=self.helper.np_dtype_to_tensor_dtype(np.dtype(np.int64)))
        self._bind(out, self._node("GatherElements", [self._in(op), index], out, axis=1))

    #: The first opset whose ``ScatterND`` adds (``reduction="add"``).
    _SCATTER_ADD_OPSET = 16

    def _scatter(self, op) -> None:
        """scatter: with ``overwrite`` (``paddle.scatter``'s default) the rows of ``X`` at
        ``Ids`` (along axis 0) replaced by those of ``Updates``, as ``ScatterND`` with the ids
        as ``[K, 1]`` indices (repeated ids: ONNX leaves the order open, Paddle keeps the last
        update); without, those rows zeroed and the updates summed into them (a second
        ``ScatterND`` adding, from opset 16)."""
        out = self._out(op)
        if not op.attr("overwrite"):
            self._require_opset(self._SCATTER_ADD_OPSET, "scatter with overwrite=False (accumulating) is ONNX's ScatterND adding")
        ids = self._node("Cast", [self._in(op, "Ids")], out + ".ids", to=self.helper.np_dtype_to_tensor_dtype(np.dtype(np.int64)))
        indices = self._node("Unsqueeze", [ids, self._const("axes", np.array([1], np.int64))], out + ".indices")
        updates = self._in(op, "Updates")
        if op.attr("overwrite"):
            self._bind(out, self._node("ScatterND", [self._in(op), indices, updates], out))
            return
        dtype = numpy_dtype(self.block._find_var_recursive(op.input("Updates")[0]).dtype)
        zero = self.helper.make_tensor("zero", self.helper.np_dtype_to_tensor_dtype(dtype), [1], [dtype.type(0).item()])
        zeros = self._node("ConstantOfShape", [self._node("Shape", [updates], out + ".shape")], out + ".zeros", value=zero)
        cleared = self._node("ScatterND", [self._in(op), indices, zeros], out + ".cleared")
        self._bind(out, self._node("ScatterND", [cleared, indices, updates], out, reduction="add"))

    def _scatter_nd_add(self, op) -> None:
        """scatter_nd_add (x2paddle's form of an ONNX ``ScatterND``): ``X`` with ``Updates``
        added at the index tuples of ``Index``'s last axis, repeated ones adding up, as
        ``ScatterND`` adding (opset 16)."""
        self._require_opset(self._SCATTER_ADD_OPSET, "scatter_nd_add is ONNX's ScatterND adding")
        out = self._out(op)
        index = self._node("Cast", [self._in(op, "Index")], out + ".index", to=self.helper.np_dtype_to_tensor_dtype(np.dtype(np.int64)))
        self._bind(out, self._node("ScatterND", [self._in(op), index, self._in(op, "Updates")], out, reduction="add"))

    def _lp_pool(self, op) -> None:
        """lp_pool2d (``nn.LPPool2D``, NCHW, an integer norm): ONNX's ``LpPool``, the ``p``-th
        root of the sum of ``|x|^p`` over each window."""
        self._reject_tensor_inputs(op, "KernelSizeTensor", "KernelSizeTensorList")
        norm = float(op.attr("norm_type"))
        if op.attr("data_format") != "NCHW" or norm != int(norm) or op.attr("global_pooling") or op.attr("adaptive"):
            raise NotImplementedError("lp_pool2d is exported only windowed, NCHW, with an integer norm_type")
        kernel = [int(k) for k in op.attr("kernel_size")]
        paddings = [int(p) for p in op.attr("paddings")]
        if any(paddings) or op.attr("ceil_mode") or op.attr("padding_algorithm") not in ("EXPLICIT", ""):
            raise NotImplementedError("lp_pool2d is exported only without padding or ceil_mode")
        out = self._out(op, "out")
        pooled = self._node("LpPool", [self._in(op, "x")], out, p=int(norm), kernel_shape=kernel,
                            strides=[int(s) for s in op.attr("strides")])
        self._bind(out, pooled)

    def _bilinear(self, op) -> None:
        """bilinear_tensor_product (``nn.Bilinear``): ``out[b, k] = x[b] W[k] y[b] + bias[k]``
        as an ``Einsum`` (in float: the layer is not quantized)."""
        out = self._out(op)
        operands = [self._in(op), self._tensor(op, op.input("Weight")[0]), self._in(op, "Y")]
        product = self._node("Einsum", operands, out + ".product", equation="bi,kij,bj->bk")
        if op.input("Bias"):
            product = self._node("Add", [product, self._tensor(op, op.input("Bias")[0])], out + ".biased")
        self._bind(out, product)

    def _unbind(self, op) -> None:
        """unbind: a ``Split`` into slices of one along ``axis``, each squeezed."""
        outputs, axis = op.output("Out"), int(op.attr("axis"))
        parts = [self._unique(name + ".slice") for name in outputs]
        self.nodes.append(self.helper.make_node(
            "Split", [self._in(op), self._const("split", np.ones(len(outputs), np.int64))], parts, axis=axis,
        ))
        axes = self._const("axes", np.array([axis], np.int64))
        for name, part in zip(outputs, parts):
            self._bind(name, self._node("Squeeze", [part, axes], name))

    def _repeat_interleave(self, op) -> None:
        """repeat_interleave by a constant count along ``dim``: each element repeated in place
        (``Unsqueeze`` after ``dim``, ``Tile`` there, the two axes merged back); by a tensor of
        counts, a ``Gather`` of the source index of every output position (the number of
        running totals of the counts at or below the position)."""
        out = self._out(op)
        source = op.input("X")[0]
        rank = len(self._shape(source))
        dim = int(op.attr("dim")) % rank
        if "RepeatsTensor" in op.input_names and op.input("RepeatsTensor"):
            int64 = self.onnx.TensorProto.INT64
            counts = self._node("Cast", [self._in(op, "RepeatsTensor")], out + ".counts", to=int64)
            ends = self._node("CumSum", [counts, self._const("axis", np.array(0, np.int64))], out + ".ends")
            total = self._node("Gather", [ends, self._const("last", np.array(-1, np.int64))], out + ".total")
            positions = self._node("Range", [self._const("start", np.array(0, np.int64)), total,
                                             self._const("delta", np.array(1, np.int64))], out + ".positions")
            passed = self._node("LessOrEqual", [
                self._node("Unsqueeze", [ends, self._const("axes", np.array([0], np.int64))], out + ".row"),
                self._node("Unsqueeze", [positions, self._const("axes", np.array([1], np.int64))], out + ".column"),
            ], out + ".passed")
            index = self._reduce_node("ReduceSum", self._node("Cast", [passed], out + ".passed64", to=int64),
                                      [1], False, out + ".index")
            self._bind(out, self._node("Gather", [self._in(op), index], out, axis=dim))
            return
        repeats = int(op.attr("Repeats"))
        x = self._in(op)
        spread = self._node("Unsqueeze", [x, self._const("axes", np.array([dim + 1], np.int64))], out + ".spread")
        counts = np.ones(rank + 1, np.int64)
        counts[dim + 1] = repeats
        tiled = self._node("Tile", [spread, self._const("repeats", counts)], out + ".tiled")
        shape = self._node("Shape", [x], out + ".shape")
        before = self._node("Slice", [shape, self._const("start", np.array([0], np.int64)), self._const("end", np.array([dim], np.int64))], out + ".before")
        after = self._node("Slice", [shape, self._const("start", np.array([dim + 1], np.int64)), self._const("end", np.array([rank], np.int64))], out + ".after")
        merged = self._node("Concat", [before, self._const("merged", np.array([-1], np.int64)), after], out + ".merged", axis=0)
        self._bind(out, self._node("Reshape", [tiled, merged], out))

    def _mode(self, op) -> None:
        """mode along ``axis``: each value's count of equal values along the axis (an
        ``Equal`` of the axis against itself, summed), the smallest of the most frequent values
        (Paddle's choice among ties), and the last position holding it (Paddle's index). The
        comparison is ``length x length`` per slice along the axis."""
        source = op.input("X")[0]
        rank = len(self._shape(source))
        axis = int(op.attr("axis")) % rank
        values, indices = op.output("Out")[0], op.output("Indices")[0]
        x = self._in(op)
        equal = self._node("Equal", [
            self._node("Unsqueeze", [x, self._const("axes", np.array([axis + 1], np.int64))], values + ".rows"),
            self._node("Unsqueeze", [x, self._const("axes", np.array([axis], np.int64))], values + ".columns"),
        ], values + ".equal")
        counts = self._reduce_node("ReduceSum", self._node("Cast", [equal], values + ".ones", to=self.onnx.TensorProto.FLOAT),
                                   [axis + 1], False, values + ".counts")
        most = self._node("Equal", [counts, self._reduce_node("ReduceMax", counts, [axis], True, values + ".most")],
                          values + ".is_most")
        dtype = numpy_dtype(self.block._find_var_recursive(values).dtype)
        largest = np.array(np.inf if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).max, dtype)
        candidates = self._node("Where", [most, x, self._const("largest", largest)], values + ".candidates")
        value = self._reduce_node("ReduceMin", candidates, [axis], True, values + ".kept")
        length = self._node("Gather", [self._node("Shape", [x], indices + ".shape"),
                                       self._const("axis", np.array(axis, np.int64))], indices + ".length")
        positions = self._node("Range", [self._const("start", np.array(0, np.int64)), length,
                                         self._const("delta", np.array(1, np.int64))], indices + ".positions")
        if rank - axis - 1:
            trailing = np.arange(1, rank - axis, dtype=np.int64)
            positions = self._node("Unsqueeze", [positions, self._const("axes", trailing)], indices + ".aligned")
        held = self._node("Where", [self._node("Equal", [x, value], indices + ".holds"), positions,
                                    self._const("none", np.array(-1, np.int64))], indices + ".held")
        index = self._reduce_node("ReduceMax", held, [axis], True, indices + ".last")
        if not op.attr("keepdim"):
            axes = self._const("squeezed", np.array([axis], np.int64))
            value = self._node("Squeeze", [value, axes], values + ".squeezed")
            index = self._node("Squeeze", [index, axes], indices + ".squeezed")
        self._bind(values, value)
        index_dtype = numpy_dtype(self.block._find_var_recursive(indices).dtype)
        self._bind(indices, index if index_dtype == np.int64 else self._node(
            "Cast", [index], indices, to=self.helper.np_dtype_to_tensor_dtype(index_dtype)))

    def _kron(self, op) -> None:
        """kron (the Kronecker product): ``X`` with a unit axis after each of its axes times
        ``Y`` with one before each of its, then each pair of axes merged (``Shape(X) *
        Shape(Y)``); the lower-rank operand gets leading unit axes first, as in Paddle."""
        out = self._out(op)
        operands = [self._in(op), self._in(op, "Y")]
        ranks = [len(self._shape(op.input(slot)[0])) for slot in ("X", "Y")]
        rank = max(ranks)
        for i, own in enumerate(ranks):
            if own < rank:
                leading = self._const("axes", np.arange(rank - own, dtype=np.int64))
                operands[i] = self._node("Unsqueeze", [operands[i], leading], out + ".ranked")
        spread_x = self._node("Unsqueeze", [operands[0], self._const("axes", np.arange(1, 2 * rank, 2, dtype=np.int64))], out + ".x")
        spread_y = self._node("Unsqueeze", [operands[1], self._const("axes", np.arange(0, 2 * rank, 2, dtype=np.int64))], out + ".y")
        product = self._node("Mul", [spread_x, spread_y], out + ".outer")
        shape = self._node("Mul", [self._node("Shape", [operands[0]], out + ".shape_x"),
                                   self._node("Shape", [operands[1]], out + ".shape_y")], out + ".shape")
        self._bind(out, self._node("Reshape", [product, shape], out))

    def _trunc(self, op) -> None:
        """trunc (toward zero): ``Floor`` of a non-negative value, ``Ceil`` of a negative one;
        integers are unchanged."""
        out = self._out(op)
        x = self._in(op)
        if not np.issubdtype(numpy_dtype(self.block._find_var_recursive(out).dtype), np.floating):
            self._bind(out, self._node("Identity", [x], out))
            return
        negative = self._node("Less", [x, self._scalar("zero", 0.0)], out + ".negative")
        self._bind(out, self._node("Where", [
            negative, self._node("Ceil", [x], out + ".ceil"), self._node("Floor", [x], out + ".floor"),
        ], out))

    def _logit(self, op) -> None:
        """logit: ``log(x / (1 - x))``, ``x`` first clipped to ``[eps, 1 - eps]`` when ``eps``
        is not 0 (as Paddle's kernel does)."""
        out = self._out(op)
        x = self._in(op)
        eps = float(op.attr("eps"))
        if eps:
            x = self._node("Clip", [x, self._scalar("low", eps), self._scalar("high", 1.0 - eps)], out + ".clipped")
        odds = self._node("Div", [x, self._node("Sub", [self._scalar("one", 1.0), x], out + ".rest")], out + ".odds")
        self._bind(out, self._node("Log", [odds], out))

    def _atan2(self, op) -> None:
        """atan2(X1, X2): ``atan(X1 / X2)``, plus pi when X2 < 0 and X1 >= 0, minus pi when
        X2 < 0 and X1 < 0; where X2 is 0, pi/2 times the sign of X1 (0 for 0 / 0)."""
        out = self._out(op)
        y, x = self._in(op, "X1"), self._in(op, "X2")
        zero = self._scalar("zero", 0.0)
        base = self._node("Atan", [self._node("Div", [y, x], out + ".ratio")], out + ".atan")
        turn = self._node("Where", [
            self._node("Less", [y, zero], out + ".below"), self._scalar("minus_pi", -np.pi), self._scalar("pi", np.pi),
        ], out + ".turn")
        left = self._node("Less", [x, zero], out + ".left")
        shifted = self._node("Where", [left, self._node("Add", [base, turn], out + ".turned"), base], out + ".shifted")
        vertical = self._node("Mul", [self._node("Sign", [y], out + ".sign"), self._scalar("half_pi", np.pi / 2)], out + ".vertical")
        self._bind(out, self._node("Where", [self._node("Equal", [x, zero], out + ".on_axis"), vertical, shifted], out))

    def _median(self, op) -> None:
        """median along one axis of known length (``mode`` 'avg': the mean of the two middle
        values of an even count; 'min': the lower one): the last one or two of ``TopK``'s
        smallest half. Its index output is not exported."""
        if any(self.readers.get(name) for name in op.output("medians")):
            raise NotImplementedError("median's index output (medians) is not exported")
        axes = [int(a) for a in op.attr("axis")]
        source = op.input("x")[0]
        shape = self._shape(source)
        if len(axes) != 1 or shape[axes[0]] < 0:
            raise NotImplementedError("median over several axes or a dynamic axis is not exported")
        axis, length = axes[0] % len(shape), shape[axes[0]]
        out = op.output("out")[0]
        count = length // 2 + 1
        smallest = self._k_smallest(self._in(op, "x"), count, axis, out, out)
        if length % 2:
            first, last = count - 1, count  # the middle value
        else:
            first, last = count - 2, count if op.attr("mode") == "avg" else count - 1
        picked = self._node("Slice", [
            smallest[0], self._const("start", np.array([first], np.int64)),
            self._const("end", np.array([last], np.int64)), self._const("axes", np.array([axis], np.int64)),
        ], out + ".middle")
        self._bind(out, self._reduce_node("ReduceMean", picked, [axis], bool(op.attr("keepdim")), out))

    def _logcumsumexp(self, op) -> None:
        """logcumsumexp: ``log(cumsum(exp(x - m))) + m`` with ``m`` the largest value along
        the axis (``reverse``/``exclusive`` as ``CumSum``'s; ``flatten`` over all values)."""
        out = self._out(op)
        x, axis = self._in(op), int(op.attr("axis"))
        if op.attr("flatten"):
            x, axis = self._node("Reshape", [x, self._const("shape", np.array([-1], np.int64))], out + ".flat"), 0
        top = self._reduce_node("ReduceMax", x, [axis], True, out + ".max")
        shifted = self._node("Exp", [self._node("Sub", [x, top], out + ".shifted")], out + ".exp")
        summed = self._node("CumSum", [shifted, self._const("axis", np.array(axis, np.int64))], out + ".cumsum",
                            exclusive=int(op.attr("exclusive")), reverse=int(op.attr("reverse")))
        self._bind(out, self._node("Add", [self._node("Log", [summed], out + ".log"), top], out))

    def _cumprod(self, op) -> None:
        """cumprod (``reverse``/``exclusive`` as ``CumSum``'s): ONNX has no cumulative product,
        so its magnitude is ``exp(cumsum(log|x|))``, its sign ``-1`` to the count of negative
        factors so far, and it is 0 from the first zero factor on (relative error about 1e-6
        of float32 ``exp``/``log`` on top of the product's own)."""
        out = self._out(op)
        x = self._in(op)
        axis = self._const("axis", np.array(int(op.attr("dim")), np.int64))
        flags = dict(exclusive=int(op.attr("exclusive")), reverse=int(op.attr("reverse")))

        def running_sum(tensor: str, stem: str) -> str:
            return self._node("CumSum", [tensor, axis], out + stem, **flags)

        zero, one = self._scalar("zero", 0.0), self._scalar("one", 1.0)
        is_zero = self._node("Equal", [x, zero], out + ".is_zero")
        magnitude = self._node("Where", [is_zero, one, self._node("Abs", [x], out + ".abs")], out + ".magnitude")
        product = self._node("Exp", [running_sum(self._node("Log", [magnitude], out + ".log"), ".log_sum")], out + ".product")
        negatives = running_sum(self._node("Cast", [self._node("Less", [x, zero], out + ".negative")], out + ".negative_f", to=self.onnx.TensorProto.FLOAT), ".negatives")
        parity = self._node("Mod", [negatives, self._scalar("two", 2.0)], out + ".parity", fmod=1)
        sign = self._node("Sub", [one, self._node("Mul", [parity, self._scalar("two", 2.0)], out + ".twice")], out + ".sign")
        zeros = running_sum(self._node("Cast", [is_zero], out + ".zero_f", to=self.onnx.TensorProto.FLOAT), ".zeros")
        signed = self._node("Mul", [product, sign], out + ".signed")
        self._bind(out, self._node("Where", [self._node("Greater", [zeros, zero], out + ".zeroed"), zero, signed], out))

    def _diagonal(self, op) -> None:
        """diagonal of two axes of known size: those axes moved last and flattened, the
        diagonal's positions gathered there (the new last axis, as Paddle puts it)."""
        out = self._out(op)
        self._bind(out, self._diagonal_node(op, out))

    def _diagonal_node(self, op, out: str) -> str:
        """The diagonal a diagonal or trace op reads (``Input``, ``offset``, ``axis1``,
        ``axis2``), on a new last axis."""
        source = op.input("Input")[0]
        shape = self._shape(source)
        rank = len(shape)
        first, second = int(op.attr("axis1")) % rank, int(op.attr("axis2")) % rank
        rows, columns, offset = shape[first], shape[second], int(op.attr("offset"))
        if rows < 0 or columns < 0:
            raise NotImplementedError(f"{op.type} of axes of dynamic size is not exported")
        kept = [axis for axis in range(rank) if axis not in (first, second)]
        moved = self._node("Transpose", [self._in(op, "Input")], out + ".moved", perm=kept + [first, second])
        flat_shape = self._node("Concat", [
            self._node("Slice", [
                self._node("Shape", [moved], out + ".shape"), self._const("start", np.array([0], np.int64)),
                self._const("end", np.array([rank - 2], np.int64)),
            ], out + ".leading"),
            self._const("flat", np.array([rows * columns], np.int64)),
        ], out + ".flat_shape", axis=0)
        flat = self._node("Reshape", [moved, flat_shape], out + ".flat")
        diagonal_rows = np.arange(max(0, -offset), min(rows, columns - offset), dtype=np.int64)
        positions = diagonal_rows * columns + diagonal_rows + offset
        return self._node("Gather", [flat, self._const("positions", positions)], out, axis=rank - 2)

    def _unfold(self, op) -> None:
        """unfold (im2col) as a grouped ``Conv`` whose kernels each pick one position of the
        window (one weight 1, the rest 0: the copy is exact), its output flattened to
        ``[N, C * kh * kw, L]`` in Paddle's order (channel, then window row and column)."""
        source = op.input("X")[0]
        channels = self._shape(source)[1]
        if channels < 0:
            raise NotImplementedError("unfold of a dynamic channel count is not exported")
        kh, kw = (int(k) for k in op.attr("kernel_sizes"))
        window = np.eye(kh * kw, dtype=np.float32).reshape(kh * kw, 1, kh, kw)
        picks = np.tile(window, (channels, 1, 1, 1))
        out = op.output("Y")[0]
        conv = self._node(
            "Conv", [self._in(op), self._const("picks", picks)], out + ".windows",
            group=channels, kernel_shape=[kh, kw], strides=[int(v) for v in op.attr("strides")],
            pads=[int(v) for v in op.attr("paddings")], dilations=[int(v) for v in op.attr("dilations")],
        )
        shape = self._const("shape", np.array([0, channels * kh * kw, -1], np.int64))
        self._bind(out, self._node("Reshape", [conv, shape], out))

    #: The first opset with ``Col2Im``.
    _COL2IM_OPSET = 18

    def _fold(self, op) -> None:
        """fold (col2im, ``F.fold``: MobileViTV2's patches back to a map) as ONNX's ``Col2Im``,
        which sums overlapping windows as Paddle does (opset 18 on; a clear error below). Its
        paddings are ONNX's order; unequal begin and end ones do not run in Paddle 3.3.1
        ("Output_height and padding(padding_up, padding_down) are inconsistent")."""
        self._require_opset(self._COL2IM_OPSET, "fold is ONNX's Col2Im")
        out = op.output("Y")[0]
        sizes = [self._const(name, np.array([int(v) for v in op.attr(attribute)], np.int64))
                 for name, attribute in (("image_shape", "output_sizes"), ("block_shape", "kernel_sizes"))]
        self._bind(out, self._node(
            "Col2Im", [self._in(op), *sizes], out, strides=[int(v) for v in op.attr("strides")],
            pads=[int(v) for v in op.attr("paddings")], dilations=[int(v) for v in op.attr("dilations")],
        ))

    def _p_norm(self, op) -> None:
        """The ``porder``-norm over ``axis`` (all elements with ``asvector``): ``ReduceL1``,
        ``ReduceL2``, the largest or smallest ``|x|`` for +-inf, else ``sum(|x|^p)^(1/p)``."""
        out = self._out(op)
        axes = None if op.attr("asvector") else [int(op.attr("axis"))]
        self._bind(out, self._norm_node(op, self._in(op), float(op.attr("porder")), axes, bool(op.attr("keepdim")), out))

    def _norm_node(self, op, x: str, p: float, axes: list[int] | None, keep: bool, stem: str) -> str:
        """The ``p``-norm of ``x`` over ``axes`` (all with None)."""
        if p in (1.0, 2.0):
            return self._reduce_node("ReduceL1" if p == 1.0 else "ReduceL2", x, axes, keep, stem)
        if np.isinf(p):
            return self._reduce_node("ReduceMax" if p > 0 else "ReduceMin", self._node("Abs", [x], stem + ".abs"), axes, keep, stem)
        if p == 0.0:
            raise NotImplementedError(f"{op.type} with order 0 (a count of non-zeros) is not exported")
        powered = self._node("Pow", [self._node("Abs", [x], stem + ".abs"), self._scalar("p", p)], stem + ".pow")
        total = self._reduce_node("ReduceSum", powered, axes, keep, stem + ".sum")
        return self._node("Pow", [total, self._scalar("inverse_p", 1.0 / p)], stem)

    def _renorm(self, op) -> None:
        """renorm: each slice along ``axis`` whose ``p``-norm (over the other axes) passes
        ``max_norm`` scaled by ``max_norm / (norm + 1e-7)``, as Paddle does."""
        x, out = self._in(op), self._out(op)
        rank = len(self._shape(op.input("X")[0]))
        axis = int(op.attr("axis")) % rank
        norms = self._norm_node(op, x, float(op.attr("p")), [a for a in range(rank) if a != axis], True, out + ".norm")
        limit = self._scalar("max_norm", float(op.attr("max_norm")))
        factor = self._node("Div", [limit, self._node("Add", [norms, self._scalar("eps", 1e-7)], out + ".eps")], out + ".factor")
        factor = self._node("Where", [self._node("Greater", [norms, limit], out + ".over"), factor, self._scalar("one", 1.0)],
                            out + ".scaled")
        self._bind(out, self._node("Mul", [x, factor], out))

    def _searchsorted(self, op) -> None:
        """searchsorted (and ``paddle.bucketize``): per value, how many sequence entries lie
        below it (``right``: at or below), a comparison of every value with every entry
        (``[..., M, N]``) summed over the entries."""
        out = self._out(op, "Out")
        sequence, values = self._in(op, "SortedSequence"), self._in(op, "Values")
        if len(self._shape(op.input("SortedSequence")[0])) > 1:
            sequence = self._node("Unsqueeze", [sequence, self._const("axes", np.array([-2], np.int64))], out + ".rows")
        values = self._node("Unsqueeze", [values, self._const("axes", np.array([-1], np.int64))], out + ".column")
        below = self._node("LessOrEqual" if op.attr("right") else "Less", [sequence, values], out + ".below")
        counts = self._node("Cast", [below], out + ".counts", to=self.helper.np_dtype_to_tensor_dtype(np.dtype(np.int64)))
        total = self._reduce_node("ReduceSum", counts, [-1], False, out + ".total" if op.attr("out_int32") else out)
        if op.attr("out_int32"):
            total = self._node("Cast", [total], out, to=self.helper.np_dtype_to_tensor_dtype(np.dtype(np.int32)))
        self._bind(out, total)

    def _trace(self, op) -> None:
        """trace: the sum of :meth:`_diagonal`'s diagonal (over its new last axis)."""
        out = self._out(op)
        diagonal = self._diagonal_node(op, out + ".diagonal")
        self._bind(out, self._reduce_node("ReduceSum", diagonal, [-1], False, out))

    def _arg_max(self, op) -> None:
        """arg_max / arg_min: ONNX's ``ArgMax`` / ``ArgMin`` (the first of equal values, as
        Paddle)."""
        out = self._out(op)
        x, axis = self._in(op), int(op.attr("axis"))
        if op.attr("flatten"):
            x, axis = self._node("Reshape", [x, self._const("shape", np.array([-1], np.int64))], out + ".flat"), 0
        kind = "ArgMax" if op.type == "arg_max" else "ArgMin"
        node = self._node(kind, [x], out + ".int64", axis=axis, keepdims=int(op.attr("keepdims")))
        dtype = numpy_dtype(op.attr("dtype"))
        if dtype != np.int64:
            node = self._node("Cast", [node], out, to=self.helper.np_dtype_to_tensor_dtype(dtype))
        self._bind(out, node)

    def _roll(self, op) -> None:
        """roll (Swin's shifted windows): along each axis two slices swapped; no axis rolls
        the flattened tensor. An axis whose size is known only at run time (the flattened
        tensor of a dynamic batch) is cut where the graph computes it (``-shift mod size``)."""
        self._reject_tensor_inputs(op, "ShiftsTensor")
        out = self._out(op)
        x = self._in(op)
        shape = self._shape(op.input("X")[0])
        axes, shifts = [int(a) for a in op.attr("axis")], [int(s) for s in op.attr("shifts")]
        if not axes:
            x = self._node("Reshape", [x, self._const("shape", np.array([-1], np.int64))], out + ".flat")
            axes, shape = [0], [int(np.prod(shape)) if min(shape, default=0) >= 0 else -1]
        for axis, shift in zip(axes, shifts):
            size = shape[axis]
            if size >= 0:
                cut = (size - shift % size) % size  # out = x[cut:] then x[:cut]
                if cut == 0:
                    continue
                cut_at = self._const("cut", np.array([cut], np.int64))
            else:
                length = self._node("Gather", [
                    self._node("Shape", [x], out + ".shape"), self._const("axis", np.array([axis], np.int64)),
                ], out + ".length")
                # Mod with fmod=0 takes the divisor's sign: the cut is in 0..size-1.
                cut_at = self._node("Mod", [self._const("shift", np.array([-shift], np.int64)), length], out + ".cut", fmod=0)
            along = self._const("axes", np.array([axis], np.int64))
            part = [
                self._node("Slice", [x, start, end, along], out + ".part")
                for start, end in (
                    (cut_at, self._const("end", np.array([np.iinfo(np.int64).max], np.int64))),
                    (self._const("start", np.array([0], np.int64)), cut_at),
                )
            ]
            x = self._node("Concat", part, out + ".rolled", axis=axis)
        if not op.attr("axis"):
            x = self._node("Reshape", [x, self._node("Shape", [self._in(op)], out + ".shape")], out + ".unflat")
        self._bind(out, self._node("Identity", [x], out))

    def _flip(self, op) -> None:
        """flip: a slice with step -1 along each axis."""
        out = self._out(op)
        axes = [int(a) for a in op.attr("axis")]
        lowest = np.iinfo(np.int64).min
        self._bind(out, self._node("Slice", [
            self._in(op), self._const("starts", np.full(len(axes), -1, np.int64)),
            self._const("ends", np.full(len(axes), lowest, np.int64)),
            self._const("axes", np.array(axes, np.int64)), self._const("steps", np.full(len(axes), -1, np.int64)),
        ], out))

    def _round(self, op) -> None:
        """round half away from zero, as Paddle does (ONNX's ``Round`` rounds half to even):
        ``sign(x) * floor(|x| + 0.5)``."""
        out = self._out(op)
        x = self._in(op)
        floor = self._node("Floor", [self._node("Add", [self._node("Abs", [x], out + ".abs"), self._scalar("half", 0.5)], out + ".half")], out + ".floor")
        self._bind(out, self._node("Mul", [self._node("Sign", [x], out + ".sign"), floor], out))

    def _top_k(self, op) -> None:
        """top_k_v2 (a constant ``k``): ONNX's ``TopK``."""
        self._reject_tensor_inputs(op, "K")
        k = self._const("k", np.array([int(op.attr("k"))], np.int64))
        self._top_k_node(op, k, int(op.attr("axis")), bool(op.attr("largest")), bool(op.attr("sorted")))

    def _argsort(self, op) -> None:
        """argsort (``paddle.sort``, ``paddle.argsort``): ``TopK`` of every element along
        ``axis`` (``k`` the axis length, read at run time), the largest first when
        ``descending``. ``TopK`` orders equal values by their index, as Paddle's stable sort
        does; without ``stable`` Paddle leaves their order unspecified (the values are the
        same, the indices of ties may differ)."""
        x, axis = self._in(op), int(op.attr("axis"))
        stem = op.output("Out")[0]
        length = self._node("Gather", [
            self._node("Shape", [x], stem + ".shape"), self._const("axis", np.array([axis], np.int64)),
        ], stem + ".length")
        self._top_k_node(op, length, axis, bool(op.attr("descending")), True)

    def _k_smallest(self, x: str, k: int, axis: int, values: str, indices: str) -> list[str]:
        """ONNX's ``TopK`` of the ``k`` smallest of ``x`` along ``axis``, ascending: its values
        and int64 indices (named after ``values`` and ``indices``)."""
        found = [self._unique(values + ".smallest"), self._unique(indices + ".smallest")]
        self.nodes.append(self.helper.make_node(
            "TopK", [x, self._const("k", np.array([k], np.int64))], found, axis=axis, largest=0, sorted=1,
        ))
        return found

    def _kthvalue(self, op) -> None:
        """kthvalue (the ``k``-th smallest along ``axis``): the last of ONNX's ``TopK`` of the
        ``k`` smallest, squeezed unless ``keepdim``. Of equal values ``TopK`` takes the first
        index; Paddle's choice among them is unspecified (the value is the same)."""
        x, axis, k = self._in(op), int(op.attr("axis")), int(op.attr("k"))
        values, indices = op.output("Out")[0], op.output("Indices")[0]
        smallest = self._k_smallest(x, k, axis, values, indices)
        last = [self._const("start", np.array([k - 1], np.int64)), self._const("end", np.array([k], np.int64)),
                self._const("axes", np.array([axis], np.int64))]
        picked = [self._node("Slice", [found, *last], name + ".kth") for found, name in zip(smallest, (values, indices))]
        if not op.attr("keepdim"):
            axes = self._const("squeezed", np.array([axis], np.int64))
            picked = [self._node("Squeeze", [found, axes], name + ".squeezed") for found, name in zip(picked, (values, indices))]
        self._bind(values, picked[0])
        dtype = numpy_dtype(self.block._find_var_recursive(indices).dtype)
        self._bind(indices, picked[1] if dtype == np.int64 else self._node(
            "Cast", [picked[1]], indices, to=self.helper.np_dtype_to_tensor_dtype(dtype)))

    def _top_k_node(self, op, k: str, axis: int, largest: bool, ordered: bool) -> None:
        """ONNX's ``TopK`` of ``op``'s ``X`` bound to its ``Out`` and ``Indices`` (cast from
        int64 to Paddle's index dtype)."""
        values, indices = op.output("Out")[0], op.output("Indices")[0]
        found = [self._unique(values), self._unique(indices + ".int64")]
        self.nodes.append(self.helper.make_node(
            "TopK", [self._in(op), k], found, axis=axis, largest=int(largest), sorted=int(ordered),
        ))
        self._bind(values, found[0])
        dtype = numpy_dtype(self.block._find_var_recursive(indices).dtype)
        self._bind(indices, found[1] if dtype == np.int64 else self._node(
            "Cast", [found[1]], indices, to=self.helper.np_dtype_to_tensor_dtype(dtype)))

    # ------------------------------------------------------------------------------ normalization
    def _batch_norm(self, op) -> None:
        """A BatchNorm that no conv absorbed (e.g. DenseNet's, after a concat): in float."""
        if op.attr("data_layout") not in ("NCHW", "AnyLayout"):
            raise NotImplementedError("batch_norm is exported only for NCHW")
        out = self._out(op, "Y")
        inputs = [self._in(op)] + [
            self._const(op.input(slot)[0], self._param(op.input(slot)[0]).astype(np.float32))
            for slot in ("Scale", "Bias", "Mean", "Variance")
        ]
        self._bind(out, self._node("BatchNormalization", inputs, out, epsilon=float(op.attr("epsilon"))))

    def _layer_norm(self, op) -> None:
        """Normalizes over the axes from ``begin_norm_axis`` on (ONNX opset 13 has no
        LayerNormalization: mean, variance, scale and shift spelled out)."""
        x_var = op.input("X")[0]
        rank = len(self._shape(x_var))
        begin = int(op.attr("begin_norm_axis"))
        axes = list(range(begin, rank))
        out = self._out(op, "Y")
        x = self._in(op)
        mean = self._reduce_node("ReduceMean", x, axes, True, out + ".mean")
        centred = self._node("Sub", [x, mean], out + ".centred")
        variance = self._reduce_node(
            "ReduceMean", self._node("Mul", [centred, centred], out + ".square"), axes, True, out + ".variance"
        )
        epsilon = self._scalar("epsilon", op.attr("epsilon"))
        deviation = self._node("Sqrt", [self._node("Add", [variance, epsilon], out + ".eps")], out + ".std")
        y = self._node("Div", [centred, deviation], out + ".normalized")
        normalized_shape = self._shape(x_var)[begin:]
        for slot, kind in (("Scale", "Mul"), ("Bias", "Add")):
            if op.input(slot):
                value = self._param(op.input(slot)[0]).astype(np.float32).reshape(normalized_shape)
                y = self._node(kind, [y, self._const(op.input(slot)[0], value)], out + "." + slot.lower())
        self._bind(out, self._node("Identity", [y], out))

    def _affine_parameters(self, op, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """A norm's ``Scale`` and ``Bias`` (ones and zeros where the layer has none)."""
        scale, bias = np.ones([channels], np.float32), np.zeros([channels], np.float32)
        if op.input("Scale"):
            scale = self._param(op.input("Scale")[0]).astype(np.float32).reshape(-1)
        if op.input("Bias"):
            bias = self._param(op.input("Bias")[0]).astype(np.float32).reshape(-1)
        return scale, bias

    def _channels(self, op) -> int:
        channels = self._shape(op.input("X")[0])[1]
        if channels < 0:
            raise NotImplementedError(f"{op.type} over a dynamic channel count is not exported")
        return channels

    def _instance_norm(self, op) -> None:
        channels = self._channels(op)
        scale, bias = self._affine_parameters(op, channels)
        out = self._out(op, "Y")
        inputs = [self._in(op), self._const("scale", scale), self._const("bias", bias)]
        self._bind(out, self._node("InstanceNormalization", inputs, out, epsilon=float(op.attr("epsilon"))))

    def _group_norm(self, op) -> None:
        """``InstanceNormalization`` of ``x`` reshaped to ``[N, groups, -1]`` (each group's
        mean and variance), reshaped back, then the per-channel scale and bias (opset 13 has
        no GroupNormalization)."""
        if op.attr("data_layout") != "NCHW":
            raise NotImplementedError("group_norm is exported only for NCHW")
        channels, groups = self._channels(op), int(op.attr("groups"))
        rank = len(self._shape(op.input("X")[0]))
        out = self._out(op, "Y")
        x = self._in(op)
        grouped = self._node("Reshape", [x, self._const("shape", np.array([0, groups, -1], np.int64))], out + ".groups")
        normalized = self._node(
            "InstanceNormalization",
            [grouped, self._const("ones", np.ones([groups], np.float32)), self._const("zeros", np.zeros([groups], np.float32))],
            out + ".normalized", epsilon=float(op.attr("epsilon")),
        )
        y = self._node("Reshape", [normalized, self._node("Shape", [x], out + ".shape")], out + ".restored")
        scale, bias = self._affine_parameters(op, channels)
        per_channel = [channels] + [1] * (rank - 2)
        y = self._node("Mul", [y, self._const("scale", scale.reshape(per_channel))], out + ".scale")
        self._bind(out, self._node("Add", [y, self._const("bias", bias.reshape(per_channel))], out))

    # ------------------------------------------------------------------------------ shapes
    def _pad(self, op) -> None:
        """pad (constant, every axis: ``[before, after]`` per axis) and pad3d (``F.pad`` of a
        3-5-D tensor, unsqueezed to 5-D: ``[left, right, top, bottom, front, back]`` of the
        W, H, D axes of ``NCDHW`` or ``NDHWC``) as ONNX ``Pad``."""
        rank = len(self._shape(op.input("X")[0]))
        if op.type == "pad":
            paddings = [int(p) for p in op.attr("paddings")]
            begins, ends = paddings[0::2], paddings[1::2]
            mode, value = "constant", float(op.attr("pad_value"))
        else:
            self._reject_tensor_inputs(op, "Paddings")
            mode = op.attr("mode")
            if mode not in (*_PAD_MODES, "circular"):
                raise NotImplementedError(f"pad3d in mode {mode!r} is not exported")
            left, right, top, bottom, front, back = (int(p) for p in op.attr("paddings"))
            first = 2 if op.attr("data_format") == "NCDHW" else 1  # the D axis
            begins, ends = [0] * rank, [0] * rank
            begins[first: first + 3], ends[first: first + 3] = [front, top, left], [back, bottom, right]
            value = float(op.attr("value"))
        out = self._out(op)
        if mode == "circular":
            self._bind(out, self._circular_pad(self._in(op), begins, ends, out))
            return
        inputs = [self._in(op), self._const("pads", np.array(begins + ends, np.int64))]
        if mode == "constant":
            inputs.append(self._scalar("value", value))
        self._bind(out, self._node("Pad", inputs, out, mode=_PAD_MODES[mode]))

    def _circular_pad(self, x: str, begins: list[int], ends: list[int], stem: str) -> str:
        """Circular padding (``Conv2D(padding_mode="circular")``): along each padded axis, the
        last ``before`` entries, the tensor, then the first ``after`` entries (Paddle allows
        no more padding than the axis is long)."""
        for axis, (before, after) in enumerate(zip(begins, ends)):
            if not before and not after:
                continue
            pieces = [x]
            if before:
                pieces.insert(0, self._slice_node(x, axis, -before, np.iinfo(np.int64).max, f"{stem}.wrap{axis}"))
            if after:
                pieces.append(self._slice_node(x, axis, 0, after, f"{stem}.wrap{axis}"))
            x = self._node("Concat", pieces, f"{stem}.wrapped{axis}", axis=axis)
        return x

    def _slice_node(self, x: str, axis: int, start: int, end: int, stem: str) -> str:
        """``x[start:end]`` along ``axis`` (constant bounds)."""
        bounds = [self._const(name, np.array([value], np.int64)) for name, value in
                  (("starts", start), ("ends", end), ("axes", axis))]
        return self._node("Slice", [x, *bounds], stem)

    def _expand(self, op) -> None:
        """expand_v2 to a constant shape (``-1`` keeps a dimension, which ONNX's broadcasting
        ``Expand`` does with 1) or to one computed in the graph, and expand_as_v2 (to the shape
        of ``Y``)."""
        out = self._out(op)
        if op.type == "expand_as_v2" and op.input("Y"):
            shape = self._node("Shape", [self._in(op, "Y")], out + ".shape")
        elif op.type == "expand_as_v2":
            shape = self._const("shape", np.array([max(int(d), 1) for d in op.attr("target_shape")], np.int64))
        elif op.input("Shape") or op.input("expand_shapes_tensor"):
            # -1 keeps a dimension (``expand([x.shape[0], -1, -1])``): 1, which Expand broadcasts.
            shape = self._node("Max", [
                self._shape_tensor(op, "Shape", "expand_shapes_tensor", out),
                self._const("one", np.array([1], np.int64)),
            ], out + ".kept")
        else:
            shape = self._const("shape", np.array([1 if int(d) == -1 else int(d) for d in op.attr("shape")], np.int64))
        self._bind(out, self._node("Expand", [self._in(op), shape], out))

    def _shape_tensor(self, op, tensor_slot: str, list_slot: str, stem: str) -> str:
        """A shape (or slice bounds) computed in the graph as an int64 ONNX tensor: the 1-D
        tensor in ``tensor_slot``, or the one-element tensors in ``list_slot`` concatenated (a
        ViT's ``cls.expand([x.shape[0], 1, d])``)."""
        int64 = self.helper.np_dtype_to_tensor_dtype(np.dtype(np.int64))
        if tensor_slot in op.input_names and op.input(tensor_slot):
            return self._node("Cast", [self._in(op, tensor_slot)], stem + ".shape", to=int64)
        flat = self._const("shape", np.array([1], np.int64))
        parts = [
            self._node("Cast", [self._node("Reshape", [self._tensor(op, name), flat], stem + ".dim")],
                       stem + ".dim64", to=int64)
            for name in op.input(list_slot)
        ]
        return self._node("Concat", parts, stem + ".shape", axis=0)

    def _shape_of(self, op) -> None:
        """shape (an int32 tensor in Paddle, so cast from ONNX's int64) and size (int64)."""
        out = self._out(op)
        x = self._in(op, "Input")
        if op.type == "size":
            self._bind(out, self._node("Size", [x], out))
            return
        shape = self._node("Shape", [x], out + ".int64")
        to = self.helper.np_dtype_to_tensor_dtype(numpy_dtype(self.block._find_var_recursive(out).dtype))
        self._bind(out, self._node("Cast", [shape], out, to=to))

    def _tile(self, op) -> None:
        """tile by ``repeat_times`` (fewer than the rank: the leading axes once; more: ``x``
        gets leading axes of size 1 first, as Paddle does), constant or computed in the graph
        (a ``RepeatTimes`` tensor, or a ``repeat_times_tensor`` list of one-element tensors:
        DeBERTa-v2's ``tile([x.shape[0] // heads, 1, 1])``)."""
        rank = len(self._shape(op.input("X")[0]))
        out = self._out(op)
        x = self._in(op)
        tensor = "RepeatTimes" in op.input_names and op.input("RepeatTimes")
        listed = "repeat_times_tensor" in op.input_names and op.input("repeat_times_tensor")
        if tensor or listed:
            count = int(np.prod(self._shape(tensor[0]))) if tensor else len(listed)
            repeats = self._shape_tensor(op, "RepeatTimes", "repeat_times_tensor", out)
            if count < rank:
                ones = self._const("ones", np.ones(rank - count, np.int64))
                repeats = self._node("Concat", [ones, repeats], out + ".repeats", axis=0)
        else:
            values = [int(r) for r in op.attr("repeat_times")]
            count = len(values)
            repeats = self._const("repeats", np.array([1] * (rank - count) + values, np.int64))
        if count > rank:
            axes = self._const("axes", np.arange(count - rank, dtype=np.int64))
            x = self._node("Unsqueeze", [x, axes], out + ".unsqueezed")
        self._bind(out, self._node("Tile", [x, repeats], out))

    def _random(self, op) -> None:
        """uniform_random / gaussian_random (``paddle.rand``, ``paddle.uniform``,
        ``paddle.randn``, ``paddle.normal``): ONNX's ``RandomUniform`` / ``RandomNormal`` of a
        constant shape, their ``...Like`` forms on zeros of a shape computed in the graph (an
        NMF head's random bases, a VAE's noise). Each runtime draws its own numbers: the
        distribution is the same, the values are not (nor are two Paddle runs')."""
        if op.attr("dtype") != 5:  # paddle's FP32
            raise NotImplementedError(f"{op.type} of dtype {op.attr('dtype')} is not exported (float32 only)")
        out = self._out(op)
        if op.type == "uniform_random":
            kind, attrs = "RandomUniform", {"low": float(op.attr("min")), "high": float(op.attr("max"))}
        else:
            kind, attrs = "RandomNormal", {"mean": float(op.attr("mean")), "scale": float(op.attr("std"))}
        if op.attr("seed"):
            attrs["seed"] = float(op.attr("seed"))
        float32 = self.helper.np_dtype_to_tensor_dtype(np.dtype(np.float32))
        if any(slot in op.input_names and op.input(slot) for slot in ("ShapeTensor", "ShapeTensorList")):
            shape = self._shape_tensor(op, "ShapeTensor", "ShapeTensorList", out)
            zero = self.helper.make_tensor("zero", float32, [1], [0.0])
            zeros = self._node("ConstantOfShape", [shape], out + ".zeros", value=zero)
            self._bind(out, self._node(kind + "Like", [zeros], out, dtype=float32, **attrs))
            return
        shape = [int(d) for d in op.attr("shape")]
        self._bind(out, self._node(kind, [], out, dtype=float32, shape=shape, **attrs))

    def _broadcast_tensors(self, op) -> None:
        """broadcast_tensors: each input ``Expand``-ed to the inputs' common shape, the largest
        of each dimension with the shapes aligned at the right (CLIP's pooled token,
        ``x[paddle.arange(b), ids.argmax(-1)]``, broadcasts its two index tensors so)."""
        names = op.input("X")
        ranks = [len(self._shape(name)) for name in names]
        stem = op.output("Out")[0]
        shapes = []
        for name, rank in zip(names, ranks):
            shape = self._node("Shape", [self._tensor(op, name)], stem + ".shape")
            if rank < max(ranks):
                ones = self._const("ones", np.ones([max(ranks) - rank], np.int64))
                shape = self._node("Concat", [ones, shape], stem + ".aligned", axis=0)
            shapes.append(shape)
        common = self._node("Max", shapes, stem + ".common") if len(shapes) > 1 else shapes[0]
        for name, out in zip(names, op.output("Out")):
            self._bind(out, self._node("Expand", [self._tensor(op, name), common], out))

    def _sum(self, op) -> None:
        """``paddle.add_n``: an ONNX ``Sum`` of its operands, in float as Paddle adds them."""
        out = self._out(op)
        self._bind(out, self._node("Sum", [self._tensor(op, name) for name in op.input("X")], out))

    def _stack(self, op) -> None:
        names = op.input("X")
        axis = int(op.attr("axis"))
        if axis < 0:
            axis += len(self._shape(names[0])) + 1
        out = self._out(op, "Y")
        axes = self._const("axes", np.array([axis], np.int64))
        parts = [self._node("Unsqueeze", [self._tensor(op, name), axes], out + ".part") for name in names]
        self._bind(out, self._node("Concat", parts, out, axis=axis))

    def _gather(self, op) -> None:
        """gather along ``axis`` (an attribute, or a constant ``Axis`` tensor); index_select
        along ``dim``."""
        axis = int(op.attr("axis" if op.type == "gather" else "dim"))
        if op.type == "gather" and op.input("Axis"):
            value = self.constants.get(op.input("Axis")[0])
            if value is None:
                raise NotImplementedError("gather with a computed Axis tensor is not exported")
            axis = int(np.reshape(value, -1)[0])
        out = self._out(op)
        self._bind(out, self._node("Gather", [self._in(op), self._in(op, "Index")], out, axis=axis))

    def _gather_nd(self, op) -> None:
        """gather_nd: ``index``'s last axis indexes ``x``'s leading axes, ONNX's ``GatherND``
        (``batch_dims`` 0; int64 indices)."""
        out = self._out(op)
        index = self._node("Cast", [self._in(op, "Index")], out + ".index", to=self.onnx.TensorProto.INT64)
        self._bind(out, self._node("GatherND", [self._in(op), index], out))

    def _embedding(self, op) -> None:
        """lookup_table_v2: rows of the table (``padding_idx`` rows are zeros in the table), a
        parameter or a table the graph computes (``F.embedding(ids, head.weight.T)``, an input
        embedding tied to the output head)."""
        name = op.input("W")[0]
        computed = not self._is_param(name)
        table = self._in(op, "W") if computed else self._const(name, self._param(name).astype(np.float32))
        out = self._out(op)
        ids = self._in(op, "Ids")
        padding = int(op.attr("padding_idx")) if op.has_attr("padding_idx") else -1
        if not computed or padding < 0:
            self._bind(out, self._node("Gather", [table, ids], out, axis=0))
            return
        # A computed table's padding row is no zeros: Paddle's kernel writes zeros there.
        rows = self._node("Gather", [table, ids], out + ".rows", axis=0)
        wide_ids = self._node("Cast", [ids], out + ".ids", to=self.helper.np_dtype_to_tensor_dtype(np.dtype(np.int64)))
        at_padding = self._node("Equal", [wide_ids, self._const("padding", np.array(padding, np.int64))], out + ".padding")
        kept = self._node("Not", [at_padding], out + ".kept")
        kept = self._node("Cast", [kept], out + ".kept_float", to=self.helper.np_dtype_to_tensor_dtype(np.dtype(np.float32)))
        kept = self._node("Unsqueeze", [kept, self._const("axes", np.array([-1], np.int64))], out + ".kept_rows")
        self._bind(out, self._node("Mul", [rows, kept], out))

    def _slice(self, op) -> None:
        """slice and strided_slice (YOLOv5's Focus ``x[..., ::2, ::2]``) with bounds as
        attributes or computed in the graph (a position embedding cut to the sequence length,
        ``pos[:, :paddle.shape(x)[1]]``)."""
        out = self._out(op)
        axes = [int(a) for a in op.attr("axes")]
        kinds = ("starts", "ends", "strides") if op.type == "strided_slice" else ("starts", "ends")
        bounds = []
        for kind in kinds:
            slot = kind.capitalize() + "Tensor"
            if op.input(slot) or op.input(slot + "List"):
                bounds.append(self._shape_tensor(op, slot, slot + "List", out + "." + kind))
            else:
                bounds.append(self._const(kind, np.array([int(a) for a in op.attr(kind)], np.int64)))
        axes_tensor = self._const("axes", np.array(axes, np.int64))
        sliced = self._node(
            "Slice", [self._in(op, "Input"), *bounds[:2], axes_tensor, *bounds[2:]], out + ".slice"
        )
        decrease = [int(a) for a in op.attr("decrease_axis")]
        if decrease:
            sliced = self._node("Squeeze", [sliced, self._const("axes", np.array(decrease, np.int64))], out)
        self._bind(out, sliced)

    def _set_value(self, op) -> None:
        """set_value (``x[..., a:b] = v``: Swin's attention mask filled region by region in
        ``forward``, a token written into a sequence) over slices of known bounds. On a
        constant input written with constants (``paddle.zeros`` then scalars) the result is a
        constant; otherwise ``Where`` of the slices' mask between the value, padded out to the
        input's shape (unit steps), and the input."""
        self._reject_tensor_inputs(op, "StartsTensorList", "EndsTensorList", "StepsTensorList")
        if list(op.attr("none_axes")):
            raise NotImplementedError("set_value with None (new) axes is not exported")
        out, name = self._out(op), op.input("Input")[0]
        shape = self._shape(name)
        dtype = numpy_dtype(self.block._find_var_recursive(out).dtype)
        axes = [int(a) for a in op.attr("axes")]
        index = [slice(None)] * len(shape)
        for axis, start, end, step in zip(axes, op.attr("starts"), op.attr("ends"), op.attr("steps")):
            if shape[axis] < 0:
                raise NotImplementedError(
                    f"set_value along axis {axis}, whose size is known only at run time, is not exported"
                )
            index[axis] = slice(*slice(int(start), int(end), int(step)).indices(shape[axis]))
        value_tensor = bool(op.input("ValueTensor"))
        values = None if value_tensor else np.array(
            [item.value() for item in op.attr("values")]
        ).astype(dtype).reshape([int(d) for d in op.attr("shape")])
        constant = self.constants.get(name)
        if constant is not None and values is not None:
            folded = np.array(constant, dtype=dtype, copy=True)
            folded[tuple(index)] = values
            self.constants[out] = folded
            self._bind(out, self._const(out, folded))
            return
        mask = np.zeros([shape[a] if a in axes else 1 for a in range(len(shape))], bool)
        mask[tuple(index)] = True
        if values is not None:
            if values.size != 1:
                raise NotImplementedError("set_value of several constants into a tensor is not exported")
            written = self._const("value", values.reshape([]))
        else:
            if any(index[axis].step != 1 for axis in axes):
                raise NotImplementedError("set_value of a tensor over a strided slice is not exported")
            written = self._tensor(op, op.input("ValueTensor")[0])
            decrease = [int(a) for a in op.attr("decrease_axes")]
            if decrease:
                written = self._node("Unsqueeze", [written, self._const("axes", np.array(decrease, np.int64))], out + ".value")
            # The value broadcast to the slice's shape, then padded out to the input's.
            region = self._node("Slice", [
                self._in(op, "Input"),
                self._const("starts", np.array([index[a].start for a in axes], np.int64)),
                self._const("ends", np.array([index[a].stop for a in axes], np.int64)),
                self._const("axes", np.array(axes, np.int64)),
            ], out + ".region")
            written = self._node("Expand", [written, self._node("Shape", [region], out + ".region_shape")], out + ".expanded")
            before = [index[a].start if a in axes else 0 for a in range(len(shape))]
            after = [shape[a] - index[a].stop if a in axes else 0 for a in range(len(shape))]
            written = self._node("Pad", [written, self._const("pads", np.array(before + after, np.int64))], out + ".padded")
        self._bind(out, self._node("Where", [self._const("mask", mask), written, self._in(op, "Input")], out))

    def _resize_to(self, x: str, spatial_sizes: str, out: str, attrs: dict) -> str:
        """ONNX ``Resize`` of NC... tensor ``x`` to the int64 ``spatial_sizes`` (its batch and
        channels kept)."""
        shape = self._node("Shape", [x], out + ".shape")
        batch_channels = self._node(
            "Slice", [shape, self._const("start", np.array([0], np.int64)),
                      self._const("end", np.array([2], np.int64))], out + ".nc",
        )
        size = self._node("Concat", [batch_channels, spatial_sizes], out + ".size", axis=0)
        inputs = [x, self._const("roi", np.zeros([0], np.float32)), self._const("no_scales", np.zeros([0], np.float32)), size]
        return self._node("Resize", inputs, out, **attrs)

    def _interpolate(self, op) -> None:
        """nearest/bilinear_interp_v2 (nearest and trilinear_interp_v2 of an NCDHW tensor,
        linear_interp_v2 over the last axis of an NCW one) with a constant scale, a constant
        output size or one computed in the graph as ``Resize``, with Paddle's coordinate
        mapping (``align_corners``, ``align_mode``)."""
        self._reject_tensor_inputs(op, "Scale")
        if op.attr("data_layout") not in ("NCHW", "NCDHW", "NCW", "AnyLayout"):
            raise NotImplementedError(f"{op.type} in {op.attr('data_layout')} is not exported")
        nearest, cubic = op.type == "nearest_interp_v2", op.type == "bicubic_interp_v2"
        if op.attr("align_corners"):
            mode = "align_corners"
        elif nearest or (op.attr("align_mode") == 1 and not cubic):  # Paddle's bicubic: half pixel
            mode = "asymmetric"
        else:
            mode = "half_pixel"
        kind = "nearest" if nearest else "cubic" if cubic else "linear"
        attrs: dict = dict(mode=kind, coordinate_transformation_mode=mode)
        if cubic:
            attrs["cubic_coeff_a"] = -0.75  # Paddle's bicubic kernel
        if nearest:
            attrs["nearest_mode"] = "round_prefer_ceil" if op.attr("align_corners") else "floor"
        x = self._in(op)
        out = self._out(op)
        scale = [float(v) for v in op.attr("scale")] if op.has_attr("scale") else []
        # The spatial axes resized: the width of an NCW tensor, height and width of an NCHW
        # one, and depth too of an NCDHW one (a 3-D U-Net's upsampling, measured: ONNX Runtime
        # refused the 4-entry scales it was given before).
        spatial = len(self._shape(op.input("X")[0])) - 2
        sizes = [op.attr(f"out_{axis}") for axis in "dhw"[3 - spatial:]]
        computed = [slot for slot in ("SizeTensor", "OutSize") if slot in op.input_names and op.input(slot)]
        if computed:
            # A size computed in the graph (F.interpolate(x, size=y.shape[2:]) with a dynamic
            # input spec): Paddle reads SizeTensor first, then OutSize, over any scale.
            if computed[0] == "SizeTensor":
                hw = self._shape_tensor(op, "", "SizeTensor", out)
            else:
                hw = self._shape_tensor(op, "OutSize", "", out)
            node = self._resize_to(x, hw, out, attrs)
        elif scale and all(v > 0 for v in scale):
            factors = scale[-spatial:] if len(scale) >= spatial else scale[:1] * spatial
            scales = self._const("scales", np.array([1.0, 1.0, *factors], np.float32))
            node = self._node("Resize", [x, self._const("roi", np.zeros([0], np.float32)), scales], out, **attrs)
        elif all(size > 0 for size in sizes):
            node = self._resize_to(x, self._const("hw", np.array(sizes, np.int64)), out, attrs)
        else:
            raise NotImplementedError(f"{op.type} without a constant scale or size is not exported")
        self._bind(out, node)
