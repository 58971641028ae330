"""Continuous batching: many generation requests share the model's forward passes.

The engine holds ``max_batch`` slots of a ``SlotKVCache`` (one per sequence being generated)
and a queue of waiting requests. Each ``step``:

1. retires cancelled requests (a client that went away frees its slot here, within a step);
2. admits waiting requests into free slots: their prompts are run through the model
   together ("prefill", interleaved between decode steps) and their first tokens sampled;
3. runs ONE batched forward pass that feeds every active sequence its newest token, each
   at its own position, and samples each sequence's next token.

A sequence ends at a stop token, a stop string or ``max_new_tokens``; its slot is free for
the next waiting request in the same step. Text goes out through the request's callback,
decoded by the tokenizer's ``StreamingDecoder`` (a piece never ends inside a UTF-8
character) and held back by a ``StopStringFilter`` (never any part of a stop string).

Log-probabilities. A request with ``logprobs`` set also gets, for every generated token,
its log-probability and the most likely alternatives under the model's raw distribution
(``sampling.token_logprobs``), computed in the same step for those rows only: a batch in
which nobody asks pays nothing.

Isolation. Every request samples with its own settings (the sampler's ``process_logits``,
batched over the rows that share settings) and its own ``torch.Generator`` (seeded from its
``seed``): each draw is one uniform number from the request's generator. So a request with
a seed gives the same text alone or in a full batch (up to floating-point differences
between batch shapes, which do not change a draw in practice).

The engine is a library: no HTTP here. ``start()`` runs ``step`` in a background thread
(``submit`` from any thread); without it, call ``step`` yourself. ``generate`` is the
one-call synchronous form. ``call(fn)`` runs other work with the engine's model (e.g. the
attention maps of a text) in the engine's thread between two steps, so it never runs a
forward pass at the same time as a step (``record_attention`` changes the model while on).
"""

from __future__ import annotations

import threading
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

import torch

from src.infer.sampling import (
    SamplingSettings,
    StopStringFilter,
    process_logits,
    token_logprobs,
    undecodable_ids,
)
from src.tokenizer.bpe import StreamingDecoder

FinishReason = Literal["stop", "length", "shutdown", "error"]


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate. ``stop_ids`` end it (not included in the text); so does a
    stop string (the text is cut before it). ``seed=None`` draws a random seed."""

    prompt_ids: Sequence[int]
    settings: SamplingSettings
    seed: int | None = None
    stop_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    # None: no log-probabilities; k >= 0: each generated token's, with the k likeliest.
    logprobs: int | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token, its log-probability under the model's raw distribution, and the
    ``top`` alternatives at its position as (token, log-probability), most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Update:
    """What one step produced for a request: new ``text`` (may be empty on the last update),
    the number of tokens generated so far, and on the last update why it ended: "stop" (a
    stop token or string), "length" (``max_new_tokens``), "shutdown" (the engine stopped)
    or "error" (the step failed; the error is printed to stderr and the engine goes on).

    With ``GenerationRequest.logprobs``: ``logprobs`` holds the tokens generated since the
    previous update (a stop token is not one: it has no text). Their bytes may run ahead of
    ``text``: a character split over tokens comes out with its last token, text that could
    begin a stop string is held back, and the token that completes a stop string is
    reported though its text is cut."""

    text: str
    completion_tokens: int
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


class QueueFullError(RuntimeError):
    """Raised by ``submit`` when the waiting queue has no room for the requests."""


class RequestHandle:
    """Lets the submitter cancel a request: it gets no more updates and its slot is freed at
    the engine's next step."""

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Sequence:
    """A request being generated (engine-internal state)."""

    request: GenerationRequest
    handle: RequestHandle
    on_update: Callable[[Update], None]
    generator: torch.Generator
    decoder: StreamingDecoder
    stops: StopStringFilter
    seen: torch.Tensor | None = None  # (1, vocab) bool, for the repetition penalty
    counts: torch.Tensor | None = None  # (1, vocab), for frequency/presence penalties
    slot: int = -1
    last_token: int = -1
    generated: int = 0
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet in an Update


@dataclass
class Result:
    """A finished generation (from ``Engine.generate``)."""

    text: str
    finish_reason: FinishReason
    completion_tokens: int
    pieces: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # if the request asked


class Engine:
    """Continuous-batching text generation with one model (see the module docstring).

    ``max_batch`` sequences are decoded together; up to ``max_queue`` more wait for a slot.
    A prompt plus its ``max_new_tokens`` must fit in the model's context.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_batch: int = 8,
                 max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"need max_batch >= 1 and max_queue >= 0, got {max_batch}, "
                             f"{max_queue}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context_length = int(model.config.context_length)
        self.device = next(model.parameters()).device
        self.cache = model.new_slot_kv_cache(max_batch)
        vocab = model.config.vocab_size
        # Ids that are no token (unassigned reserved ids): an untrained model could draw them.
        self._banned = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        self._banned[undecodable_ids(tokenizer, vocab)] = True
        self._free_slots = list(range(max_batch - 1, -1, -1))  # pop() gives slot 0 first
        self._active: dict[int, _Sequence] = {}  # slot -> sequence; engine thread only
        self._waiting: deque[_Sequence] = deque()  # guarded by _cond
        self._calls: deque[tuple[Callable[[], object], Future]] = deque()  # guarded by _cond
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------ submitting

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """ValueError unless a prompt of that length plus that many new tokens fits the
        context (and the prompt is not empty)."""
        if prompt_tokens < 1:
            raise ValueError("the prompt must have at least one token")
        if prompt_tokens + max_new_tokens > self.context_length:
            raise ValueError(
                f"the context is {self.context_length} tokens, but {prompt_tokens + max_new_tokens}"
                f" were requested ({prompt_tokens} in the prompt, {max_new_tokens} to generate)")

    def submit(self, requests: Sequence[GenerationRequest],
               on_update: Callable[[int, Update], None]) -> list[RequestHandle]:
        """Queue ``requests`` (all or none); ``on_update(i, update)`` then receives request
        i's updates, from the engine's thread: it must be quick and must not block. Raises
        ``QueueFullError`` when they do not fit in the queue, ``ValueError`` for a request
        that does not fit the context, ``RuntimeError`` once the engine is shut down."""
        for r in requests:
            self.check_fits(len(r.prompt_ids), r.settings.max_new_tokens)
            if r.logprobs is not None and not 0 <= r.logprobs <= self.model.config.vocab_size:
                raise ValueError(f"logprobs must be between 0 and the vocabulary size, got "
                                 f"{r.logprobs}")
        sequences = [self._new_sequence(r, i, on_update) for i, r in enumerate(requests)]
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is shut down")
            if len(self._waiting) + len(sequences) > self.max_queue + self._idle_slots():
                raise QueueFullError(f"the queue is full ({self.max_queue} waiting requests)")
            self._waiting.extend(sequences)
            self._cond.notify()
        return [s.handle for s in sequences]

    def call(self, fn: Callable[[], object]) -> Future:
        """Run ``fn()`` in the engine's thread before its next step (or here, at once, when
        the engine has no thread) and return a Future of its result or exception. Meant for
        short work with ``self.model`` (one forward pass): decoding waits while it runs.
        Raises RuntimeError once the engine is shut down."""
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is shut down")
            if self._thread is not None:
                self._calls.append((fn, future))
                self._cond.notify()
                return future
        _run_call(fn, future)
        return future

    def _idle_slots(self) -> int:
        # Requests that will get a slot at the next step do not really wait. Read without
        # the engine thread's lock: at worst one step stale, which only shifts the limit.
        return len(self._free_slots)

    def _new_sequence(self, request: GenerationRequest, index: int,
                      on_update: Callable[[int, Update], None]) -> _Sequence:
        generator = torch.Generator(device=self.device)
        if request.seed is None:
            generator.seed()
        else:
            generator.manual_seed(request.seed)
        vocab = self.model.config.vocab_size
        settings = request.settings
        seq = _Sequence(
            request=request, handle=RequestHandle(),
            on_update=lambda update: on_update(index, update), generator=generator,
            decoder=StreamingDecoder(self.tokenizer), stops=StopStringFilter(request.stop_strings))
        if settings.repetition_penalty != 1.0:
            seq.seen = torch.zeros(1, vocab, dtype=torch.bool, device=self.device)
            seq.seen[0, list(request.prompt_ids)] = True
            # A stop token is in every chat prompt; penalising it would make replies run on.
            seq.seen[0, list(request.stop_ids)] = False
        if settings.frequency_penalty or settings.presence_penalty:
            seq.counts = torch.zeros(1, vocab, device=self.device)
        return seq

    # ------------------------------------------------------------------ one step

    @torch.inference_mode()
    def step(self) -> bool:
        """Retire cancelled requests, admit waiting ones (prefill), then one batched decode
        step. Returns False when there was nothing to do."""
        for slot in [s for s, seq in self._active.items() if seq.handle.cancelled]:
            self._release(self._active.pop(slot))
        admitted = []
        with self._cond:
            while self._waiting and self._free_slots:
                seq = self._waiting.popleft()
                if not seq.handle.cancelled:
                    seq.slot = self._free_slots.pop()
                    admitted.append(seq)
        if not admitted and not self._active:
            return False
        if admitted:
            self._prefill(admitted)
        if self._active:
            slots = sorted(self._active)
            seqs = [self._active[s] for s in slots]
            last = torch.tensor([[seq.last_token] for seq in seqs], device=self.device)
            logits = self.model(last, cache=self.cache, slots=self._slots(slots))
            for seq, token, logprob in zip(seqs, *self._sample(seqs, logits[:, -1])):
                self._advance(seq, token, logprob)
        return True

    def _prefill(self, seqs: list[_Sequence]) -> None:
        """Run the prompts of newly admitted sequences through the model in one pass, and
        sample each one's first token. Prompts are padded on the right to the longest: a
        prompt's own tokens never see its padding (attention is causal), and the padding's
        keys are forgotten by setting each slot's length to its prompt's."""
        for seq in seqs:
            self._active[seq.slot] = seq
        lengths = [len(seq.request.prompt_ids) for seq in seqs]
        ids = torch.zeros(len(seqs), max(lengths), dtype=torch.long, device=self.device)
        for row, seq in enumerate(seqs):
            ids[row, :lengths[row]] = torch.tensor(list(seq.request.prompt_ids))
        slots = self._slots([seq.slot for seq in seqs])
        logits = self.model(ids, cache=self.cache, slots=slots)
        last = torch.tensor(lengths, device=self.device)
        self.cache.lengths[slots] = last
        first = self._sample(seqs, logits[torch.arange(len(seqs), device=self.device), last - 1])
        for seq, token, logprob in zip(seqs, *first):
            self._advance(seq, token, logprob)

    def _slots(self, slots: list[int]) -> torch.Tensor:
        return torch.tensor(slots, dtype=torch.long, device=self.device)

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor
                ) -> tuple[list[int], list[TokenLogprob | None]]:
        """The next token of each sequence from its row of ``logits`` (len(seqs), vocab),
        and its log-probability for the sequences whose request asks (else None).

        Rows with equal settings go through ``process_logits`` together (one batched call),
        but each row's draw is one uniform number from its own generator, turned into a
        token through the row's cumulative distribution: no draw depends on another row.
        """
        logits = logits.masked_fill(self._banned, float("-inf"))
        tokens = [0] * len(seqs)
        groups: dict[SamplingSettings, list[int]] = {}
        for row, seq in enumerate(seqs):
            groups.setdefault(seq.request.settings, []).append(row)
        for settings, rows in groups.items():
            seen = counts = None
            if settings.repetition_penalty != 1.0:
                seen = torch.cat([seqs[r].seen for r in rows])
            if settings.frequency_penalty or settings.presence_penalty:
                counts = torch.cat([seqs[r].counts for r in rows])
            group = logits[torch.tensor(rows, device=self.device)]
            processed = process_logits(group, settings, seen, counts)
            if settings.is_greedy:
                chosen = processed.argmax(dim=-1)
            else:
                cdf = torch.softmax(processed, dim=-1).cumsum(dim=-1)
                # 1 - U is in (0, 1]: the first token whose cdf reaches it has probability > 0.
                u = torch.stack([1 - torch.rand((), generator=seqs[r].generator,
                                                device=self.device) for r in rows])
                chosen = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(-1)
            for row, token in zip(rows, chosen.tolist()):
                tokens[row] = token
        return tokens, self._logprobs(seqs, logits, tokens)

    def _logprobs(self, seqs: list[_Sequence], logits: torch.Tensor,
                  tokens: list[int]) -> list[TokenLogprob | None]:
        """The chosen tokens' log-probabilities and alternatives, for the rows that ask; one
        batched computation (the banned ids, no tokens, have probability 0)."""
        records: list[TokenLogprob | None] = [None] * len(seqs)
        rows = [r for r, seq in enumerate(seqs) if seq.request.logprobs is not None]
        if not rows:
            return records
        most = max(seqs[r].request.logprobs for r in rows)
        index = torch.tensor(rows, device=self.device)
        chosen = torch.tensor([tokens[r] for r in rows], device=self.device)
        chosen_lp, top_lp, top_ids = token_logprobs(logits[index], chosen, most)
        for row, lp, top_lps, ids in zip(rows, chosen_lp.tolist(), top_lp.tolist(),
                                         top_ids.tolist()):
            k = seqs[row].request.logprobs
            # An id that is no token (-inf) is no alternative, even when k exceeds the tokens.
            alternatives = tuple((t, p) for t, p in zip(ids[:k], top_lps[:k])
                                 if p != float("-inf"))
            records[row] = TokenLogprob(tokens[row], lp, alternatives)
        return records

    def _advance(self, seq: _Sequence, token: int, logprob: TokenLogprob | None) -> None:
        """Take the sequence's next token: stream its text, retire it if it has ended."""
        if seq.handle.cancelled:
            self._release(self._active.pop(seq.slot))
            return
        settings = seq.request.settings
        seq.generated += 1
        if seq.seen is not None and token not in seq.request.stop_ids:
            seq.seen[0, token] = True
        if seq.counts is not None:
            seq.counts[0, token] += 1
        if token in seq.request.stop_ids:
            self._finish(seq, "stop")
            return
        seq.last_token = token
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        text = seq.stops.feed(seq.decoder.feed(token))
        if seq.stops.stopped:
            self._finish(seq, "stop", text)
        elif seq.generated == settings.max_new_tokens:
            self._finish(seq, "length", text)
        elif text:
            self._emit(seq, text)

    def _finish(self, seq: _Sequence, reason: FinishReason, text: str = "") -> None:
        if not seq.stops.stopped:  # the rest: an unfinished character, held-back text
            text += seq.stops.feed(seq.decoder.flush())
            text += seq.stops.flush()
            if seq.stops.stopped:
                reason = "stop"
        self._emit(seq, text, reason)
        self._release(self._active.pop(seq.slot))

    def _emit(self, seq: _Sequence, text: str, reason: FinishReason | None = None) -> None:
        """Send an update with ``text`` and the log-probabilities gathered since the last."""
        update = Update(text, seq.generated, reason, tuple(seq.pending_logprobs))
        seq.pending_logprobs.clear()
        try:
            seq.on_update(update)
        except Exception:  # noqa: BLE001 - a failing consumer must not stop the others
            seq.handle.cancel()

    def _release(self, seq: _Sequence) -> None:
        self.cache.free(seq.slot)
        self._free_slots.append(seq.slot)

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        """Run ``step`` in a background thread until ``shutdown``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while (not self._stopping and not self._waiting and not self._active
                       and not self._calls):
                    self._cond.wait()
                if self._stopping:
                    break
                calls, self._calls = list(self._calls), deque()
            for fn, future in calls:
                _run_call(fn, future)
            try:
                self.step()
            except Exception:  # noqa: BLE001 - one failed step must not hang every client
                traceback.print_exc()
                self._end_all("error", waiting_too=False)
        self._end_all("shutdown")

    def _end_all(self, reason: FinishReason, waiting_too: bool = True) -> None:
        """Give every active (and waiting) request its last update with ``reason``."""
        waiting = []
        if waiting_too:
            with self._cond:
                waiting, self._waiting = list(self._waiting), deque()
                calls, self._calls = list(self._calls), deque()
            for _, future in calls:
                future.set_exception(RuntimeError("the engine is shut down"))
        for seq in [*self._active.values(), *waiting]:
            if not seq.handle.cancelled:
                text = seq.stops.feed(seq.decoder.flush()) + seq.stops.flush()
                self._emit(seq, text, reason)
        for slot in list(self._active):
            self._release(self._active.pop(slot))

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop: every request still running or waiting gets a last update with
        ``finish_reason="shutdown"``; later ``submit`` calls raise RuntimeError."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self._end_all("shutdown")

    @property
    def stopping(self) -> bool:
        """True once ``shutdown`` was called."""
        return self._stopping

    @property
    def load(self) -> tuple[int, int]:
        """(sequences being generated, requests waiting), for health reports."""
        return len(self._active), len(self._waiting)

    def generate(self, request: GenerationRequest,
                 on_text: Callable[[str], None] | None = None) -> Result:
        """Generate one request to the end and return it; ``on_text`` gets the text as it is
        decoded. Uses the background thread if started, else steps the engine here."""
        result = Result("", "length", 0)
        finished = threading.Event()

        def collect(_: int, update: Update) -> None:
            if update.text:
                result.pieces.append(update.text)
                if on_text:
                    on_text(update.text)
            result.logprobs.extend(update.logprobs)
            result.completion_tokens = update.completion_tokens
            if update.finish_reason:
                result.finish_reason = update.finish_reason
                finished.set()

        [handle] = self.submit([request], collect)
        try:
            while not finished.is_set():
                if self._thread is None:
                    self.step()
                else:
                    finished.wait(0.1)
        finally:
            if not finished.is_set():
                handle.cancel()
        result.text = "".join(result.pieces)
        return result


def _run_call(fn: Callable[[], object], future: Future) -> None:
    """``fn()``'s result or exception into ``future`` (``Engine.call``)."""
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except Exception as exc:  # noqa: BLE001 - the caller gets it through the future
        future.set_exception(exc)
