"""The step the speed benchmarks time, for our GPT and for transformers' Llama of the same shape.

bench/model.py times the model (forward + backward), bench/train.py the whole training step
(also gradient clipping and an AdamW update). Both build it here, so that the two
implementations do exactly the same work: forward on random token ids (content does not
change the cost of dense compute), mean cross-entropy against random targets (for Llama
computed on its logits, in float32, as our model does), backward.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from src.model.gpt import GPT, GPTConfig
from src.training.config import TrainConfig
from src.training.optim import build_optimizers

IMPLS = ("ours", "hf llama")


def make_step(cfg: GPTConfig, impl: str, *, batch: int, seq: int, device: str = "cpu",
              autocast_dtype: torch.dtype | None = None, compile_: bool = False,
              optimizer: bool = False) -> tuple[Callable[[], float], torch.nn.Module]:
    """A function doing one step of ``impl`` ("ours" or "hf llama") with model shape ``cfg`` on
    a fixed random (batch, seq) batch and returning its seconds (synchronised on CUDA), and
    the model. The step is forward + loss + backward; with ``optimizer`` also gradient
    clipping to norm 1 and an optimiser step: for ours, train.py's default optimisers
    (src/training/optim.build_optimizers: Muon for hidden matrices, fused AdamW for the rest);
    Llama gets torch's default AdamW, as the plain loop a newcomer writes would. ``compile_``: torch.compile the model (the first
    calls compile: warm up before timing)."""
    torch.manual_seed(0)
    if impl == "ours":
        model = GPT(cfg).to(device)
        forward = torch.compile(model) if compile_ else model

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return forward(x, y)[1]
    elif impl == "hf llama":
        from transformers import LlamaForCausalLM

        from src.model.hf_llama import to_hf_config

        hf_cfg = to_hf_config(cfg)
        hf_cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(hf_cfg).to(device)
        forward = torch.compile(model) if compile_ else model

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = forward(input_ids=x).logits
            return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
    else:
        raise ValueError(f"unknown implementation {impl!r}; choose one of {IMPLS}")

    optimizers: list[torch.optim.Optimizer] = []
    if optimizer and impl == "ours":
        precision = "fp32" if autocast_dtype is None else "auto"
        optimizers = build_optimizers(model, TrainConfig(lr=1e-4, dtype=precision, device=device))
    elif optimizer:
        optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)]
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]

    def step() -> float:
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            loss = loss_fn(x, y)
        loss.backward()
        if optimizers:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for opt in optimizers:
                opt.step()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return step, model
