"""Chat fine-tuning: a supervised stage that turns a pretrained run into a conversational one.

``finetune(stage, explicit)`` is what ``python finetune.py`` runs (tests call it directly). In
order, with every check of the inputs done before the run folder is created:

  1. device, processes (torchrun -> DDP / FSDP2), as pretraining
  2. the base run (``--from``; default: the newest pretraining run) and its best checkpoint,
     tokenizer and data meta; or, with ``--resume``, the fine-tuned run's own records
  3. data: DailyDialog train dialogues (``--data-dir``, else the release the base run's data
     was prepared from, else the Hub), or ``--data FILE.jsonl``
     (src/data/conversations.py), rendered by the chat template and cut into examples; the
     validation conversations (DailyDialog validation, ``--val-data``, or the last tenth of
     ``--data``)
  4. the loop's settings: the base run's, then FINETUNE_DEFAULTS, then the flags given
  5. the run folder runs/<base>-sft-<time>/: as a pretraining run's (config.json, tokenizer,
     data meta), plus finetune.json recording the base run and the data
  6. the model with the base weights, the optimiser, the resumed state if any
  7. the training loop (src/training/loop.py) on ChatBatches (src/training/chat_batches.py):
     loss on the assistant's tokens only, validation loss on the assistant's tokens of the
     validation conversations, early stopping after ``patience`` evaluations without a new best
  8. a summary and a sample reply

The result is an ordinary run: chat.py, generate.py and evaluate.py load it like any other
(its best checkpoint), and chat.py without --run prefers the newest fine-tuned run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src import checkpoint as reader
from src.data import sources
from src.data.conversations import SPEAKERS, dailydialog_conversations, read_chat_jsonl
from src.infer.sampling import CHAT_DEFAULTS, generate
from src.model.gpt import GPT, GPTConfig
from src.tokenizer.chat_template import ROLE_TOKENS, Turn, encode_chat, reply_stop_ids
from src.training import checkpoint as ckpt_io
from src.training.chat_batches import ChatBatches, chat_validation, encode_examples
from src.training.config import HELP, make_config
from src.training.distributed import DistInfo, init_distributed, shutdown_distributed
from src.training.loop import TrainLoop
from src.training.trainer import open_run_dir, prepare_model, setup_precision, summarize
from src.utils.atomic import write_json_atomic
from src.utils.cli import UserError
from src.utils.device import make_generator, pick_device

# The loop's settings for fine-tuning the quickstart model, chosen by measurement (README,
# "Chat fine-tuning"); flags override them. Everything else (clipping, betas, the model's
# options) is the base run's. The optimiser and schedule are fixed here, not inherited: the
# learning rate below was measured with them, whatever the base run trained with.
FINETUNE_DEFAULTS: dict[str, Any] = {
    "optimizer": "adamw",
    "schedule": "cosine",
    "lr": 1e-3,  # 3e-3 made validation worse than the base; 3e-4 improved it more slowly
    "warmup_steps": 5,
    "min_lr_ratio": 0.1,
    "eval_interval": 20,  # validation (200 dialogues) then costs under a tenth of the steps
    "time_budget": 3.0,  # minutes: ~100 steps of the quickstart model on 2 idle cores
    "tokens_per_step": 4096,
    "batch_size": 16,  # micro-batch capacity: batch_size x context_length positions
    "keep_last": 2,
    "compile": False,  # padded batches vary in length: compiling would recompile often
    "sample_tokens": 48,  # the length of the sample reply at the end
}
# Loop settings a flag of finetune.py may set (TrainConfig fields), with their types.
LOOP_FLAGS: dict[str, type] = {
    "lr": float, "max_steps": int, "time_budget": float, "warmup_steps": int,
    "min_lr_ratio": float, "weight_decay": float, "schedule": str, "batch_size": int,
    "tokens_per_step": int, "eval_interval": int, "keep_last": int, "seed": int,
    "stop_at_step": int, "device": str, "dtype": str, "compile": bool, "progress": bool,
    "plot": bool, "tensorboard": bool, "sample_tokens": int,
}
SAMPLE_MESSAGE = "Hello! How are you today?"
VAL_SHARE = 10  # with --data and no --val-data: the last 1/VAL_SHARE conversations validate


@dataclass
class FinetuneConfig:
    """The stage's own settings (the loop's are a TrainConfig)."""

    base: str | None = None  # --from: the pretrained run (None: the newest pretraining run)
    data: str | None = None  # JSONL conversations (None: DailyDialog train)
    val_data: str | None = None  # JSONL validation conversations
    data_dir: str | None = None  # local DailyDialog release (None: the base's, else the Hub)
    speakers: str = "second"  # DailyDialog: the second speaker is the assistant, or both are
    epochs: float = 1.0  # the schedule's length in passes over the data (unless --max-steps)
    eval_dialogues: int = 200  # DailyDialog validation dialogues scored at each evaluation
    patience: int = 3  # stop after this many evaluations without a new best (0: never)

    def validate(self) -> None:
        if self.speakers not in SPEAKERS:
            raise UserError(f"--speakers must be one of {', '.join(SPEAKERS)}, "
                            f"got {self.speakers!r}")
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise UserError(f"--epochs must be a positive number, got {self.epochs}")
        if self.eval_dialogues < 1:
            raise UserError(f"--eval-dialogues must be at least 1, got {self.eval_dialogues}")
        if self.patience < 0:
            raise UserError(f"--patience must be >= 0, got {self.patience}")
        if self.val_data and not self.data:
            raise UserError("--val-data goes with --data (DailyDialog has its own validation "
                            "split)")


# ---- the command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetune.py",
        description="Fine-tune a pretrained run on conversations (loss on the assistant's "
        "tokens only); writes a new run, runs/<base>-sft-<time>/.",
    )
    stage = FinetuneConfig()
    p.add_argument("--from", dest="base", metavar="RUN_DIR",
                   help="the pretrained run (default: the newest pretraining run under runs/)")
    p.add_argument("--data", metavar="FILE.jsonl", help='your own conversations, one '
                   '{"messages": [{"role": ..., "content": ...}, ...]} per line '
                   "(default: DailyDialog train)")
    p.add_argument("--val-data", metavar="FILE.jsonl", help="validation conversations for "
                   f"--data (default: its last 1/{VAL_SHARE})")
    p.add_argument("--data-dir", metavar="DIR", help="local DailyDialog release (e.g. "
                   "../shared/data); default: the one the base run's data was prepared from, "
                   "else the Hugging Face Hub")
    p.add_argument("--speakers", choices=SPEAKERS, help="DailyDialog: the assistant is the "
                   f"second speaker, or each speaker in turn (default: {stage.speakers})")
    p.add_argument("--epochs", type=float, help="length of the schedule in passes over the data, "
                   f"unless --max-steps (default: {stage.epochs}; the time budget may end it "
                   "sooner)")
    p.add_argument("--eval-dialogues", type=int, help="validation conversations scored at each "
                   f"evaluation (default: {stage.eval_dialogues})")
    p.add_argument("--patience", type=int, help="stop after this many evaluations without a "
                   f"better validation loss; 0 = never (default: {stage.patience})")
    p.add_argument("--run-dir", help="the new run's folder (default: runs/<base>-sft-<time>; "
                   "with --resume, the newest fine-tuned run)")
    p.add_argument("--resume", action="store_true", help="continue a fine-tuning run exactly")
    for name, typ in LOOP_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        default = FINETUNE_DEFAULTS.get(name, "the base run's")
        text = f"{HELP.get(name, name.replace('_', ' '))} (default: {default})"
        if typ is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=text)
        else:
            p.add_argument(flag, dest=name, type=typ, help=text)
    return p


def parse_args(argv: list[str] | None = None) -> tuple[FinetuneConfig, dict[str, Any]]:
    """The stage's settings and the loop settings given explicitly (plus run_dir, resume)."""
    args = vars(build_parser().parse_args(argv))
    stage_fields = [f.name for f in dataclasses.fields(FinetuneConfig)]
    stage = FinetuneConfig(**{k: args[k] for k in stage_fields if args[k] is not None})
    stage.validate()
    explicit = {k: args[k] for k in (*LOOP_FLAGS, "run_dir") if args[k] is not None}
    explicit["resume"] = args["resume"]
    given = {k for k in stage_fields if args[k] is not None}
    return stage, {**explicit, "stage_given": sorted(given)}


# ---- the stage -------------------------------------------------------------------------------


def finetune(stage: FinetuneConfig, explicit: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume, with ``explicit["resume"]``) a fine-tuning stage; returns the summary of
    :func:`src.training.trainer.train` plus ``base_run``. ``explicit``: loop settings (TrainConfig
    fields) given on the command line, ``run_dir``, ``resume``, and ``stage_given`` (the stage
    settings given, which a resumed run must not change). UserError on bad input, raised before
    any file is written."""
    device = pick_device(explicit.get("device", "auto"))
    dist_info = init_distributed(device.type)
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
    ended = False
    try:
        result = _finetune(stage, explicit, device, dist_info)
        ended = True
        return result
    finally:
        shutdown_distributed(together=ended)


def _finetune(stage: FinetuneConfig, explicit: dict[str, Any], device: torch.device,
              dist_info: DistInfo) -> dict[str, Any]:
    log = print if dist_info.is_main else (lambda *a, **k: None)
    resume, stage_given = bool(explicit.get("resume")), explicit.get("stage_given", ())
    explicit = {k: v for k, v in explicit.items() if k not in ("resume", "stage_given")}

    # ---- 2. the base run (or the run being resumed) ------------------------------------------
    run_dir: Path | None = Path(explicit["run_dir"]) if explicit.get("run_dir") else None
    saved_record = None
    if resume:
        run_dir = run_dir or reader.newest_run(Path("runs"), where=reader.is_finetuned)
        if run_dir is None or not reader.is_finetuned(run_dir):
            raise UserError(f"--resume: {run_dir or 'runs/'} holds no fine-tuning run "
                            f"(no {reader.FINETUNE_FILE}); start one without --resume")
        saved_record = json.loads((run_dir / reader.FINETUNE_FILE).read_text(encoding="utf-8"))
        stage = _resumed_stage(stage, saved_record, stage_given)
        base_ckpt = Path(saved_record["base_checkpoint"])
    else:
        base_ckpt = reader.resolve_checkpoint(stage.base or _newest_pretraining_run())
    base_run = reader.run_dir_of(base_ckpt)
    base_state = reader.read_state(base_ckpt)
    tokenizer = reader.load_run_tokenizer(base_run, base_state.get("tokenizer_hash"))
    model_cfg = GPTConfig.from_dict(base_state["model_config"])
    _check_tokenizer(tokenizer, model_cfg, base_run)
    meta_path = base_run / "data_meta.json"
    meta = (json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file()
            else {"tokenizer_hash": tokenizer.hash})
    if meta.get("tokenizer_hash") != tokenizer.hash:
        raise UserError(f"{meta_path} records tokenizer {str(meta.get('tokenizer_hash'))[:12]} "
                        f"but {base_run / 'tokenizer.json'} is {tokenizer.hash[:12]}")

    # ---- 3. data ----------------------------------------------------------------------------
    detokenize = bool(meta.get("detokenized", True))
    if not stage.data and not stage.data_dir:
        stage.data_dir = recorded_dailydialog_dir(meta)  # where the base run's data came from
    train_convs, val_convs, data_record = load_conversations(stage, detokenize)
    T = model_cfg.context_length
    train_examples = encode_examples(tokenizer, train_convs, T)
    val_examples = encode_examples(tokenizer, val_convs, T)
    if not train_examples or not val_examples:
        which = "training" if not train_examples else "validation"
        raise UserError(f"no {which} conversation has an assistant turn to learn from")
    if saved_record is not None and saved_record["data"].get("sha256") != data_record.get("sha256"):
        raise UserError(f"the fine-tuning data changed since {run_dir} was started "
                        f"({data_record.get('path') or 'DailyDialog'}); start a new run")

    # ---- 4. the loop's settings -------------------------------------------------------------
    if resume and (run_dir / "config.json").is_file():
        base_values = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        base_values.update(stop_at_step=None)
    else:
        base_values = {**(base_state.get("train_config") or {}), **FINETUNE_DEFAULTS}
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = run_dir or Path("runs") / f"{base_run.name}-sft-{stamp}"
    overrides = {**explicit, "run_dir": str(run_dir), "resume": resume,
                 "data": data_record.get("path") or "dailydialog"}
    if "max_steps" in explicit and "time_budget" not in explicit and not resume:
        overrides["time_budget"] = None  # an explicit step count means exactly that many
    # The stage's --patience is the loop's early stopping (TrainConfig.early_stop_patience).
    overrides["early_stop_patience"] = stage.patience or None
    cfg = make_config(overrides, base=base_values)
    micro_tokens = cfg.batch_size * T
    grad_accum = max(1, round(cfg.tokens_per_step / (micro_tokens * dist_info.world_size)))
    batches = ChatBatches(train_examples, micro_tokens, grad_accum, cfg.seed,
                          dist_info.rank, dist_info.world_size)
    if "max_steps" not in explicit and not resume:
        cfg.max_steps = max(1, math.ceil(stage.epochs * batches.steps_per_epoch))
    record = {"base_run": str(base_run), "base_checkpoint": str(base_ckpt),
              "base_step": base_state["step"], "settings": dataclasses.asdict(stage),
              "data": data_record,
              "examples": {"train": len(train_examples), "validation": len(val_examples)}}

    # ---- 5. the run folder (nothing was written before this point) ---------------------------
    amp_dtype = setup_precision(cfg, device, log)
    run_dir, resume_from = open_run_dir(cfg, base_run, meta, dist_info, device, log)
    if dist_info.is_main and saved_record is None:
        write_json_atomic(run_dir / reader.FINETUNE_FILE, record)

    # ---- 6. model, optimiser, resumed state --------------------------------------------------
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + dist_info.rank)  # dropout masks differ per rank
    raw_model = GPT(model_cfg)
    raw_model.load_state_dict(reader.read_weights(base_ckpt), strict=True)
    raw_model.to(device)
    model, compiled, optimizers = prepare_model(raw_model, cfg, dist_info, device, log)
    resume_state = None
    if resume_from is not None:
        resume_state = ckpt_io.load_checkpoint(resume_from, raw_model, optimizers)
        log(f"resumed from {resume_from} (step {resume_state['step']})")
    log(f"fine-tuning {base_ckpt} -> {run_dir}: {len(train_examples):,} examples "
        f"({data_record['conversations']:,} conversations, {batches.fill():.0%} of padded "
        f"positions real), {len(val_examples):,} for validation; up to {batches.tokens_per_step:,} "
        f"tokens/step ({cfg.batch_size} x {T} x {grad_accum} accum x {dist_info.world_size} proc), "
        f"{batches.steps_per_epoch:,.0f} steps per epoch, lr {cfg.lr:g}, {device}")

    # ---- 7. the loop -------------------------------------------------------------------------
    val_tokens = sum(len(ids) - 1 for ids, _ in val_examples)
    evaluate = chat_validation(raw_model, val_examples, micro_tokens, device, amp_dtype)
    # The base model's validation loss: the figure fine-tuning has to beat (said once).
    base_val = resume_state.get("base_val_loss") if resume_state else evaluate()["val_loss"]
    if resume_state is None:
        log(f"base model: val loss {base_val:.4f}, ppl {math.exp(base_val):.2f} "
            "(assistant turns of the validation conversations)")
    loop = TrainLoop(
        cfg, model=model, compiled=compiled, raw_model=raw_model, optimizers=optimizers,
        batches=batches,
        evaluate=evaluate, eval_tokens=val_tokens, device=device, amp_dtype=amp_dtype,
        dist=dist_info,
        resume_state=resume_state,
        checkpoint_facts={
            "model_config": model_cfg.to_dict(), "train_config": cfg.to_dict(),
            "tokenizer_hash": tokenizer.hash,
            "optimizers": [type(o).__name__ for o in optimizers],
            "finetune": record, "base_val_loss": base_val,
        },
    )
    end_reason = loop.run()

    # ---- 8. summary --------------------------------------------------------------------------
    summary = summarize(loop, end_reason, log)
    if dist_info.is_main and cfg.sample_tokens and loop.step > loop.start_step and not cfg.fsdp:
        reply = sample_reply(raw_model, tokenizer, SAMPLE_MESSAGE, cfg.sample_tokens, device)
        log(f"sample: {SAMPLE_MESSAGE!r} -> {reply!r}")
    log(f"saved to {run_dir}")
    if loop.step < loop.max_steps and not end_reason.startswith("early stop"):
        log(f"continue: python finetune.py --run-dir {run_dir} --resume")
    log(f"chat with it: python chat.py --run {run_dir}")
    return {**summary, "base_run": base_run, "base_val_loss": base_val}


def _newest_pretraining_run() -> Path:
    runs = Path("runs")
    run = reader.newest_run(runs, where=lambda r: not reader.is_finetuned(r))
    if run is None:
        raise UserError(f"no pretrained run under {runs.resolve()} to fine-tune; "
                        f"{reader.TRAIN_HINT}, or give --from RUN_DIR")
    return run


def _resumed_stage(stage: FinetuneConfig, record: dict[str, Any],
                   given: Sequence[str]) -> FinetuneConfig:
    """The saved stage settings; a setting given again must not differ from them."""
    saved = FinetuneConfig(**record["settings"])
    for name, value in dataclasses.asdict(stage).items():
        if name in given and value != getattr(saved, name):
            raise UserError(f"--{name.replace('_', '-')} {value} differs from the run being "
                            f"resumed ({getattr(saved, name)}); start a new run instead")
    return saved


def _check_tokenizer(tokenizer: Any, model_cfg: GPTConfig, run: Path) -> None:
    """The tokenizer must fit the model and have the chat template's role tokens."""
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise UserError(f"{run / 'tokenizer.json'} has {tokenizer.vocab_size} tokens but the "
                        f"model only {model_cfg.vocab_size}: not the tokenizer it was trained with")
    missing = [t for t in ROLE_TOKENS.values() if t not in tokenizer.special_tokens]
    if missing:
        raise UserError(f"{run / 'tokenizer.json'} lacks the chat template's tokens "
                        f"{', '.join(missing)}: retrain the tokenizer with prepare_data.py")


def load_conversations(stage: FinetuneConfig, detokenize: bool
                       ) -> tuple[list[list[Turn]], list[list[Turn]], dict[str, Any]]:
    """``(training conversations, validation conversations, record of the data)``."""
    if stage.data:
        train = read_chat_jsonl(stage.data)
        info = sources.check_text_file(stage.data)
        record: dict[str, Any] = {"source": "jsonl", "path": str(stage.data), "sha256": info.sha256}
        if stage.val_data:
            val = read_chat_jsonl(stage.val_data)
            record["validation"] = {"path": str(stage.val_data),
                                    "sha256": sources.check_text_file(stage.val_data).sha256}
        else:
            if len(train) < 2:
                raise UserError(f"{stage.data}: one conversation cannot be split into training "
                                "and validation; add more or give --val-data")
            held = max(1, len(train) // VAL_SHARE)
            train, val = train[:-held], train[-held:]
            record["validation"] = {"path": str(stage.data), "last_conversations": held}
        record["conversations"] = len(train)
        return train, val, record
    if stage.data_dir:
        path = sources.find_dailydialog_file(stage.data_dir, "train")
        record = {"source": "dailydialog", "path": str(path),
                  "sha256": sources.check_text_file(path).sha256}
        dialogues = sources.read_dailydialog(stage.data_dir, "train")
        val_dialogues = sources.read_dailydialog(stage.data_dir, "validation")
    else:
        record = {"source": "dailydialog", "path": None, "origin": sources.HUB_DAILYDIALOG}
        dialogues = sources.load_hub_dailydialog("train")
        val_dialogues = sources.load_hub_dailydialog("validation")
    # Validation: the first dialogues, the second speaker as the assistant (as evaluate.py).
    val = dailydialog_conversations(val_dialogues[: stage.eval_dialogues], detokenize=detokenize)
    train = dailydialog_conversations(dialogues, detokenize=detokenize, speakers=stage.speakers)
    record.update(conversations=len(train), speakers=stage.speakers, detokenized=detokenize,
                  validation={"split": "validation", "first_dialogues": len(val)})
    return train, val, record


def recorded_dailydialog_dir(meta: dict[str, Any]) -> str | None:
    """The local DailyDialog release the base run's data was prepared from (its data meta.json
    records the files), if it is still there; None: the Hub, as prepare_data.py."""
    dailydialog = meta.get("sources", {}).get("dailydialog", {})
    if not isinstance(dailydialog, dict) or dailydialog.get("origin") != "local":
        return None
    train_files = dailydialog.get("inputs", {}).get("train") or [{}]
    path = Path(str(train_files[0].get("path", "")))  # <dir>/train/dialogues_train.txt
    return str(path.parent.parent) if path.is_file() else None


def sample_reply(model: torch.nn.Module, tokenizer: Any, message: str, max_tokens: int,
                 device: torch.device) -> str:
    """The model's reply to one user message (chat sampling defaults, a fixed seed). Uses its
    own generator: the training RNG streams are not touched."""
    ids, _ = encode_chat(tokenizer, [Turn("user", message)], add_generation_prompt=True, end=False)
    settings = dataclasses.replace(CHAT_DEFAULTS, max_new_tokens=max_tokens)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            (completion,) = generate(model, tokenizer, ids, settings,
                                     stop_ids=reply_stop_ids(tokenizer.special_tokens),
                                     generator=make_generator(0, device))
    finally:
        model.train(was_training)
    return completion.text
