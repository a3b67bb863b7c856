"""`tandem bench` on tiny synthetic models: JSON and table output, the MoE floor, user errors."""

from __future__ import annotations

import json

import pytest

from tandem.cli import main
from tandem.synth.tiny import write_tiny


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return write_tiny("qwen3moe", tmp_path_factory.mktemp("bench") / "moe.gguf")


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory):
    return write_tiny("llama", tmp_path_factory.mktemp("bench") / "dense.gguf")


def bench(capsys, *args: str) -> tuple[int, str, str]:
    status = main(["bench", "--threads", "2", *args])
    out, err = capsys.readouterr()
    return status, out, err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_json_moe(tiny_moe, capsys):
    status, out, _ = bench(
        capsys, "--model", str(tiny_moe), "-p", "12", "-n", "5", "--repeats", "2", "--json"
    )
    assert status == 0
    report = last_json(out)
    assert report["prefill_tok_s"] > 0 and report["decode_tok_s"] > 0
    assert len(report["prefill_tok_s_runs"]) == len(report["decode_tok_s_runs"]) == 2
    assert (report["n_prompt"], report["n_gen"], report["threads"], report["repeats"]) == (12, 5, 2, 2)
    assert report["model"] == str(tiny_moe) and report["device"] == "cpu" and report["cpu_variant"]
    assert report["expert_bytes_per_token"] > 0 and report["read_bandwidth_gb_s"] > 0
    # A tiny model fits in cache, so its decode may beat the DRAM floor: only positivity must hold.
    assert report["decode_floor_tok_s"] > 0 and report["decode_fraction_of_floor"] > 0
    assert report["decode_layers_fused"] == report["decode_layers"] == 2  # both layers ran fused
    assert sum(threads for _, threads in report["numa_groups"]) == report["engine_threads"]


def test_json_dense_has_no_floor(tiny_dense, capsys):
    status, out, _ = bench(capsys, "--model", str(tiny_dense), "-p", "4", "-n", "3", "-r", "1", "--json")
    assert status == 0
    report = last_json(out)
    assert report["decode_tok_s"] > 0 and len(report["decode_tok_s_runs"]) == 1
    assert report["read_bandwidth_gb_s"] > 0 and "decode_floor_tok_s" not in report


def test_table(tiny_moe, capsys):
    status, out, _ = bench(capsys, "--model", str(tiny_moe), "-p", "8", "-n", "4", "-r", "1")
    assert status == 0
    lines = out.splitlines()
    assert any(" pp8 " in line and "±" in line for line in lines), out
    assert "fused decode    2 of 2 decoder layers" in lines, out
    assert any(" tg4 @ d8 " in line and "±" in line for line in lines), out  # decode follows the prompt
    assert any(line.startswith("read bandwidth") for line in lines), out
    assert any(line.startswith("decode floor") for line in lines), out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-n", "0"], "--n-gen must be at least 1"),
        (["-p", "-3"], "--n-prompt must be at least 1"),
        (["-r", "0"], "--repeats must be at least 1"),
        (["-p", "100000"], "over the context"),
    ],
)
def test_bad_counts(tiny_dense, capsys, args, needle):
    status, out, err = bench(capsys, "--model", str(tiny_dense), *args)
    assert_user_error(status, err, needle)
    assert out == ""


def test_missing_model_file(tmp_path, capsys):
    status, _, err = bench(capsys, "--model", str(tmp_path / "nope.gguf"))
    assert_user_error(status, err, "model not found")


def assert_user_error(status: int, err: str, needle: str) -> None:
    assert status == 1
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tandem: error:") and needle in lines[0], err


@pytest.mark.parametrize(
    ("env", "value", "needle"),
    [
        ("TANDEM_CPU_PREFILL", "tiles", "not a prefill kernel set"),
        ("TANDEM_CPU_SPIN_US", "soon", "TANDEM_CPU_SPIN_US must be an integer"),
        ("TANDEM_CPU_GEMM_MIN_TOKENS", "0", "TANDEM_CPU_GEMM_MIN_TOKENS must be in 1"),
    ],
)
def test_bad_engine_settings_are_one_line_errors(tiny_dense, capsys, monkeypatch, env, value, needle):
    monkeypatch.setenv(env, value)
    status, out, err = bench(capsys, "--model", str(tiny_dense), "-p", "4", "-n", "1", "-r", "1")
    assert_user_error(status, err, needle)
    assert out == ""
