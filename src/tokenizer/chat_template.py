"""The chat template: the one implementation used by data preparation, chat and evaluation.

A conversation is a sequence of turns, each opened by its role's special token and
followed by the turn's text; a finished conversation ends with ``<|endoftext|>``::

    <|user|>Hi, how are you?<|assistant|>Fine, thanks. And you?<|user|>...<|endoftext|>

An optional system prompt comes first, as a "system" turn (only the first turn may be one;
its tokens are never scored)::

    <|system|>You are terse.<|user|>Hi<|assistant|>Hello.<|endoftext|>

An assistant turn therefore ends where the next ``<|user|>`` or the ``<|endoftext|>``
begins (``ASSISTANT_STOP_TOKENS``, the proper ends of a reply). The stop rule of a generated
reply, ``reply_stop_ids``, is wider: any special token ends it, as none belongs in its text.

Token ids are built structurally: role and end tokens are inserted as ids and each turn's
text is encoded with the tokenizer's plain ``encode``, which never yields a special token.
So text that contains ``<|endoftext|>`` literally stays plain text, whoever typed it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from src.tokenizer.special_tokens import ASSISTANT, ENDOFTEXT, SYSTEM, USER

Role = Literal["system", "user", "assistant"]
ROLE_TOKENS: dict[str, str] = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
ASSISTANT_STOP_TOKENS: tuple[str, ...] = (USER, ENDOFTEXT)


def reply_stop_ids(special_tokens: dict[str, int]) -> list[int]:
    """The stop rule of a generated assistant reply, as token ids: every special token.
    ``<|user|>`` and ``<|endoftext|>`` (ASSISTANT_STOP_TOKENS) are its proper ends; any other
    special token has no business inside a reply's text, so it ends the reply too."""
    return sorted(set(special_tokens.values()))


class TokenizerLike(Protocol):
    special_tokens: dict[str, int]

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation."""

    role: Role
    text: str

    def __post_init__(self) -> None:
        if self.role not in ROLE_TOKENS:
            raise ValueError(f"unknown chat role {self.role!r}; expected one of {sorted(ROLE_TOKENS)}")


def alternate_turns(utterances: list[str]) -> list[Turn]:
    """Give a two-speaker dialogue's utterances alternating roles, starting with the user."""
    return [Turn("user" if i % 2 == 0 else "assistant", u) for i, u in enumerate(utterances)]


def check_turn_order(turns: list[Turn]) -> None:
    """ValueError unless a "system" turn, if any, is the first turn (and the only one)."""
    for i, turn in enumerate(turns):
        if turn.role == "system" and i > 0:
            raise ValueError(f"a system turn must be the first turn of a conversation; turn {i} is one")


def render_chat(turns: list[Turn], *, add_generation_prompt: bool = False, end: bool = True) -> str:
    """The conversation as text, special tokens written out (for display and byte counts).

    ``add_generation_prompt`` appends ``<|assistant|>`` so a model continues with a reply;
    ``end`` appends ``<|endoftext|>`` (a finished conversation). They exclude each other.
    """
    if add_generation_prompt and end:
        raise ValueError("add_generation_prompt and end exclude each other")
    check_turn_order(turns)
    parts = [ROLE_TOKENS[t.role] + t.text for t in turns]
    if add_generation_prompt:
        parts.append(ASSISTANT)
    if end:
        parts.append(ENDOFTEXT)
    return "".join(parts)


def encode_chat(
    tokenizer: TokenizerLike,
    turns: list[Turn],
    *,
    add_generation_prompt: bool = False,
    end: bool = True,
) -> tuple[list[int], list[bool]]:
    """Token ids of ``render_chat(turns, ...)``, and for each id whether the assistant says it.

    The mask is True on an assistant turn's text tokens and on the token that ends that
    turn (the next ``<|user|>`` or the final ``<|endoftext|>``): exactly the targets a
    model is scored on when only its replies count.
    """
    if add_generation_prompt and end:
        raise ValueError("add_generation_prompt and end exclude each other")
    check_turn_order(turns)
    specials = tokenizer.special_tokens
    ids: list[int] = []
    mask: list[bool] = []
    in_assistant_turn = False
    for turn in turns:
        ids.append(specials[ROLE_TOKENS[turn.role]])
        mask.append(in_assistant_turn)  # this role token ends the previous turn
        text_ids = tokenizer.encode(turn.text)
        in_assistant_turn = turn.role == "assistant"
        ids.extend(text_ids)
        mask.extend([in_assistant_turn] * len(text_ids))
    if add_generation_prompt:
        ids.append(specials[ASSISTANT])
        mask.append(in_assistant_turn)
    if end:
        ids.append(specials[ENDOFTEXT])
        mask.append(in_assistant_turn)
    return ids, mask
