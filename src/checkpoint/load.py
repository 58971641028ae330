"""Loading a trained model for inference: a run or checkpoint folder -> (model, tokenizer, info)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from src.checkpoint.layout import is_finetuned, read_state, resolve_checkpoint, run_dir_of
from src.checkpoint.weights import WEIGHTS_FILE, read_weights
from src.model.gpt import GPT, GPTConfig
from src.tokenizer.bpe import BPETokenizer
from src.utils.cli import UserError
from src.utils.integrity import file_problem


def load_run_tokenizer(run_dir: Path, expected_hash: str | None) -> BPETokenizer:
    """The run's copy of its tokenizer, checked against the hash its checkpoint recorded."""
    tok_path = run_dir / "tokenizer.json"
    fix = (f"copy the tokenizer.json of the data the run was trained on (see {run_dir}/config.json, "
           "\"data\") into the run folder")
    problem = file_problem(tok_path)
    if problem:
        raise UserError(f"{run_dir}: {problem}; {fix}")
    try:
        tokenizer = BPETokenizer.load(tok_path)
    except UserError as exc:
        raise UserError(f"{exc}; {fix}") from None
    if tokenizer.hash != expected_hash:
        raise UserError(f"{tok_path} (hash {tokenizer.hash[:12]}) is not the tokenizer this "
                        f"checkpoint was trained with ({str(expected_hash)[:12]}); {fix}")
    return tokenizer


def load_model(
    path: str | Path | None = None, device: str | torch.device = "cpu", *, verify: bool = False
) -> tuple[GPT, BPETokenizer, dict[str, Any]]:
    """Load a trained model for inference: ``(GPT in eval mode, BPETokenizer, info)``.

    ``path``: a run folder (its best checkpoint if any, else the latest), a checkpoint folder,
    or None for the newest run under ``runs/``. ``info`` holds ``run_dir``, ``checkpoint``,
    ``step``, ``val_loss``, ``best_val_loss``, ``model_config``, ``train_config``,
    ``tokenizer_hash`` and ``data_meta`` (the data's meta.json, or None).
    A damaged checkpoint of a run is skipped for the newest intact one, with one warning line;
    sizes and formats are always checked, SHA-256s with ``verify`` (reads every byte).
    Weights are read with safetensors only; raises UserError if nothing usable is found.
    """
    ckpt = resolve_checkpoint(path, verify=verify)
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


# A run is "barely trained" below either mark: its text is still close to gibberish. The tiny
# preset's 200 steps reach validation loss ~6.8 (perplexity ~900); the 15-minute quickstart
# (small, ~500 steps) ~5.0.
BARELY_TRAINED_STEPS = 100
BARELY_TRAINED_VAL_LOSS = 6.5


def describe_loaded(info: dict[str, Any]) -> str:
    """One line naming what :func:`load_model` loaded: run (and whether it is fine-tuned),
    checkpoint, step, validation loss."""
    val = info.get("val_loss") if info.get("val_loss") is not None else info.get("best_val_loss")
    loss = f", val loss {val:.3f}" if val is not None else ""
    kind = "fine-tuned run " if is_finetuned(info["run_dir"]) else ""
    return (f"loaded {kind}{info['run_dir']}, checkpoint {info['checkpoint'].name} "
            f"(step {info['step']}{loss})")


def barely_trained(info: dict[str, Any]) -> str | None:
    """Why the loaded run is barely trained (so its text will look like gibberish), or None."""
    val = info.get("best_val_loss")
    if info["step"] < BARELY_TRAINED_STEPS:
        return f"{info['run_dir']} trained only {info['step']} steps: expect gibberish"
    if val is not None and val >= BARELY_TRAINED_VAL_LOSS:
        return f"{info['run_dir']} is barely trained (val loss {val:.2f}): expect gibberish"
    return None
