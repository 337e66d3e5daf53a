"""Deployment targets: the int8 arithmetic each runtime really performs.

The dygraph simulation after ``convert`` is a promise about what the exported model computes,
so it has to model the target's integer kernels, not an ideal int8 machine. Measured on Paddle
3.3.1's oneDNN kernels, one layer at a time (``benchmarks/int8_arithmetic_probe.py``):

* With VNNI (AVX-512 VNNI, AVX-VNNI, AMX) every int8 conv/fc accumulates u8 x s8 or s8 x s8
  products exactly in int32.
* Without VNNI (AVX2, AVX-512 without VNNI) oneDNN multiplies u8 x s8 byte pairs with
  ``vpmaddubsw``, whose pairwise sums saturate at int16 (2 * 255 * 127 > 32767). An unsigned
  (u8) input that uses its whole 0..255 range, as Paddle's pipeline makes every ReLU output,
  saturates; a signed (s8) input is shifted by +128 into u8 first, so a fc/matmul reading it
  saturates too (measured: 37% relative error on one Linear reading dense non-negative data),
  while a conv reading it has its weights halved by oneDNN (7-bit weights, no saturation,
  ties rounded by float noise: 1.6% relative error against the 8-bit simulation).
* u8 inputs kept within 0..127 can never saturate (2 * 127 * 127 < 32767) and are exact
  on every x86 CPU: that is what the x86 targets export for every non-negative input (except
  the values above the threshold of a ReLU after a residual conv, codes up to 255, which the
  simulation reads too where calibration saw the add: see :mod:`imperative_ptq.export.unsigned`
  and :mod:`imperative_ptq.quant_residual`).
* A signed input of a fc or an unpadded conv (not a patch embedding) becomes such a u8 input by a shift: the
  ``x86`` target simulates it on a 7-bit affine grid (codes 0..127, zero point ``z``) and the
  export adds ``z * scale`` to the input and subtracts the weight's response to it from the
  bias (:mod:`imperative_ptq.export.shifted`), exact on every x86 CPU. Other layers with a
  signed input (a padded conv, whose border would see the shift) stay fp32 on ``x86``, the
  one form that computes the same on every x86 CPU; ``x86-vnni`` runs them all int8 on s8
  (exact with VNNI only); ``x86-avx2`` runs the convs int8 on s8 with the halved weights
  oneDNN's AVX2 kernels compute with (:mod:`imperative_ptq.halved_convs`; exact on CPUs whose
  int8 kernels are AVX2 only: no VNNI, no AVX-512).

Paddle Lite's ARM int8 kernels take s8 activations with symmetric thresholds, so the ``arm``
target keeps the plain symmetric 8-bit simulation (not measured here: no ARM CPU).
"""

from __future__ import annotations

import dataclasses
import logging

__all__ = ["DEFAULT_TARGET", "NATIVE_TARGET", "TARGETS", "Target", "get_target", "resolve_target"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Target:
    """The int8 arithmetic of one deployment target.

    Attributes:
        name: The name passed as ``target=``.
        description: One line for docs, logs and errors.
        unsigned_inputs: Export every input that calibration saw non-negative as u8 limited to
            0..127 (the simulation's grid), so no int16 pair can saturate.
        signed_inputs_int8: Whether a conv/fc reading a signed input runs int8 exactly on
            every CPU of the target; where not, such a layer stays fp32, in the simulation and
            the export.
        shifted_signed_inputs: Where ``signed_inputs_int8`` is off, a fc or unpadded conv
            reading a signed input runs int8 on a shifted 7-bit u8 input instead of fp32.
        requires_vnni: The target's int8 kernels are only exact on CPUs with VNNI.
        onednn: The target runs in Paddle Inference's oneDNN int8 pipeline (x86): the export
            reads back what that pipeline runs (:func:`imperative_ptq.export.int8_report`).
        paddle_fc_weights: Linear layers run as Paddle Inference's oneDNN fc, which recomputes
            their weight scales its own way (:func:`imperative_ptq.quant_layers.paddle_fc_weight`):
            the simulation computes with that weight, and the ONNX export stores it.
        halved_signed_convs: A conv reading a signed input runs int8 on s8 with the 7-bit
            weights oneDNN's AVX2 kernels derive (:mod:`imperative_ptq.halved_convs`), before
            ``shifted_signed_inputs`` is tried; exact only where the int8 kernels are AVX2.
        paddle_lite: The program is converted by Paddle Lite's ``opt``: the export writes it in
            the op forms Lite reads (:mod:`imperative_ptq.export.paddle_lite`).
    """

    name: str
    description: str
    unsigned_inputs: bool
    signed_inputs_int8: bool
    shifted_signed_inputs: bool
    requires_vnni: bool
    onednn: bool
    paddle_fc_weights: bool
    halved_signed_convs: bool = False
    paddle_lite: bool = False


_X86 = Target(
    "x86",
    "any x86-64 CPU with AVX2 (Paddle Inference / oneDNN, ONNX Runtime): u8 inputs "
    "within 0..127 (signed inputs of fc and unpadded convs shifted into them); other "
    "layers with a signed input kept fp32",
    unsigned_inputs=True,
    signed_inputs_int8=False,
    shifted_signed_inputs=True,
    requires_vnni=False,
    onednn=True,
    paddle_fc_weights=True,
)

TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        _X86,
        Target(
            "x86-vnni",
            "x86-64 CPUs with AVX-512 VNNI, AVX-VNNI or AMX only: every conv/fc int8, "
            "exact int32 accumulation",
            unsigned_inputs=True,
            signed_inputs_int8=True,
            shifted_signed_inputs=False,
            requires_vnni=True,
            onednn=True,
            paddle_fc_weights=True,
        ),
        dataclasses.replace(
            _X86,
            name="x86-avx2",
            description="x86-64 CPUs whose int8 kernels are AVX2 (no VNNI, no AVX-512) only: as "
            "'x86', and every conv reading a signed input int8 on s8, on the 7-bit weights those "
            "kernels compute with",
            halved_signed_convs=True,
        ),
        Target(
            "arm",
            "ARM CPUs through Paddle Lite: symmetric s8 activations and weights",
            unsigned_inputs=False,
            signed_inputs_int8=True,
            shifted_signed_inputs=False,
            requires_vnni=False,
            onednn=False,
            paddle_fc_weights=False,
            paddle_lite=True,
        ),
    )
}

#: Correct on every x86 CPU (chosen by measurement: see the module docstring).
DEFAULT_TARGET = "x86"
#: Not a target but a choice made on the machine that converts: ``"x86-vnni"`` when this CPU
#: has VNNI or AMX (oneDNN dispatches those kernels here), ``"x86-avx2"`` when its int8
#: kernels are AVX2 (no AVX-512), else ``"x86"``. For models deployed on the machine (or the
#: kind of machine) they are converted on.
NATIVE_TARGET = "native"


def resolve_target(name: object) -> str:
    """``name``, with :data:`NATIVE_TARGET` replaced by the x86 target this CPU runs exactly
    and fastest (:func:`imperative_ptq.cpu.cpu_info`, which honours ``ONEDNN_MAX_CPU_ISA``).

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: ``name`` is not a known target or ``"native"``.
    """
    if name != NATIVE_TARGET:
        if isinstance(name, str) and name not in TARGETS:
            raise ValueError(
                f"unknown target {name!r}: choose one of {sorted(TARGETS)} or {NATIVE_TARGET!r}"
            )
        return get_target(name).name
    from .cpu import cpu_info  # reads /proc/cpuinfo: only when asked

    info = cpu_info()
    chosen = "x86-vnni" if info.vnni else "x86-avx2" if info.isa == "avx2" else "x86"
    logger.info("target 'native' on %s: %r", info.describe(), chosen)
    return chosen


def get_target(name: object) -> Target:
    """The :class:`Target` called ``name``.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: ``name`` is not a known target.
    """
    if isinstance(name, Target):
        return name
    if not isinstance(name, str):
        raise TypeError(f"target must be a string, one of {sorted(TARGETS)}; got {name!r}")
    target = TARGETS.get(name)
    if target is None:
        raise ValueError(f"unknown target {name!r}: choose one of {sorted(TARGETS)}")
    return target

