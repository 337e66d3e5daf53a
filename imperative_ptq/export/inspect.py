"""What Paddle Inference really runs in int8: its optimized program, read back.

Paddle's oneDNN int8 pipeline decides per op what runs int8 and with which input type; the
exported program only proposes it. :func:`int8_report` builds the predictor that
``create_predictor`` builds, has Paddle save the program its passes produced and counts, from
that program, the conv/fc ops that run int8 or fp32 and the int8 ones reading a signed (s8)
input, which saturate on CPUs without VNNI (:mod:`imperative_ptq.targets`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import tempfile

import paddle
import paddle.inference as paddle_infer

from ..targets import TARGETS
from .predictor import (
    INT8_DELETED_PASSES, avoid_paddle_defects, exported_target, program_desc, quiet_native_output,
)
from .legacy_program import legacy_static_mode
from .tracing import main_thread_only

__all__ = ["Int8Report", "int8_report"]

logger = logging.getLogger(__name__)

#: Op types of Paddle's optimized int8 programs that multiply an input by a weight.
GEMM_OPS = frozenset({
    "fused_conv2d", "conv2d", "depthwise_conv2d", "fc", "fused_matmul", "matmul_v2", "mul",
    "conv2d_transpose", "depthwise_conv2d_transpose", "conv3d", "conv3d_transpose",
    "fusion_lstm", "fusion_gru", "multi_gru", "rnn",
})
#: Products of tensors that Paddle Inference runs in float only (no int8 kernel), by input slot.
FLOAT_PRODUCT_OPS = {
    "einsum": ("Operands",), "bmm": ("X", "Y"), "addmm": ("X", "Y"),
    "bilinear_tensor_product": ("Weight",), "deformable_conv": ("Filter",), "deformable_conv_v1": ("Filter",),
}
#: Int8 ops that pass their input's type through (walked back to find a GEMM input's type).
_TYPE_PRESERVING_OPS = frozenset(
    {"pool2d", "reshape2", "transpose2", "fused_transpose", "slice", "split", "requantize",
     "nearest_interp", "nearest_interp_v2", "concat"}
)


@dataclasses.dataclass
class Int8Report:
    """The conv/fc ops of Paddle Inference's optimized int8 program.

    Attributes:
        int8: Op type -> how many run int8.
        fp32: Op type -> how many run in float.
        signed_inputs: ``"<op type> <input variable>"`` of each int8 op whose input is s8.
        fp32_weights: Weight variables of the conv/fc ops that run in float (the exported
            program's weight names, to tell which calibrated layers Paddle kept fp32).
        int8_other: Op type -> how many ops without a weight run int8 (concat, pool2d,
            elementwise ops, ...).
        fused_activations: Activation -> how many int8 conv/fc ops compute it as part of
            their kernel (``relu``, ``gelu``, ...).
        float_product_weights: Persistable inputs (also through unsqueeze, expand, reshape
            or transpose ops) of the products Paddle has no int8 kernel for
            (:data:`FLOAT_PRODUCT_OPS`: ``einsum``, ``bmm``, ``addmm``, ``nn.Bilinear``'s and
            deformable convs' ops), which always run in float: weights no calibrated layer
            quantizes.
        target: The target the model was exported for (its ``.calibration.json``), or
            ``None``. For one that no oneDNN kernel runs (``arm``: a Paddle Lite program), the
            report is of Paddle Inference's x86 passes, not of what that runtime runs.
    """

    int8: dict[str, int]
    fp32: dict[str, int]
    signed_inputs: list[str]
    fp32_weights: list[str] = dataclasses.field(default_factory=list)
    int8_other: dict[str, int] = dataclasses.field(default_factory=dict)
    fused_activations: dict[str, int] = dataclasses.field(default_factory=dict)
    float_product_weights: list[str] = dataclasses.field(default_factory=list)
    target: str | None = None

    def summary(self) -> str:
        """One line: counts of int8 and fp32 conv/fc ops, and the s8-input ones."""
        int8 = sum(self.int8.values())
        fp32 = sum(self.fp32.values())
        text = f"Paddle Inference runs {int8} conv/fc ops int8 ({_counts(self.int8)}) and {fp32} in fp32"
        if self.fp32:
            text += f" ({_counts(self.fp32)})"
        if self.signed_inputs:
            text += f"; {len(self.signed_inputs)} int8 ops read a signed (s8) input"
        if self.target in TARGETS and not TARGETS[self.target].onednn:
            runtime = "Paddle Lite" if TARGETS[self.target].paddle_lite else "another runtime"
            text += (
                f" (exported for target {self.target!r}, a program for {runtime}: not what "
                f"{runtime} runs)"
            )
        return text


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{count} {kind}" for kind, count in sorted(counts.items())) or "none"


@main_thread_only
def int8_report(path_prefix: str | os.PathLike, num_threads: int = 1) -> Int8Report:
    """Reads back what Paddle Inference's int8 passes made of ``path_prefix``.

    Raises:
        FileNotFoundError: The model or parameter file is missing.
    """
    path_prefix = os.fspath(path_prefix)
    for suffix in (".pdmodel", ".pdiparams"):
        if not os.path.isfile(path_prefix + suffix):
            raise FileNotFoundError(f"{path_prefix + suffix} does not exist")
    with tempfile.TemporaryDirectory() as cache:
        config = paddle_infer.Config(path_prefix + ".pdmodel", path_prefix + ".pdiparams")
        config.enable_mkldnn()
        config.enable_mkldnn_int8()
        for name in INT8_DELETED_PASSES:
            config.delete_pass(name)
        program = program_desc(path_prefix + ".pdmodel")
        if program is not None:
            avoid_paddle_defects(config, program)  # as create_predictor does
        config.set_cpu_math_library_num_threads(num_threads)
        config.enable_save_optim_model(True)
        config.set_optim_cache_dir(cache)
        config.disable_glog_info()
        with quiet_native_output():
            paddle_infer.create_predictor(config)
        with open(os.path.join(cache, "_optimized.pdmodel"), "rb") as file, legacy_static_mode():
            program = paddle.base.framework.Program.parse_from_string(file.read())
    report = _report(program.global_block())
    report.target = exported_target(path_prefix)
    if report.target in TARGETS and not TARGETS[report.target].onednn:
        logger.warning(
            "int8_report(%s): the model was exported for target %r, whose int8 arithmetic is "
            "not oneDNN's; the report is of Paddle Inference's x86 passes on it, not of what "
            "%s runs", path_prefix, report.target,
            "Paddle Lite" if TARGETS[report.target].paddle_lite else "its runtime",
        )
    return report


def _report(block) -> Int8Report:
    writers = {name: op for op in block.ops for slot in op.output_names for name in op.output(slot)}
    int8: collections.Counter = collections.Counter()
    fp32: collections.Counter = collections.Counter()
    signed, fp32_weights = [], []
    int8_other: collections.Counter = collections.Counter()
    fused: collections.Counter = collections.Counter()
    others: list[str] = []
    for op in block.ops:
        if op.type in FLOAT_PRODUCT_OPS:
            for slot in FLOAT_PRODUCT_OPS[op.type]:
                for name in op.input(slot) if slot in op.input_names else ():
                    source = block._find_var_recursive(_laid_out_from(name, writers))
                    if source is not None and source.persistable and len(source.shape) >= 2:
                        others.append(source.name)
        if op.type not in GEMM_OPS:
            if _runs_int8(op):
                int8_other[op.type] += 1
            continue
        if not _runs_int8(op):
            fp32[op.type] += 1
            fp32_weights.extend(
                op.input(slot)[0] for slot in ("Filter", "W", "Y", "WeightX", "WeightList")
                if slot in op.input_names and op.input(slot)
            )
            continue
        int8[op.type] += 1
        activation = next(
            (op.attr(name) for name in ("fuse_activation", "activation_type") if op.has_attr(name) and op.attr(name)),
            "",
        )
        if activation:
            fused[activation] += 1
        source = op.input("Input" if "Input" in op.input_names else "X")[0]
        # fusion_lstm always reads its input shifted into u8; whether its int16 pair sums
        # saturate is decided by the weight scales the export gives it (quant_rnn.py).
        if op.type != "fusion_lstm" and _is_signed(source, writers):
            signed.append(f"{op.type} {source}")
    return Int8Report(dict(int8), dict(fp32), signed, fp32_weights, dict(int8_other), dict(fused), others)


#: Ops that lay a tensor out anew (a parameter unsqueezed and expanded to a batch for ``bmm``).
_LAYOUT_OPS = frozenset({"unsqueeze2", "squeeze2", "expand_v2", "expand_as_v2", "tile", "reshape2", "transpose2"})


def _laid_out_from(name: str, writers: dict) -> str:
    """The tensor ``name`` is laid out from through :data:`_LAYOUT_OPS` (itself if none)."""
    while name in writers and writers[name].type in _LAYOUT_OPS:
        name = writers[name].input("X")[0]
    return name


def _runs_int8(op) -> bool:
    return op.has_attr("mkldnn_data_type") and op.attr("mkldnn_data_type") == "int8"


def _is_signed(name: str, writers: dict) -> bool:
    """Whether the int8 tensor ``name`` is s8: from the quantize op or int8 op that wrote it."""
    seen = set()
    while name not in seen:
        seen.add(name)
        op = writers.get(name)
        if op is None:
            return True
        if op.type == "quantize":
            return bool(op.attr("is_negative_input"))
        if op.type in GEMM_OPS and _runs_int8(op):
            activation = ""
            for attr in ("fuse_activation", "activation_type"):
                if op.has_attr(attr):
                    activation = op.attr(attr)
            # A fc's fused relu6 runs s8 (measured); a conv's relu/relu6 and a fc's relu u8.
            return not (activation == "relu" or activation == "relu6" and op.type != "fc")
        if op.type not in _TYPE_PRESERVING_OPS:
            return True
        name = op.input("Input" if "Input" in op.input_names else "X")[0]
    return True
