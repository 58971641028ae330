"""See inside the model: the tokens of a text, every layer's attention weights, and the
probabilities behind each token.

* ``attention_maps(model, tokenizer, text=... | messages=...)`` runs the text once through the
  model with ``record_attention`` (the same model code that trains and generates, its
  attention computed explicitly so the softmax weights can be kept) and returns the tokens,
  the weights ``[layer][head][query][key]`` and the top 20 next tokens after the last position.
* ``logprobs_from_logits`` turns one sampling step's processed logits into each chosen
  token's log-probability and its top alternatives (a server calls it as it samples);
  ``sequence_logprobs`` does the same for a sequence already generated, with one forward pass.

A token is described honestly as its bytes (``token_info``): ``text`` is those bytes as UTF-8
where they form whole characters, and ``\\xNN`` escapes for the bytes that do not (a character
split across tokens); a special token is its name (``<|endoftext|>``) and is marked
``special``. ``bytes`` is always exact (a literal backslash in text reads like an escape in
``text``, never in ``bytes``).

The prompt is built as generation builds it: plain text is ``<|endoftext|>`` followed by the
text's plain ``encode`` (as ``src/infer/generate.py``), a conversation is ``<|endoftext|>``
followed by the chat template with the assistant's turn opened (as ``ChatSession``). So the
maps show what the model sees when it continues that prompt. User text never becomes a
special token.

Ids that are no token (reserved special ids with nothing assigned) are excluded from every
distribution here, as they are from sampling (``undecodable_ids``): the probabilities are
the softmax over the tokens the model can actually produce.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from src.infer.sampling import SamplingSettings, process_logits, undecodable_ids
from src.model.gpt import record_attention
from src.tokenizer.chat_template import Turn, encode_chat

DEFAULT_MAX_TOKENS = 256  # longest text attention_maps accepts unless told otherwise
TOP_NEXT_TOKENS = 20  # how many next-token candidates attention_maps reports
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs

# ----------------------------------------------------------------------------------------
# Tokens as their bytes.


def token_piece(tokenizer, token_id: int) -> str:
    """How a token reads: its bytes as UTF-8 where they form whole characters, ``\\xNN`` for
    each byte that does not; a special token's name."""
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="backslashreplace")


def token_info(tokenizer, token_id: int) -> dict:
    """``{"id", "text", "bytes", "special"}`` of one token (see ``token_piece``)."""
    return {
        "id": token_id,
        "text": token_piece(tokenizer, token_id),
        "bytes": list(tokenizer.token_bytes(token_id)),
        "special": token_id in tokenizer.special_tokens.values(),
    }


def _ban_mask(tokenizer, vocab_size: int, device: torch.device) -> torch.Tensor:
    """(vocab,) bool: the ids that are no token (see the module docstring)."""
    ban = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    ban[undecodable_ids(tokenizer, vocab_size)] = True
    return ban


def _top(tokenizer, logprobs: torch.Tensor, n: int) -> list[dict]:
    """The ``n`` most likely tokens of a (vocab,) log-probability row, most likely first,
    each ``token_info`` plus ``logprob``; tokens the row rules out (-inf) are left out."""
    values, ids = torch.topk(logprobs, min(n, logprobs.numel()))
    return [{**token_info(tokenizer, i), "logprob": v}
            for v, i in zip(values.tolist(), ids.tolist()) if v != float("-inf")]


# ----------------------------------------------------------------------------------------
# Attention maps.


@dataclass
class AttentionMaps:
    """What ``attention_maps`` returns.

    ``tokens``: one ``token_info`` per position. ``attention[layer][head][query][key]``: the
    attention weights of every layer and (query) head, a T x T square per head whose row
    ``query`` is a probability distribution over keys 0..query (zeros above the diagonal:
    a token never sees the future). ``next_tokens``: the most likely tokens after the last
    position, most likely first, each ``token_info`` plus ``logprob`` and ``prob``.
    """

    tokens: list[dict]
    attention: list[list[list[list[float]]]]
    next_tokens: list[dict]

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "attention": self.attention,
                "next_tokens": self.next_tokens}


def _as_turn(message: Turn | Mapping[str, str]) -> Turn:
    if isinstance(message, Turn):
        return message
    if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
        raise ValueError(f"a message needs a role and a text content, got {message!r}")
    return Turn(message.get("role"), message["content"])


def prompt_ids(tokenizer, text: str | None = None,
               messages: Sequence[Turn | Mapping[str, str]] | None = None) -> list[int]:
    """The ids the model sees for ``text`` or for ``messages`` (a conversation, as ``Turn``s
    or ``{"role", "content"}`` dicts) followed by the opened assistant turn; exactly one of
    the two. See the module docstring."""
    if (text is None) == (messages is None):
        raise ValueError("give exactly one of text and messages")
    if text is not None:
        if not text:
            raise ValueError("the text is empty")
        return [tokenizer.eot_id, *tokenizer.encode(text)]
    if not messages:
        raise ValueError("messages is empty")
    turns = [_as_turn(m) for m in messages]
    return [tokenizer.eot_id, *encode_chat(tokenizer, turns, add_generation_prompt=True,
                                           end=False)[0]]


def attention_maps(model: torch.nn.Module, tokenizer, text: str | None = None,
                   messages: Sequence[Turn | Mapping[str, str]] | None = None, *,
                   max_tokens: int = DEFAULT_MAX_TOKENS,
                   decimals: int | None = None) -> AttentionMaps:
    """The tokens of ``text`` (or of ``messages``; see ``prompt_ids``), every layer's
    attention weights over them and the next-token distribution after them (see
    ``AttentionMaps``), from one forward pass of ``model`` under ``record_attention``.

    ``decimals`` rounds the weights (e.g. 4: their JSON text is about a third as long, and
    each row then sums to 1 within T * 0.5e-4); None keeps them as computed (float32).

    Raises ValueError (one line, for a client's 400) when the prompt is empty or has more
    than ``max_tokens`` tokens or more than the model's context. The model runs in eval mode
    (no dropout) and is restored afterwards.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a whole number >= 1, got {max_tokens!r}")
    if decimals is not None and (isinstance(decimals, bool) or not isinstance(decimals, int)
                                 or decimals < 1):
        raise ValueError(f"decimals must be a whole number >= 1 or None, got {decimals!r}")
    ids = prompt_ids(tokenizer, text, messages)
    limit = min(max_tokens, int(model.config.context_length))
    if len(ids) > limit:
        raise ValueError(f"the prompt is {len(ids)} tokens (with the <|endoftext|> that starts "
                         f"it); at most {limit} can be inspected")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), record_attention(model) as weights:
            logits = model(torch.tensor([ids], dtype=torch.long, device=device))
    finally:
        model.train(was_training)
    last = logits[0, -1].float()
    last = last.masked_fill(_ban_mask(tokenizer, last.numel(), last.device), float("-inf"))
    next_tokens = _top(tokenizer, torch.log_softmax(last, dim=-1), TOP_NEXT_TOKENS)
    for entry in next_tokens:
        entry["prob"] = math.exp(entry["logprob"])
    attention = torch.stack([w[0] for w in weights]).double().cpu()
    if decimals is not None:
        attention = attention.round(decimals=decimals)
    return AttentionMaps(
        tokens=[token_info(tokenizer, i) for i in ids],
        attention=attention.tolist(),
        next_tokens=next_tokens,
    )


# ----------------------------------------------------------------------------------------
# Log-probabilities of generated tokens.


def _check_top_n(top_n: int) -> None:
    if isinstance(top_n, bool) or not isinstance(top_n, int) or not 0 <= top_n <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top_logprobs must be a whole number from 0 to {MAX_TOP_LOGPROBS}, "
                         f"got {top_n!r}")


def logprobs_from_logits(tokenizer, logits: torch.Tensor, chosen: Sequence[int],
                         top_n: int = 0) -> list[dict]:
    """For each row of ``logits`` (N, vocab), the distribution a token was drawn from (as
    ``process_logits`` returns it: -inf marks removed tokens), and ``chosen[row]`` the token
    drawn: ``token_info`` of it plus its ``logprob`` and ``top_logprobs``, the ``top_n``
    likeliest tokens of that distribution (each ``token_info`` plus ``logprob``; tokens it
    rules out are left out, so there may be fewer). A token the distribution rules out gets
    ``logprob`` -inf (it could not have been drawn from it)."""
    _check_top_n(top_n)
    if logits.dim() != 2 or logits.size(0) != len(chosen):
        raise ValueError(f"need logits (N, vocab) and N chosen ids, got {tuple(logits.shape)} "
                         f"and {len(chosen)}")
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs[torch.arange(len(chosen)), torch.tensor(list(chosen), dtype=torch.long)]
    out = []
    for row, (token_id, logprob) in enumerate(zip(chosen, picked.tolist())):
        out.append({**token_info(tokenizer, token_id), "logprob": logprob,
                    "top_logprobs": _top(tokenizer, logprobs[row], top_n) if top_n else []})
    return out


def sequence_logprobs(model: torch.nn.Module, tokenizer, prompt: Sequence[int],
                      generated: Sequence[int], settings: SamplingSettings | None = None, *,
                      top_n: int = 0, unpenalised_ids: Sequence[int] = ()) -> list[dict]:
    """``logprobs_from_logits`` for each token of ``generated``, a continuation of ``prompt``,
    from one forward pass over both (they must fit the model's context together).

    ``settings=None`` scores each token under the model's own distribution (the softmax of
    its logits, before any sampling setting); with ``settings``, under the distribution
    ``sample_next`` draws from at that step: repetition penalty (over the prompt and the
    tokens before it, minus ``unpenalised_ids``, as ``stream_ids`` keeps it), temperature,
    top-k and top-p. Ids that are no token are excluded either way, as in sampling.
    """
    _check_top_n(top_n)
    if not prompt:
        raise ValueError("the prompt must have at least one token")
    if not generated:
        return []
    total = len(prompt) + len(generated)
    if total > model.config.context_length:
        raise ValueError(f"prompt and generated tokens are {total}; the context is "
                         f"{model.config.context_length}")
    device = next(model.parameters()).device
    seq = torch.tensor([[*prompt, *generated]], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            # The logits at position p predict token p + 1: those of the last prompt token
            # onward predict the generated tokens.
            logits = model(seq)[0, len(prompt) - 1:-1].float()
    finally:
        model.train(was_training)
    vocab = logits.size(-1)
    logits = logits.masked_fill(_ban_mask(tokenizer, vocab, device), float("-inf"))
    if settings is not None:
        seen = None
        if settings.repetition_penalty != 1.0:
            # Row i has seen the prompt and generated[:i].
            gen = torch.tensor(list(generated), dtype=torch.long, device=device)
            earlier = torch.zeros(len(generated), vocab, device=device)
            earlier[torch.arange(1, len(generated), device=device), gen[:-1]] = 1
            seen = earlier.cumsum(dim=0) > 0
            seen[:, torch.tensor(list(prompt), dtype=torch.long, device=device)] = True
            seen[:, torch.tensor(list(unpenalised_ids), dtype=torch.long, device=device)] = False
        logits = process_logits(logits, settings, seen)
    return logprobs_from_logits(tokenizer, logits.cpu(), generated, top_n)
