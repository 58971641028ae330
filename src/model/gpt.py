"""A GPT language model in one file: a decoder-only Transformer in the Llama style.

Read top to bottom:
  1. GPTConfig  - every hyperparameter, validated (named presets: src/training/presets.py).
  2. RoPE       - rotary position embeddings (precomputed cos/sin tables).
  3. KVCache    - preallocated keys/values, so generating a token does not recompute the past;
     SlotKVCache - the same for many independent sequences of different lengths (serving).
  4. Attention, MLP, Block - the Transformer layer: pre-norm RMSNorm, causal grouped-query
                  attention through scaled_dot_product_attention, SwiGLU feed-forward;
                  record_attention - the opt-in explicit path that keeps attention weights.
  5. GPT        - embeddings, the stack of blocks, the output head, the one init function,
                  the loss, parameter and FLOP counts.

The default architecture maps one-to-one onto Hugging Face's LlamaForCausalLM (see
src/model/hf_llama.py): RMSNorm before each sub-layer, RoPE in the "rotate_half" layout, no
biases, SiLU-gated MLP, and the same matrices (converting is only renaming). q/k/v and gate/up
are deliberately separate Linears: fusing them measured no faster on CPU (the backward pass
then pays for concatenating gradients), and separate names read more clearly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# 1. Configuration

# The MLP's gate activations, by the names transformers' ACT2FN gives them. ReLU squared
# (So et al. 2021, "Primer") is sparse and cheap and helps small models in some reports.
MLP_ACTIVATIONS = {
    "silu": F.silu,
    "relu2": lambda x: F.relu(x).square(),
}


@dataclass
class GPTConfig:
    """Every hyperparameter of the model. Validated on construction (ValueError naming the field).

    ``n_kv_head`` < ``n_head`` gives grouped-query attention (each key/value head is shared by
    ``n_head // n_kv_head`` query heads); ``None`` means ``n_head`` (ordinary multi-head).
    ``d_ff`` is the hidden width of the SwiGLU MLP; ``None`` means the Llama rule: 8/3 of
    ``d_model`` rounded up to a multiple of 64 (SwiGLU has three matrices instead of two, so
    8/3 keeps the parameter count of a classic 4x MLP).
    """

    vocab_size: int = 16384  # our tokenizer's total, including the reserved special tokens
    context_length: int = 1024  # longest sequence the model sees (RoPE tables are this long)
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    d_model: int = 768
    d_ff: int | None = None
    dropout: float = 0.0  # on embeddings, attention probabilities and residual branches
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    tie_embeddings: bool = True  # the output head reuses the token embedding matrix
    mlp_act: str = "silu"  # the MLP's gate: "silu" (SwiGLU, Llama's) or "relu2" (ReLU squared)
    qk_norm: bool = False  # RMSNorm on each query/key head before RoPE (not in Llama: no export)

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_ff is None:
            self.d_ff = 64 * math.ceil(8 * self.d_model / 3 / 64)
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_kv_head",
                     "d_model", "d_ff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head != 0:
            raise ValueError(f"GPTConfig.d_model={self.d_model} must be divisible by "
                             f"n_head={self.n_head}")
        if (self.d_model // self.n_head) % 2 != 0:
            raise ValueError(f"GPTConfig: head dim d_model/n_head={self.d_model // self.n_head} "
                             f"must be even for rotary embeddings")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"GPTConfig.n_head={self.n_head} must be divisible by "
                             f"n_kv_head={self.n_kv_head}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("norm_eps", "rope_base"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive number, got {value!r}")
        for name in ("tie_embeddings", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.mlp_act not in MLP_ACTIVATIONS:
            raise ValueError(f"GPTConfig.mlp_act must be one of {sorted(MLP_ACTIVATIONS)}, got "
                             f"{self.mlp_act!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        """A JSON-ready dict (the resolved values, so it round-trips exactly)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a typo must not be ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# 2. Rotary position embeddings (RoPE)
#
# Each query/key head vector is split into pairs of channels and each pair is rotated by an
# angle proportional to the token's position, with a different frequency per pair. The dot
# product of a rotated query and key then depends only on their distance. We use the
# "rotate_half" layout (pairs are channel i and channel i + head_dim/2), as in Llama.


def rope_tables(head_dim: int, length: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, channel) angle, each of shape (length, head_dim)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # channel i and i + head_dim/2 share a frequency
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, head_dim) by the angles in cos/sin (T, head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated_half * sin


# ----------------------------------------------------------------------------------------------
# 3. The key/value cache


class KVCache:
    """Keys and values of every layer for the tokens seen so far, for fast generation.

    Memory is allocated once: (n_layer, batch, n_kv_head, max_length, head_dim) for keys and
    the same for values. Each forward pass with ``cache=`` writes its keys/values at
    ``position`` and advances it, so a prompt can be fed at once (prefill) and then one
    token at a time. All sequences of the batch share one position (prompts of equal length).
    Make one with ``GPT.new_kv_cache``.
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_length: int,
                 head_dim: int, device: torch.device | str | None, dtype: torch.dtype) -> None:
        shape = (n_layer, batch_size, n_kv_head, max_length, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.batch_size = batch_size
        self.max_length = max_length
        self.position = 0  # number of tokens already stored

    def reset(self) -> None:
        """Forget all tokens (the memory is kept and overwritten)."""
        self.position = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store k, v (B, n_kv_head, T, head_dim) at the current position; return all keys and
        values up to and including them. ``position`` itself is advanced by the model."""
        end = self.position + k.size(2)
        self.k[layer, :, :, self.position:end] = k
        self.v[layer, :, :, self.position:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class SlotKVCache:
    """Keys and values of ``num_slots`` independent sequences of different lengths, for
    serving many requests with one batched forward pass (continuous batching).

    Slot ``s`` holds ``lengths[s]`` tokens. A forward pass with ``cache=`` and ``slots=`` (a
    (B,) long tensor of distinct slot indices) appends row b's T tokens to slot ``slots[b]``
    at positions ``lengths[slots[b]]`` onward; each row attends only to its own slot's
    tokens (an attention mask hides the rest, including stale keys past its length). A slot
    is emptied for a new sequence with ``free``. Make one with ``GPT.new_slot_kv_cache``.
    """

    def __init__(self, n_layer: int, num_slots: int, n_kv_head: int, max_length: int,
                 head_dim: int, device: torch.device | str | None, dtype: torch.dtype) -> None:
        shape = (n_layer, num_slots, n_kv_head, max_length, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.num_slots = num_slots
        self.max_length = max_length
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device=device)
        # Set by ``begin`` for the forward pass under way: which slots, the new tokens'
        # positions (B, T), and the mask (B, 1, T, keys) of what each new token may see.
        self.slots = self.positions = self.attn_mask = None

    def free(self, slot: int) -> None:
        """Forget the sequence in ``slot`` (its memory is overwritten by the next one)."""
        self.lengths[slot] = 0

    def begin(self, slots: torch.Tensor, T: int) -> torch.Tensor:
        """Prepare a forward pass of T new tokens per slot in ``slots``; their positions."""
        start = self.lengths[slots]
        if int(start.max()) + T > self.max_length:
            raise ValueError(f"slot KV cache full: a sequence would pass max_length "
                             f"{self.max_length}")
        self.slots = slots
        self.positions = start[:, None] + torch.arange(T, device=slots.device)
        keys = torch.arange(int(self.positions.max()) + 1, device=slots.device)
        self.attn_mask = (keys[None, None, :] <= self.positions[:, :, None])[:, None]
        return self.positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store k, v (B, n_kv_head, T, head_dim) of the slots being run; return each row's
        keys and values up to the longest row (B, n_kv_head, keys, head_dim)."""
        rows = self.slots[:, None]
        # Advanced indices split by a slice put their dims first: (B, T, n_kv_head, head_dim).
        self.k[layer, rows, :, self.positions] = k.transpose(1, 2).to(self.k.dtype)
        self.v[layer, rows, :, self.positions] = v.transpose(1, 2).to(self.v.dtype)
        n_keys = self.attn_mask.size(-1)
        return self.k[layer, self.slots, :, :n_keys], self.v[layer, self.slots, :, :n_keys]

    def end(self) -> None:
        """The forward pass is done: the slots' lengths advance by the tokens it stored."""
        self.lengths[self.slots] = self.positions[:, -1] + 1
        self.slots = self.positions = self.attn_mask = None


# ----------------------------------------------------------------------------------------------
# 4. The Transformer layer


class Attention(nn.Module):
    """Causal self-attention with rotary embeddings and grouped-query attention."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * self.head_dim, config.d_model, bias=False)
        # QK-norm: normalising each head's query and key bounds the attention logits, which
        # keeps softmax from saturating at high learning rates (Dehghani et al. 2023).
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps)
        self.qk_norm = config.qk_norm
        self.dropout = config.dropout
        # A list only inside ``record_attention``: then attention is computed explicitly and
        # its weights appended here. None otherwise, and the fused kernel runs.
        self.recorded: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                cache: KVCache | SlotKVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        # (B, T, heads * head_dim) -> (B, heads, T, head_dim): attention runs per head.
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # keep bf16 under autocast
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        mask, is_causal = None, True
        if isinstance(cache, SlotKVCache):
            k, v = cache.update(layer, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
            mask, is_causal = cache.attn_mask, False
        elif cache is not None:
            start = cache.position
            k, v = cache.update(layer, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)  # the cache may be stored in another dtype
            if start > 0:
                # New queries sit at positions start..start+T-1 and may see every key up to
                # their own position. (is_causal would align them to key 0, which is wrong.)
                if T == 1:
                    is_causal = False  # a single newest token sees everything: no mask
                else:
                    q_pos = torch.arange(start, start + T, device=x.device)
                    k_pos = torch.arange(start + T, device=x.device)
                    mask, is_causal = k_pos[None, :] <= q_pos[:, None], False
        if self.recorded is None:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_head != self.n_head)
        else:
            y = self.explicit_attention(q, k, v, mask, is_causal)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)

    def explicit_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        """What scaled_dot_product_attention computes, written out so that the weights can be
        kept: softmax(q k^T / sqrt(head_dim), masked) v. The weights, (B, n_head, queries,
        keys) with zeros where the mask hides a key, are appended to ``self.recorded``."""
        group = self.n_head // self.n_kv_head
        # Grouped-query attention: query head h reads key/value head h // group (as SDPA's
        # enable_gqa), so the weights are per query head.
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if is_causal:  # SDPA's is_causal: query i sees keys 0..i
            mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.float().softmax(dim=-1).to(q.dtype)
        self.recorded.append(weights)
        return F.dropout(weights, self.dropout, self.training) @ v


@contextmanager
def record_attention(model: GPT) -> Iterator[list[torch.Tensor]]:
    """Within this block, every forward pass of ``model`` computes attention explicitly (the
    same projections, rotary embedding, mask and softmax as the fused kernel, only slower)
    and appends each layer's weights, (B, n_head, queries, keys), to the list it yields, in
    layer order: after one forward pass, ``weights[layer]``. Outside it the model runs the
    fused kernel, untouched::

        with record_attention(model) as weights:
            logits = model(idx)
    """
    weights: list[torch.Tensor] = []
    layers = [block.attn for block in model.blocks]
    for attn in layers:
        attn.recorded = weights
    try:
        yield weights
    finally:
        for attn in layers:
            attn.recorded = None


class MLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)), SwiGLU with the default act = silu. The
    gate decides, per hidden unit, how much of up(x) passes; this works better than a plain
    ReLU/GELU MLP (Shazeer 2020)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = MLP_ACTIVATIONS[config.mlp_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One Transformer layer, pre-norm: x + attn(norm(x)), then x + mlp(norm(x)).

    Normalising the input of each branch (not the residual stream itself) keeps a clean
    identity path from the embeddings to the output, which makes deep stacks train stably.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                cache: KVCache | SlotKVCache | None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, layer, cache))
        x = x + self.dropout(self.mlp(self.mlp_norm(x)))
        return x


# ----------------------------------------------------------------------------------------------
# 5. The model


class GPT(nn.Module):
    """Token ids in, next-token logits out. See the module docstring for the architecture."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # Reading a token and predicting it use the same vector: saves vocab x d_model
            # parameters and tends to help small models.
            self.lm_head.weight = self.tok_emb.weight
        # Not parameters and not saved: recomputed from the config (persistent=False).
        cos, sin = rope_tables(config.head_dim, config.context_length, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The one initialisation scheme of the model.

        * every Linear and the embedding: normal(0, 0.02), as GPT-2;
        * the two projections that write into the residual stream (attention o_proj, MLP
          down_proj): normal(0, 0.02 / sqrt(2 * n_layer)), because 2 * n_layer branches are
          summed into the stream and their variance must not grow with depth (GPT-2 paper);
        * RMSNorm gains (QK-norm's too): 1.
        With this, logits of a fresh model are small, and its loss is close to ln(vocab_size).
        """
        std = 0.02
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.blocks:
            for proj in (block.attn.o_proj, block.mlp.down_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | SlotKVCache | None = None, slots: torch.Tensor | None = None):
        """idx (B, T) token ids -> logits (B, T, vocab_size); with targets (B, T) also the mean
        cross-entropy over positions whose target is not -1: returns (logits, loss).

        With a ``KVCache`` the tokens continue the sequences stored in it (RoPE positions start
        at ``cache.position``) and the cache advances by T. With a ``SlotKVCache``, row b
        continues the sequence in slot ``slots[b]`` from that slot's own length.
        """
        B, T = idx.shape
        if isinstance(cache, SlotKVCache):
            if slots is None or slots.shape != (B,):
                raise ValueError(f"a SlotKVCache needs slots=, one slot index per row ({B})")
            positions = cache.begin(slots, T)  # (B, T): each row's own positions
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        else:
            start = 0
            if cache is not None:
                start = cache.position
                if cache.batch_size != B:
                    raise ValueError(f"batch of {B} sequences but the KV cache holds "
                                     f"{cache.batch_size}")
                if start + T > cache.max_length:
                    raise ValueError(f"KV cache full: {start} + {T} tokens > max_length "
                                     f"{cache.max_length} (reset it or make a longer one)")
            elif self.config.context_length < T:
                raise ValueError(f"sequence of {T} tokens is longer than the context_length "
                                 f"{self.config.context_length}")
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]

        x = self.dropout(self.tok_emb(idx))
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, i, cache)
        logits = self.lm_head(self.norm(x))
        if isinstance(cache, SlotKVCache):
            cache.end()
        elif cache is not None:
            cache.position += T

        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1)
        return logits, loss

    def new_kv_cache(self, batch_size: int, max_length: int, device: torch.device | str | None
                     = None, dtype: torch.dtype | None = None) -> KVCache:
        """A cache for ``batch_size`` sequences of up to ``max_length`` tokens (at most the
        context length). device and dtype default to those of the model's weights."""
        if not 1 <= max_length <= self.config.context_length:
            raise ValueError(f"KV cache max_length={max_length} must be between 1 and the "
                             f"context_length {self.config.context_length}")
        if batch_size < 1:
            raise ValueError(f"KV cache batch_size must be positive, got {batch_size}")
        weight = self.tok_emb.weight
        c = self.config
        return KVCache(c.n_layer, batch_size, c.n_kv_head, max_length, c.head_dim,
                       device if device is not None else weight.device,
                       dtype if dtype is not None else weight.dtype)

    def new_slot_kv_cache(self, num_slots: int, max_length: int | None = None) -> SlotKVCache:
        """A slot cache for ``num_slots`` sequences of up to ``max_length`` tokens each (default
        and maximum: the context length), on the device and in the dtype of the weights."""
        max_length = max_length or self.config.context_length
        if not 1 <= max_length <= self.config.context_length or num_slots < 1:
            raise ValueError(f"slot KV cache: need num_slots >= 1 and 1 <= max_length <= "
                             f"{self.config.context_length}, got {num_slots}, {max_length}")
        weight = self.tok_emb.weight
        c = self.config
        return SlotKVCache(c.n_layer, num_slots, c.n_kv_head, max_length, c.head_dim,
                           weight.device, weight.dtype)

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters (a tied matrix counted once). ``non_embedding=True`` leaves out
        the token embedding and, if untied, the output head: the matrices whose size scales
        with the vocabulary (the "N" of scaling-law papers)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs (forward + backward) per token at full context, PaLM appendix B:

            6 * N_matmul + 12 * n_layer * d_model * context_length

        N_matmul counts the weights used in matrix multiplies: every Linear of the blocks
        plus the output head (counted even when tied; the embedding lookup and the norms do
        no matmul). Each such weight costs 2 FLOPs forward and 4 backward per token. The
        second term is attention's QK^T and AV products (2 * 2 * n_layer * d_model * T
        forward, times 3 for backward), without discounting the causal mask.
        MFU = flops_per_token * tokens_per_second / peak_flops_of_the_device.
        """
        c = self.config
        n_matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6.0 * n_matmul + 12.0 * c.n_layer * c.d_model * c.context_length
