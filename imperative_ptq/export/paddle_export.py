"""``save_quantized_model``: a converted model -> int8 Paddle program (+ calibration JSON)."""

from __future__ import annotations

import copy
import logging
import os
from typing import Any, Mapping, Sequence

import paddle

from ..calibration_table import write_table
from ..cpu import cpu_info
from ..session import calibrating_session
from ..converted import (
    converted_measured_on,
    converted_fine_tuning,
    converted_minima,
    converted_structure,
    converted_table,
    converted_target,
    is_marked_converted,
)
from ..targets import Target, get_target
from .inspect import int8_report
from ..quant_layers import QuantizedLayer, QuantizedMatmul
from . import program as program_lib
from .legacy_program import (
    LegacyProgram, ProgramScales, legacy_static_mode, load_legacy_program, save_legacy_program,
)
from .weight_ops import fold_conv_bias
from .float_readers import keep_concat_scales_off_float_ops
from .atomic import export_directory, staged_export
from .constant_folding import fold_parameter_subgraphs
from .padded_pools import exact_padded_pools
from .paddle_lite import lite_op_forms, complete_saved_program
from .dynamic_filters import input_dependent_filter_convs_as_conv3d
from .graph import (
    channels_last_to_first, complete_batch_norm_parameters, complete_matmul_widths, constant_clip_bounds,
    exact_nearest_resizes, filters_of_their_own, is_persistable, multiply_instead_of_scaling,
    plain_fp32_blocked_conv_outputs, producers, reduce_open_adaptive_pools, remove_inference_dropouts,
    rrelus_as_leaky_relus, separate_chained_activations, unfused_feature_map_reshapes,
)
from .spec_check import check_input_spec_runs
from .dynamic_export import is_dynamic_model, save_dynamic_model
from .tracing import (
    LayerRecord,
    legacy_trace,
    main_thread_only,
    normalize_input_spec,
    trace_to_legacy_program,
)
from .unsigned import signed_inputs_of_halved_convs

__all__ = ["EXPORT_SUFFIXES", "check_exportable", "save_fp32_model", "save_quantized_model"]

logger = logging.getLogger(__name__)

#: Files of one export, in the order they are moved into place (the program last).
EXPORT_SUFFIXES = (".pdiparams", ".calibration.json", ".pdmodel")

_OPTIONS = {"quantize_residuals"}


def _is_converted(model: paddle.nn.Layer) -> bool:
    if is_marked_converted(model):
        return True
    return any(isinstance(layer, QuantizedLayer) for layer in model.sublayers())


def check_exportable(model: paddle.nn.Layer) -> None:
    """Raises TypeError/ValueError unless ``model`` is a converted ImperativePTQ model."""
    if not isinstance(model, paddle.nn.Layer):
        raise TypeError(f"model must be a paddle.nn.Layer, got {type(model).__name__}")
    if calibrating_session(model) is not None:
        raise ValueError(
            "model is still being calibrated: call ImperativePTQ.convert(model) first "
            "(ImperativePTQ.save_quantized_model does this for you)"
        )
    if not _is_converted(model):
        raise ValueError(
            "model is not quantized: quantize it with ImperativePTQ.quantize, run calibration "
            "batches and convert it before exporting"
        )
    wide = [
        f"{name} ({layer.activation_bits}/{getattr(layer, 'weight_bits', layer.activation_bits)} bits)"
        for name, layer in model.named_sublayers()
        if isinstance(layer, (QuantizedLayer, QuantizedMatmul))
        and max(layer.activation_bits, getattr(layer, "weight_bits", 0)) > 8
    ]
    if wide:
        raise ValueError(
            f"{len(wide)} layers are quantized wider than 8 bits, which no runtime runs (Paddle "
            f"Inference, Paddle Lite and ONNX QDQ int8 take 8-bit activations and weights; the "
            f"simulation alone computes them): {', '.join(wide[:10])}; use quant_bits <= 8 to "
            f"export"
        )


def _export_target(model: paddle.nn.Layer, target: str | None) -> Target:
    """The target to export for: the one ``model`` was converted for (``ValueError`` if
    ``target`` names another); warns when this CPU cannot run it."""
    converted = converted_target(model)
    chosen = converted if target is None else get_target(target)
    if chosen.name != converted.name:
        raise ValueError(
            f"target {chosen.name!r}: the model was converted for {converted.name!r}, whose "
            f"arithmetic its simulation models; quantize and convert it with "
            f"PTQConfig(..., target={chosen.name!r}) to export for {chosen.name!r}"
        )
    if chosen.requires_vnni:
        cpu = cpu_info()
        if not cpu.vnni:
            logger.warning(
                "exporting for target %r, whose int8 kernels need VNNI, on a CPU without it "
                "(%s): the export cannot be run and checked here, and on this CPU it would "
                "saturate; target='x86' runs right on every x86 CPU",
                chosen.name, cpu.describe(),
            )
    if chosen.halved_signed_convs:
        cpu = cpu_info()
        if cpu.isa != "avx2":
            logger.warning(
                "exporting for target %r, whose convs on signed inputs compute as oneDNN's AVX2 "
                "int8 kernels do, on a CPU whose int8 kernels are %s (%s): run it with "
                "ONEDNN_MAX_CPU_ISA=AVX2 to check it here",
                chosen.name, cpu.isa, cpu.describe(),
            )
    return chosen


def _log_runtime_report(
    path: str, written: ProgramScales, target: Target, own_parameters: Mapping[str, str],
    parameter_paths: Mapping[str, str], halved: int = 0,
) -> None:
    """Logs what Paddle Inference runs in int8 (:func:`.inspect.int8_report`): one INFO line
    naming the calibrated layers that run fp32, a warning for those that Paddle's passes made
    fp32 although the program writes them int8 (``written``: what the program stores; layers
    it stores fp32 were warned about when writing it), one for convs/matmuls on parameters of
    the model's own layer classes that nothing calibrated (``own_parameters``: program name ->
    path in the model; a parameter of Paddle's layers runs fp32 on purpose, an activation
    operand is no parameter), naming them by their paths, one for weights multiplied by ops
    without an int8 kernel (named by ``parameter_paths``), and one for int8 ops reading a
    signed input on the ``x86`` target (more than the ``halved`` convs that read one on
    ``x86-avx2``).
    A failure to build the report is logged, never raised: the export itself is done."""
    try:
        report = int8_report(path)
    except Exception as error:  # noqa: BLE001 - the report is advice; the files are written
        logger.warning("could not read back what Paddle Inference runs in int8: %s", error)
        return
    # Written int8, but fp32 in what Paddle's passes made of it (e.g. a residual conv whose
    # residual has no scale).
    demoted = sorted(
        {written.weight_layers[weight] for weight in report.fp32_weights if weight in written.weight_layers}
        - set(written.fp32_layers) - set(written.fp32_calls)
    )
    fp32_layers = sorted(set(written.fp32_layers) | set(demoted))
    summary = report.summary()
    if fp32_layers:
        summary += f"; calibrated layers running fp32: {', '.join(fp32_layers)}"
    logger.info("%s: %s", path, summary)
    if demoted:
        # The simulation quantizes them: say so, the runtime computes something else there.
        logger.warning(
            "%d layers simulated in int8 run fp32 in Paddle Inference (its int8 passes found "
            "no int8 form for them, e.g. a residual conv whose residual has no scale): %s",
            len(demoted), ", ".join(demoted[:10]) + (" ..." if len(demoted) > 10 else ""),
        )
    uncalibrated = sorted(
        own_parameters[weight]
        for weight in (set(report.fp32_weights) & set(own_parameters))
        - set(written.weight_layers) - set(written.weights)
    )
    # Products Paddle has no int8 kernel for, on a parameter (paddle.einsum, bmm or addmm of a
    # layer's own weight: an MoE's experts, an x2paddle Einsum): fp32 however calibrated.
    float_products = sorted({
        parameter_paths.get(name, f"{name} (computed from parameters)") for name in report.float_product_weights
    })
    if float_products:
        logger.warning(
            "%d weights are multiplied by ops without an int8 kernel (einsum, bmm, addmm, "
            "nn.Bilinear's product, a deformable conv), which run fp32 (write the product as "
            "paddle.matmul, an nn.Linear or an nn.Conv2D to quantize it): %s",
            len(float_products), ", ".join(float_products[:10]) + (" ..." if len(float_products) > 10 else ""),
        )
    if uncalibrated:
        # A conv or matmul on a parameter that no calibrated layer holds: a functional call
        # the routing did not take (functional_conv.py, functional_matmul.py).
        logger.warning(
            "%d conv/matmul ops on parameters were not calibrated and run fp32 (a functional "
            "call the routing does not take: channels-last data, a matmul by a weight of more "
            "than two dimensions (a batched product, such as per-head projections), a weight "
            "passed in from another layer, a call outside its layer's forward, F.conv2d bound "
            "by name before quantize; an nn.Conv2D or nn.Linear layer holding the weight is "
            "calibrated and runs int8): parameters %s",
            len(uncalibrated), ", ".join(uncalibrated[:10]) + (" ..." if len(uncalibrated) > 10 else ""),
        )
    if len(report.signed_inputs) > halved and not target.signed_inputs_int8:
        logger.warning(
            "target %r: %d int8 ops read a signed (s8) input in Paddle Inference, which "
            "saturates on CPUs without VNNI: %s", target.name, len(report.signed_inputs),
            ", ".join(report.signed_inputs[:5]),
        )


def _table(records: Sequence[LayerRecord]) -> dict[str, dict[str, list[float]]]:
    layers: dict[str, dict[str, list[float]]] = {}
    for record in records:
        entry: dict[str, list[float]] = {}
        if record.simulated:
            entry["input"] = [float(record.input_threshold)]
            entry["weight"] = [float(t) for t in record.weight_thresholds.reshape(-1)]
        if record.output_thresholds:
            entry["output"] = [float(t) for t in record.output_thresholds]
        layers[record.name] = entry
    return layers


@main_thread_only
def save_quantized_model(
    model: paddle.nn.Layer,
    path: str | os.PathLike,
    input_spec: Any = None,
    quant_config: Mapping[str, Any] | None = None,
    calibration_table: Mapping[str, Mapping[str, list[float]]] | None = None,
    target: str | None = None,
    input_minima: Mapping[str, float] | None = None,
    **config: Any,
) -> None:
    """Writes ``path.pdmodel``, ``path.pdiparams`` (int8 weights) and ``path.calibration.json``.

    A model made by :func:`imperative_ptq.quantize_dynamic` is written as a weight-only int8
    program instead (:func:`.dynamic_export.save_dynamic_model`; no calibration JSON).

    The program is a legacy-IR program in Paddle's QDQ format (see :mod:`.program`) that Paddle
    Inference runs with oneDNN int8 kernels and Paddle Lite's ``opt`` converts for ARM.

    Args:
        model: A model converted by ``ImperativePTQ.convert``.
        path: File prefix; missing directories are created.
        input_spec: ``paddle.static.InputSpec`` list; ``None`` dimensions stay dynamic.
        quant_config: Quantizer description stored in the calibration JSON.
        calibration_table: The layers of the calibration JSON (default: the thresholds the
            converted layers hold).
        input_minima: The calibration JSON's input minima (see
            :mod:`imperative_ptq.calibration_table`).
        target: The deployment target (:mod:`imperative_ptq.targets`); default, and the only
            value accepted, the one the model was converted for
            (``PTQConfig(target=...)``), since the simulation models that target's arithmetic.
        **config: ``quantize_residuals`` (bool, default True): give the BatchNorm outputs that
            the simulation reads as the s8 residual of a fused conv
            (:class:`~imperative_ptq.quant_residual.QuantizedResidualOutput`) a scale, so those
            residual convs run in int8 as simulated; False keeps them fp32 (unfused, a float
            add: then the runtime differs from the simulation by the residual's rounding).

    Raises:
        TypeError: Bad ``model``/``input_spec``/option/``target``.
        ValueError: The model is not calibrated and converted, ``target`` is unknown or not
            the one the model was converted for, or tracing failed.
        OSError: The target directory cannot be created or written.
    """
    if is_dynamic_model(model):  # quantize_dynamic: a weight-only int8 program
        save_dynamic_model(model, path, input_spec)
        return
    check_export_options(config)
    quantize_residuals = config.get("quantize_residuals", True)
    check_exportable(model)
    target_spec = _export_target(model, target)
    specs = normalize_input_spec(input_spec, model)
    directory, _ = export_directory(path, EXPORT_SUFFIXES)
    path = os.path.join(directory, os.path.basename(os.fspath(path)))

    with staged_export(path, EXPORT_SUFFIXES) as staging:
        fp32_prefix = staging + ".fp32"
        traced = trace_to_legacy_program(model, specs, fp32_prefix)
        with legacy_static_mode():
            loaded = load_legacy_program(fp32_prefix)
            complete_batch_norm_parameters(loaded)
            remove_inference_dropouts(loaded, traced.records)
            rrelus_as_leaky_relus(loaded.program.global_block())
            separate_chained_activations(loaded.program.global_block())
            if target_spec.paddle_lite:
                channels_last_to_first(loaded.program.global_block())  # Lite 2.13: NCHW only
            if target_spec.onednn:
                signed_inputs_of_halved_convs(loaded, traced.records)
                work_around_onednn_passes(loaded)
                plain_fp32_blocked_conv_outputs(
                    loaded.program.global_block(),
                    {record.weight_name for record in traced.records if record.weight_name},
                )
            written = program_lib.quantize_program(
                loaded, traced.records, quantize_residuals=quantize_residuals,
                unsigned_inputs=target_spec.unsigned_inputs,
            )
            if target_spec.onednn:
                keep_concat_scales_off_float_ops(loaded)
                multiply_instead_of_scaling(loaded)
                fold_parameter_subgraphs(loaded)
            _warn_computed_weight_convs(loaded)
            filters_of_their_own(loaded)
            if target_spec.paddle_lite:
                lite_op_forms(loaded.program)
            save_legacy_program(loaded, staging)
            if target_spec.paddle_lite:
                complete_saved_program(staging + ".pdmodel")
        # One content for PREFIX.calibration.json, whoever calls: the table convert recorded
        # (what save_calibration_table writes), else one rebuilt from the traced layers.
        if calibration_table is None:
            calibration_table = converted_table(model)
            input_minima = converted_minima(model) if input_minima is None else input_minima
        layers = _table(traced.records) if calibration_table is None else calibration_table
        # The structure convert observed names that table's layers: written beside it only.
        structure = converted_structure(model) if layers == converted_table(model) else None
        table_config = {**(quant_config or {}), "target": target_spec.name}
        if converted_fine_tuning(model) is not None:  # thresholds from ImperativeQAT
            table_config["fine_tuned"] = converted_fine_tuning(model)
        write_table(
            staging + ".calibration.json", layers, table_config, input_minima,
            converted_measured_on(model), structure,
        )
    if target_spec.onednn:
        halved = sum(record.halved for record in traced.records)
        _log_runtime_report(path, written, target_spec, traced.own_parameters, traced.parameter_paths, halved)


def _warn_computed_weight_convs(loaded: LegacyProgram) -> None:
    """Warns about convs whose weight is computed in the graph (``F.conv2d`` on a
    standardized weight, as x2paddle writes Conv nodes, or on a filter computed from the
    input, :mod:`.dynamic_filters`; a layer whose forward transforms its weight, which
    convert keeps fp32, :mod:`imperative_ptq.computed_weights`): no int8 weight exists for
    them, so they run fp32. (A parameter read through a copy, :mod:`.integer_weights`, is none.)"""
    block = loaded.program.global_block()
    writers = producers(block)
    computed = []
    for op in block.ops:
        if op.type not in ("conv2d", "depthwise_conv2d", "conv3d"):
            continue
        weight = op.input("Filter")[0]
        writer = writers.get(weight)
        if is_persistable(block, weight) or (writer is not None and (
            writer.type == "dequantize_linear"
            or (writer.type == "assign" and is_persistable(block, writer.input("X")[0]))
        )):
            continue
        # A 2-d filter unsqueezed for a conv3d of depth 1 is named as computed.
        computed.append(writer.input("X")[0] if writer is not None and writer.type == "unsqueeze2" else weight)
    if computed:
        named = list(dict.fromkeys(computed))
        logger.warning(
            "%d convs on weights computed in the graph run fp32 (a functional conv, or a layer "
            "whose forward transforms its weight: no calibrated int8 weight exists for them; an "
            "nn.Conv2D multiplying by its own weight is calibrated and runs int8): %s",
            len(computed), ", ".join(named[:10]) + (" ..." if len(named) > 10 else ""),
        )


def work_around_onednn_passes(loaded: LegacyProgram) -> None:
    """Rewrites ``loaded`` (a traced program, before quantization) around what Paddle 3.3.1's
    oneDNN passes and kernels get wrong, each rewrite computing the same values
    (:mod:`.graph`): matmul widths left unknown by a reshape, feature maps reshaped and
    transposed into a matmul, channels-last convs/norms/pools, convs on filters computed from
    the input (:mod:`.dynamic_filters`), nearest resizes that are not whole-number upscales,
    windowed pools with unequal paddings or ``ceil_mode`` (:mod:`.padded_pools`), adaptive
    pools that keep an axis open, clips with tensor bounds. Programs for Paddle Lite are left as traced
    but for their channels-last ops and the forms of :mod:`.paddle_lite` (two activations in a
    row are separated for every runtime)."""
    block = loaded.program.global_block()
    constant_clip_bounds(loaded)
    complete_matmul_widths(block)
    unfused_feature_map_reshapes(block)
    channels_last_to_first(block)
    input_dependent_filter_convs_as_conv3d(block)
    exact_nearest_resizes(loaded)
    exact_padded_pools(block)
    reduce_open_adaptive_pools(block)


def check_export_options(config: Mapping[str, Any]) -> None:
    """Raises ``TypeError`` for an option :func:`save_quantized_model` does not take or a
    ``quantize_residuals`` that is not a bool."""
    unknown = set(config) - _OPTIONS
    if unknown:
        raise TypeError(
            f"unknown export option(s) {sorted(unknown)}; supported: {sorted(_OPTIONS)}"
        )
    quantize_residuals = config.get("quantize_residuals", True)
    if not isinstance(quantize_residuals, bool):
        raise TypeError(f"quantize_residuals must be a bool, got {type(quantize_residuals).__name__}")


@main_thread_only
def save_fp32_model(
    model: paddle.nn.Layer, path: str | os.PathLike, input_spec: Any = None
) -> None:
    """Writes the fp32 ``model`` as ``path.pdmodel`` / ``path.pdiparams``, the baseline to
    compare an int8 export with: the same legacy-IR format and the same conv-bias folding, so
    oneDNN fuses it as well as the int8 program. A copy of ``model`` is traced, in eval mode.

    Args:
        model: An fp32 model (not a quantized one).
        path: File prefix; missing directories are created.
        input_spec: ``paddle.static.InputSpec`` list; ``None`` dimensions stay dynamic.

    Raises:
        TypeError: Bad ``model`` or ``input_spec``.
        ValueError: ``model`` does not run on ``input_spec`` (checked before anything is
            written, :func:`.spec_check.check_input_spec_runs`).
        OSError: The target directory cannot be created or written.
    """
    if not isinstance(model, paddle.nn.Layer):
        raise TypeError(f"model must be a paddle.nn.Layer, got {type(model).__name__}")
    if calibrating_session(model) is not None or any(
        isinstance(layer, (QuantizedLayer, QuantizedMatmul)) for layer in model.sublayers(include_self=True)
    ):
        # Its quantized layers trace to a program Paddle Inference failed to run ("could
        # not reshape a memory descriptor"), with or without its int8 passes.
        raise TypeError(
            "save_fp32_model takes the fp32 model; this one was quantized by ImperativePTQ "
            "(pass the model given to quantize, or export this one with save_quantized_model)"
        )
    specs = normalize_input_spec(input_spec)
    directory, _ = export_directory(path, EXPORT_SUFFIXES)
    path = os.path.join(directory, os.path.basename(os.fspath(path)))
    # A copy: tracing must not touch the user's model, and Paddle cannot trace an
    # uninitialized buffer (LSTM/GRU's ``_dropout_state``: "Unknown place type:
    # Place(undefined:0)"), which a deep copy turns into an empty CPU tensor.
    traced_model = copy.deepcopy(model)
    traced_model.eval()
    check_input_spec_runs(traced_model, specs)
    with staged_export(path, (".pdiparams", ".pdmodel"), stale=(".calibration.json",)) as staging:
        with paddle.pir_utils.DygraphOldIrGuard(), legacy_trace():
            paddle.jit.save(traced_model, staging + ".raw", input_spec=specs)
        with legacy_static_mode():
            loaded = load_legacy_program(staging + ".raw")
            complete_batch_norm_parameters(loaded)
            fold_conv_bias(loaded)
            rrelus_as_leaky_relus(loaded.program.global_block())
            separate_chained_activations(loaded.program.global_block())
            work_around_onednn_passes(loaded)
            fold_parameter_subgraphs(loaded)
            filters_of_their_own(loaded)
            save_legacy_program(loaded, staging)
