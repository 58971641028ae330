"""Data preparation: corpora -> tokenizer -> token files that training reads.

    python src/data/prepare_data.py                                # WikiText-2 + DailyDialog from the Hub
    python src/data/prepare_data.py --data-dir ../shared/data      # local copies of the releases
    python src/data/prepare_data.py --text my_book.txt             # your own text (.txt or .jsonl)
    python src/data/prepare_data.py --data-dir D --mix wikitext=1,dailydialog=2
    python src/data/prepare_data.py --data-dir D --splits test     # test.bin, for evaluation only

What it writes into ``--out`` (default ``data/``):
    tokenizer.json   the BPE tokenizer, trained on the training split (or --tokenizer PATH)
    train.bin        flat token ids of the training documents, mixed by --mix
    val.bin          the sources' validation splits, each document once (never mixed)
    test.bin         only with --splits test; never used for training or tokenizer training
    meta.json        what the files hold: counts per split and source, input sha256s, ...
The .bin files are raw little-endian np.uint16 (np.uint32 if the vocabulary has more than
65,536 ids): read them with ``np.memmap(path, dtype=meta["dtype"], mode="r")``.

Documents (see sources.py for the readers):
  * WikiText: one document per article (split at its top-level " = Title = " headings),
    then <|endoftext|>.
  * DailyDialog: one document per dialogue, its utterances as alternating user/assistant
    turns in the project's chat template (src/tokenizer/chat_template.py), then <|endoftext|>.
  * --text: a .jsonl line's "text" field, or a whole plain-text file, then <|endoftext|>.
    Every ``--text-val-every``-th piece (a JSONL record or ~64 KiB of a text file) is
    held out for val.bin, since the user's text has no validation split of its own.
By default the releases' word-level tokenisation is undone (detokenize.py);
``--keep-tokenized`` keeps their text as it is. meta.json records which.

Safety: every input is checked (UTF-8, non-empty, well-formed) before anything is
written; each output file appears atomically; meta.json is written last and removed
first, so a half-finished run is never trusted. A re-run with the same inputs (sha256)
and settings finds its fingerprint in meta.json and does nothing (``--force`` redoes it).
Encoding streams documents through worker processes in bounded batches, so memory does
not grow with the corpus.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
from tqdm import tqdm

from src.data import sources
from src.data.detokenize import detokenize_dailydialog, detokenize_wikitext
from src.tokenizer.bpe import BPETokenizer
from src.tokenizer.chat_template import alternate_turns, encode_chat
from src.tokenizer.special_tokens import NUM_RESERVED_SPECIAL
from src.utils.atomic import atomic_path, write_json_atomic, write_text_atomic
from src.utils.cli import UserError, run_cli

FORMAT_VERSION = 1
KNOWN_SOURCES = ("wikitext", "dailydialog", "text")
SPLIT_NAMES = {"train": "train", "validation": "val", "test": "test"}  # reader name -> file stem
BATCH_UNITS = 256  # documents per worker task ...
BATCH_CHARS = 1 << 18  # ... or this many characters, whichever comes first

# A unit of work: (kind, payload, ends_document). kind "wiki": release text of an article;
# "dialog": a dialogue's utterances (release text); "text": the user's text, as is.
Unit = tuple[str, Any, bool]


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
# Parts: one source's split, with its checked inputs and a re-iterable stream of units


@dataclass
class Part:
    source: str
    split: str
    inputs: list[dict]  # recorded in meta.json: path or hub id, sha256 / fingerprint, bytes
    make_units: Callable[[], Iterator[Unit]]
    variant: str | None = None  # WikiText: "raw" or "tokens"
    num_units: int = 0
    input_bytes: int = 0


def _file_record(info: sources.InputFile) -> dict:
    return {"path": str(info.path), "sha256": info.sha256, "bytes": info.bytes}


def _local_wikitext(data_dir: Path, split: str, variant: str) -> Part:
    path = sources.find_wikitext_file(data_dir, split, variant)
    info = sources.check_text_file(path)

    def units() -> Iterator[Unit]:
        for article in sources.iter_wikitext_articles(sources.iter_lines(path)):
            yield ("wiki", article, True)

    return Part("wikitext", split, [_file_record(info)], units, sources.wikitext_variant_of(path))


def _local_dailydialog(data_dir: Path, split: str) -> Part:
    path = sources.find_dailydialog_file(data_dir, split)
    info = sources.check_text_file(path)

    def units() -> Iterator[Unit]:
        for dialogue in sources.iter_dailydialog_file(path):
            yield ("dialog", dialogue, True)

    return Part("dailydialog", split, [_file_record(info)], units)


def _hub_record(dataset: Any, name: str) -> dict:
    """A Hub input's identity: the dataset's fingerprint, and the sha256 of its cache files."""
    record: dict[str, Any] = {"hub": name, "fingerprint": sources.hub_fingerprint(dataset), "rows": len(dataset)}
    files = [Path(f["filename"]) for f in getattr(dataset, "cache_files", None) or []]
    if files:
        record["files"] = [{"path": str(f), "sha256": sources.sha256_file(f)} for f in files]
    return record


def _hub_wikitext(name: str, split: str) -> Part:
    dataset = sources.open_hub_wikitext(name, split)

    def units() -> Iterator[Unit]:
        for article in sources.iter_wikitext_articles(sources.iter_hub_wikitext_lines(dataset)):
            yield ("wiki", article, True)

    record = _hub_record(dataset, f"hub:{sources.HUB_WIKITEXT}/{name}")
    return Part("wikitext", split, [record], units, sources.hub_wikitext_variant(name))


def _hub_dailydialog(split: str) -> Part:
    dataset = sources.open_hub_dailydialog(split)

    def units() -> Iterator[Unit]:
        for dialogue in sources.iter_hub_dialogues(dataset):
            yield ("dialog", dialogue, True)

    record = _hub_record(dataset, f"hub:{sources.HUB_DAILYDIALOG}@{sources.HUB_DAILYDIALOG_REVISION}")
    return Part("dailydialog", split, [record], units)


def _text_parts(paths: list[Path], splits: list[str], every: int) -> list[Part]:
    """The user's files as parts: every ``every``-th piece is held out for validation."""
    infos = [sources.check_text_file(p) for p in paths]
    records = [_file_record(i) for i in infos]
    total = sum(1 for p in paths for _ in sources.iter_text_file(p))
    held_out = {i for i in range(total) if i % every == every - 1}
    if not held_out and total >= 2:
        held_out = {total - 1}  # a small corpus still gets a validation piece

    def units(want_validation: bool) -> Iterator[Unit]:
        index = 0
        for path in paths:
            for text, ends in sources.iter_text_file(path):
                if (index in held_out) == want_validation:
                    yield ("text", text, ends or want_validation)
                index += 1

    parts = []
    for split in splits:
        if split == "train":
            parts.append(Part("text", split, records, lambda: units(False)))
        elif split == "validation":
            parts.append(Part("text", split, records, lambda: units(True)))
    return parts


def resolve_parts(args: argparse.Namespace, source_names: list[str], splits: list[str]) -> list[Part]:
    """Find, check and count every input, before anything is written."""
    parts: list[Part] = []
    data_dir = Path(args.data_dir) if args.data_dir else None
    for source in source_names:
        if source == "text":
            if "test" not in splits:
                parts.extend(_text_parts([Path(p) for p in args.text], splits, args.text_val_every))
            continue
        for split in splits:
            if source == "wikitext":
                part = _local_wikitext(data_dir, split, args.wikitext_variant) if data_dir else _hub_wikitext(args.wikitext, split)
            else:
                part = _local_dailydialog(data_dir, split) if data_dir else _hub_dailydialog(split)
            parts.append(part)
    for part in parts:  # a full streaming pass: finds malformed lines now, not mid-way
        part.num_units = sum(1 for _ in part.make_units())
        part.input_bytes = sum(r.get("bytes", 0) for r in part.inputs)
        if part.num_units == 0 and part.source != "text":
            where = part.inputs[0].get("path") or part.inputs[0].get("hub")
            raise UserError(f"{where}: no {part.source} documents in it")
    return parts


# ---------------------------------------------------------------------------------------
# Units -> texts -> token ids (run in worker processes)


def unit_texts(unit: Unit, detokenize: bool) -> list[str]:
    """The texts a unit is made of: an article, a dialogue's utterances, a text piece."""
    kind, payload, _ = unit
    if kind == "wiki":
        return [detokenize_wikitext(payload) if detokenize else payload]
    if kind == "dialog":
        return [detokenize_dailydialog(u) for u in payload] if detokenize else list(payload)
    return [payload]


_worker: dict[str, Any] = {}


def _init_worker(tokenizer_path: str, detokenize: bool, dtype: str) -> None:
    _worker.update(tok=BPETokenizer.load(tokenizer_path), detokenize=detokenize, dtype=np.dtype(dtype))


def _encode_units(units: list[Unit]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids of a batch of units (concatenated), and tokens and text bytes per unit."""
    tok: BPETokenizer = _worker["tok"]
    ids: list[int] = []
    tokens = np.zeros(len(units), dtype=np.int64)
    nbytes = np.zeros(len(units), dtype=np.int64)
    for i, unit in enumerate(units):
        texts = unit_texts(unit, _worker["detokenize"])
        start = len(ids)
        if unit[0] == "dialog":
            ids.extend(encode_chat(tok, alternate_turns(texts))[0])  # ends in <|endoftext|>
        else:
            ids.extend(tok.encode(texts[0]))
            if unit[2]:
                ids.append(tok.eot_id)
        tokens[i] = len(ids) - start
        nbytes[i] = sum(len(t.encode("utf-8")) for t in texts)
    return np.asarray(ids, dtype=_worker["dtype"]), tokens, nbytes


def _batches(units: Iterable[Unit]) -> Iterator[list[Unit]]:
    batch: list[Unit] = []
    chars = 0
    for unit in units:
        batch.append(unit)
        chars += sum(len(t) for t in (unit[1] if unit[0] == "dialog" else [unit[1]]))
        if len(batch) >= BATCH_UNITS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


@dataclass
class Encoded:
    """One part's token ids in a temporary file, with its document boundaries."""

    part: Part
    bin_path: Path
    ends_path: Path  # int64 pairs: cumulative (tokens, bytes) at each document end
    tokens: int = 0
    bytes: int = 0
    documents: int = 0


class Encoder:
    """Encodes parts with a pool of worker processes (or in this process for workers <= 1)."""

    def __init__(self, tokenizer_path: Path, detokenize: bool, dtype: np.dtype, workers: int) -> None:
        self.workers = workers
        initargs = (str(tokenizer_path), detokenize, np.dtype(dtype).name)
        if workers > 1:
            self.pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, initargs)
        else:
            self.pool = None
            _init_worker(*initargs)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def _results(self, units: Iterable[Unit]) -> Iterator[tuple[list[Unit], tuple]]:
        if self.pool is None:
            for batch in _batches(units):
                yield batch, _encode_units(batch)
            return
        # Never more than a few batches in flight: memory stays bounded whatever the corpus.
        pending: deque = deque()
        for batch in _batches(units):
            pending.append((batch, self.pool.apply_async(_encode_units, (batch,))))
            if len(pending) >= 2 * self.workers:
                batch_, result = pending.popleft()
                yield batch_, result.get()
        while pending:
            batch_, result = pending.popleft()
            yield batch_, result.get()

    def encode(self, part: Part, folder: Path) -> Encoded:
        name = f"{part.split}.{part.source}"
        enc = Encoded(part, folder / f"{name}.bin", folder / f"{name}.ends")
        bar = tqdm(total=part.num_units, desc=f"encode {part.source}/{part.split}", unit="doc", file=sys.stderr)
        with open(enc.bin_path, "wb") as bin_file, open(enc.ends_path, "wb") as ends_file, bar:
            for batch, (ids, tokens, nbytes) in self._results(part.make_units()):
                ids.tofile(bin_file)
                cum_tokens = enc.tokens + np.cumsum(tokens)
                cum_bytes = enc.bytes + np.cumsum(nbytes)
                doc_end = np.array([u[2] for u in batch], dtype=bool)
                np.stack([cum_tokens[doc_end], cum_bytes[doc_end]], axis=1).astype(np.int64).tofile(ends_file)
                enc.tokens, enc.bytes = int(cum_tokens[-1]), int(cum_bytes[-1])
                enc.documents += int(doc_end.sum())
                bar.update(len(batch))
        return enc


# ---------------------------------------------------------------------------------------
# Mixing and writing the split files


def fractional_documents(num_documents: int, fraction: float) -> np.ndarray:
    """Indices of the documents a fractional weight adds: ``floor(n * fraction)`` of them,
    evenly spread (document i is taken when floor((i+1)f) > floor(i f)); deterministic."""
    i = np.arange(num_documents, dtype=np.float64)
    return np.nonzero(np.floor((i + 1) * fraction) > np.floor(i * fraction))[0]


def _copy_documents(enc: Encoded, docs: np.ndarray, out_file, dtype: np.dtype) -> tuple[int, int]:
    """Append the token ids of documents ``docs`` of ``enc``; returns (tokens, bytes)."""
    if len(docs) == 0 or enc.tokens == 0:
        return 0, 0
    ends = np.fromfile(enc.ends_path, dtype=np.int64).reshape(-1, 2)
    starts = np.vstack([[0, 0], ends[:-1]])
    ids = np.memmap(enc.bin_path, dtype=dtype, mode="r")
    tokens = nbytes = 0
    for d in docs:
        ids[starts[d, 0] : ends[d, 0]].tofile(out_file)
        tokens += int(ends[d, 0] - starts[d, 0])
        nbytes += int(ends[d, 1] - starts[d, 1])
    del ids
    return tokens, nbytes


def write_split(path: Path, encoded: list[Encoded], weights: dict[str, float], dtype: np.dtype) -> dict:
    """Write one split file atomically: each part repeated by its weight; returns its counts."""
    stats: dict[str, Any] = {"file": path.name, "tokens": 0, "bytes": 0, "documents": 0, "by_source": {}}
    with atomic_path(path) as tmp, open(tmp, "wb") as out_file:
        for enc in encoded:
            weight = weights.get(enc.part.source, 1.0)
            whole, fraction = int(weight), weight - int(weight)
            for _ in range(whole):
                with open(enc.bin_path, "rb") as src:
                    shutil.copyfileobj(src, out_file, 1 << 24)
            docs = fractional_documents(enc.documents, fraction) if fraction > 0 else np.zeros(0, np.int64)
            extra_tokens, extra_bytes = _copy_documents(enc, docs, out_file, dtype)
            counts = {
                "tokens": whole * enc.tokens + extra_tokens,
                "bytes": whole * enc.bytes + extra_bytes,
                "documents": whole * enc.documents + len(docs),
                "weight": weight,
                "unique_documents": enc.documents,
            }
            if enc.part.variant:
                counts["variant"] = enc.part.variant
            stats["by_source"][enc.part.source] = counts
            for key in ("tokens", "bytes", "documents"):
                stats[key] += counts[key]
    return stats


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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data-dir", help="local copies of the releases (e.g. ../shared/data); default: the Hugging Face Hub")
    p.add_argument("--text", nargs="+", metavar="FILE", default=[], help="your own corpus: plain text or .jsonl with a 'text' field")
    p.add_argument(
        "--sources",
        help="comma-separated subset of wikitext,dailydialog,text (default: wikitext,dailydialog; only text when --text is given)",
    )
    p.add_argument("--wikitext", default="wikitext-2-raw-v1", choices=sources.HUB_WIKITEXT_CONFIGS, help="WikiText config on the Hub")
    p.add_argument(
        "--wikitext-variant",
        default="auto",
        choices=("auto", "raw", "tokens"),
        help="with --data-dir: wiki.*.raw or wiki.*.tokens (auto: the variant of the train file, for every split)",
    )
    p.add_argument("--keep-tokenized", action="store_true", help="keep the releases' tokenised text instead of natural text")
    p.add_argument("--tokenizer", help="reuse this tokenizer.json instead of training one")
    p.add_argument("--vocab-size", type=int, default=16384, help="total ids of a trained tokenizer, incl. 16 reserved specials")
    p.add_argument("--out", default="data", help="output folder")
    p.add_argument("--splits", default="train,val", help="train,val (default), or test on its own")
    p.add_argument("--mix", help="training weights, e.g. wikitext=1,dailydialog=2 (repeats documents; fractions allowed)")
    p.add_argument("--text-val-every", type=int, default=100, help="hold out every N-th piece of --text for val.bin")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8), help="encoding processes (1: no pool)")
    p.add_argument("--force", action="store_true", help="redo everything even if meta.json says it is up to date")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    splits = parse_splits(args.splits)
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
    if args.text_val_every < 2:
        raise UserError(f"--text-val-every {args.text_val_every}: must be at least 2")
    if args.vocab_size < 256 + NUM_RESERVED_SPECIAL and not args.tokenizer:
        raise UserError(f"--vocab-size {args.vocab_size}: must be at least {256 + NUM_RESERVED_SPECIAL} (256 bytes + specials)")
    detokenize = not args.keep_tokenized
    out = Path(args.out)

    # 1. Check every input and the tokenizer before writing anything.
    parts = resolve_parts(args, source_names, splits)
    train_parts = [p for p in parts if p.split == "train"]
    if "train" in splits and not any(p.num_units for p in train_parts):
        raise UserError("the training split has no documents")
    tokenizer_path = Path(args.tokenizer) if args.tokenizer else None
    if tokenizer_path is None and "train" not in splits:
        tokenizer_path = out / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise UserError(f"{tokenizer_path}: no tokenizer to encode {', '.join(splits)} with; prepare train,val first or pass --tokenizer")
    given_tok = BPETokenizer.load(tokenizer_path) if tokenizer_path else None

    settings = {
        "format_version": FORMAT_VERSION,
        "splits": splits,
        "sources": source_names,
        "mix": weights if "train" in splits else None,
        "detokenized": detokenize,
        "tokenizer": given_tok.hash if given_tok else {"train": True, "vocab_size": args.vocab_size},
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
    if given_tok is not None:
        tok = given_tok
        if tokenizer_path.resolve() != (out / "tokenizer.json").resolve():
            tok.save(out / "tokenizer.json")
    else:
        tok = _trained_tokenizer(out, train_parts, args.vocab_size, detokenize, args.force)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 65536 else np.uint32)

    # 3. Encode each part into a temporary folder, then write each split file.
    split_stats = {}
    encoder = Encoder(out / "tokenizer.json", detokenize, dtype, max(1, args.workers))
    try:
        with tempfile.TemporaryDirectory(prefix=".prepare-", dir=out) as tmp:
            for split in splits:
                encoded = [encoder.encode(p, Path(tmp)) for p in parts if p.split == split]
                split_weights = weights if split == "train" else {}
                stats = write_split(out / f"{SPLIT_NAMES[split]}.bin", encoded, split_weights, dtype)
                stats["fingerprint"] = fp
                split_stats[SPLIT_NAMES[split]] = stats
    finally:
        encoder.close()

    # 4. meta.json, last. A test split keeps the train/val entries if the tokenizer is the same.
    kept = {}
    if "train" not in splits and old_meta and old_meta.get("tokenizer_hash") == tok.hash:
        kept = {k: v for k, v in old_meta.get("splits", {}).items() if k not in split_stats}
    elif "test" not in splits:
        (out / "test.bin").unlink(missing_ok=True)  # encoded with another tokenizer or settings
    meta = {
        "format_version": FORMAT_VERSION,
        "created_by": "src/data/prepare_data.py",
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
    write_json_atomic(out / "meta.json", meta)
    _print_summary(out, meta, split_stats, time.time() - started)
    return 0


def _trained_tokenizer(out: Path, train_parts: list[Part], vocab_size: int, detokenize: bool, force: bool) -> BPETokenizer:
    """Train the tokenizer on the training texts and save it, or reuse the one a previous
    (perhaps interrupted) run trained from the same inputs and settings.

    ``.tokenizer.fingerprint`` beside tokenizer.json records what it was trained from and
    its hash; the mix weights are not part of it, so changing only --mix keeps it.
    """
    stamp_path = out / ".tokenizer.fingerprint"
    stamp = fingerprint({"vocab_size": vocab_size, "detokenized": detokenize, "format_version": FORMAT_VERSION}, train_parts)
    if not force and stamp_path.is_file() and (out / "tokenizer.json").is_file():
        recorded = stamp_path.read_text(encoding="utf-8").split()
        try:
            tok = BPETokenizer.load(out / "tokenizer.json")
        except UserError:
            tok = None
        if tok is not None and recorded == [stamp, tok.hash]:
            print(f"reusing {out / 'tokenizer.json'}: trained from the same inputs and settings", file=sys.stderr)
            return tok
    print(f"training the tokenizer (vocab {vocab_size}) on the training split", file=sys.stderr)
    texts = (t for p in train_parts for u in p.make_units() for t in unit_texts(u, detokenize))
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
    print(f"wrote {out}/ in {seconds:.1f} s: vocab {meta['vocab_size']}, {meta['dtype']}, "
          f"{'detokenised' if meta['detokenized'] else 'release tokenisation kept'}")
    print(f"{'split':<6} {'source':<12} {'weight':>6} {'documents':>10} {'tokens':>12} {'bytes':>12} {'bytes/tok':>9}")
    for split, stats in split_stats.items():
        rows = list(stats["by_source"].items()) + [("all", {**stats, "weight": ""})]
        for source, s in rows:
            ratio = s["bytes"] / s["tokens"] if s["tokens"] else 0.0
            print(f"{split:<6} {source:<12} {s['weight']!s:>6} {s['documents']:>10,} {s['tokens']:>12,} {s['bytes']:>12,} {ratio:>9.2f}")


if __name__ == "__main__":
    run_cli(main)
