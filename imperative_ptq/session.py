"""The calibration session: the hooks on a quantized model and the state they keep on it.

:meth:`ImperativePTQ.quantize` attaches a :class:`CalibrationSession` to the model and a
:class:`LayerState` to each hooked layer; this module is the only one that knows the attributes
holding them, and others ask through :func:`calibrating_session` and :func:`hooked_states`.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import itertools
import logging
import random
import weakref
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import paddle

from .collector import CalibrationCollector, CalibrationError
from .computed_weights import computes_its_weight, may_compute_its_weight
from .converted import STATE_PREFIX
from .fingerprint import Fingerprint, fingerprint
from .quant_layers import first_input
from .quant_residual import ResidualAdd, find_residual_add, relu_or_its_max_pool
from .quantizers import BaseQuantizer
from .registry import BATCH_NORM_TYPES, PTQRegistry

__all__ = [
    "COMPARED_CALLS", "MAX_CACHED_BATCHES", "SESSION_ATTR", "STATE_ATTR", "CalibrationSession", "LayerState",
    "calibrating_session", "any_discovering", "discovering_session", "hooked_states", "note_probabilities",
    "noted_as_probabilities", "returned_tensors",
]

logger = logging.getLogger(__name__)

#: Attribute of a hooked layer holding its :class:`LayerState`.
STATE_ATTR = STATE_PREFIX + "state"
#: Attribute of a model being calibrated holding its :class:`CalibrationSession`.
SESSION_ATTR = STATE_PREFIX + "session"
#: Calibration calls ``convert`` runs the simulation on, to compare it with fp32.
COMPARED_CALLS = 4
#: Calibration batches kept for bias correction and AdaRound.
MAX_CACHED_BATCHES = 64
_NORM_TYPES = BATCH_NORM_TYPES
#: Batch norms that normalize with each batch's statistics in eval mode when built with
#: ``use_global_stats=False``.
_BATCH_STATISTICS_NORMS = (
    paddle.nn.BatchNorm1D, paddle.nn.BatchNorm2D, paddle.nn.BatchNorm3D, paddle.nn.SyncBatchNorm,
)
_DROPOUT_TYPES = tuple(
    getattr(paddle.nn, name)
    for name in ("Dropout", "Dropout2D", "Dropout3D", "AlphaDropout", "FeatureAlphaDropout")
    if hasattr(paddle.nn, name)
)


def _activation(layer: paddle.nn.Layer) -> bool:
    """Whether ``layer`` is one of Paddle's activation layers (``nn.ReLU``, ``nn.GELU``, ...)."""
    return type(layer).__module__ == paddle.nn.layer.activation.__name__


@dataclasses.dataclass
class LayerState:
    """What ``quantize`` attaches to one hooked layer."""

    name: str
    output_quantizer: BaseQuantizer
    input_quantizer: BaseQuantizer | None
    weight_quantizer: BaseQuantizer | None
    hook: Any = None
    output_skipped: bool = False
    #: The second input's quantizer, for a layer multiplying two activations.
    second_input_quantizer: BaseQuantizer | None = None
    #: The largest rank of the first input seen (0: none seen).
    input_rank: int = 0
    #: Names of the hooked layers whose output this layer read as its first input: the same
    #: tensor, or a global pool's output flattened (:meth:`CalibrationSession.source_of`).
    input_sources: set[str] = dataclasses.field(default_factory=set)
    #: A functional concat's: the hooked layers whose output it joins as a later input (not
    #: counted as a reader of theirs: their folding and pooling rules read ``input_sources``).
    joined_sources: set[str] = dataclasses.field(default_factory=set)
    #: ``(source, call)`` for each of those reads: which call within a forward (the first is 0)
    #: of the source layer wrote the tensor read (a ReLU called once per residual block
    #: applied twice has a reader per call).
    input_source_calls: set[tuple[str, int]] = dataclasses.field(default_factory=set)
    #: Names of the observed-only sites (a functional concat) whose output this layer read as
    #: its first input; kept apart from ``input_sources``, which sees through those sites.
    site_sources: set[str] = dataclasses.field(default_factory=set)
    #: The adds whose residual operand (read by a fused int8 conv as codes) was this layer's
    #: output (:func:`imperative_ptq.quant_residual.find_residual_add`).
    residual_adds: set[ResidualAdd] = dataclasses.field(default_factory=set)
    #: Hooked layers that read this layer's first input before it in a forward, where no
    #: hooked layer wrote that input and a fused residual conv writes it as codes (an
    #: ``F.relu`` sum read by a pool, then by a conv): ``convert`` puts it on the codes before
    #: the first of them reads it.
    earlier_readers: set[str] = dataclasses.field(default_factory=set)
    #: Its output was returned by the model itself (a tensor of the forward's result, also
    #: inside a tuple, list or dict): one of the model's heads when no hooked layer with a
    #: weight reads it.
    model_output: bool = False
    #: Its first input was a ReLU output that Paddle writes as s8 codes (after a conv fused
    #: with an s8 residual): saturated at code 127 of the tensor's u8 step.
    signed_input: bool = False
    #: Its first input was a ReLU output after a fused residual conv with a u8 residual, which
    #: Paddle leaves unclipped: u8 codes up to 255 (:mod:`imperative_ptq.export.unsigned`).
    wide_input: bool = False
    #: Calls within a forward (the first is 0) whose first input was on no fused conv's codes,
    #: and those whose input was (s8, or u8 up to 255): a conv of a residual block also called
    #: on the block's output reads that output up to code 255 and the block's input up to ``L``.
    plain_input_calls: set[int] = dataclasses.field(default_factory=set)
    coded_input_calls: set[int] = dataclasses.field(default_factory=set)
    #: The most calls of the layer on a float input in one forward.
    calls_per_forward: int = 0
    #: Of an ``nn.ReLU`` reading a residual sum, the calls within a forward that read one,
    #: and of those the calls whose sum's residual was s8 (a downsample shortcut's, no layer
    #: reading it before the add): Paddle writes that call's output on codes up to 127.
    sum_calls: set[int] = dataclasses.field(default_factory=set)
    signed_sum_calls: set[int] = dataclasses.field(default_factory=set)
    #: Of a layer called more than once in a forward, the largest ``|value|`` of each call's
    #: first input over the calibration forwards (one threshold serves every call).
    call_ranges: dict[int, float] = dataclasses.field(default_factory=dict)
    #: A layer multiplying two activations read one operand unchanged in every call while the
    #: other changed (``x @ self.w.T``: a parameter transformed in ``forward``), which Paddle
    #: Inference folds into a constant and runs as an fp32 ``mul``.
    constant_operand: bool = False
    #: Per operand of such a layer, its (shape, weighted sum of a spread sample) while every
    #: call gave the same, else ``None``; empty before the first call.
    operand_fingerprints: list[tuple[tuple[int, ...], float] | None] = dataclasses.field(default_factory=list)
    #: A layer with a weight read the same first input in every call while the model's inputs
    #: changed (a Linear of a parameter, DeBERTa's relative-position projection): Paddle
    #: Inference folds it into a constant computed in fp32.
    constant_input: bool = False
    #: The layer's ``forward`` multiplies by a tensor it computes from its weight, not by the
    #: weight itself (a masked or standardized weight), which runtimes fold into an fp32
    #: constant (:mod:`imperative_ptq.computed_weights`).
    computed_weight: bool = False
    #: The fingerprints of the inputs some calls of such a layer read unchanged while its
    #: other calls read activations (a Linear called on the tokens and on a parameter): those
    #: calls Paddle Inference folds into fp32 constants.
    constant_call_inputs: list[Fingerprint] = dataclasses.field(default_factory=list)
    #: Per call of the layer within a forward (first, second, ...): its input's fingerprint
    #: while every forward gave the same (``None`` once it changed), and in how many forwards.
    input_fingerprints: list[Fingerprint | None] = dataclasses.field(default_factory=list)
    input_forwards: list[int] = dataclasses.field(default_factory=list)
    #: Whether a Linear runs as a 1x1 conv in the Paddle export, decided earlier (by the
    #: training forward ``ImperativeQAT`` fine-tuned, whose converted model must compute it);
    #: ``None``: ``convert`` decides from the weight (``quant_layers.linear_runs_as_conv``).
    runs_as_conv: bool | None = None
    #: The forward (``CalibrationSession.forwards``) the layer was last called in, and how
    #: many times it was called in it.
    last_forward: int = 0
    forward_calls: int = 0
    #: Its first input was a softmax's output in every call that had a float one (``None``:
    #: no float input seen): :mod:`imperative_ptq.probabilities`.
    probability_input: bool | None = None

    def plain_calls(self) -> frozenset[int]:
        """The calls within a forward whose input was on no fused conv's codes, of a layer
        some of whose calls' input was (:attr:`signed_input`, :attr:`wide_input`): empty when
        every call's was, or none's; a call seen both ways counts as on codes."""
        if not (self.signed_input or self.wide_input):
            return frozenset()
        return frozenset(self.plain_input_calls - self.coded_input_calls)


class CalibrationSession:
    """Per-model calibration state: the collector, the hooked layers and the hooks.

    Hooks can be detached (statistics are kept, so thresholds can still be computed and the
    model converted) and attached again.

    Args:
        model: The model being calibrated.
        asynchronous: Reduce statistics on a worker thread.
        new_state: Makes the :class:`LayerState` of a layer found during calibration (a
            functional matmul: see :mod:`imperative_ptq.functional_matmul`) from its name and
            the layer; ``None``: no layer is added after ``quantize``.
    """

    def __init__(
        self,
        model: paddle.nn.Layer,
        asynchronous: bool,
        new_state: Callable[[str, paddle.nn.Layer], LayerState] | None = None,
    ) -> None:
        self.model = model
        self.asynchronous = asynchronous
        self.new_state = new_state
        #: The ``PTQConfig`` of the ``ImperativePTQ`` that made this session (set by it).
        self.config: Any = None
        #: Sublayer names by ``id`` while the hooks are attached (layers found then).
        self._names: dict[int, str] = {}
        self._refused: set[str] = set()
        #: Layers whose weight operand was checked (:mod:`imperative_ptq.computed_weights`),
        #: and whether such a check is running a forward (its hooks then record nothing).
        self._weights_checked: set[str] = set()
        self._rerunning = False
        self.collector: CalibrationCollector | None = None
        self.layers: list[tuple[paddle.nn.Layer, LayerState]] = []
        #: The same, by layer name.
        self._by_name: dict[str, tuple[paddle.nn.Layer, LayerState]] = {}
        self.norm_layers = [
            (name, layer) for name, layer in model.named_sublayers(include_self=True)
            if isinstance(layer, _NORM_TYPES)
        ]
        self.dropout_layers = [
            (name, layer) for name, layer in model.named_sublayers(include_self=True)
            if isinstance(layer, _DROPOUT_TYPES)
        ]
        self.root_hooks: list[Any] = []
        #: The fp32 model the quantized one was made from, kept when an algorithm in
        #: ``convert`` compares the two (bias correction, AdaRound); else ``None``.
        self.reference: paddle.nn.Layer | None = None
        #: Batches ``ImperativePTQ.calibrate`` ran, kept (up to :data:`MAX_CACHED_BATCHES`)
        #: for those algorithms while ``reference`` is set.
        self.cached_batches: list[Any] = []
        #: SmoothQuant settings still to apply before the first batch is observed.
        self.smoothing: Any = None
        #: Outputs of the hooked layers in the current forward: ``id`` -> (weak reference,
        #: layer name); and the [N, C, 1, 1] ones (global pools), kept alive until it ends.
        self._outputs: dict[int, tuple[Any, str]] = {}
        #: Outputs of the observed-only sites in the current forward, likewise.
        self._site_outputs: dict[int, tuple[Any, str]] = {}
        #: Softmax outputs of the current forward (:func:`note_probabilities`), likewise.
        self._probabilities: dict[int, Any] = {}
        self._pooled: list[tuple[paddle.Tensor, str]] = []
        #: ``id`` of an output in ``_outputs`` -> which call of its layer in the forward wrote it.
        self._output_calls: dict[int, int] = {}
        #: ``id`` of an output in ``_outputs`` -> its inplace version when its layer wrote it (a
        #: reader seeing another changed it in place: ``y.add_(x)``, ``F.relu_(y)``), and the
        #: layers warned of reading such a tensor.
        self._output_versions: dict[int, int] = {}
        self._warned_in_place: set[str] = set()
        #: Tensors hooked layers read in the current forward: ``id`` -> (weak reference,
        #: names of the layers that read it).
        self._read: dict[int, tuple[Any, tuple[str, ...]]] = {}
        #: Calls of each hooked layer on a float input in the current forward, and the layers
        #: called more than once in some forward: such a shared layer (one pool instance used
        #: on several tensors) is no earlier reader to put on codes (``earlier_readers``).
        self._calls: collections.Counter[str] = collections.Counter()
        self._called_again: set[str] = set()
        #: Outputs of the current forward that Paddle writes as s8 (``id`` -> weak reference).
        self._signed: dict[int, Any] = {}
        #: Outputs of the current forward that Paddle writes as u8 up to 255 after a residual.
        self._wide: dict[int, Any] = {}
        #: Tensors hooked layers read or wrote in the current forward: ``id`` -> (weak
        #: reference, the order in which it was first seen).
        self._seen: dict[int, tuple[Any, int]] = {}
        #: The next order number (not ``len(_seen)``: a freed tensor's ``id`` is reused, and
        #: the tensor then taking it is newer than every one seen).
        self._seen_order = itertools.count()
        #: Outputs of the current forward: ``id`` -> (weak reference, when the conv producing
        #: it, directly or through a BatchNorm, read its input (see ``_seen``), that input's
        #: ``id``).
        self._branch_inputs: dict[int, tuple[Any, int, int]] = {}
        #: The model's first input changed between two calibration calls (so a layer input
        #: that did not is a constant: ``LayerState.constant_input``); its last fingerprint.
        self.inputs_changed = False
        self._inputs_fingerprint: Fingerprint | tuple[()] = ()
        #: Forwards of the model run so far (calibration or not).
        self.forwards = 0
        #: The model's inputs seen so far: per positional input its shape (sizes that changed
        #: between calls ``None``) and dtype; ``None`` before the first call, or once a call
        #: passed something else than tensors, keyword tensors or another number of inputs
        #: (:meth:`_note_signature`).
        self.input_signature: list[tuple[list[int | None], str]] | None = None
        #: The concrete shapes of the first such call's inputs: a shape the model runs on,
        #: which the export's input-spec check tries first (``None`` with the signature).
        self.input_example: list[list[int]] | None = None
        #: Up to :data:`COMPARED_CALLS` completed calibration calls, ``(args, kwargs, float
        #: outputs)`` with their tensors copied, drawn evenly from all calls (a reservoir
        #: sample, seeded): ``convert`` compares the int8 simulation with the fp32 outputs on
        #: them (:mod:`imperative_ptq.simulation_check`). One call alone decided by its data:
        #: a voice detector's batches gave cosines from 0.76 to 0.99, silence the lowest.
        self.compared_calls: list[tuple[tuple, dict, list[paddle.Tensor]]] = []
        self._completed_calls = 0
        self._sampling = random.Random(0)
        self._call: tuple[int, tuple, dict] | None = None
        #: Whether ``convert`` compares (QAT's and the accuracy search's trial converts do not).
        self.compare_after_convert = True
        self._signature_unknown = False

    def keep_batches(self, data: Iterable[Any]) -> Iterator[Any]:
        """``data``, its batches kept for ``convert``'s algorithms while a reference is set."""
        for batch in data:
            if self.reference is not None and len(self.cached_batches) < MAX_CACHED_BATCHES:
                self.cached_batches.append(batch)
            yield batch

    @property
    def attached(self) -> bool:
        return bool(self.root_hooks)

    def add_layer(self, layer: paddle.nn.Layer, state: LayerState) -> None:
        """Puts ``layer`` under calibration with ``state`` (hooked on the next :meth:`attach`)."""
        setattr(layer, STATE_ATTR, state)
        self.layers.append((layer, state))
        self._by_name[state.name] = (layer, state)

    def add_discovered_layer(self, name: str, layer: paddle.nn.Layer) -> None:
        """Puts a layer found during calibration under calibration, hooked at once.

        Raises:
            RuntimeError: The session takes no layers after ``quantize``.
        """
        if self.new_state is None:
            raise RuntimeError("this calibration session takes no layers after quantize")
        state = self.new_state(name, layer)
        self.add_layer(layer, state)
        self._names[id(layer)] = name
        if self.attached:
            state.hook = layer.register_forward_post_hook(self.hook, prepend=True, with_kwargs=True)

    def sublayer_name(self, layer: paddle.nn.Layer) -> str | None:
        """``layer``'s name in the model (``""``: the model) while the hooks are attached."""
        return self._names.get(id(layer))

    def note_refused(self, what: str) -> bool:
        """Records that ``what`` cannot be calibrated; ``True`` the first time (warn then)."""
        first = what not in self._refused
        self._refused.add(what)
        return first

    def install(self) -> None:
        """Attaches the session to its model (:func:`calibrating_session` finds it there)."""
        setattr(self.model, SESSION_ATTR, self)

    def uninstall(self) -> None:
        """Detaches the hooks and removes the session and every layer state from the model:
        what ``convert`` leaves is a plain model again."""
        self.detach()
        for layer, _ in self.layers:
            if hasattr(layer, STATE_ATTR):
                delattr(layer, STATE_ATTR)
        if hasattr(self.model, SESSION_ATTR):
            delattr(self.model, SESSION_ATTR)

    def attach(self) -> None:
        """Registers the hooks (first among each layer's forward-post hooks)."""
        if self.attached:
            return
        self.collector = CalibrationCollector(asynchronous=self.asynchronous)
        for layer, state in self.layers:
            # First among the layer's hooks, so statistics see the layer's own output; with
            # the keyword arguments, so an input passed as layer(input=x) is seen too.
            state.hook = layer.register_forward_post_hook(self.hook, prepend=True, with_kwargs=True)
        self.root_hooks = [
            self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            self.model.register_forward_post_hook(self._after_forward),
        ]
        _ATTACHED.add(self)
        if self.new_state is not None:
            self._names = {
                id(layer): name for name, layer in self.model.named_sublayers(include_self=True)
            }
            _DISCOVERING.add(self)

    def flush(self) -> None:
        """Waits until every observed batch is in the statistics."""
        if self.collector is not None:
            self.collector.flush()

    def detach(self) -> None:
        """Removes every hook and stops the worker; statistics are kept."""
        _DISCOVERING.discard(self)
        _ATTACHED.discard(self)
        self._names = {}
        for handle in self.root_hooks:
            handle.remove()
        self.root_hooks = []
        for _, state in self.layers:
            if state.hook is not None:
                state.hook.remove()
                state.hook = None
        collector, self.collector = self.collector, None
        if collector is not None:
            collector.close()

    def _before_forward(self, layer: paddle.nn.Layer, inputs: tuple, kwargs: dict) -> None:
        """Forward-pre hook of the model: refuses numpy inputs, and a batch-norm layer (it
        would update its statistics) or a dropout layer (calibration would see dropped
        activations) in training mode, or a batch-norm layer normalizing with batch statistics
        in eval mode, before anything runs; notes the inputs' signature."""
        for position, value in enumerate(inputs):
            if isinstance(value, np.ndarray):
                raise TypeError(
                    f"{type(layer).__name__} (being calibrated) input {position} expects a "
                    f"paddle.Tensor, got numpy.ndarray: wrap it with paddle.to_tensor(...) "
                    f"(ImperativePTQ.calibrate converts arrays itself)"
                )
        tensors = [value for value in [*inputs, *kwargs.values()] if isinstance(value, paddle.Tensor)]
        if tensors and all(value.size == 0 for value in tensors):
            # (Its layers would see no value, and convert would map every input to 0.)
            raise ValueError(
                f"{type(layer).__name__} (being calibrated) got an empty batch (input shapes "
                f"{[list(value.shape) for value in tensors]}): it calibrates nothing. Check the "
                f"data loader (a batch size of 0, a slice past the end of the data)"
            )
        for name, norm in self.norm_layers:
            if norm.training:
                raise CalibrationError(
                    f"{name or type(layer).__name__} is in training mode: calibration would "
                    f"update its batch-norm statistics. Call model.eval() before calibrating."
                )
        for name, norm in self.norm_layers:
            # (The legacy paddle.nn.BatchNorm uses its running statistics in eval mode
            # whatever its use_global_stats says.)
            if isinstance(norm, _BATCH_STATISTICS_NORMS) and norm._use_global_stats is False:
                raise CalibrationError(
                    f"{name or type(layer).__name__} normalizes each batch with its own "
                    f"statistics in eval mode too (use_global_stats=False): calibration would "
                    f"update its running statistics, and Paddle Inference and ONNX Runtime "
                    f"normalize with the running statistics, so no export computes what the "
                    f"model does. Build it with use_global_stats=None (the default) to quantize it."
                )
        for name, dropout in self.dropout_layers:
            if dropout.training:
                raise CalibrationError(
                    f"{name or type(layer).__name__} ({type(dropout).__name__}) is in training "
                    f"mode: calibration would see dropped activations. Call model.eval() "
                    f"before calibrating."
                )
        self.collector.raise_pending_error()
        self._outputs, self._site_outputs, self._pooled, self._read, self._signed, self._wide = (
            {}, {}, [], {}, {}, {}
        )
        self._probabilities = {}
        self._output_calls, self._output_versions = {}, {}
        self._seen, self._branch_inputs, self._seen_order = {}, {}, itertools.count()
        self._calls.clear()
        self.forwards += 1
        if not self.inputs_changed:
            first = next((value for value in inputs if isinstance(value, paddle.Tensor)), None)
            if first is not None and first.size:
                inputs_print = fingerprint(first)
                if self._inputs_fingerprint and inputs_print != self._inputs_fingerprint:
                    self.inputs_changed = True
                self._inputs_fingerprint = inputs_print
        self._note_signature(inputs, kwargs)
        slot = self._completed_calls
        if slot >= COMPARED_CALLS:
            slot = self._sampling.randrange(self._completed_calls + 1)
        self._call = None if slot >= COMPARED_CALLS else (
            slot, tuple(_copied(value) for value in inputs), {key: _copied(value) for key, value in kwargs.items()}
        )

    def _note_signature(self, args: tuple, kwargs: dict) -> None:
        """Merges the model's inputs' shapes and dtypes into :attr:`input_signature` (the input
        spec an export infers when given none)."""
        if self._signature_unknown:
            return
        if not args or kwargs or not all(isinstance(value, paddle.Tensor) for value in args):
            self._signature_unknown, self.input_signature, self.input_example = True, None, None
            return
        seen = [(list(value.shape), str(value.dtype).replace("paddle.", "")) for value in args]
        if self.input_signature is None:
            self.input_signature = seen
            self.input_example = [list(shape) for shape, _ in seen]
            return
        if [(len(shape), dtype) for shape, dtype in seen] != [
            (len(shape), dtype) for shape, dtype in self.input_signature
        ]:
            self._signature_unknown, self.input_signature, self.input_example = True, None, None
            return
        self.input_signature = [
            ([size if size == new else None for size, new in zip(shape, new_shape)], dtype)
            for (shape, dtype), (new_shape, _) in zip(self.input_signature, seen)
        ]

    def _after_forward(self, layer: paddle.nn.Layer, inputs: Any, outputs: Any) -> None:
        returned = list(returned_tensors(outputs))
        self._completed_calls += 1
        if self._call is not None:
            slot, args, kwargs = self._call
            kept = (args, kwargs, [_copied(value) for value in returned])
            if slot < len(self.compared_calls):
                self.compared_calls[slot] = kept
            else:
                self.compared_calls.append(kept)
            self._call = None
        for value in returned:
            source = self.source_of(value)
            if source is not None:
                self._by_name[source][1].model_output = True
        again = {name for name, calls in self._calls.items() if calls > 1} - self._called_again
        if again:  # (rare: only then can a recorded earlier reader have become a shared one)
            self._called_again |= again
            for _, state in self.layers:
                state.earlier_readers -= again
        self._calls.clear()
        self._outputs, self._site_outputs, self._pooled, self._read, self._signed, self._wide = (
            {}, {}, [], {}, {}, {}
        )
        self._probabilities = {}
        self._output_calls, self._output_versions = {}, {}
        self._seen, self._branch_inputs, self._seen_order = {}, {}, itertools.count()
        self.collector.end_forward()

    def read_probabilities(self, value: Any) -> bool:
        """Whether ``value`` is a softmax output of the current forward (noted by
        :func:`note_probabilities`)."""
        noted = self._probabilities.get(id(value))
        return noted is not None and noted() is value

    def source_of(self, value: paddle.Tensor) -> str | None:
        """The hooked layer of the current forward whose output ``value`` is: the same tensor,
        or (for a rank-2 ``value``) the same values as a global pool's ``[N, C, 1, 1]`` output,
        which ``flatten``, ``reshape`` and an inference-mode dropout pass on."""
        entry = self._outputs.get(id(value))
        if entry is not None and entry[0]() is value:
            return entry[1]
        if value.ndim == 2:
            for pooled, name in reversed(self._pooled):
                if list(pooled.shape[:2]) == list(value.shape) and bool(
                    paddle.equal_all(pooled.reshape(value.shape), value)
                ):
                    return name
        return None

    def _changed_in_place(self, output: paddle.Tensor) -> bool:
        """Whether an in-place op changed a hooked layer's ``output`` since the layer wrote it."""
        return self._output_versions.get(id(output), 0) != output._inplace_version()

    def _warn_in_place(self, reader: str, source: str) -> None:
        """Warns (once per layer) that ``reader`` reads ``source``'s output changed in place."""
        if reader in self._warned_in_place:
            return
        self._warned_in_place.add(reader)
        logger.warning(
            "layer %r reads the output of %r after an in-place op changed it (e.g. y.add_(x), "
            "F.relu_(y), paddle.assign(..., output=y), y[...] = v): calibration cannot see that "
            "op, so the int8 simulation and the exports may compute different things there "
            "(measured up to 0.63 of the largest output apart). Write it out of place "
            "(y = F.relu(y + x)) before quantizing", reader, source,
        )

    def _note_read(self, value: paddle.Tensor, name: str) -> None:
        entry = self._read.get(id(value))
        names = entry[1] if entry is not None and entry[0]() is value else ()
        self._read[id(value)] = (weakref.ref(value), names + (name,))

    def _first_seen(self, value: paddle.Tensor) -> int:
        """When ``value`` was first seen by a hook in the current forward (now, if never)."""
        entry = self._seen.get(id(value))
        if entry is not None and entry[0]() is value:
            return entry[1]
        order = next(self._seen_order)
        self._seen[id(value)] = (weakref.ref(value), order)
        return order

    def _note_branch_input(
        self, layer: paddle.nn.Layer, first: paddle.Tensor, output: paddle.Tensor
    ) -> None:
        """Records when the conv producing ``output`` read its input: a BatchNorm passes on
        its conv's (``find_residual_add`` tells a residual block's projection by it)."""
        entry = self._branch_inputs.get(id(first))
        if isinstance(layer, _NORM_TYPES) and entry is not None and entry[0]() is first:
            order, source = entry[1], entry[2]
        else:
            order, source = self._first_seen(first), id(first)
        self._first_seen(output)
        self._branch_inputs[id(output)] = (weakref.ref(output), order, source)

    def _note_residual_add(
        self, value: paddle.Tensor, gives_scale: bool, reader: str
    ) -> ResidualAdd | None:
        """Records the residual add ``value`` is the sum (or the sum's ReLU) of, if any, on the
        state of the layer whose output is its residual operand, and returns it.

        ``reader``: the hooked layer reading ``value`` (``ResidualAdd.sum_reader``).
        ``gives_scale``: the reader gives the sum a scale (it quantizes its input, or it is an
        ``nn.ReLU``, whose output threshold the conv's fused ReLU writes); ``reader``, its name
        (:attr:`ResidualAdd.sum_reader`). Paddle runs the fused
        conv int8 only with one; without (a network's last ``F.relu(x + y)``, read only by a
        global pool) the export keeps the convs out of the add, so a downsample shortcut stays
        float and is not recorded. An identity shortcut is recorded either way: its int8
        producer wrote it as codes, which the add reads, fused or not.
        """
        outputs = [(entry[0](), entry[1]) for entry in self._outputs.values()]
        outputs = [(tensor, name) for tensor, name in outputs if tensor is not None]
        readers = {
            key: names for key, (ref, names) in self._read.items() if ref() is not None
        }
        signed = frozenset(key for key, ref in self._signed.items() if ref() is not None)
        live = [(key, entry) for key, entry in self._branch_inputs.items() if entry[0]() is not None]
        branch_inputs = {key: entry[1] for key, entry in live}
        branch_sources = {key: entry[2] for key, entry in live}
        written = {id(tensor) for tensor, _ in outputs}
        inputs = [
            tensor for tensor in (ref() for ref, _ in self._read.values())
            if tensor is not None and id(tensor) not in written
        ]
        with paddle.no_grad():
            found = find_residual_add(value, outputs, readers, signed, branch_inputs, inputs, branch_sources)
        if found is None or (not gives_scale and not found.residual_readers):
            return None
        fused = next((layer for layer, state in self.layers if state.name == found.fused), None)
        if fused is not None and _activation(fused):
            # No conv to fuse the add into, and likely no add at all: an activation's output
            # plus its input can equal a scaled copy of it (``relu(relu(x) + x)`` is
            # ``2 * relu(x)``; measured, taken for a residual: a conv reading ``relu(x) * 2``
            # simulated on codes up to 255 where both runtimes clip at 127, 0.29 off).
            return None
        changed = [
            name for tensor, name in outputs
            if name in (found.fused, found.residual) and self._changed_in_place(tensor)
        ]
        if changed:
            self._warn_in_place(reader, changed[0])
        found = dataclasses.replace(found, sum_reader=reader)
        for layer, state in self.layers:
            if state.name == found.residual:
                state.residual_adds.add(found)
        return found

    def _note_output(self, name: str, value: paddle.Tensor) -> None:
        # Moved to the end: the order of ``_outputs`` is the order the outputs were computed
        # in, even where a freed tensor's ``id`` is reused.
        self._outputs.pop(id(value), None)
        self._output_calls.pop(id(value), None)
        self._output_versions[id(value)] = value._inplace_version()
        self._outputs[id(value)] = (weakref.ref(value), name)
        if value.ndim == 4 and value.shape[2] == 1 and value.shape[3] == 1:
            self._pooled.append((value, name))

    def hook(self, layer: paddle.nn.Layer, inputs: tuple, kwargs: dict, outputs: Any) -> None:
        """Forward-post hook of every quantized layer."""
        if self._rerunning:  # a layer's forward run again to see which weight it reads
            return
        state: LayerState = getattr(layer, STATE_ATTR)
        if state.weight_quantizer is not None and state.name not in self._weights_checked:
            self._weights_checked.add(state.name)
            if may_compute_its_weight(layer):
                self._rerunning = True
                try:
                    state.computed_weight = computes_its_weight(layer, inputs, kwargs)
                except Exception as error:  # a forward that cannot run twice: assume its weight
                    logger.info("%s: could not check which weight its forward multiplies by "
                                "(%s: %s); calibrated as its own", state.name, type(error).__name__, error)
                finally:
                    self._rerunning = False
        collector = self.collector
        info = PTQRegistry.layer_info(layer)
        if info is not None and info.observed_only:
            self._observe_only(state, inputs, outputs, notes_reads=getattr(layer, "kind", "") == "concat")
            return
        inputs_quantizer = state.input_quantizer
        first = first_input(layer, inputs, kwargs)
        if _is_float_tensor(first):
            self._first_seen(first)
            state.probability_input = self.read_probabilities(first) and state.probability_input is not False
            source = self.source_of(first)
            if source is not None and self._changed_in_place(first):
                self._warn_in_place(state.name, source)
            site = self._site_outputs.get(id(first))
            if site is not None and site[0]() is first:
                state.site_sources.add(site[1])
            if source is not None:
                state.input_sources.add(source)
                entry = self._outputs.get(id(first))
                source_call = self._output_calls.get(id(first)) if entry and entry[0]() is first else None
                if source_call is not None:
                    state.input_source_calls.add((source, source_call))
            else:
                found = self._note_residual_add(
                    first, inputs_quantizer is not None or isinstance(layer, paddle.nn.ReLU),
                    state.name,
                )
                # The ReLU after a residual conv: Paddle writes it s8 after an s8 residual (a
                # downsample shortcut), else u8 up to 255, also after a u8 residual no layer
                # quantizes (DLA's max-pool shortcut, which Paddle adds in float; with
                # convert's pooled codes, such a block went from 1.1% of the largest logit off
                # Paddle Inference to 1.6e-7). It is this layer's output (an nn.ReLU reading
                # the sum), or its input (a conv reading F.relu of the sum).
                after = None
                if found is not None and found.after_relu:
                    after = first
                elif found is not None and isinstance(layer, paddle.nn.ReLU):
                    after = outputs if _is_float_tensor(outputs) else None
                    state.sum_calls.add(self._calls[state.name])
                    if not found.residual_readers:
                        state.signed_sum_calls.add(self._calls[state.name])
                if after is not None:
                    unsigned = found.residual_readers or relu_or_its_max_pool(found.residual, self._by_name)
                    kind = self._wide if unsigned else self._signed
                    kind[id(after)] = weakref.ref(after)
            signed, wide = self._signed.get(id(first)), self._wide.get(id(first))
            on_codes = False
            if signed is not None and signed() is first:
                state.signed_input = on_codes = True
            if wide is not None and wide() is first:
                state.wide_input = on_codes = True
            read = self._read.get(id(first))
            if source is None and on_codes and read is not None and read[0]() is first:
                state.earlier_readers.update(
                    name for name in read[1] if name != state.name and name not in self._called_again
                )
            call = self._calls[state.name]
            (state.coded_input_calls if on_codes else state.plain_input_calls).add(call)
            state.calls_per_forward = max(state.calls_per_forward, call + 1)
            self._calls[state.name] += 1
            self._note_read(first, state.name)
        if inputs_quantizer is not None:
            if _is_float_tensor(first):
                state.input_rank = max(state.input_rank, first.ndim)
                if state.weight_quantizer is not None and state.second_input_quantizer is None:
                    self._note_input_fingerprint(state, first)
                sample = collector.sample(first, inputs_quantizer.uses_signed_values)
                collector.submit(inputs_quantizer, [sample], state.name)
                if first.size:
                    # The sign decides how x86 runs the input (u8 or s8): see targets.py. A
                    # layer called more than once also notes each call's range (one sync).
                    call = self._calls[state.name] - 1
                    with paddle.no_grad():
                        if call > 0 or state.calls_per_forward > 1 or self.forwards == 1:
                            minimum, largest = paddle.stack([paddle.min(first), paddle.max(paddle.abs(first))]).numpy().tolist()
                            state.call_ranges[call] = max(state.call_ranges.get(call, 0.0), largest)
                        else:
                            minimum = float(paddle.min(first))
                        inputs_quantizer.observe_minimum(minimum)
        output_index = None if info is None else info.output_index
        if output_index is not None and isinstance(outputs, (tuple, list)) and len(outputs) > output_index:
            outputs = outputs[output_index]  # an RNN's output sequence, beside its final states
        second = state.second_input_quantizer
        if second is not None and len(inputs) > 1 and _is_float_tensor(inputs[1]):
            sample = collector.sample(inputs[1], second.uses_signed_values)
            collector.submit(second, [sample], state.name)
            if _is_float_tensor(first):
                _note_operands(state, (first, inputs[1]))
        if _is_float_tensor(outputs):
            self._note_output(state.name, outputs)
            if _is_float_tensor(first):
                self._output_calls[id(outputs)] = self._calls[state.name] - 1
            if _is_float_tensor(first):
                self._note_branch_input(layer, first, outputs)
            sample = collector.sample(outputs, state.output_quantizer.uses_signed_values)
            collector.submit(state.output_quantizer, [sample], state.name)
        elif not state.output_skipped:
            state.output_skipped = True
            logger.warning(
                "layer %r (%s) returned %s, not a floating-point tensor: its output is not "
                "calibrated", state.name, type(layer).__name__, _describe(outputs),
            )

    def _note_input_fingerprint(self, state: LayerState, first: paddle.Tensor) -> None:
        """Updates ``state.constant_input`` and ``state.constant_call_inputs`` from one call's
        first input. Each call of the layer within a forward (its first, second, ... call) is
        followed on its own, and sampled until its input changes, as :func:`_note_operands`
        does: a layer called on activations and on a parameter (DeBERTa-v2's projections
        shared by the tokens and the relative positions) has one constant call."""
        if state.last_forward != self.forwards:
            state.last_forward, state.forward_calls = self.forwards, 0
        call = state.forward_calls
        state.forward_calls += 1
        prints, seen = state.input_fingerprints, state.input_forwards
        if call == len(prints):
            prints.append(fingerprint(first))
            seen.append(1)
        elif prints[call] is not None:
            if fingerprint(first) == prints[call]:
                seen[call] += 1
            else:
                prints[call] = None
        constant = [
            self.inputs_changed and known is not None and count > 1 for known, count in zip(prints, seen)
        ]
        state.constant_input = all(constant)
        state.constant_call_inputs = (
            [] if state.constant_input else [known for known, is_constant in zip(prints, constant) if is_constant]
        )

    def _observe_only(self, state: LayerState, inputs: tuple, outputs: Any, notes_reads: bool = False) -> None:
        """Statistics of an observed-only layer (``LayerInfo.observed_only``): its first two
        inputs where it has quantizers for them, and its output; of the graph only the layer
        whose output it reads is recorded (its own ``input_sources``) and, with
        ``notes_reads`` (a concat), that it read each input, so that a residual add of one
        of them later sees it read before the add (DLA's root adding its first child); the
        layers around it calibrate as without it."""
        collector = self.collector
        roles = [(state.input_quantizer, inputs[0] if inputs else None),
                 (state.second_input_quantizer, inputs[1] if len(inputs) > 1 else None),
                 (state.output_quantizer, outputs)]
        for quantizer, value in roles:
            if quantizer is not None and _is_float_tensor(value):
                sample = collector.sample(value, quantizer.uses_signed_values)
                collector.submit(quantizer, [sample], state.name)
        first = inputs[0] if inputs else None
        if _is_float_tensor(first):
            # Which layer's output it reads in float (an int8 head pool of the same tensor
            # would make Paddle give it codes, quant_pool.int8_head_pools).
            source = self.source_of(first)
            if source is not None:
                state.input_sources.add(source)
        if notes_reads:
            for value in inputs:
                if _is_float_tensor(value):
                    self._note_read(value, state.name)
            for value in inputs[1:]:
                source = self.source_of(value) if _is_float_tensor(value) else None
                if source is not None:
                    state.joined_sources.add(source)
        if _is_float_tensor(outputs):
            self._site_outputs[id(outputs)] = (weakref.ref(outputs), state.name)
        if state.input_quantizer is not None and _is_float_tensor(first) and first.size:
            with paddle.no_grad():  # the sign: whether Paddle would read it u8 or s8
                state.input_quantizer.observe_minimum(float(paddle.min(first)))

    def __deepcopy__(self, memo: dict) -> "CalibrationSession":
        # Paddle's hook handles hold weak references to the original model's hook dicts, so a
        # copy with hooks attached would remove the original's hooks (and keep its own).
        if self.attached:
            raise TypeError(
                "cannot deep-copy a model while its calibration hooks are attached: call "
                "ImperativePTQ.remove_hooks() (statistics are kept) or convert() first"
            )
        copied = CalibrationSession.__new__(CalibrationSession)
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return copied

    def quantizers(self) -> dict[str, BaseQuantizer]:
        """Activation quantizers keyed ``"<layer>/<role>"`` (weights are re-sampled, not kept)."""
        found: dict[str, BaseQuantizer] = {}
        for _, state in self.layers:
            if state.input_quantizer is not None:
                found[f"{state.name}/input"] = state.input_quantizer
            if state.second_input_quantizer is not None:
                found[f"{state.name}/second_input"] = state.second_input_quantizer
            found[f"{state.name}/output"] = state.output_quantizer
        return found


def _note_operands(state: LayerState, operands: tuple[paddle.Tensor, paddle.Tensor]) -> None:
    """Updates ``state.constant_operand`` from one call's two operands: set once one operand
    kept its fingerprint (shape and a weighted sum of a spread sample) over every call while
    the other changed. An operand seen to change is not sampled again (measured: summing both whole
    operands at every call cost 17% of a BERT encoder's calibration time)."""
    previous = state.operand_fingerprints or [(), ()]
    prints = [None if old is None else fingerprint(value) for value, old in zip(operands, previous)]
    if state.operand_fingerprints:
        prints = [new if new == old else None for new, old in zip(prints, previous)]
    state.operand_fingerprints = prints
    state.constant_operand = sum(p is None for p in prints) == 1


def returned_tensors(outputs: Any) -> Iterator[paddle.Tensor]:
    """The float tensors of a forward's result, in tuples, lists and dict values at any
    depth."""
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, (tuple, list)):
        for value in outputs:
            yield from returned_tensors(value)
    elif _is_float_tensor(outputs):
        yield outputs


def _copied(value: Any) -> Any:
    """A copy of a tensor (the caller may fill its buffer with the next batch); anything
    else as it is."""
    return value.detach().clone() if isinstance(value, paddle.Tensor) else value


def _is_float_tensor(value: Any) -> bool:
    return isinstance(value, paddle.Tensor) and paddle.is_floating_point(value)


def _describe(value: Any) -> str:
    if isinstance(value, paddle.Tensor):
        return f"a {value.dtype} tensor"
    return f"a {type(value).__name__}"


#: Sessions whose hooks are attached and that take layers found during calibration.
_DISCOVERING: "weakref.WeakSet[CalibrationSession]" = weakref.WeakSet()
#: Sessions whose hooks are attached.
_ATTACHED: "weakref.WeakSet[CalibrationSession]" = weakref.WeakSet()


def note_probabilities(value: Any) -> None:
    """Records ``value`` (a softmax's output) in every attached session's current forward: a
    hooked layer reading it as its first input reads probabilities
    (:attr:`LayerState.probability_input`)."""
    if _ATTACHED and _is_float_tensor(value):
        for session in list(_ATTACHED):
            session._probabilities[id(value)] = weakref.ref(value)


def noted_as_probabilities(value: Any) -> bool:
    """Whether an attached session noted ``value`` with :func:`note_probabilities` in its
    current forward."""
    return any(session.read_probabilities(value) for session in list(_ATTACHED))


def any_discovering() -> bool:
    """Whether some attached session takes layers found during calibration."""
    return bool(_DISCOVERING)


def discovering_session(layer: paddle.nn.Layer) -> CalibrationSession | None:
    """The attached session whose model contains ``layer`` and takes layers found during
    calibration, else ``None``."""
    for session in list(_DISCOVERING):
        if session.sublayer_name(layer) is not None:
            return session
    return None


def calibrating_session(model: paddle.nn.Layer) -> CalibrationSession | None:
    """The session of a model returned by ``quantize`` and not yet converted, else ``None``."""
    return getattr(model, SESSION_ATTR, None)


def hooked_states(model: paddle.nn.Layer) -> list[LayerState]:
    """The :class:`LayerState` of every hooked layer of ``model``, in sublayer order (empty
    for a model that is not being calibrated)."""
    states = (getattr(layer, STATE_ATTR, None) for _, layer in model.named_sublayers())
    return [state for state in states if state is not None]
