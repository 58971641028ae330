"""Data preparation: corpora -> tokenizer -> token files that training reads.

    python src/data/prepare_data.py                                # WikiText-2 + DailyDialog from the Hub
    python src/data/prepare_data.py --data-dir ../shared/data      # local copies of the releases
    python src/data/prepare_data.py --text my_book.txt             # your own text (.txt or .jsonl)
    python src/data/prepare_data.py --data-dir D --mix wikitext=1,dailydialog=2
    python src/data/prepare_data.py --data-dir D --splits test     # test.bin, for evaluation only
    python src/data/prepare_data.py --wikitext 103                 # WikiText-103 (~540 MB) + DailyDialog

What it writes into ``--out`` (default ``data/``):
    tokenizer.json   the BPE tokenizer, trained on the training split (or --tokenizer PATH)
    train.bin        flat token ids of the training documents, mixed by --mix
    val.bin          the sources' validation splits, each document once (never mixed)
    test.bin         only with --splits test; never used for training or tokenizer training
    meta.json        what the files hold: counts per split and source, input sha256s, the
                     size and sha256 of each file it vouches for (checked before training),
                     and its own checksum
The .bin files are raw little-endian np.uint16 (np.uint32 if the vocabulary has more than
65,536 ids): read them with ``np.memmap(path, dtype=meta["dtype"], mode="r")``.

Documents (see sources.py for the readers):
  * WikiText: one document per article (split at its top-level " = Title = " headings),
    then <|endoftext|>.
  * DailyDialog: one document per dialogue, its utterances as alternating user/assistant
    turns in the project's chat template (src/tokenizer/chat_template.py), then <|endoftext|>.
  * --text: a .jsonl line's "text" field, or a whole plain-text file, then <|endoftext|>.
    Every ``--text-val-every``-th piece (a JSONL record or ~64 KiB of a text file; a
    smaller file is cut into ~10 pieces) is held out for val.bin, at least one piece, since
    the user's text has no validation split of its own. A corpus too small for that (under
    2 KiB or a single line) or with no text is refused.
By default the releases' word-level tokenisation is undone (detokenize.py);
``--keep-tokenized`` keeps their text as it is. meta.json records which.

Safety: every input is checked (UTF-8, non-empty, well-formed) before anything is
written; each output file appears atomically; meta.json is written last and removed
first, so a half-finished run is never trusted. A re-run with the same inputs (sha256)
and settings finds its fingerprint in meta.json and does nothing (``--force`` redoes it).
Encoding streams documents through worker processes in bounded batches, so memory does
not grow with the corpus. The tokenizer is trained on all the training text up to
``--tokenizer-sample-mb`` (64 MB of text by default), and on an evenly spread sample of whole
documents of that size beyond it (WikiText-103: about 12%; the cost in bytes per token is
measured in docs/experiments.md), so its memory and time stay bounded too.

The pieces: corpus.py finds and checks the inputs (parts and their documents),
token_files.py encodes them and writes the mixed split files, and this file holds the
settings, the tokenizer (trained or reused), meta.json and the command line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from src.data import sources
from src.data.corpus import Part, resolve_parts, spread_sample, unit_texts
from src.data.token_files import Encoder, write_split
from src.tokenizer.bpe import BPETokenizer
from src.tokenizer.special_tokens import NUM_RESERVED_SPECIAL
from src.utils.atomic import write_json_atomic, write_text_atomic
from src.utils.cli import DefaultsHelpFormatter, UserError, run_cli
from src.utils.integrity import file_record, seal

FORMAT_VERSION = 1
KNOWN_SOURCES = ("wikitext", "dailydialog", "text")
SPLIT_NAMES = {"train": "train", "validation": "val", "test": "test"}  # reader name -> file stem
# Above this much training text (MB of characters) the tokenizer learns from an evenly spread
# sample of this size: its chunk counts, hence its memory and time, stay bounded.
TOKENIZER_SAMPLE_MB = 64.0


# ---------------------------------------------------------------------------------------
# Settings


def parse_mix(spec: str | None, sources_: list[str]) -> dict[str, float]:
    """``"wikitext=1,dailydialog=2.5"`` -> weights of the used sources (unnamed ones: 1)."""
    weights = {s: 1.0 for s in sources_}
    if not spec:
        return weights
    for item in spec.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep:
            raise UserError(f"--mix {spec!r}: expected NAME=WEIGHT items, got {item!r}")
        if name not in sources_:
            raise UserError(f"--mix {spec!r}: unknown source {name!r}; sources in this run: {', '.join(sources_)}")
        try:
            weight = float(value)
        except ValueError:
            raise UserError(f"--mix {spec!r}: weight {value!r} of {name} is not a number") from None
        if not (math.isfinite(weight) and weight >= 0):
            raise UserError(f"--mix {spec!r}: weight of {name} must be a finite number >= 0")
        weights[name] = weight
    if not any(weights.values()):
        raise UserError(f"--mix {spec!r}: all weights are 0, the training set would be empty")
    return weights


def parse_splits(spec: str) -> list[str]:
    """``"train,val"`` -> ``["train", "validation"]``; test is prepared only on its own."""
    splits = [sources.canonical_split(s.strip()) for s in spec.split(",") if s.strip()]
    if not splits:
        raise UserError("--splits: name at least one of train, val, test")
    if "test" in splits and len(splits) > 1:
        raise UserError("--splits: prepare test on its own (--splits test), so it never mixes with training")
    return list(dict.fromkeys(splits))


# ---------------------------------------------------------------------------------------
# The run


def fingerprint(settings: dict, parts: list[Part]) -> str:
    """sha256 of the settings and of every input's identity (sha256 or Hub fingerprint)."""
    inputs = [(p.source, p.split, p.inputs) for p in parts]
    blob = json.dumps({"settings": settings, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _read_meta(out: Path) -> dict | None:
    try:
        return json.loads((out / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def up_to_date(out: Path, meta: dict | None, splits: list[str], fp: str) -> bool:
    """Whether meta.json says each requested split was made by this very run, and its
    file is complete (size = tokens x dtype size)."""
    if meta is None or not (out / "tokenizer.json").is_file():
        return False
    for split in splits:
        entry = meta.get("splits", {}).get(SPLIT_NAMES[split])
        path = out / f"{SPLIT_NAMES[split]}.bin"
        if not entry or entry.get("fingerprint") != fp or not path.is_file():
            return False
        if path.stat().st_size != entry["tokens"] * np.dtype(meta["dtype"]).itemsize:
            return False
    return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Prepare WikiText, DailyDialog and/or your own text: tokenizer.json, train.bin, val.bin, meta.json.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--data-dir", help="local copies of the releases (e.g. ../shared/data); default: the Hugging Face Hub")
    p.add_argument("--text", nargs="+", metavar="FILE", default=[], help="your own corpus: plain text or .jsonl with a 'text' field")
    p.add_argument(
        "--sources",
        help="comma-separated subset of wikitext,dailydialog,text (default: wikitext,dailydialog; only text when --text is given)",
    )
    p.add_argument("--wikitext", choices=(*sources.WIKITEXT_SIZES, *sources.HUB_WIKITEXT_CONFIGS),
                   help="2 or 103 (WikiText-103: ~50x the text), or a Hub config; with --data-dir, "
                   "picks the wikitext-2*/ or wikitext-103*/ folder (default: WikiText-2 from the Hub, "
                   "any one release in --data-dir)")
    p.add_argument(
        "--wikitext-variant",
        default="auto",
        choices=("auto", "raw", "tokens"),
        help="with --data-dir: wiki.*.raw or wiki.*.tokens (auto: the variant of the train file, for every split)",
    )
    p.add_argument("--keep-tokenized", action="store_true", help="keep the releases' tokenised text instead of natural text")
    p.add_argument("--tokenizer", help="reuse this tokenizer.json instead of training one")
    p.add_argument("--vocab-size", type=int, default=16384, help="total ids of a trained tokenizer, incl. 16 reserved specials")
    p.add_argument("--tokenizer-sample-mb", type=float, default=TOKENIZER_SAMPLE_MB,
                   help="train the tokenizer on an evenly spread sample of this many MB of the training text when there is more (0: all of it)")
    p.add_argument("--out", default="data", help="output folder")
    p.add_argument("--splits", default="train,val", help="train,val (default), or test on its own (--splits test)")
    p.add_argument("--mix", help="training weights, e.g. wikitext=1,dailydialog=2 (repeats documents; fractions allowed)")
    p.add_argument("--text-val-every", type=int, default=100, help="hold out every N-th piece of --text for val.bin")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8), help="encoding processes (1: no pool)")
    p.add_argument("--force", action="store_true", help="redo everything even if meta.json says it is up to date")
    return p


def choose_sources(args: argparse.Namespace, splits: list[str]) -> tuple[list[str], dict[str, float]]:
    """The sources of this run and their training weights (--sources, --text, --mix).

    A source weighted 0 is dropped from a run that prepares the training split.
    """
    if args.sources:
        source_names = [s.strip() for s in args.sources.split(",") if s.strip()]
        unknown = [s for s in source_names if s not in KNOWN_SOURCES]
        if unknown:
            raise UserError(f"--sources: unknown source {unknown[0]!r}; expected some of {', '.join(KNOWN_SOURCES)}")
        if "text" in source_names and not args.text:
            raise UserError("--sources names text, but no --text FILE was given")
    else:
        source_names = ["text"] if args.text else ["wikitext", "dailydialog"]
    if args.text and "text" not in source_names:
        source_names.append("text")
    if "test" in splits and source_names == ["text"]:
        raise UserError("--splits test: your --text files have no test split (only wikitext and dailydialog do)")
    weights = parse_mix(args.mix, source_names)
    if "train" in splits:  # weight 0 drops a source from the run
        source_names = [s for s in source_names if weights[s] > 0]
        weights = {s: weights[s] for s in source_names}
    return source_names, weights


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    splits = parse_splits(args.splits)
    source_names, weights = choose_sources(args, splits)
    if args.text_val_every < 2:
        raise UserError(f"--text-val-every {args.text_val_every}: must be at least 2")
    if not (math.isfinite(args.tokenizer_sample_mb) and args.tokenizer_sample_mb >= 0):
        raise UserError(f"--tokenizer-sample-mb {args.tokenizer_sample_mb}: must be a number of MB >= 0")
    if args.vocab_size < 256 + NUM_RESERVED_SPECIAL and not args.tokenizer:
        raise UserError(f"--vocab-size {args.vocab_size}: must be at least {256 + NUM_RESERVED_SPECIAL} (256 bytes + specials)")
    detokenize = not args.keep_tokenized
    out = Path(args.out)
    _check_out_folder(out)

    # 1. Check every input and the tokenizer before writing anything.
    parts = resolve_parts(
        source_names, splits, data_dir=Path(args.data_dir) if args.data_dir else None,
        hub_wikitext=sources.hub_wikitext_config(args.wikitext or "2"),
        wikitext_variant=args.wikitext_variant,
        text_files=[Path(p) for p in args.text], text_val_every=args.text_val_every,
        wikitext_size=sources.wikitext_size_of(args.wikitext) if args.wikitext else None,
    )
    train_parts = [p for p in parts if p.split == "train"]
    if "train" in splits and not any(p.num_units for p in train_parts):
        raise UserError("the training split has no documents")
    tokenizer_path = _given_tokenizer_path(args.tokenizer, splits, out)
    given_tok = BPETokenizer.load(tokenizer_path) if tokenizer_path else None
    tok_settings: dict[str, Any] = {"train": True, "vocab_size": args.vocab_size}
    sample = tokenizer_sample_fraction(train_parts, args.tokenizer_sample_mb)
    if sample < 1:  # recorded only when sampling, so small corpora keep their fingerprints
        tok_settings["sample_mb"] = args.tokenizer_sample_mb

    settings = {
        "format_version": FORMAT_VERSION,
        "splits": splits,
        "sources": source_names,
        "mix": weights if "train" in splits else None,
        "detokenized": detokenize,
        "tokenizer": given_tok.hash if given_tok else tok_settings,
        "text_val_every": args.text_val_every if "text" in source_names else None,
    }
    fp = fingerprint(settings, parts)
    old_meta = _read_meta(out)
    if not args.force and up_to_date(out, old_meta, splits, fp):
        print(f"{out}/ is up to date for {', '.join(SPLIT_NAMES[s] for s in splits)} (same inputs and settings); nothing to do")
        return 0

    # 2. From here on files change: first make sure no stale meta.json vouches for them.
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)
    try:
        if given_tok is None:
            tok = _trained_tokenizer(out, train_parts, args.vocab_size, detokenize, args.force, sample)
        else:
            tok = given_tok
            if tokenizer_path.resolve() != (out / "tokenizer.json").resolve():
                tok.save(out / "tokenizer.json")
        dtype = np.dtype(np.uint16 if tok.vocab_size <= 65536 else np.uint32)

        # 3. Encode each part into a temporary folder, then write each split file.
        split_stats = _write_splits(out, parts, splits, weights, detokenize, dtype, max(1, args.workers))
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_interrupted_note(out, given_tok is None)) from None
    for stats in split_stats.values():
        stats["fingerprint"] = fp

    # 4. meta.json, last.
    meta = _meta(out, tok, dtype, detokenize, weights, split_stats, old_meta, parts, args, settings)
    write_json_atomic(out / "meta.json", seal(meta))
    _print_summary(out, meta, split_stats, time.time() - started)
    return 0


def _interrupted_note(out: Path, trains_tokenizer: bool) -> str:
    """What a Ctrl-C during steps 2-3 left in ``out``, and what running the command again does."""
    if trains_tokenizer and (out / ".tokenizer.fingerprint").is_file():
        return (f"{out}/ has its tokenizer but no finished token files (no meta.json); the same "
                "command continues from that tokenizer and encodes again")
    if trains_tokenizer:
        return f"{out}/ has no finished tokenizer or token files; the same command starts clean"
    return f"{out}/ has no finished token files (no meta.json); the same command encodes again"


def _check_out_folder(out: Path) -> None:
    """Refuse an ``--out`` that is, or lies under, an existing file (before any work)."""
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise UserError(f"--out {out}: {folder} is a file, not a folder; "
                                "name a folder for the prepared data")
            return


def _given_tokenizer_path(option: str | None, splits: list[str], out: Path) -> Path | None:
    """The tokenizer to encode with: --tokenizer, else the one in ``out`` for a run without
    the training split, else None (train one)."""
    if option:
        return Path(option)
    if "train" in splits:
        return None
    path = out / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{path}: no tokenizer to encode {', '.join(splits)} with; prepare train,val first or pass --tokenizer")
    return path


def _write_splits(
    out: Path, parts: list[Part], splits: list[str], weights: dict[str, float], detokenize: bool,
    dtype: np.dtype, workers: int,
) -> dict[str, dict]:
    """Encode the parts of each split (with ``out/tokenizer.json``) and write its file;
    returns each split file's counts, keyed by its file stem."""
    split_stats = {}
    encoder = Encoder(out / "tokenizer.json", detokenize, dtype, workers)
    try:
        with tempfile.TemporaryDirectory(prefix=".prepare-", dir=out) as tmp:
            for split in splits:
                encoded = [encoder.encode(p, Path(tmp)) for p in parts if p.split == split]
                split_weights = weights if split == "train" else {}
                stats = write_split(out / f"{SPLIT_NAMES[split]}.bin", encoded, split_weights, dtype)
                split_stats[SPLIT_NAMES[split]] = stats
    finally:
        encoder.close()
    return split_stats


def _meta(
    out: Path, tok: BPETokenizer, dtype: np.dtype, detokenize: bool, weights: dict[str, float],
    split_stats: dict[str, dict], old_meta: dict | None, parts: list[Part], args: argparse.Namespace,
    settings: dict,
) -> dict:
    """The content of meta.json, given the split files this run wrote (``split_stats``).

    A test-only run keeps the train/val entries if the tokenizer is the same; a run without
    the test split removes an old test.bin (another tokenizer or settings).
    """
    kept = {}
    if "train" not in split_stats and old_meta and old_meta.get("tokenizer_hash") == tok.hash:
        kept = {k: v for k, v in old_meta.get("splits", {}).items() if k not in split_stats}
    elif "test" not in split_stats:
        (out / "test.bin").unlink(missing_ok=True)  # encoded with another tokenizer or settings
    # Sizes and SHA-256s of the files, checked before training (src/training/batches.py).
    files = {k: v for k, v in ((old_meta or {}).get("files") or {}).items() if k[: -len(".bin")] in kept}
    files["tokenizer.json"] = file_record(out / "tokenizer.json")
    files.update({stats["file"]: file_record(out / stats["file"]) for stats in split_stats.values()})
    return {
        "format_version": FORMAT_VERSION,
        "created_by": "src/data/prepare_data.py",
        "files": files,
        "tokenizer": "tokenizer.json",
        "tokenizer_hash": tok.hash,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "special_tokens": tok.special_tokens,
        "dtype": dtype.name,
        "detokenized": detokenize,
        "mix": weights,
        "splits": {**kept, **split_stats},
        "sources": _sources_meta(parts, args),
        "settings": settings,
    }


def tokenizer_sample_fraction(train_parts: list[Part], sample_mb: float) -> float:
    """The share of the training documents the tokenizer learns from: 1 up to ``sample_mb``
    MB of text (0: no limit), ``sample_mb`` / total beyond."""
    total = sum(p.text_chars for p in train_parts)
    if not sample_mb or total <= sample_mb * 1e6:
        return 1.0
    return sample_mb * 1e6 / total


def _trained_tokenizer(out: Path, train_parts: list[Part], vocab_size: int, detokenize: bool,
                       force: bool, sample: float = 1.0) -> BPETokenizer:
    """Train the tokenizer on the training texts (``sample`` < 1: on that share of the
    documents of each part, evenly spread) and save it, or reuse the one a previous
    (perhaps interrupted) run trained from the same inputs and settings.

    ``.tokenizer.fingerprint`` beside tokenizer.json records what it was trained from and
    its hash; the mix weights are not part of it, so changing only --mix keeps it.
    """
    stamp_path = out / ".tokenizer.fingerprint"
    stamp_settings = {"vocab_size": vocab_size, "detokenized": detokenize, "format_version": FORMAT_VERSION}
    if sample < 1:
        stamp_settings["sample"] = sample
    stamp = fingerprint(stamp_settings, train_parts)
    if not force and stamp_path.is_file() and (out / "tokenizer.json").is_file():
        recorded = stamp_path.read_text(encoding="utf-8").split()
        try:
            tok = BPETokenizer.load(out / "tokenizer.json")
        except UserError:
            tok = None
        if tok is not None and recorded == [stamp, tok.hash]:
            print(f"continuing: reusing {out / 'tokenizer.json'}, trained from the same inputs and settings",
                  file=sys.stderr)
            return tok
    total_mb = sum(p.text_chars for p in train_parts) / 1e6
    which = (f"an evenly spread {sample:.1%} of the documents of the training split "
             f"({sample * total_mb:,.0f} of {total_mb:,.0f} MB; --tokenizer-sample-mb)"
             if sample < 1 else "the training split")
    print(f"training the tokenizer (vocab {vocab_size}) on {which}"
          f"{' (starting clean)' if (out / 'tokenizer.json').is_file() else ''}", file=sys.stderr)
    texts = (t for p in train_parts for u in spread_sample(p.make_units(), sample)
             for t in unit_texts(u, detokenize))
    tok = BPETokenizer.train(texts, vocab_size, show_progress=True)
    stamp_path.unlink(missing_ok=True)
    tok.save(out / "tokenizer.json")
    write_text_atomic(stamp_path, f"{stamp} {tok.hash}\n")
    return tok


def _sources_meta(parts: list[Part], args: argparse.Namespace) -> dict:
    meta: dict[str, Any] = {}
    for part in parts:
        entry = meta.setdefault(part.source, {"origin": "local" if args.data_dir or part.source == "text" else "hub", "inputs": {}})
        entry["inputs"][SPLIT_NAMES[part.split]] = part.inputs
        if part.variant:
            entry.setdefault("variant", {})[SPLIT_NAMES[part.split]] = part.variant
    return meta


def _print_summary(out: Path, meta: dict, split_stats: dict, seconds: float) -> None:
    releases = [s for s in meta["sources"] if s != "text"]
    if not releases:  # detokenisation applies to the releases only; the user's text is kept as is
        how = "your text as given"
    else:
        how = f"{'/'.join(releases)} {'detokenised' if meta['detokenized'] else 'as released'}"
        how += ", your text as given" if "text" in meta["sources"] else ""
    print(f"wrote {out}/ in {seconds:.1f} s: vocab {meta['vocab_size']}, {meta['dtype']}, {how}")
    print(f"{'split':<6} {'source':<12} {'weight':>6} {'documents':>10} {'tokens':>12} {'bytes':>12} {'bytes/tok':>9}")
    for split, stats in split_stats.items():
        rows = list(stats["by_source"].items()) + [("all", {**stats, "weight": ""})]
        for source, s in rows:
            ratio = s["bytes"] / s["tokens"] if s["tokens"] else 0.0
            print(f"{split:<6} {source:<12} {s['weight']!s:>6} {s['documents']:>10,} {s['tokens']:>12,} {s['bytes']:>12,} {ratio:>9.2f}")


if __name__ == "__main__":
    run_cli(main)
