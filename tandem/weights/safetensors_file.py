"""Open a Hugging Face model directory's safetensors files, validated and memory-mapped.

A directory holds `model.safetensors`, or shards `model-0000N-of-0000M.safetensors`
listed by `model.safetensors.index.json`. Each file is 8 bytes (little-endian
header length N), N bytes of JSON header `{name: {dtype, shape, data_offsets:
[begin, end]}, "__metadata__": {...}}`, then the data. The header is untrusted:
every dtype, shape and offset is checked against the file before a view is made.
Tensor data is never read here, only mapped (as GGUFFile does).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tandem.errors import WeightError

__all__ = ["DTYPES", "SafetensorsFile", "TensorEntry"]

# safetensors dtype name -> (torch dtype, bytes per value)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorEntry:
    part: int  # index into SafetensorsFile.paths
    dtype: str  # a key of DTYPES
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    n_bytes: int


class SafetensorsFile:
    """A validated, memory-mapped set of safetensors files. Use SafetensorsFile.open(directory)."""

    def __init__(self, directory: Path, paths: list[Path], maps: list[mmap.mmap], tensors: dict):
        self.directory = directory
        self.paths = paths
        self._maps: list[mmap.mmap] | None = maps
        self.tensors: dict[str, TensorEntry] = tensors

    @classmethod
    def open(cls, directory: str | os.PathLike) -> SafetensorsFile:
        directory = Path(directory)
        paths = model_files(directory)
        maps: list[mmap.mmap] = []
        tensors: dict[str, TensorEntry] = {}
        try:
            for part, path in enumerate(paths):
                maps.append(_map(path))
                for name, entry in parse_header(maps[-1], path.name, part).items():
                    if name in tensors:
                        raise WeightError(
                            f"{path.name}: tensor {name!r} is also in {paths[tensors[name].part].name}"
                        )
                    tensors[name] = entry
            return cls(directory, paths, maps, tensors)
        except BaseException:
            for m in maps:
                m.close()
            raise

    def raw(self, name: str) -> torch.Tensor:
        """The bytes of one tensor: a zero-copy, read-only uint8 view of the mapping."""
        entry = self.tensors.get(name)
        if entry is None:
            raise WeightError(f"tensor {name!r} is not in {self.directory.name}")
        if self._maps is None:
            raise ValueError(f"{self.directory.name} is closed")
        # np.frombuffer exports the mmap's buffer, so close() cannot unmap pages under a live view.
        array = np.frombuffer(
            self._maps[entry.part], dtype=np.uint8, count=entry.n_bytes, offset=entry.offset
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(array)

    def typed(self, name: str) -> torch.Tensor:
        """One tensor with its own dtype and shape (a view when aligned, else a copy)."""
        data = self.raw(name)
        entry = self.tensors[name]
        dtype, size = DTYPES[entry.dtype]
        if data.data_ptr() % size:
            data = data.clone()  # safetensors does not promise aligned offsets
        return data.view(dtype).view(entry.shape)

    def close(self) -> None:
        if self._maps is None:
            return
        for m in self._maps:
            with contextlib.suppress(BufferError):  # still exported: unmapped when the last view dies
                m.close()
        self._maps = None

    def __repr__(self) -> str:
        return (
            f"SafetensorsFile({str(self.directory)!r}, {len(self.paths)} files, {len(self.tensors)} tensors)"
        )


def is_hf_directory(path: Path) -> bool:
    """Whether `path` is a Hugging Face model directory (config.json and safetensors, no GGUF)."""
    return (
        path.is_dir()
        and (path / "config.json").is_file()
        and ((path / SINGLE_NAME).is_file() or (path / INDEX_NAME).is_file())
        and not any(p.suffix == ".gguf" for p in path.iterdir())
    )


def model_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory: the index's shards, or model.safetensors."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WeightError(f"{index.name}: not a valid index ({' '.join(str(e).split())})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise WeightError(f"{index.name}: weight_map must map tensor names to file names")
        paths = []
        for name in dict.fromkeys(weight_map.values()):
            path = directory / name
            if Path(name).name != name or path.suffix != ".safetensors":
                raise WeightError(f"{index.name}: {name!r} is not a safetensors file in {directory.name}")
            if not path.is_file():
                raise WeightError(f"{index.name}: shard {name} is missing from {directory}")
            paths.append(path)
        if not paths:
            raise WeightError(f"{index.name}: weight_map is empty")
        return paths
    if (directory / SINGLE_NAME).is_file():
        return [directory / SINGLE_NAME]
    raise WeightError(f"{directory}: holds neither {SINGLE_NAME} nor {INDEX_NAME}")


def parse_header(buf: mmap.mmap, file_name: str, part: int) -> dict[str, TensorEntry]:
    """Every tensor entry of one file, each checked to lie inside the file's data."""
    size = len(buf)
    if size < 8:
        raise WeightError(f"{file_name}: file has {size} bytes, too small for a safetensors header")
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise WeightError(f"{file_name}: header length {n:,} runs past the end of the {size:,}-byte file")
    try:
        header = json.loads(bytes(buf[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise WeightError(f"{file_name}: header is not valid JSON ({' '.join(str(e).split())})") from None
    if not isinstance(header, dict):
        raise WeightError(f"{file_name}: header is not a JSON object")
    data_start, data_size = 8 + n, size - 8 - n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(info, name, file_name, part, data_start, data_size)
    return entries


def _entry(info, name: str, file_name: str, part: int, data_start: int, data_size: int) -> TensorEntry:
    where = f"{file_name}: tensor {name!r}"
    if not isinstance(info, dict):
        raise WeightError(f"{where}: entry is not a JSON object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPES:
        raise WeightError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise WeightError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise WeightError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise WeightError(f"{where}: data_offsets [{begin}, {end}] lie outside the {data_size:,} data bytes")
    numel = 1
    for d in shape:
        numel *= d
    if end - begin != numel * DTYPES[dtype][1]:
        raise WeightError(
            f"{where}: {end - begin} bytes, but {dtype} {shape} needs {numel * DTYPES[dtype][1]}"
        )
    return TensorEntry(part, dtype, tuple(shape), data_start + begin, end - begin)


def _map(path: Path) -> mmap.mmap:
    # ACCESS_READ for the reason GGUFFile gives: a private writable mapping counts against RAM + swap.
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise WeightError(f"{path.name}: file is empty")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise WeightError(f"{path}: cannot open: {e.strerror or e}") from None
