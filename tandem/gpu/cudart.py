"""The two CUDA runtime calls torch does not offer, through ctypes.

- `launch_host_func`: CPU work in a CUDA stream's order (`cudaLaunchHostFunc`). The
  stream runs the function when the work queued before it is done and holds the work
  queued after it until the function returns; a CUDA graph captured from the stream
  keeps it as a host node, called at every replay. tandem's CPU engine exposes its MoE
  calls as such functions (`tandem.cpu.engine.host_run_fn`), so the routed experts of a
  hybrid model run inside a captured decode step.
- `register_host_memory`: page-lock memory torch did not allocate (`cudaHostRegister`),
  such as the mapped GGUF file's expert blocks, so that copies from it to the GPU run
  at the bus's speed and without blocking the host.

The extension has no CUDA headers or libraries (DESIGN.md): the functions come from the
CUDA runtime library the process already has, the one torch loaded.
"""

from __future__ import annotations

import ctypes
import functools
import mmap

import torch

from tandem.errors import TandemError

# Names to try when /proc/self/maps names no loaded runtime (other platforms, static builds).
RUNTIME_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")
HOST_REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly: the mapping may be read-only


def _loaded_runtimes() -> list[str]:
    """Paths of the CUDA runtime libraries mapped into this process."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart" in line}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/"))


@functools.cache
def _runtime() -> ctypes.CDLL:
    torch.cuda.init()  # loads the runtime torch links against
    for name in (*_loaded_runtimes(), *RUNTIME_NAMES):
        try:
            lib = ctypes.CDLL(name)
            lib.cudaLaunchHostFunc  # noqa: B018 - the one the library must have
        except (OSError, AttributeError):
            continue
        lib.cudaLaunchHostFunc.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.cudaLaunchHostFunc.restype = ctypes.c_int
        lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        lib.cudaHostRegister.restype = ctypes.c_int
        lib.cudaGetLastError.restype = ctypes.c_int
        return lib
    raise TandemError("no CUDA runtime library (libcudart) with cudaLaunchHostFunc could be loaded")


def launch_host_func(fn_address: int, data_address: int, stream: torch.cuda.Stream | None = None) -> None:
    """Queue `void fn(void* data)` on `stream` (default: the current stream)."""
    stream = stream if stream is not None else torch.cuda.current_stream()
    err = _runtime().cudaLaunchHostFunc(
        ctypes.c_void_p(stream.cuda_stream), ctypes.c_void_p(fn_address), ctypes.c_void_p(data_address)
    )
    if err != 0:
        raise TandemError(f"cudaLaunchHostFunc failed with CUDA error {err}")


_registered: list[tuple[int, int]] = []  # page ranges registered so far, [start, end)


def register_host_memory(tensor: torch.Tensor) -> bool:
    """Page-lock a CPU tensor's bytes for the rest of the process (read-only registration);
    whether all of them are. Whole pages are registered, each once: tensors of one mapped
    file share pages at their ends. A failure (too little lockable memory, an old driver)
    leaves the memory as it was: copies from it still work, staged through the driver."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.numel() == 0:
        return False
    lib = _runtime()
    page = mmap.PAGESIZE
    start = tensor.data_ptr() // page * page
    end = -(-(tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page) * page
    for lo, hi in _missing(start, end):
        if lib.cudaHostRegister(ctypes.c_void_p(lo), hi - lo, HOST_REGISTER_READ_ONLY) != 0:
            lib.cudaGetLastError()  # clear it: a failed registration must not fail a later call
            return False
        _registered.append((lo, hi))
    return True


def _missing(start: int, end: int) -> list[tuple[int, int]]:
    """The parts of [start, end) no earlier registration covers."""
    parts = [(start, end)]
    for lo, hi in _registered:
        parts = [
            piece for a, b in parts for piece in ((a, min(b, lo)), (max(a, hi), b)) if piece[0] < piece[1]
        ]
    return parts
