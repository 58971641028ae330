"""Where and in what precision a model runs, and the generator its sampling draws from.

The one home of these choices for every command (train.py, chat.py, evaluate.py,
src/infer/generate.py) and the benchmarks, so ``--device`` and ``--dtype`` mean the same
thing everywhere.
"""

from __future__ import annotations

import torch

from src.utils.cli import UserError


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def pick_device(name: str) -> torch.device:
    """``--device NAME`` -> a torch.device. ``auto``: CUDA, else MPS if available, else CPU.

    A name that is no device (``banana``) or a device this machine lacks (``cuda`` without a
    GPU, ``mps`` off a Mac) is a one-line UserError naming the flag.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "mps" and not _mps_available():
        raise UserError(f"--device {name}: MPS is not available on this machine (use --device cpu)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: not supported (use auto, cpu, cuda, cuda:N or mps)")
    return device


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX-512 BF16 / AMX). Without it (e.g. an
    AVX2-only CPU) oneDNN emulates them, measured here at ~100x slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """``--dtype NAME`` -> the autocast dtype (None = plain fp32). ``auto``: bf16 on GPUs that
    support it and on CPUs with native bf16 matmuls, else fp32 (fp16 on older GPUs)."""
    if name == "fp32":
        return None
    if name == "fp16":
        return torch.float16
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None  # auto on MPS: fp32


def make_generator(seed: int | None, device: str | torch.device) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (same seed, same draws), or from the
    operating system's entropy when ``seed`` is None."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
