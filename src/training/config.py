"""Training configuration: presets, config files, command-line overrides, validation.

One dataclass, :class:`TrainConfig`, holds every knob of a run. A value is resolved in this
order, later wins:

    1. the preset (``--preset``), which pairs a model preset with training hyper-parameters
    2. a YAML or JSON config file (``--config FILE``), a flat mapping of field names
    3. command-line flags, one per field (``--lr 3e-4``, ``--no-compile``, ...)

Model-shape fields (``n_layer``, ``d_model``, ...) default to ``None``, meaning "whatever the model
preset says". The resolved config is validated before any work starts and saved in the run
folder as ``config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from src.training.presets import PRESETS
from src.utils.cli import UserError

# How long `python train.py` (no arguments: the `small` preset) trains, in minutes. The number
# of steps is planned from the speed measured during the first steps and revised at each
# evaluation, so the run ends on time on any machine. Change it here (or with --time-budget)
# to make the quickstart longer or shorter.
QUICKSTART_MINUTES = 15.0


@dataclass
class TrainConfig:
    """Every setting of a training run. Defaults here are the `small` preset's."""

    # --- what to train, on what, where -------------------------------------------------
    preset: str = "small"  # model shape + training hyper-parameters (src/training/presets.py)
    data: str = "data"  # folder written by src/data/prepare_data.py
    run_dir: str | None = None  # default: runs/<preset>-<timestamp>
    seed: int = 1337
    resume: bool = False  # continue from the newest checkpoint in run_dir
    # --- length ------------------------------------------------------------------------
    max_steps: int = 100_000  # the length the learning-rate schedule is planned for
    stop_at_step: int | None = None  # end this invocation early (checkpoint saved)
    time_budget: float | None = QUICKSTART_MINUTES  # minutes; re-plans max_steps to fit; 0 = off
    # --- model shape overrides (None: the model preset's value) ------------------------
    context_length: int | None = None
    n_layer: int | None = None
    n_head: int | None = None
    n_kv_head: int | None = None
    d_model: int | None = None
    d_ff: int | None = None
    dropout: float | None = None
    tie_embeddings: bool | None = None
    mlp_act: str | None = None
    qk_norm: bool | None = None
    # --- batch -------------------------------------------------------------------------
    batch_size: int = 16  # sequences per micro-batch, per process
    tokens_per_step: int = 4096  # global tokens per optimiser step (gradient accumulation)
    # --- optimiser and schedule ----------------------------------------------------------
    optimizer: str = "muon"  # muon (Muon for hidden matrices, AdamW for the rest) | adamw
    lr: float = 8e-3  # peak learning rate (AdamW; Muon reuses it via RMS matching)
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1  # applied to matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    schedule: str = "wsd"  # wsd (warmup-stable-decay) | cosine | constant
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: fraction of max_steps spent decaying
    # --- evaluation and checkpoints ----------------------------------------------------
    eval_interval: int = 100  # steps between validations (and checkpoints): ~1.5 min of `small`
    eval_tokens: int = 16_384  # validation tokens scored per evaluation; 0 = all of val.bin
    eval_stride: int | None = None  # sliding-window stride; None = context_length
    eval_batch_size: int = 8
    checkpoint_interval: int | None = None  # None: at every evaluation
    keep_last: int = 3  # step checkpoints kept (the best is kept in addition)
    early_stop_patience: int | None = None  # stop after N evaluations without a better val loss
    # --- data awareness ----------------------------------------------------------------
    max_epochs: float | None = None  # warn when the run would pass over train.bin more often
    # --- hardware ----------------------------------------------------------------------
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bf16 where supported) | bf16 | fp16 | fp32
    compile: bool = True  # torch.compile the model (the tiny preset turns it off)
    fsdp: bool = False  # under torchrun: FSDP2 instead of DDP
    peak_tflops: float | None = None  # device peak for MFU; None = known GPUs only
    # --- observability -----------------------------------------------------------------
    progress: bool = True  # tqdm progress bar
    tensorboard: bool = True  # event files in <run_dir>/tensorboard when installed
    plot: bool = True  # loss-curve PNG at each evaluation
    sample_tokens: int = 48  # length of the text sample printed at the end (0 = none)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_overrides(self) -> dict[str, Any]:
        """The model-shape fields set in this config, as overrides of the preset's model_config."""
        keys = MODEL_FIELDS
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


# The TrainConfig fields that override the model preset's GPTConfig (None: the preset's value).
MODEL_FIELDS = ("context_length", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "dropout",
                "tie_embeddings", "mlp_act", "qk_norm")

CHOICES: dict[str, tuple[str, ...]] = {
    "preset": tuple(PRESETS),
    "optimizer": ("muon", "adamw"),
    "schedule": ("cosine", "wsd", "constant"),
    "dtype": ("auto", "bf16", "fp16", "fp32"),
    "mlp_act": ("silu", "relu2"),
}

HELP: dict[str, str] = {
    "preset": "model preset + training hyper-parameters",
    "data": "folder written by src/data/prepare_data.py",
    "run_dir": "run folder (default runs/<preset>-<timestamp>; with --resume, the newest such run)",
    "seed": "seed of the initial weights, the data order and dropout",
    "resume": "continue from the newest checkpoint in --run-dir",
    "max_steps": "optimiser steps the learning-rate schedule is planned for",
    "stop_at_step": "end this invocation at this step (checkpoint saved), schedule unchanged",
    "time_budget": "minutes: plan max_steps from measured speed so the run fits (0 = off)",
    "context_length": "tokens per training sequence (default: the preset's)",
    "n_layer": "transformer blocks (default: the preset's)",
    "n_head": "attention heads (default: the preset's)",
    "n_kv_head": "key/value heads, fewer than --n-head for grouped-query attention (default: the preset's)",
    "d_model": "width of the residual stream (default: the preset's)",
    "d_ff": "hidden width of each MLP (default: the preset's)",
    "dropout": "dropout probability in training (default: the preset's)",
    "tie_embeddings": "the output layer reuses the token embedding matrix (default: the preset's)",
    "mlp_act": "MLP gate activation: silu (SwiGLU) or relu2 (ReLU squared; no GGUF export)",
    "qk_norm": "RMSNorm on queries and keys (not in Llama: the export refuses it)",
    "tokens_per_step": "global tokens per optimiser step (gradient accumulation reaches it)",
    "batch_size": "sequences per micro-batch, per process",
    "optimizer": "muon for hidden matrices (AdamW for embeddings/norms), or adamw for all",
    "lr": "peak learning rate, reached after the warm-up (Muon reuses it via RMS matching)",
    "min_lr_ratio": "final learning rate as a fraction of --lr",
    "weight_decay": "AdamW weight decay, applied to matrices only",
    "beta1": "AdamW first-moment decay",
    "beta2": "AdamW second-moment decay",
    "grad_clip": "largest global gradient norm; 0 = no clipping",
    "schedule": "learning-rate schedule after the warm-up (wsd: warmup-stable-decay)",
    "warmup_steps": "steps of linear learning-rate warm-up",
    "decay_fraction": "wsd: fraction of max_steps spent decaying",
    "eval_interval": "steps between validations",
    "eval_tokens": "validation tokens per evaluation (0 = all)",
    "eval_stride": "sliding-window stride of validation (default: context length)",
    "eval_batch_size": "windows per validation batch",
    "checkpoint_interval": "steps between checkpoints (default: eval_interval)",
    "keep_last": "number of recent checkpoints kept, besides the best",
    "early_stop_patience": "stop after N evaluations in a row without a better val loss (None: off)",
    "max_epochs": "warn at the start when the run would pass over the training data more often",
    "device": "auto (CUDA, else Apple MPS, else CPU), cpu, cuda, cuda:N or mps",
    "dtype": "autocast precision; auto: bf16 on GPUs and CPUs with native bf16, else fp32",
    "compile": "torch.compile the model (needs a C++ compiler on CPU)",
    "fsdp": "under torchrun: shard with FSDP2 instead of replicating with DDP",
    "peak_tflops": "device peak TFLOP/s for the MFU readout (default: known GPUs only)",
    "progress": "progress bar on stderr",
    "tensorboard": "TensorBoard event files in <run>/tensorboard (when installed)",
    "plot": "redraw <run>/loss.png at each evaluation",
    "sample_tokens": "length of the text sample printed at the end (0 = none)",
}


def _field_type(f: dataclasses.Field) -> type:
    """The scalar type of a field: int, float, str or bool (``X | None`` gives X)."""
    t = str(f.type).replace(" ", "")
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if t.startswith(name):
            return typ
    raise TypeError(f"unsupported config field type {f.type!r}")


def _coerce(name: str, value: Any, typ: type, source: str) -> Any:
    """Convert ``value`` (from a file or the command line) to the field's type, or raise UserError."""
    if value is None:
        return None
    if isinstance(value, str) and value.lower() in ("none", "null") and typ is not str:
        return None
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.replace("_", ""))
        if typ is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: {name} must be {typ.__name__}, got {value!r}") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a flat YAML (.yaml/.yml) or JSON config file of field names -> values."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError: report in one line
        raise UserError(f"config file {path} is not valid {path.suffix[1:] or 'JSON'}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of setting names to values")
    known = {f.name: f for f in fields(TrainConfig)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise UserError(f"config file {path}: unknown setting {key!r}")
        out[name] = _coerce(name, value, _field_type(known[name]), f"config file {path}")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The train.py command line: one flag per TrainConfig field, plus --config."""
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train the GPT on the token files written by src/data/prepare_data.py. "
        "Defaults shown are the small preset's; other presets change some of them.",
    )
    p.add_argument("--config", default=None, help="YAML or JSON file of settings (flags override it)")
    p.add_argument("--plan", action="store_true",
                   help="print the run's plan (params, tokens, epochs, estimated time, warnings) as "
                   "one JSON line and exit: nothing is trained or written")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        typ = _field_type(f)
        kw: dict[str, Any] = {"dest": f.name, "help": HELP.get(f.name, " "), "default": None}
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = str  # coerced later, so errors read the same as for config files
            kw["metavar"] = {int: "N", float: "X", str: "TEXT"}[typ]
            if f.name in CHOICES:
                kw["choices"] = CHOICES[f.name]
                kw["metavar"] = "{" + ",".join(CHOICES[f.name]) + "}"
        # Show the real default in --help while keeping None as "not given on the command line".
        if "default" not in kw["help"] and getattr(defaults, f.name) is not None:
            kw["help"] = f"{kw['help']} (default: {getattr(defaults, f.name)})"
        p.add_argument(flag, **kw)
    return p


def resolve_config(
    argv: list[str] | None = None, base: dict[str, Any] | None = None
) -> tuple[TrainConfig, dict[str, Any]]:
    """Parse ``argv`` and resolve preset < config file < flags into a validated TrainConfig.

    ``base`` (e.g. a resumed run's saved config) replaces the preset layer when given.
    Returns the config and the dict of settings given explicitly (file + flags).
    """
    args = build_parser().parse_args(argv)
    known = {f.name: f for f in fields(TrainConfig)}
    explicit: dict[str, Any] = load_config_file(args.config) if args.config else {}
    for name, f in known.items():
        value = getattr(args, name)
        if value is not None:
            explicit[name] = _coerce(name, value, _field_type(f), f"--{name.replace('_', '-')}")
    # An explicit --max-steps means "exactly this many steps": a preset's time budget yields to it.
    if "max_steps" in explicit and "time_budget" not in explicit and base is None:
        explicit["time_budget"] = None
    return make_config(explicit, base=base), explicit


def plan_requested(argv: list[str] | None = None) -> bool:
    """Whether the command line asks for ``--plan`` (the plan only, no training)."""
    return build_parser().parse_args(argv).plan


def make_config(overrides: dict[str, Any], base: dict[str, Any] | None = None) -> TrainConfig:
    """Build a validated TrainConfig: preset (or ``base``) values, then ``overrides``."""
    preset = overrides.get("preset", (base or {}).get("preset", TrainConfig.preset))
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = dict(base) if base is not None else dict(PRESETS[preset].train, preset=preset)
    values.update(overrides)
    unknown = set(values) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise UserError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Raise UserError naming the first invalid value; checks only what needs no data or model."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(message)

    for name, options in CHOICES.items():
        value = getattr(cfg, name)  # None: a model field left to the preset
        need(value is None or value in options, f"{name} must be one of {', '.join(options)}, got {value!r}")
    for name in ("max_steps", "batch_size", "tokens_per_step", "eval_interval", "eval_batch_size", "keep_last"):
        need(getattr(cfg, name) >= 1, f"{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("context_length", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "eval_stride", "checkpoint_interval"):
        v = getattr(cfg, name)
        need(v is None or v >= 1, f"{name} must be at least 1, got {v}")
    for name in ("lr", "beta1", "beta2", "weight_decay", "grad_clip", "min_lr_ratio", "decay_fraction"):
        v = getattr(cfg, name)
        need(math.isfinite(v) and v >= 0, f"{name} must be a finite number >= 0, got {v}")
    need(cfg.lr > 0, f"lr must be positive, got {cfg.lr}")
    need(cfg.beta1 < 1 and cfg.beta2 < 1, f"beta1 and beta2 must be below 1, got {cfg.beta1}, {cfg.beta2}")
    need(cfg.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    need(cfg.decay_fraction <= 1, f"decay_fraction must be in [0, 1], got {cfg.decay_fraction}")
    need(cfg.dropout is None or 0 <= cfg.dropout < 1, f"dropout must be in [0, 1), got {cfg.dropout}")
    need(cfg.warmup_steps >= 0, f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    need(cfg.sample_tokens >= 0, f"sample_tokens must be >= 0, got {cfg.sample_tokens}")
    need(cfg.eval_tokens >= 0, f"eval_tokens must be >= 0, got {cfg.eval_tokens}")
    need(cfg.time_budget is None or (math.isfinite(cfg.time_budget) and cfg.time_budget >= 0),
         f"time_budget must be minutes >= 0, got {cfg.time_budget}")
    need(cfg.peak_tflops is None or cfg.peak_tflops > 0, f"peak_tflops must be positive, got {cfg.peak_tflops}")
    need(cfg.early_stop_patience is None or cfg.early_stop_patience >= 1,
         f"early_stop_patience must be at least 1, got {cfg.early_stop_patience}")
    need(cfg.max_epochs is None or (math.isfinite(cfg.max_epochs) and cfg.max_epochs > 0),
         f"max_epochs must be a positive number, got {cfg.max_epochs}")
    need(cfg.stop_at_step is None or cfg.stop_at_step >= 1, f"stop_at_step must be at least 1, got {cfg.stop_at_step}")
    dev = cfg.device
    need(dev in ("auto", "cpu", "cuda", "mps") or (dev.startswith("cuda:") and dev[5:].isdigit()),
         f"device must be auto, cpu, cuda, cuda:N or mps, got {dev!r}")
    need(bool(cfg.data), "data must name a folder")
