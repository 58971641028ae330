"""Convert our GPT to and from Hugging Face ``transformers``' LlamaForCausalLM.

Our default architecture is Llama's, so conversion is only renaming and splitting:
  tok_emb                      <-> model.embed_tokens
  blocks.i.attn_norm           <-> model.layers.i.input_layernorm
  blocks.i.attn.qkv (fused)    <-> model.layers.i.self_attn.{q,k,v}_proj (rows, in that order)
  blocks.i.attn.o_proj         <-> model.layers.i.self_attn.o_proj
  blocks.i.mlp_norm            <-> model.layers.i.post_attention_layernorm
  blocks.i.mlp.gate_up (fused) <-> model.layers.i.mlp.{gate,up}_proj (rows, in that order)
  blocks.i.mlp.down_proj       <-> model.layers.i.mlp.down_proj
  norm, lm_head                <-> model.norm, lm_head
RoPE needs no permutation: both use the rotate_half layout. ``transformers`` is imported
lazily, so the rest of the project does not need it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from src.model.gpt import GPT, GPTConfig

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
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=config.dropout,
    )


def from_hf_config(hf_config: LlamaConfig) -> GPTConfig:
    """The GPTConfig of the same shape as a LlamaConfig (plain default RoPE only)."""
    rope = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported (only 'default')")
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        raise ValueError("Llama models with biases are not supported")
    if hf_config.hidden_act != "silu":
        raise ValueError(f"hidden_act {hf_config.hidden_act!r} is not supported (only 'silu')")
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim is not None and head_dim * hf_config.num_attention_heads != hf_config.hidden_size:
        raise ValueError(f"head_dim {head_dim} x {hf_config.num_attention_heads} heads != "
                         f"hidden_size {hf_config.hidden_size}")
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return GPTConfig(
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
    )


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under Llama's names (tensors are views/copies; ours are not modified)."""
    c = model.config
    sd = model.state_dict()
    q_rows, kv_rows = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(c.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = sd[ours + "attn.qkv.weight"].split([q_rows, kv_rows, kv_rows], dim=0)
        gate, up = sd[ours + "mlp.gate_up.weight"].chunk(2, dim=0)
        out.update({
            theirs + "input_layernorm.weight": sd[ours + "attn_norm.weight"],
            theirs + "self_attn.q_proj.weight": q,
            theirs + "self_attn.k_proj.weight": k,
            theirs + "self_attn.v_proj.weight": v,
            theirs + "self_attn.o_proj.weight": sd[ours + "attn.o_proj.weight"],
            theirs + "post_attention_layernorm.weight": sd[ours + "mlp_norm.weight"],
            theirs + "mlp.gate_proj.weight": gate,
            theirs + "mlp.up_proj.weight": up,
            theirs + "mlp.down_proj.weight": sd[ours + "mlp.down_proj.weight"],
        })
    out["lm_head.weight"] = sd["lm_head.weight"]  # the embedding itself when tied
    return out


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Llama-named weights -> a state dict for ``GPT(config)``."""
    out = {"tok_emb.weight": hf_sd["model.embed_tokens.weight"],
           "norm.weight": hf_sd["model.norm.weight"]}
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        out.update({
            ours + "attn_norm.weight": hf_sd[theirs + "input_layernorm.weight"],
            ours + "attn.qkv.weight": torch.cat([hf_sd[theirs + f"self_attn.{n}_proj.weight"]
                                                 for n in ("q", "k", "v")], dim=0),
            ours + "attn.o_proj.weight": hf_sd[theirs + "self_attn.o_proj.weight"],
            ours + "mlp_norm.weight": hf_sd[theirs + "post_attention_layernorm.weight"],
            ours + "mlp.gate_up.weight": torch.cat([hf_sd[theirs + "mlp.gate_proj.weight"],
                                                    hf_sd[theirs + "mlp.up_proj.weight"]], dim=0),
            ours + "mlp.down_proj.weight": hf_sd[theirs + "mlp.down_proj.weight"],
        })
    if config.tie_embeddings:
        out["lm_head.weight"] = out["tok_emb.weight"]
    else:
        out["lm_head.weight"] = hf_sd["lm_head.weight"]
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
