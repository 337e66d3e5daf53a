"""Which models ``quantize`` and ``quantize_dynamic`` accept.

A wrapper that hides the model's Python layers (``paddle.DataParallel``, a ``TranslatedLayer``
from ``paddle.jit.load``) is refused with a ``TypeError`` saying what to quantize instead; a
model holding layers already quantized, by this package or by Paddle's own quantization APIs,
with a ``ValueError`` naming the layer.
"""

from __future__ import annotations

import inspect

import paddle
from paddle.jit.pir_translated_layer import PirTranslatedLayer
from paddle.nn.quant import format as quant_format
from paddle.nn.quant import qat, stub
from paddle.nn.quant import quant_layers as paddle_quant_layers
from paddle.quantization import base_observer, base_quanter, wrapper

from .converted import is_marked_converted
from .dynamic_linear import DynamicQuantizedLinear
from .dynamic_rnn import DynamicQuantizedRNN
from .fake_quant import FakeQuantLayer, FakeQuantResidualSource
from .quant_layers import QuantizedLayer, QuantizedMatmul
from .quant_pool import QuantizedGlobalAveragePool
from .quant_residual import QuantizedResidualOutput
from .session import calibrating_session

__all__ = ["check_quantizable"]

#: The layer types this package puts in a model it quantizes (converted, fine-tuning and
#: dynamically quantized layers).
_QUANTIZED_HERE = (
    QuantizedLayer, QuantizedMatmul, QuantizedGlobalAveragePool, QuantizedResidualOutput,
    FakeQuantLayer, FakeQuantResidualSource, DynamicQuantizedLinear, DynamicQuantizedRNN,
)


def check_quantizable(model: paddle.nn.Layer) -> None:
    """Refuses the wrappers that hide a model's Python layers from PTQ, and models whose
    layers are quantized already.

    Raises:
        TypeError: ``model`` is a ``paddle.DataParallel`` (whose inner model is the one to
            quantize) or a ``TranslatedLayer`` from ``paddle.jit.load`` (a saved static
            program: no Python layers to hook; its copy failed inside Paddle, in place it
            calibrated nothing).
        ValueError: A sublayer was quantized by this package (a converted, calibrating,
            fine-tuning or dynamically quantized model used inside a new one), or by
            Paddle's own quantization (whose ``ImperativePTQ`` converts the model in place
            before its export fails on Paddle 3.x): quantizing those layers again wraps
            fake-quantized layers, and the export computed something else (measured: 0.9 of
            the largest output off the simulation for a Paddle-converted model, 3.9e-2 for
            a converted backbone under a new head).
    """
    for name, layer in model.named_sublayers(include_self=True):
        what = f"sublayer {name!r}" if name else "model"
        if type(getattr(layer, "_quant_config", None)).__module__.startswith("paddle.quantization"):
            raise ValueError(
                f"{what} carries the calibration hooks of Paddle's own "
                f"paddle.quantization.ImperativePTQ (its _quant_config); quantize a fresh fp32 "
                f"model (build it again and load its weights)"
            )
        if isinstance(layer, _PADDLE_QUANTIZED):
            raise ValueError(
                f"{what} is a {type(layer).__module__}.{type(layer).__name__}, a layer of "
                f"Paddle's own quantization: quantize the fp32 model (Paddle's ImperativePTQ "
                f"converts a model in place: build it again and load its fp32 weights)"
            )
        if name and (
            isinstance(layer, _QUANTIZED_HERE) or is_marked_converted(layer)
            or calibrating_session(layer) is not None
        ):
            raise ValueError(
                f"{what} ({type(layer).__name__}) was already quantized by imperative_ptq; "
                f"quantize the original fp32 model"
            )
        if isinstance(layer, paddle.DataParallel):
            raise TypeError(
                f"{what} is a paddle.DataParallel: quantize the model it wraps (its _layers); "
                f"calibration and export run the plain model"
            )
        if isinstance(layer, (paddle.jit.TranslatedLayer, PirTranslatedLayer)):
            raise TypeError(
                f"{what} is a TranslatedLayer from paddle.jit.load: it runs a saved static "
                f"program, whose layers no forward hook sees (and which PTQ cannot copy). Build "
                f"it from its Python class and load its weights (set_state_dict(paddle.load(...))), "
                f"then quantize that"
            )


def _paddle_quantization_types() -> tuple[type, ...]:
    """The layer types Paddle's own quantization APIs put in a model (fake-quantized,
    converted and observed layers); not the markers a float model may hold
    (``paddle.nn.quant.Stub``, the ``FloatFunctionalLayer`` ops)."""
    found: list[type] = [
        qat.QuantedConv2D, qat.QuantedLinear, stub.QuanterStub, wrapper.ObserveWrapper,
        base_observer.BaseObserver, base_quanter.BaseQuanter,
    ]
    for module in (paddle_quant_layers, quant_format):
        found += [
            cls for _, cls in inspect.getmembers(module, inspect.isclass)
            if issubclass(cls, paddle.nn.Layer) and cls.__module__ == module.__name__
        ]
    return tuple(found)


_PADDLE_QUANTIZED = _paddle_quantization_types()
