"""BatchNorms folded into the halved convs of an ``x86-avx2`` program by the export itself.

Paddle Inference folds a BatchNorm that alone reads a conv into the conv's weight, in float32
arithmetic of its own, before it derives the int8 weight; on a conv whose weight oneDNN's AVX2
kernels halve (:mod:`imperative_ptq.halved_convs`) those float32 values decide the halving's
ties. So the export folds the BatchNorm first, with the factor the simulation used: the conv's
weight is multiplied by it (the quantization that follows stores the conv's 8-bit codes times
the factor's sign on thresholds times its magnitude, which is what the simulation derives its
halved weight from, :func:`imperative_ptq.quant_layers.runtime_weight`), its bias becomes
``(bias - mean) * factor + beta`` and the ``batch_norm`` op goes. The simulation still runs
the BatchNorm after the conv, in float: the two differ by float32 rounding only.

The conv's output must reach the BatchNorm, as ``convert`` saw it; readers calibration could
not see (the network returning the conv's output, a concat or a reduction of it) get it back
from the folded output in float. Where the traced program disagrees otherwise (no BatchNorm,
or a BatchNorm ``convert`` did not see), the export raises instead of writing a program that
computes something else.
"""

from __future__ import annotations

import numpy as np

from ..fuse import batch_norm_factor_and_bias
from ..quant_layers import folded_thresholds
from .graph import (
    get_tensor, insert_op, insert_reader_op, insert_zero_bias, is_persistable, new_persistable, op_index, readers,
    remove_op, set_tensor,
)
from .tracing import LayerRecord

__all__ = ["fold_norms_into_halved_convs"]

_CONVS = ("conv2d", "depthwise_conv2d")


def fold_norms_into_halved_convs(loaded, records: list[LayerRecord]) -> int:
    """Folds the BatchNorm of each halved conv (``record.norm_factor``) into it, in place
    (:func:`imperative_ptq.export.program.quantize_program` calls it once the conv biases are
    folded, before quantizing).

    Returns:
        How many BatchNorms were folded.

    Raises:
        ValueError: A halved conv's output does not reach its BatchNorm alone.
    """
    block = loaded.program.global_block()
    halved = {record.weight_name: record for record in records if record.halved}
    if not halved:
        return 0
    reading = readers(block)
    folds = []  # found first: the edits remove ops
    for conv in block.ops:
        if conv.type not in _CONVS or conv.input("Filter")[0] not in halved:
            continue
        record = halved[conv.input("Filter")[0]]
        output = conv.output("Output")[0]
        after = reading.get(output, [])
        add = None
        if len(after) == 1 and _bias_add(block, after[0], output):
            add = after[0]
            output = add.output("Out")[0]
            after = reading.get(output, [])
        norms = [op for op in after if op.type == "batch_norm"]
        norm = norms[0] if len(norms) == 1 else None
        if record.norm_factor is None:
            if norm is not None and len(after) == 1:
                # A batch_norm convert did not fold (a functional F.batch_norm, or a BatchNorm
                # calibration saw read another tensor: an inference dropout in between, which
                # the export removed): Paddle Inference would fold it into the halved weight,
                # which the simulation halves unfolded. An identity scale keeps it apart, run
                # in float after the int8 conv as simulated (measured: conv -> Dropout ->
                # BatchNorm2D, the export refused it; 2e-7 after).
                writer = add if add is not None else conv
                insert_reader_op(block, writer, output, [norm], "scale", "unfolded", {"scale": 1.0, "bias": 0.0})
                reading = readers(block)
            continue
        if norm is None:
            raise ValueError(
                f"cannot export {record.name!r} for target 'x86-avx2': convert folded the "
                f"BatchNorm after it into its halved weight, as the only layer it saw reading "
                f"the conv's output, but the traced program reads that output with "
                f"{', '.join(op.type for op in after) or 'nothing'}; convert it with "
                f"target='x86'"
            )
        folds.append((conv, add, norm, record, len(after) > 1))
    # A conv layer called more than once writes a conv op per call, all reading its weight
    # (and bias): each is folded once, however many calls read it (measured: a siamese
    # encoder's conv + BatchNorm called twice, folded per call, 2.4 of the largest output off).
    _check_one_norm_per_weight(folds)
    folded_weights: set[str] = set()
    folded_biases: set[str] = set()
    for conv, add, norm, record, read_elsewhere in folds:
        weight = conv.input("Filter")[0]
        _fold(
            loaded, conv, add, norm, np.asarray(record.norm_factor, np.float32), read_elsewhere,
            fold_weight=weight not in folded_weights, folded_biases=folded_biases,
        )
        if weight not in folded_weights:
            record.weight_thresholds = folded_thresholds(record.weight_thresholds, record.norm_factor)
            folded_weights.add(weight)
    folded = len(folds)
    if folded:
        loaded.program._sync_with_cpp()
    return folded


def _check_one_norm_per_weight(folds: list) -> None:
    """Raises unless every conv op sharing a weight is followed by the same BatchNorm (the one
    ``convert`` folded): a weight holds one fold."""
    norms: dict[str, tuple[str, str]] = {}
    for conv, _, norm, record, _ in folds:
        statistics = (norm.input("Mean")[0], norm.input("Scale")[0])
        if norms.setdefault(conv.input("Filter")[0], statistics) != statistics:
            raise ValueError(
                f"cannot export {record.name!r} for target 'x86-avx2': its calls are followed "
                f"by different BatchNorms, and its halved weight can hold one fold; convert it "
                f"with target='x86'"
            )


def _bias_add(block, op, output: str) -> bool:
    """Whether ``op`` adds a persistable [C] bias to the conv output ``output`` on axis 1."""
    return (
        op.type == "elementwise_add" and op.input("X") == [output]
        and is_persistable(block, op.input("Y")[0]) and op.attr("axis") == 1
    )


def _fold(
    loaded, conv, add, norm, factor: np.ndarray, read_elsewhere: bool = False,
    fold_weight: bool = True, folded_biases: set[str] | None = None,
) -> None:
    """Multiplies ``conv``'s weight by ``factor`` (unless ``fold_weight`` is False: another
    call of the layer folded it), puts the folded bias in its bias add (one inserted if it has
    none; a bias already in ``folded_biases`` is left as it is, and the one folded is added
    to it) and removes ``norm``, whose output the add now writes.

    ``read_elsewhere``: ops calibration did not see read the conv's output too (the network
    returns it, a concat or a reduction reads it); they get it back from the folded output,
    ``(y - beta) / f + mean`` per channel, in float (the simulation's conv output up to
    float32 rounding), where Paddle would not fold the BatchNorm and would halve the unfolded
    weight instead."""
    block = loaded.program.global_block()
    weight = conv.input("Filter")[0]
    folded_biases = set() if folded_biases is None else folded_biases
    value = get_tensor(loaded, weight)
    if fold_weight:
        shape = [-1] + [1] * (value.ndim - 1)
        set_tensor(loaded, weight, (value * factor.reshape(shape)).astype(np.float32))
    if add is None:
        channels = int(value.shape[0])
        name = f"{conv.output('Output')[0]}.folded_bias"
        insert_zero_bias(loaded, op_index(block, conv), conv, "Output", name, channels, 1)
        add = block.ops[op_index(block, conv) + 1]
    bias_name = add.input("Y")[0]
    mean = get_tensor(loaded, norm.input("Mean")[0]).astype(np.float32)
    variance = get_tensor(loaded, norm.input("Variance")[0]).astype(np.float32)
    gamma = get_tensor(loaded, norm.input("Scale")[0]).astype(np.float32)
    beta = get_tensor(loaded, norm.input("Bias")[0]).astype(np.float32)
    if bias_name not in folded_biases:
        _, bias = batch_norm_factor_and_bias(
            get_tensor(loaded, bias_name).astype(np.float32), mean, variance, gamma, beta,
            float(norm.attr("epsilon")),
        )
        set_tensor(loaded, bias_name, np.asarray(bias, np.float32))
        folded_biases.add(bias_name)
    unfolded = add.output("Out")[0]
    add._rename_output(unfolded, norm.output("Y")[0])
    remove_op(block, op_index(block, norm))
    if read_elsewhere:
        _unfold_after(loaded, add, unfolded, factor, mean, beta)


def _unfold_after(loaded, add, unfolded: str, factor: np.ndarray, mean: np.ndarray, beta: np.ndarray) -> None:
    """Writes ``unfolded`` (the conv's output before the folded BatchNorm) back from the
    folded output of ``add``: ``y * (1 / f) + (mean - beta / f)``, two per-channel ops."""
    block = loaded.program.global_block()
    folded = add.output("Out")[0]
    var = block.var(folded)
    scaled = block.create_var(name=f"{unfolded}.unfolding", shape=var.shape, dtype=var.dtype)
    # [C, 1, 1]: oneDNN's elementwise kernels broadcast from the right, whatever ``axis`` says.
    per_channel = [-1] + [1] * (len(var.shape) - 2)
    inverse = new_persistable(
        loaded, f"{unfolded}.inverse_factor", (1 / factor).astype(np.float32).reshape(per_channel)
    )
    shift = new_persistable(
        loaded, f"{unfolded}.unfolded_shift", (mean - beta / factor).astype(np.float32).reshape(per_channel)
    )
    index = op_index(block, add) + 1
    insert_op(block, index, type="elementwise_mul", inputs={"X": [folded], "Y": [inverse]},
              outputs={"Out": [scaled.name]}, attrs={"axis": -1})
    insert_op(block, index + 1, type="elementwise_add", inputs={"X": [scaled.name], "Y": [shift]},
              outputs={"Out": [unfolded]}, attrs={"axis": -1})
