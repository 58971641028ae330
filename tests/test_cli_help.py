"""--help texts: every flag described, each default shown once, and train.py's help is fast."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from src.data import prepare_data
from src.training import config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("build_parser", [config.build_parser, prepare_data.build_parser],
                         ids=["train.py", "prepare_data.py"])
def test_every_flag_has_a_description_and_one_default(build_parser):
    parser = build_parser()
    for action in parser._actions:
        assert action.help and action.help.strip(), f"{action.option_strings} has no description"
    text = parser.format_help()
    # One entry per flag (from its first line to the next flag): "default" at most once.
    entries = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    for entry in entries:
        assert entry.count("default") <= 1, entry
        assert "(default: None)" not in entry and "(default: [])" not in entry, entry


def test_train_help_does_not_import_torch():
    # torch takes seconds to import; --help (and a bad flag) must not wait for it.
    code = ("import runpy, sys\nsys.argv = ['train.py', '--help']\n"
            "try:\n    runpy.run_path('train.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('torch imported:', 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--lr X" in done.stdout and "peak learning rate" in done.stdout
    assert done.stdout.strip().endswith("torch imported: False")
