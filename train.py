"""Train the GPT: ``python train.py`` (the CPU quickstart) or with a preset and options.

    python train.py                                   # preset small, data/, ~15 minutes on a CPU
    python train.py --preset tiny --max-steps 200     # seconds: a smoke test
    python train.py --run-dir runs/my-run --resume    # continue exactly where it stopped
    torchrun --nproc_per_node=4 train.py --preset gpt-60m   # data-parallel (DDP; --fsdp: FSDP2)
    python train.py --preset gpt-60m --plan           # params, tokens, epochs, time: one JSON line
    python train.py --help                            # every setting, with its default

The data comes from ``python src/data/prepare_data.py`` (token files in data/). Each run gets a
folder under runs/ with its config, a copy of the tokenizer, metrics.jsonl, loss.png,
TensorBoard events and checkpoints (see src/training/checkpoint.py). The set-up is in
src/training/trainer.py and the loop itself in src/training/loop.py, each read top to bottom.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the repository root

from src.training.config import plan_requested, resolve_config
from src.utils.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    cfg, explicit = resolve_config(argv)  # every setting validated before any work starts
    # Imported after parsing: torch takes seconds to import, and --help or a bad flag needs none.
    from src.training.trainer import resolve_for_resume, train

    cfg = resolve_for_resume(cfg, explicit)  # --resume: the run's saved config + what is given now
    if plan_requested(argv):  # the plan only: no model built, nothing written
        from src.training.plan import plan_from_data

        print(plan_from_data(cfg).to_json())
        return 0
    train(cfg)
    return 0


if __name__ == "__main__":
    run_cli(main)
