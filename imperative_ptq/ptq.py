"""ImperativePTQ: post-training quantization of dygraph models, a drop-in for Paddle's.

Lifecycle::

    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(model)       # eval-mode copy with forward-post hooks on leaf layers
    for x in loader: qmodel(x)         # hooks feed the quantizers' statistics
    table = ptq.calibration_table(qmodel)
    ptq.convert(qmodel)                # hooks removed, thresholds frozen into the layers

Calibration always runs in eval mode: the returned model is switched to ``eval()`` and a forward
with a batch-norm or dropout layer in training mode is refused, so calibration can never change
the model's batch-norm statistics nor see activations a Dropout dropped.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import paddle

from .algorithms import adaround, correct_bias, correct_bias_analytically, equalize, smooth_quant
from .algorithms.smooth_quant import apply_smoothing
from .batches import run_batches
from .calibration_state import check_compatible, read_state, write_state
from .calibration_table import CalibrationTable, read_table_file, write_table
from .collector import CalibrationError
from .config import PTQConfig, default_ptq_config
from .converted import (
    converted_minima,
    converted_table,
    is_marked_converted,
    mark_converted,
    set_output_thresholds,
)
from .fuse import fuse_layers
from .quant_layers import QuantizedLayer, replace_sublayer
from .quantizers import BaseQuantizer, QuantParams
from .quantizers.qparams import affine_levels
from .registry import PTQRegistry
from .session import (
    MAX_CACHED_BATCHES,
    SESSION_ATTR,
    STATE_ATTR,
    CalibrationSession,
    LayerState,
)
from .targets import get_target

__all__ = ["ImperativePTQ"]

logger = logging.getLogger(__name__)



def _every_layer(
    table: CalibrationTable, states: Sequence[tuple[paddle.nn.Layer, LayerState]]
) -> CalibrationTable:
    """``table`` with an empty entry for every hooked layer that saw no data: the layers
    of a table file, which then names every hooked layer and loads back into the model."""
    return {state.name: table.get(state.name, {}) for _, state in states}


def _input_minima(states: Sequence[tuple[paddle.nn.Layer, LayerState]]) -> dict[str, float]:
    """The smallest input value seen by each simulated layer whose input was observed."""
    minima = {state.name: _input_minimum(state) for _, state in states}
    return {name: value for name, value in minima.items() if value is not None}


def _input_minimum(state: LayerState) -> float | None:
    """The smallest input value calibration saw (``None``: unknown, read as signed)."""
    return None if state.input_quantizer is None else state.input_quantizer.minimum


class _Sized:
    """An iterator that keeps its source's length (for the progress bar's total)."""

    def __init__(self, iterator: Iterator[Any], length: int) -> None:
        self._iterator, self._length = iterator, length

    def __iter__(self) -> Iterator[Any]:
        return self._iterator

    def __len__(self) -> int:
        return self._length


class ImperativePTQ:
    """Post-training quantization for dygraph models (Paddle's ``ImperativePTQ`` API).

    Args:
        quant_config: Algorithms for activations and weights.
        asynchronous: Reduce statistics on a worker thread while the forward runs (faster on
            multi-core machines; results are identical either way).

    Raises:
        TypeError: ``quant_config`` is not a :class:`PTQConfig`.
    """

    def __init__(
        self, quant_config: PTQConfig = default_ptq_config, *, asynchronous: bool = True
    ) -> None:
        if not isinstance(quant_config, PTQConfig):
            raise TypeError(
                f"quant_config must be an imperative_ptq.PTQConfig, got {type(quant_config).__name__}"
            )
        self._quant_config = quant_config
        self._asynchronous = bool(asynchronous)

    @property
    def quant_config(self) -> PTQConfig:
        """The configuration."""
        return self._quant_config

    # ------------------------------------------------------------------------------ quantize
    def quantize(
        self,
        model: paddle.nn.Layer,
        inplace: bool = False,
        fuse: bool = False,
        fuse_list: Sequence[Sequence[str]] | None = None,
    ) -> paddle.nn.Layer:
        """Hooks every supported leaf layer for calibration.

        Args:
            model: The fp32 model. Untouched unless ``inplace``.
            inplace: Hook ``model`` itself instead of a deep copy.
            fuse: Fold the Conv2D/BatchNorm2D (and Linear/BatchNorm1D) pairs of ``fuse_list``.
            fuse_list: Pairs of sublayer names, e.g. ``[["conv1", "bn1"]]``.

        Returns:
            The model to calibrate, in eval mode.

        Raises:
            TypeError: ``model`` is not a Layer, or ``fuse_list`` is malformed.
            ValueError: ``model`` is already quantized, has no supported layer, or a
                ``fuse_list`` pair names no sublayer or cannot be folded.
        """
        if not isinstance(model, paddle.nn.Layer):
            raise TypeError(f"model must be a paddle.nn.Layer, got {type(model).__name__}")
        if not isinstance(inplace, bool):
            raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
        if getattr(model, SESSION_ATTR, None) is not None or is_marked_converted(model):
            raise ValueError(
                "model was already quantized by ImperativePTQ; quantize the original fp32 model"
            )
        if fuse and fuse_list is None:
            raise TypeError("fuse_list must be given when fuse=True")
        if not inplace:
            model = copy.deepcopy(model)
        if model.training:
            logger.info("switching the model to eval mode for calibration")
        model.eval()
        if fuse:
            fuse_layers(model, fuse_list)
        if self._quant_config.equalization:
            equalize(model, inplace=True)  # ``model`` is the copy unless ``inplace``

        session = CalibrationSession(model, self._asynchronous)
        config = self._quant_config
        if config.needs_data:
            session.reference = copy.deepcopy(model)  # the fp32 model convert compares with
        session.smoothing = config.smooth_quant
        for name, layer in model.named_sublayers():
            if (
                layer.sublayers()
                or getattr(layer, "skip_quant", False) is True
                or not PTQRegistry.is_supported_layer(layer)
            ):
                continue
            simulated = PTQRegistry.is_simulated_quant_layer(layer)
            state = LayerState(
                name=name,
                output_quantizer=config.new_activation_quantizer(),
                input_quantizer=config.new_activation_quantizer() if simulated else None,
                weight_quantizer=config.new_weight_quantizer() if simulated else None,
            )
            setattr(layer, STATE_ATTR, state)
            session.layers.append((layer, state))
        if not session.layers:
            raise ValueError(
                f"{type(model).__name__} has no leaf layer supported by PTQRegistry; "
                f"supported: {', '.join(t.__name__ for t in PTQRegistry.supported_layers())}"
            )
        session.attach()
        setattr(model, SESSION_ATTR, session)
        logger.info(
            "hooked %d layers of %s for calibration", len(session.layers), type(model).__name__
        )
        return model

    # --------------------------------------------------------------------------- calibration
    @contextlib.contextmanager
    def calibrating(self, model: paddle.nn.Layer) -> Iterator[paddle.nn.Layer]:
        """Context in which ``model``'s calibration hooks are active; always cleans up.

        On leaving, normally or through an exception (``KeyboardInterrupt`` included), every
        hook is removed and the worker stopped. Statistics gathered so far are kept, so
        thresholds can still be computed, saved or converted; entering again resumes.

        Example::

            qmodel = ptq.quantize(model)
            with ptq.calibrating(qmodel):
                for x in loader:
                    qmodel(x)
            ptq.convert(qmodel)
        """
        session = self._session(model)
        session.attach()
        try:
            yield model
        finally:
            try:
                session.flush()
            finally:
                session.detach()

    def remove_hooks(self, model: paddle.nn.Layer) -> None:
        """Removes every calibration hook (statistics are kept; ``convert`` still works)."""
        self._session(model).detach()

    def calibrate(
        self,
        model: paddle.nn.Layer,
        data: Iterable[Any],
        max_batches: int | None = None,
        time_budget: float | None = None,
        progress: bool = True,
    ) -> int:
        """Runs calibration batches through a quantized model.

        Args:
            model: Model returned by :meth:`quantize`.
            data: Iterable of batches: a tensor or array; a tuple/list of them (positional
                inputs; items beyond those ``model.forward`` takes are dropped, so
                ``(images, labels)`` pairs work as they are); or a dict (keyword inputs; keys
                ``forward`` does not take are dropped).
            max_batches: Stop after this many batches.
            time_budget: Stop after this many seconds (checked between batches).
            progress: Show a tqdm progress bar.

        Returns:
            The number of batches run.

        Raises:
            TypeError: ``max_batches`` is not an int or ``time_budget`` not a number, or a
                dict batch lacks an input of ``model.forward``.
            ValueError: ``max_batches`` or ``time_budget`` is not positive, or ``data`` was
                empty.
        """
        if max_batches is not None:
            if isinstance(max_batches, bool) or not isinstance(max_batches, int):
                raise TypeError(f"max_batches must be an int, got {type(max_batches).__name__}")
            if max_batches < 1:
                raise ValueError(f"max_batches must be a positive int, got {max_batches!r}")
        if time_budget is not None:
            if isinstance(time_budget, bool) or not isinstance(time_budget, (int, float, np.floating)):
                raise TypeError(f"time_budget must be seconds, got {type(time_budget).__name__}")
            if not time_budget > 0:
                raise ValueError(f"time_budget must be positive seconds, got {time_budget!r}")
        session = self._session(model)
        if session.smoothing is not None:
            data = self._smooth(model, session, data, max_batches)
        if session.reference is not None and hasattr(data, "__len__"):
            total = len(data) if max_batches is None else min(len(data), max_batches)
            data = _Sized(session.keep_batches(data), total)
        elif session.reference is not None:
            data = session.keep_batches(data)
        with self.calibrating(model):
            count = run_batches(model, data, max_batches, progress, "calibrating", time_budget)
        if not count:
            raise ValueError("data yielded no calibration batch")
        return count

    # --------------------------------------------------------------------- statistics state
    def save_state(self, model: paddle.nn.Layer, path: str | os.PathLike) -> None:
        """Writes every quantizer's statistics to one versioned file (atomically).

        Use it to resume an interrupted calibration or to merge shards calibrated separately
        (:meth:`load_state` with ``merge=True``).
        """
        session = self._session(model)
        session.flush()
        write_state(path, session.quantizers(), self._quant_config.to_dict())

    def load_state(
        self, model: paddle.nn.Layer, path: str | os.PathLike, merge: bool = False
    ) -> None:
        """Loads statistics saved by :meth:`save_state`, replacing or merging with the current.

        Merging is exact for abs-max statistics; histograms are re-binned onto a common range
        (mass is conserved, placed to within one bin).

        Raises:
            ValueError: The file does not match the model (the first mismatch is named) or is
                not a state file of a known version.
        """
        session = self._session(model)
        session.flush()
        quantizers = session.quantizers()
        header, states = read_state(path)
        check_compatible(os.fspath(path), header, quantizers)
        for key, quantizer in quantizers.items():
            loaded = quantizer.clone()
            try:
                loaded.load_state_dict(states[key])
            except ValueError as error:
                raise ValueError(f"{path}: {key!r}: {error}") from None
            if merge:
                quantizer.merge(loaded)
            else:
                quantizer.load_state_dict(states[key])

    def sync(self, model: paddle.nn.Layer, group: Any = None) -> None:
        """Merges the statistics of every ``paddle.distributed`` rank, on every rank.

        Each rank calibrates its own shard, then calls ``sync``: afterwards every rank holds
        the same statistics (merged in rank order) and computes the same thresholds as one
        process over the union of the shards (exactly for abs-max, up to histogram re-binning).
        Does nothing when not running distributed.
        """
        session = self._session(model)
        session.flush()
        from .distributed import all_merge

        all_merge(session.quantizers(), group)

    # ---------------------------------------------------------------------------- thresholds
    def calibration_table(self, model: paddle.nn.Layer) -> CalibrationTable:
        """Thresholds from the statistics gathered so far, keyed by sublayer name.

        Returns:
            ``{name: {"output": [...], "input": [...], "weight": [...]}}``; ``input`` and
            ``weight`` for simulated-quant layers (``input`` only if the first input was a
            float tensor), ``weight`` one value per output channel for per-channel
            quantizers; affine quantizers add ``<role>_scale`` and ``<role>_zero_point``.
            Layers that never ran are left out (with a warning).

        Raises:
            ValueError: ``model`` was not returned by :meth:`quantize`.
            CalibrationError: No calibration batch has been run yet.
        """
        session = self._session(model)
        session.flush()
        states = self._states(model)
        table: CalibrationTable = {}
        missing, no_input = [], []
        for layer, state in states:
            if not state.output_quantizer.is_calibrated and not (
                state.input_quantizer is not None and state.input_quantizer.is_calibrated
            ):
                missing.append(state.name)
                continue
            entry: dict[str, list[float]] = {}
            # A layer whose first input was never a float tensor keeps only its output
            # thresholds (``convert`` leaves it fp32 with those).
            if state.input_quantizer is not None and state.input_quantizer.is_calibrated:
                entry["input"] = _thresholds(state.input_quantizer)
                _add_affine_params(entry, "input", state.input_quantizer)
            elif state.input_quantizer is not None:
                no_input.append(state.name)
            if state.output_quantizer.is_calibrated:
                entry["output"] = _thresholds(state.output_quantizer)
                _add_affine_params(entry, "output", state.output_quantizer)
            if state.weight_quantizer is not None:
                entry["weight"] = self._weight_thresholds(layer, state.weight_quantizer)
                _add_affine_params(entry, "weight", state.weight_quantizer)
            table[state.name] = entry
        if not table:
            raise CalibrationError(
                "no calibration data: run batches through the quantized model before asking "
                "for thresholds"
            )
        if missing:
            logger.warning(
                "%d hooked layers never ran during calibration and stay in fp32: %s",
                len(missing), ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""),
            )
        if no_input:
            logger.warning(
                "%d layers never got a floating-point input: only their outputs are calibrated: "
                "%s", len(no_input), ", ".join(no_input[:10]),
            )
        return table

    def save_calibration_table(
        self, model: paddle.nn.Layer, path: str | os.PathLike
    ) -> CalibrationTable:
        """Writes :meth:`calibration_table` to ``path`` as versioned JSON (atomically).

        Hooked layers that saw no data get an empty entry, so the table still names every
        hooked layer and loads back into the same model.

        Returns:
            The table, as :meth:`calibration_table` returns it (so callers need not compute
            it a second time).
        """
        table = self.calibration_table(model)
        states = self._states(model)
        write_table(
            path, _every_layer(table, states), self._quant_config.to_dict(), _input_minima(states)
        )
        return table

    def load_calibration_table(self, model: paddle.nn.Layer, path: str | os.PathLike) -> None:
        """Sets thresholds from a table written by :meth:`save_calibration_table`.

        The table must describe exactly the model's hooked layers; no data needs to be run.

        Raises:
            ValueError: The file is not a valid table, or does not match the model (the first
                mismatch is named).
        """
        table_file = read_table_file(path)
        layers, minima = table_file.layers, table_file.input_minima
        self._session(model).flush()  # a worker error from earlier batches surfaces here
        states = self._states(model)
        known = {state.name for _, state in states}
        extra = [name for name in layers if name not in known]
        if extra:
            raise ValueError(f"{path}: layer {extra[0]!r} is not a quantized layer of the model")
        for layer, state in states:
            entry = layers.get(state.name)
            if entry is None:
                raise ValueError(f"{path}: quantized layer {state.name!r} is missing from the table")
            if not entry:  # the layer saw no data when the table was written: it stays fp32
                continue
            roles = {"output": state.output_quantizer, "input": state.input_quantizer}
            for role, quantizer in roles.items():
                if quantizer is None:
                    continue
                if role not in entry:
                    if ("input" if role == "output" else "output") in entry:
                        continue  # its first input was no float tensor (see calibration_table)
                    raise ValueError(f"{path}: layer {state.name!r} has no {role} thresholds")
                quantizer.set_thresholds(entry[role])
                _load_affine_params(entry, role, quantizer, per_channel=False)
                if role == "input":
                    # Unknown in tables written before the sign was recorded: signed then.
                    quantizer.minimum = minima.get(state.name)
            if state.weight_quantizer is not None:
                weight = entry.get("weight")
                channels = _weight_channels(layer)
                if weight is None or len(weight) not in (1, channels):
                    raise ValueError(
                        f"{path}: layer {state.name!r} needs 1 or {channels} weight thresholds, "
                        f"got {0 if weight is None else len(weight)}"
                    )
                state.weight_quantizer.set_thresholds([weight if len(weight) > 1 else weight[0]])
                _load_affine_params(entry, "weight", state.weight_quantizer, per_channel=True)

    # ------------------------------------------------------------------------------- convert
    def convert(
        self, model: paddle.nn.Layer, data: Iterable[Any] | None = None, progress: bool = True
    ) -> paddle.nn.Layer:
        """Removes the hooks and freezes the thresholds into the layers.

        Simulated-quant layers become :class:`QuantizedLayer` (int8 simulation in dygraph);
        other hooked layers keep their output thresholds (:func:`.converted.output_thresholds`).
        Then the config's data algorithms run: AdaRound, then bias correction.
        Converting an already converted model does nothing.

        Args:
            model: Model returned by :meth:`quantize` and calibrated.
            data: Batches for AdaRound / bias correction; default: the batches
                :meth:`calibrate` ran (the first 64 are kept). Ignored without them.
            progress: Show tqdm bars for the algorithms.

        Returns:
            ``model`` (converted in place).

        Raises:
            CalibrationError: No calibration batch has been run.
            ValueError: The config asks for AdaRound or bias correction and there are no
                batches for it (nothing is changed).
        """
        if is_marked_converted(model):
            logger.warning("model is already converted; nothing to do")
            return model
        session = self._session(model)
        if session.smoothing is not None:
            raise ValueError(
                "PTQConfig(smooth_quant=...) smooths the model on the batches of "
                "ImperativePTQ.calibrate, which was not called"
            )
        batches = self._algorithm_batches(session, data)
        table = self.calibration_table(model)
        states = self._states(model)
        session.detach()
        activation_bits = self._quant_config.activation_quantizer.quant_bits
        weight_bits = self._quant_config.weight_quantizer.quant_bits
        target = get_target(self._quant_config.target)
        kept_fp32: list[str] = []
        for layer, state in states:
            delattr(layer, STATE_ATTR)
            entry = table.get(state.name)
            if entry is None:
                continue
            info = PTQRegistry.layer_info(layer)
            if state.weight_quantizer is not None and "input" in entry:
                minimum = _input_minimum(state)
                unsigned = (
                    target.unsigned_inputs
                    and "input_zero_point" not in entry
                    and minimum is not None
                    and minimum >= 0
                )
                if not unsigned and not target.signed_inputs_int8:
                    # Plain fp32, output included: a scale on a conv/fc output would make the
                    # runtime emit int8 from it (see export.program.collect_scales).
                    kept_fp32.append(state.name)
                    continue
                wrapped = QuantizedLayer(
                    layer,
                    entry["input"],
                    entry["weight"],
                    entry.get("output", []),
                    info.weight_channel_axis,
                    activation_bits,
                    weight_bits,
                    **_affine_layer_params(entry),
                    input_unsigned=unsigned,
                    paddle_fc_scales=target.paddle_fc_weights and isinstance(layer, paddle.nn.Linear),
                    onednn_weights=target.onednn,
                )
                replace_sublayer(model, layer, wrapped)
            elif "output" in entry:
                set_output_thresholds(layer, entry["output"])
        if kept_fp32:
            logger.warning(
                "target %r: %d layers read a signed input and stay fp32 (%s): without VNNI, "
                "oneDNN shifts a signed int8 input into u8, where a fc's int16 pair sums "
                "saturate and a conv's weights are halved. PTQConfig(target='x86-vnni') "
                "quantizes them for VNNI/AMX CPUs only.",
                target.name, len(kept_fp32),
                ", ".join(kept_fp32[:10]) + (" ..." if len(kept_fp32) > 10 else ""),
            )
        if batches:
            config = self._quant_config
            if config.adaround is not None:
                adaround(model, session.reference, batches, config.adaround, progress)
            if config.bias_correction == "analytical":
                correct_bias_analytically(model, session.reference, batches)
            elif config.bias_correction:
                correct_bias(model, session.reference, batches, progress)
        session.reference, session.cached_batches = None, []
        delattr(model, SESSION_ATTR)
        mark_converted(model, target, _every_layer(table, states), _input_minima(states))
        return model

    def _smooth(
        self, model: paddle.nn.Layer, session: CalibrationSession, data: Iterable[Any],
        max_batches: int | None,
    ) -> list[Any]:
        """Applies the config's SmoothQuant to the model (and its fp32 reference) on ``data``
        before any statistics are gathered; returns the batches, listed."""
        session.flush()  # batches run by hand may still be on the worker thread
        if any(q.is_calibrated for q in session.quantizers().values()):
            raise ValueError(
                "PTQConfig(smooth_quant=...) must see the data before any batch is observed: "
                "batches already ran through the model's hooks; quantize again and calibrate "
                "with ImperativePTQ.calibrate only"
            )
        batches = list(data if max_batches is None else itertools.islice(data, max_batches))
        session.detach()
        _, groups = smooth_quant(model, batches, session.smoothing, inplace=True)
        if session.reference is not None:
            apply_smoothing(session.reference, groups)
        session.smoothing = None
        return batches

    def _algorithm_batches(
        self, session: CalibrationSession, data: Iterable[Any] | None
    ) -> list[Any]:
        """The batches ``convert``'s algorithms run on (empty when the config has none)."""
        config = self._quant_config
        if not config.needs_data:
            return []
        batches = list(data) if data is not None else list(session.cached_batches)
        if not batches or session.reference is None:
            wanted = " and ".join(
                name for name, on in (("AdaRound", config.adaround is not None),
                                      ("bias correction", config.bias_correction)) if on
            )
            raise ValueError(
                f"{wanted} need calibration batches: calibrate with ImperativePTQ.calibrate "
                f"(it keeps the first {MAX_CACHED_BATCHES}) or pass convert(model, data=...)"
            )
        return batches

    # -------------------------------------------------------------------------------- export
    def save_quantized_model(
        self,
        model: paddle.nn.Layer,
        path: str | os.PathLike,
        input_spec: Sequence[Any] | None = None,
        **config: Any,
    ) -> None:
        """Exports an int8 program: ``path.pdmodel``, ``path.pdiparams``, ``path.calibration.json``.

        Converts ``model`` first if it is still calibrating. The calibration JSON is the table
        :meth:`save_calibration_table` writes (affine parameters, empty entries for layers
        that saw no data), so it loads back with :meth:`load_calibration_table`. See
        :func:`imperative_ptq.export.save_quantized_model` for the format and ``config``.

        Raises:
            TypeError: Bad ``input_spec`` or option.
            ValueError: ``model`` was never quantized, or tracing failed.
            CalibrationError: No calibration batch has been run.
            OSError: The target cannot be written (nothing is left half-written).
        """
        from .export.paddle_export import save_quantized_model

        if getattr(model, SESSION_ATTR, None) is not None:
            self.convert(model)
        save_quantized_model(
            model, path, input_spec, quant_config=self._quant_config.to_dict(),
            calibration_table=converted_table(model),
            input_minima=converted_minima(model), **config,
        )

    # ------------------------------------------------------------------------------ analysis
    def analyze(
        self,
        model: paddle.nn.Layer,
        quantized_model: paddle.nn.Layer,
        data: Iterable[Any],
        metric: Any = None,
        max_batches: int | None = None,
    ) -> Any:
        """Per-layer sensitivity: see :func:`imperative_ptq.analysis.analyze`.

        Returns:
            A :class:`~imperative_ptq.analysis.SensitivityReport`, most sensitive layer first.
        """
        from .analysis import analyze

        return analyze(model, quantized_model, data, metric, max_batches)

    def keep_fp32(
        self, quantized_model: paddle.nn.Layer, names: Iterable[str], model: paddle.nn.Layer
    ) -> paddle.nn.Layer:
        """Puts converted layers back in fp32: see :func:`imperative_ptq.analysis.keep_fp32`."""
        from .analysis import keep_fp32

        return keep_fp32(quantized_model, names, model)

    # ------------------------------------------------------------------------------ helpers
    def _session(self, model: paddle.nn.Layer) -> CalibrationSession:
        if not isinstance(model, paddle.nn.Layer):
            raise TypeError(f"model must be a paddle.nn.Layer, got {type(model).__name__}")
        session = getattr(model, SESSION_ATTR, None)
        if session is None:
            if is_marked_converted(model):
                raise ValueError("model is already converted; its thresholds are frozen")
            raise ValueError("model was not prepared by ImperativePTQ.quantize()")
        return session

    def _states(self, model: paddle.nn.Layer) -> list[tuple[paddle.nn.Layer, LayerState]]:
        """The hooked layers and their calibration state, in ``named_sublayers`` order."""
        return list(self._session(model).layers)

    @staticmethod
    def _weight_thresholds(layer: paddle.nn.Layer, quantizer: BaseQuantizer) -> list[float]:
        if not quantizer.is_calibrated:
            quantizer.sample_data(layer, (layer.weight,))
        quantizer.cal_thresholds()
        (value,) = quantizer.thresholds
        return list(value) if isinstance(value, list) else [value]


def _thresholds(quantizer: BaseQuantizer) -> list[float]:
    quantizer.cal_thresholds()
    return [float(t) for t in quantizer.thresholds]


def _add_affine_params(entry: dict[str, list], role: str, quantizer: BaseQuantizer) -> None:
    """Records ``<role>_scale`` / ``<role>_zero_point`` for an affine quantizer (symmetric
    entries stay thresholds only, as Paddle's tables are)."""
    if quantizer.symmetric:
        return
    params = quantizer.quant_params()
    if all(p.symmetric for p in params):
        return  # loaded from a symmetric table: nothing affine to record
    if role == "weight":
        (only,) = params
        entry["weight_scale"] = list(np.atleast_1d(only.scale).astype(float))
        entry["weight_zero_point"] = [int(z) for z in np.atleast_1d(only.zero_point)]
        return
    entry[f"{role}_scale"] = [float(p.scale) for p in params]
    entry[f"{role}_zero_point"] = [int(p.zero_point) for p in params]


def _load_affine_params(
    entry: dict[str, list], role: str, quantizer: BaseQuantizer, per_channel: bool
) -> None:
    """Freezes the affine parameters of ``role`` recorded in a table entry, if any."""
    scales, zero_points = entry.get(f"{role}_scale"), entry.get(f"{role}_zero_point")
    if scales is None:
        return
    bits = quantizer.quant_bits
    dtype = "uint8" if bits <= 8 else "int32"
    if per_channel:
        params = [QuantParams(list(scales), list(zero_points), dtype, 0, affine_levels(bits))]
    else:
        params = [
            QuantParams(float(s), int(z), dtype, 0, affine_levels(bits))
            for s, z in zip(scales, zero_points)
        ]
    quantizer.set_quant_params(params)


def _affine_layer_params(entry: dict[str, list]) -> dict[str, Any]:
    """QuantizedLayer arguments for the affine parts of a table entry."""
    params: dict[str, Any] = {}
    if "input_scale" in entry:
        params["input_scale"] = entry["input_scale"][0]
        params["input_zero_point"] = entry["input_zero_point"][0]
    if "weight_scale" in entry:
        params["weight_scales"] = entry["weight_scale"]
        params["weight_zero_points"] = entry["weight_zero_point"]
    return params


def _weight_channels(layer: paddle.nn.Layer) -> int:
    axis = PTQRegistry.layer_info(layer).weight_channel_axis
    return int(layer.weight.shape[axis])
