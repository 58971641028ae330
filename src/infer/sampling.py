"""Sampling text from a GPT: logit processing, the KV-cached token loop, stops and streaming.

Three layers, each usable on its own:

1. ``process_logits`` / ``sample_next``: pure functions on a (B, vocab) logits tensor:
   repetition penalty -> temperature -> top-k -> top-p -> draw (or argmax when greedy);
   ``token_logprobs``: what the server reports of a drawn token (the raw distribution's).
2. ``stream_ids``: the token loop. It runs the prompt through the model once ("prefill")
   into a KV cache, then feeds one new token per step, so each step costs one token's
   attention instead of the whole sequence's. ``num_samples`` rows share the prompt and
   are sampled as one batch. ``use_cache=False`` recomputes the whole window every step:
   it exists only so tests and ``bench/generate.py`` can compare the two.
3. ``generate``: stop tokens, stop strings and streaming text on top of ``stream_ids``.
   Text is produced by the tokenizer's ``StreamingDecoder``, so a streamed piece never
   ends inside a UTF-8 character.

The context window. A model cannot look further back than ``context_length`` tokens.
``on_context_full`` says what happens when the prompt plus the generated tokens reach it:

* ``"stop"`` (chat): generation ends with ``finish_reason == "context"``; a prompt longer
  than the context is a ``ValueError`` (the chat session fits its prompt beforehand).
* ``"slide"`` (generate.py): the window slides forward. The oldest quarter of the context
  is forgotten and the most recent three quarters are run through the model again (one
  prefill every ``context_length // 4`` tokens, so the cache's speed is kept); a prompt
  longer than the context keeps its last ``context_length`` tokens. Both are announced
  once through ``notice``.

Reproducibility: every draw comes from the ``torch.Generator`` passed in, so the same
seed, settings, prompt and ``num_samples`` give the same tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

ContextPolicy = Literal["stop", "slide"]


@dataclass(frozen=True)
class SamplingSettings:
    """How to choose each next token. Invalid values raise ``ValueError`` naming the value.

    ``temperature == 0`` or ``greedy=True`` picks the most likely token every step (then
    top-k, top-p and the seed have no effect). ``top_k=None``/``0`` and ``top_p=1.0``
    disable those filters; ``repetition_penalty=1.0`` disables the penalty.
    ``frequency_penalty`` and ``presence_penalty`` (OpenAI's, in [-2, 2], 0 = off) lower
    the logits of tokens already generated (see ``apply_frequency_presence_penalties``).
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    greedy: bool = False
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < 1
        ):
            raise ValueError(
                f"max_new_tokens must be a whole number >= 1, got {self.max_new_tokens!r}"
            )
        if not (0.0 <= self.temperature <= 100.0):  # also rejects NaN
            raise ValueError(f"temperature must be between 0 and 100, got {self.temperature!r}")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0
        ):
            raise ValueError(f"top_k must be a whole number >= 0 (0 = off), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (0.0 < self.repetition_penalty <= 100.0):
            raise ValueError(
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}"
            )
        for name in ("frequency_penalty", "presence_penalty"):
            if not (-2.0 <= getattr(self, name) <= 2.0):
                raise ValueError(f"{name} must be between -2 and 2, got {getattr(self, name)!r}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0


# The defaults of the commands, in one place (argparse defaults, the chat session, the
# sample printed after training all read them). A little below 1: fewer unlikely tokens.
DEFAULT_TEMPERATURE = 0.8
# chat.py and ChatSession: a slightly tighter nucleus keeps replies on topic.
CHAT_DEFAULTS = SamplingSettings(max_new_tokens=200, temperature=DEFAULT_TEMPERATURE, top_p=0.9)
# src/infer/generate.py: continuing a document.
TEXT_DEFAULTS = SamplingSettings(max_new_tokens=200, temperature=DEFAULT_TEMPERATURE, top_p=0.95)


def rename_setting_in_error(error: ValueError, rename: Callable[[str], str]) -> str:
    """The message of a SamplingSettings ``ValueError`` (which starts with the field's name,
    e.g. "top_p must be in (0, 1], got 7.0") with that name replaced by ``rename(field)``,
    e.g. the command-line flag "--top-p" or the chat command "/top_p"."""
    message = str(error)
    field_name = message.split(" ", 1)[0]
    return rename(field_name) + message[len(field_name) :]


# ----------------------------------------------------------------------------------------
# 1. Logit processing: pure functions on (B, vocab) tensors.


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """The CTRL penalty (Keskar et al., 2019), as in Hugging Face: for every token already in
    the row (prompt or generated; ``seen`` is a (B, vocab) bool mask), a positive logit is
    divided by ``penalty`` and a negative one multiplied, so ``penalty > 1`` always makes
    the token less likely (dividing a negative logit would make it *more* likely)."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_frequency_presence_penalties(
    logits: torch.Tensor, counts: torch.Tensor, frequency: float, presence: float
) -> torch.Tensor:
    """OpenAI's penalties: ``counts`` (B, vocab) holds how often each token was generated so
    far (the prompt does not count, as in OpenAI's and vLLM's); each logit is lowered by
    ``frequency * count + presence * (count > 0)``. Negative values encourage repeats."""
    if frequency == 0.0 and presence == 0.0:
        return logits
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def apply_top_k(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (ties with the k-th are kept too)."""
    if not k or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al., 2020): keep the smallest set of most likely tokens
    whose probabilities sum to at least ``p``. The most likely token is always kept."""
    if p >= 1.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    # Sorting the whole vocabulary is most of the cost of a sampling step. The nucleus
    # usually lies within the few hundred likeliest tokens: when they already reach p in
    # every row, sorting them (topk) gives the same answer; otherwise sort everything.
    probs_sorted, order = torch.topk(probs, min(_NUCLEUS_GUESS, probs.size(-1)), dim=-1)
    if probs_sorted.sum(dim=-1).min() < p:
        probs_sorted, order = torch.sort(probs, dim=-1, descending=True)
    # A token is dropped when the tokens ranked above it already reach p; so is every token
    # outside the candidates (their rank is lower still).
    keep_sorted = (torch.cumsum(probs_sorted, dim=-1) - probs_sorted) < p
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


_NUCLEUS_GUESS = 256


def process_logits(
    logits: torch.Tensor,
    settings: SamplingSettings,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Repetition penalty, frequency/presence penalties (given ``counts``), temperature,
    top-k, top-p: the distribution a token is drawn from (as logits; ``-inf`` marks removed
    tokens). Computed in float32."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
    if counts is not None:
        logits = apply_frequency_presence_penalties(
            logits, counts, settings.frequency_penalty, settings.presence_penalty
        )
    if settings.is_greedy:
        return logits
    logits = logits / settings.temperature
    logits = apply_top_k(logits, settings.top_k)
    return apply_top_p(logits, settings.top_p)


def sample_next(
    logits: torch.Tensor,
    settings: SamplingSettings,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token id per row of ``logits`` (B, vocab) -> (B,) long tensor."""
    logits = process_logits(logits, settings, seen, counts)
    if settings.is_greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def token_logprobs(
    logits: torch.Tensor, chosen: torch.Tensor, top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under the model's own distribution, ``log_softmax(logits)`` of the
    raw logits (before penalties, temperature, top-k and top-p, as vLLM's and llama.cpp's
    servers report them): for each row of ``logits`` (B, vocab), the ``chosen`` (B,) token's
    log-probability (B,), and the ``top`` most likely tokens' log-probabilities and ids
    (B, top), most likely first. Computed in float32."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen_logprobs = logprobs.gather(-1, chosen[:, None]).squeeze(-1)
    top_logprobs, top_ids = torch.topk(logprobs, min(top, logprobs.size(-1)), dim=-1)
    return chosen_logprobs, top_logprobs, top_ids


# ----------------------------------------------------------------------------------------
# 2. The token loop.


def context_length_of(model: torch.nn.Module) -> int:
    """The model's context window in tokens."""
    return int(model.config.context_length)


def stream_ids(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    settings: SamplingSettings,
    *,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    on_context_full: ContextPolicy = "stop",
    notice: Callable[[str], None] | None = None,
    banned_ids: Sequence[int] = (),
    unpenalised_ids: Sequence[int] = (),
    banned_after: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the sampled next tokens, one (num_samples,) long tensor per step on the CPU, at
    most ``settings.max_new_tokens`` steps. Fewer steps are yielded only when the context
    is full under ``on_context_full="stop"``. Stop tokens are the caller's business: it
    simply stops iterating. ``banned_ids`` are never drawn; ``banned_after(seq)`` (B, vocab)
    bans more, given the sequences so far (:class:`TextBan`); ``unpenalised_ids`` are exempt
    from the repetition penalty. The model is in eval mode while this runs, then restored.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not prompt_ids:
        raise ValueError("the prompt must have at least one token (e.g. <|endoftext|>)")
    ctx = context_length_of(model)
    if len(prompt_ids) > ctx:
        if on_context_full == "stop":
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context is {ctx}")
        if notice:
            notice(f"the prompt has {len(prompt_ids)} tokens; keeping its last {ctx} (the context)")
        prompt_ids = prompt_ids[-ctx:]
    keep = max(1, ctx - ctx // 4)  # what a slide keeps (see the module docstring)

    device = next(model.parameters()).device
    seq = torch.tensor([list(prompt_ids)] * num_samples, dtype=torch.long, device=device)
    vocab = model.config.vocab_size
    ban = None
    if banned_ids:
        ban = torch.zeros(vocab, dtype=torch.bool, device=device)
        ban[torch.tensor(list(banned_ids), dtype=torch.long, device=device)] = True
    seen = None
    if settings.repetition_penalty != 1.0:
        seen = torch.zeros(num_samples, vocab, dtype=torch.bool, device=device)
        exempt = torch.tensor(list(unpenalised_ids), dtype=torch.long, device=device)
        seen[:, seq[0]] = True
        seen[:, exempt] = False
    counts = None
    if settings.frequency_penalty or settings.presence_penalty:
        counts = torch.zeros(num_samples, vocab, device=device)

    was_training = model.training
    model.eval()
    # inference_mode is entered per step, never held across a ``yield``: it is thread-wide
    # state and would otherwise leak into the caller's code between steps.
    no_grad = torch.inference_mode
    try:
        with no_grad():
            cache = model.new_kv_cache(num_samples, ctx, device=device) if use_cache else None
            logits = model(seq, cache=cache) if use_cache else model(seq)
        slid = False
        for step in range(settings.max_new_tokens):
            with no_grad():
                last = logits[:, -1]
                if ban is not None:
                    last = last.masked_fill(ban, float("-inf"))
                if banned_after is not None:
                    last = last.masked_fill(banned_after(seq), float("-inf"))
                nxt = sample_next(last, settings, generator, seen, counts)
                if counts is not None:
                    counts[torch.arange(num_samples, device=device), nxt] += 1
                if seen is not None:
                    seen[torch.arange(num_samples, device=device), nxt] = True
                    seen[:, exempt] = False
            yield nxt.cpu()
            if step == settings.max_new_tokens - 1:
                break  # no forward pass for a token nobody will draw
            with no_grad():
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                if seq.size(1) > ctx:  # the new token does not fit in the window
                    if on_context_full == "stop":
                        if notice:
                            notice(f"stopped: the context of {ctx} tokens is full")
                        return
                    if notice and not slid:
                        notice(f"the text passed the context of {ctx} tokens; sliding the window")
                    slid = True
                    seq = seq[:, -keep:]
                    if cache is not None:
                        cache.reset()
                        logits = model(seq, cache=cache)
                        continue
                if cache is not None:
                    logits = model(seq[:, -1:], cache=cache)
                else:
                    logits = model(seq)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------
# 3. Stops and streaming text.


def undecodable_ids(tokenizer, vocab_size: int) -> list[int]:
    """Ids below ``vocab_size`` that are no token of ``tokenizer`` (reserved special ids with
    nothing assigned, or a model vocabulary larger than the tokenizer's): a model with
    untrained or random weights could draw them, and they have no text."""
    known = min(vocab_size, tokenizer.vocab_size)
    bad = []
    for i in range(known):
        try:
            tokenizer.token_bytes(i)
        except ValueError:
            bad.append(i)
    return bad + list(range(known, vocab_size))


# WikiText's tokenised release replaces rare words by "<unk>"; a model trained on it learns to
# write it, and it is no word a reader wants to see. Generation bans its stem: after " <" the
# model cannot go on with "unk", so neither "<unk>" nor a stray "<unk..." is ever written
# (nothing natural starts so). Evaluation is unaffected: it scores text, it does not sample.
UNKNOWN_WORD = "<unk"


def hidden_special_ids(tokenizer) -> list[int]:
    """The special tokens plain text generation never draws: all but <|endoftext|> (the chat
    markers; <|endoftext|> ends the text instead)."""
    return sorted(i for i in tokenizer.special_tokens.values() if i != tokenizer.eot_id)


class TextBan:
    """Keeps a text (``<unk>``) from ever being written, whatever pieces it would be made of:
    the tokenizer splits it into several (``" <"``, ``"unk"``, ``">"``). For each way the
    sequence can end in a start of the text (``""``, ``"<"``, ``"<u"``, ...), the tokens that
    would complete it are found once; each step bans those of the state each row is in.
    Call it with the (B, L) sequences so far: returns the (B, vocab) mask of banned ids."""

    def __init__(self, tokenizer, text: str, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.text = text.encode("utf-8")
        self.prefixes = [self.text[:k] for k in range(len(self.text))]  # "", "<", "<u", ...
        pieces = []
        for i in range(vocab_size):
            try:
                pieces.append(tokenizer.token_bytes(i))
            except ValueError:  # a reserved id with no token (banned anyway)
                pieces.append(b"")
        self.masks = torch.tensor([[self.text in prefix + piece for piece in pieces]
                                   for prefix in self.prefixes], dtype=torch.bool)

    def _state(self, ids: list[int]) -> int:
        """How much of the text the sequence ends with (the longest such proper prefix)."""
        tail = b"".join(self.tokenizer.token_bytes(i) for i in ids)[-len(self.text):]
        return max(k for k, prefix in enumerate(self.prefixes) if tail.endswith(prefix))

    def __call__(self, seq: torch.Tensor) -> torch.Tensor:
        # Each token is at least one byte: the last len(text) tokens hold any partial match.
        tails = seq[:, -len(self.text):].tolist()
        states = torch.tensor([self._state(ids) for ids in tails], dtype=torch.long)
        return self.masks[states].to(seq.device)


class StopStringFilter:
    """Passes streamed text through until one of ``stops`` appears, and never lets out a
    stop string or any part of one: text that could be the start of a stop string is
    held back until the next piece decides it."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add streamed text; return what can be shown now. Sets ``stopped`` on a match."""
        if self.stopped:
            return ""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        # Hold back the longest tail that is a prefix of some stop string.
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        """The text held back, at the end of generation (it turned out not to be a stop)."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


FinishReason = Literal["stop_token", "stop_string", "length", "context"]


@dataclass
class Completion:
    """One sample: its ids (without the stop token), its text (without the stop string)
    and why it ended."""

    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason = "length"


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: Sequence[int],
    settings: SamplingSettings,
    *,
    num_samples: int = 1,
    stop_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    on_context_full: ContextPolicy = "stop",
    on_text: Callable[[int, str], None] | None = None,
    notice: Callable[[str], None] | None = None,
    banned_ids: Sequence[int] = (),
    banned_text: str | None = None,
) -> list[Completion]:
    """Sample ``num_samples`` continuations of ``prompt_ids``; ``banned_ids`` are never drawn
    (nor are ids with no text, :func:`undecodable_ids`), and ``banned_text`` is never written
    (:class:`TextBan`).

    A row ends at the first of: a token in ``stop_ids`` (not included), a stop string in
    its decoded text (the text is cut before it), ``settings.max_new_tokens``, or the
    context (``on_context_full``). ``on_text(row, piece)`` receives the text as it is
    decoded, whole characters only and never any part of a stop string; the pieces of a
    row concatenate to its ``Completion.text``. A ``KeyboardInterrupt`` raised inside (or
    by) ``on_text`` propagates; what was streamed so far is what the caller has seen.
    """
    from src.tokenizer.bpe import StreamingDecoder  # the tokenizer's decoder: whole characters only

    stop_set = set(stop_ids)
    done = [Completion() for _ in range(num_samples)]
    decoders = [StreamingDecoder(tokenizer) for _ in range(num_samples)]
    filters = [StopStringFilter(stop_strings) for _ in range(num_samples)]
    active = [True] * num_samples

    def emit(row: int, piece: str) -> None:
        if piece:
            done[row].text += piece
            if on_text:
                on_text(row, piece)

    def finish(row: int, reason: FinishReason) -> None:
        active[row] = False
        done[row].finish_reason = reason
        if reason != "stop_string":
            # Show the rest: bytes of an unfinished character, text held back for stop strings.
            emit(row, filters[row].feed(decoders[row].flush()) + filters[row].flush())
            if filters[row].stopped:
                done[row].finish_reason = "stop_string"

    steps = stream_ids(
        model,
        prompt_ids,
        settings,
        num_samples=num_samples,
        generator=generator,
        use_cache=use_cache,
        on_context_full=on_context_full,
        notice=notice,
        banned_ids=[*undecodable_ids(tokenizer, model.config.vocab_size), *banned_ids],
        banned_after=TextBan(tokenizer, banned_text, model.config.vocab_size) if banned_text else None,
        # A stop token is in every chat prompt; penalising it would make replies run on.
        unpenalised_ids=list(stop_set),
    )
    n_steps = 0
    with contextlib.closing(steps):
        for tokens in steps:
            n_steps += 1
            for row, tok in enumerate(tokens.tolist()):
                if not active[row]:
                    continue
                if tok in stop_set:
                    finish(row, "stop_token")
                    continue
                done[row].ids.append(tok)
                emit(row, filters[row].feed(decoders[row].feed(tok)))
                if filters[row].stopped:
                    finish(row, "stop_string")
            if not any(active):
                break
    for row in range(num_samples):
        if active[row]:
            finish(row, "length" if n_steps == settings.max_new_tokens else "context")
    return done
