"""Export a BPETokenizer to Hugging Face ``tokenizers`` and to ``tiktoken``.

Both libraries are optional and imported lazily. The exports give the same ids as our
encoder (tests check this on the validation corpora):

- Hugging Face ``tokenizer.json``: a BPE model with our merges (pair-based, exactly our
  algorithm), the split pattern as a ``Split`` pre-tokenizer followed by the byte-level
  alphabet mapping, and our special tokens as added tokens (special=True). It loads with
  ``tokenizers.Tokenizer.from_file`` and ``transformers.PreTrainedTokenizerFast``.
- ``tiktoken.Encoding`` and tiktoken's ranks file: tiktoken ranks tokens by their bytes,
  not by pairs; see :mod:`src.tokenizer.fast_path` (BPETokenizer's fast path) for why the
  two agree.
"""

from __future__ import annotations

import base64
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from src.tokenizer.bpe import BPETokenizer
from src.tokenizer.fast_path import require_distinct_tokens, tiktoken_encoding
from src.utils.atomic import write_text_atomic


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters (HF's ByteLevel)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


def hf_tokenizer_json(tok: BPETokenizer) -> dict[str, Any]:
    """The Hugging Face ``tokenizer.json`` content of ``tok`` (a dict)."""
    require_distinct_tokens(tok.vocab, "a tokenizer.json vocabulary")
    b2u = byte_to_unicode()

    def show(token: bytes) -> str:
        return "".join(b2u[b] for b in token)

    vocab = {show(t): i for i, t in enumerate(tok.vocab)}
    merges = [[show(tok.vocab[a]), show(tok.vocab[b])] for a, b in tok.merges]
    added = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for s, i in tok.special_tokens.items()
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,  # a chunk found in the vocab must still go through the merges
            "vocab": vocab,
            "merges": merges,
        },
    }


def save_hf(tok: BPETokenizer, path: str | os.PathLike) -> None:
    """Write ``tok`` as a Hugging Face ``tokenizer.json`` (atomically)."""
    write_text_atomic(path, json.dumps(hf_tokenizer_json(tok), ensure_ascii=False, indent=1) + "\n")


def to_hf(tok: BPETokenizer):
    """A ``tokenizers.Tokenizer`` equal to ``tok`` (needs the ``tokenizers`` package)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json.dumps(hf_tokenizer_json(tok)))


def to_tiktoken(tok: BPETokenizer, name: str = "gpt-model-bpe"):
    """A ``tiktoken.Encoding`` equal to ``tok`` (needs the ``tiktoken`` package); see
    :func:`src.tokenizer.fast_path.tiktoken_encoding` for why the two agree."""
    return tiktoken_encoding(tok.vocab, tok.pattern, tok.special_tokens, name)


def save_tiktoken(tok: BPETokenizer, path: str | os.PathLike) -> None:
    """Write tiktoken's ranks file (base64 token, rank; per line) to ``path`` and the
    pattern and special tokens to ``path + ".json"``; read back with :func:`load_tiktoken`."""
    require_distinct_tokens(tok.vocab, "tiktoken")
    lines = "".join(f"{base64.b64encode(t).decode('ascii')} {i}\n" for i, t in enumerate(tok.vocab))
    write_text_atomic(path, lines)
    meta = {"name": "gpt-model-bpe", "pat_str": tok.pattern, "special_tokens": tok.special_tokens, "hash": tok.hash}
    write_text_atomic(f"{os.fspath(path)}.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def load_tiktoken(path: str | os.PathLike):
    """The ``tiktoken.Encoding`` written by :func:`save_tiktoken`."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    meta = json.loads(Path(f"{os.fspath(path)}.json").read_text(encoding="utf-8"))
    return tiktoken.Encoding(
        name=meta["name"],
        pat_str=meta["pat_str"],
        mergeable_ranks=load_tiktoken_bpe(os.fspath(path)),
        special_tokens=meta["special_tokens"],
    )
