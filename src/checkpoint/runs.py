"""The runs under a folder (``runs/``), summarised: what ``python runs.py`` prints.

Each run's facts come from its own files: the preset from config.json, the step, tokens seen
and best validation loss from its newest checkpoint's state.json, the date from that
checkpoint. The run that chat.py (and generate.py, evaluate.py) would load without ``--run``
is the one :func:`src.checkpoint.layout.newest_run` picks; it is marked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from src.checkpoint.layout import best_checkpoint, latest_checkpoint, newest_run, read_state
from src.utils.cli import UserError


@dataclass
class RunSummary:
    path: Path
    preset: str | None
    step: int | None  # of the newest checkpoint; None: no checkpoint yet
    best_val_loss: float | None
    tokens_seen: int | None
    date: datetime | None  # when its newest checkpoint was written
    picked: bool  # the run loaded when no --run is given


def summarize_runs(runs: Path) -> list[RunSummary]:
    """Every run folder under ``runs`` (with a checkpoint or a config.json), oldest first."""
    picked = newest_run(runs)
    summaries = []
    for run in sorted(runs.iterdir()) if runs.is_dir() else ():
        latest = latest_checkpoint(run) if run.is_dir() else None
        if latest is None and not (run / "config.json").is_file():
            continue  # not a run folder
        state = _state(latest)
        summaries.append(RunSummary(
            path=run,
            preset=_preset(run, state),
            step=state.get("step"),
            best_val_loss=state.get("best_val_loss"),
            tokens_seen=state.get("tokens_seen"),
            date=datetime.fromtimestamp(latest.stat().st_mtime) if latest else None,
            picked=run == picked,
        ))
    return sorted(summaries, key=lambda r: (r.date is not None, r.date or datetime.min))


def _state(ckpt: Path | None) -> dict:
    if ckpt is None:
        return {}
    try:
        return read_state(ckpt)
    except UserError:  # a checkpoint of another format: listed without its facts
        return {}


def _preset(run: Path, state: dict) -> str | None:
    config = state.get("train_config")
    if config is None:
        try:
            config = json.loads((run / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    return config.get("preset") if isinstance(config, dict) else None


def format_runs(summaries: list[RunSummary], runs: Path) -> str:
    """The table ``python runs.py`` prints, with a line saying which run chat.py would load."""
    if not summaries:
        return f"no runs under {runs}; train one with `python train.py`"
    header = ("", "run", "preset", "step", "best val loss", "tokens seen", "date")
    rows = [header]
    for r in summaries:
        rows.append((
            "*" if r.picked else "",
            str(r.path),
            r.preset or "?",
            "no checkpoint" if r.step is None else f"{r.step:,}",
            "-" if r.best_val_loss is None else f"{r.best_val_loss:.4f}",
            "-" if r.tokens_seen is None else f"{r.tokens_seen:,}",
            r.date.strftime("%Y-%m-%d %H:%M") if r.date else "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) if i < 6 else cell
                       for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    picked = next((r for r in summaries if r.picked), None)
    if picked is not None:
        ckpt = best_checkpoint(picked.path) or latest_checkpoint(picked.path)
        lines.append(f"* what chat.py loads without --run: {picked.path}, checkpoint {ckpt.name}")
    else:
        lines.append("no run has a checkpoint yet: chat.py has nothing to load")
    return "\n".join(lines)
