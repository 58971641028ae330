"""The one-way rooms of docs/architecture.md hold: import-linter's contracts (pyproject.toml)
pass on the source tree, and the contracts really catch an upward import and a cycle."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """Run import-linter on the tree at ``root`` (its own process: the import graph is built from
    the files on disk, never from modules this test process already imported)."""
    code = "import sys, importlinter.cli as c; sys.exit(c.lint_imports(no_cache=True, no_logo=True))"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_source_tree_keeps_every_contract():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def _copy_tree(tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "src", copy / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    return copy


def test_an_upward_import_breaks_the_rooms_contract(tmp_path):
    copy = _copy_tree(tmp_path)
    with open(copy / "src" / "model" / "gpt.py", "a") as f:
        f.write("\nimport src.training.config  # noqa: E402  (upward: model -> training)\n")
    result = lint_imports(copy)
    assert result.returncode != 0
    assert "src.model.gpt -> src.training.config" in result.stdout


def test_a_cycle_inside_a_room_breaks_the_acyclic_contract(tmp_path):
    copy = _copy_tree(tmp_path)
    with open(copy / "src" / "tokenizer" / "bpe_train.py", "a") as f:
        f.write("\nimport src.tokenizer.bpe  # noqa: E402  (bpe already imports bpe_train)\n")
    result = lint_imports(copy)
    assert result.returncode != 0
    assert "No import cycles" in result.stdout and "BROKEN" in result.stdout
