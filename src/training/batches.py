"""Training batches from the token files, in a deterministic order that survives a restart.

The training loop (src/training/loop.py) reads any :class:`BatchSource`; :class:`BatchLoader`
is the one for pretraining on ``train.bin``, described here.

``train.bin`` is a flat array of token ids (see meta.json for its dtype), memory-mapped so a
corpus larger than RAM costs nothing to open. Training reads windows of ``context_length + 1``
tokens: the input is the first ``T`` tokens, the target the same shifted by one.

The order: each epoch cuts the token stream into non-overlapping windows at a random phase
(offset in [0, T)) and visits them in a random permutation, both drawn from
``numpy.random.default_rng([seed, epoch])``. Every window is therefore seen once per epoch
and the phase changes which token pairs straddle a window edge from epoch to epoch.

Sample ``i`` of the run (counting across steps) is a pure function of ``(seed, i)``, so the
loader's whole state is one integer, ``sample_index``, saved in every checkpoint. Each
optimiser step consumes ``global_batch = batch_size * grad_accum * world_size`` samples; process
``rank`` takes its own contiguous share of them, so ranks never read the same window and one
process with the same global batch sees exactly the same samples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from src.utils.cli import UserError
from src.utils.integrity import file_problem, seal_problem

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
IGNORE_INDEX = -1  # a target the model's loss skips (the ignore_index of GPT.forward)

# A micro-batch: inputs and targets, int64 tensors of shape (batch, T), optionally followed by a
# boolean loss mask of the same shape (False: that target is not scored, e.g. a user's turn
# of a conversation during fine-tuning).
MicroBatch = tuple[torch.Tensor, ...]


class BatchSource(Protocol):
    """Where the training loop gets its data. Contract:

    * ``next_batch()``: this process's micro-batches of the next optimiser step (gradient
      accumulation runs over them), advancing the position;
    * ``state_dict()`` / ``load_state_dict()``: that position as JSON-able values, saved in
      every checkpoint and restored on resume, so a resumed run reads exactly what an
      uninterrupted one would have;
    * ``tokens_per_step``: input tokens per optimiser step over all processes;
    * ``epoch``: passes over the data so far (fractional), for the metrics.
    """

    @property
    def tokens_per_step(self) -> int: ...

    @property
    def epoch(self) -> float: ...

    def next_batch(self) -> list[MicroBatch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def scored_targets(batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` of a micro-batch, a loss mask folded into the targets
    (IGNORE_INDEX where the mask is False)."""
    inputs, targets, *mask = batch
    if mask:
        targets = targets.masked_fill(~mask[0], IGNORE_INDEX)
    return inputs, targets


def prepare_hint(data_dir: str | Path) -> str:
    """How to (re)make prepared data in ``data_dir``: the fix every data error ends with."""
    return f"re-run `python src/data/prepare_data.py --out {data_dir}`"


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """Read ``meta.json`` of a prepared data folder, with a clear error when it is missing,
    unreadable, not JSON or changed since prepare_data.py wrote it (its own checksum)."""
    data_dir = Path(data_dir)
    path = data_dir / "meta.json"
    problem = file_problem(path)
    if problem and not path.exists():
        prepared = any((data_dir / n).exists() for n in ("train.bin", "val.bin", "tokenizer.json"))
        if data_dir.is_dir() and any(data_dir.iterdir()) and not prepared:
            # A folder with other things in it (e.g. the raw releases): preparing into it would
            # mix token files with them, so advise a folder of its own. (A prepared folder that
            # lost its meta.json gets the plain re-run advice below.)
            own = "data" if data_dir.resolve() != Path("data").resolve() else "data-prepared"
            raise UserError(
                f"{data_dir} holds no prepared data (no {path.name}; raw releases?); prepare it into "
                f"a folder of its own: `python src/data/prepare_data.py --data-dir {data_dir} "
                f"--out {own}`, then train with `--data {own}`"
            )
        raise UserError(
            f"no prepared data in {data_dir} (missing {path.name}); prepare it with "
            f"`python src/data/prepare_data.py --out {data_dir}` "
            "(offline: add `--data-dir ../shared/data`)"
        )
    if problem:
        raise UserError(f"{data_dir}: {problem}; {prepare_hint(data_dir)}")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path} is not valid JSON (damaged or cut short); {prepare_hint(data_dir)}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a JSON object; {prepare_hint(data_dir)}")
    problem = seal_problem(meta, path.name)
    if problem:
        raise UserError(f"{data_dir}: {problem}; {prepare_hint(data_dir)}")
    for key in ("tokenizer_hash", "dtype"):
        if key not in meta:
            raise UserError(f"{path} has no {key!r}; {prepare_hint(data_dir)}")
    if meta["dtype"] not in DTYPES:
        raise UserError(f"{path}: unsupported dtype {meta['dtype']!r} (expected uint16 or uint32)")
    return meta


def verify_data(data_dir: str | Path, meta: dict[str, Any], splits: tuple[str, ...] = ("train", "val")) -> None:
    """Check tokenizer.json and the token files of ``splits`` against the sizes and SHA-256s
    meta.json records (data prepared before they were recorded: nothing to compare, the size
    checks of :func:`open_tokens` still apply). Raises UserError naming the file and the fix.

    Hashing reads every byte, about 0.5 GB/s on the busy 2-core test machine: 14 ms for a
    7.6 MB train.bin (WikiText-2's size), 1.5 s for a 100x larger one; small next to any
    training run on such data, so it is done at every start.
    """
    data_dir = Path(data_dir)
    records = meta.get("files")
    if not isinstance(records, dict):
        return
    for name in ("tokenizer.json", *(f"{split}.bin" for split in splits)):
        problem = file_problem(data_dir / name, records.get(name), hashes=True)
        if problem and name == "tokenizer.json" and file_problem(data_dir / name) is None:
            problem = ("tokenizer.json is not the tokenizer the token files were made with (its "
                       "size or SHA-256 differs from meta.json's record)")
        if problem:
            raise UserError(f"prepared data in {data_dir} is damaged: {problem}; {prepare_hint(data_dir)}")


def open_tokens(data_dir: str | Path, split: str, meta: dict[str, Any] | None = None) -> np.ndarray:
    """Memory-map ``<data_dir>/<split>.bin`` as a read-only 1-D array of token ids, after
    checking its size against meta.json (see :func:`verify_data` for its SHA-256)."""
    meta = meta if meta is not None else read_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    fix = prepare_hint(data_dir)
    record = (meta.get("files") or {}).get(path.name)
    problem = file_problem(path, record)
    if problem:
        raise UserError(f"prepared data in {data_dir} is damaged: {problem}; {fix}")
    dtype = np.dtype(DTYPES[meta["dtype"]])
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise UserError(f"{path} is {size} bytes, not a whole number of {meta['dtype']} tokens "
                        f"(truncated?); {fix}")
    if size == 0:
        raise UserError(f"{path} is empty; {fix}")
    expected = meta.get("splits", {}).get(split, {}).get("tokens")
    if expected is not None and expected != size // dtype.itemsize:
        raise UserError(f"{path} holds {size // dtype.itemsize} tokens but meta.json says {expected}; {fix}")
    return np.memmap(path, dtype=dtype, mode="r")


def windows_per_epoch(num_tokens: int, context_length: int) -> int:
    """Training windows in one epoch of ``num_tokens`` tokens: room for any phase in [0, T)
    plus the one-token target shift. UserError when the data is too short for one."""
    windows = (num_tokens - context_length) // context_length
    if windows < 1:
        raise UserError(
            f"the training split has {num_tokens} tokens, too few for context length "
            f"{context_length} (need at least {2 * context_length}); prepare more data or "
            "lower --context-length"
        )
    return windows


class BatchLoader:
    """Deterministic (input, target) batches for one process of a (possibly distributed) run:
    the pretraining :class:`BatchSource`.

    Contract: ``next_batch()`` returns the ``grad_accum`` micro-batches of the next optimiser
    step for this rank, each a pair of int64 tensors of shape (batch_size, context_length),
    and advances ``sample_index`` by the global batch. ``state_dict()``/``load_state_dict()``
    save and restore the position exactly. ``pin_memory`` (for a CUDA run) returns the
    tensors in page-locked memory.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        context_length: int,
        batch_size: int,
        grad_accum: int = 1,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ) -> None:
        self.tokens = tokens
        self.pin_memory = pin_memory  # page-locked batches: non-blocking copies to a GPU
        self.T = context_length
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.windows_per_epoch = windows_per_epoch(len(tokens), self.T)
        self.sample_index = 0
        self._epoch_cache: tuple[int, int, np.ndarray] | None = None

    @property
    def global_batch(self) -> int:
        """Samples consumed per optimiser step, over all processes."""
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def tokens_per_step(self) -> int:
        """Input tokens per optimiser step, over all processes."""
        return self.global_batch * self.T

    @property
    def epoch(self) -> float:
        """Fractional epochs done so far."""
        return self.sample_index / self.windows_per_epoch

    def _epoch_order(self, epoch: int) -> tuple[int, np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            phase = int(rng.integers(0, self.T))
            self._epoch_cache = (epoch, phase, rng.permutation(self.windows_per_epoch))
        return self._epoch_cache[1], self._epoch_cache[2]

    def window_starts(self, first: int, count: int) -> np.ndarray:
        """Token offsets of samples ``first .. first+count-1`` of the run's order."""
        starts = np.empty(count, dtype=np.int64)
        for k in range(count):
            epoch, j = divmod(first + k, self.windows_per_epoch)
            phase, order = self._epoch_order(epoch)
            starts[k] = phase + int(order[j]) * self.T
        return starts

    def _batch(self, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.window_starts(first, self.batch_size)
        rows = np.stack([np.asarray(self.tokens[s : s + self.T + 1], dtype=np.int64) for s in starts])
        t = torch.from_numpy(rows)
        x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()
        if self.pin_memory:  # then .to(cuda, non_blocking=True) overlaps with the GPU's work
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of the next step (rank r takes the r-th share)."""
        base = self.sample_index + self.rank * self.grad_accum * self.batch_size
        micro = [self._batch(base + m * self.batch_size) for m in range(self.grad_accum)]
        self.sample_index += self.global_batch
        return micro

    def state_dict(self) -> dict[str, int]:
        return {"sample_index": self.sample_index, "seed": self.seed, "windows_per_epoch": self.windows_per_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("windows_per_epoch", self.windows_per_epoch) != self.windows_per_epoch:
            raise UserError(
                "the training data changed since this checkpoint was written "
                f"({state['windows_per_epoch']} windows per epoch then, {self.windows_per_epoch} now)"
            )
        self.seed = int(state.get("seed", self.seed))
        self.sample_index = int(state["sample_index"])
        self._epoch_cache = None
