"""What ONNX Runtime really runs for an exported ONNX file: its optimized graph, read back.

The QDQ file only proposes integer arithmetic: ONNX Runtime's graph optimizations fuse a
``DequantizeLinear -> Conv -> QuantizeLinear`` group into a ``QLinearConv`` where the group
allows it, and otherwise run the product in float on weights it dequantizes (a conv whose
output a float op such as a Hardswish reads, as the simulation requires). :func:`onnx_runtime_report`
has ONNX Runtime save the graph it optimized and counts the products (convs, matmuls, GEMMs,
recurrent layers) it runs in integer kernels and in float, as :func:`.inspect.int8_report`
does for Paddle Inference.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import tempfile
from typing import Any, Iterator

__all__ = ["OnnxRuntimeReport", "onnx_runtime_report"]

#: ONNX Runtime ops that multiply in integer arithmetic.
INTEGER_PRODUCTS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "ConvInteger",
    "DynamicQuantizeMatMul", "QGemm", "DynamicQuantizeLSTM",
})
#: ONNX Runtime ops that multiply in float (fused forms included).
FLOAT_PRODUCTS = frozenset({
    "Conv", "FusedConv", "ConvTranspose", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "LSTM", "GRU", "RNN",
    "MatMulNBits", "Attention", "MultiHeadAttention",
})


@dataclasses.dataclass
class OnnxRuntimeReport:
    """The products of the graph ONNX Runtime optimized from an ONNX file.

    Attributes:
        integer: Op type -> how many run in integer kernels (:data:`INTEGER_PRODUCTS`).
        float: Op type -> how many run in float (:data:`FLOAT_PRODUCTS`; ``MatMulNBits``
            multiplies by INT4 weights it dequantizes).
        float_in_bodies: Of those, how many run inside loop or branch bodies (``Scan``,
            ``Loop``, ``If``: an int8-simulated LSTM's products on its codes), by op type.
    """

    integer: dict[str, int]
    float: dict[str, int]
    float_in_bodies: dict[str, int] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        """One line: counts of the products run in integer kernels and in float."""
        integer, floating = sum(self.integer.values()), sum(self.float.values())
        return (
            f"ONNX Runtime runs {integer} convs/matmuls in integer kernels ({_counts(self.integer)}) "
            f"and {floating} in float ({_counts(self.float)})"
        )


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{count} {kind}" for kind, count in sorted(counts.items())) or "none"


def onnx_runtime_report(path: str | os.PathLike, num_threads: int = 1) -> OnnxRuntimeReport:
    """Counts the convs, matmuls and GEMMs ONNX Runtime runs in integer kernels and in float
    for the ONNX file ``path``, from the graph its default optimizations (``ORT_ENABLE_ALL``,
    the CPU execution provider) produce on this CPU.

    Args:
        path: An ONNX file (``export_onnx``'s, or any other).
        num_threads: ONNX Runtime's intra-op threads for the session it builds.

    Returns:
        The report.

    Raises:
        ImportError: ``onnxruntime`` or ``onnx`` is not installed.
        FileNotFoundError: ``path`` does not exist.
    """
    import onnx
    import onnxruntime

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no ONNX file at {path!r}")
    with tempfile.TemporaryDirectory() as directory:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(num_threads)
        options.log_severity_level = 3  # (the NCHWc notice about the saved graph)
        options.optimized_model_filepath = os.path.join(directory, "optimized.onnx")
        onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    integer: collections.Counter = collections.Counter()
    floating: collections.Counter = collections.Counter()
    in_bodies: collections.Counter = collections.Counter()
    for node, in_body in _nodes(optimized.graph):
        if node.op_type in INTEGER_PRODUCTS:
            integer[node.op_type] += 1
        elif node.op_type in FLOAT_PRODUCTS:
            floating[node.op_type] += 1
            in_bodies[node.op_type] += in_body
    return OnnxRuntimeReport(dict(integer), dict(floating), {kind: count for kind, count in in_bodies.items() if count})


def _nodes(graph: Any, in_body: bool = False) -> Iterator[tuple[Any, bool]]:
    """Every node of ``graph`` and of the loop and branch bodies inside it, each with whether
    it is inside such a body."""
    for node in graph.node:
        yield node, in_body
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _nodes(attribute.g, True)
            for body in attribute.graphs:
                yield from _nodes(body, True)
