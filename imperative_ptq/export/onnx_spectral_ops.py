"""ONNX translations of Paddle's signal ops: framing and discrete Fourier transforms.

Audio front ends inside a model (``paddle.audio.features``' spectrograms, ``paddle.signal.stft``)
trace to ``frame`` and ``fft_r2c`` ops and complex tensors. ONNX tensors are real, so a complex
program variable is held as two float tensors, its real and imaginary parts
(:attr:`SpectralOpConverters.complex_parts`); the ops that read complex values
(:data:`COMPLEX_OPS`) are translated part by part, and any other reader of a complex variable
is refused by name.

A transform along an axis of ``n`` points is two ``MatMul`` by constant ``[n, k]`` cosine and
sine tables (``k = n // 2 + 1`` for a one-sided real transform): any opset (ONNX's ``DFT``
needs 17), and ONNX Runtime's GEMM on the batch of frames. Scaling follows Paddle's (numpy's)
``normalization``: ``"backward"`` scales the inverse transform by ``1 / n``, ``"forward"`` the
forward one, ``"ortho"`` both by ``1 / sqrt(n)``. :class:`SpectralOpConverters` is a mixin of
the export's converter and uses its graph helpers (``_node``, ``_const``, ``_in``, ``_out``,
``_bind``, ``_shape``).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

__all__ = ["COMPLEX_OPS", "SpectralOpConverters"]

#: Ops translated on complex inputs, part by part (and ``cast`` to complex).
COMPLEX_OPS = frozenset({
    "abs", "real", "imag", "transpose2", "squeeze2", "unsqueeze2", "fft_c2c", "fft_c2r", "cast",
})

#: Paddle's ``VarType`` values of complex64 and complex128.
_COMPLEX_TYPES = (23, 24)


def _casts_to_complex(op) -> bool:
    return op.type == "cast" and int(op.attr("out_dtype")) in _COMPLEX_TYPES


class SpectralOpConverters:
    """Converters of ``frame`` and the ``fft_*`` ops (a mixin of the ONNX export's converter)."""

    #: complex program variable -> its (real, imaginary) ONNX tensors.
    complex_parts: dict[str, tuple[str, str]]

    def spectral_dispatch(self) -> dict[str, Callable[[Any], None]]:
        """Op type -> converter, for the ops this mixin translates on real inputs."""
        return {"frame": self._frame, "fft_r2c": self._fft_r2c}

    def handles_complex(self, op) -> bool:
        """Whether ``op`` reads a complex variable (held as two parts) or casts to one."""
        parts = getattr(self, "complex_parts", {})
        return _casts_to_complex(op) or any(
            name in parts for slot in op.input_names for name in op.input(slot)
        )

    def complex_converter(self, op) -> Callable[[Any], None]:
        """The converter of ``op``, which reads a complex variable or casts to one.

        Raises:
            NotImplementedError: ``op`` is not one of :data:`COMPLEX_OPS`.
        """
        if _casts_to_complex(op):
            return self._to_complex
        converters = {
            "abs": self._complex_abs, "real": self._complex_part, "imag": self._complex_part,
            "transpose2": self._complex_layout, "squeeze2": self._complex_layout,
            "unsqueeze2": self._complex_layout, "fft_c2c": self._fft_c2c, "fft_c2r": self._fft_c2r,
        }
        if op.type not in converters:
            raise NotImplementedError(
                f"{op.type} of a complex tensor is not exported (translated on complex tensors: "
                f"{', '.join(sorted(COMPLEX_OPS))})"
            )
        return converters[op.type]

    # ------------------------------------------------------------------------------ framing
    def _frame(self, op) -> None:
        """frame along the last axis: ``[..., T]`` -> ``[..., L, F]`` with ``F = 1 + (T - L)
        // hop`` frames, ``out[..., l, f] = x[..., f * hop + l]``: one ``Gather`` of an index
        table built from ``T`` at run time."""
        x, out = self._in(op), self._out(op)
        rank = len(self._shape(op.input("X")[0]))
        if int(op.attr("axis")) not in (-1, rank - 1):
            raise NotImplementedError("frame is exported along the last axis only")
        length, hop = int(op.attr("frame_length")), int(op.attr("hop_length"))
        last = self._node("Gather", [self._node("Shape", [x], out + ".shape"), self._const("last", np.array(-1, np.int64))], out + ".length")
        frames = self._node("Add", [
            self._node("Div", [self._node("Sub", [last, self._const("frame_length", np.array(length, np.int64))], out + ".rest"),
                               self._const("hop", np.array(hop, np.int64))], out + ".hops"),
            self._const("one", np.array(1, np.int64)),
        ], out + ".frames")
        starts = self._node("Mul", [
            self._node("Range", [self._const("zero", np.array(0, np.int64)), frames, self._const("step", np.array(1, np.int64))], out + ".range"),
            self._const("hop", np.array(hop, np.int64)),
        ], out + ".starts")
        offsets = self._const("offsets", np.arange(length, dtype=np.int64).reshape(length, 1))
        self._bind(out, self._node("Gather", [x, self._node("Add", [offsets, starts], out + ".index")], out, axis=rank - 1))

    # --------------------------------------------------------------------------- transforms
    def _fft_r2c(self, op) -> None:
        """fft_r2c: the real transform along the last of ``axes`` (one-sided when
        ``onesided``), then complex transforms along the others."""
        axes, rank = self._axes(op)
        x, out = self._in(op), self._out(op)
        forward, normalization = bool(op.attr("forward")), str(op.attr("normalization"))
        n = self._axis_size(op.input("X")[0], axes[-1])
        kept = n // 2 + 1 if op.attr("onesided") else n
        cos, sin = _tables(n, kept, forward, _scale(n, normalization, forward))
        moved = self._to_last(x, axes[-1], rank, out + ".in")
        re = self._node("MatMul", [moved, self._const("cos", cos)], out + ".re")
        im = self._node("MatMul", [moved, self._const("sin", sin)], out + ".im")
        parts = (self._from_last(re, axes[-1], rank, out + ".re_out"), self._from_last(im, axes[-1], rank, out + ".im_out"))
        for axis in reversed(axes[:-1]):
            n = self._axis_size(op.input("X")[0], axis)
            parts = self._complex_transform(parts, axis, rank, n, forward, normalization, out)
        self.complex_parts[out] = parts

    def _fft_c2c(self, op) -> None:
        parts, out = self.complex_parts[op.input("X")[0]], self._out(op)
        forward, normalization = bool(op.attr("forward")), str(op.attr("normalization"))
        axes, rank = self._axes(op)
        for axis in reversed(axes):
            n = self._axis_size(op.input("X")[0], axis)
            parts = self._complex_transform(parts, axis, rank, n, forward, normalization, out)
        self.complex_parts[out] = parts

    def _fft_c2r(self, op) -> None:
        """fft_c2r: complex inverse transforms along all but the last of ``axes``, then the
        real one along it from the one-sided half: ``x[t] = sum_k w_k (Re X_k cos - Im X_k
        sin)(2 pi k t / n)``, ``w_k`` 2 but for the first and (even ``n``) last term."""
        axes, rank = self._axes(op)
        parts, out = self.complex_parts[op.input("X")[0]], self._out(op)
        forward, normalization = bool(op.attr("forward")), str(op.attr("normalization"))
        for axis in reversed(axes[:-1]):
            n = self._axis_size(op.input("X")[0], axis)
            parts = self._complex_transform(parts, axis, rank, n, forward, normalization, out)
        half = self._axis_size(op.input("X")[0], axes[-1])
        n = int(op.attr("last_dim_size")) or 2 * (half - 1)
        k, t = np.arange(half)[:, None], np.arange(n)[None, :]
        weights = np.where((k == 0) | ((n % 2 == 0) & (k == n // 2)), 1.0, 2.0) * _scale(n, normalization, forward)
        unit_cos, unit_sin = _unit_circle((k * t) % n, n)
        unit_sin = -unit_sin if forward else unit_sin
        cos = self._const("cos", (weights * unit_cos).astype(np.float32))
        sin = self._const("sin", (-weights * unit_sin).astype(np.float32))
        re = self._node("MatMul", [self._to_last(parts[0], axes[-1], rank, out + ".re_in"), cos], out + ".re")
        im = self._node("MatMul", [self._to_last(parts[1], axes[-1], rank, out + ".im_in"), sin], out + ".im")
        self._bind(out, self._from_last(self._node("Add", [re, im], out + ".sum"), axes[-1], rank, out))

    def _complex_transform(
        self, parts: tuple[str, str], axis: int, rank: int, n: int, forward: bool, normalization: str,
        stem: str,
    ) -> tuple[str, str]:
        """The complex transform of ``parts`` (of ``rank`` axes) along ``axis`` (``n``
        points): ``(a + ib)(c + is) = (ac - bs) + i(as + bc)`` with the cosine and sine
        tables."""
        cos, sin = _tables(n, n, forward, _scale(n, normalization, forward))
        a, b = (self._to_last(part, axis, rank, f"{stem}.{name}_in") for part, name in zip(parts, ("re", "im")))
        c, s = self._const("cos", cos), self._const("sin", sin)
        re = self._node("Sub", [self._node("MatMul", [a, c], stem + ".ac"), self._node("MatMul", [b, s], stem + ".bs")], stem + ".re")
        im = self._node("Add", [self._node("MatMul", [a, s], stem + ".as"), self._node("MatMul", [b, c], stem + ".bc")], stem + ".im")
        return self._from_last(re, axis, rank, stem + ".re_out"), self._from_last(im, axis, rank, stem + ".im_out")

    # ------------------------------------------------------------------------ complex reads
    def _to_complex(self, op) -> None:
        """A cast of a real tensor to complex: it, and zeros of its shape."""
        if op.input("X")[0] in self.complex_parts:
            self.complex_parts[self._out(op)] = self.complex_parts[op.input("X")[0]]
            return
        x, out = self._in(op), self._out(op)
        real = self._node("Cast", [x], out + ".re", to=1)  # float32
        zeros = self._node("Mul", [real, self._const("zero", np.array(0.0, np.float32))], out + ".im")
        self.complex_parts[out] = (real, zeros)

    def _complex_abs(self, op) -> None:
        re, im = self.complex_parts[op.input("X")[0]]
        out = self._out(op)
        squares = self._node("Add", [self._node("Mul", [re, re], out + ".re2"), self._node("Mul", [im, im], out + ".im2")], out + ".norm2")
        self._bind(out, self._node("Sqrt", [squares], out))

    def _complex_part(self, op) -> None:
        re, im = self.complex_parts[op.input("X")[0]]
        out = self._out(op)
        self._bind(out, self._node("Identity", [re if op.type == "real" else im], out))

    def _complex_layout(self, op) -> None:
        """transpose2 / squeeze2 / unsqueeze2 of a complex variable: the same op on each part."""
        parts = self.complex_parts[op.input("X")[0]]
        out = self._out(op)
        if op.type == "transpose2":
            moved = [self._node("Transpose", [part], out, perm=[int(a) for a in op.attr("axis")]) for part in parts]
        else:
            axes = self._const("axes", np.array([int(a) for a in op.attr("axes")], np.int64))
            kind = "Squeeze" if op.type == "squeeze2" else "Unsqueeze"
            moved = [self._node(kind, [part, axes], out) for part in parts]
        self.complex_parts[out] = (moved[0], moved[1])

    # ------------------------------------------------------------------------------ helpers
    def _axes(self, op) -> tuple[list[int], int]:
        """``op``'s transform axes (non-negative) and the rank of its input."""
        rank = len(self._shape(op.input("X")[0]))
        return [int(a) % rank for a in op.attr("axes")], rank

    def _axis_size(self, name: str, axis: int) -> int:
        size = self._shape(name)[axis]
        if size < 0:
            raise NotImplementedError(f"a Fourier transform along an axis of unknown size ({name!r}, axis {axis})")
        return size

    def _to_last(self, tensor: str, axis: int, rank: int, stem: str) -> str:
        """``tensor`` (of ``rank`` axes) with ``axis`` moved last (itself when it is last)."""
        if axis == rank - 1:
            return tensor
        perm = [a for a in range(rank) if a != axis] + [axis]
        return self._node("Transpose", [tensor], stem, perm=perm)

    def _from_last(self, tensor: str, axis: int, rank: int, stem: str) -> str:
        """The inverse of :meth:`_to_last`."""
        if axis == rank - 1:
            return tensor
        perm = list(range(rank - 1))
        perm.insert(axis, rank - 1)
        return self._node("Transpose", [tensor], stem, perm=perm)


def _scale(n: int, normalization: str, forward: bool) -> float:
    """The factor of a transform of ``n`` points (numpy's ``norm``)."""
    if normalization not in ("forward", "backward", "ortho"):
        raise NotImplementedError(f"Fourier transform normalization {normalization!r} is not exported")
    if normalization == "ortho":
        return 1.0 / np.sqrt(n)
    return 1.0 / n if (normalization == "forward") == forward else 1.0


def _tables(n: int, kept: int, forward: bool, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """``[n, kept]`` tables: ``X_k = sum_t x_t (cos + i sin)(-+2 pi k t / n)`` as ``x @ cos +
    i x @ sin`` (minus in the exponent for a forward transform), times ``scale``."""
    t, k = np.arange(n)[:, None], np.arange(kept)[None, :]
    cos, sin = _unit_circle((t * k) % n, n)
    return (scale * cos).astype(np.float32), (scale * (-sin if forward else sin)).astype(np.float32)


def _unit_circle(steps: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``cos`` and ``sin`` of ``2 pi steps / n``, exactly 0 and +-1 at the quarter turns: the
    imaginary part of a real signal's DC and Nyquist bins is then exactly 0, as Paddle's FFT
    gives it (``sin(pi)`` in floating point is 1.2e-16, whose sign flipped the phase
    ``atan2(imag, real)`` of Nyquist bins with a negative real part by 2 pi)."""
    angle = 2 * np.pi * steps / n
    cos, sin = np.cos(angle), np.sin(angle)
    quarter = (4 * steps) % n == 0
    turns = (4 * steps) // n % 4  # 0, 1, 2, 3 quarter turns where ``quarter``
    cos = np.where(quarter, np.choose(turns % 4, [1.0, 0.0, -1.0, 0.0]), cos)
    sin = np.where(quarter, np.choose(turns % 4, [0.0, 1.0, 0.0, -1.0]), sin)
    return cos, sin
