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

#: Activation algorithms by the names the command line and demos use.
ACTIVATION_QUANTIZERS: dict[str, type[BaseQuantizer]] = {
    "abs_max": AbsmaxQuantizer,
    "moving_average": MovingAverageAbsmaxQuantizer,
    "min_max": MinMaxQuantizer,
    "hist": HistQuantizer,
    "kl": KLQuantizer,
    "kl_tensorrt": TensorRTKLQuantizer,
    "mse": MSEQuantizer,
}
#: Weight schemes by name.
WEIGHT_QUANTIZERS: dict[str, type[BaseQuantizer]] = {
    "per_channel": PerChannelAbsmaxQuantizer,
    "abs_max": AbsmaxQuantizer,
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
    "QuantParams",
    "TensorRTKLQuantizer",
    "TensorSample",
    "WEIGHT_QUANTIZERS",
]
