"""Seeing inside the model: attention weights (record_attention, attention_maps), token pieces,
the next-token distribution and log-probabilities of generated tokens.

The weights are checked against an independent computation from each layer's own Q and K
(softmax(QK^T / sqrt(d)) with RoPE and the causal mask, written out here per query head), and
the attention output rebuilt from them against the fused kernel's. Tiny random models whose
weights are scaled up, so attention is sharp: a missing rotation or mask would show.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from src.infer.internals import (
    attention_maps,
    logprobs_from_logits,
    prompt_ids,
    sequence_logprobs,
    token_info,
)
from src.infer.sampling import SamplingSettings, process_logits, stream_ids, undecodable_ids
from src.model.gpt import GPT, Attention, GPTConfig, apply_rope, record_attention
from src.tokenizer.chat_template import Turn, encode_chat

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

TEXT = "hello world, how are you? fine thanks, and you?"


@pytest.fixture(scope="module")
def tok():
    from src.tokenizer.bpe import BPETokenizer

    return BPETokenizer.train(["hello world, how are you? fine thanks. " * 5], vocab_size=280)


def make_model(tok, n_head: int = 4, n_kv_head: int = 2, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, context_length=64, n_layer=2,
                          n_head=n_head, n_kv_head=n_kv_head, d_model=32))
    with torch.no_grad():
        for block in model.blocks:  # sharp attention: scores far from uniform
            block.attn.q_proj.weight.normal_(0, 0.6)
            block.attn.k_proj.weight.normal_(0, 0.6)
    return model.eval()


def layer_inputs(model: GPT, ids: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each attention layer's input and output in one fast-path forward pass (hooks)."""
    inputs, outputs = [], []

    def keep(module, args, out) -> None:
        inputs.append(args[0])
        outputs.append(out)

    hooks = [b.attn.register_forward_hook(keep) for b in model.blocks]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return inputs, outputs


def independent_weights(attn: Attention, x: torch.Tensor, cos, sin, rope: bool = True):
    """softmax(q k^T / sqrt(d)) under the causal mask, per query head, in float64, from the
    layer's own projections: (n_head, T, T)."""
    T = x.size(1)
    q = attn.q_proj(x).view(1, T, attn.n_head, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)
    if rope:
        q, k = apply_rope(q, cos[:T], sin[:T]), apply_rope(k, cos[:T], sin[:T])
    q, k = q[0].double(), k[0].double()
    group = attn.n_head // attn.n_kv_head
    out = torch.zeros(attn.n_head, T, T, dtype=torch.float64)
    for h in range(attn.n_head):
        kv = h // group  # the key/value head this query head reads
        for i in range(T):
            scores = torch.stack([q[h, i] @ k[kv, j] for j in range(i + 1)])
            out[h, i, : i + 1] = torch.softmax(scores / math.sqrt(attn.head_dim), dim=0)
    return out


# ---------------------------------------------------------------- the weights are right


@pytest.mark.parametrize("n_head,n_kv_head", [(4, 4), (4, 2), (4, 1)])
def test_weights_equal_an_independent_computation_from_q_and_k(tok, n_head, n_kv_head):
    model = make_model(tok, n_head, n_kv_head)
    maps = attention_maps(model, tok, TEXT)
    ids = [t["id"] for t in maps.tokens]
    inputs, _ = layer_inputs(model, ids)
    weights = torch.tensor(maps.attention, dtype=torch.float64)
    assert weights.shape == (2, n_head, len(ids), len(ids))
    for layer, block in enumerate(model.blocks):
        with torch.no_grad():
            expected = independent_weights(block.attn, inputs[layer], model.rope_cos,
                                           model.rope_sin)
            unrotated = independent_weights(block.attn, inputs[layer], model.rope_cos,
                                            model.rope_sin, rope=False)
        torch.testing.assert_close(weights[layer], expected, atol=2e-5, rtol=1e-4)
        # The check can tell: without the rotation the weights are far off.
        assert (unrotated - expected).abs().max() > 0.05


def test_rows_are_causal_probability_distributions(tok):
    maps = attention_maps(make_model(tok), tok, TEXT)
    w = torch.tensor(maps.attention, dtype=torch.float64)
    T = w.size(-1)
    upper = torch.ones(T, T, dtype=torch.bool).triu(1)
    assert torch.all(w[..., upper] == 0)  # no token sees the future
    assert torch.all(w[..., ~upper] > 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1], dtype=torch.float64),
                               atol=1e-5, rtol=0)
    assert torch.all(w[..., 0, 0] == 1)  # the first token sees only itself
    assert w[0, 0].max(-1).values.min() < 0.99 < w.max()  # sharp somewhere, not everywhere


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_output_from_the_weights_equals_the_fused_kernels(tok, n_kv_head):
    model = make_model(tok, 4, n_kv_head)
    ids = prompt_ids(tok, TEXT)
    inputs, fast_outputs = layer_inputs(model, ids)
    maps = attention_maps(model, tok, TEXT)
    T = len(ids)
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        with torch.no_grad():
            v = attn.v_proj(inputs[layer]).view(1, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)
            v = v.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)
            y = torch.tensor(maps.attention[layer])[None] @ v
            out = attn.o_proj(y.transpose(1, 2).reshape(1, T, -1))
        torch.testing.assert_close(out, fast_outputs[layer], atol=1e-5, rtol=1e-4)
    # The whole model agrees too: the explicit path's logits are the fast path's.
    x = torch.tensor([ids])
    with torch.no_grad():
        fast = model(x)
        with record_attention(model):
            explicit = model(x)
    torch.testing.assert_close(explicit, fast, atol=1e-4, rtol=1e-4)


def test_recording_works_with_the_kv_cache(tok):
    """Prefill and then one token at a time: each step's row of weights is the full pass's."""
    model = make_model(tok)
    ids = prompt_ids(tok, TEXT)
    full = torch.tensor(attention_maps(model, tok, TEXT).attention)
    cache = model.new_kv_cache(1, 64)
    with torch.no_grad(), record_attention(model) as weights:
        model(torch.tensor([ids[:5]]), cache=cache)
        for t in range(5, 8):
            weights.clear()
            model(torch.tensor([ids[t:t + 1]]), cache=cache)
            for layer in range(2):
                torch.testing.assert_close(weights[layer][0, :, 0], full[layer, :, t, : t + 1],
                                           atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the fast path is untouched


def test_fast_path_is_bit_identical_to_the_fused_kernel_when_not_recording(tok, monkeypatch):
    model = make_model(tok, 4, 2)
    ids = prompt_ids(tok, TEXT)
    x = torch.tensor([ids])
    with torch.no_grad():
        before = model(x)
        with record_attention(model):
            model(x)
        after = model(x)
    assert torch.equal(before, after)  # leaving the block restores the fast path
    assert all(b.attn.recorded is None for b in model.blocks)

    # Each layer's output is exactly what the fused kernel alone gives (the code before the
    # feature existed), and the explicit computation never runs.
    def refuse(*args, **kwargs):
        raise AssertionError("the explicit attention ran without record_attention")

    monkeypatch.setattr(Attention, "explicit_attention", refuse)
    inputs, outputs = layer_inputs(model, ids)
    T = len(ids)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    for layer, block in enumerate(model.blocks):
        a = block.attn
        with torch.no_grad():
            q = a.q_proj(inputs[layer]).view(1, T, a.n_head, a.head_dim).transpose(1, 2)
            k = a.k_proj(inputs[layer]).view(1, T, a.n_kv_head, a.head_dim).transpose(1, 2)
            v = a.v_proj(inputs[layer]).view(1, T, a.n_kv_head, a.head_dim).transpose(1, 2)
            y = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin),
                                               v, is_causal=True, enable_gqa=True)
            reference = a.o_proj(y.transpose(1, 2).reshape(1, T, -1))
        assert torch.equal(outputs[layer], reference)
    # Generation (KV cache) runs the fast path too.
    settings = SamplingSettings(max_new_tokens=5, greedy=True)
    assert len(list(stream_ids(model, ids, settings))) == 5


def test_an_exception_inside_the_block_still_restores_the_fast_path(tok):
    model = make_model(tok)
    with pytest.raises(RuntimeError), record_attention(model):
        raise RuntimeError("boom")
    assert all(b.attn.recorded is None for b in model.blocks)


# ---------------------------------------------------------------- tokens and the next token


def test_tokens_are_byte_pieces_and_specials_by_name(tok):
    text = "hello 東京"
    maps = attention_maps(make_model(tok), tok, text)
    first, rest = maps.tokens[0], maps.tokens[1:]
    assert first == {"id": tok.eot_id, "text": "<|endoftext|>",
                     "bytes": list(b"<|endoftext|>"), "special": True}
    assert b"".join(bytes(t["bytes"]) for t in rest) == text.encode()
    assert not any(t["special"] for t in rest)
    # This tokenizer never saw these characters: each is three byte tokens, shown as escapes.
    assert [t["text"] for t in rest[-6:]] == ["\\xe6", "\\x9d", "\\xb1", "\\xe4", "\\xba", "\\xac"]
    assert "".join(t["text"] for t in rest[:-6]) == "hello "
    # A token holding a whole character reads as that character.
    assert token_info(tok, tok.encode("é")[0])["text"] != "é"  # split: not a whole character
    assert token_info(tok, ord("h"))["text"] == "h"


def test_typed_special_token_text_stays_plain_text(tok):
    maps = attention_maps(make_model(tok), tok, "a <|endoftext|> b")
    assert [t["special"] for t in maps.tokens].count(True) == 1  # only the leading one


def test_messages_are_rendered_with_the_chat_template(tok):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine"},
                Turn("user", "how are you?")]
    maps = attention_maps(make_model(tok), tok, messages=messages)
    turns = [Turn("user", "hello"), Turn("assistant", "fine"), Turn("user", "how are you?")]
    expected = [tok.eot_id, *encode_chat(tok, turns, add_generation_prompt=True, end=False)[0]]
    assert [t["id"] for t in maps.tokens] == expected
    assert maps.tokens[-1]["text"] == "<|assistant|>" and maps.tokens[-1]["special"]
    with pytest.raises(ValueError, match="role"):
        attention_maps(make_model(tok), tok, messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="content"):
        attention_maps(make_model(tok), tok, messages=[{"role": "user"}])


def test_next_tokens_are_the_top_20_of_the_models_softmax(tok):
    model = make_model(tok)
    maps = attention_maps(model, tok, TEXT)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids(tok, TEXT)]))[0, -1]
    banned = undecodable_ids(tok, model.config.vocab_size)
    assert banned  # the tokenizer's unassigned reserved ids
    probs = torch.softmax(logits.index_fill(0, torch.tensor(banned), float("-inf")), dim=-1)
    top = torch.topk(probs, 20)
    assert [t["id"] for t in maps.next_tokens] == top.indices.tolist()
    torch.testing.assert_close(torch.tensor([t["prob"] for t in maps.next_tokens]), top.values)
    for t in maps.next_tokens:
        assert t["prob"] == pytest.approx(math.exp(t["logprob"]))
        assert t == {**token_info(tok, t["id"]), "logprob": t["logprob"], "prob": t["prob"]}
    assert not set(banned) & {t["id"] for t in maps.next_tokens}


def test_rounded_weights_are_the_weights_rounded(tok):
    model = make_model(tok)
    full = torch.tensor(attention_maps(model, tok, TEXT).attention, dtype=torch.float64)
    maps = attention_maps(model, tok, TEXT, decimals=3)
    rounded = torch.tensor(maps.attention, dtype=torch.float64)
    assert torch.equal(rounded, full.round(decimals=3))
    assert not torch.equal(rounded, full)
    T = rounded.size(-1)
    assert torch.all((rounded.sum(-1) - 1).abs() <= T * 0.5e-3)
    assert all(len(repr(v)) <= 5 for v in rounded.flatten().tolist())  # short JSON numbers


def test_model_mode_is_restored(tok):
    model = make_model(tok).train()
    attention_maps(model, tok, TEXT)
    assert model.training


# ---------------------------------------------------------------- limits


def test_length_limits_and_bad_input_raise_one_line_errors(tok):
    model = make_model(tok)  # context 64
    n = len(prompt_ids(tok, TEXT))
    attention_maps(model, tok, TEXT, max_tokens=n)  # exactly at the limit is fine
    longer = len(prompt_ids(tok, TEXT + "!"))
    with pytest.raises(ValueError, match=f"the prompt is {longer} tokens.*at most {n} "):
        attention_maps(model, tok, TEXT + "!", max_tokens=n)
    with pytest.raises(ValueError, match="at most 64"):  # the context, whatever max_tokens says
        attention_maps(model, tok, "hello " * 70, max_tokens=1000)
    for kwargs, word in [({}, "exactly one"), ({"text": "a", "messages": []}, "exactly one"),
                         ({"text": ""}, "empty"), ({"messages": []}, "empty"),
                         ({"text": "a", "max_tokens": 0}, "max_tokens"),
                         ({"text": "a", "max_tokens": True}, "max_tokens"),
                         ({"text": "a", "decimals": 0}, "decimals")]:
        with pytest.raises(ValueError, match=word) as err:
            attention_maps(model, tok, **kwargs)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- log-probabilities


def step_by_step_logprobs(model, tok, prompt, generated, settings, unpenalised=()):
    """Each generated token's log-probability recomputed as stream_ids samples it: one
    forward pass per step, ban, penalty over what was seen, process_logits."""
    ban = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    ban[undecodable_ids(tok, model.config.vocab_size)] = True
    out = []
    for i, token in enumerate(generated):
        seq = [*prompt, *generated[:i]]
        with torch.no_grad():
            last = model(torch.tensor([seq]))[:, -1].masked_fill(ban, float("-inf"))
        seen = torch.zeros(1, model.config.vocab_size, dtype=torch.bool)
        seen[0, seq] = True
        seen[0, list(unpenalised)] = False
        row = torch.log_softmax(process_logits(last, settings, seen), dim=-1)[0]
        out.append(row[token].item())
    return out


def test_sequence_logprobs_of_sampled_tokens(tok):
    model = make_model(tok)
    prompt = prompt_ids(tok, "hello world")
    settings = SamplingSettings(max_new_tokens=12, temperature=0.7, top_k=8,
                                repetition_penalty=1.3)
    generated = [int(t) for t in stream_ids(model, prompt, settings,
                                            generator=torch.Generator().manual_seed(1),
                                            banned_ids=undecodable_ids(tok, tok.vocab_size),
                                            unpenalised_ids=[tok.eot_id])]
    scored = sequence_logprobs(model, tok, prompt, generated, settings, top_n=5,
                               unpenalised_ids=[tok.eot_id])
    expected = step_by_step_logprobs(model, tok, prompt, generated, settings, [tok.eot_id])
    assert [s["id"] for s in scored] == generated
    torch.testing.assert_close(torch.tensor([s["logprob"] for s in scored]),
                               torch.tensor(expected), atol=1e-5, rtol=1e-5)
    for s in scored:
        assert math.isfinite(s["logprob"])  # drawn from it, so it is in the distribution
        top = s["top_logprobs"]
        assert len(top) == 5 and [t["logprob"] for t in top] == sorted(
            [t["logprob"] for t in top], reverse=True)
        assert s["logprob"] <= top[0]["logprob"]
        assert s["text"] == token_info(tok, s["id"])["text"]


def test_sequence_logprobs_without_settings_are_the_models_own(tok):
    model = make_model(tok)
    prompt, generated = prompt_ids(tok, "hello"), tok.encode(" world, how")
    scored = sequence_logprobs(model, tok, prompt, generated)
    # Greedy with no penalty leaves the logits as they are: the same numbers.
    greedy = SamplingSettings(greedy=True)
    expected = step_by_step_logprobs(model, tok, prompt, generated, greedy)
    torch.testing.assert_close(torch.tensor([s["logprob"] for s in scored]),
                               torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert all(s["top_logprobs"] == [] for s in scored)
    assert sequence_logprobs(model, tok, prompt, []) == []
    with pytest.raises(ValueError, match="context"):
        sequence_logprobs(model, tok, prompt, [ord("a")] * 64)
    with pytest.raises(ValueError, match="top_logprobs"):
        sequence_logprobs(model, tok, prompt, generated, top_n=21)


def test_logprobs_of_a_token_the_distribution_rules_out(tok):
    logits = torch.full((1, tok.vocab_size), float("-inf"))
    logits[0, ord("a")], logits[0, ord("b")] = 2.0, 1.0
    [entry] = logprobs_from_logits(tok, logits, [ord("c")], top_n=3)
    assert entry["logprob"] == float("-inf")
    assert [t["text"] for t in entry["top_logprobs"]] == ["a", "b"]  # only what it could draw
    assert entry["top_logprobs"][0]["logprob"] == pytest.approx(-math.log1p(math.exp(-1.0)))
