"""Data-parallel training under torchrun: 2 CPU processes (gloo) train like one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from src import checkpoint as reader
from tests.fixtures import make_token_data

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
COMMON = ["--preset", "tiny", "--max-steps", "4", "--seed", "3", "--dtype", "fp32", "--device", "cpu",
          "--tokens-per-step", "512", "--eval-interval", "2", "--eval-tokens", "256",
          "--no-progress", "--no-tensorboard", "--no-plot"]


def losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if '"loss"' in x]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The reference run of each optimiser: one process, 8 sequences per step (in-process:
    saves a launch), made on first use."""
    from src.training.config import resolve_config
    from src.training.trainer import train

    tmp = tmp_path_factory.mktemp("dist")
    data = make_token_data(tmp / "data")
    runs: dict[str, Path] = {}

    def get(optimizer: str) -> tuple[Path, Path]:
        if optimizer not in runs:
            runs[optimizer] = tmp / f"single-{optimizer}"
            cfg, _ = resolve_config([*COMMON, "--optimizer", optimizer, "--data", str(data),
                                     "--run-dir", str(runs[optimizer]), "--batch-size", "8"])
            train(cfg)
        return data, runs[optimizer]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("fsdp, optimizer", [(False, "adamw"), (True, "adamw"), (True, "muon")],
                         ids=["ddp", "fsdp2", "fsdp2-muon"])
def test_two_processes_match_one(reference, tmp_path, fsdp, optimizer):
    # Global batch 8 x 64 = 512 tokens per step in both runs: 1 process x 8 sequences,
    # or 2 processes x 4 sequences each. Under FSDP2, Muon orthogonalises whole matrices
    # gathered from their shards, so it too must match one process.
    data, single = reference(optimizer)
    multi = tmp_path / "multi"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    flags = ["--fsdp"] if fsdp else []
    flags += ["--optimizer", optimizer]
    proc = run([*torchrun, "train.py", *COMMON, *flags, "--data", str(data), "--run-dir", str(multi),
                "--batch-size", "4"])
    assert "2 proc" in proc.stdout
    a, b = losses(single), losses(multi)
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    state = reader.read_state(reader.latest_checkpoint(multi))
    assert state["world_size"] == 2 and state["step"] == 4
    assert (multi / "checkpoints" / "step_0000004" / "rng_rank1.safetensors").is_file()
    if not fsdp:
        # Checked over ranks at every checkpoint (training raises if they differ).
        assert isinstance(state["param_checksum"], float)
    # Weights of the two runs agree; the multi-process checkpoint loads for inference.
    model_1, _, _ = reader.load_model(single / "checkpoints" / "step_0000004")
    model_2, _, _ = reader.load_model(multi / "checkpoints" / "step_0000004")
    for (name, p1), p2 in zip(model_1.state_dict().items(), model_2.state_dict().values()):
        assert (p1 - p2).abs().max().item() < 1e-4, name
    if fsdp:
        return  # resume is the same code path under both engines; once is enough for CI time
    # Resume the 2-process run for 2 more steps.
    run([*torchrun, "train.py", *COMMON[:2], "--max-steps", "6", "--resume", *flags, "--data", str(data),
         "--run-dir", str(multi), "--no-progress"])
    assert reader.read_state(reader.latest_checkpoint(multi))["step"] == 6
