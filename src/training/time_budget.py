"""Fitting a run into a time budget (``--time-budget`` minutes): how many steps to plan for.

The number of steps a machine manages in N minutes is known only once it has run a few, so:

  1. the first step of an invocation is not timed (it pays one-off costs: compilation,
     allocator and cache warm-up);
  2. after CALIBRATION_STEPS more, ``max_steps`` is planned from their average time, plus the
     share of evaluations to come, minus BUDGET_RESERVE of the budget for checkpoints;
  3. at each evaluation the plan is revised from the average since the last plan, that
     evaluation included, so the run ends near its budget even when the first steps were
     slower or faster than the rest (compilation, a busy machine). Not past REPLAN_UNTIL of
     the plan, so the learning-rate decay, once under way, keeps its course;
  4. a run more than 10% over its budget stops (with a checkpoint).

The plan is saved in checkpoints (``planned_steps``) and holds across resumes. Seconds here are
training seconds: those of this invocation plus those of earlier ones (saved in checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable

# Share of a time budget kept for checkpoints and the final save (evaluations are planned for
# separately). 4% left ~35 s of a 15-minute quickstart unused; its checkpoints take a few.
BUDGET_RESERVE = 0.02
CALIBRATION_STEPS = 5  # steps timed (after the first) before a time budget plans max_steps
REPLAN_UNTIL = 0.8  # a time budget's plan is revised at evaluations until this share of it
OVERRUN = 1.1  # a run this many times over its budget stops


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


class TimeBudget:
    """The time budget of a run: ``planned_steps`` (None until planned, and always None when
    ``minutes`` is None or 0: then the budget is off and every method does nothing).

    ``sync`` makes a plan the same on every process (rank 0's), as their clocks differ.
    """

    def __init__(self, minutes: float | None, *, max_steps: int, warmup_steps: int,
                 eval_interval: int, eval_tokens: int, tokens_per_step: int,
                 planned_steps: int | None = None, sync: Callable[[int], int] = int) -> None:
        self.minutes = minutes or None
        self.planned_steps = planned_steps if self.minutes else None
        self.max_steps, self.warmup_steps = max_steps, warmup_steps
        self.eval_interval, self.eval_tokens = eval_interval, eval_tokens
        self.tokens_per_step = tokens_per_step
        self.sync = sync
        self._since: tuple[int, float] | None = None  # (step, seconds) the speed is measured from

    def after_step(self, step: int, first_step: int, spent: float) -> str | None:
        """Call after each optimiser step (``first_step``: the first of this invocation) with the
        training seconds ``spent``. Plans once calibrated, unless a plan exists (a resumed
        run keeps its own); returns a line saying so then, else None."""
        if not self.minutes:
            return None
        if step == first_step:
            self._since = (step, spent)  # the first step pays one-off costs: not timed
        elif self.planned_steps is None and step == first_step + CALIBRATION_STEPS:
            # The evaluations to come were not measured yet: their cost is estimated.
            per_step = self._plan(step, spent, unmeasured_eval_tokens=self.eval_tokens)
            return (f"time budget {self.minutes:g} min: {per_step:.2f} s/step -> "
                    f"planned {self.planned_steps} steps")
        return None

    def after_evaluation(self, step: int, spent: float) -> bool:
        """Call after each evaluation: re-plans from the speed since the last plan (the
        evaluation's cost included, hence measured), while in the first REPLAN_UNTIL of the
        plan. Returns whether it re-planned."""
        if self.planned_steps is None or self._since is None:
            return False
        if not self._since[0] < step < REPLAN_UNTIL * self.planned_steps:
            return False
        self._plan(step, spent, unmeasured_eval_tokens=0)
        return True

    def exceeded(self, spent: float) -> bool:
        """Whether the run is so far over its budget that it must stop now."""
        return bool(self.minutes) and spent > self.minutes * 60 * OVERRUN

    def _plan(self, step: int, spent: float, unmeasured_eval_tokens: int) -> float:
        """Set ``planned_steps`` from the average step time since ``_since``; returns it."""
        since_step, since_spent = self._since
        per_step = (spent - since_spent) / (step - since_step)
        self._since = (step, spent)
        planned = plan_steps(step, per_step, unmeasured_eval_tokens, self.tokens_per_step,
                             self.eval_interval, spent, self.minutes * 60, self.warmup_steps,
                             self.max_steps)
        self.planned_steps = self.sync(planned)
        return per_step
