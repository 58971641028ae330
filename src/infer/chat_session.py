"""A conversation with the model: history, fitting it into the context, settings, replies.

``chat.py`` is only the terminal around this module; everything here works without one.

How a prompt is built. The conversation is encoded with the project's one chat template
(``src.tokenizer.chat_template.encode_chat``), preceded by ``<|endoftext|>`` (in training every
dialogue follows the previous document's end token) and followed by ``<|assistant|>``::

    <|endoftext|><|user|>Hi!<|assistant|>Hello.<|user|>How are you?<|assistant|>

The model continues with the reply, which ends at a stop token (the template's stop rule,
``reply_stop_ids``): ``<|user|>`` or ``<|endoftext|>`` or any other special token, which has
no business inside a reply.

Fitting the context. The prompt may use the context minus the room kept for the reply
(``max_tokens``, but at most half the context). When the history no longer fits, the oldest
exchanges (a user turn and its reply) are dropped first; the current message never is.
A message that alone is longer than that room keeps its end (cut from the front), with a
notice. A reply that reaches the end of the context stops there (``finish_reason``
"context"; chat.py says so).

Text a user types is plain text even when it spells a special token such as
``<|endoftext|>``: ``encode_chat`` encodes turn text with the tokenizer's plain ``encode``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from src.infer.sampling import (
    CHAT_DEFAULTS,
    UNKNOWN_WORD,
    SamplingSettings,
    context_length_of,
    generate,
    rename_setting_in_error,
)
from src.tokenizer.chat_template import Turn, encode_chat, reply_stop_ids
from src.tokenizer.special_tokens import ASSISTANT, ENDOFTEXT
from src.utils.device import make_generator

Notice = Callable[[str], None]


def fit_prompt(
    history: Sequence[tuple[Turn, list[int]]],
    message: list[int],
    *,
    prefix: list[int],
    suffix: list[int],
    budget: int,
) -> tuple[list[int], int, int]:
    """Assemble ``prefix + history + message + suffix`` in at most ``budget`` tokens.

    ``history`` holds each past turn with its ids (role token first); ``message`` is the
    current user turn's ids (role token first). Oldest turns are dropped first, and the kept
    history always starts at a user turn (whole exchanges go). If the message alone does not
    fit, its text is cut from the front, keeping its role token.

    Returns (prompt ids, number of history turns dropped, number of message tokens cut).
    """
    room = budget - len(prefix) - len(suffix)
    if room < 2:
        raise ValueError(f"a budget of {budget} tokens leaves no room for a message")
    cut = max(0, len(message) - room)
    if cut:
        message = message[:1] + message[1 + cut :]
    room -= len(message)
    # Keep the newest turns that fit, then drop from the front to a user turn.
    start, used = len(history), 0
    while start > 0 and used + len(history[start - 1][1]) <= room:
        start -= 1
        used += len(history[start][1])
    while start < len(history) and history[start][0].role != "user":
        start += 1
    ids = list(prefix)
    for _, turn_ids in history[start:]:
        ids.extend(turn_ids)
    return ids + message + list(suffix), start, cut


HELP = """\
Commands:
  /help                  this help
  /reset                 forget the conversation so far
  /quit                  leave (Ctrl-D also works)
  /settings              show the sampling settings
  /temperature X         0 = always the most likely token; higher = more varied (e.g. 0.8)
  /top_p X               sample among the likeliest tokens that cover X of the probability
  /top_k N               sample from the N most likely tokens (0 = off)
  /max_tokens N          the longest reply, in tokens
  /repetition_penalty X  > 1 discourages repeating tokens (1 = off)
Ctrl-C stops a reply. Empty lines are ignored. Start a message with // to send a text
that begins with /."""

# command -> (settings field, parser, how the value is described in errors)
_SETTERS: dict[str, tuple[str, Callable[[str], float | int], str]] = {
    "/temperature": ("temperature", float, "a number, e.g. /temperature 0.7"),
    "/top_p": ("top_p", float, "a number in (0, 1], e.g. /top_p 0.9"),
    "/top_k": ("top_k", int, "a whole number, e.g. /top_k 40 (0 = off)"),
    "/max_tokens": ("max_new_tokens", int, "a whole number, e.g. /max_tokens 200"),
    "/repetition_penalty": ("repetition_penalty", float, "a number, e.g. /repetition_penalty 1.1"),
}


class CommandError(ValueError):
    """An unknown command or a bad value; the message says which and what is expected."""


@dataclass
class Command:
    """A parsed command line: ``action`` is one of help, reset, quit, settings, set."""

    action: str
    settings: SamplingSettings | None = None  # for "set": the new settings
    message: str = ""


def parse_command(line: str, settings: SamplingSettings) -> Command | None:
    """The command on ``line``, or None when the line is a message (it does not start with
    a single ``/``). Raises :class:`CommandError` for unknown commands and bad values."""
    text = line.strip()
    if not text.startswith("/") or text.startswith("//"):
        return None
    name, _, arg = text.partition(" ")
    arg = arg.strip()
    name = name.lower()
    if name in ("/help", "/?"):
        return Command("help", message=HELP)
    if name == "/reset":
        return Command("reset", message="(conversation reset)")
    if name in ("/quit", "/exit"):
        return Command("quit")
    if name == "/settings":
        return Command("settings", message=describe_settings(settings))
    if name not in _SETTERS:
        raise CommandError(f"unknown command {name}; /help lists the commands")
    field_name, parse, expected = _SETTERS[name]
    if not arg:
        current = getattr(settings, field_name)
        return Command("settings", message=f"{name[1:]} is {current} (set it with {name} VALUE)")
    try:
        value = parse(arg)
    except ValueError:
        raise CommandError(f"{name} expects {expected}; got {arg!r}") from None
    if field_name == "top_k" and value == 0:
        value = None
    try:
        new = replace(settings, **{field_name: value})
    except ValueError as exc:  # "top_p must be in (0, 1], got 7.0" -> "/top_p must be ..."
        raise CommandError(rename_setting_in_error(exc, lambda _field: name)) from None
    return Command("set", settings=new, message=f"({name[1:]} = {arg})")


def describe_settings(s: SamplingSettings) -> str:
    return (
        f"temperature={s.temperature} top_p={s.top_p} top_k={s.top_k or 0} "
        f"max_tokens={s.max_new_tokens} repetition_penalty={s.repetition_penalty}"
    )


def message_text(line: str) -> str:
    """What a typed line sends: surrounding whitespace removed, a leading ``//`` read as ``/``."""
    text = line.strip()
    return text[1:] if text.startswith("//") else text


@dataclass
class Reply:
    """A finished reply: its text and why it ended (a sampling finish reason, or
    ``"interrupted"`` after Ctrl-C)."""

    text: str
    finish_reason: str


class ChatSession:
    """A multi-turn conversation with one model.

    ``reply(text)`` answers a user message, streaming the reply through ``on_text`` and
    adding both turns to the history. ``settings`` may be replaced between replies.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        settings: SamplingSettings | None = None,
        *,
        seed: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings or CHAT_DEFAULTS
        self.generator = make_generator(seed, next(model.parameters()).device)
        self.history: list[tuple[Turn, list[int]]] = []
        specials = tokenizer.special_tokens
        self.prefix = [specials[ENDOFTEXT]]
        self.suffix = [specials[ASSISTANT]]
        self.stop_ids = reply_stop_ids(specials)

    @property
    def context_length(self) -> int:
        return context_length_of(self.model)

    def reset(self) -> None:
        self.history.clear()

    def _turn_ids(self, turn: Turn) -> list[int]:
        return encode_chat(self.tokenizer, [turn], end=False)[0]

    def build_prompt(
        self, text: str, notice: Notice | None = None
    ) -> tuple[list[int], Turn, list[int]]:
        """The prompt ids for answering ``text``, and the message (turn, ids) as kept: cut
        from the front if it alone does not fit. Drops the history that no longer fits."""
        ctx = self.context_length
        budget = ctx - min(self.settings.max_new_tokens, ctx // 2)
        message = self._turn_ids(Turn("user", text))
        ids, dropped, cut = fit_prompt(
            self.history, message, prefix=self.prefix, suffix=self.suffix, budget=budget
        )
        turn = Turn("user", text)
        if cut:
            kept = len(message) - 1 - cut
            message = message[:1] + message[1 + cut :]
            turn = Turn("user", self.tokenizer.decode(message[1:]))
            if notice:
                notice(
                    f"your message is {kept + cut} tokens, more than fit with room for a "
                    f"reply in the context of {ctx}; kept its last {kept}"
                )
        if dropped:
            self.history = self.history[dropped:]
            if notice:
                notice(f"the conversation outgrew the context: forgot its {dropped} oldest turns")
        return ids, turn, message

    def reply(
        self,
        text: str,
        on_text: Callable[[str], None] | None = None,
        notice: Notice | None = None,
    ) -> Reply:
        """Answer the user's ``text``; raises ``ValueError`` for an empty or blank message.

        Ctrl-C (``KeyboardInterrupt``) during the reply stops it; the part already streamed
        is kept in the history and returned with ``finish_reason == "interrupted"``. A reply
        cut by the end of the context has ``finish_reason == "context"``. ``notice`` receives
        what happened to the history (turns dropped, the message cut) before the reply.
        """
        if not text.strip():
            raise ValueError("an empty message gets no reply")
        prompt, user_turn, message = self.build_prompt(text, notice)
        pieces: list[str] = []

        def stream(row: int, piece: str) -> None:
            pieces.append(piece)
            if on_text:
                on_text(piece)

        try:
            [completion] = generate(
                self.model,
                self.tokenizer,
                prompt,
                self.settings,
                stop_ids=self.stop_ids,
                generator=self.generator,
                on_context_full="stop",
                on_text=stream,
                banned_text=UNKNOWN_WORD,  # WikiText's placeholder: never in a reply
            )
            result = Reply(completion.text, completion.finish_reason)
        except KeyboardInterrupt:
            result = Reply("".join(pieces), "interrupted")
        self.history.append((user_turn, message))
        answer = Turn("assistant", result.text)
        self.history.append((answer, self._turn_ids(answer)))
        return result
