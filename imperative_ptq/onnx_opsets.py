"""ONNX files of opsets 16 and newer, lowered to opset 15: the newest x2paddle 1.6.0 converts.

PyTorch's default exporter (``torch.onnx.export`` without ``dynamo=False``, PyTorch 2.9 and
newer) writes opset 18 or newer (20 with PyTorch 2.13), which x2paddle refuses ("onnx2paddle
support convert onnx model opset_verison [7, ..., 15]"). Most ops of those opsets are their
opset-15 forms with more element types; the rest is rewritten here, each as the opset-15 ops
that compute the same values:

* ``LayerNormalization`` (17) becomes the ``ReduceMean -> Sub -> Pow -> ReduceMean -> Add ->
  Sqrt -> Div -> Mul -> Add`` that PyTorch writes at opset 15; ``Gelu`` (20) its ``Erf`` (or
  ``Tanh``) formula; ``Mish`` (18) ``x * Tanh(Softplus(x))``.
* Reductions other than ``ReduceSum`` take their axes as an input since opset 18: a constant
  one becomes the attribute again.
* ``Split``'s ``num_outputs`` (18) becomes the sizes of its parts (from ONNX's shape
  inference), or is dropped where the input's size is unknown (opset 15 then splits evenly).
* Attributes of newer opsets at their defaults are dropped: ``Cast``'s ``saturate`` (19, for
  float8 only), ``Resize``'s ``antialias=0`` and ``keep_aspect_ratio_policy="stretch"`` (18),
  the ``reduction="none"`` of ``ScatterND``/``ScatterElements`` (16), ``AveragePool``'s
  all-ones ``dilations`` (19).

What opset 15 cannot express (an op it lacks, a non-default new attribute, a reduction's
computed axes) raises a ``ValueError`` naming those nodes. Only the top graph is rewritten.
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "X2PADDLE_OPSET", "attribute_text", "axes_node", "computed_constant", "constant_tensors", "default_opset",
    "inferred_shapes", "inferred_values", "input_folded", "lowered_to_opset_15", "tensor_shape", "unread_nodes_dropped",
    "with_input_shapes",
]

logger = logging.getLogger(__name__)

#: The newest ONNX opset x2paddle 1.6.0 converts.
X2PADDLE_OPSET = 15

#: Reductions whose ``axes`` became an input at opset 18 (``ReduceSum``'s did at 13).
_REDUCTIONS_WITH_AXES_INPUT = frozenset({
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceSumSquare",
})

#: Attributes added after opset 15 that may be dropped at these values (their defaults, or
#: values only float8 types read).
_DROPPABLE_ATTRIBUTES = {
    "Cast": {"saturate": None},
    "CastLike": {"saturate": None},
    "Resize": {"antialias": 0, "keep_aspect_ratio_policy": b"stretch"},
    "ScatterND": {"reduction": b"none"},
    "ScatterElements": {"reduction": b"none"},
    "AveragePool": {"dilations": 1},
}

#: Attribute values added after opset 15 to attributes opset 15 has (they have no opset-15 form).
_NEWER_VALUES = {("Pad", "mode"): {b"wrap"}, ("Resize", "coordinate_transformation_mode"): {b"half_pixel_symmetric"}}


def _needs_shapes(node, attributes: dict) -> bool:
    """Whether lowering ``node`` reads a shape: a LayerNormalization's positive axis, a Split's
    ``num_outputs``."""
    if node.op_type == "LayerNormalization":
        return int(attributes.get("axis", -1)) >= 0
    return node.op_type == "Split" and "num_outputs" in attributes


#: The numpy dtype of each list or scalar form of a ``Constant`` node's value.
_CONSTANT_FORMS = {
    "value_ints": np.int64, "value_int": np.int64, "value_floats": np.float32, "value_float": np.float32,
}


def constant_tensors(model) -> dict:
    """The ``TensorProto`` of every constant of ``model``: its initializers and the values of
    its ``Constant`` nodes (``value``, or a list or scalar: ``value_ints``, ``value_float``,
    ...), by name."""
    from onnx import helper, numpy_helper

    constants = {initializer.name: initializer for initializer in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Constant" or len(node.attribute) != 1:
            continue
        attribute = node.attribute[0]
        if attribute.name == "value":
            constants[node.output[0]] = attribute.t
        elif attribute.name in _CONSTANT_FORMS:
            value = np.asarray(helper.get_attribute_value(attribute), _CONSTANT_FORMS[attribute.name])
            constants[node.output[0]] = numpy_helper.from_array(value, node.output[0])
    return constants


def inferred_values(model, rewritten: str, data_prop: bool = False) -> list | None:
    """The ``ValueInfoProto`` of every tensor ONNX's shape inference types in ``model`` (inputs
    and outputs included); ``None`` (logged) where it cannot read the model, whose
    ``rewritten`` ops are then left as they are. ``data_prop`` also propagates the values of
    shape computations (a ``ConstantOfShape`` of an input's ``Shape`` gets its shape)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=data_prop)
    except Exception as error:  # noqa: BLE001 - a model shape inference cannot read: left as it is
        logger.debug("ONNX shape inference failed (%s): %s left as they are", error, rewritten)
        return None
    return [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]


def tensor_shape(tensor_type) -> list[int | None] | None:
    """The shape of a ``TypeProto.Tensor`` (``None`` for a size it leaves open); ``None`` where
    it has no shape."""
    if tensor_type is None or not tensor_type.HasField("shape"):
        return None
    return [dim.dim_value if dim.HasField("dim_value") else None for dim in tensor_type.shape.dim]


def inferred_shapes(model, rewritten: str) -> dict[str, list[int | None]]:
    """The shape of every tensor ONNX's shape inference types in ``model`` (``None`` for a size
    it leaves open), by name; empty where it cannot read the model (see
    :func:`inferred_values`)."""
    return {
        value.name: tensor_shape(value.type.tensor_type)
        for value in inferred_values(model, rewritten) or []
        if value.type.tensor_type.HasField("shape")
    }


def computed_constant(model, name: str, producers: dict | None = None) -> np.ndarray | None:
    """The value of the tensor ``name`` of ``model`` where it is computed from initializers
    only (ONNX's reference evaluator on the nodes computing it); ``None`` where a graph input
    reaches it. ``producers`` maps each output to its node (built here if not given)."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    if producers is None:
        producers = {output: node for node in model.graph.node for output in node.output}
    initializers = {initializer.name: initializer for initializer in model.graph.initializer}
    ancestors, read = {}, set()  # (by id: only the initializers these nodes read are copied)
    pending = [name]
    while pending:
        tensor = pending.pop()
        if not tensor:
            continue
        if tensor in initializers:
            read.add(tensor)
            continue
        node = producers.get(tensor)
        if node is None:
            return None
        if id(node) not in ancestors:
            ancestors[id(node)] = node
            pending.extend(node.input)
    graph = helper.make_graph(
        [node for node in model.graph.node if id(node) in ancestors], "constant", [],
        [helper.make_empty_tensor_value_info(name)], [initializers[tensor] for tensor in sorted(read)],
    )
    subgraph = helper.make_model(graph, opset_imports=list(model.opset_import))
    subgraph.ir_version = model.ir_version
    try:
        (value,) = ReferenceEvaluator(subgraph).run(None, {})
    except Exception as error:  # noqa: BLE001 - an op the evaluator lacks: the value stays computed
        logger.debug("could not compute %r from constants: %s", name, error)
        return None
    return np.asarray(value)


def input_folded(model, node, position: int, constants: dict, producers: dict) -> bool:
    """Replaces, in place, ``node``'s input at ``position`` where it is computed from constants
    only (:func:`computed_constant`) by an initializer ``<name>.folded`` of its value (written
    once, however many nodes read it; ``constants``, the model's by name, gains it).

    Returns:
        Whether the input now reads such an initializer.
    """
    from onnx import numpy_helper

    name = node.input[position] if position < len(node.input) else ""
    if not name or name in constants:
        return False
    folded = f"{name}.folded"
    if folded not in constants:
        value = computed_constant(model, name, producers)
        if value is None:
            return False
        constants[folded] = numpy_helper.from_array(value, folded)
        model.graph.initializer.append(constants[folded])
    node.input[position] = folded
    return True


def unread_nodes_dropped(model) -> None:
    """Removes, in place, the nodes none of whose outputs any node or graph output reads."""
    while True:
        read = {name for node in model.graph.node for name in node.input} | {output.name for output in model.graph.output}
        unread = [node for node in model.graph.node if not any(output in read for output in node.output)]
        if not unread:
            return
        for node in unread:
            model.graph.node.remove(node)


def attribute_text(value) -> str:
    """An ONNX string attribute's value (``bytes`` from ``helper.get_attribute_value``) as ``str``."""
    return value.decode() if isinstance(value, bytes) else value


def default_opset(model) -> int:
    """``model``'s default-domain (``ai.onnx``) opset; 1 where it names none."""
    return next((opset.version for opset in model.opset_import if opset.domain in ("", "ai.onnx")), 1)


#: Ops whose ``axes`` became an input at opset 13.
_AXES_INPUT_FROM_13 = frozenset({"Squeeze", "Unsqueeze", "ReduceSum"})


def axes_node(
    op_type: str, data: str, axes: list[int], output: str, opset: int, axes_name: str | None = None, **attributes
) -> tuple:
    """A ``Squeeze``, ``Unsqueeze`` or ``ReduceSum`` of ``data`` over ``axes`` writing
    ``output``, in the form of ``opset`` (up to 17): the axes an int64 input from opset 13 on,
    an attribute before.

    Returns:
        ``(node, initializers)``: the ``NodeProto`` and the ``TensorProto`` of its axes (named
        ``axes_name``, by default ``<output>.axes``; none before opset 13), for the caller to
        add to its graph.
    """
    from onnx import helper, numpy_helper

    if op_type not in _AXES_INPUT_FROM_13:
        raise ValueError(f"axes_node writes {sorted(_AXES_INPUT_FROM_13)}, not {op_type!r}")
    if opset < 13:
        return helper.make_node(op_type, [data], [output], axes=list(axes), **attributes), []
    axes_tensor = numpy_helper.from_array(np.array(axes, np.int64), axes_name or f"{output}.axes")
    return helper.make_node(op_type, [data, axes_tensor.name], [output], **attributes), [axes_tensor]


def with_input_shapes(model, shapes: Mapping[str, Sequence[int]]):
    """A copy of ``model`` whose graph inputs named in ``shapes`` have those fixed shapes."""
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for size in shapes[value.name]:
                dims.add().dim_value = int(size)
    return fixed


def lowered_to_opset_15(
    model, name: str = "the model", input_shapes: Mapping[str, Sequence[int]] | None = None
) -> int:
    """Rewrites ``model`` (an ``onnx.ModelProto``) in place from its opset to opset 15.

    Args:
        model: The model; left as it is if its default-domain opset is 15 or older.
        name: How errors name the model (its file).
        input_shapes: Input name -> the shape the model is converted at, for the shapes a
            lowering reads (an 18-opset ``Split`` into ``num_outputs`` of an axis the file
            leaves open gets its sizes from it); ``None``: the file's own shapes.

    Returns:
        The number of nodes rewritten.

    Raises:
        ValueError: A node that opset 15 cannot express (named with its op type).
    """
    version = default_opset(model)
    if version <= X2PADDLE_OPSET:
        return 0
    lowering = _Lowering(model, version, input_shapes)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    refused: list[str] = []
    rewritten = 0
    for node in nodes:
        try:
            replacement = lowering.lower(node)
        except _Unsupported as reason:
            refused.append(f"{node.op_type} {node.name or node.output[0]!r} ({reason})")
            replacement = [node]
        rewritten += replacement != [node]
        model.graph.node.extend(replacement)
    if refused:
        raise ValueError(
            f"{name} uses opset {version}, and x2paddle converts opsets up to {X2PADDLE_OPSET}; "
            f"these nodes have no opset-{X2PADDLE_OPSET} form here: {'; '.join(refused[:8])}"
            + (f" and {len(refused) - 8} more" if len(refused) > 8 else "")
            + " (export the model with opset 15, e.g. torch.onnx.export(..., opset_version=15, dynamo=False))"
        )
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = X2PADDLE_OPSET
    logger.info("lowered %s from opset %d to %d: %d nodes rewritten", name, version, X2PADDLE_OPSET, rewritten)
    return rewritten


class _Unsupported(Exception):
    """A node opset 15 cannot express; its message says why."""


class _Lowering:
    """The opset-15 form of each node of one model (new nodes and constants are named after the
    node's first output)."""

    def __init__(self, model, version: int, input_shapes: Mapping[str, Sequence[int]] | None = None) -> None:
        self.model, self.version = model, version
        self.constants = constant_tensors(model)
        # Shapes are inferred now, on the whole graph, where a lowering reads them.
        self._shapes: dict[str, list[int | None]] = {}
        if any(_needs_shapes(node, self._attributes(node)) for node in model.graph.node):
            shaped = with_input_shapes(model, input_shapes) if input_shapes else model
            self._shapes = inferred_shapes(shaped, "ops of newer opsets")
        self._lowerings: dict[str, Callable] = {
            "LayerNormalization": self._layer_norm, "Gelu": self._gelu, "Mish": self._mish,
            "Split": self._split,
        }

    def lower(self, node) -> list:
        from onnx import defs, helper

        if node.domain not in ("", "ai.onnx"):
            return [node]
        if node.op_type in self._lowerings:
            return self._lowerings[node.op_type](node)
        if node.op_type in _REDUCTIONS_WITH_AXES_INPUT and self.version >= 18:
            return self._reduction(node)
        self._drop_default_attributes(node)
        try:
            schema = defs.get_schema(node.op_type, X2PADDLE_OPSET, "")
        except defs.SchemaError:
            raise _Unsupported(f"an op of opset {self.version}") from None
        newer = sorted({attribute.name for attribute in node.attribute} - set(schema.attributes))
        if newer:
            raise _Unsupported(f"attributes {newer}")
        for attribute in node.attribute:
            if helper.get_attribute_value(attribute) in _NEWER_VALUES.get((node.op_type, attribute.name), ()):
                raise _Unsupported(f"{attribute.name}={helper.get_attribute_value(attribute).decode()!r}")
        while node.input and not node.input[-1]:  # optional inputs left out
            del node.input[-1]
        if len(node.input) > schema.max_input:
            raise _Unsupported(f"{len(node.input)} inputs")
        return [node]

    # Helpers -------------------------------------------------------------------------------

    def _constant(self, name: str, value, dtype=np.float32) -> str:
        from onnx import numpy_helper

        self.model.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def _attributes(self, node) -> dict:
        from onnx import helper

        return {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}

    def _shape(self, tensor: str) -> list[int | None] | None:
        """``tensor``'s shape from ONNX's shape inference (``None`` for an unknown size); ``None``
        where it is not inferred."""
        return self._shapes.get(tensor)

    def _drop_default_attributes(self, node) -> None:
        from onnx import helper

        droppable = _DROPPABLE_ATTRIBUTES.get(node.op_type, {})
        for attribute in list(node.attribute):
            if attribute.name not in droppable:
                continue
            value, default = helper.get_attribute_value(attribute), droppable[attribute.name]
            values = value if isinstance(value, list) else [value]
            if default is not None and any(item != default for item in values):
                raise _Unsupported(f"{attribute.name}={value!r}")
            node.attribute.remove(attribute)

    # Lowerings ---------------------------------------------------------------------------

    def _layer_norm(self, node) -> list:
        from onnx import helper

        attributes = self._attributes(node)
        axis, epsilon = int(attributes.get("axis", -1)), float(attributes.get("epsilon", 1e-5))
        x, stem = node.input[0], node.output[0]
        if axis >= 0:
            shape = self._shape(x)
            if shape is None:
                raise _Unsupported(f"axis {axis} of an input of unknown rank")
            axis -= len(shape)
        axes = list(range(axis, 0))
        mean, centred, variance, deviation = (f"{stem}.{part}" for part in ("mean", "centred", "variance", "deviation"))
        scale = node.input[1] if len(node.input) > 1 and node.input[1] else None
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        # x2paddle fuses the Pow form into paddle.nn.LayerNorm(normalized_shape=[the scale's
        # first size]): right for the last axis and 1-D parameters only (over [C, W] the
        # converted model failed, and a used Mean output was lost); else the square is a Mul.
        fusable = axes == [-1] and len(node.output) == 1 and all(
            name is None or len(self.constants[name].dims) == 1 if name in self.constants else name is None
            for name in (scale, bias)
        )
        squared = (
            helper.make_node("Pow", [centred, self._constant(f"{stem}.two", 2.0)], [f"{stem}.squared"]) if fusable
            else helper.make_node("Mul", [centred, centred], [f"{stem}.squared"])
        )
        nodes = [
            helper.make_node("ReduceMean", [x], [mean], axes=axes, keepdims=1),
            helper.make_node("Sub", [x, mean], [centred]),
            squared,
            helper.make_node("ReduceMean", [f"{stem}.squared"], [variance], axes=axes, keepdims=1),
            helper.make_node("Add", [variance, self._constant(f"{stem}.epsilon", epsilon)], [f"{stem}.shifted"]),
            helper.make_node("Sqrt", [f"{stem}.shifted"], [deviation]),
        ]
        steps = [("Div", deviation, f"{stem}.normalized")]
        if scale:
            steps.append(("Mul", scale, f"{stem}.scaled"))
        if bias:
            steps.append(("Add", bias, stem))
        value = centred
        for index, (op, operand, out) in enumerate(steps):
            out = node.output[0] if index == len(steps) - 1 else out
            nodes.append(helper.make_node(op, [value, operand], [out]))
            value = out
        if len(node.output) > 1 and node.output[1]:
            nodes.append(helper.make_node("Identity", [mean], [node.output[1]]))
        if len(node.output) > 2 and node.output[2]:
            nodes.append(helper.make_node("Reciprocal", [deviation], [node.output[2]]))
        return nodes

    def _gelu(self, node) -> list:
        from onnx import helper

        approximate = self._attributes(node).get("approximate", b"none")
        approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
        x, stem = node.input[0], node.output[0]
        if approximate == "none":
            nodes = [
                helper.make_node("Div", [x, self._constant(f"{stem}.sqrt2", np.sqrt(2.0))], [f"{stem}.scaled"]),
                helper.make_node("Erf", [f"{stem}.scaled"], [f"{stem}.gate"]),
            ]
        elif approximate == "tanh":
            nodes = [
                helper.make_node("Pow", [x, self._constant(f"{stem}.three", 3.0)], [f"{stem}.cube"]),
                helper.make_node("Mul", [f"{stem}.cube", self._constant(f"{stem}.coefficient", 0.044715)], [f"{stem}.cubic"]),
                helper.make_node("Add", [x, f"{stem}.cubic"], [f"{stem}.inner"]),
                helper.make_node(
                    "Mul", [f"{stem}.inner", self._constant(f"{stem}.factor", np.sqrt(2.0 / np.pi))], [f"{stem}.scaled"]
                ),
                helper.make_node("Tanh", [f"{stem}.scaled"], [f"{stem}.gate"]),
            ]
        else:
            raise _Unsupported(f"approximate={approximate!r}")
        return nodes + [
            helper.make_node("Add", [f"{stem}.gate", self._constant(f"{stem}.one", 1.0)], [f"{stem}.plus_one"]),
            helper.make_node("Mul", [x, f"{stem}.plus_one"], [f"{stem}.product"]),
            helper.make_node("Mul", [f"{stem}.product", self._constant(f"{stem}.half", 0.5)], [node.output[0]]),
        ]

    def _mish(self, node) -> list:
        from onnx import helper

        x, stem = node.input[0], node.output[0]
        return [
            helper.make_node("Softplus", [x], [f"{stem}.softplus"]),
            helper.make_node("Tanh", [f"{stem}.softplus"], [f"{stem}.gate"]),
            helper.make_node("Mul", [x, f"{stem}.gate"], [node.output[0]]),
        ]

    def _reduction(self, node) -> list:
        """Opset 18's axes input as the attribute; no axes (or empty ones): all axes, or the
        input itself with ``noop_with_empty_axes``."""
        from onnx import helper, numpy_helper

        attributes = self._attributes(node)
        axes: list[int] = []
        if len(node.input) > 1 and node.input[1]:
            if node.input[1] not in self.constants:
                raise _Unsupported("axes computed by the graph")
            axes = numpy_helper.to_array(self.constants[node.input[1]]).reshape(-1).astype(int).tolist()
        if not axes and attributes.get("noop_with_empty_axes", 0):
            return [helper.make_node("Identity", [node.input[0]], list(node.output), name=node.name)]
        reduced_axes = {"axes": axes} if axes else {}
        return [helper.make_node(
            node.op_type, [node.input[0]], list(node.output), name=node.name,
            keepdims=int(attributes.get("keepdims", 1)), **reduced_axes,
        )]

    def _split(self, node) -> list:
        attributes = self._attributes(node)
        if "num_outputs" not in attributes:
            return [node]
        count, axis = int(attributes["num_outputs"]), int(attributes.get("axis", 0))
        lowered = _without(node, "num_outputs")
        shape = self._shape(node.input[0])
        size = shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None
        if size is None:
            return [lowered]  # opset 15 splits evenly into the outputs
        part = -(-size // count)  # opset 18: parts of ceil(size / n), the last one smaller
        sizes = [min(part, size - index * part) for index in range(count)]
        del lowered.input[1:]
        lowered.input.append(self._constant(f"{node.output[0]}.split_sizes", sizes, np.int64))
        return [lowered]


def _without(node, attribute_name: str):
    """A copy of ``node`` without the attribute ``attribute_name``."""
    import onnx

    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    for attribute in list(copy.attribute):
        if attribute.name == attribute_name:
            copy.attribute.remove(attribute)
    return copy
