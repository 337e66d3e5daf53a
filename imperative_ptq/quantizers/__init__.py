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

__all__ = [
    "ACTIVATION_QUANTIZERS",
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
