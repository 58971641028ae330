"""The corpus of a data-preparation run: the sources' splits as *parts*, each a checked set of
inputs with a re-iterable stream of *units* (the documents, or pieces of them).

A unit is ``(kind, payload, ends_document)``; kind "wiki": the release text of an article;
"dialog": a dialogue's utterances (release text); "text": the user's text, as is.
``unit_texts`` turns a unit into the texts the tokenizer sees (detokenised or not).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from src.data import sources
from src.data.detokenize import detokenize_dailydialog, detokenize_wikitext
from src.utils.cli import UserError
from src.utils.integrity import sha256_file

Unit = tuple[str, Any, bool]


@dataclass
class Part:
    """One source's split: its checked inputs, and ``make_units()``, a fresh stream of its
    units on every call (counted once by :func:`resolve_parts` into ``num_units``)."""

    source: str
    split: str
    inputs: list[dict]  # recorded in meta.json: path or hub id, sha256 / fingerprint, bytes
    make_units: Callable[[], Iterator[Unit]]
    variant: str | None = None  # WikiText: "raw" or "tokens"
    num_units: int = 0
    input_bytes: int = 0
    text_chars: int = 0  # characters of release text in its units (counted with num_units)


def _file_record(info: sources.InputFile) -> dict:
    return {"path": str(info.path), "sha256": info.sha256, "bytes": info.bytes}


def _local_wikitext(data_dir: Path, split: str, variant: str, size: str | None) -> Part:
    path = sources.find_wikitext_file(data_dir, split, variant, size)
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
        record["files"] = [{"path": str(f), "sha256": sha256_file(f)} for f in files]
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


# A --text file is cut into pieces (at line ends) of at most sources.TEXT_CHUNK_CHARS; a smaller
# file into about TEXT_MIN_PIECES pieces of at least TEXT_MIN_PIECE_CHARS, so that even a small
# corpus has a piece to hold out for validation.
TEXT_MIN_PIECES = 10
TEXT_MIN_PIECE_CHARS = 1024


def _text_parts(paths: list[Path], splits: list[str], every: int) -> list[Part]:
    """The user's files as parts: every ``every``-th piece is held out for validation (at
    least one piece). Each file stays one document (a JSONL record: one each) in the
    training split, the held-out pieces cut out of it; each held-out piece is a document.

    Raises UserError for a file with no text (only whitespace), or, when validation is
    prepared, for a corpus too small to hold out a piece, stating the minimum.
    """
    infos = [sources.check_text_file(p) for p in paths]
    records = [_file_record(i) for i in infos]
    piece_chars = [min(sources.TEXT_CHUNK_CHARS, max(TEXT_MIN_PIECE_CHARS, i.bytes // TEXT_MIN_PIECES))
                   for i in infos]
    total = 0
    for path, chars in zip(paths, piece_chars):
        has_text = False
        for text, _ in sources.iter_text_file(path, chars):
            total += 1
            has_text = has_text or bool(text.strip())
        if not has_text:
            raise UserError(f"{path}: no text in it (only whitespace)")
    held_out = {i for i in range(total) if i % every == every - 1}
    if not held_out and total >= 2:
        held_out = {total - 1}  # a small corpus still gets a validation piece
    if "validation" in splits and not held_out:
        size = sum(i.bytes for i in infos)
        raise UserError(
            f"--text: {size:,} bytes in one piece is too little text to hold out a validation "
            f"share; give at least {2 * TEXT_MIN_PIECE_CHARS:,} bytes on several lines "
            "(or 2 JSONL records)")

    def units(want_validation: bool) -> Iterator[Unit]:
        index = 0
        for path, chars in zip(paths, piece_chars):
            last_train = None  # held back: the file's last training piece ends its document
            for text, ends in sources.iter_text_file(path, chars):
                held = index in held_out
                index += 1
                if want_validation and held:
                    yield ("text", text, True)
                elif not want_validation and not held:
                    if last_train is not None:
                        yield last_train
                    last_train = ("text", text, ends)
            if last_train is not None:
                yield (last_train[0], last_train[1], True)

    parts = []
    for split in splits:
        if split == "train":
            parts.append(Part("text", split, records, lambda: units(False)))
        elif split == "validation":
            parts.append(Part("text", split, records, lambda: units(True)))
    return parts


def resolve_parts(
    source_names: list[str],
    splits: list[str],
    *,
    data_dir: Path | None,
    hub_wikitext: str,
    wikitext_variant: str,
    text_files: list[Path],
    text_val_every: int,
    wikitext_size: str | None = None,
) -> list[Part]:
    """Find, check and count every input, before anything is written.

    Releases are read from ``data_dir`` when given (WikiText in ``wikitext_variant``, of
    release ``wikitext_size`` "2" or "103" when given),
    else from the Hub (WikiText config ``hub_wikitext``); the user's ``text_files`` hold
    out every ``text_val_every``-th piece for validation and have no test split.
    """
    parts: list[Part] = []
    for source in source_names:
        if source == "text":
            if "test" not in splits:
                parts.extend(_text_parts(text_files, splits, text_val_every))
            continue
        for split in splits:
            if source == "wikitext":
                part = (_local_wikitext(data_dir, split, wikitext_variant, wikitext_size) if data_dir
                        else _hub_wikitext(hub_wikitext, split))
            else:
                part = _local_dailydialog(data_dir, split) if data_dir else _hub_dailydialog(split)
            parts.append(part)
    for part in parts:  # a full streaming pass: finds malformed lines now, not mid-way
        for unit in part.make_units():
            part.num_units += 1
            part.text_chars += unit_chars(unit)
        part.input_bytes = sum(r.get("bytes", 0) for r in part.inputs)
        if part.num_units == 0 and part.source != "text":
            where = part.inputs[0].get("path") or part.inputs[0].get("hub")
            raise UserError(f"{where}: no {part.source} documents in it")
    return parts


def unit_texts(unit: Unit, detokenize: bool) -> list[str]:
    """The texts a unit is made of: an article, a dialogue's utterances, a text piece."""
    kind, payload, _ = unit
    if kind == "wiki":
        return [detokenize_wikitext(payload) if detokenize else payload]
    if kind == "dialog":
        return [detokenize_dailydialog(u) for u in payload] if detokenize else list(payload)
    return [payload]


def unit_chars(unit: Unit) -> int:
    """Characters of release text in a unit (what tokenizer sampling is sized by)."""
    kind, payload, _ = unit
    return sum(map(len, payload)) if kind == "dialog" else len(payload)


def spread_sample(units: Iterable[Unit], fraction: float) -> Iterator[Unit]:
    """About ``fraction`` of ``units``, evenly spread through the stream (unit i is kept when
    floor((i+1) f) > floor(i f)), so a sample of a large corpus sees all of it, not its start.
    Deterministic; ``fraction`` >= 1 keeps everything."""
    for i, unit in enumerate(units):
        if fraction >= 1 or math.floor((i + 1) * fraction) > math.floor(i * fraction):
            yield unit
