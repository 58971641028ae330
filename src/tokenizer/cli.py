"""The tokenizer's command line: train, encode, decode, stats, export.

Usage (run ``python src/tokenizer/cli.py <command> --help`` for details; ``python -m
src.tokenizer.cli`` from the repository root works too):
    python src/tokenizer/cli.py train --input FILE [FILE ...] --vocab-size N --output tokenizer.json
    python src/tokenizer/cli.py encode --tokenizer tokenizer.json [--input FILE]    # ids, one per line
    python src/tokenizer/cli.py decode --tokenizer tokenizer.json [--input FILE]    # ids -> text
    python src/tokenizer/cli.py stats --tokenizer tokenizer.json --input FILE
    python src/tokenizer/cli.py export --tokenizer tokenizer.json --format hf|tiktoken --output PATH
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

if __name__ == "__main__":  # run as a file: put the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from src.tokenizer import formats
from src.tokenizer.bpe import BPETokenizer, progress_bar
from src.tokenizer.bpe_train import SPLIT_PATTERN, iter_blocks
from src.tokenizer.special_tokens import NUM_RESERVED_SPECIAL
from src.utils.atomic import write_text_atomic
from src.utils.cli import UserError


def _read_text(path: str) -> str:
    """A UTF-8 text file, or stdin for "-"; UserError naming the file otherwise."""
    if path == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise UserError(f"{path}: file not found") from None
        except IsADirectoryError:
            raise UserError(f"{path}: is a directory, expected a text file") from None
        except OSError as exc:
            raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{_name(path)}: not UTF-8 text (invalid byte at offset {exc.start})") from None


def _name(path: str) -> str:
    return "stdin" if path == "-" else path


def _load(path: str) -> BPETokenizer:
    return BPETokenizer.load(path)  # TokenizerFileError is a UserError: one line, exit 2


def _write_output(path: str | None, text: str) -> None:
    if path is None or path == "-":  # bytes: exact UTF-8 whatever the locale, no newline mapping
        sys.stdout.flush()
        sys.stdout.buffer.write(text.encode("utf-8"))
        sys.stdout.buffer.flush()
    else:
        write_text_atomic(path, text)


def _cmd_train(args) -> None:
    min_size = 256 + NUM_RESERVED_SPECIAL
    if args.vocab_size < min_size:
        raise UserError(f"--vocab-size {args.vocab_size} is too small: it must be at least {min_size} (256 bytes + {NUM_RESERVED_SPECIAL} special ids)")
    texts = [_read_text(p) for p in args.input]  # read all first: fail before the long part
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = BPETokenizer.train(texts, args.vocab_size, show_progress=not args.quiet)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    tok.save(args.output)
    print(f"wrote {args.output}: vocab_size {tok.vocab_size} ({len(tok.merges)} merges), hash {tok.hash[:16]}", file=sys.stderr)


def _cmd_encode(args) -> None:
    tok = _load(args.tokenizer)
    text = _read_text(args.input)
    encode = tok.encode_with_special if args.special else tok.encode
    # Big inputs go block by block (cut where no chunk or special token can span the cut,
    # so the ids are the same) to show progress.
    blocks = list(iter_blocks(text)) if tok.pattern == SPLIT_PATTERN else [text]
    bar = progress_bar(not args.quiet and len(blocks) > 1, len(text), "encoding", "char")
    ids: list[int] = []
    try:
        for block in blocks:
            ids.extend(encode(block))
            if bar is not None:
                bar.update(len(block))
    except ValueError as exc:
        raise UserError(f"{_name(args.input)}: {exc}") from None
    if bar is not None:
        bar.close()
    _write_output(args.output, "".join(f"{i}\n" for i in ids))


def _cmd_decode(args) -> None:
    tok = _load(args.tokenizer)
    ids: list[int] = []
    for n, line in enumerate(_read_text(args.input).splitlines(), 1):
        for word in line.split():
            try:
                ids.append(int(word))
            except ValueError:
                raise UserError(f"{_name(args.input)}: line {n}: {word!r} is not a token id") from None
    try:
        text = tok.decode(ids)
    except ValueError as exc:
        raise UserError(f"{_name(args.input)}: {exc}") from None
    _write_output(args.output, text)


def _cmd_stats(args) -> None:
    tok = _load(args.tokenizer)
    print(f"tokenizer {args.tokenizer}: vocab_size {tok.vocab_size}, {len(tok.merges)} merges, "
          f"hash {tok.hash[:16]}, backend {tok.backend}")
    print(f"{'file':<50} {'bytes':>12} {'tokens':>11} {'bytes/token':>11} {'byte-level':>10} {'lossless':>8}")
    for path in args.input:
        text = _read_text(path)
        try:
            ids = tok.encode(text)
        except ValueError as exc:
            raise UserError(f"{path}: {exc}") from None
        n_bytes = len(text.encode("utf-8"))
        # Ids below 128 are ASCII bytes; 128..255 are pieces of characters the merges never
        # learnt: "unknown" to a word-level tokenizer, still exact here.
        fallback = sum(1 for i in ids if 128 <= i < 256)
        lossless = tok.decode(ids) == text
        print(f"{path:<50} {n_bytes:>12,} {len(ids):>11,} {n_bytes / max(1, len(ids)):>11.3f} "
              f"{fallback:>10,} {'yes' if lossless else 'NO':>8}")
        if not lossless:
            raise UserError(f"{path}: decode(encode(text)) differs from the text (a bug, please report it)")
    print("no unknown tokens: every byte has an id (byte-level = tokens for bytes >= 128 left unmerged)")


def _cmd_export(args) -> None:
    tok = _load(args.tokenizer)
    save = formats.save_hf if args.format == "hf" else formats.save_tiktoken
    try:
        save(tok, args.output)
    except ValueError as exc:  # a vocabulary the format cannot represent (nothing written)
        raise UserError(f"{args.tokenizer}: {exc}") from None
    if args.format == "hf":
        print(f"wrote {args.output}: load with tokenizers.Tokenizer.from_file or "
              "transformers.PreTrainedTokenizerFast(tokenizer_file=...)", file=sys.stderr)
    else:
        print(f"wrote {args.output} (ranks, tiktoken's .tiktoken format) and {args.output}.json "
              "(pattern and special tokens): see src/tokenizer/formats.load_tiktoken", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python src/tokenizer/cli.py",
        description="Train, apply, inspect and export the project's byte-level BPE tokenizer.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="learn a tokenizer from text files")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text files")
    p.add_argument("--vocab-size", type=int, required=True, metavar="N",
                   help=f"total ids incl. 256 bytes and {NUM_RESERVED_SPECIAL} reserved special ids")
    p.add_argument("--output", required=True, metavar="PATH", help="tokenizer JSON to write")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("encode", help="text -> token ids, one per line")
    p.add_argument("--tokenizer", required=True, metavar="PATH")
    p.add_argument("--input", default="-", metavar="FILE", help="text file (default: stdin)")
    p.add_argument("--output", default=None, metavar="FILE", help="default: stdout")
    p.add_argument("--special", action="store_true",
                   help="turn <|endoftext|> etc. into special ids (trusted text only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_encode)

    p = sub.add_parser("decode", help="token ids (whitespace-separated) -> text")
    p.add_argument("--tokenizer", required=True, metavar="PATH")
    p.add_argument("--input", default="-", metavar="FILE", help="file of ids (default: stdin)")
    p.add_argument("--output", default=None, metavar="FILE", help="default: stdout")
    p.set_defaults(func=_cmd_decode)

    p = sub.add_parser("stats", help="bytes per token and a lossless check on text files")
    p.add_argument("--tokenizer", required=True, metavar="PATH")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE")
    p.set_defaults(func=_cmd_stats)

    p = sub.add_parser("export", help="write a Hugging Face tokenizer.json or tiktoken ranks")
    p.add_argument("--tokenizer", required=True, metavar="PATH")
    p.add_argument("--format", required=True, choices=["hf", "tiktoken"])
    p.add_argument("--output", required=True, metavar="PATH")
    p.set_defaults(func=_cmd_export)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    from src.utils.cli import run_cli

    run_cli(main)
