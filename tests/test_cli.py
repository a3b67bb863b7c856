"""The `tandem` command end to end, as a user runs it: real models, real processes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

TEXT = Path(__file__).parent / "data" / "english.txt"


def tandem(*args: str, stdin: str | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tandem", *args], input=stdin, capture_output=True, text=True, timeout=timeout
    )


def assert_user_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    """A user error: status 1, one line on stderr naming the problem, no traceback."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tandem: error:"), proc.stderr
    assert needle in lines[0], lines[0]


def test_generate_default_model_names_paris():
    proc = tandem(
        "generate", "--prompt", "The capital of France is", "--max-new-tokens", "16", "--temperature", "0"
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert re.search(r"tok/s prefill; \d+ generated, [\d.]+ tok/s decode", proc.stderr)


# llama.cpp's llama-perplexity on the same files, text and window (-c 256 -b 256 -t 2 -fa off
# -ctk f32 -ctv f32, commit 0c1e57098; BENCHMARKS.md): the running value after two windows.
LLAMA_CPP_PPL_2_CHUNKS = {"gemma": 18.8110, "qwen": 13.6122}
PPL_REL_TOL = 0.015  # llama.cpp multiplies with 8-bit activations, tandem in float32


@pytest.mark.parametrize("model", ["gemma", "qwen"])
def test_perplexity_matches_llama_cpp(model, request):
    path = request.getfixturevalue(f"{model}_gguf")
    proc = tandem(
        "perplexity", "--model", str(path), "--text-file", str(TEXT), "--ctx", "256", "--chunks", "2"
    )
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"PPL = ([\d.]+) \+/- ([\d.]+) \(2 chunks of 256", proc.stdout)
    assert match, proc.stdout
    ppl = float(match.group(1))
    assert abs(ppl / LLAMA_CPP_PPL_2_CHUNKS[model] - 1) < PPL_REL_TOL, ppl


def test_chat_multi_turn_clear_and_exit(gemma_gguf):
    proc = tandem(
        "chat", "--model", str(gemma_gguf), "--max-new-tokens", "8", "--temperature", "0",
        stdin="Name a colour.\nAnd another one?\n/clear\nHello\n/exit\nnever read\n",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "no chat template" in proc.stderr  # the Gemma 270M base file has none: fallback announced
    assert "(conversation cleared)" in proc.stderr
    assert len(re.findall(r"\d+ generated, [\d.]+ tok/s decode", proc.stderr)) == 3
    prompt_sizes = [int(n) for n in re.findall(r"\[(\d+) prompt tokens", proc.stderr)]
    assert prompt_sizes[1] > prompt_sizes[0]  # the second turn carries the first
    assert prompt_sizes[2] < prompt_sizes[1]  # /clear forgot it


def test_inspect_text_and_json(gemma_gguf):
    proc = tandem("inspect", str(gemma_gguf))
    assert proc.returncode == 0, proc.stderr
    assert "gemma3" in proc.stdout and "Q8_0" in proc.stdout and "RAM estimate" in proc.stdout
    proc = tandem("inspect", str(gemma_gguf), "--json", "--tensors")
    report = json.loads(proc.stdout)
    assert report["architecture"] == "gemma3"
    assert report["n_tensors"] == len(report["tensors"]) == 236
    assert report["config"]["num_hidden_layers"] == 18
    assert report["by_type"]["Q8_0"]["tensors"] == 10


def test_missing_model_file(tmp_path):
    assert_user_error(
        tandem("generate", "--model", str(tmp_path / "nope.gguf"), "--prompt", "x"), "model not found"
    )


def test_truncated_model_file(gemma_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    with gemma_gguf.open("rb") as src:
        cut.write_bytes(src.read(5_000_000))
    assert_user_error(tandem("generate", "--model", str(cut), "--prompt", "x"), "cut.gguf")
    assert_user_error(tandem("inspect", str(cut)), "cut.gguf")


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello, this is not a model\n")
    assert_user_error(tandem("inspect", str(bad)), "notes.gguf")


def test_unknown_architecture(tmp_path):
    path = tmp_path / "mystery.gguf"
    writer = gguf.GGUFWriter(str(path), "mystery")
    writer.add_tensor("token_embd.weight", __import__("numpy").zeros((4, 32), dtype="float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_user_error(
        tandem("generate", "--model", str(path), "--prompt", "x"), "architecture 'mystery' is not supported"
    )


def test_bad_rule_file(gemma_gguf, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("- match: {class: tandem.ops.NoSuchThing}\n  replace: {class: default}\n")
    assert_user_error(
        tandem("generate", "--model", str(gemma_gguf), "--rules", str(rules), "--prompt", "x"),
        "rules.yaml: rule 1",
    )


def test_bad_sampling_value(gemma_gguf):
    proc = tandem("generate", "--model", str(gemma_gguf), "--prompt", "x", "--top-p", "0")
    assert_user_error(proc, "top_p")


def test_too_short_text_for_perplexity(gemma_gguf, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.")
    assert_user_error(
        tandem("perplexity", "--model", str(gemma_gguf), "--text-file", str(short), "--ctx", "64"), "tokens"
    )


def test_config_dir_gives_the_same_output(gemma_gguf, tmp_path):
    """--config DIR: config and tokenizer from a Hugging Face directory, weights from the GGUF."""
    from tandem.weights.arch import config_of
    from tandem.weights.gguf_file import GGUFFile
    from tandem.weights.tokenizer import load_tokenizer

    with GGUFFile.open(gemma_gguf) as gguf_file:
        config_of(gguf_file).save_pretrained(tmp_path)
        load_tokenizer(gguf_file.metadata).save_pretrained(tmp_path)
    args = (
        "generate",
        "--model",
        str(gemma_gguf),
        "--prompt",
        "The capital of France is",
        "-n",
        "8",
        "--temperature",
        "0",
        "-q",
    )
    plain, with_config = tandem(*args), tandem(*args, "--config", str(tmp_path))
    assert plain.returncode == 0 and with_config.returncode == 0, with_config.stderr
    assert with_config.stdout == plain.stdout and len(plain.stdout.strip()) > 0
    assert_user_error(tandem(*args, "--config", str(tmp_path / "absent")), "has no config.json")
