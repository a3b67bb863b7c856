"""The CUDA calls torch does not offer, through ctypes.

- `launch_host_func`: CPU work in a CUDA stream's order (`cudaLaunchHostFunc`). The
  stream runs the function when the work queued before it is done and holds the work
  queued after it until the function returns; a CUDA graph captured from the stream
  keeps it as a host node, called at every replay. tandem's CPU engine exposes its MoE
  calls as such functions (`tandem.cpu.engine.host_run_fn`), so the routed experts of a
  hybrid model run inside a captured decode step.
- `register_host_memory`: page-lock memory torch did not allocate (`cudaHostRegister`),
  such as the mapped GGUF file's expert blocks, so that copies from it to the GPU run
  at the bus's speed and without blocking the host.

- `write_value32` / `wait_value32`: a stream writes a word of page-locked host memory,
  or waits until one holds a value (the driver's stream memory operations,
  cuStreamWriteValue32 / cuStreamWaitValue32), so that the stream and a CPU thread
  hand work to each other without host functions (tandem.gpu.mailbox).

The extension has no CUDA headers or libraries (DESIGN.md): the functions come from the
CUDA runtime library the process already has, the one torch loaded.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
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
        lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]
        lib.cudaHostUnregister.restype = ctypes.c_int
        lib.cudaGetLastError.restype = ctypes.c_int
        lib.cudaHostGetDevicePointer.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_void_p,
            ctypes.c_uint,
        ]
        lib.cudaHostGetDevicePointer.restype = ctypes.c_int
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


_registered: list[tuple[int, int]] = []  # page ranges registered, [start, end), disjoint


def register_host_memory(tensor: torch.Tensor) -> list[tuple[int, int]] | None:
    """Page-lock a CPU tensor's bytes (read-only registration): the page ranges this call
    registered (those of its pages no earlier call covers: tensors of one mapped file
    share pages at their ends), or None where it failed (too little lockable memory, an
    old driver). A failure leaves the memory as it was; copies from it still work,
    staged through the driver. The owner hands the ranges to `unregister_host_memory`
    before the memory goes (a registration outliving its mapping pins stale pages).

    A copy must not cross from one registration into another (CUDA refuses it):
    `copy_to_device` splits it at their ends."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.numel() == 0:
        return None
    lib = _runtime()
    page = mmap.PAGESIZE
    start = tensor.data_ptr() // page * page
    end = -(-(tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page) * page
    done: list[tuple[int, int]] = []
    for lo, hi in _missing(start, end):
        if lib.cudaHostRegister(ctypes.c_void_p(lo), hi - lo, HOST_REGISTER_READ_ONLY) != 0:
            lib.cudaGetLastError()  # clear it: a failed registration must not fail a later call
            unregister_host_memory(done)
            return None
        _registered.append((lo, hi))
        done.append((lo, hi))
    return done


def unregister_host_memory(ranges: list[tuple[int, int]]) -> None:
    """Undo `register_host_memory` for the ranges it returned."""
    if not ranges:
        return
    lib = _runtime()
    for lo, hi in ranges:
        if (lo, hi) in _registered:
            _registered.remove((lo, hi))
            if lib.cudaHostUnregister(ctypes.c_void_p(lo)) != 0:
                lib.cudaGetLastError()


def copy_to_device(
    tensor: torch.Tensor, device: torch.device, out: torch.Tensor | None = None
) -> torch.Tensor:
    """A contiguous CPU tensor copied to `device` (into `out`, of as many elements, if
    given) without waiting where it is page-locked, in pieces that each lie in one
    registration or in none."""
    flat = tensor.reshape(-1)
    out = torch.empty_like(flat, device=device) if out is None else out.view(-1)
    for a, b in registration_pieces(flat):
        out[a:b].copy_(flat[a:b], non_blocking=True)
    return out.view(tensor.shape)


def registration_pieces(flat: torch.Tensor) -> list[tuple[int, int]]:
    """[a, b) element ranges covering a 1-D tensor, cut where a registration starts or ends."""
    size, base, n = flat.element_size(), flat.data_ptr(), flat.numel()
    cuts = {0, n}
    for lo, hi in _registered:
        for edge in (lo, hi):
            offset = edge - base
            if 0 < offset < n * size and offset % size == 0:
                cuts.add(offset // size)
    return list(itertools.pairwise(sorted(cuts)))


def _missing(start: int, end: int) -> list[tuple[int, int]]:
    """The parts of [start, end) no earlier registration covers."""
    parts = [(start, end)]
    for lo, hi in _registered:
        parts = [
            piece for a, b in parts for piece in ((a, min(b, lo)), (max(a, hi), b)) if piece[0] < piece[1]
        ]
    return parts


# cuStreamWaitValue32's flags: wait until the word equals the value.
WAIT_VALUE_EQ = 1
DRIVER_NAMES = ("libcuda.so.1", "libcuda.so")


@functools.cache
def _memory_ops() -> tuple[object, object] | None:
    """cuStreamWriteValue32 and cuStreamWaitValue32 of the driver, or None."""
    torch.cuda.init()
    for name in DRIVER_NAMES:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        fns = []
        for base in ("cuStreamWriteValue32", "cuStreamWaitValue32"):
            fn = getattr(lib, f"{base}_v2", None) or getattr(lib, base, None)
            if fn is None:
                break
            fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
            fn.restype = ctypes.c_int
            fns.append(fn)
        if len(fns) == 2:
            return fns[0], fns[1]
    return None


def device_pointer(tensor: torch.Tensor) -> int:
    """The device's address of a page-locked CPU tensor's first byte."""
    address = ctypes.c_void_p()
    if _runtime().cudaHostGetDevicePointer(ctypes.byref(address), ctypes.c_void_p(tensor.data_ptr()), 0) != 0:
        _runtime().cudaGetLastError()
        raise TandemError("cudaHostGetDevicePointer failed: the tensor is not page-locked host memory")
    return int(address.value or 0)


def write_value32(device_address: int, value: int, stream: torch.cuda.Stream | None = None) -> None:
    """Queue on `stream` (default: current) a write of `value` to the 32-bit word at `device_address`."""
    _memory_op(0, "cuStreamWriteValue32", device_address, value, 0, stream)


def wait_value32(device_address: int, value: int, stream: torch.cuda.Stream | None = None) -> None:
    """Queue on `stream` (default: current) a wait until the word at `device_address` equals `value`."""
    _memory_op(1, "cuStreamWaitValue32", device_address, value, WAIT_VALUE_EQ, stream)


def _memory_op(which: int, name: str, address: int, value: int, flags: int, stream) -> None:
    ops = _memory_ops()
    if ops is None:
        raise TandemError("this CUDA driver has no stream memory operations")
    stream = stream if stream is not None else torch.cuda.current_stream()
    err = ops[which](ctypes.c_void_p(stream.cuda_stream), address, value, flags)
    if err != 0:
        raise TandemError(f"{name} failed with CUDA driver error {err}")


@functools.cache
def stream_memory_ops_work() -> bool:
    """Whether a stream can write and wait on host words, eagerly and inside a captured
    CUDA graph: tried once on a side stream with a word the stream itself sets, so a
    failure cannot leave anything waiting."""
    if _memory_ops() is None:
        return False
    try:
        word = torch.zeros(16, dtype=torch.int32, pin_memory=True)
        address = device_pointer(word)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            write_value32(address, 7)
            wait_value32(address, 7)
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            write_value32(address, 9)
            wait_value32(address, 9)
        graph.replay()
        torch.cuda.synchronize()
        return int(word[0]) == 9
    except (TandemError, RuntimeError):
        _runtime().cudaGetLastError()
        return False
