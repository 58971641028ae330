"""GPU speed and quality in one run of at most 8 minutes: what gpt-60m / gpt-125m do on this GPU.

    PYTHONUNBUFFERED=1 python bench/gpu.py --data DIR --out bench/results/gpu.json
    python bench/gpu.py --dry-run --data DIR      # tiny shapes on CPU: checks every code path

DIR is a folder made by ``python src/data/prepare_data.py --data-dir ../shared/data --out DIR``.
Sections, in order, each with its own time cap (a section that fails records its error and the
script goes on; the JSON is rewritten after every section, so a timeout still leaves results):

1. matmul    the machine's own bf16 peak: an 8192^3 torch.matmul, warm-ups then a timed mean.
             MFU is reported against it and against the spec peak (src/training/observe.py).
2. speed     per preset at context 1024, vocabulary 16,384: tokens/s and MFU of the training
             step train.py runs (bf16 autocast, torch.compile, SDPA attention, fused AdamW,
             forward + backward + clip + step + zero_grad(set_to_none)), on random token ids
             kept on the GPU (content does not change the cost). The first step (compilation)
             is timed apart; then warm-up steps, then timed steps (CUDA events).
3. max_batch per preset: the largest micro-batch whose eager training step fits in memory
             (doubling, then bisection to a multiple of 8; capped at MAX_BATCH_CAP). torch.compile
             usually needs less memory than eager, so this is a safe lower bound for it.
4. quality   gpt-60m on the prepared data for ~3 minutes: the preset's learning rate and tokens
             per step, a cosine schedule planned from the speed measured in the first steps,
             validation loss on a fixed slice of val.bin every EVAL_EVERY_TOKENS tokens, and how
             many epochs over train.bin that was.

Expected on an H200: matmul ~5 s, speed ~40-90 s per preset (mostly compilation), max_batch
~10-30 s per preset, quality whatever is left of its 190 s cap; ~6-7 minutes in all. A watchdog
ends the script (exit 3, after writing the JSON) if the whole run passes 460 s.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

import numpy as np
import torch
import torch.nn.functional as F

from src.eval.perplexity import sliding_window_nll
from src.model.gpt import GPT
from src.training.batches import BatchLoader, open_tokens, read_meta  # the one import of the loader
from src.training.config import TrainConfig
from src.training.observe import peak_flops
from src.training.optim import build_optimizers, lr_at, set_lr
from src.training.presets import PRESETS, model_config
from src.utils.atomic import write_json_atomic
from src.utils.cli import UserError, run_cli

Batches = list[tuple[torch.Tensor, torch.Tensor]]  # the micro-batches (input, target) of one step

SPEED_PRESETS = ("gpt-60m", "gpt-125m")
QUALITY_PRESET = "gpt-60m"
MAX_BATCH_CAP = 256  # H200 has ~139 GiB; beyond 256 x 1024 tokens a micro-batch gains nothing
EVAL_EVERY_TOKENS = 2**24  # ~16.8M tokens (~4 epochs of WikiText-2 + DailyDialog) between evals
EVAL_TOKENS = 262_144  # the fixed slice of val.bin scored at each evaluation


# ----------------------------------------------------------------------------------------------
# Settings: the real run and the dry run differ only in sizes and time caps.


def settings(dry_run: bool) -> dict[str, Any]:
    """Sizes, step counts and time caps (seconds) of every section."""
    if dry_run:
        return dict(
            total_cap=120, matmul_n=128, matmul_warmup=2, matmul_iters=5, matmul_cap=10,
            context=64, speed_batch=4, warmup_steps=2, timed_steps=2, speed_cap=20,
            compile=False,  # compiling on a CPU costs tens of seconds: the dry run stays fast
            batch_cap=4, max_batch_cap=20,
            quality_cap=15, quality_batch=8, quality_tokens_per_step=1024, quality_warmup=2,
            calibration_steps=1, eval_every_tokens=2048, eval_tokens=512, quality_max_tokens=4096,
        )
    return dict(
        total_cap=460, matmul_n=8192, matmul_warmup=10, matmul_iters=50, matmul_cap=30,
        context=1024, speed_batch=32, warmup_steps=10, timed_steps=30, speed_cap=100,
        compile=True, batch_cap=MAX_BATCH_CAP, max_batch_cap=30,
        quality_cap=190, quality_batch=32,
        quality_tokens_per_step=PRESETS[QUALITY_PRESET].train["tokens_per_step"],
        quality_warmup=40, calibration_steps=5, eval_every_tokens=EVAL_EVERY_TOKENS,
        eval_tokens=EVAL_TOKENS, quality_max_tokens=None,
    )


def shape_overrides(preset: str, dry_run: bool, context: int) -> dict[str, Any]:
    """Model-shape overrides: the context, and in a dry run a 2-layer width-64 model with a
    512-token vocabulary that keeps the preset's kind of attention (grouped-query or not)."""
    if not dry_run:
        return dict(context_length=context)
    base = model_config(preset)
    return dict(context_length=context, n_layer=2, d_model=64, n_head=4, d_ff=None, vocab_size=512,
                n_kv_head=2 if base.n_kv_head < base.n_head else 4)


# ----------------------------------------------------------------------------------------------
# Shared pieces


def amp(device: torch.device) -> bool:
    """bf16 autocast on GPUs; a dry run on a CPU stays in fp32 (CPUs without native bf16
    emulate it ~100x slower, see src/training/trainer.py)."""
    return device.type == "cuda"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Return cached blocks to the device so the next section starts from a clean slate."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


class Timer:
    """Wall-clock time of a list of steps: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1000.0


def train_config(preset: str, **overrides: Any) -> TrainConfig:
    """The preset's training hyper-parameters (lr, betas, weight decay, clip), as train.py uses."""
    return TrainConfig(**{**PRESETS[preset].train, "preset": preset, **overrides})


def build(preset: str, device: torch.device, compile_model: bool, seed: int = 0,
          **overrides: Any) -> tuple[GPT, torch.nn.Module, list[torch.optim.Optimizer], TrainConfig]:
    """A fresh model (raw and, when asked, compiled with static shapes) and train.py's optimiser."""
    torch.manual_seed(seed)
    raw = GPT(model_config(preset, **overrides)).to(device)
    tcfg = train_config(preset)
    optimizers = build_optimizers(raw, tcfg)  # fused AdamW, decay on matrices only
    model = torch.compile(raw, dynamic=False) if compile_model else raw
    return raw, model, optimizers, tcfg


def make_step(raw: GPT, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
              grad_clip: float, device: torch.device) -> Callable[[Batches], torch.Tensor]:
    """One optimiser step as train.py does it: for each micro-batch a bf16 autocast forward and
    a backward of loss / grad_accum, then global-norm clipping, step, zero_grad(set_to_none).
    Returns the mean loss (a device tensor: reading it would synchronise)."""

    def step(micro: Batches) -> torch.Tensor:
        total = torch.zeros((), device=device)
        for x, y in micro:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp(device)):
                _, loss = model(x, y)
            (loss / len(micro)).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(raw.parameters(), grad_clip)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return total / len(micro)

    return step


def random_batch(batch: int, context: int, vocab: int, device: torch.device, seed: int) -> Batches:
    """One micro-batch of random token ids (content does not change the cost of the step)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, (batch, context + 1), generator=g)
    return [(t[:, :-1].contiguous().to(device), t[:, 1:].contiguous().to(device))]


# ----------------------------------------------------------------------------------------------
# 1. The machine's own matmul peak


def bench_matmul(device: torch.device, s: dict[str, Any], deadline: float) -> dict[str, Any]:
    n = s["matmul_n"]
    torch.manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(s["matmul_warmup"]):
        torch.matmul(a, b)
    sync(device)
    timer = Timer(device)
    times = []
    for _ in range(s["matmul_iters"]):
        start = timer.mark()
        torch.matmul(a, b)
        times.append((start, timer.mark()))
        if time.time() > deadline:
            break
    ms = [timer.elapsed_ms(t0, t1) for t0, t1 in times]
    mean_s = sum(ms) / len(ms) / 1000.0
    return {"n": n, "dtype": "bfloat16", "iters": len(ms), "mean_ms": round(mean_s * 1000, 4),
            "min_ms": round(min(ms), 4), "tflops": round(2 * n**3 / mean_s / 1e12, 2)}


# ----------------------------------------------------------------------------------------------
# 2. Training speed


def bench_speed(preset: str, device: torch.device, s: dict[str, Any], dry_run: bool,
                deadline: float, peaks: dict[str, float | None]) -> dict[str, Any]:
    """Compile time, then tokens/s and MFU of the steady state at micro-batch speed_batch."""
    overrides = shape_overrides(preset, dry_run, s["context"])
    B, T = s["speed_batch"], s["context"]
    out: dict[str, Any] = {"micro_batch": B, "context": T, "compiled": s["compile"]}
    raw, model, optimizers, tcfg = build(preset, device, s["compile"], **overrides)
    out.update(params=raw.num_params(), flops_per_token=raw.flops_per_token(),
               vocab_size=raw.config.vocab_size, n_layer=raw.config.n_layer,
               d_model=raw.config.d_model)
    batches = [random_batch(B, T, raw.config.vocab_size, device, seed) for seed in range(4)]
    step = make_step(raw, model, optimizers, tcfg.grad_clip, device)

    # The first step compiles (forward and backward graphs) and builds the optimiser state.
    t0 = time.perf_counter()
    try:
        step(batches[0])
        sync(device)
    except Exception as exc:  # a compiler failure must not cost the measurement: go eager
        if not s["compile"]:
            raise
        out["compile_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        out["compiled"] = False
        print(f"  torch.compile failed ({out['compile_error'][:120]}); measuring eager", flush=True)
        model = raw
        step = make_step(raw, model, optimizers, tcfg.grad_clip, device)
        t0 = time.perf_counter()
        step(batches[0])
        sync(device)
    out["first_step_s"] = round(time.perf_counter() - t0, 2)

    for i in range(1, s["warmup_steps"]):
        step(batches[i % len(batches)])
    sync(device)
    timer = Timer(device)
    marks = []
    loss = None
    for i in range(s["timed_steps"]):
        start = timer.mark()
        loss = step(batches[i % len(batches)])
        marks.append((start, timer.mark()))
        if time.time() > deadline:
            out["note"] = "time cap reached: fewer timed steps"
            break
    ms = sorted(timer.elapsed_ms(a, b) for a, b in marks)
    # Tokens/s from the span of all timed steps (gaps between steps included, if any).
    mean_s = timer.elapsed_ms(marks[0][0], marks[-1][1]) / len(marks) / 1000.0
    tps = B * T / mean_s
    # The first step pays compilation; a steady step is subtracted to isolate it.
    out.update(timed_steps=len(ms), step_ms_mean=round(mean_s * 1000, 3),
               step_ms_median=round(ms[len(ms) // 2], 3), tokens_per_s=round(tps, 1),
               compile_s=round(max(out["first_step_s"] - mean_s, 0.0), 2),
               final_loss=round(float(loss), 4), peak_mem_gib=peak_memory_gib(device))
    for name, peak in peaks.items():
        out[f"mfu_{name}"] = round(out["flops_per_token"] * tps / peak, 4) if peak else None
    return out


# ----------------------------------------------------------------------------------------------
# 3. The largest micro-batch that fits


def bench_max_batch(preset: str, device: torch.device, s: dict[str, Any], dry_run: bool,
                    deadline: float) -> dict[str, Any]:
    """Doubling from 1, then bisection (to a multiple of 8 above 8) between the last fit and
    the first out-of-memory; one eager training step per probe."""
    overrides = shape_overrides(preset, dry_run, s["context"])
    T, cap = s["context"], s["batch_cap"]
    raw, model, optimizers, tcfg = build(preset, device, compile_model=False, **overrides)
    step = make_step(raw, model, optimizers, tcfg.grad_clip, device)
    probes: list[dict[str, Any]] = []

    def fits(batch: int) -> bool:
        error = None
        try:
            step(random_batch(batch, T, raw.config.vocab_size, device, seed=batch))
            sync(device)
        except torch.cuda.OutOfMemoryError as exc:
            error = str(exc).splitlines()[0][:200]
        except RuntimeError as exc:  # cuBLAS/cuDNN report a failed allocation in their own words
            if not any(m in str(exc) for m in ("out of memory", "ALLOC_FAILED")):
                raise
            error = str(exc).splitlines()[0][:200]
        for opt in optimizers:  # gradients of a failed step are dropped with the exception
            opt.zero_grad(set_to_none=True)
        probe = {"batch": batch, "fits": error is None, "peak_mem_gib": peak_memory_gib(device)}
        probes.append(probe if error is None else {**probe, "error": error})
        ok = error is None
        free_memory(device)
        return ok

    good, bad, stopped = 0, None, None
    batch = 1
    while True:
        if time.time() > deadline:
            stopped = "time cap"
            break
        if not fits(batch):
            bad = batch
            break
        good = batch
        if batch >= cap:
            break
        batch = min(batch * 2, cap)
    if good == 0 and bad is not None:
        raise RuntimeError(f"even micro-batch 1 x {T} does not fit in memory")
    step_size = 8 if good >= 8 else 1
    while bad is not None and bad - good > step_size and stopped is None:
        if time.time() > deadline:
            stopped = "time cap"
            break
        mid = (good + bad) // 2 // step_size * step_size
        if mid <= good:
            break
        if fits(mid):
            good = mid
        else:
            bad = mid
    return {"max_micro_batch": good, "context": T, "mode": "eager", "cap": cap,
            "hit_cap": good >= cap, "first_oom": bad,
            "stopped_by": stopped, "probes": probes}


# ----------------------------------------------------------------------------------------------
# 4. A short quality run


def bench_quality(data_dir: Path, device: torch.device, s: dict[str, Any], dry_run: bool,
                  deadline: float, flush: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Train QUALITY_PRESET on the prepared data until ``deadline`` (or quality_max_tokens),
    with validation loss at every multiple of eval_every_tokens (and at 0 and the end)."""
    meta = read_meta(data_dir)
    train_tokens = open_tokens(data_dir, "train", meta)
    val_tokens = open_tokens(data_dir, "val", meta)
    overrides = shape_overrides(QUALITY_PRESET, dry_run, s["context"])
    overrides["vocab_size"] = int(meta["vocab_size"])
    raw, model, optimizers, _ = build(QUALITY_PRESET, device, s["compile"], seed=1337, **overrides)
    T, B = s["context"], s["quality_batch"]
    grad_accum = max(1, round(s["quality_tokens_per_step"] / (B * T)))
    tokens_per_step = B * T * grad_accum
    eval_every = max(1, round(s["eval_every_tokens"] / tokens_per_step)) * tokens_per_step
    eval_slice = np.asarray(val_tokens[: min(s["eval_tokens"] + 1, len(val_tokens))])
    # The schedule: preset lr, warm-up, cosine to 10%; max_steps is planned after calibration.
    tcfg = train_config(QUALITY_PRESET, warmup_steps=s["quality_warmup"], schedule="cosine",
                        max_steps=10**9)
    loader = BatchLoader(train_tokens, T, B, grad_accum, seed=1337)
    step_fn = make_step(raw, model, optimizers, tcfg.grad_clip, device)
    pin = device.type == "cuda"

    def evaluate() -> float:
        nll, count = sliding_window_nll(raw, eval_slice, context_length=T, stride=T,
                                        batch_size=B, device=device,
                                        autocast_dtype=torch.bfloat16 if amp(device) else None)
        return nll / count

    out: dict[str, Any] = {
        "preset": QUALITY_PRESET, "params": raw.num_params(), "context": T, "micro_batch": B,
        "grad_accum": grad_accum, "tokens_per_step": tokens_per_step, "lr": tcfg.lr,
        "warmup_steps": tcfg.warmup_steps, "schedule": "cosine to 0.1 x lr over the planned steps",
        "weight_decay": tcfg.weight_decay, "dropout": raw.config.dropout,
        "compiled": s["compile"], "train_tokens": int(len(train_tokens)),
        "val_tokens_scored": int(len(eval_slice) - 1), "eval_every_tokens": eval_every,
        "curve": [{"tokens": 0, "epochs": 0.0, "val_loss": round(evaluate(), 4)}],
    }
    flush(out)
    step, planned = 0, None
    t_first = t_calibrated = None
    t_loop = time.time()
    while planned is None or step < planned:
        if time.time() > deadline:
            out["note"] = "time cap reached before the planned steps"
            break
        set_lr(optimizers, lr_at(step, tcfg, planned or tcfg.max_steps))
        micro = [(x.pin_memory().to(device, non_blocking=True) if pin else x.to(device),
                  y.pin_memory().to(device, non_blocking=True) if pin else y.to(device))
                 for x, y in loader.next_batch()]
        loss = step_fn(micro)
        step += 1
        if step == 1:
            sync(device)
            t_first = time.time()
            out["first_step_s"] = round(t_first - t_loop, 2)  # includes compilation
        elif step == 1 + s["calibration_steps"]:
            sync(device)
            t_calibrated = time.time()
            per_step = (t_calibrated - t_first) / s["calibration_steps"]
            evals_left = 1 + (deadline - t_calibrated) / per_step * tokens_per_step / eval_every
            eval_cost = 0.5 * len(eval_slice) / (B * T) * per_step / grad_accum  # forward only
            budget = deadline - t_calibrated - evals_left * eval_cost
            planned = step + max(int(budget / per_step), 1)
            if s["quality_max_tokens"]:
                planned = min(planned, s["quality_max_tokens"] // tokens_per_step)
            planned = max(planned, step)
            out.update(calibrated_step_s=round(per_step, 4), planned_steps=planned,
                       planned_tokens=planned * tokens_per_step)
        tokens = step * tokens_per_step
        if tokens % eval_every == 0 or (planned is not None and step >= planned):
            train_loss = float(loss)
            out["curve"].append({"tokens": tokens, "epochs": round(loader.epoch, 3),
                                 "train_loss": round(train_loss, 4),
                                 "val_loss": round(evaluate(), 4),
                                 "seconds": round(time.time() - t_loop, 1)})
            flush(out)
    sync(device)
    train_seconds = time.time() - t_loop
    out.update(steps=step, tokens_seen=step * tokens_per_step, epochs=round(loader.epoch, 3),
               seconds=round(train_seconds, 1), peak_mem_gib=peak_memory_gib(device))
    if t_calibrated is not None and step > 1 + s["calibration_steps"]:
        # After compilation, evaluations included: what a real run of this recipe gets.
        out["tokens_per_s"] = round((step - 1) * tokens_per_step / (time.time() - t_first), 1)
    last = out["curve"][-1]
    if last["tokens"] != out["tokens_seen"]:
        out["curve"].append({"tokens": out["tokens_seen"], "epochs": out["epochs"],
                             "val_loss": round(evaluate(), 4),
                             "seconds": round(time.time() - t_loop, 1)})
    out["best_val_loss"] = min(p["val_loss"] for p in out["curve"])
    return out


# ----------------------------------------------------------------------------------------------
# The report


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "device": str(device), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   sdpa_flash={"gqa (gpt-60m)": flash_attention_check(device, "gpt-60m"),
                               "mha (gpt-125m)": flash_attention_check(device, "gpt-125m")})
    return env


def flash_attention_check(device: torch.device, preset: str) -> str:
    """Whether SDPA's flash kernel runs the preset's attention (causal, bf16, its head layout)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    c = model_config(preset)
    q = torch.randn(2, c.n_head, 256, c.head_dim, device=device, dtype=torch.bfloat16)
    kv = torch.randn(2, c.n_kv_head, 256, c.head_dim, device=device, dtype=torch.bfloat16)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, kv, kv, is_causal=True,
                                           enable_gqa=c.n_kv_head != c.n_head)
        return "ok"
    except Exception as exc:  # a record, not a failure: SDPA then picks another kernel
        return f"not usable: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def fmt(value: Any, spec: str = "", scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown tables (what the README quotes)."""
    env, lines = results["env"], []
    flash = env.get("sdpa_flash")
    flash_text = "; ".join(f"{k} {v}" for k, v in flash.items()) if flash else "-"
    mm = results["sections"].get("matmul", {})
    lines.append(f"GPU: {env.get('gpu', env['device'])}, torch {env['torch']}, CUDA "
                 f"{env.get('cuda', '-')}; flash SDPA kernel: {flash_text}")
    lines.append(f"bf16 peak: spec {fmt(results['peak_spec_tflops'], '.0f')} TFLOP/s, measured "
                 f"{fmt(mm.get('tflops'), '.0f')} TFLOP/s ({mm.get('n', '?')}^3 matmul)\n")
    lines.append("| preset | params | micro-batch x ctx | compile s | step ms | tokens/s | "
                 "MFU (spec) | MFU (measured peak) | peak mem GiB | max micro-batch |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for preset in SPEED_PRESETS:
        sp = results["sections"].get(f"speed {preset}", {})
        mb = results["sections"].get(f"max_batch {preset}", {})
        most = mb.get("max_micro_batch")
        compile_text = fmt(sp.get("compile_s"), ".1f") if sp.get("compiled", True) else "eager"
        most_text = "-" if most is None else f"{most}{' (cap)' if mb.get('hit_cap') else ''}"
        lines.append(
            f"| {preset} | {fmt(sp.get('params'), '.1f', 1e-6)}M | {sp.get('micro_batch', '-')} x "
            f"{sp.get('context', '-')} | {compile_text} | "
            f"{fmt(sp.get('step_ms_mean'), '.1f')} | {fmt(sp.get('tokens_per_s'), ',.0f')} | "
            f"{fmt(sp.get('mfu_spec'), '.1%')} | {fmt(sp.get('mfu_measured'), '.1%')} | "
            f"{fmt(sp.get('peak_mem_gib'), '.1f')} | {most_text} |")
    q = results["sections"].get("quality", {})
    if q.get("curve"):
        lines.append(f"\nQuality: {q['preset']} ({fmt(q.get('params'), '.1f', 1e-6)}M), "
                     f"{q['tokens_per_step']:,} tokens/step, lr {q['lr']}, "
                     f"{fmt(q.get('tokens_per_s'), ',.0f')} tokens/s, {q.get('epochs', '-')} epochs "
                     f"over {q['train_tokens']:,} train tokens\n")
        lines.append("| tokens (M) | epochs | train loss | val loss | val ppl (token) |")
        lines.append("|---|---|---|---|---|")
        for p in q["curve"]:
            lines.append(f"| {p['tokens'] / 1e6:.1f} | {p['epochs']:.2f} | "
                         f"{fmt(p.get('train_loss'), '.3f')} | {p['val_loss']:.3f} | "
                         f"{math.exp(min(p['val_loss'], 50)):.1f} |")
    errors = {k: v["error"] for k, v in results["sections"].items() if "error" in v}
    for name, error in errors.items():
        lines.append(f"\n{name}: {error}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data", help="prepared data folder (train.bin, val.bin, meta.json)")
    p.add_argument("--out", default="bench/results/gpu.json", help="where the JSON goes")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes, a few steps, on CPU when no GPU: checks every code path")
    p.add_argument("--device", default="auto", help="auto (cuda when present, else cpu), cuda, cpu")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: "
                   "matmul,speed,max_batch,quality")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = settings(args.dry_run)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available on this machine")
    if device.type != "cuda" and not args.dry_run:
        raise UserError(f"bench/gpu.py needs a CUDA GPU (device {device}); use --dry-run to test it")
    if device.type == "cpu":
        # Tiny shapes gain nothing from more threads, and on shared cores OpenMP's waits can
        # make a millisecond step take half a second.
        torch.set_num_threads(1)
    data_dir = Path(args.data)
    skip = {x for x in args.skip.split(",") if x}
    unknown = skip - {"matmul", "speed", "max_batch", "quality"}
    if unknown:
        raise UserError(f"--skip: unknown section(s) {sorted(unknown)}")
    if "quality" not in skip:
        read_meta(data_dir)  # a wrong --data fails now, not after five minutes of benchmarks
    out_path = Path(args.out)

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    t_start = time.time()
    spec = peak_flops(device)
    results: dict[str, Any] = {
        "script": "bench/gpu.py", "dry_run": args.dry_run, "settings": s,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
        "env": environment(device), "peak_spec_tflops": spec / 1e12 if spec else None,
        "sections": {}, "finished": False,
    }
    lock = threading.Lock()

    def flush() -> None:
        with lock:
            results["elapsed_s"] = round(time.time() - t_start, 1)
            write_json_atomic(out_path, results)

    def watchdog() -> None:
        # The whole run has a hard cap: record where it stood and end the process.
        results["timed_out"] = True
        try:
            flush()
        except Exception as exc:  # the main thread may be changing results right now
            print(f"watchdog: could not write the JSON ({exc})", flush=True)
        print(f"\nwatchdog: the run passed its {s['total_cap']} s cap; partial JSON in {out_path}",
              flush=True)
        os._exit(3)

    timer = threading.Timer(s["total_cap"], watchdog)
    timer.daemon = True
    timer.start()
    flush()
    print(f"bench/gpu.py on {results['env'].get('gpu', device)}"
          f"{' (dry run)' if args.dry_run else ''}; JSON -> {out_path}", flush=True)

    def section(name: str, kind: str, cap: float, fn: Callable[[float], dict[str, Any]]) -> None:
        """Run one section under its time cap; its result or its error goes into the JSON."""
        if kind in skip:
            return
        t0 = time.time()
        remaining = t_start + s["total_cap"] - 10 - t0
        if remaining < min(cap, 20):
            results["sections"][name] = {"skipped": f"out of time ({remaining:.0f} s left)"}
            print(f"[{name}] skipped: out of time", flush=True)
            flush()
            return
        print(f"[{name}] up to {min(cap, remaining):.0f} s ...", flush=True)
        try:
            result = fn(t0 + min(cap, remaining))
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {str(exc)[:1000]}",
                      "traceback": traceback.format_exc()[-3000:]}
            print(f"[{name}] failed: {result['error'][:300]}", flush=True)
        free_memory(device)
        result["section_s"] = round(time.time() - t0, 1)
        results["sections"][name] = result
        print(f"[{name}] done in {result['section_s']} s (total {time.time() - t_start:.0f} s): "
              f"{summary(result)}", flush=True)
        flush()

    section("matmul", "matmul", s["matmul_cap"], lambda dl: bench_matmul(device, s, dl))
    measured = results["sections"].get("matmul", {}).get("tflops")
    peaks = {"spec": spec, "measured": measured * 1e12 if measured else None}
    for preset in SPEED_PRESETS:
        torch._dynamo.reset()  # a fresh compiler cache per model: no recompiles across presets
        section(f"speed {preset}", "speed", s["speed_cap"],
                lambda dl, p=preset: bench_speed(p, device, s, args.dry_run, dl, peaks))
    torch._dynamo.reset()
    if any("compile_error" in results["sections"].get(f"speed {p}", {}) for p in SPEED_PRESETS):
        s = {**s, "compile": False}  # the quality run must not fail on what already failed
    for preset in SPEED_PRESETS:
        section(f"max_batch {preset}", "max_batch", s["max_batch_cap"],
                lambda dl, p=preset: bench_max_batch(p, device, s, args.dry_run, dl))

    def quality(deadline: float) -> dict[str, Any]:
        def partial(out: dict[str, Any]) -> None:  # keep the curve so far if the run is cut
            results["sections"]["quality"] = {**out, "partial": True}
            flush()
        return bench_quality(data_dir, device, s, args.dry_run, deadline, partial)

    section("quality", "quality", s["quality_cap"], quality)
    timer.cancel()
    results["finished"] = True
    flush()
    print("\n" + markdown(results), flush=True)
    print(f"\ntotal {time.time() - t_start:.0f} s; JSON in {out_path}", flush=True)
    return 0


def summary(result: dict[str, Any]) -> str:
    """One line of a section's headline figures."""
    keys = ("error", "tflops", "tokens_per_s", "mfu_spec", "mfu_measured", "compile_s",
            "max_micro_batch", "hit_cap", "tokens_seen", "epochs", "best_val_loss")
    return ", ".join(f"{k} {str(result[k])[:200]}" for k in keys if k in result) or "-"


if __name__ == "__main__":
    run_cli(main)
