"""Quantization-aware fine-tuning that starts from a PTQ result.

When PTQ loses too much (4-bit weights, 4-bit activations), a short fine-tuning with the
quantization simulated in the forward pass recovers most of it (Krishnamoorthi, arXiv
1806.08342)::

    ptq = ImperativePTQ(PTQConfig(...))
    calibrated = ptq.quantize(model); ptq.calibrate(calibrated, data)
    qat = ImperativeQAT(ptq, learnable_scales=True)
    train_model = qat.quantize(calibrated)      # fp32 copy, fake-quant on PTQ's layers
    for x, y in loader:                          # the user's own loop
        loss = loss_fn(train_model(x), y); loss.backward(); opt.step(); opt.clear_grad()
    converted = qat.convert(train_model)         # what ptq.convert returns: export, analyze

Every layer that PTQ's ``convert`` turns into an int8 simulation gets a
:class:`~imperative_ptq.fake_quant.FakeQuantLayer` with PTQ's input and weight thresholds
(fixed, or learned with LSQ gradients), the input on the same signed, unsigned or shifted grid; the
forward computes what the converted model computes, the backward is the straight-through
estimator. BatchNorm layers use batch statistics for ``freeze_bn_after`` training steps and
are frozen (running statistics, no updates) afterwards. ``convert`` hands the fine-tuned
weights and thresholds to PTQ's own convert through a calibration table, so the result is an
ordinary converted model and its exported table records the fine-tuning.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import paddle

from .calibration_table import CalibrationTable, TableFile, apply_table, write_table
from .converted import converted_minima, converted_structure, converted_table, mark_fine_tuned
from .fake_quant import MIN_THRESHOLD, FakeQuantLayer, FakeQuantResidualSource
from .forward_calls import count_forwards
from .ptq import ImperativePTQ
from .analysis import keep_fp32
from .quant_layers import QuantizedLayer, QuantizedMatmul, replace_sublayer
from .quant_pool import QuantizedGlobalAveragePool
from .quant_rnn import QuantizedLSTM
from .quant_residual import QuantizedResidualOutput, ResidualSumOutput
from .registry import BATCH_NORM_TYPES
from .session import calibrating_session

__all__ = ["ImperativeQAT"]

logger = logging.getLogger(__name__)

_BATCH_NORM_TYPES = BATCH_NORM_TYPES
#: Attribute of a QAT model holding its :class:`_QATState` (only this module reads it).
_STATE_ATTR = "_qat_state"
#: The buffer holding the QAT model's step and backward counts (see _QATState.counters).
_COUNTERS_BUFFER = "qat_counters"
#: The layers QAT wraps around the fp32 model's (each keeps it as ``.layer``).
_WRAPPERS = (
    FakeQuantLayer, FakeQuantResidualSource, QuantizedResidualOutput, QuantizedGlobalAveragePool,
    ResidualSumOutput,
)


class _QATState:
    """What a QAT model carries: the PTQ table it started from (thresholds, input minima, the
    structure calibration observed) and its training progress."""

    def __init__(
        self,
        table: CalibrationTable,
        minima: dict[str, float],
        freeze_bn_after: int,
        structure: dict[str, Any] | None = None,
    ):
        self.table = table
        self.minima = minima
        self.structure = structure
        self.freeze_bn_after = freeze_bn_after
        #: [training steps, backward passes], a buffer of the QAT model: a checkpoint (its
        #: state_dict) carries them, so a resumed model freezes BatchNorm where it left off.
        self.counters = paddle.zeros([2], "int64")
        self.batch_norms: list[tuple[str, paddle.nn.Layer]] = []
        #: Layers PTQ's convert runs int8 that QAT has no form for (LSTMs, matmuls of two
        #: activations): fp32 in the QAT forward, so kept fp32 by :meth:`ImperativeQAT.convert`.
        self.fp32_layers: list[str] = []

    @property
    def training_steps(self) -> int:
        return int(self.counters.numpy()[0])

    @property
    def backward_passes(self) -> int:
        return int(self.counters.numpy()[1])

    def _count(self, position: int) -> None:
        counters = self.counters.numpy().copy()
        counters[position] += 1
        self.counters.set_value(counters)

    def count_backward(self, gradient: paddle.Tensor) -> None:
        self._count(1)

    def before_forward(self, model: paddle.nn.Layer, inputs: Any) -> None:
        """Counts training steps (forwards with gradients enabled) and freezes BatchNorm."""
        if not paddle.is_grad_enabled():
            return
        if self.training_steps < self.freeze_bn_after:
            for name, norm in self.batch_norms:
                if not norm.training:
                    raise ValueError(
                        f"{name} ({type(norm).__name__}) is in eval mode during a training "
                        f"step: its statistics would not be fine-tuned for the first "
                        f"{self.freeze_bn_after} steps (freeze_bn_after). Call model.train() "
                        f"before training, or pass freeze_bn_after=0 to keep them frozen."
                    )
        else:
            for _, norm in self.batch_norms:
                norm.eval()
        self._count(0)


class ImperativeQAT:
    """Quantization-aware fine-tuning of a model calibrated by :class:`ImperativePTQ`.

    Args:
        ptq: The PTQ object that calibrated the model (its config and target are kept).
        learnable_scales: Learn input and weight thresholds (LSQ step-size gradients, scaled
            by ``1/sqrt(n * L)``); otherwise PTQ's thresholds stay fixed and only the weights
            (and BatchNorm) train.
        freeze_bn_after: Training steps during which BatchNorm layers normalize with batch
            statistics and update their running statistics; afterwards they are frozen.
            0 (default) freezes them from the start, right for a short fine-tuning of a
            converged model.

    Raises:
        TypeError: ``ptq`` is not an :class:`ImperativePTQ`, or an argument has the wrong type.
        ValueError: ``freeze_bn_after`` is negative.
    """

    def __init__(
        self, ptq: ImperativePTQ, learnable_scales: bool = False, freeze_bn_after: int = 0
    ) -> None:
        if not isinstance(ptq, ImperativePTQ):
            raise TypeError(
                f"ptq must be the ImperativePTQ that calibrated the model, got "
                f"{type(ptq).__name__}"
            )
        if not isinstance(learnable_scales, bool):
            raise TypeError(f"learnable_scales must be a bool, got {type(learnable_scales).__name__}")
        if isinstance(freeze_bn_after, bool) or not isinstance(freeze_bn_after, int):
            raise TypeError(f"freeze_bn_after must be an int, got {type(freeze_bn_after).__name__}")
        if freeze_bn_after < 0:
            raise ValueError(f"freeze_bn_after must be >= 0 steps, got {freeze_bn_after}")
        self._ptq = ptq
        self.learnable_scales = learnable_scales
        self.freeze_bn_after = freeze_bn_after

    # ------------------------------------------------------------------------------ quantize
    def quantize(self, calibrated: paddle.nn.Layer) -> paddle.nn.Layer:
        """A trainable copy of a calibrated model, fake-quantized where PTQ would quantize.

        Args:
            calibrated: A model returned by ``ptq.quantize`` that has seen calibration data
                (not converted). Its hooks are removed (statistics kept); nothing else of it
                changes.

        Returns:
            The model to fine-tune, in train mode (BatchNorm frozen per ``freeze_bn_after``).

        Raises:
            TypeError: ``calibrated`` is not a Layer.
            ValueError: ``calibrated`` is not a calibrating PTQ model, or PTQ's convert
                quantizes none of its layers.
            CalibrationError: No calibration batch was run.
        """
        if not isinstance(calibrated, paddle.nn.Layer):
            raise TypeError(f"model must be a paddle.nn.Layer, got {type(calibrated).__name__}")
        session = calibrating_session(calibrated)
        if session is None:
            raise ValueError(
                "model must be the calibrated model returned by ImperativePTQ.quantize (not "
                "the fp32 model, nor a converted one): QAT starts from PTQ's thresholds"
            )
        self._ptq.remove_hooks(calibrated)
        # What PTQ's convert makes of it: which layers run int8, on which grid, with what.
        config = self._ptq.quant_config
        copied = copy.deepcopy(calibrated)
        calibrating_session(copied).compare_after_convert = False
        dry_run = self._ptq.convert(copied, bias_grid=False)
        table, minima = converted_table(dry_run), converted_minima(dry_run)
        simulated = {
            name: layer for name, layer in dry_run.named_sublayers()
            if isinstance(layer, QuantizedLayer)
        }
        if not simulated:
            raise ValueError(
                f"{type(calibrated).__name__}: PTQ's convert quantizes none of its layers "
                f"(target {config.target!r}), so there is nothing to fine-tune"
            )

        without_form = [
            name for name, layer in dry_run.named_sublayers()
            if isinstance(layer, (QuantizedLSTM, QuantizedMatmul))
        ]
        if without_form:
            logger.warning(
                "QAT: %d layers that PTQ's convert runs int8 have no fake-quantized training "
                "form (LSTMs, matmuls of two activations) and stay fp32 in the fine-tuned model, "
                "in its training forward and in its convert alike: %s", len(without_form),
                ", ".join(without_form),
            )
        model = copy.deepcopy(calibrated)
        calibrating_session(model).uninstall()  # a plain fp32 model again
        self._wrap_like_converted(model, dry_run, table, minima or {})
        state = _QATState(
            table, dict(minima or {}), self.freeze_bn_after, converted_structure(dry_run)
        )
        state.fp32_layers = without_form
        state.batch_norms = [
            (name, layer) for name, layer in model.named_sublayers()
            if isinstance(layer, _BATCH_NORM_TYPES)
        ]
        for _, layer in model.named_sublayers():
            if isinstance(layer, FakeQuantLayer):
                layer.on_backward = state.count_backward
        model.register_forward_pre_hook(state.before_forward)
        model.register_buffer(_COUNTERS_BUFFER, state.counters, persistable=True)
        setattr(model, _STATE_ATTR, state)
        model.train()
        if self.freeze_bn_after == 0:
            for _, norm in state.batch_norms:
                norm.eval()
        logger.info(
            "QAT: %d layers fake-quantized (%s thresholds), %d BatchNorm layers frozen after "
            "%d steps", len(simulated), "learnable" if self.learnable_scales else "fixed",
            len(state.batch_norms), self.freeze_bn_after,
        )
        return model

    def _wrap_like_converted(
        self,
        model: paddle.nn.Layer,
        converted: paddle.nn.Layer,
        table: CalibrationTable,
        minima: dict[str, float],
    ) -> None:
        """Wraps the layers of the fp32 ``model`` so its forward computes what ``converted``
        (PTQ's convert of the same calibration) computes: a :class:`FakeQuantLayer` for each
        int8 conv/Linear, and the same layers as the converted model around fused residuals
        (:mod:`~imperative_ptq.quant_residual`) and int8 head pools
        (:mod:`~imperative_ptq.quant_pool`), whose rounding passes gradients straight through.
        """
        config = self._ptq.quant_config
        layers = dict(model.named_sublayers())
        float_shortcuts = []
        for name, simulated in converted.named_sublayers():
            if not isinstance(simulated, QuantizedLayer):
                continue
            if simulated.residual_codes and not simulated.residual_source:
                float_shortcuts.append(name)
            entry = table[name]
            unsigned = simulated.input_unsigned
            wrapper = FakeQuantLayer(
                layers[name], entry["input"][0], entry["weight"], simulated.weight_axis,
                config.activation_quantizer.quant_bits, config.weight_quantizer.quant_bits,
                unsigned, self.learnable_scales,
                input_shifted=simulated.input_shifted, input_minimum=minima.get(name),
                input_floor=simulated.input_floor,
                input_top_code=simulated.input_top_code if unsigned else None,
                input_call_tops=simulated.input_call_tops if unsigned else None,
                # A shortcut no layer wrote (an F.relu output) cannot be copied before it is
                # put on its codes in place, which autograd refuses (F.relu saved it).
                residual_codes=simulated.residual_codes if simulated.residual_source else 0,
                paddle_fc_scales=simulated.paddle_fc_scales,
                onednn_weights=simulated.onednn_weights,
                shared_weight_threshold=simulated.shared_weight_threshold,
                residual_output_threshold=simulated.residual_output_threshold,
                runs_as_conv=simulated.runs_as_conv,
                halved_weights=simulated.halved_weights,
                norm=layers[simulated.folded_norm] if simulated.folded_norm else None,
            )
            replace_sublayer(model, layers[name], wrapper)
            if wrapper.input_call_tops is not None:
                count_forwards(model)
        if float_shortcuts:
            logger.warning(
                "%d identity shortcuts are functional-op outputs (F.relu): fine-tuning adds them "
                "in float, where the converted model and Paddle Inference add their u8 codes "
                "(read first by %s); write the block's ReLU as an nn.ReLU layer to fine-tune on "
                "the codes", len(float_shortcuts), ", ".join(float_shortcuts),
            )
        for name, simulated in converted.named_sublayers():
            layer = layers.get(name)
            if isinstance(simulated, QuantizedLayer) and simulated.residual_source:
                source = layers[simulated.residual_source]
                if not isinstance(source, FakeQuantResidualSource):
                    replace_sublayer(model, source, FakeQuantResidualSource(source))
            elif isinstance(simulated, QuantizedResidualOutput):
                replace_sublayer(
                    model, layer,
                    QuantizedResidualOutput(
                        layer, simulated.output_thresholds, simulated.activation_bits,
                        fused_with=simulated.fused_with,
                    ),
                )
            elif isinstance(simulated, QuantizedGlobalAveragePool):
                replace_sublayer(
                    model, layer,
                    QuantizedGlobalAveragePool(
                        layer, simulated.input_threshold, simulated.output_thresholds,
                        simulated.activation_bits, top=simulated.top,
                    ),
                )
        if not self.learnable_scales:
            _put_sum_outputs_on_codes(model, converted, layers)

    # ---------------------------------------------------------------------------- thresholds
    def calibration_table(self, model: paddle.nn.Layer) -> CalibrationTable:
        """PTQ's table, with the learned input and weight thresholds (``learnable_scales``)."""
        state = self._state(model)
        table = {
            name: {role: list(values) for role, values in entry.items()}
            for name, entry in state.table.items()
        }
        collapsed = []
        for name, layer in model.named_sublayers():
            if isinstance(layer, FakeQuantLayer) and layer.learnable:
                input_threshold, weight_thresholds = layer.thresholds()
                table[name]["input"] = [input_threshold]
                table[name]["weight"] = weight_thresholds
                floored = sum(t <= MIN_THRESHOLD for t in [input_threshold, *weight_thresholds])
                if floored:
                    collapsed.append(f"{name} ({floored} of {1 + len(weight_thresholds)})")
        if collapsed:
            logger.warning(
                "learned thresholds crossed zero and are read as %g, so what they quantize "
                "is (almost) zero: %s. Lower the learning rate of the scales.",
                MIN_THRESHOLD, ", ".join(collapsed),
            )
        return table

    def fine_tuning(self, model: paddle.nn.Layer) -> dict[str, Any]:
        """How ``model`` was fine-tuned (recorded in the tables and exports of the result)."""
        state = self._state(model)
        return {
            "steps": state.training_steps,
            "learnable_scales": self.learnable_scales,
            "freeze_bn_after": self.freeze_bn_after,
        }

    def save_calibration_table(self, model: paddle.nn.Layer, path: str | os.PathLike) -> None:
        """Writes :meth:`calibration_table` (atomically); its config records the fine-tuning.
        ``ptq.load_calibration_table`` loads it into a PTQ model of the fine-tuned weights."""
        state = self._state(model)
        config = {**self._ptq.quant_config.to_dict(), "fine_tuned": self.fine_tuning(model)}
        write_table(
            path, self.calibration_table(model), config, state.minima, structure=state.structure
        )

    # ------------------------------------------------------------------------------- convert
    def convert(self, model: paddle.nn.Layer, *, bias_grid: bool = False) -> paddle.nn.Layer:
        """The converted int8 simulation of the fine-tuned model (a new model; ``model`` can
        keep training).

        The fine-tuned weights go through ``ptq.quantize`` and PTQ's convert with
        :meth:`calibration_table`, so the result is what ``ptq.convert`` returns:
        ``save_quantized_model``, ``export_onnx`` and ``analyze`` take it as they are.

        Args:
            model: The model :meth:`quantize` returned.
            bias_grid: ``False`` (default): the trained biases, so that the converted model
                computes the training forward bit for bit (Paddle Inference adds them in
                float; ONNX Runtime rounds each int8 conv's to its int32 grid, and
                ``export_onnx`` warns). ``True``: as ``ImperativePTQ.convert``'s, each int8
                conv's folded bias moves onto that grid, by at most half a step, and ONNX
                Runtime computes the simulation too.

        Raises:
            TypeError: ``bias_grid`` is not a bool.
            ValueError: ``model`` was not returned by :meth:`quantize`, or it ran training
                steps but backward never reached its quantized layers.
        """
        if not isinstance(bias_grid, bool):
            raise TypeError(f"bias_grid must be a bool, got {type(bias_grid).__name__}")
        state = self._state(model)
        if state.training_steps and not state.backward_passes:
            raise ValueError(
                f"the QAT model ran {state.training_steps} training forwards but backward "
                f"never reached its quantized layers: call loss.backward() and "
                f"optimizer.step() in the training loop"
            )
        if not state.training_steps:
            logger.warning("converting a QAT model that never trained: thresholds are PTQ's")
        table = self.calibration_table(model)
        calibrating = self._ptq.quantize(self.float_model(model), inplace=True)
        session = calibrating_session(calibrating)
        session.detach()
        apply_table(
            session.layers, TableFile(table, {}, state.minima, structure=state.structure),
            "the fine-tuned table",
        )
        # Each Linear keeps the route it trained on, whatever the fine-tuned weight would pick.
        trained = {name: layer for name, layer in model.named_sublayers() if isinstance(layer, FakeQuantLayer)}
        for _, layer_state in session.layers:
            if layer_state.name in trained:
                layer_state.runs_as_conv = trained[layer_state.name].runs_as_conv
        converted = self._ptq.convert(calibrating, bias_grid=bias_grid)
        if state.fp32_layers:
            # As the training forward computed them (see quantize).
            keep_fp32(converted, state.fp32_layers, self.float_model(model))
        mark_fine_tuned(converted, self.fine_tuning(model))
        return converted

    def float_model(self, model: paddle.nn.Layer) -> paddle.nn.Layer:
        """The fine-tuned fp32 model (a copy without fake quantization, in eval mode): the
        fp32 reference to pass to ``analyze`` with the converted model."""
        self._state(model)
        plain = copy.deepcopy(model)
        # The copy's QAT hook is the copy's state's, found in the copy's own hook table: its
        # hook handle, deep-copied, still points at the table of the model it was copied from
        # (a deep copy of a QAT model, a checkpoint, had the original's hook removed).
        copied = getattr(plain, _STATE_ATTR)
        keys = [key for key, hook in plain._forward_pre_hooks.items() if getattr(hook, "__self__", None) is copied]
        for table in (plain._forward_pre_hooks, getattr(plain, "_forward_pre_hooks_with_kwargs_flag", {})):
            for key in keys:
                table.pop(key, None)
        delattr(plain, _STATE_ATTR)
        plain._buffers.pop(_COUNTERS_BUFFER, None)
        for _, layer in list(plain.named_sublayers()):
            if isinstance(layer, _WRAPPERS):
                replace_sublayer(plain, layer, layer.layer)
        plain.eval()
        return plain

    # ------------------------------------------------------------------------------ helpers
    @staticmethod
    def _state(model: Any) -> _QATState:
        if not isinstance(model, paddle.nn.Layer):
            raise TypeError(f"model must be a paddle.nn.Layer, got {type(model).__name__}")
        state = getattr(model, _STATE_ATTR, None)
        if state is None:
            raise ValueError("model was not prepared by ImperativeQAT.quantize()")
        return state


def _put_sum_outputs_on_codes(
    model: paddle.nn.Layer, converted: paddle.nn.Layer, layers: dict[str, paddle.nn.Layer]
) -> None:
    """Wraps each ReLU that ``converted`` puts on the codes an int8 conv writes (a fused
    residual sum's, or one an int8 max-pool reads: a
    :class:`~imperative_ptq.quant_residual.ResidualSumOutput`) alike in the QAT ``model``, marked
    by the same convs, so the training forward rounds those values where and as the converted
    model does (half to even, on the step of the threshold's float64 quotient); without it,
    its readers rounded them and values within an ulp of a half code went the other way (an
    MNIST ConvNet: 1 of 200 rows 1.8e-4 of the largest logit off its converted model).

    For fixed thresholds only: the codes' threshold is the readers' threshold as PTQ's
    convert found it, which learned thresholds would move away from.
    """
    mirrors: dict[int, ResidualSumOutput] = {}
    for name, simulated in converted.named_sublayers():
        if isinstance(simulated, ResidualSumOutput):
            mirror = ResidualSumOutput(
                layers[name], simulated.threshold, simulated.top, simulated.activation_bits,
                call_thresholds=simulated.call_thresholds or None,
                call_sums=simulated.call_sums or None, call_tops=simulated.call_tops or None,
            )
            replace_sublayer(model, layers[name], mirror)
            mirrors[id(simulated)] = mirror
            if simulated.call_thresholds or simulated.call_sums or simulated.call_tops:
                count_forwards(model)
    wrapped = dict(model.named_sublayers())
    for name, simulated in converted.named_sublayers():
        if isinstance(simulated, QuantizedLayer) and simulated.sum_outputs:
            wrapped[name].sum_outputs = [mirrors[id(output)] for output in simulated.sum_outputs]
