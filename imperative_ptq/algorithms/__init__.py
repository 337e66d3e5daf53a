"""Algorithms that change a model's weights or biases to keep accuracy under quantization.

One algorithm per module: cross-layer equalization (data-free, before calibration).
"""

from .cross_layer_equalization import EqualizedPair, equalize, find_chains

__all__ = ["EqualizedPair", "equalize", "find_chains"]
