"""The whole pipeline through the real command line, as a user types it.

A tiny corpus in the releases' own formats -> prepare_data.py -> train.py (stopped halfway,
then resumed) -> generate.py -> chat.py through a pipe -> evaluate.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# One article in the tokenised release's layout: every line ends with " \n", blank lines are " ".
WIKI_ARTICLE = "".join(f"{line} \n" for line in (
    " = Valkyria Chronicles {n} =",
    "",
    " Valkyria Chronicles {n} is a tactical role @-@ playing video game developed by Sega . It was"
    " released in January 2011 , and sold 1 @,@ 000 copies in its first week .",
    "",
    " = = Gameplay = =",
    "",
    " The game 's battles take place on a map of the battlefield , where squads of up to 9"
    " characters move in turns . Players do n't control every unit at once .",
    "",
))
DIALOGUE = (
    "Hi , how are you doing ? __eou__ I'm fine , thanks . And you ? __eou__ "
    "Not bad . Shall we go to the park today ? __eou__ Sure , that sounds great ! __eou__ \n"
)


def write_corpus(root: Path) -> None:
    """WikiText (tokenised release layout) and DailyDialog, train and validation splits."""
    wiki = root / "wikitext-2"
    wiki.mkdir(parents=True)
    (wiki / "wiki.train.tokens").write_text(
        " \n" + "".join(WIKI_ARTICLE.format(n=i) for i in range(40)), encoding="utf-8")
    (wiki / "wiki.valid.tokens").write_text(
        " \n" + "".join(WIKI_ARTICLE.format(n=100 + i) for i in range(4)), encoding="utf-8")
    for split, n in (("train", 120), ("validation", 12)):
        folder = root / "dailydialog" / split
        folder.mkdir(parents=True)
        (folder / f"dialogues_{split}.txt").write_text(DIALOGUE * n, encoding="utf-8")


def run(*args: str | Path, stdin: str | None = None, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, input=stdin, capture_output=True,
        text=True, timeout=300, env=env)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_pipeline_through_the_command_line(tmp_path: Path) -> None:
    corpus, data, run_dir = tmp_path / "corpus", tmp_path / "data", tmp_path / "runs" / "tiny"
    write_corpus(corpus)

    # 1. Prepare: tokenizer + token files + meta; a second run is a no-op.
    run(ROOT / "src/data/prepare_data.py", "--data-dir", corpus, "--out", data,
        "--vocab-size", 512, cwd=tmp_path)
    meta = json.loads((data / "meta.json").read_text())
    assert meta["detokenized"] is True
    assert {p.name for p in data.iterdir()} >= {"tokenizer.json", "train.bin", "val.bin", "meta.json"}
    again = run(ROOT / "src/data/prepare_data.py", "--data-dir", corpus, "--out", data,
                "--vocab-size", 512, cwd=tmp_path)
    assert "up to date" in (again.stdout + again.stderr).lower()

    # 2. Train, stop halfway, resume to the end of the planned schedule.
    common = ["--preset", "tiny", "--data", data, "--run-dir", run_dir, "--max-steps", 16,
              "--eval-interval", 8, "--time-budget", 0, "--no-progress", "--batch-size", 4,
              "--tokens-per-step", 256]
    run(ROOT / "train.py", *common, "--stop-at-step", 8, cwd=tmp_path)
    run(ROOT / "train.py", *common, "--resume", cwd=tmp_path)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 17))
    assert any("val_loss" in r for r in rows)

    # 3. Generate: reproducible with a seed.
    gen = ["--run", run_dir, "--prompt", "The game", "--max-new-tokens", 20, "--seed", 3]
    first = run(ROOT / "src/infer/generate.py", *gen, cwd=tmp_path).stdout
    assert first.startswith("The game") and len(first) > len("The game")
    assert run(ROOT / "src/infer/generate.py", *gen, cwd=tmp_path).stdout == first

    # 4. Chat through a pipe: one reply per input line, exit 0.
    chat = run(ROOT / "chat.py", "--run", run_dir, "--seed", 0, "--max-tokens", 16,
               stdin="Hello, how are you?\nShall we go to the park?\n", cwd=tmp_path)
    assert chat.stdout.strip(), chat.stderr

    # 5. Evaluate: word-level perplexity against the tokenised release's word count.
    out = tmp_path / "eval.json"
    run(ROOT / "evaluate.py", "--run", run_dir, "--data-dir", corpus, "--split", "valid",
        "--json", out, cwd=tmp_path)
    report = json.loads(out.read_text())
    wikitext = report["wikitext"]
    lines = (corpus / "wikitext-2" / "wiki.valid.tokens").read_text(encoding="utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()  # the file ends with a newline: no line after it
    assert wikitext["num_words"] == sum(len(line.split()) + 1 for line in lines)
    assert wikitext["word_perplexity"] > 1.0 and wikitext["num_tokens"] > 0
    assert "dailydialog" in report
