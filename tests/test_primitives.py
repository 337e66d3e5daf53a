"""Tests for imperative_ptq.primitives: literal examples, bad input, properties, torch parity."""

from __future__ import annotations

import warnings

import numpy as np
import paddle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imperative_ptq.primitives import (
    compute_qparams,
    dequantize,
    fake_quantize,
    quantize_per_channel,
    quantize_per_tensor,
)

F32 = np.float32
RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int32": (-(2**31), 2**31 - 1)}
NAN, INF = float("nan"), float("inf")


def t(values, dtype="float32") -> paddle.Tensor:
    return paddle.to_tensor(np.asarray(values, dtype=dtype))


def bits(a) -> np.ndarray:
    """float32 values as int32 bit patterns, for bit-exact comparison."""
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32)).view(np.int32)


def near_ties(rng: np.random.Generator, n: int, scale: float, lo: int, hi: int) -> np.ndarray:
    """Random float32 values at, and one ulp around, (k + 0.5) * scale, plus clamp limits."""
    k = rng.integers(lo - 3, hi + 3, size=n)
    x = ((k + 0.5) * F32(scale)).astype(F32)
    pick = rng.integers(0, 4, size=n)
    x = np.where(pick == 1, np.nextafter(x, F32(np.inf)), x)
    x = np.where(pick == 2, np.nextafter(x, F32(-np.inf)), x)
    x = np.where(pick == 3, (rng.normal(size=n) * (hi - lo) * scale / 4).astype(F32), x)
    return x.astype(F32)


def near_ties_channel(
    rng: np.random.Generator, shape, axis: int, scales, lo: int, hi: int
) -> np.ndarray:
    """Like :func:`near_ties` with a different scale per slice along ``axis``."""
    bshape = [1] * len(shape)
    bshape[axis] = len(scales)
    unit = near_ties(rng, int(np.prod(shape)), 1.0, lo, hi).reshape(shape)
    k = np.floor(unit.astype(np.float64))
    frac = unit.astype(np.float64) - k
    x = ((k + 0.5) * F32(scales).reshape(bshape)).astype(F32)
    x = np.where(
        frac > 0.5,
        np.nextafter(x, F32(np.inf)),
        np.where(frac < 0.5, np.nextafter(x, F32(-np.inf)), x),
    )
    return x.astype(F32)


# ------------------------------------------------------------------ literal examples (no torch)


def test_worked_example_per_tensor():
    q = quantize_per_tensor(t([-1.0, 0.0, 1.0, 2.0]), 0.1, 10, "uint8")
    assert q.dtype == paddle.uint8
    assert q.numpy().tolist() == [0, 10, 20, 30]
    sat = quantize_per_tensor(t([100.0]), 0.1, 10, "uint8")
    assert sat.numpy().tolist() == [255]
    assert dequantize(sat, 0.1, 10).numpy().tolist() == [24.5]
    assert dequantize(q, 0.1, 10).numpy().tolist() == [-1.0, 0.0, 1.0, 2.0]


def test_worked_example_per_channel():
    q = quantize_per_channel(t([[-1.0, 0.0], [1.0, 2.0]]), [0.1, 0.01], [10, 0], 0, "uint8")
    assert q.numpy().tolist() == [[0, 10], [100, 200]]
    back = dequantize(q, [0.1, 0.01], [10, 0], axis=0).numpy()
    np.testing.assert_allclose(back, [[-1.0, 0.0], [1.0, 2.0]], rtol=1e-6)


@pytest.mark.parametrize(
    "dtype", ["int8", "uint8", "int32", paddle.int8, paddle.uint8, paddle.int32, np.int8]
)
def test_dtype_spellings(dtype):
    q = quantize_per_tensor(t([0.0, 0.3]), 0.1, 0, dtype)
    name = str(dtype).replace("paddle.", "").replace("<class 'numpy.", "").replace("'>", "")
    assert q.dtype == getattr(paddle, name)
    assert q.numpy().tolist() == [0, 3]


def test_round_half_to_even_and_clamp_limits():
    x = t([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 126.5, 127.5, 128.0, -128.5, -129.0])
    q = quantize_per_tensor(x, 1.0, 0, "int8").numpy().tolist()
    assert q == [0, 2, 2, 4, 0, -2, -2, 126, 127, 127, -128, -128]
    # with an odd zero point torch adds it before rounding: 0.5 + 3 = 3.5 -> 4, 1.5 + 3 -> 4
    assert quantize_per_tensor(t([0.5, 1.5]), 1.0, 3, "int8").numpy().tolist() == [4, 4]
    # fake quantize rounds first: round(0.5) + 3 = 3, round(1.5) + 3 = 5
    assert fake_quantize(t([0.5, 1.5]), 1.0, 3, -128, 127).numpy().tolist() == [0.0, 2.0]


def test_single_rounding_fma_cases():
    # x * (1/scale) + 200 lies within 2**-48 of a float32 midpoint; torch's fused
    # multiply-add rounds once (201, 201, 201, 200); two roundings would give 200 throughout.
    xs = [867109504.0, 773367936.0, 745401408.0, 813797696.0]
    scales = [1734192512.0, 1546712320.0, 1490780032.0, 1627570560.0]
    got = [quantize_per_tensor(t([x]), s, 200, "uint8").item() for x, s in zip(xs, scales)]
    assert got == [201, 201, 201, 200]


def test_narrow_bit_widths():
    x = t([-2.0, -0.26, 0.0, 0.24, 0.5, 3.0])
    assert quantize_per_tensor(x, 0.25, 0, "int8", quant_min=-8, quant_max=7).numpy().tolist() == [
        -8,
        -1,
        0,
        1,
        2,
        7,
    ]
    assert quantize_per_tensor(x, 0.25, 8, "uint8", quant_min=0, quant_max=15).numpy().tolist() == [
        0,
        7,
        8,
        9,
        10,
        15,
    ]
    np.testing.assert_array_equal(
        fake_quantize(x, 0.25, 0, -8, 7).numpy(), F32([-2.0, -0.25, 0.0, 0.25, 0.5, 1.75])
    )


def test_nan_and_inf_policy():
    x = t([NAN, INF, -INF, 1.0])
    for dtype, (lo, hi) in RANGES.items():
        zp = 3
        assert quantize_per_tensor(x, 0.1, zp, dtype).numpy().tolist() == [lo, hi, lo, 10 + zp]
        q = (
            quantize_per_channel(paddle.stack([x, x]), [0.1, 0.2], [zp, 0], 0, dtype)
            .numpy()
            .tolist()
        )
        assert q == [[lo, hi, lo, 13], [lo, hi, lo, 5]]
    fq = fake_quantize(x, 0.5, 2, -8, 7).numpy()
    np.testing.assert_array_equal(fq, F32([-5.0, 2.5, -5.0, 1.0]))
    fqc = fake_quantize(paddle.stack([x, x], axis=1), [0.5, 1.0], [2, 0], -8, 7, axis=1).numpy()
    np.testing.assert_array_equal(fqc, F32([[-5.0, -8.0], [2.5, 7.0], [-5.0, -8.0], [1.0, 1.0]]))


def test_input_kinds_and_shapes():
    x = np.array([[0.26, -0.31], [1.0, 2.0]], dtype=np.float64)
    q_np = quantize_per_tensor(x, 0.1, 0, "int8")
    q_pd = quantize_per_tensor(t(x, "float64"), 0.1, 0, "int8")
    q_32 = quantize_per_tensor(t(x), 0.1, 0, "int8")
    assert isinstance(q_np, paddle.Tensor)
    assert (
        q_np.numpy().tolist()
        == q_pd.numpy().tolist()
        == q_32.numpy().tolist()
        == [[3, -3], [10, 20]]
    )
    assert quantize_per_tensor(paddle.to_tensor(1.26), 0.1, 0, "int8").shape == []
    assert quantize_per_tensor(paddle.zeros([0, 3]), 0.1, 0, "int8").shape == [0, 3]
    assert quantize_per_channel(t(x), [0.1, 0.2], [0, 0], -1, "int8").numpy().tolist() == [
        [3, -2],
        [10, 10],
    ]
    # scale / zero point may be one-element tensors, e.g. from compute_qparams on tensors
    s, zp = compute_qparams(paddle.to_tensor([-1.0]), paddle.to_tensor([1.0]))
    assert quantize_per_tensor(t([1.0]), s, zp, "int8").item() == 127
    assert dequantize(np.array([2, -4], dtype=np.int8), 0.5, 0).numpy().tolist() == [1.0, -2.0]


def test_dequantize_int32_no_overflow():
    # torch computes q - zero_point in int32 and wraps around; this module does not
    out = dequantize(t([2**31 - 1], "int32"), 1.0, -1)
    assert out.numpy().tolist() == [2.0**31]


def test_no_gradient_graph():
    x = t([0.3, 0.7])
    x.stop_gradient = False
    assert fake_quantize(x, 0.1, 0, -128, 127).stop_gradient


# ------------------------------------------------------------------ compute_qparams (no torch)


def test_compute_qparams_literals():
    eps = float(np.finfo(np.float32).eps)
    s, zp = compute_qparams(-1.0, 0.5)
    assert (
        (s, zp) == (float(F32(1.0) / F32(127.5)), 0)
        and isinstance(s, float)
        and isinstance(zp, int)
    )
    assert compute_qparams(-1.0, 0.5, restrict_range=True) == (float(F32(1.0) / F32(127.0)), 0)
    assert compute_qparams(-1.0, 0.5, "uint8") == (float(F32(1.0) / F32(127.5)), 128)
    assert compute_qparams(-1.0, 0.5, "uint8", restrict_range=True) == (
        float(F32(1.0) / F32(127.0)),
        128,
    )
    assert compute_qparams(-1.0, 2.0, "uint8", symmetric=False) == (
        float(F32(3.0) / F32(255.0)),
        85,
    )
    assert compute_qparams(0.5, 2.0, "uint8", symmetric=False) == (float(F32(2.0) / F32(255.0)), 0)
    assert compute_qparams(-2.0, -0.5, "int8", symmetric=False) == (
        float(F32(2.0) / F32(255.0)),
        127,
    )
    assert compute_qparams(-1.0, 1.0, "int8", quant_min=-8, quant_max=7) == (
        float(F32(1.0) / F32(7.5)),
        0,
    )
    assert compute_qparams(0.0, 0.0) == (eps, 0)
    assert compute_qparams(0.0, 0.0, "uint8", symmetric=False) == (eps, 0)
    assert compute_qparams(0.0, 0.0, "int8", symmetric=False) == (eps, -128)


def test_compute_qparams_vectorized_kinds():
    mins, maxs = np.array([-1.0, 0.0, -3.0]), np.array([1.0, 0.0, 1.0])
    s, zp = compute_qparams(mins, maxs, "uint8", symmetric=False)
    assert s.dtype == np.float32 and zp.dtype == np.int64 and s.shape == (3,)
    for i in range(3):
        assert (float(s[i]), int(zp[i])) == compute_qparams(
            mins[i], maxs[i], "uint8", symmetric=False
        )
    sp, zpp = compute_qparams(
        paddle.to_tensor(mins), paddle.to_tensor(maxs), "uint8", symmetric=False
    )
    assert (
        isinstance(sp, paddle.Tensor) and sp.dtype == paddle.float32 and zpp.dtype == paddle.int64
    )
    np.testing.assert_array_equal(sp.numpy(), s)
    np.testing.assert_array_equal(zpp.numpy(), zp)
    # per-channel quantization with an all-zero channel works with the returned parameters
    w = t([[0.0, 0.0, 0.0], [0.5, -0.25, 1.0]])
    s, zp = compute_qparams(w.min(axis=1), w.max(axis=1), "int8", restrict_range=True)
    q = quantize_per_channel(w, s, zp, 0, "int8")
    assert q.numpy().tolist() == [[0, 0, 0], [64, -32, 127]]
    np.testing.assert_array_equal(dequantize(q, s, zp, axis=0).numpy()[0], [0.0, 0.0, 0.0])


# --------------------------------------------------------------------------- bad input (no torch)

X = t([[0.1, 0.2], [0.3, 0.4]])

BAD_CALLS = [
    # quantize_per_tensor: scale
    (lambda: quantize_per_tensor(X, 0.0, 0, "int8"), ValueError, "scale must"),
    (lambda: quantize_per_tensor(X, -0.1, 0, "int8"), ValueError, "scale must"),
    (lambda: quantize_per_tensor(X, NAN, 0, "int8"), ValueError, "scale must"),
    (lambda: quantize_per_tensor(X, INF, 0, "int8"), ValueError, "scale must"),
    (lambda: quantize_per_tensor(X, 1e-45, 0, "int8"), ValueError, "scale must"),
    (lambda: quantize_per_tensor(X, 1e39, 0, "int8"), ValueError, "scale must"),
    (lambda: quantize_per_tensor(X, "0.1", 0, "int8"), TypeError, "scale must"),
    (lambda: quantize_per_tensor(X, True, 0, "int8"), TypeError, "scale must"),
    (lambda: quantize_per_tensor(X, [0.1, 0.2], 0, "int8"), ValueError, "scale must"),
    # zero point
    (lambda: quantize_per_tensor(X, 0.1, 256, "uint8"), ValueError, "zero_point must"),
    (lambda: quantize_per_tensor(X, 0.1, -1, "uint8"), ValueError, "zero_point must"),
    (lambda: quantize_per_tensor(X, 0.1, 128, "int8"), ValueError, "zero_point must"),
    (lambda: quantize_per_tensor(X, 0.1, 2**31, "int32"), ValueError, "zero_point must"),
    (lambda: quantize_per_tensor(X, 0.1, 1.5, "int8"), TypeError, "zero_point must"),
    (
        lambda: quantize_per_tensor(X, 0.1, 9, "int8", quant_min=-8, quant_max=7),
        ValueError,
        "zero_point must",
    ),
    # x
    (lambda: quantize_per_tensor(t([1, 2], "int32"), 0.1, 0, "int8"), TypeError, "x must"),
    (lambda: quantize_per_tensor(t([1, 2], "float16"), 0.1, 0, "int8"), TypeError, "x must"),
    (lambda: quantize_per_tensor(np.array([1, 2]), 0.1, 0, "int8"), TypeError, "x must"),
    (lambda: quantize_per_tensor([0.1, 0.2], 0.1, 0, "int8"), TypeError, "x must"),
    (lambda: fake_quantize(t([1, 2], "float16"), 0.1, 0, 0, 255), TypeError, "x must"),
    # dtype
    (lambda: quantize_per_tensor(X, 0.1, 0, "int4"), ValueError, "dtype must"),
    (lambda: quantize_per_tensor(X, 0.1, 0, paddle.int16), ValueError, "dtype must"),
    (lambda: quantize_per_tensor(X, 0.1, 0, np.int64), ValueError, "dtype must"),
    (lambda: quantize_per_tensor(X, 0.1, 0, 8), TypeError, "dtype must"),
    (lambda: compute_qparams(-1.0, 1.0, "float32"), ValueError, "dtype must"),
    # quant range
    (
        lambda: quantize_per_tensor(X, 0.1, 0, "int8", quant_min=5, quant_max=3),
        ValueError,
        "quant_min must",
    ),
    (lambda: quantize_per_tensor(X, 0.1, 0, "int8", quant_min=-129), ValueError, "quant_min must"),
    (lambda: quantize_per_tensor(X, 0.1, 0, "uint8", quant_max=256), ValueError, "quant_max must"),
    (lambda: quantize_per_tensor(X, 0.1, 0, "int8", quant_min=-8.0), TypeError, "quant_min must"),
    (lambda: fake_quantize(X, 0.1, 0, 7, -8), ValueError, "quant_min must"),
    (lambda: fake_quantize(X, 0.1, 0, 0, 2**31), ValueError, "quant_max must"),
    (lambda: fake_quantize(X, 0.1, 16, 0, 15), ValueError, "zero_point must"),
    # per channel
    (lambda: quantize_per_channel(X, [0.1], [0, 0], 0, "int8"), ValueError, "scales must"),
    (
        lambda: quantize_per_channel(X, [0.1, 0.1, 0.1], [0, 0], 1, "int8"),
        ValueError,
        "scales must",
    ),
    (lambda: quantize_per_channel(X, [[0.1, 0.1]], [0, 0], 0, "int8"), ValueError, "scales must"),
    (lambda: quantize_per_channel(X, [0.1, 0.0], [0, 0], 0, "int8"), ValueError, "scales must"),
    (lambda: quantize_per_channel(X, [0.1, NAN], [0, 0], 0, "int8"), ValueError, "scales must"),
    (lambda: quantize_per_channel(X, ["a", "b"], [0, 0], 0, "int8"), TypeError, "scales must"),
    (lambda: quantize_per_channel(X, [0.1, 0.1], [0], 0, "int8"), ValueError, "zero_points must"),
    (
        lambda: quantize_per_channel(X, [0.1, 0.1], [0, 300], 0, "uint8"),
        ValueError,
        "zero_points must",
    ),
    (
        lambda: quantize_per_channel(X, [0.1, 0.1], [0.0, 1.0], 0, "int8"),
        TypeError,
        "zero_points must",
    ),
    (lambda: quantize_per_channel(X, [0.1, 0.1], [0, 0], 2, "int8"), ValueError, "axis must"),
    (lambda: quantize_per_channel(X, [0.1, 0.1], [0, 0], -3, "int8"), ValueError, "axis must"),
    (lambda: quantize_per_channel(X, [0.1, 0.1], [0, 0], 1.0, "int8"), TypeError, "axis must"),
    (
        lambda: quantize_per_channel(paddle.to_tensor(1.0), [0.1], [0], 0, "int8"),
        ValueError,
        "axis must",
    ),
    (
        lambda: quantize_per_channel(t([1, 2], "int8"), [0.1, 0.1], [0, 0], 0, "int8"),
        TypeError,
        "x must",
    ),
    (lambda: fake_quantize(X, [0.1], [0, 0], 0, 255, axis=0), ValueError, "scale must"),
    (lambda: fake_quantize(X, [0.1, 0.1], [0, 300], 0, 255, axis=0), ValueError, "zero_point must"),
    (lambda: fake_quantize(X, [0.1, 0.1], [0, 0], 0, 255, axis=5), ValueError, "axis must"),
    # dequantize
    (lambda: dequantize(X, 0.1, 0), TypeError, "q must"),
    (lambda: dequantize(t([1], "int64"), 0.1, 0), TypeError, "q must"),
    (lambda: dequantize(np.array([1], dtype=np.int16), 0.1, 0), TypeError, "q must"),
    (lambda: dequantize(t([1], "int8"), 0.0, 0), ValueError, "scale must"),
    (lambda: dequantize(t([1], "int8"), 0.1, 200), ValueError, "zero_point must"),
    (lambda: dequantize(t([[1, 2]], "uint8"), [0.1], [0, 0], axis=1), ValueError, "scale must"),
    (
        lambda: dequantize(t([[1, 2]], "uint8"), [0.1, 0.1], [0, -1], axis=1),
        ValueError,
        "zero_point must",
    ),
    (lambda: dequantize(t([[1, 2]], "uint8"), [0.1, 0.1], [0, 0], axis=2), ValueError, "axis must"),
    # compute_qparams
    (lambda: compute_qparams(1.0, -1.0), ValueError, "min_val must"),
    (
        lambda: compute_qparams(np.array([0.0, 2.0]), np.array([1.0, 1.0])),
        ValueError,
        "min_val must",
    ),
    (lambda: compute_qparams(NAN, 1.0), ValueError, "min_val must"),
    (lambda: compute_qparams(-1.0, INF), ValueError, "max_val must"),
    (lambda: compute_qparams(np.zeros(2), np.zeros(3)), ValueError, "min_val and max_val"),
    (lambda: compute_qparams("a", 1.0), TypeError, "min_val must"),
    (
        lambda: compute_qparams(-1.0, 1.0, restrict_range=True, quant_min=-127),
        ValueError,
        "restrict_range",
    ),
    (lambda: compute_qparams(-1.0, 1.0, quant_min=3, quant_max=3), ValueError, "quant_min must"),
    (lambda: compute_qparams(-1.0, 1.0, "uint8", quant_max=300), ValueError, "quant_max must"),
]


@pytest.mark.parametrize("call,exc,match", BAD_CALLS)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --------------------------------------------------------------------------- properties (no torch)

_DTYPES = st.sampled_from(["int8", "uint8", "int32"])


@st.composite
def _case(draw):
    dtype = draw(_DTYPES)
    lo, hi = RANGES[dtype]
    if dtype == "int32":
        lo, hi = -(2**20), 2**20
    qmin = draw(st.integers(lo, hi - 1))
    qmax = draw(st.integers(qmin + 1, min(hi, qmin + 2**16)))
    if dtype != "int32" and draw(st.booleans()):
        qmin, qmax = RANGES[dtype]
    zp = draw(st.integers(qmin, qmax))
    scale = float(F32(draw(st.floats(1e-4, 1e3))))
    fractions = draw(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=32))
    x_lo, x_hi = (qmin - zp) * scale, (qmax - zp) * scale
    x = np.clip(F32(x_lo + (x_hi - x_lo) * np.asarray(fractions)), F32(x_lo), F32(x_hi)).astype(F32)
    return dtype, qmin, qmax, zp, scale, x


@settings(max_examples=150, deadline=None)
@given(_case())
def test_roundtrip_error_at_most_half_a_step(case):
    dtype, qmin, qmax, zp, scale, x = case
    q = quantize_per_tensor(t(x), scale, zp, dtype, quant_min=qmin, quant_max=qmax)
    back = dequantize(q, scale, zp).numpy().astype(np.float64)
    # float32 rounding of x * (1/scale), of the zero-point addition (torch adds it in
    # float32 before rounding, so a large zero point costs precision) and of the output
    tol = 1e-6 * (np.abs(x) + scale * (abs(zp) + 1))
    assert np.all(np.abs(back - x) <= scale / 2 + tol)
    qn = q.numpy().astype(np.int64)
    assert qn.min() >= qmin and qn.max() <= qmax
    order = np.argsort(x, kind="stable")
    assert np.all(np.diff(qn[order]) >= 0)  # monotone
    fq = fake_quantize(t(x), scale, zp, qmin, qmax).numpy().astype(np.float64)
    assert np.all(np.abs(fq - x) <= scale / 2 + tol)
    assert np.all(np.abs(fq - back) <= scale + 2 * tol)  # tie conventions differ by <= 1 step


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=32),
    st.floats(1e-3, 10.0),
    st.sampled_from([(-128, 127), (-127, 127), (-8, 7), (-(2**15), 2**15 - 1)]),
)
def test_fake_quantize_equals_dequantize_quantize_for_zero_zp(values, scale, qrange):
    x = t(values)
    scale = float(F32(scale))  # per-channel dequantize keeps float64 scales, like torch
    qmin, qmax = qrange
    dtype = "int8" if qmin >= -128 else "int32"
    dq = dequantize(quantize_per_tensor(x, scale, 0, dtype, qmin, qmax), scale, 0)
    assert np.array_equal(bits(fake_quantize(x, scale, 0, qmin, qmax)), bits(dq))
    xc = x.reshape([-1, 1])
    dqc = dequantize(
        quantize_per_channel(xc, [scale], [0], 1, dtype, qmin, qmax), [scale], [0], axis=1
    )
    assert np.array_equal(bits(fake_quantize(xc, [scale], [0], qmin, qmax, axis=1)), bits(dqc))
    assert np.array_equal(bits(dqc).ravel(), bits(dq))


# --------------------------------------------------------------------------- torch parity


def _torch():
    return pytest.importorskip("torch")


def _tq_dtype(torch, dtype):
    return {"int8": torch.qint8, "uint8": torch.quint8, "int32": torch.qint32}[dtype]


def _random_zp(rng, dtype):
    lo, hi = RANGES[dtype]
    if dtype == "int32":
        lo, hi = -1000, 1000
    return int(rng.integers(lo, hi + 1))


SHAPES = [(1,), (7,), (3, 5), (2, 3, 4), (2, 3, 4, 5), (513,)]


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int32"])
def test_quantize_per_tensor_matches_torch(dtype):
    torch = _torch()
    rng = np.random.default_rng(1)
    lo, hi = RANGES[dtype] if dtype != "int32" else (-300, 300)
    for i in range(40):
        scale = float(10 ** rng.uniform(-4, 1))
        zp = _random_zp(rng, dtype)
        shape = SHAPES[i % len(SHAPES)]
        x = near_ties(rng, int(np.prod(shape)), scale, lo - zp, hi - zp).reshape(shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = torch.quantize_per_tensor(
                torch.from_numpy(x), scale, zp, _tq_dtype(torch, dtype)
            ).int_repr()
        got = quantize_per_tensor(t(x), scale, zp, dtype).numpy()
        np.testing.assert_array_equal(got, expected.numpy(), err_msg=f"scale={scale!r} zp={zp}")


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int32"])
def test_quantize_per_channel_matches_torch(dtype):
    torch = _torch()
    rng = np.random.default_rng(2)
    lo, hi = RANGES[dtype] if dtype != "int32" else (-300, 300)
    for i in range(30):
        shape = SHAPES[1:][i % (len(SHAPES) - 1)]
        axis = int(rng.integers(-len(shape), len(shape)))
        n = shape[axis]
        scales = 10 ** rng.uniform(-4, 1, size=n)
        zps = np.array([_random_zp(rng, dtype) for _ in range(n)], dtype=np.int64)
        x = near_ties_channel(rng, shape, axis, scales, lo - 255, hi + 255)
        x = np.moveaxis(x, axis, 0).copy()
        x[0] = 0.0  # an all-zero channel
        x = np.moveaxis(x, 0, axis).copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = torch.quantize_per_channel(
                torch.from_numpy(x),
                torch.from_numpy(scales),
                torch.from_numpy(zps),
                axis % len(shape),
                _tq_dtype(torch, dtype),
            ).int_repr()
        got = quantize_per_channel(t(x), scales, zps, axis, dtype).numpy()
        np.testing.assert_array_equal(got, expected.numpy())


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int32"])
def test_dequantize_matches_torch(dtype):
    torch = _torch()
    rng = np.random.default_rng(3)
    lo, hi = RANGES[dtype]
    if dtype == "int32":
        lo, hi = lo + 1001, hi - 1001  # torch wraps q - zp around in int32
    for i in range(20):
        shape = SHAPES[1:][i % (len(SHAPES) - 1)]
        q = rng.integers(lo, hi + 1, size=shape).astype(dtype)
        scale = float(10 ** rng.uniform(-4, 1))
        zp = _random_zp(rng, dtype)
        tq = torch._make_per_tensor_quantized_tensor(torch.from_numpy(q), scale, zp)
        assert np.array_equal(bits(dequantize(t(q, dtype), scale, zp)), bits(torch.dequantize(tq)))
        axis = int(rng.integers(0, len(shape)))
        n = shape[axis]
        scales = 10 ** rng.uniform(-4, 1, size=n)
        zps = np.array([_random_zp(rng, dtype) for _ in range(n)], dtype=np.int64)
        tq = torch._make_per_channel_quantized_tensor(
            torch.from_numpy(q), torch.from_numpy(scales), torch.from_numpy(zps), axis
        )
        got = dequantize(q, scales, zps, axis=axis)
        assert np.array_equal(bits(got), bits(torch.dequantize(tq)))


QRANGES = [(0, 255), (-128, 127), (-127, 127), (-8, 7), (0, 15), (-(2**15), 2**15 - 1)]


@pytest.mark.parametrize("qmin,qmax", QRANGES)
def test_fake_quantize_matches_torch(qmin, qmax):
    torch = _torch()
    rng = np.random.default_rng(4 + qmax)
    for i in range(12):
        shape = SHAPES[1:][i % (len(SHAPES) - 1)]
        scale = float(F32(10 ** rng.uniform(-4, 1)))
        zp = int(rng.integers(qmin, qmax + 1))
        x = near_ties(rng, int(np.prod(shape)), scale, qmin - zp, qmax - zp).reshape(shape)
        expected = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), scale, zp, qmin, qmax)
        assert np.array_equal(bits(fake_quantize(t(x), scale, zp, qmin, qmax)), bits(expected))
        axis = int(rng.integers(0, len(shape)))
        n = shape[axis]
        scales = (10 ** rng.uniform(-4, 1, size=n)).astype(F32)
        zps = rng.integers(qmin, qmax + 1, size=n).astype(np.int32)
        x = near_ties_channel(rng, shape, axis, scales, qmin - qmax, qmax - qmin)
        expected = torch.fake_quantize_per_channel_affine(
            torch.from_numpy(x), torch.from_numpy(scales), torch.from_numpy(zps), axis, qmin, qmax
        )
        got = fake_quantize(x, scales, zps, qmin, qmax, axis=axis)
        assert np.array_equal(bits(got), bits(expected))


def test_special_values_match_torch_where_torch_is_consistent():
    torch = _torch()
    x = np.array([INF, -INF, 1e30, -1e30, 3e38, 2.0**31, 0.05, 0.15], dtype=F32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dtype in RANGES:
            tx = torch.from_numpy(x)
            exp = torch.quantize_per_tensor(tx, 0.1, 3, _tq_dtype(torch, dtype)).int_repr().numpy()
            np.testing.assert_array_equal(quantize_per_tensor(x, 0.1, 3, dtype).numpy(), exp)
            scales, zps = torch.tensor([0.1, 0.3], dtype=torch.float64), torch.tensor([3, 0])
            exp = torch.quantize_per_channel(
                tx[None].repeat(2, 1), scales, zps, 0, _tq_dtype(torch, dtype)
            )
            got = quantize_per_channel(np.stack([x, x]), [0.1, 0.3], [3, 0], 0, dtype).numpy()
            np.testing.assert_array_equal(got, exp.int_repr().numpy())
    # torch's fake_quantize_per_tensor_affine maps NaN to quant_min and saturates inf, as here
    xn = np.array([NAN, INF, -INF, 1e30, -1e30, 0.25], dtype=F32)
    exp = torch.fake_quantize_per_tensor_affine(torch.from_numpy(xn), 0.1, 3, -8, 7).numpy()
    assert np.array_equal(bits(fake_quantize(xn, 0.1, 3, -8, 7)), bits(exp))


def _observer_qparams(torch, observer_cls, tdtype, qscheme, mins, maxs, qrange):
    kwargs = {} if qrange is None else {"quant_min": qrange[0], "quant_max": qrange[1]}
    if observer_cls.__name__.startswith("PerChannel"):
        obs = observer_cls(ch_axis=0, dtype=tdtype, qscheme=qscheme, **kwargs)
        obs(torch.from_numpy(np.stack([mins, maxs], axis=1)))
    else:
        obs = observer_cls(dtype=tdtype, qscheme=qscheme, **kwargs)
        obs(torch.from_numpy(np.array([mins, maxs], dtype=F32)))
    scale, zp = obs.calculate_qparams()
    return scale.numpy().astype(F32), zp.numpy().astype(np.int64)


QPARAM_CASES = [
    ("int8", None),
    ("uint8", None),
    ("int32", None),
    ("int8", (-127, 127)),
    ("int8", (-8, 7)),
    ("uint8", (0, 15)),
    ("uint8", (0, 255)),
    ("int8", (-64, 63)),
]


@pytest.mark.parametrize("dtype,qrange", QPARAM_CASES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_compute_qparams_matches_torch_observers(dtype, qrange, symmetric):
    torch = _torch()
    from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver

    rng = np.random.default_rng(5)
    tdtype = _tq_dtype(torch, dtype)
    bound = (
        100.0 if dtype == "int32" else 1e3
    )  # torch's int32 affine zero point overflows beyond that
    kwargs = {} if qrange is None else {"quant_min": qrange[0], "quant_max": qrange[1]}
    # per tensor: random ranges, one-sided ranges, tiny and zero ranges
    pairs = [(-(10 ** rng.uniform(-6, 3)), 10 ** rng.uniform(-6, 3)) for _ in range(20)]
    pairs += [(0.0, 0.0), (0.5, 2.0), (-3.0, -1.0), (-1e-9, 1e-9), (-1.0, 0.0), (1e-30, 1e-30)]
    qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    for lo_v, hi_v in pairs:
        lo_v, hi_v = float(F32(max(lo_v, -bound))), float(F32(min(hi_v, bound)))
        exp_s, exp_zp = _observer_qparams(
            torch, MinMaxObserver, tdtype, qscheme, lo_v, hi_v, qrange
        )
        s, zp = compute_qparams(lo_v, hi_v, dtype, symmetric=symmetric, **kwargs)
        assert (s, zp) == (float(exp_s[0]), int(exp_zp[0])), (lo_v, hi_v)
    # per channel, vectorized, including an all-zero channel
    mins = -(10 ** rng.uniform(-6, 2, size=16)).astype(F32)
    maxs = (10 ** rng.uniform(-6, 2, size=16)).astype(F32)
    mins[3] = maxs[3] = 0.0
    mins[5], maxs[5] = 0.25, 3.0
    mins[7], maxs[7] = -2.0, -0.5
    qscheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
    exp_s, exp_zp = _observer_qparams(
        torch, PerChannelMinMaxObserver, tdtype, qscheme, mins, maxs, qrange
    )
    s, zp = compute_qparams(
        paddle.to_tensor(mins), paddle.to_tensor(maxs), dtype, symmetric=symmetric, **kwargs
    )
    assert np.array_equal(bits(s.numpy()), bits(exp_s))
    np.testing.assert_array_equal(zp.numpy(), exp_zp)


def test_restrict_range_matches_torch_quant_min_minus_127():
    torch = _torch()
    from torch.ao.quantization import MinMaxObserver

    for lo_v, hi_v in [(-1.0, 0.5), (-0.3, 2.7), (0.0, 0.0)]:
        obs = MinMaxObserver(
            dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-127, quant_max=127
        )
        obs(torch.tensor([lo_v, hi_v]))
        exp_s, exp_zp = obs.calculate_qparams()
        assert compute_qparams(lo_v, hi_v, "int8", restrict_range=True) == (
            float(exp_s[0]),
            int(exp_zp[0]),
        )
