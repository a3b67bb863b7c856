"""The native extension's CPU probing, the variant choice, and `tandem doctor`."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import tandem
from tandem.cpu import features as cpu
from tandem.cpu import system
from tandem.errors import TandemError

X86_LINUX = sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")

# Our key -> (the name in /proc/cpuinfo's flags, the OS-support key that Linux also
# requires before it lists the flag: it hides features whose register state it does not save).
CPUINFO_FLAGS = {
    "avx2": ("avx2", "os_avx"),
    "fma": ("fma", "os_avx"),
    "f16c": ("f16c", "os_avx"),
    "avx512f": ("avx512f", "os_avx512"),
    "avx512bw": ("avx512bw", "os_avx512"),
    "avx512vl": ("avx512vl", "os_avx512"),
    "avx512_vnni": ("avx512_vnni", "os_avx512"),
    "amx_tile": ("amx_tile", "os_amx"),
}
DOCTOR_KEYS = (
    "tandem",
    "python",
    "platform",
    "cpu",
    "memory",
    "extension",
    "torch",
    "packages",
    "default_model",
)


def test_extension_imports():
    from tandem import _cpu

    assert callable(_cpu.cpu_features)


def test_missing_extension_is_a_clear_error(monkeypatch):
    # A None entry in sys.modules makes the import fail, as it does before the first build.
    monkeypatch.setitem(sys.modules, "tandem._cpu", None)
    monkeypatch.delattr(tandem, "_cpu", raising=False)
    with pytest.raises(TandemError, match=r"tandem\._cpu is not built; reinstall with `pip install -e \.`"):
        cpu.cpu_features()


def test_features_have_every_key_as_bool():
    features = cpu.cpu_features()
    assert set(features) == set(cpu.FEATURES) | set(cpu.OS_SUPPORT)
    assert all(type(value) is bool for value in features.values())


def test_features_are_consistent():
    features = cpu.cpu_features()
    # AMX permission is only asked for where the CPU and OS support the tiles.
    if features["amx_permitted"]:
        assert features["amx_tile"] and features["os_amx"]
    if platform.machine() not in ("x86_64", "AMD64"):
        assert not any(features.values())


@pytest.mark.skipif(not X86_LINUX, reason="/proc/cpuinfo flags are x86-64 Linux's")
def test_features_agree_with_the_kernel():
    flags_line = next(
        line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
    )
    kernel_flags = set(flags_line.partition(":")[2].split())
    features = cpu.cpu_features()
    disagree = {
        key: (features[key] and features[os_key], flag in kernel_flags)
        for key, (flag, os_key) in CPUINFO_FLAGS.items()
        if (features[key] and features[os_key]) != (flag in kernel_flags)
    }
    assert not disagree, f"(tandem, kernel) disagree: {disagree}"


def test_brand_and_build_info():
    assert isinstance(cpu.cpu_brand(), str) and cpu.cpu_brand()
    info = cpu.build_info()
    assert info["march_native"] is False
    assert "-march=native" not in info["cxx_flags"]
    assert info["build_type"]
    assert info["compiler_id"] and info["compiler_version"]
    if X86_LINUX:
        # Shared code is baseline x86-64: AVX2 there would crash older CPUs before any check.
        assert "avx2" not in info["baseline_isa"]


def test_select_variant_prefers_the_best_runnable(monkeypatch):
    monkeypatch.delenv(cpu.VARIANT_ENV, raising=False)
    everything = dict.fromkeys((*cpu.FEATURES, *cpu.OS_SUPPORT), True)
    assert cpu.select_variant(everything) == "amx"
    assert cpu.runnable_variants(everything) == ["amx", "avx512", "avx2", "generic"]
    no_os_avx512 = {**everything, "os_avx512": False}
    assert cpu.runnable_variants(no_os_avx512) == ["avx2", "generic"]
    nothing = dict.fromkeys(everything, False)
    assert cpu.runnable_variants(nothing) == ["generic"]


def test_select_variant_override(monkeypatch):
    avx2_only = dict.fromkeys((*cpu.FEATURES, *cpu.OS_SUPPORT), False)
    avx2_only |= {"avx2": True, "fma": True, "f16c": True, "os_avx": True}
    monkeypatch.setenv(cpu.VARIANT_ENV, "avx2")
    assert cpu.select_variant(avx2_only) == "avx2"
    assert cpu.select_variant(avx2_only, override="generic") == "generic"
    assert cpu.select_variant(avx2_only, override="avx2") == "avx2"
    with pytest.raises(TandemError, match="avx512f"):
        cpu.select_variant(avx2_only, override="avx512")
    with pytest.raises(TandemError, match="unknown CPU kernel variant"):
        cpu.select_variant(avx2_only, override="sse9")


def test_system_probes():
    assert system.logical_cores() >= system.usable_cores() >= 1
    physical = system.physical_cores()
    assert physical is None or 1 <= physical <= system.logical_cores()
    memory = system.memory()
    if sys.platform == "linux":
        assert memory is not None and memory["total"] >= memory["available"] > 0
    nodes = system.numa_nodes()
    if Path("/sys/devices/system/node/online").exists():
        assert nodes and sum(nodes.values()) == system.usable_cores()


def test_cpu_lists_read_as_linux_writes_them():
    assert system._cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert system._cpu_list("0") == [0]


def test_installed_metadata():
    assert importlib.metadata.version("tandem") == tandem.__version__
    scripts = importlib.metadata.entry_points(group="console_scripts", name="tandem")
    assert [script.value for script in scripts] == ["tandem.cli:main"]


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tandem", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_doctor_text():
    result = _doctor()
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    out = result.stdout
    assert out.startswith(f"tandem {tandem.__version__}")
    for needle in ("CPU features", "avx2", "kernel variant", "memory", "torch", "transformers"):
        assert needle in out
    assert ("NUMA " in out) == bool(system.numa_nodes())


def test_doctor_json():
    result = _doctor("--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(DOCTOR_KEYS) <= set(report)
    assert report["tandem"] == tandem.__version__
    assert report["cpu"]["features"] == cpu.cpu_features()
    assert report["cpu"]["kernel_variant"] in cpu.VARIANTS
    assert report["cpu"]["prefill_kernels"] in ("off", *cpu.PREFILL_REQUIRES)
    assert report["extension"]["march_native"] is False
    assert isinstance(report["torch"]["cuda_available"], bool)
    assert report["memory"]["total"] > 0
    assert report["cpu"]["numa_nodes"] == {str(n): c for n, c in system.numa_nodes().items()}


@pytest.mark.parametrize(
    "env, key, message",
    [
        (cpu.VARIANT_ENV, "kernel_variant", "unknown CPU kernel variant"),
        (cpu.PREFILL_ENV, "prefill_kernels", "not a prefill kernel set"),
    ],
)
def test_doctor_reports_a_bad_override_without_failing(env, key, message):
    result = subprocess.run(
        [sys.executable, "-m", "tandem", "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, env: "sse9"},
    )
    assert result.returncode == 0, result.stderr
    assert message in json.loads(result.stdout)["cpu"][key]["error"]
