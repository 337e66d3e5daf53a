"""Algorithms that change a model's weights or biases to keep accuracy under quantization.

One algorithm per module: cross-layer equalization (data-free, before calibration) and bias
correction (on the calibration data, in ``convert``). ``capture`` records what one layer reads
and writes, for the latter.
"""

from .bias_correction import correct_bias
from .cross_layer_equalization import EqualizedPair, equalize, find_chains

__all__ = [
    "EqualizedPair", "correct_bias", "equalize", "find_chains",
]
