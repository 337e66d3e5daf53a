"""Which layers PTQ hooks, and what it needs to know about each.

A plain dict from layer class to :class:`LayerInfo`, looked up along the class's MRO so that
subclasses of a registered layer are covered. Users add their own layer types with
:func:`register_layer` (usable as a decorator) without editing the package.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, TypeVar

import paddle

#: The batch-norm layer classes: the ``nn.BatchNorm1D/2D/3D`` family and the legacy
#: ``nn.BatchNorm`` (x2paddle's), which is not a subclass of the family's base.
BATCH_NORM_TYPES: tuple[type, ...] = (paddle.nn.layer.norm._BatchNormBase, paddle.nn.BatchNorm)

__all__ = ["BATCH_NORM_TYPES", "LayerInfo", "PTQRegistry", "layer_weight", "register_layer"]

LayerT = TypeVar("LayerT", bound=type)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """What PTQ needs to know about a layer type.

    Attributes:
        layer: The layer class.
        input_names: Names of the op inputs (Paddle's convention, e.g. ``("Input",)``).
        weight_names: Names of the weights; empty for layers without weights.
        output_names: Names of the op outputs.
        weight_channel_axis: Output-channel axis of the weight for per-channel quantization;
            ``None`` for layers without weights.
        simulated: Whether the layer is a simulated-quant layer (its input and weights are
            quantized, as for Conv2D and Linear).
        int8_runtime: Whether the runtimes the package exports to run the layer's op in int8.
            A simulated layer without (Conv3D, transposed convs: Paddle Inference's int8 program
            form has no kernel for them) is calibrated but stays fp32 at ``convert``, so the
            simulation computes what the runtime does.
        multiplies_inputs: The layer multiplies its first two inputs (a matmul of two
            activations): both are calibrated and quantized; it has no weight.
        weight_attribute: The attribute holding the quantized weight (``layer.weight``; an
            LSTM's input weight is ``weight_ih_l0``).
        output_index: The layer returns a tuple whose element at this index is the output
            calibrated (an RNN's output sequence); ``None``: the layer returns a tensor.
        composite: Hooked as a whole although it has sublayers (an RNN keeps its cells as
            sublayers); other layers are hooked only as leaves.
        observed_only: Calibrated for the table and ``analyze`` but computed in float by the
            simulation (a functional concat or multiply, :mod:`imperative_ptq.functional_ops`):
            ``convert`` leaves it as it is, the exports write none of its thresholds, and
            calibration records nothing of the graph around it.
    """

    layer: type
    input_names: tuple[str, ...]
    weight_names: tuple[str, ...]
    output_names: tuple[str, ...]
    weight_channel_axis: int | None = None
    simulated: bool = False
    int8_runtime: bool = True
    multiplies_inputs: bool = False
    weight_attribute: str = "weight"
    output_index: int | None = None
    composite: bool = False
    observed_only: bool = False


class PTQRegistry:
    """Registry of the layer types PTQ supports (Paddle's ``PTQRegistry`` API)."""

    _layers: dict[type, LayerInfo] = {}
    #: Paddle's names for the same registry (layer type -> :class:`LayerInfo`): Paddle keeps
    #: two maps; every layer hooked here is both supported and registered.
    supported_layers_map = _layers
    registered_layers_map = _layers

    @classmethod
    def register(
        cls,
        layer: type,
        input_names: tuple[str, ...] = ("X",),
        output_names: tuple[str, ...] = ("Out",),
        weight_names: tuple[str, ...] = (),
        weight_channel_axis: int | None = None,
        simulated: bool = False,
        int8_runtime: bool = True,
        multiplies_inputs: bool = False,
        weight_attribute: str = "weight",
        output_index: int | None = None,
        composite: bool = False,
        observed_only: bool = False,
    ) -> LayerInfo:
        """Registers (or re-registers) a layer type.

        Args:
            layer: A subclass of ``paddle.nn.Layer``.
            input_names: Op input names.
            output_names: Op output names.
            weight_names: Weight names; simulated layers quantize the first (``layer.weight``).
            weight_channel_axis: Output-channel axis of the weight (per-channel quantization).
            simulated: Quantize the layer's input and weight, not only its output.
            int8_runtime: The exported runtimes run the layer's op in int8 (see
                :class:`LayerInfo`); ``False`` keeps a simulated layer fp32 at ``convert``.
            multiplies_inputs: The layer multiplies its first two inputs (see
                :class:`LayerInfo`).
            weight_attribute: Attribute of the quantized weight (default ``weight``).
            output_index: Position of the calibrated output in a returned tuple.
            composite: Hook the layer although it has sublayers.
            observed_only: Calibrate it, but keep it fp32 everywhere (see :class:`LayerInfo`).

        Raises:
            TypeError: ``layer`` is not a Layer subclass.
            ValueError: A simulated layer has no weight channel axis.
        """
        if not isinstance(layer, type) or not issubclass(layer, paddle.nn.Layer):
            raise TypeError(f"layer must be a paddle.nn.Layer subclass, got {layer!r}")
        if simulated and weight_channel_axis is None:
            raise ValueError(f"simulated layer {layer.__name__} needs a weight_channel_axis")
        info = LayerInfo(
            layer,
            tuple(input_names),
            tuple(weight_names),
            tuple(output_names),
            weight_channel_axis,
            simulated,
            bool(int8_runtime),
            bool(multiplies_inputs),
            weight_attribute,
            output_index,
            bool(composite),
            bool(observed_only),
        )
        cls._layers[layer] = info
        return info

    @classmethod
    def unregister(cls, layer: type) -> None:
        """Removes a layer type (no error if it was not registered)."""
        cls._layers.pop(layer, None)

    @classmethod
    def layer_info(cls, layer: paddle.nn.Layer | type) -> LayerInfo | None:
        """The :class:`LayerInfo` of a layer class or instance (nearest registered base class),
        or ``None`` if it is not supported."""
        layer_type = layer if isinstance(layer, type) else type(layer)
        for klass in layer_type.__mro__:
            info = cls._layers.get(klass)
            if info is not None:
                return info
        return None

    @classmethod
    def is_supported_layer(cls, layer: paddle.nn.Layer | type) -> bool:
        """Whether PTQ hooks this layer class or instance."""
        return cls.layer_info(layer) is not None

    @classmethod
    def is_registered_layer(cls, layer: paddle.nn.Layer | type) -> bool:
        """Paddle's name for :meth:`is_supported_layer` (every layer hooked here has a
        :class:`LayerInfo`)."""
        return cls.is_supported_layer(layer)

    @classmethod
    def is_simulated_quant_layer(cls, layer: paddle.nn.Layer | type) -> bool:
        """Whether the layer's input and weights are quantized too (Conv2D, Linear, ...)."""
        info = cls.layer_info(layer)
        return info is not None and info.simulated

    @classmethod
    def is_observed_only(cls, layer: paddle.nn.Layer | type) -> bool:
        """Whether the layer is calibrated but computed in float everywhere
        (:attr:`LayerInfo.observed_only`: a functional concat or multiply)."""
        info = cls.layer_info(layer)
        return info is not None and info.observed_only

    @classmethod
    def supported_layers(cls) -> tuple[type, ...]:
        """All registered layer types."""
        return tuple(cls._layers)


def layer_weight(layer: paddle.nn.Layer) -> paddle.Tensor:
    """The weight a simulated layer quantizes (:attr:`LayerInfo.weight_attribute`).

    Raises:
        ValueError: The layer is not a registered simulated layer.
    """
    info = PTQRegistry.layer_info(layer)
    if info is None or not info.simulated:
        raise ValueError(f"{type(layer).__name__} is not a simulated layer of PTQRegistry")
    return getattr(layer, info.weight_attribute)


def register_layer(
    input_names: tuple[str, ...] = ("X",),
    output_names: tuple[str, ...] = ("Out",),
    weight_names: tuple[str, ...] = (),
    weight_channel_axis: int | None = None,
    simulated: bool = False,
    int8_runtime: bool = True,
) -> Callable[[LayerT], LayerT]:
    """Class decorator registering a user layer type with :class:`PTQRegistry`.

    Example::

        @register_layer(weight_names=("W",), weight_channel_axis=0, simulated=True)
        class MyConv(paddle.nn.Layer): ...
    """

    def decorate(layer: LayerT) -> LayerT:
        PTQRegistry.register(
            layer, input_names, output_names, weight_names, weight_channel_axis, simulated,
            int8_runtime,
        )
        return layer

    return decorate


def _register_defaults() -> None:
    nn = paddle.nn
    for conv in (nn.Conv1D, nn.Conv2D, nn.Conv3D):
        # Weight [out, in/groups, *k]: grouped and depthwise convolutions are covered too.
        # Conv1D traces into a conv2d, which runs int8; conv3d has no int8 kernel.
        PTQRegistry.register(
            conv, ("Input",), ("Output",), ("Filter",), 0, simulated=True,
            int8_runtime=conv is not nn.Conv3D,
        )
    for conv_transpose in (nn.Conv1DTranspose, nn.Conv2DTranspose, nn.Conv3DTranspose):
        # Weight [in, out/groups, *k]; no int8 kernel for conv2d_transpose / conv3d_transpose.
        PTQRegistry.register(
            conv_transpose, ("Input",), ("Output",), ("Filter",), 1, simulated=True,
            int8_runtime=False,
        )
    # Weight [in, out].
    PTQRegistry.register(nn.Linear, ("X",), ("Out",), ("Y",), 1, simulated=True)
    # Input weight [4 * hidden, input], one channel per gate unit; Paddle Inference runs a
    # one-layer, one-direction LSTM int8 as oneDNN's fusion_lstm (see quant_rnn.py).
    PTQRegistry.register(
        nn.LSTM, ("Input",), ("Out",), ("WeightList",), 0, simulated=True,
        weight_attribute="weight_ih_l0", output_index=0, composite=True,
    )
    PTQRegistry.register(nn.BatchNorm2D, ("X",), ("Y",))
    # The legacy class (x2paddle writes every ONNX BatchNormalization as it): traced to the
    # same batch_norm op, which Paddle fuses into the conv before it.
    PTQRegistry.register(nn.BatchNorm, ("X",), ("Y",))
    for layer in (
        nn.AdaptiveMaxPool2D,
        nn.AdaptiveAvgPool2D,
        nn.AvgPool2D,
        nn.MaxPool2D,
        nn.ReLU,
        nn.ReLU6,
        nn.Hardswish,
        nn.Swish,
        nn.Sigmoid,
        nn.Softmax,
        nn.Tanh,
    ):
        PTQRegistry.register(layer)
    PTQRegistry.register(nn.quant.add, ("X", "Y"), ("Out",))


_register_defaults()
