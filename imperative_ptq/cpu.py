"""What the CPU offers int8 inference: the ISA oneDNN will actually use.

Whether an exported int8 model is faster than fp32 depends on the CPU. oneDNN's int8 kernels
are fast only with an int8 dot-product instruction (AVX-512 VNNI, AVX-VNNI or AMX); on a plain
AVX2 or AVX-512 CPU they emulate it with several instructions and int8 can be *slower* than
fp32. The exporter, ``create_predictor`` and the benchmarks use :func:`cpu_info` to warn about
that and to label their results::

    info = cpu_info()
    if not info.vnni:
        logger.warning("int8 may be slower than fp32 on %s", info.describe())

The ``ONEDNN_MAX_CPU_ISA`` (or legacy ``DNNL_MAX_CPU_ISA``) environment variable caps what
oneDNN dispatches to, so it is taken into account: a VNNI CPU capped at AVX2 runs AVX2 kernels.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Mapping

__all__ = ["INT8_FLAGS", "CpuInfo", "cpu_info"]

logger = logging.getLogger(__name__)

#: The ``/proc/cpuinfo`` flags that decide which int8 kernels oneDNN can use.
INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")

_CPUINFO = Path("/proc/cpuinfo")

# oneDNN's ONEDNN_MAX_CPU_ISA values, in its documented order. The order is *not* a total
# order of capabilities: AVX2_VNNI* (VEX-encoded VNNI) sit before AVX512_CORE, which has no VNNI
# at all, so each kernel family below gets an explicit set of the caps that still allow it.
_CAPS = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX512_CORE_FP16",
    "AVX10_1_512",
    "AVX512_CORE_AMX",
    "AVX512_CORE_AMX_FP16",
    "AVX10_1_512_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX10_2_512",
    "AVX10_2_512_AMX_2",
    "ALL",
    "DEFAULT",
)
_UNCAPPED = frozenset({"ALL", "DEFAULT"})
_AVX2_CAPS = frozenset(_CAPS[_CAPS.index("AVX2") :])
_AVX512_CAPS = frozenset(_CAPS[_CAPS.index("AVX512_CORE") :])
_AVX512_VNNI_CAPS = frozenset(_CAPS[_CAPS.index("AVX512_CORE_VNNI") :])
_AVX_VNNI_CAPS = _AVX512_VNNI_CAPS | {"AVX2_VNNI", "AVX2_VNNI_2"}
# AVX10_2_512 comes after the AMX caps in the list but, as its name says, excludes AMX.
_AMX_CAPS = frozenset(_CAPS[_CAPS.index("AVX512_CORE_AMX") :]) - {"AVX10_2_512"}

# Unknown cap values already warned about: properties are read often (every export, every
# benchmark row), and one warning per value is enough.
_warned_caps: set[str] = set()


def _effective_cap(cap: str | None) -> str | None:
    """The cap to apply: ``None`` when unset, uncapped or unrecognised (warned once)."""
    if cap is None or cap in _UNCAPPED:
        return None
    if cap not in _CAPS:
        if cap not in _warned_caps:
            _warned_caps.add(cap)
            logger.warning(
                "Unrecognised oneDNN ISA cap %r (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA); "
                "assuming no cap. Known values: %s",
                cap,
                ", ".join(_CAPS),
            )
        return None
    return cap


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """The CPU model, its int8-relevant ISA flags and the oneDNN ISA cap.

    Attributes:
        model: The ``model name`` from ``/proc/cpuinfo``, or ``"unknown"``.
        flags: The :data:`INT8_FLAGS` the CPU has.
        onednn_max_isa: The upper-cased ``ONEDNN_MAX_CPU_ISA`` (else ``DNNL_MAX_CPU_ISA``)
            value, or ``None`` if neither is set.
        family: The ``cpu family`` number, or ``None`` if not reported. Virtual machines
            often name every AMD server CPU just "AMD EPYC": family and model number tell
            a Zen 1 (family 23, model 1) from a Zen 3 (family 25, model 1), whose int8
            kernels run at very different speeds relative to fp32.
        model_number: The ``model`` number, or ``None`` if not reported.
    """

    model: str
    flags: frozenset[str]
    onednn_max_isa: str | None = None
    family: int | None = None
    model_number: int | None = None

    def _allows(self, flag: str, caps: frozenset[str]) -> bool:
        cap = _effective_cap(self.onednn_max_isa)
        return flag in self.flags and (cap is None or cap in caps)

    @property
    def isa(self) -> str:
        """The int8 ISA oneDNN will use.

        One of ``"amx"``, ``"avx512_vnni"``, ``"avx_vnni"``, ``"avx512"`` (AVX-512 without
        VNNI), ``"avx2"`` or ``"other"`` (no AVX2, or capped below it).
        """
        if self._allows("amx_int8", _AMX_CAPS):
            return "amx"
        if self._allows("avx512_vnni", _AVX512_VNNI_CAPS):
            return "avx512_vnni"
        # An AVX2_VNNI cap on a CPU with only AVX-512 VNNI (Cascade Lake, Ice Lake) gives AVX2
        # kernels: oneDNN's avx2_vnni path needs the VEX-encoded avx_vnni instruction itself.
        if self._allows("avx_vnni", _AVX_VNNI_CAPS):
            return "avx_vnni"
        if self._allows("avx512f", _AVX512_CAPS):
            return "avx512"
        if self._allows("avx2", _AVX2_CAPS):
            return "avx2"
        return "other"

    @property
    def vnni(self) -> bool:
        """Whether oneDNN can use an int8 dot-product instruction (VNNI or AMX) here."""
        return self.isa in ("amx", "avx512_vnni", "avx_vnni")

    def describe(self) -> str:
        """One line for benchmark tables and warnings.

        Example: ``"Intel(R) Xeon(R) Processor (family 6 model 143; avx2 avx512f avx512_vnni
        amx_int8; oneDNN capped at AVX2)"``; the family part appears only when
        ``/proc/cpuinfo`` reports it, the cap part only when a cap is set.
        """
        parts = [" ".join(f for f in INT8_FLAGS if f in self.flags) or "no int8 ISA flags"]
        if self.family is not None:
            number = "" if self.model_number is None else f" model {self.model_number}"
            parts.insert(0, f"family {self.family}{number}")
        if self.onednn_max_isa is not None:
            note = "" if self.onednn_max_isa in _CAPS else " (unrecognised, ignored)"
            parts.append(f"oneDNN capped at {self.onednn_max_isa}{note}")
        return f"{self.model} ({'; '.join(parts)})"


def _first_block(text: str) -> dict[str, str]:
    """The ``key: value`` pairs of the first processor block of a ``/proc/cpuinfo`` text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:  # blocks are separated by blank lines; the others repeat the first
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _decimal(value: str | None) -> int | None:
    """A ``/proc/cpuinfo`` number field as an int; ``None`` when absent or not a number."""
    return int(value) if value is not None and value.isdigit() else None


def cpu_info(
    cpuinfo_text: str | None = None, environ: Mapping[str, str] | None = None
) -> CpuInfo:
    """Describe this CPU's int8 capabilities.

    Not cached: the environment may change between calls, and parsing is cheap.

    Args:
        cpuinfo_text: A ``/proc/cpuinfo`` text; read from the system when ``None``. Where it
            cannot be read (non-Linux), the model is ``"unknown"`` and no flags are reported.
        environ: The environment to read the oneDNN ISA cap from; ``os.environ`` when ``None``.

    Returns:
        The :class:`CpuInfo` of the first processor listed.
    """
    if cpuinfo_text is None:
        try:
            cpuinfo_text = _CPUINFO.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            logger.debug("Cannot read %s (%s); CPU flags unknown", _CPUINFO, exc)
            cpuinfo_text = ""
    if environ is None:
        environ = os.environ

    fields = _first_block(cpuinfo_text)
    # Collapse runs of spaces: some model names are padded ("Intel(R) Xeon(R) CPU  E5-2680").
    model = " ".join(fields.get("model name", "").split()) or "unknown"
    present = set(fields.get("flags", "").split())
    flags = frozenset(f for f in INT8_FLAGS if f in present)
    family = _decimal(fields.get("cpu family"))
    model_number = _decimal(fields.get("model"))

    # oneDNN reads ONEDNN_* first and falls back to the legacy DNNL_* name.
    raw = environ.get("ONEDNN_MAX_CPU_ISA") or environ.get("DNNL_MAX_CPU_ISA") or ""
    cap = raw.strip().upper() or None
    return CpuInfo(
        model=model,
        flags=flags,
        onednn_max_isa=cap,
        family=family,
        model_number=model_number,
    )
