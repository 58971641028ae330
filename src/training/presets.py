"""The named presets, in one table: a model shape and the training hyper-parameters that go
with it. ``train.py --preset NAME`` starts from a row; tests and benchmarks build a model of a
preset's shape with :func:`model_config`.

The table sits in the training room, above the model: src/model knows nothing of presets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from src.model.gpt import GPTConfig


@dataclass(frozen=True)
class Preset:
    """``model``: GPTConfig fields (the vocabulary size comes from the data); ``train``:
    TrainConfig fields. Any field not given keeps its dataclass default."""

    model: dict[str, Any]
    train: dict[str, Any] = field(default_factory=dict)


# Regularisation of the large presets for a small corpus (docs/experiments.md): AdamW weight
# decay on matrices for both; dropout for gpt-125m only, from scaled-down CPU probes and the
# literature (gpt-60m's own measurement on a GPU found dropout did not pay within its budget).
SMALL_DATA_DROPOUT = 0.1
SMALL_DATA_WEIGHT_DECAY = 0.1

# Parameter counts are for vocab_size=16384 (tested in tests/test_model.py).
PRESETS: dict[str, Preset] = {
    # Tests and smoke runs: seconds on a CPU. ~0.84M parameters (most of it the embedding);
    # uses GQA so tests cover it.
    "tiny": Preset(
        model=dict(context_length=64, n_layer=2, n_head=4, n_kv_head=2, d_model=48, d_ff=128),
        train=dict(
            max_steps=200, time_budget=None, batch_size=8, tokens_per_step=8 * 64, lr=3e-3,
            warmup_steps=10, eval_interval=50, eval_tokens=4096, context_length=64,
            optimizer="adamw", schedule="cosine",  # the plain recipe: what the tests exercise
            compile=False,  # compiling costs more time than such short runs take
        ),
    ),
    # The CPU quickstart: ~4.9M parameters (3.1M of them the embedding), planned to fit
    # QUICKSTART_MINUTES on 2 cores (see TrainConfig.time_budget). Its training recipe is
    # TrainConfig's defaults: Muon, warmup-stable-decay, lr 8e-3. At that budget a narrower,
    # shallower model sees more tokens and wins (width 256 lost on the clock even though its
    # matrices run the matmul units better); docs/experiments.md has the measurements.
    "small": Preset(model=dict(context_length=256, n_layer=4, n_head=3, d_model=192)),
    # The original project's scale (8 layers x 768) with a 4x longer context: ~62.9M. A GPU.
    # Its recipe is the one measured on an H200 on WikiText-2 + DailyDialog (3.81M tokens with
    # the 16k vocabulary; docs/experiments.md, bench/gpu.py): 262,144 tokens per step, lr 1e-3
    # cosine over 640 steps, no dropout. Validation loss was best at 17.6 epochs (67M tokens)
    # and rose after it, so early stopping (an evaluation every 32 steps = 2.2 epochs, patience
    # 3) ends the run near 21 epochs and keeps the best checkpoint; the 640 planned steps (44
    # epochs) only shape the schedule. Dropout 0.1 / 0.2 lost to none at every evaluation of a
    # 14-epoch run. On WikiText-103 (~30x the tokens) give it --max-steps from `train.py --plan`.
    "gpt-60m": Preset(
        model=dict(context_length=1024, n_layer=8, n_head=12, n_kv_head=4, d_model=768),
        train=dict(
            max_steps=640, time_budget=None, batch_size=32, tokens_per_step=262_144, lr=1e-3,
            warmup_steps=40, eval_interval=32, eval_tokens=0, weight_decay=SMALL_DATA_WEIGHT_DECAY,
            early_stop_patience=3, max_epochs=45, optimizer="adamw", schedule="cosine",
        ),
    ),
    # GPT-2 small's shape (12 x 768, 12 heads): ~97.5M with our 16k vocabulary. Meant for
    # WikiText-103; the defaults are the same small-corpus recipe as gpt-60m's.
    "gpt-125m": Preset(
        model=dict(context_length=1024, n_layer=12, n_head=12, d_model=768,
                   dropout=SMALL_DATA_DROPOUT),
        train=dict(
            max_steps=700, time_budget=None, batch_size=16, tokens_per_step=32_768, lr=6e-4,
            warmup_steps=50, eval_interval=50, eval_tokens=0, weight_decay=SMALL_DATA_WEIGHT_DECAY,
            early_stop_patience=4, max_epochs=10, optimizer="adamw", schedule="cosine",
        ),
    ),
}


def model_config(name: str, **overrides: Any) -> GPTConfig:
    """The model config of preset ``name`` with any field overridden (e.g. vocab_size=512).
    ValueError for an unknown preset or an invalid field, naming it."""
    # Imported here, not at the top: the table alone (train.py --help, config checks) needs no torch.
    from src.model.gpt import GPTConfig

    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return GPTConfig.from_dict({**PRESETS[name].model, **overrides})
