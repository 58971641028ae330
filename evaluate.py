"""Evaluate a trained run the way papers report it: ``python evaluate.py``.

    python evaluate.py                                        # newest run, WikiText-2 + DailyDialog from the Hub
    python evaluate.py --run runs/small --data-dir ../shared/data --split valid
    python evaluate.py --run runs/small --checkpoint latest  # default: the best checkpoint
    python evaluate.py --checkpoint runs/small/checkpoints/step_0001000 --json eval.json
    python evaluate.py --run runs/small --data-dir D --max-tokens 20000   # a quick look

WikiText (src/eval/wikitext.py): token loss and perplexity, bits per byte, and word-level
perplexity: the total NLL of the split over the word count of the tokenised release, the
number comparable with published word-level results (AWD-LSTM, GPT-2 zero-shot), which
are printed beside ours. DailyDialog (src/eval/dialog.py): loss and perplexity on all
turns and on the assistant's turns only, in the project's chat template.

The text is prepared as the run was trained (detokenised or not, from the run's copy of
the data's meta.json) and scored with overlapping windows (src/eval/perplexity.py): each
window is the model's context, moved by ``--stride`` (default half the context), so every
token is scored once with at least half a context of real text before it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the repository root

from src.utils.cli import UserError, run_cli

SPLIT_CHOICES = ("valid", "test")
TASKS = ("wikitext", "dailydialog")
HUB_WIKITEXT_DEFAULT = "wikitext-2-raw-v1"

# Published word-level perplexities on WikiText-2 (tokenised release, 217,646 / 245,569 words).
REFERENCES: list[dict[str, Any]] = [
    {"model": "AWD-LSTM (Merity et al., 2017)", "valid": 68.6, "test": 65.8},
    {"model": "GPT-2 small, zero-shot (Radford et al., 2019)", "valid": None, "test": 29.41},
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Perplexity of a trained run on WikiText (token, bits per byte, word level) and DailyDialog.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--run", metavar="DIR", help="run folder; default: newest under runs/")
    p.add_argument("--checkpoint", metavar="WHICH", help="best (default: lowest validation loss, else the latest), "
                   "latest, a step number, or a checkpoint folder (runs/<name>/checkpoints/step_...)")
    p.add_argument("--data-dir", metavar="DIR", help="local release files (e.g. ../shared/data); default: the Hugging Face Hub")
    p.add_argument("--split", default="valid", choices=SPLIT_CHOICES, help="which split to score (test: for final reporting only)")
    p.add_argument("--tasks", default="auto", help="comma-separated subset of wikitext,dailydialog (auto: those found)")
    p.add_argument("--wikitext", default=HUB_WIKITEXT_DEFAULT, help="WikiText config on the Hub (without --data-dir)")
    p.add_argument("--wikitext-variant", default="auto", choices=("auto", "raw", "tokens"),
                   help="with --data-dir: wiki.*.raw or wiki.*.tokens (auto: the variant of the train file, as prepare_data)")
    p.add_argument("--stride", type=int, help="sliding-window stride in tokens (default: half the model's context)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"), help="auto: as training (bf16 where the GPU or CPU runs it natively, else fp32)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--max-tokens", type=int, metavar="N", help="score only the first N tokens of each corpus (quick look)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--verify", action="store_true",
                   help="check the SHA-256 of the checkpoint's files before loading (sizes are always checked)")
    return p


def parse_tasks(spec: str) -> tuple[list[str], bool]:
    """The tasks to run, and whether they were named explicitly (else: those found)."""
    if spec == "auto":
        return list(TASKS), False
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise UserError(f"--tasks {spec!r}: expected some of {', '.join(TASKS)}")
    return tasks, True


def load_corpora(args: argparse.Namespace) -> dict[str, Any]:
    """Read the requested corpora (before the model, so a bad --data-dir fails fast)."""
    from src.data import sources
    from src.eval.wikitext import WordCount, count_words, release_word_count

    tasks, explicit = parse_tasks(args.tasks)
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise UserError(f"--data-dir {args.data_dir}: data directory not found")
    found: dict[str, Any] = {}
    skipped: list[str] = []
    for task in tasks:
        try:
            if task == "wikitext":
                if args.data_dir:
                    split = sources.read_wikitext(args.data_dir, args.split, args.wikitext_variant)
                    words = release_word_count(split, args.data_dir, args.split)
                else:
                    split = sources.load_hub_wikitext(args.wikitext, args.split)
                    words = WordCount(count_words(split.lines), split.source, split.variant)
                found[task] = (split, words)
            else:
                found[task] = (sources.read_dailydialog(args.data_dir, args.split) if args.data_dir
                               else sources.load_hub_dailydialog(args.split))
        except UserError as exc:
            # Without --tasks, a corpus whose files are simply not in --data-dir is skipped;
            # any other problem (unreadable file, ambiguous folders, the Hub) stops here.
            absent = ": no WikiText " in str(exc) or ": no DailyDialog " in str(exc)
            if explicit or not args.data_dir or not absent:
                raise
            skipped.append(f"note: skipping {task}: {exc}")
    if not found:
        raise UserError(f"{args.data_dir}: neither WikiText nor DailyDialog {args.split} files found in it")
    for note in skipped:
        print(note, file=sys.stderr)
    return found


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batch_size", "stride", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if args.json and Path(args.json).is_dir():
        raise UserError(f"--json {args.json}: is a folder; give a file path")
    if args.split == "test":
        print("note: scoring the test split: report it, never tune against it", file=sys.stderr)
    corpora = load_corpora(args)

    import torch

    from src.checkpoint import checkpoint_from_args, load_model
    from src.utils.atomic import write_json_atomic
    from src.utils.device import pick_device, pick_dtype

    device = pick_device(args.device)
    model, tokenizer, info = load_model(
        checkpoint_from_args(args.run, args.checkpoint, verify=args.verify), device=device)
    context = model.config.context_length
    stride = args.stride or max(1, context // 2)
    if stride > context:
        raise UserError(f"--stride {stride}: must be at most the model's context ({context})")
    autocast_dtype = pick_dtype(args.dtype, device)
    dtype = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype]
    meta = info.get("data_meta") or {}
    if "detokenized" in meta:
        detokenize = bool(meta["detokenized"])
    else:
        detokenize = True
        print("note: the run has no data meta.json; assuming its text was detokenised (the default)", file=sys.stderr)
    common = dict(
        context_length=context, stride=stride, batch_size=args.batch_size, device=device,
        autocast_dtype=autocast_dtype, max_tokens=args.max_tokens,
        detokenize=detokenize,
    )
    results: dict[str, Any] = {
        "run_dir": str(info["run_dir"]),
        "checkpoint": str(info["checkpoint"]),
        "step": info["step"],
        "split": args.split,
        "num_params": model.num_params(),
        "context_length": context,
        "stride": stride,
        "batch_size": args.batch_size,
        "dtype": dtype,
        "device": str(device),
        "detokenized": detokenize,
        "max_tokens": args.max_tokens,
    }
    if "wikitext" in corpora:
        from src.eval.wikitext import evaluate_wikitext

        split, words = corpora["wikitext"]
        recorded = (meta.get("sources") or {}).get("wikitext")
        trained = recorded.get("variant", {}).get("val") if isinstance(recorded, dict) else None
        if trained and trained != split.variant:
            print(f"note: the run's validation WikiText was the {trained} release, this is the {split.variant} "
                  f"one (--wikitext-variant {trained} to match)", file=sys.stderr)
        entry = evaluate_wikitext(model, tokenizer, split, words, show_progress=not args.no_progress and
                                  f"WikiText {args.split}", **common)
        entry["references"] = [{"model": r["model"], "word_perplexity": r[args.split]} for r in REFERENCES
                               if r[args.split] is not None]
        results["wikitext"] = entry
    if "dailydialog" in corpora:
        from src.eval.dialog import evaluate_dailydialog

        results["dailydialog"] = evaluate_dailydialog(
            model, tokenizer, corpora["dailydialog"], show_progress=not args.no_progress and
            f"DailyDialog {args.split}", **common)
    print(format_report(results))
    if args.json:
        write_json_atomic(args.json, results)
        print(f"wrote {args.json}")
    return 0


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_report(r: dict[str, Any]) -> str:
    """The human-readable table of a results dict (as written to --json)."""
    lines = [
        f"{r['run_dir']} @ step {r['step']:,} ({r['num_params']:,} parameters), split {r['split']}",
        f"sliding window: context {r['context_length']}, stride {r['stride']}; {r['dtype']} on {r['device']}; "
        f"text {'detokenised' if r['detokenized'] else 'as released (tokenised)'}",
    ]
    if r["max_tokens"]:
        lines.append(f"only the first {r['max_tokens']:,} tokens of each corpus (--max-tokens): a quick look, not a result")
    w = r.get("wikitext")
    if w:
        est = "~" if w["truncated"] else ""
        if w["num_words"] is None:
            words = "words: cannot be computed (no tokenised release)"
        else:
            words = f"words {est}{w['num_words']:,} (counted in {w['word_count_source']}"
            words += ", raw release: same count as tokenised)" if w["word_count_variant"] == "raw" else ")"
        lines += [
            "",
            f"WikiText {r['split']}: {w['source']} ({w['variant']}, {w['documents']} articles)",
            f"  tokens {w['num_tokens']:,}   bytes {w['num_bytes']:,}   {words}",
            f"  loss {w['loss']:.4f} nats/token   token perplexity {w['token_perplexity']:.2f}   "
            f"bits per byte {w['bits_per_byte']:.4f}   word perplexity {est}{_num(w['word_perplexity'], '.2f')}",
            "",
            f"  {'word-level perplexity, WikiText-2':<50} {'valid':>8} {'test':>8}",
            f"  {'this model':<50} {(est + _num(w['word_perplexity'], '.2f')) if r['split'] == 'valid' else '':>8}"
            f" {(est + _num(w['word_perplexity'], '.2f')) if r['split'] == 'test' else '':>8}",
        ]
        for ref in REFERENCES:
            lines.append(f"  {ref['model']:<50} {_num(ref['valid'], '.2f'):>8} {_num(ref['test'], '.2f'):>8}")
    d = r.get("dailydialog")
    if d:
        lines += ["", f"DailyDialog {r['split']}: {d['dialogues']:,} dialogues (chat template)",
                  f"  {'':<16} {'tokens':>10} {'loss':>8} {'perplexity':>11} {'bits/byte':>10}"]
        for name, key in (("all turns", "all_turns"), ("assistant turns", "assistant_turns")):
            e = d[key]
            lines.append(f"  {name:<16} {e['num_tokens']:>10,} {_num(e['loss'], '.4f'):>8} "
                         f"{_num(e['token_perplexity'], '.2f'):>11} {_num(e['bits_per_byte'], '.4f'):>10}")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
