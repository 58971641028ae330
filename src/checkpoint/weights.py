"""A checkpoint's model weights and its state.json: written and read with safetensors and
JSON only (nothing is pickled)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from src.checkpoint.layout import publish_checkpoint, start_checkpoint
from src.checkpoint.verify import FORMAT_VERSION, STATE_FILE, WEIGHTS_FILE, file_records
from src.utils.atomic import atomic_path, write_json_atomic
from src.utils.cli import UserError
from src.utils.integrity import seal


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write tensors (contiguous CPU copies) to ``path`` atomically and fsync'ed."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata)


def split_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store each shared tensor once (safetensors refuses aliases, e.g. tied embeddings).

    Returns the unique tensors and ``{alias name: stored name}``.
    """
    unique: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t
    return unique, aliases


def write_weights(ckpt: Path, model_state: dict[str, torch.Tensor]) -> None:
    """``ckpt/model.safetensors``: a full model state dict, tied tensors stored once (their
    other names in the file's ``aliases`` metadata)."""
    weights, aliases = split_shared(model_state)
    save_tensors(ckpt / WEIGHTS_FILE, weights, {"format": "pt", "aliases": json.dumps(aliases)})


def read_weights(ckpt: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The full model state dict of checkpoint folder ``ckpt`` (aliases restored)."""
    path = ckpt / WEIGHTS_FILE
    try:
        state = load_file(str(path), device=str(device))
        with safe_open(str(path), framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except Exception as exc:  # safetensors raises several types on a corrupt file
        raise UserError(f"cannot read {path}: {exc}") from None
    for alias, name in aliases.items():
        state[alias] = state[name]
    return state


def write_state(ckpt: Path, step: int, state: dict[str, Any]) -> None:
    """``ckpt/state.json``, the checkpoint's last file: ``state`` plus the format version, the
    step and the size and SHA-256 of every file already in ``ckpt``, sealed with its own
    checksum (see verify.py). What a loader needs in ``state``: ``model_config``
    (GPTConfig.to_dict) and ``tokenizer_hash``."""
    full = {**state, "format_version": FORMAT_VERSION, "step": step, "files": file_records(ckpt)}
    write_json_atomic(ckpt / STATE_FILE, seal(full))


def save_model_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    state: dict[str, Any],
    *,
    is_best: bool = False,
) -> Path:
    """Write a weights-only checkpoint ``step`` of a run (for stages other than training, e.g.
    an export): model.safetensors and state.json, published atomically as ``latest``. The run
    folder must also hold the tokenizer.json whose hash ``state["tokenizer_hash"]`` names, for
    :func:`src.checkpoint.load.load_model` to load it. Returns the checkpoint folder."""
    tmp = start_checkpoint(run_dir, step)
    write_weights(tmp, model_state)
    write_state(tmp, step, state)
    return publish_checkpoint(tmp, is_best=is_best)
