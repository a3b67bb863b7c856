"""Hostile or broken Hugging Face directories are refused with one clear line naming the file and tensor."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from safetensors_helpers import save_hf, tiny_model

from tandem.errors import TandemError, UnsupportedError, WeightError
from tandem.inject.model import load_model
from tandem.weights.safetensors_file import SafetensorsFile, is_hf_directory


def _write(directory, header: dict | bytes, data: bytes = b"", length: int | None = None):
    directory.mkdir(exist_ok=True)
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", n) + raw + data)
    return directory


def _one_line_error(directory, match, error=WeightError):
    with pytest.raises(error, match=match) as info:
        SafetensorsFile.open(directory)
    assert "\n" not in str(info.value)


GOOD = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


def test_good_handmade_file(tmp_path):
    f = SafetensorsFile.open(_write(tmp_path, GOOD, struct.pack("<4f", 1, 2, 3, 4)))
    assert f.typed("w").tolist() == [[1, 2], [3, 4]]


def test_truncated(tmp_path):
    _one_line_error(
        _write(tmp_path, GOOD, b"\0" * 15), r"model\.safetensors: tensor 'w': data_offsets \[0, 16\]"
    )
    (tmp_path / "model.safetensors").write_bytes(b"\1\0\0")
    _one_line_error(tmp_path, r"model\.safetensors: file has 3 bytes")


def test_header_length_past_the_end(tmp_path):
    _one_line_error(
        _write(tmp_path, GOOD, b"\0" * 16, length=10**6), r"model\.safetensors: header length 1,000,000"
    )


def test_offsets_out_of_range(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}
    _one_line_error(_write(tmp_path, header, b"\0" * 16), r"tensor 'w': data_offsets \[8, 24\] lie outside")
    header = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}
    _one_line_error(_write(tmp_path, header, b"\0" * 16), r"tensor 'w': 12 bytes, but F32 \[2, 2\] needs 16")
    header = {"w": {"dtype": "F32", "shape": [2, -2], "data_offsets": [0, 16]}}
    _one_line_error(_write(tmp_path, header, b"\0" * 16), r"tensor 'w': shape \[2, -2\]")


def test_unknown_dtype_and_bad_json(tmp_path):
    header = {"w": {"dtype": "F4", "shape": [2, 2], "data_offsets": [0, 2]}}
    _one_line_error(
        _write(tmp_path, header, b"\0" * 2), r"model\.safetensors: tensor 'w': unknown dtype 'F4'"
    )
    _one_line_error(_write(tmp_path, b"{not json", b""), r"header is not valid JSON")
    _one_line_error(_write(tmp_path, b"[1]", b""), r"header is not a JSON object")


def test_index_naming_a_missing_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}})
    )
    _one_line_error(tmp_path, r"shard model-00001-of-00002\.safetensors is missing")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../x.safetensors"}})
    )
    _one_line_error(tmp_path, r"'\.\./x\.safetensors' is not a safetensors file")


def test_tensor_missing(tmp_path):
    directory = save_hf(tiny_model("qwen3_moe"), tmp_path / "m")
    state = load_file(directory / "model.safetensors")
    del state["model.layers.1.mlp.experts.3.up_proj.weight"], state["model.norm.weight"]
    save_file(state, directory / "model.safetensors")
    with pytest.raises(
        WeightError, match=r"'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight'.*missing"
    ) as info:
        load_model(directory)
    assert "\n" not in str(info.value)
    state["model.layers.1.mlp.experts.3.up_proj.weight"] = torch.zeros(16, 32)
    save_file(state, directory / "model.safetensors")
    with pytest.raises(WeightError, match=r"'model\.norm\.weight' has no tensor in m"):
        load_model(directory)


def test_unserved_dtype_and_fp8_without_scales(tmp_path):
    directory = save_hf(tiny_model("qwen2"), tmp_path / "m")
    state = load_file(directory / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"].double()
    save_file(state, directory / "model.safetensors")
    with pytest.raises(UnsupportedError, match=r"'model\.norm\.weight' in m has dtype F64"):
        load_model(directory)
    state["model.norm.weight"] = state["model.norm.weight"].float()
    name = "model.layers.0.self_attn.q_proj.weight"
    state[name] = state[name].to(torch.float8_e4m3fn)
    save_file(state, directory / "model.safetensors")
    with pytest.raises(WeightError, match=r"FP8 but config\.json has no fp8 quantization_config"):
        load_model(directory)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightError, match=rf"'{name}_scale_inv' \(the scales of FP8 '{name}'\) is missing"):
        load_model(directory)
    config["quantization_config"] = {"quant_method": "awq"}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(TandemError, match=r"quant_method 'awq'"):
        load_model(directory)


def test_a_directory_with_gguf_stays_gguf(tmp_path):
    directory = save_hf(tiny_model("qwen2"), tmp_path / "m")
    assert is_hf_directory(directory)
    (directory / "model.gguf").write_bytes(b"")
    assert not is_hf_directory(directory)
