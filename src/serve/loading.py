"""The one place the server reaches for a trained run: resolving it, choosing the device and
loading the model (through src/checkpoint, like every other command)."""

from __future__ import annotations

import torch

from src.checkpoint import load_model
from src.utils.device import pick_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_served_model(run: str | None, device: str = "auto", dtype: str = "fp32"):
    """(model in eval mode, tokenizer, info) of ``run`` (a run or checkpoint folder; None =
    the newest run under runs/), on ``device`` ("auto" = CUDA if available) in ``dtype``.
    Raises UserError for a missing run or device."""
    model, tokenizer, info = load_model(run, device=pick_device(device))
    return model.to(DTYPES[dtype]).eval(), tokenizer, info
