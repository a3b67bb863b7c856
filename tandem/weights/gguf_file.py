"""Open a GGUF model (one file or a split set), validated and memory-mapped.

The header of every part is parsed and checked (see gguf_header) before
anything else happens; tensor data is never read here, only mapped: each
tensor() is a zero-copy uint8 view of the mapping, so a model larger than RAM
opens instantly and pages in on use.

The gguf package supplies the format's constants and enums (GGUFValueType,
GGMLQuantizationType, GGML_QUANT_SIZES); the parse itself is our own, over
Python's mmap, because GGUFReader is slow on big vocabularies and trusts its input.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tandem.errors import GGUFError, WeightError
from tandem.quant.quant_tensor import QuantTensor
from tandem.weights.gguf_header import HEADER_BYTES, GGUFHeader, TensorInfo, parse_header

__all__ = ["GGUFFile", "TensorInfo", "read_metadata"]

# llama.cpp's split naming (llama_split_path): <prefix>-%05d-of-%05d.gguf, numbered from 1.
_SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


class GGUFFile:
    """A validated, memory-mapped GGUF model. Use GGUFFile.open(path).

    paths: every part, in order. metadata: the key-value pairs of part 1 as plain
    Python values (split.* keys dropped). tensors: every tensor of every part, in
    file order.
    """

    def __init__(self, paths: list[Path], maps: list[mmap.mmap], headers: list[GGUFHeader]) -> None:
        self.paths = paths
        self._maps: list[mmap.mmap] | None = maps
        self.metadata: dict[str, Any] = {k: v for k, v in headers[0].metadata.items() if k not in _SPLIT_KEYS}
        self.tensors: dict[str, TensorInfo] = {}
        for path, header in zip(paths, headers, strict=True):
            for info in header.tensors:
                if info.name in self.tensors:
                    first = paths[self.tensors[info.name].part].name
                    raise GGUFError(f"{path.name}: tensor {info.name!r} is also in {first}")
                self.tensors[info.name] = info
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise GGUFError(f"{paths[0].name}: general.architecture is missing or not a string")
        self.architecture: str = arch

    @classmethod
    def open(cls, path: str | os.PathLike) -> GGUFFile:
        """Open a .gguf file, any part of a split set, or a directory holding one model."""
        paths = _resolve_parts(Path(path))
        maps: list[mmap.mmap] = []
        try:
            headers = []
            for i, part in enumerate(paths):
                maps.append(_map(part))
                headers.append(parse_header(maps[-1], part.name, part=i))
            _check_split(paths, headers)
            return cls(paths, maps, headers)
        except BaseException:
            for m in maps:
                m.close()  # nothing has been handed out yet, so closing cannot fail
            raise

    def tensor(self, name: str) -> QuantTensor:
        """The raw blocks of one tensor: a zero-copy, read-only view of the mapped file.

        Writing into `.data` would crash the process (the pages are mapped
        read-only); copy it first if it must change.
        """
        info = self.tensors.get(name)
        if info is None:
            raise WeightError(f"tensor {name!r} is not in {self.paths[0].name}")
        if self._maps is None:
            raise ValueError(f"{self.paths[0].name} is closed")
        # np.frombuffer takes a buffer export on the mmap, which keeps close() from
        # unmapping pages under a live tensor (torch.frombuffer takes none).
        array = np.frombuffer(self._maps[info.part], dtype=np.uint8, count=info.n_bytes, offset=info.offset)
        with warnings.catch_warnings():
            # torch has no read-only tensors and warns about every read-only buffer;
            # the mapping is read-only on purpose (see _map), so the warning says nothing new.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            data = torch.from_numpy(array)
        return QuantTensor(data, info.ggml_type, info.shape, name)

    def close(self) -> None:
        """Release the mappings. Tensors already handed out stay valid: a mapping
        they still use is unmapped when the last of them is freed."""
        if self._maps is None:
            return
        for m in self._maps:
            # A mapping still exported to live tensors refuses to close; garbage
            # collection unmaps it once the last of them is freed.
            with contextlib.suppress(BufferError):
                m.close()
        self._maps = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.paths[0])!r}, {self.architecture}, {len(self.tensors)} tensors)"


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a model (see GGUFFile.metadata), validated like open()."""
    with GGUFFile.open(path) as f:
        return f.metadata


def _map(path: Path) -> mmap.mmap:
    # ACCESS_READ (MAP_SHARED, PROT_READ) rather than ACCESS_COPY: a writable private
    # mapping is charged against the commit limit, so the kernel refuses one larger
    # than RAM + swap, which is the very case tandem exists for.
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < HEADER_BYTES:
                raise GGUFError(f"{path.name}: file has {size:,} bytes, too small for a GGUF header")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise GGUFError(f"{path}: cannot open: {e.strerror or e}") from None


def _resolve_parts(path: Path) -> list[Path]:
    """The files of the model at `path`, in part order."""
    if path.is_dir():
        path = _model_in_dir(path)
    elif not path.is_file():
        raise GGUFError(f"{path}: no such file or directory")
    m = _SPLIT_NAME.match(path.name)
    if m is None:
        return [path]
    no, count = int(m["no"]), int(m["count"])
    if not 1 <= no <= count:
        raise GGUFError(f"{path.name}: split file name says part {no} of {count}")
    parts = [path.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    for i, part in enumerate(parts, 1):
        if not part.is_file():
            raise GGUFError(f"{part}: part {i} of {count} of the split model {path.name} is missing")
    return parts


def _model_in_dir(directory: Path) -> Path:
    """The one model in a directory: a single .gguf file, or any part of one split set."""
    files = sorted(p for p in directory.iterdir() if p.suffix == ".gguf" and p.is_file())
    if not files:
        raise GGUFError(f"{directory}: directory holds no .gguf file")
    sets = set()
    for p in files:
        m = _SPLIT_NAME.match(p.name)
        sets.add((m["prefix"], m["count"]) if m else p.name)
    if len(sets) > 1:
        names = ", ".join(p.name for p in files[:6]) + (", ..." if len(files) > 6 else "")
        raise GGUFError(f"{directory}: directory holds more than one model ({names}); name the file")
    return files[0]


def _check_split(paths: list[Path], headers: list[GGUFHeader]) -> None:
    """Each part's split.* keys must agree with its name and with the other parts."""
    n = len(paths)
    for i, (path, header) in enumerate(zip(paths, headers, strict=True)):
        meta = header.metadata
        if "split.count" not in meta:
            if n == 1:
                continue  # an ordinary single file
            raise GGUFError(f"{path.name}: named as part {i + 1} of {n} but has no split.count key")
        count = _split_int(path, meta, "split.count")
        no = _split_int(path, meta, "split.no")
        if count < 1 or not 0 <= no < count:
            raise GGUFError(f"{path.name}: split.no {no} does not fit split.count {count}")
        if n == 1 and count > 1:
            raise GGUFError(
                f"{path.name}: the file is part {no + 1} of a {count}-part split model, but its name does "
                f"not end in -{no + 1:05d}-of-{count:05d}.gguf, so the other parts cannot be found"
            )
        if count != n or no != i:
            raise GGUFError(
                f"{path.name}: split.no {no} / split.count {count} (split.no counts from 0) "
                f"disagree with the file name, part {i + 1} of {n}"
            )
    total = sum(len(h.tensors) for h in headers)
    for path, header in zip(paths, headers, strict=True):
        if "split.tensors.count" in header.metadata:
            expected = _split_int(path, header.metadata, "split.tensors.count")
            if expected != total:
                raise GGUFError(
                    f"{path.name}: split.tensors.count is {expected:,} "
                    f"but the {n} parts hold {total:,} tensors"
                )


def _split_int(path: Path, meta: dict[str, Any], key: str) -> int:
    value = meta.get(key)
    if type(value) is not int:
        raise GGUFError(f"{path.name}: {key} is {value!r}, not an integer")
    return value
