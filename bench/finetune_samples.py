"""Side by side: a base run's and a fine-tuned run's replies to DailyDialog validation dialogues.

    python bench/finetune_samples.py --base runs/small-... --finetuned runs/small-...-sft-... \
        --data-dir ../shared/data --out docs/finetune-samples.md

For each of the first ``--dialogues`` validation dialogues, each model gets the dialogue's
first utterance as the user's message, exactly as chat.py would send it (ChatSession, chat
sampling defaults, a fresh session seeded with ``--seed`` per dialogue, so every reply is
reproducible on its own), and the table shows the reply beside the dialogue's own second
utterance. Writes Markdown.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

import dataclasses

from src.checkpoint import load_model
from src.data.detokenize import detokenize_dailydialog
from src.data.sources import read_dailydialog
from src.infer.chat_session import ChatSession
from src.infer.sampling import CHAT_DEFAULTS
from src.utils.atomic import write_text_atomic


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ").strip() or "(empty)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True)
    p.add_argument("--finetuned", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--dialogues", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--out", default="docs/finetune-samples.md")
    args = p.parse_args()

    dialogues = read_dailydialog(args.data_dir, "validation")[: args.dialogues]
    settings = dataclasses.replace(CHAT_DEFAULTS, max_new_tokens=args.max_tokens)
    replies, steps = {}, {}
    for name, run in (("base", args.base), ("finetuned", args.finetuned)):
        model, tokenizer, info = load_model(run)
        steps[name] = info["step"]
        replies[name] = [
            ChatSession(model, tokenizer, settings, seed=args.seed)
            .reply(detokenize_dailydialog(d[0])).text
            for d in dialogues
        ]
    lines = [
        "# Base vs fine-tuned replies",
        "",
        f"Base run `{args.base}` (step {steps['base']}), fine-tuned run `{args.finetuned}` "
        f"(step {steps['finetuned']} of fine-tuning). Each model answers the "
        f"first utterance of each of the first {len(dialogues)} DailyDialog validation "
        f"dialogues as a chat message (chat.py's sampling: temperature "
        f"{settings.temperature}, top-p {settings.top_p}; seed {args.seed} per dialogue; at "
        f"most {args.max_tokens} tokens). \"DailyDialog\" is the dialogue's own reply. "
        f"Written by `python bench/finetune_samples.py`.",
        "",
        "| # | user | base | fine-tuned | DailyDialog |",
        "|---:|---|---|---|---|",
    ]
    for i, d in enumerate(dialogues):
        said = [detokenize_dailydialog(u) for u in d[:2]]
        lines.append(f"| {i + 1} | {cell(said[0])} | {cell(replies['base'][i])} | "
                     f"{cell(replies['finetuned'][i])} | {cell(said[1])} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
