"""Cores and memory of this machine, read from Linux's /proc and /sys (no psutil).

The CPU engine sizes its thread pool from physical cores: two hyper-threads of
one core share its vector units, so a second thread per core rarely speeds up
bandwidth-bound expert matmuls.
"""

from __future__ import annotations

import os
from pathlib import Path


def logical_cores() -> int:
    """Logical CPUs in the machine."""
    return os.cpu_count() or 1


def usable_cores() -> int:
    """Logical CPUs this process may run on (taskset, cgroup cpusets)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return logical_cores()


def physical_cores() -> int | None:
    """Physical cores, each counted once however many hyper-threads it has; None if unknown."""
    siblings = set()
    for cpu in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        for name in ("core_cpus_list", "thread_siblings_list"):
            try:
                siblings.add((cpu / name).read_text().strip())
                break
            except OSError:
                continue
    if siblings:
        return len(siblings)
    return _physical_cores_from_cpuinfo()


def _physical_cores_from_cpuinfo() -> int | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores = set()
    for block in text.split("\n\n"):
        fields = {key.strip(): value.strip() for key, _, value in map(_split_field, block.splitlines())}
        if "core id" in fields:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or None


def _split_field(line: str) -> tuple[str, str, str]:
    return line.partition(":")


# How the CPU engine groups its threads by NUMA node (tandem.cpu.engine.numa_groups).
NUMA_ENV = "TANDEM_CPU_NUMA"


def numa_nodes() -> dict[int, int]:
    """Online NUMA nodes and how many of their logical CPUs this process may use ({} if unknown)."""
    root = Path("/sys/devices/system/node")
    try:
        online = _cpu_list(root.joinpath("online").read_text())
    except OSError:
        return {}
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    nodes = {}
    for node in online:
        try:
            cpus = _cpu_list(root.joinpath(f"node{node}", "cpulist").read_text())
        except OSError:
            continue
        nodes[node] = len([c for c in cpus if usable is None or c in usable])
    return nodes


def _cpu_list(text: str) -> list[int]:
    """Linux's list format: "0-3,8,10-11" -> [0, 1, 2, 3, 8, 10, 11]."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        out += range(int(first), int(last or first) + 1)
    return out


def memory() -> dict[str, int] | None:
    """{'total': bytes, 'available': bytes} from /proc/meminfo; None where it is missing."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    kib = {}
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            kib[key] = int(parts[0])
    if "MemTotal" not in kib:
        return None
    # MemAvailable exists since Linux 3.14; MemFree undercounts but is the old kernel's best.
    available = kib.get("MemAvailable", kib.get("MemFree", 0))
    return {"total": kib["MemTotal"] * 1024, "available": available * 1024}
