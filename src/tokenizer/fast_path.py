"""The tiktoken fast path of BPETokenizer, and the check every bytes-keyed vocabulary needs.

Built from plain data (token bytes, split pattern, special tokens), not from a
BPETokenizer, so the tokenizer's core can use it without importing anything above it.
tiktoken is optional and imported lazily.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence


def require_distinct_tokens(vocab: Sequence[bytes], target: str) -> None:
    """ValueError unless no two merges give the same token (the same bytes).

    Training never produces such a pair, but hand-made merges can. Our ids handle it;
    ``target`` (tiktoken, a tokenizer.json vocabulary), which maps each token's bytes to
    one id, cannot represent it.
    """
    if len(set(vocab)) != len(vocab):
        raise ValueError(f"two merges produce the same bytes; {target} cannot represent this vocabulary")


def tiktoken_encoding(
    vocab: Sequence[bytes], pattern: str, special_tokens: Mapping[str, int], name: str = "gpt-model-bpe"
):
    """A ``tiktoken.Encoding`` with our pattern, tokens (rank = id) and special tokens.

    tiktoken merges the adjacent pair whose *concatenated bytes* are the lowest-ranked
    token; we merge the adjacent pair that *is* the lowest-ranked merge. They could differ
    only where two adjacent tokens U, V form a token T learnt from another split; with
    merges learnt by training such a (U, V) never meets before T's own pair would (a merge
    is only learnt from pairs that occur), so they agree. BPETokenizer still compares the
    two on probe texts (:func:`fast_path_mismatch`) before using this encoding as its fast
    path, and the tests compare them on the validation corpora and on random text.
    """
    import tiktoken

    require_distinct_tokens(vocab, "tiktoken")
    ranks = {t: i for i, t in enumerate(vocab)}
    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=dict(special_tokens))


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
