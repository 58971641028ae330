"""Loading a trained model for inference: a run or checkpoint folder -> (model, tokenizer, info)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from src.checkpoint.layout import read_state, resolve_checkpoint, run_dir_of
from src.checkpoint.weights import WEIGHTS_FILE, read_weights
from src.model.gpt import GPT, GPTConfig
from src.tokenizer.bpe import BPETokenizer
from src.utils.cli import UserError


def load_run_tokenizer(run_dir: Path, expected_hash: str | None) -> BPETokenizer:
    """The run's copy of its tokenizer, checked against the hash its checkpoint recorded."""
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise UserError(f"{run_dir} has no tokenizer.json (the run folder is incomplete)")
    tokenizer = BPETokenizer.load(tok_path)
    if tokenizer.hash != expected_hash:
        raise UserError(f"{tok_path} (hash {tokenizer.hash[:12]}) is not the tokenizer this "
                        f"checkpoint was trained with ({str(expected_hash)[:12]})")
    return tokenizer


def load_model(
    path: str | Path | None = None, device: str | torch.device = "cpu"
) -> tuple[GPT, BPETokenizer, dict[str, Any]]:
    """Load a trained model for inference: ``(GPT in eval mode, BPETokenizer, info)``.

    ``path``: a run folder (its best checkpoint if any, else the latest), a checkpoint folder,
    or None for the newest run under ``runs/``. ``info`` holds ``run_dir``, ``checkpoint``,
    ``step``, ``val_loss``, ``best_val_loss``, ``model_config``, ``train_config``,
    ``tokenizer_hash`` and ``data_meta`` (the data's meta.json, or None).
    Weights are read with safetensors only; raises UserError if nothing usable is found.
    """
    ckpt = resolve_checkpoint(path)
    run_dir = run_dir_of(ckpt)
    state = read_state(ckpt)
    try:
        model = GPT(GPTConfig.from_dict(state["model_config"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{ckpt / 'state.json'}: unusable model config: {exc}") from None
    try:
        model.load_state_dict(read_weights(ckpt), strict=True)
    except RuntimeError as exc:
        raise UserError(f"{ckpt / WEIGHTS_FILE} does not match its model config: "
                        f"{str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    tokenizer = load_run_tokenizer(run_dir, state.get("tokenizer_hash"))
    meta_path = run_dir / "data_meta.json"
    info = {
        "run_dir": run_dir,
        "checkpoint": ckpt,
        "step": state["step"],
        "val_loss": state.get("val_loss"),
        "best_val_loss": state.get("best_val_loss"),
        "model_config": state["model_config"],
        "train_config": state.get("train_config"),
        "tokenizer_hash": state.get("tokenizer_hash"),
        "data_meta": json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else None,
    }
    return model, tokenizer, info
