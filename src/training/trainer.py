"""The training loop, top to bottom: set up, (resume), step, evaluate, checkpoint, finish.

``train(cfg)`` is what ``python train.py`` runs (and what tests call directly). In order:

  1. device, precision, processes (torchrun -> DDP / FSDP2)
  2. data: meta.json, memory-mapped train.bin / val.bin, the tokenizer
  3. run folder: a fresh one (config, tokenizer and data meta copied in) or a resumed one
  4. model, optimiser(s), optional torch.compile
  5. resume: weights, optimiser, step, data position, every RNG -> continues bit-exactly
  6. the loop: lr from the schedule, gradient accumulation, clipping, a finite-loss guard,
     metrics, periodic validation (loss / perplexity / bits per byte), checkpoints,
     Ctrl-C / SIGTERM -> checkpoint and a clean exit
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src import checkpoint as reader
from src.eval.perplexity import sliding_window_nll, text_bytes
from src.infer.sampling import DEFAULT_TEMPERATURE, SamplingSettings, generate
from src.model.gpt import GPT
from src.tokenizer.bpe import BPETokenizer
from src.training import checkpoint as ckpt_io
from src.training.config import TrainConfig, make_config
from src.training.distributed import (
    DistInfo,
    all_reduce_mean,
    any_rank,
    broadcast_str,
    init_distributed,
    no_grad_sync,
    shutdown_distributed,
    wrap_model,
)
from src.training.load import BatchLoader, open_tokens, read_meta
from src.training.observe import (
    MetricsLog,
    TensorBoard,
    format_postfix,
    peak_flops,
    plot_losses,
    progress_bar,
)
from src.training.optim import build_optimizers, lr_at, set_lr
from src.training.presets import model_config
from src.utils.atomic import write_json_atomic
from src.utils.cli import UserError
from src.utils.device import cpu_has_fast_bf16, make_generator, pick_device, pick_dtype

# Share of a time budget kept for evaluations, checkpoints and the final save.
BUDGET_RESERVE = 0.04
CALIBRATION_STEPS = 5  # steps timed (after the first) before a time budget plans max_steps
REPLAN_UNTIL = 0.8  # a time budget's plan is revised at evaluations until this share of it


class NonFiniteLoss(UserError):
    """The loss (or gradient norm) became NaN or infinite: the run stops, checkpoints intact."""


def default_run_dir(cfg: TrainConfig, resume: bool) -> Path:
    """runs/<preset>-<timestamp>; with --resume, the newest existing runs/<preset>-* instead."""
    if resume:
        runs = sorted(Path("runs").glob(f"{cfg.preset}-*"), key=lambda p: p.stat().st_mtime)
        if runs:
            return runs[-1]
    return Path("runs") / f"{cfg.preset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def resolve_for_resume(cfg: TrainConfig, explicit: dict[str, Any]) -> TrainConfig:
    """For ``train.py --resume``: the run's saved config.json is the base, and only settings given
    explicitly now (flags, --config) change it. ``stop_at_step`` applies to one invocation only.
    Without --resume, or for a run with no saved config yet, ``cfg`` is returned as is."""
    if not cfg.resume:
        return cfg
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg, resume=True)
    saved = run_dir / "config.json"
    if not saved.is_file():
        return make_config({**cfg.to_dict(), "run_dir": str(run_dir)})
    base = json.loads(saved.read_text(encoding="utf-8"))
    shape = ("preset", "context_length", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "optimizer")
    for key in shape:
        if key in explicit and explicit[key] != base.get(key):
            raise UserError(f"--{key.replace('_', '-')} {explicit[key]} differs from the run being "
                            f"resumed ({base.get(key)}); start a new --run-dir instead")
    base.update(stop_at_step=None, run_dir=str(run_dir), resume=True)
    return make_config(explicit, base=base)


def plan_steps(step: int, per_step: float, eval_tokens: int, tokens_per_step: int,
               eval_interval: int, spent: float, budget_s: float, warmup_steps: int,
               max_steps: int) -> int:
    """How many steps fit a time budget: the steps left after ``spent`` seconds, each costing
    ``per_step`` plus its share of evaluation (a forward pass over ``eval_tokens`` costs about a
    third of a training step over as many tokens, every ``eval_interval`` steps), keeping
    BUDGET_RESERVE of the budget for checkpoints. Never less than warmup + 1 or step + 1, never
    more than ``max_steps``."""
    eval_cost = per_step * eval_tokens / tokens_per_step / 3
    left = budget_s * (1 - BUDGET_RESERVE) - spent
    fit = int(left / (per_step + eval_cost / eval_interval))
    return min(max(step + fit, warmup_steps + 1, step + 1), max_steps)


def check_ranks_in_sync(model: torch.nn.Module, info: DistInfo, device: torch.device) -> float:
    """DDP replicas must hold identical weights: compare a checksum over ranks (at each checkpoint)
    and raise if they drifted apart. Returns the checksum."""
    with torch.no_grad():
        total = sum(p.detach().double().sum() for p in model.parameters()).to(device)
    lo, hi = total.clone(), total.clone()
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    if lo.item() != hi.item():
        raise RuntimeError(f"data-parallel ranks out of sync: weight checksums {lo.item()!r} .. {hi.item()!r}")
    return float(total)


def sample_text(model: torch.nn.Module, tokenizer, max_new_tokens: int, device: torch.device,
                prompt: str = "The") -> str:
    """A short sample (top-k, the default temperature) from a fixed prompt, to see what was learned.
    Uses its own generator: the training RNG streams are not touched."""
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=DEFAULT_TEMPERATURE, top_k=50)
    generator = make_generator(0, device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            (completion,) = generate(model, tokenizer, tokenizer.encode(prompt), settings,
                                     stop_ids=[tokenizer.eot_id], generator=generator)
    finally:
        model.train(was_training)
    return prompt + completion.text


def train(
    cfg: TrainConfig,
    *,
    loss_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Run (or resume, with ``cfg.resume``) training exactly as ``cfg`` says. Returns a summary
    (run_dir, step, best_val_loss, last_loss, end_reason, max_steps).

    ``loss_hook(step, loss)`` lets tests alter the logged loss of a step (e.g. inject a NaN).
    Raises UserError (incl. NonFiniteLoss) with a one-line message on a user-facing problem.
    """
    # ---- 1. device, precision, processes ---------------------------------------------------
    device = pick_device(cfg.device)
    dist_info = init_distributed(device.type)
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
    try:
        return _train(cfg, device, dist_info, loss_hook)
    finally:
        shutdown_distributed()


def _train(cfg: TrainConfig, device: torch.device, dist_info: DistInfo, loss_hook) -> dict[str, Any]:
    main = dist_info.is_main
    log = print if main else (lambda *a, **k: None)
    amp_dtype = pick_dtype(cfg.dtype, device)
    if amp_dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_fast_bf16():
        log("warning: this CPU has no native bf16 matmuls; --dtype bf16 will be far slower than fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- 2. data ---------------------------------------------------------------------------
    data_dir = Path(cfg.data)
    meta = read_meta(data_dir)
    train_tokens = open_tokens(data_dir, "train", meta)
    val_tokens = open_tokens(data_dir, "val", meta)
    tokenizer = BPETokenizer.load(data_dir / "tokenizer.json")
    if tokenizer.hash != meta["tokenizer_hash"]:
        raise UserError(f"{data_dir / 'tokenizer.json'} does not match {data_dir / 'meta.json'} "
                        "(tokenizer hash differs); re-run prepare_data.py")

    # ---- 3. run folder ---------------------------------------------------------------------
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg, cfg.resume)
    comm_device = device if device.type == "cuda" else torch.device("cpu")  # NCCL needs CUDA tensors
    run_dir = Path(broadcast_str(str(run_dir), dist_info, comm_device))
    cfg.run_dir = str(run_dir)
    resume_from = reader.latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and resume_from is None:
        log(f"--resume: no checkpoint in {run_dir} yet, starting fresh")
    if resume_from is None and reader.list_checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds checkpoints; add --resume to continue it "
                        "or choose another --run-dir")
    if resume_from is not None:
        saved_hash = reader.read_state(resume_from).get("tokenizer_hash")
        if saved_hash != meta["tokenizer_hash"]:
            raise UserError(f"checkpoint {resume_from} was trained with tokenizer {str(saved_hash)[:12]} "
                            f"but {data_dir} uses {meta['tokenizer_hash'][:12]}; resume with the same "
                            "--data, or start a new --run-dir")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", cfg.to_dict())
        if resume_from is None:
            shutil.copyfile(data_dir / "tokenizer.json", run_dir / "tokenizer.json")
            write_json_atomic(run_dir / "data_meta.json", meta)

    # ---- 4. model and optimiser --------------------------------------------------------------
    # The same seed on every rank: identical initial weights (DDP also broadcasts them).
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # also seeds CUDA
    try:
        model_cfg = model_config(cfg.preset, vocab_size=meta.get("vocab_size", tokenizer.vocab_size),
                                 **cfg.model_overrides())
    except ValueError as exc:
        raise UserError(f"invalid model shape: {exc}") from None
    raw_model = GPT(model_cfg).to(device)
    T = model_cfg.context_length
    # After init, each rank draws its own dropout masks.
    torch.manual_seed(cfg.seed + dist_info.rank)
    model = wrap_model(raw_model, dist_info, device, fsdp=cfg.fsdp)
    optimizers = build_optimizers(raw_model, cfg)
    if cfg.compile and device.type == "cpu" and not shutil.which(os.environ.get("CXX", "g++")):
        log("note: no C++ compiler found (torch.compile needs one on CPU): training uncompiled")
    elif cfg.compile:
        model = torch.compile(model)

    world_tokens = cfg.batch_size * T * dist_info.world_size
    grad_accum = max(1, round(cfg.tokens_per_step / world_tokens))
    tokens_per_step = grad_accum * world_tokens
    loader = BatchLoader(train_tokens, T, cfg.batch_size, grad_accum, cfg.seed,
                         dist_info.rank, dist_info.world_size)

    # ---- 5. resume -------------------------------------------------------------------------
    step, tokens_seen, elapsed_before = 0, 0, 0.0
    best_val = math.inf
    planned_steps: int | None = None  # set by a time budget once the speed is measured
    if resume_from is not None:
        state = ckpt_io.load_checkpoint(resume_from, raw_model, optimizers)
        step, tokens_seen = state["step"], state["tokens_seen"]
        elapsed_before = state.get("train_seconds", 0.0)
        best_val = state.get("best_val_loss") or math.inf
        # A time budget's plan holds across resumes; without a budget, --max-steps decides.
        planned_steps = state.get("planned_steps") if cfg.time_budget else None
        loader.load_state_dict(state["loader"])
        log(f"resumed from {resume_from} (step {step})")
    max_steps = lambda: planned_steps if planned_steps is not None else cfg.max_steps  # noqa: E731

    n_params = raw_model.num_params()
    log(f"run {run_dir}: {cfg.preset} model, {n_params / 1e6:.2f}M parameters, "
        f"{tokens_per_step:,} tokens/step ({cfg.batch_size} x {T} x {grad_accum} accum x "
        f"{dist_info.world_size} proc), {cfg.optimizer}, {device}, "
        f"{'bf16' if amp_dtype == torch.bfloat16 else 'fp16' if amp_dtype else 'fp32'}"
        f"{', compiled' if cfg.compile else ''}")
    if tokens_per_step != cfg.tokens_per_step:
        log(f"note: tokens_per_step {cfg.tokens_per_step:,} rounded to {tokens_per_step:,} "
            "(a whole number of micro-batches)")

    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=step if resume_from else None) if main else None
    tb = TensorBoard(run_dir / "tensorboard", cfg.tensorboard and main)
    flops_per_token = raw_model.flops_per_token()
    peak = peak_flops(device, cfg.peak_tflops)
    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    eval_tokens = val_tokens if cfg.eval_tokens == 0 else val_tokens[: cfg.eval_tokens + 1]
    eval_bytes = text_bytes(tokenizer, eval_tokens[1:])  # special tokens are not text

    def evaluate() -> dict[str, float]:
        nll, count = sliding_window_nll(
            raw_model, np.asarray(eval_tokens), context_length=T, stride=cfg.eval_stride or T,
            batch_size=cfg.eval_batch_size, device=device, autocast_dtype=amp_dtype,
        )
        loss = nll / count
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)),
                "val_bpb": nll / math.log(2) / eval_bytes}

    def save(val_loss: float | None = None, is_best: bool = False) -> Path:
        state = {
            "tokens_seen": tokens_seen, "train_seconds": elapsed_before + (time.time() - t_start),
            "best_val_loss": None if best_val == math.inf else best_val, "val_loss": val_loss,
            "planned_steps": planned_steps, "loader": loader.state_dict(),
            "schedule": {"name": cfg.schedule, "max_steps": max_steps(), "lr": lr_at(step, cfg, max_steps())},
            "model_config": model_cfg.to_dict(), "train_config": cfg.to_dict(),
            "tokenizer_hash": meta["tokenizer_hash"], "optimizers": [type(o).__name__ for o in optimizers],
        }
        if dist_info.enabled and not cfg.fsdp:
            state["param_checksum"] = check_ranks_in_sync(raw_model, dist_info, comm_device)
        return ckpt_io.save_checkpoint(run_dir, step, raw_model, optimizers, state,
                                       keep_last=cfg.keep_last, is_best=is_best)

    # ---- 6. the loop -------------------------------------------------------------------------
    stop_signal: list[str] = []

    def on_signal(signum, _frame):
        stop_signal.append(signal.Signals(signum).name)

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    stop_at = cfg.stop_at_step
    # Under a time budget the length is known only after calibration: no bogus ETA until then.
    bar = progress_bar(None if cfg.time_budget and planned_steps is None else max_steps(), step,
                       cfg.progress and main)
    t_start = time.time()
    t_plan, step_plan = 0.0, 0  # when and at which step a time budget last measured its speed

    def plan_from_speed(step: int, unmeasured_eval_tokens: int) -> tuple[int, float]:
        """The time budget's max_steps from the average step time since the last plan (the
        same on every rank), and that average. ``unmeasured_eval_tokens``: the validation
        tokens whose cost the measurement did not include yet (0 when it spanned evaluations)."""
        nonlocal t_plan, step_plan
        now = time.time()
        per_step = (now - t_plan) / (step - step_plan)
        t_plan, step_plan = now, step
        planned = plan_steps(step, per_step, unmeasured_eval_tokens, tokens_per_step, cfg.eval_interval,
                             elapsed_before + now - t_start, cfg.time_budget * 60, cfg.warmup_steps,
                             cfg.max_steps)
        planned = int(broadcast_str(str(planned), dist_info, comm_device))
        bar.total = planned
        return planned, per_step

    start_step = step
    last_loss = math.nan
    last_saved = step if resume_from is not None else -1
    ckpt_every = cfg.checkpoint_interval or cfg.eval_interval
    end_reason = "finished"
    raw_model.train()
    try:
        while step < max_steps():
            if stop_at is not None and step >= stop_at:
                end_reason = f"stopped at step {step} (--stop-at-step)"
                break
            t0 = time.time()
            lr = lr_at(step, cfg, max_steps())
            set_lr(optimizers, lr)
            loss_sum = torch.zeros((), device=device)
            for i, (x, y) in enumerate(loader.next_batch()):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with no_grad_sync(model, active=i < grad_accum - 1), autocast():
                    _, loss = model(x, y)
                scaled = loss / grad_accum
                (scaler.scale(scaled) if scaler else scaled).backward()
                loss_sum += loss.detach().float()
            loss_t = all_reduce_mean(loss_sum / grad_accum, dist_info)
            if loss_hook is not None:
                loss_t = loss_hook(step, loss_t)
            if scaler:
                for opt in optimizers:
                    scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            loss_val, norm_val = float(loss_t), float(grad_norm)
            if not (math.isfinite(loss_val) and (math.isfinite(norm_val) or scaler)):
                last = reader.latest_checkpoint(run_dir)
                raise NonFiniteLoss(
                    f"non-finite {'loss' if not math.isfinite(loss_val) else 'gradient norm'} at step "
                    f"{step + 1} (loss {loss_val}, grad norm {norm_val}); stopped without applying it. "
                    + (f"Last good checkpoint: {last}; resume with --resume and a lower --lr"
                       if last else "No checkpoint was written yet; try a lower --lr"))
            for opt in optimizers:
                if scaler:
                    scaler.step(opt)
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
            if scaler:
                scaler.update()
            step += 1
            tokens_seen += tokens_per_step
            last_loss = loss_val
            dt = time.time() - t0
            tps = tokens_per_step / dt
            mfu = flops_per_token * tps / peak if peak else None
            record = {"step": step, "loss": loss_val, "lr": lr, "grad_norm": norm_val,
                      "tokens": tokens_seen, "tokens_per_s": round(tps, 1), "epoch": round(loader.epoch, 4)}
            if mfu is not None:
                record["mfu"] = round(mfu, 4)
            if main:
                metrics.log(record)
                tb.log(record)
            bar.update(1)
            bar.set_postfix_str(format_postfix(loss_val, lr, tps, mfu), refresh=False)

            # A time budget plans max_steps once the speed is known (never shortening the warmup);
            # after each evaluation it re-plans from the average so far (see below).
            if cfg.time_budget:
                if step == start_step + 1:
                    t_plan, step_plan = time.time(), step  # the first step pays one-off costs: not timed
                elif planned_steps is None and step == start_step + 1 + CALIBRATION_STEPS:
                    planned_steps, per_step = plan_from_speed(step, len(eval_tokens))
                    if main:
                        bar.write(f"time budget {cfg.time_budget:g} min: {per_step:.2f} s/step -> "
                                  f"planned {planned_steps} steps")

            finished = step >= max_steps()
            val_loss, is_best = None, False
            if step % cfg.eval_interval == 0 or finished:
                ev = evaluate()
                val_loss = ev["val_loss"]
                is_best = val_loss < best_val
                best_val = min(best_val, val_loss)
                if main:
                    rec = {"step": step, **ev, "best_val_loss": best_val}
                    metrics.log(rec)
                    tb.log(rec)
                    if cfg.plot:
                        plot_losses(metrics.records, run_dir / "loss.png", title=f"{run_dir.name} ({cfg.preset})")
                    bar.write(f"step {step}: val loss {val_loss:.4f}, ppl {ev['val_ppl']:.2f}, "
                              f"{ev['val_bpb']:.4f} bits/byte{' (best)' if is_best else ''}")
                # Re-plan from the average step time since the last plan, this evaluation
                # included, so the run ends near its budget even when the first steps were slower
                # or faster than the rest (compilation, a busy machine). Not in the last fifth of
                # the run, so the learning-rate decay, once under way, keeps its course.
                if cfg.time_budget and planned_steps is not None and step_plan < step < REPLAN_UNTIL * planned_steps:
                    planned_steps, _ = plan_from_speed(step, 0)
            interrupted = any_rank(bool(stop_signal), dist_info, device)
            if step % ckpt_every == 0 or finished or interrupted or is_best or step == stop_at:
                save(val_loss, is_best)
                last_saved = step
            if interrupted:
                end_reason = f"interrupted ({', '.join(stop_signal) or 'signal on another rank'}) at step {step}"
                break
            over = cfg.time_budget and elapsed_before + time.time() - t_start > cfg.time_budget * 60 * 1.1
            if any_rank(bool(over), dist_info, device):
                end_reason = f"time budget exceeded at step {step}"
                break
        if last_saved != step:
            save()
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if main:
            metrics.close()
        tb.close()

    if end_reason == "finished" and step == start_step and resume_from is not None:
        end_reason = f"already at step {step} of {max_steps()}"
    seconds = time.time() - t_start
    done_steps = step - start_step
    best_text = f"{best_val:.4f}" if math.isfinite(best_val) else "n/a (no evaluation yet)"
    log(f"{end_reason}: step {step}/{max_steps()}, last loss {last_loss:.4f}, best val loss "
        f"{best_text}; {done_steps} steps in {seconds / 60:.1f} min "
        f"({done_steps * tokens_per_step / max(seconds, 1e-9):,.0f} tokens/s)")
    if main and cfg.sample_tokens and step > start_step and not cfg.fsdp:
        log(f"sample: {sample_text(raw_model, tokenizer, cfg.sample_tokens, device)!r}")
    log(f"saved to {run_dir}")
    if step < max_steps():
        log(f"continue: python train.py --run-dir {run_dir} --resume")
    log(f"chat with it: python chat.py --run {run_dir}")
    return {"run_dir": run_dir, "step": step, "best_val_loss": best_val, "last_loss": last_loss,
            "end_reason": end_reason, "max_steps": max_steps()}

