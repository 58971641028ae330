"""Export a BPETokenizer to Hugging Face ``tokenizers`` and to ``tiktoken``.

Both libraries are optional and imported lazily. The exports give the same ids as our
encoder (tests check this on the validation corpora):

- Hugging Face ``tokenizer.json``: a BPE model with our merges (pair-based, exactly our
  algorithm), the split pattern as a ``Split`` pre-tokenizer followed by the byte-level
  alphabet mapping, and our special tokens as added tokens (special=True). It loads with
  ``tokenizers.Tokenizer.from_file`` and ``transformers.PreTrainedTokenizerFast``.
- ``tiktoken.Encoding``: tiktoken ranks tokens by their bytes, not by pairs; see
  :func:`to_tiktoken` for why the two agree. BPETokenizer uses it as its fast path.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from src.utils.atomic import write_text_atomic

if TYPE_CHECKING:
    from src.data.bpe import BPETokenizer


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
    if len(set(tok.vocab)) != len(tok.vocab):
        raise ValueError("two merges produce the same bytes; a tokenizer.json vocabulary cannot represent this")
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


def to_transformers(tok: BPETokenizer):
    """A ``transformers.PreTrainedTokenizerFast`` equal to ``tok``, with eos = <|endoftext|>."""
    from transformers import PreTrainedTokenizerFast

    eot = next(s for s, i in tok.special_tokens.items() if i == tok.eot_id)
    return PreTrainedTokenizerFast(tokenizer_object=to_hf(tok), eos_token=eot)


def to_tiktoken(tok: BPETokenizer, name: str = "gpt-model-bpe"):
    """A ``tiktoken.Encoding`` with our pattern, tokens (rank = id) and special tokens.

    tiktoken merges the adjacent pair whose *concatenated bytes* are the lowest-ranked
    token; we merge the adjacent pair that *is* the lowest-ranked merge. They could differ
    only where two adjacent tokens U, V form a token T learnt from another split; with
    merges learnt by training such a (U, V) never meets before T's own pair would (a merge
    is only learnt from pairs that occur), so they agree. BPETokenizer still compares the
    two on probe texts before using this encoding as its fast path, and the tests compare
    them on the validation corpora and on random text.
    """
    import tiktoken

    ranks = {t: i for i, t in enumerate(tok.vocab)}
    if len(ranks) != len(tok.vocab):
        raise ValueError("two merges produce the same bytes; tiktoken cannot represent this vocabulary")
    return tiktoken.Encoding(name=name, pat_str=tok.pattern, mergeable_ranks=ranks, special_tokens=dict(tok.special_tokens))


def save_tiktoken(tok: BPETokenizer, path: str | os.PathLike) -> None:
    """Write tiktoken's ranks file (base64 token, rank; per line) to ``path`` and the
    pattern and special tokens to ``path + ".json"``; read back with :func:`load_tiktoken`."""
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


# Texts that exercise every alternative of the split pattern and the whitespace, digit and
# letter classes where regex engines could disagree.
_PROBE_TEXTS = (
    "Hello, world! It's 12345 o'clock; we'RE 'LL 'Ve done.\r\n\r\n  spaced   out  \n",
    "\t\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2028\u2029\u202f\u205f\u3000 x \u200b\ufeff",
    "naïve café e\u0301 東京 ٣٤٥ ²³ Ⅻ ½ 𝟙𝟚 😀👍🏽🇫🇷 \x00\x7f ...!!! ?? --- \n\n\n",
)


def fast_path_mismatch(enc, reference: Callable[[str], list[int]], vocab: list[bytes]) -> str | None:
    """Compare tiktoken ``enc`` with the ``reference`` encoder on probe texts.

    Returns a description of the first difference, or None when they agree. The probes are
    the texts above plus every 16th token of the vocabulary, alone and glued to others.
    (tiktoken takes a chunk that is a whole token as that token; our merges give the same
    for trained tokens, as the merges that built a token inside its training context also
    build it alone.)
    """
    if not hasattr(enc, "_core_bpe"):
        return f"tiktoken {getattr(enc, '__module__', '')} has no _core_bpe (unsupported version)"
    probes = list(_PROBE_TEXTS)
    strings = [t.decode("utf-8", errors="ignore") for t in vocab[256:]]
    for i in range(0, len(strings), 16):
        probes.append(strings[i])  # alone: tiktoken takes a chunk found in its vocabulary whole
        probes.append("".join(strings[i : i + 3]))
        probes.append(strings[i] + " " + strings[-1 - i])
    for text in probes:
        if enc.encode_ordinary(text) != reference(text):
            return f"it encodes {text!r} differently"
    return None
