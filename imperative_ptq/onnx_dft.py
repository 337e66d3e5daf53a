"""ONNX ``DFT`` nodes written as the ``Transpose``/``Reshape``/``MatMul`` ops x2paddle converts.

``DFT`` (opset 17; its ``axis`` an input since opset 20) has no opset-15 form and no x2paddle
converter: ``torch.fft.fft``/``fftn``/``rfft`` export as one (FNet's token mixing). Over an axis
of known length ``n`` a DFT is a matrix product. The transform's axis is moved next to the
last one (which holds the real part, or the real and imaginary parts), the two are merged into
one axis of the ``n`` values (real input) or ``2 n`` interleaved parts (complex input), and that
is multiplied by a constant real matrix whose column ``2 k`` gives the real part of frequency
``k`` and column ``2 k + 1`` its imaginary part; the product is reshaped to ``[..., m, 2]`` and
moved back. The matrix carries the rest of the node: ``dft_length`` (rows of the samples it
drops are zero, the samples it pads with are zero anyway), ``onesided`` (only frequencies up to
``length // 2``), ``inverse`` (the conjugate transform divided by the length). The matrix is a
parameter of the converted model, so the calibration takes each transform as a Linear layer.

A node whose signal length or rank is unknown, whose ``dft_length`` or ``axis`` is computed, or
that asks for a one-sided transform other than a forward one of real input (which ONNX does not
define) raises a ``ValueError`` naming it.
"""

from __future__ import annotations

import logging

import numpy as np

from .onnx_opsets import constant_tensors, default_opset, inferred_values, tensor_shape

__all__ = ["dft_matrix", "dfts_as_matmuls"]

logger = logging.getLogger(__name__)

#: ``DFT``'s default axis: an attribute of 1 up to opset 19, an input of -2 from opset 20.
_DEFAULT_AXIS_BEFORE_20 = 1
_DEFAULT_AXIS_FROM_20 = -2


def dft_matrix(
    samples: int, length: int, complex_input: bool, onesided: bool = False, inverse: bool = False,
    dtype: np.dtype = np.float32,
) -> np.ndarray:
    """The real matrix that multiplies ``samples`` values along the transform's axis into the
    DFT of ``length`` points.

    Args:
        samples: The input's size along the axis (``n``).
        length: The transform's length (``dft_length``; samples beyond it are dropped, missing
            ones are zeros).
        complex_input: Whether each sample is a ``(real, imaginary)`` pair (rows interleaved
            ``re_0, im_0, re_1, ...``) or a real value.
        onesided: Only frequencies ``0 .. length // 2``.
        inverse: The inverse transform (``e^{+2 pi i j k / length} / length``).
        dtype: The matrix's type (the input's).

    Returns:
        ``[samples * (2 if complex_input else 1), 2 * frequencies]``, columns interleaved
        ``re_0, im_0, re_1, ...``.
    """
    frequencies = length // 2 + 1 if onesided else length
    j = np.arange(samples, dtype=np.int64)[:, None]
    k = np.arange(frequencies, dtype=np.int64)[None, :]
    angle = 2 * np.pi * ((j * k) % length) / length  # (the product reduced first: exact angles)
    sign = 1.0 if inverse else -1.0
    cos, sin = np.cos(angle), sign * np.sin(angle)
    # (re + i im)(cos + i sin): re -> (cos, sin), im -> (-sin, cos) as (real, imaginary) out.
    blocks = np.stack([np.stack([cos, sin], axis=-1), np.stack([-sin, cos], axis=-1)], axis=1)  # [n, 2, m, 2]
    if not complex_input:
        blocks = blocks[:, :1]
    blocks[length:] = 0.0  # samples beyond dft_length are dropped
    if inverse:
        blocks /= length
    return blocks.reshape(samples * blocks.shape[1], 2 * frequencies).astype(dtype)


def dfts_as_matmuls(model) -> int:
    """Rewrites every ``DFT`` node of ``model`` (an ``onnx.ModelProto``, any opset) in place as
    the ops computing it (see the module's docstring).

    Returns:
        The number of nodes rewritten.

    Raises:
        ValueError: Nodes these ops do not compute (each named, with the reason).
    """
    from onnx import numpy_helper

    dfts = [node for node in model.graph.node if node.op_type == "DFT" and node.domain in ("", "ai.onnx")]
    if not dfts:
        return 0
    values = {value.name: value.type.tensor_type for value in inferred_values(model, "DFT nodes") or []}
    constants = constant_tensors(model)
    opset = default_opset(model)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    refused: list[str] = []
    for node in nodes:
        if node not in dfts:
            model.graph.node.append(node)
            continue
        try:
            written, matrix = _matmul_form(node, values.get(node.input[0]), constants, opset)
        except ValueError as reason:
            refused.append(f"DFT {node.name or node.output[0]!r} ({reason})")
            model.graph.node.append(node)
            continue
        model.graph.node.extend(written)
        model.graph.initializer.extend([
            numpy_helper.from_array(value, name) for name, value in matrix.items()
        ])
    if refused:
        raise ValueError("x2paddle has no DFT, and these have no MatMul form here: " + "; ".join(refused))
    logger.info("wrote %d DFT nodes as MatMul products (x2paddle has no DFT)", len(dfts))
    return len(dfts)


def _matmul_form(node, tensor_type, constants: dict, opset: int) -> tuple[list, dict[str, np.ndarray]]:
    """The nodes computing one ``DFT`` node and the constants they read, by name."""
    from onnx import helper

    attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
    shape = tensor_shape(tensor_type)
    if shape is None:
        raise ValueError("its input's shape is unknown")
    rank = len(shape)
    axis = _constant_input(node, 2, constants, "axis")
    if axis is None:
        axis = attributes.get("axis", _DEFAULT_AXIS_FROM_20 if opset >= 20 else _DEFAULT_AXIS_BEFORE_20)
    axis = int(axis) + rank if int(axis) < 0 else int(axis)
    if not 0 <= axis <= rank - 2:
        raise ValueError(f"axis {axis} of a rank-{rank} input (the last axis holds the complex parts)")
    samples, parts = shape[axis], shape[-1]
    if samples is None or parts not in (1, 2):
        raise ValueError(f"input shape {shape}: the transform's axis {axis} needs a known size and the last axis 1 or 2")
    length = _constant_input(node, 1, constants, "dft_length")
    length = samples if length is None else int(length)
    onesided, inverse = bool(attributes.get("onesided", 0)), bool(attributes.get("inverse", 0))
    if onesided and (inverse or parts == 2):
        kind = f"{'inverse ' if inverse else ''}transform of {'complex' if parts == 2 else 'real'} input"
        raise ValueError(f"a one-sided {kind} (ONNX defines one-sided forward transforms of real input only)")
    if length < 1:
        raise ValueError(f"dft_length {length}")
    dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type) if tensor_type.elem_type else np.float32
    matrix = dft_matrix(samples, length, parts == 2, onesided, inverse, dtype)
    stem = f"{node.output[0]}.dft"
    order = [position for position in range(rank - 1) if position != axis] + [axis, rank - 1]
    names = {"matrix": f"{stem}.matrix", "merged": f"{stem}.merged_shape", "split": f"{stem}.split_shape"}
    constants_written = {
        names["matrix"]: matrix,
        names["merged"]: np.array([0] * (rank - 2) + [-1], np.int64),
        names["split"]: np.array([0] * (rank - 2) + [matrix.shape[1] // 2, 2], np.int64),
    }
    moved = order != sorted(order)
    source = f"{stem}.moved" if moved else node.input[0]
    written = [helper.make_node("Transpose", [node.input[0]], [source], perm=order)] if moved else []
    written += [
        helper.make_node("Reshape", [source, names["merged"]], [f"{stem}.samples"]),
        helper.make_node("MatMul", [f"{stem}.samples", names["matrix"]], [f"{stem}.product"]),
        helper.make_node("Reshape", [f"{stem}.product", names["split"]], [f"{stem}.spectrum" if moved else node.output[0]]),
    ]
    if moved:
        written.append(helper.make_node("Transpose", [f"{stem}.spectrum"], [node.output[0]], perm=list(np.argsort(order))))
    written[-1].name = node.name
    return written, constants_written


def _constant_input(node, position: int, constants: dict, what: str) -> int | None:
    """The integer value of ``node``'s optional input at ``position``; ``None`` where it is left
    out."""
    from onnx import numpy_helper

    if len(node.input) <= position or not node.input[position]:
        return None
    name = node.input[position]
    if name not in constants:
        raise ValueError(f"its {what} is computed ({name!r}), not a constant")
    value = numpy_helper.to_array(constants[name])
    if value.size != 1:
        raise ValueError(f"its {what} {value.tolist()} is not one integer")
    return int(value.reshape(-1)[0])
