"""Tests of src/model/gpt.py: the GPT model, its config, presets and KV cache."""

from __future__ import annotations

import json
import math

import pytest
import torch

from src.model.gpt import GPT, GPTConfig, KVCache
from src.training.presets import PRESETS, model_config

VOCAB = 97  # small and odd, so shape mix-ups show


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(model_config("tiny", vocab_size=VOCAB, **overrides)).eval()


def random_ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T), generator=g)


# --- config ------------------------------------------------------------------------------------


def test_config_roundtrips_through_json():
    cfg = model_config("gpt-60m", vocab_size=1000, dropout=0.1)
    again = GPTConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.vocab_size == 1000 and again.dropout == 0.1 and again.n_kv_head == 4


def test_config_resolves_defaults():
    cfg = GPTConfig(n_layer=2, n_head=4, d_model=96)
    assert cfg.n_kv_head == 4  # None means ordinary multi-head attention
    assert cfg.d_ff == 256  # 8/3 * 96 = 256, already a multiple of 64
    assert GPTConfig(d_model=104, n_head=4).d_ff == 320  # 277.3 rounded up to a multiple of 64


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(d_model=50, n_head=4), "d_model=50"),
        (dict(n_head=4, n_kv_head=3, d_model=48), "n_kv_head=3"),
        (dict(n_head=8, d_model=24), "must be even"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(n_layer=-1), "n_layer"),
        (dict(context_length=2.5), "context_length"),
        (dict(dropout=1.0), "dropout"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(rope_base=-1.0), "rope_base"),
        (dict(tie_embeddings="yes"), "tie_embeddings"),
        (dict(qk_norm=1), "qk_norm"),
        (dict(mlp_act="gelu"), "mlp_act"),
    ],
)
def test_config_validation_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        model_config("tiny", **overrides)


def test_config_rejects_unknown_fields_and_presets():
    with pytest.raises(ValueError, match="n_layers"):
        GPTConfig.from_dict({"n_layers": 3})
    with pytest.raises(ValueError, match="huge"):
        model_config("huge")


# --- presets and counts ------------------------------------------------------------------------

# Exact counts with the default vocabulary of 16384 (all presets tie the embeddings).
EXPECTED_PARAMS = {
    "tiny": 837_360,
    "small": 4_916_928,
    "gpt-60m": 62_927_616,
    "gpt-125m": 97_536_768,
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts(name):
    cfg = model_config(name)
    assert cfg.vocab_size == 16384
    with torch.device("meta"):  # no memory, no init time
        model = GPT(cfg)
    n = model.num_params()
    assert n == EXPECTED_PARAMS[name]
    # Hand count: embedding + per layer (q, k, v, o, gate, up, down, 2 norms) + final norm.
    c = cfg
    per_layer = (c.d_model * (c.n_head + 2 * c.n_kv_head) * c.head_dim + c.d_model * c.d_model
                 + 3 * c.d_model * c.d_ff + 2 * c.d_model)
    assert n == c.vocab_size * c.d_model + c.n_layer * per_layer + c.d_model
    assert model.num_params(non_embedding=True) == n - c.vocab_size * c.d_model
    if name == "tiny":
        assert n < 1_000_000
    if name == "gpt-60m":
        assert 55e6 <= n <= 65e6 and cfg.context_length >= 512


def test_untied_model_counts_the_head():
    tied, untied = tiny_model(), tiny_model(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.num_params() == tied.num_params() + VOCAB * 48
    assert untied.num_params(non_embedding=True) == tied.num_params(non_embedding=True)


def test_flops_per_token_formula():
    model = tiny_model()
    c = model.config
    n_matmul = (model.num_params(non_embedding=True) - (2 * c.n_layer + 1) * c.d_model  # norms
                + c.vocab_size * c.d_model)  # the output head
    assert model.flops_per_token() == 6 * n_matmul + 12 * c.n_layer * c.d_model * c.context_length


# --- forward -----------------------------------------------------------------------------------


def test_shapes_and_loss():
    model = tiny_model()
    idx = random_ids(3, 17)
    logits = model(idx)
    assert logits.shape == (3, 17, VOCAB) and logits.dtype == torch.float32
    logits2, loss = model(idx, random_ids(3, 17, seed=2))
    assert torch.equal(logits, logits2)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_ignored_targets_do_not_count():
    model = tiny_model()
    idx, targets = random_ids(2, 16), random_ids(2, 16, seed=3)
    logits, loss = model(idx, targets)
    masked = targets.clone()
    masked[:, :10] = -1
    _, masked_loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, 10:].reshape(-1, VOCAB),
                                                 targets[:, 10:].reshape(-1))
    torch.testing.assert_close(masked_loss, expected)
    assert not torch.isclose(masked_loss, loss)


def test_fresh_model_loss_is_near_ln_vocab():
    torch.manual_seed(0)
    model = GPT(model_config("tiny")).eval()  # the real 16384 vocabulary
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16384, (4, 64), generator=g)
    targets = torch.randint(0, 16384, (4, 64), generator=g)
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(16384)) < 0.1


def test_causality_future_tokens_never_change_past_logits():
    model = tiny_model()
    idx = random_ids(2, 24)
    changed = idx.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % VOCAB
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_rejects_sequences_longer_than_context():
    model = tiny_model()
    model(random_ids(1, 64))  # exactly the context length is fine
    with pytest.raises(ValueError, match="context_length 64"):
        model(random_ids(1, 65))


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(model_config("tiny", vocab_size=VOCAB, d_model=64, d_ff=192))
    idx, targets = random_ids(4, 32, seed=5), random_ids(4, 32, seed=6)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(150):
        _, loss = model(idx, targets)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
    assert loss.item() < 0.05


def test_dropout_only_in_training():
    model = tiny_model(dropout=0.5)
    idx = random_ids(2, 16)
    torch.testing.assert_close(model(idx), model(idx))  # eval: deterministic
    model.train()
    assert not torch.allclose(model(idx), model(idx))


def test_bf16_autocast_runs_forward_and_backward():
    model = tiny_model().train()
    idx, targets = random_ids(2, 32), random_ids(2, 32, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, targets)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        reference = model.eval()(idx)
    assert (logits.float() - reference).abs().max() < 0.1


def test_bf16_weights_with_cache():
    model = tiny_model().to(torch.bfloat16)
    idx = random_ids(2, 10)
    cache = model.new_kv_cache(2, 10)
    assert cache.k.dtype == torch.bfloat16
    out = torch.cat([model(idx[:, :6], cache=cache), model(idx[:, 6:], cache=cache)], dim=1)
    assert (out.float() - model(idx).float()).abs().max() < 0.05


# --- KV cache ----------------------------------------------------------------------------------


def test_cache_prefill_then_steps_equals_full_forward():
    model = tiny_model()
    idx = random_ids(3, 30)  # a batch of several sequences
    full = model(idx)
    cache = model.new_kv_cache(batch_size=3, max_length=40)
    assert isinstance(cache, KVCache) and cache.position == 0
    pieces = [model(idx[:, :11], cache=cache)]  # prefill
    assert cache.position == 11
    pieces.append(model(idx[:, 11:18], cache=cache))  # a multi-token chunk mid-sequence
    for t in range(18, 30):  # then one token at a time
        pieces.append(model(idx[:, t:t + 1], cache=cache))
    assert cache.position == 30
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)


def test_cache_is_preallocated_and_reset_reuses_it():
    model = tiny_model()
    cache = model.new_kv_cache(2, 20)
    c = model.config
    assert cache.k.shape == (c.n_layer, 2, c.n_kv_head, 20, c.head_dim)
    k_ptr = cache.k.data_ptr()
    idx = random_ids(2, 12)
    first = model(idx[:, :5], cache=cache)
    for t in range(5, 12):
        model(idx[:, t:t + 1], cache=cache)
    assert cache.k.data_ptr() == k_ptr  # written in place, never reallocated
    cache.reset()
    assert cache.position == 0
    torch.testing.assert_close(model(idx[:, :5], cache=cache), first)


def test_cache_errors_are_clear():
    model = tiny_model()
    with pytest.raises(ValueError, match="context_length 64"):
        model.new_kv_cache(1, 65)
    cache = model.new_kv_cache(2, 8)
    with pytest.raises(ValueError, match="batch of 1"):
        model(random_ids(1, 4), cache=cache)
    model(random_ids(2, 6), cache=cache)
    with pytest.raises(ValueError, match="KV cache full"):
        model(random_ids(2, 3), cache=cache)
    assert cache.position == 6  # a rejected call does not advance the cache


# --- torch.compile ------------------------------------------------------------------------------


def test_forward_compiles_without_graph_breaks():
    model = tiny_model()
    idx, targets = random_ids(2, 16), random_ids(2, 16, seed=2)
    explanation = torch._dynamo.explain(model)(idx, targets)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# ---- architecture options: QK-norm and the ReLU-squared gate -----------------------------------

OPTIONS = [dict(qk_norm=True), dict(mlp_act="relu2"), dict(qk_norm=True, mlp_act="relu2")]


@pytest.mark.parametrize("options", OPTIONS)
def test_options_shapes_determinism_and_cache(options):
    model = tiny_model(**options)
    assert tiny_model(**options).state_dict().keys() == model.state_dict().keys()
    for name, p in tiny_model(**options).state_dict().items():  # same seed, same weights
        assert torch.equal(p, model.state_dict()[name]), name
    idx = random_ids(2, 24)
    full = model(idx)
    assert full.shape == (2, 24, VOCAB)
    torch.testing.assert_close(tiny_model(**options)(idx), full, rtol=0, atol=0)
    cache = model.new_kv_cache(batch_size=2, max_length=24)
    pieces = [model(idx[:, :10], cache=cache)] + [model(idx[:, t:t + 1], cache=cache)
                                                  for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)


def test_qk_norm_adds_one_gain_per_head_channel_and_normalises():
    plain, normed = tiny_model(), tiny_model(qk_norm=True)
    c = normed.config
    assert normed.num_params() - plain.num_params() == 2 * c.n_layer * c.head_dim
    attn = normed.blocks[0].attn
    x = torch.randn(1, 5, c.d_model) * 100  # huge activations: normalised queries stay unit-RMS
    q = attn.q_norm(attn.q_proj(x).view(1, 5, c.n_head, c.head_dim))
    torch.testing.assert_close(q.pow(2).mean(-1), torch.ones(1, 5, c.n_head), rtol=1e-3, atol=1e-3)


def test_relu2_gate_is_relu_squared():
    mlp = tiny_model(mlp_act="relu2").blocks[0].mlp
    x = torch.randn(3, mlp.gate_proj.in_features)
    expected = mlp.down_proj(torch.relu(mlp.gate_proj(x)) ** 2 * mlp.up_proj(x))
    torch.testing.assert_close(mlp(x), expected)
