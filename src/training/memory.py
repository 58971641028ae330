"""Will a training micro-batch fit in memory? An estimate made before the first step.

An impossible setting (``--context-length 100000``) would otherwise run for minutes at full load
and die in the allocator with a traceback. The estimate is a lower bound: what one micro-batch
certainly needs in fp32, measured against the peak of real steps (``small`` at 16 x 256: 0.93 GiB
estimated, 1.45 GiB measured; ``tiny`` at 8 x 2048: 3.1 GiB estimated, 4.2 GiB measured), so a run
it refuses cannot fit, and one it lets through may still be tight.
"""

from __future__ import annotations

import os

import torch

from src.model.gpt import GPT, GPTConfig
from src.utils.cli import UserError

GiB = 2**30


def training_bytes(cfg: GPTConfig, batch_size: int, num_params: int) -> dict[str, int]:
    """Lower-bound bytes of one fp32 training micro-batch of ``batch_size`` x the context,
    by part: the logits (logits, log-softmax and their gradient: 3 x B x T x vocab), the
    activations kept for the backward pass, and weights + gradients + AdamW's two moments."""
    tokens = batch_size * cfg.context_length
    return {
        "logits": 3 * tokens * cfg.vocab_size * 4,
        "activations": cfg.n_layer * tokens * (4 * cfg.d_model + 2 * cfg.d_ff) * 4,
        "weights and optimiser": 16 * num_params,
    }


def device_memory(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes (a GPU's, else this machine's RAM), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return None


def check_fits(cfg: GPTConfig, batch_size: int, device: torch.device) -> None:
    """Raise UserError, with the numbers, when one micro-batch cannot fit on ``device``."""
    with torch.device("meta"):  # counts the parameters without allocating them
        num_params = GPT(cfg).num_params()
    parts = training_bytes(cfg, batch_size, num_params)
    need, have = sum(parts.values()), device_memory(device)
    if have is None or need <= have:
        return
    detail = ", ".join(f"{name} {size / GiB:.1f}" for name, size in parts.items())
    raise UserError(
        f"--context-length {cfg.context_length} x --batch-size {batch_size} cannot fit: one "
        f"training micro-batch needs at least {need / GiB:.1f} GiB ({detail}) but this "
        f"{device.type} has {have / GiB:.1f} GiB; lower --context-length or --batch-size")
