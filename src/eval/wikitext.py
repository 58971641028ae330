"""WikiText evaluation: token loss, bits per byte and word-level perplexity.

Word-level perplexity is what makes a BPE model comparable with the published WikiText
results (AWD-LSTM, GPT-2 zero-shot, ...). Those models predict the words of the
*tokenised* release, so their perplexity is exp(total NLL / number of words). A BPE model
predicts the same text in a different number of pieces, but its total NLL is still the
cost of the whole text, so dividing it by the release's word count gives the same unit.

The word count (``count_words``) is the one the word-level models used (pytorch/examples
``word_language_model``: ``line.split() + ["<eos>"]`` for every line): the whitespace-
separated tokens of every line of the file, plus one end-of-line per line. Every line
counts, the blank ones (a single space in the release) included; a file's final line end
does not start an extra line. WikiText-2: 217,646 words (valid), 245,569 (test).
The raw release gives the same count: it differs from the tokenised one only in that
rare words are whole-word replaced by ``<unk>`` (checked on the validation split). So when
only the raw files are at hand, the count is taken from them and labelled as such.

What is scored: the split as one stream, exactly as data preparation builds documents
(src/data/prepare_data.py): each article (sources.iter_wikitext_articles), detokenised or
not as the run was trained, then ``<|endoftext|>``. One ``<|endoftext|>`` goes in front,
so the first article's first token is scored too (with the "a document starts" context
every training document had). Thus every token of the text and every separator is scored
exactly once: total NLL covers the whole split. ``num_bytes`` is the UTF-8 size of the
evaluated article texts (separators not counted), as in the data's meta.json.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src.data import sources
from src.eval.perplexity import nll_summary, perplexity, sliding_window_token_nll, text_bytes
from src.utils.cli import UserError


def count_words(lines: Iterable[str]) -> int:
    """Words of WikiText release lines (no line ends): tokens plus one end-of-line per line."""
    return sum(len(line.split()) + 1 for line in lines)


@dataclass(frozen=True)
class WordCount:
    """The word count that normalises word-level perplexity, and where it came from."""

    num_words: int
    source: str  # the file (or Hub id) that was counted
    variant: str  # "tokens" (the tokenised release: exact) or "raw" (same count, see above)


def release_word_count(split: sources.WikiTextSplit, data_dir: str | Path | None, split_name: str) -> WordCount:
    """The word count of ``split``: from the tokenised release file when it can be found
    (the split itself, or ``wiki.<split>.tokens`` beside the raw file in ``data_dir``), else
    from the raw lines in hand."""
    if split.variant == "tokens":
        return WordCount(count_words(split.lines), split.source, "tokens")
    if data_dir is not None:
        try:
            path = sources.find_wikitext_file(data_dir, split_name, "tokens")
        except UserError:
            path = None
        if path is not None:
            sources.check_text_file(path)
            return WordCount(count_words(sources.iter_lines(path)), str(path), "tokens")
    return WordCount(count_words(split.lines), split.source, "raw")


def wikitext_stream(articles: list[str], tokenizer: Any, max_tokens: int | None = None) -> np.ndarray:
    """``<|endoftext|>``, then each article's ids followed by ``<|endoftext|>``, as int64.

    With ``max_tokens``, encoding stops once the stream is longer than that (the caller
    cuts it), so a quick look at a big split does not wait for all of it to be encoded.
    """
    eot = np.array([tokenizer.eot_id], dtype=np.int64)
    parts, length = [eot], 1
    step = len(articles) if max_tokens is None else 8
    for i in range(0, len(articles), step):
        if max_tokens is not None and length > max_tokens:
            break
        for ids in tokenizer.encode_batch(articles[i : i + step]):
            parts.extend((np.asarray(ids, dtype=np.int64), eot))
            length += len(ids) + 1
    return np.concatenate(parts)


def evaluate_wikitext(
    model: torch.nn.Module,
    tokenizer: Any,
    split: sources.WikiTextSplit,
    words: WordCount | None,
    *,
    detokenize: bool,
    context_length: int,
    stride: int,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    max_tokens: int | None = None,
    show_progress: bool | str = False,
) -> dict[str, Any]:
    """Score a WikiText split; returns the JSON entry of ``evaluate.py``.

    Keys: ``total_nll`` (nats), ``num_tokens`` (scored), ``loss`` (nats/token),
    ``token_perplexity``, ``num_bytes``, ``bits_per_byte``, ``num_words``,
    ``word_perplexity`` (None when no word count), plus how it was measured (``stride``,
    ``context_length``, ``variant``, ``detokenized``, ``source``, ``word_count_source``,
    ``word_count_variant``, ``documents``, ``truncated``).

    ``max_tokens`` scores only the first N tokens (a quick look): ``num_bytes`` is then
    that prefix's, and ``num_words`` the split's count scaled by the prefix's share of
    the bytes, so the word-level figure is an estimate; ``truncated`` says so.
    """
    articles = split.articles(detokenize=detokenize)
    if not articles:
        raise UserError(f"{split.source}: no WikiText articles in it")
    stream = wikitext_stream(articles, tokenizer, max_tokens)
    total_bytes = sum(len(a.encode("utf-8")) for a in articles)
    truncated = max_tokens is not None and max_tokens < len(stream) - 1
    if truncated:
        stream = stream[: max_tokens + 1]
    nll = sliding_window_token_nll(
        model, stream, context_length, stride, batch_size, device, autocast_dtype, show_progress=show_progress
    )
    total_nll, num_tokens = float(nll.sum()), int(nll.size)
    num_bytes, num_words = total_bytes, None if words is None else words.num_words
    if truncated:  # the bytes of the scored prefix exactly, its words pro rata
        num_bytes = text_bytes(tokenizer, stream[1:])
        if num_words is not None:
            num_words = max(1, round(num_words * num_bytes / total_bytes))
    return {
        **nll_summary(total_nll, num_tokens, num_bytes),
        "num_words": num_words,
        "word_perplexity": perplexity(total_nll, num_words) if num_words else None,
        "stride": stride,
        "context_length": context_length,
        "source": split.source,
        "variant": split.variant,
        "detokenized": detokenize,
        "documents": len(articles),
        "word_count_source": None if words is None else words.source,
        "word_count_variant": None if words is None else words.variant,
        "truncated": truncated,
    }
