"""bench/gpu.py --dry-run: every section of the GPU benchmark runs on a CPU at tiny shapes,
exits 0, prints the tables and writes a complete JSON (the real run happens on a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.fixtures import make_token_data

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "bench/gpu.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_dry_run_measures_every_section(tmp_path):
    data = make_token_data(tmp_path / "data")
    out = tmp_path / "results" / "gpu.json"
    done = run_bench("--dry-run", "--data", str(data), "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["finished"] and result["dry_run"]
    sections = result["sections"]
    assert set(sections) == {"matmul", "speed gpt-60m", "speed gpt-125m", "max_batch gpt-60m",
                             "max_batch gpt-125m", "quality"}
    assert not [name for name, sec in sections.items() if "error" in sec or "skipped" in sec]

    assert sections["matmul"]["n"] == 128 and sections["matmul"]["mean_ms"] > 0
    for preset in ("gpt-60m", "gpt-125m"):
        speed = sections[f"speed {preset}"]
        assert speed["tokens_per_s"] > 0 and speed["timed_steps"] == 2
        assert speed["vocab_size"] == 512 and speed["context"] == 64
        assert speed["flops_per_token"] > 6 * speed["params"] * 0.5
        # The dry run's cap (4) fits easily on a CPU: found by doubling and marked as the cap.
        batch = sections[f"max_batch {preset}"]
        assert batch["max_micro_batch"] == 4 and batch["hit_cap"]
        assert [p["batch"] for p in batch["probes"]] == [1, 2, 4]
    # gpt-60m keeps its grouped-query attention in the dry run, gpt-125m its multi-head one.
    assert sections["speed gpt-60m"]["params"] < sections["speed gpt-125m"]["params"]

    quality = sections["quality"]
    assert quality["tokens_seen"] == 4096 and quality["train_tokens"] > 0
    assert quality["epochs"] == round(4096 / 64 / ((quality["train_tokens"] - 64) // 64), 3)
    curve = quality["curve"]
    assert [p["tokens"] for p in curve] == [0, 2048, 4096]
    assert curve[-1]["val_loss"] < curve[0]["val_loss"]  # it learned something
    assert quality["best_val_loss"] == min(p["val_loss"] for p in curve)

    assert "| gpt-60m |" in done.stdout and "| gpt-125m |" in done.stdout
    assert "val loss" in done.stdout


def test_missing_data_is_a_one_line_error_before_any_work(tmp_path):
    out = tmp_path / "gpu.json"
    done = run_bench("--dry-run", "--data", str(tmp_path / "nowhere"), "--out", str(out))
    assert done.returncode == 2
    assert "no prepared data in" in done.stderr and "nowhere" in done.stderr
    assert not out.exists()
