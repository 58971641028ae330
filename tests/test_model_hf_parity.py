"""Parity with Hugging Face: our GPT and a LlamaForCausalLM holding the same weights must give
the same logits (so an export is exact), and weights must survive the round trip."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from src.model.gpt import GPT, GPTConfig  # noqa: E402
from src.model.hf_llama import from_hf, to_hf, to_hf_config  # noqa: E402
from src.training.presets import model_config  # noqa: E402


def make_model(tie: bool, n_kv_head: int, mlp_act: str = "silu") -> GPT:
    torch.manual_seed(0)
    cfg = model_config("tiny", vocab_size=301, n_kv_head=n_kv_head, tie_embeddings=tie,
                       rope_base=500.0, norm_eps=1e-6, mlp_act=mlp_act)
    model = GPT(cfg).eval()
    with torch.no_grad():  # make every weight matter: non-trivial norm gains
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("tie,n_kv_head,mlp_act", [
    (True, 4, "silu"), (False, 4, "silu"), (True, 2, "silu"), (False, 2, "silu"),  # MHA and GQA
    (True, 2, "relu2"),  # the ReLU-squared gate: Llama's hidden_act "relu2"
])
def test_logits_match_llama(tie, n_kv_head, mlp_act):
    model = make_model(tie, n_kv_head, mlp_act)
    hf = to_hf(model)
    assert hf.config.hidden_act == mlp_act
    assert hf.config.tie_word_embeddings == tie
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tie
    assert sum(p.numel() for p in hf.parameters()) == model.num_params()
    idx = torch.randint(0, 301, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx)
        theirs = hf(idx).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie,mlp_act", [(True, "silu"), (False, "silu"), (True, "relu2")])
def test_round_trip_through_llama(tie, mlp_act):
    model = make_model(tie, 2, mlp_act)
    back = from_hf(to_hf(model))
    assert back.config == model.config
    assert back.config.to_dict() == model.config.to_dict()
    ours, again = model.state_dict(), back.state_dict()
    assert ours.keys() == again.keys()
    for name in ours:
        assert torch.equal(ours[name], again[name]), name
    if tie:
        assert back.lm_head.weight is back.tok_emb.weight


def test_llama_config_matches_shape():
    cfg = model_config("gpt-60m")
    hf_cfg = to_hf_config(cfg)
    assert (hf_cfg.hidden_size, hf_cfg.num_hidden_layers, hf_cfg.num_attention_heads,
            hf_cfg.num_key_value_heads, hf_cfg.intermediate_size, hf_cfg.max_position_embeddings
            ) == (768, 8, 12, 4, 2048, 1024)


def test_a_setting_llama_lacks_is_refused():
    """A model option with no Llama counterpart must not export as a different model: QK-norm
    for both formats, the ReLU-squared gate for GGUF (llama.cpp's llama gate is SiLU)."""
    from src.model.gguf_llama import check_gguf_representable
    from src.model.hf_llama import check_llama_representable

    fields = model_config("tiny").to_dict()
    check_llama_representable(GPTConfig(**fields))
    check_gguf_representable(GPTConfig(**fields))
    with pytest.raises(ValueError, match="qk_norm"):
        check_llama_representable(GPTConfig(**{**fields, "qk_norm": True}))
    with pytest.raises(ValueError, match="qk_norm"):
        check_gguf_representable(GPTConfig(**{**fields, "qk_norm": True}))
    check_llama_representable(GPTConfig(**{**fields, "mlp_act": "relu2"}))
    with pytest.raises(ValueError, match="relu2"):
        check_gguf_representable(GPTConfig(**{**fields, "mlp_act": "relu2"}))
