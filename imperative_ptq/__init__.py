"""imperative_ptq: post-training quantization for PaddlePaddle dygraph models.

A drop-in for ``paddle.quantization.ImperativePTQ`` that works on Paddle 3.x (PIR, numpy 2),
calibrates fast, and exports int8 models.
"""

import logging

from .accuracy_control import AccuracyControlResult, quantize_with_accuracy_control
from .analysis import SensitivityReport, analyze, keep_fp32, search_skip_set
from .calibration_table import FORMAT_VERSION as CALIBRATION_TABLE_VERSION
from .collector import CalibrationError
from .config import PTQConfig, default_ptq_config
from .cpu import CpuInfo, cpu_info
from .dynamic import DynamicQuantizedLinear, DynamicQuantizedRNN, quantize_dynamic
from .fuse import fuse_layers
from .primitives import (
    compute_qparams,
    dequantize,
    fake_quantize,
    quantize_per_channel,
    quantize_per_tensor,
)
from .ptq import ImperativePTQ
from .qat import ImperativeQAT
from .quant_layers import QuantizedLayer, QuantizedMatmul
from .quantizers import (
    AbsmaxQuantizer,
    BaseHistQuantizer,
    BaseQuantizer,
    HistQuantizer,
    KLQuantizer,
    MovingAverageAbsmaxQuantizer,
    MinMaxQuantizer,
    MSEQuantizer,
    PerChannelAbsmaxQuantizer,
    PerChannelMinMaxQuantizer,
    QuantParams,
    SUPPORT_ACT_QUANTIZERS,
    SUPPORT_WT_QUANTIZERS,
    TensorRTKLQuantizer,
)
from .registry import LayerInfo, PTQRegistry, register_layer
from .targets import DEFAULT_TARGET, TARGETS, Target

__version__ = "0.1.0"

__all__ = [
    "AbsmaxQuantizer",
    "AccuracyControlResult",
    "BaseHistQuantizer",
    "BaseQuantizer",
    "CALIBRATION_TABLE_VERSION",
    "CalibrationError",
    "CpuInfo",
    "DEFAULT_TARGET",
    "DynamicQuantizedLinear",
    "DynamicQuantizedRNN",
    "HistQuantizer",
    "ImperativePTQ",
    "ImperativeQAT",
    "KLQuantizer",
    "LayerInfo",
    "MSEQuantizer",
    "MinMaxQuantizer",
    "MovingAverageAbsmaxQuantizer",
    "PTQConfig",
    "PTQRegistry",
    "PerChannelAbsmaxQuantizer",
    "PerChannelMinMaxQuantizer",
    "QuantParams",
    "QuantizedLayer",
    "QuantizedMatmul",
    "SUPPORT_ACT_QUANTIZERS",
    "SUPPORT_WT_QUANTIZERS",
    "SensitivityReport",
    "TARGETS",
    "Target",
    "TensorRTKLQuantizer",
    "analyze",
    "cpu_info",
    "compute_qparams",
    "default_ptq_config",
    "dequantize",
    "fake_quantize",
    "fuse_layers",
    "keep_fp32",
    "quantize_per_channel",
    "quantize_dynamic",
    "quantize_per_tensor",
    "quantize_with_accuracy_control",
    "register_layer",
    "search_skip_set",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
