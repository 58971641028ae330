"""Helpers other tests import: tiny prepared data and tiny trained runs, made in seconds.

    from tests.fixtures import make_token_data, make_tiny_run
    data_dir = make_token_data(tmp_path / "data")     # tokenizer.json, train.bin, val.bin, meta.json
    run_dir = make_tiny_run(tmp_path)                 # a run folder with a checkpoint (tiny preset)

The data is in the exact format src/data/prepare_data.py writes (see its docstring), built here
directly (no call to prepare_data) from a small synthetic English corpus, so tests of other
areas do not depend on the data pipeline.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np

SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "she", "he"]
VERBS = ["sees", "likes", "finds", "follows", "reads", "paints", "calls", "helps"]
OBJECTS = ["the ball", "a red house", "the river", "a long letter", "the garden", "a green apple"]
ENDINGS = [".", " today.", " every morning.", " in the park.", " again.", " with care."]


def tiny_corpus(num_docs: int, seed: int) -> list[str]:
    """Deterministic documents of simple English sentences (learnable by a tiny model)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        sentences = [
            f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)}"
            for _ in range(rng.randint(3, 8))
        ]
        docs.append(" ".join(sentences))
    return docs


def make_token_data(
    out_dir: str | Path,
    *,
    vocab_size: int = 300,
    train_docs: int = 400,
    val_docs: int = 40,
    seed: int = 0,
) -> Path:
    """Write tokenizer.json, train.bin, val.bin and meta.json (prepare_data's format) to ``out_dir``.

    A BPETokenizer of ``vocab_size`` (incl. 256 bytes + 16 reserved specials) is trained on the
    training documents; each document is encoded and followed by <|endoftext|>.
    Returns ``out_dir``.
    """
    from src.tokenizer.bpe import BPETokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_texts = tiny_corpus(train_docs, seed)
    val_texts = tiny_corpus(val_docs, seed + 1)
    tok = BPETokenizer.train(train_texts, vocab_size)
    tok.save(out / "tokenizer.json")
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    splits: dict[str, Any] = {}
    for split, texts in (("train", train_texts), ("val", val_texts)):
        ids: list[int] = []
        for text in texts:
            ids.extend(tok.encode(text))
            ids.append(tok.eot_id)
        np.asarray(ids, dtype=dtype).tofile(out / f"{split}.bin")
        splits[split] = {
            "tokens": len(ids),
            "bytes": sum(len(t.encode("utf-8")) for t in texts),
            "documents": len(texts),
            "by_source": {"tiny": {"tokens": len(ids), "documents": len(texts)}},
        }
    meta = {
        "format_version": 1,
        "tokenizer_hash": tok.hash,
        "dtype": np.dtype(dtype).name,
        "vocab_size": tok.vocab_size,
        "detokenized": True,
        "splits": splits,
        "sources": {"tiny": "synthetic (tests/fixtures.py)"},
        "mix": {"tiny": 1.0},
    }
    from src.utils.integrity import file_record, seal

    meta["files"] = {name: file_record(out / name) for name in ("tokenizer.json", "train.bin", "val.bin")}
    (out / "meta.json").write_text(json.dumps(seal(meta), indent=2), encoding="utf-8")
    return out


def tiny_config(data_dir: str | Path, run_dir: str | Path, **overrides: Any):
    """A TrainConfig for fast tests: tiny preset, fp32, quiet, frequent evaluation."""
    from src.training.config import make_config

    settings: dict[str, Any] = dict(
        preset="tiny", data=str(data_dir), run_dir=str(run_dir), max_steps=6, eval_interval=3,
        eval_tokens=256, batch_size=4, tokens_per_step=4 * 64, warmup_steps=2, dtype="fp32",
        progress=False, tensorboard=False, plot=False, device="cpu", seed=1,
    )
    settings.update(overrides)
    return make_config(settings)


def make_tiny_run(tmp_dir: str | Path, *, steps: int = 6, **overrides: Any) -> Path:
    """Train the tiny preset for ``steps`` steps on :func:`make_token_data` data in ``tmp_dir``.

    Returns the run folder (``tmp_dir/run``), holding config.json, tokenizer.json,
    metrics.jsonl and checkpoints (latest and best); load it with
    ``src.checkpoint.load_model(run_dir)``. Takes a couple of seconds.
    """
    from src.training.trainer import train

    tmp = Path(tmp_dir)
    data_dir = tmp / "data"
    if not (data_dir / "meta.json").is_file():
        make_token_data(data_dir)
    cfg = tiny_config(data_dir, tmp / "run", max_steps=steps, **overrides)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from more; the cores are shared
    try:
        return Path(train(cfg)["run_dir"])
    finally:
        torch.set_num_threads(threads)


class RepeatedBatch:
    """A BatchSource for driving TrainLoop directly: the same micro-batch (inputs, targets[,
    loss mask]) every step, so the loop's own bookkeeping is what a test sees; its position
    (saved in checkpoints, restored on resume) is the number of steps taken."""

    def __init__(self, *micro_batch) -> None:
        self.batch, self.steps = tuple(micro_batch), 0
        self.tokens_per_step = micro_batch[0].numel()

    @property
    def epoch(self) -> float:
        return float(self.steps)

    def next_batch(self):
        self.steps += 1
        return [self.batch]

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]
