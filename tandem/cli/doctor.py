"""`tandem doctor`: what this machine offers tandem, for setup checks and bug reports.

Every probe runs on its own and a failing one is reported as text in its place:
a doctor that tracebacks on a broken CUDA install cannot diagnose it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform
import sys
from collections.abc import Callable
from typing import Any

import tandem
from tandem.cpu import features as cpu
from tandem.cpu import system

HELP = "Report the CPU, memory, GPUs, native extension and package versions that tandem sees."

PACKAGES = ("transformers", "gguf", "tokenizers", "numpy", "triton")  # triton: the GPU operators
DEFAULT_MODEL_MODULE = "tandem.weights.default_model"
OS_LABELS = {
    "os_avx": "AVX state saved by the OS (XMM, YMM)",
    "os_avx512": "AVX-512 state saved by the OS (opmask, ZMM)",
    "os_amx": "AMX state saved by the OS (TILECFG, TILEDATA)",
    "amx_permitted": "AMX permitted to this process (arch_prctl)",
}
GIB = 1024**3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the text report"
    )


def run(args: argparse.Namespace) -> int:
    report = collect()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def collect() -> dict[str, Any]:
    """Everything the report shows, as plain JSON-able values."""
    return {
        "tandem": tandem.__version__,
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "platform": platform.platform(),
        "cpu": _guarded(_cpu_section),
        "memory": _guarded(system.memory),
        "extension": _guarded(cpu.build_info),
        "torch": _guarded(_torch_section),
        "packages": {name: _version(name) for name in PACKAGES},
        "default_model": _guarded(_default_model_status),
    }


def _guarded(probe: Callable[[], Any]) -> Any:
    # A diagnostic tool reports every failure instead of stopping at the first,
    # whatever its type: a broken driver raises anything from RuntimeError to AssertionError.
    try:
        return probe()
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}


def _cpu_section() -> dict[str, Any]:
    section: dict[str, Any] = {
        "brand": None,
        "logical_cores": system.logical_cores(),
        "usable_cores": system.usable_cores(),
        "physical_cores": system.physical_cores(),
        "numa_nodes": _guarded(system.numa_nodes),
        "features": None,
        "kernel_variant": None,
        "runnable_variants": None,
        "prefill_kernels": None,
    }
    try:
        features = cpu.cpu_features()
        section["brand"] = cpu.cpu_brand()
    except Exception as error:
        section["error"] = f"{type(error).__name__}: {error}"
        section["brand"] = platform.processor() or platform.machine()
        return section
    section["features"] = features
    section["runnable_variants"] = cpu.runnable_variants(features)
    section["kernel_variant"] = _guarded(lambda: cpu.select_variant(features))
    variant = section["kernel_variant"]
    if isinstance(variant, str):
        section["prefill_kernels"] = _guarded(lambda: cpu.select_prefill(variant, features) or "off")
    return section


def _torch_section() -> dict[str, Any]:
    import torch

    section: dict[str, Any] = {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "cuda_available": False,
        "gpus": [],
    }
    try:
        section["cuda_available"] = bool(torch.cuda.is_available())
        for index in range(torch.cuda.device_count() if section["cuda_available"] else 0):
            section["gpus"].append(_guarded(lambda index=index: _gpu(torch, index)))
    except Exception as error:
        section["cuda_error"] = f"{type(error).__name__}: {error}"
    return section


def _gpu(torch: Any, index: int) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(index)
    return {
        "index": index,
        "name": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "memory_bytes": int(props.total_memory),
    }


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _default_model_status() -> str | None:
    # Written elsewhere and optional: report it when present, stay quiet when not.
    try:
        module = importlib.import_module(DEFAULT_MODEL_MODULE)
    except ModuleNotFoundError as error:
        if error.name is not None and DEFAULT_MODEL_MODULE.startswith(error.name):
            return None
        raise
    status = getattr(module, "default_model_status", None)
    return None if status is None else str(status())


def render(report: dict[str, Any]) -> str:
    """The report as aligned text lines."""
    python = report["python"]
    lines = [
        f"tandem {report['tandem']}",
        f"Python {python['version']} ({python['implementation']}) at {python['executable']}",
        f"platform {report['platform']}",
        "",
    ]
    lines += _render_cpu(report["cpu"], report["memory"])
    lines += ["", f"extension  {_render_extension(report['extension'])}"]
    lines += _render_torch(report["torch"])
    packages = ", ".join(
        f"{name} {version or 'not installed'}" for name, version in report["packages"].items()
    )
    lines.append(f"packages   {packages}")
    model = report["default_model"]
    if isinstance(model, str):
        lines.append(model)  # the weights module words its own line, "default model: ..."
    elif model is not None:
        lines.append(f"default model: {_text(model)}")
    return "\n".join(lines)


def _render_cpu(section: dict[str, Any], memory: Any) -> list[str]:
    if "error" in section and "logical_cores" not in section:
        return [f"CPU        {section['error']}"]
    physical = section["physical_cores"]
    lines = [
        f"CPU        {section['brand']}",
        f"cores      {section['logical_cores']} logical ({section['usable_cores']} usable by this process), "
        f"{physical if physical is not None else 'unknown'} physical",
    ]
    nodes = section.get("numa_nodes")
    if isinstance(nodes, dict) and nodes:
        listed = ", ".join(f"node {n}: {c} usable CPUs" for n, c in nodes.items())
        grouping = (
            "the engine's threads are grouped by node and each group reads its own rows of the weights"
            if len(nodes) > 1
            else "one node"
        )
        lines.append(f"NUMA       {len(nodes)} ({listed}); {grouping} (${system.NUMA_ENV})")
    if isinstance(memory, dict) and "total" in memory:
        lines.append(
            f"memory     {memory['total'] / GIB:.1f} GiB total, {memory['available'] / GIB:.1f} GiB available"
        )
    else:
        lines.append(f"memory     {_text(memory) if memory else 'unknown (no /proc/meminfo)'}")
    features = section["features"]
    if features is None:
        lines.append(f"features   {section.get('error', 'unknown')}")
        return lines
    lines.append("CPU features (CPUID)")
    lines += [f"  {name:<14}{_yes(features.get(name))}" for name in cpu.FEATURES]
    lines.append("OS support")
    lines += [f"  {OS_LABELS[name]:<46}{_yes(features.get(name))}" for name in cpu.OS_SUPPORT]
    lines.append(
        f"kernel variant  {_text(section['kernel_variant'])} "
        f"(order amx > avx512 > avx2 > generic; runnable here: {', '.join(section['runnable_variants'])}; "
        f"override with ${cpu.VARIANT_ENV})"
    )
    if section.get("prefill_kernels") is not None:
        lines.append(
            f"prefill kernels {_text(section['prefill_kernels'])} "
            f"(bf16 tiles for many tokens: amx by default on AMX CPUs; override with ${cpu.PREFILL_ENV})"
        )
    return lines


def _render_extension(info: dict[str, Any]) -> str:
    if "error" in info:
        return info["error"]
    native = "with -march=native" if info.get("march_native") else "without -march=native"
    return (
        f"tandem._cpu built by {info.get('compiler_id')} {info.get('compiler_version')}, "
        f"{info.get('build_type')} ({info.get('cxx_flags') or 'no extra flags'}), "
        f"baseline {'+'.join(info.get('baseline_isa') or ['unknown'])}, {native}"
    )


def _render_torch(section: dict[str, Any]) -> list[str]:
    if "error" in section:
        return [f"torch      {section['error']}"]
    lines = [
        f"torch      {section['version']} (CUDA build: {section['cuda_build'] or 'none'}), "
        f"{section['threads']} CPU threads"
    ]
    if "cuda_error" in section:
        lines.append(f"CUDA       query failed: {section['cuda_error']}")
    elif section["cuda_available"]:
        lines.append(f"CUDA       available, {len(section['gpus'])} GPU(s)")
    else:
        lines.append("CUDA       not available")
    for gpu in section["gpus"]:
        if "error" in gpu:
            lines.append(f"  GPU      {gpu['error']}")
        else:
            lines.append(
                f"  GPU {gpu['index']}    {gpu['name']}, compute capability {gpu['compute_capability']}, "
                f"{gpu['memory_bytes'] / GIB:.1f} GiB"
            )
    return lines


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def _text(value: Any) -> str:
    return value["error"] if isinstance(value, dict) and "error" in value else str(value)
