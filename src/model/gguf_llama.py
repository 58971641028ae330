"""Our GPT as llama.cpp's "llama" architecture: GGUF tensor names, layouts and hyper-parameters.

The GGUF side of src/model/hf_llama.py: weights are first renamed to Llama's (that module's
tables, the one home of the name mapping), then to llama.cpp's names (gguf-py's
``TENSOR_NAMES``), and the query/key projections are permuted.

Why the permutation: our RoPE, like Hugging Face's, rotates channel ``i`` with channel
``i + head_dim/2`` ("rotate_half"); llama.cpp's rotates adjacent channels ``2i`` and
``2i + 1`` (the original Llama layout). Reordering the output rows of q_proj and k_proj
within each head (first half and second half interleaved) makes llama.cpp's rotation act
on the same pairs, so the attention scores are unchanged. Readers of GGUF files (llama.cpp
itself, transformers' GGUF loader) expect exactly this, as llama.cpp's own converter writes it.

``gguf`` is imported lazily: the rest of the project does not need it.
"""

from __future__ import annotations

from typing import Any

import torch

from src.model.gpt import GPT, GPTConfig
from src.model.hf_llama import name_pairs

GGUF_ARCH = "llama"

# Llama's name (layer part, after "model.layers.{i}.") -> gguf-py's MODEL_TENSOR member name.
_LAYER_TENSORS = {
    "input_layernorm.weight": "ATTN_NORM",
    "self_attn.q_proj.weight": "ATTN_Q",
    "self_attn.k_proj.weight": "ATTN_K",
    "self_attn.v_proj.weight": "ATTN_V",
    "self_attn.o_proj.weight": "ATTN_OUT",
    "post_attention_layernorm.weight": "FFN_NORM",
    "mlp.gate_proj.weight": "FFN_GATE",
    "mlp.up_proj.weight": "FFN_UP",
    "mlp.down_proj.weight": "FFN_DOWN",
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "TOKEN_EMBD",
    "model.norm.weight": "OUTPUT_NORM",
    "lm_head.weight": "OUTPUT",
}


def rope_interleave(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q/k projection from the rotate_half layout (pairs
    ``i, i + d/2`` per head) to the interleaved one (pairs ``2i, 2i + 1``). ``weight`` is
    (n_heads * head_dim, d_model); returns a new tensor of the same shape."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    # (heads, 2 halves, d/2, cols) -> (heads, d/2, 2, cols): row j of half h goes to 2j + h.
    return (weight.reshape(n_heads, 2, head_dim // 2, cols).transpose(1, 2)
            .reshape(rows, cols).contiguous())


def _gguf_name(llama_name: str) -> str:
    import gguf

    if llama_name in _GLOBAL_TENSORS:
        base = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[_GLOBAL_TENSORS[llama_name]]]
    else:
        _, _, layer, rest = llama_name.split(".", 3)  # model.layers.{i}.{rest}
        base = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[_LAYER_TENSORS[rest]]].format(bid=int(layer))
    return base + ".weight"  # e.g. blk.0.attn_q.weight, as llama.cpp names them


def check_gguf_representable(config: GPTConfig) -> None:
    """ValueError, naming the setting, unless llama.cpp's ``llama`` architecture computes
    exactly this model: its MLP gate is always SiLU and it has no QK-norm."""
    if config.mlp_act != "silu":
        raise ValueError(f"mlp_act {config.mlp_act!r} has no GGUF llama form (llama.cpp's llama "
                         "uses SiLU); export --format hf instead")
    if config.qk_norm:
        raise ValueError("qk_norm has no GGUF llama form (llama.cpp's llama has no QK-norm)")


def to_gguf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """Every weight of ``model`` under llama.cpp's name, in llama.cpp's layout (q/k rows
    permuted, see the module docstring), in file order. A tied output head is left out:
    llama.cpp then uses the token embedding for it, as transformers' GGUF loader does.
    ValueError for a model llama.cpp's llama cannot compute (:func:`check_gguf_representable`)."""
    config = model.config
    check_gguf_representable(config)
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in name_pairs(config):
        if theirs == "lm_head.weight" and config.tie_embeddings:
            continue
        weight = sd[ours].detach()
        if theirs.endswith("q_proj.weight"):
            weight = rope_interleave(weight, config.n_head)
        elif theirs.endswith("k_proj.weight"):
            weight = rope_interleave(weight, config.n_kv_head)
        out[_gguf_name(theirs)] = weight
    return out


def gguf_hyperparameters(config: GPTConfig) -> dict[str, Any]:
    """The ``llama.*`` metadata of a model of this shape, as ``{GGUFWriter method: value}``
    (e.g. ``{"add_block_count": 8}``): the keys llama.cpp and transformers read."""
    return {
        "add_context_length": config.context_length,
        "add_embedding_length": config.d_model,
        "add_block_count": config.n_layer,
        "add_feed_forward_length": config.d_ff,
        "add_head_count": config.n_head,
        "add_head_count_kv": config.n_kv_head,
        "add_rope_dimension_count": config.head_dim,
        "add_rope_freq_base": float(config.rope_base),
        "add_layer_norm_rms_eps": float(config.norm_eps),
        "add_vocab_size": config.vocab_size,
    }
