"""Paddle Inference predictors for exported programs."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator, Sequence

import numpy as np
import paddle.inference as paddle_infer

from ..calibration_table import read_table
from ..cpu import cpu_info
from ..targets import TARGETS

__all__ = ["create_predictor", "exported_target", "predict"]

logger = logging.getLogger(__name__)

#: Passes removed from int8 pipelines. ``repeated_fc_relu_fuse_pass`` fuses an MLP's fc+relu
#: chain into one fp32 op before the int8 passes see it, so an int8 MLP would run in fp32
#: (FIELD_NOTES: ~4x faster once deleted).
INT8_DELETED_PASSES = ("repeated_fc_relu_fuse_pass",)


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


def _warn_if_target_needs_vnni(path_prefix: str) -> None:
    name = exported_target(path_prefix)
    if name not in TARGETS or not TARGETS[name].requires_vnni:
        return
    cpu = cpu_info()
    if not cpu.vnni:
        logger.warning(
            "%s was exported for target %r, whose int8 kernels are exact only with VNNI, but "
            "this CPU has none (%s): its int8 layers reading signed inputs saturate here. "
            "Export it with PTQConfig(target='x86') to run right on every x86 CPU.",
            path_prefix, name, cpu.describe(),
        )


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
    path_prefix = os.fspath(path_prefix)
    if num_threads is None:
        num_threads = _default_threads()
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise TypeError(f"num_threads must be a positive int, got {num_threads!r}")
    model_file, params_file = path_prefix + ".pdmodel", path_prefix + ".pdiparams"
    for file in (model_file, params_file):
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"{file} does not exist: pass the prefix given to save_quantized_model "
                f"(e.g. 'out/model' for out/model.pdmodel)"
            )
    if int8:
        _warn_if_target_needs_vnni(path_prefix)
    config = paddle_infer.Config(model_file, params_file)
    config.enable_mkldnn()
    if int8:
        config.enable_mkldnn_int8()
        for name in INT8_DELETED_PASSES:
            config.delete_pass(name)
    config.set_cpu_math_library_num_threads(num_threads)
    config.disable_glog_info()
    logger.debug("predictor for %s: int8=%s threads=%d", path_prefix, int8, num_threads)
    with quiet_native_output():
        predictor = paddle_infer.create_predictor(config)
        # The int8 passes run (and print) on the first call.
        for name in predictor.get_input_names():
            predictor.get_input_handle(name)
    return predictor


def predict(predictor: "paddle_infer.Predictor", *inputs: np.ndarray) -> list[np.ndarray]:
    """Runs ``predictor`` on numpy inputs (in input order) and returns all outputs."""
    names: Sequence[str] = predictor.get_input_names()
    if len(inputs) != len(names):
        raise ValueError(f"the program takes {len(names)} inputs ({names}), got {len(inputs)}")
    for name, value in zip(names, inputs):
        predictor.get_input_handle(name).copy_from_cpu(np.ascontiguousarray(value))
    predictor.run()
    return [predictor.get_output_handle(name).copy_to_cpu() for name in predictor.get_output_names()]
