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
import functools
import logging
import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import paddle

from .algorithms import schedule
from .batches import check_iterable_of_batches, run_batches
from .bias_grid import put_conv_biases_on_grid
from .calibration_state import check_compatible, read_state, write_state
from .calibration_structure import STRUCTURE, apply_structure, check_structure, structure_of
from .calibration_table import (
    CalibrationTable,
    apply_table,
    build_table,
    first_names,
    input_minima,
    read_table_file,
    table_of_every_layer,
    write_table,
)
from .config import PTQConfig, default_ptq_config, from_paddle_config
from .convert import convert_layers
from .converted import (
    converted_config, converted_measured_on, converted_minima, converted_structure,
    converted_table, is_marked_converted, record_biases_on_grid, record_config,
    record_input_signature, record_measured_on,
)
from .finite import check_finite_parameters, check_finite_thresholds
from .functional_conv import install as install_conv_routing
from .functional_matmul import has_own_parameters
from .functional_matmul import install as install_matmul_routing
from .functional_ops import install as install_functional_op_routing
from .probabilities import install as install_probability_routing
from .functional_ops import restore_sites
from .fuse import fuse_layers
from .layer_signature import check_signatures, layer_signatures
from .quantizable import check_quantizable
from .quantizers.base import MIN_THRESHOLD
from .registry import PTQRegistry
from .reparametrized import computed_weight_layers, fold_weight_reparametrizations
from .rollback import restored_on_failure
from .session import CalibrationSession, LayerState, calibrating_session
from .simulation_check import compare_with_fp32
from .static_forwards import undecorate_static_forwards
from .targets import get_target

__all__ = ["ImperativePTQ"]

logger = logging.getLogger(__name__)


def _new_state(config: PTQConfig, name: str, layer: paddle.nn.Layer) -> LayerState:
    """A hooked layer's quantizers, as ``config`` makes them."""
    info = PTQRegistry.layer_info(layer)
    simulated = info is not None and info.simulated
    operands = info is not None and info.multiplies_inputs
    return LayerState(
        name=name,
        output_quantizer=config.new_activation_quantizer(),
        input_quantizer=config.new_activation_quantizer() if simulated or operands else None,
        weight_quantizer=config.new_weight_quantizer() if simulated else None,
        second_input_quantizer=config.new_activation_quantizer() if operands else None,
    )


def _frozen_table(model: paddle.nn.Layer) -> dict[str, Any] | None:
    """The table a converted model froze at ``convert`` (``None`` for a calibrating model)."""
    return converted_table(model) if is_marked_converted(model) else None


def _check_float32_parameters(model: paddle.nn.Layer) -> None:
    """Raises ``TypeError`` naming the first floating-point parameter that is not float32:
    the int8 simulation and the exports compute in float32, as the int8 runtimes do."""
    for name, parameter in model.named_parameters():
        if paddle.is_floating_point(parameter) and parameter.dtype != paddle.float32:
            raise TypeError(
                f"convert: parameter {name!r} is {str(parameter.dtype).replace('paddle.', '')}; the "
                f"int8 simulation and its exports compute in float32. Call "
                f"model.to(dtype='float32') on the calibrated model, then convert (the "
                f"calibration statistics are kept)"
            )


class ImperativePTQ:
    """Post-training quantization for dygraph models (Paddle's ``ImperativePTQ`` API).

    Args:
        quant_config: Algorithms for activations and weights.
        asynchronous: Reduce statistics on a worker thread while the forward runs (faster on
            multi-core machines; results are identical either way).

    ``quant_config`` may also be Paddle's own ``paddle.quantization.PTQConfig`` of Paddle's
    Absmax/PerChannelAbsmax/KL/Hist quantizers: it is taken as the :class:`PTQConfig` of this
    package's quantizers of the same names and arguments.

    Raises:
        TypeError: ``quant_config`` is neither, or holds a quantizer with no counterpart here.
    """

    def __init__(
        self, quant_config: PTQConfig = default_ptq_config, *, asynchronous: bool = True
    ) -> None:
        if not isinstance(quant_config, PTQConfig):
            translated = from_paddle_config(quant_config)  # a drop-in takes Paddle's too
            if translated is None:
                raise TypeError(
                    f"quant_config must be an imperative_ptq.PTQConfig (or Paddle's "
                    f"paddle.quantization.PTQConfig), got {type(quant_config).__module__}."
                    f"{type(quant_config).__name__}"
                )
            quant_config = translated
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

        A functional ``paddle.matmul(x, self.weight)`` in a layer's ``forward`` is calibrated
        as a Linear layer found at the first calibration batch
        (:mod:`imperative_ptq.functional_matmul`), an ``F.conv2d(x, self.weight)`` as a Conv2D
        layer (:mod:`imperative_ptq.functional_conv`).

        Args:
            model: The fp32 model. Untouched unless ``inplace``.
            inplace: Hook ``model`` itself instead of a deep copy.
            fuse: Fold the Conv2D/BatchNorm2D (and Linear/BatchNorm1D) pairs of ``fuse_list``.
            fuse_list: Pairs of sublayer names, e.g. ``[["conv1", "bn1"]]``.

        Returns:
            The model to calibrate, in eval mode.

        Raises:
            TypeError: ``model`` is not a Layer, a ``paddle.DataParallel`` (quantize
                ``model._layers``) or a ``TranslatedLayer`` from ``paddle.jit.load``, or
                ``fuse_list`` is malformed.
            ValueError: ``model`` is already quantized, has no supported layer, or a
                ``fuse_list`` pair names no sublayer or cannot be folded.
        """
        if not isinstance(model, paddle.nn.Layer):
            raise TypeError(f"model must be a paddle.nn.Layer, got {type(model).__name__}")
        if not isinstance(inplace, bool):
            raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
        if calibrating_session(model) is not None or is_marked_converted(model):
            raise ValueError(
                "model was already quantized by ImperativePTQ; quantize the original fp32 model"
            )
        if fuse and fuse_list is None:
            raise TypeError("fuse_list must be given when fuse=True")
        if fuse_list is not None and not fuse:
            logger.warning(
                "fuse_list is ignored without fuse=True (as in paddle.quantization's PTQ): "
                "pass fuse=True to fold its pairs"
            )
        check_quantizable(model)
        if not inplace:
            model = copy.deepcopy(model)
        if model.training:
            logger.info("switching the model to eval mode for calibration")
        model.eval()
        if fuse:
            fuse_layers(model, fuse_list)
        fold_weight_reparametrizations(model)
        computed_weights = set(computed_weight_layers(model))
        undecorated = undecorate_static_forwards(model)
        if undecorated:
            logger.info(
                "the quantized model runs the forward of %s undecorated (paddle.jit.to_static): "
                "the export traces it with the input_spec", ", ".join(undecorated),
            )

        config = self._quant_config
        session = CalibrationSession(model, self._asynchronous, functools.partial(_new_state, config))
        session.config = config
        schedule.prepare(model, session, config)
        hooked_composites: list[paddle.nn.Layer] = []
        for name, layer in model.named_sublayers():
            info = PTQRegistry.layer_info(layer)
            if (
                info is None
                or (layer.sublayers() and not info.composite)
                or getattr(layer, "skip_quant", False) is True
                or any(layer in composite.sublayers() for composite in hooked_composites)
            ):
                continue
            if name in computed_weights:
                logger.warning(
                    "%s (%s) stays fp32: its weight is a tensor a forward-pre-hook computes, "
                    "not a parameter, so there is no weight to quantize (weight_norm and "
                    "spectral_norm are folded; fold other reparametrizations before quantize)",
                    name, type(layer).__name__,
                )
                continue
            if info.composite:
                hooked_composites.append(layer)
            session.add_layer(layer, _new_state(config, name, layer))
        if not session.layers and PTQRegistry.layer_info(model) is not None and not model.sublayers():
            raise ValueError(
                f"the model is a bare {type(model).__name__}: quantize converts the layers a "
                f"model holds, in place of themselves; wrap it, e.g. "
                f"paddle.nn.Sequential(model)"
            )
        if not session.layers and not has_own_parameters(model, (2, 3, 4)):
            raise ValueError(
                f"{type(model).__name__} has no leaf layer supported by PTQRegistry and no "
                f"parameter a functional paddle.matmul or F.conv2d could use; supported: "
                f"{', '.join(t.__name__ for t in PTQRegistry.supported_layers())}"
            )
        install_matmul_routing()
        install_conv_routing()
        install_functional_op_routing()
        install_probability_routing()
        session.attach()
        session.install()
        logger.info(
            "hooked %d layers of %s for calibration", len(session.layers), type(model).__name__
        )
        return model

    # --------------------------------------------------------------------------- calibration
    @contextlib.contextmanager
    def calibrating(self, model: paddle.nn.Layer) -> Iterator[paddle.nn.Layer]:
        """Context in which ``model``'s calibration hooks are active.

        On a normal exit the hooks are as they were on entering: a model fresh from
        :meth:`quantize` (hooks on) keeps calibrating on its own forwards afterwards (after
        :meth:`calibrate` too); one whose hooks :meth:`remove_hooks` removed has them removed
        again. Through an exception (``KeyboardInterrupt`` included) every hook is removed
        and the worker stopped. Statistics gathered so far are kept either way, so thresholds
        can still be computed, saved or converted; entering again resumes.

        Example::

            qmodel = ptq.quantize(model)
            with ptq.calibrating(qmodel):
                for x in loader:
                    qmodel(x)
            ptq.convert(qmodel)
        """
        session = self._session(model)
        attached = session.attached
        session.attach()
        try:
            yield model
        except BaseException:
            attached = False
            raise
        finally:
            try:
                session.flush()  # (raises a worker's error that the forwards did not)
            except BaseException:
                attached = False
                raise
            finally:
                if not attached:
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
            TypeError: ``max_batches`` is not an int or ``time_budget`` not a number, a
                dict batch lacks an input of ``model.forward``, or ``data`` is a single
                array or tensor (not an iterable of batches: ``[x]`` is one batch).
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
        check_iterable_of_batches(data)
        data = schedule.before_calibration(model, self._session(model), data, max_batches)
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
        write_state(
            path, session.quantizers(), self._quant_config.to_dict(),
            layer_signatures(session.layers), structure_of(state for _, state in session.layers),
        )

    def load_state(
        self, model: paddle.nn.Layer, path: str | os.PathLike, merge: bool = False
    ) -> None:
        """Loads statistics saved by :meth:`save_state`, replacing or merging with the current.

        Merging is exact for abs-max statistics; histograms are re-binned onto a common range
        (mass is conserved, placed to within one bin). Replacing also sets the structure the
        file records (what the calibration forwards saw of the graph: which outputs the model
        returns, the residual adds, ...), so the model converts as the calibrated one did;
        merging keeps the structure already there.

        Raises:
            ValueError: The file does not match the model (the first mismatch is named) or is
                not a state file of a known version; nothing is loaded then.
        """
        session = self._session(model)
        session.flush()
        header, states = read_state(path)
        restore_sites(model, sorted({key.split("/")[0] for key in states}))
        quantizers = session.quantizers()
        check_compatible(os.fspath(path), header, quantizers)
        check_signatures(path, header.get("measured_on"), layer_signatures(session.layers))
        structure = header.get(STRUCTURE)
        if structure is not None:
            check_structure(path, structure, [state.name for _, state in session.layers])
        with restored_on_failure([state for _, state in session.layers]):
            for key, quantizer in quantizers.items():
                loaded = quantizer.clone()
                try:
                    loaded.load_state_dict(states[key])
                except ValueError as error:
                    raise ValueError(f"{path}: {key!r}: {error}") from None
                if merge:
                    try:
                        quantizer.merge(loaded)
                    except ValueError as error:
                        raise ValueError(f"{path}: {key!r}: {error}") from None
                else:
                    quantizer.load_state_dict(states[key])
            if structure is not None and not merge:  # last: a failed entry above leaves it
                apply_structure((state for _, state in session.layers), structure)

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
        """Thresholds from the statistics gathered so far, keyed by sublayer name (of a
        converted model: the table frozen at ``convert``).

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
        frozen = _frozen_table(model)
        if frozen is not None:
            return copy.deepcopy(frozen)
        session = self._session(model)
        session.flush()
        return build_table(session.layers, allow_empty=session.forwards > 0)

    def save_calibration_table(
        self, model: paddle.nn.Layer, path: str | os.PathLike
    ) -> CalibrationTable:
        """Writes :meth:`calibration_table` to ``path`` as versioned JSON (atomically).

        Hooked layers that saw no data get an empty entry, so the table still names every
        hooked layer and loads back into the same model. The file also records the structure
        calibration observed (:mod:`imperative_ptq.calibration_structure`), so a model loading
        it converts and exports exactly as this one.

        Returns:
            The table, as :meth:`calibration_table` returns it (so callers need not compute
            it a second time).
        """
        table = self.calibration_table(model)
        if _frozen_table(model) is not None:
            write_table(
                path, table, converted_config(model) or self._quant_config.to_dict(),
                converted_minima(model), converted_measured_on(model), converted_structure(model),
            )
            return table
        hooked = self._session(model).layers
        write_table(
            path, table_of_every_layer(table, hooked), self._quant_config.to_dict(),
            input_minima(hooked), layer_signatures(hooked),
            structure_of(state for _, state in hooked),
        )
        return table

    def load_calibration_table(self, model: paddle.nn.Layer, path: str | os.PathLike) -> None:
        """Sets thresholds from a table written by :meth:`save_calibration_table`.

        The table must describe exactly the model's hooked layers; no data needs to be run.
        The structure the table records replaces what batches run before observed; a table
        written without it leaves that as it is.

        Raises:
            ValueError: The file is not a valid table, or does not match the model (the first
                mismatch is named); nothing is loaded then.
        """
        table_file = read_table_file(path)
        session = self._session(model)
        session.flush()  # a worker error from earlier batches surfaces here
        restore_sites(model, list(table_file.layers))
        check_signatures(path, table_file.measured_on, layer_signatures(session.layers))
        with restored_on_failure([state for _, state in session.layers]):
            apply_table(session.layers, table_file, path)

    # ------------------------------------------------------------------------------- convert
    def convert(
        self, model: paddle.nn.Layer, data: Iterable[Any] | None = None, progress: bool = True,
        *, bias_grid: bool = True,
    ) -> paddle.nn.Layer:
        """Removes the hooks and freezes the thresholds into the layers.

        Simulated-quant layers become :class:`QuantizedLayer` (int8 simulation in dygraph);
        other hooked layers keep their output thresholds (:func:`.converted.output_thresholds`).
        Then the config's data algorithms run: AdaRound, then bias correction; then each int8
        conv's folded bias moves onto the int32 grid ONNX Runtime adds it on
        (:mod:`imperative_ptq.bias_grid`). Converting an already converted model does nothing.

        Args:
            model: Model returned by :meth:`quantize` and calibrated.
            data: Batches for AdaRound / bias correction; default: the batches
                :meth:`calibrate` ran (the first 64 are kept). Ignored without them.
            progress: Show tqdm bars for the algorithms.
            bias_grid: Move the conv biases onto that grid (``ImperativeQAT.convert`` keeps
                them where its training forward computed with them).

        Returns:
            ``model`` (converted in place).

        Raises:
            CalibrationError: No calibration batch has been run.
            ValueError: A parameter or threshold holds NaN/Inf (the layer is named; the model
                is left calibrating), or the config asks for AdaRound or bias correction and
                there are no batches for it (nothing is changed).
            TypeError: A floating-point parameter is not float32 (e.g. a float64 model; the
                parameter is named, the model is left calibrating), or ``bias_grid`` is not
                a bool (nothing is changed).
        """
        if not isinstance(bias_grid, bool):
            raise TypeError(f"convert: bias_grid must be True or False, got {bias_grid!r}")
        if is_marked_converted(model):
            logger.warning("model is already converted; nothing to do")
            return model
        session = self._session(model)
        config = self._quant_config
        schedule.check_convertible(session)
        _check_float32_parameters(model)
        batches = schedule.algorithm_batches(session, config, data)
        table = self.calibration_table(model)
        check_finite_parameters(model, "convert")
        check_finite_thresholds(table, "convert")
        _warn_zero_ranges(table)
        measured_on = layer_signatures(session.layers)  # before the layers are wrapped
        session.detach()
        convert_layers(
            model, session.layers, table, get_target(config.target),
            config.activation_quantizer.quant_bits, config.weight_quantizer.quant_bits,
        )
        schedule.after_convert(model, session, config, batches, progress)
        if bias_grid:
            put_conv_biases_on_grid(
                model, session.layers, get_target(config.target), config.activation_quantizer.quant_bits
            )
        record_biases_on_grid(model, bias_grid)
        record_measured_on(model, measured_on)
        record_config(model, config.to_dict())
        record_input_signature(model, session.input_signature, session.input_example)
        session.uninstall()
        if session.compare_after_convert:
            compare_with_fp32(model, session.compared_calls)
        return model

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
        from .export.atomic import export_directory, remove_created_directories
        from .export.paddle_export import EXPORT_SUFFIXES, check_export_options, save_quantized_model
        from .export.spec_check import check_input_spec_runs
        from .export.tracing import normalize_input_spec

        session = calibrating_session(model)
        if session is not None:
            # A bad argument is refused before convert freezes the thresholds: a failed call
            # leaves the model calibrating.
            check_export_options(config)
            specs = normalize_input_spec(input_spec, model)
            input_spec = specs
            export_directory(path, EXPORT_SUFFIXES)
            attached = session.attached
            session.detach()  # the check's zeros must not reach the statistics
            try:
                check_input_spec_runs(  # (the export names the dropouts)
                    model, specs, name_dropouts=False, examples=session.input_example,
                )
            except BaseException:
                remove_created_directories(path)
                raise
            finally:
                if attached:
                    session.attach()
            self.convert(model)
        save_quantized_model(
            model, path, input_spec, quant_config=converted_config(model) or self._quant_config.to_dict(),
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
        session = calibrating_session(model)
        if session is None:
            if is_marked_converted(model):
                raise ValueError("model is already converted; its thresholds are frozen")
            raise ValueError("model was not prepared by ImperativePTQ.quantize()")
        if session.config is not None and session.config is not self._quant_config and (
            session.config.to_dict() != self._quant_config.to_dict()
        ):
            raise ValueError(
                f"model was quantized by another ImperativePTQ, with {session.config.to_dict()}; "
                f"its statistics follow that config, not this one ({self._quant_config.to_dict()}): "
                f"calibrate, convert and export it with the ImperativePTQ that quantized it"
            )
        return session


def _warn_zero_ranges(table: CalibrationTable) -> None:
    """Warns about the layers whose every activation threshold is the floor: calibration saw
    only zeros (or only NaN/Inf, which quantizers skip) there, so their int8 form maps any real
    input to zero (measured: calibration batches of zeros, a loader bug, gave every layer a
    1e-31 threshold and a converted model returning about 1e-32 for inputs fp32 maps to 0.3)."""
    floor = [
        name for name, entry in table.items()
        if any(key in entry for key in _ACTIVATION_KEYS) and all(
            float(np.max(threshold)) <= MIN_THRESHOLD
            for key in _ACTIVATION_KEYS for threshold in entry.get(key, [])
        )
    ]
    if floor:
        logger.warning(
            "%d layers saw only zeros (or only NaN/Inf) in calibration: their int8 form maps "
            "every real input to 0. Check the calibration data (all-zero or unloaded batches?): "
            "%s", len(floor), first_names(floor),
        )


_ACTIVATION_KEYS = ("input", "second_input", "output")
