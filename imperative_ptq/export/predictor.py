"""Paddle Inference predictors for exported programs."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import weakref
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import paddle.inference as paddle_infer

from ..calibration_table import read_table
from ..cpu import cpu_info
from ..targets import TARGETS
from .atomic import recover_export

__all__ = [
    "RESHAPE_TRANSPOSE_MATMUL_PASS", "avoid_paddle_defects", "create_predictor", "exported_target", "predict",
    "predictor_config", "pads_paddle_misplaces", "program_desc", "program_input_dtypes",
    "transposes_paddle_fuses_wrongly",
]

logger = logging.getLogger(__name__)

#: Passes removed from int8 pipelines. ``repeated_fc_relu_fuse_pass`` fuses an MLP's fc+relu
#: chain into one fp32 op before the int8 passes see it, so an int8 MLP would run in fp32
#: (measured on an MLP: ~4x faster once deleted, AVX-512 VNNI CPU, 2026-11-22).
INT8_DELETED_PASSES = ("repeated_fc_relu_fuse_pass",)

#: numpy dtypes of Paddle's tensor types (``VarType.Type`` names of a legacy program).
_PADDLE_DTYPES = {
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "INT8": np.int8,
    "UINT8": np.uint8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_,
}

#: The program input dtypes of the predictors made by :func:`create_predictor` (Paddle's input
#: handles report float32 until data is copied in, whatever the program takes).
_INPUT_DTYPES: "weakref.WeakKeyDictionary[Any, dict[str, np.dtype]]" = weakref.WeakKeyDictionary()
#: Their input shapes (``-1``: any size), likewise.
_INPUT_SHAPES: "weakref.WeakKeyDictionary[Any, dict[str, list[int]]]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """Silences the pass log that oneDNN's int8 passes write straight to file descriptors 1
    and 2 (they ignore ``disable_glog_info``), unless this module logs at DEBUG level. Failures
    still surface: Paddle raises them as Python exceptions."""
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    try:
        with open(os.devnull, "wb") as devnull:
            for fd in saved:
                os.dup2(devnull.fileno(), fd)
        yield
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def exported_target(path_prefix: str) -> str | None:
    """The target an export was written for, from its ``.calibration.json`` (``None`` if the
    file is missing or does not say)."""
    path = path_prefix + ".calibration.json"
    if not os.path.isfile(path):
        return None
    try:
        _, config = read_table(path)
    except ValueError:
        return None
    target = config.get("target")
    return target if isinstance(target, str) else None


def _warn_if_this_cpu_computes_otherwise(path_prefix: str) -> None:
    name = exported_target(path_prefix)
    if name not in TARGETS:
        return
    if not TARGETS[name].onednn:
        logger.warning(
            "%s was exported for target %r, whose simulation computes what %s's int8 kernels "
            "compute, not Paddle Inference's oneDNN ones: run it there (the program is for "
            "Paddle Lite's opt), or export it with PTQConfig(target='x86') for Paddle Inference "
            "on x86 CPUs.",
            path_prefix, name, "Paddle Lite" if TARGETS[name].paddle_lite else "another runtime",
        )
        return
    if TARGETS[name].halved_signed_convs:
        cpu = cpu_info()
        if cpu.isa != "avx2":
            logger.warning(
                "%s was exported for target %r, whose convs reading signed inputs compute "
                "with the 7-bit weights of oneDNN's AVX2 int8 kernels, but this CPU's int8 "
                "kernels are %s (%s): those convs compute with other weights here than the "
                "simulation's (their 8-bit ones where the CPU has VNNI). Export it with "
                "PTQConfig(target='native') on this kind of CPU, or target='x86' to run the same "
                "on every x86 CPU.",
                path_prefix, name, cpu.isa, cpu.describe(),
            )
        return
    if not TARGETS[name].requires_vnni:
        return
    cpu = cpu_info()
    if not cpu.vnni:
        logger.warning(
            "%s was exported for target %r, whose int8 kernels are exact only with VNNI, but "
            "this CPU has none (%s): its int8 layers reading signed inputs saturate here. "
            "Export it with PTQConfig(target='x86') to run right on every x86 CPU.",
            path_prefix, name, cpu.describe(),
        )


def predictor_config(
    path_prefix: str | os.PathLike, int8: bool = True, num_threads: int | None = None
) -> "paddle_infer.Config":
    """The oneDNN ``paddle.inference.Config`` :func:`create_predictor` builds its predictor
    from (for callers that add options of their own, e.g. ``enable_save_optim_model``).

    Args and Raises: as :func:`create_predictor`.
    """
    path_prefix = os.fspath(path_prefix)
    if num_threads is None:
        num_threads = _default_threads()
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise TypeError(f"num_threads must be a positive int, got {num_threads!r}")
    recover_export(path_prefix)  # an export killed while moving its files: complete it
    model_file, params_file = path_prefix + ".pdmodel", path_prefix + ".pdiparams"
    for file in (model_file, params_file):
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"{file} does not exist: pass the prefix given to save_quantized_model "
                f"(e.g. 'out/model' for out/model.pdmodel)"
            )
    if int8:
        _warn_if_this_cpu_computes_otherwise(path_prefix)
    config = paddle_infer.Config(model_file, params_file)
    config.enable_mkldnn()
    if int8:
        config.enable_mkldnn_int8()
        for name in INT8_DELETED_PASSES:
            config.delete_pass(name)
    program = program_desc(model_file)
    if int8 and program is not None:
        _warn_if_amx_patch_convs(path_prefix, program)
    if program is not None:
        for workaround in avoid_paddle_defects(config, program):
            logger.info("%s: %s", path_prefix, workaround)
    if program is not None and _casts_int8_parameters(program):
        # A weight-only program (save_dynamic_model): constant_folding_pass turns its int8
        # weights into float32 ones, but in Paddle's list it runs after fc_fuse_pass, which
        # fuses a matmul into fc only when the weight is already a parameter. Folded first,
        # the program fuses like its fp32 original (measured on a 6-block transformer: 38 fc,
        # as fp32, instead of 50 fused_matmul; 0.87x -> 0.98x fp32 speed, rough).
        config.pass_builder().insert_pass(0, "constant_folding_pass")
    config.set_cpu_math_library_num_threads(num_threads)
    # Intermediate tensors share memory once their readers are done: the int8 program's many
    # small ops (quantize, shift, clip) then touch less of it. Measured side by side, one
    # thread, Zen 5 (AVX-512 VNNI): a BERT-shaped encoder's int8 forward 52.7 -> 44.8 ms at
    # batch 8 (fp32 106.4 -> 103.7), MobileNetV3-small 13.1 -> 11.3 ms (fp32 11.1 -> 9.9);
    # ResNet-18 and an MLP within noise; outputs identical. (With oneDNN's AVX2 kernels the
    # encoder's gain was 2%.)
    config.enable_memory_optim()
    config.disable_glog_info()
    logger.debug("predictor for %s: int8=%s threads=%d", path_prefix, int8, num_threads)
    return config


def avoid_paddle_defects(config: "paddle_infer.Config", program: Any) -> list[str]:
    """Changes ``config`` so that Paddle 3.3.1's passes and kernels that compute ``program``
    wrongly stay out (:func:`transposes_paddle_fuses_wrongly`, :func:`pads_paddle_misplaces`,
    :func:`divisions_paddle_misbroadcasts`); returns what it changed, a sentence each."""
    changed = []
    if transposes_paddle_fuses_wrongly(program):
        config.delete_pass(RESHAPE_TRANSPOSE_MATMUL_PASS)
        changed.append(
            f"{RESHAPE_TRANSPOSE_MATMUL_PASS} left out (it fuses a reshape with a size-1 "
            "dimension and a transpose into a matmul and computes it wrongly)"
        )
    kept_out = set()
    if pads_paddle_misplaces(program):
        kept_out.add("pad")
        changed.append(
            "its pad ops run in Paddle's CPU kernel (oneDNN's pads the wrong axes and writes outside its output)"
        )
    if divisions_paddle_misbroadcasts(program):
        kept_out.add("elementwise_div")
        changed.append(
            "its divisions run in Paddle's CPU kernel (oneDNN's broadcasts a dividend smaller "
            "than the divisor wrongly)"
        )
    if kept_out:
        # (set_mkldnn_op: the op types oneDNN may run; the others keep Paddle's CPU kernels)
        config.set_mkldnn_op({op.type for op in program.blocks[0].ops} - kept_out)
    return changed


def create_predictor(
    path_prefix: str | os.PathLike, int8: bool = True, num_threads: int | None = None
) -> "paddle_infer.Predictor":
    """A oneDNN predictor for ``path_prefix.pdmodel`` / ``.pdiparams``.

    Args:
        path_prefix: Prefix written by ``save_quantized_model`` (or any legacy program).
        int8: Run the oneDNN int8 pipeline (``enable_mkldnn_int8``); False runs fp32 oneDNN.
        num_threads: CPU math threads; default all CPUs this process may use.

    Raises:
        TypeError: ``num_threads`` is not a positive int.
        FileNotFoundError: The model or parameter file is missing.
    """
    config = predictor_config(path_prefix, int8, num_threads)
    with quiet_native_output():
        predictor = paddle_infer.create_predictor(config)
        # The int8 passes run (and print) on the first call.
        for name in predictor.get_input_names():
            predictor.get_input_handle(name)
    feeds = _feed_tensors(program_desc(os.fspath(path_prefix) + ".pdmodel"))
    _INPUT_DTYPES[predictor] = _numpy_dtypes(feeds)
    _INPUT_SHAPES[predictor] = {name: [int(size) for size in tensor.dims] for name, tensor in feeds.items()}
    return predictor


def program_desc(model_file: str | os.PathLike) -> Any:
    """The ``ProgramDesc`` protobuf of a legacy ``.pdmodel`` file, or ``None`` if it is not
    one (or holds no block)."""
    from paddle.base.proto import framework_pb2

    program = framework_pb2.ProgramDesc()
    try:
        with open(model_file, "rb") as file:
            program.ParseFromString(file.read())
    except Exception as error:  # protobuf's DecodeError, or an unreadable file
        logger.debug("cannot read %s as a legacy program: %s", model_file, error)
        return None
    return program if program.blocks else None


def _attribute(op: Any, name: str) -> Any:
    """The value of attribute ``name`` of a protobuf ``OpDesc`` (ints, a string, ...)."""
    for attr in op.attrs:
        if attr.name == name:
            return list(attr.ints) if attr.ints else (attr.s if attr.HasField("s") else attr.i)
    return None


def patch_convs(program: Any) -> list[str]:
    """The int8 convs of ``program`` whose kernel equals their stride and that read no
    padding (patch embeddings, SegFormer's spatial reduction): their outputs."""
    block = program.blocks[0]
    dims = {var.name: list(var.type.dense_tensor.tensor.dims) for var in block.vars if var.type.HasField("dense_tensor")}
    dequantized = {
        name for op in block.ops if op.type == "dequantize_linear"
        for slot in op.outputs for name in slot.arguments
    }
    found = []
    for op in block.ops:
        if op.type not in ("conv2d", "depthwise_conv2d"):
            continue
        slots = {slot.parameter: list(slot.arguments) for slot in op.inputs}
        outputs = {slot.parameter: list(slot.arguments) for slot in op.outputs}
        weight = (slots.get("Filter") or [""])[0]
        kernel = dims.get(weight, [])[2:]
        padding = _attribute(op, "padding_algorithm")
        if (
            weight in dequantized and kernel and kernel == _attribute(op, "strides")
            and not any(_attribute(op, "paddings") or []) and padding != "SAME"
        ):
            found.extend(outputs.get("Output", []))
    return found


def _warn_if_amx_patch_convs(path_prefix: str, program: Any) -> None:
    """Warns on an AMX CPU about int8 convs whose kernel equals their stride, unpadded:
    oneDNN's AMX kernel for them returned wrong values (measured with Paddle 3.3.1's oneDNN:
    ``Conv2D(32, 32, 4, stride=4)`` at logit cosine 0.09 to exact int8 arithmetic, 32 and 48
    input channels at kernels 4 and 8 wrong, 16 and 64 right; its AVX-512 VNNI kernels exact)."""
    cpu = cpu_info()
    if cpu.isa != "amx":
        return
    found = patch_convs(program)
    if found:
        logger.warning(
            "%s: %d int8 convs have a kernel equal to their stride and no padding (%s), which "
            "oneDNN's AMX int8 kernels have computed wrongly on this CPU (%s) for some channel "
            "counts: set ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI in the environment before "
            "importing paddle to run them on VNNI kernels, which are exact",
            path_prefix, len(found), ", ".join(found[:5]), cpu.describe(),
        )


#: Paddle Inference's oneDNN pass folding ``reshape2 -> transpose2`` into a matmul's input.
RESHAPE_TRANSPOSE_MATMUL_PASS = "reshape_transpose_matmul_onednn_fuse_pass"
_MATMUL_TYPES = ("matmul", "matmul_v2", "fused_matmul")


def transposes_paddle_fuses_wrongly(program: Any) -> bool:
    """Whether ``program`` feeds a matmul a ``transpose2`` (not the identity) of a ``reshape2``
    whose shape has a size-1 dimension: :data:`RESHAPE_TRANSPOSE_MATMUL_PASS` folds the two
    into the matmul, whose kernel then reads the wrong elements (measured on Paddle 3.3.1: a
    PyTorch-exported encoder's attention, ``[12, 1, 4, 16]`` with axes ``[1, 2, 0, 3]``, 0.35
    of the largest value off in fp32 alike; a ``[3, 1, 4, 5]`` reshape wrong for 4 of the 24
    axis orders, right without a size-1 dimension)."""
    block = program.blocks[0]
    writers = {name: op for op in block.ops for slot in op.outputs for name in slot.arguments}

    def writer_through_qdq(name: str | None) -> Any:
        # (Paddle's int8 passes drop the quantize/dequantize pairs before they fuse.)
        op = writers.get(name)
        while op is not None and op.type in ("quantize_linear", "dequantize_linear"):
            source = next((s.arguments[0] for s in op.inputs if s.parameter == "X" and s.arguments), None)
            op = writers.get(source)
        return op

    for op in block.ops:
        if op.type not in _MATMUL_TYPES:
            continue
        for slot in op.inputs:
            if slot.parameter not in ("X", "Y") or not slot.arguments:
                continue
            transpose = writer_through_qdq(slot.arguments[0])
            if transpose is None or transpose.type != "transpose2":
                continue
            axis = list(_attribute(transpose, "axis") or [])
            source = next((s.arguments[0] for s in transpose.inputs if s.parameter == "X" and s.arguments), None)
            reshape = writer_through_qdq(source)
            if reshape is None or reshape.type != "reshape2" or axis == sorted(axis):
                continue
            shape = list(_attribute(reshape, "shape") or [])
            if 2 <= len(shape) <= 4 and len(shape) == len(axis) and 1 in shape:
                return True
    return False


def pads_paddle_misplaces(program: Any) -> bool:
    """Whether ``program`` has a ``pad`` op that pads (the form ``F.pad`` takes with a pair
    for every axis: MediaPipe's BlazeFace widens a residual branch so, x2paddle writes every
    ONNX ``Pad`` so, ConvBERT's span convolution pads its tokens): Paddle 3.3.1's oneDNN
    ``pad`` kernel pads other axes than it is given, fp32 alike (measured: 4 channels added
    to a ``[1, 8, 64, 64]`` tensor gave ``[1, 8, 64, 68]``), and writes outside the tensor
    Paddle allocated for it, which corrupts the heap (measured on the Zen 4 EPYC: a
    ``[1, 3, 8, 8]`` tensor padded by 1 and 2 on its height and width, a ``[1, 32, 32, 1]``
    one by 4 on its third axis; the predictor aborts in ``malloc`` or hangs)."""
    for op in program.blocks[0].ops:
        if op.type == "pad" and any(_attribute(op, "paddings") or []):
            return True
    return False


def divisions_paddle_misbroadcasts(program: Any) -> bool:
    """Whether ``program`` divides a tensor by one it broadcasts against (an
    ``elementwise_div`` whose ``X`` has another shape than its output: T5's and LLaMA's
    RMSNorm as x2paddle writes ONNX's ``Div(1, sqrt(...))``): Paddle 3.3.1's oneDNN kernel
    computes it wrongly, fp32 alike (measured: ``1 / r`` of a ``[1, 32, 1]`` tensor 8x the
    largest value off, ``r / x`` of ``[1, 32, 1]`` by ``[1, 32, 128]`` 0.90; ``x / r``,
    ``r - x``, ``maximum(r, x)`` and ``pow(r, x)`` exact)."""
    block = program.blocks[0]
    dims = {var.name: list(var.type.dense_tensor.tensor.dims) for var in block.vars if var.type.HasField("dense_tensor")}
    for op in block.ops:
        if op.type != "elementwise_div":
            continue
        x = next((slot.arguments[0] for slot in op.inputs if slot.parameter == "X" and slot.arguments), None)
        out = next((slot.arguments[0] for slot in op.outputs if slot.parameter == "Out" and slot.arguments), None)
        x_dims, out_dims = dims.get(x), dims.get(out)
        if x_dims is None or out_dims is None or x_dims != out_dims:
            return True
    return False


def _casts_int8_parameters(program: Any) -> bool:
    """Whether a ``cast`` op of ``program`` reads an int8 parameter (the weight-only int8
    programs of :func:`.dynamic_export.save_dynamic_model`)."""
    from paddle.base.proto import framework_pb2

    block = program.blocks[0]
    int8 = framework_pb2.VarType.Type.Value("INT8")
    parameters = {
        var.name for var in block.vars
        if var.persistable and var.type.HasField("dense_tensor")
        and var.type.dense_tensor.tensor.data_type == int8
    }
    return any(
        op.type == "cast" and any(name in parameters for slot in op.inputs for name in slot.arguments)
        for op in block.ops
    )


def _shape_mismatch(predictor: Any, names: Sequence[str], arrays: Sequence[np.ndarray]) -> str | None:
    """The first input whose shape is not one the program was traced with, described, or
    ``None`` (also for a predictor :func:`create_predictor` did not make)."""
    try:
        shapes = _INPUT_SHAPES.get(predictor, {})
    except TypeError:
        return None
    for position, (name, array) in enumerate(zip(names, arrays)):
        shape = shapes.get(name)
        if shape is not None and (
            len(shape) != array.ndim or any(size >= 0 and size != got for size, got in zip(shape, array.shape))
        ):
            return (
                f"input {position} ({name!r}) has shape {list(array.shape)}, the program was traced "
                f"for {[None if size < 0 else size for size in shape]} (None: any size; export with "
                f"None in the input_spec for a size that varies)"
            )
    return None


def program_input_dtypes(model_file: str | os.PathLike) -> dict[str, np.dtype]:
    """The numpy dtypes of a legacy program's inputs (its feed variables), by name.

    Args:
        model_file: A ``.pdmodel`` file.

    Returns:
        ``{input name: dtype}``; empty when the file is not a legacy program, and without the
        inputs whose type has no numpy dtype (bfloat16).
    """
    return _numpy_dtypes(_feed_tensors(program_desc(model_file)))


def _feed_tensors(program: Any) -> dict[str, Any]:
    """The tensor descriptions (data type, dims: ``-1`` for a size the program takes any of)
    of a parsed legacy program's feed variables, by name; empty for ``None``."""
    if program is None:
        return {}
    block = program.blocks[0]
    types = {var.name: var.type for var in block.vars}
    tensors: dict[str, Any] = {}
    for op in block.ops:
        for slot in op.outputs if op.type == "feed" else ():
            for name in slot.arguments:
                var_type = types.get(name)
                if var_type is not None and var_type.HasField("dense_tensor"):
                    tensors[name] = var_type.dense_tensor.tensor
    return tensors


def _numpy_dtypes(tensors: Mapping[str, Any]) -> dict[str, np.dtype]:
    """The numpy dtypes of :func:`_feed_tensors`' descriptions (those that have one)."""
    from paddle.base.proto import framework_pb2

    dtypes: dict[str, np.dtype] = {}
    for name, tensor in tensors.items():
        type_name = framework_pb2.VarType.Type.Name(tensor.data_type)
        if type_name in _PADDLE_DTYPES:
            dtypes[name] = np.dtype(_PADDLE_DTYPES[type_name])
    return dtypes


def _holds_arrays(value: Any) -> bool:
    """Whether ``value`` is a list or tuple of arrays or tensors (inputs, not numbers)."""
    return (
        isinstance(value, (list, tuple)) and len(value) > 0
        and all(isinstance(item, np.ndarray) or hasattr(item, "numpy") for item in value)
    )


def _input_array(position: int, name: str, value: Any, expected: np.dtype | None) -> np.ndarray:
    """``value`` as a contiguous array of the dtype the program's input takes.

    Raises:
        TypeError: ``value`` is no array (or list of numbers), or its data cannot become
            ``expected`` without loss.
    """
    where = f"predict input {position} ({name!r})"
    if isinstance(value, (list, tuple)):
        try:
            value = np.asarray(value)
        except ValueError as error:  # a ragged list
            raise TypeError(f"{where}: cannot make an array of the list: {error}") from None
    if not isinstance(value, np.ndarray):
        kind = f"{type(value).__module__}.{type(value).__name__}".replace("builtins.", "")
        fix = "pass tensor.numpy()" if hasattr(value, "numpy") else "pass a numpy array"
        raise TypeError(f"{where} must be a numpy array, got {kind}: {fix}")
    if value.dtype.kind not in "biuf":
        raise TypeError(f"{where} holds {value.dtype} data, not numbers")
    if expected is None:  # a predictor made elsewhere: float data as float32, like Paddle's layers
        expected = np.dtype(np.float32) if value.dtype.kind == "f" else value.dtype
    if value.dtype == expected:
        return np.ascontiguousarray(value)
    if expected.kind == "f" and value.dtype.kind == "f":
        return np.ascontiguousarray(value, dtype=expected)  # float64 data: the program's float
    if value.dtype.kind != "f" and expected.kind != "b":
        converted = value.astype(expected)
        if np.array_equal(converted.astype(value.dtype), value):  # every value kept
            return np.ascontiguousarray(converted)
        raise TypeError(
            f"{where} is {value.dtype} but the program takes {expected}: some values do not "
            f"fit in {expected}"
        )
    raise TypeError(
        f"{where} is {value.dtype} but the program takes {expected}: convert it yourself "
        f"(e.g. array.astype(np.{expected.name})) if that is what you mean"
    )


def predict(predictor: "paddle_infer.Predictor", *inputs: np.ndarray) -> list[np.ndarray]:
    """Runs ``predictor`` on numpy inputs (in input order) and returns all outputs.

    Each input is converted to the dtype the program's input takes (known for predictors made
    by :func:`create_predictor`; otherwise float data are fed as float32 and other data as
    they are): float64 data to a float32 input, or integers that fit (token ids as int32 to
    an int64 input). Lists of numbers are made arrays.

    Args:
        predictor: A Paddle Inference predictor, e.g. from :func:`create_predictor`.
        *inputs: One array per program input, in ``get_input_names()`` order.

    Returns:
        Every output of the program, as numpy arrays.

    Raises:
        ValueError: The number of inputs is not the program's, an input has no elements, or
            the program fails on an input of another shape than it was traced for (predictors
            made by :func:`create_predictor`; the message names it).
        TypeError: The inputs come as one list of arrays (pass them as separate
            arguments), an input is no numpy array (a ``paddle.Tensor``: pass ``.numpy()``), or
            its data cannot be converted without loss (float data for an int64 input); the
            message names the input's position, its dtype and the program's.
    """
    names: Sequence[str] = predictor.get_input_names()
    if len(inputs) == 1 and _holds_arrays(inputs[0]):
        # predict(predictor, [x]) as for Paddle's own run(inputs): numpy would stack the list
        # into one array of another rank, which the program then refuses in its own words.
        raise TypeError(
            f"predict takes one array per program input as separate arguments: "
            f"predict(predictor, *arrays), not a {type(inputs[0]).__name__} of "
            f"{len(inputs[0])} arrays (the program takes {len(names)}: {names})"
        )
    if len(inputs) != len(names):
        raise ValueError(f"the program takes {len(names)} inputs ({names}), got {len(inputs)}")
    try:
        expected = _INPUT_DTYPES.get(predictor, {})
    except TypeError:  # not weak-referenceable: not made by create_predictor
        expected = {}
    arrays = [
        _input_array(position, name, value, expected.get(name))
        for position, (name, value) in enumerate(zip(names, inputs))
    ]
    for position, (name, array) in enumerate(zip(names, arrays)):
        if array.ndim and array.size == 0:
            # oneDNN's kernels fail on it ("could not create a primitive descriptor"), some
            # (roi_align reading zero boxes) crash the process.
            raise ValueError(
                f"input {position} ({name!r}) is empty (shape {list(array.shape)}): Paddle "
                f"Inference cannot run a tensor without elements; skip the call, or pass at "
                f"least one row"
            )
    for name, array in zip(names, arrays):
        predictor.get_input_handle(name).copy_from_cpu(array)
    try:
        predictor.run()
    except Exception as error:
        # Paddle's message names a kernel's operands ("2048 vs 512" from a matmul); a program
        # traced for other sizes (a fully convolutional one runs any) is named here.
        mismatch = _shape_mismatch(predictor, names, arrays)
        if mismatch is None:
            raise
        raise ValueError(f"{mismatch}; Paddle Inference failed: {str(error).strip().splitlines()[0]}") from error
    return [predictor.get_output_handle(name).copy_to_cpu() for name in predictor.get_output_names()]
