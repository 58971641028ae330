"""Whether ``torch.compile`` pays back within a run: measured, never assumed.

Compiling makes each step faster (13% for `small` on the README's 2-core CPU) but costs
seconds up front (~25 s there), so whether it pays depends on how many steps follow and on
the machine. The loop therefore measures, in the first steps of each invocation:

  1. the first step runs eager and untimed (it pays one-off costs: allocator, thread pool);
  2. the second and third run eager, timed: ``eager_s`` is the faster of the two;
  4. the fourth runs compiled: its time is the compilation plus a step;
  5. the fifth and sixth run compiled, timed: ``compiled_s`` is the faster of the two; the
     compilation took the fourth step's time minus ``compiled_s``.

One step alone is not enough on a shared machine: a single slow sample once made a compiled
step look 1.5x slower than eager when it was 1.6x faster (docs/experiments.md).
and then keeps the faster of the two for the rest of the run, saying so in one line. The
measurement is remembered per machine and model shape (``~/.cache/gpt-model/compile.json``),
so that a later run whose remaining steps cannot pay the compilation back (a short time budget,
a resume near the end) does not compile at all. Before anything was measured on a machine, a
run compiles (the default) and measures.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from src.utils.atomic import write_json_atomic
from src.utils.device import cpu_description

EAGER_STEPS = (2, 3)  # 1-based steps of an invocation timed eager (see the module docstring)
COMPILE_STEP = 4  # the step that compiles
COMPILED_STEPS = (5, 6)  # timed compiled
PROBE_STEPS = COMPILED_STEPS[-1]  # steps of an invocation the measurement takes


def cache_file() -> Path:
    """Where measurements are remembered: $XDG_CACHE_HOME (or ~/.cache)/gpt-model/compile.json."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "gpt-model" / "compile.json"


def read_measurements() -> dict[str, dict[str, float]]:
    """Every remembered measurement; {} when there are none or the file is unreadable (it is
    only a hint, never a reason to stop a run)."""
    try:
        data = json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def machine_key(device: torch.device, amp_dtype: torch.dtype | None, model_config: dict,
                micro_batch: str) -> str:
    """What a measurement holds for: torch, the machine, precision, micro-batch and model."""
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = cpu_description() if device.type == "cpu" else device.type
    shape = hashlib.sha256(json.dumps(model_config, sort_keys=True).encode()).hexdigest()[:12]
    return (f"torch {torch.__version__} | {machine} | {amp_dtype or torch.float32} | micro-batch "
            f"{micro_batch} | model {shape}")


def pays_back(eager_s: float, compiled_s: float, compile_s: float, steps_left: float) -> bool:
    """Whether compiling saves more than it costs over ``steps_left`` steps."""
    return (eager_s - compiled_s) * steps_left > compile_s


class CompileChoice:
    """Which module runs the next training step: ``eager`` or ``compiled`` (None: compiling is
    off, and eager always runs). ``key`` names the machine and model shape the measurement
    holds for. Call :meth:`module` before each step and :meth:`after_step` after it."""

    def __init__(self, eager: torch.nn.Module, compiled: torch.nn.Module | None, key: str,
                 steps_left: Callable[[float], float | None]) -> None:
        self.eager, self.compiled, self.key = eager, compiled, key
        self.steps_left = steps_left  # (seconds per step) -> steps this invocation still runs
        self.chosen: torch.nn.Module | None = None if compiled is not None else eager
        self.done = 0  # steps of this invocation so far
        self.eager_s = self.first_compiled_s = self.compiled_s = None

    @property
    def probing(self) -> bool:
        """Whether the measurement is under way (its steps are not representative)."""
        return self.chosen is None

    @property
    def steps_measured(self) -> int:
        """Steps of this invocation that a time budget must not calibrate on."""
        return PROBE_STEPS if self.first_compiled_s is not None else 1

    def module(self) -> torch.nn.Module:
        if self.chosen is not None:
            return self.chosen
        return self.eager if self.done < COMPILE_STEP - 1 else self.compiled

    def after_step(self, seconds: float) -> str | None:
        """Record a step's seconds; returns a line to log when the choice is made."""
        self.done += 1
        if self.chosen is not None:
            return None
        if self.done in EAGER_STEPS:
            self.eager_s = seconds if self.eager_s is None else min(self.eager_s, seconds)
        if self.done == EAGER_STEPS[0]:
            known = read_measurements().get(self.key)
            left = self.steps_left(seconds)
            # Only a measurement where compiling was faster can rule it out for a short run: one
            # where it was slower may have been disturbed, and measuring again costs one compile.
            if known and known["compiled_s"] < known["eager_s"] and left is not None:
                # The machine's load may differ from then: scale by the measured speed-up, not
                # by the seconds measured then.
                compiled_s = seconds * known["compiled_s"] / known["eager_s"]
                if not pays_back(seconds, compiled_s, known["compile_s"], left):
                    self.chosen = self.eager
                    return (f"torch.compile skipped: it took {known['compile_s']:.0f} s here "
                            f"before and would save {max(seconds - compiled_s, 0):.2f} s x "
                            f"~{left:.0f} steps left")
        elif self.done == COMPILE_STEP:
            self.first_compiled_s = seconds
        elif self.done in COMPILED_STEPS:
            self.compiled_s = seconds if self.compiled_s is None else min(self.compiled_s, seconds)
            if self.done == COMPILED_STEPS[-1]:
                return self._choose()
        return None

    def _choose(self) -> str:
        compile_s = max(self.first_compiled_s - self.compiled_s, 0.0)
        self._remember(self.eager_s, self.compiled_s, compile_s)
        faster = self.compiled_s < self.eager_s
        self.chosen = self.compiled if faster else self.eager
        return (f"torch.compile: compiled in {compile_s:.0f} s; {self.compiled_s:.2f} s/step "
                f"compiled vs {self.eager_s:.2f} eager -> training {'compiled' if faster else 'eager'}")

    def _remember(self, eager_s: float, compiled_s: float, compile_s: float) -> None:
        measurements = read_measurements()
        measurements[self.key] = {"eager_s": round(eager_s, 4), "compiled_s": round(compiled_s, 4),
                                  "compile_s": round(compile_s, 2)}
        with contextlib.suppress(OSError):  # a read-only home: the next run measures again
            write_json_atomic(cache_file(), measurements)
