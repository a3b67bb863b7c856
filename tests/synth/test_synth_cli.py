"""`tandem synth` writes a file `tandem inspect` describes as the shape's MoE structure."""

from __future__ import annotations

import json
import subprocess
import sys


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
