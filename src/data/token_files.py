"""Parts -> token files: encoding with worker processes, then mixing into the split files.

``Encoder`` streams a part's units through a pool of worker processes in bounded batches
(memory does not grow with the corpus) into a temporary ``.bin`` of token ids and an
``.ends`` file of document boundaries. ``write_split`` then writes a split file from the
encoded parts, each repeated by its mix weight (a fractional weight adds evenly spread
whole documents), atomically.
"""

from __future__ import annotations

import multiprocessing
import shutil
import signal
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from src.data.corpus import Part, Unit, unit_texts
from src.tokenizer.bpe import BPETokenizer
from src.tokenizer.chat_template import alternate_turns, encode_chat
from src.utils.atomic import atomic_path

BATCH_UNITS = 256  # documents per worker task ...
BATCH_CHARS = 1 << 18  # ... or this many characters, whichever comes first

# ---------------------------------------------------------------------------------------
# Units -> token ids (run in worker processes)

_worker: dict[str, Any] = {}


def _init_worker(tokenizer_path: str, detokenize: bool, dtype: str) -> None:
    _worker.update(tok=BPETokenizer.load(tokenizer_path), detokenize=detokenize, dtype=np.dtype(dtype))


def _encode_units(units: list[Unit]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids of a batch of units (concatenated), and tokens and text bytes per unit."""
    tok: BPETokenizer = _worker["tok"]
    ids: list[int] = []
    tokens = np.zeros(len(units), dtype=np.int64)
    nbytes = np.zeros(len(units), dtype=np.int64)
    for i, unit in enumerate(units):
        texts = unit_texts(unit, _worker["detokenize"])
        start = len(ids)
        if unit[0] == "dialog":
            ids.extend(encode_chat(tok, alternate_turns(texts))[0])  # ends in <|endoftext|>
        else:
            ids.extend(tok.encode(texts[0]))
            if unit[2]:
                ids.append(tok.eot_id)
        tokens[i] = len(ids) - start
        nbytes[i] = sum(len(t.encode("utf-8")) for t in texts)
    return np.asarray(ids, dtype=_worker["dtype"]), tokens, nbytes


def _batches(units: Iterable[Unit]) -> Iterator[list[Unit]]:
    batch: list[Unit] = []
    chars = 0
    for unit in units:
        batch.append(unit)
        chars += sum(len(t) for t in (unit[1] if unit[0] == "dialog" else [unit[1]]))
        if len(batch) >= BATCH_UNITS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


@dataclass
class Encoded:
    """One part's token ids in a temporary file, with its document boundaries."""

    part: Part
    bin_path: Path
    ends_path: Path  # int64 pairs: cumulative (tokens, bytes) at each document end
    tokens: int = 0
    bytes: int = 0
    documents: int = 0


def _quiet_pool(workers: int, initargs: tuple) -> Any:
    """A pool of worker processes that ignore Ctrl-C from birth: the terminal sends SIGINT to
    the whole process group, and only the main process should react (it stops the pool), not
    print a traceback per worker. An ignored signal stays ignored in a spawned child, and
    Python then installs no KeyboardInterrupt handler in it."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main_thread else None
    try:
        return multiprocessing.get_context("spawn").Pool(workers, _init_worker, initargs)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)


class Encoder:
    """Encodes parts with a pool of worker processes (or in this process for workers <= 1)."""

    def __init__(self, tokenizer_path: Path, detokenize: bool, dtype: np.dtype, workers: int) -> None:
        self.workers = workers
        initargs = (str(tokenizer_path), detokenize, np.dtype(dtype).name)
        if workers > 1:
            self.pool = _quiet_pool(workers, initargs)
        else:
            self.pool = None
            _init_worker(*initargs)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def _results(self, units: Iterable[Unit]) -> Iterator[tuple[list[Unit], tuple]]:
        if self.pool is None:
            for batch in _batches(units):
                yield batch, _encode_units(batch)
            return
        # Never more than a few batches in flight: memory stays bounded whatever the corpus.
        pending: deque = deque()
        for batch in _batches(units):
            pending.append((batch, self.pool.apply_async(_encode_units, (batch,))))
            if len(pending) >= 2 * self.workers:
                batch_, result = pending.popleft()
                yield batch_, result.get()
        while pending:
            batch_, result = pending.popleft()
            yield batch_, result.get()

    def encode(self, part: Part, folder: Path) -> Encoded:
        name = f"{part.split}.{part.source}"
        enc = Encoded(part, folder / f"{name}.bin", folder / f"{name}.ends")
        bar = tqdm(total=part.num_units, desc=f"encode {part.source}/{part.split}", unit="doc", file=sys.stderr)
        with open(enc.bin_path, "wb") as bin_file, open(enc.ends_path, "wb") as ends_file, bar:
            for batch, (ids, tokens, nbytes) in self._results(part.make_units()):
                ids.tofile(bin_file)
                cum_tokens = enc.tokens + np.cumsum(tokens)
                cum_bytes = enc.bytes + np.cumsum(nbytes)
                doc_end = np.array([u[2] for u in batch], dtype=bool)
                np.stack([cum_tokens[doc_end], cum_bytes[doc_end]], axis=1).astype(np.int64).tofile(ends_file)
                enc.tokens, enc.bytes = int(cum_tokens[-1]), int(cum_bytes[-1])
                enc.documents += int(doc_end.sum())
                bar.update(len(batch))
        return enc


# ---------------------------------------------------------------------------------------
# Mixing and writing the split files


def fractional_documents(num_documents: int, fraction: float) -> np.ndarray:
    """Indices of the documents a fractional weight adds: ``floor(n * fraction)`` of them,
    evenly spread (document i is taken when floor((i+1)f) > floor(i f)); deterministic."""
    i = np.arange(num_documents, dtype=np.float64)
    return np.nonzero(np.floor((i + 1) * fraction) > np.floor(i * fraction))[0]


def _copy_documents(enc: Encoded, docs: np.ndarray, out_file, dtype: np.dtype) -> tuple[int, int]:
    """Append the token ids of documents ``docs`` of ``enc``; returns (tokens, bytes)."""
    if len(docs) == 0 or enc.tokens == 0:
        return 0, 0
    ends = np.fromfile(enc.ends_path, dtype=np.int64).reshape(-1, 2)
    starts = np.vstack([[0, 0], ends[:-1]])
    ids = np.memmap(enc.bin_path, dtype=dtype, mode="r")
    tokens = nbytes = 0
    for d in docs:
        ids[starts[d, 0] : ends[d, 0]].tofile(out_file)
        tokens += int(ends[d, 0] - starts[d, 0])
        nbytes += int(ends[d, 1] - starts[d, 1])
    del ids
    return tokens, nbytes


def write_split(path: Path, encoded: list[Encoded], weights: dict[str, float], dtype: np.dtype) -> dict:
    """Write one split file atomically: each part repeated by its weight; returns its counts."""
    stats: dict[str, Any] = {"file": path.name, "tokens": 0, "bytes": 0, "documents": 0, "by_source": {}}
    with atomic_path(path) as tmp, open(tmp, "wb") as out_file:
        for enc in encoded:
            weight = weights.get(enc.part.source, 1.0)
            whole, fraction = int(weight), weight - int(weight)
            for _ in range(whole):
                with open(enc.bin_path, "rb") as src:
                    shutil.copyfileobj(src, out_file, 1 << 24)
            docs = fractional_documents(enc.documents, fraction) if fraction > 0 else np.zeros(0, np.int64)
            extra_tokens, extra_bytes = _copy_documents(enc, docs, out_file, dtype)
            counts = {
                "tokens": whole * enc.tokens + extra_tokens,
                "bytes": whole * enc.bytes + extra_bytes,
                "documents": whole * enc.documents + len(docs),
                "weight": weight,
                "unique_documents": enc.documents,
            }
            if enc.part.variant:
                counts["variant"] = enc.part.variant
            stats["by_source"][enc.part.source] = counts
            for key in ("tokens", "bytes", "documents"):
                stats[key] += counts[key]
    return stats
