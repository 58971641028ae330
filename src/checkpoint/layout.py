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
                state.json               step, model config, tokenizer hash, ... (JSON),
                                         and the size and SHA-256 of every other file
                                         (written last; see verify.py)
                optimizer.safetensors    training state (written by src/training/checkpoint.py)
                rng_rank0.safetensors    ditto

A checkpoint is *complete* when it has ``state.json`` and ``model.safetensors``; it is
written into ``checkpoints/.tmp-step_XXXXXXX`` and renamed into place only when whole, and
only then does ``latest`` point at it (see :func:`publish_checkpoint`). Damage at rest (a
truncated copy, a flipped bit) is found by the checks of verify.py: every reader finds its
checkpoint with :func:`find_checkpoint`, which skips a damaged one for the newest intact one
and says so in one line.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from src.checkpoint.verify import (
    STATE_FILE,
    WEIGHTS_FILE,
    checkpoint_problem,
    parse_state,
)
from src.utils.atomic import fsync_dir, write_text_atomic
from src.utils.cli import UserError

CHECKPOINTS = "checkpoints"
FINETUNE_FILE = "finetune.json"
TRAIN_HINT = "train one with `python train.py` (see `python train.py --help`)"
RESTORE_HINT = "restore the run folder from a copy, or train again with `python train.py`"


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def is_complete(ckpt: Path) -> bool:
    """Whether the folder has the two files every checkpoint has (see :func:`find_checkpoint`
    for whether they are intact)."""
    return (ckpt / STATE_FILE).is_file() and (ckpt / WEIGHTS_FILE).is_file()


def _pointer_target(ckpt_root: Path, name: str) -> Path | None:
    """The folder ``checkpoints/<name>`` (latest or best) names, if it names one."""
    try:
        target = (ckpt_root / name).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    path = ckpt_root / target
    return path if target.startswith("step_") and "/" not in target and path.is_dir() else None


def read_pointer(ckpt_root: Path, name: str) -> Path | None:
    """The complete checkpoint that ``checkpoints/<name>`` (latest or best) points at, if any."""
    path = _pointer_target(ckpt_root, name)
    return path if path is not None and is_complete(path) else None


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
    """The JSON part of a checkpoint, checked (readable, unchanged, a known format version)."""
    state, problem = parse_state(Path(ckpt))
    if problem:
        raise UserError(f"cannot use checkpoint {ckpt}: {problem}")
    return state


def warn(message: str) -> None:
    """One warning line on stderr (stdout may be a chat's replies)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def find_checkpoint(
    run_dir: str | Path,
    *,
    prefer: tuple[str, ...] = ("best", "latest"),
    hashes: bool = False,
    files: Collection[str] | None = None,
    on_skip: Callable[[str], None] = warn,
) -> Path | None:
    """The checkpoint of a run to use: the first intact one of those the ``prefer`` pointers
    name, else the newest intact step checkpoint. Intact: see
    :func:`src.checkpoint.verify.checkpoint_problem` (``hashes``, ``files``).

    When a checkpoint that would have been used is damaged, ``on_skip`` gets one line naming
    it, what is wrong and the one used instead. None when the run has no checkpoint folder at
    all; UserError when it has some but none is intact.
    """
    root = Path(run_dir) / CHECKPOINTS
    steps = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True) if root.is_dir() else []
    pointed = [t for t in (_pointer_target(root, name) for name in prefer) if t is not None]
    candidates = list(dict.fromkeys(pointed + steps))
    first_damage: tuple[Path, str] | None = None
    for ckpt in candidates:
        problem = checkpoint_problem(ckpt, hashes=hashes, files=files)
        if problem is None:
            if first_damage is not None:
                bad, what = first_damage
                on_skip(f"checkpoint {bad} is damaged ({what}); using {ckpt.name} instead")
            return ckpt
        first_damage = first_damage or (ckpt, problem)
    if first_damage is None:
        return None
    bad, what = first_damage
    others = len(candidates) - 1
    more = f" (and {others} other{'s' if others > 1 else ''}, damaged too)" if others else ""
    raise UserError(f"no intact checkpoint in {root}: {bad.name}: {what}{more}; {RESTORE_HINT}")



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


def resolve_checkpoint(path: str | Path | None = None, choice: str = "best", *,
                       verify: bool = False) -> Path:
    """A run dir, a checkpoint dir, or None (the newest run under ./runs) -> the checkpoint
    folder to load for inference. Of a run, ``choice`` picks: "best" (the lowest validation
    loss; else the latest), "latest", or a step number ("1200"); a damaged or incomplete
    best/latest is skipped, with a warning, for the newest intact one, while a named
    checkpoint folder or step must itself be intact. Intact: state.json and
    model.safetensors, sizes and formats always, SHA-256s with ``verify``. UserError when
    there is none."""
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
    if (path / STATE_FILE).exists() or path.name.startswith("step_"):
        problem = checkpoint_problem(path, hashes=verify, files=(WEIGHTS_FILE,))
        if problem:
            raise UserError(f"checkpoint {path} is damaged or incomplete: {problem}; give the run "
                            f"folder ({run_dir_of(path)}) to load its newest intact checkpoint")
        return path
    if path.name == CHECKPOINTS:
        path = path.parent
    if choice.isdigit():
        ckpt = path / CHECKPOINTS / checkpoint_name(int(choice))
        if not ckpt.is_dir():
            steps = ", ".join(str(int(p.name[5:])) for p in list_checkpoints(path)) or "none"
            raise UserError(f"no complete checkpoint of step {int(choice)} in {path} "
                            f"(steps there: {steps})")
        problem = checkpoint_problem(ckpt, hashes=verify, files=(WEIGHTS_FILE,))
        if problem:
            raise UserError(f"checkpoint {ckpt} is damaged or incomplete: {problem}; choose "
                            "another step, or best / latest")
        return ckpt
    if choice not in ("best", "latest"):
        raise UserError(f"--checkpoint {choice!r}: expected best, latest, a step number or a "
                        "checkpoint folder")
    prefer = ("latest",) if choice == "latest" else ("best", "latest")
    ckpt = find_checkpoint(path, prefer=prefer, hashes=verify, files=(WEIGHTS_FILE,))
    if ckpt is None:
        raise UserError(f"no complete checkpoint in {path}; {TRAIN_HINT}")
    return ckpt


def checkpoint_from_args(run: str | None, checkpoint: str | None, *, verify: bool = False) -> Path:
    """The checkpoint a command line names with ``--run DIR`` (default: the newest run) and
    ``--checkpoint best|latest|STEP`` (default best) or ``--checkpoint PATH`` (a checkpoint
    folder, then without --run). The one rule for chat.py, evaluate.py and generate.py."""
    if checkpoint and not (checkpoint in ("best", "latest") or checkpoint.isdigit()):
        if run:
            raise UserError("--checkpoint PATH names a checkpoint folder on its own; with --run "
                            "give --checkpoint best, latest or a step number")
        return resolve_checkpoint(checkpoint, verify=verify)
    return resolve_checkpoint(run, checkpoint or "best", verify=verify)


def resume_checkpoint(run_dir: str | Path, on_skip: Callable[[str], None] = warn) -> Path | None:
    """The checkpoint ``train.py --resume`` continues from: the newest intact one (every file,
    SHA-256s included), preferring the ``latest`` pointer. None when the run has no checkpoint;
    UserError when none is intact."""
    return find_checkpoint(run_dir, prefer=("latest",), hashes=True, on_skip=on_skip)


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
