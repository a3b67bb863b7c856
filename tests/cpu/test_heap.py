"""retain_freed_memory: megabyte tensors come from glibc's heap, not from fresh mappings."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# mallinfo2().hblkhd: bytes glibc holds in mmap'd blocks. A process's first 16 MiB tensor
# is such a block under glibc's defaults (threshold 128 KiB until a large free moves it),
# and comes from the heap once the threshold is 32 MiB.
PROBE = """
import ctypes, sys, torch
from tandem.cpu.heap import retain_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = retain_freed_memory()
before = libc.mallinfo2().hblkhd
x = torch.empty(4 << 20)  # 16 MiB
print(applied, libc.mallinfo2().hblkhd - before)
"""


def probe(keep: str) -> tuple[bool, int]:
    env = {**os.environ, "TANDEM_KEEP_HEAP": keep, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    applied, mapped = out.stdout.split()
    return applied == "True", int(mapped)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and mallinfo2")
def test_large_tensors_come_from_the_heap():
    applied, mapped = probe("1")
    default_applied, default_mapped = probe("0")
    assert applied and not default_applied
    assert default_mapped >= 16 << 20  # glibc's default: a fresh mapping (faulted in on every use)
    assert mapped == 0  # retained: from the heap, where freed blocks are reused
