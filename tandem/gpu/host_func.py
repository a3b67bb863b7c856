"""CPU work in a CUDA stream's order: `cudaLaunchHostFunc` through ctypes.

The stream runs the host function when the work queued before it is done and holds
the work queued after it until the function returns; a CUDA graph captured from the
stream keeps it as a host node, called at every replay. tandem's CPU engine exposes its
MoE calls as such functions (`tandem.cpu.engine.host_submit_fn` / `host_sync_fn`), so
the routed experts of a hybrid model run inside a captured decode step.

The extension has no CUDA headers or libraries (DESIGN.md): the function comes from the
CUDA runtime library the process already has, the one torch loaded.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from tandem.errors import TandemError

# Names to try when /proc/self/maps names no loaded runtime (other platforms, static builds).
RUNTIME_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")


def _loaded_runtimes() -> list[str]:
    """Paths of the CUDA runtime libraries mapped into this process."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart" in line}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/"))


@functools.cache
def _launch_host_func():
    torch.cuda.init()  # loads the runtime torch links against
    for name in (*_loaded_runtimes(), *RUNTIME_NAMES):
        try:
            fn = ctypes.CDLL(name).cudaLaunchHostFunc
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        return fn
    raise TandemError("no CUDA runtime library (libcudart) with cudaLaunchHostFunc could be loaded")


def available() -> bool:
    """Whether host functions can be queued here (a CUDA device and its runtime library)."""
    if not torch.cuda.is_available():
        return False
    try:
        _launch_host_func()
    except TandemError:
        return False
    return True


def launch_host_func(fn_address: int, data_address: int, stream: torch.cuda.Stream | None = None) -> None:
    """Queue `void fn(void* data)` on `stream` (default: the current stream)."""
    stream = stream if stream is not None else torch.cuda.current_stream()
    err = _launch_host_func()(
        ctypes.c_void_p(stream.cuda_stream), ctypes.c_void_p(fn_address), ctypes.c_void_p(data_address)
    )
    if err != 0:
        raise TandemError(f"cudaLaunchHostFunc failed with CUDA error {err}")
