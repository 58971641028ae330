"""Sampling: the logit filters, the token loop (KV cache, context policy, seeds) and stops.

The filters are checked on hand-made logits; the loop on a tiny real GPT (random weights)
and, for context handling, on a counting stand-in model whose behaviour is known exactly.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from src.infer.sampling import (
    SamplingSettings,
    StopStringFilter,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    generate,
    sample_next,
    stream_ids,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


# ---------------------------------------------------------------- settings and filters


def test_settings_reject_bad_values_with_the_value_named():
    for kwargs, word in [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ]:
        with pytest.raises(ValueError, match=word):
            SamplingSettings(**kwargs)
    assert SamplingSettings(temperature=0.0).is_greedy
    assert SamplingSettings(greedy=True).is_greedy
    assert not SamplingSettings().is_greedy


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = apply_top_k(logits, 2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True, False]]
    assert torch.equal(apply_top_k(logits, None), logits)
    assert torch.equal(apply_top_k(logits, 0), logits)
    assert torch.equal(apply_top_k(logits, 99), logits)


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    # 0.5 + 0.3 = 0.8 reaches 0.75: tokens 0 and 2 stay.
    assert torch.isfinite(apply_top_p(logits, 0.75)).tolist() == [[True, False, True, False]]
    # 0.5 + 0.3 < 0.85: the 0.15 token is needed too.
    assert torch.isfinite(apply_top_p(logits, 0.85)).tolist() == [[True, False, True, True]]
    # A tiny p still keeps the most likely token.
    assert torch.isfinite(apply_top_p(logits, 1e-6)).tolist() == [[True, False, False, False]]
    assert torch.equal(apply_top_p(logits, 1.0), logits)


def test_repetition_penalty_always_lowers_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0]]
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_greedy_is_argmax_and_sampling_follows_the_seed():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next(logits, SamplingSettings(greedy=True)), logits.argmax(-1))
    assert torch.equal(sample_next(logits, SamplingSettings(temperature=0.0)), logits.argmax(-1))
    s = SamplingSettings(temperature=1.3, top_k=20, top_p=0.9)
    a = [sample_next(logits, s, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    draws = {
        tuple(sample_next(logits, s, torch.Generator().manual_seed(i)).tolist()) for i in range(10)
    }
    assert len(draws) > 1  # different seeds, different draws


def test_top_k_one_sampling_equals_greedy():
    logits = torch.randn(3, 30)
    s = SamplingSettings(top_k=1, temperature=2.0)
    assert torch.equal(sample_next(logits, s, torch.Generator().manual_seed(1)), logits.argmax(-1))


def test_sampling_matches_the_filtered_distribution():
    # Three tokens with p = 0.6, 0.3, 0.1; top_p=0.85 removes the 0.1 token, leaving 2:1.
    logits = torch.tensor([[0.6, 0.3, 0.1]]).log().expand(4000, 3)
    ids = sample_next(logits, SamplingSettings(top_p=0.85), torch.Generator().manual_seed(0))
    counts = torch.bincount(ids, minlength=3).tolist()
    assert counts[2] == 0
    assert abs(counts[0] / 4000 - 2 / 3) < 0.03


# ---------------------------------------------------------------- stop strings


def _run_filter(stops, pieces):
    f = StopStringFilter(stops)
    shown = [f.feed(p) for p in pieces]
    return shown, f.flush(), f.stopped


def test_stop_string_is_never_shown_even_across_pieces():
    shown, rest, stopped = _run_filter(["\n\n"], ["Hello", "\n", "\n", "more"])
    assert "".join(shown) + rest == "Hello" and stopped
    shown, rest, stopped = _run_filter(["END"], ["abc E", "N", "D tail"])
    assert "".join(shown) == "abc " and rest == "" and stopped
    assert shown[1] == ""  # "EN" was held back: it could start "END"


def test_held_back_text_is_released_when_it_is_not_a_stop():
    shown, rest, stopped = _run_filter(["END"], ["abc E", "x"])
    assert shown == ["abc ", "Ex"] and rest == "" and not stopped
    shown, rest, stopped = _run_filter(["END"], ["abc EN"])
    assert shown == ["abc "] and rest == "EN" and not stopped
    shown, rest, stopped = _run_filter([], ["a", "b"])
    assert shown == ["a", "b"] and not stopped


def test_earliest_of_several_stop_strings_wins():
    shown, _, stopped = _run_filter(["world", "lo"], ["hello world"])
    assert shown == ["hel"] and stopped


# ---------------------------------------------------------------- the loop, on a stand-in


class CountingModel(torch.nn.Module):
    """Predicts (last token + 1) mod vocab, for certain; records every forward's length.
    Its cache only counts positions, enough to check the loop's cache and context logic."""

    def __init__(self, vocab=50, context_length=8):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab, context_length=context_length)
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[int] = []

    def new_kv_cache(self, batch_size, max_length, device=None, dtype=None):
        return SimpleNamespace(position=0, max_length=max_length, reset=None)

    def forward(self, idx, cache=None):
        self.calls.append(idx.size(1))
        if cache is not None:
            if cache.reset is None:
                cache.reset = lambda: setattr(cache, "position", 0)
            cache.position += idx.size(1)
            assert cache.position <= cache.max_length, "the loop overflowed the cache"
        assert idx.size(1) <= self.config.context_length, "the loop exceeded the context"
        nxt = (idx + 1) % self.config.vocab_size
        return torch.nn.functional.one_hot(nxt, self.config.vocab_size).float() * 100


def test_cached_loop_prefills_once_then_feeds_one_token():
    m = CountingModel(context_length=64)
    out = [
        t.tolist()
        for t in stream_ids(
            m, [1, 2, 3], SamplingSettings(max_new_tokens=5, greedy=True), num_samples=2
        )
    ]
    assert out == [[4, 4], [5, 5], [6, 6], [7, 7], [8, 8]]
    assert m.calls == [3, 1, 1, 1, 1]  # no forward for a token never drawn


def test_uncached_loop_recomputes_the_sequence():
    m = CountingModel(context_length=64)
    list(stream_ids(m, [1, 2, 3], SamplingSettings(max_new_tokens=4, greedy=True), use_cache=False))
    assert m.calls == [3, 4, 5, 6]


def test_context_full_stops_under_stop_policy():
    m, notes = CountingModel(context_length=8), []
    out = list(
        stream_ids(
            m, [0] * 6, SamplingSettings(max_new_tokens=100, greedy=True), notice=notes.append
        )
    )
    # 6 prompt tokens + 2 drawn fill the 8-token window; the draw after that still fits
    # (it is predicted from the full window) but no further token could be.
    assert len(out) == 3 and notes and "full" in notes[0]
    with pytest.raises(ValueError, match="context"):
        list(stream_ids(m, [0] * 9, SamplingSettings(greedy=True)))


@pytest.mark.parametrize("use_cache", [True, False])
def test_context_full_slides_under_slide_policy(use_cache):
    m, notes = CountingModel(context_length=8), []
    s = SamplingSettings(max_new_tokens=30, greedy=True)
    out = [
        t.item()
        for t in stream_ids(
            m, [1] * 12, s, use_cache=use_cache, on_context_full="slide", notice=notes.append
        )
    ]
    assert out == [(2 + i) % 50 for i in range(30)]  # the text goes on regardless
    assert len(notes) == 2  # the prompt was cut, and the window slid (said once)
    assert max(m.calls) == 8


def test_model_mode_is_restored():
    m = CountingModel()
    m.train()
    list(stream_ids(m, [1], SamplingSettings(max_new_tokens=2)))
    assert m.training


# ---------------------------------------------------------------- a stand-in that follows a script


class ScriptModel(torch.nn.Module):
    """Says the ids of ``script`` one after another after any prompt (then repeats its last
    id); remembers the prompt it was given. A context of ``context_length`` tokens."""

    def __init__(self, script, vocab_size, context_length=64):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, context_length=context_length)
        self.script = list(script)
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.prompts: list[list[int]] = []

    def new_kv_cache(self, batch_size, max_length, device=None, dtype=None):
        return SimpleNamespace(position=0, reset=None)

    def forward(self, idx, cache=None):
        if cache is None or cache.position == 0:
            self.prompts.append(idx[0].tolist())
            self.prompt_len = idx.size(1)
        end = idx.size(1) + (cache.position if cache is not None else 0)
        if cache is not None:
            cache.position = end
        assert end <= self.config.context_length, "the loop exceeded the context"
        step = min(end - self.prompt_len, len(self.script) - 1)
        logits = torch.zeros(idx.size(0), idx.size(1), self.config.vocab_size)
        logits[:, -1, self.script[step]] = 100.0
        return logits


@pytest.fixture(scope="module")
def tok():
    from src.tokenizer.bpe import BPETokenizer

    return BPETokenizer.train(["hello world, how are you? fine thanks. " * 5], vocab_size=280)


def test_stop_token_ends_the_row_and_is_not_in_the_output(tok):
    script = tok.encode("bcd") + [tok.eot_id] + tok.encode("zzz")
    m = ScriptModel(script, tok.vocab_size)
    [c] = generate(m, tok, [tok.eot_id], SamplingSettings(greedy=True), stop_ids=[tok.eot_id])
    assert (c.text, c.finish_reason) == ("bcd", "stop_token")
    assert c.ids == tok.encode("bcd")


def test_stop_string_cuts_the_text_and_never_streams_it(tok):
    m = ScriptModel([ord(ch) for ch in "one\n\ntwo"], tok.vocab_size)
    pieces = []
    [c] = generate(
        m,
        tok,
        [tok.eot_id],
        SamplingSettings(greedy=True, max_new_tokens=20),
        stop_strings=["\n\n"],
        on_text=lambda row, p: pieces.append(p),
    )
    assert (c.text, c.finish_reason) == ("one", "stop_string")
    assert "".join(pieces) == "one"


def test_max_new_tokens_and_streamed_pieces_are_whole_characters(tok):
    # "é" is two bytes (c3 a9) and reaches the decoder as two byte tokens.
    m = ScriptModel([0xC3, 0xA9, ord("!"), 0xE2, 0x82, 0xAC], tok.vocab_size)
    pieces = []
    [c] = generate(
        m,
        tok,
        [tok.eot_id],
        SamplingSettings(greedy=True, max_new_tokens=6),
        on_text=lambda row, p: pieces.append(p),
    )
    assert pieces == ["é", "!", "€"] and c.finish_reason == "length" and len(c.ids) == 6
    # Cut inside a character: the broken bytes are shown as U+FFFD at the end, not lost.
    [c] = generate(m, tok, [tok.eot_id], SamplingSettings(greedy=True, max_new_tokens=5))
    assert c.text == "é!\ufffd"


def test_ids_without_a_token_are_never_drawn(tok):
    # The script asks for a reserved special id that has no token: it must not come out.
    unassigned = max(tok.special_tokens.values()) + 1
    m = ScriptModel([unassigned], tok.vocab_size)
    [c] = generate(m, tok, [tok.eot_id], SamplingSettings(greedy=True, max_new_tokens=3))
    assert unassigned not in c.ids and len(c.ids) == 3
    # A model vocabulary larger than the tokenizer's: the extra ids have no text either.
    from src.infer.sampling import undecodable_ids

    bad = undecodable_ids(tok, tok.vocab_size + 5)
    assert unassigned in bad and bad[-5:] == list(range(tok.vocab_size, tok.vocab_size + 5))
    assert tok.eot_id not in bad and 0 not in bad


def test_context_stop_reason(tok):
    m = ScriptModel([ord("a")], tok.vocab_size, context_length=10)
    [c] = generate(m, tok, [tok.eot_id] * 6, SamplingSettings(greedy=True, max_new_tokens=50))
    assert c.finish_reason == "context" and c.text == "aaaaa"


# ---------------------------------------------------------------- the loop, on a real GPT


@pytest.fixture(scope="module")
def gpt():
    from src.model.gpt import GPT
    from src.training.presets import model_config

    torch.manual_seed(0)
    model = GPT(model_config("tiny", vocab_size=280, context_length=48))
    with torch.no_grad():  # larger weights: peaked distributions, no near-ties between tokens
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10)
    return model


def test_cache_gives_the_same_tokens_as_recomputing(gpt):
    s = SamplingSettings(max_new_tokens=30, greedy=True)
    with_cache = torch.stack(list(stream_ids(gpt, [1, 2, 3, 4], s, num_samples=2)))
    without = torch.stack(list(stream_ids(gpt, [1, 2, 3, 4], s, num_samples=2, use_cache=False)))
    assert torch.equal(with_cache, without)
    s = SamplingSettings(max_new_tokens=30, temperature=0.9, top_k=50, repetition_penalty=1.3)
    runs = [
        torch.stack(
            list(
                stream_ids(
                    gpt,
                    [5, 6],
                    s,
                    num_samples=3,
                    use_cache=c,
                    generator=torch.Generator().manual_seed(3),
                )
            )
        )
        for c in (True, False)
    ]
    assert torch.equal(*runs)


def test_sliding_window_matches_recomputing(gpt):
    # 48-token context, 40-token prompt, 40 new tokens: slides twice.
    s = SamplingSettings(max_new_tokens=40, greedy=True)
    prompt = list(range(10, 50))
    a = torch.stack(list(stream_ids(gpt, prompt, s, on_context_full="slide")))
    b = torch.stack(list(stream_ids(gpt, prompt, s, on_context_full="slide", use_cache=False)))
    assert torch.equal(a, b) and a.size(0) == 40


def test_same_seed_same_text_and_samples_of_a_batch_differ(gpt, tok):
    s = SamplingSettings(max_new_tokens=20, temperature=1.0)

    def run(seed, n=3):
        out = generate(
            gpt, tok, [tok.eot_id], s, num_samples=n, generator=torch.Generator().manual_seed(seed)
        )
        return [c.ids for c in out]

    first = run(123)
    assert run(123) == first
    assert run(124) != first
    assert len({tuple(ids) for ids in first}) == 3  # each row of the batch is its own sample


def test_printable_drops_terminal_control_characters():
    from src.utils.terminal import printable

    assert printable("a\x1b[31mb\x00\tc\r\n\x7f\x9bé€") == "a[31mb\tc\né€"


def test_grad_mode_does_not_leak_into_the_caller_between_steps():
    m = CountingModel()
    for _ in stream_ids(m, [1], SamplingSettings(max_new_tokens=3)):
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_top_p_fast_path_equals_the_full_sort():
    # Peaked rows (nucleus within the 256 likeliest) and a flat row (it needs a full sort).
    g = torch.Generator().manual_seed(0)
    peaked = torch.randn(3, 5000, generator=g) * 6
    flat = torch.randn(1, 5000, generator=g) * 0.01
    for logits in (peaked, torch.cat([peaked, flat])):
        for p in (0.5, 0.9, 0.99):
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            drop = torch.zeros_like(probs, dtype=torch.bool).scatter(
                -1, order, (probs.cumsum(-1) - probs) >= p
            )
            assert torch.equal(torch.isinf(apply_top_p(logits, p)), drop)


class FixedModel(torch.nn.Module):
    """The same next-token logits after any input."""

    def __init__(self, logits, context_length=32):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=len(logits), context_length=context_length)
        self.logits = torch.tensor(logits)
        self.w = torch.nn.Parameter(torch.zeros(1))

    def new_kv_cache(self, batch_size, max_length, device=None, dtype=None):
        return None  # the loop passes it back; this model needs none

    def forward(self, idx, cache=None):
        return self.logits.expand(idx.size(0), idx.size(1), -1)


def test_stop_tokens_are_exempt_from_the_repetition_penalty(tok):
    # The stop token (in the prompt) is likelier than "a"; penalised by 2 it would not be.
    logits = [0.0] * tok.vocab_size
    logits[tok.eot_id], logits[ord("a")] = 3.0, 2.0
    s = SamplingSettings(greedy=True, repetition_penalty=2.0, max_new_tokens=5)
    [c] = generate(FixedModel(logits), tok, [tok.eot_id], s, stop_ids=[tok.eot_id])
    assert c.finish_reason == "stop_token" and c.ids == []
    # Without the exemption (the bare loop) the penalty does apply to prompt tokens.
    ids = [t.item() for t in stream_ids(FixedModel(logits), [tok.eot_id], s)]
    assert ids[0] == ord("a")
