"""Log-probabilities in serve.py's API (issue 21): OpenAI's formats, read through the official
``openai`` client, and numbers checked against the model's own logits computed here.

``trained`` serves a tiny trained run (its distributions are far from one-hot, so a wrong
number shows); ``scripted`` serves the hand-weighted model of tests/serve_support.py, whose
reply contains an emoji split over four byte tokens.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch

import src.infer.engine as engine_module
from src.infer.engine import Engine, GenerationRequest
from src.infer.sampling import SamplingSettings, undecodable_ids
from src.serve.app import create_app
from src.serve.loading import load_served_model
from src.serve.protocol import CompletionLogprobs, token_name
from src.tokenizer.chat_template import Turn, encode_chat
from tests.fixtures import make_tiny_run
from tests.serve_support import running_server, scripted_model, scripted_tokenizer
from tests.test_serve_api import assert_error, client, post

pytestmark = pytest.mark.usefixtures("one_thread")
EMOJI = "\U0001f642"
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir: Path = make_tiny_run(tmp_path_factory.mktemp("logprobs"))
    model, tokenizer, _ = load_served_model(str(run_dir), device="cpu")
    engine = Engine(model, tokenizer, max_batch=4)
    with running_server(create_app(engine, "tiny", api_key="k"), engine) as server:
        server.model, server.tokenizer, server.key = model, tokenizer, "k"
        yield server


@pytest.fixture(scope="module")
def scripted():
    tokenizer = scripted_tokenizer()
    engine = Engine(scripted_model(tokenizer), tokenizer, max_batch=4)
    with running_server(create_app(engine, "scripted", api_key="k"), engine) as server:
        server.tokenizer, server.key = tokenizer, "k"
        yield server


def ids_by_name(tokenizer) -> dict[str, int]:
    """Token id of each token's name as the API shows it (no two tokens share bytes)."""
    names = {}
    for i in range(tokenizer.vocab_size):
        with contextlib.suppress(ValueError):  # a reserved id with no token
            names[token_name(tokenizer.token_bytes(i))] = i
    return names


def ids_of(tokenizer, entries) -> list[int]:
    names = ids_by_name(tokenizer)
    return [names[e.token] for e in entries]


@torch.inference_mode()
def model_logprobs(server, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's next-token logits after ``ids``, one full forward pass with
    no cache, the ids that are no token excluded (the engine never draws them)."""
    logits = server.model(torch.tensor([ids]))[0, -1].float()
    logits[undecodable_ids(server.tokenizer, logits.numel())] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


def chat_prompt(tokenizer, text: str) -> list[int]:
    ids, _ = encode_chat(tokenizer, [Turn("user", text)], add_generation_prompt=True, end=False)
    return [tokenizer.eot_id, *ids]


def check_against_the_model(server, prompt: list[int], entries, greedy: bool) -> None:
    generated = ids_of(server.tokenizer, entries)
    for i, entry in enumerate(entries):
        expected = model_logprobs(server, prompt + generated[:i])
        top = [t.logprob for t in entry.top_logprobs]
        assert top == sorted(top, reverse=True)
        assert entry.logprob == pytest.approx(expected[generated[i]].item(), abs=1e-4)
        want_top = torch.topk(expected, len(top))
        assert top == pytest.approx(want_top.values.tolist(), abs=1e-4)
        if greedy:  # the chosen token is the most likely one
            assert entry.logprob == top[0] and entry.token == entry.top_logprobs[0].token
        for alt in entry.top_logprobs:
            assert token_name(bytes(alt.bytes)) == alt.token


def test_chat_logprobs_are_the_models_log_softmax_streamed_or_not(trained):
    chat = client(trained, trained.key).chat.completions
    # ignore_eos: the barely trained model would end its greedy reply at once.
    ask = dict(model="tiny", messages=HI, max_tokens=8, temperature=0, logprobs=True,
               top_logprobs=5, extra_body={"ignore_eos": True})
    reply = chat.create(**ask)
    [choice] = reply.choices
    entries = choice.logprobs.content
    assert len(entries) == reply.usage.completion_tokens == 8
    assert all(len(e.top_logprobs) == 5 for e in entries)
    assert b"".join(bytes(e.bytes) for e in entries).decode(errors="replace") == \
        choice.message.content
    prompt = chat_prompt(trained.tokenizer, "Hi")
    check_against_the_model(trained, prompt, entries, greedy=True)

    streamed = [c.choices[0].logprobs.content for c in chat.create(**ask, stream=True)
                if c.choices and c.choices[0].logprobs]
    flat = [e for chunk in streamed for e in chunk]
    assert [(e.token, e.bytes) for e in flat] == [(e.token, e.bytes) for e in entries]
    assert [e.logprob for e in flat] == pytest.approx([e.logprob for e in entries], abs=1e-5)


def test_sampled_tokens_report_the_raw_distribution_not_the_tempered_one(trained):
    """At temperature 1.7 with top-p 0.9 the token is drawn from a reshaped distribution;
    the reported numbers are still log_softmax of the raw logits (as vLLM and llama.cpp)."""
    reply = client(trained, trained.key).chat.completions.create(
        model="tiny", messages=HI, max_tokens=6, temperature=1.7, top_p=0.9, seed=11,
        logprobs=True, top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == 6
    check_against_the_model(trained, chat_prompt(trained.tokenizer, "Hi"), entries, greedy=False)
    assert any(e.logprob < e.top_logprobs[0].logprob for e in entries)  # not always the top


def test_a_character_split_over_tokens_streams_with_its_bytes_and_n_choices(scripted):
    chunks = list(client(scripted, scripted.key).chat.completions.create(
        model="scripted", messages=HI, max_tokens=20, logprobs=True, top_logprobs=2, n=2,
        seed=1, stream=True))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        text = "".join(c.delta.content or "" for c in mine)
        entries = [e for c in mine if c.logprobs for e in c.logprobs.content]
        assert len(entries) == 20 and EMOJI in text
        assert b"".join(bytes(e.bytes) for e in entries) == text.encode()
        [emoji_chunk] = [c for c in mine if c.delta.content == EMOJI]
        parts = emoji_chunk.logprobs.content
        assert [bytes(p.bytes) for p in parts] == [bytes([b]) for b in EMOJI.encode()]
        assert [p.token for p in parts] == [f"bytes:\\x{b:02x}" for b in EMOJI.encode()]
        # The scripted model is sure of every token: probability 1, the next at e^-69.
        assert all(e.logprob == 0.0 and e.top_logprobs[0].token == e.token for e in entries)
        assert all(e.top_logprobs[1].logprob < -60 for e in entries)


def test_completions_give_the_legacy_format_streamed_or_not(trained):
    completions = client(trained, trained.key).completions
    ask = dict(model="tiny", prompt="The cat", max_tokens=7, temperature=0, logprobs=3,
               extra_body={"ignore_eos": True})
    reply = completions.create(**ask)
    [choice] = reply.choices
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == \
        len(lp.text_offset) == reply.usage.completion_tokens == 7
    tokenizer = trained.tokenizer
    prompt = [tokenizer.eot_id, *tokenizer.encode("The cat")]
    names = ids_by_name(tokenizer)
    ids = [names[token] for token in lp.tokens]
    for i, (token, logprob, top) in enumerate(zip(lp.tokens, lp.token_logprobs,
                                                   lp.top_logprobs)):
        expected = model_logprobs(trained, prompt + ids[:i])
        assert logprob == pytest.approx(expected[ids[i]].item(), abs=1e-4)
        assert len(top) == 3 and max(top.values()) == logprob and top[token] == logprob
        assert sorted(top.values(), reverse=True) == pytest.approx(
            torch.topk(expected, 3).values.tolist(), abs=1e-4)
        # text_offset: where the token's text starts in the completion, in characters.
        before = tokenizer.decode_bytes(ids[:i]).decode(errors="ignore")
        assert lp.text_offset[i] == len(before)
    assert tokenizer.decode(ids) == choice.text

    streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for chunk in completions.create(**ask, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            for key, values in streamed.items():
                values.extend(getattr(chunk.choices[0].logprobs, key))
    assert streamed["tokens"] == lp.tokens and streamed["text_offset"] == lp.text_offset
    assert streamed["token_logprobs"] == pytest.approx(lp.token_logprobs, abs=1e-5)


def test_legacy_offsets_of_a_split_character_and_logprobs_zero():
    """logprobs=0: the chosen token alone in top_logprobs; the four byte tokens of an emoji
    all start where the emoji starts, the next token after it (one character on)."""
    tokenizer = scripted_tokenizer()
    ids = tokenizer.encode("a" + EMOJI + " la")
    records = [engine_module.TokenLogprob(t, -0.5) for t in ids]
    legacy = CompletionLogprobs(tokenizer)
    out = legacy.add(records[:3])  # streamed: the offsets run on across chunks
    more = legacy.add(records[3:])
    assert out["text_offset"] + more["text_offset"] == [0, 1, 1, 1, 1, 2]
    assert out["top_logprobs"][0] == {"a": -0.5}
    assert more["tokens"][-1] == " la"


def test_requests_without_logprobs_compute_none(monkeypatch):
    """The fast path: a batch in which nobody asks never computes a log-probability, and a
    request that asks shares its batch with one that does not."""
    calls = []
    real = engine_module.token_logprobs
    monkeypatch.setattr(engine_module, "token_logprobs",
                        lambda *args: calls.append(args[0].shape) or real(*args))
    tokenizer = scripted_tokenizer()
    engine = Engine(scripted_model(tokenizer), tokenizer, max_batch=2)
    prompt = chat_prompt(tokenizer, "Hi")
    settings = SamplingSettings(max_new_tokens=6, temperature=0)
    plain = engine.generate(GenerationRequest(prompt, settings))
    assert plain.logprobs == [] and calls == []
    updates = {0: [], 1: []}
    engine.submit([GenerationRequest(prompt, settings),
                   GenerationRequest(prompt, settings, logprobs=2)],
                  lambda i, update: updates[i].append(update))
    while engine.step():
        pass
    assert all(u.logprobs == () for u in updates[0])
    asked = [r for u in updates[1] for r in u.logprobs]
    assert len(asked) == 6 and all(len(r.top) == 2 and math.isfinite(r.logprob) for r in asked)
    assert calls and all(shape[0] == 1 for shape in calls)  # only the row that asked
    assert "".join(u.text for u in updates[0]) == plain.text


BAD = [  # (path, change, param) -> 400
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": "5"}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": "yes"}, "logprobs"),
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ("/v1/completions", {"logprobs": -1}, "logprobs"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),
]


@pytest.mark.parametrize("path, change, param", BAD)
def test_out_of_range_logprobs_are_400(scripted, path, change, param):
    body = {"messages": HI, "prompt": "Hi", "max_tokens": 2, **change}
    assert_error(post(scripted, path, body, key=scripted.key), 400, param)

