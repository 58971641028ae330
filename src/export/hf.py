"""A trained model as a Hugging Face ``transformers`` folder, and such a folder back as a run.

The folder (loads with ``AutoModelForCausalLM`` / ``AutoTokenizer``, no ``trust_remote_code``)::

    config.json              LlamaConfig of the model's shape
    model.safetensors        the weights under Llama's names (a tied head stored once, as HF does)
    generation_config.json   a reply's stop ids, the chat sampling defaults, reserved ids suppressed
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   (src/tokenizer/formats.py)
    README.md                model card (src/export/model_card.py)
    gpt_model_run.json       where it came from (run, step, data meta), so --from-hf restores it

Back (``--from-hf``): any Llama folder the model can hold, whose tokenizer is ours or another
byte-level BPE (renumbered into our layout, see :func:`read_hf_folder`).

Weight names are the model room's (src/model/hf_llama.py), tokenizer files the tokenizer
room's; this module only puts them together.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from src.checkpoint import save_model_checkpoint, save_tensors
from src.infer.sampling import CHAT_DEFAULTS, undecodable_ids
from src.model.gpt import GPT
from src.model.hf_llama import (
    check_llama_representable,
    from_hf_config,
    from_hf_state_dict,
    to_hf_config,
    to_hf_state_dict,
)
from src.tokenizer.bpe import BPETokenizer, TokenizerFileError
from src.tokenizer.chat_template import reply_stop_ids
from src.tokenizer.formats import from_hf_tokenizer_json, renumbered_hf_tokenizer, save_hf_folder
from src.utils.atomic import write_json_atomic
from src.utils.cli import UserError

PROVENANCE_FILE = "gpt_model_run.json"
WEIGHTS_FILE = "model.safetensors"


def generation_config(tok: BPETokenizer, vocab_size: int) -> dict[str, Any]:
    """``generation_config.json``: a reply ends at any special token (our ``reply_stop_ids``),
    sampling as ``chat.py`` does (CHAT_DEFAULTS), and ids that are no token (the reserved
    special range) are never drawn, as in our sampler."""
    eot = tok.eot_id
    return {
        "bos_token_id": eot,
        "eos_token_id": reply_stop_ids(tok.special_tokens),
        "pad_token_id": eot,
        "do_sample": not CHAT_DEFAULTS.is_greedy,
        "temperature": CHAT_DEFAULTS.temperature,
        "top_p": CHAT_DEFAULTS.top_p,
        "top_k": CHAT_DEFAULTS.top_k or 0,  # transformers' default would be 50
        "repetition_penalty": CHAT_DEFAULTS.repetition_penalty,
        "max_new_tokens": CHAT_DEFAULTS.max_new_tokens,
        "suppress_tokens": undecodable_ids(tok, vocab_size),
    }


def write_hf_folder(model: GPT, tok: BPETokenizer, folder: Path, dtype: torch.dtype,
                    provenance: dict[str, Any]) -> list[str]:
    """Write the files of a transformers model folder into ``folder`` (an empty folder the
    caller renames into place). Returns the names written. UserError for a model shape
    Llama cannot hold."""
    config = model.config
    try:
        check_llama_representable(config)
    except ValueError as exc:
        raise UserError(f"cannot export this model as Llama: {exc}") from None
    hf_config = to_hf_config(config)
    hf_config.architectures = ["LlamaForCausalLM"]
    hf_config.bos_token_id = hf_config.pad_token_id = hf_config.eos_token_id = tok.eot_id
    hf_config.dtype = dtype
    hf_config.save_pretrained(folder)

    weights = to_hf_state_dict(model)
    if config.tie_embeddings:  # transformers ties lm_head to the embedding on loading
        del weights["lm_head.weight"]
    save_tensors(folder / WEIGHTS_FILE, {k: v.to(dtype) for k, v in weights.items()},
                 {"format": "pt"})
    write_json_atomic(folder / "generation_config.json", generation_config(tok, config.vocab_size))
    files = ["config.json", WEIGHTS_FILE, "generation_config.json"]
    files += save_hf_folder(tok, folder, config.context_length)
    write_json_atomic(folder / PROVENANCE_FILE, provenance)
    return files + [PROVENANCE_FILE]


# ----------------------------------------------------------------------------------------------
# Back: a transformers Llama folder -> a run


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} not found (is {path.parent} a Hugging Face model folder?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's safetensors file(s) (one file, or shards with an index)."""
    index = folder / f"{WEIGHTS_FILE}.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
    elif (folder / WEIGHTS_FILE).is_file():
        shards = [WEIGHTS_FILE]
    else:
        raise UserError(f"{folder} has no {WEIGHTS_FILE} (only safetensors weights are read, "
                        "never pickled .bin files)")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            tensors.update(load_file(str(folder / shard)))
        except Exception as exc:  # safetensors raises several types on a damaged file
            raise UserError(f"cannot read {folder / shard}: {exc}") from None
    return tensors


def _reorder_rows(weight: torch.Tensor, source_ids: list[int | None]) -> torch.Tensor:
    """Row ``i`` of the result is row ``source_ids[i]`` of ``weight``; a new row (None) is the
    mean of all rows: an average token, until fine-tuning teaches it."""
    mean = weight.float().mean(dim=0).to(weight.dtype)
    return torch.stack([weight[i] if i is not None else mean for i in source_ids])


def read_hf_folder(folder: Path) -> tuple[GPT, BPETokenizer, dict[str, Any], list[str]]:
    """A transformers Llama folder -> (GPT in fp32, BPETokenizer, provenance or {}, notes).

    A tokenizer of our layout keeps its ids (an export of ours converts back bit for bit).
    Another model's byte-level BPE is renumbered into our layout, with our special tokens:
    the embedding and output rows are reordered to match, rows for tokens it lacks start as
    the mean row, and its other added tokens are dropped (said in the notes).
    UserError, naming the file, for another architecture, a shape the model cannot represent,
    a tokenizer that cannot be expressed in our format, or missing/damaged weights."""
    from transformers import LlamaConfig

    raw = _read_json(folder / "config.json")
    archs = raw.get("architectures") or []
    if raw.get("model_type") != "llama" or any(a != "LlamaForCausalLM" for a in archs):
        found = ", ".join(archs) or raw.get("model_type") or "unknown"
        raise UserError(f"{folder / 'config.json'}: architecture {found} is not Llama "
                        "(LlamaForCausalLM); only Llama checkpoints can be converted")
    try:
        config = from_hf_config(LlamaConfig.from_dict(raw))
    except (ValueError, TypeError) as exc:
        raise UserError(f"{folder / 'config.json'}: unsupported model shape: {exc}") from None
    tok_path = folder / "tokenizer.json"
    tok_data = _read_json(tok_path)
    notes: list[str] = []
    source_ids = None
    try:
        tok = from_hf_tokenizer_json(tok_data, str(tok_path))
    except TokenizerFileError:
        eos = raw.get("eos_token_id")
        tok, source_ids = renumbered_hf_tokenizer(
            tok_data, eos[0] if isinstance(eos, list) else eos, str(tok_path))
        new = [s for s, i in tok.special_tokens.items() if source_ids[i] is None]
        notes.append(f"{tok_path} renumbered into this project's layout; its model lacks "
                     f"{', '.join(new) or 'none'} of our special tokens (they start as the mean "
                     "embedding: fine-tune before chatting)")
    known = [i for i in (source_ids or []) if i is not None]
    if max(known, default=-1) >= config.vocab_size or (
            source_ids is None and config.vocab_size < len(tok.vocab) + len(tok.special_tokens)):
        raise UserError(f"{folder / 'config.json'}: vocab_size {config.vocab_size} is smaller "
                        f"than the tokenizer in {tok_path}")
    hf_sd = _read_hf_weights(folder)
    if source_ids is not None:
        config = replace(config, vocab_size=tok.vocab_size)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in hf_sd:
                hf_sd[name] = _reorder_rows(hf_sd[name], source_ids)
    model = GPT(config)
    try:
        state = from_hf_state_dict(hf_sd, config)
        model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    except (KeyError, RuntimeError) as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"{folder}: the weights do not match config.json: {first}") from None
    provenance = {}
    if (folder / PROVENANCE_FILE).is_file():
        provenance = _read_json(folder / PROVENANCE_FILE)
        if provenance.get("tokenizer_hash") != tok.hash:
            provenance = {}  # describes another tokenizer: the folder was edited since
    return model.eval(), tok, provenance, notes


def write_run(folder: Path, model: GPT, tok: BPETokenizer, provenance: dict[str, Any],
              source: str) -> Path:
    """Write ``model`` as a run into ``folder`` (an empty folder the caller renames into
    place): tokenizer.json, data_meta.json when known, and one weights-only checkpoint that
    is both latest and best. Returns the checkpoint folder."""
    tok.save(folder / "tokenizer.json")
    if provenance.get("data_meta") is not None:
        write_json_atomic(folder / "data_meta.json", provenance["data_meta"])
    state = {
        "model_config": model.config.to_dict(),
        "tokenizer_hash": tok.hash,
        "val_loss": provenance.get("val_loss"),
        "best_val_loss": provenance.get("best_val_loss"),
        "train_config": provenance.get("train_config"),
        "imported_from": source,
    }
    return save_model_checkpoint(folder, int(provenance.get("step") or 0), model.state_dict(),
                                 state, is_best=True)
