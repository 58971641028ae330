"""OpenAI's wire format: request validation, prompts, response objects and errors.

Requests are plain JSON dicts checked by hand, so that every mistake gets OpenAI's error
object with the parameter it concerns (``param``) and a message saying what was expected.
Where OpenAI's API is silent for a model like ours, we follow vLLM: unknown fields are
ignored, ``max_tokens`` defaults to the room left in the context, ``top_k``,
``repetition_penalty`` and ``ignore_eos`` (generate exactly ``max_tokens``, for
benchmarks) are accepted as extras. Features we do not have (tools, JSON mode, logit
bias, suffix, echo) are refused with 400 rather than ignored.

Log-probabilities (``logprobs``) are OpenAI's: chat's ``{"content": [{token, logprob, bytes,
top_logprobs}]}`` and the legacy completions' ``{tokens, token_logprobs, top_logprobs,
text_offset}``, under the model's raw distribution (see ``sampling.token_logprobs``). A
token that is not valid UTF-8 on its own (part of a character split over tokens) is named
as OpenAI names it, ``"bytes:\\xf0\\x9f"``; its ``bytes`` are the raw bytes.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from src.infer.engine import Engine, GenerationRequest, TokenLogprob
from src.infer.internals import DEFAULT_MAX_TOKENS
from src.infer.sampling import SamplingSettings
from src.tokenizer.bpe import StreamingDecoder
from src.tokenizer.chat_template import Turn, encode_chat

MAX_N = 8  # choices per request (each one is a sequence in the batch)
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions' logprobs, as OpenAI
MAX_STOP = 4  # stop strings, as OpenAI
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
ROLES = ("system", "user", "assistant")


class APIError(Exception):
    """An error answered with OpenAI's JSON: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _bad(message: str, param: str | None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ------------------------------------------------------------------------ typed fields


def _number(body: dict, name: str, lo: float, hi: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(f"'{name}' must be a number, got {value!r}", name, "invalid_type")
    if not lo <= value <= hi:
        raise _bad(f"'{name}' must be between {lo:g} and {hi:g}, got {value!r}", name,
                   "invalid_value")
    return float(value)


def _integer(body: dict, name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{name}' must be an integer, got {value!r}", name, "invalid_type")
    if not lo <= value <= hi:
        raise _bad(f"'{name}' must be between {lo} and {hi}, got {value}", name,
                   "invalid_value")
    return value


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(f"'{name}' must be a boolean, got {value!r}", name, "invalid_type")
    return value


def _refuse_unsupported(body: dict, names: dict[str, Any]) -> None:
    """400 for a feature we do not have, unless it is given its 'off' value."""
    for name, off in names.items():
        value = body.get(name)
        if value is not None and value != off and value not in ([], {}):
            raise _bad(f"'{name}' is not supported by this server", name, "unsupported_parameter")


# ------------------------------------------------------------------------ requests


@dataclass
class ParsedRequest:
    """A validated request: one prompt per choice group, settings shared by all choices."""

    prompts: list[list[int]]  # token ids of each prompt (chat: one; completions: one or more)
    settings: SamplingSettings
    n: int
    seed: int | None
    stop_ids: list[int]
    stop_strings: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None = None  # alternatives per token (None: no log-probabilities)
    requests: list[GenerationRequest] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        """Counted once per prompt, not per choice (as OpenAI)."""
        return sum(len(p) for p in self.prompts)


def _check_model(body: dict, model_name: str) -> None:
    """404 unless ``model`` is absent or the one model served."""
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise _bad(f"'model' must be a string, got {model!r}", "model", "invalid_type")
        if model != model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves "
                           f"'{model_name}'", param="model", code="model_not_found")


def _common(body: dict, model_name: str) -> dict:
    """The parameters shared by both endpoints, checked."""
    _check_model(body, model_name)
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = stop
    else:
        raise _bad(f"'stop' must be a string or an array of strings, got {stop!r}", "stop",
                   "invalid_type")
    if len(stops) > MAX_STOP:
        raise _bad(f"'stop' may hold at most {MAX_STOP} strings, got {len(stops)}", "stop",
                   "invalid_value")
    if any(not s for s in stops):
        raise _bad("'stop' strings must not be empty", "stop", "invalid_value")
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _bad("'stream_options' is only allowed when 'stream' is true",
                       "stream_options", "invalid_value")
        if not isinstance(options, dict):
            raise _bad(f"'stream_options' must be an object, got {options!r}", "stream_options",
                       "invalid_type")
        include_usage = _boolean(options, "include_usage")
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    top_k = _integer(body, "top_k", -1, 2**31 - 1)  # vLLM's extra; -1 and 0 mean off
    return dict(
        stops=stops, stream=stream, include_usage=include_usage,
        n=_integer(body, "n", 1, MAX_N) or 1,
        seed=_integer(body, "seed", *SEED_RANGE),
        temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
        # top_p 0 keeps only the most likely token (the nucleus of an ever smaller p).
        top_p=max(top_p, 1e-9),
        top_k=top_k if top_k and top_k > 0 else None,
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0, 0.0),
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0, 0.0),
        repetition_penalty=_number(body, "repetition_penalty", 1e-3, 100.0, 1.0),
    )


def _message_text(message: dict, i: int) -> str:
    content = message.get("content")
    param = f"messages[{i}].content"
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text ones
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise _bad(f"{param}[{j}] must be a text part {{'type': 'text', 'text': ...}}; "
                           "this model reads text only", f"{param}[{j}]", "invalid_value")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"{param} must be a string or an array of text parts, got {content!r}", param,
               "invalid_type")


def chat_turns(body: dict) -> list[Turn]:
    """The ``messages`` of a chat request as turns of our chat template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty array of messages", "messages",
                   "invalid_type" if not isinstance(messages, list) else "invalid_value")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}] must be an object, got {message!r}", f"messages[{i}]",
                       "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role {role!r} is not supported; expected one of "
                       f"{', '.join(ROLES)}", f"messages[{i}].role", "invalid_value")
        if role == "system" and i > 0:
            raise _bad(f"messages[{i}]: a system message is only allowed as the first message",
                       f"messages[{i}].role", "invalid_value")
        turns.append(Turn(role, _message_text(message, i)))
    return turns


def parse_request(body: Any, kind: str, engine: Engine, model_name: str) -> ParsedRequest:
    """Validate a chat ("chat") or completions ("completions") request body into prompts and
    settings; raises APIError (400/404) naming the parameter."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None, "invalid_type")
    _refuse_unsupported(body, {
        "logit_bias": {}, "tools": [], "functions": [],
        "tool_choice": "none", "function_call": "none", "suffix": "", "echo": False,
        "best_of": 1, "audio": None, "modalities": ["text"], "prediction": None})
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise _bad("'response_format' other than {'type': 'text'} is not supported",
                   "response_format", "unsupported_parameter")
    common = _common(body, model_name)
    tok = engine.tokenizer
    eot = tok.eot_id
    if kind == "chat":
        turns = chat_turns(body)
        # As in training, a conversation follows an <|endoftext|>; the turn texts are plain
        # text (encode_chat never turns typed text into a special token).
        ids, _ = encode_chat(tok, turns, add_generation_prompt=True, end=False)
        prompts = [[eot, *ids]]
        # Every special token ends a reply (as in chat.py): <|user|> and <|endoftext|> are
        # its proper ends, any other has no business inside a reply.
        stop_ids = sorted(set(tok.special_tokens.values()))
        max_tokens = _integer(body, "max_completion_tokens", 1, 2**31 - 1)
        max_param = "max_completion_tokens"
        if max_tokens is None:
            max_tokens, max_param = _integer(body, "max_tokens", 1, 2**31 - 1), "max_tokens"
        top_logprobs = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        wants_logprobs = _boolean(body, "logprobs")
        if top_logprobs is not None and not wants_logprobs:
            raise _bad("'top_logprobs' needs 'logprobs' set to true", "top_logprobs",
                       "invalid_value")
        logprobs = (top_logprobs or 0) if wants_logprobs else None
    else:
        prompt = body.get("prompt")
        texts = [prompt] if isinstance(prompt, str) else prompt
        if not (isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts)):
            raise _bad("'prompt' must be a string or a non-empty array of strings (token "
                       f"arrays are not supported), got {prompt!r}", "prompt", "invalid_type")
        if len(texts) * common["n"] > MAX_N:
            raise _bad(f"at most {MAX_N} choices per request (prompts x n), got "
                       f"{len(texts) * common['n']}", "n", "invalid_value")
        prompts = [[eot, *tok.encode(t)] for t in texts]  # a document starts after <|endoftext|>
        stop_ids = [eot]
        max_tokens, max_param = _integer(body, "max_tokens", 1, 2**31 - 1), "max_tokens"
        logprobs = _integer(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS)

    ctx = engine.context_length
    longest = max(len(p) for p in prompts)
    given = max_tokens is not None
    what = "messages" if kind == "chat" else "prompt"
    if given and longest + max_tokens > ctx:
        raise _bad(f"This model's maximum context length is {ctx} tokens. However, you "
                   f"requested {longest + max_tokens} tokens ({longest} in the {what}, "
                   f"{max_tokens} in the completion). Please reduce the length of the "
                   f"{what} or completion.", max_param, "context_length_exceeded")
    if longest >= ctx:
        raise _bad(f"This model's maximum context length is {ctx} tokens. However, your "
                   f"{what} resulted in {longest} tokens, which leaves no room for a "
                   f"completion. Please reduce the length of the {what}.", what,
                   "context_length_exceeded")
    if not given:
        # Chat: the room left in the context (vLLM); completions: OpenAI's 16, if it fits.
        max_tokens = ctx - longest if kind == "chat" else min(16, ctx - longest)
    try:
        settings = SamplingSettings(
            max_new_tokens=max_tokens, temperature=common["temperature"], top_p=common["top_p"],
            top_k=common["top_k"], repetition_penalty=common["repetition_penalty"],
            frequency_penalty=common["frequency_penalty"],
            presence_penalty=common["presence_penalty"])
    except ValueError as exc:  # ranges are checked above; this is a safety net
        raise _bad(str(exc), None, "invalid_value") from None
    if _boolean(body, "ignore_eos"):
        stop_ids = []
    parsed = ParsedRequest(
        prompts=prompts, settings=settings, n=common["n"], seed=common["seed"],
        stop_ids=stop_ids, stop_strings=common["stops"], stream=common["stream"],
        include_usage=common["include_usage"], logprobs=logprobs)
    for prompt in prompts:
        for j in range(parsed.n):
            # Choice j draws with seed + j, so n choices differ and each is reproducible.
            seed = None if parsed.seed is None else parsed.seed + j
            parsed.requests.append(GenerationRequest(prompt, settings, seed, stop_ids,
                                                     parsed.stop_strings, logprobs))
    return parsed


# ------------------------------------------------------------------------ responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def openai_finish_reason(reason: str) -> str:
    """The engine's reasons in OpenAI's words: a stream ended by the server shutting down
    reports "stop" (OpenAI has no word for it; its text is complete as far as it goes)."""
    return "length" if reason == "length" else "stop"


# ------------------------------------------------------------------------ log-probabilities


def token_name(token_bytes: bytes) -> str:
    """A token as OpenAI shows it: its text, or ``bytes:\\xf0\\x9f`` (escaped, lowercase
    hex) when its bytes are not valid UTF-8 on their own (part of a split character)."""
    try:
        return token_bytes.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in token_bytes)


def chat_logprobs(tokenizer, records: Sequence[TokenLogprob]) -> dict:
    """Chat's ``choice.logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}],
    "refusal": None}``, one entry per generated token."""

    def entry(token: int, logprob: float) -> dict:
        raw = tokenizer.token_bytes(token)
        return {"token": token_name(raw), "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**entry(r.token, r.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in r.top]}
                        for r in records],
            "refusal": None}


class CompletionLogprobs:
    """The legacy completions' ``choice.logprobs`` of one choice, built as its tokens come:
    ``tokens``, ``token_logprobs``, ``top_logprobs`` (a dict token -> logprob of the
    likeliest, plus the chosen token, as OpenAI: up to logprobs + 1 entries) and
    ``text_offset`` (where each token's text starts in the completion, in characters; the
    tokens of a split character all start at it). Offsets run on across streamed chunks."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decoder = StreamingDecoder(tokenizer)
        self.chars = 0  # characters of the completion decoded so far

    def add(self, records: Sequence[TokenLogprob]) -> dict:
        """The ``logprobs`` object of the next ``records``."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for r in records:
            out["tokens"].append(self._name(r.token))
            out["token_logprobs"].append(r.logprob)
            top = {self._name(t): lp for t, lp in r.top}
            top.setdefault(self._name(r.token), r.logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.chars)
            self.chars += len(self.decoder.feed(r.token))
        return out

    def _name(self, token: int) -> str:
        return token_name(self.tokenizer.token_bytes(token))


# ------------------------------------------------------------------------ attention maps

MAX_INSPECT_TOKENS = DEFAULT_MAX_TOKENS  # the longest prompt /v1/internals/attention inspects
INSPECT_DECIMALS = 4  # default rounding of the attention weights (keeps the JSON small)
MAX_INSPECT_DECIMALS = 8


@dataclass
class AttentionRequest:
    """A validated ``POST /v1/internals/attention`` body (see ``parse_attention_request``)."""

    text: str | None
    messages: list[Turn] | None
    max_tokens: int
    decimals: int


def parse_attention_request(body: Any, model_name: str) -> AttentionRequest:
    """Validate ``{"model"?, "text": str}`` or ``{"model"?, "messages": [...]}`` with optional
    ``max_tokens`` (1..MAX_INSPECT_TOKENS, default the limit) and ``decimals`` (1..8, default
    4); raises APIError (400/404) naming the parameter. The token count itself is checked by
    ``attention_maps``."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None, "invalid_type")
    _check_model(body, model_name)
    has_text, has_messages = body.get("text") is not None, body.get("messages") is not None
    if has_text == has_messages:
        raise _bad("give exactly one of 'text' and 'messages'", "text", "invalid_value")
    text, turns = body.get("text"), None
    if has_text:
        if not isinstance(text, str):
            raise _bad(f"'text' must be a string, got {text!r}", "text", "invalid_type")
        if not text:
            raise _bad("'text' is empty", "text", "invalid_value")
    else:
        turns = chat_turns(body)
    max_tokens = _integer(body, "max_tokens", 1, MAX_INSPECT_TOKENS) or MAX_INSPECT_TOKENS
    decimals = _integer(body, "decimals", 1, MAX_INSPECT_DECIMALS) or INSPECT_DECIMALS
    return AttentionRequest(text, turns, max_tokens, decimals)
