"""python runs.py: the runs under runs/, their facts, and which one chat.py would load."""

from __future__ import annotations

import os
import shutil
import time

import pytest

import runs as runs_cli
from src.checkpoint import load_model, read_state
from tests.fixtures import make_tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lists_runs_and_marks_the_one_chat_would_load(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.move(make_tiny_run(tmp_path / "a", steps=4), runs / "tiny-old")
    time.sleep(0.05)
    shutil.move(make_tiny_run(tmp_path / "b", steps=6, seed=2), runs / "tiny-new")
    (runs / "broken").mkdir()  # a run that never saved a checkpoint
    (runs / "broken" / "config.json").write_text('{"preset": "small"}')
    (runs / "notes").mkdir()  # not a run at all

    capsys.readouterr()  # what training printed
    assert runs_cli.main(["--runs", str(runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "preset", "step", "best", "val", "loss", "tokens", "seen", "date"]
    new = next(line for line in lines if "tiny-new" in line and not line.startswith("* what"))
    old = next(line for line in lines if "tiny-old" in line)
    broken = next(line for line in lines if "broken" in line)
    assert len(lines) == 5 and not any("notes" in line for line in lines)
    state = read_state(runs / "tiny-new" / "checkpoints" / "step_0000006")
    assert new.startswith("*") and new.split()[1:5] == [
        str(runs / "tiny-new"), "tiny", "6", f"{state['best_val_loss']:.4f}"]
    assert f"{state['tokens_seen']:,}" in new and time.strftime("%Y-%m-%d") in new
    assert not old.startswith("*") and old.split()[:3] == [str(runs / "tiny-old"), "tiny", "4"]
    assert "small" in broken and "no checkpoint" in broken
    # The marked run is the one loading without --run picks.
    monkeypatch.chdir(tmp_path)
    _, _, info = load_model(None)
    assert os.path.samefile(info["run_dir"], runs / "tiny-new")
    assert lines[-1] == f"* what chat.py loads without --run: {runs / 'tiny-new'}, checkpoint {info['checkpoint'].name}"


def test_no_runs_says_how_to_train(tmp_path, capsys):
    assert runs_cli.main(["--runs", str(tmp_path / "nowhere")]) == 0
    assert "no runs under" in capsys.readouterr().out
