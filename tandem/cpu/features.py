"""What this CPU can run, and which kernel variant tandem picks from that.

CPUID and XGETBV are instructions, so the probing is native (`tandem._cpu`,
csrc/cpu_features.cpp); this module only wraps it and holds the choice of
variant. A variant is one build of the kernels for one instruction set
(CMakeLists.txt: tandem_isa_sources); it may run only where the CPU implements
every instruction it uses *and* the OS saves the registers it touches.
"""

from __future__ import annotations

import os
import platform
from types import ModuleType

from tandem.errors import TandemError

FEATURES = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
OS_SUPPORT = ("os_avx", "os_avx512", "os_amx", "amx_permitted")

_AVX2 = ("avx2", "fma", "f16c", "os_avx")
_AVX512 = (*_AVX2, "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "os_avx512")
_AMX = (*_AVX512, "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "os_amx", "amx_permitted")

# Best first. Keep in step with the per-variant compiler flags in CMakeLists.txt.
# avx512 asks for VNNI (Cascade Lake, Ice Lake, Zen 4 and later) because the
# quantized dot products are built on it; BF16 is left to amx (Sapphire Rapids on).
VARIANT_REQUIRES: dict[str, tuple[str, ...]] = {
    "amx": _AMX,
    "avx512": _AVX512,
    "avx2": _AVX2,
    "generic": (),
}
VARIANTS = tuple(VARIANT_REQUIRES)

# Tests force a lower variant with this (the AVX2 path on an AVX-512 machine, say).
VARIANT_ENV = "TANDEM_CPU_VARIANT"

# The prefill kernels (csrc/kernels/gemm_bf16.inc): weight tiles dequantized to
# bf16 once per call, multiplied on AMX tiles or with AVX512-BF16, best first.
PREFILL_REQUIRES: dict[str, tuple[str, ...]] = {
    "amx": _AMX,
    "avx512bf16": (*_AVX512, "avx512_bf16"),
}
# amx, avx512bf16, or off (every call on the 8-bit dot kernels).
PREFILL_ENV = "TANDEM_CPU_PREFILL"
_OFF = ("off", "none", "0", "no", "false")


def _native() -> ModuleType:
    try:
        from tandem import _cpu
    except ImportError as error:
        raise TandemError("tandem._cpu is not built; reinstall with `pip install -e .`") from error
    return _cpu


def cpu_features() -> dict[str, bool]:
    """CPUID bits, OS register-state support and AMX permission, as name -> bool (all False off x86-64)."""
    return dict(_native().cpu_features())


def cpu_brand() -> str:
    """The processor's brand string, e.g. 'Intel(R) Xeon(R) Platinum 8480+'."""
    return _native().cpu_brand() or platform.processor() or platform.machine() or "unknown"


def build_info() -> dict[str, object]:
    """How the extension was compiled: compiler, build type, flags, baseline ISA."""
    return dict(_native().build_info())


def missing_for(variant: str, features: dict[str, bool]) -> list[str]:
    """The features `variant` needs that `features` lacks (empty: it can run)."""
    if variant not in VARIANT_REQUIRES:
        raise TandemError(f"unknown CPU kernel variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return [name for name in VARIANT_REQUIRES[variant] if not features.get(name, False)]


def runnable_variants(features: dict[str, bool] | None = None) -> list[str]:
    """Every variant this CPU and OS can run, best first; 'generic' always."""
    features = cpu_features() if features is None else features
    return [variant for variant in VARIANTS if not missing_for(variant, features)]


def select_variant(features: dict[str, bool] | None = None, override: str | None = None) -> str:
    """The variant to run: the best runnable one, or `override` / $TANDEM_CPU_VARIANT if set.

    An override may pick a lower variant than the best, never one the CPU cannot run.
    """
    features = cpu_features() if features is None else features
    if override is None:
        override = os.environ.get(VARIANT_ENV) or None
    if override is None:
        return runnable_variants(features)[0]
    missing = missing_for(override, features)
    if missing:
        raise TandemError(
            f"{VARIANT_ENV}={override} cannot run on this CPU: it lacks {', '.join(missing)}; "
            f"runnable here: {', '.join(runnable_variants(features))}"
        )
    return override


def select_prefill(variant: str, features: dict[str, bool] | None = None, override: str | None = None) -> str:
    """The prefill kernels to use beside `variant`'s dot kernels: 'amx', 'avx512bf16' or '' (none).

    By default amx when the variant is amx, else none: avx512bf16 multiplies at
    half the rate of the 8-bit dot kernels' VNNI (on Zen 4 it was slower than
    them at every token count, benchmarks/gemm_crossover.py), so it is opt-in.
    `override` / $TANDEM_CPU_PREFILL picks one ('off' for none), never one the
    CPU cannot run.
    """
    features = cpu_features() if features is None else features
    if override is None:
        override = os.environ.get(PREFILL_ENV) or None
    if override is not None and override.strip().lower() in _OFF:
        return ""
    if override is None:
        runs_amx = all(features.get(f, False) for f in PREFILL_REQUIRES["amx"])
        return "amx" if variant == "amx" and runs_amx else ""
    if override not in PREFILL_REQUIRES:
        raise TandemError(
            f"{PREFILL_ENV}={override} is not a prefill kernel set; choose one of "
            f"{', '.join(PREFILL_REQUIRES)} or off"
        )
    missing = [f for f in PREFILL_REQUIRES[override] if not features.get(f, False)]
    if missing:
        raise TandemError(f"{PREFILL_ENV}={override} cannot run on this CPU: it lacks {', '.join(missing)}")
    return override
