"""The layout of a run folder and how a run or checkpoint is found in it.

A run folder looks like::

    runs/<name>/
        config.json          resolved training config          (written by the trainer)
        tokenizer.json       copy of the data's tokenizer, so the run is self-contained
        data_meta.json       copy of the data's meta.json (tokenizer hash, byte counts, ...)
        finetune.json        a fine-tuned run's base run and data (src/training/finetune.py)
        metrics.jsonl        one JSON line per optimiser step / evaluation
        checkpoints/
            latest           text file: name of the newest complete checkpoint
            best             text file: name of the checkpoint with the lowest val loss
            step_0000500/
                model.safetensors        weights (a tied matrix stored once, see "aliases")
                state.json               step, model config, tokenizer hash, ... (JSON)
                optimizer.safetensors    training state (written by src/training/checkpoint.py)
                rng_rank0.safetensors    ditto

A checkpoint is *complete* when it has ``state.json`` and ``model.safetensors``; it is
written into ``checkpoints/.tmp-step_XXXXXXX`` and renamed into place only when whole, and
only then does ``latest`` point at it (see :func:`publish_checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from src.utils.atomic import fsync_dir, write_text_atomic
from src.utils.cli import UserError

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
FINETUNE_FILE = "finetune.json"
TRAIN_HINT = "train one with `python train.py` (see `python train.py --help`)"


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def is_complete(ckpt: Path) -> bool:
    return (ckpt / "state.json").is_file() and (ckpt / "model.safetensors").is_file()


def read_pointer(ckpt_root: Path, name: str) -> Path | None:
    """The complete checkpoint that ``checkpoints/<name>`` (latest or best) points at, if any."""
    try:
        target = (ckpt_root / name).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    path = ckpt_root / target
    return path if target.startswith("step_") and is_complete(path) else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete step checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and is_complete(p))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (the ``latest`` pointer, else the highest step)."""
    found = read_pointer(Path(run_dir) / CHECKPOINTS, "latest")
    if found is not None:
        return found
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def best_checkpoint(run_dir: str | Path) -> Path | None:
    return read_pointer(Path(run_dir) / CHECKPOINTS, "best")


def read_state(ckpt: str | Path) -> dict[str, Any]:
    """The JSON part of a checkpoint, checked for a known format version."""
    path = Path(ckpt) / "state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read checkpoint {path}: {exc}") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format {state.get('format_version')!r} is not "
                        f"supported (this code reads format {FORMAT_VERSION})")
    return state


def is_finetuned(run_dir: str | Path) -> bool:
    """Whether a run is a fine-tuning stage on top of another run (it has finetune.json)."""
    return (Path(run_dir) / FINETUNE_FILE).is_file()


def newest_run(runs: Path, where: Callable[[Path], bool] | None = None) -> Path | None:
    """The run under ``runs`` whose loadable checkpoint (best, else latest) is newest; with
    ``where``, the newest of the runs it accepts (e.g. :func:`is_finetuned`)."""
    candidates = []
    for run in runs.iterdir() if runs.is_dir() else ():
        if not run.is_dir() or (where is not None and not where(run)):
            continue
        ckpt = best_checkpoint(run) or latest_checkpoint(run)
        if ckpt is not None:
            candidates.append((ckpt.stat().st_mtime, run))
    return max(candidates)[1] if candidates else None


def resolve_checkpoint(path: str | Path | None = None) -> Path:
    """A run dir (its best checkpoint, else its latest), a checkpoint dir, or None (the newest
    run under ./runs) -> the checkpoint folder to load. UserError when there is none."""
    if path is None:
        runs = Path("runs")
        run = newest_run(runs)
        if run is None:
            raise UserError(f"no trained model found under {runs.resolve()}; {TRAIN_HINT}")
        path = run
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; give a run folder (runs/<name>) or {TRAIN_HINT}")
    if path.is_file():
        path = path.parent
    if (path / "state.json").is_file() or path.name.startswith("step_"):
        if not is_complete(path):
            raise UserError(f"checkpoint {path} is incomplete (no state.json or model.safetensors)")
        return path
    if path.name == CHECKPOINTS:
        path = path.parent
    ckpt = best_checkpoint(path) or latest_checkpoint(path)
    if ckpt is None:
        raise UserError(f"no complete checkpoint in {path}; {TRAIN_HINT}")
    return ckpt


def run_dir_of(ckpt: Path) -> Path:
    """The run folder that holds checkpoint folder ``ckpt``."""
    return ckpt.parent.parent


# ----------------------------------------------------------------------------------------------
# Writing: a temporary folder, renamed into place when whole, then the pointers.


def temporary_checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """The folder checkpoint ``step`` is written into before :func:`publish_checkpoint`."""
    return Path(run_dir) / CHECKPOINTS / f".tmp-{checkpoint_name(step)}"


def start_checkpoint(run_dir: str | Path, step: int) -> Path:
    """Create the empty :func:`temporary_checkpoint_dir` of checkpoint ``step``, sweeping
    temporary folders left by a crash (there is only one writer per run)."""
    tmp = temporary_checkpoint_dir(run_dir, step)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    for stale in tmp.parent.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    return tmp


def publish_checkpoint(tmp: Path, *, is_best: bool = False) -> Path:
    """Rename the finished temporary folder ``tmp`` into place and point ``latest`` (and, if
    ``is_best``, ``best``) at it. A crash at any moment leaves ``latest`` at the previous
    checkpoint or at this one, never at a partial one. Returns the final folder."""
    root = tmp.parent
    name = tmp.name.removeprefix(".tmp-")
    final = root / name
    fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. stopped right after a resume)
        old = root / f".tmp-old-{name}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    write_text_atomic(root / "latest", name + "\n")
    if is_best:
        write_text_atomic(root / "best", name + "\n")
    return final
