"""The plan of a training run, known before it starts: model size, tokens, passes over the data,
and how long it should take.

``python train.py --plan ...`` prints :meth:`RunPlan.to_json` as one line and exits, without
building the model, compiling or writing anything; ``train.py`` prints :meth:`RunPlan.lines`
at the start of every run. Both come from :func:`make_plan`, so what a user checks before
renting a GPU is exactly what the run will do.

The duration is a FLOP-based estimate, said so wherever it is printed:

    seconds = (training tokens x flops_per_token + validation cost) / (device FLOP/s)

* on a known GPU (or with ``--peak-tflops``): its dense bf16 peak x ASSUMED_GPU_MFU, the
  utilisation a compiled bf16 run of this model should reach (bench/gpu.py measures it);
* on a CPU: the matrix-multiply rate measured on this machine by a ~0.3 s probe, x
  CPU_STEP_EFFICIENCY, the share of it a whole training step reaches here (measured:
  docs/experiments.md);
* elsewhere (MPS, an unlisted GPU without --peak-tflops): unknown, ``estimated_seconds`` null.

The progress bar's ETA, from the measured speed, takes over once the run is under way.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch

from src.model.gpt import GPTConfig
from src.training.batches import windows_per_epoch
from src.training.config import TrainConfig
from src.training.observe import peak_flops
from src.training.time_budget import BUDGET_RESERVE
from src.utils.device import pick_dtype

# Model FLOPs utilisation assumed for a compiled bf16 run on a GPU (nanoGPT-class trainers
# reach 40-50% on A100/H100 at this size); replace with bench/gpu.py's measurement.
ASSUMED_GPU_MFU = 0.40
# Share of the probe's matmul rate (in the run's precision) that a whole compiled training
# step of `small` reaches on 2 cores (attention, norms, the optimiser and Python cost the
# rest); measured in bench/train.py (docs/experiments.md).
CPU_STEP_EFFICIENCY = 0.4


def count_params(c: GPTConfig) -> int:
    """Parameters of ``GPT(c)`` (a tied matrix counted once), from the config alone;
    tests check it equals ``GPT(c).num_params()``."""
    kv = c.n_kv_head * c.head_dim
    attn = 2 * c.d_model * c.d_model + 2 * c.d_model * kv  # q, o; k, v (no biases)
    mlp = 3 * c.d_model * c.d_ff  # SwiGLU: gate, up, down
    block = attn + mlp + 2 * c.d_model  # + two RMSNorm gains
    embedding = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    return c.n_layer * block + c.d_model + embedding  # + the final norm


def flops_per_token(c: GPTConfig) -> float:
    """Training FLOPs per token, as ``GPT.flops_per_token`` counts them (tested equal)."""
    kv = c.n_kv_head * c.head_dim
    n_matmul = c.n_layer * (2 * c.d_model * c.d_model + 2 * c.d_model * kv + 3 * c.d_model * c.d_ff)
    n_matmul += c.vocab_size * c.d_model  # the output head, counted even when tied
    return 6.0 * n_matmul + 12.0 * c.n_layer * c.d_model * c.context_length


def device_rate(device: torch.device, peak_tflops: float | None,
                dtype: torch.dtype | None = None) -> tuple[float | None, str]:
    """(expected training FLOP/s, how that figure was obtained) for ``device``, training with
    autocast ``dtype`` (None: fp32)."""
    if device.type == "cpu" and not peak_tflops:
        rate = peak_flops(device, None, dtype)  # the CPU's measured matmul rate (observe.py)
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        return rate * CPU_STEP_EFFICIENCY, (f"FLOP-based: this CPU's measured {name} matmul rate "
                                            f"{rate / 1e9:.0f} GFLOP/s x {CPU_STEP_EFFICIENCY:.0%}")
    peak = peak_flops(device, peak_tflops)
    if peak is not None:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        source = "--peak-tflops" if peak_tflops else f"{name} bf16 peak"
        return peak * ASSUMED_GPU_MFU, (f"FLOP-based: {source} {peak / 1e12:g} TFLOP/s x assumed "
                                        f"{ASSUMED_GPU_MFU:.0%} MFU")
    return None, f"unknown: no peak FLOP/s known for {device}; pass --peak-tflops"


@dataclass
class RunPlan:
    """What a run will do. ``epochs``: passes over the training windows (as the loader counts
    them); ``steps_from``: "max_steps" or "time_budget" (then ``steps`` is estimated and
    re-planned from the measured speed)."""

    preset: str
    params: int
    flops_per_token: float
    context_length: int
    batch_size: int
    grad_accum: int
    world_size: int
    tokens_per_step: int
    steps: int
    steps_from: str
    tokens: int
    train_tokens: int
    epochs: float
    max_epochs: float | None
    early_stop_patience: int | None
    estimated_seconds: float | None
    estimate_basis: str
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        """The plan as one line of JSON."""
        data = asdict(self)
        data["epochs"] = round(self.epochs, 3)
        if self.estimated_seconds is not None:
            data["estimated_seconds"] = round(self.estimated_seconds, 1)
        return json.dumps(data)

    def lines(self) -> list[str]:
        """What train.py prints at the start: the plan, then each warning."""
        eta = (f"estimated {format_duration(self.estimated_seconds)}"
               if self.estimated_seconds is not None else "duration unknown")
        budget = " (planned from the time budget; revised as it runs)" if self.steps_from == "time_budget" else ""
        stop = (f"; early stop after {self.early_stop_patience} evaluations without a better val loss"
                if self.early_stop_patience else "")
        head = (f"plan: {self.steps:,} steps{budget} x {self.tokens_per_step:,} tokens = "
                f"{self.tokens / 1e6:,.1f}M tokens = {self.epochs:.2f} epochs of the "
                f"{self.train_tokens / 1e6:,.2f}M-token training set{stop}; {eta} ({self.estimate_basis})")
        return [head] + [f"warning: {w}" for w in self.warnings]


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def make_plan(cfg: TrainConfig, model_cfg: GPTConfig, train_tokens: int, device: torch.device,
              world_size: int = 1, eval_tokens: int | None = None) -> RunPlan:
    """The plan of ``cfg`` on ``train_tokens`` tokens of training data (train.bin's length),
    ``world_size`` processes on ``device``. ``eval_tokens``: tokens scored per evaluation
    (default cfg.eval_tokens). The batch arithmetic is the trainer's (tokens_per_step rounded
    to whole micro-batches); warnings say, with numbers and the fix, what would go wrong."""
    T = model_cfg.context_length
    world_tokens = cfg.batch_size * T * world_size
    grad_accum = max(1, round(cfg.tokens_per_step / world_tokens))
    tokens_per_step = world_tokens * grad_accum
    fpt = flops_per_token(model_cfg)
    rate, basis = device_rate(device, cfg.peak_tflops, pick_dtype(cfg.dtype, device))
    eval_tokens = cfg.eval_tokens if eval_tokens is None else eval_tokens
    # A forward pass costs a third of a training step over as many tokens (time_budget.py).
    eval_flops_per_step = eval_tokens * fpt / 3 / cfg.eval_interval
    step_flops = tokens_per_step * fpt + eval_flops_per_step

    steps, steps_from = cfg.max_steps, "max_steps"
    seconds = steps * step_flops / rate if rate else None
    if cfg.time_budget and rate:
        fit = int(cfg.time_budget * 60 * (1 - BUDGET_RESERVE) / (step_flops / rate))
        if fit < cfg.max_steps:  # the budget ends the run, on time
            steps, steps_from, seconds = max(1, fit), "time_budget", cfg.time_budget * 60
    tokens = steps * tokens_per_step
    windows = windows_per_epoch(train_tokens, T)  # UserError when too few for one window
    epochs = steps * (tokens_per_step // T) / windows

    warnings = []
    if cfg.max_epochs and epochs > cfg.max_epochs:
        fit_steps = max(1, int(cfg.max_epochs * windows * T / tokens_per_step))
        warnings.append(
            f"{steps:,} steps x {tokens_per_step:,} tokens = {epochs:.1f} passes over the "
            f"{train_tokens:,}-token training set, more than this preset's max_epochs "
            f"{cfg.max_epochs:g} (it would memorise the data): use --max-steps {fit_steps}, or "
            "more data (prepare_data.py --wikitext 103)")
    if tokens_per_step > windows * T:
        warnings.append(f"one step ({tokens_per_step:,} tokens) is more than a whole epoch "
                        f"({windows * T:,} tokens): lower --tokens-per-step")
    return RunPlan(
        preset=cfg.preset, params=count_params(model_cfg), flops_per_token=fpt,
        context_length=T, batch_size=cfg.batch_size, grad_accum=grad_accum,
        world_size=world_size, tokens_per_step=tokens_per_step, steps=steps,
        steps_from=steps_from, tokens=tokens, train_tokens=train_tokens, epochs=epochs,
        max_epochs=cfg.max_epochs, early_stop_patience=cfg.early_stop_patience,
        estimated_seconds=seconds, estimate_basis=basis, warnings=warnings,
    )


def world_size_from_env() -> int:
    """Processes a torchrun launch would start (WORLD_SIZE), else 1: for --plan, which does
    not join the process group."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def plan_from_data(cfg: TrainConfig) -> RunPlan:
    """``train.py --plan``: the plan of ``cfg`` on its prepared data (meta.json and the size of
    train.bin), read without building the model or writing anything."""
    from src.training.batches import open_tokens, read_meta
    from src.training.presets import model_config
    from src.utils.cli import UserError
    from src.utils.device import pick_device

    meta = read_meta(cfg.data)
    try:
        model_cfg = model_config(cfg.preset, vocab_size=meta.get("vocab_size", 16384),
                                 **cfg.model_overrides())
    except ValueError as exc:
        raise UserError(f"invalid model shape: {exc}") from None
    train_tokens = len(open_tokens(cfg.data, "train", meta))  # memory-mapped: nothing read
    return make_plan(cfg, model_cfg, train_tokens, pick_device(cfg.device), world_size_from_env())
