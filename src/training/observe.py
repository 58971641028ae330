"""What a training run shows and records: progress bar, metrics.jsonl, TensorBoard, loss plot.

* ``metrics.jsonl``: one JSON object per line; every optimiser step writes ``step``, ``loss``,
  ``lr``, ``tokens`` (seen so far), ``tokens_per_s`` (and ``mfu`` where the peak is known);
  evaluations add a line with ``val_loss``, ``val_ppl``, ``val_bpb``. On resume, lines past the
  checkpoint's step (written before a crash) are dropped so the file tells one consistent story;
  so are damaged lines (with one warning).
* TensorBoard event files in ``<run>/tensorboard`` when the package is installed.
* ``loss.png``: training and validation loss against step, redrawn at each evaluation.

:class:`RunLog` puts them together for the training loop.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from src.utils.atomic import atomic_path, write_text_atomic
from src.utils.cli import UserError
from src.utils.device import matmul_flops
from src.utils.integrity import file_problem

# Dense bf16 peak (FLOP/s) of common accelerators, for MFU. Matched on the device name.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is lower (756e12): pass --peak-tflops to be exact
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def peak_flops(device: torch.device, override_tflops: float | None = None,
               dtype: torch.dtype | None = None) -> float | None:
    """The device's peak FLOP/s for MFU, or None when unknown (unlisted GPUs, MPS). A GPU's is
    its bf16 spec; a CPU's is measured: a large matrix multiply in the training precision
    ``dtype`` (None: fp32), as no spec says what a given CPU's cores deliver."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cpu":
        return matmul_flops(dtype or torch.float32)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_BF16_FLOPS.items():
            if key in name:
                return value
    return None


class MetricsLog:
    """Append-only ``metrics.jsonl`` plus the in-memory history the loss plot is drawn from."""

    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        problem = file_problem(self.path) if self.path.exists() else None
        if problem:
            raise UserError(f"{self.path.parent}: {problem}; move it out of the way, then start again")
        if resume_step is not None and self.path.is_file():
            *lines, partial = self.path.read_bytes().decode("utf-8", errors="replace").split("\n")
            damaged = 0  # a last line without its newline was cut short by kill -9: not damage
            for line in lines:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    damaged += 1
                    continue
                if isinstance(rec, dict) and rec.get("step", math.inf) <= resume_step:
                    self.records.append(rec)
            if damaged:
                print(f"warning: {self.path}: dropped {damaged} damaged line(s); its other "
                      f"{len(self.records)} lines up to step {resume_step} are kept",
                      file=sys.stderr, flush=True)
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        elif self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoard:
    """SummaryWriter when tensorboard is installed and wanted; otherwise does nothing."""

    def __init__(self, log_dir: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
            self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_losses(records: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Draw training loss (and its running mean) and validation loss against step to a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe in threads/servers
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train")
        k = max(1, len(losses) // 50)
        if k > 1:
            smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))]
            ax.plot(steps, smooth, color="tab:blue", linewidth=1.5, label=f"train (mean of {k})")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", color="tab:orange", linewidth=1.5, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def progress_bar(total: int | None, initial: int, enabled: bool) -> tqdm:
    """A tqdm bar over optimiser steps on stderr (its ETA is tqdm's)."""
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                file=sys.stderr, mininterval=0.5, smoothing=0.1)


def format_evaluation(step: int, result: dict[str, float], is_best: bool) -> str:
    """The line an evaluation prints: loss, and perplexity and bits per byte when measured."""
    text = f"step {step}: val loss {result['val_loss']:.4f}"
    if "val_ppl" in result:
        text += f", ppl {result['val_ppl']:.2f}"
    if "val_bpb" in result:
        text += f", {result['val_bpb']:.4f} bits/byte"
    return text + (" (best)" if is_best else "")


def format_postfix(loss: float, lr: float, tokens_per_s: float, mfu: float | None) -> str:
    text = f"loss {loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s"
    if mfu is not None:
        text += f" mfu {100 * mfu:.1f}%"
    return text


class RunLog:
    """What the training loop shows and records: each step and evaluation goes to
    metrics.jsonl and TensorBoard, each evaluation redraws the loss plot (on the main process
    only), and the progress bar shows steps, tokens/s and the ETA.

    ``resume_step``: the step a resumed run continues from (later lines of metrics.jsonl are
    dropped), None for a fresh run. ``total``: steps planned (None: not known yet, no ETA).
    """

    def __init__(self, run_dir: Path, *, main: bool, resume_step: int | None, total: int | None,
                 initial: int, progress: bool, tensorboard: bool, plot: bool, title: str) -> None:
        self.main = main
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step) if main else None
        self.tensorboard = TensorBoard(run_dir / "tensorboard", tensorboard and main)
        self.plot_path = run_dir / "loss.png" if plot and main else None
        self.title = title
        self.bar = progress_bar(total, initial, progress and main)

    def step(self, record: dict[str, Any], postfix: str) -> None:
        self._record(record)
        self._advance(record["step"])
        self.bar.set_postfix_str(postfix, refresh=False)

    def micro_batch(self, step: int, fraction: float) -> None:
        """Move the bar within an accumulated step (``fraction`` of step ``step + 1`` done):
        a step of many micro-batches can take minutes."""
        self._advance(step + fraction)

    def _advance(self, position: float) -> None:
        self.bar.update(position - self.bar.n)  # tqdm's rate and ETA follow its updates
        if float(position).is_integer():
            self.bar.n = int(position)  # shown as "3/200", not "3.0/200"

    def evaluation(self, record: dict[str, Any], summary: str) -> None:
        self._record(record)
        if self.plot_path is not None:
            plot_losses(self.metrics.records, self.plot_path, title=self.title)
        self.message(summary)

    def message(self, text: str) -> None:
        """A line above the progress bar (main process only)."""
        if self.main:
            self.bar.write(text)

    def _record(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.log(record)
        self.tensorboard.log(record)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        self.tensorboard.close()
