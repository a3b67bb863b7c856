"""Write a full-size random GGUF file of a real model's shape, for benchmarks.

GGUFWriter writes the header, metadata and tensor infos from the plan alone
(add_tensor_info takes no data); the data section is then streamed here,
tensor by tensor, in the writer's own layout (each tensor starts at a multiple
of the alignment), so memory stays at a few templates however big the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFWriter

from tandem.errors import TandemError
from tandem.synth.metadata import add_model_metadata, add_tokenizer, default_tokenizer_source
from tandem.synth.quant_mix import Mix, assign_types, get_mix, tensor_bytes
from tandem.synth.random_blocks import BlockSource
from tandem.synth.shapes import ShapeSpec, get_shape
from tandem.synth.tensors import TensorSpec, tensor_table

# progress(done_bytes, total_bytes) after each tensor
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PlannedTensor:
    spec: TensorSpec
    ggml_type: GGMLQuantizationType
    n_bytes: int


@dataclass(frozen=True)
class Plan:
    """What write_spec will write: every tensor with its type and size, in file order."""

    spec: ShapeSpec
    mix: Mix
    n_layer: int
    tensors: list[PlannedTensor]

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def data_bytes(self) -> int:
        """Size of the data section: tensors padded to the alignment."""
        a = GGUF_DEFAULT_ALIGNMENT
        return sum(-(-t.n_bytes // a) * a for t in self.tensors)

    def bytes_by_type(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.ggml_type.name] = out.get(t.ggml_type.name, 0) + t.n_bytes
        return out


def plan(spec: ShapeSpec | str, quant: str = "Q4_K_M", layers: int | None = None) -> Plan:
    """The tensor table of `spec` under the mix `quant`, for its first `layers` layers."""
    spec = get_shape(spec) if isinstance(spec, str) else spec
    mix = get_mix(quant)
    table = tensor_table(spec, layers)
    types = assign_types(spec, table, mix)
    planned = [PlannedTensor(t, types[t.name], tensor_bytes(t.shape, types[t.name])) for t in table]
    return Plan(spec, mix, spec.n_layer if layers is None else layers, planned)


def write_shape(
    shape_name: str,
    out_path: str | os.PathLike,
    quant: str = "Q4_K_M",
    layers: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    tokenizer_source: dict[str, Any] | None = None,
) -> Path:
    """Write the random model `shape_name` (see tandem.synth.shapes.SHAPES) to `out_path`.

    quant: a llama.cpp mix (Q4_K_M, Q5_K_M, Q6_K, Q8_0). layers: keep only the
    first N layers (default all). seed: the same seed gives the same bytes.
    tokenizer_source: GGUF metadata holding a "gpt2" tokenizer (default: the
    embedded Qwen2.5 model's). Returns the path written.
    """
    return write_spec(get_shape(shape_name), out_path, quant, layers, seed, progress, tokenizer_source)


def write_spec(
    spec: ShapeSpec,
    out_path: str | os.PathLike,
    quant: str = "Q4_K_M",
    layers: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    tokenizer_source: dict[str, Any] | None = None,
) -> Path:
    """write_shape for any ShapeSpec (e.g. a scaled-down one made with dataclasses.replace)."""
    p = plan(spec, quant, layers)
    out = Path(out_path)
    if out.is_dir():
        raise TandemError(f"{out} is a directory; give the path of the .gguf file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    source = tokenizer_source if tokenizer_source is not None else default_tokenizer_source()
    # Written beside the target and renamed at the end: an interrupted run leaves no truncated model.
    partial = out.with_name(out.name + ".partial")
    try:
        _write(p, partial, seed, source, progress)
        partial.replace(out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return out


def _write(p: Plan, path: Path, seed: int, source: dict[str, Any], progress: Progress | None) -> None:
    spec = p.spec
    w = GGUFWriter(None, spec.arch)
    w.add_name(f"tandem synth {spec.name}")
    w.add_file_type(int(p.mix.file_type))
    w.add_quantization_version(2)  # GGML_QNT_VERSION, as llama-quantize writes it
    add_model_metadata(w, spec, p.n_layer)
    add_tokenizer(w, spec.vocab, source)
    for t in p.tensors:
        # dtype float32 with raw_dtype: the shape is taken as the logical shape, not bytes
        w.add_tensor_info(t.spec.name, t.spec.shape, np.dtype(np.float32), t.n_bytes, raw_dtype=t.ggml_type)
    try:
        w.write_header_to_file(path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        assert w.fout is not None
        f = w.fout[0]
        align = w.data_alignment
        _pad(f, align)
        blocks = BlockSource(seed)
        total, done = p.data_bytes, 0
        for t in p.tensors:
            start = f.tell()
            if t.spec.kind == "weight":
                for chunk in blocks.chunks(t.ggml_type, t.n_bytes):
                    f.write(chunk)
            else:
                f.write(blocks.values(t.spec.shape, t.spec.kind).tobytes())
            if f.tell() - start != t.n_bytes:
                raise TandemError(
                    f"{path}: wrote {f.tell() - start} bytes for {t.spec.name}, expected {t.n_bytes}"
                )
            _pad(f, align)
            done += f.tell() - start
            if progress is not None:
                progress(done, total)
    finally:
        w.close()


def _pad(f: Any, align: int) -> None:
    n = -f.tell() % align
    if n:
        f.write(bytes(n))
