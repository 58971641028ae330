"""Convert our GPT to and from Hugging Face ``transformers``' LlamaForCausalLM.

Our default architecture is Llama's, so conversion is only renaming (the tables below).
RoPE needs no permutation of the q/k weights: both use the rotate_half layout. ``transformers`` is imported
lazily, so the rest of the project does not need it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from src.model.gpt import GPT, MLP_ACTIVATIONS, GPTConfig

if TYPE_CHECKING:  # only for type hints; transformers is an optional dependency
    from transformers import LlamaConfig, LlamaForCausalLM


def to_hf_config(config: GPTConfig) -> LlamaConfig:
    """The LlamaConfig of the same shape as ``config``."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        head_dim=config.head_dim,
        max_position_embeddings=config.context_length,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_base,
        tie_word_embeddings=config.tie_embeddings,
        hidden_act=config.mlp_act,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=config.dropout,
    )


def from_hf_config(hf_config: LlamaConfig) -> GPTConfig:
    """The GPTConfig of the same shape as a LlamaConfig (plain default RoPE only). ValueError,
    naming the setting, for a Llama this model cannot represent."""
    rope = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported (only 'default')")
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        raise ValueError("Llama models with biases are not supported")
    if hf_config.hidden_act not in MLP_ACTIVATIONS:
        raise ValueError(f"hidden_act {hf_config.hidden_act!r} is not supported (only "
                         f"{', '.join(sorted(MLP_ACTIVATIONS))})")
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim is not None and head_dim * hf_config.num_attention_heads != hf_config.hidden_size:
        raise ValueError(f"head_dim {head_dim} x {hf_config.num_attention_heads} heads != "
                         f"hidden_size {hf_config.hidden_size}")
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return GPTConfig(  # GPTConfig validates the rest (even head_dim, heads divisible, ...)
        vocab_size=hf_config.vocab_size,
        context_length=hf_config.max_position_embeddings,
        n_layer=hf_config.num_hidden_layers,
        n_head=hf_config.num_attention_heads,
        n_kv_head=hf_config.num_key_value_heads or hf_config.num_attention_heads,
        d_model=hf_config.hidden_size,
        d_ff=hf_config.intermediate_size,
        norm_eps=float(hf_config.rms_norm_eps),
        rope_base=float(theta),
        tie_embeddings=bool(hf_config.tie_word_embeddings),
        mlp_act=hf_config.hidden_act,
    )


def check_llama_representable(config: GPTConfig) -> None:
    """ValueError unless a LlamaForCausalLM can hold a model of this shape exactly: the config
    must survive the trip through LlamaConfig (dropout, a training setting, aside). A field
    Llama has no counterpart for shows up here rather than as a silently different model."""
    back = from_hf_config(to_hf_config(config)).to_dict()
    differ = [k for k, v in replace(config, dropout=0.0).to_dict().items() if back.get(k) != v]
    if differ:
        raise ValueError(f"model setting(s) {differ} have no Llama equivalent")


# Our parameter names -> Llama's; "{i}" is the layer index.
_GLOBAL_NAMES = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}


def name_pairs(config: GPTConfig) -> list[tuple[str, str]]:
    """(our name, Llama's name) for every weight of a model of this config."""
    pairs = list(_GLOBAL_NAMES.items())
    for i in range(config.n_layer):
        pairs += [(f"blocks.{i}.{ours}", f"model.layers.{i}.{theirs}")
                  for ours, theirs in _LAYER_NAMES.items()]
    return pairs


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under Llama's names (the same tensors, not copies). When tied, lm_head is
    the embedding itself, as in Llama."""
    sd = model.state_dict()
    return {theirs: sd[ours] for ours, theirs in name_pairs(model.config)}


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Llama-named weights -> a state dict for ``GPT(config)``."""
    out = {ours: hf_sd[theirs] for ours, theirs in name_pairs(config)
           if theirs != "lm_head.weight"}
    # A tied Llama may or may not list lm_head.weight; either way it is the embedding.
    out["lm_head.weight"] = (out["tok_emb.weight"] if config.tie_embeddings
                             else hf_sd["lm_head.weight"])
    return out


def to_hf(model: GPT, attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """A LlamaForCausalLM with a copy of ``model``'s weights (same device and dtype)."""
    from transformers import LlamaForCausalLM

    weight = model.tok_emb.weight
    hf = LlamaForCausalLM(to_hf_config(model.config))
    hf.config._attn_implementation = attn_implementation
    hf.to(device=weight.device, dtype=weight.dtype)
    # strict: every Llama weight must be provided, and nothing else.
    hf.load_state_dict(to_hf_state_dict(model), strict=True)
    hf.train(model.training)
    return hf


def from_hf(hf_model: LlamaForCausalLM) -> GPT:
    """A GPT with a copy of a LlamaForCausalLM's weights (same device and dtype)."""
    config = from_hf_config(hf_model.config)
    weight = hf_model.model.embed_tokens.weight
    model = GPT(config).to(device=weight.device, dtype=weight.dtype)
    model.load_state_dict(from_hf_state_dict(hf_model.state_dict(), config), strict=True)
    model.train(hf_model.training)
    return model
