"""Fingerprints of tensors: recognizing an input that is the same in every forward.

Calibration fingerprints what some layers read (a matmul operand, a weighted layer's input) to
find constants: tensors computed from parameters only, which Paddle Inference folds into fp32
constants at load time (:mod:`imperative_ptq.session`). The simulation after ``convert``
recognizes such an input again by its fingerprint (:class:`imperative_ptq.quant_layers.QuantizedLayer`).
"""

from __future__ import annotations

import functools

import numpy as np
import paddle

__all__ = ["Fingerprint", "fingerprint"]

#: A tensor's shape and a weighted sum of a spread sample of its values.
Fingerprint = tuple[tuple[int, ...], float]

#: Values of a tensor summed into its fingerprint.
_FINGERPRINT_VALUES = 256

#: Step between sampled positions, modulo the tensor's size: a prime (Knuth's multiplicative
#: hash constant), so the positions fall on every row and column of any shape. A stride of
#: ``size / 256`` had fallen on one token of every sequence (MNIST rows as tokens: ``size /
#: 256 = 28 * 16``), whose first token is blank in every image, and took a changing attention
#: operand for a constant.
_FINGERPRINT_STEP = 2654435761


@functools.lru_cache(maxsize=64)
def _sample_positions(size: int) -> tuple[paddle.Tensor, np.ndarray]:
    """The positions of a tensor of ``size`` values that its fingerprint sums, and their
    weights ``1, 2, ...``: a weighted sum, since a plain one is the same for every batch of a
    softmax output (each row sums to 1) and took attention weights for a constant."""
    count = min(size, _FINGERPRINT_VALUES)
    positions = paddle.to_tensor(np.arange(count, dtype=np.int64) * _FINGERPRINT_STEP % size)
    return positions, np.arange(1, count + 1, dtype=np.float32)


def fingerprint(value: paddle.Tensor) -> Fingerprint:
    """``value``'s shape and the weighted sum of 256 values spread over the whole tensor: a
    constant keeps them, a batch of other inputs changes them (a shared first token would not
    change a prefix)."""
    with paddle.no_grad():
        flat = paddle.flatten(value)
        if flat.dtype == paddle.float16 and flat.place.is_cpu_place():
            # (Paddle 3.3.1 has no float16 gather on the CPU: a half-precision model reached
            # this error before its own layers reported theirs.)
            flat = flat.astype("float32")
        positions, weights = _sample_positions(int(flat.shape[0]))
        sample = paddle.gather(flat, positions).astype("float32").numpy()
    # In numpy: a paddle.multiply here would be taken for the calling layer's own (a
    # functional multiply is calibrated where it is called, functional_ops.py).
    if not np.isfinite(sample).all():
        # Large finite stand-ins, summed in float64: a NaN sum differs from itself, which
        # took a repeated batch holding a NaN for a changing model input (and numpy warned
        # "invalid value encountered in dot"). (Finite samples keep the float32 sum that
        # calibration tables store.)
        finite = np.nan_to_num(sample.astype(np.float64), nan=3e38, posinf=2e38, neginf=-2e38)
        return tuple(value.shape), float(np.dot(finite, weights))
    return tuple(value.shape), float(np.dot(sample, weights))
