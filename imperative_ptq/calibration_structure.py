"""What calibration saw of a model's graph beside its statistics: the calibration table's
optional ``"structure"`` section.

``convert`` (:mod:`imperative_ptq.convert`) decides more than thresholds from the calibration
forwards: which layer each layer read its input from (a classifier head's int8 pool, a downsample
BatchNorm's conv), the residual adds Paddle Inference fuses into an int8 conv
(:mod:`imperative_ptq.quant_residual`), inputs that Paddle writes as s8 or as u8 codes up to 255
after such a conv, and the largest input rank (a Linear on a rank > 3 input runs fp32). A
table without them converts, and exports, a different model than the calibrated one; with them,
a model that loads the table converts to the same simulation and the same program.

Format, one entry per layer that has an observation (those left out have none)::

    "structure": {
      "layer1.0.relu": {"input_sources": ["maxpool"], "input_rank": 4,
                        "residual_adds": [{"fused": "layer1.0.bn2",
                                           "residual_readers": ["layer1.0.conv1"],
                                           "residual_top": 255}]},
      "layer2.0.conv1": {"input_sources": ["layer1.1.relu"], "input_rank": 4,
                         "wide_input": true}, ...}

``input_sources``: hooked layers whose output the layer read as its first input;
``joined_sources``: of a functional concat, those whose output it joined as a later input;
``site_sources``: the observed-only sites (a functional concat) whose output the layer read as
its first input;
``input_source_calls``: ``[source, call]`` pairs naming which call within a forward (the first
is 0) of each source wrote what was read, kept for sources with ``sum_calls``;
``input_rank``: the largest rank of that input (0 or absent: none seen); ``signed_input`` /
``wide_input``: that input was written s8 / u8 up to code 255 by a fused residual conv;
``calls_per_forward``: how many times a forward called a layer with per-call observations;
``sum_calls``: of an ``nn.ReLU`` called more than once in a forward that read a residual sum in
some of its calls or in more than one (a residual block applied more than once, a ReLU shared
with other adds), the calls that read one; ``signed_sum_calls``: of those, the calls whose sum's
residual was s8 (a projection block's), whose codes end at 127;
``plain_input_calls``: of such a layer with a ``signed_input`` / ``wide_input``, the calls (the
first is 0) whose input was on no such codes (a conv of a residual block called again on the
block's output);
``constant_operand``: a matmul of two activations read one of them unchanged in every call
(a parameter transformed in ``forward``, which Paddle Inference folds into an fp32 ``mul``);
``constant_input``: a layer with a weight read the same input in every call while the model's
inputs changed (a Linear of a parameter, which Paddle Inference folds into an fp32 constant);
``computed_weight``: a layer whose ``forward`` multiplies by a tensor it computes from its
weight (``self.weight * self.mask``), which runtimes fold into an fp32 constant;
``constant_call_inputs``: the fingerprints (``[shape, weighted sample sum]``,
:mod:`imperative_ptq.fingerprint`) of the inputs that some calls of such a layer read unchanged
while its other calls read activations (a Linear called on the tokens and on a parameter);
``model_output``: the model returned the layer's output (one of its heads when no layer with a
weight reads it); ``earlier_readers``: where no hooked layer wrote the layer's first input and a fused residual
conv writes it as codes, the hooked layers that read it before the layer in a forward (an
``F.relu`` sum read by a pool, then by a conv); ``residual_adds``: the adds whose residual
operand was the layer's output
(:class:`~imperative_ptq.quant_residual.ResidualAdd`, its ``residual`` being the layer itself),
or, with ``"residual_is_input": true``, the layer's first input (an unhooked tensor such as an
``F.relu`` output, the layer being its first reader); an add's optional ``"sum_reader"``: the
layer that read the sum or its ReLU (the block's ``nn.ReLU``).
Every name must be a layer of the table's ``layers``.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

from .quant_residual import ResidualAdd
from .session import LayerState

__all__ = ["STRUCTURE", "apply_structure", "check_structure", "structure_of"]

#: Top-level key of the section in a table file.
STRUCTURE = "structure"
#: Largest tensor rank Paddle supports.
_MAX_RANK = 9
#: Largest code a residual is read up to (a u8 tensor).
_MAX_TOP = 255
_FLAGS = (
    "signed_input", "wide_input", "constant_operand", "constant_input", "computed_weight", "model_output",
)
_ADD_KEYS = ("fused", "residual_readers", "residual_top")
_ADD_KEYS_OPTIONAL = {*_ADD_KEYS, "residual_is_input", "sum_reader"}
_KEYS = (
    "input_sources", "joined_sources", "site_sources", "input_rank", *_FLAGS, "constant_call_inputs", "residual_adds", "earlier_readers",
    "plain_input_calls", "calls_per_forward", "input_source_calls", "sum_calls", "signed_sum_calls",
)

#: A layer's entry in the section (JSON-ready).
LayerStructure = dict[str, Any]


def structure_of(states: Iterable[LayerState]) -> dict[str, LayerStructure]:
    """The section for ``states``: each layer's observations, those at their default left out."""
    states = list(states)
    # Per-call observations are kept where convert reads them: a ReLU reading several sums in
    # a forward (a residual block applied more than once) and the layers reading it.
    summing_again = {state.name for state in states if state.calls_per_forward > 1 and len(state.sum_calls) > 1}
    # And which calls of a ReLU called more than once read a sum (all, or only some).
    summing = {state.name for state in states if state.calls_per_forward > 1 and state.sum_calls}
    section: dict[str, LayerStructure] = {}
    for state in states:
        entry: LayerStructure = {}
        if state.input_sources:
            entry["input_sources"] = sorted(state.input_sources)
        if state.joined_sources:
            entry["joined_sources"] = sorted(state.joined_sources)
        if state.site_sources:
            entry["site_sources"] = sorted(state.site_sources)
        source_calls = sorted(pair for pair in state.input_source_calls if pair[0] in summing_again)
        if source_calls:
            entry["input_source_calls"] = [[source, int(call)] for source, call in source_calls]
        if state.input_rank:
            entry["input_rank"] = int(state.input_rank)
        if state.earlier_readers:
            entry["earlier_readers"] = sorted(state.earlier_readers)
        for flag in _FLAGS:
            if getattr(state, flag):
                entry[flag] = True
        plain_calls = state.plain_calls()
        if plain_calls or state.name in summing:
            entry["calls_per_forward"] = int(state.calls_per_forward)
        if state.name in summing:
            entry["sum_calls"] = sorted(int(call) for call in state.sum_calls)
            if state.signed_sum_calls:
                entry["signed_sum_calls"] = sorted(int(call) for call in state.signed_sum_calls)
        if plain_calls:
            entry["plain_input_calls"] = sorted(plain_calls)
        if state.constant_call_inputs:
            entry["constant_call_inputs"] = [
                [list(shape), float(value)] for shape, value in state.constant_call_inputs
            ]
        if state.residual_adds:
            adds = sorted(state.residual_adds, key=lambda add: (add.fused, add.residual_readers))
            entry["residual_adds"] = [
                {
                    "fused": add.fused,
                    "residual_readers": list(add.residual_readers),
                    "residual_top": int(add.residual_top),
                    **({"residual_is_input": True} if add.residual_is_input else {}),
                    **({"sum_reader": add.sum_reader} if add.sum_reader else {}),
                }
                for add in adds
            ]
        if entry:
            section[state.name] = entry
    return section


def apply_structure(states: Iterable[LayerState], section: Mapping[str, LayerStructure]) -> None:
    """Sets every state's observations to those of a validated section (:func:`check_structure`),
    replacing what calibration batches run before may have recorded; a layer the section leaves
    out has none."""
    for state in states:
        entry = section.get(state.name, {})
        state.input_sources = set(entry.get("input_sources", ()))
        state.joined_sources = set(entry.get("joined_sources", ()))
        state.site_sources = set(entry.get("site_sources", ()))
        state.input_source_calls = {(source, int(call)) for source, call in entry.get("input_source_calls", ())}
        state.input_rank = int(entry.get("input_rank", 0))
        state.earlier_readers = set(entry.get("earlier_readers", ()))
        state.signed_input = bool(entry.get("signed_input", False))
        state.wide_input = bool(entry.get("wide_input", False))
        state.plain_input_calls = set(entry.get("plain_input_calls", ()))
        state.coded_input_calls = set()
        state.calls_per_forward = int(entry.get("calls_per_forward", 0))
        state.sum_calls = set(entry.get("sum_calls", ()))
        state.signed_sum_calls = set(entry.get("signed_sum_calls", ()))
        state.constant_operand = bool(entry.get("constant_operand", False))
        state.constant_input = bool(entry.get("constant_input", False))
        state.computed_weight = bool(entry.get("computed_weight", False))
        state.model_output = bool(entry.get("model_output", False))
        state.constant_call_inputs = [
            (tuple(shape), float(value)) for shape, value in entry.get("constant_call_inputs", ())
        ]
        state.residual_adds = {
            ResidualAdd(
                add["fused"], state.name, tuple(add["residual_readers"]), add["residual_top"],
                add.get("residual_is_input", False), sum_reader=add.get("sum_reader", ""),
            )
            for add in entry.get("residual_adds", ())
        }


def check_structure(path: str | os.PathLike, section: Any, layer_names: Iterable[str]) -> None:
    """Validates a table file's section.

    Args:
        path: The file, for error messages.
        section: The section as read from JSON.
        layer_names: The layers of the table (every name in the section must be one).

    Raises:
        ValueError: Naming the file and the layer: a layer or referenced name the table lacks,
            an unknown key, or a value of the wrong type or range.
    """
    if not isinstance(section, dict):
        raise ValueError(f"{path}: {STRUCTURE!r} must map layer names to objects, got {section!r}")
    names = set(layer_names)
    for name, entry in section.items():
        where = f"{path}: {STRUCTURE!r} of layer {name!r}"
        if name not in names:
            raise ValueError(f"{path}: {STRUCTURE!r} names layer {name!r}, which 'layers' lacks")
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object, got {entry!r}")
        unknown = sorted(set(entry) - set(_KEYS))
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; known: {list(_KEYS)}")
        _check_names(where, "input_sources", entry.get("input_sources", []), names)
        _check_names(where, "joined_sources", entry.get("joined_sources", []), names)
        _check_names(where, "site_sources", entry.get("site_sources", []), names)
        _check_names(where, "earlier_readers", entry.get("earlier_readers", []), names)
        rank = entry.get("input_rank", 0)
        if not _is_int(rank) or not 0 <= rank <= _MAX_RANK:
            raise ValueError(f"{where}: input_rank must be an integer 0..{_MAX_RANK}, got {rank!r}")
        for flag in _FLAGS:
            if not isinstance(entry.get(flag, False), bool):
                raise ValueError(f"{where}: {flag} must be true or false, got {entry[flag]!r}")
        _check_fingerprints(where, entry.get("constant_call_inputs", []))
        _check_calls(where, entry)
        _check_source_calls(where, entry.get("input_source_calls", []), names)
        adds = entry.get("residual_adds", [])
        if not isinstance(adds, list):
            raise ValueError(f"{where}: residual_adds must be a list, got {adds!r}")
        for add in adds:
            if not isinstance(add, dict) or not set(_ADD_KEYS) <= set(add) <= _ADD_KEYS_OPTIONAL:
                raise ValueError(
                    f"{where}: each residual add must be an object with the keys "
                    f"{list(_ADD_KEYS)} (and optionally 'residual_is_input', 'sum_reader'), "
                    f"got {add!r}"
                )
            if not isinstance(add.get("residual_is_input", False), bool):
                raise ValueError(
                    f"{where}: residual_is_input must be true or false, "
                    f"got {add['residual_is_input']!r}"
                )
            _check_names(where, "residual add 'fused'", [add["fused"]], names)
            _check_names(where, "residual_readers", add["residual_readers"], names)
            if "sum_reader" in add:
                _check_names(where, "residual add 'sum_reader'", [add["sum_reader"]], names)
            top = add["residual_top"]
            if not _is_int(top) or not 0 < top <= _MAX_TOP:
                raise ValueError(
                    f"{where}: residual_top must be an integer 1..{_MAX_TOP}, got {top!r}"
                )


def _check_calls(where: str, entry: Mapping[str, Any]) -> None:
    """``calls_per_forward`` must be an integer of at least 2; ``sum_calls`` and
    ``plain_input_calls`` call indices below it, the latter given with ``signed_input`` or
    ``wide_input``; ``signed_sum_calls`` calls of ``sum_calls``."""
    if not {"plain_input_calls", "calls_per_forward", "sum_calls", "signed_sum_calls"} & set(entry):
        return
    calls, count = entry.get("plain_input_calls"), entry.get("calls_per_forward")
    if not _is_int(count) or count < 2:
        raise ValueError(f"{where}: calls_per_forward must be an integer of at least 2, got {count!r}")
    sums = entry.get("sum_calls", [])
    if not isinstance(sums, list) or not all(_is_int(call) and 0 <= call < count for call in sums):
        raise ValueError(f"{where}: sum_calls must list calls 0..{count - 1}, got {sums!r}")
    signed = entry.get("signed_sum_calls", [])
    if not isinstance(signed, list) or not all(_is_int(call) and call in sums for call in signed):
        raise ValueError(f"{where}: signed_sum_calls must list calls of sum_calls {sums!r}, got {signed!r}")
    if calls is None:
        return
    if not (
        isinstance(calls, list) and calls and all(_is_int(call) and 0 <= call < count for call in calls)
        and len(set(calls)) < count
    ):
        raise ValueError(
            f"{where}: plain_input_calls must list some but not all calls 0..{count - 1}, got {calls!r}"
        )
    if not (entry.get("signed_input") or entry.get("wide_input")):
        raise ValueError(f"{where}: plain_input_calls needs signed_input or wide_input")


def _check_source_calls(where: str, values: Any, names: set[str]) -> None:
    """``values`` must be a list of ``[layer name, call index]`` pairs."""
    if not isinstance(values, list) or not all(
        isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
        and _is_int(value[1]) and value[1] >= 0
        for value in values
    ):
        raise ValueError(
            f"{where}: input_source_calls must be a list of [layer name, call index] pairs, got {values!r}"
        )
    _check_names(where, "input_source_calls", [value[0] for value in values], names)


def _check_fingerprints(where: str, values: Any) -> None:
    """``values`` must be a list of ``[shape, number]`` fingerprints."""
    for value in values if isinstance(values, list) else [None]:
        if not (
            isinstance(value, list) and len(value) == 2 and isinstance(value[0], list)
            and all(_is_int(size) and size >= 0 for size in value[0])
            and isinstance(value[1], (int, float)) and not isinstance(value[1], bool)
        ):
            raise ValueError(
                f"{where}: constant_call_inputs must be a list of [shape, number] fingerprints "
                f"(a shape being a list of sizes), got {values!r}"
            )


def _check_names(where: str, key: str, values: Any, names: set[str]) -> None:
    """``values`` must be a list of layer names of the table."""
    if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
        raise ValueError(f"{where}: {key} must be a list of layer names, got {values!r}")
    for value in values:
        if value not in names:
            raise ValueError(f"{where}: {key} names layer {value!r}, which 'layers' lacks")


def _is_int(value: Any) -> bool:
    """Whether ``value`` is a JSON integer (booleans are not)."""
    return isinstance(value, int) and not isinstance(value, bool)
