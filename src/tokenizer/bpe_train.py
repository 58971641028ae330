"""Byte-level BPE training: the split pattern, chunk counting and the merge loop.

Training works on *unique chunks*, not on the corpus. The text is cut by ``SPLIT_PATTERN``
into chunks (words with their leading space, numbers, punctuation runs, whitespace); merges
never cross a chunk boundary, so two equal chunks always tokenize the same way and the
corpus is just a ``Counter`` of chunks. Each unique chunk becomes a "word": a list of token
ids (initially its UTF-8 bytes, ids 0..255) with the chunk's count as its weight.

The merge loop then keeps, incrementally:
  - ``pair_counts``: weighted count of every adjacent id pair over all words,
  - ``where``: for each pair, the set of word indices that (may) contain it,
  - a heap of ``(-count, left, right)`` entries with lazy invalidation.
Merging a pair rewrites only the words listed in ``where[pair]`` and adjusts the counts of
the pairs those words gain or lose; nothing is ever recounted over the whole corpus.

Tie-break rule (deterministic): the pair with the highest count wins; among equal counts,
the lexicographically smallest pair of ids ``(left, right)``. Because heap entries are
exactly ``(-count, left, right)``, the heap order *is* this rule.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterable

import regex

# GPT-4 (cl100k) style split, written so that Python's `regex`, Rust's `fancy-regex`
# (tiktoken) and Oniguruma (Hugging Face tokenizers) all cut text identically:
#   - English contractions ('s 't 're 've 'm 'll 'd, either case) split off a word;
#     spelled with explicit character classes instead of (?i) so no engine applies Unicode
#     case folding differently;
#   - a letter run with at most one leading non-letter/non-digit (usually the space);
#   - digits in groups of at most 3 (\p{N}{1,3}): "2024" -> "202" "4", so numbers use a
#     small closed set of tokens instead of thousands of memorised numerals;
#   - a punctuation run with an optional leading space, taking trailing newlines along;
#   - whitespace runs: newlines grouped, and a run of spaces before a word leaves its last
#     space to that word (\s+(?!\S)), so " hello" stays one chunk.
SPLIT_PATTERN = (
    r"'(?:[sdmtSDMT]|[lL][lL]|[vV][eE]|[rR][eE])"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

# Texts longer than this are cut into blocks before regex.findall, to bound memory.
_BLOCK_CHARS = 1 << 20
# A newline followed by a non-space character is always a chunk boundary under
# SPLIT_PATTERN (no alternative can match across it), so cutting there changes nothing.
_SAFE_CUT = regex.compile(r"\n(?=\S)")


def iter_blocks(text: str, block_chars: int = _BLOCK_CHARS) -> Iterable[str]:
    """Cut ``text`` into pieces of about ``block_chars`` at safe chunk boundaries."""
    start, n = 0, len(text)
    while n - start > block_chars:
        m = _SAFE_CUT.search(text, start + block_chars)
        if m is None:
            break
        yield text[start : m.end()]
        start = m.end()
    yield text[start:]


def count_chunks(
    texts: Iterable[str], pattern: str = SPLIT_PATTERN, progress: Callable[[int], None] | None = None
) -> Counter[str]:
    """Count every chunk of every text (one pass; C-speed ``Counter.update`` on findall).

    ``progress``, if given, is called with the number of characters just processed.
    """
    findall = regex.compile(pattern).findall
    counts: Counter[str] = Counter()
    for text in texts:
        for block in iter_blocks(text):
            counts.update(findall(block))
            if progress is not None:
                progress(len(block))
    return counts


def learn_merges(
    chunk_counts: dict[str, int],
    num_merges: int,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[int, int]]:
    """Learn up to ``num_merges`` merges from chunk counts; merge ``i`` creates id ``256 + i``.

    Returns fewer merges only when no adjacent pair is left (every chunk is one token).
    ``progress``, if given, is called with 1 after each merge.
    """
    # Sorting the chunks fixes the word order, so the result never depends on dict order.
    items = sorted(chunk_counts.items())
    try:
        words: list[list[int]] = [list(chunk.encode("utf-8")) for chunk, _ in items]
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"training text is not valid Unicode: lone surrogate U+{ord(exc.object[exc.start]):04X} "
            f"in {exc.object!r}"
        ) from None
    weights: list[int] = [count for _, count in items]

    pair_counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for wi, word in enumerate(words):
        w = weights[wi]
        for pair in zip(word, word[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + w
            s = where.get(pair)
            if s is None:
                where[pair] = {wi}
            else:
                s.add(wi)

    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    heappop, heappush = heapq.heappop, heapq.heappush
    while len(merges) < num_merges and heap:
        neg, a, b = heappop(heap)
        pair = (a, b)
        count = pair_counts.get(pair, 0)
        if count <= 0:
            continue  # merged away or gone
        if -neg != count:
            # Stale entry: counts of existing pairs only ever go down, so re-queue the
            # current (lower) count and let the heap find the true maximum.
            heappush(heap, (-count, a, b))
            continue

        new_id = 256 + len(merges)
        merges.append(pair)
        touched: set[tuple[int, int]] = set()
        for wi in where.pop(pair):
            word = words[wi]
            n = len(word)
            # Quick rewrite of this word; `where` is lazy, so the pair may be gone already.
            new: list[int] = []
            i = 0
            found = False
            while i < n:
                if i + 1 < n and word[i] == a and word[i + 1] == b:
                    new.append(new_id)
                    i += 2
                    found = True
                else:
                    new.append(word[i])
                    i += 1
            if not found:
                continue
            w = weights[wi]
            for p in zip(word, word[1:]):
                pair_counts[p] -= w
            for p in zip(new, new[1:]):
                pair_counts[p] = pair_counts.get(p, 0) + w
                if new_id in p:
                    touched.add(p)
                    s = where.get(p)
                    if s is None:
                        where[p] = {wi}
                    else:
                        s.add(wi)
            words[wi] = new
        del pair_counts[pair]
        for p in touched:
            heappush(heap, (-pair_counts[p], p[0], p[1]))
        if progress is not None:
            progress(1)
    return merges
