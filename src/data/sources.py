"""Readers of the corpora: WikiText and DailyDialog (local release files or the Hugging
Face Hub) and the user's own text files.

Everything here returns text as the releases have it (pre-tokenised, see detokenize.py);
data preparation and evaluation decide what to do with it. Split names are the Hub's:
"train", "validation", "test" ("val" and "valid" are accepted too).

Local layouts (``--data-dir DIR``), as the original releases ship them:

* WikiText: ``wiki.{train,valid,test}.raw`` (raw release) or ``wiki.*.tokens``
  (tokenised release, rare words replaced by ``<unk>``), in DIR itself or in one of its
  subfolders named ``wikitext*`` (e.g. ``wikitext-2-raw/``, ``wikitext-2/``).
  File-picking rule: one variant for every split, so that validation text is the same
  kind of text as training text: the raw release when ``wiki.train.raw`` is there, else the
  tokenised one when ``wiki.train.tokens`` is (``../shared/data`` has only the latter for
  training, so its ``wiki.valid.tokens`` is used, not its ``wiki.valid.raw``); without any
  training file (or without that variant's file for a split), the raw file when there is
  one, else the tokens file.
  ``variant="raw"`` or ``"tokens"`` forces one. ``size="2"`` or ``"103"``
  (``prepare_data.py --wikitext 103``) keeps only the subfolders of that release
  (``wikitext-103/``, ``wikitext-103-raw/``, ...; files in DIR itself always count). Two
  candidates of the same variant (e.g. wikitext-2-raw/ and wikitext-103-raw/ side by side,
  without a size) are an error: point ``--data-dir`` at the one you mean or give the size.
* DailyDialog: ``{train,validation,test}/dialogues_<split>.txt`` in ``DIR/dailydialog``,
  ``DIR/ijcnlp_dailydialog`` or DIR itself; one dialogue per line, each utterance
  followed by ``__eou__``.

Every problem with an input (missing folder or file, empty file, bytes that are not
UTF-8, a dialogue line without ``__eou__``, a bad JSONL line) raises
:class:`~src.utils.cli.UserError` naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from src.utils.cli import UserError

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}
_WIKITEXT_FILE_SPLIT = {"train": "train", "validation": "valid", "test": "test"}
WIKITEXT_VARIANTS = ("raw", "tokens")

HUB_WIKITEXT = "Salesforce/wikitext"
HUB_WIKITEXT_CONFIGS = ("wikitext-2-raw-v1", "wikitext-2-v1", "wikitext-103-raw-v1", "wikitext-103-v1")
WIKITEXT_SIZES = ("2", "103")  # --wikitext 2 / 103: the release, raw text from the Hub
# The Hub's DailyDialog is a loading-script dataset, which datasets>=4 refuses to run; the
# Hub's Parquet conversion of it (same rows: "dialog", "act", "emotion") lives on this branch.
HUB_DAILYDIALOG = "li2017dailydialog/daily_dialog"
HUB_DAILYDIALOG_REVISION = "refs/convert/parquet"

EOU = "__eou__"
_TOP_HEADING = re.compile(r"^ ?= [^=].* = ?$")  # " = Title = ", not " = = Section = = "
_READ_CHUNK = 1 << 20


def canonical_split(split: str) -> str:
    """``"val"`` -> ``"validation"`` etc.; raises UserError for an unknown split."""
    name = _SPLIT_ALIASES.get(split, split)
    if name not in SPLITS:
        raise UserError(f"unknown split {split!r}; expected one of train, validation, test")
    return name


# ---------------------------------------------------------------------------------------
# Files: hashing and strict UTF-8 checking in one streaming pass


@dataclass(frozen=True)
class InputFile:
    """A checked input file: its path, sha256 and size in bytes."""

    path: Path
    sha256: str
    bytes: int


def check_text_file(path: str | os.PathLike) -> InputFile:
    """Hash ``path`` and check it is non-empty UTF-8, reading it in 1 MiB chunks.

    Raises UserError naming the file for a missing or empty file, or for the first byte
    that is not UTF-8 (with its offset).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    digest = hashlib.sha256()
    offset = 0  # file offset of the first byte of `pending`
    pending = b""  # an incomplete character carried over to the next chunk
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_READ_CHUNK)
            digest.update(chunk)
            data = pending + chunk
            try:
                data.decode("utf-8")
                offset, pending = offset + len(data), b""
            except UnicodeDecodeError as exc:
                truncated_at_end = exc.reason == "unexpected end of data" and chunk
                if not truncated_at_end:
                    bad = offset + exc.start
                    raise UserError(
                        f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {bad})"
                    ) from None
                offset, pending = offset + exc.start, data[exc.start :]
            if not chunk:
                break
    if offset == 0:
        raise UserError(f"{path}: file is empty")
    return InputFile(path, digest.hexdigest(), offset)


def iter_lines(path: Path) -> Iterator[str]:
    """The lines of a checked UTF-8 file, without their line ends, read lazily."""
    with open(path, encoding="utf-8", newline="") as f:
        for line in f:
            yield line.rstrip("\r\n")


# ---------------------------------------------------------------------------------------
# WikiText


def wikitext_size_of(config: str) -> str | None:
    """``"2"`` / ``"103"`` for a size or a Hub config name (``wikitext-103-raw-v1``), else None."""
    match = re.fullmatch(r"(?:wikitext-)?(2|103)(?:-.*)?", config.lower())
    return match.group(1) if match else None


def hub_wikitext_config(name: str) -> str:
    """``--wikitext 2`` / ``103`` -> the Hub config of that release's raw text; a config name
    is returned as is."""
    return f"wikitext-{name}-raw-v1" if name in WIKITEXT_SIZES else name


def find_wikitext_file(data_dir: str | os.PathLike, split: str, variant: str = "auto",
                       size: str | None = None) -> Path:
    """The local WikiText file of ``split`` (see the module docstring for the rule), of the
    release ``size`` ("2" or "103") when given."""
    data_dir = Path(data_dir)
    split = canonical_split(split)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: data directory not found")
    if variant not in ("auto", *WIKITEXT_VARIANTS):
        raise UserError(f"unknown WikiText variant {variant!r}; expected auto, raw or tokens")
    folders = [data_dir] + sorted(
        p for p in data_dir.iterdir() if p.is_dir() and p.name.lower().startswith("wikitext")
        and (size is None or wikitext_size_of(p.name) == size)
    )
    stem = f"wiki.{_WIKITEXT_FILE_SPLIT[split]}"
    if variant == "auto":
        train_variants = [kind for kind in WIKITEXT_VARIANTS
                          if any((folder / f"wiki.train.{kind}").is_file() for folder in folders)]
        first = train_variants[0] if train_variants else "raw"
        wanted = (first, *(kind for kind in WIKITEXT_VARIANTS if kind != first))
    else:
        wanted = (variant,)
    for kind in wanted:
        found = [folder / f"{stem}.{kind}" for folder in folders if (folder / f"{stem}.{kind}").is_file()]
        if len(found) > 1:
            raise UserError(
                f"{data_dir}: several WikiText {split} files ({', '.join(str(p) for p in found)}); "
                "point --data-dir at the folder of the one you mean, or give --wikitext 2 or 103"
            )
        if found:
            return found[0]
    names = " or ".join(f"{stem}.{kind}" for kind in wanted)
    where = f"wikitext-{size}*/" if size else "wikitext*/"
    raise UserError(f"{data_dir}: no WikiText {split} file ({names}) in it or its {where} folders")


def wikitext_variant_of(path: Path) -> str:
    """``"raw"`` or ``"tokens"``, from the file name."""
    return "raw" if path.suffix == ".raw" else "tokens"


def iter_wikitext_articles(lines: Iterable[str]) -> Iterator[str]:
    """Split WikiText lines into articles, streaming.

    An article starts at a top-level heading `` = Title = `` that stands between two
    blank lines (section headings are `` = = Section = = ``; a few table lines also look
    like `` = Goals ; A = `` but are not surrounded by blank lines). Each article is
    yielded as its release lines joined by "\\n", from its heading to its last non-blank
    line; text before the first heading (normally only a blank line) is dropped if blank,
    else yielded as an article of its own. WikiText-2 has 600 / 60 / 60 articles.
    """
    article: list[str] = []
    window: list[str] = [""]  # the last three lines (blank?, heading?, blank?); file start counts as blank

    def flush(lines_: list[str]) -> Iterator[str]:
        while lines_ and not lines_[-1].strip():
            lines_.pop()
        if lines_:
            yield "\n".join(lines_)

    for line in lines:
        window.append(line)
        if len(window) < 3:
            continue
        before, middle, after = window
        if not before.strip() and _TOP_HEADING.match(middle) and not after.strip():
            yield from flush(article)
            article, window = [middle], [after]
        else:
            article.append(window.pop(0))
    article.extend(window)
    yield from flush(article)


@dataclass
class WikiTextSplit:
    """One split of WikiText: its release lines and where they came from."""

    source: str  # a file path, or "hub:<dataset>/<config>"
    variant: str  # "raw" or "tokens"
    lines: list[str] = field(repr=False)

    def text(self) -> str:
        """The release text (one "\\n"-terminated line per line), e.g. for word-level perplexity."""
        return "".join(line + "\n" for line in self.lines)

    def articles(self, detokenize: bool = True) -> list[str]:
        """The split's articles, detokenised to natural text unless ``detokenize=False``."""
        from src.data.detokenize import detokenize_wikitext

        found = list(iter_wikitext_articles(self.lines))
        return [detokenize_wikitext(a) for a in found] if detokenize else found


def read_wikitext(data_dir: str | os.PathLike, split: str, variant: str = "auto") -> WikiTextSplit:
    """A local WikiText split (checked: UTF-8, not empty)."""
    path = find_wikitext_file(data_dir, split, variant)
    check_text_file(path)
    return WikiTextSplit(str(path), wikitext_variant_of(path), list(iter_lines(path)))


# ---------------------------------------------------------------------------------------
# DailyDialog


def find_dailydialog_file(data_dir: str | os.PathLike, split: str) -> Path:
    """The local ``dialogues_<split>.txt`` of ``split``."""
    data_dir = Path(data_dir)
    split = canonical_split(split)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: data directory not found")
    name = f"dialogues_{split}.txt"
    for folder in (data_dir / "dailydialog", data_dir / "ijcnlp_dailydialog", data_dir):
        for candidate in (folder / split / name, folder / name):
            if candidate.is_file():
                return candidate
    raise UserError(f"{data_dir}: no DailyDialog {split} file (dailydialog/{split}/{name})")


def parse_dialogue(line: str, where: str) -> list[str]:
    """The utterances of one release line (each followed by ``__eou__``), stripped.

    ``where`` ("file:line") names the line in the error for a line without ``__eou__``.
    """
    if EOU not in line:
        raise UserError(f"{where}: dialogue line without {EOU}")
    *utterances, rest = line.split(EOU)
    if rest.strip():
        raise UserError(f"{where}: text after the last {EOU}: {rest.strip()[:40]!r}")
    return [u.strip() for u in utterances]


def iter_dailydialog_file(path: Path) -> Iterator[list[str]]:
    """The dialogues of a release file, streaming; blank lines are skipped."""
    for number, line in enumerate(iter_lines(path), start=1):
        if line.strip():
            yield parse_dialogue(line, f"{path}:{number}")


def read_dailydialog(data_dir: str | os.PathLike, split: str) -> list[list[str]]:
    """A local DailyDialog split: one list of utterances (release text) per dialogue."""
    path = find_dailydialog_file(data_dir, split)
    check_text_file(path)
    return list(iter_dailydialog_file(path))


# ---------------------------------------------------------------------------------------
# The user's own text: plain text files and JSONL with a "text" field

TEXT_CHUNK_CHARS = 1 << 16


def iter_text_file(path: Path, piece_chars: int | None = None) -> Iterator[tuple[str, bool]]:
    """A user's text file as ``(text, ends_document)`` pieces, streaming.

    ``*.jsonl``: one document per line, from its "text" field. Any other file: the whole
    file is one document, cut into pieces of about ``piece_chars`` (default
    ``TEXT_CHUNK_CHARS``, 64 KiB) at line ends (so encoding runs in parallel and in bounded
    memory, and a share can be held out for validation); only the last piece ends the
    document, and no piece is empty unless the file is.
    """
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(iter_lines(path), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f"{path}:{number}: JSONL record without a string 'text' field")
            yield record["text"], True
        return
    piece_chars = piece_chars or TEXT_CHUNK_CHARS
    piece: list[str] = []
    size = 0
    full = None  # the last full piece, held back until we know whether it ends the file
    with open(path, encoding="utf-8", newline="") as f:
        for line in f:
            piece.append(line)
            size += len(line)
            if size >= piece_chars:
                if full is not None:
                    yield full, False
                full, piece, size = "".join(piece), [], 0
    if piece:
        if full is not None:
            yield full, False
        full = "".join(piece)
    yield full or "", True


# ---------------------------------------------------------------------------------------
# The Hugging Face Hub


def _hub_unreachable(what: str, detail: str = "") -> UserError:
    why = f" ({detail})" if detail else ""
    return UserError(
        f"cannot reach the Hugging Face Hub to load {what}{why}; "
        "use --data-dir DIR with local copies of the releases (e.g. --data-dir ../shared/data)"
    )


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hub's host accepts a connection (True when offline mode uses the cache)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout):
            return True
    except OSError:
        return False


def _load_hub(what: str, *args: Any, **kwargs: Any) -> Any:
    """``datasets.load_dataset(*args, **kwargs)``, with a one-line error when it cannot."""
    if not hub_reachable():
        raise _hub_unreachable(what)
    try:
        import datasets
    except ImportError:
        raise UserError("the 'datasets' package is needed to load from the Hub: pip install datasets") from None
    try:
        return datasets.load_dataset(*args, **kwargs)
    except (ConnectionError, TimeoutError, OSError) as exc:
        raise _hub_unreachable(what, str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__) from None


def hub_fingerprint(dataset: Any) -> str:
    """A ``datasets.Dataset``'s identity: its fingerprint, else a hash of its rows."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint:
        return str(fingerprint)
    return hashlib.sha256(json.dumps(list(dataset), sort_keys=True).encode()).hexdigest()


def _rows(dataset: Any, column: str) -> Iterator[Any]:
    """One column of a Dataset, row by row, read in batches (much faster than per row)."""
    for batch in dataset.iter(batch_size=1000):
        yield from batch[column]


def open_hub_wikitext(name: str, split: str) -> Any:
    """The ``datasets.Dataset`` of a WikiText split on the Hub (config ``name`` of
    ``Salesforce/wikitext``: ``wikitext-2-raw-v1``, ...). Its rows are the release lines."""
    if name not in HUB_WIKITEXT_CONFIGS:
        raise UserError(f"unknown WikiText config {name!r}; expected one of {', '.join(HUB_WIKITEXT_CONFIGS)}")
    return _load_hub(f"{HUB_WIKITEXT} {name}", HUB_WIKITEXT, name, split=canonical_split(split))


def iter_hub_wikitext_lines(dataset: Any) -> Iterator[str]:
    """The release lines of a Hub WikiText split, without line ends ("" for a blank line)."""
    for text in _rows(dataset, "text"):
        yield text.rstrip("\n")


def hub_wikitext_variant(name: str) -> str:
    return "raw" if "-raw-" in name else "tokens"


def load_hub_wikitext(name: str, split: str) -> WikiTextSplit:
    """A WikiText split from the Hub, in memory (like :func:`read_wikitext`)."""
    dataset = open_hub_wikitext(name, split)
    lines = list(iter_hub_wikitext_lines(dataset))
    return WikiTextSplit(f"hub:{HUB_WIKITEXT}/{name}", hub_wikitext_variant(name), lines)


def open_hub_dailydialog(split: str) -> Any:
    """The ``datasets.Dataset`` of a DailyDialog split, from the Hub's Parquet conversion."""
    split = canonical_split(split)
    return _load_hub(HUB_DAILYDIALOG, HUB_DAILYDIALOG, revision=HUB_DAILYDIALOG_REVISION, split=split)


def iter_hub_dialogues(dataset: Any) -> Iterator[list[str]]:
    """The dialogues of a Hub DailyDialog split: utterances stripped, empty ones dropped
    (the Hub rows keep the release's spaces around each utterance)."""
    for dialog in _rows(dataset, "dialog"):
        yield [u.strip() for u in dialog if u.strip()]


def load_hub_dailydialog(split: str) -> list[list[str]]:
    """A DailyDialog split from the Hub (like :func:`read_dailydialog`)."""
    return list(iter_hub_dialogues(open_hub_dailydialog(split)))
