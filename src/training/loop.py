"""The training loop: optimiser steps until the schedule ends, a signal arrives or time is up.

One iteration of :meth:`TrainLoop.run`, top to bottom::

    train_step          lr from the schedule; forward + backward over the step's micro-batches
                        (gradients accumulate, synchronised across processes on the last);
                        a finite-loss guard; gradient clipping; the optimiser update
    log                 metrics.jsonl, TensorBoard, progress bar (tokens/s, ETA)
    time budget         plans max_steps once the speed is measured (src/training/time_budget.py)
    evaluate_if_due     every eval_interval steps and at the end; the time budget re-plans
    checkpoint_due      every checkpoint_interval steps, at a new best, at the end, on a stop
    stop?               Ctrl-C / SIGTERM (caught by StopSignals), --stop-at-step, budget overrun,
                        early stopping (``patience`` evaluations in a row without a new best)

The loop is independent of what it trains on: ``batches`` is any BatchSource (pretraining:
BatchLoader over train.bin; a fine-tuning stage: masked conversation batches), ``evaluate`` any
function returning at least ``val_loss``. Building the model, the data and the run folder is
src/training/trainer.py's job.

Exact resume: a checkpoint holds the weights, the optimiser, every RNG (src/training/checkpoint.py)
and the loop's own state, written by :meth:`TrainLoop.save` and read back by
:meth:`TrainLoop.__init__` from ``resume_state``: step, tokens seen, training seconds, best
validation loss, evaluations since the best, the time budget's plan and the batch source's
position.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from src import checkpoint as reader
from src.training import checkpoint as ckpt_io
from src.training.batches import BatchSource, scored_targets
from src.training.config import TrainConfig
from src.training.distributed import (
    DistInfo,
    all_reduce_mean,
    any_rank,
    broadcast_str,
    check_ranks_in_sync,
    no_grad_sync,
)
from src.training.observe import RunLog, format_evaluation, format_postfix, peak_flops
from src.training.optim import lr_at, set_lr
from src.training.time_budget import TimeBudget
from src.utils.cli import UserError


class NonFiniteLoss(UserError):
    """The loss (or gradient norm) became NaN or infinite: the run stops, checkpoints intact."""


class StopSignals:
    """While entered, SIGINT (Ctrl-C) and SIGTERM are noted in ``received`` instead of killing
    the process: the loop then checkpoints and returns at the end of the current step."""

    def __enter__(self) -> StopSignals:
        self.received: list[str] = []
        self._previous = {s: signal.signal(s, self._note) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _note(self, signum: int, _frame: object) -> None:
        self.received.append(signal.Signals(signum).name)


class TrainLoop:
    """Trains ``model`` on ``batches`` as ``cfg`` says (schedule, clipping, evaluation and
    checkpoint intervals, time budget, stop_at_step), in the run folder ``cfg.run_dir``.

    ``model`` is what the forward pass runs (DDP-wrapped and/or compiled); ``raw_model`` the
    module underneath, which is clipped, evaluated and saved. ``model(x, y)`` returns
    ``(logits, mean loss)``. ``evaluate()`` returns at least ``val_loss`` (more keys are
    logged too); ``eval_tokens`` is how many tokens it scores (the time budget's estimate of
    its cost). ``checkpoint_facts`` go into every checkpoint's state.json as they are.
    ``resume_state``: the state of the checkpoint to continue from, whose weights, optimiser
    and RNG are already loaded (``checkpoint.load_checkpoint``). ``patience``: stop once that
    many evaluations in a row brought no new best validation loss (None: never); the best
    checkpoint is what ``load_model`` then loads. ``loss_hook(step, loss)`` lets tests alter a
    step's loss (e.g. inject a NaN).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        model: torch.nn.Module,
        raw_model: torch.nn.Module,
        optimizers: list[torch.optim.Optimizer],
        batches: BatchSource,
        evaluate: Callable[[], dict[str, float]],
        eval_tokens: int,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
        dist: DistInfo | None = None,
        checkpoint_facts: dict[str, Any] | None = None,
        resume_state: dict[str, Any] | None = None,
        patience: int | None = None,
        loss_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.cfg, self.run_dir = cfg, Path(cfg.run_dir)
        self.model, self.raw_model, self.optimizers = model, raw_model, optimizers
        self.batches, self.evaluate = batches, evaluate
        self.device, self.amp_dtype, self.dist = device, amp_dtype, dist or DistInfo()
        self.checkpoint_facts = checkpoint_facts or {}
        self.loss_hook, self.patience = loss_hook, patience
        # fp16 needs loss scaling (its range is too small for small gradients); bf16 does not.
        self.scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        self.comm_device = device if device.type == "cuda" else torch.device("cpu")  # NCCL: CUDA
        self.tokens_per_step = batches.tokens_per_step
        self.flops_per_token = raw_model.flops_per_token()
        self.peak_flops = peak_flops(device, cfg.peak_tflops)

        # Progress, continued from the checkpoint when resuming.
        state = resume_state or {}
        self.resumed = resume_state is not None
        self.step = self.start_step = state.get("step", 0)
        self.tokens_seen = state.get("tokens_seen", 0)
        self.seconds_before = state.get("train_seconds", 0.0)  # of earlier invocations
        self.best_val = state.get("best_val_loss") or math.inf
        self.evals_since_best = state.get("evals_since_best", 0)
        if "loader" in state:
            batches.load_state_dict(state["loader"])
        self.budget = TimeBudget(
            cfg.time_budget, max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps,
            eval_interval=cfg.eval_interval, eval_tokens=eval_tokens,
            tokens_per_step=self.tokens_per_step, planned_steps=state.get("planned_steps"),
            sync=lambda n: int(broadcast_str(str(n), self.dist, self.comm_device)),
        )
        self.last_loss = math.nan
        self.last_saved = self.step if self.resumed else -1
        self.t_start = time.time()  # again when run() starts

    @property
    def max_steps(self) -> int:
        """The step the schedule ends at: the time budget's plan if any, else cfg.max_steps."""
        planned = self.budget.planned_steps
        return planned if planned is not None else self.cfg.max_steps

    def train_seconds(self) -> float:
        """Training time of the run so far, earlier invocations included."""
        return self.seconds_before + (time.time() - self.t_start)

    # ---- the loop --------------------------------------------------------------------------

    def run(self) -> str:
        """Train from the current step to ``max_steps``, or until a stop; returns why it ended.
        Any end but an exception leaves a checkpoint of the last step."""
        cfg = self.cfg
        end_reason = "finished"
        self.raw_model.train()
        with StopSignals() as signals, self._run_log() as log:
            self.t_start = time.time()
            while self.step < self.max_steps:
                if cfg.stop_at_step is not None and self.step >= cfg.stop_at_step:
                    end_reason = f"stopped at step {self.step} (--stop-at-step)"
                    break
                t0 = time.time()
                loss, grad_norm, lr = self.train_step()
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                self.last_loss = loss
                self._log_step(log, loss, grad_norm, lr, seconds=time.time() - t0)

                note = self.budget.after_step(self.step, self.start_step + 1, self.train_seconds())
                if note:
                    log.bar.total = self.max_steps
                    log.message(note)

                finished = self.step >= self.max_steps
                val_loss, is_best = self.evaluate_if_due(log, finished)
                interrupted = any_rank(bool(signals.received), self.dist, self.device)
                if self.checkpoint_due(finished, interrupted, is_best):
                    self.save(val_loss, is_best)
                if interrupted:
                    who = ", ".join(signals.received) or "signal on another rank"
                    end_reason = f"interrupted ({who}) at step {self.step}"
                    break
                if any_rank(self.budget.exceeded(self.train_seconds()), self.dist, self.device):
                    end_reason = f"time budget exceeded at step {self.step}"
                    break
                if self.patience and self.evals_since_best >= self.patience:
                    end_reason = (f"early stop at step {self.step}: no better validation loss "
                                  f"in {self.evals_since_best} evaluations")
                    break
            if self.last_saved != self.step:
                self.save()
        if end_reason == "finished" and self.step == self.start_step and self.resumed:
            end_reason = f"already at step {self.step} of {self.max_steps}"
        return end_reason

    def train_step(self) -> tuple[float, float, float]:
        """One optimiser step over the next micro-batches; returns (loss, grad norm, lr).
        Raises NonFiniteLoss, without applying the update, if either is NaN or infinite."""
        lr = lr_at(self.step, self.cfg, self.max_steps)
        set_lr(self.optimizers, lr)
        micro_batches = self.batches.next_batch()
        n = len(micro_batches)
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            x, y = (t.to(self.device, non_blocking=True) for t in scored_targets(batch))
            # Gradients are all-reduced across processes once per step, on the last micro-batch.
            with no_grad_sync(self.model, active=i < n - 1), self._autocast():
                _, loss = self.model(x, y)
            # The step's loss is the mean over its micro-batches (each the mean over its scored
            # targets), so equal-sized batches weigh as one big batch would.
            scaled = loss / n
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach().float()
        loss = all_reduce_mean(loss_sum / n, self.dist)
        if self.loss_hook is not None:
            loss = self.loss_hook(self.step, loss)

        if self.scaler:
            for opt in self.optimizers:
                self.scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip)
        loss_val, norm_val = float(loss), float(grad_norm)
        # Under fp16 the scaler skips steps with infinite gradients itself.
        if not (math.isfinite(loss_val) and (math.isfinite(norm_val) or self.scaler)):
            raise self._non_finite(loss_val, norm_val)

        for opt in self.optimizers:
            if self.scaler:
                self.scaler.step(opt)
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.update()
        return loss_val, norm_val, lr

    def evaluate_if_due(self, log: RunLog, finished: bool) -> tuple[float | None, bool]:
        """Every eval_interval steps and at the last one: evaluate, log, let the time budget
        re-plan. Returns (validation loss, whether it is the best so far), (None, False) when
        no evaluation was due."""
        if not (self.step % self.cfg.eval_interval == 0 or finished):
            return None, False
        result = self.evaluate()
        val_loss = result["val_loss"]
        is_best = val_loss < self.best_val
        self.best_val = min(self.best_val, val_loss)
        self.evals_since_best = 0 if is_best else self.evals_since_best + 1
        log.evaluation({"step": self.step, **result, "best_val_loss": self.best_val},
                       format_evaluation(self.step, result, is_best))
        if self.budget.after_evaluation(self.step, self.train_seconds()):
            log.bar.total = self.max_steps
        return val_loss, is_best

    def checkpoint_due(self, finished: bool, interrupted: bool, is_best: bool) -> bool:
        """Checkpoint every checkpoint_interval steps (default: eval_interval), at a new best
        validation loss, at the end, and before stopping for a signal or --stop-at-step."""
        every = self.cfg.checkpoint_interval or self.cfg.eval_interval
        return (self.step % every == 0 or finished or interrupted or is_best
                or self.step == self.cfg.stop_at_step)

    def save(self, val_loss: float | None = None, is_best: bool = False) -> Path:
        """Checkpoint the current step (collective: every process calls it)."""
        state = {
            "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds(),
            "best_val_loss": None if self.best_val == math.inf else self.best_val,
            "val_loss": val_loss, "planned_steps": self.budget.planned_steps,
            "evals_since_best": self.evals_since_best,
            "loader": self.batches.state_dict(),
            "schedule": {"name": self.cfg.schedule, "max_steps": self.max_steps,
                         "lr": lr_at(self.step, self.cfg, self.max_steps)},
            **self.checkpoint_facts,
        }
        if self.dist.enabled and not self.cfg.fsdp:
            state["param_checksum"] = check_ranks_in_sync(self.raw_model, self.comm_device)
        path = ckpt_io.save_checkpoint(self.run_dir, self.step, self.raw_model, self.optimizers,
                                       state, keep_last=self.cfg.keep_last, is_best=is_best)
        self.last_saved = self.step
        return path

    # ---- helpers ---------------------------------------------------------------------------

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _run_log(self) -> RunLog:
        # Under a time budget the length is known only after calibration: no bogus ETA until then.
        unplanned = self.budget.minutes and self.budget.planned_steps is None
        return RunLog(self.run_dir, main=self.dist.is_main,
                      resume_step=self.step if self.resumed else None,
                      total=None if unplanned else self.max_steps, initial=self.step,
                      progress=self.cfg.progress, tensorboard=self.cfg.tensorboard,
                      plot=self.cfg.plot, title=f"{self.run_dir.name} ({self.cfg.preset})")

    def _log_step(self, log: RunLog, loss: float, grad_norm: float, lr: float,
                  seconds: float) -> None:
        tokens_per_s = self.tokens_per_step / seconds
        mfu = self.flops_per_token * tokens_per_s / self.peak_flops if self.peak_flops else None
        record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens": self.tokens_seen, "tokens_per_s": round(tokens_per_s, 1),
                  "epoch": round(self.batches.epoch, 4)}
        if mfu is not None:
            record["mfu"] = round(mfu, 4)
        log.step(record, format_postfix(loss, lr, tokens_per_s, mfu))

    def _non_finite(self, loss: float, grad_norm: float) -> NonFiniteLoss:
        last = reader.latest_checkpoint(self.run_dir)
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        advice = (f"Last good checkpoint: {last}; resume with --resume and a lower --lr" if last
                  else "No checkpoint was written yet; try a lower --lr")
        return NonFiniteLoss(f"non-finite {what} at step {self.step + 1} (loss {loss}, grad norm "
                             f"{grad_norm}); stopped without applying it. {advice}")
