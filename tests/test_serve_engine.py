"""The continuous-batching engine (src/infer/engine.py) and the model's slot KV cache, driven
step by step without HTTP; the OpenAI penalties of the sampler; the system role."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from src.infer.engine import Engine, GenerationRequest, QueueFullError
from src.infer.sampling import (
    SamplingSettings,
    apply_frequency_presence_penalties,
    generate,
    sample_next,
)
from src.model.gpt import GPT
from src.tokenizer.bpe import BPETokenizer
from src.tokenizer.chat_template import Turn, encode_chat, render_chat
from src.tokenizer.special_tokens import ASSISTANT, ENDOFTEXT, SPECIAL_TOKENS, SYSTEM, USER
from src.training.presets import model_config
from tests.fixtures import tiny_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return BPETokenizer.train(tiny_corpus(60, 0), 300)


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    torch.manual_seed(0)
    return GPT(model_config("tiny", vocab_size=tok.vocab_size)).eval()


def prompts(tok, n: int) -> list[list[int]]:
    """n prompts of different lengths."""
    return [[tok.eot_id, *tok.encode("The cat sees" + " the ball" * i)] for i in range(n)]


def run_all(engine: Engine, requests: list[GenerationRequest]) -> list[tuple[str, str]]:
    """Submit, step the engine to the end; (text, finish_reason) of each request."""
    texts = [[] for _ in requests]
    reasons = [None] * len(requests)

    def on_update(i, update):
        texts[i].append(update.text)
        reasons[i] = update.finish_reason or reasons[i]

    engine.submit(requests, on_update)
    while engine.step():
        pass
    return [("".join(t), r) for t, r in zip(texts, reasons)]


def test_slot_cache_gives_each_row_its_own_sequence(model):
    """Ragged rows in one slot cache, fed together, give the logits of a full forward pass
    of each sequence alone (positions, masks and stale keys of a reused slot handled)."""
    torch.manual_seed(1)
    a, b = torch.randint(0, 300, (1, 30)), torch.randint(0, 300, (1, 12))
    cache = model.new_slot_kv_cache(3)
    with torch.no_grad():
        cache.lengths[1] = 25  # a finished sequence's stale keys must be invisible after free
        cache.free(1)
        out_a = [model(a[:, :20], cache=cache, slots=torch.tensor([2]))]
        out_b = [model(b[:, :4], cache=cache, slots=torch.tensor([1]))]
        for t in range(8):
            step = torch.stack([a[0, 20 + t], b[0, 4 + t]])[:, None]
            logits = model(step, cache=cache, slots=torch.tensor([2, 1]))
            out_a.append(logits[:1])
            out_b.append(logits[1:])
        assert cache.lengths.tolist() == [0, 12, 28]
        torch.testing.assert_close(torch.cat(out_a, 1), model(a[:, :28]), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.cat(out_b, 1), model(b), atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="slots="):
            model(a[:, :1], cache=cache)
        with pytest.raises(ValueError, match="full"):
            model(torch.zeros(1, 60, dtype=torch.long), cache=cache, slots=torch.tensor([2]))


def test_batched_greedy_matches_one_at_a_time_generation(model, tok):
    """Requests decoded together give exactly what sampling.generate gives for each alone."""
    settings = SamplingSettings(max_new_tokens=12, temperature=0)
    requests = [GenerationRequest(p, settings, stop_ids=[tok.eot_id]) for p in prompts(tok, 5)]
    got = run_all(Engine(model, tok, max_batch=3), requests)  # 5 requests, 3 slots: queueing
    for (text, reason), request in zip(got, requests):
        [alone] = generate(model, tok, request.prompt_ids, settings, stop_ids=[tok.eot_id])
        assert text == alone.text
        assert reason == ("length" if alone.finish_reason == "length" else "stop")


def test_same_seed_same_text_alone_or_among_eight(model, tok):
    """A seeded request's text does not depend on the 8 others decoded in its batch, with
    their own settings and seeds; and the 9 really share forward passes."""
    mine = GenerationRequest(prompts(tok, 3)[2], SamplingSettings(max_new_tokens=20,
                             temperature=1.0, top_p=0.9), seed=1234)
    alone = run_all(Engine(model, tok, max_batch=9), [mine])[0]
    others = [GenerationRequest(p, SamplingSettings(max_new_tokens=10 + i,
              temperature=0.5 + 0.2 * i, top_k=5 * i or None, presence_penalty=0.5), seed=i)
              for i, p in enumerate(prompts(tok, 8))]
    batch_sizes = []
    engine = Engine(model, tok, max_batch=9)
    hook = model.register_forward_hook(lambda m, args, out: batch_sizes.append(args[0].shape[0]))
    try:
        together = run_all(engine, [*others[:4], mine, *others[4:]])
    finally:
        hook.remove()
    assert together[4] == alone
    assert max(batch_sizes) == 9  # one decode step fed all nine
    other_texts = {t for t, _ in together}
    assert len(other_texts) > 5  # and the others did differ


def test_requests_join_between_steps_and_leave_at_once(model, tok):
    settings = SamplingSettings(max_new_tokens=15, temperature=0)
    engine = Engine(model, tok, max_batch=4)
    first = GenerationRequest(prompts(tok, 1)[0], settings)
    late = GenerationRequest(prompts(tok, 3)[2], SamplingSettings(max_new_tokens=3,
                             temperature=0))
    texts = {0: "", 1: ""}
    done = {}

    def collect(key):
        def on_update(_, update):
            texts[key] += update.text
            if update.finish_reason:
                done[key] = update.completion_tokens
        return on_update

    engine.submit([first], collect(0))
    for _ in range(4):
        engine.step()
    engine.submit([late], collect(1))
    engine.step()  # admitted (prefill + first token) and decoded with the first request
    assert engine.load == (2, 0)
    engine.step()
    assert done == {1: 3} and engine.load == (1, 0)  # retired as soon as it finished
    while engine.step():
        pass
    solo = run_all(Engine(model, tok), [first, late])
    assert [texts[0], texts[1]] == [t for t, _ in solo]


def test_cancel_frees_the_slot_at_the_next_step(model, tok):
    engine = Engine(model, tok, max_batch=2, max_queue=1)
    settings = SamplingSettings(max_new_tokens=40, temperature=0)
    updates = []
    handles = engine.submit([GenerationRequest(p, settings) for p in prompts(tok, 2)],
                            lambda i, u: updates.append((i, u)))
    engine.step()
    assert engine.load == (2, 0)
    handles[0].cancel()
    seen = len(updates)
    engine.step()
    assert engine.load == (1, 0)
    assert all(i == 1 for i, _ in updates[seen:])  # the cancelled one hears nothing more
    engine.submit([GenerationRequest(prompts(tok, 1)[0], settings)], lambda i, u: None)
    engine.step()
    assert engine.load == (2, 0)  # the freed slot took the next request at once


def test_queue_limit_and_context_are_checked_on_submit(model, tok):
    engine = Engine(model, tok, max_batch=1, max_queue=1)
    settings = SamplingSettings(max_new_tokens=5)
    request = GenerationRequest(prompts(tok, 1)[0], settings)
    engine.submit([request, request], lambda i, u: None)  # one for the free slot, one waits
    with pytest.raises(QueueFullError):
        engine.submit([request], lambda i, u: None)
    too_long = GenerationRequest(prompts(tok, 1)[0], SamplingSettings(max_new_tokens=64))
    with pytest.raises(ValueError, match="context is 64 tokens"):
        engine.submit([too_long], lambda i, u: None)


def test_shutdown_ends_every_request_with_a_last_update(model, tok):
    engine = Engine(model, tok, max_batch=1, max_queue=2)
    last = {}
    settings = SamplingSettings(max_new_tokens=40, temperature=0)
    engine.submit([GenerationRequest(p, settings) for p in prompts(tok, 2)],
                  lambda i, u: last.__setitem__(i, u))
    engine.start()
    engine.shutdown()
    assert {i: u.finish_reason for i, u in last.items()} == {0: "shutdown", 1: "shutdown"}
    with pytest.raises(RuntimeError, match="shut down"):
        engine.submit([GenerationRequest(prompts(tok, 1)[0], settings)], lambda i, u: None)


# --- the sampler's OpenAI penalties ------------------------------------------------------


def test_frequency_and_presence_penalties_follow_openai():
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    counts = torch.tensor([[0.0, 1.0, 3.0]])
    out = apply_frequency_presence_penalties(logits, counts, frequency=0.5, presence=0.25)
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.25, -0.75]]))
    # Strong penalties steer greedy decoding away from the repeated token.
    settings = SamplingSettings(temperature=0, frequency_penalty=2.0)
    assert sample_next(torch.tensor([[3.0, 2.0]]), settings, counts=torch.tensor([[1.0, 0.0]])
                       ).item() == 1
    with pytest.raises(ValueError, match="presence_penalty must be between -2 and 2"):
        SamplingSettings(presence_penalty=2.5)


# --- the system role ------------------------------------------------------------------


def test_system_turn_is_first_has_its_token_and_is_never_scored(tok):
    turns = [Turn("system", "Be brief."), Turn("user", "Hi"), Turn("assistant", "Hello")]
    assert render_chat(turns) == f"{SYSTEM}Be brief.{USER}Hi{ASSISTANT}Hello{ENDOFTEXT}"
    ids, mask = encode_chat(tok, turns)
    assert ids[0] == tok.special_tokens[SYSTEM]
    system_len = 1 + len(tok.encode("Be brief."))
    assert not any(mask[:system_len + 1 + len(tok.encode("Hi")) + 1])
    with pytest.raises(ValueError, match="system turn must be the first"):
        encode_chat(tok, [Turn("user", "Hi"), Turn("system", "late")])
    # Typed text that spells the system token stays text.
    ids, _ = encode_chat(tok, [Turn("user", SYSTEM)], end=False)
    assert ids.count(tok.special_tokens[SYSTEM]) == 0


def test_tokenizer_saved_before_the_system_token_loads_unchanged(tok, tmp_path):
    """A file from before SYSTEM existed (3 specials) keeps every id and its hash, gains
    SYSTEM in the next reserved id, and is saved back byte for byte."""
    old = BPETokenizer(tok.merges, pattern=tok.pattern, special_tokens=SPECIAL_TOKENS[:3])
    path = tmp_path / "old.json"
    old.save(path)
    assert SYSTEM not in json.loads(path.read_text())["special_tokens"]
    loaded = BPETokenizer.load(path)
    assert loaded.hash == old.hash  # runs that recorded it still match
    for s in SPECIAL_TOKENS[:3]:
        assert loaded.special_tokens[s] == old.special_tokens[s]
    assert loaded.special_tokens[SYSTEM] == old.special_tokens[SPECIAL_TOKENS[2]] + 1
    assert loaded.special_tokens == tok.special_tokens  # as a tokenizer trained today
    text = "Hello <|system|> world"
    assert loaded.encode(text) == old.encode(text)
    assert loaded.decode([loaded.special_tokens[SYSTEM]]) == SYSTEM
    assert loaded.encode_with_special(SYSTEM) == [loaded.special_tokens[SYSTEM]]
    again = tmp_path / "again.json"
    loaded.save(again)
    assert again.read_bytes() == path.read_bytes()


def test_a_failing_step_ends_its_requests_with_error_and_the_engine_goes_on(model, tok,
                                                                             monkeypatch):
    engine = Engine(model, tok, max_batch=2)
    settings = SamplingSettings(max_new_tokens=5, temperature=0)
    request = GenerationRequest(prompts(tok, 1)[0], settings)
    real_forward = model.forward

    def failing_forward(*args, **kwargs):
        monkeypatch.setattr(model, "forward", real_forward)  # fails once
        raise RuntimeError("simulated failure inside the model")

    monkeypatch.setattr(model, "forward", failing_forward)
    reasons = []
    engine.submit([request], lambda i, u: u.finish_reason and reasons.append(u.finish_reason))
    engine.start()
    try:
        deadline = time.monotonic() + 10
        while not reasons:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        result = engine.generate(request)  # the engine is still working
    finally:
        engine.shutdown()
    assert reasons == ["error"]
    assert result.finish_reason == "length" and result.completion_tokens == 5
    assert engine.load == (0, 0)


def test_call_runs_in_the_engine_thread_between_steps_and_fails_after_shutdown(model, tok):
    engine = Engine(model, tok, max_batch=2)
    assert engine.call(lambda: 6 * 7).result() == 42  # no thread yet: runs here, at once
    engine.start()
    try:
        where = engine.call(lambda: threading.current_thread().name).result(10)
        assert where == "engine"
        with pytest.raises(ZeroDivisionError):
            engine.call(lambda: 1 / 0).result(10)
        assert engine.call(lambda: "still serving").result(10) == "still serving"
    finally:
        engine.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.call(lambda: None)
