"""GGUFFile: round trips through gguf's writer, split sets, and hostile files.

Hostile files are built byte by byte so each one breaks exactly one rule; every
one must fail with a GGUFError naming the file, fast and without a memory spike.
"""

from __future__ import annotations

import random
import shutil
import struct
import time
import tracemalloc

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from tandem.errors import GGUFError, WeightError
from tandem.weights import gguf_header
from tandem.weights.gguf_file import GGUFFile, read_metadata

# ---- byte-level builders for hostile files

BIG = 2**64 - 1


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return _str(key) + struct.pack("<I", vtype) + payload


def _ti(name: str | bytes, ne: list[int], ggml_type: int = Q.F32, offset: int = 0) -> bytes:
    return _str(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, ggml_type, offset)


ARCH = _kv("general.architecture", V.STRING, _str("llama"))


W4 = _ti("w", [4])  # a 4-value F32 tensor at offset 0; the default file holds its 16 bytes


def _gguf(
    kvs=(ARCH,), tis=(W4,), data=b"\0" * 16, *, version=3, n_kv=None, n_tensors=None, magic=b"GGUF"
) -> bytes:
    """A GGUF file with default alignment; the counts may lie."""
    n_tensors = len(tis) if n_tensors is None else n_tensors
    n_kv = len(kvs) if n_kv is None else n_kv
    head = magic + struct.pack("<IQQ", version, n_tensors, n_kv)
    body = head + b"".join(kvs) + b"".join(tis)
    return body + b"\0" * (-len(body) % 32) + data


def _expect_error(path, *fragments: str) -> str:
    """Open `path`; it must fail with a GGUFError naming the file and `fragments`, within
    2 s and 50 MB of Python allocations."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(GGUFError) as info:
            GGUFFile.open(path)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert path.name in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert elapsed < 2.0 and peak < 50e6, (elapsed, peak)
    return message


# ---- round trips through gguf.GGUFWriter


def _write_model(path, tensors: dict[str, np.ndarray], alignment: int | None = None, **writer_args) -> None:
    w = gguf.GGUFWriter(path, "llama", **writer_args)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_uint64("t.u64", 2**64 - 1)
    w.add_int64("t.i64", -(2**63))
    w.add_float32("t.f32", 0.5)
    w.add_float64("t.f64", 1e300)
    w.add_bool("t.true", True)
    w.add_bool("t.false", False)
    w.add_string("t.str", "héllo ▁ 🦙")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.25, -1.5])
    w.add_array("t.strs", ["a", "", "ç"])
    for name, array in tensors.items():
        if array.dtype == np.uint8:  # pre-quantized Q8_0 blocks
            w.add_tensor(name, array, raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "token_embd.weight": rng.standard_normal((8, 32), dtype=np.float32),
        "blk.0.attn_q.weight": gguf.quants.quantize(rng.standard_normal((4, 64), dtype=np.float32), Q.Q8_0),
        "blk.0.attn_norm.weight": rng.standard_normal(32, dtype=np.float32),
        "blk.0.ffn_up.weight": rng.standard_normal((2, 3, 32)).astype(np.float16),
        "output_norm.weight": np.ones(32, dtype=np.float32),
    }


EXPECTED = {
    "token_embd.weight": (Q.F32, (8, 32)),
    "blk.0.attn_q.weight": (Q.Q8_0, (4, 64)),
    "blk.0.attn_norm.weight": (Q.F32, (32,)),
    "blk.0.ffn_up.weight": (Q.F16, (2, 3, 32)),
    "output_norm.weight": (Q.F32, (32,)),
}


def _check_round_trip(f: GGUFFile, tensors: dict[str, np.ndarray]) -> None:
    assert f.architecture == "llama"
    assert list(f.tensors) == list(tensors)
    for name, array in tensors.items():
        qt = f.tensor(name)
        assert (qt.ggml_type, qt.shape) == EXPECTED[name]
        assert f.tensors[name].n_bytes == array.nbytes == qt.data.numel()
        assert qt.data.numpy().tobytes() == array.tobytes()


@pytest.mark.parametrize("alignment", [None, 64])
def test_round_trip(tmp_path, alignment):
    path = tmp_path / "model.gguf"
    tensors = _tensors()
    _write_model(path, tensors, alignment)
    with GGUFFile.open(path) as f:
        _check_round_trip(f, tensors)
        assert f.paths == [path]
        m = f.metadata
        assert (m["t.u8"], m["t.i8"], m["t.u16"], m["t.i16"]) == (200, -100, 60000, -30000)
        assert (m["t.u32"], m["t.i32"], m["t.u64"], m["t.i64"]) == (4e9, -2e9, 2**64 - 1, -(2**63))
        assert (m["t.f32"], m["t.f64"], m["t.true"], m["t.false"]) == (0.5, 1e300, True, False)
        assert m["t.str"] == "héllo ▁ 🦙"
        assert (m["t.ints"], m["t.floats"], m["t.strs"]) == ([1, -2, 3], [0.25, -1.5], ["a", "", "ç"])
        for info in f.tensors.values():
            assert info.part == 0 and info.offset % (alignment or 32) == 0
        # Zero-copy: two views of one tensor share memory.
        assert (
            f.tensor("output_norm.weight").data.data_ptr() == f.tensor("output_norm.weight").data.data_ptr()
        )
        with pytest.raises(WeightError, match=r"blk\.9\.attn_k\.weight"):
            f.tensor("blk.9.attn_k.weight")
    assert read_metadata(path)["t.strs"] == ["a", "", "ç"]


def test_hand_built_arrays(tmp_path):
    """Arrays that gguf's writer cannot produce (empty ones) or rarely does."""
    path = tmp_path / "model.gguf"
    arrays = (
        _kv("empty", V.ARRAY, struct.pack("<IQ", V.STRING, 0)),
        _kv("bools", V.ARRAY, struct.pack("<IQ3B", V.BOOL, 3, 1, 0, 1)),
        _kv("u64s", V.ARRAY, struct.pack("<IQ2Q", V.UINT64, 2, 0, BIG)),
        _kv("f64s", V.ARRAY, struct.pack("<IQ2d", V.FLOAT64, 2, -0.5, 3.25)),
        _kv("i8s", V.ARRAY, struct.pack("<IQ2b", V.INT8, 2, -128, 127)),
    )
    path.write_bytes(_gguf((ARCH, *arrays)))
    m = read_metadata(path)
    assert (m["empty"], m["bools"], m["u64s"]) == ([], [True, False, True], [0, BIG])
    assert (m["f64s"], m["i8s"]) == ([-0.5, 3.25], [-128, 127])


def test_views_outlive_close(tmp_path):
    path = tmp_path / "model.gguf"
    tensors = _tensors()
    _write_model(path, tensors)
    f = GGUFFile.open(path)
    data = f.tensor("output_norm.weight").data
    f.close()
    f.close()
    assert torch.equal(data.view(torch.float32), torch.ones(32))
    with pytest.raises(ValueError, match="closed"):
        f.tensor("output_norm.weight")


# ---- split sets


def _write_split(tmp_path, split_max_tensors=2) -> tuple[list, dict[str, np.ndarray]]:
    tensors = _tensors()
    _write_model(tmp_path / "model.gguf", tensors, split_max_tensors=split_max_tensors)
    return sorted(tmp_path.glob("model-*-of-*.gguf")), tensors


def test_split_set(tmp_path):
    parts, tensors = _write_split(tmp_path)
    assert [p.name for p in parts] == [f"model-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    for given in (parts[0], parts[2], tmp_path):
        with GGUFFile.open(given) as f:
            _check_round_trip(f, tensors)
            assert f.paths == parts
            assert [t.part for t in f.tensors.values()] == [0, 0, 1, 1, 2]
            assert f.metadata["t.str"] == "héllo ▁ 🦙" and not any(k.startswith("split.") for k in f.metadata)


def test_split_missing_part(tmp_path):
    parts, _ = _write_split(tmp_path)
    parts[1].unlink()
    with pytest.raises(GGUFError, match=r"model-00002-of-00003\.gguf.*missing"):
        GGUFFile.open(parts[0])


def test_split_part_renamed(tmp_path):
    parts, _ = _write_split(tmp_path)
    renamed = tmp_path / "sub" / "model.gguf"
    renamed.parent.mkdir()
    shutil.copy(parts[0], renamed)
    _expect_error(renamed, "part 1 of a 3-part split model")


def test_split_inconsistent(tmp_path):
    split_kvs = [
        _kv("split.no", V.UINT16, struct.pack("<H", 0)),
        _kv("split.count", V.UINT16, struct.pack("<H", 2)),
    ]
    tensors_count = _kv("split.tensors.count", V.INT32, struct.pack("<i", 5))
    (tmp_path / "m-00001-of-00002.gguf").write_bytes(_gguf((ARCH, *split_kvs, tensors_count)))
    part2 = _gguf((_kv("split.no", V.UINT16, struct.pack("<H", 1)), split_kvs[1]), (_ti("v", [4]),))
    (tmp_path / "m-00002-of-00002.gguf").write_bytes(part2)
    _expect_error(tmp_path / "m-00001-of-00002.gguf", "split.tensors.count is 5", "hold 2 tensors")
    (tmp_path / "m-00002-of-00002.gguf").write_bytes(_gguf((split_kvs[1],), (_ti("v", [4]),)))
    with pytest.raises(GGUFError, match=r"m-00002-of-00002\.gguf: split\.no is None"):
        GGUFFile.open(tmp_path)
    (tmp_path / "m-00002-of-00002.gguf").write_bytes(_gguf((ARCH,), (_ti("v", [4]),)))
    with pytest.raises(
        GGUFError, match=r"m-00002-of-00002\.gguf: named as part 2 of 2 but has no split\.count"
    ):
        GGUFFile.open(tmp_path)


def test_directory_errors(tmp_path):
    with pytest.raises(GGUFError, match=r"no \.gguf file"):
        GGUFFile.open(tmp_path)
    _write_model(tmp_path / "a.gguf", _tensors())
    _write_model(tmp_path / "b.gguf", _tensors())
    with pytest.raises(GGUFError, match="more than one model"):
        GGUFFile.open(tmp_path)
    with pytest.raises(GGUFError, match="no such file"):
        GGUFFile.open(tmp_path / "c.gguf")


# ---- hostile files


def _meta(*kvs: bytes) -> bytes:
    """The default file with extra key-value pairs after general.architecture."""
    return _gguf((ARCH, *kvs))


def _arr(key: str, etype: int, n: int, payload: bytes = b"") -> bytes:
    return _kv(key, V.ARRAY, struct.pack("<IQ", etype, n) + payload)


def _tis(*tis: bytes, data: bytes = b"\0" * 16) -> bytes:
    return _gguf(tis=tis, data=data)


U32 = struct.Struct("<I").pack
# fmt: off
HOSTILE = {
    "empty": (b"", "too small"),
    "wrong magic": (_gguf(magic=b"GGML"), "not a GGUF file"),
    "version 1": (_gguf(version=1), "version 1 is not supported"),
    "version 99": (_gguf(version=99), "version 99 is not supported"),
    "big endian": (_gguf(version=3 << 24), "big-endian"),
    "absurd kv count": (_gguf(n_kv=2**60), "claims 1,152,921,504,606,846,976 key-value pairs"),
    "absurd tensor count": (_gguf(n_tensors=BIG), "18,446,744,073,709,551,615 tensors"),
    "absurd key length": (_gguf(n_kv=1, kvs=(struct.pack("<Q", 2**63),)), "key of key-value pair 0"),
    "absurd string": (_meta(_kv("general.name", V.STRING, struct.pack("<Q", BIG))), "value of key"),
    "absurd array": (_meta(_arr("a", V.UINT32, 2**62)), "claims 4,611,686"),
    "absurd string array": (_meta(_arr("t", V.STRING, BIG)), "array 't' claims"),
    "absurd array string": (_meta(_arr("t", V.STRING, 2, struct.pack("<Q", BIG))), "element 0 of 't'"),
    "nested array": (_meta(_arr("n", V.ARRAY, 0)), "array of arrays"),
    "unknown value type": (_meta(_kv("x", 13, b"\0" * 8)), "unknown value type 13"),
    "unknown element type": (_meta(_arr("x", 99, 1)), "element type 99"),
    "invalid bool": (_meta(_kv("b", V.BOOL, b"\x02")), "neither 0 nor 1"),
    "bad utf-8 value": (_meta(_kv("general.name", V.STRING, _str(b"\xff"))), "'general.name' is not valid"),
    "bad utf-8 key": (_meta(_kv(b"k\xc3", V.UINT8, b"\0")), "key of key-value pair 1 is not valid UTF-8"),
    "bad utf-8 token": (_meta(_arr("tok", V.STRING, 2, _str("a") + _str(b"\x80"))), "element 1 of 'tok'"),
    "bad utf-8 tensor name": (_tis(_ti(b"w\xff", [4])), "tensor name is not valid UTF-8"),
    "duplicate key": (_meta(ARCH), "duplicate metadata key 'general.architecture'"),
    "no architecture": (_gguf((_kv("general.name", V.STRING, _str("x")),)), "general.architecture is"),
    "bad alignment": (_meta(_kv("general.alignment", V.UINT32, U32(48))), "48, not a positive power of two"),
    "zero alignment": (_meta(_kv("general.alignment", V.UINT32, U32(0))), "0, not a positive power of two"),
    "duplicate tensor": (_tis(W4, _ti("w", [4], offset=32), data=b"\0" * 48), "duplicate tensor name 'w'"),
    "n_dims 0": (_tis(_ti("w", [])), "'w' has 0 dimensions"),
    "n_dims 5": (_tis(_ti("w", [1, 1, 1, 1, 4])), "'w' has 5 dimensions"),
    "dim 0": (_tis(_ti("w", [4, 0])), "dimension 1 has size 0"),
    "negative dim": (_tis(_ti("w", [4, BIG])), f"dimension 1 has size {BIG}"),
    "product overflow": (_tis(_ti("w", [2**40, 2**40])), "more than ggml allows"),
    "unknown ggml type": (_tis(_ti("w", [4], ggml_type=4)), "unknown ggml type 4"),
    "huge ggml type": (_tis(_ti("w", [4], ggml_type=2**32 - 1)), "unknown ggml type 4294967295"),
    "partial block": (_tis(_ti("w", [33], ggml_type=Q.Q8_0), data=b"\0" * 64), "not a multiple of the Q8_0"),
    "offset past end": (_tis(_ti("w", [4], offset=2**40)), "data ends at byte 1,099,511,627,"),
    "data past end": (_tis(_ti("w", [8])), "tensor 'w' data ends at byte"),
    "misaligned": (_tis(_ti("w", [4], offset=4), data=b"\0" * 64), "offset 4 is not a multiple of"),
    "overlap": (_tis(_ti("a", [16]), _ti("b", [4], offset=32), data=b"\0" * 96), "'a' (bytes"),
}
# fmt: on


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile(tmp_path, case):
    data, fragment = HOSTILE[case]
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    _expect_error(path, fragment)


def test_array_element_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_header, "MAX_ARRAY_ELEMENTS", 4)
    path = tmp_path / "model.gguf"
    path.write_bytes(_gguf((ARCH, _kv("a", V.ARRAY, struct.pack("<IQ5B", V.UINT8, 5, *range(5))))))
    _expect_error(path, "more than the 4 array elements")


def test_truncated_everywhere(tmp_path):
    src = tmp_path / "full.gguf"
    _write_model(src, _tensors())
    full = src.read_bytes()
    with GGUFFile.open(src) as f:
        data_start = min(t.offset for t in f.tensors.values())
    cuts = [*range(0, data_start + 8, 7), data_start + 100, len(full) - 300, len(full) - 1]
    path = tmp_path / "model.gguf"
    for cut in cuts:
        path.write_bytes(full[:cut])
        _expect_error(path)


def test_fuzz_byte_flips(tmp_path):
    src = tmp_path / "full.gguf"
    _write_model(src, _tensors())
    full = src.read_bytes()
    rng = random.Random(1234)
    path = tmp_path / "model.gguf"
    opened = 0
    start = time.perf_counter()
    for _ in range(300):
        data = bytearray(full)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(min(len(data), 1200))  # mostly the header, where the parsing is
            if rng.random() < 0.3:  # a whole field of 0xff bytes (absurd lengths and counts)
                data[i : i + 8] = b"\xff" * 8
            else:
                data[i] ^= 1 << rng.randrange(8)
        path.write_bytes(data)
        try:
            f = GGUFFile.open(path)
        except GGUFError as e:
            assert "model.gguf" in str(e)
            continue
        with f:
            for name in f.tensors:
                f.tensor(name)
        opened += 1
    assert time.perf_counter() - start < 30
    assert 0 < opened < 300  # both outcomes were exercised


# ---- the real models


@pytest.mark.parametrize(
    "fixture, arch, n_tensors, embd_type, embd_shape",
    [
        ("gemma_gguf", "gemma3", 236, Q.Q8_0, (262144, 640)),
        ("qwen_gguf", "qwen2", 339, Q.Q4_K, (151936, 1536)),
    ],
)
def test_real_models(request, fixture, arch, n_tensors, embd_type, embd_shape):
    path = request.getfixturevalue(fixture)
    start = time.perf_counter()
    with GGUFFile.open(path) as f:
        assert time.perf_counter() - start < 2.0
        assert f.architecture == arch and len(f.tensors) == n_tensors
        embd = f.tensor("token_embd.weight")
        assert (embd.ggml_type, embd.shape) == (embd_type, embd_shape)
        assert len(f.metadata["tokenizer.ggml.tokens"]) == embd_shape[0]
