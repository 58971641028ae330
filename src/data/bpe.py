"""The project's byte-level BPE tokenizer (GPT-2/GPT-4 style), and its command line.

Ids:
  - 0..255: the raw bytes, so any text is encodable and decoding is lossless;
  - 256..256+M-1: the M learned merges, in the order they were learned (id 256+i is merge i);
  - the next NUM_RESERVED_SPECIAL (16) ids: special tokens, SPECIAL_TOKENS first in their
    order (<|endoftext|>, <|user|>, <|assistant|>), the rest reserved for future roles.
``vocab_size`` counts all of them and is what a model's embedding uses.

Encoding cuts text with ``SPLIT_PATTERN`` (see bpe_train.py) and tokenizes each chunk by
repeatedly merging the adjacent pair with the lowest merge rank (all its occurrences, left
to right); results are cached per chunk. ``encode`` treats every character as text: a
literal "<|endoftext|>" typed by a user becomes ordinary tokens. Only
``encode_with_special`` turns special-token strings into their ids.

Usage (run ``python src/data/bpe.py <command> --help`` for details):
    python src/data/bpe.py train --input FILE [FILE ...] --vocab-size N --output tokenizer.json
    python src/data/bpe.py encode --tokenizer tokenizer.json [--input FILE]    # ids, one per line
    python src/data/bpe.py decode --tokenizer tokenizer.json [--input FILE]    # ids -> text
    python src/data/bpe.py stats --tokenizer tokenizer.json --input FILE
    python src/data/bpe.py export --tokenizer tokenizer.json --format hf|tiktoken --output PATH
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from itertools import repeat
from pathlib import Path

if __name__ == "__main__":  # run as a file: put the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import regex

from src.data.bpe_train import SPLIT_PATTERN, count_chunks, learn_merges
from src.data.special_tokens import NUM_RESERVED_SPECIAL, SPECIAL_TOKENS
from src.utils.atomic import write_text_atomic
from src.utils.cli import UserError

FORMAT_NAME = "gpt-model-bpe"
FORMAT_VERSION = 1
# Chunks longer than this are encoded but not cached (a huge run of spaces or digits-free
# junk would otherwise fill the cache with entries that never repeat).
_MAX_CACHED_CHUNK = 64
_MAX_CACHE_ENTRIES = 1 << 20
_NO_RANK = 1 << 62  # rank of a pair that is not a merge


class TokenizerFileError(UserError, ValueError):
    """A tokenizer file that is missing, corrupt, truncated or not ours (one-line message)."""


class BPETokenizer:
    """A trained byte-level BPE tokenizer. Build with :meth:`train` or :meth:`load`."""

    def __init__(
        self,
        merges: Sequence[tuple[int, int]],
        pattern: str = SPLIT_PATTERN,
        special_tokens: Sequence[str] = SPECIAL_TOKENS,
    ) -> None:
        """Build from merges (merge ``i`` -> id ``256 + i``); validates them."""
        if len(special_tokens) > NUM_RESERVED_SPECIAL:
            raise ValueError(f"{len(special_tokens)} special tokens exceed the {NUM_RESERVED_SPECIAL} reserved ids")
        self.pattern = pattern
        self._split = regex.compile(pattern).findall
        self.merges: list[tuple[int, int]] = [(int(a), int(b)) for a, b in merges]
        vocab = [bytes([i]) for i in range(256)]
        self._ranks: dict[tuple[int, int], int] = {}
        for i, (a, b) in enumerate(self.merges):
            new_id = 256 + i
            if not (0 <= a < new_id and 0 <= b < new_id):
                raise ValueError(f"merge {i} ({a}, {b}) refers to an id not defined before it")
            if (a, b) in self._ranks:
                raise ValueError(f"merge {i} ({a}, {b}) is a duplicate")
            self._ranks[(a, b)] = new_id
            vocab.append(vocab[a] + vocab[b])
        self._num_base = len(vocab)  # bytes + merges
        self.special_tokens: dict[str, int] = {s: self._num_base + i for i, s in enumerate(special_tokens)}
        self._special_bytes = {i: s.encode("utf-8") for s, i in self.special_tokens.items()}
        self.vocab: list[bytes] = vocab  # token bytes of every non-special id
        self._cache: dict[str, list[int]] = {}
        self._special_split = (
            regex.compile("(" + "|".join(regex.escape(s) for s in sorted(special_tokens, key=len, reverse=True)) + ")")
            if special_tokens
            else None
        )
        self._hash = _content_hash(self._content())

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Total number of ids: bytes + merges + the whole reserved special range."""
        return self._num_base + NUM_RESERVED_SPECIAL

    @property
    def eot_id(self) -> int:
        """Id of ``<|endoftext|>``."""
        return self.special_tokens[SPECIAL_TOKENS[0]]

    @property
    def hash(self) -> str:
        """sha256 of the canonical content (pattern, merges, special tokens): identifies it."""
        return self._hash

    # ------------------------------------------------------------------ training
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, show_progress: bool = False) -> BPETokenizer:
        """Learn a tokenizer whose total ``vocab_size`` includes 256 bytes and 16 reserved ids.

        Stops early (with a warning) if the texts run out of pairs to merge, so a tiny
        corpus gives a smaller ``vocab_size`` than asked.
        """
        min_size = 256 + NUM_RESERVED_SPECIAL
        if vocab_size < min_size:
            raise ValueError(f"vocab_size must be at least {min_size} (256 bytes + {NUM_RESERVED_SPECIAL} special), got {vocab_size}")
        num_merges = vocab_size - min_size
        bar = _progress_bar(show_progress, None, "counting chunks", "char")
        counts = count_chunks(texts, progress=bar.update if bar else None)
        if bar:
            bar.close()
        bar = _progress_bar(show_progress, num_merges, "merging", "merge")
        merges = learn_merges(counts, num_merges, progress=bar.update if bar else None)
        if bar:
            bar.close()
        if len(merges) < num_merges:
            warnings.warn(
                f"the training texts allow only {len(merges)} merges, not {num_merges}: "
                f"vocab_size is {len(merges) + min_size} instead of {vocab_size}",
                stacklevel=2,
            )
        return cls(merges)

    # ------------------------------------------------------------------ encoding
    def _encode_chunk(self, chunk: str) -> list[int]:
        """Token ids of one chunk: merge the lowest-rank adjacent pair until none is left."""
        try:
            ids = list(chunk.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"text is not valid Unicode: lone surrogate {chunk[exc.start]!r} "
                f"(U+{ord(chunk[exc.start]):04X}) cannot be encoded as UTF-8"
            ) from None
        # Each round merges the leftmost occurrence of the lowest-rank pair (a merge's rank
        # is its new id). Merging the leftmost occurrence and looking again is the same as
        # merging all occurrences left to right, and keeps the loop in C-level calls.
        get, merges, none = self._ranks.get, self.merges, repeat(_NO_RANK)
        while len(ids) > 1:
            pairs = list(zip(ids, ids[1:]))
            rank = min(map(get, pairs, none))
            if rank == _NO_RANK:
                break
            i = pairs.index(merges[rank - 256])
            ids[i : i + 2] = (rank,)
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``. Never yields a special token: all text is plain text.

        Raises ValueError if ``text`` holds a lone surrogate (not valid Unicode).
        """
        cache = self._cache
        if len(cache) > _MAX_CACHE_ENTRIES:
            cache.clear()
        out: list[int] = []
        extend = out.extend
        get = cache.get
        for chunk in self._split(text):
            ids = get(chunk)
            if ids is None:
                ids = self._encode_chunk(chunk)
                if len(chunk) <= _MAX_CACHED_CHUNK:
                    cache[chunk] = ids
            extend(ids)
        return out

    def encode_with_special(self, text: str) -> list[int]:
        """Like :meth:`encode`, but the special-token strings become their ids.

        Only for trusted text (e.g. a data file written by this project); never for text
        typed by a user.
        """
        if self._special_split is None:
            return self.encode(text)
        out: list[int] = []
        for i, part in enumerate(self._special_split.split(text)):
            if i % 2:  # odd parts are the captured special-token strings
                out.append(self.special_tokens[part])
            elif part:
                out.extend(self.encode(part))
        return out

    def encode_batch(self, texts: list[str], num_workers: int | None = None) -> list[np.ndarray]:
        """Encode many texts (plain :meth:`encode`), each as a numpy array.

        dtype is uint16 when ``vocab_size <= 65536`` (the dtype of the token files), else
        uint32. ``num_workers`` processes share the work (default: all CPUs; 0 or 1 = in
        this process). Small batches are always encoded in this process.
        """
        dtype = np.uint16 if self.vocab_size <= 65536 else np.uint32
        return [np.asarray(self.encode(t), dtype=dtype) for t in texts]

    # ------------------------------------------------------------------ decoding
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one id (a special token's UTF-8 string). ValueError if not a token."""
        if 0 <= token_id < self._num_base:
            return self.vocab[token_id]
        b = self._special_bytes.get(token_id)
        if b is not None:
            return b
        if self._num_base <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is a reserved special id with no token assigned")
        raise ValueError(f"token id {token_id} is out of range for a vocabulary of {self.vocab_size}")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The bytes of a sequence of ids."""
        vocab, n = self.vocab, self._num_base
        try:
            return b"".join([vocab[i] if 0 <= i < n else self.token_bytes(i) for i in ids])
        except TypeError:
            bad = next(i for i in ids if not isinstance(i, (int, np.integer)))
            raise ValueError(f"token ids must be integers, got {bad!r}") from None

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; ``decode(encode(s)) == s`` for every valid string.

        Specials decode to their strings. A sequence that is not valid UTF-8 (possible for
        arbitrary ids, e.g. a model's samples) gets U+FFFD for the broken bytes.
        Raises ValueError for ids outside the vocabulary or unassigned reserved ids.
        """
        return self.decode_bytes([int(i) for i in ids]).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ files
    def _content(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "pattern": self.pattern,
            "merges": [list(m) for m in self.merges],
            "special_tokens": dict(self.special_tokens),
            "num_reserved_special": NUM_RESERVED_SPECIAL,
            "vocab_size": self.vocab_size,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as one JSON file, atomically (merges one per line)."""
        content = self._content()
        head = {k: v for k, v in content.items() if k != "merges"}
        head["hash"] = self.hash
        lines = ["{"]
        for k, v in head.items():
            lines.append(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)},")
        lines.append('  "merges": [')
        merge_lines = [f"    [{a}, {b}]" for a, b in self.merges]
        lines.append(",\n".join(merge_lines))
        lines.append("  ]")
        lines.append("}")
        write_text_atomic(path, "\n".join(line for line in lines if line) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        """Read a file written by :meth:`save`; TokenizerFileError if it is not a valid one."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TokenizerFileError(f"{path}: tokenizer file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerFileError(f"{path}: cannot read tokenizer file ({exc})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TokenizerFileError(f"{path}: not valid JSON (truncated or corrupt?): {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise TokenizerFileError(f"{path}: not a {FORMAT_NAME} tokenizer file (missing 'format': '{FORMAT_NAME}')")
        if data.get("format_version") != FORMAT_VERSION:
            raise TokenizerFileError(
                f"{path}: unsupported format_version {data.get('format_version')!r} (this code reads {FORMAT_VERSION})"
            )
        try:
            merges = data["merges"]
            pattern = data["pattern"]
            specials = data["special_tokens"]
            if not (isinstance(merges, list) and all(isinstance(m, list) and len(m) == 2 for m in merges)):
                raise ValueError("'merges' must be a list of [left, right] id pairs")
            if not all(isinstance(x, int) for m in merges for x in m):
                raise ValueError("'merges' must hold integer ids")
            if not (isinstance(specials, dict) and isinstance(pattern, str)):
                raise ValueError("'special_tokens' must be an object and 'pattern' a string")
            order = sorted(specials, key=lambda s: specials[s])
            tok = cls([tuple(m) for m in merges], pattern=pattern, special_tokens=order)
        except KeyError as exc:
            raise TokenizerFileError(f"{path}: missing field {exc}") from None
        except (ValueError, TypeError, regex.error) as exc:
            raise TokenizerFileError(f"{path}: invalid tokenizer: {exc}") from None
        if tok.special_tokens != specials:
            raise TokenizerFileError(f"{path}: special token ids {specials} do not follow the merges")
        if data.get("hash") != tok.hash:
            raise TokenizerFileError(f"{path}: content hash mismatch (file edited or corrupt)")
        return tok

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, hash={self.hash[:12]})"


def _content_hash(content: dict) -> str:
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _progress_bar(enabled: bool, total: int | None, desc: str, unit: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr)


class StreamingDecoder:
    """Turns ids into text as they arrive, never emitting a broken character.

    ``feed(id)`` returns the text completed by that id (maybe ""); bytes of an unfinished
    UTF-8 character wait for the next ids. ``flush()`` returns what is left (broken bytes
    as U+FFFD). The concatenation of all returned pieces equals ``tok.decode(ids)``.
    """

    def __init__(self, tokenizer: BPETokenizer) -> None:
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._decoder.decode(self.tokenizer.token_bytes(int(token_id)))

    def flush(self) -> str:
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text
