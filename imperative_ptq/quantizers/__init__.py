"""Calibration algorithms: each turns observed tensors into quantization thresholds."""

from .absmax import AbsmaxQuantizer
from .base import MIN_THRESHOLD, BaseQuantizer
from .hist import HistQuantizer
from .histogram import BaseHistQuantizer
from .kl import KLQuantizer
from .kl_tensorrt import TensorRTKLQuantizer
from .minmax import MinMaxQuantizer
from .moving_average_absmax import MovingAverageAbsmaxQuantizer
from .mse import MSEQuantizer
from .per_channel_absmax import PerChannelAbsmaxQuantizer
from .per_channel_minmax import PerChannelMinMaxQuantizer
from .qparams import QuantParams
from .sample import TensorSample

#: Every algorithm by the name the command line, the demos and the benchmarks use.
QUANTIZERS: dict[str, type[BaseQuantizer]] = {
    "abs_max": AbsmaxQuantizer,
    "moving_average": MovingAverageAbsmaxQuantizer,
    "min_max": MinMaxQuantizer,
    "hist": HistQuantizer,
    "kl": KLQuantizer,
    "kl_tensorrt": TensorRTKLQuantizer,
    "mse": MSEQuantizer,
    "per_channel": PerChannelAbsmaxQuantizer,
    "per_channel_min_max": PerChannelMinMaxQuantizer,
}
#: The algorithms for activations / for weights, as each class declares
#: (:attr:`BaseQuantizer.for_activations`, :attr:`BaseQuantizer.for_weights`).
ACTIVATION_QUANTIZERS: dict[str, type[BaseQuantizer]] = {
    name: cls for name, cls in QUANTIZERS.items() if cls.for_activations
}
WEIGHT_QUANTIZERS: dict[str, type[BaseQuantizer]] = {
    name: cls for name, cls in QUANTIZERS.items() if cls.for_weights
}
#: The same classes as the lists ``paddle.quantization`` names ``SUPPORT_ACT_QUANTIZERS`` and
#: ``SUPPORT_WT_QUANTIZERS`` (each of Paddle's classes is here under its name).
SUPPORT_ACT_QUANTIZERS: list[type[BaseQuantizer]] = list(ACTIVATION_QUANTIZERS.values())
SUPPORT_WT_QUANTIZERS: list[type[BaseQuantizer]] = list(WEIGHT_QUANTIZERS.values())

__all__ = [
    "ACTIVATION_QUANTIZERS",
    "SUPPORT_ACT_QUANTIZERS",
    "SUPPORT_WT_QUANTIZERS",
    "AbsmaxQuantizer",
    "BaseHistQuantizer",
    "BaseQuantizer",
    "HistQuantizer",
    "KLQuantizer",
    "MIN_THRESHOLD",
    "MSEQuantizer",
    "MinMaxQuantizer",
    "MovingAverageAbsmaxQuantizer",
    "PerChannelAbsmaxQuantizer",
    "PerChannelMinMaxQuantizer",
    "QUANTIZERS",
    "QuantParams",
    "TensorRTKLQuantizer",
    "TensorSample",
    "WEIGHT_QUANTIZERS",
]
