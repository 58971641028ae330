"""The training loop: optimiser steps until the schedule ends, a signal arrives or time is up.

One iteration of :meth:`TrainLoop.run`, top to bottom::

    train_step          lr from the schedule; forward + backward over the step's micro-batches
                        (gradients accumulate, synchronised across processes on the last);
                        a finite-loss guard; gradient clipping; the optimiser update
    log                 metrics.jsonl, TensorBoard, progress bar (tokens/s, ETA)
    time budget         plans max_steps once the speed is measured (src/training/time_budget.py)
    evaluate_if_due     every eval_interval steps and at the end; the time budget re-plans;
                        early stopping counts evaluations without a better validation loss
    checkpoint_due      every checkpoint_interval steps, at a new best, at the end, on a stop
                        (a failed write warns and is retried at the next; see save)
    stop?               Ctrl-C / SIGTERM (caught by StopSignals), --stop-at-step, budget overrun,
                        early stop (``early_stop_patience`` evaluations in a row without a new
                        best; the best checkpoint is the one to use, marked ``best``); a signal
                        also stops a step between micro-batches (the step is dropped) and skips
                        or abandons an evaluation; a second one exits at once

The loop is independent of what it trains on: ``batches`` is any BatchSource (pretraining:
BatchLoader over train.bin; a fine-tuning stage: masked conversation batches), ``evaluate`` any
function returning at least ``val_loss``. Building the model, the data and the run folder is
src/training/trainer.py's job.

Exact resume: a checkpoint holds the weights, the optimiser, every RNG (src/training/checkpoint.py)
and the loop's own state, written by :meth:`TrainLoop.save` and read back by
:meth:`TrainLoop.__init__` from ``resume_state``: step, tokens seen, training seconds, best
validation loss (and its step), evaluations since it, the time budget's plan and the batch
source's position.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from src import checkpoint as reader
from src.training import checkpoint as ckpt_io
from src.training.batches import BatchSource, scored_targets
from src.training.compile_choice import CompileChoice, machine_key
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


class CheckpointNotSaved(UserError):
    """The run's last checkpoint, or MAX_FAILED_SAVES in a row, could not be written (e.g. the
    disk is full): the run stops; the earlier checkpoints are intact."""


MAX_FAILED_SAVES = 3  # failed checkpoint writes in a row before a run gives up


class Interrupted(KeyboardInterrupt):
    """A second Ctrl-C / SIGTERM: the run stops at once; the message says what was saved."""


class StopNow(Exception):
    """Raised by :class:`StopSignals` inside :meth:`StopSignals.interruptible` code (an
    evaluation): its result is not needed once the run is stopping, so it is abandoned."""


class StopSignals:
    """While entered, SIGINT (Ctrl-C) and SIGTERM are noted in ``received`` instead of killing
    the process: the loop then stops at the end of the current micro-batch, checkpoints the last
    completed step and returns. A second signal raises :class:`Interrupted` at once, with the
    message ``describe()`` gives (what was and was not saved)."""

    def __init__(self, describe: Callable[[], str]) -> None:
        self.describe = describe
        self._interruptible = False

    def __enter__(self) -> StopSignals:
        self.received: list[str] = []
        self._previous = {s: signal.signal(s, self._note) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @contextmanager
    def interruptible(self):
        """Code inside may be abandoned by the first signal (StopNow is raised in it)."""
        self._interruptible = True
        try:
            if self.received:
                raise StopNow
            yield
        finally:
            self._interruptible = False

    def _note(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self.received:
            raise Interrupted(f"second {name}: stopped at once; {self.describe()}")
        self.received.append(name)
        if self._interruptible:
            self._interruptible = False
            raise StopNow


class TrainLoop:
    """Trains ``model`` on ``batches`` as ``cfg`` says (schedule, clipping, evaluation and
    checkpoint intervals, time budget, stop_at_step), in the run folder ``cfg.run_dir``.

    ``model`` is what the forward pass runs (DDP-wrapped or not); ``compiled``, if given, the
    same under torch.compile, used once measured faster (src/training/compile_choice.py);
    ``raw_model`` the module underneath, which is clipped, evaluated and saved. ``model(x, y)`` returns
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
        compiled: torch.nn.Module | None = None,
        optimizers: list[torch.optim.Optimizer],
        batches: BatchSource,
        evaluate: Callable[[], dict[str, float]],
        eval_tokens: int,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
        dist: DistInfo | None = None,
        checkpoint_facts: dict[str, Any] | None = None,
        resume_state: dict[str, Any] | None = None,
        loss_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.cfg, self.run_dir = cfg, Path(cfg.run_dir)
        self.raw_model, self.optimizers = raw_model, optimizers
        self.batches, self.evaluate = batches, evaluate
        self.device, self.amp_dtype, self.dist = device, amp_dtype, dist or DistInfo()
        self.checkpoint_facts = checkpoint_facts or {}
        self.loss_hook = loss_hook
        # fp16 needs loss scaling (its range is too small for small gradients); bf16 does not.
        self.scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        self.comm_device = device if device.type == "cuda" else torch.device("cpu")  # NCCL: CUDA
        self.tokens_per_step = batches.tokens_per_step
        self.flops_per_token = raw_model.flops_per_token()
        self.peak_flops = peak_flops(device, cfg.peak_tflops, amp_dtype)

        # Progress, continued from the checkpoint when resuming.
        state = resume_state or {}
        self.resumed = resume_state is not None
        self.step = self.start_step = state.get("step", 0)
        self.tokens_seen = state.get("tokens_seen", 0)
        self.seconds_before = state.get("train_seconds", 0.0)  # of earlier invocations
        self.best_val = state.get("best_val_loss") or math.inf
        self.best_step = state.get("best_step")
        self.evals_since_best = state.get("evals_since_best", 0)
        if "loader" in state:
            batches.load_state_dict(state["loader"])
        micro_batch = f"{cfg.batch_size}x{raw_model.config.context_length}"
        self.compile_choice = CompileChoice(
            model, compiled, machine_key(device, amp_dtype, raw_model.config.to_dict(), micro_batch),
            steps_left=self._steps_left)
        self.budget = TimeBudget(
            cfg.time_budget, max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps,
            eval_interval=cfg.eval_interval, eval_tokens=eval_tokens,
            tokens_per_step=self.tokens_per_step, planned_steps=state.get("planned_steps"),
            sync=lambda n: int(broadcast_str(str(n), self.dist, self.comm_device)),
        )
        self.last_loss = math.nan
        self.last_saved = self.step if self.resumed else -1
        self.failed_saves = 0  # checkpoint writes failed in a row (see save)
        self.t_start = time.time()  # again when run() starts

    def _steps_left(self, seconds_per_step: float) -> float:
        """Steps this invocation will still run: those the time budget leaves, else the plan's."""
        if self.budget.minutes:
            return max(self.budget.minutes * 60 - self.train_seconds(), 0.0) / seconds_per_step
        return float(self.max_steps - self.step)

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
        with StopSignals(self._saved_so_far) as signals, self._run_log() as log:
            self.t_start = time.time()
            if self.stopped_early:  # resumed after an early stop: nothing left to do
                return f"already stopped early at step {self.step}{self._best_text()}"
            while self.step < self.max_steps:
                if cfg.stop_at_step is not None and self.step >= cfg.stop_at_step:
                    end_reason = f"stopped at step {self.step} (--stop-at-step)"
                    break
                t0 = time.time()
                done = self.train_step(signals, log)
                if done is None:
                    end_reason = (f"interrupted ({', '.join(signals.received)}) at step {self.step}; "
                                  f"step {self.step + 1}, in progress, was dropped")
                    break
                loss, grad_norm, lr = done
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                self.last_loss = loss
                seconds = time.time() - t0
                self._log_step(log, loss, grad_norm, lr, seconds=seconds)
                note = self.compile_choice.after_step(seconds)
                if note:
                    log.message(note)

                # The time budget calibrates on steps after the compile measurement.
                first_timed = self.start_step + self.compile_choice.steps_measured
                note = self.budget.after_step(self.step, first_timed, self.train_seconds())
                if note:
                    log.bar.total = self.max_steps
                    log.message(note)

                finished = self.step >= self.max_steps
                val_loss, is_best = self.evaluate_if_due(log, finished, signals)
                interrupted = any_rank(bool(signals.received), self.dist, self.device)
                if self.checkpoint_due(finished, interrupted or self.stopped_early, is_best):
                    self.save(val_loss, is_best)
                if self.stopped_early:
                    end_reason = (f"early stop at step {self.step}: no better val loss in "
                                  f"{self.evals_since_best} evaluations{self._best_text()}")
                    break
                if interrupted:
                    who = ", ".join(signals.received) or "signal on another rank"
                    end_reason = f"interrupted ({who}) at step {self.step}"
                    break
                if any_rank(self.budget.exceeded(self.train_seconds()), self.dist, self.device):
                    end_reason = f"time budget exceeded at step {self.step}"
                    break
            if self.last_saved != self.step and self.step > 0:  # step 0: nothing trained to keep
                self.save(final=True)
        if end_reason == "finished" and self.step == self.start_step and self.resumed:
            end_reason = f"already at step {self.step} of {self.max_steps}"
        return end_reason

    def train_step(self, signals: StopSignals | None = None,
                   log: RunLog | None = None) -> tuple[float, float, float] | None:
        """One optimiser step over the next micro-batches; returns (loss, grad norm, lr).
        Raises NonFiniteLoss, without applying the update, if either is NaN or infinite.

        A stop signal (``signals``) that arrives between two micro-batches of a single-process
        run drops the step: its gradients, data position and dropout draws are undone, so the
        run stands exactly at the end of the last completed step, and None is returned. (Under
        torchrun every process must finish the step together: it stops at the step's end.)
        ``log``'s progress bar moves with each micro-batch."""
        lr = lr_at(self.step, self.cfg, self.max_steps)
        set_lr(self.optimizers, lr)
        droppable = signals is not None and not self.dist.enabled
        if droppable:
            position, rng = self.batches.state_dict(), _torch_rng_state(self.device)
        micro_batches = self.batches.next_batch()
        n = len(micro_batches)
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            if droppable and i > 0 and signals.received:
                for opt in self.optimizers:
                    opt.zero_grad(set_to_none=True)
                self.batches.load_state_dict(position)
                _set_torch_rng_state(rng, self.device)
                return None
            if log is not None and i > 0:
                log.micro_batch(self.step, i / n)
            x, y = (t.to(self.device, non_blocking=True) for t in scored_targets(batch))
            # Gradients are all-reduced across processes once per step, on the last micro-batch.
            model = self.compile_choice.module()
            with no_grad_sync(model, active=i < n - 1), self._autocast():
                _, loss = model(x, y)
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

    def evaluate_if_due(self, log: RunLog, finished: bool,
                        signals: StopSignals | None = None) -> tuple[float | None, bool]:
        """Every eval_interval steps and at the last one: evaluate, log, let the time budget
        re-plan. Returns (validation loss, whether it is the best so far), (None, False) when
        no evaluation was due, or when a stop signal came before or during it (single process:
        a stopping run does not wait for an evaluation)."""
        if not (self.step % self.cfg.eval_interval == 0 or finished):
            return None, False
        if signals is not None and not self.dist.enabled:
            try:
                with signals.interruptible():
                    result = self.evaluate()
            except StopNow:
                log.message(f"step {self.step}: evaluation skipped (stopping)")
                return None, False
        else:
            result = self.evaluate()
        val_loss = result["val_loss"]
        is_best = val_loss < self.best_val
        self.best_val = min(self.best_val, val_loss)
        if is_best:
            self.best_step, self.evals_since_best = self.step, 0
        else:
            self.evals_since_best += 1
        log.evaluation({"step": self.step, **result, "best_val_loss": self.best_val},
                       format_evaluation(self.step, result, is_best))
        if self.budget.after_evaluation(self.step, self.train_seconds()):
            log.bar.total = self.max_steps
        return val_loss, is_best

    @property
    def stopped_early(self) -> bool:
        """Whether ``early_stop_patience`` evaluations in a row brought no better val loss. The
        decision is the same on every process: they all evaluate the same validation set."""
        patience = self.cfg.early_stop_patience
        return patience is not None and self.evals_since_best >= patience

    def _best_text(self) -> str:
        if self.best_step is None:
            return ""
        return f" (best val loss {self.best_val:.4f} at step {self.best_step}, checkpoint marked best)"

    def checkpoint_due(self, finished: bool, interrupted: bool, is_best: bool) -> bool:
        """Checkpoint every checkpoint_interval steps (default: eval_interval), at a new best
        validation loss, at the end, and before stopping for a signal or --stop-at-step."""
        every = self.cfg.checkpoint_interval or self.cfg.eval_interval
        return (self.step % every == 0 or finished or interrupted or is_best
                or self.step == self.cfg.stop_at_step)

    def save(self, val_loss: float | None = None, is_best: bool = False, *,
             final: bool = False) -> Path | None:
        """Checkpoint the current step (collective: every process calls it). Returns the folder,
        or None when the write failed (a full disk, an I/O error): the previous checkpoints are
        untouched and training goes on, retrying at the next checkpoint, with a warning. The
        ``final`` save of a run, or the MAX_FAILED_SAVES-th failure in a row, raises
        CheckpointNotSaved instead: a run that cannot save should not burn compute for long."""
        state = {
            "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds(),
            "best_val_loss": None if self.best_val == math.inf else self.best_val,
            "best_step": self.best_step, "evals_since_best": self.evals_since_best,
            "val_loss": val_loss, "planned_steps": self.budget.planned_steps,
            "loader": self.batches.state_dict(),
            "schedule": {"name": self.cfg.schedule, "max_steps": self.max_steps,
                         "lr": lr_at(self.step, self.cfg, self.max_steps)},
            **self.checkpoint_facts,
        }
        if self.dist.enabled and not self.cfg.fsdp:
            state["param_checksum"] = check_ranks_in_sync(self.raw_model, self.comm_device)
        error: OSError | None = None
        try:
            path = ckpt_io.save_checkpoint(self.run_dir, self.step, self.raw_model, self.optimizers,
                                           state, keep_last=self.cfg.keep_last, is_best=is_best)
        except OSError as exc:
            error = exc
        if not any_rank(error is not None, self.dist, self.device):
            self.last_saved, self.failed_saves = self.step, 0
            return path
        self.failed_saves += 1
        last = reader.latest_checkpoint(self.run_dir)
        what = (f"could not save checkpoint {reader.checkpoint_name(self.step)} "
                f"({error.strerror or error if error else 'failed on another process'})")
        kept = f"{last} is intact" if last else "no earlier checkpoint exists"
        if final or self.failed_saves >= MAX_FAILED_SAVES:
            resume = f"python train.py --run-dir {self.run_dir} --resume"
            raise CheckpointNotSaved(f"{what}; {kept}: free space (or fix the disk), then `{resume}`")
        if self.dist.is_main:
            print(f"warning: {what}; {kept}; training goes on and retries at the next checkpoint "
                  f"({self.failed_saves} of {MAX_FAILED_SAVES} failures in a row allowed)",
                  file=sys.stderr, flush=True)
        return None

    # ---- helpers ---------------------------------------------------------------------------

    def _saved_so_far(self) -> str:
        """What a run stopped at once leaves: its last checkpoint, and what is not in it."""
        last = reader.latest_checkpoint(self.run_dir)
        if last is None:
            return f"nothing saved (no checkpoint yet); {self.step} steps trained are lost"
        saved = reader.read_state(last)["step"]
        done = f"steps {saved + 1}-{self.step} and " if self.step > saved else ""
        return f"last checkpoint {last} (step {saved}); {done}step {self.step + 1} (in progress) not saved"

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


def _torch_rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The torch RNG states a training step draws from (dropout): CPU, and the GPU's."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_torch_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
