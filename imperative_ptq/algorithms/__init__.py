"""Algorithms that change a model's weights or biases to keep accuracy under quantization.

One algorithm per module: cross-layer equalization (data-free, before calibration), SmoothQuant
(on the first calibration batches, before any is observed), AdaRound
and bias correction (on the calibration data, in ``convert``). ``capture`` records what one
layer reads and writes, for the last two; ``smooth_groups`` finds the layers SmoothQuant
smooths and folds its scales into them.
"""

from .adaround import AdaRound, AdaRoundResult, adaround
from .bias_correction import correct_bias, correct_bias_analytically
from .cross_layer_equalization import ChannelClip, EqualizedPair, equalize, find_chains
from .smooth_quant import SmoothQuant, SmoothedGroup, smooth_quant

__all__ = [
    "AdaRound", "AdaRoundResult", "ChannelClip", "EqualizedPair", "SmoothQuant", "SmoothedGroup", "adaround",
    "correct_bias", "correct_bias_analytically", "equalize", "find_chains", "smooth_quant",
]
