"""Tracing a converted dygraph model into a legacy-IR fp32 program, remembering which program
variable each calibrated threshold belongs to.

Paddle 3.x saves PIR programs by default, and Paddle Inference cannot run PIR programs that
contain quantization ops; legacy (ProgramDesc) programs it can. So the model is traced under
``paddle.pir_utils.DygraphOldIrGuard`` with every :class:`QuantizedLayer` unwrapped back to its
inner layer (whose weight already holds the fake-quantized values), while forward-post hooks
record the static variable names each hooked layer reads and writes. The quantization ops are
added afterwards by :mod:`.program`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import logging
import os
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import paddle

from ..converted import output_thresholds
from ..finite import check_finite_parameters, check_finite_thresholds
from ..halved_convs import norm_factor
from ..quant_layers import QuantizedLayer, QuantizedMatmul, channel_below_edge, replace_sublayers
from ..quant_pool import QuantizedGlobalAveragePool
from ..quant_residual import QuantizedResidualOutput, ResidualCodesInput, ResidualSumOutput
from ..quant_rnn import QuantizedLSTM, fp32_call_reason
from ..registry import PTQRegistry
from .legacy_ops import legacy_ir_fallback
from .spec_check import check_input_spec_runs, error_summary

__all__ = [
    "LayerRecord", "TraceResult", "legacy_trace", "main_thread_only", "model_activation_bits",
    "normalize_input_spec", "trace_to_legacy_program",
]

logger = logging.getLogger(__name__)

FunctionT = TypeVar("FunctionT", bound=Callable[..., Any])


def main_thread_only(function: FunctionT) -> FunctionT:
    """Decorates an export entry point: it raises ``RuntimeError`` outside the main thread.

    The export switches Paddle into legacy static-graph mode, and in Paddle 3.3.1
    ``paddle.enable_static()`` does nothing in any other thread (its dygraph context is
    thread-local and only the main thread's is entered), so an export there failed deep inside
    Paddle ("load_inference_model() is only supported in static graph mode").
    """

    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                f"{function.__name__} must run in the main thread: Paddle "
                f"{paddle.__version__} enters static-graph mode only there (calibrate in "
                f"threads, export from the main thread)"
            )
        return function(*args, **kwargs)

    return checked  # type: ignore[return-value]


@dataclasses.dataclass
class LayerRecord:
    """What the export needs to know about one calibrated layer.

    Attributes:
        name: Sublayer name in the converted model.
        layer_type: Class name of the (inner) layer.
        weight_name: Static name of the weight parameter (simulated layers only).
        weight_thresholds: Per-channel (or single) weight thresholds.
        weight_axis: Output-channel axis of the weight.
        weight_bits: Weight bit width.
        grid_weight: The layer's weight on its own ``weight_bits`` grid (codes ``-L..L`` times
            ``grid_thresholds / L``) when the traced weight is not that one but what a runtime
            computes from it (Paddle's 8-bit requantization of a conv, or of a fc traced with
            ``program_weights=False``); ``None`` when the traced weight is on that grid.
        grid_thresholds: The thresholds of ``grid_weight``.
        input_threshold: Threshold of the first input (simulated layers only).
        input_scale: Affine (uint8) scale of the first input when it was calibrated with
            ``symmetric=False``; ``None`` for symmetric inputs.
        input_zero_point: The zero point that goes with ``input_scale``.
        input_unsigned: The input was calibrated non-negative and runs as u8 (x86 targets).
        input_shift_response: For a signed input run as u8 after a shift
            (:mod:`imperative_ptq.shifted_input`; ``input_scale`` and ``input_zero_point`` are
            its grid), what the shift adds to each output channel; else ``None``.
        output_thresholds: Output thresholds (may be empty).
        second_input_threshold: For a matmul of two activations (:class:`QuantizedMatmul`),
            the second input's threshold (``input_threshold`` is the first's); else ``None``.
        fp32_calls: For a :class:`QuantizedLSTM`, per traced call in program order, why its
            simulation runs that call fp32 (``quant_rnn.fp32_call_reason``), ``None`` if int8.
        calls: ``(input variable names, output variable name)`` per traced call; a layer object
            used twice in ``forward`` (ResNet's shared ReLU) has two.
        input_top_code: The largest code of an unsigned first input (``L``, or 255 for a ReLU
            output after a residual conv, :attr:`QuantizedLayer.input_top_code`).
        input_call_tops: That code per call in a forward where the calls differ
            (:attr:`QuantizedLayer.input_call_tops`), else empty: see :meth:`top_code`.
        pooled_input_top: For such a pool, the largest of those codes (127 where Paddle
            writes the pool's input s8).
        residual_codes: ``0``, or the largest code of this layer's first input, which the
            simulation stores as codes of its input threshold because a fused int8 residual
            conv reads that tensor too (:mod:`imperative_ptq.quant_residual`): the export gives
            it that scale.
        residual_output: The simulation writes this layer's output as s8 codes of its output
            threshold, the residual a fused int8 conv reads
            (:class:`~imperative_ptq.quant_residual.QuantizedResidualOutput`, or an int8 conv's
            :attr:`~imperative_ptq.quant_layers.QuantizedLayer.residual_output_threshold`).
        residual_fused_with: For such a layer, the layer whose output is the add's other
            operand (fused into its conv), which gets a scale too; else ``""``.
        pooled_input_threshold: For a global average pool the simulation runs int8
            (:class:`~imperative_ptq.quant_pool.QuantizedGlobalAveragePool`), the threshold
            of the u8 codes it averages; else ``None``.
        sum_codes_threshold: For a ReLU the simulation puts on the u8 codes a fused int8 conv
            writes (:class:`~imperative_ptq.quant_residual.ResidualSumOutput`), the threshold
            of those codes; else ``None``.
        sum_codes_top: With ``sum_codes_threshold``, the largest of those codes.
        sum_codes_call_thresholds: With it, that threshold per traced call where the calls
            differ (:attr:`ResidualSumOutput.call_thresholds`), else empty: see
            :meth:`sum_codes_thresholds`.
        sum_codes_calls: With it, per traced call whether the codes are its output's, where
            some calls of the ReLU read no sum (:attr:`ResidualSumOutput.call_sums`), else
            empty (all are).
        sum_codes_call_tops: With it, the largest code per traced call where the calls' sums
            differ (:attr:`ResidualSumOutput.call_tops`), else empty (``sum_codes_top``).
        constant_call_weight: For a Linear whose calls on inputs computed from parameters only
            the simulation runs in fp32 (``QuantizedLayer.constant_inputs``), the weight they
            compute with; the exports give those calls it, in float; else ``None``.
        simulated_weight: Where the program stores another weight than the layer computes
            with (``QuantizedLayer.program_weight``, from which Paddle's fc derives it), the
            one it computes with: for other ops reading the weight's variable (a decoder tied
            to it through ``.T``); else ``None`` (the variable holds it).
        runs_as_conv: A Linear or functional matmul the Paddle export runs as a 1x1 conv
            (``QuantizedLayer.runs_as_conv``, :mod:`.linear_as_conv`).
        halved: A conv reading a signed input on AVX2 kernels, which halve its weight
            (``QuantizedLayer.halved_weights``, :mod:`imperative_ptq.halved_convs`).
        norm_factor: For such a conv, the factor of the BatchNorm the Paddle export folds
            into it (:mod:`.folded_norms`); else ``None``.
    """

    name: str
    layer_type: str
    weight_name: str | None = None
    weight_thresholds: np.ndarray | None = None
    weight_axis: int | None = None
    weight_bits: int = 8
    grid_weight: np.ndarray | None = None
    grid_thresholds: np.ndarray | None = None
    input_threshold: float | None = None
    input_scale: float | None = None
    input_zero_point: int | None = None
    input_unsigned: bool = False
    input_shift_response: np.ndarray | None = None
    activation_bits: int = 8
    output_thresholds: list[float] = dataclasses.field(default_factory=list)
    calls: list[tuple[list[str], str | None]] = dataclasses.field(default_factory=list)
    second_input_threshold: float | None = None
    fp32_calls: list[str | None] = dataclasses.field(default_factory=list)
    pooled_input_threshold: float | None = None
    residual_codes: int = 0
    input_top_code: int = 127
    input_call_tops: tuple[int, ...] = ()
    pooled_input_top: int = 255
    residual_output: bool = False
    residual_fused_with: str = ""
    sum_codes_threshold: float | None = None
    sum_codes_top: int = 0
    sum_codes_call_thresholds: tuple[float, ...] = ()
    sum_codes_calls: tuple[bool, ...] = ()
    sum_codes_call_tops: tuple[int, ...] = ()
    constant_call_weight: np.ndarray | None = None
    simulated_weight: np.ndarray | None = None
    runs_as_conv: bool = False
    halved: bool = False
    norm_factor: np.ndarray | None = None

    @property
    def simulated(self) -> bool:
        """Whether the layer's input and weight are quantized."""
        return self.weight_name is not None

    def sum_codes_thresholds(self) -> dict[str, float]:
        """Output variable of each traced call -> the threshold of the codes the simulation
        puts it on (with ``sum_codes_threshold``; empty without)."""
        if self.sum_codes_threshold is None:
            return {}
        per_call, coded = self.sum_codes_call_thresholds, self.sum_codes_calls
        return {
            output: float(per_call[call % len(per_call)] if per_call else self.sum_codes_threshold)
            for call, (_, output) in enumerate(self.calls)
            if output and (not coded or coded[call % len(coded)])
        }

    def sum_codes_tops(self) -> dict[str, int]:
        """Output variable of each traced call :meth:`sum_codes_thresholds` names -> the
        largest of its codes."""
        tops, coded = self.sum_codes_call_tops, self.sum_codes_thresholds()
        return {
            output: int(tops[call % len(tops)] if tops else self.sum_codes_top)
            for call, (_, output) in enumerate(self.calls) if output in coded
        }

    def top_code(self, input_name: str) -> int:
        """The largest code of the unsigned first input ``input_name`` of a traced call."""
        if self.input_call_tops:
            for call, (inputs, _) in enumerate(self.calls):
                if inputs and inputs[0] == input_name:
                    return self.input_call_tops[call % len(self.input_call_tops)]
        return self.input_top_code

    @property
    def multiplies_inputs(self) -> bool:
        """Whether the layer is a matmul of two quantized activations."""
        return self.second_input_threshold is not None

    @property
    def traced_weight_bits(self) -> int:
        """Bit width of the grid the traced weight lies on (with ``weight_thresholds``): 8 for
        a runtime's requantization (``grid_weight`` set), else ``weight_bits``."""
        return self.weight_bits if self.grid_weight is None else 8


@dataclasses.dataclass
class TraceResult:
    """The fp32 legacy program on disk and the per-layer records."""

    path_prefix: str
    records: list[LayerRecord]
    #: Parameters held by the model's own layer classes, not Paddle's (``nn.Conv2D``,
    #: ``nn.Linear``, ...) nor subclasses of layers PTQ hooks (a Linear subclass that
    #: ``convert`` kept fp32 was calibrated, and said so): a conv or matmul on one is a
    #: functional call of the model's code. Program name -> its path in the model (``w1``,
    #: ``blocks.0.weight``).
    own_parameters: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Every parameter's path in the model (program name -> ``bilinear.weight``), to name one.
    parameter_paths: dict[str, str] = dataclasses.field(default_factory=dict)


def normalize_input_spec(input_spec: Any, model: paddle.nn.Layer | None = None) -> list[paddle.static.InputSpec]:
    """Validates ``input_spec`` and turns tensors into :class:`InputSpec` s; without one, the
    spec :func:`inferred_input_spec` gives for ``model``.

    Raises:
        TypeError: ``input_spec`` is missing (and cannot be inferred) or holds something else
            than InputSpec/Tensor.
        ValueError: A spec has rank 0 or a non-positive fixed dimension.
    """
    if input_spec is None:
        input_spec = inferred_input_spec(model) if model is not None else None
    if input_spec is None:
        raise TypeError(
            "input_spec is required to export: a list of paddle.static.InputSpec, e.g. "
            "[InputSpec([None, 3, 224, 224], 'float32', 'x')] (None = dynamic batch). It is "
            "inferred only for a model calibrated in this process on positional tensor inputs."
        )
    if isinstance(input_spec, (paddle.static.InputSpec, paddle.Tensor)):
        input_spec = [input_spec]
    if not isinstance(input_spec, (list, tuple)) or not input_spec:
        raise TypeError(
            f"input_spec must be a non-empty list of paddle.static.InputSpec, got "
            f"{type(input_spec).__name__}"
        )
    specs = []
    for position, spec in enumerate(input_spec):
        if isinstance(spec, paddle.Tensor):
            spec = paddle.static.InputSpec.from_tensor(spec, name=f"x{position}")
        if not isinstance(spec, paddle.static.InputSpec):
            raise TypeError(
                f"input_spec[{position}] must be a paddle.static.InputSpec or Tensor, got "
                f"{type(spec).__name__}"
            )
        shape = list(spec.shape)
        if not shape:
            raise ValueError(f"input_spec[{position}] has rank 0; a batch dimension is needed")
        for dim in shape:
            if dim is not None and dim != -1 and dim <= 0:
                raise ValueError(f"input_spec[{position}] has an invalid dimension {dim} in {shape}")
        specs.append(spec)
    return specs


def _self_hint(model: paddle.nn.Layer) -> str:
    """A hint for a ``forward`` whose first parameter is not named ``self``: Paddle's
    ``jit.save`` takes it for the layer only under that name, and then asks for one more
    input than the spec gives ("forward() requires `x` arguments"); else ``""``."""
    try:
        parameters = list(inspect.signature(type(model).forward).parameters)
    except (TypeError, ValueError):
        return ""
    if not parameters or parameters[0] == "self":
        return ""
    return (
        f"{type(model).__name__}.forward names its first parameter {parameters[0]!r}, which "
        f"Paddle's jit.save takes for the layer only when it is named 'self'; or "
    )


def inferred_input_spec(model: paddle.nn.Layer) -> list[paddle.static.InputSpec] | None:
    """The input spec of a model calibrated (and converted) in this process, from the inputs
    its calibration batches passed: one spec per positional tensor input, named after the
    ``forward`` parameter it binds to, its batch dimension and every size that changed
    between batches dynamic (``None``), its dtype as calibrated. ``None`` when calibration
    passed anything else (keyword tensors, non-tensors, inputs whose rank or dtype changed),
    or ran in another process (a model that loaded a calibration table)."""
    from ..converted import converted_input_signature
    from ..session import calibrating_session

    session = calibrating_session(model)
    signature = session.input_signature if session is not None else converted_input_signature(model)
    if not signature or any(not shape for shape, _ in signature):
        return None
    names = [
        parameter.name for parameter in inspect.signature(model.forward).parameters.values()
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    ]
    if len(names) < len(signature):
        names = [f"x{position}" for position in range(len(signature))]
    specs = [
        paddle.static.InputSpec([None, *shape[1:]], dtype, name)
        for (shape, dtype), name in zip(signature, names)
    ]
    logger.info("input_spec inferred from the calibration batches: %s", specs)
    return specs


def calibrated_input_shapes(model: paddle.nn.Layer) -> list[list[int]] | None:
    """The concrete input shapes of one calibration call of ``model`` (calibrating, or
    converted in this process), which it is known to run on; ``None`` if not known."""
    from ..converted import converted_input_example
    from ..session import calibrating_session

    session = calibrating_session(model)
    return session.input_example if session is not None else converted_input_example(model)


def _refuse_state_changed_after_convert(
    name: str, layer: QuantizedLayer | QuantizedMatmul, layers: dict[str, paddle.nn.Layer]
) -> None:
    """Raises where the converted model's state was changed after ``convert`` in a way the
    export cannot follow: it exports what ``convert`` decided from the calibration (the fc
    and halved-conv weights it derived, the residual and pool codes, the table it writes
    beside the program), not what a state dict loaded later holds (measured: a converted
    model given another converted model's ``set_state_dict`` simulated that model exactly,
    while Paddle Inference and ONNX Runtime ran 0.20 of the largest output off it).

    Raises:
        ValueError: Naming the layer and what changed.
    """
    buffers = ["input_threshold"] + (["second_input_threshold"] if isinstance(layer, QuantizedMatmul) else [])
    for buffer, kept in zip(buffers, layer.input_thresholds):
        held = float(getattr(layer, buffer).numpy().reshape(-1)[0])
        if held != float(np.float32(kept)):
            raise ValueError(
                f"layer {name!r}: its {buffer} buffer holds {held:.6g}, not the {kept:.6g} convert "
                f"gave it: the converted model's state was replaced after convert (set_state_dict "
                f"of another model's state?), which the export cannot follow. To restore a "
                f"calibration, save it with save_calibration_table and load it with "
                f"load_calibration_table into a freshly quantized model, then convert"
            )
    norm = layers.get(getattr(layer, "folded_norm", "") or "")
    if norm is not None and layer.norm_factor is not None and not np.array_equal(norm_factor(norm), layer.norm_factor):
        raise ValueError(
            f"layer {name!r}: the BatchNorm {layer.folded_norm!r} after it changed after convert "
            f"(a forward in training mode updates its running statistics), and the halved weights "
            f"convert derived from it no longer hold. Keep the converted model in eval mode, and "
            f"convert the calibrated model again"
        )


def _refuse_zero_points(name: str, layer: QuantizedLayer) -> None:
    """Raises for a hand-built layer with zero points (``convert`` never builds one): no
    exported runtime would compute what it simulates.

    Raises:
        ValueError: Naming the layer.
    """
    if layer.weight_scales is not None:
        raise ValueError(
            f"layer {name!r} holds affine (zero-point) weights, which no int8 runtime runs "
            f"(Paddle Inference, Paddle Lite and ONNX Runtime's QLinear kernels take symmetric "
            f"int8 weights); build it with weight thresholds only, as convert does"
        )
    if layer.input_zero_point is not None and not layer.input_shifted:
        raise ValueError(
            f"layer {name!r} quantizes its input on an affine grid (zero point "
            f"{layer.input_zero_point}), which Paddle Inference and Paddle Lite ignore (they "
            f"read thresholds only); build it without input_scale / input_zero_point, as "
            f"convert does"
        )


def _collect_records(
    model: paddle.nn.Layer, program_weights: bool
) -> tuple[paddle.nn.Layer, list[LayerRecord], dict]:
    """Copies ``model``, unwraps QuantizedLayers and builds one record per calibrated layer.

    With ``program_weights`` (a Paddle program) a Linear that runs as Paddle's oneDNN fc is
    traced with the weight the program must store for that fc to compute the layer's weight
    (:attr:`QuantizedLayer.program_weight`); otherwise with the weight it computes with.
    """
    export_model = copy.deepcopy(model)
    export_model.eval()
    records: list[LayerRecord] = []
    by_layer: dict[int, LayerRecord] = {}
    unwrapped: list[tuple[paddle.nn.Layer, paddle.nn.Layer]] = []

    def keep(wrapper: paddle.nn.Layer, inner: paddle.nn.Layer, record: LayerRecord) -> None:
        """Records ``record`` for ``inner``, which the trace runs where ``wrapper`` was."""
        if wrapper is not inner:
            unwrapped.append((wrapper, inner))  # (replaced at the end, in one walk)
        by_layer[id(inner)] = record
        records.append(record)

    layers = dict(export_model.named_sublayers())
    for name, layer in list(layers.items()):
        if id(layer) in by_layer:
            continue  # the inner layer of a wrapper recorded above
        if isinstance(layer, QuantizedLayer):
            record = _quantized_layer_record(name, layer, layers, program_weights)
            # Plain inner layer: its weight already holds the fake-quantized values, so the
            # traced fp32 program computes what the converted model does (minus input fake
            # quantization, which .program adds as quantize/dequantize ops).
            keep(layer, layer.layer, record)
        elif isinstance(layer, QuantizedMatmul):
            _refuse_state_changed_after_convert(name, layer, layers)
            record = LayerRecord(
                name=name,
                layer_type=type(layer.layer).__name__,
                input_threshold=layer.input_thresholds[0],
                second_input_threshold=layer.input_thresholds[1],
                activation_bits=layer.activation_bits,
                output_thresholds=list(layer.output_thresholds),
            )
            keep(layer, layer.layer, record)
        elif isinstance(layer, QuantizedLSTM):
            # The program keeps the fp32 weights: Paddle quantizes them itself (quant_rnn.py);
            # .rnn_fusion rewrites the traced rnn op into an int8 fusion_lstm.
            inner = layer.layer
            record = LayerRecord(
                name=name,
                layer_type=type(inner).__name__,
                weight_name=inner.weight_ih_l0.name,
                weight_thresholds=np.asarray(layer.weight_thresholds, np.float32),
                weight_axis=0,
                input_threshold=float(layer.data_threshold),
                output_thresholds=list(layer.output_thresholds),
            )
            keep(layer, inner, record)
        elif isinstance(layer, QuantizedGlobalAveragePool):
            # Traced as the plain pool: the export keeps its pool2d int8, on u8 codes of
            # the threshold recorded here (.program).
            record = LayerRecord(
                name=name,
                layer_type=type(layer.layer).__name__,
                output_thresholds=list(layer.output_thresholds),
                pooled_input_threshold=layer.input_threshold,
                pooled_input_top=layer.top,
                activation_bits=layer.activation_bits,
            )
            keep(layer, layer.layer, record)
        elif isinstance(layer, QuantizedResidualOutput):
            # Traced as the plain layer; .program gives its output the threshold's scale.
            record = LayerRecord(
                name=name,
                layer_type=type(layer.layer).__name__,
                output_thresholds=list(layer.output_thresholds),
                residual_output=True,
                residual_fused_with=layer.fused_with,
            )
            keep(layer, layer.layer, record)
        elif isinstance(layer, ResidualSumOutput):
            # Traced as the ReLU: .program writes its output with the scale the codes are on
            # (its int8 readers' input threshold, else the ReLU's output threshold).
            record = LayerRecord(
                name=name,
                layer_type=type(layer.layer).__name__,
                output_thresholds=output_thresholds(layer.layer),
                sum_codes_threshold=layer.threshold,
                sum_codes_top=layer.top,
                sum_codes_call_thresholds=layer.call_thresholds,
                sum_codes_calls=layer.call_sums,
                sum_codes_call_tops=layer.call_tops,
            )
            keep(layer, layer.layer, record)
        elif isinstance(layer, ResidualCodesInput):
            # An fp32 layer reading a tensor the simulation puts on int8 codes: .program gives
            # that tensor the threshold's scale, as for an int8 reader's ``residual_codes``.
            record = LayerRecord(
                name=name,
                layer_type=type(layer.layer).__name__,
                input_threshold=layer.threshold,
                residual_codes=layer.top,
                activation_bits=layer.activation_bits,
            )
            keep(layer, layer.layer, record)
        elif output_thresholds(layer):
            record = LayerRecord(
                name=name,
                layer_type=type(layer).__name__,
                output_thresholds=output_thresholds(layer),
            )
            keep(layer, layer, record)
    replace_sublayers(export_model, unwrapped)
    return export_model, records, by_layer


def _quantized_layer_record(
    name: str, layer: QuantizedLayer, layers: Mapping[str, paddle.nn.Layer], program_weights: bool
) -> LayerRecord:
    """The record of an int8 conv/Linear ``layer`` (see :func:`_collect_records`); sets its inner
    layer's weight to the one the program stores where that differs from the simulated one."""
    _refuse_zero_points(name, layer)
    _refuse_state_changed_after_convert(name, layer, layers)
    inner = layer.layer
    weight_thresholds = layer.weight_thresholds.numpy().astype(np.float32)
    shift_response = layer.input_shift_response()  # of the weight that runs
    grid_weight = grid_thresholds = simulated_weight = None
    # The weight its calls on constants compute with (QuantizedLayer.constant_inputs),
    # before the program's own is traced in its place.
    constant_call_weight = layer.weight.numpy().copy() if layer.constant_inputs else None
    if layer.program_weight is not None:
        if program_weights and (
            layer.paddle_fc_scales or layer.halved_weights
            or (layer.weight_bits < 8 and not channel_below_edge(
                layer.program_weight, layer.program_weight_thresholds, layer.weight_bits, layer.weight_axis
            ))
        ):
            # Codes Paddle derives its own from (a halved conv's 8-bit ones, whose
            # halving the simulation follows: quant_layers.runtime_weight).
            simulated_weight = inner.weight.numpy().copy()
            inner.weight.set_value(layer.program_weight)
            weight_thresholds = np.asarray(layer.program_weight_thresholds, np.float32)
        else:
            # An 8-bit conv (and anything for ONNX) is traced with the weight it runs,
            # whose codes reach 127 in every channel: Paddle's requantization of it is
            # an identity whatever float32 values BatchNorm folding gives it. Stored
            # on its own grid, a channel with codes below 127 holds rounding ties the
            # folding decides (measured: 3.7% of the largest logit, fine-tuned
            # residual net). Narrower weights keep their own codes in the file where
            # every channel reaches the edge of its grid, whose requantization has no
            # ties (k * 127 / L for odd L); one threshold for all channels leaves
            # channels below it, as 8-bit codes do (measured: a trained MNIST MobileNet
            # with per-tensor 4-bit weights, 0.046 of the largest logit off, 97% top-1
            # agreement with the simulation while its own codes were stored).
            grid_weight = np.asarray(layer.program_weight, np.float32)
            grid_thresholds = np.asarray(layer.program_weight_thresholds, np.float32)
    return LayerRecord(
        name=name,
        layer_type=type(inner).__name__,
        weight_name=inner.weight.name,
        weight_thresholds=weight_thresholds,
        weight_axis=layer.weight_axis,
        weight_bits=layer.weight_bits,
        grid_weight=grid_weight,
        grid_thresholds=grid_thresholds,
        input_threshold=float(layer.input_thresholds[0]),
        input_scale=None if layer.input_scale is None else float(layer.input_scale),
        input_zero_point=(
            None if layer.input_zero_point is None else int(layer.input_zero_point)
        ),
        input_unsigned=layer.input_unsigned,
        residual_codes=layer.residual_codes,
        input_top_code=layer.input_top_code,
        input_call_tops=() if layer.input_call_tops is None else layer.input_call_tops.tops,
        input_shift_response=shift_response,
        activation_bits=layer.activation_bits,
        output_thresholds=list(
            layer.output_thresholds if layer.residual_output_threshold is None
            else [layer.residual_output_threshold]
        ),
        residual_output=layer.residual_output_threshold is not None,
        residual_fused_with=layer.residual_fused_with,
        constant_call_weight=constant_call_weight,
        simulated_weight=simulated_weight,
        # Paddle's fc would derive other weight scales: its matmuls become 1x1 convs
        # (.linear_as_conv); ONNX Runtime takes the stored ones.
        runs_as_conv=program_weights and layer.runs_as_conv and not layer.constant_inputs,
        halved=layer.halved_weights,
        norm_factor=layer.norm_factor if program_weights else None,
    )


def model_activation_bits(records: Sequence[LayerRecord]) -> int:
    """The model's activation width: one per model (``PTQConfig`` has one activation
    quantizer), read from its quantized layers (the records of the others keep the default 8)."""
    return min((record.activation_bits for record in records if record.simulated), default=8)


def _thresholds(record: LayerRecord) -> dict[str, list[float]]:
    """The thresholds (and affine input scale) a record carries, by role."""
    roles = {"output": list(record.output_thresholds)}
    if record.multiplies_inputs:
        roles["input"] = [record.input_threshold]
        roles["second_input"] = [record.second_input_threshold]
    if record.simulated:
        roles["input"] = [record.input_threshold]
        roles["weight"] = np.asarray(record.weight_thresholds).reshape(-1).tolist()
        if record.input_scale is not None:
            roles["input_scale"] = [record.input_scale]
    return roles


def _forget_failed_traces() -> None:
    """Drops the parameters Paddle recorded for programs whose tracing never finished.

    ``ProgramTranslator`` keeps, per program, the parameters a trace touched (keyed by the
    program's ``id``) and pops them when the trace completes. A trace that raises leaves its
    entry behind; once a later program reuses that ``id``, ``jit.save`` adds the dead model's
    parameters to the new program and fails with a ``KeyError`` (measured: 3 of 40 exports after
    a failed one). Nothing is traced between our exports, so clearing the maps is safe.
    """
    try:
        from paddle.jit.dy2static.program_translator import ProgramTranslator
    except ImportError:  # another Paddle layout: nothing to clean
        return
    translator = ProgramTranslator.get_instance()
    for name in ("_params_recorder", "_inplace_map"):
        recorder = getattr(translator, name, None)
        if isinstance(getattr(recorder, "params_dict", None), dict):
            recorder.params_dict.clear()


@contextlib.contextmanager
def legacy_trace() -> Iterator[None]:
    """Lets PIR-only Paddle APIs trace into legacy programs (:func:`.legacy_ops.legacy_ir_fallback`),
    looks up call sites without reading source (:func:`_call_sites_without_source`) and leaves
    no state of a failed trace behind."""
    _forget_failed_traces()
    try:
        with legacy_ir_fallback(), _call_sites_without_source():
            yield
    finally:
        _forget_failed_traces()


class _SourcelessInspect:
    """The ``inspect`` module, with a ``stack()`` that reads no source lines."""

    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)

    @staticmethod
    def stack(context: int = 1) -> list[inspect.FrameInfo]:
        return inspect.stack(0)[1:]


@contextlib.contextmanager
def _call_sites_without_source() -> Iterator[None]:
    """Paddle's arithmetic on legacy-IR variables (``x + y`` traced) calls ``inspect.stack()``
    for a deprecation warning's file and line whenever the right operand's leading size is
    open (every residual add of a batch), which reads the source lines of every frame of the
    stack and searches ``sys.modules`` for the module of each frame of code that none holds
    (dy2static's): ~1 ms per add in a script, ~50 ms under pytest (a deeper stack, more
    modules; 8.5 of the 75 s of ``tests/test_fused_residual.py`` on one core). Within the
    trace it gets the same frames, files and lines without their source."""
    from paddle.base.layers import math_op_patch

    if getattr(math_op_patch, "inspect", None) is not inspect:
        yield
        return
    math_op_patch.inspect = _SourcelessInspect()
    try:
        yield
    finally:
        math_op_patch.inspect = inspect


def trace_to_legacy_program(
    model: paddle.nn.Layer,
    input_spec: Sequence[paddle.static.InputSpec],
    path_prefix: str,
    program_weights: bool = True,
) -> TraceResult:
    """Saves the converted ``model`` as an fp32 legacy program at ``path_prefix``.

    ``program_weights``: trace the weights a Paddle Inference program stores (see
    :func:`_collect_records`); False for exporters that store the weights computed with.

    Raises:
        ValueError: A parameter or threshold holds NaN/Inf (the layer is named), the model
            does not run on ``input_spec`` (:func:`.spec_check.check_input_spec_runs`), or
            tracing with it failed.
    """
    export_model, records, by_layer = _collect_records(model, program_weights)
    check_finite_parameters(export_model, "export")
    check_finite_thresholds({record.name: _thresholds(record) for record in records}, "export")
    runs_on_spec = check_input_spec_runs(export_model, input_spec, examples=calibrated_input_shapes(model))
    if not records:
        logger.warning(
            "no layer of the model runs int8 (every calibrated layer stayed fp32): the export "
            "is an fp32 program"
        )

    def record_call(layer: paddle.nn.Layer, inputs: tuple, outputs: Any) -> None:
        record = by_layer.get(id(layer))
        if record is None:
            return
        names = [getattr(value, "name", None) for value in inputs]
        record.calls.append((names, getattr(outputs, "name", None)))

    def record_lstm_call(layer: paddle.nn.Layer, inputs: tuple, kwargs: dict) -> None:
        # paddle.nn.LSTM.forward(inputs, initial_states=None, sequence_length=None)
        arguments = dict(zip(("inputs", "initial_states", "sequence_length"), inputs), **kwargs)
        by_layer[id(layer)].fp32_calls.append(
            fp32_call_reason(arguments.get("initial_states"), arguments.get("sequence_length"))
        )

    handles = [
        layer.register_forward_post_hook(record_call)
        for layer in export_model.sublayers()
        if id(layer) in by_layer
    ]
    handles += [
        layer.register_forward_pre_hook(record_lstm_call, with_kwargs=True)
        for layer in export_model.sublayers()
        if id(layer) in by_layer and isinstance(layer, paddle.nn.LSTM)
        and by_layer[id(layer)].weight_name is not None
    ]
    try:
        with paddle.pir_utils.DygraphOldIrGuard(), legacy_trace():
            paddle.jit.save(export_model, path_prefix, input_spec=list(input_spec))
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError, AssertionError) as error:
        shapes = ", ".join(f"{list(spec.shape)} {spec.dtype}" for spec in input_spec)
        dynamic = any(size is None or size == -1 for spec in input_spec for size in spec.shape)
        # A model that ran on the spec in dygraph has the right shapes: what failed is
        # Paddle's trace (a window read from self in paddle.signal.stft, measured; plain
        # paddle.jit.save fails there too).
        cause = (
            "the model runs on it in dygraph, so an op without a legacy-IR kernel in Paddle "
            f"{paddle.__version__}, or a Paddle API its trace does not take?"
            if runs_on_spec else
            f"wrong rank or shape, or an op without a legacy-IR kernel in Paddle {paddle.__version__}?"
        )
        raise ValueError(
            f"tracing the model with input_spec [{shapes}] failed ({_self_hint(export_model)}{cause}"
            # (measured: F.fold asserts its input has a known size; plain paddle.jit.save too)
            + ("; some Paddle APIs, such as F.fold, trace only with known sizes: try fixed "
               "sizes (a fixed batch) in the input_spec" if dynamic else "")
            + f"): {error_summary(error)}"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    if not os.path.exists(path_prefix + ".pdmodel"):
        raise RuntimeError(
            f"paddle.jit.save wrote no legacy program at {path_prefix}.pdmodel; this Paddle "
            f"version ({paddle.__version__}) is not supported for int8 export"
        )
    parameter_paths, own_parameters = {}, {}
    for prefix, layer in export_model.named_sublayers(include_self=True):
        own = not type(layer).__module__.startswith("paddle.") and not PTQRegistry.is_supported_layer(layer)
        for attribute, parameter in layer._parameters.items():
            if parameter is not None:
                parameter_paths[parameter.name] = f"{prefix}.{attribute}" if prefix else attribute
                if own:
                    own_parameters[parameter.name] = parameter_paths[parameter.name]
    return TraceResult(path_prefix, records, own_parameters, parameter_paths)
