"""Optimisers and learning-rate schedules.

* AdamW (fused kernel where the device supports it), with weight decay on matrices only:
  decaying norm gains or biases pulls them towards 0, which only hurts; decaying the embedding
  is the usual practice (GPT-2, nanoGPT, Llama) and a tied embedding is one matrix anyway.
* Muon (``torch.optim.Muon``) as an option: it orthogonalises the momentum of each 2-D hidden
  matrix (attention and MLP weights) with a Newton-Schulz iteration. It is defined for hidden
  matrices only, so the embedding / output head and the norm gains stay on AdamW. With
  ``adjust_lr_fn="match_rms_adamw"`` its update has AdamW's RMS, so both share one ``lr``.
* The schedule is a pure function of the step, so resuming needs no scheduler object: the
  step (saved in the checkpoint) is all its state.
"""

from __future__ import annotations

import math

import torch

from src.training.config import TrainConfig


def _fused_ok(params: list[torch.nn.Parameter]) -> bool:
    """The fused AdamW kernel exists for CPU, CUDA and MPS floating-point tensors."""
    return all(p.device.type in ("cpu", "cuda", "mps") and p.is_floating_point() for p in params)


def build_optimizers(model: torch.nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """The optimiser(s) for ``model``: ``[AdamW]``, or ``[Muon, AdamW]`` with --optimizer muon.

    Call after any FSDP sharding (the optimiser must hold the sharded parameters).
    Parameters named ``*tok_emb*`` / ``*lm_head*`` are the embedding/output head.
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    seen: set[int] = set()
    unique = []
    for n, p in params:  # a tied weight appears once in named_parameters(), but be safe
        if id(p) not in seen:
            seen.add(id(p))
            unique.append((n, p))
    is_embedding = [("tok_emb" in n or "lm_head" in n) for n, _ in unique]
    hidden = [p for (n, p), emb in zip(unique, is_embedding) if p.ndim == 2 and not emb]
    embed = [p for (n, p), emb in zip(unique, is_embedding) if emb]
    other = [p for (n, p), emb in zip(unique, is_embedding) if p.ndim < 2 and not emb]

    adam_kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    all_adam = embed + other + ([] if cfg.optimizer == "muon" else hidden)
    if _fused_ok(all_adam):
        adam_kw["fused"] = True
    if cfg.optimizer == "muon":
        muon = torch.optim.Muon(
            hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=0.95, nesterov=True,
            adjust_lr_fn="match_rms_adamw",
        )
        adamw = torch.optim.AdamW(
            [{"params": embed, "weight_decay": cfg.weight_decay},
             {"params": other, "weight_decay": 0.0}], **adam_kw,
        )
        return [muon, adamw]
    adamw = torch.optim.AdamW(
        [{"params": hidden + embed, "weight_decay": cfg.weight_decay},
         {"params": other, "weight_decay": 0.0}], **adam_kw,
    )
    return [adamw]


def lr_at(step: int, cfg: TrainConfig, max_steps: int | None = None) -> float:
    """Learning rate for optimiser step ``step`` (0-based) of a run planned for ``max_steps``.

    * warmup: linear from lr/warmup_steps up to lr over the first ``warmup_steps`` steps;
    * cosine: then a half cosine from lr down to lr * min_lr_ratio at the last step;
    * wsd (warmup-stable-decay): constant lr, then a linear decay to lr * min_lr_ratio over the
      last ``decay_fraction`` of the steps (a run can be extended before the decay starts);
    * constant: lr after warmup.
    """
    total = max_steps if max_steps is not None else cfg.max_steps
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warmup = min(cfg.warmup_steps, max(total - 1, 0))
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        span = max(total - 1 - warmup, 1)
        progress = min((step - warmup) / span, 1.0)
        return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
    # wsd
    decay_steps = max(int(round(cfg.decay_fraction * total)), 1)
    decay_start = max(total - decay_steps, warmup)
    if step < decay_start:
        return peak
    progress = min((step - decay_start + 1) / max(total - decay_start, 1), 1.0)
    return peak + (floor - peak) * progress


def set_lr(optimizers: list[torch.optim.Optimizer], lr: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
