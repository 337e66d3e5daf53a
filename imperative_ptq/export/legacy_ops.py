"""Recording Paddle APIs that only build PIR ops as legacy-IR ops while tracing.

In Paddle 3.3.1 many APIs (``paddle.matmul``, ``F.sigmoid``, ``F.hardswish``, ...) call
``paddle._C_ops`` functions that accept dygraph tensors and PIR values only, so a model using
them cannot be traced under ``DygraphOldIrGuard`` ("must be Value, but got Variable"), although
Paddle Inference has legacy kernels for every one of them.

:func:`legacy_ir_fallback` wraps every ``paddle._C_ops`` function (and every binding of one in
Paddle's public namespaces) for the duration of a trace (the wrappers made, and each module's
bound names found, once per process). A call that receives a legacy
``Variable`` is *replayed* on placeholders in a scratch PIR program, which gives the PIR ops it
builds with named inputs and attributes; each is then appended to the traced legacy program as
the legacy op whose PHI kernel it names (``pd_op.matmul`` -> ``matmul_v2``), its inputs and
attributes matched by name. PIR constants that feed an op (``full_int_array`` shapes, ``full``
axes) become the legacy op's attribute of that name.

Limits: an op whose legacy form names an argument differently from PIR beyond the renames in
:data:`_ATTRIBUTE_ALIASES` (and the op names of :data:`_LEGACY_TYPES`), takes a PIR constant as
a tensor input, or has no legacy op at all raises :class:`LegacyTranslationError` naming the API and the op; control flow (``if``/``while``
on tensors) is not replayed.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import sys
import types
import weakref
from typing import Any, Callable, Iterator

import paddle

__all__ = ["LegacyTranslationError", "legacy_ir_fallback", "legacy_op_type"]

#: PIR attributes that have no meaning in a legacy OpDesc.
_IGNORED_ATTRIBUTES = frozenset({"op_callstack", "stop_gradient", "place", "persistable", "op_dist_attr"})

#: PIR argument name -> legacy names it may have (besides the same name in another case).
_ATTRIBUTE_ALIASES: dict[str, tuple[str, ...]] = {
    "transpose_x": ("trans_x",),
    "transpose_y": ("trans_y",),
    "perm": ("axis",),
    "axis": ("dim", "axes"),
    "keepdim": ("keep_dim",),
    "dtype": ("out_dtype",),
    "x": ("input",),  # diagonal's Input
    "out": ("output",),  # grid_sampler's Output
    "y": ("other",),  # isclose's Other
}

#: PIR op -> legacy op where Paddle registers no PHI kernel name for the legacy op.
_LEGACY_TYPES = {"reshape": "reshape2", "hardswish": "hard_swish", "tril": "tril_triu", "triu": "tril_triu"}

#: PIR op -> attributes its legacy op needs besides the PIR op's own (one legacy op serving
#: two PIR ops).
_EXTRA_ATTRIBUTES: dict[str, dict[str, Any]] = {"tril": {"lower": True}, "triu": {"lower": False}}

#: PIR ops whose results are constants folded into the reading op's attributes.
_CONSTANT_OPS = frozenset({"pd_op.full_int_array", "pd_op.full"})

#: ``framework.proto`` AttrType values of the legacy attributes whose Python type differs from
#: PIR's (a float ``full`` value read as an int axis, ...).
_ATTR_INT, _ATTR_FLOAT, _ATTR_STRING, _ATTR_INTS, _ATTR_FLOATS, _ATTR_BOOLEAN, _ATTR_LONG, _ATTR_LONGS = (
    0, 1, 2, 3, 4, 6, 9, 11,
)


class LegacyTranslationError(TypeError):
    """A PIR-only Paddle API call could not be recorded as a legacy op."""


def _normalized(name: str) -> str:
    return name.replace("_", "").lower()


@functools.lru_cache(maxsize=None)
def _legacy_types_by_kernel() -> dict[str, list[str]]:
    from paddle.base.framework import OpProtoHolder

    by_kernel: dict[str, list[str]] = collections.defaultdict(list)
    for op_type in OpProtoHolder.instance().op_proto_map:
        try:
            by_kernel[paddle.base.core._get_phi_kernel_name(op_type)].append(op_type)
        except Exception:  # noqa: BLE001 - an op without a PHI kernel name is just not a candidate
            continue
    return dict(by_kernel)


def legacy_op_type(pir_name: str) -> str | None:
    """The legacy op type that runs the PHI kernel of PIR op ``pir_name`` (``pd_op.`` optional).

    Among several legacy ops for one kernel the newest form (``transpose2`` over
    ``transpose``) is the one Paddle Inference's passes match.
    """
    from paddle.base.framework import OpProtoHolder

    name = pir_name.split(".", 1)[-1]
    if name in _LEGACY_TYPES:
        return _LEGACY_TYPES[name]
    candidates = _legacy_types_by_kernel().get(name, [])
    if not candidates:
        return name if name in OpProtoHolder.instance().op_proto_map else None
    return sorted(candidates, key=lambda t: (not t.endswith("2"), t != name, t))[0]


def _match(pir_name: str, legacy_names: list[str]) -> str | None:
    """The legacy argument that PIR argument ``pir_name`` is."""
    wanted = [_normalized(pir_name)] + [_normalized(a) for a in _ATTRIBUTE_ALIASES.get(pir_name, ())]
    for candidate in wanted:
        for legacy in legacy_names:
            if _normalized(legacy) == candidate:
                return legacy
    return None


@dataclasses.dataclass
class _Operand:
    """Where a PIR op input comes from: a traced variable, an earlier replayed op's result,
    a constant, or a list of those (``builtin.combine``)."""

    kind: str  # "variable" | "value" | "constant" | "list"
    ref: Any


@dataclasses.dataclass
class _ReplayedOp:
    name: str
    attributes: dict[str, Any]
    inputs: list[tuple[str, _Operand]]
    outputs: list[tuple[str, int, int | None]]  # (name, value ref, list length or None)


def _is_variable(value: Any) -> bool:
    return isinstance(value, paddle.base.framework.Variable)


def _has_variable(value: Any) -> bool:
    if _is_variable(value):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_variable(item) for item in value)
    return False


def _replay(original: Callable, args: tuple, kwargs: dict) -> tuple[list[_ReplayedOp], Any, list]:
    """Runs ``original`` on PIR placeholders for the legacy variables in ``args``/``kwargs``.

    Returns:
        The replayed ops, the result's structure with value refs in place of values, and the
        legacy variables in placeholder order.
    """
    variables: list = []

    def placeholder(value: Any) -> Any:
        if _is_variable(value):
            variables.append(value)
            shape = [-1 if dim is None else int(dim) for dim in value.shape]
            dtype = paddle.base.data_feeder.convert_dtype(value.dtype)
            return paddle.static.data(f"legacy_input_{len(variables) - 1}", shape, dtype)
        if isinstance(value, (list, tuple)):
            return type(value)(placeholder(item) for item in value)
        return value

    with paddle.pir_utils.IrGuard():
        scratch = paddle.static.Program()
        with paddle.static.program_guard(scratch, paddle.static.Program()):
            pir_args = [placeholder(arg) for arg in args]
            pir_kwargs = {key: placeholder(value) for key, value in kwargs.items()}
            result = original(*pir_args, **pir_kwargs)
        refs: dict[Any, int] = {}
        ops: list[_ReplayedOp] = []
        placeholders: dict[Any, int] = {}
        constants: dict[Any, Any] = {}
        combined: dict[Any, list] = {}
        split_from: dict[Any, tuple[Any, int]] = {}

        def operand(value: Any) -> _Operand:
            # PIR Value wrappers hash by Python object; .id names the value itself.
            value = value.id
            if value in placeholders:
                return _Operand("variable", placeholders[value])
            if value in constants:
                return _Operand("constant", constants[value])
            if value in combined:
                return _Operand("list", [operand(item) for item in combined[value]])
            if value in split_from:
                vector, index = split_from[value]
                return _Operand("value", (refs[vector], index))
            return _Operand("value", refs[value])

        for op in scratch.global_block().ops:
            name = op.name()
            if name == "pd_op.data":
                placeholders[op.result(0).id] = int(op.attrs()["name"].rsplit("_", 1)[-1])
            elif name in _CONSTANT_OPS:
                constants[op.result(0).id] = op.attrs()["value"]
            elif name == "builtin.combine":
                combined[op.result(0).id] = list(op.operands_source())
            elif name == "builtin.split":
                vector = op.operand_source(0).id
                for index, value in enumerate(op.results()):
                    split_from[value.id] = (vector, index)
            else:
                inputs = [
                    (input_name, operand(value))
                    for input_name, value in zip(op.get_input_names(), op.operands_source())
                    if value is not None and value.initialized()
                ]
                outputs = []
                for output_name, value in zip(op.get_output_names(), op.results()):
                    refs[value.id] = len(refs)
                    splits = [user for user in value.all_used_ops() if user.name() == "builtin.split"]
                    outputs.append((output_name, refs[value.id], len(splits[0].results()) if splits else None))
                attributes = {
                    key: value for key, value in op.attrs().items() if key not in _IGNORED_ATTRIBUTES
                }
                ops.append(_ReplayedOp(name, attributes, inputs, outputs))

        def structure(value: Any) -> Any:
            if isinstance(value, (list, tuple)):
                return type(value)(structure(item) for item in value)
            if isinstance(value, paddle.pir.Value):
                return operand(value)
            return value

        return ops, structure(result), variables


def _attribute_value(value: Any, attr_type: int) -> Any:
    if isinstance(value, paddle.base.libpaddle.DataType):
        return int(paddle.pir.core.datatype_to_vartype[value])
    if attr_type in (_ATTR_INT, _ATTR_LONG):
        return int(value)
    if attr_type in (_ATTR_INTS, _ATTR_LONGS):
        return [int(item) for item in value]
    if attr_type == _ATTR_FLOAT:
        return float(value)
    if attr_type == _ATTR_FLOATS:
        return [float(item) for item in value]
    if attr_type == _ATTR_BOOLEAN:
        return bool(value)
    if attr_type == _ATTR_STRING and not isinstance(value, str):
        return str(value)  # isclose's rtol/atol: PIR doubles, legacy strings
    return value


def _append_legacy_op(api: str, op: _ReplayedOp, resolve: Callable[[_Operand], Any]) -> dict[int, Any]:
    """Appends ``op`` to the current legacy program; returns its outputs by value ref."""
    from paddle.base.framework import OpProtoHolder

    op_type = legacy_op_type(op.name)
    if op_type is None:
        raise LegacyTranslationError(f"{api}: PIR op {op.name} has no legacy-IR op in Paddle {paddle.__version__}")
    proto = OpProtoHolder.instance().get_op_proto(op_type)
    input_slots = [slot.name for slot in proto.inputs]
    attr_types = {attr.name: attr.type for attr in proto.attrs}
    inputs: dict[str, list] = {}
    attrs: dict[str, Any] = dict(_EXTRA_ATTRIBUTES.get(op.name.split(".", 1)[-1], {}))
    for name, value in op.attributes.items():
        legacy = _match(name, list(attr_types))
        if legacy is None:
            raise LegacyTranslationError(
                f"{api}: attribute {name!r} of PIR op {op.name} has no counterpart in legacy op {op_type}"
            )
        attrs[legacy] = _attribute_value(value, attr_types[legacy])
    for name, source in op.inputs:
        if source.kind == "constant":
            legacy = _match(name, list(attr_types))
            if legacy is None:
                raise LegacyTranslationError(
                    f"{api}: constant input {name!r} of PIR op {op.name} is no attribute of legacy op {op_type}"
                )
            attrs[legacy] = _attribute_value(source.ref, attr_types[legacy])
            continue
        slot = _match(name, input_slots)
        if slot is None:
            raise LegacyTranslationError(
                f"{api}: input {name!r} of PIR op {op.name} has no slot in legacy op {op_type}"
            )
        value = resolve(source)
        inputs[slot] = value if isinstance(value, list) else [value]
    helper = paddle.base.layer_helper.LayerHelper(op_type)
    first = next(iter(inputs.values()))[0] if inputs else None
    dtype = first.dtype if first is not None else paddle.float32
    outputs: dict[str, list] = {}
    produced: dict[int, Any] = {}
    legacy_outputs = {slot.name: slot for slot in proto.outputs}
    for name, ref, length in op.outputs:
        slot = _match(name, list(legacy_outputs))
        if slot is None:
            raise LegacyTranslationError(
                f"{api}: output {name!r} of PIR op {op.name} has no slot in legacy op {op_type}"
            )
        created = [helper.create_variable_for_type_inference(dtype) for _ in range(length or 1)]
        outputs[slot] = created
        produced[ref] = created if length is not None else created[0]
    for slot in proto.outputs:
        if slot.name not in outputs and not slot.dispensable:
            # e.g. reshape2's XShape: the legacy op needs a variable there.
            outputs[slot.name] = [helper.create_variable_for_type_inference(dtype, stop_gradient=True)]
    helper.append_op(type=op_type, inputs=inputs, outputs=outputs, attrs=attrs)
    return produced


def _as_legacy_constant(value: Any) -> Any:
    """``value``, with each dygraph tensor in it (a tensor a layer captured outside its
    attributes, which the trace does not turn into a variable: ``paddle.audio``'s
    spectrogram window, bound into a ``functools.partial`` of ``paddle.signal.stft``)
    written into the traced program as a constant."""
    if isinstance(value, paddle.Tensor) and not _is_variable(value):
        return paddle.assign(value.numpy())
    if isinstance(value, (list, tuple)):
        return type(value)(_as_legacy_constant(item) for item in value)
    return value


def _record(api: str, original: Callable, args: tuple, kwargs: dict) -> Any:
    """Appends legacy ops computing ``original(*args, **kwargs)``; returns their outputs."""
    args = tuple(_as_legacy_constant(arg) for arg in args)
    kwargs = {key: _as_legacy_constant(value) for key, value in kwargs.items()}
    ops, structure, variables = _replay(original, args, kwargs)
    values: dict[int, Any] = {}

    def resolve(source: _Operand) -> Any:
        if source.kind == "variable":
            return variables[source.ref]
        if source.kind == "list":
            return [resolve(item) for item in source.ref]
        if source.kind == "constant":
            raise LegacyTranslationError(f"{api}: returns or reads a constant the legacy trace cannot hold")
        if isinstance(source.ref, tuple):
            ref, index = source.ref
            return values[ref][index]
        return values[source.ref]

    for op in ops:
        values.update(_append_legacy_op(api, op, resolve))

    def rebuild(value: Any) -> Any:
        if isinstance(value, _Operand):
            return resolve(value)
        if isinstance(value, (list, tuple)):
            return type(value)(rebuild(item) for item in value)
        return value

    return rebuild(structure)


def _fallback(api: str, original: Callable) -> Callable:
    @functools.wraps(original)
    def call(*args: Any, **kwargs: Any) -> Any:
        if paddle.in_dynamic_mode() or not (
            _has_variable(args) or _has_variable(list(kwargs.values()))
        ):
            return original(*args, **kwargs)
        return _record(api, original, args, kwargs)

    call.__wrapped_pir_only__ = original  # type: ignore[attr-defined]
    return call


def _namespaces() -> list[types.ModuleType]:
    """Paddle's modules (the C-op table first): where PIR-only functions are bound."""
    modules = [paddle._C_ops]
    modules.extend(
        module for name, module in list(sys.modules.items())
        if isinstance(module, types.ModuleType)
        and (name == "paddle" or name.startswith("paddle."))
        and module is not paddle._C_ops
        and not name.startswith(("paddle.base.core", "paddle.base.libpaddle"))
    )
    return modules


def _normalize(original: Callable) -> Callable:
    """``F.normalize`` for a legacy trace: Paddle 3.3.1's legacy-IR branch of it fails
    (``UnboundLocalError: ... 'ret'``), so a traced call computes its dygraph branch, whose
    ``_C_ops`` calls :func:`legacy_ir_fallback` records as legacy ops."""

    @functools.wraps(original)
    def call(x: Any, p: float = 2, axis: int = 1, epsilon: float = 1e-12, name: str | None = None) -> Any:
        if paddle.in_dynamic_mode() or not _is_variable(x):
            return original(x, p=p, axis=axis, epsilon=epsilon, name=name)
        eps = paddle.full(shape=[1], fill_value=epsilon, dtype=x.dtype)
        norm = paddle._C_ops.p_norm(x, float(p), axis, epsilon, True, False)
        return paddle.divide(x, paddle._C_ops.maximum(norm, eps))

    return call


def _kthvalue(original: Callable) -> Callable:
    """``paddle.kthvalue`` for a legacy trace: Paddle 3.3.1's legacy-IR branch of it drops
    ``keepdim`` (the traced op returns the squeezed result where dygraph keeps the axis), so a
    traced call makes the dygraph branch's ``_C_ops`` call, which :func:`legacy_ir_fallback`
    records with every attribute."""

    @functools.wraps(original)
    def call(x: Any, k: int, axis: int | None = None, keepdim: bool = False, name: str | None = None) -> Any:
        if paddle.in_dynamic_mode() or not _is_variable(x):
            return original(x, k, axis=axis, keepdim=keepdim, name=name)
        return paddle._C_ops.kthvalue(x, k, -1 if axis is None else axis, keepdim)

    return call


def _swiglu(original: Callable) -> Callable:
    """``swiglu`` for a legacy trace: Paddle 3.3.1's computes only in dygraph and PIR and
    returns ``None`` otherwise (PaddleNLP's Llama MLP: the next Linear failed on ``None``), so
    a traced call computes its definition, ``silu(x) * y`` (``x`` split in two halves on its
    last axis without ``y``), whose ops :func:`legacy_ir_fallback` records."""

    @functools.wraps(original)
    def call(x: Any, y: Any = None, name: str | None = None) -> Any:
        if paddle.in_dynamic_mode() or not _is_variable(x):
            return original(x, y, name=name)
        if y is None:
            x, y = paddle.chunk(x, 2, axis=-1)
        return paddle.multiply(paddle.nn.functional.silu(x), y)

    return call


def _solve(original: Callable) -> Callable:
    """``paddle.linalg.solve`` for a legacy trace: Paddle 3.3.1's legacy-IR branch of it
    fails (``UnboundLocalError: ... 'ret'``: it names its result ``out``), so a traced call
    makes the dygraph branch's ``_C_ops`` call (with ``left=False`` on the transposed
    matrices, as that branch does), which :func:`legacy_ir_fallback` records."""

    @functools.wraps(original)
    def call(x: Any, y: Any, left: bool = True, name: str | None = None, **kwargs: Any) -> Any:
        if paddle.in_dynamic_mode() or not (_is_variable(x) or _is_variable(y)) or kwargs:
            return original(x, y, left=left, name=name, **kwargs)
        if left:
            return paddle._C_ops.solve(x, y)
        swap = lambda t: paddle.transpose(t, [*range(len(t.shape) - 2), len(t.shape) - 1, len(t.shape) - 2])  # noqa: E731
        return swap(paddle._C_ops.solve(swap(x), swap(y)))

    return call


def _fft_transform(original: Callable) -> Callable:
    """The transforms behind ``paddle.fft`` (``fftn_c2c``, ``fft_r2c``, ...) for a legacy
    trace: Paddle 3.3.1's legacy-IR branch of each returns a name it never assigned
    (``UnboundLocalError: ... 'ret'``), and casting a real input to complex fails its dtype
    check there, so a traced call runs the dygraph branch, whose ``_C_ops`` calls (the cast,
    ``fft_c2c`` / ``fft_r2c`` / ``fft_c2r``) :func:`legacy_ir_fallback` records as legacy ops."""
    fft_module = sys.modules[original.__module__]

    @functools.wraps(original)
    def call(x: Any, *args: Any, **kwargs: Any) -> Any:
        if paddle.in_dynamic_mode() or not _is_variable(x):
            return original(x, *args, **kwargs)
        branch = fft_module.in_dynamic_or_pir_mode
        fft_module.in_dynamic_or_pir_mode = lambda: True
        try:
            return original(x, *args, **kwargs)
        finally:
            fft_module.in_dynamic_or_pir_mode = branch

    return call


def _cast(original: Callable) -> Callable:
    """``paddle.cast`` for a legacy trace: Paddle 3.3.1's legacy-IR branch refuses complex
    target types (its dtype check lists real ones only, though the ``cast`` kernel converts
    to complex), so a traced cast to complex appends the legacy ``cast`` op itself."""

    @functools.wraps(original)
    def call(x: Any, dtype: Any) -> Any:
        if paddle.in_dynamic_mode() or not _is_variable(x):
            return original(x, dtype)
        converted = paddle.base.framework.convert_np_dtype_to_dtype_(dtype) if not isinstance(
            dtype, (paddle.base.core.VarDesc.VarType, paddle.base.core.DataType)
        ) else dtype
        if "complex" not in str(converted).lower():
            return original(x, dtype)
        helper = paddle.base.layer_helper.LayerHelper("cast")
        out = helper.create_variable_for_type_inference(dtype=converted, stop_gradient=x.stop_gradient)
        helper.append_op(
            type="cast", inputs={"X": [x]}, outputs={"Out": [out]},
            attrs={"in_dtype": x.dtype, "out_dtype": converted},
        )
        return out

    return call


def _compat_softmax(original: Callable) -> Callable:
    """``Tensor.softmax(dim)`` (the PyTorch-style ``paddle.compat`` softmax, YOLOv8's
    distribution focal loss head) for a legacy trace: Paddle 3.3.1's has no legacy branch and
    returns ``None`` there, so ``paddle.nn.functional.softmax`` computes it."""

    @functools.wraps(original)
    def call(input: Any, dim: int | None = None, dtype: Any = None, *, out: Any = None) -> Any:
        if paddle.in_dynamic_mode() or not _is_variable(input) or out is not None:
            return original(input, dim, dtype=dtype, out=out)
        if dim is None:  # its default, as the original picks it
            dim = 0 if len(input.shape) in (0, 1, 3) else 1
        return paddle.nn.functional.softmax(input, axis=dim, dtype=dtype)

    return call


def _greater_than(original: Callable) -> Callable:
    """``paddle.gt`` / ``Tensor.gt`` / ``Tensor.greater`` for a legacy trace: Paddle 3.3.1
    raises ``NotImplementedError`` there; ``paddle.greater_than`` is the same op."""

    @functools.wraps(original)
    def call(x: Any, y: Any, name: Any = None, *, out: Any = None) -> Any:
        if paddle.in_dynamic_mode() or not _is_variable(x) or out is not None:
            return original(x, y, name, out=out)
        return paddle.greater_than(x, y)

    return call


#: Paddle APIs whose own legacy-IR branch fails or computes something else in Paddle 3.3.1:
#: ``(module, name) -> shim``. Every module binding the same function (``from
#: paddle.incubate.nn.functional import swiglu`` in a model's code) gets the shim too.
_BROKEN_LEGACY_BRANCHES: dict[tuple[str, str], Callable[[Callable], Callable]] = {
    ("paddle.nn.functional", "normalize"): _normalize,
    ("paddle.nn.functional.norm", "normalize"): _normalize,
    ("paddle", "kthvalue"): _kthvalue,
    ("paddle.tensor", "kthvalue"): _kthvalue,
    ("paddle.tensor.search", "kthvalue"): _kthvalue,
    ("paddle.nn.functional", "swiglu"): _swiglu,
    ("paddle.incubate.nn.functional", "swiglu"): _swiglu,
    ("paddle.linalg", "solve"): _solve,
    ("paddle.tensor.linalg", "solve"): _solve,
    ("paddle.tensor.compat_softmax", "softmax"): _compat_softmax,
    ("paddle.tensor.logic", "gt"): _greater_than,
    ("paddle", "cast"): _cast,
    ("paddle.tensor", "cast"): _cast,
    ("paddle.tensor.manipulation", "cast"): _cast,
    **{("paddle.fft", name): _fft_transform for name in (
        "fft_c2c", "fft_r2c", "fft_c2r", "fftn_c2c", "fftn_r2c", "fftn_c2r",
    )},
}


class _LegacyShape(tuple):
    """A legacy ``Variable``'s shape with the ``numel()`` of dygraph and PIR shapes
    (``paddle.Size``), which ``F.scaled_dot_product_attention`` calls in Paddle 3.3.1
    (AttributeError on the legacy tuple). Unknown (-1) dimensions give a negative count."""

    def numel(self) -> int:
        return math.prod(self)


def _is_one_of(value: Any, functions: dict[int, Any]) -> bool:
    """Whether ``value`` is one of ``functions`` (id -> function)."""
    return id(value) in functions and functions[id(value)] is value


class _BindingScans:
    """Which names of each module are bound to functions of a set, scanned once per module
    and set (a trace patches those names: rescanning the ~900 Paddle modules, or every module
    for the shims, on each trace cost 20-40 ms of each export). A module is scanned again
    when its number of names changed (a module gains names as code imports into it)."""

    def __init__(self) -> None:
        self._targets: dict[int, Any] = {}
        self._names: weakref.WeakKeyDictionary[types.ModuleType, tuple[int, tuple[str, ...]]] = weakref.WeakKeyDictionary()

    def of(self, targets: dict[int, Any]) -> _BindingScans:
        """These scans for ``targets`` (id -> function): the earlier ones if the set is the same."""
        if targets.keys() != self._targets.keys():
            self._targets = dict(targets)
            self._names = weakref.WeakKeyDictionary()
        return self

    def bound(self, module: types.ModuleType) -> list[tuple[str, Any]]:
        """``(name, function)`` for each name of ``module`` bound to one of the targets now."""
        targets, namespace = self._targets, vars(module)
        entry = self._names.get(module)
        if entry is None or entry[0] != len(namespace):
            names = tuple(name for name, value in list(namespace.items()) if _is_one_of(value, targets))
            entry = self._names[module] = (len(namespace), names)
        bound = [(name, namespace.get(name)) for name in entry[1]]
        return [(name, value) for name, value in bound if _is_one_of(value, targets)]


_C_OP_BINDINGS = _BindingScans()
_SHIM_BINDINGS = _BindingScans()
#: id(C op) -> (the C op, its fallback wrapper), made once per process.
_FALLBACKS: dict[int, tuple[Callable, Callable]] = {}
#: Whether a trace is patched now (a nested one finds everything patched).
_ACTIVE: list[bool] = []


def _c_ops() -> dict[int, tuple[str, Callable]]:
    """id -> (name, function) of each public ``paddle._C_ops`` function."""
    return {
        id(function): (name, function) for name, function in vars(paddle._C_ops).items()
        if not name.startswith("_") and callable(function) and not isinstance(function, type)
        and not isinstance(function, types.ModuleType)
    }


def _fallback_of(name: str, function: Callable) -> Callable:
    entry = _FALLBACKS.get(id(function))
    if entry is None or entry[0] is not function:
        entry = _FALLBACKS[id(function)] = (function, _fallback(f"paddle._C_ops.{name}", function))
    return entry[1]


@contextlib.contextmanager
def legacy_ir_fallback() -> Iterator[None]:
    """Lets every PIR-only Paddle API be traced into a legacy program (see module docstring)."""
    if _ACTIVE:
        yield
        return
    c_ops = _c_ops()
    functions = {key: function for key, (_, function) in c_ops.items()}
    patched: list[tuple[Any, str, Any]] = []
    variable = paddle.static.Variable
    added: list[str] = []
    _ACTIVE.append(True)
    try:
        c_op_bindings = _C_OP_BINDINGS.of(functions)
        for module in _namespaces():
            for name, value in c_op_bindings.bound(module):
                patched.append((module, name, value))
                setattr(module, name, _fallback_of(c_ops[id(value)][0], value))
        shims: dict[int, tuple[Any, Callable]] = {}  # id(original) -> (original, shimmed)
        for (module_name, name), shim in _BROKEN_LEGACY_BRANCHES.items():
            module = sys.modules.get(module_name)
            original = getattr(module, name, None) if module is not None else None
            if callable(original) and id(original) not in shims:
                shims[id(original)] = (original, shim(original))
        if shims:
            shim_bindings = _SHIM_BINDINGS.of({key: original for key, (original, _) in shims.items()})
            for module in list(sys.modules.values()):
                if not isinstance(module, types.ModuleType):
                    continue
                for name, value in shim_bindings.bound(module):
                    patched.append((module, name, value))
                    setattr(module, name, shims[id(value)][1])
            for name, value in list(vars(variable).items()):  # the method form, x.kthvalue(...)
                entry = shims.get(id(value))
                if entry is not None and entry[0] is value:
                    patched.append((variable, name, value))
                    setattr(variable, name, entry[1])
        # Methods of the legacy Variable that Paddle 3.3.1 binds straight to a PIR-only C op
        # (``x.sum(-1)``, ``x.exp()``, ``x.sigmoid()``: 53 of them) take PIR values only, and
        # positional Python arguments (an int axis) where the C op wants tensors: the public
        # API of the same name (``paddle.sum``, ...) converts those, and its C op is wrapped above.
        for name, value in list(vars(variable).items()):
            api = getattr(paddle.tensor, name, None)
            if _is_one_of(value, functions) and callable(api):
                patched.append((variable, name, value))
                setattr(variable, name, api)
        # ``paddle.lerp`` reads ``x.is_cuda`` before it checks the mode; the legacy Variable
        # has no such attribute (AttributeError in Paddle 3.3.1).
        if not hasattr(variable, "is_cuda"):
            variable.is_cuda = property(lambda self: False)
            added.append("is_cuda")
        shape = vars(variable)["shape"]
        patched.append((variable, "shape", shape))
        variable.shape = property(lambda self: _LegacyShape(shape.fget(self)))
        yield
    finally:
        for name in added:
            delattr(variable, name)
        for module, name, value in reversed(patched):
            setattr(module, name, value)
        _ACTIVE.clear()
