"""imperative_ptq.cpu: int8 ISA detection from /proc/cpuinfo and the oneDNN ISA cap."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from imperative_ptq import cpu
from imperative_ptq.cpu import INT8_FLAGS, CpuInfo, cpu_info

# Flags every x86-64 server of the last decade has; none of them matters for int8.
_BASE = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr "
    "sse sse2 ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology cpuid pni "
    "pclmulqdq ssse3 cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave rdrand lahf_lm abm"
)
_AVX2 = "avx f16c fma 3dnowprefetch fsgsbase bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap"
_AVX512 = (
    "avx512f avx512dq clflushopt clwb avx512cd avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves"
)

EPYC_FLAGS = (
    f"{_BASE} {_AVX2} mmxext fxsr_opt cmp_legacy svm extapic cr8_legacy sse4a misalignsse osvw "
    "ibs skinit wdt topoext perfctr_core perfctr_nb mwaitx cpb hw_pstate ssbd ibrs ibpb stibp "
    "vmmcall sha_ni clzero irperf xsaveerptr rdpru wbnoinvd arat npt lbrv umip pku ospke vaes "
    "vpclmulqdq rdpid overflow_recov succor smca fsrm"
)
CASCADE_LAKE_FLAGS = (
    f"{_BASE} {_AVX2} {_AVX512} arch_perfmon pebs bts tsc_deadline_timer hle rtm mpx "
    "intel_pt pku ospke avx512_vnni md_clear flush_l1d arch_capabilities"
)
SAPPHIRE_RAPIDS_FLAGS = (
    f"{_BASE} {_AVX2} {_AVX512} avx_vnni avx512_bf16 wbnoinvd avx512vbmi umip pku ospke "
    "waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg tme avx512_vpopcntdq "
    "la57 rdpid cldemote movdiri movdir64b enqcmd fsrm md_clear serialize tsxldtrk pconfig "
    "arch_lbr ibt amx_bf16 avx512_fp16 amx_tile amx_int8 flush_l1d arch_capabilities"
)
ALDER_LAKE_FLAGS = (
    f"{_BASE} {_AVX2} clflushopt clwb intel_pt sha_ni xsaveopt xsavec xgetbv1 xsaves avx_vnni "
    "umip pku ospke waitpkg gfni vaes vpclmulqdq rdpid movdiri movdir64b fsrm md_clear "
    "serialize arch_lbr ibt flush_l1d arch_capabilities"
)
WESTMERE_FLAGS = f"{_BASE} dca arch_perfmon pebs bts nonstop_tsc aperfmperf dtherm ida arat"


def cpuinfo_text(
    model: str,
    flags: str,
    processors: int = 2,
    vendor: str = "GenuineIntel",
    family: int = 6,
    model_number: int = 143,
) -> str:
    """A /proc/cpuinfo with ``processors`` identical blocks, as Linux writes it."""
    blocks = []
    for i in range(processors):
        blocks.append(
            f"processor\t: {i}\n"
            f"vendor_id\t: {vendor}\n"
            f"cpu family\t: {family}\n"
            f"model\t\t: {model_number}\n"
            f"model name\t: {model}\n"
            "stepping\t: 8\n"
            "cpu MHz\t\t: 2000.000\n"
            "cache size\t: 107520 KB\n"
            f"flags\t\t: {flags}\n"
            "bugs\t\t: spectre_v1 spectre_v2 spec_store_bypass swapgs\n"
            "bogomips\t: 4000.00\n"
            "address sizes\t: 46 bits physical, 57 bits virtual\n"
            "power management:\n"
        )
    return "\n".join(blocks)


EPYC = cpuinfo_text(
    "AMD EPYC 7763 64-Core Processor", EPYC_FLAGS, vendor="AuthenticAMD", family=25, model_number=1
)
CASCADE_LAKE = cpuinfo_text("Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz", CASCADE_LAKE_FLAGS)
SAPPHIRE_RAPIDS = cpuinfo_text("Intel(R) Xeon(R) Platinum 8480+", SAPPHIRE_RAPIDS_FLAGS)
ALDER_LAKE = cpuinfo_text("12th Gen Intel(R) Core(TM) i7-12700K", ALDER_LAKE_FLAGS)
WESTMERE = cpuinfo_text("Intel(R) Xeon(R) CPU           X5650  @ 2.67GHz", WESTMERE_FLAGS)


def test_avx2_only_epyc() -> None:
    info = cpu_info(EPYC, environ={})
    assert info.model == "AMD EPYC 7763 64-Core Processor"
    assert info.flags == {"avx2"}
    assert info.onednn_max_isa is None
    assert not info.vnni
    assert info.isa == "avx2"
    assert (info.family, info.model_number) == (25, 1)
    assert info.describe() == "AMD EPYC 7763 64-Core Processor (family 25 model 1; avx2)"


def test_family_and_model_tell_apart_cpus_a_vm_names_alike() -> None:
    # Cloud VMs report Zen 1 and Zen 3 servers both as "AMD EPYC"; their int8-to-fp32 speed
    # ratios differ widely, so a benchmark line must say which one it ran on.
    zen1 = cpu_info(cpuinfo_text("AMD EPYC", EPYC_FLAGS, family=23, model_number=1), environ={})
    zen3 = cpu_info(cpuinfo_text("AMD EPYC", EPYC_FLAGS, family=25, model_number=1), environ={})
    assert zen1.describe() == "AMD EPYC (family 23 model 1; avx2)"
    assert zen3.describe() == "AMD EPYC (family 25 model 1; avx2)"


def test_avx512_vnni_xeon() -> None:
    info = cpu_info(CASCADE_LAKE, environ={})
    assert info.flags == {"avx2", "avx512f", "avx512_vnni"}
    assert info.vnni
    assert info.isa == "avx512_vnni"


def test_amx_xeon() -> None:
    info = cpu_info(SAPPHIRE_RAPIDS, environ={})
    assert info.flags == set(INT8_FLAGS)
    assert info.vnni
    assert info.isa == "amx"
    assert info.describe() == (
        "Intel(R) Xeon(R) Platinum 8480+ (family 6 model 143; avx2 avx512f avx512_vnni avx_vnni "
        "amx_int8)"
    )


def test_avx_vnni_client_cpu() -> None:
    info = cpu_info(ALDER_LAKE, environ={})
    assert info.vnni
    assert info.isa == "avx_vnni"


def test_amx_xeon_capped_at_avx2() -> None:
    info = cpu_info(SAPPHIRE_RAPIDS, environ={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert info.onednn_max_isa == "AVX2"
    assert not info.vnni
    assert info.isa == "avx2"
    assert info.describe().endswith("; oneDNN capped at AVX2)")


def test_legacy_dnnl_variable_is_honoured() -> None:
    info = cpu_info(SAPPHIRE_RAPIDS, environ={"DNNL_MAX_CPU_ISA": "avx2"})
    assert info.onednn_max_isa == "AVX2"
    assert info.isa == "avx2"


def test_onednn_variable_wins_over_dnnl() -> None:
    environ = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI", "DNNL_MAX_CPU_ISA": "AVX2"}
    info = cpu_info(SAPPHIRE_RAPIDS, environ=environ)
    assert info.onednn_max_isa == "AVX512_CORE_VNNI"
    assert info.isa == "avx512_vnni"


def test_lower_case_vnni_cap_on_amx_cpu() -> None:
    info = cpu_info(SAPPHIRE_RAPIDS, environ={"ONEDNN_MAX_CPU_ISA": "avx512_core_vnni"})
    assert info.onednn_max_isa == "AVX512_CORE_VNNI"
    assert info.vnni
    assert info.isa == "avx512_vnni"


@pytest.mark.parametrize(
    ("text", "cap", "isa"),
    [
        (SAPPHIRE_RAPIDS, "ALL", "amx"),
        (SAPPHIRE_RAPIDS, "default", "amx"),
        (SAPPHIRE_RAPIDS, "AVX512_CORE_AMX", "amx"),
        (SAPPHIRE_RAPIDS, "AVX10_1_512_AMX_FP16", "amx"),
        (SAPPHIRE_RAPIDS, "AVX512_CORE_FP16", "avx512_vnni"),
        (SAPPHIRE_RAPIDS, "AVX10_2_512", "avx512_vnni"),
        (SAPPHIRE_RAPIDS, "AVX2_VNNI", "avx_vnni"),
        (SAPPHIRE_RAPIDS, "AVX512_CORE", "avx512"),
        (SAPPHIRE_RAPIDS, "SSE41", "other"),
        (CASCADE_LAKE, "AVX512_CORE", "avx512"),
        # oneDNN's AVX2_VNNI kernels need the VEX avx_vnni instruction, which this CPU lacks.
        (CASCADE_LAKE, "AVX2_VNNI_2", "avx2"),
        (CASCADE_LAKE, "AVX", "other"),
        (ALDER_LAKE, "AVX2_VNNI", "avx_vnni"),
        (ALDER_LAKE, "AVX2", "avx2"),
        (EPYC, "ALL", "avx2"),
    ],
)
def test_caps(text: str, cap: str, isa: str) -> None:
    info = cpu_info(text, environ={"ONEDNN_MAX_CPU_ISA": cap})
    assert info.isa == isa
    assert info.vnni == (isa in ("amx", "avx512_vnni", "avx_vnni"))


def test_cpu_without_avx2() -> None:
    info = cpu_info(WESTMERE, environ={})
    assert info.model == "Intel(R) Xeon(R) CPU X5650 @ 2.67GHz"  # padding collapsed
    assert info.flags == frozenset()
    assert not info.vnni
    assert info.isa == "other"
    assert info.describe() == (
        "Intel(R) Xeon(R) CPU X5650 @ 2.67GHz (family 6 model 143; no int8 ISA flags)"
    )


def test_unknown_cap_warns_once_and_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    cap = "AVX9000_TEST_ONLY"  # unique to this test: the warning is once per process
    with caplog.at_level(logging.WARNING, logger="imperative_ptq.cpu"):
        info = cpu_info(SAPPHIRE_RAPIDS, environ={"ONEDNN_MAX_CPU_ISA": cap.lower()})
        assert info.isa == "amx"
        assert info.vnni
        assert cpu_info(SAPPHIRE_RAPIDS, environ={"ONEDNN_MAX_CPU_ISA": cap}).isa == "amx"
    warnings = [r for r in caplog.records if cap in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert info.onednn_max_isa == cap
    assert "unrecognised" in info.describe()


def test_empty_text() -> None:
    info = cpu_info("", environ={})
    assert info.model == "unknown"
    assert info.flags == frozenset()
    assert info.isa == "other"
    assert (info.family, info.model_number) == (None, None)
    assert info.describe() == "unknown (no int8 ISA flags)"


def test_family_without_model_number() -> None:
    text = "processor\t: 0\ncpu family\t: 23\nmodel\t\t: ?\nmodel name\t: AMD EPYC\n"
    info = cpu_info(text, environ={})
    assert (info.family, info.model_number) == (23, None)
    assert info.describe() == "AMD EPYC (family 23; no int8 ISA flags)"


def test_empty_cap_is_no_cap() -> None:
    info = cpu_info(SAPPHIRE_RAPIDS, environ={"ONEDNN_MAX_CPU_ISA": " ", "DNNL_MAX_CPU_ISA": ""})
    assert info.onednn_max_isa is None
    assert info.isa == "amx"


def test_only_first_processor_block_counts() -> None:
    text = EPYC + "\n" + cpuinfo_text("Some Other CPU", SAPPHIRE_RAPIDS_FLAGS, processors=1)
    info = cpu_info(text, environ={})
    assert info.model == "AMD EPYC 7763 64-Core Processor"
    assert info.isa == "avx2"


def test_reads_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert cpu_info(SAPPHIRE_RAPIDS).isa == "avx2"
    # Not cached: a changed environment is seen by the next call.
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert cpu_info(SAPPHIRE_RAPIDS).isa == "amx"


def test_unreadable_cpuinfo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cpu, "_CPUINFO", tmp_path / "missing")
    info = cpu_info(environ={})
    assert info.model == "unknown"
    assert info.flags == frozenset()


def test_this_machine() -> None:
    info = cpu_info()
    assert isinstance(info, CpuInfo)
    assert info.isa in ("amx", "avx512_vnni", "avx_vnni", "avx512", "avx2", "other")
    assert info.model in info.describe()
