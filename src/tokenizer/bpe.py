"""The project's byte-level BPE tokenizer (GPT-2/GPT-4 style).

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

That pure-Python encoder is the reference. When tiktoken is installed, the same
tokenizer as a tiktoken.Encoding (fast_path.py) does the work ~3x faster with
identical ids; it is checked against the reference on probe texts before first use.
Force the reference with GPT_MODEL_BPE_BACKEND=python or ``tok.backend_preference =
"python"``. Batch encoding (bpe_batch.py) uses threads or worker processes.

Command line (train, encode, decode, stats, export): cli.py. Exports to Hugging Face
and tiktoken files: formats.py.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from itertools import chain, repeat
from pathlib import Path

import numpy as np
import regex

from src.tokenizer import bpe_batch
from src.tokenizer.bpe_train import SPLIT_PATTERN, count_chunks, learn_merges
from src.tokenizer.fast_path import fast_path_mismatch, tiktoken_encoding
from src.tokenizer.special_tokens import NUM_RESERVED_SPECIAL, SPECIAL_TOKENS
from src.utils.atomic import write_text_atomic
from src.utils.cli import UserError

FORMAT_NAME = "gpt-model-bpe"
FORMAT_VERSION = 1
BACKEND_ENV = "GPT_MODEL_BPE_BACKEND"  # "auto" (default), "python" or "tiktoken"
_MAX_CACHE_ENTRIES = 1 << 20  # the chunk cache is emptied when it grows past this
_SHORT_CHUNK = 64  # bytes; longer chunks use the linear-per-round merge loop
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
        # The specials the hash covers and ``save`` writes (see ``_add_newer_specials``).
        self._saved_specials = dict(self.special_tokens)
        self._special_bytes = {i: s.encode("utf-8") for s, i in self.special_tokens.items()}
        self._special_set = frozenset(self.special_tokens)
        self.vocab: list[bytes] = vocab  # token bytes of every non-special id
        self._cache: dict[str, tuple[int, ...]] = {}
        self._fast = _UNSET
        preference = os.environ.get(BACKEND_ENV, "auto")
        if preference not in ("auto", "python", "tiktoken"):
            raise ValueError(f"environment variable {BACKEND_ENV}={preference!r}: expected auto, python or tiktoken")
        self.backend_preference = preference
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
        if isinstance(texts, str):
            raise TypeError("texts must be an iterable of strings, not one string (wrap it in a list)")
        min_size = 256 + NUM_RESERVED_SPECIAL
        if vocab_size < min_size:
            raise ValueError(f"vocab_size must be at least {min_size} (256 bytes + {NUM_RESERVED_SPECIAL} special), got {vocab_size}")
        num_merges = vocab_size - min_size
        total = sum(map(len, texts)) if isinstance(texts, (list, tuple)) else None
        bar = progress_bar(show_progress, total, "counting chunks", "char")
        counts = count_chunks(texts, progress=None if bar is None else bar.update)
        if bar is not None:
            bar.close()
        bar = progress_bar(show_progress, num_merges, "merging", "merge")
        merges = learn_merges(counts, num_merges, progress=None if bar is None else bar.update)
        if bar is not None:
            bar.close()
        if len(merges) < num_merges:
            warnings.warn(
                f"the training texts allow only {len(merges)} merges, not {num_merges}: "
                f"vocab_size is {len(merges) + min_size} instead of {vocab_size}",
                stacklevel=2,
            )
        return cls(merges)

    @classmethod
    def train_files(
        cls, paths: Iterable[str | os.PathLike], vocab_size: int, *, show_progress: bool = False
    ) -> BPETokenizer:
        """:meth:`train` on UTF-8 text files (each read when its turn comes, bytes as they
        are: no newline translation)."""
        texts = (Path(p).read_bytes().decode("utf-8") for p in paths)
        return cls.train(texts, vocab_size, show_progress=show_progress)

    # ------------------------------------------------------------------ encoding
    @property
    def backend(self) -> str:
        """The encoder in use: "tiktoken" (verified fast path) or "python" (the reference).

        Chosen by ``backend_preference`` ("auto", "python" or "tiktoken"), whose default
        comes from the environment variable GPT_MODEL_BPE_BACKEND (default "auto": tiktoken
        when installed and verified, else python).
        """
        return "python" if self._tiktoken() is None else "tiktoken"

    @property
    def backend_preference(self) -> str:
        return self._backend_preference

    @backend_preference.setter
    def backend_preference(self, value: str) -> None:
        if value not in ("auto", "python", "tiktoken"):
            raise ValueError(f"backend must be 'auto', 'python' or 'tiktoken', got {value!r}")
        self._backend_preference = value
        self._fast = _UNSET

    def _tiktoken(self):
        """The verified tiktoken core encoder of this tokenizer, or None (built once, lazily).

        Before first use it is compared with the reference encoder on probe texts
        (``fast_path.fast_path_mismatch``); any difference disables it with a warning.
        """
        if self._fast is _UNSET:
            self._fast = None
            if self._backend_preference == "python":
                return None
            try:
                enc = tiktoken_encoding(self.vocab, self.pattern, self.special_tokens)
            except (ImportError, ValueError) as exc:
                if self._backend_preference == "tiktoken":
                    raise
                if isinstance(exc, ValueError):  # a vocabulary tiktoken cannot represent
                    warnings.warn(f"tiktoken fast path disabled: {exc}", stacklevel=3)
                return None
            mismatch = fast_path_mismatch(enc, self._encode_python, self.vocab)
            if mismatch is not None:
                message = f"tiktoken fast path disabled: {mismatch}"
                if self._backend_preference == "tiktoken":
                    raise ValueError(message)
                warnings.warn(message, stacklevel=3)
                return None
            # The core's methods raise UnicodeEncodeError on a lone surrogate, where the
            # public tiktoken API would silently replace it.
            self._fast = enc._core_bpe
        return self._fast

    def _encode_chunk(self, chunk: str) -> list[int]:
        """Token ids of one chunk: merge the lowest-rank adjacent pair until none is left.

        Raises UnicodeEncodeError for a lone surrogate (callers report it for the whole text).
        """
        ids = list(chunk.encode("utf-8"))
        get, merges, none = self._ranks.get, self.merges, repeat(_NO_RANK)
        if len(ids) <= _SHORT_CHUNK:
            # Each round merges the leftmost occurrence of the lowest-rank pair (a merge's
            # rank is its new id); that equals merging all its occurrences left to right.
            # ranks[i] is the rank of the pair (ids[i], ids[i+1]); a merge changes only its
            # two neighbours, and min/index run in C.
            ranks = list(map(get, zip(ids, ids[1:]), none))
            while ranks:
                rank = min(ranks)
                if rank == _NO_RANK:
                    break
                i = ranks.index(rank)
                ids[i : i + 2] = (rank,)
                del ranks[i]
                if i:
                    ranks[i - 1] = get((ids[i - 1], rank), _NO_RANK)
                if i < len(ranks):
                    ranks[i] = get((rank, ids[i + 1]), _NO_RANK)
            return ids
        # A long chunk (e.g. a run of 10,000 spaces): merge all occurrences per round, so
        # the cost is O(length x distinct merges used), not O(length^2).
        while len(ids) > 1:
            rank = min(map(get, zip(ids, ids[1:]), none))
            if rank == _NO_RANK:
                break
            a, b = merges[rank - 256]
            out: list[int] = []
            i, n = 0, len(ids)
            while i < n:
                if ids[i] == a and i + 1 < n and ids[i + 1] == b:
                    out.append(rank)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            ids = out
        return ids

    def _encode_python(self, text: str) -> list[int]:
        """The reference encoder: split, look every chunk up in the cache, encode the misses."""
        cache = self._cache
        if len(cache) > _MAX_CACHE_ENTRIES:
            cache.clear()
        chunks = self._split(text)
        try:  # all chunks seen before: one pass in C
            return list(chain.from_iterable(map(cache.__getitem__, chunks)))
        except KeyError:
            pass
        try:
            for chunk in set(chunks).difference(cache):
                cache[chunk] = tuple(self._encode_chunk(chunk))  # tuples chain fastest
        except UnicodeEncodeError:
            _check_unicode(text)  # raises the ValueError naming the position in the text
            raise
        return list(chain.from_iterable(map(cache.__getitem__, chunks)))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``. Never yields a special token: all text is plain text.

        Raises ValueError if ``text`` holds a lone surrogate (not valid Unicode).
        """
        fast = self._tiktoken()
        if fast is None:
            return self._encode_python(text)
        try:
            return fast.encode_ordinary(text)
        except UnicodeEncodeError:
            _check_unicode(text)
            raise

    def encode_with_special(self, text: str) -> list[int]:
        """Like :meth:`encode`, but the special-token strings become their ids.

        Only for trusted text (e.g. a data file written by this project); never for text
        typed by a user.
        """
        fast = self._tiktoken()
        if fast is not None:
            try:
                return fast.encode(text, self._special_set)
            except UnicodeEncodeError:
                _check_unicode(text)
                raise
        if self._special_split is None:
            return self.encode(text)
        _check_unicode(text)  # so an error names the position in the whole text
        out: list[int] = []
        for i, part in enumerate(self._special_split.split(text)):
            if i % 2:  # odd parts are the captured special-token strings
                out.append(self.special_tokens[part])
            elif part:
                out.extend(self._encode_python(part))
        return out

    def encode_batch(self, texts: list[str], num_workers: int | None = None) -> list[np.ndarray]:
        """Encode many texts (plain :meth:`encode`), each as a numpy array.

        dtype is uint16 when ``vocab_size <= 65536`` (the dtype of the token files), else
        uint32. ``num_workers`` threads (tiktoken backend) or processes (python backend)
        share the work, long texts included (see bpe_batch.py); default: all CPUs; 0 or 1:
        this process only. On the python backend, batches under 1 MB and calls from a
        daemon process (e.g. a Pool worker, which may not start processes) stay here.
        """
        dtype = np.uint16 if self.vocab_size <= 65536 else np.uint32
        workers = (os.cpu_count() or 1) if num_workers is None else max(1, num_workers)
        fast = self._tiktoken()
        if fast is not None:
            try:
                return bpe_batch.encode_in_threads(fast.encode_ordinary, self.pattern, texts, workers, dtype)
            except UnicodeEncodeError:
                for text in texts:
                    _check_unicode(text)
                raise
        if workers <= 1 or sum(map(len, texts)) < bpe_batch.PARALLEL_MIN_CHARS or bpe_batch.in_daemon():
            return [np.asarray(self._encode_python(t), dtype=dtype) for t in texts]
        return bpe_batch.encode_in_processes(self, texts, workers, dtype)

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
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        try:
            return b"".join([vocab[i] if 0 <= i < n else self.token_bytes(i) for i in ids])
        except TypeError:
            bad = next((i for i in ids if not isinstance(i, (int, np.integer))), None)
            raise ValueError(f"token ids must be integers, got {bad!r}") from None

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; ``decode(encode(s)) == s`` for every valid string.

        Specials decode to their strings. A sequence that is not valid UTF-8 (possible for
        arbitrary ids, e.g. a model's samples) gets U+FFFD for the broken bytes.
        Raises ValueError for ids outside the vocabulary or unassigned reserved ids.
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ files
    def _content(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "pattern": self.pattern,
            "merges": [list(m) for m in self.merges],
            "special_tokens": dict(self._saved_specials),
            "num_reserved_special": NUM_RESERVED_SPECIAL,
            "vocab_size": self.vocab_size,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as one JSON file, atomically.

        One merge per line, ``[left id, right id, "text of the new token"]``; the text is
        for people reading the file (bytes that are not whole UTF-8 characters appear as
        \\xNN) and is checked against the ids on load. The hash covers the ids only.
        """
        content = self._content()
        head = {k: v for k, v in content.items() if k != "merges"}
        head["hash"] = self.hash
        lines = ["{"]
        for k, v in head.items():
            lines.append(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)},")
        lines.append('  "merges": [')
        merge_lines = [f"    [{a}, {b}, {json.dumps(t, ensure_ascii=False)}]" for (a, b), t in zip(self.merges, self._merge_texts())]
        lines.append(",\n".join(merge_lines))
        lines.append("  ]")
        lines.append("}")
        write_text_atomic(path, "\n".join(line for line in lines if line) + "\n")

    def _merge_texts(self) -> list[str]:
        return [t.decode("utf-8", errors="backslashreplace") for t in self.vocab[256:]]

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
            if not (isinstance(merges, list) and all(isinstance(m, list) and len(m) in (2, 3) for m in merges)):
                raise ValueError("'merges' must be a list of [left id, right id, text] entries")
            if not all(isinstance(x, int) and not isinstance(x, bool) for m in merges for x in m[:2]):
                raise ValueError("'merges' must hold integer ids")
            if not (isinstance(specials, dict) and isinstance(pattern, str)):
                raise ValueError("'special_tokens' must be an object and 'pattern' a string")
            order = sorted(specials, key=lambda s: specials[s])
            tok = cls([(m[0], m[1]) for m in merges], pattern=pattern, special_tokens=order)
        except KeyError as exc:
            raise TokenizerFileError(f"{path}: missing field {exc}") from None
        except (ValueError, TypeError, regex.error) as exc:
            raise TokenizerFileError(f"{path}: invalid tokenizer: {exc}") from None
        if tok.special_tokens != specials:
            raise TokenizerFileError(f"{path}: special token ids {specials} do not follow the merges")
        if data.get("num_reserved_special") != NUM_RESERVED_SPECIAL or data.get("vocab_size") != tok.vocab_size:
            raise TokenizerFileError(
                f"{path}: made for {data.get('num_reserved_special')} reserved special ids and vocab_size "
                f"{data.get('vocab_size')}; this code reserves {NUM_RESERVED_SPECIAL} (vocab_size {tok.vocab_size})"
            )
        for i, (m, text) in enumerate(zip(merges, tok._merge_texts())):
            if len(m) == 3 and m[2] != text:
                raise TokenizerFileError(f"{path}: merge {i} {m[:2]} makes {text!r}, but the file says {m[2]!r}")
        if data.get("hash") != tok.hash:
            raise TokenizerFileError(f"{path}: content hash mismatch (file edited or corrupt)")
        if len(order) < len(SPECIAL_TOKENS) and tuple(order) == SPECIAL_TOKENS[: len(order)]:
            tok._add_newer_specials()
        return tok

    def _add_newer_specials(self) -> None:
        """Give a tokenizer saved before the newest special tokens existed those tokens, in
        their reserved ids (no existing id changes). Its hash and what ``save`` writes stay
        those of the file, so the runs and data that recorded the hash still match it."""
        self.special_tokens = {s: self._num_base + i for i, s in enumerate(SPECIAL_TOKENS)}
        self._special_bytes = {i: s.encode("utf-8") for s, i in self.special_tokens.items()}
        self._special_set = frozenset(self.special_tokens)
        escaped = (regex.escape(s) for s in sorted(SPECIAL_TOKENS, key=len, reverse=True))
        self._special_split = regex.compile("(" + "|".join(escaped) + ")")
        self._fast = _UNSET  # the tiktoken encoder is rebuilt with the new specials

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, hash={self.hash[:12]})"


# ---------------------------------------------------------------------- helpers
_UNSET = object()  # "not built yet" marker of the lazy fast path


def _surrogate_error(text: str, pos: int) -> ValueError:
    return ValueError(
        f"text is not valid Unicode: lone surrogate U+{ord(text[pos]):04X} at position {pos} "
        "cannot be encoded as UTF-8"
    )


def _check_unicode(text: str) -> None:
    """ValueError for a lone surrogate (tiktoken would silently replace it)."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _surrogate_error(text, exc.start) from None


def _content_hash(content: dict) -> str:
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def progress_bar(enabled: bool, total: int | None, desc: str, unit: str):
    """A tqdm bar on stderr, or None when not ``enabled`` (tqdm is imported only then)."""
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
