"""Known-answer tests of the sliding-window NLL, with tiny stand-in models of GPT's call signature."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src.eval.perplexity import (
    bits_per_byte,
    perplexity,
    sliding_window_nll,
    sliding_window_token_nll,
    sliding_windows,
)

VOCAB = 37


class UniformModel(torch.nn.Module):
    """Every next token equally likely: the NLL of any token is exactly ln(vocab)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.calls = 0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.zeros(*idx.shape, self.vocab)


class BigramModel(torch.nn.Module):
    """Logits depend only on the current token: no positional dependence at all."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx]


class PrefixBagModel(torch.nn.Module):
    """Causal and context-dependent: logits at position t are a function of the bag of tokens
    idx[0..t] and of t itself, so any error in which context a target gets changes the result."""

    def __init__(self, vocab: int, seed: int = 1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g))
        self.pos = torch.nn.Parameter(torch.randn(vocab, generator=g))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        bag = self.emb[idx].cumsum(dim=1)
        t = torch.arange(1, idx.size(1) + 1, dtype=bag.dtype).view(1, -1, 1)
        return bag / t + t * self.pos / 10


def brute_force_nll(model, tokens, contexts) -> float:
    """Score target p with exactly tokens[contexts[p]:p], one forward pass per target."""
    total = 0.0
    with torch.no_grad():
        for p in range(1, len(tokens)):
            ctx = torch.tensor(tokens[contexts[p] : p], dtype=torch.long).view(1, -1)
            logp = F.log_softmax(model(ctx)[0, -1].double(), dim=-1)
            total -= float(logp[int(tokens[p])])
    return total


def random_tokens(n: int, seed: int = 0, vocab: int = VOCAB) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=n).astype(np.uint16)


@pytest.mark.parametrize("n", [2, 3, 17, 64, 100])
@pytest.mark.parametrize("context,stride", [(1, 1), (8, 8), (8, 4), (8, 1), (8, 3), (16, 5)])
def test_windows_score_every_token_once_with_enough_context(n, context, stride):
    windows = list(sliding_windows(n, context, stride))
    scored = []
    for i, (start, end, first) in enumerate(windows):
        assert 0 <= start < end <= n - 1 and end - start <= context
        assert start < first <= end
        scored.extend(range(first, end + 1))
        # Every scored target has at least context - stride + 1 tokens of real context,
        # or all there is (the first window).
        min_context = first - start
        assert min_context >= context - stride + 1 or start == 0
        if i > 0:
            assert end - start == context  # later windows are full: batching needs no padding
    assert scored == list(range(1, n))


def test_too_short_streams_score_nothing():
    model = UniformModel(VOCAB)
    assert sliding_window_nll(model, np.array([], dtype=np.int64), 8, 4) == (0.0, 0)
    assert sliding_window_nll(model, np.array([5]), 8, 4) == (0.0, 0)
    assert model.calls == 0


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_uniform_model_has_perplexity_equal_to_vocab_size(stride):
    tokens = random_tokens(101)
    nll, count = sliding_window_nll(UniformModel(VOCAB), tokens, context_length=8, stride=stride, batch_size=3)
    assert count == 100
    # The log-softmax runs in float32 (as on real vocabularies), so "exactly" means to 1e-6.
    assert nll == pytest.approx(100 * math.log(VOCAB), rel=1e-6)
    assert perplexity(nll, count) == pytest.approx(VOCAB, rel=1e-6)
    # The word-level conversion: 100 tokens over 40 words -> V ** (100 / 40).
    assert perplexity(nll, 40) == pytest.approx(VOCAB ** (100 / 40), rel=1e-6)
    assert bits_per_byte(nll, 250) == pytest.approx(100 * math.log2(VOCAB) / 250, rel=1e-6)


def test_stride_and_batch_size_change_nothing_without_positional_dependence():
    model = BigramModel(VOCAB)
    tokens = random_tokens(203, seed=3)
    with torch.no_grad():
        logp = F.log_softmax(model.table.double(), dim=-1)
    expected = -sum(float(logp[tokens[p - 1], tokens[p]]) for p in range(1, len(tokens)))
    for context, stride, batch in [(16, 16, 1), (16, 8, 4), (16, 1, 64), (7, 3, 2), (1, 1, 5)]:
        nll, count = sliding_window_nll(model, tokens, context, stride, batch_size=batch)
        assert count == 202
        assert nll == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("context,stride", [(8, 1), (8, 3), (8, 8), (5, 2)])
def test_each_target_gets_the_documented_context(context, stride):
    model = PrefixBagModel(VOCAB)
    tokens = random_tokens(41, seed=5)
    contexts = {}
    for start, _end, first in sliding_windows(len(tokens), context, stride):
        for p in range(first, _end + 1):
            contexts[p] = start
    if stride == 1:  # every target sees the full context_length tokens before it
        assert all(contexts[p] == max(0, p - context) for p in contexts)
    expected = brute_force_nll(model, tokens, contexts)
    for batch in (1, 4):
        nll, count = sliding_window_nll(model, tokens, context, stride, batch_size=batch)
        assert count == 40
        assert nll == pytest.approx(expected, rel=1e-5)


def test_more_context_helps_a_model_that_uses_it():
    """A sanity check that context is real: disjoint chunks differ from overlapping windows."""
    model = PrefixBagModel(VOCAB)
    tokens = random_tokens(80, seed=6)
    a, _ = sliding_window_nll(model, tokens, 8, 8)
    b, _ = sliding_window_nll(model, tokens, 8, 1)
    assert a != pytest.approx(b, rel=1e-6)


def test_loss_mask_scores_only_selected_targets():
    model = BigramModel(VOCAB, seed=2)
    tokens = random_tokens(60, seed=7)
    mask = np.random.default_rng(8).random(60) < 0.4
    mask[0] = True  # the first token is never a target, whatever the mask says
    with torch.no_grad():
        logp = F.log_softmax(model.table.double(), dim=-1)
    per_token = [-float(logp[tokens[p - 1], tokens[p]]) for p in range(1, 60)]
    expected = sum(x for x, m in zip(per_token, mask[1:]) if m)
    nll, count = sliding_window_nll(model, tokens, 8, 3, batch_size=2, loss_mask=mask)
    assert count == int(mask[1:].sum())
    assert nll == pytest.approx(expected, rel=1e-6)
    assert sliding_window_nll(model, tokens, 8, 3, loss_mask=np.zeros(60, bool)) == (0.0, 0)
    # The per-token form gives the same numbers, one per target, in stream order.
    per = sliding_window_token_nll(model, tokens, 8, 3, batch_size=2)
    assert per.shape == (59,) and per.dtype == np.float64
    np.testing.assert_allclose(per, per_token, rtol=1e-6)
    with pytest.raises(ValueError, match="loss_mask"):
        sliding_window_nll(model, tokens, 8, 3, loss_mask=mask[:-1])


def test_restores_training_mode_and_builds_no_graph():
    model = BigramModel(VOCAB)
    model.train()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append((m.training, o.requires_grad)))
    sliding_window_nll(model, random_tokens(30), 8, 4)
    assert seen and all(training is False and not grad for training, grad in seen)
    assert model.training


def test_bf16_autocast_is_close_to_fp32():
    model = PrefixBagModel(VOCAB)
    tokens = random_tokens(50, seed=9)
    full, _ = sliding_window_nll(model, tokens, 8, 4)
    half, count = sliding_window_nll(model, tokens, 8, 4, autocast_dtype=torch.bfloat16)
    assert count == 49
    assert half == pytest.approx(full, rel=2e-2)


def test_bad_arguments_are_rejected():
    model = UniformModel(VOCAB)
    tokens = random_tokens(10)
    for context, stride in [(8, 0), (8, 9), (0, 1)]:
        with pytest.raises(ValueError):
            sliding_window_nll(model, tokens, context, stride)
    with pytest.raises(ValueError, match="batch_size"):
        sliding_window_nll(model, tokens, 8, 4, batch_size=0)
    with pytest.raises(ValueError, match="1-D"):
        sliding_window_nll(model, tokens.reshape(2, 5), 8, 4)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)
