"""Pretraining, set up top to bottom, then handed to the training loop.

``train(cfg)`` is what ``python train.py`` runs (and what tests call directly). In order:

  1. device, precision, processes (torchrun -> DDP / FSDP2)
  2. data: meta.json, memory-mapped train.bin / val.bin, the tokenizer; the model shape, and
     whether a micro-batch of it can fit in memory (src/training/memory.py)
  3. run folder: a fresh one (config, tokenizer and data meta copied in) or a resumed one
  4. model, optimiser(s), optional torch.compile
  5. resume: weights, optimiser and every RNG from the checkpoint (the loop restores its step,
     data position and time budget) -> continues bit-exactly
  6. the loop (src/training/loop.py): steps, validation (loss / perplexity / bits per byte),
     checkpoints, time budget, Ctrl-C / SIGTERM -> checkpoint and a clean exit; a fresh run
     that ends (or fails) before its first step leaves no run folder
  7. a summary, a text sample, and how to continue
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
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
from src.training.batches import BatchLoader, open_tokens, prepare_hint, read_meta, verify_data
from src.training.config import MODEL_FIELDS, TrainConfig, make_config
from src.training.distributed import (
    DistInfo,
    broadcast_str,
    init_distributed,
    shutdown_distributed,
    wrap_model,
)
from src.training.loop import TrainLoop
from src.training.memory import check_fits
from src.training.optim import build_optimizers
from src.training.plan import make_plan
from src.training.presets import model_config
from src.utils.atomic import write_json_atomic
from src.utils.cli import UserError
from src.utils.device import (
    cpu_description,
    cpu_has_fast_bf16,
    cpu_threads,
    make_generator,
    pick_device,
    pick_dtype,
)
from src.utils.integrity import file_problem


def default_run_dir(cfg: TrainConfig, resume: bool) -> Path:
    """runs/<preset>-<timestamp>; with --resume, the newest existing runs/<preset>-* instead
    (fine-tuned runs, runs/<base>-sft-<time>, are not pretraining runs to resume)."""
    if resume:
        pretraining = (p for p in Path("runs").glob(f"{cfg.preset}-*") if not reader.is_finetuned(p))
        runs = sorted(pretraining, key=lambda p: p.stat().st_mtime)
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
    base = saved_config(run_dir)
    if base is None:
        return make_config({**cfg.to_dict(), "run_dir": str(run_dir)})
    shape = ("preset", *(f for f in MODEL_FIELDS if f != "dropout"), "optimizer")  # dropout may change
    for key in shape:
        if key in explicit and explicit[key] != base.get(key):
            raise UserError(f"--{key.replace('_', '-')} {explicit[key]} differs from the run being "
                            f"resumed ({base.get(key)}); start a new --run-dir instead")
    base.update(stop_at_step=None, run_dir=str(run_dir), resume=True)
    return make_config(explicit, base=base)


def saved_config(run_dir: Path) -> dict[str, Any] | None:
    """The settings of a run: its config.json, or, when that is missing or not valid JSON, the
    copy in its newest checkpoint's state.json (with one warning line). None for a run not
    started."""
    saved = run_dir / "config.json"
    problem = file_problem(saved)
    if problem is None:
        try:
            base = json.loads(saved.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            base = None
        if isinstance(base, dict):
            return base
        problem = "config.json is not a valid JSON object"
    if saved.is_dir():
        raise UserError(f"{run_dir}: {problem}; move it out of the way, then resume")
    ckpt = reader.find_checkpoint(run_dir, prefer=("latest",))
    if ckpt is None:
        if saved.exists():
            raise UserError(f"{run_dir}: {problem}; restore it, or start a new --run-dir")
        return None
    reader.warn(f"{run_dir}: {problem}; using the settings saved in checkpoint {ckpt.name}")
    return dict(reader.read_state(ckpt)["train_config"])


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
    (run_dir, step, best_val_loss, last_loss, end_reason, max_steps, epochs).

    ``loss_hook(step, loss)`` lets tests alter the logged loss of a step (e.g. inject a NaN).
    Raises UserError (incl. NonFiniteLoss) with a one-line message on a user-facing problem.
    """
    # ---- 1. device, precision, processes ---------------------------------------------------
    device = pick_device(cfg.device)
    dist_info = init_distributed(device.type)
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
    ended = False
    try:
        result = _train(cfg, device, dist_info, loss_hook)
        ended = True
        return result
    finally:
        shutdown_distributed(together=ended)


def _train(cfg: TrainConfig, device: torch.device, dist_info: DistInfo, loss_hook) -> dict[str, Any]:
    log = print if dist_info.is_main else (lambda *a, **k: None)
    amp_dtype = setup_precision(cfg, device, log)

    # ---- 2. data ---------------------------------------------------------------------------
    data_dir = Path(cfg.data)
    meta = read_meta(data_dir)
    verify_data(data_dir, meta)  # sizes and SHA-256s, before anything is trained or written
    train_tokens = open_tokens(data_dir, "train", meta)
    val_tokens = open_tokens(data_dir, "val", meta)
    tokenizer = BPETokenizer.load(data_dir / "tokenizer.json")
    if tokenizer.hash != meta["tokenizer_hash"]:
        raise UserError(f"{data_dir / 'tokenizer.json'} does not match {data_dir / 'meta.json'} "
                        f"(tokenizer hash differs); {prepare_hint(data_dir)}")

    try:
        model_cfg = model_config(cfg.preset, vocab_size=meta.get("vocab_size", tokenizer.vocab_size),
                                 **cfg.model_overrides())
    except ValueError as exc:
        raise UserError(f"invalid model shape: {exc}") from None
    check_fits(model_cfg, cfg.batch_size, device)  # before a run folder exists

    # ---- 3. run folder ---------------------------------------------------------------------
    run_dir, resume_from = open_run_dir(cfg, data_dir, meta, dist_info, device, log)

    # ---- 4. model and optimiser --------------------------------------------------------------
    # The same seed on every rank: identical initial weights (DDP also broadcasts them).
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # also seeds CUDA
    raw_model = GPT(model_cfg).to(device)
    T = model_cfg.context_length
    # After init, each rank draws its own dropout masks.
    torch.manual_seed(cfg.seed + dist_info.rank)
    model, compiled, optimizers = prepare_model(raw_model, cfg, dist_info, device, log)

    world_tokens = cfg.batch_size * T * dist_info.world_size
    grad_accum = max(1, round(cfg.tokens_per_step / world_tokens))
    batches = BatchLoader(train_tokens, T, cfg.batch_size, grad_accum, cfg.seed,
                          dist_info.rank, dist_info.world_size, pin_memory=device.type == "cuda")

    # ---- 5. resume -------------------------------------------------------------------------
    resume_state = None
    if resume_from is not None:
        resume_state = ckpt_io.load_checkpoint(resume_from, raw_model, optimizers)
        log(f"resumed from {resume_from} (step {resume_state['step']})")

    tokens_per_step = batches.tokens_per_step
    log(f"run {run_dir}: {cfg.preset} model, {raw_model.num_params() / 1e6:.2f}M parameters, "
        f"{tokens_per_step:,} tokens/step ({cfg.batch_size} x {T} x {grad_accum} accum x "
        f"{dist_info.world_size} proc), {cfg.optimizer}, {device}, "
        f"{'bf16' if amp_dtype == torch.bfloat16 else 'fp16' if amp_dtype else 'fp32'}"
        f"{', compiled' if cfg.compile else ''}")
    if tokens_per_step != cfg.tokens_per_step:
        log(f"note: tokens_per_step {cfg.tokens_per_step:,} rounded to {tokens_per_step:,} "
            "(a whole number of micro-batches)")
    eval_tokens = val_tokens if cfg.eval_tokens == 0 else val_tokens[: cfg.eval_tokens + 1]
    if dist_info.is_main:  # passes over the data and the expected duration, before it starts
        plan = make_plan(cfg, model_cfg, len(train_tokens), device, dist_info.world_size,
                         eval_tokens=len(eval_tokens))
        for line in plan.lines():
            log(line)

    # ---- 6. the loop -------------------------------------------------------------------------
    loop = TrainLoop(
        cfg, model=model, compiled=compiled, raw_model=raw_model, optimizers=optimizers,
        batches=batches,
        evaluate=validation(raw_model, eval_tokens, tokenizer, cfg, device, amp_dtype),
        eval_tokens=len(eval_tokens), device=device, amp_dtype=amp_dtype, dist=dist_info,
        resume_state=resume_state, loss_hook=loss_hook,
        checkpoint_facts={
            "model_config": model_cfg.to_dict(), "train_config": cfg.to_dict(),
            "tokenizer_hash": meta["tokenizer_hash"],
            "optimizers": [type(o).__name__ for o in optimizers],
        },
    )
    try:
        end_reason = loop.run()
    except BaseException:
        if resume_from is None and dist_info.is_main:
            discard_untrained_run(run_dir)
        raise
    if loop.step == 0 and resume_from is None:  # stopped before the first step completed
        if dist_info.is_main:
            discard_untrained_run(run_dir)
        log(f"{end_reason}: nothing was trained, so no run folder is kept")
        return {"run_dir": None, "step": 0, "best_val_loss": math.inf, "last_loss": math.nan,
                "end_reason": end_reason, "max_steps": loop.max_steps}

    # ---- 7. summary --------------------------------------------------------------------------
    summary = summarize(loop, end_reason, log)
    stopping = end_reason.startswith("interrupted")  # the user is waiting: no sample then
    if (dist_info.is_main and cfg.sample_tokens and loop.step > loop.start_step and not cfg.fsdp
            and not stopping):
        log(f"sample: {sample_text(raw_model, tokenizer, cfg.sample_tokens, device)!r}")
    log(f"saved to {run_dir}")
    if loop.step < loop.max_steps and not loop.stopped_early:
        log(f"continue: python train.py --run-dir {run_dir} --resume")
    log(f"chat with it: python chat.py --run {run_dir}")
    return summary


# ---- set-up and summary pieces shared with fine-tuning (src/training/finetune.py) ------------


def setup_precision(cfg: TrainConfig, device: torch.device,
                    log: Callable[..., None]) -> torch.dtype | None:
    """The autocast dtype of ``cfg.dtype`` on ``device`` (None: fp32), decided at run time and
    said in one line; TF32 matmuls on CUDA. On a CPU also the thread count: at most one per
    physical core, shared among the processes torchrun starts on this machine
    (``cpu_threads``), and the CPU named by its flags, since bf16 is fast only where they
    include native bf16."""
    if device.type == "cpu":  # never more threads than the caller set (tests use one)
        local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(min(torch.get_num_threads(), max(1, cpu_threads() // local_processes)))
    amp_dtype = pick_dtype(cfg.dtype, device)
    name = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}.get(amp_dtype, "fp32")
    if device.type == "cpu":
        native = cpu_has_fast_bf16()
        why = ("--dtype auto: " + ("bf16 matmuls are native here" if native else
                                   "bf16 would be emulated here") if cfg.dtype == "auto"
               else f"--dtype {cfg.dtype}")
        log(f"precision: {name} ({why}); CPU: {cpu_description()}")
        if amp_dtype == torch.bfloat16 and not native:
            log("warning: this CPU has no native bf16 matmuls; --dtype bf16 will be far slower than fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return amp_dtype


def prepare_model(raw_model: torch.nn.Module, cfg: TrainConfig, dist_info: DistInfo,
                  device: torch.device, log: Callable[..., None]
                  ) -> tuple[torch.nn.Module, torch.nn.Module | None, list[torch.optim.Optimizer]]:
    """``(model, compiled, optimisers)``: ``raw_model`` wrapped for DDP / FSDP2 under torchrun,
    and the same under torch.compile when ``cfg.compile`` and a C++ compiler is at hand (else
    None). Compiling is lazy: the loop measures whether it pays (src/training/compile_choice.py)."""
    model = wrap_model(raw_model, dist_info, device, fsdp=cfg.fsdp)
    optimizers = build_optimizers(raw_model, cfg)
    compiled = None
    if cfg.compile and device.type == "cpu" and not shutil.which(os.environ.get("CXX", "g++")):
        log("note: no C++ compiler found (torch.compile needs one on CPU): training uncompiled")
    elif cfg.compile:
        compiled = torch.compile(model)
    return model, compiled, optimizers


def summarize(loop: TrainLoop, end_reason: str, log: Callable[..., None]) -> dict[str, Any]:
    """Log how a run ended (steps, losses, speed); returns the summary ``train`` returns."""
    step, max_steps, best_val = loop.step, loop.max_steps, loop.best_val
    seconds = time.time() - loop.t_start
    done_steps = step - loop.start_step
    best_text = f"{best_val:.4f}" if math.isfinite(best_val) else "n/a (no evaluation yet)"
    epochs = loop.batches.epoch
    log(f"{end_reason}: step {step}/{max_steps}, last loss {loop.last_loss:.4f}, best val loss "
        f"{best_text}; {done_steps} steps in {seconds / 60:.1f} min "
        f"({done_steps * loop.tokens_per_step / max(seconds, 1e-9):,.0f} tokens/s); "
        f"{epochs:.2f} epochs of the training data seen")
    return {"run_dir": loop.run_dir, "step": step, "best_val_loss": best_val,
            "last_loss": loop.last_loss, "end_reason": end_reason, "max_steps": max_steps,
            "epochs": epochs}


def open_run_dir(cfg: TrainConfig, data_dir: Path, meta: dict[str, Any], dist_info: DistInfo,
                 device: torch.device, log: Callable[..., None]) -> tuple[Path, Path | None]:
    """The run folder (the same on every rank; ``cfg.run_dir`` is set to it) and the checkpoint
    to resume from (None: a fresh start). A fresh run gets config.json, and copies of the
    tokenizer and the data's meta.json; a resumed one its updated config.json. Refuses to train
    over existing checkpoints without --resume, or to resume with another tokenizer."""
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg, cfg.resume)
    comm_device = device if device.type == "cuda" else torch.device("cpu")  # NCCL needs CUDA tensors
    run_dir = Path(broadcast_str(str(run_dir), dist_info, comm_device))
    cfg.run_dir = str(run_dir)
    # The newest intact checkpoint (every file hashed); a damaged one is skipped, said once.
    quiet = (lambda _line: None) if not dist_info.is_main else reader.warn
    resume_from = reader.resume_checkpoint(run_dir, on_skip=quiet) if cfg.resume else None
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
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", cfg.to_dict())
        if resume_from is None:
            shutil.copyfile(data_dir / "tokenizer.json", run_dir / "tokenizer.json")
            write_json_atomic(run_dir / "data_meta.json", meta)
    return run_dir, resume_from


# What a fresh run writes into its folder before its first checkpoint (see src/checkpoint/layout.py).
RUN_FILES = ("config.json", "tokenizer.json", "data_meta.json", "metrics.jsonl", "loss.png",
             "tensorboard", reader.CHECKPOINTS)


def discard_untrained_run(run_dir: Path) -> None:
    """Remove what a fresh run wrote, if it has no checkpoint: a run folder that did not train a
    step is noise in runs/ (and chat.py must never pick it). The folder itself goes only if
    nothing else is in it, so a user's own files are never touched."""
    if reader.list_checkpoints(run_dir):
        return
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run_dir.rmdir()


def validation(model: torch.nn.Module, tokens: np.ndarray, tokenizer: BPETokenizer,
               cfg: TrainConfig, device: torch.device,
               amp_dtype: torch.dtype | None) -> Callable[[], dict[str, float]]:
    """The loop's evaluation: loss, perplexity and bits per byte of ``model`` over ``tokens``
    (sliding windows of the model's context, ``cfg.eval_stride`` apart)."""
    context = model.config.context_length
    n_bytes = text_bytes(tokenizer, tokens[1:])  # special tokens are not text

    def evaluate() -> dict[str, float]:
        nll, count = sliding_window_nll(
            model, np.asarray(tokens), context_length=context, stride=cfg.eval_stride or context,
            batch_size=cfg.eval_batch_size, device=device, autocast_dtype=amp_dtype,
        )
        loss = nll / count
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)),
                "val_bpb": nll / math.log(2) / n_bytes}

    return evaluate
