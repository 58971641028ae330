"""The README.md model card of an exported model: what it is, what it was trained on, how it
scored during training, the licences of its data, and how to load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from src.model.gpt import GPT

# What each known source is, and its licence (the training data's terms bind the model).
DATA_LICENCES = {
    "wikitext": ("WikiText (Merity et al., 2016): Wikipedia Good and Featured articles",
                 "CC BY-SA 3.0", "cc-by-sa-3.0"),
    "dailydialog": ("DailyDialog (Li et al., 2017): everyday two-person dialogues",
                    "CC BY-NC-SA 4.0, non-commercial use only", "cc-by-nc-sa-4.0"),
}


def trained_sources(data_meta: dict[str, Any] | None) -> list[str]:
    """The sources the training split drew from (weight > 0 in the mix), in the meta's order."""
    if not data_meta:
        return []
    sources = data_meta.get("sources") or []
    names = list(sources) if isinstance(sources, (dict, list)) else []
    mix = data_meta.get("mix") or {}
    return [n for n in names if mix.get(n, 1.0) > 0]


def last_evaluation(run_dir: Path, step: int) -> dict[str, Any] | None:
    """The newest evaluation line of ``metrics.jsonl`` at or before ``step`` (val_loss, val_ppl,
    val_bpb), or None."""
    path = run_dir / "metrics.jsonl"
    found = None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(rec, dict) and "val_loss" in rec and rec.get("step", step + 1) <= step:
            found = rec
    return found


def model_card(model: GPT, info: dict[str, Any], files: list[str], gguf_name: str | None) -> str:
    """The card's Markdown, from ``load_model``'s ``info`` (run, step, losses, data meta)."""
    c = model.config
    sources = trained_sources(info.get("data_meta"))
    licences = [DATA_LICENCES[s] for s in sources if s in DATA_LICENCES]
    # The most restrictive licence of the data applies to the whole model.
    tag = "cc-by-nc-sa-4.0" if "dailydialog" in sources else (licences[0][2] if licences else "other")
    run_dir = Path(info["run_dir"])
    step = info["step"]
    lines = [
        "---",
        f"license: {tag}",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [llama, gpt-model]",
        "---",
        "",
        f"# {run_dir.name}",
        "",
        f"A {model.num_params() / 1e6:.2f}M-parameter Llama-architecture language model trained "
        "from scratch with the gpt-model project (its own byte-level BPE tokenizer and chat "
        "template), exported from run `" + run_dir.name + f"`, checkpoint "
        f"`{Path(info['checkpoint']).name}` (step {step:,}).",
        "",
        "## Model",
        "",
        f"- {c.n_layer} layers, width {c.d_model}, {c.n_head} heads ({c.n_kv_head} key/value "
        f"heads), MLP {c.d_ff}, context {c.context_length} tokens, vocabulary {c.vocab_size}, "
        f"{'tied' if c.tie_embeddings else 'separate'} input/output embeddings, RoPE base "
        f"{c.rope_base:g}.",
        "- Chat format: `<|endoftext|><|user|>message<|assistant|>reply<|user|>...`; a reply "
        "ends at any special token (`generation_config.json` lists them). The tokenizer adds "
        "no BOS: a plain-text prompt should start with `<|endoftext|>`, as in training.",
        "",
        "## Training data",
        "",
    ]
    meta = info.get("data_meta") or {}
    if sources:
        splits = meta.get("splits") or {}
        train_tokens = (splits.get("train") or {}).get("tokens") if isinstance(splits, dict) else None
        mix = meta.get("mix") or {}
        lines.append(f"Sources (training weights): {', '.join(f'{s} ({mix.get(s, 1.0):g})' for s in sources)}"
                     + (f"; {train_tokens:,} training tokens per epoch." if train_tokens else "."))
    else:
        lines.append("Not recorded in the run (no data_meta.json).")
    lines += ["", "## Evaluation (during training)", ""]
    evaluation = last_evaluation(run_dir, step)
    if evaluation is not None:
        shown = ", ".join(f"{k} {evaluation[k]:.4g}" for k in ("val_loss", "val_ppl", "val_bpb")
                          if isinstance(evaluation.get(k), (int, float)))
        lines.append(f"At step {evaluation['step']:,}: {shown} (the run's validation slice).")
    elif info.get("val_loss") is not None:
        lines.append(f"Validation loss {info['val_loss']:.4g} at step {step:,}.")
    else:
        lines.append("No evaluation was recorded.")
    lines.append("`python evaluate.py --run RUN` in the gpt-model project gives WikiText word-level "
                 "and DailyDialog perplexities.")
    lines += ["", "## Licence of the data", ""]
    if licences:
        lines += [f"- {what}: {licence}." for what, licence, _ in licences]
        if "dailydialog" in sources:
            lines.append("- A model trained on DailyDialog inherits its non-commercial restriction.")
    else:
        lines.append("- The training data's licence is not recorded; check your own data's terms.")
    lines += [
        "",
        "## Use",
        "",
        "With PATH this folder:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        'tok = AutoTokenizer.from_pretrained("PATH")',
        'ids = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], '
        'add_generation_prompt=True, return_tensors="pt")',
        "reply = model.generate(**ids)[0, ids[\"input_ids\"].shape[1]:]",
        "print(tok.decode(reply, skip_special_tokens=True))",
        "```",
    ]
    if gguf_name:
        lines += ["", f"`{gguf_name}` holds the same model for llama.cpp-style runtimes (GGUF)."]
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in files) + ".", ""]
    return "\n".join(lines)
