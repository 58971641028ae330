"""List the training runs: ``python runs.py`` (or ``--runs DIR``).

For each run under runs/: its preset, step, best validation loss, tokens seen and date, and a
``*`` on the one chat.py, generate.py and evaluate.py load when no ``--run`` is given. The
library code is src/checkpoint/runs.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the repository root

from src.checkpoint.runs import format_runs, summarize_runs
from src.utils.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="List the training runs and which one chat.py would load.")
    parser.add_argument("--runs", default="runs", help="the folder of runs (default: runs)")
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    print(format_runs(summarize_runs(runs), runs))
    return 0


if __name__ == "__main__":
    run_cli(main)
