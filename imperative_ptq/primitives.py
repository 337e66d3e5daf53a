"""Affine quantize / dequantize primitives with PyTorch-exact semantics.

Convention (the affine scheme of ``torch.quantize_per_tensor``)::

    q = clamp(round_half_even(x / scale) + zero_point, quant_min, quant_max)
    x_hat = (q - zero_point) * scale                      # float32

``q`` is stored as ``int8`` ([-128, 127]), ``uint8`` ([0, 255]) or ``int32``
([-2**31, 2**31 - 1]); ``quant_min`` / ``quant_max`` narrow the range inside
that storage type (e.g. 4-bit: ``quant_min=-8, quant_max=7``).

Paddle's symmetric convention ``q = round(x / threshold * 127)`` is the special
case ``scale = threshold / 127``, ``zero_point = 0`` with the restricted int8
range [-127, 127]; ``compute_qparams(-t, t, "int8", restrict_range=True)``
returns exactly that scale (not bit-identical to Paddle's own kernels, which
compute ``x / threshold * 127`` in a different float order).

The float32 arithmetic reproduces PyTorch 2.x on CPU bit for bit.  PyTorch's
kernels do not agree with each other on where the zero point is added, so each
function here mirrors its own PyTorch counterpart (``inv = 1.0f / float(scale)``
everywhere; ``fl32`` is one float32 rounding):

* ``quantize_per_tensor`` int8/uint8: ``rint(fl32(x * inv + zp))`` with a
  single rounding (fbgemm's fused multiply-add).
* ``quantize_per_tensor`` int32 and ``quantize_per_channel``:
  ``rint(fl32(fl32(x * inv) + zp))``.
* ``fake_quantize``: ``rint(fl32(x * inv)) + zp`` (round first).
* ``dequantize``: per tensor ``fl32((q - zp) * float(scale))``; per channel
  ``fl32((fl32(q) - fl32(zp)) * scale)`` with the scale kept in float64.

With ``zero_point == 0`` all three quantize formulas coincide; otherwise they can
differ by one step for inputs at (or within an ulp of) a rounding tie.

Deliberate differences from PyTorch (which is inconsistent between kernels here):
NaN always maps to ``quant_min`` and +-inf saturate to ``quant_max`` /
``quant_min``; float64 inputs are accepted and rounded to float32 first; integer
differences ``q - zero_point`` are computed without int32 overflow.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence, Union

import numpy as np
import paddle

from .rounding import round_half_to_even

__all__ = [
    "quantize_per_tensor",
    "quantize_per_channel",
    "dequantize",
    "fake_quantize",
    "compute_qparams",
]

TensorLike = Union[paddle.Tensor, np.ndarray]
DTypeLike = Union[str, paddle.dtype, np.dtype, type]
ScalarLike = Union[float, int, np.generic, paddle.Tensor, np.ndarray]
VectorLike = Union[Sequence[float], Sequence[int], np.ndarray, paddle.Tensor]

_DTYPE_RANGES: dict[str, tuple[int, int]] = {
    "int8": (-128, 127),
    "uint8": (0, 255),
    "int32": (-(2**31), 2**31 - 1),
}
_PADDLE_DTYPES = {"int8": paddle.int8, "uint8": paddle.uint8, "int32": paddle.int32}
_EPS32 = np.float32(np.finfo(np.float32).eps)


# --------------------------------------------------------------------------- validation


def _resolve_dtype(dtype: DTypeLike, name: str = "dtype") -> str:
    """Returns the canonical name ("int8", "uint8" or "int32") of ``dtype``."""
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("paddle.")
        if key in _DTYPE_RANGES:
            return key
        raise ValueError(f"{name} must be one of {sorted(_DTYPE_RANGES)}, got {dtype!r}")
    if isinstance(dtype, paddle.dtype):
        for key, pdt in _PADDLE_DTYPES.items():
            if dtype == pdt:
                return key
        raise ValueError(f"{name} must be one of {sorted(_DTYPE_RANGES)}, got {dtype}")
    if isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        key = np.dtype(dtype).name
        if key in _DTYPE_RANGES:
            return key
        raise ValueError(f"{name} must be one of {sorted(_DTYPE_RANGES)}, got {key!r}")
    raise TypeError(
        f"{name} must be a str or a paddle/numpy integer dtype, got {type(dtype).__name__}"
    )


def _to_numpy(value: object) -> np.ndarray:
    if isinstance(value, paddle.Tensor):
        return value.numpy()
    return np.asarray(value)


def _scalar(value: object, name: str, integer: bool) -> float | int:
    """Converts a Python/numpy scalar or a one-element array/tensor to float or int."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be {'an integer' if integer else 'a number'}, got bool")
    if isinstance(value, (paddle.Tensor, np.ndarray, list, tuple)):
        arr = _to_numpy(value)
        if arr.size != 1:
            raise ValueError(
                f"{name} must be a scalar or a one-element tensor (pass axis for per-channel "
                f"parameters), got shape {list(arr.shape)}"
            )
        value = arr.reshape(()).item()
        if isinstance(value, bool):
            raise TypeError(f"{name} must be {'an integer' if integer else 'a number'}, got bool")
    if integer:
        if not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
        return int(value)
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def _check_scale(scale: ScalarLike, name: str = "scale") -> np.float32:
    """Validates a per-tensor scale and returns it as float32."""
    value = _scalar(scale, name, integer=False)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    with np.errstate(over="ignore", divide="ignore"):
        s32 = np.float32(value)
        inv = np.float32(1.0) / s32
    if not (np.isfinite(s32) and np.isfinite(inv)):
        raise ValueError(
            f"{name} must be representable in float32 with a finite reciprocal "
            f"(about 3e-39 < {name} < 3.4e38), got {value!r}"
        )
    return s32


def _check_scales(scales: VectorLike, n: int, name: str = "scales") -> np.ndarray:
    """Validates per-channel scales (length ``n``) and returns them as float64."""
    arr = _to_numpy(scales)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(
            f"{name} must be 1-D with length {n} (the size of the channel axis), "
            f"got shape {list(arr.shape)}"
        )
    arr = arr.astype(np.float64)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        s32 = arr.astype(np.float32)
        bad = (
            ~np.isfinite(arr) | (arr <= 0) | ~np.isfinite(np.float32(1.0) / s32) | ~np.isfinite(s32)
        )
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} must be finite, > 0 and representable in float32 with a finite reciprocal, "
            f"got {arr[i]!r} at index {i}"
        )
    return arr


def _check_int(value: object, name: str) -> int:
    return int(_scalar(value, name, integer=True))


def _resolve_range(
    dtype: str, quant_min: int | None, quant_max: int | None, strict: bool = False
) -> tuple[int, int]:
    """Returns (qmin, qmax), defaulting to the range of ``dtype``."""
    lo, hi = _DTYPE_RANGES[dtype]
    qmin = lo if quant_min is None else _check_int(quant_min, "quant_min")
    qmax = hi if quant_max is None else _check_int(quant_max, "quant_max")
    if not lo <= qmin <= hi:
        raise ValueError(f"quant_min must lie in the {dtype} range [{lo}, {hi}], got {qmin}")
    if not lo <= qmax <= hi:
        raise ValueError(f"quant_max must lie in the {dtype} range [{lo}, {hi}], got {qmax}")
    if qmin > qmax or (strict and qmin == qmax):
        op = "<" if strict else "<="
        raise ValueError(
            f"quant_min must be {op} quant_max, got quant_min={qmin}, quant_max={qmax}"
        )
    return qmin, qmax


def _check_zero_point(
    zero_point: ScalarLike, qmin: int, qmax: int, name: str = "zero_point"
) -> int:
    zp = _check_int(zero_point, name)
    if not qmin <= zp <= qmax:
        raise ValueError(f"{name} must lie in [{qmin}, {qmax}], got {zp}")
    return zp


def _check_zero_points(
    zero_points: VectorLike, n: int, qmin: int, qmax: int, name: str = "zero_points"
) -> np.ndarray:
    arr = _to_numpy(zero_points)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(
            f"{name} must be 1-D with length {n} (the size of the channel axis), "
            f"got shape {list(arr.shape)}"
        )
    arr = arr.astype(np.int64)
    bad = (arr < qmin) | (arr > qmax)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} must lie in [{qmin}, {qmax}], got {int(arr[i])} at index {i}")
    return arr


def _check_axis(axis: object, ndim: int) -> int:
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an integer, got {type(axis).__name__}")
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis must be in [{-ndim}, {ndim}) for a {ndim}-D input, got {axis}")
    return axis % ndim


def _float_input(x: TensorLike, name: str = "x") -> paddle.Tensor:
    """Returns ``x`` as a float32 Paddle tensor (float64 is rounded to float32)."""
    if isinstance(x, np.ndarray):
        if x.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name} must be a float32 or float64 array, got {x.dtype}")
        return paddle.to_tensor(x.astype(np.float32, copy=False))
    if isinstance(x, paddle.Tensor):
        if x.dtype == paddle.float32:
            return x
        if x.dtype == paddle.float64:
            return x.astype("float32")
        raise TypeError(f"{name} must be a float32 or float64 tensor, got {x.dtype}")
    raise TypeError(f"{name} must be a paddle.Tensor or numpy.ndarray, got {type(x).__name__}")


def _int_input(q: TensorLike, name: str = "q") -> tuple[paddle.Tensor, str]:
    """Returns ``q`` as a Paddle tensor and its canonical integer dtype name."""
    if isinstance(q, np.ndarray):
        key = q.dtype.name
        if key not in _DTYPE_RANGES:
            raise TypeError(f"{name} must be an int8, uint8 or int32 array, got {q.dtype}")
        return paddle.to_tensor(q), key
    if isinstance(q, paddle.Tensor):
        for key, pdt in _PADDLE_DTYPES.items():
            if q.dtype == pdt:
                return q, key
        raise TypeError(f"{name} must be an int8, uint8 or int32 tensor, got {q.dtype}")
    raise TypeError(f"{name} must be a paddle.Tensor or numpy.ndarray, got {type(q).__name__}")


# --------------------------------------------------------------------------- kernels


def _const(value: float | np.ndarray, dtype: str, like: paddle.Tensor) -> paddle.Tensor:
    return paddle.to_tensor(np.asarray(value, dtype=dtype), place=like.place)


def _channel_shape(ndim: int, axis: int, n: int) -> list[int]:
    shape = [1] * ndim
    shape[axis] = n
    return shape


def _fma_f32(x: paddle.Tensor, inv: np.float32, zp: int) -> paddle.Tensor:
    """Returns fl32(x * inv + zp) rounded once, i.e. a float32 fused multiply-add.

    The product of two float32 values is exact in float64; TwoSum gives the exact
    sum as ``s + err``; rounding ``s`` to float32 is then correct unless ``s`` is a
    float32 midpoint, in which case the sign of ``err`` breaks the tie.
    """
    a = x.astype("float64") * _const(inv, "float64", x)
    b = _const(float(zp), "float64", x)
    s = a + b
    bb = s - a
    err = (a - (s - bb)) + (b - bb)
    r = s.astype("float32")
    r64 = r.astype("float64")
    inf = _const(np.inf, "float32", x)
    other = paddle.nextafter(r, paddle.where(s > r64, inf, -inf))
    midpoint = ((r64 + other.astype("float64")) * 0.5 == s) & (r64 != s)
    fixed = paddle.where(err > 0, paddle.maximum(r, other), paddle.minimum(r, other))
    return paddle.where(midpoint & (err != 0), fixed, r)


def _clamp(v: paddle.Tensor, qmin: int, qmax: int) -> paddle.Tensor:
    """Clamps rounded values to [qmin, qmax] in float64; NaN maps to qmin."""
    v = v.astype("float64")
    lo = _const(float(qmin), "float64", v)
    hi = _const(float(qmax), "float64", v)
    clamped = paddle.minimum(paddle.maximum(v, lo), hi)
    return paddle.where(paddle.isnan(v), lo.expand_as(v), clamped)


# --------------------------------------------------------------------------- public API


@paddle.no_grad()
def quantize_per_tensor(
    x: TensorLike,
    scale: ScalarLike,
    zero_point: ScalarLike,
    dtype: DTypeLike,
    quant_min: int | None = None,
    quant_max: int | None = None,
) -> paddle.Tensor:
    """Quantizes ``x`` with one scale and zero point.

    Matches ``torch.quantize_per_tensor(...).int_repr()``.

    Args:
        x: float32 (or float64, rounded to float32 first) tensor or array.
        scale: Positive finite step size (used as float32).
        zero_point: Integer in ``[quant_min, quant_max]``.
        dtype: "int8", "uint8" or "int32" (or the Paddle / numpy dtype).
        quant_min: Lowest code; defaults to the dtype minimum.
        quant_max: Highest code; defaults to the dtype maximum.

    Returns:
        A Paddle tensor of ``dtype`` with the shape of ``x``. NaN maps to ``quant_min``.

    Raises:
        TypeError: On a non-float ``x`` or wrongly typed arguments.
        ValueError: On an invalid scale, zero point, dtype or range.
    """
    key = _resolve_dtype(dtype)
    qmin, qmax = _resolve_range(key, quant_min, quant_max)
    s32 = _check_scale(scale)
    zp = _check_zero_point(zero_point, qmin, qmax)
    xt = _float_input(x)
    inv = np.float32(1.0) / s32
    if key == "int32":
        v = xt * _const(inv, "float32", xt) + _const(np.float32(zp), "float32", xt)
    else:
        v = _fma_f32(xt, inv, zp)
    return _clamp(round_half_to_even(v), qmin, qmax).astype(_PADDLE_DTYPES[key])


@paddle.no_grad()
def quantize_per_channel(
    x: TensorLike,
    scales: VectorLike,
    zero_points: VectorLike,
    axis: int,
    dtype: DTypeLike,
    quant_min: int | None = None,
    quant_max: int | None = None,
) -> paddle.Tensor:
    """Quantizes ``x`` with one scale / zero point per slice along ``axis``.

    Matches ``torch.quantize_per_channel(...).int_repr()``.

    Args:
        x: float32 (or float64) tensor or array with at least one dimension.
        scales: 1-D positive scales, ``len == x.shape[axis]``.
        zero_points: 1-D integers in ``[quant_min, quant_max]``, same length.
        axis: Channel axis (negative values count from the end).
        dtype: "int8", "uint8" or "int32" (or the Paddle / numpy dtype).
        quant_min: Lowest code; defaults to the dtype minimum.
        quant_max: Highest code; defaults to the dtype maximum.

    Returns:
        A Paddle tensor of ``dtype`` with the shape of ``x``. NaN maps to ``quant_min``.

    Raises:
        TypeError: On a non-float ``x`` or wrongly typed arguments.
        ValueError: On invalid scales, zero points, axis, dtype or range.
    """
    key = _resolve_dtype(dtype)
    qmin, qmax = _resolve_range(key, quant_min, quant_max)
    xt = _float_input(x)
    ax = _check_axis(axis, xt.ndim)
    n = xt.shape[ax]
    s32 = _check_scales(scales, n).astype(np.float32)
    zps = _check_zero_points(zero_points, n, qmin, qmax)
    shape = _channel_shape(xt.ndim, ax, n)
    inv = (np.float32(1.0) / s32).reshape(shape)
    v = xt * _const(inv, "float32", xt) + _const(
        zps.astype(np.float32).reshape(shape), "float32", xt
    )
    return _clamp(round_half_to_even(v), qmin, qmax).astype(_PADDLE_DTYPES[key])


@paddle.no_grad()
def dequantize(
    q: TensorLike,
    scale: ScalarLike | VectorLike,
    zero_point: ScalarLike | VectorLike,
    axis: int | None = None,
) -> paddle.Tensor:
    """Maps integer codes back to float32: ``(q - zero_point) * scale``, like ``torch.dequantize``.

    Args:
        q: int8, uint8 or int32 tensor or array.
        scale: Positive scale, or (with ``axis``) 1-D scales of length ``q.shape[axis]``.
        zero_point: Integer in the range of ``q``'s dtype, or (with ``axis``) 1-D integers.
        axis: ``None`` for per-tensor parameters, else the channel axis.

    Returns:
        A float32 Paddle tensor with the shape of ``q``.

    Raises:
        TypeError: On a non-integer ``q`` or wrongly typed arguments.
        ValueError: On invalid scales, zero points or axis.
    """
    qt, key = _int_input(q)
    qmin, qmax = _DTYPE_RANGES[key]
    if axis is None:
        s32 = _check_scale(scale)
        zp = _check_zero_point(zero_point, qmin, qmax)
        diff = qt.astype("int64") - _const(zp, "int64", qt)
        return diff.astype("float32") * _const(s32, "float32", qt)
    ax = _check_axis(axis, qt.ndim)
    n = qt.shape[ax]
    s64 = _check_scales(scale, n, name="scale")
    zps = _check_zero_points(zero_point, n, qmin, qmax, name="zero_point")
    shape = _channel_shape(qt.ndim, ax, n)
    diff = qt.astype("float32") - _const(zps.astype(np.float32).reshape(shape), "float32", qt)
    return (diff.astype("float64") * _const(s64.reshape(shape), "float64", qt)).astype("float32")


@paddle.no_grad()
def fake_quantize(
    x: TensorLike,
    scale: ScalarLike | VectorLike,
    zero_point: ScalarLike | VectorLike,
    quant_min: int,
    quant_max: int,
    axis: int | None = None,
) -> paddle.Tensor:
    """Quantizes and dequantizes in one float32 pass (simulated quantization).

    Matches ``torch.fake_quantize_per_tensor_affine`` (``axis=None``) and
    ``torch.fake_quantize_per_channel_affine``: ``q = clamp(rint(x * inv) + zp)``,
    output ``(q - zp) * scale``. Not differentiable (no straight-through estimator).

    Args:
        x: float32 (or float64) tensor or array.
        scale: Positive scale, or (with ``axis``) 1-D scales of length ``x.shape[axis]``.
        zero_point: Integer in ``[quant_min, quant_max]``, or 1-D integers with ``axis``.
        quant_min: Lowest code (within the int32 range).
        quant_max: Highest code, ``>= quant_min``.
        axis: ``None`` for per-tensor parameters, else the channel axis.

    Returns:
        A float32 Paddle tensor with the shape of ``x``. NaN becomes
        ``(quant_min - zero_point) * scale``.

    Raises:
        TypeError: On a non-float ``x`` or wrongly typed arguments.
        ValueError: On invalid scales, zero points, range or axis.
    """
    qmin, qmax = _resolve_range("int32", quant_min, quant_max)
    xt = _float_input(x)
    if axis is None:
        s32 = np.asarray(_check_scale(scale))
        zps = np.asarray(_check_zero_point(zero_point, qmin, qmax), dtype=np.int64)
        shape: list[int] = []
    else:
        ax = _check_axis(axis, xt.ndim)
        n = xt.shape[ax]
        s32 = _check_scales(scale, n, name="scale").astype(np.float32)
        zps = _check_zero_points(zero_point, n, qmin, qmax, name="zero_point")
        shape = _channel_shape(xt.ndim, ax, n)
    inv = (np.float32(1.0) / s32).reshape(shape)
    zp32 = _const(zps.astype(np.float32).reshape(shape), "float32", xt)
    v = round_half_to_even(xt * _const(inv, "float32", xt)) + zp32
    q = _clamp(v, qmin, qmax)
    diff = q - _const(zps.astype(np.float64).reshape(shape), "float64", xt)
    return (diff * _const(s32.astype(np.float64).reshape(shape), "float64", xt)).astype("float32")


def compute_qparams(
    min_val: float | VectorLike,
    max_val: float | VectorLike,
    dtype: DTypeLike = "int8",
    symmetric: bool = True,
    restrict_range: bool = False,
    quant_min: int | None = None,
    quant_max: int | None = None,
) -> tuple[float, int] | tuple[np.ndarray, np.ndarray] | tuple[paddle.Tensor, paddle.Tensor]:
    """Computes (scale, zero_point) from an observed range, like torch's MinMax observers.

    Mirrors ``torch.ao.quantization.MinMaxObserver`` / ``PerChannelMinMaxObserver``
    ``calculate_qparams`` in float32, with ``eps = finfo(float32).eps``:

    * The range is first extended to include 0: ``lo = min(min_val, 0)``, ``hi = max(max_val, 0)``.
    * symmetric: ``scale = max(max(-lo, hi) / ((qmax - qmin) / 2), eps)``; zero point 0,
      or for uint8 128 (``(qmin + qmax) // 2`` when a custom range is given).
    * asymmetric: ``scale = max((hi - lo) / (qmax - qmin), eps)``,
      ``zero_point = clamp(qmin - round(lo / scale), qmin, qmax)``.

    Args:
        min_val: Observed minimum: a scalar, or per-channel values (array/tensor).
        max_val: Observed maximum, broadcast-compatible with ``min_val``.
        dtype: "int8", "uint8" or "int32" (or the Paddle / numpy dtype).
        symmetric: Symmetric (True) or asymmetric/affine (False) scheme.
        restrict_range: Drop the lowest code, e.g. int8 [-127, 127] (torch's
            ``quant_min=-127, quant_max=127``), so that the range is symmetric and
            ``(-128) * (-128)`` products never occur. Not combinable with quant_min/quant_max.
        quant_min: Custom lowest code (e.g. -8 for 4-bit).
        quant_max: Custom highest code (e.g. 7 for 4-bit).

    Returns:
        ``(scale, zero_point)``: Python ``(float, int)`` for scalar inputs; float32 /
        int64 numpy arrays for array inputs; float32 / int64 Paddle tensors if either
        input is a Paddle tensor.

    Raises:
        TypeError: On non-numeric inputs or a bad dtype type.
        ValueError: On non-finite ranges, ``min_val > max_val``, or an invalid dtype/range.
    """
    as_paddle = isinstance(min_val, paddle.Tensor) or isinstance(max_val, paddle.Tensor)
    place = (
        (min_val if isinstance(min_val, paddle.Tensor) else max_val).place if as_paddle else None
    )
    arrays = []
    for name, val in (("min_val", min_val), ("max_val", max_val)):
        arr = _to_numpy(val)
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} must be finite, got {arr[~np.isfinite(arr)].ravel()[0]!r}")
        arrays.append(arr)
    try:
        mn, mx = np.broadcast_arrays(*arrays)
    except ValueError:
        raise ValueError(
            f"min_val and max_val must have broadcast-compatible shapes, got "
            f"{list(arrays[0].shape)} and {list(arrays[1].shape)}"
        ) from None
    if (mn > mx).any():
        i = int(np.flatnonzero((mn > mx).ravel())[0])
        raise ValueError(
            f"min_val must be <= max_val, got min_val={mn.ravel()[i]} > "
            f"max_val={mx.ravel()[i]} at index {i}"
        )
    key = _resolve_dtype(dtype)
    if restrict_range:
        if quant_min is not None or quant_max is not None:
            raise ValueError("restrict_range cannot be combined with quant_min/quant_max")
        lo, hi = _DTYPE_RANGES[key]
        qmin, qmax, custom = lo + 1, hi, True
    else:
        qmin, qmax = _resolve_range(key, quant_min, quant_max, strict=True)
        custom = quant_min is not None or quant_max is not None

    zero = np.float32(0.0)
    min_neg = np.minimum(mn, zero)
    max_pos = np.maximum(mx, zero)
    if symmetric:
        amax = np.maximum(-min_neg, max_pos)
        scale = np.maximum(amax / np.float32((qmax - qmin) / 2), _EPS32)
        zp_value = ((qmin + qmax) // 2 if custom else 128) if key == "uint8" else 0
        zp = np.full(scale.shape, zp_value, dtype=np.int64)
    else:
        scale = np.maximum((max_pos - min_neg) / np.float32(qmax - qmin), _EPS32)
        zp = np.clip(qmin - np.round(min_neg / scale).astype(np.int64), qmin, qmax)
    scale = np.asarray(scale, dtype=np.float32)
    zp = np.asarray(zp, dtype=np.int64)
    if as_paddle:
        return paddle.to_tensor(scale, place=place), paddle.to_tensor(zp, place=place)
    if scale.ndim == 0:
        return float(scale), int(zp)
    return scale, zp
