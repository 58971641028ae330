"""Fine-tune a pretrained run into a chat model: ``python finetune.py``.

    python finetune.py --data-dir ../shared/data            # newest pretraining run, DailyDialog
    python finetune.py --from runs/small-... --data my_chats.jsonl
    python finetune.py --run-dir runs/<name>-sft-<time> --resume   # continue exactly
    torchrun --nproc_per_node=4 finetune.py --from runs/gpt-60m-...  # data-parallel
    python finetune.py --help                                # every setting, with its default

Writes a new run, runs/<base>-sft-<time>/, that chat.py, generate.py and evaluate.py load like
any run; its finetune.json records the base run and the data. The loss is on the assistant's
tokens only. The stage is set up in src/training/finetune.py and trained by the same loop as
pretraining (src/training/loop.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the repository root

from src.training.finetune import finetune, parse_args
from src.utils.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    stage, explicit = parse_args(argv)  # every setting checked before any work starts
    finetune(stage, explicit)
    return 0


if __name__ == "__main__":
    run_cli(main)
