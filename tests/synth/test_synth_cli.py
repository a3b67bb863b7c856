"""`tandem synth --shape` writes a file `tandem inspect` describes as the shape's MoE structure;
`tandem synth --tiny` writes tiny models that `tandem generate` and `chat` run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tandem.weights.arch import config_of
from tandem.weights.gguf_file import GGUFFile


def tandem(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tandem", *args], capture_output=True, text=True, timeout=600
    )


def test_synth_then_inspect_reports_experts(tmp_path):
    out = tmp_path / "q3.gguf"
    proc = tandem("synth", "--shape", "qwen3-30b-a3b", "--layers", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(tandem("inspect", str(out), "--json", "--tensors").stdout)
    moe = report["moe"]
    assert (moe["moe_layers"], moe["experts_per_layer"], moe["experts_per_token"]) == (1, 128, 8)
    expert_bytes = sum(t["bytes"] for t in report["tensors"] if "_exps." in t["name"])
    assert moe["expert_bytes_per_token"] == expert_bytes * 8 // 128
    assert 0 < moe["active_parameters"] < moe["total_parameters"] == report["parameters"]


def test_synth_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "v3.gguf"
    proc = tandem("synth", "--shape", "deepseek-v3", "--out", str(out), "--dry-run")
    assert proc.returncode == 0 and not out.exists()
    assert "GiB" in proc.stderr


def test_synth_rejects_bad_arguments(tmp_path):
    proc = tandem("synth", "--shape", "qwen3-30b-a3b", "--layers", "49", "--out", str(tmp_path / "x.gguf"))
    assert proc.returncode == 1 and "has 48 layers" in proc.stderr and "Traceback" not in proc.stderr
    proc = tandem("synth", "--shape", "qwen3-30b-a3b", "--quant", "Q3_XL", "--out", str(tmp_path / "x.gguf"))
    assert proc.returncode == 1 and "Q3_XL" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("arch", ["deepseek2", "qwen2moe", "qwen3moe", "mixtral"])
def test_tiny_moe_then_generate_and_chat(tmp_path, arch):
    out = tmp_path / f"{arch}.gguf"
    proc = tandem("synth", "--arch", arch, "--tiny", "--quant", "Q8_0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    proc = tandem("generate", "--model", str(out), "--prompt", "hi", "-n", "4", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert " generated" in proc.stderr  # four tokens, or fewer if a random model picks EOS
    chat = subprocess.run(
        [sys.executable, "-m", "tandem", "chat", "--model", str(out), "-n", "4"],
        input="hi\n/exit\n", capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr


def test_tiny_deepseek_variants_and_bad_arguments(tmp_path):
    out = tmp_path / "v2.gguf"
    proc = tandem("synth", "--tiny", "--arch", "deepseek2", "--variant", "v2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    with GGUFFile.open(out) as f:
        assert f.metadata["deepseek2.expert_gating_func"] == 1  # softmax: DeepSeek-V2
        assert type(config_of(f)).__name__ == "DeepseekV2Config"
    bad = [
        (("--tiny", "--shape", "deepseek-v3"), "not allowed with"),
        (("--tiny",), "--tiny needs --arch"),
        (("--tiny", "--arch", "qwen3moe", "--quant", "Q4_K_M"), "Q4_K_M"),
        (("--shape", "deepseek-v3", "--arch", "qwen3moe"), "--arch goes with --tiny"),
    ]
    for args, message in bad:
        proc = tandem("synth", *args, "--out", str(tmp_path / "x.gguf"))
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, args


def test_inspect_knows_mla(tmp_path):
    out = tmp_path / "ds.gguf"
    assert tandem("synth", "--tiny", "--arch", "deepseek2", "--out", str(out)).returncode == 0
    report = json.loads(tandem("inspect", str(out), "--json").stdout)
    c = report["config"]
    # MLA caches one latent and one rope key per token and layer, whatever the head count.
    assert (
        report["kv_cache_bytes_per_token"]
        == c["num_hidden_layers"] * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) * 4
    )
    assert "MLA (q-LoRA" in tandem("inspect", str(out)).stdout


def test_tokenizer_from_another_file(tmp_path, gemma_gguf):
    tiny = tmp_path / "tiny.gguf"
    assert tandem("synth", "--tiny", "--arch", "qwen2", "--out", str(tiny)).returncode == 0
    out = tmp_path / "q3.gguf"
    proc = tandem(
        "synth", "--shape", "qwen3-30b-a3b", "--layers", "1", "--tokenizer-from", str(tiny), "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    with GGUFFile.open(tiny) as source, GGUFFile.open(out) as written:
        tokens = source.metadata["tokenizer.ggml.tokens"]
        assert written.metadata["tokenizer.ggml.tokens"][: len(tokens)] == tokens
        assert len(written.metadata["tokenizer.ggml.tokens"]) == 151936
    # Gemma's tokenizer is SentencePiece-style, not byte-level BPE: refused in one line.
    proc = tandem("synth", "--shape", "qwen3-30b-a3b", "--tokenizer-from", str(gemma_gguf), "--out", str(out))
    assert proc.returncode == 1 and "no byte-level BPE" in proc.stderr and "Traceback" not in proc.stderr
    proc = tandem("synth", "--tiny", "--arch", "qwen2", "--tokenizer-from", str(tiny), "--out", str(out))
    assert proc.returncode == 1 and "--tokenizer-from go with --shape" in proc.stderr
