"""Batch encoding for BPETokenizer.encode_batch (bpe.py): worker processes or threads, numpy output.

Work is shared out in pieces of about ``GROUP_CHARS`` characters. A long text is cut at
chunk boundaries that the split pattern can never cross (``bpe_train.iter_blocks``), so a
single 10 MB text is shared out too, and the concatenated pieces equal encoding it whole.

- Pure-Python backend: a pool of worker processes (fork where available), each building its
  own tokenizer once from the merges; the GIL makes threads useless here.
- tiktoken backend: threads, since tiktoken's Rust encoder releases the GIL.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from src.tokenizer.bpe_train import SPLIT_PATTERN, iter_blocks

PARALLEL_MIN_CHARS = 1 << 20  # smaller batches are not worth starting processes for
GROUP_CHARS = 1 << 19  # characters per work item


def split_work(texts: Sequence[str], pattern: str, group_chars: int) -> list[list[tuple[int, str]]]:
    """Groups of (text index, piece) of about ``group_chars`` characters each, in order."""
    cut = pattern == SPLIT_PATTERN  # iter_blocks' safe cuts are proven for this pattern only
    groups: list[list[tuple[int, str]]] = [[]]
    size = 0
    for ti, text in enumerate(texts):
        for piece in iter_blocks(text, group_chars) if cut else (text,):
            if size >= group_chars:
                groups.append([])
                size = 0
            groups[-1].append((ti, piece))
            size += len(piece)
    return groups


def _assemble(n_texts: int, groups, results, dtype) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(n_texts)]
    for group, arrays in zip(groups, results):
        for (ti, _), arr in zip(group, arrays):
            parts[ti].append(arr)
    return [p[0] if len(p) == 1 else np.concatenate(p) if p else np.zeros(0, dtype) for p in parts]


# ---------------------------------------------------------------- worker processes
_worker: dict = {}


def _init_worker(tokenizer_class, merges, pattern, specials, dtype) -> None:
    # The class comes as an argument (pickled by reference): this module sits below the
    # tokenizer's core (bpe.py imports it), so it never imports BPETokenizer itself.
    tok = tokenizer_class(merges, pattern=pattern, special_tokens=specials)
    tok.backend_preference = "python"
    _worker.update(tok=tok, dtype=dtype)


def _encode_group(group: list[tuple[int, str]]) -> list[np.ndarray]:
    tok, dtype = _worker["tok"], _worker["dtype"]
    return [np.asarray(tok.encode(piece), dtype=dtype) for _, piece in group]


def in_daemon() -> bool:
    """Whether this is a daemon process (a Pool worker), which may not start processes."""
    return multiprocessing.current_process().daemon


def encode_in_processes(tok, texts: Sequence[str], workers: int, dtype) -> list[np.ndarray]:
    """Encode ``texts`` with ``tok``'s pure-Python encoder in ``workers`` processes.

    Each worker rebuilds the tokenizer once with ``type(tok)(merges, pattern=...,
    special_tokens=...)``, the BPETokenizer constructor's signature.
    """
    groups = split_work(texts, tok.pattern, GROUP_CHARS)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    init = (type(tok), tok.merges, tok.pattern, list(tok.special_tokens), dtype)
    with multiprocessing.get_context(method).Pool(min(workers, len(groups)), _init_worker, init) as pool:
        results = pool.imap(_encode_group, groups)
        return _assemble(len(texts), groups, results, dtype)


def encode_in_threads(
    encode: Callable[[str], list[int]], pattern: str, texts: Sequence[str], workers: int, dtype
) -> list[np.ndarray]:
    """Encode ``texts`` with a GIL-releasing ``encode`` (tiktoken) in ``workers`` threads."""
    groups = split_work(texts, pattern, GROUP_CHARS)

    def run(group: list[tuple[int, str]]) -> list[np.ndarray]:
        return [np.asarray(encode(piece), dtype=dtype) for _, piece in group]

    if workers <= 1 or len(groups) == 1:
        return _assemble(len(texts), groups, map(run, groups), dtype)
    with ThreadPoolExecutor(workers) as pool:
        return _assemble(len(texts), groups, pool.map(run, groups), dtype)
