"""Int8 export: Paddle Inference / Paddle Lite programs and QDQ ONNX.

* :func:`save_quantized_model` writes a legacy-IR program in Paddle's QDQ format with int8
  weights (oneDNN int8 on x86, Paddle Lite ``opt`` for ARM);
* :func:`create_predictor` configures Paddle Inference for it, and :func:`int8_report` reads
  back which conv/fc ops its int8 passes really run in int8;
* :func:`export_onnx` writes a QDQ ONNX model that ONNX Runtime runs with QLinear kernels
  (needs the ``export`` extra: ``onnx``, ``onnxruntime``), and :func:`onnx_runtime_report`
  reads back which convs/matmuls ONNX Runtime really runs in integer kernels;
* :func:`recover_export` completes an export whose process was killed while moving its files
  into place (every export and ``create_predictor`` call it first);
* models made by ``quantize_dynamic``: :func:`save_dynamic_model` (also reached through
  :func:`save_quantized_model`) writes a weight-only int8 program, :func:`export_onnx` ONNX
  Runtime's ``DynamicQuantizeLinear`` + ``MatMulInteger`` form.
"""

from .atomic import recover_export
from .dynamic_export import save_dynamic_model
from .inspect import Int8Report, int8_report
from .onnx_export import export_onnx
from .onnx_inspect import OnnxRuntimeReport, onnx_runtime_report
from .paddle_export import save_fp32_model, save_quantized_model
from .predictor import create_predictor, predict

__all__ = [
    "Int8Report",
    "OnnxRuntimeReport",
    "create_predictor",
    "export_onnx",
    "int8_report",
    "onnx_runtime_report",
    "predict",
    "recover_export",
    "save_dynamic_model",
    "save_fp32_model",
    "save_quantized_model",
]
