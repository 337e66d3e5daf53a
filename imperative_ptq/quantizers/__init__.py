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

__all__ = [
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
]
