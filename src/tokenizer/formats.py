"""Export a BPETokenizer to Hugging Face ``tokenizers`` / ``transformers``, to ``tiktoken`` and
to GGUF metadata, and read a Hugging Face ``tokenizer.json`` of ours back.

The libraries are optional and imported lazily. The exports give the same ids as our
encoder (tests check this on the validation corpora):

- Hugging Face ``tokenizer.json``: a BPE model with our merges (pair-based, exactly our
  algorithm), the split pattern as a ``Split`` pre-tokenizer followed by the byte-level
  alphabet mapping, and our special tokens as added tokens (special=True). It loads with
  ``tokenizers.Tokenizer.from_file`` and ``transformers.PreTrainedTokenizerFast``.
- ``tiktoken.Encoding`` and tiktoken's ranks file: tiktoken ranks tokens by their bytes,
  not by pairs; see :mod:`src.tokenizer.fast_path` (BPETokenizer's fast path) for why the
  two agree.
- A ``transformers`` tokenizer folder: ``tokenizer.json`` plus ``tokenizer_config.json``
  (special tokens, no automatic BOS/EOS, no clean-up of spaces, the chat template) and
  ``special_tokens_map.json``. The chat template is Jinja built from the same tables as
  :mod:`src.tokenizer.chat_template`, so it renders exactly what ``encode_chat`` encodes.
- GGUF (llama.cpp): the "gpt2" (byte-level BPE) tokenizer model: tokens in the byte-level
  alphabet, merges, token types, special ids, the chat template, and the pre-tokenizer name
  whose split regex equals ours (``llama-bpe``, Llama 3's).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from src.tokenizer.bpe import BPETokenizer, TokenizerFileError
from src.tokenizer.bpe_train import SPLIT_PATTERN
from src.tokenizer.chat_template import ASSISTANT_STOP_TOKENS, ROLE_TOKENS
from src.tokenizer.fast_path import require_distinct_tokens, tiktoken_encoding
from src.tokenizer.special_tokens import ASSISTANT, ENDOFTEXT
from src.utils.atomic import write_json_atomic, write_text_atomic


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


def _added_token(content: str) -> dict[str, Any]:
    """A special token as Hugging Face describes it: matched whole, never normalised."""
    return {"content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def hf_tokenizer_json(tok: BPETokenizer) -> dict[str, Any]:
    """The Hugging Face ``tokenizer.json`` content of ``tok`` (a dict)."""
    require_distinct_tokens(tok.vocab, "a tokenizer.json vocabulary")
    b2u = byte_to_unicode()

    def show(token: bytes) -> str:
        return "".join(b2u[b] for b in token)

    vocab = {show(t): i for i, t in enumerate(tok.vocab)}
    merges = [[show(tok.vocab[a]), show(tok.vocab[b])] for a, b in tok.merges]
    added = [{"id": i, **_added_token(s)} for s, i in tok.special_tokens.items()]
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


# ----------------------------------------------------------------------------------------------
# Reading a Hugging Face tokenizer.json back: ours (exported above), or another model's
# byte-level BPE, whose ids are then renumbered into our layout.

# GPT-2's split regex: what a ByteLevel pre-tokenizer with use_regex=True applies.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _parse_byte_level_bpe(data: dict[str, Any], source: str):
    """(vocab, merge pairs, split pattern, added tokens sorted by id) of a byte-level BPE
    tokenizer.json whose encoding our BPE reproduces; TokenizerFileError otherwise."""
    def bad(why: str) -> TokenizerFileError:
        return TokenizerFileError(f"{source}: {why}; only byte-level BPE tokenizers convert")

    try:
        model, pre = data["model"], data["pre_tokenizer"] or {}
        if model.get("type") != "BPE":
            raise bad(f"tokenizer model {model.get('type')!r} is not BPE")
        for option in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(option):
                raise bad(f"BPE option {option} is set")
        if model.get("byte_fallback") or model.get("ignore_merges"):
            raise bad("byte_fallback / ignore_merges change how BPE encodes")
        if data.get("normalizer"):
            raise bad("a normalizer changes the text before encoding")
        steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
        splits = [p for p in steps if p.get("type") == "Split"]
        levels = [p for p in steps if p.get("type") == "ByteLevel"]
        if len(levels) != 1 or levels[0].get("add_prefix_space") or len(steps) != len(splits) + 1:
            raise bad("the pre-tokenizer is not ByteLevel (optionally after one Split)")
        if len(splits) == 1 and not levels[0].get("use_regex", True):
            split = splits[0]
            if split.get("behavior") != "Isolated" or split.get("invert"):
                raise bad("the Split pre-tokenizer does not isolate its matches")
            pattern = split["pattern"]["Regex"]
        elif not splits and levels[0].get("use_regex", True):
            pattern = GPT2_SPLIT_PATTERN
        else:
            raise bad("the pre-tokenizer does not split by exactly one regex")
        vocab: dict[str, int] = model["vocab"]
        pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        added = sorted(data.get("added_tokens") or [], key=lambda t: t["id"])
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        if isinstance(exc, TokenizerFileError):
            raise
        raise bad(f"missing or malformed field {exc}") from None
    return vocab, pairs, pattern, added, bad


def from_hf_tokenizer_json(data: dict[str, Any], source: str = "tokenizer.json") -> BPETokenizer:
    """The BPETokenizer a :func:`hf_tokenizer_json` dict describes: our layout (ids 0-255 the
    bytes in order, merge ``i`` the id ``256 + i``, the special tokens next), read back with
    the same ids. Anything else is a TokenizerFileError naming ``source``."""
    vocab, pairs, pattern, added, bad = _parse_byte_level_bpe(data, source)
    if any(vocab.get(u) != b for b, u in byte_to_unicode().items()):
        raise bad("ids 0-255 are not the 256 bytes in order (not this project's layout)")
    merges = []
    for i, (a, b) in enumerate(pairs):
        if a not in vocab or b not in vocab or vocab.get(a + b) != 256 + i:
            raise bad(f"merge {i} ({a!r}, {b!r}) does not produce id {256 + i} "
                      "(not this project's layout)")
        merges.append((vocab[a], vocab[b]))
    if len(vocab) != 256 + len(merges):
        raise bad(f"{len(vocab)} tokens for {len(merges)} merges (not this project's layout)")
    if [t["id"] for t in added] != list(range(len(vocab), len(vocab) + len(added))):
        raise bad("the special tokens do not directly follow the merged tokens")
    try:
        return BPETokenizer(merges, pattern=pattern, special_tokens=[t["content"] for t in added])
    except ValueError as exc:
        raise bad(str(exc)) from None


def renumbered_hf_tokenizer(
    data: dict[str, Any], eos_id: int | None, source: str = "tokenizer.json"
) -> tuple[BPETokenizer, list[int | None]]:
    """Another model's byte-level BPE as a BPETokenizer of our layout, with our special tokens.

    Returns the tokenizer and, for each of its ids, the id of the same token in ``data``
    (None for a new one: a special token of ours it lacks, a reserved id), so a model's
    embedding rows can be reordered to match. The end-of-text token of ``data`` (``eos_id``)
    becomes our ``<|endoftext|>``; its other added tokens are dropped. TokenizerFileError if
    a merge makes a token twice or a token no merge makes is not an added token.
    """
    vocab, pairs, pattern, added, bad = _parse_byte_level_bpe(data, source)
    ours: dict[str, int] = {}
    for b, u in byte_to_unicode().items():
        if u not in vocab:
            raise bad(f"the byte {b} has no token")
        ours[u] = b
    merges = []
    for i, (a, b) in enumerate(pairs):
        if a not in ours or b not in ours or a + b not in vocab or a + b in ours:
            raise bad(f"merge {i} ({a!r}, {b!r}) does not make a new token from earlier ones")
        ours[a + b] = 256 + i
        merges.append((ours[a], ours[b]))
    added_ids = {t["id"] for t in added}
    unreachable = [t for t, i in vocab.items() if t not in ours and i not in added_ids]
    if unreachable:
        raise bad(f"{len(unreachable)} tokens no merge makes, e.g. {unreachable[0]!r}")
    try:
        tok = BPETokenizer(merges, pattern=pattern)
    except ValueError as exc:
        raise bad(str(exc)) from None
    source_ids: list[int | None] = [vocab[t] for t in sorted(ours, key=ours.__getitem__)]
    source_ids += [None] * (tok.vocab_size - len(source_ids))
    if eos_id is not None:
        source_ids[tok.eot_id] = eos_id
    return tok, source_ids


# ----------------------------------------------------------------------------------------------
# A transformers tokenizer folder: tokenizer.json, tokenizer_config.json, special_tokens_map.json


def jinja_chat_template(special_tokens: Mapping[str, int]) -> str:
    """Our chat template in Jinja, for ``apply_chat_template`` (transformers, llama.cpp).

    It renders what a chat prompt holds (see src/infer/chat_session.py): ``<|endoftext|>``
    (every dialogue follows a document's end in training), then each message as its role's
    token followed by its text (a system message, where the tokenizer has that role, first
    only), then ``<|assistant|>`` with ``add_generation_prompt`` or else ``<|endoftext|>``
    (a finished conversation, ``render_chat(end=True)``). Built from ROLE_TOKENS, keeping the
    roles whose token is in ``special_tokens`` (a tokenizer trained before a role existed has
    no id for it). An unknown role raises, as ``Turn`` does.
    """
    roles = {role: token for role, token in ROLE_TOKENS.items() if token in special_tokens}
    known = ", ".join(roles)
    lines = [
        "{%- set role_tokens = " + json.dumps(roles, ensure_ascii=False) + " -%}",
        "{{- " + json.dumps(ENDOFTEXT) + " -}}",
        "{%- for message in messages -%}",
        "{%- if message['role'] not in role_tokens -%}",
        "{{- raise_exception('unknown chat role ' + message['role'] + '; expected one of "
        + known + "') -}}",
        "{%- endif -%}",
    ]
    if "system" in roles:
        lines += [
            "{%- if message['role'] == 'system' and not loop.first -%}",
            "{{- raise_exception('a system message may only come first') -}}",
            "{%- endif -%}",
        ]
    lines += [
        "{{- role_tokens[message['role']] + message['content'] -}}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- " + json.dumps(ASSISTANT) + " -}}",
        "{%- else -%}{{- " + json.dumps(ENDOFTEXT) + " -}}{%- endif -%}",
    ]
    return "\n".join(lines)


def special_tokens_map(tok: BPETokenizer) -> dict[str, Any]:
    """``special_tokens_map.json``: ``<|endoftext|>`` is BOS, EOS and padding (documents are
    separated by it); the role tokens are additional special tokens."""
    others = [s for s in tok.special_tokens if s != ENDOFTEXT]
    return {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT,
            "additional_special_tokens": others}


def hf_tokenizer_config(tok: BPETokenizer, context_length: int) -> dict[str, Any]:
    """``tokenizer_config.json`` for ``AutoTokenizer``: no BOS/EOS added to plain text (so its
    ids equal our ``encode``), no clean-up of spaces on decoding (our decoding is lossless),
    the chat template, and every special token by id."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens_map(tok),
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
        "chat_template": jinja_chat_template(tok.special_tokens),
        "added_tokens_decoder": {str(i): _added_token(s) for s, i in tok.special_tokens.items()},
    }


def save_hf_folder(tok: BPETokenizer, folder: str | os.PathLike, context_length: int) -> list[str]:
    """Write the tokenizer files of a transformers model folder; returns their names."""
    folder = Path(folder)
    save_hf(tok, folder / "tokenizer.json")
    write_json_atomic(folder / "tokenizer_config.json", hf_tokenizer_config(tok, context_length))
    write_json_atomic(folder / "special_tokens_map.json", special_tokens_map(tok))
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


# ----------------------------------------------------------------------------------------------
# GGUF metadata (llama.cpp)

# llama.cpp's name for the pre-tokenizer whose regex is SPLIT_PATTERN: Llama 3's ("llama-bpe",
# LLAMA_VOCAB_PRE_TYPE_LLAMA3). Its contractions are written (?i:'s|'t|...) there and with
# explicit cases here; transformers' GGUF reader maps the name to the same regex.
GGUF_PRE_TOKENIZER = {SPLIT_PATTERN: "llama-bpe"}


def reserved_token_name(token_id: int) -> str:
    """The placeholder text of a reserved, unassigned special id in a GGUF token list."""
    return f"<|reserved_{token_id}|>"


def add_gguf_tokenizer(writer, tok: BPETokenizer, n_vocab: int) -> None:
    """Write ``tok`` into a ``gguf.GGUFWriter``'s metadata as llama.cpp's byte-level BPE
    ("gpt2") tokenizer with ``n_vocab`` tokens (the model's embedding rows: the reserved
    special ids get placeholder tokens of type UNUSED). ValueError if the split pattern has
    no llama.cpp pre-tokenizer or ``n_vocab`` is smaller than the tokenizer."""
    import gguf

    require_distinct_tokens(tok.vocab, "a GGUF token list")
    pre = GGUF_PRE_TOKENIZER.get(tok.pattern)
    if pre is None:
        raise ValueError("llama.cpp has no pre-tokenizer for this tokenizer's split pattern")
    specials = {i: s for s, i in tok.special_tokens.items()}
    if n_vocab < len(tok.vocab) + len(specials):
        raise ValueError(f"{n_vocab} embedding rows cannot hold the tokenizer's "
                         f"{len(tok.vocab) + len(specials)} tokens")
    b2u = byte_to_unicode()
    tokens, types = [], []
    for i in range(n_vocab):
        if i < len(tok.vocab):
            tokens.append("".join(b2u[b] for b in tok.vocab[i]))
            types.append(gguf.TokenType.NORMAL)
        elif i in specials:
            tokens.append(specials[i])
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append(reserved_token_name(i))
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{tokens[a]} {tokens[b]}" for a, b in tok.merges])
    eot = tok.special_tokens[ENDOFTEXT]
    writer.add_bos_token_id(eot)  # documents start after <|endoftext|>; not added automatically
    writer.add_eos_token_id(eot)
    writer.add_pad_token_id(eot)
    # End of an assistant turn: the next user turn (ASSISTANT_STOP_TOKENS' other member).
    (turn_end,) = [s for s in ASSISTANT_STOP_TOKENS if s != ENDOFTEXT]
    writer.add_eot_token_id(tok.special_tokens[turn_end])
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(jinja_chat_template(tok.special_tokens))
