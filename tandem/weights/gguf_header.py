"""Validated parse of one GGUF file's header: metadata, tensor infos, data layout.

GGUF files are untrusted input. Every count and length is checked against the
bytes that remain *before* anything is read or allocated, so a hostile header
fails with a GGUFError in time proportional to the file size, never by hanging
or by asking for terabytes. The parse reads the buffer (an mmap) with `struct`
directly: gguf's GGUFReader builds a numpy view per string, which takes seconds
on a 262k-token vocabulary; this takes a fraction of that.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass
from typing import Any

from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from tandem.errors import GGUFError

GGML_MAX_DIMS = 4
SUPPORTED_VERSIONS = (2, 3)
HEADER_BYTES = 4 + 4 + 8 + 8  # magic, version, tensor count, kv count
_INT64_MAX = 2**63 - 1
# The fewest bytes one entry can take, to bound the header's counts by the file size.
_MIN_KV_BYTES = 8 + 4 + 1  # key length (key may be empty), value type, a 1-byte scalar
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, ggml type, offset
# Array elements become Python objects (~40 bytes each for a 4-byte float), so a header
# made of one huge array could take 10x the file size in memory. The largest real
# vocabularies hold ~262k tokens in 3-4 arrays; 16M elements is far beyond any model.
MAX_ARRAY_ELEMENTS = 1 << 24

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# Fixed-size value types; BOOL is read separately because only 0 and 1 are valid.
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}
_SCALARS = {int(t): struct.Struct("<" + f) for t, f in _SCALAR_FORMATS.items()}
_ELEMENT_MIN_BYTES = {**{t: s.size for t, s in _SCALARS.items()}, int(GGUFValueType.BOOL): 1}
_ELEMENT_MIN_BYTES[int(GGUFValueType.STRING)] = 8  # the length prefix of an empty string


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's raw blocks lie.

    shape: torch order, outermost first (GGUF stores the dimensions innermost first).
    n_bytes: size of the raw blocks. part: index into GGUFFile.paths.
    offset: absolute byte offset of the data in that part's file.
    """

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    n_bytes: int
    part: int
    offset: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]  # in file order
    alignment: int
    data_offset: int  # start of the data section; tensor offsets in the file are relative to it


class _Cursor:
    """Reads little-endian fields from a buffer, refusing to run past its end."""

    __slots__ = ("buf", "elements_left", "end", "label", "pos")

    def __init__(self, buf: Any, label: str) -> None:
        self.buf = buf
        self.pos = 0
        self.end = len(buf)
        self.label = label
        self.elements_left = MAX_ARRAY_ELEMENTS

    def error(self, message: str) -> GGUFError:
        return GGUFError(f"{self.label}: {message}")

    def need(self, n: int, what: str) -> None:
        if n > self.end - self.pos:
            raise self.error(
                f"{what} at byte {self.pos:,} needs {n:,} bytes but the file ends at byte {self.end:,}"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (value,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return value

    def u64(self, what: str) -> int:
        self.need(8, what)
        (value,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return value

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} is not valid UTF-8") from None

    def value(self, vtype: int, key: str) -> Any:
        scalar = _SCALARS.get(vtype)
        if scalar is not None:
            self.need(scalar.size, f"value of key {key!r}")
            (value,) = scalar.unpack_from(self.buf, self.pos)
            self.pos += scalar.size
            return value
        if vtype == GGUFValueType.STRING:
            return self.string(f"value of key {key!r}")
        if vtype == GGUFValueType.BOOL:
            return self.bools(1, key)[0]
        if vtype == GGUFValueType.ARRAY:
            return self.array(key)
        raise self.error(f"key {key!r} has unknown value type {vtype}")

    def bools(self, n: int, key: str) -> list[bool]:
        self.need(n, f"value of key {key!r}")
        raw = self.buf[self.pos : self.pos + n]
        if raw.translate(None, b"\x00\x01"):
            raise self.error(f"key {key!r} holds a bool that is neither 0 nor 1")
        self.pos += n
        return [b == 1 for b in raw]

    def array(self, key: str) -> list[Any]:
        etype = self.u32(f"element type of array {key!r}")
        n = self.u64(f"length of array {key!r}")
        if etype == GGUFValueType.ARRAY:
            # llama.cpp rejects nested arrays too, so no loadable model has one.
            raise self.error(f"key {key!r} is an array of arrays, which is not supported")
        min_bytes = _ELEMENT_MIN_BYTES.get(etype)
        if min_bytes is None:
            raise self.error(f"array {key!r} has unknown element type {etype}")
        left = self.end - self.pos
        if n > left // min_bytes:
            raise self.error(
                f"array {key!r} claims {n:,} elements but only {left:,} bytes are left in the file"
            )
        if n > self.elements_left:
            raise self.error(
                f"array {key!r} has {n:,} elements, more than the {MAX_ARRAY_ELEMENTS:,} "
                "array elements tandem accepts in one file's metadata"
            )
        self.elements_left -= n
        if etype == GGUFValueType.STRING:
            return self.strings(n, key)
        if etype == GGUFValueType.BOOL:
            return self.bools(n, key)
        values = list(struct.unpack_from(f"<{n}{_SCALAR_FORMATS[GGUFValueType(etype)]}", self.buf, self.pos))
        self.pos += n * min_bytes
        return values

    def strings(self, n: int, key: str) -> list[str]:
        # The hot loop of the whole parse (vocabularies hold up to ~262k strings): locals only.
        buf, pos, end = self.buf, self.pos, self.end
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        for i in range(n):
            if end - pos < 8:
                self.pos = pos
                self.need(8, f"length of element {i} of {key!r}")
            (length,) = unpack(buf, pos)
            pos += 8
            if length > end - pos:
                self.pos = pos
                self.need(length, f"element {i} of {key!r}")
            try:
                append(buf[pos : pos + length].decode("utf-8"))
            except UnicodeDecodeError:
                raise self.error(f"element {i} of {key!r} is not valid UTF-8") from None
            pos += length
        self.pos = pos
        return out


def parse_header(buf: Any, label: str, part: int = 0) -> GGUFHeader:
    """Parse and validate the header of one GGUF file held in `buf` (bytes or an mmap).

    label names the file in error messages; part goes into each TensorInfo.
    """
    cur = _Cursor(buf, label)
    if cur.end < HEADER_BYTES:
        raise cur.error(f"file has {cur.end:,} bytes, too small for a GGUF header ({HEADER_BYTES} bytes)")
    magic = bytes(buf[0:4])
    if magic != b"GGUF":
        raise cur.error(f"not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0:
            raise cur.error(f"version field reads {version:#x}: a big-endian GGUF file, not supported")
        if version == 1:
            raise cur.error(
                "GGUF version 1 is not supported (it predates 64-bit lengths); re-convert the model"
            )
        raise cur.error(f"GGUF version {version} is not supported (only versions 2 and 3)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("key-value count")
    left = cur.end - cur.pos
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > left:
        raise cur.error(
            f"header claims {n_kv:,} key-value pairs and {n_tensors:,} tensors "
            f"but only {left:,} bytes follow it"
        )
    metadata = _read_metadata(cur, n_kv)
    alignment = _alignment(cur, metadata)
    infos = [_read_tensor_info(cur) for _ in range(n_tensors)]
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = _place_tensors(cur, infos, data_offset, alignment, part)
    return GGUFHeader(version, metadata, tensors, alignment, data_offset)


def _read_metadata(cur: _Cursor, n_kv: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"key of key-value pair {i}")
        if key in metadata:
            raise cur.error(f"duplicate metadata key {key!r}")
        vtype = cur.u32(f"value type of key {key!r}")
        metadata[key] = cur.value(vtype, key)
    return metadata


def _alignment(cur: _Cursor, metadata: dict[str, Any]) -> int:
    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    # bool is an int in Python; a bool alignment is as wrong as a string one.
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise cur.error(f"general.alignment is {alignment!r}, not a positive power of two")
    return alignment


def _read_tensor_info(cur: _Cursor) -> tuple[str, GGMLQuantizationType, tuple[int, ...], int, int]:
    """One tensor info: (name, type, shape in torch order, n_bytes, offset relative to the data)."""
    name = cur.string("tensor name")
    if not name:
        raise cur.error("a tensor has an empty name")
    n_dims = cur.u32(f"dimension count of tensor {name!r}")
    if not 1 <= n_dims <= GGML_MAX_DIMS:
        raise cur.error(f"tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to {GGML_MAX_DIMS}")
    cur.need(8 * n_dims, f"dimensions of tensor {name!r}")
    ne = struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.pos)  # innermost first
    cur.pos += 8 * n_dims
    n_elements = 1
    for j, d in enumerate(ne):
        # Sizes are int64 in ggml, so a u64 at or above 2**63 is a negative size.
        if not 1 <= d <= _INT64_MAX:
            raise cur.error(f"tensor {name!r} dimension {j} has size {d}; sizes must be 1 to 2**63-1")
        n_elements *= d
    if n_elements > _INT64_MAX:
        raise cur.error(
            f"tensor {name!r} shape {list(ne)} has {n_elements:,} elements, more than ggml allows"
        )
    raw_type = cur.u32(f"type of tensor {name!r}")
    try:
        ggml_type = GGMLQuantizationType(raw_type)
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise cur.error(f"tensor {name!r} has unknown ggml type {raw_type}") from None
    if ne[0] % block_size:
        raise cur.error(
            f"tensor {name!r} has rows of {ne[0]:,} values, "
            f"not a multiple of the {ggml_type.name} block size {block_size}"
        )
    n_bytes = n_elements // block_size * type_size
    offset = cur.u64(f"data offset of tensor {name!r}")
    return name, ggml_type, tuple(reversed(ne)), n_bytes, offset


def _place_tensors(
    cur: _Cursor, infos: list[tuple], data_offset: int, alignment: int, part: int
) -> list[TensorInfo]:
    """Turn relative offsets into absolute ones, checking alignment, bounds and overlap."""
    tensors: list[TensorInfo] = []
    seen: set[str] = set()
    for name, ggml_type, shape, n_bytes, rel in infos:
        if name in seen:
            raise cur.error(f"duplicate tensor name {name!r}")
        seen.add(name)
        if rel % alignment:
            raise cur.error(
                f"tensor {name!r} data offset {rel:,} is not a multiple of the alignment {alignment}"
            )
        start = data_offset + rel
        if start + n_bytes > cur.end:
            raise cur.error(
                f"tensor {name!r} data ends at byte {start + n_bytes:,} but the file has {cur.end:,} bytes"
            )
        tensors.append(TensorInfo(name, ggml_type, shape, n_bytes, part, start))
    by_start = sorted(tensors, key=lambda t: t.offset)
    for a, b in itertools.pairwise(by_start):
        if b.offset < a.offset + a.n_bytes:
            raise cur.error(
                f"tensors {a.name!r} (bytes {a.offset:,}-{a.offset + a.n_bytes:,}) and "
                f"{b.name!r} (from byte {b.offset:,}) overlap"
            )
    return tensors
