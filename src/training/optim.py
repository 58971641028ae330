"""Optimisers and learning-rate schedules.

* AdamW (fused kernel where the device supports it), with weight decay on matrices only:
  decaying norm gains or biases pulls them towards 0, which only hurts; decaying the embedding
  is the usual practice (GPT-2, nanoGPT, Llama) and a tied embedding is one matrix anyway.
* Muon (:class:`Muon`, ours) as an option: it orthogonalises the momentum of each 2-D hidden
  matrix (attention and MLP weights) with a Newton-Schulz iteration. It is defined for hidden
  matrices only, so the embedding / output head and the norm gains stay on AdamW. Its update
  is scaled to AdamW's RMS, so both share one ``lr``. The iteration runs in the precision the
  machine multiplies matrices in natively: ``torch.optim.Muon`` always uses bf16, which an
  AVX2-only CPU emulates, and that made each step 2.7x as slow there (docs/experiments.md).
* The schedule is a pure function of the step, so resuming needs no scheduler object: the
  step (saved in the checkpoint) is all its state.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from src.training.config import TrainConfig
from src.utils.device import pick_dtype

# Newton-Schulz quintic coefficients (Keller Jordan's Muon, also torch.optim.Muon's defaults):
# chosen to maximise the slope at zero, so 5 steps bring every singular value into ~[0.7, 1.2].
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(g: torch.Tensor, dtype: torch.dtype = torch.float32,
                  steps: int = NS_STEPS) -> torch.Tensor:
    """U V^T of the matrix g = U S V^T, approximately (singular values land near 1, not on it),
    by the Newton-Schulz iteration X <- aX + b(XX^T)X + c(XX^T)^2 X computed in ``dtype``.
    Returns a tensor of g's shape in ``dtype``."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix XX^T is then the smaller one
        x = x.T
    x = x / x.norm().clamp(min=1e-7)  # Frobenius norm >= spectral norm: singular values <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Momentum, orthogonalised (Jordan et al. 2024), for 2-D hidden matrices only.

    Per matrix W (A x B) and step: ``buf = momentum * buf + (1 - momentum) * grad``; the
    direction is ``grad.lerp(buf, momentum)`` (Nesterov) or ``buf``, orthogonalised by
    :func:`orthogonalize` in ``ns_dtype``; then decoupled weight decay and
    ``W -= lr * 0.2 * sqrt(max(A, B)) * direction``: the factor gives the update the RMS of a
    typical AdamW update, so one ``lr`` serves both optimisers. Same rule and state names as
    ``torch.optim.Muon(adjust_lr_fn="match_rms_adamw")``, which is this with ns_dtype=bf16.
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True, ns_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      nesterov=nesterov))
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D matrices only, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer's contract
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                direction = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                if isinstance(direction, DTensor):
                    # FSDP2 shards each matrix by rows, but orthogonalising acts on the whole
                    # matrix: gather it, iterate (every rank alike), keep this rank's rows.
                    full = orthogonalize(direction.full_tensor(), self.ns_dtype)
                    update = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
                else:
                    update = orthogonalize(direction, self.ns_dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * 0.2 * math.sqrt(max(p.shape)))
        return loss


def native_matmul_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device multiplies bf16 matrices natively (a GPU with bf16, a CPU with
    AVX-512 BF16 / AMX), else fp32: the precision Muon's iteration runs in."""
    return torch.bfloat16 if pick_dtype("auto", device) == torch.bfloat16 else torch.float32


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
        # bf16 only when the run trains in bf16 and the device does it natively: --dtype fp32
        # means fp32 throughout (and makes runs comparable across machines).
        device = hidden[0].device if hidden else torch.device("cpu")
        ns_dtype = (native_matmul_dtype(device) if pick_dtype(cfg.dtype, device) == torch.bfloat16
                    else torch.float32)
        muon = Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=0.95,
                    nesterov=True, ns_dtype=ns_dtype)
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
